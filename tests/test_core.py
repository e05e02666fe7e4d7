"""The compiled core and its pure-Python twin: exact money, decoding, and sameness."""

from __future__ import annotations

import importlib
import random
import struct
from fractions import Fraction

import pytest
from conftest import compiled_core_unavailable
from hypothesis import example, given, settings
from hypothesis import strategies as st

from meterd import _fastpath_py
from meterd.catalog import parse_catalog
from meterd.errors import InvalidInput
from meterd.v1 import meter_pb2 as pb

# The compiled core is imported only when this run tests it (not under --no-extensions, nor
# when it is not built): its cases are then skipped, by conftest or by needs_compiled.
NO_COMPILED = compiled_core_unavailable()
_fastpath = None if NO_COMPILED else importlib.import_module("meterd._fastpath")
needs_compiled = pytest.mark.skipif(NO_COMPILED is not None, reason=f"compares the two cores; {NO_COMPILED}")

LIMITS = dict(customer_id_bytes_max=128, client_id_bytes_max=128, batch_events_max=8000, dimensions_max=16,
              dimension_key_bytes_max=64, dimension_value_bytes_max=128,
              dimension_sets_per_window_max=1000)
CORES = {"compiled": _fastpath.Core if _fastpath else None, "python": _fastpath_py.Core}

CATALOG = {
    "credit_types": {"usd": {"kind": "fiat"}, "req": {"kind": "custom", "decimals": 3}},
    "meters": {
        "tokens": {"credit_type": "usd", "per": 1_000_000, "price_dimension": "model",
                   "prices": {"gpt-4o": "2.50", "tiny": "0.0001", "mini": "0.15"}},
        "requests": {"credit_type": "req", "price_dimension": "model", "price": "1",
                     "prices": {"haiku": "1/3", "o1": "10", "free": "0"}},
        "gpu_seconds": {"credit_type": "usd", "precision": 3, "price_dimension": "hardware",
                        "prices": {"cpu": "0.000100", "h100": "0.001525"}},
        "images": {"credit_type": "req", "price": "2/7"},
        "seats": {"credit_type": "usd", "price": "5", "aggregation": "max"},
        "calls": {"credit_type": "usd", "price": "0.001", "aggregation": "count"},
        "users": {"credit_type": "usd", "price": "2", "aggregation": "unique_count", "unique_dimension": "user"},
    },
}


# Plan 1 degrades "req" to "slow" (priority falls one step per 2 requests);
# plan 2 degrades both credit types to "relax" with no priority step.
# Plan 3 denies when empty, but the first 2,000 tokens and 3 requests of a period are free.
PLANS = [[(0, 0), (1, 2 * 10**9)], [(2, 0), (2, 0)], [(0, 0), (0, 0)]]
MODES = [b"slow", b"relax"]
FREE = [[0] * 7, [0] * 7, [2000, 3, 0, 0, 0, 0, 0]]


def make_core(kind: str, catalog: dict = CATALOG):
    denominators, meters, rates = parse_catalog(catalog, "test").compile()
    return CORES[kind](denominators, meters, rates, dict(LIMITS), 1024, PLANS, MODES, FREE, [b"usd", b"req"])


def batch(events, client_id: str = "", sequence: int = 0) -> bytes:
    return pb.ReportBatchRequest(client_id=client_id, sequence=sequence, events=events).SerializeToString()


def multi(customer="acme", parts=(), **dims) -> pb.UsageEvent:
    """An event of several quantities: (meter, quantity) pairs."""
    e = pb.UsageEvent(customer_id=customer, dimensions=dims)
    for meter, quantity in parts:
        q = e.quantities.add(meter=meter)
        if isinstance(quantity, str):
            q.quantity_decimal = quantity
        else:
            q.quantity = quantity
    return e


def ev(customer="acme", meter="tokens", quantity=1, **dims) -> pb.UsageEvent:
    e = pb.UsageEvent(customer_id=customer, meter=meter, dimensions=dims)
    if isinstance(quantity, str):
        e.quantity_decimal = quantity
    else:
        e.quantity = quantity
    return e


@pytest.fixture(params=list(CORES))
def core(request):
    c = make_core(request.param)
    idx = c.open_account(b"acme")
    c.credit(idx, 0, 1_000 * 10**9)
    c.credit(idx, 1, 500 * 10**9)
    return c


def test_a_million_tiny_events_cost_exactly_their_sum(core):
    # 1 token at $0.0001 per 1M tokens, one million times: exactly $0.0001.
    data = batch([ev(model="tiny")] * 8000)
    before = core.state(0)[0][0][0]
    for _ in range(125):
        accepted, denied, _, _ = core.apply_batch(data)
        assert (accepted, denied) == (8000, 0)
    assert before - core.state(0)[0][0][0] == 100_000  # nano-dollars = $0.0001
    assert core.state(0)[1][0] == 1_000_000


def test_three_thirds_make_exactly_one_unit(core):
    before = core.state(0)[0][1][0]
    core.apply_batch(batch([ev(meter="requests", model="haiku")] * 2))
    assert before - core.state(0)[0][1][0] == 666_666_666  # the remainder 2/3 nano is carried
    core.apply_batch(batch([ev(meter="requests", model="haiku")]))
    assert before - core.state(0)[0][1][0] == 10**9
    assert core.state(0)[0][1][3] == 0


def test_sevenths_and_thirds_share_one_credit_type_exactly(core):
    before = core.state(0)[0][1][0]
    core.apply_batch(batch([ev(meter="images")] * 7 + [ev(meter="requests", model="haiku")] * 3))
    assert before - core.state(0)[0][1][0] == 3 * 10**9


def test_decimal_quantities_are_exact(core):
    # 1.5 s of h100 at $0.001525/s = $0.0022875 = 2287500 nano
    before = core.state(0)[0][0][0]
    decision, reason, ct, cost, balance, mode, priority = core.report(
        pb.ReportRequest(event=ev(meter="gpu_seconds", quantity="1.5", hardware="h100")).SerializeToString())
    assert (decision, reason, ct, cost, mode, priority) == (pb.DECISION_ALLOW, 0, 0, 2_287_500, b"", 0)
    assert balance == before - 2_287_500
    assert core.state(0)[1][2] == 1500  # milliseconds


def test_unknown_customer_and_insufficient_balance_are_denials_not_errors(core):
    idx = core.open_account(b"poor")
    core.credit(idx, 0, 25_000)  # 10 tokens of gpt-4o at 2500 nano each
    accepted, denied, _, denials = core.apply_batch(batch(
        [ev("poor", model="gpt-4o", quantity=4)] * 3 + [ev("ghost", model="gpt-4o")]))
    assert (accepted, denied) == (2, 2)
    resp = pb.ReportBatchResponse.FromString(denials)
    assert [(d.index, d.reason) for d in resp.denials] == [
        (2, pb.REASON_INSUFFICIENT_BALANCE), (3, pb.REASON_UNKNOWN_CUSTOMER)]
    assert core.state(idx)[0][0][0] == 5_000


def test_a_free_model_is_allowed_at_zero_balance(core):
    core.open_account(b"broke")
    accepted, denied, _, _ = core.apply_batch(batch([ev("broke", meter="requests", model="free")]))
    assert (accepted, denied) == (1, 0)


@pytest.mark.parametrize("event, field", [
    (ev(meter="nope"), "events[1].meter"),
    (ev(quantity=-1), "events[1].quantity"),
    (ev(quantity=2**62, model="gpt-4o"), "events[1].quantity"),
    (ev(meter="gpu_seconds", quantity="1.2345", hardware="cpu"), "events[1].quantity_decimal"),
    (ev(meter="gpu_seconds", quantity="1e3", hardware="cpu"), "events[1].quantity_decimal"),
    (ev(meter="gpu_seconds", quantity="-1", hardware="cpu"), "events[1].quantity_decimal"),
    (ev(meter="gpu_seconds", quantity=2**62, hardware="cpu"), "events[1].quantity"),
    (ev(customer=""), "events[1].customer_id"),
    (ev(customer="x" * 129), "events[1].customer_id"),
    (ev(customer="has space"), "events[1].customer_id"),
    (ev(model="unpriced"), "events[1].dimensions"),
    (ev(**{f"k{i}": "v" for i in range(17)}), "events[1].dimensions"),
    (ev(model="v" * 129), "events[1].dimensions"),
])
def test_a_bad_event_rejects_the_whole_batch_and_debits_nothing(core, event, field):
    before = core.state(0)
    with pytest.raises(InvalidInput) as info:
        core.apply_batch(batch([ev(model="gpt-4o"), event]))
    assert info.value.field == field
    assert core.state(0) == before


