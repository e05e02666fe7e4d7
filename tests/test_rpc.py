"""Every RPC against a real daemon process on loopback, with each core."""

from __future__ import annotations

import concurrent.futures
import time
from decimal import Decimal

import grpc
import pytest
from conftest import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

USD = 10**9


def usage(customer="demo", meter="input_tokens", quantity=1000, key="", **dims) -> pb.UsageEvent:
    e = pb.UsageEvent(customer_id=customer, meter=meter, dimensions=dims or {"model": "gpt-4o"},
                      idempotency_key=key)
    if isinstance(quantity, str):
        e.quantity_decimal = quantity
    else:
        e.quantity = quantity
    return e


def grant(d, customer, amount_nano, credit_type="usd", **kw):
    return d.admin.Grant(apb.GrantRequest(customer_id=customer, credit_type=credit_type,
                                          amount_nano=amount_nano, **kw))


def balance(d, customer, credit_type="usd"):
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    return next(b for b in resp.balances if b.credit_type == credit_type)


def _audit_kinds(daemon, customer: str) -> list[str]:
    return [e.kind for e in daemon.admin.ListAudit(apb.ListAuditRequest(customer_id=customer)).entries]


def invalid(call, field: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(field + ":"), info.value.details()


def test_report_allows_and_debits_exactly(daemon):
    r = daemon.meter.Report(pb.ReportRequest(event=usage(quantity=1000)))
    assert r.decision == pb.DECISION_ALLOW
    assert (r.credit_type, r.cost_nano, r.balance_nano) == ("usd", 2_500_000, 10 * USD - 2_500_000)
    assert balance(daemon, "demo").balance_nano == 10 * USD - 2_500_000


def test_report_denies_with_a_reason(daemon):
    grant(daemon, "small", 2_500_000)
    assert daemon.meter.Report(pb.ReportRequest(event=usage("small"))).decision == pb.DECISION_ALLOW
    r = daemon.meter.Report(pb.ReportRequest(event=usage("small", quantity=1)))
    assert (r.decision, r.reason, r.balance_nano) == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE, 0)
    r = daemon.meter.Report(pb.ReportRequest(event=usage("nobody")))
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_UNKNOWN_CUSTOMER)


def test_report_batch_counts_and_lists_denials(daemon):
    grant(daemon, "b", 5_000_000)  # two events of 1000 gpt-4o tokens
    events = [usage("b"), usage("ghost"), usage("b"), usage("b")]
    r = daemon.meter.ReportBatch(pb.ReportBatchRequest(client_id="t1", sequence=1, events=events))
    assert (r.accepted, r.denied, r.sequence, r.duplicate) == (2, 2, 1, False)
    assert [(d.index, d.reason) for d in r.denials] == [
        (1, pb.REASON_UNKNOWN_CUSTOMER), (3, pb.REASON_INSUFFICIENT_BALANCE)]
    assert balance(daemon, "b").balance_nano == 0


def test_report_stream_answers_each_batch_in_order(daemon):
    def batches():
        for seq in range(1, 21):
            yield pb.ReportBatchRequest(client_id="s1", sequence=seq,
                                        events=[usage(meter="requests", quantity=1, model="o3-mini")] * 3)
    results = list(daemon.meter.ReportStream(batches()))
    assert [r.sequence for r in results] == list(range(1, 21))
    assert all(r.accepted == 3 for r in results)
    # 60 requests at 1/3 premium request each: exactly 20 units
    assert balance(daemon, "demo", "premium_requests").balance_nano == 480 * USD


def test_batch_replay_is_counted_once(daemon):
    req = pb.ReportBatchRequest(client_id="p1", sequence=7, events=[usage()] * 4)
    first = daemon.meter.ReportBatch(req)
    again = daemon.meter.ReportBatch(req)
    assert (again.accepted, again.duplicate) == (first.accepted, True)
    older = daemon.meter.ReportBatch(pb.ReportBatchRequest(client_id="p1", sequence=3, events=[usage()]))
    assert older.duplicate and older.accepted == 0
    assert balance(daemon, "demo").balance_nano == 10 * USD - 4 * 2_500_000
    # another client's sequence 7 is its own
    assert not daemon.meter.ReportBatch(pb.ReportBatchRequest(client_id="p2", sequence=7, events=[usage()])).duplicate


def test_batch_replay_is_remembered_across_restart(daemon):
    req = pb.ReportBatchRequest(client_id="p1", sequence=1, events=[usage()] * 2)
    daemon.meter.ReportBatch(req)
    daemon.restart()
    assert daemon.meter.ReportBatch(req).duplicate
    assert balance(daemon, "demo").balance_nano == 10 * USD - 2 * 2_500_000


