"""Fixtures: a temporary data directory and a real meterd process on loopback.

``--no-extensions`` runs the whole suite on the pure-Python twin of the core
(METERD_NO_EXTENSIONS=1, in this process and in every daemon it starts): the
cases of the compiled core are skipped. ``-m inprocess`` runs only the tests
that start no process (no daemon, no meterd command, no PostgreSQL server):
the engine's logic, in seconds."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meterd.v1 import admin_pb2_grpc, meter_pb2_grpc

CORES = ["compiled", "python"]

# Fixtures that start processes: a test using one is not in the in-process tier.
PROCESS_FIXTURES = frozenset({"daemon", "make_daemon", "tenants", "postgres_url"})
_no_compiled: str | None = None  # why the compiled core is not tested in this run (pytest_configure)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-extensions", action="store_true", default=False,
                     help="run the whole suite on the pure-Python twin of the core (METERD_NO_EXTENSIONS=1); "
                          "the compiled core's cases are skipped")


def pytest_configure(config: pytest.Config) -> None:
    global _no_compiled
    if _guards_tier(config):
        sys.addaudithook(_refuse_processes)
    if config.getoption("no_extensions"):
        # Before any test module imports meterd.core, which chooses its core once, at import.
        os.environ["METERD_NO_EXTENSIONS"] = "1"
        if "meterd.core" in sys.modules and sys.modules["meterd.core"].COMPILED:
            raise pytest.UsageError("--no-extensions: meterd.core was imported with the compiled core already")
        _no_compiled = "--no-extensions: the suite runs on the pure-Python twin alone"
    elif os.environ.get("METERD_NO_EXTENSIONS", "") not in ("", "0"):
        _no_compiled = "METERD_NO_EXTENSIONS is set: meterd runs on the pure-Python twin"
    else:
        try:
            import meterd._fastpath  # noqa: F401
        except ImportError as e:
            _no_compiled = f"the compiled core is not built ({e}): python setup.py build_ext --inplace"


def compiled_core_unavailable() -> str | None:
    """Why this run does not test the compiled core, or None when it does."""
    return _no_compiled


def _starts_processes(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return (bool(PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())))
            or item.get_closest_marker("spawns") is not None
            or (callspec is not None and callspec.params.get("ledger_url") == "postgresql"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if _no_compiled and callspec is not None and "compiled" in callspec.params.values():
            item.add_marker(pytest.mark.skip(reason=f"compiled core: {_no_compiled}"))
        if not _starts_processes(item):
            item.add_marker(pytest.mark.inprocess)


_PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.system", "os.posix_spawn", "os.exec", "os.spawn", "os.fork",
                             "os.forkpty"})
_in_process_test: list[str] = []  # the in-process test running now, when -m selects the tier


def _refuse_processes(event: str, args: tuple) -> None:
    if _in_process_test and event in _PROCESS_EVENTS:
        raise RuntimeError(f"{_in_process_test[0]} is in the in-process tier (-m inprocess) but starts a process "
                           f"({event}): use a daemon fixture or mark it @pytest.mark.spawns")


def _guards_tier(config: pytest.Config) -> bool:
    """Whether -m selects the in-process tier: then the tier is checked (pytest_configure adds the hook)."""
    return "inprocess" in (config.getoption("markexpr") or "")


def _in_process_phase(item: pytest.Item) -> Iterator[None]:
    """Keeps -m inprocess honest: under it, a test of that tier whose setup (its fixtures of
    any scope) or body starts a process fails, naming itself."""
    if item.get_closest_marker("inprocess") is not None and _guards_tier(item.config):
        _in_process_test.append(item.nodeid)
    try:
        yield
    finally:
        _in_process_test.clear()


pytest_runtest_setup = pytest.hookimpl(hookwrapper=True)(_in_process_phase)
pytest_runtest_call = pytest.hookimpl(hookwrapper=True)(_in_process_phase)


def wait_until(check: Any, what: str, deadline_s: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true (and return that); fail naming
    ``what`` at the deadline. For what a test can only observe from outside, such as a
    daemon's log line or a timer that closes a session."""
    deadline = time.monotonic() + deadline_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(0.02)
    return result


async def async_wait_until(check: Any, what: str, deadline_s: float = 30.0) -> Any:
    """``wait_until`` for a test running on an event loop: the loop runs while it polls."""
    deadline = time.monotonic() + deadline_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {deadline_s:g} s waiting for {what}")
        await asyncio.sleep(0.01)
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call that does not carry its own."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", "Bearer " + token)

    def _details(self, details: Any) -> Any:
        metadata = list(details.metadata or [])
        if not any(k == "authorization" for k, _ in metadata):
            metadata.append(self.header)
        return _Details(details.method, details.timeout, metadata, details.credentials, details.wait_for_ready,
                        details.compression)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                   "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    pass


