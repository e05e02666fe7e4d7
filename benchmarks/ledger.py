"""Ledger mode (balances shared by many sidecars through escrow leases), measured.

- **Hot path:** the same load on a sidecar in ledger mode and one in local mode,
  as interleaved trials (local, ledger, local, ledger, ...): durable
  ``ReportBatch`` of 1,000 events and unary ``Report`` at saturation. The
  verdict is the ratio of the medians, with the range of the per-pair ratios.
- **Pinned:** the same comparison with each sidecar on CPU 0 and the load
  generators and PostgreSQL on CPU 1 (``taskset``), so that the ledger-mode
  sidecar does not share its CPU with the ledger's server: what is left is
  the cost of ledger mode itself.
- **Ledger load:** lease transactions per second that one PostgreSQL on this
  machine takes, from many simulated sidecars (each a real ``LedgerLink``, its
  own thread and connection, running the real ``Escrow`` calls), and their
  latency.
- **Steady state:** one ledger-mode sidecar under a steady load over many
  customers, with a short refill horizon so that a window spans several: the
  lease calls it makes per customer per refill horizon, once its leases are
  sized by the rates (the goal: about one).
- **With plans:** ``hot_path_plans`` and ``pinned_plans``, the same with every customer on a plan
  in both modes; ``roll_storm``, a ledger-mode sidecar's hot path while another process rolls
  thousands of other customers' periods on the same PostgreSQL, against the same with no rolls.
- **The contested path:** four sidecar daemons, one customer whose balance covers
  exactly K events, clients on all four until it runs out: exactly K allowed,
  how long the requests that waited for a top-up or a recall waited (from the
  daemons' own histograms), and how many denials were false (credit left at
  another sidecar).

Run alone: ``python -m benchmarks.ledger [--seconds 3] [--trials 5]``; the
suite runs it as its ``ledger`` section.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import grpc

from benchmarks import load, unary
from meterd.config import Settings
from meterd.escrow import Escrow
from meterd.flush import LedgerLink
from meterd.ledger import Ledger
from meterd.v1 import meter_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
NANO = 10**9
BIG_NANO = 10**9 * NANO  # $1e9 each: no event is denied in the hot-path runs
# The hot-path comparisons: a ledger-mode sidecar keeps its leases through the other mode's trials
# (they would be given back after 30 s idle, and sized again from nothing); what a customer coming
# back after a pause costs is the warm-up, measured on its own.
HOT_PATH_IDLE_S = "600"


class Postgres:
    """A PostgreSQL server of the benchmark's own (scripts/postgres-test-server), or METERD_BENCH_POSTGRES_URL."""

    def __init__(self) -> None:
        self.url = os.environ.get("METERD_BENCH_POSTGRES_URL", "")
        self.dir = ""

    def __enter__(self) -> "Postgres":
        if not self.url:
            self.dir = tempfile.mkdtemp(prefix="meterd-bench-pg-", dir="/tmp")
            env = dict(os.environ, POSTGRES_TEST_PORT=str(load.free_port()))
            r = subprocess.run([str(ROOT / "scripts" / "postgres-test-server"), "start", self.dir], env=env,
                               capture_output=True, text=True, timeout=600)
            if r.returncode != 0:
                raise RuntimeError(f"postgres-test-server: {r.stderr[-500:]}")
            self.url = r.stdout.strip().splitlines()[-1]
        return self

    def database(self, name: str) -> str:
        import psycopg
        from psycopg import sql
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        from urllib.parse import urlsplit, urlunsplit
        url = urlunsplit(urlsplit(self.url)._replace(path="/" + name))
        with Ledger(url) as lg:
            lg.migrate()
        return url

    def __exit__(self, *exc: Any) -> None:
        if self.dir:
            subprocess.run([str(ROOT / "scripts" / "postgres-test-server"), "stop", self.dir], capture_output=True,
                           timeout=120)


def _grant_all(url: str, customers: int, amount: int) -> float:
    """Every bench customer's balance in the ledger, as the operator grants it; returns the seconds it took."""
    started = time.monotonic()
    with Ledger(url) as lg:
        e = Escrow(lg)
        for i in range(customers):
            e.grant(f"c{i}", "usd", amount, 0, 0, "bench", "", int(time.time() * 1000))
    return time.monotonic() - started


