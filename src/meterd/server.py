"""The gRPC servers: thin servicers over the engine.

The data plane (Meter) and the control plane (Admin) listen on separate
addresses. Meter methods take raw request bytes (``request_deserializer=None``)
so batches go straight to the compiled core. Domain errors map to status codes
in one place, ``_status_for``; anything unexpected is logged with its
traceback and answered INTERNAL without details.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from meterd import wire
from meterd.catalog import Catalog, load_catalog
from meterd.config import Settings
from meterd.engine import Engine
from meterd.errors import (
    ConfigError,
    Conflict,
    Forbidden,
    InvalidInput,
    InvariantBroken,
    LimitReached,
    MeterdError,
    NotFound,
    StorageFull,
    TimedOut,
    Unauthenticated,
    Unavailable,
)
from meterd.ledger import redact
from meterd.metrics import Timings
from meterd.preflight import check_core, preflight
from meterd.security import AdminAuth, Credentials, DataTokens, Tenant
from meterd.sessions import SESSION_ID_CHARS_MAX
from meterd.v1 import admin_pb2, meter_pb2
from meterd.validate import check_tenant, label_of

log = logging.getLogger("meterd.server")

METER_SERVICE = "meterd.v1.Meter"
ADMIN_SERVICE = "meterd.v1.Admin"


def _status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, Forbidden):
        return grpc.StatusCode.PERMISSION_DENIED, str(exc)
    if isinstance(exc, Unauthenticated):
        return grpc.StatusCode.UNAUTHENTICATED, str(exc)
    if isinstance(exc, (StorageFull, LimitReached)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, Unavailable):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, TimedOut):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(exc)
    if isinstance(exc, Conflict):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, InvariantBroken):
        return grpc.StatusCode.INTERNAL, "internal error"
    if isinstance(exc, MeterdError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    return grpc.StatusCode.INTERNAL, "internal error"


TIMINGS = Timings()  # latency per RPC, for the metrics endpoint


async def _call(fn: Callable[[], Awaitable[Any]], context: grpc.aio.ServicerContext, method: str,
                settled: Callable[[], Awaitable[None]] | None = None) -> Any:
    started = time.perf_counter()
    try:
        return await fn()
    except Exception as e:  # noqa: BLE001 - every error becomes one status, here
        if settled is not None:
            await settled()  # a period roll the call set off before it failed is durable first
        await _abort(e, context, method)
    finally:
        TIMINGS.observe(method, started)


async def _abort(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    code, message = _status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error in %s", method, exc_info=exc)
    await context.abort(code, message)


_parse = wire.parse


class Servicer:
    """Both services' handlers; each converts, calls the engine, converts back."""

    def __init__(self, engine: Engine, settings: Settings, admin_auth: AdminAuth | None = None,
                 data_tokens: DataTokens | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.admin_auth = admin_auth or AdminAuth(settings)
        self.data_tokens = data_tokens or DataTokens(settings)
        self.streams = 0
        self.streams_of: collections.Counter[str] = collections.Counter()  # open ReportStreams per tenant

    async def _tenant(self, ctx: grpc.aio.ServicerContext) -> Tenant | None:
        """The caller's tenant when the data plane needs tokens (None when it does not)."""
        if not self.data_tokens.enabled:
            return None
        tenant = self.data_tokens.tenant(ctx)
        if tenant is None:
            log.warning("data plane call refused: no valid token (peer %s)", ctx.peer())
            await _abort(Unauthenticated("this data plane requires a tenant's bearer token"), ctx, "data plane")
        return tenant

    def _call(self, fn: Callable[[], Awaitable[Any]], ctx: grpc.aio.ServicerContext, method: str) -> Awaitable[Any]:
        return _call(fn, ctx, method, self._roll_settled)

    async def _roll_settled(self) -> None:
        """After a failed call (see Engine.after_failure); a failure of the roll itself is the writer's to
        report, not this call's."""
        with contextlib.suppress(Exception):
            await self.engine.after_failure()

    def _own(self, tenant: Tenant | None, customer_id: str | None, what: str) -> None:
        """Another tenant's open reservation or session is reported as unknown."""
        if tenant is not None and customer_id is not None and not customer_id.encode().startswith(tenant.prefix):
            raise NotFound(f"{what} is unknown")

    # Meter -------------------------------------------------------------------
    async def report(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        tenant = await self._tenant(ctx) if self.data_tokens.enabled else None
        try:  # the hot path: no closure, one coroutine less
            return await self.engine.report(data, tenant)
        except Exception as e:  # noqa: BLE001 - every error becomes one status
            await self._roll_settled()
            await _abort(e, ctx, "Report")
            raise  # not reached: abort raises
        finally:
            TIMINGS.observe("Report", started)

    async def report_batch(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        started = time.perf_counter()
        tenant = await self._tenant(ctx)
        try:
            return await self.engine.report_batch(data, tenant)
        except Exception as e:  # noqa: BLE001 - every error becomes one status
            await self._roll_settled()
            await _abort(e, ctx, "ReportBatch")
            raise  # not reached: abort raises
        finally:
            TIMINGS.observe("ReportBatch", started)

    async def report_stream(self, requests: AsyncIterator[bytes], ctx: grpc.aio.ServicerContext) -> None:
        """Batches are applied in the order they arrive and answered in that order,
        with up to STREAM_WINDOW of them waiting for their commit at once, so one
        stream is not held to one fsync per batch. A stream that sends no request,
        or reads no answer, for ``stream_idle_timeout_s`` is closed: it gives its
        slot back either way."""
        tenant = await self._tenant(ctx)
        label = label_of(tenant)
        await self._take_stream_slot(tenant, label, ctx)
        loop = asyncio.get_running_loop()
        pending: asyncio.Queue[asyncio.Task | None] = asyncio.Queue(maxsize=STREAM_WINDOW)
        idle_s = self.settings.stream_idle_timeout_s
        failed = idle = False

        async def step(data: bytes) -> bytes:
            # Steps start in creation order and apply before their first await, so
            # once one batch fails none after it is applied: the client can resend
            # them all with their sequences.
            nonlocal failed
            if failed:
                raise Unavailable("an earlier batch on this stream failed")
            try:
                return await self.engine.report_batch(data, tenant)
            except BaseException:
                failed = True
                raise

        async def read() -> None:
            nonlocal idle
            it = requests.__aiter__()
            try:
                while True:
                    try:
                        data = await asyncio.wait_for(it.__anext__(), idle_s)
                    except StopAsyncIteration:
                        return
                    except asyncio.TimeoutError:  # a held stream slot that sends nothing is given back
                        idle = True
                        return
                    await pending.put(loop.create_task(step(data)))
            finally:
                await pending.put(None)

        reader = loop.create_task(read())
        try:
            while (task := await pending.get()) is not None:
                answer = await self._call(_later(task), ctx, "ReportStream")
                try:
                    await asyncio.wait_for(ctx.write(answer), idle_s)
                except asyncio.TimeoutError:
                    return _end_idle(ctx, f"no answer on this stream was read for {idle_s:g} s")
            if idle:
                return _end_idle(ctx, f"no request on this stream for {idle_s:g} s")
        finally:
            self._give_stream_slot(label)
            reader.cancel()
            while not pending.empty():  # answers nobody will read: the client retries by sequence
                left = pending.get_nowait()
                if left is not None:
                    left.cancel()
                    left.add_done_callback(_retrieve)

    async def _take_stream_slot(self, tenant: Tenant | None, label: str, ctx: grpc.aio.ServicerContext) -> None:
        """A stream's place among the daemon's streams and its tenant's share of them."""
        if self.streams >= self.settings.streams_max:
            await _abort(LimitReached(f"too many concurrent streams (streams_max={self.settings.streams_max})"),
                         ctx, "ReportStream")
        if tenant is not None and self.streams_of[label] >= self.settings.streams_per_tenant_max:
            await _abort(LimitReached(f"too many concurrent streams for tenant {label!r} "
                                      f"(streams_per_tenant_max={self.settings.streams_per_tenant_max})"),
                         ctx, "ReportStream")
        self.streams += 1
        self.streams_of[label] += 1

    def _give_stream_slot(self, label: str) -> None:
        self.streams -= 1
        self.streams_of[label] -= 1
        if self.streams_of[label] <= 0:
            del self.streams_of[label]

    async def authorize(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        tenant = await self._tenant(ctx)
        return await self._call(lambda: wire.authorize(self.engine, _parse(meter_pb2.AuthorizeRequest, data), tenant),
                                ctx, "Authorize")

    def _reservation_owner(self, req: Any) -> str | None:
        res = self.engine.holds.reservations.get(req.reservation_id)
        return None if res is None else res.customer_id

    def _session_owner(self, req: Any) -> str | None:
        s = self.engine.holds.sessions.get(req.session_id)
        return None if s is None else s.customer_id

    async def _by_id(self, data: bytes, ctx: grpc.aio.ServicerContext, method: str, cls: Any,
                     owner: Callable[[Any], str | None],
                     handler: Callable[[Any, Tenant | None], Awaitable[bytes]]) -> bytes:
        """A call that names an open reservation or session by id: another tenant's is unknown."""
        tenant = await self._tenant(ctx)

        async def run() -> bytes:
            req = _parse(cls, data)
            self._own(tenant, owner(req), "reservation" if hasattr(req, "reservation_id") else "session")
            return await handler(req, tenant)
        return await self._call(run, ctx, method)

    async def commit(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._by_id(data, ctx, "Commit", meter_pb2.CommitRequest, self._reservation_owner,
                                 lambda req, tenant: wire.commit(self.engine, req, tenant))

    async def release(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._by_id(data, ctx, "Release", meter_pb2.ReleaseRequest, self._reservation_owner,
                                 lambda req, tenant: wire.release(self.engine, req, tenant))

    async def get_balance(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        tenant = await self._tenant(ctx)

        async def run() -> bytes:
            req = _parse(meter_pb2.GetBalanceRequest, data)
            check_tenant(tenant, req.customer_id, "customer_id")
            return wire.balance(self.engine, req)
        return await self._call(run, ctx, "GetBalance")

    async def start_session(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        tenant = await self._tenant(ctx)

        async def run() -> bytes:
            req = _parse(meter_pb2.StartSessionRequest, data)
            check_tenant(tenant, req.customer_id, "customer_id")
            if tenant is not None and req.session_id:  # each tenant's chosen session ids are its own
                req.session_id = f"{tenant.name}:{req.session_id}"
                if len(req.session_id) > SESSION_ID_CHARS_MAX:
                    raise InvalidInput("session_id", f"at most {SESSION_ID_CHARS_MAX - 1 - len(tenant.name)} "
                                       "characters with this token")
            self._own(tenant, self._session_owner(req), "session")
            return await wire.start_session(self.engine, req, tenant)
        return await self._call(run, ctx, "StartSession")

    async def heartbeat(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._by_id(data, ctx, "Heartbeat", meter_pb2.HeartbeatRequest, self._session_owner,
                                 lambda req, tenant: wire.heartbeat(self.engine, req, tenant))

    async def end_session(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._by_id(data, ctx, "EndSession", meter_pb2.EndSessionRequest, self._session_owner,
                                 lambda req, tenant: wire.end_session(self.engine, req, tenant))

    # Admin -------------------------------------------------------------------
    async def grant(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.grant(self.engine, _parse(admin_pb2.GrantRequest, data)), ctx, "Grant")

    async def adjust(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.adjust(self.engine, _parse(admin_pb2.AdjustRequest, data)), ctx,
                                "Adjust")

    async def set_overdraft(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.set_overdraft(self.engine, _parse(admin_pb2.SetOverdraftRequest, data)),
                                ctx, "SetOverdraft")

    async def set_term(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.set_term(self.engine, _parse(admin_pb2.SetTermRequest, data)),
                                ctx, "SetTerm")

    async def list_audit(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        async def run() -> bytes:
            return wire.audit(self.engine, _parse(admin_pb2.ListAuditRequest, data)).SerializeToString()
        return await self._call(run, ctx, "ListAudit")

    async def subscribe(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.subscribe(self.engine, _parse(admin_pb2.SubscribeRequest, data)), ctx,
                                "Subscribe")

    async def cancel(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.cancel(self.engine, _parse(admin_pb2.CancelRequest, data)), ctx,
                                "Cancel")

    async def change_plan(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        return await self._call(lambda: wire.change_plan(self.engine, _parse(admin_pb2.ChangePlanRequest, data)),
                                ctx, "ChangePlan")

    async def watch(self, data: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            req = _parse(admin_pb2.WatchRequest, data)
        except InvalidInput as e:
            await _abort(e, ctx, "Watch")
        async for entry in self.engine.watch(frozenset(req.kinds)):
            yield entry.SerializeToString()

    async def reload_catalog(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        async def run() -> bytes:
            _parse(admin_pb2.ReloadCatalogRequest, data)
            catalog = load_catalog(self.settings.catalog)
            check_core(self.settings, catalog)  # as at start: a catalog the core refuses is named, not INTERNAL
            await self.engine.reload_catalog(catalog)
            return admin_pb2.ReloadCatalogResponse(source=catalog.source, credit_types=len(catalog.credit_types),
                                                   meters=len(catalog.meters),
                                                   plans=len(catalog.plans)).SerializeToString()
        return await self._call(run, ctx, "ReloadCatalog")

    async def get_statement(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        async def run() -> bytes:
            req = _parse(admin_pb2.StatementRequest, data)
            return wire.statement(await self.engine.statement(req.customer_id, req.period)).SerializeToString()
        return await self._call(run, ctx, "GetStatement")

    async def get_ledger_status(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        async def run() -> bytes:
            _parse(admin_pb2.LedgerStatusRequest, data)
            return wire.ledger_status(self.engine).SerializeToString()
        return await self._call(run, ctx, "GetLedgerStatus")

    async def advance_clock(self, data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
        async def run() -> bytes:
            req = _parse(admin_pb2.AdvanceClockRequest, data)
            now = await self.engine.advance_clock(req.by_ms, req.to_ms)
            return admin_pb2.AdvanceClockResponse(now_ms=now).SerializeToString()
        return await self._call(run, ctx, "AdvanceClock")

    async def _refuse(self, ctx: grpc.aio.ServicerContext, method: str) -> None:
        log.warning("Admin %s refused: not authenticated (peer %s)", method, ctx.peer())
        await _abort(Unauthenticated("Admin requires authentication: a bearer token or an allowed client "
                                     "certificate"), ctx, method)

    def _authenticated(self, fn: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]) -> Any:
        async def handler(data: bytes, ctx: grpc.aio.ServicerContext) -> bytes:
            if not self.admin_auth.allowed(ctx):
                await self._refuse(ctx, fn.__name__)
            return await fn(data, ctx)
        return handler

    def _authenticated_stream(self, fn: Callable[[bytes, grpc.aio.ServicerContext], AsyncIterator[bytes]]) -> Any:
        async def handler(data: bytes, ctx: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            if not self.admin_auth.allowed(ctx):
                await self._refuse(ctx, fn.__name__)
            async for item in fn(data, ctx):
                yield item
        return handler

    def handlers(self) -> tuple[grpc.GenericRpcHandler, grpc.GenericRpcHandler]:
        raw = dict(request_deserializer=None, response_serializer=None)
        meter = grpc.method_handlers_generic_handler(METER_SERVICE, {
            "Report": grpc.unary_unary_rpc_method_handler(self.report, **raw),
            "ReportBatch": grpc.unary_unary_rpc_method_handler(self.report_batch, **raw),
            "ReportStream": grpc.stream_stream_rpc_method_handler(self.report_stream, **raw),
            "Authorize": grpc.unary_unary_rpc_method_handler(self.authorize, **raw),
            "Commit": grpc.unary_unary_rpc_method_handler(self.commit, **raw),
            "Release": grpc.unary_unary_rpc_method_handler(self.release, **raw),
            "GetBalance": grpc.unary_unary_rpc_method_handler(self.get_balance, **raw),
            "StartSession": grpc.unary_unary_rpc_method_handler(self.start_session, **raw),
            "Heartbeat": grpc.unary_unary_rpc_method_handler(self.heartbeat, **raw),
            "EndSession": grpc.unary_unary_rpc_method_handler(self.end_session, **raw),
        })
        unary = {"Grant": self.grant, "Adjust": self.adjust, "SetOverdraft": self.set_overdraft,
                 "SetTerm": self.set_term, "ListAudit": self.list_audit,
                 "Subscribe": self.subscribe, "Cancel": self.cancel, "ChangePlan": self.change_plan,
                 "ReloadCatalog": self.reload_catalog, "GetStatement": self.get_statement,
                 "GetLedgerStatus": self.get_ledger_status, "AdvanceClock": self.advance_clock}
        admin_methods = {name: grpc.unary_unary_rpc_method_handler(self._authenticated(fn), **raw)
                         for name, fn in unary.items()}
        admin_methods["Watch"] = grpc.unary_stream_rpc_method_handler(self._authenticated_stream(self.watch), **raw)
        admin = grpc.method_handlers_generic_handler(ADMIN_SERVICE, admin_methods)
        return meter, admin


STREAM_WINDOW = 32  # batches of one ReportStream waiting for their commit at once


def _later(task: asyncio.Task) -> Callable[[], Awaitable[Any]]:
    """For _call: a task that is already running, awaited when its turn comes."""
    async def result() -> Any:
        return await task
    return result


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class MeterdServer:
    """The daemon: engine, both listeners, health and reflection. start() / stop(grace_s)."""

    def __init__(self, settings: Settings, catalog: Catalog) -> None:
        self.settings = settings
        preflight(settings, catalog, create=True)  # what check-config checks, before anything is made
        self.credentials = Credentials(settings) if settings.tls_cert_file else None  # reads the files now
        self.admin_auth = AdminAuth(settings)
        self.data_tokens = DataTokens(settings)
        self.engine = Engine(settings, catalog)
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._stop = asyncio.Event()
        self._housekeeping: asyncio.Task | None = None
        self._flusher: asyncio.Task | None = None
        self._metrics: Any = None
        self.data_server: grpc.aio.Server | None = None
        self.admin_server: grpc.aio.Server | None = None
        self.data_port = 0
        self.admin_address = ""

    def _server(self, handlers: list[grpc.GenericRpcHandler], services: list[str],
                files: list[Any]) -> grpc.aio.Server:
        limit = self.settings.batch_bytes_max + (1 << 20)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
            ("grpc.max_concurrent_streams", self.settings.streams_max + 1024),
        ])
        server.add_generic_rpc_handlers(handlers)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = services + [health.SERVICE_NAME, reflection.SERVICE_NAME]
        reflection.enable_server_reflection(names, server, pool=_pool(files))
        return server

    async def start(self) -> None:
        servicer = Servicer(self.engine, self.settings, self.admin_auth, self.data_tokens)
        meter, admin = servicer.handlers()
        self.engine.start(asyncio.get_running_loop())
        self.data_server = self._server([meter], [METER_SERVICE], [meter_pb2.DESCRIPTOR])
        self.data_port = _bind(self.data_server, self.settings.listen, "listen", self.credentials)
        self.admin_server = self._server([admin], [ADMIN_SERVICE], [admin_pb2.DESCRIPTOR])
        self.admin_address = self.settings.admin_address
        if self.admin_address.startswith("unix:"):
            path = self.admin_address[5:]
            if os.path.lexists(path):  # check_paths found meterd's own socket, left by an earlier run
                os.unlink(path)
        _bind(self.admin_server, self.admin_address, "admin_listen", self.credentials)
        if self.admin_address.startswith("unix:"):
            os.chmod(self.admin_address[5:], 0o600)
        await self.data_server.start()
        await self.admin_server.start()
        for name in ("", METER_SERVICE, ADMIN_SERVICE):
            await self._set_health(name, health_pb2.HealthCheckResponse.SERVING)
        self._housekeeping = asyncio.get_running_loop().create_task(self.engine.run_housekeeping(self._stop))
        self._flusher = asyncio.get_running_loop().create_task(self.engine.run_flusher(self._stop))
        if self.settings.metrics_listen:
            from meterd.metrics import serve_metrics
            self._metrics = serve_metrics(self.settings.metrics_listen, self.engine, TIMINGS)
        log.info("serving data plane on %s (port %d), admin on %s, %s, core=%s, sidecar %s flushing to %s",
                 self.settings.listen, self.data_port, self.admin_address,
                 ("mutual TLS" if self.settings.tls_client_ca_file else "TLS") if self.credentials else "no TLS",
                 "compiled" if _compiled() else "python",
                 self.engine.flusher.sidecar_id, redact(self.settings.ledger_url))

    async def _set_health(self, name: str, status: int) -> None:
        result = self.health.set(name, status)
        if asyncio.iscoroutine(result):
            await result

    async def reload(self) -> None:
        """SIGHUP: read the catalog, the TLS certificates and the admin token again;
        a bad file is logged by name and changes nothing."""
        for what, fn in (("TLS certificates", self.credentials.reload if self.credentials else None),
                         ("admin token", self.admin_auth.reload), ("data plane tokens", self.data_tokens.reload)):
            if fn is None:
                continue
            try:
                fn()
                log.info("reloaded the %s", what)
            except ConfigError as e:
                log.error("reloading the %s failed, keeping the current ones: %s", what, e)
        try:
            catalog = load_catalog(self.settings.catalog)
            check_core(self.settings, catalog)
            await self.engine.reload_catalog(catalog)
        except Exception as e:  # noqa: BLE001 - the daemon keeps its current catalog
            log.error("catalog reload failed, keeping the current catalog: %s", e)
            await self.engine.after_failure()

    async def abort(self) -> None:
        """Undo a start that failed half way: close listeners, the writer and LMDB."""
        for srv in (self.data_server, self.admin_server):
            if srv is not None:
                await srv.stop(0)
        self.engine.store.stop()
        self.engine.store.close()

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, refuse new calls, let in-flight calls finish, final commit, close LMDB."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        log.info("shutting down (grace %.1fs)", grace)
        for name in ("", METER_SERVICE, ADMIN_SERVICE):
            await self._set_health(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._stop.set()
        self.engine.journal.closing = True  # open streams get UNAVAILABLE for their next batch
        stops = [s.stop(grace) for s in (self.data_server, self.admin_server) if s is not None]
        await asyncio.gather(*stops)
        for task in (self._housekeeping, self._flusher):
            if task is not None:
                await task
        if self._metrics is not None:
            self._metrics[0].shutdown()
        await self.engine.close()
        if self.admin_address.startswith("unix:"):
            try:
                os.unlink(self.admin_address[5:])
            except FileNotFoundError:
                pass
        log.info("stopped")


def _end_idle(ctx: grpc.aio.ServicerContext, what: str) -> None:
    """End an idle stream. Not with abort(), which waits to send the status: a
    client that reads nothing would hold the stream (and its slot) for ever."""
    code, message = _status_for(TimedOut(f"{what} (stream_idle_timeout_s); open a new stream to send more"))
    ctx.set_code(code)
    ctx.set_details(message)


def _pool(files: list[Any]) -> descriptor_pool.DescriptorPool:
    """What reflection may describe on one listener: its own proto files (with what they import), health and
    reflection, and nothing else; the default pool would describe the admin API on the data port too."""
    from grpc_reflection.v1alpha import reflection_pb2

    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: Any) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for file in [*files, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR]:
        add(file)
    return pool


def _bind(server: grpc.aio.Server, address: str, setting: str, credentials: Credentials | None = None) -> int:
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "failed to bind", also for a Unix socket it cannot make
        port = 0
    if port == 0:
        raise ConfigError(f"{setting}: cannot listen on {address} (in use, not a local address, or a Unix "
                          "socket whose directory is missing or not writable)")
    return port


def _compiled() -> bool:
    from meterd import core
    return core.COMPILED


async def serve(settings: Settings, catalog: Catalog, ready: Callable[[MeterdServer], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    sys.setswitchinterval(settings.gil_switch_interval_us / 1e6)
    server = MeterdServer(settings, catalog)
    try:
        await server.start()
    except BaseException:
        await server.abort()
        raise
    # What start-up built lives as long as the daemon: keep the cyclic garbage
    # collector from walking it again and again while calls wait.
    gc.collect()
    gc.freeze()
    if ready is not None:
        ready(server)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(server.reload()))
    await done.wait()
    await server.stop()
