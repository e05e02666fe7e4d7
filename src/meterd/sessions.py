"""Duration sessions: per-second metering on meterd's own clock.

A session holds a reservation for the next ``timeout`` of time. Each heartbeat
settles the time since the last billed instant against that reservation
(exactly, with the carried remainder) and reserves the next interval; when the
balance cannot cover it, the session closes with DENY so the server stops. A
session whose heartbeats stop is closed by the housekeeping timer at its last
heartbeat: the held amount is released and nothing after it is billed.
"""

from __future__ import annotations

import logging
import secrets
from typing import Callable, Mapping

from meterd import records, validate
from meterd.answers import entry_key
from meterd.clock import Clock
from meterd.config import Settings
from meterd.errors import InvalidInput, NotFound, Unavailable
from meterd.holds import Holds
from meterd.idempotency import Settled
from meterd.journal import Journal
from meterd.leases import Cover, Leases
from meterd.records import Kind
from meterd.results import (
    ALLOW,
    DENY,
    REASON_INSUFFICIENT_BALANCE,
    REASON_LEDGER_UNAVAILABLE,
    REASON_UNKNOWN_CUSTOMER,
    Replay,
    SessionState,
)
from meterd.security import Tenant
from meterd.state import Live, Session
from meterd.store import Op
from meterd.subscriptions import Subscriptions

log = logging.getLogger("meterd.engine")

SESSION_TIMEOUT_MS = 30_000
SESSION_TIMEOUT_MIN_MS = 1000
SESSION_TIMEOUT_MAX_MS = 600_000
SESSION_ID_CHARS_MAX = 64


