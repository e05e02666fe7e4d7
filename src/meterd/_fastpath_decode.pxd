# The wire decoder (included by _fastpath.pxd; implemented in _fastpath_decode.pxi):
# ReportBatchRequest and ReportRequest into rated events, validated in full
# before anything is applied.


# Decoder error codes; the message (corespec) is looked up only on the error path.
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
    E_EVENT_TIME = 18
    E_LATE_LATEST = 19
    E_BOTH = 20              # meter or quantity given with quantities
    E_PARTS = 21             # more than QUANTITIES_MAX quantities
    E_PART_GAUGE = 22        # a gauge among quantities
    E_PART_TWICE = 23        # a meter twice among quantities
    E_PART_CREDIT = 24       # quantities in two credit types
    E_BATCH_FULL = 25        # the batch's events and quantities are more than batch_events_max
    E_CONDITION = 26         # a request that gives a dimension a condition sets
    E_LATE_GAUGE = 27        # a max or unique_count event dated before the previous usage window

# UsageEvent's fields, by number (corespec.EVENT_FIELDS names them).
cdef enum:
    F_NONE = 0
    F_CUSTOMER_ID = 1
    F_METER = 2
    F_QUANTITY = 3
    F_QUANTITY_DECIMAL = 4
    F_DIMENSIONS = 5
    F_TIMESTAMP_MS = 6
    F_IDEMPOTENCY_KEY = 7
    F_QUANTITIES = 8


# One dimensions map entry of the event being decoded: its key and value in the
# caller's buffer.
cdef struct Span:
    const char *key
    const char *value
    int32_t key_len
    int32_t value_len


# One decoded event, pointing into the caller's buffer. An event of several
# quantities takes as many entries, one after the other: the first (its head)
# counts them in nparts, the others (0 there) repeat its customer, account,
# dimension set and window with their own meter, rate, quantity, cost and aggregate.
cdef struct Event:
    const char *cust
    int32_t cust_len
    int32_t meter
    int32_t rate
    int32_t account
    int64_t quantity
    i128 fine               # cost in 1/D nano-units
    int32_t err
    int32_t err_field        # the field the error is about (F_*), or F_NONE
    const char *detail
    int32_t detail_len
    int32_t detail_dim       # E_NO_PRICE: the price dimension it is about
    int64_t window           # the usage window its timestamp_ms (or the clock) puts it in; E_EVENT_TIME: the timestamp
    const char *uval        # unique_count meters: the distinct value, in the caller's buffer
    int32_t ulen
    Py_ssize_t coff         # the canonical dimension set, in cbuf
    int32_t clen
    uint64_t chash          # its hash, for bucketing only
    int32_t agg             # its aggregate, found or made before anything is applied; -1 for none
    bint keyed              # it has an idempotency key (not empty)
    int32_t nparts          # the head of an event: its entries (1, or its quantities); 0 for the others
    int32_t err_part        # the quantity an error is about, or -1


# A condition of the catalog: the dimension meterd sets from a request's quantity of a meter.
cdef struct Condition:
    const char *key
    int32_t key_len
    int32_t meter
    int32_t n                                # values
    int64_t bound[CONDITION_VALUES_MAX]      # up to (inclusive) of each value but the last
    const char *value[CONDITION_VALUES_MAX]
    int32_t value_len[CONDITION_VALUES_MAX]


# What the field loop of an event leaves for the checks after it.
cdef struct Fields:
    const char *mname        # the meter's name
    Py_ssize_t mlen
    int qkind                # 0: no quantity, 1: quantity, 2: quantity_decimal
    int64_t qty
    const char *dec
    Py_ssize_t dec_len
    int nspans               # dimension entries, in spans
    int64_t ts               # timestamp_ms (0: none)
    int nparts               # quantities entries, in _Decoder.part_start and part_len


cdef class _Decoder(_Aggregates):
    cdef int client_id_max
    cdef int batch_max
    cdef int dims_max
    cdef int dim_key_max
    cdef int dim_value_max
    cdef Event *scratch          # the events of the batch being decoded
    cdef Span *spans             # the dimension entries of the event being decoded, sorted by key
    cdef Condition conds[CONDITIONS_MAX]
    cdef int32_t n_cond
    cdef Py_ssize_t cond_room     # the most one event's condition entries take in cbuf
    cdef list cond_names          # the bytes the conditions point into
    cdef list cond_values
    cdef list meter_names_of      # the meters' names, for the messages of conditions
    cdef Py_ssize_t part_start[QUANTITIES_MAX]  # its quantities' messages, in the caller's buffer
    cdef Py_ssize_t part_len[QUANTITIES_MAX]
    cdef char *cbuf              # canonical dimension sets of the events being decoded
    cdef Py_ssize_t cbuf_len
    cdef Py_ssize_t cbuf_cap
    # While a call runs for a data-plane token: the customer id prefix it may meter.
    cdef bytes tenant
    cdef const char *tenant_ptr
    cdef Py_ssize_t tenant_len   # -1: no restriction

    cdef int _init_decoder(self, dict limits, list conditions) except -1
    cdef int _init_conditions(self, list conditions) except -1
    cdef int _set_tenant(self, bytes tenant) except -1
    cdef int _cbuf_reserve(self, Py_ssize_t data_len) except -1
    # one UsageEvent
    cdef int _decode_event(self, const char *buf, Py_ssize_t start, Py_ssize_t end, Event *ev,
                           Py_ssize_t room) noexcept
    cdef object _event_error(self, Event *ev, str prefix)
    # requests
    cdef int _decode_batch(self, const char *buf, Py_ssize_t end, uint64_t *seq,
                           Py_ssize_t *cid_start, Py_ssize_t *cid_len, Py_ssize_t *nev,
                           Py_ssize_t *nent, uint64_t *details) except -1
    cdef int _check_client_id(self, const char *p, Py_ssize_t n) except -1
