"""Retries are never applied twice inside the idempotency window: keys live in
LMDB with a quota per tenant, settled answers have a budget of their own, and a
full store refuses new keyed calls instead of forgetting live keys."""

from __future__ import annotations

import grpc
import pytest
from conftest import ACME, GLOBEX

from meterd import wire
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

USD = 10**9
def _balance(d, customer: str) -> int:
    metadata = ACME if customer.startswith("acme-") else GLOBEX if customer.startswith("globex-") else None
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer), metadata=metadata)
    return next(b.balance_nano for b in r.balances if b.credit_type == "usd")


def _event(customer: str, key: str = "", tokens: int = 1000) -> pb.UsageEvent:
    return pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=tokens, dimensions={"model": "gpt-4o"},
                         idempotency_key=key)


SMALL = {"METERD_IDEMPOTENCY_KEYS_MAX": "50", "METERD_IDEMPOTENCY_KEYS_PER_TENANT_MAX": "50"}


def test_a_grant_retried_after_many_settlements_is_granted_once(make_daemon):
    d = make_daemon(extra_env=SMALL).start()
    grant = apb.GrantRequest(customer_id="demo", credit_type="usd", amount_nano=25 * USD,
                             idempotency_key="payment-8812")
    first = d.admin.Grant(grant)
    for _ in range(50):  # settled answers do not use the key budget of unary calls
        a = d.meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="output_tokens", quantity=10,
                                                  dimensions={"model": "gpt-4o"}))
        d.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=10))
    before = _balance(d, "demo")
    again = d.admin.Grant(grant)
    assert again.duplicate and again.grant_id == first.grant_id
    assert _balance(d, "demo") == before
    d.restart()  # the keys are in LMDB
    assert d.admin.Grant(grant).duplicate and _balance(d, "demo") == before


def test_one_tenants_keyed_calls_cannot_make_another_tenants_retry_apply_twice(tenants):
    d, stub = tenants(METERD_IDEMPOTENCY_KEYS_MAX="100", METERD_IDEMPOTENCY_KEYS_PER_TENANT_MAX="50")
    keyed = pb.ReportRequest(event=_event("globex-1", "req-1"))
    first = stub.Report(keyed, metadata=GLOBEX)
    for i in range(55):  # denied: the customer does not exist; nothing is remembered for it
        r = stub.Report(pb.ReportRequest(event=_event("acme-ghost", f"k{i}")), metadata=ACME)
        assert r.reason == pb.REASON_UNKNOWN_CUSTOMER
    for i in range(50):  # acme fills its own quota with real keys
        stub.Report(pb.ReportRequest(event=_event("acme-1", f"a{i}", tokens=1)), metadata=ACME)
    again = stub.Report(keyed, metadata=GLOBEX)
    assert again.duplicate and again.balance_nano == first.balance_nano
    assert _balance(d, "globex-1") == first.balance_nano


def test_a_full_key_store_refuses_new_keys_and_still_replays_old_ones(tenants):
    d, stub = tenants(METERD_IDEMPOTENCY_KEYS_MAX="12", METERD_IDEMPOTENCY_KEYS_PER_TENANT_MAX="5")
    for i in range(5):
        stub.Report(pb.ReportRequest(event=_event("acme-1", f"k{i}")), metadata=ACME)
    spent = _balance(d, "acme-1")
    with pytest.raises(grpc.RpcError) as info:
        stub.Report(pb.ReportRequest(event=_event("acme-1", "k5")), metadata=ACME)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "idempotency_keys_per_tenant_max=5" in info.value.details()
    assert _balance(d, "acme-1") == spent  # the refused call applied nothing
    assert stub.Report(pb.ReportRequest(event=_event("acme-1", "k0")), metadata=ACME).duplicate  # still kept
    # Without a key the call goes through; another tenant's quota is its own.
    assert stub.Report(pb.ReportRequest(event=_event("acme-1")), metadata=ACME).decision == pb.DECISION_ALLOW
    assert stub.Report(pb.ReportRequest(event=_event("globex-1", "k0")), metadata=GLOBEX).duplicate is False
    with pytest.raises(grpc.RpcError) as info:  # Authorize keys share the tenant's quota
        stub.Authorize(pb.AuthorizeRequest(customer_id="acme-1", meter="output_tokens", quantity=1,
                                           dimensions={"model": "gpt-4o"}, idempotency_key="a1"), metadata=ACME)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # The admin's keys are outside the tenants' quotas.
    assert not d.admin.Grant(apb.GrantRequest(customer_id="acme-1", credit_type="usd", amount_nano=USD,
                                              idempotency_key="pay-1")).duplicate


