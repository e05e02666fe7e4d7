# Accounts and rating, the lowest layer of Core (declared in _fastpath_accounts.pxd):
# the catalog's tables, the account table and its snapshots, Ext rows, distinct
# values of unique_count meters, money, rating and debits with carry, plans and
# low-balance alerts.


cdef inline uint32_t relax_priority(int64_t degraded, int64_t step) noexcept nogil:
    """corespec.relax_priority in C (tests/test_core_contract.py holds the two
    together): PRIORITY_MAX, falling by one per ``step`` of degraded usage (never
    negative), down to 0; PRIORITY_MAX when the plan sets no step."""
    cdef int64_t drop
    if step <= 0:
        return PRIORITY_MAX
    drop = degraded // step
    return <uint32_t>(PRIORITY_MAX - drop if drop < PRIORITY_MAX else 0)


cdef class _Accounts:
    """Accounts and rating; see _fastpath.pxd. A new object is zeroed: every
    pointer starts NULL and every count 0."""

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
        free(self.denom); free(self.meters); free(self.rates)
        free(self.slots); free(self.hashes); free(self.id_off); free(self.id_len)
        free(self.arena); free(self.bal); free(self.ext); free(self.xrows)
        free(self.rem); free(self.usage); free(self.dirty)
        free(self.plan_of)
        free(self.uent); free(self.uidx); free(self.uhead); free(self.uepoch); free(self.uarena)
        free(self.plan_mode); free(self.plan_step); free(self.plan_free); free(self.alerts)
        free(self.mode_ptr); free(self.mode_len); free(self.ct_name); free(self.ct_name_len)

    # ---- construction ------------------------------------------------------

    cdef int _init_accounts(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity,
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
        self.alerts = <int64_t *>calloc(ALERTS_MAX, sizeof(int64_t))
        if not (self.denom and self.meters and self.rates and self.alerts):
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
        """(name, credit_type, precision, price_dimension, aggregation, unique_dimension) per meter."""
        cdef Py_ssize_t i
        for i in range(self.n_meters):
            name, ct, precision, dim, agg, uniq = meters[i]
            if not (0 <= ct < self.n_ct and 0 <= precision <= spec.PRECISION_MAX and AGG_SUM <= agg <= AGG_UNIQUE):
                raise ValueError(spec.MSG_METER_RANGE % i)
            if (agg == AGG_UNIQUE) != (len(uniq) > 0):
                raise ValueError(spec.MSG_METER_UNIQUE % i)
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
        return 0

    cdef int _init_rates(self, list rates) except -1:
        """(meter, dimension value or None, amount_nano, factor) per rate, grouped by meter."""
        cdef Py_ssize_t i
        for i in range(self.n_rates):
            meter, value, amount, factor = rates[i]
            if not (0 <= meter < self.n_meters) or amount < 0 or factor < 1:
                raise ValueError(spec.MSG_RATE_RANGE % i)
            if self.meters[meter].rate_first < 0:
                self.meters[meter].rate_first = i
            elif self.meters[meter].rate_first + self.meters[meter].rate_count != i:
                raise ValueError(spec.MSG_RATES_GROUPED)
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
        return 0

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

    # ---- accounts and their state ------------------------------------------

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

    # ---- snapshots -----------------------------------------------------------

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
                raise ValueError(spec.MSG_STATE_RANGE)
        if not 0 <= w[words - 1] < self.n_plans:
            raise ValueError(spec.MSG_STATE_PLAN)
        for meter, value in uniq:
            if not (0 <= meter < self.n_meters and self.meters[meter].agg == AGG_UNIQUE):
                raise ValueError(spec.MSG_STATE_UNIQUE)
        self._check_id(customer_id)
        cdef Py_ssize_t idx = self._insert(PyBytes_AS_STRING(customer_id), PyBytes_GET_SIZE(customer_id))
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

    def reserve(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        """Hold an amount if the available balance covers it; True when held."""
        self._idx(idx); self._ct(ct)
        if amount < 0:
            raise InvalidInput("amount", spec.MSG_NEGATIVE)
        if amount > self._available(idx, ct):
            return False
        if <i128>self._resv(idx, ct) + amount > INT64_MAX:
            raise InvalidInput("amount", spec.MSG_RESERVED_OVERFLOW)
        if amount:
            self._xw(idx, ct).resv += amount
        self.dirty[idx] = 1
        return True

    def release(self, Py_ssize_t idx, Py_ssize_t ct, int64_t amount):
        self._idx(idx); self._ct(ct)
        if amount < 0 or amount > self._resv(idx, ct):
            raise ValueError(spec.MSG_RELEASE_TOO_MUCH)
        if amount:
            self._xp(idx, ct).resv -= amount
        self.dirty[idx] = 1

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
            raise IndexError(spec.MSG_NO_METER % meter)
        if self.meters[meter].rate_first < 0:
            return -1
        if value is None:
            return self._find_rate(meter, NULL, 0)
        return self._find_rate(meter, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value))

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

    def quote(self, Py_ssize_t rate, int64_t quantity):
        """(credit type, cost rounded up to a whole nano) of a quantity, without carry."""
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

    def force_charge(self, Py_ssize_t idx, Py_ssize_t rate, int64_t quantity):
        """Debit the cost of ``quantity`` at ``rate`` with carry, whatever the
        balance, without counting usage (a gauge's value at period end)."""
        self._idx(idx)
        if rate < 0 or rate >= self.n_rates or quantity < 0:
            raise ValueError(spec.MSG_FORCE_CHARGE)
        cdef int32_t ct = self.rates[rate].ct
        cdef Py_ssize_t b = idx * self.n_ct + ct
        cdef i128 fine, total, d
        if self._fine(<int32_t>rate, quantity, &fine):
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
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

    # ---- plans and alerts ----------------------------------------------------

    cdef inline uint32_t _priority(self, Py_ssize_t idx, int32_t ct) noexcept nogil:
        """Queue-priority hint of a degraded event (relax_priority)."""
        return relax_priority(self._degr(idx, ct), self.plan_step[self.plan_of[idx] * self.n_ct + ct])

    def set_plan(self, Py_ssize_t idx, int plan):
        self._idx(idx)
        if not 0 <= plan < self.n_plans:
            raise IndexError(spec.MSG_NO_PLAN % plan)
        self.plan_of[idx] = <uint16_t>plan
        self.dirty[idx] = 1

    cdef inline void _check_alert(self, Py_ssize_t idx, Py_ssize_t ct, int64_t before) noexcept nogil:
        """Note a balance that just fell below its low-balance threshold."""
        cdef Ext *x = self._xp(idx, ct)
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
                a = self._alert(b // self.n_ct, b % self.n_ct)
                if a != INT64_MIN and self.bal[b] < a:
                    out.append((b // self.n_ct, b % self.n_ct))
        else:
            for i in range(self.n_alerts):
                out.append((self.alerts[i] // self.n_ct, self.alerts[i] % self.n_ct))
        self.n_alerts = 0
        self.alerts_lost = False
        return out
