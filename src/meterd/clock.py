"""The clock every period, expiry and log record is stamped by.

One object, handed to each component that reads the time; tests of period
boundaries and expiries give the engine a ``ManualClock`` and move it.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import time


class Clock:
    """Wall-clock time in milliseconds since the epoch (UTC); and, for deadlines and
    waits, monotonic time and sleeping (a simulation replaces both)."""

    # The machine's clock (or one meant to agree with it): in ledger mode, checked against the
    # ledger's (lease_clock_skew_max_ms). Clocks that tests and test_clock move are not.
    wall = True

    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock(Clock):
    """A clock that moves only when told to."""

    wall = False

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def now_ms(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


class TestClock(Clock):
    """The wall clock moved ahead by an offset that only grows (``test_clock = true``):
    an operator advances it to watch period boundaries, rollovers and statements
    happen. The offset is kept in the data directory, so a restart keeps the time."""

    wall = False

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return super().now_ms() + self.offset_ms

    def advance(self, ms: int) -> None:
        if ms < 0:
            raise ValueError("a test clock does not go back")
        self.offset_ms += ms


def month_bounds(ms: int) -> tuple[int, int]:
    """Start and end (ms, UTC) of the calendar month holding ``ms``."""
    d = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    start = dt.datetime(d.year, d.month, 1, tzinfo=dt.timezone.utc)
    days = calendar.monthrange(d.year, d.month)[1]
    end = start + dt.timedelta(days=days)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)
