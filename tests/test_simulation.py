"""A deterministic simulation of ledger mode: one ledger, N sidecars (real engines on
real LMDB, in one process and one event loop), clients, and faults: kills, lost
requests and lost answers between sidecars and the ledger, ledger outages and
clock skew. Every history is seeded; the same seed replays the same history.

Customer "p" is on a plan kept in the ledger (its period's credits and overage
allowance leased like any credit), and the clocks jump past its period boundaries:
each period is rolled exactly once (never skipped), from what was settled.

After every step it checks the conservation equation in the ledger, that nothing
was overdrawn (zero overspend) beyond what a customer's outage allowance permits
(the allowance times the number of sidecars), and that no sidecar's lease went
below zero; at the end, with the faults healed, that every lease was settled or
given back and that the ledger's consumption is exactly what the clients were
told they spent.

    pytest tests/test_simulation.py                    # a bounded number of seeds (CI)
    METERD_SOAK=1 pytest tests/test_simulation.py      # thousands
    METERD_SIM_SEED=1234 pytest tests/test_simulation.py -k replay   # one seed again, with its history
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest
from billing import Billing
from test_leases import CATALOG

from meterd.catalog import load_catalog
from meterd.clock import ManualClock
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.v1 import meter_pb2 as pb

SEEDS = range(2000) if os.environ.get("METERD_SOAK") else range(12)
STEPS = 160
T0 = 1_800_000_000_000
CUSTOMERS = ("a", "b", "p")
PLAN = """
[plans.sim]
fee = { usd = "1.00" }
[plans.sim.credits.usd]
included = "0.05"
rollover = { max_percent = 50 }
overage = { price_in = "usd", limit = "0.02", price = "1" }

[plans.sim_plus]
fee = { usd = "2.00" }
[plans.sim_plus.credits.usd]
included = "0.08"
rollover = { max_percent = 50 }
overage = { price_in = "usd", limit = "0.03", price = "1" }
fallback = "relax"
"""
OVERAGE_LIMIT_NANO = 30_000_000  # the larger plan's
PER_TOKEN_NANO = 2_500  # $2.50 per 1M tokens
SETTINGS = {"lease_heartbeat_ms": 100, "lease_wait_ms": 2000, "lease_idle_s": 5.0, "lease_refill_horizon_s": 10.0,
            "lease_low_water_s": 2.0, "reservation_ttl_s": 5}


class SimClock(ManualClock):
    """Wall time moved by the simulation; monotonic time moved only by the waits it is asked for."""

    def __init__(self, ms: int) -> None:
        super().__init__(ms)
        self.mono = 0.0

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        self.mono += seconds
        await asyncio.sleep(0)


class Faults:
    """Between sidecars and the ledger: requests lost (nothing done), answers lost (done, not told),
    and outages. Each draw is a function of the seed, the step and the call's number within it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.step = 0
        self.calls = 0
        self.outage = False
        self.on = True
        self.lost = 0

    def wrap(self, link: Any) -> None:
        real = link.call

        async def call(fn: Any, *args: Any) -> Any:
            self.calls += 1
            draw = random.Random(f"{self.seed}:{self.step}:{self.calls}").random()
            if self.on and self.outage:
                raise ConnectionError("the ledger is away (simulated)")
            if self.on and draw < 0.04:
                self.lost += 1
                raise ConnectionError("the request was lost (simulated)")
            out = await real(fn, *args)
            if self.on and draw > 0.96:
                self.lost += 1
                raise TimeoutError("the answer was lost (simulated)")
            return out
        link.call = call


