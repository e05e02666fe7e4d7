"""Prices as companies publish them (issue: price sheets in the catalog): each
scenario's amounts are computed by hand with Fraction, on both cores."""

from __future__ import annotations

import dataclasses
import importlib
import json
import random
import tomllib
from fractions import Fraction
from pathlib import Path

import pytest
from billing import DAY_MS, NANO, Billing
from conftest import compiled_core_unavailable
from hypothesis import given, settings
from hypothesis import strategies as st

from meterd import _fastpath_py, wire
from meterd.catalog import CompiledCatalog, load_catalog, parse_catalog
from meterd.corespec import rate_mask
from meterd.engine import Engine
from meterd.errors import ConfigError, InvalidInput, NotFound
from meterd.plans import period_start
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

NO_COMPILED = compiled_core_unavailable()
CORES = {"python": _fastpath_py.Core}
if NO_COMPILED is None:
    CORES["compiled"] = importlib.import_module("meterd._fastpath").Core
LIMITS = dict(customer_id_bytes_max=128, client_id_bytes_max=128, batch_events_max=8000, dimensions_max=16,
              dimension_key_bytes_max=64, dimension_value_bytes_max=128, dimension_sets_per_window_max=1000)

# GPU seconds by hardware and region: a value before a wildcard, the first dimension weighing most.
GPU = """
[credit_types.usd]
kind = "fiat"

[meters.gpu_seconds]
credit_type = "usd"
precision = 3
price_dimensions = ["hardware", "region"]
price = "0.0001"                        # any hardware, any region

[meters.gpu_seconds.prices]
h100 = { "*" = "0.001525", "eu-west" = "0.0017" }
"*" = { "eu-west" = "0.0005" }

[meters.no_region_row]                  # (h100, *) and (*, eu-west) both match h100 in eu-west
credit_type = "usd"
price_dimensions = ["hardware", "region"]
prices = { h100 = "3", "*" = { eu-west = "2" } }

[customers.acme]
balances = { usd = "100" }
"""


@pytest.fixture(params=["compiled", "python"])
def make(request, tmp_path, monkeypatch):
    if request.param == "compiled" and NO_COMPILED is not None:
        pytest.skip(NO_COMPILED)
    made = []

    def build(catalog: str) -> Billing:
        if "\n" in catalog:
            path = tmp_path / f"catalog{len(made)}.toml"
            path.write_text(catalog)
            catalog = str(path)
        b = Billing(tmp_path / str(len(made)), catalog, monkeypatch, core=request.param)
        made.append(b)
        return b

    yield build
    for b in made:
        b.close()


def assert_refused(meter: dict, message: str) -> None:
    """A catalog with meter ``m`` as given is refused, naming the file, the key and why."""
    doc = {"credit_types": {"usd": {}}, "meters": {"m": {"credit_type": "usd", **meter}}}
    with pytest.raises(ConfigError) as e:
        parse_catalog(doc, "c.toml")
    assert str(e.value).startswith("c.toml: " + message), str(e.value)


def both_cores(denominators: list, meters: list, rates: list, names: list | None = None) -> list:
    """The cores this run tests, each with the same tables and no plans."""
    return [core_class(denominators, meters, rates, dict(LIMITS), 16, [], [], [], names or [b"usd"])
            for core_class in CORES.values()]


def nano(price: str, per: int, quantity: Fraction) -> Fraction:
    """The exact cost in nano-units of ``quantity`` meter units at ``price`` per ``per`` units."""
    return Fraction(price) / per * quantity * NANO


def test_a_price_table_by_hardware_and_region_picks_the_most_specific_row(make):
    b = make(GPU)
    cases = [  # (dimensions, the row that holds, its price per second)
        ({"hardware": "h100", "region": "eu-west"}, "0.0017"),
        ({"hardware": "h100", "region": "us-east"}, "0.001525"),
        ({"hardware": "h100"}, "0.001525"),  # no region: a wildcard matches it
        ({"hardware": "t4", "region": "eu-west"}, "0.0005"),
        ({"region": "eu-west"}, "0.0005"),
        ({"hardware": "t4", "region": "us-east"}, "0.0001"),
        ({}, "0.0001"),
    ]
    carried = Fraction(0)
    for dims, price in cases:
        exact = nano(price, 1, Fraction("1.234")) + carried
        r = b.report("acme", "gpu_seconds", "1.234", **dims)
        assert r.decision == pb.DECISION_ALLOW
        assert r.cost_nano == int(exact), dims  # whole nanos; what is below one is carried to the next
        carried = exact - int(exact)
    # (h100, *) holds over (*, eu-west) for h100 in eu-west: the hardware is the first dimension
    assert b.report("acme", "no_region_row", 1, hardware="h100", region="eu-west").cost_nano == 3 * NANO
    assert b.report("acme", "no_region_row", 1, hardware="t4", region="eu-west").cost_nano == 2 * NANO
    b.check_conservation("acme")


def test_openai_service_tiers_are_priced_per_model_and_refused_when_unpriced(make):
    b = make("openai")
    # batch is half the standard price; a request without a tier is priced as "default"
    cost = b.report("acme", "input_tokens", 400_000, model="gpt-4o", service_tier="batch").cost_nano
    assert cost == nano("1.25", 10**6, Fraction(400_000))
    assert b.report("acme", "input_tokens", 400_000, model="gpt-4o").cost_nano == nano("2.50", 10**6, 400_000)
    assert b.report("acme", "output_tokens", 3, model="o4-mini", service_tier="flex").cost_nano == \
        int(nano("2.20", 10**6, Fraction(3)))
    before = b.bal("acme", "usd")
    for dims, message in [
        ({"model": "gpt-4o", "service_tier": "priority"},
         "meter 'input_tokens' has no price for service_tier='priority' and no default"),
        ({"model": "gpt-5", "service_tier": "batch"},
         "meter 'input_tokens' has no price for model='gpt-5' and no default"),
        ({"model": "gpt-4o", "service_tier": "flex"},  # flex is priced for o4-mini only
         "meter 'input_tokens' has no price for service_tier='flex' and no default"),
        ({"service_tier": "batch"}, "meter 'input_tokens' needs the 'model' dimension: it has no default price"),
    ]:
        with pytest.raises(InvalidInput) as e:
            b.report("acme", "input_tokens", 1000, **dims)
        assert str(e.value) == "event.dimensions: " + message, dims
        with pytest.raises(InvalidInput) as e:
            b.authorize("acme", "input_tokens", 1000, **dims)
        assert str(e.value) == "dimensions: " + message, dims
    assert b.bal("acme", "usd") == before  # nothing refused was applied


def test_a_batch_is_rated_row_by_row_and_refused_whole_for_one_unpriced_event(make):
    b = make("openai")
    events = [pb.UsageEvent(customer_id="acme", meter="output_tokens", quantity=1000,
                            dimensions={"model": m, "service_tier": t})
              for m, t in [("gpt-4.1", "batch"), ("gpt-4.1", "default"), ("gpt-4.1-mini", "batch")]]
    r = b.batch(events)
    assert r.accepted == 3
    assert b.bal("acme", "usd") == 10 * NANO - nano("4.00", 10**6, 1000) - nano("8.00", 10**6, 1000) \
        - nano("0.80", 10**6, 1000)
    before = b.bal("acme", "usd")
    bad = events + [pb.UsageEvent(customer_id="acme", meter="output_tokens", quantity=1,
                                  dimensions={"model": "gpt-4.1", "service_tier": "turbo"})]
    with pytest.raises(InvalidInput) as e:
        b.batch(bad)
    assert e.value.field == "events[3].dimensions" and "service_tier='turbo'" in str(e.value)
    assert b.bal("acme", "usd") == before


def test_a_hold_is_priced_by_its_whole_table_and_keeps_its_rate_across_a_restart(make):
    b = make("openai")
    a = b.authorize("acme", "output_tokens", 100_000, model="gpt-4o", service_tier="batch")
    assert a.reserved_nano == nano("5.00", 10**6, 100_000)
    b.restart()
    c = b.commit(a.reservation_id, 60_000)
    assert c.cost_nano == nano("5.00", 10**6, 60_000)
    assert b.bal("acme", "usd") == 10 * NANO - c.cost_nano
    s = b.start_session("acme", "input_tokens", model="o4-mini", service_tier="flex")
    assert s.decision == pb.DECISION_ALLOW


def test_check_config_shows_the_table_in_the_order_rows_are_tried(tmp_path):
    path = tmp_path / "gpu.toml"
    path.write_text(GPU)
    text = load_catalog(str(path)).describe()
    rows = text.split("meter gpu_seconds:")[1].split("meter no_region_row")[0].splitlines()
    assert rows[0].endswith("by hardware × region; the first row that matches holds (a value before *, "
                            "hardware first):")
    assert [r.strip() for r in rows[1:] if r.strip()] == [
        "hardware=h100, region=eu-west: 0.0017", "hardware=h100, region=*: 0.001525",
        "hardware=*, region=eu-west: 0.0005", "hardware=*, region=*: 0.0001"]
    openai = Path(__file__).parent.parent / "examples" / "openai.toml"
    assert "priced as service_tier=default" in load_catalog(str(openai)).describe()


@pytest.mark.parametrize("meter, message", [
    ({"price_dimensions": ["model", "tier"], "prices": {"a": {"b": {"c": "1"}}}},
     "meters.m.prices.a.b: must be a price: the table is keyed by model, tier"),
    ({"price_dimensions": ["model", "tier"], "price": "1", "prices": {"*": "2"}},
     "meters.m.prices.*: gives the same price twice"),
    ({"price_dimensions": ["model", "model"], "price": "1"}, "meters.m.price_dimensions: names a dimension twice"),
    ({"price_dimensions": ["a", "b", "c", "d", "e"], "price": "1"},
     "meters.m.price_dimensions: at most 4 price dimensions"),
    ({"price_dimension": "a", "price_dimensions": ["a"], "price": "1"},
     "meters.m.price_dimensions: give price_dimension or price_dimensions, not both"),
    ({"price_dimensions": "model", "price": "1"}, "meters.m.price_dimensions: must be a list of dimension keys"),
    ({"price_dimension": "model", "price": "1", "dimension_defaults": {"tier": "x"}},
     "meters.m.dimension_defaults.tier: is not a price dimension of the meter (model)"),
    ({"price_dimension": "model", "price": "1", "dimension_defaults": {"model": "*"}},
     "meters.m.dimension_defaults.model: must be a dimension value"),
    ({"price_dimensions": ["model", "tier"], "prices": {"a": {"b c": "1"}}},
     "meters.m.prices.a.b c: dimension values are 1 to 128 printable characters"),
])
def test_a_price_table_that_cannot_be_read_is_refused_naming_the_key(meter, message):
    assert_refused(meter, message)


def test_a_snapshot_from_before_price_tables_reads_as_the_same_catalog():
    compiled = load_catalog(None).compiled
    doc = json.loads(compiled.json)
    for m in doc["meters"]:  # the layout older data directories have
        assert len(m[3]) <= 1 and m[6:] == [[None] * len(m[3]), 1, 0, 0]
        m[3] = m[3][0] if m[3] else ""
        del m[6:]
    for r in doc["rates"]:
        r[1] = r[1][0] if r[1] else None
        assert r[4] == []
        del r[4:]
    assert CompiledCatalog.from_json(json.dumps(doc).encode()) == compiled


# ---- both cores and a brute-force reading of the rule ---------------------------------------

VALUES = [b"a", b"b", b"c"]


def brute_force(keys: list[tuple[bytes | None, ...]], values: tuple[bytes | None, ...]) -> int:
    """The rule as the README says it: of the rows that match (a * matches anything), the one whose
    values come before wildcards earliest, the first dimension weighing most; the first written of
    two equal rows."""
    best, best_rank = -1, None
    for i, key in enumerate(keys):
        if all(k is None or k == v for k, v in zip(key, values, strict=True)):
            rank = tuple(k is not None for k in key)
            if best_rank is None or rank > best_rank:
                best, best_rank = i, rank
    return best


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 4), data=st.data())
def test_both_cores_pick_the_row_the_rule_says(n, data):
    cell = st.sampled_from(VALUES + [None])
    keys = data.draw(st.lists(st.tuples(*[cell] * n), min_size=1, max_size=12))
    defaults = tuple(data.draw(st.lists(st.sampled_from([None, b"a"]), min_size=n, max_size=n)))
    dims = tuple(b"d%d" % i for i in range(n))
    rates = [(0, key, i + 1, 1, ()) for i, key in enumerate(keys)]
    meter = (b"m", 0, 0, dims, 0, b"", defaults, 1, 0, 0)
    cores = both_cores([1], [meter], rates)
    for _ in range(8):
        event = {d: v for d, v in zip(dims, data.draw(st.tuples(*[cell] * n)), strict=True) if v is not None}
        values = tuple(event.get(d, dflt) for d, dflt in zip(dims, defaults, strict=True))
        want = brute_force(keys, values)
        for core in cores:
            assert core.find_rate(0, event) == want, (keys, event)


