"""Subscriptions: a customer on a plan, its billing periods and what happens at
each boundary (included credits, rollover, overage, gauges, fees).

Boundaries are applied exactly: before any operation, every subscription
whose period has ended is rolled over (``roll_due``), and so does the
housekeeping timer, so no event after a boundary is ever rated against the
old period. Each rollover is one commit, logged like every other change, so a
restart reaches the same state.
"""

from __future__ import annotations

import heapq
import json
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from meterd.errors import Conflict, InvalidInput, NotFound
from meterd.plans import CreditPolicy, Plan, period_start
from meterd.store import Op
from meterd.v1 import admin_pb2

if TYPE_CHECKING:
    from meterd.engine import Bucket

INT64_MIN = -(1 << 63)
SPENT_FIRST = 0  # bucket priority of a plan's own credits: spent before grants bought separately


@dataclass
class Subscription:
    customer_id: str
    plan: str
    anchor_ms: int
    n: int                      # index of the current period
    start_ms: int
    end_ms: int
    cancel_at_end: bool = False
    topup_pending: list[int] = field(default_factory=list)

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    def to_pb(self) -> admin_pb2.Subscription:
        return admin_pb2.Subscription(customer_id=self.customer_id, plan=self.plan, anchor_ms=self.anchor_ms,
                                      period_start_ms=self.start_ms, period_end_ms=self.end_ms,
                                      cancel_at_period_end=self.cancel_at_end)


