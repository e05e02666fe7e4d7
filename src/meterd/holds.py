"""Open holds: the reservations made by Authorize and the sessions' held
intervals, with their per-tenant bounds, and the credits of an ended period
spared for them.

At a period boundary, the expiring credits that open holds stand on are not
forfeited under them: each hold is given its share (``spared_nano``), kept in
a bucket of source "held" that nothing else may spend. When the hold settles,
in the same commit, its cost is paid from that share first and the rest of the
share is forfeited, as the ended period's rules say: the new period never gets
to spend it, and its own usage is never paid with it.
"""

from __future__ import annotations

import collections
import heapq
import json
from typing import Any

from meterd import validate
from meterd.answers import AnswerStore
from meterd.catalog import CompiledCatalog
from meterd.config import Settings
from meterd.errors import ConfigError, LimitReached
from meterd.grants import Grants
from meterd.state import HELD, Bucket, Live, Reservation, Session
from meterd.store import Op, Store


class Holds:
    def __init__(self, settings: Settings, store: Store, live: Live, grants: Grants, settled: AnswerStore,
                 tenants: bool) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.grants = grants
        self.settled = settled
        self.tenants = tenants  # per-tenant quotas apply
        self.reservations: dict[str, Reservation] = {}
        self.reservations_of: collections.Counter[str] = collections.Counter()  # open, per tenant label
        self.reservation_expiry: list[tuple[int, str]] = []  # (expires_ms, id), soonest first
        self.sessions: dict[str, Session] = {}
        self.sessions_of: collections.Counter[str] = collections.Counter()

    # ---- state -------------------------------------------------------------------------

    def load(self, was: CompiledCatalog | None = None) -> None:
        """The open holds; ``was`` is the catalog the data directory was written under."""
        self.reservations = {}
        for key, value in self.store.items("reservations"):
            self.load_reservation(key.decode(), json.loads(value))
        self.reservations_of = collections.Counter(r.tenant for r in self.reservations.values())
        self.sessions = {key.decode(): self._load_session(json.loads(value), was)
                         for key, value in self.store.items("sessions")}
        self.sessions_of = collections.Counter(s.tenant for s in self.sessions.values())
        self.index_expiries()

    def _load_session(self, doc: dict, was: CompiledCatalog | None) -> Session:
        """A session, its meter and credit type found by name in the catalog of now."""
        catalog = self.live.catalog
        meter = doc.pop("meter_name", None) or (was.meter_names[doc["meter"]] if was else None)
        credit = doc.pop("credit_type_name", None) or (was.credit_types[doc["credit_type"]] if was else None)
        if meter is not None:
            if meter not in catalog.meter_index or credit not in catalog.credit_index:
                raise ConfigError(f"{catalog.source}: meters: {meter} (in {credit}) has open sessions (session "
                                  f"{doc['session_id']!r}); start with a catalog that has both, end them, then "
                                  "remove it")
            doc["meter"], doc["credit_type"] = catalog.meter_index[meter], catalog.credit_index[credit]
        return Session(**doc)

    def index_expiries(self) -> None:
        self.reservation_expiry = [(r.expires_at_ms, rid) for rid, r in self.reservations.items()]
        heapq.heapify(self.reservation_expiry)

    def load_reservation(self, rid: str, doc: dict) -> None:
        """A reservation, its meters found by name; one whose meters do not all have a price
        now has none (rate -1): it can be released, not committed."""
        catalog = self.live.catalog
        ct = catalog.credit_index.get(doc["credit_type"])
        dims = None if doc.get("dims") is None else bytes.fromhex(doc["dims"])
        parts = []
        names = (doc["meter"], *doc.get("more_meters", []))
        for name in names:
            meter = catalog.meter_index.get(name)
            rate = -1 if meter is None or ct is None else validate.held_rate(self.live, meter, ct, dims,
                                                                                doc["dim_value"])
            parts.append((-1 if meter is None else meter, rate))
        if any(rate < 0 for _, rate in parts):
            parts = [(meter, -1) for meter, _ in parts]
        self.reservations[rid] = Reservation(rid, doc["customer_id"], -1 if ct is None else ct,
                                             parts[0][0], doc["dim_value"], parts[0][1],
                                             doc["amount_nano"], doc["expires_at_ms"], doc.get("tenant", ""),
                                             doc.get("spared_nano", 0), dims, tuple(parts[1:]), names,
                                             doc["credit_type"])

    def rename(self, old: Any, new: Any) -> None:
        """A catalog reload: holds move to the new catalog's numbers (``check_reload`` made sure they exist)."""
        docs = {rid: json.loads(r.to_json(old)) for rid, r in self.reservations.items()}
        self.reservations = {}
        for rid, doc in docs.items():
            self.load_reservation(rid, doc)
        for s in self.sessions.values():
            s.meter = new.meter_index[old.meters[s.meter].name]
            s.credit_type = new.credit_index[old.credit_types[s.credit_type].name]
        self.index_expiries()

    # ---- the tables and their bounds ---------------------------------------------------

    def open_room(self, table: str, label: str) -> None:
        """A new reservation or session (``table``) needs a place in its table, the daemon's
        and its tenant's share of it, and one for the final answer it will leave."""
        n, mine = ((len(self.reservations), self.reservations_of[label]) if table == "reservation"
                   else (len(self.sessions), self.sessions_of[label]))
        total_max = getattr(self.settings, f"{table}s_max")
        tenant_max = getattr(self.settings, f"{table}s_per_tenant_max")
        if n >= total_max:
            raise LimitReached(f"{table} table full ({n} open; {table}s_max={total_max})")
        if self.tenants and mine >= tenant_max:
            raise LimitReached(f"{table} table full for tenant {label!r} ({mine} open; "
                               f"{table}s_per_tenant_max={tenant_max})")
        self.settled.room(label, self.tenants, 1 + self.reservations_of[label] + self.sessions_of[label],
                          1 + len(self.reservations) + len(self.sessions))

    def add_reservation(self, res: Reservation) -> None:
        self.reservations[res.reservation_id] = res
        self.reservations_of[res.tenant] += 1
        heapq.heappush(self.reservation_expiry, (res.expires_at_ms, res.reservation_id))

    def forget_reservation(self, res: Reservation) -> None:
        del self.reservations[res.reservation_id]
        _decrement(self.reservations_of, res.tenant)

    def add_session(self, s: Session) -> None:
        self.sessions[s.session_id] = s
        self.sessions_of[s.tenant] += 1

    def forget_session(self, s: Session) -> None:
        del self.sessions[s.session_id]
        _decrement(self.sessions_of, s.tenant)

    def pop_due(self, now: int) -> Reservation | None:
        """The next open reservation whose time is up (taken off the timer), or None."""
        while self.reservation_expiry and self.reservation_expiry[0][0] <= now:
            _, rid = heapq.heappop(self.reservation_expiry)
            res = self.reservations.get(rid)
            if res is not None and res.expires_at_ms <= now:  # else settled already
                return res
        return None

    # ---- credits of an ended period spared for the holds open at its end --------------

    def holds_of(self, customer_id: str, ct: int) -> list[Any]:
        """The open reservations and sessions of a customer in a credit type, oldest expiry first."""
        out: list[Any] = [r for r in self.reservations.values() if r.customer_id == customer_id
                          and r.credit_type == ct and r.amount_nano > 0]
        out.sort(key=lambda r: (r.expires_at_ms, r.reservation_id))
        out += [s for s in self.sessions.values() if s.customer_id == customer_id and s.credit_type == ct
                and s.reserved_nano > 0]
        return out

    def spare_ops(self, customer_id: str, ct: int, amount: int) -> list[Op]:
        """Give ``amount`` of ended-period credits to the open holds that stand on them."""
        ops: list[Op] = []
        for h in self.holds_of(customer_id, ct):
            if amount <= 0:
                break
            room = (h.amount_nano if isinstance(h, Reservation) else h.reserved_nano) - h.spared_nano
            give = min(max(room, 0), amount)
            if give:
                h.spared_nano += give
                amount -= give
                ops.append(("reservations", h.reservation_id.encode(), h.to_json(self.live.catalog))
                           if isinstance(h, Reservation)
                           else ("sessions", h.session_id.encode(), h.to_json(self.live.catalog)))
        if amount:
            raise RuntimeError(f"spared {amount} nano more than the open holds of {customer_id!r} stand on")
        return ops

    def spared_total(self, customer_id: str, ct: int) -> int:
        return sum(h.spared_nano for h in self.holds_of(customer_id, ct))

    def spared_ops(self, customer_id: str, ct: int, spared: int, cost: int) -> list[Op]:
        """A hold with ``spared`` credits of an ended period settled at ``cost``: the
        cost is paid from them first, and the rest is forfeited, in this commit."""
        if spared <= 0:
            return []
        acct = self.grants.accounts.get(customer_id)
        held = sorted((b for b in (acct.buckets.get(ct, []) if acct else []) if b.source == HELD),
                      key=lambda b: (b.expires_at_ms, b.order))
        ops: list[Op] = []
        left = spared
        for b in held:
            take = min(b.remaining_nano, left)
            b.remaining_nano -= take
            left -= take
            if b.remaining_nano == 0:
                acct.buckets[ct].remove(b)  # type: ignore[union-attr]
            ops += self.grants.row_ops(customer_id, ct, b, b.remaining_nano > 0)
        forfeit = spared - left - min(cost, spared - left)
        if forfeit:
            ops += self.grants.debit_ops(customer_id, ct, forfeit, "expire",
                                         (held[0].grant_id if held else "") + " spared for a hold that settled")
        return ops

    def reserved_share(self, customer_id: str, ct: int, bucket: Bucket) -> int:
        """How much of a bucket open reservations stand on: held amounts are drawn
        from buckets in spending order, as their settlement will be (credits already
        spared for holds, and what they were spared for, are left out)."""
        core = self.live.core
        bal, resv = core.state(core.account(customer_id.encode()))[0][ct][:2]
        buckets = self.grants.accounts[customer_id].buckets.get(ct, [])
        spared_held = sum(b.remaining_nano for b in buckets if b.source == HELD)
        # Credits are spared for holds only with a held bucket, and a settlement takes both:
        # without one, no open hold has any, and the holds need not be looked through.
        spared = self.spared_total(customer_id, ct) if spared_held else 0
        held = min(resv - spared, max(bal - spared_held, 0))
        for b in sorted((b for b in buckets if b.source != HELD), key=Bucket.sort_key):
            take = min(held, b.remaining_nano)
            if b is bucket:
                return take
            held -= take
        return 0

    # ---- grants that expire ------------------------------------------------------------

    def expire_grants_ops(self, now: int) -> list[Op]:
        """Expire the grants that are due, except what open holds stand on (tried again next tick)."""
        grants = self.grants
        ops: list[Op] = []
        retry = set()
        while grants.expiry and grants.expiry[0][0] <= now:
            _, cid, ct = heapq.heappop(grants.expiry)
            acct = grants.accounts.get(cid)
            if acct is None or not any(b.expires_at_ms and b.expires_at_ms <= now for b in acct.buckets.get(ct, [])):
                continue
            ops += self._expire_ops(cid, ct, now)
            # Held by a reservation: try again on the next tick. Credits spared for a hold
            # are not: its settlement takes them (spared_ops).
            if any(b.expires_at_ms and b.expires_at_ms <= now and b.source != HELD for b in acct.buckets.get(ct, [])):
                retry.add((cid, ct))
        for cid, ct in retry:
            heapq.heappush(grants.expiry, (now + 1, cid, ct))
        return ops

    def _expire_ops(self, customer_id: str, ct: int, now: int) -> list[Op]:
        ops = self.grants.reconcile(customer_id, ct)
        acct = self.grants.accounts[customer_id]
        for b in [b for b in acct.buckets.get(ct, []) if b.expires_at_ms and b.expires_at_ms <= now]:
            # Money held by open reservations does not expire under them: that part
            # of the grant goes once they settle (the next sweeps retry). What an
            # ended period spared for its holds goes with their settlement; any more
            # than they were given (a directory from an older meterd) goes now.
            kept = self.spared_total(customer_id, ct) if b.source == HELD else \
                self.reserved_share(customer_id, ct, b)
            gone = max(b.remaining_nano - kept, 0)
            if gone:
                ops += self.grants.debit_ops(customer_id, ct, gone, "expire", b.grant_id)
            b.remaining_nano -= gone
            if b.remaining_nano == 0:
                acct.buckets[ct].remove(b)
            ops += self.grants.row_ops(customer_id, ct, b, b.remaining_nano > 0)
        return ops


def _decrement(counter: collections.Counter[str], label: str) -> None:
    counter[label] -= 1
    if counter[label] <= 0:
        del counter[label]
