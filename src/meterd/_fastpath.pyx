# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core of meterd: wire decoding, rating and debits on C tables.

It does no I/O, no asyncio, no LMDB and no config parsing; ``meterd.core``
chooses between this module and its pure-Python twin ``_fastpath_py`` and the
server owns policy, storage and the network.

Amounts are int64 nano-units (1e-9 of a credit). Each credit type has a
denominator D: an account's carried remainder is kept in units of 1/D nano, so
sub-nano costs accumulate exactly instead of being rounded away. D is the
least common multiple of ``per_units * 10**precision`` over the rates of that
credit type, and each rate carries ``factor = D / (per_units * 10**precision)``.
"""

from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t, uint16_t, uint8_t, INT64_MAX, INT64_MIN
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from meterd.errors import Forbidden, InvalidInput
# The messages that name catalog values are made in one place for both cores.
from meterd._fastpath_py import no_price_message as _no_price_message
from meterd._fastpath_py import precision_message as _precision_message
from meterd._fastpath_py import sets_message as _sets_message
from meterd._fastpath_py import unique_order as _unique_order

cdef extern from *:
    """
    typedef __int128 meterd_i128;
    static inline int meterd_mul(meterd_i128 a, meterd_i128 b, meterd_i128 *r) {
        return __builtin_mul_overflow(a, b, r);
    }
    """
    ctypedef long long i128 "meterd_i128"
    int i128_mul "meterd_mul"(i128 a, i128 b, i128 *r) noexcept nogil

# Reasons, mirrored from meterd.v1.Reason; OUT_DEGRADED is an allowed event
# served in the plan's fallback mode, not a denial.
cdef enum:
    REASON_NONE = 0
    REASON_INSUFFICIENT_BALANCE = 1
    REASON_UNKNOWN_CUSTOMER = 2
    REASON_OVERFLOW = 3
    OUT_DEGRADED = 100

# Decisions, mirrored from meterd.v1.Decision.
cdef enum:
    DECISION_ALLOW = 1
    DECISION_DENY = 2
    DECISION_DEGRADE = 3

# Meter aggregations of usage in a period.
cdef enum:
    AGG_SUM = 0
    AGG_COUNT = 1
    AGG_MAX = 2
    AGG_LATEST = 3
    AGG_UNIQUE = 4

cdef enum:
    DEF_ALERTS_MAX = 4096

# Decoder error codes; the message is built only on the error path.
cdef enum:
    E_OK = 0
    E_TRUNCATED = 1
    E_WIRE_TYPE = 2
    E_EMPTY = 3
    E_TOO_LONG = 4
    E_CHARSET = 5
    E_UNKNOWN_METER = 6
    E_NEGATIVE = 7
    E_DECIMAL = 8
    E_OVERFLOW = 9
    E_NO_PRICE = 10
    E_TOO_MANY = 11
    E_VARINT = 12
    E_NO_UNIQUE = 13
    E_UTF8 = 14
    E_TENANT = 15
    E_FIELD0 = 16
    E_PRECISION = 17


cdef struct Rate:
    int32_t meter
    int32_t ct
    int32_t dim_len          # -1 for the meter's default rate
    char *dim_value
    int64_t amount_nano
    int64_t factor


# A distinct value seen by a unique_count meter in an account's period, compared
# by its bytes (in Core.uarena); the hash only picks the bucket. Entries of one
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


cdef struct Meter:
    char *name
    int32_t name_len
    int32_t ct
    int32_t precision
    int32_t agg
    char *uniq_key           # unique_count meters: the dimension whose distinct values count
    int32_t uniq_key_len
    char *dim_key
    int32_t dim_key_len      # 0: the meter has a single price
    int32_t rate_first
    int32_t rate_count
    int32_t rate_default     # -1: no default price


# A dimension set that aggregates name: its canonical bytes (in Core.darena),
# compared in full when a set is looked up; the hash only picks the bucket. One
# copy whatever the number of accounts and windows that use it (most use a few).
cdef struct DSet:
    uint64_t hash
    uint32_t off
    int32_t len
    int32_t refs             # aggregates that name it; none: gone at the next compaction


# Usage of one (account, meter, dimension set, window) since the last
# take_usage: what the ledger receives, aggregated. 48 bytes: a sum that would
# pass 64 bits moves what it has to Core.agg_spill (rare) and starts again. An
# aggregate of the current window outlives take_usage, emptied, so that the sets
# of a window are counted once against dimension_sets_per_window_max.
cdef struct Agg:
    int64_t window
    int64_t qty
    int64_t cost
    int64_t events
    int32_t dset             # its set, in Core.dsets
    int32_t acct
    int32_t meter


# One dimensions map entry of the event being decoded: its key and value in the
# caller's buffer.
cdef struct Span:
    const char *key
    const char *value
    int32_t key_len
    int32_t value_len


# The state of an account and credit type that most accounts never set:
# held by reservations, an overdraft floor, degraded usage this period, a
# low-balance threshold. An account has these rows (one per credit type) only
# once one of them is set to other than its default (0, 0, 0, INT64_MIN).
cdef struct Ext:
    int64_t resv
    int64_t floor
    int64_t degr
    int64_t alert


# One decoded event, pointing into the caller's buffer.
cdef struct Event:
    const char *cust
    int32_t cust_len
    int32_t meter
    int32_t rate
    int32_t account
    int64_t quantity
    i128 fine               # cost in 1/D nano-units
    int32_t err
    const char *err_ptr      # field name of the error
    const char *detail
    int32_t detail_len
    const char *uval        # unique_count meters: the distinct value, in the caller's buffer
    int32_t ulen
    Py_ssize_t coff         # the canonical dimension set, in Core.cbuf
    int32_t clen
    uint64_t chash          # its hash, for bucketing only
    int32_t agg             # its aggregate, found or made before anything is applied; -1 for none


cdef struct Outcome:
    int decision
    int reason
    int32_t ct
    int64_t cost
    int64_t balance
    int32_t mode             # the fallback mode's index from 1, or 0
    uint32_t priority


cdef inline bint _utf8_ok(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8, as protobuf requires of strings: no overlong forms, no
    surrogates, nothing above U+10FFFF."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, c1
    while i < n:
        c = p[i]
        if c < 0x80:
            i += 1
            continue
        if c < 0xC2:
            return 0
        if c < 0xE0:
            if i + 1 >= n or (p[i + 1] & 0xC0) != 0x80:
                return 0
            i += 2
            continue
        if c < 0xF0:
            if i + 2 >= n:
                return 0
            c1 = p[i + 1]
            if (c1 & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80:
                return 0
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
                return 0
            i += 3
            continue
        if c < 0xF5:
            if i + 3 >= n:
                return 0
            c1 = p[i + 1]
            if (c1 & 0xC0) != 0x80 or (p[i + 2] & 0xC0) != 0x80 or (p[i + 3] & 0xC0) != 0x80:
                return 0
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
                return 0
            i += 4
            continue
        return 0
    return 1


cdef inline uint64_t _hash(const char *p, Py_ssize_t n) noexcept nogil:
    cdef uint64_t h = 14695981039346656037ULL
    cdef Py_ssize_t i
    for i in range(n):
        h ^= <uint8_t>p[i]
        h *= 1099511628211ULL
    return h


cdef inline uint64_t _hash_set(const char *p, Py_ssize_t n) noexcept nogil:
    """A hash of a dimension set's canonical bytes, eight bytes at a step; it only
    picks a bucket (sets are compared in full), so it need not be FNV-1a."""
    cdef uint64_t h = 0x9E3779B97F4A7C15ULL ^ <uint64_t>n, w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, p + i, 8)
        h = (h ^ w) * 0xFF51AFD7ED558CCDULL
        h ^= h >> 29
        i += 8
    if i < n:
        w = 0
        memcpy(&w, p + i, n - i)
        h = (h ^ w) * 0xC4CEB9FE1A85EC53ULL
        h ^= h >> 32
    return h


cdef inline int _read_varint(const char *buf, Py_ssize_t end, Py_ssize_t *pos, uint64_t *out) noexcept nogil:
    cdef uint64_t result = 0
    cdef int shift = 0
    cdef uint8_t b
    while pos[0] < end:
        b = <uint8_t>buf[pos[0]]
        pos[0] += 1
        if shift == 63 and b > 1:
            return E_VARINT
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            out[0] = result
            return E_OK
        shift += 7
        if shift > 63:
            return E_VARINT
    return E_TRUNCATED


cdef inline int _read_tag(const char *buf, Py_ssize_t end, Py_ssize_t *pos, uint64_t *out) noexcept nogil:
    """A field's tag: as protobuf, at most 5 bytes and below 2**32."""
    cdef Py_ssize_t start = pos[0]
    cdef int rc = _read_varint(buf, end, pos, out)
    if rc:
        return rc
    if out[0] >> 32 or pos[0] - start > 5:
        return E_VARINT
    return E_OK


cdef inline int _skip(const char *buf, Py_ssize_t end, Py_ssize_t *pos, int wt) noexcept nogil:
    cdef uint64_t v
    cdef int rc
    if wt == 0:
        return _read_varint(buf, end, pos, &v)
    if wt == 1:
        if end - pos[0] < 8:
            return E_TRUNCATED
        pos[0] += 8
        return E_OK
    if wt == 5:
        if end - pos[0] < 4:
            return E_TRUNCATED
        pos[0] += 4
        return E_OK
    if wt == 2:
        rc = _read_varint(buf, end, pos, &v)
        if rc:
            return rc
        if v > <uint64_t>(end - pos[0]):
            return E_TRUNCATED
        pos[0] += <Py_ssize_t>v
        return E_OK
    return E_WIRE_TYPE


cdef inline int _read_len(const char *buf, Py_ssize_t end, Py_ssize_t *pos, Py_ssize_t *start, Py_ssize_t *n) noexcept nogil:
    cdef uint64_t v
    cdef int rc = _read_varint(buf, end, pos, &v)
    if rc:
        return rc
    if v > <uint64_t>(end - pos[0]):
        return E_TRUNCATED
    start[0] = pos[0]
    n[0] = <Py_ssize_t>v
    pos[0] += <Py_ssize_t>v
    return E_OK


cdef int _parse_decimal(const char *p, Py_ssize_t n, int precision, int64_t *out) noexcept nogil:
    """Exact decimal "123" or "1.25" into an integer of 10**-precision units."""
    cdef i128 value = 0
    cdef Py_ssize_t i = 0
    cdef int frac = -1
    cdef int digits = 0
    cdef char c
    if n == 0:
        return E_DECIMAL
    if p[0] == b'-':
        return E_NEGATIVE
    for i in range(n):
        c = p[i]
        if c == b'.':
            if frac >= 0:
                return E_DECIMAL
            frac = 0
            continue
        if c < b'0' or c > b'9':
            return E_DECIMAL
        if frac >= 0:
            frac += 1
            if frac > precision:
                return E_PRECISION
        digits += 1
        value = value * 10 + (c - 48)
        if value > INT64_MAX:
            return E_OVERFLOW
    if digits == 0 or frac == 0:
        return E_DECIMAL
    if frac < 0:
        frac = 0
    while frac < precision:
        value *= 10
        frac += 1
        if value > INT64_MAX:
            return E_OVERFLOW
    out[0] = <int64_t>value
    return E_OK


