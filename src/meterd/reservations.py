"""Reservations: Authorize holds an amount for up to its time to live; Commit
settles the real usage against it (exactly, the rest given back) and Release
gives it all back. Each settled reservation leaves its final answer for
retries (``settled`` answers); one that times out is released by the
housekeeping timer."""

from __future__ import annotations

import collections
import logging
import secrets
from typing import Callable, Mapping, Sequence

from meterd import _fastpath_py, records, validate
from meterd.answers import entry_key
from meterd.clock import Clock
from meterd.config import Settings
from meterd.corespec import INT64_MAX, part_twice_message
from meterd.errors import InvalidInput, NotFound, Unavailable
from meterd.holds import Holds
from meterd.idempotency import Idempotency, Settled
from meterd.journal import Journal
from meterd.leases import Cover, Leases
from meterd.records import Kind
from meterd.results import (
    ALLOW,
    DECISION_NAMES,
    DEGRADE,
    DENY,
    REASON_INSUFFICIENT_BALANCE,
    REASON_LEDGER_UNAVAILABLE,
    REASON_UNKNOWN_CUSTOMER,
    Authorized,
    Committed,
    Keyed,
    Quantity,
    Released,
    Replay,
)
from meterd.security import Tenant
from meterd.state import Live, Reservation
from meterd.store import Op
from meterd.subscriptions import Subscriptions

log = logging.getLogger("meterd.engine")

RESERVATION_ID_BYTES_MAX = 64


