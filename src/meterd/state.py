"""The records the engine's components keep in Python, and the core and catalog in force.

Each type here is owned by one component (named on it) and written through to
LMDB by that component, in the commit of the change; the others only read it.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, overload

from meterd.errors import InvalidInput
from meterd.plans import Plan, is_downgrade, period_index, period_start

if TYPE_CHECKING:
    from meterd.catalog import Catalog
    from meterd.core import CoreAPI

HELD = "held"  # the bucket source of an ended period's credits spared for its open holds


class Live:
    """The core and the catalog in force. Recovery and a catalog reload replace
    both at once; every component reads them here, never a copy of its own."""

    __slots__ = ("core", "catalog")

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.core: CoreAPI = None  # type: ignore[assignment]  # set by the first recovery


@dataclass
class ClientState:
    """A batch client's last sequence and its answer (owned by clients.Clients)."""
    sequence: int
    seen_ms: int
    result: bytes
    pending: asyncio.Future | None = None


@dataclass
class Reservation:
    """An open hold made by Authorize (owned by holds.Holds)."""
    reservation_id: str
    customer_id: str
    credit_type: int
    meter: int
    dim_value: str | None
    rate: int
    amount_nano: int
    expires_at_ms: int
    tenant: str = ""  # the label of the tenant that made it: its settled answer is that tenant's
    # Credits of a period that ended while this was open, kept for it (see holds.Holds.spared_ops).
    spared_nano: int = 0
    # Its dimension set (canonical bytes), when it has more than its price dimension: the usage is filed under it.
    dims: bytes | None = None
    # A reservation of several meters (AuthorizeRequest.quantities): the others, (meter, rate) each.
    more: tuple[tuple[int, int], ...] = ()
    # Its meters' and credit type's names, as it was written: one not in the catalog of now (-1) keeps its name.
    names: tuple[str, ...] = ()
    credit_name: str = ""

    def parts(self) -> list[tuple[int, int]]:
        """Its meters and their rates, (meter, rate) each, its own first."""
        return [(self.meter, self.rate), *self.more]

    def to_json(self, catalog: Catalog) -> bytes:
        names = [catalog.meters[m].name if m >= 0 else self.names[i] for i, (m, _) in enumerate(self.parts())]
        doc: dict[str, object] = {
            "customer_id": self.customer_id,
            "credit_type": catalog.credit_types[self.credit_type].name if self.credit_type >= 0 else self.credit_name,
            "meter": names[0], "dim_value": self.dim_value,
            "amount_nano": self.amount_nano, "expires_at_ms": self.expires_at_ms, "tenant": self.tenant,
            "spared_nano": self.spared_nano, "dims": None if self.dims is None else self.dims.hex()}
        if self.more:
            doc["more_meters"] = names[1:]
        return json.dumps(doc).encode()


@dataclass
class Session:
    """An open duration session (owned by holds.Holds, run by sessions.Sessions)."""
    session_id: str
    customer_id: str
    meter: int
    dim_value: str | None
    credit_type: int
    started_ms: int
    billed_ms: int          # time up to here is billed
    heartbeat_ms: int       # the last heartbeat (or the start)
    timeout_ms: int
    reserved_nano: int      # held for the next interval
    billed_units: int = 0
    cost_nano: int = 0
    tenant: str = ""        # the label of the tenant that started it: its final answer is that tenant's
    spared_nano: int = 0    # credits of a period that ended during its held interval, kept for it
    dims_hex: str = ""      # its dimension set, when it has more than its price dimension (hex)

    def to_json(self, catalog: Catalog) -> bytes:
        """Its meter and credit type by name too: a restart under a catalog that numbers
        them otherwise finds them by name (the numbers are for older versions)."""
        return json.dumps({**asdict(self), "meter_name": catalog.meters[self.meter].name,
                           "credit_type_name": catalog.credit_types[self.credit_type].name}).encode()


