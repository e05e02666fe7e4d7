"""Plans: billing periods, included credits, rollover, overage and fallbacks.

A plan is configuration: the catalog's ``[plans.NAME]`` tables parse into
``Plan`` objects here. The engine applies them at subscription time and at
each period boundary; the compiled core only sees, per plan and credit type,
the fallback mode and the priority step of degraded decisions.
"""

from __future__ import annotations

import calendar
import datetime as dt
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from meterd.errors import ConfigError

PERIODS = ("day", "week", "month", "year")
# A plan's credit period (its credits, usage and fallback priority start again at
# each) within its billing period (its fee): one whose boundaries all fall on the
# billing period's. Both are counted from the subscription's anchor.
CREDIT_PERIODS = {"year": ("month", "day"), "month": ("day",), "week": ("day",), "day": ()}
# What happens to a negative balance when a period ends: billed; forgiven; carried
# (taken off the balance, so the next period's credits are whole, and billed at
# the next period's end); or carried and repaid (the balance stays negative and
# the next period's credits pay it back).
AT_CYCLE_END = ("bill", "forgive", "carry", "carry_repay")
ARREARS_FLOOR_NANO = -(1 << 62)
DAY_MS = 86_400_000


@dataclass(frozen=True)
class Tier:
    up_to_nano: int | None      # credit nano-units this tier reaches; None: no end
    price: Fraction             # money nano-units per credit nano-unit


