"""Escrow leases: a customer's balance in the central ledger, spent by many sidecars.

In ledger mode (``balances = "ledger"``) a customer's credits live in the
ledger, as grant buckets (``meterd_grants``) under one row of sums per
customer and credit type (``meterd_balances``). A sidecar spends only what it
has leased: a lease transaction moves an amount out of the buckets, in
burn-down order (priority, then soonest expiry, then oldest), into the
sidecar's lease (``meterd_leases``, with the buckets it came from in
``meterd_lease_parts``). A sidecar that spends only its own lease cannot
overspend the balance, even while it is cut off from the ledger: this is the
escrow method (O'Neil 1986) and the demarcation protocol.

Every figure a sidecar sends is a running total per lease (leased, given
back, consumed), so a call repeated after a timeout, or a flush sent twice,
changes nothing the second time. Consumption comes with the flush, in its
transaction (``settle``); remainders come back with ``give_back``. Parts are
consumed from the front of the burn-down order and given back from its end,
so the buckets drawn first are the ones spent; a part given back after its
bucket expired is expired then.

At every moment, per customer and credit type, and again summed over buckets:

    granted = available + leased + consumed + expired

(``check``, and ``meterd ledger check``). A lease holds exactly what was leased
to it, less what came back and what was consumed, by the sidecar's running
totals. Consumption beyond a lease (an outage allowance, spent while the
sidecar could not reach the ledger) leaves the lease in debt: its amount goes
below zero, in no bucket, and its sidecar's next lease repays it first. The
debt of a lease whose sidecar is replaced or released becomes the customer's
*overdrawn*: available goes below zero, and the next grant repays it first.

Every transaction on a customer's credit type locks its ``meterd_balances``
row first (SQLite serialises all writers anyway), and a flush settles in the
sorted order of those rows, so concurrent sidecars never deadlock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from meterd.clock import month_bounds
from meterd.corespec import format_nano
from meterd.errors import InvalidInput, LimitReached, NotFound, invariant
from meterd.ledger import Ledger, LedgerError, Settlement, UsageRow

NEVER_MS = 1 << 62               # the burn-down order puts grants that never expire last
# Gauge meters the ledger charges (max, unique_count: charged on the period's value, from the
# usage windows every sidecar flushed; ledger_plans.LedgerPlans._gauges); a latest meter's value is
# whichever sidecar's came last, which the windows cannot tell, so ledger mode refuses it
# (leases.check_catalog).
CENTRAL_GAUGES = ("max", "unique_count")
# How long after a calendar month's end the ledger charges the month's gauges of a customer
# without a plan (ledger_plans.gauges_due): the sidecars flush its last windows meanwhile.
GAUGE_GRACE_MS = 30_000
ADJUST_PRIORITY = 1_000_000      # credits added by Adjust are spent after every grant
OVERAGE_PRIORITY = ADJUST_PRIORITY + 1  # a plan's overage allowance: spent after every credit
# Bucket sources: a plan's period credits, rolled by the plan's roll (ledger_plans), and its
# overage allowance, of which the balance shown is net (see _Sums.headroom).
PERIOD_SOURCES = ("included", "rollover")
OVERAGE_SOURCE = "overage"
NO_PERIOD = -1                   # meterd_grants.period_n of a bucket no roll looks at
GRANTS_OPEN_MAX = 1_000          # buckets with credit left, per customer and credit type
RECALLS_PER_HEARTBEAT_MAX = 1_000
REFRESHES_PER_HEARTBEAT_MAX = 1_000  # changed allowances told per heartbeat, and acknowledged
KEY_CHARS_MAX = 300
INT64_MAX = (1 << 63) - 1
DEGRADED_WRAP = 1 << 63  # a lease's running total of fallback usage goes on modulo this


@dataclass(frozen=True)
class Granted:
    grant_id: str
    balance_nano: int            # available + leased, after the grant
    duplicate: bool = False


@dataclass(frozen=True)
class LeaseGrant:
    """What a lease transaction gave, and what it saw."""
    known: bool                  # the customer has a balance of this credit type in the ledger
    granted_nano: int = 0        # moved into the lease by this call
    leased_total_nano: int = 0   # everything ever moved into this lease (a running total)
    amount_nano: int = 0         # what the lease holds now, as the ledger counts it
    expires_at_ms: int = 0       # when its soonest part expires (0: never)
    available_nano: int = 0      # central, after this call
    elsewhere_nano: int = 0      # held by other sidecars' leases
    recalled: int = 0            # other leases asked to come back
    allowance_nano: int = 0      # what the sidecar may spend beyond its lease while the ledger is away
    returned_total_nano: int = 0  # running totals of the lease: given back, and consumed as settled
    consumed_total_nano: int = 0
    headroom_nano: int = 0       # of the balance, a plan's overage allowance (not shown as balance)
    plan: str = ""               # the customer's plan in the ledger ('': none)
    degraded_nano: int = 0       # the credit period's fallback usage, as settled (_Sums.degraded)
    degraded_total_nano: int = 0  # the lease's running total of it, as settled
    period_end_ms: int = 0       # the end of the customer's credit period (0: on no plan)


@dataclass(frozen=True)
class Lease:
    """A lease row, as the ledger has it."""
    customer_id: str
    credit_type: str
    incarnation: str
    amount_nano: int
    leased_total_nano: int
    returned_total_nano: int
    consumed_total_nano: int
    expires_at_ms: int
    recall_ms: int
    updated_ms: int
    degraded_total_nano: int = 0  # its sidecar's fallback usage, in all, as last settled
    acquisitions: int = 0        # lease calls that moved credit into it (read by _own_lease only)


@dataclass(frozen=True)
class Heartbeat:
    recalls: list[tuple[str, str]]   # (customer, credit type) whose leases are asked back
    sharers: int                     # sidecars seen lately, for the fair share (0: not counted this time)
    # (customer, credit type, version, allowance): outage allowances changed for leases of this sidecar,
    # told until the sidecar acknowledges that version.
    allowances: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)


@dataclass
class _Sums:
    """A meterd_balances row."""
    granted: int
    available: int
    leased: int
    consumed: int
    expired: int
    overdrawn: int
    grants_made: int
    entries_made: int
    allowance: int = 0           # outage_allowance_nano (set on its own, never by _put_sums)
    debts: int = 0               # what leases owe: the sum of their amounts below zero
    # The part of the balance that is a plan's overage allowance, not a credit: its buckets'
    # amounts less what of them expired and what of their consumption was billed. The
    # balance shown (in entries and reads) is without it: below zero by the overage not yet billed.
    headroom: int = 0
    # What the credit period's usage served in a plan's fallback mode would have cost, as settled.
    degraded: int = 0
    # A plan's automatic top-up: asked for (an auto_topup_requested entry) when a settlement takes
    # the balance shown below ``low``, for what restores ``topup`` (0: none); once, until a credit
    # lifts the balance to ``low`` or more (``pending`` until then).
    low: int = 0
    topup: int = 0
    pending: int = 0
    # The balance shown when the row was read (not stored): what _put_sums compares for a top-up.
    read_shown: int = dataclasses.field(default=0, init=False)

    def __post_init__(self) -> None:
        self.read_shown = self.shown

    def moved(self, before: int, after: int) -> None:
        """A lease's amount went from ``before`` to ``after``: its debt with it."""
        self.debts += max(-after, 0) - max(-before, 0)

    @property
    def balance(self) -> int:
        return self.available + self.leased

    @property
    def shown(self) -> int:
        """The balance as local mode has it: credits less the overage not yet billed."""
        return self.balance - self.headroom


@dataclass
class _Bucket:
    grant_id: str
    seq: int
    priority: int
    expires_at_ms: int
    amount: int
    remaining: int
    leased: int
    consumed: int
    expired: int
    source: str = ""
    period_n: int = NO_PERIOD    # the credit period a plan's bucket belongs to, until its roll
    rollovers: int = 0           # how many boundaries its credits rolled over

    def sort_key(self) -> tuple[int, int, int]:
        return (self.priority, self.expires_at_ms or NEVER_MS, self.seq)

    def expired_at(self, now_ms: int) -> bool:
        return 0 < self.expires_at_ms <= now_ms


_SUMS = ("granted_nano, available_nano, leased_nano, consumed_nano, expired_nano, overdrawn_nano, grants_made, "
         "entries_made")
_SUMS_READ = _SUMS + (", outage_allowance_nano, debts_nano, headroom_nano, degraded_nano, low_balance_nano, "
                      "topup_target_nano, topup_pending")
SUMS_READ = len(_SUMS_READ.split(","))
SETTLE_CHUNK = 500               # settlements whose rows one read takes (two parameters each)
_BUCKET = ("grant_id, seq, priority, expires_at_ms, amount_nano, remaining_nano, leased_nano, consumed_nano, "
           "expired_nano, source, period_n, rollovers")


_PART_BUCKET = ", ".join("g." + c.strip() for c in _BUCKET.split(","))


# Writes that a flush's settlements hold back (Escrow._holding_writes): one executemany each.
_PUT_SUMS = ("UPDATE meterd_balances SET granted_nano = ?, available_nano = ?, leased_nano = ?, consumed_nano = ?, "
             "expired_nano = ?, overdrawn_nano = ?, grants_made = ?, entries_made = ?, debts_nano = ?, "
             "headroom_nano = ?, degraded_nano = ?, low_balance_nano = ?, topup_target_nano = ?, topup_pending = ?, "
             "updated_ms = ? WHERE customer_id = ? AND credit_type = ?")
