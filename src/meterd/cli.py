"""The ``meterd`` command: serve, check-config, balance, grant, statement, usage and ledger migrate."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
import time
from decimal import Decimal
from typing import Any, Callable, Sequence

from meterd.catalog import NANO, load_catalog
from meterd.config import Settings, load_settings
from meterd.errors import ConfigError, InvalidInput, MeterdError
from meterd.ledger import LedgerError

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, and extras."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for k, v in record.__dict__.items():
            if k not in _RESERVED:
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class KvFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = (f"ts={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(record.created))} "
                f"level={record.levelname.lower()} logger={record.name} msg={json.dumps(record.getMessage())}")
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return line


def setup_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else KvFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())


def _settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML file of settings (below flags and METERD_* variables)")
    p.add_argument("--data-dir", help="where LMDB keeps state (default ./meterd-data)")
    p.add_argument("--listen", help="data plane address, host:port or unix:path (default 127.0.0.1:50051)")
    p.add_argument("--admin-listen", help="admin address (default a Unix socket in the data directory)")
    p.add_argument("--catalog", help="catalog TOML file (default: the built-in demo catalog)")
    p.add_argument("--no-fsync", dest="fsync", action="store_const", const=False,
                   help="do not fsync commits (loses acknowledged reports on power loss)")
    p.add_argument("--ledger", help="central ledger: sqlite:///PATH or postgresql://USER@HOST/DB "
                   "(default: ledger.sqlite3 in the data directory)")
    p.add_argument("--balances", choices=("local", "ledger"),
                   help="local: this sidecar's own balances (default); ledger: balances shared by every "
                   "sidecar on the ledger, each spending an escrow lease")
    p.add_argument("--test-clock", dest="test_clock", action="store_const", const=True,
                   help="a clock that `meterd advance-clock` moves ahead, for trying plans out (refused with "
                   "settings that look like production)")


def _load(args: argparse.Namespace) -> Settings:
    flags = {k: getattr(args, k, None) for k in ("data_dir", "listen", "admin_listen", "catalog", "fsync", "ledger",
                                                 "balances", "test_clock")}
    return load_settings(flags, config_path=args.config)


def cmd_serve(args: argparse.Namespace) -> int:
    from meterd.server import serve

    settings = _load(args)
    setup_logging(settings)
    catalog = load_catalog(settings.catalog)
    os.umask(0o077)  # whatever meterd makes is its user's alone; each file is also given its mode explicitly
    asyncio.run(serve(settings, catalog))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.file:
        args.config = args.file
    from meterd.preflight import preflight

    settings = _load(args)
    catalog = load_catalog(settings.catalog)
    preflight(settings, catalog)  # what serve checks before it starts, changing nothing
    print(catalog.describe())
    print(f"ok: settings valid; catalog {catalog.source}: {len(catalog.credit_types)} credit types, "
          f"{len(catalog.meters)} meters, {len(catalog.plans)} plans, {len(catalog.customers)} customers")
    return 0


def _connect(args: argparse.Namespace, admin: bool) -> tuple[Any, list[tuple[str, str]]]:
    """A channel to the daemon named by the settings, and the metadata each call carries.

    With TLS on, the server is trusted through --tls-ca (default: tls_cert_file,
    right for a self-signed certificate); --tls-cert/--tls-key present a client
    certificate. Admin calls carry the token of --token-file (default:
    admin_token_file, or the token the daemon keeps in its data directory)."""
    import grpc

    from meterd.security import channel_credentials, check_server_socket, read_token

    settings = _load(args)
    address = settings.admin_address if admin else (getattr(args, "target", None) or settings.listen)
    token_file = args.token_file or (settings.admin_token_path if admin else "")
    metadata = [("authorization", "Bearer " + read_token("--token-file", token_file))] if token_file else []
    if metadata and address.startswith("unix:"):
        check_server_socket("admin_listen" if admin else "--target", address[5:], token_file)
    if settings.tls_cert_file:
        creds = channel_credentials(args.tls_ca or settings.tls_cert_file, args.tls_cert or "", args.tls_key or "")
        # A Unix socket has no host name: the daemon's certificate is checked for "localhost".
        options = [("grpc.ssl_target_name_override", "localhost")] if address.startswith("unix:") else []
        channel = grpc.secure_channel(address, creds, options=options)
    else:
        channel = grpc.insecure_channel(address)
    return channel, metadata


def _safe(text: str) -> str:
    """Text from the daemon or the ledger (customer ids, dimensions, names) for a terminal: control and
    other unprintable characters as escapes, so that none can move the cursor, recolour or forge a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else
                   f"\\U{ord(c):08x}" for c in text)


