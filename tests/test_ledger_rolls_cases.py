"""Period rolls, cancels and the clock skew guard in ledger mode: cases an independent review
found, each of which failed before its fix (the docstrings say what went wrong)."""

# ruff: noqa: F401, F811 - the fixtures central, local, node and catalog_path are the plans' other tests

from __future__ import annotations

import asyncio
import time

from billing import DAY_MS, NANO, START_MS
from test_leases import SkewedClock, _measured, _one
from test_ledger_plans import CAPPED, MONTH, C, Central, Side, catalog_path, central, local, shown
from test_ledger_plans_sidecars import beats, end_of, node, rolls

from meterd.escrow import Escrow
from meterd.ledger import Ledger, Settlement
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.v1 import meter_pb2 as pb


def _charged(entries) -> int:
    return sum(e.amount_nano for e in entries if e.kind == "overage_charged")


def test_net_does_not_pay_overage_with_credit_of_a_period_that_ended(local, central):
    """LedgerPlans._net (ledger_plans.py:746-766, the lease-part loop added by 67c4205) swaps
    *every* lease part of a non-overage bucket for allowance parts, with no look at the bucket's
    end: credit of an ended period that a lease still holds (its sidecar lost contact, and the
    period was rolled PERIOD_CLOSE_GRACE_MS after its end: forfeited, but "stays leased in its
    expired bucket" until given back) is booked as consumed (the ended period's bucket G1 shows
    10 consumed that no sidecar spent) and pays the next period's overage. Local mode forfeits
    that credit at the boundary and bills the 10 of overage at the cancel. Before 67c4205 the
    ledger did not bill it either (the held forfeited credit keeps the balance shown >= 0) but
    left it owed (overdrawn, repaid by the next credit); now it is neither billed nor owed: 10
    credits of overage are lost. Expected: G1 consumes nothing, and the 10 is billed or owed."""
    # Local mode: a period with nothing spent, then 110 spent of the 100 included: 10 overage.
    local.subscribe("acme", "spend_capped")
    local.advance(MONTH)
    local.tick()
    local.report("acme", "spend_credits", 110 * NANO)
    local.cancel("acme", at_period_end=False)
    assert _charged(local.audit("acme")) == 10 * NANO

    c = central
    c.plans.subscribe("acme", "spend_capped", START_MS, START_MS)
    a, b = Side(c, "s1"), Side(c, "s2")
    assert a.acquire(100 * NANO, START_MS) == 100 * NANO   # s1 holds the period's credits, and is gone
    boundary = c.plans.subscription("acme").end_ms
    assert c.plans.roll("acme", boundary + PERIOD_CLOSE_GRACE_MS) == 1  # rolled without s1
    t = boundary + PERIOD_CLOSE_GRACE_MS + 1
    assert b.acquire(110 * NANO, t) == 110 * NANO          # the new period's 100 and 10 of overage
    b.consume(110 * NANO, t)
    c.plans.cancel("acme", False, t)
    a.give_back_all(t + 1)                                 # s1 comes back, having spent nothing
    assert c.escrow.check() == []
    (g1,) = [x for x in c.escrow._buckets("acme", C, "grant_id = 'G1'")]
    assert g1.consumed == 0, f"the ended period's bucket shows {g1.consumed} consumed; no sidecar spent it"
    owed = -shown(c)
    assert _charged(c.ledger.entries("acme")) + owed == 10 * NANO


# ---- the clock skew guard (8772479) ------------------------------------------------------





def _report(node, customer: str = "acme"):
    return node.report(customer, "input_tokens", 1_000, model="gpt-4o")


