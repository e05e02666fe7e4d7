"""Usage aggregates in LMDB and their exactly-once flush to the central ledger.

The core aggregates allowed usage per (customer, meter, dimension set, window)
in memory. Every snapshot moves those aggregates into the LMDB ``usage``
database in the same commit that trims the log they came from, so each event
is either in the log (and re-aggregated by replay after a crash) or in an
aggregate row, never both and never neither. Audit entries go to the
``outbox`` database in the commit that makes them.

A flush takes a fixed range of those rows, records it in LMDB as the pending
flush ``(sidecar_id, sequence)`` before sending, and sends it; the ledger
applies it in one transaction with the record of that sequence. Only after the
ledger has committed does the sidecar delete the range. A crash or a timeout
in between resends the same range under the same sequence, which the ledger
recognises and does not apply again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import random
import struct
import uuid
from typing import Any

from meterd.ledger import (
    CreditTypeInfo,
    Entry,
    Flush,
    Ledger,
    LedgerError,
    SidecarConflict,
    UsageRow,
    canonical_dimensions,
    redact,
)
from meterd.store import Op, from_u64, u64
from meterd.v1 import admin_pb2, meter_pb2

log = logging.getLogger("meterd.flush")

AGGREGATIONS = ("sum", "count", "max", "latest", "unique_count")
INT64_MAX = (1 << 63) - 1


# An aggregate row in LMDB: five names separated by NUL (ids and names cannot hold
# one), then precision, window, quantity, cost and events.
_ROW = struct.Struct("<iqqqq")
# A deduction in the outbox (its sequence is the key): "D", time, amount, balance
# after, then the customer, credit type and reference separated by NUL. Other
# outbox values are AuditEntry messages, which never start with "D".
_DEDUCTED = struct.Struct("<qqq")


class Drained:
    """The core's aggregates encoded for LMDB, and what they cost per customer and credit type."""

    __slots__ = ("rows", "spent", "usage_ops", "deducted")

    def __init__(self) -> None:
        self.rows: list[bytes] = []
        self.spent: dict[tuple[str, str], list[int]] = {}  # (customer, credit type) -> [cost, balance after]
        self.usage_ops: list[Op] = []
        self.deducted: list[bytes] = []

    def add(self, taken: list[tuple], doc: dict) -> None:
        """Name the aggregates by the catalog they were made under; no per-row objects on the event loop."""
        dims_text: dict[bytes, str] = {}  # few dimension sets are shared by many rows
        names, cts, precisions, specs = doc["meter_names"], doc["credit_types"], doc["precisions"], doc["meters"]
        pack, rows, spent = _ROW.pack, self.rows, self.spent
        for cust, meter, dims, window, qty, cost, events, balance in taken:
            text = dims_text.get(dims)
            if text is None:
                decoded = dict(meter_pb2.UsageEvent.FromString(dims).dimensions) if dims else {}
                text = dims_text[dims] = canonical_dimensions(decoded)
            spec = specs[meter]
            customer, ct = cust.decode(), cts[spec[1]]
            head = b"\x00".join((cust, names[meter].encode(), text.encode(), ct.encode(),
                                 AGGREGATIONS[spec[4]].encode()))
            total = cost
            while qty > INT64_MAX or cost > INT64_MAX:  # a 128-bit aggregate goes as several rows
                part_q, part_c = min(qty, INT64_MAX), min(cost, INT64_MAX)
                rows.append(head + pack(precisions[meter], window, part_q, part_c, 0))
                qty, cost = qty - part_q, cost - part_c
            rows.append(head + pack(precisions[meter], window, qty, cost, events))
            if total or (customer, ct) in spent:
                s = spent.get((customer, ct))
                if s is None:
                    spent[(customer, ct)] = [total, balance]
                else:
                    s[0] += total
                    s[1] = balance  # the latest balance

    def finish(self, drain_seq: int, at_ms: int, sidecar_id: str) -> None:
        """The LMDB ops of the rows under drain ``drain_seq``, and one deduction per
        customer and credit type (their outbox sequences are given on the loop)."""
        prefix = u64(drain_seq)
        self.usage_ops = [("usage", prefix + i.to_bytes(4, "big"), v) for i, v in enumerate(self.rows)]
        reference = f"usage {sidecar_id}/{drain_seq}"
        self.deducted = [_deducted(at_ms, customer, ct, cost, after, reference)
                         for (customer, ct), (cost, after) in sorted(self.spent.items())]

    def extend(self, other: "Drained") -> None:
        """Add what was drained after this."""
        self.rows += other.rows
        for key, (cost, balance) in other.spent.items():
            s = self.spent.setdefault(key, [0, balance])
            s[0] += cost
            s[1] = balance


