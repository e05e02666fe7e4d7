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
                 list plans=None, list modes=None, list free=None, list credit_names=None):
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
        the credit types' names, for detailed batch results.
        """
        self._init_accounts(denominators, meters, rates, limits, capacity, plans, modes, free, credit_names)
        self._init_aggregates(meters, rates, limits)
        self._init_decoder(limits)

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
        cdef Py_ssize_t cs, cn, nev, i, olen = 0
        cdef const char *buf = PyBytes_AS_STRING(data)
        cdef uint32_t counts[3]  # accepted, denied, degraded
        cdef char *out
        self._decode_batch(buf, PyBytes_GET_SIZE(data), &seq, &cs, &cn, &nev, &details)
        self._ureserve(nev, PyBytes_GET_SIZE(data))
        self._xreserve(nev)
        cdef Py_ssize_t mark = self.n_agg
        self._place_batch(nev)
        out = <char *>malloc(nev * (BATCH_EVENT_MAX + (BATCH_RESULT_MAX if details else 0)) + 1)
        if out == NULL:
            self._agg_undo(mark)
            raise MemoryError()
        counts[0] = counts[1] = counts[2] = 0
        try:
            for i in range(nev):
                olen += _apply_event(self, <uint32_t>i, &self.scratch[i], details != 0, out + olen, counts)
            return counts[0], counts[1], counts[2], PyBytes_FromStringAndSize(out, olen)
        finally:
            free(out)

    cdef int _place_batch(self, Py_ssize_t nev) except -1:
        """Every event's account and aggregate, before anything is applied, so that
        a batch over the cap on dimension sets is refused whole."""
        cdef Py_ssize_t i, mark = self.n_agg
        cdef Event *ev
        for i in range(nev):
            ev = &self.scratch[i]
            ev.account = _Tables._find(self, ev.cust, ev.cust_len)
            if ev.account >= 0:
                ev.agg = _Aggregates._agg_slot(self, ev.account, ev.meter, self.cbuf + ev.coff, ev.clen, ev.chash,
                                               ev.window, True)
                if ev.agg < 0:
                    self._agg_undo(mark)
                    raise self._sets_error(ev, "events[%d].dimensions" % i)
        return 0

    cdef object _sets_error(self, Event *ev, str field):
        return InvalidInput(field, spec.sets_message(PyBytes_FromStringAndSize(ev.cust, ev.cust_len), self.sets_max))

    # ---- Report --------------------------------------------------------------

    cdef int _report(self, bytes data, bint keyless, Outcome *o) except -1:
        """Decode and apply a ReportRequest (one event) into ``o``. With
        ``keyless``, an event that carries an idempotency key is left alone and
        1 is returned (the caller must check the key first); else 0."""
        self._check()
        cdef Event ev
        _decode_report(self, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &ev)
        if keyless and ev.keyed:
            return 1
        self._ureserve(1, ev.ulen)
        self._xreserve(1)
        return _apply_one(self, &ev, o)

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
        reason = _Accounts._debit(self, ev.account, ev.rate, ev.quantity, ev.fine, _minimum(self, ev), False, &cost,
                                  ev.uval, ev.ulen)
    if reason == REASON_NONE or reason == OUT_DEGRADED:
        _Aggregates._agg_add(self, ev.agg, ev.quantity, cost)
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
    ev.account = _Tables._find(self, ev.cust, ev.cust_len)
    if ev.account < 0:
        o.decision = DECISION_DENY
        o.reason = REASON_UNKNOWN_CUSTOMER
        return 0
    ev.agg = _Aggregates._agg_slot(self, ev.account, ev.meter, self.cbuf + ev.coff, ev.clen, ev.chash, ev.window,
                                   True)
    if ev.agg < 0:
        raise self._sets_error(ev, "event.dimensions")
    reason = _Accounts._debit(self, ev.account, ev.rate, ev.quantity, ev.fine, _minimum(self, ev), False, &o.cost,
                              ev.uval, ev.ulen)
    if reason == REASON_NONE or reason == OUT_DEGRADED:
        _Aggregates._agg_add(self, ev.agg, ev.quantity, o.cost)
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
                         F_TIMESTAMP_MS, F_IDEMPOTENCY_KEY),
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
