"""The catalog: credit types, meters with their prices, and initial customers.

An operator writes it as TOML; ``load_catalog`` validates it once and compiles
prices into exact integer rates for the core. A price is a decimal ("2.50") or
a fraction ("1/3") of a credit per ``per`` meter units. Every price becomes
``amount_nano / denominator`` nano-credits per smallest meter unit, with no
rounding; the core carries what is below one nano per account.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from typing import Any

from meterd.config import _FIELDS as SETTINGS_FIELDS
from meterd.config import CATALOG_TABLES, read_toml
from meterd.corespec import (
    CONDITION_VALUES_MAX,
    CONDITIONS_MAX,
    DENOMINATOR_MAX,
    DISCOUNT_SCALE,
    NAME_BYTES_MAX,
    PRICE_DIMENSIONS_MAX,
    TIERS_PER_PRICE_MAX,
    ConditionRow,
    MeterRow,
    RateRow,
    format_nano,
    rate_mask,
)
from meterd.errors import ConfigError, invariant
from meterd.ledger import POOL_PREFIX
from meterd.plans import Plan, parse_plans

NANO = 10**9
INT64_MAX = (1 << 63) - 1
AGGREGATIONS = ("sum", "count", "max", "latest", "unique_count")
TIER_MODES = ("graduated", "volume")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.:-]{0,%d}$" % (NAME_BYTES_MAX - 1))  # the cores' limit on names
# Ledger mode holds a plan's free units of a sum or count meter as a balance that sidecars lease (a
# "pool"): a credit type of this prefix and the meter's name, which no catalog's names can be; and a
# plan row of its own (no fallback, no free units), on which the core prices what a pool lacks.
LOOSE_PLAN = "/loose"


def pool_name(meter: str) -> str:
    return POOL_PREFIX + meter
ID_RE = re.compile(r"^[!-~]{1,128}$")
DIM_VALUE_RE = re.compile(r"^[!-~]{1,128}$")
WILDCARD = "*"  # in a price table: any value of the dimension, or none


@dataclass(frozen=True)
class CreditType:
    name: str
    kind: str          # "fiat" or "custom"
    currency: str      # for fiat
    decimals: int      # decimals shown to people


@dataclass(frozen=True)
class Meter:
    name: str
    credit_type: int
    precision: int               # decimals allowed in quantities
    aggregation: int             # AGGREGATIONS index: how usage adds up in a period
    price_dimensions: tuple[str, ...]  # the dimensions that select the price; () when it has one price
    # nano-credits per smallest unit, by a value per price dimension (None: any value, or none)
    prices: dict[tuple[str | None, ...], Fraction]
    unique_dimension: str = ""   # unique_count: the dimension whose distinct values are counted
    # per price dimension: the value an event without it is priced as (None: it is not)
    dimension_defaults: tuple[str | None, ...] = ()
    per: int = 1                 # the units the catalog's prices are written per
    increment: int = 1           # quantities are rounded up to a multiple of this (smallest units)
    minimum_nano: int = 0        # the least an event costs, unless it is free
    # Rows priced by tiers (their ``prices`` entry is the dearest tier): (up to, in smallest units, or
    # None for the rest; nano-credits per smallest unit), graduated over the period's usage, or by volume.
    tiers: dict[tuple[str | None, ...], tuple[tuple[int | None, Fraction], ...]] = field(default_factory=dict)
    tier_mode: int = 0           # TIER_MODES index

    def billed(self, quantity: int) -> int:
        """A quantity (smallest units) as it is billed: rounded up to the increment."""
        return -(-quantity // self.increment) * self.increment

    def event_units(self, quantity: int) -> int:
        """What a reported event counts as in the core: one, for a count meter; else ``billed``."""
        return 1 if AGGREGATIONS[self.aggregation] == "count" else self.billed(quantity)

    @property
    def defaults(self) -> tuple[str | None, ...]:
        return self.dimension_defaults or (None,) * len(self.price_dimensions)

    @property
    def default_key(self) -> tuple[None, ...]:
        """The key of the price for any value of every price dimension."""
        return (None,) * len(self.price_dimensions)


@dataclass(frozen=True)
class Condition:
    """A dimension meterd sets itself, from a request's quantity of a meter (``conditions.<name>``):
    a long-context price, say, for prompts above 128k tokens."""
    name: str
    meter: int                 # the summed meter whose quantity in the request decides
    bounds: tuple[int, ...]    # up to (inclusive, in the meter's smallest units) of each value but the last
    values: tuple[str, ...]    # one more than the bounds

    def row(self) -> ConditionRow:
        return self.name.encode(), self.meter, self.bounds, tuple(v.encode() for v in self.values)


@dataclass(frozen=True)
class CustomerSeed:
    customer_id: str
    balances_nano: dict[int, int]
    overdraft_nano: dict[int, int]   # how far below zero the balance may go
    plan: str = ""


@dataclass(frozen=True)
class CompiledCatalog:
    """A catalog in the one form the core takes, with the names that map stored
    accounts and aggregates onto it. Built once per catalog (``Catalog.compiled``);
    each snapshot stores it in LMDB (``to_json``) so that replay uses the catalog
    the log was written under; two are the same catalog when they are equal."""

    denominators: tuple[int, ...]
    meters: tuple[MeterRow, ...]  # as corespec.MeterRow describes them
    rates: tuple[RateRow, ...]  # as corespec.RateRow describes them
    plans: tuple[tuple[tuple[int, int], ...], ...]         # per plan and credit type: fallback mode, step
    modes: tuple[bytes, ...]
    free: tuple[tuple[int, ...], ...]                      # per plan and meter: free units a period
    credit_types: tuple[str, ...]
    meter_names: tuple[str, ...]
    precisions: tuple[int, ...]
    plan_names: tuple[str, ...]
    conditions: tuple[ConditionRow, ...] = ()
    pools: tuple[int, ...] = ()  # per meter, the credit type of its pool (ledger mode), or -1; () for none

    def core_args(self) -> tuple[list, list, list, list, list, list, list, list]:
        """The core's constructor arguments (after the limits and capacity)."""
        return (list(self.denominators), list(self.meters), list(self.rates), [list(row) for row in self.plans],
                list(self.modes), [list(row) for row in self.free], [n.encode() for n in self.credit_types],
                list(self.conditions))

    @functools.cached_property
    def json(self) -> bytes:
        """The stored form (the layout older data directories have too)."""
        return json.dumps({
            "denominators": list(self.denominators),
            "meters": [[m[0].decode(), m[1], m[2], [d.decode() for d in m[3]], m[4], m[5].decode(),
                        [None if v is None else v.decode() for v in m[6]], m[7], m[8], m[9]] for m in self.meters],
            "rates": [[r[0], [None if v is None else v.decode() for v in r[1]], r[2], r[3], [list(t) for t in r[4]]]
                      for r in self.rates],
            "plans": [[list(c) for c in row] for row in self.plans], "modes": [m.decode() for m in self.modes],
            "plan_names": list(self.plan_names), "free": [list(row) for row in self.free],
            "credit_types": list(self.credit_types), "meter_names": list(self.meter_names),
            "precisions": list(self.precisions),
            "conditions": [[c[0].decode(), c[1], list(c[2]), [v.decode() for v in c[3]]] for c in self.conditions]}
            | ({"pools": list(self.pools)} if self.pools else {})).encode()

    def check(self) -> None:
        """The tables agree with each other (before a snapshot stores them, and after one is read back)."""
        credit_types, meters = len(self.credit_types), len(self.meters)
        invariant(len(self.denominators) == credit_types and all(d >= 1 for d in self.denominators),
                  "compiled catalog: one positive denominator per credit type")
        invariant(len(self.meter_names) == len(self.precisions) == meters, "compiled catalog: one name and "
                  "precision per meter")
        invariant(all(0 <= m[1] < credit_types for m in self.meters), "compiled catalog: meters priced in a "
                  "credit type it has")
        invariant(all(0 <= r[0] < meters and len(r[1]) == len(self.meters[r[0]][3]) for r in self.rates),
                  "compiled catalog: rates of meters it has, a value (or any) per price dimension")
        invariant(len(self.plans) == len(self.free) == len(self.plan_names), "compiled catalog: one row per plan")
        invariant(all(len(row) == credit_types for row in self.plans), "compiled catalog: a plan row per credit "
                  "type")
        invariant(all(len(row) == meters for row in self.free), "compiled catalog: free units per meter")
        invariant(not self.pools or (len(self.pools) == meters and self.plan_names[-1] == LOOSE_PLAN),
                  "compiled catalog: a pool (or none) per meter, and the loose plan last")

    @functools.cached_property
    def checked_json(self) -> bytes:
        """The stored form, once it is known to read back as this catalog."""
        self.check()
        invariant(CompiledCatalog.from_json(self.json) == self, "compiled catalog: its stored form reads back "
                  "as itself")
        return self.json

    @classmethod
    def from_json(cls, data: bytes) -> CompiledCatalog:
        doc = json.loads(data)
        # Data directories from before price tables hold one price dimension per meter
        # ("" for none), no dimension defaults, increments or minimums, and one value per
        # rate (null for the default).
        meters = tuple((m[0].encode(), m[1], m[2], tuple(d.encode() for d in _listed(m[3])), m[4], m[5].encode(),
                        tuple(None if v is None else v.encode() for v in (m[6] if len(m) > 6
                                                                          else [None] * len(_listed(m[3])))),
                        m[7] if len(m) > 7 else 1, m[8] if len(m) > 8 else 0, m[9] if len(m) > 9 else 0)
                       for m in doc["meters"])
        rates = tuple((r[0], tuple(None if v is None else v.encode()
                                   for v in (r[1] if isinstance(r[1], list) else [r[1]] * len(meters[r[0]][3]))),
                       r[2], r[3], tuple(tuple(t) for t in r[4]) if len(r) > 4 else ()) for r in doc["rates"])
        return cls(tuple(doc["denominators"]), meters, rates,
                   tuple(tuple(tuple(c) for c in row) for row in doc["plans"]),
                   tuple(m.encode() for m in doc["modes"]), tuple(tuple(row) for row in doc["free"]),
                   tuple(doc["credit_types"]), tuple(doc["meter_names"]), tuple(doc["precisions"]),
                   tuple(doc["plan_names"]),
                   tuple((c[0].encode(), c[1], tuple(c[2]), tuple(v.encode() for v in c[3]))
                         for c in doc.get("conditions", [])), tuple(doc.get("pools", ())))


