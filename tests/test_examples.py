"""The README's tour runs as written against a live daemon."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_example(make_daemon):
    d = make_daemon().start()
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), d.target],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "report: DECISION_ALLOW cost_nano 3000000 balance_nano 9997000000"
    assert lines[1] == "batch: accepted 3 denied 0 duplicate False"
    assert lines[2] == "commit: cost_nano 5120000 released_nano 35840000"
    assert lines[3].startswith("balance usd: 9.991880000")
    assert lines[4].startswith("balance premium_requests: 499.000000000")


EXAMPLE_EVENTS = {
    "openai": ("acme", "input_tokens", {"model": "gpt-4o"}),
    "cursor": ("alice", "requests", {"model": "claude-3.5-haiku"}),
    "elevenlabs": ("studio", "characters", {"model": "eleven_flash_v2_5"}),
    "midjourney": ("painter", "gpu_seconds", {"job": "turbo"}),
    "replicate": ("lab", "gpu_seconds", {"hardware": "nvidia-h100"}),
    "hybrid": ("acme", "requests", {"model": "o1"}),
}


def test_each_example_catalog_starts_with_serve_config(tmp_path):
    import grpc
    from conftest import free_port
    from test_lifecycle import wait_serving

    from meterd.v1 import meter_pb2 as pb
    from meterd.v1 import meter_pb2_grpc

    for name, (customer, meter, dims) in EXAMPLE_EVENTS.items():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "meterd", "serve", "--config",
                                 str(ROOT / "examples" / f"{name}.toml"), "--listen", f"127.0.0.1:{port}"],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            wait_serving(f"127.0.0.1:{port}", proc)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                r = meter_pb2_grpc.MeterStub(ch).Report(pb.ReportRequest(event=pb.UsageEvent(
                    customer_id=customer, meter=meter, quantity=1, dimensions=dims)))
            assert r.decision == pb.DECISION_ALLOW, (name, r)
            assert (tmp_path / "meterd-data" / name).is_dir()  # each example keeps its own data
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        assert proc.returncode == 0
