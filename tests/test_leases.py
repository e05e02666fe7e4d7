"""Ledger mode: one customer balance in the central ledger, spent by many sidecars
through escrow leases. The ledger's side (meterd.escrow) on SQLite and PostgreSQL,
then sidecars (real engines on real LMDB) sharing one ledger."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from billing import NANO, Billing

from meterd import wire
from meterd.clock import Clock, ManualClock
from meterd.config import load_settings
from meterd.errors import ConfigError, InvalidInput
from meterd.escrow import Escrow, lease_size
from meterd.leases import Leases
from meterd.ledger import Fenced, Ledger, Settlement
from meterd.v1 import meter_pb2 as pb

T0 = 1_800_000_000_000


@pytest.fixture
def escrow(ledger_url: str):
    with Ledger(ledger_url) as lg:
        lg.migrate()
        e = Escrow(lg)
        yield e
        assert e.check() == []  # conservation, after every test


def test_lease_size_is_rate_times_horizon_within_a_fair_share_and_at_least_one_request():
    assert lease_size(need_nano=10, want_nano=1_000, available_nano=10_000, sharers=4) == 1_000
    assert lease_size(10, 100_000, 10_000, 4) == 2_500             # a fair share of what is left
    assert lease_size(10, 1, 10_000, 4) == 10                       # at least one request
    assert lease_size(3_000, 1, 10_000, 4) == 3_000                 # even above a fair share
    assert lease_size(10, 1_005, 10_000, 1) == 1_000                # whole requests: no fragment left at the lease
    assert lease_size(10, 100, 7, 1) == 7                           # less than a request: all there is
    assert lease_size(10, 100, 0, 1) == 0
    assert lease_size(10, 100, -5, 1) == 0


def test_grant_is_idempotent_by_key_and_refuses_a_reused_key(escrow: Escrow):
    g = escrow.grant("c1", "usd", 5_000, 0, 0, "api", "", T0, key="k", digest="a")
    assert (g.grant_id, g.balance_nano, g.duplicate) == ("G1", 5_000, False)
    again = escrow.grant("c1", "usd", 5_000, 0, 0, "api", "", T0, key="k", digest="a")
    assert (again.grant_id, again.balance_nano, again.duplicate) == ("G1", 5_000, True)
    with pytest.raises(InvalidInput, match="idempotency_key"):
        escrow.grant("c1", "usd", 6_000, 0, 0, "api", "", T0, key="k", digest="b")
    assert escrow.balance("c1", T0)[0]["granted_nano"] == 5_000
    entries = [(e.kind, e.amount_nano, e.balance_before_nano, e.balance_after_nano)
               for e in escrow.ledger.entries("c1")]
    assert entries == [("grant", 5_000, 0, 5_000)]


def test_leases_draw_in_burn_down_order_and_consumption_comes_off_the_front(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 5, "api", "", T0)              # last: lower priority
    escrow.grant("c1", "usd", 1_000, T0 + 60_000, 0, "promo", "", T0)  # first: expires soonest
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)              # second: never expires
    g = escrow.acquire("s1", "i1", "c1", "usd", 100, 1_500, 1, T0)
    assert (g.granted_nano, g.amount_nano, g.expires_at_ms, g.available_nano) == (1_500, 1_500, T0 + 60_000, 1_500)
    buckets = {b["grant_id"]: (b["remaining"], b["leased"]) for b in escrow.balance("c1", T0)[0]["buckets"]}
    assert buckets == {"G2": (0, 1_000), "G3": (500, 500), "G1": (1_000, 0)}
    with escrow.ledger._transaction():
        escrow.settle("s1", "i1", [Settlement("c1", "usd", 1_200)], T0 + 1)
    # A settlement sent again (a resent flush) changes nothing: the figure is a running total.
    with escrow.ledger._transaction():
        escrow.settle("s1", "i1", [Settlement("c1", "usd", 1_200)], T0 + 2)
    assert escrow.give_back("s1", "i1", "c1", "usd", 300, T0 + 3) == 300
    assert escrow.give_back("s1", "i1", "c1", "usd", 300, T0 + 4) == 0  # a repeat
    b = escrow.balance("c1", T0)[0]
    assert {x["grant_id"]: (x["remaining"], x["leased"], x["consumed"]) for x in b["buckets"]} == {
        "G3": (800, 0, 200), "G1": (1_000, 0, 0)}
    assert (b["available_nano"], b["leased_nano"], b["consumed_nano"]) == (1_800, 0, 1_200)


def test_expiry_is_central_and_a_leased_part_expires_as_it_comes_back(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, T0 + 10, 0, "promo", "", T0)
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.acquire("s1", "i1", "c1", "usd", 500, 500, 1, T0)     # 500 of the promo
    g = escrow.acquire("s2", "i2", "c1", "usd", 100, 100, 1, T0 + 20)  # the promo's other 500 expire first
    assert g.granted_nano == 100
    b = escrow.balance("c1", T0 + 20)[0]
    assert (b["expired_nano"], b["available_nano"]) == (500, 900)
    escrow.give_back("s1", "i1", "c1", "usd", 500, T0 + 30)          # past its expiry: expired, not available
    b = escrow.balance("c1", T0 + 30)[0]
    assert (b["expired_nano"], b["available_nano"], b["leased_nano"]) == (1_000, 900, 100)
    assert [(e.kind, e.amount_nano) for e in escrow.ledger.entries("c1")][-1] == ("expired", -500)


def test_a_short_lease_recalls_the_others(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.heartbeat("s1", "i1", T0, False, 1_000)
    escrow.acquire("s1", "i1", "c1", "usd", 100, 900, 1, T0)
    g = escrow.acquire("s2", "i2", "c1", "usd", 300, 300, 2, T0)
    assert (g.granted_nano, g.elsewhere_nano, g.recalled) == (100, 900, 1)
    assert escrow.heartbeat("s1", "i1", T0 + 1, False, 1_000).recalls == [("c1", "usd")]
    escrow.give_back("s1", "i1", "c1", "usd", 900, T0 + 2)
    assert escrow.heartbeat("s1", "i1", T0 + 3, False, 1_000).recalls == []  # answered
    g = escrow.acquire("s2", "i2", "c1", "usd", 200, 200, 2, T0 + 4)
    assert (g.granted_nano, g.amount_nano) == (200, 300)


def test_a_new_incarnation_takes_over_and_the_old_one_is_fenced(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.acquire("s1", "old", "c1", "usd", 400, 400, 1, T0)
    escrow.heartbeat("s1", "new", T0 + 1, False, 1_000)  # a replaced pod with a new data directory
    assert escrow.balance("c1", T0)[0]["available_nano"] == 1_000  # the old lease came back
    with pytest.raises(Fenced, match="replaced"):
        escrow.acquire("s1", "old", "c1", "usd", 1, 1, 1, T0 + 2)
    with pytest.raises(Fenced):
        escrow.ledger.apply_flush(_flush("s1", "old", 1, [Settlement("c1", "usd", 400)]))
    assert escrow.acquire("s1", "new", "c1", "usd", 100, 100, 1, T0 + 3).granted_nano == 100


def test_release_sidecar_fences_it_for_good_and_gives_its_remainder_back(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.acquire("s1", "i1", "c1", "usd", 600, 600, 1, T0)
    assert escrow.release_sidecar("s1", T0 + 1) == [("c1", "usd", 600)]
    for inc in ("i1", "another"):
        with pytest.raises(Fenced, match="released"):
            escrow.heartbeat("s1", inc, T0 + 2, False, 1_000)
    assert escrow.balance("c1", T0)[0]["available_nano"] == 1_000


def test_consumption_beyond_a_lease_is_a_debt_repaid_from_available_then_by_the_next_grant(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.set_allowance("c1", "usd", 2_000, T0)
    escrow.acquire("s1", "i1", "c1", "usd", 100, 100, 1, T0)
    with escrow.ledger._transaction():
        escrow.settle("s1", "i1", [Settlement("c1", "usd", 1_300)], T0 + 1)  # spent beyond it, as in an outage
    b = escrow.balance("c1", T0)[0]
    assert (b["available_nano"], b["leased_nano"], b["consumed_nano"], b["overdrawn_nano"], b["lease_debts_nano"]) \
        == (0, -300, 1_300, 300, 300)  # what was available repaid most of the debt at once
    lease, = escrow.leases_of("s1")
    assert (lease.amount_nano, lease.leased_total_nano) == (-300, 1_000)  # the sidecar takes 900 in, by total
    escrow.grant("c1", "usd", 500, 0, 0, "api", "", T0 + 2)  # repays the lease's debt first
    b = escrow.balance("c1", T0)[0]
    assert (b["available_nano"], b["overdrawn_nano"], b["lease_debts_nano"], b["balance_nano"]) == (200, 0, 0, 200)
    g = escrow.acquire("s1", "i1", "c1", "usd", 100, 100, 1, T0 + 3)  # sized by its history: all 200 left
    assert (g.leased_total_nano, g.amount_nano, g.allowance_nano) == (1_500, 200, 2_000)


def test_the_debt_of_a_released_sidecar_is_overdrawn_and_repaid_by_the_next_grant(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.acquire("s1", "i1", "c1", "usd", 1_000, 1_000, 1, T0)
    with escrow.ledger._transaction():
        escrow.settle("s1", "i1", [Settlement("c1", "usd", 1_250)], T0 + 1)
    assert escrow.release_sidecar("s1", T0 + 2) == [("c1", "usd", -250)]
    b = escrow.balance("c1", T0)[0]
    assert (b["available_nano"], b["leased_nano"], b["overdrawn_nano"], b["lease_debts_nano"]) == (-250, 0, 250, 0)
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0 + 3)
    assert escrow.balance("c1", T0)[0]["available_nano"] == 750


@pytest.mark.parametrize("released", [False, True])
def test_what_is_owed_is_paid_from_credit_given_back_before_that_credit_can_expire(escrow: Escrow, released: bool):
    escrow.set_allowance("c1", "usd", 500, T0)
    escrow.grant("c1", "usd", 2_000, T0 + 100, 0, "promo", "", T0)   # expires at T0 + 100
    escrow.acquire("s1", "i1", "c1", "usd", 1_000, 1_000, 2, T0)
    escrow.acquire("s2", "i2", "c1", "usd", 1_000, 1_000, 2, T0)
    with escrow.ledger._transaction():  # s1 spent 250 beyond its lease (an outage)
        escrow.settle("s1", "i1", [Settlement("c1", "usd", 1_250)], T0 + 1)
    assert escrow.give_back("s2", "i2", "c1", "usd", 1_000, T0 + 2) == 1_000  # pays s1's debt first
    if released:
        escrow.release_sidecar("s1", T0 + 3)
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0 + 300)  # after the promo expired
    b = escrow.balance("c1", T0 + 300)[0]
    assert (b["consumed_nano"], b["expired_nano"], b["balance_nano"], b["overdrawn_nano"]) == (1_250, 750, 1_000, 0)


def test_a_debit_takes_only_what_is_available_centrally(escrow: Escrow):
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.acquire("s1", "i1", "c1", "usd", 800, 800, 1, T0)
    with pytest.raises(InvalidInput, match="800 is leased"):
        escrow.adjust("c1", "usd", -300, "refund", T0)
    assert escrow.adjust("c1", "usd", -200, "goodwill reversed", T0).balance_nano == 800


def _flush(sidecar_id: str, incarnation: str, seq: int, settlements: list[Settlement]):
    from meterd.ledger import Flush
    return Flush(sidecar_id, seq, incarnation=incarnation, first=seq == 1, settlements=settlements)


def test_settings_refuse_ledger_mode_without_a_shared_ledger():
    with pytest.raises(ConfigError, match="balances: ledger mode"):
        load_settings({"balances": "ledger"}, env={})
    with pytest.raises(ConfigError, match="balances: 'remote'"):
        load_settings({"balances": "remote"}, env={})
    assert load_settings({}, env={"METERD_BALANCES": "ledger", "METERD_LEDGER": "sqlite:////tmp/x.db"}).balances \
        == "ledger"


def test_settings_name_a_clock_skew_limit_out_of_range():
    for bad in ("-1", "600001"):
        with pytest.raises(ConfigError, match=r"lease_clock_skew_max_ms.*must be 0 \(not checked\) to 600000"):
            load_settings({}, env={"METERD_LEASE_CLOCK_SKEW_MAX_MS": bad})
    with pytest.raises(ConfigError, match="lease_clock_skew_max_ms"):
        load_settings({}, env={"METERD_LEASE_CLOCK_SKEW_MAX_MS": "two seconds"})
    assert load_settings({}, env={"METERD_LEASE_CLOCK_SKEW_MAX_MS": "0"}).lease_clock_skew_max_ms == 0


# ---- sidecars on one ledger -----------------------------------------------------------------------

COST = 2_500_000  # 1,000 gpt-4o input tokens at $2.50 per 1M, in nano-USD
CATALOG = """
[credit_types.usd]
kind = "fiat"
currency = "USD"
decimals = 2

