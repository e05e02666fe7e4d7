"""The data plane's hot paths: ``Report`` and ``ReportBatch`` (and each batch of
``ReportStream``), applied by the core straight from their wire bytes.

A batch names its client and a sequence: a retried batch (the same client and
sequence) gets its first answer back, and the clients seen lately are kept in
LMDB, within a per-tenant bound. A ``Report`` with an idempotency key is
answered from the key's first answer on a retry; one without a key never
leaves the core's wire form.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TypeVar

from meterd import records, validate
from meterd.clock import Clock
from meterd.config import Settings
from meterd.errors import InvalidInput, LimitReached, MeterdError, StorageFull, Unavailable
from meterd.idempotency import Idempotency
from meterd.journal import Journal
from meterd.leases import Cover, Leases
from meterd.records import Kind
from meterd.results import (
    DECISION_NAMES,
    DEGRADE,
    DENY,
    REASON_LEDGER_UNAVAILABLE,
    REASON_OVERFLOW,
    REASON_UNKNOWN_CUSTOMER,
    Keyed,
    Replay,
)
from meterd.security import Tenant
from meterd.state import ClientState, Live
from meterd.store import Op, Store, from_u64, u64
from meterd.subscriptions import Subscriptions
from meterd.v1 import meter_pb2

T = TypeVar("T")

# The duplicate flags appended to a remembered answer (field 6 of ReportResponse,
# field 5 of ReportBatchResponse, each a varint 1): the hot paths answer in wire form.
DUP_REPORT = b"\x30\x01"
DUP_BATCH = b"\x28\x01"


def client_label(cid: bytes) -> str:
    """The tenant a batch client id belongs to (tenants' ids are their name and a NUL, then the client's)."""
    name, nul, _ = cid.partition(b"\x00")
    return name.decode() if nul else ""


def keyed_report(data: bytes) -> meter_pb2.ReportRequest:
    try:
        return meter_pb2.ReportRequest.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf raises DecodeError subclasses
        raise InvalidInput("event", "malformed protobuf") from None


class Reports:
    def __init__(self, settings: Settings, store: Store, live: Live, journal: Journal, clock: Clock,
                 subscriptions: Subscriptions, idempotency: Idempotency,
                 decisions: collections.Counter[tuple[str, str]], leases: Leases | None = None) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.journal = journal
        self.clock = clock
        self.subscriptions = subscriptions
        self.idempotency = idempotency
        self.decisions = decisions
        self.leases = leases  # ledger mode: what tops up a lease that cannot cover a request
        self.tenants = idempotency.tenants
        self.clients: dict[bytes, ClientState] = {}
        self.clients_of: collections.Counter[str] = collections.Counter()  # batch clients per tenant label

    def load(self) -> None:
        self.clients = {key: ClientState(from_u64(value[:8]), from_u64(value[8:16]), value[16:])
                        for key, value in self.store.items("clients")}
        self.clients_of = collections.Counter(client_label(cid) for cid in self.clients)

    # ---- ReportBatch ------------------------------------------------------------------

    async def report_batch(self, data: bytes, tenant: Tenant | None = None) -> bytes:
        if len(data) > self.settings.batch_bytes_max:
            raise InvalidInput("batch", f"larger than {self.settings.batch_bytes_max} bytes")
        core = self.live.core
        cid, seq = core.batch_header(data)
        if tenant is not None and cid:
            cid = tenant.key + cid  # each tenant's client ids are its own: no replaying another's sequence
        state = self.clients.get(cid) if cid else None
        if state is not None and seq <= state.sequence:
            if state.pending is not None:
                await asyncio.shield(state.pending)  # raises if that commit failed
            if seq == state.sequence:
                return state.result + DUP_BATCH
            return meter_pb2.ReportBatchResponse(sequence=seq, duplicate=True).SerializeToString()
        self.journal.check_writable()  # after the replay: a retry is answered even while writes are refused
        at = self.clock.now_ms()
        self.subscriptions.roll_if_due(at)
        ops: list[Op] = self._client_room(validate.label_of(tenant)) if cid and state is None else []
        core.set_clock(at)
        accepted, denied, degraded, details = core.apply_batch(data, None if tenant is None else tenant.prefix)
        self.decisions[("ReportBatch", "allow")] += accepted - degraded
        self.decisions[("ReportBatch", "degrade")] += degraded
        self.decisions[("ReportBatch", "deny")] += denied
        result = meter_pb2.ReportBatchResponse(accepted=accepted, denied=denied, degraded=degraded,
                                               sequence=seq).SerializeToString() + details
        if accepted:
            ops.append(self.journal.log_op(records.message(Kind.BATCH, data, at)))
        ops += self.subscriptions.alert_ops()
        # A new client that changed nothing is not kept, unless its denials get a second chance (ledger mode).
        if cid and (state is not None or accepted or (denied and self.leases is not None)):
            ops.append(("clients", cid, u64(seq) + u64(at) + result))
            if state is None:
                self.clients_of[validate.label_of(tenant)] += 1
            state = ClientState(seq, at, result)
            self.clients[cid] = state
        if denied and self.leases is not None:
            return await self._report_batch_again(data, result, tenant, ops, cid, seq, at, state)
        if not ops:
            await self.subscriptions.roll_settled()
            return result
        fut = asyncio.get_running_loop().create_future()
        if state is not None:
            state.pending = fut
        await self.journal.commit_with(ops, fut)
        return result

    async def _report_batch_again(self, data: bytes, result: bytes, tenant: Tenant | None, ops: list[Op],
                                  cid: bytes, seq: int, at: int, state: ClientState | None) -> bytes:
        """Ledger mode, a batch with denials: what it changed is submitted first, then its
        denied events get a second chance; the client's answer is the merged one."""
        first = self.journal.submit_ahead(ops) if ops else None
        fut = asyncio.get_running_loop().create_future()
        if state is not None:
            state.pending = fut
        try:
            try:
                merged = await self._second_chance(data, result, tenant)
            except MeterdError:  # writes refused meanwhile, say: the first answer stands
                merged = None
            after: list[Op] = []
            if merged is not None:
                result = merged
                if cid and state is not None and self.clients.get(cid) is state:  # no later batch meanwhile
                    state.result = result
                    after.append(("clients", cid, u64(seq) + u64(at) + result))
            if first is not None:
                await first
            await self.journal.commit_with(after, fut)
        except BaseException as e:
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # retrieved: the caller gets it from here
            raise
        return result

    # ---- ledger mode: a second chance for what the leases could not cover ------------------

    def _held(self, event: meter_pb2.UsageEvent) -> validate.Held | None:
        """A denied event's meters, rates and units (None: one no lease can help)."""
        parts = [(q.meter, validate.request_quantity(q)) for q in event.quantities or [event]]
        try:
            return validate.held_parts(self.settings, self.live, parts, event.dimensions, bool(event.quantities))
        except MeterdError:
            return None

    def _need(self, event: meter_pb2.UsageEvent, pools: dict[tuple[str, int], int] | None = None,
              held: validate.Held | None = None) -> tuple[str, int, int] | None:
        """The customer, credit type and cost of a denied event, all its quantities together
        (None: one no lease can help). With ``pools`` (what is left of the customers' pools of
        free units, taken from as the core will): only what they do not cover is priced."""
        meter = self.live.catalog.meter_index.get(event.meter) if not event.quantities else None
        if meter is not None and self.live.catalog.meters[meter].aggregation > 1:
            # A gauge costs nothing when served (the ledger charges it at the period's end): the
            # ledger has only to know the customer.
            return event.customer_id, self.live.catalog.meters[meter].credit_type, 0
        held = held or self._held(event)
        if held is None:
            return None
        if pools is None or not any(self.live.catalog.pool_of(m) >= 0 for m, _, _, _ in held.parts):
            return event.customer_id, held.ct, held.amount
        amount = 0
        for m, _, rate, units in held.parts:
            billed = self.live.catalog.meters[m].event_units(units)
            key = (event.customer_id, self.live.catalog.pool_of(m))
            free = min(billed, pools.get(key, 0)) if key[1] >= 0 else 0
            if key[1] >= 0:
                pools[key] = pools.get(key, 0) - free
            if billed > free:
                amount += validate.event_quote(self.live, m, rate, billed - free)[1]
        return event.customer_id, held.ct, amount

    async def _pools(self, events: list[tuple[int, meter_pb2.UsageEvent]], label: str) -> tuple[set[str], set[int]]:
        """Denied events that take free units of pools (ledger mode, ``Catalog.for_ledger``): each
        customer's pools topped up for them all, or gathered whole where they cannot cover them.
        Returns the customers priced past a pool this time (the loose plan) and the events whose
        pools the ledger could not answer for in time (denied as such)."""
        catalog, leases = self.live.catalog, self.leases
        assert leases is not None  # for mypy: only asked in ledger mode
        wanted: dict[tuple[str, int], int] = {}
        of_event: dict[int, list[tuple[str, int]]] = {}
        for i, event in events:
            held = self._held(event)
            for m, _, _, units in held.parts if held is not None else ():
                pool = catalog.pool_of(m)
                if pool >= 0:
                    key = (event.customer_id, pool)
                    wanted[key] = wanted.get(key, 0) + catalog.meters[m].event_units(units)
                    of_event.setdefault(i, []).append(key)
        asked = sorted(wanted.items())
        got = await asyncio.gather(*(leases.cover_pool(c, p, units, label) for (c, p), units in asked))
        loose = {c for ((c, _), _), (_, short) in zip(asked, got, strict=True) if short}
        away_keys = {key for (key, _), (ok, _) in zip(asked, got, strict=True) if ok is Cover.UNAVAILABLE}
        return loose, {i for i, keys in of_event.items() if away_keys & set(keys)}

    def _after_wait(self, core: object) -> None:
        """After waiting for a lease: writes still taken, and the same catalog (a reload renumbers its meters)."""
        self.journal.check_writable()
        if self.live.core is not core:
            raise Unavailable("the catalog was reloaded while this call waited for its lease; retry")

    async def _covered(self, event: meter_pb2.UsageEvent, tenant: Tenant | None) -> tuple[Cover, set[str]]:
        """A denied event: whether a top-up of its customer's pools of free units and lease now
        covers it; and the customers to price past their pools when it is applied again (``_pools``)."""
        assert self.leases is not None  # for mypy: only asked in ledger mode
        label = validate.label_of(tenant)
        loose: set[str] = set()
        left = None
        if self.live.catalog.pools:
            loose, away = await self._pools([(0, event)], label)
            if away:
                return Cover.UNAVAILABLE, loose
            left = {(event.customer_id, p): self.leases.available(event.customer_id, p)
                    for p in self.live.catalog.pools if p >= 0}
        need = self._need(event, left)
        return (Cover.SHORT if need is None else await self.leases.cover(*need, label)), loose

    def _again(self, apply: Callable[[], T], loose: set[str]) -> tuple[T, Callable[[list[bytes]], list[Op]] | None]:
        """A denied event applied again; with ``loose`` customers on the loose plan for it (and
        what makes the ops of its log record, between PLAN records)."""
        if not loose:
            return apply(), None
        assert self.leases is not None  # for mypy: only in ledger mode
        return self.leases.degrade(set(), apply, loose)

    def _fall_back(self, event: meter_pb2.UsageEvent, core: object, apply: Callable[[], T],
                   loose: set[str] | None = None) -> tuple[T, Callable[[list[bytes]], list[Op]], int] | None:
        """A denied event whose customer's plan has a fallback mode for its credit type: applied
        again (``apply``), served degraded unless its balance now covers it. Returns its outcome,
        what makes the ops of its log record (Leases.degrade; written even if it is still denied:
        its account may be new) and the priority hint after it; None when there is no fallback."""
        need = self._need(event)
        assert self.leases is not None  # for mypy: only asked in ledger mode
        if need is None or self.leases.fallback(need[0], need[1]) is None:
            return None
        self._after_wait(core)
        self.live.core.set_clock(self.clock.now_ms())
        out, logged = self.leases.degrade({need[:2]}, apply, loose or ())
        fb = self.leases.fallback(need[0], need[1])
        return out, logged, fb[2] if fb is not None else 0

    async def _second_chance(self, data: bytes, result: bytes, tenant: Tenant | None) -> bytes | None:
        """The denied events of a batch, after their leases were topped up: applied again as
        a batch of their own (its own log record), and merged into the batch's answer.
        None when none of them could be covered."""
        resp = meter_pb2.ReportBatchResponse.FromString(result)
        req = meter_pb2.ReportBatchRequest.FromString(data)
        retry = [d.index for d in resp.denials if d.reason != REASON_OVERFLOW]
        leases = self.leases
        assert leases is not None  # for mypy: only asked in ledger mode
        label = validate.label_of(tenant)
        # Free units first: pools topped up (or gathered whole) before what the events then cost is asked.
        loose: set[str] = set()
        pool_away: set[int] = set()
        if self.live.catalog.pools:
            loose, pool_away = await self._pools([(i, req.events[i]) for i in retry], label)
            retry = [i for i in retry if i not in pool_away]
        left = {(c, p): leases.available(c, p) for c in {req.events[i].customer_id for i in retry}
                for p in self.live.catalog.pools if p >= 0} if self.live.catalog.pools else None
        needs: dict[tuple[str, int], list[int]] = {}  # the denied events' costs, summed, and the least of them
        lease_of: dict[int, tuple[str, int]] = {}       # each denied event's lease (customer, credit type)
        for i in retry:
            need = self._need(req.events[i], left)
            if need is not None:
                lease_of[i] = need[:2]
                n = needs.setdefault(need[:2], [0, need[2]])
                n[0], n[1] = n[0] + need[2], min(n[1], need[2])
        # All of them if the balance allows, else what there is: part of the batch may pass. The
        # customers' top-ups go together, in one lease transaction.
        asked = sorted(needs.items())
        covered = await asyncio.gather(*(leases.cover(c, ct, total, label) for (c, ct), (total, _) in asked))
        away_leases = {key for (key, _), ok in zip(asked, covered, strict=True) if ok is Cover.UNAVAILABLE}
        # events denied for want of the ledger
        away = {i for i, key in lease_of.items() if key in away_leases} | pool_away
        # Served degraded if still short: those the whole balance cannot cover (not those the
        # ledger did not answer for in time, nor those whose credit is at other sidecars' leases).
        falling = {key for (key, _), ok in zip(asked, covered, strict=True)
                   if ok is Cover.SHORT and leases.fallback(*key) is not None}
        if not retry or (not falling and not loose and not any(
                ok or leases.available(c, ct) >= least for ((c, ct), (_, least)), ok in zip(asked, covered,
                                                                                         strict=True))):
            return self._unavailable(resp, away) if away else None
        self.journal.check_writable()  # events are named by their place in the batch: a reload meanwhile is harmless
        sub = meter_pb2.ReportBatchRequest(events=[req.events[i] for i in retry], details=req.details)
        sub_data = sub.SerializeToString()
        at = self.clock.now_ms()
        core = self.live.core
        core.set_clock(at)
        (accepted, denied, degraded, details), logged = leases.degrade(
            falling, lambda: core.apply_batch(sub_data, None if tenant is None else tenant.prefix), loose)
        if not accepted:
            if falling:  # the accounts it opened, if any, are opened again by a replay
                self.journal.submit_ahead(logged([]))
            return self._unavailable(resp, away) if away else None
        again = meter_pb2.ReportBatchResponse.FromString(details)
        hint = {key: fb[2] for key in falling if (fb := leases.fallback(*key)) is not None}
        for g in again.degradations:  # across sidecars (Leases.fallback), after the batch
            g.priority = hint.get(lease_of.get(retry[g.index], ("", -1)), g.priority)
        for r in again.results:
            if r.decision == DEGRADE:
                r.priority = hint.get(lease_of.get(retry[r.index], ("", -1)), r.priority)
        self.journal.submit_ahead(logged([records.message(Kind.BATCH, sub_data, at)]) + self.subscriptions.alert_ops())
        self.decisions[("ReportBatch", "allow")] += accepted - degraded
        self.decisions[("ReportBatch", "degrade")] += degraded
        self.decisions[("ReportBatch", "deny")] -= accepted
        merged = meter_pb2.ReportBatchResponse(accepted=resp.accepted + accepted, denied=resp.denied - accepted,
                                               degraded=resp.degraded + degraded, sequence=resp.sequence)
        still = {retry[d.index]: d.reason for d in again.denials}
        merged.denials.extend(d for d in resp.denials if d.index not in retry or d.index in still)
        merged.degradations.extend(resp.degradations)
        merged.degradations.extend(meter_pb2.Degradation(index=retry[g.index], mode=g.mode, priority=g.priority)
                                   for g in again.degradations)
        merged.degradations.sort(key=lambda g: g.index)
        results = list(resp.results)
        for r in again.results:
            r.index = retry[r.index]
            results[r.index] = r
        merged.results.extend(results)
        return self._unavailable(merged, away) if away else merged.SerializeToString()

    @staticmethod
    def _unavailable(resp: meter_pb2.ReportBatchResponse, away: set[int]) -> bytes:
        """A batch's answer whose denials of events (by index) whose leases could not be topped up
        in time say so (REASON_LEDGER_UNAVAILABLE) rather than what the lease alone said."""
        for d in resp.denials:
            if d.index in away and d.reason != REASON_OVERFLOW:
                d.reason = REASON_LEDGER_UNAVAILABLE  # type: ignore[assignment]
        for r in resp.results:
            if r.decision == DENY and r.index in away and r.reason != REASON_OVERFLOW:
                r.reason = REASON_LEDGER_UNAVAILABLE  # type: ignore[assignment]
        return resp.SerializeToString()

    def _client_room(self, label: str) -> list[Op]:
        """Room for a new batch client, in the daemon's table and in its tenant's
        share of it; clients idle for longer than client_ttl_s are forgotten to make it."""
        full = len(self.clients) >= self.settings.clients_max
        if not full and not (self.tenants and self.clients_of[label] >= self.settings.clients_per_tenant_max):
            return []
        ops = self._evict_clients()
        if len(self.clients) >= self.settings.clients_max:
            raise LimitReached(f"client table full ({len(self.clients)} batch clients seen within client_ttl_s; "
                               f"clients_max={self.settings.clients_max})")
        if self.tenants and self.clients_of[label] >= self.settings.clients_per_tenant_max:
            raise LimitReached(f"client table full for tenant {label!r} ({self.clients_of[label]} batch clients "
                               f"seen within client_ttl_s; clients_per_tenant_max="
                               f"{self.settings.clients_per_tenant_max})")
        return ops

    def _evict_clients(self) -> list[Op]:
        """Forget clients idle for longer than client_ttl_s."""
        cutoff = self.clock.now_ms() - self.settings.client_ttl_s * 1000
        ops: list[Op] = []
        for cid in [c for c, s in self.clients.items() if s.seen_ms < cutoff]:
            del self.clients[cid]
            self.clients_of[client_label(cid)] -= 1
            ops.append(("clients", cid, None))
        return ops

    # ---- Report ------------------------------------------------------------------------

    def _keyed(self, data: bytes, tenant: Tenant | None) -> tuple[bytes | None, Keyed | None]:
        """A keyed Report's store key, and its key with the canonical request."""
        req = keyed_report(data)
        validate.check_tenant(tenant, req.event.customer_id, "event.customer_id")  # before any replay
        keyed = Keyed(req.event.idempotency_key, validate.canonical_request(req)) \
            if req.event.idempotency_key else None
        key = self.idempotency.key(validate.label_of(tenant), "report", req.event.customer_id, keyed)
        return key, keyed

    async def report(self, data: bytes, tenant: Tenant | None = None) -> bytes:
        try:
            self.journal.check_writable()
        except (StorageFull, Unavailable):
            replay = self._refused_replay(data, tenant)  # a retry is answered even while writes are refused
            if replay is None:
                raise
            return replay
        at = self.clock.now_ms()
        self.subscriptions.roll_if_due(at)
        core = self.live.core
        core.set_clock(at)
        # Applies and answers in wire form, unless the event has a key.
        try:
            out = core.report_wire(data, None if tenant is None else tenant.prefix)
        except InvalidInput as e:
            # A keyed event accepted once, retried after its timestamp has aged past
            # event_late_max_s, still gets its first answer.
            replay = self._refused_replay(data, tenant) if e.field == "event.timestamp_ms" else None
            if replay is None:
                raise
            return replay
        if out is None:
            return await self._report_keyed(data, tenant)
        decision, response = out
        logged: Callable[[list[bytes]], list[Op]] | None = None  # the ops of an event served degraded
        if decision == DENY and self.leases is not None:
            event = meter_pb2.ReportRequest.FromString(data).event
            covered, loose = await self._covered(event, tenant)
            if covered:
                self._after_wait(core)
                core.set_clock(self.clock.now_ms())
                out, logged = self._again(lambda: core.report_wire(data, None if tenant is None else tenant.prefix),
                                          loose)
                assert out is not None  # for mypy: a key-less event stays key-less
                decision, response = out
                at = self.clock.now_ms()
            elif covered is Cover.UNAVAILABLE:
                answer = meter_pb2.ReportResponse.FromString(response)
                if answer.reason != REASON_OVERFLOW:
                    answer.reason = REASON_LEDGER_UNAVAILABLE  # type: ignore[assignment]
                    response = answer.SerializeToString()
            if decision == DENY and covered is Cover.SHORT:  # the whole balance cannot cover it
                fell = self._fall_back(event, core, lambda: core.report_wire(data, None if tenant is None
                                                                             else tenant.prefix), loose)
                if fell is not None:
                    again, logged, priority = fell
                    assert again is not None  # for mypy: a key-less event stays key-less
                    at = self.clock.now_ms()
                    if again[0] != DENY:
                        decision, response = again
                        answer = meter_pb2.ReportResponse.FromString(response)
                        answer.priority = priority
                        response = answer.SerializeToString()
        self.decisions[("Report", DECISION_NAMES[decision])] += 1
        message = [records.message(Kind.REPORT, data, at)] if decision != DENY else []
        ops = logged(message) if logged else [self.journal.log_op(r) for r in message]
        ops += self.subscriptions.alert_ops()
        if ops:
            await self.journal.commit_with(ops)
        elif self.subscriptions.rolling is not None:
            await self.subscriptions.roll_settled()
        return response

    def _refused_replay(self, data: bytes, tenant: Tenant | None) -> bytes | None:
        """The answer of a keyed Report that was remembered, or None (while writes are refused,
        or for an event refused now that was accepted then)."""
        try:
            replay = self.idempotency.landed(*self._keyed(data, tenant))
        except MeterdError:  # a request that cannot be read, or not this token's: the refusal stands
            return None
        return None if replay is None else replay.data + DUP_REPORT

    async def _report_keyed(self, data: bytes, tenant: Tenant | None) -> bytes:
        """A Report with an idempotency key: a repeat gets the first answer."""
        key, keyed = self._keyed(data, tenant)
        replay = await self.idempotency.replayed(key, keyed)
        if isinstance(replay, Replay):
            return replay.data + DUP_REPORT
        at = self.clock.now_ms()
        core = self.live.core
        core.set_clock(at)
        decision, reason, ct, cost, balance, mode, priority = core.report(data, None if tenant is None
                                                                          else tenant.prefix)
        event = meter_pb2.ReportRequest.FromString(data).event if decision == DENY and self.leases is not None else None
        loose: set[str] = set()
        if event is not None:
            async with self.idempotency.holding(key):  # a retry of this key meanwhile waits for this answer
                covered, loose = await self._covered(event, tenant)
        else:
            covered = Cover.SHORT
        logged: Callable[[list[bytes]], list[Op]] | None = None  # the ops of an event served degraded
        if covered:
            self._after_wait(core)
            at = self.clock.now_ms()
            core.set_clock(at)
            (decision, reason, ct, cost, balance, mode, priority), logged = self._again(
                lambda: core.report(data, None if tenant is None else tenant.prefix), loose)
        if decision == DENY and event is not None and covered is Cover.SHORT:  # no balance can cover it
            fell = self._fall_back(event, core, lambda: core.report(data, None if tenant is None else tenant.prefix),
                                   loose)
            if fell is not None:
                again, logged, hint = fell
                at = self.clock.now_ms()
                if again[0] != DENY:
                    decision, reason, ct, cost, balance, mode, _ = again
                    priority = hint
        if decision == DENY and covered is Cover.UNAVAILABLE and reason != REASON_OVERFLOW:
            reason = REASON_LEDGER_UNAVAILABLE
        self.decisions[("Report", DECISION_NAMES[decision])] += 1
        response = meter_pb2.ReportResponse(
            decision=decision, reason=reason, credit_type=self.live.catalog.credit_types[ct].name,  # type: ignore[arg-type]
            cost_nano=cost, balance_nano=balance, mode=mode.decode(), priority=priority).SerializeToString()
        message = [records.message(Kind.REPORT, data, at)] if decision != DENY else []
        ops = logged(message) if logged else [self.journal.log_op(r) for r in message]
        ops += self.subscriptions.alert_ops()
        # Nothing is kept for a customer that does not exist, nor for a refusal that a retry may not get.
        if reason not in (REASON_UNKNOWN_CUSTOMER, REASON_LEDGER_UNAVAILABLE):
            ops += self.idempotency.remember(key, keyed, response)
        if ops:
            await self.journal.commit_with(ops)
        else:
            await self.subscriptions.roll_settled()
        return response
