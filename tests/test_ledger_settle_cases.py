"""A flush's settlements, and top-up requests around a roll, in ledger mode. Each case failed on an earlier version."""
# ruff: noqa: F811 - capped_pair is a fixture of the cancel cases
from __future__ import annotations

import threading

from billing import NANO, START_MS
from test_ledger_cancel_cases import capped_pair  # noqa: F401 - a fixture
from test_ledger_plans import CAPPED, Central
from test_ledger_plans_sidecars import gpt

from meterd.escrow import Escrow
from meterd.ledger import Ledger, Settlement
from meterd.v1 import meter_pb2 as pb

T0 = 1_800_000_000_000


# Failed before its fix: Escrow._prefetch locks a chunk's balance rows with one
# "ORDER BY customer_id, credit_type ... FOR UPDATE", i.e. in the order of the database's collation, while every
# other transaction that locks several balance rows (acquire_many: sorted(wants); _release_leases: sorted(...);
# LedgerPlans._lock_sums: sorted(names)) and settle itself before this change lock them in Python's (code point)
# order. On a PostgreSQL database whose collation is not "C" (initdb's default takes the OS locale, e.g.
# en_US.UTF-8; here an ICU en-US database) the two orders differ for ids such as "Zeta" and "alpha" (or
# "cus_Ab"/"cus_aZ", "acme-1"/"acme1"), and a flush deadlocks with a concurrent lease call of the same customers.
def test_a_flush_and_a_lease_call_lock_balance_rows_in_one_order_whatever_the_collation(postgres_url):
    import uuid

    import psycopg
    from conftest import _postgres_database_url, drop_postgres_database
    from psycopg import sql

    name = f"meterd_test_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' "
                             "LOCALE 'C'").format(sql.Identifier(name)))
    url = _postgres_database_url(postgres_url, name)
    first, second = sorted(["alpha", "Zeta"])  # Python's order, every other locker's: "Zeta", then "alpha"
    try:
        with Ledger(url) as a, Ledger(url) as b, Ledger(url) as watch:
            a.migrate()
            ea, eb = Escrow(a), Escrow(b)
            for cust in (first, second):
                ea.grant(cust, "usd", 1_000, 0, 0, "api", "", T0)
            ea.acquire_many("s1", "i1", [(first, "usd", 100, 100), (second, "usd", 100, 100)], 1, T0)
            (pid_b,), = b._rows("SELECT pg_backend_pid()")
            a._exec("SET deadlock_timeout = '20ms'")
            errors: list[BaseException] = []

            def flush() -> None:  # s1's flush settles both leases
                try:
                    with b._transaction():
                        eb.settle("s1", "i1", [Settlement(first, "usd", 10), Settlement(second, "usd", 10)], T0 + 1)
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            # Another sidecar's acquire_many of both customers: it locks sorted(wants), "Zeta" first ...
            with a._transaction():
                ea._sums(first, "usd", False, T0 + 1)
                t = threading.Thread(target=flush)
                t.start()
                for _ in range(100_000):  # ... while the flush waits for a row lock
                    (waiting,), = watch._rows("SELECT count(*) FROM pg_stat_activity WHERE pid = ? AND "
                                              "wait_event_type = 'Lock'", (pid_b,))
                    if waiting or not t.is_alive():
                        break
                try:
                    ea._sums(second, "usd", False, T0 + 1)  # ... then "alpha", which the flush locked first
                except psycopg.errors.DeadlockDetected as e:
                    errors.append(e)
            t.join()  # the lease call committed (or was chosen as the deadlock's victim): the flush goes on
            assert not errors
            assert Escrow(watch).check() == []
    finally:
        drop_postgres_database(postgres_url, url)


# Failed before its fix (top-up requests asked in Escrow._put_sums): a roll that waits for a lease (roll(): step
# "done") still writes the balance rows (_put_all), after _lock_sums expired the period's credits left centrally
# at the boundary (lazily, unaudited: the roll gives them back with _unexpire). _put_sums now compares that
# balance with the one read and asks for a top-up of what "restores" the target, from the credits the roll is
# about to roll, before the next period's credits come. Local mode rolls at once and asks for nothing (its alert
# looks at the balance after the roll).
def test_a_roll_waiting_for_a_lease_asks_no_top_up_of_the_period_it_is_about_to_roll(capped_pair):
    local, central = capped_pair
    now = START_MS
    local.subscribe("acme", "topped")  # 50 included; a top-up to 50 asked below 10
    for _ in range(21):
        assert gpt(local) == pb.DECISION_ALLOW
    es, plans = central.escrow, central.plans
    plans.subscribe("acme", "topped", now, now)
    assert es.acquire("sx", "ix", "acme", "requests", 20 * NANO, 20 * NANO, 1, now).amount_nano == 20 * NANO
    es.settle("sx", "ix", [Settlement("acme", "requests", 20 * NANO)], now)
    assert es.acquire("sy", "iy", "acme", "requests", 5 * NANO, 5 * NANO, 1, now).amount_nano == 5 * NANO
    es.settle("sy", "iy", [Settlement("acme", "requests", 1 * NANO)], now)  # sy holds 4 unspent
    end = plans.subscription("acme").end_ms
    local.now_ms = end + 1
    local.tick()
    assert plans.roll("acme", end + 1) == 0  # it waits for sy's lease
    lease = es._lease("sy", "acme", "requests")
    es.give_back("sy", "iy", "acme", "requests", lease.returned_total_nano + lease.amount_nano, end + 2,
                 1 * NANO)  # sy closes its lease at the boundary
    assert plans.roll("acme", end + 2) == 1
    bal = next(x for x in es.balance("acme", end + 2) if x["credit_type"] == "requests")
    assert bal["balance_nano"] == local.bal("acme", "requests") == 50 * NANO
    asked = [e.charge_nano for e in central.ledger.entries("acme") if e.kind == "auto_topup_requested"]
    assert [e.charge_nano for e in local.audit("acme", "auto_topup_requested")] == []
    assert asked == []
    assert es.check() == []


# Failed before its fix: a roll waits for every lease holding the customer's credit, and a lease first taken after the
# boundary (of a bought grant, with nothing to settle of the ended period) had never settled: the roll, and a
# Subscribe after a cancel, waited for the 30 s grace.
def test_a_roll_does_not_wait_for_a_lease_first_taken_after_the_boundary(tmp_path, ledger_url):
    path = tmp_path / "capped.toml"
    path.write_text(CAPPED)
    central = Central(ledger_url, str(path))
    try:
        es, plans = central.escrow, central.plans
        plans.subscribe("acme", "pro", START_MS, START_MS)
        es.grant("acme", "requests", 20 * NANO, 0, 0, "api", "", START_MS)
        central.spend("acme", "requests", 30 * NANO, START_MS)           # sx: settled and given back
        end = plans.subscription("acme").end_ms
        got = es.acquire("sy", "iy", "acme", "requests", NANO, 5 * NANO, 1, end + 1)  # after the boundary
        assert got.amount_nano > 0
        assert plans.roll("acme", end + 2) == 1                           # at once, not at the grace
        assert es.check() == []
    finally:
        central.ledger.close()