@dataclass
class Subscription:
    """A customer on a plan and its current period (owned by subscriptions.Subscriptions).

    ``n``, ``start_ms`` and ``end_ms`` are of its credit period (Plan.cycle); the
    billing period's (the fee's) are apart, the same for a plan whose credits go with it."""
    customer_id: str
    plan: str
    anchor_ms: int
    n: int                      # index of the current credit period
    start_ms: int
    end_ms: int
    cancel_at_end: bool = False
    topup_pending: list[int] = field(default_factory=list)
    # Overage billed early in this period, per credit type (as str for JSON):
    # graduated tiers continue from it and it counts against the limit.
    overage_billed: dict[str, int] = field(default_factory=dict)
    # A downgrade waits for the end of the period (the period is paid for).
    next_plan: str = ""
    # at_cycle_end = "carry": the deficit carried from the last period, billed at this one's end.
    carried: dict[str, int] = field(default_factory=dict)
    # The money billed for this period's overage, per credit type: a spend limit
    # counts it, whatever plan (and prices) it was billed under.
    overage_charged: dict[str, int] = field(default_factory=dict)
    # The credits this period was given as its included ones, per credit type: a
    # customer's own included amount raised mid-period adds what it is above this.
    included: dict[str, int] = field(default_factory=dict)
    # The billing period (the fee's): its index and bounds. 0: as the credit period's
    # (a subscription kept by a version without credit periods).
    billing_n: int = -1
    billing_start_ms: int = 0
    billing_end_ms: int = 0
    # The plan's billing and credit periods when it was subscribed to: its periods are
    # counted in these, whatever a later catalog says ("": the plan's, as kept by an older version).
    period: str = ""
    cycle: str = ""
    # The indices of the credit and billing periods that start at anchor_ms: not 0 once
    # the plan's periods changed and the subscription took them at a billing boundary.
    offset_n: int = 0
    billing_offset_n: int = 0

    def __post_init__(self) -> None:
        if self.billing_end_ms == 0:
            self.billing_n, self.billing_start_ms, self.billing_end_ms = self.n, self.start_ms, self.end_ms

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def starting(cls, customer_id: str, plan: Plan, start_ms: int, now: int) -> "Subscription":
        """A new subscription anchored at ``start_ms``: one in the past places it in its
        current periods (past periods are not billed)."""
        n, billing_n = period_index(start_ms, plan.cycle, now), period_index(start_ms, plan.period, now)
        return cls(customer_id, plan.name, start_ms, n, period_start(start_ms, plan.cycle, n),
                   period_start(start_ms, plan.cycle, n + 1), billing_n=billing_n,
                   billing_start_ms=period_start(start_ms, plan.period, billing_n),
                   billing_end_ms=period_start(start_ms, plan.period, billing_n + 1),
                   period=plan.period, cycle=plan.cycle)

    def periods(self, plan: Plan) -> tuple[str, str]:
        """The billing and credit periods the subscription counts in: those of its plan when it
        was subscribed to, or when it last took its plan's (a subscription kept by an older
        version: the plan's)."""
        return self.period or plan.period, self.cycle or plan.cycle

    def take_periods(self, plan: Plan, boundary: int) -> None:
        """From ``boundary`` (the end of a billing period) on, count the subscription's periods
        in the plan's, the periods' numbers going on: from its anchor still when both periods
        have a start there counted from it (so a month-end anchor keeps its day), else from
        the boundary."""
        i, j = period_index(self.anchor_ms, plan.period, boundary), period_index(self.anchor_ms, plan.cycle, boundary)
        if period_start(self.anchor_ms, plan.period, i) != boundary or \
                period_start(self.anchor_ms, plan.cycle, j) != boundary:
            self.anchor_ms, i, j = boundary, 0, 0
        self.billing_offset_n, self.offset_n = self.billing_n + 1 - i, self.n + 1 - j
        self.period, self.cycle = plan.period, plan.cycle

    def credit_start(self, plan: Plan, n: int) -> int:
        return period_start(self.anchor_ms, self.periods(plan)[1], n - self.offset_n)

    def billing_start(self, plan: Plan, n: int) -> int:
        return period_start(self.anchor_ms, self.periods(plan)[0], n - self.billing_offset_n)

    def plan_change(self, old: Plan | None, new: Plan) -> bool:
        """Ask for a change from plan ``old`` (the subscription's, None when the catalog lost it)
        to ``new``: True when it applies now (an upgrade, or a plan as dear); a downgrade waits
        for the billing period's end (``next_plan``). The periods must stay those counted in."""
        if old is not None and (new.period, new.cycle) != self.periods(old):
            period, cycle = self.periods(old)
            raise InvalidInput("plan", f"a plan change keeps the billing and credit periods ({old.name!r}: every "
                               f"{period}, credits every {cycle}); cancel and subscribe instead")
        self.next_plan = ""
        if old is not None and (new.name == old.name or is_downgrade(old, new)):
            if new.name != old.name:
                self.next_plan = new.name
            return False
        return True

    def advance(self, plan: Plan, boundary: int, billing: bool) -> None:
        """The next credit period starts at ``boundary``, and the next billing period with it
        when ``billing``."""
        self.n += 1
        self.start_ms, self.end_ms = boundary, self.credit_start(plan, self.n + 1)
        if billing:
            self.billing_n += 1
            self.billing_start_ms = boundary
            self.billing_end_ms = self.billing_start(plan, self.billing_n + 1)


@dataclass
class Bucket:
    """A grant's remaining credits (owned by grants.Grants)."""
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
