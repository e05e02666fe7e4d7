"""A plan's free units of a sum or count meter in ledger mode: a pool that sidecars lease
(``Catalog.for_ledger``), taken first by the events that use them, as on one sidecar. The hybrid
catalog as shipped (its team plan's first GPU hour of each period free) on one local sidecar and on
four ledger-mode sidecars: the same decisions and statements, period after period."""

from __future__ import annotations

import pytest
from billing import ROOT, Billing
from test_ledger_gauges import _statement, spread, three_periods_and_a_cancel
from test_ledger_statements import Both

from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.v1 import meter_pb2 as pb

NANO = 10**9
HYBRID = ROOT / "examples" / "hybrid.toml"


def _history(both: Both, customer: str, period: int, n: int) -> list[tuple]:
    """``n`` events: GPU time on two kinds of hardware (the plan's free hour taken by whichever
    sidecar serves it, then priced), tokens, requests and seats."""
    def event(x: Billing, i: int) -> pb.ReportResponse:
        kind = i % 5
        if kind in (0, 1):
            hardware = "nvidia-h100" if (i + period) % 3 else "nvidia-l40s"
            return x.report(customer, "gpu_seconds", f"{250 + (i * 37 + period * 11) % 200}.5", hardware=hardware)
        if kind == 2:
            return x.report(customer, "input_tokens", 300_000, model="gpt-4o")
        if kind == 3:
            return x.report(customer, "requests", 3, model="o1")
        return x.report(customer, "seats", 2 + (i + period) % 5)
    return spread(both, n, event)


def test_free_units_in_ledger_mode_give_the_same_statements(tmp_path, monkeypatch, ledger_url):
    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        local = three_periods_and_a_cancel(both, _history, (45, 15))
        free = [e for e in both.local.audit("acme") if e.kind == "free_units"]
        assert len(free) == 4 and all(e.reference.startswith("gpu_seconds: ") for e in free)
        assert sum(1 for d, cost, _ in local if d == pb.DECISION_ALLOW and cost == 0) >= 8  # the free hours
        both.flush()
        for period in ["2026-01", "2026-02", "2026-03", "2026-04", "2026-05", "billing", "billing-1", "billing-2",
                       "billing-3"]:
            assert _statement(both.nodes[0], period) == _statement(both.local, period), period
        with Ledger(ledger_url) as lg:
            assert Escrow(lg).check() == []
            # the pools are balances of the ledger, out of every statement
            assert {r[0] for r in lg._rows("SELECT credit_type FROM meterd_balances WHERE customer_id = 'acme'")} \
                >= {"free/gpu_seconds"}
    finally:
        both.close()


def test_an_event_its_sidecars_pool_cannot_cover_takes_what_other_sidecars_hold(tmp_path, monkeypatch, ledger_url):
    """An event at a sidecar that holds less of the free hour than it needs: what other sidecars hold
    is gathered (recalled), so the event is free in full, as on one sidecar; past the hour, what is
    left of it is taken wherever it is and the rest priced."""
    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        a, b = both.nodes[0], both.nodes[1]
        for node in (a, b):
            for x in (both.local, node):
                assert x.report("acme", "gpu_seconds", "600", hardware="nvidia-h100").cost_nano == 0
        pool = a.engine.live.catalog.credit_index["free/gpu_seconds"]
        poor, rich = sorted((a, b), key=lambda n: n.engine.leases.available("acme", pool))
        assert poor.engine.leases.available("acme", pool) < 2_300_000  # the next event needs more than it holds
        for x in (both.local, poor):
            r = x.report("acme", "gpu_seconds", "2300", hardware="nvidia-h100")
            assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, 0)
        for x in (both.local, rich):  # 100 s of the hour left, wherever they are: 50 s priced
            r = x.report("acme", "gpu_seconds", "150", hardware="nvidia-h100")
            assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, 50 * 1_525_000)
    finally:
        both.close()


@pytest.mark.parametrize("hardware", ["nvidia-h100"])
def test_a_hold_committed_takes_the_free_units_first(tmp_path, monkeypatch, ledger_url, hardware):
    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        for x in (both.local, both.nodes[2]):
            a = x.authorize("acme", "gpu_seconds", 4000, hardware=hardware)
            assert a.decision == pb.DECISION_ALLOW
            committed = x.commit(a.reservation_id, 3700)
            assert committed.cost_nano == 100 * 1_525_000
    finally:
        both.close()


