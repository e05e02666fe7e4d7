"""Plans in ledger mode, the ledger's side (meterd.ledger_plans): subscriptions and their
period rolls as ledger transactions, on SQLite and on a real PostgreSQL.

The main check: the same history, run by a local-mode sidecar (the engine on a real
LMDB) and by the ledger (spending through leases settled like a sidecar's flush),
gives the same audit entries: the same kinds, amounts, balances around them, charges
by tier and effective times; only grant ids differ."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import threading

import pytest
from billing import DAY_MS, NANO, START_MS, Billing
from conftest import async_wait_until

from meterd.catalog import load_catalog
from meterd.clock import ManualClock
from meterd.errors import Conflict, InvalidInput, MeterdError, NotFound
from meterd.escrow import Escrow
from meterd.ledger import Ledger, Settlement
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.v1 import meter_pb2 as pb

CATALOG = """
[credit_types.usd]
kind = "fiat"

[credit_types.credits]
kind = "custom"

[meters.spend_credits]                  # one unit: one nano-credit
credit_type = "credits"
price = "0.000000001"

[meters.spend_usd]
credit_type = "usd"
price = "0.000000001"

[plans.basic]
fee = { usd = "10" }
[plans.basic.credits.credits]
included = "100"
rollover = { max_percent = 50, max_count = 2, lifetime_periods = 2, max = "40" }
overage = { price_in = "usd", limit = "50", tiers = [{ up_to = "20", price = "0.5" }, { price = "0.25" }] }

[plans.pro]
fee = { usd = "30" }
[plans.pro.credits.credits]
included = "300"
rollover = { max_percent = 50, max_count = 2, lifetime_periods = 2, max = "40" }
overage = { price_in = "usd", limit = "100", tiers = [{ up_to = "20", price = "0.5" }, { price = "0.25" }] }

[plans.forgiving]
fee = { usd = "5" }
[plans.forgiving.credits.credits]
included = "100"
overage = { price_in = "usd", limit = "30", price = "0.1", at_cycle_end = "forgive" }

[plans.carrying]
fee = { usd = "5" }
[plans.carrying.credits.credits]
included = "100"
overage = { price_in = "usd", limit = "30", price = "0.1", at_cycle_end = "carry" }

[plans.repaying]
fee = { usd = "5" }
[plans.repaying.credits.credits]
included = "100"
overage = { price_in = "usd", limit = "30", price = "0.1", at_cycle_end = "carry_repay" }

[plans.metered]
[plans.metered.credits.usd]
arrears = true

[plans.trialed]
fee = { usd = "8" }
trial = { credits = { credits = "7" }, days = 10 }
[plans.trialed.credits.credits]
included = "50"

[plans.spend_capped]
fee = { usd = "20" }
[plans.spend_capped.credits.credits]
included = "100"
overage = { price_in = "usd", spend_limit = "12", tiers = [{ up_to = "20", price = "0.5" }, { price = "0.25" }] }

[plans.spend_capped_dear]
fee = { usd = "40" }
[plans.spend_capped_dear.credits.credits]
included = "250"
overage = { price_in = "usd", spend_limit = "12", tiers = [{ up_to = "10", price = "0.8" }, { price = "0.4" }] }

[plans.thresholded]
fee = { usd = "20" }
[plans.thresholded.credits.credits]
included = "100"
[plans.thresholded.credits.credits.overage]
price_in = "usd"
spend_limit = "30"
bill_threshold = "5"
tiers = [{ up_to = "20", price = "0.5" }, { price = "0.25" }]

[plans.annual]
period = "year"
credit_period = "month"
fee = { usd = "100" }
[plans.annual.credits.credits]
included = "80"
rollover = { max_percent = 100, max_count = 1 }

[plans.capped]
fee = { usd = "10" }
[plans.capped.credits.credits]
included = "100"
rollover = { max_percent = 100, balance_cap = "150" }

[plans.daily_keep]
period = "day"
[plans.daily_keep.credits.credits]
included = "1"
rollover = { max_percent = 100, max_count = 1, lifetime_periods = 0 }
"""

KINDS = {"included", "grant", "billing_period", "fee", "rolled_over", "rollover_forfeited", "expire",
         "overage_charged", "overage_forgiven", "deficit_carried", "usage_billed"}
GRANT_ID = re.compile(r"\b(g_|G)\d+\b")


@pytest.fixture
def catalog_path(tmp_path):
    path = tmp_path / "plans.toml"
    path.write_text(CATALOG)
    return str(path)


class Central:
    """The ledger's side: LedgerPlans, and one sidecar's spending as lease calls and
    settlements (what a flush settles), on the ledger's clock."""

    def __init__(self, url: str, catalog_path: str) -> None:
        self.ledger = Ledger(url)
        self.ledger.migrate()
        self.escrow = Escrow(self.ledger)
        self.plans = LedgerPlans(self.escrow, load_catalog(catalog_path))
        self.consumed: dict[tuple[str, str], int] = {}

    def spend(self, customer: str, credit_type: str, amount: int, now_ms: int) -> None:
        """A lease of at least ``amount``, its consumption settled, the rest given back."""
        got = self.escrow.acquire("s1", "i1", customer, credit_type, amount, amount, 1, now_ms)
        assert got.amount_nano >= amount, got
        key = (customer, credit_type)
        self.consumed[key] = got.consumed_total_nano + amount
        self.escrow.settle("s1", "i1", [Settlement(customer, credit_type, self.consumed[key])], now_ms)
        if got.amount_nano > amount:
            self.escrow.give_back("s1", "i1", customer, credit_type,
                                  got.returned_total_nano + got.amount_nano - amount, now_ms)

    def close(self, customer: str, now_ms: int) -> None:
        """What the sidecar does at a period's end: its leases of the customer settled past it."""
        for (c, ct), consumed in self.consumed.items():
            lease = self.escrow._lease("s1", c, ct) if c == customer else None
            if lease is not None:
                self.escrow.give_back("s1", "i1", c, ct, lease.returned_total_nano, now_ms, consumed)

    def short(self, customer: str, credit_type: str, amount: int, now_ms: int) -> bool:
        """The ledger has less than ``amount`` to lease (nothing is moved)."""
        got = self.escrow.acquire("s1", "i1", customer, credit_type, amount, amount, 1, now_ms)
        self.consumed.setdefault((customer, credit_type), got.consumed_total_nano)
        if got.amount_nano:
            self.escrow.give_back("s1", "i1", customer, credit_type, got.returned_total_nano + got.amount_nano,
                                  now_ms)
        return got.amount_nano < amount

    def entries(self, customer: str) -> list[tuple]:
        return [_shape(e.kind, e.credit_type, e.amount_nano, e.balance_before_nano, e.balance_after_nano,
                       e.charge_nano, e.charge_credit_type, e.effective_ms, e.reference, e.detail)
                for e in self.ledger.entries(customer) if e.kind in KINDS]


