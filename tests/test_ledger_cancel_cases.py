"""Plans in ledger mode: a cancel that waits for the sidecars, catalog customers added by a reload,
top-up requests on a grant's expiry. Each case failed on an earlier version."""
# ruff: noqa: F401, F811 - the fixtures local and node are those of the plans' other tests

from __future__ import annotations

import pytest
from billing import NANO, START_MS, Billing
from test_ledger_plans import CAPPED, CATALOG, Central
from test_ledger_plans_sidecars import beats, central_balance, gpt, local, node

from meterd.catalog import load_catalog
from meterd.errors import MeterdError, NotFound
from meterd.escrow import Escrow
from meterd.ledger import Ledger, Settlement
from meterd.ledger_plans import LedgerPlans
from meterd.v1 import meter_pb2 as pb


@pytest.fixture
def capped_pair(tmp_path, monkeypatch, ledger_url):
    """A local-mode sidecar and the ledger's plans (no sidecar: the test plays them), on the CAPPED catalog."""
    path = tmp_path / "capped.toml"
    path.write_text(CAPPED)
    local = Billing(tmp_path / "local", str(path), monkeypatch)
    central = Central(ledger_url, str(path))
    yield local, central
    local.close()
    central.ledger.close()


def _spend_60_unflushed_then_cancel(node, local):
    """Sidecar a spends 50 included + 10 of overage and has not flushed; b's Admin cancels now."""
    a, b = node("s0"), node("s1")
    for x in (a, local):
        x.subscribe("acme", "pro")
    for _ in range(60):
        assert gpt(a) == gpt(local) == pb.DECISION_ALLOW
    for x in (b, local):
        x.cancel("acme")
    return a, b


