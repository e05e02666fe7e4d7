"""The audit trail: one entry per movement of credit, with the balance before
and after, kept per customer in LMDB, queued in the outbox for the central
ledger, and handed to Watch streams once committed.

Entries are ``AuditEntry`` messages in LMDB (the format on disk, and what the
ledger and Watch read).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import AsyncIterator, Iterator

from meterd.clock import Clock
from meterd.errors import InvalidInput
from meterd.state import Live
from meterd.store import Op, Store, from_u64, u64
from meterd.v1 import admin_pb2

log = logging.getLogger("meterd.audit")

LIST_LIMIT = 100        # entries per ListAudit page by default
LIST_LIMIT_MAX = 1000   # and at most
WATCH_QUEUE_MAX = 10_000  # entries a slow Watch stream may fall behind before it loses the oldest


class Audit:
    def __init__(self, store: Store, live: Live, clock: Clock) -> None:
        self.store = store
        self.live = live
        self.clock = clock
        self.seq = 0  # the last sequence given to an entry (or an outbox deduction)
        self.effective_ms: int | None = None  # while set, entries belong to that instant (a period's end)
        self._watchers: list[tuple[asyncio.Queue, frozenset[str]]] = []

    def load(self) -> None:
        self.seq = from_u64(self.store.get("meta", b"audit_seq") or u64(0))

    @contextlib.contextmanager
    def effective(self, ms: int) -> Iterator[None]:
        """Entries made inside belong to ``ms`` (what an ended period owes belongs to it)."""
        was, self.effective_ms = self.effective_ms, ms
        try:
            yield
        finally:
            self.effective_ms = was

    def entry_ops(self, customer_id: str, kind: str, ct: int, amount: int, before: int, after: int,
                  reference: str, charge: int = 0, charge_ct: int = -1, source: str = "",
                  tiers: list[tuple[int, int, str, int]] | None = None, period_end_ms: int = 0,
                  meter: str = "", quantity: str = "") -> list[Op]:
        """An audit entry, kept per customer and queued in the outbox for the ledger."""
        self.seq += 1
        t = self.clock.now_ms()
        names = self.live.catalog.credit_types
        entry = admin_pb2.AuditEntry(sequence=self.seq, time_ms=t, kind=kind, credit_type=names[ct].name,
                                     amount_nano=amount, balance_before_nano=before, balance_after_nano=after,
                                     reference=reference, customer_id=customer_id, charge_nano=charge,
                                     charge_credit_type=names[charge_ct].name if charge else "",
                                     source=source, effective_ms=t if self.effective_ms is None else self.effective_ms,
                                     tiers=[admin_pb2.ChargeTier(tier=n, units_nano=u, unit_price=p, charge_nano=c)
                                            for n, u, p, c in tiers or []],
                                     period_end_ms=period_end_ms, meter=meter, quantity=quantity)
        value = entry.SerializeToString()
        return [("audit", customer_id.encode() + b"\x00" + u64(self.seq), value),
                ("outbox", u64(self.seq), value),
                ("meta", b"audit_seq", u64(self.seq))]

    def outbox_ops(self, values: list[bytes]) -> list[Op]:
        """Outbox rows of what is not an entry of the trail (usage deductions), numbered in the same sequence."""
        first = self.seq + 1
        self.seq += len(values)
        ops: list[Op] = [("outbox", u64(first + i), v) for i, v in enumerate(values)]
        return ops + [("meta", b"audit_seq", u64(self.seq))]

    def entries(self, customer: bytes, after_sequence: int, limit: int) -> list[admin_pb2.AuditEntry]:
        """A customer's entries after a sequence, oldest first."""
        limit = limit or LIST_LIMIT
        if limit > LIST_LIMIT_MAX:
            raise InvalidInput("limit", f"at most {LIST_LIMIT_MAX}")
        if after_sequence >= (1 << 64) - 1:
            return []
        prefix = customer + b"\x00"
        rows = self.store.items("audit", start=prefix + u64(after_sequence + 1), prefix=prefix, limit=limit)
        return [admin_pb2.AuditEntry.FromString(v) for _, v in rows]

    # ---- Watch ----------------------------------------------------------------

    def publish(self, ops: list[Op]) -> None:
        """A commit landed: hand its audit entries to Watch streams."""
        if not self._watchers:
            return
        for db, _, value in ops:
            if db != "audit" or value is None:
                continue
            entry = admin_pb2.AuditEntry.FromString(value)
            for queue, kinds in self._watchers:
                if kinds and entry.kind not in kinds:
                    continue
                if queue.full():
                    queue.get_nowait()  # a slow watcher loses its oldest entries, not the daemon's memory
                    log.warning("watch stream is slow; dropped an audit entry")
                queue.put_nowait(entry)

    async def watch(self, kinds: frozenset[str]) -> AsyncIterator[admin_pb2.AuditEntry]:
        queue: asyncio.Queue = asyncio.Queue(maxsize=WATCH_QUEUE_MAX)
        item = (queue, kinds)
        self._watchers.append(item)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(item)
