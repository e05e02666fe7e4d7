"""A commit that fails on a (simulated) disk error: callers get the error, the
daemon reloads what is on disk, refuses writes until that works, and loses
nothing it acknowledged. LMDB is real; only its write path is made to fail."""

from __future__ import annotations

import asyncio
from pathlib import Path

import lmdb
import pytest

from meterd import store as store_mod
from meterd.catalog import load_catalog
from meterd.config import Settings
from meterd.engine import Engine
from meterd.errors import Unavailable
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

REPORT = pb.ReportRequest(event=pb.UsageEvent(customer_id="demo", meter="input_tokens", quantity=1000,
                                              dimensions={"model": "gpt-4o"})).SerializeToString()


def balance(engine: Engine, customer: str) -> int:
    resp = pb.GetBalanceResponse.FromString(
        engine.balance(pb.GetBalanceRequest(customer_id=customer).SerializeToString()))
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
        await engine.grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=5 * 10**9))
        before = balance(engine, "demo")
        failing["on"] = True
        with pytest.raises(lmdb.DiskError):
            await engine.report(REPORT)
        await asyncio.sleep(0.05)
        assert balance(engine, "demo") == before  # the unacknowledged debit was undone
        with pytest.raises(Unavailable):
            await engine.report(REPORT)  # recovery could not snapshot: writes are refused
        failing["on"] = False
        engine._try_recover()  # what housekeeping does on its next tick
        assert engine.broken is None
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
