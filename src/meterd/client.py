"""Python client for meterd: unary calls, a background batcher, reservations
and duration sessions; a thread-based ``MeterClient`` and an asyncio
``AsyncMeterClient`` with the same methods.

    from meterd.client import MeterClient

    with MeterClient("127.0.0.1:50051") as meter:
        meter.enqueue("acme", "input_tokens", 1200, model="gpt-4o")   # batched, returns at once
        with meter.reserve("acme", "output_tokens", 4000, model="gpt-4o") as r:
            tokens = generate(max_tokens=4000)                          # the work
            r.actual = tokens                                           # committed on exit
        with meter.session("acme", "gpu_seconds", hardware="nvidia-h100") as s:
            while not s.should_stop: step()                             # heartbeats in the background

The batcher sends ``ReportBatch`` calls of at most ``batch_max`` events (each
quantity of an event of several counting as one) and ``batch_bytes_max``
bytes, or whatever arrived within ``linger_s``, each with this client's
``client_id`` and the next sequence number (sequences start from the clock,
so a process that keeps its ``client_id`` across restarts still moves
forward). A batch is resent with the same sequence until
it is acknowledged, so a retry after a timeout or a daemon restart is never
counted twice. An event the daemon rejects (the error names its index) is
handed to ``on_error`` and the rest of its batch is resent. The queue is
bounded: ``on_full="block"`` makes ``enqueue`` wait (back-pressure),
``"drop"`` makes it return False. ``close()`` delivers what is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import random
import re
import secrets
import socket
import stat
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, AsyncIterator, Callable, Iterator, Mapping

import grpc

from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

log = logging.getLogger("meterd.client")

Quantity = int | str | Decimal
# A meter's name (with a quantity of its own), or several meters of one request and their
# quantities, as {"input_tokens": 1200, "output_tokens": 300}: rated and decided as one.
Meters = str | Mapping[str, Quantity]
ErrorHandler = Callable[[pb.UsageEvent, str], None]

# Codes after which the same batch is sent again, unchanged.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED,
                       grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.UNKNOWN})
_EVENT_INDEX = re.compile(r"^events\[(\d+)\]")
BATCH_BYTES_MAX = (4 << 20) - (64 << 10)  # under the daemon's default batch_bytes_max (4 MiB)
SESSION_END_ATTEMPTS = 8  # EndSession is resent this many times at most (it is safe to resend)


class Denied(Exception):
    """``reserve`` was refused: the balance cannot cover the reservation."""

    def __init__(self, response: pb.AuthorizeResponse) -> None:
        super().__init__(f"reservation denied: {pb.Reason.Name(response.reason)}")
        self.response = response


def usage_event(customer_id: str, meter: Meters, quantity: Quantity | None = None,
                dimensions: Mapping[str, str] | None = None, idempotency_key: str = "") -> pb.UsageEvent:
    """A UsageEvent of one meter and its quantity, or of several meters (a mapping of
    each to its quantity, ``quantity`` left out); a ``str`` or ``Decimal`` quantity is
    sent as an exact decimal."""
    event = pb.UsageEvent(customer_id=customer_id, dimensions=dict(dimensions or {}),
                          idempotency_key=idempotency_key, **_meter_fields(meter, quantity))
    return event


def _entries(event: pb.UsageEvent) -> int:
    """What an event counts toward a batch's events: 1, or each of its quantities."""
    return len(event.quantities) or 1


def _quantity_fields(quantity: Quantity) -> dict[str, Any]:
    return {"quantity": quantity} if isinstance(quantity, int) else {"quantity_decimal": str(quantity)}


def _meter_fields(meter: Meters, quantity: Quantity | None) -> dict[str, Any]:
    """The fields of a request for one meter and its quantity, or for several (``quantities``)."""
    if isinstance(meter, str):
        if quantity is None:
            raise TypeError(f"meter {meter!r} needs a quantity")
        return {"meter": meter, **_quantity_fields(quantity)}
    if quantity is not None:
        raise TypeError("several meters take their quantities from the mapping, not from quantity")
    return {"quantities": [pb.Quantity(meter=m, **_quantity_fields(q)) for m, q in meter.items()]}


