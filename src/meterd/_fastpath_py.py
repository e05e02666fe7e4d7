"""Pure-Python twin of ``_fastpath.pyx``: the same core, the same answers.

It exists so that meterd runs where the extension cannot be built
(``METERD_NO_EXTENSIONS=1``) and so that tests can compare both cores on the
same randomised inputs. Keep the two in step: both implement
``meterd.core.CoreAPI`` (mypy checks this one against it, and the stub of the
compiled one), and both take their codes, limits, messages and the priority
formula from ``meterd.corespec``.
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Mapping

from meterd import corespec as spec
from meterd.corespec import (
    AGG_COUNT,
    AGG_LATEST,
    AGG_MAX,
    AGG_SUM,
    AGG_UNIQUE,
    ALERTS_MAX,
    CONDITION_VALUES_MAX,
    CONDITIONS_MAX,
    DECISION_ALLOW,
    DECISION_DEGRADE,
    DECISION_DENY,
    DISCOUNT_SCALE,
    INT64_MAX,
    INT64_MIN,
    OUT_DEGRADED,
    REASON_INSUFFICIENT_BALANCE,
    REASON_NONE,
    REASON_OVERFLOW,
    REASON_UNKNOWN_CUSTOMER,
    ConditionRow,
    CreditState,
    MeterRow,
    RateRow,
    UsageAggregate,
    no_price_message,
    precision_message,
    relax_priority,
    sets_message,
    unique_order,
)
from meterd.errors import Forbidden, InvalidInput

I128_MAX = (1 << 127) - 1
U64 = (1 << 64) - 1
# How _debit treats the balance (as _fastpath_accounts.pxd).
DEBIT_CHECK, DEBIT_FORCE, DEBIT_DEGRADE = 0, 1, 2
STATE_DISCOUNTED = 1 << 32  # in a state record's plan word: a discount per credit type follows (_fastpath_state.pxd)


def _part_error(k: int, e: _DecodeError) -> _DecodeError:
    """An error about quantity ``k`` of an event, unless about the event's dimensions or time."""
    if e.field in ("dimensions", "timestamp_ms"):
        return e
    return _DecodeError(("quantities[%d]." % k + e.field).rstrip("."), e.message)


class _BatchFull(Exception):
    """An event's quantities do not fit in what is left of batch_events_max."""


class _DecodeError(Exception):
    """Internal: carries (field, message) up to the batch or report level."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _tag(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """A field's tag: as protobuf, at most 5 bytes and below 2**32."""
    tag, after = _varint(buf, pos, end)
    if tag >> 32 or after - pos > 5:
        raise _DecodeError("", spec.MSG_VARINT)
    return tag, after


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while pos < end:
        b = buf[pos]
        pos += 1
        if shift == 63 and b > 1:
            raise _DecodeError("", spec.MSG_VARINT)
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _DecodeError("", spec.MSG_VARINT)
    raise _DecodeError("", spec.MSG_TRUNCATED)


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    n, pos = _varint(buf, pos, end)
    if n > end - pos:
        raise _DecodeError("", spec.MSG_TRUNCATED)
    return pos, n, pos + n


def _skip(buf: bytes, pos: int, end: int, wt: int) -> int:
    if wt == 0:
        return _varint(buf, pos, end)[1]
    if wt == 1 or wt == 5:
        size = 8 if wt == 1 else 4
        if end - pos < size:
            raise _DecodeError("", spec.MSG_TRUNCATED)
        return pos + size
    if wt == 2:
        return _length(buf, pos, end)[2]
    raise _DecodeError("", spec.MSG_WIRE_TYPE)


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= (1 << 63) else v


def parse_decimal(text: bytes, precision: int, meter: bytes = b"") -> int:
    """Exact decimal b"123" or b"1.25" into an integer of 10**-precision units;
    ``meter`` names the meter in the error for too many decimals."""
    if not text:
        raise _DecodeError("", spec.MSG_DECIMAL)
    if text[:1] == b"-":
        raise _DecodeError("", spec.MSG_NEGATIVE)
    value = 0
    frac = -1
    digits = 0
    for c in text:
        if c == 0x2E:
            if frac >= 0:
                raise _DecodeError("", spec.MSG_DECIMAL)
            frac = 0
            continue
        if c < 0x30 or c > 0x39:
            raise _DecodeError("", spec.MSG_DECIMAL)
        if frac >= 0:
            frac += 1
            if frac > precision:
                raise _DecodeError("", precision_message(meter, precision))
        digits += 1
        value = value * 10 + (c - 0x30)
        if value > INT64_MAX:
            raise _DecodeError("", spec.MSG_OVERFLOW)
    if digits == 0 or frac == 0:
        raise _DecodeError("", spec.MSG_DECIMAL)
    frac = max(frac, 0)
    while frac < precision:
        value *= 10
        frac += 1
        if value > INT64_MAX:
            raise _DecodeError("", spec.MSG_OVERFLOW)
    return value


def _hash64(b: bytes) -> int:
    """FNV-1a, 64 bits, as the compiled core hashes ids and distinct values."""
    h = 14695981039346656037
    for c in b:
        h = ((h ^ c) * 1099511628211) & U64
    return h


def canonical_set(dims: dict[bytes, bytes]) -> bytes:
    """A dimension set as the cores keep it: its entries sorted by key, as UsageEvent field 5."""
    return b"".join(b"\x2a" + _put_varint(len(body)) + body
                    for body in (_dim_entry(k, v) for k, v in sorted(dims.items())))


def set_items(dims: bytes) -> dict[bytes, bytes]:
    """A canonical dimension set's entries: the inverse of canonical_set."""
    out = {}
    pos, end = 0, len(dims)
    while pos < end:
        _, pos = _tag(dims, pos, end)
        start, _, pos = _length(dims, pos, end)
        _, at = _tag(dims, start, pos)
        k_at, _, after = _length(dims, at, pos)
        _, at = _tag(dims, after, pos)
        v_at, _, at = _length(dims, at, pos)
        out[dims[k_at:after]] = dims[v_at:at]
    return out


def _checked_tiers(rate: int, steps: tuple, dearest: int) -> tuple:
    """A rate's tiers: up_to rising to INT64_MAX, none dearer than the rate's own price."""
    last = 0
    for k, (up_to, amount, factor) in enumerate(steps):
        if not (last < up_to <= INT64_MAX and 0 <= amount <= INT64_MAX and 1 <= factor <= INT64_MAX) \
                or (k == len(steps) - 1) != (up_to == INT64_MAX) or amount * factor > dearest:
            raise ValueError(spec.MSG_RATE_RANGE % rate)
        last = up_to
    return steps


