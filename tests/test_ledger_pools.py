"""A plan's free units of a sum or count meter in ledger mode: a pool that sidecars lease
(``Catalog.for_ledger``), taken first by the events that use them, as on one sidecar. The hybrid
catalog as shipped (its team plan's first GPU hour of each period free) on one local sidecar and on
four ledger-mode sidecars: the same decisions and statements, period after period."""

from __future__ import annotations

import pytest
from billing import ROOT
from test_ledger_gauges import _statement, three_periods_and_a_cancel
from test_ledger_statements import SIDECARS, Both

from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.v1 import meter_pb2 as pb

NANO = 10**9
HYBRID = ROOT / "examples" / "hybrid.toml"


def _history(both: Both, customer: str, period: int, n: int) -> list[tuple]:
    """``n`` events, each to the local sidecar and to the next ledger-mode sidecar: GPU time on two
    kinds of hardware (the plan's free hour taken by whichever sidecar serves it, then priced),
    tokens, requests and seats."""
    out = []
    for i in range(n):
        node = both.nodes[both.sent % SIDECARS]
        both.sent += 1
        kind = i % 5
        for x in (both.local, node):
            if kind in (0, 1):
                hardware = "nvidia-h100" if (i + period) % 3 else "nvidia-l40s"
                r = x.report(customer, "gpu_seconds", f"{250 + (i * 37 + period * 11) % 200}.5", hardware=hardware)
            elif kind == 2:
                r = x.report(customer, "input_tokens", 300_000, model="gpt-4o")
            elif kind == 3:
                r = x.report(customer, "requests", 3, model="o1")
            else:
                r = x.report(customer, "seats", 2 + (i + period) % 5)
            out.append((r.decision, r.cost_nano, r.mode))
        if i % 10 == 9 or i == n - 1:
            both.settle()
    return out


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
