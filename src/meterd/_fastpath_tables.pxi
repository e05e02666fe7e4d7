# The catalog's tables and the account table, the lowest layer of Core (declared
# in _fastpath_tables.pxd): meters, rates, plans and names as the catalog sets
# them, the accounts by customer id with their balances, usage and plan, and the
# rarely set state of an account (Ext rows).


cdef inline uint64_t _rate_hash(int32_t meter, uint32_t mask, const uint64_t *value_hash, int32_t n) noexcept nogil:
    """A rate's place in the rate table: its meter, its mask and the hashes of the
    values its mask names."""
    cdef uint64_t h = (<uint64_t>meter * 0x9E3779B97F4A7C15ULL) ^ (<uint64_t>mask * 0xC2B2AE3D27D4EB4FULL)
    cdef int32_t k
    for k in range(n):
        if (mask >> (n - 1 - k)) & 1:
            h = (h ^ value_hash[k]) * 0xFF51AFD7ED558CCDULL
            h ^= h >> 29
    return h


cdef class _Tables:
    """The catalog's tables and the account table; see _fastpath.pxd. A new
    object is zeroed: every pointer starts NULL and every count 0."""

    def __dealloc__(self):
        cdef int i, k
        if self.meters != NULL:
            for i in range(self.n_meters):
                free(self.meters[i].name)
                free(self.meters[i].uniq_key)
                for k in range(PRICE_DIMENSIONS_MAX):
                    free(self.meters[i].dim_key[k])
                    free(self.meters[i].dim_default[k])
        if self.rates != NULL:
            for i in range(self.n_rates):
                for k in range(PRICE_DIMENSIONS_MAX):
                    free(self.rates[i].value[k])
        free(self.denom); free(self.meters); free(self.rates); free(self.rate_slots); free(self.tiers)
        free(self.slots); free(self.hashes); free(self.id_off); free(self.id_len)
        free(self.arena); free(self.bal); free(self.ext); free(self.xrows)
        free(self.rem); free(self.usage); free(self.dirty)
        free(self.plan_of); free(self.uhead); free(self.uepoch)
        free(self.plan_mode); free(self.plan_step); free(self.plan_free)
        free(self.mode_ptr); free(self.mode_len); free(self.ct_name); free(self.ct_name_len)

    # ---- construction ------------------------------------------------------

    cdef int _init_tables(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity,
                          list plans, list modes, list free, list credit_names) except -1:
        """The catalog's tables and an empty account table; see Core.__init__."""
        cdef Py_ssize_t i
        self.n_ct = len(denominators)
        self.n_meters = len(meters)
        self.n_rates = len(rates)
        self.id_max = limits["customer_id_bytes_max"]
        if self.id_max > CUSTOMER_ID_BYTES_LIMIT:
            raise ValueError(spec.MSG_ID_LIMIT)
        self.denom = <int64_t *>calloc(max(self.n_ct, 1), sizeof(int64_t))
        self.meters = <Meter *>calloc(max(self.n_meters, 1), sizeof(Meter))
        self.rates = <Rate *>calloc(max(self.n_rates, 1), sizeof(Rate))
        if not (self.denom and self.meters and self.rates):
            raise MemoryError()
        for i in range(self.n_ct):
            if denominators[i] <= 0 or denominators[i] > spec.DENOMINATOR_MAX:
                raise ValueError(spec.MSG_DENOMINATOR)
            self.denom[i] = denominators[i]
        self._init_names(credit_names, modes)
        self._init_plans(plans, free)
        self._init_meters(meters)
        self._init_rates(rates)
        self._grow(max(capacity, 16))
        return 0

    cdef int _init_names(self, list credit_names, list modes) except -1:
        """The credit types' and the fallback modes' names, as the encoder writes them."""
        cdef Py_ssize_t i
        self.credit_names = [bytes(n) for n in (credit_names or [b""] * self.n_ct)]
        if len(self.credit_names) != self.n_ct:
            raise ValueError(spec.MSG_CREDIT_NAMES)
        for i in range(self.n_ct):
            if len(self.credit_names[i]) > NAME_BYTES_MAX:
                raise ValueError(spec.MSG_CREDIT_NAMES)
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
            if len(m) > MODE_BYTES_MAX:
                raise ValueError(spec.MSG_MODE_NAMES)
            self.mode_ptr[i + 1] = PyBytes_AS_STRING(m)
            self.mode_len[i + 1] = len(m)
        return 0

    cdef int _init_plans(self, list plans, list free) except -1:
        """Per plan (plan 0: none, which always denies): the fallback mode and priority
        step of each credit type, and the free units of each meter."""
        cdef Py_ssize_t i, k
        plans = [[(0, 0)] * self.n_ct] + list(plans or [])
        self.n_plans = len(plans)
        if self.n_plans > PLANS_MAX:
            raise ValueError(spec.MSG_PLANS)
        self.plan_mode = <int32_t *>calloc(self.n_plans * max(self.n_ct, 1), sizeof(int32_t))
        self.plan_step = <int64_t *>calloc(self.n_plans * max(self.n_ct, 1), sizeof(int64_t))
        self.plan_free = <int64_t *>calloc(self.n_plans * max(self.n_meters, 1), sizeof(int64_t))
        if not (self.plan_mode and self.plan_step and self.plan_free):
            raise MemoryError()
        for i in range(self.n_plans):
            if len(plans[i]) != self.n_ct:
                raise ValueError(spec.MSG_PLAN_ENTRIES % i)
            for k in range(self.n_ct):
                mode, step = plans[i][k]
                if not (0 <= mode <= len(self.modes)) or step < 0:
                    raise ValueError(spec.MSG_PLAN_RANGE % i)
                self.plan_mode[i * self.n_ct + k] = mode
                self.plan_step[i * self.n_ct + k] = step
        free = free or []
        if len(free) > self.n_plans - 1:
            raise ValueError(spec.MSG_FREE_PLANS)
        for i in range(len(free)):
            if len(free[i]) != self.n_meters:
                raise ValueError(spec.MSG_FREE_METERS % (i + 1))
            for k in range(self.n_meters):
                if free[i][k] < 0:
                    raise ValueError(spec.MSG_FREE_NEGATIVE)
                self.plan_free[(i + 1) * self.n_meters + k] = free[i][k]
        return 0

    cdef int _init_meters(self, list meters) except -1:
        """(name, credit_type, precision, price dimensions, aggregation, unique_dimension,
        the value (or None) an event without a price dimension is priced as, the
        increment and the minimum) per meter."""
        cdef Py_ssize_t i, k
        for i in range(self.n_meters):
            name, ct, precision, dims, agg, uniq, defaults, increment, minimum, tier_mode = meters[i]
            if not (0 <= ct < self.n_ct and 0 <= precision <= spec.PRECISION_MAX and AGG_SUM <= agg <= AGG_UNIQUE
                    and 1 <= increment <= INT64_MAX and (increment == 1 or agg == AGG_SUM)
                    and 0 <= minimum <= spec.MINIMUM_NANO_MAX and (minimum == 0 or agg <= AGG_COUNT)
                    and (tier_mode == spec.TIER_GRADUATED or (tier_mode == spec.TIER_VOLUME and agg > AGG_COUNT))):
                raise ValueError(spec.MSG_METER_RANGE % i)
            self.meters[i].tier_mode = tier_mode
            self.meters[i].increment = increment
            self.meters[i].minimum = minimum
            if (agg == AGG_UNIQUE) != (len(uniq) > 0):
                raise ValueError(spec.MSG_METER_UNIQUE % i)
            dims = [bytes(d) for d in dims]
            if len(dims) > PRICE_DIMENSIONS_MAX or len(set(dims)) != len(dims) or len(defaults) != len(dims):
                raise ValueError(spec.MSG_METER_DIMS % (i, PRICE_DIMENSIONS_MAX))
            self.meters[i].agg = agg
            if agg == AGG_UNIQUE:
                self.has_unique = True
            self.meters[i].uniq_key = _dup(uniq)
            self.meters[i].uniq_key_len = len(uniq)
            self.meters[i].name = _dup(name)
            self.meters[i].name_len = len(name)
            self.meters[i].ct = ct
            self.meters[i].precision = precision
            self.meters[i].n_dims = len(dims)
            for k in range(len(dims)):
                self.meters[i].dim_key[k] = _dup(dims[k])
                self.meters[i].dim_key_len[k] = len(dims[k])
                if defaults[k] is not None:
                    self.meters[i].dim_default[k] = _dup(bytes(defaults[k]))
                    self.meters[i].dim_default_len[k] = len(defaults[k])
            self.meters[i].masks = 0
            self.meters[i].rate_first = -1
            self.meters[i].rate_count = 0
            self.meters[i].rate_default = -1
            self.meters[i].pool = -1
        return 0

    def set_pools(self, list pools):
        """Per meter, the credit type whose balance holds its free units (-1: none): ledger
        mode's leased pools of a plan's free units. Such a meter's events take their units
        from that balance first (all of it, whatever they cost) and are priced for the rest;
        on an account on plan 0 (strict) an event the balance cannot cover whole is denied
        (REASON_INSUFFICIENT_BALANCE), so that the pool is topped up first. The plan's own
        free units of the meter are then not given. For sum and count meters without tiers."""
        self._check()
        cdef Py_ssize_t i
        checked = spec.check_pools(pools, [self.meters[i].ct for i in range(self.n_meters)],
                                   [self.meters[i].agg for i in range(self.n_meters)],
                                   [self.rates[i].tier_count > 0 for i in range(self.n_rates)],
                                   [self.rates[i].meter for i in range(self.n_rates)], self.n_ct)
        for i in range(self.n_meters):
            self.meters[i].pool = checked[i]

    cdef int _init_rates(self, list rates) except -1:
        """(meter, a value or None (any) per price dimension, amount_nano, factor) per
        rate, grouped by meter, and the rate table; of two rates with one key the
        first holds."""
        cdef Py_ssize_t i, k, nslots = 16
        cdef Meter *m
        cdef uint64_t h
        cdef uint64_t vh[PRICE_DIMENSIONS_MAX]
        while nslots < self.n_rates * 2:
            nslots *= 2
        self.rate_slots = <int32_t *>calloc(nslots, sizeof(int32_t))
        self.tiers = <Tier *>calloc(max(sum(len(r[4]) for r in rates), 1), sizeof(Tier))
        if self.rate_slots == NULL or self.tiers == NULL:
            raise MemoryError()
        self.rate_mask = nslots - 1
        for i in range(self.n_rates):
            meter, key, amount, factor, steps = rates[i]
            if not (0 <= meter < self.n_meters) or amount < 0 or factor < 1:
                raise ValueError(spec.MSG_RATE_RANGE % i)
            m = &self.meters[meter]
            if len(key) != m.n_dims:
                raise ValueError(spec.MSG_RATE_KEY % i)
            if m.rate_first < 0:
                m.rate_first = i
            elif m.rate_first + m.rate_count != i:
                raise ValueError(spec.MSG_RATES_GROUPED)
            m.rate_count += 1
            self.rates[i].meter = meter
            self.rates[i].ct = m.ct
            self.rates[i].amount_nano = amount
            self.rates[i].factor = factor
            self._init_tiers(i, tuple(steps))
            self.rates[i].mask = spec.rate_mask(tuple(key))
            for k in range(m.n_dims):
                if key[k] is not None:
                    value = bytes(key[k])
                    self.rates[i].value[k] = _dup(value)
                    self.rates[i].value_len[k] = len(value)
                    vh[k] = _hash(self.rates[i].value[k], len(value))
            self.rates[i].hash = _rate_hash(meter, self.rates[i].mask, vh, m.n_dims)
            if _Tables._rate_at(self, <int32_t>meter, self.rates[i].mask, <const char **>self.rates[i].value,
                                self.rates[i].value_len, self.rates[i].hash) >= 0:
                continue  # a second rate with the same key: the first holds
            m.masks |= 1u << self.rates[i].mask
            if self.rates[i].mask == 0:
                m.rate_default = i
            h = self.rates[i].hash & self.rate_mask
            while self.rate_slots[h] != 0:
                h = (h + 1) & self.rate_mask
            self.rate_slots[h] = <int32_t>(i + 1)
        return 0

    cdef int _init_tiers(self, Py_ssize_t rate, tuple steps) except -1:
        """A rate's tiers: (up_to, amount_nano, factor), up_to rising to INT64_MAX,
        none dearer than the rate's own price (what a quote holds)."""
        cdef Py_ssize_t k
        cdef int64_t last = 0
        self.rates[rate].tier_first = self.n_tiers
        self.rates[rate].tier_count = len(steps)
        for k in range(len(steps)):
            up_to, amount, factor = steps[k]
            if not (last < up_to <= INT64_MAX and amount >= 0 and factor >= 1) or (k == len(steps) - 1) != (
                    up_to == INT64_MAX) or <i128>amount * factor > <i128>self.rates[rate].amount_nano * self.rates[rate].factor:
                raise ValueError(spec.MSG_RATE_RANGE % rate)
            self.tiers[self.n_tiers].up_to = up_to
            self.tiers[self.n_tiers].amount_nano = amount
            self.tiers[self.n_tiers].factor = factor
            self.n_tiers += 1
            last = up_to
        return 0

    cdef int32_t _rate_at(self, int32_t meter, uint32_t mask, const char **value, const int32_t *value_len,
                          uint64_t h) noexcept nogil:
        """The rate of a meter with that mask and those values (at the mask's
        dimensions), or -1."""
        cdef uint64_t slot = h & self.rate_mask
        cdef int32_t s, k, n = self.meters[meter].n_dims
        cdef Rate *r
        while True:
            s = self.rate_slots[slot]
            if s == 0:
                return -1
            r = &self.rates[s - 1]
            if r.hash == h and r.meter == meter and r.mask == mask:
                for k in range(n):
                    if (mask >> (n - 1 - k)) & 1 and (r.value_len[k] != value_len[k]
                                                      or memcmp(r.value[k], value[k], value_len[k]) != 0):
                        break
                else:
                    return s - 1
            slot = (slot + 1) & self.rate_mask

    def close(self):
        """Refuse further use; memory is freed with the object."""
        self.closed = True

    cdef int _check(self) except -1:
        if self.closed:
            raise RuntimeError(spec.MSG_CLOSED)
        return 0

    cdef int _idx(self, Py_ssize_t idx) except -1:
        self._check()
        if idx < 0 or idx >= self.count:
            raise IndexError(spec.MSG_NO_ACCOUNT % idx)
        return 0

    cdef int _ct(self, Py_ssize_t ct) except -1:
        if ct < 0 or ct >= self.n_ct:
            raise IndexError(spec.MSG_NO_CREDIT_TYPE % ct)
        return 0

    # ---- account table -------------------------------------------------

    cdef int _grow(self, Py_ssize_t new_cap) except -1:
        """Room for ``new_cap`` accounts; a layer with tables of its own per account
        grows them too (_Aggregates._grow)."""
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
        if self.count >= ACCOUNTS_MAX:
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

    cdef int _check_id(self, bytes customer_id) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(customer_id)
        if n == 0 or n > self.id_max or not _id_charset_ok(PyBytes_AS_STRING(customer_id), n):
            raise InvalidInput("customer_id", spec.MSG_CUSTOMER_ID % self.id_max)
        return 0

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
        if need > ACCOUNTS_MAX:
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
                self.xrows[self.n_x + k].disc = 0
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

    cdef inline int64_t _disc(self, Py_ssize_t idx, Py_ssize_t ct) noexcept nogil:
        cdef Ext *x = self._xp(idx, ct)
        return 0 if x == NULL else x.disc

    cdef int _set_ext(self, Py_ssize_t idx, Py_ssize_t ct, int64_t resv, int64_t floor, int64_t degr,
                      int64_t alert, int64_t disc) except -1:
        """Set all five; an account whose rows are all defaults gets none."""
        cdef Ext *x
        if self.ext[idx] < 0 and resv == 0 and floor == 0 and degr == 0 and alert == INT64_MIN and disc == 0:
            return 0
        x = self._xw(idx, ct)
        x.resv = resv
        x.floor = floor
        x.degr = degr
        x.alert = alert
        x.disc = disc
        return 0

    # ---- accounts ------------------------------------------------------------

    def __len__(self):
        return self.count

    def account(self, bytes customer_id):
        """Index of a customer's account, or -1."""
        self._check()
        return self._find(PyBytes_AS_STRING(customer_id), PyBytes_GET_SIZE(customer_id))

    def open_account(self, bytes customer_id):
        """Index of a customer's account, created empty when missing."""
        self._check()
        self._check_id(customer_id)
        return self._insert(PyBytes_AS_STRING(customer_id), PyBytes_GET_SIZE(customer_id))

    def customer_id(self, Py_ssize_t idx):
        self._idx(idx)
        return PyBytes_FromStringAndSize(self.arena + self.id_off[idx], self.id_len[idx])
