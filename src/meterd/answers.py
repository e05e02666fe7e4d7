"""Remembered answers: what a retry gets back instead of being applied twice.

Two stores of the same shape, each with its own budget:

- **unary idempotency keys** (``Report``, ``Authorize``, ``Grant``,
  ``Adjust``, ``Subscribe``): the first answer to a keyed call;
- **settled answers**: the final answer of a committed or released
  reservation and of an ended session, so that a retried ``Commit``,
  ``Release``, ``Heartbeat`` or ``EndSession`` learns what was billed.

Both live in LMDB, not in Python objects: a remembered key costs disk (the
map), and RSS only for the pages a lookup touches, so ten million keys in a
window fit in a small daemon. Each entry belongs to a tenant (a data-plane
token, the admin, or the single tenant of a daemon without tokens) and is
counted against that tenant's quota; nothing is ever evicted inside its
window. When a tenant's quota is full of live entries, a new keyed call is
refused (RESOURCE_EXHAUSTED, naming the limit) rather than a key forgotten.

Layout, for a store named ``N``:

- ``N``: the entry's id → ``u64 expires_ms`` + 8-byte request digest +
  the tenant's label (length-prefixed) + answer. An entry's key is length-prefixed with the tenant's label (so
  tenants never share one) and stored as its id, a 128-bit BLAKE2b of it
  keyed with a secret of the data directory: 16 bytes whatever the key's
  length, and no tenant can make two keys meet (collisions among 10M keys:
  about 1e-25 by chance);
- ``N_expiry``: ``u64 expires_ms`` + ``u32`` sequence + id (no value), swept
  oldest first. The sequence orders the keys of one millisecond, so the index
  is only ever appended to (its pages are filled, not split in half);
- ``meta``: ``N_count`` + NUL + tenant label → u64, the tenant's live entries.

An entry made by a call whose commit is still in flight is held in memory
(``pending``) until the commit resolves, so a concurrent retry waits for
the same commit and gets the same answer. Every commit the engine submits
takes the entries made since the last one (``flight``), whoever made them.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import secrets
from dataclasses import dataclass
from typing import Iterator

from meterd.errors import LimitReached
from meterd.store import Op, Store, from_u64, u64

ADMIN_LABEL = "(admin)"  # not a valid tenant name: admin calls never share a tenant's quota
SECRET_KEY = b"answers_secret"  # in meta: what entry ids are keyed with


@dataclass
class Answer:
    expires_ms: int
    digest: bytes      # of the request, 8 bytes; empty: not checked
    response: bytes
    pending: asyncio.Future | None = None


def entry_key(label: str, *parts: str) -> bytes:
    """A store key: the tenant's label, length-prefixed, then the parts (NUL-separated)."""
    lb = label.encode()
    return bytes((len(lb),)) + lb + "\x00".join(parts).encode()


