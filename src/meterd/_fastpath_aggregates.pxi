# Usage aggregates, the fourth layer of Core (declared in _fastpath_aggregates.pxd):
# usage per (account, meter, dimension set, window) for the ledger, the
# dimension sets those name, dimension_sets_per_window_max, and settle, which
# debits (the layer below) and files the usage (this one).


cdef class _Aggregates(_Accounts):
    """Usage aggregates; see _fastpath.pxd."""

    def __cinit__(self):
        self.sets_capped = True
        self.agg_spill = {}
        self.window_ms = 60000
        self.late_ms = INT64_MAX
        self.early_ms = INT64_MAX
        self.rate_dims = []

    def __dealloc__(self):
        free(self.agg); free(self.aslots); free(self.dsets); free(self.dslots); free(self.darena)
        free(self.nsets); free(self.nsets_win)
        free(self.rate_dhash); free(self.rate_dptr); free(self.rate_dlen)

    cdef int _init_aggregates(self, list meters, list rates, dict limits) except -1:
        """dimension_sets_per_window_max, each rate's price dimensions (those it names
        a value of) as a dimension set (for settle), and an empty aggregate table; see Core.__init__."""
        cdef Py_ssize_t i
        self.sets_max = limits["dimension_sets_per_window_max"]
        if self.sets_max < 1:
            raise ValueError(spec.MSG_SETS_LIMIT)
        self.rate_dhash = <uint64_t *>calloc(max(self.n_rates, 1), sizeof(uint64_t))
        self.rate_dptr = <const char **>calloc(max(self.n_rates, 1), sizeof(char *))
        self.rate_dlen = <int32_t *>calloc(max(self.n_rates, 1), sizeof(int32_t))
        if self.rate_dhash == NULL or self.rate_dptr == NULL or self.rate_dlen == NULL:
            raise MemoryError()
        for i in range(self.n_rates):
            meter, key = rates[i][:2]
            named = sorted((bytes(d), bytes(v)) for d, v in zip(meters[meter][3], key) if v is not None)
            self.rate_dims.append(b"".join(b"\x2a" + _varint_bytes(len(body)) + body
                                           for body in (_dim_entry(d, v) for d, v in named)))
            self.rate_dptr[i] = PyBytes_AS_STRING(self.rate_dims[i])
            self.rate_dlen[i] = <int32_t>len(self.rate_dims[i])
            self.rate_dhash[i] = _hash_set(self.rate_dptr[i], self.rate_dlen[i])
        self._agg_grow(64)
        return 0

    cdef int _grow(self, Py_ssize_t new_cap) except -1:
        """The account table's, and this layer's per account: the dimension sets made
        in a window (none yet for the accounts to come)."""
        cdef Py_ssize_t i
        self.nsets = <int32_t *>_resize(self.nsets, new_cap * sizeof(int32_t))
        self.nsets_win = <int64_t *>_resize(self.nsets_win, new_cap * sizeof(int64_t))
        for i in range(self.cap, new_cap):
            self.nsets[i] = 0
            self.nsets_win[i] = INT64_MIN
        return _Tables._grow(self, new_cap)

    # ---- usage aggregates for the ledger ---------------------------------------

    def set_window(self, int64_t window_ms):
        """The width of a usage window (one minute by default)."""
        if window_ms < 1:
            raise ValueError(spec.MSG_WINDOW)
        self.window_ms = window_ms

    def set_clock(self, int64_t now_ms):
        """The time of what is applied next: its usage goes to this time's window
        (an event's to its timestamp_ms's, when it has one)."""
        self.now_ms = now_ms
        self.cur_window = now_ms - now_ms % self.window_ms

    def set_event_times(self, int64_t late_ms, int64_t early_ms):
        """How far before the clock, and after it, an event's timestamp_ms may be
        (INT64_MAX: any distance, as at first; the log replay allows any: what was
        applied once is applied again)."""
        if late_ms < 0 or early_ms < 0:
            raise ValueError(spec.MSG_EVENT_TIMES)
        self.late_ms = late_ms
        self.early_ms = early_ms

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
        if self.n_dsets >= ROWS_MAX or self.darena_len + dlen > DSET_BYTES_MAX:
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

    cdef inline int32_t _agg_find(self, int32_t acct, int32_t meter, int32_t dset, int64_t window,
                                  uint64_t *slot_out) noexcept nogil:
        """The aggregate of (account, meter, dimension set, window), or -1;
        ``slot_out`` is where it is or would go."""
        cdef uint64_t h = self._akey(acct, meter, dset, window) & self.amask
        cdef int32_t slot
        cdef Agg *a
        while True:
            slot = self.aslots[h]
            if slot == 0:
                slot_out[0] = h
                return -1
            a = &self.agg[slot - 1]
            if a.dset == dset and a.acct == acct and a.meter == meter and a.window == window:
                slot_out[0] = h
                return slot - 1
            h = (h + 1) & self.amask

    cdef int32_t _agg_slot(self, int32_t acct, int32_t meter, const char *dims, int32_t dlen, uint64_t dhash,
                           int64_t window, bint capped) except -2:
        """The aggregate of an event in ``window``, made (empty) if new; -1 when
        ``capped`` and the account has made dimension_sets_per_window_max sets in
        the current window (a unique_count meter's too: each distinct value is a
        set of its own; and an earlier window's, for a late event, counts in the
        current one)."""
        cdef uint64_t h
        cdef int32_t d = self._dset_find(dims, dlen, dhash, &h)
        cdef int32_t i = -1
        cdef Agg *a
        cdef bint counted = True
        if d >= 0:
            i = self._agg_find(acct, meter, d, window, &h)
            if i >= 0:
                return i
        if self.nsets_win[acct] != self.cur_window:
            self.nsets_win[acct] = self.cur_window
            self.nsets[acct] = 0
        if counted and capped and self.sets_capped and self.nsets[acct] >= self.sets_max:
            return -1
        if self.n_agg >= ROWS_MAX:
            raise MemoryError("too many usage aggregates")
        if d < 0:
            d = self._dset_intern(dims, dlen, dhash)
        if self.n_agg == self.cap_agg:
            self._agg_grow(self.cap_agg * 2)
        self._agg_find(acct, meter, d, window, &h)
        i = <int32_t>self.n_agg
        a = &self.agg[i]
        self.n_agg += 1
        self.aslots[h] = i + 1
        a.acct = acct
        a.meter = meter
        a.dset = d
        self.dsets[d].refs += 1
        a.window = window
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
        cdef Py_ssize_t i
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

    # ---- what the engine asks --------------------------------------------------

    def set_allowed(self, Py_ssize_t idx, int meter, bytes dims):
        """Whether usage of ``meter`` under the dimension set ``dims`` fits
        dimension_sets_per_window_max now: a set the account has in this window
        always does."""
        self._idx(idx)
        if not 0 <= meter < self.n_meters:
            raise IndexError(spec.MSG_NO_METER % meter)
        cdef uint64_t h
        cdef const char *p = PyBytes_AS_STRING(dims)
        cdef int32_t n = <int32_t>len(dims)
        cdef int32_t d = self._dset_find(p, n, _hash_set(p, n), &h)
        if d >= 0 and self._agg_find(<int32_t>idx, meter, d, self.cur_window, &h) >= 0:
            return True
        if not self.sets_capped:
            return True
        if self.nsets_win[idx] != self.cur_window:
            return self.sets_max > 0
        return self.nsets[idx] < self.sets_max

    def settle(self, Py_ssize_t idx, Py_ssize_t rate, int64_t quantity, int64_t reserved, bytes dims=None,
               int64_t minimum_nano=0):
        """Release a reservation and debit the real usage with carry.

        Returns (cost, overrun): the debit is recorded even when it exceeds
        the reservation and the available balance (the work was done);
        ``overrun`` is how far it went past the floor. The usage is filed under
        ``dims`` (a canonical dimension set, as ``canonical_set`` makes it), or
        under the rate's price dimensions alone. The quantity is taken as it
        is (the caller rounds it to the meter's increment); the debit costs at
        least ``minimum_nano`` unless the plan's free units cover it.
        """
        self._idx(idx)
        if rate < 0 or rate >= self.n_rates:
            raise IndexError(spec.MSG_NO_RATE % rate)
        if quantity < 0:
            raise InvalidInput("quantity", spec.MSG_NEGATIVE)
        cdef int32_t ct = self.rates[rate].ct
        cdef i128 fine
        cdef int64_t cost = 0
        if self.meters[self.rates[rate].meter].agg > AGG_COUNT:
            raise InvalidInput("meter", spec.MSG_SETTLE_GAUGE)
        if reserved < 0 or reserved > _Tables._resv(self, idx, ct):
            raise ValueError(spec.MSG_SETTLE_TOO_MUCH)
        if minimum_nano < 0 or minimum_nano > spec.MINIMUM_NANO_MAX:
            raise InvalidInput("minimum_nano", spec.MSG_MINIMUM)
        if _Accounts._fine(self, <int32_t>rate, quantity, &fine):
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
        # A settlement is not refused for dimension_sets_per_window_max: the work
        # was done. The engine files it under its price dimension alone when its
        # own set does not fit (set_allowed), and logs which it chose.
        cdef Py_ssize_t mark = self.n_agg
        cdef int32_t i
        if dims is None:
            i = _Aggregates._agg_slot(self, <int32_t>idx, self.rates[rate].meter, self.rate_dptr[rate],
                                      self.rate_dlen[rate], self.rate_dhash[rate], self.cur_window, False)
        else:
            i = _Aggregates._agg_slot(self, <int32_t>idx, self.rates[rate].meter, PyBytes_AS_STRING(dims),
                                      <int32_t>len(dims), _hash_set(PyBytes_AS_STRING(dims), len(dims)),
                                      self.cur_window, False)
        cdef Ext *x = _Tables._xp(self, idx, ct)  # there is one when anything is reserved
        if reserved:
            x.resv -= reserved
        if _Accounts._debit(self, idx, <int32_t>rate, quantity, fine, minimum_nano, DEBIT_FORCE, &cost, NULL,
                            0) != REASON_NONE:
            if reserved:
                x.resv += reserved
            self._agg_undo(mark)
            raise InvalidInput("quantity", spec.MSG_SETTLE_OVERFLOW)
        self._agg_add(i, quantity, cost)
        cdef i128 a = _Accounts._available(self, idx, ct)
        if a < -INT64_MAX:
            a = -INT64_MAX
        return cost, <int64_t>(-a if a < 0 else 0)

