# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled core of meterd: wire decoding, rating and debits on C tables.

It does no I/O, no asyncio, no LMDB and no config parsing; ``meterd.core``
chooses between this module and its pure-Python twin ``_fastpath_py`` and the
server owns policy, storage and the network. What the two cores share (codes,
limits, messages, the priority formula) is ``meterd.corespec``; their API is
``meterd.core.CoreAPI``, and ``_fastpath.pyi`` describes this module's.

Amounts are int64 nano-units (1e-9 of a credit). Each credit type has a
denominator D: an account's carried remainder is kept in units of 1/D nano, so
sub-nano costs accumulate exactly instead of being rounded away. D is the
least common multiple of ``per_units * 10**precision`` over the rates of that
credit type, and each rate carries ``factor = D / (per_units * 10**precision)``.

The source is split by concern (see _fastpath.pxd): each layer of Core is a
.pxd (its state and C methods) and a .pxi (their code), included here.
"""

from libc.stdint cimport INT64_MAX, INT64_MIN
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE

from meterd import corespec as spec
from meterd.errors import Forbidden, InvalidInput

include "_fastpath_base.pxi"
include "_fastpath_encode.pxi"
include "_fastpath_tables.pxi"
include "_fastpath_state.pxi"
include "_fastpath_accounts.pxi"
include "_fastpath_aggregates.pxi"
include "_fastpath_decode.pxi"


cdef class Core(_Decoder):
    """Accounts, rates and the batch decoder. See the module docstring."""

    def __init__(self, list denominators, list meters, list rates, dict limits, Py_ssize_t capacity=1024,
                 list plans=None, list modes=None, list free=None, list credit_names=None, list conditions=None):
        """Build the core for one catalog shape.

        ``meters``: (name, credit_type, precision, price_dimension, aggregation,
        unique_dimension) tuples; ``rates``: (meter, dimension_value or None,
        amount_nano, factor) tuples, grouped by meter; ``limits``:
        customer_id_bytes_max, client_id_bytes_max, batch_events_max,
        dimensions_max, dimension_key_bytes_max, dimension_value_bytes_max,
        dimension_sets_per_window_max.
        ``plans``: per plan, per credit type, (fallback mode, priority step);
        plan 0 is "no plan" and always denies. ``modes``: fallback mode names,
        mode k being ``modes[k - 1]``. ``free``: per plan (from plan 1), per
        meter, the units of each period that are not charged. ``credit_names``:
        the credit types' names, for detailed batch results. ``conditions``: the
        dimensions the decoder sets from a request's quantities (corespec.ConditionRow).
        """
        self._init_accounts(denominators, meters, rates, limits, capacity, plans, modes, free, credit_names)
        self._init_aggregates(meters, rates, limits)
        self._init_decoder(limits, conditions)

    # ---- ReportBatch -------------------------------------------------------

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
        cdef uint64_t seq, details
        cdef Py_ssize_t cs, cn, nev, nent, i, j = 0, olen = 0
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef uint32_t counts[3]  # accepted, denied, degraded
        cdef char *out
        self._decode_batch(buf, PyBytes_GET_SIZE(data), &seq, &cs, &cn, &nev, &nent, &details)
        self._ureserve(nent, PyBytes_GET_SIZE(data))
        self._xreserve(nev)
        cdef Py_ssize_t mark = self.n_agg
        self._place_batch(nent)
        out = <char *>malloc(nev * (BATCH_EVENT_MAX + (BATCH_RESULT_MAX if details else 0)) + 1)
        if out == NULL:
            self._agg_undo(mark)
            raise MemoryError()
        counts[0] = counts[1] = counts[2] = 0
        try:
            for i in range(nev):
                olen += _apply_event(self, <uint32_t>i, &self.scratch[j], details != 0, out + olen, counts)
                j += self.scratch[j].nparts
            return counts[0], counts[1], counts[2], PyBytes_FromStringAndSize(out, olen)
        finally:
            free(out)

    cdef int _place_batch(self, Py_ssize_t nent) except -1:
        """Every event's account and aggregates (one for each of its quantities), before
        anything is applied, so that a batch over the cap on dimension sets is refused whole."""
        cdef Py_ssize_t i, k = -1, mark = self.n_agg
        cdef Event *ev
        for i in range(nent):
            ev = &self.scratch[i]
            if ev.nparts:  # the head of the next event
                k += 1
                ev.account = _Tables._find(self, ev.cust, ev.cust_len)
            else:
                ev.account = self.scratch[i - 1].account
            if ev.account >= 0:
                ev.agg = _Aggregates._agg_slot(self, ev.account, ev.meter, self.cbuf + ev.coff, ev.clen, ev.chash,
                                               ev.window, True)
                if ev.agg < 0:
                    self._agg_undo(mark)
                    raise self._sets_error(ev, "events[%d].dimensions" % k)
        return 0

    cdef object _sets_error(self, Event *ev, str field):
        return InvalidInput(field, spec.sets_message(PyBytes_FromStringAndSize(ev.cust, ev.cust_len), self.sets_max))

    # ---- Report --------------------------------------------------------------

    cdef int _report(self, bytes data, bint keyless, Outcome *o) except -1:
        """Decode and apply a ReportRequest (one event) into ``o``. With
        ``keyless``, an event that carries an idempotency key is left alone and
        1 is returned (the caller must check the key first); else 0."""
        self._check()
        cdef Event *ev = self.scratch  # room for QUANTITIES_MAX entries
        _decode_report(self, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), ev)
        if keyless and ev.keyed:
            return 1
        self._ureserve(1, ev.ulen)
        self._xreserve(1)
        return _apply_one(self, ev, o)

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
        cdef char out[REPORT_RESPONSE_MAX]
        cdef Py_ssize_t n = _put_report_response(out, o.decision, o.reason, self.ct_name[o.ct], self.ct_name_len[o.ct],
                                                 o.cost, o.balance, self.mode_ptr[o.mode], self.mode_len[o.mode],
                                                 o.priority)
        return o.decision, PyBytes_FromStringAndSize(out, n)


# ---- helpers of Core -----------------------------------------------------------------
# Functions rather than C methods, so that the C compiler inlines them into their
# one caller (see _fastpath_decode.pxi).

cdef inline Py_ssize_t _apply_event(Core self, uint32_t i, Event *ev, bint details, char *out,
                                    uint32_t *counts) except -1:
    """Apply event ``i`` of a batch, count it and write what the response says of
    it to ``out`` (BATCH_EVENT_MAX bytes, and BATCH_RESULT_MAX more with details);
    returns how many bytes."""
    cdef int64_t cost = 0
    cdef int32_t mode = 0, ct = self.rates[ev.rate].ct
    cdef uint32_t prio = 0
    cdef Py_ssize_t n = 0
    cdef int reason
    if ev.account < 0:
        reason = REASON_UNKNOWN_CUSTOMER
    else:
        reason = _debit_event(self, ev, &cost)
    if reason == REASON_NONE:
        counts[0] += 1
    elif reason == OUT_DEGRADED:
        counts[0] += 1
        counts[2] += 1
        mode = self.plan_mode[self.plan_of[ev.account] * self.n_ct + ct]
        prio = _Accounts._priority(self, ev.account, ct)
        n = _put_degradation(out, i, self.mode_ptr[mode], self.mode_len[mode], prio)
    else:
        counts[1] += 1
        n = _put_denial(out, i, reason)
    if details:
        n += _put_result(out + n, i,
                         DECISION_ALLOW if reason == REASON_NONE else
                         DECISION_DEGRADE if reason == OUT_DEGRADED else DECISION_DENY,
                         reason if reason != OUT_DEGRADED else 0,
                         self.ct_name[ct], self.ct_name_len[ct], cost,
                         self.bal[ev.account * self.n_ct + ct] if ev.account >= 0 else 0,
                         self.mode_ptr[mode], self.mode_len[mode], prio)
    return n


cdef inline int64_t _minimum(Core self, Event *ev) noexcept nogil:
    """The least a decoded event costs: its meter's minimum, if anything happened."""
    return self.meters[ev.meter].minimum if ev.quantity > 0 else 0


