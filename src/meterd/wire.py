"""The API's wire form: protobuf requests to the engine's domain values, and
its results back to protobuf. The servicers (and the in-process test harness)
call the engine through here; so does the engine, only to keep an answer for
retries in the form a retry is sent.

A remembered answer (``Replay``) is returned as it was first encoded, with
the response's ``duplicate`` field appended (each is a varint field set to 1,
so the tag and the value are two bytes).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meterd import validate
from meterd.errors import InvalidInput
from meterd.results import (
    Adjusted,
    Authorized,
    BalanceView,
    Committed,
    Granted,
    Keyed,
    LedgerState,
    Quantity,
    Released,
    Replay,
    SessionState,
    TermsSet,
)
from meterd.security import Tenant
from meterd.state import Subscription
from meterd.v1 import admin_pb2, meter_pb2

DUPLICATE = {  # the duplicate field of each response that can be replayed: (field number << 3) | varint, then 1
    "Authorize": b"\x40\x01",   # AuthorizeResponse.duplicate = 8
    "Commit": b"\x28\x01",      # CommitResponse.duplicate = 5
    "Release": b"\x18\x01",     # ReleaseResponse.duplicate = 3
    "Session": b"\x50\x01",     # SessionResponse.duplicate = 10
    "Grant": b"\x18\x01",       # GrantResponse.duplicate = 3
    "Adjust": b"\x10\x01",      # AdjustResponse.duplicate = 2
    "Subscribe": b"",           # Subscription has no such field: the same answer again
}


def parse(cls: Any, data: bytes) -> Any:
    try:
        return cls.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        raise InvalidInput("request", "malformed protobuf") from None


def canonical(msg: Any) -> bytes:
    """A request in a canonical form for idempotency digests (see validate.canonical_request)."""
    return validate.canonical_request(msg)


def keyed(msg: Any) -> Keyed | None:
    return Keyed(msg.idempotency_key, canonical(msg)) if msg.idempotency_key else None


quantity = validate.request_quantity


# ---- results to messages ----------------------------------------------------------------

def message(result: object) -> Any:
    """A result as its response message."""
    if isinstance(result, Authorized):
        return meter_pb2.AuthorizeResponse(
            decision=result.decision, reason=result.reason, reservation_id=result.reservation_id,  # type: ignore[arg-type]
            credit_type=result.credit_type, reserved_nano=result.reserved_nano,
            available_nano=result.available_nano, expires_at_ms=result.expires_at_ms, mode=result.mode,
            priority=result.priority)
    if isinstance(result, Committed):
        return meter_pb2.CommitResponse(cost_nano=result.cost_nano, released_nano=result.released_nano,
                                        balance_nano=result.balance_nano, overrun_nano=result.overrun_nano)
    if isinstance(result, Released):
        return meter_pb2.ReleaseResponse(released_nano=result.released_nano, available_nano=result.available_nano)
    if isinstance(result, SessionState):
        return meter_pb2.SessionResponse(
            decision=result.decision, reason=result.reason, session_id=result.session_id,  # type: ignore[arg-type]
            credit_type=result.credit_type, billed_quantity=result.billed_quantity, cost_nano=result.cost_nano,
            balance_nano=result.balance_nano, closed=result.closed, started_at_ms=result.started_at_ms)
    if isinstance(result, Granted):
        return admin_pb2.GrantResponse(grant_id=result.grant_id, balance_nano=result.balance_nano)
    if isinstance(result, Adjusted):
        return admin_pb2.AdjustResponse(balance_nano=result.balance_nano)
    if isinstance(result, TermsSet):
        return admin_pb2.SetTermResponse(floor_nano=result.floor_nano, available_nano=result.available_nano,
                                         terms=[admin_pb2.CustomerTerm(credit_type=t.credit_type, term=t.term,
                                                                       value=t.value) for t in result.terms])
    if isinstance(result, Subscription):
        return admin_pb2.Subscription(customer_id=result.customer_id, plan=result.plan, anchor_ms=result.anchor_ms,
                                      period_start_ms=result.billing_start_ms,
                                      period_end_ms=result.billing_end_ms,
                                      credit_period_start_ms=result.start_ms, credit_period_end_ms=result.end_ms,
                                      cancel_at_period_end=result.cancel_at_end, next_plan=result.next_plan)
    if isinstance(result, BalanceView):
        return _balance(result)
    if isinstance(result, LedgerState):
        return admin_pb2.LedgerStatus(
            sidecar_id=result.sidecar_id, ledger=result.ledger, flushed_sequence=result.flushed_sequence,
            backlog_usage_rows=result.backlog_usage_rows, backlog_entries=result.backlog_entries,
            last_flush_ms=result.last_flush_ms, last_error=result.last_error,
            consecutive_failures=result.consecutive_failures, leases_held=result.leases_held,
            leases_reachable=result.leases_reachable, leases_error=result.leases_error,
            leases=[admin_pb2.Lease(**dataclasses.asdict(x)) for x in result.leases])
    raise TypeError(f"no wire form for {type(result).__name__}")


def _balance(view: BalanceView) -> meter_pb2.GetBalanceResponse:
    out = meter_pb2.GetBalanceResponse(customer_id=view.customer_id, plan=view.plan,
                                       period_start_ms=view.period_start_ms, period_end_ms=view.period_end_ms)
    for b in view.balances:
        cb = out.balances.add(credit_type=b.credit_type, balance_nano=b.balance_nano, reserved_nano=b.reserved_nano,
                              floor_nano=b.floor_nano, available_nano=b.available_nano)
        if b.ledger is not None:
            cb.ledger = True
            cb.lease_nano, cb.central_available_nano = b.ledger.lease_nano, b.ledger.central_available_nano
            cb.leased_elsewhere_nano, cb.ledger_seen_ms = b.ledger.leased_elsewhere_nano, b.ledger.ledger_seen_ms
            cb.settled_ms = b.ledger.settled_ms
        for g in b.grants:
            cb.grants.add(grant_id=g.grant_id, remaining_nano=g.remaining_nano, expires_at_ms=g.expires_at_ms,
                          priority=g.priority, source=g.source)
    for meter, q in view.usage:
        out.usage.add(meter=meter, quantity=q)
    for t in view.terms:
        out.terms.add(credit_type=t.credit_type, term=t.term, value=t.value)
    return out


def encode(result: object) -> bytes:
    return message(result).SerializeToString()


def answer(result: object, rpc: str) -> bytes:
    """What a call answers: a fresh result encoded, or a remembered one marked duplicate."""
    if isinstance(result, Replay):
        return result.data + DUPLICATE[rpc]
    return encode(result)


# ---- calls: a request message in, the answer's bytes out ------------------------------------

def quantities(req: Any) -> list[tuple[str, Quantity]]:
    """A request's ``quantities``, (meter, quantity) each; refused with a meter or quantity of its own."""
    if req.quantities and (getattr(req, "meter", "") or req.WhichOneof("quantity_value")):
        own = "meter and quantity" if hasattr(req, "meter") else "quantity"
        raise InvalidInput("meter" if getattr(req, "meter", "") else req.WhichOneof("quantity_value"),
                           f"give {own}, or quantities, not both")
    return [(q.meter, quantity(q)) for q in req.quantities]


