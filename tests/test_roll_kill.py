"""A process running period rolls, killed with SIGKILL at random points inside them: the next
one to sweep completes every roll exactly once, with the entries an unbroken run makes.

The rolls are the sweep every sidecar's heartbeat runs (``LedgerPlans.roll_due``), in a child
process of its own on the ledger (its own connection), as in a sidecar's lease thread; the
test kills it once it has rolled a random number of customers, so that the kill lands in the
middle of the next customer's roll transaction or between two."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

from billing import NANO, START_MS
from test_ledger_plans import CATALOG

from meterd.catalog import load_catalog
from meterd.escrow import Escrow
from meterd.ledger import Ledger, Settlement
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans

CUSTOMERS = 40
KILLS = 4

SWEEP = """
import sys
from meterd.catalog import load_catalog
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import LedgerPlans
url, catalog, now = sys.argv[1], sys.argv[2], int(sys.argv[3])
plans = LedgerPlans(Escrow(Ledger(url)), load_catalog(catalog))
while plans.roll_due(now, 1):  # one customer's roll per transaction, as a heartbeat's sweep does
    print("rolled", flush=True)
print("done", flush=True)
"""


def _history(url: str, catalog: str) -> int:
    """CUSTOMERS subscribed, each with its own spending (overage for some, rollover for others);
    returns a time after which every first period is due."""
    rng = random.Random(7)
    with Ledger(url) as lg:
        lg.migrate()
        escrow = Escrow(lg)
        plans = LedgerPlans(escrow, load_catalog(catalog))
        for i in range(CUSTOMERS):
            c = f"c{i:03d}"
            plans.subscribe(c, "basic", START_MS, START_MS)
            spend = rng.randrange(0, 150) * NANO  # of 100 included, and up to 50 of overage
            if spend:
                got = escrow.acquire("s1", "i1", c, "credits", spend, spend, 1, START_MS + 1)
                escrow.settle("s1", "i1", [Settlement(c, "credits", spend)], START_MS + 1)
                escrow.give_back("s1", "i1", c, "credits", got.amount_nano - spend, START_MS + 2, spend)
        end = plans.subscription("c000").end_ms
    return end + PERIOD_CLOSE_GRACE_MS + 1


def _entries(url: str) -> list[tuple]:
    with Ledger(url) as lg:
        return sorted((e.customer_id, e.kind, e.credit_type, e.amount_nano, e.balance_before_nano,
                       e.balance_after_nano, e.charge_nano, e.reference)
                      for c in range(CUSTOMERS) for e in lg.entries(f"c{c:03d}"))


def _sweep(url: str, catalog: str, now: int, kill_after: int | None) -> int:
    """The sweep in a child process; with ``kill_after``, SIGKILLed once it has rolled that many.
    Returns how many it rolled (that it said it had)."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent / "src"))
    child = subprocess.Popen([sys.executable, "-c", SWEEP, url, catalog, str(now)], stdout=subprocess.PIPE,
                             text=True, env=env)
    assert child.stdout is not None
    rolled = 0
    for line in child.stdout:
        if line.startswith("rolled"):
            rolled += 1
            if kill_after is not None and rolled >= kill_after:
                child.send_signal(signal.SIGKILL)
                break
    child.wait(timeout=120)
    return rolled


def test_a_roll_killed_midway_is_completed_once_by_the_next_sweep(tmp_path, ledger_url):
    catalog = tmp_path / "plans.toml"
    catalog.write_text(CATALOG)
    # The reference: the same history rolled without a kill, on a ledger of its own.
    reference = f"sqlite:///{tmp_path}/reference.db"
    due = _history(reference, str(catalog))
    assert _sweep(reference, str(catalog), due, None) == CUSTOMERS
    assert _history(ledger_url, str(catalog)) == due
    rng = random.Random(11)
    left = CUSTOMERS
    for _ in range(KILLS):
        left -= _sweep(ledger_url, str(catalog), due, rng.randrange(1, max(left // KILLS, 2)))
    with Ledger(ledger_url) as lg:
        (before,), = lg._rows("SELECT COUNT(*) FROM meterd_rolls")
    assert 0 < int(before) < CUSTOMERS  # the kills left rolls undone
    _sweep(ledger_url, str(catalog), due, None)  # the next sweep
    with Ledger(ledger_url) as lg:
        (rolls,), = lg._rows("SELECT COUNT(*) FROM meterd_rolls")
        assert int(rolls) == CUSTOMERS  # each period rolled once
        plans = LedgerPlans(Escrow(lg), load_catalog(str(catalog)))
        assert {plans.subscription(f"c{i:03d}").n for i in range(CUSTOMERS)} == {1}
        assert Escrow(lg).check() == []
    ledger_entries, reference_entries = _entries(ledger_url), _entries(reference)
    assert ledger_entries == reference_entries  # the same entries an unbroken sweep made, none twice
    assert sum(1 for e in ledger_entries if e[1] == "fee") == 2 * CUSTOMERS
