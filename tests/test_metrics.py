"""The Prometheus endpoint of a real daemon: decisions, events, latency per RPC,
group commits, LMDB's map and the ledger flush, scraped over HTTP."""

from __future__ import annotations

import urllib.request

from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_metrics_endpoint_counts_what_the_daemon_did(make_daemon):
    port = free_port()
    d = make_daemon(extra_env={"METERD_METRICS_LISTEN": f"127.0.0.1:{port}"}).start()
    d.admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=10**12))
    event = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=10, dimensions={"model": "gpt-4o"})
    for _ in range(5):
        d.meter.Report(pb.ReportRequest(event=event))
    d.meter.Report(pb.ReportRequest(event=pb.UsageEvent(customer_id="ghost", meter="input_tokens", quantity=1,
                                                        dimensions={"model": "gpt-4o"})))
    d.meter.ReportBatch(pb.ReportBatchRequest(client_id="m", sequence=1, events=[event] * 10))
    d.meter.Authorize(pb.AuthorizeRequest(customer_id="acme", meter="output_tokens", quantity=10,
                                          dimensions={"model": "gpt-4o"}))
    d.meter.Authorize(pb.AuthorizeRequest(customer_id="ghost", meter="output_tokens", quantity=10,
                                          dimensions={"model": "gpt-4o"}))
    m = _scrape(port)
    assert m[("meterd_decisions_total", (("decision", "allow"), ("rpc", "Report")))] == 5
    assert m[("meterd_decisions_total", (("decision", "deny"), ("rpc", "Report")))] == 1
    assert m[("meterd_decisions_total", (("decision", "allow"), ("rpc", "ReportBatch")))] == 10
    assert m[("meterd_decisions_total", (("decision", "allow"), ("rpc", "Authorize")))] == 1
    assert m[("meterd_decisions_total", (("decision", "deny"), ("rpc", "Authorize")))] == 1
    assert m[("meterd_events_total", ())] == 16
    assert m[("meterd_rpc_duration_seconds_count", (("rpc", "Report"),))] == 6
    assert m[("meterd_rpc_duration_seconds_count", (("rpc", "Authorize"),))] == 2
    assert m[("meterd_rpc_duration_seconds_count", (("rpc", "Grant"),))] == 1
    assert m[("meterd_rpc_duration_seconds_bucket", (("le", "+Inf"), ("rpc", "Report")))] == 6
    assert 0 < m[("meterd_rpc_duration_seconds_sum", (("rpc", "Report"),))] < 6
    commits = m[("meterd_commit_seconds_count", ())]
    assert commits >= 8 and m[("meterd_commit_group_calls_count", ())] == commits  # one observation per commit
    assert m[("meterd_commit_group_calls_sum", ())] >= 8  # every durable call was in some group
    assert 0 < m[("meterd_lmdb_map_used_bytes", ())] < m[("meterd_lmdb_map_size_bytes", ())] == 8 << 30
    assert ("meterd_ledger_flush_lag_seconds", ()) in m and ("meterd_ledger_backlog", (("kind", "entries"),)) in m


def test_the_grafana_dashboard_only_uses_metrics_the_daemon_exports(make_daemon):
    import json
    import re
    from pathlib import Path
    port = free_port()
    d = make_daemon(extra_env={"METERD_METRICS_LISTEN": f"127.0.0.1:{port}"}).start()
    d.meter.Report(pb.ReportRequest(event=pb.UsageEvent(customer_id="demo", meter="input_tokens", quantity=1,
                                                        dimensions={"model": "gpt-4o"})))
    exported = {name for name, _ in _scrape(port)}
    dashboard = json.loads((Path(__file__).parent.parent / "examples" / "grafana-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"meterd_[a-z_]+", target["expr"])}
    assert len(dashboard["panels"]) >= 8 and used
    assert used <= exported, used - exported
