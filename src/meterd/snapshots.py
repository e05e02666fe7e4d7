"""Snapshots: the changed accounts and the usage aggregates written to LMDB in
one commit, which also drops the log records they cover.

The core is read at once; the aggregates are encoded on a worker thread, so a
large drain does not stall the event loop. Changes made meanwhile are in the
log after the snapshot's position. Only one snapshot (or catalog switch) runs
at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Callable

from meterd.catalog import CompiledCatalog
from meterd.clock import Clock
from meterd.config import Settings
from meterd.drain import Drained, Drains
from meterd.errors import StorageFull, invariant
from meterd.journal import Journal
from meterd.state import Live
from meterd.store import Op, Store, u64

log = logging.getLogger("meterd.engine")


class Snapshots:
    def __init__(self, settings: Settings, store: Store, live: Live, journal: Journal, drains: Drains,
                 clock: Clock) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.journal = journal
        self.drains = drains
        self.clock = clock
        self.running = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Ledger mode: the outbox rows of the leases' consumption, for the accounts a snapshot writes.
        self.settling: Callable[[list[int]], list[bytes]] | None = None
        journal.listeners.append(self.maybe)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Run with no snapshot in progress, and none starting (a catalog switch, the final snapshot)."""
        while self.running:
            await self._idle.wait()
        self._set_running(True)
        try:
            yield
        finally:
            self._set_running(False)

    async def wait_idle(self) -> None:
        while self.running:
            await self._idle.wait()

    def _set_running(self, running: bool) -> None:
        self.running = running
        if running:
            self._idle.clear()
        else:
            self._idle.set()

    # ---- taking one -----------------------------------------------------------------

    def _check(self, pos: int) -> None:
        """Before a snapshot takes anything from the core."""
        journal = self.journal
        invariant(journal.snapshot_pos <= pos <= journal.log_pos,
                  f"snapshot at log position {pos} outside {journal.snapshot_pos}..{journal.log_pos}")
        self.live.catalog.compiled.checked_json  # noqa: B018 - checks the tables, and that they read back

    def ops_now(self) -> list[Op]:
        """A snapshot's ops, all made now (start-up, reload and shutdown)."""
        self._check(self.journal.log_pos)
        accounts, compiled, taken = self._take()
        drained = self.drains.take_carry()
        drained.add(taken, compiled)
        drained.finish(self.drains.seq + 1, self.clock.now_ms(), self.drains.sidecar_id)
        return self._finish(accounts, compiled, drained, self.drains.seq + 1, self.journal.log_pos)

    def _take(self) -> tuple[list[Op], CompiledCatalog, list[tuple]]:
        """Everything a snapshot reads from the core, in one go: the changed
        accounts and the usage aggregates, as of the current log position."""
        core = self.live.core
        self.drains.done()
        dirty = core.take_dirty()
        ops: list[Op] = [("accounts", core.customer_id(i), core.state_bytes(i)) for i in dirty]
        settled = self.settling(dirty) if self.settling is not None else []
        if settled:  # ledger mode: what the changed accounts have consumed of their leases
            ops += self.drains.audit.outbox_ops(settled)
        return ops, self.live.catalog.compiled, core.take_usage()

    def _finish(self, ops: list[Op], compiled: CompiledCatalog, drained: Drained, drain_seq: int,
                pos: int) -> list[Op]:
        ops += self.drains.ops(drained, drain_seq)
        ops.append(("meta", b"catalog", compiled.checked_json))
        ops.append(("meta", b"snapshot_pos", u64(pos)))
        ops.append(("trim", u64(pos), None))
        return ops

    def write_now(self, extra: list[Op] | None = None) -> None:
        """A snapshot committed at once, outside the writer (start-up, before the writer runs),
        with ``extra`` ops in the same commit."""
        generation = self.drains.generation
        try:
            self.store.write_now(self.ops_now() + (extra or []))
        except BaseException:
            self.live.core.mark_all_dirty()  # the marks were taken; nothing was written
            self.drains.failed(generation)
            raise
        self.drains.done()
        self.journal.snapshot_pos = self.journal.log_pos

    async def snapshot(self) -> None:
        """Write changed accounts and drop the log they cover, in one commit. It runs
        as a task of its own: a cancelled caller cannot stop it between its commit
        and the bookkeeping of that commit."""
        await asyncio.shield(asyncio.ensure_future(self._snapshot()))

    async def _snapshot(self) -> None:
        journal = self.journal
        if self.running or (journal.log_pos == journal.snapshot_pos and journal.storage_full is None):
            return
        self._check(journal.log_pos)
        self._set_running(True)
        try:
            await self._run(journal.log_pos, self.drains.generation)
        finally:
            self._set_running(False)

    async def _run(self, pos: int, generation: int) -> None:
        accounts, compiled, taken = self._take()
        carry, drain_seq = self.drains.take_carry(), self.drains.seq + 1
        finished = False
        try:
            drained = await asyncio.to_thread(self._encode, carry, taken, compiled, drain_seq)
            if generation != self.drains.generation:
                return  # state was reloaded from disk meanwhile: the log still has all of it
            ops = self._finish(accounts, compiled, drained, drain_seq, pos)
            finished = True
            await self.journal.commit(ops, maintenance=True)  # trims the log: may use the map's reserve
        except BaseException:
            self.live.core.mark_all_dirty()
            if not finished:  # the aggregates were taken from the core but are in no op: keep them
                self.drains.keep(carry, taken, compiled)
            self.drains.failed(generation)
            raise
        self.drains.done()
        if generation == self.drains.generation:  # else recovery has set both from disk
            self.journal.snapshot_pos = pos
            self.journal.storage_full = None

    def _encode(self, carry: Drained, taken: list[tuple], compiled: CompiledCatalog, drain_seq: int) -> Drained:
        """On a worker thread: what was carried, then the new aggregates, as LMDB rows and
        deductions. ``carry`` is left as it was, for a retry if this snapshot fails."""
        drained = Drained()
        drained.extend(carry)
        drained.add(taken, compiled)
        drained.finish(drain_seq, self.clock.now_ms(), self.drains.sidecar_id)
        return drained

    # ---- when -----------------------------------------------------------------------

    def maybe(self, ops: list[Op]) -> None:
        """After a commit: snapshot when the log has grown long."""
        use = self.store.use  # a long log would need more of the map's reserve than it has to become usage rows
        journal = self.journal
        due = journal.log_pos - journal.snapshot_pos >= self.settings.snapshot_log_records_max or (
            use.log_bytes >= use.snapshot_log_bytes and journal.log_pos != journal.snapshot_pos)
        if due and not self.running:
            asyncio.get_running_loop().create_task(self.quietly())

    async def quietly(self) -> None:
        try:
            await self.snapshot()
        except StorageFull:
            pass
        except Exception:  # noqa: BLE001 - a snapshot is an optimisation
            log.exception("snapshot failed")