[meters.input_tokens]
credit_type = "usd"
per = 1000000
price_dimension = "model"
prices = { "gpt-4o" = "2.50" }

[meters.output_tokens]
credit_type = "usd"
per = 1000000
price_dimension = "model"
prices = { "gpt-4o" = "10.00" }

[plans.pro]
period = "month"
fee = { usd = "20.00" }
"""


class Sidecars:
    """N engines in ledger mode on one ledger, one event loop and one clock, each with its heartbeat running."""

    def __init__(self, tmp: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch, n: int, core: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.clock = ManualClock(T0)
        if "postgresql" in ledger_url:
            with Ledger(ledger_url) as lg:
                lg.migrate()
        catalog = tmp / "catalog.toml"
        catalog.write_text(CATALOG)
        self.nodes = [Billing(tmp / f"s{i}", str(catalog), monkeypatch, core=core, ledger=ledger_url,
                              sidecar_id=f"s{i}", balances="ledger", loop=self.loop, clock=self.clock)
                      for i in range(n)]
        self.stops = [asyncio.Event() for _ in self.nodes]
        self.beats = [self.loop.create_task(node.engine.leases.run(stop))
                      for node, stop in zip(self.nodes, self.stops, strict=True)]
        self.ledger_url = ledger_url

    def kill(self, i: int) -> None:
        """Sidecar i as after kill -9, then started again on its data (and its heartbeat with it)."""
        self.stops[i].set()
        self.loop.run_until_complete(self.beats[i])
        self.nodes[i].restart(clean=False)
        self.stops[i] = asyncio.Event()
        self.beats[i] = self.loop.create_task(self.nodes[i].engine.leases.run(self.stops[i]))

    def close(self) -> None:
        for stop in self.stops:
            stop.set()
        self.loop.run_until_complete(asyncio.gather(*self.beats))
        for node in self.nodes:
            node.close()
        self.loop.close()

    def escrow_check(self) -> tuple[list[str], dict]:
        with Ledger(self.ledger_url) as lg:
            e = Escrow(lg)
            return e.check(), e.balance("acme", T0)[0]


@pytest.fixture(params=["compiled", "python"])
def sidecars(request, tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch):
    made: list[Sidecars] = []

    def make(n: int = 4) -> Sidecars:
        s = Sidecars(tmp_path, ledger_url, monkeypatch, n, request.param)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def _event(customer: str = "acme") -> pb.UsageEvent:
    return pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=1_000, dimensions={"model": "gpt-4o"})


def test_four_sidecars_allow_exactly_what_the_balance_covers(sidecars):
    s = sidecars(4)
    k = 37
    granted = s.nodes[0].grant("acme", "usd", k * COST)
    assert granted.balance_nano == k * COST
    allowed = denied = i = 0
    while denied < 8:  # the unary, batch and reservation paths, round robin over the sidecars
        i += 1
        assert i < 3 * k, "the balance ran out too early, or never"
        node = s.nodes[i % 4]
        if i % 3 == 0:
            ok = node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
        elif i % 3 == 1:
            ok = node.batch([_event()]).accepted == 1
        else:
            a = node.authorize("acme", "input_tokens", 1_000, model="gpt-4o")
            ok = a.decision == pb.DECISION_ALLOW
            if ok:
                assert node.commit(a.reservation_id, 1_000).cost_nano == COST
        allowed += ok
        denied += not ok
        assert denied == 0 or allowed == k, ("denied while credit was left",
                                             [dict(n.engine.leases.counts) for n in s.nodes], s.escrow_check())
    assert allowed == k  # no overspend, and no credit stranded at a sidecar
    for node in s.nodes:
        node.flush()
    problems, b = s.escrow_check()
    assert problems == []
    assert (b["consumed_nano"], b["available_nano"] + b["leased_nano"]) == (k * COST, 0)


def test_four_sidecars_allow_exactly_the_calls_the_balance_covers_each_as_a_whole(sidecars):
    s = sidecars(4)
    call = {"input_tokens": 1_000, "output_tokens": 100}  # $0.0025 + $0.001: one request, one decision
    cost = COST + 1_000_000
    k = 23
    s.nodes[0].grant("acme", "usd", k * cost + cost // 2)  # half a call more: never half served
    allowed = denied = i = 0
    while denied < 8:
        i += 1
        assert i < 3 * k, "the balance ran out too early, or never"
        node = s.nodes[i % 4]
        if i % 3 == 0:
            ok = node.report_parts("acme", call, model="gpt-4o").decision == pb.DECISION_ALLOW
        elif i % 3 == 1:
            event = pb.UsageEvent(customer_id="acme", dimensions={"model": "gpt-4o"})
            event.quantities.add(meter="input_tokens", quantity=1_000)
            event.quantities.add(meter="output_tokens", quantity=100)
            ok = node.batch([event]).accepted == 1
        else:
            a = node.authorize_parts("acme", {"input_tokens": 1_000, "output_tokens": 100}, model="gpt-4o")
            ok = a.decision == pb.DECISION_ALLOW
            if ok:
                assert a.reserved_nano == cost
                assert node.commit_parts(a.reservation_id, call).cost_nano == cost
        allowed += ok
        denied += not ok
        assert denied == 0 or allowed == k, ("denied while credit was left", s.escrow_check())
    assert allowed == k
    for node in s.nodes:
        node.flush()
    problems, b = s.escrow_check()
    assert problems == []
    assert (b["consumed_nano"], b["available_nano"] + b["leased_nano"]) == (k * cost, cost // 2)


def test_a_batch_with_several_events_gets_a_second_chance_for_its_denials(sidecars):
    s = sidecars(2)
    s.nodes[0].grant("acme", "usd", 10 * COST)
    r = s.nodes[1].batch([_event() for _ in range(12)])
    assert (r.accepted, r.denied) == (10, 2)
    assert sorted(d.index for d in r.denials) == [10, 11]
    s.nodes[1].flush()
    problems, b = s.escrow_check()
    assert problems == [] and b["consumed_nano"] == 10 * COST


def test_a_lease_survives_a_kill_and_what_was_spent_is_settled_once(sidecars):
    s = sidecars(2)
    s.nodes[0].grant("acme", "usd", 20 * COST)
    for _ in range(5):
        assert s.nodes[0].report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    s.kill(0)  # the lease and the spend are in its LMDB
    for _ in range(15):
        assert s.nodes[1].report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    assert s.nodes[1].report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_DENY
    for node in s.nodes:
        node.flush()
    problems, b = s.escrow_check()
    assert problems == [] and b["consumed_nano"] == 20 * COST


def test_a_customers_own_terms_are_refused_in_ledger_mode(sidecars):
    s = sidecars(1)
    from meterd.errors import Conflict
    with pytest.raises(Conflict, match="local mode only"):  # an overdraft of the customer's own
        s.nodes[0].set_overdraft("acme", "usd", 10**9)
    with pytest.raises(Conflict, match="discount is local mode only"):  # and any other term of its own
        s.nodes[0].set_term("acme", "usd", "discount", 1000)


@pytest.mark.spawns
def test_the_cli_grants_adjusts_reads_checks_and_releases_in_the_ledger_with_no_sidecar(tmp_path: Path):
    import subprocess
    import sys

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    url = f"sqlite:///{tmp_path}/ledger.db"

    def meterd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "meterd", *args, "--ledger", url, "--catalog", str(catalog)],
                              capture_output=True, text=True, timeout=60)

    assert meterd("ledger", "migrate").returncode == 0
    grant = ["grant", "--customer", "acme", "--credit-type", "usd", "--amount", "10.00", "--idempotency-key", "k1"]
    assert "granted G1 in the ledger: balance 10" in meterd(*grant).stdout
    assert "(duplicate)" in meterd(*grant).stdout
    r = meterd("adjust", "--customer", "acme", "--credit-type", "usd", "--amount", "-20", "--reason", "x")
    assert r.returncode == 2 and "--amount:" in r.stderr and "available centrally" in r.stderr
    assert "balance 8.5" in meterd("adjust", "--customer", "acme", "--credit-type", "usd", "--amount", "-1.50",
                                   "--reason", "goodwill reversed").stdout
    r = meterd("balance", "--customer", "acme")
    assert "balance                  8.5  available 8.5  leased 0" in r.stdout
    r = meterd("ledger", "check")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok")
    r = meterd("ledger", "release-sidecar", "nope")
    assert r.returncode == 1 and "no sidecar 'nope'" in r.stderr and "Traceback" not in r.stderr
    with Ledger(url) as lg:
        e = Escrow(lg)
        e.acquire("s1", "i1", "acme", "usd", 1, 10**9, 1, T0)
    r = meterd("ledger", "release-sidecar", "s1")
    assert r.returncode == 0 and "acme" in r.stdout and "fenced for good" in r.stdout
    r = meterd("grant", "--customer", "acme", "--credit-type", "eur", "--amount", "1")
    assert r.returncode == 2 and "'eur' is not a credit type" in r.stderr
    r = meterd("balance", "--customer", "nobody")
    assert r.returncode == 2 and "'nobody' has no balance in the ledger" in r.stderr
    r = meterd("ledger", "allowance", "--customer", "acme", "--credit-type", "usd", "--amount", "2.00")
    assert r.returncode == 0 and "outage allowance of acme in usd: 2 per sidecar (was 0)" in r.stdout
    assert "outage allowance 2 per sidecar; overdrawn 0" in meterd("balance", "--customer", "acme").stdout
    for bad, says in ((["--credit-type", "eur", "--amount", "1"], "'eur' is not a credit type"),
                      (["--credit-type", "usd", "--amount", "-1"], "--amount:"),
                      (["--credit-type", "usd", "--amount", "\u0663"], "is not a decimal")):
        r = meterd("ledger", "allowance", "--customer", "acme", *bad)
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    # The README's `meterd serve --balances ledger`: check-config checks what serve would refuse.
    assert meterd("check-config", "--balances", "ledger").returncode == 0
    plan = tmp_path / "with-plan.toml"
    plan.write_text(CATALOG + '[customers.acme]\nplan = "pro"\n')
    check = [sys.executable, "-m", "meterd", "check-config", "--balances", "ledger", "--ledger", url, "--catalog",
             str(plan)]
    assert subprocess.run(check, capture_output=True, text=True, timeout=60).returncode == 0
    plan.write_text(CATALOG + 'free = { input_tokens = "1000" }\n[customers.acme]\nplan = "pro"\n')
    assert subprocess.run(check, capture_output=True, text=True, timeout=60).returncode == 0  # a pool of them
    plan.write_text(CATALOG + '[customers.acme]\nplan = "pro"\noverdraft = { usd = "5" }\n')
    r = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "customers.acme.overdraft: an overdraft is served in local mode only" in r.stderr \
        and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "meterd", "check-config", "--balances", "ledger"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "METERD_LEDGER": ""})
    assert r.returncode == 2 and "balances: ledger mode shares balances" in r.stderr


def test_balance_status_and_metrics_say_what_a_lease_holds(sidecars):
    from meterd import wire
    from meterd.metrics import LedgerCollector

    s = sidecars(2)
    s.nodes[0].grant("acme", "usd", 100 * COST)
    for _ in range(3):
        assert s.nodes[1].report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    b = s.nodes[1].balance("acme").balances[0]
    status = wire.ledger_status(s.nodes[1].engine)
    leased = status.leases[0].leased_nano
    # The first lease: room for lease_requests_min requests, within a fair share of the 100 left
    # (of the one or two sidecars counted so far).
    assert leased in (100 * COST, 50 * COST)
    lease = b.lease_nano
    assert b.ledger and lease == leased - 3 * COST
    assert b.central_available_nano == 100 * COST - leased and b.ledger_seen_ms == T0
    assert b.balance_nano == lease + 100 * COST - leased == b.available_nano
    assert status.leases_held == 1 and status.leases_reachable
    assert [(x.customer_id, x.credit_type, x.balance_nano) for x in status.leases] == [("acme", "usd", lease)]
    families = {f.name: f for f in LedgerCollector(s.nodes[1].engine).collect()}
    assert families["meterd_leases_held"].samples[0].value == 1
    assert families["meterd_lease_acquisitions"].samples[0].value == 1
    assert families["meterd_lease_leased_nano"].samples[0].value == leased
    waits = {x.labels.get("le"): x.value for x in families["meterd_lease_sync_wait_seconds"].samples
             if x.name.endswith("_bucket")}
    assert waits["+Inf"] == 1
    with pytest.raises(Exception, match="no lease at this sidecar"):
        s.nodes[0].balance("acme")


# ---- what an independent review found, each kept as a test ----------------------------------------

def _one(tmp: Path, url: str, monkeypatch: pytest.MonkeyPatch, name: str = "s0", catalog: str = CATALOG,
         clock: ManualClock | None = None, loop: asyncio.AbstractEventLoop | None = None,
         sidecar_id: str = "s0", **settings) -> Billing:
    cat = tmp / f"{name}.toml"
    cat.write_text(catalog)
    with Ledger(url) as lg:
        lg.migrate()
    return Billing(tmp / name, str(cat), monkeypatch, core="python", ledger=url, sidecar_id=sidecar_id,
                   balances="ledger", clock=clock or ManualClock(T0), loop=loop,
                   **{"lease_requests_min": 10, **settings})


def _consumed(node: Billing, url: str, customer: str = "acme") -> int:
    node.flush()
    with Ledger(url) as lg:
        e = Escrow(lg)
        assert e.check() == []
        return sum(b["consumed_nano"] for b in e.balance(customer, T0))


def test_a_keyed_call_retried_while_it_waits_for_its_lease_is_applied_once(tmp_path: Path, ledger_url: str,
                                                                           monkeypatch: pytest.MonkeyPatch):
    from meterd import wire
    node = _one(tmp_path, ledger_url, monkeypatch)
    node.grant("acme", "usd", 10 * COST)
    event = pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=1_000, dimensions={"model": "gpt-4o"},
                          idempotency_key="k-1")
    data = pb.ReportRequest(event=event).SerializeToString()

    async def twice(call):
        return await asyncio.gather(call(), call())
    answers = [pb.ReportResponse.FromString(a) for a in node.run(twice(lambda: node.engine.report(data)))]
    assert sorted(a.duplicate for a in answers) == [False, True]
    req = pb.AuthorizeRequest(customer_id="acme", meter="input_tokens", quantity=1_000,
                              dimensions={"model": "gpt-4o"}, idempotency_key="a-1")
    node.grant("other", "usd", 10 * COST)  # a customer whose first Authorize waits for a lease
    req.customer_id = "other"
    held = [pb.AuthorizeResponse.FromString(a)
            for a in node.run(twice(lambda: wire.authorize(node.engine, req)))]
    assert len({a.reservation_id for a in held}) == 1
    assert _consumed(node, ledger_url) == COST


def test_a_second_chance_never_overwrites_a_later_batch_of_its_client(tmp_path: Path, ledger_url: str,
                                                                      monkeypatch: pytest.MonkeyPatch):
    node = _one(tmp_path, ledger_url, monkeypatch)
    node.grant("acme", "usd", 100 * COST)
    node.grant("beta", "usd", 100 * COST)
    assert node.report("beta", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW

    def batch(seq: int, customer: str) -> bytes:
        ev = pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=1_000, dimensions={"model": "gpt-4o"})
        return pb.ReportBatchRequest(client_id="app-1", sequence=seq, events=[ev]).SerializeToString()

    waiting = asyncio.Event()
    real_cover = Leases.cover

    async def cover(self, *args):
        waiting.set()
        return await real_cover(self, *args)
    monkeypatch.setattr(Leases, "cover", cover)

    async def concurrently():
        first = asyncio.ensure_future(node.engine.report_batch(batch(1, "acme")))
        await asyncio.wait_for(waiting.wait(), 30)  # it waits for a lease
        second = await node.engine.report_batch(batch(2, "beta"))  # answered meanwhile
        return await first, second
    node.run(concurrently())
    node.restart(clean=True)
    again = pb.ReportBatchResponse.FromString(node.run(node.engine.report_batch(batch(2, "beta"))))
    assert again.duplicate
    assert _consumed(node, ledger_url, "beta") == 2 * COST


def test_a_lease_whose_answer_was_lost_is_taken_in_at_the_next_heartbeat(tmp_path: Path, ledger_url: str,
                                                                         monkeypatch: pytest.MonkeyPatch):
    real = Escrow.acquire_many
    lose = {"next": True}

    def acquire_many(self, *args, **kw):
        out = real(self, *args, **kw)  # committed in the ledger ...
        if lose["next"]:
            lose["next"] = False
            raise TimeoutError("the answer was lost")  # ... and its answer never arrives
        return out
    monkeypatch.setattr(Escrow, "acquire_many", acquire_many)
    node = _one(tmp_path, ledger_url, monkeypatch)
    node.grant("acme", "usd", 10 * COST)
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_DENY  # fails closed
    node.restart(clean=False)  # and the sidecar is killed before its next heartbeat
    node.run(node.engine.leases.beat())  # looks the lease up, and takes it in
    allowed = sum(node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                  for _ in range(12))
    assert allowed == 10
    node.run(node.engine.leases.return_all())
    assert _consumed(node, ledger_url) == 10 * COST


def test_a_fenced_sidecar_stops_spending_its_leases(tmp_path: Path, ledger_url: str,
                                                    monkeypatch: pytest.MonkeyPatch):
    old = _one(tmp_path, ledger_url, monkeypatch, "old")
    other = _one(tmp_path, ledger_url, monkeypatch, "other", clock=old.clock, loop=old.loop, sidecar_id="s1")
    old.grant("acme", "usd", 10 * COST)
    assert old.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    with Ledger(ledger_url) as lg:
        Escrow(lg).release_sidecar("s0", T0 + 1)  # the operator took it for dead, and gave its lease back
    with pytest.raises(Fenced):
        old.run(old.engine.leases.beat())
    assert [old.report("acme", "input_tokens", 1_000, model="gpt-4o").decision for _ in range(3)] == \
        [pb.DECISION_DENY] * 3
    # What it spent and never settled was given back with the rest (in the customer's favour: README).
    assert sum(other.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
               for _ in range(12)) == 10
    other.close()


def test_a_flush_that_takes_an_id_over_fences_the_data_directory_it_replaces(escrow: Escrow):
    from meterd.ledger import Flush
    escrow.grant("c1", "usd", 1_000, 0, 0, "api", "", T0)
    escrow.acquire("s1", "old", "c1", "usd", 400, 400, 1, T0)
    assert escrow.ledger.apply_flush(Flush("s1", 1, incarnation="old", first=True))
    assert escrow.ledger.apply_flush(Flush("s1", 2, incarnation="new", first=True),
                                     lambda lg: Escrow(lg).settle_flush("s1", "new", [], T0 + 1))
    assert escrow.balance("c1", T0)[0]["available_nano"] == 1_000  # the old lease came back
    with pytest.raises(Fenced):
        escrow.heartbeat("s1", "old", T0 + 2, False, 1_000)
    escrow.heartbeat("s1", "new", T0 + 3, False, 1_000)


def test_a_catalog_reload_that_renumbers_credit_types_keeps_the_leases(tmp_path: Path, ledger_url: str,
                                                                       monkeypatch: pytest.MonkeyPatch):
    from meterd.catalog import load_catalog
    node = _one(tmp_path, ledger_url, monkeypatch)
    node.grant("acme", "usd", 10 * COST)
    allowed = node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    renumbered = tmp_path / "renumbered.toml"
    renumbered.write_text('[credit_types.credits]\nkind = "custom"\n' + CATALOG)
    node.run(node.engine.reload_catalog(load_catalog(str(renumbered))))
    allowed += sum(node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                   for _ in range(30))
    assert allowed == 10
    assert _consumed(node, ledger_url) == 10 * COST


def test_a_grant_past_64_bits_is_refused_as_invalid(escrow: Escrow):
    escrow.grant("c1", "usd", (1 << 62), 0, 0, "api", "", T0)
    with pytest.raises(InvalidInput, match="64 bits"):
        escrow.grant("c1", "usd", (1 << 62), 0, 0, "api", "", T0)


SECONDS_CATALOG = CATALOG + """
[meters.gpu_seconds]
credit_type = "usd"
precision = 3
price_dimension = "hardware"
prices = { "nvidia-h100" = "0.001525" }
"""


def test_a_duration_session_holds_and_bills_from_leases(tmp_path: Path, ledger_url: str,
                                                        monkeypatch: pytest.MonkeyPatch):
    """Per-second metering: each heartbeat bills the time so far and holds the next interval, topping
    up the lease when it cannot (the first one takes the lease)."""
    node = _one(tmp_path, ledger_url, monkeypatch, catalog=SECONDS_CATALOG)
    node.grant("lab", "usd", 1 * 10**9)  # $1.00: 655.7 s of an H100 at $0.001525 a second
    started = node.start_session("lab", "gpu_seconds", timeout_ms=30_000, hardware="nvidia-h100")
    assert started.decision == pb.DECISION_ALLOW
    for _ in range(10):
        node.advance(20_000)
        assert node.heartbeat(started.session_id).decision == pb.DECISION_ALLOW
    node.advance(5_500)
    ended = node.end_session(started.session_id)
    assert ended.closed and ended.decision == pb.DECISION_ALLOW
    assert ended.cost_nano == 205_500 * 1_525  # 205.5 s, exactly
    node.run(node.engine.leases.return_all())
    assert _consumed(node, ledger_url, "lab") == 205_500 * 1_525


# ---- an outage allowance ------------------------------------------------------------------------

class Outage:
    """The ledger cannot be reached from a sidecar: every call to it fails as a refused connection would."""

    def __init__(self, node: Billing) -> None:
        self.node = node
        self.on = False
        self.wrap()

    def wrap(self) -> None:  # again after a restart: a new engine has new links
        for link in (self.node.engine.leases.link, self.node.engine.flusher.link):
            real = link.call

            async def call(fn, *args, _real=real):
                if self.on:
                    raise ConnectionRefusedError("the ledger is away")
                return await _real(fn, *args)
            link.call = call


def test_an_outage_allowance_bounds_what_a_sidecar_spends_beyond_its_lease_and_is_repaid(
        tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch):
    from meterd import wire
    from meterd.metrics import LedgerCollector

    node = _one(tmp_path, ledger_url, monkeypatch)
    with Ledger(ledger_url) as lg:
        Escrow(lg).set_allowance("acme", "usd", 2 * COST, T0)
    node.grant("acme", "usd", 10 * COST)
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW  # leases all 10
    outage = Outage(node)
    outage.on = True
    # A hold borrowed and released gives its credit back to the borrowed, not to the ledger.
    hold = node.authorize("acme", "input_tokens", 10_000, model="gpt-4o")  # 10 requests: 9 leased, 1 borrowed
    assert hold.decision == pb.DECISION_ALLOW
    node.release(hold.reservation_id)
    decisions = [node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision for _ in range(13)]
    assert decisions == [pb.DECISION_ALLOW] * 11 + [pb.DECISION_DENY] * 2  # 9 of the lease, 2 borrowed
    row, = wire.ledger_status(node.engine).leases
    assert (row.borrowed_nano, row.outage_allowance_nano, row.balance_nano) == (2 * COST, 2 * COST, 0)
    node.restart(clean=False)  # killed meanwhile: what was borrowed is durable, so the room is not had twice
    outage.wrap()
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_DENY
    families = {f.name: f for f in LedgerCollector(node.engine).collect()}
    assert families["meterd_lease_borrowed_nano"].samples[0].value == 0  # counters start again with the process
    outage.on = False
    node.flush()
    with Ledger(ledger_url) as lg:
        e = Escrow(lg)
        assert e.check() == []
        b = e.balance("acme", T0)[0]
        assert (b["consumed_nano"], b["overdrawn_nano"], b["lease_debts_nano"], b["balance_nano"]) == \
            (12 * COST, 2 * COST, 2 * COST, -2 * COST)  # exactly the allowance, beyond the balance
        e.grant("acme", "usd", 5 * COST, 0, 0, "api", "", T0)  # repays the debt first
        assert e.balance("acme", T0)[0]["available_nano"] == 3 * COST
    node.run(node.engine.leases.beat())  # asks the ledger, and takes its repayment in: nothing borrowed any more
    node.run(node.engine.leases.quiet())
    row, = wire.ledger_status(node.engine).leases
    assert (row.borrowed_nano, row.balance_nano) == (0, 0)
    allowed = sum(node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                  for _ in range(5))
    assert allowed == 3
    node.run(node.engine.leases.return_all())
    assert _consumed(node, ledger_url) == 15 * COST  # all that was granted, and not a nano more


# ---- leases forgotten once settled ----------------------------------------------------------------

def test_an_idle_settled_lease_is_forgotten_and_taken_up_again_from_the_ledgers_totals(
        tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch):
    node = _one(tmp_path, ledger_url, monkeypatch, lease_idle_s=5.0)
    leases = node.engine.leases
    node.grant("acme", "usd", 25 * COST)
    for _ in range(3):
        assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW

    def beat(ms: int) -> None:
        node.advance(ms)
        node.run(leases.beat())
        node.run(leases.quiet())
    beat(6_000)  # idle: what it has free goes back
    assert list(node.engine.store.items("leases")) != []
    beat(0)      # not yet settled (no flush since): kept
    assert ("acme", 0) in leases.held
    node.flush()
    beat(6_000)  # settled, given back, idle again: forgotten, here and in LMDB
    node.run(node.engine.journal.barrier())
    assert leases.held == {} and list(node.engine.store.items("leases")) == []
    assert leases.counts["forgotten"] == 1
    node.restart(clean=False)  # nothing of it is loaded again
    assert node.engine.leases.held == {}
    node.run(node.engine.leases.beat())
    assert node.engine.leases.held == {}  # the reconciliation does not bring it back either
    # The first answer of the lease made again is lost; the next heartbeat takes in what it holds.
    real, lost = Escrow.acquire_many, {"next": True}

    def acquire_many(self, *args, **kw):
        out = real(self, *args, **kw)
        if lost.pop("next", False):
            raise TimeoutError("the answer was lost")
        return out
    monkeypatch.setattr(Escrow, "acquire_many", acquire_many)
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_DENY
    node.run(node.engine.leases.beat())
    node.run(node.engine.leases.quiet())
    allowed = sum(node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                  for _ in range(30))
    assert allowed == 22  # exactly what is left of 25: nothing counted twice, nothing stranded
    node.run(node.engine.leases.return_all())
    assert _consumed(node, ledger_url) == 25 * COST


def test_made_up_customer_ids_of_one_tenant_use_only_its_share_of_the_lookups(tmp_path: Path, ledger_url: str,
                                                                               monkeypatch: pytest.MonkeyPatch):
    from meterd.leases import LOOKUPS_PER_TENANT_MAX
    node = _one(tmp_path, ledger_url, monkeypatch)
    node.grant("b-real", "usd", 10 * COST)
    leases = node.engine.leases

    async def flood() -> list[bool]:
        return await asyncio.gather(*(leases.cover(f"a-made-up-{i}", 0, COST, "tenant-a")
                                      for i in range(LOOKUPS_PER_TENANT_MAX + 1)))
    assert not any(node.run(flood()))
    assert leases.counts["lookups_limited"] == 1 and leases.lookups == LOOKUPS_PER_TENANT_MAX
    assert node.run(leases.cover("b-real", 0, COST, "tenant-b"))  # another tenant's customer is still looked up
    node.run(leases.beat())  # the shares start again with each heartbeat
    assert not node.run(leases.cover("a-made-up-again", 0, COST, "tenant-a"))
    assert leases.counts["lookups_limited"] == 1


def test_a_denial_for_want_of_the_ledger_says_so_on_every_path_and_a_keyed_one_is_not_remembered(
        tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch):
    from meterd import wire
    node = _one(tmp_path, ledger_url, monkeypatch)
    node.grant("acme", "usd", 10 * COST)
    node.grant("newco", "usd", 10 * COST)  # never served here yet
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    for _ in range(9):
        node.report("acme", "input_tokens", 1_000, model="gpt-4o")
    outage = Outage(node)
    outage.on = True
    for customer in ("acme", "newco"):  # a lease spent, and a customer this sidecar has no lease of
        r = node.report(customer, "input_tokens", 1_000, model="gpt-4o")
        assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_LEDGER_UNAVAILABLE)
        b = node.batch([_event(customer), _event(customer)])
        assert [d.reason for d in b.denials] == [pb.REASON_LEDGER_UNAVAILABLE] * 2
        a = node.authorize(customer, "input_tokens", 1_000, model="gpt-4o")
        assert (a.decision, a.reason) == (pb.DECISION_DENY, pb.REASON_LEDGER_UNAVAILABLE)
        s = node.start_session(customer, "input_tokens", model="gpt-4o")
        assert (s.decision, s.reason) == (pb.DECISION_DENY, pb.REASON_LEDGER_UNAVAILABLE)
    keyed = pb.UsageEvent(customer_id="newco", meter="input_tokens", quantity=1_000, dimensions={"model": "gpt-4o"},
                          idempotency_key="k-outage")
    data = pb.ReportRequest(event=keyed).SerializeToString()
    first = pb.ReportResponse.FromString(node.run(node.engine.report(data)))
    assert first.reason == pb.REASON_LEDGER_UNAVAILABLE
    outage.on = False
    again = pb.ReportResponse.FromString(node.run(node.engine.report(data)))  # decided again, not replayed
    assert (again.decision, again.duplicate) == (pb.DECISION_ALLOW, False)
    r = node.report("acme", "input_tokens", 1_000, model="gpt-4o")  # the ledger back: the truth
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE)
    assert wire.ledger_status(node.engine).leases_reachable


@pytest.mark.parametrize("reload", ["catalog", "disk"])
def test_a_reload_while_a_failing_top_up_waits_borrows_nothing_on_the_lease_it_replaced(
        reload: str, tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch):
    from meterd.catalog import load_catalog
    from meterd.errors import Unavailable
    node = _one(tmp_path, ledger_url, monkeypatch, lease_wait_ms=5_000)
    with Ledger(ledger_url) as lg:
        Escrow(lg).set_allowance("acme", "usd", 5 * COST, T0)
    node.grant("acme", "usd", 2 * COST)
    for _ in range(2):  # the lease (all of the balance) is spent
        assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    leases = node.engine.leases
    entered, gate = asyncio.Event(), asyncio.Event()
    real = leases.link.call

    async def hanging_then_refused(fn, *args):
        entered.set()
        await gate.wait()
        raise ConnectionRefusedError("the ledger is away")
    leases.link.call = hanging_then_refused
    renumbered = tmp_path / "renumbered.toml"  # usd becomes credit type 1
    renumbered.write_text('[credit_types.credits]\nkind = "custom"\n' + CATALOG)

    async def scenario():
        data = pb.ReportRequest(event=_event()).SerializeToString()
        waiting = asyncio.ensure_future(node.engine.report(data))
        await entered.wait()  # the request waits for its top-up
        if reload == "catalog":
            await node.engine.reload_catalog(load_catalog(str(renumbered)))
        else:
            node.engine.recovery.try_recover()  # as after a failed commit: the state reloaded from disk
        gate.set()
        try:
            return pb.ReportResponse.FromString(await waiting)
        except Unavailable:
            return None
    answer = node.run(scenario())
    assert answer is None or answer.decision == pb.DECISION_DENY
    leases = node.engine.leases
    leases.link.call = real
    usd = node.engine.live.catalog.credit_index["usd"]
    core = node.engine.core
    idx = core.account(b"acme")
    assert [core.state(idx)[0][ct][0] for ct in range(len(node.engine.live.catalog.credit_types))] == \
        [0] * len(node.engine.live.catalog.credit_types)  # nothing credited, on any credit type
    assert leases.held[("acme", usd)].borrowed == 0
    node.run(leases.beat())
    node.run(leases.quiet())
    node.run(leases.return_all())
    assert _consumed(node, ledger_url) == 2 * COST


def test_a_changed_outage_allowance_reaches_a_sidecar_at_its_next_heartbeat(tmp_path: Path, ledger_url: str,
                                                                          monkeypatch: pytest.MonkeyPatch):
    node = _one(tmp_path, ledger_url, monkeypatch)
    with Ledger(ledger_url) as lg:
        Escrow(lg).set_allowance("acme", "usd", 2 * COST, T0)
    node.grant("acme", "usd", 10 * COST)
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW  # learns 2
    with Ledger(ledger_url) as lg:
        Escrow(lg).set_allowance("acme", "usd", 0, T0 + 1)  # the operator turns it off
    node.run(node.engine.leases.beat())  # told, and taken in (durably)
    node.restart(clean=False)            # what it took in survives a kill
    outage = Outage(node)
    outage.on = True
    allowed = 1 + sum(node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                      for _ in range(12))
    assert allowed == 10  # fail closed again: not a request beyond the balance
    outage.on = False
    for _ in range(2):  # told again (the restart forgot the acknowledgement), then acknowledged
        node.run(node.engine.leases.beat())
    with Ledger(ledger_url) as lg:
        (flagged,), = lg._rows("SELECT COUNT(*) FROM meterd_leases WHERE refresh_ms > 0", ())
    assert flagged == 0


def _forgotten_soon(node: Billing) -> None:
    """acme spends 3 of its 25, its lease goes idle, is given back and settled: ready to be forgotten."""
    node.grant("acme", "usd", 25 * COST)
    for _ in range(3):
        assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    node.advance(6_000)
    node.run(node.engine.leases.beat())
    node.run(node.engine.leases.quiet())
    node.flush()


def test_a_request_that_meets_its_lease_being_forgotten_is_served_from_a_new_one(
        tmp_path: Path, ledger_url: str, monkeypatch: pytest.MonkeyPatch):
    node = _one(tmp_path, ledger_url, monkeypatch, lease_idle_s=5.0)
    _forgotten_soon(node)
    leases = node.engine.leases
    h = leases.held[("acme", 0)]
    real = Leases._escrow

    async def settled_at_once(self, method, *args):
        return [True] if method == "settled_leases" else await real(self, method, *args)
    monkeypatch.setattr(Leases, "_escrow", settled_at_once)
    data = pb.ReportRequest(event=pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=1_000,
                                                dimensions={"model": "gpt-4o"}, idempotency_key="k-1"))

    async def race():
        request = asyncio.ensure_future(node.engine.report(data.SerializeToString()))
        # It waits for the lease's lock; meanwhile the lease is forgotten.
        forget = asyncio.ensure_future(leases._forget([("acme", 0, h, h.leased_in, h.given_back,
                                                        leases._consumed(h, "acme", 0), h.degraded)]))
        return pb.ReportResponse.FromString(await request), await forget
    answer, _ = node.run(race())
    assert leases.counts["forgotten"] == 1 and leases.held[("acme", 0)] is not h
    assert (answer.decision, answer.cost_nano) == (pb.DECISION_ALLOW, COST)
    node.run(leases.return_all())
    assert _consumed(node, ledger_url) == 4 * COST


def test_a_lease_made_again_is_not_written_before_its_first_answer(tmp_path: Path, ledger_url: str,
                                                                  monkeypatch: pytest.MonkeyPatch):
    node = _one(tmp_path, ledger_url, monkeypatch, lease_idle_s=5.0)
    _forgotten_soon(node)
    node.advance(6_000)
    node.run(node.engine.leases.beat())
    node.run(node.engine.leases.quiet())
    assert node.engine.leases.held == {}  # forgotten
    with Ledger(ledger_url) as lg:
        Escrow(lg).set_allowance("acme", "usd", COST, T0 + 20_000)
    outage = Outage(node)
    outage.on = True
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_DENY  # made again
    outage.on = False
    node.run(node.engine.leases._heartbeat())  # tells the changed allowance: not written for a fresh lease
    outage.on = True
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_DENY  # no borrow
    outage.on = False
    node.run(node.engine.journal.barrier())
    assert list(node.engine.store.items("leases")) == []
    node.restart(clean=False)
    node.run(node.engine.leases.beat())
    node.run(node.engine.leases.quiet())
    allowed = sum(node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
                  for _ in range(30))
    assert allowed == 22  # what is left of 25, no more
    node.run(node.engine.leases.return_all())
    assert _consumed(node, ledger_url) == 25 * COST


class SkewedClock(Clock):
    """The machine's clock off by ``offset_ms``: a sidecar whose time synchronisation failed."""

    def __init__(self, offset_ms: int = 0) -> None:
        self.offset_ms = offset_ms

    def now_ms(self) -> int:
        return super().now_ms() + self.offset_ms


