"""The central ledger: the system of record that sidecars flush to.

A ledger is a SQL database, SQLite by default (one file, no set-up) or
PostgreSQL (shared by many sidecars on many machines). It holds:

- ``meterd_usage``: usage per customer, meter, dimension set and time window;
- ``meterd_entries``: every credit movement, append-only, with the balances
  before and after and a reference to its source;
- ``meterd_flushes`` and ``meterd_sidecars``: which flush of which sidecar was
  applied, so that a repeated flush is applied once;
- ``meterd_credit_types``: currencies and decimals, for statements.

A flush is applied in one transaction together with the record of its
``(sidecar_id, sequence)``. Statements and usage queries are computed from
these tables. Every statement is parameterised.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime as dt
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import unquote, urlsplit

from meterd.errors import ConfigError, InvalidInput, MeterdError


class LedgerError(MeterdError):
    """The ledger refused or failed an operation."""


class SidecarConflict(LedgerError):
    """Two data directories flush under one sidecar_id."""


class Fenced(SidecarConflict):
    """A sidecar incarnation the ledger no longer accepts (replaced, or released by an operator)."""


class SchemaBehind(LedgerError):
    """The ledger's schema is older than this meterd: run `meterd ledger migrate`."""


# Ledger mode's pools of a plan's free units (Catalog.for_ledger) are credit types of this prefix, which
# no catalog's own can have: balances like any other in the ledger, left out of statements.
POOL_PREFIX = "free/"


def is_pool(credit_type: str) -> bool:
    return credit_type.startswith(POOL_PREFIX)


# ---- schema -------------------------------------------------------------------