@pytest.mark.parametrize("data, field", [
    (b"\x1a\x05abc", "events"),
    (b"\x1a", "events"),
    (b"\x18\x01", "events"),
    (b"\xff", "batch"),
    (b"\x0a\x03a b", "client_id"),
    (b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x7f", "sequence"),
    (b"\x1a\x02\x18\xff", "events[0].quantity"),
    (b"\x1a\x02\x0a\x05", "events[0]"),
    (b"\x0b", "client_id"),
    (b"\x23", "details"),
    (b"\x2b", "batch"),
])
def test_malformed_bytes_name_the_field(core, data, field):
    before = core.state(0)
    with pytest.raises(InvalidInput) as info:
        core.apply_batch(data)
    assert info.value.field == field
    assert core.state(0) == before


def test_batch_size_limit(core):
    with pytest.raises(InvalidInput, match="more than 8000 events"):
        core.apply_batch(batch([ev(model="gpt-4o")] * 8001))


def test_batch_header(core):
    assert core.batch_header(batch([ev(model="gpt-4o")] * 3, "client-7", 42)) == (b"client-7", 42)
    assert core.batch_header(b"") == (b"", 0)


def test_unknown_fields_are_skipped(core):
    e = ev(model="gpt-4o").SerializeToString() + b"\xa0\x06\x01" + b"\xad\x06\x00\x00\x00\x00"
    data = b"\x1a" + bytes([len(e)]) + e + b"\xf9\x06" + b"\x00" * 8
    assert core.apply_batch(data)[:3] == (1, 0, 0)


def test_reservations_hold_and_settle_with_carry(core):
    idx = core.open_account(b"r")
    core.credit(idx, 1, 10**9)
    rate = core.find_rate(1, {b"model": b"haiku"})
    ct, amount = core.quote(rate, 2)
    assert (ct, amount) == (1, 666_666_667)  # a hold rounds up
    assert core.reserve(idx, ct, amount)
    assert not core.reserve(idx, ct, 333_333_334)
    cost, overrun = core.settle(idx, rate, 1, amount)
    assert (cost, overrun) == (333_333_333, 0)
    assert core.state(idx)[0][1][:2] == (666_666_667, 0)
    assert core.reserve(idx, ct, 666_666_667)
    core.release(idx, ct, 666_666_667)
    assert core.available(idx, ct) == 666_666_667


def test_settle_records_an_overrun(core):
    idx = core.open_account(b"o")
    core.credit(idx, 0, 2500)
    rate = core.find_rate(0, {b"model": b"gpt-4o"})
    assert core.reserve(idx, 0, 2500)
    assert core.settle(idx, rate, 3, 2500) == (7500, 5000)
    assert core.state(idx)[0][0][0] == -5000


def test_overflowing_credit_is_refused(core):
    idx = core.open_account(b"big")
    core.credit(idx, 0, 2**63 - 1)
    with pytest.raises(InvalidInput):
        core.credit(idx, 0, 1)


@needs_compiled
def test_state_bytes_round_trip(core):
    core.apply_batch(batch([ev(meter="requests", model="haiku")] * 5))
    blob = core.state_bytes(0)
    other = make_core("python" if isinstance(core, _fastpath.Core) else "compiled")
    idx = other.load_state_bytes(b"acme", blob)
    assert other.state(idx) == core.state(0)
    assert other.state_bytes(idx) == blob


def test_closed_core_refuses_use(core):
    core.close()
    with pytest.raises(RuntimeError):
        core.account(b"acme")


# ---- the two cores agree -----------------------------------------------------

MODELS = ["gpt-4o", "tiny", "mini", "haiku", "o1", "free", "other"]


def random_event(rng: random.Random, customers: list[str]) -> pb.UsageEvent:
    if rng.random() < 0.15:  # one request measured by several meters of one credit type
        meters = rng.sample(["tokens", "gpu_seconds", "calls"], rng.randrange(1, 4)) if rng.random() < 0.7 \
            else rng.sample(["requests", "images"], rng.randrange(1, 3))
        parts = [(m, f"{rng.randrange(0, 100)}.{rng.randrange(0, 1000):03d}" if m == "gpu_seconds"
                  else rng.choice([0, 1, 7, rng.randrange(1, 10**6)])) for m in meters]
        return multi(rng.choice(customers), parts, model=rng.choice(MODELS[:3] if "tokens" in meters else MODELS[3:]),
                     hardware=rng.choice(["cpu", "h100"]))
    meter = rng.choice(["tokens", "requests", "gpu_seconds", "images", "seats", "calls", "users"])
    e = pb.UsageEvent(customer_id=rng.choice(customers), meter=meter)
    if meter in ("tokens", "requests"):
        e.dimensions["model"] = rng.choice(MODELS[:3] if meter == "tokens" else MODELS[3:])
    if meter == "users":
        e.dimensions["user"] = f"u{rng.randrange(50)}"
    if meter == "gpu_seconds":
        e.dimensions["hardware"] = rng.choice(["cpu", "h100"])
        e.quantity_decimal = f"{rng.randrange(0, 100)}.{rng.randrange(0, 1000):03d}"
    else:
        e.quantity = rng.choice([0, 1, 2, 3, rng.randrange(1, 10**6)])
    if rng.random() < 0.3:
        e.dimensions["region"] = rng.choice(["eu", "us"])
    return e


@needs_compiled
def test_both_cores_agree_on_many_random_events():
    rng = random.Random(20261127)
    a, b = make_core("compiled"), make_core("python")
    customers = [f"cust-{i}" for i in range(300)]
    for c in customers[:250]:  # 50 customers stay unknown
        usd, req = rng.randrange(0, 10**9), rng.randrange(0, 10**11)
        plan, alert = rng.randrange(4), rng.choice([None, rng.randrange(0, 10**9)])
        for core in (a, b):
            idx = core.open_account(c.encode())
            core.credit(idx, 0, usd)
            core.credit(idx, 1, req)
            core.set_plan(idx, plan)
            core.set_alert(idx, 0, alert)
            n = int(c.split("-")[1])
            if n % 10 == 7:  # a negotiated discount in one credit type or the other
                core.set_discount(idx, n // 10 % 2, 1 + n // 10 % 9 * 1111)
    total = 0
    for round_ in range(60):
        events = [random_event(rng, customers) for _ in range(rng.randrange(1, 4000))]
        total += len(events)
        if round_ % 10 == 9:
            events[rng.randrange(len(events))].quantity = -5  # rejected whole by both
        data = batch(events)
        if round_ % 2:
            data += b"\x20\x01"  # details: one result per event
        results = []
        for core in (a, b):
            try:
                results.append(core.apply_batch(data))
            except InvalidInput as e:
                results.append(("invalid", str(e)))
        assert results[0] == results[1]
        assert a.take_alerts() == b.take_alerts()
        if round_ % 3 == 2:
            assert sorted(a.take_usage()) == sorted(b.take_usage())
        for core in (a, b):
            core.set_clock(1_790_000_000_000 + round_ * 20_000)
        if round_ % 7 == 0:
            for core in (a, b):
                core.credit(round_ % 250, round_ % 2, 10**8)
    assert total > 100_000
    assert sorted(a.take_usage()) == sorted(b.take_usage())
    assert len(a) == len(b)
    for i in range(len(a)):
        assert a.customer_id(i) == b.customer_id(i)
        assert a.state_bytes(i) == b.state_bytes(i)


@needs_compiled
@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_both_cores_agree_on_arbitrary_bytes(data):
    results = []
    for kind in CORES:
        core = make_core(kind)
        idx = core.open_account(b"acme")
        core.credit(idx, 0, 10**12)
        out = []
        for fn in (core.apply_batch, core.report, core.report_wire, core.batch_header):
            try:
                out.append(fn(data))
            except InvalidInput as e:
                out.append(("invalid", str(e)))
        out.append(core.state_bytes(idx))
        results.append(out)
    assert results[0] == results[1]


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 90), st.integers(0, 255)), max_size=6))
def test_both_cores_agree_on_mutated_batches(mutations):
    data = bytearray(batch([ev(model="gpt-4o", quantity=7), ev(meter="gpu_seconds", quantity="2.5", hardware="cpu"),
                            multi(parts=[("tokens", 9), ("calls", 1)], model="mini"),
                            ev(meter="requests", model="haiku")], "c", 9))
    for pos, value in mutations:
        data[pos % len(data)] = value
    results = []
    for kind in CORES:
        core = make_core(kind)
        core.credit(core.open_account(b"acme"), 0, 10**12)
        try:
            results.append(core.apply_batch(bytes(data)))
        except InvalidInput as e:
            results.append(("invalid", str(e)))
        results.append(core.state_bytes(0))
    assert results[0::2] == results[0::2][:1] * 2 and results[1] == results[3]