class Daemon:
    """A meterd subprocess with its stubs; restartable on the same data directory."""

    def __init__(self, data_dir: Path, core: str = "compiled", catalog: str | None = None,
                 extra_env: dict[str, str] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.credentials = credentials  # TLS: how the test's clients trust (and show themselves to) the daemon
        self.data_dir = data_dir
        self.core = core
        self.catalog = catalog
        self.extra_env = extra_env or {}
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def admin_target(self) -> str:
        return "unix:" + str(self.data_dir / "admin.sock")

    def start(self, timeout_s: float = 30.0) -> "Daemon":
        env = dict(os.environ)
        env.pop("METERD_NO_EXTENSIONS", None)
        if self.core == "python" or _no_compiled:  # --no-extensions: every daemon runs the twin
            env["METERD_NO_EXTENSIONS"] = "1"
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "meterd", "serve", "--data-dir", str(self.data_dir),
               "--listen", self.target]
        if self.catalog:
            cmd += ["--catalog", self.catalog]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_serving(timeout_s)
        self.channel = self.connect(self.target)
        self.admin_channel = grpc.intercept_channel(self.connect(self.admin_target), Bearer(self.admin_token()))
        self.meter = meter_pb2_grpc.MeterStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.admin_channel)
        return self

    def admin_token(self) -> str:
        """The Admin token: the configured file, or the one the daemon made in its data directory."""
        path = self.extra_env.get("METERD_ADMIN_TOKEN_FILE") or str(self.data_dir / "admin.token")
        return Path(path).read_text().strip()

    def connect(self, target: str) -> grpc.Channel:
        if self.credentials is None:
            return grpc.insecure_channel(target)
        # A Unix socket has no host name: the daemon's certificate is checked for "localhost".
        options = [("grpc.ssl_target_name_override", "localhost")] if target.startswith("unix:") else []
        return grpc.secure_channel(target, self.credentials, options=options)

    def _wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self.connect(self.target) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    tail = self.log_path.read_text()[-3000:]
                    raise RuntimeError(f"meterd exited with {self.proc.returncode}: {tail}")
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.05)
        raise TimeoutError(f"meterd did not become ready: {self.log_path.read_text()[-3000:]}")

    def _close_channels(self) -> None:
        for ch in ("channel", "admin_channel"):
            c = getattr(self, ch, None)
            if c is not None:
                c.close()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        self._close_channels()
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self.proc = None
        self._log.close()
        return rc

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> "Daemon":
        self.stop()
        return self.start()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture(params=CORES)
def daemon(request: pytest.FixtureRequest, data_dir: Path) -> Iterator[Daemon]:
    d = Daemon(data_dir, core=request.param).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator:
    made: list[Daemon] = []

    def make(core: str = "compiled", catalog: str | None = None, name: str = "data",
             extra_env: dict[str, str] | None = None, credentials: grpc.ChannelCredentials | None = None) -> Daemon:
        d = Daemon(tmp_path / name, core=core, catalog=catalog, extra_env=extra_env, credentials=credentials)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop(signal.SIGKILL)


# --- PostgreSQL for the central ledger -------------------------------------------------------------
# METERD_TEST_POSTGRES_URL points the tests at a running server (.ci/run starts one with
# scripts/postgres-test-server); without it a server is started for the session when Debian's
# postgresql binaries are installed. METERD_REQUIRE_POSTGRES=1 turns "no PostgreSQL" into a failure.

POSTGRES_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "postgres-test-server"
POSTGRES_UNAVAILABLE = "PostgreSQL not available: set METERD_TEST_POSTGRES_URL or install Debian's postgresql package"


def _postgres_required() -> bool:
    return os.environ.get("METERD_REQUIRE_POSTGRES") == "1"


def _postgres_binaries_installed() -> bool:
    import glob

    return any(
        os.access(os.path.join(d, "pg_ctl"), os.X_OK) and os.access(os.path.join(d, "initdb"), os.X_OK)
        for d in glob.glob("/usr/lib/postgresql/*/bin")
    )


def _psycopg():
    try:
        import psycopg
    except ImportError:
        if _postgres_required():
            raise
        pytest.skip("psycopg is not installed: pip install '.[postgresql]'")
    return psycopg


def _postgres_database_url(postgres_url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(postgres_url)._replace(path="/" + name))


