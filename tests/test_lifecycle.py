"""Start with embedded defaults; stop gracefully on SIGTERM and SIGINT."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import grpc
import pytest
from conftest import wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

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


def test_meterd_serve_runs_with_embedded_defaults(tmp_path: Path):
    exe = shutil.which("meterd")
    assert exe, "the meterd command is installed by `pip install .`"
    proc = subprocess.Popen([exe, "serve"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving("127.0.0.1:50051", proc)
        with grpc.insecure_channel("127.0.0.1:50051") as ch:
            r = meter_pb2_grpc.MeterStub(ch).Report(pb.ReportRequest(event=EVENT))
        assert r.decision == pb.DECISION_ALLOW
        assert (tmp_path / "meterd-data" / "admin.sock").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert records[-1]["msg"] == "stopped"
    assert not (tmp_path / "meterd-data" / "admin.sock").exists()


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
    assert used >= sum(acked) * 10  # every acknowledged event is there (and at most one unacked batch more)
    assert used <= (sum(acked) + 50) * 10
    assert "0 log records replayed" in d.log_path.read_text().split("state recovered")[-1][:60]


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_core_choice_is_logged(make_daemon, core):
    d = make_daemon(core=core).start()
    d.stop()
    assert f"core={core}" in d.log_path.read_text()


def test_a_second_daemon_on_the_same_data_dir_or_port_is_refused(make_daemon, tmp_path: Path):
    import sys
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