@needs_compiled
def test_report_wire_is_what_protobuf_would_serialise():
    """The unary hot path answers in wire form; the bytes must be protobuf's own,
    for allowed, degraded and denied events, negative balances, both cores."""
    rng = random.Random(7)
    customers = [f"cust-{i}" for i in range(40)]
    cores = {kind: (make_core(kind), make_core(kind)) for kind in CORES}
    for i, c in enumerate(customers[:35]):
        usd, req = rng.choice([0, 10**6, 10**9]), rng.choice([0, 3 * 10**9])
        for core in [core for pair in cores.values() for core in pair]:
            idx = core.open_account(c.encode())
            core.credit(idx, 0, usd)
            core.credit(idx, 1, req)
            core.set_plan(idx, i % 4)
            if i % 5 == 0:
                core.set_floor(idx, 0, -10**9)  # overage: balances go negative
    seen = set()
    for _ in range(3000):
        data = pb.ReportRequest(event=random_event(rng, customers)).SerializeToString()
        answers = []
        for wire, plain in cores.values():
            try:
                out = wire.report_wire(data)
            except InvalidInput as e:
                with pytest.raises(InvalidInput, match=str(e)):
                    plain.report(data)
                answers.append(str(e))
                continue
            decision, reason, ct, cost, balance, mode, priority = plain.report(data)
            expected = pb.ReportResponse(decision=decision, reason=reason, credit_type=["usd", "req"][ct],
                                         cost_nano=cost, balance_nano=balance, mode=mode.decode(),
                                         priority=priority).SerializeToString()
            assert out == (decision, expected)
            answers.append(out)
            seen.add((decision, balance < 0))
        assert answers[0] == answers[1]
    assert {(pb.DECISION_ALLOW, False), (pb.DECISION_ALLOW, True), (pb.DECISION_DENY, False),
            (pb.DECISION_DEGRADE, False)} <= seen
    for wire, plain in cores.values():
        assert [wire.state_bytes(i) for i in range(len(wire))] == [plain.state_bytes(i) for i in range(len(plain))]


UTF8_CASES = [b"gpt-4o", "δοκιμή".encode(), "模型".encode(), "🤖".encode(), b"\xff", b"\xc0\xaf", b"\xe0\x80\xaf",
              b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xe2\x82", b"a\x80", b"\xf5\x80\x80\x80",
              b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf", b"\xc2"]


@pytest.mark.parametrize("value", UTF8_CASES)
def test_dimensions_must_be_utf8_as_protobuf_requires(core, value):
    # An aggregate keyed by bytes no client or ledger can read would stall the flush.
    entry = b"\x0a\x06region\x12" + bytes([len(value)]) + value
    event = ev(model="gpt-4o").SerializeToString() + b"\x2a" + bytes([len(entry)]) + entry
    valid = True
    try:
        pb.UsageEvent.FromString(event)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        valid = False
    assert valid == (value.decode("utf-8", "ignore").encode() == value)
    data = batch([]) + b"\x1a" + bytes([len(event)]) + event
    before = core.state_bytes(0)
    if valid:
        assert core.apply_batch(data)[:2] == (1, 0)
    else:
        with pytest.raises(InvalidInput, match=r"events\[0\]\.dimensions: must be valid UTF-8"):
            core.apply_batch(data)
        with pytest.raises(InvalidInput, match=r"event\.dimensions: must be valid UTF-8"):
            core.report_wire(b"\x0a" + bytes([len(event)]) + event)
        assert core.state_bytes(0) == before


def test_report_wire_leaves_an_event_with_an_idempotency_key_alone(core):
    before = core.state_bytes(0)
    keyed = pb.ReportRequest(event=pb.UsageEvent(customer_id="acme", meter="tokens", quantity=5,
                                                 dimensions={"model": "gpt-4o"}, idempotency_key="k1"))
    assert core.report_wire(keyed.SerializeToString()) is None
    assert core.state_bytes(0) == before and core.usage_pending() == 0
    with pytest.raises(InvalidInput, match="event.quantity"):  # still checked first
        keyed.event.quantity = -1
        core.report_wire(keyed.SerializeToString())


def test_reserved_total_cannot_overflow(core):
    idx = core.open_account(b"huge")
    core.credit(idx, 0, 2**63 - 1)
    core.set_floor(idx, 0, -(2**62))
    assert core.reserve(idx, 0, 2**63 - 1)
    with pytest.raises(InvalidInput):
        core.reserve(idx, 0, 2**62)
    assert core.available(idx, 0) == 2**62
    assert len(core.state_bytes(idx)) == 8 * (6 * 2 + 7 + 1 + 1)  # credit types, meters, plan, no distinct values


def test_overflow_reason_is_in_the_api():
    assert pb.Reason.Name(3) == "REASON_OVERFLOW"


def test_an_empty_pool_degrades_on_a_plan_with_a_fallback(core):
    idx = core.open_account(b"pro")
    core.credit(idx, 1, 2 * 10**9)  # two premium requests
    core.set_plan(idx, 1)           # "slow" when empty; priority falls one per 2 requests degraded
    events = [ev("pro", meter="requests", model="o1")] + [ev("pro", meter="requests", model="gpt-4o")] * 6
    accepted, denied, degraded, details = core.apply_batch(batch(events))
    assert (accepted, denied, degraded) == (7, 0, 5)
    resp = pb.ReportBatchResponse.FromString(details)
    assert [(d.index, d.mode, d.priority) for d in resp.degradations] == [
        (0, "slow", 95), (3, "slow", 95), (4, "slow", 94), (5, "slow", 94), (6, "slow", 93)]
    cts, use, plan = core.state(idx)
    assert (cts[1][0], cts[1][4], use[1], plan) == (0, 14 * 10**9, 7, 1)
    # usd has no fallback on plan 1: an empty usd balance still denies
    r = core.report(pb.ReportRequest(event=ev("pro", model="gpt-4o")).SerializeToString())
    assert r[:2] == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE)
    core.set_plan(idx, 2)
    r = core.report(pb.ReportRequest(event=ev("pro", model="gpt-4o")).SerializeToString())
    assert (r[0], r[5], r[6]) == (pb.DECISION_DEGRADE, b"relax", 100)
    core.reset_usage(idx)
    assert core.state(idx)[0][1][4] == 0 and core.state(idx)[1] == [0] * 7


def test_low_balance_alerts_fire_once_per_crossing(core):
    idx = core.open_account(b"low")
    core.credit(idx, 0, 10 * 10**9)
    core.set_alert(idx, 0, 5 * 10**9)
    core.apply_batch(batch([ev("low", model="gpt-4o", quantity=1_000_000)] * 3))  # $2.50 each
    assert core.take_alerts() == [(idx, 0)]
    core.apply_batch(batch([ev("low", model="gpt-4o", quantity=1_000_000)]))
    assert core.take_alerts() == []
    core.credit(idx, 0, 10 * 10**9)
    core.credit(idx, 0, -10 * 10**9)
    assert core.take_alerts() == [(idx, 0)]


def test_count_and_max_meters(core):
    core.apply_batch(batch([ev(meter="calls", quantity=500)] * 3 + [ev(meter="seats", quantity=q) for q in (3, 7, 5)]))
    cts, use, _ = core.state(0)
    assert (use[4], use[5]) == (7, 3)  # seats: the maximum; calls: three events
    assert cts[0][0] == 1_000 * 10**9 - 3 * 1_000_000  # calls cost per event; seats at period end


def test_free_units_of_a_plan_come_first(core):
    idx = core.open_account(b"free")
    core.credit(idx, 0, 10**9)
    core.set_plan(idx, 3)
    costs = [core.report(pb.ReportRequest(event=ev("free", model="gpt-4o", quantity=q)).SerializeToString())[3]
             for q in (1500, 1000, 100)]
    assert costs == [0, 500 * 2500, 100 * 2500]  # 2,000 free, then $2.50 per 1M
    core.reset_usage(idx)
    assert core.report(pb.ReportRequest(event=ev("free", model="gpt-4o", quantity=10)).SerializeToString())[3] == 0