def _reserved(meter: Meters, quantity: Quantity | None) -> Quantity | Mapping[str, Quantity]:
    """What a reservation holds, as its commit takes it."""
    return meter if quantity is None and not isinstance(meter, str) else quantity  # type: ignore[return-value]


def _settled_as(meter: Meters, quantity: Quantity | Mapping[str, Quantity]) -> tuple[Meters, Quantity | None]:
    """What a degraded reservation reports when committed: its meter and the quantity, or
    the meters' quantities."""
    return (quantity, None) if isinstance(quantity, Mapping) else (meter, quantity)


CLIENT_SLOTS_MAX = 4096  # batch client ids one host may hold at once, per user
_held_slots: dict[str, int] = {}  # client id: the lock file that holds it, open while its client lives


def release_client_id(client_id: str) -> None:
    """Give a default client id back (a closed client); the process's exit does the same."""
    fd = _held_slots.pop(client_id, None)
    if fd is not None:
        os.close(fd)


SLOTS_FOLDER = "/tmp"  # fixed, not $TMPDIR: every process of a mount namespace must see the same lock files


def default_client_id() -> str:
    """A batch client id for this process that the next process takes over.

    The daemon remembers every client id for ``client_ttl_s`` (in a table with
    a quota), so a new random id per process would fill it with restarts. The
    id is instead ``py-<host>-<mount namespace>-<slot>``: the first free slot
    of this user's lock files in /tmp, held while the client lives. A restarted
    process takes its slot (and id) back, and its sequences, which start from
    the clock, still move forward. Two live clients never share an id: in one
    mount namespace the lock files keep them apart, and two namespaces (such as
    two containers of one pod, with one host name and separate /tmp) differ in
    the namespace part. Where that cannot be made safe (no /proc, a lock folder
    another user could change), the id is random, as before."""
    try:
        return _slot_client_id()
    except OSError as e:
        log.warning("no stable client id (%s); using a random one", e)
        return "py-" + secrets.token_hex(16)


