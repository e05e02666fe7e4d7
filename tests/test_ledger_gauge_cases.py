"""Gauges charged by the ledger in ledger mode: the cases an independent review found, each kept as
a test (a late window of a customer without a plan, of a period whose plan had other free units;
a month charged before a subscribe; a value past 64 bits; a backdated event; the lock order of a
flush and a charge on PostgreSQL; a charge past the overage limit; a gauge's free units)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from conftest import async_wait_until
from test_ledger_gauges import _catalog
from test_ledger_statements import Both

from meterd.clock import month_bounds
from meterd.errors import InvalidInput
from meterd.escrow import GAUGE_GRACE_MS, Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import GAUGE_CHARGE_MAX_NANO, NO_PENDING_MS, PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.v1 import meter_pb2 as pb

NANO = 10**9


def _entries(url: str, customer: str, kind: str = "gauge_charged") -> list[tuple[str, int, int]]:
    with Ledger(url) as lg:
        return [(r[0], int(r[1]), int(r[2])) for r in lg._rows(
            "SELECT reference, amount_nano, effective_ms FROM meterd_entries WHERE customer_id = ? AND kind = ? "
            "ORDER BY id", (customer, kind))]


def _gauge_rows(url: str, customer: str) -> dict[str, tuple[int, ...]]:
    with Ledger(url) as lg:
        return {r[0]: tuple(int(x) for x in r[1:]) for r in lg._rows(
            "SELECT meter, charged_to_ms, pending_from_ms, due_ms FROM meterd_gauges WHERE customer_id = ?",
            (customer,))}


def _swept(url: str, customer: str) -> bool:
    """The heartbeat's gauges_due has looked at the customer's rows (nothing due any more)."""
    rows = _gauge_rows(url, customer)
    return bool(rows) and all(due == NO_PENDING_MS for _, _, due in rows.values())


# ---- 1. a plan-less customer's late window is never charged ---------------------------------------

def test_a_late_window_of_a_customer_without_a_plan_is_charged_at_the_next_heartbeat(tmp_path, monkeypatch,
                                                                                     ledger_url):
    """README: 'a window flushed after its period was charged is charged what it adds, at the next
    heartbeat, in that period'. For a customer without a plan, gauges_due calls _gauges with
    upto = the month's start, which equals charged_to, and _gauges skips the meter before the
    late branch: the late window is never charged (until, if ever, a later month's sweep)."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.set_time(both.clock.ms)
        both.both("grant", "solo", "usd", 500 * NANO)
        late = both.nodes[3]
        for x, seats in ((both.local, 4), (both.nodes[0], 4), (both.local, 9), (late, 9)):
            assert x.report("solo", "seats", seats).decision == pb.DECISION_ALLOW
        for x in (both.local, *both.nodes[:3]):
            x.flush()
        _, end = month_bounds(both.clock.ms)
        both.set_time(end + GAUGE_GRACE_MS)
        both.loop.run_until_complete(async_wait_until(lambda: len(_entries(ledger_url, "solo")) == 1,
                                                      "the month's seats charged"))
        assert _entries(ledger_url, "solo") == [("seats=4", -32 * NANO, end - 1)]
        late.flush()  # the late sidecar's window of the charged month
        assert _gauge_rows(ledger_url, "solo")["seats"][2] == 0  # due at once
        both.loop.run_until_complete(async_wait_until(lambda: _swept(ledger_url, "solo"), "the sweep"))
        local = [(e.reference, e.amount_nano) for e in both.local.audit("solo", "gauge_charged")]
        assert local == [("seats=9", -72 * NANO)]
        charged = sum(a for _, a, _ in _entries(ledger_url, "solo"))
        assert charged == -72 * NANO, _entries(ledger_url, "solo")
    finally:
        both.close()


# ---- 2. the late difference is priced with the free units of the plan of today, not of its period --

PLANS_TOML = """
[credit_types.usd]
kind = "fiat"
currency = "USD"

[meters.input_tokens]
credit_type = "usd"
per = 1000000
price_dimension = "model"
prices = { "gpt-4o" = "2.50" }

[meters.seats]
credit_type = "usd"
aggregation = "max"
price = "8.00"

[meters.active_users]
credit_type = "usd"
aggregation = "unique_count"
unique_dimension = "user"
price = "2.00"

[plans.big]
period = "month"
fee = { usd = "100.00" }
free = { seats = "10" }

[plans.big.credits.usd]
included = "10.00"
overage = { price_in = "usd", tiers = [{ price = "1.00" }], limit = "500", at_cycle_end = "bill" }

[plans.small]
period = "month"
fee = { usd = "10.00" }

[plans.small.credits.usd]
included = "1.00"
overage = { price_in = "usd", tiers = [{ price = "1.00" }], limit = "500", at_cycle_end = "bill" }
"""


def _plans_catalog(tmp: Path) -> Path:
    path = tmp / "plans.toml"
    path.write_text(PLANS_TOML)
    return path


def test_a_late_window_is_charged_with_the_free_units_of_its_periods_plan(tmp_path, monkeypatch, ledger_url):
    """On plan big (10 free seats), a downgrade to small (none) asked for: the period's roll charges
    its seats under big. A window of that period flushed after the roll is charged the difference
    under small's free units (LedgerPlans.gauges_due passes the plan of today): 8 seats instead of
    the 2 that big's period owes (local mode: 12 - 10 = 2 seats, $16)."""
    both = Both(tmp_path, _plans_catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.both("subscribe", "acme", "big")
        late = both.nodes[3]
        for x, seats in ((both.local, 4), (both.nodes[0], 4), (both.local, 12), (late, 12)):
            assert x.report("acme", "seats", seats).decision == pb.DECISION_ALLOW
        for x in (both.local, *both.nodes[:3]):
            x.flush()
        both.both("change_plan", "acme", "small")  # a downgrade: at the period's end
        sub = both.subscription()
        both.boundary()
        assert both.subscription().plan == "small"
        assert _entries(ledger_url, "acme") == [("seats=4", 0, sub.end_ms - 1)]  # 4 seats of 10 free
        late.flush()
        both.loop.run_until_complete(async_wait_until(lambda: _swept(ledger_url, "acme"), "the sweep"))
        local = [(e.reference, e.amount_nano) for e in both.local.audit("acme", "gauge_charged")]
        assert local == [("seats=12", -16 * NANO)]
        assert _entries(ledger_url, "acme") == [("seats=4", 0, sub.end_ms - 1),
                                                ("seats=12 (flushed late; 4 was charged)", -16 * NANO,
                                                 sub.end_ms - 1)]
    finally:
        both.close()


# ---- 3. a customer subscribed after its month ended, before the sweep: the month is not charged ----

def test_the_month_of_a_customer_without_a_plan_is_charged_when_it_subscribes_just_after_it(tmp_path, monkeypatch,
                                                                                        ledger_url):
    """Local mode charges a customer's gauges at the calendar month's end if it has no plan then.
    The ledger looks at the subscription when its sweep runs (GAUGE_GRACE_MS later): a customer
    that subscribes meanwhile has its month merged into its first period's charge (the most seats
    of both, once, and less the plan's free units): January is never charged."""
    both = Both(tmp_path, _plans_catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.set_time(both.clock.ms)
        both.both("grant", "acme", "usd", 500 * NANO)
        for x in (both.local, both.nodes[0]):
            assert x.report("acme", "seats", 9).decision == pb.DECISION_ALLOW
        both.settle()
        _, end = month_bounds(both.clock.ms)
        both.set_time(end + 1_000)  # January has ended, without a plan
        both.both("subscribe", "acme", "small")
        for x in (both.local, both.nodes[1]):
            assert x.report("acme", "seats", 9).decision == pb.DECISION_ALLOW
        both.settle()
        both.boundary()
        local = [(e.reference, e.amount_nano) for e in both.local.audit("acme", "gauge_charged")]
        assert local == [("seats=9", -72 * NANO), ("seats=9", -72 * NANO)]
        assert [(r, a) for r, a, _ in _entries(ledger_url, "acme")] == local
    finally:
        both.close()


# ---- 4. a gauge charge past 64 bits stops every sidecar's heartbeat sweep --------------------------

def test_a_tenants_huge_gauge_does_not_stop_the_other_customers_rolls(tmp_path, monkeypatch, ledger_url):
    """A gauge costs nothing when served, so any quantity is served: 2e9 seats at $8 is 1.6e19
    nano, past 64 bits. The charge stopped every heartbeat (an overflow, at every sidecar, before
    the rolls): now it takes at most GAUGE_CHARGE_MAX_NANO, and another customer's idle period
    is rolled by the heartbeats."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.both("grant", "evil", "usd", 1 * NANO)
        assert both.nodes[0].report("evil", "seats", 2_000_000_000).decision == pb.DECISION_ALLOW
        for x in both.nodes:
            x.flush()
        sub = both.subscription()  # acme, on the catalog's team plan, idle: its roll is roll_due's
        assert sub.end_ms > month_bounds(both.clock.ms)[1] + GAUGE_GRACE_MS
        both.clock.ms = sub.end_ms + PERIOD_CLOSE_GRACE_MS + 1
        both.loop.run_until_complete(async_wait_until(lambda: both.subscription().n == sub.n + 1,
                                                      "acme's idle period rolled by a heartbeat", 10))
        # evil's month is charged the most one charge takes (logged), owed beyond its balance: by the
        # same heartbeat's gauge sweep, which runs after its rolls
        both.loop.run_until_complete(async_wait_until(lambda: _entries(ledger_url, "evil"), "evil's month charged", 10))
        assert [a for _, a, _ in _entries(ledger_url, "evil")] == [-GAUGE_CHARGE_MAX_NANO]
        with Ledger(ledger_url) as lg:
            assert Escrow(lg).check() == []
    finally:
        for stop in both.stops:
            stop.set()
        both.loop.run_until_complete(asyncio.gather(*both.beats, return_exceptions=True))
        for node in [*both.nodes, both.local]:
            node.close()
        both.loop.close()


# ---- 5. a backdated event (timestamp_ms) moves a gauge out of the period it was served in -----------

def _report_at(x, customer: str, meter: str, quantity: int, ts: int, **dims: str) -> pb.ReportResponse:
    event = pb.UsageEvent(customer_id=customer, meter=meter, quantity=quantity, dimensions=dims, timestamp_ms=ts)
    return pb.ReportResponse.FromString(x.run(x.engine.report(pb.ReportRequest(event=event).SerializeToString())))


def test_a_tenant_cannot_backdate_its_gauge_into_the_period_already_charged(tmp_path, monkeypatch, ledger_url):
    """An event's window is its timestamp_ms's (up to event_late_max_s, a day, before the clock).
    Served an hour after a roll but dated an hour before it, seats counted in the ended period,
    whose charge already had as many: the ledger charged nothing for them, where local mode
    charges them in the period they were served in. A gauge event dated before the previous
    usage window is refused now, in both modes."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        for x in (both.local, both.nodes[0]):
            assert x.report("acme", "seats", 10).decision == pb.DECISION_ALLOW
        both.settle()
        sub = both.subscription()
        both.boundary()
        both.set_time(sub.end_ms + 3_600_000)
        for x in (both.local, both.nodes[1]):  # period 2's seats, dated in period 1: refused, in both modes
            with pytest.raises(InvalidInput, match="^event.timestamp_ms: a max or unique_count meter counts in"):
                _report_at(x, "acme", "seats", 10, sub.end_ms - 3_600_000)
            assert x.report("acme", "seats", 10).decision == pb.DECISION_ALLOW  # served now, it counts now
        both.settle()
        both.boundary()
        local = [(e.reference, e.amount_nano) for e in both.local.audit("acme", "gauge_charged")]
        assert local == [("seats=10", -80 * NANO), ("seats=10", -80 * NANO)]
        assert [(r, a) for r, a, _ in _entries(ledger_url, "acme")] == local
    finally:
        both.close()


# ---- 6. PostgreSQL: a flush and a gauge charge lock the gauge rows in opposite orders ---------------

def test_a_flush_and_the_gauge_sweep_do_not_deadlock_on_postgresql(tmp_path, ledger_url):
    """A roll / gauges_due locks a customer's meterd_gauges rows meter by meter in catalog order
    (seats, then active_users in the hybrid catalog); a flush upserts them in code-point order
    (active_users, then seats), and a flush of gauge usage only locks no balance row first. The
    sweep holding seats (here held up a moment by another transaction on the customer's grant, as
    any concurrent work may) and the flush holding active_users wait for each other."""
    if not ledger_url.startswith("postgres"):
        pytest.skip("row locks: PostgreSQL")
    from billing import START_MS
    from conftest import wait_until

    from meterd.catalog import load_catalog
    from meterd.ledger import CreditTypeInfo, Flush, UsageRow, canonical_dimensions

    catalog = load_catalog(str(_catalog(tmp_path)))
    cts = [CreditTypeInfo(c.name, c.kind, c.currency if c.kind == "fiat" else "", c.decimals)
           for c in catalog.credit_types]

    def flush(lg: Ledger, seq: int, window: int, now: int) -> None:
        usage = [UsageRow("solo", "active_users", canonical_dimensions({"user": f"u{seq}"}), window, "usd",
                          "unique_count", 0, 0, 0, 1),
                 UsageRow("solo", "seats", canonical_dimensions({}), window, "usd", "max", 0, 9, 0, 1)]
        f = Flush("s1", seq, cts, usage, [], "inc1", seq == 1, [])
        lg.apply_flush(f, lambda x: Escrow(x).settle_flush(f.sidecar_id, f.incarnation, f.settlements, now, f.usage))

    jan = START_MS
    _, end = month_bounds(jan)
    now = end + GAUGE_GRACE_MS + 1
    with Ledger(ledger_url) as lg:
        lg.migrate()
        Escrow(lg).grant("solo", "usd", 500 * NANO, 0, 0, "grant", "", jan)
        flush(lg, 1, jan - jan % 60_000, jan)  # January's seats and a user: due at the month's end

    errors: list[BaseException] = []

    def run(work) -> None:
        try:
            with Ledger(ledger_url) as lg:
                work(lg)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def waiting(n: int) -> bool:
        with Ledger(ledger_url) as lg:
            (k,), = lg._rows("SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() AND "
                             "wait_event_type = 'Lock'")
            return int(k) >= n

    blocker = Ledger(ledger_url)
    blocker._begin()
    blocker._rows("SELECT 1 FROM meterd_grants WHERE customer_id = 'solo' FOR UPDATE")
    sweep = threading.Thread(target=run, args=(lambda lg: LedgerPlans(Escrow(lg), catalog).gauges_due(now, 10),))
    sweep.start()
    wait_until(lambda: waiting(1), "the sweep holding seats, at the grant")
    late = threading.Thread(target=run, args=(lambda lg: flush(lg, 2, end - 60_000, now),))
    late.start()
    wait_until(lambda: waiting(2), "the flush holding active_users, at seats")
    blocker._exec("COMMIT")
    blocker.close()
    sweep.join(30)
    late.join(30)
    assert errors == []


# ---- 7. a gauge charge past the overage limit takes the next period's overage allowance ------------

def test_a_gauge_charge_past_the_limit_leaves_the_next_periods_allowance_whole(tmp_path, monkeypatch, ledger_url):
    """120 seats ($960) on the team plan ($10 included, $500 overage limit). Local mode charges them
    (force_charge, past the floor), bills the deficit at the roll and starts the next period at
    its included $10 with the whole $500 allowance. The ledger bills $500, keeps $450 owed
    (overdrawn) and repays it from the next period's credit and overage allowance: the next
    period is denied a $100 request that local mode serves, and the debt is billed again as that
    period's overage, at its first tier's price."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        for x in (both.local, both.nodes[0]):
            assert x.report("acme", "seats", 120).decision == pb.DECISION_ALLOW
        both.settle()
        both.boundary()
        with Ledger(ledger_url) as lg:
            assert Escrow(lg).check() == []
        out = []
        for x in (both.local, both.nodes[1]):  # $100 of gpt-4o input tokens
            r = x.report("acme", "input_tokens", 40_000_000, model="gpt-4o")
            out.append((r.decision, r.cost_nano))
        assert out[1] == out[0] == (pb.DECISION_ALLOW, 100 * NANO)
    finally:
        both.close()


# ---- 8. a gauge's free units leave no free_units entry (local mode's period_usage) -----------------

def test_the_free_units_of_a_gauge_are_on_the_statement_as_in_local_mode(tmp_path, monkeypatch, ledger_url):
    """Plan big gives 10 free seats; 4 are used. Local mode's roll writes a free_units entry
    ("seats: 4 of 10 free", Subscriptions._period_usage_ops); the ledger's roll (_period_usage)
    writes only fallback ("degraded") entries, so the statement's activity differs."""
    from test_ledger_statements import _statement

    both = Both(tmp_path, _plans_catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.both("subscribe", "acme", "big")
        for x in (both.local, both.nodes[0]):
            assert x.report("acme", "seats", 4).decision == pb.DECISION_ALLOW
        both.settle()
        both.boundary()
        local = [(e.reference, e.amount_nano) for e in both.local.audit("acme", "free_units")]
        assert local == [("seats: 4 of 10 free", 0)]
        assert [(r, a) for r, a, _ in _entries(ledger_url, "acme", "free_units")] == local
        both.flush()
        assert _statement(both.nodes[0], "billing-1") == _statement(both.local, "billing-1")
    finally:
        both.close()
