"""Plans in ledger mode at the sidecars: holds across a boundary, a cancel, leases' ends (idle,
failed, a catalog reload), early-bill flags, balances. Each case failed on an earlier version."""

from __future__ import annotations

import pytest
from billing import NANO, START_MS, Billing
from test_ledger_plans import CAPPED, CATALOG, Central

from meterd.catalog import load_catalog
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.v1 import meter_pb2 as pb


@pytest.fixture
def node(tmp_path, monkeypatch, ledger_url):
    """One sidecar in ledger mode on the CAPPED catalog, its heartbeat driven by the test (beat())."""
    made = []

    def make(sid: str = "s0", catalog: str = CAPPED, **settings) -> Billing:
        path = tmp_path / f"capped-{sid}.toml"
        path.write_text(catalog)
        b = Billing(tmp_path / sid, str(path), monkeypatch, ledger=ledger_url, sidecar_id=sid, balances="ledger",
                    **{"lease_heartbeat_ms": 20, "lease_wait_ms": 2_000, **settings})
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


@pytest.fixture
def plans_catalog(tmp_path):
    path = tmp_path / "plans.toml"
    path.write_text(CATALOG)
    return str(path)


@pytest.fixture
def local(tmp_path, monkeypatch):
    """A local-mode sidecar on the same catalog: the reference semantics."""
    path = tmp_path / "capped_local.toml"
    path.write_text(CAPPED)
    b = Billing(tmp_path / "local", str(path), monkeypatch)
    yield b
    b.close()


def end_of(b: Billing, lg: Ledger) -> int:
    return LedgerPlans(Escrow(lg), b.catalog).subscription("acme").end_ms


def rolls(lg: Ledger, customer: str = "acme") -> int:
    (n,), = lg._rows("SELECT COUNT(*) FROM meterd_rolls WHERE customer_id = ?", (customer,))
    return int(n)


def gpt(b: Billing, n: int = 1) -> int:
    return b.report("acme", "requests", n, model="gpt-4o").decision


def beats(b: Billing, n: int = 5) -> None:
    for _ in range(n):
        b.run(b.engine.leases.beat())
        b.clock.ms += 20


def central_balance(lg: Ledger, b: Billing, ct: str = "requests") -> dict:
    return next(x for x in Escrow(lg).balance("acme", b.clock.ms) if x["credit_type"] == ct)


# Failed before its fix: A hold open across the boundary: its credit is forfeited (spared for the hold, as local mode
# spares it), but the sidecar's next spending is settled from the front of the burn-down order, i.e.
# from the ended bucket's held part, and the hold's release then gives back into the new period's
# bucket. The forfeited credit becomes new-period credit (a tenant can roll over a plan without
# rollover this way: hold what is left at the period's end, spend, release).
def test_a_hold_released_after_the_boundary_does_not_turn_forfeited_credit_into_new_credit(node, local,
                                                                                            ledger_url):
    b = node()
    with Ledger(ledger_url) as lg:
        for x in (b, local):
            x.subscribe("acme", "pro")
        end = end_of(b, lg)
        b.clock.ms = local.now_ms = end - 1000
        for x in (b, local):
            assert x.authorize("acme", "requests", 5, model="gpt-4o").decision == pb.DECISION_ALLOW
        (hold_b,), (hold_l,) = b.holders, local.holders
        b.clock.ms = local.now_ms = end + 1
        local.tick()
        beats(b, 1)
        assert rolls(lg) == 1
        for x in (b, local):
            for _ in range(5):
                assert gpt(x) == pb.DECISION_ALLOW
        b.release(hold_b)
        local.release(hold_l)
        local.tick()
        b.run(b.engine.leases.return_all())
        b.flush()
        assert local.bal("acme", "requests") == 45 * NANO
        assert central_balance(lg, b)["balance_nano"] == 45 * NANO  # 50: the 5 forfeited came back as new credit


