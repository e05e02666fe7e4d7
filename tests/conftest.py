"""Fixtures: a temporary data directory and a real meterd process on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meterd.v1 import admin_pb2_grpc, meter_pb2_grpc

CORES = ["compiled", "python"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    """A meterd subprocess with its stubs; restartable on the same data directory."""

    def __init__(self, data_dir: Path, core: str = "compiled", catalog: str | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
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
        if self.core == "python":
            env["METERD_NO_EXTENSIONS"] = "1"
        env.update(self.extra_env)
        cmd = [sys.executable, "-m", "meterd", "serve", "--data-dir", str(self.data_dir),
               "--listen", self.target]
        if self.catalog:
            cmd += ["--catalog", self.catalog]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_serving(timeout_s)
        self.channel = grpc.insecure_channel(self.target)
        self.admin_channel = grpc.insecure_channel(self.admin_target)
        self.meter = meter_pb2_grpc.MeterStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.admin_channel)
        return self

    def _wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(self.target) as ch:
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
             extra_env: dict[str, str] | None = None) -> Daemon:
        d = Daemon(tmp_path / name, core=core, catalog=catalog, extra_env=extra_env)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop(signal.SIGKILL)
