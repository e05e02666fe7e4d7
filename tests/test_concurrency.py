"""Many clients hammer one customer at once, through a real daemon: the balance
allows exactly what it covers, on the unary and the batch paths, and never
goes below the overage the plan allows."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import grpc
import pytest

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

CATALOG = """
[credit_types.usd]
kind = "fiat"

[credit_types.requests]
kind = "custom"
decimals = 3

[meters.tokens]
credit_type = "usd"
per = 1_000_000
price_dimension = "model"
prices = { "gpt-4o" = "2.50" }

[meters.requests]
credit_type = "requests"
price_dimension = "model"
price = "1"

[plans.pro_usage_based]
period = "month"

[plans.pro_usage_based.credits.requests]
included = "500"
fallback = "slow"
overage = { price = "0.04", price_in = "usd", spend_limit = "20.00" }

[customers.exact]

[customers.overage]
plan = "pro_usage_based"
"""

K = 300                 # events the "exact" balance covers
COST_NANO = 2_500_000   # 1,000 gpt-4o tokens at $2.50 per million
THREADS = 12


def _hammer(target: str, calls: list, send) -> Counter:
    """Send every call from THREADS threads at once; count the decisions."""
    out: Counter = Counter()
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(share: list) -> None:
        with grpc.insecure_channel(target) as ch:
            stub = meter_pb2_grpc.MeterStub(ch)
            start.wait()
            seen = Counter(d for call in share for d in send(stub, call))
        with lock:
            out.update(seen)

    threads = [threading.Thread(target=worker, args=(calls[i::THREADS],)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def _event(customer: str, meter: str, quantity: int, model: str) -> pb.UsageEvent:
    return pb.UsageEvent(customer_id=customer, meter=meter, quantity=quantity, dimensions={"model": model})


def _unary(stub, event):
    return [stub.Report(pb.ReportRequest(event=event), timeout=30).decision]


def _batch(stub, call):
    client_id, seq, events = call
    r = stub.ReportBatch(pb.ReportBatchRequest(client_id=client_id, sequence=seq, events=events, details=True),
                         timeout=30)
    return [res.decision for res in r.results]


@pytest.fixture
def daemon(make_daemon, tmp_path: Path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    d = make_daemon(catalog=str(catalog)).start()
    d.admin.Grant(apb.GrantRequest(customer_id="exact", credit_type="usd", amount_nano=K * COST_NANO))
    return d


def _balance(d, customer: str, credit_type: str) -> pb.CreditBalance:
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    return next(b for b in r.balances if b.credit_type == credit_type)


@pytest.mark.parametrize("path", ["unary", "batch"])
def test_a_balance_for_exactly_k_events_allows_exactly_k(daemon, path):
    events = [_event("exact", "tokens", 1000, "gpt-4o") for _ in range(3 * K)]
    if path == "unary":
        decisions = _hammer(daemon.target, events, _unary)
    else:
        calls = [(f"c{i % THREADS}", i // THREADS + 1, events[i * 5:(i + 1) * 5]) for i in range(len(events) // 5)]
        decisions = _hammer(daemon.target, calls, _batch)
    assert decisions == Counter({pb.DECISION_ALLOW: K, pb.DECISION_DENY: 2 * K})
    usd = _balance(daemon, "exact", "usd")
    assert usd.balance_nano == 0 and usd.reserved_nano == 0


def test_reservations_for_exactly_k_are_granted_exactly_k_times(daemon):
    def authorize(stub, _):
        r = stub.Authorize(pb.AuthorizeRequest(customer_id="exact", meter="tokens", quantity=1000,
                                               dimensions={"model": "gpt-4o"}), timeout=30)
        return [r.decision]

    decisions = _hammer(daemon.target, list(range(2 * K)), authorize)
    assert decisions == Counter({pb.DECISION_ALLOW: K, pb.DECISION_DENY: K})
    usd = _balance(daemon, "exact", "usd")
    assert usd.reserved_nano == K * COST_NANO and usd.available_nano == 0


@pytest.mark.parametrize("path", ["unary", "batch"])
def test_overage_stops_exactly_at_the_spend_limit(daemon, path):
    # 500 included requests, then $20 of overage at $0.04 = 500 more, then the "slow" fallback.
    events = [_event("overage", "requests", 1, "gpt-4o") for _ in range(1500)]
    if path == "unary":
        decisions = _hammer(daemon.target, events, _unary)
    else:
        calls = [(f"o{i % THREADS}", i // THREADS + 1, events[i * 10:(i + 1) * 10]) for i in range(150)]
        decisions = _hammer(daemon.target, calls, _batch)
    assert decisions == Counter({pb.DECISION_ALLOW: 1000, pb.DECISION_DEGRADE: 500})
    requests = _balance(daemon, "overage", "requests")
    assert requests.balance_nano == -500 * 10**9  # the floor the spend limit allows, not one request below
