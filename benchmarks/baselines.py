"""External baselines for the benchmark suite (issue #5), measured in the same run as meterd.

    python -m benchmarks.baselines [--seconds S] [--only redis,postgres,lmdb] [--json PATH]

- Redis (Debian's package): ``redis-benchmark -t incr -P 64``, and a Lua check-and-debit script
  driven pipelined through EVALSHA, without persistence and with ``appendfsync always``.
- PostgreSQL: ``UPDATE ... WHERE balance >= x RETURNING`` driven by pgbench with 8 clients.
- LMDB: raw put throughput in transactions of 8,000 puts, with and without fsync: the storage ceiling.

A baseline whose server or tool cannot be had is returned with ``skipped`` set and no value: a number
is never made up. Every server started here is private (127.0.0.1, a free port, a temporary
directory) and is stopped, and its directory removed, before the function returns, also on error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

Progress = Callable[[str], object]

REPO = Path(__file__).resolve().parent.parent
POSTGRES_TEST_SERVER = REPO / "scripts" / "postgres-test-server"


@dataclass
class Result:
    name: str  # e.g. "redis-benchmark INCR -P 64"
    value: float | None  # None when skipped
    unit: str  # e.g. "ops/s"
    detail: str = ""  # parameters, e.g. "n=2000000, pipeline 64, 1 client process"
    skipped: str = ""  # why it was skipped (server missing, ...), empty when measured


def _skipped(names_units: list[tuple[str, str]], why: str) -> list[Result]:
    return [Result(name, None, unit, skipped=why) for name, unit in names_units]


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- Redis -----------------------------------------------------------------------------------

REDIS_PIPELINE = 64
REDIS_CLIENTS = 50  # redis-benchmark's default
REDIS_KEYS = 10_000
REDIS_BALANCE = 10**12
# GET the balance; when it covers the amount, DECRBY and return the new balance, else -1.
DEBIT_LUA = """\
local b = tonumber(redis.call('GET', KEYS[1]))
local a = tonumber(ARGV[1])
if b and b >= a then
  return redis.call('DECRBY', KEYS[1], a)
end
return -1
"""
INCR_NAME = f"redis-benchmark INCR -P {REDIS_PIPELINE}"
LUA_NAME = f"Redis Lua check-and-debit EVALSHA -P {REDIS_PIPELINE} (no persistence)"
LUA_AOF_NAME = f"Redis Lua check-and-debit EVALSHA -P {REDIS_PIPELINE} (AOF appendfsync always)"
REDIS_RESULTS = [(INCR_NAME, "ops/s"), (LUA_NAME, "ops/s"), (LUA_AOF_NAME, "ops/s")]


class RedisError(Exception):
    pass


class _Resp:
    """A minimal RESP2 client: enough to preload keys, load a script and read the keys back."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.rfile = self.sock.makefile("rb")

    def close(self) -> None:
        self.rfile.close()
        self.sock.close()

    def call(self, *args: str | bytes | int) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            b = a if isinstance(a, bytes) else str(a).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self.rfile.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self.rfile.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RedisError(f"unexpected reply {line!r}")


def _redis_tools() -> dict[str, str | None]:
    return {t: shutil.which(t) for t in ("redis-server", "redis-benchmark")}


def _redis_port_open(port: int = 6379) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _ensure_redis(progress: Progress) -> str:
    """Installs Debian's redis-server and redis-tools when missing (root only). Returns why not, or ""."""
    missing = [t for t, p in _redis_tools().items() if p is None]
    if not missing:
        return ""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{', '.join(missing)} not found and cannot install (needs root and apt-get)"
    was_listening = _redis_port_open()
    progress("redis: installing Debian's redis-server and redis-tools (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    steps = [["apt-get", "update", "-q"],
             ["apt-get", "install", "-y", "-q", "-o", "DPkg::Lock::Timeout=600", "redis-server", "redis-tools"]]
    for cmd in steps:
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"{' '.join(cmd[:2])} failed: {e}"
        if p.returncode != 0:
            return f"{' '.join(cmd[:2])} failed (exit {p.returncode}): {_tail(p.stderr or p.stdout, 3)}"
    # The package may start Debian's own redis service on port 6379: stop what the install started.
    if not was_listening and _redis_port_open():
        progress("redis: stopping the redis-server service started by the install")
        for cmd in (["invoke-rc.d", "redis-server", "stop"], ["service", "redis-server", "stop"]):
            if shutil.which(cmd[0]):
                subprocess.run(cmd, capture_output=True, timeout=60)
                if not _redis_port_open():
                    break
    missing = [t for t, p in _redis_tools().items() if p is None]
    return f"{', '.join(missing)} still not found after apt-get install" if missing else ""