# Each migration is applied once, in order, in its own transaction. ``{id}``
# becomes the dialect's auto-increment key; "@name" stands for the dialect's own
# statements of that name. Never edit a released migration:
# add the next one.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "usage, entries, flushes, sidecars, credit types", [
        """CREATE TABLE meterd_sidecars (
            sidecar_id TEXT PRIMARY KEY,
            incarnation TEXT NOT NULL,
            last_sequence BIGINT NOT NULL,
            first_flush_ms BIGINT NOT NULL,
            last_flush_ms BIGINT NOT NULL)""",
        """CREATE TABLE meterd_flushes (
            sidecar_id TEXT NOT NULL,
            sequence BIGINT NOT NULL,
            incarnation TEXT NOT NULL,
            applied_ms BIGINT NOT NULL,
            usage_rows INTEGER NOT NULL,
            entries INTEGER NOT NULL,
            PRIMARY KEY (sidecar_id, sequence))""",
        """CREATE TABLE meterd_credit_types (
            name TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            currency TEXT NOT NULL,
            decimals INTEGER NOT NULL)""",
        """CREATE TABLE meterd_usage (
            customer_id TEXT NOT NULL,
            meter TEXT NOT NULL,
            dimensions TEXT NOT NULL,
            window_start_ms BIGINT NOT NULL,
            credit_type TEXT NOT NULL,
            aggregation TEXT NOT NULL,
            precision INTEGER NOT NULL,
            quantity BIGINT NOT NULL CHECK ({int_check}quantity{int_check_end}),
            cost_nano BIGINT NOT NULL CHECK ({int_check}cost_nano{int_check_end}),
            events BIGINT NOT NULL,
            PRIMARY KEY (customer_id, meter, dimensions, window_start_ms))""",
        "CREATE INDEX meterd_usage_window ON meterd_usage (customer_id, window_start_ms)",
        """CREATE TABLE meterd_entries (
            id {id},
            sidecar_id TEXT NOT NULL,
            incarnation TEXT NOT NULL,
            source_sequence BIGINT NOT NULL,
            flush_sequence BIGINT NOT NULL,
            time_ms BIGINT NOT NULL,
            effective_ms BIGINT NOT NULL,
            customer_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            source TEXT NOT NULL,
            credit_type TEXT NOT NULL,
            amount_nano BIGINT NOT NULL,
            balance_before_nano BIGINT NOT NULL,
            balance_after_nano BIGINT NOT NULL,
            reference TEXT NOT NULL,
            charge_nano BIGINT NOT NULL,
            charge_credit_type TEXT NOT NULL,
            detail TEXT NOT NULL,
            UNIQUE (sidecar_id, incarnation, source_sequence))""",
        "CREATE INDEX meterd_entries_customer ON meterd_entries (customer_id, effective_ms)",
        "@append_only",
    ]),
    (2, "escrow: central balances, grant buckets, leases, keys, fenced incarnations", [
        # One row per customer and credit type: the sums that the conservation check holds to
        # granted = available + leased + consumed + expired. Every lease transaction of the
        # customer's credit type locks it first, so they serialise there and nowhere else.
        """CREATE TABLE meterd_balances (
            customer_id TEXT NOT NULL,
            credit_type TEXT NOT NULL,
            granted_nano BIGINT NOT NULL,
            available_nano BIGINT NOT NULL,
            leased_nano BIGINT NOT NULL,
            consumed_nano BIGINT NOT NULL,
            expired_nano BIGINT NOT NULL,
            overdrawn_nano BIGINT NOT NULL,
            grants_made BIGINT NOT NULL,
            entries_made BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL,
            PRIMARY KEY (customer_id, credit_type))""",
        """CREATE TABLE meterd_grants (
            customer_id TEXT NOT NULL,
            credit_type TEXT NOT NULL,
            grant_id TEXT NOT NULL,
            seq BIGINT NOT NULL,
            priority BIGINT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            source TEXT NOT NULL,
            reference TEXT NOT NULL,
            amount_nano BIGINT NOT NULL,
            remaining_nano BIGINT NOT NULL CHECK (remaining_nano >= 0),
            leased_nano BIGINT NOT NULL CHECK (leased_nano >= 0),
            consumed_nano BIGINT NOT NULL,
            expired_nano BIGINT NOT NULL,
            created_ms BIGINT NOT NULL,
            PRIMARY KEY (customer_id, credit_type, grant_id))""",
        """CREATE TABLE meterd_leases (
            sidecar_id TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            credit_type TEXT NOT NULL,
            incarnation TEXT NOT NULL,
            amount_nano BIGINT NOT NULL,
            leased_total_nano BIGINT NOT NULL,
            returned_total_nano BIGINT NOT NULL,
            consumed_total_nano BIGINT NOT NULL,
            expires_at_ms BIGINT NOT NULL,
            recall_ms BIGINT NOT NULL,
            acquisitions BIGINT NOT NULL,
            updated_ms BIGINT NOT NULL,
            PRIMARY KEY (sidecar_id, customer_id, credit_type))""",
        "CREATE INDEX meterd_leases_customer ON meterd_leases (customer_id, credit_type)",
        """CREATE TABLE meterd_lease_parts (
            sidecar_id TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            credit_type TEXT NOT NULL,
            grant_id TEXT NOT NULL,
            amount_nano BIGINT NOT NULL CHECK (amount_nano > 0),
            PRIMARY KEY (sidecar_id, customer_id, credit_type, grant_id))""",
        """CREATE TABLE meterd_keys (
            key TEXT PRIMARY KEY,
            digest TEXT NOT NULL,
            answer TEXT NOT NULL,
            created_ms BIGINT NOT NULL)""",
        """CREATE TABLE meterd_fenced (
            sidecar_id TEXT NOT NULL,
            incarnation TEXT NOT NULL,
            fenced_ms BIGINT NOT NULL,
            reason TEXT NOT NULL,
            PRIMARY KEY (sidecar_id, incarnation))""",
        "ALTER TABLE meterd_sidecars ADD COLUMN last_seen_ms BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE meterd_sidecars ADD COLUMN released_ms BIGINT NOT NULL DEFAULT 0",
    ]),
    (3, "escrow: an outage allowance per customer and credit type", [
        # What each sidecar may spend beyond its lease while it cannot reach the ledger; what leases
        # owe, spent beyond them (their amounts below zero, summed); and when an allowance changed
        # that the lease's sidecar has not yet acknowledged.
        "ALTER TABLE meterd_balances ADD COLUMN outage_allowance_nano BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE meterd_balances ADD COLUMN debts_nano BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE meterd_leases ADD COLUMN refresh_ms BIGINT NOT NULL DEFAULT 0",
        # A heartbeat looks for its sidecar's recalled and refreshed leases: few rows among many.
        "CREATE INDEX meterd_leases_recalled ON meterd_leases (sidecar_id) WHERE recall_ms > 0",
        "CREATE INDEX meterd_leases_refreshed ON meterd_leases (sidecar_id) WHERE refresh_ms > 0",
    ]),
    (4, "plans in ledger mode: subscriptions, their rolls, period buckets, overage headroom", [
        # A customer's subscription (ledger_plans): its plan ('' once ended: the row stays, with
        # what outlives a subscription, such as the trial taken), its credit and billing periods,
        # and the rest of it as JSON. Every change goes through a version.
        """CREATE TABLE meterd_subscriptions (
            customer_id TEXT PRIMARY KEY,
            plan TEXT NOT NULL,
            n BIGINT NOT NULL,
            start_ms BIGINT NOT NULL,
            end_ms BIGINT NOT NULL,
            billing_n BIGINT NOT NULL,
            billing_end_ms BIGINT NOT NULL,
            version BIGINT NOT NULL,
            state TEXT NOT NULL,
            updated_ms BIGINT NOT NULL)""",
        "CREATE INDEX meterd_subscriptions_due ON meterd_subscriptions (end_ms) WHERE plan <> ''",
        # One row per period roll done: its primary key makes a second roll of a period (n) of a
        # subscription (the customer's generation-th) fail.
        """CREATE TABLE meterd_rolls (
            customer_id TEXT NOT NULL,
            generation BIGINT NOT NULL,
            n BIGINT NOT NULL,
            boundary_ms BIGINT NOT NULL,
            plan TEXT NOT NULL,
            rolled_ms BIGINT NOT NULL,
            PRIMARY KEY (customer_id, generation, n))""",
        "ALTER TABLE meterd_grants ADD COLUMN period_n BIGINT NOT NULL DEFAULT -1",
        "ALTER TABLE meterd_grants ADD COLUMN rollovers BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE meterd_balances ADD COLUMN headroom_nano BIGINT NOT NULL DEFAULT 0",
        # When (by its sidecar's clock) a lease's consumption was last settled with a give-back:
        # a period is rolled once every lease of its credits has been settled past its end.
        "ALTER TABLE meterd_leases ADD COLUMN settled_ms BIGINT NOT NULL DEFAULT 0",
        # An overage allowance's early-bill threshold (0: none): what must be owed for the sweep to bill.
        "ALTER TABLE meterd_grants ADD COLUMN bill_at_nano BIGINT NOT NULL DEFAULT 0",
        # Customers and credit types whose settled consumption went into a plan's overage allowance:
        # looked at by the sweep of early overage bills (one row each, cleared once looked at).
        """CREATE TABLE meterd_overage_spent (
            customer_id TEXT NOT NULL,
            credit_type TEXT NOT NULL,
            spent_ms BIGINT NOT NULL,
            PRIMARY KEY (customer_id, credit_type))""",
    ]),
    (5, "fallback usage of plans in ledger mode", [
        # What the credit period's usage served in a plan's fallback mode would have cost, as
        # sidecars settled it (the priority hint of degraded answers; the roll's "degraded" entry).
        "ALTER TABLE meterd_balances ADD COLUMN degraded_nano BIGINT NOT NULL DEFAULT 0",
        # A lease's running total of it, as its sidecar last settled it.
        "ALTER TABLE meterd_leases ADD COLUMN degraded_total_nano BIGINT NOT NULL DEFAULT 0",
        # When a lease call for a request last got less than the request needed: from then on its
        # sidecar may serve the customer in a fallback mode, which it settles at the period's end.
        "ALTER TABLE meterd_leases ADD COLUMN short_ms BIGINT NOT NULL DEFAULT 0",
        # Customers whose fallback usage was settled after their subscription ended: for the sweep
        # that audits it (one row each, cleared once audited).
        """CREATE TABLE meterd_degraded_ended (
            customer_id TEXT PRIMARY KEY,
            settled_ms BIGINT NOT NULL)""",
    ]),
    (6, "automatic top-up requests of plans in ledger mode", [
        # The plan's low_balance and topup_target for the credit type (target 0: none), set when the
        # subscription changes; and whether a request is out, until a credit lifts the balance again.
        "ALTER TABLE meterd_balances ADD COLUMN low_balance_nano BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE meterd_balances ADD COLUMN topup_target_nano BIGINT NOT NULL DEFAULT 0",
        "ALTER TABLE meterd_balances ADD COLUMN topup_pending SMALLINT NOT NULL DEFAULT 0",
    ]),
    (7, "gauge meters charged centrally in ledger mode", [
        # Per customer and gauge meter (max, unique_count): usage windows before charged_to_ms are
        # charged (at a period's roll, a cancel, or a calendar month's end without a plan); the last
        # charge's windows and value (a window flushed late is charged the difference); the remainder
        # of the charges below a nano-unit, in 1/denominator (the last charge's free units in
        # last_free); the earliest window flushed since
        # (NO_PENDING_MS: none); and when the sweep is to look at it (a window flushed late: at
        # once; otherwise the end of the month of the first window not charged, and a grace).
        """CREATE TABLE meterd_gauges (
            customer_id TEXT NOT NULL,
            meter TEXT NOT NULL,
            charged_to_ms BIGINT NOT NULL,
            last_from_ms BIGINT NOT NULL,
            last_value BIGINT NOT NULL,
            remainder TEXT NOT NULL,
            pending_from_ms BIGINT NOT NULL,
            due_ms BIGINT NOT NULL,
            last_free BIGINT NOT NULL DEFAULT 0,
            PRIMARY KEY (customer_id, meter))""",
        "CREATE INDEX meterd_gauges_due ON meterd_gauges (due_ms)",
    ]),
    # Where the ledger's charges of gauges begin: the start of the calendar month of the first
    # flush in ledger mode (or of its earliest window). Windows of earlier months are a local-mode
    # sidecar's, which charged them itself at their months' ends.
    (8, "where central gauge charges begin", [
        """CREATE TABLE meterd_gauges_from (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            from_ms BIGINT NOT NULL)""",
    ]),
]