async def authorize(engine: Any, req: meter_pb2.AuthorizeRequest, tenant: Tenant | None = None) -> bytes:
    parts = quantities(req)
    return answer(await engine.reservations.authorize(tenant, req.customer_id, parts or [(req.meter, quantity(req))],
                                                      req.dimensions, req.ttl_ms, keyed(req), bool(parts)),
                  "Authorize")


async def commit(engine: Any, req: meter_pb2.CommitRequest, tenant: Tenant | None = None) -> bytes:
    parts = quantities(req)
    return answer(await engine.reservations.commit(tenant, req.reservation_id, None if parts else quantity(req),
                                                   canonical(req), parts), "Commit")


async def release(engine: Any, req: meter_pb2.ReleaseRequest, tenant: Tenant | None = None) -> bytes:
    return answer(await engine.reservations.release(tenant, req.reservation_id, canonical(req)), "Release")


async def start_session(engine: Any, req: meter_pb2.StartSessionRequest, tenant: Tenant | None = None) -> bytes:
    return answer(await engine.sessions.start(tenant, req.customer_id, req.meter, req.dimensions,
                                              req.heartbeat_timeout_ms, req.session_id), "Session")


async def heartbeat(engine: Any, req: meter_pb2.HeartbeatRequest, tenant: Tenant | None = None) -> bytes:
    return answer(await engine.sessions.heartbeat(tenant, req.session_id), "Session")