cdef inline int _debit_event(Core self, Event *ev, int64_t *cost) except -1:
    """Debit a placed event of a known customer and add it to its aggregates (see _debit)."""
    if ev.nparts > 1:
        return _debit_parts(self, ev, cost)
    cdef int reason = _Accounts._debit(self, ev.account, ev.rate, ev.quantity, ev.fine, _minimum(self, ev),
                                       DEBIT_CHECK, cost, ev.uval, ev.ulen)
    if reason == REASON_NONE or reason == OUT_DEGRADED:
        _Aggregates._agg_add(self, ev.agg, ev.quantity, cost[0])
    return reason


cdef int _debit_parts(Core self, Event *ev, int64_t *cost) except -1:
    """An event of several quantities, as a whole: each is debited in turn, its
    remainder carried to the next (so that their costs add up to what their sum
    costs), and all are charged when the balance covers them all. Else what the
    turns did is undone, and the event is served degraded in full (each quantity
    counted, nothing charged) or denied."""
    cdef Py_ssize_t idx = ev.account
    cdef int32_t ct = self.rates[ev.rate].ct, k, n = ev.nparts
    cdef Py_ssize_t b = idx * self.n_ct + ct, u = idx * self.n_meters
    cdef int64_t bal = self.bal[b], rem = self.rem[b], degr = _Tables._degr(self, idx, ct)
    cdef int64_t used[QUANTITIES_MAX]
    cdef int64_t pooled[QUANTITIES_MAX]  # the parts' pools' balances (set_pools), to undo the turns
    cdef int64_t costs[QUANTITIES_MAX]
    cdef Py_ssize_t n_alerts = self.n_alerts
    cdef bint lost = self.alerts_lost
    cdef uint8_t dirty = self.dirty[idx]
    cdef int how = DEBIT_CHECK, ok = REASON_NONE, reason = REASON_NONE
    cdef Ext *x
    cdef int32_t pool
    for k in range(n):
        used[k] = self.usage[u + ev[k].meter]
        pool = self.meters[ev[k].meter].pool
        pooled[k] = self.bal[idx * self.n_ct + pool] if pool >= 0 else 0
    while True:
        cost[0] = 0
        for k in range(n):
            reason = _Accounts._debit(self, idx, ev[k].rate, ev[k].quantity, ev[k].fine, _minimum(self, &ev[k]),
                                      how, &costs[k], NULL, 0)
            if reason == ok and costs[k] > INT64_MAX - cost[0]:
                reason = REASON_OVERFLOW  # each cost fits, and the balance (a floor far below 0): their sum not
            if reason != ok:
                break
            cost[0] += costs[k]
        if reason == ok:
            break
        # undo the turns
        self.bal[b] = bal
        self.rem[b] = rem
        x = _Tables._xp(self, idx, ct)
        if x != NULL:
            x.degr = degr
        for k in range(n):
            self.usage[u + ev[k].meter] = used[k]
            pool = self.meters[ev[k].meter].pool
            if pool >= 0:  # each part has a meter of its own, and each pool is one meter's
                self.bal[idx * self.n_ct + pool] = pooled[k]
        self.n_alerts = n_alerts
        self.alerts_lost = lost
        self.dirty[idx] = dirty
        if reason != OUT_DEGRADED:  # denied (in the second turn, only an overflow)
            cost[0] = 0
            return reason
        how = DEBIT_DEGRADE  # a turn was degraded: all of it is
        ok = OUT_DEGRADED
    for k in range(n):
        _Aggregates._agg_add(self, ev[k].agg, ev[k].quantity, costs[k])
    return reason