def _shape(kind, ct, amount, before, after, charge, charge_ct, effective, reference, tiers) -> tuple:
    return (kind, ct, amount, before, after, charge, charge_ct, effective, GRANT_ID.sub("G", reference), tiers)


def _local_entries(b: Billing, customer: str) -> list[tuple]:
    out = []
    for e in b.audit(customer):
        if e.kind not in KINDS:
            continue
        tiers = [{"tier": t.tier, "units_nano": t.units_nano, "unit_price": t.unit_price,
                  "charge_nano": t.charge_nano} for t in e.tiers]
        detail = {"tiers": tiers} if tiers else {}
        if e.period_end_ms:
            detail["period_end_ms"] = e.period_end_ms
        out.append(_shape(e.kind, e.credit_type, e.amount_nano, e.balance_before_nano, e.balance_after_nano,
                          e.charge_nano, e.charge_credit_type, e.effective_ms, e.reference, detail))
    return out


def _central_entries(c: Central, customer: str) -> list[tuple]:
    return [t[:9] + (json.loads(t[9] or "{}"),) for t in c.entries(customer)]


# A history's changes of subscription: (on a local sidecar, on the ledger).
CHANGES = {
    "change": (lambda b, c, plan: b.change_plan(c, plan),
               lambda p, c, plan, now: p.change_plan(c, plan, now)),
    "cancel": (lambda b, c, at_end: b.cancel(c, at_period_end=at_end),
               lambda p, c, at_end, now: p.cancel(c, at_end, now)),
    "subscribe_again": (lambda b, c, plan: b.subscribe(c, plan),
                        lambda p, c, plan, now: p.subscribe(c, plan, now, now)),
}


def run_both(tmp_path, monkeypatch, ledger_url: str, catalog_path: str, script: list[tuple],
             lenient: bool = False) -> tuple[Billing, Central]:
    """Run ``script`` on a local sidecar and on the ledger, step by step on one clock:
    ("subscribe", plan) ("spend", credit type, nano) ("advance", ms) ("change", plan)
    ("cancel", at_period_end) ("grant", credit type, nano). ``lenient``: a step that local mode
    refuses (a spend it denies, a call it rejects) must be refused by the ledger too."""
    local = Billing(tmp_path / "local", catalog_path, monkeypatch)
    central = Central(ledger_url, catalog_path)
    cust = "acme"
    meter = {"credits": "spend_credits", "usd": "spend_usd"}
    for step in script:
        now = local.now_ms
        op = step[0]
        if op == "subscribe":
            local.subscribe(cust, step[1])
            central.plans.subscribe(cust, step[1], now, now)
        elif op == "spend":
            r = local.report(cust, meter[step[1]], step[2])
            if r.decision == 1:  # ALLOW
                assert r.cost_nano == step[2], r
                central.spend(cust, step[1], step[2], now)
                central.plans.bill_due(now, 100)  # what the sidecar's next heartbeat does
            else:  # the ledger cannot cover it either
                assert not lenient or central.short(cust, step[1], step[2], now), (step, r)
                assert lenient, (step, r)  # a scripted history stays within its plan
        elif op == "advance":
            local.advance(step[1])
            local.tick()
            central.close(cust, local.now_ms)
            central.plans.roll(cust, local.now_ms)
        elif op in CHANGES:
            on_local, on_central = CHANGES[op]
            try:
                on_local(local, cust, step[1])
            except MeterdError as e:
                assert lenient, (step, e)
                with pytest.raises(MeterdError):
                    on_central(central.plans, cust, step[1], now)
            else:
                on_central(central.plans, cust, step[1], now)
                if op == "cancel" and not step[1]:  # the sidecar answers the cancel's recall: the cancel ends
                    central.close(cust, now)
                    central.plans.roll(cust, now)
        elif op == "grant":
            local.grant(cust, step[1], step[2])
            central.escrow.grant(cust, step[1], step[2], 0, 0, "api", "", now)
        else:
            raise AssertionError(op)
        assert _central_entries(central, cust) == _local_entries(local, cust), step
    assert central.escrow.check() == []
    return local, central


MONTH = 31 * DAY_MS  # from the month-end anchor, at least one boundary


@pytest.fixture
def both(tmp_path, monkeypatch, ledger_url, catalog_path):
    made = []

    def run(script):
        local, central = run_both(tmp_path / str(len(made)), monkeypatch, ledger_url, catalog_path, script)
        made.append((local, central))
        return local, central
    yield run
    for local, central in made:
        local.close()
        central.ledger.close()


def test_rollover_within_caps_and_overage_by_tier_match_local_mode(both):
    local, central = both([
        ("subscribe", "basic"),
        ("spend", "credits", 30 * NANO),           # 70 left: 50% is 35, within max 40
        ("advance", MONTH),
        ("spend", "credits", 150 * NANO),          # 100 + 35 rolled, then 15 of overage
        ("advance", 30 * DAY_MS),
        ("spend", "credits", 100 * NANO), ("spend", "credits", 45 * NANO),  # 45 into overage: both tiers
        ("advance", 31 * DAY_MS),
        ("advance", 31 * DAY_MS),                  # a period with nothing spent: 50 of 100 rolls, max 40
    ])
    kinds = [e[0] for e in central.entries("acme")]
    assert kinds.count("overage_charged") == 2 and kinds.count("rolled_over") >= 2
    tiers = [e[9] for e in _central_entries(central, "acme") if e[0] == "overage_charged"][1]["tiers"]
    assert [t["units_nano"] for t in tiers] == [20 * NANO, 25 * NANO]


