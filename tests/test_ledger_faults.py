"""The ledger fails a transaction midway, or is made slow by a lock another
client holds: the sidecar keeps serving, and the ledger converges exactly
once the fault is gone. On SQLite and on a real PostgreSQL."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from conftest import (
    drop_postgres_database,
    new_postgres_database,
    wait_until,
)

from meterd.ledger import Ledger
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

COST_NANO = 2_500  # one gpt-4o input token
GRANT_NANO = 10**15

SQLITE_FAULT = """
CREATE TABLE fault_switch (armed INTEGER NOT NULL);
INSERT INTO fault_switch VALUES (1);
CREATE TRIGGER fault_midway BEFORE INSERT ON meterd_entries
WHEN (SELECT armed FROM fault_switch) = 1
BEGIN SELECT RAISE(ABORT, 'injected fault'); END;
"""
POSTGRES_FAULT = """
CREATE TABLE fault_switch (armed BOOLEAN NOT NULL);
INSERT INTO fault_switch VALUES (TRUE);
CREATE FUNCTION fault_midway() RETURNS trigger AS $$
BEGIN
  IF (SELECT armed FROM fault_switch) THEN RAISE EXCEPTION 'injected fault'; END IF;
  RETURN NEW;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER fault_midway BEFORE INSERT ON meterd_entries FOR EACH ROW EXECUTE FUNCTION fault_midway();
"""


class Admin:
    """A second client of the ledger's database: injects faults and holds locks."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            self.conn = sqlite3.connect(url[len("sqlite:///"):], isolation_level=None, check_same_thread=False)
        else:
            import psycopg
            self.conn = psycopg.connect(url, autocommit=True)

    def run(self, sql: str) -> None:
        if self.url.startswith("sqlite"):
            self.conn.executescript(sql)
        else:
            self.conn.execute(sql)

    def arm(self, on: bool) -> None:
        if self.url.startswith("sqlite"):
            self.run(f"UPDATE fault_switch SET armed = {int(on)}")
        else:
            self.run(f"UPDATE fault_switch SET armed = {'TRUE' if on else 'FALSE'}")

    def hold_lock(self, release: threading.Event) -> threading.Thread:
        """Lock the usage table in a transaction, from another thread, until ``release`` is set."""
        started = threading.Event()

        def hold() -> None:
            if self.url.startswith("sqlite"):
                self.conn.execute("BEGIN EXCLUSIVE")
                started.set()
                release.wait(120)
                self.conn.execute("COMMIT")
            else:
                with self.conn.transaction():
                    self.conn.execute("LOCK TABLE meterd_usage IN ACCESS EXCLUSIVE MODE")
                    started.set()
                    release.wait(120)

        t = threading.Thread(target=hold)
        t.start()
        assert started.wait(10)
        return t


@pytest.fixture
def ledger(ledger_url, request):
    """A migrated ledger of its own (a new database on PostgreSQL)."""
    url, postgres_url = ledger_url, None
    if ledger_url.startswith("postgres"):
        postgres_url = request.getfixturevalue("postgres_url")
        url = new_postgres_database(postgres_url)
    with Ledger(url) as lg:
        lg.migrate()
    yield url
    if postgres_url is not None:
        drop_postgres_database(postgres_url, url)


def _wait_status(d, done, timeout_s: float = 60.0):
    def status():
        s = d.admin.GetLedgerStatus(apb.LedgerStatusRequest())
        return s if done(s) else None
    return wait_until(status, "the ledger status to change", timeout_s)


