"""The log's records: each kind of change, encoded in one place and replayed in one.

A record is its kind (one byte), the time it was applied (u64 ms, big-endian:
its usage window on replay) and the kind's fields. This is the format on disk:
a kind's layout never changes; a new layout is a new kind. Replaying a record
through the core does exactly what applying the change did.
"""

from __future__ import annotations

import enum
import struct
from typing import Any

from meterd.store import from_u64, u64

INT64_MIN = -(1 << 63)  # an alert threshold of none
_ACCOUNT = struct.Struct("<Hq")        # credit type, amount: then the customer id
_SETTLE = struct.Struct("<Iqq")        # rate, quantity, reserved: then the customer id
_SETTLE_IN_SET = struct.Struct("<IqqI")  # rate, quantity, reserved, set length: then the set, the customer id
# rate, quantity, reserved, minimum, set length (NO_SET: the rate's): then the set, the customer id
_SETTLE_AT_LEAST = struct.Struct("<IqqqI")
NO_SET = 0xFFFFFFFF
_CHARGE = struct.Struct("<Iq")         # rate, quantity: then the customer id


class Kind(bytes, enum.Enum):
    BATCH = b"B"           # a ReportBatchRequest, as it came
    REPORT = b"R"          # a ReportRequest, as it came
    RESERVE = b"A"         # an amount held (a reservation, a session's next interval)
    RELEASE = b"L"         # a hold given back
    CREDIT = b"G"          # a signed credit: a grant, an adjustment, an expiry, a roll
    FLOOR = b"F"           # how far below zero the balance may go
    PLAN = b"S"            # the account's plan index
    ALERT = b"T"           # the low-balance or bill threshold (INT64_MIN: none)
    RESET_USAGE = b"U"     # the period's usage starts again
    SETTLE = b"C"          # a hold settled, the usage under the rate's own set
    SETTLE_IN_SET = b"M"   # a hold settled, the usage under its own dimension set
    SETTLE_AT_LEAST = b"N"  # a hold settled at a minimum charge, under its own set or the rate's
    FORCE_CHARGE = b"Q"    # a gauge charged on its period's value
    PERIOD = b"P"          # a calendar month ended: accounts without a plan reset their usage
    DISCOUNT = b"D"        # a customer's negotiated discount, in 1/DISCOUNT_SCALE of each charge


ACCOUNT_KINDS = frozenset({Kind.RESERVE, Kind.RELEASE, Kind.CREDIT, Kind.FLOOR, Kind.PLAN, Kind.ALERT,
                           Kind.RESET_USAGE, Kind.DISCOUNT})


def _head(kind: Kind, at_ms: int) -> bytes:
    return kind.value + u64(at_ms)


def message(kind: Kind, data: bytes, at_ms: int) -> bytes:
    """A BATCH or REPORT record: the request's bytes, as the core applied them."""
    if kind not in (Kind.BATCH, Kind.REPORT):
        raise ValueError(f"{kind!r} is not a request record")
    return _head(kind, at_ms) + data


def account(kind: Kind, customer: bytes, ct: int, value: int, at_ms: int) -> bytes:
    """A change of one account's credit type (or of the account: PLAN, RESET_USAGE)."""
    if kind not in ACCOUNT_KINDS:
        raise ValueError(f"{kind!r} is not an account record")
    return _head(kind, at_ms) + _ACCOUNT.pack(ct, value) + customer


def settle(customer: bytes, rate: int, quantity: int, reserved: int, dims: bytes | None, at_ms: int,
           minimum_nano: int = 0) -> bytes:
    """A settlement: under its own dimension set when it has one (``dims``), else the rate's;
    costing at least ``minimum_nano`` (records of the other kinds have none)."""
    if minimum_nano:
        n = NO_SET if dims is None else len(dims)
        return _head(Kind.SETTLE_AT_LEAST, at_ms) + _SETTLE_AT_LEAST.pack(rate, quantity, reserved, minimum_nano, n) \
            + (dims or b"") + customer
    if dims is None:
        return _head(Kind.SETTLE, at_ms) + _SETTLE.pack(rate, quantity, reserved) + customer
    return _head(Kind.SETTLE_IN_SET, at_ms) + _SETTLE_IN_SET.pack(rate, quantity, reserved, len(dims)) + dims \
        + customer


def force_charge(customer: bytes, rate: int, quantity: int, at_ms: int) -> bytes:
    return _head(Kind.FORCE_CHARGE, at_ms) + _CHARGE.pack(rate, quantity) + customer


def period(at_ms: int) -> bytes:
    return _head(Kind.PERIOD, at_ms)


def reset_unplanned(core: Any, loose: int = 0) -> None:
    """Calendar-month reset of usage for accounts without a plan (plans roll on their own periods);
    ``loose``: the catalog's loose plan (Catalog.loose_plan), an account on which has none either."""
    for idx in range(len(core)):
        plan = core.state(idx)[2]
        if plan == 0 or (loose and plan == loose):
            core.reset_usage(idx)


def replay(core: Any, record: bytes, loose: int = 0) -> None:
    """Apply one record to ``core``, at the time it was first applied (``loose``: reset_unplanned's)."""
    try:
        kind, body = Kind(record[:1]), record[9:]
    except ValueError:
        raise RuntimeError(f"unknown log record kind {record[:1]!r}") from None
    core.set_clock(from_u64(record[1:9]))
    if kind in (Kind.BATCH, Kind.REPORT):
        (core.apply_batch if kind == Kind.BATCH else core.report)(body)
    elif kind in ACCOUNT_KINDS:
        _replay_account(core, kind, body)
    elif kind == Kind.SETTLE:
        rate, qty, reserved = _SETTLE.unpack_from(body)
        core.settle(core.account(body[_SETTLE.size:]), rate, qty, reserved)
    elif kind == Kind.SETTLE_IN_SET:
        rate, qty, reserved, n = _SETTLE_IN_SET.unpack_from(body)
        start = _SETTLE_IN_SET.size
        core.settle(core.account(body[start + n:]), rate, qty, reserved, body[start:start + n])
    elif kind == Kind.SETTLE_AT_LEAST:
        rate, qty, reserved, minimum, n = _SETTLE_AT_LEAST.unpack_from(body)
        start = _SETTLE_AT_LEAST.size
        dims, customer = (None, body[start:]) if n == NO_SET else (body[start:start + n], body[start + n:])
        core.settle(core.account(customer), rate, qty, reserved, dims, minimum)
    elif kind == Kind.FORCE_CHARGE:
        rate, qty = _CHARGE.unpack_from(body)
        core.force_charge(core.account(body[_CHARGE.size:]), rate, qty)
    else:
        reset_unplanned(core, loose)


def _replay_account(core: Any, kind: Kind, body: bytes) -> None:
    ct, value = _ACCOUNT.unpack_from(body)
    idx = core.open_account(body[_ACCOUNT.size:])
    if kind == Kind.PLAN:
        core.set_plan(idx, value)
    elif kind == Kind.ALERT:
        core.set_alert(idx, ct, None if value == INT64_MIN else value)
    elif kind == Kind.RESET_USAGE:
        core.reset_usage(idx)
    elif kind == Kind.RESERVE:
        if not core.reserve(idx, ct, value):
            raise RuntimeError("log replay diverged: a reservation no longer fits")
    elif kind == Kind.RELEASE:
        core.release(idx, ct, value)
    elif kind == Kind.CREDIT:
        core.credit(idx, ct, value)
    elif kind == Kind.DISCOUNT:
        core.set_discount(idx, ct, value)
    else:
        core.set_floor(idx, ct, value)
