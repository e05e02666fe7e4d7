# The wire encoder (sizes in _fastpath_encode.pxd): ReportResponse, the per-event
# messages of ReportBatchResponse, and dimension sets in their canonical form.


cdef inline Py_ssize_t _put_varint(char *out, uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 0
    while v >= 0x80:
        out[n] = <char>((v & 0x7F) | 0x80)
        v >>= 7
        n += 1
    out[n] = <char>v
    return n + 1


cdef inline Py_ssize_t _varint_len(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


# Protobuf fields as proto3 serialises them: in field-number order, zero and
# empty values left out. ``out`` always has room: the caller sizes it by
# _fastpath_encode.pxd.

cdef inline Py_ssize_t _put_uint(char *out, char tag, uint64_t v) noexcept nogil:
    if v == 0:
        return 0
    out[0] = tag
    return 1 + _put_varint(out + 1, v)


cdef inline Py_ssize_t _put_str(char *out, char tag, const char *p, int32_t n) noexcept nogil:
    """A credit type's or a mode's name: at most NAME_BYTES_MAX bytes (the core
    refuses longer ones), below 128, so its length is one byte."""
    if n == 0:
        return 0
    out[0] = tag
    out[1] = <char>n
    memcpy(out + 2, p, n)
    return 2 + n


cdef inline Py_ssize_t _put_message(char *out, char tag, const char *body, Py_ssize_t n) noexcept nogil:
    out[0] = tag
    cdef Py_ssize_t h = 1 + _put_varint(out + 1, <uint64_t>n)
    memcpy(out + h, body, n)
    return h + n


cdef inline Py_ssize_t _put_denial(char *out, uint32_t index, int reason) noexcept nogil:
    """Field 3 (Denial) of ReportBatchResponse."""
    cdef char body[DENIAL_BODY_MAX]
    cdef Py_ssize_t n = _put_uint(body, 0x08, index)
    n += _put_uint(body + n, 0x10, <uint64_t>reason)
    return _put_message(out, 0x1A, body, n)


cdef inline Py_ssize_t _put_degradation(char *out, uint32_t index, const char *mode, int32_t mode_len,
                                        uint32_t priority) noexcept nogil:
    """Field 7 (Degradation) of ReportBatchResponse."""
    cdef char body[DEGRADATION_BODY_MAX]
    cdef Py_ssize_t n = _put_uint(body, 0x08, index)
    n += _put_str(body + n, 0x12, mode, mode_len)
    n += _put_uint(body + n, 0x18, priority)
    return _put_message(out, 0x3A, body, n)


cdef inline Py_ssize_t _put_result(char *out, uint32_t index, int decision, int reason, const char *ct,
                                   int32_t ct_len, int64_t cost, int64_t balance, const char *mode,
                                   int32_t mode_len, uint32_t priority) noexcept nogil:
    """Field 8 (EventResult) of ReportBatchResponse."""
    cdef char body[RESULT_BODY_MAX]
    cdef Py_ssize_t n = _put_uint(body, 0x08, index)
    n += _put_uint(body + n, 0x10, <uint64_t>decision)
    n += _put_uint(body + n, 0x18, <uint64_t>reason)
    n += _put_str(body + n, 0x22, ct, ct_len)
    n += _put_uint(body + n, 0x28, <uint64_t>cost)
    n += _put_uint(body + n, 0x30, <uint64_t>balance)
    n += _put_str(body + n, 0x3A, mode, mode_len)
    n += _put_uint(body + n, 0x40, priority)
    return _put_message(out, 0x42, body, n)


cdef inline Py_ssize_t _put_report_response(char *out, int decision, int reason, const char *ct, int32_t ct_len,
                                            int64_t cost, int64_t balance, const char *mode, int32_t mode_len,
                                            uint32_t priority) noexcept nogil:
    """ReportResponse, in ``out`` of REPORT_RESPONSE_MAX bytes."""
    cdef Py_ssize_t n = _put_uint(out, 0x08, <uint64_t>decision)
    n += _put_uint(out + n, 0x10, <uint64_t>reason)
    n += _put_str(out + n, 0x1A, ct, ct_len)
    n += _put_uint(out + n, 0x20, <uint64_t>cost)
    n += _put_uint(out + n, 0x28, <uint64_t>balance)
    n += _put_str(out + n, 0x3A, mode, mode_len)
    n += _put_uint(out + n, 0x40, priority)
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


def _varint_bytes(uint64_t v):
    cdef char out[VARINT_BYTES_MAX]
    return PyBytes_FromStringAndSize(out, _put_varint(out, v))


def _dim_entry(bytes key, bytes value):
    """The body of one dimensions map entry, as protobuf encodes it."""
    return b"\x0a" + _varint_bytes(len(key)) + key + b"\x12" + _varint_bytes(len(value)) + value
