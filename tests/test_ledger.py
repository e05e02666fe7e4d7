"""The central ledger on its own, the same tests on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import json
import re
import threading

import pytest

from meterd.errors import ConfigError, InvalidInput
from meterd.ledger import (
    SCHEMA_VERSION,
    CreditTypeInfo,
    Entry,
    Flush,
    Ledger,
    SchemaBehind,
    SidecarConflict,
    UsageRow,
    parse_url,
    period_bounds,
    redact,
    render_statement,
    statement,
    usage_query,
)

NOV = period_bounds("2026-11")[0]
DEC = period_bounds("2026-12")[0]
NANO = 10**9
USD = CreditTypeInfo("usd", "fiat", "USD", 2)
REQ = CreditTypeInfo("requests", "custom", "", 3)


def row(customer="acme", meter="tokens", dims='{"model":"gpt-4o"}', window=NOV, qty=1000, cost=2_500_000, events=1,
        agg="sum", ct="usd", precision=0) -> UsageRow:
    return UsageRow(customer, meter, dims, window, ct, agg, precision, qty, cost, events)


def entry(seq, kind="fee", customer="acme", ct="usd", amount=0, before=0, after=0, reference="pro period 1",
          charge=0, charge_ct="", at=NOV, detail="{}", source="") -> Entry:
    return Entry(seq, at, at, customer, kind, source, ct, amount, before, after, reference, charge, charge_ct, detail)


@pytest.fixture
def ledger(ledger_url: str):
    with Ledger(ledger_url) as lg:
        lg.migrate()
        yield lg


def test_migrations_are_versioned_and_applied_once(ledger_url):
    with Ledger(ledger_url) as lg:
        assert lg.schema_version() == 0
        with pytest.raises(SchemaBehind, match="meterd ledger migrate"):
            lg.check_schema()
        assert lg.migrate() == list(range(1, SCHEMA_VERSION + 1))
        assert lg.migrate() == []
        lg.check_schema()
        assert lg.schema_version() == SCHEMA_VERSION


def test_a_flush_is_applied_exactly_once(ledger):
    flush = Flush("sc-1", 1, [USD], [row(), row(qty=500, cost=1_250_000)],
                  [entry(1, charge=20 * NANO, charge_ct="usd")])
    assert ledger.apply_flush(flush) is True
    assert ledger.apply_flush(flush) is False  # a resend after a timeout or a crash
    assert ledger.totals() == {"events": 2, "cost_nano": 3_750_000, "rows": 1}
    assert len(ledger.entries("acme")) == 1
    assert ledger.last_sequence("sc-1") == 1
    # An older sequence is a duplicate too; the next one is applied.
    assert ledger.apply_flush(Flush("sc-1", 1, [USD], [row()], [])) is False
    assert ledger.apply_flush(Flush("sc-1", 2, [USD], [row()], [])) is True
    assert ledger.totals()["events"] == 3


def test_sidecars_have_their_own_sequences(ledger):
    assert ledger.apply_flush(Flush("sc-a", 1, [USD], [row()], [entry(1)]))
    assert ledger.apply_flush(Flush("sc-b", 1, [USD], [row()], [entry(1)]))  # same numbers, another sidecar
    assert ledger.totals()["events"] == 2
    assert len(ledger.entries("acme")) == 2


def test_one_sidecar_id_from_two_data_directories(ledger):
    def flush(seq, incarnation, first=False):
        return Flush("pod-0", seq, [USD], [row()], [entry(seq)], incarnation, first)

    assert ledger.apply_flush(flush(1, "a", first=True)) and ledger.apply_flush(flush(2, "a"))
    with pytest.raises(SidecarConflict, match="another data directory"):
        ledger.apply_flush(flush(1, "b", first=True))  # not after the ledger's last: refused, not swallowed
    assert ledger.apply_flush(flush(3, "b", first=True))  # a replacement continues the sequence
    assert ledger.apply_flush(flush(3, "b", first=True)) is False  # and its resend is a duplicate
    with pytest.raises(SidecarConflict):
        ledger.apply_flush(flush(3, "a"))  # the old directory may not flush any more
    assert ledger.totals()["events"] == 3 and len(ledger.entries("acme")) == 3


def test_concurrent_resends_of_one_flush_apply_once(ledger_url, ledger):
    flush = Flush("sc-1", 1, [USD], [row(customer=f"c{i}") for i in range(200)], [])
    results: list[bool] = []
    errors: list[BaseException] = []

    def send() -> None:
        try:
            with Ledger(ledger_url) as lg:
                results.append(lg.apply_flush(flush))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A loser either sees the sequence as applied or fails (unique key): never applies it twice.
    assert results.count(True) == 1, (results, errors)
    assert ledger.totals() == {"events": 200, "cost_nano": 200 * 2_500_000, "rows": 200}


def test_usage_merges_by_aggregation(ledger):
    ledger.apply_flush(Flush("sc-1", 1, [USD], [
        row(meter="seats", agg="max", qty=5, cost=0, dims="{}"),
        row(meter="tokens", qty=10, cost=1),
    ], []))
    ledger.apply_flush(Flush("sc-2", 1, [USD], [
        row(meter="seats", agg="max", qty=3, cost=0, dims="{}"),
        row(meter="tokens", qty=7, cost=2),
    ], []))
    got = {(r.meter, r.quantity, r.cost_nano, r.events) for r in ledger.usage_rows("acme", NOV, DEC)}
    assert got == {("seats", 5, 0, 2), ("tokens", 17, 3, 2)}


def test_entries_are_append_only(ledger):
    ledger.apply_flush(Flush("sc-1", 1, [USD], [], [entry(1)]))
    for sql in ("UPDATE meterd_entries SET amount_nano = 1", "DELETE FROM meterd_entries"):
        with pytest.raises(Exception, match="append-only"):
            ledger.conn.execute(sql)
    assert len(ledger.entries("acme")) == 1


def test_hostile_text_is_data_not_sql(ledger):
    evil = "x'); DROP TABLE meterd_usage; --"
    ledger.apply_flush(Flush("sc-'1", 1, [USD], [row(customer=evil, dims=json.dumps({"m": evil}))],
                             [entry(1, customer=evil, reference=evil)]))
    assert [r.customer_id for r in ledger.usage_rows(evil, NOV, DEC)] == [evil]
    assert ledger.entries(evil)[0].reference == evil
    assert ledger.last_sequence("sc-'1") == 1


def test_a_sum_beyond_64_bits_is_refused_not_rounded(ledger):
    big = (1 << 63) - 10
    ledger.apply_flush(Flush("sc-1", 1, [USD], [row(qty=big)], []))
    with pytest.raises(Exception):  # noqa: B017 - SQLite (CHECK) and PostgreSQL (bigint) word it differently
        ledger.apply_flush(Flush("sc-1", 2, [USD], [row(qty=big)], []))
    assert ledger.last_sequence("sc-1") == 1  # the failed flush left nothing behind
    assert ledger.usage_rows("acme", NOV, DEC)[0].quantity == big


def test_statement_sums_fees_overage_tiers_and_arrears_exactly(ledger):
    tiers = {"tiers": [{"tier": 1, "units_nano": 100 * NANO, "unit_price": "0.04", "charge_nano": 4 * NANO},
                       {"tier": 2, "units_nano": 3 * NANO, "unit_price": "1/30", "charge_nano": 100_000_000}]}
    ledger.apply_flush(Flush("sc-1", 1, [USD, REQ], [
        row(meter="gpu_seconds", dims='{"hardware":"h100"}', qty=1_000_500, precision=3, cost=1_525_762_500),
        row(meter="requests", dims='{"model":"o1"}', qty=13, ct="requests", cost=130 * NANO, events=13),
    ], [
        entry(1, "fee", charge=20 * NANO, charge_ct="usd", reference="pro period 1"),
        entry(2, "overage_charged", ct="requests", amount=103 * NANO, charge=4_100_000_000, charge_ct="usd",
              reference="cycle end", detail=json.dumps(tiers)),
        entry(3, "usage_billed", amount=1_525_762_500, charge=1_525_762_500, charge_ct="usd", reference="period 1",
              at=DEC - 1),
        entry(4, "fee", charge=20 * NANO, charge_ct="usd", reference="pro period 2", at=DEC),  # December's
    ]))
    st = statement(ledger, "acme", "2026-11")
    (total,) = st["totals"]
    # $20 fee + $4.10 overage + $1.5257625 of H100 seconds billed in arrears
    assert total["total_nano"] == 20 * NANO + 4_100_000_000 + 1_525_762_500
    assert total["usage_nano"] == 1_525_762_500 and total["credits_applied_nano"] == 0
    assert total["due_minor"] == 2562  # $25.6257625: 2,562 cents due, 0.57625 cents carried
    assert total["carried_out_nano"] == 5_762_500
    overage = next(x for x in st["lines"] if x["section"] == "overage")
    assert [t["charge_nano"] for t in overage["tiers"]] == [4 * NANO, 100_000_000]
    assert next(x for x in st["lines"] if x["section"] == "credits_used")["quantity"] == "13"
    dec = statement(ledger, "acme", "2026-12")["totals"][0]
    assert dec["carried_in_nano"] == 5_762_500
    assert dec["due_minor"] == 2000  # $20 + the carried 0.57625 cents stays under a cent
    text = render_statement(st)
    assert re.search(r"gpu_seconds \(hardware=h100\) +1000\.500 +usd +1\.5257625\n", text), text
    assert "Amount due: USD 25.62 " in text and "fees 40.00" not in text and "fees 20.00" in text


def test_statement_of_prepaid_usage_owes_nothing(ledger):
    ledger.apply_flush(Flush("sc-1", 1, [USD], [row(qty=1000, cost=2_500_000)], []))
    (total,) = statement(ledger, "acme", "2026-11")["totals"]
    assert (total["usage_nano"], total["credits_applied_nano"], total["total_nano"], total["due_minor"]) == \
        (2_500_000, 2_500_000, 0, 0)


def test_statement_rejects_bad_periods(ledger):
    for bad in ("2026-13", "november", "", "2026-1"):
        with pytest.raises(InvalidInput, match="period"):
            statement(ledger, "acme", bad)
    with pytest.raises(InvalidInput, match="customer_id"):
        statement(ledger, "", "2026-11")


def test_usage_query_groups_by_dimension_and_window(ledger):
    hour = 3_600_000
    ledger.apply_flush(Flush("sc-1", 1, [USD], [
        row(dims='{"model":"gpt-4o","project":"a"}', window=NOV, qty=100, cost=10),
        row(dims='{"model":"gpt-4o","project":"b"}', window=NOV + 60_000, qty=200, cost=20),
        row(dims='{"model":"mini"}', window=NOV + hour + 60_000, qty=5, cost=1),
        row(meter="other", dims="{}", window=NOV, qty=9, cost=9),
    ], []))
    rows = usage_query(ledger, "acme", "tokens", NOV, DEC, ["model"], "hour")
    assert [(r["window_start_ms"], r["model"], r["quantity"], r["cost_nano"], r["events"]) for r in rows] == [
        (NOV, "gpt-4o", "300", 30, 2), (NOV + hour, "mini", "5", 1, 1)]
    whole = usage_query(ledger, "acme", None, NOV, DEC)
    assert [(r["meter"], r["quantity"]) for r in whole] == [("other", "9"), ("tokens", "305")]
    with pytest.raises(InvalidInput, match="window"):
        usage_query(ledger, "acme", None, NOV, DEC, [], "fortnight")


def test_urls_are_checked_and_passwords_never_shown():
    assert parse_url("sqlite:///rel/l.db") == ("sqlite", "rel/l.db")
    assert parse_url("sqlite:////abs/l.db") == ("sqlite", "/abs/l.db")
    assert parse_url("postgresql://u@h/db")[0] == "postgresql"
    for bad in ("mysql://x", "sqlite:///", "postgresql:///db"):
        with pytest.raises(ConfigError, match="ledger URL"):
            parse_url(bad)
    assert redact("postgresql://user:s3cret@host:5432/db") == "postgresql://user:***@host:5432/db"
    with pytest.raises(ConfigError) as e:
        parse_url("mysql://user:s3cret@host/db")
    assert "s3cret" not in str(e.value)
