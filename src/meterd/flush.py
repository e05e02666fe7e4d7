"""The exactly-once flush of usage aggregates and audit entries to the central ledger.

Snapshots move the core's aggregates into the LMDB ``usage`` database, and
audit entries go to the ``outbox`` database in the commit that makes them
(meterd.drain). A flush takes a fixed range of those rows, records it in LMDB
as the pending flush ``(sidecar_id, sequence)`` before sending, and sends it;
the ledger applies it in one transaction with the record of that sequence.
Only after the ledger has committed does the sidecar delete the range. A
crash or a timeout in between resends the same range under the same sequence,
which the ledger recognises and does not apply again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import random
import uuid
from typing import Any

from meterd.clock import Clock
from meterd.config import Settings
from meterd.drain import Drains, entry_of, row_of, settlement_of
from meterd.errors import ConfigError, InvalidInput, Unavailable
from meterd.escrow import Escrow
from meterd.journal import Journal
from meterd.ledger import CreditTypeInfo, Flush, Ledger, LedgerError, SidecarConflict, check_period, redact, statement
from meterd.results import LedgerState
from meterd.snapshots import Snapshots
from meterd.state import Live
from meterd.store import Op, Store, from_u64, u64

log = logging.getLogger("meterd.flush")

STATEMENT_FLUSHES_MAX = 100  # flushes sent before a statement is read, at most (a backlog larger than that waits)


class LedgerLink:
    """One connection to the ledger on a thread of its own: opened (and migrated,
    for SQLite) on first use, dropped after any failure, every call bounded by
    ledger_timeout_s. The flush and the leases each have one, so that a long
    flush never holds up a lease."""

    def __init__(self, settings: Settings, thread_name: str) -> None:
        self.settings = settings
        self._ledger: Ledger | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=thread_name)

    def _call(self, fn: Any, *args: Any) -> Any:
        if self._ledger is None:
            ledger = Ledger(self.settings.ledger_url, self.settings.ledger_timeout_s)
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

    async def call(self, fn: Any, *args: Any) -> Any:
        """``fn(ledger, *args)`` on the link's thread."""
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self._pool, self._call, fn, *args)
        return await asyncio.wait_for(fut, timeout=self.settings.ledger_timeout_s)

    def close(self) -> None:
        def close() -> None:
            if self._ledger is not None:
                self._ledger.close()
                self._ledger = None
        self._pool.submit(close)
        self._pool.shutdown(wait=False)  # a slow ledger call may still be running: not on the loop