def test_both_cores_rate_random_events_of_a_table_alike(tmp_path):
    """Many rows and events: the same rates, costs and refusals from both cores."""
    if NO_COMPILED is not None:
        pytest.skip(NO_COMPILED)
    rng = random.Random(7)
    models = [f"m{i}" for i in range(40)]
    tiers = ["std", "batch", "flex", "priority"]
    prices = {m: {t: f"{rng.randint(1, 900)}/{rng.choice([1, 3, 7])}" for t in rng.sample(tiers, 2)}
              for m in models}
    prices["*"] = {"batch": "1/2"}
    doc = {"credit_types": {"usd": {}}, "meters": {"t": {"credit_type": "usd", "per": 1000,
                                                         "price_dimensions": ["model", "tier"],
                                                         "prices": prices}}}
    compiled = parse_catalog(doc, "t").compiled
    cores = both_cores(*compiled.core_args()[:3])
    for core in cores:
        core.credit(core.open_account(b"acme"), 0, 10**15)
    events = [pb.UsageEvent(customer_id="acme", meter="t", quantity=rng.randint(0, 10**6),
                            dimensions={"model": rng.choice(models + ["zz"]), "tier": rng.choice(tiers)})
              for _ in range(400)]
    for i in range(0, len(events), 20):
        body = pb.ReportBatchRequest(events=events[i:i + 20]).SerializeToString()
        answers = []
        for core in cores:
            try:
                answers.append(core.apply_batch(body))
            except InvalidInput as e:
                answers.append(str(e))
        assert answers[0] == answers[1]
    assert cores[0].state(0) == cores[1].state(0)
    keys = [r[1] for r in compiled.rates]
    for e in events:
        values = (e.dimensions["model"].encode(), e.dimensions["tier"].encode())
        assert cores[0].find_rate(0, dict(zip((b"model", b"tier"), values, strict=True))) == brute_force(keys, values)
    assert rate_mask((b"x", None)) == 2 and rate_mask((None, b"y")) == 1


def test_the_readme_price_table_prices_as_the_readme_says(make, tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Price tables")[1].split("```toml\n")[1].split("```")[0]
    b = make('[credit_types.usd]\nkind = "fiat"\n[customers.acme]\nbalances = { usd = "100" }\n' + table)
    price = {("gpt-4o", "batch"): "5.00", ("gpt-4.1", "batch"): "6.00", ("o4-mini", "flex"): "2.20",
             ("gpt-4o", None): "10.00"}
    for (model, tier), want in price.items():
        dims = {"model": model} if tier is None else {"model": model, "service_tier": tier}
        assert b.report("acme", "output_tokens", 10**6, **dims).cost_nano == Fraction(want) * NANO
    with pytest.raises(InvalidInput, match="has no price for service_tier='priority' and no default"):
        b.report("acme", "output_tokens", 1, model="gpt-4o", service_tier="priority")
    assert b.report("acme", "output_tokens", 10**6, service_tier="batch").cost_nano == 6 * NANO  # "*": or none


def test_the_readme_increment_example_bills_as_it_says(make):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Increments and minimums")[1].split("```toml\n")[1].split("```")[0]
    b = make('[credit_types.usd]\nkind = "fiat"\n[customers.acme]\nbalances = { usd = "100" }\n' + table)
    exact = nano("0.0000166667", 1, Fraction("1.3"))  # below the minimum
    assert exact < NANO // 100
    assert b.report("acme", "duration", "1.234").cost_nano == NANO // 100
    assert b.report("acme", "duration", "1000.01").cost_nano == int(nano("0.0000166667", 1, Fraction("1000.1")))


def test_the_examples_still_load(tmp_path):
    for path in sorted((Path(__file__).parent.parent / "examples").glob("*.toml")):
        load_catalog(str(path)).compiled.check()


# ---- billing increments and minimums ----------------------------------------------------------

STEPS = """
[credit_types.usd]
kind = "fiat"

[meters.duration]                       # seconds, to the millisecond, billed in 100 ms steps
credit_type = "usd"
precision = 3
increment = "0.1"
price = "0.00001"

[meters.characters]                     # billed in blocks of 100 characters, at least $0.01 a request
credit_type = "usd"
per = 1000
increment = "100"
minimum = "0.01"
price = "0.30"

[meters.tokens]                         # $2.50 per 1M tokens, at least $0.001 a request
credit_type = "usd"
per = 1000000
minimum = "0.001"
price_dimension = "model"
prices = { "gpt-4o" = "2.50" }

[meters.gpu_seconds]                    # a session meter: its time billed in whole seconds, at least $0.05
credit_type = "usd"
precision = 3
increment = "1"
minimum = "0.05"
price = "0.001525"

[plans.free_tokens]
period = "month"
free = { tokens = "1000" }

[customers.acme]
balances = { usd = "100" }

[customers.bob]
plan = "free_tokens"
balances = { usd = "100" }
"""


def test_quantities_are_rounded_up_to_the_meters_increment(make):
    b = make(STEPS)
    r = b.report("acme", "duration", "1.234")  # billed as 1.3 s
    assert r.cost_nano == nano("0.00001", 1, Fraction("1.3"))
    assert b.report("acme", "duration", "1.2").cost_nano == nano("0.00001", 1, Fraction("1.2"))  # on a step
    assert b.report("acme", "duration", 0).cost_nano == 0
    with pytest.raises(InvalidInput, match=r"meter 'duration' has precision 3: at most 3 decimals"):
        b.report("acme", "duration", "1.2345")
    # 250 characters are billed as 300: $0.09, above the $0.01 minimum
    assert b.report("acme", "characters", 250).cost_nano == nano("0.30", 1000, Fraction(300))
    # 1 character is billed as 100 ($0.03), still above the minimum
    assert b.report("acme", "characters", 1).cost_nano == nano("0.30", 1000, Fraction(100))
    b.flush()
    lines = {line["description"]: line for line in b.statement("acme", "2026-01")["lines"]
             if line["section"] == "usage"}
    assert lines["duration"]["quantity"] == "2.500"  # what was billed: 1.3 + 1.2 + 0
    assert lines["characters"]["quantity"] == "400"
    b.check_conservation("acme")


def test_an_event_costs_at_least_the_meters_minimum_except_what_is_free(make):
    b = make(STEPS)
    # 100 tokens of gpt-4o: $0.00025 exactly, charged the $0.001 minimum
    assert b.report("acme", "tokens", 100, model="gpt-4o").cost_nano == NANO // 1000
    # 10,000 tokens: $0.025, above it
    assert b.report("acme", "tokens", 10_000, model="gpt-4o").cost_nano == nano("2.50", 10**6, 10_000)
    assert b.report("acme", "tokens", 0, model="gpt-4o").cost_nano == 0  # nothing happened: nothing charged
    # bob (subscribed by the catalog) has 1,000 free tokens a month: no minimum on a free event, the
    # minimum on a part-free one
    assert b.report("bob", "tokens", 900, model="gpt-4o").cost_nano == 0
    assert b.report("bob", "tokens", 200, model="gpt-4o").cost_nano == NANO // 1000  # 100 charged: $0.00025
    assert b.report("bob", "tokens", 2000, model="gpt-4o").cost_nano == nano("2.50", 10**6, 2000)
    b.check_conservation("acme")
    b.check_conservation("bob")
    # a batch is rated event by event, each with its minimum
    before = b.bal("acme", "usd")
    r = b.batch([pb.UsageEvent(customer_id="acme", meter="tokens", quantity=1, dimensions={"model": "gpt-4o"})] * 3)
    assert r.accepted == 3
    assert b.bal("acme", "usd") == before - 3 * NANO // 1000


def test_a_hold_reserves_and_a_commit_charges_by_increment_and_minimum(make):
    b = make(STEPS)
    a = b.authorize("acme", "characters", 150)  # held as 200 characters: $0.06
    assert a.reserved_nano == nano("0.30", 1000, Fraction(200))
    c = b.commit(a.reservation_id, 101)  # 200 characters again
    assert c.cost_nano == nano("0.30", 1000, Fraction(200))
    a = b.authorize("acme", "tokens", 10, model="gpt-4o")  # $0.000025: the minimum is held
    assert a.reserved_nano == NANO // 1000
    b.restart(clean=False)  # the settlement below is replayed from the log after this kill
    assert b.commit(a.reservation_id, 10).cost_nano == NANO // 1000
    a = b.authorize("acme", "tokens", 10, model="gpt-4o")
    assert b.commit(a.reservation_id, 0).cost_nano == 0  # nothing used: nothing charged
    before = b.bal("acme", "usd")
    b.restart(clean=False)
    assert b.bal("acme", "usd") == before
    b.check_conservation("acme")


def test_a_session_is_billed_in_whole_increments_and_at_least_its_minimum(make):
    b = make(STEPS)
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000)
    b.advance(2_500)
    h = b.heartbeat(s.session_id)  # 2.5 s so far, billed as it runs
    b.advance(20_000)
    b.heartbeat(s.session_id)
    b.advance(16_700)
    e = b.end_session(s.session_id)  # 39.2 s in all, billed as 40 s: $0.061, above the minimum
    assert e.billed_quantity == "40.000"
    assert e.cost_nano == nano("0.001525", 1, Fraction(40))
    assert h.cost_nano <= e.cost_nano
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000)
    b.advance(2_300)
    e = b.end_session(s.session_id)  # 2.3 s, billed as 3 s: $0.004575, raised to the $0.05 minimum
    assert e.billed_quantity == "3.000"
    assert e.cost_nano == NANO // 20
    assert b.bal("acme", "usd") == 100 * NANO - nano("0.001525", 1, Fraction(40)) - NANO // 20
    b.restart(clean=False)  # the log replays the two sessions' bills to the same balance
    assert b.bal("acme", "usd") == 100 * NANO - nano("0.001525", 1, Fraction(40)) - NANO // 20


@pytest.mark.parametrize("meter, message", [
    ({"precision": 1, "increment": "0.05", "price": "1"},
     "meters.m.increment: has more decimals than the meter's precision (1)"),
    ({"increment": "0", "price": "1"}, "meters.m.increment: must be above zero"),
    ({"aggregation": "count", "increment": "2", "price": "1"},
     "meters.m.increment: only a sum meter's quantities are rounded"),
    ({"aggregation": "max", "minimum": "1", "price": "1"},
     "meters.m.minimum: a max, latest or unique_count meter is charged on its period's value"),
    ({"minimum": "0.0000000001", "price": "1"}, "meters.m.minimum: has more than 9 decimals"),
    ({"aggregation": "max", "price": "1", "price_dimension": "tier", "dimension_defaults": {"tier": "gold"}},
     "meters.m.dimension_defaults: a max, latest or unique_count meter is charged on its period's value at its "
     "default price"),
])
def test_an_increment_or_minimum_that_cannot_hold_is_refused(meter, message):
    assert_refused(meter, message)


@settings(max_examples=200, deadline=None)
@given(events=st.lists(st.tuples(st.sampled_from(["duration", "characters", "tokens"]),
                                 st.integers(0, 5_000_000)), min_size=1, max_size=30))