def _safe_all(value: Any) -> Any:
    """``_safe`` on every string of a statement (JSON output escapes them itself)."""
    if isinstance(value, str):
        return _safe(value)
    if isinstance(value, dict):
        return {k: _safe_all(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe_all(v) for v in value]
    return value


def _credits(nano: int) -> str:
    return str(Decimal(nano) / NANO)


def cmd_balance(args: argparse.Namespace) -> int:
    from meterd.v1 import meter_pb2, meter_pb2_grpc

    if args.ledger is not None:
        return _central_balance(args)

    channel, metadata = _connect(args, admin=False)
    with channel as ch:
        resp = meter_pb2_grpc.MeterStub(ch).GetBalance(meter_pb2.GetBalanceRequest(customer_id=args.customer),
                                                       metadata=metadata)
    for b in resp.balances:
        print(f"{_safe(b.credit_type):<20} balance {_credits(b.balance_nano):>20}  reserved "
              f"{_credits(b.reserved_nano)}  available {_credits(b.available_nano)}")
    for u in resp.usage:
        print(f"usage {_safe(u.meter):<26} {_safe(u.quantity)}")
    _print_terms(resp.terms, "term  ")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """One usage event, of one meter or of several (one request's quantities), answered at once."""
    from meterd.v1 import meter_pb2, meter_pb2_grpc

    quantities = [_pair(text, "METER=QUANTITY") for text in args.usage]
    dims = dict(_pair(text, "--dimension") for text in args.dimension or [])
    event = meter_pb2.UsageEvent(customer_id=args.customer, dimensions=dims, idempotency_key=args.idempotency_key)
    if len(quantities) == 1:
        event.meter, event.quantity_decimal = quantities[0]
    else:
        event.quantities.extend(meter_pb2.Quantity(meter=m, quantity_decimal=q) for m, q in quantities)
    channel, metadata = _connect(args, admin=False)
    with channel as ch:
        r = meter_pb2_grpc.MeterStub(ch).Report(meter_pb2.ReportRequest(event=event), metadata=metadata)
    said = f"{meter_pb2.Decision.Name(r.decision)} cost {_credits(r.cost_nano)} {_safe(r.credit_type)}, balance " \
           f"{_credits(r.balance_nano)}"
    if r.decision == meter_pb2.DECISION_DENY:
        said += f" ({meter_pb2.Reason.Name(r.reason)})"
    if r.decision == meter_pb2.DECISION_DEGRADE:
        said += f" (mode {_safe(r.mode)}, priority {r.priority})"
    print(said + (" (a repeat: nothing charged again)" if r.duplicate else ""))
    return 0


def _pair(text: str, what: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key or not value:
        raise ConfigError(f"{what}: {_safe(repr(text))} is not KEY=VALUE")
    return key, value


def _central_balance(args: argparse.Namespace) -> int:
    """Ledger mode: a customer's balance as the ledger has it, with what sidecars hold of it."""
    from meterd.escrow import Escrow

    with _open_ledger(args) as ledger:
        rows = Escrow(ledger).balance(args.customer, time.time_ns() // 1_000_000)
    if not rows:
        raise ConfigError(f"--customer: {_safe(repr(args.customer))} has no balance in the ledger")
    for b in rows:
        print(f"{_safe(b['credit_type']):<20} balance {_credits(b['balance_nano']):>20}  available "
              f"{_credits(b['available_nano'])}  leased {_credits(b['leased_nano'])}  consumed "
              f"{_credits(b['consumed_nano'])}  expired {_credits(b['expired_nano'])}")
        if b["allowance_nano"] or b["overdrawn_nano"]:
            print(f"  outage allowance {_credits(b['allowance_nano'])} per sidecar; overdrawn "
                  f"{_credits(b['overdrawn_nano'])} (leases in debt {_credits(b['lease_debts_nano'])})")
        for lease in b["leases"]:
            print(f"  lease {_safe(lease['sidecar_id']):<30} {_credits(lease['amount_nano'])}")
    return 0


def _nano(text: str, where: str, signed: bool = False) -> int:
    from meterd.catalog import parse_amount, to_nano

    negative = signed and text.strip().startswith("-")
    amount = to_nano(parse_amount(text.strip().lstrip("-") if negative else text, where, "amount"), where, "amount")
    return -amount if negative else amount


def _grant_amount(text: str, where: str) -> int:
    """A grant's amount: positive; taking credits away is an adjustment, with its reason."""
    amount = 0 if text.strip().startswith("-") else _nano(text, where)
    if amount <= 0:
        raise ConfigError(f"{where}: {_safe(repr(text.strip()))} must be positive; use `meterd adjust` (with "
                          "--reason) to take credits away")
    return amount


def _unknown_customers(stub: Any, metadata: Any, args: argparse.Namespace, customers: list[str]) -> list[str]:
    """The customers neither in the catalog nor with an account in the daemon (every account made by the
    catalog, a grant or a subscription has audit entries). A mistyped id would otherwise get its own
    account and the credits, silently."""
    from meterd.v1 import admin_pb2

    catalog = load_catalog(_load(args).catalog).customer_index
    unknown = []
    for customer in dict.fromkeys(customers):
        if customer in catalog:
            continue
        audit = stub.ListAudit(admin_pb2.ListAuditRequest(customer_id=customer, limit=1), metadata=metadata,
                               timeout=30)
        if not audit.entries:
            unknown.append(customer)
    return unknown


def _refuse_new(unknown: list[str], where: str) -> None:
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConfigError(f"{where}: customer {_safe(repr(unknown[0]))}{more} is not in the catalog and has no "
                          "account: check the id, or pass --new-customer to create it with this grant")


def _central_target(args: argparse.Namespace, customer_id: str, credit_type: str) -> Settings:
    """A customer id the settings accept, and a credit type of the catalog (a central call's target);
    returns the settings, for the ledger."""
    from meterd import validate

    settings = _load(args)
    validate.customer(settings, customer_id)
    if credit_type not in load_catalog(settings.catalog).credit_index:
        raise ConfigError(f"--credit-type: {_safe(repr(credit_type))} is not a credit type of the catalog")
    return settings


def _central(args: argparse.Namespace, method: str, request: Any) -> Any:
    """Ledger mode, with no sidecar: a grant or adjustment in one transaction of the ledger,
    idempotent there by key (the same key through a sidecar's Admin is the same grant)."""
    from meterd import wire
    from meterd.escrow import Escrow
    from meterd.leases import central_key

    settings = _central_target(args, request.customer_id, request.credit_type)
    key, digest = central_key(method, request.customer_id, wire.keyed(request))
    now = time.time_ns() // 1_000_000
    with _open_ledger(args, settings=settings) as ledger:
        escrow = Escrow(ledger)
        if method == "grant":
            return escrow.grant(request.customer_id, request.credit_type, request.amount_nano, 0, 0, request.source,
                                "", now, key, digest)
        return escrow.adjust(request.customer_id, request.credit_type, request.amount_nano, request.reason, now, key,
                             digest)


def cmd_grant(args: argparse.Namespace) -> int:
    from meterd.v1 import admin_pb2, admin_pb2_grpc

    if args.from_csv:
        if args.ledger is not None:
            raise ConfigError("--from-csv goes through a sidecar's Admin: drop --ledger (a sidecar in ledger mode "
                              "grants centrally)")
        return _bulk_grants(args)
    if not (args.customer and args.credit_type and args.amount):
        raise ConfigError("--customer, --credit-type and --amount are required (or --from-csv FILE)")
    amount = _grant_amount(args.amount, "--amount")
    if args.ledger is not None:
        g = _central(args, "grant", admin_pb2.GrantRequest(customer_id=args.customer, credit_type=args.credit_type,
                                                           amount_nano=amount, source=args.source,
                                                           idempotency_key=args.idempotency_key or ""))
        print(f"granted {g.grant_id} in the ledger: balance {_credits(g.balance_nano)}"
              f"{' (duplicate)' if g.duplicate else ''}")
        return 0
    channel, metadata = _connect(args, admin=True)
    with channel as ch:
        if not args.new_customer:
            _refuse_new(_unknown_customers(admin_pb2_grpc.AdminStub(ch), metadata, args, [args.customer]),
                        "--customer")
        resp = admin_pb2_grpc.AdminStub(ch).Grant(admin_pb2.GrantRequest(
            customer_id=args.customer, credit_type=args.credit_type, amount_nano=amount,
            source=args.source, idempotency_key=args.idempotency_key or ""), metadata=metadata)
    print(f"granted {resp.grant_id}: balance {_credits(resp.balance_nano)}{' (duplicate)' if resp.duplicate else ''}")
    return 0


def _bulk_grants(args: argparse.Namespace) -> int:
    """One grant per CSV row (customer,credit_type,amount[,idempotency_key]), with a progress bar.
    Every row is checked before the first grant; a row without a key gets file:line as its key,
    so running the same file again grants nothing twice."""
    import csv

    import grpc

    from meterd.progress import Progress
    from meterd.v1 import admin_pb2, admin_pb2_grpc

    path = args.from_csv
    try:
        with open(path, newline="") as f:
            rows = [(n, row) for n, row in enumerate(csv.reader(f), 1) if row and not row[0].startswith("#")]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if rows and rows[0][1][:3] == ["customer", "credit_type", "amount"]:
        rows = rows[1:]  # a header
    requests = []
    for n, row in rows:
        if len(row) not in (3, 4):
            raise ConfigError(f"{path}:{n}: expected customer,credit_type,amount[,idempotency_key]")
        key = row[3] if len(row) == 4 else f"{path}:{n}"
        requests.append(admin_pb2.GrantRequest(customer_id=row[0], credit_type=row[1],
                                               amount_nano=_grant_amount(row[2], f"{path}:{n}: amount"),
                                               source=args.source, idempotency_key=key))
    channel, metadata = _connect(args, admin=True)
    duplicates = 0
    with channel as ch:
        stub = admin_pb2_grpc.AdminStub(ch)
        if not args.new_customer:
            unknown = _unknown_customers(stub, metadata, args, [r.customer_id for r in requests])
            first = next((n for (n, _), r in zip(rows, requests, strict=True) if unknown and
                          r.customer_id == unknown[0]), 0)
            _refuse_new(unknown, f"{path}:{first}")
        progress = Progress(len(requests), "granting")
        for (n, _), request in zip(rows, requests, strict=True):
            try:
                duplicates += stub.Grant(request, metadata=metadata, timeout=30).duplicate
            except grpc.RpcError as e:
                progress.close()
                print(f"meterd: {path}:{n}: {e.code().name}: {_safe(e.details() or '')}; "  # type: ignore[attr-defined]
                      "the rows before it were granted (run the file again: they will not be granted twice)",
                      file=sys.stderr)
                return 1
            progress.advance()
    progress.close()
    print(f"granted {len(requests) - duplicates} rows from {path}"
          + (f" ({duplicates} already granted earlier)" if duplicates else ""))
    return 0


def cmd_adjust(args: argparse.Namespace) -> int:
    from meterd.v1 import admin_pb2

    amount = _nano(args.amount, "--amount", signed=True)
    if args.ledger is not None:
        g = _central(args, "adjust", admin_pb2.AdjustRequest(
            customer_id=args.customer, credit_type=args.credit_type, amount_nano=amount, reason=args.reason,
            idempotency_key=args.idempotency_key or ""))
        print(f"adjusted by {_credits(amount)} in the ledger: balance {_credits(g.balance_nano)}"
              f"{' (duplicate)' if g.duplicate else ''}")
        return 0
    resp = _admin(args, "Adjust", admin_pb2.AdjustRequest(
        customer_id=args.customer, credit_type=args.credit_type, amount_nano=amount, reason=args.reason,
        idempotency_key=args.idempotency_key or ""))
    print(f"adjusted by {_credits(amount)}: balance {_credits(resp.balance_nano)}"
          f"{' (duplicate)' if resp.duplicate else ''}")
    return 0


def cmd_overdraft(args: argparse.Namespace) -> int:
    from meterd.v1 import admin_pb2

    if (args.amount is None) == (not args.clear):
        raise ConfigError("--amount: give the overdraft, or --clear")
    amount = 0 if args.clear else _nano(args.amount, "--amount")
    resp = _admin(args, "SetOverdraft", admin_pb2.SetOverdraftRequest(
        customer_id=args.customer, credit_type=args.credit_type, amount_nano=amount, clear=args.clear,
        reason=args.reason))
    said = "cleared" if args.clear else f"set to {_credits(amount)}"
    print(f"overdraft of {_safe(args.customer)} in {_safe(args.credit_type)} {said}: the balance may go down to "
          f"{_credits(resp.floor_nano)}; available {_credits(resp.available_nano)}")
    return 0


def _basis_points(text: str, where: str) -> int:
    """A percentage such as 12.5 or 12.5% as basis points (1250): 0 to 100, in steps of 0.01."""
    from fractions import Fraction

    raw = text.strip().removesuffix("%").strip()
    try:
        points = Fraction(raw) * 100 if raw and all(c in "0123456789." for c in raw) else None
    except ValueError:
        points = None
    if points is None or points.denominator != 1 or not 0 <= points <= 10_000:
        raise ConfigError(f"{where}: {_safe(repr(text.strip()))} must be a percentage from 0 to 100 with at most "
                          "2 decimals, such as 12.5")
    return int(points)


def _term_text(term: str, value: int) -> str:
    return f"{Decimal(value) / 100}%" if term == "discount" else _credits(value)


def _print_terms(terms: Any, prefix: str = "") -> None:
    """A customer's own terms (OwnTerm or CustomerTerm messages), one a line."""
    for t in terms:
        print(f"{prefix}{_safe(t.credit_type):<20} {t.term:<10} {_term_text(t.term, t.value)}")


def cmd_terms(args: argparse.Namespace) -> int:
    """Set or clear one of a customer's own terms, or (with none given) list them."""
    from meterd.v1 import admin_pb2, meter_pb2, meter_pb2_grpc

    given = [t for t in ("discount", "budget", "included") if getattr(args, t) is not None]
    if len(given) + bool(args.clear) > 1:
        raise ConfigError("give one of --discount, --budget, --included or --clear at a time")
    if not given and not args.clear:
        channel, metadata = _connect(args, admin=False)
        with channel as ch:
            resp = meter_pb2_grpc.MeterStub(ch).GetBalance(meter_pb2.GetBalanceRequest(customer_id=args.customer),
                                                           metadata=metadata)
        _print_terms(resp.terms)
        if not resp.terms:
            print(f"{_safe(args.customer)} has no terms of its own: its plan's and the catalog's hold")
        return 0
    if args.credit_type is None or args.reason is None:
        raise ConfigError("--credit-type and --reason are needed to set or clear a term")
    term = args.clear or given[0]
    value = 0 if args.clear else (_basis_points(args.discount, "--discount") if term == "discount"
                                  else _nano(getattr(args, term), f"--{term}"))
    resp = _admin(args, "SetTerm", admin_pb2.SetTermRequest(
        customer_id=args.customer, credit_type=args.credit_type, term=term, value=value, clear=bool(args.clear),
        reason=args.reason))
    said = "cleared" if args.clear else f"set to {_term_text(term, value)}"
    print(f"{term} of {_safe(args.customer)} in {_safe(args.credit_type)} {said}: the balance may go down to "
          f"{_credits(resp.floor_nano)}; available {_credits(resp.available_nano)}")
    _print_terms(resp.terms, "  ")
    return 0


def _date_ms(text: str | None, where: str) -> int:
    """A date (YYYY-MM-DD, UTC midnight) or an ISO time, as ms; None or empty: 0 (now)."""
    from meterd.ledger import parse_time

    return parse_time(text, where) if text else 0


def _admin(args: argparse.Namespace, call: str, request: Any) -> Any:
    """One Admin call on the running daemon named by the settings."""
    from meterd.v1 import admin_pb2_grpc

    channel, metadata = _connect(args, admin=True)
    with channel as ch:
        return getattr(admin_pb2_grpc.AdminStub(ch), call)(request, metadata=metadata)


def _utc(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))


def _subscription(args: argparse.Namespace, call: str, request: Any) -> int:
    """Subscribe, Cancel or ChangePlan on a running daemon (Admin), or with ``--ledger`` in the
    ledger itself (ledger mode, no sidecar needed), and what the subscription is after it."""
    sub = _central_subscription(args, call, request) if args.ledger is not None else _admin(args, call, request)

    def day(ms: int) -> str:
        return _utc(ms) if ms else "-"
    credits = (f", credits {day(sub.credit_period_start_ms)} to {day(sub.credit_period_end_ms)}"
               if (sub.credit_period_start_ms, sub.credit_period_end_ms) != (sub.period_start_ms, sub.period_end_ms)
               else "")
    print(f"{_safe(sub.customer_id)}: plan {_safe(sub.plan) or '(none)'}, period {day(sub.period_start_ms)} to "
          f"{day(sub.period_end_ms)}{credits}"
          + (" (cancelled at the period's end)" if sub.cancel_at_period_end else "")
          + (f"; then {_safe(sub.next_plan)}" if sub.next_plan else ""))
    return 0


def _central_subscription(args: argparse.Namespace, call: str, request: Any) -> Any:
    """Ledger mode, with no sidecar: the subscription change in one transaction of the ledger (the
    same key through a sidecar's Admin is the same subscription)."""
    from meterd import validate, wire
    from meterd.escrow import Escrow
    from meterd.leases import central_key, check_catalog
    from meterd.ledger_plans import LedgerPlans

    settings = _load(args)
    validate.customer(settings, request.customer_id)
    catalog = load_catalog(settings.catalog).for_ledger()
    check_catalog(catalog)  # what sidecars in ledger mode refuse of the catalog, refused here too
    now = time.time_ns() // 1_000_000
    with _open_ledger(args, settings=settings) as ledger:
        plans = LedgerPlans(Escrow(ledger), catalog)
        if call == "Subscribe":
            key, digest = central_key("subscribe", request.customer_id, wire.keyed(request))
            if request.start_ms > now:
                raise ConfigError("--start: must not be in the future in ledger mode")
            sub = plans.subscribe(request.customer_id, request.plan, request.start_ms or now, now, key, digest)
        elif call == "Cancel":
            sub = plans.cancel(request.customer_id, request.at_period_end, now)
        else:
            sub = plans.change_plan(request.customer_id, request.plan, now)
    return wire.message(sub)


def cmd_subscribe(args: argparse.Namespace) -> int:
    from meterd.v1 import admin_pb2

    return _subscription(args, "Subscribe", admin_pb2.SubscribeRequest(
        customer_id=args.customer, plan=args.plan, start_ms=_date_ms(args.start, "start"),
        idempotency_key=args.idempotency_key or ""))


def cmd_cancel(args: argparse.Namespace) -> int:
    from meterd.v1 import admin_pb2

    return _subscription(args, "Cancel", admin_pb2.CancelRequest(customer_id=args.customer,
                                                                  at_period_end=args.at_period_end))


def cmd_change_plan(args: argparse.Namespace) -> int:
    from meterd.v1 import admin_pb2

    return _subscription(args, "ChangePlan", admin_pb2.ChangePlanRequest(customer_id=args.customer, plan=args.plan))


def cmd_advance_clock(args: argparse.Namespace) -> int:
    """Move a test clock ahead (Admin.AdvanceClock) and say what time it is now."""
    from meterd.v1 import admin_pb2

    if bool(args.by) == bool(args.to):
        raise SystemExit("meterd advance-clock: give --by or --to")
    request = admin_pb2.AdvanceClockRequest(by_ms=_duration_ms(args.by, "--by") if args.by else 0,
                                            to_ms=_date_ms(args.to, "to") if args.to else 0)
    resp = _admin(args, "AdvanceClock", request)
    print(f"the daemon's clock is at {_utc(resp.now_ms)}")
    return 0


DURATION_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
ADVANCE_DAYS_MAX = 3660  # as the daemon's Admin.AdvanceClock allows


def _duration_ms(text: str, flag: str) -> int:
    """30d, 12h, 90m, 45s or 500ms, as milliseconds."""
    match = re.fullmatch(r"([0-9]{1,12})(ms|s|m|h|d)", text.strip()) if text.isascii() else None
    if match is None:
        raise SystemExit(f"meterd advance-clock: {flag} {text!r}: a duration such as 30d, 12h, 90m, 45s or 500ms")
    ms = int(match.group(1)) * DURATION_UNITS_MS[match.group(2)]
    if ms > ADVANCE_DAYS_MAX * DURATION_UNITS_MS["d"]:
        raise SystemExit(f"meterd advance-clock: {flag} {text!r}: at most {ADVANCE_DAYS_MAX} days at a time")
    return ms


def cmd_audit(args: argparse.Namespace) -> int:
    """A customer's audit trail on a running daemon, oldest first, a page at a time."""
    from google.protobuf import json_format

    from meterd.v1 import admin_pb2

    resp = _admin(args, "ListAudit", admin_pb2.ListAuditRequest(customer_id=args.customer,
                                                                 after_sequence=args.after, limit=args.limit))
    if args.json:
        print(json.dumps([json_format.MessageToDict(e, preserving_proto_field_name=True) for e in resp.entries],
                         indent=2))
        return 0
    for e in resp.entries:
        print(f"{e.sequence:>8}  {_utc(e.time_ms)}  "
              f"{_safe(e.kind):<22} {_safe(e.credit_type):<10} {_credits(e.amount_nano):>16}  balance "
              f"{_credits(e.balance_before_nano)} -> {_credits(e.balance_after_nano)}  {_safe(e.reference)}")
    if not resp.entries:
        print("(no audit entries" + (f" after {args.after})" if args.after else ")"))
    elif len(resp.entries) == args.limit:
        print(f"(more after {resp.entries[-1].sequence}: --after {resp.entries[-1].sequence})")
    return 0


def _open_ledger(args: argparse.Namespace, migrate: bool = False, settings: Settings | None = None) -> Any:
    """The ledger to migrate (made when missing), or to read: reads never create nor change one."""
    from meterd.ledger import Ledger

    ledger = Ledger((settings or _load(args)).ledger_url, create=migrate)
    try:
        if migrate:
            ledger.migrate()
        ledger.check_schema()
    except BaseException:
        ledger.close()
        raise
    return ledger


def cmd_ledger_check(args: argparse.Namespace) -> int:
    """granted = available + leased + consumed + expired, for every customer and credit type."""
    from meterd.escrow import Escrow

    with _open_ledger(args) as ledger:
        escrow = Escrow(ledger)
        problems, totals = escrow.check(), escrow.totals()
    print(f"{totals['balances']} balances, {totals['leases']} leases held: granted {_credits(totals['granted_nano'])}"
          f" = available {_credits(totals['available_nano'])} + leased {_credits(totals['leased_nano'])} + consumed "
          f"{_credits(totals['consumed_nano'])} + expired {_credits(totals['expired_nano'])}")
    for p in problems:
        print(f"meterd: ledger check: {_safe(p)}", file=sys.stderr)
    print("ok" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


def cmd_ledger_release(args: argparse.Namespace) -> int:
    from meterd.escrow import Escrow

    with _open_ledger(args) as ledger:
        returned = Escrow(ledger).release_sidecar(args.sidecar_id, time.time_ns() // 1_000_000)
    print(f"sidecar {_safe(args.sidecar_id)} is fenced for good; {len(returned)} leases given back")
    for customer, ct, amount in returned:
        print(f"  {_safe(customer):<30} {_safe(ct):<12} {_credits(amount)}"
              + ("  (spent beyond its lease in an outage: now the customer's overdrawn)" if amount < 0 else ""))
    return 0


def cmd_ledger_allowance(args: argparse.Namespace) -> int:
    """A customer's outage allowance: what each sidecar may spend beyond its lease while the ledger is away."""
    from meterd.escrow import Escrow

    settings = _central_target(args, args.customer, args.credit_type)
    amount = _nano(args.amount, "--amount")
    with _open_ledger(args, settings=settings) as ledger:
        before = Escrow(ledger).set_allowance(args.customer, args.credit_type, amount, time.time_ns() // 1_000_000)
    print(f"outage allowance of {_safe(args.customer)} in {_safe(args.credit_type)}: {_credits(amount)} per sidecar "
          f"(was {_credits(before)}); sidecars holding a lease of it learn it at their next heartbeat")
    return 0


def cmd_ledger_migrate(args: argparse.Namespace) -> int:
    from meterd.ledger import SCHEMA_VERSION, redact

    with _open_ledger(args, migrate=True) as ledger:
        url = redact(ledger.url)
    print(f"ledger {url}: schema at version {SCHEMA_VERSION}")
    return 0


def _this_month(args: argparse.Namespace) -> str:
    """The current calendar month in UTC, as a period (YYYY-MM): of the data directory's test
    clock when it ran on one (``meterd serve --test-clock``), else of the machine's clock."""
    return time.strftime("%Y-%m", time.gmtime(time.time() + _test_clock_offset_ms(_load(args)) / 1000))


def _test_clock_offset_ms(settings: Settings) -> int:
    """How far the data directory's test clock is ahead of the wall clock (0: it has none, or
    there is no data directory). Read from its LMDB, as a reader beside a running daemon."""
    import lmdb

    from meterd.engine import TEST_CLOCK_KEY
    from meterd.store import from_u64

    path = settings.store_path
    if not os.path.exists(os.path.join(path, "data.mdb")):
        return 0
    try:
        env = lmdb.open(path, readonly=True, lock=True, subdir=True, max_dbs=32)
    except lmdb.Error:
        return 0
    try:
        with env.begin() as txn:
            value = txn.get(TEST_CLOCK_KEY, db=env.open_db(b"meta", txn=txn, create=False))
    except lmdb.Error:  # no such table: a data directory that never ran on a test clock
        return 0
    finally:
        env.close()
    return from_u64(value) if value else 0


def cmd_statement(args: argparse.Namespace) -> int:
    from meterd.ledger import render_statement, statement

    with _open_ledger(args) as ledger:
        st = statement(ledger, args.customer, args.period or _this_month(args))
    print(json.dumps(st, indent=2) if args.json else render_statement(_safe_all(st)))
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from meterd.ledger import WINDOWS, parse_time, period_bounds, usage_query

    month_start, month_end = period_bounds(_this_month(args))  # the default range
    start = parse_time(args.from_, "from") if args.from_ else month_start
    end = parse_time(args.to, "to") if args.to else month_end
    groups = [g for g in (args.group_by or "").split(",") if g]
    with _open_ledger(args) as ledger:
        rows = usage_query(ledger, args.customer, args.meter, start, end, groups, args.window or "")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    head = ["window" if args.window in WINDOWS else "from", "meter", *groups, "quantity", "cost", "events"]
    table = [[_utc(r["window_start_ms"]), r["meter"],
              *[r[g] for g in groups], r["quantity"], f"{_credits(r['cost_nano'])} {r['credit_type']}",
              str(r["events"])] for r in rows]
    head, table = [_safe(h) for h in head], [[_safe(str(x)) for x in row] for row in table]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table, strict=True)]
    for row in [head, *table]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no usage in this range)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """The benchmark suite lives in the source tree (benchmarks/), next to what it measures."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the checkout, when run as the installed `meterd` command
    try:
        from benchmarks.__main__ import main as bench_main
    except ImportError:
        print("meterd: bench runs from a checkout of the source tree: cd to it and run `meterd bench` "
              "(or `python -m benchmarks`)", file=sys.stderr)
        return 2
    rest = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    return bench_main(rest)


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-ca", help="CA file to trust the daemon's certificate (default: tls_cert_file)")
    p.add_argument("--tls-cert", help="client certificate, for mutual TLS")
    p.add_argument("--tls-key", help="client certificate's key, for mutual TLS")
    p.add_argument("--token-file", help="file with the bearer token (default for admin: admin_token_file, else "
                   "<data_dir>/admin.token)")


def _command(sub: Any, name: str, summary: str, examples: str, settings: bool = True) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                       epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
    if settings:
        _settings_args(p)
    return p


def _balance_commands(sub: Any) -> None:
    """balance, grant and adjust: calls on a running daemon."""
    p = _command(sub, "balance", "print a customer's balances and usage this period",
                 "  meterd balance --customer demo\n"
                 "  meterd balance --customer acme --target 10.0.0.5:50051 --token-file tenant.token")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--target", help="data plane address (default: the --listen setting)")
    _client_args(p)
    p.set_defaults(func=cmd_balance)
    p = _command(sub, "report", "report one usage event and print the decision (several METER=QUANTITY: one "
                 "request's quantities, rated and decided as a whole)",
                 "  meterd report --customer demo input_tokens=1200 --dimension model=gpt-4o\n"
                 "  meterd report --customer demo input_tokens=1200 cached_input_tokens=800 output_tokens=350 "
                 "--dimension model=gpt-4o\n"
                 "  meterd report --customer demo gpu_seconds=2.5 --dimension hardware=nvidia-h100 "
                 "--idempotency-key job-77")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("usage", nargs="+", metavar="METER=QUANTITY", help="a meter and its quantity (an exact decimal)")
    p.add_argument("--dimension", action="append", metavar="KEY=VALUE", help="a dimension of the event (repeat)")
    p.add_argument("--idempotency-key", default="", help="a retry with the same key gets the first answer")
    p.add_argument("--target", help="data plane address (default: the --listen setting)")
    _client_args(p)
    p.set_defaults(func=cmd_report)
    p = _command(sub, "grant", "add credits to a customer, or to many from a CSV file (Admin)",
                 "  meterd grant --customer acme --credit-type usd --amount 25.00\n"
                 "  meterd grant --customer acme --credit-type usd --amount 25.00 --idempotency-key topup-8812\n"
                 "  meterd grant --customer newco --credit-type usd --amount 5 --new-customer   # a new account\n"
                 "  meterd grant --from-csv topups.csv      # customer,credit_type,amount[,idempotency_key]\n"
                 "Amounts are positive (take credits away with `meterd adjust`). A customer that is neither in the\n"
                 "catalog nor has an account is refused unless --new-customer says to create it.")
    p.add_argument("--customer", help="the customer id")
    p.add_argument("--credit-type", help="a credit type of the catalog, for example usd")
    p.add_argument("--amount", help="in credits, exact decimal, for example 25.00")
    p.add_argument("--source", default="cli", help="recorded on the grant (default cli); 'refund' marks refunds")
    p.add_argument("--idempotency-key", help="a repeat with the same key grants nothing more")
    p.add_argument("--from-csv", metavar="FILE", help="one grant per row, with a progress bar; rows without a key "
                   "are keyed by file and line, so a second run grants nothing twice")
    p.add_argument("--new-customer", action="store_true", help="allow granting to a customer that is not in the "
                   "catalog and has no account yet, creating it (without it such a grant is refused, so that a "
                   "mistyped id gets no credits)")
    _client_args(p)
    p.set_defaults(func=cmd_grant)
    p = _command(sub, "adjust", "correct a balance up or down, with a reason for the audit trail (Admin)",
                 "  meterd adjust --customer acme --credit-type usd --amount -3.50 --reason 'double-billed job 77'")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--credit-type", required=True, help="a credit type of the catalog")
    p.add_argument("--amount", required=True, help="signed exact decimal: positive credits, negative debits")
    p.add_argument("--reason", required=True, help="why, for the audit trail and the statement")
    p.add_argument("--idempotency-key", help="a repeat with the same key adjusts nothing more")
    _client_args(p)
    p.set_defaults(func=cmd_adjust)
    p = _command(sub, "overdraft", "set how far below zero a customer's balance may go, over its plan's and the "
                 "catalog's, or clear it (Admin)",
                 "  meterd overdraft --customer acme --credit-type usd --amount 50.00 --reason 'net-30 terms'\n"
                 "  meterd overdraft --customer acme --credit-type usd --clear --reason 'terms ended'")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--credit-type", required=True, help="a credit type of the catalog")
    p.add_argument("--amount", help="the overdraft, an exact decimal of 0 or more")
    p.add_argument("--clear", action="store_true", help="remove the customer's own overdraft")
    p.add_argument("--reason", required=True, help="why, for the audit trail")
    _client_args(p)
    p.set_defaults(func=cmd_overdraft)
    p = _command(sub, "terms", "set, clear or list a customer's own terms, over its plan's: a discount off every "
                 "price, a budget for overage, included credits (Admin)",
                 "  meterd terms --customer acme --credit-type usd --discount 12.5 --reason 'annual contract'\n"
                 "  meterd terms --customer dev1 --credit-type premium --budget 20.00 --reason 'raised by admin'\n"
                 "  meterd terms --customer dev1 --credit-type premium --included 500 --reason 'pilot'\n"
                 "  meterd terms --customer dev1 --credit-type premium --clear budget --reason 'back to the plan'\n"
                 "  meterd terms --customer dev1")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--credit-type", help="a credit type of the catalog")
    p.add_argument("--discount", help="a percentage off every price of the credit type's meters, such as 12.5")
    p.add_argument("--budget", help="the most the period's overage may cost, in the money the plan prices it in")
    p.add_argument("--included", help="the credits included each period, in place of the plan's")
    p.add_argument("--clear", choices=("discount", "budget", "included"), help="remove one of the customer's terms")
    p.add_argument("--reason", help="why, for the audit trail")
    p.add_argument("--target", help="data plane address, to list the terms (default: the --listen setting)")
    _client_args(p)
    p.set_defaults(func=cmd_terms)
    _subscription_commands(sub)


def _bounded(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer from ``low`` to ``high`` (a usage error names the flag otherwise)."""
    def parse(text: str) -> int:
        if not text.isascii() or not text.isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not from {low} to {high}")
        return value
    return parse


def _subscription_commands(sub: Any) -> None:
    """subscribe, cancel, change-plan and audit: Admin calls on a running daemon (subscriptions with
    --ledger: in the ledger, for ledger mode)."""
    p = _command(sub, "subscribe", "start a customer's subscription to a plan of the catalog (Admin)",
                 "  meterd subscribe --customer acme --plan pro\n"
                 "  meterd subscribe --customer acme --plan pro --start 2026-12-01 --idempotency-key sub-acme-1\n"
                 "  meterd subscribe --customer acme --plan pro --ledger postgresql://meterd@db/ledger   # ledger mode")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--plan", required=True, help="a plan of the catalog")
    p.add_argument("--start", help="the periods' anchor, a date or time in UTC (default: now)")
    p.add_argument("--idempotency-key", help="a repeat with the same key subscribes once")
    _client_args(p)
    p.set_defaults(func=cmd_subscribe)
    p = _command(sub, "cancel", "end a customer's subscription, now (billing what is owed) or at the period's end",
                 "  meterd cancel --customer acme\n  meterd cancel --customer acme --at-period-end")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--at-period-end", action="store_true", help="keep the plan until its period ends")
    _client_args(p)
    p.set_defaults(func=cmd_cancel)
    p = _command(sub, "change-plan", "move a customer to another plan: an upgrade now (prorated), a downgrade at "
                 "the period's end", "  meterd change-plan --customer acme --plan team")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--plan", required=True, help="a plan of the catalog")
    _client_args(p)
    p.set_defaults(func=cmd_change_plan)
    p = _command(sub, "advance-clock", "move a test clock ahead (a daemon started with --test-clock): the "
                 "period boundaries it passes happen at once", "  meterd advance-clock --by 31d\n"
                 "  meterd advance-clock --to 2027-01-01")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--by", help="how far: 30d, 12h, 90m, 45s or 500ms")
    group.add_argument("--to", help="to a date or time in UTC, ahead of the daemon's clock")
    _client_args(p)
    p.set_defaults(func=cmd_advance_clock)
    p = _command(sub, "audit", "a customer's audit trail: every movement of its balances, oldest first",
                 "  meterd audit --customer acme\n  meterd audit --customer acme --after 120 --limit 50 --json")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--after", type=_bounded(0, 2**63 - 1), default=0, help="entries after this sequence number "
                   "(default: from the first)")
    p.add_argument("--limit", type=_bounded(1, 1000), default=100, help="at most this many entries (1 to 1000, "
                   "default 100)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _client_args(p)
    p.set_defaults(func=cmd_audit)


def _ledger_commands(sub: Any) -> None:
    """statement and usage: reads of the central ledger."""
    p = _command(sub, "statement", "what a customer owes for a month, a range or a billing period, and how its "
                 "balances went, from the central ledger",
                 "  meterd statement --customer demo --period 2026-11\n"
                 "  meterd statement --customer painter --period billing      # its latest billing period\n"
                 "  meterd statement --customer painter --period billing-1    # the one before\n"
                 "  meterd statement --customer demo --period 2026-11-14..2026-12-14 --json")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--period", help="a calendar month in UTC (2026-11), a range (2026-11-14..2026-12-14), or "
                   "billing, billing-1, ... (default: this month)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_statement)
    p = _command(sub, "usage", "usage from the central ledger, by window and dimension",
                 "  meterd usage --customer demo --from 2026-11-01 --to 2026-12-01 --group-by model\n"
                 "  meterd usage --customer demo --meter input_tokens --from 2026-11-27 --to 2026-11-28 "
                 "--window hour --json")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--meter", help="one meter (default: all)")
    p.add_argument("--from", dest="from_", help="start, for example 2026-11-01 (UTC; default: this month's first)")
    p.add_argument("--to", help="end (exclusive), for example 2026-12-01 (default: next month's first)")
    p.add_argument("--group-by", help="dimensions to group by, comma-separated, for example model")
    p.add_argument("--window", choices=["minute", "hour", "day"], help="one row per window (default: the range)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_usage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Real-time metering sidecar: rate usage, debit balances at once, answer allow or deny.",
        epilog="Settings come from flags, then METERD_* variables, then --config FILE, then the defaults.\n"
               "Run `meterd COMMAND --help` for a command's options and examples.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _command(sub, "serve", "run the daemon (Ctrl-C or SIGTERM stops it gracefully)",
                 "  meterd serve                                   # embedded defaults, demo catalog\n"
                 "  meterd serve --config examples/cursor.toml     # settings and catalog in one file\n"
                 "  METERD_LEDGER=postgresql://meterd@db/ledger meterd serve --catalog catalog.toml")
    p.set_defaults(func=cmd_serve)
    p = _command(sub, "check-config", "validate settings and catalog, print what they say, then exit",
                 "  meterd check-config examples/openai.toml\n  meterd check-config --catalog catalog.toml")
    p.add_argument("file", nargs="?", help="a settings file, a catalog, or both in one (same as --config)")
    p.set_defaults(func=cmd_check_config)
    _balance_commands(sub)
    _ledger_commands(sub)
    p = _command(sub, "bench", "run the benchmark suite from a source checkout (about 4 minutes)",
                 "  meterd bench\n  meterd bench -- --seconds 3 --skip capacity,baselines", settings=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="passed on, for example -- --seconds 3")
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("ledger", help="central ledger administration",
                       description="Central ledger administration.")
    lsub = p.add_subparsers(dest="ledger_command", required=True, metavar="COMMAND")
    p = _command(lsub, "migrate", "create or upgrade the ledger's tables (versioned migrations)",
                 "  meterd ledger migrate --ledger postgresql://meterd@db.internal/ledger")
    p.set_defaults(func=cmd_ledger_migrate)
    p = _command(lsub, "check", "check that granted = available + leased + consumed + expired everywhere",
                 "  meterd ledger check --ledger postgresql://meterd@db.internal/ledger")
    p.set_defaults(func=cmd_ledger_check)
    p = _command(lsub, "release-sidecar", "fence a dead sidecar for good and give back what its leases hold",
                 "  meterd ledger release-sidecar sc-0123 --ledger postgresql://meterd@db.internal/ledger")
    p.add_argument("sidecar_id", help="the sidecar's id in the ledger")
    p.set_defaults(func=cmd_ledger_release)
    p = _command(lsub, "allowance", "set what each sidecar may spend of a customer beyond its lease while the "
                 "ledger is away (default 0: fail closed)",
                 "  meterd ledger allowance --customer acme --credit-type usd --amount 2.00 "
                 "--ledger postgresql://meterd@db.internal/ledger")
    p.add_argument("--customer", required=True, help="the customer id")
    p.add_argument("--credit-type", required=True, help="the credit type, for example usd")
    p.add_argument("--amount", required=True, help="per sidecar, in the credit type's units; 0 turns it off")
    p.set_defaults(func=cmd_ledger_allowance)
    return parser


# Fields of domain errors, as the flags that set them.
_FLAGS = {"customer_id": "--customer", "period": "--period", "window": "--window", "to": "--to", "from": "--from",
          "amount_nano": "--amount", "start": "--start"}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = _run(argv)
        sys.stdout.flush()  # here, where a closed pipe is still caught, rather than at exit
        return code
    except BrokenPipeError:
        # The reader went away (`meterd balance | head`): stop quietly, as other commands do on SIGPIPE.
        # Python's own flush at exit would fail again, so stdout goes nowhere from here on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


# Arguments that go into requests as protobuf strings, which must be valid UTF-8 (a path need not be).
_TEXT_ARGS = ("customer", "usage", "dimension", "idempotency_key", "credit_type", "plan", "reason", "meter",
              "source", "group_by")


def _check_text(args: argparse.Namespace) -> str | None:
    """The first text argument that is not valid UTF-8 (bytes a shell passed through), named as its flag."""
    for dest in _TEXT_ARGS:
        value = getattr(args, dest, None)
        for text in value if isinstance(value, list) else [value]:
            try:
                if isinstance(text, str):
                    text.encode()
            except UnicodeEncodeError:
                return "METER=QUANTITY" if dest == "usage" else "--" + dest.replace("_", "-")
    return None


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    bad = _check_text(args)
    if bad is not None:
        print(f"meterd: {bad}: must be valid UTF-8", file=sys.stderr)
        return 2
    try:
        return int(args.func(args))
    except InvalidInput as e:
        flag = _FLAGS.get(e.field, e.field)
        print(f"meterd: {flag}: {_safe(str(e).split(': ', 1)[-1])}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"meterd: {_safe(str(e))}", file=sys.stderr)
        return 2
    except (LedgerError, MeterdError) as e:  # the ledger's, or a refusal of what it was asked (NotFound, ...)
        print(f"meterd: {_safe(str(e))}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a client command's gRPC error, said in one line
        import grpc
        if isinstance(e, grpc.RpcError):
            print(f"meterd: {e.code().name}: {_safe(e.details() or '')}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        raise
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
