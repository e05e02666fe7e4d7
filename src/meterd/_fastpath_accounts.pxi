# Money, rating, plans and alerts, the third layer of Core (declared in
# _fastpath_accounts.pxd): credits, floors and reservations, the rating of a
# quantity and its debit with carry, free units and fallback modes of plans,
# the priority hint of degraded usage, and low-balance alerts.


cdef inline uint32_t relax_priority(int64_t degraded, int64_t step) noexcept nogil:
    """corespec.relax_priority in C (tests/test_core_contract.py holds the two
    together): PRIORITY_MAX, falling by one per ``step`` of degraded usage (never
    negative), down to 0; PRIORITY_MAX when the plan sets no step."""
    cdef int64_t drop
    if step <= 0:
        return PRIORITY_MAX
    drop = degraded // step
    return <uint32_t>(PRIORITY_MAX - drop if drop < PRIORITY_MAX else 0)


cdef class _Accounts(_State):
    """Money, rating, plans and alerts; see _fastpath.pxd."""

    def __dealloc__(self):
        free(self.alerts)

    cdef int _init_accounts(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity,
                            list plans, list modes, list free, list credit_names) except -1:
        """The catalog's tables, an empty account table and room for alerts; see Core.__init__."""
        self._init_tables(denominators, meters, rates, limits, capacity, plans, modes, free, credit_names)
        self.alerts = <int64_t *>calloc(ALERTS_MAX, sizeof(int64_t))
        if self.alerts == NULL:
            raise MemoryError()
        return 0

    # ---- money -----------------------------------------------------------

    def credit(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        """Add a signed amount to a balance; returns the new balance."""
        self._idx(idx); self._ct(ct)
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef i128 v = <i128>self.bal[b] + amount
        if v > INT64_MAX or v < -INT64_MAX:
            raise InvalidInput("amount_nano", spec.MSG_BALANCE_OVERFLOW)
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

    def set_discount(self, Py_ssize_t idx, Py_ssize_t ct, int64_t discount):
        """Take ``discount`` / DISCOUNT_SCALE off every charge of the account in a
        credit type (0: none), exactly: the cost of each debit is the discounted
        one, its remainder carried as any other."""
        self._idx(idx); self._ct(ct)
        if discount < 0 or discount > DISCOUNT_SCALE:
            raise ValueError(spec.MSG_DISCOUNT)
        cdef Py_ssize_t k, t
        cdef bint ok = self.denom[ct] % DISCOUNT_SCALE == 0
        for k in range(self.n_rates):
            if self.rates[k].ct == ct:
                ok = ok and self.rates[k].factor % DISCOUNT_SCALE == 0
                for t in range(self.rates[k].tier_first, self.rates[k].tier_first + self.rates[k].tier_count):
                    ok = ok and self.tiers[t].factor % DISCOUNT_SCALE == 0
        if discount and not ok:
            raise ValueError(spec.MSG_NOT_DISCOUNTABLE % ct)
        if discount != 0 or self.ext[idx] >= 0:
            self._xw(idx, ct).disc = discount
        self.dirty[idx] = 1

    def discount(self, Py_ssize_t idx, Py_ssize_t ct):
        """The account's discount in a credit type, in 1/DISCOUNT_SCALE (0: none)."""
        self._idx(idx); self._ct(ct)
        return _Tables._disc(self, idx, ct)

    cdef inline i128 _available(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = _Tables._xp(self, idx, ct)
        if x == NULL:
            return <i128>self.bal[idx * self.n_ct + ct]
        return <i128>self.bal[idx * self.n_ct + ct] - x.resv - x.floor

    def available(self, Py_ssize_t idx, Py_ssize_t ct):
        self._idx(idx); self._ct(ct)
        cdef i128 a = self._available(idx, ct)
        if a > INT64_MAX:
            return INT64_MAX
        return <int64_t>a if a > -INT64_MAX else -INT64_MAX

    def reserve(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        """Hold an amount if the available balance covers it; True when held."""
        self._idx(idx); self._ct(ct)
        if amount < 0:
            raise InvalidInput("amount", spec.MSG_NEGATIVE)
        if amount > self._available(idx, ct):
            return False
        if <i128>_Tables._resv(self, idx, ct) + amount > INT64_MAX:
            raise InvalidInput("amount", spec.MSG_RESERVED_OVERFLOW)
        if amount:
            self._xw(idx, ct).resv += amount
        self.dirty[idx] = 1
        return True

    def release(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        self._idx(idx); self._ct(ct)
        if amount < 0 or amount > _Tables._resv(self, idx, ct):
            raise ValueError(spec.MSG_RELEASE_TOO_MUCH)
        if amount:
            _Tables._xp(self, idx, ct).resv -= amount
        self.dirty[idx] = 1

    # ---- rating ----------------------------------------------------------

    cdef int32_t _find_rate(self, int32_t meter, const char **value, const int32_t *value_len) noexcept nogil:
        """The rate of an event whose price dimensions have these values (NULL: the
        event has none): of the rates that match, the one with the largest mask
        (corespec.rate_mask); -1 if none does."""
        cdef Meter *m = &self.meters[meter]
        cdef int32_t k, n = m.n_dims, r
        cdef uint32_t mask, present = 0
        cdef uint64_t vh[PRICE_DIMENSIONS_MAX]
        if n == 0:
            return m.rate_default
        if m.rate_count <= RATES_SCANNED_MAX:
            return self._scan_rates(meter, value, value_len)
        for k in range(n):
            if value[k] != NULL:
                present |= 1u << (n - 1 - k)
                vh[k] = _hash(value[k], value_len[k])
        mask = (1u << n) - 1
        while True:
            if (m.masks >> mask) & 1 and (mask & ~present) == 0:
                r = _Tables._rate_at(self, meter, mask, value, value_len, _rate_hash(meter, mask, vh, n))
                if r >= 0:
                    return r
            if mask == 0:
                return -1
            mask -= 1

    cdef int32_t _scan_rates(self, int32_t meter, const char **value, const int32_t *value_len) noexcept nogil:
        """_find_rate for a meter with few rates: a look at each costs less than the hashes
        (the same rate: the largest mask that matches, the first written of equal keys)."""
        cdef Meter *m = &self.meters[meter]
        cdef int32_t i, k, n = m.n_dims, best = -1
        cdef Rate *r
        for i in range(m.rate_first, m.rate_first + m.rate_count):
            r = &self.rates[i]
            if best >= 0 and r.mask <= self.rates[best].mask:
                continue
            for k in range(n):
                if (r.mask >> (n - 1 - k)) & 1 and (value[k] == NULL or r.value_len[k] != value_len[k]
                                                    or memcmp(r.value[k], value[k], value_len[k]) != 0):
                    break
            else:
                best = i
        return best

    cdef int32_t _no_price_pos(self, int32_t meter, const char **value, const int32_t *value_len) noexcept nogil:
        """The price dimension an event without a rate is refused for (corespec.no_price_position)."""
        cdef Meter *m = &self.meters[meter]
        cdef int32_t i, j, r
        cdef Rate *rt
        cdef bint ok
        for i in range(m.n_dims):
            ok = False
            for r in range(m.rate_first, m.rate_first + m.rate_count):
                rt = &self.rates[r]
                for j in range(i + 1):
                    if (rt.mask >> (m.n_dims - 1 - j)) & 1 and (
                            value[j] == NULL or rt.value_len[j] != value_len[j]
                            or memcmp(rt.value[j], value[j], value_len[j]) != 0):
                        break
                else:
                    ok = True
                    break
            if not ok:
                return i
        return m.n_dims - 1 if m.n_dims > 0 else 0

    cdef int _price_values(self, int32_t meter, object dims, const char **value, int32_t *value_len,
                           list keep) except -1:
        """The values of a meter's price dimensions in a mapping of bytes to bytes, or
        their defaults."""
        cdef Meter *m = &self.meters[meter]
        cdef int32_t k
        for k in range(m.n_dims):
            found = dims.get(PyBytes_FromStringAndSize(m.dim_key[k], m.dim_key_len[k]))
            if found is None:
                value[k] = m.dim_default[k]
                value_len[k] = m.dim_default_len[k]
            else:
                found = bytes(found)
                keep.append(found)
                value[k] = PyBytes_AS_STRING(found)
                value_len[k] = <int32_t>PyBytes_GET_SIZE(found)
        return 0

    def find_rate(self, Py_ssize_t meter, dims):
        """The rate of a meter for an event with these dimensions (bytes to bytes); -1 if none."""
        cdef const char *value[PRICE_DIMENSIONS_MAX]
        cdef int32_t value_len[PRICE_DIMENSIONS_MAX]
        keep = []
        self._check()
        if meter < 0 or meter >= self.n_meters:
            raise IndexError(spec.MSG_NO_METER % meter)
        self._price_values(<int32_t>meter, dims, value, value_len, keep)
        return self._find_rate(<int32_t>meter, value, value_len)

    cdef int _fine(self, int32_t rate, int64_t quantity, i128 *out) noexcept nogil:
        """The cost of ``quantity`` at ``rate`` in 1/D nano-units; 1 when it would
        not fit 64 bits once divided by D, else 0."""
        cdef i128 t
        if i128_mul(<i128>quantity, <i128>self.rates[rate].amount_nano, &t):
            return 1
        if i128_mul(t, <i128>self.rates[rate].factor, out):
            return 1
        if out[0] / self.denom[self.rates[rate].ct] > INT64_MAX:
            return 1
        return 0

    cdef int _graduated(self, int32_t rate, int64_t start, int64_t end, i128 *out) noexcept nogil:
        """The cost of the units at places ``start`` to ``end`` of the period, each at
        the tier its place falls in, in 1/D nano-units; 1 when it would not fit 64
        bits once divided by D."""
        cdef Rate *r = &self.rates[rate]
        cdef Tier *t
        cdef int64_t low = 0, lo, hi
        cdef i128 total = 0, part
        cdef int32_t k
        for k in range(r.tier_count):
            t = &self.tiers[r.tier_first + k]
            lo = start if start > low else low
            hi = end if end < t.up_to else t.up_to
            if hi > lo:
                if i128_mul(<i128>(hi - lo), <i128>t.amount_nano * t.factor, &part):
                    return 1
                total += part
            low = t.up_to
            if low >= end:
                break
        out[0] = total
        return 1 if total / self.denom[r.ct] > INT64_MAX else 0

    cdef int _volume(self, int32_t rate, int64_t quantity, int64_t units, i128 *out) noexcept nogil:
        """The cost of ``units`` (those not free) all at the tier ``quantity`` falls in."""
        cdef Rate *r = &self.rates[rate]
        cdef Tier *t = &self.tiers[r.tier_first]
        cdef int32_t k = 0
        while quantity > t.up_to and k + 1 < r.tier_count:
            k += 1
            t = &self.tiers[r.tier_first + k]
        if i128_mul(<i128>units, <i128>t.amount_nano * t.factor, out):
            return 1
        return 1 if out[0] / self.denom[r.ct] > INT64_MAX else 0

    def quote(self, Py_ssize_t rate, int64_t quantity):
        """(credit type, cost rounded up to a whole nano) of a quantity, without carry
        (as it is: the engine rounds an event's to its meter's increment and minimum),
        at the rate's dearest tier when it has tiers: what a hold must cover."""
        self._check()
        if rate < 0 or rate >= self.n_rates:
            raise IndexError(spec.MSG_NO_RATE % rate)
        if quantity < 0:
            raise InvalidInput("quantity", spec.MSG_NEGATIVE)
        cdef i128 fine
        if self._fine(<int32_t>rate, quantity, &fine):
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
        cdef int64_t d = self.denom[self.rates[rate].ct]
        return self.rates[rate].ct, <int64_t>((fine + d - 1) / d)

    cdef int _debit(self, Py_ssize_t idx, int32_t rate, int64_t quantity, i128 fine, int64_t minimum, int how,
                    int64_t *cost, const char *uval, Py_ssize_t ulen) noexcept nogil:
        """Apply one rated event with carry: REASON_NONE (charged), OUT_DEGRADED
        (served in the plan's fallback mode, not charged) or a denial reason.
        It costs at least ``minimum`` nano unless the plan's free units cover it
        all. ``how`` is DEBIT_CHECK, DEBIT_FORCE or DEBIT_DEGRADE; ``uval`` is a
        unique_count meter's value.
        Its calls of _ufind and _uinsert (not inline) go through the vtable, as
        when they were of this class: named as _State's, they made gcc's code for
        _debit two instructions longer per event (callgrind), unique_count or not."""
        cdef int32_t ct = self.rates[rate].ct
        cdef int32_t meter = self.rates[rate].meter
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef Py_ssize_t u = idx * self.n_meters + meter
        cdef int64_t free_units = self.plan_free[self.plan_of[idx] * self.n_meters + meter]
        cdef int64_t charged, start = self.usage[u]
        cdef bint tiered = self.rates[rate].tier_count > 0 and self.meters[meter].agg <= AGG_COUNT
        cdef int32_t pool = self.meters[meter].pool
        cdef int64_t pooled = 0
        if pool >= 0:
            # The free units are a balance (ledger mode: leased), taken first whatever the event costs.
            pooled = self.bal[idx * self.n_ct + pool]
            if pooled < 0:
                pooled = 0
            if pooled >= quantity:
                pooled = quantity
            elif how == DEBIT_CHECK and self.plan_of[idx] == 0:
                return REASON_INSUFFICIENT_BALANCE  # strict: the pool is to be topped up first
            if pooled:
                self._fine(rate, quantity - pooled, &fine)  # cannot overflow: fewer units
                if pooled == quantity:
                    minimum = 0  # free: no minimum
        elif free_units > self.usage[u] and (fine > 0 or minimum > 0 or tiered):
            # The plan's free units this period come first; the rest is rated as usual.
            charged = quantity - (free_units - self.usage[u]) if quantity > free_units - self.usage[u] else 0
            start = self.usage[u] + (quantity - charged)
            if not tiered:
                self._fine(rate, charged, &fine)  # cannot overflow: charged <= quantity
            if charged == 0:
                minimum = 0  # free: no minimum
        if tiered:
            # Each unit at the tier its place in the period's usage falls in (none dearer than the
            # rate's own price, which the decoder's check of ``fine`` used: this cannot overflow).
            if <i128>self.usage[u] + quantity > INT64_MAX or self._graduated(rate, start, self.usage[u] + quantity,
                                                                              &fine):
                return REASON_OVERFLOW
        if fine < <i128>minimum * self.denom[ct]:
            fine = <i128>minimum * self.denom[ct]
        cdef Ext *x = _Tables._xp(self, idx, ct)
        if x != NULL and x.disc != 0:  # exact: fine is a multiple of DISCOUNT_SCALE (set_discount)
            fine = fine // DISCOUNT_SCALE * (DISCOUNT_SCALE - x.disc)
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
        if how == DEBIT_DEGRADE or (how == DEBIT_CHECK and d > 0 and d > self._available(idx, ct)):
            if self.plan_mode[self.plan_of[idx] * self.n_ct + ct] == 0:
                return REASON_INSUFFICIENT_BALANCE
            if <i128>_Tables._degr(self, idx, ct) + d > INT64_MAX:
                return REASON_OVERFLOW
            _Tables._xnew(self, idx, ct).degr += <int64_t>d  # room was made by the caller
            self.usage[u] = <int64_t>use
            if pooled:
                self.bal[idx * self.n_ct + pool] -= pooled
            if new_value:
                self._uinsert(<int32_t>idx, meter, vhash, uval, ulen)
            self.dirty[idx] = 1
            return OUT_DEGRADED
        before = self.bal[b]
        self.bal[b] -= <int64_t>d
        self.rem[b] = <int64_t>(total - d * self.denom[ct])
        self.usage[u] = <int64_t>use
        if pooled:
            self.bal[idx * self.n_ct + pool] -= pooled
        if new_value:
            self._uinsert(<int32_t>idx, meter, vhash, uval, ulen)
        self.dirty[idx] = 1
        cost[0] = <int64_t>d
        self._check_alert(idx, ct, before)
        return REASON_NONE

    def force_charge(self, Py_ssize_t idx, Py_ssize_t rate, int64_t quantity):
        """Debit the cost of ``quantity`` at ``rate`` with carry, whatever the
        balance, without counting usage (a gauge's value at period end): the plan's
        free units first, then by its tiers, graduated or by volume (the tier
        of the whole value), when it has them."""
        self._idx(idx)
        if rate < 0 or rate >= self.n_rates or quantity < 0:
            raise ValueError(spec.MSG_FORCE_CHARGE)
        cdef int32_t ct = self.rates[rate].ct
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef i128 fine, total, d
        cdef int rc
        cdef int64_t free_units = self.plan_free[self.plan_of[idx] * self.n_meters + self.rates[rate].meter]
        cdef int64_t charged = quantity - free_units if quantity > free_units else 0  # the plan's free units first
        if self.rates[rate].tier_count == 0:
            rc = self._fine(<int32_t>rate, charged, &fine)
        elif self.meters[self.rates[rate].meter].tier_mode == TIER_VOLUME:
            rc = self._volume(<int32_t>rate, quantity, charged, &fine)
        else:
            rc = self._graduated(<int32_t>rate, quantity - charged, quantity, &fine)
        if rc:
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
        cdef int64_t disc = _Tables._disc(self, idx, ct)
        if disc:  # exact (set_discount); none under a catalog of an older version's denominators
            fine = fine // DISCOUNT_SCALE * (DISCOUNT_SCALE - disc)
        total = fine + self.rem[b]
        d = total / self.denom[ct]
        if <i128>self.bal[b] - d < -INT64_MAX:
            raise InvalidInput("quantity", spec.MSG_BALANCE_OVERFLOW)
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

    # ---- plans and alerts ----------------------------------------------------

    cdef inline uint32_t _priority(self, Py_ssize_t idx, int32_t ct) noexcept nogil:
        """Queue-priority hint of a degraded event (relax_priority)."""
        return relax_priority(_Tables._degr(self, idx, ct), self.plan_step[self.plan_of[idx] * self.n_ct + ct])

    def set_plan(self, Py_ssize_t idx, int plan):
        self._idx(idx)
        if not 0 <= plan < self.n_plans:
            raise IndexError(spec.MSG_NO_PLAN % plan)
        self.plan_of[idx] = <uint16_t>plan
        self.dirty[idx] = 1

    cdef inline void _check_alert(self, Py_ssize_t idx, Py_ssize_t ct, int64_t before) noexcept nogil:
        """Note a balance that just fell below its low-balance threshold."""
        cdef Ext *x = _Tables._xp(self, idx, ct)
        if x == NULL:
            return
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef int64_t a = x.alert
        if a != INT64_MIN and before >= a and self.bal[b] < a:
            if self.n_alerts < ALERTS_MAX:
                self.alerts[self.n_alerts] = b
                self.n_alerts += 1
            else:
                self.alerts_lost = True

    def set_alert(self, Py_ssize_t idx, Py_ssize_t ct, threshold):
        """Low-balance threshold (nano), or None for none."""
        self._idx(idx); self._ct(ct)
        cdef int64_t a = INT64_MIN if threshold is None else <int64_t>threshold
        if a != INT64_MIN or self.ext[idx] >= 0:
            self._xw(idx, ct).alert = a
        self.dirty[idx] = 1

    def take_alerts(self):
        """(account, credit type) pairs whose balance fell below their threshold
        since the last call; when too many to keep, every account below it."""
        self._check()
        cdef Py_ssize_t i, b
        cdef int64_t a
        out = []
        if self.alerts_lost:
            for b in range(self.count * self.n_ct):
                a = _Tables._alert(self, b // self.n_ct, b % self.n_ct)
                if a != INT64_MIN and self.bal[b] < a:
                    out.append((b // self.n_ct, b % self.n_ct))
        else:
            for i in range(self.n_alerts):
                out.append((self.alerts[i] // self.n_ct, self.alerts[i] % self.n_ct))
        self.n_alerts = 0
        self.alerts_lost = False
        return out