class Flusher:
    """The sidecar's side of the ledger: its identity there, flushing, and status."""

    def __init__(self, settings: Settings, store: Store, live: Live, journal: Journal, drains: Drains,
                 snapshots: Snapshots, clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.journal = journal
        self.drains = drains
        self.snapshots = snapshots
        self.clock = clock
        self.sidecar_id = ""
        self.incarnation = ""
        self.flushed_seq = 0
        self.last_flush_ms = 0
        self.last_flush_error = ""
        self.flush_failures = 0
        self.flush_outcomes = {"applied": 0, "duplicate": 0, "failed": 0}
        self.link = LedgerLink(settings, "meterd-ledger")
        self._backlog_warned = 0
        self._flush_lock = asyncio.Lock()

    def load(self) -> None:
        """This data directory's identity in the ledger, made at its first start."""
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
        self.drains.sidecar_id = self.sidecar_id

    # ---- flushing ---------------------------------------------------------------------------------

    def _ledger_url(self) -> str:
        return self.settings.ledger_url

    async def _on_ledger_thread(self, fn: Any, *args: Any) -> Any:
        return await self.link.call(fn, *args)

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
        usage = ([row_of(v) for _, v in self.store.items_upto("usage", bytes.fromhex(pending["usage_to"]))]
                 if pending["usage_to"] else [])
        outbox = self.store.items_upto("outbox", u64(pending["outbox_to"])) if pending["outbox_to"] else []
        entries, settlements = [], []
        for k, v in outbox:
            settled = settlement_of(v)
            if settled is None:
                entries.append(entry_of(k, v))
            else:
                settlements.append(settled)
        if "rows" in pending and (len(usage), len(outbox)) != tuple(pending["rows"]):
            raise LedgerError(f"flush {pending['seq']}: LMDB holds {len(usage)} usage rows and {len(outbox)} "
                              f"outbox rows, not the {pending['rows']} recorded; refusing to send it")
        cts = [CreditTypeInfo(c.name, c.kind, c.currency if c.kind == "fiat" else "", c.decimals)
               for c in self.live.catalog.credit_types]
        return Flush(self.sidecar_id, pending["seq"], cts, usage, entries, self.incarnation,
                     pending.get("first", False), settlements)

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
        await self.snapshots.wait_idle()  # a snapshot started elsewhere
        await self.snapshots.snapshot()
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
        await self.journal.commit([("meta", b"flush_pending", json.dumps(pending).encode())],
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
        await self.journal.commit([("meta", b"flush_pending", json.dumps(pending).encode())],
                           maintenance=True)
        return pending

    async def send_flush(self, pending: dict) -> bool:
        """Send a pending flush; False when the ledger already had it."""
        return bool(await self._on_ledger_thread(self._apply_pending, pending))

    def _apply_pending(self, ledger: Ledger, pending: dict) -> bool:
        """On the ledger thread: read the flush's rows from LMDB and apply them."""
        flush = self._build_flush(pending)
        if self.settings.balances != "ledger":
            return ledger.apply_flush(flush)
        now = self.clock.now_ms()
        return ledger.apply_flush(flush, lambda lg: Escrow(lg).settle_flush(flush.sidecar_id, flush.incarnation,
                                                                             flush.settlements, now, flush.usage))

    async def finish_flush(self, pending: dict) -> None:
        """The ledger has committed the flush: forget what it holds."""
        ops: list[Op] = [("meta", b"flush_seq", u64(pending["seq"])), ("meta", b"flush_pending", None)]
        if pending["usage_to"]:
            ops.append(("trim", bytes.fromhex(pending["usage_to"]), b"usage"))
        if pending["outbox_to"]:
            ops.append(("trim", u64(pending["outbox_to"]), b"outbox"))
        await self.journal.commit(ops, maintenance=True)
        self.flushed_seq = pending["seq"]
        self._flushed_ok()

    def _flushed_ok(self) -> None:
        self.last_flush_ms = self.clock.now_ms()
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
            if self.journal.broken is not None or self.journal.closing:
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

    def status(self) -> LedgerState:
        rows, entries = self.backlog()
        return LedgerState(self.sidecar_id, redact(self._ledger_url()), self.flushed_seq, rows, entries,
                           self.last_flush_ms, self.last_flush_error, self.flush_failures)

    async def statement(self, customer_id: str, period: str) -> dict:
        if not customer_id:
            raise InvalidInput("customer_id", "is required")
        check_period(period)
        try:
            # What this sidecar knows goes to the ledger before it is asked (a crashed flush may come first).
            for _ in range(STATEMENT_FLUSHES_MAX):
                if not await self.flush_once():
                    break
            return await self._on_ledger_thread(statement, customer_id, period)
        except InvalidInput:
            raise
        except Exception as e:  # noqa: BLE001 - any ledger failure
            raise Unavailable(f"the ledger is unavailable: {_describe(e)}") from None

    def close(self) -> None:
        self.link.close()


def sidecar_id_differs(configured: str, stored: str) -> Exception:
    return ConfigError(f"sidecar_id {configured!r} differs from {stored!r}, the id this data directory already "
                       "flushed under; the ledger would count it as a new sidecar")


def _describe(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "the ledger did not answer in time"
    if isinstance(e, LedgerError):
        return str(e)
    return f"{type(e).__name__}: {str(e).strip()[:300]}"


__all__ = ["Flusher"]
