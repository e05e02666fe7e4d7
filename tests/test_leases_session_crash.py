"""A duration session's heartbeat in ledger mode submits its billed time ahead with the session's
row, then waits for the lease top-up: a crash in that wait bills the time once, and the session ends."""
import asyncio

import pytest
from billing import Billing
from test_leases import SECONDS_CATALOG, _consumed, _one

from meterd import wire
from meterd.leases import Leases
from meterd.v1 import meter_pb2 as pb

RATE = 1_525  # nano-USD per ms


def _killed_during_a_heartbeats_top_up(tmp_path, monkeypatch: pytest.MonkeyPatch) -> tuple[Billing, str, str]:
    """A session billed for 20 s, then a heartbeat 20 s later that must top its lease up; the sidecar is
    killed while it waits (its billed time has landed in LMDB), and started again on its data."""
    url = f"sqlite:///{tmp_path}/ledger.db"
    node = _one(tmp_path, url, monkeypatch, catalog=SECONDS_CATALOG)
    node.grant("lab", "usd", 1 * 10**9)
    started = node.start_session("lab", "gpu_seconds", timeout_ms=30_000, hardware="nvidia-h100")
    assert started.decision == pb.DECISION_ALLOW
    node.advance(20_000)
    assert node.heartbeat(started.session_id).decision == pb.DECISION_ALLOW   # 20 s billed
    ct = node.engine.catalog.credit_index["usd"]
    node.run(node.engine.leases.give_back("lab", ct))   # the lease has nothing free: next hold needs a top-up
    node.advance(20_000)
    waiting, never = asyncio.Event(), asyncio.Event()
    real_cover = Leases.cover

    async def slow_cover(self, *a):  # a top-up that takes a while (a slow ledger, a recall)
        waiting.set()
        await never.wait()
    monkeypatch.setattr(Leases, "cover", slow_cover)

    async def heartbeat_then_crash():
        task = asyncio.ensure_future(wire.heartbeat(node.engine, pb.HeartbeatRequest(session_id=started.session_id)))
        await asyncio.wait_for(waiting.wait(), 30)  # the heartbeat waits in its top-up
        await node.engine.journal.barrier()         # the billed 20 s have landed in LMDB
        task.cancel()                               # kill -9 during the top-up
        with pytest.raises(asyncio.CancelledError):
            await task
    node.loop.run_until_complete(heartbeat_then_crash())
    node.restart(clean=False)
    monkeypatch.setattr(Leases, "cover", real_cover)
    return node, url, started.session_id


def test_a_crash_while_a_heartbeat_waits_for_its_top_up_bills_the_time_once(tmp_path, monkeypatch):
    node, url, session_id = _killed_during_a_heartbeats_top_up(tmp_path, monkeypatch)
    node.advance(5_000)                        # 45 s in all
    node.end_session(session_id)
    node.run(node.engine.leases.return_all())
    assert _consumed(node, url, "lab") == 45_000 * RATE


def test_after_that_crash_the_sweep_closes_the_session(tmp_path, monkeypatch):
    node, _, session_id = _killed_during_a_heartbeats_top_up(tmp_path, monkeypatch)
    node.advance(60_000)            # the session's heartbeats stopped: the sweep closes it
    for _ in range(3):
        node.tick()                 # never raises
    assert session_id not in node.engine.holds.sessions
