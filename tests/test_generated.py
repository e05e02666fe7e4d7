"""The checked-in protobuf and gRPC code is exactly what proto/ generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.spawns  # protoc
ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_proto(tmp_path: Path):
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos], cwd=ROOT, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated, "protoc produced nothing"
    for rel in generated:
        checked_in = ROOT / "src" / rel
        assert checked_in.exists(), f"{rel} is generated but not checked in; run scripts/generate-proto"
        assert checked_in.read_bytes() == (tmp_path / rel).read_bytes(), \
            f"src/{rel} differs from what proto/ generates; run scripts/generate-proto"