def test_a_settled_answer_is_replayed_only_to_its_tenant(tenants):
    d, stub = tenants()
    a = stub.Authorize(pb.AuthorizeRequest(customer_id="acme-1", meter="output_tokens", quantity=10,
                                           dimensions={"model": "gpt-4o"}), metadata=ACME)
    commit = pb.CommitRequest(reservation_id=a.reservation_id, quantity=5)
    first = stub.Commit(commit, metadata=ACME)
    with pytest.raises(grpc.RpcError) as info:
        stub.Commit(commit, metadata=GLOBEX)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    again = stub.Commit(commit, metadata=ACME)
    assert again.duplicate and again.cost_nano == first.cost_nano


def test_settled_answers_have_a_budget_and_a_reservation_needs_room_for_its_own(tenants):
    d, stub = tenants(METERD_SETTLED_ANSWERS_MAX="4", METERD_SETTLED_ANSWERS_PER_TENANT_MAX="3")

    def authorize(customer: str, metadata):
        return stub.Authorize(pb.AuthorizeRequest(customer_id=customer, meter="output_tokens", quantity=10,
                                                  dimensions={"model": "gpt-4o"}), metadata=metadata)

    open_one = authorize("acme-1", ACME)
    for _ in range(2):
        stub.Commit(pb.CommitRequest(reservation_id=authorize("acme-1", ACME).reservation_id, quantity=1),
                    metadata=ACME)
    with pytest.raises(grpc.RpcError) as info:  # two answers kept and one open hold: acme's 3 are taken
        authorize("acme-1", ACME)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "settled_answers_per_tenant_max=3" in info.value.details()
    authorize("globex-1", GLOBEX)  # the fourth place of the daemon
    with pytest.raises(grpc.RpcError) as info:
        authorize("globex-1", GLOBEX)
    assert "settled_answers_max=4" in info.value.details()
    # The open reservation can always settle: its answer's place was kept for it.
    assert not stub.Commit(pb.CommitRequest(reservation_id=open_one.reservation_id, quantity=1),
                           metadata=ACME).duplicate


def test_keys_remembered_by_an_older_meterd_are_kept_after_the_upgrade(tmp_path, monkeypatch):
    from billing import Billing

    from meterd.idempotency import digest as _hash_request
    from meterd.store import u64
    from meterd.wire import canonical as _canonical
    b = Billing(tmp_path, "openai", monkeypatch)
    try:
        grant = apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=25 * USD,
                                 idempotency_key="payment-1")
        report = pb.ReportRequest(event=_event("acme", "req-1"))
        first_grant = apb.GrantResponse(grant_id="g_77", balance_nano=35 * USD)
        first_report = pb.ReportResponse(decision=pb.DECISION_ALLOW, credit_type="usd", cost_nano=2_500_000,
                                         balance_nano=35 * USD - 2_500_000)
        expires = u64(b.now_ms + 3_600_000)
        b.restart()
        b.engine.store.stop()
        # The rows an older meterd left: one FIFO table of every key, no tenant, no expiry index.
        b.engine.store.write_now([
            ("idem", b"grant\x00acme\x00payment-1",
             expires + _hash_request(_canonical(grant)) + first_grant.SerializeToString()),
            ("idem", b"report\x00acme\x00req-1",
             expires + _hash_request(_canonical(report)) + first_report.SerializeToString()),
            ("idem", b"grant\x00acme\x00long-gone", u64(b.now_ms - 1) + b"\x00" * 8),
            ("meta", b"answers_format", None)])
        b.restart(clean=False)
        before = b.bal("acme", "usd")
        again = apb.GrantResponse.FromString(b.run(wire.grant(b.engine, grant)))
        assert again.duplicate and again.grant_id == "g_77"
        replay = pb.ReportResponse.FromString(b.run(b.engine.report(report.SerializeToString())))
        assert replay.duplicate and replay.cost_nano == 2_500_000
        assert b.bal("acme", "usd") == before
        assert b.engine.idem.counts == {"(admin)": 1, "": 1}  # the expired one was dropped
        b.advance(3_600_001)
        b.tick()
        assert b.engine.idem.counts == {}
        assert not apb.GrantResponse.FromString(b.run(wire.grant(b.engine, grant))).duplicate  # its window is over
    finally:
        b.close()


