"""The PostgreSQL test fixtures give reachable, separate databases."""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import drop_postgres_database, new_postgres_database

try:
    import psycopg
except ImportError:
    if os.environ.get("METERD_REQUIRE_POSTGRES") == "1":
        raise
    pytest.skip("psycopg is not installed: pip install '.[postgresql]'", allow_module_level=True)


@pytest.mark.parametrize("ledger_url", ["postgresql"], indirect=True)
def test_ledger_url_is_a_reachable_postgres_database(ledger_url: str) -> None:
    with psycopg.connect(ledger_url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        (name,) = conn.execute("SELECT current_database()").fetchone()
    assert name == urlsplit(ledger_url).path.lstrip("/")
    assert name.startswith("meterd_test_")


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


@pytest.mark.parametrize("ledger_url", ["sqlite"], indirect=True)
def test_sqlite_ledger_url_is_a_file_url(ledger_url: str, tmp_path: Path) -> None:
    assert ledger_url == f"sqlite:///{tmp_path}/ledger.db"
    with closing(sqlite3.connect(ledger_url.removeprefix("sqlite:///"))) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
