"""A duration session's heartbeat in ledger mode submits its billed time ahead with the session's
row, then waits for the lease top-up: a crash in that wait bills the time once, and the session ends."""
import asyncio

from test_leases import SECONDS_CATALOG, _consumed, _one

from meterd.leases import Leases
from meterd.v1 import meter_pb2 as pb

RATE = 1_525  # nano-USD per ms


def test_crash_while_heartbeat_waits_for_top_up_bills_twice(tmp_path, monkeypatch):
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

    gate = asyncio.Event()
    real_cover = Leases.cover

    async def slow_cover(self, *a):       # a top-up that takes a while (a slow ledger, a recall)
        await gate.wait()
        return await real_cover(self, *a)
    monkeypatch.setattr(Leases, "cover", slow_cover)

    async def heartbeat_then_crash():
        from meterd import wire
        task = asyncio.ensure_future(wire.heartbeat(node.engine, pb.HeartbeatRequest(session_id=started.session_id)))
        for _ in range(5):
            await asyncio.sleep(0)
        await node.engine.journal.barrier()   # the billed 20 s have landed in LMDB
        task.cancel()                         # kill -9 during the top-up
        try:
            await task
        except BaseException:
            pass
    node.loop.run_until_complete(heartbeat_then_crash())
    node.restart(clean=False)
    monkeypatch.setattr(Leases, "cover", real_cover)
    node.advance(5_000)                        # 45 s in all
    ended = node.end_session(started.session_id)
    print("end answer cost_nano", ended.cost_nano, "decision", ended.decision)
    node.run(node.engine.leases.return_all())
    consumed = _consumed(node, url, "lab")
    print("ledger consumed", consumed, "expected", 45_000 * RATE, "=> overbilled seconds",
          (consumed - 45_000 * RATE) / RATE / 1000)
    assert consumed == 45_000 * RATE


def test_after_the_crash_the_session_cannot_end_and_the_sweep_fails(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/ledger.db"
    node = _one(tmp_path, url, monkeypatch, catalog=SECONDS_CATALOG)
    node.grant("lab", "usd", 1 * 10**9)
    started = node.start_session("lab", "gpu_seconds", timeout_ms=30_000, hardware="nvidia-h100")
    node.advance(20_000)
    assert node.heartbeat(started.session_id).decision == pb.DECISION_ALLOW
    ct = node.engine.catalog.credit_index["usd"]
    node.run(node.engine.leases.give_back("lab", ct))
    node.advance(20_000)
    gate = asyncio.Event()
    real_cover = Leases.cover
    async def slow_cover(self, *a):
        await gate.wait()
    monkeypatch.setattr(Leases, "cover", slow_cover)
    async def heartbeat_then_crash():
        from meterd import wire
        task = asyncio.ensure_future(wire.heartbeat(node.engine, pb.HeartbeatRequest(session_id=started.session_id)))
        for _ in range(5):
            await asyncio.sleep(0)
        await node.engine.journal.barrier()
        task.cancel()
        try:
            await task
        except BaseException:
            pass
    node.loop.run_until_complete(heartbeat_then_crash())
    node.restart(clean=False)
    monkeypatch.setattr(Leases, "cover", real_cover)
    node.advance(60_000)            # the session's heartbeats stopped: the sweep should close it
    errors = []
    for _ in range(3):
        try:
            node.tick()
        except Exception as e:
            errors.append(repr(e))
    print("sweep errors:", errors)
    print("session still open:", started.session_id in node.engine.holds.sessions)
    assert not errors
