"""Daemon settings: flags, then METERD_* environment variables, then a TOML
file, then the embedded defaults. Validated once, at start, with messages that
name where a bad value came from.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, fields
from typing import Any, Mapping

from meterd.errors import ConfigError


@dataclass(frozen=True)
class Settings:
    data_dir: str = "./meterd-data"
    listen: str = "127.0.0.1:50051"
    # Empty: a Unix socket in the data directory, reachable only locally.
    admin_listen: str = ""
    catalog: str = ""
    # LMDB
    # Room for 10M remembered keys and 10M settled answers (about 140 B each)
    # besides the accounts; the file grows only as it is used.
    map_size_bytes: int = 8 << 30
    # Data-plane writes are refused once this much of the map is in use, and
    # accepted again under the low-water mark; the rest of the map is kept for
    # the snapshots, flushes and housekeeping that free space.
    map_high_water_percent: int = 80
    map_low_water_percent: int = 60
    fsync: bool = True
    # Group commit: while the event loop is busy, the writer waits this long for
    # more work to join a commit; when it keeps up, the writer commits at once.
    group_commit_window_us: int = 200
    group_commit_ops_max: int = 4096
    # How long a Python thread may hold the GIL while another waits for it
    # (CPython's default is 5000): background work such as a ledger flush then
    # delays a call by at most about this much at a time.
    gil_switch_interval_us: int = 1000
    # Input limits
    batch_events_max: int = 8000
    batch_bytes_max: int = 4 << 20
    customer_id_bytes_max: int = 128
    client_id_bytes_max: int = 128
    dimensions_max: int = 16
    dimension_key_bytes_max: int = 64
    dimension_value_bytes_max: int = 128
    # Distinct dimension sets a customer may report per meter in one usage window;
    # a new set past it is refused (INVALID_ARGUMENT), so that one-off values such
    # as request ids in dimensions cannot fill memory, LMDB and the ledger.
    dimension_sets_per_window_max: int = 1000
    idempotency_key_bytes_max: int = 128
    streams_max: int = 256
    # With data-plane tokens, no tenant holds more than this many streams; any
    # stream without a request for stream_idle_timeout_s is closed.
    streams_per_tenant_max: int = 32
    stream_idle_timeout_s: float = 300.0
    # State bounds (a *_per_tenant_max applies with data-plane tokens, to each tenant)
    reservation_ttl_s: int = 60
    reservation_ttl_max_s: int = 3600
    reservations_max: int = 1_000_000
    reservations_per_tenant_max: int = 100_000
    sessions_max: int = 100_000
    sessions_per_tenant_max: int = 10_000
    idempotency_window_s: int = 86_400
    # Unary idempotency keys remembered within their window, in LMDB (never
    # dropped early: a full store refuses new keyed calls instead).
    idempotency_keys_max: int = 10_000_000
    idempotency_keys_per_tenant_max: int = 1_000_000
    # Final answers of settled reservations and ended sessions, for retries;
    # a reservation or session is refused when there is no room for its answer.
    settled_answers_max: int = 10_000_000
    settled_answers_per_tenant_max: int = 1_000_000
    clients_max: int = 100_000
    clients_per_tenant_max: int = 10_000
    client_ttl_s: int = 7 * 86_400
    # Snapshots of the account table bound the log that a restart replays.
    snapshot_interval_s: float = 10.0
    snapshot_log_records_max: int = 50_000
    shutdown_grace_s: float = 10.0
    # The central ledger: sqlite:///PATH or postgresql://USER@HOST/DB. Empty: a
    # SQLite file in the data directory.
    ledger: str = ""
    # Stable identity of this sidecar in the ledger; empty: generated once and
    # kept in the data directory.
    sidecar_id: str = ""
    ledger_flush_interval_s: float = 5.0
    ledger_flush_rows_max: int = 20_000
    ledger_timeout_s: float = 10.0
    ledger_retry_max_s: float = 60.0
    # Whose balances these are: "local" (this sidecar's own) or "ledger" (a customer's balance
    # lives in the ledger and is shared by every sidecar pointed at it; each spends only an
    # escrow lease of it: README, Many sidecars). Ledger mode needs `ledger` set.
    balances: str = "local"
    # A lease holds about the customer's recent spend rate here times this horizon, at most a
    # fair share of what is left centrally, and at least one request; it is refilled in the
    # background when it would last less than lease_low_water_s at that rate.
    lease_refill_horizon_s: float = 30.0
    lease_low_water_s: float = 5.0
    lease_requests_min: int = 100  # a new lease has room for this many requests like the one that asked
    # A request its lease cannot cover waits at most this long for a top-up (and for other
    # sidecars to give back what they hold, when the ledger has too little left).
    lease_wait_ms: int = 500
    # How often a sidecar asks the ledger which of its leases are wanted back.
    lease_heartbeat_ms: int = 200
    lease_idle_s: float = 30.0     # a lease not spent from for this long is given back
    # A sidecar whose clock is further than this off the ledger's (measured at each heartbeat)
    # spends no leased credit, and makes no lease calls, until it is back within (0: not checked).
    # Credits that end (a plan's period, a grant's expiry) end by the sidecar's clock: this bounds
    # how long after its end, by the ledger's, a period's credit can be spent.
    lease_clock_skew_max_ms: int = 2_000
    leases_max: int = 100_000      # leases held at once (customers times credit types)
    # TLS for both listeners (PEM files, read again on SIGHUP). A client CA turns
    # on mutual TLS: every client must present a certificate it signed.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # Admin authentication: a bearer token kept in a file (empty: <data_dir>/admin.token,
    # generated at the first start), and/or the names (subject alternative names,
    # else common names) of client certificates allowed to use Admin, comma-separated.
    admin_token_file: str = ""
    admin_client_names: str = ""
    # Per-tenant bearer tokens for the data plane (meterd.security.DataTokens);
    # empty: the data plane needs no token.
    data_tokens_file: str = ""
    # Prometheus metrics over HTTP (host:port); empty: off.
    metrics_listen: str = ""
    # Usage is aggregated per customer, meter, dimension set and window of this width.
    usage_window_s: int = 60
    # An event's timestamp_ms puts its usage in the window (and statement) it belongs
    # to when it is at most this far before the sidecar's clock, or after it; further
    # off, the event is refused. (0: no timestamp, the event is of now.)
    event_late_max_s: int = 86_400
    event_early_max_s: int = 300
    # A daemon for trying plans out: its clock is moved ahead by Admin.AdvanceClock (and
    # `meterd advance-clock`), so periods end when told. Refused with settings that look
    # like production: a PostgreSQL ledger, ledger balances, TLS, data tokens or a
    # listener off loopback.
    test_clock: bool = False
    log_level: str = "info"
    log_format: str = "json"

    @property
    def ledger_url(self) -> str:
        if self.ledger:
            return self.ledger
        return "sqlite:///" + os.path.join(os.path.abspath(self.data_dir), "ledger.sqlite3")

    @property
    def store_path(self) -> str:
        """The LMDB environment, in the data directory."""
        return os.path.join(self.data_dir, "lmdb")

    @property
    def admin_address(self) -> str:
        if self.admin_listen:
            return self.admin_listen
        return "unix:" + os.path.join(os.path.abspath(self.data_dir), "admin.sock")

    @property
    def admin_token_path(self) -> str:
        if self.admin_token_file:
            return self.admin_token_file
        return os.path.join(os.path.abspath(self.data_dir), "admin.token")

    def core_limits(self) -> dict[str, int]:
        return {
            "customer_id_bytes_max": self.customer_id_bytes_max,
            "client_id_bytes_max": self.client_id_bytes_max,
            "batch_events_max": self.batch_events_max,
            "dimensions_max": self.dimensions_max,
            "dimension_key_bytes_max": self.dimension_key_bytes_max,
            "dimension_value_bytes_max": self.dimension_value_bytes_max,
            "dimension_sets_per_window_max": self.dimension_sets_per_window_max,
        }


_FIELDS = {f.name: f for f in fields(Settings)}
# A settings file may also hold the catalog (meterd serve --config examples/openai.toml).
CATALOG_TABLES = ("credit_types", "meters", "plans", "customers", "conditions")


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = _FIELDS[name].type
    try:
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind == "int":
            if isinstance(value, bool):
                raise ValueError
            return int(str(value).replace("_", ""))
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if not isinstance(value, (str, int)):
            raise ValueError
        return str(value)
    except ValueError:
        raise ConfigError(f"{where}: {name}: expected {kind}, got {value!r}") from None


def _need(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{name}: {message}")


def _check_test_clock(s: Settings) -> None:
    """A test clock is for trying plans out, never next to real money."""
    if not s.test_clock:
        return
    production = [name for name, looks in [
        ("ledger (PostgreSQL)", s.ledger.startswith(("postgresql:", "postgres:"))),
        ("balances = ledger", s.balances == "ledger"),
        ("tls_cert_file", bool(s.tls_cert_file)),
        ("data_tokens_file", bool(s.data_tokens_file)),
        ("listen (not loopback)", not _loopback(s.listen)),
        ("admin_listen (not loopback)", bool(s.admin_listen) and not _loopback(s.admin_listen)),
    ] if looks]
    _need(not production, "test_clock", f"is for trying plans out, not with {', '.join(production)}")


def _loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.") or address.startswith("unix:")


def _validate(s: Settings) -> None:
    _check_storage(s)
    _check_sizes(s)
    _check_tables(s)
    _check_timers(s)
    _check_addresses(s)


def _check_storage(s: Settings) -> None:
    """The LMDB map and its reserve."""
    _need(s.map_size_bytes >= 1 << 20, "map_size_bytes", "must be at least 1 MiB")
    _need(10 <= s.map_high_water_percent <= 95, "map_high_water_percent", "must be 10 to 95")
    _need(1 <= s.map_low_water_percent < s.map_high_water_percent, "map_low_water_percent",
         "must be at least 1 and less than map_high_water_percent")
    # The reserve above the high-water mark holds a batch admitted just under it, and then the
    # snapshot that writes its usage as rows before the trim frees its log record.
    reserve = s.map_size_bytes * (100 - s.map_high_water_percent) // 100
    _need(reserve >= 2 * s.batch_bytes_max, "map_high_water_percent",
         f"leaves {reserve} bytes of map_size_bytes ({s.map_size_bytes}) above it for snapshots and flushes, "
         f"less than two batches of batch_bytes_max ({s.batch_bytes_max}); raise map_size_bytes or lower either")


def _check_sizes(s: Settings) -> None:
    """The bounds of one call: batches, ids, dimensions, streams."""
    _need(0 <= s.group_commit_window_us <= 100_000, "group_commit_window_us", "must be 0 to 100000")
    _need(s.group_commit_ops_max >= 1, "group_commit_ops_max", "must be at least 1")
    _need(100 <= s.gil_switch_interval_us <= 100_000, "gil_switch_interval_us", "must be 100 to 100000")
    _need(1 <= s.batch_events_max <= 100_000, "batch_events_max", "must be 1 to 100000")
    _need(1024 <= s.batch_bytes_max <= 64 << 20, "batch_bytes_max", "must be 1 KiB to 64 MiB")
    _need(1 <= s.customer_id_bytes_max <= 255, "customer_id_bytes_max", "must be 1 to 255")
    _need(1 <= s.client_id_bytes_max <= 128, "client_id_bytes_max", "must be 1 to 128")
    _need(0 <= s.dimensions_max <= 64, "dimensions_max", "must be 0 to 64")
    _need(1 <= s.dimension_key_bytes_max <= 1024, "dimension_key_bytes_max", "must be 1 to 1024")
    _need(1 <= s.dimension_value_bytes_max <= 1024, "dimension_value_bytes_max", "must be 1 to 1024")
    _need(1 <= s.dimension_sets_per_window_max <= 1_000_000, "dimension_sets_per_window_max",
         "must be 1 to 1000000")
    _need(1 <= s.idempotency_key_bytes_max <= 255, "idempotency_key_bytes_max", "must be 1 to 255")
    _need(1 <= s.streams_max <= 100_000, "streams_max", "must be 1 to 100000")


def _check_tables(s: Settings) -> None:
    """The bounded tables and their per-tenant shares."""
    _need(1 <= s.reservation_ttl_s <= s.reservation_ttl_max_s, "reservation_ttl_s",
         "must be at least 1 and at most reservation_ttl_max_s")
    _need(s.reservations_max >= 1, "reservations_max", "must be at least 1")
    _need(s.idempotency_window_s >= 1, "idempotency_window_s", "must be at least 1")
    _need(s.idempotency_keys_max >= 1, "idempotency_keys_max", "must be at least 1")
    _need(s.clients_max >= 1, "clients_max", "must be at least 1")
    _need(s.sessions_max >= 1, "sessions_max", "must be at least 1")
    _need(s.stream_idle_timeout_s > 0, "stream_idle_timeout_s", "must be positive")
    _need(s.settled_answers_max >= 1, "settled_answers_max", "must be at least 1")
    for per_tenant, total in (("reservations_per_tenant_max", "reservations_max"),
                              ("sessions_per_tenant_max", "sessions_max"),
                              ("idempotency_keys_per_tenant_max", "idempotency_keys_max"),
                              ("settled_answers_per_tenant_max", "settled_answers_max"),
                              ("clients_per_tenant_max", "clients_max"),
                              ("streams_per_tenant_max", "streams_max")):
        # Above the total it has no effect: the total is reached first.
        _need(getattr(s, per_tenant) >= 1, per_tenant, f"must be at least 1 (it applies below {total})")


def _check_timers(s: Settings) -> None:
    """Timers, logging and the ledger."""
    _need(s.client_ttl_s >= s.idempotency_window_s, "client_ttl_s", "must be at least idempotency_window_s")
    _need(s.snapshot_interval_s > 0, "snapshot_interval_s", "must be positive")
    _need(s.snapshot_log_records_max >= 1, "snapshot_log_records_max", "must be at least 1")
    _need(s.shutdown_grace_s >= 0, "shutdown_grace_s", "must not be negative")
    _need(s.log_level in ("debug", "info", "warning", "error"), "log_level", "must be debug, info, warning or error")
    _need(s.log_format in ("json", "kv"), "log_format", "must be json or kv")
    _need(s.ledger_flush_interval_s > 0, "ledger_flush_interval_s", "must be positive")
    _need(1 <= s.ledger_flush_rows_max <= 1_000_000, "ledger_flush_rows_max", "must be 1 to 1000000")
    _need(s.ledger_timeout_s > 0, "ledger_timeout_s", "must be positive")
    _need(s.ledger_retry_max_s >= s.ledger_flush_interval_s, "ledger_retry_max_s",
         "must be at least ledger_flush_interval_s")
    _check_leases(s)
    _need(1 <= s.usage_window_s <= 86_400 and 86_400 % s.usage_window_s == 0, "usage_window_s",
         "must divide a day: 1 to 86400 seconds, for example 60 or 3600")
    _check_test_clock(s)
    _need(0 <= s.event_late_max_s <= 40 * 86_400, "event_late_max_s", "must be 0 to 3456000 (40 days)")
    _need(0 <= s.event_early_max_s <= 86_400, "event_early_max_s", "must be 0 to 86400")
    _need(len(s.sidecar_id) <= 64 and all(0x21 <= ord(c) <= 0x7E for c in s.sidecar_id), "sidecar_id",
         "must be at most 64 printable ASCII characters without spaces")


def _check_leases(s: Settings) -> None:
    """Ledger mode and its leases."""
    _need(s.balances in ("local", "ledger"), "balances", f"{s.balances!r}: must be local or ledger")
    _need(s.balances == "local" or bool(s.ledger), "balances",
         "ledger mode shares balances through a ledger that every sidecar reaches: set ledger to "
         "postgresql://USER@HOST/DB (or sqlite:///PATH for sidecars on one host)")
    _need(s.lease_refill_horizon_s > 0, "lease_refill_horizon_s", "must be positive")
    _need(0 < s.lease_low_water_s < s.lease_refill_horizon_s, "lease_low_water_s",
         "must be positive and less than lease_refill_horizon_s")
    _need(1 <= s.lease_requests_min <= 1_000_000, "lease_requests_min", "must be 1 to 1000000")
    _need(10 <= s.lease_heartbeat_ms <= 10_000, "lease_heartbeat_ms", "must be 10 to 10000")
    _need(s.lease_wait_ms >= 2 * s.lease_heartbeat_ms, "lease_wait_ms",
         "must be at least twice lease_heartbeat_ms, so that a recall can come back within it")
    _need(s.lease_wait_ms <= s.ledger_timeout_s * 1000, "lease_wait_ms", "must be at most ledger_timeout_s")
    _need(s.lease_idle_s > 0, "lease_idle_s", "must be positive")
    _need(0 <= s.lease_clock_skew_max_ms <= 600_000, "lease_clock_skew_max_ms", "must be 0 (not checked) to 600000")
    _need(1 <= s.leases_max <= 10_000_000, "leases_max", "must be 1 to 10000000")


def _check_addresses(s: Settings) -> None:
    """Listeners, TLS and who may use Admin."""
    port = s.metrics_listen.rpartition(":")[2]
    _need(not s.metrics_listen or (port.isascii() and port.isdigit() and 0 < int(port) < 65536), "metrics_listen",
         "must be host:port, for example 127.0.0.1:9464")
    if s.ledger:
        from meterd.ledger import parse_url
        try:
            parse_url(s.ledger)
        except ConfigError as e:
            raise ConfigError(f"ledger: {e}") from None
    _need(":" in s.listen, "listen", "must be host:port or unix:path")
    for name in ("listen", "admin_listen"):
        address = getattr(s, name)
        port = address.rpartition(":")[2]
        _need(not address or address.startswith("unix:") or (port.isascii() and port.isdigit() and
                                                              int(port) <= 65535), name,
              f"{address!r}: the port must be 0 to 65535")
    admin = s.admin_address
    _need(not admin.startswith("unix:") or len(admin) - 5 < 100, "admin_listen",
         f"the Unix socket path {admin[5:]} is longer than 100 bytes; give a shorter one or a loopback port")
    # TLS and Admin authentication (meterd.security): refuse what would expose Admin.
    _need(bool(s.tls_cert_file) == bool(s.tls_key_file), "tls_cert_file", "tls_cert_file and tls_key_file go together")
    _need(not s.tls_client_ca_file or bool(s.tls_cert_file), "tls_client_ca_file",
         "mutual TLS needs tls_cert_file and tls_key_file")
    _need(not s.admin_client_names or bool(s.tls_client_ca_file), "admin_client_names",
         "client certificates need tls_client_ca_file (mutual TLS)")
    if not admin.startswith("unix:"):
        _need(bool(s.tls_cert_file), "admin_listen", "a TCP admin listener needs TLS (tls_cert_file and "
             "tls_key_file), so that its token or certificates are not sent in the clear")
    # A full batch must fit in a message, roughly 8 bytes per event at least.
    _need(s.batch_bytes_max >= s.batch_events_max * 8, "batch_bytes_max",
         "must be at least 8 bytes per event of batch_events_max")


def read_toml(path: str) -> dict[str, Any]:
    """A TOML file as a dict, or a ConfigError naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def load_settings(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
                  config_path: str | None = None) -> Settings:
    """Merge the sources in order of precedence and validate the result."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = config_path or env.get("METERD_CONFIG", "")
    if path:
        doc = read_toml(path)
        for key, value in doc.items():
            if key in CATALOG_TABLES:
                continue
            if key not in _FIELDS:
                raise ConfigError(f"{path}: {key}: unknown setting")
            values[key] = _coerce(key, value, path)
        if any(k in doc for k in CATALOG_TABLES):
            if "catalog" in doc:
                raise ConfigError(f"{path}: catalog: the file holds a catalog itself; drop the catalog setting")
            values["catalog"] = path  # the settings file is the catalog too
    for name in _FIELDS:
        var = "METERD_" + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var], var)
    for name, value in (flags or {}).items():
        if value is not None:
            if name not in _FIELDS:
                raise ConfigError(f"--{name.replace('_', '-')}: unknown setting")
            values[name] = _coerce(name, value, "--" + name.replace("_", "-"))
    settings = dataclasses.replace(Settings(), **values)
    _validate(settings)
    return settings