def test_a_refill_in_flight_at_the_skew_check_brings_no_credit_into_a_skewed_core(tmp_path, monkeypatch,
                                                                                  ledger_url):
    """Leases._check_clock (leases.py, 8772479) takes every lease's free credit out of the core
    once, at the transition to skewed, but a lease call already queued on the lease link is still
    answered after it and Leases._took credits the core (no look at ``skewed``). In production
    the heartbeat and the look after the leases are two loops (Leases.run) firing together, so a
    look's refill asked in the same tick as the heartbeat's clock check lands behind it: the
    skewed sidecar then has free leased credit and serves requests from it (the core covers them,
    Leases.cover and its skew check are never reached). Expected: a skewed sidecar's core holds
    no free leased credit and the request is denied (REASON_LEDGER_UNAVAILABLE)."""
    clock = SkewedClock(0)
    node = _one(tmp_path, ledger_url, monkeypatch, clock=clock)  # type: ignore[arg-type]
    leases = node.engine.leases
    with Ledger(ledger_url) as lg:
        Escrow(lg).grant("acme", "usd", 10 * 1_000_000_000, 0, 0, "test", "", clock.now_ms())
    _measured(node)
    assert _report(node).decision == pb.DECISION_ALLOW
    (h,) = leases.held.values()
    h.rate_nano_s = 10 ** 12  # spending fast, as measured: the next look refills it
    clock.offset_ms = -5_000

    async def same_tick():
        await asyncio.gather(leases._heartbeat(), leases._look_after())
        await leases.quiet()
    node.run(same_tick())
    assert leases.skewed
    assert leases.available("acme", 0) == 0, "a skewed sidecar's core holds free leased credit"
    r = _report(node)
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_LEDGER_UNAVAILABLE)


def test_a_slow_ledger_does_not_hide_a_clock_far_off(tmp_path, monkeypatch, ledger_url):
    """Leases._check_clock (leases.py, 8772479) throws away every measurement whose round trip
    took more than lease_clock_skew_max_ms / 2 ("the last measurement stands"), and ``skewed``
    starts False: behind a ledger that answers in 1.1 s (a loaded PostgreSQL, or the lease link's
    one thread busy with lease transactions) a sidecar is never checked, however far off its
    clock, and spends, closes leases and rolls periods at its own time. A round trip of r ms
    still bounds the offset within r/2: 10 s off with r = 1.1 s is off by at least 9.4 s.
    Expected: the sidecar is found skewed and denies (REASON_LEDGER_UNAVAILABLE)."""
    clock = SkewedClock(-10_000)
    node = _one(tmp_path, ledger_url, monkeypatch, clock=clock)  # type: ignore[arg-type]
    leases = node.engine.leases
    with Ledger(ledger_url) as lg:
        Escrow(lg).grant("acme", "usd", 10 * 1_000_000_000, 0, 0, "test", "", time.time_ns() // 1_000_000)
    ledger_now = Ledger.now_ms

    def slow_answer(self):
        """The ledger's time, read at the start of an answer that takes 1.1 s by the sidecar's clock."""
        ms = ledger_now(self)
        clock.offset_ms += 1_100
        return ms
    monkeypatch.setattr(Ledger, "now_ms", slow_answer)
    for _ in range(2):
        node.run(leases.beat())
    assert leases.skewed, f"10 s off, and not skewed ({leases.counts['clock_checks']} clock checks)"
    r = _report(node)
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_LEDGER_UNAVAILABLE)


def test_a_skewed_sidecar_does_not_roll_a_period_the_ledger_has_not_ended(tmp_path, monkeypatch, ledger_url):
    """The guard (8772479) stops lease calls only: the control plane (Leases._central: cancel,
    change_plan, subscribe, grant, adjust) still sends the skewed sidecar's clock as now_ms, and
    LedgerPlans.cancel and change_plan first roll with force=True (no wait for the leases) every
    period that ended by that time. A sidecar found 40 days ahead, asked to cancel at the period's
    end (which moves no money now), rolls the customer's period a month early: its credits
    forfeited, the next period's given, its fee charged. Expected: while skewed, such calls are
    refused (Unavailable) or at least roll nothing the ledger's clock has not ended."""
    clock = SkewedClock(40 * DAY_MS)
    node = _one(tmp_path, ledger_url, monkeypatch, catalog=CAPPED, clock=clock)  # type: ignore[arg-type]
    leases = node.engine.leases
    now = time.time_ns() // 1_000_000
    with Ledger(ledger_url) as lg:
        LedgerPlans(Escrow(lg), node.catalog).subscribe("acme", "pro", now, now)
    _measured(node)
    assert leases.skewed
    try:
        node.cancel("acme", at_period_end=True)
    except Exception:  # noqa: BLE001 - refused: what should happen
        pass
    with Ledger(ledger_url) as lg:
        (n,), = lg._rows("SELECT COUNT(*) FROM meterd_rolls WHERE customer_id = ?", ("acme",))
        sub = LedgerPlans(Escrow(lg), node.catalog).subscription("acme")
    assert int(n) == 0, f"rolled {n} period(s) by the skewed sidecar's clock; the subscription now ends at " \
                        f"{sub and sub.end_ms}, the ledger's time is {time.time_ns() // 1_000_000}"


