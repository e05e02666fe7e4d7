"""A plan's fallback mode (Midjourney's Relax) in ledger mode: what no lease can cover is served
degraded, with the priority hint of the customer's degraded usage across sidecars, and the
period's roll audits it; against a local-mode sidecar on the same history."""

# ruff: noqa: F401, F811 - the fixtures fleet, local and node are those of the plans' other tests

from __future__ import annotations

from billing import NANO
from test_ledger_plans import fleet
from test_ledger_plans_sidecars import beats, end_of, local, node, rolls

from meterd.corespec import relax_priority
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.v1 import meter_pb2 as pb

STEP = 10 * NANO  # slow_pool's priority_step: one point per 10 requests served slow


def answer(r: pb.ReportResponse) -> tuple:
    return r.decision, r.mode, r.priority, r.cost_nano


def degraded_central(lg: Ledger, customer: str = "acme") -> int:
    (n,), = lg._rows("SELECT degraded_nano FROM meterd_balances WHERE customer_id = ? AND credit_type = "
                     "'requests'", (customer,))
    return int(n)


def test_the_fallback_answers_as_in_local_mode_and_the_roll_audits_it(node, local, ledger_url):
    b = node()
    with Ledger(ledger_url) as lg:
        for x in (b, local):
            x.subscribe("acme", "slow_pool")
        answers: dict[str, list[tuple]] = {"ledger": [], "local": []}
        for name, x in (("ledger", b), ("local", local)):
            for _ in range(60):
                answers[name].append(answer(x.report("acme", "requests", 1, model="gpt-4o")))
            # A request dearer than what is left is served slow too (no credit left at all here).
            answers[name].append(answer(x.report("acme", "requests", 3, model="gpt-4o")))
            batch = x.batch([pb.UsageEvent(customer_id="acme", meter="requests", quantity=1,
                                           dimensions={"model": "gpt-4o"}) for _ in range(12)])
            # Within one batch, ledger mode gives every event served slow the hint after the batch.
            answers[name].append((batch.accepted, batch.denied, batch.degraded,
                                  {g.mode for g in batch.degradations}, min(g.priority for g in batch.degradations)))
            a = x.authorize("acme", "requests", 1, model="gpt-4o")
            answers[name].append((a.decision, a.mode, a.priority))
        assert answers["ledger"] == answers["local"]
        allowed = [a for a in answers["ledger"][:60] if a[0] == pb.DECISION_ALLOW]
        assert len(allowed) == 50 and answers["ledger"][50][:3] == (pb.DECISION_DEGRADE, "slow", 100)
        assert answers["ledger"][60][:3] == (pb.DECISION_DEGRADE, "slow", relax_priority(13 * NANO, STEP))
        assert answers["ledger"][61] == (12, 0, 12, {"slow"}, relax_priority(25 * NANO, STEP))
        assert local.bal("acme", "requests") == 0 and b.bal("acme", "requests") == 0  # nothing charged slow

        b.flush()
        assert degraded_central(lg) == 25 * NANO
        end = end_of(b, lg)
        b.clock.ms = local.now_ms = end + 1
        local.tick()
        beats(b, 2)
        assert rolls(lg) == 1
        audited = [(e.amount_nano, e.reference) for e in lg.entries("acme") if e.kind == "degraded"]
        assert audited == [(e.amount_nano, e.reference) for e in local.audit("acme", "degraded")]
        assert audited == [(25 * NANO, "served in slow mode, not charged")]
        assert degraded_central(lg) == 0
        # The next period: its credits first, then the fallback with the hint back at the top.
        for x in (b, local):
            got = [x.report("acme", "requests", 1, model="gpt-4o").decision for _ in range(51)]
            assert got == [pb.DECISION_ALLOW] * 50 + [pb.DECISION_DEGRADE]
        assert answer(b.report("acme", "requests", 1, model="gpt-4o")) == \
            answer(local.report("acme", "requests", 1, model="gpt-4o"))
        assert Escrow(lg).check() == []


def test_four_sidecars_spend_the_credits_then_serve_slow_with_the_hint_of_all_of_them(fleet, ledger_url):
    nodes = fleet(4)
    nodes[0].subscribe("acme", "slow_pool")
    decisions = []
    for i in range(90):
        decisions.append(nodes[i % 4].report("acme", "requests", 1, model="gpt-4o").decision)
    # Exactly the 50 included requests are charged, wherever they came; none is denied, and none is
    # served slow while credit was left on another sidecar.
    assert decisions == [pb.DECISION_ALLOW] * 50 + [pb.DECISION_DEGRADE] * 40
    for x in nodes:
        x.flush()
    with Ledger(ledger_url) as lg:
        assert degraded_central(lg) == 40 * NANO
        # A sidecar's next lease answer brings the others' degraded usage: 40 served slow in all.
        held = nodes[0].engine.leases.held[("acme", 1)]
        nodes[0].run(nodes[0].engine.leases._acquire("acme", 1, held, 0, 0))
        r = nodes[0].report("acme", "requests", 1, model="gpt-4o")
        assert (r.decision, r.mode, r.priority) == (pb.DECISION_DEGRADE, "slow", relax_priority(41 * NANO, STEP))
        assert Escrow(lg).check() == []


def test_a_degraded_event_replays_as_served_after_a_kill(node, ledger_url):
    b = node()
    with Ledger(ledger_url) as lg:
        b.subscribe("acme", "slow_pool")
        assert b.report("acme", "requests", 50, model="gpt-4o").decision == pb.DECISION_ALLOW
        for _ in range(3):
            assert b.report("acme", "requests", 1, model="gpt-4o").decision == pb.DECISION_DEGRADE
        b.restart(clean=False)  # as after kill -9: the log is replayed over the last snapshot
        core = b.engine.live.core
        idx = core.account(b"acme")
        # on no plan of its own (the loose plan: its plan gives no free units): what no lease covers is
        # denied, then topped up
        assert core.state(idx)[2] == b.engine.live.catalog.loose_plan
        assert core.state(idx)[0][1][4] == 3 * NANO  # the three served slow, replayed as served slow
        assert b.engine.leases.held[("acme", 1)].degraded == 3 * NANO
        r = b.report("acme", "requests", 1, model="gpt-4o")
        assert (r.decision, r.priority) == (pb.DECISION_DEGRADE, relax_priority(4 * NANO, STEP))
        b.flush()
        assert degraded_central(lg) == 4 * NANO
        assert b.bal("acme", "requests") == 0
        assert Escrow(lg).check() == []
