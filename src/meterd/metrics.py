"""Prometheus metrics on an HTTP port (``metrics_listen``), read at scrape time.

Nothing is counted per event: a scrape reads the engine's own counters and
LMDB's entry counts, so metrics cost the request path nothing.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meterd.errors import ConfigError


class LedgerCollector(Collector):
    """The flush to the central ledger: backlog, progress and failures."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        e = self.engine
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


def serve_metrics(address: str, engine: Any) -> tuple[Any, Any]:
    """Start the metrics HTTP server on ``host:port`` in a thread of its own."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry()
    registry.register(LedgerCollector(engine))
    try:
        return start_http_server(int(port), addr=host or "127.0.0.1", registry=registry)
    except (OSError, ValueError) as e:
        raise ConfigError(f"metrics_listen: cannot serve metrics on {address}: {e}") from None