@needs_compiled
def test_unique_count_meters_count_distinct_values_per_period(core):
    events = [ev(meter="users", quantity=0, user=u) for u in ("ann", "bob", "ann", "cy", "bob")]
    assert core.apply_batch(batch(events))[:3] == (5, 0, 0)
    assert core.state(0)[1][6] == 3
    blob = core.state_bytes(0)
    other = make_core("python" if isinstance(core, _fastpath.Core) else "compiled")
    idx = other.load_state_bytes(b"acme", blob)
    assert other.state_bytes(idx) == blob and other.uniques(idx) == core.uniques(0)
    other.apply_batch(batch([ev(meter="users", user="ann"), ev(meter="users", user="dee")]))
    assert other.state(idx)[1][6] == 4  # ann was seen this period already
    core.reset_usage(0)
    core.apply_batch(batch([ev(meter="users", user="ann")]))
    assert core.state(0)[1][6] == 1 and len(core.uniques(0)) == 1
    with pytest.raises(InvalidInput, match="needs the 'user' dimension"):
        core.apply_batch(batch([ev(meter="users")]))
    assert core.force_charge(0, core.find_rate(6, {}), 1) == 2 * 10**9


def test_many_distinct_values_survive_growth_and_period_resets(core):
    core.set_dimension_sets_capped(False)  # 5,000 distinct values in one window: more than the cap allows
    for period in range(3):
        for chunk in range(5):
            fresh = range(chunk * 1000, chunk * 1000 + 1000)
            core.apply_batch(batch([ev(meter="users", user=f"p{period}-{i}") for i in fresh]
                                   + [ev(meter="users", user=f"p{period}-{i}") for i in range(0, 500)]))
        assert core.state(0)[1][6] == 5000
        assert len(core.uniques(0)) == 5000
        core.reset_usage(0)


def test_batch_details_give_every_decision(core):
    idx = core.open_account(b"pro")
    core.credit(idx, 1, 2 * 10**9)
    core.set_plan(idx, 1)
    req = pb.ReportBatchRequest(details=True, events=[
        ev(model="gpt-4o", quantity=1000), ev("pro", meter="requests", model="o1"),
        ev("pro", meter="requests", model="haiku"), ev("ghost", model="gpt-4o")])
    accepted, denied, degraded, blob = core.apply_batch(req.SerializeToString())
    resp = pb.ReportBatchResponse.FromString(blob)
    got = [(r.index, r.decision, r.reason, r.credit_type, r.cost_nano, r.balance_nano, r.mode, r.priority)
           for r in resp.results]
    assert got == [
        (0, pb.DECISION_ALLOW, 0, "usd", 2_500_000, 1000 * 10**9 - 2_500_000, "", 0),
        (1, pb.DECISION_DEGRADE, 0, "req", 0, 2 * 10**9, "slow", 95),
        (2, pb.DECISION_ALLOW, 0, "req", 333_333_333, 1_666_666_667, "", 0),
        (3, pb.DECISION_DENY, pb.REASON_UNKNOWN_CUSTOMER, "usd", 0, 0, "", 0)]
    assert (accepted, denied, degraded) == (3, 1, 1)


def _dims(raw: bytes) -> dict:
    return dict(pb.UsageEvent.FromString(raw).dimensions)


def test_usage_is_aggregated_by_customer_meter_dimensions_and_window(core):
    core.set_clock(1_790_000_030_000)  # 30 s into a minute
    first = pb.UsageEvent(customer_id="acme", meter="tokens", quantity=1000)
    first.dimensions["model"] = "gpt-4o"
    first.dimensions["project"] = "p1"
    # The same set in the other order lands in the same aggregate.
    swapped = pb.UsageEvent(customer_id="acme", meter="tokens", quantity=3000)
    swapped.dimensions["project"] = "p1"
    swapped.dimensions["model"] = "gpt-4o"
    core.apply_batch(batch([first, swapped, ev(quantity=7, model="mini"), ev("nobody", quantity=5, model="mini")]))
    core.set_clock(1_790_000_061_000)  # the next minute
    core.apply_batch(batch([ev(quantity=7, model="mini")]))
    rows = sorted((w, tuple(sorted(_dims(d).items())), c, m, q, cost, n)
                  for c, m, d, w, q, cost, n, _ in core.take_usage())
    minute = 1_790_000_030_000 - 1_790_000_030_000 % 60_000
    # 4,000 gpt-4o tokens at $2.50 per million: $0.01; 7 mini tokens at $0.15 per million: 1,050 nano.
    assert rows == [
        (minute, (("model", "gpt-4o"), ("project", "p1")), b"acme", 0, 4000, 10_000_000, 2),
        (minute, (("model", "mini"),), b"acme", 0, 7, 1050, 1),
        (minute + 60_000, (("model", "mini"),), b"acme", 0, 7, 1050, 1),
    ]
    assert core.take_usage() == []  # handed over once


def test_usage_counts_what_was_allowed_and_what_it_cost(core):
    poor = core.open_account(b"poor")
    core.credit(poor, 0, 2_000_000)  # $0.002: 10k mini tokens ($0.0015) fit, 10k gpt-4o ($0.025) do not
    result = core.apply_batch(batch([ev("poor", quantity=10_000, model="mini"), ev("poor", quantity=10_000,
                                                                                   model="gpt-4o")]))
    assert result[:2] == (1, 1)
    rows = core.take_usage()
    assert [(c, _dims(d), q, cost, n, bal) for c, m, d, w, q, cost, n, bal in rows] == [
        (b"poor", {"model": "mini"}, 10_000, 1_500_000, 1, 500_000)]  # and the balance after it


def test_settled_reservations_count_as_usage_with_their_price_dimension(core):
    idx = core.account(b"acme")
    rate = core.find_rate(0, {b"model": b"gpt-4o"})
    assert core.reserve(idx, 0, 10**9)
    cost, _ = core.settle(idx, rate, 2000, 10**9)
    rows = core.take_usage()
    assert [(c, m, _dims(d), q, cost_, n) for c, m, d, w, q, cost_, n, _ in rows] == [
        (b"acme", 0, {"model": "gpt-4o"}, 2000, cost, 1)]
    assert cost == 5_000_000  # 2,000 gpt-4o tokens: $0.005


@pytest.mark.parametrize("kind", list(CORES))
def test_degraded_usage_is_counted_without_cost(kind):
    c = make_core(kind)
    idx = c.open_account(b"slow")
    c.set_plan(idx, 2)  # relax when empty
    assert c.apply_batch(batch([ev("slow", meter="requests", quantity=3, model="o1")]))[:3] == (1, 0, 1)
    assert [(q, cost, n) for *_, q, cost, n, _ in c.take_usage()] == [(3, 0, 1)]


@pytest.mark.parametrize("kind", list(CORES))
def test_aggregates_past_64_bits_are_exact(kind):
    """A window's sum may pass 64 bits (quantity, and cost with top-ups between events);
    each core gives exactly these rows."""
    c = make_core(kind)
    idx = c.open_account(b"huge")
    c.set_clock(1_790_000_000_000)
    for _ in range(3):
        c.credit(idx, 0, 2**63 - 1 - c.state(idx)[0][0][0])
        c.reset_usage(idx)  # a new period: its usage counter starts again, the window's aggregate does not
        # 3.6e15 gpt-4o tokens cost 9e18 nano; "free" requests cost nothing however many.
        c.apply_batch(batch([ev("huge", quantity=3_600_000_000_000_000, model="gpt-4o"),
                             ev("huge", meter="requests", quantity=2**62, model="free")]))
    rows = sorted((m, q, cost, n) for _, m, _, _, q, cost, n, _ in c.take_usage())
    assert rows == [(0, 3 * 3_600_000_000_000_000, 3 * 9 * 10**18, 3), (1, 3 * 2**62, 0, 3)]
    c.apply_batch(batch([ev("huge", meter="requests", quantity=1, model="free")]))
    assert [(q, n) for *_, q, _, n, _ in c.take_usage()] == [(1, 1)]  # nothing of the sums is left behind