def test_unary_idempotency_key(daemon):
    req = pb.ReportRequest(event=usage(key="evt-1"))
    first = daemon.meter.Report(req)
    again = daemon.meter.Report(req)
    assert again.duplicate and again.cost_nano == first.cost_nano and again.balance_nano == first.balance_nano
    assert balance(daemon, "demo").balance_nano == 10 * USD - 2_500_000
    invalid(lambda: daemon.meter.Report(pb.ReportRequest(event=usage(quantity=5, key="evt-1"))), "idempotency_key")
    daemon.restart()
    assert daemon.meter.Report(req).duplicate


def test_authorize_commit_partial_returns_the_rest(daemon):
    a = daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="output_tokens", quantity=4096,
                                                   dimensions={"model": "gpt-4o"}))
    assert a.decision == pb.DECISION_ALLOW and a.reserved_nano == 4096 * 10_000
    b = balance(daemon, "demo")
    assert (b.reserved_nano, b.available_nano) == (a.reserved_nano, 10 * USD - a.reserved_nano)
    c = daemon.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=1000))
    assert (c.cost_nano, c.released_nano, c.overrun_nano) == (10_000_000, 4096 * 10_000 - 10_000_000, 0)
    b = balance(daemon, "demo")
    assert (b.balance_nano, b.reserved_nano) == (10 * USD - 10_000_000, 0)
    # settling twice answers the same, and does not debit again
    again = daemon.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=1000))
    assert again.duplicate and not c.duplicate
    again.duplicate = False
    assert again == c
    assert balance(daemon, "demo").balance_nano == 10 * USD - 10_000_000


def test_release_returns_everything(daemon):
    a = daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="gpu_seconds",
                                                   quantity_decimal="60.5", dimensions={"hardware": "nvidia-h100"}))
    assert a.reserved_nano == 92_262_500
    r = daemon.meter.Release(pb.ReleaseRequest(reservation_id=a.reservation_id))
    assert (r.released_nano, r.available_nano) == (92_262_500, 10 * USD)
    with pytest.raises(grpc.RpcError) as info:
        daemon.meter.Commit(pb.CommitRequest(reservation_id="r_unknown", quantity=1))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reservation_expires_after_its_ttl(daemon):
    a = daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="input_tokens", quantity=10**6,
                                                   dimensions={"model": "gpt-4o"}, ttl_ms=300))
    assert balance(daemon, "demo").reserved_nano == 2_500_000_000
    wait_until(lambda: balance(daemon, "demo").reserved_nano == 0, "the reservation to expire")
    with pytest.raises(grpc.RpcError) as info:
        daemon.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=1))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_concurrent_authorize_never_reserves_more_than_the_balance(daemon):
    grant(daemon, "ten", 10 * 2_500_000)  # fits exactly ten reservations of 1000 gpt-4o tokens
    req = pb.AuthorizeRequest(customer_id="ten", meter="input_tokens", quantity=1000,
                              dimensions={"model": "gpt-4o"})
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda _: daemon.meter.Authorize(req), range(100)))
    allowed = [r for r in results if r.decision == pb.DECISION_ALLOW]
    assert len(allowed) == 10
    assert all(r.reason == pb.REASON_INSUFFICIENT_BALANCE for r in results if r.decision == pb.DECISION_DENY)
    b = balance(daemon, "ten")
    assert (b.reserved_nano, b.available_nano) == (25_000_000, 0)