class Simulation:
    def __init__(self, seed: int, tmp: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.url = ledger_url
        self.loop = asyncio.new_event_loop()
        self.faults = Faults(seed)
        self.history: list[str] = []
        tmp.mkdir(parents=True, exist_ok=True)
        catalog = tmp / "catalog.toml"
        catalog.write_text(CATALOG + PLAN)
        with Ledger(ledger_url) as lg:
            lg.migrate()
        self.ledger = Ledger(ledger_url)
        self.escrow = Escrow(self.ledger)
        n = self.rng.choice((2, 3, 4))
        core = self.rng.choice(("compiled", "python"))
        self.clocks = [SimClock(T0 + self.rng.randint(-2_000, 2_000)) for _ in range(n)]  # skewed
        self.nodes = [Billing(tmp / f"s{i}", str(catalog), monkeypatch, core=core, ledger=ledger_url,
                              sidecar_id=f"s{i}", balances="ledger", loop=self.loop, clock=self.clocks[i], **SETTINGS)
                      for i in range(n)]
        for node in self.nodes:
            self._wrap(node)
        # Customer "b" may have an outage allowance: each sidecar may spend that much beyond its lease.
        self.allowance = {"a": 0, "b": self.rng.choice((0, 0, 1_000, 5_000)) * PER_TOKEN_NANO, "p": 0}
        for customer, amount in self.allowance.items():
            if amount:
                self.escrow.set_allowance(customer, "usd", amount, T0)
        self.granted = dict.fromkeys(CUSTOMERS, 0)   # what the operator granted, less what it took away
        self.spent = dict.fromkeys(CUSTOMERS, 0)     # what clients were told they spent
        self.open: list[tuple[int, str, str, int]] = []  # reservations: sidecar, id, customer, reserved
        self.keys = 0
        self.plans = LedgerPlans(self.escrow, load_catalog(str(catalog)))
        self.plans.subscribe("p", "sim", T0, T0)
        self.skews = [c.ms - T0 for c in self.clocks]

    def _wrap(self, node: Billing) -> None:
        self.faults.wrap(node.engine.leases.link)
        self.faults.wrap(node.engine.flusher.link)

    def note(self, text: str) -> None:
        self.history.append(f"{self.faults.step}: {text}")

    def call(self, node: Billing, coro: Any) -> Any:
        """A call as the server makes it: a failure is undone and reported."""
        try:
            return node.run(coro)
        except Exception as e:  # noqa: BLE001 - a refused call is part of the history
            self.note(f"  -> {type(e).__name__}: {str(e)[:80]}")
            return None

    # ---- steps ----------------------------------------------------------------------

    def step(self) -> None:
        rng = self.rng
        i = rng.randrange(len(self.nodes))
        node = self.nodes[i]
        what = rng.choices(("report", "batch", "authorize", "settle", "beat", "flush", "advance", "sweep", "kill",
                            "restart", "outage", "grant", "adjust", "boundary", "change"),
                           (30, 15, 10, 10, 18, 5, 6, 3, 2, 1, 2, 4, 1, 2, 1))[0]
        customer = rng.choice(CUSTOMERS)
        tokens = rng.choice((100, 1_000, 4_000, 20_000))
        self.note(f"{what} at s{i} ({customer}, {tokens})")
        getattr(self, "_" + what)(i, node, customer, tokens)

    def _event(self, customer: str, tokens: int) -> pb.UsageEvent:
        return pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=tokens,
                             dimensions={"model": "gpt-4o"})

    def _report(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        data = pb.ReportRequest(event=self._event(customer, tokens)).SerializeToString()
        out = self.call(node, node.engine.report(data))
        if out is not None:
            r = pb.ReportResponse.FromString(out)
            if r.decision == pb.DECISION_ALLOW:
                assert r.cost_nano == tokens * PER_TOKEN_NANO
                self.spent[customer] += r.cost_nano
            elif r.decision == pb.DECISION_DEGRADE:  # sim_plus's fallback: nothing charged
                assert (customer, r.mode, r.cost_nano) == ("p", "relax", 0)

    def _batch(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        events = [self._event(self.rng.choice(CUSTOMERS), self.rng.choice((100, 1_000, 4_000)))
                  for _ in range(self.rng.randint(1, 5))]
        data = pb.ReportBatchRequest(events=events, details=True).SerializeToString()
        out = self.call(node, node.engine.report_batch(data))
        if out is not None:
            r = pb.ReportBatchResponse.FromString(out)
            assert len(r.results) == len(events) and r.accepted + r.denied == len(events)
            for e, res in zip(events, r.results, strict=True):
                if res.decision == pb.DECISION_ALLOW:
                    self.spent[e.customer_id] += res.cost_nano
                elif res.decision == pb.DECISION_DEGRADE:
                    assert (e.customer_id, res.mode, res.cost_nano) == ("p", "relax", 0)

    def _authorize(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        from meterd import wire
        req = pb.AuthorizeRequest(customer_id=customer, meter="input_tokens", quantity=tokens,
                                  dimensions={"model": "gpt-4o"})
        out = self.call(node, wire.authorize(node.engine, req))
        if out is not None:
            a = pb.AuthorizeResponse.FromString(out)
            if a.decision == pb.DECISION_ALLOW:
                self.open.append((i, a.reservation_id, customer, tokens))

    def _settle(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        if not self.open:
            return
        j, rid, cust, reserved = self.open.pop(self.rng.randrange(len(self.open)))
        holder = self.nodes[j]
        from meterd import wire
        if self.rng.random() < 0.7:
            used = self.rng.randint(0, reserved)
            out = self.call(holder, wire.commit(holder.engine, pb.CommitRequest(reservation_id=rid, quantity=used)))
            if out is not None:
                c = pb.CommitResponse.FromString(out)
                self.spent[cust] += c.cost_nano
        else:
            self.call(holder, wire.release(holder.engine, pb.ReleaseRequest(reservation_id=rid)))

    def _beat(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        self.call(node, node.engine.leases.beat())

    def _flush(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        self.call(node, node.engine.flush_once())

    def _advance(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        ms = self.rng.choice((10, 200, 1_000, 3_000, 7_000))
        for clock in self.clocks:
            clock.advance(ms)

    def _boundary(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        """Every clock jumps to just past the plan customer's period boundary (as the ledger's
        callers count it), each off by its own skew."""
        sub = self.plans.subscription("p")
        assert sub is not None
        ms = sub.end_ms - (self.clocks[0].ms - self.skews[0]) + self.rng.randint(1, 3_000)
        for clock in self.clocks:
            clock.advance(max(ms, 0))

    def _change(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        """p moves to the other plan (an upgrade at once, a downgrade at its period's end), through a
        sidecar's Admin; the ledger may be away (refused, nothing done)."""
        sub = self.plans.subscription("p")
        assert sub is not None
        other = "sim" if (sub.next_plan or sub.plan) == "sim_plus" else "sim_plus"
        self.call(node, node.engine.admin.change_plan("p", other))

    def _sweep(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        self.call(node, node.engine.sweep())
        self._forget_expired(i)

    def _forget_expired(self, i: int) -> None:
        """Reservations the sweep released (their TTL ended) are no longer open."""
        held = self.nodes[i].engine.holds.reservations
        self.open = [r for r in self.open if r[0] != i or r[1] in held]

    def _kill(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        node.run(node.engine.leases.quiet())  # its lease calls in flight reach the ledger first (or not: lost)
        node.restart(clean=False)  # as after kill -9: what was acknowledged is in LMDB
        self._wrap(node)
        self._forget_expired(i)

    def _restart(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        self.call(node, node.engine.close())
        node.engine = node._open()
        self._wrap(node)
        self._forget_expired(i)

    def _outage(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        self.faults.outage = not self.faults.outage
        self.note(f"  outage {'begins' if self.faults.outage else 'ends'}")

    def _grant(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        amount = self.rng.choice((1, 5, 20)) * 1_000 * PER_TOKEN_NANO
        expires = self.clocks[i].ms + self.rng.choice((0, 0, 4_000, 30_000))
        self.keys += 1
        self.escrow.grant(customer, "usd", amount, expires if expires > self.clocks[i].ms else 0, 0, "sim", "",
                          self.clocks[i].ms, key=f"sim-{self.keys}", digest="d")
        self.granted[customer] += amount

    def _adjust(self, i: int, node: Billing, customer: str, tokens: int) -> None:
        amount = 1_000 * PER_TOKEN_NANO
        try:
            self.escrow.adjust(customer, "usd", -amount, "sim", self.clocks[i].ms)
        except Exception as e:  # noqa: BLE001 - less than that available centrally: refused, nothing done
            self.note(f"  -> {type(e).__name__}")
            return
        self.granted[customer] -= amount

    # ---- checks ---------------------------------------------------------------------

    def check(self) -> None:
        assert self.escrow.check() == []
        for customer in CUSTOMERS:
            bound = self.allowance[customer] * len(self.nodes)
            for b in self.escrow.balance(customer, 0):
                limit = bound + (OVERAGE_LIMIT_NANO if customer == "p" else 0)  # below zero: p's plan's overage
                assert b["overdrawn_nano"] <= limit, f"{customer} overspent its balance by {b['overdrawn_nano']}"
            if customer != "p":  # p's plan grants its period's credits, and lets it go below zero within a limit
                assert self.spent[customer] <= self.granted[customer] + bound
        self.check_rolls()
        for node in self.nodes:
            core = node.engine.core
            for customer in CUSTOMERS:
                idx = core.account(customer.encode())
                if idx >= 0:
                    assert core.available(idx, 0) >= 0 and core.state(idx)[0][0][0] >= 0, "a lease went below zero"
                h = node.engine.leases.held.get((customer, 0))
                if h is not None:
                    assert 0 <= h.borrowed <= self.allowance[customer], f"{customer} borrowed {h.borrowed}"

    def check_rolls(self, settled: bool = False) -> None:
        """Each of p's periods rolled once, in order, none skipped; ``settled``: all of those that ended
        (by the latest clock, past the grace) are rolled."""
        rolled = [int(r[0]) for r in self.ledger._rows("SELECT n FROM meterd_rolls WHERE customer_id = 'p' ORDER BY n")]
        sub = self.plans.subscription("p")
        assert sub is not None and rolled == list(range(sub.n)), (rolled, sub.n)
        if settled:
            now = max(c.ms for c in self.clocks) + PERIOD_CLOSE_GRACE_MS
            self.plans.roll("p", now)  # past the grace: whatever was never settled is rolled now
            sub = self.plans.subscription("p")
            # Rolled: every period that ended by the latest clock (a later one may wait for its leases).
            assert sub is not None and sub.end_ms > now - PERIOD_CLOSE_GRACE_MS, "a period that ended was never rolled"
            rolled = [int(r[0]) for r in self.ledger._rows("SELECT n FROM meterd_rolls WHERE customer_id = 'p'")]
            assert sorted(rolled) == list(range(sub.n))

    def finish(self) -> None:
        """The faults healed: open reservations released, every lease given back, everything flushed."""
        from meterd import wire
        self.faults.on = False
        for j, rid, _, _ in self.open:
            self.nodes[j].run(wire.release(self.nodes[j].engine, pb.ReleaseRequest(reservation_id=rid)))
        for node in self.nodes:
            node.run(node.engine.leases.return_all())
            node.flush()
        self.check()
        self.check_rolls(settled=True)
        for customer in CUSTOMERS:
            rows = self.escrow.balance(customer, 0)
            consumed = sum(b["consumed_nano"] for b in rows)
            assert consumed == self.spent[customer], f"{customer}: the ledger has {consumed} consumed, clients " \
                                                     f"were told {self.spent[customer]}"
            # What is left leased is the debt of what was spent beyond leases, when nothing was left to repay it.
            assert all(b["leased_nano"] + b["lease_debts_nano"] == 0 for b in rows), \
                f"a lease was neither settled nor given back: {customer} {rows}"
            assert all(b["lease_debts_nano"] <= self.allowance[customer] * len(self.nodes) for b in rows)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        self.ledger.close()
        self.loop.close()

    def run(self, steps: int) -> None:
        for customer in CUSTOMERS:  # every customer starts with something
            self._grant(0, self.nodes[0], customer, 0)
        for n in range(steps):
            self.faults.step, self.faults.calls = n, 0
            self.step()
            for node in self.nodes:  # refills run in the background: each step ends with them, for a replay
                node.run(node.engine.leases.quiet())
            self.check()
        self.finish()


def _simulate(seed: int, tmp: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str, steps: int = STEPS) -> None:
    sim = Simulation(seed, tmp, monkeypatch, ledger_url)
    try:
        sim.run(steps)
    except AssertionError as e:
        history = "\n".join(sim.history[-40:])
        raise AssertionError(f"seed {seed} failed: {e}\nreplay: METERD_SIM_SEED={seed} pytest "
                             f"tests/test_simulation.py -k replay\nlast steps:\n{history}") from None
    finally:
        sim.close()


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_histories_keep_every_balance_exact(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _simulate(seed, tmp_path, monkeypatch, f"sqlite:///{tmp_path}/ledger.db")


@pytest.mark.parametrize("seed", range(2))
def test_seeded_histories_on_postgresql(seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        postgres_url: str):
    from conftest import drop_postgres_database, new_postgres_database
    url = new_postgres_database(postgres_url)
    try:
        _simulate(1_000 + seed, tmp_path, monkeypatch, url)
    finally:
        drop_postgres_database(postgres_url, url)


def test_a_seed_replays_the_same_history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    seed = int(os.environ.get("METERD_SIM_SEED", "7"))
    histories = []
    for run in range(2):
        sim = Simulation(seed, tmp_path / f"run{run}", monkeypatch, f"sqlite:///{tmp_path}/run{run}.db")
        try:
            sim.run(80)
            histories.append((sim.history, dict(sim.spent), sim.faults.lost))
        finally:
            sim.close()
    assert histories[0] == histories[1]
