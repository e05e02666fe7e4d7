"""The whole benchmark suite in one run: ``python -m benchmarks`` (or ``meterd bench``).

Sections: micro benchmarks of the core; end-to-end ingest (ReportBatch and
ReportStream, fsync on and off); unary calls at saturation and at fixed
offered loads, against a bare gRPC echo server; external baselines (Redis,
PostgreSQL, raw LMDB); capacity (memory and restart with 1M customers).
Every figure comes from this run, on this machine, and the targets of the
suite are judged as ratios between figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks import load, micro, unary
from meterd.v1 import meter_pb2 as pb

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


class Progress:
    """One line per step, with the time since the start."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self, message: str) -> None:
        print(f"[{time.monotonic() - self.start:6.1f}s] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mib": mem, "python": platform.python_version(),
            "kernel": platform.release(), "load_average_at_start": os.getloadavg()[0]}


def ingest(seconds: float, progress: Callable[[str], None]) -> list[dict]:
    """ReportBatch and ReportStream, batches of 100, 1,000 and 8,000, fsync on and off."""
    runs = []
    for fsync in (True, False):
        with load.Server("meterd", fsync=fsync) as server:
            for method in ("ReportBatch", "ReportStream"):
                for size in (100, 1000, 8000):
                    progress(f"ingest: {method} x{size}, fsync {'on' if fsync else 'off'}")
                    inflight = 4 if size == 8000 else 16
                    run = load.drive(server.target, method, processes=2, seconds=seconds, inflight=inflight,
                                     batch=size)
                    run.name += " (fsync)" if fsync else " (no fsync)"
                    runs.append(run.as_dict() | {"method": method, "batch": size, "fsync": fsync})
    return runs


def unary_calls(seconds: float, progress: Callable[[str], None]) -> list[dict]:
    """Report and Authorize at saturation and at fixed loads; the echo server's ceiling."""
    why = unary.available()
    if why:
        return [{"name": "unary calls", "skipped": why}]
    report = load.report_request()
    authorize = pb.AuthorizeRequest(customer_id="c1", meter="output_tokens", quantity=1000,
                                    dimensions={"model": "gpt-4o"}, ttl_ms=2000).SerializeToString()
    runs: list[dict] = []

    def sweep(target: str, path: str, request: bytes, method: str, shares: tuple[float, ...],
              calls: int) -> None:
        """Saturation first, then fixed offered loads at these shares of it."""
        progress(f"unary: {method} at saturation")
        name = {"Echo": "echo (bare gRPC)", "Echo handoff": "echo, answered after a thread handoff",
                "Echo durable": "echo, answered after an LMDB group commit"}.get(method, f"meterd {method}")
        sat = unary.h2load(target, path, request, name, calls=calls)
        runs.append(sat.as_dict() | {"method": method, "load": "saturation"})
        for share in shares:
            progress(f"unary: {method} at {share:.0%} of its saturation")
            r = unary.h2load(target, path, request, name, rate=sat.calls_per_s * share, seconds=seconds)
            runs.append(r.as_dict() | {"method": method, "load": share})

    loads = (0.25, 0.5, 0.75)
    with load.Server("echo") as echo:
        sweep(echo.target, "/Echo/Call", report, "Echo", loads, int(8000 * seconds))
    with load.Server("echo-handoff") as echo:
        sweep(echo.target, "/Echo/Call", report, "Echo handoff", (0.5,), int(8000 * seconds))
    with load.Server("echo-durable") as echo:
        sweep(echo.target, "/Echo/Call", report, "Echo durable", (0.5,), int(8000 * seconds))
    with load.Server("meterd") as server:
        for method, request in (("Report", report), ("Authorize", authorize)):
            _check_allowed(server.target, method, request)
            before = _usage(server.target)
            sweep(server.target, f"/meterd.v1.Meter/{method}", request, method, loads, int(4000 * seconds))
            if method == "Report":  # h2load sees HTTP, not gRPC statuses: count what meterd applied
                ok = sum(r["extra"]["ok_calls"] for r in runs if r["method"] == "Report")
                applied = _usage(server.target) - before
                if applied != ok:
                    raise RuntimeError(f"h2load counted {ok} Report calls but meterd applied {applied}")
                progress(f"unary: meterd applied exactly the {applied:,} Report calls h2load counted")
    with load.Server("meterd", fsync=False) as server:
        sweep(server.target, "/meterd.v1.Meter/Authorize", authorize, "Authorize (no fsync)", (0.5,),
              int(4000 * seconds))
    return runs


