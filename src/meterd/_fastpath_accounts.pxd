# Money, rating, plans and alerts (included by _fastpath.pxd; implemented in
# _fastpath_accounts.pxi).


# How _debit treats the balance.
cdef enum:
    DEBIT_CHECK = 0      # charge what the balance covers; else degrade (the plan's fallback) or deny
    DEBIT_FORCE = 1      # charge whatever the balance (a settlement: the work was done)
    DEBIT_DEGRADE = 2    # serve in the plan's fallback mode, charging nothing (the rest of a degraded event)


cdef class _Accounts(_State):
    # low-balance alerts since take_alerts: account * n_ct + credit type
    cdef int64_t *alerts
    cdef Py_ssize_t n_alerts
    cdef bint alerts_lost

    cdef int _init_accounts(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity,
                            list plans, list modes, list free, list credit_names) except -1
    # money and rating
    cdef inline i128 _available(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef int32_t _find_rate(self, int32_t meter, const char **value, const int32_t *value_len) noexcept nogil
    cdef int32_t _scan_rates(self, int32_t meter, const char **value, const int32_t *value_len) noexcept nogil
    cdef int32_t _no_price_pos(self, int32_t meter, const char **value, const int32_t *value_len) noexcept nogil
    cdef int _price_values(self, int32_t meter, object dims, const char **value, int32_t *value_len,
                           list keep) except -1
    cdef int _fine(self, int32_t rate, int64_t quantity, i128 *out) noexcept nogil
    cdef int _graduated(self, int32_t rate, int64_t start, int64_t end, i128 *out) noexcept nogil
    cdef int _volume(self, int32_t rate, int64_t quantity, int64_t units, i128 *out) noexcept nogil
    cdef int _debit(self, Py_ssize_t idx, int32_t rate, int64_t quantity, i128 fine, int64_t minimum, int how,
                    int64_t *cost, const char *uval, Py_ssize_t ulen) noexcept nogil
    # plans and alerts
    cdef inline void _check_alert(self, Py_ssize_t idx, Py_ssize_t ct, int64_t before) noexcept nogil
    cdef inline uint32_t _priority(self, Py_ssize_t idx, int32_t ct) noexcept nogil
