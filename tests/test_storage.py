"""A full LMDB map: a clear RESOURCE_EXHAUSTED, reads still served, nothing corrupted."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import subprocess
import threading

import grpc
import pytest
from conftest import wait_until

from meterd.errors import StorageFull
from meterd.ledger import Ledger
from meterd.store import Store, Unit, u64
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

# A 1 MiB map keeps 20% above its high-water mark, which must hold two whole batches.
SMALL_BATCHES = {"METERD_BATCH_BYTES_MAX": str(96 << 10)}
# These tests fill the map with distinct dimension sets, which the cap per customer and window would
# otherwise refuse first (that cap is tested in tests/test_dimension_sets.py).
UNCAPPED = {"METERD_DIMENSION_SETS_PER_WINDOW_MAX": "1000000"}


def unique_events(customer: str, seq: int, n: int) -> list[pb.UsageEvent]:
    """Events that each make a usage row of their own (a request id in the dimensions)."""
    return [pb.UsageEvent(customer_id=customer, meter="input_tokens", quantity=1,
                          dimensions={"model": "gpt-4o", "request": f"{seq}-{i}"}) for i in range(n)]


def test_full_map_is_resource_exhausted_and_nothing_is_lost(make_daemon):
    # The ledger flush is held off, so usage rows pile up in LMDB until the map is full.
    env = {"METERD_MAP_SIZE_BYTES": str(4 << 20), "METERD_LEDGER_FLUSH_INTERVAL_S": "3600",
           "METERD_LEDGER_RETRY_MAX_S": "3600", **SMALL_BATCHES, **UNCAPPED}
    d = make_daemon(extra_env=env).start()
    d.admin.Grant(apb.GrantRequest(customer_id="big", credit_type="usd", amount_nano=10**15))
    acked = 0
    exhausted = None
    for seq in range(1, 2000):
        try:
            r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq,
                                                          events=unique_events("big", seq, 200)))
            acked += r.accepted
        except grpc.RpcError as e:
            exhausted = e
            break
    assert exhausted is not None and exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "map_size_bytes" in exhausted.details() and "map_high_water_percent" in exhausted.details()
    # reads keep being served, and show exactly what was acknowledged
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    assert d.admin.ListAudit(apb.ListAuditRequest(customer_id="big")).entries[0].kind == "grant"
    # the map was refused at its high-water mark, before it was full: no commit failed
    assert "commit failed" not in d.log_path.read_text()
    # a restart with a bigger map recovers the same state and accepts work again
    d.stop()
    d.extra_env = {**env, "METERD_MAP_SIZE_BYTES": str(64 << 20)}
    d.start()
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    usd = next(b for b in resp.balances if b.credit_type == "usd")
    assert usd.balance_nano == 10**15 - 2500 * acked
    r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=5000,
                                                  events=unique_events("big", 5000, 200)))
    assert r.accepted == 200


def test_a_log_that_would_fill_the_map_is_snapshotted_in_time(make_daemon):
    # No timed snapshots: 400,000 events of one aggregate would fill a 1 MiB map with their log
    # alone. A snapshot is due whenever the log takes an eighth of the map's reserve.
    env = {"METERD_MAP_SIZE_BYTES": str(1 << 20), "METERD_SNAPSHOT_INTERVAL_S": "3600",
           "METERD_SNAPSHOT_LOG_RECORDS_MAX": "1000000", **SMALL_BATCHES}
    d = make_daemon(extra_env=env).start()
    event = pb.UsageEvent(customer_id="demo", meter="requests", quantity=0, dimensions={"model": "gpt-4o"})
    for seq in range(1, 201):
        r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 2000))
        assert r.accepted == 2000
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="demo"))
    assert {u.meter: u.quantity for u in resp.usage}["requests"] == "0"
    assert "commit failed" not in d.log_path.read_text()


FREE_CATALOG = """
[credit_types.usd]
kind = "fiat"