def test_a_transaction_failing_midway_and_a_slow_ledger_converge_exactly(ledger, make_daemon):
    admin = Admin(ledger)
    d = make_daemon(extra_env={"METERD_LEDGER": ledger, "METERD_LEDGER_FLUSH_INTERVAL_S": "0.1",
                               "METERD_LEDGER_RETRY_MAX_S": "0.3", "METERD_LEDGER_TIMEOUT_S": "1",
                               "METERD_SNAPSHOT_INTERVAL_S": "0.2"}).start()
    d.admin.Grant(apb.GrantRequest(customer_id="faulty", credit_type="usd", amount_nano=GRANT_NANO))
    acked, seq = 0, 0

    def send(batches: int) -> None:
        nonlocal acked, seq
        for _ in range(batches):
            seq += 1
            event = pb.UsageEvent(customer_id="faulty", meter="input_tokens", quantity=1,
                                  dimensions={"model": "gpt-4o", "batch": str(seq % 7)})
            r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 5),
                                    timeout=10)
            assert r.accepted == 5  # the data plane keeps answering whatever the ledger does
            acked += 5

    send(10)
    _wait_status(d, lambda s: s.backlog_usage_rows == 0 and s.backlog_entries == 0 and s.flushed_sequence > 0)
    before = d.admin.GetLedgerStatus(apb.LedgerStatusRequest()).flushed_sequence
    with Ledger(ledger) as lg:
        events_before = lg.totals()["events"]

    # 1. Every flush transaction now fails after its usage rows, at its first entry.
    admin.run(SQLITE_FAULT if ledger.startswith("sqlite") else POSTGRES_FAULT)
    send(20)
    status = _wait_status(d, lambda s: s.consecutive_failures >= 3)
    assert "injected fault" in status.last_error and status.flushed_sequence == before
    with Ledger(ledger) as lg:  # the failed transactions left nothing behind
        assert lg.totals()["events"] == events_before
    admin.arm(False)
    _wait_status(d, lambda s: s.backlog_usage_rows == 0 and s.backlog_entries == 0 and not s.last_error)

    # 2. Another client holds a lock on the usage table until a flush has failed for it.
    release = threading.Event()
    holder = admin.hold_lock(release)
    send(20)
    status = _wait_status(d, lambda s: s.consecutive_failures >= 1)
    release.set()
    holder.join()
    _wait_status(d, lambda s: s.backlog_usage_rows == 0 and s.backlog_entries == 0 and not s.last_error)
    assert d.stop() == 0
    with Ledger(ledger) as lg:
        assert lg.totals()["events"] == acked == 250
        assert lg.totals()["cost_nano"] == acked * COST_NANO
        deducted = -sum(e.amount_nano for e in lg.entries("faulty") if e.kind == "deducted")
        assert deducted == acked * COST_NANO
    log = d.log_path.read_text()
    assert "injected fault" in log
    # The lock outlasted the ledger's timeout: the flush failed, and was retried once the lock was gone.
    assert "the ledger did not answer in time" in status.last_error or "statement timeout" in status.last_error
    if ledger.startswith("postgres"):
        assert "the ledger did not answer in time" in log or "statement timeout" in log


def test_a_postgresql_server_stopped_for_a_while_is_caught_up_with_exactly(make_daemon, own_postgres):
    """A PostgreSQL server of the test's own is stopped and started again on the same port."""
    server = own_postgres
    url = server("start")
    with Ledger(url) as lg:
        lg.migrate()
    d = make_daemon(extra_env={"METERD_LEDGER": url, "METERD_LEDGER_FLUSH_INTERVAL_S": "0.1",
                               "METERD_LEDGER_RETRY_MAX_S": "0.3", "METERD_LEDGER_TIMEOUT_S": "2",
                               "METERD_SNAPSHOT_INTERVAL_S": "0.2"}).start()
    d.admin.Grant(apb.GrantRequest(customer_id="stopped", credit_type="usd", amount_nano=GRANT_NANO))
    acked = 0
    for seq in range(1, 41):
        if seq == 11:
            _wait_status(d, lambda s: s.flushed_sequence > 0 and s.backlog_usage_rows == 0)
            server("stop")
        event = pb.UsageEvent(customer_id="stopped", meter="input_tokens", quantity=1,
                              dimensions={"model": "gpt-4o", "n": str(seq % 5)})
        acked += d.meter.ReportBatch(pb.ReportBatchRequest(client_id="s", sequence=seq, events=[event] * 3),
                                     timeout=10).accepted  # served while the ledger is down
    status = _wait_status(d, lambda s: s.consecutive_failures >= 2)
    assert status.last_error and status.backlog_usage_rows > 0
    assert server("start") == url
    _wait_status(d, lambda s: s.backlog_usage_rows == 0 and s.backlog_entries == 0 and not s.last_error)
    assert d.stop() == 0
    with Ledger(url) as lg:
        assert lg.totals()["events"] == acked == 120
        assert lg.totals()["cost_nano"] == acked * COST_NANO