SCHEMA_VERSION = MIGRATIONS[-1][0]

_DIALECT: dict[str, dict[str, Any]] = {
    "sqlite": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        # SQLite turns an overflowing integer sum into a float: refuse it instead.
        "int_check": "typeof(", "int_check_end": ") = 'integer'",
        "append_only": [
            "CREATE TRIGGER meterd_entries_append_only BEFORE UPDATE ON meterd_entries "
            "BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END",
            "CREATE TRIGGER meterd_entries_no_delete BEFORE DELETE ON meterd_entries "
            "BEGIN SELECT RAISE(ABORT, 'ledger entries are append-only'); END",
        ],
    },
    "postgresql": {
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "int_check": "", "int_check_end": " IS NOT NULL",
        "append_only": [
            "CREATE FUNCTION meterd_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN RAISE EXCEPTION 'ledger entries are append-only'; END $$",
            "CREATE TRIGGER meterd_entries_append_only BEFORE UPDATE OR DELETE ON meterd_entries "
            "FOR EACH ROW EXECUTE FUNCTION meterd_append_only()",
        ],
    },
}

# Entry kinds whose charge is owed by the customer.
CHARGE_KINDS = ("fee", "overage_charged", "usage_billed")

_USAGE_UPSERT = """INSERT INTO meterd_usage (customer_id, meter, dimensions, window_start_ms, credit_type,
    aggregation, precision, quantity, cost_nano, events) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (customer_id, meter, dimensions, window_start_ms) DO UPDATE SET
    quantity = CASE
        WHEN meterd_usage.aggregation = 'max' THEN
            CASE WHEN excluded.quantity > meterd_usage.quantity THEN excluded.quantity ELSE meterd_usage.quantity END
        WHEN meterd_usage.aggregation = 'latest' THEN excluded.quantity
        WHEN meterd_usage.aggregation = 'unique_count' THEN 0
        ELSE meterd_usage.quantity + excluded.quantity END,
    cost_nano = meterd_usage.cost_nano + excluded.cost_nano,
    events = meterd_usage.events + excluded.events"""