def new_postgres_database(postgres_url: str) -> str:
    """Creates an empty database with a unique name on the server of postgres_url; returns its URL.

    The caller drops it with drop_postgres_database (the ledger_url fixture does).
    """
    import uuid

    psycopg = _psycopg()
    from psycopg import sql

    name = f"meterd_test_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _postgres_database_url(postgres_url, name)


def drop_postgres_database(postgres_url: str, database_url: str) -> None:
    """Drops the database of database_url (made by new_postgres_database), closing its connections."""
    from urllib.parse import urlsplit

    psycopg = _psycopg()
    from psycopg import sql

    name = urlsplit(database_url).path.lstrip("/")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server (superuser, database postgres) for the whole session."""
    url = os.environ.get("METERD_TEST_POSTGRES_URL")
    if url:
        yield url
        return
    if not _postgres_binaries_installed():
        if _postgres_required():
            pytest.fail(POSTGRES_UNAVAILABLE)
        pytest.skip(POSTGRES_UNAVAILABLE)
    import shutil
    import tempfile

    # Not under pytest's tmp_path: its root is private to this user, and the server runs as postgres.
    server_dir = tempfile.mkdtemp(prefix="meterd-pg-")
    try:
        r = subprocess.run([str(POSTGRES_SCRIPT), "start", server_dir], capture_output=True, text=True,
                           timeout=300)
        if r.returncode != 0:
            pytest.fail(f"scripts/postgres-test-server start failed ({r.returncode}):\n{r.stderr[-3000:]}")
        yield r.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run([str(POSTGRES_SCRIPT), "stop", server_dir], capture_output=True, timeout=120)
        shutil.rmtree(server_dir, ignore_errors=True)


class OwnPostgres:
    """A PostgreSQL server of a test's own, which the test stops and starts again (same port, same data)."""

    def __init__(self) -> None:
        if not _postgres_binaries_installed():
            if _postgres_required():
                pytest.fail(POSTGRES_UNAVAILABLE)
            pytest.skip(POSTGRES_UNAVAILABLE)
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="meterd-pg-own-", dir="/tmp")  # the postgres user must reach it
        self.env = dict(os.environ, POSTGRES_TEST_PORT=str(free_port()))

    def __call__(self, action: str) -> str:
        """``start`` (returns the URL) or ``stop``."""
        r = subprocess.run([str(POSTGRES_SCRIPT), action, self.dir], env=self.env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip()

    def remove(self) -> None:
        import shutil

        subprocess.run([str(POSTGRES_SCRIPT), "stop", self.dir], env=self.env, capture_output=True, timeout=600)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    server = OwnPostgres()
    try:
        yield server
    finally:
        server.remove()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of an empty central ledger: a SQLite file, or a fresh PostgreSQL database dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ledger.db"
        return
    server_url = request.getfixturevalue("postgres_url")
    url = new_postgres_database(server_url)
    try:
        yield url
    finally:
        drop_postgres_database(server_url, url)


# --- Two tenants with data-plane tokens -------------------------------------------------------------
ACME_TOKEN, GLOBEX_TOKEN = "acme-token-0123456789abcdef", "globex-token-fedcba9876543210"
ACME, GLOBEX = [("authorization", "Bearer " + ACME_TOKEN)], [("authorization", "Bearer " + GLOBEX_TOKEN)]


def tokens_file(folder: Path) -> Path:
    """A data_tokens_file with tenants acme (customers acme-...) and globex (globex-...)."""
    import hashlib
    path = folder / "tokens.toml"
    path.write_text("".join(
        f'[tenants.{name}]\ntoken_sha256 = "{hashlib.sha256(token.encode()).hexdigest()}"\ncustomers = "{prefix}"\n'
        for name, token, prefix in (("acme", ACME_TOKEN, "acme-"), ("globex", GLOBEX_TOKEN, "globex-"))))
    return path


@pytest.fixture
def tenants(make_daemon, tmp_path: Path):
    """Starts a daemon with the two tenants' tokens and ``env``; acme-1 and globex-1 hold $100 each."""
    def start(**env: str) -> tuple[Daemon, meter_pb2_grpc.MeterStub]:
        d = make_daemon(extra_env={"METERD_DATA_TOKENS_FILE": str(tokens_file(tmp_path)), **env}).start()
        from meterd.v1 import admin_pb2
        for customer in ("acme-1", "globex-1"):
            d.admin.Grant(admin_pb2.GrantRequest(customer_id=customer, credit_type="usd", amount_nano=100 * 10**9))
        return d, meter_pb2_grpc.MeterStub(d.channel)
    return start
