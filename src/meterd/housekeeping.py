"""The housekeeping timer: what falls due with time. Reservations and grants
expire, sessions whose heartbeats stopped close, subscriptions and the
calendar month roll, remembered answers leave their window, and snapshots are
taken on their interval. Each step is maintenance: it goes on while the data
plane's writes are refused."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from meterd import records
from meterd.answers import AnswerStore
from meterd.audit import Audit
from meterd.clock import Clock, month_bounds
from meterd.config import Settings
from meterd.errors import StorageFull
from meterd.holds import Holds
from meterd.journal import Journal
from meterd.reservations import Reservations
from meterd.sessions import Sessions
from meterd.snapshots import Snapshots
from meterd.state import Live
from meterd.store import Op, Store, from_u64, u64
from meterd.subscriptions import Subscriptions

log = logging.getLogger("meterd.engine")

SWEEP_CHUNK = 256      # log records per housekeeping commit, so that a burst of expiries does not stall calls
EXPIRE_CHUNK = 10_000  # remembered answers forgotten per housekeeping tick, at most


class Housekeeping:
    def __init__(self, settings: Settings, store: Store, live: Live, journal: Journal, clock: Clock, audit: Audit,
                 holds: Holds, subscriptions: Subscriptions, reservations: Reservations, sessions: Sessions,
                 snapshots: Snapshots, answers: tuple[AnswerStore, ...], recover: Callable[[], None],
                 undo: Callable[[], Awaitable[None]]) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.journal = journal
        self.clock = clock
        self.audit = audit
        self.holds = holds
        self.subscriptions = subscriptions
        self.reservations = reservations
        self.sessions = sessions
        self.snapshots = snapshots
        self.answers = answers
        self.recover = recover  # reloads state from disk after a failed commit; raises while it cannot
        self.undo = undo        # undoes in memory a sweep that failed half way (Recovery.undo_failed)
        self.period_start_ms = 0  # the calendar month of accounts without a plan

    def load(self) -> None:
        self.period_start_ms = from_u64(self.store.get("meta", b"period_start_ms") or u64(0))

    async def sweep(self) -> None:
        """Expire reservations and grants, roll the periods, forget old answers."""
        journal = self.journal
        if journal.closing or journal.reloading:
            return
        if journal.storage_full is not None or self.store.use.refusing:
            # A snapshot trims the log: after a failed commit, the one that commits clears
            # the failure; above the map's high-water mark, it turns the log into rows the
            # flush drains. Housekeeping is maintenance, so it goes on while writes are refused.
            await self.snapshots.quietly()
            if journal.storage_full is not None:
                return
        now = self.clock.now_ms()
        self.subscriptions.roll_if_due(now)
        await self.reservations.expire(now, SWEEP_CHUNK)
        ops = self.holds.expire_grants_ops(now)
        ops += self._month_ops(now)
        for answers in self.answers:
            ops += answers.expire_ops(now, EXPIRE_CHUNK)
        ops += self.sessions.expire_ops(now)
        ops += self.subscriptions.alert_ops()
        if ops:
            await journal.commit_with(ops, maintenance=True)

    def _month_ops(self, now: int) -> list[Op]:
        """A calendar month ended: accounts without a plan have their gauges charged and their usage reset."""
        start, _ = month_bounds(now)
        if start == self.period_start_ms:
            return []
        ops: list[Op] = []
        if self.period_start_ms:
            core = self.live.core
            # In ledger mode the ledger charges them (LedgerPlans.gauges_due): this core has only
            # what this sidecar served.
            with self.audit.effective(start - 1):  # what the ended month owes belongs to it
                for idx in range(len(core)) if self.settings.balances != "ledger" else ():
                    if core.state(idx)[2] == 0:  # gauges of accounts without a plan: their month ends
                        ops += self.subscriptions.gauge_ops(core.customer_id(idx).decode(), idx)
            records.reset_unplanned(core, self.live.catalog.loose_plan)
            ops.append(self.journal.log_op(records.period(self.clock.now_ms())))
        self.period_start_ms = start
        ops.append(("meta", b"period_start_ms", u64(start)))
        return ops

    async def run(self, stop: asyncio.Event, period_s: float = 0.5) -> None:
        last_snapshot = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return
            if self.journal.broken is not None:
                self.recover()
                continue
            try:
                await self.sweep()
                if time.monotonic() - last_snapshot >= self.settings.snapshot_interval_s:
                    last_snapshot = time.monotonic()
                    await self.snapshots.quietly()
            except StorageFull:
                await self.undo()
            except Exception:  # noqa: BLE001 - housekeeping must keep running
                log.exception("housekeeping failed")
                await self.undo()