def test_increments_and_minimums_conserve_money_exactly_in_both_cores(events):
    """What the account paid is the whole nanos of the exact sum, event by event: each event's quantity
    rounded up to its meter's increment, its cost at least its meter's minimum (when not zero)."""
    catalog = parse_catalog(tomllib.loads(STEPS), "steps")
    compiled = catalog.compiled
    cores = both_cores(*compiled.core_args()[:3])
    for core in cores:
        core.credit(core.open_account(b"acme"), 0, 10**15)
    exact = Fraction(0)
    for name, units in events:
        m = catalog.meters[catalog.meter_index[name]]
        billed = -(-units // m.increment) * m.increment
        cost = next(iter(m.prices.values())) * billed
        exact += max(cost, m.minimum_nano) if billed else 0
        body = pb.ReportBatchRequest(events=[pb.UsageEvent(
            customer_id="acme", meter=name, quantity_decimal=catalog.format_quantity(catalog.meter_index[name], units),
            dimensions={"model": "gpt-4o"})]).SerializeToString()
        answers = [core.apply_batch(body) for core in cores]
        assert answers[0] == answers[-1]
    for core in cores:
        balance = core.state(0)[0][0][0]
        assert balance == 10**15 - int(exact)  # floor: what is below a nano is carried, never lost
        usage = core.state(0)[1]
        assert usage[catalog.meter_index["duration"]] % 100 == 0  # counted as billed: whole 100 ms steps


# ---- event time -------------------------------------------------------------------------------

HOUR_MS = 3_600_000


def statement_usage(b: Billing, period: str) -> dict[str, tuple[str, int]]:
    return {line["description"]: (line["quantity"], line["amount_nano"])
            for line in b.statement("acme", period)["lines"] if line["section"] == "usage"}


def test_a_late_event_lands_in_the_window_and_month_it_belongs_to(make):
    b = make("openai")
    jan_31_late = b.now_ms + 24 * HOUR_MS - 30_000  # 2026-01-31T23:59:30Z
    b.advance(25 * HOUR_MS)  # 2026-02-01T01:00Z
    before = b.bal("acme", "usd")
    event = pb.UsageEvent(customer_id="acme", meter="output_tokens", quantity=1000, timestamp_ms=jan_31_late,
                          dimensions={"model": "gpt-4o"})
    r = pb.ReportResponse.FromString(b.run(b.engine.report(pb.ReportRequest(event=event).SerializeToString())))
    assert r.cost_nano == nano("10.00", 10**6, 1000)
    assert b.bal("acme", "usd") == before - r.cost_nano  # the money moves when the event arrives
    b.report("acme", "input_tokens", 2000, model="gpt-4o")  # no timestamp: it is of now
    b.restart(clean=False)  # the log replays the late event into its own window
    b.flush()
    assert statement_usage(b, "2026-01") == {"output_tokens (model=gpt-4o)": ("1000", r.cost_nano)}
    assert statement_usage(b, "2026-02") == {"input_tokens (model=gpt-4o)": ("2000", nano("2.50", 10**6, 2000))}


def test_an_event_too_far_from_the_clock_is_refused_naming_the_setting(make):
    b = make("openai")
    now = b.now_ms
    before = b.bal("acme", "usd")
    ok = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=10, dimensions={"model": "gpt-4o"})
    for ts, message in [
        (now - 40 * 24 * HOUR_MS, f"is {40 * 24 * HOUR_MS} ms before the sidecar's clock ({now}): events older "
                                  "than event_late_max_s (86400 s) are refused"),
        (now + 301_000, f"is 301000 ms after the sidecar's clock ({now}): events further ahead than "
                        "event_early_max_s are refused"),
        (1_769_817_600, "events older than event_late_max_s"),  # seconds sent as milliseconds: 1970
    ]:
        late = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=10, timestamp_ms=ts,
                             dimensions={"model": "gpt-4o"})
        with pytest.raises(InvalidInput) as e:
            b.batch([ok, late])
        assert str(e.value).startswith("events[1].timestamp_ms: ") and message in str(e.value), str(e.value)
        with pytest.raises(InvalidInput, match="^event.timestamp_ms: "):
            b.run(b.engine.report(pb.ReportRequest(event=late).SerializeToString()))
    assert b.bal("acme", "usd") == before  # nothing of a refused batch was applied
    at_edge = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=10, timestamp_ms=now + 300_000,
                            dimensions={"model": "gpt-4o"})
    assert b.batch([at_edge]).accepted == 1  # 5 minutes ahead is within event_early_max_s


def test_a_replay_keeps_what_it_applied_whatever_the_settings_say_now(make, tmp_path):
    b = make("openai")
    late = b.now_ms - 20 * HOUR_MS
    event = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=4000, timestamp_ms=late,
                          dimensions={"model": "gpt-4o"})
    b.run(b.engine.report(pb.ReportRequest(event=event).SerializeToString()))
    after = b.bal("acme", "usd")
    b.settings = dataclasses.replace(b.settings, event_late_max_s=60)
    b.restart(clean=False)
    assert b.bal("acme", "usd") == after
    b.flush()
    assert statement_usage(b, "2026-01") == {"input_tokens (model=gpt-4o)": ("4000", nano("2.50", 10**6, 4000))}
    with pytest.raises(InvalidInput, match="event_late_max_s \\(60 s\\)"):
        b.run(b.engine.report(pb.ReportRequest(event=event).SerializeToString()))


@settings(max_examples=100, deadline=None)
@given(offsets=st.lists(st.one_of(st.just(None), st.integers(-2 * 86_400_000, 2 * 86_400_000)), min_size=1,
                        max_size=12))
def test_both_cores_file_timestamps_in_the_same_windows(offsets):
    """The same windows for the same timestamps, and the same refusals, from both cores."""
    compiled = load_catalog(None).compiled
    cores = both_cores(*compiled.core_args()[:3], names=list(compiled.core_args()[6]))
    now = 1_769_817_600_000 + 12_345
    for core in cores:
        core.set_window(60_000)
        core.set_event_times(86_400_000, 300_000)
        core.set_clock(now)
        core.credit(core.open_account(b"acme"), 0, 10**15)
    for offset in offsets:
        event = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=7, dimensions={"model": "gpt-4o"})
        if offset is not None:
            event.timestamp_ms = now + offset
        body = pb.ReportBatchRequest(events=[event]).SerializeToString()
        answers = []
        for core in cores:
            try:
                answers.append(core.apply_batch(body))
            except InvalidInput as e:
                answers.append(str(e))
        assert answers[0] == answers[-1]
        fits = offset is None or -86_400_000 <= offset <= 300_000
        assert isinstance(answers[0], tuple) == fits, (offset, answers[0])
    taken = [sorted(core.take_usage()) for core in cores]
    assert taken[0] == taken[-1]
    windows = {t[3] for t in taken[0]}
    assert all(w % 60_000 == 0 for w in windows)


# ---- found by review: free units, session holds, reloads ---------------------------------------

FREE_SESSIONS = """
[credit_types.usd]
kind = "fiat"

[meters.gpu_seconds]
credit_type = "usd"
precision = 3
minimum = "0.05"
price = "0.001"

[meters.requests]                       # a fee per request, and 100 free requests a month
credit_type = "usd"
minimum = "0.01"
price = "0"

[plans.free_gpu]
period = "month"
free = { gpu_seconds = "1000", requests = "100" }

[customers.bob]
plan = "free_gpu"
balances = { usd = "100" }

[customers.acme]
balances = { usd = "0.10" }
"""


def test_what_free_units_cover_costs_nothing_whatever_the_minimum(make):
    b = make(FREE_SESSIONS)
    assert b.report("bob", "requests", 1).cost_nano == 0
    s = b.start_session("bob", "gpu_seconds", timeout_ms=30_000)
    b.advance(10_000)
    b.heartbeat(s.session_id)
    assert b.end_session(s.session_id).cost_nano == 0  # ended just after a heartbeat
    s = b.start_session("bob", "gpu_seconds", timeout_ms=30_000)
    b.advance(10_000)
    b.heartbeat(s.session_id)
    b.advance(31_000)
    b.tick()  # expired: billed up to its last heartbeat
    assert b.bal("bob", "usd") == 100 * NANO


def test_a_sessions_heartbeat_holds_its_interval_not_the_minimum(make):
    b = make(FREE_SESSIONS)
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000)  # $0.03 an interval, $0.10 balance
    for _ in range(2):
        b.advance(30_000)
        h = b.heartbeat(s.session_id)
    assert (h.decision, h.closed, h.cost_nano) == (pb.DECISION_ALLOW, False, 60_000_000)  # $0.04 left holds $0.03


TABLE = """
[credit_types.usd]
kind = "fiat"

[meters.gpu_seconds]
credit_type = "usd"
price_dimensions = ["hardware", "region"]

[meters.gpu_seconds.prices]
h100 = { "*" = "0.002" }
t4 = { "*" = "0.001" }

[customers.acme]
balances = { usd = "100" }
"""


def test_a_reload_that_drops_the_row_of_an_open_hold_is_refused(make):
    b = make(TABLE)
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000, hardware="h100", region="eu")
    a = b.authorize("acme", "gpu_seconds", 100, hardware="t4")
    for drop, what in [('h100 = { "*" = "0.002" }\n', "sessions"), ('t4 = { "*" = "0.001" }\n', "reservations")]:
        new = parse_catalog(tomllib.loads(TABLE.replace(drop, "")), "new.toml")
        with pytest.raises(ConfigError, match=f"new.toml: meters.gpu_seconds: has open {what} priced by a row"):
            b.run(b.engine.reload_catalog(new))
    b.advance(5_000)
    assert b.commit(a.reservation_id, 100).cost_nano == nano("0.001", 1, 100)
    assert b.end_session(s.session_id).cost_nano == nano("0.002", 1, 5)


def test_a_restart_under_a_catalog_without_a_sessions_row_releases_its_hold(make, tmp_path):
    b = make(TABLE)
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000, hardware="h100")
    assert b.balance("acme").balances[0].reserved_nano > 0
    path = tmp_path / "without_h100.toml"
    path.write_text(TABLE.replace('h100 = { "*" = "0.002" }\n', ""))
    b.run(b.engine.close())
    b.catalog = load_catalog(str(path))
    b.engine = b._open()
    b.advance(5_000)
    e = b.heartbeat(s.session_id)  # no price: it is closed, nothing billed, its hold released
    assert (e.decision, e.closed, e.cost_nano) == (pb.DECISION_DENY, True, 0)
    assert b.balance("acme").balances[0].reserved_nano == 0
    assert b.bal("acme", "usd") == 100 * NANO