def _slot_client_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:48] or "host"
    namespace = os.stat("/proc/self/ns/mnt").st_ino
    uid = os.getuid()
    folder = os.path.join(SLOTS_FOLDER, f"meterd-client-ids-{uid}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(folder)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise OSError(f"{folder} is not a directory of this user that nobody else may change")
    for slot in range(CLIENT_SLOTS_MAX):
        fd = os.open(os.path.join(folder, f"{slot}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        client_id = f"py-{host}-{namespace}-{slot}"
        _held_slots[client_id] = fd
        return client_id
    raise OSError(f"no free client id slot in {folder}: {CLIENT_SLOTS_MAX} clients hold one")


def _resend_end(e: grpc.RpcError, attempt: int) -> bool:
    """After a failed EndSession: True to send it again, False when the session is
    gone (it ended longer ago than the daemon keeps final answers); raises otherwise."""
    if e.code() == grpc.StatusCode.NOT_FOUND:
        return False
    if e.code() not in RETRYABLE or attempt >= SESSION_END_ATTEMPTS:
        raise e
    return True


def _backoff(attempt: int, retry_max_s: float) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(retry_max_s, 0.05 * 2 ** min(attempt, 16)))


def _channel(target: str, credentials: grpc.ChannelCredentials | None, aio: bool) -> Any:
    options = [("grpc.ssl_target_name_override", "localhost")] if credentials and target.startswith("unix:") else []
    module: Any = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(target)
    return module.secure_channel(target, credentials, options=options)


@dataclass
class _Batch:
    """Events on their way, under one sequence number until acknowledged."""
    sequence: int
    events: list[pb.UsageEvent]
    attempts: int = 0

    def request(self, client_id: str) -> pb.ReportBatchRequest:
        return pb.ReportBatchRequest(client_id=client_id, sequence=self.sequence, events=self.events)

    def handle_error(self, e: grpc.RpcError, on_error: ErrorHandler) -> bool:
        """After a failed send: True to send again (perhaps without a rejected event), False to give up."""
        if e.code() in RETRYABLE:
            self.attempts += 1
            return True
        found = _EVENT_INDEX.match(e.details() or "")
        if found and int(found.group(1)) < len(self.events):
            # The batch was rejected whole and did not use up its sequence: resend the rest.
            on_error(self.events.pop(int(found.group(1))), e.details() or "")
            return bool(self.events)
        for event in self.events:
            on_error(event, f"{e.code().name}: {e.details()}")
        return False


def _log_error(event: pb.UsageEvent, message: str) -> None:
    log.error("usage event for %s dropped: %s", event.customer_id, message)


@dataclass
class Stats:
    """What the batcher did: events acknowledged, dropped (queue full or rejected), batches resent."""
    acknowledged: int = 0
    dropped: int = 0
    rejected: int = 0
    retries: int = 0
    batches: int = 0


class _Base:
    """What both clients share: settings, the channel, and the requests they send."""

    def __init__(self, target: str, token: str | None, credentials: grpc.ChannelCredentials | None,
                 client_id: str | None, timeout_s: float, batch_max: int, linger_s: float, on_full: str,
                 retry_max_s: float, on_error: ErrorHandler | None, aio: bool,
                 batch_bytes_max: int = BATCH_BYTES_MAX) -> None:
        if on_full not in ("block", "drop"):
            raise ValueError("on_full must be 'block' or 'drop'")
        self.channel = _channel(target, credentials, aio=aio)
        self.stub = meter_pb2_grpc.MeterStub(self.channel)
        self.metadata = (("authorization", "Bearer " + token),) if token else None
        self.client_id = client_id or default_client_id()
        self.timeout_s, self.batch_max, self.linger_s = timeout_s, batch_max, linger_s
        self.on_full, self.retry_max_s = on_full, retry_max_s
        self.on_error = on_error or _log_error
        self.stats = Stats()
        # Sequences must grow for a client_id, even across restarts of a process that keeps its
        # client_id: start from the clock (in microseconds); the daemon allows skips.
        self._sequence = time.time_ns() // 1000
        self.batch_bytes_max = batch_bytes_max
        self._entries = 0  # what the batch being built counts toward batch_max
        self._carry: pb.UsageEvent | None = None  # an event that did not fit the last batch
        self._pending = 0  # enqueued and not yet acknowledged or dropped
        self._closing = False
        self._deadline = float("inf")

    def _call(self) -> dict[str, Any]:
        return {"timeout": self.timeout_s, "metadata": self.metadata}

    def _send(self) -> dict[str, Any] | None:
        """A batch call's options; once close() began, its deadline bounds the call (None: it has passed)."""
        left = self._deadline - time.monotonic()
        if left <= 0:
            return None
        return {"timeout": min(self.timeout_s, left), "metadata": self.metadata, "wait_for_ready": True}

    def _add(self, events: list[pb.UsageEvent], size: int, event: pb.UsageEvent) -> int:
        """Add ``event`` to the batch being built; -1 (keeping it for the next batch) when it would not
        fit: in batch_bytes_max, or in batch_max, where each quantity of an event of several counts
        as one (as the daemon's batch_events_max counts them)."""
        n = event.ByteSize() + 5  # the event's tag and length in the batch
        if events and (size + n > self.batch_bytes_max or self._entries + _entries(event) > self.batch_max):
            self._carry = event
            return -1
        self._entries = _entries(event) + (self._entries if events else 0)
        events.append(event)
        return size + n

    def _room(self, events: list[pb.UsageEvent], size: int) -> int:
        """``size`` while the batch being built has room for another event, else -1."""
        return size if self._entries < self.batch_max else -1

    def _acknowledged(self, batch: _Batch, r: pb.ReportBatchResponse) -> bool:
        """False when a first attempt is answered as a duplicate: the sequence was used before
        (a client_id reused with lower sequences) and these events were not counted."""
        if r.duplicate and batch.attempts == 0:
            for event in batch.events:
                self.on_error(event, f"sequence {batch.sequence} of client_id {self.client_id!r} was used before: "
                                     "not counted")
            return False
        return True

    def _not_sent(self, batch: _Batch) -> None:
        for event in batch.events:
            self.on_error(event, "not delivered before close")

    @staticmethod
    def _authorize_request(customer_id: str, meter: Meters, quantity: Quantity | None, ttl_ms: int,
                           idempotency_key: str, dimensions: dict[str, str]) -> pb.AuthorizeRequest:
        return pb.AuthorizeRequest(customer_id=customer_id, dimensions=dimensions, ttl_ms=ttl_ms,
                                   idempotency_key=idempotency_key, **_meter_fields(meter, quantity))

    @staticmethod
    def _session_request(customer_id: str, meter: str, heartbeat_timeout_ms: int, session_id: str,
                         dimensions: dict[str, str]) -> pb.StartSessionRequest:
        return pb.StartSessionRequest(customer_id=customer_id, meter=meter, dimensions=dimensions,
                                      heartbeat_timeout_ms=heartbeat_timeout_ms, session_id=session_id)

    def _event(self, customer_id: str, meter: Meters, quantity: Quantity | None,
               dimensions: dict[str, str]) -> pb.UsageEvent:
        if self._closing:
            raise RuntimeError("the client is closed")
        event = usage_event(customer_id, meter, quantity, dimensions)  # may raise: count it only once built
        self._pending += 1
        return event

    def _rejected(self, event: pb.UsageEvent, message: str) -> None:
        self.stats.rejected += 1
        self.on_error(event, message)

    def _give_up(self, batch: _Batch, e: grpc.RpcError) -> float | None:
        """After a failed send: seconds to wait before sending again, or None to give up on the batch."""
        if not batch.handle_error(e, self._rejected):
            return None
        if e.code() not in RETRYABLE:
            return 0.0  # a rejected event was taken out: send the rest at once
        self.stats.retries += 1
        wait = _backoff(batch.attempts, self.retry_max_s)
        if time.monotonic() + wait > self._deadline:
            self._not_sent(batch)
            return None
        return wait


# ---- the thread-based client --------------------------------------------------------------------


@dataclass
class _Reservation:
    client: Any
    response: pb.AuthorizeResponse
    customer_id: str
    meter: Meters
    dimensions: dict[str, str]
    # What the context manager commits (default: the reserved quantity, or quantities).
    actual: Quantity | Mapping[str, Quantity] | None = None
    settled: Any = None             # the CommitResponse, ReleaseResponse or (degraded) ReportResponse

    @property
    def degraded(self) -> bool:
        """Allowed in a fallback mode: nothing is held, and the usage is reported when committed."""
        return self.response.decision == pb.DECISION_DEGRADE

    def _commit_request(self, quantity: Quantity | Mapping[str, Quantity]) -> pb.CommitRequest:
        """The real usage: a quantity of the one meter, or a mapping of the meters reserved
        to theirs (one left out used nothing)."""
        if isinstance(quantity, Mapping):
            return pb.CommitRequest(reservation_id=self.response.reservation_id, **_meter_fields(quantity, None))
        return pb.CommitRequest(reservation_id=self.response.reservation_id, **_quantity_fields(quantity))

    def _release_request(self) -> pb.ReleaseRequest:
        return pb.ReleaseRequest(reservation_id=self.response.reservation_id)


class Reservation(_Reservation):
    """An ``Authorize`` in progress; commit the actual usage, or leave it to the context manager."""

    def commit(self, quantity: Quantity | Mapping[str, Quantity]) -> Any:
        """Debit ``quantity``, or each reserved meter's quantity in a mapping (at most what was
        reserved is held; more is still recorded)."""
        if self.degraded:
            self.settled = self.client.report(self.customer_id, *_settled_as(self.meter, quantity), **self.dimensions)
        else:
            self.settled = self.client.stub.Commit(self._commit_request(quantity), **self.client._call())
        return self.settled

    def release(self) -> None:
        if not self.degraded and self.settled is None:
            self.settled = self.client.stub.Release(self._release_request(), **self.client._call())


class Session:
    """A duration session; a background thread heartbeats until it ends."""

    def __init__(self, client: MeterClient, response: pb.SessionResponse, heartbeat_s: float) -> None:
        self.client = client
        self.session_id = response.session_id
        self.last = response
        self._stop = threading.Event()
        self._denied = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True,
                                        name=f"meterd-session-{self.session_id}")
        self._thread.start()

    @property
    def should_stop(self) -> bool:
        """True once meterd closed the session (the balance cannot cover more): stop the work."""
        return self._denied.is_set()

    def _beat(self, heartbeat_s: float) -> None:
        while not self._stop.wait(heartbeat_s):
            try:
                self.last = self.client.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session_id),
                                                       **self.client._call())
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    self._denied.set()
                    return
                continue
            if self.last.decision == pb.DECISION_DENY or self.last.closed:
                self._denied.set()
                return

    @property
    def final(self) -> pb.SessionResponse | None:
        """The session's final answer once it ended: the time billed and its cost."""
        return self.last if self.last.closed else None

    def end(self) -> pb.SessionResponse:
        """EndSession, resent until answered: a retry after a lost answer gets the
        same final answer back (marked duplicate), and bills nothing more."""
        self._stop.set()
        self._thread.join()
        attempt = 0
        while not self.last.closed:
            try:
                self.last = self.client.stub.EndSession(pb.EndSessionRequest(session_id=self.session_id),
                                                        **self.client._call())
            except grpc.RpcError as e:
                if not _resend_end(e, attempt):
                    return self.last
                attempt += 1
                time.sleep(_backoff(attempt, self.client.retry_max_s))
        return self.last