def _row_of(value: bytes) -> UsageRow:
    cust, meter, dims, ct, agg = value[:-_ROW.size].decode().split("\x00")
    precision, window, qty, cost, events = _ROW.unpack_from(value, len(value) - _ROW.size)
    return UsageRow(cust, meter, dims, window, ct, agg, precision, qty, cost, events)


def _deducted(at_ms: int, customer: str, ct: str, cost: int, after: int, reference: str) -> bytes:
    return b"D" + _DEDUCTED.pack(at_ms, -cost, after) + "\x00".join((customer, ct, reference)).encode()


def _entry_of(key: bytes, value: bytes) -> Entry:
    if value[:1] == b"D":
        seq = from_u64(key)
        at, amount, after = _DEDUCTED.unpack_from(value, 1)
        customer, ct, reference = value[1 + _DEDUCTED.size:].decode().split("\x00")
        return Entry(seq, at, at, customer, "deducted", "usage", ct, amount, after - amount, after, reference)
    e = admin_pb2.AuditEntry.FromString(value)
    tiers = [{"tier": t.tier, "units_nano": t.units_nano, "unit_price": t.unit_price, "charge_nano": t.charge_nano}
             for t in e.tiers]
    return Entry(e.sequence, e.time_ms, e.effective_ms or e.time_ms, e.customer_id, e.kind, e.source,
                 e.credit_type, e.amount_nano, e.balance_before_nano, e.balance_after_nano, e.reference,
                 e.charge_nano, e.charge_credit_type, json.dumps({"tiers": tiers}) if tiers else "{}")


