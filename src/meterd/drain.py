"""Usage aggregates taken from the core, encoded as LMDB rows.

The core aggregates allowed usage per (customer, meter, dimension set, window)
in memory. Every snapshot moves those aggregates into the LMDB ``usage``
database in the same commit that trims the log they came from, so each event
is either in the log (and re-aggregated by replay after a crash) or in an
aggregate row, never both and never neither. What a snapshot took from the
core but could not commit is carried into the next one.
"""

from __future__ import annotations

import json
import struct

from meterd.audit import Audit
from meterd.catalog import CompiledCatalog
from meterd.ledger import Entry, Settlement, UsageRow, canonical_dimensions
from meterd.store import Op, Store, from_u64, u64
from meterd.v1 import admin_pb2, meter_pb2

AGGREGATIONS = ("sum", "count", "max", "latest", "unique_count")
INT64_MAX = (1 << 63) - 1


# An aggregate row in LMDB: five names separated by NUL (ids and names cannot hold
# one), then precision, window, quantity, cost and events.
_ROW = struct.Struct("<iqqqq")
# A deduction in the outbox (its sequence is the key): "D", time, amount, balance
# after, then the customer, credit type and reference separated by NUL. A lease's
# settlement (ledger mode) starts with "W" (or "S", written by earlier versions).
# Other outbox values are AuditEntry messages, which never start with any of these
# (as a protobuf tag, each is an invalid or deprecated wire type).
_DEDUCTED = struct.Struct("<qqq")
_TOTALS = struct.Struct("<qq")  # a settlement's running totals: consumed, degraded


class Drained:
    """The core's aggregates encoded for LMDB, and what they cost per customer and credit type."""

    __slots__ = ("rows", "spent", "usage_ops", "deducted")

    def __init__(self) -> None:
        self.rows: list[bytes] = []
        self.spent: dict[tuple[str, str], list[int]] = {}  # (customer, credit type) -> [cost, balance after]
        self.usage_ops: list[Op] = []
        self.deducted: list[bytes] = []

    def add(self, taken: list[tuple], catalog: CompiledCatalog) -> None:
        """Name the aggregates by the catalog they were made under; no per-row objects on the event loop."""
        dims_text: dict[bytes, str] = {}  # few dimension sets are shared by many rows
        names, cts, precisions, specs = catalog.meter_names, catalog.credit_types, catalog.precisions, catalog.meters
        pack, rows, spent = _ROW.pack, self.rows, self.spent
        for cust, meter, dims, window, qty, cost, events, balance in taken:
            text = dims_text.get(dims)
            if text is None:
                decoded = dict(meter_pb2.UsageEvent.FromString(dims).dimensions) if dims else {}
                text = dims_text[dims] = canonical_dimensions(decoded)
            spec = specs[meter]
            customer, ct = cust.decode(), cts[spec[1]]
            head = b"\x00".join((cust, names[meter].encode(), text.encode(), ct.encode(),
                                 AGGREGATIONS[spec[4]].encode()))
            total = cost
            while qty > INT64_MAX or cost > INT64_MAX:  # a 128-bit aggregate goes as several rows
                part_q, part_c = min(qty, INT64_MAX), min(cost, INT64_MAX)
                rows.append(head + pack(precisions[meter], window, part_q, part_c, 0))
                qty, cost = qty - part_q, cost - part_c
            rows.append(head + pack(precisions[meter], window, qty, cost, events))
            if total or (customer, ct) in spent:
                s = spent.get((customer, ct))
                if s is None:
                    spent[(customer, ct)] = [total, balance]
                else:
                    s[0] += total
                    s[1] = balance  # the latest balance

    def finish(self, drain_seq: int, at_ms: int, sidecar_id: str) -> None:
        """The LMDB ops of the rows under drain ``drain_seq``, and one deduction per
        customer and credit type (their outbox sequences are given on the loop)."""
        prefix = u64(drain_seq)
        self.usage_ops = [("usage", prefix + i.to_bytes(4, "big"), v) for i, v in enumerate(self.rows)]
        reference = f"usage {sidecar_id}/{drain_seq}"
        self.deducted = [_deducted(at_ms, customer, ct, cost, after, reference)
                         for (customer, ct), (cost, after) in sorted(self.spent.items())]

    def extend(self, other: "Drained") -> None:
        """Add what was drained after this."""
        self.rows += other.rows
        for key, (cost, balance) in other.spent.items():
            s = self.spent.setdefault(key, [0, balance])
            s[0] += cost
            s[1] = balance


def row_of(value: bytes) -> UsageRow:
    cust, meter, dims, ct, agg = value[:-_ROW.size].decode().split("\x00")
    precision, window, qty, cost, events = _ROW.unpack_from(value, len(value) - _ROW.size)
    return UsageRow(cust, meter, dims, window, ct, agg, precision, qty, cost, events)


