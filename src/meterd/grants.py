"""Grant buckets: where a customer's credits came from, in the order they are
spent (priority, then soonest expiry, then oldest), and each credit or debit
of a balance outside usage, audited.

The core holds one balance per customer and credit type; the buckets say how
it splits into grants. Usage is not booked against buckets as it happens: the
split is worked out from the balance when it is next needed (``reconcile``).

This is also the **balance authority** of a sidecar whose balances are its own
(``balances = "local"``): every credit that makes money spendable here goes
through ``credit_ops`` and ``add_bucket``. A sidecar spending a slice leased
from the central ledger replaces this component with one whose grants and
adjustments commit centrally and whose ``credit_ops`` moves lease amounts.
"""

from __future__ import annotations

import heapq
import json
from typing import Any, Callable

from meterd import records
from meterd.audit import Audit
from meterd.catalog import Catalog, step_nano
from meterd.clock import Clock
from meterd.errors import InvalidInput
from meterd.journal import Journal
from meterd.ledger import is_pool
from meterd.records import Kind
from meterd.state import HELD, Account, Accounts, Bucket, Live
from meterd.store import Op, Store, from_u64, u64
from meterd.validate import NAME_ECHO_CHARS

ADJUST_PRIORITY = 1_000_000  # credits added by Adjust are spent after every grant
SOURCE_CHARS_MAX = 64        # a grant's source label
REASON_CHARS_MAX = 256       # an adjustment's reason

# Called with (customer, credit type, balance after) when a credit lands; returns the ops it adds.
Credited = Callable[[str, int, int], list[Op]]


