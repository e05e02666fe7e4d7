"""The README's tour runs as written against a live daemon."""

from __future__ import annotations

import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import free_port
from test_lifecycle import wait_serving

pytestmark = pytest.mark.spawns  # the examples and meterd serve
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


def readme_sessions() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"<!-- session: (\w+) -->\n```text\n(.*?)\n```", text, re.S)
    return {name: body.splitlines() for name, body in found}


def test_each_example_catalog_serves_the_session_the_readme_shows(tmp_path):
    sessions = readme_sessions()
    assert set(sessions) == {"openai", "cursor", "elevenlabs", "midjourney", "replicate", "hybrid"}
    for name, expected in sessions.items():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "meterd", "serve", "--config",
                                 str(ROOT / "examples" / f"{name}.toml"), "--listen", f"127.0.0.1:{port}"],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        try:
            wait_serving(f"127.0.0.1:{port}", proc)
            out = subprocess.run([sys.executable, str(ROOT / "examples" / "session.py"), name, f"127.0.0.1:{port}"],
                                 cwd=tmp_path, capture_output=True, text=True, timeout=120)
            assert out.returncode == 0, out.stderr
        finally:
            proc.terminate()
            proc.communicate(timeout=30)
        assert proc.returncode == 0
        got = out.stdout.splitlines()
        assert len(got) == len(expected), (name, got)
        for line, want in zip(got, expected, strict=True):
            if want.startswith("EndSession"):  # the time a session ran depends on the machine
                m = re.fullmatch(r"EndSession after about a second -> billed (\d+)\.(\d{3}) s, "
                                 r"cost ([\d.]+) usd", line)
                assert m and int(m[1]) >= 1, line
                millis = int(m[1]) * 1000 + int(m[2])
                assert Decimal(m[3]) == Decimal(millis * 1_525) / 10**9  # $0.001525 a second, exactly
                continue
            assert line == want, name