# Failed before its fix: Cancel now ends the period's credits and overage allowance in the ledger only: the sidecars'
# leases of them are neither recalled nor closed (their end is still the period's), so they go on
# spending the cancelled plan's credits and its whole allowance, which no one ever bills.
def test_cancel_now_stops_the_sidecars_spending_the_cancelled_plan(node, local, ledger_url):
    b = node()
    with Ledger(ledger_url) as lg:
        for x in (b, local):
            x.subscribe("acme", "pro")
            assert gpt(x) == pb.DECISION_ALLOW  # the sidecar leases 50 included + the 50 of the allowance
            x.cancel("acme")
        beats(b, 3)  # a heartbeat or more after the cancel
        allowed = {}
        for name, x in (("ledger", b), ("local", local)):
            n = 0
            while n < 200 and gpt(x) == pb.DECISION_ALLOW:
                n += 1
            allowed[name] = n
        b.run(b.engine.leases.return_all())
        b.flush()
        assert allowed == {"ledger": 0, "local": 0}  # ledger: 99 (49 included, 50 of overage)
        assert central_balance(lg, b)["headroom_nano"] == 0  # 50: overage spent, never to be billed


# Failed before its fix: An overage hold open when the subscription ends (cancel at the period's end): its commit later
# consumes the closed allowance, which stays as headroom: neither billed nor owed, so the next
# grant is spent whole (local mode repays the negative balance first).
def test_overage_committed_after_the_subscription_ended_is_repaid_by_the_next_credit(node, local, ledger_url):
    b = node()
    with Ledger(ledger_url) as lg:
        for x in (b, local):
            x.subscribe("acme", "pro")
        end = end_of(b, lg)
        b.clock.ms = local.now_ms = end - 1000
        for x in (b, local):
            assert x.report("acme", "requests", 50, model="gpt-4o").decision == pb.DECISION_ALLOW
            assert x.authorize("acme", "requests", 10, model="gpt-4o").decision == pb.DECISION_ALLOW  # overage
            x.cancel("acme", at_period_end=True)
        (hold_b,), (hold_l,) = b.holders, local.holders
        b.clock.ms = local.now_ms = end + 1
        local.tick()
        beats(b, 1)
        assert rolls(lg) == 1
        b.commit(hold_b, 10)
        local.commit(hold_l, 10)
        b.flush()  # the ledger knows of a commit once it is settled (ledger mode's settlement lag)
        allowed = {}
        for name, x in (("ledger", b), ("local", local)):
            x.grant("acme", "requests", 20 * NANO)
            n = 0
            while n < 30 and gpt(x) == pb.DECISION_ALLOW:
                n += 1
            allowed[name] = n
        assert allowed == {"ledger": 10, "local": 10}  # ledger: 20


# Failed before its fix: A lease's end is forgotten (Held.expires_at_ms = 0) without a close that settled: (a) by an
# idle give-back while a hold is open, (b) by a close whose ledger call failed. The lease is then
# never closed at the boundary, the roll waits for the 30 s grace, and meanwhile the customer has
# no period credits on any sidecar.
def test_a_lease_given_back_idle_with_a_hold_open_is_still_closed_at_the_boundary(node, ledger_url):
    b = node(lease_idle_s=1.0)
    b.subscribe("acme", "pro")
    with Ledger(ledger_url) as lg:
        end = end_of(b, lg)
        b.clock.ms = end - 10_000
        assert gpt(b) == pb.DECISION_ALLOW
        assert b.authorize("acme", "requests", 5, model="gpt-4o").decision == pb.DECISION_ALLOW
        beats(b, 1)
        b.clock.ms = end - 5_000  # idle: what is free is given back, the hold stays
        beats(b, 1)
        assert b.engine.leases.counts["idle_returns"] == 1
        b.clock.ms = end + 1
        beats(b)
        assert b.clock.ms < end + PERIOD_CLOSE_GRACE_MS
        assert rolls(lg) == 1  # 0: the lease was never settled past the boundary
        assert gpt(b) == pb.DECISION_ALLOW  # denied: no period credits until the grace


def test_a_close_whose_ledger_call_failed_is_tried_again(node, ledger_url, monkeypatch):
    b = node()
    b.subscribe("acme", "pro")
    real, failed = Escrow.give_back, []

    def flaky(self, *args):
        if args[-1] is not None and not failed:  # the close's give-back (it settles)
            failed.append(1)
            raise OSError("connection reset by peer")
        return real(self, *args)
    with Ledger(ledger_url) as lg:
        end = end_of(b, lg)
        b.clock.ms = end - 1000
        assert b.authorize("acme", "requests", 5, model="gpt-4o").decision == pb.DECISION_ALLOW
        b.clock.ms = end + 1
        monkeypatch.setattr(Escrow, "give_back", flaky)
        with pytest.raises(OSError):
            b.run(b.engine.leases.beat())  # the heartbeat loop logs it and goes on
        beats(b, 10)
        assert failed and b.clock.ms < end + PERIOD_CLOSE_GRACE_MS
        assert rolls(lg) == 1  # 0: the close was dropped (popped, and its end cleared before the call)


