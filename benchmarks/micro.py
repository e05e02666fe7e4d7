"""Micro benchmarks of the core, compiled against its pure-Python twin, in one run.

The same 100,000 rated events over 10,000 customers with mixed models; the
same decoding; the same reservation cycle. Best of a few rounds each.
"""

from __future__ import annotations

import random
import time
from typing import Any, Callable

from meterd import _fastpath, _fastpath_py
from meterd.catalog import load_catalog
from meterd.v1 import meter_pb2 as pb

CUSTOMERS = 10_000
EVENTS = 100_000
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini"]
LIMITS = dict(customer_id_bytes_max=128, client_id_bytes_max=128, batch_events_max=EVENTS, dimensions_max=16,
              dimension_key_bytes_max=64, dimension_value_bytes_max=128,
              dimension_sets_per_window_max=1000)
CORES: dict[str, Any] = {"compiled": _fastpath.Core, "python": _fastpath_py.Core}


def make(kind: str, customers: int = CUSTOMERS) -> Any:
    denominators, meters, rates = load_catalog(None).compile()
    core = CORES[kind](denominators, meters, rates, dict(LIMITS))
    for i in range(customers):
        core.credit(core.open_account(f"customer-{i}".encode()), 0, 10**15)
    return core


def batch(n: int = EVENTS, seed: int = 1, prefix: str = "customer-") -> bytes:
    rng = random.Random(seed)
    events = [pb.UsageEvent(customer_id=f"{prefix}{rng.randrange(CUSTOMERS)}",
                            meter=rng.choice(["input_tokens", "output_tokens", "cached_input_tokens"]),
                            quantity=rng.randrange(1, 4000), dimensions={"model": rng.choice(MODELS)})
              for _ in range(n)]
    return pb.ReportBatchRequest(client_id="bench", sequence=1, events=events).SerializeToString()


def best(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run(progress: Callable[[str], None] = print) -> list[dict]:
    """Rows: name, core, seconds per operation, events per second."""
    data = batch()
    unknown = batch(prefix="nobody-")  # decoded and validated in full, then denied: nothing is applied
    out = []
    for kind in CORES:
        core = make(kind)
        rounds = 5 if kind == "compiled" else 2
        progress(f"micro: {kind} core, apply 100k events")
        t = best(lambda: core.apply_batch(data), rounds)  # noqa: B023 - called at once
        out.append({"name": "apply_batch 100k events, 10k customers", "core": kind, "seconds": t,
                    "events_per_s": EVENTS / t})
        t = best(lambda: core.apply_batch(unknown), rounds)  # noqa: B023
        out.append({"name": "decode + validate 100k events", "core": kind, "seconds": t,
                    "events_per_s": EVENTS / t})
        core.take_usage()
        rate = core.find_rate(2, {b"model": b"gpt-4o"})

        def cycles(n: int = 20_000) -> None:
            for _ in range(n):
                ct, amount = core.quote(rate, 4096)  # noqa: B023
                core.reserve(7, ct, amount)  # noqa: B023
                core.settle(7, rate, 1000, amount)  # noqa: B023

        t = best(cycles, 3) / 20_000
        out.append({"name": "reserve + settle", "core": kind, "seconds": t, "events_per_s": 1 / t})
    progress("micro: protobuf (upb) parse of the same batch, for scale")
    t = best(lambda: pb.ReportBatchRequest.FromString(data), 5)
    out.append({"name": "decode + validate 100k events", "core": "protobuf FromString (no rating)", "seconds": t,
                "events_per_s": EVENTS / t})
    return out


if __name__ == "__main__":
    for row in run():
        print(f"{row['name']:<42} {row['core']:<32} {row['seconds'] * 1e3:10.3f} ms {row['events_per_s']:>14,.0f}/s")
