"""A catalog reload that renumbers credit types while a lease call is in flight: the answer
is applied to the credit type it was asked for, by name, not to the one its old number names now."""
import asyncio
import threading

from test_leases import CATALOG, COST, _consumed, _one

from meterd.catalog import load_catalog
from meterd.escrow import Escrow
from meterd.v1 import meter_pb2 as pb


def test_reload_while_lease_call_in_flight(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/ledger.db"
    node = _one(tmp_path, url, monkeypatch)
    node.grant("acme", "usd", 10 * COST)
    entered, release = threading.Event(), threading.Event()
    real = Escrow.acquire_many

    def slow(self, *a, **kw):
        entered.set()
        release.wait(5)          # a slow ledger round trip
        return real(self, *a, **kw)
    monkeypatch.setattr(Escrow, "acquire_many", slow)
    renumbered = tmp_path / "renumbered.toml"
    renumbered.write_text('[credit_types.credits]\nkind = "custom"\n' + CATALOG)
    data = pb.ReportRequest(event=pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=1_000,
                                                dimensions={"model": "gpt-4o"})).SerializeToString()

    async def scenario():
        task = asyncio.ensure_future(node.engine.report(data))   # denied: waits for its first lease
        assert await asyncio.to_thread(entered.wait, 30), "the lease call never reached the ledger"
        await node.engine.reload_catalog(load_catalog(str(renumbered)))  # SIGHUP meanwhile: usd 0 -> 1
        release.set()
        try:
            print("report:", pb.ReportResponse.FromString(await task))
        except Exception as e:
            print("report raised:", repr(e))
        await node.engine.leases.quiet()
    node.loop.run_until_complete(scenario())
    monkeypatch.setattr(Escrow, "acquire_many", real)
    core = node.engine.core
    idx = core.account(b"acme")
    names = node.engine.catalog.credit_types
    print("core balances after:", {names[ct].name: core.state(idx)[0][ct][0] for ct in range(len(names))})
    h = node.engine.leases.held[("acme", node.engine.catalog.credit_index["usd"])]
    print("usd lease leased_in", h.leased_in, "given_back", h.given_back)
    consumed = _consumed(node, url)
    print("ledger consumed (usd) with no event allowed:", consumed)
    assert consumed == 0
