"""The ledger fixtures: postgres_url is a real PostgreSQL server the tests may make
databases on, and ledger_url an empty ledger, separate for each test, that meterd
migrates and flushes to."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import drop_postgres_database, new_postgres_database

from meterd.ledger import SCHEMA_VERSION, CreditTypeInfo, Entry, Flush, Ledger, UsageRow, parse_url

try:
    import psycopg
except ImportError:
    if os.environ.get("METERD_REQUIRE_POSTGRES") == "1":
        raise
    pytest.skip("psycopg is not installed: pip install '.[postgresql]'", allow_module_level=True)


def test_postgres_url_is_a_postgresql_server_that_tests_may_make_databases_on(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        (version,) = conn.execute("SELECT version()").fetchone()
        (number,) = conn.execute("SELECT current_setting('server_version_num')::int").fetchone()
        database, port, may_create = conn.execute(
            "SELECT current_database(), inet_server_port(), rolsuper OR rolcreatedb FROM pg_roles "
            "WHERE rolname = current_user").fetchone()
        assert number == conn.info.server_version
    assert version.startswith("PostgreSQL "), version
    assert number >= 130000, version  # drop_postgres_database's DROP DATABASE ... WITH (FORCE) needs 13
    assert (database, port) == ("postgres", urlsplit(postgres_url).port)  # the server the URL names
    assert may_create  # new_postgres_database makes one database per test


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_ledger_url_is_a_database_of_its_own_on_that_server(ledger_url: str, postgres_url: str) -> None:
    with psycopg.connect(ledger_url) as conn:
        (name,) = conn.execute("SELECT current_database()").fetchone()
        (tables,) = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert name == urlsplit(ledger_url).path.lstrip("/") and name.startswith("meterd_test_")
    assert tables == 0  # empty
    with psycopg.connect(postgres_url) as conn:
        listed = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert listed == (1,)


def test_ledger_url_is_an_empty_ledger_that_meterd_migrates_and_flushes_to(ledger_url: str) -> None:
    if ledger_url.startswith("sqlite"):
        assert not Path(parse_url(ledger_url)[1]).exists()  # nothing there yet: the ledger makes its file
    row = UsageRow("fixture-customer", "input_tokens", '{"model":"gpt-4o"}', 1_790_000_040_000, "usd", "sum", 0,
                   1000, 2_500_000, 3)
    entry = Entry(7, 1_790_000_041_000, 1_790_000_041_000, "fixture-customer", "grant", "topup", "usd", 10**9, 0,
                  10**9, "g_1 topup")
    flush = Flush("fixture-sidecar", 1, [CreditTypeInfo("usd", "fiat", "USD", 2)], [row], [entry],
                  incarnation="fixture-dir", first=True)
    with Ledger(ledger_url) as lg:
        assert lg.schema_version() == 0
        assert lg.migrate() == list(range(1, SCHEMA_VERSION + 1))
        assert lg.apply_flush(flush)
        assert not lg.apply_flush(flush)  # the same flush again is not applied twice
    with Ledger(ledger_url, create=False) as lg:  # another connection reads what the first one wrote
        lg.check_schema()
        assert lg.last_sequence("fixture-sidecar") == 1
        assert lg.credit_types() == {"usd": CreditTypeInfo("usd", "fiat", "USD", 2)}
        assert lg.usage_rows("fixture-customer", 0, 1 << 62) == [row]
        assert lg.entries("fixture-customer") == [entry]
        assert lg.totals() == {"events": 3, "cost_nano": 2_500_000, "rows": 1}


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_postgres_databases_are_distinct(ledger_url: str, postgres_url: str) -> None:
    other_url = new_postgres_database(postgres_url)
    try:
        assert other_url != ledger_url
        with psycopg.connect(ledger_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
        with psycopg.connect(other_url) as conn:
            assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
            (name,) = conn.execute("SELECT current_database()").fetchone()
        assert name == urlsplit(other_url).path.lstrip("/")
    finally:
        drop_postgres_database(postgres_url, other_url)
    with psycopg.connect(postgres_url) as conn:
        gone = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert gone == (0,)
