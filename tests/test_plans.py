"""Period arithmetic and plan options."""

from __future__ import annotations

import datetime as dt

import pytest
from billing import DAY_MS, NANO, START_MS, Billing

from meterd.plans import period_start


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
