"""LMDB storage and the group-commit writer thread.

One writer thread owns every write transaction. Callers hand it units of
work (a list of puts and deletes) from the event loop; it commits everything
that is pending in one transaction, fsyncs once, and reports back to the loop,
so many concurrent callers share one fsync. A failed commit (a full map, say)
fails its unit and everything queued behind it, because the event loop applied
those in memory on top of the failed ones; the loop then reloads its state
from what is on disk before the writer accepts work again.

The writer keeps the map from filling up in the first place. After each
commit it measures how much of the map is in use; above the high-water mark
data-plane writes are refused before anything is applied (``check_room``),
until the flush to the ledger has brought use back under the low-water mark.
What lies above the high-water mark is the maintenance reserve: the commits
that free space (snapshots that trim the log, flush bookkeeping and the
deletes after a flush, housekeeping) are marked ``maintenance`` and may use
it, while a data-plane commit may never take the map past the middle of it.
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import os
import shutil
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

import lmdb

from meterd.errors import ConfigError, MeterdError, StorageFull, Unavailable
from meterd.metrics import LATENCY_BUCKETS, SIZE_BUCKETS, Histogram

log = logging.getLogger("meterd.store")

DBS = ("meta", "log", "accounts", "clients", "idem", "reservations", "grants", "audit", "subs", "sessions", "leases",
       "usage", "outbox", "grant_expiry", "idem_expiry", "settled", "settled_expiry", "overrides")
# Databases whose keys are written in (nearly always) increasing order.
APPENDED = frozenset({"idem_expiry", "settled_expiry"})
# An op is (db, key, value): value None deletes; db "trim" deletes the keys <= key
# of the database named by value (the log when value is None).
Op = tuple[str, bytes, bytes | None]
T = TypeVar("T")


class DataDirInUse(ConfigError):
    """Another process holds the data directory."""


# Below this much free space, a failed commit is taken for a full disk.
DISK_FREE_MIN_BYTES = 16 << 20
# LMDB's freelist stores each free page's number in 8 bytes.
_FREELIST_ENTRY_BYTES = 8


class Unit:
    """Work for one commit: the ops, the asyncio future that waits for them, and
    whether it is maintenance (which frees space, or is needed to) rather than
    a data-plane write (which only adds)."""

    __slots__ = ("ops", "future", "maintenance")

    def __init__(self, ops: list[Op], future: asyncio.Future | None, maintenance: bool = False) -> None:
        self.ops = ops
        self.future = future
        self.maintenance = maintenance


class MapUse:
    """How much of the LMDB map is in use, and the marks that decide whether
    data-plane writes are accepted. Written by the writer thread, read by the
    event loop (single attribute reads and writes, so the GIL is enough)."""

    def __init__(self, map_size_bytes: int, high_water_percent: int, low_water_percent: int) -> None:
        self.map_size_bytes = map_size_bytes
        self.high_water_percent = high_water_percent
        self.low_water_percent = low_water_percent
        self.high_bytes = map_size_bytes * high_water_percent // 100
        self.low_bytes = map_size_bytes * low_water_percent // 100
        # Data-plane commits may take use at most halfway into the reserve, so
        # that maintenance always keeps the other half.
        self.ceiling_bytes = self.high_bytes + (map_size_bytes - self.high_bytes) // 2
        # A snapshot moves the log into usage rows in one commit, and the pages
        # the trim frees are not reused in that commit: keep the log small
        # enough that what it turns into fits the reserve several times over.
        self.snapshot_log_bytes = max(1, (map_size_bytes - self.high_bytes) // 8)
        self.used_bytes = 0
        self.log_bytes = 0
        self.refusing = False  # data-plane writes are refused
        # Refused because a group would have passed the ceiling, with use itself under
        # the high-water mark: accepted again by the next commit measured under it.
        self.over_ceiling = False

    def update(self, used_bytes: int, log_bytes: int) -> None:
        """Hysteresis: refuse from the high-water mark until under the low one."""
        self.used_bytes, self.log_bytes = used_bytes, log_bytes
        if used_bytes >= self.high_bytes:
            self.over_ceiling = False  # from here the low-water mark decides again
            if not self.refusing:
                log.warning("the LMDB map is %d%% used (%d of %d bytes): data-plane writes are refused until "
                            "the flush to the ledger brings it under map_low_water_percent (%d%%)",
                            100 * used_bytes // self.map_size_bytes, used_bytes, self.map_size_bytes,
                            self.low_water_percent)
            self.refusing = True
        elif self.refusing and (used_bytes < self.low_bytes or self.over_ceiling):
            self.refusing = self.over_ceiling = False
            log.warning("the LMDB map is %d%% used (%d of %d bytes), with room for data-plane writes: "
                        "data-plane writes are accepted again", 100 * used_bytes // self.map_size_bytes,
                        used_bytes, self.map_size_bytes)

    def refuse_over_ceiling(self) -> None:
        """A data-plane group failed for passing the ceiling: nothing of it was committed,
        so use is as last measured. Under the high-water mark, refuse only until the next
        commit measures it (a snapshot, a flush: soon), so that the same burst does not fail
        again and again meanwhile; over it, the low-water mark decides as always."""
        self.refusing = True
        self.over_ceiling = self.used_bytes < self.high_bytes

    def refusal(self, path: str, used_bytes: int | None = None) -> StorageFull:
        used = self.used_bytes if used_bytes is None else used_bytes
        return StorageFull(
            f"storage full: the LMDB map in {path} holds {used} bytes of map_size_bytes "
            f"{self.map_size_bytes} ({100 * used // self.map_size_bytes}%); writes are refused above "
            f"map_high_water_percent ({self.high_water_percent}%) until the flush to the ledger brings it under "
            f"map_low_water_percent ({self.low_water_percent}%); if the ledger is reachable and this persists, "
            "raise map_size_bytes")


class Store:
    """The LMDB environment, its named databases and the writer thread."""

    def __init__(self, path: str, map_size_bytes: int, fsync: bool,
                 window_us: int, ops_max: int, high_water_percent: int = 80, low_water_percent: int = 60) -> None:
        os.makedirs(path, mode=0o700, exist_ok=True)  # nobody else reads the balances (nor the tokens' digests)
        self.path = path
        # LMDB lets several processes share an environment; two daemons on one
        # data directory would each replay and snapshot over the other's state.
        self._lock_file = os.fdopen(os.open(os.path.join(path, "meterd.lock"),
                                            os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600), "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            raise DataDirInUse(f"{path} is in use by another meterd process (pid {holder})") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        self.map_size_bytes = map_size_bytes
        self.env = lmdb.open(
            path,
            map_size=map_size_bytes,
            max_dbs=len(DBS) + 2,
            subdir=True,
            sync=fsync,
            metasync=fsync,
            writemap=False,
            map_async=False,
            readahead=False,
            lock=True,
            max_readers=126,
            mode=0o600,  # data.mdb and lock.mdb (0600 under any umask that does not take from the owner)
        )
        self.dbs = {name: self.env.open_db(name.encode()) for name in DBS}
        self._trees = [self.env.open_db(None), *self.dbs.values()]  # the main database names the others
        self._psize = int(self.env.stat()["psize"])
        self.use = MapUse(int(self.env.info()["map_size"]), high_water_percent, low_water_percent)
        with self.env.begin() as txn:
            self.use.update(*self._measure(txn))
        self.window_s = window_us / 1e6
        self.ops_max = ops_max
        self._queue: collections.deque[Unit] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._thread: threading.Thread | None = None
        self.commits = 0
        self.committed_ops = 0
        self._lag_s = 0.0  # how late the loop ran the last commit's callback
        self.group_sizes = Histogram(SIZE_BUCKETS)       # filled by the writer thread
        self.commit_seconds = Histogram(LATENCY_BUCKETS)
        self.window_waits = 0

    # ---- map use -------------------------------------------------------------

    def _measure(self, txn: lmdb.Transaction) -> tuple[int, int]:
        """Bytes of the map in use, and of them the log's, as of ``txn`` (a write
        transaction sees its own changes; a handful of O(1) lookups).

        Not env.info()'s last_pgno: that is the file's high-water mark, and it
        never comes down, because LMDB keeps freed pages in its freelist and
        reuses them rather than shrinking the file. What is in use is the pages
        of every B-tree (branch, leaf and overflow pages of the main database
        and each named one), the two meta pages, and the freelist's own pages,
        8 bytes per free page id: estimated from the pages below last_pgno that
        no tree holds. Deleting rows after a flush lowers this measure; pages
        freed by the last commit or pinned by a reader are not reusable yet,
        which the reserve above the high-water mark absorbs."""
        pages, log_pages = 2, 0
        for db in self._trees:
            st = txn.stat(db)
            n = st["branch_pages"] + st["leaf_pages"] + st["overflow_pages"]
            pages += n
            if db is self.dbs["log"]:
                log_pages = n
        free = max(0, int(self.env.info()["last_pgno"]) + 1 - pages)
        pages += -(-free * _FREELIST_ENTRY_BYTES // self._psize)
        return pages * self._psize, log_pages * self._psize

    def check_room(self) -> None:
        """Refuse a data-plane write, before anything is applied, while the map is above its high-water mark."""
        if self.use.refusing:
            raise self.use.refusal(self.path)

    # ---- reading (any thread) ----------------------------------------------

    def get(self, db: str, key: bytes) -> bytes | None:
        with self.env.begin(db=self.dbs[db]) as txn:
            value = txn.get(key)
            return bytes(value) if value is not None else None

    def count(self, db: str) -> int:
        with self.env.begin(db=self.dbs[db]) as txn:
            return int(txn.stat(self.dbs[db])["entries"])

    def first_keys(self, db: str, n: int) -> tuple[bytes | None, int]:
        """The last of the first ``n`` keys of a database and how many there are (keys only)."""
        last, count = None, 0
        with self.env.begin(db=self.dbs[db]) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                last, count = bytes(key), count + 1
                if count >= n:
                    break
        return last, count

    def items_upto(self, db: str, stop: bytes) -> list[tuple[bytes, bytes]]:
        """Copies of the (key, value) pairs from the first key to ``stop``, inclusive."""
        out: list[tuple[bytes, bytes]] = []
        with self.env.begin(db=self.dbs[db]) as txn:
            for key, value in txn.cursor():
                if bytes(key) > stop:
                    break
                out.append((bytes(key), bytes(value)))
        return out

    def scan(self, db: str, consume: Callable[[Iterator[tuple[bytes, bytes]]], T]) -> T:
        """``consume`` an iterator of a database's (key, value) pairs, in key order,
        within one read transaction: no list of copies (start-up reads millions)."""
        with self.env.begin(db=self.dbs[db]) as txn:
            return consume(txn.cursor().iternext())

    def items(self, db: str, start: bytes = b"", prefix: bytes = b"", limit: int = 0) -> list[tuple[bytes, bytes]]:
        """Copies of (key, value) pairs from ``start``, within ``prefix``."""
        out: list[tuple[bytes, bytes]] = []
        with self.env.begin(db=self.dbs[db]) as txn:
            cur = txn.cursor()
            if not cur.set_range(start or prefix):
                return out
            for key, value in cur:
                if prefix and not key.startswith(prefix):
                    break
                out.append((bytes(key), bytes(value)))
                if limit and len(out) >= limit:
                    break
        return out

    # ---- writing -------------------------------------------------------------

    def write_now(self, ops: Iterable[Op]) -> None:
        """Commit ops synchronously on the calling thread (start-up and shutdown only)."""
        with self.env.begin(write=True) as txn:
            self._apply(txn, ops)
            measured = self._measure(txn)
        self.use.update(*measured)

    def _apply(self, txn: lmdb.Transaction, ops: Iterable[Op]) -> int:
        n = 0
        for db, key, value in ops:
            if db == "trim":
                cur = txn.cursor(db=self.dbs[value.decode() if value else "log"])
                if cur.first():
                    while bytes(cur.key()) <= key:
                        if not cur.delete():
                            break
            elif value is None:
                txn.delete(key, db=self.dbs[db])
            elif db in APPENDED:
                # Keys that mostly grow: appended pages are filled, not split in half.
                if not txn.put(key, value, db=self.dbs[db], append=True):
                    txn.put(key, value, db=self.dbs[db])
            else:
                txn.put(key, value, db=self.dbs[db])
            n += 1
        return n

    def start(self, loop: asyncio.AbstractEventLoop, on_failure: Callable[[BaseException], None]) -> None:
        self._loop = loop
        self._on_failure = on_failure
        self._thread = threading.Thread(target=self._run, name="meterd-writer", daemon=True)
        self._thread.start()

    def submit(self, unit: Unit) -> None:
        with self._cond:
            if self._failed is not None:
                self._fail([unit], self._failed)
                return
            self._queue.append(unit)
            self._cond.notify()

    def reset(self) -> None:
        """Accept work again after the loop has reloaded its state from disk."""
        with self._cond:
            self._failed = None

    def _take(self) -> list[Unit] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if not self._queue:
                return None
        if self.window_s > 0 and self._lag_s > self.window_s:
            # The event loop is busy (it ran the last commit's callback more than
            # a window late): let more callers join this commit, for one sleep
            # rather than a polling loop, as every wake-up of this thread takes
            # the GIL from the loop. When the loop keeps up, commit at once.
            self.window_waits += 1
            time.sleep(self.window_s)
        with self._cond:
            group: list[Unit] = []
            n = 0
            while self._queue and (n < self.ops_max or not group):
                unit = self._queue.popleft()
                group.append(unit)
                n += len(unit.ops)
            return group

    def _run(self) -> None:
        while True:
            group = self._take()
            if group is None:
                return
            try:
                started = time.perf_counter()
                with self.env.begin(write=True) as txn:
                    n = 0
                    for unit in group:
                        n += self._apply(txn, unit.ops)
                    used, log_bytes = self._measure(txn)
                    if used > self.use.ceiling_bytes and not all(unit.maintenance for unit in group):
                        raise _OverCeiling(used)  # aborts the transaction
                self.use.update(used, log_bytes)
                self.commit_seconds.observe(time.perf_counter() - started)
                self.group_sizes.observe(len(group))
                self.commits += 1
                self.committed_ops += n
                self._done(group, None)
            except _OverCeiling as e:
                # Data-plane work admitted just under the high-water mark, more of it
                # than the reserve holds: failed rather than let it take maintenance's room.
                log.error("a commit would take the LMDB map to %d bytes, past the maintenance reserve above "
                          "map_high_water_percent; failed", e.used_bytes)
                self.use.refuse_over_ceiling()
                self._failure(group, self.use.refusal(self.path, e.used_bytes))
            except lmdb.MapFullError:
                self.use.refusing = True
                self._failure(group, StorageFull(
                    f"storage full: the LMDB map of map_size_bytes {self.map_size_bytes} bytes in {self.path} "
                    "is full; writes are refused until there is room again: raise map_size_bytes and restart "
                    "if the flush to the ledger does not make it"))
            except Exception as e:  # noqa: BLE001 - any commit failure must fail its callers
                self._failure(group, self._classify(e, group))

    def _classify(self, exc: Exception, group: list[Unit]) -> MeterdError:
        """What callers are told of a failed commit. LMDB reports a full disk as
        EIO (a short write), so the free space decides: too little left is a
        full disk, anything else a storage failure they may retry."""
        try:
            free = shutil.disk_usage(self.path).free
        except OSError:
            free = -1
        needed = 2 * sum(len(k) + len(v or b"") for unit in group for _, k, v in unit.ops)
        if "No space left" in str(exc) or 0 <= free < max(DISK_FREE_MIN_BYTES, needed):
            log.error("commit failed: the disk holding %s is full (%d bytes free): %s", self.path, max(free, 0), exc)
            return StorageFull(f"storage full: no space left on the disk holding {self.path}; "
                               "writes are refused until there is room again")
        log.error("commit failed", exc_info=exc)
        return Unavailable(f"storage failed ({exc}); meterd reloads its state from disk: retry")

    def _failure(self, group: list[Unit], exc: BaseException) -> None:
        with self._cond:
            self._failed = exc
            group = group + list(self._queue)
            self._queue.clear()
        self._fail(group, exc)
        if self._loop is not None and self._on_failure is not None:
            try:
                self._loop.call_soon_threadsafe(self._on_failure, exc)
            except RuntimeError:  # the loop is closed: there is no state left to reload
                pass

    def _fail(self, group: list[Unit], exc: BaseException) -> None:
        self._done(group, exc)

    def _done(self, group: list[Unit], exc: BaseException | None) -> None:
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._resolve, group, exc, time.perf_counter())
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def stop(self) -> None:
        """Commit what is queued, then stop the writer thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def close(self) -> None:
        self.env.close()
        self._lock_file.close()

    def _resolve(self, group: list[Unit], exc: BaseException | None, posted: float) -> None:
        """On the loop: answer a group's callers, and note how late the loop got to it."""
        self._lag_s = time.perf_counter() - posted
        _resolve(group, exc)


class _OverCeiling(Exception):
    def __init__(self, used_bytes: int) -> None:
        super().__init__(used_bytes)
        self.used_bytes = used_bytes


def _resolve(group: list[Unit], exc: BaseException | None) -> None:
    for unit in group:
        f = unit.future
        if f is None or f.done():
            continue
        if exc is None:
            f.set_result(None)
        else:
            f.set_exception(exc)


def u64(n: int) -> bytes:
    return n.to_bytes(8, "big")


def from_u64(b: bytes) -> int:
    return int.from_bytes(b, "big")
