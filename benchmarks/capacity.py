"""Capacity targets of issue #5: memory per active customer and restart time, with 1M customers.

    python -m benchmarks.capacity [customers]

``memory_per_customer`` measures the compiled core's resident memory in a fresh
subprocess (so that RSS holds nothing else), and sets it beside the core's own
accounting of its tables. ``restart_ready_seconds`` builds a data directory as
a daemon would have left it, then times ``meterd serve`` from exec until its
health check answers SERVING.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

from meterd._fastpath_py import _put_varint as _varint

Progress = Callable[[str], Any]

# The per-account tables of the compiled core (src/meterd/_fastpath.pyx, Core._grow),
# in bytes per account slot: (name, bytes per credit type, per meter, fixed).
ACCOUNT_COLUMNS = [
    ("bal (int64 per credit type)", 8, 0, 0),
    ("rem (int64 per credit type)", 8, 0, 0),
    ("usage (int64 per meter)", 0, 8, 0),
    ("hashes (uint32)", 0, 0, 4),
    ("id_off (uint64)", 0, 0, 8),
    ("id_len (uint8)", 0, 0, 1),
    ("dirty (uint8)", 0, 0, 1),
    ("plan_of (uint16)", 0, 0, 2),
    ("ext (int32: the account's Ext rows, or none)", 0, 0, 4),
    ("nsets, nsets_win (int32, int64: dimension sets made in a window)", 0, 0, 12),
]
# struct Ext, per credit type, only for an account with something reserved, a
# floor, degraded usage or a low-balance threshold: resv, floor, degr, alert.
EXT_BYTES_PER_CT = 32
# Per account, only when the catalog has unique_count meters: uhead (int32), uepoch (uint32).
UNIQUE_COLUMNS = 8
SLOT_BYTES = 4           # int32 per hash slot, accounts and aggregates alike
AGG_BYTES = 48           # struct Agg; its dimension set (a DSet and its bytes) is shared
EVENT_BYTES = 128        # struct Event (scratch of one batch)


def _rss(pid: int | None = None) -> int:
    with open(f"/proc/{pid or 'self'}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _pow2_at_least(n: int) -> int:
    p = 16
    while p < n:
        p *= 2
    return p


def core_accounting(customers: int, id_bytes: int, n_ct: int, n_meters: int, unique: bool,
                    aggregates: int, batch_max: int) -> dict:
    """What the core allocates for ``customers`` accounts and ``aggregates``
    usage aggregates, from the layout of its tables (capacity doubles from 1024;
    the hash tables hold at most half as many entries as slots)."""
    cap = 1024
    while cap < customers:
        cap *= 2
    per_slot = {name: ct * n_ct + m * n_meters + fixed for name, ct, m, fixed in ACCOUNT_COLUMNS}
    if unique:
        per_slot["uhead, uepoch"] = UNIQUE_COLUMNS
    row = sum(per_slot.values())
    acct_slots = _pow2_at_least(2 * cap)
    agg_cap = 64
    while agg_cap < aggregates:
        agg_cap *= 2
    agg_slots = _pow2_at_least(2 * agg_cap)
    tables = {
        "account rows (used)": row * customers,
        "account rows (capacity)": row * cap,
        "account hash slots": acct_slots * SLOT_BYTES,
        "customer id arena (used)": id_bytes * customers,
        "aggregates (used)": AGG_BYTES * aggregates,
        "aggregates (capacity)": AGG_BYTES * agg_cap,
        "aggregate hash slots": agg_slots * SLOT_BYTES,
        "batch scratch": EVENT_BYTES * batch_max,
    }
    # What pages are touched: rows, ids and aggregates up to the used count, all hash slots.
    touched = (row * customers + acct_slots * SLOT_BYTES + id_bytes * customers
               + (AGG_BYTES * aggregates + agg_slots * SLOT_BYTES if aggregates else 0))
    return {"account_row_bytes": row, "account_row_columns": per_slot, "account_capacity": cap,
            "ext_bytes_per_account_when_used": EXT_BYTES_PER_CT * n_ct,
            "aggregate_capacity": agg_cap if aggregates else 64, "tables": tables,
            "expected_resident_bytes": touched, "expected_bytes_per_customer": touched / customers}


# ---- memory -------------------------------------------------------------------------------


def _customer(i: int) -> bytes:
    return b"customer-%07d" % i  # 16 bytes


def _field(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _varint(len(body)) + body


def _event(cust: bytes, quantity: int) -> bytes:
    """A UsageEvent: input_tokens of gpt-4o, serialised as protobuf does."""
    dims = _field(0x2A, _field(0x0A, b"model") + _field(0x12, b"gpt-4o"))
    return _field(0x0A, cust) + _field(0x12, b"input_tokens") + b"\x18" + _varint(quantity) + dims


def _batch(first: int, n: int, seq: int) -> bytes:
    events = b"".join(_field(0x1A, _event(_customer(i), 1000 + i % 3000)) for i in range(first, first + n))
    return _field(0x0A, b"capacity") + b"\x10" + _varint(seq) + events


def _memory_child(customers: int) -> dict:
    """Runs in a fresh interpreter: RSS of the core before and after 1M active customers."""
    import gc

    from meterd import core as core_mod
    from meterd.catalog import load_catalog
    from meterd.config import Settings

    if not core_mod.COMPILED:
        raise RuntimeError("the compiled core is not built: python setup.py build_ext --inplace")
    settings = Settings()
    limits = settings.core_limits()
    denominators, meters, rates, plans, modes, free, names, _ = load_catalog(None).compiled.core_args()
    batch_max = limits["batch_events_max"]
    gc.collect()
    rss_empty = _rss()
    core = core_mod.Core(denominators, meters, rates, limits, 1024, plans, modes, free, names)
    core.set_window(settings.usage_window_s * 1000)
    core.set_clock(int(time.time() * 1000))
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    for i in range(customers):
        core.credit(core.open_account(_customer(i)), 0, 10**15)
    t_open = time.perf_counter() - t0
    gc.collect()
    rss_funded = _rss()
    t0 = time.perf_counter()
    seq = 0
    for first in range(0, customers, batch_max):
        seq += 1
        accepted, denied, _, _ = core.apply_batch(_batch(first, min(batch_max, customers - first), seq))
        if denied:
            raise RuntimeError(f"{denied} events denied")
    t_usage = time.perf_counter() - t0
    gc.collect()
    rss_active = _rss()
    pending = core.usage_pending()
    t0 = time.perf_counter()
    taken = core.take_usage()
    t_take = time.perf_counter() - t0
    n_taken = len(taken)
    del taken
    gc.collect()
    rss_drained = _rss()
    n_ct, n_meters = len(denominators), len(meters)
    unique = any(m[4] == 4 for m in meters)
    return {
        "customers": customers, "credit_types": n_ct, "meters": n_meters,
        "rss_interpreter_bytes": rss_empty, "rss_empty_core_bytes": rss0,
        "rss_funded_bytes": rss_funded, "rss_active_bytes": rss_active, "rss_drained_bytes": rss_drained,
        "aggregates_pending": pending, "aggregates_taken": n_taken,
        "bytes_per_customer_funded": (rss_funded - rss0) / customers,
        "bytes_per_customer_active_with_aggregates": (rss_active - rss0) / customers,
        "bytes_per_customer_active_after_take_usage": (rss_drained - rss0) / customers,
        "seconds_open_and_credit": t_open, "seconds_apply_usage": t_usage, "seconds_take_usage": t_take,
        "accounting_with_aggregates": core_accounting(customers, 16, n_ct, n_meters, unique, pending, batch_max),
        "accounting_after_take_usage": core_accounting(customers, 16, n_ct, n_meters, unique, 0, batch_max),
    }


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("METERD_NO_EXTENSIONS", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.path.join(root, "src"), env.get("PYTHONPATH", "")) if p)
    return env


def memory_per_customer(customers: int = 1_000_000, progress: Progress = print) -> dict:
    """Resident bytes per active customer of the compiled core, measured in a fresh process."""
    progress(f"memory: {customers:,} customers in a fresh process ...")
    out = subprocess.run([sys.executable, "-m", "benchmarks.capacity", "--memory-child", str(customers)],
                         env=_child_env(), capture_output=True, text=True, check=False,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"memory child failed: {out.stderr[-3000:]}")
    result: dict = json.loads(out.stdout.strip().splitlines()[-1])
    progress(f"memory: {result['bytes_per_customer_active_with_aggregates']:.1f} B/customer with aggregates pending, "
             f"{result['bytes_per_customer_active_after_take_usage']:.1f} B/customer after take_usage "
             f"(core's accounting: {result['accounting_with_aggregates']['expected_bytes_per_customer']:.1f} / "
             f"{result['accounting_after_take_usage']['expected_bytes_per_customer']:.1f})")
    return result


# ---- restart --------------------------------------------------------------------------------


def build_data_dir(path: str, customers: int, progress: Progress = print) -> dict:
    """A data directory as a daemon leaves it after ``customers`` grants and a
    clean shutdown: accounts in the snapshot, one grant bucket each, their audit
    entries in the outbox, an empty log. Grants go through the engine's own
    grant path (as the Grant RPC does, without the network and idempotency keys)."""
    from meterd.catalog import load_catalog
    from meterd.config import Settings
    from meterd.engine import Engine

    t0 = time.perf_counter()
    settings = Settings(data_dir=path, fsync=False, map_size_bytes=8 << 30)
    engine = Engine(settings, load_catalog(None))
    chunk = 50_000
    for first in range(0, customers, chunk):
        ops = []
        for i in range(first, min(first + chunk, customers)):
            ops += engine.grants.grant_ops(_customer(i).decode(), 0, 25 * 10**9, 0, 0, "api", "")[0]
        engine.store.write_now(ops)
        progress(f"restart: granted {min(first + chunk, customers):,} customers")
    engine.snapshots.write_now()
    accounts = engine.store.count("accounts")
    engine.flusher.close()
    engine.store.close()
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    return {"accounts": accounts, "seconds_to_build": time.perf_counter() - t0, "bytes_on_disk": size}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _time_start(data_dir: str, log_path: str, timeout_s: float = 120.0) -> dict:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = _free_port()
    target = f"127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "meterd", "serve", "--data-dir", data_dir, "--listen", target, "--no-fsync"]
    # Reconnect at once: a channel's default backoff after refused connections
    # grows to seconds and would be counted as start-up time.
    fast = [("grpc.initial_reconnect_backoff_ms", 5), ("grpc.min_reconnect_backoff_ms", 5),
            ("grpc.max_reconnect_backoff_ms", 20)]
    with open(log_path, "wb") as log, grpc.insecure_channel(target, options=fast) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=_child_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = None
            while time.perf_counter() - t0 < timeout_s:
                if proc.poll() is not None:
                    raise RuntimeError(f"meterd exited with {proc.returncode}: {open(log_path).read()[-3000:]}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        ready = time.perf_counter() - t0
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.005)
            if ready is None:
                raise TimeoutError(f"meterd did not become ready: {open(log_path).read()[-3000:]}")
            rss = _rss(proc.pid)
        finally:
            proc.send_signal(signal.SIGKILL)  # the copy of the data directory is thrown away
            proc.wait()
    text = open(log_path).read()
    return {"ready_s": ready, "recovery_s": _recovery_seconds(text), "rss_at_ready_bytes": rss, "log": text[-2000:]}


def _recovery_seconds(text: str) -> float | None:
    """From the daemon's JSON log: how long ``Engine.recover`` says it took."""
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "recovery_s" in rec:
            return float(rec["recovery_s"])
    return None


