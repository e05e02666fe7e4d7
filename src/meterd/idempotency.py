"""Remembered answers, the policy around their ``AnswerStore`` (LMDB):

- ``Idempotency``: the keys of unary calls. A retry gets the first answer back,
  and a key reused with another request is refused.
- ``Settled``: the final answer a reservation or a session leaves, its first
  byte saying what settled it, so that a retried Commit, Release, Heartbeat or
  EndSession learns what was billed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import AsyncIterator

from meterd.answers import ADMIN_LABEL, AnswerStore, entry_key, label_of_key
from meterd.clock import Clock
from meterd.config import Settings
from meterd.errors import Conflict, InvalidInput, StorageFull, Unavailable
from meterd.journal import Journal
from meterd.results import Keyed, Replay
from meterd.store import Op


def digest(request: bytes) -> bytes:
    """What a remembered answer keeps of its request, to tell a reused key."""
    return hashlib.blake2b(request, digest_size=8).digest()


class Idempotency:
    def __init__(self, settings: Settings, answers: AnswerStore, journal: Journal, clock: Clock,
                 tenants: bool) -> None:
        self.settings = settings
        self.answers = answers
        self.journal = journal
        self.clock = clock
        self.tenants = tenants  # per-tenant quotas apply
        # Keys whose first call is waiting (for a lease, in ledger mode) between its lookup and its answer:
        # a retry meanwhile waits for that answer instead of applying the request again.
        self.waiting: dict[bytes, asyncio.Future] = {}

    def key(self, label: str, rpc: str, customer_id: str, keyed: Keyed | None) -> bytes | None:
        """The store key of a call (None without an idempotency key); Admin calls pass ADMIN_LABEL."""
        if keyed is None:
            return None
        if len(keyed.key.encode()) > self.settings.idempotency_key_bytes_max:
            raise InvalidInput("idempotency_key", f"longer than {self.settings.idempotency_key_bytes_max} bytes")
        return entry_key(label, rpc, customer_id, keyed.key)

    def admin_key(self, rpc: str, customer_id: str, keyed: Keyed | None) -> bytes | None:
        """An Admin call's key, in the admin's own quota."""
        return self.key(ADMIN_LABEL, rpc, customer_id, keyed)

    def writable_or_replay(self, label: str, rpc: str, customer_id: str, keyed: Keyed | None) -> Replay | None:
        """``check_writable``; while writes are refused, a retry of a keyed call that was
        remembered (and has landed) is still answered."""
        try:
            self.journal.check_writable()
            return None
        except (StorageFull, Unavailable) as refused:
            try:
                key = self.key(label, rpc, customer_id, keyed)
            except InvalidInput:
                key = None
            replay = self.landed(key, keyed)
            if replay is None:
                raise refused from None
            return replay

    def landed(self, key: bytes | None, keyed: Keyed | None) -> Replay | None:
        """The committed answer of this very request, or None (no key, not remembered, still
        in flight, or another request under the key): what is answered while writes are refused."""
        entry = self.answers.get(key, self.clock.now_ms()) if key is not None and keyed is not None else None
        if entry is None or entry.pending is not None or \
                (entry.digest and entry.digest != digest(keyed.request)):  # type: ignore[union-attr]
            return None
        return Replay(entry.response)

    def writable_or_replay_admin(self, rpc: str, customer_id: str, keyed: Keyed | None) -> Replay | None:
        return self.writable_or_replay(ADMIN_LABEL, rpc, customer_id, keyed)

    async def replayed(self, key: bytes | None, keyed: Keyed | None) -> Replay | None:
        """The stored answer for a repeated key, or None for a new one, which is
        refused when its tenant has no room left to remember it."""
        if key is None or keyed is None:
            return None
        while key in self.waiting:
            await asyncio.shield(self.waiting[key])
        entry = self.answers.get(key, self.clock.now_ms())
        if entry is None:
            self.answers.room(label_of_key(key), self.tenants)
            return None
        if entry.digest and entry.digest != digest(keyed.request):
            raise InvalidInput("idempotency_key", "was used before with a different request")
        if entry.pending is not None:
            await asyncio.shield(entry.pending)  # raises if that commit failed
        return Replay(entry.response)

    @contextlib.asynccontextmanager
    async def holding(self, key: bytes | None) -> AsyncIterator[None]:
        """While a keyed call awaits between its lookup and its answer: retries of its key wait.
        The answer must be remembered with no await after the block, so that they find it."""
        if key is None or key in self.waiting:
            yield
            return
        fut = asyncio.get_running_loop().create_future()
        self.waiting[key] = fut
        try:
            yield
        finally:
            del self.waiting[key]
            fut.set_result(None)

    def remember(self, key: bytes | None, keyed: Keyed | None, response: bytes) -> list[Op]:
        if key is None or keyed is None:
            return []
        return self.answers.put_ops(label_of_key(key), key, digest(keyed.request) if keyed.request else b"",
                                    response, self.clock.now_ms())


SETTLED_BY = {b"C": "Commit", b"R": "Release"}  # the first byte of a reservation's settled answer


class Settled:
    """The final answers of reservations and sessions, kept per tenant for the idempotency window."""

    def __init__(self, answers: AnswerStore, clock: Clock) -> None:
        self.answers = answers
        self.clock = clock

    async def answer(self, key: bytes, by: bytes, request: bytes, what: str, field: str = "quantity") -> Replay | None:
        """The final answer ``what`` left when settled ``by`` (b"C", b"R" or b"S"), or None
        when it has none in its window; ``field`` is what a retry that differs is about."""
        entry = self.answers.get(key, self.clock.now_ms())
        if entry is None:
            return None
        if entry.response[:1] != by:
            raise Conflict(f"{what} was settled by {SETTLED_BY.get(entry.response[:1], 'another call')} already")
        if entry.digest and entry.digest != digest(request):
            raise InvalidInput(field, f"{what} was settled before with a different quantity")
        if entry.pending is not None:
            await asyncio.shield(entry.pending)  # raises if that commit failed
        return Replay(entry.response[1:])

    def put_ops(self, label: str, key: bytes, by: bytes, request: bytes, answer: bytes, now: int) -> list[Op]:
        """Keep a final answer (``request`` digested, unless empty: a session's end is not checked)."""
        return self.answers.put_ops(label, key, digest(request) if request else b"", by + answer, now)