class MeterClient(_Base):
    """A thread-safe client with a background batcher thread. Use as a context manager, or call close()."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, client_id: str | None = None,
                 timeout_s: float = 10.0, batch_max: int = 1000, linger_s: float = 0.05,
                 queue_max: int = 100_000, on_full: str = "block", retry_max_s: float = 5.0,
                 on_error: ErrorHandler | None = None, batch_bytes_max: int = BATCH_BYTES_MAX) -> None:
        super().__init__(target, token, credentials, client_id, timeout_s, batch_max, linger_s, on_full,
                         retry_max_s, on_error, aio=False, batch_bytes_max=batch_bytes_max)
        self._queue: queue.Queue[pb.UsageEvent | None] = queue.Queue(maxsize=queue_max)
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True, name="meterd-batcher")
        self._thread.start()

    def __enter__(self) -> MeterClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- unary calls ---------------------------------------------------------------------

    def report(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, idempotency_key: str = "",
               **dimensions: str) -> pb.ReportResponse:
        """One event, answered at once with allow, degrade or deny (durable when answered)."""
        return self.stub.Report(pb.ReportRequest(event=usage_event(customer_id, meter, quantity, dimensions,
                                                                   idempotency_key)),
                                **self._call())

    def balance(self, customer_id: str) -> pb.GetBalanceResponse:
        return self.stub.GetBalance(pb.GetBalanceRequest(customer_id=customer_id), **self._call())

    def authorize(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, ttl_ms: int = 0,
                  idempotency_key: str = "", **dimensions: str) -> pb.AuthorizeResponse:
        return self.stub.Authorize(self._authorize_request(customer_id, meter, quantity, ttl_ms, idempotency_key,
                                                           dimensions), **self._call())

    @contextlib.contextmanager
    def reserve(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, ttl_ms: int = 0,
                idempotency_key: str = "", **dimensions: str) -> Iterator[Reservation]:
        """Authorize → work → Commit. Raises Denied if refused; releases on an exception;
        on a normal exit commits ``r.actual`` (default: the reserved quantity) unless
        the body committed itself."""
        response = self.authorize(customer_id, meter, quantity, ttl_ms, idempotency_key, **dimensions)
        if response.decision == pb.DECISION_DENY:
            raise Denied(response)
        r = Reservation(self, response, customer_id, meter, dict(dimensions))
        try:
            yield r
        except BaseException:
            r.release()
            raise
        if r.settled is None:
            r.commit(_reserved(meter, quantity) if r.actual is None else r.actual)

    @contextlib.contextmanager
    def session(self, customer_id: str, meter: str, heartbeat_s: float = 10.0, heartbeat_timeout_ms: int = 0,
                session_id: str = "", **dimensions: str) -> Iterator[Session]:
        """StartSession, heartbeats every ``heartbeat_s`` in the background, EndSession on exit.
        Raises Denied-like errors as grpc.RpcError; check ``s.should_stop`` in long work."""
        response = self.stub.StartSession(self._session_request(customer_id, meter, heartbeat_timeout_ms, session_id,
                                                                dimensions), **self._call())
        if response.decision == pb.DECISION_DENY:
            raise RuntimeError(f"session refused: {pb.Reason.Name(response.reason)}")
        s = Session(self, response, heartbeat_s)
        try:
            yield s
        finally:
            s.end()

    # ---- the batcher ---------------------------------------------------------------------

    def enqueue(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, **dimensions: str) -> bool:
        """Queue one event for the next batch. False if the queue is full and on_full is 'drop'."""
        with self._idle:
            event = self._event(customer_id, meter, quantity, dimensions)
        try:
            self._queue.put(event, block=self.on_full == "block")
        except queue.Full:
            self._settle(1, dropped=True)
            return False
        return True

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every event enqueued so far is acknowledged or dropped."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout_s)

    def close(self, timeout_s: float = 30.0) -> None:
        """Deliver what is queued (for at most ``timeout_s``), then stop."""
        if self._closing:
            return
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        self._queue.put(None)
        self._thread.join()
        self.channel.close()
        release_client_id(self.client_id)

    def _settle(self, n: int, dropped: bool = False) -> None:
        with self._idle:
            self._pending -= n
            if dropped:
                self.stats.dropped += n
            else:
                self.stats.acknowledged += n
            self._idle.notify_all()

    def _take(self) -> tuple[list[pb.UsageEvent], bool]:
        """The next batch: up to batch_max events and batch_bytes_max bytes, or what came within
        linger_s of the first."""
        first, self._carry = (self._carry, None) if self._carry is not None else (self._queue.get(), None)
        if first is None:
            return [], True
        events: list[pb.UsageEvent] = []
        size, end = self._add(events, 0, first), time.monotonic() + self.linger_s
        while (size := self._room(events, size)) >= 0:
            try:
                event = self._queue.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                break
            if event is None:
                return events, True
            size = self._add(events, size, event)
            if size < 0:
                break
        return events, False

    def _run(self) -> None:
        done = False
        while not done:
            events, done = self._take()
            if not events:
                continue
            self._sequence += 1
            self._deliver(_Batch(self._sequence, events))
        while True:  # what is left after close() began
            try:
                left = self._queue.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                self._sequence += 1
                self._deliver(_Batch(self._sequence, [left]))

    def _deliver(self, batch: _Batch) -> None:
        total = len(batch.events)
        self.stats.batches += 1
        while True:
            options = self._send()
            if options is None:
                self._not_sent(batch)
                self._settle(total, dropped=True)
                return
            try:
                r = self.stub.ReportBatch(batch.request(self.client_id), **options)
                counted = len(batch.events) if self._acknowledged(batch, r) else 0
                self._settle(counted)
                self._settle(total - counted, dropped=True)
                return
            except grpc.RpcError as e:
                wait = self._give_up(batch, e)
                if wait is None:
                    self._settle(total, dropped=True)
                    return
                time.sleep(wait)


# ---- the asyncio client -------------------------------------------------------------------------


class AsyncReservation(_Reservation):
    """``Reservation`` for AsyncMeterClient."""

    async def commit(self, quantity: Quantity | Mapping[str, Quantity]) -> Any:
        if self.degraded:
            self.settled = await self.client.report(self.customer_id, *_settled_as(self.meter, quantity),
                                                    **self.dimensions)
        else:
            self.settled = await self.client.stub.Commit(self._commit_request(quantity), **self.client._call())
        return self.settled

    async def release(self) -> None:
        if not self.degraded and self.settled is None:
            self.settled = await self.client.stub.Release(self._release_request(), **self.client._call())


@dataclass
class AsyncSession:
    """``Session`` for AsyncMeterClient: a task heartbeats until it ends."""
    client: AsyncMeterClient
    last: pb.SessionResponse
    heartbeat_s: float
    should_stop: bool = False
    _task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def session_id(self) -> str:
        return self.last.session_id

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                self.last = await self.client.stub.Heartbeat(pb.HeartbeatRequest(session_id=self.session_id),
                                                             **self.client._call())
            except grpc.RpcError as e:
                if e.code() not in RETRYABLE:
                    self.should_stop = True
                    return
                continue
            if self.last.decision == pb.DECISION_DENY or self.last.closed:
                self.should_stop = True
                return

    @property
    def final(self) -> pb.SessionResponse | None:
        """As Session.final."""
        return self.last if self.last.closed else None

    async def end(self) -> pb.SessionResponse:
        """As Session.end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        attempt = 0
        while not self.last.closed:
            try:
                self.last = await self.client.stub.EndSession(pb.EndSessionRequest(session_id=self.session_id),
                                                              **self.client._call())
            except grpc.RpcError as e:
                if not _resend_end(e, attempt):
                    return self.last
                attempt += 1
                await asyncio.sleep(_backoff(attempt, self.client.retry_max_s))
        return self.last


