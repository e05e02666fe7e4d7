"""The linters and the type checker pass (configured in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns  # ruff, mypy and pytest
ROOT = Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)


def test_ruff():
    r = run(sys.executable, "-m", "ruff", "check", "src", "tests", "benchmarks", "examples")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy():
    r = run(sys.executable, "-m", "mypy")
    assert r.returncode == 0, r.stdout + r.stderr


def test_layers():
    """The import contract in pyproject.toml: meterd's modules in layers, no cycles."""
    r = run(sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
            "sys.exit(lint_imports_command())")
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]


def test_benchmarks_still_run():
    r = run(sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable", "-p", "no:cacheprovider")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
