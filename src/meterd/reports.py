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

from meterd import records, validate
from meterd.clock import Clock
from meterd.config import Settings
from meterd.errors import InvalidInput, LimitReached, MeterdError, StorageFull, Unavailable
from meterd.idempotency import Idempotency
from meterd.journal import Journal
from meterd.records import Kind
from meterd.results import DECISION_NAMES, DENY, REASON_UNKNOWN_CUSTOMER, Keyed, Replay
from meterd.security import Tenant
from meterd.state import ClientState, Live
from meterd.store import Op, Store, from_u64, u64
from meterd.subscriptions import Subscriptions
from meterd.v1 import meter_pb2

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
                 decisions: collections.Counter[tuple[str, str]]) -> None:
        self.settings = settings
        self.store = store
        self.live = live
        self.journal = journal
        self.clock = clock
        self.subscriptions = subscriptions
        self.idempotency = idempotency
        self.decisions = decisions
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
        if cid and (state is not None or accepted):  # a new client that changed nothing is not kept
            ops.append(("clients", cid, u64(seq) + u64(at) + result))
            if state is None:
                self.clients_of[validate.label_of(tenant)] += 1
            state = ClientState(seq, at, result)
            self.clients[cid] = state
        if not ops:
            await self.subscriptions.roll_settled()
            return result
        fut = asyncio.get_running_loop().create_future()
        if state is not None:
            state.pending = fut
        await self.journal.commit_with(ops, fut)
        return result

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
        keyed = Keyed(req.event.idempotency_key, req.SerializeToString(deterministic=True)) \
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
        out = core.report_wire(data, None if tenant is None else tenant.prefix)
        if out is None:
            return await self._report_keyed(data, tenant)
        decision, response = out
        self.decisions[("Report", DECISION_NAMES[decision])] += 1
        ops = [self.journal.log_op(records.message(Kind.REPORT, data, at))] if decision != DENY else []
        ops += self.subscriptions.alert_ops()
        if ops:
            await self.journal.commit_with(ops)
        elif self.subscriptions.rolling is not None:
            await self.subscriptions.roll_settled()
        return response

    def _refused_replay(self, data: bytes, tenant: Tenant | None) -> bytes | None:
        """While writes are refused: the answer of a keyed Report that was remembered, or None."""
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
        self.decisions[("Report", DECISION_NAMES[decision])] += 1
        response = meter_pb2.ReportResponse(
            decision=decision, reason=reason, credit_type=self.live.catalog.credit_types[ct].name,  # type: ignore[arg-type]
            cost_nano=cost, balance_nano=balance, mode=mode.decode(), priority=priority).SerializeToString()
        ops = [self.journal.log_op(records.message(Kind.REPORT, data, at))] if decision != DENY else []
        ops += self.subscriptions.alert_ops()
        if reason != REASON_UNKNOWN_CUSTOMER:  # nothing is kept for a customer that does not exist
            ops += self.idempotency.remember(key, keyed, response)
        if ops:
            await self.journal.commit_with(ops)
        else:
            await self.subscriptions.roll_settled()
        return response
