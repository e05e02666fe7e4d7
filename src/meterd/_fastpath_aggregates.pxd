# Usage aggregates (included by _fastpath.pxd; implemented in _fastpath_aggregates.pxi):
# what the ledger receives, per (account, meter, dimension set, window), and the
# dimension sets they name, with dimension_sets_per_window_max.


# A dimension set that aggregates name: its canonical bytes (in darena),
# compared in full when a set is looked up; the hash only picks the bucket. One
# copy whatever the number of accounts and windows that use it (most use a few).
cdef struct DSet:
    uint64_t hash
    uint32_t off
    int32_t len
    int32_t refs             # aggregates that name it; none: gone at the next compaction


# Usage of one (account, meter, dimension set, window) since the last
# take_usage: what the ledger receives, aggregated. 48 bytes: a sum that would
# pass 64 bits moves what it has to agg_spill (rare) and starts again. An
# aggregate of the current window outlives take_usage, emptied, so that the sets
# of a window are counted once against dimension_sets_per_window_max.
cdef struct Agg:
    int64_t window
    int64_t qty
    int64_t cost
    int64_t events
    int32_t dset             # its set, in dsets
    int32_t acct
    int32_t meter


cdef enum:
    DSET_BYTES_MAX = 0xFFFFFFFF  # all sets' bytes: DSet.off is 32 bits


cdef class _Aggregates(_Accounts):
    cdef int32_t sets_max        # dimension_sets_per_window_max
    cdef bint sets_capped        # off while the log is replayed: what was applied once is applied again
    # aggregates, open addressing on (acct, meter, dimension set, window)
    cdef Agg *agg
    cdef Py_ssize_t n_agg
    cdef Py_ssize_t cap_agg
    cdef Py_ssize_t n_live       # aggregates with events since the last take_usage
    cdef dict agg_spill          # aggregate index -> [quantity, cost] moved out before 64 bits overflowed
    cdef int32_t *aslots
    cdef uint64_t amask
    # the aggregates' dimension sets: canonical bytes, and the sets, open addressing on their bytes
    cdef char *darena
    cdef Py_ssize_t darena_len
    cdef Py_ssize_t darena_cap
    cdef DSet *dsets
    cdef Py_ssize_t n_dsets
    cdef Py_ssize_t cap_dsets
    cdef int32_t *dslots
    cdef uint64_t dmask
    cdef int32_t *nsets          # per account: dimension sets made in window nsets_win
    cdef int64_t *nsets_win
    cdef int64_t window_ms
    cdef int64_t cur_window
    cdef int64_t now_ms          # the clock (set_clock)
    cdef int64_t late_ms         # how far before it, and after it, an event's timestamp_ms may be
    cdef int64_t early_ms
    cdef list rate_dims          # per rate: its price dimension as a canonical dimension set
    cdef const char **rate_dptr  # and its bytes, length and hash, for settle
    cdef int32_t *rate_dlen
    cdef uint64_t *rate_dhash

    cdef int _init_aggregates(self, list meters, list rates, dict limits) except -1
    cdef int _grow(self, Py_ssize_t new_cap) except -1
    # dimension sets
    cdef inline int32_t _dset_find(self, const char *dims, int32_t dlen, uint64_t dhash,
                                   uint64_t *slot_out) noexcept nogil
    cdef void _dset_index(self, int32_t *slots, uint64_t mask) noexcept nogil
    cdef int32_t _dset_intern(self, const char *dims, int32_t dlen, uint64_t dhash) except -1
    cdef void _dset_pop(self) noexcept nogil
    # aggregates
    cdef int _agg_grow(self, Py_ssize_t new_cap) except -1
    cdef inline uint64_t _akey(self, int32_t acct, int32_t meter, uint64_t dset, int64_t window) noexcept nogil
    cdef inline int32_t _agg_find(self, int32_t acct, int32_t meter, int32_t dset, int64_t window,
                                  uint64_t *slot_out) noexcept nogil
    cdef int32_t _agg_slot(self, int32_t acct, int32_t meter, const char *dims, int32_t dlen, uint64_t dhash,
                           int64_t window, bint capped) except -2
    cdef void _agg_undo(self, Py_ssize_t mark) noexcept nogil
    cdef inline int _agg_add(self, int32_t i, int64_t quantity, int64_t cost) except -1
    cdef int _spill(self, Agg *a) except -1
    cdef int _agg_keep_window(self) except -1
