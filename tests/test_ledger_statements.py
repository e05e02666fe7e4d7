"""Local mode and ledger mode give the same statements: the same history of events, sent to one
sidecar in local mode and spread over four sidecars in ledger mode, on the example catalogs
whose plans ledger mode serves, yields the same decisions and the same statements to the
nano-unit, period after period: four credit periods (three boundaries), with usage past the
included credits (rollover, overage by tier, early bills, a spend limit, the Relax fallback,
arrears), an upgrade, a downgrade and a cancel.

Left out: the hybrid catalog as shipped (its plan's free GPU hour: free units of a meter other
than a gauge are refused in ledger mode; test_ledger_gauges.py runs it without them)."""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from billing import ROOT, START_MS, Billing
from conftest import async_wait_until

from meterd.clock import ManualClock
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import LedgerPlans
from meterd.v1 import meter_pb2 as pb

SIDECARS = 4


@dataclass(frozen=True)
class Scenario:
    catalog: str
    plan: str                 # subscribed first
    bigger: str               # upgraded to in the second period, downgraded from in the third ('': none)
    meter: str
    dims: dict
    quantity: int             # of each event
    events: int               # per period: enough to spend past the included credits
    shows: frozenset          # entry kinds (and "denied") the history must make in local mode
    seeded: bool = False      # the catalog's own customer acme is on the plan from the start


SCENARIOS = [
    # Premium requests with the slow fallback; then overage up to a spend limit, billed early at it.
    Scenario("cursor", "pro", "pro_usage_based", "requests", {"model": "claude-3.5-sonnet"}, 10,
             110,
             frozenset({"degraded", "overage_charged"})),
    # Credits with rollover within caps, then overage by the 1,000 with an early bill.
    Scenario("elevenlabs", "creator", "pro", "characters", {"model": "eleven_multilingual_v2"}, 5_000,
             60,
             frozenset({"rolled_over", "overage_charged"})),
    # Fast hours, then Relax with its priority hint.
    Scenario("midjourney", "standard", "pro", "gpu_seconds", {"job": "image"}, 1_000, 70, frozenset({"degraded"})),
    # Usage billed in arrears at the period's end.
    Scenario("replicate", "arrears", "", "gpu_seconds", {"hardware": "nvidia-t4"}, 3_600, 20,
             frozenset({"usage_billed"})),
    # Premium requests with no overage allowed (a spend limit of $0): denied past the included.
    Scenario("copilot", "pro", "pro_plus", "chat_requests", {"model": "claude-3.5-sonnet"}, 5, 80,
             frozenset({"denied"})),
    # Prepaid dollars (the catalog's $10): a top-up asked for below $5, denied once spent.
    Scenario("openai", "prepaid", "", "input_tokens", {"model": "gpt-4o"}, 100_000, 24,
             frozenset({"auto_topup_requested", "denied"}), seeded=True),
]


