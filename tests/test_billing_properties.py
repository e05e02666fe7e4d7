"""Random sequences of usage, grants, plan changes, period boundaries and
restarts, on both cores side by side; invariants checked after every step."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from billing import DAY_MS, NANO, Billing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterd.errors import Conflict, InvalidInput, NotFound

CUSTOMERS = ["studio", "a", "b"]
PLANS = ["free", "starter", "creator", "pro"]
MODELS = ["eleven_flash_v2_5", "eleven_v3"]

step = st.one_of(
    st.tuples(st.just("report"), st.sampled_from(CUSTOMERS), st.integers(0, 400_000), st.sampled_from(MODELS)),
    st.tuples(st.just("grant"), st.sampled_from(CUSTOMERS), st.integers(1, 50_000), st.integers(0, 3),
              st.one_of(st.none(), st.integers(1, 60))),
    st.tuples(st.just("adjust"), st.sampled_from(CUSTOMERS), st.integers(-20_000, -1)),
    st.tuples(st.just("advance"), st.integers(1, 40 * DAY_MS)),
    st.tuples(st.just("tick")),
    st.tuples(st.just("change_plan"), st.sampled_from(CUSTOMERS), st.sampled_from(PLANS)),
    st.tuples(st.just("resubscribe"), st.sampled_from(CUSTOMERS), st.sampled_from(PLANS)),
    st.tuples(st.just("restart"), st.booleans()),
)


def apply(b: Billing, op: tuple) -> None:
    from meterd.v1 import admin_pb2 as apb
    kind = op[0]
    try:
        if kind == "report":
            r = b.report(op[1], "characters", op[2], model=op[3])
            if r.cost_nano:  # usage never takes a balance below its allowed overage
                cts = b.engine.core.state(b.engine.core.account(op[1].encode()))[0][1]
                assert r.balance_nano - cts[1] >= cts[2], (op, r.balance_nano, cts)
        elif kind == "grant":
            expires = b.now_ms + op[4] * DAY_MS if op[4] else 0
            b.grant(op[1], "credits", op[2] * NANO, priority=op[3], expires_at_ms=expires)
        elif kind == "adjust":
            b.run(b.engine.adjust(apb.AdjustRequest(customer_id=op[1], credit_type="credits",
                                                    amount_nano=op[2] * NANO, reason="property test")))
        elif kind == "advance":
            b.advance(op[1])
        elif kind == "tick":
            b.tick()
        elif kind == "change_plan":
            b.change_plan(op[1], op[2])
        elif kind == "resubscribe":
            if op[1] in b.engine.subs:
                b.cancel(op[1])
            b.subscribe(op[1], op[2])
        elif kind == "restart":
            b.restart(clean=op[1])
    except (NotFound, Conflict, InvalidInput):
        pass  # for example a plan change without a subscription: refused, nothing applied


def check(b: Billing) -> None:
    core = b.engine.core
    for customer in CUSTOMERS:
        if core.account(customer.encode()) < 0:
            continue
        b.check_conservation(customer)
        sub = b.engine.subs.get(customer)
        plan = b.catalog.plan_index.get(sub.plan) if sub else None
        policy = plan.credits.get(1) if plan else None
        if policy is not None and policy.rollover is not None and policy.rollover.max_nano is not None:
            acct = b.engine.accounts.get(customer)
            rolled = sum(x.remaining_nano for x in acct.buckets.get(1, []) if x.source == "rollover") if acct else 0
            assert rolled <= policy.rollover.max_nano


def state(b: Billing) -> list:
    out = []
    for customer in CUSTOMERS:
        if b.engine.core.account(customer.encode()) >= 0:
            out.append(b.balance(customer).SerializeToString(deterministic=True))
    return out


EXAMPLES = 500 if os.environ.get("METERD_SOAK") else 60


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(step, min_size=1, max_size=30))
def test_random_billing_histories_keep_every_invariant_on_both_cores(monkeypatch: pytest.MonkeyPatch, steps):
    with tempfile.TemporaryDirectory() as d1, tempfile.TemporaryDirectory() as d2:
        with monkeypatch.context() as m1:
            compiled = Billing(Path(d1), "elevenlabs", m1, core="compiled")
            compiled.subscribe("a", "starter")
            for op in steps:
                apply(compiled, op)
                check(compiled)
            results_c = state(compiled)
            compiled.close()
        with monkeypatch.context() as m2:
            python = Billing(Path(d2), "elevenlabs", m2, core="python")
            python.subscribe("a", "starter")
            for op in steps:
                apply(python, op)
                check(python)
            results_p = state(python)
            python.close()
    assert results_c == results_p