def test_a_session_survives_a_restart_under_a_catalog_that_numbers_its_meter_otherwise(make, tmp_path):
    two = '[credit_types.usd]\nkind = "fiat"\n[credit_types.eur]\nkind = "fiat"\ncurrency = "EUR"\n'
    meters = ['[meters.gpu_seconds]\ncredit_type = "usd"\nprice = "0.001"\n',
              '[meters.other]\ncredit_type = "eur"\nprice = "0.05"\n']
    customers = '[customers.acme]\nbalances = { usd = "100", eur = "100" }\n'
    b = make(two + "".join(meters) + customers)
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000)
    b.run(b.engine.close())
    path = tmp_path / "reordered.toml"
    path.write_text('[credit_types.eur]\nkind = "fiat"\ncurrency = "EUR"\n[credit_types.usd]\nkind = "fiat"\n'
                    + "".join(reversed(meters)) + customers)
    b.catalog = load_catalog(str(path))
    b.engine = b._open()
    b.advance(10_000)
    e = b.end_session(s.session_id)
    assert (e.credit_type, e.cost_nano) == ("usd", 10 * NANO // 1000)
    assert {x.credit_type: (x.balance_nano, x.reserved_nano) for x in b.balance("acme").balances} == \
        {"usd": (100 * NANO - 10 * NANO // 1000, 0), "eur": (100 * NANO, 0)}
    t = b.start_session("acme", "other", timeout_ms=30_000)
    b.run(b.engine.close())
    without = tmp_path / "without_other.toml"
    without.write_text(two + meters[0] + customers)
    b.catalog = load_catalog(str(without))
    with pytest.raises(ConfigError, match=f"meters: other \\(in eur\\) has open sessions \\(session '{t.session_id}'"):
        b._open()
    b.catalog = load_catalog(str(path))  # with it back, it starts, and the session is there
    b.engine = b._open()
    assert b.end_session(t.session_id).closed


# ---- graduated and volume tiers ---------------------------------------------------------------

TIERS = """
[credit_types.usd]
kind = "fiat"

[meters.gb_seconds]                     # graduated over the month's usage: units 1-10 at $2, 11-30 at $1, then $0.50
credit_type = "usd"
price = [{ up_to = "10", price = "2" }, { up_to = "30", price = "1" }, { price = "0.50" }]

[meters.by_arch]                        # a tier list per row of a price table
credit_type = "usd"
price_dimension = "arch"
prices = { x86 = [{ up_to = "10", price = "3" }, { price = "1" }], arm = "0.25" }

[meters.seats]                          # volume: every seat at the price of the tier the count falls in
credit_type = "usd"
aggregation = "max"
tier_mode = "volume"
price = [{ up_to = "10", price = "8" }, { up_to = "50", price = "6" }, { price = "4" }]

[meters.graduated_seats]
credit_type = "usd"
aggregation = "max"
price = [{ up_to = "10", price = "8" }, { up_to = "50", price = "6" }, { price = "4" }]

[plans.monthly]
period = "month"

[plans.five_free]
period = "month"
free = { gb_seconds = "5" }

[customers.acme]
plan = "monthly"
balances = { usd = "1000" }

[customers.bob]
plan = "five_free"
balances = { usd = "1000" }
"""


def graduated(tiers: list[tuple[int | None, str]], start: int, end: int) -> Fraction:
    """The cost of units start+1 .. end, each at the tier its place falls in (by hand)."""
    total, low = Fraction(0), 0
    for up_to, price in tiers:
        high = end if up_to is None else up_to
        total += max(0, min(end, high) - max(start, low)) * Fraction(price)
        low = high
    return total


GB = [(10, "2"), (30, "1"), (None, "0.50")]
SEATS = [(10, "8"), (50, "6"), (None, "4")]


def test_graduated_tiers_price_each_unit_by_its_place_in_the_months_usage(make):
    b = make(TIERS)
    used = 0
    for q in (8, 5, 20, 10):
        assert b.report("acme", "gb_seconds", q).cost_nano == graduated(GB, used, used + q) * NANO
        used += q
    assert graduated(GB, 0, 43) == 16 + 7 + Fraction(37, 2) + 5  # 8@2; 2@2+3@1; 17@1+3@0.5; 10@0.5
    # free units come first: bob's 8 units are 5 free, then units 6-8 at $2
    assert b.report("bob", "gb_seconds", 8).cost_nano == 3 * 2 * NANO
    # a row of a table can have tiers of its own; the tiers count the meter's usage this period
    assert b.report("acme", "by_arch", 12, arch="x86").cost_nano == (10 * 3 + 2 * 1) * NANO
    assert b.report("acme", "by_arch", 4, arch="arm").cost_nano == NANO
    assert b.report("acme", "by_arch", 1, arch="x86").cost_nano == NANO  # the 17th unit of the meter
    # a hold covers the dearest tier; the commit charges by place
    a = b.authorize("acme", "gb_seconds", 10)
    assert a.reserved_nano == 10 * 2 * NANO
    assert b.commit(a.reservation_id, 10).cost_nano == 10 * NANO // 2
    b.check_conservation("acme")


def test_the_next_period_starts_again_from_the_first_tier(make):
    b = make(TIERS)
    b.report("acme", "gb_seconds", 40)
    b.advance(31 * DAY_MS)
    b.tick()  # the period rolls
    assert b.report("acme", "gb_seconds", 1).cost_nano == 2 * NANO


def test_volume_tiers_price_every_seat_at_the_tier_the_count_reaches(make):
    b = make(TIERS)
    b.report("acme", "seats", 12)
    b.report("acme", "graduated_seats", 12)
    before = b.bal("acme", "usd")
    b.advance(31 * DAY_MS)
    b.tick()  # the period's end charges gauges on their value
    charged = {e.reference: -e.amount_nano for e in b.audit("acme", "gauge_charged")}
    assert sorted(charged.values()) == sorted([12 * 6 * NANO, int(graduated(SEATS, 0, 12) * NANO)])
    assert before - b.bal("acme", "usd") == (12 * 6 + 10 * 8 + 2 * 6) * NANO


@pytest.mark.parametrize("meter, message", [
    ({"price": [{"up_to": "10", "price": "1"}]}, "meters.m.price: the last tier has no up_to"),
    ({"price": [{"up_to": "10", "price": "1"}, {"up_to": "5", "price": "1"}, {"price": "1"}]},
     "meters.m.price[1].up_to: must be above the tier before it (10)"),
    ({"price": [{"price": "1"}, {"price": "2"}]}, "meters.m.price[0].up_to: is required"),
    ({"price": [{"up_to": "1.5", "price": "1"}, {"price": "2"}]},
     "meters.m.price[0].up_to: has more decimals than the meter's precision (0)"),
    ({"tier_mode": "volume", "price": [{"up_to": "1", "price": "1"}, {"price": "2"}]},
     "meters.m.tier_mode: volume tiers price a period's value at its end"),
    ({"tier_mode": "steps", "price": "1"}, "meters.m.tier_mode: must be graduated or volume"),
    ({"price": [{"up_to": "1", "cost": "1"}, {"price": "2"}]}, "meters.m.price[0].cost: unknown key"),
    ({"price": []}, "meters.m.price: a tier list needs at least one tier"),
])
def test_a_tier_list_that_cannot_hold_is_refused(meter, message):
    assert_refused(meter, message)


def test_check_config_shows_the_tiers(tmp_path):
    path = tmp_path / "tiers.toml"
    path.write_text(TIERS)
    text = load_catalog(str(path)).describe()
    assert "meter gb_seconds: sum, 0 decimals, priced in usd: default to 10 at 2, to 30 at 1, rest at 0.5 " \
           "(graduated over the period's usage)" in text
    assert "rest at 4 (volume: every unit at the tier the period's value reaches)" in text


@settings(max_examples=150, deadline=None)
@given(bounds=st.lists(st.integers(1, 50), min_size=1, max_size=5, unique=True),
       prices=st.lists(st.fractions(min_value=0, max_value=20, max_denominator=7), min_size=6, max_size=6),
       quantities=st.lists(st.integers(0, 40), min_size=1, max_size=15))
def test_graduated_tiers_add_up_to_the_tiers_of_the_total_in_both_cores(bounds, prices, quantities):
    """Event by event, what is charged adds up, to the nano, to the whole period's usage priced
    tier by tier (what is below a nano carried), in both cores alike."""
    bounds = sorted(bounds)
    tiers = [(b, str(p)) for b, p in zip(bounds, prices, strict=False)] + [(None, str(prices[-1]))]
    rows = ", ".join(f'{{ up_to = "{b}", price = "{p}" }}' if b else f'{{ price = "{p}" }}' for b, p in tiers)
    catalog = parse_catalog(tomllib.loads(f'[credit_types.usd]\nkind = "fiat"\n[meters.m]\ncredit_type = "usd"\n'
                                          f"price = [{rows}]\n"), "t")
    cores = both_cores(*catalog.compiled.core_args()[:3])
    for core in cores:
        core.credit(core.open_account(b"acme"), 0, 10**15)
    for q in quantities:
        body = pb.ReportBatchRequest(events=[pb.UsageEvent(customer_id="acme", meter="m", quantity=q)])
        answers = [core.apply_batch(body.SerializeToString()) for core in cores]
        assert answers[0] == answers[-1]
    exact = graduated([(b, p) for b, p in tiers], 0, sum(quantities)) * NANO
    for core in cores:
        assert core.state(0)[0][0][0] == 10**15 - int(exact)


def test_the_readme_tier_example_prices_as_it_says(make):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("### Tiers")[1].split("```toml\n")[1].split("```")[0]
    b = make('[credit_types.usd]\nkind = "fiat"\n[plans.p]\nperiod = "month"\n[customers.acme]\nplan = "p"\n'
             'balances = { usd = "1000000" }\n' + table)
    x86 = [(6 * 10**9 * 1000, "0.0000166667"), (15 * 10**9 * 1000, "0.000015"), (None, "0.0000133334")]
    first = graduated(x86, 0, 2500) / 1000 * NANO
    assert b.report("acme", "gb_seconds", "2.5").cost_nano == int(first)
    both = first + Fraction("0.0000133334") * NANO  # what is below a nano is carried to the next
    assert b.report("acme", "gb_seconds", "1", architecture="arm").cost_nano == int(both) - int(first)
    b.report("acme", "seats", 12)
    b.advance(31 * DAY_MS)
    b.tick()
    assert [-e.amount_nano for e in b.audit("acme", "gauge_charged")] == [12 * 6 * NANO]


def test_the_lambda_example_bills_its_free_tier_then_by_the_published_prices(make):
    b = make("lambda")
    # 399,999.5 GB-seconds and the first requests are free
    assert b.report("acme", "gb_seconds", "399999.5").cost_nano == 0
    assert b.report("acme", "requests", 1).cost_nano == 0
    assert b.bal("acme", "usd") == 50 * NANO
    # the next 1.5 GB-seconds: 0.5 free, 1 at $0.0000166667 (what is below a nano is carried)
    x86 = Fraction("0.0000166667") * NANO
    assert b.report("acme", "gb_seconds", "1.5").cost_nano == int(x86)
    # Arm is its own row, on the same month's usage: past the free tier, at Arm's first tier
    arm = b.report("acme", "gb_seconds", "100", architecture="arm64").cost_nano
    assert arm == int(x86 + 100 * Fraction("0.0000133334") * NANO) - int(x86)
    # without the free tier, a request costs $0.20 per million
    b.grant("bob", "usd", NANO)
    assert [b.report("bob", "requests", 1).cost_nano for _ in range(3)] == [200, 200, 200]


# ---- found by the second review ----------------------------------------------------------------

MOVED = '[credit_types.usd]\nkind = "fiat"\n[credit_types.eur]\nkind = "fiat"\ncurrency = "EUR"\n' \
        '[meters.gpu_seconds]\ncredit_type = "usd"\nprice = "0.001"\n' \
        '[customers.acme]\nbalances = { usd = "100", eur = "100" }\n'


def test_holds_whose_meter_moved_to_another_credit_type_at_a_restart_are_released(make, tmp_path):
    b = make(MOVED)
    s = b.start_session("acme", "gpu_seconds", timeout_ms=30_000)
    a = b.authorize("acme", "gpu_seconds", 1000)
    b.run(b.engine.close())
    path = tmp_path / "eur.toml"
    path.write_text(MOVED.replace('credit_type = "usd"\nprice', 'credit_type = "eur"\nprice'))
    b.catalog = load_catalog(str(path))
    b.engine = b._open()
    b.advance(10_000)
    with pytest.raises(NotFound, match="release it"):
        b.commit(a.reservation_id, 10)
    b.release(a.reservation_id)
    h = b.heartbeat(s.session_id)  # its price is gone: closed, nothing billed, its hold released
    assert (h.closed, h.cost_nano) == (True, 0)
    b.advance(60_000)
    b.tick()  # and the housekeeping sweep goes on
    assert {x.credit_type: (x.balance_nano, x.reserved_nano) for x in b.balance("acme").balances} == \
        {"usd": (100 * NANO, 0), "eur": (100 * NANO, 0)}


def test_a_reload_that_makes_a_held_meter_a_gauge_is_refused(make):
    b = make(MOVED)
    b.authorize("acme", "gpu_seconds", 1000)
    new = parse_catalog(tomllib.loads(MOVED.replace('price = "0.001"', 'price = "0.001"\naggregation = "max"')),
                        "new.toml")
    with pytest.raises(ConfigError, match="has open reservations priced by a row it would no longer have"):
        b.run(b.engine.reload_catalog(new))


def test_a_late_event_of_a_latest_meter_is_refused(make):
    b = make('[credit_types.usd]\nkind = "fiat"\n[meters.seats]\ncredit_type = "usd"\naggregation = "latest"\n'
             'price = "10"\n[customers.acme]\nbalances = { usd = "1000" }\n')
    b.report("acme", "seats", 50)
    late = pb.UsageEvent(customer_id="acme", meter="seats", quantity=3, timestamp_ms=b.now_ms - HOUR_MS)
    with pytest.raises(InvalidInput, match="^event.timestamp_ms: a latest meter's value is its last report"):
        b.run(b.engine.report(pb.ReportRequest(event=late).SerializeToString()))
    now = pb.UsageEvent(customer_id="acme", meter="seats", quantity=3, timestamp_ms=b.now_ms)
    b.run(b.engine.report(pb.ReportRequest(event=now).SerializeToString()))  # of this window: it holds


@pytest.mark.parametrize("aggregation,dims", [("max", {}), ("unique_count", {"user": "u1"})])
def test_a_gauge_event_dated_before_the_previous_window_is_refused(make, aggregation, dims):
    """A max or unique_count meter counts in the period it is served in (the period's roll charges
    it, the ledger's in ledger mode by its windows): an event dated a day back would count in a
    period already charged. One window back (a clock a little behind) is taken."""
    unique = 'unique_dimension = "user"\n' if aggregation == "unique_count" else ""
    b = make('[credit_types.usd]\nkind = "fiat"\n[meters.seats]\ncredit_type = "usd"\n'
             f'aggregation = "{aggregation}"\n{unique}price = "10"\n[customers.acme]\nbalances = {{ usd = "1000" }}\n')
    late = pb.UsageEvent(customer_id="acme", meter="seats", quantity=3, dimensions=dims,
                         timestamp_ms=b.now_ms - HOUR_MS)
    with pytest.raises(InvalidInput, match="^event.timestamp_ms: a max or unique_count meter counts in the period"):
        b.run(b.engine.report(pb.ReportRequest(event=late).SerializeToString()))
    window = 60_000
    recent = pb.UsageEvent(customer_id="acme", meter="seats", quantity=3, dimensions=dims,
                           timestamp_ms=b.now_ms - b.now_ms % window - window)
    r = pb.ReportResponse.FromString(b.run(b.engine.report(pb.ReportRequest(event=recent).SerializeToString())))
    assert r.decision == pb.DECISION_ALLOW


def test_a_backdated_gauge_event_in_the_log_is_replayed(make):
    """The log replays what was accepted whatever the limits say now: a gauge event an older
    meterd accepted dated a day back (here: accepted with the limits off, as a replay has them)
    is applied again at a restart after kill -9, not refused."""
    b = make('[credit_types.usd]\nkind = "fiat"\n[meters.seats]\ncredit_type = "usd"\naggregation = "max"\n'
             'price = "10"\n[customers.acme]\nbalances = { usd = "1000" }\n')
    b.engine.live.core.set_event_times(2**63 - 1, 2**63 - 1)
    old = pb.UsageEvent(customer_id="acme", meter="seats", quantity=7, timestamp_ms=b.now_ms - 20 * HOUR_MS)
    assert pb.ReportResponse.FromString(b.run(b.engine.report(pb.ReportRequest(event=old).SerializeToString()))) \
        .decision == pb.DECISION_ALLOW
    b.restart(clean=False)
    core = b.engine.live.core
    assert core.state(core.account(b"acme"))[1][0] == 7  # the seats' most, from the replayed event


def test_a_keyed_report_retried_after_its_time_aged_gets_its_first_answer(make):
    b = make("openai")
    event = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=1000, dimensions={"model": "gpt-4o"},
                          timestamp_ms=b.now_ms - 23 * HOUR_MS, idempotency_key="call-1")
    data = pb.ReportRequest(event=event).SerializeToString()
    first = pb.ReportResponse.FromString(b.run(b.engine.report(data)))
    b.advance(2 * HOUR_MS)  # now 25 h old: a new event this old is refused
    again = pb.ReportResponse.FromString(b.run(b.engine.report(data)))
    assert (again.cost_nano, again.duplicate) == (first.cost_nano, True)
    assert b.bal("acme", "usd") == 10 * NANO - first.cost_nano


def test_a_gauges_free_units_come_first_at_the_period_end(make):
    b = make('[credit_types.usd]\nkind = "fiat"\n[meters.seats]\ncredit_type = "usd"\naggregation = "max"\n'
             'price = [{ up_to = "10", price = "8" }, { price = "4" }]\n'
             '[meters.flat]\ncredit_type = "usd"\naggregation = "max"\nprice = "8"\n'
             '[plans.five_free]\nperiod = "month"\nfree = { seats = "5", flat = "5" }\n'
             '[customers.acme]\nplan = "five_free"\nbalances = { usd = "1000" }\n')
    b.report("acme", "seats", 12)
    b.report("acme", "flat", 8)
    b.advance(32 * DAY_MS)
    b.tick()
    charged = sorted(-e.amount_nano for e in b.audit("acme", "gauge_charged"))
    assert charged == sorted([(5 * 8 + 2 * 4) * NANO, 3 * 8 * NANO])  # seats 6-10 at $8, 11-12 at $4; 3 flat


def test_a_data_directory_of_a_test_clock_does_not_start_on_the_wall_clock(tmp_path, monkeypatch):
    from meterd.clock import TestClock
    b = Billing(tmp_path, "openai", monkeypatch, clock=TestClock(), test_clock=True)
    b.run(b.engine.advance_clock(40 * DAY_MS, 0))
    b.close()
    settings = dataclasses.replace(b.settings, test_clock=False)
    with pytest.raises(ConfigError, match="this data directory ran on a test clock, 3456000000 ms ahead"):
        Engine(settings, b.catalog)
    Engine(b.settings, b.catalog).store.close()  # with the test clock it starts


def test_ledger_mode_refuses_tiers():
    from meterd.leases import check_catalog
    with pytest.raises(ConfigError, match="meters.gb_seconds: tiers are served in local mode only for now"):
        check_catalog(parse_catalog(tomllib.loads(TIERS), "t"))


# ---- one request, rated as one -----------------------------------------------------------------

TWO_CREDITS = """
[credit_types.usd]
kind = "fiat"

[credit_types.requests]
kind = "custom"

[meters.input_tokens]
credit_type = "usd"
per = 1000000
price = "2.50"

[meters.output_tokens]
credit_type = "usd"
per = 1000000
price = "10.00"
minimum = "0.001"

[meters.premium]
credit_type = "requests"
price = "1"

[meters.seats]
credit_type = "usd"
price = "5"
aggregation = "max"

[customers.acme]
balances = { usd = "1", requests = "10" }
"""


def test_one_call_of_input_cached_and_output_tokens_is_allowed_or_denied_whole(make):
    b = make("openai")  # acme has $10.00
    call = {"input_tokens": 1_000_000, "cached_input_tokens": 1_000_000, "output_tokens": 700_000}
    r = b.report_parts("acme", call, model="gpt-4o")  # $2.50 + $1.25 + $7.00 = $10.75: more than there is
    assert (r.decision, r.reason, r.cost_nano) == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE, 0)
    assert b.bal("acme", "usd") == 10 * NANO  # no part of it was charged
    call["output_tokens"] = 600_000
    r = b.report_parts("acme", call, model="gpt-4o")
    cost = nano("2.50", 10**6, 1_000_000) + nano("1.25", 10**6, 1_000_000) + nano("10.00", 10**6, 600_000)
    assert (r.decision, r.cost_nano, r.balance_nano) == (pb.DECISION_ALLOW, cost, 10 * NANO - cost)
    b.restart(clean=False)  # replayed from the log as one event again
    assert b.bal("acme", "usd") == 10 * NANO - cost
    b.flush()
    assert statement_usage(b, "2026-01") == {  # each quantity on its meter's line, in its own unit
        "input_tokens (model=gpt-4o)": ("1000000", nano("2.50", 10**6, 1_000_000)),
        "cached_input_tokens (model=gpt-4o)": ("1000000", nano("1.25", 10**6, 1_000_000)),
        "output_tokens (model=gpt-4o)": ("600000", nano("10.00", 10**6, 600_000))}
    b.check_conservation("acme")


def test_a_batch_of_calls_decides_each_call_whole_where_single_events_split_one(make):
    b = make("openai")  # $10: two calls of $4.50 fit, the third does not, whole
    call = pb.UsageEvent(customer_id="acme", dimensions={"model": "gpt-4o"},
                         quantities=[pb.Quantity(meter="input_tokens", quantity=200_000),
                                     pb.Quantity(meter="output_tokens", quantity=400_000)])
    r = pb.ReportBatchResponse.FromString(b.run(b.engine.report_batch(
        pb.ReportBatchRequest(events=[call] * 3, details=True).SerializeToString())))
    each = nano("2.50", 10**6, 200_000) + nano("10.00", 10**6, 400_000)
    assert [(x.decision, x.cost_nano) for x in r.results] == [(pb.DECISION_ALLOW, each)] * 2 + [(pb.DECISION_DENY, 0)]
    assert (r.accepted, r.denied, b.bal("acme", "usd")) == (2, 1, 10 * NANO - 2 * each)
    # the same call as two events of a batch: its input is served and its output refused
    split = b.batch([pb.UsageEvent(customer_id="acme", meter=m, quantity=q, dimensions={"model": "gpt-4o"})
                     for m, q in (("input_tokens", 200_000), ("output_tokens", 400_000))])
    assert (split.accepted, split.denied) == (1, 1)


def test_authorize_holds_several_meters_and_one_commit_settles_them(make):
    b = make(TWO_CREDITS)  # $1
    a = b.authorize_parts("acme", {"input_tokens": 1_000, "output_tokens": 4_096})
    held = nano("2.50", 10**6, 1_000) + nano("10.00", 10**6, 4_096)
    assert (a.decision, a.reserved_nano, a.available_nano) == (pb.DECISION_ALLOW, held, NANO - held)
    with pytest.raises(InvalidInput, match=r"^quantities: the reservation holds several meters \(input_tokens, "
                                           r"output_tokens\)"):
        b.commit(a.reservation_id, 10)
    with pytest.raises(InvalidInput, match=r"^quantities\[1\]\.meter: meter 'premium' is not one the reservation"):
        b.commit_parts(a.reservation_id, {"input_tokens": 1, "premium": 1})
    with pytest.raises(InvalidInput, match=r"^quantities\[0\]\.quantity_decimal: meter 'input_tokens' counts whole"):
        b.commit_parts(a.reservation_id, {"input_tokens": "1.5"})
    b.restart(clean=False)  # the hold, both meters of it, survives a kill
    c = b.commit_parts(a.reservation_id, {"input_tokens": 1_000, "output_tokens": 35})
    # output's minimum ($0.001) is above its 35 tokens' $0.00035: each meter's own minimum holds
    cost = nano("2.50", 10**6, 1_000) + NANO // 1000
    assert (c.cost_nano, c.released_nano, c.balance_nano) == (cost, held - cost, NANO - cost)
    again = b.commit_parts(a.reservation_id, {"input_tokens": 1_000, "output_tokens": 35})
    assert again.duplicate and again.cost_nano == cost
    b.restart(clean=False)  # both settlements replay
    assert b.bal("acme", "usd") == NANO - cost
    a = b.authorize_parts("acme", {"input_tokens": 1_000, "output_tokens": 1_000})
    assert b.commit_parts(a.reservation_id, {"input_tokens": 400}).cost_nano == nano("2.50", 10**6, 400)
    b.flush()
    assert {k: v[0] for k, v in statement_usage(b, "2026-01").items()} == {"input_tokens": "1400",
                                                                           "output_tokens": "35"}
    events = {x["description"]: x["events"] for x in b.statement("acme", "2026-01")["lines"]
              if x["section"] == "usage"}
    assert events == {"input_tokens": 2, "output_tokens": 1}  # a meter that used nothing is no event
    b.check_conservation("acme")


@pytest.mark.parametrize("parts, field, message", [
    ({"input_tokens": 1, "premium": 1}, "quantities[1].meter", "meter 'premium' prices in credit type 'requests'"),
    ({"input_tokens": 1, "seats": 1}, "quantities[1].meter", "charged at period end"),
    ({"input_tokens": 1, "nope": 1}, "quantities[1].meter", "unknown meter 'nope'"),
    ({"input_tokens": -1}, "quantities[0].quantity", "must not be negative"),
])
def test_several_meters_that_cannot_be_one_request_are_refused_naming_the_quantity(make, parts, field, message):
    b = make(TWO_CREDITS)
    for call in (lambda: b.authorize_parts("acme", parts), lambda: b.report_parts("acme", parts)):
        with pytest.raises(InvalidInput) as e:
            call()
        assert e.value.field.endswith(field) and message in str(e.value), str(e.value)
    assert b.bal("acme", "usd") == NANO and b.balance("acme").balances[0].reserved_nano == 0
    both = pb.AuthorizeRequest(customer_id="acme", meter="input_tokens", quantity=1,
                               quantities=[pb.Quantity(meter="output_tokens", quantity=1)])
    with pytest.raises(InvalidInput, match="^meter: give meter and quantity, or quantities, not both"):
        b.run(wire.authorize(b.engine, both))


RELAX = """
[credit_types.fast_seconds]
kind = "custom"
decimals = 3

[meters.gpu_seconds]
credit_type = "fast_seconds"
precision = 3
price = "1"

[meters.upscales]
credit_type = "fast_seconds"
price = "4"

[plans.standard]
period = "month"
[plans.standard.credits.fast_seconds]
included = "60"
fallback = "relax"
priority_step = "10"

[customers.painter]
plan = "standard"
"""


def test_a_degraded_call_counts_each_quantity_and_charges_nothing(make):
    b = make(RELAX)
    r = b.report_parts("painter", {"gpu_seconds": "50", "upscales": 2})  # 58 of 60 fast seconds
    assert (r.decision, r.cost_nano, r.balance_nano) == (pb.DECISION_ALLOW, 58 * NANO, 2 * NANO)
    r = b.report_parts("painter", {"gpu_seconds": "1.5", "upscales": 1})  # 5.5: more than the 2 left
    assert (r.decision, r.cost_nano, r.mode, r.balance_nano) == (pb.DECISION_DEGRADE, 0, "relax", 2 * NANO)
    assert r.priority == 100  # the first 5.5 degraded seconds are under one step of 10
    usage = {u.meter: u.quantity for u in b.balance("painter").usage}
    assert usage == {"gpu_seconds": "51.500", "upscales": "3"}  # each quantity counted, none charged
    r = b.report_parts("painter", {"gpu_seconds": "2"})
    assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, 2 * NANO)  # what is left is still spent