def _check_allowed(target: str, method: str, request: bytes) -> None:
    """The request a run repeats is valid and allowed (h2load cannot tell a gRPC error from a success)."""
    import grpc
    with grpc.insecure_channel(target) as ch:
        answer = ch.unary_unary(f"/meterd.v1.Meter/{method}", request_serializer=None,
                                response_deserializer=None)(request, timeout=10)
    cls = pb.ReportResponse if method == "Report" else pb.AuthorizeResponse
    if cls.FromString(answer).decision != pb.DECISION_ALLOW:
        raise RuntimeError(f"the {method} request of the benchmark is not allowed")


def _usage(target: str) -> int:
    """Events of 1,000 input tokens customer c1 has reported this period."""
    import grpc

    from meterd.v1 import meter_pb2_grpc
    with grpc.insecure_channel(target) as ch:
        r = meter_pb2_grpc.MeterStub(ch).GetBalance(pb.GetBalanceRequest(customer_id="c1"), timeout=10)
    return next((int(u.quantity) for u in r.usage if u.meter == "input_tokens"), 0) // 1000


def capacity(customers: int, progress: Callable[[str], None]) -> dict:
    try:
        from benchmarks import capacity as cap
    except ImportError as e:
        return {"skipped": f"benchmarks.capacity is not available: {e}"}
    return {"memory": cap.memory_per_customer(customers, progress=progress),
            "restart": cap.restart_ready_seconds(customers, progress=progress)}


def remembered_keys(keys: int, progress: Callable[[str], None]) -> dict:
    from benchmarks import keys as k
    return k.remembered_keys(keys, progress)


def baselines(seconds: float, progress: Callable[[str], None]) -> list[dict]:
    from dataclasses import asdict

    from benchmarks import baselines as base
    out = []
    for fn in (base.redis_baselines, base.postgres_baseline, base.lmdb_baseline,
               lambda seconds, progress: base.lmdb_commit_latency(progress=progress)):
        try:
            out += [asdict(r) for r in fn(seconds, progress=progress)]
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not faked
            out.append({"name": getattr(fn, "__name__", "baseline"), "value": None, "unit": "",
                        "skipped": f"{type(e).__name__}: {e}"})
    return out