@pytest.mark.parametrize("plan", ["forgiving", "carrying", "repaying"])
def test_what_is_owed_at_a_period_end_matches_local_mode(both, plan):
    both([
        ("subscribe", plan),
        ("spend", "credits", 120 * NANO),          # 20 below zero
        ("advance", MONTH),
        ("spend", "credits", 110 * NANO),
        ("advance", 30 * DAY_MS),
        ("advance", 31 * DAY_MS),
    ])


def test_usage_in_arrears_and_a_trial_once_per_customer(both):
    both([
        ("subscribe", "metered"),
        ("spend", "usd", 7 * NANO + 3),
        ("advance", MONTH),
        ("spend", "usd", 2 * NANO),
        ("cancel", False),                         # billed at once
        ("subscribe", "trialed"),
        ("spend", "credits", 30 * NANO),
        ("cancel", False),
        ("subscribe", "trialed"),                  # no second trial
        ("advance", MONTH),
    ])


def test_upgrade_prorates_now_and_downgrade_waits_for_the_period_end(both):
    both([
        ("subscribe", "basic"),
        ("advance", 10 * DAY_MS),
        ("spend", "credits", 110 * NANO),          # 10 of overage, billed at the old prices on the upgrade
        ("change", "pro"),
        ("spend", "credits", 150 * NANO),
        ("change", "basic"),                       # a downgrade: at the period's end
        ("advance", 30 * DAY_MS),
        ("spend", "credits", 20 * NANO),
        ("cancel", True),
        ("advance", 31 * DAY_MS),                  # ends
    ])


def test_a_spend_limit_across_an_upgrade_at_other_prices(both):
    both([
        ("subscribe", "spend_capped"),
        ("spend", "credits", 110 * NANO),          # $5 of overage
        ("change", "spend_capped_dear"),           # billed; 150 more included for the whole period left
        ("spend", "credits", 150 * NANO),
        ("spend", "credits", 17 * NANO),           # the $12 limit leaves $7: 17.5 at $0.40 past the first 10
        ("advance", MONTH),
    ])


def test_early_overage_bills_once_at_the_threshold_and_tiers_go_on_across_them(both):
    local, central = both([
        ("subscribe", "thresholded"),
        ("spend", "credits", 100 * NANO),
        ("spend", "credits", 4 * NANO),            # $2 owed: below the $5 threshold
        ("spend", "credits", 8 * NANO),            # $6 owed: billed now
        ("spend", "credits", 30 * NANO),           # 8 at $0.50, then 22 at $0.25: $9.50, billed
        ("spend", "credits", 3 * NANO),            # $0.75: waits for the period's end
        ("advance", MONTH),
    ])
    bills = [(e.amount_nano, e.charge_nano, e.reference) for e in central.ledger.entries("acme")
             if e.kind == "overage_charged"]
    assert bills == [(12 * NANO, 6 * NANO, "threshold"), (30 * NANO, 9_500_000_000, "threshold"),
                     (3 * NANO, 750_000_000, "cycle end")]


def test_credit_periods_within_a_billing_year_and_grants_bought_apart(both):
    both([
        ("subscribe", "annual"),
        ("grant", "credits", 25 * NANO),
        ("spend", "credits", 60 * NANO),
        ("advance", MONTH),
        ("spend", "credits", 10 * NANO),
        ("advance", 30 * DAY_MS),
        ("advance", 31 * DAY_MS),
    ])


# Not "trialed": a trial is a grant of its own, and the ledger expires grants lazily, at the next
# transaction on the customer, with an entry of its own kind ("expired").
SEEDS = int(os.environ.get("METERD_TEST_SEEDS", "40"))  # more for a longer search: METERD_TEST_SEEDS=1000
PLANS = ["basic", "pro", "forgiving", "carrying", "repaying", "metered", "spend_capped", "spend_capped_dear",
         "thresholded"]


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_histories_match_local_mode(tmp_path, monkeypatch, catalog_path, seed):
    """Random histories of spending, grants, plan changes, cancels and boundaries, on monthly
    plans: every entry the ledger makes is local mode's, and every spend local mode denies the
    ledger cannot cover either."""
    _random_history(tmp_path, monkeypatch, f"sqlite:///{tmp_path}/ledger.db", catalog_path, seed)


@pytest.mark.parametrize("seed", range(3))
def test_random_histories_match_local_mode_on_postgresql(tmp_path, monkeypatch, catalog_path, seed,
                                                         postgres_url):
    """A few of them on PostgreSQL: the arithmetic is the same, the SQL is another engine's."""
    from conftest import drop_postgres_database, new_postgres_database
    url = new_postgres_database(postgres_url)
    try:
        _random_history(tmp_path, monkeypatch, url, catalog_path, seed)
    finally:
        drop_postgres_database(postgres_url, url)


def _random_history(tmp_path, monkeypatch, ledger_url: str, catalog_path: str, seed: int) -> None:
    rng = random.Random(seed)
    script: list[tuple] = [("subscribe", rng.choice(PLANS))]
    for _ in range(30):
        roll = rng.random()
        if roll < 0.5:
            script.append(("spend", rng.choice(["credits", "credits", "usd"]),
                           rng.choice([1, 7, 30, 60, 120]) * NANO + rng.randrange(1000)))
        elif roll < 0.6:
            script.append(("grant", "credits", rng.choice([5, 25]) * NANO))
        elif roll < 0.7:
            script.append(("change", rng.choice(PLANS)))
        elif roll < 0.75:
            script.append(("cancel", rng.random() < 0.5))
        elif roll < 0.8:
            script.append(("subscribe_again", rng.choice(PLANS)))
        else:
            script.append(("advance", rng.choice([DAY_MS, 10 * DAY_MS, MONTH])))
    script.append(("advance", 2 * MONTH))
    local, central = run_both(tmp_path, monkeypatch, ledger_url, catalog_path, script, lenient=True)
    local.close()
    central.ledger.close()