def restart_ready_seconds(customers: int = 1_000_000, progress: Progress = print, runs: int = 3) -> dict:
    """Seconds from exec of ``meterd serve`` to SERVING, on a data directory with ``customers``."""
    work = tempfile.mkdtemp(prefix="meterd-capacity-")
    try:
        pristine = os.path.join(work, "pristine")
        built = build_data_dir(pristine, customers, progress)
        progress(f"restart: data directory built in {built['seconds_to_build']:.1f}s, "
                 f"{built['bytes_on_disk'] / 1e6:.0f} MB on disk")
        results = []
        for run in range(runs):
            data = os.path.join(work, f"run{run}")
            shutil.copytree(pristine, data)
            r = _time_start(data, os.path.join(work, f"run{run}.log"))
            progress(f"restart: run {run + 1}: ready in {r['ready_s']:.3f}s (recovery {r['recovery_s']}s, "
                     f"daemon RSS {r['rss_at_ready_bytes'] / 2**20:.0f} MiB)")
            results.append(r)
            shutil.rmtree(data)
        ready = [r["ready_s"] for r in results]
        recovery = [r["recovery_s"] for r in results if r["recovery_s"] is not None]
        return {"customers": customers, "data_dir": built, "ready_s": ready, "ready_min_s": min(ready),
                "rss_at_ready_bytes": [r["rss_at_ready_bytes"] for r in results],
                "ready_median_s": statistics.median(ready), "recovery_s": recovery,
                "recovery_median_s": statistics.median(recovery) if recovery else None,
                "last_log": results[-1]["log"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--memory-child"]:
        print(json.dumps(_memory_child(int(argv[1]))))
        return 0
    customers = int(argv[0]) if argv else 1_000_000
    mem = memory_per_customer(customers)
    restart = restart_ready_seconds(customers)
    print(json.dumps({"memory": mem, "restart": {k: v for k, v in restart.items() if k != "last_log"}}, indent=2))
    target_mem = mem["bytes_per_customer_active_with_aggregates"] <= 200
    print(f"memory per active customer: {mem['bytes_per_customer_active_with_aggregates']:.1f} B with aggregates "
          f"pending, {mem['bytes_per_customer_active_after_take_usage']:.1f} B after take_usage "
          f"(target 200 B: {'met' if target_mem else 'MISSED'})")
    print(f"restart ready: min {restart['ready_min_s']:.3f}s, median {restart['ready_median_s']:.3f}s "
          f"(recovery median {restart['recovery_median_s']}) "
          f"(target 2 s: {'met' if restart['ready_median_s'] <= 2 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
