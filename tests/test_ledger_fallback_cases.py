"""The fallback mode in ledger mode: cases an independent review found, each of which failed
before its fix (the docstrings say what went wrong)."""

# ruff: noqa: F401, F811 - the fixtures local and node are those of the plans' other tests

from __future__ import annotations

from billing import NANO
from test_ledger_fallback import STEP, degraded_central
from test_ledger_plans_sidecars import beats, end_of, local, node, rolls

from meterd.corespec import relax_priority
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.v1 import meter_pb2 as pb


def gpt(x, n: int = 1) -> pb.ReportResponse:
    return x.report("acme", "requests", n, model="gpt-4o")


def test_degraded_usage_not_yet_flushed_at_the_period_end_is_audited_in_its_own_period(node, local, ledger_url):
    """Degraded usage served shortly before the period's end (not yet flushed) is left out of the
    roll's 'degraded' entry and counted in the next period instead: the lease's close at the end
    settles consumption only (Leases._close -> give_back(settle=True); Escrow.give_back, escrow.py:794,
    builds a Settlement without degraded_total_nano, so _settle_one skips it), so
    the roll goes ahead, and the later flush adds the old period's degraded usage to the new one.
    Local mode audits all of it in the ended period and starts the next one at 0."""
    b = node()
    with Ledger(ledger_url) as lg:
        for x in (b, local):
            x.subscribe("acme", "slow_pool")
            assert gpt(x, 50).decision == pb.DECISION_ALLOW
            for _ in range(5):
                assert gpt(x).decision == pb.DECISION_DEGRADE
        end = end_of(b, lg)
        b.clock.ms = local.now_ms = end + 1
        local.tick()
        beats(b, 2)
        assert rolls(lg) == 1
        b.flush()
        audited = [(e.amount_nano, e.reference) for e in lg.entries("acme") if e.kind == "degraded"]
        assert audited == [(e.amount_nano, e.reference) for e in local.audit("acme", "degraded")] == \
            [(5 * NANO, "served in slow mode, not charged")]
        assert degraded_central(lg) == 0  # the new period has served nothing degraded


def _event(key: str = "") -> pb.UsageEvent:
    return pb.UsageEvent(customer_id="acme", meter="requests", quantity=1, dimensions={"model": "gpt-4o"},
                         idempotency_key=key)


def test_nothing_is_served_degraded_while_another_sidecars_lease_holds_the_credit(node):
    """Sidecar s1 holds the customer's 49 remaining credits in its lease; s0's top-up recalls them
    but they do not come back within lease_wait_ms (Leases._cover answers Cover.UNAVAILABLE,
    'false_denies': credit is left at other sidecars). Reports.report (reports.py:358), _report_keyed
    (reports.py:412), _second_chance (reports.py:226) and Reservations._refusal (reservations.py:195-197)
    fall back regardless of the cover's outcome, so s0 serves the requests in the plan's fallback mode,
    for nothing, while the customer has credit (the same goes for a ledger that does not answer).
    They should be denied LEDGER_UNAVAILABLE as before (or served from the credit), never degraded:
    the fallback is for what the whole balance cannot cover."""
    s0, s1 = node("s0", lease_wait_ms=100), node("s1", lease_wait_ms=100)
    s0.subscribe("acme", "slow_pool")
    assert gpt(s1).decision == pb.DECISION_ALLOW  # s1 leases the period's 50 credits
    assert s1.bal("acme", "requests") == 49 * NANO
    got = {"report": gpt(s0)}
    got["keyed report"] = pb.ReportResponse.FromString(
        s0.run(s0.engine.report(pb.ReportRequest(event=_event("k1")).SerializeToString())))
    batch = s0.batch([_event()])
    got["authorize"] = s0.authorize("acme", "requests", 1, model="gpt-4o")
    decisions = {name: (r.decision, r.reason, r.mode) for name, r in got.items()}
    decisions["batch"] = (pb.DECISION_DEGRADE if batch.degraded else pb.DECISION_DENY,
                          batch.denials[0].reason if batch.denials else 0,
                          batch.degradations[0].mode if batch.degradations else "")
    assert all(d[0] != pb.DECISION_DEGRADE for d in decisions.values()), decisions
    assert s1.bal("acme", "requests") == 49 * NANO  # the credit was there all along


