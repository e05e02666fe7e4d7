"""Every ledger row carries the dimension set, customer, quantity and cost of
the events it sums: sets one character apart stay apart (their hashes' sums
were equal), over unary Report and ReportBatch with snapshots in between, on
SQLite and PostgreSQL; the cap on dimension sets per window; the errors that
name what was wrong."""

from __future__ import annotations

import itertools
from pathlib import Path

import grpc
import pytest
from billing import Billing

from meterd import wire
from meterd.errors import InvalidInput
from meterd.ledger import Ledger, canonical_dimensions, period_bounds
from meterd.v1 import meter_pb2 as pb

NOV_1 = period_bounds("2026-11")[0]
WINDOW_MS = 60_000
# Prices per 1,000 units: a cost tells which model's price was charged.
PRICES_NANO = {"m-a": 1_000_000, "m-b": 3_000_000, "m-c": 7_000_000}
CATALOG = """
[credit_types.usd]
kind = "fiat"
currency = "USD"
decimals = 2

[meters.tokens]
credit_type = "usd"
per = 1000
price_dimension = "model"
prices = { "m-a" = "1.00", "m-b" = "3.00", "m-c" = "7.00" }

[meters.calls]
credit_type = "usd"
price = "0.001"
"""


def write_catalog(tmp_path: Path) -> str:
    path = tmp_path / "sets.toml"
    path.write_text(CATALOG)
    return str(path)


def sets_to_send() -> list[tuple[str, str, dict[str, str]]]:
    """(customer, meter, dimensions): the issue's colliding pair first, then two- and
    three-entry sets that differ by one character, and request ids, for three customers."""
    out = [("c1", "tokens", {"model": "m-a", "user": "u0"}), ("c2", "tokens", {"model": "m-b", "user": "u1"})]
    for customer, model, user in itertools.product(("c1", "c2", "c3"), PRICES_NANO, range(6)):
        out.append((customer, "tokens", {"model": model, "user": f"u{user}"}))
        out.append((customer, "tokens", {"model": model, "user": f"u{user}", "region": f"r{user % 2}"}))
        out.append((customer, "calls", {"model": model, "user": f"u{user}"}))
    for i in range(40):
        out.append((f"c{1 + i % 3}", "tokens", {"model": "m-a" if i % 2 else "m-b", "request": f"req-{i:02d}"}))
    return out


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_every_ledger_row_carries_the_sets_customer_quantity_and_cost_that_were_sent(ledger_url, tmp_path,
                                                                                    monkeypatch, core):
    b = Billing(tmp_path, write_catalog(tmp_path), monkeypatch, core=core, start_ms=NOV_1 + 30_000,
                ledger=ledger_url)
    for customer in ("c1", "c2", "c3"):
        b.grant(customer, "usd", 10**13)
    expected: dict[tuple[str, str, str, int], list[int]] = {}
    pending: list[pb.UsageEvent] = []
    sent = 0
    for rnd in range(2):  # each set twice: the second time through the other call, in another window
        for i, (customer, meter, dims) in enumerate(sets_to_send()):
            quantity = 1 + (i * 7 + rnd * 3) % 50
            cost = quantity * (PRICES_NANO[dims["model"]] if meter == "tokens" else 1_000_000)
            key = (customer, meter, canonical_dimensions(dims), b.now_ms - b.now_ms % WINDOW_MS)
            row = expected.setdefault(key, [0, 0, 0])
            row[0] += quantity
            row[1] += cost
            row[2] += 1
            event = pb.UsageEvent(customer_id=customer, meter=meter, quantity=quantity, dimensions=dims)
            if (i + rnd) % 2:
                r = b.report(customer, meter, quantity, **dims)
                assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, cost)
            else:
                pending.append(event)
            sent += 1
            if len(pending) == 7:
                assert b.batch(pending).accepted == 7
                pending = []
            if sent % 45 == 0:
                b.run(b.engine.snapshot())
        if pending:
            assert b.batch(pending).accepted == len(pending)
            pending = []
        b.advance(WINDOW_MS)
    b.flush()
    with Ledger(ledger_url) as lg:
        rows = [r for c in ("c1", "c2", "c3") for r in lg.usage_rows(c, NOV_1, NOV_1 + 86_400_000)]
    got = {(r.customer_id, r.meter, r.dimensions, r.window_start_ms): [r.quantity, r.cost_nano, r.events]
           for r in rows}
    assert len(rows) == len(got) == len(expected) == 2 * (3 * 3 * 6 * 3 + 40)  # the pair is in the grid
    assert got == expected
    b.close()