def test_get_balance_reports_grants_and_usage(daemon):
    daemon.meter.Report(pb.ReportRequest(event=usage(meter="gpu_seconds", quantity="1.25",
                                                     hardware="cpu")))
    resp = daemon.meter.GetBalance(pb.GetBalanceRequest(customer_id="demo"))
    assert {u.meter: u.quantity for u in resp.usage}["gpu_seconds"] == "1.250"
    usd = next(b for b in resp.balances if b.credit_type == "usd")
    assert usd.balance_nano == 10 * USD - 125_000
    assert [g.source for g in usd.grants] == ["catalog"]
    assert resp.period_start_ms < time.time() * 1000 < resp.period_end_ms
    with pytest.raises(grpc.RpcError) as info:
        daemon.meter.GetBalance(pb.GetBalanceRequest(customer_id="nobody"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_grants_are_spent_by_priority_and_audited(daemon):
    paid = grant(daemon, "g", 3 * USD, priority=10, source="topup", idempotency_key="k1")
    promo = grant(daemon, "g", USD, priority=0, source="promo")
    assert grant(daemon, "g", 3 * USD, priority=10, source="topup", idempotency_key="k1").duplicate
    daemon.meter.Report(pb.ReportRequest(event=usage("g", quantity=600_000)))  # $1.50
    grants = {g.grant_id: g.remaining_nano for g in balance(daemon, "g").grants}
    assert grants == {promo.grant_id: 0, paid.grant_id: int(2.5 * USD)}
    adj = daemon.admin.Adjust(apb.AdjustRequest(customer_id="g", credit_type="usd", amount_nano=-USD // 2,
                                                reason="goodwill reversal"))
    assert adj.balance_nano == 2 * USD
    entries = daemon.admin.ListAudit(apb.ListAuditRequest(customer_id="g")).entries
    assert [(e.kind, e.amount_nano, e.balance_before_nano, e.balance_after_nano) for e in entries] == [
        ("grant", 3 * USD, 0, 3 * USD), ("grant", USD, 3 * USD, 4 * USD),
        ("adjust", -USD // 2, int(2.5 * USD), 2 * USD)]
    assert entries[2].reference == "goodwill reversal"
    page = daemon.admin.ListAudit(apb.ListAuditRequest(customer_id="g", after_sequence=entries[0].sequence, limit=1))
    assert [e.sequence for e in page.entries] == [entries[1].sequence]


def test_expired_grant_is_removed_and_audited(daemon):
    grant(daemon, "e", USD, expires_at_ms=int(time.time() * 1000) + 400, source="promo")
    grant(daemon, "e", 2 * USD, source="paid")
    wait_until(lambda: "expire" in _audit_kinds(daemon, "e"), "the promo grant's expiry to be audited")
    assert balance(daemon, "e").balance_nano == 2 * USD
    assert _audit_kinds(daemon, "e") == ["grant", "grant", "expire"]


def test_admin_is_not_served_on_the_data_plane(daemon):
    from meterd.v1 import admin_pb2_grpc
    stub = admin_pb2_grpc.AdminStub(daemon.channel)
    with pytest.raises(grpc.RpcError) as info:
        stub.Grant(apb.GrantRequest(customer_id="x", credit_type="usd", amount_nano=1))
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_and_reflection(daemon):
    stub = health_pb2_grpc.HealthStub(daemon.channel)
    for service in ("", "meterd.v1.Meter"):
        assert stub.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(daemon.channel)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"meterd.v1.Meter", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("make, field", [
    (lambda: pb.ReportRequest(event=usage(meter="nope")), "event.meter"),
    (lambda: pb.ReportRequest(event=usage(quantity=-3)), "event.quantity"),
    (lambda: pb.ReportRequest(event=usage(quantity=2**62)), "event.quantity"),
    (lambda: pb.ReportRequest(event=usage(customer="")), "event.customer_id"),
    (lambda: pb.ReportRequest(event=usage(customer="c" * 200)), "event.customer_id"),
    (lambda: pb.ReportRequest(event=usage(meter="gpu_seconds", quantity="0.0001",
                                          hardware="cpu")), "event.quantity_decimal"),
    (lambda: pb.ReportRequest(), "event"),
])
def test_bad_reports_are_invalid_argument(daemon, make, field):
    invalid(lambda: daemon.meter.Report(make()), field)
    assert balance(daemon, "demo").balance_nano == 10 * USD


def test_bad_batches_are_rejected_whole(daemon):
    events = [usage()] * 5 + [usage(meter="nope")]
    invalid(lambda: daemon.meter.ReportBatch(pb.ReportBatchRequest(events=events)), "events[5].meter")
    invalid(lambda: daemon.meter.ReportBatch(pb.ReportBatchRequest(events=[usage()] * 8001)), "events")
    raw = daemon.channel.unary_unary("/meterd.v1.Meter/ReportBatch")
    invalid(lambda: raw(b"\x1a\x09garbage"), "events")
    invalid(lambda: raw(b"\x1a" + b"\x80" * 5 * 1_000_000), "batch")  # above batch_bytes_max
    assert balance(daemon, "demo").balance_nano == 10 * USD
    # a rejected batch does not consume its sequence
    ok = daemon.meter.ReportBatch(pb.ReportBatchRequest(client_id="x", sequence=1, events=[usage()]))
    assert ok.accepted == 1 and not ok.duplicate


def test_bad_control_plane_input(daemon):
    invalid(lambda: daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="input_tokens",
                                                               quantity=1, dimensions={"model": "gpt-4o"},
                                                               ttl_ms=10**8)), "ttl_ms")
    invalid(lambda: daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="zzz")), "meter")
    invalid(lambda: grant(daemon, "demo", 0), "amount_nano")
    invalid(lambda: grant(daemon, "demo", 5, credit_type="eur"), "credit_type")
    invalid(lambda: grant(daemon, "demo", 1, credit_type="premium_requests"), "amount_nano")  # 3 decimals
    invalid(lambda: grant(daemon, "bad id", 5), "customer_id")
    invalid(lambda: grant(daemon, "demo", 5, expires_at_ms=1000), "expires_at_ms")
    invalid(lambda: daemon.admin.Adjust(apb.AdjustRequest(customer_id="demo", credit_type="usd", amount_nano=5)),
            "reason")
    invalid(lambda: daemon.admin.ListAudit(apb.ListAuditRequest(customer_id="demo", limit=5000)), "limit")
    raw = daemon.channel.unary_unary("/meterd.v1.Meter/Authorize")
    invalid(lambda: raw(b"\xff\xff"), "request")