# Failed before its fix: The heap of ends holds credit type numbers; a catalog reload renumbers the leases (rename) but
# not the heap, and answers with the same end push nothing new: the heartbeat never closes the lease.
def test_the_heap_of_ends_follows_a_catalog_reload_that_renumbers_credit_types(node, ledger_url, tmp_path):
    b = node()
    b.subscribe("acme", "pro")
    assert gpt(b) == pb.DECISION_ALLOW
    swapped = CAPPED.replace('[credit_types.usd]\nkind = "fiat"\n', '').replace(
        '[meters.requests]', '[credit_types.usd]\nkind = "fiat"\n\n[meters.requests]')
    path = tmp_path / "swapped.toml"
    path.write_text(swapped)
    new = load_catalog(str(path))
    assert [c.name for c in new.credit_types] == ["requests", "usd"]
    b.run(b.engine.reload_catalog(new))
    with Ledger(ledger_url) as lg:
        b.clock.ms = end_of(b, lg) + 1
        b.run(b.engine.leases._heartbeat())  # the heap's close (the scan meets a lease once per len(held)/2000)
        assert b.engine.leases.counts["period_closes"] == 1  # 0
        assert rolls(lg) == 1


# Failed before its fix: After the roll, a lease still holding a hold's part of the ended bucket is answered with that
# bucket's (past) end: the sidecar closes it again at every heartbeat, giving back the new period's
# credit it just leased, so that every next request waits for a top-up.
def test_a_hold_across_the_boundary_does_not_close_the_lease_at_every_heartbeat(node, ledger_url):
    b = node()
    b.subscribe("acme", "pro")
    with Ledger(ledger_url) as lg:
        end = end_of(b, lg)
        b.clock.ms = end - 1000
        assert b.authorize("acme", "requests", 20, model="gpt-4o").decision == pb.DECISION_ALLOW
        b.clock.ms = end + 1
        beats(b, 1)
        assert rolls(lg) == 1
        closes = b.engine.leases.counts["period_closes"]
        for _ in range(4):
            assert gpt(b) == pb.DECISION_ALLOW
            beats(b, 1)
        assert b.engine.leases.counts["period_closes"] == closes  # one more at each heartbeat


# Failed before its fix: Every settlement below zero with an overage allowance flags the customer for early bills,
# whether its plan has a bill_threshold or not (usage in arrears is always below zero): the sweep
# (20 a heartbeat) spends its transactions on flags it can never bill, and early bills wait behind them.
def test_only_customers_whose_plan_bills_early_are_flagged(ledger_url, plans_catalog):
    c = Central(ledger_url, plans_catalog)
    t = START_MS + 1000
    try:
        c.plans.subscribe("arrears", "metered", t, t)
        c.plans.subscribe("overage", "basic", t, t)
        c.plans.subscribe("billed", "thresholded", t, t)
        c.spend("arrears", "usd", 3 * NANO, t)
        c.spend("overage", "credits", 110 * NANO, t)
        c.spend("billed", "credits", 110 * NANO, t + 1)  # 10 over: $5, the threshold
        flagged = [r[0] for r in c.ledger._rows("SELECT customer_id FROM meterd_overage_spent ORDER BY customer_id")]
        assert flagged == ["billed"]  # ['arrears', 'billed', 'overage']
        assert c.plans.bill_due(t + 2, 1) == 1  # 0: the one slot went to a customer that cannot be billed early
    finally:
        c.ledger.close()


# Failed before its fix: GetBalance on a sidecar in ledger mode counts the overage allowance (leased here and left
# centrally) as balance; the README says balances show it without the allowance, as local mode.
def test_get_balance_in_ledger_mode_is_without_the_overage_allowance(node, local, ledger_url):
    b = node()
    for x in (b, local):
        x.subscribe("acme", "pro")
        assert x.report("acme", "requests", 60, model="gpt-4o").decision == pb.DECISION_ALLOW
    assert local.bal("acme", "requests") == -10 * NANO
    assert b.bal("acme", "requests") == -10 * NANO  # +40: 50 included + 50 allowance - 60


