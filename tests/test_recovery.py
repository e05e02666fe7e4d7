"""A commit that fails on a (simulated) disk error: callers get the error, the
daemon reloads what is on disk, refuses writes until that works, and loses
nothing it acknowledged. LMDB is real; only its write path is made to fail."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import lmdb
import pytest
from conftest import async_wait_until

from meterd import store as store_mod
from meterd import wire
from meterd.catalog import load_catalog
from meterd.clock import ManualClock
from meterd.config import Settings
from meterd.engine import Engine
from meterd.errors import Unavailable
from meterd.store import u64
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

REPORT = pb.ReportRequest(event=pb.UsageEvent(customer_id="demo", meter="input_tokens", quantity=1000,
                                              dimensions={"model": "gpt-4o"})).SerializeToString()


def balance(engine: Engine, customer: str) -> int:
    resp = pb.GetBalanceResponse.FromString(wire.balance(engine, pb.GetBalanceRequest(customer_id=customer)))
    return resp.balances[0].balance_nano


def test_disk_error_during_commit_and_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    failing = {"on": False}
    real_apply = store_mod.Store._apply

    def flaky(self, txn, ops):
        if failing["on"]:
            raise lmdb.DiskError("EIO (simulated)")
        return real_apply(self, txn, ops)

    monkeypatch.setattr(store_mod.Store, "_apply", flaky)
    settings = Settings(data_dir=str(tmp_path / "d"), fsync=False)

    async def run() -> None:
        engine = Engine(settings, load_catalog(None))
        engine.start(asyncio.get_running_loop())
        await wire.grant(engine, apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=5 * 10**9))
        before = balance(engine, "demo")
        failing["on"] = True
        with pytest.raises(Unavailable, match="storage failed .*EIO"):  # not INTERNAL: the caller may retry
            await engine.report(REPORT)
        await async_wait_until(lambda: balance(engine, "demo") == before, "the engine to reload its state from disk")
        assert balance(engine, "demo") == before  # the unacknowledged debit was undone
        with pytest.raises(Unavailable):
            await engine.report(REPORT)  # recovery could not snapshot: writes are refused
        failing["on"] = False
        engine.recovery.try_recover()  # what housekeeping does on its next tick
        assert engine.journal.broken is None
        await engine.report(REPORT)
        await engine.snapshot()
        assert balance(engine, "acme") == 5 * 10**9
        engine.store.stop()
        engine.store.close()  # as after kill -9: no final snapshot

        again = Engine(settings, load_catalog(None))
        assert balance(again, "acme") == 5 * 10**9
        assert balance(again, "demo") == before - 2_500_000
        again.store.close()

    asyncio.run(run())



def test_grants_are_read_when_needed_and_expire_after_a_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A start reads no grant buckets, only the index of when grants expire; a
    data directory from before that index gets it built at its first start."""
    clock = ManualClock(1_790_000_000_000)
    settings = Settings(data_dir=str(tmp_path / "d"), fsync=False)

    def grants(engine: Engine, customer: str) -> list[int]:
        resp = pb.GetBalanceResponse.FromString(wire.balance(engine, pb.GetBalanceRequest(customer_id=customer)))
        return sorted(g.remaining_nano for g in resp.balances[0].grants)

    async def granted(customers: list[str]) -> None:
        engine = Engine(settings, load_catalog(None), clock=clock)
        engine.start(asyncio.get_running_loop())
        for customer in customers:
            await wire.grant(engine, apb.GrantRequest(customer_id=customer, credit_type="usd", amount_nano=7 * 10**9))
            await wire.grant(engine, apb.GrantRequest(customer_id=customer, credit_type="usd", amount_nano=3 * 10**9,
                                                      expires_at_ms=clock.ms + 60_000))
        await engine.close()

    async def run() -> None:
        await granted(["a", "b"])
        engine = Engine(settings, load_catalog(None), clock=clock)
        assert engine.grants.accounts.loaded() == []  # the start read no buckets
        assert grants(engine, "a") == [3 * 10**9, 7 * 10**9]  # read now
        clock.advance(61_000)
        engine.start(asyncio.get_running_loop())
        await engine.sweep()
        assert balance(engine, "a") == balance(engine, "b") == 7 * 10**9
        assert grants(engine, "b") == [7 * 10**9]
        await engine.close()

        async def without_index_entries(customer: str, meta: Any) -> None:
            """As an older meterd would leave it: grants, and no index entries for them."""
            await granted([customer])
            engine = Engine(settings, load_catalog(None), clock=clock)
            engine.store.write_now([("grant_expiry", k, None) for k, _ in engine.store.items("grant_expiry")]
                                   + [("meta", *meta(engine))])
            engine.flusher.close()
            engine.store.close()
            engine = Engine(settings, load_catalog(None), clock=clock)
            assert len(engine.store.items("grant_expiry")) == 1  # indexed again at this start
            clock.advance(61_000)
            engine.start(asyncio.get_running_loop())
            await engine.sweep()
            assert balance(engine, customer) == 7 * 10**9
            assert engine.store.items("grant_expiry") == []
            await engine.close()

        # A data directory from before the index: its first start builds it.
        await without_index_entries("c", lambda e: (b"grant_expiry_index", None))
        # An older meterd granted in the directory after the index was built: the stamp no longer
        # matches the grant sequence, so the next start indexes those grants too.
        await without_index_entries("d", lambda e: (b"grant_seq", u64(e.grants.seq + 1)))

    asyncio.run(run())


