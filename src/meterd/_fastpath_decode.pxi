# The wire decoder, the fifth layer of Core (declared in _fastpath_decode.pxd):
# protobuf's wire primitives, then UsageEvent, ReportBatchRequest and
# ReportRequest into rated events in the scratch table, validated in full
# before anything is applied. Errors are codes (E_*) until a request is refused:
# only then is a message (corespec) looked up.


# What each decoder code says; the codes with a message of their own (an unknown
# meter, no price, too many decimals, no unique dimension) are in _event_error.
_MESSAGES = {
    E_TRUNCATED: spec.MSG_TRUNCATED,
    E_WIRE_TYPE: spec.MSG_WIRE_TYPE,
    E_EMPTY: spec.MSG_EMPTY,
    E_TOO_LONG: spec.MSG_TOO_LONG,
    E_CHARSET: spec.MSG_CHARSET,
    E_NEGATIVE: spec.MSG_NEGATIVE,
    E_DECIMAL: spec.MSG_DECIMAL,
    E_OVERFLOW: spec.MSG_OVERFLOW,
    E_TOO_MANY: spec.MSG_TOO_MANY,
    E_VARINT: spec.MSG_VARINT,
    E_UTF8: spec.MSG_UTF8,
    E_TENANT: spec.MSG_TENANT,
    E_FIELD0: spec.MSG_FIELD0,
    E_BOTH: spec.MSG_BOTH_QUANTITIES,
    E_PARTS: spec.MSG_PARTS,
    E_PART_GAUGE: spec.MSG_PART_GAUGE,
    E_LATE_GAUGE: spec.MSG_LATE_GAUGE,
}


# ---- protobuf's wire format ------------------------------------------------------

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


# ---- values ------------------------------------------------------------------------

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


