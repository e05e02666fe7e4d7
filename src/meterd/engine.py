"""The metering engine: policy around the core, and durability around both.

Every state change happens on the asyncio event loop thread, in order: the
core applies it in memory, the engine appends a record of it to the LMDB log
and hands that to the group-commit writer, and the caller is answered only
once the commit is durable. Restart (and recovery from a failed commit) loads
the last snapshot of the account table and replays the log after it through
the same core, so the in-memory state is always a function of what is on disk.

State the core does not hold (client sequences, idempotency keys,
reservations, grants, the audit trail) is written through to LMDB in the same
commit as the log record of the change.
"""

from __future__ import annotations

import asyncio
import calendar
import collections
import datetime as dt
import hashlib
import heapq
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Callable, overload

import lmdb

from meterd import core as core_mod
from meterd import records
from meterd.answers import ADMIN_LABEL, AnswerStore, entry_key
from meterd.answers import label_of_key as _label_of_key
from meterd.catalog import Catalog, step_nano
from meterd.config import Settings
from meterd.errors import Conflict, Forbidden, InvalidInput, LimitReached, NotFound, StorageFull, Unavailable
from meterd.flush import Drained, LedgerMixin
from meterd.records import Kind
from meterd.security import Tenant
from meterd.sessions import Session, SessionsMixin
from meterd.store import Op, Store, Unit, from_u64, u64
from meterd.subscriptions import Subscription, SubscriptionsMixin
from meterd.v1 import admin_pb2, meter_pb2

log = logging.getLogger("meterd.engine")

INT64_MIN = -(1 << 63)
ADJUST_PRIORITY = 1_000_000  # credits added by Adjust are spent after every grant
HELD = "held"  # the bucket source of an ended period's credits spared for its open holds
SWEEP_CHUNK = 256  # log records per housekeeping commit, so that a burst of expiries does not stall calls
_DUP_REPORT = b"\x30\x01"      # ReportResponse.duplicate = true
_DUP_BATCH = b"\x28\x01"       # ReportBatchResponse.duplicate = true
_DUP_AUTHORIZE = b"\x40\x01"   # AuthorizeResponse.duplicate = true
_DUP_GRANT = b"\x18\x01"       # GrantResponse.duplicate = true
_DUP_ADJUST = b"\x10\x01"      # AdjustResponse.duplicate = true
_DUP_COMMIT = b"\x28\x01"      # CommitResponse.duplicate = true
_DUP_RELEASE = b"\x18\x01"     # ReleaseResponse.duplicate = true
SETTLED_BY = {b"C": "Commit", b"R": "Release"}  # the first byte of a reservation's settled answer
EXPIRE_CHUNK = 10_000  # remembered answers forgotten per housekeeping tick, at most


# The clock of every period, expiry and record; tests of period boundaries replace it.
CLOCK_NS: Callable[[], int] = time.time_ns


def now_ms() -> int:
    return CLOCK_NS() // 1_000_000


def month_bounds(ms: int) -> tuple[int, int]:
    """Start and end (ms, UTC) of the calendar month holding ``ms``."""
    d = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    start = dt.datetime(d.year, d.month, 1, tzinfo=dt.timezone.utc)
    days = calendar.monthrange(d.year, d.month)[1]
    end = start + dt.timedelta(days=days)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


@dataclass
class ClientState:
    sequence: int
    seen_ms: int
    result: bytes
    pending: asyncio.Future | None = None


@dataclass
class Reservation:
    reservation_id: str
    customer_id: str
    credit_type: int
    meter: int
    dim_value: str | None
    rate: int
    amount_nano: int
    expires_at_ms: int
    tenant: str = ""  # the label of the tenant that made it: its settled answer is that tenant's
    # Credits of a period that ended while this was open, kept for it (see Engine.spared_ops).
    spared_nano: int = 0
    # Its dimension set (canonical bytes), when it has more than its price dimension: the usage is filed under it.
    dims: bytes | None = None

    def to_json(self, catalog: Catalog) -> bytes:
        return json.dumps({
            "customer_id": self.customer_id, "credit_type": catalog.credit_types[self.credit_type].name,
            "meter": catalog.meters[self.meter].name, "dim_value": self.dim_value,
            "amount_nano": self.amount_nano, "expires_at_ms": self.expires_at_ms, "tenant": self.tenant,
            "spared_nano": self.spared_nano, "dims": None if self.dims is None else self.dims.hex()}).encode()


@dataclass
class Bucket:
    grant_id: str
    remaining_nano: int
    expires_at_ms: int
    priority: int
    source: str
    order: int
    rollovers: int = 0  # how many period boundaries these credits have rolled over

    def sort_key(self) -> tuple[int, int, int]:
        return (self.priority, self.expires_at_ms or (1 << 62), self.order)


@dataclass
class Account:
    """Per-customer state held in Python: grant buckets per credit type."""
    buckets: dict[int, list[Bucket]] = field(default_factory=dict)


class Accounts:
    """The grant buckets of every customer, read from LMDB the first time a
    customer's are needed: a start does not parse a million grants. What is
    loaded is authoritative from then on (changes are applied here first, then
    committed); a customer not loaded has no change in flight, so LMDB has its
    buckets as they are."""

    def __init__(self, load: Callable[[str], Account | None]) -> None:
        self._load = load
        self._loaded: dict[str, Account] = {}

    @overload
    def get(self, customer_id: str) -> Account | None: ...

    @overload
    def get(self, customer_id: str, default: Account) -> Account: ...

    def get(self, customer_id: str, default: Account | None = None) -> Account | None:
        acct = self._loaded.get(customer_id)
        if acct is None:
            acct = self._load(customer_id)
            if acct is None:
                return default
            self._loaded[customer_id] = acct
        return acct

    def __getitem__(self, customer_id: str) -> Account:
        acct = self.get(customer_id)
        if acct is None:
            raise KeyError(customer_id)
        return acct

    def __setitem__(self, customer_id: str, acct: Account) -> None:
        self._loaded[customer_id] = acct

    def __contains__(self, customer_id: object) -> bool:
        return isinstance(customer_id, str) and self.get(customer_id) is not None

    def setdefault(self, customer_id: str, default: Account) -> Account:
        acct = self.get(customer_id)
        if acct is None:
            acct = self._loaded[customer_id] = default
        return acct

    def loaded(self) -> list[tuple[str, Account]]:
        """The customers whose buckets are in memory (the others' are in LMDB as they are)."""
        return list(self._loaded.items())