class _RedisServer:
    """A private redis-server on 127.0.0.1 and a free port, in a directory of its own."""

    def __init__(self, workdir: str, extra: list[str]) -> None:
        self.dir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        log = os.path.join(self.dir, "redis.log")
        for _attempt in range(5):
            self.port = _free_port()
            cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", self.dir,
                   "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", log,
                   "--protected-mode", "yes", *self.extra]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    c = _Resp(self.port, timeout=2)
                    try:
                        if c.call("PING") == "PONG":
                            return
                    finally:
                        c.close()
                except (OSError, RedisError):  # not up yet, or still loading
                    time.sleep(0.05)
            self.stop()
        text = Path(log).read_text(errors="replace") if os.path.exists(log) else ""
        raise RuntimeError(f"redis-server did not start: {_tail(text)}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()  # SIGTERM: redis shuts down (no save: persistence is off)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(15)


def _redis_benchmark(port: int, n: int, args: list[str], timeout: float) -> tuple[float, dict[str, str], float]:
    """Runs redis-benchmark --csv: requests/s, the CSV row by column (latencies) and the wall time."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(REDIS_CLIENTS), "-n", str(n),
           "-P", str(REDIS_PIPELINE), "--csv", *args]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"redis-benchmark exited {p.returncode}: {_tail(p.stderr or p.stdout)}")
    rows = [r for r in csv.reader(line for line in p.stdout.splitlines() if line.startswith('"')) if len(r) >= 2]
    header: list[str] | None = None
    for row in rows:
        if row[1] == "rps":
            header = row
            continue
        try:
            rps = float(row[1])
        except ValueError:
            continue
        return rps, dict(zip(header, row, strict=False)) if header else {}, wall
    raise RuntimeError(f"no requests/s in redis-benchmark output: {_tail(p.stdout + p.stderr)}")


def _calibrated_n(port: int, args: list[str], seconds: float, progress: Progress, what: str) -> tuple[int, int]:
    """The request count for a run of about ``seconds``, from short probe runs; and how many requests they sent.

    Counts are multiples of clients x pipeline, so that redis-benchmark sends exactly that many."""
    unit = REDIS_CLIENTS * REDIS_PIPELINE
    n, sent = unit * 2, 0
    while True:
        rps, _, wall = _redis_benchmark(port, n, args, timeout=120)
        sent += n
        if wall >= min(0.3, seconds / 4) or n >= 50_000_000:
            break
        n *= 4
    target = max(unit, int(rps * seconds) // unit * unit)
    progress(f"redis: {what}: probe ~{rps:,.0f} ops/s -> n={target:,} for ~{seconds:g} s")
    return target, sent


def _latency_note(cols: dict[str, str]) -> str:
    keys = [("p50_latency_ms", "p50"), ("p99_latency_ms", "p99"), ("max_latency_ms", "max")]
    parts = [f"{label} {cols[k]} ms" for k, label in keys if k in cols]
    return ("; latency " + ", ".join(parts)) if parts else ""


def _redis_version() -> str:
    try:
        out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "redis ?"
    m = re.search(r"v=(\S+)", out)
    return f"redis {m.group(1)}" if m else "redis ?"


def _redis_incr(workdir: str, seconds: float, progress: Progress, version: str) -> Result:
    server = _RedisServer(workdir, [])
    try:
        server.start()
        args = ["-t", "incr"]
        n, _ = _calibrated_n(server.port, args, seconds, progress, "INCR")
        rps, cols, wall = _redis_benchmark(server.port, n, args, timeout=seconds * 10 + 60)
    finally:
        server.stop()
    progress(f"redis: INCR -P {REDIS_PIPELINE}: {rps:,.0f} ops/s ({wall:.1f} s)")
    return Result(INCR_NAME, rps, "ops/s",
                  f"n={n:,}, {REDIS_CLIENTS} clients, pipeline {REDIS_PIPELINE}, 1 redis-benchmark process, "
                  f"{version}, persistence off{_latency_note(cols)}")


def _redis_lua(workdir: str, seconds: float, progress: Progress, version: str, durable: bool) -> Result:
    name = LUA_AOF_NAME if durable else LUA_NAME
    extra = ["--appendonly", "yes", "--appendfsync", "always"] if durable else []
    what = "Lua debit (AOF always)" if durable else "Lua debit"
    server = _RedisServer(workdir, extra)
    try:
        server.start()
        c = _Resp(server.port)
        try:
            keys = [f"balance:{i:012d}" for i in range(REDIS_KEYS)]  # redis-benchmark's __rand_int__ form
            for i in range(0, REDIS_KEYS, 1000):
                c.call("MSET", *[x for k in keys[i:i + 1000] for x in (k, REDIS_BALANCE)])
            sha = c.call("SCRIPT", "LOAD", DEBIT_LUA)
            sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            if c.call("EVALSHA", sha, 1, keys[0], 0) != REDIS_BALANCE:  # debits 0: a check of the script
                raise RuntimeError("the debit script does not return the balance")
            args = ["-r", str(REDIS_KEYS), "EVALSHA", sha, "1", "balance:__rand_int__", "1"]
            n, sent = _calibrated_n(server.port, args, seconds, progress, what)
            rps, cols, wall = _redis_benchmark(server.port, n, args, timeout=seconds * 10 + 60)
            sent += n
            # The number only counts if the script really debited: one unit per call, in total.
            balances = c.call("MGET", *keys)
            if any(b is None for b in balances):
                raise RuntimeError("a balance key went missing")
            debited = sum(REDIS_BALANCE - int(b) for b in balances)
            touched = sum(1 for b in balances if int(b) != REDIS_BALANCE)
            stats = c.call("INFO", "commandstats")
            stats = stats.decode() if isinstance(stats, bytes) else str(stats)
            m = re.search(r"cmdstat_evalsha:calls=(\d+)", stats)
            evalsha_calls = int(m.group(1)) - 1 if m else -1  # less the check call above
        finally:
            c.close()
    finally:
        server.stop()
    if debited == 0:
        return Result(name, None, "ops/s", skipped=f"verification failed: no balance was debited by {sent:,} calls")
    check = ("verified: " if debited == sent == evalsha_calls else "CHECK MISMATCH: ") + \
        f"{debited:,} units debited over {touched:,} of {REDIS_KEYS:,} keys by {sent:,} calls " \
        f"(EVALSHA calls {evalsha_calls:,})"
    progress(f"redis: {what}: {rps:,.0f} ops/s ({wall:.1f} s); {check}")
    persistence = "AOF appendfsync always (an fsync per event-loop write batch)" if durable else "persistence off"
    return Result(name, rps, "ops/s",
                  f"n={n:,}, {REDIS_CLIENTS} clients, pipeline {REDIS_PIPELINE}, -r {REDIS_KEYS} keys, "
                  f"1 redis-benchmark process, {version}, {persistence}{_latency_note(cols)}; {check}")


def redis_baselines(seconds: float = 5.0, progress: Progress = print) -> list[Result]:
    """``redis-benchmark -t incr -P 64`` and the Lua check-and-debit script, each run for about ``seconds``.

    The durable variant (AOF, appendfsync always) is the fair comparison to meterd's fsync'd ingest."""
    why = _ensure_redis(progress)
    if why:
        progress(f"redis: skipped: {why}")
        return _skipped(REDIS_RESULTS, why)
    version = _redis_version()
    results: list[Result] = []
    for name, run in ((INCR_NAME, lambda d: _redis_incr(d, seconds, progress, version)),
                      (LUA_NAME, lambda d: _redis_lua(d, seconds, progress, version, durable=False)),
                      (LUA_AOF_NAME, lambda d: _redis_lua(d, seconds, progress, version, durable=True))):
        t0 = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="meterd-bench-redis-") as d:
                results.append(run(d))
        except Exception as e:  # noqa: BLE001 - one failed baseline is reported, the others still run
            progress(f"redis: {name}: failed: {e}")
            results.append(Result(name, None, "ops/s", skipped=f"failed: {e}"))
        progress(f"redis: {name}: done in {time.monotonic() - t0:.1f} s")
    return results


# ---- PostgreSQL ------------------------------------------------------------------------------

PG_CLIENTS = 8
PG_THREADS = 2
PG_ROWS = 10_000
PG_BALANCE = 10**12
PG_NAME = f"PostgreSQL UPDATE ... WHERE balance >= x RETURNING (pgbench, {PG_CLIENTS} clients)"
PG_SCRIPT = f"""\
\\set id random(1, {PG_ROWS})
UPDATE accounts SET balance = balance - 1 WHERE id = :id AND balance >= 1 RETURNING balance;
"""


def _with_database(url: str, dbname: str) -> str:
    u = urlsplit(url)
    return urlunsplit((u.scheme, u.netloc, "/" + dbname, u.query, u.fragment))


def _psql(url: str, sql: str, timeout: float = 120) -> str:
    p = subprocess.run(["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", url, "-c", sql],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"psql failed: {_tail(p.stderr or p.stdout, 3)}")
    return p.stdout.strip()


def _pg_run(url: str, workdir: str, seconds: float, progress: Progress) -> Result:
    dbname = f"meterd_bench_{os.getpid()}_{secrets.token_hex(4)}"
    _psql(url, f"CREATE DATABASE {dbname}")
    try:
        db_url = _with_database(url, dbname)
        _psql(db_url, f"CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL); "
                      f"INSERT INTO accounts SELECT g, {PG_BALANCE} FROM generate_series(1, {PG_ROWS}) g")
        _psql(db_url, "VACUUM ANALYZE accounts")  # not in the transaction block of a multi-statement -c
        settings = _psql(db_url, "SELECT current_setting('server_version') || ', fsync=' || current_setting('fsync')"
                                 " || ', synchronous_commit=' || current_setting('synchronous_commit')")
        script = os.path.join(workdir, "debit.sql")
        Path(script).write_text(PG_SCRIPT)
        duration = max(1, round(seconds))
        progress(f"postgres: pgbench -c {PG_CLIENTS} -j {PG_THREADS} -T {duration} (server {settings})")
        p = subprocess.run(["pgbench", "-n", "-f", script, "-c", str(PG_CLIENTS), "-j", str(PG_THREADS),
                            "-T", str(duration), db_url],
                           capture_output=True, text=True, timeout=duration * 5 + 120, stdin=subprocess.DEVNULL)
        if p.returncode != 0:
            raise RuntimeError(f"pgbench exited {p.returncode}: {_tail(p.stderr or p.stdout)}")
        m = re.search(r"tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)",
                      p.stdout)
        if not m:
            raise RuntimeError(f"no tps in pgbench output: {_tail(p.stdout)}")
        tps = float(m.group(1))
        processed = re.search(r"number of transactions actually processed: (\d+)", p.stdout)
        failed = re.search(r"number of failed transactions: (\d+)", p.stdout)
        latency = re.search(r"latency average = ([\d.]+) ms", p.stdout)
        debited = int(_psql(db_url, f"SELECT sum({PG_BALANCE} - balance) FROM accounts") or 0)
    finally:
        try:
            _psql(url, f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            progress(f"postgres: could not drop database {dbname}: {e}")
    n = int(processed.group(1)) if processed else -1
    if debited == 0:
        return Result(PG_NAME, None, "tx/s", skipped=f"verification failed: no balance debited by {n:,} transactions")
    check = ("verified: " if debited == n else "CHECK MISMATCH: ") + f"{debited:,} units debited by {n:,} transactions"
    progress(f"postgres: {tps:,.0f} tx/s; {check}")
    extra = []
    if latency:
        extra.append(f"latency avg {latency.group(1)} ms")
    if failed:
        extra.append(f"{failed.group(1)} failed")
    return Result(PG_NAME, tps, "tx/s",
                  f"pgbench -n -c {PG_CLIENTS} -j {PG_THREADS} -T {duration}, tps without connection time, "
                  f"{PG_ROWS:,} rows, random id, PostgreSQL {settings}; {', '.join(extra)}; {check}")


def postgres_baseline(seconds: float = 5.0, progress: Progress = print) -> list[Result]:
    """pgbench running ``UPDATE accounts ... WHERE id = :id AND balance >= 1 RETURNING balance`` for ``seconds``.

    Uses the server at ``METERD_TEST_POSTGRES_URL`` when set, else a private one from scripts/postgres-test-server."""
    for tool in ("pgbench", "psql"):
        if shutil.which(tool) is None:
            why = f"{tool} not found (Debian's postgresql-client)"
            progress(f"postgres: skipped: {why}")
            return _skipped([(PG_NAME, "tx/s")], why)
    url = os.environ.get("METERD_TEST_POSTGRES_URL", "")
    server_dir: str | None = None
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meterd-bench-pg-") as workdir:
        try:
            if not url:
                # Directly under /tmp: every parent must be searchable by the postgres OS user.
                server_dir = tempfile.mkdtemp(prefix="meterd-bench-pgserver-", dir="/tmp" if os.path.isdir("/tmp")
                                              else None)
                progress("postgres: starting a private server (scripts/postgres-test-server)")
                p = subprocess.run([str(POSTGRES_TEST_SERVER), "start", server_dir], capture_output=True, text=True,
                                   timeout=900, stdin=subprocess.DEVNULL)
                if p.returncode != 0 or not p.stdout.strip():
                    why = f"no PostgreSQL server: postgres-test-server start failed: {_tail(p.stderr, 3)}"
                    progress(f"postgres: skipped: {why}")
                    return _skipped([(PG_NAME, "tx/s")], why)
                url = p.stdout.strip().splitlines()[-1]
            else:
                progress("postgres: using METERD_TEST_POSTGRES_URL")
            try:
                _psql(url, "SELECT 1", timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                why = f"no PostgreSQL server answers: {e}"
                progress(f"postgres: skipped: {why}")
                return _skipped([(PG_NAME, "tx/s")], why)
            try:
                return [_pg_run(url, workdir, seconds, progress)]
            except Exception as e:  # noqa: BLE001 - reported as skipped, never as a number
                progress(f"postgres: failed: {e}")
                return [Result(PG_NAME, None, "tx/s", skipped=f"failed: {e}")]
        finally:
            if server_dir is not None:
                subprocess.run([str(POSTGRES_TEST_SERVER), "stop", server_dir], capture_output=True, timeout=120,
                               stdin=subprocess.DEVNULL)
                shutil.rmtree(server_dir, ignore_errors=True)
            progress(f"postgres: done in {time.monotonic() - t0:.1f} s")


# ---- LMDB ------------------------------------------------------------------------------------

LMDB_BATCH = 8_000
LMDB_VALUE = 64
LMDB_MAP_SIZE = 16 << 30
LMDB_MAX_PUTS = 60_000_000  # ~5 GB of pages at most
LMDB_PUTS_SYNC = f"LMDB put, {LMDB_BATCH:,}/txn, sync (durable)"
LMDB_COMMITS_SYNC = f"LMDB commit of {LMDB_BATCH:,} puts, sync (durable)"
LMDB_PUTS_NOSYNC = f"LMDB put, {LMDB_BATCH:,}/txn, no sync"
LMDB_COMMITS_NOSYNC = f"LMDB commit of {LMDB_BATCH:,} puts, no sync"
LMDB_RESULTS = [(LMDB_PUTS_SYNC, "puts/s"), (LMDB_COMMITS_SYNC, "commits/s"),
                (LMDB_PUTS_NOSYNC, "puts/s"), (LMDB_COMMITS_NOSYNC, "commits/s")]


@dataclass
class _LmdbRun:
    puts: int
    commits: int
    busy: float  # seconds inside write transactions, begin to commit
    wall: float


def _lmdb_run(lmdb: Any, path: str, sync: bool, method: str, seconds: float) -> _LmdbRun:
    # The same environment flags as meterd's store (src/meterd/store.py), with fsync on or off.
    env = lmdb.open(path, map_size=LMDB_MAP_SIZE, max_dbs=4, subdir=True, sync=sync, metasync=sync,
                    writemap=False, map_async=False, readahead=False, lock=True)
    try:
        db = env.open_db(b"bench")
        value = os.urandom(LMDB_VALUE)
        puts = commits = 0
        busy = 0.0
        start = time.perf_counter()
        deadline = start + seconds
        while time.perf_counter() < deadline and puts + LMDB_BATCH <= LMDB_MAX_PUTS:
            items = [(i.to_bytes(8, "big"), value) for i in range(puts, puts + LMDB_BATCH)]
            t0 = time.perf_counter()
            with env.begin(write=True, db=db) as txn:
                if method == "putmulti":
                    with txn.cursor() as cur:
                        _, added = cur.putmulti(items, append=True)
                else:
                    added = sum(1 for k, v in items if txn.put(k, v, append=True))
            busy += time.perf_counter() - t0
            if added != LMDB_BATCH:
                raise RuntimeError(f"{method} added {added} of {LMDB_BATCH} entries")
            puts += LMDB_BATCH
            commits += 1
        wall = time.perf_counter() - start
        with env.begin(db=db) as txn:
            entries = int(txn.stat(db)["entries"])
        if entries != puts:
            raise RuntimeError(f"the database holds {entries} entries after {puts} puts")
        return _LmdbRun(puts, commits, busy, wall)
    finally:
        env.close()


def lmdb_baseline(seconds: float = 3.0, progress: Progress = print) -> list[Result]:
    """Raw py-lmdb puts of ~64-byte values under sequential u64 big-endian keys, 8,000 a transaction.

    Durable (sync=True: the commit fsyncs, as meterd's group commit) and not, each for about ``seconds``;
    the faster of ``cursor.putmulti(append=True)`` and a ``txn.put(append=True)`` loop is used for both."""
    try:
        import lmdb
    except ImportError as e:
        progress(f"lmdb: skipped: {e}")
        return _skipped(LMDB_RESULTS, f"py-lmdb not importable: {e}")
    t_start = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="meterd-bench-lmdb-") as d:
            trial = max(0.2, min(0.5, seconds / 10))
            rates = {}
            for method in ("putmulti", "put"):
                r = _lmdb_run(lmdb, os.path.join(d, f"trial-{method}"), False, method, trial)
                rates[method] = r.puts / r.busy
                shutil.rmtree(os.path.join(d, f"trial-{method}"))
            method = max(rates, key=lambda m: rates[m])
            other = min(rates, key=lambda m: rates[m])
            how = ("cursor.putmulti(items, append=True)" if method == "putmulti" else "txn.put(k, v, append=True) loop")
            how += f" ({rates[method] / rates[other]:.2f}x the {other} way in a {trial:g} s no-sync trial)"
            progress(f"lmdb: using {how}")
            results: list[Result] = []
            for sync in (True, False):
                label = "sync" if sync else "no sync"
                path = os.path.join(d, "sync" if sync else "nosync")
                r = _lmdb_run(lmdb, path, sync, method, seconds)
                shutil.rmtree(path)
                puts_s, commits_s = r.puts / r.busy, r.commits / r.busy
                progress(f"lmdb: {label}: {puts_s:,.0f} puts/s, {commits_s:,.1f} commits/s "
                         f"({r.commits:,} commits in {r.wall:.1f} s)")
                detail = (f"{r.puts:,} puts in {r.commits:,} write txns of {LMDB_BATCH:,}, {LMDB_VALUE}-byte values, "
                          f"sequential u64 big-endian keys, {how}; sync={sync}, metasync={sync}, writemap=False "
                          f"(meterd's flags); timed from txn begin to commit ({r.busy:.2f} s of {r.wall:.2f} s wall, "
                          f"key encoding excluded); py-lmdb {lmdb.__version__}, LMDB "
                          f"{'.'.join(map(str, lmdb.version()))}, temp dir on {tempfile.gettempdir()}")
                puts_name, commits_name = ((LMDB_PUTS_SYNC, LMDB_COMMITS_SYNC) if sync
                                           else (LMDB_PUTS_NOSYNC, LMDB_COMMITS_NOSYNC))
                results.append(Result(puts_name, puts_s, "puts/s", detail))
                results.append(Result(commits_name, commits_s, "commits/s", detail))
            return results
    except Exception as e:  # noqa: BLE001 - reported as skipped, never as a number
        progress(f"lmdb: failed: {e}")
        return _skipped(LMDB_RESULTS, f"failed: {e}")
    finally:
        progress(f"lmdb: done in {time.monotonic() - t_start:.1f} s")


# ---- command line ----------------------------------------------------------------------------

def format_table(results: list[Result]) -> str:
    rows = [(r.name, f"{r.value:,.0f}" if r.value is not None else "skipped", r.unit,
             r.detail if r.value is not None else r.skipped) for r in results]
    widths = [max(len(row[i]) for row in rows + [("baseline", "value", "unit", "")]) for i in range(3)]
    lines = [f"{'baseline':<{widths[0]}}  {'value':>{widths[1]}}  {'unit':<{widths[2]}}  detail"]
    lines += [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, help="seconds per measurement (default: 5 for Redis and PostgreSQL, "
                                                  "3 for LMDB)")
    ap.add_argument("--only", default="redis,postgres,lmdb", help="comma-separated subset of redis,postgres,lmdb")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    runs: dict[str, Callable[..., list[Result]]] = {"redis": redis_baselines, "postgres": postgres_baseline,
                                                    "lmdb": lmdb_baseline}
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in wanted if w not in runs]
    if unknown:
        ap.error(f"unknown baseline(s): {', '.join(unknown)}")
    results: list[Result] = []
    timings: dict[str, float] = {}
    for w in wanted:
        t0 = time.monotonic()
        kwargs = {"seconds": args.seconds} if args.seconds is not None else {}
        results += runs[w](progress=lambda s: print(s, file=sys.stderr, flush=True), **kwargs)
        timings[w] = time.monotonic() - t0
    print(format_table(results))
    print("took " + ", ".join(f"{w} {t:.1f} s" for w, t in timings.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": [asdict(r) for r in results], "seconds": timings},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


LMDB_COMMIT_LATENCY = "LMDB durable commit of one put, p99 (the floor of a durable answer)"


def lmdb_commit_latency(commits: int = 300, progress: Progress = print) -> list[Result]:
    """How long one small durable commit takes here: no durable answer can be faster."""
    import lmdb

    progress(f"lmdb: {commits} single-put commits with sync")
    work = tempfile.mkdtemp(prefix="meterd-bench-lmdb-latency-")
    try:
        env = lmdb.open(work, map_size=64 << 20, sync=True, metasync=True)
        times = []
        for i in range(commits):
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(i.to_bytes(8, "big"), b"x" * 64)
            times.append((time.perf_counter() - t) * 1000)
        env.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    times.sort()
    p50, p99 = times[len(times) // 2], times[min(len(times) - 1, int(0.99 * len(times)))]
    return [Result(LMDB_COMMIT_LATENCY, round(p99, 3), "ms", f"p50 {p50:.3f} ms, {commits} commits, fsync on")]