@needs_compiled
def test_reservations_floors_degradation_and_thresholds_return_to_their_defaults():
    """The compiled core keeps these apart from the account row; both cores give the same states."""
    cores = [make_core(kind) for kind in CORES]
    for c in cores:
        for name in (b"plain", b"floor", b"held", b"slow"):
            c.credit(c.open_account(name), 0, 10**9)
        c.set_floor(c.account(b"plain"), 0, 0)
        c.set_alert(c.account(b"plain"), 1, None)
        c.set_floor(c.account(b"floor"), 0, -5 * 10**9)
        c.set_alert(c.account(b"floor"), 0, 10**8)
        held = c.account(b"held")
        assert c.reserve(held, 0, 4 * 10**8)
        c.release(held, 0, 4 * 10**8)
        slow = c.account(b"slow")
        c.set_plan(slow, 2)
        c.apply_batch(batch([ev("slow", quantity=10**9, model="gpt-4o")]))  # $2,500: degraded
        assert c.state(slow)[0][0][4] == 2_500 * 10**9
        c.reset_usage(slow)
        c.apply_batch(batch([ev("floor", quantity=10**6, model="gpt-4o")]))  # $2.50 of $1, floor -$5
        assert c.take_alerts() == [(c.account(b"floor"), 0)]
    states = [[c.state_bytes(i) for i in range(len(c))] for c in cores]
    assert states[0] == states[1]
    for c in cores:
        assert c.state(c.account(b"plain"))[0] == [(10**9, 0, 0, 0, 0, -(2**63)), (0, 0, 0, 0, 0, -(2**63))]
        assert c.state(c.account(b"floor"))[0][0][1:3] == (0, -5 * 10**9)
        assert c.state(c.account(b"slow"))[0][0][4] == 0


@needs_compiled
def test_load_states_loads_many_snapshot_records():
    src = make_core("compiled")
    for i in range(3000):
        idx = src.open_account(b"c%d" % i)
        src.credit(idx, i % 2, i * 1000)
        if i % 7 == 0:
            src.set_floor(idx, 0, -i)
    records = [(src.customer_id(i), src.state_bytes(i)) for i in range(len(src))]
    for kind in CORES:
        c = make_core(kind)
        assert c.load_states(iter(records)) == 3000
        assert [(c.customer_id(i), c.state_bytes(i)) for i in range(len(c))] == records
        assert c.take_dirty() == []
        with pytest.raises(ValueError):
            c.load_states([(b"bad", b"\x00" * 8)])


# ---- dimension sets, as protobuf sees them ---------------------------------------


def _len(data: bytes) -> bytes:
    """A length as protobuf writes it (a varint: one byte below 128, more above)."""
    n, out = len(data), bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def _entry(body: bytes) -> bytes:
    return b"\x2a" + _len(body) + body


def _kv(key: bytes, value: bytes) -> bytes:
    return b"\x0a" + _len(key) + key + b"\x12" + _len(value) + value


def _event_bytes(*entries: bytes, customer: bytes = b"acme", meter: bytes = b"requests", quantity: int = 3) -> bytes:
    return (b"\x0a" + _len(customer) + customer + b"\x12" + _len(meter) + meter
            + b"\x18" + bytes([quantity]) + b"".join(entries))


def _wrap_batch(*events: bytes) -> bytes:
    return b"".join(b"\x1a" + _len(e) + e for e in events)


def _usage(core) -> list:
    return sorted((c, m, tuple(sorted(_dims(d).items())), q, cost, n)
                  for c, m, d, _, q, cost, n, _ in core.take_usage())


def test_sets_that_differ_by_one_character_are_apart_and_keep_their_own_labels(core):
    """The sums of the entries' hashes of these two sets are equal: they were one aggregate."""
    other = core.open_account(b"other")
    core.credit(other, 0, 10**12)
    a = ev(meter="tokens", quantity=1000, model="gpt-4o", user="u0")
    b = ev(meter="tokens", quantity=1000, model="mini", user="u1")
    pairs = [{"model": "m-a", "user": "u0"}, {"model": "m-b", "user": "u1"}]
    c = [ev(meter="images", quantity=1, **p) for p in pairs]
    core.apply_batch(batch([a, ev("other", meter="tokens", quantity=1000, model="mini", user="u1"), c[0]]))
    core.report(pb.ReportRequest(event=b).SerializeToString())
    core.report(pb.ReportRequest(event=c[1]).SerializeToString())
    assert _usage(core) == [
        (b"acme", 0, (("model", "gpt-4o"), ("user", "u0")), 1000, 2_500_000, 1),
        (b"acme", 0, (("model", "mini"), ("user", "u1")), 1000, 150_000, 1),
        (b"acme", 3, (("model", "m-a"), ("user", "u0")), 1, 285_714_285, 1),  # 2/7, the rest carried
        (b"acme", 3, (("model", "m-b"), ("user", "u1")), 1, 285_714_286, 1),
        (b"other", 0, (("model", "mini"), ("user", "u1")), 1000, 150_000, 1)]


def test_the_same_set_in_any_order_or_with_a_repeated_key_is_one_set(core):
    """As protobuf's map: entries in any order, and of a repeated key the last wins."""
    events = [_event_bytes(_entry(_kv(b"model", b"o1")), _entry(_kv(b"region", b"eu"))),
              _event_bytes(_entry(_kv(b"region", b"eu")), _entry(_kv(b"model", b"o1"))),
              _event_bytes(_entry(_kv(b"model", b"haiku")), _entry(_kv(b"region", b"eu")),
                           _entry(_kv(b"model", b"o1"))),
              _event_bytes(_entry(_kv(b"model", b"o1") + b"\x12\x02eu"[:0]), _entry(_kv(b"region", b"us")
                                                                               + b"\x12\x02eu"))]
    core.apply_batch(_wrap_batch(*events))
    assert [dict(pb.UsageEvent.FromString(e).dimensions) for e in events] == [{"model": "o1", "region": "eu"}] * 4
    assert _usage(core) == [(b"acme", 1, (("model", "o1"), ("region", "eu")), 12, 120 * 10**9, 4)]


# Map entries as protobuf's parser treats them: an entry with a field other than its
# key and value (wire type 2) is no entry at all (it goes to the unknown fields).
ENTRIES = [
    _entry(_kv(b"model", b"o1") + b"\x18\x01"),                      # unknown varint field
    _entry(b"\x0a\x05model" + b"\x1a\x01x" + b"\x12\x02o1"),          # unknown length-delimited, in the middle
    _entry(_kv(b"model", b"o1") + b"\x25\x01\x02\x03\x04"),          # unknown fixed32
    _entry(_kv(b"model", b"o1") + b"\x21" + b"\x00" * 8),            # unknown fixed64
    _entry(b"\x08\x01" + b"\x12\x02o1"),                             # the key with a wrong wire type
    _entry(b"\x0a\x05model" + b"\x10\x01"),                          # the value with a wrong wire type
    _entry(b"\x0a\x05model"),                                        # no value: ""
    _entry(b"\x0a\x05model\x12\x05haiku\x12\x02o1"),                 # the value twice: the last
    _entry(b"\x0a\x03xxx\x0a\x05model\x12\x02o1"),                   # the key twice: the last
]


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("kind", list(CORES))
def test_map_entries_are_rated_and_filed_as_protobuf_parses_them(kind, entry):
    """The raw event against the event protobuf parses from it, re-encoded: the same
    decision, cost, balance and ledger row. A dropped entry leaves the default
    price (1 credit) where o1 costs 10."""
    raw = _event_bytes(entry, _entry(_kv(b"region", b"eu")))
    parsed = pb.UsageEvent.FromString(raw)
    clean = pb.UsageEvent(customer_id=parsed.customer_id, meter=parsed.meter, quantity=parsed.quantity,
                          dimensions=dict(parsed.dimensions)).SerializeToString()
    results = []
    for data in (raw, clean):
        c = make_core(kind)
        c.credit(c.open_account(b"acme"), 1, 10**12)
        report = c.report(b"\x0a" + bytes([len(data)]) + data)
        applied = c.apply_batch(_wrap_batch(data))
        results.append((report, applied, c.state_bytes(0), _usage(c)))
    assert results[0] == results[1]
    expected = 10 if parsed.dimensions.get("model") == "o1" else 1
    assert results[0][0][3] == 3 * expected * 10**9