cdef inline bint _id_charset_ok(const char *p, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if <uint8_t>p[i] < 0x21 or <uint8_t>p[i] > 0x7E:
            return False
    return True


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


cdef inline int _scale(int64_t *qty, int precision) noexcept nogil:
    cdef int i
    for i in range(precision):
        if qty[0] > INT64_MAX // 10:
            return E_OVERFLOW
        qty[0] *= 10
    return E_OK


cdef inline int _keycmp(const char *a, Py_ssize_t an, const char *b, Py_ssize_t bn) noexcept nogil:
    """Byte order of two keys, a shorter prefix first (a loop: keys are short)."""
    cdef Py_ssize_t i, n = an if an < bn else bn
    for i in range(n):
        if a[i] != b[i]:
            return -1 if <uint8_t>a[i] < <uint8_t>b[i] else 1
    return -1 if an < bn else (1 if an > bn else 0)


cdef class _Decoder(_Aggregates):
    """The wire decoder; see _fastpath.pxd."""

    def __cinit__(self):
        self.tenant_len = -1

    def __dealloc__(self):
        free(self.scratch); free(self.spans); free(self.cbuf)

    cdef int _init_decoder(self, dict limits, list conditions) except -1:
        """The request and dimension limits, the conditions, and scratch room for a batch; see Core.__init__."""
        self.client_id_max = limits["client_id_bytes_max"]
        self.batch_max = limits["batch_events_max"]
        self.dims_max = limits["dimensions_max"]
        self.dim_key_max = limits["dimension_key_bytes_max"]
        self.dim_value_max = limits["dimension_value_bytes_max"]
        if not (0 <= self.dims_max <= spec.DIMENSIONS_LIMIT and 1 <= self.dim_key_max <= spec.DIMENSION_KEY_BYTES_LIMIT
                and 0 <= self.dim_value_max <= spec.DIMENSION_VALUE_BYTES_LIMIT):
            raise ValueError(spec.MSG_DIMS_LIMITS)
        self._init_conditions(conditions or [])
        self.spans = <Span *>calloc(self.dims_max + CONDITIONS_MAX + 1, sizeof(Span))  # the request's, then ours
        self.scratch = <Event *>calloc(max(self.batch_max, QUANTITIES_MAX), sizeof(Event))
        if self.spans == NULL or self.scratch == NULL:
            raise MemoryError()
        return 0

    cdef int _init_conditions(self, list conditions) except -1:
        """(dimension key, meter, bounds, values) each: see corespec.ConditionRow."""
        cdef Condition *c
        cdef Py_ssize_t i, k
        cdef bytes name, value
        if len(conditions) > CONDITIONS_MAX:
            raise ValueError(spec.MSG_CONDITIONS)
        self.cond_names = []
        self.cond_values = []
        self.meter_names_of = [PyBytes_FromStringAndSize(self.meters[i].name, self.meters[i].name_len)
                               for i in range(self.n_meters)]
        for i, (key, meter, bounds, values) in enumerate(conditions):
            if not (0 < len(key) <= spec.DIMENSION_KEY_BYTES_LIMIT and 0 <= meter < self.n_meters
                    and 2 <= len(values) <= CONDITION_VALUES_MAX and len(bounds) == len(values) - 1
                    and all(bounds[k] < bounds[k + 1] for k in range(len(bounds) - 1))
                    and all(0 < len(v) <= spec.DIMENSION_VALUE_BYTES_LIMIT for v in values)):
                raise ValueError(spec.MSG_CONDITIONS)
            c = &self.conds[i]
            name = bytes(key)
            self.cond_names.append(name)
            c.key = PyBytes_AS_STRING(name)
            c.key_len = <int32_t>len(name)
            c.meter = <int32_t>meter
            c.n = <int32_t>len(values)
            for k in range(len(bounds)):
                c.bound[k] = bounds[k]
            for k in range(len(values)):
                value = bytes(values[k])
                self.cond_values.append(value)  # kept: c.value points into it
                c.value[k] = PyBytes_AS_STRING(value)
                c.value_len[k] = <int32_t>len(value)
        self.n_cond = <int32_t>len(conditions)
        # the most an event's condition entries take in canonical form: a tag and three lengths of at most
        # 3 bytes each (a key and a value are at most 64 KiB), the key and its longest value
        self.cond_room = sum(12 + len(key) + max(len(v) for v in values) for key, _, _, values in conditions)
        return 0

    cdef int _set_tenant(self, bytes tenant) except -1:
        self.tenant = tenant
        if tenant is None:
            self.tenant_len = -1
        else:
            self.tenant_ptr = PyBytes_AS_STRING(tenant)
            self.tenant_len = PyBytes_GET_SIZE(tenant)
        return 0

    cdef int _cbuf_reserve(self, Py_ssize_t data_len) except -1:
        """Room in cbuf for the canonical dimension sets of a message of
        ``data_len`` bytes: an entry takes at least 5 bytes on the wire and at
        most 2 more in canonical form (its value written even when empty); and
        the conditions' entries of each event (an event that is rated takes at
        least 5 bytes: its tag, length and customer id)."""
        cdef Py_ssize_t need = 2 * data_len + 64
        if self.cond_room:
            need += (data_len // 5 + 1) * self.cond_room
        self.cbuf_len = 0
        if need > self.cbuf_cap or (self.cbuf_cap > 1 << 22 and need < self.cbuf_cap // 8):
            self.cbuf = <char *>_resize(self.cbuf, need)
            self.cbuf_cap = need
        return 0

    # ---- one UsageEvent ------------------------------------------------------------

    cdef int _decode_event(self, const char *buf, Py_ssize_t start, Py_ssize_t end, Event *ev,
                           Py_ssize_t room) noexcept:
        """Decode and rate one UsageEvent into ``ev`` (and the entries after it, for
        its quantities: at most ``room`` in all); on error ev.err, ev.err_field and
        ev.err_part say why. Its canonical dimension set goes to cbuf, which has
        room (see _cbuf_reserve)."""
        cdef Fields f
        cdef int rc
        cdef int32_t k
        ev.cust = NULL
        ev.cust_len = 0
        ev.meter = -1
        ev.err = E_OK
        ev.err_field = F_NONE
        ev.detail = NULL
        ev.detail_len = 0
        ev.uval = NULL
        ev.ulen = 0
        ev.clen = 0
        ev.coff = self.cbuf_len
        ev.agg = -1
        ev.keyed = False
        ev.window = self.cur_window
        ev.nparts = 1
        ev.err_part = -1
        rc = _event_fields(self, buf, start, end, ev, &f)
        if rc == E_OK:
            rc = _event_customer(self, ev)
        if rc == E_OK and f.nparts > 0:
            rc = _event_parts(self, buf, ev, &f, room)
        elif rc == E_OK:
            rc = _event_one(self, ev, &f)
        if rc:
            ev.err = rc
            return rc
        ev.clen = <int32_t>_put_dims(self.cbuf + ev.coff, self.spans, f.nspans)
        ev.chash = _hash_set(self.cbuf + ev.coff, ev.clen)
        self.cbuf_len += ev.clen
        ev.err_field = F_NONE
        if ev.nparts > 1:
            _parts_set(ev)
        return E_OK

    cdef object _event_error(self, Event *ev, str prefix):
        name = spec.EVENT_FIELDS[ev.err_field]
        if ev.err_part >= 0 and ev.err_field != F_DIMENSIONS and ev.err_field != F_TIMESTAMP_MS:  # a quantity's
            prefix += "quantities[%d]." % ev.err_part
        field = prefix + name if name else prefix.rstrip(".") or "event"
        cdef Meter *m
        if ev.err == E_UNKNOWN_METER:
            return InvalidInput(field, spec.unknown_meter_message(PyBytes_FromStringAndSize(ev.detail, ev.detail_len)))
        if ev.err == E_NO_PRICE:
            m = &self.meters[ev.meter]
            key = b"" if m.n_dims == 0 else PyBytes_FromStringAndSize(m.dim_key[ev.detail_dim],
                                                                      m.dim_key_len[ev.detail_dim])
            return InvalidInput(field, spec.no_price_message(
                PyBytes_FromStringAndSize(m.name, m.name_len), key,
                None if ev.detail == NULL else PyBytes_FromStringAndSize(ev.detail, ev.detail_len)))
        if ev.err == E_PRECISION:
            m = &self.meters[ev.meter]
            return InvalidInput(field, spec.precision_message(PyBytes_FromStringAndSize(m.name, m.name_len),
                                                              m.precision))
        if ev.err == E_CONDITION:
            return InvalidInput(field, spec.condition_message(
                self.cond_names[ev.detail_dim], self.meter_names_of[self.conds[ev.detail_dim].meter]))
        if ev.err == E_PART_TWICE:
            m = &self.meters[ev.meter]
            return InvalidInput(field, spec.part_twice_message(PyBytes_FromStringAndSize(m.name, m.name_len)))
        if ev.err == E_PART_CREDIT:
            m = &self.meters[ev.meter]
            return InvalidInput(field, spec.part_credit_message(
                PyBytes_FromStringAndSize(m.name, m.name_len), self.credit_names[self.rates[ev.rate].ct],
                self.credit_names[ev.detail_dim]))
        if ev.err == E_NO_UNIQUE:
            return InvalidInput(field, spec.no_unique_message(PyBytes_FromStringAndSize(ev.detail, ev.detail_len)))
        if ev.err == E_TOO_LONG and ev.err_field == F_CUSTOMER_ID:
            return InvalidInput(field, spec.MSG_ID_TOO_LONG % self.id_max)
        if ev.err == E_LATE_LATEST:
            return InvalidInput(field, spec.MSG_LATE_LATEST)
        if ev.err == E_EVENT_TIME:
            return InvalidInput(field, spec.event_time_message(ev.window, self.now_ms, self.late_ms))
        if ev.err == E_TENANT:
            return Forbidden(field, _MESSAGES[ev.err])
        return InvalidInput(field, _MESSAGES[ev.err])

    # ---- requests --------------------------------------------------------------------

    cdef int _decode_batch(self, const char *buf, Py_ssize_t end, uint64_t *seq,
                           Py_ssize_t *cid_start, Py_ssize_t *cid_len, Py_ssize_t *nev,
                           Py_ssize_t *nent, uint64_t *details) except -1:
        """Decode a ReportBatchRequest into the scratch events (``nev`` of them, in
        ``nent`` entries); raise InvalidInput."""
        cdef Py_ssize_t pos = 0, s, n
        cdef uint64_t key
        cdef int wt, rc
        cdef Event *ev
        nev[0] = 0
        nent[0] = 0
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
                    raise InvalidInput(spec.BATCH_FIELDS[key], _MESSAGES[E_WIRE_TYPE])
                rc = _read_len(buf, end, &pos, &s, &n)
                if rc:
                    raise InvalidInput(spec.BATCH_FIELDS[key], _MESSAGES[rc])
                if key == 1:
                    if not _utf8_ok(<const uint8_t *>buf + s, n):
                        raise InvalidInput("client_id", _MESSAGES[E_UTF8])
                    cid_start[0] = s
                    cid_len[0] = n
                    continue
                if nent[0] >= self.batch_max:
                    raise InvalidInput("events", spec.MSG_BATCH_TOO_LONG % self.batch_max)
                ev = &self.scratch[nent[0]]
                if _Decoder._decode_event(self, buf, s, s + n, ev, self.batch_max - nent[0]) != E_OK:
                    if ev.err == E_BATCH_FULL:
                        raise InvalidInput("events", spec.MSG_BATCH_TOO_LONG % self.batch_max)
                    raise self._event_error(ev, "events[%d]." % nev[0])
                nev[0] += 1
                nent[0] += ev.nparts
            elif key == 2 or key == 4:
                if wt != 0:
                    raise InvalidInput("sequence" if key == 2 else "details", _MESSAGES[E_WIRE_TYPE])
                rc = _read_varint(buf, end, &pos, seq if key == 2 else details)
                if rc:
                    raise InvalidInput("sequence" if key == 2 else "details", _MESSAGES[rc])
            else:
                rc = _skip(buf, end, &pos, wt)
                if rc:
                    raise InvalidInput("batch", _MESSAGES[rc])
        return self._check_client_id(buf + cid_start[0], cid_len[0])

    cdef int _check_client_id(self, const char *p, Py_ssize_t n) except -1:
        if n > self.client_id_max or not _id_charset_ok(p, n):
            raise InvalidInput("client_id", spec.MSG_CLIENT_ID % self.client_id_max)
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
                raise InvalidInput(spec.BATCH_FIELDS[key] if 1 <= key <= 3 else "batch", _MESSAGES[rc])
        self._check_client_id(buf + cs, cn)
        return PyBytes_FromStringAndSize(buf + cs, cn), seq


# ---- helpers of _Decoder -----------------------------------------------------------
# Functions rather than C methods: a C method's address is in the vtable, which
# keeps the C compiler from inlining it into its caller, and these are on the
# hot path (each is called from one or two places).

cdef inline int _event_fields(_Decoder self, const char *buf, Py_ssize_t pos, Py_ssize_t end, Event *ev,
                              Fields *f) noexcept:
    """The field loop: strings checked for UTF-8, dimensions into spans; the
    customer id and whether there is an idempotency key into ``ev``, the meter's
    name and the quantity into ``f``. As protobuf, the last occurrence of a field
    wins and unknown fields are skipped."""
    cdef Py_ssize_t s, n
    cdef uint64_t key, v
    cdef int wt, rc
    memset(f, 0, sizeof(Fields))
    while pos < end:
        rc = _read_tag(buf, end, &pos, &key)
        if rc:
            return rc
        wt = key & 7
        key >>= 3
        if key == 0:
            return E_FIELD0
        if key == F_CUSTOMER_ID or key == F_METER or key == F_QUANTITY_DECIMAL or key == F_DIMENSIONS \
                or key == F_IDEMPOTENCY_KEY:
            if wt != 2:
                ev.err_field = <int32_t>key
                return E_WIRE_TYPE
            rc = _read_len(buf, end, &pos, &s, &n)
            if rc:
                return rc
            if key == F_DIMENSIONS:
                rc = _decode_dim(self, buf, s, s + n, ev, &f.nspans)
                if rc:
                    return rc
                continue
            if not _utf8_ok(<const uint8_t *>buf + s, n):
                ev.err_field = <int32_t>key  # every string field, as protobuf checks each occurrence
                return E_UTF8
            if key == F_CUSTOMER_ID:
                ev.cust = buf + s
                ev.cust_len = <int32_t>n if n < 0x7FFFFFFF else 0x7FFFFFFF
            elif key == F_METER:
                f.mname = buf + s
                f.mlen = n
            elif key == F_QUANTITY_DECIMAL:
                f.qkind = 2
                f.dec = buf + s
                f.dec_len = n
            else:  # F_IDEMPOTENCY_KEY: its last occurrence is the one protobuf reads
                ev.keyed = n > 0
        elif key == F_QUANTITY or key == F_TIMESTAMP_MS:
            if wt != 0:
                ev.err_field = <int32_t>key
                return E_WIRE_TYPE
            rc = _read_varint(buf, end, &pos, &v)
            if rc:
                ev.err_field = <int32_t>key
                return rc
            if key == F_QUANTITY:
                f.qkind = 1
                f.qty = <int64_t>v
            elif <int64_t>v < 0:
                ev.err_field = F_TIMESTAMP_MS
                return E_NEGATIVE
            else:
                f.ts = <int64_t>v
        elif key == F_QUANTITIES:  # decoded once the dimensions are all known
            if wt != 2:
                ev.err_field = F_QUANTITIES
                return E_WIRE_TYPE
            rc = _read_len(buf, end, &pos, &s, &n)
            if rc:
                return rc
            if f.nparts >= QUANTITIES_MAX:
                ev.err_field = F_QUANTITIES
                return E_PARTS
            self.part_start[f.nparts] = s
            self.part_len[f.nparts] = n
            f.nparts += 1
        else:
            rc = _skip(buf, end, &pos, wt)
            if rc:
                return rc
    return E_OK


cdef void _parts_set(Event *ev) noexcept nogil:
    """The quantities of an event share its canonical dimension set."""
    cdef int32_t k
    for k in range(1, ev.nparts):
        ev[k].clen = ev.clen
        ev[k].chash = ev.chash


# The helpers of _event_one come in two copies, one for an event's own quantity
# (``Copy`` char, called by _event_one) and one for each quantity of an event of
# several (short, called by _event_parts): with one caller each, gcc inlines the
# first into _decode_event (called from both places, it inlined neither, and the
# hot path took about 50 more instructions an event, callgrind).
ctypedef fused Copy:
    char
    short


cdef inline int _event_one(_Decoder self, Event *ev, Fields *f) noexcept nogil:
    """The meter, quantity, conditions, rate and window of an event of one meter."""
    cdef int rc = _event_meter(self, ev, f, <char>0)
    if rc == E_OK:
        rc = _event_quantity(self, ev, f, <char>0)
    if rc == E_OK and self.n_cond:
        rc = _derive(self, ev, 1, f)
    if rc == E_OK:
        rc = _event_rate(self, ev, f, <char>0)
    if rc == E_OK:
        rc = _event_time(self, ev, f, <char>0)
    return rc


cdef int _event_parts(_Decoder self, const char *buf, Event *ev, Fields *f, Py_ssize_t room) noexcept nogil:
    """An event of several quantities: each in an entry of its own from ``ev`` on,
    rated as an event of its meter with the event's customer, dimensions (its
    conditions' among them, from all its quantities) and time. Its meters are
    summed or counted, each once, and in one credit type. On an error, ``ev`` is
    the quantity it is about (err_part)."""
    cdef Fields pf
    cdef Event *p
    cdef int32_t k
    cdef int rc = E_OK
    if f.mname != NULL or f.qkind != 0:
        ev.err_field = F_METER if f.mname != NULL else (F_QUANTITY if f.qkind == 1 else F_QUANTITY_DECIMAL)
        return E_BOTH
    if f.nparts > room:
        return E_BATCH_FULL
    for k in range(f.nparts):  # each quantity's meter and quantity
        p = &ev[k]
        if k > 0:
            p[0] = ev[0]
            p.nparts = 0
        pf = f[0]
        rc = _part_fields(buf, self.part_start[k], self.part_start[k] + self.part_len[k], p, &pf)
        if rc == E_OK:
            rc = _event_meter(self, p, &pf, <short>0)
        if rc == E_OK:
            rc = _event_quantity(self, p, &pf, <short>0)
        if rc:
            return _part_error(ev, k, rc)
    if self.n_cond:
        rc = _derive(self, ev, f.nparts, f)
        if rc:
            return rc
    for k in range(f.nparts):  # then their rates
        p = &ev[k]
        rc = _event_rate(self, p, f, <short>0)
        if rc == E_OK:
            rc = _event_time(self, p, f, <short>0)
        if rc == E_OK:
            rc = _part_check(self, ev, k)
        if rc:
            return _part_error(ev, k, rc)
    ev.nparts = f.nparts
    return E_OK


cdef inline int _part_error(Event *ev, int32_t k, int rc) noexcept nogil:
    """An error about quantity ``k`` of an event: the head tells it."""
    if k > 0:
        ev[0] = ev[k]
    ev.err_part = k
    return rc


cdef int _part_check(_Decoder self, Event *ev, int32_t k) noexcept nogil:
    """Quantity ``k`` of an event, rated: a summed or counted meter, in the credit type of
    the first, and not one of those before it."""
    cdef Event *p = &ev[k]
    cdef int32_t j
    p.err_field = F_METER
    if self.meters[p.meter].agg > AGG_COUNT:
        return E_PART_GAUGE
    if k > 0 and self.rates[p.rate].ct != self.rates[ev.rate].ct:
        p.detail_dim = self.rates[ev.rate].ct
        return E_PART_CREDIT
    for j in range(k):
        if ev[j].meter == p.meter:
            return E_PART_TWICE
    p.err_field = F_NONE
    return E_OK


cdef int _derive(_Decoder self, Event *ev, int32_t n, Fields *f) noexcept nogil:
    """The dimensions the catalog's conditions set, from the event's quantities (``n``
    entries from ``ev``, their meters and quantities decoded), among its spans; a
    condition whose meter the event has not is left unset. The request may not set one."""
    cdef int32_t c, j, v
    cdef Condition *cond
    cdef const char *given
    cdef Py_ssize_t given_len
    for c in range(self.n_cond):
        cond = &self.conds[c]
        given = NULL
        _span_value(self, f.nspans, cond.key, cond.key_len, &given, &given_len)
        if given != NULL:
            ev.err_field = F_DIMENSIONS
            ev.detail_dim = c
            return E_CONDITION
        for j in range(n):
            if ev[j].meter == cond.meter:
                v = 0
                while v < cond.n - 1 and ev[j].quantity > cond.bound[v]:
                    v += 1
                _span_put(self, cond.key, cond.key_len, cond.value[v], cond.value_len[v], &f.nspans)
                break
    return E_OK


cdef void _span_put(_Decoder self, const char *key, Py_ssize_t kn, const char *value, Py_ssize_t vn,
                    int *nspans) noexcept nogil:
    """A condition's entry among the spans, in key order (there is room: see _init_decoder)."""
    cdef int i = nspans[0]
    while i > 0 and _keycmp(key, kn, self.spans[i - 1].key, self.spans[i - 1].key_len) < 0:
        self.spans[i] = self.spans[i - 1]
        i -= 1
    self.spans[i].key = key
    self.spans[i].key_len = <int32_t>kn
    self.spans[i].value = value
    self.spans[i].value_len = <int32_t>vn
    nspans[0] += 1


cdef inline int _part_fields(const char *buf, Py_ssize_t pos, Py_ssize_t end, Event *ev, Fields *f) noexcept nogil:
    """A Quantity's field loop: its meter's name and its quantity into ``f``, as
    _event_fields does for an event's own."""
    cdef Py_ssize_t s, n
    cdef uint64_t key, v
    cdef int wt, rc
    f.mname = NULL
    f.mlen = 0
    f.qkind = 0
    f.qty = 0
    ev.err_field = F_NONE
    while pos < end:
        rc = _read_tag(buf, end, &pos, &key)
        if rc:
            return rc
        wt = key & 7
        key >>= 3
        if key == 0:
            return E_FIELD0
        if key == 1 or key == 3:
            ev.err_field = F_METER if key == 1 else F_QUANTITY_DECIMAL
            if wt != 2:
                return E_WIRE_TYPE
            rc = _read_len(buf, end, &pos, &s, &n)
            if rc:
                return rc
            if not _utf8_ok(<const uint8_t *>buf + s, n):
                return E_UTF8
            if key == 1:
                f.mname = buf + s
                f.mlen = n
            else:
                f.qkind = 2
                f.dec = buf + s
                f.dec_len = n
        elif key == 2:
            ev.err_field = F_QUANTITY
            if wt != 0:
                return E_WIRE_TYPE
            rc = _read_varint(buf, end, &pos, &v)
            if rc:
                return rc
            f.qkind = 1
            f.qty = <int64_t>v
        else:
            rc = _skip(buf, end, &pos, wt)
            if rc:
                return rc
        ev.err_field = F_NONE
    return E_OK


cdef inline int _event_customer(_Decoder self, Event *ev) noexcept nogil:
    """The customer id: present, short enough, printable, and the token's."""
    ev.err_field = F_CUSTOMER_ID
    if ev.cust_len == 0:
        return E_EMPTY
    if ev.cust_len > self.id_max:
        return E_TOO_LONG
    if not _id_charset_ok(ev.cust, ev.cust_len):
        return E_CHARSET
    if self.tenant_len >= 0 and (ev.cust_len < self.tenant_len
                                 or memcmp(ev.cust, self.tenant_ptr, self.tenant_len) != 0):
        return E_TENANT
    return E_OK


cdef inline int _event_meter(_Decoder self, Event *ev, Fields *f, Copy copy) noexcept nogil:
    """The meter, by name (meters are few: a loop)."""
    cdef int32_t i
    ev.err_field = F_METER
    for i in range(self.n_meters):
        if self.meters[i].name_len == f.mlen and memcmp(self.meters[i].name, f.mname, f.mlen) == 0:
            ev.meter = i
            return E_OK
    ev.detail = f.mname
    ev.detail_len = <int32_t>(f.mlen if f.mlen < QUOTE_BYTES_MAX else QUOTE_BYTES_MAX)
    return E_UNKNOWN_METER


cdef inline int _event_quantity(_Decoder self, Event *ev, Fields *f, Copy copy) noexcept nogil:
    """The quantity in the meter's smallest units, from either of its fields."""
    cdef Meter *m = &self.meters[ev.meter]
    cdef int rc = E_OK
    if f.qkind == 2:
        ev.err_field = F_QUANTITY_DECIMAL
        rc = _parse_decimal(f.dec, f.dec_len, m.precision, &f.qty)
    else:
        ev.err_field = F_QUANTITY
        if f.qty < 0:
            return E_NEGATIVE
        if m.precision > 0:
            rc = _scale(&f.qty, m.precision)
    ev.quantity = f.qty
    return rc


cdef inline int _event_rate(_Decoder self, Event *ev, Fields *f, Copy copy) noexcept nogil:
    """The rate (of the entries whose key is the meter's price dimension, the
    last wins, as in protobuf's map), the distinct value of a unique_count
    meter, and the cost."""
    cdef Meter *m = &self.meters[ev.meter]
    cdef const char *dim_value = NULL
    cdef Py_ssize_t dim_len = 0
    cdef const char *value[PRICE_DIMENSIONS_MAX]
    cdef int32_t value_len[PRICE_DIMENSIONS_MAX]
    cdef int32_t k
    cdef int64_t qty = ev.quantity
    if m.n_dims > 0:
        for k in range(m.n_dims):
            dim_value = NULL
            dim_len = 0
            _span_value(self, f.nspans, m.dim_key[k], m.dim_key_len[k], &dim_value, &dim_len)
            if dim_value == NULL:  # priced as its default value, if it has one
                dim_value = m.dim_default[k]
                dim_len = m.dim_default_len[k]
            value[k] = dim_value
            value_len[k] = <int32_t>dim_len
        ev.rate = _Accounts._find_rate(self, ev.meter, value, value_len)
    else:
        ev.rate = m.rate_default
    if ev.rate < 0:
        ev.err_field = F_DIMENSIONS
        k = _Accounts._no_price_pos(self, ev.meter, value, value_len) if m.n_dims > 0 else 0
        ev.detail_dim = k
        ev.detail = value[k] if m.n_dims > 0 else NULL
        ev.detail_len = value_len[k] if m.n_dims > 0 else 0
        return E_NO_PRICE
    if m.agg == AGG_COUNT:
        ev.quantity = qty = 1  # a count meter counts events; its price is per event
    if _round_up(&qty, m.increment):  # billed in whole increments
        ev.err_field = F_QUANTITY
        return E_OVERFLOW
    ev.quantity = qty
    if m.agg == AGG_UNIQUE:
        dim_value = NULL
        _span_value(self, f.nspans, m.uniq_key, m.uniq_key_len, &dim_value, &dim_len)
        if dim_value == NULL:
            ev.err_field = F_DIMENSIONS
            ev.detail = m.uniq_key
            ev.detail_len = m.uniq_key_len
            return E_NO_UNIQUE
        ev.uval = dim_value
        ev.ulen = <int32_t>dim_len
        ev.quantity = 0  # a unique_count meter has no quantity of its own
    if m.agg == AGG_MAX or m.agg == AGG_LATEST or m.agg == AGG_UNIQUE:
        ev.fine = 0  # gauges are charged on their period's value, at the period's end
    elif _Accounts._fine(self, ev.rate, qty, &ev.fine):
        ev.err_field = F_QUANTITY
        return E_OVERFLOW
    return E_OK


cdef inline int _event_time(_Decoder self, Event *ev, Fields *f, Copy copy) noexcept nogil:
    """The usage window of the event's timestamp_ms, within the distances allowed
    from the clock, or the clock's when it has none (0)."""
    if f.ts == 0:
        ev.window = self.cur_window
        return E_OK
    if (f.ts < self.now_ms and self.now_ms - f.ts > self.late_ms) or (f.ts > self.now_ms
                                                                      and f.ts - self.now_ms > self.early_ms):
        ev.err_field = F_TIMESTAMP_MS
        ev.window = f.ts
        return E_EVENT_TIME
    ev.window = f.ts - f.ts % self.window_ms
    if ev.window < self.cur_window and self.meters[ev.meter].agg == AGG_LATEST:
        ev.err_field = F_TIMESTAMP_MS
        return E_LATE_LATEST
    # Gauges count in the period they are served in (a roll charges them): one window of slack
    # for clocks, no more (the ledger charges them by their windows in ledger mode). Not in a
    # replay (no limits: what was accepted, an older meterd's too, is applied again).
    if ev.window < self.cur_window - self.window_ms and self.late_ms != INT64_MAX and (
            self.meters[ev.meter].agg == AGG_MAX or self.meters[ev.meter].agg == AGG_UNIQUE):
        ev.err_field = F_TIMESTAMP_MS
        return E_LATE_GAUGE
    return E_OK


cdef inline void _span_value(_Decoder self, int nspans, const char *want, Py_ssize_t want_len,
                             const char **value, Py_ssize_t *value_len) noexcept nogil:
    """The value of the entry whose key is ``want`` (entries are unique by key), if any."""
    cdef int i
    for i in range(nspans):
        if self.spans[i].key_len == want_len and memcmp(self.spans[i].key, want, want_len) == 0:
            value[0] = self.spans[i].value
            value_len[0] = self.spans[i].value_len
            return


cdef inline int _decode_dim(_Decoder self, const char *buf, Py_ssize_t pos, Py_ssize_t end, Event *ev,
                            int *nspans) noexcept nogil:
    """Validate one map entry and put it among the spans. An entry with any
    field but its key and value (wire type 2) is left out: protobuf's parser
    moves such an entry to the unknown fields, so it is no dimension at all."""
    cdef Py_ssize_t ks = 0, kn = 0, vs = 0, vn = 0, s, n
    cdef uint64_t key
    cdef int rc, wt
    cdef bint other = False
    ev.err_field = F_DIMENSIONS
    while pos < end:
        rc = _read_tag(buf, end, &pos, &key)
        if rc:
            return rc
        wt = key & 7
        key >>= 3
        if key == 0:
            return E_FIELD0
        if (key == 1 or key == 2) and wt == 2:
            rc = _read_len(buf, end, &pos, &s, &n)
            if rc:
                return rc
            if not _utf8_ok(<const uint8_t *>buf + s, n):
                return E_UTF8  # protobuf strings: the ledger and every client must be able to read them
            if key == 1:
                ks = s; kn = n
            else:
                vs = s; vn = n
        else:
            rc = _skip(buf, end, &pos, wt)
            if rc:
                return rc
            other = True
    if other:
        ev.err_field = F_NONE
        return E_OK
    if kn == 0 or kn > self.dim_key_max:
        return E_TOO_LONG if kn else E_EMPTY
    if vn > self.dim_value_max:
        return E_TOO_LONG
    rc = _dim_insert(self, buf + ks, kn, buf + vs, vn, nspans)
    if rc == E_OK:
        ev.err_field = F_NONE
    return rc


cdef inline int _dim_insert(_Decoder self, const char *key, Py_ssize_t kn, const char *value, Py_ssize_t vn,
                            int *nspans) noexcept nogil:
    """Put an entry among the spans, sorted by key (by insertion: entries are few,
    dimensions_max); a later entry of the same key replaces the earlier one."""
    cdef int i, c
    for i in range(nspans[0]):
        c = _keycmp(key, kn, self.spans[i].key, self.spans[i].key_len)
        if c == 0:
            self.spans[i].value = value
            self.spans[i].value_len = <int32_t>vn
            return E_OK
        if c < 0:
            break
    else:
        i = nspans[0]
    if nspans[0] >= self.dims_max:
        return E_TOO_MANY
    memmove(&self.spans[i + 1], &self.spans[i], (nspans[0] - i) * sizeof(Span))
    self.spans[i].key = key
    self.spans[i].key_len = <int32_t>kn
    self.spans[i].value = value
    self.spans[i].value_len = <int32_t>vn
    nspans[0] += 1
    return E_OK


cdef inline int _decode_report(_Decoder self, const char *buf, Py_ssize_t end, Event *ev) except -1:
    """Decode a ReportRequest's event (its only field) into ``ev``; raise InvalidInput."""
    cdef Py_ssize_t pos = 0, start = 0, n = -1
    cdef uint64_t key
    cdef int wt, rc
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
                raise InvalidInput("event", spec.MSG_EVENT_TWICE)
            rc = _read_len(buf, end, &pos, &start, &n)
        else:
            rc = _skip(buf, end, &pos, wt)
        if rc:
            raise InvalidInput("event", _MESSAGES[rc])
    if n < 0:
        raise InvalidInput("event", spec.MSG_REQUIRED)
    if _Decoder._decode_event(self, buf, start, start + n, ev, QUANTITIES_MAX) != E_OK:
        raise self._event_error(ev, "event.")
    return 0
