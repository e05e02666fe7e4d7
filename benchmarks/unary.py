"""Unary calls driven by h2load (nghttp2's HTTP/2 load generator, in C), so that
the client costs far less than the server it measures. A gRPC call is an
HTTP/2 POST of a length-prefixed message; h2load sends the same pre-serialised
request again and again and logs every call's latency.

Saturation: a fixed number of calls in flight. Fixed offered load: a timing
script that starts each call at its own moment; its latency counts from then.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from benchmarks.load import Run

H2LOAD = "h2load"


def available() -> str:
    """Empty when h2load can be used, else why not. Installs Debian's nghttp2-client when root."""
    if shutil.which(H2LOAD):
        return ""
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-q", "nghttp2-client"], capture_output=True, env=env,
                       timeout=600)
    return "" if shutil.which(H2LOAD) else "h2load (Debian's nghttp2-client) is not installed"


def _framed(message: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", len(message)) + message


def h2load(target: str, path: str, request: bytes, name: str, calls: int = 0, connections: int = 8,
           streams: int = 16, rate: float = 0.0, seconds: float = 5.0) -> Run:
    """One h2load run: saturation (``rate`` 0) or a fixed offered load in calls/s.

    At a fixed load each connection is its own h2load process with its own
    timing script, offset so that the calls of all connections interleave
    evenly instead of starting together in bursts."""
    work = Path(tempfile.mkdtemp(prefix="meterd-h2load-"))
    try:
        body = work / "request.bin"
        body.write_bytes(_framed(request))
        uri = f"http://{target}{path}"
        base = [H2LOAD, "-t", "1", "-H", "content-type: application/grpc", "-H", "te: trailers", "-d", str(body)]
        if rate:
            per_client = rate / connections
            n = max(1, int(per_client * seconds))
            period_ms = 1000 / per_client
            cmds = []
            for k in range(connections):
                script = work / f"timing{k}.txt"
                offset = k * period_ms / connections
                script.write_text("".join(f"{offset + i * period_ms:.3f}\t{uri}\n" for i in range(n)))
                cmds.append(base + ["-c", "1", "-m", "1000", "--timing-script-file", str(script),
                                    "--log-file", str(work / f"log{k}.txt"), uri])
        else:
            cmds = [base + ["-c", str(connections), "-m", str(streams), "-n", str(calls),
                            "--log-file", str(work / "log0.txt"), uri]]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in cmds]
        for proc in procs:
            _, err = proc.communicate(timeout=seconds * 10 + 120)
            if proc.returncode != 0:
                raise RuntimeError(f"h2load failed: {err[-500:]}")
        lines = [line.split("\t") for log in sorted(work.glob("log*.txt")) for line in log.read_text().splitlines()
                 if line]
        starts = [int(x[0]) for x in lines]
        ok = [int(x[2]) for x in lines if x[1] == "200"]
        errors = len(lines) - len(ok)
        span_s = (max(s + int(x[2]) for s, x in zip(starts, lines, strict=True)) - min(starts)) / 1e6
        lat = sorted(ok)

        def pct(q: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(q * len(lat)))] / 1000, 3) if lat else None

        detail = (f"h2load, {connections} processes of 1 connection, staggered schedules" if rate
                  else f"h2load, {connections} connections, {streams} streams each")
        return Run(name, rate or None, len(ok) / span_s, len(ok) / span_s, pct(0.5), pct(0.99), pct(0.999),
                   errors, detail, {"ok_calls": len(ok)})
    finally:
        shutil.rmtree(work, ignore_errors=True)