def test_field_number_zero_is_malformed_as_protobuf_says(core):
    event = ev(model="gpt-4o").SerializeToString()
    cases = {
        "batch": (b"\x00\x01" + _wrap_batch(event), pb.ReportBatchRequest),
        "events[0]": (_wrap_batch(event + b"\x00\x01"), pb.ReportBatchRequest),
        "events[0].dimensions": (_wrap_batch(_event_bytes(_entry(_kv(b"model", b"o1") + b"\x02\x00"))),
                                 pb.ReportBatchRequest),
    }
    before = core.state_bytes(0)
    for field, (data, message) in cases.items():
        with pytest.raises(Exception, match="Wire format was corrupt"):
            message.FromString(data)
        with pytest.raises(InvalidInput, match="field number 0") as info:
            core.apply_batch(data)
        assert info.value.field == field
    with pytest.raises(InvalidInput, match="field number 0"):
        core.batch_header(b"\x00\x01")
    for data, field in ((b"\x00\x01\x0a" + bytes([len(event)]) + event, "event"),
                        (b"\x0a" + bytes([len(event) + 2]) + event + b"\x00\x01", "event")):
        with pytest.raises(Exception, match="Wire format was corrupt"):
            pb.ReportRequest.FromString(data)
        for fn in (core.report, core.report_wire):
            with pytest.raises(InvalidInput, match="field number 0") as info:
                fn(data)
            assert info.value.field == field
    assert core.state_bytes(0) == before and core.take_usage() == []


@pytest.mark.parametrize("field, tag", [("idempotency_key", 0x3A), ("customer_id", 0x0A), ("meter", 0x12),
                                        ("quantity_decimal", 0x22)])
def test_invalid_utf8_in_any_string_of_a_batch_is_refused_as_protobuf_refuses_it(core, field, tag):
    """Every occurrence of a string field is checked, also one that a later one replaces."""
    good = ev(model="gpt-4o").SerializeToString()
    data = _wrap_batch(good + bytes([tag, 2]) + b"\xc3\x28" + good)  # a later valid one wins in the core's view
    with pytest.raises(Exception, match="bad UTF-8"):
        pb.ReportBatchRequest.FromString(data)
    before = core.state_bytes(0)
    with pytest.raises(InvalidInput, match="UTF-8") as info:
        core.apply_batch(data)
    assert info.value.field == f"events[0].{field}"
    assert core.state_bytes(0) == before
    with pytest.raises(InvalidInput, match="UTF-8"):
        core.apply_batch(b"\x0a\x02\xc3\x28" + _wrap_batch(good))  # the client id
    with pytest.raises(InvalidInput, match="UTF-8"):
        core.batch_header(b"\x0a\x02\xc3\x28")


def test_a_missing_price_names_the_meter_the_dimension_and_the_value(core):
    with pytest.raises(InvalidInput) as info:
        core.apply_batch(batch([ev(model="gpt-5")]))
    assert str(info.value) == "events[0].dimensions: meter 'tokens' has no price for model='gpt-5' and no default"
    with pytest.raises(InvalidInput) as info:
        core.report(pb.ReportRequest(event=ev(region="eu")).SerializeToString())
    assert str(info.value) == "event.dimensions: meter 'tokens' needs the 'model' dimension: it has no default price"


def test_too_many_decimals_names_the_meters_precision(core):
    with pytest.raises(InvalidInput) as info:
        core.apply_batch(batch([ev(meter="gpu_seconds", quantity="1.2345", hardware="cpu")]))
    assert str(info.value) == "events[0].quantity_decimal: meter 'gpu_seconds' has precision 3: at most 3 decimals"
    with pytest.raises(InvalidInput) as info:
        core.apply_batch(batch([ev(meter="images", quantity="1.5")]))
    assert str(info.value) == "events[0].quantity_decimal: meter 'images' counts whole units (precision 0): no decimals"


# ---- distinct values by their bytes --------------------------------------------


@needs_compiled
def test_distinct_values_are_kept_by_their_bytes_and_snapshots_of_hashes_still_load():
    def old_record(core, idx, values):  # the format that kept only 64-bit hashes
        words = core.state_bytes(idx)[:8 * (6 * 2 + 7 + 1)]
        return words + struct.pack("<q", len(values)) + b"".join(
            struct.pack("<qQ", 6, _fastpath_py._hash64(v)) for v in values)

    results = []
    for kind in CORES:
        c = make_core(kind)
        idx = c.open_account(b"acme")
        c.apply_batch(batch([ev(meter="users", user="ann")]))
        assert c.uniques(idx) == [(6, b"ann")]
        c.reset_usage(idx)
        c.load_state_bytes(b"acme", old_record(c, idx, [b"bob", b"cy"]))
        assert c.uniques(idx) == [(6, _fastpath_py._hash64(b"bob")), (6, _fastpath_py._hash64(b"cy"))]
        c.apply_batch(batch([ev(meter="users", user=u) for u in ("bob", "dee", "cy", "dee")]))
        assert c.state(idx)[1][6] == 1  # bob and cy were seen (by their hashes), dee is new
        blob = c.state_bytes(idx)
        other = make_core(kind)
        assert other.uniques(other.load_state_bytes(b"acme", blob)) == c.uniques(idx)
        assert other.state_bytes(0) == blob
        results.append(blob)
    assert results[0] == results[1]


# ---- dimension_sets_per_window_max ---------------------------------------------------


def capped_core(kind: str, limit: int):
    denominators, meters, rates = parse_catalog(CATALOG, "test").compile()
    c = CORES[kind](denominators, meters, rates, dict(LIMITS, dimension_sets_per_window_max=limit), 1024, PLANS,
                    MODES, FREE, [b"usd", b"req"])
    for name in (b"acme", b"beta"):
        c.credit(c.open_account(name), 0, 10**12)
    c.set_clock(1_790_000_000_000)
    return c


@pytest.mark.parametrize("kind", list(CORES))
def test_new_dimension_sets_past_the_cap_are_refused_whole(kind):
    c = capped_core(kind, 3)
    sets = [ev(model="mini", request=f"r{i}") for i in range(4)]
    assert c.apply_batch(batch(sets[:2] + [ev("ghost", model="mini", request="x")] * 5))[:2] == (2, 5)
    c.take_usage()  # the window's sets stay counted after a snapshot
    before = c.state_bytes(0)
    with pytest.raises(InvalidInput) as info:
        c.apply_batch(batch([sets[0], sets[2], sets[3]]))
    assert info.value.field == "events[2].dimensions"
    assert "customer 'acme' has 3 distinct dimension sets in this usage window" in str(info.value)
    assert "dimension_sets_per_window_max" in str(info.value)
    assert c.state_bytes(0) == before and c.take_usage() == []  # nothing applied
    with pytest.raises(InvalidInput, match="dimension_sets_per_window_max") as info:
        c.apply_batch(batch([sets[2], sets[3]]))
    assert info.value.field == "events[1].dimensions"
    assert c.apply_batch(batch(sets[:3] * 2))[:2] == (6, 0)  # the third fits, the known ones count once
    with pytest.raises(InvalidInput, match="dimension_sets_per_window_max") as info:
        c.report(pb.ReportRequest(event=sets[3]).SerializeToString())
    assert info.value.field == "event.dimensions"
    assert c.report(pb.ReportRequest(event=ev("beta", model="mini", request="r3")).SerializeToString())[0] == 1
    # Settlements are not refused (the work was done); a unique_count meter's sets count like any other.
    rate = c.find_rate(0, {b"model": b"gpt-4o"})
    assert c.reserve(0, 0, 10**6)
    c.settle(0, rate, 10, 10**6)
    with pytest.raises(InvalidInput, match="dimension_sets_per_window_max"):
        c.apply_batch(batch([ev(meter="users", user=f"u{i}") for i in range(10)]))
    assert c.uniques(0) == []
    c.set_dimension_sets_capped(False)  # as while the log is replayed
    assert c.apply_batch(batch([sets[3]]))[:2] == (1, 0)
    c.set_dimension_sets_capped(True)
    c.set_clock(1_790_000_060_000)  # a new window
    assert c.apply_batch(batch([ev(model="mini", request=f"n{i}") for i in range(3)]))[:2] == (3, 0)


