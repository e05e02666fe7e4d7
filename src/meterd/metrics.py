"""Prometheus metrics on an HTTP port (``metrics_listen``), read at scrape time.

The request path only bumps plain integers (decisions by RPC and outcome) and
fills fixed-bucket histograms (latency per RPC, group-commit size and time);
a scrape turns them into metric families. No lock is taken per call: each
counter has one writing thread (the event loop, or the LMDB writer).
"""

from __future__ import annotations

import bisect
import collections
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from meterd.errors import ConfigError

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class Histogram:
    """Fixed buckets, filled by one thread, read by the scrape."""

    __slots__ = ("bounds", "counts", "total", "n")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.n += 1

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        return histogram_family(name, documentation, [], {(): self})


def histogram_family(name: str, documentation: str, labels: list[str],
                     by: dict[tuple[str, ...], Histogram]) -> HistogramMetricFamily:
    """Histograms, one per set of label values, as one metric family."""
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for label_values, h in by.items():
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, h.bounds), "+Inf"], h.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric(list(label_values), buckets, h.total)
    return family


class Timings:
    """Latency per RPC (updated on the event loop)."""

    def __init__(self) -> None:
        self.latency: dict[tuple[str, ...], Histogram] = collections.defaultdict(lambda: Histogram(LATENCY_BUCKETS))

    def observe(self, method: str, started: float) -> None:
        self.latency[(method,)].observe(time.perf_counter() - started)