class AnswerStore:
    """One kind of remembered answer, with a quota per tenant and a window."""

    def __init__(self, store: Store, name: str, window_ms: int, total_max: int, tenant_max: int,
                 total_setting: str, tenant_setting: str) -> None:
        self.store = store
        self.name = name
        self.expiry_db = name + "_expiry"
        self.window_ms = window_ms
        self.total_max = total_max
        self.tenant_max = tenant_max
        self._settings = (total_setting, tenant_setting)
        self.pending: dict[bytes, Answer] = {}
        self.counts: dict[str, int] = {}
        self.total = 0
        self._secret = b""
        self._seq = 0  # orders the expiry index within a millisecond
        self._unsent: list[tuple[bytes, Answer]] = []  # made since the last commit was submitted

    # ---- state -------------------------------------------------------------

    def load(self) -> None:
        """Counts from LMDB; entries in flight are forgotten (their commit failed or never ran).
        Called at start-up (before the writer runs) and after a failed commit."""
        self._secret = self.store.get("meta", SECRET_KEY) or b""
        if not self._secret:
            self._secret = secrets.token_bytes(32)
            self.store.write_now([("meta", SECRET_KEY, self._secret)])
        self.pending = {}
        self._unsent = []
        prefix = self._count_prefix()
        self.counts = {k[len(prefix):].decode(): from_u64(v)
                       for k, v in self.store.items("meta", prefix=prefix)}
        self.total = sum(n for label, n in self.counts.items() if label != ADMIN_LABEL)

    def _count_prefix(self) -> bytes:
        return self.name.encode() + b"_count\x00"

    def _count_op(self, label: str) -> Op:
        return ("meta", self._count_prefix() + label.encode(), u64(self.counts.get(label, 0)))

    # ---- reading -----------------------------------------------------------

    def entry_id(self, key: bytes) -> bytes:
        return hashlib.blake2b(key, digest_size=16, key=self._secret).digest()

    def get(self, key: bytes, now_ms: int) -> Answer | None:
        """The live entry under ``key``: one in flight, else the committed one."""
        key = self.entry_id(key)
        entry = self.pending.get(key)
        if entry is None:
            value = self.store.get(self.name, key)
            if value is None:
                return None
            digest = value[8:16]
            entry = Answer(from_u64(value[:8]), b"" if digest == bytes(8) else digest, value[17 + value[16]:])
        if entry.expires_ms <= now_ms:
            return None
        return entry

    def room(self, label: str, tenants: bool, more: int = 1, more_total: int | None = None) -> None:
        """Refuse when the tenant (with tokens) or the daemon has no room for ``more``
        entries (``more_total`` of them across tenants). The admin has a quota of its
        own, outside the daemon's total, so that no tenant can keep it from granting."""
        total_setting, tenant_setting = self._settings
        if (tenants or label == ADMIN_LABEL) and self.counts.get(label, 0) + more > self.tenant_max:
            raise LimitReached(f"{self._what()} full for tenant {label!r}: {self.counts.get(label, 0)} remembered "
                               f"within their window ({tenant_setting}={self.tenant_max}); retry later")
        if label != ADMIN_LABEL and self.total + (more if more_total is None else more_total) > self.total_max:
            raise LimitReached(f"{self._what()} full: {self.total} remembered within their window "
                               f"({total_setting}={self.total_max}); retry later")

    def _what(self) -> str:
        return "idempotency key store" if self.name == "idem" else "settled answer store"

    # ---- writing -----------------------------------------------------------

    def put_ops(self, label: str, key: bytes, digest: bytes, response: bytes, now_ms: int) -> list[Op]:
        """Remember an answer (held in memory until ``settle`` is told its commit resolved)."""
        expires = now_ms + self.window_ms
        key = self.entry_id(key)
        entry = self.pending[key] = Answer(expires, digest, response)
        self._unsent.append((key, entry))
        self.counts[label] = self.counts.get(label, 0) + 1
        self.total += label != ADMIN_LABEL
        lb = label.encode()
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return [(self.name, key, u64(expires) + (digest or b"\0" * 8) + bytes((len(lb),)) + lb + response),
                (self.expiry_db, u64(expires) + self._seq.to_bytes(4, "big") + key, b""),
                self._count_op(label)]

    @property
    def unsent(self) -> int:
        """Answers remembered since the last commit was submitted."""
        return len(self._unsent)

    def flight(self, fut: asyncio.Future) -> None:
        """The entries made since the last commit are in the one just submitted: until
        ``fut`` resolves, a retry waits for it; then LMDB has them (or the commit failed
        and the engine reloads from disk, which calls load())."""
        if not self._unsent:
            return
        unsent, self._unsent = self._unsent, []
        for _, entry in unsent:
            entry.pending = fut
        fut.add_done_callback(functools.partial(self._resolved, unsent))

    def _resolved(self, unsent: list[tuple[bytes, Answer]], fut: asyncio.Future) -> None:
        for key, entry in unsent:
            if self.pending.get(key) is entry:
                del self.pending[key]

    def expire_ops(self, now_ms: int, limit: int) -> list[Op]:
        """Forget up to ``limit`` entries whose window has passed, oldest first."""
        ops: list[Op] = []
        changed: set[str] = set()
        def due(rows: Iterator[tuple[bytes, bytes]]) -> list[bytes]:
            out: list[bytes] = []
            for ekey, _ in rows:  # oldest first: stop at the first one still in its window
                if from_u64(bytes(ekey[:8])) > now_ms or len(out) >= limit:
                    break
                out.append(bytes(ekey))
            return out

        for ekey in self.store.scan(self.expiry_db, due):
            expires = from_u64(ekey[:8])
            key = ekey[12:]
            if key in self.pending:
                break  # made again while in flight: wait for its commit
            value = self.store.get(self.name, key)
            ops.append((self.expiry_db, ekey, None))
            if value is None:
                continue  # not possible unless the data directory was edited by hand
            if from_u64(value[:8]) == expires:
                ops.append((self.name, key, None))  # not made again since
            label = value[17:17 + value[16]].decode()
            self.counts[label] = self.counts.get(label, 0) - 1
            self.total -= label != ADMIN_LABEL
            changed.add(label)
        for label in changed:
            if self.counts[label] <= 0:
                del self.counts[label]
                ops.append(("meta", self._count_prefix() + label.encode(), None))
            else:
                ops.append(self._count_op(label))
        return ops


def label_of_key(key: bytes) -> str:
    """The tenant label a store key was made under."""
    return key[1:1 + key[0]].decode()
