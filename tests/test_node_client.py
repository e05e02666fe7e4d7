"""The Node.js example (examples/node, @grpc/grpc-js and @grpc/proto-loader from
npm) against a live daemon: it reports, resends a batch that is recognised as a
duplicate, and reads the balance."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

NODE_DIR = Path(__file__).resolve().parent.parent / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("Node.js is not installed (node and npm are needed for examples/node; CI has them)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        r = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, f"npm ci in {NODE_DIR} failed: {r.stderr[-2000:]}"
    return node


def test_the_node_client_reports_and_reads_a_balance(node, make_daemon):
    d = make_daemon().start()  # the built-in demo catalog: customer demo holds $10.00
    r = subprocess.run([node, "client.js", d.target, "demo"], cwd=NODE_DIR, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    # 1,200 gpt-4o input tokens at $2.50 per million: $0.003 of $10.00
    assert lines[0] == "Report DECISION_ALLOW cost_nano=3000000 balance_nano=9997000000"
    assert lines[1] == "ReportBatch accepted=3 duplicate=false; resent: accepted=3 duplicate=true"
    assert "balance usd 9988000000" in lines  # four events of $0.003 each, the resent batch not counted
    assert "usage input_tokens 4800" in lines


def test_the_node_client_says_why_a_call_failed(node, make_daemon):
    d = make_daemon().start()
    d.stop()  # nobody listens
    r = subprocess.run([node, "client.js", d.target, "demo"], cwd=NODE_DIR, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "meterd call failed: 14" in r.stderr  # 14 = UNAVAILABLE