def test_a_saturated_running_total_hides_every_later_periods_degraded_usage(node, ledger_url):
    """Held.degraded, the lease's running total of fallback usage (leases.py degrade:
    ``min(h.degraded + delta, INT64_MAX)``), only grows, over every period of the lease's life, while
    the core's per-period figure it is taken from is reset each calendar month (an account on plan 0).
    A tenant that has two huge events served degraded (free), one each side of a month's start,
    saturates it; from then on nothing it is served degraded is ever settled (Escrow._settle_one sees
    no growth), so every later period's priority hint stays at 100 and its roll audits nothing. The
    next period's 101 requests served slow should give the hint of 101 and be settled centrally."""
    b = node()
    with Ledger(ledger_url) as lg:
        b.subscribe("acme", "slow_pool")
        b.tick()  # the housekeeping's calendar month: January
        assert gpt(b, 50).decision == pb.DECISION_ALLOW
        huge = 9_000_000_000  # requests: 9e18 nano, within 64 bits
        assert gpt(b, huge).decision == pb.DECISION_DEGRADE
        b.clock.ms += 86_400_000 + 1  # 2026-02-01: a calendar month's start resets the core's figure
        b.tick()
        assert gpt(b, huge).decision == pb.DECISION_DEGRADE
        b.flush()
        end = end_of(b, lg)
        b.clock.ms = end + 1
        beats(b, 2)
        assert rolls(lg) == 1
        b.clock.ms = end + 86_400_000  # into March: the next period, and a new calendar month
        b.tick()
        assert gpt(b, 50).decision == pb.DECISION_ALLOW  # the next period's credits
        for _ in range(100):
            assert gpt(b).decision == pb.DECISION_DEGRADE
        r = gpt(b)
        b.flush()
        got = (r.decision, r.priority, degraded_central(lg))
        assert got == (pb.DECISION_DEGRADE, relax_priority(101 * NANO, STEP), 101 * NANO)


def test_a_sidecar_that_found_the_balance_spent_serves_the_next_periods_requests_slow(node, ledger_url):
    """s0 spent the period's credits and served a request slow: its lease is marked exhausted for a
    heartbeat (Leases._cover, h.exhausted_until). The period ends and another sidecar (s1) rolls it:
    the next period's 50 credits are in the ledger. s0's next request finds its lease exhausted,
    _roll_on_demand rolls nothing (done already) and _cover answers SHORT without asking the ledger
    (leases.py:593-594);
    the commit's fallback (reports.py:358) then serves it slow, for nothing, with the ended period's
    hint, although the new period's credits cover it (local mode allows it; before the commit it was
    at worst denied for that heartbeat). It should be allowed from the new period's credits."""
    s0 = node("s0", lease_heartbeat_ms=2_000, lease_wait_ms=4_000)
    s1 = node("s1", lease_heartbeat_ms=2_000, lease_wait_ms=4_000)
    with Ledger(ledger_url) as lg:
        s0.subscribe("acme", "slow_pool")
        assert gpt(s0, 50).decision == pb.DECISION_ALLOW
        assert gpt(s0).decision == pb.DECISION_DEGRADE
        s0.flush()
        end = end_of(s0, lg)
        s0.clock.ms = s1.clock.ms = end + 1
        beats(s1, 1)  # s1 settles; the roll waits for s0, which used its lease in the period
        r = gpt(s0)  # s0 settles on the spot, the period rolls, and the new credits serve it
        assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, NANO), r
        assert rolls(lg) == 1


def test_the_running_periods_statement_shows_its_fallback_usage_so_far_as_in_local_mode(node, local, ledger_url):
    """Engine.statement (engine.py:225) adds the running credit period's fallback usage so far
    ('served in slow mode, not charged (this period so far)') from the local Subscriptions only;
    in ledger mode there are none, and the commit gives the sidecar no other source (the ledger's
    meterd_balances.degraded_nano, or the lease's figures), so a ledger-mode statement of the running
    period omits the degraded usage that local mode shows for the same history."""
    b = node()
    lines = {}
    for name, x in (("ledger", b), ("local", local)):
        x.subscribe("acme", "slow_pool")
        assert gpt(x, 50).decision == pb.DECISION_ALLOW
        for _ in range(3):
            assert gpt(x).decision == pb.DECISION_DEGRADE
        x.flush()
        lines[name] = [(a["section"], a["amount_nano"]) for a in x.statement("acme", "2026-02")["activity"]
                       if a["section"] == "degraded"]
    assert lines["ledger"] == lines["local"] == [("degraded", 3 * NANO)]
