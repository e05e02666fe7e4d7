"""One tenant cannot exhaust a table every tenant shares: each table and the
streams have a quota per tenant, idle streams are closed, and nothing is stored
for a call that names a customer that does not exist."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from conftest import ACME, GLOBEX, wait_until

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

USD = 10**9
def _event(customer: str) -> pb.UsageEvent:
    return pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=10, dimensions={"model": "gpt-4o"})


def _refused(fn, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kw)
    return info.value


def test_batch_clients_have_a_quota_per_tenant_and_ghost_customers_store_nothing(tenants):
    d, stub = tenants(METERD_CLIENTS_MAX="10", METERD_CLIENTS_PER_TENANT_MAX="3")
    for i in range(20):  # batches for customers that do not exist: denied, and no client kept
        r = stub.ReportBatch(pb.ReportBatchRequest(client_id=f"ghost-{i}", sequence=1, events=[_event("acme-nope")]),
                             metadata=ACME)
        assert (r.accepted, r.denied) == (0, 1)
    for i in range(3):
        assert stub.ReportBatch(pb.ReportBatchRequest(client_id=f"c{i}", sequence=1, events=[_event("acme-1")]),
                                metadata=ACME).accepted == 1
    e = _refused(stub.ReportBatch, pb.ReportBatchRequest(client_id="c3", sequence=1, events=[_event("acme-1")]),
                 metadata=ACME)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "clients_per_tenant_max=3" in e.details()
    # A known client goes on; another tenant's new client is not refused.
    assert stub.ReportBatch(pb.ReportBatchRequest(client_id="c0", sequence=2, events=[_event("acme-1")]),
                            metadata=ACME).accepted == 1
    assert stub.ReportBatch(pb.ReportBatchRequest(client_id="c0", sequence=1, events=[_event("globex-1")]),
                            metadata=GLOBEX).accepted == 1
    d.restart()  # the counts are rebuilt from what LMDB keeps
    stub = meter_pb2_grpc.MeterStub(d.channel)
    e = _refused(stub.ReportBatch, pb.ReportBatchRequest(client_id="c3", sequence=1, events=[_event("acme-1")]),
                 metadata=ACME)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_reservations_and_sessions_have_quotas_per_tenant(tenants):
    d, stub = tenants(METERD_RESERVATIONS_PER_TENANT_MAX="3", METERD_SESSIONS_MAX="3",
                      METERD_SESSIONS_PER_TENANT_MAX="2")

    def hold(customer: str, metadata):
        return stub.Authorize(pb.AuthorizeRequest(customer_id=customer, meter="output_tokens", quantity=0,
                                                  dimensions={"model": "gpt-4o"}, ttl_ms=3_600_000),
                              metadata=metadata)
    held = [hold("acme-1", ACME) for _ in range(3)]
    e = _refused(hold, "acme-1", ACME)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "reservations_per_tenant_max=3" in e.details()
    assert hold("globex-1", GLOBEX).decision == pb.DECISION_ALLOW
    stub.Release(pb.ReleaseRequest(reservation_id=held[0].reservation_id), metadata=ACME)
    assert hold("acme-1", ACME).decision == pb.DECISION_ALLOW  # a settled one makes room

    def session(customer: str, metadata):
        return stub.StartSession(pb.StartSessionRequest(customer_id=customer, meter="gpu_seconds",
                                                        dimensions={"hardware": "nvidia-h100"}), metadata=metadata)
    started = [session("acme-1", ACME) for _ in range(2)]
    e = _refused(session, "acme-1", ACME)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "sessions_per_tenant_max=2" in e.details()
    session("globex-1", GLOBEX)
    e = _refused(session, "globex-1", GLOBEX)
    assert "sessions_max=3" in e.details()
    stub.EndSession(pb.EndSessionRequest(session_id=started[0].session_id), metadata=ACME)
    assert session("globex-1", GLOBEX).decision == pb.DECISION_ALLOW


def _open_stream(stub, metadata):
    """A ReportStream that sends nothing until told; returns its request queue and a queue of its outcome."""
    requests: queue.Queue = queue.Queue()
    outcome: queue.Queue = queue.Queue()

    def gen():
        while (item := requests.get()) is not None:
            yield item

    def run():
        try:
            for r in stub.ReportStream(gen(), metadata=metadata, timeout=60):
                outcome.put(r)
            outcome.put(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            outcome.put(e.code())
    threading.Thread(target=run, daemon=True).start()
    return requests, outcome


def test_streams_have_a_quota_per_tenant(tenants):
    d, stub = tenants(METERD_STREAMS_PER_TENANT_MAX="2")
    held = []
    for i in range(2):
        requests, outcome = _open_stream(stub, ACME)
        requests.put(pb.ReportBatchRequest(client_id=f"s{i}", sequence=1, events=[_event("acme-1")]))
        assert outcome.get(timeout=30).accepted == 1  # open, and holding its slot
        held.append((requests, outcome))
    requests, outcome = _open_stream(stub, ACME)
    requests.put(pb.ReportBatchRequest(client_id="s2", sequence=1, events=[_event("acme-1")]))
    assert outcome.get(timeout=30) == grpc.StatusCode.RESOURCE_EXHAUSTED
    requests, outcome = _open_stream(stub, GLOBEX)
    requests.put(pb.ReportBatchRequest(client_id="g", sequence=1, events=[_event("globex-1")]))
    assert outcome.get(timeout=30).accepted == 1
    requests.put(None)
    assert outcome.get(timeout=30) == grpc.StatusCode.OK
    held[0][0].put(None)  # one ends: acme may open another
    assert held[0][1].get(timeout=30) == grpc.StatusCode.OK
    requests, outcome = _open_stream(stub, ACME)
    requests.put(pb.ReportBatchRequest(client_id="s3", sequence=1, events=[_event("acme-1")]))
    assert outcome.get(timeout=30).accepted == 1
    requests.put(None)
    held[1][0].put(None)


def test_an_idle_stream_is_closed_and_gives_its_slot_back(make_daemon):
    d = make_daemon(extra_env={"METERD_STREAMS_MAX": "1", "METERD_STREAM_IDLE_TIMEOUT_S": "0.5"}).start()
    d.admin.Grant(apb.GrantRequest(customer_id="demo", credit_type="usd", amount_nano=USD))
    requests, outcome = _open_stream(d.meter, None)
    requests.put(pb.ReportBatchRequest(client_id="idle", sequence=1, events=[_event("demo")]))
    assert outcome.get(timeout=30).accepted == 1
    assert outcome.get(timeout=30) == grpc.StatusCode.DEADLINE_EXCEEDED  # then nothing: closed by the daemon
    requests, outcome = _open_stream(d.meter, None)  # the only slot is free again
    requests.put(pb.ReportBatchRequest(client_id="next", sequence=1, events=[_event("demo")]))
    assert outcome.get(timeout=30).accepted == 1
    requests.put(None)
    assert outcome.get(timeout=30) == grpc.StatusCode.OK


def test_a_stream_whose_answers_are_not_read_is_closed_and_gives_its_slot_back(make_daemon):
    d = make_daemon(extra_env={"METERD_STREAMS_MAX": "1", "METERD_STREAM_IDLE_TIMEOUT_S": "1"}).start()
    events = [pb.UsageEvent(customer_id=f"nobody-{i}", meter="requests", quantity=1, dimensions={"model": "gpt-4o"})
              for i in range(2000)]
    batch = pb.ReportBatchRequest(events=events)  # every event denied: each answer lists 2000 denials
    stop = threading.Event()

    def requests():
        for _ in range(400):
            yield batch
        stop.wait()  # then send nothing, and never read an answer: flow control stops the daemon's writes

    channel = grpc.insecure_channel(d.target)
    call = meter_pb2_grpc.MeterStub(channel).ReportStream(requests())
    try:
        def second_stream():  # until the daemon has closed the unread stream, the only slot is taken
            try:
                return next(d.meter.ReportStream(iter([batch]), timeout=10))
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
                return None
        r = wait_until(second_stream, "the unread stream to give its slot back", 60)
        assert r.denied == 2000
    finally:
        stop.set()
        call.cancel()
        channel.close()
