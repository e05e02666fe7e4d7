"""Period arithmetic and plan options."""

from __future__ import annotations

import datetime as dt
from fractions import Fraction

import pytest
from billing import DAY_MS, NANO, START_MS, Billing
from hypothesis import given
from hypothesis import strategies as st

from meterd.plans import Overage, Rollover, Tier, period_start, prorated, rollover_split


def ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.timezone.utc).timestamp() * 1000)


def test_monthly_periods_keep_the_anniversary_and_clamp_short_months():
    anchor = ms(2026, 1, 31, 12, 30)
    starts = [period_start(anchor, "month", n) for n in range(5)]
    assert starts == [ms(2026, 1, 31, 12, 30), ms(2026, 2, 28, 12, 30), ms(2026, 3, 31, 12, 30),
                      ms(2026, 4, 30, 12, 30), ms(2026, 5, 31, 12, 30)]
    assert period_start(ms(2024, 2, 29), "year", 1) == ms(2025, 2, 28)
    assert period_start(ms(2024, 2, 29), "year", 4) == ms(2028, 2, 29)
    assert period_start(anchor, "week", 2) == anchor + 14 * DAY_MS
    assert period_start(anchor, "day", 3) == anchor + 3 * DAY_MS


CATALOG = """
[credit_types.credits]
kind = "custom"

[meters.calls]
credit_type = "credits"
price = "1"

[plans.daily]
period = "day"
[plans.daily.credits.credits]
included = "10"

[plans.keep]
period = "week"
[plans.keep.credits.credits]
included = "10"
expiry = "never"

[plans.thirty]
period = "day"
[plans.thirty.credits.credits]
included = "10"
expiry = 3
"""


@pytest.fixture
def b(tmp_path, monkeypatch):
    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG)
    billing = Billing(tmp_path, str(path), monkeypatch)
    yield billing
    billing.close()


def test_daily_periods_and_included_credit_expiry(b):
    b.subscribe("d", "daily", start_ms=START_MS)
    b.subscribe("k", "keep", start_ms=START_MS)
    b.subscribe("t", "thirty", start_ms=START_MS)
    b.advance(DAY_MS)
    b.tick()
    assert b.bal("d", "credits") == 10 * NANO   # the day's credits expire with the day
    assert b.bal("k", "credits") == 10 * NANO   # a week has not passed
    assert b.bal("t", "credits") == 20 * NANO   # three-day credits pile up until they expire
    b.advance(7 * DAY_MS)
    b.tick()
    assert b.bal("k", "credits") == 20 * NANO   # "never": they add up week after week
    assert b.bal("t", "credits") == 30 * NANO   # at most three days' worth alive at once
    b.check_conservation("t")


# ---- the arithmetic of a period's end, shared by every place that rolls one -------------------

ROLLOVERS = st.builds(Rollover, st.integers(0, 100), st.integers(0, 3), st.integers(0, 3),
                      st.one_of(st.none(), st.integers(0, 10**12)), st.one_of(st.none(), st.integers(0, 10**12)))


@given(ROLLOVERS, st.lists(st.tuples(st.integers(0, 10**12), st.integers(0, 4)), max_size=6),
       st.integers(0, 10**12), st.integers(0, 10**12), st.booleans())
def test_a_rollover_keeps_within_every_cap_and_never_more_than_is_left(r, expiring, staying, incoming, ending):
    split = rollover_split(r, expiring, staying, incoming, ending)
    assert len(split) == len(expiring)
    assert all(0 <= rolled <= remaining * r.max_percent // 100 for rolled, (remaining, _) in
               zip(split, expiring, strict=True))
    assert all(rolled == 0 for rolled, (_, times) in zip(split, expiring, strict=True) if times >= r.max_count)
    if ending:
        assert sum(split) == 0
    if r.max_nano is not None:
        assert sum(split) <= max(r.max_nano, 0)
    if r.balance_cap_nano is not None and sum(split):
        assert staying + incoming + sum(split) <= r.balance_cap_nano
    assert rollover_split(None, expiring, staying, incoming, ending) == [0] * len(expiring)


TIERS = (Tier(100 * NANO, Fraction(4, 100)), Tier(None, Fraction(3, 100)))


@given(st.integers(0, 300 * NANO), st.integers(0, 300 * NANO), st.integers(0, 300 * NANO))
def test_overage_bills_of_a_period_add_up_to_the_charge_of_its_whole_overage(a, b, c):
    o = Overage(None, 0, TIERS, "bill", None)
    money = [o.bill(0, a)[0], o.bill(a, b)[0], o.bill(a + b, c)[0]]
    assert sum(money) == o.charge(a + b + c) == -(-(min(a + b + c, 100 * NANO) * Fraction(4, 100) +
                                                   max(a + b + c - 100 * NANO, 0) * Fraction(3, 100)) // 1)
    assert sum(t[3] for t in o.bill(a, b)[1]) == money[1]


@given(st.integers(0, 10**15), st.integers(1, 10**10), st.data())
def test_a_proration_is_the_exact_share_rounded_up(amount, length, data):
    left = data.draw(st.integers(0, length))
    share = Fraction(amount * left, length)
    assert prorated(amount, left, length) == -(-share // 1)
    assert prorated(amount, length, length) == amount and prorated(amount, 0, length) == 0