class Grants:
    def __init__(self, store: Store, live: Live, journal: Journal, audit: Audit, clock: Clock) -> None:
        self.store = store
        self.live = live
        self.journal = journal
        self.audit = audit
        self.clock = clock
        self.accounts = Accounts(self.load_buckets)
        self.seq = 0  # the last grant id handed out
        self.expiry: list[tuple[int, str, int]] = []  # (expires_ms, customer, credit type), soonest first
        self.credited: list[Credited] = []  # told of each credit that lands (a plan re-arms its top-up)

    # ---- state -------------------------------------------------------------------------

    def load(self) -> None:
        self.accounts = Accounts(self.load_buckets)  # grant buckets are read when first needed
        # The index is stamped with the grant sequence it covers: a data directory that an older
        # meterd (without the index) has granted in since is indexed again.
        if self.store.get("meta", b"grant_expiry_index") != (self.store.get("meta", b"grant_seq") or u64(0)):
            self._build_expiry_index()
        self.seq = from_u64(self.store.get("meta", b"grant_seq") or u64(0))

    def load_buckets(self, customer_id: str) -> Account | None:
        """A customer's grant buckets as LMDB has them (in key order), or None when there are none."""
        rows = self.store.items("grants", prefix=customer_id.encode() + b"\x00")
        if not rows:
            return None
        acct = Account()
        for key, value in rows:
            _, ct_name, gid = key.decode().split("\x00")
            ct = self.live.catalog.credit_index.get(ct_name)
            if ct is None:
                continue
            doc = json.loads(value)
            acct.buckets.setdefault(ct, []).append(Bucket(gid, doc["remaining_nano"], doc["expires_at_ms"],
                                                          doc["priority"], doc["source"], doc["order"],
                                                          doc.get("rollovers", 0)))
        return acct if acct.buckets else None

    def _build_expiry_index(self) -> None:
        """Once, for a data directory from before the index: every grant that expires, by when."""
        ops: list[Op] = []
        for key, value in self.store.items("grants"):
            expires = json.loads(value)["expires_at_ms"]
            if expires:
                ops.append(("grant_expiry", u64(expires) + key, b""))
        ops.append(("meta", b"grant_expiry_index", self.store.get("meta", b"grant_seq") or u64(0)))
        self.store.write_now(ops)

    def index_expiries(self) -> None:
        """When grants expire: from their index in LMDB (what is committed) and the buckets in memory."""
        due: set[tuple[int, str, int]] = set()
        credit_index = self.live.catalog.credit_index

        def index(rows: Any) -> None:
            for key, _ in rows:
                cust, ct_name, _gid = key[8:].decode().split("\x00")
                ct = credit_index.get(ct_name)
                if ct is not None:
                    due.add((from_u64(key[:8]), cust, ct))

        self.store.scan("grant_expiry", index)
        due.update((b.expires_at_ms, cust, ct) for cust, a in self.accounts.loaded()
                   for ct, bs in a.buckets.items() for b in bs if b.expires_at_ms)
        self.expiry = sorted(due)

    def rename(self, old: Catalog, new: Catalog) -> None:
        """A catalog reload: the loaded buckets move to the new catalog's credit type numbers."""
        buckets = {cust: {old.credit_types[ct].name: bs for ct, bs in a.buckets.items()}
                   for cust, a in self.accounts.loaded()}
        self.accounts = Accounts(self.load_buckets)  # the others are read under the new catalog's names
        for cust, by_name in buckets.items():
            self.accounts[cust] = Account({new.credit_index[name]: bs for name, bs in by_name.items()
                                           if name in new.credit_index})

    # ---- the split of a balance into buckets -------------------------------------------

    @staticmethod
    def allocated(buckets: list[Bucket], balance: int) -> list[Bucket]:
        """Buckets with what has been spent since their last update drawn from
        them in spending order (priority, then soonest expiry, then oldest).
        Credits spared for open holds (source "held") are not drawn: only the
        settlement of those holds spends them (``Holds.spared_ops``)."""
        held = [b for b in buckets if b.source == HELD]
        spendable = [b for b in buckets if b.source != HELD]
        spent = sum(b.remaining_nano for b in spendable) - max(balance - sum(b.remaining_nano for b in held), 0)
        out = list(held)
        for b in sorted(spendable, key=Bucket.sort_key):
            take = min(max(spent, 0), b.remaining_nano)
            spent -= take
            out.append(Bucket(b.grant_id, b.remaining_nano - take, b.expires_at_ms, b.priority, b.source, b.order,
                              b.rollovers))
        return out

    def balance_of(self, customer_id: str, ct: int) -> int:
        return self.live.core.state(self.live.core.account(customer_id.encode()))[0][ct][0]

    def reconcile(self, customer_id: str, ct: int, balance: int | None = None) -> list[Op]:
        """Bring the buckets in line with the balance (the core's, unless given)."""
        if balance is None:
            balance = self.balance_of(customer_id, ct)
        acct = self.accounts.setdefault(customer_id, Account())
        buckets = self.allocated(acct.buckets.get(ct, []), balance)
        acct.buckets[ct] = [b for b in buckets if b.remaining_nano > 0]
        ops: list[Op] = []
        for b in buckets:
            ops += self.row_ops(customer_id, ct, b, b.remaining_nano > 0)
        return ops

    def row_ops(self, customer_id: str, ct: int, b: Bucket, keep: bool) -> list[Op]:
        """Write a bucket's row, or delete it and its entry in the expiry index."""
        key = self.key(customer_id, ct, b.grant_id)
        if keep:
            return [("grants", key, _doc(b))]
        if b.expires_at_ms:
            return [("grants", key, None), ("grant_expiry", u64(b.expires_at_ms) + key, None)]
        return [("grants", key, None)]

    def key(self, customer_id: str, ct: int, grant_id: str) -> bytes:
        return f"{customer_id}\x00{self.live.catalog.credit_types[ct].name}\x00{grant_id}".encode()

    # ---- credits -----------------------------------------------------------------------

    def credit_ops(self, customer_id: str, ct: int, amount: int) -> tuple[list[Op], int, int]:
        """Apply a signed credit in the core; returns the log op and the balances around it."""
        core = self.live.core
        cust = customer_id.encode()
        idx = core.open_account(cust)
        before = core.state(idx)[0][ct][0]
        after = core.credit(idx, ct, amount)
        return [self.journal.log_op(records.account(Kind.CREDIT, cust, ct, amount, self.clock.now_ms()))], \
            before, after

    def debit_ops(self, customer_id: str, ct: int, amount: int, kind: str, reference: str) -> list[Op]:
        """Take ``amount`` away (an expiry, a forfeit), audited."""
        credit, before, after = self.credit_ops(customer_id, ct, -amount)
        return credit + self.audit.entry_ops(customer_id, kind, ct, -amount, before, after, reference)

    def grant_ops(self, customer_id: str, ct: int, amount: int, expires_at_ms: int, priority: int,
                  source: str, reference: str) -> tuple[list[Op], str]:
        return self.add_bucket(customer_id, ct, amount, expires_at_ms, priority, source, credit=True,
                               reference=reference)

    def add_bucket(self, customer_id: str, ct: int, amount: int, expires_at_ms: int, priority: int, source: str,
                   credit: bool, rollovers: int = 0, kind: str = "grant", reference: str = "") -> tuple[list[Op], str]:
        """A new grant bucket; with ``credit`` its amount is also added to the balance (and audited)."""
        self.live.core.open_account(customer_id.encode())
        ops = self.reconcile(customer_id, ct)
        self.seq += 1
        gid = f"g_{self.seq}"
        if credit:
            credit_ops, before, after = self.credit_ops(customer_id, ct, amount)
            ops += credit_ops
            if kind == "grant" and source in ("refund", "adjust"):
                kind = source  # a refund, or a positive manual adjustment, is its own kind in the audit trail
            ops += self.audit.entry_ops(customer_id, kind, ct, amount, before, after,
                                        f"{gid} {source} {reference}".strip(), source=source)
            for told in self.credited:
                ops += told(customer_id, ct, after)
        bucket = Bucket(gid, amount, expires_at_ms, priority, source, self.seq, rollovers)
        if expires_at_ms:
            heapq.heappush(self.expiry, (expires_at_ms, customer_id, ct))
        self.accounts.setdefault(customer_id, Account()).buckets.setdefault(ct, []).append(bucket)
        ops += self.row_ops(customer_id, ct, bucket, True)
        if expires_at_ms:
            ops.append(("grant_expiry", u64(expires_at_ms) + self.key(customer_id, ct, gid), b""))
        ops.append(("meta", b"grant_seq", u64(self.seq)))
        ops.append(("meta", b"grant_expiry_index", u64(self.seq)))  # the index covers this grant too
        return ops, gid

    def remove_bucket(self, customer_id: str, ct: int, b: Bucket) -> list[Op]:
        buckets = self.accounts[customer_id].buckets.get(ct, [])
        if b in buckets:
            buckets.remove(b)
        return self.row_ops(customer_id, ct, b, False)

    def adjust_ops(self, customer_id: str, ct: int, amount: int, reason: str) -> tuple[list[Op], int]:
        """A manual adjustment: a credit is a bucket spent after every grant; a debit
        comes off the buckets in spending order. Returns the balance after it."""
        if amount > 0:
            ops, _ = self.grant_ops(customer_id, ct, amount, 0, ADJUST_PRIORITY, "adjust", reason)
            return ops, self.balance_of(customer_id, ct)
        self.live.core.open_account(customer_id.encode())
        ops = self.reconcile(customer_id, ct)
        credit, before, after = self.credit_ops(customer_id, ct, amount)
        ops += credit + self.reconcile(customer_id, ct, after)
        ops += self.audit.entry_ops(customer_id, "adjust", ct, amount, before, after, reason, source="adjust")
        return ops, after

    # ---- checks of Admin input ----------------------------------------------------------

    def credit_type(self, name: str, amount_nano: int) -> int:
        catalog = self.live.catalog
        ct = catalog.credit_index.get(name)
        if ct is None or is_pool(name):  # a pool of a plan's free units (ledger mode): the plan's, granted by it
            raise InvalidInput("credit_type", f"unknown credit type {name[:NAME_ECHO_CHARS]!r}")
        credit = catalog.credit_types[ct]
        if amount_nano % step_nano(credit):
            raise InvalidInput("amount_nano", f"{credit.name} is granted in steps of {step_nano(credit)} nano "
                               f"({credit.decimals} decimals)")
        return ct

    def check_grant(self, amount_nano: int, expires_at_ms: int, source: str) -> None:
        if amount_nano <= 0:
            raise InvalidInput("amount_nano", "must be positive")
        if expires_at_ms < 0 or (expires_at_ms and expires_at_ms <= self.clock.now_ms()):
            raise InvalidInput("expires_at_ms", "must be 0 (never) or in the future")
        if len(source) > SOURCE_CHARS_MAX:
            raise InvalidInput("source", f"longer than {SOURCE_CHARS_MAX} characters")

    @staticmethod
    def check_adjust(amount_nano: int, reason: str) -> None:
        if amount_nano == 0:
            raise InvalidInput("amount_nano", "must not be zero")
        Grants.check_reason(reason)

    @staticmethod
    def check_reason(reason: str) -> None:
        """A manual change's reason, for the audit trail."""
        if not reason.strip():
            raise InvalidInput("reason", "is required for a manual change (the audit trail says why)")
        if len(reason) > REASON_CHARS_MAX:
            raise InvalidInput("reason", f"longer than {REASON_CHARS_MAX} characters")


def _doc(b: Bucket) -> bytes:
    return json.dumps({"remaining_nano": b.remaining_nano, "expires_at_ms": b.expires_at_ms,
                       "priority": b.priority, "source": b.source, "order": b.order,
                       "rollovers": b.rollovers}).encode()
