"""Subscriptions: a customer on a plan, its billing periods and what happens at
each boundary (included credits, rollover, overage, gauges, fees).

Boundaries are applied exactly: before any operation, every subscription
whose period has ended is rolled over (``roll_due``), and so does the
housekeeping timer, so no event after a boundary is ever rated against the
old period. Each rollover is one commit, logged like every other change, so a
restart reaches the same state.
"""

from __future__ import annotations

import asyncio
import heapq
import json
from typing import Sequence

from meterd import records
from meterd.audit import Audit
from meterd.catalog import format_nano
from meterd.clock import Clock
from meterd.corespec import relax_priority
from meterd.errors import Conflict, InvalidInput, NotFound
from meterd.grants import Grants
from meterd.holds import Holds
from meterd.journal import Journal
from meterd.ledger import activity_line
from meterd.plans import CreditPolicy, Plan, overage_floor, prorated, rollover_split
from meterd.records import Kind
from meterd.results import Term
from meterd.state import Bucket, Live, Subscription
from meterd.store import Op, Store
from meterd.validate import NAME_ECHO_CHARS

INT64_MIN = -(1 << 63)
SPENT_FIRST = 0  # bucket priority of a plan's own credits: spent before grants bought separately
SUBSCRIBE_AHEAD_MS_MAX = 366 * 86_400_000  # how far ahead a subscription's start may be given
# A customer's own terms, over its plan's and the catalog's (Admin SetTerm): how far
# below zero its balance may go, a discount off every price (in 1/DISCOUNT_SCALE),
# the most its overage may cost a period (in the overage's money), the credits
# included each period.
TERMS = ("overdraft", "discount", "budget", "included")