# Failed before its fix: A second Cancel (a client retry, or an operator on another sidecar) while the first waits for
# the sidecars: its roll(force=True) ends the subscription at once, from what is settled, so the overage a sidecar
# spent before the (first) cancel and settles afterwards is never billed.
def test_a_repeated_cancel_does_not_drop_the_overage_the_first_cancel_waits_for(node, local, ledger_url):
    a, b = _spend_60_unflushed_then_cancel(node, local)
    for x in (b, local):  # local mode: the subscription is gone, the repeat is refused
        with pytest.raises(MeterdError):
            x.cancel("acme")
    beats(a, 2)  # a answers the recall: it settles the 60 it spent
    with Ledger(ledger_url) as lg:
        assert LedgerPlans(Escrow(lg), a.catalog).subscription("acme") is None
        assert [e.charge_nano for e in local.audit("acme", "overage_charged")] == [4 * NANO // 10]
        assert [e.charge_nano for e in lg.entries("acme") if e.kind == "overage_charged"] == [4 * NANO // 10]
        assert central_balance(lg, b)["balance_nano"] == local.bal("acme", "requests") == 0
        assert Escrow(lg).check() == []


# Failed before its fix: A grant while a cancel waits: _cancelled() nets the overage spent before the cancel against
# credit granted after it (_net takes any bucket with credit left), so that overage is not billed and the new grant is
# eaten instead. Local mode bills the overage at the cancel and the grant stays whole.
def test_a_grant_while_a_cancel_waits_does_not_pay_the_cancelled_periods_overage(node, local, ledger_url):
    a, b = _spend_60_unflushed_then_cancel(node, local)
    for x in (b, local):
        x.grant("acme", "requests", 20 * NANO)
    beats(a, 2)
    with Ledger(ledger_url) as lg:
        assert LedgerPlans(Escrow(lg), a.catalog).subscription("acme") is None
        assert local.bal("acme", "requests") == 20 * NANO
        assert [e.charge_nano for e in local.audit("acme", "overage_charged")] == [4 * NANO // 10]
        assert [e.charge_nano for e in lg.entries("acme") if e.kind == "overage_charged"] == [4 * NANO // 10]
        assert central_balance(lg, b)["balance_nano"] == 20 * NANO
        assert Escrow(lg).check() == []


# Failed before its fix: The cancel waits only for leases of the period's credits (_at_leases, _unsettled), but its
# _net counts credit at any lease as credit left: a sidecar holding a bought grant it has spent (not settled yet)
# makes the overage another sidecar spent and settled vanish from the bill; when it settles, the customer is overdrawn
# instead (requests owed, no money billed).
def test_a_cancel_bills_overage_when_another_lease_holds_spent_grant_credit(capped_pair):
    local, central = capped_pair
    now = START_MS
    local.subscribe("acme", "pro")
    local.grant("acme", "requests", 20 * NANO)
    for _ in range(80):  # 50 included, 20 granted, 10 of overage
        assert gpt(local) == pb.DECISION_ALLOW
    local.cancel("acme")

    es = central.escrow
    central.plans.subscribe("acme", "pro", now, now)
    es.grant("acme", "requests", 20 * NANO, 0, 0, "api", "", now)
    assert es.acquire("sx", "ix", "acme", "requests", 50 * NANO, 50 * NANO, 1, now).amount_nano == 50 * NANO
    assert es.acquire("sy", "iy", "acme", "requests", 20 * NANO, 20 * NANO, 1, now).amount_nano == 20 * NANO
    assert es.acquire("sx", "ix", "acme", "requests", 10 * NANO, 10 * NANO, 1, now).amount_nano == 60 * NANO
    es.settle("sx", "ix", [Settlement("acme", "requests", 60 * NANO)], now)  # sx flushed its 60
    # sy spent its 20 granted requests and has not flushed yet when the cancel comes
    central.plans.cancel("acme", False, now + 1000)
    lease = es._lease("sy", "acme", "requests")
    es.give_back("sy", "iy", "acme", "requests", lease.returned_total_nano, now + 1020, 20 * NANO)
    central.plans.roll("acme", now + 1020)
    assert central.plans.subscription("acme") is None

    billed = [(e.amount_nano, e.charge_nano) for e in central.ledger.entries("acme") if e.kind == "overage_charged"]
    assert [(e.amount_nano, e.charge_nano) for e in local.audit("acme", "overage_charged")] == \
        [(10 * NANO, 4 * NANO // 10)]
    assert billed == [(10 * NANO, 4 * NANO // 10)]
    bal = next(x for x in es.balance("acme", now + 1020) if x["credit_type"] == "requests")
    assert bal["balance_nano"] == local.bal("acme", "requests") == 0
    assert es.check() == []


# Failed before its fix: A ChangePlan from a sidecar whose clock is a little behind the cancelling one's (well within
# lease_clock_skew_max_ms): roll(force=True) finds nothing due (the cancelled period ends at the other's clock), so
# the upgrade goes through on a cancelled subscription and bills the fee difference for the whole billing period left;
# the cancel then ends it anyway. Local mode refuses: the customer has no subscription.
def test_an_upgrade_while_a_cancel_waits_is_refused_whatever_the_callers_clock(tmp_path, ledger_url):
    path = tmp_path / "plans.toml"
    path.write_text(CATALOG)
    central = Central(ledger_url, str(path))
    try:
        now = START_MS
        central.plans.subscribe("acme", "basic", now, now)
        central.escrow.acquire("s1", "i1", "acme", "credits", 10 * NANO, 10 * NANO, 1, now)  # a sidecar's lease
        t = now + 86_400_000
        central.plans.cancel("acme", False, t)  # through a sidecar at t: it waits for s1
        with pytest.raises(NotFound):
            central.plans.change_plan("acme", "pro", t - 500)  # another sidecar, 0.5 s behind
        assert [e.reference for e in central.ledger.entries("acme") if e.kind == "fee"] == ["basic period 0"]
    finally:
        central.ledger.close()


# Failed before its fix: Catalog customers with a plan are subscribed from the sidecar's catalog at its start only
# (Leases.seed from Recovery.seed): a customer a reload adds is subscribed by local mode's reload (Recovery.seed_ops)
# but never in the ledger, until some sidecar restarts.
def test_a_catalog_customer_added_by_a_reload_is_subscribed_in_the_ledger(node, ledger_url, tmp_path, monkeypatch):
    seeded = CAPPED + '\n[customers.newco]\nplan = "pro"\n'
    lpath = tmp_path / "local_plain.toml"
    lpath.write_text(CAPPED)
    local = Billing(tmp_path / "local", str(lpath), monkeypatch)
    try:
        a = node("s0")
        beats(a, 1)
        new = tmp_path / "seeded.toml"
        new.write_text(seeded)
        for x in (a, local):
            x.run(x.engine.reload_catalog(load_catalog(str(new))))
        beats(a, 2)
        assert local.engine.subscriptions.subs["newco"].plan == "pro"
        with Ledger(ledger_url) as lg:
            sub = LedgerPlans(Escrow(lg), a.catalog).subscription("newco")
            assert sub is not None and sub.plan == "pro"
    finally:
        local.close()


# Failed before its fix: Top-up requests are asked only by a settlement (Escrow._ask_topup from _settle_one): a bought
# grant that expires takes the balance below low_balance and local mode asks for a top-up (its grant expiry debits the
# balance, and the core's alert fires); the ledger never asks, then or later (the next settlements start below the
# threshold, so none of them "takes it below").
def test_a_grant_expiring_below_low_balance_asks_for_a_top_up_as_in_local_mode(node, local, ledger_url):
    a = node("s0")
    for x in (a, local):
        x.subscribe("acme", "topped")  # 50 included, a top-up to 50 asked below 10
        x.grant("acme", "requests", 30 * NANO, priority=5, expires_at_ms=x.clock.ms + 3_600_000)
    for _ in range(45):  # of the included: 5 left, and the 30 granted
        assert gpt(a) == gpt(local) == pb.DECISION_ALLOW
    a.flush()
    for x in (a, local):
        x.clock.ms += 3_600_001  # the grant expires: 5 left, below 10
    local.tick()
    beats(a, 2)
    for _ in range(2):
        assert gpt(a) == gpt(local) == pb.DECISION_ALLOW
    a.flush()
    beats(a, 2)
    assert local.bal("acme", "requests") == 3 * NANO
    with Ledger(ledger_url) as lg:
        assert central_balance(lg, a)["balance_nano"] == 3 * NANO
        central = [e.charge_nano for e in lg.entries("acme") if e.kind == "auto_topup_requested"]
    assert [e.charge_nano for e in local.audit("acme", "auto_topup_requested")] == [45 * NANO]
    assert central == [45 * NANO]


def test_a_subscribe_while_a_cancel_waits_is_refused_until_the_sidecars_have_settled(node, local, ledger_url):
    """Ending the cancel early would bill it from what is settled and take what the sidecars spent
    before it out of the new subscription's credits: it is refused, saying why, until they settle."""
    from meterd.errors import Conflict
    a, b = _spend_60_unflushed_then_cancel(node, local)
    with pytest.raises(Conflict, match="being cancelled"):
        b.subscribe("acme", "pro")
    beats(a, 2)
    for x in (b, local):
        x.subscribe("acme", "pro")
    with Ledger(ledger_url) as lg:
        assert [e.charge_nano for e in lg.entries("acme") if e.kind == "overage_charged"] == [4 * NANO // 10]
        assert central_balance(lg, b)["balance_nano"] == local.bal("acme", "requests") == 50 * NANO
        assert Escrow(lg).check() == []


def test_a_catalog_balance_changed_after_it_was_granted_is_not_granted_again(node, ledger_url):
    """As local mode grants a catalog balance once: a later catalog with another amount neither
    grants again nor stops the heartbeat (its key was refused as used with another request)."""
    from test_ledger_plans_sidecars import FREE_METER
    first = FREE_METER + '[customers.acme]\nbalances = { usd = "10" }\n'
    a = node("s0", catalog=first)
    beats(a, 1)
    b = node("s1", catalog=first.replace('"10"', '"20"'))
    beats(b, 2)
    assert not b.engine.leases.seeds and b.engine.leases.reachable
    with Ledger(ledger_url) as lg:
        assert central_balance(lg, b, "usd")["balance_nano"] == 10 * NANO