class LedgerCollector(Collector):
    """The flush to the central ledger: backlog, progress and failures."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        e = self.engine.flusher
        rows, entries = e.backlog()
        backlog = GaugeMetricFamily("meterd_ledger_backlog", "Aggregates and audit entries in LMDB waiting for "
                                    "the central ledger", labels=["kind"])
        backlog.add_metric(["usage_rows"], rows)
        backlog.add_metric(["entries"], entries)
        yield backlog
        yield GaugeMetricFamily("meterd_ledger_flushed_sequence", "The last flush the ledger acknowledged",
                                value=e.flushed_seq)
        yield GaugeMetricFamily("meterd_ledger_last_flush_timestamp_seconds", "When the last flush succeeded",
                                value=e.last_flush_ms / 1000)
        yield GaugeMetricFamily("meterd_ledger_consecutive_failures", "Flush attempts failed since the last success",
                                value=e.flush_failures)
        flushes = CounterMetricFamily("meterd_ledger_flushes", "Flushes by outcome", labels=["outcome"])
        for outcome, n in sorted(e.flush_outcomes.items()):
            flushes.add_metric([outcome], n)
        yield flushes
        if self.engine.leases is not None:
            yield from _lease_families(self.engine.leases)


# Bounds of the lease wait histogram, ms (meterd.leases counts into them).
WAIT_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
# Lease counters (meterd.leases) by what they count, with their help text.
_LEASE_COUNTERS = {
    "acquisitions": "Lease transactions in the ledger (top-ups and refills)",
    "refills": "Background refills of a lease below its low-water mark",
    "sync_waits": "Requests that waited for a top-up and were then covered",
    "recalls_asked": "Other sidecars' leases recalled by this sidecar's top-ups",
    "recalls_answered": "Recalls of this sidecar's leases answered",
    "false_denies": "Denials while credit was left at other sidecars' leases (a recall did not come back in time)",
    "denied_exhausted": "Denials because the whole balance could not cover the request",
    "denied_ledger_away": "Denials because the ledger could not be reached for a top-up (fail closed)",
    "idle_returns": "Leases given back because they were idle or their grant expired",
    "leases_full": "Top-ups refused because leases_max leases are held",
    "lookups_limited": "Top-ups refused for customers not held here, past the lookups allowed per heartbeat",
    "denied_busy": "Denials because the lease's top-up in flight did not end within lease_wait_ms",
    "ledger_failures": "Lease calls to the ledger that failed",
    "borrows": "Requests covered by the customer's outage allowance while the ledger was away",
    "forgotten": "Leases forgotten here once idle, empty and settled (the ledger keeps their totals)",
}


def _lease_families(leases: Any) -> Iterator[Any]:
    yield GaugeMetricFamily("meterd_leases_held", "Leases of central balances held by this sidecar",
                            value=len(leases.held))
    for name, help_text in _LEASE_COUNTERS.items():
        yield CounterMetricFamily(f"meterd_lease_{name}", help_text, value=leases.counts[name])
    for name, help_text in (("leased_nano", "Credit moved into this sidecar's leases, nano-units"),
                            ("returned_nano", "Credit given back to the ledger, nano-units"),
                            ("borrowed_nano", "Credit spent beyond leases within outage allowances, nano-units")):
        yield CounterMetricFamily(f"meterd_lease_{name}", help_text, value=leases.counts[name])
    buckets = []
    total = 0
    for bound, n in zip(WAIT_BUCKETS_MS, leases.wait_ms, strict=False):
        total += n
        buckets.append((str(bound / 1000), total))
    buckets.append(("+Inf", total + leases.wait_ms[-1]))
    yield HistogramMetricFamily("meterd_lease_sync_wait_seconds", "How long a covered request waited for its "
                                "top-up", buckets=buckets, sum_value=leases.wait_ms_sum / 1000)


class DaemonCollector(Collector):
    """Calls, decisions, group commits and LMDB's map."""

    def __init__(self, engine: Any, timings: Timings) -> None:
        self.engine = engine
        self.timings = timings

    def collect(self) -> Iterator[Any]:
        t, store = self.timings, self.engine.store
        decisions = CounterMetricFamily("meterd_decisions", "Decisions by RPC and outcome (a batch counts each "
                                        "event)", labels=["rpc", "decision"])
        events = 0
        for (rpc, decision), n in sorted(self.engine.decisions.items()):
            decisions.add_metric([rpc, decision], n)
            events += n if rpc in ("Report", "ReportBatch") else 0
        yield decisions
        yield CounterMetricFamily("meterd_events", "Usage events decided (Report and ReportBatch)", value=events)
        yield histogram_family("meterd_rpc_duration_seconds", "Time from a call's arrival at the handler to its "
                               "answer, by RPC", ["rpc"], dict(t.latency))
        yield store.group_sizes.family("meterd_commit_group_calls", "Callers whose work shared one group commit")
        yield store.commit_seconds.family("meterd_commit_seconds", "Time of one LMDB commit, fsync included")
        use = store.use  # measured by the writer after each commit (the pages in use, not the file's high-water)
        yield GaugeMetricFamily("meterd_lmdb_map_used_bytes", "Pages of the LMDB map in use",
                                value=use.used_bytes)
        yield GaugeMetricFamily("meterd_lmdb_map_size_bytes", "The LMDB map size (map_size_bytes)",
                                value=use.map_size_bytes)
        yield GaugeMetricFamily("meterd_lmdb_map_high_water_bytes", "Map use from which data-plane writes are "
                                "refused (map_high_water_percent)", value=use.high_bytes)
        yield GaugeMetricFamily("meterd_lmdb_writes_refused", "1 while data-plane writes are refused because the "
                                "map is above its high-water mark", value=int(use.refusing))
        last = self.engine.flusher.last_flush_ms
        yield GaugeMetricFamily("meterd_ledger_flush_lag_seconds", "Time since the last successful flush",
                                value=max(0.0, time.time() - last / 1000) if last else 0.0)


def serve_metrics(address: str, engine: Any, timings: Timings | None = None) -> tuple[Any, Any]:
    """Start the metrics HTTP server on ``host:port`` in a thread of its own."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(LedgerCollector(engine))
    registry.register(DaemonCollector(engine, timings or Timings()))
    try:
        return start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    except (OSError, ValueError) as e:
        raise ConfigError(f"metrics_listen: cannot serve metrics on {address}: {e}") from None
