"""Plans in ledger mode: subscriptions kept in the central ledger, and their period rolls.

In ledger mode a customer's balance is the ledger's (meterd.escrow), spent by
many sidecars through leases, so a plan's periods are the ledger's too: a
subscription is a row of ``meterd_subscriptions``, and Subscribe, Cancel,
ChangePlan and each period's roll are one ledger transaction each, with the
semantics of local mode (meterd.subscriptions) and its arithmetic (meterd.plans):

- a period's included credits are a bucket expiring at its boundary, leased like
  any other; what is left at the roll rolls over within the caps or is forfeited;
- the overage a period allows is a bucket too (OVERAGE_SOURCE), spent after
  every credit, so sidecars lease it like credit and together stop at the limit.
  The balance shown is without it (``_Sums.shown``): below zero by the overage not
  billed yet, as in local mode. Usage billed in arrears is such a bucket, unlimited;
- the roll of a credit period bills the overage by tier (or forgives, carries,
  carries for repayment), bills usage in arrears, then gives the next period's
  credits and, at a billing boundary, its fee.

Every transaction locks the customer's balance rows first, sorted (as every
escrow transaction does), then the subscription row; a roll inserts its
(customer, period) into ``meterd_rolls``, so a period is rolled once: an
interrupted roll is rolled back whole and done by the next caller.

Credit that leases hold at a roll (reservations open across the boundary)
counts as credit left, as local mode counts held credit: what is forfeited of
it stays leased in its expired bucket (spent if the hold commits, expired when
given back), and what rolls over is moved with its lease parts into the
rollover bucket.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Iterable

from meterd import _fastpath_py
from meterd.catalog import AGGREGATIONS, Catalog, CompiledCatalog
from meterd.clock import month_bounds
from meterd.config import Settings
from meterd.errors import Conflict, InvalidInput, MeterdError, NotFound, invariant
from meterd.escrow import (
    CENTRAL_GAUGES,
    GAUGE_GRACE_MS,
    NEVER_MS,
    NO_PERIOD,
    OVERAGE_PRIORITY,
    OVERAGE_SOURCE,
    PERIOD_SOURCES,
    Escrow,
    _Bucket,
    _Sums,
)
from meterd.plans import CreditPolicy, Plan, overage_floor, prorated, rollover_split
from meterd.state import Subscription

SPENT_FIRST = 0                  # a plan's own credits are spent before grants bought apart (as in local mode)
ROOM_MAX_NANO = 1 << 62          # the overage bucket of an unlimited overage, or of usage billed in arrears
ROLLS_PER_CALL_MAX = 1_000       # periods one roll call catches up on, per customer
ROLL_LOCK_SPACE = 0x6D72         # the first key of the advisory locks of rolls (PostgreSQL)
GAUGE_LOCK_SPACE = 0x6D67        # and of the gauge sweep's, per customer: sidecars sweeping at once skip each other's
# How long after a boundary a roll waits for the sidecars holding the period's credits to settle
# them (they do at the boundary, by their clocks, within a heartbeat); past it, a lease not settled
# is taken as its sidecar's loss of contact, and what it consumed settles later, from the credit
# it still holds. Within it, a sidecar's clock may be behind the ledger's callers'.
PERIOD_CLOSE_GRACE_MS = 30_000
_SUB = "plan, n, start_ms, end_ms, billing_n, billing_end_ms, version, state"
log = logging.getLogger(__name__)
NO_PENDING_MS = 1 << 62          # meterd_gauges.pending_from_ms and due_ms: no window flushed since the last charge
GAUGE_CHARGE_MAX_NANO = 1 << 60  # the most one gauge charge takes (about 1.15e9 units of a currency)
GAUGE_SUMS_MAX_NANO = 1 << 62    # and no gauge charge takes a balance row's sums past this
GAUGE_RETRY_MS = 3_600_000       # a customer whose gauges could not be charged is tried again then




def _unsettled(customer: str, start: str, boundary: str) -> str:
    """SQL for what of a customer's credit period from ``start`` to ``boundary`` some lease has not
    settled past its end: a lease holding any of the customer's credit (every lease of a customer
    on a plan ends at the period's end, and a cancel recalls them all; credit a lease may have
    spent unsettled is no credit left to net overage against), or a lease that was short in it
    (its sidecar may have served requests in the fallback mode: it settles them at the end).
    ``customer``, ``start`` and ``boundary``: SQL expressions."""
    return ("SELECT 1 FROM meterd_lease_parts p JOIN meterd_leases l ON l.sidecar_id = p.sidecar_id AND "
            "l.customer_id = p.customer_id AND l.credit_type = p.credit_type "
            f"WHERE p.customer_id = {customer} AND p.amount_nano > 0 AND l.settled_ms < {boundary} UNION ALL "
            f"SELECT 1 FROM meterd_leases u WHERE u.customer_id = {customer} AND u.short_ms >= {start} AND "
            f"u.short_ms < {boundary} AND u.settled_ms < {boundary}")


@dataclass
class _Row:
    """A meterd_subscriptions row: the subscription (None once ended), its version, whether
    the customer has had its trial credits, and how many subscriptions it has had."""
    sub: Subscription | None
    version: int
    trial_taken: bool
    generation: int = 0
    # Of the plan it ended on, the fallback mode per credit type: what sidecars settle of its
    # fallback usage after the end is audited under it (LedgerPlans.audit_ended).
    fallbacks: dict[str, str] = field(default_factory=dict)
    # A cancel that waits for the sidecars: when it was asked (its period ends then, and what the
    # sidecars spent by then is billed once they have settled it; 0: none).
    cancelling_ms: int = 0
    # Meanwhile, the ends its period's buckets had (credit type, grant id): they end at the cancel,
    # so that no sidecar leases more of them, and are put back for the cancel's forfeits, in order.
    cancel_ends: dict[str, dict[str, int]] = field(default_factory=dict)
    # And per credit type the last bucket made by the cancel (its seq): credit granted after it is
    # not the cancelled period's, and pays none of its overage.
    cancel_seqs: dict[str, int] = field(default_factory=dict)


def unserved(plan: Plan, catalog: Catalog) -> str | None:
    """What of ``plan`` ledger mode does not serve yet, named by its catalog key (None: all of it).
    Tiers and latest meters are refused for the whole catalog (leases.check_catalog). Free units
    are served: of a gauge meter the ledger charges the period's value less them; of a sum or
    count meter they are a pool that sidecars lease (``Catalog.for_ledger``)."""
    for name in plan.free_units:
        m = catalog.meter_index.get(name)
        if m is None or (AGGREGATIONS[catalog.meters[m].aggregation] not in CENTRAL_GAUGES
                         and catalog.pool_of(m) < 0):
            return (f"plans.{plan.name}.free: free units of {name} are served in ledger mode only for a sum, "
                    "count, max or unique_count meter")
    return None


@functools.lru_cache(maxsize=8)
def _probe(compiled: CompiledCatalog) -> _fastpath_py.Core:
    """A core of the catalog with no accounts: the rates a gauge is charged at, as a core finds them."""
    return _fastpath_py.Core(*compiled.core_args()[:3], Settings().core_limits(), 16)


class LedgerPlans:
    """Subscriptions and period rolls in the ledger, priced by ``catalog``; see the module docstring."""

    def __init__(self, escrow: Escrow, catalog: Catalog) -> None:
        self.escrow = escrow
        self.ledger = escrow.ledger
        self.catalog = catalog
        self._lock = " FOR UPDATE" if self.ledger.dialect == "postgresql" else ""
        self._in_code_points = ' COLLATE "C"' if self.ledger.dialect == "postgresql" else ""
        self._free_used: list[tuple[int, int, int]] = []  # of the last _gauges: (meter, units used, free units)

    # ---- plumbing --------------------------------------------------------------------

    def _name(self, ct: int) -> str:
        return self.catalog.credit_types[ct].name

    def _plan(self, name: str) -> Plan:
        plan = self.catalog.plan_index.get(name)
        if plan is None:
            raise InvalidInput("plan", f"unknown plan {name[:80]!r}")
        return plan

    def _credit_types(self, sub: Subscription | None, *plans: Plan | None) -> list[str]:
        """The credit types a change to the subscription may write: the plans' credits and fees,
        the one a plan without fees dates its billing periods in, and what the subscription kept."""
        names = set(sub.included) | set(sub.carried) if sub is not None else set()
        names |= {self._name(self.catalog.meters[m].credit_type) for m in self._gauge_meters()}
        for plan in plans:
            if plan is not None:
                names |= {self._name(ct) for ct in [*plan.credits, *plan.fees_nano, self._period_ct(plan)]}
                names |= set(self._pools(plan))
        return sorted(names)

    def _pools(self, plan: Plan | None) -> dict[str, tuple[int, int]]:
        """The plan's free units of sum and count meters, as ledger mode holds them: per pool credit
        type (``Catalog.for_ledger``), (meter, units a credit period)."""
        out = {}
        for m, meter in enumerate(self.catalog.meters):
            pool = self.catalog.pool_of(m)
            units = int(plan.free_units.get(meter.name, 0) * 10**meter.precision) if plan is not None else 0
            if pool >= 0 and units > 0:
                out[self._name(pool)] = (m, units)
        return out

    def _pool_in(self, sums: dict[str, _Sums], sub: Subscription, name: str, units: int, now_ms: int,
                 at: int) -> None:
        """A credit period's free units of a meter: a bucket of its pool, ending with the period."""
        if units > 0:
            self.escrow._add_bucket(sums[name], sub.customer_id, name, units, sub.end_ms, SPENT_FIRST, "included", "",
                                    now_ms, period_n=sub.n, kind="included", effective_ms=at, capped=False)

    def _pools_in(self, sums: dict[str, _Sums], sub: Subscription, plan: Plan, now_ms: int, at: int) -> None:
        for name, (_, units) in self._pools(plan).items():
            sub.included[name] = units
            self._pool_in(sums, sub, name, units, now_ms, at)

    def _pools_used(self, sub: Subscription, plan: Plan | None, boundary: int) -> None:
        """What the credit period's pools gave, as settled (every lease of the period has settled,
        or a roll does not wait any longer), for its "free_units" entries (``_period_usage``), out
        of the plan's free units of each meter, as local mode's entries say."""
        free = {m: units for m, units in self._pools(plan).values()}
        for m in range(len(self.catalog.meters)):
            pool = self.catalog.pool_of(m)
            if pool < 0:
                continue
            used = sum(b.consumed for b in self._period_buckets(sub.customer_id, self._name(pool), boundary,
                                                                  PERIOD_SOURCES) if b.period_n == sub.n)
            if used > 0:
                self._free_used.append((m, min(used, free.get(m, used)), free.get(m, used)))

    def _period_credit_types(self, customer_id: str) -> list[str]:
        """The credit types the customer has period buckets of, not rolled yet (plans it left may have given them)."""
        return [r[0] for r in self.escrow._rows("SELECT DISTINCT credit_type FROM meterd_grants WHERE customer_id = ? "
                                                "AND period_n >= 0", (customer_id,))]

    @staticmethod
    def _period_ct(plan: Plan) -> int:
        """The credit type of a plan's billing_period entries (as in local mode)."""
        return next(iter(plan.fees_nano), 0)

    def _lock_sums(self, customer_id: str, names: Iterable[str], now_ms: int,
                   expire_ms: int | None = None) -> dict[str, _Sums]:
        """The balance rows, locked in sorted order, with what expired by ``expire_ms`` (default:
        now; a roll's boundary) taken first, so that no ended grant counts as credit left."""
        out = {}
        for name in sorted(set(names)):
            s = self.escrow._sums(customer_id, name, True, now_ms)
            assert s is not None  # made when missing
            self.escrow._expire(customer_id, name, s, now_ms if expire_ms is None else expire_ms)
            out[name] = s
        return out

    def _put_all(self, customer_id: str, sums: dict[str, _Sums], now_ms: int, row: _Row | None = None) -> None:
        """The balance rows; with the subscription's ``row``, with its plan's top-up thresholds."""
        plan = self.catalog.plan_index.get(row.sub.plan) if row is not None and row.sub is not None else None
        for name, s in sums.items():
            if row is not None:
                ct = self.catalog.credit_index.get(name)
                policy = plan.credits.get(ct) if plan is not None and ct is not None else None
                if policy is None or policy.low_balance_nano is None or policy.topup_target_nano is None:
                    s.low = s.topup = s.pending = 0
                else:
                    s.low, s.topup = policy.low_balance_nano, policy.topup_target_nano
            self.escrow._put_sums(customer_id, name, s, now_ms)

    def _read(self, customer_id: str, lock: bool) -> _Row:
        rows = self.escrow._rows(f"SELECT {_SUB} FROM meterd_subscriptions WHERE customer_id = ?"
                                 + (self._lock if lock else ""), (customer_id,))
        if not rows:
            return _Row(None, 0, False)
        state = json.loads(rows[0][7])
        sub = Subscription(**state["sub"]) if state.get("sub") else None
        return _Row(sub, int(rows[0][6]), bool(state.get("trial_taken")), int(state.get("generation", 0)),
                    state.get("fallbacks", {}), int(state.get("cancelling_ms", 0)), state.get("cancel_ends", {}),
                    state.get("cancel_seqs", {}))

    def _write(self, customer_id: str, row: _Row, now_ms: int) -> None:
        """The row, at the next version (made at version 1)."""
        sub = row.sub
        values = (sub.plan if sub else "", sub.n if sub else 0, sub.start_ms if sub else 0, sub.end_ms if sub else 0,
                  sub.billing_n if sub else 0, sub.billing_end_ms if sub else 0,
                  json.dumps({"sub": sub.__dict__ if sub else None, "trial_taken": row.trial_taken,
                              "generation": row.generation, "fallbacks": row.fallbacks,
                              "cancelling_ms": row.cancelling_ms if sub else 0,
                              "cancel_ends": row.cancel_ends if sub else {},
                              "cancel_seqs": row.cancel_seqs if sub else {}}), now_ms)
        if row.version == 0:
            self.escrow._exec("INSERT INTO meterd_subscriptions (plan, n, start_ms, end_ms, billing_n, billing_end_ms, "
                              "state, updated_ms, version, customer_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?)",
                              (*values, customer_id))
        else:
            cur = self.ledger._exec("UPDATE meterd_subscriptions SET plan = ?, n = ?, start_ms = ?, end_ms = ?, "
                                    "billing_n = ?, billing_end_ms = ?, state = ?, updated_ms = ?, "
                                    "version = version + 1 WHERE customer_id = ? AND version = ?",
                                    (*values, customer_id, row.version))
            invariant(cur.rowcount == 1, f"subscription of {customer_id!r} changed under its lock")
        row.version += 1

    def _entry(self, s: _Sums, customer_id: str, name: str, kind: str, amount: int, before: int, reference: str,
               now_ms: int, at: int, charge: int = 0, charge_ct: str = "", detail: dict | None = None) -> None:
        self.escrow._entry(s, customer_id, name, kind, "", amount, before, reference, now_ms, charge=charge,
                           charge_ct=charge_ct, effective_ms=at, detail=detail)

    # ---- reads ---------------------------------------------------------------------------

    def subscription(self, customer_id: str) -> Subscription | None:
        with self.escrow._snapshot():
            return self._read(customer_id, False).sub

    def usage_so_far(self, customer_id: str) -> tuple[int, list[tuple[str, str, int, str, str]]]:
        """The running credit period's end (0: no subscription) and its usage so far, as flushed and
        settled: the free units its gauges used, then its fallback usage (what it would have
        cost), as local mode's ``Subscriptions.period_usage``: (kind, credit type, amount,
        description, quantity) each."""
        with self.escrow._snapshot():
            sub = self._read(customer_id, False).sub
            plan = self.catalog.plan_index.get(sub.plan) if sub is not None else None
            if sub is None or plan is None:
                return 0, []
            out = []
            charged = dict(self.escrow._rows("SELECT meter, charged_to_ms FROM meterd_gauges WHERE customer_id = ?",
                                             (customer_id,)))
            used_of: dict[int, int] = {}
            for m in self._gauge_meters():
                meter = self.catalog.meters[m]
                free = int(plan.free_units.get(meter.name, 0) * 10**meter.precision)
                used_of[m] = min(self._gauge_value(customer_id, m, int(charged[meter.name]), NEVER_MS), free) \
                    if free and meter.name in charged else 0
            for name, (m, free) in self._pools(plan).items():  # as settled so far
                used_of[m] = min(free, sum(b.consumed for b in self.escrow._buckets(
                    customer_id, name, "period_n = ?", (sub.n,)) if b.source in PERIOD_SOURCES))
            for m, used in sorted(used_of.items()):  # in the catalog's order, as local mode's
                meter = self.catalog.meters[m]
                free = int(plan.free_units.get(meter.name, 0) * 10**meter.precision)
                if used > 0:
                    quantity = self.catalog.format_quantity(m, used)
                    out.append(("free_units", self._name(meter.credit_type), 0,
                                f"{meter.name}: {quantity} of {self.catalog.format_quantity(m, free)} free", quantity))
            for ct, policy in plan.credits.items():
                rows = self.escrow._rows("SELECT degraded_nano FROM meterd_balances WHERE customer_id = ? AND "
                                         "credit_type = ?", (customer_id, self._name(ct)))
                if policy.fallback and rows and int(rows[0][0]) > 0:
                    out.append(("degraded", self._name(ct), int(rows[0][0]),
                                f"served in {policy.fallback} mode, not charged", ""))
            return sub.end_ms, out

    def due(self, now_ms: int, limit: int, ready: bool = False) -> list[str]:
        """Customers whose credit period ended at or before ``now_ms``, soonest first, at most
        ``limit``; with ``ready``, only those a roll would not wait for (``roll``)."""
        wait = f"AND (s.end_ms <= ? OR NOT EXISTS ({_unsettled('s.customer_id', 's.start_ms', 's.end_ms')}))" \
            if ready else ""
        return [r[0] for r in self.escrow._rows(
            f"SELECT s.customer_id FROM meterd_subscriptions s WHERE s.plan <> '' AND s.end_ms <= ? {wait} "
            f"ORDER BY s.end_ms, s.customer_id LIMIT {int(limit)}",
            (now_ms, now_ms - PERIOD_CLOSE_GRACE_MS) if ready else (now_ms,))]

    # ---- subscribe, cancel, change plan --------------------------------------------------

    def seed(self, customer_id: str, plan_name: str, now_ms: int) -> bool:
        """A catalog customer's plan, from ``now_ms``, unless the customer was ever subscribed
        (as local mode subscribes it once, at the first start): whether this call subscribed it."""
        if self._read(customer_id, False).version:
            return False
        try:
            self.subscribe(customer_id, plan_name, now_ms, now_ms, once=True)
        except Conflict:  # another sidecar seeded it meanwhile, or an operator subscribed it
            return False
        return True

    def served(self, plan: Plan) -> None:
        """Refuse a plan with what ledger mode does not serve yet, naming it."""
        why = unserved(plan, self.catalog)
        if why is not None:
            raise InvalidInput("plan", why)

    def subscribe(self, customer_id: str, plan_name: str, start_ms: int, now_ms: int, key: str = "",
                  digest: str = "", once: bool = False) -> Subscription:
        """The customer on a plan from ``start_ms`` (not in the future): its period's credits
        and overage allowance, its trial (once per customer), its fee. Idempotent by ``key``
        (with the request's ``digest``): a repeat answers what the first call did. With ``once``
        (a catalog customer's plan), refused with Conflict if the customer was ever subscribed."""
        plan = self._plan(plan_name)
        self.served(plan)
        if start_ms > now_ms:
            raise InvalidInput("start_ms", "must not be in the future")
        if self._read(customer_id, False).cancelling_ms:
            self.roll(customer_id, now_ms)  # a cancel waiting for the sidecars ends first, if it may
        with self.ledger._transaction():
            replay = self.escrow._replayed(key, digest)
            if replay is not None:
                return Subscription(**replay)
            ended = self._read(customer_id, False).fallbacks  # the last subscription's, audited below
            sums = self._lock_sums(customer_id, self._credit_types(None, plan) + list(ended), now_ms)
            row = self._read(customer_id, True)
            if row.cancelling_ms:
                raise Conflict(f"customer {customer_id!r} is being cancelled: its sidecars settle what they spent "
                               f"within a heartbeat (at most {PERIOD_CLOSE_GRACE_MS // 1000} s); subscribe then")
            if row.sub is not None:
                raise Conflict(f"customer {customer_id!r} is subscribed already; use ChangePlan")
            if once and row.version:
                raise Conflict(f"customer {customer_id!r} was subscribed once already")
            self._audit_ended(sums, row, customer_id, now_ms)  # the last subscription's, settled since its end
            month = month_bounds(start_ms)[0]  # the months it had no plan are charged at their ends
            self._gauges(sums, customer_id, None, month, now_ms, month - 1)
            sub = row.sub = Subscription.starting(customer_id, plan, start_ms, now_ms)
            row.generation += 1
            for ct, policy in plan.credits.items():
                sub.included[self._name(ct)] = policy.included_nano
                self._included(sums, sub, plan, ct, policy.included_nano, now_ms, now_ms)
            self._pools_in(sums, sub, plan, now_ms, now_ms)
            self._open_allowances(sums, sub, plan, now_ms)
            if plan.trial_nano and not row.trial_taken:
                for ct, amount in plan.trial_nano.items():
                    self.escrow._add_bucket(sums[self._name(ct)], customer_id, self._name(ct), amount,
                                            now_ms + plan.trial_days * 86_400_000, SPENT_FIRST, "trial", "", now_ms)
                row.trial_taken = True
            self._billing_period(sums, sub, plan, now_ms, now_ms)
            self._fees(sums, sub, plan, now_ms, now_ms)
            self._write(customer_id, row, now_ms)
            self._put_all(customer_id, sums, now_ms, row)
            self.escrow._remember(key, digest, dict(sub.__dict__), now_ms)
        return sub

    def _locked(self, customer_id: str, now_ms: int, also: Plan | None = None) -> tuple[dict[str, _Sums], _Row,
                                                                                    Subscription, Plan | None]:
        """Inside a transaction: the balance rows a change to the customer's subscription (and to
        plan ``also``) may write, then the subscription, locked in that order; and its plan."""
        first = self._read(customer_id, False).sub
        plan = self.catalog.plan_index.get(first.plan) if first else None
        sums = self._lock_sums(customer_id, self._credit_types(first, plan, also) +
                               self._period_credit_types(customer_id), now_ms)
        row = self._read(customer_id, True)
        if row.sub is None:
            raise NotFound(f"customer {customer_id!r} has no subscription")
        if row.cancelling_ms:  # cancelled: it ends once the sidecars have settled what they spent by then
            raise NotFound(f"customer {customer_id!r} has no subscription (cancelled; its sidecars are settling)")
        if first is None or row.sub.plan != first.plan:
            raise Conflict(f"the subscription of {customer_id!r} changed meanwhile; try again")
        return sums, row, row.sub, plan

    def cancel(self, customer_id: str, at_period_end: bool, now_ms: int) -> Subscription:
        """At the period's end (its roll ends it), or now: what is owed is billed, and the
        period's credits go. Now, while sidecars' leases hold the period's credits: its period
        ends now and the leases are asked back, and what is owed is billed once they have
        settled what they spent by then (as at a period's end: the roll does it, at the latest
        PERIOD_CLOSE_GRACE_MS after the cancel)."""
        self.roll(customer_id, now_ms, force=True)  # a period that ended is rolled first, as in local mode
        with self.ledger._transaction():
            sums, row, sub, plan = self._locked(customer_id, now_ms)
            if at_period_end:
                sub.cancel_at_end = True
            else:
                row.cancelling_ms = now_ms
                if self._unsettled(customer_id, sub.start_ms, now_ms):
                    row.cancel_seqs = {name: x.grants_made for name, x in sums.items()}
                    for name in sorted(sums):  # the period ends now: its credits (leased too) and allowances
                        for b in self.escrow._buckets(customer_id, name, "period_n >= 0 AND expires_at_ms > ?",
                                                      (now_ms,)):
                            row.cancel_ends.setdefault(name, {})[b.grant_id] = b.expires_at_ms
                            b.expires_at_ms = now_ms
                            self.escrow._put_bucket(customer_id, name, b)
                        self._recall(customer_id, name, now_ms)
                    sub.end_ms = now_ms
                else:
                    self._cancelled(sums, row, plan, now_ms)
            self._write(customer_id, row, now_ms)
            self._put_all(customer_id, sums, now_ms, row)
        return sub

    def _cancelled(self, sums: dict[str, _Sums], row: _Row, plan: Plan | None, now_ms: int) -> None:
        """A cancel now, once what the sidecars spent by then is settled: its fallback usage, its
        overage (netted against credit left) billed, arrears billed, and the subscription ends."""
        sub, at = row.sub, row.cancelling_ms
        assert sub is not None  # the caller read it
        for name, ends in sorted(row.cancel_ends.items()):
            for b in self.escrow._buckets(sub.customer_id, name, "period_n >= 0"):
                if b.grant_id in ends:  # its end again; what expired at the cancel is credit left
                    b.expires_at_ms = ends[b.grant_id]
                    if b.source != OVERAGE_SOURCE and name in sums:
                        self._unexpire(sums[name], b)
                    self.escrow._put_bucket(sub.customer_id, name, b)
        row.cancel_ends = {}
        self._gauges(sums, sub.customer_id, plan, at, now_ms, at)  # what the period used by the cancel
        self._pools_used(sub, plan, 1 << 62)
        self._period_usage(sums, sub, plan, now_ms, at)
        for ct, policy in (plan.credits.items() if plan else []):
            s, name = sums[self._name(ct)], self._name(ct)
            upto = row.cancel_seqs.get(name)
            self._net(s, sub.customer_id, name, now_ms, upto)  # credit left at the cancel pays the overage first
            self._settle_overage(s, sub, name, policy, "cancel", now_ms, at, upto)
            if policy.arrears:
                self._arrears(s, sub, name, now_ms, at, upto)
            self._close_allowance(s, sub, name, now_ms, upto)
        row.cancel_seqs = {}
        self._end(sums, row, plan, now_ms, at)

    def change_plan(self, customer_id: str, plan_name: str, now_ms: int) -> Subscription:
        """An upgrade now (the fee difference and the extra included credits for the time left,
        the overage so far billed at the old prices); a downgrade at the billing period's end."""
        new = self._plan(plan_name)
        self.served(new)
        self.roll(customer_id, now_ms, force=True)  # a period that ended is rolled first, as in local mode
        with self.ledger._transaction():
            sums, row, sub, old = self._locked(customer_id, now_ms, new)
            if sub.plan_change(old, new):
                self._upgrade(sums, sub, old, new, now_ms)
            self._write(customer_id, row, now_ms)
            self._put_all(customer_id, sums, now_ms, row)
        return sub

    def _upgrade(self, sums: dict[str, _Sums], sub: Subscription, old: Plan | None, new: Plan, now_ms: int) -> None:
        left, length = sub.end_ms - now_ms, sub.end_ms - sub.start_ms  # of the credit period
        for ct, policy in (old.credits.items() if old else []):
            self._settle_overage(sums[self._name(ct)], sub, self._name(ct), policy, "plan change", now_ms, now_ms)
        blength = sub.billing_end_ms - sub.billing_start_ms
        for ct, fee in new.fees_nano.items():
            diff = fee - (old.fees_nano.get(ct, 0) if old else 0)
            if diff > 0:
                s = sums[self._name(ct)]
                self._entry(s, sub.customer_id, self._name(ct), "fee", 0, s.shown, f"{new.name} upgrade proration",
                            now_ms, now_ms, charge=prorated(diff, sub.billing_end_ms - now_ms, blength),
                            charge_ct=self._name(ct))
        for ct in set(old.credits if old else {}) | set(new.credits):
            # What was billed of the period's overage stays billed: the new plan's allowance counts it.
            self._close_allowance(sums[self._name(ct)], sub, self._name(ct), now_ms)
        sub.plan = new.name
        for ct in new.credits:
            name = self._name(ct)
            before = sub.included.get(name, old.credits[ct].included_nano if old and ct in old.credits else 0)
            after = new.credits[ct].included_nano
            self._included(sums, sub, new, ct, max(after - before, 0) * left // length, now_ms, now_ms)
            sub.included[name] = max(after, before)
        for name, (_, units) in self._pools(new).items():
            # Free units count against the new plan's at once, as local mode's period usage does.
            before = sub.included.get(name, self._pools(old).get(name, (0, 0))[1])
            self._pool_in(sums, sub, name, units - before, now_ms, now_ms)
            sub.included[name] = max(units, before)
        self._open_allowances(sums, sub, new, now_ms)

    # ---- a period's credits, allowance, fee -------------------------------------------------

    def _included(self, sums: dict[str, _Sums], sub: Subscription, plan: Plan, ct: int, amount: int, now_ms: int,
                  at: int) -> None:
        if amount <= 0:
            return
        days = plan.credits[ct].expiry_days
        # Credits that live on past the period are not the period's: they are not rolled or forfeited with it.
        source = "included" if days is None else "granted"
        expires = sub.end_ms if days is None else (sub.start_ms + days * 86_400_000 if days else 0)
        self.escrow._add_bucket(sums[self._name(ct)], sub.customer_id, self._name(ct), amount, expires, SPENT_FIRST,
                                source, "", now_ms, period_n=sub.n if days is None else NO_PERIOD, kind="included",
                                effective_ms=at, capped=False)

    def _open_allowances(self, sums: dict[str, _Sums], sub: Subscription, plan: Plan, now_ms: int) -> None:
        """The period's overage allowance per credit type, as a bucket spent after every credit:
        what the plan lets the balance go below zero, less what the period billed already."""
        for ct, policy in plan.credits.items():
            name = self._name(ct)
            room = min(-overage_floor(policy, sub.overage_billed.get(name, 0), sub.overage_charged.get(name, 0)),
                       ROOM_MAX_NANO)
            if room > 0:
                # bill_at: what a settlement must leave owed for bill_due to look at the customer.
                bill_at = (policy.overage.bill_threshold_nano or 0) if policy.overage else 0
                gid = self.escrow._add_bucket(sums[name], sub.customer_id, name, room, sub.end_ms, OVERAGE_PRIORITY,
                                              OVERAGE_SOURCE, f"{plan.name} period {sub.n}", now_ms,
                                              period_n=sub.n, capped=False, bill_at=bill_at).grant_id
                self._carry_held_overage(sums[name], sub.customer_id, name, gid)

    def _carry_held_overage(self, s: _Sums, customer_id: str, name: str, gid: str) -> None:
        """What leases still hold of allowances that ended (open holds across a boundary or a plan
        change) moves, with its lease parts, into the new allowance ``gid``: a hold that commits
        spends the allowance in force, and the balance never goes further below zero than it allows."""
        new = next(b for b in self.escrow._buckets(customer_id, name, "grant_id = ?", (gid,)))
        for old in self.escrow._buckets(customer_id, name, "leased_nano > 0 AND period_n < 0 AND grant_id <> ?",
                                        (gid,)):
            if old.source != OVERAGE_SOURCE or not new.remaining:
                continue
            take = min(old.leased, new.remaining)
            self._move_lease_parts(customer_id, name, old.grant_id, gid, take)
            old.leased -= take
            old.amount -= take
            new.remaining -= take
            new.leased += take
            s.granted -= take   # the old allowance's part is gone; the new one's room holds it
            s.available -= take
            s.headroom -= take
            self.escrow._put_bucket(customer_id, name, old)
        self.escrow._put_bucket(customer_id, name, new)

    def _billing_period(self, sums: dict[str, _Sums], sub: Subscription, plan: Plan, now_ms: int, at: int) -> None:
        """A billing_period entry: where a statement of the period starts and ends."""
        name = self._name(self._period_ct(plan))
        s = sums[name]
        self.escrow._entry(s, sub.customer_id, name, "billing_period", "", 0, s.shown,
                           f"{plan.name} period {sub.billing_n}", now_ms, effective_ms=sub.billing_start_ms,
                           detail={"period_end_ms": sub.billing_end_ms})

    def _fees(self, sums: dict[str, _Sums], sub: Subscription, plan: Plan, now_ms: int, at: int) -> None:
        for ct, fee in plan.fees_nano.items():
            s, name = sums[self._name(ct)], self._name(ct)
            self._entry(s, sub.customer_id, name, "fee", 0, s.shown, f"{plan.name} period {sub.billing_n}", now_ms,
                        at, charge=fee, charge_ct=name)

    # ---- the roll ----------------------------------------------------------------------------

    def bill_due(self, now_ms: int, limit: int) -> int:
        """Early overage bills (``bill_threshold``): of up to ``limit`` customers whose settled
        consumption went into their overage allowance, those that owe the threshold or more are
        billed what they owe (the graduated tiers go on from what the period billed, so the
        period's total is the same however its bills fall). Returns how many bills it made."""
        bills = 0
        for customer_id, name in self.escrow._rows(
                "SELECT customer_id, credit_type FROM meterd_overage_spent ORDER BY spent_ms, customer_id, "
                f"credit_type LIMIT {int(limit)}"):
            with self.ledger._transaction():
                first = self._read(customer_id, False).sub
                plan = self.catalog.plan_index.get(first.plan) if first else None
                sums = self._lock_sums(customer_id, self._credit_types(first, plan) + [name], now_ms)
                row = self._read(customer_id, True)
                sub = row.sub
                ct = self.catalog.credit_index.get(name)
                policy = plan.credits.get(ct) if plan is not None and ct is not None else None
                threshold = policy.overage.bill_threshold_nano if policy and policy.overage else None
                s = sums[name]
                if sub is not None and first is not None and sub.plan == first.plan and sub.end_ms > now_ms \
                        and threshold is not None and policy is not None and -s.shown >= threshold:
                    self._settle_overage(s, sub, name, policy, "threshold", now_ms, now_ms)
                    self._write(customer_id, row, now_ms)
                    bills += 1
                self.escrow._exec("DELETE FROM meterd_overage_spent WHERE customer_id = ? AND credit_type = ?",
                                  (customer_id, name))
                self._put_all(customer_id, sums, now_ms)
        return bills

    def audit_ended(self, now_ms: int, limit: int) -> int:
        """Fallback usage that sidecars settled after the end of its subscription (a cancel is
        not waited for, as a period's end is): audited, as its end audited what was settled by
        then, for up to ``limit`` customers. Returns how many."""
        done = 0
        for customer_id, in self.escrow._rows(
                f"SELECT customer_id FROM meterd_degraded_ended ORDER BY settled_ms, customer_id LIMIT {int(limit)}"):
            with self.ledger._transaction():
                names = [r[0] for r in self.escrow._rows("SELECT credit_type FROM meterd_balances WHERE customer_id = "
                                                         "? AND degraded_nano > 0", (customer_id,))]
                sums = self._lock_sums(customer_id, names, now_ms)
                row = self._read(customer_id, True)
                if row.sub is None:  # not subscribed again meanwhile (a subscribe audits it then)
                    done += self._audit_ended(sums, row, customer_id, now_ms)
                self.escrow._exec("DELETE FROM meterd_degraded_ended WHERE customer_id = ?", (customer_id,))
                self._put_all(customer_id, sums, now_ms)
        return done

    def _audit_ended(self, sums: dict[str, _Sums], row: _Row, customer_id: str, now_ms: int) -> int:
        """The ended subscription's fallback usage settled since its end: a "degraded" entry each (in
        the mode of the plan it ended on), and the count starts again. Returns how many entries."""
        made = 0
        self.escrow._exec("DELETE FROM meterd_degraded_ended WHERE customer_id = ?", (customer_id,))
        for name, s in sums.items():
            if s.degraded > 0 and name in row.fallbacks:
                self._entry(s, customer_id, name, "degraded", s.degraded, s.shown,
                            f"served in {row.fallbacks[name]} mode, not charged", now_ms, now_ms)
                made += 1
            s.degraded = 0
        return made

    def roll_due(self, now_ms: int, limit: int) -> int:
        """Roll the periods of up to ``limit`` customers whose credit period ended by ``now_ms``
        (what each sidecar's sweep does, a few at a time); returns how many periods it rolled.
        On PostgreSQL a customer another caller is rolling is skipped (it will be done). A
        period is swept once no lease holds its credits unsettled, or PERIOD_CLOSE_GRACE_MS
        after its end. A customer whose roll is refused (a figure past 64 bits) is logged and the
        others are rolled: one tenant cannot stop the sweep (the ledger failing still does)."""
        rolled = 0
        for customer_id in self.due(now_ms, limit, True):
            try:
                rolled += self.roll(customer_id, now_ms, skip_busy=True)
            except MeterdError:
                log.exception("the period of %r could not be rolled; the others are", customer_id)
        return rolled

    def roll(self, customer_id: str, now_ms: int, skip_busy: bool = False, force: bool = False) -> int:
        """Roll each credit period of the customer's subscription that ended at or before
        ``now_ms`` (the ledger's clock), one transaction each; returns how many were rolled
        (0: none was due, or another caller rolled them). Callers racing for a customer wait
        on its rows, and the later one finds nothing due; with ``skip_busy`` (PostgreSQL) a
        caller finding another rolling it goes on at once (an advisory lock held for the
        transaction: it only spares the wait; the row locks and meterd_rolls decide).

        A period is rolled from settled figures: once every lease holding its credits (or its
        overage allowance) has settled past its end, or PERIOD_CLOSE_GRACE_MS after it, or at
        once with ``force`` (a change asked for by an operator, which cannot wait)."""
        rolled = 0
        while rolled < ROLLS_PER_CALL_MAX:
            with self.ledger._transaction():
                if skip_busy and self.ledger.dialect == "postgresql":
                    (free,), = self.escrow._rows("SELECT pg_try_advisory_xact_lock(?, hashtext(?))",
                                                 (ROLL_LOCK_SPACE, customer_id))
                    if not free:
                        return rolled
                first = self._read(customer_id, False).sub
                if first is None or first.end_ms > now_ms:
                    return rolled
                plan = self.catalog.plan_index.get(first.plan)
                after = self.catalog.plan_index.get(first.next_plan) if first.next_plan else None
                sums = self._lock_sums(customer_id, self._credit_types(first, plan, after) +
                                       self._period_credit_types(customer_id), now_ms, first.end_ms)
                row = self._read(customer_id, True)
                sub = row.sub
                if sub is None or sub.end_ms > now_ms:
                    step = "done"  # rolled or ended by another caller meanwhile
                elif (sub.plan, sub.next_plan) != (first.plan, first.next_plan):
                    step = "again"  # its plans changed meanwhile: lock their credit types too
                elif (not force or row.cancelling_ms) and now_ms < sub.end_ms + PERIOD_CLOSE_GRACE_MS and \
                        self._unsettled(customer_id, sub.start_ms, sub.end_ms):
                    step = "done"  # not settled yet: the last lease's settlement rolls it
                elif row.cancelling_ms:
                    step = "done"  # a cancel that waited for the sidecars: it ends the subscription
                    self._cancelled(sums, row, plan, now_ms)
                    self._write(customer_id, row, now_ms)
                else:
                    step = "rolled"
                    self.escrow._exec("INSERT INTO meterd_rolls (customer_id, generation, n, boundary_ms, plan, "
                                      "rolled_ms) VALUES (?, ?, ?, ?, ?, ?)",
                                      (customer_id, row.generation, sub.n, sub.end_ms, sub.plan, now_ms))
                    self._roll_at(sums, row, plan, now_ms)
                    self._write(customer_id, row, now_ms)
                self._put_all(customer_id, sums, now_ms, row)  # what expired by the boundary, in any case
            if step == "done":
                return rolled
            rolled += step == "rolled"
        return rolled

    def _roll_at(self, sums: dict[str, _Sums], row: _Row, plan: Plan | None, now_ms: int) -> None:
        """The end of a credit period, and of the billing period when it ends there too (local
        mode's Subscriptions._roll_at, on the ledger's figures)."""
        sub = row.sub
        assert sub is not None  # the caller read it
        boundary = sub.end_ms
        billing = boundary >= sub.billing_end_ms
        ending = (sub.cancel_at_end and billing) or plan is None
        if billing and not ending and plan is not None:
            after = self.catalog.plan_index.get(sub.next_plan) or plan if sub.next_plan else plan
            if sub.periods(after) != (after.period, after.cycle):
                sub.take_periods(after, boundary)
        at = boundary - 1  # what the ended period owes belongs to it
        for ct in (plan.credits if plan else {}):
            name = self._name(ct)
            for b in self._period_buckets(sub.customer_id, name, boundary, PERIOD_SOURCES):
                if b.expired:
                    self._unexpire(sums[name], b)
                    self.escrow._put_bucket(sub.customer_id, name, b)
        self._gauges(sums, sub.customer_id, plan, boundary, now_ms, at)  # before its overage is settled
        for ct, policy in (plan.credits.items() if plan else []):
            name = self._name(ct)
            s = sums[name]
            self._net(s, sub.customer_id, name, now_ms)
            self._burn_down(sub.customer_id, name, boundary, sub.n)
            self._rollover(s, sub, name, policy, boundary, ending, now_ms, at)
            self._cycle_end_overage(s, sub, name, policy, now_ms, at)
            if policy.arrears:
                self._arrears(s, sub, name, now_ms, at)
            self._close_allowance(s, sub, name, now_ms)
        self._pools_used(sub, plan, boundary)
        self._period_usage(sums, sub, plan, now_ms, at)
        planned = {self._name(ct) for ct in (plan.credits if plan else {})}
        for name in sorted(set(sums) - planned):
            # Period credits of a credit type the plan no longer has (a plan change): they expire
            # at their end like any grant (as local mode's grant expiry has it), never in silence.
            for b in self._period_buckets(sub.customer_id, name, boundary, PERIOD_SOURCES):
                self._unexpire(sums[name], b)
                self._forfeit(sums[name], sub.customer_id, name, b, b.remaining, "expire", b.grant_id, now_ms,
                              now_ms)
                b.period_n = NO_PERIOD
                self.escrow._put_bucket(sub.customer_id, name, b)
        sub.overage_billed, sub.overage_charged = {}, {}
        if ending or plan is None:
            self._end(sums, row, plan, now_ms, at)
            return
        if sub.next_plan and billing:  # a downgrade asked for during the billing period
            plan = self.catalog.plan_index.get(sub.next_plan) or plan
            sub.plan, sub.next_plan = plan.name, ""
        sub.advance(plan, boundary, billing)
        sub.included = {}
        for ct, policy in plan.credits.items():
            sub.included[self._name(ct)] = policy.included_nano
            self._included(sums, sub, plan, ct, policy.included_nano, now_ms, boundary)
        self._pools_in(sums, sub, plan, now_ms, boundary)
        self._open_allowances(sums, sub, plan, now_ms)
        if billing:
            self._billing_period(sums, sub, plan, now_ms, boundary)
            self._fees(sums, sub, plan, now_ms, boundary)

    def _period_usage(self, sums: dict[str, _Sums], sub: Subscription, plan: Plan | None, now_ms: int,
                      at: int) -> None:
        """The credit period's usage is done with: what its fallback served would have cost, as
        settled by the sidecars (a "degraded" entry per credit type, as local mode's
        ``Subscriptions.period_usage``), starts again; first the free units its gauges used
        (``_gauges`` kept them), a "free_units" entry each."""
        for m, used, free in sorted(self._free_used):  # in the catalog's order, as local mode's
            meter = self.catalog.meters[m]
            name = self._name(meter.credit_type)
            quantity = self.catalog.format_quantity(m, used)
            self._entry(sums[name], sub.customer_id, name, "free_units", 0, sums[name].shown,
                        f"{meter.name}: {quantity} of {self.catalog.format_quantity(m, free)} free", now_ms, at,
                        detail={"meter": meter.name, "quantity": quantity})
        self._free_used = []
        for ct, policy in (plan.credits.items() if plan else []):
            s = sums[self._name(ct)]
            if s.degraded > 0 and policy.fallback:
                self._entry(s, sub.customer_id, self._name(ct), "degraded", s.degraded, s.shown,
                            f"served in {policy.fallback} mode, not charged", now_ms, at)
        for s in sums.values():
            s.degraded = 0

    def _burn_down(self, customer_id: str, name: str, boundary: int, n: int) -> None:
        """Credits of the ending period spent from a bucket late in the burn-down order (at one
        sidecar's lease) while credit of an earlier one was left (at another's lease, or
        centrally) are booked as one balance would have spent them: the earlier bucket first, so
        that the roll's rollover and forfeits are local mode's. Only this period's spending moves
        (buckets of period ``n``); the sums and the leases' amounts do not."""
        buckets = sorted(self._period_buckets(customer_id, name, boundary, PERIOD_SOURCES), key=_Bucket.sort_key)
        for i, early in enumerate(buckets):
            for late in buckets[i + 1:]:
                moved = min(early.remaining + early.leased, late.consumed) if late.period_n == n else 0
                if moved <= 0:
                    continue
                central = min(moved, early.remaining)
                early.remaining -= central
                late.remaining += central
                if moved > central:  # what leases held of the early bucket, they hold of the late one
                    self._move_lease_parts(customer_id, name, early.grant_id, late.grant_id, moved - central)
                    early.leased -= moved - central
                    late.leased += moved - central
                early.consumed += moved
                late.consumed -= moved
                self.escrow._put_bucket(customer_id, name, early)
                self.escrow._put_bucket(customer_id, name, late)

    def _unsettled(self, customer_id: str, start: int, boundary: int) -> bool:
        """Some lease holds credit of the customer's and has not settled past ``boundary`` (see _unsettled)."""
        return bool(self.escrow._rows(f"SELECT 1 FROM ({_unsettled('?', '?', '?')}) x LIMIT 1",
                                      (customer_id, boundary, customer_id, start, boundary, boundary)))

    def _period_buckets(self, customer_id: str, name: str, boundary: int, sources: tuple[str, ...]) -> list[_Bucket]:
        """A plan's buckets of ``sources`` not rolled yet that expire by ``boundary``, in the order they roll."""
        buckets = self.escrow._buckets(customer_id, name, "period_n >= 0 AND expires_at_ms > 0 AND expires_at_ms <= ?",
                                       (boundary,))
        return sorted((b for b in buckets if b.source in sources), key=lambda b: (b.expires_at_ms, b.seq))

    @staticmethod
    def _unexpire(s: _Sums, b: _Bucket) -> None:
        """What of a period bucket expired at its boundary, unaudited, before its roll (escrow's
        lazy expiry, or a give-back after the boundary), is its credit left again: the roll says
        what becomes of it."""
        if b.expired:
            s.expired -= b.expired
            s.available += b.expired
            b.remaining += b.expired
            b.expired = 0

    def _rollover(self, s: _Sums, sub: Subscription, name: str, policy: CreditPolicy, boundary: int, ending: bool,
                  now_ms: int, at: int) -> None:
        """What is left of credits expiring at the boundary rolls over within the caps; the rest is forfeited."""
        expiring = self._period_buckets(sub.customer_id, name, boundary, PERIOD_SOURCES)
        ids = {b.grant_id for b in expiring}
        staying = sum(b.remaining + b.leased for b in self.escrow._buckets(
            sub.customer_id, name, "remaining_nano > 0 OR leased_nano > 0") if b.grant_id not in ids and
            b.source != OVERAGE_SOURCE)
        r = policy.rollover  # (_roll_at has given back what the lazy expiry took of the expiring buckets)
        split = rollover_split(r, [(b.remaining + b.leased, b.rollovers) for b in expiring], staying,
                               0 if ending else policy.included_nano, ending)
        for b, rolled in zip(expiring, split, strict=True):
            forfeited = b.remaining + b.leased - rolled
            held = min(forfeited, b.leased)  # stays leased in its bucket, which has expired
            self._forfeit(s, sub.customer_id, name, b, forfeited - held, "rollover_forfeited" if r else "expire",
                          b.grant_id, now_ms, at)
            if rolled:
                life = r.lifetime_periods if r is not None else 0
                expires = sub.credit_start(self._plan(sub.plan), sub.n + 1 + life) if life else 0
                gid = self._move(s, sub.customer_id, name, b, b.remaining, b.leased - held, expires, sub.n + 1, now_ms)
                self._entry(s, sub.customer_id, name, "rolled_over", rolled, s.shown, f"{b.grant_id} -> {gid}",
                            now_ms, at)
            b.period_n = NO_PERIOD
            self.escrow._put_bucket(sub.customer_id, name, b)

    def _forfeit(self, s: _Sums, customer_id: str, name: str, b: _Bucket, amount: int, kind: str, reference: str,
                 now_ms: int, at: int) -> None:
        """``amount`` of a bucket's credit left centrally is taken away, audited."""
        if amount <= 0:
            return
        invariant(amount <= b.remaining, f"{customer_id}/{name}: a forfeit of {amount} from {b.remaining} left")
        before = s.shown
        b.remaining -= amount
        s.available -= amount
        self.escrow._expire_part(s, b, amount)
        self._entry(s, customer_id, name, kind, -amount, before, reference, now_ms, at)

    def _move(self, s: _Sums, customer_id: str, name: str, b: _Bucket, remaining: int, leased: int, expires: int,
              period_n: int, now_ms: int) -> str:
        """Credit of bucket ``b`` rolls over: ``remaining`` of what is left centrally and ``leased``
        of what leases hold of it (with their parts) move to a rollover bucket; the sums do not
        change. Credits that roll over for good (no lifetime) join the customer's one bucket of
        such credits, so that an idle customer's boundaries do not pile up buckets. Returns the
        grant id of the bucket they moved to."""
        keep = [k for k in self.escrow._buckets(customer_id, name, "source = 'rollover' AND expires_at_ms = 0 AND "
                                                "(remaining_nano > 0 OR leased_nano > 0)")] if not expires else []
        if keep:
            to = keep[0]
            to.amount += remaining + leased
            to.remaining += remaining
            to.leased += leased
            self.escrow._put_bucket(customer_id, name, to)
            gid = to.grant_id
        else:
            gid = self.escrow._insert_bucket(s, customer_id, name, remaining + leased, remaining, leased, expires,
                                             SPENT_FIRST, "rollover", f"from {b.grant_id}", now_ms,
                                             period_n if expires else NO_PERIOD, b.rollovers + 1)
        b.amount -= remaining + leased
        b.remaining -= remaining
        b.leased -= leased
        self._move_lease_parts(customer_id, name, b.grant_id, gid, leased)
        return gid

    def _move_lease_parts(self, customer_id: str, name: str, source: str, target: str, amount: int) -> None:
        """``amount`` of the lease parts of bucket ``source`` become parts of bucket ``target`` (the
        caller moves the buckets' figures), sidecar by sidecar."""
        left = amount
        for sidecar_id, part in self.escrow._rows(
                "SELECT sidecar_id, amount_nano FROM meterd_lease_parts WHERE customer_id = ? AND credit_type = ? AND "
                "grant_id = ? ORDER BY sidecar_id", (customer_id, name, source)):
            take = min(left, int(part))
            if not take:
                break
            rows = self.escrow._rows("SELECT amount_nano FROM meterd_lease_parts WHERE sidecar_id = ? AND "
                                     "customer_id = ? AND credit_type = ? AND grant_id = ?",
                                     (sidecar_id, customer_id, name, target))
            self.escrow._put_part(sidecar_id, customer_id, name, source, int(part) - take)
            self.escrow._put_part(sidecar_id, customer_id, name, target, take + (int(rows[0][0]) if rows else 0))
            left -= take
        invariant(left == 0, f"{customer_id}/{name}: the parts of {source} hold less than the {amount} to move")

    # ---- overage, arrears ------------------------------------------------------------------

    def _allowance_buckets(self, customer_id: str, name: str) -> list[_Bucket]:
        """The credit type's overage allowance of the current period (not closed yet)."""
        return [b for b in self.escrow._buckets(customer_id, name, "period_n >= 0") if b.source == OVERAGE_SOURCE]

    def _unbilled(self, s: _Sums, customer_id: str, name: str) -> int:
        """What was spent of the overage allowance and not billed yet: the headroom less what the
        allowances hold (left, or leased). Not what leases owe beyond their parts (spent in an
        outage): that is in no bucket, and the next credit repays it."""
        (held,), = self.escrow._rows("SELECT COALESCE(SUM(remaining_nano + leased_nano), 0) FROM meterd_grants "
                                     "WHERE customer_id = ? AND credit_type = ? AND source = ?",
                                     (customer_id, name, OVERAGE_SOURCE))
        return max(s.headroom - int(held), 0)

    def _net(self, s: _Sums, customer_id: str, name: str, now_ms: int, upto: int | None = None) -> None:
        """Overage spent while credit was left elsewhere (at another sidecar's lease, or given
        back since) is paid from that credit first, as one balance in local mode would have:
        the credit left centrally is spent instead, in burn-down order, and the overage
        allowance has it back; then credit still at a lease is (that lease holds as much of the
        allowance instead: the sums and the leases' amounts do not move). ``upto``: only credit of
        buckets made by then (their seq; a cancel's: what was granted after it is not the period's)."""
        allowance = self._allowance_buckets(customer_id, name)
        if not allowance:
            return
        last = (1 << 62) if upto is None else upto
        credit = [b for b in self.escrow._buckets(customer_id, name) if b.source != OVERAGE_SOURCE and b.seq <= last]
        netted = min(self._unbilled(s, customer_id, name), sum(b.remaining for b in credit))
        left = max(netted, 0)
        for b in credit:
            take = min(left, b.remaining)
            b.remaining -= take
            b.consumed += take
            left -= take
            self.escrow._put_bucket(customer_id, name, b)
        back = allowance[0]
        back.consumed -= max(netted, 0)
        back.remaining += max(netted, 0)
        left = self._unbilled(s, customer_id, name) - max(netted, 0)
        for sidecar_id, grant_id, part in self.escrow._rows(
                "SELECT p.sidecar_id, p.grant_id, p.amount_nano FROM meterd_lease_parts p JOIN meterd_grants g ON "
                "g.customer_id = p.customer_id AND g.credit_type = p.credit_type AND g.grant_id = p.grant_id WHERE "
                "p.customer_id = ? AND p.credit_type = ? AND g.source <> ? AND p.amount_nano > 0 AND g.seq <= ? AND "
                "(g.period_n >= 0 OR g.expires_at_ms = 0 OR g.expires_at_ms > ?) ORDER BY p.sidecar_id, g.priority, "
                "CASE WHEN g.expires_at_ms = 0 THEN ? ELSE g.expires_at_ms END, g.seq",  # credit not ended
                (customer_id, name, OVERAGE_SOURCE, last, now_ms, NEVER_MS)) if left > 0 else []:
            take = min(left, int(part))
            if take <= 0:
                break
            b = next(c for c in self.escrow._buckets(customer_id, name, "grant_id = ?", (grant_id,)))
            b.leased -= take
            b.consumed += take
            self.escrow._put_bucket(customer_id, name, b)
            self.escrow._put_part(sidecar_id, customer_id, name, grant_id, int(part) - take)
            (held,), = self.escrow._rows("SELECT COALESCE(SUM(amount_nano), 0) FROM meterd_lease_parts WHERE "
                                         "sidecar_id = ? AND customer_id = ? AND credit_type = ? AND grant_id = ?",
                                         (sidecar_id, customer_id, name, back.grant_id))
            self.escrow._put_part(sidecar_id, customer_id, name, back.grant_id, int(held) + take)
            back.consumed -= take
            back.leased += take
            left -= take
        self.escrow._put_bucket(customer_id, name, back)

    def _settle_overage(self, s: _Sums, sub: Subscription, name: str, policy: CreditPolicy, why: str, now_ms: int,
                        at: int, upto: int | None = None) -> None:
        """Bill (or forgive) what the customer owes below zero: the balance shown is back at zero.
        ``upto``: the balance as of bucket ``upto`` (a cancel's: credit granted since pays none of it)."""
        if policy.overage is None or self._shown(s, sub.customer_id, name, upto) >= 0:
            return
        self._net(s, sub.customer_id, name, now_ms, upto)
        deficit = min(-self._shown(s, sub.customer_id, name, upto), self._unbilled(s, sub.customer_id, name))
        if deficit <= 0:
            return
        before = s.shown
        s.headroom -= deficit
        if policy.overage.at_cycle_end == "forgive" and why in ("cycle end", "cancel"):
            self._entry(s, sub.customer_id, name, "overage_forgiven", deficit, before, why, now_ms, at)
            return
        # Graduated tiers continue from what was billed earlier in the period, and what was
        # billed still counts against the period's overage limit.
        billed = sub.overage_billed.get(name, 0)
        money, tiers = policy.overage.bill(billed, deficit)
        sub.overage_billed[name] = billed + deficit
        sub.overage_charged[name] = sub.overage_charged.get(name, 0) + money
        self._entry(s, sub.customer_id, name, "overage_charged", deficit, before, why, now_ms, at, charge=money,
                    charge_ct=self._name(policy.overage.price_credit_type), detail=_tiers(tiers))

    def _cycle_end_overage(self, s: _Sums, sub: Subscription, name: str, policy: CreditPolicy, now_ms: int,
                           at: int) -> None:
        if policy.overage is None or policy.overage.at_cycle_end == "carry_repay":
            return
        if policy.overage.at_cycle_end != "carry":
            self._settle_overage(s, sub, name, policy, "cycle end", now_ms, at)
            return
        owed = sub.carried.pop(name, 0)
        if owed:  # last period's carried deficit is billed now, at the prices of that overage
            money, tiers = policy.overage.bill(sub.overage_billed.get(name, 0), owed)
            self._entry(s, sub.customer_id, name, "overage_charged", owed, s.shown, "carried from last period",
                        now_ms, at, charge=money, charge_ct=self._name(policy.overage.price_credit_type),
                        detail=_tiers(tiers))
        deficit = min(max(-s.shown, 0), self._unbilled(s, sub.customer_id, name))
        if deficit:
            before = s.shown
            s.headroom -= deficit
            self._entry(s, sub.customer_id, name, "deficit_carried", deficit, before,
                        "billed at the end of the next period", now_ms, at)
            sub.carried[name] = deficit

    def _arrears(self, s: _Sums, sub: Subscription, name: str, now_ms: int, at: int, upto: int | None = None) -> None:
        """Usage billed in arrears: the period's amount is billed and the balance starts again at zero."""
        deficit = min(max(-self._shown(s, sub.customer_id, name, upto), 0), self._unbilled(s, sub.customer_id, name))
        if deficit:
            before = s.shown
            s.headroom -= deficit
            self._entry(s, sub.customer_id, name, "usage_billed", deficit, before, f"period {sub.n}", now_ms, at,
                        charge=deficit, charge_ct=name)

    def _shown(self, s: _Sums, customer_id: str, name: str, upto: int | None) -> int:
        """The balance shown, without the credit left of buckets made after bucket ``upto`` (if given)."""
        if upto is None:
            return s.shown
        (later,), = self.escrow._rows("SELECT COALESCE(SUM(remaining_nano + leased_nano), 0) FROM meterd_grants WHERE "
                                      "customer_id = ? AND credit_type = ? AND seq > ? AND source <> ?",
                                      (customer_id, name, upto, OVERAGE_SOURCE))
        return s.shown - int(later)

    def _close_allowance(self, s: _Sums, sub: Subscription, name: str, now_ms: int, upto: int | None = None) -> None:
        """The period's overage allowance ends: what it left unspent is no credit and leaves the
        sums. What was spent of it and not billed (``carry_repay``'s deficit, or overage spent
        while credit sat at a lease elsewhere) becomes what the customer owes (overdrawn), repaid
        first by the next credit there is, as one balance in local mode would be. ``upto``: see ``_net``."""
        self._net(s, sub.customer_id, name, now_ms, upto)
        for b in self._allowance_buckets(sub.customer_id, name):
            unspent = b.remaining + b.expired
            s.available -= b.remaining
            s.headroom -= b.remaining
            s.expired -= b.expired
            s.granted -= unspent
            b.amount -= unspent
            b.remaining = b.expired = 0
            b.period_n = NO_PERIOD
            b.expires_at_ms = min(b.expires_at_ms or now_ms, now_ms)  # what leases hold of it comes back expired
            self.escrow._put_bucket(sub.customer_id, name, b)
            owed = self._unbilled(s, sub.customer_id, name)
            if owed > 0:
                self.escrow._owe(s, sub.customer_id, name, b, owed)
            self.escrow._settle_debts(s, sub.customer_id, name, now_ms)
            if b.leased:
                self._recall(sub.customer_id, name, now_ms)

    # ---- gauges -------------------------------------------------------------------------------
    # A max or unique_count meter is charged once per period on its value, as local mode does at a
    # roll, a cancel, or (for a customer without a plan) a calendar month's end. Each sidecar counts
    # only what it served, so the ledger charges it, from the usage windows every sidecar flushed
    # (the largest quantity; the distinct values of the unique dimension), windows by the start of
    # their minute: an event in the minute of a boundary counts in the period that minute starts in.

    def _gauge_meters(self) -> list[int]:
        return [m for m, meter in enumerate(self.catalog.meters) if AGGREGATIONS[meter.aggregation] in CENTRAL_GAUGES]

    def _gauge_value(self, customer_id: str, m: int, start: int, end: int) -> int:
        """The meter's value over the usage windows from ``start`` to ``end`` (ms; end excluded)."""
        meter = self.catalog.meters[m]
        where = "customer_id = ? AND meter = ? AND window_start_ms >= ? AND window_start_ms < ?"
        args = (customer_id, meter.name, start, end)
        if meter.aggregation == AGGREGATIONS.index("max"):
            (top,), = self.escrow._rows(f"SELECT COALESCE(MAX(quantity), 0) FROM meterd_usage WHERE {where}", args)
            return int(top)
        values = {json.loads(d).get(meter.unique_dimension) for d, in
                  self.escrow._rows(f"SELECT DISTINCT dimensions FROM meterd_usage WHERE {where}", args)}
        return len(values - {None})

    def _gauges(self, sums: dict[str, _Sums], customer_id: str, plan: Plan | None, upto: int | None, now_ms: int,
                at: int) -> None:
        """The customer's gauges charged on their value from their last charge up to ``upto`` (a
        boundary, a cancel, a month's start), less the plan's free units, with a "gauge_charged"
        entry each (effective ``at``), and the free units they used kept for ``_period_usage``; a
        window of the last charge's that was flushed after it is charged what it adds first, at the
        free units of that charge (``upto`` None: only that). ``sums`` holds their credit types'
        rows, locked; the gauge rows are locked here, in code-point order (as a flush writes them)."""
        probe = _probe(self.catalog.compiled)
        self._free_used = []
        gauges = {r[0]: [int(x) for x in r[1:]] for r in self.escrow._rows(
            "SELECT meter, charged_to_ms, last_from_ms, last_value, remainder, pending_from_ms, last_free FROM "
            f"meterd_gauges WHERE customer_id = ? ORDER BY meter{self._in_code_points}{self._lock}", (customer_id,))}
        for m in self._gauge_meters():
            meter = self.catalog.meters[m]
            if meter.name not in gauges:
                continue  # nothing flushed, ever
            charged_to, last_from, last_value, remainder, pending, last_free = gauges[meter.name]
            rate = probe.find_rate(m, {})
            _, ct, amount, factor = probe.rates[rate]
            denom = probe.denom[ct]
            name = self._name(ct)
            if pending < charged_to:  # flushed late: the last charge's windows again
                late = self._gauge_value(customer_id, m, last_from, charged_to)
                units = max(late - last_free, 0) - max(last_value - last_free, 0)
                if units > 0:
                    reference = (f"{meter.name}={self.catalog.format_quantity(m, late)} (flushed late; "
                                 f"{self.catalog.format_quantity(m, last_value)} was charged)")
                    remainder = self._charge_gauge(sums[name], customer_id, name, units, amount * factor, denom,
                                                   remainder, now_ms, charged_to - 1, reference)  # its period's
                last_value = max(late, last_value)
            if upto is not None and upto > charged_to:
                last_free = int(plan.free_units.get(meter.name, 0) * 10**meter.precision) if plan is not None else 0
                last_from, last_value = charged_to, self._gauge_value(customer_id, m, charged_to, upto)
                charged = last_value - last_free if last_value > last_free else 0
                if last_value:  # an entry even when its free units cover it all, as local mode's
                    remainder = self._charge_gauge(sums[name], customer_id, name, charged, amount * factor, denom,
                                                   remainder, now_ms, at,
                                                   f"{meter.name}={self.catalog.format_quantity(m, last_value)}")
                if last_free and last_value:
                    self._free_used.append((m, min(last_value, last_free), last_free))
                charged_to = upto
            later = self.escrow._rows("SELECT 1 FROM meterd_usage WHERE customer_id = ? AND meter = ? AND "
                                      "window_start_ms >= ? LIMIT 1", (customer_id, meter.name, charged_to))
            self.escrow._exec("UPDATE meterd_gauges SET charged_to_ms = ?, last_from_ms = ?, last_value = ?, "
                              "remainder = ?, pending_from_ms = ?, due_ms = ?, last_free = ? WHERE customer_id = ? AND "
                              "meter = ?",
                              (charged_to, last_from, last_value, str(remainder),
                               charged_to if later else NO_PENDING_MS,
                               month_bounds(charged_to)[1] + GAUGE_GRACE_MS if later else NO_PENDING_MS, last_free,
                               customer_id, meter.name))

    def _charge_gauge(self, s: _Sums, customer_id: str, name: str, units: int, fine: int, denom: int,
                      remainder: int, now_ms: int, at: int, reference: str) -> int:
        """What ``units`` cost (``fine`` each, in 1/``denom`` nano, the remainder carried), taken
        from the balance as one balance would pay it: its credit in burn-down order, then the
        period's overage allowance (billed with the period's overage; beyond its limit too, as
        local mode bills what its balance is below zero). Without an allowance, what the balance
        does not hold is owed (overdrawn), repaid first by the next credit. Returns the remainder."""
        cost, remainder = divmod(units * fine + remainder, denom)
        allowances = self._allowance_buckets(customer_id, name)
        # A value no price list means: one charge takes at most GAUGE_CHARGE_MAX_NANO, and none takes
        # the balance row's (or an allowance's) sums past GAUGE_SUMS_MAX_NANO, so that the 64-bit
        # columns hold whatever else comes (a tenant's charges cannot stop its rolls, nor others').
        room = GAUGE_SUMS_MAX_NANO - max([s.consumed, s.granted, s.overdrawn, s.headroom,
                                          *(b.amount for b in allowances)])
        most = max(min(GAUGE_CHARGE_MAX_NANO, room), 0)
        if cost > most:
            log.error("%s: gauge charge %s (%d nano) taken as %d nano, the most it may be", customer_id, reference,
                      cost, most)
            cost, remainder = most, 0
        before = s.shown
        for b in allowances if cost > s.available else []:
            if b.expired:  # expired at the boundary (or the cancel) it belongs to: the period's overage
                s.headroom += b.expired  # headroom again, as its expiry took it out (Escrow._expire_part)
                self._unexpire(s, b)
                self.escrow._put_bucket(customer_id, name, b)
        taken = min(cost, max(s.available, 0))

        def spent(b: _Bucket, take: int) -> None:
            b.consumed += take
        self.escrow._take_remaining(s, customer_id, name, taken, spent)
        s.available -= taken
        s.consumed += cost
        beyond = cost - taken
        allowances = self._allowance_buckets(customer_id, name) if beyond else []  # as the take left them
        if allowances:  # overage past the limit: the allowance holds it, spent, to be billed
            b = allowances[-1]
            b.amount += beyond
            b.consumed += beyond
            s.granted += beyond
            s.headroom += beyond
            self.escrow._put_bucket(customer_id, name, b)
        elif beyond:
            s.available -= beyond  # available is the buckets' remaining credit less what is overdrawn
            s.overdrawn += beyond
        self._entry(s, customer_id, name, "gauge_charged", -cost, before, reference, now_ms, at)
        return remainder

    def gauges_due(self, now_ms: int, limit: int) -> int:
        """Gauges of up to ``limit`` customers charged outside a roll (``meterd_gauges.due_ms``):
        windows flushed after their period was charged (the difference they make), and a calendar
        month's for a customer without a plan (as local mode charges them then), GAUGE_GRACE_MS
        after it ends, so that the sidecars have flushed it. A customer whose charge fails is
        logged and looked at again GAUGE_RETRY_MS later (the others go on). On PostgreSQL a
        customer another caller is sweeping is skipped. Returns how many customers it looked at."""
        month = month_bounds(now_ms - GAUGE_GRACE_MS)[0]
        due = self.escrow._rows(f"SELECT customer_id FROM meterd_gauges WHERE due_ms <= ? ORDER BY due_ms "
                                f"LIMIT {int(limit) * 4}", (now_ms,))
        customers = list(dict.fromkeys(r[0] for r in due))[:limit]
        for customer_id in customers:
            try:
                with self.ledger._transaction():
                    if self.ledger.dialect == "postgresql":  # another sidecar's sweep has it: the next one
                        (free,), = self.escrow._rows("SELECT pg_try_advisory_xact_lock(?, hashtext(?))",
                                                     (GAUGE_LOCK_SPACE, customer_id))
                        if not free:
                            continue
                    first = self._read(customer_id, False).sub
                    sums = self._lock_sums(customer_id, self._credit_types(first), now_ms)
                    row = self._read(customer_id, True)
                    if row.sub is None:  # the month's end, and what was flushed late
                        self._gauges(sums, customer_id, None, month, now_ms, month - 1)
                    else:  # a subscription's periods are charged at their rolls: only what was flushed late
                        self._gauges(sums, customer_id, None, None, now_ms, now_ms)
                    # Looked at (a meter the catalog no longer has, too): due again when a flush says so.
                    self.escrow._exec("UPDATE meterd_gauges SET due_ms = ? WHERE customer_id = ? AND due_ms <= ?",
                                      (NO_PENDING_MS, customer_id, now_ms))
                    self._put_all(customer_id, sums, now_ms)
            except Exception:  # noqa: BLE001 - one customer's failure does not stop the others' charges
                log.exception("the gauges of %r could not be charged; trying again in %d s", customer_id,
                              GAUGE_RETRY_MS // 1000)
                with self.ledger._transaction():
                    self.escrow._exec("UPDATE meterd_gauges SET due_ms = ? WHERE customer_id = ? AND due_ms <= ?",
                                      (now_ms + GAUGE_RETRY_MS, customer_id, now_ms))
        return len(customers)

    # ---- the end of a subscription -----------------------------------------------------------

    def _end(self, sums: dict[str, _Sums], row: _Row, plan: Plan | None, now_ms: int, at: int) -> None:
        """The subscription ends: its period credits go (what leases hold of them expires when given back)."""
        sub = row.sub
        assert sub is not None  # the caller read it
        for name in sorted(sums):  # every credit type locked: those of its plans and of its period buckets
            s = sums[name]
            self._close_allowance(s, sub, name, now_ms)  # none left open, whatever plan (if any) gave it
            for b in self._period_buckets(sub.customer_id, name, 1 << 62, PERIOD_SOURCES):
                self._unexpire(s, b)
                self._forfeit(s, sub.customer_id, name, b, b.remaining, "expire",
                              f"{b.grant_id} subscription ended", now_ms, at)
                b.period_n = NO_PERIOD
                b.expires_at_ms = min(b.expires_at_ms, now_ms)  # what leases hold of it comes back expired
                self.escrow._put_bucket(sub.customer_id, name, b)
            self._recall(sub.customer_id, name, now_ms)
        row.fallbacks = {self._name(ct): policy.fallback for ct, policy in (plan.credits.items() if plan else [])
                         if policy.fallback}
        row.sub = None

    def _recall(self, customer_id: str, name: str, now_ms: int) -> None:
        """Every sidecar's lease of the credit type is asked back (at its next heartbeat it settles and
        gives back what it has free): what it holds of credits that ended is not spent on."""
        self.escrow._exec("UPDATE meterd_leases SET recall_ms = ? WHERE customer_id = ? AND credit_type = ? AND "
                          "amount_nano > 0 AND recall_ms = 0", (now_ms, customer_id, name))


def _tiers(tiers: list[tuple[int, int, str, int]]) -> dict | None:
    """An entry's detail with its charge by tier (as a sidecar's flush has it)."""
    if not tiers:
        return None
    return {"tiers": [{"tier": n, "units_nano": u, "unit_price": p, "charge_nano": c} for n, u, p, c in tiers]}


__all__ = ["LedgerPlans", "ROOM_MAX_NANO", "unserved"]
