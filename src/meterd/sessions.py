"""Duration sessions: per-second metering on meterd's own clock.

A session holds a reservation for the next ``timeout`` of time. Each heartbeat
settles the time since the last billed instant against that reservation
(exactly, with the carried remainder) and reserves the next interval; when the
balance cannot cover it, the session closes with DENY so the server stops. A
session whose heartbeats stop is closed by the housekeeping timer at its last
heartbeat: the held amount is released and nothing after it is billed.
"""

from __future__ import annotations

import collections
import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from meterd import records
from meterd.answers import entry_key
from meterd.errors import InvalidInput, NotFound
from meterd.records import Kind
from meterd.store import Op
from meterd.v1 import meter_pb2

SESSION_TIMEOUT_MS = 30_000
SESSION_TIMEOUT_MAX_MS = 600_000
_DUP_SESSION = b"\x50\x01"  # SessionResponse.duplicate = true


@dataclass
class Session:
    session_id: str
    customer_id: str
    meter: int
    dim_value: str | None
    credit_type: int
    started_ms: int
    billed_ms: int          # time up to here is billed
    heartbeat_ms: int       # the last heartbeat (or the start)
    timeout_ms: int
    reserved_nano: int      # held for the next interval
    billed_units: int = 0
    cost_nano: int = 0
    tenant: str = ""        # the label of the tenant that started it: its final answer is that tenant's
    spared_nano: int = 0    # credits of a period that ended during its held interval, kept for it
    dims_hex: str = ""      # its dimension set, when it has more than its price dimension (hex)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()


