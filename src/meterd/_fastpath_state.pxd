# An account's state, distinct values and snapshot records (included by
# _fastpath.pxd; implemented in _fastpath_state.pxi).


# A distinct value seen by a unique_count meter in an account's period, compared
# by its bytes (in uarena); the hash only picks the bucket. Entries of one
# account are chained (``next``) so that a snapshot finds them; an account's
# period reset bumps its epoch, which makes its old entries stale. 40 bytes.
cdef struct UEntry:
    uint64_t vhash
    uint64_t voff
    int32_t vlen             # -1: known only by its hash (a snapshot from before values were kept)
    int32_t acct
    int32_t meter
    uint32_t epoch
    int32_t next


cdef extern from *:
    """
    #define METERD_STATE_DISCOUNTED (((int64_t)1) << 32)
    """
    # in a state record's plan word: a discount per credit type follows the record
    const int64_t STATE_DISCOUNTED "METERD_STATE_DISCOUNTED"


cdef class _State(_Tables):
    # distinct values of unique_count meters (per account: uhead, uepoch of _Tables)
    cdef UEntry *uent
    cdef Py_ssize_t n_uent
    cdef Py_ssize_t cap_uent
    cdef int32_t *uidx
    cdef uint64_t umask
    cdef char *uarena            # the distinct values' bytes
    cdef uint64_t uarena_len
    cdef uint64_t uarena_cap

    # snapshots
    cdef Py_ssize_t _load_state(self, bytes customer_id, bytes data) except -1
    cdef list _state_uniques(self, bytes data, Py_ssize_t words, Py_ssize_t trailer)
    # distinct values
    cdef inline uint64_t _ukey(self, int32_t acct, int32_t meter, uint32_t epoch, uint64_t vhash) noexcept nogil
    cdef int32_t _ufind(self, int32_t acct, int32_t meter, uint64_t vhash, const char *val,
                        Py_ssize_t vlen) noexcept nogil
    cdef void _uinsert(self, int32_t acct, int32_t meter, uint64_t vhash, const char *val,
                       Py_ssize_t vlen) noexcept nogil
    cdef int _ureserve(self, Py_ssize_t more, Py_ssize_t more_bytes) except -1
    cdef int _urebuild(self, Py_ssize_t more, Py_ssize_t more_bytes) except -1