@needs_compiled
def test_both_cores_agree_on_random_sets_under_a_cap():
    rng = random.Random(12)
    a, b = capped_core("compiled", 20), capped_core("python", 20)
    for round_ in range(200):
        events = [ev(rng.choice(["acme", "beta", "ghost"]), model=rng.choice(["mini", "gpt-4o"]),
                     **{rng.choice(["user", "request"]): f"v{rng.randrange(12)}"}) for _ in range(rng.randrange(1, 6))]
        data = batch(events) if round_ % 3 else pb.ReportRequest(event=events[0]).SerializeToString()
        out = []
        for c in (a, b):
            try:
                out.append((c.apply_batch if round_ % 3 else c.report)(data))
            except InvalidInput as e:
                out.append(("invalid", str(e)))
            if round_ % 7 == 0:
                out.append(c.take_usage())
            if round_ % 50 == 49:
                c.set_clock(1_790_000_000_000 + round_ * 1000)
        assert out[:len(out) // 2] == out[len(out) // 2:]
    assert a.take_usage() == b.take_usage()
    assert [a.state_bytes(i) for i in range(len(a))] == [b.state_bytes(i) for i in range(len(b))]


_ENTRY_PARTS = st.sampled_from([
    b"\x0a\x05model", b"\x0a\x04user", b"\x0a\x06region", b"\x12\x02o1", b"\x12\x05haiku", b"\x12\x00", b"\x12\x02eu",
    b"\x18\x01", b"\x1a\x01x", b"\x25\x01\x02\x03\x04", b"\x08\x07", b"\x10\x01", b"\x02\x00", b"\x12\x02\xc3\x28",
])


@needs_compiled
@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_ENTRY_PARTS, max_size=4), max_size=5))
@example([[b"\x0a\x05model"] * 4] * 5)  # an event past 127 bytes: its length takes two bytes
def test_both_cores_rate_and_file_random_map_entries_as_protobuf_parses_them(entries):
    """Random map entries (unknown fields, wrong wire types, repeated keys and values,
    field number 0, bad UTF-8): both cores give the same answer, refuse what protobuf
    refuses, and otherwise rate and file the event as protobuf's parse of it."""
    raw = _event_bytes(*(_entry(b"".join(parts)) for parts in entries))
    try:
        parsed = pb.UsageEvent.FromString(raw)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        parsed = None
    outcomes = []
    for kind in CORES:
        c = make_core(kind)
        c.credit(c.open_account(b"acme"), 1, 10**12)
        try:
            outcomes.append((c.apply_batch(_wrap_batch(raw)), c.state_bytes(0), _usage(c)))
        except InvalidInput as e:
            outcomes.append(("invalid", str(e)))
    assert outcomes[0] == outcomes[1]
    if parsed is None:
        assert outcomes[0][0] == "invalid"
        return
    if outcomes[0][0] == "invalid":  # the core's own limits (an empty key), never a dimension protobuf dropped
        assert "" in parsed.dimensions
        return
    clean = pb.UsageEvent(customer_id="acme", meter="requests", quantity=3, dimensions=dict(parsed.dimensions))
    c = make_core("compiled")
    c.credit(c.open_account(b"acme"), 1, 10**12)
    assert (c.apply_batch(batch([clean])), c.state_bytes(0), _usage(c)) == outcomes[0]


def test_a_report_with_its_event_given_twice_is_refused_not_rated_on_one_part(core):
    first = _event_bytes(_entry(_kv(b"model", b"o1")))
    second = pb.UsageEvent(customer_id="acme", meter="requests", quantity=3).SerializeToString()
    data = b"".join(b"\x0a" + bytes([len(e)]) + e for e in (first, second))
    assert pb.ReportRequest.FromString(data).event.dimensions == {"model": "o1"}  # protobuf merges the two
    before = core.state_bytes(0)
    for fn in (core.report, core.report_wire):
        with pytest.raises(InvalidInput, match="appears more than once") as info:
            fn(data)
        assert info.value.field == "event"
    assert core.state_bytes(0) == before and core.take_usage() == []


def test_an_idempotency_key_given_twice_is_the_last_one_as_protobuf_reads_it(core):
    event = pb.UsageEvent(customer_id="acme", meter="requests", quantity=3).SerializeToString()
    for keys, keyed in ((b"\x3a\x01k\x3a\x00", False), (b"\x3a\x00\x3a\x01k", True)):
        body = event + keys
        data = b"\x0a" + bytes([len(body)]) + body
        assert bool(pb.ReportRequest.FromString(data).event.idempotency_key) == keyed
        assert (core.report_wire(data) is None) == keyed  # a keyed event is left for the key check


@pytest.mark.parametrize("tag", [b"\x88\x80\x80\x80\x80\x00", b"\x80\x80\x80\x80\x10"])  # 6 bytes; 2**32
def test_field_tags_protobuf_refuses_are_refused(core, tag):
    event = ev(model="gpt-4o").SerializeToString() + tag + b"\x01"
    data = _wrap_batch(event)
    with pytest.raises(Exception, match="Wire format was corrupt"):
        pb.ReportBatchRequest.FromString(data)
    before = core.state_bytes(0)
    with pytest.raises(InvalidInput, match="bad varint"):
        core.apply_batch(data)
    assert core.state_bytes(0) == before and core.take_usage() == []


# ---- one request, several quantities -------------------------------------------------------


def test_an_event_of_several_quantities_is_allowed_or_denied_as_a_whole(core):
    idx = core.open_account(b"one")
    core.credit(idx, 0, 3_000_000)  # $0.003
    core.set_alert(idx, 0, 2_000_000)
    before = core.state_bytes(idx)
    # 1,000 gpt-4o tokens ($0.0025) fit; with the call ($0.001) they do not: neither is charged
    e = multi("one", [("tokens", 1000), ("calls", 1)], model="gpt-4o")
    assert core.report(pb.ReportRequest(event=e).SerializeToString())[:2] == (pb.DECISION_DENY,
                                                                              pb.REASON_INSUFFICIENT_BALANCE)
    assert core.state_bytes(idx) == before and core.take_alerts() == [] and core.usage_pending() == 0
    accepted, denied, _, details = core.apply_batch(batch([e, multi("one", [("tokens", 400), ("calls", 1)],
                                                                    model="gpt-4o")]) + b"\x20\x01")
    assert (accepted, denied) == (1, 1)
    results = pb.ReportBatchResponse.FromString(details).results
    # 400 tokens at $2.50 per 1M and a call at $0.001: one cost for the request
    assert [(r.decision, r.cost_nano, r.balance_nano) for r in results] == [
        (pb.DECISION_DENY, 0, 3_000_000), (pb.DECISION_ALLOW, 1_000_000 + 1_000_000, 1_000_000)]
    assert core.take_alerts() == [(idx, 0)]
    usage = {(u[1], u[4], u[5]) for u in core.take_usage() if u[0] == b"one"}
    assert usage == {(0, 400, 1_000_000), (5, 1, 1_000_000)}  # each quantity on its meter's line, with its cost


def test_the_quantities_of_an_event_carry_their_remainders_into_each_other(core):
    idx = core.open_account(b"carry")
    core.credit(idx, 0, 10**9)
    # "tiny" costs $0.0001 per 1M tokens: 1/10 nano a token; gpu_seconds on cpu $0.0001 a second
    e = multi("carry", [("tokens", 7), ("gpu_seconds", "0.004")], model="tiny", hardware="cpu")
    costs = [core.report(pb.ReportRequest(event=e).SerializeToString())[3] for _ in range(10)]
    # each request costs 0.7 nano + 400 nano: 4,007 nano for ten, as the exact sum
    assert sum(costs) == Fraction(7, 10) * 10 + 400 * 10 and core.state(idx)[0][0][0] == 10**9 - sum(costs)


def test_a_degraded_event_of_several_quantities_counts_each_and_charges_none(core):
    idx = core.open_account(b"pro")
    core.credit(idx, 1, 3 * 10**9)  # three requests' worth of "req"
    core.set_plan(idx, 1)           # "slow" when "req" is empty
    e = multi("pro", [("requests", 2), ("images", 7)], model="o1")  # 2 x 10 + 7 x 2/7 req: more than there is
    r = core.report(pb.ReportRequest(event=e).SerializeToString())
    assert (r[0], r[3], r[5]) == (pb.DECISION_DEGRADE, 0, b"slow")
    cts, use, _ = core.state(idx)
    assert (cts[1][0], cts[1][4]) == (3 * 10**9, 22 * 10**9)  # nothing charged; all of it counted degraded
    assert (use[1], use[3]) == (2, 7)
    # the first quantity alone would fit, the second not: still degraded whole, nothing charged
    e = multi("pro", [("images", 7), ("requests", 1)], model="o1")
    assert core.report(pb.ReportRequest(event=e).SerializeToString())[0] == pb.DECISION_DEGRADE
    cts, use, _ = core.state(idx)
    assert (cts[1][0], cts[1][4], use[1], use[3]) == (3 * 10**9, 34 * 10**9, 3, 14)


