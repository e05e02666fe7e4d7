"""Two commits side by side: the core's apply_batch (compiled and its twin) and a durable
ReportBatch run against a daemon, as interleaved trials (A B, B A, ...), so that a change can
be shown not to regress a hot path on a noisy machine.

    python -m benchmarks.compare REV [--trials 5] [--seconds 4]

REV is built in a temporary work tree (``git worktree``), the work tree of this checkout
is the other side; both are driven by this checkout's harness (benchmarks/). Each figure
is reported as the median and the min-max of the per-pair ratios, with a verdict only
when the whole spread is on one side of 1.0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MICRO = r'''
import json
from benchmarks import micro
data = micro.batch()
out = {}
for kind in ("compiled", "python"):
    core = micro.make(kind)
    out[kind] = micro.best(lambda: core.apply_batch(data), 5 if kind == "compiled" else 2)
import meterd
out["file"] = meterd.__file__
print(json.dumps(out))
'''

INGEST = r'''
import json, sys
from benchmarks.load import Server, drive
with Server("meterd") as s:
    r = drive(s.target, "ReportBatch", batch=1000, seconds=float(sys.argv[1]))
import meterd
print(json.dumps({"events_per_s": r.events_per_s, "file": meterd.__file__}))
'''


def build(tree: Path) -> None:
    """The compiled core of a work tree, in place."""
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run(tree: Path, code: str, *args: str) -> dict:
    """One trial of a work tree's meterd (its sources and compiled core first on the path),
    driven by this checkout's benchmark harness, the same for both sides."""
    env = dict(os.environ, PYTHONPATH=f"{tree / 'src'}{os.pathsep}{ROOT}")
    env.pop("METERD_NO_EXTENSIONS", None)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=900)
    if out.returncode:
        raise SystemExit(f"a trial in {tree} failed:\n{out.stderr[-3000:]}")
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    if not doc.pop("file").startswith(str(tree)):
        raise SystemExit(f"a trial in {tree} imported meterd from elsewhere")
    return doc


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def verdict(ratios: list[float]) -> str:
    """Faster or slower only when every pair says so; else unstable."""
    if min(ratios) > 1.0:
        return "faster"
    if max(ratios) < 1.0:
        return "slower"
    return "unstable"


def compare(other: Path, here: Path, trials: int, seconds: float) -> dict:
    sides = {"other": other, "here": here}
    raw: dict[str, dict[str, list[float]]] = {name: {"twin_over_compiled": [], "apply_batch_s": [],
                                                     "ingest_events_per_s": []} for name in sides}
    for i in range(trials):
        order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
        for name, tree in order:
            m = run(tree, MICRO)
            raw[name]["twin_over_compiled"].append(m["python"] / m["compiled"])
            raw[name]["apply_batch_s"].append(m["compiled"])
            raw[name]["ingest_events_per_s"].append(run(tree, INGEST, str(seconds))["events_per_s"])
            print(f"trial {i} {name}: twin/compiled {raw[name]['twin_over_compiled'][-1]:.1f}x, apply_batch "
                  f"{raw[name]['apply_batch_s'][-1] * 1e3:.2f} ms, ReportBatch "
                  f"{raw[name]['ingest_events_per_s'][-1]:,.0f} events/s", flush=True)
    apply = [o / h for o, h in zip(raw["other"]["apply_batch_s"], raw["here"]["apply_batch_s"], strict=True)]
    ingest = [h / o for o, h in zip(raw["other"]["ingest_events_per_s"], raw["here"]["ingest_events_per_s"],
                                    strict=True)]
    return {"trials": trials, "raw": raw,
            "twin_over_compiled": {name: spread(v["twin_over_compiled"]) for name, v in raw.items()},
            "apply_batch_here_speed_over_other": {**spread(apply), "verdict": verdict(apply)},
            "report_batch_here_over_other": {**spread(ingest), "verdict": verdict(ingest)}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare this work tree with")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials of each side (default 5)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each ReportBatch run (default 4)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="meterd-compare-"))
    other = work / "tree"
    try:
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), args.rev], cwd=ROOT, check=True)
        build(other)
        build(ROOT)
        result = compare(other, ROOT, args.trials, args.seconds)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