# ---- the roll's readiness (67c4205) ------------------------------------------------------



def test_a_forgotten_lease_that_was_short_in_the_period_does_not_hold_up_the_roll(node, ledger_url):
    """_unsettled (ledger_plans.py:57-68, 67c4205) makes the roll wait for every lease with
    short_ms in the period and settled_ms before its end, until PERIOD_CLOSE_GRACE_MS (30 s).
    Only Escrow.give_back with a consumption moves settled_ms. A sidecar that went short and
    served the fallback, flushed, and then forgot the idle empty lease (Leases._forget: only once
    the ledger has exactly its running totals, degraded usage included) never closes it at the
    period's end (Leases._close_ended skips leases it no longer holds), so every roll of the
    customer waits the whole grace: for 30 s after the boundary the customer's requests at any
    other sidecar find no credit (the new period's are not given) and are served degraded, where
    local mode serves them from the new period's credits at once. Expected: the period rolls
    at the boundary (nothing is left to settle at the forgotten lease), and s1 is served."""
    a, b = node("s0", lease_idle_s=1.0), node("s1")
    with Ledger(ledger_url) as lg:
        a.subscribe("acme", "slow_pool")
        assert a.report("acme", "requests", 50, model="gpt-4o").decision == pb.DECISION_ALLOW
        assert a.report("acme", "requests", 1, model="gpt-4o").decision == pb.DECISION_DEGRADE  # short
        a.flush()
        for _ in range(3):  # idle: the empty, settled lease is forgotten
            a.clock.ms += 1_500
            a.run(a.engine.leases.beat())
            a.run(a.engine.leases.quiet())
        assert a.engine.leases.counts["forgotten"] == 1 and not a.engine.leases.held
        end = end_of(a, lg)
        a.clock.ms = b.clock.ms = end + 1
        beats(a, 2)
        beats(b, 2)
        leases = lg._rows("SELECT sidecar_id, amount_nano, short_ms, settled_ms FROM meterd_leases")
        assert rolls(lg) == 1, f"the roll waits PERIOD_CLOSE_GRACE_MS for a lease its sidecar forgot: {leases}"
        r = b.report("acme", "requests", 1, model="gpt-4o")
        assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, NANO), r