[meters.calls]
credit_type = "usd"
price = "0"
""" + "".join(f"\n[customers.t{i:02d}]\nbalances = {{ usd = \"1.00\" }}\n" for i in range(20))


class FreeLoad(threading.Thread):
    """Zero-cost events with 15 random dimension values each, in batches, until
    the daemon refuses one or the test stops it; counts what was acknowledged."""

    def __init__(self, target: str, n: int, stop: threading.Event, customers: int = 20) -> None:
        super().__init__(daemon=True)
        self.customers = customers
        self.stub = meter_pb2_grpc.MeterStub(grpc.insecure_channel(target))
        self.client_id, self.rng, self.stop_event = f"load-{n}", random.Random(n), stop
        self.acked = 0
        self.refusal: grpc.RpcError | None = None
        self.error: BaseException | None = None
        self.seq = 0

    def batch(self, size: int) -> list[pb.UsageEvent]:
        rng = self.rng
        return [pb.UsageEvent(customer_id=f"t{rng.randrange(self.customers):02d}", meter="calls", quantity=1,
                              dimensions={f"d{j}": f"{rng.getrandbits(64):016x}" for j in range(15)})
                for _ in range(size)]

    def send(self, size: int) -> int:
        self.seq += 1
        r = self.stub.ReportBatch(pb.ReportBatchRequest(client_id=self.client_id, sequence=self.seq,
                                                        events=self.batch(size)), timeout=30)
        if r.accepted != size:
            raise AssertionError(f"{size - r.accepted} of {size} zero-cost events not accepted: {r}")
        self.acked += size
        return size

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                try:
                    self.send(200)
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    self.refusal = e  # not acknowledged: nothing of it was applied
                    self.stop_event.set()
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e
            self.stop_event.set()


def usage_events(d, customers: int = 20) -> int:
    total = 0
    for i in range(customers):
        resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=f"t{i:02d}"))
        total += int({u.meter: u.quantity for u in resp.usage}.get("calls", "0"))
    return total


def test_a_full_map_recovers_by_itself_once_the_flush_has_drained(make_daemon, tmp_path):
    """Issue 12, section 6: random dimension values outrun the flush until writes are
    refused; once the load stops, the flush drains the map and writes are accepted
    again without a restart, and the ledger holds every acknowledged event."""
    catalog = tmp_path / "free.toml"
    catalog.write_text(FREE_CATALOG)
    ledger = tmp_path / "ledger.sqlite3"
    d = make_daemon(catalog=str(catalog), extra_env={
        "METERD_MAP_SIZE_BYTES": str(16 << 20), "METERD_BATCH_BYTES_MAX": str(1 << 20),
        "METERD_LEDGER": f"sqlite:///{ledger}", "METERD_LEDGER_FLUSH_INTERVAL_S": "0.5",
        "METERD_LEDGER_FLUSH_ROWS_MAX": "20",  # the flush drains slower than the load comes in
        "METERD_FSYNC": "false", "METERD_SNAPSHOT_INTERVAL_S": "1", **UNCAPPED}).start()
    pid = d.proc.pid
    stop = threading.Event()
    load = [FreeLoad(d.target, n, stop) for n in range(3)]
    for t in load:
        t.start()
    for t in load:
        t.join(timeout=300)
        assert not t.is_alive(), "the map never reached its high-water mark"
    errors = [t.error for t in load if t.error is not None]
    assert not errors, errors
    refusal = next(t.refusal for t in load if t.refusal is not None)
    assert "map_high_water_percent" in refusal.details() and "map_size_bytes" in refusal.details(), refusal
    acked = sum(t.acked for t in load)
    # Refused writes changed nothing; reads are served meanwhile.
    assert usage_events(d) == acked

    def accepted_again() -> bool:
        try:
            acked_before = load[0].acked
            load[0].send(1)
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            assert load[0].acked == acked_before
            return False
        return True

    wait_until(accepted_again, "writes to be accepted again", 120)
    assert d.proc.pid == pid and d.proc.poll() is None  # the same process: no restart
    acked = sum(t.acked for t in load)
    # Once the backlog is in the ledger, it holds exactly the acknowledged events.
    wait_until(lambda: (lambda s: s.backlog_usage_rows == s.backlog_entries == 0)(
        d.admin.GetLedgerStatus(apb.LedgerStatusRequest())), "the backlog to drain", 120)
    assert usage_events(d) == acked
    with Ledger(f"sqlite:///{ledger}") as lg:
        totals = lg.totals()
    assert (totals["events"], totals["cost_nano"]) == (acked, 0)
    log = d.log_path.read_text()
    assert "commit failed" not in log and "accepted again" in log
    assert d.stop() == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs: a disk that really fills up (needs root to mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_is_resource_exhausted_and_writes_resume_when_space_returns(make_daemon, small_disk):
    d = make_daemon(name="disk/data", extra_env={
        "METERD_MAP_SIZE_BYTES": str(256 << 20),  # the map is not the limit here: the disk is
        "METERD_SNAPSHOT_INTERVAL_S": "0.5"})
    d.log_path = small_disk.parent / "daemon.log"  # the log stays off the full disk
    d.start()
    d.admin.Grant(apb.GrantRequest(customer_id="big", credit_type="usd", amount_nano=10**15))
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as f:  # leave about 2 MiB
        f.write(b"\0" * max(0, free - (2 << 20)))
    event = pb.UsageEvent(customer_id="big", meter="input_tokens", quantity=1, dimensions={"model": "gpt-4o"})
    acked, seq, exhausted = 0, 0, None
    while seq < 400:
        seq += 1
        try:
            acked += d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 2000),
                                         timeout=30).accepted
        except grpc.RpcError as e:
            exhausted = e
            break
    assert exhausted is not None and exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exhausted
    assert "no space left on the disk" in exhausted.details()
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))  # reads are still served
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    filler.unlink()  # space returns: the next snapshot commits, and writes are accepted again

    def accepted() -> bool:
        nonlocal acked
        try:
            acked += d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 2000),
                                         timeout=30).accepted
            return True
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e
            return False

    wait_until(accepted, "writes to be accepted again once the disk has room")
    assert d.stop() == 0
    d.start()  # nothing is corrupted: LMDB opens, and the state is exactly what was acknowledged
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    assert next(b for b in resp.balances if b.credit_type == "usd").balance_nano == 10**15 - 2500 * acked
    assert "no space left on the disk" in d.log_path.read_text()


def test_the_writer_keeps_the_reserve_above_the_high_water_mark_for_maintenance(tmp_path):
    """On a real LMDB: data-plane work is refused from the high-water mark, may not take the map
    past the middle of the reserve, and maintenance can still commit; deletes bring use back
    under the low-water mark, and data-plane work is accepted again."""
    async def main() -> None:
        store = Store(str(tmp_path), 1 << 20, False, 0, 4096, high_water_percent=50, low_water_percent=30)
        loop = asyncio.get_running_loop()
        failures: list[BaseException] = []
        failed = asyncio.Event()

        def on_failure(e: BaseException) -> None:
            failures.append(e)
            failed.set()

        store.start(loop, on_failure)

        async def commit(ops: list, maintenance: bool = False) -> None:
            fut = loop.create_future()
            store.submit(Unit(ops, fut, maintenance))
            await fut

        n = 0
        while not store.use.refusing:
            store.check_room()  # the engine's check before it applies anything
            await commit([("usage", u64(n), b"x" * 1000)])
            n += 1
        assert store.use.high_bytes <= store.use.used_bytes < store.use.ceiling_bytes
        with pytest.raises(StorageFull, match=r"map_size_bytes 1048576 .* map_high_water_percent \(50%\)"):
            store.check_room()
        # Data-plane work admitted just under the mark may not take the reserve's second half...
        big = [("usage", u64(n + i), b"y" * 1000) for i in range((store.use.ceiling_bytes >> 10) // 3)]
        with pytest.raises(StorageFull, match="map_high_water_percent"):
            await commit(big)
        await asyncio.wait_for(failed.wait(), 30)
        assert store.get("usage", u64(n)) is None and len(failures) == 1
        store.reset()  # (the engine reloads its state from disk first)
        # ...which maintenance may use.
        await commit([("meta", b"flush_pending", b"z" * 1000)] + big, maintenance=True)
        assert store.use.used_bytes > store.use.ceiling_bytes and store.use.refusing
        # Deletes give their pages back: under the low-water mark, data-plane work is accepted again.
        await commit([("trim", u64(n + len(big) - 1), b"usage")], maintenance=True)
        assert store.use.used_bytes < store.use.low_bytes and not store.use.refusing
        store.check_room()
        await commit([("usage", u64(0), b"x")])
        store.stop()
        store.close()

    asyncio.run(main())


def test_one_customers_random_dimension_values_are_capped_before_they_fill_the_map(make_daemon, tmp_path):
    """The same load with the default settings: the cap on new dimension sets per
    customer and window refuses it (naming the setting) long before the map fills,
    and every other customer is served as before."""
    catalog = tmp_path / "free.toml"
    catalog.write_text(FREE_CATALOG)
    d = make_daemon(catalog=str(catalog), extra_env={"METERD_MAP_SIZE_BYTES": str(64 << 20)}).start()
    load = FreeLoad(d.target, 0, threading.Event(), customers=1)  # all of it from one customer
    refused = None
    for _ in range(100):
        try:
            load.send(200)
        except grpc.RpcError as e:
            refused = e
            break
    assert refused is not None and refused.code() == grpc.StatusCode.INVALID_ARGUMENT, refused
    assert "dimension_sets_per_window_max" in refused.details()
    assert load.acked <= 1000  # what the cap allows in one window
    other = d.meter.ReportBatch(pb.ReportBatchRequest(events=[pb.UsageEvent(
        customer_id="t01", meter="calls", quantity=1, dimensions={"model": "m"})] * 100))
    assert other.accepted == 100


def test_a_burst_refused_at_the_ceiling_under_the_high_water_mark_does_not_keep_writes_refused(tmp_path, monkeypatch):
    """Several batches, each admitted under the high-water mark, join one group commit that would pass
    the ceiling: that group fails, but with use itself under the mark, the next commit that measures it
    (a snapshot, a flush) lets data-plane writes in again; use need not fall under the low-water mark."""
    import functools

    import billing
    from billing import Billing

    from meterd.config import Settings
    map_bytes = 4 << 20
    monkeypatch.setattr(billing, "Settings", functools.partial(Settings, map_size_bytes=map_bytes,
                                                               batch_bytes_max=256 << 10))
    catalog = tmp_path / "c.toml"
    catalog.write_text('[credit_types.usd]\nkind = "fiat"\ncurrency = "USD"\n\n'
                       '[meters.calls]\ncredit_type = "usd"\nprice = "0.001"\n')
    b = Billing(tmp_path, str(catalog), monkeypatch)
    try:
        use = b.engine.store.use
        i = 0
        while use.used_bytes < 0.65 * map_bytes:  # accounts and grants: nothing the flush can drain
            b.grant(f"cust{i:05d}", "usd", 10**12, source="s" * 60)
            i += 1
            if i % 200 == 0:
                b.run(b.engine.snapshot())
                b.flush()
        assert use.low_bytes < use.used_bytes < use.high_bytes and not use.refusing

        def big_batch(k: int) -> bytes:
            dims = {f"k{j:02d}": f"{k}-" + "v" * 120 for j in range(16)}
            return pb.ReportBatchRequest(events=[pb.UsageEvent(customer_id=f"cust{k:05d}", meter="calls",
                                                               quantity=1, dimensions=dims)] * 90).SerializeToString()
        b.engine.store.window_s, b.engine.store._lag_s = 0.3, 1.0  # a busy loop: callers join one commit

        async def burst() -> list:
            return await asyncio.gather(*(b.engine.report_batch(big_batch(k)) for k in range(6)),
                                        return_exceptions=True)
        results = b.run(burst())
        assert any(isinstance(r, Exception) for r in results), results  # the group passed the ceiling
        b.engine.store.window_s = 0
        b.advance(2000)
        b.tick()
        b.run(b.engine.snapshot())  # a maintenance commit measures the map again
        assert use.used_bytes < use.high_bytes and not use.refusing
        assert b.report("cust00000", "calls", 1).decision == pb.DECISION_ALLOW
    finally:
        b.close()


def test_a_refusal_at_the_ceiling_keeps_the_hysteresis_of_the_water_marks():
    from meterd.store import MapUse
    mib = 1 << 20
    under = MapUse(100 * mib, 80, 60)
    under.update(70 * mib, 0)
    under.refuse_over_ceiling()  # a group would have passed the ceiling; use is at 70%
    under.update(85 * mib, 0)  # a snapshot then takes it past the high-water mark
    under.update(75 * mib, 0)
    assert under.refusing  # from there only the low-water mark lets writes in again
    under.update(59 * mib, 0)
    assert not under.refusing
    over = MapUse(100 * mib, 80, 60)
    over.update(81 * mib, 0)  # refusing by the high-water mark
    over.refuse_over_ceiling()  # a group admitted just before fails at the ceiling
    over.update(79 * mib, 0)
    assert over.refusing
    brief = MapUse(100 * mib, 80, 60)
    brief.update(70 * mib, 0)
    brief.refuse_over_ceiling()
    assert brief.refusing
    brief.update(70 * mib, 0)  # the next commit measures 70%: under the mark, writes come in again
    assert not brief.refusing