def _listed(dims: str | list[str]) -> list[str]:
    return dims if isinstance(dims, list) else [dims] if dims else []


@dataclass
class Catalog:
    credit_types: list[CreditType]
    meters: list[Meter]
    customers: list[CustomerSeed]
    source: str = "<built-in demo catalog>"
    plans: list[Plan] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    credit_index: dict[str, int] = field(default_factory=dict)
    meter_index: dict[str, int] = field(default_factory=dict)
    plan_index: dict[str, Plan] = field(default_factory=dict)
    customer_index: dict[str, CustomerSeed] = field(default_factory=dict)
    conditions: list[Condition] = field(default_factory=list)
    pooled: bool = False  # for ledger mode (for_ledger): plans' free units of sum and count meters are pools

    def __post_init__(self) -> None:
        self.customer_index = {c.customer_id: c for c in self.customers}
        self.credit_index = {c.name: i for i, c in enumerate(self.credit_types)}
        self.meter_index = {m.name: i for i, m in enumerate(self.meters)}
        self.plan_index = {p.name: p for p in self.plans}

    def for_ledger(self) -> Catalog:
        """This catalog as ledger mode serves it: a pool credit type (``pool_name``) for each sum or
        count meter a plan gives free units of, after the catalog's own, and the core's loose plan."""
        if self.pooled:
            return self
        pools = [m.name for m in self.meters
                 if AGGREGATIONS[m.aggregation] in ("sum", "count") and any(m.name in p.free_units for p in self.plans)]
        for name in pools:
            if len(pool_name(name)) > NAME_BYTES_MAX:
                raise ConfigError(f"{self.source}: meters.{name}: a meter with free units has a name of at most "
                                  f"{NAME_BYTES_MAX - len(POOL_PREFIX)} characters in ledger mode (its free units "
                                  f"are a balance named {POOL_PREFIX}NAME)")
        return dataclasses.replace(self, pooled=True, credit_types=[
            *self.credit_types, *(CreditType(pool_name(name), "custom", "", 0) for name in pools)])

    def pool_of(self, meter: int) -> int:
        """The credit type of the meter's pool (ledger mode), or -1."""
        return self.credit_index.get(pool_name(self.meters[meter].name), -1) if self.pooled else -1

    @functools.cached_property
    def pools(self) -> tuple[int, ...]:
        """Per meter, its pool's credit type or -1; () when no meter has one."""
        pools = tuple(self.pool_of(m) for m in range(len(self.meters)))
        return pools if any(p >= 0 for p in pools) else ()

    @functools.cached_property
    def loose_plan(self) -> int:
        """The core's plan (index) on which a meter's pool is taken and the rest priced; 0: no pools."""
        return len(self.plans) + 1 if self.pools else 0

    @functools.cached_property
    def compiled(self) -> CompiledCatalog:
        """This catalog in the core's form, compiled once."""
        denominators, meters, rates = self.compile()
        plans, modes = self.core_plans()
        names = [p.name for p in self.plans]
        free = self.core_free()
        if self.pools:
            plans.append([(0, 0)] * len(self.credit_types))
            free.append([0] * len(self.meters))
            names.append(LOOSE_PLAN)
        return CompiledCatalog(tuple(denominators), tuple(meters), tuple(rates),
                               tuple(tuple(row) for row in plans), tuple(modes),
                               tuple(tuple(row) for row in free),
                               tuple(c.name for c in self.credit_types), tuple(m.name for m in self.meters),
                               tuple(m.precision for m in self.meters), tuple(names),
                               tuple(c.row() for c in self.conditions), self.pools)

    def core_free(self) -> list[list[int]]:
        """Free units a period per plan and meter, in each meter's smallest unit."""
        return [[int(plan.free_units.get(m.name, 0) * 10**m.precision) for m in self.meters] for plan in self.plans]

    def core_plans(self) -> tuple[list[list[tuple[int, int]]], list[bytes]]:
        """The core's plan table (fallback mode, priority step per credit type) and mode names."""
        table = []
        for plan in self.plans:
            row = []
            for ct in range(len(self.credit_types)):
                policy = plan.credits.get(ct)
                mode = self.modes.index(policy.fallback) + 1 if policy is not None and policy.fallback else 0
                row.append((mode, policy.priority_step_nano if policy is not None else 0))
            table.append(row)
        return table, [m.encode() for m in self.modes]

    def compile(self) -> tuple[list[int], list[MeterRow], list[RateRow]]:
        """Denominators per credit type, meter tuples and rate tuples for the core."""
        denominators = [1] * len(self.credit_types)
        for m in self.meters:
            for price in [*m.prices.values(), *(p for rows in m.tiers.values() for _, p in rows)]:
                d = denominators[m.credit_type]
                denominators[m.credit_type] = d * price.denominator // math.gcd(d, price.denominator)
        for i, d in enumerate(denominators):
            if d > DENOMINATOR_MAX // DISCOUNT_SCALE:
                raise ConfigError(
                    f"{self.source}: credit_types.{self.credit_types[i].name}: the prices of its meters need "
                    f"a common denominator of {d}, above {DENOMINATOR_MAX // DISCOUNT_SCALE}; simplify the prices")
            denominators[i] = d * DISCOUNT_SCALE  # so that a customer's discount is exact (corespec)
        meters = []
        rates = []
        for mi, m in enumerate(self.meters):
            meters.append((m.name.encode(), m.credit_type, m.precision, tuple(d.encode() for d in m.price_dimensions),
                           m.aggregation, m.unique_dimension.encode(),
                           tuple(None if v is None else v.encode() for v in m.defaults), m.increment, m.minimum_nano,
                           m.tier_mode))
            for key, price in m.prices.items():
                where = "price" if key == m.default_key else "prices." + ".".join(v or WILDCARD for v in key)
                d = denominators[m.credit_type]
                steps = tuple((INT64_MAX if up_to is None else up_to, self._numerator(p, m, where), d // p.denominator)
                              for up_to, p in m.tiers.get(key, ()))
                rates.append((mi, tuple(None if v is None else v.encode() for v in key),
                              self._numerator(price, m, where), d // price.denominator, steps))
        return denominators, meters, rates

    def _numerator(self, price: Fraction, m: Meter, where: str) -> int:
        if price.numerator > INT64_MAX:
            raise ConfigError(f"{self.source}: meters.{m.name}.{where}: too large for 64-bit nano-units")
        return price.numerator

    def shape(self) -> dict[str, Any]:
        """What a snapshot needs to map stored accounts onto this catalog."""
        denominators, _, _ = self.compile()
        return {
            "credit_types": [c.name for c in self.credit_types],
            "meters": [m.name for m in self.meters],
            "precisions": [m.precision for m in self.meters],
            "denominators": denominators,
        }

    def describe(self) -> str:
        """What the catalog says, in words, for ``meterd check-config``."""
        lines = [f"catalog {self.source}"]
        for credit in self.credit_types:
            unit = credit.currency if credit.kind == "fiat" else "custom unit"
            lines.append(f"  credit type {credit.name}: {unit}, {credit.decimals} decimals")
        for m in self.meters:
            priced_in = self.credit_types[m.credit_type].name
            agg = AGGREGATIONS[m.aggregation]
            head = f"  meter {m.name}: {agg}, {m.precision} decimals, priced in {priced_in}"
            per = f" per {m.per}" if m.per > 1 else ""
            if len(m.price_dimensions) <= 1:
                by = f" by {m.price_dimensions[0]}" if m.price_dimensions else ""
                prices = ", ".join(f"{'default' if not k or k[0] is None else k[0]} {_price_text(m, k, price)}"
                                   for k, price in m.prices.items())
                lines.append(f"{head}{by}{per}: {prices}{_defaulted(m)}{self._steps(m)}")
                continue
            lines.append(f"{head}{per} by {' × '.join(m.price_dimensions)}{_defaulted(m)}{self._steps(m)}; "
                         f"the first row that matches holds (a value before *, {m.price_dimensions[0]} first):")
            for k, price in sorted(m.prices.items(), key=lambda row: -rate_mask(_shape(row[0]))):
                cells = ", ".join(f"{d}={WILDCARD if v is None else v}"
                                  for d, v in zip(m.price_dimensions, k, strict=True))
                lines.append(f"    {cells}: {_price_text(m, k, price)}")
        for cond in self.conditions:
            m = self.meters[cond.meter]
            bands = ", ".join(f"{v} up to {_units(b, m.precision)}"
                              for v, b in zip(cond.values, cond.bounds, strict=False))
            lines.append(f"  condition {cond.name}: set from the request's {m.name}: {bands}, "
                         f"else {cond.values[-1]}")
        for plan in self.plans:
            fees = ", ".join(f"{format_nano(v)} {self.credit_types[ct].name}"
                             for ct, v in plan.fees_nano.items()) or "none"
            extra = ""
            if plan.free_units:
                extra += ", free each period: " + ", ".join(f"{v} {k}" for k, v in plan.free_units.items())
            if plan.trial_nano:
                extra += f", a {plan.trial_days}-day trial of " + ", ".join(
                    f"{format_nano(v)} {self.credit_types[ct].name}" for ct, v in plan.trial_nano.items())
            credits = f" (credits every {plan.credit_period})" if plan.credit_period else ""
            lines.append(f"  plan {plan.name}: every {plan.period}{credits}, fee {fees}{extra}")
            for ct, p in plan.credits.items():
                end = f"at each {plan.credit_period}'s end" if plan.credit_period else "at the period's end"
                expiry = {None: end, 0: "never"}.get(p.expiry_days, f"after {p.expiry_days} days")
                parts = [f"includes {format_nano(p.included_nano)} (expiring {expiry})"]
                if p.rollover:
                    r = p.rollover
                    caps = "".join([f", at most {format_nano(r.max_nano)}" if r.max_nano is not None else "",
                                    f", balance capped at {format_nano(r.balance_cap_nano)}"
                                    if r.balance_cap_nano is not None else ""])
                    life = f"{r.lifetime_periods} periods" if r.lifetime_periods else "ever"
                    parts.append(f"rolls over {r.max_percent}% up to {r.max_count} times{caps}, living {life}")
                if p.overage:
                    o = p.overage
                    limit = "no limit" if o.limit_nano is None else f"limit {format_nano(o.limit_nano)}"
                    money = self.credit_types[o.price_credit_type].name
                    tiers = "; ".join(f"{'rest' if t.up_to_nano is None else 'to ' + format_nano(t.up_to_nano)} at "
                                      f"{_exact(t.price)} {money}" for t in o.tiers)
                    early = f", billed early at {format_nano(o.bill_threshold_nano)}" \
                        if o.bill_threshold_nano is not None else ""
                    parts.append(f"overage ({limit}; {tiers} per unit; {o.at_cycle_end} at period end{early})")
                if p.arrears:
                    parts.append("billed in arrears")
                if p.fallback:
                    step = f", priority falling per {format_nano(p.priority_step_nano)}" if p.priority_step_nano else ""
                    parts.append(f"falls back to {p.fallback}{step}")
                if p.low_balance_nano is not None and p.topup_target_nano is not None:
                    parts.append(f"asks for a top-up to {format_nano(p.topup_target_nano)} "
                                 f"below {format_nano(p.low_balance_nano)}")
                lines.append(f"    {self.credit_types[ct].name}: " + ", ".join(parts))
        for c in self.customers:
            lines.append(f"  customer {c.customer_id}: plan {c.plan or 'none'}, balances "
                         + (", ".join(f"{format_nano(v)} {self.credit_types[ct].name}"
                                      for ct, v in c.balances_nano.items()) or "none"))
        return "\n".join(lines)

    def _steps(self, m: Meter) -> str:
        """A meter's increment and minimum, in words."""
        said = []
        if m.increment > 1:
            step = self.format_quantity(self.meter_index[m.name], m.increment)
            said.append(f"quantities rounded up to a multiple of {step}")
        if m.minimum_nano:
            said.append(f"at least {format_nano(m.minimum_nano)} {self.credit_types[m.credit_type].name} an event "
                        "that is not free")
        return "".join(f", {s}" for s in said)

    def format_quantity(self, meter: int, base_units: int) -> str:
        """Exact decimal text of a quantity held in the meter's smallest unit."""
        p = self.meters[meter].precision
        if p == 0:
            return str(base_units)
        whole, frac = divmod(base_units, 10**p)
        return f"{whole}.{frac:0{p}d}"


def _price_text(m: Meter, key: tuple[str | None, ...], price: Fraction) -> str:
    """A row's price per ``per`` units, or its tiers, in words."""
    if key not in m.tiers:
        return _per_unit(price * m.per, m.precision)
    steps = ", ".join(f"{'rest' if up_to is None else 'to ' + _units(up_to, m.precision)} at "
                      f"{_per_unit(p * m.per, m.precision)}" for up_to, p in m.tiers[key])
    how = "graduated over the period's usage" if m.tier_mode == 0 else \
        "volume: every unit at the tier the period's value reaches"
    return f"{steps} ({how})"


def _shape(key: tuple[str | None, ...]) -> tuple[bytes | None, ...]:
    """Which of a row's dimensions have a value (for corespec.rate_mask)."""
    return tuple(None if v is None else b"" for v in key)


def _defaulted(m: Meter) -> str:
    """What an event without a price dimension is priced as, in words."""
    said = [f"{d}={v}" for d, v in zip(m.price_dimensions, m.defaults, strict=True) if v is not None]
    return f" (an event without it priced as {', '.join(said)})" if said else ""


def _per_unit(price: Fraction, precision: int) -> str:
    """A price held per smallest unit, shown per whole unit of the meter."""
    return _exact(price * 10**precision / NANO)


def _exact(value: Fraction) -> str:
    """A decimal when it ends (0.0000025), a fraction when it does not (1/3)."""
    d = value.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    if d != 1:
        return f"{value.numerator}/{value.denominator}"
    digits = 0
    while (value * 10**digits).denominator != 1:
        digits += 1
    whole = value * 10**digits
    text = str(whole.numerator).rjust(digits + 1, "0")
    return text if digits == 0 else f"{text[:-digits]}.{text[-digits:]}"


def _err(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def parse_amount(text: Any, source: str, key: str) -> Fraction:
    """A non-negative exact amount: decimal string, integer, or "a/b"."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise _err(source, key, "must be a decimal string like \"2.50\", an integer or a fraction \"1/3\"")
    s = str(text).strip()
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?(/[0-9]+)?", s):  # ASCII digits only (\d takes any script's)
        raise _err(source, key, f"{s!r} is not a decimal like \"2.50\" or a fraction like \"1/3\"")
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise _err(source, key, f"{s!r} is not a valid amount") from None
    return value


def to_nano(value: Fraction, source: str, key: str) -> int:
    nano = value * NANO
    if nano.denominator != 1:
        raise _err(source, key, "has more than 9 decimals (amounts are held in nano-units)")
    if nano > 2**62:
        raise _err(source, key, "is too large")
    return int(nano)


def _table(doc: dict, key: str, source: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise _err(source, key, "must be a table")
    return value


def _check_keys(table: dict, allowed: set[str], source: str, where: str) -> None:
    for k in table:
        if k not in allowed:
            raise _err(source, f"{where}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def _credit_types(doc: dict, source: str) -> list[CreditType]:
    out = []
    for name, spec in _table(doc, "credit_types", source).items():
        where = f"credit_types.{name}"
        if not NAME_RE.match(name):
            raise _err(source, where, "names are lower-case letters, digits, _ . : - (at most 64)")
        if not isinstance(spec, dict):
            raise _err(source, where, "must be a table")
        _check_keys(spec, {"kind", "currency", "decimals"}, source, where)
        kind = spec.get("kind", "fiat")
        if kind not in ("fiat", "custom"):
            raise _err(source, f"{where}.kind", "must be \"fiat\" or \"custom\"")
        decimals = spec.get("decimals", 2 if kind == "fiat" else 0)
        top = 9 if kind == "fiat" else 3
        if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= top:
            raise _err(source, f"{where}.decimals", f"must be an integer from 0 to {top} for a {kind} credit type")
        currency = spec.get("currency", "USD" if kind == "fiat" else "")
        if kind == "fiat" and not re.fullmatch(r"[A-Z]{3}", str(currency)):
            raise _err(source, f"{where}.currency", "must be a three-letter ISO 4217 code")
        out.append(CreditType(name, kind, str(currency), decimals))
    if not out:
        raise _err(source, "credit_types", "at least one credit type is required")
    return out


def _meter(name: str, spec: Any, credit_index: dict[str, int], source: str) -> Meter:
    where = f"meters.{name}"
    if not NAME_RE.match(name):
        raise _err(source, where, "names are lower-case letters, digits, _ . : - (at most 64)")
    if not isinstance(spec, dict):
        raise _err(source, where, "must be a table")
    _check_keys(spec, {"credit_type", "precision", "price_dimension", "price_dimensions", "per", "price", "prices",
                       "aggregation", "unique_dimension", "dimension_defaults", "increment", "minimum", "tier_mode"},
                source, where)
    agg = spec.get("aggregation", "sum")
    unique = spec.get("unique_dimension", "")
    if (agg == "unique_count") != bool(unique) or not isinstance(unique, str) or len(unique) > 64:
        raise _err(source, f"{where}.unique_dimension",
                   "a unique_count meter names the dimension whose distinct values it counts (and only it does)")
    if agg not in AGGREGATIONS:
        raise _err(source, f"{where}.aggregation", f"must be one of {', '.join(AGGREGATIONS)}")
    ct = spec.get("credit_type")
    if ct not in credit_index:
        raise _err(source, f"{where}.credit_type", f"must name one of the credit types {sorted(credit_index)}")
    precision = spec.get("precision", 0)
    if not isinstance(precision, int) or isinstance(precision, bool) or not 0 <= precision <= 9:
        raise _err(source, f"{where}.precision", "must be an integer from 0 to 9")
    per = spec.get("per", 1)
    if not isinstance(per, int) or isinstance(per, bool) or not 1 <= per <= 10**12:
        raise _err(source, f"{where}.per", "must be an integer from 1 to 10^12")
    dims = _price_dimensions(spec, source, where)
    scale = NANO / Fraction(per * 10**precision)
    prices: dict[tuple[str | None, ...], Fraction] = {}
    tiers: dict[tuple[str | None, ...], tuple[tuple[int | None, Fraction], ...]] = {}

    def put(key: tuple[str | None, ...], price: Any, at: str) -> None:
        if key in prices:
            raise _err(source, at, "gives the same price twice (with price, or with \"*\" for the same "
                       "dimensions)")
        if isinstance(price, list):
            tiers[key] = _tiers(price, precision, scale, source, at)
            prices[key] = max(p for _, p in tiers[key])  # the dearest: what a hold covers
        else:
            prices[key] = parse_amount(price, source, at) * scale

    if "price" in spec:
        put((None,) * len(dims), spec["price"], f"{where}.price")
    by_value = spec.get("prices", {})
    if not isinstance(by_value, dict):
        raise _err(source, f"{where}.prices", "must be a table of dimension value = price")
    if by_value and not dims:
        raise _err(source, f"{where}.prices", "needs price_dimension to say which dimension selects the price")
    for key, price, at in _price_rows(by_value, dims, source, f"{where}.prices"):
        put(key, price, at)
    if not prices:
        raise _err(source, where, "needs a price, or prices by dimension value")
    if agg == "count" and precision:
        raise _err(source, f"{where}.precision", "a count meter counts whole events: precision must be 0")
    defaults = spec.get("dimension_defaults", {})
    if not isinstance(defaults, dict):
        raise _err(source, f"{where}.dimension_defaults", "must be a table of price dimension = value")
    if defaults and agg not in ("sum", "count"):
        raise _err(source, f"{where}.dimension_defaults", "a max, latest or unique_count meter is charged on its "
                   "period's value at its default price: dimension_defaults do not apply to it")
    for d, v in defaults.items():
        if d not in dims:
            raise _err(source, f"{where}.dimension_defaults.{d}", f"is not a price dimension of the meter "
                       f"({', '.join(dims) or 'it has none'})")
        if not isinstance(v, str) or v == WILDCARD or not DIM_VALUE_RE.match(v):
            raise _err(source, f"{where}.dimension_defaults.{d}", "must be a dimension value of 1 to 128 "
                       "printable characters (not *)")
    increment, minimum = _steps(spec, agg, precision, source, where)
    mode = spec.get("tier_mode", "graduated")
    if mode not in TIER_MODES:
        raise _err(source, f"{where}.tier_mode", "must be graduated or volume")
    if mode == "volume" and agg in ("sum", "count"):
        raise _err(source, f"{where}.tier_mode", "volume tiers price a period's value at its end: for max, latest "
                   "or unique_count meters (a sum meter's tiers are graduated, each unit at its place)")
    return Meter(name, credit_index[ct], precision, AGGREGATIONS.index(agg), dims, prices, unique,
                 tuple(defaults.get(d) for d in dims), per, increment, minimum, tiers, TIER_MODES.index(mode))


def _tiers(rows: list, precision: int, scale: Fraction, source: str,
           where: str) -> tuple[tuple[int | None, Fraction], ...]:
    """A price given as tiers: [{ up_to = "100", price = "0.10" }, ..., { price = "0.05" }], each
    tier's up_to in the meter's unit (the last tier has none: it holds for the rest)."""
    if not rows:
        raise _err(source, where, "a tier list needs at least one tier")
    if len(rows) > TIERS_PER_PRICE_MAX:
        raise _err(source, where, f"at most {TIERS_PER_PRICE_MAX} tiers")
    out: list[tuple[int | None, Fraction]] = []
    last = 0
    for i, row in enumerate(rows):
        at = f"{where}[{i}]"
        if not isinstance(row, dict):
            raise _err(source, at, "must be a table such as { up_to = \"100\", price = \"0.10\" }")
        _check_keys(row, {"up_to", "price"}, source, at)
        if "price" not in row:
            raise _err(source, f"{at}.price", "is required")
        price = parse_amount(row["price"], source, f"{at}.price") * scale
        if i == len(rows) - 1:
            if "up_to" in row:
                raise _err(source, where, "the last tier has no up_to: it holds for the rest")
            out.append((None, price))
            continue
        if "up_to" not in row:
            raise _err(source, f"{at}.up_to", "is required (on every tier but the last)")
        units = parse_amount(row["up_to"], source, f"{at}.up_to") * 10**precision
        if units.denominator != 1:
            raise _err(source, f"{at}.up_to", f"has more decimals than the meter's precision ({precision})")
        if units <= last:
            raise _err(source, f"{at}.up_to", f"must be above the tier before it ({_units(last, precision)})")
        if units >= INT64_MAX:
            raise _err(source, f"{at}.up_to", "is too large")
        last = int(units)
        out.append((last, price))
    return tuple(out)


def _units(units: int, precision: int) -> str:
    """Smallest units as the meter's unit, an exact decimal."""
    return _exact(Fraction(units, 10**precision))


def _steps(spec: dict, agg: str, precision: int, source: str, where: str) -> tuple[int, int]:
    """A meter's billing increment (in its smallest units) and minimum charge per event (nano)."""
    increment, minimum = 1, 0
    if "increment" in spec:
        units = parse_amount(spec["increment"], source, f"{where}.increment") * 10**precision
        if units.denominator != 1:
            raise _err(source, f"{where}.increment", f"has more decimals than the meter's precision ({precision})")
        if units == 0:
            raise _err(source, f"{where}.increment", "must be above zero")
        if agg != "sum" and units != 1:
            raise _err(source, f"{where}.increment", "only a sum meter's quantities are rounded (a count meter's "
                       "is one event; the others are charged on their period's value)")
        if units > INT64_MAX:
            raise _err(source, f"{where}.increment", "is too large")
        increment = int(units)
    if "minimum" in spec:
        if agg not in ("sum", "count"):
            raise _err(source, f"{where}.minimum", "a max, latest or unique_count meter is charged on its "
                       "period's value, not per event: it has no minimum")
        minimum = to_nano(parse_amount(spec["minimum"], source, f"{where}.minimum"), source, f"{where}.minimum")
    return increment, minimum


def _price_dimensions(spec: dict, source: str, where: str) -> tuple[str, ...]:
    """The dimensions that select a meter's price: ``price_dimension`` (one) or
    ``price_dimensions`` (a list, the first weighing most when rates compete)."""
    if "price_dimension" in spec and "price_dimensions" in spec:
        raise _err(source, f"{where}.price_dimensions", "give price_dimension or price_dimensions, not both")
    if "price_dimensions" in spec:
        key, dims = "price_dimensions", spec["price_dimensions"]
        if not isinstance(dims, list) or not dims:
            raise _err(source, f"{where}.{key}", "must be a list of dimension keys, such as [\"model\", \"tier\"]")
    else:
        key, one = "price_dimension", spec.get("price_dimension", "")
        dims = [one] if one else []
    if len(dims) > PRICE_DIMENSIONS_MAX:
        raise _err(source, f"{where}.{key}", f"at most {PRICE_DIMENSIONS_MAX} price dimensions")
    for d in dims:
        if not isinstance(d, str) or not re.fullmatch(r"[!-~]{1,64}", d):
            raise _err(source, f"{where}.{key}", f"{d!r} is not a dimension key of 1 to 64 printable characters")
    if len(set(dims)) != len(dims):
        raise _err(source, f"{where}.{key}", "names a dimension twice")
    return tuple(dims)


def _price_rows(table: dict, dims: tuple[str, ...], source: str, where: str,
                head: tuple[str | None, ...] = ()) -> list[tuple[tuple[str | None, ...], Any, str]]:
    """A price table's rows (key, price, where it is written): a table per price
    dimension in order, its keys that dimension's values, "*" for any value (or
    none). A price written before the last dimension holds for any value of the
    rest."""
    rows: list[tuple[tuple[str | None, ...], Any, str]] = []
    depth = len(head)
    for value, entry in table.items():
        at = f"{where}.{value}"
        if value != WILDCARD and not DIM_VALUE_RE.match(value):
            raise _err(source, at, "dimension values are 1 to 128 printable characters")
        key = head + (None if value == WILDCARD else value,)
        if isinstance(entry, dict):
            if depth + 1 == len(dims):
                raise _err(source, at, f"must be a price: the table is keyed by {', '.join(dims)}")
            rows += _price_rows(entry, dims, source, at, key)
        else:
            rows.append((key + (None,) * (len(dims) - len(key)), entry, at))
    return rows


def _conditions(doc: dict, catalog: Catalog, source: str) -> list[Condition]:
    """``[conditions.<dimension>]``: quantity_of = a summed meter, values = [{ up_to = "128000",
    value = "short" }, ..., { value = "long" }], the bounds growing, the last without one."""
    out = []
    table = _table(doc, "conditions", source)
    if len(table) > CONDITIONS_MAX:
        raise _err(source, "conditions", f"at most {CONDITIONS_MAX} conditions")
    uniques = {m.unique_dimension for m in catalog.meters}
    for name, spec in table.items():
        where = f"conditions.{name}"
        if not re.fullmatch(r"[!-~]{1,64}", name):
            raise _err(source, where, "the dimension a condition sets is a key of 1 to 64 printable characters")
        if not isinstance(spec, dict):
            raise _err(source, where, "must be a table")
        _check_keys(spec, {"quantity_of", "values"}, source, where)
        if name in uniques:
            raise _err(source, where, "is the dimension a unique_count meter counts the values of")
        of = spec.get("quantity_of")
        meter = catalog.meter_index.get(of) if isinstance(of, str) else None
        if meter is None or catalog.meters[meter].aggregation != 0:
            raise _err(source, f"{where}.quantity_of", "must name a sum meter: the request's quantity of it decides")
        m = catalog.meters[meter]
        rows = spec.get("values")
        if not isinstance(rows, list) or not 2 <= len(rows) <= CONDITION_VALUES_MAX:
            raise _err(source, f"{where}.values", f"must be a list of 2 to {CONDITION_VALUES_MAX} values, "
                       "[{ up_to = \"128000\", value = \"short\" }, { value = \"long\" }]")
        bounds: list[int] = []
        values: list[str] = []
        for i, row in enumerate(rows):
            at = f"{where}.values[{i}]"
            last = i == len(rows) - 1
            if not isinstance(row, dict) or set(row) - {"up_to", "value"} or ("up_to" in row) == last:
                raise _err(source, at, "each value but the last has an up_to, the last has none: "
                           "{ up_to = \"128000\", value = \"short\" }, then { value = \"long\" }")
            value = row.get("value")
            if not isinstance(value, str) or value == WILDCARD or not DIM_VALUE_RE.match(value):
                raise _err(source, f"{at}.value", "must be a dimension value of 1 to 128 printable characters "
                           "(not *)")
            values.append(value)
            if not last:
                units = parse_amount(row["up_to"], source, f"{at}.up_to") * 10**m.precision
                if units.denominator != 1 or units > INT64_MAX:
                    raise _err(source, f"{at}.up_to", f"must be a quantity of {m.name} (at most {m.precision} "
                               "decimals)")
                if bounds and units <= bounds[-1]:
                    raise _err(source, f"{at}.up_to", "must be above the one before it")
                bounds.append(int(units))
        out.append(Condition(name, meter, tuple(bounds), tuple(values)))
    return out


def _customers(doc: dict, credit_index: dict[str, int], plan_names: set[str], source: str) -> list[CustomerSeed]:
    out = []
    for cid, spec in _table(doc, "customers", source).items():
        where = f"customers.{cid}"
        if not ID_RE.match(cid):
            raise _err(source, where, "customer ids are 1 to 128 printable ASCII characters without spaces")
        if not isinstance(spec, dict):
            raise _err(source, where, "must be a table")
        _check_keys(spec, {"balances", "overdraft", "plan"}, source, where)
        plan = spec.get("plan", "")
        if plan and plan not in plan_names:
            raise _err(source, f"{where}.plan", f"unknown plan (known: {', '.join(sorted(plan_names)) or 'none'})")
        amounts: list[dict[int, int]] = []
        for key in ("balances", "overdraft"):
            table = spec.get(key, {})
            if not isinstance(table, dict):
                raise _err(source, f"{where}.{key}", "must be a table of credit type = amount")
            parsed = {}
            for ct, amount in table.items():
                if ct not in credit_index:
                    raise _err(source, f"{where}.{key}.{ct}", "unknown credit type")
                k = f"{where}.{key}.{ct}"
                parsed[credit_index[ct]] = to_nano(parse_amount(amount, source, k), source, k)
            amounts.append(parsed)
        out.append(CustomerSeed(cid, amounts[0], amounts[1], plan))
    return out


def step_nano(credit: CreditType) -> int:
    """The smallest amount a custom credit type is granted in (fiat types: one nano)."""
    return 10 ** (9 - credit.decimals) if credit.kind == "custom" else 1


def _check_custom_decimals(catalog: Catalog) -> None:
    """Amounts of a custom credit type in the catalog keep to its decimals."""
    def check(ct: int, value: int | None, key: str) -> None:
        credit = catalog.credit_types[ct]
        if value is not None and value % step_nano(credit):
            raise _err(catalog.source, key, f"has more decimals than {credit.name} allows ({credit.decimals})")
    for c in catalog.customers:
        for ct, v in c.balances_nano.items():
            check(ct, v, f"customers.{c.customer_id}.balances.{catalog.credit_types[ct].name}")
        for ct, v in c.overdraft_nano.items():
            check(ct, v, f"customers.{c.customer_id}.overdraft.{catalog.credit_types[ct].name}")
    for plan in catalog.plans:
        for ct, v in plan.trial_nano.items():
            check(ct, v, f"plans.{plan.name}.trial.credits.{catalog.credit_types[ct].name}")
        for ct, p in plan.credits.items():
            where = f"plans.{plan.name}.credits.{catalog.credit_types[ct].name}"
            check(ct, p.included_nano, f"{where}.included")
            check(ct, p.low_balance_nano, f"{where}.low_balance")
            check(ct, p.topup_target_nano, f"{where}.topup_target")


def parse_catalog(doc: dict, source: str) -> Catalog:
    _check_keys(doc, {"credit_types", "meters", "customers", "plans", "conditions"}, source, "catalog")
    credit_types = _credit_types(doc, source)
    credit_index = {c.name: i for i, c in enumerate(credit_types)}
    meters = [_meter(n, s, credit_index, source) for n, s in _table(doc, "meters", source).items()]
    if not meters:
        raise _err(source, "meters", "at least one meter is required")
    modes: list[str] = []

    def amount(value: Any, key: str) -> int:
        return to_nano(parse_amount(value, source, key), source, key)

    plans = parse_plans(doc, credit_index, modes, source, amount, _check_keys)
    customers = _customers(doc, credit_index, {p.name for p in plans}, source)
    catalog = Catalog(credit_types, meters, customers, source, plans, modes)
    catalog.conditions = _conditions(doc, catalog, source)
    _check_custom_decimals(catalog)
    for plan in plans:
        for meter_name, units in plan.free_units.items():
            m = catalog.meters[catalog.meter_index[meter_name]] if meter_name in catalog.meter_index else None
            if m is None:
                raise _err(source, f"plans.{plan.name}.free.{meter_name}", "unknown meter")
            if (units * 10**m.precision).denominator != 1:
                raise _err(source, f"plans.{plan.name}.free.{meter_name}", f"has more than {m.precision} decimals")
    for m in meters:
        if m.aggregation >= 2 and m.default_key not in m.prices:
            raise _err(source, f"meters.{m.name}.price", "a max, latest or unique_count meter is charged on its "
                       "period's value and needs a default price")
    catalog.compile()  # raises on a denominator that is too large
    return catalog


def load_catalog(path: str | None) -> Catalog:
    """Read and validate a catalog file, or the built-in demo catalog when ``path`` is empty."""
    if not path:
        text = resources.files("meterd").joinpath("demo_catalog.toml").read_text()
        return parse_catalog(tomllib.loads(text), "<built-in demo catalog>")
    doc = read_toml(path)
    # A settings file that also holds the catalog: its settings are not catalog keys.
    doc = {k: v for k, v in doc.items() if k in CATALOG_TABLES or k not in SETTINGS_FIELDS}
    return parse_catalog(doc, path)
