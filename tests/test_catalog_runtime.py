"""Catalog behaviour in a running daemon: overdraft, default prices, catalog changes."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import wait_until

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

CATALOG_V1 = """
[credit_types.usd]
kind = "fiat"

[meters.tokens]
credit_type = "usd"
per = 1000000
price_dimension = "model"
price = "1.00"
prices = { "big" = "3.00" }

[meters.calls]
credit_type = "usd"
price = "1/3000000000"   # a third of a nano-dollar

[customers.acme]
balances = { usd = "1.00" }
overdraft = { usd = "0.50" }
"""

CATALOG_V2 = """
[credit_types.usd]
kind = "fiat"

[credit_types.credits]
kind = "custom"

[meters.tokens]
credit_type = "usd"
per = 1000000
price_dimension = "model"
price = "2.00"

[meters.images]
credit_type = "credits"
price = "1"

[customers.acme]
balances = { usd = "1.00", credits = "10" }
"""


def report(d, meter, quantity, **dims):
    return d.meter.Report(pb.ReportRequest(event=pb.UsageEvent(customer_id="acme", meter=meter, quantity=quantity,
                                                               dimensions=dims)))


def usd(d):
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id="acme"))
    return {b.credit_type: b for b in resp.balances}, {u.meter: u.quantity for u in resp.usage}


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_overdraft_default_price_and_catalog_change(make_daemon, tmp_path: Path, core):
    v1 = tmp_path / "v1.toml"
    v1.write_text(CATALOG_V1)
    d = make_daemon(core=core, catalog=str(v1)).start()
    assert report(d, "tokens", 1_000_000, model="unlisted").cost_nano == 10**9  # the default price
    r = report(d, "tokens", 100_000, model="big")  # $0.30: into the overdraft
    assert (r.decision, r.balance_nano) == (pb.DECISION_ALLOW, -300_000_000)
    r = report(d, "tokens", 100_000, model="big")  # $0.30 more would pass the $0.50 overdraft
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE)
    assert d.meter.Authorize(pb.AuthorizeRequest(customer_id="acme", meter="tokens", quantity=66_666,
                                                 dimensions={"model": "unlisted"})).decision == pb.DECISION_ALLOW
    for _ in range(3):
        report(d, "calls", 1)  # a third of a nano each: 1 nano in all
    balances, use = usd(d)
    assert balances["usd"].floor_nano == -500_000_000
    assert (balances["usd"].balance_nano, balances["usd"].reserved_nano) == (-300_000_001, 66_666_000)
    assert use["calls"] == "3"
    d.stop()

    # A new catalog: a meter goes, a meter and a credit type come, prices change.
    v2 = tmp_path / "v2.toml"
    v2.write_text(CATALOG_V2)
    d.catalog = str(v2)
    d.start()
    balances, use = usd(d)
    assert balances["usd"].balance_nano == -300_000_001   # carried over by name
    assert balances["usd"].reserved_nano == 66_666_000    # the open reservation still holds
    assert balances["credits"].balance_nano == 10 * 10**9  # the new credit type was granted once
    assert use == {"tokens": "1100000", "images": "0"}
    assert balances["usd"].floor_nano == 0  # the overdraft was taken out of the catalog
    assert report(d, "tokens", 1, model="x").decision == pb.DECISION_DENY  # no overdraft any more
    d.admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=10**9))
    assert report(d, "tokens", 1, model="x").cost_nano == 2_000  # the new price
    d.restart()
    assert usd(d)[0]["credits"].balance_nano == 10 * 10**9  # not granted again


def test_all_denied_batch_of_a_known_client_still_consumes_its_sequence(make_daemon):
    d = make_daemon().start()
    known = pb.ReportBatchRequest(client_id="c", sequence=1, events=[pb.UsageEvent(
        customer_id="demo", meter="requests", quantity=1, dimensions={"model": "o1"})])
    assert d.meter.ReportBatch(known).accepted == 1
    req = pb.ReportBatchRequest(client_id="c", sequence=2, events=[pb.UsageEvent(
        customer_id="ghost", meter="requests", quantity=1, dimensions={"model": "o1"})])
    first = d.meter.ReportBatch(req)
    assert (first.accepted, first.denied) == (0, 1)
    d.kill()
    d.start()
    again = d.meter.ReportBatch(req)
    assert again.duplicate and again.denied == 1
    assert d.admin.ListAudit(apb.ListAuditRequest(customer_id="ghost")).entries == []


def test_a_new_client_whose_batch_changes_nothing_is_not_kept(make_daemon):
    d = make_daemon().start()
    req = pb.ReportBatchRequest(client_id="ghostly", sequence=1, events=[pb.UsageEvent(
        customer_id="ghost", meter="requests", quantity=1, dimensions={"model": "o1"})])
    assert (d.meter.ReportBatch(req).denied, d.meter.ReportBatch(req).duplicate) == (1, False)
    d.kill()
    d.start()
    again = d.meter.ReportBatch(req)  # decided again: still nothing applied, and nothing kept
    assert (again.accepted, again.denied, again.duplicate) == (0, 1, False)


def test_catalog_reloads_on_sighup_and_by_rpc_keeping_balances(make_daemon, tmp_path: Path):
    import signal

    import grpc

    path = tmp_path / "catalog.toml"
    path.write_text(CATALOG_V1)
    d = make_daemon(catalog=str(path)).start()
    report(d, "tokens", 1_000_000, model="unlisted")  # $1.00 at the v1 default price
    a = d.meter.Authorize(pb.AuthorizeRequest(customer_id="acme", meter="tokens", quantity=100_000,
                                              dimensions={"model": "unlisted"}))
    path.write_text(CATALOG_V2)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "credits" in usd(d)[0], "the catalog reloaded on SIGHUP to bring the credits credit type")
    balances, _ = usd(d)
    assert balances["credits"].balance_nano == 10 * 10**9      # the new credit type's seed grant
    assert balances["usd"].balance_nano == 0                    # kept
    assert balances["usd"].reserved_nano == 100_000_000         # the open reservation still holds
    d.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=50_000))
    # a catalog that does not validate changes nothing, by signal or by RPC
    path.write_text("[meters.broken]\n")
    before = usd(d)
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "catalog reload failed, keeping the current catalog" in d.log_path.read_text(),
               "the daemon to refuse the broken catalog on SIGHUP")
    assert usd(d) == before
    with pytest.raises(grpc.RpcError) as info:
        d.admin.ReloadCatalog(apb.ReloadCatalogRequest())
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert str(path) in info.value.details()
    path.write_text(CATALOG_V2.replace('price = "2.00"', 'price = "4.00"'))
    r = d.admin.ReloadCatalog(apb.ReloadCatalogRequest())
    assert (r.credit_types, r.meters) == (2, 2)
    d.admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=10**9))
    assert report(d, "tokens", 1, model="x").cost_nano == 4_000
    before = usd(d)
    d.kill()
    d.start()
    assert usd(d) == before


def test_watch_streams_auto_topup_requests(make_daemon):
    import queue
    import threading

    import grpc

    root = Path(__file__).resolve().parent.parent
    d = make_daemon(catalog=str(root / "examples" / "openai.toml")).start()
    # Grants to a customer of the test's own mark points in the stream (the daemon sends nothing
    # when a stream opens): the first one seen proves the stream is open.
    stream = d.admin.Watch(apb.WatchRequest(kinds=["auto_topup_requested", "grant"]))
    entries: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            for entry in stream:
                entries.put(entry)
        except grpc.RpcError as e:  # cancelled at the end
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def marker() -> apb.AuditEntry | None:
        d.admin.Grant(apb.GrantRequest(customer_id="marker", credit_type="usd", amount_nano=1))
        try:
            return entries.get(timeout=0.2)
        except queue.Empty:
            return None

    first = wait_until(marker, "the Watch stream to deliver a grant made after it opened")
    assert (first.customer_id, first.kind) == ("marker", "grant")
    r = report(d, "output_tokens", 600_000, model="gpt-4o")  # $6 of $10: below the $5 threshold
    assert r.balance_nano == 4 * 10**9
    r = report(d, "output_tokens", 100_000, model="gpt-4o")  # $1 more: a request is pending already
    assert r.balance_nano == 3 * 10**9
    d.admin.Grant(apb.GrantRequest(customer_id="marker", credit_type="usd", amount_nano=2))  # the end mark
    seen = []
    while not seen or seen[-1].amount_nano != 2:
        seen.append(entries.get(timeout=30))
    stream.cancel()
    requests = [e for e in seen if e.kind == "auto_topup_requested"]
    assert all((e.customer_id, e.kind) == ("marker", "grant") for e in seen if e.kind != "auto_topup_requested")
    assert len(requests) == 1  # one request, not one per event under the threshold
    entry = requests[0]
    assert (entry.customer_id, entry.kind, entry.charge_nano, entry.charge_credit_type) == (
        "acme", "auto_topup_requested", 16 * 10**9, "usd")
