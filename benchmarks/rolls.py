"""Period rolls in ledger mode, measured: N customers on a plan in one PostgreSQL ledger, all
with the same boundary (the worst case: a month that starts for everyone at once), rolled by
C callers on their own connections (as C sidecars' sweeps would), each rolling a few due
customers at a time (``LedgerPlans.roll_due``). Each customer has spent into its overage, so
each roll does all its work: rollover within caps, forfeit, overage by tier, the next period's
credits, allowance and fee.

Reports the time to subscribe them all, the time to roll them all and the rolls per second,
per caller count, and checks that each period was rolled exactly once and that the escrow
figures still add up.

Run: ``python -m benchmarks.rolls [--customers 100000] [--callers 1,2,4]``; it starts a
private PostgreSQL (scripts/postgres-test-server) unless ``METERD_TEST_POSTGRES_URL`` is set.
The effect of a roll storm on the hot path of a running sidecar is ``python -m benchmarks.ledger
--only roll_storm``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

from meterd.catalog import load_catalog
from meterd.escrow import Escrow
from meterd.ledger import Ledger, Settlement
from meterd.ledger_plans import LedgerPlans

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "scripts" / "postgres-test-server"
NANO = 10**9
START_MS = 1_769_817_600_000  # 2026-01-31
MONTH_MS = 31 * 86_400_000
CATALOG = """
[credit_types.usd]
kind = "fiat"
[credit_types.credits]
kind = "custom"
[meters.spend]
credit_type = "credits"
price = "0.000000001"
[plans.basic]
fee = { usd = "10" }
[plans.basic.credits.credits]
included = "100"
rollover = { max_percent = 50, max_count = 2, lifetime_periods = 2, max = "40" }
overage = { price_in = "usd", limit = "50", tiers = [{ up_to = "20", price = "0.5" }, { price = "0.25" }] }
"""


def _parallel(callers: int, work: list[str], job) -> float:
    """Run ``job(ledger_plans, customer)`` over ``work`` on ``callers`` connections; the seconds it took."""
    chunks = [work[i::callers] for i in range(callers)]
    errors: list[BaseException] = []

    def run(chunk: list[str]) -> None:
        with Ledger(url) as lg:
            plans = LedgerPlans(Escrow(lg), catalog)
            try:
                for customer in chunk:
                    job(plans, customer)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
    threads = [threading.Thread(target=run, args=(c,)) for c in chunks]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - t0


def _subscribe(plans: LedgerPlans, customer: str) -> None:
    plans.subscribe(customer, "basic", START_MS, START_MS)
    e = plans.escrow
    got = e.acquire("bench", "i1", customer, "credits", 130 * NANO, 130 * NANO, 1, START_MS + 1)
    e.settle("bench", "i1", [Settlement(customer, "credits", 130 * NANO)], START_MS + 1)
    if got.amount_nano > 130 * NANO:
        e.give_back("bench", "i1", customer, "credits", got.amount_nano - 130 * NANO, START_MS + 1)


def _sweep(callers: int, boundary: int) -> tuple[float, int]:
    done = [0]
    lock = threading.Lock()

    def run() -> None:
        with Ledger(url) as lg:
            plans = LedgerPlans(Escrow(lg), catalog)
            while n := plans.roll_due(boundary, 20):
                with lock:
                    done[0] += n
    threads = [threading.Thread(target=run) for _ in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, done[0]


def main() -> None:
    global url, catalog
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--customers", type=int, default=100_000)
    ap.add_argument("--callers", default="1,2,4", help="caller counts, one roll of every customer each")
    ap.add_argument("--json", default="", help="write the results here too")
    args = ap.parse_args()
    callers = [int(c) for c in args.callers.split(",")]
    with tempfile.TemporaryDirectory(prefix="meterd-rolls-") as tmp:
        (Path(tmp) / "plans.toml").write_text(CATALOG)
        catalog = load_catalog(str(Path(tmp) / "plans.toml"))
        server_dir = ""
        base = os.environ.get("METERD_TEST_POSTGRES_URL", "")
        if not base:
            server_dir = tempfile.mkdtemp(prefix="meterd-rolls-pg-", dir="/tmp")
            base = subprocess.run([str(SERVER), "start", server_dir], capture_output=True, text=True, check=True,
                                  stdin=subprocess.DEVNULL).stdout.strip().splitlines()[-1]
        try:
            results = []
            for c in callers:
                name = "rolls_" + uuid.uuid4().hex[:8]
                subprocess.run(["psql", "-X", "-q", "-d", base, "-c", f"CREATE DATABASE {name}"], check=True,
                               capture_output=True)
                url = base.rsplit("/", 1)[0] + "/" + name
                with Ledger(url) as lg:
                    lg.migrate()
                customers = [f"c{i:07d}" for i in range(args.customers)]
                setup_s = _parallel(max(callers), customers, _subscribe)
                seconds, rolled = _sweep(c, START_MS + MONTH_MS)
                with Ledger(url) as lg:
                    (rolls,), = lg._rows("SELECT COUNT(*) FROM meterd_rolls")
                    problems = Escrow(lg).check()
                ok = rolled == args.customers == int(rolls) and not problems
                r = {"customers": args.customers, "callers": c, "subscribe_s": round(setup_s, 1),
                     "roll_s": round(seconds, 1), "rolls_per_s": round(rolled / seconds), "exact": ok}
                print(json.dumps(r), flush=True)
                results.append(r)
                subprocess.run(["psql", "-X", "-q", "-d", base, "-c", f"DROP DATABASE {name}"], capture_output=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
        finally:
            if server_dir:
                subprocess.run([str(SERVER), "stop", server_dir], capture_output=True)


url = ""
catalog = None  # type: ignore[assignment]

if __name__ == "__main__":
    main()