class SessionsMixin:
    """Engine methods for duration sessions; mixed into Engine."""

    core: Any
    catalog: Any
    settings: Any
    settled: Any
    tenants: bool
    reservations: dict
    reservations_of: collections.Counter[str]
    sessions: dict[str, Session]
    sessions_by_tenant: collections.Counter[str]

    def _log_op(self, record: bytes) -> Op: ...  # type: ignore[empty-body]
    def _now_ms(self) -> int: ...  # type: ignore[empty-body]
    def _customer(self, customer_id: str) -> bytes: ...  # type: ignore[empty-body]
    def _rate(self, meter_name: str, dimensions: Any) -> tuple[int, str | None, int]: ...  # type: ignore[empty-body]
    def _due_ops(self) -> list[Op]: ...  # type: ignore[empty-body]
    def alert_ops(self) -> list[Op]: ...  # type: ignore[empty-body]
    def check_writable(self) -> None: ...
    async def _commit_with(self, ops: list[Op], fut: Any = None) -> None: ...
    async def _settled_answer(self, key: bytes, by: bytes, request: bytes, what: str) -> bytes | None: ...

    def spared_ops(self, customer_id: str, ct: int, spared: int, cost: int) -> list[Op]: ...  # type: ignore[empty-body]

    def open_room(self, table: str, label: str) -> None: ...

    def _close_ops(self, s: Session, response: bytes, now: int) -> list[Op]:
        """Forget an ended session, keeping its final answer for retries within the window."""
        del self.sessions[s.session_id]
        self.sessions_by_tenant[s.tenant] -= 1
        if self.sessions_by_tenant[s.tenant] <= 0:
            del self.sessions_by_tenant[s.tenant]
        return [("sessions", s.session_id.encode(), None)] + \
            self.settled.put_ops(s.tenant, self._session_key(s.tenant, s.session_id), b"", b"S" + response, now)

    @staticmethod
    def _session_key(label: str, sid: str) -> bytes:
        return entry_key(label, "session", sid)

    def _session_rate(self, s: Session) -> int:
        return self.core.find_rate(s.meter, None if s.dim_value is None else s.dim_value.encode())

    def _interval_units(self, s: Session, ms: int) -> int:
        """Whole meter units in ``ms`` of time (the meter counts seconds, to its precision)."""
        return ms * 10 ** self.catalog.meters[s.meter].precision // 1000

    def _units_ms(self, s: Session, units: int) -> int:
        return units * 1000 // 10 ** self.catalog.meters[s.meter].precision

    def _hold_ops(self, s: Session) -> list[Op] | None:
        """Reserve the next interval; None when the balance cannot cover it."""
        _, amount = self.core.quote(self._session_rate(s), self._interval_units(s, s.timeout_ms))
        idx = self.core.account(s.customer_id.encode())
        if not self.core.reserve(idx, s.credit_type, amount):
            return None
        s.reserved_nano = amount
        record = records.account(Kind.RESERVE, s.customer_id.encode(), s.credit_type, amount, self._now_ms())
        return [self._log_op(record)]

    def _bill_ops(self, s: Session, until_ms: int) -> list[Op]:
        """Settle the time from ``billed_ms`` to ``until_ms`` against the held amount."""
        from meterd.engine import settle_set
        until_ms = min(until_ms, s.heartbeat_ms + s.timeout_ms)  # never past what was held
        units = max(self._interval_units(s, until_ms - s.billed_ms), 0)
        idx = self.core.account(s.customer_id.encode())
        rate = self._session_rate(s)
        at = max(until_ms - 1, 0)  # the usage belongs to the window the interval ends in
        self.core.set_clock(at)
        cust = s.customer_id.encode()
        dims = settle_set(self.core, idx, s.meter, bytes.fromhex(s.dims_hex) if s.dims_hex else None, cust)
        cost, _ = self.core.settle(idx, rate, units, s.reserved_nano, dims)
        record = records.settle(cust, rate, units, s.reserved_nano, dims, at)
        s.reserved_nano = 0
        s.billed_ms += self._units_ms(s, units)  # the part of a unit not yet billed is carried
        s.billed_units += units
        s.cost_nano += cost
        spared, s.spared_nano = s.spared_nano, 0
        return [self._log_op(record)] + self.spared_ops(s.customer_id, s.credit_type, spared, cost)

    def _session_response(self, s: Session, decision: int, closed: bool, reason: int = 0) -> bytes:
        idx = self.core.account(s.customer_id.encode())
        return meter_pb2.SessionResponse(
            decision=decision, reason=reason, session_id=s.session_id,  # type: ignore[arg-type]
            credit_type=self.catalog.credit_types[s.credit_type].name,
            billed_quantity=self.catalog.format_quantity(s.meter, s.billed_units), cost_nano=s.cost_nano,
            balance_nano=self.core.state(idx)[0][s.credit_type][0], closed=closed,
            started_at_ms=s.started_ms).SerializeToString()

    async def start_session(self, req: meter_pb2.StartSessionRequest, now: int, label: str = "") -> bytes:
        self.check_writable()
        cust = self._customer(req.customer_id)
        meter, value, rate = self._rate(req.meter, req.dimensions)
        if self.catalog.meters[meter].precision > 3 or self.catalog.meters[meter].aggregation != 0:
            raise InvalidInput("meter", "a session meter counts seconds: a sum meter with precision 0 to 3")
        timeout = req.heartbeat_timeout_ms or SESSION_TIMEOUT_MS
        if not 1000 <= timeout <= SESSION_TIMEOUT_MAX_MS:
            raise InvalidInput("heartbeat_timeout_ms", f"must be 1000 to {SESSION_TIMEOUT_MAX_MS}")
        sid = req.session_id or "s_" + secrets.token_hex(12)
        if len(sid) > 64 or not all(0x21 <= ord(c) <= 0x7E for c in sid):
            raise InvalidInput("session_id", "must be at most 64 printable ASCII characters")
        existing = self.sessions.get(sid)
        if existing is not None:
            if existing.customer_id != req.customer_id:
                raise InvalidInput("session_id", "is in use by another customer")
            return self._session_response(existing, meter_pb2.DECISION_ALLOW, False)
        self.open_room("session", label)
        ct = self.core.quote(rate, 0)[0]
        idx = self.core.account(cust)
        ops = self._due_ops()
        from meterd.engine import dimension_set
        dims = dimension_set(req.dimensions)
        s = Session(sid, req.customer_id, meter, value, ct, now, now, now, timeout, 0, tenant=label,
                    dims_hex="" if dims is None else dims.hex())
        hold = self._hold_ops(s) if idx >= 0 else None
        if hold is None:
            if ops:
                await self._commit_with(ops)
            reason = meter_pb2.REASON_INSUFFICIENT_BALANCE if idx >= 0 else meter_pb2.REASON_UNKNOWN_CUSTOMER
            return meter_pb2.SessionResponse(decision=meter_pb2.DECISION_DENY, reason=reason, session_id=sid,
                                             credit_type=self.catalog.credit_types[ct].name,
                                             closed=True).SerializeToString()
        self.sessions[sid] = s
        self.sessions_by_tenant[label] += 1
        ops += hold + [("sessions", sid.encode(), s.to_json())]
        await self._commit_with(ops)
        return self._session_response(s, meter_pb2.DECISION_ALLOW, False)

    async def _open_session(self, sid: str, label: str) -> tuple[Session | None, bytes | None]:
        """The open session, or the final answer of one that ended within the window
        (marked duplicate), so that a retried Heartbeat or EndSession learns what was billed."""
        s = self.sessions.get(sid)
        if s is not None:
            return s, None
        final = await self._settled_answer(self._session_key(label, sid), b"S", b"", f"session {sid[:64]!r}")
        if final is None:
            raise NotFound(f"session {sid[:64]!r} is unknown, or ended longer ago than the idempotency window")
        return None, final + _DUP_SESSION

    async def heartbeat(self, req: meter_pb2.HeartbeatRequest, now: int, label: str = "") -> bytes:
        s, final = await self._open_session(req.session_id, label)
        if s is None:
            return final  # type: ignore[return-value]
        self.check_writable()
        ops = self._due_ops() + self._bill_ops(s, now)
        s.heartbeat_ms = min(now, s.heartbeat_ms + s.timeout_ms)
        hold = self._hold_ops(s)
        if hold is None:
            response = self._session_response(s, meter_pb2.DECISION_DENY, True, meter_pb2.REASON_INSUFFICIENT_BALANCE)
            ops += self.alert_ops() + self._close_ops(s, response, now)
            await self._commit_with(ops)
            return response
        ops += hold + self.alert_ops() + [("sessions", s.session_id.encode(), s.to_json())]
        await self._commit_with(ops)
        return self._session_response(s, meter_pb2.DECISION_ALLOW, False)

    async def end_session(self, req: meter_pb2.EndSessionRequest, now: int, label: str = "") -> bytes:
        s, final = await self._open_session(req.session_id, label)
        if s is None:
            return final  # type: ignore[return-value]
        self.check_writable()
        ops = self._due_ops() + self._bill_ops(s, now)
        response = self._session_response(s, meter_pb2.DECISION_ALLOW, True)
        ops += self._close_ops(s, response, now) + self.alert_ops()
        await self._commit_with(ops)
        return response

    def expire_sessions_ops(self, now: int) -> list[Op]:
        """Close sessions whose heartbeats stopped, at their last heartbeat."""
        ops: list[Op] = []
        for s in [s for s in self.sessions.values() if now - s.heartbeat_ms > s.timeout_ms]:
            ops += self._bill_ops(s, s.heartbeat_ms)  # bills up to the last heartbeat; the hold is released
            ops += self._close_ops(s, self._session_response(s, meter_pb2.DECISION_ALLOW, True), now)
        return ops

    def load_sessions(self, items: list[tuple[bytes, bytes]]) -> None:
        self.sessions = {}
        for key, value in items:
            doc = json.loads(value)
            self.sessions[key.decode()] = Session(**doc)
        self.sessions_by_tenant = collections.Counter(s.tenant for s in self.sessions.values())