class Both:
    """One local-mode sidecar, and four ledger-mode sidecars (heartbeats running) on one ledger,
    on the same catalog and the same time."""

    def __init__(self, tmp: Path, catalog: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock(START_MS)
        self.ledger_url = ledger_url
        self.local = Billing(tmp / "local", str(catalog), monkeypatch, loop=self.loop, clock=ManualClock(START_MS))
        self.nodes = [Billing(tmp / f"s{i}", str(catalog), monkeypatch, ledger=ledger_url, sidecar_id=f"s{i}",
                              balances="ledger", loop=self.loop, clock=self.clock, lease_heartbeat_ms=20,
                              lease_wait_ms=5_000) for i in range(SIDECARS)]
        self.stops = [asyncio.Event() for _ in self.nodes]
        self.beats = [self.loop.create_task(n.engine.leases.run(s)) for n, s in zip(self.nodes, self.stops,
                                                                                     strict=True)]
        self.sent = 0
        # The catalog's customers are subscribed to their plans at the start: local mode at once, the
        # ledger by the first sidecar's first heartbeat (at the same time here).
        self.loop.run_until_complete(async_wait_until(
            lambda: not any(n.engine.leases.seed_plans or n.engine.leases.seeds for n in self.nodes),
            "the catalog's customers subscribed in the ledger"))

    def close(self) -> None:
        for stop in self.stops:
            stop.set()
        self.loop.run_until_complete(asyncio.gather(*self.beats))
        for node in [*self.nodes, self.local]:
            node.close()
        self.loop.close()

    def set_time(self, ms: int) -> None:
        self.clock.ms = ms
        self.local.now_ms = ms
        self.local.tick()

    def events(self, s: Scenario, n: int) -> list[tuple[int, int, str]]:
        """``n`` events, each to the local sidecar and to the next ledger-mode sidecar in turn:
        (decision, cost, mode) of each, local then ledger. Every ten, the sidecars flush, as their
        flush timer would: the ledger has what they spent (an early bill, a cancel, see it)."""
        out = []
        for i in range(n):
            node = self.nodes[self.sent % SIDECARS]
            self.sent += 1
            for x in (self.local, node):
                r = x.report("acme", s.meter, s.quantity, **s.dims)
                out.append((r.decision, r.cost_nano, r.mode))
            if i % 10 == 9 or i == n - 1:
                self.settle()
        return out

    def settle(self) -> None:
        """The sidecars' flushes, then a heartbeat's sweep of early bills (README: they lag by a
        flush and a heartbeat)."""
        for x in [self.local, *self.nodes]:
            x.flush()

        def swept() -> bool:
            with Ledger(self.ledger_url) as lg:
                (n,), = lg._rows("SELECT COUNT(*) FROM meterd_overage_spent")
                return int(n) == 0
        self.loop.run_until_complete(async_wait_until(swept, "the sweep of early bills"))

    def both(self, call: str, *args: object) -> None:
        """An Admin call: on the local sidecar, and on one ledger-mode sidecar (it commits centrally).
        Sidecars that knew the customer's balance spent ask the ledger again after a heartbeat (the
        lag README's Many sidecars states): the history goes on after that."""
        getattr(self.local, call)(*args)
        getattr(self.nodes[self.sent % SIDECARS], call)(*args)
        self._asked_again()

    def _asked_again(self) -> None:
        def done() -> bool:
            return all(h.exhausted_until <= n.clock.monotonic() for n in self.nodes
                       for (c, _), h in n.engine.leases.held.items() if c == "acme")
        self.loop.run_until_complete(async_wait_until(done, "the sidecars to ask the ledger again"))

    def subscription(self) -> object:
        with Ledger(self.ledger_url) as lg:
            return LedgerPlans(Escrow(lg), self.nodes[0].catalog).subscription("acme")

    def boundary(self) -> None:
        """Past the credit period's end: local mode rolls it at its tick, the sidecars settle their
        leases at their heartbeats and the last one rolls it in the ledger."""
        sub = self.subscription()
        assert sub is not None
        n = sub.n
        self.set_time(sub.end_ms + 1)
        self.loop.run_until_complete(async_wait_until(lambda: self.subscription().n == n + 1, "the period's roll"))
        self._asked_again()

    def rolled_all(self) -> bool:
        with Ledger(self.ledger_url) as lg:
            return not LedgerPlans(Escrow(lg), self.nodes[0].catalog).due(self.clock.ms, 1)

    def degraded_audited(self) -> bool:
        with Ledger(self.ledger_url) as lg:
            (n,), = lg._rows("SELECT COUNT(*) FROM meterd_balances WHERE degraded_nano > 0")
            return int(n) == 0

    def flush(self) -> None:
        async def give_back() -> None:
            await asyncio.gather(*(n.engine.leases.return_all() for n in self.nodes))
        self.loop.run_until_complete(give_back())
        for x in [self.local, *self.nodes]:
            x.flush()


GRANT_ID = re.compile(r"\b(g_[0-9]+|G[0-9]+)\b")


def _statement(x: Billing, period: str, customer: str = "acme") -> dict:
    """A statement, with grant ids (the ledger numbers its own) as '#', and its forfeits summed per
    credit type: what sidecars' leases held of the credits when the subscription ended is forfeited
    as each gives it back (an "expired" entry each), where local mode forfeits bucket by bucket at
    once. Every figure of lines, totals and balances is compared as it is."""
    st = json.loads(GRANT_ID.sub("#", json.dumps(x.statement(customer, period))))
    activity, forfeited = [], {}
    for a in st["activity"]:
        if a["section"] == "rollovers" and a["description"].startswith("forfeited"):
            forfeited[a["credit_type"]] = forfeited.get(a["credit_type"], 0) + a["amount_nano"]
        else:
            activity.append(a)
    st["activity"] = activity + [{"forfeited": ct, "amount_nano": n} for ct, n in sorted(forfeited.items())]
    return {k: st[k] for k in ("label", "from_ms", "to_ms", "lines", "totals", "balances", "activity")}


@pytest.mark.parametrize("s", SCENARIOS, ids=[s.catalog for s in SCENARIOS])
def test_local_and_ledger_mode_give_the_same_statements(s, tmp_path, monkeypatch, ledger_url):
    catalog = ROOT / "examples" / f"{s.catalog}.toml"  # with its customers, each on a plan
    both = Both(tmp_path, catalog, ledger_url, monkeypatch)
    try:
        if not s.seeded:
            both.both("subscribe", "acme", s.plan)
        decisions = both.events(s, s.events)                       # period 1, past its included credits
        both.boundary()
        decisions += both.events(s, s.events // 2)                  # period 2: an upgrade midway
        if s.bigger:
            both.set_time(both.clock.ms + 86_400_000)
            both.both("change_plan", "acme", s.bigger)
        decisions += both.events(s, s.events)
        both.boundary()
        if s.bigger:                                               # period 3: a downgrade, at its end
            both.both("change_plan", "acme", s.plan)
        decisions += both.events(s, s.events // 3)                  # little used: credits roll over
        both.boundary()
        decisions += both.events(s, s.events)                       # period 4, then a cancel midway
        both.set_time(both.clock.ms + 3 * 86_400_000)
        both.both("cancel", "acme")
        # The sidecars answer the cancel's recall at their heartbeats; then it bills and ends.
        both.loop.run_until_complete(async_wait_until(lambda: both.subscription() is None, "the cancel's end"))
        local, ledger = decisions[0::2], decisions[1::2]
        assert ledger == local
        denied = {"denied"} if (pb.DECISION_DENY, 0, "") in local else set()
        made = {e.kind for e in both.local.audit("acme")} | denied
        assert s.shows <= made  # the history went past the included credits the way the scenario says
        both.flush()
        # What the sidecars settled of the fallback after the cancel is audited at a heartbeat.
        both.loop.run_until_complete(async_wait_until(both.degraded_audited, "the fallback usage audited"))
        periods = ["2026-01", "2026-02", "2026-03", "2026-04", "2026-05", "billing", "billing-1", "billing-2",
                   "billing-3"]
        for period in periods:
            assert _statement(both.nodes[0], period) == _statement(both.local, period), period
        # The catalog's customers, subscribed at the start and idle since: the same periods rolled,
        # with the same rollovers, forfeits and fees.
        both.loop.run_until_complete(async_wait_until(both.rolled_all, "every ended period rolled"))
        seeded = [c.customer_id for c in both.local.catalog.customers if c.plan and c.customer_id != "acme"]
        assert seeded or s.seeded  # (the history's own customer, when it is the catalog's, was compared above)
        for customer in seeded:
            with Ledger(ledger_url) as lg:  # subscribed from the start, in the ledger too
                sub = LedgerPlans(Escrow(lg), both.local.catalog).subscription(customer)
                assert sub is not None and sub.plan == both.local.catalog.customer_index[customer].plan, customer
            for period in periods:
                assert _statement(both.nodes[0], period, customer) == _statement(both.local, period, customer), \
                    (customer, period)
        with Ledger(ledger_url) as lg:
            assert Escrow(lg).check() == []
    finally:
        both.close()