async def end_session(engine: Any, req: meter_pb2.EndSessionRequest, tenant: Tenant | None = None) -> bytes:
    return answer(await engine.sessions.end(tenant, req.session_id), "Session")


async def grant(engine: Any, req: admin_pb2.GrantRequest) -> bytes:
    return answer(await engine.admin.grant(req.customer_id, req.credit_type, req.amount_nano, req.expires_at_ms,
                                           req.priority, req.source, keyed(req)), "Grant")


async def adjust(engine: Any, req: admin_pb2.AdjustRequest) -> bytes:
    return answer(await engine.admin.adjust(req.customer_id, req.credit_type, req.amount_nano, req.reason,
                                            keyed(req)), "Adjust")


async def set_overdraft(engine: Any, req: admin_pb2.SetOverdraftRequest) -> bytes:
    done = await engine.admin.set_overdraft(req.customer_id, req.credit_type, req.amount_nano, req.clear, req.reason)
    return admin_pb2.SetOverdraftResponse(floor_nano=done.floor_nano,
                                          available_nano=done.available_nano).SerializeToString()


async def set_term(engine: Any, req: admin_pb2.SetTermRequest) -> bytes:
    return encode(await engine.admin.set_term(req.customer_id, req.credit_type, req.term, req.value, req.clear,
                                              req.reason))


async def subscribe(engine: Any, req: admin_pb2.SubscribeRequest) -> bytes:
    return answer(await engine.admin.subscribe(req.customer_id, req.plan, req.start_ms, keyed(req)), "Subscribe")


async def cancel(engine: Any, req: admin_pb2.CancelRequest) -> bytes:
    return encode(await engine.admin.cancel(req.customer_id, req.at_period_end))


async def change_plan(engine: Any, req: admin_pb2.ChangePlanRequest) -> bytes:
    return encode(await engine.admin.change_plan(req.customer_id, req.plan))


def balance(engine: Any, req: meter_pb2.GetBalanceRequest) -> bytes:
    return encode(engine.admin.balance(req.customer_id))


def audit(engine: Any, req: admin_pb2.ListAuditRequest) -> admin_pb2.ListAuditResponse:
    return admin_pb2.ListAuditResponse(entries=engine.admin.audit_entries(req.customer_id, req.after_sequence,
                                                                          req.limit))


def ledger_status(engine: Any) -> admin_pb2.LedgerStatus:
    return message(engine.ledger_status())


def statement(st: dict) -> admin_pb2.Statement:
    """A statement from the ledger as its protobuf message."""
    def line(x: dict) -> admin_pb2.StatementLine:
        return admin_pb2.StatementLine(
            section=x["section"], description=x["description"], credit_type=x["credit_type"],
            amount_nano=x["amount_nano"], quantity=x.get("quantity", ""), events=x.get("events", 0),
            tiers=[admin_pb2.ChargeTier(**t) for t in x.get("tiers", [])])
    return admin_pb2.Statement(customer_id=st["customer_id"], period=st["period"], from_ms=st["from_ms"],
                               to_ms=st["to_ms"], lines=[line(x) for x in st["lines"]],
                               activity=[line(x) for x in st["activity"]],
                               totals=[admin_pb2.StatementTotal(**t) for t in st["totals"]],
                               balances=[admin_pb2.StatementBalance(**b) for b in st["balances"]],
                               label=st["label"])
