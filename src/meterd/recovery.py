"""Recovery: all in-memory state rebuilt from LMDB (the last snapshot of the
account table, then the log after it replayed through the same core), so the
state is always a function of what is on disk; and the switch to a new
catalog, which moves accounts onto it by name."""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import lmdb

from meterd import _fastpath_py, records, validate
from meterd import core as core_mod
from meterd.answers import ADMIN_LABEL, AnswerStore, entry_key
from meterd.catalog import Catalog, CompiledCatalog
from meterd.clock import Clock
from meterd.config import Settings
from meterd.corespec import INT64_MAX
from meterd.drain import Drained, Drains
from meterd.errors import ConfigError, StorageFull, invariant
from meterd.flush import Flusher
from meterd.grants import Grants
from meterd.holds import Holds
from meterd.housekeeping import Housekeeping
from meterd.journal import Journal
from meterd.leases import Leases, check_catalog
from meterd.reports import Reports
from meterd.snapshots import Snapshots
from meterd.state import Live
from meterd.store import Op, Store, from_u64, u64
from meterd.subscriptions import Subscriptions

log = logging.getLogger("meterd.engine")

INT64_MIN = -(1 << 63)
UNIQUE_COUNT = 4  # the aggregation number of unique_count meters in the core's tables
CORE_CAPACITY_MIN = 1024  # accounts the core's table has room for before it is first rehashed


