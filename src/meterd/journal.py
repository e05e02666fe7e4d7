"""The write path every component shares.

A change is applied in memory, then its ops (the log record, the LMDB rows it
touches, the answers it leaves for retries) are handed to the group-commit
writer as one unit, and the caller is answered once that unit is durable. The
journal numbers the log records, refuses writes while the store cannot take
them, and tells its listeners (the audit feed, the snapshot timer) about each
commit that landed.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from meterd.answers import AnswerStore
from meterd.errors import StorageFull, Unavailable
from meterd.store import Op, Store, Unit, u64


class Journal:
    def __init__(self, store: Store, answers: tuple[AnswerStore, ...]) -> None:
        self.store = store
        self.answers = answers  # every commit carries the answers remembered since the last one
        self.log_pos = 0       # the last log record handed out
        self.snapshot_pos = 0  # the last log record a snapshot covers
        self.storage_full: StorageFull | None = None  # the last commit failed for want of room
        self.broken: Exception | None = None          # recovery from disk failed: nothing is written
        self.closing = False
        self.reloading = False  # a failed call's changes are being undone: nothing is written meanwhile
        self.unsubmitted = 0   # log records handed out since the last unit was submitted
        self.listeners: list[Callable[[list[Op]], None]] = []  # called with each landed commit's ops

    def log_op(self, record: bytes) -> Op:
        """The next log record. A caller submits it before its next await (so that the
        log on disk never skips a position), or fails and has ``abandon`` called."""
        self.log_pos += 1
        self.unsubmitted += 1
        return ("log", u64(self.log_pos), record)

    def abandon(self) -> bool:
        """A call failed: give back the log positions it took and did not submit (they are
        the last ones handed out: nothing awaits between taking and submitting). True when
        it had changed state in memory, which must then be reloaded from disk."""
        changed = bool(self.unsubmitted) or any(a.unsent for a in self.answers)
        self.log_pos -= self.unsubmitted
        self.unsubmitted = 0
        return changed

    def check_writable(self) -> None:
        if self.closing:
            raise Unavailable("meterd is shutting down")
        if self.reloading:
            raise Unavailable("a failed call's changes are being undone; retry")
        if self.broken is not None:
            raise Unavailable("storage failed and meterd is recovering; retry")
        if self.storage_full is not None:
            raise self.storage_full
        self.store.check_room()  # above the map's high-water mark: refused before anything is applied

    def submit(self, ops: list[Op], fut: asyncio.Future, maintenance: bool = False) -> None:
        """Hand a unit to the writer; the answers remembered since the last unit wait for it."""
        self.unsubmitted = 0
        self.store.submit(Unit(ops, fut, maintenance))
        for answers in self.answers:
            answers.flight(fut)

    async def commit(self, ops: list[Op], maintenance: bool = False) -> None:
        """A bookkeeping commit of the store's own (flush, snapshot): no answers, no listeners."""
        fut = asyncio.get_running_loop().create_future()
        self.store.submit(Unit(ops, fut, maintenance))
        await fut

    async def commit_with(self, ops: list[Op], fut: asyncio.Future | None = None,
                          maintenance: bool = False) -> None:
        """Commit a change; returns once it is durable, and tells the listeners."""
        fut = fut or asyncio.get_running_loop().create_future()
        self.submit(ops, fut, maintenance)
        await fut
        self.landed(ops)

    def submit_ahead(self, ops: list[Op]) -> asyncio.Future:
        """A change of its own, submitted ahead of the caller's (the writer is FIFO),
        which no caller waits for; the listeners hear of it when it lands."""
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self.landed(ops))
        self.unsubmitted = 0
        self.store.submit(Unit(ops, fut, maintenance=True))  # a period roll must not wait for room
        return fut

    async def barrier(self) -> None:
        """Returns once everything submitted before it has landed (or failed): the writer is FIFO."""
        fut = asyncio.get_running_loop().create_future()
        self.store.submit(Unit([], fut, maintenance=True))
        try:
            await fut
        except Exception:  # noqa: BLE001 - a failed commit is the writer's to report; this only waits
            pass

    def landed(self, ops: list[Op]) -> None:
        for listener in self.listeners:
            listener(ops)