_PUT_BUCKET = ("UPDATE meterd_grants SET amount_nano = ?, remaining_nano = ?, leased_nano = ?, consumed_nano = ?, "
               "expired_nano = ?, period_n = ?, expires_at_ms = ? WHERE customer_id = ? AND credit_type = ? AND "
               "grant_id = ?")
_PUT_PART = ("INSERT INTO meterd_lease_parts (sidecar_id, customer_id, credit_type, grant_id, amount_nano) VALUES "
             "(?, ?, ?, ?, ?) ON CONFLICT (sidecar_id, customer_id, credit_type, grant_id) DO UPDATE SET amount_nano = "
             "excluded.amount_nano")
_DROP_PART = ("DELETE FROM meterd_lease_parts WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ? AND "
              "grant_id = ?")
_SETTLED_LEASE = ("UPDATE meterd_leases SET amount_nano = amount_nano - ?, consumed_total_nano = ?, expires_at_ms = ?, "
                  "updated_ms = ? WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ?")
_HELD_WRITES = frozenset({_PUT_SUMS, _PUT_BUCKET, _PUT_PART, _DROP_PART, _SETTLED_LEASE})


def _bucket(r: Sequence[Any]) -> _Bucket:
    """A _Bucket from a row of _BUCKET."""
    seq, priority, expires, amount, remaining, leased, consumed, expired = (int(v) for v in r[1:9])
    return _Bucket(r[0], seq, priority, expires, amount, remaining, leased, consumed, expired, r[9], int(r[10]),
                   int(r[11]))
_LEASE = ("customer_id, credit_type, incarnation, amount_nano, leased_total_nano, returned_total_nano, "
          "consumed_total_nano, expires_at_ms, recall_ms, updated_ms, degraded_total_nano")


def _lease(r: tuple) -> Lease:
    """A Lease from a row of _LEASE (and acquisitions, when read)."""
    return Lease(r[0], r[1], r[2], *(int(v) for v in r[3:]))


def lease_size(need_nano: int, want_nano: int, available_nano: int, sharers: int) -> int:
    """How much a lease takes: what the sidecar wants (its spend rate times the
    refill horizon), at most a fair share of what is available centrally, and
    at least one request (``need_nano``) when that much is there. Above one
    request it is a whole number of requests, so no fragment too small for a
    request is left at a lease while the rest stays central. Less than one
    request, when that is all there is: it adds up with a recall."""
    if available_nano <= 0:
        return 0
    share = available_nano // max(1, sharers)
    size = min(max(want_nano, need_nano), max(share, need_nano), available_nano)
    if 0 < need_nano < size < available_nano:
        size -= size % need_nano
    return size