_ENTRY_INSERT = """INSERT INTO meterd_entries (sidecar_id, incarnation, source_sequence, flush_sequence, time_ms,
    effective_ms, customer_id, kind, source, credit_type, amount_nano, balance_before_nano, balance_after_nano,
    reference, charge_nano, charge_credit_type, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""


# ---- what a flush carries ------------------------------------------------------------


@dataclass(frozen=True)
class UsageRow:
    customer_id: str
    meter: str
    dimensions: str          # canonical JSON: sorted keys, no spaces
    window_start_ms: int
    credit_type: str
    aggregation: str
    precision: int
    quantity: int
    cost_nano: int
    events: int

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.customer_id, self.meter, self.dimensions, self.window_start_ms)


@dataclass(frozen=True)
class Entry:
    source_sequence: int
    time_ms: int
    effective_ms: int
    customer_id: str
    kind: str
    source: str
    credit_type: str
    amount_nano: int
    balance_before_nano: int
    balance_after_nano: int
    reference: str
    charge_nano: int = 0
    charge_credit_type: str = ""
    detail: str = "{}"


@dataclass(frozen=True)
class Settlement:
    """What a sidecar in ledger mode has consumed of a lease, in all (a running total)."""
    customer_id: str
    credit_type: str
    consumed_total_nano: int
    # What the lease's sidecar served in the plan's fallback mode would have cost, in all (a
    # running total; -1: not told, in an outbox row written before it was).
    degraded_total_nano: int = -1


@dataclass(frozen=True)
class CreditTypeInfo:
    name: str
    kind: str
    currency: str
    decimals: int


@dataclass
class Flush:
    sidecar_id: str
    sequence: int
    credit_types: list[CreditTypeInfo] = field(default_factory=list)
    usage: list[UsageRow] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    # Which data directory sends it; a new one takes over an id with its first flush.
    incarnation: str = ""
    first: bool = False
    settlements: list[Settlement] = field(default_factory=list)


def canonical_dimensions(dims: dict[str, str]) -> str:
    return json.dumps(dims, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def combine(aggregation: str, total: int, quantity: int) -> int:
    """Quantities of one meter over several windows, in window order: summed,
    or the largest, or the last. Distinct counts do not combine (0)."""
    if aggregation == "max":
        return max(total, quantity)
    if aggregation == "latest":
        return quantity
    if aggregation == "unique_count":
        return 0
    return total + quantity


def merge_usage(rows: Iterable[UsageRow]) -> list[UsageRow]:
    """One row per (customer, meter, dimensions, window), as the ledger would merge them."""
    merged: dict[tuple, UsageRow] = {}
    for r in rows:
        prev = merged.get(r.key)
        if prev is None:
            merged[r.key] = r
            continue
        q = combine(r.aggregation, prev.quantity, r.quantity)
        merged[r.key] = UsageRow(r.customer_id, r.meter, r.dimensions, r.window_start_ms, r.credit_type,
                                 r.aggregation, r.precision, q, prev.cost_nano + r.cost_nano, prev.events + r.events)
    return [merged[k] for k in sorted(merged)]  # a fixed order: concurrent flushes lock rows alike


# ---- connections -------------------------------------------------------------------------


def parse_url(url: str) -> tuple[str, str]:
    """('sqlite', path) or ('postgresql', conninfo URL) from a --ledger URL."""
    if url.startswith("sqlite:///"):
        # sqlite:///relative/path or sqlite:////absolute/path
        path = unquote(url[len("sqlite:///"):])
        if not path:
            raise ConfigError(f"ledger URL {url!r}: no file after sqlite:///")
        return "sqlite", path
    if url.startswith(("postgresql://", "postgres://")):
        if not urlsplit(url).hostname and "host=" not in url:
            raise ConfigError(f"ledger URL {redact(url)!r}: no host")
        return "postgresql", url
    raise ConfigError(f"ledger URL {redact(url)!r}: use sqlite:///PATH or postgresql://USER@HOST/DB")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _sqlite(path: str, create: bool) -> sqlite3.Connection:
    """A connection to a SQLite ledger, made 0600 when it is new (SQLite gives its WAL files the same mode)."""
    if not os.path.exists(path):
        if not create:
            raise LedgerError(f"no ledger at {path}: the file does not exist (reading never creates one; "
                              "check --ledger)")
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        except OSError as e:
            raise LedgerError(f"cannot create the ledger {path}: {e.strerror}") from None
    try:
        conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA schema_version")  # reads the header: fails here on a file that is not a database
        if create:  # a reader changes nothing, not even the journal mode of a file that is not meterd's
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
    except sqlite3.DatabaseError as e:
        raise LedgerError(f"the ledger {path} is not a SQLite database ({e})") from None
    return conn


class Ledger:
    """One connection to a ledger database. Not shared between threads: every
    method runs on the caller's thread, so give each thread its own Ledger."""

    def __init__(self, url: str, connect_timeout_s: float = 10.0, create: bool = True) -> None:
        """``create=False`` (reads): a SQLite file that does not exist is an error, not a new ledger."""
        self.url = url
        self.dialect, target = parse_url(url)
        self._known_credit_types: set[CreditTypeInfo] = set()
        if self.dialect == "sqlite":
            self.conn: Any = _sqlite(target, create)
        else:
            try:
                import psycopg
            except ImportError:  # pragma: no cover - depends on the install
                raise ConfigError("a PostgreSQL ledger needs psycopg: pip install 'meterd[postgresql]'") from None
            try:
                # A slow server fails the statement instead of holding the flush thread forever.
                ms = int(connect_timeout_s * 1000)
                self.conn = psycopg.connect(target, autocommit=True, connect_timeout=max(1, int(connect_timeout_s)),
                                            options=f"-c statement_timeout={ms} "
                                                    f"-c idle_in_transaction_session_timeout={ms}")
            except psycopg.Error as e:
                raise LedgerError(f"cannot connect to {redact(url)}: {str(e).strip()}") from None

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- plumbing --------------------------------------------------------------------

    def _sql(self, sql: str) -> str:
        return sql if self.dialect == "sqlite" else sql.replace("?", "%s")

    def _exec(self, sql: str, params: Sequence = ()) -> Any:
        return self.conn.execute(self._sql(sql), params)

    def _rows(self, sql: str, params: Sequence = ()) -> list[tuple]:
        return list(self._exec(sql, params).fetchall())

    def _exec_many(self, sql: str, rows: list[tuple]) -> None:
        """One statement for many rows (psycopg sends them in a pipeline: one round trip)."""
        if self.dialect == "sqlite":
            self.conn.executemany(self._sql(sql), rows)
        else:
            with self.conn.cursor() as cur:
                cur.executemany(self._sql(sql), rows)

    def _begin(self) -> None:
        self._exec("BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One explicit transaction (the connections run in autocommit mode otherwise)."""
        self._begin()
        try:
            yield
        except BaseException:
            self._exec("ROLLBACK")
            raise
        self._exec("COMMIT")

    # ---- schema ----------------------------------------------------------------------

    def schema_version(self) -> int:
        try:
            rows = self._rows("SELECT MAX(version) FROM meterd_schema_migrations")
        except Exception:  # noqa: BLE001 - the table does not exist yet: version 0
            return 0
        return int(rows[0][0] or 0)

    def migrate(self) -> list[int]:
        """Apply the migrations this ledger lacks; returns their versions."""
        applied: list[int] = []
        with self._transaction():
            if self.dialect == "postgresql":
                # Several sidecars may start at once: one migrates, the others wait.
                self._exec("SELECT pg_advisory_xact_lock(7243001)")
            self._exec("CREATE TABLE IF NOT EXISTS meterd_schema_migrations (version INTEGER PRIMARY KEY, "
                       "description TEXT NOT NULL, applied_ms BIGINT NOT NULL)")
            done = {r[0] for r in self._rows("SELECT version FROM meterd_schema_migrations")}
            for version, description, statements in MIGRATIONS:
                if version in done:
                    continue
                dialect = _DIALECT[self.dialect]
                for statement in statements:
                    for text in (dialect[statement[1:]] if statement.startswith("@")
                                 else [statement.format(**dialect)]):
                        self.conn.execute(text)
                self._exec("INSERT INTO meterd_schema_migrations (version, description, applied_ms) VALUES (?, ?, ?)",
                           (version, description, _now_ms()))
                applied.append(version)
        return applied

    def now_ms(self) -> int:
        """The ledger's time: PostgreSQL's server clock; a SQLite ledger's is this machine's."""
        if self.dialect == "sqlite":
            return time.time_ns() // 1_000_000
        (ms,), = self._rows("SELECT (EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::bigint")
        return int(ms)

    def check_schema(self) -> None:
        version = self.schema_version()
        if version == 0:
            raise SchemaBehind(f"the ledger {redact(self.url)} holds no meterd tables: if it is the right one, "
                               "run `meterd ledger migrate --ledger URL`")
        if version < SCHEMA_VERSION:
            raise SchemaBehind(f"the ledger {redact(self.url)} has schema version {version}, meterd needs "
                               f"{SCHEMA_VERSION}: run `meterd ledger migrate --ledger URL`")
        if version > SCHEMA_VERSION:
            raise SchemaBehind(f"the ledger {redact(self.url)} has schema version {version}, newer than this "
                               f"meterd ({SCHEMA_VERSION}): upgrade meterd")

    # ---- flushes ---------------------------------------------------------------------

    def apply_flush(self, flush: Flush, within: Callable[["Ledger"], None] | None = None) -> bool:
        """Apply a flush once. Returns False when this (sidecar, sequence) was
        applied before; nothing is applied twice. ``within`` runs in the same
        transaction, after the rows are in (the settlement of leases)."""
        self._note_credit_types(flush.credit_types)
        now = _now_ms()
        lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
        with self._transaction():
            self._exec("INSERT INTO meterd_sidecars (sidecar_id, incarnation, last_sequence, first_flush_ms, "
                       "last_flush_ms) VALUES (?, ?, 0, ?, ?) ON CONFLICT (sidecar_id) DO NOTHING",
                       (flush.sidecar_id, flush.incarnation, now, now))
            (last, incarnation, released), = self._rows("SELECT last_sequence, incarnation, released_ms FROM "
                                                        "meterd_sidecars WHERE sidecar_id = ?" + lock,
                                                        (flush.sidecar_id,))
            self.refuse_fenced(flush.sidecar_id, flush.incarnation, released)
            if incarnation != flush.incarnation:
                if not (flush.first and flush.sequence == last + 1):
                    raise SidecarConflict(
                        f"sidecar_id {flush.sidecar_id!r} is flushing from another data directory too (the ledger "
                        f"has its flush {last}); give each data directory its own sidecar_id")
                self._exec("UPDATE meterd_sidecars SET incarnation = ? WHERE sidecar_id = ?",
                           (flush.incarnation, flush.sidecar_id))
                # The data directory it replaces is refused from now on (in ledger mode its leases
                # come back in ``within``, Escrow.settle_flush).
                self._exec("INSERT INTO meterd_fenced (sidecar_id, incarnation, fenced_ms, reason) VALUES "
                           "(?, ?, ?, 'replaced') ON CONFLICT (sidecar_id, incarnation) DO NOTHING",
                           (flush.sidecar_id, incarnation, now))
            elif flush.sequence <= last:
                return False
            self._exec("INSERT INTO meterd_flushes (sidecar_id, sequence, incarnation, applied_ms, usage_rows, "
                       "entries) VALUES (?, ?, ?, ?, ?, ?)", (flush.sidecar_id, flush.sequence, flush.incarnation,
                                                              now, len(flush.usage), len(flush.entries)))
            cur = self.conn.cursor()
            usage = merge_usage(flush.usage)
            if usage:
                cur.executemany(self._sql(_USAGE_UPSERT), [
                    (r.customer_id, r.meter, r.dimensions, r.window_start_ms, r.credit_type, r.aggregation,
                     r.precision, r.quantity, r.cost_nano, r.events) for r in usage])
            if flush.entries:
                cur.executemany(self._sql(_ENTRY_INSERT), [
                    (flush.sidecar_id, flush.incarnation, e.source_sequence, flush.sequence, e.time_ms,
                     e.effective_ms, e.customer_id, e.kind, e.source, e.credit_type, e.amount_nano,
                     e.balance_before_nano, e.balance_after_nano, e.reference, e.charge_nano,
                     e.charge_credit_type, e.detail) for e in flush.entries])
            if within is not None:
                within(self)
            self._exec("UPDATE meterd_sidecars SET last_sequence = ?, last_flush_ms = ? WHERE sidecar_id = ?",
                       (flush.sequence, now, flush.sidecar_id))
        return True

    def refuse_fenced(self, sidecar_id: str, incarnation: str, released_ms: int) -> None:
        """A released sidecar, or a data directory whose id another one has taken over, is refused for good."""
        if released_ms:
            raise Fenced(f"sidecar_id {sidecar_id!r} was released from the ledger (meterd ledger release-sidecar); "
                         "a sidecar under a released id is refused for good: give it a new sidecar_id")
        if self._rows("SELECT 1 FROM meterd_fenced WHERE sidecar_id = ? AND incarnation = ?",
                      (sidecar_id, incarnation)):
            raise Fenced(f"sidecar_id {sidecar_id!r} is used by another data directory, which replaced this one "
                         f"(incarnation {incarnation[:12]}); this one is refused for good: give each data directory "
                         "its own sidecar_id")

    def _note_credit_types(self, credit_types: list[CreditTypeInfo]) -> None:
        """Credit types in a short transaction of their own, only when they are new or
        changed, so that flushes of many sidecars do not queue on these rows."""
        new = sorted(set(credit_types) - self._known_credit_types, key=lambda c: c.name)
        if not new:
            return
        with self._transaction():
            for ct in new:
                self._exec("INSERT INTO meterd_credit_types (name, kind, currency, decimals) VALUES (?, ?, ?, ?) "
                           "ON CONFLICT (name) DO UPDATE SET kind = excluded.kind, currency = excluded.currency, "
                           "decimals = excluded.decimals", (ct.name, ct.kind, ct.currency, ct.decimals))
        self._known_credit_types.update(new)

    def has_flushed(self, sidecar_id: str, incarnation: str) -> bool:
        """Whether any flush of this data directory (incarnation) was applied."""
        return bool(self._rows("SELECT 1 FROM meterd_flushes WHERE sidecar_id = ? AND incarnation = ? LIMIT 1",
                               (sidecar_id, incarnation)))

    def last_sequence(self, sidecar_id: str) -> int:
        rows = self._rows("SELECT last_sequence FROM meterd_sidecars WHERE sidecar_id = ?", (sidecar_id,))
        return int(rows[0][0]) if rows else 0

    # ---- reading -------------------------------------------------------------------------

    def credit_types(self) -> dict[str, CreditTypeInfo]:
        return {r[0]: CreditTypeInfo(r[0], r[1], r[2], int(r[3]))
                for r in self._rows("SELECT name, kind, currency, decimals FROM meterd_credit_types")}

    def entries(self, customer_id: str, from_ms: int | None = None, to_ms: int | None = None) -> list[Entry]:
        sql = ("SELECT source_sequence, time_ms, effective_ms, customer_id, kind, source, credit_type, amount_nano, "
               "balance_before_nano, balance_after_nano, reference, charge_nano, charge_credit_type, detail "
               "FROM meterd_entries WHERE customer_id = ?")
        params: list[Any] = [customer_id]
        if from_ms is not None:
            sql += " AND effective_ms >= ?"
            params.append(from_ms)
        if to_ms is not None:
            sql += " AND effective_ms < ?"
            params.append(to_ms)
        sql += " ORDER BY effective_ms, id"
        return [Entry(*r) for r in self._rows(sql, params)]

    def usage_rows(self, customer_id: str, from_ms: int, to_ms: int, meter: str | None = None) -> list[UsageRow]:
        sql = ("SELECT customer_id, meter, dimensions, window_start_ms, credit_type, aggregation, precision, quantity, "
               "cost_nano, events FROM meterd_usage WHERE customer_id = ? AND window_start_ms >= ? "
               "AND window_start_ms < ?")
        params: list[Any] = [customer_id, from_ms, to_ms]
        if meter is not None:
            sql += " AND meter = ?"
            params.append(meter)
        # Sorted here: the two engines' collations order text differently.
        return sorted((UsageRow(*r) for r in self._rows(sql, params)),
                      key=lambda r: (r.window_start_ms, r.meter, r.dimensions))

    def charges_before(self, customer_id: str, before_ms: int) -> dict[str, int]:
        """Everything charged to the customer before a time, per money credit type."""
        marks = ", ".join("?" for _ in CHARGE_KINDS)
        rows = self._rows(f"SELECT charge_credit_type, SUM(charge_nano) FROM meterd_entries WHERE customer_id = ? "
                          f"AND effective_ms < ? AND kind IN ({marks}) AND charge_nano <> 0 "
                          f"GROUP BY charge_credit_type", (customer_id, before_ms, *CHARGE_KINDS))
        return {r[0]: int(r[1]) for r in rows}

    def movements_before(self, customer_id: str, before_ms: int) -> dict[str, int]:
        """Per credit type, what the customer's audited movements (every entry but the
        usage deductions, which its usage rows count) added to its balance before a time."""
        rows = self._rows("SELECT credit_type, SUM(balance_after_nano - balance_before_nano) FROM meterd_entries "
                          "WHERE customer_id = ? AND effective_ms < ? AND kind <> 'deducted' GROUP BY credit_type",
                          (customer_id, before_ms))
        return {r[0]: int(r[1]) for r in rows}

    def usage_cost_before(self, customer_id: str, before_ms: int) -> dict[str, int]:
        """Per credit type, what the customer's usage cost in the windows that start before a time."""
        rows = self._rows("SELECT credit_type, SUM(cost_nano) FROM meterd_usage WHERE customer_id = ? "
                          "AND window_start_ms < ? GROUP BY credit_type", (customer_id, before_ms))
        return {r[0]: int(r[1]) for r in rows}

    def entries_of_kind(self, customer_id: str, kind: str, limit: int) -> list[Entry]:
        """The customer's latest entries of a kind, newest first, at most ``limit``."""
        sql = ("SELECT source_sequence, time_ms, effective_ms, customer_id, kind, source, credit_type, amount_nano, "
               "balance_before_nano, balance_after_nano, reference, charge_nano, charge_credit_type, detail "
               "FROM meterd_entries WHERE customer_id = ? AND kind = ? ORDER BY effective_ms DESC, id DESC LIMIT ?")
        return [Entry(*r) for r in self._rows(sql, (customer_id, kind, limit))]

    def totals(self) -> dict[str, int]:
        """Ledger-wide sums, for checks: events, quantity and cost over all usage rows."""
        r = self._rows("SELECT COALESCE(SUM(events), 0), COALESCE(SUM(cost_nano), 0), COUNT(*) FROM meterd_usage")[0]
        return {"events": int(r[0]), "cost_nano": int(r[1]), "rows": int(r[2])}


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


# ---- statements -----------------------------------------------------------------------------


BILLING_PERIODS_BACK_MAX = 1000  # "billing-K": how far back a statement may go by billing period
PERIOD_HELP = ("a month like 2026-11, a range like 2026-11-14..2026-12-14, or billing (the customer's latest "
               "billing period) or billing-1, billing-2, ... (the ones before it)")


def check_period(period: str) -> tuple[int, int] | None:
    """Refuse a statement period that cannot be one, before the ledger is asked: [from, to)
    in ms of a month or a range, None for a billing period (which the ledger knows)."""
    if re.fullmatch(r"billing(-[0-9]{1,4})?", period or ""):
        if int(period[8:] or 0) > BILLING_PERIODS_BACK_MAX:
            raise InvalidInput("period", f"{period!r}: at most billing-{BILLING_PERIODS_BACK_MAX}")
        return None
    return _range_bounds(period) if ".." in (period or "") else period_bounds(period)


def _range_bounds(period: str) -> tuple[int, int]:
    first, _, last = period.partition("..")
    try:
        start, end = parse_time(first, "period"), parse_time(last, "period")
    except InvalidInput:
        raise InvalidInput("period", f"{period[:64]!r} is not {PERIOD_HELP}") from None
    if end <= start:
        raise InvalidInput("period", f"{period[:64]!r}: the range must end after it starts")
    return start, end


def statement_bounds(ledger: Ledger, customer_id: str, period: str) -> tuple[int, int, str]:
    """[from, to) in ms of a statement's period (PERIOD_HELP), and what to call it."""
    fixed = check_period(period)
    if fixed is not None:
        return fixed[0], fixed[1], period
    back = int(period[8:] or 0)
    found = ledger.entries_of_kind(customer_id, "billing_period", back + 2)
    if len(found) <= back:
        raise InvalidInput("period", f"{period!r}: the ledger has {len(found)} billing periods of customer "
                           f"{customer_id[:64]!r}")
    e = found[back]
    end = json.loads(e.detail or "{}").get("period_end_ms", e.effective_ms)
    if back > 0:
        end = min(end, found[back - 1].effective_ms)  # a plan that started again sooner
    return e.effective_ms, end, e.reference


def period_bounds(period: str) -> tuple[int, int]:
    """[from, to) in ms for a calendar month 'YYYY-MM' in UTC."""
    m = re.fullmatch(r"([0-9]{4})-([0-9]{2})", period or "")
    if not m or not 1 <= int(m.group(2)) <= 12:
        raise InvalidInput("period", f"{(period or '')[:64]!r} is not {PERIOD_HELP}")
    year, month = int(m.group(1)), int(m.group(2))
    if not 1970 <= year <= 9998:  # the ledger counts ms since 1970; a period ends within the calendar's years
        raise InvalidInput("period", f"{period!r} is out of range: a month from 1970-01 to 9998-12")
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    nxt = calendar.timegm((year + month // 12, month % 12 + 1, 1, 0, 0, 0))
    return start * 1000, nxt * 1000


def _fmt(nano: int, decimals: int = 9) -> str:
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), 10**9)
    text = f"{frac:09d}".rstrip("0")
    text = text + "0" * max(0, decimals - len(text)) if decimals < 9 else text
    return f"{sign}{whole}" + (f".{text}" if text else "")


def format_quantity(q: int, precision: int) -> str:
    if precision == 0:
        return str(q)
    sign = "-" if q < 0 else ""
    whole, frac = divmod(abs(q), 10**precision)
    return f"{sign}{whole}.{frac:0{precision}d}"


def _sum_usage(rows: Iterable[UsageRow], key: Callable[[UsageRow], tuple]) -> dict[tuple, list[int]]:
    """Usage rows (in window order) summed per key: [quantity by the meter's aggregation, cost, events]."""
    out: dict[tuple, list[int]] = {}
    for r in rows:
        g = out.setdefault(key(r), [0, 0, 0])
        g[0] = combine(r.aggregation, g[0], r.quantity)
        g[1] += r.cost_nano
        g[2] += r.events
    return out


def statement(ledger: Ledger, customer_id: str, period: str) -> dict:
    """What the customer owes for a period (a calendar month, a range, or one of its
    billing periods: PERIOD_HELP), exactly, and how each balance went from its opening
    to its closing figure.

    Charges are what the sidecars booked: recurring fees (with prorations),
    overage by tier, and usage billed in arrears. Usage in money credit types
    is listed by meter and price; the part of it paid from prepaid or granted
    balances is "credits applied". Amounts due are in the currency's minor
    units; what is smaller than a minor unit is carried to the next period,
    so the amounts due over all periods add up to the exact charges.
    """
    if not customer_id:
        raise InvalidInput("customer_id", "is required")
    start, end, label = statement_bounds(ledger, customer_id, period)
    cts = ledger.credit_types()
    lines: list[dict] = []
    money: dict[str, dict[str, int]] = {}
    entries = [e for e in ledger.entries(customer_id, start, end) if not is_pool(e.credit_type)]
    usage = ledger.usage_rows(customer_id, start, end)
    _entry_lines(entries, cts, money, lines)
    _usage_lines(usage, cts, money, lines)
    totals = _totals(money, cts, ledger.charges_before(customer_id, start), ledger.charges_before(customer_id, end),
                     lines)
    activity: list[dict] = []
    moved = {ct: amount for ct, amount in ledger.movements_before(customer_id, start).items() if not is_pool(ct)}
    balances = _balances(moved, ledger.usage_cost_before(customer_id, start), entries, usage, activity)
    return {"customer_id": customer_id, "period": period, "label": label, "from_ms": start, "to_ms": end,
            "lines": lines, "totals": totals, "balances": balances, "activity": activity}


# How each kind of entry moves a balance, on a statement: what the opening balance
# becomes the closing one through (usage is the usage rows' cost; deductions repeat it).
BALANCE_GROUPS = {"grant": "granted", "refund": "granted", "included": "included", "adjust": "adjusted",
                  "expire": "forfeited", "expired": "forfeited", "rollover_forfeited": "forfeited",
                  "gauge_charged": "used",
                  "overage_charged": "billed", "overage_forgiven": "billed", "deficit_carried": "billed",
                  "usage_billed": "billed"}
BALANCE_PARTS = ("granted", "included", "adjusted", "forfeited", "used", "billed", "other")


def activity_line(section: str, description: str, credit_type: str, amount_nano: int, quantity: str = "") -> dict:
    """A line of a statement's activity (StatementLine): ``quantity`` for free units, in the
    meter's unit; fallback usage (``degraded``) says its credit type before the description."""
    line = {"section": section, "description": f"{credit_type} {description}" if section == "degraded"
            else description, "credit_type": credit_type, "amount_nano": amount_nano}
    return line | ({"quantity": quantity} if section == "free_units" else {})


def _balances(moved_before: dict[str, int], used_before: dict[str, int], entries: list[Entry],
              usage: list[UsageRow], lines: list[dict]) -> list[dict]:
    """Per credit type: the opening balance, each kind of movement in the period, the closing
    balance (opening plus them all, exactly); and in ``lines`` the period's activity that
    is not a charge: top-ups and grants, rollovers and forfeits, free units, and usage
    served in a fallback mode."""
    out: dict[str, dict[str, int]] = {}

    def of(ct: str) -> dict[str, int]:
        if ct not in out:
            out[ct] = {"opening_nano": moved_before.get(ct, 0) - used_before.get(ct, 0),
                       **{f"{p}_nano": 0 for p in BALANCE_PARTS}, "rolled_over_nano": 0}
        return out[ct]

    for ct in set(moved_before) | set(used_before):
        of(ct)
    for e in entries:
        moved = e.balance_after_nano - e.balance_before_nano
        if e.kind == "deducted":
            continue
        if moved:
            of(e.credit_type)[f"{BALANCE_GROUPS.get(e.kind, 'other')}_nano"] += moved
        if e.kind == "rolled_over":
            of(e.credit_type)["rolled_over_nano"] += e.amount_nano
            lines.append(activity_line("rollovers", f"rolled over ({e.reference})", e.credit_type, e.amount_nano))
        elif BALANCE_GROUPS.get(e.kind) == "forfeited":
            lines.append(activity_line("rollovers", f"forfeited ({e.reference})", e.credit_type, moved))
        elif BALANCE_GROUPS.get(e.kind) == "granted" or e.kind == "included":
            lines.append(activity_line("grants", f"{e.kind} ({e.reference})", e.credit_type, moved))
        elif e.kind in ("free_units", "degraded"):
            lines.append(activity_line(e.kind, e.reference, e.credit_type, e.amount_nano,
                                       json.loads(e.detail or "{}").get("quantity", "")))
    for r in usage:
        of(r.credit_type)["used_nano"] -= r.cost_nano
    result = []
    for ct in sorted(out):
        b = out[ct]
        b["closing_nano"] = b["opening_nano"] + sum(b[f"{p}_nano"] for p in BALANCE_PARTS)
        result.append({"credit_type": ct, **b})
    return result


def _money(money: dict[str, dict[str, int]], ct: str) -> dict[str, int]:
    """A statement's sums of one credit type."""
    return money.setdefault(ct, {"fees": 0, "overage": 0, "usage": 0, "usage_billed": 0,
                                 "overage_units": 0, "gauges": 0})


def _entry_lines(entries: list[Entry], cts: dict[str, CreditTypeInfo], money: dict[str, dict[str, int]],
                 lines: list[dict]) -> None:
    """The lines of what the sidecars booked: fees, overage, usage billed in arrears, gauges."""
    for e in entries:
        if e.kind == "fee":
            _money(money, e.charge_credit_type)["fees"] += e.charge_nano
            lines.append({"section": "fees", "description": e.reference, "credit_type": e.charge_credit_type,
                          "amount_nano": e.charge_nano})
        elif e.kind == "overage_charged":
            b = _money(money, e.charge_credit_type)
            b["overage"] += e.charge_nano
            if cts.get(e.credit_type, CreditTypeInfo("", "custom", "", 0)).kind == "fiat" \
                    and e.credit_type == e.charge_credit_type:
                b["overage_units"] += e.amount_nano
            detail = json.loads(e.detail or "{}")
            tiers = detail.get("tiers", [])
            lines.append({"section": "overage", "description": f"{_fmt(e.amount_nano)} {e.credit_type} over the "
                          f"included amount ({e.reference})", "credit_type": e.charge_credit_type,
                          "amount_nano": e.charge_nano, "tiers": tiers})
        elif e.kind == "usage_billed":
            _money(money, e.charge_credit_type)["usage_billed"] += e.charge_nano
            lines.append({"section": "usage_billed", "description": f"usage billed in arrears ({e.reference})",
                          "credit_type": e.charge_credit_type, "amount_nano": e.charge_nano})
        elif e.kind == "gauge_charged" and cts.get(e.credit_type, CreditTypeInfo("", "", "", 0)).kind == "fiat":
            _money(money, e.credit_type)["gauges"] += -e.amount_nano
            lines.append({"section": "usage", "description": e.reference, "credit_type": e.credit_type,
                          "amount_nano": -e.amount_nano, "quantity": ""})


def _usage_lines(usage: list[UsageRow], cts: dict[str, CreditTypeInfo], money: dict[str, dict[str, int]],
                 lines: list[dict]) -> None:
    """Usage by meter and dimensions: charges in money credit types, credits used in custom ones."""
    meters = {r.meter: r for r in usage}  # precision and aggregation
    for (ct, meter, dims), (q, cost, n) in sorted(_sum_usage(usage, lambda r: (r.credit_type, r.meter,
                                                                                r.dimensions)).items()):
        info = cts.get(ct)
        section = "usage" if info is not None and info.kind == "fiat" else "credits_used"
        if section == "usage":
            _money(money, ct)["usage"] += cost
        dims_text = ", ".join(f"{k}={v}" for k, v in json.loads(dims).items())
        m = meters[meter]
        shown = "" if m.aggregation == "unique_count" else format_quantity(q, m.precision)
        lines.append({"section": section, "description": meter + (f" ({dims_text})" if dims_text else ""),
                      "credit_type": ct, "amount_nano": cost, "quantity": shown, "events": n})


def _totals(money: dict[str, dict[str, int]], cts: dict[str, CreditTypeInfo], before: dict[str, int],
            upto: dict[str, int], lines: list[dict]) -> list[dict]:
    """Per credit type: what was charged, the credits applied, and what is due in minor units (the rest carried)."""
    totals = []
    for ct in sorted(money):
        b = money[ct]
        info = cts.get(ct, CreditTypeInfo(ct, "fiat", ct.upper(), 2))
        charged = b["fees"] + b["overage"] + b["usage_billed"]
        applied = b["usage"] + b["gauges"] - b["usage_billed"] - b["overage_units"]
        unit = 10 ** (9 - info.decimals)
        due = upto.get(ct, 0) // unit - before.get(ct, 0) // unit
        totals.append({"credit_type": ct, "currency": info.currency, "minor_decimals": info.decimals,
                       "fees_nano": b["fees"], "overage_nano": b["overage"],
                       "usage_nano": b["usage"] + b["gauges"], "credits_applied_nano": applied,
                       "usage_billed_nano": b["usage_billed"], "total_nano": charged,
                       "carried_in_nano": before.get(ct, 0) % unit, "carried_out_nano": upto.get(ct, 0) % unit,
                       "due_minor": due})
        if applied:
            lines.append({"section": "credits_applied", "description": "usage paid from prepaid or granted credit",
                          "credit_type": ct, "amount_nano": -applied})
    return totals


_SECTION_TITLES = {"fees": "Recurring fees", "overage": "Overage", "usage": "Usage charges",
                   "usage_billed": "Billed in arrears", "credits_applied": "Credits applied",
                   "credits_used": "Credits used (custom units)", "free_units": "Free units (not charged)",
                   "degraded": "Served in a fallback mode (not charged; what it would have cost)",
                   "grants": "Top-ups and grants", "rollovers": "Rollovers and forfeits"}
_BALANCE_TITLES = {"opening_nano": "opening balance", "granted_nano": "top-ups and grants",
                   "included_nano": "included credits", "adjusted_nano": "adjustments", "forfeited_nano": "forfeited",
                   "used_nano": "used", "billed_nano": "billed (overage and arrears settled)", "other_nano": "other",
                   "closing_nano": "closing balance"}


def render_statement(st: dict) -> str:
    """A statement as a table for people: money with at least its currency's decimals, exact."""
    start = dt.datetime.fromtimestamp(st["from_ms"] / 1000, dt.timezone.utc).date()
    end = dt.datetime.fromtimestamp(st["to_ms"] / 1000, dt.timezone.utc).date()
    places = {t["credit_type"]: t["minor_decimals"] for t in st["totals"]}

    def amount(nano: int, ct: str) -> str:
        return _fmt(nano, places.get(ct, 9))

    label = st.get("label", st["period"])
    out = [f"Statement for {st['customer_id']}, {label} ({start} to {end}, UTC)", ""]
    width = max([8] + [len(x["credit_type"]) for x in st["lines"]])
    row = "  {:<58} {:>12} {:>%d} {:>16}" % width
    for section, title in _SECTION_TITLES.items():
        lines = [x for x in st["lines"] + st.get("activity", []) if x["section"] == section]
        if not lines:
            continue
        out.append(title)
        for x in lines:
            out.append(row.format(x["description"][:58], x.get("quantity", ""), x["credit_type"],
                                  amount(x["amount_nano"], x["credit_type"])))
            for t in x.get("tiers", []):
                out.append(row.format(f"  tier {t['tier']}: {_fmt(t['units_nano'])} x {t['unit_price']}"[:46], "",
                                      x["credit_type"], amount(t["charge_nano"], x["credit_type"])))
        out.append("")
    for b in st.get("balances", []):
        out.append(f"Balance of {b['credit_type']}")
        for key, title in _BALANCE_TITLES.items():
            if b[key] or key in ("opening_nano", "closing_nano"):
                out.append(row.format(title, "", b["credit_type"], amount(b[key], b["credit_type"])))
        out.append("")
    if not st["totals"]:
        out.append("Nothing is owed for this period.")
    for t in st["totals"]:
        d = t["minor_decimals"]
        due = t["due_minor"]
        sign = "-" if due < 0 else ""
        whole, frac = divmod(abs(due), 10**d)
        due_text = f"{sign}{whole}" + (f".{frac:0{d}d}" if d else "")
        out.append(f"Total charged ({t['credit_type']}): {amount(t['total_nano'], t['credit_type'])} "
                   f"(fees {amount(t['fees_nano'], t['credit_type'])}, overage "
                   f"{amount(t['overage_nano'], t['credit_type'])}, billed in arrears "
                   f"{amount(t['usage_billed_nano'], t['credit_type'])})")
        out.append(f"Amount due: {t['currency']} {due_text}  (below a minor unit, carried in "
                   f"{_fmt(t['carried_in_nano'])}, carried to next month {_fmt(t['carried_out_nano'])})")
    return "\n".join(out)


# ---- usage queries --------------------------------------------------------------------------------

WINDOWS = {"minute": 60_000, "hour": 3_600_000, "day": 86_400_000}
TIME_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: what a date can say


def parse_time(text: str, field_name: str) -> int:
    """ms since the epoch from an ISO date or date-time (UTC unless it says otherwise), or ms digits."""
    if re.fullmatch(r"[0-9]{10,}", text or ""):
        if int(text) > TIME_MS_MAX:
            raise InvalidInput(field_name, f"{text[:32]!r} is after 9999-12-31 (milliseconds since 1970)")
        return int(text)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(field_name, f"{text!r} is not a date like 2026-11-01 or 2026-11-01T12:00") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.timezone.utc)
    return int(t.timestamp() * 1000)