def test_a_tenants_keys_remembered_by_an_older_meterd_stay_that_tenants(tmp_path, monkeypatch):
    import dataclasses

    from billing import Billing
    from conftest import tokens_file

    from meterd.idempotency import digest as _hash_request
    from meterd.security import Tenant
    from meterd.store import u64
    from meterd.wire import canonical as _canonical
    b = Billing(tmp_path, "openai", monkeypatch)
    try:
        b.grant("acme-1", "usd", 10 * USD)
        report = pb.ReportRequest(event=_event("acme-1", "req-1"))
        first = pb.ReportResponse(decision=pb.DECISION_ALLOW, credit_type="usd", cost_nano=2_500_000,
                                  balance_nano=10 * USD - 2_500_000)
        b.restart()
        b.engine.store.stop()
        b.engine.store.write_now([
            ("idem", b"report\x00acme-1\x00req-1",
             u64(b.now_ms + 3_600_000) + _hash_request(_canonical(report)) + first.SerializeToString()),
            ("meta", b"answers_format", None)])
        b.settings = dataclasses.replace(b.settings, data_tokens_file=str(tokens_file(tmp_path)))
        b.restart(clean=False)  # the upgrade, on a daemon with data-plane tokens
        acme = Tenant("acme", b"acme-", b"acme\x00")
        before = b.bal("acme-1", "usd")
        replay = pb.ReportResponse.FromString(b.run(b.engine.report(report.SerializeToString(), acme)))
        assert replay.duplicate and b.bal("acme-1", "usd") == before
        assert b.engine.idem.counts == {"acme": 1}
    finally:
        b.close()


def test_retries_of_remembered_keyed_calls_are_answered_while_writes_are_refused(tmp_path, monkeypatch):
    from billing import Billing

    from meterd.errors import StorageFull
    b = Billing(tmp_path, "openai", monkeypatch)
    try:
        grant = apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=5 * USD, idempotency_key="p-1")
        report = pb.ReportRequest(event=_event("acme", "r-1")).SerializeToString()
        authorize = pb.AuthorizeRequest(customer_id="acme", meter="output_tokens", quantity=10,
                                        dimensions={"model": "gpt-4o"}, idempotency_key="a-1")
        first = (b.run(wire.grant(b.engine, grant)), b.run(b.engine.report(report)),
                 b.run(wire.authorize(b.engine, authorize)))
        b.engine.store.use.refusing = True  # as above the map's high-water mark
        again = (apb.GrantResponse.FromString(b.run(wire.grant(b.engine, grant))),
                 pb.ReportResponse.FromString(b.run(b.engine.report(report))),
                 pb.AuthorizeResponse.FromString(b.run(wire.authorize(b.engine, authorize))))
        assert all(r.duplicate for r in again)
        for retry, original in zip(again, first, strict=True):
            retry.duplicate = False
            assert retry.SerializeToString() == original
        with pytest.raises(StorageFull):  # a new key, or none, is refused as any write is
            b.run(b.engine.report(pb.ReportRequest(event=_event("acme", "r-2")).SerializeToString()))
        with pytest.raises(StorageFull):
            b.run(b.engine.report(pb.ReportRequest(event=_event("acme")).SerializeToString()))
    finally:
        b.engine.store.use.refusing = False
        b.close()


def test_subscribe_answers_what_it_made_even_when_a_change_lands_during_its_commit(tmp_path, monkeypatch):
    import asyncio

    from billing import Billing

    (tmp_path / "c.toml").write_text('[credit_types.usd]\nkind = "fiat"\ncurrency = "USD"\n'
                                     '[meters.calls]\ncredit_type = "usd"\nprice = "0.01"\n'
                                     '[plans.basic]\nperiod = "month"\nfee = { usd = "10.00" }\n'
                                     '[plans.pro]\nperiod = "month"\nfee = { usd = "20.00" }\n')
    b = Billing(tmp_path, str(tmp_path / "c.toml"), monkeypatch)
    try:
        b.grant("c1", "usd", 5 * USD)
        subscribe = apb.SubscribeRequest(customer_id="c1", plan="basic", idempotency_key="k1")

        async def together() -> list[bytes]:
            return await asyncio.gather(
                wire.subscribe(b.engine, subscribe),
                wire.cancel(b.engine, apb.CancelRequest(customer_id="c1", at_period_end=True)),
                wire.change_plan(b.engine, apb.ChangePlanRequest(customer_id="c1", plan="pro")))

        first = apb.Subscription.FromString(b.run(together())[0])
        assert first.plan == "basic" and not first.cancel_at_period_end
        assert apb.Subscription.FromString(b.run(wire.subscribe(b.engine, subscribe))) == first  # its retry
    finally:
        b.close()


def test_authorize_while_writes_are_refused_answers_the_refusal_for_any_customer(tmp_path, monkeypatch):
    from billing import Billing

    from meterd.errors import Unavailable
    from meterd.security import Tenant
    b = Billing(tmp_path, "openai", monkeypatch)
    try:
        b.engine.journal.closing = True  # as while shutting down
        tenant = Tenant("t1", b"t1-", b"t1\x00")
        req = pb.AuthorizeRequest(customer_id="other-1", meter="input_tokens", quantity=10,
                                  dimensions={"model": "gpt-4o"})
        with pytest.raises(Unavailable):  # as Report answers; not which customers the token has
            b.run(wire.authorize(b.engine, req, tenant))
    finally:
        b.engine.journal.closing = False
        b.close()