def test_a_quantity_of_several_that_overflows_is_refused_naming_it_and_a_reordered_retry_is_the_same(make):
    b = make(STEPS)
    big = 2**63 - 1  # fits the field, not its increment or its cost
    for call in (lambda: b.authorize_parts("acme", {"tokens": 1, "characters": big}, model="gpt-4o"),
                 lambda: b.report_parts("acme", {"tokens": 1, "characters": big}, model="gpt-4o")):
        with pytest.raises(InvalidInput) as e:
            call()
        assert e.value.field.endswith("quantities[1].quantity"), str(e.value)
    a = b.authorize_parts("acme", {"tokens": 10, "characters": 100}, model="gpt-4o")
    with pytest.raises(InvalidInput) as e:
        b.commit_parts(a.reservation_id, {"characters": 1, "tokens": big})
    assert e.value.field == "quantities[1].quantity", str(e.value)
    first = b.commit_parts(a.reservation_id, {"tokens": 10, "characters": 100})
    again = b.commit_parts(a.reservation_id, {"characters": 100, "tokens": 10})  # the same, in another order
    assert again.duplicate and again.cost_nano == first.cost_nano
    with pytest.raises(InvalidInput, match="^quantities: reservation .* was settled before with a different"):
        b.commit_parts(a.reservation_id, {"characters": 100, "tokens": 11})


