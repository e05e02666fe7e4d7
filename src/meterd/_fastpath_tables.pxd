# The catalog's tables and the account table (included by _fastpath.pxd;
# implemented in _fastpath_tables.pxi): meters, rates, plans and names, the
# accounts with their balances, usage and plan, and the rarely set state of an
# account (Ext rows).


cdef struct Tier:
    int64_t up_to            # the units of the period it prices end here (INT64_MAX: the rest)
    int64_t amount_nano
    int64_t factor


cdef struct Rate:
    int32_t meter
    int32_t ct
    uint32_t mask            # the price dimensions it names a value of (corespec.rate_mask); 0: default
    uint64_t hash            # of its meter, mask and values (_rate_hash), in the rate table
    char *value[PRICE_DIMENSIONS_MAX]       # per price dimension in the mask: the value
    int32_t value_len[PRICE_DIMENSIONS_MAX]
    int64_t amount_nano      # with tiers, the dearest tier's (what a quote holds)
    int64_t factor
    int32_t tier_first       # its tiers in the tier table (tier_count 0: one price)
    int32_t tier_count


cdef struct Meter:
    char *name
    int32_t name_len
    int32_t ct
    int32_t precision
    int32_t agg
    char *uniq_key           # unique_count meters: the dimension whose distinct values count
    int32_t uniq_key_len
    int32_t n_dims           # price dimensions; 0: the meter has a single price
    char *dim_key[PRICE_DIMENSIONS_MAX]
    int32_t dim_key_len[PRICE_DIMENSIONS_MAX]
    char *dim_default[PRICE_DIMENSIONS_MAX]      # the value an event without the dimension is priced as
    int32_t dim_default_len[PRICE_DIMENSIONS_MAX]  # (NULL: none)
    uint32_t masks           # bit k: some rate has mask k
    int64_t increment        # sum meters: quantities are rounded up to a multiple of this (1: none)
    int64_t minimum          # the least an event that is not free costs, in nano (0: none)
    int32_t tier_mode        # TIER_GRADUATED or TIER_VOLUME (corespec)
    int32_t rate_first
    int32_t rate_count
    int32_t rate_default     # -1: no default price (mask 0)
    int32_t pool             # the credit type holding its free units as a balance (set_pools); -1: none


# The state of an account and credit type that most accounts never set:
# held by reservations, an overdraft floor, degraded usage this period, a
# low-balance threshold, a negotiated discount. An account has these rows (one
# per credit type) only once one of them is set to other than its default
# (0, 0, 0, INT64_MIN, 0).
cdef struct Ext:
    int64_t resv
    int64_t floor
    int64_t degr
    int64_t alert
    int64_t disc             # what is taken off each charge, in 1/DISCOUNT_SCALE (0: none)


cdef enum:
    RATES_SCANNED_MAX = 8        # a meter with at most this many rates finds one by looking at each
    ACCOUNTS_MAX = 0x7FFFFFF0    # account indices are int32, and so are their slots
    ROWS_MAX = 0x3FFFFFFF        # other tables of int32 indices, with twice as many int32 slots


cdef class _Tables:
    # the catalog's shape
    cdef int n_ct
    cdef int n_meters
    cdef int n_rates
    cdef int64_t *denom
    cdef Meter *meters
    cdef Rate *rates
    cdef int32_t *rate_slots     # the rate table: rates by hash (index + 1; 0 empty)
    cdef Tier *tiers             # the rates' tiers, each rate's together
    cdef int n_tiers
    cdef uint64_t rate_mask
    cdef int id_max              # customer_id_bytes_max
    cdef bint closed
    # account table
    cdef Py_ssize_t count
    cdef Py_ssize_t cap
    cdef uint64_t mask
    cdef int32_t *slots
    cdef uint32_t *hashes
    cdef uint64_t *id_off
    cdef uint8_t *id_len
    cdef char *arena
    cdef uint64_t arena_len
    cdef uint64_t arena_cap
    cdef int64_t *bal
    cdef int64_t *rem
    cdef int64_t *usage
    cdef uint16_t *plan_of
    cdef uint8_t *dirty
    cdef int32_t *ext            # per account: its first Ext row, or -1 (all defaults)
    cdef Ext *xrows
    cdef Py_ssize_t n_x
    cdef Py_ssize_t cap_x
    # per account, for the distinct values of unique_count meters (_State): the
    # head of its chain of entries and its period's epoch
    cdef bint has_unique         # uhead and uepoch exist only for a catalog with unique_count meters
    cdef int32_t *uhead
    cdef uint32_t *uepoch
    # plans: fallback mode (0 = deny) and priority step per (plan, credit type)
    cdef int n_plans
    cdef int32_t *plan_mode
    cdef int64_t *plan_step
    cdef int64_t *plan_free      # free units per (plan, meter) and period
    cdef list modes
    cdef const char **mode_ptr
    cdef int32_t *mode_len
    cdef list credit_names
    cdef const char **ct_name
    cdef int32_t *ct_name_len

    # construction
    cdef int _init_tables(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity,
                          list plans, list modes, list free, list credit_names) except -1
    cdef int _init_names(self, list credit_names, list modes) except -1
    cdef int _init_plans(self, list plans, list free) except -1
    cdef int _init_meters(self, list meters) except -1
    cdef int _init_rates(self, list rates) except -1
    cdef int _init_tiers(self, Py_ssize_t rate, tuple steps) except -1
    cdef int32_t _rate_at(self, int32_t meter, uint32_t mask, const char **value, const int32_t *value_len,
                          uint64_t h) noexcept nogil
    cdef int _check(self) except -1
    cdef int _idx(self, Py_ssize_t idx) except -1
    cdef int _ct(self, Py_ssize_t ct) except -1
    # account table
    cdef int _grow(self, Py_ssize_t new_cap) except -1
    cdef inline int32_t _find(self, const char *p, Py_ssize_t n) noexcept nogil
    cdef int32_t _insert(self, const char *p, Py_ssize_t n) except -2
    cdef int _check_id(self, bytes customer_id) except -1
    # Ext rows
    cdef inline Ext *_xp(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef int _xreserve(self, Py_ssize_t accounts) except -1
    cdef inline Ext *_xnew(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef Ext *_xw(self, Py_ssize_t idx, Py_ssize_t ct) except NULL
    cdef inline int64_t _resv(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef inline int64_t _floor(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef inline int64_t _degr(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef inline int64_t _alert(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef inline int64_t _disc(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil
    cdef int _set_ext(self, Py_ssize_t idx, Py_ssize_t ct, int64_t resv, int64_t floor, int64_t degr,
                      int64_t alert, int64_t disc) except -1
