"""Micro benchmarks of the core: compiled against the pure-Python twin, in one run.

    python -m pytest benchmarks --benchmark-group-by=group

Compare the two rows of each group as a ratio; absolute figures depend on the
machine and its neighbours.
"""

from __future__ import annotations

import random

import pytest

from meterd import _fastpath, _fastpath_py
from meterd.catalog import load_catalog
from meterd.v1 import meter_pb2 as pb

CUSTOMERS = 10_000
EVENTS = 8_000
LIMITS = dict(customer_id_bytes_max=128, client_id_bytes_max=128, batch_events_max=EVENTS, dimensions_max=16,
              dimension_key_bytes_max=64, dimension_value_bytes_max=128,
              dimension_sets_per_window_max=1000)
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini"]


def make(kind):
    denominators, meters, rates = load_catalog(None).compile()
    core = {"compiled": _fastpath.Core, "python": _fastpath_py.Core}[kind](denominators, meters, rates, dict(LIMITS))
    for i in range(CUSTOMERS):
        core.credit(core.open_account(f"customer-{i}".encode()), 0, 10**15)
    return core


def batch_bytes() -> bytes:
    rng = random.Random(1)
    events = [pb.UsageEvent(customer_id=f"customer-{rng.randrange(CUSTOMERS)}",
                            meter=rng.choice(["input_tokens", "output_tokens"]), quantity=rng.randrange(1, 4000),
                            dimensions={"model": rng.choice(MODELS)}) for _ in range(EVENTS)]
    return pb.ReportBatchRequest(client_id="bench", sequence=1, events=events).SerializeToString()


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_apply_batch_8000_events(benchmark, kind):
    benchmark.group = "apply_batch (8000 events, 10k customers)"
    core = make(kind)
    data = batch_bytes()
    accepted, denied, degraded, _ = benchmark(core.apply_batch, data)
    assert (accepted, denied, degraded) == (EVENTS, 0, 0)


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_reserve_and_settle(benchmark, kind):
    benchmark.group = "reserve + settle"
    core = make(kind)
    rate = core.find_rate(2, {b"model": b"gpt-4o"})

    def cycle():
        ct, amount = core.quote(rate, 4096)
        core.reserve(7, ct, amount)
        return core.settle(7, rate, 1000, amount)

    assert benchmark(cycle) == (10_000_000, 0)


@pytest.mark.parametrize("kind", ["compiled", "python"])
def test_drain_usage_for_the_ledger(benchmark, kind):
    """What a snapshot does with the usage of one 8000-event batch: take the
    core's aggregates and encode them as LMDB rows with their deductions."""
    from meterd.drain import Drained

    benchmark.group = "drain usage aggregates (one 8000-event batch over 10k customers)"
    core = make(kind)
    data = batch_bytes()
    compiled = load_catalog(None).compiled

    def drain() -> Drained:
        drained = Drained()
        drained.add(core.take_usage(), compiled)
        return drained

    def setup() -> None:  # a batch's worth of aggregates to drain
        core.apply_batch(data)

    drained = benchmark.pedantic(drain, setup=setup, rounds=30)
    assert 0 < len(drained.rows) <= EVENTS and sum(cost for cost, _ in drained.spent.values()) > 0