def test_a_skewed_sidecar_gives_back_at_shutdown_by_the_ledgers_time(tmp_path, monkeypatch, ledger_url):
    """While skewed, Leases makes "no lease calls" (8772479), but Leases.return_all (shutdown,
    e.g. the restart an operator does on the skew alarm) is not guarded: it sends each give-back
    with the skewed clock's now_ms, and Escrow._give_back expires, audited, what it gives back of
    a grant that has ended by that time (escrow.py _give_back: b.expired_at(now_ms)). A sidecar
    two minutes ahead expires credit of a grant that ends a minute from now by the ledger's clock.
    Expected: nothing is expired before its end by the ledger's clock (or nothing is sent while
    skewed): the customer's balance is what is left of the grant."""
    clock = SkewedClock(0)
    node = _one(tmp_path, ledger_url, monkeypatch, clock=clock)  # type: ignore[arg-type]
    leases = node.engine.leases
    real = time.time_ns() // 1_000_000
    with Ledger(ledger_url) as lg:
        Escrow(lg).grant("acme", "usd", 10 * 1_000_000_000, real + 60_000, 0, "promo", "", real)
    _measured(node)
    assert _report(node).decision == pb.DECISION_ALLOW     # a lease of the grant
    clock.offset_ms = 120_000
    _measured(node)
    assert leases.skewed
    node.run(leases.return_all())
    node.flush()
    with Ledger(ledger_url) as lg:
        (bal,) = Escrow(lg).balance("acme", time.time_ns() // 1_000_000)
        expired = [e.amount_nano for e in lg.entries("acme") if e.kind == "expired"]
    assert time.time_ns() // 1_000_000 < real + 60_000  # the grant has not ended by the ledger's clock
    assert expired == [] and bal["expired_nano"] == 0, f"expired {expired} a minute before the grant's end"


def test_credit_a_skewed_sidecar_cannot_spend_is_not_kept_from_the_other_sidecars(tmp_path, monkeypatch,
                                                                                 ledger_url):
    """A skewed sidecar takes its leases' free credit out of its core but tells the ledger
    nothing until its clock is right (Leases._check_clock; Leases._heartbeat returns before the
    ledger's heartbeat, so recalls go unanswered, and _look_after sends no give-back): a broken
    time synchronisation strands the credit at its leases for as long as it lasts. The customer's
    other sidecars find the credit "elsewhere", recall it, wait lease_wait_ms and deny (false
    denies), though no one can spend it; and every roll of those customers waits
    PERIOD_CLOSE_GRACE_MS for the unsettled lease. Expected: the credit comes back to the ledger
    (a give-back needs no clock of the sidecar's: the ledger has its own) and s1 is served."""
    s0 = _one(tmp_path, ledger_url, monkeypatch, name="s0", sidecar_id="s0", clock=SkewedClock(0),  # type: ignore[arg-type]
              lease_wait_ms=300)
    s1 = _one(tmp_path, ledger_url, monkeypatch, name="s1", sidecar_id="s1", clock=SkewedClock(0),  # type: ignore[arg-type]
              lease_wait_ms=300)
    with Ledger(ledger_url) as lg:
        Escrow(lg).grant("acme", "usd", 10 * 2_500_000, 0, 0, "test", "", time.time_ns() // 1_000_000)
    _measured(s0)
    _measured(s1)
    assert _report(s0).decision == pb.DECISION_ALLOW  # s0's lease: the whole balance (10 requests)
    s0.engine.leases.clock.offset_ms = -5_000
    _measured(s0)
    assert s0.engine.leases.skewed
    for _ in range(3):
        s0.run(s0.engine.leases.beat())
        r = _report(s1)
        s1.run(s1.engine.leases.beat())
    assert r.decision == pb.DECISION_ALLOW, (r.decision, r.reason, s1.engine.leases.counts["false_denies"])


# ---- fallback usage settled after a subscription ended (67c4205) ----------------------------



FLAT = CAPPED + """
[plans.flat]
fee = { usd = "5.00" }
"""


def test_fallback_usage_settled_after_a_cancel_is_audited_when_the_next_plan_has_not_its_credit_type(
        tmp_path, ledger_url):
    """LedgerPlans.subscribe audits the ended subscription's late fallback usage
    (_audit_ended) only over the balance rows it locks: those of the *new* plan's credit types
    (ledger_plans.py subscribe: _lock_sums(..., _credit_types(None, plan))). Usage of a credit
    type the new plan lacks stays in meterd_balances.degraded_nano, and audit_ended's sweep
    skips the customer from then on (it looks only at customers on no plan); at the next cancel
    the sweep zeroes it under the *new* row.fallbacks, which lack the type: never audited.
    Local mode audits all of the period's fallback usage when it ends. Expected: a 'degraded'
    entry of the 5 served in slow mode."""
    path = tmp_path / "flat.toml"
    path.write_text(FLAT)
    c = Central(ledger_url, str(path))
    try:
        t = START_MS + DAY_MS
        c.plans.subscribe("acme", "slow_pool", t, t)
        s1 = Side(c, "s1", ct="requests")
        s1.acquire(50 * NANO, t)
        s1.consume(50 * NANO, t)
        c.plans.cancel("acme", False, t + 1)
        # s1's flush after the cancel: the 5 requests it served in slow mode before it heard of it
        c.escrow.settle("s1", "i1", [Settlement("acme", "requests", 50 * NANO, 5 * NANO)], t + 2)
        c.plans.subscribe("acme", "flat", t + 3, t + 3)   # before the next heartbeat's sweep
        c.plans.audit_ended(t + 4, 100)
        c.plans.cancel("acme", False, t + 5)
        c.plans.audit_ended(t + 6, 100)
        audited = [(e.amount_nano, e.reference) for e in c.ledger.entries("acme") if e.kind == "degraded"]
        assert audited == [(5 * NANO, "served in slow mode, not charged")]
    finally:
        c.ledger.close()