class AsyncMeterClient(_Base):
    """The asyncio client: the same methods as MeterClient, as coroutines; the batcher is a task.
    Create it inside a running loop; use ``async with`` or await close()."""

    def __init__(self, target: str = "127.0.0.1:50051", *, token: str | None = None,
                 credentials: grpc.ChannelCredentials | None = None, client_id: str | None = None,
                 timeout_s: float = 10.0, batch_max: int = 1000, linger_s: float = 0.05,
                 queue_max: int = 100_000, on_full: str = "block", retry_max_s: float = 5.0,
                 on_error: ErrorHandler | None = None, batch_bytes_max: int = BATCH_BYTES_MAX) -> None:
        super().__init__(target, token, credentials, client_id, timeout_s, batch_max, linger_s, on_full,
                         retry_max_s, on_error, aio=True, batch_bytes_max=batch_bytes_max)
        self._queue: asyncio.Queue[pb.UsageEvent | None] = asyncio.Queue(maxsize=queue_max)
        self._idle = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def __aenter__(self) -> AsyncMeterClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def report(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, idempotency_key: str = "",
                     **dimensions: str) -> pb.ReportResponse:
        return await self.stub.Report(pb.ReportRequest(event=usage_event(customer_id, meter, quantity, dimensions,
                                                                         idempotency_key)),
                                      **self._call())

    async def balance(self, customer_id: str) -> pb.GetBalanceResponse:
        return await self.stub.GetBalance(pb.GetBalanceRequest(customer_id=customer_id), **self._call())

    async def authorize(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, ttl_ms: int = 0,
                        idempotency_key: str = "", **dimensions: str) -> pb.AuthorizeResponse:
        return await self.stub.Authorize(self._authorize_request(customer_id, meter, quantity, ttl_ms,
                                                                 idempotency_key, dimensions), **self._call())

    @contextlib.asynccontextmanager
    async def reserve(self, customer_id: str, meter: Meters, quantity: Quantity | None = None, ttl_ms: int = 0,
                      idempotency_key: str = "", **dimensions: str) -> AsyncIterator[AsyncReservation]:
        """As MeterClient.reserve."""
        response = await self.authorize(customer_id, meter, quantity, ttl_ms, idempotency_key, **dimensions)
        if response.decision == pb.DECISION_DENY:
            raise Denied(response)
        r = AsyncReservation(self, response, customer_id, meter, dict(dimensions))
        try:
            yield r
        except BaseException:
            await r.release()
            raise
        if r.settled is None:
            await r.commit(_reserved(meter, quantity) if r.actual is None else r.actual)

    @contextlib.asynccontextmanager
    async def session(self, customer_id: str, meter: str, heartbeat_s: float = 10.0, heartbeat_timeout_ms: int = 0,
                      session_id: str = "", **dimensions: str) -> AsyncIterator[AsyncSession]:
        """As MeterClient.session."""
        response = await self.stub.StartSession(self._session_request(customer_id, meter, heartbeat_timeout_ms,
                                                                      session_id, dimensions), **self._call())
        if response.decision == pb.DECISION_DENY:
            raise RuntimeError(f"session refused: {pb.Reason.Name(response.reason)}")
        s = AsyncSession(self, response, heartbeat_s)
        s._task = asyncio.get_running_loop().create_task(s._beat())
        try:
            yield s
        finally:
            await s.end()

    async def enqueue(self, customer_id: str, meter: Meters, quantity: Quantity | None = None,
                      **dimensions: str) -> bool:
        """Queue one event for the next batch. False if the queue is full and on_full is 'drop'."""
        event = self._event(customer_id, meter, quantity, dimensions)
        if self.on_full == "drop":
            try:
                self._queue.put_nowait(event)
            except asyncio.QueueFull:
                await self._settle(1, dropped=True)
                return False
        else:
            await self._queue.put(event)
        return True

    async def flush(self, timeout_s: float | None = None) -> bool:
        async with self._idle:
            try:
                await asyncio.wait_for(self._idle.wait_for(lambda: self._pending == 0), timeout_s)
            except asyncio.TimeoutError:
                return False
        return True

    async def close(self, timeout_s: float = 30.0) -> None:
        if self._closing:
            return
        self._closing = True
        self._deadline = time.monotonic() + timeout_s
        await self._queue.put(None)
        await self._task
        await self.channel.close()
        release_client_id(self.client_id)

    async def _settle(self, n: int, dropped: bool = False) -> None:
        async with self._idle:
            self._pending -= n
            if dropped:
                self.stats.dropped += n
            else:
                self.stats.acknowledged += n
            self._idle.notify_all()

    async def _take(self) -> tuple[list[pb.UsageEvent], bool]:
        first, self._carry = (self._carry, None) if self._carry is not None else (await self._queue.get(), None)
        if first is None:
            return [], True
        events: list[pb.UsageEvent] = []
        size, end = self._add(events, 0, first), time.monotonic() + self.linger_s
        while (size := self._room(events, size)) >= 0:
            try:
                event = await asyncio.wait_for(self._queue.get(), max(0.0, end - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if event is None:
                return events, True
            size = self._add(events, size, event)
            if size < 0:
                break
        return events, False

    async def _run(self) -> None:
        done = False
        while not done:
            events, done = await self._take()
            if events:
                self._sequence += 1
                await self._deliver(_Batch(self._sequence, events))
        while not self._queue.empty():
            left = self._queue.get_nowait()
            if left is not None:
                self._sequence += 1
                await self._deliver(_Batch(self._sequence, [left]))

    async def _deliver(self, batch: _Batch) -> None:
        total = len(batch.events)
        self.stats.batches += 1
        while True:
            options = self._send()
            if options is None:
                self._not_sent(batch)
                await self._settle(total, dropped=True)
                return
            try:
                r = await self.stub.ReportBatch(batch.request(self.client_id), **options)
                counted = len(batch.events) if self._acknowledged(batch, r) else 0
                await self._settle(counted)
                await self._settle(total - counted, dropped=True)
                return
            except grpc.RpcError as e:
                wait = self._give_up(batch, e)
                if wait is None:
                    await self._settle(total, dropped=True)
                    return
                await asyncio.sleep(wait)


__all__ = ["AsyncMeterClient", "AsyncReservation", "AsyncSession", "Denied", "MeterClient", "Meters", "Reservation",
           "Session", "Stats", "usage_event"]