def test_a_request_past_the_boundary_rolls_the_period_without_waiting_for_a_heartbeat(node, ledger_url):
    """The balance spent, the period ended: the first request of the next period settles this
    sidecar's lease and rolls the period itself (no heartbeat has run), and is allowed."""
    b = node()
    with Ledger(ledger_url) as lg:
        b.subscribe("acme", "pro")
        n = 0
        while gpt(b) == pb.DECISION_ALLOW:
            n += 1
        assert n == 100  # 50 included, 50 of overage
        b.clock.ms = end_of(b, lg) + 1
        assert gpt(b) == pb.DECISION_ALLOW
        assert rolls(lg) == 1
        assert [e.amount_nano for e in lg.entries("acme") if e.kind == "overage_charged"] == [50 * NANO]
        assert Escrow(lg).check() == []


SEEDED = CAPPED + """
[customers.acme]
plan = "pro"

[customers.zed]
plan = "pro"
"""


def test_catalog_customers_on_a_plan_are_subscribed_once_in_the_ledger(node, ledger_url, tmp_path, monkeypatch):
    """Two sidecars start on a catalog whose customers have a plan: each customer is subscribed in
    the ledger once, from that time, as local mode subscribes it at its first start (same balance,
    same fee); a restart, or a customer cancelled since, is not subscribed again."""
    path = tmp_path / "seeded_local.toml"
    path.write_text(SEEDED)
    local = Billing(tmp_path / "local", str(path), monkeypatch)
    try:
        a, b = node("s0", catalog=SEEDED), node("s1", catalog=SEEDED)
        beats(a, 1)
        beats(b, 1)
        with Ledger(ledger_url) as lg:
            plans = LedgerPlans(Escrow(lg), a.catalog)
            for customer in ("acme", "zed"):
                sub = plans.subscription(customer)
                assert (sub.plan, sub.start_ms) == ("pro", START_MS)
                assert [e.kind for e in lg.entries(customer)].count("fee") == 1
            assert gpt(a) == gpt(local) == pb.DECISION_ALLOW
            assert a.bal("acme", "requests") == local.bal("acme", "requests") == 49 * NANO
            plans.cancel("zed", False, a.clock.ms)
        b.restart()
        beats(b, 1)
        c = node("s2", catalog=SEEDED)  # a new sidecar on the same catalog
        beats(c, 1)
        assert not b.engine.leases.seed_plans and not c.engine.leases.seed_plans
        with Ledger(ledger_url) as lg:
            plans = LedgerPlans(Escrow(lg), a.catalog)
            assert plans.subscription("zed") is None
            assert plans.subscription("acme").start_ms == START_MS
            assert [e.kind for e in lg.entries("acme")].count("fee") == 1
            assert Escrow(lg).check() == []
    finally:
        local.close()


def test_a_plan_asks_for_a_top_up_once_below_its_low_balance_as_local_mode_does(node, local, ledger_url):
    """The "topped" plan asks for a top-up (to 50) below 10 requests: in the ledger, when a
    settlement takes the balance below; once, until a credit lifts the balance back (a grant
    through another sidecar here); with local mode's balance and amount when each event is settled."""
    a, b = node("s0"), node("s1")
    for x in (a, local):
        x.subscribe("acme", "topped")

    def spend(n: int) -> None:
        for _ in range(n):
            assert gpt(a) == gpt(local) == pb.DECISION_ALLOW
            a.flush()

    def asked() -> tuple[list, list]:
        with Ledger(ledger_url) as lg:
            central = [(e.balance_after_nano, e.charge_nano, e.charge_credit_type, e.reference)
                       for e in lg.entries("acme") if e.kind == "auto_topup_requested"]
        return central, [(e.balance_after_nano, e.charge_nano, e.charge_credit_type, e.reference)
                         for e in local.audit("acme", "auto_topup_requested")]

    spend(40)
    assert asked() == ([], [])                                           # at 10: not below yet
    spend(1)
    first = (9 * NANO, 41 * NANO, "requests", "below 10")
    assert asked() == ([first], [first])
    spend(4)
    assert asked() == ([first], [first])                                 # still below: asked once
    for x in (b, local):
        x.grant("acme", "requests", 20 * NANO)                            # 5 -> 25: re-armed
    spend(16)
    again = (9 * NANO, 41 * NANO, "requests", "below 10")
    assert asked() == ([first, again], [first, again])
    b.cancel("acme")                                                      # no plan: no more requests
    beats(a, 2)                                                           # once a has settled, it has ended
    with Ledger(ledger_url) as lg:
        (low, target, pending), = lg._rows("SELECT low_balance_nano, topup_target_nano, topup_pending FROM "
                                           "meterd_balances WHERE customer_id = 'acme' AND credit_type = 'requests'")
        assert (low, target, pending) == (0, 0, 0)
        assert Escrow(lg).check() == []