def test_a_reservation_whose_meter_is_gone_keeps_its_name_through_a_reload(make, tmp_path):
    b = make(TWO_CREDITS)
    a = b.authorize_parts("acme", {"input_tokens": 1_000, "output_tokens": 1_000})
    without = tmp_path / "without.toml"
    without.write_text(TWO_CREDITS.replace('[meters.output_tokens]\ncredit_type = "usd"\nper = 1000000\n'
                                           'price = "10.00"\nminimum = "0.001"\n', ""))
    b.catalog = load_catalog(str(without))
    b.restart(clean=False)  # output_tokens is gone: the hold can only be released
    b.run(b.engine.reload_catalog(load_catalog(str(without))))  # and a reload must not give it another meter
    with pytest.raises(NotFound, match="release it"):
        b.commit_parts(a.reservation_id, {"input_tokens": 1_000, "seats": 1})
    doc = json.loads(b.engine.reservations.holds.reservations[a.reservation_id].to_json(b.engine.live.catalog))
    assert (doc["meter"], doc["more_meters"]) == ("input_tokens", ["output_tokens"])
    assert b.release(a.reservation_id).released_nano == a.reserved_nano
    assert b.bal("acme", "usd") == NANO and b.balance("acme").balances[0].reserved_nano == 0


# ---- per-request conditions --------------------------------------------------------------------

def gemini(kind: str, tokens: int, long: bool) -> Fraction:
    """Gemini 1.5 Flash (examples/gemini.toml), nano-USD: input $0.075 / $0.15, output $0.30 / $0.60 per 1M."""
    price = {("input", False): "0.075", ("input", True): "0.15", ("output", False): "0.30", ("output", True): "0.60"}
    return nano(price[(kind, long)], 10**6, Fraction(tokens))


def test_a_prompt_above_128k_tokens_prices_the_whole_request_at_long_context_rates(make):
    b = make("gemini")  # acme has $10.00
    costs = []
    for prompt, output in [(100_000, 2_000), (128_000, 1_000), (128_001, 1_000), (900_000, 8_000)]:
        r = b.report_parts("acme", {"input_tokens": prompt, "output_tokens": output}, model="gemini-1.5-flash")
        long = prompt > 128_000
        assert r.decision == pb.DECISION_ALLOW
        costs.append(gemini("input", prompt, long) + gemini("output", output, long))
        assert r.cost_nano == int(sum(costs)) - int(sum(costs[:-1]))  # whole nanos, the rest carried
    assert b.bal("acme", "usd") == 10 * NANO - int(sum(costs))  # sub-nano remainders carried, not lost
    b.restart(clean=False)  # replayed with the same conditions
    assert b.bal("acme", "usd") == 10 * NANO - int(sum(costs))
    b.flush()
    lines = statement_usage(b, "2026-01")  # the condition's value is on the statement's lines
    assert lines["input_tokens (context=short, model=gemini-1.5-flash)"][0] == "228000"
    assert lines["input_tokens (context=long, model=gemini-1.5-flash)"][0] == "1028001"
    assert lines["output_tokens (context=long, model=gemini-1.5-flash)"][0] == "9000"
    b.check_conservation("acme")


def test_a_quantity_without_the_meter_its_condition_reads_and_a_request_that_sets_it_are_refused(make):
    b = make("gemini")
    with pytest.raises(InvalidInput, match="^event.dimensions: meter 'output_tokens' needs the 'context' "
                                           "dimension"):
        b.report("acme", "output_tokens", 1_000, model="gemini-1.5-flash")  # no prompt in the request
    message = "'context' is set by meterd from the request's input_tokens: do not send it"
    calls = [lambda: b.report_parts("acme", {"input_tokens": 1, "output_tokens": 1}, model="gemini-1.5-flash",
                                    context="short"),
             lambda: b.batch([pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=200_000,
                                            dimensions={"model": "gemini-1.5-flash", "context": "short"})]),
             lambda: b.authorize_parts("acme", {"input_tokens": 200_000}, model="gemini-1.5-flash", context="short")]
    for call in calls:
        with pytest.raises(InvalidInput) as e:
            call()
        assert e.value.field.endswith("dimensions") and message in str(e.value), str(e.value)
    assert b.bal("acme", "usd") == 10 * NANO


def test_authorize_holds_at_the_estimate_and_commit_prices_the_prompt_it_really_had(make):
    b = make("gemini")
    a = b.authorize_parts("acme", {"input_tokens": 100_000, "output_tokens": 8_192}, model="gemini-1.5-flash")
    held = gemini("input", 100_000, False) + gemini("output", 8_192, False)
    assert a.reserved_nano == -(-held.numerator // held.denominator)
    b.restart(clean=False)
    # the prompt turned out longer than the estimate: the request is a long-context one
    c = b.commit_parts(a.reservation_id, {"input_tokens": 150_000, "output_tokens": 500})
    cost = gemini("input", 150_000, True) + gemini("output", 500, True)
    assert c.cost_nano == int(cost)
    b.flush()
    assert set(statement_usage(b, "2026-01")) == {"input_tokens (context=long, model=gemini-1.5-flash)",
                                                  "output_tokens (context=long, model=gemini-1.5-flash)"}
    a = b.authorize_parts("acme", {"input_tokens": 200_000, "output_tokens": 100}, model="gemini-1.5-flash")
    c = b.commit_parts(a.reservation_id, {"input_tokens": 100_000, "output_tokens": 100})  # and shorter: short
    second = gemini("input", 100_000, False) + gemini("output", 100, False)
    assert c.cost_nano == int(cost + second) - int(cost)  # the first commit's sub-nano rest carried into it
    b.check_conservation("acme")


@pytest.mark.parametrize("condition, message", [
    ({"quantity_of": "nope", "values": [{"up_to": "1", "value": "a"}, {"value": "b"}]},
     "quantity_of: must name a sum"),
    ({"quantity_of": ["tokens"], "values": [{"up_to": "1", "value": "a"}, {"value": "b"}]},
     "quantity_of: must name a sum"),
    ({"quantity_of": "seats", "values": [{"up_to": "1", "value": "a"}, {"value": "b"}]},
     "quantity_of: must name a sum"),
    ({"quantity_of": "tokens", "values": [{"value": "b"}]}, "values: must be a list of 2 to 16"),
    ({"quantity_of": "tokens", "values": [{"up_to": "5", "value": "a"}, {"up_to": "5", "value": "b"},
                                           {"value": "c"}]}, "values[1].up_to: must be above the one before it"),
    ({"quantity_of": "tokens", "values": [{"up_to": "5", "value": "a"}, {"up_to": "9", "value": "b"}]},
     "values[1]: each value but the last has an up_to"),
    ({"quantity_of": "tokens", "values": [{"up_to": "1.5", "value": "a"}, {"value": "b"}]},
     "values[0].up_to: must be a quantity of tokens (at most 0 decimals)"),
    ({"quantity_of": "tokens", "values": [{"up_to": "1", "value": "*"}, {"value": "b"}]},
     "values[0].value: must be a dimension value"),
])
def test_a_condition_that_cannot_hold_is_refused_naming_the_key(condition, message):
    doc = {"credit_types": {"usd": {"kind": "fiat"}},
           "meters": {"tokens": {"credit_type": "usd", "price": "1", "per": 1000},
                      "seats": {"credit_type": "usd", "price": "1", "aggregation": "max"}},
           "conditions": {"size": condition}}
    with pytest.raises(ConfigError) as e:
        parse_catalog(doc, "c.toml")
    assert str(e.value).startswith("c.toml: conditions.size.") and message in str(e.value), str(e.value)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300_000), st.integers(0, 5_000), st.booleans(), st.booleans()),
                min_size=1, max_size=30))
def test_both_cores_set_conditions_alike(events):
    catalog = load_catalog(str(Path(__file__).parent.parent / "examples" / "gemini.toml"))
    cores = [make(*catalog.compiled.core_args()[:3], dict(LIMITS), 16, None, None, None, None,
                  list(catalog.compiled.conditions)) for make in CORES.values()]
    batch = []
    for prompt, output, together, cheat in events:
        dims = {"model": "gemini-1.5-flash", **({"context": "short"} if cheat and prompt % 7 == 0 else {})}
        if together:
            batch.append(pb.UsageEvent(customer_id="acme", dimensions=dims, quantities=[
                pb.Quantity(meter="input_tokens", quantity=prompt), pb.Quantity(meter="output_tokens",
                                                                               quantity=output)]))
        else:
            batch.append(pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=prompt, dimensions=dims))
    data = pb.ReportBatchRequest(events=batch, details=True).SerializeToString()
    out = []
    for core in cores:
        core.credit(core.open_account(b"acme"), 0, 10**12)
        try:
            out.append((core.apply_batch(data), sorted(core.take_usage()), core.state_bytes(0)))
        except InvalidInput as e:
            out.append(str(e))
    assert all(o == out[0] for o in out), out
    if not isinstance(out[0], str):
        for _, _, dims, _, _, _, _, _ in out[0][1]:
            context = _fastpath_py.set_items(dims)[b"context"]
            assert context in (b"short", b"long")


LONG_NAMES = """
[credit_types.usd]
kind = "fiat"

[conditions.prompt_size]
quantity_of = "tokens"
values = [{ up_to = "100", value = "up_to_100_tokens" }, { value = "above_100_tokens" }]

[meters.tokens]
credit_type = "usd"
per = 1000
price_dimension = "prompt_size"
prices = { up_to_100_tokens = "1", above_100_tokens = "2" }

[customers.acme]
balances = { usd = "10.00" }
"""


@pytest.mark.parametrize("core", list(CORES))
def test_a_conditions_value_is_meterds_own_not_bounded_by_the_requests_limits(core, tmp_path, monkeypatch):
    path = tmp_path / "c.toml"
    path.write_text(LONG_NAMES)
    b = Billing(tmp_path / "b", str(path), monkeypatch, core=core, dimension_value_bytes_max=8)  # shorter than it
    try:
        assert b.report("acme", "tokens", 500).cost_nano == NANO  # 500 tokens at $2 per 1000
        a = b.authorize_parts("acme", {"tokens": 500})  # the engine as the core: the value is not the request's
        assert (a.decision, a.reserved_nano) == (pb.DECISION_ALLOW, NANO)
    finally:
        b.close()


def test_many_small_events_with_long_condition_names_fit_the_compiled_cores_buffers():
    catalog = parse_catalog(tomllib.loads(LONG_NAMES), "c.toml")
    data = pb.ReportBatchRequest(events=[pb.UsageEvent(customer_id="c", meter="tokens", quantity=9)] * 8000
                                 ).SerializeToString()  # 12 bytes an event on the wire, 44 of condition
    out = []
    for make in CORES.values():
        core = make(*catalog.compiled.core_args()[:3], dict(LIMITS), 16, None, None, None, None,
                    list(catalog.compiled.conditions))
        core.credit(core.open_account(b"c"), 0, 10**15)
        out.append([core.apply_batch(data) for _ in range(3)] + [sorted(core.take_usage()), core.state_bytes(0)])
    assert all(o == out[0] for o in out)
    assert out[0][0][:3] == (8000, 0, 0)


# ---- per-customer overrides: an overdraft of the customer's own --------------------------------

def test_a_customers_own_overdraft_applies_at_once_is_audited_and_outlives_restarts_and_periods(make):
    b = make("openai")  # acme: $10.00 on the prepaid plan, which allows no overdraft
    r = b.set_overdraft("acme", "usd", 5 * NANO, reason="net-30 terms")
    assert (r.floor_nano, r.available_nano) == (-5 * NANO, 15 * NANO)
    call = {"input_tokens": 1_000_000, "output_tokens": 950_000}  # $2.50 + $9.50 = $12.00
    assert b.report_parts("acme", call, model="gpt-4o").balance_nano == -2 * NANO  # into the overdraft
    assert b.report("acme", "output_tokens", 400_000, model="gpt-4o").decision == pb.DECISION_DENY  # $4: past it
    entry = b.audit("acme", "overdraft")[-1]
    assert (entry.amount_nano, entry.balance_before_nano, entry.balance_after_nano, entry.reference) == (
        5 * NANO, 10 * NANO, 10 * NANO, "net-30 terms")  # audited; the balance does not move
    b.restart(clean=False)  # the floor replays from the log, the overdraft from its table
    b.advance(40 * DAY_MS)  # and a period roll of the plan keeps it
    b.tick()
    usd = next(x for x in b.balance("acme").balances if x.credit_type == "usd")
    assert usd.floor_nano == -5 * NANO
    r = b.set_overdraft("acme", "usd", 0, clear=True, reason="terms ended")
    assert r.floor_nano == 0 and r.available_nano < 0  # the plan's floor again: nothing more may be spent
    assert b.report("acme", "input_tokens", 1, model="gpt-4o").decision == pb.DECISION_DENY
    b.restart(clean=False)
    assert next(x for x in b.balance("acme").balances if x.credit_type == "usd").floor_nano == 0
    b.check_conservation("acme")