def _metrics(port: int) -> dict[str, float]:
    """A daemon's Prometheus metrics, name{labels} -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _denied(port: int) -> float:
    return sum(v for k, v in _metrics(port).items() if k.startswith("meterd_decisions_total") and 'deny"' in k)


def _spread(ledger: list[float], local: list[float]) -> dict:
    pairs = [a / b for a, b in zip(ledger, local, strict=True) if b]
    return {"ledger": ledger, "local": local, "ratio_of_medians": round(statistics.median(ledger) /
                                                                         statistics.median(local), 3),
            "pair_ratios_min": round(min(pairs), 3), "pair_ratios_max": round(max(pairs), 3)}


def _subscribe_all(url: str, customers: int) -> float:
    """Every bench customer subscribed to the bench plan in the ledger; returns the seconds it took."""
    from meterd.catalog import load_catalog
    from meterd.ledger_plans import LedgerPlans
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "catalog.toml"
        load.bench_catalog(path, 0, plan=True)
        catalog = load_catalog(str(path))
    with Ledger(url) as lg:
        plans = LedgerPlans(Escrow(lg), catalog)
        for i in range(customers):
            now = int(time.time() * 1000)
            plans.subscribe(f"c{i}", "bench", now, now)
    return time.monotonic() - started


def hot_path(pg: Postgres, seconds: float, trials: int, progress: Callable[[str], None],
             customers: int = 1_000, plans: bool = False) -> dict:
    """Ledger mode against local mode, interleaved, on the same load: batches over ``customers``
    customers (each sidecar's active customers; the whole suite's ingest uses 10,000). With
    ``plans``: every customer on the bench plan in both modes (its included credits, and its
    overage allowance, leased as a plan's buckets in ledger mode)."""
    load.CUSTOMERS = customers  # the client processes (forked) draw their batches' customers from it
    url = pg.database("meterd_bench_plans" if plans else "meterd_bench_hot")
    progress(f"ledger: {'subscribing' if plans else 'granting'} {customers} customers centrally")
    granted_s = _subscribe_all(url, customers) if plans else _grant_all(url, customers, BIG_NANO)
    ports = {"local": load.free_port(), "ledger": load.free_port()}
    envs = {"local": {"METERD_METRICS_LISTEN": f"127.0.0.1:{ports['local']}"},
            "ledger": {"METERD_METRICS_LISTEN": f"127.0.0.1:{ports['ledger']}", "METERD_BALANCES": "ledger",
                       "METERD_LEASE_IDLE_S": HOT_PATH_IDLE_S,
                       "METERD_LEDGER": url}}
    batch: dict[str, list[float]] = {"local": [], "ledger": []}
    report: dict[str, list[float]] = {"local": [], "ledger": []}
    h2 = not unary.available()
    request = load.report_request()
    with load.Server("meterd", env=envs["local"], customers=customers, plan=plans) as local, \
            load.Server("meterd", env=envs["ledger"], customers=customers, seeded=False, plan=plans) as ledger:
        servers = {"local": local, "ledger": ledger}
        progress("ledger: warming up the local sidecar")
        load.drive(local.target, "ReportBatch", processes=2, seconds=seconds, inflight=16, batch=1000)
        # Ledger mode: until a warm-up run has no denial (every customer's lease sized by its rate).
        warm_up_s = time.monotonic()
        for _ in range(30):
            before = _denied(ports["ledger"])
            progress("ledger: warming up the ledger-mode sidecar (its first leases)")
            load.drive(ledger.target, "ReportBatch", processes=2, seconds=seconds, inflight=16, batch=1000)
            if _denied(ports["ledger"]) == before:
                break
        warm_up_s = time.monotonic() - warm_up_s
        denied_before = {name: _denied(ports[name]) for name in servers}
        for t in range(trials):
            for name, server in servers.items():
                progress(f"ledger: trial {t + 1}/{trials}, {name} mode")
                run = load.drive(server.target, "ReportBatch", processes=2, seconds=seconds, inflight=16, batch=1000)
                batch[name].append(round(run.events_per_s))
                if h2:
                    u = unary.h2load(server.target, "/meterd.v1.Meter/Report", request, f"Report {name}",
                                     calls=int(20_000 * seconds))
                    report[name].append(round(u.calls_per_s))
        denied = {name: _denied(ports[name]) - denied_before[name] for name in servers}
        leases = _metrics(ports["ledger"])
    out = {"customers": customers, "granted_centrally_s": round(granted_s, 1), "warm_up_s": round(warm_up_s, 1),
           "trials": trials,
           "seconds": seconds, "denied_during_trials": denied,
           "report_batch_x1000_events_per_s": _spread(batch["ledger"], batch["local"]),
           "lease_acquisitions": leases.get("meterd_lease_acquisitions_total", 0),
           "lease_sync_waits": leases.get("meterd_lease_sync_waits_total", 0)}
    if h2:
        out["unary_report_calls_per_s"] = _spread(report["ledger"], report["local"])
    return out


def _pin(pid: int, cpu: int) -> None:
    subprocess.run(["taskset", "-a", "-cp", str(cpu), str(pid)], check=True, capture_output=True)


def pinned(pg: Postgres, trials: int, progress: Callable[[str], None], customers: int = 1_000,
           calls: int = 60_000, plans: bool = False) -> dict:
    """Unary Report and durable ReportBatch in ledger mode against local mode, interleaved, each
    sidecar pinned to CPU 0, the load generators (this process's children) and PostgreSQL's
    processes to CPU 1. With ``plans``: every customer on the bench plan in both modes."""
    if (os.cpu_count() or 1) < 2 or unary.available() or not shutil.which("taskset"):
        return {"skipped": "needs 2 CPUs, taskset and h2load"}
    load.CUSTOMERS = customers
    url = pg.database("meterd_bench_pinned_plans" if plans else "meterd_bench_pinned")
    if plans:
        _subscribe_all(url, customers)
    else:
        _grant_all(url, customers, BIG_NANO)
    request = load.report_request()
    calls_per_s: dict[str, list[float]] = {"local": [], "ledger": []}
    events_per_s: dict[str, list[float]] = {"local": [], "ledger": []}
    mask = os.sched_getaffinity(0)
    try:
        with load.Server("meterd", customers=customers, plan=plans) as local, \
                load.Server("meterd", env={"METERD_BALANCES": "ledger", "METERD_LEDGER": url,
                                           "METERD_LEASE_IDLE_S": HOT_PATH_IDLE_S}, customers=customers,
                            seeded=False, plan=plans) as ledger:
            servers = {"local": local, "ledger": ledger}
            os.sched_setaffinity(0, {1})
            for server in servers.values():
                assert server.proc is not None
                _pin(server.proc.pid, 0)
            pids = subprocess.run(["pgrep", "-x", "postgres"], capture_output=True, text=True).stdout.split()
            for pid in pids:
                subprocess.run(["taskset", "-a", "-cp", "1", pid], capture_output=True)  # a process may be gone
            for name, server in servers.items():  # the leases, and the code paths, warmed up
                progress(f"ledger: pinned, warming up the {name}-mode sidecar")
                for _ in range(3):
                    load.drive(server.target, "ReportBatch", processes=1, seconds=3, inflight=16, batch=1000)
                unary.h2load(server.target, "/meterd.v1.Meter/Report", request, f"warm-up {name}", calls=calls // 2)
            for t in range(trials):
                for name, server in servers.items():
                    progress(f"ledger: pinned, trial {t + 1}/{trials}, {name} mode")
                    run = unary.h2load(server.target, "/meterd.v1.Meter/Report", request, f"Report {name}",
                                       calls=calls)
                    calls_per_s[name].append(round(run.calls_per_s))
                    batch = load.drive(server.target, "ReportBatch", processes=1, seconds=3, inflight=16, batch=1000)
                    events_per_s[name].append(round(batch.events_per_s))
    finally:
        os.sched_setaffinity(0, mask)
    return {"pinned": {"sidecars": [0], "h2load_and_postgresql": [1], "postgresql_processes": len(pids)},
            "trials": trials, "unary_report_calls_per_s": _spread(calls_per_s["ledger"], calls_per_s["local"]),
            "report_batch_x1000_events_per_s": _spread(events_per_s["ledger"], events_per_s["local"])}


def ledger_load(pg: Postgres, sidecars: int, customers: int, seconds: float,
                progress: Callable[[str], None]) -> dict:
    """Lease transactions per second on one PostgreSQL: ``sidecars`` simulated sidecars, each its own
    LedgerLink (thread and connection), each taking and giving back leases of random customers."""
    url = pg.database("meterd_bench_load")
    progress(f"ledger: load of {sidecars} simulated sidecars on {customers} customers")
    _grant_all(url, customers, BIG_NANO)
    settings = Settings(ledger=url, balances="ledger", ledger_timeout_s=30)
    latencies: list[float] = []

    async def sidecar(k: int, stop: float) -> int:
        import random
        rng = random.Random(k)
        link = LedgerLink(settings, f"bench-lease-{k}")
        done, given = 0, {}
        await link.call(lambda lg: Escrow(lg).heartbeat(f"b{k}", "i", int(time.time() * 1000), False, 60_000))
        while time.monotonic() < stop:
            cust = f"c{rng.randrange(customers)}"
            t0 = time.monotonic()
            if rng.random() < 0.5 or cust not in given:
                g = await link.call(lambda lg, c=cust: Escrow(lg).acquire(f"b{k}", "i", c, "usd", 10**6, 10**8,
                                                                           sidecars, int(time.time() * 1000)))
                given.setdefault(cust, [0, 0])[0] = g.leased_total_nano
            else:
                total = given[cust]
                total[1] += (total[0] - total[1]) // 2
                await link.call(lambda lg, c=cust, back=total[1]: Escrow(lg).give_back(
                    f"b{k}", "i", c, "usd", back, int(time.time() * 1000)))
            latencies.append((time.monotonic() - t0) * 1000)
            done += 1
        link.close()
        return done

    async def run() -> list[int]:
        stop = time.monotonic() + seconds
        return await asyncio.gather(*(sidecar(k, stop) for k in range(sidecars)))
    started = time.monotonic()
    counts = asyncio.run(run())
    elapsed = time.monotonic() - started
    with Ledger(url) as lg:
        problems = Escrow(lg).check()
    lat = sorted(latencies)
    return {"sidecars": sidecars, "customers": customers, "transactions_per_s": round(sum(counts) / elapsed),
            "p50_ms": round(lat[len(lat) // 2], 2), "p99_ms": round(lat[int(len(lat) * 0.99)], 2),
            "conservation_problems": len(problems)}


def steady(pg: Postgres, progress: Callable[[str], None], customers: int = 200, horizon_s: float = 5.0,
           window_s: float = 20.0) -> dict:
    """Lease calls per (customer, sidecar) per refill horizon at a steady load, after a warm-up
    of two horizons; counted from the daemon's metrics over ``window_s``."""
    load.CUSTOMERS = customers
    url = pg.database("meterd_bench_steady")
    _grant_all(url, customers, BIG_NANO)
    port = load.free_port()
    env = {"METERD_METRICS_LISTEN": f"127.0.0.1:{port}", "METERD_BALANCES": "ledger", "METERD_LEDGER": url,
           "METERD_LEASE_REFILL_HORIZON_S": str(horizon_s), "METERD_LEASE_LOW_WATER_S": str(horizon_s / 5)}
    names = ("acquisitions", "refills", "sync_waits")
    with load.Server("meterd", env=env, customers=customers, seeded=False) as server:
        progress(f"ledger: steady state, {customers} customers, warming up for {2 * horizon_s:.0f} s")
        load.drive(server.target, "ReportBatch", processes=2, seconds=2 * horizon_s, inflight=4, batch=1000)
        before = _metrics(port)
        progress(f"ledger: steady state, a window of {window_s:.0f} s")
        run = load.drive(server.target, "ReportBatch", processes=2, seconds=window_s, inflight=4, batch=1000)
        after = _metrics(port)
    counts = {n: after.get(f"meterd_lease_{n}_total", 0) - before.get(f"meterd_lease_{n}_total", 0) for n in names}
    horizons = window_s / horizon_s
    return {"customers": customers, "refill_horizon_s": horizon_s, "window_s": window_s,
            "events_per_s": round(run.events_per_s), "lease_calls_in_window": counts,
            "lease_calls_per_customer_per_horizon": round(counts["acquisitions"] / customers / horizons, 3),
            "sync_waits_per_customer_per_horizon": round(counts["sync_waits"] / customers / horizons, 3)}


def contested(pg: Postgres, progress: Callable[[str], None], k: int = 2_000) -> dict:
    """Four busy sidecars on one customer whose balance covers exactly k events, until it runs out."""
    url = pg.database("meterd_bench_contested")
    cost = 2_500_000  # 1,000 gpt-4o input tokens in the demo catalog, nano-USD
    progress(f"ledger: the contested path, 4 sidecars and a balance of {k} events")
    with Ledger(url) as lg:
        Escrow(lg).grant("shared", "usd", k * cost, 0, 0, "bench", "", int(time.time() * 1000))
    ports = [load.free_port() for _ in range(4)]
    servers = [load.Server("meterd", env={"METERD_BALANCES": "ledger", "METERD_LEDGER": url,
                                          "METERD_METRICS_LISTEN": f"127.0.0.1:{p}"}, customers=0)
               for p in ports]
    event = pb.UsageEvent(customer_id="shared", meter="input_tokens", quantity=1000, dimensions={"model": "gpt-4o"})
    request = pb.ReportRequest(event=event)
    allowed = [0] * 16
    started = time.monotonic()
    try:
        for s in servers:
            s.__enter__()

        def client(i: int) -> None:
            with grpc.insecure_channel(servers[i % 4].target) as ch:
                call = ch.unary_unary("/meterd.v1.Meter/Report", request_serializer=pb.ReportRequest.SerializeToString,
                                      response_deserializer=pb.ReportResponse.FromString)
                denials = 0
                while denials < 20:
                    ok = call(request, timeout=30).decision == pb.DECISION_ALLOW
                    allowed[i] += ok
                    denials = 0 if ok else denials + 1
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        m = [_metrics(p) for p in ports]
    finally:
        for s in servers:
            s.__exit__(None, None, None)
    buckets: dict[float, float] = {}
    for metrics in m:
        for key, v in metrics.items():
            if key.startswith("meterd_lease_sync_wait_seconds_bucket"):
                le = key.split('le="')[1].split('"')[0]
                bound = float("inf") if le == "+Inf" else float(le)
                buckets[bound] = buckets.get(bound, 0) + v
    waits = buckets.get(float("inf"), 0)
    p99 = next((b for b in sorted(buckets) if buckets[b] >= 0.99 * waits), None) if waits else None
    p50 = next((b for b in sorted(buckets) if buckets[b] >= 0.5 * waits), None) if waits else None
    false = sum(x.get("meterd_lease_false_denies_total", 0) for x in m)
    denied = sum(v for x in m for key, v in x.items() if key.startswith("meterd_decisions_total") and 'deny"' in key)
    return {"balance_events": k, "allowed": sum(allowed), "exact": sum(allowed) == k, "seconds": round(elapsed, 1),
            "sync_waits": waits, "sync_wait_p50_ms_at_most": None if p50 is None else p50 * 1000,
            "sync_wait_p99_ms_at_most": None if p99 is None else p99 * 1000,
            "recalls_asked": sum(x.get("meterd_lease_recalls_asked_total", 0) for x in m),
            "false_denies": false, "denied": denied,
            "false_deny_rate": round(false / denied, 4) if denied else 0.0}


# A sweep of period rolls in a process of its own (as other sidecars' heartbeats run them), on
# the rolls benchmark's plan and customers: it rolls due customers until told to stop on stdin.
ROLLER = """
import sys, threading
from benchmarks import rolls
from meterd.catalog import load_catalog
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import LedgerPlans
url, catalog, now = sys.argv[1], sys.argv[2], int(sys.argv[3])
stop, done = threading.Event(), [0]
def sweep():
    with Ledger(url) as lg:
        plans = LedgerPlans(Escrow(lg), load_catalog(catalog))
        while not stop.is_set() and (n := plans.roll_due(now, 20)):
            done[0] += n
threads = [threading.Thread(target=sweep) for _ in range(2)]
for t in threads:
    t.start()
print("started", flush=True)
sys.stdin.readline()
stop.set()
for t in threads:
    t.join()
print(done[0], flush=True)
"""


def roll_storm(pg: Postgres, seconds: float, trials: int, progress: Callable[[str], None],
               customers: int = 1_000, due: int = 20_000) -> dict:
    """The hot path of a ledger-mode sidecar (every customer on a plan) while a sweep of period
    rolls runs on the same PostgreSQL (``due`` other customers whose boundary has passed, rolled by
    two callers in another process), against the same load with no rolls, interleaved."""
    from benchmarks import rolls
    from meterd.catalog import load_catalog
    from meterd.ledger_plans import LedgerPlans
    load.CUSTOMERS = customers
    url = pg.database("meterd_bench_roll_storm")
    progress(f"ledger: roll storm, subscribing {customers} hot customers and {due} due ones")
    _subscribe_all(url, customers)
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Path(tmp) / "rolls.toml"
        catalog.write_text(rolls.CATALOG)
        rolls.url, rolls.catalog = url, load_catalog(str(catalog))
        # Subscribed a day ago, so that their boundary is a month ahead by the sidecar's clock: the
        # roller alone rolls them (at a time past it), not the sidecar's own heartbeat.
        rolls.START_MS = int(time.time() * 1000) - 86_400_000
        rolls._parallel(2, [f"r{i:07d}" for i in range(due)], rolls._subscribe)
        boundary = LedgerPlans(Escrow(Ledger(url)), rolls.catalog).subscription("r0000000").end_ms
        now = boundary + 60_000  # past the grace: due without waiting for sidecars
        port = load.free_port()
        env = {"METERD_BALANCES": "ledger", "METERD_LEDGER": url, "METERD_LEASE_IDLE_S": HOT_PATH_IDLE_S,
               "METERD_METRICS_LISTEN": f"127.0.0.1:{port}"}

        def _denied_of(_: Any) -> float:
            return _denied(port)
        request = load.report_request()
        h2 = not unary.available()
        batch: dict[str, list[float]] = {"quiet": [], "rolling": []}
        report: dict[str, list[float]] = {"quiet": [], "rolling": []}
        rolled: list[int] = []
        with load.Server("meterd", env=env, customers=customers, seeded=False, plan=True) as server:
            for _ in range(30):  # until a run has no denial: every lease sized by its customer's rate
                progress("ledger: roll storm, warming up")
                before = _denied_of(server)
                load.drive(server.target, "ReportBatch", processes=2, seconds=seconds, inflight=16, batch=1000)
                if _denied_of(server) == before:
                    break
            for t in range(trials):
                for cond in ("quiet", "rolling"):
                    progress(f"ledger: roll storm, trial {t + 1}/{trials}, {cond}")
                    roller = subprocess.Popen([sys.executable, "-c", ROLLER, url, str(catalog), str(now)], cwd=ROOT,
                                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) \
                        if cond == "rolling" else None
                    if roller is not None:
                        assert roller.stdout is not None and roller.stdin is not None
                        roller.stdout.readline()  # its connections are open and sweeping
                    run = load.drive(server.target, "ReportBatch", processes=2, seconds=seconds, inflight=16,
                                     batch=1000)
                    batch[cond].append(round(run.events_per_s))
                    if h2:
                        u = unary.h2load(server.target, "/meterd.v1.Meter/Report", request, f"Report {cond}",
                                         calls=int(20_000 * seconds))
                        report[cond].append(round(u.calls_per_s))
                    if roller is not None:
                        out, _ = roller.communicate("stop\n", timeout=600)
                        rolled.append(int(out.strip().splitlines()[-1]))
        with Ledger(url) as lg:
            problems = Escrow(lg).check()
            (rolls_done,), = lg._rows("SELECT COUNT(*) FROM meterd_rolls")
    def spread(rolling: list[float], quiet: list[float]) -> dict:
        s = _spread(rolling, quiet)  # ratios: while rolling / quiet
        s["rolling"], s["quiet"] = s.pop("ledger"), s.pop("local")
        return s
    out = {"hot_customers": customers, "due_customers": due, "trials": trials, "seconds": seconds,
           "rolled_per_trial": rolled, "rolls_in_ledger": int(rolls_done), "check": problems,
           "report_batch_x1000_events_per_s": spread(batch["rolling"], batch["quiet"])}
    if h2:
        out["unary_report_calls_per_s"] = spread(report["rolling"], report["quiet"])
    return out


def run(seconds: float, trials: int, progress: Callable[[str], None], only: str = "") -> dict:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return {"skipped": "psycopg is not installed: pip install '.[postgresql]'"}
    parts: dict[str, Callable[[Postgres], dict]] = {
        "hot_path": lambda pg: hot_path(pg, seconds, trials, progress),
        "hot_path_plans": lambda pg: hot_path(pg, seconds, trials, progress, plans=True),
        "pinned": lambda pg: pinned(pg, max(trials, 7), progress),
        "pinned_plans": lambda pg: pinned(pg, max(trials, 7), progress, plans=True),
        "roll_storm": lambda pg: roll_storm(pg, seconds, trials, progress),
        "ledger_load": lambda pg: ledger_load(pg, 32, 10_000, seconds, progress),
        "steady": lambda pg: steady(pg, progress),
        "contested": lambda pg: contested(pg, progress)}
    with Postgres() as pg:
        return {name: part(pg) for name, part in parts.items() if not only or name == only}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--only", choices=("hot_path", "hot_path_plans", "pinned", "pinned_plans", "roll_storm",
                                           "ledger_load", "steady", "contested"),
                        help="one part")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "ledger.json")
    args = parser.parse_args(argv)
    start = time.monotonic()
    res = run(args.seconds, args.trials, lambda m: print(f"[{time.monotonic() - start:6.1f}s] {m}",
                                                          file=sys.stderr, flush=True), args.only or "")
    res["machine"] = {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg()[0]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
