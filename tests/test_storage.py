"""A full LMDB map: a clear RESOURCE_EXHAUSTED, reads still served, nothing corrupted."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import grpc
import pytest

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb


def test_full_map_is_resource_exhausted_and_nothing_is_lost(make_daemon):
    env = {"METERD_MAP_SIZE_BYTES": str(1 << 20), "METERD_SNAPSHOT_INTERVAL_S": "3600",
           "METERD_SNAPSHOT_LOG_RECORDS_MAX": "1000000"}
    d = make_daemon(extra_env=env).start()
    d.admin.Grant(apb.GrantRequest(customer_id="big", credit_type="usd", amount_nano=10**15))
    event = pb.UsageEvent(customer_id="big", meter="input_tokens", quantity=1, dimensions={"model": "gpt-4o"})
    acked = 0
    exhausted = None
    for seq in range(1, 200):
        try:
            r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 2000))
            acked += r.accepted
        except grpc.RpcError as e:
            exhausted = e
            break
    assert exhausted is not None and exhausted.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "map_size_bytes" in exhausted.details()
    # reads keep being served, and show exactly what was acknowledged
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    assert d.admin.ListAudit(apb.ListAuditRequest(customer_id="big")).entries[0].kind == "grant"
    # a restart with a bigger map recovers the same state and accepts work again
    d.stop()
    d.extra_env = {"METERD_MAP_SIZE_BYTES": str(64 << 20)}
    d.start()
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    usd = next(b for b in resp.balances if b.credit_type == "usd")
    assert usd.balance_nano == 10**15 - 2500 * acked
    r = d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=500, events=[event] * 2000))
    assert r.accepted == 2000


def test_full_map_clears_when_a_snapshot_trims_the_log(make_daemon):
    env = {"METERD_MAP_SIZE_BYTES": str(1 << 20), "METERD_SNAPSHOT_INTERVAL_S": "3600",
           "METERD_SNAPSHOT_LOG_RECORDS_MAX": "1000000"}
    d = make_daemon(extra_env=env).start()
    event = pb.UsageEvent(customer_id="demo", meter="requests", quantity=0, dimensions={"model": "gpt-4o"})
    for seq in range(1, 200):
        try:
            d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 2000))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            break
    else:
        raise AssertionError("the map never filled")
    # while full, the housekeeping loop keeps trying a snapshot, which drops the log it covers
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=1000, events=[event] * 10))
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            time.sleep(0.2)
    else:
        raise AssertionError("writes did not resume after the log was trimmed")


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
    deadline = time.monotonic() + 30
    while True:
        try:
            acked += d.meter.ReportBatch(pb.ReportBatchRequest(client_id="f", sequence=seq, events=[event] * 2000),
                                         timeout=30).accepted
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline, e
            time.sleep(0.2)
    assert d.stop() == 0
    d.start()  # nothing is corrupted: LMDB opens, and the state is exactly what was acknowledged
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="big"))
    assert int({u.meter: u.quantity for u in resp.usage}["input_tokens"]) == acked
    assert next(b for b in resp.balances if b.credit_type == "usd").balance_nano == 10**15 - 2500 * acked
    assert "no space left on the disk" in d.log_path.read_text()
