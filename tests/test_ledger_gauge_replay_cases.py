"""Gauges in ledger mode, more cases: the log replays a gauge event accepted before (under a
wider usage window, or by an older meterd that took backdated gauge events), and one tenant's
capped gauge charges, added up, cannot overflow its balance row and stop the heartbeats' rolls;
a running period's statement has its gauges' free units so far."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from billing import START_MS, Billing
from conftest import async_wait_until
from test_ledger_gauges import _catalog
from test_ledger_statements import Both

from meterd import records
from meterd.clock import ManualClock, month_bounds
from meterd.escrow import GAUGE_GRACE_MS, Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.store import u64
from meterd.v1 import meter_pb2 as pb

NANO = 10**9
HOUR_MS = 3_600_000


def _report_at(x: Billing, customer: str, meter: str, quantity: int, ts: int, **dims: str) -> pb.ReportResponse:
    event = pb.UsageEvent(customer_id=customer, meter=meter, quantity=quantity, dimensions=dims, timestamp_ms=ts)
    return pb.ReportResponse.FromString(x.run(x.engine.report(pb.ReportRequest(event=event).SerializeToString())))


def _restart(b: Billing) -> None:
    """As after kill -9: the log since the last snapshot is replayed; a start that fails is said."""
    try:
        b.restart(clean=False)
    except BaseException as e:
        b.closed = True  # the engine did not start: nothing to close but the loop
        b.loop.close()
        pytest.fail(f"the sidecar does not start again: {type(e).__name__}: {e}")


def _close(b: Billing) -> None:
    if not getattr(b, "closed", False):
        b.close()


def _seats(x: Billing, customer: str) -> int:
    core = x.engine.live.core
    idx = core.account(customer.encode())
    return core.state(idx)[1][x.catalog.compiled.meter_names.index("seats")]


# ---- A. the log replay refuses what the core accepted -------------------------------------------------

@pytest.mark.parametrize("core", ["compiled", "python"])
def test_a_gauge_event_accepted_before_is_replayed_after_a_change_of_usage_window(core, tmp_path, monkeypatch):
    """README: 'The log replays an accepted event into its window whatever the settings say later.'
    With usage_window_s = 3600 an event dated 50 minutes back is of the previous window: accepted.
    After a crash, the sidecar restarts with usage_window_s = 60: the replay runs the event
    without the refusal of gauge events dated before the previous window (a replay has no
    limits), and the sidecar starts."""
    b = Billing(tmp_path, str(_catalog(tmp_path)), monkeypatch, core=core, usage_window_s=3600)
    try:
        b.grant("solo", "usd", 100 * NANO)
        assert _report_at(b, "solo", "seats", 7, START_MS - 50 * 60_000).decision == pb.DECISION_ALLOW
        assert _seats(b, "solo") == 7
        b.settings = dataclasses.replace(b.settings, usage_window_s=60)
        _restart(b)
        assert _seats(b, "solo") == 7
    finally:
        _close(b)


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_a_gauge_event_an_older_meterd_logged_is_replayed_after_the_upgrade(core, tmp_path, monkeypatch):
    """An older meterd accepted a seats event dated an hour back (within event_late_max_s, a day)
    and logged it as it came (a REPORT record). Started after a crash, this one replays it (it
    would refuse it if served now) and starts."""
    b = Billing(tmp_path, str(_catalog(tmp_path)), monkeypatch, core=core)
    try:
        b.grant("solo", "usd", 100 * NANO)
        assert b.report("solo", "seats", 3).decision == pb.DECISION_ALLOW
        event = pb.UsageEvent(customer_id="solo", meter="seats", quantity=7, timestamp_ms=b.now_ms - HOUR_MS)
        data = pb.ReportRequest(event=event).SerializeToString()
        # what the older meterd wrote for it: the request as it came, at the time it was applied
        pos = b.engine.journal.log_pos + 1
        b.engine.store.write_now([("log", u64(pos), records.message(records.Kind.REPORT, data, b.now_ms))])
        _restart(b)
        assert _seats(b, "solo") == 7
    finally:
        _close(b)


# ---- B. one tenant's gauges stop every sidecar's rolls (64-bit sums of capped charges) -----------------

def _due(url: str, customer: str) -> int:
    with Ledger(url) as lg:
        rows = lg._rows("SELECT due_ms FROM meterd_gauges WHERE customer_id = ? AND meter = 'seats'", (customer,))
        return int(rows[0][0]) if rows else -1


def test_a_tenants_late_seats_do_not_stop_the_other_customers_rolls(tmp_path, monkeypatch, ledger_url):
    """One gauge charge takes at most 2^60 nano, but charges add up in 64-bit columns
    (consumed_nano, granted_nano, the allowance's amount_nano): a tenant on a plan reports huge
    seats dated in the last window of the period just rolled (one window back is taken), each a
    late window charged again. They overflowed its balance row, and its next roll raised in
    roll_due at every heartbeat, before the rolls of customers after it: an idle customer's
    period was never rolled. No gauge charge takes the sums past 2^62 now."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        evil, node = "aaa", both.nodes[0]  # sorts before acme in roll_due's order
        node.subscribe(evil, "team")
        assert node.report(evil, "seats", 2_000_000_000).decision == pb.DECISION_ALLOW
        for x in both.nodes:
            x.flush()
        both.boundary()  # both periods rolled; evil's seats charged 2^60
        sub = both.subscription()  # acme's period 2, idle: its roll is roll_due's
        for k in range(2, 12):  # late seats of period 1, each its own late charge
            assert _report_at(node, evil, "seats", 2_000_000_000 * k, sub.start_ms - 1).decision == \
                pb.DECISION_ALLOW
            node.flush()
            both.loop.run_until_complete(async_wait_until(lambda: _due(ledger_url, evil) > 0, "the late sweep"))
        for stop in both.stops[1:]:  # one sidecar sweeps (on PostgreSQL, several skip a customer another rolls)
            stop.set()
        both.loop.run_until_complete(asyncio.gather(*both.beats[1:]))
        both.clock.ms = sub.end_ms + PERIOD_CLOSE_GRACE_MS + 1
        both.loop.run_until_complete(async_wait_until(lambda: both.subscription().n == sub.n + 1,
                                                      "acme's idle period rolled by a heartbeat", 10))
    finally:
        for stop in both.stops:
            stop.set()
        both.loop.run_until_complete(asyncio.gather(*both.beats, return_exceptions=True))
        for n in [*both.nodes, both.local]:
            n.close()
        both.loop.close()


def test_a_running_periods_statement_has_the_gauges_free_units_so_far(tmp_path, monkeypatch, ledger_url):
    """GetStatement of a period that holds the running credit period's end adds its usage so far
    ("this period so far"): the free units its gauges used too, as local mode does (ledger mode
    gave only its fallback usage)."""
    from test_ledger_gauge_cases import _plans_catalog
    from test_ledger_statements import _statement

    both = Both(tmp_path, _plans_catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.both("subscribe", "acme", "big")
        for x in (both.local, both.nodes[0]):
            assert x.report("acme", "seats", 4).decision == pb.DECISION_ALLOW
        both.flush()
        local = _statement(both.local, "billing")
        assert any("of 10 free (this period so far)" in a.get("description", "") for a in local["activity"])
        assert _statement(both.nodes[0], "billing") == local
    finally:
        both.close()


def test_a_customer_whose_roll_is_refused_does_not_stop_the_others(tmp_path, monkeypatch, ledger_url):
    """A roll refused for one customer (its next period's credits would take its granted sum past
    64 bits) is logged, and the sweep rolls the customers after it."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        node = both.nodes[0]
        node.subscribe("aaa", "team")  # sorts before acme, with the same period
        with Ledger(ledger_url) as lg:  # the next period's $10 and allowance would not fit
            (granted,), = lg._rows("SELECT granted_nano FROM meterd_balances WHERE customer_id = 'aaa' AND "
                                   "credit_type = 'usd'")
            Escrow(lg).grant("aaa", "usd", (1 << 63) - 1 - int(granted) - NANO, 0, 0, "api", "", both.clock.ms)
        sub = both.subscription()
        both.clock.ms = sub.end_ms + PERIOD_CLOSE_GRACE_MS + 1
        both.loop.run_until_complete(async_wait_until(lambda: both.subscription().n == sub.n + 1,
                                                      "acme's period rolled by a heartbeat", 10))
        with Ledger(ledger_url) as lg:
            assert LedgerPlans(Escrow(lg), node.catalog).subscription("aaa").n == sub.n  # refused, not rolled
    finally:
        both.close()


def test_a_customer_another_sweep_holds_is_skipped_on_postgresql(tmp_path, monkeypatch, ledger_url):
    """Sidecars sweeping gauges at once skip a customer another one is charging (an advisory lock
    per customer), where each waited on its rows and charged nothing after."""
    if not ledger_url.startswith("postgresql"):
        pytest.skip("advisory locks: PostgreSQL")
    from meterd.clock import month_bounds
    from meterd.ledger_plans import GAUGE_LOCK_SPACE
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        for stop in both.stops:  # no heartbeat sweeps: this test's calls are the sweep
            stop.set()
        both.loop.run_until_complete(asyncio.gather(*both.beats))
        node = both.nodes[0]
        node.grant("solo", "usd", 100 * NANO)
        assert node.report("solo", "seats", 3).decision == pb.DECISION_ALLOW
        node.flush()
        now = month_bounds(both.clock.ms)[1] + PERIOD_CLOSE_GRACE_MS
        with Ledger(ledger_url) as other, Ledger(ledger_url) as lg:
            other._rows("SELECT pg_advisory_lock(?, hashtext(?))", (GAUGE_LOCK_SPACE, "solo"))
            assert LedgerPlans(Escrow(lg), node.catalog).gauges_due(now, 10) == 1  # looked at, skipped
            assert not lg._rows("SELECT 1 FROM meterd_entries WHERE customer_id = 'solo' AND kind = 'gauge_charged'")
            other._rows("SELECT pg_advisory_unlock(?, hashtext(?))", (GAUGE_LOCK_SPACE, "solo"))
            LedgerPlans(Escrow(lg), node.catalog).gauges_due(now, 10)
            assert [r[0] for r in lg._rows("SELECT reference FROM meterd_entries WHERE customer_id = 'solo' AND "
                                           "kind = 'gauge_charged'")] == ["seats=3"]
    finally:
        both.close()


# ---- a move from local mode to ledger mode ----------------------------------------------------------

def test_months_a_local_mode_sidecar_charged_are_not_charged_again_in_ledger_mode(tmp_path, monkeypatch, ledger_url):
    """A deployment moves from local mode (its sidecars flushed to the ledger, and charged their
    gauges themselves at each month's end) to ledger mode. The ledger's first charge of a gauge took
    every window ever flushed (charged_to 0): January's 20 seats, charged by local mode at January's
    end, were charged again as February's most. Now the ledger charges gauges from the month ledger
    mode began in (meterd_gauges_from)."""
    catalog = str(_catalog(tmp_path))
    loop = asyncio.new_event_loop()
    old = Billing(tmp_path / "old", catalog, monkeypatch, ledger=ledger_url, sidecar_id="old", loop=loop,
                  clock=ManualClock(START_MS))
    old.tick()  # its month begins
    old.grant("solo", "usd", 500 * NANO)
    assert old.report("solo", "seats", 20).decision == pb.DECISION_ALLOW
    _, january_end = month_bounds(START_MS)
    old.flush()
    old.now_ms = january_end + 1
    old.tick()  # local mode's charge of January
    assert [(e.reference, e.amount_nano) for e in old.audit("solo", "gauge_charged")] == [("seats=20", -160 * NANO)]
    old.flush()
    old.close()

    clock = ManualClock(january_end + 60_000)
    node = Billing(tmp_path / "s0", catalog, monkeypatch, ledger=ledger_url, sidecar_id="s0", balances="ledger",
                   loop=loop, clock=clock, lease_heartbeat_ms=20, lease_wait_ms=5_000)
    stop = asyncio.Event()
    beat = loop.create_task(node.engine.leases.run(stop))
    try:
        node.grant("solo", "usd", 500 * NANO)
        assert node.report("solo", "seats", 3).decision == pb.DECISION_ALLOW
        node.flush()
        _, february_end = month_bounds(clock.ms)
        clock.ms = february_end + GAUGE_GRACE_MS

        def charged() -> list[tuple[str, int]]:
            with Ledger(ledger_url) as lg:
                return [(r[0], int(r[1])) for r in lg._rows(
                    "SELECT reference, amount_nano FROM meterd_entries WHERE customer_id = 'solo' AND "
                    "kind = 'gauge_charged' ORDER BY id")]
        loop.run_until_complete(async_wait_until(lambda: len(charged()) == 2, "February's seats charged"))
        assert charged() == [("seats=20", -160 * NANO), ("seats=3", -24 * NANO)]  # local mode's, then the ledger's
        with Ledger(ledger_url) as lg:
            assert lg._rows("SELECT from_ms FROM meterd_gauges_from") == [(january_end,)]
    finally:
        stop.set()
        loop.run_until_complete(beat)
        node.close()
        loop.close()