def test_a_missing_price_and_too_many_decimals_are_named_in_authorize_and_report(tmp_path, monkeypatch):
    b = Billing(tmp_path, write_catalog(tmp_path), monkeypatch, start_ms=NOV_1)
    b.grant("c1", "usd", 10**12)
    with pytest.raises(InvalidInput) as info:
        b.authorize("c1", "tokens", 10, model="gpt-5")
    assert str(info.value) == "dimensions: meter 'tokens' has no price for model='gpt-5' and no default"
    with pytest.raises(InvalidInput) as info:
        b.authorize("c1", "tokens", 10, user="u0")
    assert str(info.value) == "dimensions: meter 'tokens' needs the 'model' dimension: it has no default price"
    with pytest.raises(InvalidInput) as info:
        b.report("c1", "tokens", 10, model="gpt-5")
    assert str(info.value) == "event.dimensions: meter 'tokens' has no price for model='gpt-5' and no default"
    req = pb.AuthorizeRequest(customer_id="c1", meter="calls", quantity_decimal="1.5")
    with pytest.raises(InvalidInput) as info:
        b.run(wire.authorize(b.engine, req))
    assert str(info.value) == "quantity_decimal: meter 'calls' counts whole units (precision 0): no decimals"
    with pytest.raises(InvalidInput) as info:
        b.report("c1", "calls", "1.5")
    assert str(info.value) == "event.quantity_decimal: meter 'calls' counts whole units (precision 0): no decimals"
    b.close()


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_a_daemon_refuses_new_dimension_sets_past_the_cap_and_the_ledger_gets_none_of_it(make_daemon, tmp_path,
                                                                                        core):
    url = f"sqlite:///{tmp_path}/ledger.sqlite3"
    d = make_daemon(core=core, catalog=write_catalog(tmp_path), extra_env={
        "METERD_DIMENSION_SETS_PER_WINDOW_MAX": "5", "METERD_LEDGER": url}).start()
    from meterd.v1 import admin_pb2 as apb
    d.admin.Grant(apb.GrantRequest(customer_id="c1", credit_type="usd", amount_nano=10**12))

    def event(i: int) -> pb.UsageEvent:
        return pb.UsageEvent(customer_id="c1", meter="tokens", quantity=1000,
                             dimensions={"model": "m-a", "request": f"req-{i}"})

    assert d.meter.ReportBatch(pb.ReportBatchRequest(events=[event(i) for i in range(4)])).accepted == 4
    with pytest.raises(grpc.RpcError) as info:
        d.meter.ReportBatch(pb.ReportBatchRequest(events=[event(0), event(4), event(5)]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "events[2].dimensions" in info.value.details() and "dimension_sets_per_window_max" in info.value.details()
    assert d.meter.Report(pb.ReportRequest(event=event(4))).decision == pb.DECISION_ALLOW
    with pytest.raises(grpc.RpcError) as info:
        d.meter.Report(pb.ReportRequest(event=event(5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event.dimensions" in info.value.details()
    balance = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="c1")).balances[0].balance_nano
    assert balance == 10**12 - 5 * 1_000_000_000
    d.kill()
    d.start()  # the log replays to the same state
    assert d.meter.GetBalance(pb.GetBalanceRequest(customer_id="c1")).balances[0].balance_nano == balance
    d.stop()
    with Ledger(url) as lg:
        rows = lg.usage_rows("c1", 0, 1 << 62)
    assert sorted(r.dimensions for r in rows) == sorted(
        canonical_dimensions({"model": "m-a", "request": f"req-{i}"}) for i in range(5))
    assert sum(r.cost_nano for r in rows) == 5 * 1_000_000_000


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_reserved_and_session_usage_is_filed_under_the_set_it_was_sent_with(tmp_path, monkeypatch, core):
    catalog = CATALOG + '\n[meters.gpu]\ncredit_type = "usd"\nprice = "0.01"\n'
    path = tmp_path / "sets.toml"
    path.write_text(catalog)
    b = Billing(tmp_path, str(path), monkeypatch, core=core, start_ms=NOV_1 + 30_000)
    b.grant("c1", "usd", 10**13)
    holds = [(b.authorize("c1", "tokens", 5000, model="m-a", user=user), q)
             for user, q in (("alice", 1000), ("bob", 2000))]
    plain = b.authorize("c1", "tokens", 5000, model="m-b")  # only its price dimension
    default = b.authorize("c1", "calls", 10, model="m-z")  # priced by the meter's default: its rate has no set
    s = b.start_session("c1", "gpu", user="carol")
    b.run(b.engine.snapshot())
    for hold, quantity in holds:
        b.commit(hold.reservation_id, quantity)
    b.commit(plain.reservation_id, 500)
    b.commit(default.reservation_id, 7)
    b.advance(5_000)
    b.end_session(s.session_id)
    b.restart(clean=False)  # as after kill -9: the log after the snapshot is replayed
    b.flush()
    with Ledger(b.settings.ledger or f"sqlite:///{tmp_path}/data/ledger.sqlite3") as lg:
        rows = {(r.meter, r.dimensions): r.quantity for r in lg.usage_rows("c1", NOV_1, NOV_1 + 86_400_000)}
    assert rows == {("tokens", canonical_dimensions({"model": "m-a", "user": "alice"})): 1000,
                    ("tokens", canonical_dimensions({"model": "m-a", "user": "bob"})): 2000,
                    ("tokens", canonical_dimensions({"model": "m-b"})): 500,
                    ("calls", canonical_dimensions({"model": "m-z"})): 7,
                    ("gpu", canonical_dimensions({"user": "carol"})): 5}
    b.close()


def test_a_settlement_whose_set_does_not_fit_the_cap_is_filed_under_its_price_dimension(tmp_path, monkeypatch):
    import dataclasses
    b = Billing(tmp_path, write_catalog(tmp_path), monkeypatch, start_ms=NOV_1 + 30_000)
    b.settings = dataclasses.replace(b.settings, dimension_sets_per_window_max=2)
    b.restart()
    b.grant("c1", "usd", 10**13)
    holds = [b.authorize("c1", "tokens", 5000, model="m-a", user=f"u{i}") for i in range(3)]
    for hold in holds:
        b.commit(hold.reservation_id, 1000)  # never refused: the work was done
    b.flush()
    with Ledger(f"sqlite:///{tmp_path}/data/ledger.sqlite3") as lg:
        rows = sorted((r.dimensions, r.quantity) for r in lg.usage_rows("c1", NOV_1, NOV_1 + 86_400_000))
    assert rows == sorted([(canonical_dimensions({"model": "m-a", "user": "u0"}), 1000),
                           (canonical_dimensions({"model": "m-a", "user": "u1"}), 1000),
                           (canonical_dimensions({"model": "m-a"}), 1000)])
    b.close()