class Subscriptions:
    """Plans and their periods; see the module docstring."""

    def __init__(self, store: Store, live: Live, journal: Journal, clock: Clock, audit: Audit, grants: Grants,
                 holds: Holds) -> None:
        self.store = store
        self.live = live
        self.journal = journal
        self.clock = clock
        self.audit = audit
        self.grants = grants
        self.holds = holds
        self.subs: dict[str, Subscription] = {}
        self._boundaries: list[tuple[int, str]] = []  # (period end, customer), soonest first
        # customer: term: credit type name: its value (Admin SetTerm, SetOverdraft), kept in "overrides"
        self.terms: dict[str, dict[str, dict[str, int]]] = {}
        self.rolling: asyncio.Future | None = None  # the last period roll submitted
        self.renamed: list[Op] = []  # subscriptions renumbered onto a changed catalog by load, to keep
        grants.credited.append(self.topup_done_ops)

    def load(self, credit_types: Sequence[str] | None = None) -> None:
        """Read the subscriptions back. ``credit_types``: the names of the catalog they were
        kept under, when it numbers credit types otherwise than the current one: they are
        renumbered, and ``renamed`` holds the ops that keep them so (for the snapshot that
        moves the accounts onto the current catalog)."""
        self.subs = {}
        self._boundaries = []
        self.terms = {key.decode(): json.loads(value) for key, value in self.store.items("overrides")}
        for _, value in self.store.items("subs"):
            sub = Subscription(**json.loads(value))
            self.subs[sub.customer_id] = sub
            self._boundaries.append((sub.end_ms, sub.customer_id))
        heapq.heapify(self._boundaries)
        self.renamed = self.rename(credit_types) if credit_types is not None else []

    def rename(self, credit_types: Sequence[str]) -> list[Op]:
        """Renumber what subscriptions keep per credit type (by its number in the catalog
        named by ``credit_types``) to the current catalog's numbers; a credit type it lacks
        is dropped. The ops keep every subscription that changed."""
        index = self.live.catalog.credit_index
        moved = {str(k): index.get(name) for k, name in enumerate(credit_types)}
        if all(v == int(k) for k, v in moved.items()):
            return []

        def renumbered(values: dict[str, int]) -> dict[str, int]:
            return {str(moved[k]): v for k, v in values.items() if moved.get(k) is not None}
        ops: list[Op] = []
        for sub in self.subs.values():
            sub.overage_billed, sub.overage_charged = renumbered(sub.overage_billed), renumbered(sub.overage_charged)
            sub.carried, sub.included = renumbered(sub.carried), renumbered(sub.included)
            sub.topup_pending = [moved[str(ct)] for ct in sub.topup_pending  # type: ignore[misc]
                                 if moved.get(str(ct)) is not None]
            ops.append(("subs", sub.customer_id.encode(), sub.to_json()))
        return ops

    def roll_if_due(self, now: int | None = None) -> None:
        """Roll the subscriptions whose period has ended, before anything else happens.

        The roll is submitted as a commit of its own, ahead of the caller's
        (the writer is FIFO), so that a caller that then fails on bad input
        cannot lose it."""
        if now is None:
            now = self.clock.now_ms()
        if not (self._boundaries and self._boundaries[0][0] <= now):
            return
        ops = self.roll_due(now)
        if ops:
            self.rolling = self.journal.submit_ahead(ops)

    async def roll_settled(self) -> None:
        """A caller with nothing of its own to commit still answers only once the
        period roll it may have set off is durable, like the state it was answered from."""
        fut = self.rolling
        if fut is not None and not fut.done():
            await asyncio.shield(fut)

    def fallback(self, customer_id: str, ct: int) -> tuple[str, int] | None:
        """The plan's fallback mode for a credit type and the priority hint for the
        customer's degraded usage, or None when the plan has none."""
        sub = self.subs.get(customer_id)
        plan = self.live.catalog.plan_index.get(sub.plan) if sub else None
        policy = plan.credits.get(ct) if plan else None
        if policy is None or not policy.fallback:
            return None
        core = self.live.core
        degraded = core.state(core.account(customer_id.encode()))[0][ct][4]
        return policy.fallback, relax_priority(degraded, policy.priority_step_nano)

    # ---- core settings of a plan, logged so that replay sets them too ----------------

    def _core_op(self, kind: Kind, customer_id: str, ct: int, value: int) -> Op:
        return self.journal.log_op(records.account(kind, customer_id.encode(), ct, value, self.clock.now_ms()))

    # ---- a customer's own terms ---------------------------------------------------------

    def terms_of(self, customer_id: str) -> tuple[Term, ...]:
        """The customer's own terms, in TERMS order, then by credit type."""
        own = self.terms.get(customer_id, {})
        return tuple(Term(ct_name, name, value) for name in TERMS
                     for ct_name, value in sorted(own.get(name, {}).items()))

    def term(self, customer_id: str, name: str, ct: int) -> int | None:
        """The customer's own value of a term (TERMS) in credit type ``ct``, or None."""
        return self.terms.get(customer_id, {}).get(name, {}).get(self.live.catalog.credit_types[ct].name)

    def term_ops(self, customer_id: str, name: str, ct: int, value: int | None) -> list[Op]:
        """Set (None: clear) the customer's own value of a term in credit type ``ct``, and
        apply it at once: the floor it makes, the core's discount, or the included credits."""
        own = self.terms.setdefault(customer_id, {})
        values = own.setdefault(name, {})
        ct_name = self.live.catalog.credit_types[ct].name
        if value is None:
            values.pop(ct_name, None)
        else:
            values[ct_name] = value
        if not values:
            del own[name]
        if not own:
            del self.terms[customer_id]
        ops: list[Op] = [("overrides", customer_id.encode(), json.dumps(own).encode() if own else None)]
        if name == "discount":
            return ops + self.discount_ops(customer_id, ct)
        if name == "included":
            return ops + self.included_raise_ops(customer_id, ct)
        return ops + self.floor_ops(customer_id, ct)

    def discount_ops(self, customer_id: str, ct: int) -> list[Op]:
        """Bring the core's discount in line with the customer's own."""
        discount = self.term(customer_id, "discount", ct) or 0
        idx = self.live.core.account(customer_id.encode())
        if (self.live.core.discount(idx, ct) if idx >= 0 else 0) == discount:
            return []
        idx = self.live.core.open_account(customer_id.encode())
        self.live.core.set_discount(idx, ct, discount)
        return [self._core_op(Kind.DISCOUNT, customer_id, ct, discount)]

    def included_nano(self, customer_id: str, policy: CreditPolicy, ct: int) -> int:
        """The credits included each period: the customer's own amount, else the plan's (``policy``)."""
        own = self.term(customer_id, "included", ct)
        return policy.included_nano if own is None else own

    def included_raise_ops(self, customer_id: str, ct: int) -> list[Op]:
        """A customer's own included amount above what its period was given: the
        difference now, expiring with the period. A lower one waits for the next period
        (what a period was given is not taken back)."""
        sub = self.subs.get(customer_id)
        plan = self._plan_or_none(sub.plan) if sub else None
        if sub is None or plan is None or ct not in plan.credits:
            return []
        given = sub.included.get(str(ct), plan.credits[ct].included_nano)
        want = self.included_nano(customer_id, plan.credits[ct], ct)
        if want <= given:
            return []
        sub.included[str(ct)] = want
        return self._included_ops(sub, plan, ct, want - given) + [self._put_sub(sub)]

    def effective_floor(self, customer_id: str, ct: int) -> int:
        """How far below zero a balance may go: the customer's own overdraft (set by
        Admin), else the catalog's for the customer if it names one, else the plan's
        (an overage limit less what was billed of it early this period, or no limit
        in arrears), else 0. The customer's own budget replaces the plan's limit, and
        bounds an overdraft too: what is below zero at the period's end is billed as overage."""
        own = self.term(customer_id, "overdraft", ct)
        seed = self.live.catalog.customer_index.get(customer_id)
        if own is None and seed is not None and ct in seed.overdraft_nano:
            own = seed.overdraft_nano[ct]
        sub = self.subs.get(customer_id)
        plan = self._plan_or_none(sub.plan) if sub else None
        policy = plan.credits.get(ct) if plan else None
        overage = policy.overage if policy else None
        billed = sub.overage_billed.get(str(ct), 0) if sub is not None else 0
        charged = sub.overage_charged.get(str(ct), 0) if sub is not None else 0
        budget = self.term(customer_id, "budget", ct)
        if overage is not None and budget is not None:
            # The period's overage may cost at most the budget, what was billed of it
            # counted (so a budget raised mid-period never lets the period exceed it),
            # and an overdraft may not take it further: what is below zero is billed as overage.
            floor = -overage.units_within(billed, budget - charged)
            return floor if own is None else max(floor, -own)
        if own is not None:
            return -own
        return overage_floor(policy, billed, charged)

    def floor_ops(self, customer_id: str, ct: int) -> list[Op]:
        """Bring the core's floor in line with ``effective_floor``."""
        floor = self.effective_floor(customer_id, ct)
        idx = self.live.core.account(customer_id.encode())
        if (self.live.core.state(idx)[0][ct][2] if idx >= 0 else 0) == floor:
            return []
        idx = self.live.core.open_account(customer_id.encode())
        self.live.core.set_floor(idx, ct, floor)
        return [self._core_op(Kind.FLOOR, customer_id, ct, floor)]

    def apply_plan_ops(self, customer_id: str, plan: Plan | None) -> list[Op]:
        """Plan index, floors and alert thresholds in the core for ``plan`` (None: no plan)."""
        idx = self.live.core.open_account(customer_id.encode())
        ops = []
        if self.live.core.state(idx)[2] != (plan.index if plan else 0):
            self.live.core.set_plan(idx, plan.index if plan else 0)
            ops.append(self._core_op(Kind.PLAN, customer_id, 0, plan.index if plan else 0))
        for ct in range(len(self.live.catalog.credit_types)):
            policy = plan.credits.get(ct) if plan else None
            alert = policy.alert_nano if policy else None
            ops += self.floor_ops(customer_id, ct)
            cts = self.live.core.state(idx)[0][ct]
            if cts[5] != (INT64_MIN if alert is None else alert):
                self.live.core.set_alert(idx, ct, alert)
                ops.append(self._core_op(Kind.ALERT, customer_id, ct, INT64_MIN if alert is None else alert))
        return ops

    def _put_sub(self, sub: Subscription) -> Op:
        heapq.heappush(self._boundaries, (sub.end_ms, sub.customer_id))
        return ("subs", sub.customer_id.encode(), sub.to_json())

    def _plan(self, name: str) -> Plan:
        plan = self.live.catalog.plan_index.get(name)
        if plan is None:
            raise InvalidInput("plan", f"unknown plan {name[:NAME_ECHO_CHARS]!r}")
        return plan

    # ---- subscribe, cancel, change plan ---------------------------------------------

    def subscribe_ops(self, customer_id: str, plan_name: str, start_ms: int, now: int) -> tuple[list[Op], Subscription]:
        if customer_id in self.subs:
            raise Conflict(f"customer {customer_id!r} is subscribed already; use ChangePlan")
        plan = self._plan(plan_name)
        if start_ms > now:
            raise InvalidInput("start_ms", "must not be in the future")
        sub = Subscription.starting(customer_id, plan, start_ms, now)
        self.subs[customer_id] = sub
        ops = self.apply_plan_ops(customer_id, plan)
        for ct in plan.credits:
            sub.included[str(ct)] = self.included_nano(customer_id, plan.credits[ct], ct)
            ops += self._included_ops(sub, plan, ct, sub.included[str(ct)])
        if plan.trial_nano and not self._had_trial(customer_id):
            for ct, amount in plan.trial_nano.items():
                add, _ = self.grants.add_bucket(customer_id, ct, amount, now + plan.trial_days * 86_400_000,
                                                SPENT_FIRST, "trial", credit=True)
                ops += add
            ops.append(("meta", f"trial\x00{customer_id}".encode(), b"1"))  # one trial per customer
        ops += self._billing_period_ops(sub, plan) + self._fee_ops(sub, plan)
        ops.append(self._put_sub(sub))
        return ops, sub

    def _billing_period_ops(self, sub: Subscription, plan: Plan) -> list[Op]:
        """A billing_period entry: where a statement of the period starts and ends."""
        ct = next(iter(plan.fees_nano), 0)
        idx = self.live.core.account(sub.customer_id.encode())
        bal = self.live.core.state(idx)[0][ct][0] if idx >= 0 else 0
        with self.audit.effective(sub.billing_start_ms):
            return self.audit.entry_ops(sub.customer_id, "billing_period", ct, 0, bal, bal,
                                        f"{plan.name} period {sub.billing_n}", period_end_ms=sub.billing_end_ms)

    def period_usage(self, sub: Subscription, plan: Plan | None, idx: int) -> list[tuple[str, int, int, str, str, str]]:
        """The credit period's free units used per meter, and per credit type what the usage
        served in the fallback mode would have cost, so far: (kind, credit type, amount,
        description, meter, quantity) each."""
        if plan is None or idx < 0:
            return []
        out = []
        cts, use, _ = self.live.core.state(idx)
        catalog = self.live.catalog
        for m, meter in enumerate(catalog.meters):
            free = int(plan.free_units.get(meter.name, 0) * 10**meter.precision)
            used = min(use[m], free)
            if used > 0:
                quantity = catalog.format_quantity(m, used)
                out.append(("free_units", meter.credit_type, 0,
                            f"{meter.name}: {quantity} of {catalog.format_quantity(m, free)} free", meter.name,
                            quantity))
        for ct, policy in plan.credits.items():
            if cts[ct][4] > 0 and policy.fallback:
                out.append(("degraded", ct, cts[ct][4], f"served in {policy.fallback} mode, not charged", "", ""))
        return out

    def _period_usage_ops(self, sub: Subscription, plan: Plan | None, idx: int) -> list[Op]:
        """At the end of a credit period (or a cancel): ``period_usage`` as audit entries."""
        ops: list[Op] = []
        cts = self.live.core.state(idx)[0] if idx >= 0 else []
        for kind, ct, amount, description, meter, quantity in self.period_usage(sub, plan, idx):
            bal = cts[ct][0]
            ops += self.audit.entry_ops(sub.customer_id, kind, ct, amount, bal, bal, description, meter=meter,
                                        quantity=quantity)
        return ops

    def usage_so_far(self, customer_id: str) -> list[dict]:
        """The current credit period's ``period_usage`` as statement activity lines (the
        ledger has them once the period ends)."""
        sub = self.subs.get(customer_id)
        if sub is None:
            return []
        names = self.live.catalog.credit_types
        idx = self.live.core.account(customer_id.encode())
        return [activity_line(kind, f"{description} (this period so far)", names[ct].name, amount, quantity)
                for kind, ct, amount, description, _, quantity
                in self.period_usage(sub, self._plan_or_none(sub.plan), idx)]

    def _had_trial(self, customer_id: str) -> bool:
        return self.store.get("meta", f"trial\x00{customer_id}".encode()) is not None

    def cancel_ops(self, customer_id: str, at_period_end: bool) -> tuple[list[Op], Subscription]:
        sub = self.subs.get(customer_id)
        if sub is None:
            raise NotFound(f"customer {customer_id!r} has no subscription")
        if at_period_end:
            sub.cancel_at_end = True
            return [self._put_sub(sub)], sub
        plan = self._plan_or_none(sub.plan)
        idx = self.live.core.account(customer_id.encode())
        ops = self._gauge_ops(sub, idx)  # what the period used so far is charged now
        ops += self._period_usage_ops(sub, plan, idx)
        for ct, policy in (plan.credits.items() if plan else []):
            ops += self.settle_overage_ops(customer_id, ct, policy, "cancel")
            if policy.arrears:
                ops += self._arrears_ops(sub, ct)
        if idx >= 0:  # the period ends here: its usage (gauges, free units, tiers, fallback) is done with
            self.live.core.reset_usage(idx)
            ops.append(self._core_op(Kind.RESET_USAGE, customer_id, 0, 0))
        ops += self._end_ops(sub, plan, sub.start_ms)
        return ops, sub

    def change_plan_ops(self, customer_id: str, plan_name: str, now: int) -> tuple[list[Op], Subscription]:
        """An upgrade takes effect now: the fee difference and the extra included
        credits for the time left, and overage so far billed at the old prices.
        A downgrade takes effect when the period (already paid for) ends."""
        sub = self.subs.get(customer_id)
        if sub is None:
            raise NotFound(f"customer {customer_id!r} has no subscription")
        new = self._plan(plan_name)
        old = self._plan_or_none(sub.plan)
        if not sub.plan_change(old, new):
            return [self._put_sub(sub)], sub
        left, length = sub.end_ms - now, sub.end_ms - sub.start_ms  # of the credit period
        ops: list[Op] = []
        for ct, policy in (old.credits.items() if old else []):
            ops += self.settle_overage_ops(customer_id, ct, policy, "plan change")
        ops += self._fee_difference_ops(sub, old, new, sub.billing_end_ms - now,
                                        sub.billing_end_ms - sub.billing_start_ms)
        sub.plan = new.name
        # What was billed of the period's overage stays billed: the new plan's limit
        # counts it (the period's overage, whatever plan it was under), and its
        # graduated tiers continue from it.
        ops += self.apply_plan_ops(customer_id, new)
        for ct in new.credits:
            before = sub.included.get(str(ct), old.credits[ct].included_nano if old and ct in old.credits else 0)
            after = self.included_nano(customer_id, new.credits[ct], ct)
            ops += self._included_ops(sub, new, ct, max(after - before, 0) * left // length)
            sub.included[str(ct)] = max(after, before)
        ops.append(self._put_sub(sub))
        return ops, sub

    def _plan_or_none(self, name: str) -> Plan | None:
        return self.live.catalog.plan_index.get(name)

    def _included_ops(self, sub: Subscription, plan: Plan, ct: int, amount: int) -> list[Op]:
        if amount <= 0:
            return []
        days = plan.credits[ct].expiry_days
        # Credits that live on past the period are not the period's: they are not rolled or forfeited with it.
        source = "included" if days is None else "granted"
        expires = sub.end_ms if days is None else (sub.start_ms + days * 86_400_000 if days else 0)
        ops, _ = self.grants.add_bucket(sub.customer_id, ct, amount, expires, SPENT_FIRST, source, credit=True,
                                  kind="included")
        return ops

    def _fee_difference_ops(self, sub: Subscription, old: Plan | None, new: Plan, left: int, length: int) -> list[Op]:
        """An upgrade pays the fee difference for the time left; a downgrade is not refunded."""
        ops: list[Op] = []
        idx = self.live.core.account(sub.customer_id.encode())
        for ct, fee in new.fees_nano.items():
            diff = fee - (old.fees_nano.get(ct, 0) if old else 0)
            if diff <= 0:
                continue
            charge = prorated(diff, left, length)
            bal = self.live.core.state(idx)[0][ct][0]
            ops += self.audit.entry_ops(sub.customer_id, "fee", ct, 0, bal, bal, f"{new.name} upgrade proration",
                                  charge=charge, charge_ct=ct)
        return ops

    def _period_buckets(self, sub: Subscription, ct: int, boundary: int, sources: tuple[str, ...]) -> list[Bucket]:
        acct = self.grants.accounts.get(sub.customer_id)
        if acct is None:
            return []
        return sorted((b for b in acct.buckets.get(ct, []) if b.source in sources and b.expires_at_ms
                       and b.expires_at_ms <= boundary), key=lambda b: (b.expires_at_ms, b.order))

    def _fee_ops(self, sub: Subscription, plan: Plan) -> list[Op]:
        ops: list[Op] = []
        idx = self.live.core.account(sub.customer_id.encode())
        for ct, fee in plan.fees_nano.items():
            bal = self.live.core.state(idx)[0][ct][0] if idx >= 0 else 0
            ops += self.audit.entry_ops(sub.customer_id, "fee", ct, 0, bal, bal,
                                        f"{plan.name} period {sub.billing_n}", charge=fee, charge_ct=ct)
        return ops

    # ---- period boundaries -------------------------------------------------------------

    def roll_due(self, now: int) -> list[Op]:
        """Roll every subscription whose period ended at or before ``now``."""
        ops: list[Op] = []
        while self._boundaries and self._boundaries[0][0] <= now:
            end, customer_id = heapq.heappop(self._boundaries)
            sub = self.subs.get(customer_id)
            if sub is None or sub.end_ms != end:
                continue  # a stale heap entry
            while sub.end_ms <= now and customer_id in self.subs:
                ops += self._roll(sub)
        return ops

    def _roll(self, sub: Subscription) -> list[Op]:
        plan = self._plan_or_none(sub.plan)
        boundary = sub.end_ms
        with self.audit.effective(boundary - 1):  # what the ended period owes belongs to it
            return self._roll_at(sub, plan, boundary)

    def _roll_at(self, sub: Subscription, plan: Plan | None, boundary: int) -> list[Op]:
        """The end of a credit period, and of the billing period when it ends there too: only
        then are a cancel at the period's end, a downgrade and the next fee due."""
        ops: list[Op] = []
        billing = boundary >= sub.billing_end_ms
        ending = (sub.cancel_at_end and billing) or plan is None
        if billing and not ending and plan is not None:
            # The plan the next period is on (a downgrade waits for this boundary): when its
            # periods are not the subscription's (a catalog changed them), they apply from here,
            # before anything of the next periods (a rollover's lifetime) is counted in them.
            after = self._plan_or_none(sub.next_plan) or plan if sub.next_plan else plan
            if sub.periods(after) != (after.period, after.cycle):
                sub.take_periods(after, boundary)
        idx = self.live.core.account(sub.customer_id.encode())
        ops += self._gauge_ops(sub, idx)  # the ended period's gauges, before its overage is settled
        for ct, policy in (plan.credits.items() if plan else []):
            ops += self.grants.reconcile(sub.customer_id, ct, self.live.core.state(idx)[0][ct][0])
            ops += self._rollover_ops(sub, ct, policy, boundary, ending)
            ops += self._cycle_end_overage_ops(sub, ct, policy)
            if policy.arrears:
                ops += self._arrears_ops(sub, ct)
        sub.overage_billed, sub.overage_charged = {}, {}
        for ct in (plan.credits if plan else {}):
            ops += self.floor_ops(sub.customer_id, ct)  # a new period's overage allowance
        ops += self._period_usage_ops(sub, plan, idx)
        self.live.core.reset_usage(idx)
        ops.append(self._core_op(Kind.RESET_USAGE, sub.customer_id, 0, 0))
        if ending or plan is None:
            return ops + self._end_ops(sub, plan, boundary)
        if sub.next_plan and billing:  # a downgrade asked for during the billing period
            plan = self._plan_or_none(sub.next_plan) or plan
            sub.plan, sub.next_plan = plan.name, ""
            ops += self.apply_plan_ops(sub.customer_id, plan)
        self.audit.effective_ms = boundary  # the new period's credits and fee belong to its start
        sub.advance(plan, boundary, billing)
        sub.included = {}
        for ct in plan.credits:
            sub.included[str(ct)] = self.included_nano(sub.customer_id, plan.credits[ct], ct)
            ops += self._included_ops(sub, plan, ct, sub.included[str(ct)])
        if billing:
            ops += self._billing_period_ops(sub, plan) + self._fee_ops(sub, plan)
        ops.append(self._put_sub(sub))
        return ops

    def _rollover_ops(self, sub: Subscription, ct: int, policy: CreditPolicy, boundary: int, ending: bool) -> list[Op]:
        """What is left of credits expiring at the boundary rolls over within the caps; the rest is forfeited."""
        ops: list[Op] = []
        expiring = self._period_buckets(sub, ct, boundary, ("included", "rollover"))
        staying = sum(b.remaining_nano for b in self.grants.accounts[sub.customer_id].buckets.get(ct, [])
                      if b not in expiring)
        incoming = 0 if ending else self.included_nano(sub.customer_id, policy, ct)
        r = policy.rollover
        split = rollover_split(r, [(b.remaining_nano, b.rollovers) for b in expiring], staying, incoming, ending)
        for b, rolled in zip(expiring, split, strict=True):
            forfeited = b.remaining_nano - rolled
            held = min(forfeited, self.holds.reserved_share(sub.customer_id, ct, b))
            ops += self.grants.remove_bucket(sub.customer_id, ct, b)
            ops += self._forfeit_ops(sub.customer_id, ct, forfeited, held, "rollover_forfeited" if r else "expire",
                                     b.grant_id, boundary)
            if rolled:
                life = r.lifetime_periods if r is not None else 0
                expires = sub.credit_start(self._plan(sub.plan), sub.n + 1 + life) if life else 0
                add, gid = self.grants.add_bucket(sub.customer_id, ct, rolled, expires, SPENT_FIRST, "rollover",
                                            credit=False, rollovers=b.rollovers + 1)
                bal = self.live.core.state(self.live.core.account(sub.customer_id.encode()))[0][ct][0]
                ops += add + self.audit.entry_ops(sub.customer_id, "rolled_over", ct, rolled, bal, bal,
                                            f"{b.grant_id} -> {gid}")
        return ops

    def _forfeit_ops(self, customer_id: str, ct: int, amount: int, held: int, kind: str, reference: str,
                     when: int) -> list[Op]:
        """Take ``amount`` of expiring credit away, except the ``held`` part open
        reservations stand on: that stays as a bucket already expired, which the
        grant expiry of the housekeeping timer takes once they settle."""
        if amount <= 0:
            return []
        gone = amount - held
        ops: list[Op] = []
        if gone:
            credit, before, after = self.grants.credit_ops(customer_id, ct, -gone)
            ops += credit + self.audit.entry_ops(customer_id, kind, ct, -gone, before, after, reference)
        if held:
            keep, _ = self.grants.add_bucket(customer_id, ct, held, when, SPENT_FIRST, "held", credit=False)
            ops += keep + self.holds.spare_ops(customer_id, ct, held)
        return ops

    def _cycle_end_overage_ops(self, sub: Subscription, ct: int, policy: CreditPolicy) -> list[Op]:
        if policy.overage is None or policy.overage.at_cycle_end == "carry_repay":
            return []
        if policy.overage.at_cycle_end != "carry":
            return self.settle_overage_ops(sub.customer_id, ct, policy, "cycle end")
        ops: list[Op] = []
        idx = self.live.core.account(sub.customer_id.encode())
        bal = self.live.core.state(idx)[0][ct][0]
        owed = sub.carried.pop(str(ct), 0)
        if owed:  # last period's carried deficit is billed now, at the prices of that overage
            money, tiers = policy.overage.bill(sub.overage_billed.get(str(ct), 0), owed)
            ops += self.audit.entry_ops(sub.customer_id, "overage_charged", ct, owed, bal, bal,
                                        "carried from last period", charge=money,
                                        charge_ct=policy.overage.price_credit_type, tiers=tiers)
        if bal < 0:
            credit, before, after = self.grants.credit_ops(sub.customer_id, ct, -bal)
            ops += credit + self.audit.entry_ops(sub.customer_id, "deficit_carried", ct, -bal, before, after,
                                           "billed at the end of the next period")
            sub.carried[str(ct)] = -bal
        return ops

    def settle_overage_ops(self, customer_id: str, ct: int, policy: CreditPolicy, why: str) -> list[Op]:
        """Bill (or forgive) what the customer owes below zero, and bring the balance back to zero."""
        idx = self.live.core.account(customer_id.encode())
        bal = self.live.core.state(idx)[0][ct][0]
        if bal >= 0 or policy.overage is None:
            return []
        deficit = -bal
        credit, before, after = self.grants.credit_ops(customer_id, ct, deficit)
        if policy.overage.at_cycle_end == "forgive" and why in ("cycle end", "cancel"):
            return credit + self.audit.entry_ops(customer_id, "overage_forgiven", ct, deficit, before, after, why)
        sub = self.subs[customer_id]
        # Graduated tiers continue from what was billed earlier in the period, and
        # what was billed still counts against the period's overage limit.
        billed = sub.overage_billed.get(str(ct), 0)
        money, tiers = policy.overage.bill(billed, deficit)
        sub.overage_billed[str(ct)] = billed + deficit
        sub.overage_charged[str(ct)] = sub.overage_charged.get(str(ct), 0) + money
        credit += self.floor_ops(customer_id, ct) + [self._put_sub(sub)]
        return credit + self.audit.entry_ops(customer_id, "overage_charged", ct, deficit, before, after, why,
                                       charge=money, charge_ct=policy.overage.price_credit_type, tiers=tiers)

    def _arrears_ops(self, sub: Subscription, ct: int) -> list[Op]:
        """Usage billed in arrears: the period's amount is billed and the balance starts again at zero."""
        idx = self.live.core.account(sub.customer_id.encode())
        bal = self.live.core.state(idx)[0][ct][0]
        if bal >= 0:
            return []
        credit, before, after = self.grants.credit_ops(sub.customer_id, ct, -bal)
        return credit + self.audit.entry_ops(sub.customer_id, "usage_billed", ct, -bal, before, after,
                                       f"period {sub.n}", charge=-bal, charge_ct=ct)

    def _gauge_ops(self, sub: Subscription, idx: int) -> list[Op]:
        return self.gauge_ops(sub.customer_id, idx)

    def gauge_ops(self, customer_id: str, idx: int) -> list[Op]:
        """Max, latest and unique_count meters are charged once, on their value for the period."""
        ops: list[Op] = []
        use = self.live.core.state(idx)[1]
        for m, meter in enumerate(self.live.catalog.meters):
            if meter.aggregation < 2 or not use[m]:
                continue
            rate = self.live.core.find_rate(m, {})
            cost = self.live.core.force_charge(idx, rate, use[m])
            record = records.force_charge(customer_id.encode(), rate, use[m], self.clock.now_ms())
            ops.append(self.journal.log_op(record))
            bal = self.live.core.state(idx)[0][meter.credit_type][0]
            ops += self.audit.entry_ops(customer_id, "gauge_charged", meter.credit_type, -cost, bal + cost, bal,
                                  f"{meter.name}={self.live.catalog.format_quantity(m, use[m])}")
        return ops

    def _end_ops(self, sub: Subscription, plan: Plan | None, when: int) -> list[Op]:
        """End a subscription: its credits go, the account leaves the plan."""
        ops: list[Op] = []
        idx = self.live.core.account(sub.customer_id.encode())
        for ct in (plan.credits if plan else {}):
            ops += self.grants.reconcile(sub.customer_id, ct, self.live.core.state(idx)[0][ct][0])
            for b in self._period_buckets(sub, ct, 1 << 62, ("included", "rollover")):
                held = self.holds.reserved_share(sub.customer_id, ct, b)
                ops += self.grants.remove_bucket(sub.customer_id, ct, b)
                ops += self._forfeit_ops(sub.customer_id, ct, b.remaining_nano, held, "expire",
                                         f"{b.grant_id} subscription ended", when)
        del self.subs[sub.customer_id]  # first: the floors below are those of no plan
        ops.append(("subs", sub.customer_id.encode(), None))
        ops += self.apply_plan_ops(sub.customer_id, None)
        return ops

    # ---- alerts: automatic top-up requests and early overage bills ---------------------

    def alert_ops(self) -> list[Op]:
        ops: list[Op] = []
        for idx, ct in self.live.core.take_alerts():
            customer_id = self.live.core.customer_id(idx).decode()
            sub = self.subs.get(customer_id)
            plan = self._plan_or_none(sub.plan) if sub else None
            policy = plan.credits.get(ct) if plan else None
            if policy is None or sub is None:
                continue
            bal = self.live.core.state(idx)[0][ct][0]
            low, target = policy.low_balance_nano, policy.topup_target_nano  # set together (plans.py)
            if low is not None and target is not None and bal < low and ct not in sub.topup_pending:
                sub.topup_pending.append(ct)
                ops += self.audit.entry_ops(customer_id, "auto_topup_requested", ct, 0, bal, bal,
                                            f"below {format_nano(low)}", charge=target - bal, charge_ct=ct)
                ops.append(self._put_sub(sub))
            elif policy.overage is not None and policy.overage.bill_threshold_nano is not None \
                    and bal <= -policy.overage.bill_threshold_nano:
                ops += self.settle_overage_ops(customer_id, ct, policy, "threshold")
        return ops

    def topup_done_ops(self, customer_id: str, ct: int, balance: int) -> list[Op]:
        """A grant that lifts the balance back above the threshold re-arms the top-up request."""
        sub = self.subs.get(customer_id)
        if sub is None or ct not in sub.topup_pending:
            return []
        plan = self._plan_or_none(sub.plan)  # a plan a reload removed asks for no top-up
        policy = plan.credits.get(ct) if plan else None
        if policy is None or policy.low_balance_nano is None or balance >= policy.low_balance_nano:
            sub.topup_pending.remove(ct)
            return [self._put_sub(sub)]
        return []