class Escrow:
    """The ledger's side of ledger mode, over one Ledger connection."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self._lock = " FOR UPDATE" if ledger.dialect == "postgresql" else ""
        # Rows locked together go in Python's order (code points), as every caller sorts them, whatever
        # the database's collation (SQLite compares UTF-8 bytes: the same order).
        self._in_code_points = 'customer_id COLLATE "C", credit_type COLLATE "C"' \
            if ledger.dialect == "postgresql" else "customer_id, credit_type"
        # While settling a flush: writes held back, by statement, to go in one executemany each
        # before the next read, the next other statement, or the end of the chunk.
        self._held: dict[str, list[tuple]] | None = None
        self._gauges_from: int | None = None  # meterd_gauges_from, once read (it never changes)

    # ---- plumbing --------------------------------------------------------------------

    def _rows(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        if self._held:
            self._write_held()
        return self.ledger._rows(sql, tuple(params))

    def _exec(self, sql: str, params: Iterable[Any] = ()) -> None:
        if self._held is not None and sql in _HELD_WRITES:
            self._held.setdefault(sql, []).append(tuple(params))
            return
        if self._held:
            self._write_held()
        self.ledger._exec(sql, tuple(params))

    def _write_held(self) -> None:
        """The writes held back, each statement's in the order they came (they are of distinct rows:
        one lease, its buckets and its balance row per settlement)."""
        held, self._held = self._held, {}
        for sql, rows in (held or {}).items():
            self.ledger._exec_many(sql, rows)

    @contextlib.contextmanager
    def _holding_writes(self) -> Iterator[None]:
        self._held = {}
        try:
            yield
            self._write_held()
        finally:
            self._held = None

    def _sums(self, customer_id: str, credit_type: str, create: bool, now_ms: int) -> _Sums | None:
        """The customer's sums, locked until the transaction ends; made (zero) with ``create``."""
        if create:
            self._exec(f"INSERT INTO meterd_balances (customer_id, credit_type, {_SUMS}, updated_ms) "
                       "VALUES (?, ?, 0, 0, 0, 0, 0, 0, 0, 0, ?) ON CONFLICT (customer_id, credit_type) DO NOTHING",
                       (customer_id, credit_type, now_ms))
        rows = self._rows(f"SELECT {_SUMS_READ} FROM meterd_balances WHERE customer_id = ? AND credit_type = ?"
                          + self._lock, (customer_id, credit_type))
        return _Sums(*(int(v) for v in rows[0])) if rows else None

    def _put_sums(self, customer_id: str, credit_type: str, s: _Sums, now_ms: int) -> None:
        self._ask_topup(s, customer_id, credit_type, now_ms)
        invariant(s.granted == s.available + s.leased + s.consumed + s.expired,
                  f"{customer_id}/{credit_type}: granted {s.granted} != available {s.available} + leased "
                  f"{s.leased} + consumed {s.consumed} + expired {s.expired}")
        invariant(s.available <= 0 or not (s.overdrawn or s.debts),
                  f"{customer_id}/{credit_type}: {s.available} available while {s.overdrawn} is overdrawn and "
                  f"leases owe {s.debts}")
        invariant(s.headroom >= 0, f"{customer_id}/{credit_type}: overage headroom {s.headroom}")
        self._exec(_PUT_SUMS, (s.granted, s.available, s.leased, s.consumed, s.expired, s.overdrawn, s.grants_made,
                    s.entries_made, s.debts, s.headroom, s.degraded, s.low, s.topup, s.pending, now_ms, customer_id,
                    credit_type))

    def _buckets(self, customer_id: str, credit_type: str, where: str = "remaining_nano > 0",
                 params: tuple = ()) -> list[_Bucket]:
        """The customer's buckets that match ``where`` (a fixed condition, with ``params``), in burn-down order."""
        rows = self._rows(f"SELECT {_BUCKET} FROM meterd_grants WHERE customer_id = ? AND credit_type = ? AND "
                          f"({where})", (customer_id, credit_type, *params))
        return sorted((_bucket(r) for r in rows), key=_Bucket.sort_key)

    def _put_bucket(self, customer_id: str, credit_type: str, b: _Bucket) -> None:
        self._exec(_PUT_BUCKET, (b.amount, b.remaining, b.leased, b.consumed, b.expired, b.period_n,
                                    b.expires_at_ms, customer_id, credit_type, b.grant_id))

    def _entry(self, s: _Sums, customer_id: str, credit_type: str, kind: str, source: str, amount: int,
               before: int, reference: str, now_ms: int, charge: int = 0, charge_ct: str = "",
               effective_ms: int | None = None, detail: dict | None = None, after: int | None = None) -> None:
        """An audit entry of a central movement, with the balance shown (``_Sums.shown``, unless
        ``after`` says) around it.
        Central entries are numbered per customer and credit type, under sidecar id ''."""
        s.entries_made += 1
        self._exec("INSERT INTO meterd_entries (sidecar_id, incarnation, source_sequence, flush_sequence, time_ms, "
                   "effective_ms, customer_id, kind, source, credit_type, amount_nano, balance_before_nano, "
                   "balance_after_nano, reference, charge_nano, charge_credit_type, detail) "
                   "VALUES ('', ?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                   (f"{len(customer_id)}:{customer_id}/{credit_type}", s.entries_made, now_ms,
                    now_ms if effective_ms is None else effective_ms, customer_id, kind, source, credit_type, amount,
                    before, s.shown if after is None else after, reference, charge, charge_ct,
                    json.dumps(detail) if detail else "{}"))

    def _replayed(self, key: str, digest: str) -> dict | None:
        if not key:
            return None
        if len(key) > KEY_CHARS_MAX:
            raise InvalidInput("idempotency_key", f"longer than {KEY_CHARS_MAX} characters")
        rows = self._rows("SELECT digest, answer FROM meterd_keys WHERE key = ?", (key,))
        if not rows:
            return None
        if rows[0][0] != digest:
            raise InvalidInput("idempotency_key", "was used before with a different request")
        return dict(json.loads(rows[0][1]))

    def _remember(self, key: str, digest: str, answer: dict, now_ms: int) -> None:
        if key:
            self._exec("INSERT INTO meterd_keys (key, digest, answer, created_ms) VALUES (?, ?, ?, ?)",
                       (key, digest, json.dumps(answer), now_ms))

    # ---- expiry ----------------------------------------------------------------------

    def _expire(self, customer_id: str, credit_type: str, s: _Sums, now_ms: int) -> None:
        """What is left centrally of the buckets that have expired (their leased
        parts expire as they are given back). A plan's period credits and its overage
        allowance expire here too, unaudited: their roll says what became of them."""
        for b in self._buckets(customer_id, credit_type, "remaining_nano > 0 AND expires_at_ms > 0 AND "
                               "expires_at_ms <= ?", (now_ms,)):
            before = s.shown
            amount = b.remaining
            self._expire_part(s, b, amount)
            b.remaining -= amount
            s.available -= amount
            self._put_bucket(customer_id, credit_type, b)
            if b.period_n == NO_PERIOD:
                self._entry(s, customer_id, credit_type, "expired", "ledger", -amount, before,
                            f"{b.grant_id} expired", now_ms)
            elif b.source != OVERAGE_SOURCE:  # a period's credits, which its roll is to say what became of:
                s.read_shown -= amount        # no top-up is asked for them meanwhile

    @staticmethod
    def _expire_part(s: _Sums, b: _Bucket, amount: int) -> None:
        """``amount`` of a bucket's credit expires (the caller takes it from where it was): an
        overage allowance's expired part is no longer headroom."""
        b.expired += amount
        s.expired += amount
        if b.source == OVERAGE_SOURCE:
            s.headroom -= amount

    # ---- grants and adjustments ------------------------------------------------------

    def grant(self, customer_id: str, credit_type: str, amount_nano: int, expires_at_ms: int, priority: int,
              source: str, reference: str, now_ms: int, key: str = "", digest: str = "") -> Granted:
        """A new grant bucket, in one transaction; idempotent by ``key`` (with the request's ``digest``)."""
        invariant(amount_nano > 0, f"grant of {amount_nano}")
        with self.ledger._transaction():
            replay = self._replayed(key, digest)
            if replay is not None:
                return Granted(replay["grant_id"], replay["balance_nano"], duplicate=True)
            answer = self._grant(customer_id, credit_type, amount_nano, expires_at_ms, priority, source, reference,
                                 now_ms)
            self._remember(key, digest, dataclasses.asdict(answer), now_ms)
        return answer

    def _grant(self, customer_id: str, credit_type: str, amount: int, expires_at_ms: int, priority: int,
               source: str, reference: str, now_ms: int) -> Granted:
        s = self._sums(customer_id, credit_type, True, now_ms)
        invariant(s is not None, "the balance row was just made")
        assert s is not None  # for mypy: invariant raised otherwise
        self._expire(customer_id, credit_type, s, now_ms)
        answer = self._add_bucket(s, customer_id, credit_type, amount, expires_at_ms, priority, source, reference,
                                  now_ms)
        self._put_sums(customer_id, credit_type, s, now_ms)
        return answer

    def _add_bucket(self, s: _Sums, customer_id: str, credit_type: str, amount: int, expires_at_ms: int,
                    priority: int, source: str, reference: str, now_ms: int, period_n: int = NO_PERIOD,
                    rollovers: int = 0, kind: str = "", effective_ms: int | None = None,
                    capped: bool = True, bill_at: int = 0) -> Granted:
        """A new bucket in the (locked) sums ``s``, and its entry (of ``kind``, by default that of
        its source); an overage allowance (OVERAGE_SOURCE) is headroom, with no entry. ``capped``:
        refused past GRANTS_OPEN_MAX open buckets (a plan's roll is not: its buckets end with
        their period, and a customer's grants must not stop its periods). ``bill_at``: an overage
        allowance's early-bill threshold (0: none)."""
        (open_count,), = self._rows("SELECT COUNT(*) FROM meterd_grants WHERE customer_id = ? AND credit_type = ? "
                                    "AND (remaining_nano > 0 OR leased_nano > 0)", (customer_id, credit_type)) \
            if capped else ((0,),)
        if int(open_count) >= GRANTS_OPEN_MAX:
            raise LimitReached(f"customer {customer_id!r} has {open_count} grants of {credit_type} with credit left "
                               f"(at most {GRANTS_OPEN_MAX}); let some be spent or expire first")
        if s.granted + amount > INT64_MAX:
            raise InvalidInput("amount_nano", f"would take {customer_id!r}'s {credit_type} granted in all past "
                               "64 bits (9.2e18 nano)")
        before = s.shown
        grant_id = self._insert_bucket(s, customer_id, credit_type, amount, amount, 0, expires_at_ms, priority,
                                       source, reference, now_ms, period_n, rollovers, bill_at)
        s.granted += amount
        s.available += amount
        if source == OVERAGE_SOURCE:
            s.headroom += amount
        self._settle_debts(s, customer_id, credit_type, now_ms)  # what was spent beyond the balance is paid first
        if source != OVERAGE_SOURCE:
            kind = kind or (source if source in ("refund", "adjust") else "grant")
            self._entry(s, customer_id, credit_type, kind, source, amount, before,
                        f"{grant_id} {source} {reference}".strip(), now_ms, effective_ms=effective_ms)
        return Granted(grant_id, s.shown)

    def _ask_topup(self, s: _Sums, customer_id: str, credit_type: str, now_ms: int) -> None:
        """What this transaction did took the balance shown below a plan's low_balance (a
        settlement, a grant's expiry, a debit): a top-up is asked for (once), of what restores
        its topup_target, as local mode asks after the change that crossed it."""
        before, s.read_shown = s.read_shown, s.shown
        if s.pending and s.shown > before and s.shown >= s.low:  # lifted back (a credit): asked again when below
            s.pending = 0
        if s.topup and not s.pending and before >= s.low > s.shown:
            s.pending = 1
            self._entry(s, customer_id, credit_type, "auto_topup_requested", "", 0, s.shown,
                        f"below {format_nano(s.low)}", now_ms, charge=s.topup - s.shown, charge_ct=credit_type)

    def _insert_bucket(self, s: _Sums, customer_id: str, credit_type: str, amount: int, remaining: int, leased: int,
                       expires_at_ms: int, priority: int, source: str, reference: str, now_ms: int, period_n: int,
                       rollovers: int, bill_at: int = 0) -> str:
        """A bucket row, numbered in the sums ``s`` (the caller moves the sums); its grant id."""
        s.grants_made += 1
        grant_id = f"G{s.grants_made}"
        self._exec(f"INSERT INTO meterd_grants (customer_id, credit_type, {_BUCKET}, reference, created_ms, "
                   "bill_at_nano) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 0, ?, ?, ?, ?, ?, ?)",
                   (customer_id, credit_type, grant_id, s.grants_made, priority, expires_at_ms, amount, remaining,
                    leased, source, period_n, rollovers, reference, now_ms, bill_at))
        return grant_id

    def adjust(self, customer_id: str, credit_type: str, amount_nano: int, reason: str, now_ms: int,
               key: str = "", digest: str = "") -> Granted:
        """A manual adjustment: a credit is a bucket spent after every grant; a debit
        comes off the available buckets in burn-down order, and only what is available."""
        invariant(amount_nano != 0, "an adjustment of 0")
        with self.ledger._transaction():
            replay = self._replayed(key, digest)
            if replay is not None:
                return Granted(replay["grant_id"], replay["balance_nano"], duplicate=True)
            if amount_nano > 0:
                answer = self._grant(customer_id, credit_type, amount_nano, 0, ADJUST_PRIORITY, "adjust", reason,
                                     now_ms)
            else:
                answer = self._debit(customer_id, credit_type, -amount_nano, reason, now_ms)
            self._remember(key, digest, dataclasses.asdict(answer), now_ms)
        return answer

    def _debit(self, customer_id: str, credit_type: str, amount: int, reason: str, now_ms: int) -> Granted:
        s = self._sums(customer_id, credit_type, False, now_ms)
        if s is None:
            raise NotFound(f"customer {customer_id!r} has no {credit_type} balance in the ledger")
        self._expire(customer_id, credit_type, s, now_ms)
        # A plan's overage allowance is no credit: it cannot be taken away.
        room = sum(b.remaining for b in self._buckets(customer_id, credit_type) if b.source == OVERAGE_SOURCE)
        if amount > s.available - room:
            raise InvalidInput("amount_nano", f"-{amount} is more than the {max(s.available - room, 0)} available "
                               f"centrally; {s.leased} is leased to sidecars and comes back as they return it")
        before = s.shown

        def debited(b: _Bucket, take: int) -> None:
            b.amount -= take
        self._take_remaining(s, customer_id, credit_type, amount, debited, credit_only=True)
        s.granted -= amount
        s.available -= amount
        self._entry(s, customer_id, credit_type, "adjust", "adjust", -amount, before, reason, now_ms)
        self._put_sums(customer_id, credit_type, s, now_ms)
        return Granted("", s.shown)

    # ---- sidecars: admission and fencing ---------------------------------------------

    def _admit(self, sidecar_id: str, incarnation: str, now_ms: int) -> None:
        """Refuse a fenced incarnation; a new one takes the id over (the one it
        replaces is fenced, and its leases come back)."""
        rows = self._rows("SELECT incarnation, released_ms, last_seen_ms FROM meterd_sidecars WHERE sidecar_id = ?",
                          (sidecar_id,))
        if not rows:
            self._exec("INSERT INTO meterd_sidecars (sidecar_id, incarnation, last_sequence, first_flush_ms, "
                       "last_flush_ms, last_seen_ms) VALUES (?, ?, 0, ?, 0, ?) ON CONFLICT (sidecar_id) DO NOTHING",
                       (sidecar_id, incarnation, now_ms, now_ms))
            rows = self._rows("SELECT incarnation, released_ms, last_seen_ms FROM meterd_sidecars "
                              "WHERE sidecar_id = ?", (sidecar_id,))
        current, released, seen = rows[0][0], int(rows[0][1]), int(rows[0][2])
        self.ledger.refuse_fenced(sidecar_id, incarnation, released)
        if current != incarnation:
            self._exec("INSERT INTO meterd_fenced (sidecar_id, incarnation, fenced_ms, reason) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (sidecar_id, incarnation) DO NOTHING",
                       (sidecar_id, current, now_ms, "replaced"))
            self._exec("UPDATE meterd_sidecars SET incarnation = ?, last_seen_ms = ? WHERE sidecar_id = ?",
                       (incarnation, now_ms, sidecar_id))
            self._release_leases(sidecar_id, now_ms, other_than=incarnation)
        elif now_ms - seen >= 1000:  # liveness, at most once a second: not a write per call
            self._exec("UPDATE meterd_sidecars SET last_seen_ms = ? WHERE sidecar_id = ?", (now_ms, sidecar_id))

    def _release_leases(self, sidecar_id: str, now_ms: int,
                        other_than: str | None = None) -> list[tuple[str, str, int]]:
        """Give back every lease of a sidecar (of incarnations other than ``other_than``)."""
        where = "sidecar_id = ? AND amount_nano <> 0"
        params: list[Any] = [sidecar_id]
        if other_than is not None:
            where += " AND incarnation <> ?"
            params.append(other_than)
        out = []
        for cust, ct in sorted(self._rows(f"SELECT customer_id, credit_type FROM meterd_leases WHERE {where}",
                                          params)):
            s = self._sums(cust, ct, False, now_ms)
            lease = self._lease(sidecar_id, cust, ct)
            if s is None or lease is None or not lease.amount_nano:
                continue
            self._take_back(s, sidecar_id, lease, now_ms)
            self._settle_debts(s, cust, ct, now_ms)
            self._put_sums(cust, ct, s, now_ms)
            out.append((cust, ct, lease.amount_nano))
        return out

    def _take_back(self, s: _Sums, sidecar_id: str, lease: Lease, now_ms: int) -> None:
        """A lease of an incarnation that is gone comes back whole: what it holds is given back; its
        debt (spent beyond it in an outage) becomes the customer's overdrawn, repaid by the next grant."""
        if lease.amount_nano > 0:
            self._give_back(s, sidecar_id, lease, lease.amount_nano, now_ms)
            self._exec("UPDATE meterd_leases SET returned_total_nano = returned_total_nano + ? WHERE sidecar_id = ? "
                       "AND customer_id = ? AND credit_type = ?", (lease.amount_nano, sidecar_id, lease.customer_id,
                                                                  lease.credit_type))
        elif lease.amount_nano < 0:
            debt = -lease.amount_nano
            s.moved(lease.amount_nano, 0)
            s.leased += debt
            s.available -= debt
            s.overdrawn += debt
            # As if the customer's overdrawn credit had been leased to it: its running totals still add up.
            self._exec("UPDATE meterd_leases SET amount_nano = 0, leased_total_nano = leased_total_nano + ?, "
                       "recall_ms = 0, updated_ms = ? WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ?",
                       (debt, now_ms, sidecar_id, lease.customer_id, lease.credit_type))

    def release_sidecar(self, sidecar_id: str, now_ms: int) -> list[tuple[str, str, int]]:
        """Fence a sidecar for good and give back what its leases hold (what it
        spent and never settled is given back to the customer: it is unknown)."""
        with self.ledger._transaction():
            rows = self._rows("SELECT incarnation, released_ms FROM meterd_sidecars WHERE sidecar_id = ?"
                              + self._lock, (sidecar_id,))
            if not rows:
                raise NotFound(f"the ledger has no sidecar {sidecar_id!r}")
            self._exec("INSERT INTO meterd_fenced (sidecar_id, incarnation, fenced_ms, reason) VALUES (?, ?, ?, ?) "
                       "ON CONFLICT (sidecar_id, incarnation) DO NOTHING", (sidecar_id, rows[0][0], now_ms, "released"))
            if not int(rows[0][1]):
                self._exec("UPDATE meterd_sidecars SET released_ms = ? WHERE sidecar_id = ?", (now_ms, sidecar_id))
            return self._release_leases(sidecar_id, now_ms)

    def heartbeat(self, sidecar_id: str, incarnation: str, now_ms: int, count_sharers: bool,
                  live_ms: int, acknowledged: Iterable[tuple[str, str, int]] = ()) -> Heartbeat:
        """A sidecar's periodic call: the leases asked back from it, the outage allowances changed
        for its leases (after clearing those it ``acknowledged``, by version), and (when asked) how
        many sidecars were seen within ``live_ms``."""
        with self.ledger._transaction():
            self._admit(sidecar_id, incarnation, now_ms)
            for cust, ct, version in list(acknowledged)[:REFRESHES_PER_HEARTBEAT_MAX]:
                self._exec("UPDATE meterd_leases SET refresh_ms = 0 WHERE sidecar_id = ? AND customer_id = ? AND "
                           "credit_type = ? AND refresh_ms = ?", (sidecar_id, cust, ct, version))
            recalls = [(r[0], r[1]) for r in self._rows(
                "SELECT customer_id, credit_type FROM meterd_leases WHERE sidecar_id = ? AND recall_ms > 0 "
                f"AND amount_nano > 0 LIMIT {RECALLS_PER_HEARTBEAT_MAX}", (sidecar_id,))]
            allowances = [(r[0], r[1], int(r[2]), int(r[3])) for r in self._rows(
                "SELECT l.customer_id, l.credit_type, l.refresh_ms, b.outage_allowance_nano FROM meterd_leases l "
                "JOIN meterd_balances b ON b.customer_id = l.customer_id AND b.credit_type = l.credit_type "
                f"WHERE l.sidecar_id = ? AND l.refresh_ms > 0 LIMIT {REFRESHES_PER_HEARTBEAT_MAX}", (sidecar_id,))]
            sharers = 0
            if count_sharers:
                (sharers,), = self._rows("SELECT COUNT(*) FROM meterd_sidecars WHERE released_ms = 0 AND "
                                         "last_seen_ms >= ?", (now_ms - live_ms,))
        return Heartbeat(recalls, int(sharers), allowances)

    # ---- leases --------------------------------------------------------------------------

    def _lease(self, sidecar_id: str, customer_id: str, credit_type: str) -> Lease | None:
        rows = self._rows(f"SELECT {_LEASE} FROM meterd_leases WHERE sidecar_id = ? AND customer_id = ? AND "
                          "credit_type = ?" + self._lock, (sidecar_id, customer_id, credit_type))
        if not rows:
            return None
        return _lease(rows[0])

    def _parts(self, sidecar_id: str, customer_id: str, credit_type: str) -> list[tuple[_Bucket, int]]:
        """A lease's parts with their buckets, in burn-down order."""
        rows = self._rows(f"SELECT p.amount_nano, {_PART_BUCKET} FROM meterd_lease_parts p JOIN meterd_grants g ON "
                          "g.customer_id = p.customer_id AND g.credit_type = p.credit_type AND g.grant_id = p.grant_id "
                          "WHERE p.sidecar_id = ? AND p.customer_id = ? AND p.credit_type = ?",
                          (sidecar_id, customer_id, credit_type))
        parts = [(_bucket(r[1:]), int(r[0])) for r in rows]
        return sorted(parts, key=lambda p: p[0].sort_key())

    def _put_part(self, sidecar_id: str, customer_id: str, credit_type: str, grant_id: str, amount: int) -> None:
        if amount:
            self._exec(_PUT_PART, (sidecar_id, customer_id, credit_type, grant_id, amount))
        else:
            self._exec(_DROP_PART, (sidecar_id, customer_id, credit_type, grant_id))

    def acquire(self, sidecar_id: str, incarnation: str, customer_id: str, credit_type: str, need_nano: int,
                want_nano: int, sharers: int, now_ms: int) -> LeaseGrant:
        """One lease transaction: move up to ``lease_size`` from the buckets, in
        burn-down order, into this sidecar's lease. When that is less than
        ``need_nano``, the other leases of the customer's credit type are
        recalled (they come back at their sidecars' next heartbeat)."""
        return self.acquire_many(sidecar_id, incarnation, [(customer_id, credit_type, need_nano, want_nano)], sharers,
                                 now_ms)[0]

    def acquire_many(self, sidecar_id: str, incarnation: str, wants: list[tuple[str, str, int, int]], sharers: int,
                     now_ms: int) -> list[LeaseGrant]:
        """Leases of several customers' credit types (customer, credit type, need, want) in one
        transaction, locked in sorted order; the answers in the order asked."""
        invariant(len({(c, ct) for c, ct, _, _ in wants}) == len(wants), "a lease asked twice in one call")
        with self.ledger._transaction():
            self._admit(sidecar_id, incarnation, now_ms)
            out = {(c, ct): self._acquire_one(sidecar_id, incarnation, c, ct, need, want, sharers, now_ms)
                   for c, ct, need, want in sorted(wants)}
            plans = self._plans_of(sorted({c for c, _, _, _ in wants}))
        return [dataclasses.replace(out[(c, ct)], plan=plans[c][0], period_end_ms=plans[c][1]) if c in plans
                else out[(c, ct)] for c, ct, _, _ in wants]

    def _plans_of(self, customers: list[str]) -> dict[str, tuple[str, int]]:
        """The plans the customers are on in the ledger (ledger_plans), and their credit periods'
        ends, of those on one."""
        return {str(c): (str(p), int(e)) for c, p, e in self._rows(
            f"SELECT customer_id, plan, end_ms FROM meterd_subscriptions WHERE plan <> '' AND customer_id IN "
            f"({', '.join('?' * len(customers))})", tuple(customers))}

    def _acquire_one(self, sidecar_id: str, incarnation: str, customer_id: str, credit_type: str, need_nano: int,
                     want_nano: int, sharers: int, now_ms: int) -> LeaseGrant:
        s = self._sums(customer_id, credit_type, False, now_ms)
        if s is None:
            return LeaseGrant(known=False)
        self._expire(customer_id, credit_type, s, now_ms)
        lease = self._own_lease(sidecar_id, incarnation, customer_id, credit_type, s, now_ms)
        if need_nano > 0 and lease.amount_nano <= 0 and lease.acquisitions:
            # Empty (run out, given back when idle, or forgotten by its sidecar and made again): at least
            # its average size so far, so that a customer coming back is not sized from nothing again.
            want_nano = max(want_nano, lease.leased_total_nano // lease.acquisitions)
        size = lease_size(need_nano, want_nano, s.available, sharers)
        held = {b.grant_id: (b, amount) for b, amount in self._parts(sidecar_id, customer_id, credit_type)} \
            if size else {}
        self._draw(s, sidecar_id, lease, size, held)
        s.moved(lease.amount_nano, lease.amount_nano + size)
        elsewhere = s.leased - lease.amount_nano - size  # every lease of the customer's credit type, less this one
        recalled = 0
        # need_nano is what the sidecar is short of: the ledger's figure of its lease lags its spending.
        if size < need_nano and int(elsewhere) > 0:
            recalled = len(self._rows("SELECT sidecar_id FROM meterd_leases WHERE customer_id = ? AND "
                                      "credit_type = ? AND sidecar_id <> ? AND amount_nano > 0",
                                      (customer_id, credit_type, sidecar_id)))
            self._exec("UPDATE meterd_leases SET recall_ms = ? WHERE customer_id = ? AND credit_type = ? AND "
                       "sidecar_id <> ? AND amount_nano > 0 AND recall_ms = 0",
                       (now_ms, customer_id, credit_type, sidecar_id))
        # A part of a grant that ended (spared for holds across it) is no end still to come.
        expires = min((b.expires_at_ms for b, amount in held.values() if amount and b.expires_at_ms > now_ms),
                      default=0) if size else lease.expires_at_ms
        if size:
            # A lease that held nothing (and was not short: it may have served a fallback) had nothing
            # to settle: settled up to now (what it spends from now on is after a roll's, or a cancel's, time
            # if that is before now: neither waits for a lease first taken after it).
            self._exec("UPDATE meterd_leases SET amount_nano = amount_nano + ?, leased_total_nano = leased_total_nano "
                       "+ ?, expires_at_ms = ?, acquisitions = acquisitions + 1, updated_ms = ?, settled_ms = CASE "
                       "WHEN amount_nano = 0 AND short_ms = 0 AND settled_ms < ? THEN ? ELSE settled_ms END "
                       "WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ?",
                       (size, size, expires, now_ms, now_ms - 1, now_ms - 1, sidecar_id, customer_id, credit_type))
        if size < need_nano:  # short: its sidecar may serve the fallback (ledger_plans._unsettled waits for it)
            self._exec("UPDATE meterd_leases SET short_ms = ? WHERE sidecar_id = ? AND customer_id = ? AND "
                       "credit_type = ?", (now_ms, sidecar_id, customer_id, credit_type))
        self._put_sums(customer_id, credit_type, s, now_ms)  # expiry may have moved it, even without a lease
        return LeaseGrant(True, size, lease.leased_total_nano + size, lease.amount_nano + size, expires, s.available,
                          int(elsewhere), recalled, s.allowance, lease.returned_total_nano, lease.consumed_total_nano,
                          s.headroom, degraded_nano=s.degraded,
                          degraded_total_nano=lease.degraded_total_nano)

    def _draw(self, s: _Sums, sidecar_id: str, lease: Lease, size: int, held: dict[str, tuple[_Bucket, int]]) -> None:
        """Move ``size`` of the available buckets, in burn-down order, into a lease: first into
        consumed for what the lease owes (its debt), then into its parts (``held``: parts by grant,
        updated). The caller moves the lease row's figures."""
        debt = max(-lease.amount_nano, 0)

        def drawn(b: _Bucket, take: int) -> None:
            nonlocal debt
            repaid = min(take, debt)
            debt -= repaid
            b.consumed += repaid
            b.leased += take - repaid
            if take > repaid:
                part = held.get(b.grant_id, (b, 0))[1] + take - repaid
                self._put_part(sidecar_id, lease.customer_id, lease.credit_type, b.grant_id, part)
                held[b.grant_id] = (b, part)
        self._take_remaining(s, lease.customer_id, lease.credit_type, size, drawn)
        s.available -= size
        s.leased += size

    def _take_remaining(self, s: _Sums, customer_id: str, credit_type: str, amount: int,
                        book: Callable[[_Bucket, int], None], credit_only: bool = False) -> int:
        """Take ``amount`` out of the buckets' remaining credit, in burn-down order; ``book`` says
        where each take goes in its bucket (``credit_only``: not a plan's overage allowance). The
        buckets must hold it (the caller checked ``s``)."""
        left = amount
        for b in self._buckets(customer_id, credit_type) if amount else []:
            if credit_only and b.source == OVERAGE_SOURCE:
                continue
            take = min(left, b.remaining)
            if not take:
                break
            b.remaining -= take
            book(b, take)
            left -= take
            self._put_bucket(customer_id, credit_type, b)
        invariant(left == 0, f"{customer_id}/{credit_type}: buckets hold less than the available {s.available}")
        return amount

    def _repay(self, s: _Sums, sidecar_id: str, lease: Lease, now_ms: int) -> None:
        """A lease in debt repaid from what is available centrally, as a lease the ledger makes
        on its own (its sidecar takes it in by the running total leased, as any other)."""
        repaid = min(max(-lease.amount_nano, 0), max(s.available, 0))
        if repaid:
            self._draw(s, sidecar_id, lease, repaid, {})
            s.moved(lease.amount_nano, lease.amount_nano + repaid)
            self._exec("UPDATE meterd_leases SET amount_nano = amount_nano + ?, leased_total_nano = leased_total_nano "
                       "+ ?, updated_ms = ? WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ?",
                       (repaid, repaid, now_ms, sidecar_id, lease.customer_id, lease.credit_type))

    def _settle_debts(self, s: _Sums, customer_id: str, credit_type: str, now_ms: int) -> None:
        """Whenever credit may have become available (a grant, a give-back, a lease taken back):
        what was overdrawn is paid out of the buckets first, in burn-down order, then what leases
        owe, so that no credit is left to expire (or to be leased) while anything is owed."""
        if s.overdrawn and s.available + s.overdrawn > 0:
            def consumed(b: _Bucket, take: int) -> None:
                b.consumed += take
            # As much as the buckets hold; available (remaining less overdrawn) does not change.
            repaid = min(s.overdrawn, s.available + s.overdrawn)
            s.overdrawn -= self._take_remaining(s, customer_id, credit_type, repaid, consumed)
        if s.debts and s.available > 0:
            for r in self._rows(f"SELECT sidecar_id, {_LEASE} FROM meterd_leases WHERE customer_id = ? AND "
                                "credit_type = ? AND amount_nano < 0 ORDER BY sidecar_id" + self._lock,
                                (customer_id, credit_type)):
                self._repay(s, r[0], _lease(r[1:]), now_ms)

    def _own_lease(self, sidecar_id: str, incarnation: str, customer_id: str, credit_type: str, s: _Sums,
                   now_ms: int) -> Lease:
        """This sidecar's lease row, made when missing. A row left by an incarnation
        that was replaced is given back first (a replacement racing its lease call)."""
        # One statement: made when missing, and read (locked, in PostgreSQL, by the update).
        r, = self._rows(f"INSERT INTO meterd_leases (sidecar_id, {_LEASE}, acquisitions) VALUES "
                        "(?, ?, ?, ?, 0, 0, 0, 0, 0, 0, ?, 0, 0) ON CONFLICT (sidecar_id, customer_id, credit_type) "
                        f"DO UPDATE SET acquisitions = meterd_leases.acquisitions RETURNING {_LEASE}, acquisitions",
                        (sidecar_id, customer_id, credit_type, incarnation, now_ms))
        lease = _lease(r)
        if lease.incarnation != incarnation:
            self._take_back(s, sidecar_id, lease, now_ms)
            self._settle_debts(s, customer_id, credit_type, now_ms)
            self._exec("UPDATE meterd_leases SET incarnation = ?, amount_nano = 0, leased_total_nano = 0, "
                       "returned_total_nano = 0, consumed_total_nano = 0, degraded_total_nano = 0, recall_ms = 0 WHERE "
                       "sidecar_id = ? AND customer_id = ? AND credit_type = ?",
                       (incarnation, sidecar_id, customer_id, credit_type))
            lease = dataclasses.replace(lease, incarnation=incarnation, amount_nano=0, leased_total_nano=0,
                                        returned_total_nano=0, consumed_total_nano=0, degraded_total_nano=0,
                                        recall_ms=0)
        return lease

    def _move_parts(self, sidecar_id: str, lease: Lease, amount: int, from_end: bool,
                    book: Callable[[_Bucket, int], None], now_ms: int,
                    read: list[tuple[_Bucket, int]] | None = None) -> tuple[int, int]:
        """Move up to ``amount`` out of a lease's parts: from the front of the burn-down order
        (consumption) or from its end (give-backs); ``book`` says where each take goes in its bucket.
        Parts of grants that ended before the lease was last settled are what it spared for holds
        across the end: consumed last (new spending is the new credits') and given back first
        (expired). Returns what moved and the soonest expiry still to come of what the lease keeps
        (0: none)."""
        parts = self._parts(sidecar_id, lease.customer_id, lease.credit_type) if read is None else \
            sorted(read, key=lambda p: p[0].sort_key())
        spared: list[tuple[_Bucket, int]] = []
        if any(0 < b.expires_at_ms <= now_ms for b, _ in parts):
            (settled,), = self._rows("SELECT settled_ms FROM meterd_leases WHERE sidecar_id = ? AND customer_id = ? "
                                     "AND credit_type = ?", (sidecar_id, lease.customer_id, lease.credit_type))
            spared = [p for p in parts if 0 < p[0].expires_at_ms <= int(settled)]
            parts = [p for p in parts if not 0 < p[0].expires_at_ms <= int(settled)]
        order = spared + list(reversed(parts)) if from_end else parts + spared
        left, expiries = amount, []
        for b, part in order:
            take = min(left, part)
            if take:
                b.leased -= take
                book(b, take)
                left -= take
                self._put_bucket(lease.customer_id, lease.credit_type, b)
                self._put_part(sidecar_id, lease.customer_id, lease.credit_type, b.grant_id, part - take)
            if part > take and b.expires_at_ms > now_ms:
                expiries.append(b.expires_at_ms)
        return amount - left, min(expiries, default=0)

    def _give_back(self, s: _Sums, sidecar_id: str, lease: Lease, amount: int, now_ms: int) -> None:
        """Move ``amount`` out of a lease, from the end of the burn-down order:
        into its buckets' remaining, or expired for a bucket past its expiry (audited, but for a
        plan's period credits not rolled yet: their roll says what became of them)."""
        expired: list[tuple[_Bucket, int]] = []
        unaudited = 0

        def back(b: _Bucket, take: int) -> None:
            nonlocal unaudited
            if b.expired_at(now_ms):
                self._expire_part(s, b, take)
                if b.source == OVERAGE_SOURCE:
                    pass  # no credit: the balance shown does not move
                elif b.period_n == NO_PERIOD:
                    expired.append((b, take))
                else:
                    unaudited += take
            else:
                b.remaining += take
                s.available += take
        before = s.shown
        moved, expires = self._move_parts(sidecar_id, lease, amount, True, back, now_ms)
        invariant(moved == amount, f"lease {sidecar_id}/{lease.customer_id}/{lease.credit_type}: parts hold less "
                                   f"than its {lease.amount_nano}")
        s.leased -= amount
        before -= unaudited
        s.read_shown -= unaudited  # as in _expire: a period's credits, for its roll
        for b, take in expired:
            self._entry(s, lease.customer_id, lease.credit_type, "expired", "ledger", -take, before,
                        f"{b.grant_id} expired (given back by {sidecar_id})", now_ms, after=before - take)
            before -= take
        invariant(before == s.shown, "a give-back moves the balance by what of it expired")
        self._exec("UPDATE meterd_leases SET amount_nano = amount_nano - ?, recall_ms = 0, expires_at_ms = ?, "
                   "updated_ms = ? WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ?",
                   (amount, expires, now_ms, sidecar_id, lease.customer_id, lease.credit_type))

    def give_back(self, sidecar_id: str, incarnation: str, customer_id: str, credit_type: str,
                  returned_total_nano: int, now_ms: int, consumed_total_nano: int | None = None,
                  degraded_total_nano: int = -1) -> int:
        """A sidecar gives back part of a lease, named by the running total it has
        given back; returns what this call moved (0 for a repeat). An answer to a
        recall also settles what the sidecar has consumed (durably) so far, so that
        the lease holds exactly what it has free or on hold; the recall is answered."""
        with self.ledger._transaction():
            self._admit(sidecar_id, incarnation, now_ms)
            s = self._sums(customer_id, credit_type, False, now_ms)
            lease = self._lease(sidecar_id, customer_id, credit_type)
            if s is None or lease is None or lease.incarnation != incarnation:
                return 0
            if consumed_total_nano is not None:
                self._settle_one(s, sidecar_id, incarnation, Settlement(customer_id, credit_type, consumed_total_nano,
                                                                        degraded_total_nano), now_ms)
                lease = self._lease(sidecar_id, customer_id, credit_type)
                assert lease is not None  # for mypy: it was there a moment ago, under the lock
            # Settled as of now: a period that ended before now may be rolled as far as this lease goes.
            self._exec("UPDATE meterd_leases SET recall_ms = 0, settled_ms = CASE WHEN ? THEN ? ELSE settled_ms END "
                       "WHERE sidecar_id = ? AND customer_id = ? AND credit_type = ?",
                       (consumed_total_nano is not None, now_ms, sidecar_id, customer_id, credit_type))
            delta = returned_total_nano - lease.returned_total_nano
            if delta <= 0:
                self._put_sums(customer_id, credit_type, s, now_ms)
                return 0
            if delta > lease.amount_nano:
                raise LedgerError(f"lease {sidecar_id}/{customer_id}/{credit_type}: a return of {delta} is more than "
                                  f"the {lease.amount_nano} it holds")
            self._give_back(s, sidecar_id, lease, delta, now_ms)
            self._exec("UPDATE meterd_leases SET returned_total_nano = ? WHERE sidecar_id = ? AND customer_id = ? "
                       "AND credit_type = ?", (returned_total_nano, sidecar_id, customer_id, credit_type))
            self._settle_debts(s, customer_id, credit_type, now_ms)
            self._put_sums(customer_id, credit_type, s, now_ms)
        return delta

    def settle_flush(self, sidecar_id: str, incarnation: str, settlements: Iterable[Settlement], now_ms: int,
                     usage: Iterable[UsageRow] = ()) -> None:
        """Inside a flush's transaction (``Ledger.apply_flush``'s ``within``): the leases of a data
        directory this flush has taken the id over from come back, then the consumption is settled,
        then the flush's usage of gauge meters is noted for their central charge (last: a roll
        locks the balance rows before the gauge rows)."""
        self._release_leases(sidecar_id, now_ms, other_than=incarnation)
        self.settle(sidecar_id, incarnation, settlements, now_ms)
        self._note_gauges(list(usage), now_ms)

    def gauges_from(self, usage: Sequence[UsageRow] = (), now_ms: int = 0) -> int:
        """Where the ledger's charges of gauges begin (``meterd_gauges_from``): set by the first flush
        in ledger mode to the start of its calendar month (or of its earliest window's), read after.
        Windows of earlier months were flushed by local-mode sidecars, which charged them themselves."""
        if self._gauges_from is not None:
            return self._gauges_from
        rows = self._rows("SELECT from_ms FROM meterd_gauges_from WHERE one = 1")
        if rows:
            self._gauges_from = int(rows[0][0])  # kept once read committed: this transaction may not commit
            return self._gauges_from
        if not now_ms:
            return 0
        first = min([now_ms, *(r.window_start_ms for r in usage if r.aggregation in CENTRAL_GAUGES)])
        self._exec("INSERT INTO meterd_gauges_from (one, from_ms) VALUES (1, ?) ON CONFLICT (one) DO NOTHING",
                   (month_bounds(first)[0],))
        return int(self._rows("SELECT from_ms FROM meterd_gauges_from WHERE one = 1")[0][0])

    def _note_gauges(self, usage: Sequence[UsageRow], now_ms: int) -> None:
        """The earliest window flushed of each customer's gauge meter (max, unique_count), for
        ``LedgerPlans._gauges`` and its sweep (``gauges_due``), in code-point order: due at once
        if it is of windows charged already, else at the end of its month (and a grace). A gauge
        new to the ledger is charged from ``gauges_from`` (its months each at their end)."""
        start = self.gauges_from(usage, now_ms)
        first: dict[tuple[str, str], int] = {}
        for r in usage:
            if r.aggregation in CENTRAL_GAUGES:
                key = (r.customer_id, r.meter)
                first[key] = min(first.get(key, r.window_start_ms), r.window_start_ms)
        if not first:
            return
        keys = sorted(first.items(), key=lambda kv: (kv[0][0].encode(), kv[0][1].encode()))
        self.ledger._exec_many(
            "INSERT INTO meterd_gauges (customer_id, meter, charged_to_ms, last_from_ms, last_value, remainder, "
            "pending_from_ms, due_ms) VALUES (?, ?, ?, ?, 0, '0', ?, ?) ON CONFLICT (customer_id, meter) DO NOTHING",
            [(c, m, start, start, w, month_bounds(start)[1] + GAUGE_GRACE_MS) for (c, m), w in keys])
        least = "LEAST" if self.ledger.dialect == "postgresql" else "MIN"
        self.ledger._exec_many(
            f"UPDATE meterd_gauges SET pending_from_ms = {least}(pending_from_ms, ?), due_ms = {least}(due_ms, "
            "CASE WHEN ? < charged_to_ms THEN 0 ELSE ? END) WHERE customer_id = ? AND meter = ?",
            [(w, w, month_bounds(w)[1] + GAUGE_GRACE_MS, c, m) for (c, m), w in keys])

    def settle(self, sidecar_id: str, incarnation: str, settlements: Iterable[Settlement], now_ms: int) -> None:
        """Consumption of leases, up to running totals (again: nothing). A flush settles many at
        once: their balance rows (locked, in order), leases and parts are read a chunk at a time,
        and a settlement that changes nothing writes nothing."""
        todo = sorted(settlements, key=lambda x: (x.customer_id, x.credit_type))
        for i in range(0, len(todo), SETTLE_CHUNK):
            chunk = todo[i:i + SETTLE_CHUNK]
            sums, leases, parts = self._prefetch(sidecar_id, chunk)
            with self._holding_writes():
                self._settle_chunk(sidecar_id, incarnation, chunk, sums, leases, parts, now_ms)

    def _settle_chunk(self, sidecar_id: str, incarnation: str, chunk: list[Settlement],
                      sums: dict[tuple[str, str], _Sums], leases: dict[tuple[str, str], Lease],
                      parts: dict[tuple[str, str], list], now_ms: int) -> None:
        for st in chunk:
            key = (st.customer_id, st.credit_type)
            lease = leases.pop(key, None)
            s = sums.pop(key, None)
            if s is not None and lease is not None and lease.incarnation == incarnation and \
                    st.consumed_total_nano <= lease.consumed_total_nano and \
                    (st.degraded_total_nano < 0 or st.degraded_total_nano == lease.degraded_total_nano):
                continue  # settled already: a repeat
            if s is None:
                s = self._sums(st.customer_id, st.credit_type, True, now_ms)
                assert s is not None  # made when missing
            self._settle_one(s, sidecar_id, incarnation, st, now_ms, lease, parts.pop(key, []))
            self._put_sums(st.customer_id, st.credit_type, s, now_ms)

    def _prefetch(self, sidecar_id: str, chunk: list[Settlement]) -> tuple[dict[tuple[str, str], _Sums],
                                                                             dict[tuple[str, str], Lease],
                                                                             dict[tuple[str, str], list]]:
        """For settlements sorted by customer and credit type: their balance rows (locked in that
        order), this sidecar's leases of them (locked after: every writer of a lease row holds its
        customer's balance row first) and the leases' parts with their buckets, in three reads."""
        keys = sorted({(st.customer_id, st.credit_type) for st in chunk})
        pairs = ", ".join(["(?, ?)"] * len(keys))
        flat = [v for k in keys for v in k]
        sums = {(r[0], r[1]): _Sums(*(int(v) for v in r[2:])) for r in self._rows(
            f"SELECT customer_id, credit_type, {_SUMS_READ} FROM meterd_balances WHERE (customer_id, credit_type) "
            f"IN (VALUES {pairs}) ORDER BY {self._in_code_points}" + self._lock, flat)}
        leases = {(r[0], r[1]): _lease(r) for r in self._rows(
            f"SELECT {_LEASE} FROM meterd_leases WHERE sidecar_id = ? AND (customer_id, credit_type) IN "
            f"(VALUES {pairs}) ORDER BY {self._in_code_points}" + self._lock, [sidecar_id, *flat])}
        parts: dict[tuple[str, str], list] = {}
        for r in self._rows(f"SELECT p.customer_id, p.credit_type, p.amount_nano, {_PART_BUCKET} FROM "
                            "meterd_lease_parts p JOIN meterd_grants g ON g.customer_id = p.customer_id AND "
                            "g.credit_type = p.credit_type AND g.grant_id = p.grant_id WHERE p.sidecar_id = ? AND "
                            f"(p.customer_id, p.credit_type) IN (VALUES {pairs})", [sidecar_id, *flat]):
            parts.setdefault((r[0], r[1]), []).append((_bucket(r[3:]), int(r[2])))
        return sums, leases, parts

    def _owe(self, s: _Sums, customer_id: str, credit_type: str, b: _Bucket, amount: int) -> None:
        """``amount`` spent of an overage allowance ``b`` and not billed becomes what the customer
        owes (overdrawn): out of the bucket and its headroom, repaid first by the next credit
        (``_settle_debts``); the balance shown does not move."""
        b.amount -= amount
        b.consumed -= amount
        self._put_bucket(customer_id, credit_type, b)
        s.granted -= amount
        s.available -= amount
        s.overdrawn += amount
        s.headroom -= amount

    def _settle_one(self, s: _Sums, sidecar_id: str, incarnation: str, st: Settlement, now_ms: int,
                    read: Lease | None = None, parts: list[tuple[_Bucket, int]] | None = None) -> None:
        """A lease's consumption up to a running total (again: nothing). ``read``: its lease row and
        ``parts``, as read (locked) in this transaction, if they were."""
        if read is not None and read.incarnation == incarnation:
            lease = read
        else:
            lease = self._own_lease(sidecar_id, incarnation, st.customer_id, st.credit_type, s, now_ms)
            parts = None  # made, or taken over from a replaced incarnation: read again
        # A running total modulo 2^63 (it never saturates: a figure stuck at its cap would hide
        # every later period's fallback usage).
        degraded = (st.degraded_total_nano - lease.degraded_total_nano) % DEGRADED_WRAP
        if st.degraded_total_nano >= 0 and degraded > 0:  # fallback usage: counted, never charged
            s.degraded = min(s.degraded + degraded, INT64_MAX)
            self._exec("UPDATE meterd_leases SET degraded_total_nano = ? WHERE sidecar_id = ? AND customer_id = ? AND "
                       "credit_type = ?", (st.degraded_total_nano, sidecar_id, st.customer_id, st.credit_type))
            after_end = self._rows("SELECT 1 FROM meterd_subscriptions WHERE customer_id = ? AND plan = ''",
                                   (st.customer_id,))
            if after_end:  # after its subscription ended: for the sweep that audits it (ledger_plans.audit_ended)
                self._exec("INSERT INTO meterd_degraded_ended (customer_id, settled_ms) VALUES (?, ?) ON CONFLICT "
                           "(customer_id) DO NOTHING", (st.customer_id, now_ms))
        delta = st.consumed_total_nano - lease.consumed_total_nano
        if delta > 0:
            ended: list[tuple[_Bucket, int]] = []  # spent of an overage allowance whose period was closed

            def consumed(b: _Bucket, take: int) -> None:
                b.consumed += take
                if b.source == OVERAGE_SOURCE and b.period_n == NO_PERIOD:
                    ended.append((b, take))
            # Beyond its parts (an outage allowance spent), the lease goes into debt: in no bucket.
            _, expires = self._move_parts(sidecar_id, lease, delta, False, consumed, now_ms, parts)
            for b, take in ended:
                # A hold that outlived its period's allowance (and its subscription): owed, repaid
                # first by the next credit, as a balance below zero is in local mode.
                self._owe(s, st.customer_id, st.credit_type, b, take)
            s.leased -= delta
            s.consumed += delta
            s.moved(lease.amount_nano, lease.amount_nano - delta)
            self._exec(_SETTLED_LEASE, (delta, st.consumed_total_nano, expires, now_ms, sidecar_id, st.customer_id,
                        st.credit_type))
            if delta > lease.amount_nano or ended:  # owed: repaid at once from what is available, if any
                self._settle_debts(s, st.customer_id, st.credit_type, now_ms)
            if s.headroom and s.shown < 0:  # into a plan's overage: billed early once it owes the threshold
                (bill_at,), = self._rows("SELECT COALESCE(MAX(bill_at_nano), 0) FROM meterd_grants WHERE "
                                         "customer_id = ? AND credit_type = ? AND source = ? AND period_n >= 0",
                                         (st.customer_id, st.credit_type, OVERAGE_SOURCE))
                if int(bill_at) and -s.shown >= int(bill_at):  # for the sweep of early bills (ledger_plans)
                    self._exec("INSERT INTO meterd_overage_spent (customer_id, credit_type, spent_ms) VALUES "
                               "(?, ?, ?) ON CONFLICT (customer_id, credit_type) DO NOTHING",
                               (st.customer_id, st.credit_type, now_ms))

    def set_allowance(self, customer_id: str, credit_type: str, amount_nano: int, now_ms: int) -> int:
        """The customer's outage allowance of a credit type: what each sidecar may spend beyond its
        lease while it cannot reach the ledger (0: none, fail closed). Returns the one it replaces."""
        if not 0 <= amount_nano <= INT64_MAX:
            raise InvalidInput("amount_nano", f"{amount_nano} is not an allowance (0 up to 64 bits)")
        with self.ledger._transaction():
            s = self._sums(customer_id, credit_type, True, now_ms)
            assert s is not None  # made when missing
            self._exec("UPDATE meterd_balances SET outage_allowance_nano = ?, updated_ms = ? WHERE customer_id = ? "
                       "AND credit_type = ?", (amount_nano, now_ms, customer_id, credit_type))
            # Every sidecar with a lease of it hears at its next heartbeat (a new version each time).
            self._exec("UPDATE meterd_leases SET refresh_ms = CASE WHEN refresh_ms >= ? THEN refresh_ms + 1 ELSE ? "
                       "END WHERE customer_id = ? AND credit_type = ?", (now_ms, now_ms, customer_id, credit_type))
            self._entry(s, customer_id, credit_type, "allowance", "ledger", 0, s.shown,
                        f"outage allowance {s.allowance} -> {amount_nano}", now_ms)
            self._put_sums(customer_id, credit_type, s, now_ms)
        return s.allowance

    def settled_leases(self, sidecar_id: str, incarnation: str,
                       leases: list[tuple[str, str, int, int, int, int]]) -> list[bool]:
        """For each (customer, credit type, leased, given back, consumed, degraded) a sidecar holds: whether the
        ledger has exactly those running totals, and the lease holds nothing. Such a lease the sidecar
        can forget; the row stays here, and when the sidecar comes back to the customer its running
        totals go on from these. Such a lease has settled all it served in a fallback mode: no
        period roll waits for it any more (its short_ms is cleared)."""
        with self.ledger._transaction():
            out = []
            for cust, ct, leased, returned, consumed, degraded in leases:
                rows = self._rows("SELECT incarnation, amount_nano, leased_total_nano, returned_total_nano, "
                                  "consumed_total_nano, degraded_total_nano FROM meterd_leases WHERE sidecar_id = ? "
                                  "AND customer_id = ? AND credit_type = ?", (sidecar_id, cust, ct))
                out.append(bool(rows) and tuple(rows[0]) == (incarnation, 0, leased, returned, consumed, degraded))
                if out[-1]:
                    self._exec("UPDATE meterd_leases SET short_ms = 0 WHERE sidecar_id = ? AND customer_id = ? AND "
                               "credit_type = ? AND short_ms <> 0", (sidecar_id, cust, ct))
            return out

    def leases_of(self, sidecar_id: str) -> list[Lease]:
        return [_lease(r) for r in self._rows(
            f"SELECT {_LEASE} FROM meterd_leases WHERE sidecar_id = ? ORDER BY customer_id, credit_type",
            (sidecar_id,))]

    # ---- reads and the check -------------------------------------------------------------

    def balance(self, customer_id: str, now_ms: int) -> list[dict]:
        """Per credit type: the sums, the buckets with credit left, and the leases (a read, of one
        moment; expired credit is counted as available until the next transaction on the customer)."""
        with self._snapshot():
            return self._balance(customer_id)

    def _balance(self, customer_id: str) -> list[dict]:
        out = []
        for r in self._rows(f"SELECT credit_type, {_SUMS_READ}, updated_ms FROM meterd_balances WHERE "
                            "customer_id = ? ORDER BY credit_type", (customer_id,)):
            ct = r[0]
            s = _Sums(*(int(v) for v in r[1:SUMS_READ + 1]))
            buckets = [dataclasses.asdict(b) for b in self._buckets(customer_id, ct,
                                                                    "remaining_nano > 0 OR leased_nano > 0")]
            leases = [{"sidecar_id": row[0], "amount_nano": int(row[1]), "updated_ms": int(row[2])}
                      for row in self._rows("SELECT sidecar_id, amount_nano, updated_ms FROM meterd_leases WHERE "
                                            "customer_id = ? AND credit_type = ? AND amount_nano <> 0 ORDER BY "
                                            "sidecar_id", (customer_id, ct))]
            debts = sum(-lease["amount_nano"] for lease in leases if lease["amount_nano"] < 0)
            out.append({"credit_type": ct, "balance_nano": s.shown, "headroom_nano": s.headroom,
                        "granted_nano": s.granted,
                        "available_nano": s.available, "leased_nano": s.leased, "consumed_nano": s.consumed,
                        "expired_nano": s.expired, "overdrawn_nano": max(-s.shown, 0), "lease_debts_nano": debts,
                        "allowance_nano": s.allowance, "updated_ms": int(r[SUMS_READ + 1]), "buckets": buckets,
                        "leases": leases})
        return out

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Reads that see one moment of a ledger that sidecars keep changing (one read transaction)."""
        self._exec("BEGIN" if self.ledger.dialect == "sqlite" else
                   "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        try:
            yield
        finally:
            self._exec("ROLLBACK")

    def check(self) -> list[str]:
        """Every way the ledger's escrow figures can disagree, as sentences; [] when they all hold.
        Read in one transaction: a check of a live ledger sees one moment of it."""
        with self._snapshot():
            return self._check()

    def _check(self) -> list[str]:
        problems: list[str] = []
        sums = {(r[0], r[1]): _Sums(*(int(v) for v in r[2:])) for r in
                self._rows(f"SELECT customer_id, credit_type, {_SUMS_READ} FROM meterd_balances")}
        buckets = {(r[0], r[1]): [int(v or 0) for v in r[2:]] for r in self._rows(
            "SELECT customer_id, credit_type, SUM(amount_nano), SUM(remaining_nano), SUM(leased_nano), "
            "SUM(consumed_nano), SUM(expired_nano) FROM meterd_grants GROUP BY customer_id, credit_type")}
        leases = {(r[0], r[1]): (int(r[2] or 0), int(r[3] or 0)) for r in self._rows(
            "SELECT customer_id, credit_type, SUM(amount_nano), SUM(CASE WHEN amount_nano < 0 THEN -amount_nano "
            "ELSE 0 END) FROM meterd_leases GROUP BY customer_id, credit_type")}
        parts = {(r[0], r[1]): int(r[2] or 0) for r in self._rows(
            "SELECT customer_id, credit_type, SUM(amount_nano) FROM meterd_lease_parts "
            "GROUP BY customer_id, credit_type")}
        rooms = {(r[0], r[1]): int(r[2] or 0) for r in self._rows(
            "SELECT customer_id, credit_type, SUM(amount_nano - expired_nano) FROM meterd_grants WHERE source = ? "
            "GROUP BY customer_id, credit_type", (OVERAGE_SOURCE,))}
        for key in sorted(set(sums) | set(buckets) | set(leases) | set(parts)):
            name = f"{key[0]}/{key[1]}"
            s = sums.get(key)
            if s is None:
                problems.append(f"{name}: buckets or leases without a balance row")
                continue
            if s.granted != s.available + s.leased + s.consumed + s.expired:
                problems.append(f"{name}: granted {s.granted} != available {s.available} + leased {s.leased} + "
                                f"consumed {s.consumed} + expired {s.expired}")
            amount, remaining, leased, consumed, expired = buckets.get(key, [0, 0, 0, 0, 0])
            held, debts = leases.get(key, (0, 0))  # debts: spent beyond leases, in no bucket
            expect = {"granted": (s.granted, amount), "available": (s.available, remaining - s.overdrawn),
                      "leased": (s.leased, leased - debts), "consumed": (s.consumed, consumed + s.overdrawn + debts),
                      "expired": (s.expired, expired)}
            for what, (have, want) in expect.items():
                if have != want:
                    problems.append(f"{name}: {what} {have}, but its buckets add up to {want}")
            if held != s.leased:
                problems.append(f"{name}: leased {s.leased}, but its leases hold {held}")
            if debts != s.debts:
                problems.append(f"{name}: leases owe {s.debts}, but their debts add up to {debts}")
            if s.available > 0 and (s.overdrawn or s.debts):
                problems.append(f"{name}: {s.available} available while {s.overdrawn} is overdrawn and leases owe "
                                f"{s.debts}")
            if parts.get(key, 0) != s.leased + debts:
                problems.append(f"{name}: leases hold {s.leased + debts} (debts aside), but their parts hold "
                                f"{parts.get(key, 0)}")
            if s.overdrawn < 0:
                problems.append(f"{name}: overdrawn {s.overdrawn} is negative")
            if not 0 <= s.headroom <= rooms.get(key, 0):
                problems.append(f"{name}: overage headroom {s.headroom}, not within 0 and the {rooms.get(key, 0)} its "
                                "allowances hold")
        for r in self._rows("SELECT sidecar_id, customer_id, credit_type, amount_nano, leased_total_nano, "
                            "returned_total_nano, consumed_total_nano FROM meterd_leases WHERE amount_nano <> "
                            "leased_total_nano - returned_total_nano - consumed_total_nano"):
            problems.append(f"lease {r[0]}/{r[1]}/{r[2]}: holds {r[3]}, not what was leased ({r[4]}) less what "
                            f"came back ({r[5]}) and was consumed ({r[6]})")
        for r in self._rows("SELECT l.sidecar_id, l.customer_id, l.credit_type, l.amount_nano FROM meterd_leases l "
                            "WHERE l.amount_nano < 0 AND EXISTS (SELECT 1 FROM meterd_lease_parts p WHERE "
                            "p.sidecar_id = l.sidecar_id AND p.customer_id = l.customer_id AND "
                            "p.credit_type = l.credit_type)"):
            problems.append(f"lease {r[0]}/{r[1]}/{r[2]}: in debt ({r[3]}) but holds parts of grants")
        return problems

    def totals(self) -> dict[str, int]:
        """Ledger-wide sums of the escrow figures (for `meterd ledger check`)."""
        with self._snapshot():
            return self._totals()

    def _totals(self) -> dict[str, int]:
        r = self._rows("SELECT COUNT(*), COALESCE(SUM(granted_nano), 0), COALESCE(SUM(available_nano), 0), "
                       "COALESCE(SUM(leased_nano), 0), COALESCE(SUM(consumed_nano), 0), "
                       "COALESCE(SUM(expired_nano), 0) FROM meterd_balances")[0]
        (n_leases,), = self._rows("SELECT COUNT(*) FROM meterd_leases WHERE amount_nano <> 0")
        return {"balances": int(r[0]), "granted_nano": int(r[1]), "available_nano": int(r[2]),
                "leased_nano": int(r[3]), "consumed_nano": int(r[4]), "expired_nano": int(r[5]),
                "leases": int(n_leases)}


__all__ = ["Escrow", "Granted", "Heartbeat", "Lease", "LeaseGrant", "Settlement", "lease_size", "ADJUST_PRIORITY"]
