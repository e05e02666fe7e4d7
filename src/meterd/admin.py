"""The control plane's calls on balances and plans: Grant, Adjust, Subscribe,
Cancel and ChangePlan (each idempotent by key where the API has one), and the
reads GetBalance and ListAudit."""

from __future__ import annotations

import dataclasses
from typing import Callable

from meterd import validate
from meterd.audit import Audit
from meterd.clock import Clock, month_bounds
from meterd.config import Settings
from meterd.corespec import DISCOUNT_SCALE
from meterd.errors import Conflict, InvalidInput, NotFound
from meterd.grants import Grants
from meterd.housekeeping import Housekeeping
from meterd.idempotency import Idempotency
from meterd.journal import Journal
from meterd.leases import Leases
from meterd.ledger import is_pool
from meterd.results import Adjusted, BalanceView, CreditBalance, Granted, Keyed, Replay, TermsSet
from meterd.state import Account, Live, Subscription
from meterd.subscriptions import SUBSCRIBE_AHEAD_MS_MAX, TERMS, Subscriptions
from meterd.validate import NAME_ECHO_CHARS

INT64_MAX = (1 << 63) - 1
OVERDRAFT_NANO_MAX = 1 << 62  # as a minimum charge: an overdraft and a balance add up within 64 bits


class Admin:
    def __init__(self, settings: Settings, live: Live, journal: Journal, clock: Clock, audit: Audit,
                 grants: Grants, subscriptions: Subscriptions, housekeeping: Housekeeping,
                 idempotency: Idempotency, encode: Callable[[object], bytes], leases: Leases | None = None) -> None:
        self.settings = settings
        self.live = live
        self.journal = journal
        self.clock = clock
        self.audit = audit
        self.grants = grants
        self.subscriptions = subscriptions
        self.housekeeping = housekeeping
        self.idempotency = idempotency
        self.encode = encode
        self.leases = leases  # ledger mode: grants and adjustments commit in the central ledger

    async def grant(self, customer_id: str, credit_type: str, amount_nano: int, expires_at_ms: int, priority: int,
                    source: str, keyed: Keyed | None) -> Granted | Replay:
        if self.leases is not None:  # ledger mode: one transaction in the ledger, idempotent there by key
            validate.customer(self.settings, customer_id)
            self.grants.credit_type(credit_type, amount_nano)
            self.grants.check_grant(amount_nano, expires_at_ms, source)
            central = await self.leases.grant(customer_id, credit_type, amount_nano, expires_at_ms, priority,
                                              source or "api", keyed)
            return Granted(central.grant_id, central.balance_nano)
        replay = self.idempotency.writable_or_replay_admin("grant", customer_id, keyed)
        if replay is not None:
            return replay
        validate.customer(self.settings, customer_id)
        ct = self.grants.credit_type(credit_type, amount_nano)
        self.grants.check_grant(amount_nano, expires_at_ms, source)
        key = self.idempotency.admin_key("grant", customer_id, keyed)
        replay = await self.idempotency.replayed(key, keyed)
        if replay is not None:
            return replay
        self.subscriptions.roll_if_due()
        ops, gid = self.grants.grant_ops(customer_id, ct, amount_nano, expires_at_ms, priority, source or "api", "")
        answer = Granted(gid, self.grants.balance_of(customer_id, ct))
        ops += self.idempotency.remember(key, keyed, self.encode(answer))
        await self.journal.commit_with(ops)
        return answer

    async def adjust(self, customer_id: str, credit_type: str, amount_nano: int, reason: str,
                     keyed: Keyed | None) -> Adjusted | Replay:
        if self.leases is not None:  # ledger mode: one transaction in the ledger, idempotent there by key
            validate.customer(self.settings, customer_id)
            self.grants.credit_type(credit_type, amount_nano)
            self.grants.check_adjust(amount_nano, reason)
            return Adjusted((await self.leases.adjust(customer_id, credit_type, amount_nano, reason,
                                                      keyed)).balance_nano)
        replay = self.idempotency.writable_or_replay_admin("adjust", customer_id, keyed)
        if replay is not None:
            return replay
        validate.customer(self.settings, customer_id)
        ct = self.grants.credit_type(credit_type, amount_nano)
        self.grants.check_adjust(amount_nano, reason)
        key = self.idempotency.admin_key("adjust", customer_id, keyed)
        replay = await self.idempotency.replayed(key, keyed)
        if replay is not None:
            return replay
        self.subscriptions.roll_if_due()
        ops, after = self.grants.adjust_ops(customer_id, ct, amount_nano, reason)
        if amount_nano < 0:
            ops += self.subscriptions.alert_ops()
        answer = Adjusted(after)
        ops += self.idempotency.remember(key, keyed, self.encode(answer))
        await self.journal.commit_with(ops)
        return answer

    async def set_overdraft(self, customer_id: str, credit_type: str, amount_nano: int, clear: bool,
                            reason: str) -> TermsSet:
        """The customer's own overdraft in a credit type (or none, ``clear``): the term
        "overdraft", with its amount in the request's field ``amount_nano``."""
        return await self.set_term(customer_id, credit_type, "overdraft", amount_nano, clear, reason,
                                   field="amount_nano")

    async def set_term(self, customer_id: str, credit_type: str, term: str, value: int, clear: bool,
                       reason: str, field: str = "value") -> TermsSet:
        """One of the customer's own terms (subscriptions.TERMS) in a credit type, or none
        (``clear``): applied at once, audited, kept until cleared."""
        if term not in TERMS:
            raise InvalidInput("term", f"{term[:NAME_ECHO_CHARS]!r} is not one of {', '.join(TERMS)}")
        if self.leases is not None:
            raise Conflict(f"a customer's own {term} is local mode only: in ledger mode the ledger holds the "
                           "balance")
        self.journal.check_writable()
        cust = validate.customer(self.settings, customer_id)
        try:
            ct = self.grants.credit_type(credit_type, value if term in ("overdraft", "included") else 0)
        except InvalidInput as e:
            raise e if e.field != "amount_nano" else InvalidInput(field, e.message) from None
        if clear and value:
            raise InvalidInput(field, "must be 0 with clear")
        top = DISCOUNT_SCALE if term == "discount" else OVERDRAFT_NANO_MAX
        if not 0 <= value <= top:
            raise InvalidInput(field, f"must be 0 to {top}" + (" (basis points: 1250 is 12.5%)"
                                                               if term == "discount" else " (2^62)"))
        self.grants.check_reason(reason)
        core = self.live.core
        if core.account(cust) < 0 and customer_id not in self.live.catalog.customer_index:
            raise NotFound(f"customer {customer_id!r} has no account")
        self.subscriptions.roll_if_due()
        if not clear:
            self._check_term(customer_id, term, ct)
        ops = self.subscriptions.term_ops(customer_id, term, ct, None if clear else value)
        idx = core.open_account(cust)
        balance, _, floor, *_ = core.state(idx)[0][ct]
        kind = "included_amount" if term == "included" else term  # "included" is the kind of a grant
        ops += self.audit.entry_ops(customer_id, kind, ct, 0 if clear else value, balance, balance, reason,
                                    source=kind)
        answer = TermsSet(floor, core.available(idx, ct), self.subscriptions.terms_of(customer_id))
        await self.journal.commit_with(ops)
        return answer

    def _check_term(self, customer_id: str, term: str, ct: int) -> None:
        """A budget limits a plan's overage, and included credits are a plan's: refuse either
        for a customer whose plan has none in the credit type."""
        if term not in ("budget", "included"):
            return
        name = self.live.catalog.credit_types[ct].name
        sub = self.subscriptions.subs.get(customer_id)
        plan = self.live.catalog.plan_index.get(sub.plan) if sub else None
        policy = plan.credits.get(ct) if plan else None
        why = "a budget limits a plan's overage" if term == "budget" else "included credits are a plan's"
        if plan is None or policy is None:
            raise InvalidInput("credit_type", f"customer {customer_id!r} has no plan with {name} credits: {why}")
        if term == "budget" and policy.overage is None:
            raise InvalidInput("credit_type", f"plan {plan.name!r} has no overage in {name}: {why}")

    async def subscribe(self, customer_id: str, plan: str, start_ms: int,
                        keyed: Keyed | None) -> Subscription | Replay:
        self.journal.check_writable()
        validate.customer(self.settings, customer_id)
        if self.leases is not None:  # ledger mode: the subscription and its periods are the ledger's
            if start_ms < 0 or start_ms > self.clock.now_ms():
                raise InvalidInput("start_ms", "must be 0 (now) or a time in the past, in ledger mode")
            return await self.leases.subscribe(customer_id, plan, start_ms, keyed)
        key = self.idempotency.admin_key("subscribe", customer_id, keyed)
        replay = await self.idempotency.replayed(key, keyed)
        if replay is not None:
            return replay
        now = self.clock.now_ms()
        if start_ms < 0 or start_ms > now + SUBSCRIBE_AHEAD_MS_MAX:
            raise InvalidInput("start_ms", "must be 0 (now) or a time within a year")
        self.subscriptions.roll_if_due()
        ops, sub = self.subscriptions.subscribe_ops(customer_id, plan, start_ms or now, now)
        ops += self.subscriptions.roll_due(now)  # a start in the past catches up on its periods at once
        ops += self.idempotency.remember(key, keyed, self.encode(sub))
        answer = dataclasses.replace(sub)  # as remembered: a change while this commits is not this answer's
        await self.journal.commit_with(ops)
        return answer

    async def cancel(self, customer_id: str, at_period_end: bool) -> Subscription:
        self.journal.check_writable()
        validate.customer(self.settings, customer_id)
        if self.leases is not None:
            return await self.leases.cancel(customer_id, at_period_end)
        self.subscriptions.roll_if_due()
        ops, sub = self.subscriptions.cancel_ops(customer_id, at_period_end)
        await self.journal.commit_with(ops)
        return sub

    async def change_plan(self, customer_id: str, plan: str) -> Subscription:
        self.journal.check_writable()
        validate.customer(self.settings, customer_id)
        if self.leases is not None:
            return await self.leases.change_plan(customer_id, plan)
        self.subscriptions.roll_if_due()
        ops, sub = self.subscriptions.change_plan_ops(customer_id, plan, self.clock.now_ms())
        await self.journal.commit_with(ops + self.subscriptions.alert_ops())
        return sub

    def balance(self, customer_id: str) -> BalanceView:
        core, catalog = self.live.core, self.live.catalog
        idx = core.account(validate.customer(self.settings, customer_id))
        if idx < 0:
            if self.leases is not None:
                raise NotFound(f"customer {customer_id!r} has no lease at this sidecar yet (its first request takes "
                               "one); `meterd balance --ledger URL` reads the ledger")
            raise NotFound(f"customer {customer_id!r} has no account")
        cts, use, _ = core.state(idx)
        acct = self.grants.accounts.get(customer_id, Account())
        sub = self.subscriptions.subs.get(customer_id)
        if sub is not None:
            out = BalanceView(customer_id, sub.start_ms, sub.end_ms, sub.plan)
        else:
            out = BalanceView(customer_id, *month_bounds(self.housekeeping.period_start_ms or self.clock.now_ms()))
        for ct, (bal, resv, floor, *_) in enumerate(cts):
            if is_pool(catalog.credit_types[ct].name):
                continue  # ledger mode's pool of a plan's free units: the plan's, not a balance of the customer's
            available = min(max(bal - resv - floor, -INT64_MAX), INT64_MAX)
            grants = self.grants.allocated(acct.buckets.get(ct, []), bal)
            lease = self.leases.view(customer_id, ct) if self.leases is not None else None
            if lease is not None:  # ledger mode: the lease here and what the ledger had left when last asked
                bal, available = bal + lease.central_available_nano, available + lease.central_available_nano
            out.balances.append(CreditBalance(catalog.credit_types[ct].name, bal, resv, floor, available, grants,
                                              lease))
        out.usage = [(catalog.meters[m].name, catalog.format_quantity(m, q)) for m, q in enumerate(use)]
        out.terms = self.subscriptions.terms_of(customer_id)
        return out

    def audit_entries(self, customer_id: str, after_sequence: int, limit: int) -> list:
        return self.audit.entries(validate.customer(self.settings, customer_id), after_sequence, limit)