def _round_up(quantity: int, increment: int) -> int | None:
    """A quantity rounded up to a multiple of ``increment``; None when past 64 bits."""
    rounded = -(-quantity // increment) * increment
    return None if rounded > INT64_MAX else rounded


def _dim_entry(key: bytes, value: bytes) -> bytes:
    """The body of one dimensions map entry, as protobuf encodes it."""
    return b"\x0a" + _put_varint(len(key)) + key + b"\x12" + _put_varint(len(value)) + value


def _utf8_ok(b: bytes) -> bool:
    """Strict UTF-8, as protobuf requires of strings."""
    try:
        b.decode()
    except UnicodeDecodeError:
        return False
    return True


def _id_charset_ok(b: bytes) -> bool:
    return all(0x21 <= c <= 0x7E for c in b)


def _has_string(buf: bytes, pos: int, end: int, field: int) -> bool:
    """Whether a (well-formed) message has a non-empty length-delimited ``field``
    (its last occurrence, which is what protobuf reads)."""
    last = 0
    try:
        while pos < end:
            tag, pos = _tag(buf, pos, end)
            if tag >> 3 == field and tag & 7 == 2:
                s, last, pos = _length(buf, pos, end)
            else:
                pos = _skip(buf, pos, end, tag & 7)
    except _DecodeError:
        return False
    return last > 0


def _put_varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _uint(tag: int, v: int) -> bytes:
    """A varint field as proto3 writes it: left out when zero."""
    return bytes([tag]) + _put_varint(v & U64) if v else b""


def _str(tag: int, b: bytes) -> bytes:
    return bytes([tag, len(b)]) + b if b else b""


def _message(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + _put_varint(len(body)) + body


def _denial(index: int, reason: int) -> bytes:
    return _message(0x1A, _uint(0x08, index) + _uint(0x10, reason))


def _degradation(index: int, mode: bytes, priority: int) -> bytes:
    return _message(0x3A, _uint(0x08, index) + _str(0x12, mode) + _uint(0x18, priority))


def _result(index: int, decision: int, reason: int, ct: bytes, cost: int, balance: int, mode: bytes,
            priority: int) -> bytes:
    return _message(0x42, _uint(0x08, index) + _uint(0x10, decision) + _uint(0x18, reason) + _str(0x22, ct)
                    + _uint(0x28, cost) + _uint(0x30, balance) + _str(0x3A, mode) + _uint(0x40, priority))


class _Tables:
    """The catalog's tables and the account table, the lowest layer of Core; see
    ``_fastpath_tables.pxi``."""

    # ---- construction ----------------------------------------------------

    def _init_tables(self, denominators: list[int], meters: list[MeterRow],
                     rates: list[RateRow], limits: dict[str, int],
                     plans: list[list[tuple[int, int]]] | None, modes: list[bytes] | None,
                     free: list[list[int]] | None, credit_names: list[bytes] | None) -> None:
        """The catalog's tables and an empty account table; see Core.__init__."""
        self.id_max = limits["customer_id_bytes_max"]
        if self.id_max > spec.CUSTOMER_ID_BYTES_LIMIT:
            raise ValueError(spec.MSG_ID_LIMIT)
        for d in denominators:
            if d <= 0 or d > spec.DENOMINATOR_MAX:
                raise ValueError(spec.MSG_DENOMINATOR)
        self.denom = list(denominators)
        self.n_ct = len(denominators)
        self._init_names(credit_names, modes)
        self._init_plans(plans, free, len(meters))
        self._init_meters(meters)
        self.pools = [-1] * len(meters)
        self._init_rates(rates)
        self.ids: list[bytes] = []
        self.index: dict[bytes, int] = {}
        self.bal: list[list[int]] = []
        self.resv: list[list[int]] = []
        self.floor: list[list[int]] = []
        self.rem: list[list[int]] = []
        self.usage: list[list[int]] = []
        self.degr: list[list[int]] = []
        self.alert: list[list[int]] = []
        self.disc: list[list[int]] = []  # a negotiated discount, in 1/DISCOUNT_SCALE
        self.plan_of: list[int] = []
        # Per account: the distinct values of this period, (meter, bytes), or (meter, hash)
        # for a value read from a snapshot of a version that kept only hashes; and how
        # many of those there are.
        self.uniq: list[set[tuple[int, bytes | int]]] = []
        self.uniq_hashed: list[int] = []
        self.dirty: list[bool] = []
        self.closed = False

    def _init_names(self, credit_names: list[bytes] | None, modes: list[bytes] | None) -> None:
        self.credit_names = [bytes(n) for n in (credit_names or [b""] * self.n_ct)]
        if len(self.credit_names) != self.n_ct or any(len(n) > spec.NAME_BYTES_MAX for n in self.credit_names):
            raise ValueError(spec.MSG_CREDIT_NAMES)
        self.modes = [bytes(m) for m in (modes or [])]
        if any(len(m) > spec.MODE_BYTES_MAX for m in self.modes):
            raise ValueError(spec.MSG_MODE_NAMES)

    def _init_plans(self, plans: list[list[tuple[int, int]]] | None, free: list[list[int]] | None,
                    n_meters: int) -> None:
        """Per plan (plan 0: none, which always denies): (fallback mode, priority step)
        per credit type, and free units per meter."""
        self.plans = [[(0, 0)] * self.n_ct] + list(plans or [])
        if len(self.plans) > spec.PLANS_MAX:
            raise ValueError(spec.MSG_PLANS)
        for i, plan in enumerate(self.plans):
            if len(plan) != self.n_ct:
                raise ValueError(spec.MSG_PLAN_ENTRIES % i)
            for mode, step in plan:
                if not (0 <= mode <= len(self.modes)) or step < 0:
                    raise ValueError(spec.MSG_PLAN_RANGE % i)
        self.free = [[0] * n_meters] + [list(f) for f in (free or [])]
        if len(self.free) > len(self.plans):
            raise ValueError(spec.MSG_FREE_PLANS)
        for i, f in enumerate(self.free):
            if len(f) != n_meters:
                raise ValueError(spec.MSG_FREE_METERS % i)
            if any(x < 0 for x in f):
                raise ValueError(spec.MSG_FREE_NEGATIVE)
        self.free += [[0] * n_meters for _ in range(len(self.plans) - len(self.free))]

    def set_pools(self, pools: list[int]) -> None:
        """Per meter, the credit type that holds its free units (-1: none); see set_pools in _fastpath_tables.pxi."""
        self._check()
        self.pools = spec.check_pools(pools, [m[1] for m in self.meters], self.aggs,
                                      [bool(self.tiers[r]) for r in range(len(self.rates))],
                                      [r[0] for r in self.rates], self.n_ct)

    def _init_meters(self, meters: list[MeterRow]) -> None:
        # per meter: [name, ct, precision, price dimensions, rates {(mask, values): idx}, default rate,
        # masks its rates have, largest first, the values an event without a price dimension is priced as,
        # increment, minimum, tier mode]
        self.meters: list[list[Any]] = []
        self.aggs: list[int] = []
        self.uniq_keys: list[bytes] = []
        for i, (name, ct, precision, dims, agg, uniq, defaults, increment, minimum, tier_mode) in enumerate(meters):
            if not (0 <= ct < self.n_ct and 0 <= precision <= spec.PRECISION_MAX and AGG_SUM <= agg <= AGG_UNIQUE
                    and 1 <= increment <= INT64_MAX and (increment == 1 or agg == AGG_SUM)
                    and 0 <= minimum <= spec.MINIMUM_NANO_MAX and (minimum == 0 or agg <= AGG_COUNT)
                    and (tier_mode == spec.TIER_GRADUATED or (tier_mode == spec.TIER_VOLUME and agg > AGG_COUNT))):
                raise ValueError(spec.MSG_METER_RANGE % i)
            if (agg == AGG_UNIQUE) != (len(uniq) > 0):
                raise ValueError(spec.MSG_METER_UNIQUE % i)
            dims = tuple(bytes(d) for d in dims)
            if len(dims) > spec.PRICE_DIMENSIONS_MAX or len(set(dims)) != len(dims) or len(defaults) != len(dims):
                raise ValueError(spec.MSG_METER_DIMS % (i, spec.PRICE_DIMENSIONS_MAX))
            self.meters.append([name, ct, precision, dims, {}, -1, [],
                                tuple(None if v is None else bytes(v) for v in defaults), increment, minimum,
                                tier_mode])
            self.aggs.append(agg)
            self.uniq_keys.append(uniq)
        self.meter_index = {m[0]: i for i, m in reversed(list(enumerate(self.meters)))}

    def _init_rates(self, rates: list[RateRow]) -> None:
        self.rates: list[tuple[int, int, int, int]] = []  # (meter, ct, amount_nano, factor)
        self.rate_keys: list[tuple[bytes | None, ...]] = []
        last_meter = -1
        seen = set()
        self.tiers: list[tuple[tuple[int, int, int], ...]] = []  # per rate: (up_to, amount_nano, factor)
        for i, (meter, key, amount, factor, steps) in enumerate(rates):
            if not (0 <= meter < len(self.meters)) or amount < 0 or factor < 1 or amount > INT64_MAX \
                    or factor > INT64_MAX:
                raise ValueError(spec.MSG_RATE_RANGE % i)
            self.tiers.append(_checked_tiers(i, tuple(tuple(t) for t in steps), amount * factor))
            m = self.meters[meter]
            if len(key) != len(m[3]):
                raise ValueError(spec.MSG_RATE_KEY % i)
            if meter != last_meter:
                if meter in seen:
                    raise ValueError(spec.MSG_RATES_GROUPED)
                seen.add(meter)
                last_meter = meter
            key = tuple(None if v is None else bytes(v) for v in key)
            self.rates.append((meter, m[1], amount, factor))
            self.rate_keys.append(key)
            mask = spec.rate_mask(key)
            m[4].setdefault((mask, tuple(v for v in key if v is not None)), i)  # of two with one key, the first
            if mask == 0 and m[5] < 0:
                m[5] = i
            if mask not in m[6]:
                m[6] = sorted(m[6] + [mask], reverse=True)

    def close(self) -> None:
        self.closed = True

    def _check(self) -> None:
        if self.closed:
            raise RuntimeError(spec.MSG_CLOSED)

    def _idx(self, idx: int) -> None:
        self._check()
        if idx < 0 or idx >= len(self.ids):
            raise IndexError(spec.MSG_NO_ACCOUNT % idx)

    def _ct(self, ct: int) -> None:
        if ct < 0 or ct >= self.n_ct:
            raise IndexError(spec.MSG_NO_CREDIT_TYPE % ct)

    # ---- account table ---------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    def account(self, customer_id: bytes) -> int:
        self._check()
        return self.index.get(customer_id, -1)

    def open_account(self, customer_id: bytes) -> int:
        self._check()
        n = len(customer_id)
        if n == 0 or n > self.id_max or not _id_charset_ok(customer_id):
            raise InvalidInput("customer_id", spec.MSG_CUSTOMER_ID % self.id_max)
        idx = self.index.get(customer_id)
        if idx is not None:
            return idx
        idx = len(self.ids)
        self.ids.append(bytes(customer_id))
        self.index[bytes(customer_id)] = idx
        self._add_rows()
        return idx

    def _add_rows(self) -> None:
        """A new account's row in each table of accounts, as the compiled core's
        _grow makes room for them; a layer with tables of its own per account adds
        its rows too (_Aggregates._add_rows)."""
        for table in (self.bal, self.resv, self.floor, self.rem, self.degr, self.disc):
            table.append([0] * self.n_ct)
        self.alert.append([INT64_MIN] * self.n_ct)
        self.plan_of.append(0)
        self.uniq.append(set())
        self.uniq_hashed.append(0)
        self.usage.append([0] * len(self.meters))
        self.dirty.append(True)

    def customer_id(self, idx: int) -> bytes:
        self._idx(idx)
        return self.ids[idx]


class _State(_Tables):
    """An account's state as a whole, the distinct values of unique_count meters
    and the state records of snapshots; see ``_fastpath_state.pxi``."""

    # ---- an account's state ----------------------------------------------

    def state(self, idx: int) -> tuple[list[CreditState], list[int], int]:
        self._idx(idx)
        cts = [(self.bal[idx][k], self.resv[idx][k], self.floor[idx][k], self.rem[idx][k], self.degr[idx][k],
                self.alert[idx][k]) for k in range(self.n_ct)]
        return cts, list(self.usage[idx]), self.plan_of[idx]

    def load_state(self, idx: int, cts: list[Any], use: list[int], plan: int = 0) -> None:
        self._idx(idx)
        if len(cts) != self.n_ct or len(use) != len(self.meters):
            raise ValueError(spec.MSG_STATE_SHAPE)
        if not 0 <= plan < len(self.plans):
            raise ValueError(spec.MSG_NO_PLAN % plan)
        for k, c in enumerate(cts):
            if not (0 <= c[3] < self.denom[k]) or c[1] < 0:
                raise ValueError(spec.MSG_STATE_RANGE)
        for k, (b, r, f, rm, dg, al) in enumerate(cts):
            self.bal[idx][k], self.resv[idx][k], self.floor[idx][k], self.rem[idx][k] = b, r, f, rm
            self.degr[idx][k], self.alert[idx][k] = dg, al
        self.usage[idx] = list(use)
        self.plan_of[idx] = plan
        self.dirty[idx] = False

    def take_dirty(self) -> list[int]:
        self._check()
        out = [i for i, d in enumerate(self.dirty) if d]
        self.dirty = [False] * len(self.ids)
        return out

    def mark_all_dirty(self) -> None:
        self._check()
        self.dirty = [True] * len(self.ids)

    # ---- snapshots -------------------------------------------------------

    def _fmt(self) -> str:
        return "<%dq" % (self.n_ct * 6 + len(self.meters) + 1)

    def state_bytes(self, idx: int) -> bytes:
        cts, use, plan = self.state(idx)
        uniq = self.uniques(idx)
        tail = [struct.pack("<ii", m, len(v)) + v if isinstance(v, bytes) else struct.pack("<iiQ", m, -1, v)
                for m, v in uniq]
        discounted = any(self.disc[idx])
        if discounted:
            tail.append(struct.pack("<%dq" % self.n_ct, *self.disc[idx]))
        return struct.pack(self._fmt(), *[w for c in cts for w in c], *use,
                           plan | (STATE_DISCOUNTED if discounted else 0)) + \
            struct.pack("<q", -len(uniq)) + b"".join(tail)

    def _state_uniques(self, data: bytes, size: int) -> list:
        wrong = ValueError(spec.MSG_STATE_SIZE)
        if len(data) < size + 8:
            raise wrong
        n = struct.unpack_from("<q", data, size)[0]
        if n >= 0:  # the format that kept only hashes
            if len(data) != size + 8 + 16 * n:
                raise wrong
            pairs = struct.unpack_from("<%dq" % (2 * n), data, size + 8)
            return [(pairs[2 * k], pairs[2 * k + 1] & U64) for k in range(n)]
        out: list[tuple[int, bytes | int]] = []
        pos = size + 8
        for _ in range(-n):
            if len(data) - pos < 8:
                raise wrong
            meter, length = struct.unpack_from("<ii", data, pos)
            pos += 8
            if length == -1 and len(data) - pos >= 8:
                out.append((meter, struct.unpack_from("<Q", data, pos)[0]))
                pos += 8
            elif 0 <= length <= len(data) - pos:
                out.append((meter, data[pos:pos + length]))
                pos += length
            else:
                raise wrong
        if pos != len(data):
            raise wrong
        return out

    def load_state_bytes(self, customer_id: bytes, data: bytes) -> int:
        """A state record as state_bytes writes it: words, distinct values, then (bit 32
        of the plan's word) a discount per credit type."""
        self._check()
        size = struct.calcsize(self._fmt())
        if len(data) < size:
            raise ValueError(spec.MSG_STATE_SIZE)
        w = struct.unpack(self._fmt(), data[:size])
        plan = w[-1] & ~STATE_DISCOUNTED
        trailer = 8 * self.n_ct if w[-1] & STATE_DISCOUNTED else 0
        uniq = self._state_uniques(data[:len(data) - trailer], size)
        disc = list(struct.unpack_from("<%dq" % self.n_ct, data, len(data) - trailer)) if trailer else \
            [0] * self.n_ct
        cts = [tuple(w[k * 6:k * 6 + 6]) for k in range(self.n_ct)]
        for k, c in enumerate(cts):
            if not (0 <= c[3] < self.denom[k]) or c[1] < 0:
                raise ValueError(spec.MSG_STATE_RANGE)
        if not 0 <= plan < len(self.plans):
            raise ValueError(spec.MSG_STATE_PLAN)
        for meter, _ in uniq:
            if not (0 <= meter < len(self.meters) and self.aggs[meter] == AGG_UNIQUE):
                raise ValueError(spec.MSG_STATE_UNIQUE)
        if not all(0 <= d <= DISCOUNT_SCALE for d in disc):
            raise ValueError(spec.MSG_STATE_RANGE)
        idx = self.open_account(customer_id)
        self.load_state(idx, cts, list(w[self.n_ct * 6:-1]), plan)
        self.disc[idx] = disc
        for meter, value in uniq:
            self.add_unique(idx, meter, value)
        return idx

    def load_states(self, records: Iterable[tuple[bytes, bytes]]) -> int:
        """``load_state_bytes`` for each (customer_id, data) pair of an iterable; returns how many."""
        n = 0
        for customer_id, data in records:
            self.load_state_bytes(customer_id, data)
            n += 1
        return n

    # ---- distinct values of unique_count meters --------------------------

    def uniques(self, idx: int) -> list[tuple[int, bytes | int]]:
        self._idx(idx)
        return sorted(self.uniq[idx], key=unique_order)

    def _seen(self, idx: int, meter: int, value: bytes | int) -> bool:
        """Whether a distinct value was counted this period: by its bytes, or by its
        hash against values known only by theirs (and the other way round)."""
        uniq = self.uniq[idx]
        if isinstance(value, int):
            return (meter, value) in uniq or any(m == meter and isinstance(v, bytes) and _hash64(v) == value
                                                 for m, v in uniq)
        return (meter, value) in uniq or (self.uniq_hashed[idx] > 0 and (meter, _hash64(value)) in uniq)

    def _add_seen(self, idx: int, meter: int, value: bytes | int) -> None:
        self.uniq[idx].add((meter, value))
        if isinstance(value, int):
            self.uniq_hashed[idx] += 1

    def add_unique(self, idx: int, meter: int, value: bytes | int) -> None:
        self._idx(idx)
        if not (0 <= meter < len(self.meters) and self.aggs[meter] == AGG_UNIQUE):
            raise ValueError(spec.MSG_NOT_UNIQUE % meter)
        if isinstance(value, int) and not 0 <= value <= U64:
            raise OverflowError("a distinct value's hash is 64 bits")
        if not self._seen(idx, meter, value):
            self._add_seen(idx, meter, value)


class _Accounts(_State):
    """Money, rating and debits, plans and alerts; see ``_fastpath_accounts.pxi``."""

    def _init_accounts(self, denominators: list[int], meters: list[MeterRow],
                       rates: list[RateRow], limits: dict[str, int],
                       plans: list[list[tuple[int, int]]] | None, modes: list[bytes] | None,
                       free: list[list[int]] | None, credit_names: list[bytes] | None) -> None:
        """The catalog's tables, an empty account table and no alerts yet; see Core.__init__."""
        self._init_tables(denominators, meters, rates, limits, plans, modes, free, credit_names)
        self.alerts: list[tuple[int, int]] = []
        self.alerts_lost = False

    # ---- money -----------------------------------------------------------

    def credit(self, idx: int, ct: int, amount: int) -> int:
        self._idx(idx)
        self._ct(ct)
        v = self.bal[idx][ct] + amount
        if v > INT64_MAX or v < -INT64_MAX:
            raise InvalidInput("amount_nano", spec.MSG_BALANCE_OVERFLOW)
        before = self.bal[idx][ct]
        self.bal[idx][ct] = v
        self.dirty[idx] = True
        self._check_alert(idx, ct, before)
        return v

    def set_floor(self, idx: int, ct: int, floor_nano: int) -> None:
        self._idx(idx)
        self._ct(ct)
        self.floor[idx][ct] = floor_nano
        self.dirty[idx] = True

    def set_discount(self, idx: int, ct: int, discount: int) -> None:
        self._idx(idx)
        self._ct(ct)
        if not 0 <= discount <= DISCOUNT_SCALE:
            raise ValueError(spec.MSG_DISCOUNT)
        ok = self.denom[ct] % DISCOUNT_SCALE == 0 and all(
            r[3] % DISCOUNT_SCALE == 0 and all(t[2] % DISCOUNT_SCALE == 0 for t in self.tiers[k])
            for k, r in enumerate(self.rates) if r[1] == ct)
        if discount and not ok:
            raise ValueError(spec.MSG_NOT_DISCOUNTABLE % ct)
        self.disc[idx][ct] = discount
        self.dirty[idx] = True

    def discount(self, idx: int, ct: int) -> int:
        self._idx(idx)
        self._ct(ct)
        return self.disc[idx][ct]

    def _available(self, idx: int, ct: int) -> int:
        return self.bal[idx][ct] - self.resv[idx][ct] - self.floor[idx][ct]

    def available(self, idx: int, ct: int) -> int:
        self._idx(idx)
        self._ct(ct)
        return min(max(self._available(idx, ct), -INT64_MAX), INT64_MAX)

    def reserve(self, idx: int, ct: int, amount: int) -> bool:
        self._idx(idx)
        self._ct(ct)
        if amount < 0:
            raise InvalidInput("amount", spec.MSG_NEGATIVE)
        if amount > self._available(idx, ct):
            return False
        if self.resv[idx][ct] + amount > INT64_MAX:
            raise InvalidInput("amount", spec.MSG_RESERVED_OVERFLOW)
        self.resv[idx][ct] += amount
        self.dirty[idx] = True
        return True

    def release(self, idx: int, ct: int, amount: int) -> None:
        self._idx(idx)
        self._ct(ct)
        if amount < 0 or amount > self.resv[idx][ct]:
            raise ValueError(spec.MSG_RELEASE_TOO_MUCH)
        self.resv[idx][ct] -= amount
        self.dirty[idx] = True

    # ---- rating ----------------------------------------------------------

    def _price_values(self, meter: int, dims: Mapping[bytes, bytes]) -> tuple[bytes | None, ...]:
        m = self.meters[meter]
        return tuple(m[7][k] if dims.get(d) is None else bytes(dims[d]) for k, d in enumerate(m[3]))

    def _find_rate(self, meter: int, values: tuple[bytes | None, ...]) -> int:
        """Of the rates that match, the one with the largest mask (corespec.rate_mask)."""
        m = self.meters[meter]
        n = len(values)
        present = spec.rate_mask(values)
        for mask in m[6]:
            if mask & ~present == 0:
                r = m[4].get((mask, tuple(v for i, v in enumerate(values) if (mask >> (n - 1 - i)) & 1)))
                if r is not None:
                    return r
        return -1

    def find_rate(self, meter: int, dims: Mapping[bytes, bytes]) -> int:
        self._check()
        if meter < 0 or meter >= len(self.meters):
            raise IndexError(spec.MSG_NO_METER % meter)
        return self._find_rate(meter, self._price_values(meter, dims))

    def _graduated(self, rate: int, start: int, end: int) -> int | None:
        """The cost of the units at places ``start`` to ``end`` of the period, each at its
        tier's price, in 1/D nano-units; None past 64 bits once divided by D."""
        total = low = 0
        for up_to, amount, factor in self.tiers[rate]:
            total += max(0, min(end, up_to) - max(start, low)) * amount * factor
            low = up_to
        return None if total // self.denom[self.rates[rate][1]] > INT64_MAX else total

    def _volume(self, rate: int, quantity: int, units: int) -> int | None:
        """The cost of ``units`` (those not free) all at the tier ``quantity`` falls in."""
        steps = self.tiers[rate]
        amount, factor = next(((a, f) for up_to, a, f in steps if quantity <= up_to), steps[-1][1:])
        fine = units * amount * factor
        return None if fine // self.denom[self.rates[rate][1]] > INT64_MAX else fine

    def _minimum(self, meter: int, quantity: int) -> int:
        """The least a decoded event costs: its meter's minimum, if anything happened."""
        return self.meters[meter][9] if quantity > 0 else 0

    def _fine(self, rate: int, quantity: int) -> int | None:
        _, ct, amount, factor = self.rates[rate]
        t = quantity * amount
        if t > I128_MAX or t < -I128_MAX - 1:
            return None
        fine = t * factor
        if fine > I128_MAX or fine < -I128_MAX - 1:
            return None
        if fine // self.denom[ct] > INT64_MAX:
            return None
        return fine

    def quote(self, rate: int, quantity: int) -> tuple[int, int]:
        self._check()
        if rate < 0 or rate >= len(self.rates):
            raise IndexError(spec.MSG_NO_RATE % rate)
        if quantity < 0:
            raise InvalidInput("quantity", spec.MSG_NEGATIVE)
        fine = self._fine(rate, quantity)
        if fine is None:
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
        ct = self.rates[rate][1]
        d = self.denom[ct]
        return ct, (fine + d - 1) // d

    def _debit(self, idx: int, rate: int, quantity: int, fine: int, minimum: int, how: int,
               uval: bytes = b"") -> tuple:
        """At least ``minimum`` nano unless the plan's free units cover it all; ``how``
        is DEBIT_CHECK, DEBIT_FORCE or DEBIT_DEGRADE (see _fastpath_accounts.pxd)."""
        meter, ct, _, _ = self.rates[rate]
        free_units = self.free[self.plan_of[idx]][meter]
        used = start = self.usage[idx][meter]
        tiered = bool(self.tiers[rate]) and self.aggs[meter] <= AGG_COUNT
        pool, pooled = self.pools[meter], 0
        if pool >= 0:  # the free units are a balance (ledger mode: leased), taken first
            pooled = min(quantity, max(self.bal[idx][pool], 0))
            if pooled < quantity and how == DEBIT_CHECK and self.plan_of[idx] == 0:
                return REASON_INSUFFICIENT_BALANCE, 0  # strict: the pool is to be topped up first
            if pooled:
                fine = self._fine(rate, quantity - pooled)  # type: ignore[assignment]
                if pooled == quantity:
                    minimum = 0  # free: no minimum
        elif free_units > used and (fine > 0 or minimum > 0 or tiered):
            left = free_units - used
            charged = quantity - left if quantity > left else 0
            start = used + quantity - charged
            if not tiered:
                fine = self._fine(rate, charged)  # type: ignore[assignment]
            if charged == 0:
                minimum = 0  # free: no minimum
        if tiered:
            graduated = None if used + quantity > INT64_MAX else self._graduated(rate, start, used + quantity)
            if graduated is None:
                return REASON_OVERFLOW, 0
            fine = graduated
        fine = max(fine, minimum * self.denom[ct])
        if self.disc[idx][ct]:  # exact (set_discount); none under a catalog of an older version's denominators
            fine = fine // DISCOUNT_SCALE * (DISCOUNT_SCALE - self.disc[idx][ct])
        total = fine + self.rem[idx][ct]
        d, rem = divmod(total, self.denom[ct])
        if d > INT64_MAX or self.bal[idx][ct] - d < -INT64_MAX:
            return REASON_OVERFLOW, 0
        agg = self.aggs[meter]
        old = self.usage[idx][meter]
        new_value = agg == AGG_UNIQUE and not self._seen(idx, meter, uval)
        if agg == AGG_UNIQUE:
            use = old + new_value
        else:
            use = old + quantity if agg in (AGG_SUM, AGG_COUNT) else max(old, quantity) if agg == AGG_MAX else quantity
        if use > INT64_MAX:
            return REASON_OVERFLOW, 0
        if how == DEBIT_DEGRADE or (how == DEBIT_CHECK and d > 0 and d > self._available(idx, ct)):
            if self.plans[self.plan_of[idx]][ct][0] == 0:
                return REASON_INSUFFICIENT_BALANCE, 0
            if self.degr[idx][ct] + d > INT64_MAX:
                return REASON_OVERFLOW, 0
            self.degr[idx][ct] += d
            self.usage[idx][meter] = use
            if pooled:
                self.bal[idx][pool] -= pooled
            if new_value:
                self._add_seen(idx, meter, uval)
            self.dirty[idx] = True
            return OUT_DEGRADED, 0
        before = self.bal[idx][ct]
        self.bal[idx][ct] -= d
        self.rem[idx][ct] = rem
        self.usage[idx][meter] = use
        if pooled:
            self.bal[idx][pool] -= pooled
        if new_value:
            self._add_seen(idx, meter, uval)
        self.dirty[idx] = True
        self._check_alert(idx, ct, before)
        return REASON_NONE, d

    def force_charge(self, idx: int, rate: int, quantity: int) -> int:
        self._idx(idx)
        if rate < 0 or rate >= len(self.rates) or quantity < 0:
            raise ValueError(spec.MSG_FORCE_CHARGE)
        meter, ct = self.rates[rate][:2]
        free_units = self.free[self.plan_of[idx]][meter]
        charged = quantity - free_units if quantity > free_units else 0  # the plan's free units first
        if not self.tiers[rate]:
            fine = self._fine(rate, charged)
        elif self.meters[meter][10] == spec.TIER_VOLUME:
            fine = self._volume(rate, quantity, charged)
        else:
            fine = self._graduated(rate, quantity - charged, quantity)
        if fine is None:
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
        if self.disc[idx][ct]:
            fine = fine // DISCOUNT_SCALE * (DISCOUNT_SCALE - self.disc[idx][ct])
        d, rem = divmod(fine + self.rem[idx][ct], self.denom[ct])
        if self.bal[idx][ct] - d < -INT64_MAX:
            raise InvalidInput("quantity", spec.MSG_BALANCE_OVERFLOW)
        before = self.bal[idx][ct]
        self.bal[idx][ct] -= d
        self.rem[idx][ct] = rem
        self.dirty[idx] = True
        self._check_alert(idx, ct, before)
        return d

    def reset_usage(self, idx: int = -1) -> None:
        self._check()
        if idx < 0:
            self.usage = [[0] * len(self.meters) for _ in self.ids]
            self.degr = [[0] * self.n_ct for _ in self.ids]
            self.uniq = [set() for _ in self.ids]
            self.uniq_hashed = [0] * len(self.ids)
            self.dirty = [True] * len(self.ids)
            return
        self._idx(idx)
        self.usage[idx] = [0] * len(self.meters)
        self.degr[idx] = [0] * self.n_ct
        self.uniq[idx] = set()
        self.uniq_hashed[idx] = 0
        self.dirty[idx] = True

    # ---- plans and alerts ------------------------------------------------

    def _priority(self, idx: int, ct: int) -> int:
        return relax_priority(self.degr[idx][ct], self.plans[self.plan_of[idx]][ct][1])

    def set_plan(self, idx: int, plan: int) -> None:
        self._idx(idx)
        if not 0 <= plan < len(self.plans):
            raise IndexError(spec.MSG_NO_PLAN % plan)
        self.plan_of[idx] = plan
        self.dirty[idx] = True

    def _check_alert(self, idx: int, ct: int, before: int) -> None:
        a = self.alert[idx][ct]
        if a != INT64_MIN and before >= a and self.bal[idx][ct] < a:
            if len(self.alerts) < ALERTS_MAX:
                self.alerts.append((idx, ct))
            else:
                self.alerts_lost = True

    def set_alert(self, idx: int, ct: int, threshold: int | None) -> None:
        self._idx(idx)
        self._ct(ct)
        self.alert[idx][ct] = INT64_MIN if threshold is None else threshold
        self.dirty[idx] = True

    def take_alerts(self) -> list[tuple[int, int]]:
        self._check()
        if self.alerts_lost:
            out = [(i, k) for i in range(len(self.ids)) for k in range(self.n_ct)
                   if self.alert[i][k] != INT64_MIN and self.bal[i][k] < self.alert[i][k]]
        else:
            out = list(self.alerts)
        self.alerts = []
        self.alerts_lost = False
        return out


class _Aggregates(_Accounts):
    """Usage aggregates for the ledger, dimension sets and settle; see
    ``_fastpath_aggregates.pxi``."""

    def _init_aggregates(self, meters: list[MeterRow],
                         rates: list[RateRow], limits: dict[str, int]) -> None:
        self.sets_max = limits["dimension_sets_per_window_max"]
        if self.sets_max < 1:
            raise ValueError(spec.MSG_SETS_LIMIT)
        self.sets_capped = True  # off while the log is replayed
        # Usage aggregates for the ledger: (acct, meter, canonical dimension set, window) ->
        # [quantity, cost, events]. The current window's outlive take_usage, emptied.
        self.agg: dict[tuple[int, int, bytes, int], list[int]] = {}
        self.n_live = 0
        self.nsets: list[list[int]] = []  # per account: [window, dimension sets made in it]
        self.window_ms = 60000
        self.cur_window = self.now_ms = 0
        self.late_ms = self.early_ms = INT64_MAX  # how far before and after the clock an event may be
        self.rate_dims: list[bytes] = []
        for meter, key, *_ in rates:
            named = {bytes(d): bytes(v) for d, v in zip(meters[meter][3], key, strict=True) if v is not None}
            self.rate_dims.append(canonical_set(named))

    def _add_rows(self) -> None:
        """The rows of the layers below, and this layer's: the dimension sets made in a window."""
        super()._add_rows()
        self.nsets.append([INT64_MIN, 0])

    # ---- usage aggregates for the ledger ---------------------------------

    def set_window(self, window_ms: int) -> None:
        if window_ms < 1:
            raise ValueError(spec.MSG_WINDOW)
        self.window_ms = window_ms

    def set_clock(self, now_ms: int) -> None:
        self.now_ms = now_ms
        self.cur_window = now_ms - now_ms % self.window_ms

    def set_event_times(self, late_ms: int, early_ms: int) -> None:
        if late_ms < 0 or early_ms < 0:
            raise ValueError(spec.MSG_EVENT_TIMES)
        self.late_ms, self.early_ms = late_ms, early_ms

    def set_dimension_sets_capped(self, capped: bool) -> None:
        self.sets_capped = bool(capped)

    def _agg_slot(self, idx: int, meter: int, dims: bytes, window: int, capped: bool,
                  made: list | None) -> tuple | None:
        """The key of an event's aggregate in ``window``, made (empty) if new, its key
        added to ``made``; None when ``capped`` and over dimension_sets_per_window_max
        (sets made in the current window, an earlier window's for a late event too)."""
        key = (idx, meter, dims, window)
        if key in self.agg:
            return key
        counted = True  # a unique_count meter's sets too: each distinct value is a set of its own
        sets = self.nsets[idx]
        if sets[0] != self.cur_window:
            sets[0], sets[1] = self.cur_window, 0
        if counted and capped and self.sets_capped and sets[1] >= self.sets_max:
            return None
        self.agg[key] = [0, 0, 0]
        sets[1] += counted
        if made is not None:
            made.append(key)
        return key

    def _agg_undo(self, made: list) -> None:
        for key in reversed(made):
            del self.agg[key]
            self.nsets[key[0]][1] -= 1

    def _agg_add(self, key: tuple, quantity: int, cost: int) -> None:
        a = self.agg[key]
        kind = self.aggs[key[1]]
        if kind in (AGG_SUM, AGG_COUNT):
            a[0] += quantity
        elif kind == AGG_MAX:
            a[0] = max(a[0], quantity)
        elif kind == AGG_LATEST:
            a[0] = quantity
        a[1] += cost
        if a[2] == 0:
            self.n_live += 1
        a[2] += 1

    def usage_pending(self) -> int:
        return self.n_live

    def take_usage(self) -> list[UsageAggregate]:
        self._check()
        out = [(self.ids[acct], meter, dims, window, q, c, n, self.bal[acct][self.meters[meter][1]])
               for (acct, meter, dims, window), (q, c, n) in self.agg.items() if n]
        self.agg = {key: [0, 0, 0] for key in self.agg if key[3] == self.cur_window}
        self.n_live = 0
        return out

    def set_allowed(self, idx: int, meter: int, dims: bytes) -> bool:
        self._idx(idx)
        if not 0 <= meter < len(self.aggs):
            raise IndexError(spec.MSG_NO_METER % meter)
        if (idx, meter, dims, self.cur_window) in self.agg:
            return True
        if not self.sets_capped:
            return True
        sets = self.nsets[idx]
        return sets[1] < self.sets_max if sets[0] == self.cur_window else self.sets_max > 0

    def settle(self, idx: int, rate: int, quantity: int, reserved: int,
               dims: bytes | None = None, minimum_nano: int = 0) -> tuple[int, int]:
        self._idx(idx)
        if rate < 0 or rate >= len(self.rates):
            raise IndexError(spec.MSG_NO_RATE % rate)
        if quantity < 0:
            raise InvalidInput("quantity", spec.MSG_NEGATIVE)
        ct = self.rates[rate][1]
        if self.aggs[self.rates[rate][0]] > AGG_COUNT:
            raise InvalidInput("meter", spec.MSG_SETTLE_GAUGE)
        if reserved < 0 or reserved > self.resv[idx][ct]:
            raise ValueError(spec.MSG_SETTLE_TOO_MUCH)
        if not 0 <= minimum_nano <= spec.MINIMUM_NANO_MAX:
            raise InvalidInput("minimum_nano", spec.MSG_MINIMUM)
        fine = self._fine(rate, quantity)
        if fine is None:
            raise InvalidInput("quantity", spec.MSG_COST_OVERFLOW)
        made: list = []
        key = self._agg_slot(idx, self.rates[rate][0], self.rate_dims[rate] if dims is None else dims,
                             self.cur_window, False, made)
        self.resv[idx][ct] -= reserved
        reason, cost = self._debit(idx, rate, quantity, fine, minimum_nano, DEBIT_FORCE)
        if reason != REASON_NONE:
            self.resv[idx][ct] += reserved
            self._agg_undo(made)
            raise InvalidInput("quantity", spec.MSG_SETTLE_OVERFLOW)
        self._agg_add(key, quantity, cost)  # type: ignore[arg-type]
        a = max(self._available(idx, ct), -INT64_MAX)
        return cost, (-a if a < 0 else 0)


class _Decoder(_Aggregates):
    """The wire decoder: UsageEvent, ReportBatchRequest and ReportRequest into
    rated events; see ``_fastpath_decode.pxi``."""

    def _init_decoder(self, limits: dict[str, int], conditions: list[ConditionRow] | None = None) -> None:
        self.client_id_max = limits["client_id_bytes_max"]
        self.batch_max = limits["batch_events_max"]
        self.dims_max = limits["dimensions_max"]
        self.dim_key_max = limits["dimension_key_bytes_max"]
        self.dim_value_max = limits["dimension_value_bytes_max"]
        if not (0 <= self.dims_max <= spec.DIMENSIONS_LIMIT and 1 <= self.dim_key_max <= spec.DIMENSION_KEY_BYTES_LIMIT
                and 0 <= self.dim_value_max <= spec.DIMENSION_VALUE_BYTES_LIMIT):
            raise ValueError(spec.MSG_DIMS_LIMITS)
        self.tenant: bytes | None = None  # while a call runs for a data-plane token: its customer id prefix
        self.conditions = [(bytes(key), meter, tuple(bounds), tuple(bytes(v) for v in values))
                           for key, meter, bounds, values in conditions or []]
        if len(self.conditions) > CONDITIONS_MAX or not all(
                0 < len(key) <= spec.DIMENSION_KEY_BYTES_LIMIT and 0 <= meter < len(self.meters)
                and 2 <= len(values) <= CONDITION_VALUES_MAX and len(bounds) == len(values) - 1
                and all(a < b for a, b in zip(bounds, bounds[1:], strict=False))
                and all(0 < len(v) <= spec.DIMENSION_VALUE_BYTES_LIMIT for v in values)
                for key, meter, bounds, values in self.conditions):
            raise ValueError(spec.MSG_CONDITIONS)

    def _tenant_call(self, tenant: bytes | None, fn: Any, *args: Any) -> Any:
        self.tenant = tenant
        try:
            return fn(*args)
        finally:
            self.tenant = None

    # ---- wire decoding ---------------------------------------------------

    def _decode_dim(self, buf: bytes, pos: int, end: int, dims: dict) -> None:
        """Validate one map entry into ``dims``; a later entry of a key replaces the
        earlier one. An entry with any field but its key and value (wire type 2)
        is left out: protobuf's parser moves it to the unknown fields."""
        key = value = b""
        other = False
        while pos < end:
            try:
                tag, pos = _tag(buf, pos, end)
                wt, fn = tag & 7, tag >> 3
                if fn == 0:
                    raise _DecodeError("", spec.MSG_FIELD0)
                if (fn == 1 or fn == 2) and wt == 2:
                    s, n, pos = _length(buf, pos, end)
                    if not _utf8_ok(buf[s:s + n]):
                        raise _DecodeError("", spec.MSG_UTF8)
                    if fn == 1:
                        key = buf[s:s + n]
                    else:
                        value = buf[s:s + n]
                    continue
                pos = _skip(buf, pos, end, wt)
                other = True
            except _DecodeError as e:
                raise _DecodeError("dimensions", e.message) from None
        if other:
            return
        if not key or len(key) > self.dim_key_max:
            raise _DecodeError("dimensions", spec.MSG_TOO_LONG if key else spec.MSG_EMPTY)
        if len(value) > self.dim_value_max:
            raise _DecodeError("dimensions", spec.MSG_TOO_LONG)
        if key not in dims and len(dims) >= self.dims_max:
            raise _DecodeError("dimensions", spec.MSG_TOO_MANY)
        dims[key] = value

    def _decode_event(self, buf: bytes, pos: int, end: int, room: int) -> list[tuple]:
        """Decode and rate one UsageEvent: per quantity (one, or its quantities, at
        most ``room``), (customer, meter, rate, quantity, fine, canonical dimension
        set, distinct value, window). Every quantity's meter and quantity come first,
        then the dimensions the conditions set from them, then the rates (as
        _event_one and _event_parts in _fastpath_decode.pxi)."""
        cust, mname, qkind, qty, dec, dims, ts, parts = self._event_fields(buf, pos, end)
        self._event_customer(cust)
        if not parts:
            meter, units = self._event_units(mname or b"", qkind, qty, dec)
            self._derive(dims, [(meter, units)])
            return [self._event_rated(cust, meter, units, dims, ts)]
        if mname is not None or qkind:
            raise _DecodeError("meter" if mname is not None else spec.EVENT_FIELDS[2 + qkind],
                               spec.MSG_BOTH_QUANTITIES)
        if len(parts) > room:
            raise _BatchFull()
        units_of = []
        for k, (s, n) in enumerate(parts):
            try:
                units_of.append(self._event_units(*self._part_fields(buf, s, s + n)))
            except _DecodeError as e:
                raise _part_error(k, e) from None
        self._derive(dims, units_of)
        out: list[tuple] = []
        for k, (meter, units) in enumerate(units_of):
            try:
                part = self._event_rated(cust, meter, units, dims, ts)
            except _DecodeError as e:
                raise _part_error(k, e) from None
            prefix = "quantities[%d]." % k
            rate = part[2]
            name = self.meters[meter][0]
            if self.aggs[meter] > AGG_COUNT:
                raise _DecodeError(prefix + "meter", spec.MSG_PART_GAUGE)
            first = self.rates[out[0][2]][1] if out else self.rates[rate][1]
            if self.rates[rate][1] != first:
                raise _DecodeError(prefix + "meter", spec.part_credit_message(
                    name, self.credit_names[self.rates[rate][1]], self.credit_names[first]))
            if any(p[1] == meter for p in out):
                raise _DecodeError(prefix + "meter", spec.part_twice_message(name))
            out.append(part)
        return out

    def _event_units(self, mname: bytes, qkind: int, qty: int, dec: bytes) -> tuple[int, int]:
        """The meter and the quantity (in its smallest units) of an event or of one of its quantities."""
        meter = self.meter_index.get(mname)
        if meter is None:
            raise _DecodeError("meter", spec.unknown_meter_message(mname))
        return meter, self._event_quantity(meter, qkind, qty, dec)

    def _derive(self, dims: dict[bytes, bytes], units_of: list[tuple[int, int]]) -> None:
        """The dimensions the catalog's conditions set from the event's quantities, among its
        dimensions; one whose meter the event has not is left unset. The request may not set one."""
        for key, meter, bounds, values in self.conditions:
            if key in dims:
                raise _DecodeError("dimensions", spec.condition_message(key, self.meters[meter][0]))
            for m, units in units_of:
                if m == meter:
                    dims[key] = values[spec.condition_value(bounds, units)]
                    break

    def _event_rated(self, cust: bytes, meter: int, qty: int, dims: dict[bytes, bytes], ts: int) -> tuple:
        """The rate and window of an event of one meter (or of one of its quantities)."""
        rate, qty, fine, found = self._event_rate(meter, qty, dims)
        return cust, meter, rate, qty, fine, canonical_set(dims), found, self._event_window(meter, ts)

    @staticmethod
    def _part_fields(buf: bytes, pos: int, end: int) -> tuple[bytes, int, int, bytes]:
        """A Quantity's field loop: (meter name, quantity kind, quantity, decimal)."""
        mname = dec = b""
        qkind = qty = 0
        field = ""
        try:
            while pos < end:
                field = ""
                tag, pos = _tag(buf, pos, end)
                wt, fn = tag & 7, tag >> 3
                if fn == 0:
                    raise _DecodeError("", spec.MSG_FIELD0)
                if fn in (1, 2, 3):
                    field = spec.QUANTITY_FIELDS[fn]
                    if wt != (0 if fn == 2 else 2):
                        raise _DecodeError("", spec.MSG_WIRE_TYPE)
                    if fn == 2:
                        v, pos = _varint(buf, pos, end)
                        qkind, qty = 1, _signed64(v)
                        continue
                    s, n, pos = _length(buf, pos, end)
                    if not _utf8_ok(buf[s:s + n]):
                        raise _DecodeError("", spec.MSG_UTF8)
                    if fn == 1:
                        mname = buf[s:s + n]
                    else:
                        qkind, dec = 2, buf[s:s + n]
                else:
                    pos = _skip(buf, pos, end, wt)
        except _DecodeError as e:
            raise _DecodeError(field, e.message) from None
        return mname, qkind, qty, dec

    def _event_window(self, meter: int, ts: int) -> int:
        """The usage window of an event's timestamp_ms, within the distances allowed from
        the clock, or the clock's when it has none (0)."""
        if ts == 0:
            return self.cur_window
        if (ts < self.now_ms and self.now_ms - ts > self.late_ms) or (ts > self.now_ms
                                                                      and ts - self.now_ms > self.early_ms):
            raise _DecodeError("timestamp_ms", spec.event_time_message(ts, self.now_ms, self.late_ms))
        window = ts - ts % self.window_ms
        if window < self.cur_window and self.aggs[meter] == AGG_LATEST:
            raise _DecodeError("timestamp_ms", spec.MSG_LATE_LATEST)
        if window < self.cur_window - self.window_ms and self.late_ms != INT64_MAX and \
                self.aggs[meter] in (AGG_MAX, AGG_UNIQUE):  # gauges count in the period served in (not a replay)
            raise _DecodeError("timestamp_ms", spec.MSG_LATE_GAUGE)
        return window

    def _event_fields(self, buf: bytes, pos: int, end: int) -> tuple[bytes, bytes | None, int, int, bytes,
                                                                      dict[bytes, bytes], int, list[tuple[int, int]]]:
        """The field loop: (customer, meter name (None: not given), quantity kind
        (0: none, 1: quantity, 2: quantity_decimal), quantity, decimal, dimensions,
        timestamp, the quantities' messages (start, length)). As protobuf, the last
        occurrence of a field wins and unknown fields are skipped."""
        cust = dec = b""
        mname: bytes | None = None
        qkind = qty = ts = 0
        dims: dict[bytes, bytes] = {}
        parts: list[tuple[int, int]] = []
        while pos < end:
            tag, pos = _tag(buf, pos, end)
            wt, fn = tag & 7, tag >> 3
            if fn == 0:
                raise _DecodeError("", spec.MSG_FIELD0)
            if fn in (1, 2, 4, 5, 7, 8):
                if wt != 2:
                    raise _DecodeError(spec.EVENT_FIELDS[fn], spec.MSG_WIRE_TYPE)
                s, n, pos = _length(buf, pos, end)
                if fn == 8:  # decoded once the dimensions are all known
                    if len(parts) >= spec.QUANTITIES_MAX:
                        raise _DecodeError("quantities", spec.MSG_PARTS)
                    parts.append((s, n))
                    continue
                if fn == 5:
                    self._decode_dim(buf, s, s + n, dims)
                    continue
                if not _utf8_ok(buf[s:s + n]):
                    raise _DecodeError(spec.EVENT_FIELDS[fn], spec.MSG_UTF8)  # each occurrence, as protobuf checks
                if fn == 1:
                    cust = buf[s:s + n]
                elif fn == 2:
                    mname = buf[s:s + n]
                elif fn == 4:
                    qkind = 2
                    dec = buf[s:s + n]
            elif fn in (3, 6):
                if wt != 0:
                    raise _DecodeError(spec.EVENT_FIELDS[fn], spec.MSG_WIRE_TYPE)
                try:
                    v, pos = _varint(buf, pos, end)
                except _DecodeError as e:
                    raise _DecodeError(spec.EVENT_FIELDS[fn], e.message) from None
                if fn == 3:
                    qkind = 1
                    qty = _signed64(v)
                elif _signed64(v) < 0:
                    raise _DecodeError("timestamp_ms", spec.MSG_NEGATIVE)
                else:
                    ts = v
            else:
                pos = _skip(buf, pos, end, wt)
        return cust, mname, qkind, qty, dec, dims, ts, parts

    def _event_customer(self, cust: bytes) -> None:
        """The customer id: present, short enough, printable, and the token's."""
        if not cust:
            raise _DecodeError("customer_id", spec.MSG_EMPTY)
        if len(cust) > self.id_max:
            raise _DecodeError("customer_id", spec.MSG_ID_TOO_LONG % self.id_max)
        if not _id_charset_ok(cust):
            raise _DecodeError("customer_id", spec.MSG_CHARSET)
        if self.tenant is not None and not cust.startswith(self.tenant):
            raise _DecodeError("customer_id", spec.MSG_TENANT)

    def _event_quantity(self, meter: int, qkind: int, qty: int, dec: bytes) -> int:
        """The quantity in the meter's smallest units, from either of its fields."""
        name, _, precision = self.meters[meter][:3]
        if qkind == 2:
            try:
                return parse_decimal(dec, precision, name)
            except _DecodeError as e:
                raise _DecodeError("quantity_decimal", e.message) from None
        if qty < 0:
            raise _DecodeError("quantity", spec.MSG_NEGATIVE)
        for _ in range(precision):
            if qty > INT64_MAX // 10:
                raise _DecodeError("quantity", spec.MSG_OVERFLOW)
            qty *= 10
        return qty

    def _event_rate(self, meter: int, qty: int, dims: dict[bytes, bytes]) -> tuple[int, int, int, bytes]:
        """(rate, quantity, cost in 1/D nano, distinct value of a unique_count meter)."""
        name, _, _, keys = self.meters[meter][:4]
        values = self._price_values(meter, dims)
        rate = self._find_rate(meter, values)
        if rate < 0:
            k = spec.no_price_position([self.rate_keys[r] for r in self.meters[meter][4].values()], values)
            raise _DecodeError("dimensions", no_price_message(name, keys[k] if keys else b"",
                                                              values[k] if keys else None))
        agg = self.aggs[meter]
        if agg == AGG_COUNT:
            qty = 1  # a count meter counts events; its price is per event
        rounded = _round_up(qty, self.meters[meter][8])  # billed in whole increments
        if rounded is None:
            raise _DecodeError("quantity", spec.MSG_OVERFLOW)
        qty = rounded
        found = b""
        if agg == AGG_UNIQUE:
            uniq_key = self.uniq_keys[meter]
            if uniq_key not in dims:
                raise _DecodeError("dimensions", spec.no_unique_message(uniq_key))
            found = dims[uniq_key]
            qty = 0  # a unique_count meter has no quantity of its own
        if agg in (AGG_MAX, AGG_LATEST, AGG_UNIQUE):
            fine: int | None = 0  # gauges are charged on their period's value, at the period's end
        else:
            fine = self._fine(rate, qty)
        if fine is None:
            raise _DecodeError("quantity", spec.MSG_OVERFLOW)
        return rate, qty, fine, found

    def _event(self, buf: bytes, pos: int, end: int, prefix: str, room: int = spec.QUANTITIES_MAX) -> list[tuple]:
        try:
            return self._decode_event(buf, pos, end, room)
        except _DecodeError as e:
            field = prefix + e.field if e.field else (prefix.rstrip(".") or "event")
            if e.message == spec.MSG_TENANT:
                raise Forbidden(field, e.message) from None
            raise InvalidInput(field, e.message) from None

    def _decode_batch(self, buf: bytes) -> tuple:
        pos, end = 0, len(buf)
        cid = b""
        seq = 0
        details = 0
        events: list[list[tuple]] = []
        entries = 0  # events and the quantities of events of several, as batch_events_max counts them
        while pos < end:
            try:
                tag, pos = _tag(buf, pos, end)
            except _DecodeError as e:
                raise InvalidInput("batch", e.message) from None
            wt, fn = tag & 7, tag >> 3
            if fn == 0:
                raise InvalidInput("batch", spec.MSG_FIELD0)
            if fn == 1 or fn == 3:
                name = "client_id" if fn == 1 else "events"
                if wt != 2:
                    raise InvalidInput(name, spec.MSG_WIRE_TYPE)
                try:
                    s, n, pos = _length(buf, pos, end)
                except _DecodeError as e:
                    raise InvalidInput(name, e.message) from None
                if fn == 1:
                    if not _utf8_ok(buf[s:s + n]):
                        raise InvalidInput("client_id", spec.MSG_UTF8)
                    cid = buf[s:s + n]
                    continue
                try:
                    if entries >= self.batch_max:
                        raise _BatchFull()
                    events.append(self._event(buf, s, s + n, "events[%d]." % len(events), self.batch_max - entries))
                except _BatchFull:
                    raise InvalidInput("events", spec.MSG_BATCH_TOO_LONG % self.batch_max) from None
                entries += len(events[-1])
            elif fn == 2 or fn == 4:
                name = "sequence" if fn == 2 else "details"
                if wt != 0:
                    raise InvalidInput(name, spec.MSG_WIRE_TYPE)
                try:
                    v, pos = _varint(buf, pos, end)
                except _DecodeError as e:
                    raise InvalidInput(name, e.message) from None
                if fn == 2:
                    seq = v
                else:
                    details = v
            else:
                try:
                    pos = _skip(buf, pos, end, wt)
                except _DecodeError as e:
                    raise InvalidInput("batch", e.message) from None
        if len(cid) > self.client_id_max or not _id_charset_ok(cid):
            raise InvalidInput("client_id", spec.MSG_CLIENT_ID % self.client_id_max)
        return cid, seq, events, details

    def batch_header(self, data: bytes) -> tuple[bytes, int]:
        self._check()
        pos, end = 0, len(data)
        cid = b""
        seq = 0
        while pos < end:
            try:
                tag, pos = _tag(data, pos, end)
            except _DecodeError as e:
                raise InvalidInput("batch", e.message) from None
            wt, fn = tag & 7, tag >> 3
            if fn == 0:
                raise InvalidInput("batch", spec.MSG_FIELD0)
            try:
                if fn == 1 and wt == 2:
                    s, n, pos = _length(data, pos, end)
                    cid = data[s:s + n]
                    if not _utf8_ok(cid):
                        raise _DecodeError("", spec.MSG_UTF8)
                elif fn == 2 and wt == 0:
                    seq, pos = _varint(data, pos, end)
                elif 1 <= fn <= 3 and not (fn == 3 and wt == 2):
                    raise _DecodeError("", spec.MSG_WIRE_TYPE)
                else:
                    pos = _skip(data, pos, end, wt)
            except _DecodeError as e:
                raise InvalidInput(spec.BATCH_FIELDS[fn] if 1 <= fn <= 3 else "batch", e.message) from None
        if len(cid) > self.client_id_max or not _id_charset_ok(cid):
            raise InvalidInput("client_id", spec.MSG_CLIENT_ID % self.client_id_max)
        return cid, seq


class Core(_Decoder):
    """Accounts, rates and the batch decoder; see ``_fastpath.pyx``. As the
    compiled core, a chain of classes, one per concern: _Tables, _State,
    _Accounts, _Aggregates, _Decoder and this one."""

    def __init__(self, denominators: list[int], meters: list[MeterRow],
                 rates: list[RateRow], limits: dict[str, int], capacity: int = 1024,
                 plans: list[list[tuple[int, int]]] | None = None, modes: list[bytes] | None = None,
                 free: list[list[int]] | None = None, credit_names: list[bytes] | None = None,
                 conditions: list[ConditionRow] | None = None) -> None:
        # As the compiled core: the tables, accounts and rating, then aggregates, then the decoder.
        self._init_accounts(denominators, meters, rates, limits, plans, modes, free, credit_names)
        self._init_aggregates(meters, rates, limits)
        self._init_decoder(limits, conditions)

    def apply_batch(self, data: bytes, tenant: bytes | None = None) -> tuple[int, int, int, bytes]:
        return self._tenant_call(tenant, self._apply_batch, data)  # type: ignore[no-any-return]

    def _apply_batch(self, data: bytes) -> tuple:
        self._check()
        _, _, events, details = self._decode_batch(data)
        accepted = denied = degraded = 0
        out = []
        # Every event's aggregates first, so that a batch over the cap on dimension
        # sets is refused whole, with nothing applied.
        made: list = []
        slots = []
        for i, parts in enumerate(events):
            idx = self.index.get(parts[0][0], -1)
            keys = self._place(idx, parts, made, "events[%d].dimensions" % i) if idx >= 0 else []
            slots.append((idx, keys))
        for i, parts in enumerate(events):
            idx, keys = slots[i]
            ct = self.rates[parts[0][2]][1]
            cost = mode = priority = 0
            if idx < 0:
                reason = REASON_UNKNOWN_CUSTOMER
            else:
                reason, cost = self._debit_event(idx, parts, keys)
            if reason == REASON_NONE:
                accepted += 1
            elif reason == OUT_DEGRADED:
                accepted += 1
                degraded += 1
                mode = self.plans[self.plan_of[idx]][ct][0]
                priority = self._priority(idx, ct)
                out.append(_degradation(i, self.modes[mode - 1], priority))
            else:
                denied += 1
                out.append(_denial(i, reason))
            if details:
                decision = DECISION_ALLOW if reason == REASON_NONE else \
                    DECISION_DEGRADE if reason == OUT_DEGRADED else DECISION_DENY
                out.append(_result(i, decision, 0 if reason == OUT_DEGRADED else reason, self.credit_names[ct], cost,
                                   self.bal[idx][ct] if idx >= 0 else 0, self.modes[mode - 1] if mode else b"",
                                   priority))
        return accepted, denied, degraded, b"".join(out)

    def _place(self, idx: int, parts: list[tuple], made: list, field: str) -> list[tuple]:
        """The aggregates of an event's quantities (made if new, added to ``made``); when
        over dimension_sets_per_window_max, all of ``made`` is undone and the call refused."""
        keys = []
        for cust, meter, _, _, _, dims, _, window in parts:
            key = self._agg_slot(idx, meter, dims, window, True, made)
            if key is None:
                self._agg_undo(made)
                raise InvalidInput(field, sets_message(cust, self.sets_max))
            keys.append(key)
        return keys

    def _debit_event(self, idx: int, parts: list[tuple], keys: list[tuple]) -> tuple[int, int]:
        """(reason, cost) of a placed event, added to its aggregates (see _debit)."""
        if len(parts) > 1:
            return self._debit_parts(idx, parts, keys)
        _, meter, rate, qty, fine, _, uval, _ = parts[0]
        reason, cost = self._debit(idx, rate, qty, fine, self._minimum(meter, qty), DEBIT_CHECK, uval)
        if reason == REASON_NONE or reason == OUT_DEGRADED:
            self._agg_add(keys[0], qty, cost)
        return reason, cost

    def _debit_parts(self, idx: int, parts: list[tuple], keys: list[tuple]) -> tuple[int, int]:
        """An event of several quantities, as a whole: each debited in turn, its remainder
        carried to the next; all charged when the balance covers them all, else the turns
        undone and the event served degraded in full (each counted, nothing charged) or
        denied (see _debit_parts in _fastpath.pyx)."""
        ct = self.rates[parts[0][2]][1]
        pools = [(p, self.bal[idx][p]) for p in {self.pools[part[1]] for part in parts} if p >= 0]
        saved = (self.bal[idx][ct], self.rem[idx][ct], self.degr[idx][ct],
                 [self.usage[idx][p[1]] for p in parts], list(self.alerts), self.alerts_lost, self.dirty[idx])
        how, ok = DEBIT_CHECK, REASON_NONE
        while True:
            costs: list[int] = []
            reason = ok
            for _, meter, rate, qty, fine, _, _, _ in parts:
                reason, cost = self._debit(idx, rate, qty, fine, self._minimum(meter, qty), how)
                if reason == ok and sum(costs) + cost > INT64_MAX:
                    reason = REASON_OVERFLOW  # each cost fits, and the balance (a floor far below 0): their sum not
                if reason != ok:
                    break
                costs.append(cost)
            if reason == ok:
                break
            self.bal[idx][ct], self.rem[idx][ct], self.degr[idx][ct], used, self.alerts, self.alerts_lost, \
                self.dirty[idx] = saved[0], saved[1], saved[2], saved[3], list(saved[4]), saved[5], saved[6]
            for p, u in zip(parts, used, strict=True):
                self.usage[idx][p[1]] = u
            for pool, b in pools:
                self.bal[idx][pool] = b
            if reason != OUT_DEGRADED:  # denied (in the second turn, only an overflow)
                return reason, 0
            how, ok = DEBIT_DEGRADE, OUT_DEGRADED  # a turn was degraded: all of it is
        for key, p, cost in zip(keys, parts, costs, strict=True):
            self._agg_add(key, p[3], cost)
        return reason, sum(costs)

    def report(self, data: bytes, tenant: bytes | None = None) -> tuple[int, int, int, int, int, bytes, int]:
        return self._tenant_call(tenant, self._report, data, False)  # type: ignore[no-any-return]

    def report_wire(self, data: bytes, tenant: bytes | None = None) -> tuple[int, bytes] | None:
        out = self._tenant_call(tenant, self._report, data, True)
        if out is None:
            return None
        decision, reason, ct, cost, balance, mode, priority = out
        return decision, (_uint(0x08, decision) + _uint(0x10, reason) + _str(0x1A, self.credit_names[ct])
                          + _uint(0x20, cost) + _uint(0x28, balance) + _str(0x3A, mode) + _uint(0x40, priority))

    def _report(self, data: bytes, keyless: bool) -> tuple | None:
        self._check()
        pos, end = 0, len(data)
        s = n = -1
        while pos < end:
            try:
                tag, pos = _tag(data, pos, end)
                wt, fn = tag & 7, tag >> 3
                if fn == 0:
                    raise _DecodeError("", spec.MSG_FIELD0)
                if fn == 1:
                    if wt != 2:
                        raise _DecodeError("", spec.MSG_WIRE_TYPE)
                    if n >= 0:  # protobuf would merge the two; no client splits a message so
                        raise _DecodeError("", spec.MSG_EVENT_TWICE)
                    s, n, pos = _length(data, pos, end)
                else:
                    pos = _skip(data, pos, end, wt)
            except _DecodeError as e:
                raise InvalidInput("event", e.message) from None
        if n < 0:
            raise InvalidInput("event", spec.MSG_REQUIRED)
        parts = self._event(data, s, s + n, "event.")
        if keyless and _has_string(data, s, s + n, 7):
            return None
        ct = self.rates[parts[0][2]][1]
        idx = self.index.get(parts[0][0], -1)
        if idx < 0:
            return DECISION_DENY, REASON_UNKNOWN_CUSTOMER, ct, 0, 0, b"", 0
        reason, cost = self._debit_event(idx, parts, self._place(idx, parts, [], "event.dimensions"))
        balance = self.bal[idx][ct]
        if reason == REASON_NONE:
            return DECISION_ALLOW, REASON_NONE, ct, cost, balance, b"", 0
        if reason == OUT_DEGRADED:
            mode = self.plans[self.plan_of[idx]][ct][0]
            return DECISION_DEGRADE, REASON_NONE, ct, 0, balance, self.modes[mode - 1], self._priority(idx, ct)
        return DECISION_DENY, reason, ct, 0, balance, b"", 0