def _hash_request(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


DECISION_NAMES = {meter_pb2.DECISION_ALLOW: "allow", meter_pb2.DECISION_DEGRADE: "degrade",
                  meter_pb2.DECISION_DENY: "deny"}


def label_of(tenant: Tenant | None) -> str:
    """Whose quota a data-plane call uses: its tenant's, or the one tenant of a daemon without tokens."""
    return "" if tenant is None else tenant.name


def _client_label(cid: bytes) -> str:
    """The tenant a batch client id belongs to (tenants' ids are their name and a NUL, then the client's)."""
    name, nul, _ = cid.partition(b"\x00")
    return name.decode() if nul else ""


def check_tenant(tenant: Tenant | None, customer_id: str, field: str) -> None:
    """A data-plane token may meter only the customers whose ids start with its prefix."""
    if tenant is not None and not customer_id.encode().startswith(tenant.prefix):
        raise Forbidden(field, "is not one of this token's customers")


def _canonical(msg: Any) -> bytes:
    """A request in a canonical form for idempotency digests: map entries
    sorted, so a retry whose client serialised them in another order matches."""
    return msg.SerializeToString(deterministic=True)


def _doc_of(catalog: Catalog) -> dict:
    """What replay needs of a catalog: the core's tables and the names to map accounts by."""
    denominators, meters, rates = catalog.compile()
    plans, modes = catalog.core_plans()
    shape = catalog.shape()
    doc = {
        "denominators": denominators,
        "meters": [[m[0].decode(), m[1], m[2], m[3].decode(), m[4], m[5].decode()] for m in meters],
        "rates": [[r[0], None if r[1] is None else r[1].decode(), r[2], r[3]] for r in rates],
        "plans": plans, "modes": [m.decode() for m in modes], "plan_names": [p.name for p in catalog.plans],
        "free": catalog.core_free(),
        "credit_types": shape["credit_types"], "meter_names": shape["meters"], "precisions": shape["precisions"],
    }
    return json.loads(json.dumps(doc))  # the form it has after a trip through LMDB


def _compiled_of(doc: dict) -> tuple:
    return (doc["denominators"],
            [(m[0].encode(), m[1], m[2], m[3].encode(), m[4], m[5].encode()) for m in doc["meters"]],
            [(r[0], None if r[1] is None else r[1].encode(), r[2], r[3]) for r in doc["rates"]],
            [[tuple(c) for c in row] for row in doc["plans"]], [m.encode() for m in doc["modes"]], doc["free"],
            [n.encode() for n in doc["credit_types"]])


def dimension_set(dimensions: Any) -> bytes | None:
    """A reservation's or session's dimension set, as the cores keep it; None when it has
    none. (Its price dimension alone is not left to the rate: a meter's default price
    has an empty set, whatever value the request gave.)"""
    if not dimensions:
        return None
    return core_mod._fastpath_py.canonical_set({k.encode(): v.encode() for k, v in dimensions.items()})


def settle_set(core: Any, idx: int, meter: int, dims: bytes | None, cust: bytes) -> bytes | None:
    """The set a settlement is filed under: its own, or its price dimension alone when its
    own does not fit dimension_sets_per_window_max (a settlement is never refused: the
    work was done)."""
    if dims is not None and not core.set_allowed(idx, meter, dims):
        log.warning("usage of customer %s filed under its price dimension alone: its dimension set does not "
                    "fit dimension_sets_per_window_max", cust.decode())
        return None
    return dims


class Engine(SubscriptionsMixin, SessionsMixin, LedgerMixin):
    """Owns the core, the catalog, the Python-held state and the store."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        self.catalog = catalog
        self.store = Store(os.path.join(settings.data_dir, "lmdb"), settings.map_size_bytes, settings.fsync,
                           settings.group_commit_window_us, settings.group_commit_ops_max,
                           settings.map_high_water_percent, settings.map_low_water_percent)
        self.core: Any = None
        self.clients: dict[bytes, ClientState] = {}
        self.clients_of: collections.Counter[str] = collections.Counter()  # batch clients per tenant label
        window_ms = settings.idempotency_window_s * 1000
        self.idem = AnswerStore(self.store, "idem", window_ms, settings.idempotency_keys_max,
                                settings.idempotency_keys_per_tenant_max, "idempotency_keys_max",
                                "idempotency_keys_per_tenant_max")
        self.settled = AnswerStore(self.store, "settled", window_ms, settings.settled_answers_max,
                                   settings.settled_answers_per_tenant_max, "settled_answers_max",
                                   "settled_answers_per_tenant_max")
        self.tenants = bool(settings.data_tokens_file)  # per-tenant quotas apply
        self.reservations: dict[str, Reservation] = {}
        self.reservations_of: collections.Counter[str] = collections.Counter()  # open, per tenant label
        self.accounts = Accounts(self._load_buckets)
        self.subs: dict[str, Subscription] = {}
        self._boundaries: list[tuple[int, str]] = []
        self._rolling: asyncio.Future | None = None  # the last period roll submitted
        self.decisions: collections.Counter[tuple[str, str]] = collections.Counter()  # (rpc, outcome), for metrics
        # When reservations and grants expire, so that the timer looks only at what is due.
        self._reservation_expiry: list[tuple[int, str]] = []
        self._grant_expiry: list[tuple[int, str, int]] = []
        self._watchers: list[tuple[asyncio.Queue, frozenset[str]]] = []
        self.sessions: dict[str, Session] = {}
        self.sessions_by_tenant: collections.Counter[str] = collections.Counter()
        self.log_pos = 0
        self.snapshot_pos = 0
        self.audit_seq = 0
        self.grant_seq = 0
        self.period_start_ms = 0
        self.storage_full: StorageFull | None = None
        self.broken: Exception | None = None
        self.closing = False
        self._snapshot_running = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.effective_ms: int | None = None
        self._init_ledger()
        self.recover()
        self._seed_customers()

    # ---- lifecycle ---------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.store.start(loop, self._on_commit_failure)

    async def close(self) -> None:
        """Final snapshot, drain the writer, close LMDB."""
        self.closing = True
        try:
            await self._snapshot_for_close()
        except Exception:  # noqa: BLE001 - the log still holds everything
            log.exception("final snapshot failed; the log will be replayed at the next start")
        await self.final_flush()
        self.close_ledger()
        self.store.stop()
        self.store.close()

    def _on_commit_failure(self, exc: BaseException) -> None:
        """A commit failed: everything applied in memory since the last good
        commit is undone by reloading from disk, and callers got the error."""
        log.error("commit failed, reloading state from disk: %s", exc)
        if isinstance(exc, StorageFull):
            self.storage_full = exc
        self._try_recover()

    def _try_recover(self) -> None:
        """Reload from disk; until that works, the store stays failed and writes are refused."""
        try:
            self.recover()
        except Exception as e:  # noqa: BLE001 - housekeeping retries
            self.broken = e
            log.exception("recovery from disk failed; writes are refused until it succeeds")
            return
        self.broken = None
        self.store.reset()

    def check_writable(self) -> None:
        if self.closing:
            raise Unavailable("meterd is shutting down")
        if self.broken is not None:
            raise Unavailable("storage failed and meterd is recovering; retry")
        if self.storage_full is not None:
            raise self.storage_full
        self.store.check_room()  # above the map's high-water mark: refused before anything is applied

    def _writable_or_replay(self, keyed: Callable[[], tuple[bytes, bytes, bytes] | None]) -> bytes | None:
        """``check_writable``; while writes are refused, a retry of a keyed call that was
        remembered is still answered (``keyed`` gives its key, its canonical request and
        the duplicate flag, or None when it has no key)."""
        try:
            self.check_writable()
            return None
        except (StorageFull, Unavailable) as refused:
            try:
                found = keyed()
            except Exception:  # noqa: BLE001 - a request that cannot be read: the refusal stands
                found = None
            entry = self.idem.get(found[0], now_ms()) if found is not None else None
            if found is None or entry is None or entry.pending is not None or \
                    (entry.digest and entry.digest != _hash_request(found[1])):
                raise refused from None
            return entry.response + found[2]

    def _keyed_report(self, data: bytes, tenant: Tenant | None) -> tuple[bytes, bytes, bytes] | None:
        req = meter_pb2.ReportRequest.FromString(data)
        if not req.event.idempotency_key:
            return None
        check_tenant(tenant, req.event.customer_id, "event.customer_id")
        key = self._idem_key(label_of(tenant), "report", req.event.customer_id, req.event.idempotency_key)
        return key, _canonical(req), _DUP_REPORT

    def _keyed_authorize(self, data: bytes, tenant: Tenant | None) -> tuple[bytes, bytes, bytes] | None:
        req = meter_pb2.AuthorizeRequest.FromString(data)
        if not req.idempotency_key:
            return None
        check_tenant(tenant, req.customer_id, "customer_id")
        key = self._idem_key(label_of(tenant), "authorize", req.customer_id, req.idempotency_key)
        return key, _canonical(req), _DUP_AUTHORIZE

    def _keyed_admin(self, rpc: str, req: Any, dup: bytes) -> tuple[bytes, bytes, bytes] | None:
        key = self._admin_key(rpc, req)
        return None if key is None else (key, _canonical(req), dup)

    async def _commit(self, ops: list[Op], maintenance: bool = False) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.store.submit(Unit(ops, fut, maintenance))
        await fut

    def _now_ms(self) -> int:
        """The clock every record and period is stamped by (the mixins' parts use it too)."""
        return now_ms()

    def _log_op(self, record: bytes) -> Op:
        self.log_pos += 1
        return ("log", u64(self.log_pos), record)

    # ---- recovery ------------------------------------------------------------

    def _compiled(self) -> tuple:
        return _compiled_of(_doc_of(self.catalog))

    def _core_for(self, compiled: tuple, accounts: int = 0) -> Any:
        denominators, meters, rates, plans, modes, free, names = compiled
        capacity = max(1024, accounts + accounts // 8)  # room to grow before the table is rehashed
        core = core_mod.Core(denominators, meters, rates, self.settings.core_limits(), capacity, plans, modes, free,
                             names)
        core.set_window(self.settings.usage_window_s * 1000)
        return core

    def recover(self) -> None:
        """Rebuild all in-memory state from LMDB: snapshot, then log replay."""
        store = self.store
        started = time.perf_counter()
        self.recoveries += 1
        self._usage_carry = Drained()
        self._load_ledger_state()
        current = _doc_of(self.catalog)
        stored = store.get("meta", b"catalog")
        doc = current if stored is None else json.loads(stored)
        core = self._core_for(_compiled_of(doc), store.count("accounts"))
        store.scan("accounts", core.load_states)
        self.snapshot_pos = from_u64(store.get("meta", b"snapshot_pos") or u64(0))
        self.log_pos = self.snapshot_pos
        replayed = 0
        core.set_dimension_sets_capped(False)  # what was applied once is applied again
        for key, record in store.items("log", start=u64(self.snapshot_pos + 1)):
            records.replay(core, record)
            self.log_pos = from_u64(key)
            replayed += 1
        core.set_dimension_sets_capped(True)
        remapped = doc != current
        if remapped:
            core = self._remap(core, doc, current)
        self.core = core
        self._load_python_state()
        if remapped or replayed or stored is None:
            try:
                self._snapshot_now()
            except lmdb.MapFullError:
                if remapped:  # log records of the old catalog must not outlive it
                    raise StorageFull("the LMDB map is full: no room to move accounts onto the new catalog; "
                                      "raise map_size_bytes") from None
                # The log still holds everything; the next snapshot will try again.
                self.core.mark_all_dirty()
                log.warning("no room for a snapshot after recovery; the LMDB map is full")
        took = time.perf_counter() - started
        log.info("state recovered: %d accounts, %d log records replayed%s, in %.3fs", len(core), replayed,
                 ", catalog changed and accounts remapped" if remapped else "", took,
                 extra={"recovery_s": round(took, 4)})

    def _remap(self, old: Any, doc: dict, new_doc: dict) -> Any:
        """Move accounts onto another catalog, matching credit types, meters and plans by name."""
        new = self._core_for(_compiled_of(new_doc))
        self._usage_carry.add(old.take_usage(), doc)  # named by the catalog they were made under
        old_ct = {n: i for i, n in enumerate(doc["credit_types"])}
        old_m = {n: i for i, n in enumerate(doc["meter_names"])}
        new_plans = {n: i + 1 for i, n in enumerate(new_doc["plan_names"])}
        for i in range(len(old)):
            cts, use, plan = old.state(i)
            new_cts = []
            for k, name in enumerate(new_doc["credit_types"]):
                j = old_ct.get(name)
                if j is None:
                    new_cts.append((0, 0, 0, 0, 0, INT64_MIN))
                    continue
                bal, resv, floor, rem, degr, alert = cts[j]
                # The carried remainder is re-expressed in the new denominator; less than one nano may go.
                rem = rem * new_doc["denominators"][k] // doc["denominators"][j]
                new_cts.append((bal, resv, floor, rem, degr, alert))
            new_use = []
            for k, name in enumerate(new_doc["meter_names"]):
                j = old_m.get(name)
                same = j is not None and doc["precisions"][j] == new_doc["precisions"][k]
                new_use.append(use[j] if same else 0)
            plan_name = doc["plan_names"][plan - 1] if plan else ""
            idx = new.open_account(old.customer_id(i))
            new.load_state(idx, new_cts, new_use, new_plans.get(plan_name, 0))
            new_meter = {n: k for k, n in enumerate(new_doc["meter_names"])}
            for meter, value in old.uniques(i):  # its bytes, or a hash read from an older snapshot
                moved = new_meter.get(doc["meter_names"][meter])
                if moved is not None and new_doc["meters"][moved][4] == 4 and new_use[moved]:
                    new.add_unique(idx, moved, value)
        new.mark_all_dirty()
        return new

    def _snapshot_ops(self) -> list[Op]:
        """A snapshot's ops, all made now (start-up, reload and shutdown)."""
        accounts, doc, taken = self._snapshot_take()
        drained = self._take_carry()
        drained.add(taken, doc)
        drained.finish(self.drain_seq + 1, now_ms(), self.sidecar_id)
        return self._snapshot_finish(accounts, doc, drained, self.drain_seq + 1, self.log_pos)

    def _snapshot_take(self) -> tuple[list[Op], dict, list[tuple]]:
        """Everything a snapshot reads from the core, in one go: the changed
        accounts and the usage aggregates, as of the current log position."""
        self._draining = Drained()  # set by _drain_ops: what this snapshot takes from the core
        ops: list[Op] = [("accounts", self.core.customer_id(i), self.core.state_bytes(i))
                         for i in self.core.take_dirty()]
        return ops, _doc_of(self.catalog), self.core.take_usage()

    def _snapshot_finish(self, ops: list[Op], doc: dict, drained: Drained, drain_seq: int, pos: int) -> list[Op]:
        ops += self._drain_ops(drained, drain_seq)
        ops.append(("meta", b"catalog", json.dumps(doc).encode()))
        ops.append(("meta", b"snapshot_pos", u64(pos)))
        ops.append(("trim", u64(pos), None))
        return ops

    def _snapshot_now(self) -> None:
        generation = self.recoveries
        try:
            self.store.write_now(self._snapshot_ops())
        except BaseException:
            self.core.mark_all_dirty()  # the marks were taken; nothing was written
            self._drain_failed(generation)
            raise
        self._draining = Drained()
        self.snapshot_pos = self.log_pos

    async def _snapshot_for_close(self) -> None:
        while self._snapshot_running:
            await asyncio.sleep(0.01)
        await self.snapshot()

    async def snapshot(self) -> None:
        """Write changed accounts and drop the log they cover, in one commit.

        The core is read at once; the usage aggregates are encoded on a worker
        thread, so that a large drain does not stall the event loop. Changes
        made meanwhile are in the log after this snapshot's position. It runs
        as a task of its own: a cancelled caller cannot stop it between its
        commit and the bookkeeping of that commit."""
        await asyncio.shield(asyncio.ensure_future(self._snapshot()))

    async def _snapshot(self) -> None:
        if self._snapshot_running or (self.log_pos == self.snapshot_pos and self.storage_full is None):
            return
        self._snapshot_running = True
        try:
            pos = self.log_pos
            generation = self.recoveries
            accounts, doc, taken = self._snapshot_take()
            carry, drain_seq = self._take_carry(), self.drain_seq + 1
            finished = False
            try:
                drained = await asyncio.to_thread(self._encode, carry, taken, doc, drain_seq)
                if generation != self.recoveries:
                    return  # state was reloaded from disk meanwhile: the log still has all of it
                ops = self._snapshot_finish(accounts, doc, drained, drain_seq, pos)
                finished = True
                await self._commit(ops, maintenance=True)  # trims the log: may use the map's reserve
            except BaseException:
                self.core.mark_all_dirty()
                if not finished:  # the aggregates were taken from the core but are in no op: keep them
                    self._draining = Drained()
                    self._draining.extend(carry)
                    self._draining.add(taken, doc)
                self._drain_failed(generation)
                raise
            self._draining = Drained()
            if generation == self.recoveries:  # else recovery has set both from disk
                self.snapshot_pos = pos
                self.storage_full = None
        finally:
            self._snapshot_running = False

    def _encode(self, carry: Drained, taken: list[tuple], doc: dict, drain_seq: int) -> Drained:
        """On a worker thread: what was carried, then the new aggregates, as LMDB rows and
        deductions. ``carry`` is left as it was, for a retry if this snapshot fails."""
        drained = Drained()
        drained.extend(carry)
        drained.add(taken, doc)
        drained.finish(drain_seq, now_ms(), self.sidecar_id)
        return drained

    def _load_python_state(self) -> None:
        now = now_ms()
        self.clients = {}
        for key, value in self.store.items("clients"):
            self.clients[key] = ClientState(from_u64(value[:8]), from_u64(value[8:16]), value[16:])
        self.clients_of = collections.Counter(_client_label(cid) for cid in self.clients)
        self.idem.load()
        self.settled.load()
        if self.store.get("meta", b"answers_format") is None:
            self._migrate_answers(now)
            self.idem.load()
            self.settled.load()
        self.reservations = {}
        for key, value in self.store.items("reservations"):
            self._load_reservation(key.decode(), json.loads(value))
        self.reservations_of = collections.Counter(r.tenant for r in self.reservations.values())
        self.accounts = Accounts(self._load_buckets)  # grant buckets are read when first needed
        # The index is stamped with the grant sequence it covers: a data directory that an older
        # meterd (without the index) has granted in since is indexed again.
        if self.store.get("meta", b"grant_expiry_index") != (self.store.get("meta", b"grant_seq") or u64(0)):
            self._build_expiry_index()
        self.subs = {}
        self._boundaries = []
        for _, value in self.store.items("subs"):
            sub = Subscription(**json.loads(value))
            self.subs[sub.customer_id] = sub
            self._boundaries.append((sub.end_ms, sub.customer_id))
        heapq.heapify(self._boundaries)
        self.load_sessions(self.store.items("sessions"))
        self._index_expiries()
        self.audit_seq = from_u64(self.store.get("meta", b"audit_seq") or u64(0))
        self.grant_seq = from_u64(self.store.get("meta", b"grant_seq") or u64(0))
        self.period_start_ms = from_u64(self.store.get("meta", b"period_start_ms") or u64(0))

    def _migrate_answers(self, now: int) -> None:
        """Once, for a data directory from before answers were kept per tenant: every
        remembered key still in its window moves to the store and key it has now:
        the admin's calls to the admin's quota, the data plane's to the tenant whose
        prefix the customer has (or the one tenant of a daemon without tokens). A
        settled reservation's answer did not say whose it was: it goes to no tenant,
        so with tokens a retried Commit or Release of it is NOT_FOUND (and applies
        nothing)."""
        from meterd.security import DataTokens
        tenants = list(DataTokens(self.settings).by_digest.values()) if self.settings.data_tokens_file else []
        ops: list[Op] = []
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for key, value in self.store.items("idem"):
            ops.append(("idem", key, None))
            expires = from_u64(value[:8])
            if expires <= now:
                continue
            rpc, _, rest = key.decode().partition("\x00")
            customer = rest.partition("\x00")[0].encode()
            label = ADMIN_LABEL if rpc in ("grant", "adjust", "subscribe") else \
                next((t.name for t in tenants if customer.startswith(t.prefix)), "")
            lb = bytes((len(label),)) + label.encode()
            if rpc in ("commit", "release") and rest.startswith("\x00"):
                db, new = "settled", self.settled.entry_id(entry_key("", "reservation", rest[1:]))
                value = value[:16] + lb + (b"C" if rpc == "commit" else b"R") + value[16:]
            else:
                db, new = "idem", self.idem.entry_id(entry_key(label, rpc, *rest.split("\x00", 1)))
                value = value[:16] + lb + value[16:]
            ops += [(db, new, value), (db + "_expiry", u64(expires) + bytes(4) + new, b"")]
            counts[(db, label)] += 1
        ops += [("meta", f"{db}_count\x00{label}".encode(), u64(n)) for (db, label), n in counts.items()]
        self.store.write_now(ops + [("meta", b"answers_format", b"2")])

    def _load_buckets(self, customer_id: str) -> Account | None:
        """A customer's grant buckets as LMDB has them (in key order), or None when there are none."""
        rows = self.store.items("grants", prefix=customer_id.encode() + b"\x00")
        if not rows:
            return None
        acct = Account()
        for key, value in rows:
            _, ct_name, gid = key.decode().split("\x00")
            ct = self.catalog.credit_index.get(ct_name)
            if ct is None:
                continue
            doc = json.loads(value)
            acct.buckets.setdefault(ct, []).append(Bucket(gid, doc["remaining_nano"], doc["expires_at_ms"],
                                                          doc["priority"], doc["source"], doc["order"],
                                                          doc.get("rollovers", 0)))
        return acct if acct.buckets else None

    def _build_expiry_index(self) -> None:
        """Once, for a data directory from before the index: every grant that expires, by when."""
        ops: list[Op] = []
        for key, value in self.store.items("grants"):
            expires = json.loads(value)["expires_at_ms"]
            if expires:
                ops.append(("grant_expiry", u64(expires) + key, b""))
        ops.append(("meta", b"grant_expiry_index", self.store.get("meta", b"grant_seq") or u64(0)))
        self.store.write_now(ops)

    def _index_expiries(self) -> None:
        """When reservations and grants expire. The grants come from their index
        in LMDB (what is committed) and from the buckets in memory."""
        self._reservation_expiry = [(r.expires_at_ms, rid) for rid, r in self.reservations.items()]
        heapq.heapify(self._reservation_expiry)
        due: set[tuple[int, str, int]] = set()

        def index(rows: Any) -> None:
            for key, _ in rows:
                cust, ct_name, _gid = key[8:].decode().split("\x00")
                ct = self.catalog.credit_index.get(ct_name)
                if ct is not None:
                    due.add((from_u64(key[:8]), cust, ct))

        self.store.scan("grant_expiry", index)
        due.update((b.expires_at_ms, cust, ct) for cust, a in self.accounts.loaded()
                   for ct, bs in a.buckets.items() for b in bs if b.expires_at_ms)
        self._grant_expiry = sorted(due)

    def _load_reservation(self, rid: str, doc: dict) -> None:
        ct = self.catalog.credit_index.get(doc["credit_type"])
        meter = self.catalog.meter_index.get(doc["meter"])
        rate = -1
        if meter is not None:
            value = doc["dim_value"]
            rate = self.core.find_rate(meter, None if value is None else value.encode())
        self.reservations[rid] = Reservation(rid, doc["customer_id"], -1 if ct is None else ct,
                                             -1 if meter is None else meter, doc["dim_value"], rate,
                                             doc["amount_nano"], doc["expires_at_ms"], doc.get("tenant", ""),
                                             doc.get("spared_nano", 0),
                                             None if doc.get("dims") is None else bytes.fromhex(doc["dims"]))

    def _seed_customers(self) -> None:
        ops = self._seed_ops()
        if ops:
            self.store.write_now(ops)

    def _seed_ops(self) -> list[Op]:
        """Give each catalog customer its plan, overdraft and initial balances, once."""
        ops: list[Op] = []
        for seed in self.catalog.customers:
            marker = f"subscribed\x00{seed.customer_id}".encode()
            if seed.plan and self.store.get("meta", marker) is None and seed.customer_id not in self.subs:
                sub_ops, _ = self.subscribe_ops(seed.customer_id, seed.plan, now_ms(), now_ms())
                ops += sub_ops + [("meta", marker, b"1")]
            if seed.customer_id not in self.subs:
                for ct in range(len(self.catalog.credit_types)):
                    ops += self.floor_ops(seed.customer_id, ct)
            for ct, amount in seed.balances_nano.items():
                marker = f"seeded\x00{seed.customer_id}\x00{self.catalog.credit_types[ct].name}".encode()
                if amount == 0 or self.store.get("meta", marker) is not None:
                    continue
                ops += self._grant_ops(seed.customer_id, ct, amount, 0, 0, "catalog", "initial balance")
                ops.append(("meta", marker, b"1"))
        # A changed catalog may change the floors and thresholds of every subscription's plan.
        for customer_id, sub in self.subs.items():
            ops += self._apply_plan_ops(customer_id, self.catalog.plan_index.get(sub.plan))
        return ops

    # ---- catalog reload ---------------------------------------------------------------

    async def reload_catalog(self, new: Catalog) -> None:
        """Switch to a new catalog without a restart, keeping balances.

        Everything before the switch is committed first; the switch itself
        happens with no await in between and is committed as one snapshot
        under the new catalog, so the log never holds records of two catalogs."""
        self.check_writable()
        while self._snapshot_running:  # a snapshot of the old catalog must not land after the switch
            await asyncio.sleep(0.01)
        self._snapshot_running = True
        try:
            await self._reload_catalog(new)
        finally:
            self._snapshot_running = False

    async def _reload_catalog(self, new: Catalog) -> None:
        await self._commit_with([])  # a barrier: the writer is FIFO
        old_doc, new_doc = _doc_of(self.catalog), _doc_of(new)
        self._check_reload(new)
        reservations = {rid: json.loads(r.to_json(self.catalog)) for rid, r in self.reservations.items()}
        buckets = {cust: {self.catalog.credit_types[ct].name: bs for ct, bs in a.buckets.items()}
                   for cust, a in self.accounts.loaded()}
        self.core = self._remap(self.core, old_doc, new_doc)
        old, self.catalog = self.catalog, new
        self.reservations = {}
        for rid, doc in reservations.items():
            self._load_reservation(rid, doc)
        self.accounts = Accounts(self._load_buckets)  # the others are read under the new catalog's names
        for cust, by_name in buckets.items():
            self.accounts[cust] = Account({new.credit_index[name]: bs for name, bs in by_name.items()
                                           if name in new.credit_index})
        for s in self.sessions.values():
            s.meter = new.meter_index[old.meters[s.meter].name]
            s.credit_type = new.credit_index[old.credit_types[s.credit_type].name]
        self._index_expiries()
        ops = self._seed_ops()
        ops += self._snapshot_ops()
        pos = self.log_pos
        await self._commit_with(ops)
        self.snapshot_pos = pos
        log.info("catalog reloaded from %s: %d credit types, %d meters, %d plans", new.source,
                 len(new.credit_types), len(new.meters), len(new.plans))

    def _check_reload(self, new: Catalog) -> None:
        """Open reservations and sessions keep the meter and credit type they hold money in."""
        from meterd.errors import ConfigError
        for r in self.reservations.values():
            if r.meter >= 0 and self.catalog.meters[r.meter].name not in new.meter_index:
                raise ConfigError(f"{new.source}: meters: {self.catalog.meters[r.meter].name} has open "
                                  "reservations; settle them before removing it")
        for s in self.sessions.values():
            if self.catalog.meters[s.meter].name not in new.meter_index or \
                    self.catalog.credit_types[s.credit_type].name not in new.credit_index:
                raise ConfigError(f"{new.source}: meters: {self.catalog.meters[s.meter].name} has open sessions")
        for r in self.reservations.values():
            if r.credit_type >= 0 and self.catalog.credit_types[r.credit_type].name not in new.credit_index:
                raise ConfigError(f"{new.source}: credit_types: {self.catalog.credit_types[r.credit_type].name} "
                                  "has open reservations")

    # ---- idempotency -----------------------------------------------------------

    def _idem_key(self, label: str, rpc: str, customer_id: str, key: str) -> bytes:
        if len(key.encode()) > self.settings.idempotency_key_bytes_max:
            raise InvalidInput("idempotency_key", f"longer than {self.settings.idempotency_key_bytes_max} bytes")
        return entry_key(label, rpc, customer_id, key)

    def _admin_key(self, rpc: str, req: Any) -> bytes | None:
        """An Admin call's idempotency key, in the admin's own quota (None without one)."""
        return self._idem_key(ADMIN_LABEL, rpc, req.customer_id, req.idempotency_key) if req.idempotency_key else None

    async def _replayed(self, key: bytes | None, request: bytes, dup_flag: bytes) -> bytes | None:
        """The stored answer for a repeated idempotency key, or None for a new one,
        which is refused when its tenant has no room left to remember it."""
        if key is None:
            return None
        entry = self.idem.get(key, now_ms())
        if entry is None:
            self.idem.room(_label_of_key(key), self.tenants)
            return None
        if entry.digest and entry.digest != _hash_request(request):
            raise InvalidInput("idempotency_key", "was used before with a different request")
        if entry.pending is not None:
            await asyncio.shield(entry.pending)  # raises if that commit failed
        return entry.response + dup_flag

    def _remember(self, key: bytes | None, request: bytes, response: bytes) -> list[Op]:
        if key is None:
            return []
        digest = _hash_request(request) if request else b""
        return self.idem.put_ops(_label_of_key(key), key, digest, response, now_ms())

    def _pending(self, fut: asyncio.Future) -> None:
        """Answers remembered by the ops of the commit just submitted wait for it."""
        self.idem.flight(fut)
        self.settled.flight(fut)

    async def _commit_with(self, ops: list[Op], fut: asyncio.Future | None = None,
                           maintenance: bool = False) -> None:
        fut = fut or asyncio.get_running_loop().create_future()
        self.store.submit(Unit(ops, fut, maintenance))
        self._pending(fut)
        await fut
        self._publish(ops)
        self._maybe_snapshot()

    def _due_ops(self) -> list[Op]:
        """Roll the subscriptions whose period has ended, before anything else happens.

        The roll is submitted as a commit of its own, ahead of the caller's
        (the writer is FIFO), so that a caller that then fails on bad input
        cannot lose it. Returns nothing for the caller to add."""
        if not (self._boundaries and self._boundaries[0][0] <= now_ms()):
            return []
        ops = self.roll_due(now_ms())
        if ops:
            fut = asyncio.get_running_loop().create_future()
            fut.add_done_callback(lambda f: None if f.cancelled() or f.exception() else self._publish(ops))
            self.store.submit(Unit(ops, fut, maintenance=True))  # a period roll must not wait for room
            self._rolling = fut
        return []

    async def _roll_settled(self) -> None:
        """A caller with nothing of its own to commit still answers only once the
        period roll it may have set off is durable, like the state it was answered from."""
        fut = self._rolling
        if fut is not None and not fut.done():
            await asyncio.shield(fut)

    def _publish(self, ops: list[Op]) -> None:
        """Hand committed audit entries to Watch streams."""
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

    async def watch(self, req: admin_pb2.WatchRequest) -> Any:
        queue: asyncio.Queue = asyncio.Queue(maxsize=10_000)
        item = (queue, frozenset(req.kinds))
        self._watchers.append(item)
        try:
            while True:
                yield (await queue.get()).SerializeToString()
        finally:
            self._watchers.remove(item)

    def _maybe_snapshot(self) -> None:
        use = self.store.use  # a long log would need more of the map's reserve than it has to become usage rows
        due = self.log_pos - self.snapshot_pos >= self.settings.snapshot_log_records_max or (
            use.log_bytes >= use.snapshot_log_bytes and self.log_pos != self.snapshot_pos)
        if due and not self._snapshot_running:
            asyncio.get_running_loop().create_task(self._snapshot_quietly())

    async def _snapshot_quietly(self) -> None:
        try:
            await self.snapshot()
        except StorageFull:
            pass
        except Exception:  # noqa: BLE001 - a snapshot is an optimisation
            log.exception("snapshot failed")

    # ---- data plane ----------------------------------------------------------------

    async def report_batch(self, data: bytes, tenant: Tenant | None = None) -> bytes:
        if len(data) > self.settings.batch_bytes_max:
            raise InvalidInput("batch", f"larger than {self.settings.batch_bytes_max} bytes")
        cid, seq = self.core.batch_header(data)
        if tenant is not None and cid:
            cid = tenant.key + cid  # each tenant's client ids are its own: no replaying another's sequence
        state = self.clients.get(cid) if cid else None
        if state is not None and seq <= state.sequence:
            if state.pending is not None:
                await asyncio.shield(state.pending)  # raises if that commit failed
            if seq == state.sequence:
                return state.result + _DUP_BATCH
            return meter_pb2.ReportBatchResponse(sequence=seq, duplicate=True).SerializeToString()
        self.check_writable()  # after the replay: a retry is answered even while writes are refused
        ops: list[Op] = self._due_ops()
        if cid and state is None:
            ops += self._client_room(label_of(tenant))
        at = now_ms()
        self.core.set_clock(at)
        accepted, denied, degraded, details = self.core.apply_batch(data, None if tenant is None else tenant.prefix)
        self.decisions[("ReportBatch", "allow")] += accepted - degraded
        self.decisions[("ReportBatch", "degrade")] += degraded
        self.decisions[("ReportBatch", "deny")] += denied
        result = meter_pb2.ReportBatchResponse(accepted=accepted, denied=denied, degraded=degraded,
                                               sequence=seq).SerializeToString() + details
        if accepted:
            ops.append(self._log_op(records.message(Kind.BATCH, data, at)))
        ops += self.alert_ops()
        if cid and (state is not None or accepted):  # a new client that changed nothing is not kept
            ms = now_ms()
            ops.append(("clients", cid, u64(seq) + u64(ms) + result))
            if state is None:
                self.clients_of[label_of(tenant)] += 1
            state = ClientState(seq, ms, result)
            self.clients[cid] = state
        if not ops:
            await self._roll_settled()
            return result
        fut = asyncio.get_running_loop().create_future()
        if state is not None:
            state.pending = fut
        await self._commit_with(ops, fut)
        return result

    def _client_room(self, label: str) -> list[Op]:
        """Room for a new batch client, in the daemon's table and in its tenant's
        share of it; clients idle for longer than client_ttl_s are forgotten to make it."""
        full = len(self.clients) >= self.settings.clients_max
        if not full and not (self.tenants and self.clients_of[label] >= self.settings.clients_per_tenant_max):
            return []
        ops = self._evict_clients()
        if len(self.clients) >= self.settings.clients_max:
            raise LimitReached(f"client table full ({len(self.clients)} batch clients seen within client_ttl_s; "
                               f"clients_max={self.settings.clients_max})")
        if self.tenants and self.clients_of[label] >= self.settings.clients_per_tenant_max:
            raise LimitReached(f"client table full for tenant {label!r} ({self.clients_of[label]} batch clients "
                               f"seen within client_ttl_s; clients_per_tenant_max="
                               f"{self.settings.clients_per_tenant_max})")
        return ops

    def _evict_clients(self) -> list[Op]:
        """Forget clients idle for longer than client_ttl_s."""
        cutoff = now_ms() - self.settings.client_ttl_s * 1000
        ops: list[Op] = []
        for cid in [c for c, s in self.clients.items() if s.seen_ms < cutoff]:
            del self.clients[cid]
            self.clients_of[_client_label(cid)] -= 1
            ops.append(("clients", cid, None))
        return ops

    async def report(self, data: bytes, tenant: Tenant | None = None) -> bytes:
        replay = self._writable_or_replay(lambda: self._keyed_report(data, tenant))
        if replay is not None:
            return replay
        self._due_ops()
        at = now_ms()
        self.core.set_clock(at)
        # Applies and answers in wire form, unless the event has a key.
        out = self.core.report_wire(data, None if tenant is None else tenant.prefix)
        if out is None:
            return await self._report_keyed(data, tenant)
        decision, response = out
        self.decisions[("Report", DECISION_NAMES[decision])] += 1
        ops = [self._log_op(records.message(Kind.REPORT, data, at))] if decision != meter_pb2.DECISION_DENY else []
        ops += self.alert_ops()
        if ops:
            await self._commit_with(ops)
        elif self._rolling is not None:
            await self._roll_settled()
        return response

    async def _report_keyed(self, data: bytes, tenant: Tenant | None) -> bytes:
        """A Report with an idempotency key: a repeat gets the first answer."""
        try:
            req = meter_pb2.ReportRequest.FromString(data)
        except Exception:  # noqa: BLE001 - protobuf raises DecodeError subclasses
            raise InvalidInput("event", "malformed protobuf") from None
        check_tenant(tenant, req.event.customer_id, "event.customer_id")  # before any replay
        key = self._idem_key(label_of(tenant), "report", req.event.customer_id, req.event.idempotency_key)
        replay = await self._replayed(key, _canonical(req), _DUP_REPORT)
        if replay is not None:
            return replay
        at = now_ms()
        self.core.set_clock(at)
        decision, reason, ct, cost, balance, mode, priority = self.core.report(
            data, None if tenant is None else tenant.prefix)
        self.decisions[("Report", DECISION_NAMES[decision])] += 1
        response = meter_pb2.ReportResponse(
            decision=decision, reason=reason, credit_type=self.catalog.credit_types[ct].name, cost_nano=cost,
            balance_nano=balance, mode=mode.decode(), priority=priority).SerializeToString()
        ops = [self._log_op(records.message(Kind.REPORT, data, at))] if decision != meter_pb2.DECISION_DENY else []
        ops += self.alert_ops()
        if reason != meter_pb2.REASON_UNKNOWN_CUSTOMER:  # nothing is kept for a customer that does not exist
            ops += self._remember(key, _canonical(req), response)
        if ops:
            await self._commit_with(ops)
        else:
            await self._roll_settled()
        return response

    def _quantity(self, meter: int, msg: Any, field_prefix: str = "") -> int:
        """A request's quantity in the meter's smallest unit, exactly."""
        precision = self.catalog.meters[meter].precision
        which = msg.WhichOneof("quantity_value")
        if which == "quantity_decimal":
            text = msg.quantity_decimal
            try:
                return core_mod._fastpath_py.parse_decimal(text.encode(), precision,
                                                           self.catalog.meters[meter].name.encode())
            except core_mod._fastpath_py._DecodeError as e:
                raise InvalidInput(field_prefix + "quantity_decimal", e.message) from None
        if msg.quantity < 0:
            raise InvalidInput(field_prefix + "quantity", "must not be negative")
        q = msg.quantity * 10**precision
        if q > (1 << 63) - 1:
            raise InvalidInput(field_prefix + "quantity", "cost or quantity overflows 64 bits")
        return q

    def _customer(self, customer_id: str) -> bytes:
        b = customer_id.encode()
        if not b:
            raise InvalidInput("customer_id", "must not be empty")
        if len(b) > self.settings.customer_id_bytes_max:
            raise InvalidInput("customer_id", f"longer than {self.settings.customer_id_bytes_max} bytes")
        if not all(0x21 <= c <= 0x7E for c in b):
            raise InvalidInput("customer_id", "must be printable ASCII without spaces")
        return b

    def _rate(self, meter_name: str, dimensions: Any) -> tuple[int, str | None, int]:
        meter = self.catalog.meter_index.get(meter_name)
        if meter is None:
            raise InvalidInput("meter", f"unknown meter {meter_name[:64]!r}")
        if len(dimensions) > self.settings.dimensions_max:
            raise InvalidInput("dimensions", "too many entries")
        for k, v in dimensions.items():
            if not k or len(k.encode()) > self.settings.dimension_key_bytes_max \
                    or len(v.encode()) > self.settings.dimension_value_bytes_max:
                raise InvalidInput("dimensions", "too long" if k else "must not be empty")
        key = self.catalog.meters[meter].price_dimension
        if self.catalog.meters[meter].aggregation > 1:
            raise InvalidInput("meter", "a max, latest or unique_count meter is charged at period end; report it")
        value = dimensions.get(key) if key else None
        rate = self.core.find_rate(meter, None if value is None else value.encode())
        if rate < 0:
            raise InvalidInput("dimensions", core_mod._fastpath_py.no_price_message(
                meter_name.encode(), key.encode(), None if value is None else value.encode()))
        return meter, value, rate

    async def authorize(self, data: bytes, tenant: Tenant | None = None) -> bytes:
        replay = self._writable_or_replay(lambda: self._keyed_authorize(data, tenant))
        if replay is not None:
            return replay
        req = meter_pb2.AuthorizeRequest.FromString(data)
        check_tenant(tenant, req.customer_id, "customer_id")
        cust = self._customer(req.customer_id)
        meter, value, rate = self._rate(req.meter, req.dimensions)
        qty = self._quantity(meter, req)
        key = None
        if req.idempotency_key:
            key = self._idem_key(label_of(tenant), "authorize", req.customer_id, req.idempotency_key)
            replay = await self._replayed(key, _canonical(req), _DUP_AUTHORIZE)
            if replay is not None:
                return replay
        ttl_ms = req.ttl_ms or self.settings.reservation_ttl_s * 1000
        if ttl_ms > self.settings.reservation_ttl_max_s * 1000:
            raise InvalidInput("ttl_ms", f"above the maximum of {self.settings.reservation_ttl_max_s * 1000}")
        ct, amount = self.core.quote(rate, qty)
        ct_name = self.catalog.credit_types[ct].name
        self.open_room("reservation", label_of(tenant))
        pre = self._due_ops()
        idx = self.core.account(cust)
        deny = None
        if idx < 0:
            deny = meter_pb2.REASON_UNKNOWN_CUSTOMER
        elif not self.core.reserve(idx, ct, amount):
            deny = meter_pb2.REASON_INSUFFICIENT_BALANCE
        if deny is not None:
            if pre:
                await self._commit_with(pre)
            await self._roll_settled()
            refusal = self._authorize_refusal(req.customer_id, idx, ct, deny)
            self.decisions[("Authorize", DECISION_NAMES[meter_pb2.AuthorizeResponse.FromString(refusal).decision])] += 1
            return refusal
        rid = "r_" + secrets.token_hex(12)
        res = Reservation(rid, req.customer_id, ct, meter, value, rate, amount, now_ms() + ttl_ms, label_of(tenant),
                          dims=dimension_set(req.dimensions))
        self.reservations[rid] = res
        self.reservations_of[res.tenant] += 1
        heapq.heappush(self._reservation_expiry, (res.expires_at_ms, rid))
        response = meter_pb2.AuthorizeResponse(
            decision=meter_pb2.DECISION_ALLOW, reservation_id=rid, credit_type=ct_name, reserved_nano=amount,
            available_nano=self.core.available(idx, ct), expires_at_ms=res.expires_at_ms).SerializeToString()
        ops = pre + [self._log_op(records.account(Kind.RESERVE, cust, ct, amount, now_ms())),
                     ("reservations", rid.encode(), res.to_json(self.catalog))]
        ops += self._remember(key, _canonical(req) if key else b"", response)
        self.decisions[("Authorize", "allow")] += 1
        await self._commit_with(ops)
        return response

    def open_room(self, table: str, label: str) -> None:
        """A new reservation or session (``table``) needs a place in its table, the daemon's
        and its tenant's share of it, and one for the final answer it will leave."""
        n, mine = ((len(self.reservations), self.reservations_of[label]) if table == "reservation"
                   else (len(self.sessions), self.sessions_by_tenant[label]))
        total_max = getattr(self.settings, f"{table}s_max")
        tenant_max = getattr(self.settings, f"{table}s_per_tenant_max")
        if n >= total_max:
            raise LimitReached(f"{table} table full ({n} open; {table}s_max={total_max})")
        if self.tenants and mine >= tenant_max:
            raise LimitReached(f"{table} table full for tenant {label!r} ({mine} open; "
                               f"{table}s_per_tenant_max={tenant_max})")
        self.settled.room(label, self.tenants, 1 + self.reservations_of[label] + self.sessions_by_tenant[label],
                          1 + len(self.reservations) + len(self.sessions))

    def _authorize_refusal(self, customer_id: str, idx: int, ct: int, reason: int) -> bytes:
        """Deny, or degrade when the customer's plan has a fallback mode for this credit type."""
        ct_name = self.catalog.credit_types[ct].name
        available = self.core.available(idx, ct) if idx >= 0 else 0
        sub = self.subs.get(customer_id)
        plan = self.catalog.plan_index.get(sub.plan) if sub else None
        policy = plan.credits.get(ct) if plan else None
        if policy is not None and policy.fallback and reason == meter_pb2.REASON_INSUFFICIENT_BALANCE:
            degraded = self.core.state(idx)[0][ct][4]
            step = policy.priority_step_nano
            priority = max(100 - degraded // step, 0) if step else 100
            return meter_pb2.AuthorizeResponse(decision=meter_pb2.DECISION_DEGRADE, credit_type=ct_name,
                                               available_nano=available, mode=policy.fallback,
                                               priority=priority).SerializeToString()
        return meter_pb2.AuthorizeResponse(decision=meter_pb2.DECISION_DENY, reason=reason,  # type: ignore[arg-type]
                                           credit_type=ct_name,
                                           available_nano=available).SerializeToString()

    async def _settled_answer(self, key: bytes, by: bytes, request: bytes, what: str) -> bytes | None:
        """The final answer a reservation or session left (without its first byte,
        which says what settled it), or None when it has none in its window."""
        entry = self.settled.get(key, now_ms())
        if entry is None:
            return None
        if entry.response[:1] != by:
            raise Conflict(f"{what} was settled by {SETTLED_BY.get(entry.response[:1], 'another call')} already")
        if entry.digest and entry.digest != _hash_request(request):
            raise InvalidInput("quantity", f"{what} was settled before with a different quantity")
        if entry.pending is not None:
            await asyncio.shield(entry.pending)  # raises if that commit failed
        return entry.response[1:]

    async def _settling(self, by: bytes, req: Any, tenant: Tenant | None) -> tuple[bytes, bytes | None, Reservation]:
        """The settled-answer key of a Commit (``by`` b"C") or Release (b"R"), the
        earlier answer if the reservation was settled the same way already, and
        otherwise the open reservation. Answers are kept per tenant; a retry is
        answered even while writes are refused."""
        rid = req.reservation_id
        if not rid or len(rid.encode()) > 64:
            raise NotFound(f"reservation {rid[:64]!r} is unknown")
        key = entry_key(label_of(tenant), "reservation", rid)
        replay = await self._settled_answer(key, by, _canonical(req), f"reservation {rid!r}")
        if replay is not None:
            return key, replay + (_DUP_COMMIT if by == b"C" else _DUP_RELEASE), None  # type: ignore[return-value]
        self.check_writable()
        res = self.reservations.get(rid)
        if res is None:
            raise NotFound(f"reservation {rid[:64]!r} is unknown, expired or already settled")
        return key, None, res

    async def commit(self, req: meter_pb2.CommitRequest, tenant: Tenant | None = None) -> bytes:
        key, replay, res = await self._settling(b"C", req, tenant)
        if replay is not None:
            return replay
        if res.rate < 0:
            raise NotFound("the reservation's meter is no longer in the catalog; release it")
        qty = self._quantity(res.meter, req)
        cust = res.customer_id.encode()
        idx = self.core.account(cust)
        pre = self._due_ops()
        at = now_ms()
        self.core.set_clock(at)
        dims = settle_set(self.core, idx, res.meter, res.dims, cust)
        cost, overrun = self.core.settle(idx, res.rate, qty, res.amount_nano, dims)
        if overrun:
            log.warning("commit overran the balance: customer=%s reservation=%s overrun_nano=%d",
                        res.customer_id, res.reservation_id, overrun)
        self._forget_reservation(res)
        ops = pre + [self._log_op(records.settle(cust, res.rate, qty, res.amount_nano, dims, at)),
               ("reservations", res.reservation_id.encode(), None)]
        ops += self.spared_ops(res.customer_id, res.credit_type, res.spared_nano, cost)
        response = meter_pb2.CommitResponse(
            cost_nano=cost, released_nano=max(res.amount_nano - cost, 0),
            balance_nano=self.core.state(idx)[0][res.credit_type][0], overrun_nano=overrun).SerializeToString()
        ops += self.alert_ops()
        ops += self.settled.put_ops(label_of(tenant), key, _hash_request(_canonical(req)), b"C" + response, at)
        await self._commit_with(ops)
        return response

    async def release(self, req: meter_pb2.ReleaseRequest, tenant: Tenant | None = None) -> bytes:
        key, replay, res = await self._settling(b"R", req, tenant)
        if replay is not None:
            return replay
        ops = self._due_ops() + self._release_ops(res)
        idx = self.core.account(res.customer_id.encode())
        response = meter_pb2.ReleaseResponse(
            released_nano=res.amount_nano,
            available_nano=self.core.available(idx, res.credit_type) if res.credit_type >= 0 else 0,
        ).SerializeToString()
        ops += self.settled.put_ops(label_of(tenant), key, _hash_request(_canonical(req)), b"R" + response, now_ms())
        await self._commit_with(ops)
        return response

    def _forget_reservation(self, res: Reservation) -> None:
        del self.reservations[res.reservation_id]
        self.reservations_of[res.tenant] -= 1
        if self.reservations_of[res.tenant] <= 0:
            del self.reservations_of[res.tenant]

    def _release_ops(self, res: Reservation) -> list[Op]:
        """Give a reservation back; credits of an ended period it held go at once, by that period's rules."""
        self._forget_reservation(res)
        ops: list[Op] = [("reservations", res.reservation_id.encode(), None)]
        if res.credit_type >= 0:
            cust = res.customer_id.encode()
            self.core.release(self.core.account(cust), res.credit_type, res.amount_nano)
            ops.append(self._log_op(records.account(Kind.RELEASE, cust, res.credit_type, res.amount_nano, now_ms())))
            ops += self.spared_ops(res.customer_id, res.credit_type, res.spared_nano, 0)
        return ops

    def balance(self, data: bytes) -> bytes:
        req = meter_pb2.GetBalanceRequest.FromString(data)
        cust = self._customer(req.customer_id)
        idx = self.core.account(cust)
        if idx < 0:
            raise NotFound(f"customer {req.customer_id!r} has no account")
        cts, use, _ = self.core.state(idx)
        acct = self.accounts.get(req.customer_id, Account())
        out = meter_pb2.GetBalanceResponse(customer_id=req.customer_id)
        sub = self.subs.get(req.customer_id)
        if sub is not None:
            out.plan, out.period_start_ms, out.period_end_ms = sub.plan, sub.start_ms, sub.end_ms
        else:
            out.period_start_ms, out.period_end_ms = month_bounds(self.period_start_ms or now_ms())
        for ct, (bal, resv, floor, *_) in enumerate(cts):
            cb = out.balances.add(credit_type=self.catalog.credit_types[ct].name, balance_nano=bal,
                                  reserved_nano=resv, floor_nano=floor,
                                  available_nano=min(max(bal - resv - floor, -(1 << 63) + 1), (1 << 63) - 1))
            for b in self._allocated(acct.buckets.get(ct, []), bal):
                cb.grants.add(grant_id=b.grant_id, remaining_nano=b.remaining_nano, expires_at_ms=b.expires_at_ms,
                              priority=b.priority, source=b.source)
        for m, q in enumerate(use):
            out.usage.add(meter=self.catalog.meters[m].name, quantity=self.catalog.format_quantity(m, q))
        return out.SerializeToString()

    # ---- grants and the audit trail ----------------------------------------------

    @staticmethod
    def _allocated(buckets: list[Bucket], balance: int) -> list[Bucket]:
        """Buckets with what has been spent since their last update drawn from
        them in spending order (priority, then soonest expiry, then oldest).
        Credits spared for open holds (source "held") are not drawn: only the
        settlement of those holds spends them (``spared_ops``)."""
        held = [b for b in buckets if b.source == HELD]
        spendable = [b for b in buckets if b.source != HELD]
        spent = sum(b.remaining_nano for b in spendable) - max(balance - sum(b.remaining_nano for b in held), 0)
        out = list(held)
        for b in sorted(spendable, key=Bucket.sort_key):
            take = min(max(spent, 0), b.remaining_nano)
            spent -= take
            out.append(Bucket(b.grant_id, b.remaining_nano - take, b.expires_at_ms, b.priority, b.source, b.order,
                              b.rollovers))
        return out

    def _reconcile(self, customer_id: str, ct: int, balance: int) -> list[Op]:
        acct = self.accounts.setdefault(customer_id, Account())
        buckets = self._allocated(acct.buckets.get(ct, []), balance)
        acct.buckets[ct] = [b for b in buckets if b.remaining_nano > 0]
        ops: list[Op] = []
        for b in buckets:
            ops += self._grant_row_ops(customer_id, ct, b, b.remaining_nano > 0)
        return ops

    def _grant_row_ops(self, customer_id: str, ct: int, b: Bucket, keep: bool) -> list[Op]:
        """Write a bucket's row, or delete it and its entry in the expiry index."""
        key = self._grant_key(customer_id, ct, b.grant_id)
        if keep:
            return [("grants", key, self._grant_doc(b))]
        if b.expires_at_ms:
            return [("grants", key, None), ("grant_expiry", u64(b.expires_at_ms) + key, None)]
        return [("grants", key, None)]

    def _grant_key(self, customer_id: str, ct: int, grant_id: str) -> bytes:
        return self._grant_key_of(self.catalog, customer_id, ct, grant_id)

    @staticmethod
    def _grant_key_of(catalog: Catalog, customer_id: str, ct: int, grant_id: str) -> bytes:
        return f"{customer_id}\x00{catalog.credit_types[ct].name}\x00{grant_id}".encode()

    @staticmethod
    def _grant_doc(b: Bucket) -> bytes:
        return json.dumps({"remaining_nano": b.remaining_nano, "expires_at_ms": b.expires_at_ms,
                           "priority": b.priority, "source": b.source, "order": b.order,
                           "rollovers": b.rollovers}).encode()

    def _audit_op(self, customer_id: str, kind: str, ct: int, amount: int, before: int, after: int,
                  reference: str, charge: int = 0, charge_ct: int = -1, source: str = "",
                  tiers: list[tuple[int, int, str, int]] | None = None) -> list[Op]:
        """An audit entry, kept per customer and queued in the outbox for the ledger."""
        self.audit_seq += 1
        t = now_ms()
        entry = admin_pb2.AuditEntry(sequence=self.audit_seq, time_ms=t, kind=kind,
                                     credit_type=self.catalog.credit_types[ct].name, amount_nano=amount,
                                     balance_before_nano=before, balance_after_nano=after, reference=reference,
                                     customer_id=customer_id, charge_nano=charge,
                                     charge_credit_type=self.catalog.credit_types[charge_ct].name if charge else "",
                                     source=source, effective_ms=t if self.effective_ms is None else self.effective_ms,
                                     tiers=[admin_pb2.ChargeTier(tier=n, units_nano=u, unit_price=p, charge_nano=c)
                                            for n, u, p, c in tiers or []])
        value = entry.SerializeToString()
        return [("audit", customer_id.encode() + b"\x00" + u64(self.audit_seq), value),
                ("outbox", u64(self.audit_seq), value),
                ("meta", b"audit_seq", u64(self.audit_seq))]

    def _credit_ops(self, customer_id: str, ct: int, amount: int) -> tuple[list[Op], int, int]:
        """Apply a signed credit in the core; returns the log op and the balances around it."""
        cust = customer_id.encode()
        idx = self.core.open_account(cust)
        before = self.core.state(idx)[0][ct][0]
        after = self.core.credit(idx, ct, amount)
        return [self._log_op(records.account(Kind.CREDIT, cust, ct, amount, now_ms()))], before, after

    def _grant_ops(self, customer_id: str, ct: int, amount: int, expires_at_ms: int, priority: int,
                   source: str, reference: str) -> list[Op]:
        ops, _ = self._add_bucket(customer_id, ct, amount, expires_at_ms, priority, source, credit=True,
                                  reference=reference)
        return ops

    def _add_bucket(self, customer_id: str, ct: int, amount: int, expires_at_ms: int, priority: int, source: str,
                    credit: bool, rollovers: int = 0, kind: str = "grant", reference: str = "") -> tuple[list[Op], str]:
        """A new grant bucket; with ``credit`` its amount is also added to the balance (and audited)."""
        idx = self.core.open_account(customer_id.encode())
        ops = self._reconcile(customer_id, ct, self.core.state(idx)[0][ct][0])
        self.grant_seq += 1
        gid = f"g_{self.grant_seq}"
        if credit:
            credit_ops, before, after = self._credit_ops(customer_id, ct, amount)
            ops += credit_ops
            if kind == "grant" and source in ("refund", "adjust"):
                kind = source  # a refund, or a positive manual adjustment, is its own kind in the audit trail
            ops += self._audit_op(customer_id, kind, ct, amount, before, after, f"{gid} {source} {reference}".strip(),
                                  source=source)
            ops += self.topup_done_ops(customer_id, ct, after)
        bucket = Bucket(gid, amount, expires_at_ms, priority, source, self.grant_seq, rollovers)
        if expires_at_ms:
            heapq.heappush(self._grant_expiry, (expires_at_ms, customer_id, ct))
        self.accounts.setdefault(customer_id, Account()).buckets.setdefault(ct, []).append(bucket)
        ops += self._grant_row_ops(customer_id, ct, bucket, True)
        if expires_at_ms:
            ops.append(("grant_expiry", u64(expires_at_ms) + self._grant_key(customer_id, ct, gid), b""))
        ops.append(("meta", b"grant_seq", u64(self.grant_seq)))
        ops.append(("meta", b"grant_expiry_index", u64(self.grant_seq)))  # the index covers this grant too
        return ops, gid

    def _remove_bucket(self, customer_id: str, ct: int, b: Bucket) -> list[Op]:
        buckets = self.accounts[customer_id].buckets.get(ct, [])
        if b in buckets:
            buckets.remove(b)
        return self._grant_row_ops(customer_id, ct, b, False)

    def _credit_type(self, name: str, amount_nano: int) -> int:
        ct = self.catalog.credit_index.get(name)
        if ct is None:
            raise InvalidInput("credit_type", f"unknown credit type {name[:64]!r}")
        credit = self.catalog.credit_types[ct]
        if amount_nano % step_nano(credit):
            raise InvalidInput("amount_nano", f"{credit.name} is granted in steps of {step_nano(credit)} nano "
                               f"({credit.decimals} decimals)")
        return ct

    async def grant(self, req: admin_pb2.GrantRequest) -> bytes:
        replay = self._writable_or_replay(lambda: self._keyed_admin("grant", req, _DUP_GRANT))
        if replay is not None:
            return replay
        self._customer(req.customer_id)
        ct = self._credit_type(req.credit_type, req.amount_nano)
        if req.amount_nano <= 0:
            raise InvalidInput("amount_nano", "must be positive")
        if req.expires_at_ms < 0 or (req.expires_at_ms and req.expires_at_ms <= now_ms()):
            raise InvalidInput("expires_at_ms", "must be 0 (never) or in the future")
        if len(req.source) > 64:
            raise InvalidInput("source", "longer than 64 characters")
        key = self._admin_key("grant", req)
        data = _canonical(req)
        replay = await self._replayed(key, data, _DUP_GRANT)
        if replay is not None:
            return replay
        ops = self._due_ops() + self._grant_ops(req.customer_id, ct, req.amount_nano, req.expires_at_ms, req.priority,
                              req.source or "api", "")
        gid = f"g_{self.grant_seq}"
        response = admin_pb2.GrantResponse(grant_id=gid, balance_nano=self.core.state(
            self.core.account(req.customer_id.encode()))[0][ct][0]).SerializeToString()
        ops += self._remember(key, data, response)
        await self._commit_with(ops)
        return response

    async def adjust(self, req: admin_pb2.AdjustRequest) -> bytes:
        replay = self._writable_or_replay(lambda: self._keyed_admin("adjust", req, _DUP_ADJUST))
        if replay is not None:
            return replay
        self._customer(req.customer_id)
        ct = self._credit_type(req.credit_type, req.amount_nano)
        if req.amount_nano == 0:
            raise InvalidInput("amount_nano", "must not be zero")
        if not req.reason.strip():
            raise InvalidInput("reason", "is required for a manual adjustment")
        if len(req.reason) > 256:
            raise InvalidInput("reason", "longer than 256 characters")
        key = self._admin_key("adjust", req)
        data = _canonical(req)
        replay = await self._replayed(key, data, _DUP_ADJUST)
        if replay is not None:
            return replay
        if req.amount_nano > 0:
            ops = self._due_ops() + self._grant_ops(req.customer_id, ct, req.amount_nano, 0, ADJUST_PRIORITY,
                                                    "adjust", req.reason)
            after = self.core.state(self.core.account(req.customer_id.encode()))[0][ct][0]
        else:
            idx = self.core.open_account(req.customer_id.encode())
            ops = self._due_ops() + self._reconcile(req.customer_id, ct, self.core.state(idx)[0][ct][0])
            credit, before, after = self._credit_ops(req.customer_id, ct, req.amount_nano)
            ops += credit
            ops += self._reconcile(req.customer_id, ct, after)
            ops += self._audit_op(req.customer_id, "adjust", ct, req.amount_nano, before, after, req.reason,
                                  source="adjust")
            ops += self.alert_ops()
        response = admin_pb2.AdjustResponse(balance_nano=after).SerializeToString()
        ops += self._remember(key, data, response)
        await self._commit_with(ops)
        return response

    def audit(self, req: admin_pb2.ListAuditRequest) -> admin_pb2.ListAuditResponse:
        cust = self._customer(req.customer_id)
        limit = req.limit or 100
        if limit > 1000:
            raise InvalidInput("limit", "at most 1000")
        prefix = cust + b"\x00"
        if req.after_sequence >= (1 << 64) - 1:
            return admin_pb2.ListAuditResponse()
        rows = self.store.items("audit", start=prefix + u64(req.after_sequence + 1), prefix=prefix, limit=limit)
        return admin_pb2.ListAuditResponse(entries=[admin_pb2.AuditEntry.FromString(v) for _, v in rows])

    # ---- subscriptions ------------------------------------------------------------------

    async def subscribe(self, req: admin_pb2.SubscribeRequest) -> bytes:
        self.check_writable()
        self._customer(req.customer_id)
        key = self._admin_key("subscribe", req)
        replay = await self._replayed(key, _canonical(req), b"")
        if replay is not None:
            return replay
        now = now_ms()
        if req.start_ms < 0 or req.start_ms > now + 366 * 86_400_000:
            raise InvalidInput("start_ms", "must be 0 (now) or a time within a year")
        ops = self._due_ops()
        sub_ops, sub = self.subscribe_ops(req.customer_id, req.plan, req.start_ms or now, now)
        ops += sub_ops
        ops += self.roll_due(now)  # a start in the past catches up on its periods at once
        response = sub.to_pb().SerializeToString()
        ops += self._remember(key, _canonical(req), response)
        await self._commit_with(ops)
        return response

    async def cancel(self, req: admin_pb2.CancelRequest) -> bytes:
        self.check_writable()
        self._customer(req.customer_id)
        ops = self._due_ops()
        more, sub = self.cancel_ops(req.customer_id, req.at_period_end)
        await self._commit_with(ops + more)
        return sub.to_pb().SerializeToString()

    async def change_plan(self, req: admin_pb2.ChangePlanRequest) -> bytes:
        self.check_writable()
        self._customer(req.customer_id)
        ops = self._due_ops()
        more, sub = self.change_plan_ops(req.customer_id, req.plan, now_ms())
        await self._commit_with(ops + more + self.alert_ops())
        return sub.to_pb().SerializeToString()

    # ---- housekeeping ----------------------------------------------------------------

    async def _expire_reservations(self, now: int) -> None:
        """Release what is due, a chunk per commit: the event loop serves calls in between."""
        while self._reservation_expiry and self._reservation_expiry[0][0] <= now:
            ops: list[Op] = []
            while self._reservation_expiry and self._reservation_expiry[0][0] <= now and len(ops) < SWEEP_CHUNK:
                _, rid = heapq.heappop(self._reservation_expiry)
                res = self.reservations.get(rid)
                if res is None or res.expires_at_ms > now:
                    continue  # settled already
                log.info("reservation expired: customer=%s reservation=%s amount_nano=%d",
                         res.customer_id, res.reservation_id, res.amount_nano)
                ops += self._release_ops(res)
            if ops:
                await self._commit_with(ops, maintenance=True)

    async def sweep(self) -> None:
        """Expire reservations and grants, roll the period, snapshot when due."""
        if self.closing:
            return
        if self.storage_full is not None or self.store.use.refusing:
            # A snapshot trims the log: after a failed commit, the one that commits clears
            # the failure; above the map's high-water mark, it turns the log into rows the
            # flush drains. Housekeeping is maintenance, so it goes on while writes are refused.
            await self._snapshot_quietly()
            if self.storage_full is not None:
                return
        now = now_ms()
        ops: list[Op] = self._due_ops()
        await self._expire_reservations(now)
        retry = set()
        while self._grant_expiry and self._grant_expiry[0][0] <= now:
            _, cid, ct = heapq.heappop(self._grant_expiry)
            acct = self.accounts.get(cid)
            if acct is None or not any(b.expires_at_ms and b.expires_at_ms <= now for b in acct.buckets.get(ct, [])):
                continue
            ops += self._expire_grants(cid, ct, now)
            # Held by a reservation: try again on the next tick. Credits spared for a hold
            # are not: its settlement takes them (spared_ops).
            if any(b.expires_at_ms and b.expires_at_ms <= now and b.source != HELD for b in acct.buckets.get(ct, [])):
                retry.add((cid, ct))
        for cid, ct in retry:
            heapq.heappush(self._grant_expiry, (now + 1, cid, ct))
        start, _ = month_bounds(now)
        if start != self.period_start_ms:
            if self.period_start_ms:
                self.effective_ms = start - 1  # what the ended month owes belongs to it
                try:
                    for idx in range(len(self.core)):  # gauges of accounts without a plan: their month ends
                        if self.core.state(idx)[2] == 0:
                            ops += self.gauge_ops(self.core.customer_id(idx).decode(), idx)
                finally:
                    self.effective_ms = None
                records.reset_unplanned(self.core)
                ops.append(self._log_op(records.period(now_ms())))
            self.period_start_ms = start
            ops.append(("meta", b"period_start_ms", u64(start)))
        ops += self.idem.expire_ops(now, EXPIRE_CHUNK)
        ops += self.settled.expire_ops(now, EXPIRE_CHUNK)
        ops += self.expire_sessions_ops(now)
        ops += self.alert_ops()
        if ops:
            await self._commit_with(ops, maintenance=True)

    def _expire_grants(self, customer_id: str, ct: int, now: int) -> list[Op]:
        idx = self.core.account(customer_id.encode())
        ops = self._reconcile(customer_id, ct, self.core.state(idx)[0][ct][0])
        acct = self.accounts[customer_id]
        for b in [b for b in acct.buckets.get(ct, []) if b.expires_at_ms and b.expires_at_ms <= now]:
            # Money held by open reservations does not expire under them: that part
            # of the grant goes once they settle (the next sweeps retry). What an
            # ended period spared for its holds goes with their settlement; any more
            # than they were given (a directory from an older meterd) goes now.
            kept = self.spared_total(customer_id, ct) if b.source == HELD else \
                self.reserved_share(customer_id, ct, b)
            gone = max(b.remaining_nano - kept, 0)
            if gone:
                credit, before, after = self._credit_ops(customer_id, ct, -gone)
                ops += credit
                ops += self._audit_op(customer_id, "expire", ct, -gone, before, after, b.grant_id)
            b.remaining_nano -= gone
            if b.remaining_nano == 0:
                acct.buckets[ct].remove(b)
            ops += self._grant_row_ops(customer_id, ct, b, b.remaining_nano > 0)
        return ops

    # ---- credits of an ended period spared for the holds open at its end ------------------
    #
    # At a period boundary, the expiring credits that open holds stand on are not
    # forfeited under them: each hold is given its share (``spared_nano``), kept in
    # a bucket of source "held" that nothing else may spend. When the hold settles,
    # in the same commit, its cost is paid from that share first and the rest of the
    # share is forfeited, as the ended period's rules say: the new period never gets
    # to spend it, and its own usage is never paid with it.

    def holds_of(self, customer_id: str, ct: int) -> list[Any]:
        """The open reservations and sessions of a customer in a credit type, oldest expiry first."""
        out: list[Any] = [r for r in self.reservations.values() if r.customer_id == customer_id
                          and r.credit_type == ct and r.amount_nano > 0]
        out.sort(key=lambda r: (r.expires_at_ms, r.reservation_id))
        out += [s for s in self.sessions.values() if s.customer_id == customer_id and s.credit_type == ct
                and s.reserved_nano > 0]
        return out

    def spare_ops(self, customer_id: str, ct: int, amount: int) -> list[Op]:
        """Give ``amount`` of ended-period credits to the open holds that stand on them."""
        ops: list[Op] = []
        for h in self.holds_of(customer_id, ct):
            if amount <= 0:
                break
            room = (h.amount_nano if isinstance(h, Reservation) else h.reserved_nano) - h.spared_nano
            give = min(max(room, 0), amount)
            if give:
                h.spared_nano += give
                amount -= give
                ops.append(("reservations", h.reservation_id.encode(), h.to_json(self.catalog))
                           if isinstance(h, Reservation) else ("sessions", h.session_id.encode(), h.to_json()))
        if amount:
            raise RuntimeError(f"spared {amount} nano more than the open holds of {customer_id!r} stand on")
        return ops

    def spared_total(self, customer_id: str, ct: int) -> int:
        return sum(h.spared_nano for h in self.holds_of(customer_id, ct))

    def spared_ops(self, customer_id: str, ct: int, spared: int, cost: int) -> list[Op]:
        """A hold with ``spared`` credits of an ended period settled at ``cost``: the
        cost is paid from them first, and the rest is forfeited, in this commit."""
        if spared <= 0:
            return []
        acct = self.accounts.get(customer_id)
        held = sorted((b for b in (acct.buckets.get(ct, []) if acct else []) if b.source == HELD),
                      key=lambda b: (b.expires_at_ms, b.order))
        ops: list[Op] = []
        left = spared
        for b in held:
            take = min(b.remaining_nano, left)
            b.remaining_nano -= take
            left -= take
            if b.remaining_nano == 0:
                acct.buckets[ct].remove(b)  # type: ignore[union-attr]
            ops += self._grant_row_ops(customer_id, ct, b, b.remaining_nano > 0)
        forfeit = spared - left - min(cost, spared - left)
        if forfeit:
            credit, before, after = self._credit_ops(customer_id, ct, -forfeit)
            ops += credit + self._audit_op(customer_id, "expire", ct, -forfeit, before, after,
                                           (held[0].grant_id if held else "") + " spared for a hold that settled")
        return ops

    def reserved_share(self, customer_id: str, ct: int, bucket: Bucket) -> int:
        """How much of a bucket open reservations stand on: held amounts are drawn
        from buckets in spending order, as their settlement will be (credits already
        spared for holds, and what they were spared for, are left out)."""
        idx = self.core.account(customer_id.encode())
        bal, resv = self.core.state(idx)[0][ct][:2]
        buckets = self.accounts[customer_id].buckets.get(ct, [])
        spared_held = sum(b.remaining_nano for b in buckets if b.source == HELD)
        # Credits are spared for holds only with a held bucket, and a settlement takes both:
        # without one, no open hold has any, and the holds need not be looked through.
        spared = self.spared_total(customer_id, ct) if spared_held else 0
        held = min(resv - spared, max(bal - spared_held, 0))
        for b in sorted((b for b in buckets if b.source != HELD), key=Bucket.sort_key):
            take = min(held, b.remaining_nano)
            if b is bucket:
                return take
            held -= take
        return 0

    async def run_housekeeping(self, stop: asyncio.Event, period_s: float = 0.5) -> None:
        last_snapshot = time.monotonic()
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=period_s)
            except asyncio.TimeoutError:
                pass
            if stop.is_set():
                return
            if self.broken is not None:
                self._try_recover()
                continue
            try:
                await self.sweep()
                if time.monotonic() - last_snapshot >= self.settings.snapshot_interval_s:
                    last_snapshot = time.monotonic()
                    await self._snapshot_quietly()
            except StorageFull:
                pass
            except Exception:  # noqa: BLE001 - housekeeping must keep running
                log.exception("housekeeping failed")


__all__ = ["Engine", "now_ms", "month_bounds"]