@pytest.mark.parametrize("customer, credit_type, amount, clear, reason, error, field", [
    ("nobody", "usd", NANO, False, "x", NotFound, ""),
    ("acme", "eur", NANO, False, "x", InvalidInput, "credit_type"),
    ("acme", "usd", -NANO, False, "x", InvalidInput, "amount_nano"),
    ("acme", "usd", NANO, True, "x", InvalidInput, "amount_nano"),
    ("acme", "usd", 2**62 + 1, False, "x", InvalidInput, "amount_nano"),
    ("acme", "usd", NANO, False, " ", InvalidInput, "reason"),
])
def test_an_overdraft_that_cannot_be_set_is_refused_naming_why(make, customer, credit_type, amount, clear, reason,
                                                                error, field):
    b = make("openai")
    with pytest.raises(error) as e:
        b.set_overdraft(customer, credit_type, amount, clear, reason)
    assert getattr(e.value, "field", "") == field, str(e.value)
    assert next(x for x in b.balance("acme").balances if x.credit_type == "usd").floor_nano == 0
    assert b.audit("acme", "overdraft") == []


def test_a_customers_own_overdraft_comes_back_with_its_credit_type(make, tmp_path):
    with_usd = ('[credit_types.usd]\nkind = "fiat"\n\n[credit_types.eur]\nkind = "fiat"\n\n'
                '[meters.calls]\ncredit_type = "usd"\nprice = "1"\n\n[customers.acme]\nbalances = { usd = "10" }\n')
    without = with_usd.replace('[credit_types.usd]\nkind = "fiat"\n\n', "").replace('"usd"', '"eur"').replace(
        "{ usd", "{ eur")
    b = make(with_usd)
    (tmp_path / "without.toml").write_text(without)
    b.run(wire.grant(b.engine, apb.GrantRequest(customer_id="bob", credit_type="usd", amount_nano=3 * NANO)))
    for customer in ("acme", "bob"):  # bob: an account of a grant, with no plan, not in the catalog
        assert b.set_overdraft(customer, "usd", 5 * NANO).floor_nano == -5 * NANO
    b.run(b.engine.reload_catalog(load_catalog(str(tmp_path / "without.toml"))))  # usd gone
    b.run(b.engine.reload_catalog(b.catalog))  # and back
    b.restart(clean=False)
    floors = {c: next(x.floor_nano for x in b.balance(c).balances if x.credit_type == "usd") for c in ("acme", "bob")}
    assert floors == {"acme": -5 * NANO, "bob": -5 * NANO}


# ---- per-customer overrides: a negotiated discount, a budget, included credits -----------------

def usd_of(b: Billing, customer: str) -> pb.CreditBalance:
    return next(x for x in b.balance(customer).balances if x.credit_type == "usd")


def test_a_negotiated_discount_takes_its_share_off_every_price_exactly_and_outlives_restarts(make):
    b = make("openai")  # acme: $10.00; gpt-4o $2.50 / $10.00 per 1M input / output tokens, mini $0.15 input
    r = b.set_term("acme", "usd", "discount", 1250, reason="annual contract")  # 12.5% off
    assert [(t.credit_type, t.term, t.value) for t in r.terms] == [("usd", "discount", 1250)]
    off = Fraction(7, 8)
    spent = Fraction(0)
    call = {"input_tokens": 100_000, "output_tokens": 50_000}
    r = b.report_parts("acme", call, model="gpt-4o")
    spent += (100_000 * Fraction("2.50") + 50_000 * Fraction("10.00")) / 10**6 * off * NANO  # $0.65625
    assert r.cost_nano == int(spent) == 656_250_000
    for _ in range(3):  # 7 tokens of mini: 918.75 nano each, the 0.75 carried
        b.report("acme", "input_tokens", 7, model="gpt-4o-mini")
        spent += 7 * Fraction("0.15") / 10**6 * off * NANO
    assert b.bal("acme", "usd") == 10 * NANO - int(spent)  # 2,756.25 nano for the three: 2,756 charged
    b.restart(clean=False)  # the discount replays from the log
    b.report("acme", "input_tokens", 7, model="gpt-4o-mini")
    spent += 7 * Fraction("0.15") / 10**6 * off * NANO
    assert b.bal("acme", "usd") == 10 * NANO - int(spent)  # and the carried remainder with it
    b.run(b.engine.snapshots.snapshot())
    b.restart(clean=False)  # now from a snapshot
    # A hold is quoted at the discounted price: $10 of output at list is $8.75 to this customer.
    available = usd_of(b, "acme").available_nano
    assert 8_750_000_000 <= available < 10 * NANO
    a = b.authorize("acme", "output_tokens", 1_000_000, model="gpt-4o")
    assert a.decision == pb.DECISION_ALLOW and usd_of(b, "acme").reserved_nano == 8_750_000_000
    c = b.commit(a.reservation_id, 100_000)  # $1.00 at list
    spent += Fraction(1) * off * NANO
    assert c.cost_nano == 875_000_000 and b.bal("acme", "usd") == 10 * NANO - int(spent)
    entry = b.audit("acme", "discount")[-1]
    assert (entry.amount_nano, entry.reference) == (1250, "annual contract")
    b.set_term("acme", "usd", "discount", clear=True, reason="contract ended")
    r = b.report("acme", "input_tokens", 1_000_000, model="gpt-4o-mini")
    assert r.cost_nano == 150_000_000  # the list price again
    assert b.balance("acme").terms == []
    b.check_conservation("acme")


