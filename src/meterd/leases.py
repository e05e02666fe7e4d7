"""Leases: this sidecar's escrow slices of customers' central balances (ledger mode).

With ``balances = "ledger"`` a customer's balance lives in the central ledger
(meterd.escrow) and this sidecar spends only what it has leased of it. The
core holds a lease exactly as it holds a local balance, so the hot paths are
those of local mode; this component moves credit in and out of the core:

- **in**: a lease transaction in the ledger first, then a credit in the core
  (a log record). The ledger answers with the running total it has leased
  here, so a credit lost to a crash or a timeout is made good by the next
  answer;
- **out** (a recall, an idle lease, an expiring grant, shutdown): a debit in
  the core, durable in LMDB first, then the running total given back is sent
  to the ledger (again until it is acknowledged);
- **consumed**: ``leased_in - given_back + borrowed - balance`` per lease,
  written by each snapshot into the outbox and settled by the flush, exactly
  once.

A request the lease cannot cover waits (at most ``lease_wait_ms``) for a top-up,
and for other sidecars to give back what they hold when the ledger has too
little left. A deny while credit sat at another sidecar is a *false deny*,
counted. When the ledger cannot be reached, the leases held keep serving and
the rest is denied: this is money, so it fails closed. A customer with an
*outage allowance* (set in the ledger, learnt with every lease answer) may
spend up to that much beyond this sidecar's lease meanwhile: it is *borrowed*,
durable in LMDB like the running totals, and settled as consumption beyond the
lease, which leaves the lease in debt at the ledger. What comes into the lease
next repays the borrowed credit first (the ledger does the same with the debt),
and what is borrowed and still free is cancelled before anything is given back.
So at no moment does a sidecar spend more than the allowance beyond what the
ledger has leased to it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import hashlib
import heapq
import json
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from meterd import records
from meterd.catalog import AGGREGATIONS, Catalog
from meterd.clock import Clock
from meterd.config import Settings
from meterd.corespec import relax_priority
from meterd.drain import settlement_value
from meterd.errors import ConfigError, Conflict, InvalidInput, LimitReached, MeterdError, NotFound, Unavailable
from meterd.escrow import DEGRADED_WRAP, Escrow, Granted, LeaseGrant
from meterd.flush import Flusher, LedgerLink
from meterd.journal import Journal
from meterd.ledger import Fenced, activity_line, is_pool
from meterd.ledger_plans import CENTRAL_GAUGES, LedgerPlans, unserved
from meterd.metrics import WAIT_BUCKETS_MS
from meterd.records import Kind
from meterd.results import Keyed, LeaseRow, LeaseView
from meterd.state import Live
from meterd.store import Op, Store

T = TypeVar("T")

log = logging.getLogger("meterd.leases")

UNKNOWN_CUSTOMERS_MAX = 10_000   # customers the ledger does not know, remembered for a heartbeat
SHARERS_EVERY = 25               # heartbeats between two counts of the sidecars sharing the ledger
SCAN_PER_HEARTBEAT_MAX = 2_000   # leases looked at for refill, idleness and expiry per heartbeat
POOL_GATHERS_MAX = 3  # tries to gather what is left of a pool of free units (Leases.cover_pool)
LOOKUPS_PER_HEARTBEAT_MAX = 5_000  # lease calls for customers not held here, per heartbeat
LOOKUPS_PER_TENANT_MAX = 1_000   # of them, per tenant (with data-plane tokens)
LEASE_CALL_ASKS_MAX = 64         # leases asked for in one transaction (1-10 ms each in PostgreSQL): its latency
CLOSES_PER_HEARTBEAT_MAX = 2_000  # leases settled and given back at their credits' end, per heartbeat
ROLLS_PER_HEARTBEAT_MAX = 20     # due period rolls a heartbeat sweeps (those whose sidecars never settled)


class Cover(enum.Enum):
    """What a top-up gave: true when the lease covers the request now."""
    COVERED = "covered"
    SHORT = "short"              # the whole balance cannot cover it, or the ledger does not know the customer
    UNAVAILABLE = "unavailable"  # not in time: the ledger away or slow, recalled credit not back yet, limits

    def __bool__(self) -> bool:
        return self is Cover.COVERED


class Held:
    """One lease as this sidecar holds it."""

    __slots__ = ("leased_in", "given_back", "borrowed", "allowance_nano", "sent_back", "expires_at_ms", "unit_nano",
                 "rate_nano_s", "mark_nano", "mark_ms", "used_ms", "central_nano", "elsewhere_nano", "seen_ms",
                 "exhausted_until", "uncertain", "last_size", "acquired_ms", "acquired_consumed", "asked_flush_ms",
                 "fresh", "verified_ms", "lock", "degraded", "plan", "degraded_central", "degraded_settled")

    def __init__(self, leased_in: int = 0, given_back: int = 0, now_ms: int = 0, borrowed: int = 0,
                 allowance_nano: int = 0, degraded: int = 0) -> None:
        self.leased_in = leased_in      # running totals, durable in LMDB ("leases")
        self.given_back = given_back
        self.degraded = degraded        # and of what its plan's fallback served would have cost
        self.borrowed = borrowed        # credited beyond the lease in an outage, not yet repaid or cancelled
        self.allowance_nano = allowance_nano  # the customer's outage allowance, as the ledger last said
        self.sent_back = given_back     # what the ledger has acknowledged of given_back (-1: not known)
        self.expires_at_ms = 0
        self.unit_nano = 1              # the last request that asked for a top-up
        self.rate_nano_s = 0            # recent spend rate here
        self.mark_nano = -1             # consumed at the last look, and when
        self.mark_ms = now_ms
        self.used_ms = now_ms
        self.central_nano = 0           # as the last answer from the ledger said
        self.elsewhere_nano = 0
        self.seen_ms = 0                # when the ledger last answered about it
        self.exhausted_until = 0.0      # monotonic time before which the balance is known to be spent
        # A lease call failed, or this sidecar restarted: the ledger may have leased more than came in here
        # (its answer was lost). The next heartbeat asks (a lease call for nothing) and takes it in.
        self.uncertain = False
        self.last_size = 0              # the last lease's size, and when and at what consumption it was asked
        self.acquired_ms = 0
        self.acquired_consumed = 0
        self.asked_flush_ms = 0         # the flush after which the ledger was asked what it repaid of a debt
        # Made here, not loaded: its running totals go on from the ledger's (a lease this sidecar
        # forgot, or never had), learnt from the first answer.
        self.fresh = False
        self.verified_ms = 0            # when the ledger was last asked whether this lease can be forgotten
        self.lock = asyncio.Lock()
        # The customer's plan in the ledger, the credit period's fallback usage there, and what the
        # ledger has of ``degraded``, as the last answer said: the priority hint of a degraded decision.
        self.plan = ""
        self.degraded_central = 0
        self.degraded_settled = 0

    def consumed(self, balance: int) -> int:
        """What has been spent of the lease, given its balance in the core."""
        return self.leased_in - self.given_back + self.borrowed - balance

    def doc(self) -> bytes:
        return json.dumps({"leased_in": self.leased_in, "given_back": self.given_back, "borrowed": self.borrowed,
                           "allowance_nano": self.allowance_nano, "degraded": self.degraded}).encode()


def check_catalog(catalog: Catalog) -> None:
    """What ledger mode does not serve yet, refused at start and at reload."""
    for m in catalog.meters:
        if m.tiers:
            raise ConfigError(f"meters.{m.name}: tiers are served in local mode only for now: they price by the "
                              "customer's usage this period, and in ledger mode each sidecar counts only its own")
        if AGGREGATIONS[m.aggregation] == "latest":
            raise ConfigError(f"meters.{m.name}: a latest meter is served in local mode only for now: it is charged "
                              "on the period's last value, and in ledger mode the ledger cannot tell which "
                              "sidecar's came last (max and unique_count meters are charged by the ledger)")
    for seed in catalog.customers:
        why = unserved(catalog.plan_index[seed.plan], catalog) if seed.plan else None
        if why is not None:
            raise ConfigError(f"customers.{seed.customer_id}.plan: {why}")
        if any(seed.overdraft_nano.values()):
            raise ConfigError(f"customers.{seed.customer_id}.overdraft: an overdraft is served in local mode only "
                              "for now; in ledger mode grant the spend limit as a balance")


class Leases:
    def __init__(self, settings: Settings, store: Store, live: Live, journal: Journal, clock: Clock,
                 flusher: Flusher) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.journal = journal
        self.clock = clock
        self.flusher = flusher
        self.held: dict[tuple[str, int], Held] = {}
        self.of_customer: dict[str, set[int]] = collections.defaultdict(set)
        self.link = LedgerLink(settings, "meterd-lease")
        self.sharers = 1
        self.unknown: dict[str, float] = {}  # customer -> monotonic time until which the ledger is not asked again
        self.none_of: dict[tuple[str, int], float] = {}  # the same, for a balance a known customer has none of
        self.counts: collections.Counter[str] = collections.Counter()
        self.wait_ms = [0] * (len(WAIT_BUCKETS_MS) + 1)  # sync waits by latency bucket
        self.wait_ms_sum = 0
        self.reachable = False
        self.last_error = ""
        self.seeds: list[tuple[str, str, int]] = []  # catalog balances not yet granted centrally
        self.seed_plans: list[tuple[str, str]] = []  # catalog customers' plans not yet subscribed centrally
        self._beats = 0
        self._scan_from = 0
        self.generation = 0
        self.reconciled = False  # with the ledger's leases of this data directory, since the last start
        self.fenced = False      # the ledger refuses this data directory for good
        # Lease calls for the next transaction: customer, credit type name, lease, need, want, the
        # caller's future, and the generation of the state it was asked for.
        # (and whether a request waits for it: those go first).
        self._asking: list[tuple[str, str, Held, int, int, asyncio.Future, int, bool]] = []
        self._sender: asyncio.Future | None = None
        self._refills: set[asyncio.Future] = set()  # background refills in flight
        self.lookups = 0         # first lease calls for customers not held here, since the last heartbeat
        self.lookups_of: collections.Counter[str] = collections.Counter()  # of them, by tenant label
        self._acknowledged: list[tuple[str, str, int]] = []  # changed allowances taken in, to tell the ledger
        # (when, customer, credit type): leases whose soonest credit ends then (a plan's period, a
        # grant's expiry), soonest first: each is settled and given back at that moment.
        self._ending: list[tuple[int, str, int]] = []
        self._settled_at_end: set[str] = set()  # customers a lease was settled for at its end: a roll may be due
        self._on_demand: dict[str, float] = {}  # customer -> monotonic time before which no roll is asked on demand
        self.clock_offset_ms = 0  # this sidecar's clock less the ledger's, as last measured
        self.skewed = False       # further off than lease_clock_skew_max_ms: no leased credit is spent
        # Pools of free units (Catalog.for_ledger) found spent everywhere this credit period, by customer
        # (at most UNKNOWN_CUSTOMERS_MAX customers; one forgotten is found spent again at its next event).
        self.spent: dict[str, tuple[int, set[int]]] = {}  # customer -> (its credit period's end, pools)

    # ---- state ------------------------------------------------------------------------

    def load(self) -> None:
        self.generation += 1  # counts loads from disk: a figure read before one may not be durable
        self.reconciled = False
        names = self.live.catalog.credit_index
        self.held, self.of_customer = {}, collections.defaultdict(set)
        now = self.clock.now_ms()
        for key, value in self.store.items("leases"):
            cust, ct_name = key.decode().split("\x00")
            ct = names.get(ct_name)
            if ct is None:
                continue
            doc = json.loads(value)
            h = self.held[(cust, ct)] = Held(doc["leased_in"], doc["given_back"], now, doc.get("borrowed", 0),
                                             doc.get("allowance_nano", 0), doc.get("degraded", 0))
            # Sent again at the next heartbeat: the ledger may not have heard of the last one.
            h.sent_back = -1 if h.given_back else 0
            h.uncertain = True
            self.of_customer[cust].add(ct)

    def rename(self, old: Catalog, new: Catalog) -> None:
        """A catalog reload: the leases move to the new catalog's credit type numbers (check_reload
        has refused a catalog without a credit type that is leased)."""
        self.held = {(cust, new.credit_index[old.credit_types[ct].name]): h for (cust, ct), h in self.held.items()}
        self.of_customer = collections.defaultdict(set)
        for cust, ct in self.held:
            self.of_customer[cust].add(ct)
        self._ending = [(h.expires_at_ms, cust, ct) for (cust, ct), h in self.held.items() if h.expires_at_ms]
        heapq.heapify(self._ending)

    def seed(self, catalog: Catalog) -> None:
        """The catalog's initial balances, granted once centrally (by key) whichever sidecar starts first."""
        self.seeds = [(seed.customer_id, catalog.credit_types[ct].name, amount)
                      for seed in catalog.customers for ct, amount in seed.balances_nano.items() if amount > 0]
        self.seed_plans = [(seed.customer_id, seed.plan) for seed in catalog.customers if seed.plan]

    def _key(self, customer_id: str, ct: int) -> bytes:
        return f"{customer_id}\x00{self.live.catalog.credit_types[ct].name}".encode()

    def _held(self, customer_id: str, ct: int) -> Held | None:
        h = self.held.get((customer_id, ct))
        if h is None and len(self.held) < self.settings.leases_max:
            h = self.held[(customer_id, ct)] = Held(now_ms=self.clock.now_ms())
            h.fresh = True
            self.of_customer[customer_id].add(ct)
        return h

    def available(self, customer_id: str, ct: int) -> int:
        """What the core can spend of the customer's lease now."""
        core = self.live.core
        idx = core.account(customer_id.encode())
        return core.available(idx, ct) if idx >= 0 else 0

    def _opened(self, customer_id: str) -> bool:
        """The customer has an account in the core (a lease answer of the ledger's opened it)."""
        return self.live.core.account(customer_id.encode()) >= 0

    def _balance(self, customer_id: str, ct: int) -> int:
        """The lease's balance in the core: what it has free and on hold."""
        core = self.live.core
        idx = core.account(customer_id.encode())
        return core.state(idx)[0][ct][0] if idx >= 0 else 0

    def _consumed(self, h: Held, customer_id: str, ct: int) -> int:
        return h.consumed(self._balance(customer_id, ct))

    def _move_ops(self, customer_id: str, ct: int, h: Held, leased: int = 0, given: int = 0,
                  borrowed: int = 0) -> list[Op]:
        """Move the lease's running totals (and borrowed credit), and credit or debit the core by
        what that brings or takes: a log record and the totals, in one commit."""
        amount = leased - given + borrowed
        h.leased_in += leased
        h.given_back += given
        h.borrowed += borrowed
        ops: list[Op] = []
        if amount or not self._opened(customer_id):  # a customer the ledger knows, with nothing leased yet, too
            core = self.live.core
            cust = customer_id.encode()
            core.credit(core.open_account(cust), ct, amount)
            ops.append(self.journal.log_op(records.account(Kind.CREDIT, cust, ct, amount, self.clock.now_ms())))
        return ops + [("leases", self._key(customer_id, ct), h.doc())]

    def _give_ops(self, customer_id: str, ct: int, h: Held, amount: int | None = None) -> tuple[list[Op], int]:
        """Take the lease's free credit out of the core: what is borrowed is cancelled first (the
        ledger never had it), then up to ``amount`` (default: all the rest) is given back.
        Returns the ops ([] for nothing) and what is given back."""
        free = self.available(customer_id, ct)
        cancel = max(min(free, h.borrowed), 0)
        given = max(free - cancel if amount is None else min(amount, free - cancel), 0)
        return (self._move_ops(customer_id, ct, h, given=given, borrowed=-cancel) if given or cancel else []), given

    def settling(self, dirty: list[int]) -> list[bytes]:
        """For a snapshot: the outbox rows of what the changed accounts have consumed of their leases."""
        core, names = self.live.core, self.live.catalog.credit_types
        out = []
        for idx in dirty:
            cust = core.customer_id(idx).decode()
            cts = self.of_customer.get(cust)
            if not cts:
                continue
            state = core.state(idx)[0]
            for ct in sorted(cts):
                h = self.held[(cust, ct)]
                out.append(settlement_value(cust, names[ct].name, h.consumed(state[ct][0]), h.degraded))
        return out

    def view(self, customer_id: str, ct: int) -> LeaseView | None:
        """What this sidecar knows of a customer's central balance (None: it holds no lease of it)."""
        h = self.held.get((customer_id, ct))
        if h is None:
            return None
        return LeaseView(self._balance(customer_id, ct), h.central_nano, h.elsewhere_nano, h.seen_ms,
                         self.flusher.last_flush_ms)

    def rows(self, limit: int) -> list[LeaseRow]:
        """The leases held, for GetLedgerStatus: the first ``limit`` by customer."""
        names = self.live.catalog.credit_types
        out = []
        for (cust, ct) in sorted(self.held)[:limit]:
            h = self.held[(cust, ct)]
            out.append(LeaseRow(cust, names[ct].name, self._balance(cust, ct), self.available(cust, ct), h.leased_in,
                                h.given_back, h.expires_at_ms, h.rate_nano_s, h.borrowed, h.allowance_nano))
        return out

    # ---- a plan's fallback -------------------------------------------------------------
    # A customer's account sits on no plan in the core here (plan 0: its twin without a fallback),
    # so that what its lease cannot cover is denied and the lease is topped up. Only what no top-up
    # covers is served in the fallback mode: applied again with the account on its plan for that
    # call alone, between two PLAN log records, so that a replay does the same.

    def fallback(self, customer_id: str, ct: int) -> tuple[int, str, int] | None:
        """The customer's plan (its index in the core), as the ledger last said, when it has a
        fallback mode for the credit type: with the mode and the priority hint of the customer's
        degraded usage this credit period: the ledger's sum (other sidecars' lags by their flush and
        this sidecar's next lease answer) and what this sidecar has not settled of it. None: no
        fallback (denied)."""
        h = self.held.get((customer_id, ct))
        plan = self.live.catalog.plan_index.get(h.plan) if h is not None and h.plan else None
        policy = plan.credits.get(ct) if plan is not None else None
        if h is None or plan is None or policy is None or not policy.fallback:
            return None
        degraded = h.degraded_central + (h.degraded - h.degraded_settled) % DEGRADED_WRAP
        return plan.index, policy.fallback, relax_priority(degraded, policy.priority_step_nano)

    def degrade(self, leases: set[tuple[str, int]], apply: Callable[[], T],
                loose: Iterable[str] = ()) -> tuple[T, Callable[[list[bytes]], list[Op]]]:
        """``apply`` (the core's application of denied requests again) with the accounts of the
        customers whose leases (customer, credit type) have a fallback on their plans: what their
        balances cannot cover is served degraded; and of the ``loose`` customers (a pool of free
        units spent everywhere) on the catalog's loose plan, unless on those: priced past their
        pools. Returns its result, and what makes the ops of the log records the caller writes of
        it: between the PLAN records, then the leases' totals."""
        core, at = self.live.core, self.clock.now_ms()
        plans: dict[str, int] = {c: self.live.catalog.loose_plan for c in loose}
        for customer_id, ct in sorted(leases):
            fb = self.fallback(customer_id, ct)
            if fb is not None:
                plans[customer_id] = fb[0]
        idx = {c: core.open_account(c.encode()) for c in plans}
        was = {c: core.state(i)[2] for c, i in idx.items()}  # plan 0, or the loose plan (_plan_ops)
        watched = [(c, ct) for c in plans for ct in sorted(self.of_customer.get(c, ()))]
        before = [core.state(idx[c])[0][ct][4] for c, ct in watched]
        for c, p in plans.items():
            core.set_plan(idx[c], p)
        try:
            out = apply()
        finally:
            for c in plans:
                core.set_plan(idx[c], was[c])
        docs: list[Op] = []
        for (c, ct), b in zip(watched, before, strict=True):
            delta = core.state(idx[c])[0][ct][4] - b
            if delta > 0:
                h = self.held[(c, ct)]
                h.degraded = (h.degraded + delta) % DEGRADED_WRAP  # settled with the consumption
                docs.append(("leases", self._key(c, ct), h.doc()))
                self.counts["degraded"] += 1

        def ops(logged: list[bytes]) -> list[Op]:
            log = self.journal.log_op
            return [log(records.account(Kind.PLAN, c.encode(), 0, p, at)) for c, p in plans.items()] + \
                [log(r) for r in logged] + \
                [log(records.account(Kind.PLAN, c.encode(), 0, was[c], at)) for c in plans] + docs
        return out, ops

    # ---- the ledger's side ------------------------------------------------------------

    async def _escrow(self, method: str, *args: Any, plans: bool = False) -> Any:
        """A call of Escrow's (or, with ``plans``, of LedgerPlans') on the ledger link."""
        catalog = self.live.catalog

        def call(ledger: Any) -> Any:
            return getattr(LedgerPlans(Escrow(ledger), catalog) if plans else Escrow(ledger), method)(*args)
        try:
            out = await self.link.call(call)
        except Fenced as e:
            self.reachable = True
            self.last_error = str(e)
            self._void()
            raise
        except MeterdError as e:
            self.reachable = True  # it answered: the refusal is the caller's
            self.last_error = str(e)
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the ledger: fail closed
            self.reachable = False
            self.last_error = f"{type(e).__name__}: {str(e).strip()[:300]}" if str(e) else "the ledger did not answer"
            self.counts["ledger_failures"] += 1
            raise
        self.reachable = True
        return out

    def _void(self) -> None:
        """The ledger refuses this data directory for good (replaced under its id, or released by an
        operator) and has taken its leases back: nothing more is spent from them here."""
        if not self.fenced:
            log.error("the ledger refuses this sidecar (%s): its leases are void, and requests they would have "
                      "covered are denied", self.last_error)
        self.fenced = True
        ops: list[Op] = []
        for (customer_id, ct), h in self.held.items():
            ops += self._give_ops(customer_id, ct, h)[0]
            h.sent_back = h.given_back  # the ledger has it back already
        if ops:
            self.journal.submit_ahead(ops)

    def _ids(self) -> tuple[str, str]:
        return self.flusher.sidecar_id, self.flusher.incarnation

    async def _acquire(self, customer_id: str, ct: int, h: Held, need: int, want: int,
                       waiting: bool = False) -> LeaseGrant:
        """A lease transaction for one customer's credit type, and the credit it brings (by the
        ledger's running total). Calls made while one is in flight go together in the next
        transaction (``Escrow.acquire_many``), as commits do in LMDB: a batch with denials of
        many customers costs one round trip, not one each."""
        h.uncertain = True  # until an answer is in
        fut: asyncio.Future[LeaseGrant] = asyncio.get_running_loop().create_future()
        # By credit type name, and with the generation of the state it is for: a catalog reload
        # renumbers credit types, and a reload from disk makes new leases, meanwhile.
        ask = (customer_id, self.live.catalog.credit_types[ct].name, h, need, want, fut, self.generation)
        if waiting:  # a request waits for it: ahead of the background's refills
            self._asking.insert(sum(1 for a in self._asking if a[7]), ask + (True,))
        else:
            self._asking.append(ask + (False,))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_asks())
        return await fut

    def _hurry(self, h: Held) -> None:
        """A request waits on a lease whose refill is queued: that ask goes ahead of the others."""
        for i, ask in enumerate(self._asking):
            if ask[2] is h and not ask[7]:
                del self._asking[i]
                self._asking.insert(sum(1 for a in self._asking if a[7]), ask[:7] + (True,))
                return

    async def _send_asks(self) -> None:
        while self._asking:
            batch: list[tuple[str, str, Held, int, int, asyncio.Future, int, bool]] = []
            later, keys = [], set()
            for ask in self._asking:
                if ask[5].done():  # its caller stopped waiting: not sent (the lease stays uncertain: harmless)
                    continue
                if (ask[0], ask[1]) in keys or len(batch) >= LEASE_CALL_ASKS_MAX:
                    later.append(ask)  # one ask per lease in a transaction; the next one goes after
                else:
                    keys.add((ask[0], ask[1]))
                    batch.append(ask)
            self._asking = later
            if not batch:
                continue
            wants = [(c, name, need, want) for c, name, _, need, want, *_ in batch]
            try:
                grants = await self._escrow("acquire_many", *self._ids(), wants, self.sharers, self.clock.now_ms())
            except BaseException as e:  # noqa: BLE001 - every waiter hears of it; the leases stay uncertain
                for ask in batch:
                    fut = ask[5]
                    if not fut.done():
                        fut.set_exception(e)
                        fut.exception()  # retrieved: a waiter that timed out does not leave it unread
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            ops: list[Op] = []
            names = self.live.catalog.credit_index
            for (customer_id, name, h, _, _, fut, generation, _), g in zip(batch, grants, strict=True):
                ct = names.get(name)
                # Whether or not its caller still waits. Not for state reloaded from disk meanwhile: that
                # made new leases, which ask again (they are uncertain) and take in the same running total.
                if ct is not None and generation == self.generation and self.held.get((customer_id, ct)) is h:
                    ops += self._took(customer_id, ct, h, g)
                if not fut.done():
                    fut.set_result(g)
            if ops:
                self.journal.submit_ahead(ops)

    def _took(self, customer_id: str, ct: int, h: Held, g: LeaseGrant) -> list[Op]:
        """What a lease answer brings: the credit the ledger has moved here and this sidecar has not had."""
        h.uncertain = False
        self.counts["acquisitions"] += 1
        if not g.known:
            return []
        allowance_changed = g.allowance_nano != h.allowance_nano
        h.allowance_nano = g.allowance_nano
        if h.fresh:
            # The first answer for a lease made here: what this sidecar had of it before (forgotten
            # once all was settled and given back) is what the ledger has as given back and consumed.
            # Whatever it holds now, answers lost meanwhile included, comes in below.
            h.fresh = False
            h.leased_in = h.sent_back = h.given_back = g.returned_total_nano
            h.leased_in += g.consumed_total_nano
            h.degraded = g.degraded_total_nano
        # A lease of a customer on a plan ends (is settled, with what it served in the fallback mode)
        # at the credit period's end too, even when it holds nothing of its credits.
        end = min((e for e in (g.expires_at_ms, g.period_end_ms) if e), default=0)
        if end and end != h.expires_at_ms and end > self.clock.now_ms():
            heapq.heappush(self._ending, (end, customer_id, ct))
        h.expires_at_ms, h.elsewhere_nano = end, g.elsewhere_nano
        h.central_nano = g.available_nano - g.headroom_nano  # as a balance: a plan's overage allowance is none
        plan_was = h.plan if h.seen_ms else None
        h.plan, h.degraded_central, h.degraded_settled = g.plan, g.degraded_nano, g.degraded_total_nano
        h.seen_ms = self.clock.now_ms()
        out = self._took_in(customer_id, ct, h, g, allowance_changed)
        if not self.live.catalog.pools or g.plan == plan_was:
            return out
        if plan_was is not None:
            self.spent.pop(customer_id, None)  # another plan: its pools are not known to be spent
        return out + self._plan_ops(customer_id)  # after the credit is in (the account may be opened by it)

    def _took_in(self, customer_id: str, ct: int, h: Held, g: LeaseGrant, allowance_changed: bool) -> list[Op]:
        if g.granted_nano:
            h.last_size = g.granted_nano
        if g.recalled:
            self.counts["recalls_asked"] += g.recalled
        arrived = g.leased_total_nano - h.leased_in
        if arrived <= 0 and not self._opened(customer_id):  # known, nothing leased: free events are served
            return self._move_ops(customer_id, ct, h)
        if arrived <= 0:
            return [("leases", self._key(customer_id, ct), h.doc())] if allowance_changed else []
        self.counts["leased_nano"] += arrived  # this call's grant, and any an earlier answer never brought
        repaid = min(arrived, h.borrowed)  # credit borrowed in an outage is now the ledger's: repaid first
        if self.skewed:  # asked before the clock was found off: taken in and given back (at the next heartbeat)
            return self._move_ops(customer_id, ct, h, leased=arrived, given=arrived - repaid, borrowed=-repaid)
        return self._move_ops(customer_id, ct, h, leased=arrived, borrowed=-repaid)

    def _want(self, h: Held, cost: int, ran_out: bool = False) -> int:
        """The spend rate here times the refill horizon. A lease that ran out (a request waits) was too
        small for the rate as measured: at least twice the last one. A new lease: room for
        lease_requests_min requests like the one that asks."""
        want = int(h.rate_nano_s * self.settings.lease_refill_horizon_s)
        if ran_out and h.last_size:
            want = max(want, 2 * h.last_size)
        return max(want, cost * (self.settings.lease_requests_min if not h.rate_nano_s else 1))

    def _rate_at_top_up(self, h: Held, customer_id: str, ct: int) -> None:
        """A top-up tells the spend rate since the last one, long before the heartbeat's look would."""
        now, consumed = self.clock.now_ms(), self._consumed(h, customer_id, ct)
        if h.acquired_ms and now > h.acquired_ms:
            h.rate_nano_s = max(h.rate_nano_s, (consumed - h.acquired_consumed) * 1000 // (now - h.acquired_ms))
        h.acquired_ms, h.acquired_consumed = now, consumed

    async def cover(self, customer_id: str, ct: int, cost: int, label: str = "") -> Cover:
        """A request of ``cost`` that the lease cannot cover: top it up, waiting for
        recalled credit at most ``lease_wait_ms``. True when the lease now covers it.
        ``label``: the calling tenant's (with data-plane tokens), whose share of lookups it uses."""
        started = self.clock.monotonic()
        if self.unknown.get(customer_id, 0.0) > started or self.none_of.get((customer_id, ct), 0.0) > started:
            return Cover.SHORT
        if self.fenced or self.journal.closing:
            return Cover.UNAVAILABLE
        if self.skewed:
            self.counts["denied_clock_skew"] += 1
            return Cover.UNAVAILABLE
        h = self.held.get((customer_id, ct))
        if h is None:
            # A customer not held here costs a lease call: at most so many per heartbeat (and per
            # tenant), so that made-up customer ids cannot keep the ledger, or the other tenants, waiting.
            if self.lookups >= LOOKUPS_PER_HEARTBEAT_MAX or (label and
                                                             self.lookups_of[label] >= LOOKUPS_PER_TENANT_MAX):
                self.counts["lookups_limited"] += 1
                return Cover.UNAVAILABLE
            self.lookups += 1
            if label:
                self.lookups_of[label] += 1
            h = self._held(customer_id, ct)
            if h is None:
                self.counts["leases_full"] += 1
                return Cover.UNAVAILABLE
        h.unit_nano = max(cost, 1)
        deadline = started + self.settings.lease_wait_ms / 1000
        if h.lock.locked():
            self._hurry(h)
        try:  # one top-up per lease at a time; the others then find it covered (or time out waiting)
            await asyncio.wait_for(h.lock.acquire(), max(deadline - self.clock.monotonic(), 0.001))
        except asyncio.TimeoutError:
            if not self.reachable and self._borrow(customer_id, ct, h, cost):
                return Cover.COVERED
            self.counts["denied_busy"] += 1
            return Cover.UNAVAILABLE
        try:
            if self.held.get((customer_id, ct)) is not h:
                forgotten = True  # while this waited: an unknown customer, or an idle lease forgotten
            else:
                forgotten = False
                covered = await self._cover(customer_id, ct, h, cost, started, deadline)
        finally:
            h.lock.release()
        if forgotten:  # asked again: a customer the ledger does not know is remembered so, and refused at once
            return await self.cover(customer_id, ct, cost, label)
        if covered:
            waited = int((self.clock.monotonic() - started) * 1000)
            self.counts["sync_waits"] += 1
            self.wait_ms_sum += waited
            self.wait_ms[next((i for i, b in enumerate(WAIT_BUCKETS_MS) if waited <= b), len(WAIT_BUCKETS_MS))] += 1
        return covered

    async def cover_pool(self, customer_id: str, ct: int, units: int, label: str = "") -> tuple[Cover, bool]:
        """A plan's free units of a meter (a pool credit type, ``Catalog.for_ledger``) that events of
        ``units`` need: topped up as credit is. When the whole pool cannot cover them, all that is
        left of it everywhere is gathered here (other sidecars' leases of it recalled), so that the
        events take it first and are priced for the rest, as on one sidecar. Returns how it went and
        whether the pool is short (then the account is priced past it: Reports, the loose plan)."""
        covered = await self.cover(customer_id, ct, units, label)
        for _ in range(POOL_GATHERS_MAX):
            if covered is not Cover.SHORT:
                return covered, False
            if customer_id not in self.of_customer:
                # No lease of the customer here, so not known to exist: its credit's cover says (a customer
                # the ledger does not know is denied as such, not priced past a pool).
                return covered, False
            h = self.held.get((customer_id, ct))
            have = self.available(customer_id, ct)
            rest = (h.central_nano + h.elsewhere_nano) if h is not None else 0
            if rest <= 0:
                if have <= 0:
                    self._spent(customer_id, ct)
                return Cover.COVERED, True  # all there is of it, here
            if h is not None:
                h.exhausted_until = 0.0  # short of ``units``, not of what the ledger said is left
            covered = await self.cover(customer_id, ct, have + rest, label)
            if covered is Cover.COVERED:
                return covered, True
        return Cover.UNAVAILABLE, False  # spent elsewhere as fast as it was gathered: asked again later

    async def _cover(self, customer_id: str, ct: int, h: Held, cost: int, started: float, deadline: float) -> Cover:
        poll = self.settings.lease_heartbeat_ms / 4000
        while True:
            have = self.available(customer_id, ct)
            if have >= cost and (cost or self._opened(customer_id)):  # free: the ledger must know the customer
                return Cover.COVERED
            if h.exhausted_until > self.clock.monotonic() and not await self._roll_on_demand(customer_id, ct, h):
                return Cover.SHORT
            self._rate_at_top_up(h, customer_id, ct)
            try:  # what is borrowed is repaid first out of what comes in: asked for on top
                g = await asyncio.wait_for(self._acquire(customer_id, ct, h, cost - have + h.borrowed,
                                                         self._want(h, cost, True) + h.borrowed, waiting=True),
                                           max(deadline - self.clock.monotonic(), 0.001))
            except Exception:  # noqa: BLE001 - the ledger is away or slow: fail closed, or borrow within the allowance
                if self._borrow(customer_id, ct, h, cost):
                    return Cover.COVERED
                self.counts["denied_ledger_away"] += 1
                return Cover.UNAVAILABLE
            if not g.known:
                if is_pool(self.live.catalog.credit_types[ct].name):  # the customer's plan gives no free units of it
                    self._forget_unknown(customer_id, ct, known=True)
                    return Cover.SHORT
                self._forget_unknown(customer_id, ct)
                return Cover.SHORT
            have = self.available(customer_id, ct)
            if have >= cost and (cost or self._opened(customer_id)):
                return Cover.COVERED
            if have + g.available_nano + g.elsewhere_nano < cost:  # the whole balance cannot cover it
                if await self._roll_on_demand(customer_id, ct, h):
                    continue  # the customer's next period began: its credits are there to lease
                h.exhausted_until = self.clock.monotonic() + self.settings.lease_heartbeat_ms / 1000
                self.counts["denied_exhausted"] += 1
                return Cover.SHORT
            if self.clock.monotonic() + poll >= deadline:
                self.counts["false_denies"] += 1  # credit was left at other sidecars' leases
                return Cover.UNAVAILABLE
            await self.clock.sleep(poll)  # recalled leases come back at their sidecars' next heartbeat

    async def _roll_on_demand(self, customer_id: str, ct: int, h: Held) -> bool:
        """A request the whole balance cannot cover, past the end of this lease's credits (a plan's
        period that ended): the lease is settled now, not at the next heartbeat, and the period
        rolled if no other sidecar still holds its credits unsettled. True when the ledger is to be
        asked again: it was rolled, by this call or another sidecar's (what this sidecar knew of the
        spent balance is of the ended period). At most once per customer per heartbeat."""
        now = self.clock.now_ms()
        if not self.live.catalog.plan_index or not h.expires_at_ms or h.expires_at_ms > now or \
                self._on_demand.get(customer_id, 0.0) > self.clock.monotonic():
            return False
        if len(self._on_demand) >= UNKNOWN_CUSTOMERS_MAX:
            self._on_demand.pop(next(iter(self._on_demand)))
        self._on_demand[customer_id] = self.clock.monotonic() + self.settings.lease_heartbeat_ms / 1000
        try:
            await self._close(customer_id, ct, h)
            periods = await self._escrow("roll", customer_id, now, plans=True)
        except Exception:  # noqa: BLE001 - the ledger away: the heartbeat closes and rolls it later
            return False
        self._rolled(customer_id, periods)
        h.exhausted_until = 0.0
        return True

    def _borrow(self, customer_id: str, ct: int, h: Held, cost: int) -> bool:
        """The ledger did not answer in time: credit the core with what the request lacks, if the
        customer's outage allowance has that much room left here (durable before the answer:
        the request's own record commits after it)."""
        if self.held.get((customer_id, ct)) is not h or h.fresh:
            # A reload (of the catalog, or from disk) while the top-up waited: not this lease now. A
            # fresh lease has no running totals yet (its first answer brings them): nothing to borrow on.
            return False
        short = cost - self.available(customer_id, ct)
        if short <= 0:
            return True
        # Not while a give-back is unacknowledged: the ledger could settle the borrowed spending
        # before that give-back arrives, and find the lease holding less than it gives back.
        if self.fenced or h.sent_back != h.given_back or h.borrowed + short > h.allowance_nano:
            return False
        self.journal.submit_ahead(self._move_ops(customer_id, ct, h, borrowed=short))
        self.counts["borrows"] += 1
        self.counts["borrowed_nano"] += short
        return True

    def _forget_unknown(self, customer_id: str, ct: int, known: bool = False) -> None:
        """A lease of a balance the ledger does not have: forgotten, and the customer not asked about
        again for a heartbeat (with ``known``, a customer without that balance: only that balance)."""
        h = self.held.get((customer_id, ct))
        if h is not None and not h.leased_in:
            del self.held[(customer_id, ct)]
            self.of_customer[customer_id].discard(ct)
            if not self.of_customer[customer_id]:
                del self.of_customer[customer_id]
        if known:
            if len(self.none_of) >= UNKNOWN_CUSTOMERS_MAX:
                self.none_of.pop(next(iter(self.none_of)))
            self.none_of[(customer_id, ct)] = self.clock.monotonic() + self.settings.lease_heartbeat_ms / 1000
            return
        if len(self.unknown) >= UNKNOWN_CUSTOMERS_MAX:
            self.unknown.pop(next(iter(self.unknown)))
        self.unknown[customer_id] = self.clock.monotonic() + self.settings.lease_heartbeat_ms / 1000

    async def give_back(self, customer_id: str, ct: int, amount: int | None = None, settle: bool = False) -> int:
        """Give back ``amount`` (default: all the lease has free), durable here before the
        ledger hears of it. With ``settle`` (a recall), what was consumed comes along."""
        h = self.held.get((customer_id, ct))
        if h is None:
            return 0
        generation = self.generation
        consumed = self._consumed(h, customer_id, ct)  # as of now: durable once what follows has landed
        ops, amount = self._give_ops(customer_id, ct, h, amount)
        if ops:
            await self.journal.commit_with(ops)
        elif settle:
            await self.journal.barrier()
        durable = settle and generation == self.generation  # no reload from disk meanwhile
        await self._send_back(customer_id, ct, h, consumed if durable else None, h.degraded if durable else -1)
        return max(amount, 0)

    async def _send_back(self, customer_id: str, ct: int, h: Held, consumed: int | None = None,
                         degraded: int = -1) -> None:
        if h.sent_back == h.given_back and consumed is None:
            return
        total = h.given_back
        moved = await self._escrow("give_back", *self._ids(), customer_id, self.live.catalog.credit_types[ct].name,
                                   total, self._ledger_ms(), consumed, degraded)
        h.sent_back = total
        self.counts["returned_nano"] += moved

    # ---- the background -----------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Every lease_heartbeat_ms: the heartbeat (answer recalls, grant the catalog's seeds),
        and, on a loop of its own so that a ledger slow to answer does not hold it up, a look
        after a slice of the leases (refill, idle, expiry, what is owed back)."""
        await asyncio.gather(self._every(stop, self._heartbeat), self._every(stop, self._look_after))

    async def _every(self, stop: asyncio.Event, work: Any) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), timeout=self.settings.lease_heartbeat_ms / 1000)
            except asyncio.TimeoutError:
                pass
            if stop.is_set() or self.journal.closing or self.journal.broken is not None:
                return
            try:
                await work()
            except Exception as e:  # noqa: BLE001 - the ledger may fail in any way; keep serving the leases held
                if self.counts["ledger_failures"] <= 1 or self.counts["ledger_failures"] % 100 == 0:
                    log.warning("lease heartbeat failed: %s", e)

    async def beat(self) -> None:
        """One heartbeat and one look after the leases (tests call it to move time on)."""
        await self._heartbeat()
        await self._look_after()

    def _ledger_ms(self) -> int:
        """The ledger's time, as this sidecar best knows it: its own clock, less the offset measured
        when that is further off than allowed (what it then still tells the ledger is at its time)."""
        return self.clock.now_ms() - (self.clock_offset_ms if self.skewed else 0)

    async def _check_clock(self) -> None:
        """This sidecar's clock against the ledger's, at each heartbeat (lease_clock_skew_max_ms).
        Further off, it takes every lease's free credit out of its core and gives it back (at the
        ledger's time), takes in nothing more, and makes no other lease or control-plane call: its
        leases' ends, the ledger's expiry of credits and its period rolls would be off by as much.
        A slow answer still tells: the offset lies between the clock before the call and after it,
        less the ledger's time (taken in between); it decides once that span is on one side."""
        skew_max = self.settings.lease_clock_skew_max_ms
        if not skew_max or not self.clock.wall:
            return
        before = self.clock.now_ms()
        try:
            ledger_ms = await self.link.call(lambda ledger: ledger.now_ms())
        except Exception:  # noqa: BLE001 - the ledger away: the heartbeat's own call says so; the last check stands
            return
        after = self.clock.now_ms()
        low, high = before - ledger_ms, after - ledger_ms
        self.clock_offset_ms = (low + high) // 2
        self.counts["clock_checks"] += 1
        if low > skew_max or high < -skew_max:
            skewed = True
        elif -skew_max <= low and high <= skew_max:
            skewed = False
        else:
            return  # too slow an answer to tell: the last one stands
        if skewed and not self.skewed:
            log.error("this sidecar's clock is %+d ms off the ledger's (at most %d allowed): it spends no leased "
                      "credit until its clock is right", self.clock_offset_ms, skew_max)
        elif self.skewed and not skewed:
            self.last_error = ""
            log.warning("this sidecar's clock is back within %d ms of the ledger's (%+d ms): leases are served again",
                        skew_max, self.clock_offset_ms)
        found = skewed and not self.skewed
        self.skewed = skewed
        if skewed:
            self.counts["clock_skewed_beats"] += 1
            self.last_error = f"this sidecar's clock is {self.clock_offset_ms:+d} ms off the ledger's " \
                              f"(lease_clock_skew_max_ms={skew_max}): no leased credit is spent"
            await self._give_all_back(settle=found)

    async def _give_all_back(self, settle: bool) -> None:
        """While this sidecar's clock is off: every lease's free credit out of the core, and given
        back (with what it consumed, when the clock is found off: so that other sidecars, and
        period rolls, need not wait for it); at later heartbeats, what is still to be told."""
        ops: list[Op] = []
        for (customer_id, ct), h in self.held.items():  # at once, top-ups in flight or not
            ops += self._give_ops(customer_id, ct, h)[0]
        if ops:
            self.journal.submit_ahead(ops)
        for (customer_id, ct), h in list(self.held.items()):
            if h.lock.locked() or not (settle or h.sent_back != h.given_back):
                continue  # a top-up in flight (its answer is given back too): told at the next heartbeat
            async with h.lock:
                await self.give_back(customer_id, ct, settle=settle)

    async def _heartbeat(self) -> None:
        await self._check_clock()
        if self.skewed:
            return
        self._beats += 1
        self.lookups = 0
        self.lookups_of.clear()
        count = self._beats % SHARERS_EVERY == 1
        acknowledged = self._acknowledged
        hb = await self._escrow("heartbeat", *self._ids(), self.clock.now_ms(), count,
                                int(self.settings.lease_idle_s * 1000), acknowledged)
        told = set(acknowledged)
        self._acknowledged = [a for a in self._acknowledged if a not in told]
        await self._take_allowances(hb.allowances)
        if not self.reconciled:
            await self._reconcile()
        if count:
            self.sharers = max(hb.sharers, 1)
        names = self.live.catalog.credit_index
        for cust, ct_name in hb.recalls:
            ct = names.get(ct_name)
            if ct is not None:
                self.counts["recalls_answered"] += 1
                await self.give_back(cust, ct, settle=True)
        await self._close_ended()
        while self.seeds:
            cust, ct_name, amount = self.seeds[0]
            try:
                await self._escrow("grant", cust, ct_name, amount, 0, 0, "catalog", "initial balance",
                                   self.clock.now_ms(), _central_key("seed", cust, ct_name), str(amount))
            except (InvalidInput, LimitReached) as e:  # granted once already, of another amount (a catalog
                # changed since: as local mode, not again), or refused: said, and not asked again at each heartbeat
                log.warning("catalog balance of %s in %s not granted now: %s", cust, ct_name, e)
            self.seeds.pop(0)
        while self.seed_plans:  # once per customer, by the first sidecar to start (as local mode's first start)
            cust, plan = self.seed_plans[0]
            if await self._escrow("seed", cust, plan, self.clock.now_ms(), plans=True):
                self.unknown.pop(cust, None)  # its credits are there now: a request asks again at once
            self.seed_plans.pop(0)

    async def _close_ended(self) -> None:
        """Leases whose credits ended (a plan's period, a grant) by this sidecar's clock: what they
        consumed is settled and what is free given back, so that nothing of an ended period is
        spent here past this heartbeat; then the periods are rolled (once all their leases, at every
        sidecar, have settled: the last to settle rolls), and a few whose sidecars never settled."""
        now = self.clock.now_ms()
        ended: set[str] = set()
        busy: list[tuple[int, str, int]] = []
        while self._ending and self._ending[0][0] <= now and len(ended) < CLOSES_PER_HEARTBEAT_MAX:
            item = heapq.heappop(self._ending)
            _, customer_id, ct = item
            h = self.held.get((customer_id, ct))
            if h is None or not h.expires_at_ms or h.expires_at_ms > now:
                continue  # gone, or renewed to a later end (pushed again then)
            if h.lock.locked():
                busy.append(item)  # a top-up in flight: at the next heartbeat
                continue
            try:
                await self._close(customer_id, ct, h)
                if self.live.catalog.plan_index:  # at once: its requests wait for the next period's credits
                    self._rolled(customer_id, await self._escrow("roll", customer_id, now, plans=True))
            except Exception:
                busy.append(item)  # the ledger did not answer: closed at a later heartbeat
                for again in busy:
                    heapq.heappush(self._ending, again)
                raise
            ended.add(customer_id)
            self._settled_at_end.discard(customer_id)
        for item in busy:
            heapq.heappush(self._ending, item)
        settled, self._settled_at_end = self._settled_at_end, set()
        if self.live.catalog.plan_index:
            for customer_id in sorted(settled):  # closed by the slice scan
                self._rolled(customer_id, await self._escrow("roll", customer_id, now, plans=True))
            self.counts["period_rolls"] += await self._escrow("roll_due", now, ROLLS_PER_HEARTBEAT_MAX, plans=True)
            self.counts["overage_bills"] += await self._escrow("bill_due", now, ROLLS_PER_HEARTBEAT_MAX, plans=True)
            await self._escrow("audit_ended", now, ROLLS_PER_HEARTBEAT_MAX, plans=True)
        if any(AGGREGATIONS[m.aggregation] in CENTRAL_GAUGES for m in self.live.catalog.meters):
            self.counts["gauge_charges"] += await self._escrow("gauges_due", now, ROLLS_PER_HEARTBEAT_MAX, plans=True)

    def _rolled(self, customer_id: str, periods: int) -> None:
        """The customer's periods this sidecar rolled: its new credits are there to lease at once
        (a balance known to be spent is not any more)."""
        self.counts["period_rolls"] += periods
        for ct in self.of_customer.get(customer_id, ()) if periods else ():
            self.held[(customer_id, ct)].exhausted_until = 0.0
        if periods and self.spent.pop(customer_id, None) is not None:
            self.journal.submit_ahead(self._plan_ops(customer_id))  # the next period's pools

    # ---- pools of free units --------------------------------------------------------------
    #
    # A plan's free units of a sum or count meter are a balance of their own in ledger mode (a pool,
    # Catalog.for_ledger), leased like credit. An account on plan 0 in the core takes an event's units
    # from the pool whole or is denied, so that the pool is topped up first (Reports._pools), and
    # what is left of a pool is gathered where the event is served before the rest is priced: so
    # the period's first free units are free whichever sidecars serve them. An account whose
    # plan has no pools, or whose pools are all spent everywhere this credit period, sits on the
    # catalog's loose plan (priced past its pools at once), between PLAN records.

    def _plan_pools(self, plan_name: str) -> set[int]:
        catalog = self.live.catalog
        plan = catalog.plan_index.get(plan_name)
        return {catalog.pool_of(m) for m, meter in enumerate(catalog.meters)
                if plan is not None and plan.free_units.get(meter.name) and catalog.pool_of(m) >= 0}

    def _plan_ops(self, customer_id: str) -> list[Op]:
        """The customer's account on plan 0 (strict) while a pool of its plan (as the ledger last
        said) may have free units left, else on the loose plan: a PLAN record when that changes."""
        catalog, core = self.live.catalog, self.live.core
        idx = core.account(customer_id.encode()) if catalog.pools else -1
        if idx < 0:
            return []  # opened on plan 0: its first event asks
        plan = next((self.held[(customer_id, ct)].plan for ct in self.of_customer.get(customer_id, ())
                     if self.held[(customer_id, ct)].seen_ms), None)
        if plan is None:
            return []  # nothing said yet
        pools = self._plan_pools(plan)
        end, spent = self.spent.get(customer_id, (0, set()))
        if end and end <= self.clock.now_ms():  # of a credit period that ended
            spent = set()
            del self.spent[customer_id]
        want = catalog.loose_plan if pools <= spent else 0
        if core.state(idx)[2] == want:
            return []
        core.set_plan(idx, want)
        return [self.journal.log_op(records.account(Kind.PLAN, customer_id.encode(), 0, want, self.clock.now_ms()))]

    def _spent(self, customer_id: str, ct: int) -> None:
        """A pool found spent everywhere (Leases.cover_pool)."""
        if customer_id not in self.spent and len(self.spent) >= UNKNOWN_CUSTOMERS_MAX:
            self.spent.pop(next(iter(self.spent)))
        h = self.held.get((customer_id, ct))
        end = h.expires_at_ms if h is not None else 0  # the credit period's end (0: on no plan)
        was = self.spent.get(customer_id)
        self.spent[customer_id] = (end, (was[1] if was is not None and was[0] == end else set()) | {ct})
        self.journal.submit_ahead(self._plan_ops(customer_id))

    async def _close(self, customer_id: str, ct: int, h: Held) -> None:
        """A lease at its credits' end: settled, and what is free given back; its end is done with
        once the ledger has it (unless an answer meanwhile gave it a new one)."""
        end = h.expires_at_ms
        self.counts["period_closes"] += 1
        await self.give_back(customer_id, ct, settle=True)
        if h.expires_at_ms == end:
            h.expires_at_ms = 0
        if customer_id in self.spent and is_pool(self.live.catalog.credit_types[ct].name):
            self.journal.submit_ahead(self._plan_ops(customer_id))  # its period ended: the next one's pools
        if len(self._settled_at_end) < CLOSES_PER_HEARTBEAT_MAX:
            self._settled_at_end.add(customer_id)

    async def _take_allowances(self, allowances: list[tuple[str, str, int, int]]) -> None:
        """Outage allowances changed in the ledger: taken in (durably) before the ledger hears they were."""
        names = self.live.catalog.credit_index
        ops: list[Op] = []
        for cust, ct_name, version, allowance in allowances:
            ct = names.get(ct_name, -1)
            h = self.held.get((cust, ct))
            # A fresh lease learns it with its first answer, and is not written before it: its running
            # totals are not known until then (written as 0/0, a restart would take it as a lease from nothing).
            if h is not None and not h.fresh and h.allowance_nano != allowance:
                h.allowance_nano = allowance
                ops.append(("leases", self._key(cust, ct), h.doc()))
            self._acknowledged.append((cust, ct_name, version))
        if ops:
            await self.journal.commit_with(ops)

    async def _reconcile(self) -> None:
        """Once after each start: a lease the ledger made for this data directory whose answer
        never came in (lost, then a restart) is looked up and taken in at the next look."""
        names = self.live.catalog.credit_index
        sid, incarnation = self._ids()
        for lease in await self._escrow("leases_of", sid):
            ct = names.get(lease.credit_type)
            if ct is None or lease.incarnation != incarnation:
                continue
            h = self.held.get((lease.customer_id, ct))
            if h is None and lease.amount_nano <= 0:
                continue  # forgotten here once settled: nothing to take in
            if h is None or lease.leased_total_nano > h.leased_in:
                h = h or self._held(lease.customer_id, ct)
                if h is not None:
                    h.uncertain = True
        self.reconciled = True

    async def _look_after(self) -> None:
        keys = list(self.held)
        if not keys or self.skewed:  # no lease calls while this sidecar's clock is off (_check_clock)
            return
        start = self._scan_from % len(keys)
        chosen = (keys[start:] + keys[:start])[:SCAN_PER_HEARTBEAT_MAX]
        self._scan_from = start + len(chosen)
        now = self.clock.now_ms()
        idle_ms = self.settings.lease_idle_s * 1000
        asks: list[tuple[str, int, Held, int, int]] = []  # lease calls, made together (one transaction)
        forget: list[tuple[str, int, Held, int, int, int, int]] = []  # leases that may be forgotten, asked together
        for customer_id, ct in chosen:
            h = self.held.get((customer_id, ct))
            if h is None or h.lock.locked():
                continue
            if h.sent_back != h.given_back:
                await self._send_back(customer_id, ct, h)
            # Moves nothing; brings in what was leased (an answer lost, or a debt the ledger repaid at a
            # flush since the last ask).
            if h.uncertain or (h.borrowed and self.reachable and self.flusher.last_flush_ms > h.asked_flush_ms):
                h.asked_flush_ms = self.flusher.last_flush_ms
                asks.append((customer_id, ct, h, 0, 0))
                continue
            self._measure(h, customer_id, ct, now)
            free = self.available(customer_id, ct)
            idle = now - h.used_ms >= idle_ms
            if (h.expires_at_ms and now >= h.expires_at_ms) or (free > 0 and idle):
                if h.expires_at_ms and now >= h.expires_at_ms:
                    await self._close(customer_id, ct, h)
                else:  # idle: what it has free comes back; its end (if any) is still to be settled at
                    self.counts["idle_returns"] += 1
                    await self.give_back(customer_id, ct)
            elif idle and now - h.verified_ms >= idle_ms and self._empty(h, customer_id, ct):
                h.verified_ms = now  # asked at most once per idle period
                forget.append((customer_id, ct, h, h.leased_in, h.given_back, self._consumed(h, customer_id, ct),
                               h.degraded))
            elif h.rate_nano_s and free < max(h.unit_nano, int(h.rate_nano_s * self.settings.lease_low_water_s),
                                              h.last_size // 5):
                # Below its low-water mark (or a fifth of its last size: a rate that fell in a pause comes
                # back): refilled to the rate times the horizon, and never to less than its last size.
                self.counts["refills"] += 1
                asks.append((customer_id, ct, h, h.unit_nano, max(self._want(h, h.unit_nano), h.last_size)))
        # In the background: the heartbeat does not wait for the ledger's answers.
        for work in [self._refill(*ask) for ask in asks] + ([self._forget(forget)] if forget else []):
            task = asyncio.ensure_future(work)
            self._refills.add(task)
            task.add_done_callback(self._refills.discard)

    def _empty(self, h: Held, customer_id: str, ct: int) -> bool:
        """Nothing free or on hold here, nothing borrowed, and the ledger has heard of every give-back."""
        return not h.fresh and not h.uncertain and not h.borrowed and h.sent_back == h.given_back and \
            self._balance(customer_id, ct) == 0

    async def _forget(self, leases: list[tuple[str, int, Held, int, int, int, int]]) -> None:
        """Forget idle, empty leases whose running totals the ledger has exactly (all settled), so
        that a sidecar's memory and LMDB hold only the leases in use. The ledger keeps the row; a lease
        made again for the customer takes its running totals up from there (Held.fresh)."""
        names = self.live.catalog.credit_types
        try:
            asked = [(c, names[ct].name, leased, given, consumed, degraded)
                     for c, ct, _, leased, given, consumed, degraded in leases]
            settled = await self._escrow("settled_leases", *self._ids(), asked)
        except Exception:  # noqa: BLE001 - asked again after the next idle period
            return
        ops: list[Op] = []
        for (customer_id, ct, h, leased, given, _, _), yes in zip(leases, settled, strict=True):
            # Unchanged meanwhile (a reload renumbers or replaces leases; a top-up holds the lock).
            if not yes or self.held.get((customer_id, ct)) is not h or h.lock.locked() or \
                    (h.leased_in, h.given_back) != (leased, given) or not self._empty(h, customer_id, ct):
                continue
            del self.held[(customer_id, ct)]
            self.of_customer[customer_id].discard(ct)
            if not self.of_customer[customer_id]:
                del self.of_customer[customer_id]
            ops.append(("leases", self._key(customer_id, ct), None))
            self.counts["forgotten"] += 1
        if ops:
            self.journal.submit_ahead(ops)

    async def quiet(self) -> None:
        """Returns once the background refills and lease calls in flight are done (tests)."""
        while self._refills or (self._sender is not None and not self._sender.done()):
            await asyncio.gather(*self._refills, *([self._sender] if self._sender else []), return_exceptions=True)

    async def _refill(self, customer_id: str, ct: int, h: Held, need: int, want: int) -> None:
        try:
            async with h.lock:
                g = await self._acquire(customer_id, ct, h, need, want)
        except Exception:  # noqa: BLE001 - counted in ledger_failures; the lease stays uncertain, asked again
            return
        if not g.known:
            self._forget_unknown(customer_id, ct)

    def _measure(self, h: Held, customer_id: str, ct: int, now: int) -> None:
        """The recent spend rate of a lease, from its consumption between looks."""
        consumed = self._consumed(h, customer_id, ct)
        if h.mark_nano < 0:
            h.mark_nano, h.mark_ms = consumed, now
            return
        if consumed != h.mark_nano:
            h.used_ms = now
        elapsed = now - h.mark_ms
        if elapsed >= 1000:  # a moving average over about four seconds: a pause does not forget the rate at once
            rate = (consumed - h.mark_nano) * 1000 // elapsed
            h.rate_nano_s += (max(rate, 0) - h.rate_nano_s) // 4
            h.mark_nano, h.mark_ms = consumed, now

    async def return_all(self) -> None:
        """At shutdown: give back what every lease has free, bounded by the ledger timeout."""
        try:
            async with asyncio.timeout(self.settings.ledger_timeout_s):
                if not self.reconciled and not self.skewed:
                    await self._reconcile()
                failed = 0
                for (customer_id, ct), h in list(self.held.items()):
                    try:
                        async with h.lock:
                            if h.uncertain and not self.skewed:  # a lease call, at this sidecar's time
                                await self._acquire(customer_id, ct, h, 0, 0)
                            await self.give_back(customer_id, ct)
                    except (asyncio.TimeoutError, asyncio.CancelledError):
                        raise
                    except Exception:  # noqa: BLE001 - this lease stays leased; the others are given back
                        failed += 1
                if failed:
                    log.warning("%d leases could not be given back at shutdown: %s", failed, self.last_error)
        except Exception as e:  # noqa: BLE001 - what is not given back stays leased until the next start
            log.warning("giving back leases at shutdown stopped: %s", e)

    # ---- central grants -------------------------------------------------------------------

    async def grant(self, customer_id: str, credit_type: str, amount_nano: int, expires_at_ms: int, priority: int,
                    source: str, keyed: Keyed | None) -> Granted:
        key, digest = central_key("grant", customer_id, keyed)
        return await self._central("grant", customer_id, credit_type, amount_nano, expires_at_ms, priority, source,
                                   "", self.clock.now_ms(), key, digest)

    async def adjust(self, customer_id: str, credit_type: str, amount_nano: int, reason: str,
                     keyed: Keyed | None) -> Granted:
        key, digest = central_key("adjust", customer_id, keyed)
        return await self._central("adjust", customer_id, credit_type, amount_nano, reason, self.clock.now_ms(), key,
                                   digest)

    async def subscribe(self, customer_id: str, plan: str, start_ms: int, keyed: Keyed | None) -> Any:
        """Subscribe in the ledger (its periods are rolled there): idempotent there by key."""
        key, digest = central_key("subscribe", customer_id, keyed)
        now = self.clock.now_ms()
        return await self._central("subscribe", customer_id, plan, start_ms or now, now, key, digest, plans=True)

    async def cancel(self, customer_id: str, at_period_end: bool) -> Any:
        return await self._central("cancel", customer_id, at_period_end, self.clock.now_ms(), plans=True)

    async def change_plan(self, customer_id: str, plan: str) -> Any:
        return await self._central("change_plan", customer_id, plan, self.clock.now_ms(), plans=True)

    async def usage_so_far(self, customer_id: str, from_ms: int, to_ms: int) -> list[dict]:
        """For a statement from ``from_ms`` to ``to_ms``: the running credit period's usage so far
        (its gauges' free units, its fallback usage), as the ledger has it (after the sidecars'
        flushes), when the period ends in it."""
        end, lines = await self._central("usage_so_far", customer_id, plans=True, read=True)
        if not from_ms <= end - 1 < to_ms:
            return []
        return [activity_line(kind, f"{description} (this period so far)", name, amount, quantity)
                for kind, name, amount, description, quantity in lines]

    async def _central(self, method: str, *args: Any, plans: bool = False, read: bool = False) -> Any:
        """A control-plane call in the ledger: its refusals stand; a ledger that fails is UNAVAILABLE.
        Refused while this sidecar's clock is off the ledger's (but a ``read``): it would be stamped
        with that time."""
        if self.skewed and not read:
            raise Unavailable(self.last_error + "; ask another sidecar, or use meterd ... --ledger")
        try:
            return await self._escrow(method, *args, plans=plans)
        except (InvalidInput, NotFound, LimitReached, Conflict):
            raise
        except Exception:  # noqa: BLE001 - described in last_error
            raise Unavailable(f"the ledger is unavailable: {self.last_error or 'it refused the call'}") from None

    def close(self) -> None:
        self.link.close()


def _central_key(scope: str, customer_id: str, name: str) -> str:
    return f"{scope}/{len(customer_id)}:{customer_id}/{name}"


def central_key(scope: str, customer_id: str, keyed: Keyed | None) -> tuple[str, str]:
    """A control-plane call's idempotency key in the ledger, and its request's digest (('', '') without a key)."""
    if keyed is None or not keyed.key:
        return "", ""
    return _central_key(scope, customer_id, keyed.key), hashlib.sha256(keyed.request).hexdigest()


__all__ = ["Cover", "Leases", "Held", "central_key", "check_catalog"]