class Reservations:
    def __init__(self, settings: Settings, live: Live, journal: Journal, clock: Clock, holds: Holds,
                 subscriptions: Subscriptions, idempotency: Idempotency, settled: Settled,
                 encode: Callable[[object], bytes], decisions: collections.Counter[tuple[str, str]],
                 leases: Leases | None = None) -> None:
        self.settings = settings
        self.live = live
        self.journal = journal
        self.clock = clock
        self.holds = holds
        self.subscriptions = subscriptions
        self.idempotency = idempotency
        self.settled = settled
        self.encode = encode        # an answer as it is remembered for retries (the API's wire form)
        self.decisions = decisions  # (rpc, outcome) counts, for metrics
        self.leases = leases        # ledger mode: what tops up a lease that cannot cover a reservation

    async def authorize(self, tenant: Tenant | None, customer_id: str, parts: Sequence[tuple[str, Quantity]],
                        dimensions: Mapping[str, str], ttl_ms: int, keyed: Keyed | None,
                        listed: bool = False) -> Authorized | Replay:
        """Hold what the meters' quantities (``parts``: (meter, quantity) each) cost at most,
        as one amount; ``listed``: they came as AuthorizeRequest.quantities."""
        label = validate.label_of(tenant)
        owned = tenant is None or customer_id.encode().startswith(tenant.prefix)
        # While writes are refused, a remembered retry is answered; any other call gets the refusal.
        replay = self.idempotency.writable_or_replay(label, "authorize", customer_id, keyed if owned else None)
        if replay is not None:
            return replay
        validate.check_tenant(tenant, customer_id, "customer_id")
        cust = validate.customer(self.settings, customer_id)
        held = validate.held_parts(self.settings, self.live, parts, dimensions, listed)
        key = self.idempotency.key(label, "authorize", customer_id, keyed)
        replay = await self.idempotency.replayed(key, keyed)
        if replay is not None:
            return replay
        ttl_ms = ttl_ms or self.settings.reservation_ttl_s * 1000
        if ttl_ms > self.settings.reservation_ttl_max_s * 1000:
            raise InvalidInput("ttl_ms", f"above the maximum of {self.settings.reservation_ttl_max_s * 1000}")
        core = self.live.core
        ct, amount = held.ct, held.amount
        self.holds.open_room("reservation", label)
        self.subscriptions.roll_if_due()
        idx = core.account(cust)
        amount = validate.discounted(core, idx, ct, amount)
        reserved = idx >= 0 and core.reserve(idx, ct, amount)
        covered = Cover.SHORT
        if not reserved and self.leases is not None:
            async with self.idempotency.holding(key):  # a retry of this key meanwhile waits for this answer
                covered = await self.leases.cover(customer_id, ct, amount, label)
        if covered:
            self.journal.check_writable()
            if self.live.core is not core:
                raise Unavailable("the catalog was reloaded while this call waited for its lease; retry")
            self.holds.open_room("reservation", label)  # other calls may have taken it meanwhile
            idx = core.account(cust)
            reserved = idx >= 0 and core.reserve(idx, ct, amount)
        if not reserved:
            await self.subscriptions.roll_settled()
            refusal = self._refusal(customer_id, idx, ct, covered is Cover.UNAVAILABLE)
            self.decisions[("Authorize", DECISION_NAMES[refusal.decision])] += 1
            return refusal
        now = self.clock.now_ms()
        meter, value, rate, _ = held.parts[0]
        res = Reservation("r_" + secrets.token_hex(12), customer_id, ct, meter, value, rate, amount, now + ttl_ms,
                          label, dims=validate.dimension_set(held.dims),
                          more=tuple((m, r) for m, _, r, _ in held.parts[1:]),
                          names=tuple(self.live.catalog.meters[m].name for m, _, _, _ in held.parts))
        self.holds.add_reservation(res)
        answer = Authorized(ALLOW, self.live.catalog.credit_types[ct].name, core.available(idx, ct),
                            reservation_id=res.reservation_id, reserved_nano=amount, expires_at_ms=res.expires_at_ms)
        ops = [self.journal.log_op(records.account(Kind.RESERVE, cust, ct, amount, now)),
               ("reservations", res.reservation_id.encode(), res.to_json(self.live.catalog))]
        if key is not None:
            ops += self.idempotency.remember(key, keyed, self.encode(answer))
        self.decisions[("Authorize", "allow")] += 1
        await self.journal.commit_with(ops)
        return answer

    def _billed(self, res: Reservation, quantity: Quantity | None,
                parts: Sequence[tuple[str, Quantity]]) -> list[tuple[int, int, str, int]]:
        """Per meter of a reservation, what its Commit bills: (quantity, minimum charge, the
        request's field of its quantity, the quantity as given)."""
        catalog = self.live.catalog
        held = [m for m, _ in res.parts()]
        names = [catalog.meters[m].name for m in held]
        if quantity is not None:
            if len(held) > 1:
                raise InvalidInput("quantities", f"the reservation holds several meters ({', '.join(names)}): give "
                                   "each one's quantity in quantities")
            units = validate.quantity(self.live, res.meter, quantity)
            return [(*validate.billed(self.live, res.meter, units), "quantity", units)]
        given: dict[int, int] = {}
        field: dict[int, str] = {}
        for k, (name, q) in enumerate(parts):
            if name not in names:
                raise InvalidInput(f"quantities[{k}].meter", f"meter {name[:validate.NAME_ECHO_CHARS]!r} is not "
                                   f"one the reservation holds ({', '.join(names)})")
            meter = held[names.index(name)]
            if meter in given:
                raise InvalidInput(f"quantities[{k}].meter", part_twice_message(name.encode()))
            given[meter] = validate.quantity(self.live, meter, q, f"quantities[{k}].")
            field[meter] = f"quantities[{k}].quantity"
        fields = [field.get(m, "quantities") for m in held]
        return [(*validate.billed(self.live, m, given.get(m, 0), f), f, given.get(m, 0))
                for m, f in zip(held, fields, strict=True)]

    def _rated(self, res: Reservation, used: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], bytes | None]:
        """The rates a Commit settles at, and the dimension set it files the usage under: with
        conditions, those of the quantities used (the prompt's real size decides the price, not
        its estimate), where the catalog prices them; else the reservation's own."""
        conditions = {c.name for c in self.live.catalog.conditions}
        if not conditions:
            return res.parts(), res.dims
        given = {k.decode(): v.decode() for k, v in _fastpath_py.set_items(res.dims or b"").items()
                 if k.decode() not in conditions}
        dims = validate.derived(self.live, given, used)
        rates = [(m, self.live.core.find_rate(m, {k.encode(): v.encode() for k, v in dims.items()}))
                 for m, _ in used]
        if any(r < 0 for _, r in rates):
            return res.parts(), res.dims  # the catalog has no price for them: the held ones stand
        return rates, validate.dimension_set(dims)

    def _check_fits(self, idx: int, held: list[tuple[int, int]], billed: list[tuple[int, int, str, int]]) -> None:
        """A Commit of several meters is refused whole, before any is settled, when one would
        overflow its usage or the balance (a quote is at least what a settlement costs)."""
        core = self.live.core
        cts, use, _ = core.state(idx)
        total = 0
        ct = self.live.catalog.meters[held[0][0]].credit_type
        for (meter, rate), (qty, minimum, field, _) in zip(held, billed, strict=True):
            if use[meter] + qty > INT64_MAX:
                raise InvalidInput(field, "the meter's usage would overflow 64 bits")
            try:
                total += max(core.quote(rate, qty)[1], minimum) + 1  # and a nano of carry
            except InvalidInput as e:
                raise InvalidInput(field, e.message) from None
        if cts[ct][0] - total < -INT64_MAX:
            raise InvalidInput("quantities", "the balance would overflow 64 bits")

    def _refusal(self, customer_id: str, idx: int, ct: int, unavailable: bool = False) -> Authorized:
        """Deny, or degrade when the customer's plan has a fallback mode for this credit type.
        ``unavailable``: ledger mode, and the lease could not be topped up in time."""
        ct_name = self.live.catalog.credit_types[ct].name
        available = self.live.core.available(idx, ct) if idx >= 0 else 0
        fallback = self.subscriptions.fallback(customer_id, ct) if idx >= 0 else None
        if fallback is None and self.leases is not None and not unavailable:  # ledger mode: the ledger's plan
            fb = self.leases.fallback(customer_id, ct)
            fallback = None if fb is None else fb[1:]
        if fallback is not None:
            return Authorized(DEGRADE, ct_name, available, mode=fallback[0], priority=fallback[1])
        if unavailable:
            return Authorized(DENY, ct_name, available, reason=REASON_LEDGER_UNAVAILABLE)
        if idx < 0:
            return Authorized(DENY, ct_name, available, reason=REASON_UNKNOWN_CUSTOMER)
        return Authorized(DENY, ct_name, available, reason=REASON_INSUFFICIENT_BALANCE)

    async def _settling(self, by: bytes, tenant: Tenant | None, rid: str,
                        request: bytes, field: str = "quantity") -> tuple[bytes, Replay | Reservation]:
        """The settled-answer key of a Commit (``by`` b"C") or Release (b"R"), and the
        earlier answer if the reservation was settled the same way already, or else
        the open reservation. Answers are kept per tenant; a retry is answered even
        while writes are refused."""
        if not rid or len(rid.encode()) > RESERVATION_ID_BYTES_MAX:
            raise NotFound(f"reservation {rid[:RESERVATION_ID_BYTES_MAX]!r} is unknown")
        key = entry_key(validate.label_of(tenant), "reservation", rid)
        replay = await self.settled.answer(key, by, request, f"reservation {rid!r}", field)
        if replay is not None:
            return key, replay
        self.journal.check_writable()
        res = self.holds.reservations.get(rid)
        if res is None:
            raise NotFound(f"reservation {rid[:RESERVATION_ID_BYTES_MAX]!r} is unknown, expired or already settled")
        return key, res

    async def commit(self, tenant: Tenant | None, reservation_id: str, quantity: Quantity | None,
                     request: bytes, parts: Sequence[tuple[str, Quantity]] = ()) -> Committed | Replay:
        """Settle a reservation: its one meter's ``quantity``, or ``parts`` ((meter, quantity)
        each, as CommitRequest.quantities) of the meters it holds (a meter left out used nothing)."""
        field = "quantity" if quantity is not None else "quantities"
        key, res = await self._settling(b"C", tenant, reservation_id, request, field)
        if isinstance(res, Replay):
            return res
        if self.leases is not None and self.live.catalog.pools and res.rate >= 0:
            # Ledger mode: the plan's free units first, as on one sidecar (Leases.cover_pool); a pool
            # the ledger does not answer for in time gives what this sidecar holds of it.
            for (meter, _), (qty, _, _, _) in zip(res.parts(), self._billed(res, quantity, parts), strict=True):
                pool = self.live.catalog.pool_of(meter) if meter >= 0 else -1
                if pool >= 0 and qty > 0:
                    await self.leases.cover_pool(res.customer_id, pool, qty, validate.label_of(tenant))
            key, res = await self._settling(b"C", tenant, reservation_id, request, field)  # settled meanwhile?
            if isinstance(res, Replay):
                return res
        if res.rate < 0:
            raise NotFound("the reservation's meter, or its price for the reservation's dimensions, is no longer "
                           "in the catalog; release it")
        billed = self._billed(res, quantity, parts)
        core = self.live.core
        cust = res.customer_id.encode()
        idx = core.account(cust)
        held, rated = self._rated(res, [(m, units) for (m, _), (_, _, _, units) in zip(res.parts(), billed,
                                                                                      strict=True)])
        if len(billed) > 1:
            self._check_fits(idx, held, billed)
        at = self.clock.now_ms()
        self.subscriptions.roll_if_due(at)
        core.set_clock(at)
        ops: list[Op] = []
        cost = overrun = 0
        # A meter of several that used nothing is not settled (nor counted as an event on its line);
        # the hold goes back once, with the first that is.
        settled = [k for k, (qty, _, _, _) in enumerate(billed) if qty > 0 or len(billed) == 1] or [0]
        for k in settled:
            (meter, rate), (qty, minimum, _, _) = held[k], billed[k]
            reserved = res.amount_nano if k == settled[0] else 0
            dims = validate.settle_set(core, idx, meter, rated, cust)
            part, overrun = core.settle(idx, rate, qty, reserved, dims, minimum)
            cost += part
            ops.append(self.journal.log_op(records.settle(cust, rate, qty, reserved, dims, at, minimum)))
        if overrun:
            log.warning("commit overran the balance: customer=%s reservation=%s overrun_nano=%d",
                        res.customer_id, res.reservation_id, overrun)
        self.holds.forget_reservation(res)
        ops.append(("reservations", res.reservation_id.encode(), None))
        ops += self.holds.spared_ops(res.customer_id, res.credit_type, res.spared_nano, cost)
        answer = Committed(cost, max(res.amount_nano - cost, 0), core.state(idx)[0][res.credit_type][0], overrun)
        ops += self.subscriptions.alert_ops()
        ops += self.settled.put_ops(validate.label_of(tenant), key, b"C", request, self.encode(answer), at)
        await self.journal.commit_with(ops)
        return answer

    async def release(self, tenant: Tenant | None, reservation_id: str, request: bytes) -> Released | Replay:
        key, res = await self._settling(b"R", tenant, reservation_id, request)
        if isinstance(res, Replay):
            return res
        self.subscriptions.roll_if_due()
        ops = self.release_ops(res)
        core = self.live.core
        idx = core.account(res.customer_id.encode())
        answer = Released(res.amount_nano, core.available(idx, res.credit_type) if res.credit_type >= 0 else 0)
        ops += self.settled.put_ops(validate.label_of(tenant), key, b"R", request, self.encode(answer),
                                    self.clock.now_ms())
        await self.journal.commit_with(ops)
        return answer

    def release_ops(self, res: Reservation) -> list[Op]:
        """Give a reservation back; credits of an ended period it held go at once, by that period's rules."""
        self.holds.forget_reservation(res)
        ops: list[Op] = [("reservations", res.reservation_id.encode(), None)]
        if res.credit_type >= 0:
            cust = res.customer_id.encode()
            core = self.live.core
            core.release(core.account(cust), res.credit_type, res.amount_nano)
            ops.append(self.journal.log_op(records.account(Kind.RELEASE, cust, res.credit_type, res.amount_nano,
                                                           self.clock.now_ms())))
            ops += self.holds.spared_ops(res.customer_id, res.credit_type, res.spared_nano, 0)
        return ops

    async def expire(self, now: int, chunk: int) -> None:
        """Release what is due, ``chunk`` ops per commit: the event loop serves calls in between."""
        while True:
            ops: list[Op] = []
            while len(ops) < chunk and (res := self.holds.pop_due(now)) is not None:
                log.info("reservation expired: customer=%s reservation=%s amount_nano=%d",
                         res.customer_id, res.reservation_id, res.amount_nano)
                ops += self.release_ops(res)
            if not ops:
                return
            await self.journal.commit_with(ops, maintenance=True)