def _measured(node: Billing) -> None:
    """One heartbeat that measured the clock (one whose ledger call took too long to tell does not)."""
    leases = node.engine.leases
    for _ in range(100):
        checks = leases.counts["clock_checks"]
        node.run(leases.beat())
        if leases.counts["clock_checks"] > checks:
            return
    raise AssertionError("no heartbeat could measure the clock")


def test_a_sidecar_whose_clock_is_off_spends_no_leased_credit_until_it_is_right(tmp_path, monkeypatch, ledger_url):
    clock = SkewedClock(-500)  # within lease_clock_skew_max_ms (2 s): served
    node = _one(tmp_path, ledger_url, monkeypatch, clock=clock)  # type: ignore[arg-type]
    leases = node.engine.leases
    with Ledger(ledger_url) as lg:
        Escrow(lg).grant("acme", "usd", 10 * NANO, 0, 0, "test", "", clock.now_ms())
    _measured(node)
    assert not leases.skewed
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    assert leases.available("acme", 0) > 0  # the rest of its lease, in its core

    clock.offset_ms = -5_000
    _measured(node)
    assert leases.skewed and abs(leases.clock_offset_ms + 5_000) <= 1_000  # measured within half the allowed skew
    assert leases.available("acme", 0) == 0  # its lease's free credit is out of the core
    r = node.report("acme", "input_tokens", 1_000, model="gpt-4o")
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_LEDGER_UNAVAILABLE)
    status = wire.ledger_status(node.engine)
    assert "clock is" in status.leases_error and "lease_clock_skew_max_ms=2000" in status.leases_error

    clock.offset_ms = 0
    _measured(node)
    assert not leases.skewed and wire.ledger_status(node.engine).leases_error == ""
    assert node.report("acme", "input_tokens", 1_000, model="gpt-4o").decision == pb.DECISION_ALLOW
    node.run(leases.return_all())
    node.flush()
    with Ledger(ledger_url) as lg:
        (bal,) = [b for b in Escrow(lg).balance("acme", clock.now_ms()) if b["credit_type"] == "usd"]
        assert bal["balance_nano"] == 10 * NANO - 2 * 1_000 * 2_500  # two requests of $2.50 per 1M tokens
        assert Escrow(lg).check() == []