OVERFLOW_CATALOG = '''
[credit_types.usd]
kind = "fiat"
currency = "USD"
[meters.calls]
credit_type = "usd"
price = "1.00"
[plans.p]
period = "month"
[plans.p.credits.usd]
included = "1.00"
low_balance = "5.00"
topup_target = "50.00"
'''


def test_a_call_that_fails_half_way_changes_nothing_and_leaves_no_gap_in_the_log(tmp_path, monkeypatch):
    """A Subscribe whose included credits would overflow the balance fails after it has set
    the plan in memory and taken a log position: it is undone as a whole, and the log on
    disk goes on without a gap, so a restart replays exactly what was acknowledged."""
    from billing import Billing

    (tmp_path / "c.toml").write_text(OVERFLOW_CATALOG)
    b = Billing(tmp_path, str(tmp_path / "c.toml"), monkeypatch)
    try:
        full = ((1 << 63) - 1) // 10**7 * 10**7 - 10**7
        b.grant("big", "usd", full)
        b.grant("other", "usd", 100 * 10**9)
        with pytest.raises(Exception, match="overflow"):
            b.subscribe("big", "p")
        assert "big" not in b.engine.subscriptions.subs
        assert b.bal("big", "usd") == full
        assert b.balance("big").plan == ""
        assert b.report("other", "calls", 1).decision == pb.DECISION_ALLOW
        positions = [int.from_bytes(k, "big") for k, _ in b.engine.store.items("log")]
        assert positions == list(range(positions[0], positions[0] + len(positions)))
        b.restart(clean=False)  # as after kill -9
        assert b.bal("other", "usd") == 99 * 10**9 and b.bal("big", "usd") == full
        assert "big" not in b.engine.subscriptions.subs
    finally:
        b.close()


def test_a_grant_rearms_no_top_up_of_a_plan_a_reload_removed(tmp_path, monkeypatch):
    from billing import Billing

    from meterd.catalog import load_catalog

    (tmp_path / "c.toml").write_text(OVERFLOW_CATALOG)
    b = Billing(tmp_path, str(tmp_path / "c.toml"), monkeypatch)
    try:
        b.subscribe("acme", "p")  # 1.00 included
        b.grant("acme", "usd", 8 * 10**9)
        b.report("acme", "calls", 5)  # 4.00, below low_balance: a top-up is asked for
        assert len(b.audit("acme", "auto_topup_requested")) == 1
        (tmp_path / "d.toml").write_text(OVERFLOW_CATALOG.split("[plans.p]")[0])
        b.run(b.engine.reload_catalog(load_catalog(str(tmp_path / "d.toml"))))
        assert b.grant("acme", "usd", 10 * 10**9).balance_nano == 14 * 10**9
    finally:
        b.close()


def test_a_sweep_that_fails_half_way_is_undone_too(tmp_path, monkeypatch):
    """The housekeeping timer goes through the same undo as a failed call: a sweep step
    that credited an account and took a log position, then failed, leaves neither."""
    from billing import Billing

    from meterd import records
    from meterd.holds import Holds
    from meterd.records import Kind

    b = Billing(tmp_path, "openai", monkeypatch)
    try:
        b.grant("acme", "usd", 10 * 10**9)
        before = b.bal("acme", "usd")
        failed = []

        def broken_step(self, now):  # a defect in a sweep step, after it changed the core
            if not failed:
                failed.append(1)
                idx = self.live.core.account(b"acme")
                self.live.core.credit(idx, 0, 5 * 10**9)
                self.grants.journal.log_op(records.account(Kind.CREDIT, b"acme", 0, 5 * 10**9, now))
                raise RuntimeError("injected")
            return []

        monkeypatch.setattr(Holds, "expire_grants_ops", broken_step)

        async def run() -> None:
            stop = asyncio.Event()
            task = asyncio.ensure_future(b.engine.run_housekeeping(stop, period_s=0.01))
            await async_wait_until(lambda: failed and b.engine.journal.unsubmitted == 0
                                   and not b.engine.journal.reloading, "the failed sweep to be undone")
            stop.set()
            await task

        b.run(run())
        assert b.bal("acme", "usd") == before  # the uncommitted credit is gone from memory
        assert b.report("acme", "input_tokens", 1000, model="gpt-4o").decision == pb.DECISION_ALLOW
        positions = [int.from_bytes(k, "big") for k, _ in b.engine.store.items("log")]
        assert positions == list(range(positions[0], positions[0] + len(positions)))
    finally:
        b.close()