def _find(rows: list[dict], **match: Any) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def targets(res: dict) -> list[dict]:
    """The issue's targets, each as measured in this run."""
    out = []

    def add(name: str, value: float | None, goal: str, met: bool | None, how: str) -> None:
        out.append({"target": name, "value": value, "goal": goal, "met": met, "how": how})

    micro_rows = res.get("micro", [])
    c = _find(micro_rows, name="apply_batch 100k events, 10k customers", core="compiled")
    p = _find(micro_rows, name="apply_batch 100k events, 10k customers", core="python")
    if c and p:
        ratio = p["seconds"] / c["seconds"]
        add("compiled core vs pure Python", round(ratio, 1), ">= 30x", ratio >= 30, "apply_batch, 100k events")
    ing = res.get("ingest", [])
    best_durable = max((r["events_per_s"] for r in ing if r.get("fsync") and r.get("method") == "ReportBatch"),
                       default=None)
    incr = _find(res.get("baselines", []), name="redis-benchmark INCR -P 64")
    if best_durable is not None:
        add("ReportBatch durable events/s", round(best_durable), ">= 1,000,000", best_durable >= 1e6,
            "best batch size, fsync on, load generator on the same machine")
        if incr and incr.get("value"):
            ratio = best_durable / incr["value"]
            add("ReportBatch durable vs redis-benchmark INCR -P 64", round(ratio, 2), ">= 1.0", ratio >= 1,
                "same run")
        for size in (100, 1000, 8000):
            on = _find(ing, method="ReportBatch", batch=size, fsync=True)
            off = _find(ing, method="ReportBatch", batch=size, fsync=False)
            if on and off:
                ratio = on["events_per_s"] / off["events_per_s"]
                add(f"durable vs non-durable, ReportBatch x{size}", round(ratio, 2), ">= 0.7", ratio >= 0.7,
                    "same server build, fsync on / off")
    un = res.get("unary", [])
    echo = _find(un, method="Echo", load="saturation")
    rep = _find(un, method="Report", load="saturation")
    if echo and rep:
        ratio = rep["calls_per_s"] / echo["calls_per_s"]
        add("unary Report vs bare echo", round(ratio, 2), ">= 0.8", ratio >= 0.8, "h2load, saturation")
        handoff = _find(un, method="Echo handoff", load="saturation")
        durable = _find(un, method="Echo durable", load="saturation")
        if handoff:
            add("  for scale: echo answered after a thread handoff, vs bare echo",
                round(handoff["calls_per_s"] / echo["calls_per_s"], 2), "(ceiling)", None,
                "the ceiling of any answer that waits for another thread, as a durable one must")
        if durable:
            add("  for scale: echo answered after an LMDB group commit, vs bare echo",
                round(durable["calls_per_s"] / echo["calls_per_s"], 2), "(ceiling)", None,
                "the ceiling of a durable answer on this stack")
            add("  unary Report vs that durable echo", round(rep["calls_per_s"] / durable["calls_per_s"], 2), "",
                None, "meterd's own share")
    for method in ("Echo", "Echo handoff", "Echo durable"):
        half = _find(un, method=method, load=0.5)
        if half and half.get("p99_ms") is not None:
            add(f"  for scale: {method.lower()} p99 at half of its saturation (ms)", half["p99_ms"], "", None,
                "the same schedule as Authorize's")
    for method in ("Authorize", "Authorize (no fsync)"):
        half = _find(un, method=method, load=0.5)
        if half and half.get("p99_ms") is not None:
            add(f"{method} p99 at half of saturation (ms)", half["p99_ms"], "<= 1 ms", half["p99_ms"] <= 1.0,
                "h2load timing script, open loop")
    floor = _find(res.get("baselines", []), name="LMDB durable commit of one put, p99 (the floor of a durable answer)")
    if floor and floor.get("value") is not None:
        add("LMDB durable commit p99 on this machine (ms), for scale", floor["value"], "(floor)", None,
            "one put, fsync on: no durable answer is faster")
    cap = res.get("capacity", {})
    if "memory" in cap:
        b = cap["memory"].get("bytes_per_customer_active_with_aggregates")
        add("core bytes per active customer (1M)", None if b is None else round(b, 1), "<= 200",
            b is not None and b <= 200, "RSS delta, usage aggregates pending")
    if "restart" in cap:
        s = cap["restart"].get("ready_median_s")
        add("ready after restart with 1M customers (s)", None if s is None else round(s, 3), "<= 2 s",
            s is not None and s <= 2.0, "exec to health SERVING, median of 3")
    keys = res.get("keys", {})
    if "anon_bytes_per_key" in keys:
        b = keys["anon_bytes_per_key"]
        add(f"private memory per remembered idempotency key ({keys['keys']:,} keys)", round(b, 1), "<= 128 B",
            b <= 128, "RssAnon delta; the map's pages are page cache: "
            f"{keys['file_bytes_per_key']:.0f} B/key resident after all were written, "
            f"{keys['disk_bytes_per_key']:.0f} B/key on disk")
    return out