def _deducted(at_ms: int, customer: str, ct: str, cost: int, after: int, reference: str) -> bytes:
    return b"D" + _DEDUCTED.pack(at_ms, -cost, after) + "\x00".join((customer, ct, reference)).encode()


def settlement_value(customer_id: str, credit_type: str, consumed_total_nano: int, degraded_total_nano: int) -> bytes:
    """An outbox row of a lease's consumption (ledger mode): "W", the running totals of what was
    consumed and of what was served in a plan's fallback mode, the customer and credit type."""
    return b"W" + _TOTALS.pack(consumed_total_nano, degraded_total_nano) + f"{customer_id}\x00{credit_type}".encode()


def settlement_of(value: bytes) -> Settlement | None:
    """The settlement an outbox row holds, or None when it holds an audit entry or a deduction.
    Rows of kind "S" (written before fallback usage was settled) hold the consumption only."""
    if value[:1] == b"S":
        customer, ct = value[9:].decode().split("\x00")
        return Settlement(customer, ct, struct.unpack_from("<q", value, 1)[0])
    if value[:1] != b"W":
        return None
    consumed, degraded = _TOTALS.unpack_from(value, 1)
    customer, ct = value[1 + _TOTALS.size:].decode().split("\x00")
    return Settlement(customer, ct, consumed, degraded)


def entry_of(key: bytes, value: bytes) -> Entry:
    if value[:1] == b"D":
        seq = from_u64(key)
        at, amount, after = _DEDUCTED.unpack_from(value, 1)
        customer, ct, reference = value[1 + _DEDUCTED.size:].decode().split("\x00")
        return Entry(seq, at, at, customer, "deducted", "usage", ct, amount, after - amount, after, reference)
    e = admin_pb2.AuditEntry.FromString(value)
    detail: dict = {}
    if e.tiers:
        detail["tiers"] = [{"tier": t.tier, "units_nano": t.units_nano, "unit_price": t.unit_price,
                            "charge_nano": t.charge_nano} for t in e.tiers]
    if e.period_end_ms:
        detail["period_end_ms"] = e.period_end_ms
    if e.meter:
        detail.update(meter=e.meter, quantity=e.quantity)
    return Entry(e.sequence, e.time_ms, e.effective_ms or e.time_ms, e.customer_id, e.kind, e.source,
                 e.credit_type, e.amount_nano, e.balance_before_nano, e.balance_after_nano, e.reference,
                 e.charge_nano, e.charge_credit_type, json.dumps(detail) if detail else "{}")


class Drains:
    """What snapshots have taken from the core: the drain sequence, and the
    aggregates of a snapshot in progress or of one that failed (carried)."""

    def __init__(self, store: Store, audit: Audit) -> None:
        self.store = store
        self.audit = audit
        self.seq = 0
        self.generation = 0  # counts recoveries: a drain of an older generation was rebuilt by replay
        self._carry = Drained()
        self.draining = Drained()  # set by ops(): what the snapshot in progress takes from the core
        self.sidecar_id = ""   # whose usage deductions these are (set by the flusher at each recovery)

    def load(self) -> None:
        """After a recovery from disk: replay has rebuilt what was carried."""
        self.generation += 1
        self._carry = Drained()
        self.seq = from_u64(self.store.get("meta", b"drain_seq") or u64(0))

    def carry(self, drained: Drained) -> None:
        """Aggregates taken from a core that is being replaced, named by their catalog: they go first next."""
        self._carry.extend(drained)

    def take_carry(self) -> Drained:
        """Aggregates an earlier snapshot could not commit: they go first in the next one."""
        carry, self._carry = self._carry, Drained()
        return carry

    def ops(self, drained: Drained, drain_seq: int) -> list[Op]:
        """The ops of a finished drain; outbox sequences are given here, in order."""
        self.draining = drained
        if not drained.rows:
            return []
        self.seq = drain_seq
        return drained.usage_ops + [("meta", b"drain_seq", u64(drain_seq))] + self.audit.outbox_ops(drained.deducted)

    def keep(self, carry: Drained, taken: list[tuple], catalog: CompiledCatalog) -> None:
        """A snapshot took aggregates from the core and failed before it had ops for them."""
        self.draining = Drained()
        self.draining.extend(carry)
        self.draining.add(taken, catalog)

    def failed(self, generation: int) -> None:
        """A snapshot that took the core's aggregates did not commit: keep them
        for the next one, unless state was reloaded from disk meanwhile (then
        replay has rebuilt them)."""
        if generation == self.generation:
            self.draining.extend(self._carry)
            self._carry = self.draining
        self.draining = Drained()

    def done(self) -> None:
        self.draining = Drained()
