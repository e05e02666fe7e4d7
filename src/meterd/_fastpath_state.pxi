# What an account holds beyond its columns, the second layer of Core (declared
# in _fastpath_state.pxd): its state as a whole (read, set, marked dirty), the
# distinct values of unique_count meters this period, and the state records of
# snapshots, which carry both.


cdef class _State(_Tables):
    """Account state, distinct values and snapshot records; see _fastpath.pxd."""

    def __dealloc__(self):
        free(self.uent); free(self.uidx); free(self.uarena)

    # ---- an account's state --------------------------------------------------

    def state(self, Py_ssize_t idx):
        """Per credit type (balance, reserved, floor, remainder, degraded, alert),
        usage per meter, and the plan."""
        self._idx(idx)
        cdef Py_ssize_t k, b = idx * self.n_ct
        cts = [(self.bal[b + k], _Tables._resv(self, idx, k), _Tables._floor(self, idx, k), self.rem[b + k],
                _Tables._degr(self, idx, k), _Tables._alert(self, idx, k)) for k in range(self.n_ct)]
        use = [self.usage[idx * self.n_meters + k] for k in range(self.n_meters)]
        return cts, use, self.plan_of[idx]

    def load_state(self, Py_ssize_t idx, list cts, list use, int plan=0):
        """Set an account's state, as read back from a snapshot."""
        self._idx(idx)
        cdef Py_ssize_t k, b = idx * self.n_ct
        if len(cts) != self.n_ct or len(use) != self.n_meters:
            raise ValueError(spec.MSG_STATE_SHAPE)
        if not 0 <= plan < self.n_plans:
            raise ValueError(spec.MSG_NO_PLAN % plan)
        for k in range(self.n_ct):
            if not (0 <= cts[k][3] < self.denom[k]) or cts[k][1] < 0:
                raise ValueError(spec.MSG_STATE_RANGE)
        cdef int64_t bal, resv, floor, rem, degr, alert
        for k in range(self.n_ct):
            bal, resv, floor, rem, degr, alert = cts[k]
            self.bal[b + k] = bal
            self.rem[b + k] = rem
            self._set_ext(idx, k, resv, floor, degr, alert, _Tables._disc(self, idx, k))
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

    # ---- snapshots -----------------------------------------------------------

    def state_bytes(self, Py_ssize_t idx):
        """An account's state packed for a snapshot, int64 LE words: per credit
        type (balance, reserved, floor, remainder, degraded, alert), then usage
        per meter, then the plan; then 0, or -n and this period's n distinct
        values, each as int32 LE meter and length and the value's bytes (length
        -1: an 8-byte hash, a value kept by a version that kept only hashes);
        then, when the plan's word has bit 32 set, a discount per credit type.
        A word n >= 0 followed by n (meter, hash) pairs is that older format,
        which _load_state still reads."""
        self._idx(idx)
        cdef Py_ssize_t k, b = idx * self.n_ct, u = idx * self.n_meters, size
        cdef list uniq = self.uniques(idx)
        cdef Py_ssize_t words = self.n_ct * 6 + self.n_meters + 1
        cdef bint discounted = False
        for k in range(self.n_ct):
            discounted = discounted or _Tables._disc(self, idx, k) != 0
        size = (words + 1 + (self.n_ct if discounted else 0)) * 8
        for meter, value in uniq:
            size += 8 + (len(value) if isinstance(value, bytes) else 8)
        out = PyBytes_FromStringAndSize(NULL, size)
        cdef int64_t *w = <int64_t *>PyBytes_AS_STRING(out)
        cdef char *p = PyBytes_AS_STRING(out) + (words + 1) * 8
        cdef int32_t head[2]
        cdef uint64_t h
        for k in range(self.n_ct):
            w[k * 6] = self.bal[b + k]
            w[k * 6 + 1] = _Tables._resv(self, idx, k)
            w[k * 6 + 2] = _Tables._floor(self, idx, k)
            w[k * 6 + 3] = self.rem[b + k]
            w[k * 6 + 4] = _Tables._degr(self, idx, k)
            w[k * 6 + 5] = _Tables._alert(self, idx, k)
        for k in range(self.n_meters):
            w[self.n_ct * 6 + k] = self.usage[u + k]
        w[words - 1] = self.plan_of[idx] | (STATE_DISCOUNTED if discounted else 0)
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
        if discounted:
            for k in range(self.n_ct):
                h = <uint64_t>_Tables._disc(self, idx, k)
                memcpy(p + k * 8, &h, 8)
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
        if PyBytes_GET_SIZE(data) < words * 8:
            raise ValueError(spec.MSG_STATE_SIZE)
        cdef int64_t plan = w[words - 1] & ~STATE_DISCOUNTED
        cdef Py_ssize_t trailer = self.n_ct * 8 if w[words - 1] & STATE_DISCOUNTED else 0
        cdef list uniq = self._state_uniques(data, words, trailer)
        cdef const char *tail = PyBytes_AS_STRING(data) + PyBytes_GET_SIZE(data) - trailer
        cdef int64_t disc = 0
        for k in range(self.n_ct):
            if not (0 <= w[k * 6 + 3] < self.denom[k]) or w[k * 6 + 1] < 0:
                raise ValueError(spec.MSG_STATE_RANGE)
        if not 0 <= plan < self.n_plans:
            raise ValueError(spec.MSG_STATE_PLAN)
        for meter, value in uniq:
            if not (0 <= meter < self.n_meters and self.meters[meter].agg == AGG_UNIQUE):
                raise ValueError(spec.MSG_STATE_UNIQUE)
        for k in range(self.n_ct if trailer else 0):
            memcpy(&disc, tail + k * 8, 8)
            if not 0 <= disc <= DISCOUNT_SCALE:
                raise ValueError(spec.MSG_STATE_RANGE)
        self._check_id(customer_id)
        cdef Py_ssize_t idx = self._insert(PyBytes_AS_STRING(customer_id), PyBytes_GET_SIZE(customer_id))
        cdef Py_ssize_t b = idx * self.n_ct, u = idx * self.n_meters
        for k in range(self.n_ct):
            self.bal[b + k] = w[k * 6]
            self.rem[b + k] = w[k * 6 + 3]
            disc = 0
            if trailer:
                memcpy(&disc, tail + k * 8, 8)
            self._set_ext(idx, k, w[k * 6 + 1], w[k * 6 + 2], w[k * 6 + 4], w[k * 6 + 5], disc)
        for k in range(self.n_meters):
            self.usage[u + k] = w[self.n_ct * 6 + k]
        self.plan_of[idx] = <uint16_t>plan
        for meter, value in uniq:
            self.add_unique(idx, meter, value)
        self.dirty[idx] = 0
        return idx

    cdef list _state_uniques(self, bytes data, Py_ssize_t words, Py_ssize_t trailer):
        """The distinct values of a state record, (meter, bytes or hash) pairs, before
        ``trailer`` bytes (its discounts); raise ValueError for a record of the wrong size."""
        cdef const int64_t *w = <const int64_t *>PyBytes_AS_STRING(data)
        cdef Py_ssize_t size = PyBytes_GET_SIZE(data) - trailer, k, pos
        cdef int64_t n
        cdef int32_t head[2]
        cdef uint64_t h
        cdef const char *p = PyBytes_AS_STRING(data)
        out = []
        if size < (words + 1) * 8:
            raise ValueError(spec.MSG_STATE_SIZE)
        n = w[words]
        if n >= 0:  # the format that kept only hashes
            if n > size // 16 or size != (words + 1 + 2 * n) * 8:
                raise ValueError(spec.MSG_STATE_SIZE)
            for k in range(n):
                out.append((w[words + 1 + 2 * k], <uint64_t>w[words + 2 + 2 * k]))
            return out
        pos = (words + 1) * 8
        for k in range(-n):
            if size - pos < 8:
                raise ValueError(spec.MSG_STATE_SIZE)
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
                raise ValueError(spec.MSG_STATE_SIZE)
        if pos != size:
            raise ValueError(spec.MSG_STATE_SIZE)
        return out

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
        if not self.has_unique:
            return 0
        if self.n_uent + more > self.cap_uent:
            self._urebuild(more, more_bytes)
        if self.uarena_len + more_bytes > self.uarena_cap:
            self.uarena_cap = max(self.uarena_cap * 2, self.uarena_len + more_bytes)
            self.uarena = <char *>_resize(self.uarena, self.uarena_cap)
        return 0

    cdef int _urebuild(self, Py_ssize_t more, Py_ssize_t more_bytes) except -1:
        """Copy the live entries (of their account's current period) to new tables
        with room for ``more`` more of ``more_bytes``; the stale ones are dropped."""
        cdef Py_ssize_t i, live = 0, live_bytes = 0, nslots = 16, new_cap, arena_cap
        cdef UEntry *old = self.uent
        cdef char *old_arena = self.uarena
        cdef Py_ssize_t n_old = self.n_uent
        for i in range(n_old):
            if old[i].epoch == self.uepoch[old[i].acct]:
                live += 1
                live_bytes += old[i].vlen if old[i].vlen > 0 else 0
        new_cap = max(64, (live + more) * 2)
        if new_cap > ROWS_MAX:
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
        out.sort(key=spec.unique_order)
        return out

    def add_unique(self, Py_ssize_t idx, int meter, value):
        """Count a distinct value (its bytes, or a 64-bit hash) as seen this
        period (snapshots and catalog changes)."""
        self._idx(idx)
        if not (0 <= meter < self.n_meters and self.meters[meter].agg == AGG_UNIQUE):
            raise ValueError(spec.MSG_NOT_UNIQUE % meter)
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