def test_state_survives_restart_and_kill(daemon):
    daemon.meter.ReportBatch(pb.ReportBatchRequest(events=[usage()] * 10))
    a = daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="input_tokens", quantity=1000,
                                                   dimensions={"model": "gpt-4o"}))
    grant(daemon, "new", USD)
    daemon.restart()
    assert balance(daemon, "demo").balance_nano == 10 * USD - 10 * 2_500_000
    assert balance(daemon, "demo").reserved_nano == 2_500_000
    daemon.meter.Report(pb.ReportRequest(event=usage()))
    daemon.kill()
    daemon.start()
    b = balance(daemon, "demo")
    assert (b.balance_nano, b.reserved_nano) == (10 * USD - 11 * 2_500_000, 2_500_000)
    assert balance(daemon, "new").balance_nano == USD
    assert daemon.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=0)).cost_nano == 0


def test_commit_and_release_cannot_both_settle_a_reservation(daemon):
    def authorize():
        return daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="requests", quantity=3,
                                                          dimensions={"model": "o1"}))
    a = authorize()
    daemon.meter.Release(pb.ReleaseRequest(reservation_id=a.reservation_id))
    with pytest.raises(grpc.RpcError) as info:
        daemon.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=3))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    b = authorize()
    daemon.meter.Commit(pb.CommitRequest(reservation_id=b.reservation_id, quantity=1))
    with pytest.raises(grpc.RpcError) as info:
        daemon.meter.Release(pb.ReleaseRequest(reservation_id=b.reservation_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    invalid(lambda: daemon.meter.Commit(pb.CommitRequest(reservation_id=b.reservation_id, quantity=2)),
            "quantity")
    assert balance(daemon, "demo", "premium_requests").balance_nano == 490 * USD


def test_idempotent_retry_may_order_map_entries_differently(daemon):
    one = pb.ReportRequest(event=usage(key="k", model="gpt-4o", region="eu"))
    raw = daemon.channel.unary_unary("/meterd.v1.Meter/Report")
    first = pb.ReportResponse.FromString(raw(one.SerializeToString(deterministic=True)))
    # the same request with its dimensions in the other order on the wire
    entries = [pb.UsageEvent(dimensions={k: v}).SerializeToString() for k, v in (("region", "eu"), ("model", "gpt-4o"))]
    event = pb.UsageEvent(customer_id="demo", meter="input_tokens", quantity=1000, idempotency_key="k")
    body = event.SerializeToString() + b"".join(entries)
    again = pb.ReportResponse.FromString(raw(b"\x0a" + bytes([len(body)]) + body))
    assert again.duplicate and again.balance_nano == first.balance_nano


def _expired_at(daemon, customer: str, expires_at_ms: int) -> None:
    """Grant ``customer`` $1 that expires at ``expires_at_ms`` and wait until its expiry is audited:
    the sweep that expired it also looked at every other grant due by then, in the same commit."""
    grant(daemon, customer, USD, expires_at_ms=expires_at_ms)
    wait_until(lambda: "expire" in _audit_kinds(daemon, customer), f"the grant of {customer} to expire")


def test_expiring_grant_does_not_take_reserved_money(daemon):
    expires_at_ms = int(time.time() * 1000) + 600
    grant(daemon, "x", 10 * USD, expires_at_ms=expires_at_ms)
    grant(daemon, "x", 10 * USD)
    a = daemon.meter.Authorize(pb.AuthorizeRequest(customer_id="x", meter="input_tokens", quantity=6_100_000,
                                                   dimensions={"model": "gpt-4o"}))  # $15.25
    assert a.decision == pb.DECISION_ALLOW
    _expired_at(daemon, "x-mark", expires_at_ms)  # x's expiring grant is due too
    # the hold stands on the expiring grant first (it is spent first): none of it expires yet
    b = balance(daemon, "x")
    assert (b.balance_nano, b.reserved_nano) == (20 * USD, a.reserved_nano)
    c = daemon.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=6_100_000))
    assert (c.balance_nano, c.overrun_nano) == (20 * USD - a.reserved_nano, 0)
    _expired_at(daemon, "x-mark-2", int(time.time() * 1000) + 100)  # a sweep after the commit looked at x again
    # the expiring grant was spent in full: nothing is left to expire
    assert balance(daemon, "x").balance_nano == 20 * USD - a.reserved_nano
    assert _audit_kinds(daemon, "x") == ["grant", "grant"]


