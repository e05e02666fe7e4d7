"""Gauge meters (max, unique_count) in ledger mode: each sidecar counts only what it served, so the
ledger charges them once per period, from the usage windows every sidecar flushed. The same
history on one local sidecar and spread over four in ledger mode gives the same statements, on
the hybrid catalog (seats at their most, distinct active users), period after period, for a
customer on a plan and one without (its calendar month)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from billing import ROOT, Billing
from conftest import async_wait_until
from test_ledger_statements import SIDECARS, Both, _statement

from meterd.clock import month_bounds
from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.ledger_plans import PERIOD_CLOSE_GRACE_MS, LedgerPlans
from meterd.v1 import meter_pb2 as pb

NANO = 10**9


def _catalog(tmp: Path) -> Path:
    """The hybrid catalog without its plan's free GPU seconds (free units of a meter other than a
    gauge are refused in ledger mode yet)."""
    text = (ROOT / "examples" / "hybrid.toml").read_text()
    assert 'free = { gpu_seconds = "3600" }' in text
    path = tmp / "hybrid.toml"
    path.write_text(text.replace('free = { gpu_seconds = "3600" }', ""))
    return path


def spread(both: Both, n: int, event: Callable[[Billing, int], pb.ReportResponse]) -> list[tuple]:
    """``n`` events (``event(sidecar, i)``), each to the local sidecar and to the next ledger-mode
    sidecar, settled every ten: (decision, cost, mode) of each, local then ledger."""
    out = []
    for i in range(n):
        node = both.nodes[both.sent % SIDECARS]
        both.sent += 1
        for x in (both.local, node):
            r = event(x, i)
            out.append((r.decision, r.cost_nano, r.mode))
        if i % 10 == 9 or i == n - 1:
            both.settle()
    return out


def _history(both: Both, customer: str, period: int, n: int) -> list[tuple]:
    """``n`` events of four meters: seats reported by every sidecar (the period's most at one of
    them), users that come back at other sidecars, tokens and requests that spend the credits."""
    def event(x: Billing, i: int) -> pb.ReportResponse:
        kind = i % 4
        if kind == 0:
            return x.report(customer, "seats", 2 + (i * 7 + period) % 9)
        if kind == 1:
            return x.report(customer, "active_users", 1, user=f"u{(i * 5 + period) % 11}")
        if kind == 2:
            return x.report(customer, "input_tokens", 400_000, model="gpt-4o")
        return x.report(customer, "requests", 3, model="o1")
    return spread(both, n, event)


def three_periods_and_a_cancel(both: Both, history: Callable[[Both, str, int, int], list[tuple]],
                               sizes: tuple[int, int]) -> list[tuple]:
    """``history`` over three credit periods of acme (the catalog's customer, on its plan from the
    start), then part of a fourth and a cancel: the local sidecar's decisions, which the ledger-mode
    sidecars' are the same as."""
    decisions = []
    for period in range(3):
        decisions += history(both, "acme", period, sizes[0])
        both.boundary()
    decisions += history(both, "acme", 3, sizes[1])
    both.set_time(both.clock.ms + 3 * 86_400_000)
    both.both("cancel", "acme")
    both.loop.run_until_complete(async_wait_until(lambda: both.subscription() is None, "the cancel's end"))
    local, ledger = decisions[0::2], decisions[1::2]
    assert ledger == local
    return local


def test_gauges_in_ledger_mode_give_the_same_statements(tmp_path, monkeypatch, ledger_url):
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        three_periods_and_a_cancel(both, _history, (40, 20))
        charged = [e for e in both.local.audit("acme") if e.kind == "gauge_charged"]
        assert {e.reference.split("=")[0] for e in charged} == {"seats", "active_users"}
        assert len(charged) == 8  # two gauges, three rolls and the cancel: charged once each, not per sidecar
        both.flush()
        for period in ["2026-01", "2026-02", "2026-03", "2026-04", "2026-05", "billing", "billing-1", "billing-2",
                       "billing-3"]:
            assert _statement(both.nodes[0], period) == _statement(both.local, period), period
        with Ledger(ledger_url) as lg:
            assert Escrow(lg).check() == []
    finally:
        both.close()