cdef inline int _apply_one(Core self, Event *ev, Outcome *o) except -1:
    """Apply a decoded event alone (room was made for it) into ``o``."""
    cdef int32_t ct = self.rates[ev.rate].ct
    cdef int reason
    o.ct = ct
    o.reason = REASON_NONE
    o.cost = 0
    o.balance = 0
    o.mode = 0
    o.priority = 0
    cdef Py_ssize_t mark = self.n_agg
    cdef int32_t k
    ev.account = _Tables._find(self, ev.cust, ev.cust_len)
    if ev.account < 0:
        o.decision = DECISION_DENY
        o.reason = REASON_UNKNOWN_CUSTOMER
        return 0
    for k in range(ev.nparts):
        ev[k].account = ev.account
        ev[k].agg = _Aggregates._agg_slot(self, ev.account, ev[k].meter, self.cbuf + ev.coff, ev.clen, ev.chash,
                                          ev.window, True)
        if ev[k].agg < 0:
            self._agg_undo(mark)
            raise self._sets_error(ev, "event.dimensions")
    reason = _debit_event(self, ev, &o.cost)
    o.balance = self.bal[ev.account * self.n_ct + ct]
    if reason == REASON_NONE:
        o.decision = DECISION_ALLOW
    elif reason == OUT_DEGRADED:
        o.decision = DECISION_DEGRADE
        o.cost = 0
        o.mode = self.plan_mode[self.plan_of[ev.account] * self.n_ct + ct]
        o.priority = _Accounts._priority(self, ev.account, ct)
    else:
        o.decision = DECISION_DENY
        o.reason = reason
        o.cost = 0
    return 0


