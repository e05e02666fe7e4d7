"""The twin contract: both cores take their codes, limits and messages from
meterd.corespec, have the API of meterd.core.CoreAPI, compute the priority hint
alike, and encode into buffers that the catalog's limits fit."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import compiled_core_unavailable
from hypothesis import given, settings
from hypothesis import strategies as st

from meterd import _fastpath_py, catalog, config, core, corespec
from meterd.catalog import parse_catalog
from meterd.errors import ConfigError
from meterd.v1 import meter_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "meterd"
# The compiled core is imported only when this run tests it (see tests/test_core.py).
NO_COMPILED = compiled_core_unavailable()
_fastpath: Any = None if NO_COMPILED else importlib.import_module("meterd._fastpath")
needs_compiled = pytest.mark.skipif(NO_COMPILED is not None, reason=f"checks the compiled core; {NO_COMPILED}")
CORES = {"compiled": _fastpath.Core if _fastpath else None, "python": _fastpath_py.Core}
LIMITS = dict(customer_id_bytes_max=128, client_id_bytes_max=128, batch_events_max=8000, dimensions_max=16,
              dimension_key_bytes_max=64, dimension_value_bytes_max=128, dimension_sets_per_window_max=1000)
INT64_MAX = corespec.INT64_MAX


# ---- one set of values ---------------------------------------------------------------

@needs_compiled
def test_the_compiled_core_was_built_with_corespecs_values():
    compiled = _fastpath._constants()
    fields = compiled.pop("EVENT_FIELDS")
    assert compiled == {name: getattr(corespec, name) for name in compiled}
    assert fields == tuple(range(len(corespec.EVENT_FIELDS)))
    # and corespec.pxd says so for every one (it is what the build read)
    pxd = dict(re.findall(r"^\s+([A-Z_0-9]+) = (\d+)$", (SRC / "corespec.pxd").read_text(), re.M))
    assert {k: int(v) for k, v in pxd.items()} == compiled


@needs_compiled
def test_the_compiled_core_refuses_to_load_against_other_values(monkeypatch):
    _fastpath._check_contract()
    monkeypatch.setattr(corespec, "REASON_OVERFLOW", 7)
    with pytest.raises(RuntimeError, match="REASON_OVERFLOW"):
        _fastpath._check_contract()


def test_codes_are_the_wire_and_the_catalog():
    assert (corespec.REASON_INSUFFICIENT_BALANCE, corespec.REASON_UNKNOWN_CUSTOMER, corespec.REASON_OVERFLOW,
            corespec.REASON_LEDGER_UNAVAILABLE) == (pb.REASON_INSUFFICIENT_BALANCE, pb.REASON_UNKNOWN_CUSTOMER,
                                                    pb.REASON_OVERFLOW, pb.REASON_LEDGER_UNAVAILABLE)
    assert (corespec.DECISION_ALLOW, corespec.DECISION_DENY, corespec.DECISION_DEGRADE) == (
        pb.DECISION_ALLOW, pb.DECISION_DENY, pb.DECISION_DEGRADE)
    assert corespec.OUT_DEGRADED not in pb.Reason.values()
    assert [catalog.AGGREGATIONS.index(a) for a in ("sum", "count", "max", "latest", "unique_count")] == [
        corespec.AGG_SUM, corespec.AGG_COUNT, corespec.AGG_MAX, corespec.AGG_LATEST, corespec.AGG_UNIQUE]
    assert corespec.EVENT_FIELDS[1:] == tuple(f.name for f in sorted(pb.UsageEvent.DESCRIPTOR.fields,
                                                                       key=lambda f: f.number))
    assert corespec.QUANTITY_FIELDS[1:] == tuple(f.name for f in sorted(pb.Quantity.DESCRIPTOR.fields,
                                                                          key=lambda f: f.number))
    assert corespec.BATCH_FIELDS[1:] == tuple(pb.ReportBatchRequest.DESCRIPTOR.fields_by_number[n].name
                                              for n in (1, 2, 3))
    assert core.REASON_INSUFFICIENT_BALANCE == corespec.REASON_INSUFFICIENT_BALANCE


def _literals(path: Path) -> set[str]:
    text = path.read_text()
    if path.suffix == ".py":
        return {n.value for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return {m[1:-1] for m in re.findall(r'"(?:[^"\\\n]|\\.)*"', text)}


def test_neither_core_has_a_copy_of_a_message():
    messages = {v for k, v in vars(corespec).items() if k.startswith("MSG_")}
    sources = [SRC / "_fastpath_py.py", *sorted(SRC.glob("_fastpath*.pyx")), *sorted(SRC.glob("_fastpath*.pxi"))]
    for path in sources:
        assert not messages & _literals(path), path.name


# ---- one API -------------------------------------------------------------------------

API = [name for name, value in vars(core.CoreAPI).items() if callable(value) and not name.startswith("_")]


def _shape(fn) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@needs_compiled
def test_both_cores_have_the_api_with_its_names_and_defaults():
    # mypy (core.py) checks the types; this checks the names and defaults mypy lets differ.
    assert len(API) > 30 and "__len__" in vars(core.CoreAPI)
    for name in API:
        want = _shape(getattr(core.CoreAPI, name))
        assert _shape(getattr(_fastpath_py.Core, name)) == want, name
        assert _shape(getattr(_fastpath.Core, name)) == want, name
    ctor = _shape(core.CoreClass.__call__)
    assert _shape(_fastpath_py.Core.__init__) == ctor
    # The compiled constructor shows no signature: call both with every argument by its name.
    args = dict(denominators=[1], meters=[(b"calls", 0, 0, (), 0, b"", (), 1, 0, 0)], rates=[(0, (), 1, 1, ())],
                limits=LIMITS, capacity=16, plans=[[(1, 0)]], modes=[b"slow"], free=[[0]], credit_names=[b"req"],
                conditions=[(b"size", 0, (10,), (b"small", b"large"))])
    assert list(args) == [name for name, _, _ in ctor[1:]]
    for make in CORES.values():
        assert make(**args).quote(0, 3) == (0, 3)


@needs_compiled
@pytest.mark.spawns  # mypy's stubtest, in a process of its own
def test_the_stub_is_the_built_module(tmp_path):
    allow = tmp_path / "allowlist.txt"
    # what Cython adds to every module, and that meterd never calls
    allow.write_text("meterd._fastpath.__reduce_cython__\nmeterd._fastpath.__setstate_cython__\n"
                     "meterd._fastpath.__test__\n")
    r = subprocess.run([sys.executable, "-m", "mypy.stubtest", "meterd._fastpath", "--allowlist", str(allow)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---- one priority formula --------------------------------------------------------------

@needs_compiled
@settings(max_examples=2000, deadline=None)
@given(st.integers(0, INT64_MAX), st.one_of(st.integers(0, INT64_MAX), st.integers(0, 10**12)))
def test_the_c_priority_is_corespecs(degraded, step):
    assert _fastpath._relax_priority(degraded, step) == corespec.relax_priority(degraded, step)


@needs_compiled
@pytest.mark.parametrize("degraded,step,priority", [
    (0, 0, 100), (10**18, 0, 100), (0, 600, 100), (599, 600, 100), (600, 600, 99), (60_000, 600, 0),
    (INT64_MAX, 1, 0), (INT64_MAX, INT64_MAX, 99), (99, 1, 1), (100, 1, 0)])
def test_the_priority_formula(degraded, step, priority):
    assert corespec.relax_priority(degraded, step) == priority == _fastpath._relax_priority(degraded, step)


# ---- the limits fit the buffers ----------------------------------------------------------

LONG_CT = "c" * corespec.NAME_BYTES_MAX
LONG_MODE = "m" * corespec.MODE_BYTES_MAX


def _catalog(ct: str = LONG_CT, mode: str = LONG_MODE) -> catalog.Catalog:
    return parse_catalog({
        "credit_types": {ct: {"kind": "custom"}},
        "meters": {"calls": {"credit_type": ct, "price": "1"}},
        "plans": {"relax": {"period": "month", "credits": {ct: {"fallback": mode, "priority_step": "1"}}}},
    }, "test")


def test_the_catalogs_limits_are_the_cores():
    _catalog()
    with pytest.raises(ConfigError):
        _catalog(ct=LONG_CT + "c")
    with pytest.raises(ConfigError):
        _catalog(mode=LONG_MODE + "m")
    assert catalog.DENOMINATOR_MAX == corespec.DENOMINATOR_MAX
    config.load_settings({"customer_id_bytes_max": corespec.CUSTOMER_ID_BYTES_LIMIT}, env={})
    with pytest.raises(ConfigError):
        config.load_settings({"customer_id_bytes_max": corespec.CUSTOMER_ID_BYTES_LIMIT + 1}, env={})


@pytest.mark.parametrize("kind", CORES)
def test_the_cores_refuse_what_their_buffers_do_not_fit(kind):
    make = CORES[kind]
    with pytest.raises(ValueError, match=re.escape(corespec.MSG_CREDIT_NAMES)):
        make([1], [], [], LIMITS, credit_names=[b"c" * (corespec.NAME_BYTES_MAX + 1)])
    with pytest.raises(ValueError, match=re.escape(corespec.MSG_MODE_NAMES)):
        make([1], [], [], LIMITS, modes=[b"m" * (corespec.MODE_BYTES_MAX + 1)])
    with pytest.raises(ValueError, match=re.escape(corespec.MSG_ID_LIMIT)):
        make([1], [], [], LIMITS | {"customer_id_bytes_max": corespec.CUSTOMER_ID_BYTES_LIMIT + 1})


def _longest_core(kind: str):
    """A core whose every name is as long as the catalog allows, with an account
    whose balance and costs need the longest varints."""
    cat = _catalog()
    denominators, meters, rates = cat.compile()
    plans, modes = cat.core_plans()
    c = CORES[kind](denominators, meters, rates, LIMITS, 16, plans, modes, cat.core_free(),
                    [LONG_CT.encode()])
    rich = c.open_account(b"r" * LIMITS["customer_id_bytes_max"])
    c.credit(rich, 0, INT64_MAX)
    poor = c.open_account(b"p")
    c.credit(poor, 0, -10**18)  # negative: a 10-byte varint
    c.set_plan(poor, 1)
    return c


@needs_compiled
@pytest.mark.parametrize("kind", CORES)
def test_the_longest_responses_fit(kind):
    c = _longest_core(kind)
    # the largest cost there is, then one the balance no longer covers; three degraded; an unknown customer
    events = [pb.UsageEvent(customer_id="r" * 128, meter="calls", quantity=q) for q in (INT64_MAX // 10**9, 1)]
    events += [pb.UsageEvent(customer_id="p", meter="calls", quantity=10**9)] * 3
    events += [pb.UsageEvent(customer_id="nobody", meter="calls", quantity=1)]
    accepted, denied, degraded, details = c.apply_batch(pb.ReportBatchRequest(events=events, details=True)
                                                        .SerializeToString())
    assert (accepted, denied, degraded) == (4, 2, 3)
    resp = pb.ReportBatchResponse.FromString(details)
    assert [r.credit_type for r in resp.results] == [LONG_CT] * 6
    assert [d.mode for d in resp.degradations] == [LONG_MODE] * 3
    assert resp.results[2].balance_nano == -10**18
    wire = c.report_wire(pb.ReportRequest(event=events[2]).SerializeToString())
    assert wire is not None
    out = pb.ReportResponse.FromString(wire[1])
    assert (out.decision, out.credit_type, out.mode, out.balance_nano) == (
        pb.DECISION_DEGRADE, LONG_CT, LONG_MODE, -10**18)
    assert wire == _longest_core("python" if kind == "compiled" else "compiled").report_wire(
        pb.ReportRequest(event=events[2]).SerializeToString())


@pytest.mark.parametrize("kind", CORES)
def test_a_degraded_priority_is_the_formulas(kind):
    c = _longest_core(kind)
    for n in range(1, 5):
        decision, _, _, _, _, mode, priority = c.report(
            pb.ReportRequest(event=pb.UsageEvent(customer_id="p", meter="calls", quantity=40)).SerializeToString())
        assert (decision, mode) == (pb.DECISION_DEGRADE, LONG_MODE.encode())
        assert priority == corespec.relax_priority(c.state(1)[0][0][4], 10**9) == max(100 - 40 * n, 0)
