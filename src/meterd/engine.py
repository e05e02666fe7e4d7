"""The metering engine: the components of a sidecar, wired together.

Every state change happens on the asyncio event loop thread, in order: the
core applies it in memory, a component appends a record of it to the LMDB log
with the rows it touches (``Journal``), and the caller is answered only once
that commit is durable. Restart (and recovery from a failed commit) loads the
last snapshot of the account table and replays the log after it through the
same core, so the in-memory state is always a function of what is on disk.

Who owns what (each component is built with what it needs, and imports only
those below it):

    Reports        ReportBatch and Report (the hot paths) and the batch clients
    Reservations   Authorize, Commit, Release and their expiry
    Sessions       duration sessions
    Admin          Grant, Adjust, Subscribe, Cancel, ChangePlan, balances, the audit list
    Subscriptions  plans, period rolls, overage, alerts
    Holds          the open reservations and sessions, and credits spared for them
    Grants         grant buckets: the local balance authority
    Leases         ledger mode: escrow leases of balances that live in the central ledger
    Audit          the audit trail and Watch
    Idempotency    idempotency keys (answers in an AnswerStore)
    Journal        log positions, commits, write refusal
    Snapshots, Drains, Flusher, Recovery, Housekeeping: durability and time

The engine speaks no protobuf outside the hot paths: its calls take and give
domain values (meterd.results); meterd.wire converts for the servicers.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, AsyncIterator, Callable

from meterd import wire
from meterd.admin import Admin
from meterd.answers import AnswerStore
from meterd.audit import Audit
from meterd.catalog import Catalog
from meterd.clock import Clock, TestClock
from meterd.config import Settings
from meterd.drain import Drains
from meterd.errors import ConfigError, Conflict, InvalidInput
from meterd.flush import Flusher
from meterd.grants import Grants
from meterd.holds import Holds
from meterd.housekeeping import Housekeeping
from meterd.idempotency import Idempotency, Settled
from meterd.journal import Journal
from meterd.leases import Leases, check_catalog
from meterd.recovery import Recovery
from meterd.reports import Reports
from meterd.reservations import Reservations
from meterd.sessions import Sessions
from meterd.snapshots import Snapshots
from meterd.state import Live
from meterd.store import Store, from_u64, u64
from meterd.subscriptions import Subscriptions

log = logging.getLogger("meterd.engine")

LEASES_LISTED_MAX = 1000  # leases that GetLedgerStatus lists (leases_held counts them all)
TEST_CLOCK_KEY = b"test_clock_offset_ms"  # in meta: how far a test clock is ahead of the wall clock
ADVANCE_MS_MAX = 3660 * 86_400_000  # one AdvanceClock moves a test clock at most about ten years


class Engine:
    """A sidecar's components over one store, one core and one catalog."""

    def __init__(self, settings: Settings, catalog: Catalog, clock: Clock | None = None,
                 encode: Callable[[object], bytes] = wire.encode) -> None:
        """``clock`` stamps every period, expiry and record (tests move a ManualClock);
        ``encode`` is how an answer is kept for retries (the API's wire form)."""
        self.settings = settings
        self.live = Live(catalog.for_ledger() if settings.balances == "ledger" else catalog)
        self.store = Store(settings.store_path, settings.map_size_bytes, settings.fsync,
                           settings.group_commit_window_us, settings.group_commit_ops_max,
                           settings.map_high_water_percent, settings.map_low_water_percent)
        offset = self.store.get("meta", TEST_CLOCK_KEY)
        if offset is not None and not settings.test_clock and clock is None:
            self.store.close()
            raise ConfigError(f"{settings.data_dir}: this data directory ran on a test clock, "
                              f"{from_u64(offset)} ms ahead of the wall clock: start it with test_clock = true "
                              "(--test-clock), or use another data directory for real money")
        self.clock = clock or (TestClock(from_u64(offset) if offset else 0) if settings.test_clock else Clock())
        window_ms = settings.idempotency_window_s * 1000
        self.idem = AnswerStore(self.store, "idem", window_ms, settings.idempotency_keys_max,
                                settings.idempotency_keys_per_tenant_max, "idempotency_keys_max",
                                "idempotency_keys_per_tenant_max")
        self.settled = AnswerStore(self.store, "settled", window_ms, settings.settled_answers_max,
                                   settings.settled_answers_per_tenant_max, "settled_answers_max",
                                   "settled_answers_per_tenant_max")
        tenants = bool(settings.data_tokens_file)  # per-tenant quotas apply
        self.decisions: collections.Counter[tuple[str, str]] = collections.Counter()  # (rpc, outcome), for metrics
        try:
            self._wire(settings, encode, tenants)
            self.recovery.recover()
            self.recovery.seed()
        except BaseException:
            self.store.close()  # a start that is refused leaves the data directory free
            raise

    def _wire(self, settings: Settings, encode: Callable[[object], bytes], tenants: bool) -> None:
        store, live, clock = self.store, self.live, self.clock
        self.journal = journal = Journal(store, (self.idem, self.settled))
        self.audit = audit = Audit(store, live, clock)
        journal.listeners.append(audit.publish)  # before the snapshot timer: a Watch hears first
        self.grants = grants = Grants(store, live, journal, audit, clock)
        self.holds = holds = Holds(settings, store, live, grants, self.settled, tenants)
        self.subscriptions = subs = Subscriptions(store, live, journal, clock, audit, grants, holds)
        self.idempotency = idem = Idempotency(settings, self.idem, journal, clock, tenants)
        settled = Settled(self.settled, clock)
        self.drains = drains = Drains(store, audit)
        self.snapshots = snapshots = Snapshots(settings, store, live, journal, drains, clock)
        self.flusher = flusher = Flusher(settings, store, live, journal, drains, snapshots, clock)
        self.leases = leases = None
        if settings.balances == "ledger":  # balances shared through the ledger: this sidecar spends leases of them
            check_catalog(live.catalog)
            self.leases = leases = Leases(settings, store, live, journal, clock, flusher)
            snapshots.settling = leases.settling
        self.reservations = Reservations(settings, live, journal, clock, holds, subs, idem, settled, encode,
                                         self.decisions, leases)
        self.sessions = Sessions(settings, live, journal, clock, holds, subs, settled, encode, leases)
        self.reports = Reports(settings, store, live, journal, clock, subs, idem, self.decisions, leases)
        self.housekeeping = Housekeeping(settings, store, live, journal, clock, audit, holds, subs,
                                         self.reservations, self.sessions, snapshots, (self.idem, self.settled),
                                         lambda: self.recovery.try_recover(), lambda: self.recovery.undo_failed())
        self.admin = Admin(settings, live, journal, clock, audit, grants, subs, self.housekeeping, idem, encode,
                           leases)
        self.recovery = Recovery(settings, store, live, journal, clock, drains, snapshots, flusher, audit, grants,
                                 holds, subs, self.reports, self.housekeeping, (self.idem, self.settled), leases)
        # The hot paths, bound once: a servicer's call goes straight to the component.
        self.report = self.reports.report
        self.report_batch = self.reports.report_batch

    # ---- the core and catalog in force ----------------------------------------------

    @property
    def core(self) -> Any:
        return self.live.core

    @property
    def catalog(self) -> Catalog:
        return self.live.catalog

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.store.start(loop, self.recovery.on_commit_failure)

    async def close(self) -> None:
        """Final snapshot, drain the writer, close LMDB."""
        if self.leases is not None:
            await self.leases.return_all()  # before the final snapshot: it settles what was spent
        self.journal.closing = True
        try:
            await self.snapshots.wait_idle()
            await self.snapshots.snapshot()
        except Exception:  # noqa: BLE001 - the log still holds everything
            log.exception("final snapshot failed; the log will be replayed at the next start")
        await self.flusher.final_flush()
        self.flusher.close()
        if self.leases is not None:
            self.leases.close()
        self.store.stop()
        self.store.close()

    async def after_failure(self) -> None:
        """A call failed: what it changed in memory is undone (``Recovery.undo_failed``),
        and it answers only once the period roll it may have set off is durable."""
        await self.recovery.undo_failed()
        await self.subscriptions.roll_settled()

    async def reload_catalog(self, new: Catalog) -> None:
        await self.recovery.reload_catalog(new)

    async def watch(self, kinds: frozenset[str]) -> AsyncIterator[Any]:
        async for entry in self.audit.watch(kinds):
            yield entry

    # ---- housekeeping and the ledger -------------------------------------------------

    async def snapshot(self) -> None:
        await self.snapshots.snapshot()

    async def sweep(self) -> None:
        await self.housekeeping.sweep()

    async def advance_clock(self, by_ms: int, to_ms: int) -> int:
        """A test clock moved ahead, kept in LMDB, and what the time it passed brings done at once."""
        if not isinstance(self.clock, TestClock):
            raise Conflict("the daemon runs on the wall clock: start it with test_clock = true (--test-clock) to "
                           "move its time")
        now = self.clock.now_ms()
        if (by_ms != 0) == (to_ms != 0) or by_ms < 0 or to_ms < 0:
            raise InvalidInput("by_ms", "give by_ms or to_ms (one of them, above zero)")
        step = by_ms or to_ms - now
        if step <= 0:
            raise InvalidInput("to_ms", f"{to_ms} is not ahead of the daemon's clock ({now})")
        if step > ADVANCE_MS_MAX:
            raise InvalidInput("by_ms" if by_ms else "to_ms", f"at most {ADVANCE_MS_MAX // 86_400_000} days at a time")
        self.journal.check_writable()
        self.clock.advance(step)
        await self.journal.commit_with([("meta", TEST_CLOCK_KEY, u64(self.clock.offset_ms))])
        log.info("test clock advanced by %d ms to %d", step, self.clock.now_ms())
        await self.sweep()
        await self.subscriptions.roll_settled()  # answered once the rolls it set off are durable
        return self.clock.now_ms()

    async def run_housekeeping(self, stop: asyncio.Event, period_s: float = 0.5) -> None:
        await self.housekeeping.run(stop, period_s)

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """The flush, and in ledger mode the leases' heartbeat beside it."""
        if self.leases is None:
            await self.flusher.run_flusher(stop)
        else:
            await asyncio.gather(self.flusher.run_flusher(stop), self.leases.run(stop))

    async def flush_once(self) -> bool:
        return await self.flusher.flush_once()

    async def statement(self, customer_id: str, period: str) -> dict:
        """The ledger's statement; one whose period holds the running credit period's end has
        that period's free units and fallback usage so far too (the ledger has them once it ends)."""
        st = await self.flusher.statement(customer_id, period)
        sub = self.subscriptions.subs.get(customer_id)
        # The running period's lines belong where its end's will (its last millisecond).
        if sub is not None and st["from_ms"] <= sub.end_ms - 1 < st["to_ms"]:
            st["activity"] += self.subscriptions.usage_so_far(customer_id)
        elif self.leases is not None and self.live.catalog.plan_index:  # ledger mode: the ledger's subscription
            st["activity"] += await self.leases.usage_so_far(customer_id, st["from_ms"], st["to_ms"])
        return st

    def ledger_status(self) -> Any:
        status = self.flusher.status()
        if self.leases is not None:
            status.leases = self.leases.rows(LEASES_LISTED_MAX)
            status.leases_held = len(self.leases.held)
            status.leases_reachable, status.leases_error = self.leases.reachable, self.leases.last_error
        return status

    def backlog(self) -> tuple[int, int]:
        return self.flusher.backlog()


__all__ = ["Engine"]
