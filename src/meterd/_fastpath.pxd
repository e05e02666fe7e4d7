# Declarations of the compiled core, split by concern as asyncpg's protocol.pxd
# is: each included .pxd declares the C types and the state and C methods of
# one layer, and the .pxi of the same name implements it. Each layer is a cdef
# class built on the one before, and Core, the only one meterd uses, is the last:
#
#   _Tables      _fastpath_tables      the catalog's tables, the account table, Ext rows
#   _State       _fastpath_state       an account's state, distinct values, snapshot records
#   _Accounts    _fastpath_accounts    money, rating and debits, plans, alerts
#   _Aggregates  _fastpath_aggregates  usage windows, dimension sets, settle
#   _Decoder     _fastpath_decode      the wire decoder (ReportBatchRequest, ReportRequest)
#   Core         _fastpath.pyx         construction; apply_batch, report, report_wire
#
# and, without a class: _fastpath_encode (the wire encoder and the sizes of what
# it writes) and _fastpath_base.pxi (hashes and allocation). The codes and limits
# shared with the pure-Python twin come from corespec.pxd.
#
# A C method a layer calls on the one below goes through the vtable, even when
# it is declared inline; such calls on the hot paths name their class
# (``_Tables._find(self, ...)``), which Cython compiles to a direct call. And
# as a C method's address is in the vtable, the C compiler seldom inlines one:
# the hot helpers that have one caller are functions of the .pxi, not methods
# declared here (``_event_fields``, ``_apply_event``, ...).

from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t, uint16_t, uint8_t

from meterd.corespec cimport (
    REASON_NONE, REASON_INSUFFICIENT_BALANCE, REASON_UNKNOWN_CUSTOMER, REASON_OVERFLOW, OUT_DEGRADED,
    DECISION_ALLOW, DECISION_DENY, DECISION_DEGRADE,
    AGG_SUM, AGG_COUNT, AGG_MAX, AGG_LATEST, AGG_UNIQUE,
    NAME_BYTES_MAX, MODE_BYTES_MAX, CUSTOMER_ID_BYTES_LIMIT, PLANS_MAX, ALERTS_MAX, QUOTE_BYTES_MAX, PRIORITY_MAX,
    PRICE_DIMENSIONS_MAX, TIER_GRADUATED, TIER_VOLUME, QUANTITIES_MAX, CONDITIONS_MAX, CONDITION_VALUES_MAX,
    DISCOUNT_SCALE,
)

cdef extern from *:
    """
    typedef __int128 meterd_i128;
    static inline int meterd_mul(meterd_i128 a, meterd_i128 b, meterd_i128 *r) {
        return __builtin_mul_overflow(a, b, r);
    }
    """
    ctypedef long long i128 "meterd_i128"
    int i128_mul "meterd_mul"(i128 a, i128 b, i128 *r) noexcept nogil

include "_fastpath_tables.pxd"
include "_fastpath_state.pxd"
include "_fastpath_accounts.pxd"
include "_fastpath_aggregates.pxd"
include "_fastpath_decode.pxd"
include "_fastpath_encode.pxd"


# The outcome of one applied event, for report and report_wire.
cdef struct Outcome:
    int decision
    int reason
    int32_t ct
    int64_t cost
    int64_t balance
    int32_t mode             # the fallback mode's index from 1, or 0
    uint32_t priority


cdef class Core(_Decoder):
    cdef int _place_batch(self, Py_ssize_t nev) except -1
    cdef object _apply_batch(self, bytes data)
    cdef int _report(self, bytes data, bint keyless, Outcome *o) except -1
    cdef object _sets_error(self, Event *ev, str field)