class LedgerMixin:
    """The engine's side of the ledger: draining, flushing and status."""

    # Provided by the engine.
    store: Any
    core: Any
    catalog: Any
    settings: Any
    audit_seq: int

    def _init_ledger(self) -> None:
        self._usage_carry = Drained()
        self._draining = Drained()
        self.recoveries = 0
        self.sidecar_id = ""
        self.incarnation = ""
        self.flushed_seq = 0
        self.drain_seq = 0
        self.last_flush_ms = 0
        self.last_flush_error = ""
        self.flush_failures = 0
        self.flush_outcomes = {"applied": 0, "duplicate": 0, "failed": 0}
        self._ledger: Ledger | None = None
        self._ledger_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meterd-ledger")
        self._backlog_warned = 0
        self._flush_lock = asyncio.Lock()

    def _load_ledger_state(self) -> None:
        sid = self.store.get("meta", b"sidecar_id")
        if sid is None:
            sid = (self.settings.sidecar_id or f"sc-{uuid.uuid4().hex[:16]}").encode()
            # The incarnation tells this data directory from another one that uses the same sidecar_id.
            self.store.write_now([("meta", b"sidecar_id", sid),
                                  ("meta", b"incarnation", uuid.uuid4().hex.encode())])
        elif self.settings.sidecar_id and self.settings.sidecar_id.encode() != sid:
            raise sidecar_id_differs(self.settings.sidecar_id, sid.decode())
        self.sidecar_id = sid.decode()
        self.incarnation = (self.store.get("meta", b"incarnation") or b"").decode()
        self.flushed_seq = from_u64(self.store.get("meta", b"flush_seq") or u64(0))
        self.drain_seq = from_u64(self.store.get("meta", b"drain_seq") or u64(0))

    # ---- draining the core into LMDB ---------------------------------------------------------

    def _take_carry(self) -> Drained:
        """Aggregates an earlier snapshot could not commit: they go first in the next one."""
        carry, self._usage_carry = self._usage_carry, Drained()
        return carry

    def _drain_ops(self, drained: Drained, drain_seq: int) -> list[Op]:
        """The ops of a finished drain; outbox sequences are given here, in order."""
        self._draining = drained
        if not drained.rows:
            return []
        self.drain_seq = drain_seq
        ops = drained.usage_ops + [("meta", b"drain_seq", u64(drain_seq))]
        first = self.audit_seq + 1
        self.audit_seq += len(drained.deducted)
        ops += [("outbox", u64(first + i), value) for i, value in enumerate(drained.deducted)]
        ops.append(("meta", b"audit_seq", u64(self.audit_seq)))
        return ops

    def _drain_failed(self, generation: int) -> None:
        """A snapshot that took the core's aggregates did not commit: keep them
        for the next one, unless state was reloaded from disk meanwhile (then
        replay has rebuilt them)."""
        if generation == self.recoveries:
            self._draining.extend(self._usage_carry)
            self._usage_carry = self._draining
        self._draining = Drained()

    def _now_ms(self) -> int:
        from meterd.engine import now_ms
        return now_ms()

    # ---- flushing ---------------------------------------------------------------------------------

    def _ledger_url(self) -> str:
        return self.settings.ledger_url

    def _ledger_call(self, fn: Any, *args: Any) -> Any:
        """Runs on the ledger thread: one connection, opened (and migrated, for
        SQLite) on first use and dropped after any failure."""
        if self._ledger is None:
            ledger = Ledger(self._ledger_url(), self.settings.ledger_timeout_s)
            try:
                if ledger.dialect == "sqlite":
                    ledger.migrate()
                ledger.check_schema()
            except BaseException:
                ledger.close()
                raise
            self._ledger = ledger
        try:
            return fn(self._ledger, *args)
        except BaseException:
            try:
                self._ledger.close()
            except Exception:  # noqa: BLE001
                pass
            self._ledger = None
            raise

    async def _on_ledger_thread(self, fn: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._ledger_pool, self._ledger_call, fn, *args)
        return await asyncio.wait_for(fut, timeout=self.settings.ledger_timeout_s)

    def _flush_pending(self) -> dict | None:
        raw = self.store.get("meta", b"flush_pending")
        return json.loads(raw) if raw else None

    def _flush_bounds(self) -> tuple[bytes | None, int | None, list[int]]:
        """The last usage key and outbox sequence of the next flush, at most
        ledger_flush_rows_max of each, and how many rows that makes."""
        limit = self.settings.ledger_flush_rows_max
        usage_to, n_usage = self.store.first_keys("usage", limit)
        outbox_to, n_outbox = self.store.first_keys("outbox", limit)
        return usage_to, (from_u64(outbox_to) if outbox_to else None), [n_usage, n_outbox]

    def _build_flush(self, pending: dict) -> Flush:
        """Exactly the rows the pending flush recorded, whatever the limits are now."""
        usage = ([_row_of(v) for _, v in self.store.items_upto("usage", bytes.fromhex(pending["usage_to"]))]
                 if pending["usage_to"] else [])
        entries = ([_entry_of(k, v) for k, v in self.store.items_upto("outbox", u64(pending["outbox_to"]))]
                   if pending["outbox_to"] else [])
        if "rows" in pending and (len(usage), len(entries)) != tuple(pending["rows"]):
            raise LedgerError(f"flush {pending['seq']}: LMDB holds {len(usage)} usage rows and {len(entries)} "
                              f"entries, not the {pending['rows']} recorded; refusing to send it")
        cts = [CreditTypeInfo(c.name, c.kind, c.currency if c.kind == "fiat" else "", c.decimals)
               for c in self.catalog.credit_types]
        return Flush(self.sidecar_id, pending["seq"], cts, usage, entries, self.incarnation,
                     pending.get("first", False))

    async def flush_once(self) -> bool:
        """Send one flush if there is anything to send. Returns True when more
        remains (a backlog larger than one flush). The flush runs as a task of
        its own: a cancelled caller (a client's deadline on GetStatement, say)
        cannot stop it between a commit and the bookkeeping of that commit."""
        return await asyncio.shield(asyncio.ensure_future(self._flush_locked()))

    async def _flush_locked(self) -> bool:
        async with self._flush_lock:
            return await self._flush_once()

    async def _flush_once(self) -> bool:
        while self._snapshot_running:  # type: ignore[attr-defined]  # a snapshot started elsewhere: wait
            await asyncio.sleep(0.005)
        await self.snapshot()  # type: ignore[attr-defined]
        pending = await self.prepare_flush()
        if pending is None:
            self._flushed_ok()
            return False
        try:
            applied = await self.send_flush(pending)
        except SidecarConflict:
            if not pending.get("first"):
                raise
            pending = await self._rebase(pending)  # another directory's last flush came first
            applied = await self.send_flush(pending)
        if applied:
            self.flush_outcomes["applied"] += 1
        else:
            self.flush_outcomes["duplicate"] += 1
            log.info("flush %d was already in the ledger; not applied again", pending["seq"])
        await self.finish_flush(pending)
        return self.store.count("usage") > 0 or self.store.count("outbox") > 0

    async def _rebase(self, pending: dict) -> dict:
        """A first flush that lost the race for the next sequence of its id to
        the directory it replaces, and never reached the ledger: renumber it."""
        if await self._on_ledger_thread(Ledger.has_flushed, self.sidecar_id, self.incarnation):
            raise SidecarConflict(f"sidecar_id {self.sidecar_id!r}: flush {pending['seq']} conflicts with the ledger")
        last = await self._on_ledger_thread(Ledger.last_sequence, self.sidecar_id)
        pending = dict(pending, seq=last + 1)
        await self._commit([("meta", b"flush_pending", json.dumps(pending).encode())],  # type: ignore[attr-defined]
                           maintenance=True)
        return pending

    async def prepare_flush(self) -> dict | None:
        """The pending flush: the one a crash interrupted, or a new one over
        the oldest rows; None when there is nothing to send."""
        pending = self._flush_pending()
        if pending is not None:
            return pending
        # What is on disk, not in memory: a finished flush is committed before it is counted.
        self.flushed_seq = from_u64(self.store.get("meta", b"flush_seq") or u64(0))
        usage_to, outbox_to, rows = await asyncio.to_thread(self._flush_bounds)  # reads, off the event loop
        if usage_to is None and outbox_to is None:
            return None
        first = self.flushed_seq == 0
        base = self.flushed_seq
        if first:
            # A new data directory under an id the ledger may know (a replaced pod, say):
            # its sequences continue after the ledger's.
            base = await self._on_ledger_thread(Ledger.last_sequence, self.sidecar_id)
        pending = {"seq": base + 1, "usage_to": usage_to.hex() if usage_to else "",
                   "outbox_to": outbox_to or 0, "rows": rows, "first": first}
        # Recorded before it is sent: a resend after a crash carries the same rows under the same sequence.
        # Maintenance: it may use the map's reserve, as the flush is what frees the map.
        await self._commit([("meta", b"flush_pending", json.dumps(pending).encode())],  # type: ignore[attr-defined]
                           maintenance=True)
        return pending

    async def send_flush(self, pending: dict) -> bool:
        """Send a pending flush; False when the ledger already had it."""
        return bool(await self._on_ledger_thread(self._apply_pending, pending))

    def _apply_pending(self, ledger: Ledger, pending: dict) -> bool:
        """On the ledger thread: read the flush's rows from LMDB and apply them."""
        return ledger.apply_flush(self._build_flush(pending))

    async def finish_flush(self, pending: dict) -> None:
        """The ledger has committed the flush: forget what it holds."""
        ops: list[Op] = [("meta", b"flush_seq", u64(pending["seq"])), ("meta", b"flush_pending", None)]
        if pending["usage_to"]:
            ops.append(("trim", bytes.fromhex(pending["usage_to"]), b"usage"))
        if pending["outbox_to"]:
            ops.append(("trim", u64(pending["outbox_to"]), b"outbox"))
        await self._commit(ops, maintenance=True)  # type: ignore[attr-defined]
        self.flushed_seq = pending["seq"]
        self._flushed_ok()

    def _flushed_ok(self) -> None:
        self.last_flush_ms = self._now_ms()
        self.last_flush_error = ""
        self.flush_failures = 0
        self._backlog_warned = 0

    def backlog(self) -> tuple[int, int]:
        return self.store.count("usage"), self.store.count("outbox")

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Flush every ledger_flush_interval_s; back off exponentially, with
        jitter, while the ledger fails, and catch up when it returns."""
        interval = self.settings.ledger_flush_interval_s
        delay = interval
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return
            if self.broken is not None or self.closing:  # type: ignore[attr-defined]
                delay = interval
                continue
            try:
                more = await self.flush_once()
                delay = 0.0 if more else interval
            except Exception as e:  # noqa: BLE001 - the ledger may fail in any way; keep serving
                self.flush_failures += 1
                self.flush_outcomes["failed"] += 1
                self.last_flush_error = _describe(e)
                cap = self.settings.ledger_retry_max_s
                delay = min(cap, interval * 2 ** min(self.flush_failures, 20)) * random.uniform(0.5, 1.0)
                self._warn_backlog(delay)

    def _warn_backlog(self, delay: float) -> None:
        rows, entries = self.backlog()
        total = rows + entries
        # Warn at the first failure and each time the backlog doubles.
        if self.flush_failures == 1 or total >= 2 * max(self._backlog_warned, 1):
            self._backlog_warned = max(total, 1)
            log.warning("ledger flush failed (%d in a row): %s; %d usage rows and %d entries wait in LMDB; "
                        "next try in %.1f s", self.flush_failures, self.last_flush_error, rows, entries, delay)

    async def final_flush(self) -> None:
        """At shutdown: one last attempt, bounded by the ledger timeout, unless
        the ledger is known to be away (the backlog stays in LMDB)."""
        if self.flush_failures:
            return
        try:
            await self.flush_once()
        except Exception as e:  # noqa: BLE001 - what is not flushed stays in LMDB for the next start
            log.warning("final ledger flush failed, the backlog stays in LMDB: %s", _describe(e))

    def ledger_status(self) -> admin_pb2.LedgerStatus:
        rows, entries = self.backlog()
        return admin_pb2.LedgerStatus(sidecar_id=self.sidecar_id, ledger=redact(self._ledger_url()),
                                      flushed_sequence=self.flushed_seq, backlog_usage_rows=rows,
                                      backlog_entries=entries, last_flush_ms=self.last_flush_ms,
                                      last_error=self.last_flush_error, consecutive_failures=self.flush_failures)

    async def statement(self, customer_id: str, period: str) -> dict:
        from meterd.errors import InvalidInput, Unavailable
        from meterd.ledger import period_bounds, statement
        if not customer_id:
            raise InvalidInput("customer_id", "is required")
        period_bounds(period)
        try:
            # What this sidecar knows goes to the ledger before it is asked (a crashed flush may come first).
            for _ in range(100):
                if not await self.flush_once():
                    break
            return await self._on_ledger_thread(statement, customer_id, period)
        except InvalidInput:
            raise
        except Exception as e:  # noqa: BLE001 - any ledger failure
            raise Unavailable(f"the ledger is unavailable: {_describe(e)}") from None

    def close_ledger(self) -> None:
        def close() -> None:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None
        self._ledger_pool.submit(close)
        self._ledger_pool.shutdown(wait=False)  # a slow ledger call may still be running: not on the loop


def sidecar_id_differs(configured: str, stored: str) -> Exception:
    from meterd.errors import ConfigError
    return ConfigError(f"sidecar_id {configured!r} differs from {stored!r}, the id this data directory already "
                       "flushed under; the ledger would count it as a new sidecar")


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "the ledger did not answer in time"
    if isinstance(e, LedgerError):
        return str(e)
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


__all__ = ["Drained", "LedgerMixin"]