def test_a_second_roll_does_nothing_and_each_period_is_rolled_once(ledger_url, catalog_path):
    c = Central(ledger_url, catalog_path)
    c.plans.subscribe("acme", "basic", START_MS, START_MS)
    later = START_MS + 3 * MONTH
    assert c.plans.due(later, 10) == ["acme"]
    assert c.plans.roll("acme", later) == 3
    assert c.plans.roll("acme", later) == 0
    assert c.plans.due(later, 10) == []
    rolls = c.ledger._rows("SELECT n FROM meterd_rolls WHERE customer_id = 'acme' ORDER BY n")
    assert [int(r[0]) for r in rolls] == [0, 1, 2]
    assert c.escrow.check() == []


def test_bad_calls_are_refused_and_change_nothing(ledger_url, catalog_path):
    c = Central(ledger_url, catalog_path)
    with pytest.raises(InvalidInput, match="plan"):
        c.plans.subscribe("acme", "nope", START_MS, START_MS)
    with pytest.raises(InvalidInput, match="start_ms"):
        c.plans.subscribe("acme", "basic", START_MS + 1, START_MS)
    with pytest.raises(NotFound):
        c.plans.cancel("acme", False, START_MS)
    with pytest.raises(NotFound):
        c.plans.change_plan("acme", "pro", START_MS)
    c.plans.subscribe("acme", "basic", START_MS, START_MS)
    with pytest.raises(Conflict):
        c.plans.subscribe("acme", "pro", START_MS, START_MS)
    with pytest.raises(InvalidInput, match="periods"):
        c.plans.change_plan("acme", "annual", START_MS)
    sub = c.plans.subscription("acme")
    assert sub is not None and sub.plan == "basic" and sub.next_plan == ""
    assert [e.kind for e in c.ledger.entries("acme")] == ["included", "billing_period", "fee"]


class Boom(Exception):
    pass


def test_a_roll_killed_at_any_statement_is_done_once_by_the_next_try(ledger_url, catalog_path, monkeypatch):
    """The connection running a roll dies at each of its statements in turn (as a kill of its
    sidecar would leave it, COMMIT included): nothing of the roll stays, and the next caller rolls
    the period exactly once, with the entries of a roll that was never interrupted."""
    c = Central(ledger_url, catalog_path)
    boundary = START_MS + MONTH

    def history(customer: str) -> None:
        c.plans.subscribe(customer, "basic", START_MS, START_MS)
        c.spend(customer, "credits", 30 * NANO, START_MS + DAY_MS)
        c.spend(customer, "credits", 100 * NANO, START_MS + 2 * DAY_MS)  # 30 into overage: billed by the roll

    def shape(customer: str) -> list[tuple]:
        return [(e.kind, e.credit_type, e.amount_nano, e.balance_before_nano, e.balance_after_nano, e.charge_nano,
                 e.effective_ms, GRANT_ID.sub("G", e.reference)) for e in c.ledger.entries(customer)]

    history("whole")
    statements: list[str] = []
    real = Ledger._exec

    def counting(self, sql, params=()):
        statements.append(sql)
        return real(self, sql, params)
    monkeypatch.setattr(Ledger, "_exec", counting)
    assert c.plans.roll("whole", boundary) == 1
    monkeypatch.setattr(Ledger, "_exec", real)
    expected = shape("whole")
    total = statements.index("COMMIT") + 1  # the roll's transaction (a second one finds nothing due)
    assert total > 20 and [e[0] for e in expected].count("overage_charged") == 1

    for fail_at in range(1, total + 1):
        customer = f"cut{fail_at}"
        history(customer)
        seen = 0

        def dying(self, sql, params=(), fail_at=fail_at):
            nonlocal seen
            seen += 1
            if seen == fail_at:
                raise Boom(sql)
            return real(self, sql, params)
        monkeypatch.setattr(Ledger, "_exec", dying)
        with pytest.raises(Boom):
            c.plans.roll(customer, boundary)
        monkeypatch.setattr(Ledger, "_exec", real)
        c.ledger.close()  # the process is gone: its transaction with it
        c = Central(ledger_url, catalog_path)
        assert c.escrow.check() == []
        sub = c.plans.subscription(customer)
        assert sub is not None and sub.n == 0, fail_at
        assert c.plans.roll(customer, boundary) == 1
        assert c.plans.roll(customer, boundary) == 0
        assert shape(customer) == expected, fail_at
    (rolls,), = c.ledger._rows("SELECT COUNT(*) FROM meterd_rolls")
    assert int(rolls) == total + 1
    c.ledger.close()