def usage_query(ledger: Ledger, customer_id: str, meter: str | None, from_ms: int, to_ms: int,
                group_by: Sequence[str] = (), window: str = "") -> list[dict]:
    """Usage summed per window (minute, hour, day, or the whole range) and per
    the values of the dimensions in ``group_by``."""
    if not customer_id:
        raise InvalidInput("customer_id", "is required")
    if window and window not in WINDOWS:
        raise InvalidInput("window", f"must be one of {', '.join(WINDOWS)}")
    if to_ms <= from_ms:
        raise InvalidInput("to", "must be after from")
    width = WINDOWS.get(window, 0)
    rows = ledger.usage_rows(customer_id, from_ms, to_ms, meter)
    precision = {r.meter: r.precision for r in rows}

    def window_and_group(r: UsageRow) -> tuple:
        dims = json.loads(r.dimensions)
        start = r.window_start_ms - r.window_start_ms % width if width else from_ms
        return (start, r.meter, r.credit_type) + tuple(dims.get(g, "") for g in group_by)

    groups = _sum_usage(rows, window_and_group)
    out = []
    for key in sorted(groups):
        q, cost, n = groups[key]
        start, m, ct = key[:3]
        row = {"window_start_ms": start, "meter": m}
        row.update(dict(zip(group_by, key[3:], strict=True)))
        row.update({"quantity": format_quantity(q, precision[m]), "cost_nano": cost, "credit_type": ct,
                    "events": n})
        out.append(row)
    return out
