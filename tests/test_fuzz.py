"""Fuzz every RPC of a real daemon over loopback gRPC with hypothesis: random
bytes, mutated valid requests and well-formed requests with hostile field
values. The rules: the daemon never crashes or hangs, never answers INTERNAL
or UNKNOWN, and a rejected call changes no balance.

CI runs a bounded number of inputs; METERD_SOAK=1 runs over a million.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from conftest import Daemon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

pytestmark = pytest.mark.spawns  # the module's daemon (fuzzed)
SOAK = bool(os.environ.get("METERD_SOAK"))
# Per test below; in soak mode about 1.1M inputs in all. METERD_FUZZ_EXAMPLES overrides.
EXAMPLES = int(os.environ.get("METERD_FUZZ_EXAMPLES", 0)) or (100_000 if SOAK else 150)

EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}

EVENT = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=1000, dimensions={"model": "gpt-4o"})
SEEDS: dict[str, tuple[str, bytes]] = {
    "Report": ("meterd.v1.Meter", pb.ReportRequest(event=EVENT).SerializeToString()),
    "ReportBatch": ("meterd.v1.Meter", pb.ReportBatchRequest(client_id="f", sequence=1, events=[EVENT] * 3,
                                                             details=True).SerializeToString()),
    "Authorize": ("meterd.v1.Meter", pb.AuthorizeRequest(customer_id="other", meter="output_tokens", quantity=10,
                                                         dimensions={"model": "gpt-4o"}).SerializeToString()),
    "Commit": ("meterd.v1.Meter", pb.CommitRequest(reservation_id="r_00", quantity=5).SerializeToString()),
    "Release": ("meterd.v1.Meter", pb.ReleaseRequest(reservation_id="r_00").SerializeToString()),
    "GetBalance": ("meterd.v1.Meter", pb.GetBalanceRequest(customer_id="acme").SerializeToString()),
    "StartSession": ("meterd.v1.Meter", pb.StartSessionRequest(
        customer_id="other", meter="gpu_seconds", dimensions={"hardware": "a100-80gb"}).SerializeToString()),
    "Heartbeat": ("meterd.v1.Meter", pb.HeartbeatRequest(session_id="s_00").SerializeToString()),
    "EndSession": ("meterd.v1.Meter", pb.EndSessionRequest(session_id="s_00").SerializeToString()),
    "Grant": ("meterd.v1.Admin", apb.GrantRequest(customer_id="acme", credit_type="usd",
                                                  amount_nano=10**9).SerializeToString()),
    "Adjust": ("meterd.v1.Admin", apb.AdjustRequest(customer_id="acme", credit_type="usd", amount_nano=-1,
                                                    reason="fuzz").SerializeToString()),
    "ListAudit": ("meterd.v1.Admin", apb.ListAuditRequest(customer_id="acme", limit=5).SerializeToString()),
    "Subscribe": ("meterd.v1.Admin", apb.SubscribeRequest(customer_id="acme", plan="pro").SerializeToString()),
    "Cancel": ("meterd.v1.Admin", apb.CancelRequest(customer_id="acme").SerializeToString()),
    "ChangePlan": ("meterd.v1.Admin", apb.ChangePlanRequest(customer_id="acme", plan="pro").SerializeToString()),
    "GetStatement": ("meterd.v1.Admin", apb.StatementRequest(customer_id="acme", period="2026-11").SerializeToString()),
    "GetLedgerStatus": ("meterd.v1.Admin", b""),
    "ReloadCatalog": ("meterd.v1.Admin", b""),
    # Streams: ReportStream gets the input twice on one stream; Watch is open until its deadline.
    "ReportStream": ("meterd.v1.Meter", pb.ReportBatchRequest(client_id="g", sequence=1, events=[EVENT] * 2,
                                                              details=True).SerializeToString()),
    "Watch": ("meterd.v1.Admin", apb.WatchRequest(kinds=["grant"]).SerializeToString()),
}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(Path(tmp_path_factory.mktemp("fuzz")) / "data").start()
    for customer in ("acme", "other"):  # sessions and reservations (which settle on their own) go to "other"
        d.admin.Grant(apb.GrantRequest(customer_id=customer, credit_type="usd", amount_nano=10**15))
    yield d
    assert d.proc is not None and d.proc.poll() is None, "the daemon died under fuzzing"
    assert d.stop() == 0


def _balances(d: Daemon) -> list[tuple[str, int]]:
    # Balances, not reserved amounts: a reservation of an earlier input may expire at any moment.
    r = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="acme"), timeout=10)
    return sorted((b.credit_type, b.balance_nano) for b in r.balances)


def _call(d: Daemon, method: str, data: bytes) -> None:
    service, _ = SEEDS[method]
    channel = d.admin_channel if service.endswith("Admin") else d.channel
    before = _balances(d)
    path, raw = f"/{service}/{method}", dict(request_serializer=None, response_deserializer=None)
    try:
        if method == "ReportStream":
            list(channel.stream_stream(path, **raw)(iter([data, data]), timeout=10))
        elif method == "Watch":
            list(channel.unary_stream(path, **raw)(data, timeout=0.2))
        else:
            channel.unary_unary(path, **raw)(data, timeout=10)
        return
    except grpc.RpcError as e:
        if method == "Watch" and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return  # a valid Watch stays open: it was answered, not hung
        assert e.code() in EXPECTED, (method, data, e.code(), e.details())
        assert e.details(), (method, data)  # every refusal says why
    assert _balances(d) == before, (method, data)  # a rejected call debits nothing


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    out = bytearray(data)
    for pos, value in edits:
        if out:
            out[pos % len(out)] = value
    return bytes(out[: len(out) - cut % (len(out) + 1)]) if cut else bytes(out)


FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(method=st.sampled_from(sorted(SEEDS)), data=st.binary(max_size=200))
def test_random_bytes(fuzzed, method, data):
    _call(fuzzed, method, data)


@FUZZ
@given(method=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 30))
def test_mutated_requests(fuzzed, method, edits, cut):
    _call(fuzzed, method, _mutate(SEEDS[method][1], edits, cut))


hostile = st.one_of(st.text(max_size=300), st.sampled_from(["", " ", "acme", "acme\x00", "'; DROP TABLE x; --",
                                                            "é" * 100, "\U0001F916", "a" * 5000]))
numbers = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63)]))


@FUZZ
@given(customer=hostile, meter=hostile, key=hostile, value=hostile, quantity=numbers, decimal=st.none() | hostile,
       idem=hostile)
def test_hostile_fields_in_usage(fuzzed, customer, meter, key, value, quantity, decimal, idem):
    event = pb.UsageEvent(customer_id=customer, meter=meter, dimensions={key: value}, idempotency_key=idem)
    if decimal is None:
        event.quantity = quantity
    else:
        event.quantity_decimal = decimal
    _call(fuzzed, "Report", pb.ReportRequest(event=event).SerializeToString())
    _call(fuzzed, "ReportBatch", pb.ReportBatchRequest(client_id=customer[:200], sequence=abs(quantity),
                                                       events=[EVENT, event]).SerializeToString())
    _call(fuzzed, "Authorize", pb.AuthorizeRequest(customer_id=customer, meter=meter, quantity=quantity,
                                                   dimensions={key: value}, idempotency_key=idem,
                                                   ttl_ms=abs(quantity) % 10**7).SerializeToString())


@FUZZ
@given(customer=hostile, text=hostile, amount=numbers)
def test_hostile_fields_in_admin(fuzzed, customer, text, amount):
    _call(fuzzed, "Grant", apb.GrantRequest(customer_id=customer, credit_type=text, amount_nano=amount,
                                            source=text, idempotency_key=text).SerializeToString())
    _call(fuzzed, "Adjust", apb.AdjustRequest(customer_id=customer, credit_type="usd", amount_nano=amount,
                                              reason=text).SerializeToString())
    _call(fuzzed, "Subscribe", apb.SubscribeRequest(customer_id=customer, plan=text).SerializeToString())
    _call(fuzzed, "GetStatement", apb.StatementRequest(customer_id=customer, period=text).SerializeToString())
    _call(fuzzed, "Commit", pb.CommitRequest(reservation_id=text, quantity=amount).SerializeToString())
    _call(fuzzed, "Heartbeat", pb.HeartbeatRequest(session_id=text).SerializeToString())


def test_the_fuzzed_daemon_is_still_healthy_and_consistent(fuzzed):
    # Runs after the fuzz tests in this module: what was allowed still adds up after a restart.
    before = _balances(fuzzed)
    fuzzed.restart()
    assert _balances(fuzzed) == before