def test_a_running_periods_statement_has_its_free_units_so_far(tmp_path, monkeypatch, ledger_url):
    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        for node in both.nodes[:3]:
            for x in (both.local, node):
                assert x.report("acme", "gpu_seconds", "1000", hardware="nvidia-l40s").decision == pb.DECISION_ALLOW
        both.flush()  # what the sidecars spent, settled
        running = _statement(both.nodes[0], "billing")
        assert running == _statement(both.local, "billing")
        assert [a["description"] for a in running["activity"] if a["section"] == "free_units"] == \
            ["gpu_seconds: 3000.000 of 3600.000 free (this period so far)"]
    finally:
        both.close()


def test_a_pool_is_not_a_balance_of_the_customers(tmp_path, monkeypatch, ledger_url):
    """GetBalance shows the customer's credit types only; a pool cannot be granted (it is the plan's)."""
    from meterd.errors import InvalidInput

    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        node = both.nodes[0]
        assert node.report("acme", "gpu_seconds", "10", hardware="nvidia-h100").cost_nano == 0
        assert {b.credit_type for b in node.balance("acme").balances} == {"usd", "requests"}
        with pytest.raises(InvalidInput, match="unknown credit type 'free/gpu_seconds'"):
            node.grant("acme", "free/gpu_seconds", 1000)
    finally:
        both.close()


# ---- cases an independent review proved ---------------------------------------------------------

def test_a_batch_for_customers_the_ledger_does_not_know_opens_no_accounts(tmp_path, monkeypatch, ledger_url):
    """Made-up customer ids on a pooled meter: denied as unknown, as in local mode. They were taken as
    customers whose pools are spent and applied again on the loose plan, which opened a core account
    for each (no bound, nothing logged)."""
    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        a = both.nodes[0]
        before = len(a.engine.live.core)
        events = [pb.UsageEvent(customer_id=f"nobody{i}", meter="gpu_seconds", dimensions={"hardware": "nvidia-h100"},
                                quantity_decimal="10") for i in range(50)]
        local, ledger = both.local.batch(events), a.batch(events)
        assert local.denied == 50 and {d.reason for d in local.denials} == {pb.REASON_UNKNOWN_CUSTOMER}
        assert (ledger.accepted, ledger.denied) == (0, 50)
        assert {d.reason for d in ledger.denials} == {pb.REASON_UNKNOWN_CUSTOMER}
        assert len(a.engine.live.core) == before
    finally:
        both.close()


COUNT_CATALOG = """
[credit_types.usd]
kind = "fiat"
currency = "USD"

[meters.calls]
credit_type = "usd"
aggregation = "count"
price = "0.01"

[plans.p]
period = "month"
free = { calls = "3" }

[plans.p.credits.usd]
included = "10.00"

[customers.acme]
plan = "p"
"""


def test_a_count_meters_event_takes_one_free_unit_whatever_its_quantity(tmp_path, monkeypatch, ledger_url):
    """A count meter counts events: its pool was asked for the quantity reported, so an event of
    quantity 0 asked for nothing and stayed denied, and one of 7 gathered 7 units for 1."""
    path = tmp_path / "count.toml"
    path.write_text(COUNT_CATALOG)
    both = Both(tmp_path, path, ledger_url, monkeypatch)
    try:
        got = spread(both, 5, lambda x, i: x.report("acme", "calls", (0, 7, 0, 1, 0)[i]))
        local, ledger = got[0::2], got[1::2]
        assert [(d, c) for d, c, _ in local] == [(pb.DECISION_ALLOW, 0)] * 3 + [(pb.DECISION_ALLOW, 10_000_000)] * 2
        assert ledger == local
    finally:
        both.close()


def test_a_customer_subscribed_after_its_pool_was_found_spent_gets_its_free_units(tmp_path, monkeypatch, ledger_url):
    """A customer without a plan (its pools found spent: it has none) is subscribed at another sidecar.
    Once this sidecar hears of the plan (its next lease answer: README, Free units), the mark stayed,
    and it priced the GPU time the plan gives free."""
    both = Both(tmp_path, HYBRID, ledger_url, monkeypatch)
    try:
        a = both.nodes[0]
        both.both("grant", "solo", "usd", 500 * NANO)
        for x in (both.local, a):
            r = x.report("solo", "gpu_seconds", "100", hardware="nvidia-h100")
            assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, 100 * 1_525_000)
        both.settle()
        both.local.subscribe("solo", "team")
        both.nodes[1].subscribe("solo", "team")
        a.run(a.engine.leases.return_all())  # its next event asks the ledger, and hears of the plan
        both._asked_again()
        out = []
        for _ in range(5):
            for x in (both.local, a):
                assert x.report("solo", "input_tokens", 100_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                r = x.report("solo", "gpu_seconds", "100", hardware="nvidia-h100")
                out.append((r.decision, r.cost_nano))
        local, ledger = out[0::2], out[1::2]
        assert local == [(pb.DECISION_ALLOW, 0)] * 5
        assert ledger == local
    finally:
        both.close()