def test_a_customer_without_a_plan_has_its_gauges_charged_once_at_the_months_end(tmp_path, monkeypatch,
                                                                                  ledger_url):
    """Seats and users of a prepaid customer, served by four sidecars: charged once, by the ledger,
    at the calendar month's end (as local mode charges them), on the most seats any sidecar saw."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        both.set_time(both.clock.ms)  # local mode's housekeeping notes the month it starts in
        both.both("grant", "solo", "usd", 500 * 10**9)
        both.both("grant", "solo", "requests", 100 * 10**9)
        decisions = _history(both, "solo", 0, 24)
        assert decisions[1::2] == decisions[0::2]
        _, end = month_bounds(both.clock.ms)
        both.set_time(end + PERIOD_CLOSE_GRACE_MS)  # the month has ended, and the sidecars had time to flush it

        def charged() -> list[str]:
            with Ledger(ledger_url) as lg:
                return sorted(r[0] for r in lg._rows("SELECT reference FROM meterd_entries WHERE customer_id = "
                                                     "'solo' AND kind = 'gauge_charged'"))
        both.loop.run_until_complete(async_wait_until(lambda: len(charged()) == 2, "the month's gauges charged"))
        local = sorted(e.reference for e in both.local.audit("solo", "gauge_charged"))
        assert charged() == local and len(local) == 2
        with Ledger(ledger_url) as lg:  # looked at once: not again until a flush brings more
            assert LedgerPlans(Escrow(lg), both.local.catalog).gauges_due(both.clock.ms, 10) == 0
        both.flush()
        assert _statement(both.nodes[0], "2026-01", "solo") == _statement(both.local, "2026-01", "solo")
        with Ledger(ledger_url) as lg:
            assert Escrow(lg).check() == []
    finally:
        both.close()


def test_a_gauge_window_flushed_after_its_period_was_charged_is_charged_the_difference(tmp_path, monkeypatch,
                                                                                       ledger_url):
    """A sidecar that served only seats (free when served: it holds no lease the roll waits for)
    flushes its window after the period was charged: the ledger's sweep charges what it adds, once,
    in that period, so the period's gauges cost what local mode charged at its roll."""
    both = Both(tmp_path, _catalog(tmp_path), ledger_url, monkeypatch)
    try:
        late = both.nodes[3]
        for x, seats in ((both.local, 4), (both.nodes[0], 4), (both.local, 9), (late, 9)):
            assert x.report("acme", "seats", seats).decision == pb.DECISION_ALLOW
        for x in (both.local, *both.nodes[:3]):
            x.flush()
        sub = both.subscription()
        both.boundary()  # rolled without the late sidecar's window: 4 seats charged

        def seats_charged() -> list[tuple[str, int, int]]:
            with Ledger(ledger_url) as lg:
                return [(r[0], int(r[1]), int(r[2])) for r in lg._rows(
                    "SELECT reference, amount_nano, effective_ms FROM meterd_entries WHERE customer_id = 'acme' AND "
                    "kind = 'gauge_charged' AND reference LIKE ? ORDER BY id", ("seats%",))]
        assert seats_charged() == [("seats=4", -32 * NANO, sub.end_ms - 1)]
        late.flush()
        both.loop.run_until_complete(async_wait_until(lambda: len(seats_charged()) == 2, "the late window charged"))
        assert seats_charged()[1] == ("seats=9 (flushed late; 4 was charged)", -40 * NANO, sub.end_ms - 1)
        local = [e for e in both.local.audit("acme", "gauge_charged") if e.reference.startswith("seats")]
        assert [(e.reference, e.amount_nano) for e in local] == [("seats=9", -72 * NANO)]
        late.flush()
        both.set_time(both.clock.ms + 1)
        for x in both.nodes:  # a heartbeat later, nothing more is charged
            x.flush()
        with Ledger(ledger_url) as lg:
            assert LedgerPlans(Escrow(lg), both.local.catalog).gauges_due(both.clock.ms, 10) == 0
            assert Escrow(lg).check() == []
        assert len(seats_charged()) == 2
    finally:
        both.close()