cdef inline bint _id_charset_ok(const char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if <uint8_t>p[i] < 0x21 or <uint8_t>p[i] > 0x7E:
            return False
    return True


cdef class Core:
    """Accounts, rates and the batch decoder. See the module docstring."""

    cdef int n_ct
    cdef int n_meters
    cdef int n_rates
    cdef int64_t *denom
    cdef Meter *meters
    cdef Rate *rates
    # account table
    cdef Py_ssize_t count
    cdef Py_ssize_t cap
    cdef uint64_t mask
    cdef int32_t *slots
    # distinct values of unique_count meters
    cdef UEntry *uent
    cdef Py_ssize_t n_uent
    cdef Py_ssize_t cap_uent
    cdef int32_t *uidx
    cdef uint64_t umask
    cdef int32_t *uhead
    cdef uint32_t *uepoch
    cdef char *uarena        # the distinct values' bytes
    cdef uint64_t uarena_len
    cdef uint64_t uarena_cap
    cdef uint32_t *hashes
    cdef uint64_t *id_off
    cdef uint8_t *id_len
    cdef char *arena
    cdef uint64_t arena_len
    cdef uint64_t arena_cap
    cdef int64_t *bal
    cdef int64_t *rem
    cdef int64_t *usage
    cdef int32_t *ext        # per account: its first Ext row, or -1 (all defaults)
    cdef Ext *xrows
    cdef Py_ssize_t n_x
    cdef Py_ssize_t cap_x
    cdef bint has_unique     # uhead and uepoch exist only for a catalog with unique_count meters
    cdef uint16_t *plan_of
    cdef uint8_t *dirty
    # plans: fallback mode (0 = deny) and priority step per (plan, credit type)
    cdef int n_plans
    cdef int32_t *plan_mode
    cdef int64_t *plan_step
    cdef int64_t *plan_free   # free units per (plan, meter) and period
    cdef list modes
    cdef const char **mode_ptr
    cdef int32_t *mode_len
    cdef list credit_names
    cdef const char **ct_name
    cdef int32_t *ct_name_len
    cdef int64_t *alerts
    cdef Py_ssize_t n_alerts
    cdef bint alerts_lost
    # limits and scratch
    cdef int id_max
    cdef int client_id_max
    cdef int batch_max
    cdef int dims_max
    cdef int dim_key_max
    cdef int dim_value_max
    cdef int32_t sets_max        # dimension_sets_per_window_max
    cdef bint sets_capped        # off while the log is replayed: what was applied once is applied again
    cdef Event *scratch
    cdef Span *spans             # the dimension entries of the event being decoded, sorted by key
    cdef char *cbuf              # canonical dimension sets of the events being decoded
    cdef Py_ssize_t cbuf_len
    cdef Py_ssize_t cbuf_cap
    cdef bint closed
    # While a call runs for a data-plane token: the customer id prefix it may meter.
    cdef bytes tenant
    cdef const char *tenant_ptr
    cdef Py_ssize_t tenant_len     # -1: no restriction
    # usage aggregates, open addressing on (acct, meter, dimension set, window)
    cdef Agg *agg
    cdef Py_ssize_t n_agg
    cdef Py_ssize_t cap_agg
    cdef Py_ssize_t n_live   # aggregates with events since the last take_usage
    cdef dict agg_spill      # aggregate index -> [quantity, cost] moved out before 64 bits overflowed
    cdef int32_t *aslots
    cdef uint64_t amask
    cdef char *darena        # the aggregates' dimension sets, canonical bytes
    cdef Py_ssize_t darena_len
    cdef Py_ssize_t darena_cap
    cdef DSet *dsets         # the sets, open addressing on their bytes
    cdef Py_ssize_t n_dsets
    cdef Py_ssize_t cap_dsets
    cdef int32_t *dslots
    cdef uint64_t dmask
    cdef int32_t *nsets      # per account: dimension sets made in window nsets_win
    cdef int64_t *nsets_win
    cdef int64_t window_ms
    cdef int64_t cur_window
    cdef list rate_dims      # per rate: its price dimension as a canonical dimension set
    cdef const char **rate_dptr  # and its bytes, length and hash, for settle
    cdef int32_t *rate_dlen
    cdef uint64_t *rate_dhash

    def __cinit__(self):
        self.denom = NULL
        self.meters = NULL
        self.rates = NULL
        self.slots = NULL
        self.uent = NULL
        self.uidx = NULL
        self.uhead = NULL
        self.uepoch = NULL
        self.uarena = NULL
        self.uarena_len = 0
        self.uarena_cap = 0
        self.n_uent = 0
        self.cap_uent = 0
        self.umask = 0
        self.hashes = NULL
        self.id_off = NULL
        self.id_len = NULL
        self.arena = NULL
        self.bal = NULL
        self.rem = NULL
        self.usage = NULL
        self.ext = NULL
        self.xrows = NULL
        self.n_x = 0
        self.cap_x = 0
        self.has_unique = False
        self.plan_of = NULL
        self.plan_mode = NULL
        self.plan_step = NULL
        self.plan_free = NULL
        self.alerts = NULL
        self.mode_ptr = NULL
        self.mode_len = NULL
        self.ct_name = NULL
        self.ct_name_len = NULL
        self.n_alerts = 0
        self.alerts_lost = False
        self.dirty = NULL
        self.scratch = NULL
        self.spans = NULL
        self.cbuf = NULL
        self.cbuf_len = 0
        self.cbuf_cap = 0
        self.sets_max = 0
        self.sets_capped = True
        self.count = 0
        self.cap = 0
        self.closed = False
        self.tenant_len = -1
        self.agg = NULL
        self.dsets = NULL
        self.n_dsets = 0
        self.cap_dsets = 0
        self.dslots = NULL
        self.dmask = 0
        self.n_agg = 0
        self.cap_agg = 0
        self.n_live = 0
        self.agg_spill = {}
        self.aslots = NULL
        self.amask = 0
        self.darena = NULL
        self.darena_len = 0
        self.darena_cap = 0
        self.nsets = NULL
        self.nsets_win = NULL
        self.window_ms = 60000
        self.cur_window = 0
        self.rate_dims = []
        self.rate_dptr = NULL
        self.rate_dlen = NULL
        self.rate_dhash = NULL

    def __init__(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity=1024,
                 list plans=None, list modes=None, list free=None, list credit_names=None):
        """Build the core for one catalog shape.

        ``meters``: (name, credit_type, precision, price_dimension, aggregation) tuples;
        ``rates``: (meter, dimension_value or None, amount_nano, factor) tuples,
        grouped by meter; ``limits``: customer_id_bytes_max, batch_events_max,
        dimensions_max, dimension_key_bytes_max, dimension_value_bytes_max,
        dimension_sets_per_window_max.
        ``plans``: per plan, per credit type, (fallback mode, priority step);
        plan 0 is "no plan" and always denies. ``modes``: fallback mode names,
        mode k being ``modes[k - 1]``. ``free``: per plan (from plan 1), per
        meter, the units of each period that are not charged. ``credit_names``:
        the credit types' names, for detailed batch results.
        """
        cdef Py_ssize_t i, k
        self.n_ct = len(denominators)
        self.n_meters = len(meters)
        self.n_rates = len(rates)
        self.id_max = limits["customer_id_bytes_max"]
        self.client_id_max = limits["client_id_bytes_max"]
        self.batch_max = limits["batch_events_max"]
        self.dims_max = limits["dimensions_max"]
        self.dim_key_max = limits["dimension_key_bytes_max"]
        self.dim_value_max = limits["dimension_value_bytes_max"]
        self.sets_max = limits["dimension_sets_per_window_max"]
        if self.id_max > 255:
            raise ValueError("customer_id_bytes_max is at most 255")
        if self.sets_max < 1:
            raise ValueError("dimension_sets_per_window_max is at least 1")
        if not (0 <= self.dims_max <= 1024 and 1 <= self.dim_key_max <= 65536 and 0 <= self.dim_value_max <= 65536):
            raise ValueError("dimension limits out of range")
        self.spans = <Span *>calloc(max(self.dims_max, 1), sizeof(Span))
        if self.spans == NULL:
            raise MemoryError()
        self.denom = <int64_t *>calloc(max(self.n_ct, 1), sizeof(int64_t))
        self.meters = <Meter *>calloc(max(self.n_meters, 1), sizeof(Meter))
        self.rates = <Rate *>calloc(max(self.n_rates, 1), sizeof(Rate))
        self.scratch = <Event *>calloc(max(self.batch_max, 1), sizeof(Event))
        self.credit_names = [bytes(n) for n in (credit_names or [b""] * self.n_ct)]
        if len(self.credit_names) != self.n_ct or any(len(n) > 64 for n in self.credit_names):
            raise ValueError("one name of at most 64 bytes per credit type")
        self.ct_name = <const char **>calloc(max(self.n_ct, 1), sizeof(char *))
        self.ct_name_len = <int32_t *>calloc(max(self.n_ct, 1), sizeof(int32_t))
        if self.ct_name == NULL or self.ct_name_len == NULL:
            raise MemoryError()
        for i in range(self.n_ct):
            self.ct_name[i] = PyBytes_AS_STRING(self.credit_names[i])
            self.ct_name_len[i] = len(self.credit_names[i])
        self.modes = [bytes(m) for m in (modes or [])]
        self.mode_ptr = <const char **>calloc(len(self.modes) + 1, sizeof(char *))
        self.mode_len = <int32_t *>calloc(len(self.modes) + 1, sizeof(int32_t))
        if self.mode_ptr == NULL or self.mode_len == NULL:
            raise MemoryError()
        for i, m in enumerate(self.modes):
            if len(m) > 32:
                raise ValueError("mode names are at most 32 bytes")
            self.mode_ptr[i + 1] = PyBytes_AS_STRING(m)
            self.mode_len[i + 1] = len(m)
        plans = [[(0, 0)] * self.n_ct] + list(plans or [])
        self.n_plans = len(plans)
        if self.n_plans > 65535:
            raise ValueError("too many plans")
        self.plan_mode = <int32_t *>calloc(self.n_plans * max(self.n_ct, 1), sizeof(int32_t))
        self.plan_step = <int64_t *>calloc(self.n_plans * max(self.n_ct, 1), sizeof(int64_t))
        self.plan_free = <int64_t *>calloc(self.n_plans * max(self.n_meters, 1), sizeof(int64_t))
        self.alerts = <int64_t *>calloc(DEF_ALERTS_MAX, sizeof(int64_t))
        if not (self.denom and self.meters and self.rates and self.scratch and self.plan_mode
                and self.plan_step and self.plan_free and self.alerts):
            raise MemoryError()
        free = free or []
        if len(free) > self.n_plans - 1:
            raise ValueError("free units for more plans than there are")
        for i in range(len(free)):
            if len(free[i]) != self.n_meters:
                raise ValueError("plan %d: free units for every meter" % (i + 1))
            for k in range(self.n_meters):
                if free[i][k] < 0:
                    raise ValueError("free units must not be negative")
                self.plan_free[(i + 1) * self.n_meters + k] = free[i][k]
        for i in range(self.n_plans):
            if len(plans[i]) != self.n_ct:
                raise ValueError("plan %d: one entry per credit type" % i)
            for k in range(self.n_ct):
                mode, step = plans[i][k]
                if not (0 <= mode <= len(self.modes)) or step < 0:
                    raise ValueError("plan %d: mode or step out of range" % i)
                self.plan_mode[i * self.n_ct + k] = mode
                self.plan_step[i * self.n_ct + k] = step
        for i in range(self.n_ct):
            if denominators[i] <= 0 or denominators[i] > 10**15:
                raise ValueError("denominator out of range")
            self.denom[i] = denominators[i]
        for i in range(self.n_meters):
            name, ct, precision, dim, agg, uniq = meters[i]
            if not (0 <= ct < self.n_ct and 0 <= precision <= 9 and AGG_SUM <= agg <= AGG_UNIQUE):
                raise ValueError("meter %d: credit type, precision or aggregation out of range" % i)
            if (agg == AGG_UNIQUE) != (len(uniq) > 0):
                raise ValueError("meter %d: a unique_count meter, and only one, names its dimension" % i)
            self.meters[i].agg = agg
            if agg == AGG_UNIQUE:
                self.has_unique = True
            self.meters[i].uniq_key = _dup(uniq)
            self.meters[i].uniq_key_len = len(uniq)
            self.meters[i].name = _dup(name)
            self.meters[i].name_len = len(name)
            self.meters[i].ct = ct
            self.meters[i].precision = precision
            self.meters[i].dim_key = _dup(dim)
            self.meters[i].dim_key_len = len(dim)
            self.meters[i].rate_first = -1
            self.meters[i].rate_count = 0
            self.meters[i].rate_default = -1
        for i in range(self.n_rates):
            meter, value, amount, factor = rates[i]
            if not (0 <= meter < self.n_meters) or amount < 0 or factor < 1:
                raise ValueError("rate %d out of range" % i)
            if self.meters[meter].rate_first < 0:
                self.meters[meter].rate_first = i
            elif self.meters[meter].rate_first + self.meters[meter].rate_count != i:
                raise ValueError("rates must be grouped by meter")
            self.meters[meter].rate_count += 1
            self.rates[i].meter = meter
            self.rates[i].ct = self.meters[meter].ct
            self.rates[i].amount_nano = amount
            self.rates[i].factor = factor
            if value is None:
                self.rates[i].dim_len = -1
                self.rates[i].dim_value = NULL
                self.meters[meter].rate_default = i
            else:
                self.rates[i].dim_len = len(value)
                self.rates[i].dim_value = _dup(value)
        self.rate_dhash = <uint64_t *>calloc(max(self.n_rates, 1), sizeof(uint64_t))
        self.rate_dptr = <const char **>calloc(max(self.n_rates, 1), sizeof(char *))
        self.rate_dlen = <int32_t *>calloc(max(self.n_rates, 1), sizeof(int32_t))
        if self.rate_dhash == NULL or self.rate_dptr == NULL or self.rate_dlen == NULL:
            raise MemoryError()
        for i in range(self.n_rates):
            meter, value, amount, factor = rates[i]
            if value is None:
                self.rate_dims.append(b"")
                self.rate_dhash[i] = _hash_set(NULL, 0)
                continue
            body = _dim_entry(meters[meter][3], value)
            self.rate_dims.append(b"\x2a" + _varint_bytes(len(body)) + body)
            self.rate_dhash[i] = _hash_set(PyBytes_AS_STRING(self.rate_dims[i]), len(self.rate_dims[i]))
        for i in range(self.n_rates):
            self.rate_dptr[i] = PyBytes_AS_STRING(self.rate_dims[i])
            self.rate_dlen[i] = <int32_t>len(self.rate_dims[i])
        self._grow(max(capacity, 16))
        self._agg_grow(64)

    def __dealloc__(self):
        cdef int i
        if self.meters != NULL:
            for i in range(self.n_meters):
                free(self.meters[i].name)
                free(self.meters[i].uniq_key)
                free(self.meters[i].dim_key)
        if self.rates != NULL:
            for i in range(self.n_rates):
                free(self.rates[i].dim_value)
        free(self.denom); free(self.meters); free(self.rates); free(self.scratch)
        free(self.slots); free(self.hashes); free(self.id_off); free(self.id_len)
        free(self.arena); free(self.bal); free(self.ext); free(self.xrows)
        free(self.rem); free(self.usage); free(self.dirty)
        free(self.plan_of)
        free(self.uent); free(self.uidx); free(self.uhead); free(self.uepoch)
        free(self.plan_mode); free(self.plan_step); free(self.plan_free); free(self.alerts)
        free(self.mode_ptr); free(self.mode_len); free(self.ct_name); free(self.ct_name_len)
        free(self.agg); free(self.aslots); free(self.dsets); free(self.dslots); free(self.rate_dhash); free(self.rate_dptr); free(self.rate_dlen)
        free(self.spans); free(self.cbuf); free(self.darena); free(self.uarena)
        free(self.nsets); free(self.nsets_win)

    def close(self):
        """Refuse further use; memory is freed with the object."""
        self.closed = True

    cdef int _check(self) except -1:
        if self.closed:
            raise RuntimeError("core is closed")
        return 0

    # ---- account table -------------------------------------------------

    cdef int _grow(self, Py_ssize_t new_cap) except -1:
        cdef Py_ssize_t nslots = 16
        cdef Py_ssize_t i
        cdef uint64_t h
        while nslots < new_cap * 2:
            nslots *= 2
        self.hashes = <uint32_t *>_resize(self.hashes, new_cap * sizeof(uint32_t))
        self.id_off = <uint64_t *>_resize(self.id_off, new_cap * sizeof(uint64_t))
        self.id_len = <uint8_t *>_resize(self.id_len, new_cap)
        self.dirty = <uint8_t *>_resize(self.dirty, new_cap)
        self.bal = <int64_t *>_resize(self.bal, new_cap * self.n_ct * sizeof(int64_t))
        self.rem = <int64_t *>_resize(self.rem, new_cap * self.n_ct * sizeof(int64_t))
        self.usage = <int64_t *>_resize(self.usage, new_cap * max(self.n_meters, 1) * sizeof(int64_t))
        self.ext = <int32_t *>_resize(self.ext, new_cap * sizeof(int32_t))
        self.plan_of = <uint16_t *>_resize(self.plan_of, new_cap * sizeof(uint16_t))
        self.nsets = <int32_t *>_resize(self.nsets, new_cap * sizeof(int32_t))
        self.nsets_win = <int64_t *>_resize(self.nsets_win, new_cap * sizeof(int64_t))
        if self.has_unique:
            self.uhead = <int32_t *>_resize(self.uhead, new_cap * sizeof(int32_t))
            self.uepoch = <uint32_t *>_resize(self.uepoch, new_cap * sizeof(uint32_t))
        free(self.slots)
        self.slots = <int32_t *>calloc(nslots, sizeof(int32_t))
        if self.slots == NULL:
            raise MemoryError()
        self.mask = nslots - 1
        self.cap = new_cap
        for i in range(self.count):
            h = self.hashes[i] & self.mask
            while self.slots[h] != 0:
                h = (h + 1) & self.mask
            self.slots[h] = <int32_t>(i + 1)
        return 0

    cdef inline int32_t _find(self, const char *p, Py_ssize_t n) noexcept nogil:
        cdef uint32_t hv = <uint32_t>_hash(p, n)
        cdef uint64_t h = hv & self.mask
        cdef int32_t s
        while True:
            s = self.slots[h]
            if s == 0:
                return -1
            s -= 1
            if self.hashes[s] == hv and self.id_len[s] == n and memcmp(self.arena + self.id_off[s], p, n) == 0:
                return s
            h = (h + 1) & self.mask

    cdef int32_t _insert(self, const char *p, Py_ssize_t n) except -2:
        cdef int32_t idx = self._find(p, n)
        cdef uint64_t h
        cdef Py_ssize_t k
        if idx >= 0:
            return idx
        if self.count >= 0x7FFFFFF0:
            raise MemoryError("account table full")
        if self.count == self.cap:
            self._grow(self.cap * 2)
        if self.arena_len + n > self.arena_cap:
            self.arena_cap = max(self.arena_cap * 2, self.arena_len + n + 4096)
            self.arena = <char *>_resize(self.arena, self.arena_cap)
        idx = <int32_t>self.count
        memcpy(self.arena + self.arena_len, p, n)
        self.id_off[idx] = self.arena_len
        self.id_len[idx] = <uint8_t>n
        self.arena_len += n
        self.hashes[idx] = <uint32_t>_hash(p, n)
        self.dirty[idx] = 1
        for k in range(self.n_ct):
            self.bal[idx * self.n_ct + k] = 0
            self.rem[idx * self.n_ct + k] = 0
        self.ext[idx] = -1
        self.plan_of[idx] = 0
        self.nsets[idx] = 0
        self.nsets_win[idx] = INT64_MIN
        if self.has_unique:
            self.uhead[idx] = -1
            self.uepoch[idx] = 0
        for k in range(self.n_meters):
            self.usage[idx * self.n_meters + k] = 0
        h = self.hashes[idx] & self.mask
        while self.slots[h] != 0:
            h = (h + 1) & self.mask
        self.slots[h] = idx + 1
        self.count += 1
        return idx

    # ---- rarely set state (Ext rows) ---------------------------------------

    cdef inline Ext *_xp(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        """The account's Ext row of a credit type, or NULL while all are defaults."""
        cdef int32_t e = self.ext[idx]
        return NULL if e < 0 else &self.xrows[e + ct]

    cdef int _xreserve(self, Py_ssize_t accounts) except -1:
        """Room for that many more accounts' Ext rows, so that _xnew cannot fail."""
        cdef Py_ssize_t need = self.n_x + accounts * self.n_ct, new_cap
        if need <= self.cap_x:
            return 0
        if need > 0x7FFFFFF0:
            raise MemoryError("too many accounts with reservations, floors or thresholds")
        new_cap = max(need, self.cap_x * 2, 64)
        self.xrows = <Ext *>_resize(self.xrows, new_cap * sizeof(Ext))
        self.cap_x = new_cap
        return 0

    cdef inline Ext *_xnew(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        """The account's Ext row of a credit type, made (with defaults) if need be;
        room was made by _xreserve."""
        cdef Py_ssize_t k
        if self.ext[idx] < 0:
            for k in range(self.n_ct):
                self.xrows[self.n_x + k].resv = 0
                self.xrows[self.n_x + k].floor = 0
                self.xrows[self.n_x + k].degr = 0
                self.xrows[self.n_x + k].alert = INT64_MIN
            self.ext[idx] = <int32_t>self.n_x
            self.n_x += self.n_ct
        return &self.xrows[self.ext[idx] + ct]

    cdef Ext *_xw(self, Py_ssize_t idx, Py_ssize_t ct) except NULL:
        """The account's Ext row of a credit type, for writing."""
        if self.ext[idx] < 0:
            self._xreserve(1)
        return self._xnew(idx, ct)

    cdef inline int64_t _resv(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = self._xp(idx, ct)
        return 0 if x == NULL else x.resv

    cdef inline int64_t _floor(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = self._xp(idx, ct)
        return 0 if x == NULL else x.floor

    cdef inline int64_t _degr(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = self._xp(idx, ct)
        return 0 if x == NULL else x.degr

    cdef inline int64_t _alert(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = self._xp(idx, ct)
        return INT64_MIN if x == NULL else x.alert

    cdef int _set_ext(self, Py_ssize_t idx, Py_ssize_t ct, int64_t resv, int64_t floor, int64_t degr,
                      int64_t alert) except -1:
        """Set all four; an account whose rows are all defaults gets none."""
        cdef Ext *x
        if self.ext[idx] < 0 and resv == 0 and floor == 0 and degr == 0 and alert == INT64_MIN:
            return 0
        x = self._xw(idx, ct)
        x.resv = resv
        x.floor = floor
        x.degr = degr
        x.alert = alert
        return 0

    def __len__(self):
        return self.count

    def account(self, bytes customer_id):
        """Index of a customer's account, or -1."""
        self._check()
        return self._find(PyBytes_AS_STRING(customer_id), PyBytes_GET_SIZE(customer_id))

    def open_account(self, bytes customer_id):
        """Index of a customer's account, created empty when missing."""
        self._check()
        cdef Py_ssize_t n = PyBytes_GET_SIZE(customer_id)
        if n == 0 or n > self.id_max or not _id_charset_ok(PyBytes_AS_STRING(customer_id), n):
            raise InvalidInput("customer_id", "must be 1 to %d printable ASCII characters" % self.id_max)
        return self._insert(PyBytes_AS_STRING(customer_id), n)

    def customer_id(self, Py_ssize_t idx):
        self._idx(idx)
        return PyBytes_FromStringAndSize(self.arena + self.id_off[idx], self.id_len[idx])

    cdef int _idx(self, Py_ssize_t idx) except -1:
        self._check()
        if idx < 0 or idx >= self.count:
            raise IndexError("no account %d" % idx)
        return 0

    def state(self, Py_ssize_t idx):
        """Per credit type (balance, reserved, floor, remainder, degraded, alert),
        usage per meter, and the plan."""
        self._idx(idx)
        cdef Py_ssize_t k, b = idx * self.n_ct
        cts = [(self.bal[b + k], self._resv(idx, k), self._floor(idx, k), self.rem[b + k], self._degr(idx, k),
                self._alert(idx, k)) for k in range(self.n_ct)]
        use = [self.usage[idx * self.n_meters + k] for k in range(self.n_meters)]
        return cts, use, self.plan_of[idx]

    def load_state(self, Py_ssize_t idx, list cts, list use, int plan=0):
        """Set an account's state, as read back from a snapshot."""
        self._idx(idx)
        cdef Py_ssize_t k, b = idx * self.n_ct
        if len(cts) != self.n_ct or len(use) != self.n_meters:
            raise ValueError("state shape does not match the catalog")
        if not 0 <= plan < self.n_plans:
            raise ValueError("no plan %d" % plan)
        for k in range(self.n_ct):
            if not (0 <= cts[k][3] < self.denom[k]) or cts[k][1] < 0:
                raise ValueError("account state out of range")
        cdef int64_t bal, resv, floor, rem, degr, alert
        for k in range(self.n_ct):
            bal, resv, floor, rem, degr, alert = cts[k]
            self.bal[b + k] = bal
            self.rem[b + k] = rem
            self._set_ext(idx, k, resv, floor, degr, alert)
        for k in range(self.n_meters):
            self.usage[idx * self.n_meters + k] = use[k]
        self.plan_of[idx] = plan
        self.dirty[idx] = 0

    def take_dirty(self):
        """Indices of accounts changed since the last call, and clear the marks."""
        self._check()
        cdef Py_ssize_t i
        out = [i for i in range(self.count) if self.dirty[i]]
        memset(self.dirty, 0, self.count)
        return out

    def mark_all_dirty(self):
        self._check()
        memset(self.dirty, 1, self.count)

    def state_bytes(self, Py_ssize_t idx):
        """An account's state packed for a snapshot, int64 LE words: per credit
        type (balance, reserved, floor, remainder, degraded, alert), then usage
        per meter, then the plan; then 0, or -n and this period's n distinct
        values, each as int32 LE meter and length and the value's bytes (length
        -1: an 8-byte hash, a value kept by a version that kept only hashes).
        A word n >= 0 followed by n (meter, hash) pairs is that older format,
        which _load_state still reads."""
        self._idx(idx)
        cdef Py_ssize_t k, b = idx * self.n_ct, u = idx * self.n_meters, size
        cdef list uniq = self.uniques(idx)
        cdef Py_ssize_t words = self.n_ct * 6 + self.n_meters + 1
        size = (words + 1) * 8
        for meter, value in uniq:
            size += 8 + (len(value) if isinstance(value, bytes) else 8)
        out = PyBytes_FromStringAndSize(NULL, size)
        cdef int64_t *w = <int64_t *>PyBytes_AS_STRING(out)
        cdef char *p = PyBytes_AS_STRING(out) + (words + 1) * 8
        cdef int32_t head[2]
        cdef uint64_t h
        for k in range(self.n_ct):
            w[k * 6] = self.bal[b + k]
            w[k * 6 + 1] = self._resv(idx, k)
            w[k * 6 + 2] = self._floor(idx, k)
            w[k * 6 + 3] = self.rem[b + k]
            w[k * 6 + 4] = self._degr(idx, k)
            w[k * 6 + 5] = self._alert(idx, k)
        for k in range(self.n_meters):
            w[self.n_ct * 6 + k] = self.usage[u + k]
        w[words - 1] = self.plan_of[idx]
        w[words] = -len(uniq)
        for meter, value in uniq:
            head[0] = meter
            if isinstance(value, bytes):
                head[1] = len(value)
                memcpy(p, head, 8)
                memcpy(p + 8, PyBytes_AS_STRING(value), head[1])
                p += 8 + head[1]
            else:
                head[1] = -1
                h = value
                memcpy(p, head, 8)
                memcpy(p + 8, &h, 8)
                p += 16
        return out

    def load_state_bytes(self, bytes customer_id, bytes data):
        """Create or overwrite an account from ``state_bytes`` output."""
        self._check()
        return self._load_state(customer_id, data)

    def load_states(self, records):
        """``load_state_bytes`` for each (customer_id, data) pair of an iterable; returns how many."""
        self._check()
        cdef Py_ssize_t n = 0
        cdef bytes customer_id, data
        for customer_id, data in records:
            self._load_state(customer_id, data)
            n += 1
        return n

    cdef Py_ssize_t _load_state(self, bytes customer_id, bytes data) except -1:
        cdef Py_ssize_t k, words = self.n_ct * 6 + self.n_meters + 1
        cdef const int64_t *w = <const int64_t *>PyBytes_AS_STRING(data)
        cdef list uniq = self._state_uniques(data, words)
        for k in range(self.n_ct):
            if not (0 <= w[k * 6 + 3] < self.denom[k]) or w[k * 6 + 1] < 0:
                raise ValueError("account state out of range")
        if not 0 <= w[words - 1] < self.n_plans:
            raise ValueError("account state names a plan that does not exist")
        for meter, value in uniq:
            if not (0 <= meter < self.n_meters and self.meters[meter].agg == AGG_UNIQUE):
                raise ValueError("account state counts distinct values of a meter that does not")
        cdef Py_ssize_t n = PyBytes_GET_SIZE(customer_id)
        if n == 0 or n > self.id_max or not _id_charset_ok(PyBytes_AS_STRING(customer_id), n):
            raise InvalidInput("customer_id", "must be 1 to %d printable ASCII characters" % self.id_max)
        cdef Py_ssize_t idx = self._insert(PyBytes_AS_STRING(customer_id), n)
        cdef Py_ssize_t b = idx * self.n_ct, u = idx * self.n_meters
        for k in range(self.n_ct):
            self.bal[b + k] = w[k * 6]
            self.rem[b + k] = w[k * 6 + 3]
            self._set_ext(idx, k, w[k * 6 + 1], w[k * 6 + 2], w[k * 6 + 4], w[k * 6 + 5])
        for k in range(self.n_meters):
            self.usage[u + k] = w[self.n_ct * 6 + k]
        self.plan_of[idx] = <uint16_t>w[words - 1]
        for meter, value in uniq:
            self.add_unique(idx, meter, value)
        self.dirty[idx] = 0
        return idx

    cdef list _state_uniques(self, bytes data, Py_ssize_t words):
        """The distinct values of a state record, (meter, bytes or hash) pairs; raise
        ValueError for a record of the wrong size."""
        cdef const int64_t *w = <const int64_t *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data), k, pos
        cdef int64_t n
        cdef int32_t head[2]
        cdef uint64_t h
        cdef const char *p = PyBytes_AS_STRING(data)
        out = []
        if size < (words + 1) * 8:
            raise ValueError("state record has the wrong size for this catalog")
        n = w[words]
        if n >= 0:  # the format that kept only hashes
            if n > size // 16 or size != (words + 1 + 2 * n) * 8:
                raise ValueError("state record has the wrong size for this catalog")
            for k in range(n):
                out.append((w[words + 1 + 2 * k], <uint64_t>w[words + 2 + 2 * k]))
            return out
        pos = (words + 1) * 8
        for k in range(-n):
            if size - pos < 8:
                raise ValueError("state record has the wrong size for this catalog")
            memcpy(head, p + pos, 8)
            pos += 8
            if head[1] == -1 and size - pos >= 8:
                memcpy(&h, p + pos, 8)
                out.append((head[0], h))
                pos += 8
            elif 0 <= head[1] <= size - pos:
                out.append((head[0], PyBytes_FromStringAndSize(p + pos, head[1])))
                pos += head[1]
            else:
                raise ValueError("state record has the wrong size for this catalog")
        if pos != size:
            raise ValueError("state record has the wrong size for this catalog")
        return out

    # ---- money -----------------------------------------------------------

    cdef int _ct(self, Py_ssize_t ct) except -1:
        if ct < 0 or ct >= self.n_ct:
            raise IndexError("no credit type %d" % ct)
        return 0

    def credit(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        """Add a signed amount to a balance; returns the new balance."""
        self._idx(idx); self._ct(ct)
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef i128 v = <i128>self.bal[b] + amount
        if v > INT64_MAX or v < -INT64_MAX:
            raise InvalidInput("amount_nano", "balance would overflow")
        cdef int64_t before = self.bal[b]
        self.bal[b] = <int64_t>v
        self.dirty[idx] = 1
        self._check_alert(idx, ct, before)
        return self.bal[b]

    def set_floor(self, Py_ssize_t idx, Py_ssize_t ct, int64_t floor_nano):
        self._idx(idx); self._ct(ct)
        if floor_nano != 0 or self.ext[idx] >= 0:
            self._xw(idx, ct).floor = floor_nano
        self.dirty[idx] = 1

    cdef inline i128 _available(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = self._xp(idx, ct)
        if x == NULL:
            return <i128>self.bal[idx * self.n_ct + ct]
        return <i128>self.bal[idx * self.n_ct + ct] - x.resv - x.floor

    def available(self, Py_ssize_t idx, Py_ssize_t ct):
        self._idx(idx); self._ct(ct)
        cdef i128 a = self._available(idx, ct)
        if a > INT64_MAX:
            return INT64_MAX
        return <int64_t>a if a > -INT64_MAX else -INT64_MAX

    # ---- rating ----------------------------------------------------------

    cdef int32_t _find_rate(self, int32_t meter, const char *value, Py_ssize_t n) noexcept nogil:
        cdef Meter *m = &self.meters[meter]
        cdef int32_t i
        if value != NULL:
            for i in range(m.rate_first, m.rate_first + m.rate_count):
                if self.rates[i].dim_len == n and memcmp(self.rates[i].dim_value, value, n) == 0:
                    return i
        return m.rate_default

    def find_rate(self, Py_ssize_t meter, value):
        """The rate for a meter and its price-dimension value (bytes or None); -1 if none."""
        self._check()
        if meter < 0 or meter >= self.n_meters:
            raise IndexError("no meter %d" % meter)
        if self.meters[meter].rate_first < 0:
            return -1
        if value is None:
            return self._find_rate(meter, NULL, 0)
        return self._find_rate(meter, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))

    cdef int _fine(self, int32_t rate, int64_t quantity, i128 *out) noexcept nogil:
        cdef i128 t
        if i128_mul(<i128>quantity, <i128>self.rates[rate].amount_nano, &t):
            return E_OVERFLOW
        if i128_mul(t, <i128>self.rates[rate].factor, out):
            return E_OVERFLOW
        if out[0] / self.denom[self.rates[rate].ct] > INT64_MAX:
            return E_OVERFLOW
        return E_OK

    def quote(self, Py_ssize_t rate, int64_t quantity):
        """(credit type, cost rounded up to a whole nano) of a quantity, without carry."""
        self._check()
        if rate < 0 or rate >= self.n_rates:
            raise IndexError("no rate %d" % rate)
        if quantity < 0:
            raise InvalidInput("quantity", "must not be negative")
        cdef i128 fine
        if self._fine(<int32_t>rate, quantity, &fine):
            raise InvalidInput("quantity", "cost overflows 64 bits")
        cdef int64_t d = self.denom[self.rates[rate].ct]
        return self.rates[rate].ct, <int64_t>((fine + d - 1) / d)

    cdef int _debit(self, Py_ssize_t idx, int32_t rate, int64_t quantity, i128 fine, bint force, int64_t *cost,
                    const char *uval, Py_ssize_t ulen) noexcept nogil:
        """Apply one rated event with carry: REASON_NONE (charged), OUT_DEGRADED
        (served in the plan's fallback mode, not charged) or a denial reason.
        ``force`` skips the balance check; ``uval`` is a unique_count meter's value."""
        cdef int32_t ct = self.rates[rate].ct
        cdef int32_t meter = self.rates[rate].meter
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef Py_ssize_t u = idx * self.n_meters + meter
        cdef int64_t free_units = self.plan_free[self.plan_of[idx] * self.n_meters + meter]
        cdef int64_t charged
        if free_units > self.usage[u] and fine > 0:
            # The plan's free units this period come first; the rest is rated as usual.
            charged = quantity - (free_units - self.usage[u]) if quantity > free_units - self.usage[u] else 0
            self._fine(rate, charged, &fine)  # cannot overflow: charged <= quantity
        cdef i128 total = fine + self.rem[b]
        cdef i128 d = total / self.denom[ct]
        cdef i128 use
        cdef int agg = self.meters[meter].agg
        cdef int64_t before
        cdef bint new_value = False
        cdef uint64_t vhash = 0
        cost[0] = 0
        if d > INT64_MAX or <i128>self.bal[b] - d < -INT64_MAX:
            return REASON_OVERFLOW
        if agg == AGG_SUM or agg == AGG_COUNT:
            use = <i128>self.usage[u] + quantity
        elif agg == AGG_MAX:
            use = quantity if quantity > self.usage[u] else self.usage[u]
        elif agg == AGG_UNIQUE:
            vhash = _hash(uval, ulen)
            new_value = self._ufind(<int32_t>idx, meter, vhash, uval, ulen) < 0
            use = <i128>self.usage[u] + new_value
        else:
            use = quantity
        if use > INT64_MAX:
            return REASON_OVERFLOW
        if not force and d > 0 and d > self._available(idx, ct):
            if self.plan_mode[self.plan_of[idx] * self.n_ct + ct] == 0:
                return REASON_INSUFFICIENT_BALANCE
            if <i128>self._degr(idx, ct) + d > INT64_MAX:
                return REASON_OVERFLOW
            self._xnew(idx, ct).degr += <int64_t>d  # room was made by the caller
            self.usage[u] = <int64_t>use
            if new_value:
                self._uinsert(<int32_t>idx, meter, vhash, uval, ulen)
            self.dirty[idx] = 1
            return OUT_DEGRADED
        before = self.bal[b]
        self.bal[b] -= <int64_t>d
        self.rem[b] = <int64_t>(total - d * self.denom[ct])
        self.usage[u] = <int64_t>use
        if new_value:
            self._uinsert(<int32_t>idx, meter, vhash, uval, ulen)
        self.dirty[idx] = 1
        cost[0] = <int64_t>d
        self._check_alert(idx, ct, before)
        return REASON_NONE

    # ---- distinct values of unique_count meters --------------------------------

    cdef inline uint64_t _ukey(self, int32_t acct, int32_t meter, uint32_t epoch, uint64_t vhash) noexcept nogil:
        cdef uint64_t h = (vhash ^ (<uint64_t>acct * 0x9E3779B97F4A7C15ULL) ^ (<uint64_t>meter * 0xC2B2AE3D27D4EB4FULL)
                           ^ (<uint64_t>epoch * 0x165667B19E3779F9ULL))
        h ^= h >> 33
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 33
        return h

    cdef int32_t _ufind(self, int32_t acct, int32_t meter, uint64_t vhash, const char *val,
                        Py_ssize_t vlen) noexcept nogil:
        """The entry of a distinct value (``vlen`` -1: known by its hash only), or -1."""
        cdef uint32_t epoch = self.uepoch[acct]
        cdef uint64_t h
        cdef int32_t slot
        cdef UEntry *e
        if self.uidx == NULL:
            return -1
        h = self._ukey(acct, meter, epoch, vhash) & self.umask
        while True:
            slot = self.uidx[h]
            if slot == 0:
                return -1
            e = &self.uent[slot - 1]
            if e.vhash == vhash and e.acct == acct and e.meter == meter and e.epoch == epoch and (
                    e.vlen < 0 or vlen < 0
                    or (e.vlen == vlen and memcmp(self.uarena + e.voff, val, vlen) == 0)):
                return slot - 1
            h = (h + 1) & self.umask

    cdef void _uinsert(self, int32_t acct, int32_t meter, uint64_t vhash, const char *val,
                       Py_ssize_t vlen) noexcept nogil:
        """Add a distinct value; room was made by _ureserve."""
        cdef Py_ssize_t i = self.n_uent
        cdef UEntry *e = &self.uent[i]
        cdef uint64_t h
        e.vhash = vhash
        e.vlen = <int32_t>vlen
        e.voff = self.uarena_len
        if vlen > 0:
            memcpy(self.uarena + self.uarena_len, val, vlen)
            self.uarena_len += vlen
        e.acct = acct
        e.meter = meter
        e.epoch = self.uepoch[acct]
        e.next = self.uhead[acct]
        self.uhead[acct] = <int32_t>i
        self.n_uent += 1
        h = self._ukey(acct, meter, e.epoch, vhash) & self.umask
        while self.uidx[h] != 0:
            h = (h + 1) & self.umask
        self.uidx[h] = <int32_t>(i + 1)

    cdef int _ureserve(self, Py_ssize_t more, Py_ssize_t more_bytes) except -1:
        """Room for ``more`` new distinct values of ``more_bytes`` in all: drop
        stale entries, grow if need be."""
        cdef Py_ssize_t i, live = 0, live_bytes = 0, nslots = 16, new_cap, arena_cap
        cdef UEntry *old = self.uent
        cdef char *old_arena = self.uarena
        cdef Py_ssize_t n_old = self.n_uent
        if not self.has_unique:
            return 0
        if self.n_uent + more > self.cap_uent:
            for i in range(n_old):
                if old[i].epoch == self.uepoch[old[i].acct]:
                    live += 1
                    live_bytes += old[i].vlen if old[i].vlen > 0 else 0
            new_cap = max(64, (live + more) * 2)
            if new_cap > 0x3FFFFFFF:
                raise MemoryError("too many distinct values")
            while nslots < new_cap * 2:
                nslots *= 2
            arena_cap = max(4096, (live_bytes + more_bytes) * 2)
            self.uent = <UEntry *>malloc(new_cap * sizeof(UEntry))
            self.uarena = <char *>malloc(arena_cap)
            if self.uent == NULL or self.uarena == NULL:
                free(self.uent)
                free(self.uarena)
                self.uent = old
                self.uarena = old_arena
                raise MemoryError()
            free(self.uidx)
            self.uidx = <int32_t *>calloc(nslots, sizeof(int32_t))
            if self.uidx == NULL:
                free(old)
                free(old_arena)
                self.n_uent = 0
                self.cap_uent = 0
                self.uarena_len = 0
                self.uarena_cap = arena_cap
                raise MemoryError()
            self.umask = nslots - 1
            self.cap_uent = new_cap
            self.uarena_cap = arena_cap
            self.uarena_len = 0
            self.n_uent = 0
            for i in range(self.count):
                self.uhead[i] = -1
            for i in range(n_old):
                if old[i].epoch == self.uepoch[old[i].acct]:
                    self._uinsert(old[i].acct, old[i].meter, old[i].vhash, old_arena + old[i].voff, old[i].vlen)
            free(old)
            free(old_arena)
        if self.uarena_len + more_bytes > self.uarena_cap:
            self.uarena_cap = max(self.uarena_cap * 2, self.uarena_len + more_bytes)
            self.uarena = <char *>_resize(self.uarena, self.uarena_cap)
        return 0

    def uniques(self, Py_ssize_t idx):
        """(meter, value) of the distinct values counted this period, sorted;
        ``value`` is the value's bytes, or its 64-bit hash for a value read back
        from a snapshot of a version that kept only hashes."""
        self._idx(idx)
        out = []
        if not self.has_unique:
            return out
        cdef int32_t i = self.uhead[idx]
        cdef UEntry *e
        while i >= 0:
            e = &self.uent[i]
            if e.epoch == self.uepoch[idx]:
                out.append((e.meter, e.vhash if e.vlen < 0 else PyBytes_FromStringAndSize(self.uarena + e.voff,
                                                                                        e.vlen)))
            i = e.next
        out.sort(key=_unique_order)
        return out

    def add_unique(self, Py_ssize_t idx, int meter, value):
        """Count a distinct value (its bytes, or a 64-bit hash) as seen this
        period (snapshots and catalog changes)."""
        self._idx(idx)
        if not (0 <= meter < self.n_meters and self.meters[meter].agg == AGG_UNIQUE):
            raise ValueError("meter %d does not count distinct values" % meter)
        cdef uint64_t vhash
        cdef const char *p = NULL
        cdef Py_ssize_t n = -1
        if isinstance(value, bytes):
            p = PyBytes_AS_STRING(value)
            n = PyBytes_GET_SIZE(value)
            if n > 0x7FFFFFFF:
                raise ValueError("distinct value too long")
            vhash = _hash(p, n)
        else:
            vhash = value
        if self._ufind(<int32_t>idx, meter, vhash, p, n) < 0:
            self._ureserve(1, max(n, 0))
            self._uinsert(<int32_t>idx, meter, vhash, p, n)

    cdef inline void _check_alert(self, Py_ssize_t idx, Py_ssize_t ct, int64_t before) noexcept nogil:
        """Note a balance that just fell below its low-balance threshold."""
        cdef Ext *x = self._xp(idx, ct)
        if x == NULL:
            return
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef int64_t a = x.alert
        if a != INT64_MIN and before >= a and self.bal[b] < a:
            if self.n_alerts < DEF_ALERTS_MAX:
                self.alerts[self.n_alerts] = b
                self.n_alerts += 1
            else:
                self.alerts_lost = True

    cdef inline uint32_t _priority(self, Py_ssize_t idx, int32_t ct) noexcept nogil:
        """Queue-priority hint of a degraded event: 100, falling by one per
        ``step`` of degraded usage this period, down to 0."""
        cdef int64_t step = self.plan_step[self.plan_of[idx] * self.n_ct + ct]
        cdef int64_t drop
        if step <= 0:
            return 100
        drop = self._degr(idx, ct) // step
        return <uint32_t>(100 - drop if drop < 100 else 0)

    def set_plan(self, Py_ssize_t idx, int plan):
        self._idx(idx)
        if not 0 <= plan < self.n_plans:
            raise IndexError("no plan %d" % plan)
        self.plan_of[idx] = <uint16_t>plan
        self.dirty[idx] = 1

    def set_alert(self, Py_ssize_t idx, Py_ssize_t ct, threshold):
        """Low-balance threshold (nano), or None for none."""
        self._idx(idx); self._ct(ct)
        cdef int64_t a = INT64_MIN if threshold is None else <int64_t>threshold
        if a != INT64_MIN or self.ext[idx] >= 0:
            self._xw(idx, ct).alert = a
        self.dirty[idx] = 1

    # ---- usage aggregates for the ledger ---------------------------------------

    def set_window(self, int64_t window_ms):
        """The width of a usage window (one minute by default)."""
        if window_ms < 1:
            raise ValueError("the usage window must be at least 1 ms")
        self.window_ms = window_ms

    def set_clock(self, int64_t now_ms):
        """The time of what is applied next: its usage goes to this time's window."""
        self.cur_window = now_ms - now_ms % self.window_ms

    def set_dimension_sets_capped(self, bint capped):
        """Whether dimension_sets_per_window_max refuses new sets (on by default).
        The log replay turns it off: what was applied once is applied again."""
        self.sets_capped = capped

    cdef int _agg_grow(self, Py_ssize_t new_cap) except -1:
        """Resize the aggregate table to ``new_cap`` (at least n_agg) and rebuild its index."""
        cdef Py_ssize_t nslots = 16, i
        cdef uint64_t h
        while nslots < new_cap * 2:
            nslots *= 2
        cdef int32_t *slots = <int32_t *>calloc(nslots, sizeof(int32_t))
        if slots == NULL:
            if new_cap > self.cap_agg or self.aslots == NULL:
                raise MemoryError()  # growing: nothing has changed, the tables are as they were
            # Shrinking or rebuilding (the table was compacted): the index it has is
            # large enough; refill it in place rather than fail with a stale one.
            nslots = self.amask + 1
            memset(self.aslots, 0, nslots * sizeof(int32_t))
            slots = self.aslots
            new_cap = self.cap_agg
        elif new_cap != self.cap_agg:
            try:
                self.agg = <Agg *>_resize(self.agg, new_cap * sizeof(Agg))
            except MemoryError:
                free(slots)
                if new_cap > self.cap_agg or self.aslots == NULL:
                    raise  # growing: nothing has changed
                nslots = self.amask + 1  # shrinking, as above: keep the table, refill its index
                memset(self.aslots, 0, nslots * sizeof(int32_t))
                slots = self.aslots
                new_cap = self.cap_agg
        if slots != self.aslots:
            free(self.aslots)
        self.aslots = slots
        self.amask = nslots - 1
        self.cap_agg = new_cap
        for i in range(self.n_agg):
            h = self._akey(self.agg[i].acct, self.agg[i].meter, self.agg[i].dset, self.agg[i].window) & self.amask
            while self.aslots[h] != 0:
                h = (h + 1) & self.amask
            self.aslots[h] = <int32_t>(i + 1)
        return 0

    cdef inline uint64_t _akey(self, int32_t acct, int32_t meter, uint64_t dset, int64_t window) noexcept nogil:
        cdef uint64_t h = ((dset * 0xD6E8FEB86659FD93ULL) ^ (<uint64_t>acct * 0x9E3779B97F4A7C15ULL) ^ (<uint64_t>meter * 0xC2B2AE3D27D4EB4FULL)
                           ^ (<uint64_t>window * 0x165667B19E3779F9ULL))
        h ^= h >> 33
        h *= 0xFF51AFD7ED558CCDULL
        h ^= h >> 33
        return h

    # ---- dimension sets ---------------------------------------------------------------------

    cdef inline int32_t _dset_find(self, const char *dims, int32_t dlen, uint64_t dhash,
                                   uint64_t *slot_out) noexcept nogil:
        """The set with these bytes, or -1; ``slot_out`` is where it is or would go."""
        cdef uint64_t h
        cdef int32_t slot
        cdef DSet *d
        if self.dslots == NULL:
            slot_out[0] = 0
            return -1
        h = (dhash ^ (dhash >> 29)) & self.dmask
        while True:
            slot = self.dslots[h]
            if slot == 0:
                slot_out[0] = h
                return -1
            d = &self.dsets[slot - 1]
            if d.hash == dhash and d.len == dlen and memcmp(self.darena + d.off, dims, dlen) == 0:
                slot_out[0] = h
                return slot - 1
            h = (h + 1) & self.dmask

    cdef void _dset_index(self, int32_t *slots, uint64_t mask) noexcept nogil:
        """Make ``slots`` (zeroed, a power of two, ``mask`` + 1 of them) the set index, filled from the table."""
        cdef Py_ssize_t i
        cdef uint64_t h
        for i in range(self.n_dsets):
            h = (self.dsets[i].hash ^ (self.dsets[i].hash >> 29)) & mask
            while slots[h] != 0:
                h = (h + 1) & mask
            slots[h] = <int32_t>(i + 1)
        free(self.dslots)
        self.dslots = slots
        self.dmask = mask

    cdef int32_t _dset_intern(self, const char *dims, int32_t dlen, uint64_t dhash) except -1:
        """The set with these bytes, added if new."""
        cdef uint64_t h
        cdef int32_t d = self._dset_find(dims, dlen, dhash, &h)
        if d >= 0:
            return d
        if self.n_dsets >= 0x3FFFFFFF or self.darena_len + dlen > 0xFFFFFFFF:
            raise MemoryError("too many dimension sets")
        cdef Py_ssize_t cap, nslots
        cdef int32_t *slots
        # Each capacity is set only once its allocation has succeeded: a failed one
        # (MemoryError, the call refused) leaves the tables as they were.
        if self.darena_len + dlen > self.darena_cap:
            cap = max(self.darena_cap * 2, self.darena_len + dlen, 4096)
            self.darena = <char *>_resize(self.darena, cap)
            self.darena_cap = cap
        if self.n_dsets == self.cap_dsets:
            cap = max(64, self.cap_dsets * 2)
            nslots = _pow2_slots(cap)
            slots = <int32_t *>calloc(nslots, sizeof(int32_t))
            if slots == NULL:
                raise MemoryError()
            try:
                self.dsets = <DSet *>_resize(self.dsets, cap * sizeof(DSet))
            except MemoryError:
                free(slots)
                raise
            self.cap_dsets = cap
            self._dset_index(slots, nslots - 1)
            self._dset_find(dims, dlen, dhash, &h)
        d = <int32_t>self.n_dsets
        self.n_dsets += 1
        self.dslots[h] = d + 1
        self.dsets[d].hash = dhash
        self.dsets[d].off = <uint32_t>self.darena_len
        self.dsets[d].len = dlen
        self.dsets[d].refs = 0
        memcpy(self.darena + self.darena_len, dims, dlen)
        self.darena_len += dlen
        return d

    cdef void _dset_pop(self) noexcept nogil:
        """Forget the set added last (no aggregate names it): its slot is the only one
        it made non-empty, so the index is as it was before it came."""
        cdef DSet *d = &self.dsets[self.n_dsets - 1]
        cdef uint64_t h = (d.hash ^ (d.hash >> 29)) & self.dmask
        while self.dslots[h] != self.n_dsets:
            h = (h + 1) & self.dmask
        self.dslots[h] = 0
        self.darena_len = d.off
        self.n_dsets -= 1

    # ---- aggregates ---------------------------------------------------------------------------

    cdef inline int32_t _agg_find(self, int32_t acct, int32_t meter, int32_t dset, uint64_t *slot_out) noexcept nogil:
        """The aggregate of (account, meter, dimension set, current window), or -1;
        ``slot_out`` is where it is or would go."""
        cdef uint64_t h = self._akey(acct, meter, dset, self.cur_window) & self.amask
        cdef int32_t slot
        cdef Agg *a
        while True:
            slot = self.aslots[h]
            if slot == 0:
                slot_out[0] = h
                return -1
            a = &self.agg[slot - 1]
            if a.dset == dset and a.acct == acct and a.meter == meter and a.window == self.cur_window:
                slot_out[0] = h
                return slot - 1
            h = (h + 1) & self.amask

    cdef int32_t _agg_slot(self, int32_t acct, int32_t meter, const char *dims, int32_t dlen, uint64_t dhash,
                           bint capped) except -2:
        """The aggregate of an event, made (empty) if new; -1 when ``capped`` and
        the account has made dimension_sets_per_window_max sets in this window
        (a unique_count meter's too: each distinct value is a set of its own)."""
        cdef uint64_t h
        cdef int32_t d = self._dset_find(dims, dlen, dhash, &h)
        cdef int32_t i = -1
        cdef Agg *a
        cdef bint counted = True
        if d >= 0:
            i = self._agg_find(acct, meter, d, &h)
            if i >= 0:
                return i
        if self.nsets_win[acct] != self.cur_window:
            self.nsets_win[acct] = self.cur_window
            self.nsets[acct] = 0
        if counted and capped and self.sets_capped and self.nsets[acct] >= self.sets_max:
            return -1
        if self.n_agg >= 0x3FFFFFFF:
            raise MemoryError("too many usage aggregates")
        if d < 0:
            d = self._dset_intern(dims, dlen, dhash)
        if self.n_agg == self.cap_agg:
            self._agg_grow(self.cap_agg * 2)
        self._agg_find(acct, meter, d, &h)
        i = <int32_t>self.n_agg
        a = &self.agg[i]
        self.n_agg += 1
        self.aslots[h] = i + 1
        a.acct = acct
        a.meter = meter
        a.dset = d
        self.dsets[d].refs += 1
        a.window = self.cur_window
        a.qty = 0
        a.cost = 0
        a.events = 0
        self.nsets[acct] += counted
        return i

    cdef void _agg_undo(self, Py_ssize_t mark) noexcept nogil:
        """Forget the aggregates made since there were ``mark``, last first: each
        made only its own slot non-empty, so clearing them in reverse order leaves
        the index as it was."""
        cdef uint64_t h
        cdef Agg *a
        while self.n_agg > mark:
            a = &self.agg[self.n_agg - 1]
            h = self._akey(a.acct, a.meter, a.dset, a.window) & self.amask
            while self.aslots[h] != self.n_agg:
                h = (h + 1) & self.amask
            self.aslots[h] = 0
            self.nsets[a.acct] -= 1
            self.dsets[a.dset].refs -= 1
            # Sets made since the mark are named only by aggregates made since: in
            # reverse order, each is the last one when its last aggregate goes.
            while self.n_dsets and self.dsets[self.n_dsets - 1].refs == 0 and self.n_dsets - 1 >= a.dset:
                self._dset_pop()
            self.n_agg -= 1

    cdef inline int _agg_add(self, int32_t i, int64_t quantity, int64_t cost) except -1:
        """Add one allowed event to aggregate ``i``."""
        cdef Agg *a = &self.agg[i]
        cdef int kind = self.meters[a.meter].agg
        if (kind == AGG_SUM or kind == AGG_COUNT) and a.qty > INT64_MAX - quantity or a.cost > INT64_MAX - cost:
            self._spill(a)
        if kind == AGG_SUM or kind == AGG_COUNT:
            a.qty += quantity
        elif kind == AGG_MAX:
            if quantity > a.qty:
                a.qty = quantity
        elif kind == AGG_LATEST:
            a.qty = quantity
        a.cost += cost
        if a.events == 0:
            self.n_live += 1
        a.events += 1
        return 0

    cdef int _spill(self, Agg *a) except -1:
        """Move a sum that is about to pass 64 bits out of the aggregate (quantity
        and cost are never negative): take_usage adds it back."""
        cdef Py_ssize_t i = a - self.agg
        cdef int kind = self.meters[a.meter].agg
        spilled = self.agg_spill.setdefault(i, [0, 0])
        if kind == AGG_SUM or kind == AGG_COUNT:
            spilled[0] += a.qty
            a.qty = 0
        spilled[1] += a.cost
        a.cost = 0
        return 0

    def usage_pending(self):
        """How many aggregates wait for take_usage."""
        return self.n_live

    def take_usage(self):
        """Hand over and forget the usage aggregated since the last call:
        (customer_id, meter, dimensions, window_start_ms, quantity, cost_nano,
        events, balance_nano) tuples, where ``dimensions`` is the dimension set as
        UsageEvent field 5, entries sorted by key, and ``balance_nano`` is the
        account's balance now, in the meter's credit type. The current window's
        sets stay known, emptied, for dimension_sets_per_window_max."""
        self._check()
        cdef Py_ssize_t i, keep = 0
        cdef Agg *a
        out = []
        for i in range(self.n_agg):
            a = &self.agg[i]
            if a.events == 0:
                continue
            qty, cost = a.qty, a.cost
            if self.agg_spill:
                spilled = self.agg_spill.get(i)
                if spilled is not None:
                    qty, cost = qty + spilled[0], cost + spilled[1]
            out.append((self.customer_id(a.acct), a.meter,
                        PyBytes_FromStringAndSize(self.darena + self.dsets[a.dset].off, self.dsets[a.dset].len),
                        a.window, qty, cost, a.events, self.bal[a.acct * self.n_ct + self.meters[a.meter].ct]))
        self._agg_keep_window()
        return out

    cdef int _agg_keep_window(self) except -1:
        """Keep only the current window's aggregates, emptied, in their order, and
        only the sets they name (copied out in the order they are first named)."""
        cdef Py_ssize_t i, keep = 0, dlen = 0, n = 0, live_bytes = 0
        cdef int32_t d
        cdef Agg *a
        cdef Py_ssize_t nslots = _pow2_slots(max(self.n_dsets, 1))
        cdef int32_t *remap = <int32_t *>malloc(max(self.n_dsets, 1) * sizeof(int32_t))
        cdef DSet *sets = <DSet *>malloc(max(self.n_dsets, 1) * sizeof(DSet))
        cdef int32_t *slots = <int32_t *>calloc(nslots, sizeof(int32_t))
        cdef char *arena = NULL
        if remap != NULL:
            for i in range(self.n_dsets):
                remap[i] = -1
            for i in range(self.n_agg):
                a = &self.agg[i]
                if a.window == self.cur_window and remap[a.dset] < 0:
                    remap[a.dset] = -2
                    live_bytes += self.dsets[a.dset].len
            arena = <char *>malloc(max(4096, 2 * live_bytes))
        if remap == NULL or sets == NULL or slots == NULL or arena == NULL:
            # Nothing has changed yet: the tables stay as they were.
            free(remap)
            free(sets)
            free(slots)
            free(arena)
            raise MemoryError()
        for i in range(self.n_agg):
            a = &self.agg[i]
            if a.window != self.cur_window:
                continue
            d = remap[a.dset]
            if d < 0:
                d = remap[a.dset] = <int32_t>n
                sets[n] = self.dsets[a.dset]
                sets[n].off = <uint32_t>dlen
                sets[n].refs = 0
                memcpy(arena + dlen, self.darena + self.dsets[a.dset].off, sets[n].len)
                dlen += sets[n].len
                n += 1
            sets[d].refs += 1
            a.dset = d
            a.qty = 0
            a.cost = 0
            a.events = 0
            self.agg[keep] = a[0]
            keep += 1
        free(remap)
        free(self.dsets)
        free(self.darena)
        self.dsets, self.n_dsets, self.cap_dsets = sets, n, max(self.n_dsets, 1)
        self.darena, self.darena_len, self.darena_cap = arena, dlen, max(4096, 2 * live_bytes)
        self.n_agg = keep
        self.n_live = 0
        self.agg_spill = {}
        self._dset_index(slots, nslots - 1)
        if self.cap_agg > 4096 and self.cap_agg > 4 * keep:
            # The tables go back to the system: they fill again by the next snapshot,
            # and growing them costs less than the tuples above.
            self._agg_grow(max(64, 2 * keep))
        else:
            self._agg_grow(self.cap_agg)
        return 0

    def take_alerts(self):
        """(account, credit type) pairs whose balance fell below their threshold
        since the last call; when too many to keep, every account below it."""
        self._check()
        cdef Py_ssize_t i, b
        cdef int64_t a
        out = []
        if self.alerts_lost:
            for b in range(self.count * self.n_ct):
                a = self._alert(b // self.n_ct, b % self.n_ct)
                if a != INT64_MIN and self.bal[b] < a:
                    out.append((b // self.n_ct, b % self.n_ct))
        else:
            for i in range(self.n_alerts):
                out.append((self.alerts[i] // self.n_ct, self.alerts[i] % self.n_ct))
        self.n_alerts = 0
        self.alerts_lost = False
        return out

    def reserve(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        """Hold an amount if the available balance covers it; True when held."""
        self._idx(idx); self._ct(ct)
        cdef Py_ssize_t b = idx * self.n_ct + ct
        if amount < 0:
            raise InvalidInput("amount", "must not be negative")
        if amount > self._available(idx, ct):
            return False
        if <i128>self._resv(idx, ct) + amount > INT64_MAX:
            raise InvalidInput("amount", "reserved total would overflow")
        if amount:
            self._xw(idx, ct).resv += amount
        self.dirty[idx] = 1
        return True

    def release(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        self._idx(idx); self._ct(ct)
        cdef Py_ssize_t b = idx * self.n_ct + ct
        if amount < 0 or amount > self._resv(idx, ct):
            raise ValueError("release of more than is reserved")
        if amount:
            self._xp(idx, ct).resv -= amount
        self.dirty[idx] = 1

    def set_allowed(self, Py_ssize_t idx, int meter, bytes dims):
        """Whether usage of ``meter`` under the dimension set ``dims`` fits
        dimension_sets_per_window_max now: a set the account has in this window
        always does."""
        self._idx(idx)
        if not 0 <= meter < self.n_meters:
            raise IndexError("no meter %d" % meter)
        cdef uint64_t h
        cdef const char *p = PyBytes_AS_STRING(dims)
        cdef int32_t n = <int32_t>len(dims)
        cdef int32_t d = self._dset_find(p, n, _hash_set(p, n), &h)
        if d >= 0 and self._agg_find(<int32_t>idx, meter, d, &h) >= 0:
            return True
        if not self.sets_capped:
            return True
        if self.nsets_win[idx] != self.cur_window:
            return self.sets_max > 0
        return self.nsets[idx] < self.sets_max

    def settle(self, Py_ssize_t idx, Py_ssize_t rate, int64_t quantity, int64_t reserved, bytes dims=None):
        """Release a reservation and debit the real usage with carry.

        Returns (cost, overrun): the debit is recorded even when it exceeds
        the reservation and the available balance (the work was done);
        ``overrun`` is how far it went past the floor. The usage is filed under
        ``dims`` (a canonical dimension set, as ``canonical_set`` makes it), or
        under the rate's price dimension alone.
        """
        self._idx(idx)
        if rate < 0 or rate >= self.n_rates:
            raise IndexError("no rate %d" % rate)
        if quantity < 0:
            raise InvalidInput("quantity", "must not be negative")
        cdef int32_t ct = self.rates[rate].ct
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef i128 fine
        cdef int64_t cost = 0
        if self.meters[self.rates[rate].meter].agg > AGG_COUNT:
            raise InvalidInput("meter", "a max, latest or unique_count meter is charged at period end")
        if reserved < 0 or reserved > self._resv(idx, ct):
            raise ValueError("settle of more than is reserved")
        if self._fine(<int32_t>rate, quantity, &fine):
            raise InvalidInput("quantity", "cost overflows 64 bits")
        # A settlement is not refused for dimension_sets_per_window_max: the work
        # was done. The engine files it under its price dimension alone when its
        # own set does not fit (set_allowed), and logs which it chose.
        cdef Py_ssize_t mark = self.n_agg
        cdef int32_t i
        if dims is None:
            i = self._agg_slot(<int32_t>idx, self.rates[rate].meter, self.rate_dptr[rate], self.rate_dlen[rate],
                               self.rate_dhash[rate], False)
        else:
            i = self._agg_slot(<int32_t>idx, self.rates[rate].meter, PyBytes_AS_STRING(dims), <int32_t>len(dims),
                               _hash_set(PyBytes_AS_STRING(dims), len(dims)), False)
        cdef Ext *x = self._xp(idx, ct)  # there is one when anything is reserved
        if reserved:
            x.resv -= reserved
        if self._debit(idx, <int32_t>rate, quantity, fine, True, &cost, NULL, 0) != REASON_NONE:
            if reserved:
                x.resv += reserved
            self._agg_undo(mark)
            raise InvalidInput("quantity", "balance or usage would overflow")
        self._agg_add(i, quantity, cost)
        cdef i128 a = self._available(idx, ct)
        if a < -INT64_MAX:
            a = -INT64_MAX
        return cost, <int64_t>(-a if a < 0 else 0)

    def force_charge(self, Py_ssize_t idx, Py_ssize_t rate, int64_t quantity):
        """Debit the cost of ``quantity`` at ``rate`` with carry, whatever the
        balance, without counting usage (a gauge's value at period end)."""
        self._idx(idx)
        if rate < 0 or rate >= self.n_rates or quantity < 0:
            raise ValueError("no such rate, or a negative quantity")
        cdef int32_t ct = self.rates[rate].ct
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef i128 fine, total, d
        if self._fine(<int32_t>rate, quantity, &fine):
            raise InvalidInput("quantity", "cost overflows 64 bits")
        total = fine + self.rem[b]
        d = total / self.denom[ct]
        if <i128>self.bal[b] - d < -INT64_MAX:
            raise InvalidInput("quantity", "balance would overflow")
        cdef int64_t before = self.bal[b]
        self.bal[b] -= <int64_t>d
        self.rem[b] = <int64_t>(total - d * self.denom[ct])
        self.dirty[idx] = 1
        self._check_alert(idx, ct, before)
        return <int64_t>d

    def reset_usage(self, Py_ssize_t idx=-1):
        """Start a new period for one account (or all): usage and degraded
        usage go to zero."""
        self._check()
        cdef Py_ssize_t i
        cdef Py_ssize_t k
        if idx < 0:
            memset(self.usage, 0, self.count * self.n_meters * sizeof(int64_t))
            for i in range(self.n_x):
                self.xrows[i].degr = 0
            memset(self.dirty, 1, self.count)
            if self.has_unique:
                for i in range(self.count):
                    self.uepoch[i] += 1
            return
        self._idx(idx)
        memset(self.usage + idx * self.n_meters, 0, self.n_meters * sizeof(int64_t))
        if self.ext[idx] >= 0:
            for k in range(self.n_ct):
                self.xrows[self.ext[idx] + k].degr = 0
        if self.has_unique:
            self.uepoch[idx] += 1  # this period's distinct values start again
        self.dirty[idx] = 1

    # ---- wire decoding ---------------------------------------------------

    cdef int _decode_event(self, const char *buf, Py_ssize_t start, Py_ssize_t end, Event *ev) noexcept:
        """Decode and rate one UsageEvent; on error ev.err and ev.err_ptr say why.
        Its canonical dimension set goes to cbuf, which has room (see _cbuf_reserve)."""
        cdef Py_ssize_t pos = start, s, n
        cdef const char *dim_value = NULL
        cdef Py_ssize_t dim_len = 0
        cdef uint64_t key, v
        cdef int wt, rc, qkind = 0, ndims = 0, nspans = 0
        cdef int64_t qty = 0
        cdef const char *dec = NULL
        cdef Py_ssize_t dec_len = 0
        cdef int32_t i
        cdef Meter *m
        ev.cust = NULL
        ev.cust_len = 0
        ev.meter = -1
        ev.err = E_OK
        ev.err_ptr = b""
        ev.detail = NULL
        ev.detail_len = 0
        ev.uval = NULL
        ev.ulen = 0
        ev.clen = 0
        ev.coff = self.cbuf_len
        ev.agg = -1
        cdef const char *mname = NULL
        cdef Py_ssize_t mlen = 0
        while pos < end:
            rc = _read_tag(buf, end, &pos, &key)
            if rc:
                ev.err = rc
                return rc
            wt = key & 7
            key >>= 3
            if key == 0:
                ev.err = E_FIELD0
                return E_FIELD0
            if key == 1 or key == 2 or key == 4 or key == 5 or key == 7:
                if wt != 2:
                    ev.err = E_WIRE_TYPE
                    ev.err_ptr = _FIELD_NAMES[key]
                    return E_WIRE_TYPE
                rc = _read_len(buf, end, &pos, &s, &n)
                if rc:
                    ev.err = rc
                    return rc
                if key == 5:
                    rc = self._decode_dim(buf, s, s + n, ev, &nspans)
                    if rc:
                        return rc
                    continue
                if not _utf8_ok(<const uint8_t *>buf + s, n):
                    ev.err = E_UTF8  # every string field, as protobuf checks each occurrence
                    ev.err_ptr = _FIELD_NAMES[key]
                    return E_UTF8
                if key == 1:
                    ev.cust = buf + s
                    ev.cust_len = <int32_t>n if n < 0x7FFFFFFF else 0x7FFFFFFF
                elif key == 2:
                    mname = buf + s
                    mlen = n
                elif key == 4:
                    qkind = 2
                    dec = buf + s
                    dec_len = n
            elif key == 3 or key == 6:
                if wt != 0:
                    ev.err = E_WIRE_TYPE
                    ev.err_ptr = _FIELD_NAMES[key]
                    return E_WIRE_TYPE
                rc = _read_varint(buf, end, &pos, &v)
                if rc:
                    ev.err = rc
                    ev.err_ptr = _FIELD_NAMES[key]
                    return rc
                if key == 3:
                    qkind = 1
                    qty = <int64_t>v
                elif <int64_t>v < 0:
                    ev.err = E_NEGATIVE
                    ev.err_ptr = b"timestamp_ms"
                    return E_NEGATIVE
            else:
                rc = _skip(buf, end, &pos, wt)
                if rc:
                    ev.err = rc
                    return rc
        # customer id
        ev.err_ptr = b"customer_id"
        if ev.cust_len == 0:
            ev.err = E_EMPTY
            return E_EMPTY
        if ev.cust_len > self.id_max:
            ev.err = E_TOO_LONG
            return E_TOO_LONG
        if not _id_charset_ok(ev.cust, ev.cust_len):
            ev.err = E_CHARSET
            return E_CHARSET
        if self.tenant_len >= 0 and (ev.cust_len < self.tenant_len
                                     or memcmp(ev.cust, self.tenant_ptr, self.tenant_len) != 0):
            ev.err = E_TENANT
            return E_TENANT
        # meter
        ev.err_ptr = b"meter"
        for i in range(self.n_meters):
            if self.meters[i].name_len == mlen and memcmp(self.meters[i].name, mname, mlen) == 0:
                ev.meter = i
                break
        if ev.meter < 0:
            ev.err = E_UNKNOWN_METER
            ev.detail = mname
            ev.detail_len = <int32_t>min(mlen, 64)
            return E_UNKNOWN_METER
        m = &self.meters[ev.meter]
        # quantity
        if qkind == 2:
            ev.err_ptr = b"quantity_decimal"
            rc = _parse_decimal(dec, dec_len, m.precision, &qty)
            if rc:
                ev.err = rc
                return rc
        else:
            ev.err_ptr = b"quantity"
            if qty < 0:
                ev.err = E_NEGATIVE
                return E_NEGATIVE
            if m.precision > 0:
                rc = _scale(&qty, m.precision)
                if rc:
                    ev.err = rc
                    return rc
        ev.quantity = qty
        # rate: of the entries whose key is the meter's price dimension, the last wins (protobuf's map)
        if m.dim_key_len > 0:
            self._span_value(nspans, m.dim_key, m.dim_key_len, &dim_value, &dim_len)
            ev.rate = self._find_rate(ev.meter, dim_value, dim_len)
        else:
            ev.rate = m.rate_default
        if ev.rate < 0:
            ev.err = E_NO_PRICE
            ev.err_ptr = b"dimensions"
            ev.detail = dim_value
            ev.detail_len = <int32_t>dim_len
            return E_NO_PRICE
        if m.agg == AGG_COUNT:
            ev.quantity = qty = 1  # a count meter counts events; its price is per event
        if m.agg == AGG_UNIQUE:
            dim_value = NULL
            self._span_value(nspans, m.uniq_key, m.uniq_key_len, &dim_value, &dim_len)
            if dim_value == NULL:
                ev.err = E_NO_UNIQUE
                ev.err_ptr = b"dimensions"
                ev.detail = m.uniq_key
                ev.detail_len = m.uniq_key_len
                return E_NO_UNIQUE
            ev.uval = dim_value
            ev.ulen = <int32_t>dim_len
            ev.quantity = 0  # a unique_count meter has no quantity of its own
        if m.agg == AGG_MAX or m.agg == AGG_LATEST or m.agg == AGG_UNIQUE:
            ev.fine = 0  # gauges are charged on their period's value, at the period's end
        elif self._fine(ev.rate, qty, &ev.fine):
            ev.err = E_OVERFLOW
            ev.err_ptr = b"quantity"
            return E_OVERFLOW
        ev.clen = <int32_t>_put_dims(self.cbuf + ev.coff, self.spans, nspans)
        ev.chash = _hash_set(self.cbuf + ev.coff, ev.clen)
        self.cbuf_len += ev.clen
        ev.err_ptr = b""
        return E_OK

    cdef void _span_value(self, int nspans, const char *want, Py_ssize_t want_len,
                          const char **value, Py_ssize_t *value_len) noexcept nogil:
        """The value of the entry whose key is ``want`` (entries are unique by key), if any."""
        cdef int i
        for i in range(nspans):
            if self.spans[i].key_len == want_len and memcmp(self.spans[i].key, want, want_len) == 0:
                value[0] = self.spans[i].value
                value_len[0] = self.spans[i].value_len
                return

    cdef int _decode_dim(self, const char *buf, Py_ssize_t pos, Py_ssize_t end, Event *ev, int *nspans) noexcept:
        """Validate one map entry and put it among the spans, sorted by key; a later
        entry of the same key replaces the earlier one. An entry with any field
        but its key and value (wire type 2) is left out: protobuf's parser moves
        such an entry to the unknown fields, so it is no dimension at all."""
        cdef Py_ssize_t ks = 0, kn = 0, vs = 0, vn = 0, s, n
        cdef uint64_t key
        cdef int rc, wt, i, c
        cdef bint other = False
        ev.err_ptr = b"dimensions"
        while pos < end:
            rc = _read_tag(buf, end, &pos, &key)
            if rc:
                ev.err = rc
                return rc
            wt = key & 7
            key >>= 3
            if key == 0:
                ev.err = E_FIELD0
                return E_FIELD0
            if (key == 1 or key == 2) and wt == 2:
                rc = _read_len(buf, end, &pos, &s, &n)
                if rc:
                    ev.err = rc
                    return rc
                if not _utf8_ok(<const uint8_t *>buf + s, n):
                    ev.err = E_UTF8  # protobuf strings: the ledger and every client must be able to read them
                    return E_UTF8
                if key == 1:
                    ks = s; kn = n
                else:
                    vs = s; vn = n
            else:
                rc = _skip(buf, end, &pos, wt)
                if rc:
                    ev.err = rc
                    return rc
                other = True
        if other:
            ev.err_ptr = b""
            return E_OK
        if kn == 0 or kn > self.dim_key_max:
            ev.err = E_TOO_LONG if kn else E_EMPTY
            return ev.err
        if vn > self.dim_value_max:
            ev.err = E_TOO_LONG
            return ev.err
        # Insertion by key: entries are few (dimensions_max).
        for i in range(nspans[0]):
            c = _keycmp(buf + ks, kn, self.spans[i].key, self.spans[i].key_len)
            if c == 0:
                self.spans[i].value = buf + vs
                self.spans[i].value_len = <int32_t>vn
                ev.err_ptr = b""
                return E_OK
            if c < 0:
                break
        else:
            i = nspans[0]
        if nspans[0] >= self.dims_max:
            ev.err = E_TOO_MANY
            return E_TOO_MANY
        memmove(&self.spans[i + 1], &self.spans[i], (nspans[0] - i) * sizeof(Span))
        self.spans[i].key = buf + ks
        self.spans[i].key_len = <int32_t>kn
        self.spans[i].value = buf + vs
        self.spans[i].value_len = <int32_t>vn
        nspans[0] += 1
        ev.err_ptr = b""
        return E_OK

    cdef int _cbuf_reserve(self, Py_ssize_t data_len) except -1:
        """Room in cbuf for the canonical dimension sets of a message of
        ``data_len`` bytes: an entry takes at least 5 bytes on the wire and at
        most 2 more in canonical form (its value written even when empty)."""
        cdef Py_ssize_t need = 2 * data_len + 64
        self.cbuf_len = 0
        if need > self.cbuf_cap or (self.cbuf_cap > 1 << 22 and need < self.cbuf_cap // 8):
            self.cbuf = <char *>_resize(self.cbuf, need)
            self.cbuf_cap = need
        return 0

    cdef object _event_error(self, Event *ev, str prefix):
        field = prefix + ev.err_ptr.decode() if ev.err_ptr[0] else prefix.rstrip(".") or "event"
        cdef Meter *m
        if ev.err == E_UNKNOWN_METER:
            name = PyBytes_FromStringAndSize(ev.detail, ev.detail_len).decode("utf-8", "replace")
            return InvalidInput(field, "unknown meter %r" % name)
        if ev.err == E_NO_PRICE:
            m = &self.meters[ev.meter]
            return InvalidInput(field, _no_price_message(
                PyBytes_FromStringAndSize(m.name, m.name_len), PyBytes_FromStringAndSize(m.dim_key, m.dim_key_len),
                None if ev.detail == NULL else PyBytes_FromStringAndSize(ev.detail, ev.detail_len)))
        if ev.err == E_PRECISION:
            m = &self.meters[ev.meter]
            return InvalidInput(field, _precision_message(PyBytes_FromStringAndSize(m.name, m.name_len), m.precision))
        if ev.err == E_NO_UNIQUE:
            key = PyBytes_FromStringAndSize(ev.detail, ev.detail_len).decode()
            return InvalidInput(field, "a unique_count meter needs the %r dimension" % key)
        if ev.err == E_TOO_LONG and ev.err_ptr == b"customer_id":
            return InvalidInput(field, "longer than %d bytes" % self.id_max)
        if ev.err == E_TENANT:
            return Forbidden(field, _MESSAGES[ev.err])
        return InvalidInput(field, _MESSAGES[ev.err])

    cdef object _sets_error(self, Event *ev, str field):
        return InvalidInput(field, _sets_message(PyBytes_FromStringAndSize(ev.cust, ev.cust_len), self.sets_max))

    cdef int _set_tenant(self, bytes tenant) except -1:
        self.tenant = tenant
        if tenant is None:
            self.tenant_len = -1
        else:
            self.tenant_ptr = PyBytes_AS_STRING(tenant)
            self.tenant_len = PyBytes_GET_SIZE(tenant)
        return 0

    cdef int _decode_batch(self, const char *buf, Py_ssize_t end, uint64_t *seq,
                           Py_ssize_t *cid_start, Py_ssize_t *cid_len, Py_ssize_t *nev,
                           uint64_t *details) except -1:
        """Decode a ReportBatchRequest into the scratch events; raise InvalidInput."""
        cdef Py_ssize_t pos = 0, s, n
        cdef uint64_t key
        cdef int wt, rc
        cdef Event *ev
        nev[0] = 0
        seq[0] = 0
        details[0] = 0
        cid_start[0] = 0
        cid_len[0] = 0
        self._cbuf_reserve(end)
        while pos < end:
            rc = _read_tag(buf, end, &pos, &key)
            if rc:
                raise InvalidInput("batch", _MESSAGES[rc])
            wt = key & 7
            key >>= 3
            if key == 0:
                raise InvalidInput("batch", _MESSAGES[E_FIELD0])
            if key == 1 or key == 3:
                if wt != 2:
                    raise InvalidInput("client_id" if key == 1 else "events", _MESSAGES[E_WIRE_TYPE])
                rc = _read_len(buf, end, &pos, &s, &n)
                if rc:
                    raise InvalidInput("client_id" if key == 1 else "events", _MESSAGES[rc])
                if key == 1:
                    if not _utf8_ok(<const uint8_t *>buf + s, n):
                        raise InvalidInput("client_id", _MESSAGES[E_UTF8])
                    cid_start[0] = s
                    cid_len[0] = n
                    continue
                if nev[0] >= self.batch_max:
                    raise InvalidInput("events", "more than %d events in one batch" % self.batch_max)
                ev = &self.scratch[nev[0]]
                if self._decode_event(buf, s, s + n, ev) != E_OK:
                    raise self._event_error(ev, "events[%d]." % nev[0])
                nev[0] += 1
            elif key == 2:
                if wt != 0:
                    raise InvalidInput("sequence", _MESSAGES[E_WIRE_TYPE])
                rc = _read_varint(buf, end, &pos, seq)
                if rc:
                    raise InvalidInput("sequence", _MESSAGES[rc])
            elif key == 4:
                if wt != 0:
                    raise InvalidInput("details", _MESSAGES[E_WIRE_TYPE])
                rc = _read_varint(buf, end, &pos, details)
                if rc:
                    raise InvalidInput("details", _MESSAGES[rc])
            else:
                rc = _skip(buf, end, &pos, wt)
                if rc:
                    raise InvalidInput("batch", _MESSAGES[rc])
        if cid_len[0] > self.client_id_max or not _id_charset_ok(buf + cid_start[0], cid_len[0]):
            raise InvalidInput("client_id", "must be at most %d printable ASCII characters" % self.client_id_max)
        return 0

    def batch_header(self, bytes data):
        """(client_id, sequence) of a serialized ReportBatchRequest, events skipped.

        Only the header is checked; ``apply_batch`` validates every event.
        """
        self._check()
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(data), pos = 0, cs = 0, cn = 0
        cdef uint64_t key, seq = 0
        cdef int wt, rc
        while pos < end:
            rc = _read_tag(buf, end, &pos, &key)
            if rc:
                raise InvalidInput("batch", _MESSAGES[rc])
            wt = key & 7
            key >>= 3
            if key == 0:
                raise InvalidInput("batch", _MESSAGES[E_FIELD0])
            if key == 1 and wt == 2:
                rc = _read_len(buf, end, &pos, &cs, &cn)
                if rc == E_OK and not _utf8_ok(<const uint8_t *>buf + cs, cn):
                    rc = E_UTF8
            elif key == 2 and wt == 0:
                rc = _read_varint(buf, end, &pos, &seq)
            elif 1 <= key <= 3:
                rc = _skip(buf, end, &pos, wt) if key == 3 and wt == 2 else E_WIRE_TYPE
            else:
                rc = _skip(buf, end, &pos, wt)
            if rc:
                raise InvalidInput(_BATCH_FIELDS[key] if 1 <= key <= 3 else "batch", _MESSAGES[rc])
        if cn > self.client_id_max or not _id_charset_ok(buf + cs, cn):
            raise InvalidInput("client_id", "must be at most %d printable ASCII characters" % self.client_id_max)
        return PyBytes_FromStringAndSize(buf + cs, cn), seq

    def apply_batch(self, bytes data, bytes tenant=None):
        """Decode, validate and apply a ReportBatchRequest.

        Returns (accepted, denied, degraded, details): accepted counts every
        allowed event, degraded ones included; ``details`` is the encoded
        ``denials`` (3) and ``degradations`` (7) fields of ReportBatchResponse,
        in event order. Raises InvalidInput, with nothing applied, when any
        event is malformed, and Forbidden when ``tenant`` is given and an
        event's customer id does not start with it.
        """
        self._set_tenant(tenant)
        try:
            return self._apply_batch(data)
        finally:
            self._set_tenant(None)

    cdef object _apply_batch(self, bytes data):
        self._check()
        cdef uint64_t seq
        cdef Py_ssize_t cs, cn, nev, i
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef Event *ev
        cdef int reason
        cdef int64_t cost
        cdef uint32_t accepted = 0, denied = 0, degraded = 0
        cdef int32_t mode, ct
        cdef char *out
        cdef Py_ssize_t olen = 0
        cdef uint64_t details
        cdef uint32_t prio
        cdef Py_ssize_t mark
        self._decode_batch(buf, PyBytes_GET_SIZE(data), &seq, &cs, &cn, &nev, &details)
        self._ureserve(nev, PyBytes_GET_SIZE(data))
        self._xreserve(nev)
        # Every event's aggregate first, so that a batch over the cap on dimension
        # sets is refused whole, with nothing applied.
        mark = self.n_agg
        for i in range(nev):
            ev = &self.scratch[i]
            ev.account = self._find(ev.cust, ev.cust_len)
            if ev.account >= 0:
                ev.agg = self._agg_slot(ev.account, ev.meter, self.cbuf + ev.coff, ev.clen, ev.chash, True)
                if ev.agg < 0:
                    self._agg_undo(mark)
                    raise self._sets_error(ev, "events[%d].dimensions" % i)
        out = <char *>malloc(nev * (48 + (160 if details else 0)) + 1)
        if out == NULL:
            self._agg_undo(mark)
            raise MemoryError()
        for i in range(nev):
            ev = &self.scratch[i]
            cost = 0
            mode = 0
            prio = 0
            ct = self.rates[ev.rate].ct
            if ev.account < 0:
                reason = REASON_UNKNOWN_CUSTOMER
            else:
                reason = self._debit(ev.account, ev.rate, ev.quantity, ev.fine, False, &cost, ev.uval, ev.ulen)
            if reason == REASON_NONE or reason == OUT_DEGRADED:
                self._agg_add(ev.agg, ev.quantity, cost)
            if reason == REASON_NONE:
                accepted += 1
            elif reason == OUT_DEGRADED:
                accepted += 1
                degraded += 1
                mode = self.plan_mode[self.plan_of[ev.account] * self.n_ct + ct]
                prio = self._priority(ev.account, ct)
                olen += _put_degradation(out + olen, <uint32_t>i, self.mode_ptr[mode], self.mode_len[mode], prio)
            else:
                denied += 1
                olen += _put_denial(out + olen, <uint32_t>i, reason)
            if details:
                olen += _put_result(out + olen, <uint32_t>i,
                                    DECISION_ALLOW if reason == REASON_NONE else
                                    DECISION_DEGRADE if reason == OUT_DEGRADED else DECISION_DENY,
                                    reason if reason != OUT_DEGRADED else 0,
                                    self.ct_name[ct], self.ct_name_len[ct], cost,
                                    self.bal[ev.account * self.n_ct + ct] if ev.account >= 0 else 0,
                                    self.mode_ptr[mode], self.mode_len[mode], prio)
        try:
            return accepted, denied, degraded, PyBytes_FromStringAndSize(out, olen)
        finally:
            free(out)

    cdef int _report(self, bytes data, bint keyless, Outcome *o) except -1:
        """Decode and apply a ReportRequest (one event) into ``o``. With
        ``keyless``, an event that carries an idempotency key is left alone and
        1 is returned (the caller must check the key first); else 0."""
        self._check()
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef Py_ssize_t end = PyBytes_GET_SIZE(data), pos = 0, s = 0, n = -1
        cdef uint64_t key
        cdef int wt, rc, reason
        cdef Event ev
        self._cbuf_reserve(end)
        while pos < end:
            rc = _read_tag(buf, end, &pos, &key)
            if rc:
                raise InvalidInput("event", _MESSAGES[rc])
            wt = key & 7
            key >>= 3
            if key == 0:
                raise InvalidInput("event", _MESSAGES[E_FIELD0])
            if key == 1:
                if wt != 2:
                    raise InvalidInput("event", _MESSAGES[E_WIRE_TYPE])
                if n >= 0:  # protobuf would merge the two; no client splits a message so
                    raise InvalidInput("event", "appears more than once in the request")
                rc = _read_len(buf, end, &pos, &s, &n)
            else:
                rc = _skip(buf, end, &pos, wt)
            if rc:
                raise InvalidInput("event", _MESSAGES[rc])
        if n < 0:
            raise InvalidInput("event", "is required")
        if self._decode_event(buf, s, s + n, &ev) != E_OK:
            raise self._event_error(&ev, "event.")
        if keyless and _has_string(buf, s, s + n, 7):
            return 1
        cdef int32_t ct = self.rates[ev.rate].ct
        o.ct = ct
        o.reason = REASON_NONE
        o.cost = 0
        o.balance = 0
        o.mode = 0
        o.priority = 0
        self._ureserve(1, ev.ulen)
        self._xreserve(1)
        ev.account = self._find(ev.cust, ev.cust_len)
        if ev.account < 0:
            o.decision = DECISION_DENY
            o.reason = REASON_UNKNOWN_CUSTOMER
            return 0
        ev.agg = self._agg_slot(ev.account, ev.meter, self.cbuf + ev.coff, ev.clen, ev.chash, True)
        if ev.agg < 0:
            raise self._sets_error(&ev, "event.dimensions")
        reason = self._debit(ev.account, ev.rate, ev.quantity, ev.fine, False, &o.cost, ev.uval, ev.ulen)
        if reason == REASON_NONE or reason == OUT_DEGRADED:
            self._agg_add(ev.agg, ev.quantity, o.cost)
        o.balance = self.bal[ev.account * self.n_ct + ct]
        if reason == REASON_NONE:
            o.decision = DECISION_ALLOW
        elif reason == OUT_DEGRADED:
            o.decision = DECISION_DEGRADE
            o.cost = 0
            o.mode = self.plan_mode[self.plan_of[ev.account] * self.n_ct + ct]
            o.priority = self._priority(ev.account, ct)
        else:
            o.decision = DECISION_DENY
            o.reason = reason
            o.cost = 0
        return 0

    def report(self, bytes data, bytes tenant=None):
        """Decode and apply a ReportRequest (one event).

        Returns (decision, reason, credit_type, cost_nano, balance_nano, mode,
        priority); ``mode`` and ``priority`` are b"" and 0 unless degraded.
        ``tenant`` as for apply_batch.
        """
        cdef Outcome o
        self._set_tenant(tenant)
        try:
            self._report(data, False, &o)
        finally:
            self._set_tenant(None)
        return (o.decision, o.reason, o.ct, o.cost, o.balance, self.modes[o.mode - 1] if o.mode else b"",
                o.priority)

    def report_wire(self, bytes data, bytes tenant=None):
        """``report`` for the unary hot path: returns None, having applied
        nothing, when the event carries an idempotency key; else (decision,
        the serialised ReportResponse)."""
        cdef Outcome o
        cdef int keyed
        if tenant is None:
            keyed = self._report(data, True, &o)
        else:
            self._set_tenant(tenant)
            try:
                keyed = self._report(data, True, &o)
            finally:
                self._set_tenant(None)
        if keyed:
            return None
        cdef char out[256]
        cdef Py_ssize_t n = _put_uint(out, 0x08, <uint64_t>o.decision)
        n += _put_uint(out + n, 0x10, <uint64_t>o.reason)
        n += _put_str(out + n, 0x1A, self.ct_name[o.ct], self.ct_name_len[o.ct])
        n += _put_uint(out + n, 0x20, <uint64_t>o.cost)
        n += _put_uint(out + n, 0x28, <uint64_t>o.balance)
        if o.mode:
            n += _put_str(out + n, 0x3A, self.mode_ptr[o.mode], self.mode_len[o.mode])
        n += _put_uint(out + n, 0x40, o.priority)
        return o.decision, PyBytes_FromStringAndSize(out, n)


cdef int _has_string(const char *buf, Py_ssize_t pos, Py_ssize_t end, uint64_t field) noexcept:
    """Whether a (well-formed) message has a non-empty length-delimited ``field``
    (its last occurrence, which is what protobuf reads)."""
    cdef uint64_t key = 0
    cdef Py_ssize_t s = 0, n = 0, last = 0
    while pos < end:
        if _read_tag(buf, end, &pos, &key):
            return 0
        if key >> 3 == field and key & 7 == 2:
            if _read_len(buf, end, &pos, &s, &n):
                return 0
            last = n
        elif _skip(buf, end, &pos, key & 7):
            return 0
    return last > 0


cdef inline Py_ssize_t _put_varint(char *out, uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 0
    while v >= 0x80:
        out[n] = <char>((v & 0x7F) | 0x80)
        v >>= 7
        n += 1
    out[n] = <char>v
    return n + 1


# Protobuf fields as proto3 serialises them: in field-number order, zero and
# empty values left out. ``out`` always has room (sized by the caller).

cdef inline Py_ssize_t _put_uint(char *out, char tag, uint64_t v) noexcept nogil:
    if v == 0:
        return 0
    out[0] = tag
    return 1 + _put_varint(out + 1, v)


cdef inline Py_ssize_t _put_str(char *out, char tag, const char *p, int32_t n) noexcept nogil:
    if n == 0:
        return 0
    out[0] = tag
    out[1] = <char>n  # names and modes are at most 64 bytes
    memcpy(out + 2, p, n)
    return 2 + n


cdef inline Py_ssize_t _put_message(char *out, char tag, const char *body, Py_ssize_t n) noexcept nogil:
    out[0] = tag
    cdef Py_ssize_t h = 1 + _put_varint(out + 1, <uint64_t>n)
    memcpy(out + h, body, n)
    return h + n


cdef inline Py_ssize_t _put_denial(char *out, uint32_t index, int reason) noexcept nogil:
    """Field 3 (Denial) of ReportBatchResponse."""
    cdef char body[16]
    cdef Py_ssize_t n = _put_uint(body, 0x08, index)
    n += _put_uint(body + n, 0x10, <uint64_t>reason)
    return _put_message(out, 0x1A, body, n)


cdef inline Py_ssize_t _put_degradation(char *out, uint32_t index, const char *mode, int32_t mode_len,
                                        uint32_t priority) noexcept nogil:
    """Field 7 (Degradation) of ReportBatchResponse."""
    cdef char body[48]
    cdef Py_ssize_t n = _put_uint(body, 0x08, index)
    n += _put_str(body + n, 0x12, mode, mode_len)
    n += _put_uint(body + n, 0x18, priority)
    return _put_message(out, 0x3A, body, n)


cdef inline Py_ssize_t _put_result(char *out, uint32_t index, int decision, int reason, const char *ct,
                                   int32_t ct_len, int64_t cost, int64_t balance, const char *mode,
                                   int32_t mode_len, uint32_t priority) noexcept nogil:
    """Field 8 (EventResult) of ReportBatchResponse."""
    cdef char body[160]
    cdef Py_ssize_t n = _put_uint(body, 0x08, index)
    n += _put_uint(body + n, 0x10, <uint64_t>decision)
    n += _put_uint(body + n, 0x18, <uint64_t>reason)
    n += _put_str(body + n, 0x22, ct, ct_len)
    n += _put_uint(body + n, 0x28, <uint64_t>cost)
    n += _put_uint(body + n, 0x30, <uint64_t>balance)
    n += _put_str(body + n, 0x3A, mode, mode_len)
    n += _put_uint(body + n, 0x40, priority)
    return _put_message(out, 0x42, body, n)


cdef inline int _keycmp(const char *a, Py_ssize_t an, const char *b, Py_ssize_t bn) noexcept nogil:
    """Byte order of two keys, a shorter prefix first (a loop: keys are short)."""
    cdef Py_ssize_t i, n = an if an < bn else bn
    for i in range(n):
        if a[i] != b[i]:
            return -1 if <uint8_t>a[i] < <uint8_t>b[i] else 1
    return -1 if an < bn else (1 if an > bn else 0)


cdef inline Py_ssize_t _varint_len(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef Py_ssize_t _put_dims(char *out, const Span *spans, int n) noexcept nogil:
    """A dimension set's canonical bytes: its entries, sorted by key and unique,
    as UsageEvent field 5, each with its key and its value (even when empty)."""
    cdef Py_ssize_t o = 0, body
    cdef int i
    for i in range(n):
        body = 2 + _varint_len(spans[i].key_len) + spans[i].key_len + _varint_len(spans[i].value_len) \
            + spans[i].value_len
        out[o] = 0x2A
        o += 1 + _put_varint(out + o + 1, <uint64_t>body)
        out[o] = 0x0A
        o += 1 + _put_varint(out + o + 1, <uint64_t>spans[i].key_len)
        memcpy(out + o, spans[i].key, spans[i].key_len)
        o += spans[i].key_len
        out[o] = 0x12
        o += 1 + _put_varint(out + o + 1, <uint64_t>spans[i].value_len)
        memcpy(out + o, spans[i].value, spans[i].value_len)
        o += spans[i].value_len
    return o


cdef inline int _scale(int64_t *qty, int precision) noexcept nogil:
    cdef int i
    for i in range(precision):
        if qty[0] > INT64_MAX // 10:
            return E_OVERFLOW
        qty[0] *= 10
    return E_OK


def _varint_bytes(uint64_t v):
    cdef char out[10]
    return PyBytes_FromStringAndSize(out, _put_varint(out, v))


def _dim_entry(bytes key, bytes value):
    """The body of one dimensions map entry, as protobuf encodes it."""
    return b"\x0a" + _varint_bytes(len(key)) + key + b"\x12" + _varint_bytes(len(value)) + value


cdef char *_dup(bytes b) except? NULL:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    cdef char *p = <char *>malloc(n + 1)
    if p == NULL:
        raise MemoryError()
    memcpy(p, PyBytes_AS_STRING(b), n)
    p[n] = 0
    return p


cdef inline Py_ssize_t _pow2_slots(Py_ssize_t entries) noexcept nogil:
    """Index slots for a table of ``entries``: a power of two, at least twice as many."""
    cdef Py_ssize_t n = 16
    while n < entries * 2:
        n *= 2
    return n


cdef void *_resize(void *p, size_t n) except NULL:
    cdef void *q = realloc(p, n if n else 1)
    if q == NULL:
        raise MemoryError()
    return q


cdef const char *_FIELD_NAMES[8]
_FIELD_NAMES[0] = b""
_FIELD_NAMES[1] = b"customer_id"
_FIELD_NAMES[2] = b"meter"
_FIELD_NAMES[3] = b"quantity"
_FIELD_NAMES[4] = b"quantity_decimal"
_FIELD_NAMES[5] = b"dimensions"
_FIELD_NAMES[6] = b"timestamp_ms"
_FIELD_NAMES[7] = b"idempotency_key"

_BATCH_FIELDS = ("batch", "client_id", "sequence", "events")

_MESSAGES = {
    E_TRUNCATED: "malformed protobuf: truncated",
    E_WIRE_TYPE: "malformed protobuf: wrong wire type",
    E_EMPTY: "must not be empty",
    E_TOO_LONG: "too long",
    E_CHARSET: "must be printable ASCII without spaces",
    E_NEGATIVE: "must not be negative",
    E_DECIMAL: "must be a decimal like 12 or 1.25 with no more decimals than the meter's precision",
    E_OVERFLOW: "cost or quantity overflows 64 bits",
    E_TOO_MANY: "too many entries",
    E_VARINT: "malformed protobuf: bad varint",
    E_UTF8: "must be valid UTF-8",
    E_TENANT: "is not one of this token's customers",
    E_FIELD0: "malformed protobuf: field number 0",
}
