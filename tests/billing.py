"""A harness for billing scenarios: a real engine on a real LMDB, with a clock
the test moves, so that period boundaries can be crossed in a test."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from meterd import wire
from meterd.catalog import load_catalog
from meterd.clock import ManualClock
from meterd.config import Settings
from meterd.engine import Engine
from meterd.ledger import Ledger
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
NANO = 10**9
# 2026-01-31T00:00:00Z: a month-end anchor, so monthly periods clamp (Feb 28, Mar 31, ...)
START_MS = 1_769_817_600_000


def quantities(parts: dict[str, int | str]) -> list[pb.Quantity]:
    """(meter: quantity) as a request's quantities; a str is an exact decimal."""
    return [pb.Quantity(meter=m, quantity_decimal=q) if isinstance(q, str) else pb.Quantity(meter=m, quantity=q)
            for m, q in parts.items()]


class Billing:
    def __init__(self, tmp: Path, catalog: str, monkeypatch: pytest.MonkeyPatch, core: str = "compiled",
                 start_ms: int = START_MS, ledger: str = "", sidecar_id: str = "", balances: str = "local",
                 loop: asyncio.AbstractEventLoop | None = None, clock: ManualClock | None = None,
                 **settings: Any) -> None:
        """``loop`` and ``clock`` may be shared by several harnesses (sidecars on one ledger, in ledger mode)."""
        self.clock = clock or ManualClock(start_ms)
        if core == "python":
            from meterd import _fastpath_py
            from meterd import core as core_mod
            monkeypatch.setattr(core_mod, "Core", _fastpath_py.Core)
        if ledger:  # as the operator would, with `meterd ledger migrate` (SQLite ledgers migrate themselves)
            with Ledger(ledger) as lg:
                lg.migrate()
        self.settings = Settings(data_dir=str(tmp / "data"), fsync=False, ledger=ledger, sidecar_id=sidecar_id,
                                 balances=balances, **settings)
        self.catalog = load_catalog(str(ROOT / "examples" / f"{catalog}.toml") if "/" not in catalog else catalog)
        self.own_loop = loop is None
        self.loop = loop or asyncio.new_event_loop()
        self.engine = self._open()
        self.charged: dict[tuple[str, str], int] = {}
        self.holders: dict[str, tuple[str, str]] = {}  # reservation id: its customer and credit type
        self.plans_seen: dict[str, set[str]] = {}  # customer: every plan it has been on (property tests)

    def _open(self) -> Engine:
        engine = Engine(self.settings, self.catalog, clock=self.clock)
        engine.start(self.loop)
        return engine

    @property
    def now_ms(self) -> int:
        return self.clock.ms

    @now_ms.setter
    def now_ms(self, ms: int) -> None:
        self.clock.ms = ms

    def run(self, coro: Any) -> Any:
        """Run one call; a call that fails still waits, as the server does, for the
        period roll it may have set off before it failed (it was submitted first)."""
        async def call() -> Any:
            try:
                return await coro
            except BaseException:
                await self.engine.after_failure()
                raise
        return self.loop.run_until_complete(call())

    def advance(self, ms: int) -> None:
        self.now_ms += ms

    def restart(self, clean: bool = True) -> None:
        """Stop (gracefully, or as after kill -9) and start again on the same data."""
        if clean:
            self.run(self.engine.close())
        else:
            self.engine.store.stop()
            self.engine.store.close()
        self.engine = self._open()

    def close(self) -> None:
        self.run(self.engine.close())
        if self.own_loop:
            self.loop.close()

    # ---- calls ---------------------------------------------------------------------

    def report(self, customer: str, meter: str, quantity: int | str, **dims: str) -> pb.ReportResponse:
        event = pb.UsageEvent(customer_id=customer, meter=meter, dimensions=dims)
        if isinstance(quantity, str):
            event.quantity_decimal = quantity
        else:
            event.quantity = quantity
        data = pb.ReportRequest(event=event).SerializeToString()
        r = pb.ReportResponse.FromString(self.run(self.engine.report(data)))
        key = (customer, r.credit_type)
        self.charged[key] = self.charged.get(key, 0) + r.cost_nano
        return r

    def report_parts(self, customer: str, parts: dict[str, int | str], **dims: str) -> pb.ReportResponse:
        """One request measured by several meters (UsageEvent.quantities)."""
        event = pb.UsageEvent(customer_id=customer, dimensions=dims, quantities=quantities(parts))
        r = pb.ReportResponse.FromString(self.run(self.engine.report(pb.ReportRequest(event=event)
                                                                     .SerializeToString())))
        key = (customer, r.credit_type)
        self.charged[key] = self.charged.get(key, 0) + r.cost_nano
        return r

    def authorize_parts(self, customer: str, parts: dict[str, int | str], **dims: str) -> pb.AuthorizeResponse:
        req = pb.AuthorizeRequest(customer_id=customer, dimensions=dims, quantities=quantities(parts))
        a = pb.AuthorizeResponse.FromString(self.run(wire.authorize(self.engine, req)))
        self.holders[a.reservation_id] = (customer, a.credit_type)
        return a

    def commit_parts(self, reservation_id: str, parts: dict[str, int | str]) -> pb.CommitResponse:
        req = pb.CommitRequest(reservation_id=reservation_id, quantities=quantities(parts))
        c = pb.CommitResponse.FromString(self.run(wire.commit(self.engine, req)))
        if not c.duplicate:
            key = self.holders[reservation_id]
            self.charged[key] = self.charged.get(key, 0) + c.cost_nano
        return c

    def batch(self, events: list[pb.UsageEvent]) -> pb.ReportBatchResponse:
        data = pb.ReportBatchRequest(events=events).SerializeToString()
        return pb.ReportBatchResponse.FromString(self.run(self.engine.report_batch(data)))

    def authorize(self, customer: str, meter: str, quantity: int, **dims: str) -> pb.AuthorizeResponse:
        req = pb.AuthorizeRequest(customer_id=customer, meter=meter, quantity=quantity, dimensions=dims)
        a = pb.AuthorizeResponse.FromString(self.run(wire.authorize(self.engine, req)))
        self.holders[a.reservation_id] = (customer, a.credit_type)
        return a

    def commit(self, reservation_id: str, quantity: int) -> pb.CommitResponse:
        req = pb.CommitRequest(reservation_id=reservation_id, quantity=quantity)
        c = pb.CommitResponse.FromString(self.run(wire.commit(self.engine, req)))
        if not c.duplicate:
            key = self.holders[reservation_id]
            self.charged[key] = self.charged.get(key, 0) + c.cost_nano
        return c

    def release(self, reservation_id: str) -> pb.ReleaseResponse:
        req = pb.ReleaseRequest(reservation_id=reservation_id)
        return pb.ReleaseResponse.FromString(self.run(wire.release(self.engine, req)))

    def grant(self, customer: str, credit_type: str, amount_nano: int, **kw: Any) -> apb.GrantResponse:
        req = apb.GrantRequest(customer_id=customer, credit_type=credit_type, amount_nano=amount_nano, **kw)
        return apb.GrantResponse.FromString(self.run(wire.grant(self.engine, req)))

    def set_overdraft(self, customer: str, credit_type: str, amount_nano: int, clear: bool = False,
                      reason: str = "credit terms") -> apb.SetOverdraftResponse:
        req = apb.SetOverdraftRequest(customer_id=customer, credit_type=credit_type, amount_nano=amount_nano,
                                      clear=clear, reason=reason)
        return apb.SetOverdraftResponse.FromString(self.run(wire.set_overdraft(self.engine, req)))

    def set_term(self, customer: str, credit_type: str, term: str, value: int = 0, clear: bool = False,
                 reason: str = "negotiated") -> apb.SetTermResponse:
        req = apb.SetTermRequest(customer_id=customer, credit_type=credit_type, term=term, value=value, clear=clear,
                                 reason=reason)
        return apb.SetTermResponse.FromString(self.run(wire.set_term(self.engine, req)))

    def subscribe(self, customer: str, plan: str, start_ms: int = 0) -> apb.Subscription:
        req = apb.SubscribeRequest(customer_id=customer, plan=plan, start_ms=start_ms)
        return apb.Subscription.FromString(self.run(wire.subscribe(self.engine, req)))

    def change_plan(self, customer: str, plan: str) -> apb.Subscription:
        req = apb.ChangePlanRequest(customer_id=customer, plan=plan)
        return apb.Subscription.FromString(self.run(wire.change_plan(self.engine, req)))

    def cancel(self, customer: str, at_period_end: bool = False) -> apb.Subscription:
        req = apb.CancelRequest(customer_id=customer, at_period_end=at_period_end)
        return apb.Subscription.FromString(self.run(wire.cancel(self.engine, req)))

    def start_session(self, customer: str, meter: str, timeout_ms: int = 30_000, **dims: str) -> pb.SessionResponse:
        req = pb.StartSessionRequest(customer_id=customer, meter=meter, dimensions=dims,
                                     heartbeat_timeout_ms=timeout_ms)
        return pb.SessionResponse.FromString(self.run(wire.start_session(self.engine, req)))

    def heartbeat(self, session_id: str) -> pb.SessionResponse:
        req = pb.HeartbeatRequest(session_id=session_id)
        return pb.SessionResponse.FromString(self.run(wire.heartbeat(self.engine, req)))

    def end_session(self, session_id: str) -> pb.SessionResponse:
        req = pb.EndSessionRequest(session_id=session_id)
        return pb.SessionResponse.FromString(self.run(wire.end_session(self.engine, req)))

    def tick(self) -> None:
        """What the housekeeping timer does."""
        self.run(self.engine.sweep())

    def balance(self, customer: str) -> pb.GetBalanceResponse:
        req = pb.GetBalanceRequest(customer_id=customer)
        return pb.GetBalanceResponse.FromString(wire.balance(self.engine, req))

    def bal(self, customer: str, credit_type: str) -> int:
        return next(b.balance_nano for b in self.balance(customer).balances if b.credit_type == credit_type)

    def audit(self, customer: str, kind: str | None = None) -> list[apb.AuditEntry]:
        entries = wire.audit(self.engine, apb.ListAuditRequest(customer_id=customer, limit=1000)).entries
        return [e for e in entries if kind is None or e.kind == kind]

    def flush(self) -> None:
        """What the flush timer does: everything so far goes to the central ledger."""
        while self.run(self.engine.flush_once()):
            pass

    def statement(self, customer: str, period: str) -> dict:
        """The customer's statement for a month, from the central ledger (after a flush)."""
        return self.run(self.engine.statement(customer, period))

    def check_conservation(self, customer: str) -> None:
        """Credits are neither created nor lost: every balance change is an
        audited movement or the cost of an event."""
        for b in self.balance(customer).balances:
            moved = sum(e.balance_after_nano - e.balance_before_nano for e in self.audit(customer)
                        if e.credit_type == b.credit_type)
            assert b.balance_nano == moved - self.charged.get((customer, b.credit_type), 0), b.credit_type
