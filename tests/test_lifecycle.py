"""Start with embedded defaults; stop gracefully on SIGTERM and SIGINT."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import grpc
import pytest
from conftest import Bearer, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meterd.server import STREAM_WINDOW
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import admin_pb2_grpc, meter_pb2_grpc
from meterd.v1 import meter_pb2 as pb

pytestmark = pytest.mark.spawns  # meterd serve
EVENT = pb.UsageEvent(customer_id="demo", meter="input_tokens", quantity=10, dimensions={"model": "gpt-4o"})


def wait_serving(target: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)

        def serving() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                return stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1
            except grpc.RpcError:
                return False

        wait_until(serving, f"meterd to serve on {target}", timeout_s)


DEFAULT_LISTEN = ("127.0.0.1", 50051)


def test_meterd_serve_runs_with_embedded_defaults(tmp_path: Path):
    exe = shutil.which("meterd")
    assert exe, "the meterd command is installed by `pip install .`"
    with socket.socket() as probe:  # whoever holds the default port would answer in place of this daemon
        try:
            probe.bind(DEFAULT_LISTEN)
        except OSError as e:
            pytest.skip(f"{DEFAULT_LISTEN[0]}:{DEFAULT_LISTEN[1]}, meterd's default address, is in use: {e}")
    target, data = "%s:%d" % DEFAULT_LISTEN, tmp_path / "meterd-data"
    log_path = tmp_path / "serve.log"

    def records() -> list[dict]:
        return [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]

    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "serve"], cwd=tmp_path, stderr=log, text=True)
    try:
        wait_serving(target, proc)
        # This process is the one serving: it is alive and says it listens on the default port...
        serving = wait_until(lambda: [r["msg"] for r in records() if r["msg"].startswith("serving data plane")],
                             "the daemon to log where it serves")
        assert proc.poll() is None
        assert serving[0].startswith(f"serving data plane on {target} (port {DEFAULT_LISTEN[1]}), admin on "
                                     f"unix:{data / 'admin.sock'}"), serving
        # ...and it answers for a customer that only its own data directory holds.
        customer = f"lifecycle-{uuid.uuid4().hex}"
        admin = grpc.intercept_channel(grpc.insecure_channel(f"unix:{data / 'admin.sock'}"),
                                       Bearer((data / "admin.token").read_text().strip()))
        with admin, grpc.insecure_channel(target) as ch:
            admin_pb2_grpc.AdminStub(admin).Grant(apb.GrantRequest(customer_id=customer, credit_type="usd",
                                                                   amount_nano=10**9))
            stub = meter_pb2_grpc.MeterStub(ch)
            mine = pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=10,
                                 dimensions={"model": "gpt-4o"})
            r = stub.Report(pb.ReportRequest(event=mine))
            assert (r.decision, r.balance_nano) == (pb.DECISION_ALLOW, 10**9 - 25_000)  # 10 gpt-4o input tokens
            r = stub.Report(pb.ReportRequest(event=EVENT))  # the embedded demo catalog: demo holds $10
            assert (r.decision, r.balance_nano) == (pb.DECISION_ALLOW, 10 * 10**9 - 25_000)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0, log_path.read_text()
    assert records() and all({"ts", "level", "logger", "msg"} <= set(r) for r in records())
    assert records()[-1]["msg"] == "stopped"
    assert not (data / "admin.sock").exists()


def test_sigterm_finishes_in_flight_calls_and_exits_zero(make_daemon):
    d = make_daemon().start()
    acked = []
    errors = []

    def stream():
        def batches():
            for seq in range(1, 100_000):
                yield pb.ReportBatchRequest(client_id="s", sequence=seq, events=[EVENT] * 50)
        try:
            for r in meter_pb2_grpc.MeterStub(grpc.insecure_channel(d.target)).ReportStream(batches()):
                acked.append(r.accepted)
        except grpc.RpcError as e:
            errors.append(e.code())

    t = threading.Thread(target=stream)
    t.start()
    wait_until(lambda: len(acked) >= 20 or errors, "20 batches of the stream to be acknowledged")
    assert not errors
    rc = d.stop(signal.SIGTERM)
    t.join(30)
    assert rc == 0
    assert errors, "the stream was ended by the shutdown"
    d.start()
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="demo"))
    used = int({u.meter: u.quantity for u in resp.usage}["input_tokens"])
    assert used >= sum(acked) * 10  # every acknowledged event is there
    # and at most a stream window more: batches applied whose answers the shutdown cut off (the
    # client resends them by sequence, and they are duplicates)
    assert used <= (sum(acked) + 50 * STREAM_WINDOW) * 10
    assert "0 log records replayed" in d.log_path.read_text().split("state recovered")[-1][:60]


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_core_choice_is_logged(make_daemon, core):
    d = make_daemon(core=core).start()
    d.stop()
    assert f"core={core}" in d.log_path.read_text()


def test_no_extensions_runs_this_process_and_every_daemon_on_the_twin(request, make_daemon):
    if not request.config.getoption("no_extensions"):
        pytest.skip("checks what --no-extensions does: run the suite with it")
    from meterd import _fastpath_py, core
    assert core.COMPILED is False and core.Core is _fastpath_py.Core
    assert "meterd._fastpath" not in sys.modules  # nothing in this run loaded the compiled core
    d = make_daemon().start()  # the default core of the fixtures, "compiled": the twin all the same
    d.stop()
    assert "core=python" in d.log_path.read_text() and "core=compiled" not in d.log_path.read_text()


def test_a_second_daemon_on_the_same_data_dir_or_port_is_refused(make_daemon, tmp_path: Path):
    d = make_daemon().start()
    same_dir = subprocess.run([sys.executable, "-m", "meterd", "serve", "--data-dir", str(d.data_dir),
                               "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60)
    assert same_dir.returncode == 2
    assert "is in use by another meterd process" in same_dir.stderr
    same_port = subprocess.run([sys.executable, "-m", "meterd", "serve", "--data-dir", str(tmp_path / "other"),
                                "--listen", d.target], capture_output=True, text=True, timeout=60)
    assert same_port.returncode == 2
    assert f"listen: cannot listen on {d.target}" in same_port.stderr
    # the first daemon is untouched
    assert d.meter.Report(pb.ReportRequest(event=EVENT)).decision == pb.DECISION_ALLOW