@pytest.mark.parametrize("event,field,says", [
    (multi(parts=[("tokens", 1), ("tokens", 2)], model="gpt-4o"), "events[1].quantities[1].meter", "more than once"),
    (multi(parts=[("tokens", 1), ("images", 2)], model="gpt-4o"), "events[1].quantities[1].meter",
     "credit type 'req'"),
    (multi(parts=[("tokens", 1), ("seats", 2)], model="gpt-4o"), "events[1].quantities[1].meter", "period end"),
    (multi(parts=[("calls", 1), ("nope", 2)]), "events[1].quantities[1].meter", "unknown meter 'nope'"),
    (multi(parts=[("calls", 1), ("gpu_seconds", "1.0001")], hardware="cpu"),
     "events[1].quantities[1].quantity_decimal", "precision 3"),
    (multi(parts=[("calls", 1), ("gpu_seconds", -1)], hardware="cpu"), "events[1].quantities[1].quantity",
     "negative"),
    (multi(parts=[("calls", 1), ("tokens", 1)], model="o1"), "events[1].dimensions", "model='o1'"),
    (multi(parts=[("calls", 1)] * 9), "events[1].quantities", "more than 8"),
    (pb.UsageEvent(customer_id="acme", meter="calls", quantity=1, quantities=[pb.Quantity(meter="calls")]),
     "events[1].meter", "not both"),
    (pb.UsageEvent(customer_id="acme", quantity=1, quantities=[pb.Quantity(meter="calls")]),
     "events[1].quantity", "not both"),
])
def test_a_bad_event_of_several_quantities_is_refused_with_its_batch(core, event, field, says):
    before = core.state_bytes(0)
    with pytest.raises(InvalidInput) as e:
        core.apply_batch(batch([ev(model="gpt-4o"), event]))
    assert e.value.field == field and says in str(e.value)
    assert core.state_bytes(0) == before and core.usage_pending() == 0


def test_each_quantity_counts_toward_the_batch_cap():
    for kind in CORES:
        core = CORES[kind](*parse_catalog(CATALOG, "test").compile(), dict(LIMITS, batch_events_max=4))
        core.credit(core.open_account(b"acme"), 0, 10**9)
        three = multi(parts=[("tokens", 1), ("calls", 1), ("gpu_seconds", 1)], model="mini", hardware="cpu")
        assert core.apply_batch(batch([ev(model="mini"), three]))[:2] == (2, 0)
        with pytest.raises(InvalidInput, match="more than 4 events in one batch") as e:
            core.apply_batch(batch([ev(model="mini"), ev(model="mini"), three]))
        assert e.value.field == "events"


def test_an_event_whose_quantities_cost_more_than_64_bits_together_is_refused_as_an_overflow(core):
    idx = core.open_account(b"big")
    core.credit(idx, 0, 2**63 - 1)
    core.set_floor(idx, 0, -(2**63 - 1))  # an overdraft as deep as 64 bits go: each cost fits, not their sum
    before = core.state_bytes(idx)
    e = multi("big", [("tokens", 3_600_000_000_000_000), ("gpu_seconds", "1000000000000")], model="gpt-4o",
              hardware="h100")  # $9.0e9 and $1.525e9: 1.05e19 nano together
    r = core.report(pb.ReportRequest(event=e).SerializeToString())
    assert (r[0], r[1], r[3]) == (pb.DECISION_DENY, pb.REASON_OVERFLOW, 0)
    assert core.state_bytes(idx) == before and core.usage_pending() == 0


# ---- a customer's negotiated discount -------------------------------------------------------

def test_a_discount_takes_its_share_off_each_charge_exactly_with_the_remainder_carried(core):
    core.set_discount(0, 1, 1250)  # 12.5% off the req credit type
    before = core.state(0)[0][1][0]
    # 7 haiku requests at 1/3 request each, then 5 images at 2/7: each at 87.5% of its price
    core.apply_batch(batch([ev(meter="requests", model="haiku")] * 7 + [ev(meter="images")] * 5))
    exact = (7 * Fraction(1, 3) + 5 * Fraction(2, 7)) * Fraction(7, 8) * 10**9
    spent = before - core.state(0)[0][1][0]
    assert spent == int(exact)  # rounded down, and what is left is carried
    denominator = core_denominator(core, 1)
    assert Fraction(core.state(0)[0][1][3], denominator) == exact - spent
    assert core.discount(0, 1) == 1250 and core.discount(0, 0) == 0
    usd = core.state(0)[0][0][0]
    core.apply_batch(batch([ev(model="gpt-4o", quantity=1_000_000)]))  # the other credit type: the list price
    assert usd - core.state(0)[0][0][0] == 2_500_000_000


def core_denominator(core, ct: int) -> int:
    return parse_catalog(CATALOG, "test").compile()[0][ct]


def test_a_discount_applies_to_settlements_minimums_gauges_and_can_be_all_of_the_price(core):
    core.set_discount(0, 0, 2000)  # 20% off usd
    usd = core.state(0)[0][0][0]
    cost, _ = core.settle(0, core.find_rate(0, {b"model": b"mini"}), 1_000_000, 0)  # $0.15 a 1M tokens
    assert cost == 120_000_000
    assert core.force_charge(0, core.find_rate(4, {}), 3) == 12 * 10**9  # 3 seats at $5
    cost, _ = core.settle(0, core.find_rate(0, {b"model": b"mini"}), 1, 0, None, 10**9)  # a $1 minimum
    assert cost == 800_000_000
    assert usd - core.state(0)[0][0][0] == 12_920_000_000
    core.set_discount(0, 0, 10_000)  # all of it: nothing is charged, usage still counts
    accepted, *_ = core.apply_batch(batch([ev(model="gpt-4o", quantity=10**9)]))
    assert accepted == 1 and core.state(0)[0][0][0] == usd - 12_920_000_000
    core.set_discount(0, 0, 0)
    assert core.discount(0, 0) == 0


@pytest.mark.parametrize("value", [-1, 10_001])
def test_a_discount_out_of_range_is_refused(core, value):
    with pytest.raises(ValueError, match="0 to 10000"):
        core.set_discount(0, 0, value)


@pytest.mark.parametrize("kind", list(CORES))
def test_a_core_whose_prices_are_not_in_discount_steps_refuses_a_discount(kind):
    denominators, meters, rates = parse_catalog(CATALOG, "test").compile()
    raw = [d // 10_000 for d in denominators]  # a core built from uncompiled figures
    rates = [(m, key, amount, factor // 10_000, tuple((u, a, f // 10_000) for u, a, f in steps))
             for m, key, amount, factor, steps in rates]
    c = CORES[kind](raw, meters, rates, dict(LIMITS), 1024, PLANS, MODES, FREE, [b"usd", b"req"])
    idx = c.open_account(b"acme")
    with pytest.raises(ValueError, match="cannot be discounted exactly"):
        c.set_discount(idx, 1, 100)
    c.set_discount(idx, 1, 0)  # none is always possible
    # and its charges are exact, as an older version's catalog replayed on an upgrade has them
    c.credit(idx, 0, 10**9)
    mini = c.find_rate(0, {b"model": b"mini"})
    c.apply_batch(batch([ev(model="mini", quantity=7)] * 3))  # $0.15 per 1M: 1,050 nano each
    assert c.settle(idx, mini, 7, 0)[0] == 1050
    assert c.force_charge(idx, mini, 7) == 1050
    assert c.state(idx)[0][0][0] == 10**9 - 5 * 1050


@needs_compiled
def test_a_discount_is_kept_in_snapshot_records_which_both_cores_write_alike():
    blobs = []
    for kind in CORES:
        c = make_core(kind)
        idx = c.open_account(b"acme")
        c.credit(idx, 1, 10**10)
        plain = c.state_bytes(idx)
        c.set_discount(idx, 1, 3333)
        c.apply_batch(batch([ev(meter="requests", model="haiku")] * 4))
        blob = c.state_bytes(idx)
        assert len(blob) == len(plain) + 2 * 8  # a discount per credit type follows
        other = make_core(kind)
        j = other.load_state_bytes(b"acme", blob)
        assert other.discount(j, 1) == 3333 and other.state(j) == c.state(idx)
        assert other.load_state_bytes(b"acme", plain) == j and other.discount(j, 1) == 0  # a record without one
        with pytest.raises(ValueError):
            other.load_state_bytes(b"acme", blob[:-8])  # a discount cut short
        bad = blob[:-8] + struct.pack("<q", 10_001)
        with pytest.raises(ValueError):
            other.load_state_bytes(b"acme", bad)
        blobs.append(blob)
    assert blobs[0] == blobs[1]
