"""The deployment examples: the sidecar settings run a real daemon on a Unix
socket, the Kubernetes manifest wires the shared socket and the persistent
data directory, and systemd accepts the unit."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import free_port, wait_until

from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

DEPLOY = Path(__file__).resolve().parent.parent / "examples" / "deploy"
EXAMPLES = DEPLOY.parent


@pytest.mark.spawns
def test_the_sidecar_settings_serve_on_the_shared_unix_socket(tmp_path):
    root = tmp_path / "r"  # stands for /, so that the settings run unchanged otherwise
    settings = (DEPLOY / "meterd.toml").read_text()
    for path in ("/etc/meterd", "/var/lib/meterd", "/run/meterd"):
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        settings = settings.replace(path, str(root / path.lstrip("/")))
    settings = settings.replace('"0.0.0.0:9464"', f'"127.0.0.1:{free_port()}"')
    config = root / "etc/meterd/meterd.toml"
    config.write_text(settings)
    catalog = "\n".join(line for line in (EXAMPLES / "openai.toml").read_text().splitlines()
                        if not line.startswith("data_dir"))
    (root / "etc/meterd/catalog.toml").write_text(catalog)
    (root / "etc/meterd/secrets").mkdir()
    (root / "etc/meterd/secrets/admin.token").write_text("a-long-enough-admin-token-1234\n")
    check = subprocess.run([sys.executable, "-m", "meterd", "check-config", "--config", str(config)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([sys.executable, "-m", "meterd", "serve", "--config", str(config),
                             "--ledger", f"sqlite:///{tmp_path}/ledger.sqlite3"], stderr=subprocess.PIPE, text=True)
    socket = root / "run/meterd/meterd.sock"
    try:
        def listening() -> bool:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            return socket.exists()

        wait_until(listening, f"meterd to listen on {socket}")
        with grpc.insecure_channel(f"unix:{socket}") as ch:
            r = meter_pb2_grpc.MeterStub(ch).Report(pb.ReportRequest(event=pb.UsageEvent(
                customer_id="acme", meter="input_tokens", quantity=1000, dimensions={"model": "gpt-4o"})),
                timeout=10, wait_for_ready=True)
        assert r.decision == pb.DECISION_ALLOW  # the inference server's side of the socket
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0


def test_the_kubernetes_manifest_shares_the_socket_and_keeps_the_data():
    docs = list(yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()))
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    mounts = {name: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for name, c in containers.items()}
    settings = (DEPLOY / "meterd.toml").read_text()
    assert mounts["model"]["meterd-socket"] == mounts["meterd"]["meterd-socket"] == "/run/meterd"
    assert 'listen = "unix:/run/meterd/meterd.sock"' in settings
    assert mounts["meterd"]["meterd-data"] == "/var/lib/meterd" and 'data_dir = "/var/lib/meterd/data"' in settings
    assert mounts["meterd"]["meterd-secrets"] == "/etc/meterd/secrets/admin.token"  # the file, not a link
    assert 'admin_token_file = "/etc/meterd/secrets/admin.token"' in settings
    assert [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]] == ["meterd-data"]
    assert containers["meterd"]["args"] == ["serve", "--config", "/etc/meterd/meterd.toml"]
    assert pod["terminationGracePeriodSeconds"] > 20  # more than shutdown_grace_s: the last flush has time
    assert containers["meterd"]["readinessProbe"]["httpGet"]["port"] == "metrics"
    # Many replicas share each customer's balance through the one ledger, which the Job migrates.
    env = {e["name"]: e for e in containers["meterd"]["env"]}
    assert sts["spec"]["replicas"] > 1 and env["METERD_BALANCES"]["value"] == "ledger"
    assert env["METERD_LEDGER"]["valueFrom"]["secretKeyRef"] == {"name": "meterd-ledger", "key": "url"}
    job = next(d for d in docs if d["kind"] == "Job")
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["ledger", "migrate"]
    assert any(d["kind"] == "StatefulSet" and d["metadata"]["name"] == "ledger-db" for d in docs)


@pytest.mark.spawns
def test_systemd_accepts_the_unit(tmp_path):
    analyze, meterd = shutil.which("systemd-analyze"), shutil.which("meterd")
    if analyze is None or meterd is None:
        pytest.skip("systemd-analyze or the meterd command is not installed")
    unit = tmp_path / "meterd.service"
    unit.write_text((DEPLOY / "meterd.service").read_text().replace("/usr/local/bin/meterd", meterd))
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text()
