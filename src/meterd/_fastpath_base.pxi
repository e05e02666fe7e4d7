# C helpers every layer of the core uses: hashes and allocation (included by _fastpath.pyx).


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


cdef inline int _round_up(int64_t *quantity, int64_t increment) noexcept nogil:
    """A quantity (not negative) rounded up to a multiple of ``increment``; 1 when
    that would overflow."""
    cdef int64_t r
    if increment <= 1:
        return 0
    r = quantity[0] % increment
    if r == 0:
        return 0
    if quantity[0] > INT64_MAX - (increment - r):
        return 1
    quantity[0] += increment - r
    return 0


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

