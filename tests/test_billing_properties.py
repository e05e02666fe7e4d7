"""Random sequences of usage, grants, plan changes, period boundaries and
restarts, on both cores side by side; invariants checked after every step.

Four catalogs: ElevenLabs (rollover caps, unlimited overage billed at the
period's end), Cursor (weights, a degraded fallback, an overage spend limit
billed early), Midjourney (Relax, and an annual plan whose fast time resets
monthly) and the hybrid (graduated overage, gauges, distinct users, free
units, two credit types, and calls of several quantities decided as a whole).
Each history may also set and clear a customer's own terms: an overdraft, a
discount, a budget and included credits."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from billing import DAY_MS, NANO, Billing
from conftest import compiled_core_unavailable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterd import wire
from meterd.errors import Conflict, InvalidInput, NotFound
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

CUSTOMERS = ["a", "b", "c"]
# per catalog: the plans, the credit type grants go to, and events as (meter, dimensions, quantity range)
SETUPS = {
    "elevenlabs": (["free", "starter", "creator", "pro"], "credits",
                   [("characters", {"model": "eleven_flash_v2_5"}, 400_000),
                    ("characters", {"model": "eleven_v3"}, 400_000)]),
    "cursor": (["pro", "pro_usage_based"], "requests",
               [("requests", {"model": "claude-3.5-haiku"}, 3), ("requests", {"model": "o1"}, 1),
                ("requests", {"model": "gpt-4o"}, 1)]),
    "midjourney": (["standard", "standard_annual", "basic"], "fast_seconds",
                   [("gpu_seconds", {"job": "image"}, 20_000), ("gpu_seconds", {"job": "turbo"}, 5000)]),
    "hybrid": (["team"], "usd",
               [("output_tokens", {"model": "gpt-4o"}, 3_000_000), ("requests", {"model": "o1"}, 1),
                ("seats", {}, 40), ("active_users", {"user": "u"}, 0),
                ("gpu_seconds", {"hardware": "nvidia-h100"}, 5000)]),
}


# per catalog: one request's quantities (UsageEvent.quantities), rated and decided as a whole
CALLS = {"hybrid": ({"model": "gpt-4o", "hardware": "nvidia-h100"}, ["input_tokens", "output_tokens", "gpu_seconds"])}


# each term's values: overdraft, budget and included credits in whole units, a discount in basis points
TERM_RANGES = {"overdraft": (300, NANO), "discount": (10_000, 1), "budget": (50, NANO), "included": (1000, NANO)}


def steps_for(catalog: str) -> st.SearchStrategy:
    plans, _, events = SETUPS[catalog]
    calls = [st.tuples(st.just("call"), st.sampled_from(CUSTOMERS), st.integers(0, 2_000_000),
                       st.integers(0, 2_000_000), st.integers(0, 3000), st.integers(1, 7))] if catalog in CALLS else []
    return st.one_of(
        *calls,
        st.tuples(st.just("report"), st.sampled_from(CUSTOMERS), st.integers(0, len(events) - 1),
                  st.integers(0, 1_000_000), st.integers(0, 9)),
        st.tuples(st.just("grant"), st.sampled_from(CUSTOMERS), st.integers(1, 500), st.integers(0, 3),
                  st.one_of(st.none(), st.integers(1, 60))),
        st.tuples(st.just("adjust"), st.sampled_from(CUSTOMERS), st.integers(-200, -1)),
        st.tuples(st.just("advance"), st.integers(1, 40 * DAY_MS)),
        st.tuples(st.just("tick")),
        st.tuples(st.just("change_plan"), st.sampled_from(CUSTOMERS), st.sampled_from(plans)),
        st.tuples(st.just("resubscribe"), st.sampled_from(CUSTOMERS), st.sampled_from(plans)),
        st.tuples(st.just("restart"), st.booleans()),
        # a customer's own terms (Admin SetTerm), set or cleared at any point of a period
        st.tuples(st.just("term"), st.sampled_from(CUSTOMERS), st.sampled_from(sorted(TERM_RANGES)),
                  st.integers(0, 10**6), st.booleans()),
    )


def apply(b: Billing, catalog: str, op: tuple) -> None:
    _, credit, events = SETUPS[catalog]
    kind = op[0]
    try:
        if kind == "report":
            meter, dims, top = events[op[2]]
            dims = {k: (v + str(op[4]) if k == "user" else v) for k, v in dims.items()}
            quantity = op[3] % (top + 1)
            if meter == "gpu_seconds":
                quantity = f"{quantity}.{op[4]}"
            check_floor(b, op, b.report(op[1], meter, quantity, **dims))
        elif kind == "call":
            dims, meters = CALLS[catalog]
            quantities = {m: q for m, q, used in zip(meters, (op[2], op[3], f"{op[4]}.{op[5]}"),
                                                      (True, op[5] % 2 == 1, op[5] > 3), strict=True) if used}
            check_floor(b, op, b.report_parts(op[1], quantities, **dims))
        elif kind == "grant":
            expires = b.now_ms + op[4] * DAY_MS if op[4] else 0
            b.grant(op[1], credit, op[2] * NANO, priority=op[3], expires_at_ms=expires)
        elif kind == "adjust":
            b.run(wire.adjust(b.engine, apb.AdjustRequest(customer_id=op[1], credit_type=credit,
                                                    amount_nano=op[2] * NANO, reason="property test")))
        elif kind == "advance":
            b.advance(op[1])
        elif kind == "tick":
            b.tick()
        elif kind == "change_plan":
            b.plans_seen.setdefault(op[1], set()).add(op[2])  # before: a refusal may still have rolled
            b.change_plan(op[1], op[2])
        elif kind == "resubscribe":
            b.plans_seen.setdefault(op[1], set()).add(op[2])
            if op[1] in b.engine.subscriptions.subs:
                b.cancel(op[1])
            b.subscribe(op[1], op[2])
        elif kind == "restart":
            b.restart(clean=op[1])
        elif kind == "term":
            top, unit = TERM_RANGES[op[2]]
            b.set_term(op[1], credit, op[2], 0 if op[4] else op[3] % (top + 1) * unit, clear=op[4])
    except (NotFound, Conflict, InvalidInput):
        pass  # for example a plan change without a subscription: refused, nothing applied


def check_floor(b: Billing, op: tuple, r: pb.ReportResponse) -> None:
    """Usage never takes a balance below its allowed overage."""
    if r.cost_nano:
        idx = b.engine.core.account(op[1].encode())
        ct = b.catalog.credit_index[r.credit_type]
        cts = b.engine.core.state(idx)[0][ct]
        assert r.balance_nano - cts[1] >= cts[2], (op, r.balance_nano, cts)


def check(b: Billing) -> None:
    core = b.engine.core
    for customer in CUSTOMERS:
        if core.account(customer.encode()) < 0:
            continue
        b.check_conservation(customer)
        sub = b.engine.subscriptions.subs.get(customer)
        plan = b.catalog.plan_index.get(sub.plan) if sub else None
        acct = b.engine.grants.accounts.get(customer)
        # A roll is computed under the plan of the period that ended, which may not be the plan
        # now (a downgrade takes effect at the boundary): no roll exceeds the largest cap of the
        # plans the customer has been on.
        rollovers = [p.credits[ct].rollover for name in b.plans_seen.get(customer, ())
                     for p in [b.catalog.plan_index[name]] for ct in p.credits]
        caps = [r.max_nano for r in rollovers if r is not None]
        for ct, policy in (plan.credits.items() if plan else []):
            r = policy.rollover
            if r is None or acct is None:
                continue
            rolled = [x for x in acct.buckets.get(ct, []) if x.source == "rollover"]
            assert all(x.rollovers <= r.max_count for x in rolled)
            if caps and None not in caps:
                assert sum(x.remaining_nano for x in rolled) <= max(caps)
        for e in b.audit(customer, "rolled_over"):
            if caps and None not in caps:
                assert e.amount_nano <= max(caps)


def state(b: Billing) -> list:
    return [b.balance(c).SerializeToString(deterministic=True) for c in CUSTOMERS
            if b.engine.core.account(c.encode()) >= 0]


def run_history(catalog: str, core: str, steps: list, monkeypatch: pytest.MonkeyPatch) -> list:
    with tempfile.TemporaryDirectory() as d, monkeypatch.context() as m:
        b = Billing(Path(d), catalog, m, core=core)
        b.plans_seen["a"] = {SETUPS[catalog][0][0]}
        b.subscribe("a", SETUPS[catalog][0][0])
        for op in steps:
            apply(b, catalog, op)
            check(b)
        result = state(b)
        b.close()
        return result


EXAMPLES = 300 if os.environ.get("METERD_SOAK") else 60


@pytest.mark.parametrize("catalog", sorted(SETUPS))
def test_random_billing_histories_keep_every_invariant_on_both_cores(catalog: str, monkeypatch: pytest.MonkeyPatch):
    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(steps_for(catalog), min_size=1, max_size=30))
    def history(steps: list) -> None:
        twin = run_history(catalog, "python", steps, monkeypatch)
        if compiled_core_unavailable() is None:  # under --no-extensions, the twin's invariants alone
            assert run_history(catalog, "compiled", steps, monkeypatch) == twin

    history()
