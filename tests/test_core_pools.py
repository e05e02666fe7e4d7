"""Free units held as a balance (Core.set_pools), in both cores: ledger mode leases a plan's
free units of a meter to each sidecar as a pool, and the core takes an event's units from it
first. On plan 0 an event the pool cannot cover whole is denied (so that the pool is topped up
first); on any other plan the rest is priced, as local mode's free units are."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_core import CORES, LIMITS, batch, ev, multi

from meterd.catalog import parse_catalog
from meterd.corespec import REASON_INSUFFICIENT_BALANCE
from meterd.v1 import meter_pb2 as pb

CATALOG = {
    "credit_types": {"usd": {"kind": "fiat"}, "free_gpu": {"kind": "custom", "decimals": 0},
                     "free_calls": {"kind": "custom", "decimals": 0}},
    "meters": {
        "gpu_seconds": {"credit_type": "usd", "precision": 3, "price_dimension": "hardware",
                        "prices": {"cpu": "0", "h100": "0.001525"}, "minimum": "0.001"},
        "calls": {"credit_type": "usd", "price": "0.001", "aggregation": "count"},
        "seats": {"credit_type": "usd", "price": "5", "aggregation": "max"},
    },
}
USD, GPU_POOL, CALL_POOL = 0, 1, 2
POOLS = [GPU_POOL, CALL_POOL, -1]
# plan 1: no fallback (loose); plan 2: usd degrades to "relax"
PLANS = [[(0, 0)] * 3, [(1, 0), (0, 0), (0, 0)]]
H100_NANO_PER_MS = 1525  # $0.001525 a second


def make(kind: str, pools: list[int] | None = POOLS):
    denominators, meters, rates = parse_catalog(CATALOG, "test").compile()
    c = CORES[kind](denominators, meters, rates, dict(LIMITS), 64, PLANS, [b"relax"], [[0] * 3] * 2,
                    [b"usd", b"free_gpu", b"free_calls"])
    if pools is not None:
        c.set_pools(pools)
    idx = c.open_account(b"acme")
    c.credit(idx, USD, 10**9)  # $1
    return c, idx


def report(c, e: pb.UsageEvent) -> tuple:
    return c.report(pb.ReportRequest(event=e).SerializeToString())


def balances(c, idx: int) -> list[int]:
    return [s[0] for s in c.state(idx)[0]]


@pytest.fixture(params=list(CORES))
def kind(request):
    return request.param


def test_a_strict_account_takes_its_units_from_the_pool_or_is_denied_whole(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 5000)  # 5 s of free GPU time, in ms
    r = report(c, ev(meter="gpu_seconds", quantity="3", hardware="h100"))
    assert (r[0], r[3]) == (pb.DECISION_ALLOW, 0)  # free: no minimum either
    assert balances(c, idx) == [10**9, 2000, 0]
    r = report(c, ev(meter="gpu_seconds", quantity="3", hardware="h100"))
    assert (r[0], r[1]) == (pb.DECISION_DENY, REASON_INSUFFICIENT_BALANCE)
    assert balances(c, idx) == [10**9, 2000, 0]  # nothing taken
    assert c.state(idx)[1][0] == 3000  # nor counted


def test_a_loose_account_takes_what_the_pool_has_and_pays_for_the_rest(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 2000)
    c.set_plan(idx, 1)
    r = report(c, ev(meter="gpu_seconds", quantity="3", hardware="h100"))
    assert (r[0], r[3]) == (pb.DECISION_ALLOW, 1000 * H100_NANO_PER_MS)
    assert balances(c, idx) == [10**9 - 1000 * H100_NANO_PER_MS, 0, 0]
    r = report(c, ev(meter="gpu_seconds", quantity="0.001", hardware="h100"))
    assert r[3] == 10**6  # priced at all: the minimum, $0.001


def test_a_free_priced_event_uses_up_the_pool_as_local_modes_usage_does(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 2000)
    assert report(c, ev(meter="gpu_seconds", quantity="1.5", hardware="cpu"))[0] == pb.DECISION_ALLOW
    assert balances(c, idx)[GPU_POOL] == 500


def test_without_pools_the_plans_free_units_are_given_instead(kind):
    denominators, meters, rates = parse_catalog(CATALOG, "test").compile()
    c = CORES[kind](denominators, meters, rates, dict(LIMITS), 64, PLANS, [b"relax"],
                    [[1000, 0, 0], [0, 0, 0]], [b"usd", b"free_gpu", b"free_calls"])
    idx = c.open_account(b"acme")
    c.credit(idx, USD, 10**9)
    c.set_plan(idx, 1)
    assert report(c, ev(meter="gpu_seconds", quantity="3", hardware="h100"))[3] == 2000 * H100_NANO_PER_MS
    c.set_pools(POOLS)  # a pool replaces the plan's free units of its meter
    c.reset_usage(idx)
    assert report(c, ev(meter="gpu_seconds", quantity="3", hardware="h100"))[3] == 3000 * H100_NANO_PER_MS


def test_a_degraded_event_takes_the_pool_first_as_local_mode_does(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 2000)
    c.set_plan(idx, 2)
    r = report(c, ev(meter="gpu_seconds", quantity="1000", hardware="h100"))  # $1.52 past $1
    assert r[0] == pb.DECISION_DEGRADE
    assert balances(c, idx) == [10**9, 0, 0]
    assert c.state(idx)[0][USD][4] == 998_000 * H100_NANO_PER_MS  # the degraded sum: all but the free 2 s


def test_an_event_of_several_quantities_denied_gives_its_pools_back(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 2000)
    c.credit(idx, CALL_POOL, 1)
    c.set_plan(idx, 1)
    # 2 s free, 998 s priced: more than the $1 there is; the call is free
    r = report(c, multi(parts=[("gpu_seconds", "1000"), ("calls", 1)], hardware="h100"))
    assert (r[0], r[1]) == (pb.DECISION_DENY, REASON_INSUFFICIENT_BALANCE)
    assert balances(c, idx) == [10**9, 2000, 1]
    r = report(c, multi(parts=[("gpu_seconds", "3"), ("calls", 1)], hardware="h100"))
    assert (r[0], r[3]) == (pb.DECISION_ALLOW, 1000 * H100_NANO_PER_MS)
    assert balances(c, idx) == [10**9 - 1000 * H100_NANO_PER_MS, 0, 0]
    r = report(c, multi(parts=[("gpu_seconds", "1"), ("calls", 1)], hardware="h100"))
    assert r[3] == 1000 * H100_NANO_PER_MS + 10**6  # the pools spent: both priced


def test_a_strict_event_of_several_quantities_is_denied_whole_for_one_short_pool(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 5000)
    r = report(c, multi(parts=[("gpu_seconds", "3"), ("calls", 1)], hardware="h100"))
    assert (r[0], r[1]) == (pb.DECISION_DENY, REASON_INSUFFICIENT_BALANCE)  # no call in its pool
    assert balances(c, idx) == [10**9, 5000, 0]


def test_a_settled_hold_takes_the_pool_whatever_the_plan(kind):
    c, idx = make(kind)
    c.credit(idx, GPU_POOL, 2000)
    rate = c.find_rate(0, {b"hardware": b"h100"})
    assert c.reserve(idx, USD, 10**8)
    cost, _ = c.settle(idx, rate, 3000, 10**8)
    assert cost == 1000 * H100_NANO_PER_MS
    assert balances(c, idx) == [10**9 - 1000 * H100_NANO_PER_MS, 0, 0]


@pytest.mark.parametrize("pools", [[1, 1, -1], [0, -1, -1], [-1, -1, 1], [1, 2], [3, -1, -1], [-2, -1, -1]])
def test_pools_are_checked(kind, pools):
    c, _ = make(kind, None)
    with pytest.raises(ValueError, match="pools"):
        c.set_pools(pools)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_both_cores_answer_the_same_with_pools(seed):
    if CORES["compiled"] is None:
        pytest.skip("the compiled core is not built")
    rnd = random.Random(seed)
    cores = [make(k) for k in CORES]
    for c, idx in cores:
        c.credit(idx, GPU_POOL, 4000)
        c.credit(idx, CALL_POOL, 3)
    for _ in range(30):
        step = rnd.random()
        if step < 0.1:
            plan = rnd.randrange(3)
            for c, idx in cores:
                c.set_plan(idx, plan)
            continue
        if step < 0.2:
            amount = rnd.randrange(3000)
            for c, idx in cores:
                c.credit(idx, GPU_POOL, amount)
            continue
        hw = rnd.choice(["cpu", "h100"])
        if step < 0.5:
            events = [multi(parts=[("gpu_seconds", str(rnd.randrange(1, 3000) / 1000)), ("calls", rnd.randrange(3))],
                            hardware=hw)]
        else:
            events = [ev(meter=rnd.choice(["gpu_seconds", "calls"]), quantity=rnd.randrange(1, 2500), hardware=hw)
                      for _ in range(rnd.randrange(1, 4))]
        answers = [c.apply_batch(batch(events)) for c, _ in cores]
        assert answers[0] == answers[1]
        assert cores[0][0].state(0) == cores[1][0].state(0)