def test_a_budget_raised_mid_month_never_lets_the_month_cost_more_than_it(make):
    b = make("copilot")  # dev1 on Pro: 300 premium requests, then $0.04 each up to its budget ($0 by default)
    for _ in range(300):
        assert b.report("dev1", "chat_requests", 1, model="claude-3.5-sonnet").decision == pb.DECISION_ALLOW
    assert b.report("dev1", "chat_requests", 1, model="gemini-2.0-flash").decision == pb.DECISION_DENY
    r = b.set_term("dev1", "premium", "budget", NANO, reason="budget set")  # $1.00: 25 requests
    assert r.floor_nano == -int(Fraction(1) / Fraction("0.04") * NANO) == -25 * NANO
    for _ in range(16):  # 16 thinking turns of 1.25: 20 requests, $0.80
        assert b.report("dev1", "chat_requests", 1, model="claude-3.7-sonnet-thinking").decision == pb.DECISION_ALLOW
    r = b.set_term("dev1", "premium", "budget", NANO // 2, reason="lowered")  # $0.50: already past it
    assert r.floor_nano == -int(Fraction(1, 2) / Fraction("0.04") * NANO) and r.available_nano < 0
    assert b.report("dev1", "chat_requests", 1, model="gemini-2.0-flash").decision == pb.DECISION_DENY
    b.set_term("dev1", "premium", "budget", 2 * NANO, reason="raised")  # $2.00: 50 requests in all
    used = 20
    while b.report("dev1", "chat_requests", 1, model="gemini-2.0-flash").decision == pb.DECISION_ALLOW:
        used += Fraction(1, 4)
    assert used == 50  # exactly to the budget, and not one quarter-request past it
    b.advance(32 * DAY_MS)
    b.tick()
    bill = b.audit("dev1", "overage_charged")[-1]
    assert bill.amount_nano == 50 * NANO and bill.charge_nano == int(50 * Fraction("0.04") * NANO) == 2 * NANO
    # The next month starts with 300 requests and the same budget.
    assert b.balance("dev1").terms[0].term == "budget"
    assert next(x for x in b.balance("dev1").balances if x.credit_type == "premium").floor_nano == -50 * NANO
    b.check_conservation("dev1")


def test_a_budget_counts_what_an_early_bill_already_charged(make):
    b = make("cursor")  # bob: $0.04 a request past 500, billed at $20, spend limit $20
    r = b.set_term("bob", "requests", "budget", 30 * NANO, reason="raised")  # $30 in place of the plan's $20
    assert r.floor_nano == -750 * NANO
    for _ in range(1000):  # the pool, then $20 of overage: billed early at the threshold
        b.report("bob", "requests", 1, model="gpt-4o")
    b.tick()
    early = b.audit("bob", "overage_charged")
    assert [(e.amount_nano, e.charge_nano) for e in early] == [(500 * NANO, 20 * NANO)]
    b.set_term("bob", "requests", "budget", 25 * NANO, reason="lowered")  # $5 left: 125 requests
    served = 0
    while b.report("bob", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW:
        served += 1
    assert served == int((25 - 20) / Fraction("0.04"))
    b.advance(32 * DAY_MS)
    b.tick()
    assert sum(e.charge_nano for e in b.audit("bob", "overage_charged")) == 25 * NANO


def test_included_credits_of_a_customers_own_are_raised_at_once_and_lowered_from_the_next_period(make):
    b = make("copilot")
    premium = lambda: b.bal("dev1", "premium")  # noqa: E731
    for _ in range(100):
        b.report("dev1", "chat_requests", 1, model="gemini-2.5-pro")
    assert premium() == 200 * NANO
    r = b.set_term("dev1", "premium", "included", 500 * NANO, reason="pilot")  # 200 more now
    assert premium() == 400 * NANO and r.available_nano == 400 * NANO
    b.set_term("dev1", "premium", "included", 400 * NANO, reason="pilot, smaller")  # not taken back now
    assert premium() == 400 * NANO
    b.set_term("dev1", "premium", "included", 600 * NANO, reason="pilot, larger")  # 100 above the 500 given
    assert premium() == 500 * NANO
    b.restart(clean=False)
    b.advance(32 * DAY_MS)
    b.tick()
    assert premium() == 600 * NANO  # the next period: the customer's own amount, not the plan's 300
    b.set_term("dev1", "premium", "included", clear=True, reason="pilot over")
    b.advance(31 * DAY_MS)
    b.tick()
    assert premium() == 300 * NANO
    kinds = [(e.kind, e.amount_nano) for e in b.audit("dev1") if e.kind == "included_amount"]
    assert kinds == [("included_amount", 500 * NANO), ("included_amount", 400 * NANO),
                     ("included_amount", 600 * NANO), ("included_amount", 0)]
    b.check_conservation("dev1")


@pytest.mark.parametrize("customer, credit_type, term, value, clear, field, words", [
    ("acme", "usd", "rebate", 1, False, "term", "not one of"),
    ("acme", "eur", "discount", 1000, False, "credit_type", "unknown credit type 'eur'"),
    ("acme", "usd", "overdraft", 2**62 + 1, False, "value", "2^62"),
    ("acme", "usd", "discount", 10_001, False, "value", "basis points"),
    ("acme", "usd", "discount", -1, False, "value", "basis points"),
    ("acme", "usd", "discount", 5, True, "value", "must be 0 with clear"),
    ("acme", "usd", "budget", NANO, False, "credit_type", "no overage in usd"),
    ("walk-in", "usd", "included", NANO, False, "credit_type", "has no plan with usd credits"),
    ("acme", "usd", "included", -NANO, False, "value", "2^62"),
])
def test_a_term_that_cannot_be_set_is_refused_naming_the_field_and_changes_nothing(make, customer, credit_type, term,
                                                                                  value, clear, field, words):
    b = make("openai")  # acme: on the prepaid plan (usd credits, no overage); walk-in: a grant, no plan
    b.grant("walk-in", "usd", NANO)
    with pytest.raises(InvalidInput) as e:
        b.set_term(customer, credit_type, term, value, clear)
    assert e.value.field == field and words in str(e.value), str(e.value)
    assert b.balance(customer).terms == [] and b.audit(customer, "discount") == []


# ---- a billing period apart from the credit period: Midjourney's annual plans ------------------

def test_an_annual_plan_bills_once_a_year_and_starts_its_fast_time_and_relax_priority_again_each_month(make):
    b = make("midjourney")  # standard_annual: $288 a year, 15 fast hours (54,000 s) a month, then Relax
    s = b.subscribe("yearly", "standard_annual")
    anchor = s.anchor_ms
    month = lambda k: period_start(anchor, "month", k)  # noqa: E731
    assert (s.period_start_ms, s.period_end_ms) == (anchor, period_start(anchor, "year", 1))
    assert (s.credit_period_start_ms, s.credit_period_end_ms) == (anchor, month(1))
    forfeits = []
    for k in range(13):
        assert b.bal("yearly", "fast_seconds") == 54_000 * NANO  # each month's fast time, none carried
        if k % 2 == 0:  # all of it, then Relax: the priority falls one step per 600 s of the month's relax time
            b.report("yearly", "gpu_seconds", "54000", job="image")
            relax = [b.report("yearly", "gpu_seconds", "1200", job="image") for _ in range(2)]
            assert [(r.decision, r.mode, r.priority) for r in relax] == [(pb.DECISION_DEGRADE, "relax", 98),
                                                                         (pb.DECISION_DEGRADE, "relax", 96)]
        else:  # some of it: the rest is forfeited at the month's end
            b.report("yearly", "gpu_seconds", str(54_000 - 1000 * k), job="draft")  # half price
            forfeits.append(54_000 * NANO - (54_000 - 1000 * k) * NANO // 2)
        b.now_ms = month(k + 1)
        b.tick()
    assert [e.amount_nano for e in b.audit("yearly", "expire")] == [-f for f in forfeits]
    fees = b.audit("yearly", "fee")
    assert [(e.charge_nano, e.reference) for e in fees] == [(288 * NANO, "standard_annual period 0"),
                                                          (288 * NANO, "standard_annual period 1")]
    assert fees[1].effective_ms == period_start(anchor, "year", 1) == month(12)
    sub = b.engine.subscriptions.subs["yearly"]
    assert (sub.n, sub.billing_n, sub.start_ms, sub.billing_end_ms) == (13, 1, month(13), period_start(anchor,
                                                                                                   "year", 2))
    # A cancel at the period's end waits for the year's end: the months up to it still get their fast time.
    assert b.cancel("yearly", at_period_end=True).period_end_ms == month(24)
    for k in range(13, 24):
        b.now_ms = month(k + 1)
        b.tick()
        if k < 23:
            assert b.bal("yearly", "fast_seconds") == 54_000 * NANO
    assert "yearly" not in b.engine.subscriptions.subs and b.bal("yearly", "fast_seconds") == 0
    assert len(b.audit("yearly", "fee")) == 2
    b.check_conservation("yearly")


def test_a_plan_change_keeps_the_billing_and_credit_periods(make):
    b = make("midjourney")
    b.subscribe("yearly", "standard_annual")
    with pytest.raises(InvalidInput) as e:
        b.change_plan("yearly", "pro")
    assert e.value.field == "plan" and "credits every month" in str(e.value)


@pytest.mark.parametrize("period, credit_period, words", [
    ("month", "week", "must be 'month' (the billing period) or one whose boundaries fall on its: day"),
    ("year", "week", "or one whose boundaries fall on its: month, day"),
    ("day", "month", "must be 'day' (the billing period)"),
    ("month", "quarter", "must be 'month'"),
])
def test_a_credit_period_must_fall_within_the_billing_period(period, credit_period, words):
    doc = {"credit_types": {"usd": {"kind": "fiat"}}, "meters": {"calls": {"credit_type": "usd", "price": "1"}},
           "plans": {"p": {"period": period, "credit_period": credit_period}}}
    with pytest.raises(ConfigError) as e:
        parse_catalog(doc, "c.toml")
    assert str(e.value).startswith("c.toml: plans.p.credit_period: ") and words in str(e.value), str(e.value)


# ---- review: budgets, terms and periods across overdrafts, reloads and restarts ------------------

def test_a_budget_also_bounds_an_overdraft_of_the_customers_own(make):
    b = make("copilot")  # what is below zero at the period's end is billed as overage: the budget bounds it
    for _ in range(300):
        b.report("dev1", "chat_requests", 1, model="claude-3.5-sonnet")
    b.set_term("dev1", "premium", "budget", NANO, reason="budget $1")  # 25 requests
    r = b.set_term("dev1", "premium", "overdraft", 100 * NANO, reason="credit line")
    assert r.floor_nano == -25 * NANO
    served = 0
    while b.report("dev1", "chat_requests", 1, model="claude-3.5-sonnet").decision == pb.DECISION_ALLOW:
        served += 1
    assert served == 25
    b.advance(32 * DAY_MS)
    b.tick()
    assert sum(e.charge_nano for e in b.audit("dev1", "overage_charged")) == NANO


def swapped_catalog(tmp_path: Path, name: str, first: str) -> str:
    """An example catalog with its credit type ``first`` listed first (a reload renumbers them)."""
    text = (Path(__file__).resolve().parent.parent / "examples" / f"{name}.toml").read_text()
    start = text.index(f"[credit_types.{first}]")
    end = text.index("\n[", start) + 1
    block = text[start:end] + "\n"
    text = text[:start] + text[end:]
    at = text.index("[credit_types.")
    path = tmp_path / f"{name}-swapped.toml"
    path.write_text(text[:at] + block + text[at:])
    return str(path)


@pytest.mark.parametrize("restart", [False, True])
def test_a_catalog_that_renumbers_credit_types_keeps_a_budget_and_included_credits(make, tmp_path, restart):
    b = make("cursor")  # bob: $0.04 a request past 500, billed early at $20; a $30 budget of its own
    b.set_term("bob", "requests", "budget", 30 * NANO, reason="raised")
    b.set_term("bob", "requests", "included", 600 * NANO, reason="pilot")  # 100 more now
    for _ in range(1100):
        b.report("bob", "requests", 1, model="gpt-4o")
    b.tick()  # $20 billed early
    swapped = load_catalog(swapped_catalog(tmp_path, "cursor", "requests"))
    assert swapped.credit_index["requests"] == 0 != b.catalog.credit_index["requests"]
    if restart:  # the catalog file changed under a stopped daemon
        b.catalog = swapped
        b.restart(clean=False)
    else:
        b.run(b.engine.reload_catalog(swapped))
    b.set_term("bob", "requests", "included", 700 * NANO, reason="pilot, larger")  # 100 above the 600 given
    served = 0
    while b.report("bob", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW:
        served += 1
    assert served == 100 + 250  # the 100 included more, then $10 of overage: what the budget leaves
    b.restart(clean=False)
    b.advance(32 * DAY_MS)
    b.tick()
    assert sum(e.charge_nano for e in b.audit("bob", "overage_charged")) == 30 * NANO
    assert b.bal("bob", "requests") == 700 * NANO  # the next period: the customer's own 700


def fast_plans(plans: str) -> str:
    """A catalog of fast credits, a meter priced 1 a unit, and ``plans`` (TOML)."""
    return """
[credit_types.usd]
kind = "fiat"

[credit_types.fast]
kind = "custom"

[meters.gpu]
credit_type = "fast"
price = "1"
""" + plans


ANNUAL = fast_plans("""
[plans.small]
period = "year"
credit_period = "month"
fee = { usd = "120.00" }

[plans.small.credits.fast]
included = "100"
""")


@pytest.mark.parametrize("how", ["reload", "restart"])
def test_a_plans_new_periods_apply_to_its_customers_from_the_end_of_their_billing_period(make, tmp_path, how):
    b = make(ANNUAL)
    a = b.subscribe("c", "small").anchor_ms
    yearly = tmp_path / "yearly.toml"
    yearly.write_text(ANNUAL.replace('credit_period = "month"\n', ""))  # credits once a year from now on
    if how == "reload":
        b.run(b.engine.reload_catalog(load_catalog(str(yearly))))
    else:  # the catalog file changed under a stopped daemon
        b.catalog = load_catalog(str(yearly))
        b.restart(clean=True)
    for k in range(1, 12):  # the year it paid for keeps its monthly credits
        b.now_ms = period_start(a, "month", k)
        b.tick()
        assert b.bal("c", "fast") == 100 * NANO, k
    b.now_ms = period_start(a, "year", 1)
    b.tick()
    sub = b.engine.subscriptions.subs["c"]
    assert (sub.start_ms, sub.end_ms, sub.billing_end_ms) == (period_start(a, "year", 1),) + (
        period_start(a, "year", 2),) * 2  # then one credit period a year, from the same day
    assert (sub.n, sub.billing_n) == (12, 1)
    b.now_ms = period_start(a, "year", 2)
    b.tick()
    assert [e.reference for e in b.audit("c", "fee")] == ["small period 0", "small period 1", "small period 2"]
    assert b.bal("c", "fast") == 100 * NANO
    b.check_conservation("c")


def test_a_cancel_ends_the_periods_usage_so_a_new_subscription_starts_afresh(make):
    b = make("hybrid")  # acme on team: seats (a max gauge, $8 each) charged on the period's value
    b.report("acme", "seats", 7)
    b.advance(DAY_MS)
    b.cancel("acme")
    b.subscribe("acme", "team", start_ms=b.now_ms)
    b.report("acme", "seats", 2)
    b.advance(32 * DAY_MS)
    b.tick()
    assert [(-e.amount_nano, e.reference) for e in b.audit("acme", "gauge_charged")] == [
        (7 * 8 * NANO, "seats=7"), (2 * 8 * NANO, "seats=2")]


def test_included_credits_off_the_credit_types_steps_are_refused_naming_the_value(make):
    b = make("copilot")  # premium has 2 decimals
    with pytest.raises(InvalidInput) as e:
        b.set_term("dev1", "premium", "included", 300 * NANO + 1)
    assert e.value.field == "value" and "premium is granted in steps of 10000000 nano" in str(e.value)


TWO_PLANS = fast_plans("""
[plans.big]
period = "month"
fee = { usd = "50.00" }

[plans.big.credits.fast]
included = "300"

[plans.small]
period = "month"
fee = { usd = "10.00" }

[plans.small.credits.fast]
included = "100"
""")


def test_a_downgrade_to_a_plan_whose_periods_changed_takes_them_at_the_boundary(make, tmp_path):
    b = make(TWO_PLANS)
    a = b.subscribe("c", "big").anchor_ms
    b.change_plan("c", "small")  # a downgrade: at the month's end
    yearly = tmp_path / "yearly.toml"
    yearly.write_text(TWO_PLANS.replace('period = "month"\nfee = { usd = "10.00" }',
                                        'period = "year"\nfee = { usd = "10.00" }'))
    b.run(b.engine.reload_catalog(load_catalog(str(yearly))))
    b.now_ms = period_start(a, "month", 1)
    b.tick()
    sub = b.engine.subscriptions.subs["c"]
    assert (sub.plan, sub.period, sub.cycle) == ("small", "year", "year")
    assert (sub.start_ms, sub.end_ms, sub.billing_end_ms) == (period_start(a, "month", 1),) + (
        period_start(period_start(a, "month", 1), "year", 1),) * 2
    b.run(b.engine.reload_catalog(load_catalog(str(yearly))))  # and the catalog reloads again
    assert [(e.charge_nano, e.reference) for e in b.audit("c", "fee")] == [(50 * NANO, "big period 0"),
                                                                         (10 * NANO, "small period 1")]


YEARLY_ROLLOVER = fast_plans("""
[plans.p]
period = "year"
fee = { usd = "100.00" }

[plans.p.credits.fast]
included = "100"
rollover = { max_percent = 100, max_count = 1, lifetime_periods = 1 }
""")


def test_credits_rolled_over_into_new_periods_live_for_one_of_them(make, tmp_path):
    b = make(YEARLY_ROLLOVER)
    a = b.subscribe("c", "p").anchor_ms
    b.report("c", "gpu", 40)
    monthly = tmp_path / "monthly.toml"
    monthly.write_text(YEARLY_ROLLOVER.replace('period = "year"', 'period = "month"'))
    b.run(b.engine.reload_catalog(load_catalog(str(monthly))))
    b.now_ms = period_start(a, "year", 1)
    b.tick()  # the year's 60 left roll over into the first month, and live for it alone
    (rolled,) = [g for g in b.balance("c").balances[1].grants if g.source == "rollover"]
    assert (rolled.remaining_nano, rolled.expires_at_ms) == (60 * NANO, period_start(a, "month", 13))
    b.now_ms = period_start(a, "month", 13)
    b.tick()
    assert b.bal("c", "fast") == 200 * NANO  # the first month's 100 roll over, the 60 once rolled go, 100 more
    assert [e.amount_nano for e in b.audit("c", "rollover_forfeited")][-1] == -60 * NANO


def test_a_month_end_anchor_keeps_its_day_when_only_the_credit_period_changes(make, tmp_path):
    b = make("cursor")
    jan31 = 1_801_353_600_000  # 2027-01-31T00:00:00Z
    b.now_ms = jan31
    b.subscribe("eve", "pro")
    daily = tmp_path / "daily.toml"
    text = (Path(__file__).resolve().parent.parent / "examples" / "cursor.toml").read_text()
    daily.write_text(text.replace('[plans.pro]\nperiod = "month"\n', '[plans.pro]\nperiod = "month"\n'
                                  'credit_period = "day"\n'))
    b.run(b.engine.reload_catalog(load_catalog(str(daily))))
    b.now_ms = period_start(jan31, "month", 1)  # Feb 28: the clamped month-end
    b.tick()
    sub = b.engine.subscriptions.subs["eve"]
    assert (sub.anchor_ms, sub.cycle, sub.end_ms) == (jan31, "day", period_start(jan31, "month", 1) + DAY_MS)
    assert sub.billing_end_ms == period_start(jan31, "month", 2)  # March 31, not March 28
