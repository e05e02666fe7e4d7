"""End-to-end ingest load, and the servers of the suite: a real meterd (or a
bare gRPC echo server) on loopback.

Client processes send pre-serialised batches, so that the client is not what
is measured: each keeps ``inflight`` ReportBatch calls open (a closed loop, at
saturation), or one ReportStream with batches ahead of their answers. Unary
calls are driven by h2load instead (``benchmarks.unary``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import grpc

from meterd._fastpath_py import _put_varint as _varint
from meterd.v1 import meter_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini"]
CUSTOMERS = 10_000
BALANCE = "1000000000"  # dollars: no event is denied during a run


@dataclass
class Run:
    """One measured scenario."""
    name: str
    offered: float | None          # calls/s asked for (None: saturation)
    calls_per_s: float
    events_per_s: float
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    errors: int = 0
    detail: str = ""
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- servers -------------------------------------------------------------------------------


# A plan for the runs with plans: a month's included dollars that no run spends, and an overage
# allowance after them (leased too, in ledger mode), so that each debit goes through a plan's buckets.
BENCH_PLAN = f"""
[plans.bench]
fee = {{ usd = "1.00" }}
[plans.bench.credits.usd]
included = "{BALANCE}"
overage = {{ price = "1", price_in = "usd", limit = "100" }}
"""


def bench_catalog(path: Path, customers: int = CUSTOMERS, plan: bool = False) -> None:
    """The demo catalog's meters, and customers with large balances (with ``plan``: the bench plan,
    its customers on it)."""
    demo = (ROOT / "src" / "meterd" / "demo_catalog.toml").read_text()
    head = demo.split("[customers.")[0]
    with open(path, "w") as f:
        f.write(head + (BENCH_PLAN if plan else ""))
        for i in range(customers):
            f.write(f'[customers.c{i}]\nplan = "bench"\n' if plan else
                    f'[customers.c{i}]\nbalances = {{ usd = "{BALANCE}" }}\n')


class Server:
    """A meterd daemon, or the echo server, as a subprocess on loopback."""

    def __init__(self, kind: str = "meterd", fsync: bool = True, customers: int = CUSTOMERS,
                 env: dict[str, str] | None = None, seeded: bool = True, plan: bool = False) -> None:
        """``env``: settings for the daemon; ``seeded``: the catalog grants the customers' balances
        (else they are granted elsewhere, in the ledger say); ``plan``: the catalog has the bench
        plan (its seeded customers are on it)."""
        self.kind = kind
        self.fsync = fsync
        self.customers = customers
        self.env = env or {}
        self.seeded = seeded
        self.plan = plan
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"meterd-bench-{kind}-"))
        self.proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        env = dict(os.environ)
        env.pop("METERD_NO_EXTENSIONS", None)
        if self.kind.startswith("echo"):
            cmd = [sys.executable, "-m", "benchmarks.echo", self.target]
            cmd += {"echo": [], "echo-handoff": ["--handoff"],
                    "echo-durable": ["--handoff", "--durable", str(self.dir / "lmdb")]}[self.kind]
        else:
            catalog = self.dir / "catalog.toml"
            bench_catalog(catalog, self.customers if self.seeded else 0, self.plan)
            cmd = [sys.executable, "-m", "meterd", "serve", "--data-dir", str(self.dir / "data"),
                   "--listen", self.target, "--catalog", str(catalog)]
            if not self.fsync:
                cmd.append("--no-fsync")
            env["METERD_LOG_LEVEL"] = "warning"
            env.update(self.env)
        self.log = open(self.dir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as ch:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited: {(self.dir / 'server.log').read_text()[-2000:]}")
                try:  # plain calls: channel_ready_future leaves a polling thread that fails when ch closes
                    if self.kind.startswith("echo"):
                        ch.unary_unary("/Echo/Call", request_serializer=None, response_deserializer=None)(
                            b"", timeout=1)
                        return
                    from grpc_health.v1 import health_pb2, health_pb2_grpc
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"{self.kind} did not become ready")

    def __exit__(self, *exc: Any) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---- requests, pre-serialised --------------------------------------------------------------


def batch_body(size: int, seed: int) -> bytes:
    """The events of a ReportBatchRequest (field 3), over CUSTOMERS customers and mixed models."""
    import random
    rng = random.Random(seed)
    events = [pb.UsageEvent(customer_id=f"c{rng.randrange(CUSTOMERS)}",
                            meter=rng.choice(["input_tokens", "output_tokens"]), quantity=rng.randrange(1, 4000),
                            dimensions={"model": rng.choice(MODELS)}) for _ in range(size)]
    return pb.ReportBatchRequest(events=events).SerializeToString()


class Batches:
    """ReportBatchRequests of one client: the same events, a new sequence each time."""

    def __init__(self, client_id: str, size: int, seed: int) -> None:
        self.prefix = b"\x0a" + _varint(len(client_id)) + client_id.encode()
        self.body = batch_body(size, seed)
        self.seq = 0

    def next(self) -> bytes:
        self.seq += 1
        return self.prefix + b"\x10" + _varint(self.seq) + self.body


def report_request() -> bytes:
    """One ReportRequest, for the unary runs."""
    return pb.ReportRequest(event=pb.UsageEvent(customer_id="c1", meter="input_tokens", quantity=1000,
                                                dimensions={"model": "gpt-4o"})).SerializeToString()


# ---- one client process --------------------------------------------------------------------------------


def _client(target: str, method: str, proc: int, seconds: float, inflight: int, batch: int, out: Any,
            customers: int = CUSTOMERS) -> None:
    """Runs in a child process; puts (calls, events, errors, latencies_ms, elapsed_s) on ``out``.
    ``customers``: its parent's CUSTOMERS (a spawned child imports this module afresh)."""
    global CUSTOMERS
    CUSTOMERS = customers
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20),
                                                     ("grpc.max_receive_message_length", 64 << 20)])
    if method == "ReportStream":
        out.put(_stream(channel, "/meterd.v1.Meter/ReportStream", proc, seconds, batch))
        return
    call = channel.unary_unary("/meterd.v1.Meter/ReportBatch", request_serializer=None,
                               response_deserializer=None)
    batches = Batches(f"bench-{os.getpid()}", batch, proc)
    lock = threading.Lock()
    latencies: list[float] = []
    counts = [0, 0]  # done, errors
    slots = threading.Semaphore(inflight)
    start = time.monotonic()
    end = start + seconds

    def done(fut: Any, sent: float) -> None:
        ok = fut.exception() is None
        with lock:
            latencies.append((time.monotonic() - sent) * 1000)
            counts[0] += 1
            counts[1] += 0 if ok else 1
        slots.release()

    while time.monotonic() < end:
        slots.acquire()
        sent = time.monotonic()
        fut = call.future(batches.next(), timeout=30)
        fut.add_done_callback(lambda f, t=sent: done(f, t))
    for _ in range(inflight):
        slots.acquire()
    elapsed = time.monotonic() - start
    out.put((counts[0] - counts[1], (counts[0] - counts[1]) * batch, counts[1], latencies, elapsed))
    channel.close()