def test_a_cancel_bills_what_the_sidecars_spent_since_their_last_flush(node, local, ledger_url):
    """A sidecar spent 10 requests of overage and has not flushed when another sidecar's Admin
    cancels: the cancel waits for its settlement (it answers the recall at its next heartbeat)
    and bills those 10, as local mode's cancel does; before, they were owed and never billed."""
    a, b = node("s0"), node("s1")
    for x in (a, local):
        x.subscribe("acme", "pro")
    for _ in range(60):                                                 # 50 included, then 10 of overage
        assert gpt(a) == gpt(local) == pb.DECISION_ALLOW
    for x in (b, local):
        x.cancel("acme")
    with Ledger(ledger_url) as lg:
        plans = LedgerPlans(Escrow(lg), a.catalog)
        waiting = plans.subscription("acme")
        assert waiting is not None and waiting.end_ms == b.clock.ms   # its period ends at the cancel
        assert gpt(b) == pb.DECISION_DENY                               # and nothing more is leased of it
        beats(a, 2)                                                     # a settles; the cancel ends
        assert plans.subscription("acme") is None

        def billed(entries) -> list[tuple]:
            return [(e.kind, e.amount_nano, e.charge_nano, e.charge_credit_type) for e in entries
                    if e.kind in ("overage_charged", "expire")]
        assert billed(lg.entries("acme")) == billed(local.audit("acme"))
        assert [e.charge_nano for e in lg.entries("acme") if e.kind == "overage_charged"] == [4 * NANO // 10]
        assert central_balance(lg, b)["balance_nano"] == local.bal("acme", "requests") == 0
        assert Escrow(lg).check() == []


FREE_METER = """
[credit_types.usd]
kind = "fiat"

[meters.cache_reads]
credit_type = "usd"
price = "0"

[meters.tokens]
credit_type = "usd"
price = "0.01"
"""


# Failed before its fix: an event that costs nothing, for a customer with a central balance, was denied
# REASON_UNKNOWN_CUSTOMER by every sidecar that had not leased for the customer yet (local mode allows it).
def test_a_free_event_is_served_for_a_customer_the_ledger_knows_at_a_sidecar_with_no_lease(node, ledger_url):
    a, b = node("s0", catalog=FREE_METER), node("s1", catalog=FREE_METER)
    a.grant("acme", "usd", 5 * NANO)
    free = b.report("acme", "cache_reads", 1)
    assert (free.decision, free.cost_nano) == (pb.DECISION_ALLOW, 0)
    assert b.report("nobody", "cache_reads", 1).reason == pb.REASON_UNKNOWN_CUSTOMER  # unknown to the ledger too
    b.restart(clean=False)                                          # the account it opened is in its log
    assert b.report("acme", "cache_reads", 1).decision == pb.DECISION_ALLOW
    assert b.report("acme", "tokens", 1).decision == pb.DECISION_ALLOW
    with Ledger(ledger_url) as lg:
        assert Escrow(lg).check() == []


def test_a_latest_meter_is_refused_in_ledger_mode_naming_the_meter(tmp_path, ledger_url):
    """A latest meter is charged on the period's last value, and the ledger's usage windows cannot
    tell which sidecar's came last (max and unique_count meters, the ledger charges:
    test_ledger_gauges.py). Refused, by the CLI's plan commands too."""
    import subprocess
    import sys
    path = tmp_path / "gauges.toml"
    path.write_text(FREE_METER + '[meters.seats]\ncredit_type = "usd"\naggregation = "latest"\nprice = "8.00"\n')
    r = subprocess.run([sys.executable, "-m", "meterd", "check-config", "--balances", "ledger", "--ledger", ledger_url,
                        "--catalog", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "meters.seats: a latest meter is served in local mode only" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    # and so does a subscribe through the ledger with no sidecar, on that catalog
    path.write_text(path.read_text() + '[plans.team]\nfee = { usd = "8.00" }\n')
    r = subprocess.run([sys.executable, "-m", "meterd", "subscribe", "--customer", "acme", "--plan", "team",
                        "--ledger", ledger_url, "--catalog", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "meters.seats: a latest meter" in r.stderr and "Traceback" not in r.stderr, r.stderr
    with Ledger(ledger_url) as lg:
        lg.migrate()  # (not made by the refused call)
        assert LedgerPlans(Escrow(lg), load_catalog(str(path))).subscription("acme") is None
