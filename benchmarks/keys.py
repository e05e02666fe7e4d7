"""Remembered idempotency keys: memory and disk per key, with 10M keys in a window.

    python -m benchmarks.keys [keys]

A fresh subprocess (so that its RSS holds nothing else) opens a real LMDB store,
remembers ``keys`` keyed Report answers through the daemon's own store
(``meterd.answers.AnswerStore``, committed 256 per transaction, as busy group
commits would), then looks up 100,000 random ones as retries would. It reports,
per key:

- the growth of private memory (RssAnon: the Python heap and LMDB's dirty pages),
  which is what a remembered key costs the process;
- the growth of file-backed resident pages (RssFile: the map's pages that were
  read, which the kernel may drop at any time), and of RSS in all;
- bytes on disk.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

Progress = Callable[[str], Any]
CHUNK = 256  # keys per commit: a busy group commit
LOOKUPS = 100_000


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def _child(keys: int, path: str) -> dict:
    from meterd.answers import AnswerStore, entry_key
    from meterd.store import Store
    from meterd.v1 import meter_pb2 as pb

    store = Store(path, map_size_bytes=16 << 30, fsync=False, window_us=0, ops_max=CHUNK * 3)
    answers = AnswerStore(store, "idem", 86_400_000, keys + 1, keys + 1, "idempotency_keys_max",
                          "idempotency_keys_per_tenant_max")
    answers.load()
    response = pb.ReportResponse(decision=pb.DECISION_ALLOW, credit_type="usd", cost_nano=2_500_000,
                                 balance_nano=9_997_500_000).SerializeToString()
    digest = b"\x01" * 8
    now = int(time.time() * 1000)

    def key(i: int) -> bytes:
        return entry_key("acme", "report", f"acme-customer-{i % 100_000}", f"req-{i:012d}-{i * 7919 % 10**9:09d}")

    before = _status()
    started = time.perf_counter()
    for lo in range(0, keys, CHUNK):
        ops = []
        for i in range(lo, min(lo + CHUNK, keys)):
            ops += answers.put_ops("acme", key(i), digest, response, now)
        store.write_now(ops)
        answers.pending.clear()  # committed: what the commit's callback does
    put_s = time.perf_counter() - started
    after_put = _status()
    rng = random.Random(1)
    started = time.perf_counter()
    found = sum(answers.get(key(rng.randrange(keys)), now) is not None for _ in range(LOOKUPS))
    get_s = time.perf_counter() - started
    after_get = _status()
    if found != LOOKUPS:
        raise RuntimeError(f"only {found} of {LOOKUPS} remembered keys were found")
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    store.close()
    return {"keys": keys, "put_s": put_s, "keys_per_s": keys / put_s, "lookup_us": get_s / LOOKUPS * 1e6,
            "before": before, "after_put": after_put, "after_lookups": after_get, "disk_bytes": disk}


def remembered_keys(keys: int = 10_000_000, progress: Progress = print) -> dict:
    work = tempfile.mkdtemp(prefix="meterd-keys-")
    try:
        progress(f"keys: remembering {keys:,} idempotency keys in LMDB")
        out = subprocess.run([sys.executable, "-m", "benchmarks.keys", "--child", str(keys), work],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    b, a = r["before"], r["after_lookups"]
    r["anon_bytes_per_key"] = (a["RssAnon"] - b["RssAnon"]) / keys
    r["file_bytes_per_key"] = (a["RssFile"] - b["RssFile"]) / keys
    r["rss_bytes_per_key"] = (a["VmRSS"] - b["VmRSS"]) / keys
    r["disk_bytes_per_key"] = r["disk_bytes"] / keys
    progress(f"keys: {keys:,} in {r['put_s']:.0f}s ({r['keys_per_s']:,.0f}/s); per key: "
             f"{r['anon_bytes_per_key']:.1f} B private memory, {r['file_bytes_per_key']:.1f} B of the map resident, "
             f"{r['disk_bytes_per_key']:.0f} B on disk; a lookup takes {r['lookup_us']:.1f} us")
    return r


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        print(json.dumps(_child(int(argv[1]), argv[2])))
        return 0
    r = remembered_keys(int(argv[0]) if argv else 10_000_000)
    print(json.dumps({k: v for k, v in r.items()}, indent=2))
    print(f"private memory per remembered key: {r['anon_bytes_per_key']:.1f} B "
          f"(target 128 B: {'met' if r['anon_bytes_per_key'] <= 128 else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