def _stream(channel: grpc.Channel, path: str, proc: int, seconds: float, batch: int) -> tuple:
    call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
    batches = Batches(f"stream-{os.getpid()}", batch, proc)
    stop = time.monotonic() + seconds
    sent = threading.Semaphore(64)  # requests ahead of their answers

    def requests() -> Iterator[bytes]:
        while time.monotonic() < stop:
            sent.acquire()
            yield batches.next()

    start = time.monotonic()
    acked = errors = 0
    try:
        for _ in call(requests(), timeout=seconds + 60):
            acked += 1
            sent.release()
    except grpc.RpcError:
        errors += 1
    elapsed = time.monotonic() - start
    return acked, acked * batch, errors, [], elapsed


def drive(target: str, method: str, processes: int = 2, seconds: float = 5.0, inflight: int = 16,
          batch: int = 1000) -> Run:
    """Run client processes against a meterd and sum what they measured."""
    # Spawned, not forked: a child forked after this process used gRPC (the server's readiness
    # check) can hang in its first channel, and the run with it.
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_client, args=(target, method, p, seconds, inflight, batch, out, CUSTOMERS))
             for p in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 180) for _ in procs]
    for p in procs:
        p.join(30)
    calls = sum(r[0] for r in results)
    events = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    elapsed = max(r[4] for r in results)
    lat = sorted(x for r in results for x in r[3])

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    detail = f"{processes} client processes, " + (f"{inflight} calls in flight each" if method == "ReportBatch"
                                                   else "one stream each")
    return Run(f"meterd {method} x{batch}", None, calls / elapsed, events / elapsed, pct(0.5), pct(0.99),
               pct(0.999), errors, detail)


if __name__ == "__main__":
    with Server("meterd") as s:
        print(drive(s.target, "ReportBatch", batch=1000, seconds=3))