def table(res: dict) -> str:
    lines = ["", "== end to end =="]
    for r in res.get("ingest", []) + res.get("unary", []):
        if r.get("skipped"):
            lines.append(f"  {r['name']}: skipped ({r['skipped']})")
            continue
        load_text = r.get("load", "")
        load_text = f"{load_text:.0%} load" if isinstance(load_text, float) else load_text
        lat = "" if r.get("p50_ms") is None else f"  p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} " \
                                                f"p99.9 {r['p999_ms']:.2f} ms"
        lines.append(f"  {r['name']:<40} {load_text:>12} {r['calls_per_s']:>11,.0f} calls/s "
                     f"{r['events_per_s']:>12,.0f} events/s{lat}")
    lines.append("== micro ==")
    for r in res.get("micro", []):
        lines.append(f"  {r['name']:<42} {r['core']:<32} {r['events_per_s']:>14,.0f}/s")
    lines.append("== baselines ==")
    for r in res.get("baselines", []):
        v = r.get("value")
        number = "" if v is None else (f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3f}")
        value = "skipped: " + r["skipped"] if r.get("skipped") else f"{number} {r['unit']}"
        lines.append(f"  {r['name']:<60} {value}")
    lines.append("== targets ==")
    for t in res.get("targets", []):
        mark = {True: "met", False: "MISSED", None: "?"}[t["met"]]
        lines.append(f"  {t['target']:<52} {t['value']!s:>12}  goal {t['goal']:<14} {mark:<7} ({t['how']})")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> str:
    """Throughput and latency against offered load; empty, or why there is no plot."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install '.[bench]')"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for method, color in (("Echo", "grey"), ("Report", "tab:blue"), ("Authorize", "tab:orange")):
        rows = [r for r in res.get("unary", []) if r.get("method") == method and isinstance(r.get("load"), float)]
        if not rows:
            continue
        x = [r["offered"] for r in rows]
        left.plot(x, [r["calls_per_s"] for r in rows], "o-", color=color, label=method)
        right.plot(x, [r["p99_ms"] for r in rows], "o-", color=color, label=f"{method} p99")
        right.plot(x, [r["p50_ms"] for r in rows], "x--", color=color, label=f"{method} p50")
    left.set_xlabel("offered calls/s")
    left.set_ylabel("achieved calls/s")
    left.set_title("unary throughput")
    left.legend()
    right.set_xlabel("offered calls/s")
    right.set_ylabel("latency (ms)")
    right.set_yscale("log")
    right.set_title("unary latency")
    right.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each end-to-end run (default 5)")
    parser.add_argument("--customers", type=int, default=1_000_000, help="customers for the capacity section")
    parser.add_argument("--keys", type=int, default=10_000_000, help="remembered idempotency keys for the keys section")
    parser.add_argument("--skip", default="",
                        help="sections to skip: micro,ingest,unary,baselines,capacity,keys")
    parser.add_argument("--json", type=Path, default=RESULTS / "latest.json", help="where to write the results")
    parser.add_argument("--plot", type=Path, default=RESULTS / "unary.png", help="where to draw the plot")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    progress = Progress()
    res: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("micro", lambda: micro.run(progress)),
        ("ingest", lambda: ingest(args.seconds, progress)),
        ("unary", lambda: unary_calls(args.seconds, progress)),
        ("baselines", lambda: baselines(args.seconds, progress)),
        ("capacity", lambda: capacity(args.customers, progress)),
        ("keys", lambda: remembered_keys(args.keys, progress)),
    ]
    for name, section in sections:
        if name in skip:
            continue
        progress(f"section {name}")
        res[name] = section()
    res["targets"] = targets(res)
    res["seconds_total"] = round(time.monotonic() - progress.start, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    why = plot(res, args.plot) if "unary" in res else "no unary section"
    print(table(res))
    print(f"\nresults: {args.json}" + (f"; plot: {args.plot}" if not why else f"; no plot: {why}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