# ---- the contract with meterd.corespec -----------------------------------------------

def _constants():
    """The values of meterd.corespec this module was compiled with (corespec.pxd),
    by their names there."""
    return {
        "REASON_NONE": REASON_NONE, "REASON_INSUFFICIENT_BALANCE": REASON_INSUFFICIENT_BALANCE,
        "REASON_UNKNOWN_CUSTOMER": REASON_UNKNOWN_CUSTOMER, "REASON_OVERFLOW": REASON_OVERFLOW,
        "OUT_DEGRADED": OUT_DEGRADED,
        "DECISION_ALLOW": DECISION_ALLOW, "DECISION_DENY": DECISION_DENY, "DECISION_DEGRADE": DECISION_DEGRADE,
        "AGG_SUM": AGG_SUM, "AGG_COUNT": AGG_COUNT, "AGG_MAX": AGG_MAX, "AGG_LATEST": AGG_LATEST,
        "AGG_UNIQUE": AGG_UNIQUE,
        "NAME_BYTES_MAX": NAME_BYTES_MAX, "MODE_BYTES_MAX": MODE_BYTES_MAX,
        "CUSTOMER_ID_BYTES_LIMIT": CUSTOMER_ID_BYTES_LIMIT, "PLANS_MAX": PLANS_MAX, "ALERTS_MAX": ALERTS_MAX,
        "QUOTE_BYTES_MAX": QUOTE_BYTES_MAX, "PRIORITY_MAX": PRIORITY_MAX,
        "PRICE_DIMENSIONS_MAX": PRICE_DIMENSIONS_MAX, "TIER_GRADUATED": TIER_GRADUATED, "TIER_VOLUME": TIER_VOLUME,
        "EVENT_FIELDS": (F_NONE, F_CUSTOMER_ID, F_METER, F_QUANTITY, F_QUANTITY_DECIMAL, F_DIMENSIONS,
                         F_TIMESTAMP_MS, F_IDEMPOTENCY_KEY, F_QUANTITIES),
        "QUANTITIES_MAX": QUANTITIES_MAX, "CONDITIONS_MAX": CONDITIONS_MAX,
        "CONDITION_VALUES_MAX": CONDITION_VALUES_MAX, "DISCOUNT_SCALE": DISCOUNT_SCALE,
    }


def _relax_priority(int64_t degraded, int64_t step):
    """relax_priority (the C formula of Core's priority hint), for the tests."""
    return relax_priority(degraded, step)


def _check_contract():
    """Refuse to load a build whose C values are not corespec's, or whose buffers
    the limits would not fit."""
    wrong = {name: value for name, value in _constants().items()
             if name != "EVENT_FIELDS" and getattr(spec, name) != value}
    if _constants()["EVENT_FIELDS"] != tuple(range(len(spec.EVENT_FIELDS))):
        wrong["EVENT_FIELDS"] = _constants()["EVENT_FIELDS"]
    if wrong:
        raise RuntimeError("meterd._fastpath was built with values that are not meterd.corespec's: %r" % wrong)
    if not (NAME_BYTES_MAX < 128 and MODE_BYTES_MAX <= NAME_BYTES_MAX and RESULT_BODY_MAX < 1 << 14):
        raise RuntimeError("a name's length must fit one byte and a message's length two")


_check_contract()