class SubscriptionsMixin:
    """Engine methods for plans; see the module docstring. Mixed into Engine."""

    core: Any
    catalog: Any
    accounts: dict
    subs: dict[str, Subscription]
    _boundaries: list[tuple[int, str]]

    # provided by Engine
    def _log_op(self, record: bytes) -> Op: ...  # type: ignore[empty-body]
    def _credit_ops(self, customer_id: str, ct: int, amount: int) -> tuple[list[Op], int, int]: ...  # type: ignore[empty-body]  # noqa: E501
    def _reconcile(self, customer_id: str, ct: int, balance: int) -> list[Op]: ...  # type: ignore[empty-body]
    def _audit_op(self, *args: Any, **kw: Any) -> list[Op]: ...  # type: ignore[empty-body]
    def _add_bucket(self, *args: Any, **kw: Any) -> tuple[list[Op], str]: ...  # type: ignore[empty-body]
    def _remove_bucket(self, customer_id: str, ct: int, b: Bucket) -> list[Op]: ...  # type: ignore[empty-body]

    # ---- core settings of a plan, logged so that replay sets them too ----------------

    def _core_op(self, kind: bytes, customer_id: str, ct: int, value: int) -> Op:
        from meterd.engine import _record
        return self._log_op(_record(kind, struct.pack("<Hq", ct, value) + customer_id.encode()))

    def _apply_plan_ops(self, customer_id: str, plan: Plan | None) -> list[Op]:
        """Plan index, floors and alert thresholds in the core for ``plan`` (None: no plan)."""
        idx = self.core.open_account(customer_id.encode())
        ops = []
        self.core.set_plan(idx, plan.index if plan else 0)
        ops.append(self._core_op(b"S", customer_id, 0, plan.index if plan else 0))
        for ct in range(len(self.catalog.credit_types)):
            policy = plan.credits.get(ct) if plan else None
            floor = policy.floor_nano if policy else 0
            alert = policy.alert_nano if policy else None
            cts = self.core.state(idx)[0][ct]
            if cts[2] != floor:
                self.core.set_floor(idx, ct, floor)
                ops.append(self._core_op(b"F", customer_id, ct, floor))
            if cts[5] != (INT64_MIN if alert is None else alert):
                self.core.set_alert(idx, ct, alert)
                ops.append(self._core_op(b"T", customer_id, ct, INT64_MIN if alert is None else alert))
        return ops

    def _put_sub(self, sub: Subscription) -> Op:
        heapq.heappush(self._boundaries, (sub.end_ms, sub.customer_id))
        return ("subs", sub.customer_id.encode(), sub.to_json())

    def _plan(self, name: str) -> Plan:
        plan = self.catalog.plan_index.get(name)
        if plan is None:
            raise InvalidInput("plan", f"unknown plan {name[:64]!r}")
        return plan

    # ---- subscribe, cancel, change plan ---------------------------------------------

    def subscribe_ops(self, customer_id: str, plan_name: str, start_ms: int, now: int) -> tuple[list[Op], Subscription]:
        if customer_id in self.subs:
            raise Conflict(f"customer {customer_id!r} is subscribed already; use ChangePlan")
        plan = self._plan(plan_name)
        n = 0
        while period_start(start_ms, plan.period, n + 1) <= now:
            n += 1
        sub = Subscription(customer_id, plan.name, start_ms, n, period_start(start_ms, plan.period, n),
                           period_start(start_ms, plan.period, n + 1))
        self.subs[customer_id] = sub
        ops = self._apply_plan_ops(customer_id, plan)
        for ct in plan.credits:
            ops += self._included_ops(sub, plan, ct, plan.credits[ct].included_nano)
        for ct, amount in plan.trial_nano.items():
            add, _ = self._add_bucket(customer_id, ct, amount, now + plan.trial_days * 86_400_000, SPENT_FIRST,
                                      "trial", credit=True)
            ops += add
        ops += self._fee_ops(sub, plan)
        ops.append(self._put_sub(sub))
        return ops, sub

    def cancel_ops(self, customer_id: str, at_period_end: bool) -> tuple[list[Op], Subscription]:
        sub = self.subs.get(customer_id)
        if sub is None:
            raise NotFound(f"customer {customer_id!r} has no subscription")
        if at_period_end:
            sub.cancel_at_end = True
            return [self._put_sub(sub)], sub
        ops = self._end_ops(sub, self._plan_or_none(sub.plan), sub.start_ms)
        return ops, sub

    def change_plan_ops(self, customer_id: str, plan_name: str, now: int) -> tuple[list[Op], Subscription]:
        sub = self.subs.get(customer_id)
        if sub is None:
            raise NotFound(f"customer {customer_id!r} has no subscription")
        new = self._plan(plan_name)
        old = self._plan_or_none(sub.plan)
        if new.period != (old.period if old else new.period):
            raise InvalidInput("plan", "a plan change keeps the billing period; cancel and subscribe instead")
        left, length = sub.end_ms - now, sub.end_ms - sub.start_ms
        ops: list[Op] = []
        # The old plan's credits for the time left go; the new plan's for that time come.
        for ct, policy in (old.credits.items() if old else []):
            ops += self._prorate_out(sub, ct, policy.included_nano * left // length)
        sub.plan = new.name
        ops += self._apply_plan_ops(customer_id, new)
        for ct, policy in new.credits.items():
            ops += self._included_ops(sub, new, ct, policy.included_nano * left // length)
        ops.append(self._put_sub(sub))
        return ops, sub

    def _plan_or_none(self, name: str) -> Plan | None:
        return self.catalog.plan_index.get(name)

    def _included_ops(self, sub: Subscription, plan: Plan, ct: int, amount: int) -> list[Op]:
        if amount <= 0:
            return []
        ops, _ = self._add_bucket(sub.customer_id, ct, amount, sub.end_ms, SPENT_FIRST, "included", credit=True,
                                  kind="included")
        return ops

    def _prorate_out(self, sub: Subscription, ct: int, amount: int) -> list[Op]:
        idx = self.core.account(sub.customer_id.encode())
        ops = self._reconcile(sub.customer_id, ct, self.core.state(idx)[0][ct][0])
        for b in self._period_buckets(sub, ct, sub.end_ms, ("included",)):
            take = min(amount, b.remaining_nano)
            if take <= 0:
                continue
            amount -= take
            b.remaining_nano -= take
            credit, before, after = self._credit_ops(sub.customer_id, ct, -take)
            ops += credit + self._audit_op(sub.customer_id, "proration", ct, -take, before, after, b.grant_id)
            ops += self._remove_bucket(sub.customer_id, ct, b) if b.remaining_nano == 0 else \
                self._rewrite_bucket(sub.customer_id, ct, b)
        return ops

    def _rewrite_bucket(self, customer_id: str, ct: int, b: Bucket) -> list[Op]:
        from meterd.engine import Engine
        return [("grants", Engine._grant_key_of(self.catalog, customer_id, ct, b.grant_id), Engine._grant_doc(b))]

    def _period_buckets(self, sub: Subscription, ct: int, boundary: int, sources: tuple[str, ...]) -> list[Bucket]:
        acct = self.accounts.get(sub.customer_id)
        if acct is None:
            return []
        return sorted((b for b in acct.buckets.get(ct, []) if b.source in sources and b.expires_at_ms
                       and b.expires_at_ms <= boundary), key=lambda b: (b.expires_at_ms, b.order))

    def _fee_ops(self, sub: Subscription, plan: Plan) -> list[Op]:
        ops: list[Op] = []
        idx = self.core.account(sub.customer_id.encode())
        for ct, fee in plan.fees_nano.items():
            bal = self.core.state(idx)[0][ct][0] if idx >= 0 else 0
            ops += self._audit_op(sub.customer_id, "fee", ct, 0, bal, bal, f"{plan.name} period {sub.n}",
                                  charge=fee, charge_ct=ct)
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
        ops: list[Op] = []
        ending = sub.cancel_at_end or plan is None
        idx = self.core.account(sub.customer_id.encode())
        ops += self._gauge_ops(sub, idx)  # the ended period's gauges, before its overage is settled
        for ct, policy in (plan.credits.items() if plan else []):
            ops += self._reconcile(sub.customer_id, ct, self.core.state(idx)[0][ct][0])
            ops += self._rollover_ops(sub, ct, policy, boundary, ending)
            ops += self._cycle_end_overage_ops(sub, ct, policy)
            if self.core.state(idx)[0][ct][2] != policy.floor_nano:  # a new period's overage allowance
                self.core.set_floor(idx, ct, policy.floor_nano)
                ops.append(self._core_op(b"F", sub.customer_id, ct, policy.floor_nano))
        self.core.reset_usage(idx)
        ops.append(self._core_op(b"U", sub.customer_id, 0, 0))
        if ending:
            return ops + self._end_ops(sub, plan, boundary)
        sub.n += 1
        sub.start_ms, sub.end_ms = boundary, period_start(sub.anchor_ms, plan.period, sub.n + 1)  # type: ignore[union-attr]
        for ct, policy in plan.credits.items():  # type: ignore[union-attr]
            ops += self._included_ops(sub, plan, ct, policy.included_nano)  # type: ignore[arg-type]
        ops += self._fee_ops(sub, plan)  # type: ignore[arg-type]
        ops.append(self._put_sub(sub))
        return ops

    def _rollover_ops(self, sub: Subscription, ct: int, policy: CreditPolicy, boundary: int, ending: bool) -> list[Op]:
        """What is left of credits expiring at the boundary rolls over within the caps; the rest is forfeited."""
        ops: list[Op] = []
        expiring = self._period_buckets(sub, ct, boundary, ("included", "rollover"))
        staying = sum(b.remaining_nano for b in self.accounts.get(sub.customer_id).buckets.get(ct, [])  # type: ignore[union-attr]
                      if b not in expiring)
        incoming = 0 if ending else policy.included_nano
        rolled_total = 0
        r = policy.rollover
        for b in expiring:
            rolled = 0
            if r is not None and not ending and b.rollovers < r.max_count:
                rolled = b.remaining_nano * r.max_percent // 100
                if r.max_nano is not None:
                    rolled = min(rolled, r.max_nano - rolled_total)
                if r.balance_cap_nano is not None:
                    rolled = min(rolled, r.balance_cap_nano - staying - incoming - rolled_total)
                rolled = max(rolled, 0)
            forfeited = b.remaining_nano - rolled
            ops += self._remove_bucket(sub.customer_id, ct, b)
            if forfeited:
                credit, before, after = self._credit_ops(sub.customer_id, ct, -forfeited)
                kind = "rollover_forfeited" if r is not None else "expire"
                ops += credit + self._audit_op(sub.customer_id, kind, ct, -forfeited, before, after, b.grant_id)
            if rolled:
                rolled_total += rolled
                expires = period_start(sub.anchor_ms, self._plan(sub.plan).period,
                                       sub.n + 1 + r.lifetime_periods) if r.lifetime_periods else 0  # type: ignore[union-attr]
                add, gid = self._add_bucket(sub.customer_id, ct, rolled, expires, SPENT_FIRST, "rollover",
                                            credit=False, rollovers=b.rollovers + 1)
                bal = self.core.state(self.core.account(sub.customer_id.encode()))[0][ct][0]
                ops += add + self._audit_op(sub.customer_id, "rolled_over", ct, rolled, bal, bal,
                                            f"{b.grant_id} -> {gid}")
        return ops

    def _cycle_end_overage_ops(self, sub: Subscription, ct: int, policy: CreditPolicy) -> list[Op]:
        if policy.overage is None or policy.overage.at_cycle_end == "carry":
            return []
        return self.settle_overage_ops(sub.customer_id, ct, policy, "cycle end")

    def settle_overage_ops(self, customer_id: str, ct: int, policy: CreditPolicy, why: str) -> list[Op]:
        """Bill (or forgive) what the customer owes below zero, and bring the balance back to zero."""
        idx = self.core.account(customer_id.encode())
        bal = self.core.state(idx)[0][ct][0]
        if bal >= 0 or policy.overage is None:
            return []
        deficit = -bal
        credit, before, after = self._credit_ops(customer_id, ct, deficit)
        if why == "threshold":
            # Billed early: what was billed still counts against this period's overage limit.
            floor = min(self.core.state(idx)[0][ct][2] + deficit, 0)
            self.core.set_floor(idx, ct, floor)
            credit.append(self._core_op(b"F", customer_id, ct, floor))
        if policy.overage.at_cycle_end == "forgive" and why == "cycle end":
            return credit + self._audit_op(customer_id, "overage_forgiven", ct, deficit, before, after, why)
        money = policy.overage.charge(deficit)
        return credit + self._audit_op(customer_id, "overage_charged", ct, deficit, before, after, why,
                                       charge=money, charge_ct=policy.overage.price_credit_type)

    def _gauge_ops(self, sub: Subscription, idx: int) -> list[Op]:
        """Max and latest meters are charged once, on their value for the period."""
        from meterd.engine import _record
        ops: list[Op] = []
        use = self.core.state(idx)[1]
        for m, meter in enumerate(self.catalog.meters):
            if meter.aggregation < 2 or not use[m]:
                continue
            rate = self.core.find_rate(m, None)
            cost, _ = self.core.settle(idx, rate, use[m], 0)
            ops.append(self._log_op(_record(b"C", struct.pack("<Iqq", rate, use[m], 0) + sub.customer_id.encode())))
            bal = self.core.state(idx)[0][meter.credit_type][0]
            ops += self._audit_op(sub.customer_id, "gauge_charged", meter.credit_type, -cost, bal + cost, bal,
                                  f"{meter.name}={self.catalog.format_quantity(m, use[m])}")
        return ops

    def _end_ops(self, sub: Subscription, plan: Plan | None, when: int) -> list[Op]:
        """End a subscription: its credits go, the account leaves the plan."""
        ops: list[Op] = []
        idx = self.core.account(sub.customer_id.encode())
        for ct in (plan.credits if plan else {}):
            ops += self._reconcile(sub.customer_id, ct, self.core.state(idx)[0][ct][0])
            for b in self._period_buckets(sub, ct, 1 << 62, ("included", "rollover")):
                ops += self._remove_bucket(sub.customer_id, ct, b)
                if b.remaining_nano:
                    credit, before, after = self._credit_ops(sub.customer_id, ct, -b.remaining_nano)
                    ops += credit + self._audit_op(sub.customer_id, "expire", ct, -b.remaining_nano, before, after,
                                                   f"{b.grant_id} subscription ended")
        ops += self._apply_plan_ops(sub.customer_id, None)
        del self.subs[sub.customer_id]
        ops.append(("subs", sub.customer_id.encode(), None))
        return ops

    # ---- alerts: automatic top-up requests and early overage bills ---------------------

    def alert_ops(self) -> list[Op]:
        ops: list[Op] = []
        for idx, ct in self.core.take_alerts():
            customer_id = self.core.customer_id(idx).decode()
            sub = self.subs.get(customer_id)
            plan = self._plan_or_none(sub.plan) if sub else None
            policy = plan.credits.get(ct) if plan else None
            if policy is None or sub is None:
                continue
            bal = self.core.state(idx)[0][ct][0]
            if policy.low_balance_nano is not None and bal < policy.low_balance_nano and ct not in sub.topup_pending:
                sub.topup_pending.append(ct)
                ops += self._audit_op(customer_id, "auto_topup_requested", ct, 0, bal, bal,
                                      f"below {policy.low_balance_nano}", charge=policy.topup_target_nano - bal,
                                      charge_ct=ct)
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
        policy = self._plan(sub.plan).credits.get(ct)
        if policy is None or policy.low_balance_nano is None or balance >= policy.low_balance_nano:
            sub.topup_pending.remove(ct)
            return [self._put_sub(sub)]
        return []