def test_callers_racing_roll_each_period_once(ledger_url, catalog_path):
    """Two callers and a sweep on their own connections race for the same boundaries: each
    period is rolled once."""
    first = Central(ledger_url, catalog_path)
    for i in range(20):
        first.plans.subscribe(f"c{i}", "basic", START_MS, START_MS)
    later = START_MS + 2 * MONTH
    done: list[int] = []
    errors: list[BaseException] = []

    def caller() -> None:
        c = Central(ledger_url, catalog_path)
        try:
            for i in range(20):
                done.append(c.plans.roll(f"c{i}", later))
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            c.ledger.close()
    def sweeper() -> None:
        c = Central(ledger_url, catalog_path)
        try:
            while (n := c.plans.roll_due(later, 3)):
                done.append(n)
        except BaseException as exc:  # surfaced below
            errors.append(exc)
        finally:
            c.ledger.close()
    threads = [threading.Thread(target=caller) for _ in range(2)] + [threading.Thread(target=sweeper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(done) == 40  # 2 periods of 20 customers, whoever rolled them
    (rolls,), = first.ledger._rows("SELECT COUNT(*) FROM meterd_rolls")
    assert int(rolls) == 40
    assert first.escrow.check() == []


# ---- cases found by review: each failed before its fix ---------------------------------------

C = "credits"


@pytest.fixture
def central(ledger_url, catalog_path):
    c = Central(ledger_url, catalog_path)
    yield c
    c.ledger.close()


@pytest.fixture
def local(tmp_path, monkeypatch, catalog_path):
    b = Billing(tmp_path / "local", catalog_path, monkeypatch)
    yield b
    b.close()


class Side:
    """One sidecar's lease of a customer's credit type, by running totals."""

    def __init__(self, c: Central, sid: str, customer: str = "acme", ct: str = C) -> None:
        self.c, self.sid, self.customer, self.ct = c, sid, customer, ct
        self.consumed = self.returned = self.leased = 0

    def acquire(self, need: int, now: int) -> int:
        g = self.c.escrow.acquire(self.sid, "i1", self.customer, self.ct, need, need, 1, now)
        self.leased = g.leased_total_nano
        return g.granted_nano

    def consume(self, amount: int, now: int) -> None:
        self.consumed += amount
        self.c.escrow.settle(self.sid, "i1", [Settlement(self.customer, self.ct, self.consumed)], now)

    def give_back_all(self, now: int) -> int:
        self.returned = self.leased - self.consumed
        return self.c.escrow.give_back(self.sid, "i1", self.customer, self.ct, self.returned, now)


def shown(c: Central, ct: str = C) -> int:
    return next(b["balance_nano"] for b in c.escrow.balance("acme", START_MS) if b["credit_type"] == ct)


def kinds(entries):
    return [(e[0], e[2], e[3], e[4]) for e in entries]


# Cancel now after overage was spent while the credit sat at another sidecar's lease.
def test_cancel_now_nets_overage_spent_while_credit_sat_at_another_lease(local, central):
    t = START_MS + DAY_MS
    local.now_ms = t
    local.subscribe("acme", "basic")
    local.report("acme", "spend_credits", 10 * NANO)
    local.cancel("acme", at_period_end=False)

    c = central
    c.plans.subscribe("acme", "basic", t, t)
    a, b = Side(c, "s1"), Side(c, "s2")
    assert a.acquire(100 * NANO, t) == 100 * NANO      # every included credit at s1
    assert b.acquire(10 * NANO, t) == 10 * NANO        # s2 draws the overage allowance
    b.consume(10 * NANO, t)
    a.give_back_all(t)                                 # s1 spent nothing
    assert shown(c) == 90 * NANO                       # as local mode: 100 - 10
    c.plans.cancel("acme", False, t)
    # local: "expire" -90, balance 90 -> 0; ledger: "expire" -100, 90 -> -10, and the
    # 10 of overage is neither billed nor netted: the ended customer stays at -10.
    assert kinds(_central_entries(c, "acme")) == kinds(_local_entries(local, "acme"))
    assert shown(c) == 0


# The same, then an upgrade: the closed allowance's unnetted 10 is not counted against
#    the new plan's limit, so the period's overage goes past it.
def test_overage_spent_elsewhere_counts_against_the_limit_after_an_upgrade(local, central):
    t = START_MS + DAY_MS
    c = central
    c.plans.subscribe("acme", "basic", t, t)
    a, b = Side(c, "s1"), Side(c, "s2")
    a.acquire(100 * NANO, t)
    b.acquire(10 * NANO, t)
    b.consume(10 * NANO, t)
    a.give_back_all(t)
    c.plans.change_plan("acme", "pro", t)              # pro: overage limit 100
    # Spend everything the ledger lets the customer lease.
    got = 0
    while True:
        n = a.acquire(1 * NANO, t)
        if not n:
            break
        got += n
    a.consume(got, t)
    c.plans.roll("acme", c.plans.subscription("acme").end_ms)
    billed = [e for e in c.ledger.entries("acme") if e.kind == "overage_charged"]
    # local mode: the floor is -100 (pro's limit), so at most 100 of overage is billed
    assert sum(e.amount_nano for e in billed) <= 100 * NANO, [e.amount_nano for e in billed]


# Credit a lease holds at a forced roll counts as held (its sidecar never closed it): what is
# forfeited of it expires, audited, when it is given back, and the audit adds up to the balance.
def test_credit_a_lease_holds_at_a_roll_expires_audited_when_given_back(local, central):
    local.subscribe("acme", "basic")
    local.advance(MONTH)
    local.tick()

    c = central
    c.plans.subscribe("acme", "basic", START_MS, START_MS)
    a = Side(c, "s1")
    a.acquire(100 * NANO, START_MS)                    # s1 holds it all, spends nothing, and is gone
    boundary = c.plans.subscription("acme").end_ms
    assert c.plans.roll("acme", boundary) == 0         # waits for s1 to settle past the boundary...
    assert c.plans.roll("acme", boundary + PERIOD_CLOSE_GRACE_MS) == 1  # ...for so long
    a.give_back_all(boundary + PERIOD_CLOSE_GRACE_MS + 1)
    assert shown(c) == local.bal("acme", C) == 140 * NANO
    assert sum(e.balance_after_nano - e.balance_before_nano for e in c.ledger.entries("acme")) == shown(c)
    assert [e.amount_nano for e in c.ledger.entries("acme") if e.kind == "expired"] == [-60 * NANO]
    assert c.escrow.check() == []


# The roll does not apply escrow's lazy expiry first: a grant bought apart that expired
#    before the boundary counts as credit staying, and the balance cap forfeits the rollover.
def test_a_grant_that_expired_before_the_boundary_is_not_credit_left_at_the_roll(local, central):
    exp = START_MS + 10 * DAY_MS
    local.subscribe("acme", "capped")
    local.grant("acme", C, 50 * NANO, expires_at_ms=exp)
    local.advance(11 * DAY_MS)
    local.tick()                                       # the grant expires
    local.advance(MONTH - 11 * DAY_MS)
    local.tick()                                       # the roll: 100 left, cap 150 - 100 incoming -> 50

    c = central
    c.plans.subscribe("acme", "capped", START_MS, START_MS)
    c.escrow.grant("acme", C, 50 * NANO, exp, 0, "api", "", START_MS)
    c.plans.roll("acme", c.plans.subscription("acme").end_ms)
    rolled = lambda entries: [e[2] for e in entries if e[0] == "rolled_over"]  # noqa: E731
    assert rolled(_central_entries(c, "acme")) == rolled(_local_entries(local, "acme")) == [50 * NANO]


# Headroom below zero: one lease holds the overage allowance while another owes a debt
#    (outage spending); the cancel bills the debt out of the allowance's headroom, and the
#    give-back of the held allowance then breaks the headroom invariant: refused for good.
def test_lease_debts_are_not_billed_out_of_the_overage_headroom(central):
    t = START_MS + DAY_MS
    c = central
    c.plans.subscribe("acme", "basic", t, t)
    c.escrow.set_allowance("acme", C, 30 * NANO, t)
    a, b = Side(c, "s1"), Side(c, "s2")
    a.acquire(100 * NANO, t)
    b.acquire(50 * NANO, t)                            # the whole allowance at s2
    a.consume(130 * NANO, t)                           # 30 past its lease, spent during an outage
    assert shown(c) == -30 * NANO                      # as local mode: 30 of overage
    c.plans.cancel("acme", False, t)                   # bills 30
    assert c.escrow.check() == []
    b.give_back_all(t + 1)                             # InvariantBroken: overage headroom -30 * NANO


# An idle customer's rollovers that never expire go into one bucket: its boundaries do not pile
# up buckets until GRANTS_OPEN_MAX stops its rolls (local mode has no such cap).
def test_rolls_of_an_idle_customer_never_reach_the_open_bucket_cap(central):
    c = central
    c.plans.subscribe("acme", "daily_keep", START_MS, START_MS)
    assert c.plans.roll("acme", START_MS + 1200 * DAY_MS) == 1000  # at most ROLLS_PER_CALL_MAX a call
    assert c.plans.roll("acme", START_MS + 1200 * DAY_MS) == 200
    (open_buckets,), = c.ledger._rows("SELECT COUNT(*) FROM meterd_grants WHERE customer_id = 'acme' AND "
                                      "remaining_nano > 0")
    assert int(open_buckets) <= 3
    assert shown(c) == 1201 * NANO
    assert c.escrow.check() == []


# Cancel of a subscription whose plan left the catalog: its overage allowance stays open
#    and leasable until the old boundary; what is spent of it is never billed.
def test_a_cancel_of_a_plan_the_catalog_lost_closes_its_overage_allowance(central, ledger_url, tmp_path):
    t = START_MS + DAY_MS
    c = central
    c.plans.subscribe("acme", "basic", t, t)
    other = tmp_path / "without_basic.toml"
    other.write_text(CATALOG.replace("[plans.basic]", "[plans.basic_renamed]")
                     .replace("[plans.basic.", "[plans.basic_renamed."))
    c.plans = LedgerPlans(c.escrow, load_catalog(str(other)))
    c.plans.cancel("acme", False, t)
    assert c.plans.subscription("acme") is None
    a = Side(c, "s1")
    got = a.acquire(50 * NANO, t)
    a.consume(got, t)
    # no plan, no floor: local mode denies any spending below zero after the cancel
    assert got == 0 and shown(c) >= 0, (got, shown(c))


# Admin calls between a boundary and its roll act on the ended period (local mode rolls
#    first): an upgrade then prorates over a negative time left, a fee with a negative charge.
def test_a_plan_change_after_a_boundary_rolls_the_period_first(local, central):
    local.subscribe("acme", "basic")
    local.advance(MONTH + 3_600_000)                   # an hour past the boundary
    local.change_plan("acme", "pro")                   # local: the roll first, then the upgrade

    c = central
    c.plans.subscribe("acme", "basic", START_MS, START_MS)
    c.plans.change_plan("acme", "pro", local.now_ms)   # no roll yet (the sweep comes later)
    c.plans.roll("acme", local.now_ms)
    fees = lambda entries: [(e[5], e[8]) for e in entries if e[0] == "fee"]  # noqa: E731
    assert all(charge >= 0 for charge, _ in fees(_central_entries(c, "acme"))), fees(_central_entries(c, "acme"))
    assert fees(_central_entries(c, "acme")) == fees(_local_entries(local, "acme"))


# The same root cause, without overspending: at the roll _net pays the closed allowance's
#     owed 10 into the new allowance bucket, whose consumed and amount go below zero.
def test_no_bucket_goes_below_zero_when_overage_is_netted_after_an_upgrade(central):
    t = START_MS + DAY_MS
    c = central
    c.plans.subscribe("acme", "basic", t, t)
    a, b = Side(c, "s1"), Side(c, "s2")
    a.acquire(100 * NANO, t)
    b.acquire(10 * NANO, t)
    b.consume(10 * NANO, t)
    a.give_back_all(t)
    c.plans.change_plan("acme", "pro", t)
    c.plans.roll("acme", c.plans.subscription("acme").end_ms)
    assert c.escrow.check() == []
    bad = c.ledger._rows("SELECT grant_id, source, amount_nano, consumed_nano FROM meterd_grants WHERE "
                         "customer_id = 'acme' AND (amount_nano < 0 OR consumed_nano < 0)")
    assert bad == []


# A roll that ends a subscription whose plan left the catalog does not close its overage
#     allowance either: for usage in arrears 2^62 stays in granted (expired), and the customer
#     can never subscribe to an arrears plan again.
def test_a_roll_ending_a_lost_plan_closes_its_arrears_allowance(central, tmp_path, catalog_path):
    c = central
    c.plans.subscribe("acme", "metered", START_MS, START_MS)
    full = c.plans
    other = tmp_path / "without_metered.toml"
    other.write_text(CATALOG.replace("[plans.metered]", "[plans.metered_v2]")
                     .replace("[plans.metered.", "[plans.metered_v2."))
    c.plans = LedgerPlans(c.escrow, load_catalog(str(other)))
    boundary = c.plans.subscription("acme").end_ms
    assert c.plans.roll("acme", boundary) == 1          # ends it: the plan is gone
    c.plans = full                                     # the plan is back (or another arrears plan)
    c.plans.subscribe("acme", "metered", boundary + 1, boundary + 1)  # InvalidInput: granted past 64 bits




# ---- sidecars at a period's end --------------------------------------------------------------


def test_sidecars_settle_at_the_boundary_and_the_last_one_rolls_the_period(tmp_path, monkeypatch, ledger_url,
                                                                           catalog_path):
    """Two sidecars in ledger mode, their heartbeats running, spend one customer's plan credits
    (and overage); past the boundary each settles its lease and gives back what is free at its
    next heartbeat, and the last to settle rolls the period: once, from every event's cost, with
    the entries a single local-mode sidecar makes of the same events."""
    loop = asyncio.new_event_loop()
    clock = ManualClock(START_MS)
    with Ledger(ledger_url) as lg:
        lg.migrate()
    nodes = [Billing(tmp_path / f"s{i}", catalog_path, monkeypatch, ledger=ledger_url, sidecar_id=f"s{i}",
                     balances="ledger", loop=loop, clock=clock, lease_heartbeat_ms=20, lease_wait_ms=5_000)
             for i in range(2)]
    stops = [asyncio.Event() for _ in nodes]
    beats = [loop.create_task(node.engine.leases.run(stop)) for node, stop in zip(nodes, stops, strict=True)]
    local = Billing(tmp_path / "local", catalog_path, monkeypatch)
    central = Central(ledger_url, catalog_path)

    def rolls() -> int:
        (n,), = central.ledger._rows("SELECT COUNT(*) FROM meterd_rolls WHERE customer_id = 'acme'")
        return int(n)
    try:
        central.plans.subscribe("acme", "basic", START_MS, START_MS)
        local.subscribe("acme", "basic")
        for i, amount in enumerate([20, 35, 5, 40, 12, 9]):  # 121: 21 into overage
            assert nodes[i % 2].report("acme", "spend_credits", amount * NANO).decision == pb.DECISION_ALLOW
            assert local.report("acme", "spend_credits", amount * NANO).decision == pb.DECISION_ALLOW
        # Just past the boundary: within the grace, the roll waits for both sidecars to settle.
        clock.ms = local.now_ms = central.plans.subscription("acme").end_ms + 1
        local.tick()
        nodes[0].run(async_wait_until(lambda: rolls() == 1, "the period's roll"))
        assert central.plans.subscription("acme").n == 1
        assert _central_entries(central, "acme") == _local_entries(local, "acme")
        assert sum(n.engine.leases.counts["period_closes"] for n in nodes) >= 1
        assert central.escrow.check() == []
        # The next period's credits are leased as any: the new period spends them.
        assert nodes[0].report("acme", "spend_credits", 50 * NANO).decision == pb.DECISION_ALLOW
        assert rolls() == 1
    finally:
        for stop in stops:
            stop.set()
        loop.run_until_complete(asyncio.gather(*beats))
        for node in nodes:
            node.close()
        local.close()
        central.ledger.close()
        loop.close()


# ---- plans served by sidecars in ledger mode -----------------------------------------------------

CAPPED = """
[credit_types.usd]
kind = "fiat"

[credit_types.requests]
kind = "custom"
decimals = 3

[meters.requests]
credit_type = "requests"
price_dimension = "model"
prices = { "gpt-4o" = "1", "o1" = "10" }

[plans.pro]
fee = { usd = "20.00" }
[plans.pro.credits.requests]
included = "50"
# $0.04 a request past the 50 included, up to a spend limit of $2.00: 50 requests more
overage = { price = "0.04", price_in = "usd", spend_limit = "2.00" }

[plans.pro_billed]
fee = { usd = "20.00" }
[plans.pro_billed.credits.requests]
included = "50"
overage = { price = "0.04", price_in = "usd", spend_limit = "2.00", bill_threshold = "1.00" }

[plans.slow_pool]
fee = { usd = "20.00" }
[plans.slow_pool.credits.requests]
included = "50"
fallback = "slow"
priority_step = "10"

[plans.topped]
fee = { usd = "20.00" }
[plans.topped.credits.requests]
included = "50"
low_balance = "10"
topup_target = "50"

[plans.freebie]
fee = { usd = "20.00" }
free = { requests = "5" }
[plans.freebie.credits.requests]
included = "50"
"""


@pytest.fixture
def fleet(tmp_path, monkeypatch, ledger_url):
    """N sidecars in ledger mode on one ledger, with their heartbeats running, on the CAPPED catalog."""
    made = []

    def make(n: int) -> list[Billing]:
        loop = asyncio.new_event_loop()
        clock = ManualClock(START_MS)
        with Ledger(ledger_url) as lg:
            lg.migrate()
        path = tmp_path / "capped.toml"
        path.write_text(CAPPED)
        nodes = [Billing(tmp_path / f"s{i}", str(path), monkeypatch, ledger=ledger_url, sidecar_id=f"s{i}",
                         balances="ledger", loop=loop, clock=clock, lease_heartbeat_ms=20, lease_wait_ms=5_000)
                 for i in range(n)]
        stops = [asyncio.Event() for _ in nodes]
        beats = [loop.create_task(node.engine.leases.run(stop)) for node, stop in zip(nodes, stops, strict=True)]
        made.append((loop, nodes, stops, beats))
        return nodes
    yield make
    for loop, nodes, stops, beats in made:
        for stop in stops:
            stop.set()
        loop.run_until_complete(asyncio.gather(*beats))
        for node in nodes:
            node.close()
        loop.close()


def test_four_sidecars_stop_exactly_at_the_spend_limit(fleet, ledger_url):
    """Subscribed through one sidecar's Admin, spent on four: exactly the included requests and
    what the spend limit buys are allowed, the period's roll bills the limit, and the customer's
    next period starts whole."""
    nodes = fleet(4)
    sub = nodes[0].subscribe("acme", "pro")
    assert sub.plan == "pro"
    allowed = denied = i = 0
    while denied < 8:
        i += 1
        assert i < 400, "never ran out"
        ok = nodes[i % 4].report("acme", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW
        allowed += ok
        denied += not ok
        assert denied == 0 or allowed == 100, ("denied while credit was left", allowed)
    assert allowed == 100  # 50 included + $2.00 / $0.04
    with Ledger(ledger_url) as lg:
        plans = LedgerPlans(Escrow(lg), nodes[0].catalog)
        boundary = plans.subscription("acme").end_ms
        nodes[0].clock.ms = boundary + 1
        nodes[0].run(async_wait_until(lambda: plans.subscription("acme").n == 1, "the period's roll"))
        bills = [(e.amount_nano, e.charge_nano) for e in lg.entries("acme") if e.kind == "overage_charged"]
        assert bills == [(50 * NANO, 2 * NANO)]
        fees = [e.charge_nano for e in lg.entries("acme") if e.kind == "fee"]
        assert fees == [20 * NANO, 20 * NANO]
        assert Escrow(lg).check() == []
    # The next period's credits: at once at a sidecar that rolled it, after one heartbeat at the
    # others (they knew the balance spent).
    for node in nodes:
        held = node.engine.leases.held[("acme", 1)]
        node.run(async_wait_until(lambda held=held, node=node: held.exhausted_until <= node.clock.monotonic(),
                                  "the spent balance to be asked again"))
        assert node.report("acme", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW


def test_ledger_mode_subscribes_by_key_once_and_names_what_it_does_not_serve(fleet, ledger_url):
    nodes = fleet(2)
    from meterd import wire
    from meterd.v1 import admin_pb2 as apb
    req = apb.SubscribeRequest(customer_id="acme", plan="pro", idempotency_key="sub-1")
    first = apb.Subscription.FromString(nodes[0].run(wire.subscribe(nodes[0].engine, req)))
    again = apb.Subscription.FromString(nodes[1].run(wire.subscribe(nodes[1].engine, req)))  # another sidecar
    assert first == again
    with Ledger(ledger_url) as lg:
        assert [e.kind for e in lg.entries("acme")].count("fee") == 1
    with pytest.raises(Conflict, match="subscribed already"):
        nodes[1].subscribe("acme", "pro")
    nodes[0].subscribe("initech", "freebie")  # free units of a sum meter: a pool in the ledger
    with Ledger(ledger_url) as lg:
        grants = lg._rows("SELECT credit_type, amount_nano FROM meterd_grants WHERE customer_id = 'initech'")
        assert [(r[0], int(r[1])) for r in grants if r[0] not in ("requests", "usd")] == [("free/requests", 5)]
    with pytest.raises(InvalidInput, match="start_ms"):  # in ledger mode an anchor is now or past
        nodes[0].subscribe("globex", "pro", start_ms=nodes[0].clock.ms + 1)
    with pytest.raises(InvalidInput, match="unknown plan 'nope'"):
        nodes[0].subscribe("globex", "nope")
    with pytest.raises(InvalidInput, match="customer_id"):
        nodes[0].subscribe("", "pro")
    with pytest.raises(NotFound, match="no subscription"):
        nodes[0].cancel("globex")
    nodes[1].cancel("acme")
    with Ledger(ledger_url) as lg:
        assert LedgerPlans(Escrow(lg), nodes[0].catalog).subscription("acme") is None
        assert LedgerPlans(Escrow(lg), nodes[0].catalog).subscription("globex") is None  # nothing half-done


def test_an_early_bill_happens_once_centrally_whichever_sidecar_spent(fleet, ledger_url):
    """Overage spent on two sidecars and settled by their flushes: one sidecar's heartbeat bills the
    $1.00 threshold once (not each sidecar), and the period's end bills the rest at the same prices."""
    nodes = fleet(2)
    nodes[0].subscribe("acme", "pro_billed")
    for i in range(80):  # 50 included, then 30 at $0.04: $1.20 owed
        assert nodes[i % 2].report("acme", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW
    for node in nodes:
        node.run(node.engine.leases.return_all())  # settles what each consumed, as a recall would
        node.flush()
    with Ledger(ledger_url) as lg:
        def bills() -> list[tuple[int, int, str]]:
            return [(e.amount_nano, e.charge_nano, e.reference) for e in lg.entries("acme")
                    if e.kind == "overage_charged"]
        nodes[0].run(async_wait_until(lambda: bills(), "the early bill"))
        assert bills() == [(30 * NANO, 1_200_000_000, "threshold")]
        plans = LedgerPlans(Escrow(lg), nodes[0].catalog)
        for i in range(10):
            assert nodes[i % 2].report("acme", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW
        nodes[0].clock.ms = plans.subscription("acme").end_ms + 1
        nodes[0].run(async_wait_until(lambda: plans.subscription("acme").n == 1, "the period's roll"))
        assert bills() == [(30 * NANO, 1_200_000_000, "threshold"), (10 * NANO, 400_000_000, "cycle end")]
        assert Escrow(lg).check() == []


@pytest.mark.spawns
def test_the_cli_subscribes_changes_and_cancels_in_the_ledger_with_no_sidecar(tmp_path):
    import subprocess
    import sys

    catalog = tmp_path / "capped.toml"
    catalog.write_text(CAPPED)
    url = f"sqlite:///{tmp_path}/ledger.db"

    def meterd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meterd", *args, "--ledger", url, "--catalog", str(catalog)],
                              capture_output=True, text=True, timeout=60)

    assert meterd("ledger", "migrate").returncode == 0
    sub = ["subscribe", "--customer", "acme", "--plan", "pro", "--idempotency-key", "s1"]
    first, again = meterd(*sub), meterd(*sub)
    assert first.returncode == 0 and first.stdout.startswith("acme: plan pro, period ") and again.stdout == first.stdout
    changed = meterd("change-plan", "--customer", "acme", "--plan", "freebie")  # its free units: a pool
    assert changed.returncode == 0 and changed.stdout.startswith("acme: plan freebie, period "), changed.stderr
    refused = meterd("change-plan", "--customer", "acme", "--plan", "nope")
    assert refused.returncode != 0 and "unknown plan 'nope'" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "(cancelled at the period's end)" in meterd("cancel", "--customer", "acme", "--at-period-end").stdout
    assert meterd("cancel", "--customer", "acme").returncode == 0
    with Ledger(url) as lg:
        assert LedgerPlans(Escrow(lg), load_catalog(str(catalog))).subscription("acme") is None
        assert [e.kind for e in lg.entries("acme")].count("fee") == 1
        assert Escrow(lg).check() == []