def test_audit_paging_at_the_end_of_the_range(daemon):
    page = daemon.admin.ListAudit(apb.ListAuditRequest(customer_id="demo", after_sequence=2**64 - 1))
    assert list(page.entries) == []


def test_duration_session_over_grpc(daemon):
    s = daemon.meter.StartSession(pb.StartSessionRequest(customer_id="demo", meter="gpu_seconds",
                                                         dimensions={"hardware": "nvidia-h100"},
                                                         heartbeat_timeout_ms=5000))
    assert s.decision == pb.DECISION_ALLOW and s.session_id

    def billed_heartbeat() -> pb.SessionResponse | None:  # once the daemon's clock has moved on
        h = daemon.meter.Heartbeat(pb.HeartbeatRequest(session_id=s.session_id))
        assert h.decision == pb.DECISION_ALLOW and not h.closed
        return h if Decimal(h.billed_quantity) > 0 else None

    h = wait_until(billed_heartbeat, "a heartbeat to bill some of the session's time")
    end = daemon.meter.EndSession(pb.EndSessionRequest(session_id=s.session_id))
    millis = int(end.billed_quantity.replace(".", ""))
    assert millis >= int(h.billed_quantity.replace(".", "")) > 0 and end.closed  # billed up to the end
    assert end.cost_nano == millis * 1_525  # $0.001525 a second, to the millisecond
    b = balance(daemon, "demo")
    assert (b.balance_nano, b.reserved_nano) == (10 * USD - end.cost_nano, 0)
    # A retried EndSession or Heartbeat (its first answer lost) learns what was billed, and bills nothing more.
    for again in (daemon.meter.EndSession(pb.EndSessionRequest(session_id=s.session_id)),
                  daemon.meter.Heartbeat(pb.HeartbeatRequest(session_id=s.session_id))):
        assert again.duplicate and not end.duplicate
        again.duplicate = False
        assert again == end
    assert balance(daemon, "demo").balance_nano == 10 * USD - end.cost_nano
    with pytest.raises(grpc.RpcError) as info:
        daemon.meter.Heartbeat(pb.HeartbeatRequest(session_id="s_never_started"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_report_batch_details_over_grpc(daemon):
    r = daemon.meter.ReportBatch(pb.ReportBatchRequest(details=True, events=[usage(), usage("ghost")]))
    assert [(x.index, x.decision, x.credit_type, x.cost_nano, x.balance_nano) for x in r.results] == [
        (0, pb.DECISION_ALLOW, "usd", 2_500_000, 10 * USD - 2_500_000), (1, pb.DECISION_DENY, "usd", 0, 0)]
    assert r.results[1].reason == pb.REASON_UNKNOWN_CUSTOMER


def test_a_stream_that_fails_mid_way_is_made_whole_by_retrying_its_sequences(daemon):
    def batches(bad: int):
        for seq in range(1, 11):
            meter = "nope" if seq == bad else "requests"
            yield pb.ReportBatchRequest(client_id="retry", sequence=seq,
                                        events=[usage(meter=meter, quantity=1, model="gpt-4o")] * 5)
    with pytest.raises(grpc.RpcError) as info:
        list(daemon.meter.ReportStream(batches(bad=5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the client resends every batch it has no answer for; each is counted once
    answers = list(daemon.meter.ReportStream(batches(bad=0)))
    assert [a.sequence for a in answers] == list(range(1, 11))
    assert [a.duplicate for a in answers] == [True] * 4 + [False] * 6  # 1-4 were answered before
    used = {u.meter: u.quantity for u in daemon.meter.GetBalance(pb.GetBalanceRequest(customer_id="demo")).usage}
    assert used["requests"] == "50"
    assert balance(daemon, "demo", "premium_requests").balance_nano == 450 * USD
