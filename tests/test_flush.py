"""Sidecars flush usage and audit entries to the central ledger exactly once:
across crashes at any point of a flush, while the ledger is away, and with
several sidecars sharing one ledger. Same tests on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from billing import Billing
from conftest import async_wait_until, drop_postgres_database, free_port, new_postgres_database, wait_until
from test_crash import COST_NANO, GRANT_NANO, Client, wait_for_progress

from meterd import drain as drain_mod
from meterd import snapshots as snapshots_mod
from meterd import wire
from meterd.ledger import Ledger, period_bounds
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

NOV_1 = period_bounds("2026-11")[0]
KILLS = 40 if os.environ.get("METERD_SOAK") else 8


def tokens(customer: str, n: int, model: str = "gpt-4o", **dims: str) -> list[pb.UsageEvent]:
    return [pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=1000,
                          dimensions={"model": model, **dims}) for _ in range(n)]


def funded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ledger_url: str) -> Billing:
    """An engine on the OpenAI-style catalog whose customer newco holds $10."""
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url)
    b.grant("newco", "usd", 10**10)
    return b


def ledger_totals(url: str) -> dict:
    with Ledger(url) as lg:
        lg.migrate()
        return lg.totals()


def test_usage_and_audit_entries_reach_the_ledger_aggregated(ledger_url, tmp_path, monkeypatch):
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1 + 3_600_000, ledger=ledger_url)
    b.grant("newco", "usd", 10 * 10**9, source="topup")
    assert b.batch(tokens("newco", 3) + tokens("newco", 2, project="p1")).accepted == 5
    b.advance(60_000)
    assert b.batch(tokens("newco", 1)).accepted == 1
    b.flush()
    with Ledger(ledger_url) as lg:
        rows = lg.usage_rows("newco", NOV_1, NOV_1 + 86_400_000)
        # One row per dimension set and minute; 1,000 gpt-4o input tokens cost $0.0025.
        assert [(r.dimensions, r.window_start_ms - NOV_1, r.quantity, r.cost_nano, r.events) for r in rows] == [
            ('{"model":"gpt-4o","project":"p1"}', 3_600_000, 2000, 5_000_000, 2),
            ('{"model":"gpt-4o"}', 3_600_000, 3000, 7_500_000, 3),
            ('{"model":"gpt-4o"}', 3_660_000, 1000, 2_500_000, 1)]
        kinds = [(e.kind, e.source, e.amount_nano, e.balance_before_nano, e.balance_after_nano)
                 for e in lg.entries("newco")]
    # The grant, then the usage of the flush window as one deduction with the balances around it.
    assert kinds == [("grant", "topup", 10 * 10**9, 0, 10 * 10**9),
                     ("deducted", "usage", -15_000_000, 10 * 10**9, 10 * 10**9 - 15_000_000)]
    status = b.engine.ledger_status()
    assert (status.flushed_sequence, status.backlog_usage_rows, status.backlog_entries) == (1, 0, 0)
    # Refunds and manual corrections are kinds of their own.
    b.grant("newco", "usd", 2 * 10**9, source="refund")
    b.run(wire.adjust(b.engine, apb.AdjustRequest(customer_id="newco", credit_type="usd", amount_nano=-10**9,
                                            reason="duplicate charge reversed")))
    b.flush()
    with Ledger(ledger_url) as lg:
        tail = [(e.kind, e.source, e.amount_nano, e.reference) for e in lg.entries("newco")[2:]]
    assert tail == [("refund", "refund", 2 * 10**9, "g_3 refund"),  # g_1 is the catalog's, g_2 the top-up
                    ("adjust", "adjust", -10**9, "duplicate charge reversed")]
    b.close()


@pytest.mark.spawns
def test_the_cli_reads_statements_and_usage_from_the_ledger(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/ledger.db"
    b = Billing(tmp_path, "replicate", monkeypatch, start_ms=NOV_1, ledger=url)
    b.report("lab", "gpu_seconds", "1000.5", hardware="nvidia-h100")  # x $0.001525 = $1.5257625
    b.flush()
    b.close()

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meterd", *args, "--ledger", url], capture_output=True,
                              text=True, timeout=60)

    r = cli("usage", "--customer", "lab", "--from", "2026-11-01", "--to", "2026-12-01", "--group-by", "hardware",
            "--window", "day", "--json")
    assert r.returncode == 0, r.stderr
    assert [(x["hardware"], x["quantity"], x["cost_nano"]) for x in json.loads(r.stdout)] == [
        ("nvidia-h100", "1000.500", 1_525_762_500)]
    r = cli("statement", "--customer", "lab", "--period", "2026-11")
    assert r.returncode == 0, r.stderr
    assert "gpu_seconds (hardware=nvidia-h100)" in r.stdout and "1.5257625" in r.stdout
    r = cli("statement", "--customer", "lab", "--period", "2026-13")
    assert r.returncode == 2 and r.stderr.startswith("meterd: --period: '2026-13' is not a month like 2026-11, a "
                                                     "range like 2026-11-14..2026-12-14, or billing"), r.stderr
    r = subprocess.run([sys.executable, "-m", "meterd", "statement", "--customer", "lab", "--period", "2026-11",
                        "--ledger", "mysql://u:secret@h/db"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "ledger URL" in r.stderr and "secret" not in r.stderr


def test_a_crash_after_the_ledger_committed_does_not_count_twice(ledger_url, tmp_path, monkeypatch):
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url)
    b.grant("acme", "usd", 10 * 10**9)
    b.batch(tokens("acme", 4))
    b.run(b.engine.snapshot())
    pending = b.run(b.engine.flusher.prepare_flush())
    assert b.run(b.engine.flusher.send_flush(pending)) is True
    b.restart(clean=False)  # dies before it could forget what the ledger has
    assert b.engine.ledger_status().backlog_usage_rows == 1
    b.batch(tokens("acme", 1))
    b.flush()  # resends flush 1 (the ledger says it has it), then sends flush 2
    assert ledger_totals(ledger_url)["events"] == 5
    assert b.engine.ledger_status().flushed_sequence == 2
    b.close()


def test_a_crash_before_the_snapshot_is_replayed_into_the_aggregates(ledger_url, tmp_path, monkeypatch):
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url)
    b.grant("acme", "usd", 10 * 10**9)
    b.batch(tokens("acme", 2))
    b.flush()
    b.batch(tokens("acme", 3))  # in the log only
    b.restart(clean=False)
    b.flush()
    b.restart(clean=False)  # nothing new: nothing is sent twice
    b.flush()
    assert ledger_totals(ledger_url) == {"events": 5, "cost_nano": 5 * 2_500_000, "rows": 1}
    b.close()


def test_a_catalog_reload_keeps_the_usage_it_had_not_flushed(ledger_url, tmp_path, monkeypatch):
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url)
    b.grant("acme", "usd", 10 * 10**9)
    b.batch(tokens("acme", 2))
    b.run(b.engine.reload_catalog(b.catalog))
    b.batch(tokens("acme", 1))
    b.flush()
    assert ledger_totals(ledger_url)["events"] == 3
    b.close()


def _break(url: str, tmp_path: Path, postgres_url: str | None) -> str:
    """A URL of this backend that fails now and works once _mend has run."""
    if url.startswith("sqlite"):
        blocker = tmp_path / "later"
        blocker.write_text("a file where the ledger's directory should be")
        return f"sqlite:///{blocker}/ledger.db"
    assert postgres_url is not None
    return url.rsplit("/", 1)[0] + "/meterd_not_yet_" + str(os.getpid())


def _mend(url: str, tmp_path: Path, postgres_url: str | None) -> None:
    if url.startswith("sqlite"):
        (tmp_path / "later").unlink()
        (tmp_path / "later").mkdir()
        return
    import psycopg
    name = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    # PostgreSQL ledgers are migrated by the operator, not by the sidecar.
    r = subprocess.run([sys.executable, "-m", "meterd", "ledger", "migrate", "--ledger", url],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_the_sidecar_serves_while_the_ledger_is_away_and_catches_up(ledger_url, tmp_path, make_daemon, request):
    postgres_url = request.getfixturevalue("postgres_url") if ledger_url.startswith("postgres") else None
    url = _break(ledger_url, tmp_path, postgres_url)
    metrics = free_port()
    d = make_daemon(extra_env={"METERD_LEDGER": url, "METERD_LEDGER_FLUSH_INTERVAL_S": "0.1",
                               "METERD_LEDGER_RETRY_MAX_S": "0.5", "METERD_LEDGER_FLUSH_ROWS_MAX": "7",
                               "METERD_METRICS_LISTEN": f"127.0.0.1:{metrics}"}).start()
    try:
        d.admin.Grant(apb.GrantRequest(customer_id="away", credit_type="usd", amount_nano=GRANT_NANO))
        acked = 0
        for i in range(30):
            events = [pb.UsageEvent(customer_id="away", meter="input_tokens", quantity=1,
                                    dimensions={"model": "gpt-4o", "n": str(i)})]
            r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="c", sequence=i + 1, events=events * 3))
            acked += r.accepted

        def failed_with_all_rows() -> apb.LedgerStatus | None:  # each attempt first moves new usage into LMDB
            status = d.admin.GetLedgerStatus(apb.LedgerStatusRequest())
            return status if status.backlog_usage_rows == 30 and status.consecutive_failures > 0 else None

        status = wait_until(failed_with_all_rows, "a failed flush attempt after all 30 rows")
        assert status.consecutive_failures > 0 and status.last_error
        assert status.backlog_usage_rows == 30 and status.flushed_sequence == 0
        assert "failed" in d.log_path.read_text()  # the warning names the backlog
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10).read().decode()
        assert 'meterd_ledger_backlog{kind="usage_rows"} 30.0' in scraped
        assert re.search(r'meterd_ledger_flushes_total\{outcome="failed"\} [1-9]', scraped)
        _mend(url, tmp_path, postgres_url)

        def drained() -> apb.LedgerStatus | None:
            # The last flush's rows leave LMDB in the commit that records its sequence, and the
            # status learns the sequence just after that commit: wait for both.
            status = d.admin.GetLedgerStatus(apb.LedgerStatusRequest())
            return status if status.backlog_usage_rows == 0 and status.backlog_entries == 0 \
                and status.flushed_sequence >= 5 else None

        status = wait_until(drained, "the backlog to reach the mended ledger")
        assert (status.backlog_usage_rows, status.backlog_entries, status.last_error) == (0, 0, "")
        assert status.flushed_sequence >= 5  # 30 rows and the entries, at most 7 of each per flush
        assert ledger_totals(url) == {"events": acked, "cost_nano": acked * COST_NANO, "rows": 30}
    finally:
        d.stop()
        if postgres_url is not None:
            drop_postgres_database(postgres_url, url)


def test_many_sidecars_killed_mid_flush_leave_exact_ledger_totals(ledger_url, make_daemon, tmp_path):
    # SQLite is shared by processes of one machine; PostgreSQL by any number of machines.
    ledger_totals(ledger_url)  # migrated by the operator first
    sidecars = []
    for s in range(3):
        d = make_daemon(name=f"sidecar{s}", extra_env={"METERD_LEDGER": ledger_url,
                                                       "METERD_LEDGER_FLUSH_INTERVAL_S": "0.05",
                                                       "METERD_SNAPSHOT_INTERVAL_S": "0.2"}).start()
        sidecars.append(d)
    stop = threading.Event()
    clients = []
    for s, d in enumerate(sidecars):
        for k in range(2):
            n = s * 10 + k
            d.admin.Grant(apb.GrantRequest(customer_id=f"crash-{n}", credit_type="usd", amount_nano=GRANT_NANO))
            clients.append(Client(d.target, n, unary=False, stop=stop))
    for c in clients:
        c.start()
    rng = random.Random(11)
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.2, 0.6))  # when to kill, and which: random inputs, nothing waits on them
        victim = rng.choice(sidecars)
        victim.kill()
        victim.start()
        wait_for_progress(clients)  # the load is on again before the next kill
    stop.set()
    for c in clients:
        c.join(60)
        assert not c.is_alive()
    ids = set()
    for d in sidecars:
        ids.add(d.admin.GetLedgerStatus(apb.LedgerStatusRequest()).sidecar_id)
        d.stop()  # a graceful stop flushes what is left
    assert len(ids) == 3  # each keeps its own id across restarts
    acked = sum(c.acked_events for c in clients)
    assert acked > 0 and sum(c.retries for c in clients) > 0
    totals = ledger_totals(ledger_url)
    assert (totals["events"], totals["cost_nano"]) == (acked, acked * COST_NANO)
    resent = sum(d.log_path.read_text().count("already in the ledger") for d in sidecars)
    print(f"acked {acked} events; {resent} flushes were resent after a kill and not applied twice")
    with Ledger(ledger_url) as lg:
        for c in clients:
            used = sum(r.events for r in lg.usage_rows(c.customer, 0, 1 << 62))
            deducted = -sum(e.amount_nano for e in lg.entries(c.customer) if e.kind == "deducted")
            assert (used, deducted) == (c.acked_events, c.acked_events * COST_NANO), c.customer


@pytest.fixture
def pg_ledger(postgres_url):
    url = new_postgres_database(postgres_url)
    yield url
    drop_postgres_database(postgres_url, url)


def test_a_postgresql_ledger_must_be_migrated_by_the_operator(pg_ledger, make_daemon):
    d = make_daemon(extra_env={"METERD_LEDGER": pg_ledger, "METERD_LEDGER_FLUSH_INTERVAL_S": "0.1"}).start()
    try:
        d.meter.Report(pb.ReportRequest(event=tokens("demo", 1)[0]))
        wait_until(lambda: d.admin.GetLedgerStatus(apb.LedgerStatusRequest()).last_error, "a failed flush")
        assert "meterd ledger migrate" in d.admin.GetLedgerStatus(apb.LedgerStatusRequest()).last_error
        r = subprocess.run([sys.executable, "-m", "meterd", "ledger", "migrate", "--ledger", pg_ledger],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "schema at version" in r.stdout, r.stderr
        st = d.admin.GetStatement(apb.StatementRequest(customer_id="demo", period=time.strftime("%Y-%m")))
        assert any(x.section == "usage" and x.amount_nano == 2_500_000 for x in st.lines), st
    finally:
        d.stop()


def test_a_new_data_directory_under_a_known_sidecar_id_continues_its_sequence(ledger_url, tmp_path, monkeypatch):
    # A pod with a fixed sidecar_id whose data directory (an emptyDir) is lost on restart.
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url, sidecar_id="pod-0")
    b.grant("newco", "usd", 10**10)
    for _ in range(3):
        b.batch(tokens("newco", 5))
        b.flush()
    b.close()
    shutil.rmtree(b.settings.data_dir)
    b = Billing(tmp_path, "openai", monkeypatch, start_ms=NOV_1 + 60_000, ledger=ledger_url, sidecar_id="pod-0")
    b.grant("newco", "usd", 10**10)
    b.batch(tokens("newco", 7))
    b.flush()
    assert b.engine.ledger_status().flushed_sequence == 4  # after the ledger's 3
    assert ledger_totals(ledger_url)["events"] == 22
    b.close()


def test_two_data_directories_under_one_sidecar_id_are_refused_not_merged(ledger_url, tmp_path, monkeypatch):
    a = Billing(tmp_path / "a", "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url, sidecar_id="same")
    b = Billing(tmp_path / "b", "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url, sidecar_id="same")
    for x in (a, b):
        x.grant("newco", "usd", 10**10)
        x.batch(tokens("newco", 2))
    a.flush()
    b.flush()  # b's first flush takes the id over (a replaced pod looks the same)
    a.batch(tokens("newco", 1))
    with pytest.raises(Exception, match="another data directory"):
        a.flush()
    assert a.engine.ledger_status().backlog_usage_rows == 1
    assert ledger_totals(ledger_url)["events"] == 4  # a's last event waits in its LMDB, not lost or merged
    a.close()
    b.close()


def test_a_pending_flush_keeps_its_rows_when_the_limit_is_lowered(ledger_url, tmp_path, monkeypatch):
    b = funded(tmp_path, monkeypatch, ledger_url)
    for _ in range(10):  # ten snapshots: ten usage rows
        b.batch(tokens("newco", 1))
        b.advance(60_000)
        b.run(b.engine.snapshot())
    assert b.engine.backlog()[0] == 10
    assert b.run(b.engine.flusher.prepare_flush())["rows"][0] == 10
    b.settings = dataclasses.replace(b.settings, ledger_flush_rows_max=3)  # lowered before the resend
    b.restart(clean=False)
    b.flush()
    assert b.engine.backlog() == (0, 0)
    assert ledger_totals(ledger_url)["events"] == 10
    b.close()


def test_a_snapshot_that_fails_early_does_not_resend_the_last_drain(ledger_url, tmp_path, monkeypatch):
    b = funded(tmp_path, monkeypatch, ledger_url)
    b.batch(tokens("newco", 5))
    b.run(b.engine.snapshot())  # drained and committed
    b.batch(tokens("newco", 1))
    real = drain_mod.Drains.done
    calls: list[int] = []

    def fails_once(self):  # the snapshot's first step, before it takes anything from the core
        real(self)
        if not calls:
            calls.append(1)
            raise MemoryError("injected")

    monkeypatch.setattr(drain_mod.Drains, "done", fails_once)
    with pytest.raises(MemoryError):
        b.run(b.engine.snapshot())
    monkeypatch.setattr(drain_mod.Drains, "done", real)
    b.flush()
    assert ledger_totals(ledger_url)["events"] == 6
    b.close()


def test_accounts_without_a_plan_have_their_gauges_on_the_month_they_used(ledger_url, tmp_path, monkeypatch):
    b = Billing(tmp_path, "hybrid", monkeypatch, start_ms=NOV_1 + 86_400_000, ledger=ledger_url)
    b.tick()
    b.grant("solo", "usd", 100 * 10**9)  # no plan: calendar months
    assert b.report("solo", "seats", 7).decision == pb.DECISION_ALLOW  # the month's most: 7 x $8
    b.now_ms = period_bounds("2026-12")[0] + 1000
    b.tick()
    b.flush()
    seats = [x["amount_nano"] for x in b.statement("solo", "2026-11")["lines"] if x["description"] == "seats=7"]
    assert seats == [56 * 10**9]
    assert not [x for x in b.statement("solo", "2026-12")["lines"] if x["description"].startswith("seats=")]
    b.close()


def test_a_snapshot_whose_encoding_fails_keeps_the_aggregates_for_the_next(ledger_url, tmp_path, monkeypatch):
    b = funded(tmp_path, monkeypatch, ledger_url)
    b.batch(tokens("newco", 2))
    real = snapshots_mod.Snapshots._encode
    calls: list[int] = []

    def fails_once(self, *args):
        if not calls:
            calls.append(1)
            raise MemoryError("injected")
        return real(self, *args)

    monkeypatch.setattr(snapshots_mod.Snapshots, "_encode", fails_once)
    with pytest.raises(MemoryError):
        b.run(b.engine.snapshot())  # the aggregates were taken from the core: they must not vanish
    b.batch(tokens("newco", 3, model="gpt-4o-mini"))
    b.flush()
    b.restart(clean=False)
    b.flush()
    with Ledger(ledger_url) as lg:
        got = sorted((r.dimensions, r.events) for r in lg.usage_rows("newco", 0, 1 << 62))
    assert got == [('{"model":"gpt-4o"}', 2), ('{"model":"gpt-4o-mini"}', 3)]
    b.close()


def test_a_replacement_whose_first_flush_lost_the_race_renumbers_it(ledger_url, tmp_path, monkeypatch):
    old = Billing(tmp_path / "old", "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url, sidecar_id="pod-0")
    new = Billing(tmp_path / "new", "openai", monkeypatch, start_ms=NOV_1, ledger=ledger_url, sidecar_id="pod-0")
    for b in (old, new):
        b.grant("newco", "usd", 10**10)
    old.batch(tokens("newco", 1))
    old.flush()  # the ledger has pod-0's flush 1
    new.batch(tokens("newco", 2))
    new.run(new.engine.snapshot())
    assert new.run(new.engine.flusher.prepare_flush())["seq"] == 2  # recorded as flush 2...
    old.batch(tokens("newco", 4))
    old.close()  # ...but the old pod's last flush, on SIGTERM, is flush 2
    new.flush()  # renumbered after the ledger's last, not refused forever
    assert new.engine.backlog() == (0, 0)
    assert ledger_totals(ledger_url)["events"] == 7
    new.close()


def _landed(b: Billing, ops: list) -> bool:
    """Whether LMDB holds what ``ops`` wrote."""
    final = {(db, key): value for db, key, value in ops if db != "trim"}
    return all(b.engine.store.get(db, key) == value for (db, key), value in final.items())


def _cancel_during_commit(b: Billing, submitted_when, start) -> None:
    """Cancel ``start()`` while the commit it submitted is waiting in the writer."""
    engine = b.engine
    engine.store.window_s = 0.3  # the writer holds commits back for 0.3 s
    submitted: list[list] = []
    real = engine.journal.commit

    async def spy(ops, maintenance=False):
        submitted.append(ops)
        await real(ops, maintenance)

    engine.journal.commit = spy  # type: ignore[method-assign]

    async def drive() -> None:
        task = asyncio.ensure_future(start())
        while not (submitted and submitted_when(submitted[-1])):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await async_wait_until(lambda: _landed(b, submitted[-1]), "the commit to land all the same")

    b.run(drive())
    engine.store.window_s = 0
    del engine.journal.commit


def test_a_cancelled_snapshot_does_not_count_its_usage_twice(ledger_url, tmp_path, monkeypatch):
    b = funded(tmp_path, monkeypatch, ledger_url)
    b.batch(tokens("newco", 5))
    _cancel_during_commit(b, lambda ops: any(op[0] == "usage" for op in ops), b.engine.snapshot)
    b.batch(tokens("newco", 1))
    b.flush()
    assert ledger_totals(ledger_url)["events"] == 6
    b.close()


def test_a_cancelled_flush_does_not_reuse_its_sequence(ledger_url, tmp_path, monkeypatch):
    # A client's deadline on GetStatement cancels the handler while its flush commits.
    b = funded(tmp_path, monkeypatch, ledger_url)
    b.batch(tokens("newco", 5))
    b.flush()
    b.batch(tokens("newco", 2))
    _cancel_during_commit(b, lambda ops: any(op[1] == b"flush_seq" for op in ops), b.engine.flush_once)
    b.batch(tokens("newco", 3))
    b.flush()
    assert ledger_totals(ledger_url)["events"] == 10 and b.engine.backlog() == (0, 0)
    b.close()


def test_get_statement_names_a_bad_field(make_daemon):
    d = make_daemon().start()
    for req, field in ((apb.StatementRequest(customer_id="demo", period="2026-13"), "period"),
                       (apb.StatementRequest(customer_id="", period="2026-11"), "customer_id")):
        with pytest.raises(grpc.RpcError) as e:
            d.admin.GetStatement(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith(field)