class Sessions:
    """Duration sessions; see the module docstring."""

    def __init__(self, settings: Settings, live: Live, journal: Journal, clock: Clock, holds: Holds,
                 subscriptions: Subscriptions, settled: Settled, encode: Callable[[object], bytes],
                 leases: Leases | None = None) -> None:
        self.settings = settings
        self.leases = leases  # ledger mode: what tops up a lease that cannot hold the next interval
        self.live = live
        self.journal = journal
        self.clock = clock
        self.holds = holds
        self.subscriptions = subscriptions
        self.settled = settled
        self.encode = encode

    def _close_ops(self, s: Session, answer: SessionState, now: int) -> list[Op]:
        """Forget an ended session, keeping its final answer for retries within the window."""
        self.holds.forget_session(s)
        return [("sessions", s.session_id.encode(), None)] + \
            self.settled.put_ops(s.tenant, _key(s.tenant, s.session_id), b"S", b"", self.encode(answer), now)

    def _rate(self, s: Session) -> int:
        dims = bytes.fromhex(s.dims_hex) if s.dims_hex else None
        return validate.held_rate(self.live, s.meter, s.credit_type, dims, s.dim_value)

    def _interval_units(self, s: Session, ms: int) -> int:
        """Whole meter units in ``ms`` of time (the meter counts seconds, to its precision)."""
        return ms * 10 ** self.live.catalog.meters[s.meter].precision // 1000

    def _units_ms(self, s: Session, units: int) -> int:
        return units * 1000 // 10 ** self.live.catalog.meters[s.meter].precision

    def _interval_cost(self, s: Session) -> int:
        """What the next interval (a heartbeat timeout) of the session costs."""
        return self.live.core.quote(self._rate(s), self._interval_units(s, s.timeout_ms))[1]

    def _hold_ops(self, s: Session) -> list[Op] | None:
        """Reserve the next interval; None when the balance cannot cover it, or the
        session's price is no longer in the catalog (a restart under another one)."""
        core = self.live.core
        if self._rate(s) < 0:
            return None
        idx = core.account(s.customer_id.encode())
        amount = validate.discounted(core, idx, s.credit_type, self._interval_cost(s))
        if not core.reserve(idx, s.credit_type, amount):
            return None
        s.reserved_nano = amount
        record = records.account(Kind.RESERVE, s.customer_id.encode(), s.credit_type, amount, self.clock.now_ms())
        return [self.journal.log_op(record)]

    async def _covered(self, s: Session) -> Cover:
        """Ledger mode: whether a top-up of the customer's lease now lets it hold the next interval."""
        if self.leases is None:
            return Cover.SHORT
        core = self.live.core
        covered = await self.leases.cover(s.customer_id, s.credit_type, self._interval_cost(s), s.tenant)
        self.journal.check_writable()
        if self.live.core is not core:
            raise Unavailable("the catalog was reloaded while this call waited for its lease; retry")
        return covered

    def _bill_ops(self, s: Session, until_ms: int, final: bool = False) -> list[Op]:
        """Settle the time from ``billed_ms`` to ``until_ms`` against the held amount. The
        last bill of a session rounds its whole time up to the meter's increment and
        brings its cost up to the meter's minimum: the session is one event."""
        core = self.live.core
        until_ms = min(until_ms, s.heartbeat_ms + s.timeout_ms)  # never past what was held
        units = max(self._interval_units(s, until_ms - s.billed_ms), 0)
        minimum = 0
        if final:
            total, minimum = validate.billed(self.live, s.meter, s.billed_units + units)
            units, minimum = total - s.billed_units, max(minimum - s.cost_nano, 0)
        cust = s.customer_id.encode()
        idx = core.account(cust)
        rate = self._rate(s)
        if rate < 0:
            return self._unpriced_ops(s, idx)
        at = max(until_ms - 1, 0)  # the usage belongs to the window the interval ends in
        core.set_clock(at)
        dims = validate.settle_set(core, idx, s.meter, bytes.fromhex(s.dims_hex) if s.dims_hex else None, cust)
        cost, _ = core.settle(idx, rate, units, s.reserved_nano, dims, minimum)
        record = records.settle(cust, rate, units, s.reserved_nano, dims, at, minimum)
        s.reserved_nano = 0
        s.billed_ms += self._units_ms(s, units)  # the part of a unit not yet billed is carried
        s.billed_units += units
        s.cost_nano += cost
        spared, s.spared_nano = s.spared_nano, 0
        return [self.journal.log_op(record)] + self.holds.spared_ops(s.customer_id, s.credit_type, spared, cost)

    def _unpriced_ops(self, s: Session, idx: int) -> list[Op]:
        """A session whose price is no longer in the catalog (it was restarted under one
        without it: a reload refuses that) cannot be billed: its hold is released."""
        log.error("session %s of customer %s has no price in the catalog now; its time since %d is not billed and "
                  "its hold of %d nano is released", s.session_id, s.customer_id, s.billed_ms, s.reserved_nano)
        held, s.reserved_nano = s.reserved_nano, 0
        if not held:
            return []
        self.live.core.release(idx, s.credit_type, held)
        record = records.account(Kind.RELEASE, s.customer_id.encode(), s.credit_type, held, self.clock.now_ms())
        return [self.journal.log_op(record)]

    def _state(self, s: Session, decision: int, closed: bool, reason: int = 0) -> SessionState:
        core = self.live.core
        catalog = self.live.catalog
        return SessionState(decision, s.session_id, catalog.credit_types[s.credit_type].name, closed, reason,
                            catalog.format_quantity(s.meter, s.billed_units), s.cost_nano,
                            core.state(core.account(s.customer_id.encode()))[0][s.credit_type][0], s.started_ms)

    def _check_start(self, meter: int, timeout: int, sid: str) -> None:
        spec = self.live.catalog.meters[meter]
        if spec.precision > 3 or spec.aggregation != 0:
            raise InvalidInput("meter", "a session meter counts seconds: a sum meter with precision 0 to 3")
        if not SESSION_TIMEOUT_MIN_MS <= timeout <= SESSION_TIMEOUT_MAX_MS:
            raise InvalidInput("heartbeat_timeout_ms", f"must be {SESSION_TIMEOUT_MIN_MS} to {SESSION_TIMEOUT_MAX_MS}")
        if len(sid) > SESSION_ID_CHARS_MAX or not all(0x21 <= ord(c) <= 0x7E for c in sid):
            raise InvalidInput("session_id", f"must be at most {SESSION_ID_CHARS_MAX} printable ASCII characters")

    async def start(self, tenant: Tenant | None, customer_id: str, meter_name: str, dimensions: Mapping[str, str],
                    heartbeat_timeout_ms: int, session_id: str) -> SessionState:
        self.journal.check_writable()
        label = validate.label_of(tenant)
        cust = validate.customer(self.settings, customer_id)
        dimensions = validate.derived(self.live, dimensions, [])  # a session has no quantity a condition reads
        meter, value, rate = validate.rate(self.settings, self.live, meter_name, dimensions)
        timeout = heartbeat_timeout_ms or SESSION_TIMEOUT_MS
        sid = session_id or "s_" + secrets.token_hex(12)
        self._check_start(meter, timeout, sid)
        existing = self.holds.sessions.get(sid)
        if existing is not None:
            if existing.customer_id != customer_id:
                raise InvalidInput("session_id", "is in use by another customer")
            return self._state(existing, ALLOW, False)
        self.holds.open_room("session", label)
        core = self.live.core
        ct = core.quote(rate, 0)[0]
        idx = core.account(cust)
        self.subscriptions.roll_if_due()
        now = self.clock.now_ms()
        dims = validate.dimension_set(dimensions)
        s = Session(sid, customer_id, meter, value, ct, now, now, now, timeout, 0, tenant=label,
                    dims_hex="" if dims is None else dims.hex())
        hold = self._hold_ops(s) if idx >= 0 else None
        covered = await self._covered(s) if hold is None else Cover.COVERED
        if hold is None and covered:
            self.holds.open_room("session", label)  # other calls may have taken it meanwhile
            if sid in self.holds.sessions:
                raise Unavailable(f"session {sid[:SESSION_ID_CHARS_MAX]!r} was started meanwhile; retry")
            idx = core.account(cust)
            hold = self._hold_ops(s) if idx >= 0 else None
        if hold is None:
            reason = REASON_LEDGER_UNAVAILABLE if covered is Cover.UNAVAILABLE else \
                REASON_INSUFFICIENT_BALANCE if idx >= 0 else REASON_UNKNOWN_CUSTOMER
            return SessionState(DENY, sid, self.live.catalog.credit_types[ct].name, True, reason)
        self.holds.add_session(s)
        await self.journal.commit_with(hold + [("sessions", sid.encode(), s.to_json(self.live.catalog))])
        return self._state(s, ALLOW, False)

    async def _open(self, sid: str, label: str) -> Session | Replay:
        """The open session, or the final answer of one that ended within the window
        (a retried Heartbeat or EndSession learns what was billed)."""
        s = self.holds.sessions.get(sid)
        if s is not None:
            return s
        final = await self.settled.answer(_key(label, sid), b"S", b"", f"session {sid[:SESSION_ID_CHARS_MAX]!r}")
        if final is None:
            raise NotFound(f"session {sid[:SESSION_ID_CHARS_MAX]!r} is unknown, or ended longer ago than the "
                           "idempotency window")
        return final

    async def _billed(self, tenant: Tenant | None, session_id: str,
                      final: bool = False) -> tuple[Session, int, list[Op]] | Replay:
        """An open session with its time billed up to now, or the final answer of one that ended."""
        s = await self._open(session_id, validate.label_of(tenant))
        if isinstance(s, Replay):
            return s
        self.journal.check_writable()
        now = self.clock.now_ms()
        self.subscriptions.roll_if_due(now)
        return s, now, self._bill_ops(s, now, final)

    async def heartbeat(self, tenant: Tenant | None, session_id: str) -> SessionState | Replay:
        billed = await self._billed(tenant, session_id)
        if isinstance(billed, Replay):
            return billed
        s, now, ops = billed
        s.heartbeat_ms = min(now, s.heartbeat_ms + s.timeout_ms)
        hold = self._hold_ops(s)
        reason = REASON_INSUFFICIENT_BALANCE
        if hold is None and self.leases is not None:
            # The time so far is billed (submitted first: nothing awaits with a record in hand), then
            # the lease is topped up for the next interval.
            # The session's row goes with the billed time: a crash meanwhile restarts from both.
            first = self.journal.submit_ahead(ops + [("sessions", s.session_id.encode(), s.to_json(self.live.catalog))])
            ops = []
            covered = await self._covered(s)
            if covered and self.holds.sessions.get(s.session_id) is s:
                hold = self._hold_ops(s)
            elif covered is Cover.UNAVAILABLE:
                reason = REASON_LEDGER_UNAVAILABLE
            await first
            if self.holds.sessions.get(s.session_id) is not s:  # ended meanwhile: its final answer stands
                final = await self._open(s.session_id, s.tenant)
                if isinstance(final, Replay):
                    return final
                raise Unavailable(f"session {s.session_id[:SESSION_ID_CHARS_MAX]!r} changed meanwhile; retry")
        if hold is None:
            ops += self._bill_ops(s, now, final=True)  # the session ends: its increment and minimum
            answer = self._state(s, DENY, True, reason)
            ops += self.subscriptions.alert_ops() + self._close_ops(s, answer, now)
            await self.journal.commit_with(ops)
            return answer
        ops += hold + self.subscriptions.alert_ops()
        ops.append(("sessions", s.session_id.encode(), s.to_json(self.live.catalog)))
        await self.journal.commit_with(ops)
        return self._state(s, ALLOW, False)

    async def end(self, tenant: Tenant | None, session_id: str) -> SessionState | Replay:
        billed = await self._billed(tenant, session_id, final=True)
        if isinstance(billed, Replay):
            return billed
        s, now, ops = billed
        answer = self._state(s, ALLOW, True)
        ops += self._close_ops(s, answer, now) + self.subscriptions.alert_ops()
        await self.journal.commit_with(ops)
        return answer

    def expire_ops(self, now: int) -> list[Op]:
        """Close sessions whose heartbeats stopped, at their last heartbeat."""
        ops: list[Op] = []
        for s in [s for s in self.holds.sessions.values() if now - s.heartbeat_ms > s.timeout_ms]:
            ops += self._bill_ops(s, s.heartbeat_ms, final=True)  # up to the last heartbeat; the hold is released
            ops += self._close_ops(s, self._state(s, ALLOW, True), now)
        return ops


def _key(label: str, sid: str) -> bytes:
    return entry_key(label, "session", sid)