@dataclass(frozen=True)
class Overage:
    limit_nano: int | None      # how far below zero the balance may go; None: no limit
    price_credit_type: int      # the money the overage is priced in
    tiers: tuple[Tier, ...]     # graduated: each unit is priced by the tier it falls in
    at_cycle_end: str           # bill | forgive | carry
    bill_threshold_nano: int | None  # bill early once this much credit is owed
    spend_limit_nano: int | None = None  # a limit given in money (``limit_nano`` is its units at these prices)

    def units_within(self, from_nano: int, money_nano: int) -> int:
        """The most overage units after ``from_nano`` of them whose graduated price
        (continuing from there) stays within ``money_nano``."""
        if money_nano <= 0:
            return 0
        base = self.charge(from_nano)
        lo, hi = 0, 1 << 62
        while lo < hi:  # charge() only grows
            mid = (lo + hi + 1) // 2
            if self.charge(from_nano + mid) - base <= money_nano:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def charge(self, units_nano: int) -> int:
        """Exact money (nano) for ``units_nano`` of overage, graduated by tier; rounded up."""
        total = Fraction(0)
        start = 0
        for tier in self.tiers:
            end = units_nano if tier.up_to_nano is None else min(units_nano, tier.up_to_nano)
            if end > start:
                total += (end - start) * tier.price
                start = end
            if start >= units_nano:
                break
        return -((-total.numerator) // total.denominator)

    def bill(self, billed_nano: int, units_nano: int) -> tuple[int, list[tuple[int, int, str, int]]]:
        """The money for ``units_nano`` more of a period's overage, after ``billed_nano`` of it
        were billed (the graduated tiers go on from there), and its breakdown by tier."""
        end = billed_nano + units_nano
        return self.charge(end) - self.charge(billed_nano), self.breakdown(billed_nano, end)

    def breakdown(self, from_nano: int, to_nano: int) -> list[tuple[int, int, str, int]]:
        """The charge for the units from ``from_nano`` to ``to_nano`` of a
        period's overage, tier by tier: (tier, units, unit price, charge).
        The charges add up to ``charge(to_nano) - charge(from_nano)`` exactly."""
        out = []
        start = 0
        exact = Fraction(0)
        for tier in self.tiers:
            end = to_nano if tier.up_to_nano is None else min(to_nano, tier.up_to_nano)
            below = max(0, min(end, from_nano) - start)
            exact += below * tier.price  # what earlier bills of the period already charged
            start = max(start, end)
        done = exact
        start = 0
        for n, tier in enumerate(self.tiers, 1):
            end = to_nano if tier.up_to_nano is None else min(to_nano, tier.up_to_nano)
            units = max(0, end - max(start, from_nano))
            if units:
                after = done + units * tier.price
                out.append((n, units, _price_text(tier.price), _ceil(after) - _ceil(done)))
                done = after
            start = max(start, end)
            if start >= to_nano:
                break
        return out


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def _price_text(price: Fraction) -> str:
    """A price exactly: a decimal when it has one, else a fraction."""
    d = price.denominator
    twos = fives = 0
    while d % 2 == 0:
        d //= 2
        twos += 1
    while d % 5 == 0:
        d //= 5
        fives += 1
    if d != 1:
        return f"{price.numerator}/{price.denominator}"
    places = max(twos, fives)
    scaled = price.numerator * 10**places // price.denominator
    sign = "-" if scaled < 0 else ""
    whole, frac = divmod(abs(scaled), 10**places)
    return f"{sign}{whole}" + (f".{frac:0{places}d}".rstrip("0").rstrip(".") if places else "")


@dataclass(frozen=True)
class Rollover:
    max_percent: int            # of what is left of a cycle's credits
    max_count: int              # how many times credits may roll
    lifetime_periods: int       # rolled credits expire after this many periods (0: never)
    max_nano: int | None        # most that may roll at one boundary
    balance_cap_nano: int | None  # balance after the boundary may not exceed this


def rollover_split(rollover: Rollover | None, expiring: list[tuple[int, int]], staying: int, incoming: int,
                   ending: bool) -> list[int]:
    """How much of each credit bucket expiring at a period's boundary rolls over, within the
    caps; the rest of each is forfeited. ``expiring``: (what is left of it, how many times it
    rolled over already) each, in the order they roll; ``staying``: the credit that does not
    expire there; ``incoming``: the next period's included credits; ``ending``: the
    subscription ends there (nothing rolls)."""
    out: list[int] = []
    total = 0
    for remaining, times in expiring:
        rolled = 0
        if rollover is not None and not ending and times < rollover.max_count:
            rolled = remaining * rollover.max_percent // 100
            if rollover.max_nano is not None:
                rolled = min(rolled, rollover.max_nano - total)
            if rollover.balance_cap_nano is not None:
                rolled = min(rolled, rollover.balance_cap_nano - staying - incoming - total)
            rolled = max(rolled, 0)
        total += rolled
        out.append(rolled)
    return out


def prorated(amount_nano: int, left_ms: int, length_ms: int) -> int:
    """The share of a period's amount for the time left of it, rounded up (in the seller's
    favour by under a nano)."""
    return -((-amount_nano * left_ms) // length_ms)


def overage_floor(policy: CreditPolicy | None, billed_nano: int, charged_nano: int) -> int:
    """How far below zero a credit period's balance may go on a plan's own terms, after
    ``billed_nano`` of its overage was billed early for ``charged_nano`` of money (the balance
    came back to zero then): the overage limit less what was billed, or, when what was billed
    was priced otherwise (before a plan change), what the spend limit leaves of the period's
    money in units at these prices, the graduated tiers going on from what was billed."""
    if policy is None:
        return 0
    overage = policy.overage
    if overage is not None and overage.spend_limit_nano is not None and (billed_nano or charged_nano) \
            and charged_nano != overage.charge(billed_nano):
        return -overage.units_within(billed_nano, overage.spend_limit_nano - charged_nano)
    if overage is not None and overage.limit_nano is not None:
        return min(policy.floor_nano + billed_nano, 0)
    return policy.floor_nano


def is_downgrade(old: Plan, new: Plan) -> bool:
    """A lower fee, or the same fee and fewer included credits of some type (and more of none).
    Anything else (an upgrade, or a plan as dear, such as turning usage-based pricing on)
    applies at once."""
    old_fee, new_fee = sum(old.fees_nano.values()), sum(new.fees_nano.values())
    if new_fee != old_fee:
        return new_fee < old_fee

    def included(plan: Plan, ct: int) -> int:
        return plan.credits[ct].included_nano if ct in plan.credits else 0
    cts = set(old.credits) | set(new.credits)
    return any(included(new, ct) < included(old, ct) for ct in cts) and \
        not any(included(new, ct) > included(old, ct) for ct in cts)


@dataclass(frozen=True)
class CreditPolicy:
    included_nano: int
    rollover: Rollover | None
    overage: Overage | None
    arrears: bool               # no balance check: bill in arrears
    fallback: str               # degraded mode when empty ("" to deny)
    priority_step_nano: int     # degraded usage per step down of the priority hint
    low_balance_nano: int | None  # ask for an automatic top-up below this
    topup_target_nano: int | None
    expiry_days: int | None = None  # included credits: None expire at the period's end, 0 never, N after N days

    @property
    def floor_nano(self) -> int:
        if self.arrears:
            return ARREARS_FLOOR_NANO
        if self.overage is not None:
            return ARREARS_FLOOR_NANO if self.overage.limit_nano is None else -self.overage.limit_nano
        return 0

    @property
    def alert_nano(self) -> int | None:
        if self.low_balance_nano is not None:
            return self.low_balance_nano
        if self.overage is not None and self.overage.bill_threshold_nano is not None:
            return -self.overage.bill_threshold_nano + 1  # fires once the threshold is reached
        return None


@dataclass(frozen=True)
class Plan:
    name: str
    index: int                  # in the core's plan table (0 is "no plan")
    period: str
    fees_nano: dict[int, int]
    credits: dict[int, CreditPolicy]
    trial_nano: dict[int, int] = field(default_factory=dict)
    trial_days: int = 0
    free_units: dict[str, Fraction] = field(default_factory=dict)  # meter name -> free units a period
    credit_period: str = ""     # credits reset this often within the billing period ("": with it)

    @property
    def cycle(self) -> str:
        """The period of the plan's credits: included credits, rollover, forfeits, overage
        at cycle end, usage, free units and the fallback's priority hint."""
        return self.credit_period or self.period


# ---- period arithmetic -----------------------------------------------------------------


def _add_months(anchor_ms: int, months: int) -> int:
    d = dt.datetime.fromtimestamp(anchor_ms / 1000, dt.timezone.utc)
    y, m = divmod(d.month - 1 + months, 12)
    year, month = d.year + y, m + 1
    day = min(d.day, calendar.monthrange(year, month)[1])
    moved = d.replace(year=year, month=month, day=day)
    return int(moved.timestamp() * 1000)


def period_start(anchor_ms: int, period: str, n: int) -> int:
    """Start (ms) of the n-th period of a subscription anchored at ``anchor_ms``.

    Monthly and yearly periods fall on the anniversary, clamped to the end of
    shorter months (an anchor on the 31st renews on the 30th or the 28th), and
    are always computed from the anchor so that clamping never drifts.
    """
    if period == "day":
        return anchor_ms + n * DAY_MS
    if period == "week":
        return anchor_ms + n * 7 * DAY_MS
    if period == "month":
        return _add_months(anchor_ms, n)
    return _add_months(anchor_ms, 12 * n)


def period_index(anchor_ms: int, period: str, now: int) -> int:
    """The index of the period (counted from ``anchor_ms``) that ``now`` falls in: at once for
    days and weeks, from a lower bound on the months for months and years."""
    if now < anchor_ms:
        return 0
    if period in ("day", "week"):
        return (now - anchor_ms) // (DAY_MS * (7 if period == "week" else 1))
    months = (now - anchor_ms) // (31 * DAY_MS)  # no month is longer: a lower bound
    n = months // 12 if period == "year" else months
    while period_start(anchor_ms, period, n + 1) <= now:
        n += 1
    return n


# ---- parsing -------------------------------------------------------------------------


def _err(source: str, key: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {key}: {message}")


def _int(spec: dict, key: str, where: str, source: str, default: int, lo: int, hi: int) -> int:
    value = spec.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _err(source, f"{where}.{key}", f"must be an integer from {lo} to {hi}")
    return value


def parse_plans(doc: dict, credit_index: dict[str, int], modes: list[str], source: str,
                amount: Any, check_keys: Any) -> list[Plan]:
    """The ``plans`` tables. ``amount(value, key)`` parses an exact amount into
    nano-units; ``modes`` collects fallback mode names in order of appearance."""
    plans: list[Plan] = []
    table = doc.get("plans", {})
    if not isinstance(table, dict):
        raise _err(source, "plans", "must be a table")
    for name, spec in table.items():
        where = f"plans.{name}"
        if not isinstance(spec, dict):
            raise _err(source, where, "must be a table")
        check_keys(spec, {"period", "credit_period", "fee", "credits", "trial", "free"}, source, where)
        period = spec.get("period", "month")
        if period not in PERIODS:
            raise _err(source, f"{where}.period", f"must be one of {', '.join(PERIODS)}")
        credit_period = spec.get("credit_period", period)
        if credit_period != period and credit_period not in CREDIT_PERIODS[period]:
            within = CREDIT_PERIODS[period]
            raise _err(source, f"{where}.credit_period", f"must be {period!r} (the billing period)" +
                       (f" or one whose boundaries fall on its: {', '.join(within)}" if within else ""))
        fees = {}
        for ct, value in _sub(spec, "fee", where, source).items():
            fees[_ct(ct, credit_index, f"{where}.fee.{ct}", source)] = amount(value, f"{where}.fee.{ct}")
        credits = {}
        for ct, cspec in _sub(spec, "credits", where, source).items():
            k = f"{where}.credits.{ct}"
            credits[_ct(ct, credit_index, k, source)] = _credit_policy(cspec, k, credit_index, modes, source,
                                                                       amount, check_keys)
        trial = _sub(spec, "trial", where, source)
        check_keys(trial, {"credits", "days"}, source, f"{where}.trial")
        trial_nano = {}
        for ct, value in _sub(trial, "credits", f"{where}.trial", source).items():
            k = f"{where}.trial.credits.{ct}"
            trial_nano[_ct(ct, credit_index, k, source)] = amount(value, k)
        days = _int(trial, "days", f"{where}.trial", source, 0, 0, 3650)
        if trial_nano and not days:
            raise _err(source, f"{where}.trial.days", "trial credits need a number of days")
        free = {}
        for meter, value in _sub(spec, "free", where, source).items():
            free[meter] = Fraction(amount(value, f"{where}.free.{meter}"), 10**9)
        plans.append(Plan(name, len(plans) + 1, period, fees, credits, trial_nano, days, free,
                          "" if credit_period == period else credit_period))
    return plans


def _sub(spec: dict, key: str, where: str, source: str) -> dict:
    value = spec.get(key, {})
    if not isinstance(value, dict):
        raise _err(source, f"{where}.{key}", "must be a table")
    return value


def _ct(name: str, credit_index: dict[str, int], key: str, source: str) -> int:
    if name not in credit_index:
        raise _err(source, key, f"unknown credit type (known: {', '.join(sorted(credit_index))})")
    return credit_index[name]


def _credit_policy(spec: Any, where: str, credit_index: dict[str, int], modes: list[str], source: str,
                   amount: Any, check_keys: Any) -> CreditPolicy:
    if not isinstance(spec, dict):
        raise _err(source, where, "must be a table")
    check_keys(spec, {"included", "rollover", "overage", "arrears", "fallback", "priority_step",
                      "low_balance", "topup_target", "expiry"}, source, where)
    included = amount(spec.get("included", "0"), f"{where}.included")
    rollover = None
    if "rollover" in spec:
        r = _sub(spec, "rollover", where, source)
        k = f"{where}.rollover"
        check_keys(r, {"max_percent", "max_count", "lifetime_periods", "max", "balance_cap"}, source, k)
        rollover = Rollover(
            _int(r, "max_percent", k, source, 100, 0, 100), _int(r, "max_count", k, source, 1, 0, 1000),
            _int(r, "lifetime_periods", k, source, 1, 0, 1000),
            amount(r["max"], f"{k}.max") if "max" in r else None,
            amount(r["balance_cap"], f"{k}.balance_cap") if "balance_cap" in r else None)
    overage = _overage(spec, where, credit_index, source, amount, check_keys) if "overage" in spec else None
    arrears = spec.get("arrears", False)
    if not isinstance(arrears, bool):
        raise _err(source, f"{where}.arrears", "must be true or false")
    if arrears and overage is not None:
        raise _err(source, f"{where}.arrears", "a credit billed in arrears has no overage")
    fallback = spec.get("fallback", "")
    # The core keeps mode names as bytes: count the bytes, not the characters.
    if not isinstance(fallback, str) or (fallback and not fallback.replace("_", "").isalnum()) or \
            len(fallback.encode()) > 32:
        raise _err(source, f"{where}.fallback", "must be a mode name of letters, digits and _ (at most 32 bytes "
                   f"in UTF-8), got {fallback!r}")
    if fallback and fallback not in modes:
        modes.append(fallback)
    step = amount(spec.get("priority_step", "0"), f"{where}.priority_step")
    low = amount(spec["low_balance"], f"{where}.low_balance") if "low_balance" in spec else None
    target = amount(spec["topup_target"], f"{where}.topup_target") if "topup_target" in spec else None
    if (low is None) != (target is None) or (low is not None and target is not None and target <= low):
        raise _err(source, f"{where}.topup_target", "low_balance and a larger topup_target go together")
    if low is not None and overage is not None and overage.bill_threshold_nano is not None:
        raise _err(source, f"{where}.low_balance", "cannot be combined with an overage bill_threshold")
    expiry = spec.get("expiry", "period")
    if expiry == "period":
        expiry_days = None
    elif expiry == "never":
        expiry_days = 0
    elif isinstance(expiry, int) and not isinstance(expiry, bool) and 1 <= expiry <= 36_500:
        expiry_days = expiry
    else:
        raise _err(source, f"{where}.expiry", 'must be "period", "never" or a number of days from 1 to 36500')
    if expiry_days is not None and rollover is not None:
        raise _err(source, f"{where}.rollover", "rollover applies to credits that expire with the period")
    return CreditPolicy(included, rollover, overage, arrears, fallback, step, low, target, expiry_days)


def _overage(spec: dict, where: str, credit_index: dict[str, int], source: str, amount: Any,
             check_keys: Any) -> Overage:
    o = _sub(spec, "overage", where, source)
    k = f"{where}.overage"
    check_keys(o, {"limit", "spend_limit", "price", "price_in", "per", "tiers", "at_cycle_end", "bill_threshold"},
               source, k)
    money = _ct(o.get("price_in", ""), credit_index, f"{k}.price_in", source)
    per = _int(o, "per", k, source, 1, 1, 10**9)
    tiers: list[Tier] = []
    if "tiers" in o:
        if "price" in o:
            raise _err(source, f"{k}.price", "give a price or tiers, not both")
        if not isinstance(o["tiers"], list) or not o["tiers"]:
            raise _err(source, f"{k}.tiers", "must be a non-empty list of { up_to, price }")
        last = 0
        for i, t in enumerate(o["tiers"]):
            tk = f"{k}.tiers[{i}]"
            if not isinstance(t, dict):
                raise _err(source, tk, "must be a table { up_to, price }")
            check_keys(t, {"up_to", "price"}, source, tk)
            up_to = amount(t["up_to"], f"{tk}.up_to") if "up_to" in t else None
            if up_to is not None and up_to <= last:
                raise _err(source, f"{tk}.up_to", "tiers must grow")
            if up_to is None and i != len(o["tiers"]) - 1:
                raise _err(source, f"{tk}.up_to", "only the last tier may be open-ended")
            if up_to is not None and i == len(o["tiers"]) - 1:
                raise _err(source, f"{tk}.up_to", "the last tier must be open-ended (no up_to)")
            tiers.append(Tier(up_to, Fraction(amount(t.get("price"), f"{tk}.price"), per * 10**9)))
            last = up_to or last
    else:
        tiers.append(Tier(None, Fraction(amount(o.get("price"), f"{k}.price"), per * 10**9)))
    limit = amount(o["limit"], f"{k}.limit") if "limit" in o else None
    if "spend_limit" in o:
        if limit is not None:
            raise _err(source, f"{k}.spend_limit", "give a limit in credits or a spend_limit, not both")
        limit = _units_for_spend(tiers, amount(o["spend_limit"], f"{k}.spend_limit"))
    at_end = o.get("at_cycle_end", "bill")
    if at_end not in AT_CYCLE_END:
        raise _err(source, f"{k}.at_cycle_end", f"must be one of {', '.join(AT_CYCLE_END)}")
    threshold = o.get("bill_threshold")
    threshold_units = None
    if threshold is not None:
        threshold_units = _units_for_spend(tiers, amount(threshold, f"{k}.bill_threshold"))
    spend = amount(o["spend_limit"], f"{k}.spend_limit") if "spend_limit" in o else None
    return Overage(limit, money, tuple(tiers), at_end, threshold_units, spend)


def _units_for_spend(tiers: list[Tier], money_nano: int) -> int:
    """The most credit nano-units whose graduated price stays within ``money_nano``."""
    start = 0
    left = Fraction(money_nano)
    for tier in tiers:
        if tier.price == 0:
            if tier.up_to_nano is None:
                return 1 << 62
            start = tier.up_to_nano
            continue
        span = None if tier.up_to_nano is None else tier.up_to_nano - start
        affordable = int(left / tier.price)
        if span is None or affordable < span:
            return start + affordable
        left -= span * tier.price
        start = tier.up_to_nano  # type: ignore[assignment]
    return start
