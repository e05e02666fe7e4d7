"""Duration sessions: per-second billing on meterd's clock, closed at the last
heartbeat when heartbeats stop, never past what the balance covers."""

from __future__ import annotations

import pytest
from billing import NANO, Billing

from meterd.v1 import meter_pb2 as pb


@pytest.fixture(params=["compiled", "python"])
def replicate(request, tmp_path, monkeypatch):
    b = Billing(tmp_path, "replicate", monkeypatch, core=request.param)
    yield b
    b.close()


def reserved(b: Billing, customer: str) -> int:
    return b.balance(customer).balances[0].reserved_nano


def test_a_session_bills_its_time_exactly(replicate):
    b = replicate
    s = b.start_session("lab", "gpu_seconds", hardware="nvidia-h100")
    assert (s.decision, s.closed) == (pb.DECISION_ALLOW, False)
    assert reserved(b, "lab") == 30 * 1_525_000  # the next 30 s are held
    b.advance(10_500)
    h = b.heartbeat(s.session_id)
    assert (h.billed_quantity, h.cost_nano) == ("10.500", 16_012_500)
    b.advance(20_000)
    b.heartbeat(s.session_id)
    b.advance(5_000)
    end = b.end_session(s.session_id)
    assert (end.closed, end.billed_quantity, end.cost_nano) == (True, "35.500", 54_137_500)
    assert b.bal("lab", "usd") == -54_137_500  # billed in arrears
    assert reserved(b, "lab") == 0
    assert int(float(b.balance("lab").usage[0].quantity)) == 35


def test_a_session_whose_heartbeats_stop_closes_at_the_last_one(replicate):
    b = replicate
    s = b.start_session("lab", "gpu_seconds", timeout_ms=10_000, hardware="nvidia-t4")
    b.advance(4_000)
    b.heartbeat(s.session_id)
    b.advance(60_000)  # the inference server crashed
    b.tick()
    assert b.bal("lab", "usd") == -4 * 225_000  # only the 4 s up to the last heartbeat
    assert reserved(b, "lab") == 0
    b.advance(1_000)
    late = b.heartbeat(s.session_id)  # the closed session's final answer, again; nothing more is billed
    assert late.duplicate and late.closed and late.cost_nano == 4 * 225_000
    assert b.bal("lab", "usd") == -4 * 225_000
    b.advance(86_400_000)  # past the idempotency window, and swept
    b.tick()
    with pytest.raises(Exception, match="unknown"):
        b.heartbeat(s.session_id)


def test_a_prepaid_session_stops_before_the_balance_runs_out(replicate):
    b = replicate
    s = b.start_session("hobbyist", "gpu_seconds", hardware="nvidia-a100-80gb")
    decisions = []
    for _ in range(200):
        b.advance(30_000)
        h = b.heartbeat(s.session_id)
        decisions.append(h.decision)
        if h.closed:
            break
    assert decisions[-1] == pb.DECISION_DENY and h.reason == pb.REASON_INSUFFICIENT_BALANCE
    # $5 at $0.0014/s, 30 s ($0.042) held ahead: 119 intervals, then $0.002 is left, too little for the next
    assert h.billed_quantity == "3570.000"
    assert b.bal("hobbyist", "usd") == 5 * NANO - 3570 * 1_400_000
    assert b.bal("hobbyist", "usd") >= 0
    assert reserved(b, "hobbyist") == 0


def test_sessions_survive_a_crash(replicate):
    b = replicate
    s = b.start_session("lab", "gpu_seconds", hardware="cpu")
    b.advance(3_000)
    b.heartbeat(s.session_id)
    b.restart(clean=False)
    assert reserved(b, "lab") == 30 * 100_000
    b.advance(2_000)
    end = b.end_session(s.session_id)
    assert (end.billed_quantity, end.cost_nano) == ("5.000", 500_000)
    assert reserved(b, "lab") == 0


def test_session_inputs_are_checked(replicate):
    from meterd.errors import InvalidInput
    b = replicate
    with pytest.raises(InvalidInput, match="heartbeat_timeout_ms"):
        b.start_session("lab", "gpu_seconds", timeout_ms=10, hardware="cpu")
    with pytest.raises(InvalidInput, match="dimensions"):
        b.start_session("lab", "gpu_seconds", hardware="abacus")
    r = b.start_session("nobody", "gpu_seconds", hardware="cpu")
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_UNKNOWN_CUSTOMER)
