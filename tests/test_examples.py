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