def new_core(settings: Settings, compiled: CompiledCatalog, accounts: int = 0) -> Any:
    """A core for a catalog, with room for ``accounts`` and some to grow."""
    denominators, meters, rates, plans, modes, free, names, conditions = compiled.core_args()
    capacity = max(CORE_CAPACITY_MIN, accounts + accounts // 8)
    core = core_mod.Core(denominators, meters, rates, settings.core_limits(), capacity, plans, modes, free, names,
                         conditions)
    core.set_window(settings.usage_window_s * 1000)
    core.set_event_times(settings.event_late_max_s * 1000, settings.event_early_max_s * 1000)
    if compiled.pools:
        core.set_pools(list(compiled.pools))
    return core


def remap(settings: Settings, old: Any, was: CompiledCatalog, now: CompiledCatalog) -> Any:
    """A new core with the accounts of ``old`` moved onto another catalog, matching
    credit types, meters and plans by name."""
    new = new_core(settings, now)
    old_ct = {n: i for i, n in enumerate(was.credit_types)}
    old_m = {n: i for i, n in enumerate(was.meter_names)}
    new_plans = {n: i + 1 for i, n in enumerate(now.plan_names)}
    new_meter = {n: k for k, n in enumerate(now.meter_names)}
    for i in range(len(old)):
        cts, use, plan = old.state(i)
        new_cts = []
        for k, name in enumerate(now.credit_types):
            j = old_ct.get(name)
            if j is None:
                new_cts.append((0, 0, 0, 0, 0, INT64_MIN))
                continue
            bal, resv, floor, rem, degr, alert = cts[j]
            # The carried remainder is re-expressed in the new denominator; less than one nano may go.
            rem = rem * now.denominators[k] // was.denominators[j]
            new_cts.append((bal, resv, floor, rem, degr, alert))
        new_use = []
        for k, name in enumerate(now.meter_names):
            j = old_m.get(name)
            same = j is not None and was.precisions[j] == now.precisions[k]
            new_use.append(use[j] if same else 0)
        plan_name = was.plan_names[plan - 1] if plan else ""
        idx = new.open_account(old.customer_id(i))
        new.load_state(idx, new_cts, new_use, new_plans.get(plan_name, 0))
        for k, name in enumerate(now.credit_types):
            if name in old_ct and old.discount(i, old_ct[name]):
                new.set_discount(idx, k, old.discount(i, old_ct[name]))
        for meter, value in old.uniques(i):  # its bytes, or a hash read from an older snapshot
            moved = new_meter.get(was.meter_names[meter])
            if moved is not None and now.meters[moved][4] == UNIQUE_COUNT and new_use[moved]:
                new.add_unique(idx, moved, value)
    new.mark_all_dirty()
    return new


class Recovery:
    def __init__(self, settings: Settings, store: Store, live: Live, journal: Journal, clock: Clock,
                 drains: Drains, snapshots: Snapshots, flusher: Flusher, audit: Any, grants: Grants, holds: Holds,
                 subscriptions: Subscriptions, reports: Reports, housekeeping: Housekeeping,
                 answers: tuple[AnswerStore, AnswerStore], leases: Leases | None = None) -> None:
        self.settings = settings
        self.leases = leases  # ledger mode: the leases held, and the catalog's balances granted centrally
        self.store = store
        self.live = live
        self.journal = journal
        self.clock = clock
        self.drains = drains
        self.snapshots = snapshots
        self.flusher = flusher
        self.audit = audit
        self.grants = grants
        self.holds = holds
        self.subscriptions = subscriptions
        self.reports = reports
        self.housekeeping = housekeeping
        self.idem, self.settled = answers

    def recover(self) -> None:
        """Rebuild all in-memory state from LMDB: snapshot, then log replay."""
        store = self.store
        started = time.perf_counter()
        self.drains.load()
        self.flusher.load()
        current = self.live.catalog.compiled
        stored = store.get("meta", b"catalog")
        was = current if stored is None else CompiledCatalog.from_json(stored)
        was.check()
        accounts = store.count("accounts")
        core = new_core(self.settings, was, accounts)
        store.scan("accounts", core.load_states)
        invariant(len(core) == accounts, f"{accounts} accounts in the snapshot, {len(core)} read back")
        self.journal.snapshot_pos = from_u64(store.get("meta", b"snapshot_pos") or u64(0))
        self.journal.log_pos = self.journal.snapshot_pos
        self.journal.unsubmitted = 0
        replayed = 0
        core.set_dimension_sets_capped(False)  # what was applied once is applied again,
        core.set_event_times(INT64_MAX, INT64_MAX)  # whatever the settings say now
        for key, record in store.items("log", start=u64(self.journal.snapshot_pos + 1)):
            if from_u64(key) != self.journal.log_pos + 1:
                # Only a call that failed after taking a position leaves one (an older meterd did
                # not give positions back); what the log holds is all that was acknowledged.
                log.warning("the log skips from record %d to %d; replaying what it holds", self.journal.log_pos,
                            from_u64(key))
            records.replay(core, record, len(was.plan_names) if was.pools else 0)  # the loose plan is the last
            self.journal.log_pos = from_u64(key)
            replayed += 1
        core.set_dimension_sets_capped(True)
        core.set_event_times(self.settings.event_late_max_s * 1000, self.settings.event_early_max_s * 1000)
        remapped = was != current
        if remapped:
            self.drains.carry(_drained(core.take_usage(), was))  # named by the catalog they were made under
            core = remap(self.settings, core, was, current)
        self.live.core = core
        self._load_state(was, remapped)
        if remapped or replayed or stored is None:
            self._snapshot_after(remapped)
        took = time.perf_counter() - started
        log.info("state recovered: %d accounts, %d log records replayed%s, in %.3fs", len(core), replayed,
                 ", catalog changed and accounts remapped" if remapped else "", took,
                 extra={"recovery_s": round(took, 4)})

    def _snapshot_after(self, remapped: bool) -> None:
        try:
            self.snapshots.write_now(self.subscriptions.renamed)  # subscriptions renumbered with the accounts
        except lmdb.MapFullError:
            if remapped:  # log records of the old catalog must not outlive it
                raise StorageFull("the LMDB map is full: no room to move accounts onto the new catalog; "
                                  "raise map_size_bytes") from None
            # The log still holds everything; the next snapshot will try again.
            self.live.core.mark_all_dirty()
            log.warning("no room for a snapshot after recovery; the LMDB map is full")

    def try_recover(self) -> None:
        """Reload from disk; until that works, the store stays failed and writes are refused."""
        try:
            self.recover()
        except Exception as e:  # noqa: BLE001 - housekeeping retries
            self.journal.broken = e
            log.exception("recovery from disk failed; writes are refused until it succeeds")
            return
        self.journal.broken = None
        self.store.reset()

    async def undo_failed(self) -> None:
        """Whatever failed (a call, a sweep, a catalog reload) and had changed state in
        memory first (log records or answers it never submitted) is undone: its log
        positions are given back, and the state is reloaded from disk once what was
        committed before it has landed; writes are refused meanwhile."""
        if not self.journal.abandon():
            return
        log.error("a change failed after it was applied in memory; reloading state from disk")
        self.journal.reloading = True
        try:
            await self.journal.barrier()
            self.try_recover()
        finally:
            self.journal.reloading = False

    def on_commit_failure(self, exc: BaseException) -> None:
        """A commit failed: everything applied in memory since the last good
        commit is undone by reloading from disk, and callers got the error."""
        log.error("commit failed, reloading state from disk: %s", exc)
        if isinstance(exc, StorageFull):
            self.journal.storage_full = exc
        self.try_recover()

    def _load_state(self, was: CompiledCatalog, remapped: bool) -> None:
        self.reports.load()
        self.idem.load()
        self.settled.load()
        if self.store.get("meta", b"answers_format") is None:
            self._migrate_answers(self.clock.now_ms())
            self.idem.load()
            self.settled.load()
        self.holds.load(was)
        self.grants.load()
        if self.leases is not None:
            self.leases.load()
        self.subscriptions.load(list(was.credit_types) if remapped else None)
        self.grants.index_expiries()
        self.audit.load()
        self.housekeeping.load()

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

    # ---- the catalog's seeds ---------------------------------------------------------

    def seed(self) -> None:
        if self.leases is not None:
            self.leases.seed(self.live.catalog)
        ops = self.seed_ops()
        if ops:
            self.store.write_now(ops)
        self.journal.unsubmitted = 0  # written (before the writer runs)

    def seed_ops(self) -> list[Op]:
        """Give each catalog customer its plan, overdraft and initial balances, once."""
        catalog, subs = self.live.catalog, self.subscriptions
        ops: list[Op] = []
        now = self.clock.now_ms()
        for seed in catalog.customers:
            marker = f"subscribed\x00{seed.customer_id}".encode()
            if seed.plan and self.leases is None and self.store.get("meta", marker) is None \
                    and seed.customer_id not in subs.subs:  # in ledger mode, subscribed centrally
                sub_ops, _ = subs.subscribe_ops(seed.customer_id, seed.plan, now, now)
                ops += sub_ops + [("meta", marker, b"1")]
            if seed.customer_id not in subs.subs:
                for ct in range(len(catalog.credit_types)):
                    ops += subs.floor_ops(seed.customer_id, ct)
            for ct, amount in seed.balances_nano.items() if self.leases is None else ():  # else granted centrally
                marker = f"seeded\x00{seed.customer_id}\x00{catalog.credit_types[ct].name}".encode()
                if amount == 0 or self.store.get("meta", marker) is not None:
                    continue
                grant, _ = self.grants.grant_ops(seed.customer_id, ct, amount, 0, 0, "catalog", "initial balance")
                ops += grant + [("meta", marker, b"1")]
        # A changed catalog may change the floors and thresholds of every subscription's plan.
        for customer_id, sub in subs.subs.items():
            ops += subs.apply_plan_ops(customer_id, catalog.plan_index.get(sub.plan))
        # and a customer's own terms are of credit types by name: one that came back has them again
        for customer_id in list(subs.terms):
            for ct in range(len(catalog.credit_types)):
                if customer_id not in subs.subs and customer_id not in catalog.customer_index:
                    ops += subs.floor_ops(customer_id, ct)
                ops += subs.discount_ops(customer_id, ct)
        return ops

    # ---- catalog reload ---------------------------------------------------------------

    async def reload_catalog(self, new: Catalog) -> None:
        """Switch to a new catalog without a restart, keeping balances.

        Everything before the switch is committed first; the switch itself
        happens with no await in between and is committed as one snapshot
        under the new catalog, so the log never holds records of two catalogs."""
        self.journal.check_writable()
        if self.leases is not None:
            new = new.for_ledger()
        async with self.snapshots.exclusive():  # a snapshot of the old catalog must not land after the switch
            await self.journal.commit_with([])  # a barrier: the writer is FIFO
            self._check_reload(new)
            new.compiled  # noqa: B018 - compiled (and refused, if the core cannot take it) before anything moves
            old = self.live.catalog
            self.drains.carry(_drained(self.live.core.take_usage(), old.compiled))
            self.live.core = remap(self.settings, self.live.core, old.compiled, new.compiled)
            self.live.catalog = new
            self.holds.rename(old, new)
            self.grants.rename(old, new)
            if self.leases is not None:
                self.leases.rename(old, new)
                self.leases.seed(new)  # customers and balances it adds: once centrally, as at a start
            self.grants.index_expiries()
            ops = self.subscriptions.rename([c.name for c in old.credit_types])
            ops += self.seed_ops() + self.snapshots.ops_now()
            pos = self.journal.log_pos
            await self.journal.commit_with(ops)
            self.journal.snapshot_pos = pos
        log.info("catalog reloaded from %s: %d credit types, %d meters, %d plans", new.source,
                 len(new.credit_types), len(new.meters), len(new.plans))

    def _check_reload(self, new: Catalog) -> None:
        """Open reservations and sessions keep the meter and credit type they hold money in."""
        old = self.live.catalog
        if self.leases is not None:
            check_catalog(new)
            for cust, ct in self.leases.held:
                if old.credit_types[ct].name not in new.credit_index:
                    raise ConfigError(f"{new.source}: credit_types: {old.credit_types[ct].name} is leased from the "
                                      f"ledger (customer {cust!r}); it stays while leases of it are held")
        for r in self.holds.reservations.values():
            for m, _ in r.parts():
                if m >= 0 and old.meters[m].name not in new.meter_index:
                    raise ConfigError(f"{new.source}: meters: {old.meters[m].name} has open "
                                      "reservations; settle them before removing it")
        for s in self.holds.sessions.values():
            if old.meters[s.meter].name not in new.meter_index or \
                    old.credit_types[s.credit_type].name not in new.credit_index:
                raise ConfigError(f"{new.source}: meters: {old.meters[s.meter].name} has open sessions")
        for r in self.holds.reservations.values():
            if r.credit_type >= 0 and old.credit_types[r.credit_type].name not in new.credit_index:
                raise ConfigError(f"{new.source}: credit_types: {old.credit_types[r.credit_type].name} "
                                  "has open reservations")
        self._check_held_rates(new)

    def _check_held_rates(self, new: Catalog) -> None:
        """Open holds keep a price in the new catalog, in the credit type they hold money in."""
        old = self.live.catalog
        probe = _fastpath_py.Core(*new.compiled.core_args()[:3], self.settings.core_limits(), 16)
        holds = [("reservations", m, r.credit_type, r.dims, r.dim_value)
                 for r in self.holds.reservations.values() for m, _ in r.parts() if m >= 0 and r.credit_type >= 0]
        holds += [("sessions", s.meter, s.credit_type, bytes.fromhex(s.dims_hex) if s.dims_hex else None,
                   s.dim_value) for s in self.holds.sessions.values()]
        for what, meter, ct, dims, value in holds:
            name = old.meters[meter].name
            m = new.meter_index[name]  # _check_reload made sure it is there
            new_ct = new.credit_index[old.credit_types[ct].name]  # and this
            if validate.rate_of_hold(new, probe, m, new_ct, dims, value) < 0:
                raise ConfigError(f"{new.source}: meters.{name}: has open {what} priced by a row it would no "
                                  "longer have (or in another credit type, or at period end); settle them before "
                                  "changing it")


def _drained(taken: list[tuple], compiled: CompiledCatalog) -> Drained:
    drained = Drained()
    drained.add(taken, compiled)
    return drained
