"""Ledger mode across processes: four sidecar daemons on one ledger, one customer
whose balance covers exactly K events, clients on every sidecar at once. Exactly K
are allowed, whatever is killed, stopped or replaced meanwhile."""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import pytest
from test_leases import CATALOG

from meterd.escrow import Escrow
from meterd.ledger import Ledger
from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb

pytestmark = pytest.mark.spawns

COST = 2_500_000  # 1,000 gpt-4o input tokens at $2.50 per 1M, in nano-USD
FAST = {"METERD_LEDGER_FLUSH_INTERVAL_S": "0.2", "METERD_SNAPSHOT_INTERVAL_S": "0.2",
        "METERD_LEDGER_RETRY_MAX_S": "0.5", "METERD_LEDGER_TIMEOUT_S": "3", "METERD_LEASE_HEARTBEAT_MS": "50",
        "METERD_LEASE_WAIT_MS": "1000"}


def _event() -> pb.UsageEvent:
    return pb.UsageEvent(customer_id="acme", meter="input_tokens", quantity=1_000, dimensions={"model": "gpt-4o"})


def _sidecars(make_daemon, tmp_path: Path, url: str, n: int = 4, core: str = "compiled") -> list:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG)
    return [make_daemon(core=core, catalog=str(catalog), name=f"s{i}",
                        extra_env={"METERD_BALANCES": "ledger", "METERD_LEDGER": url, "METERD_SIDECAR_ID": f"s{i}",
                                   **FAST}).start() for i in range(n)]


def _migrated(url: str) -> str:
    with Ledger(url) as lg:
        lg.migrate()
    return url


def _settled(url: str) -> dict:
    """The customer's balance in the ledger, after the conservation check holds."""
    with Ledger(url) as lg:
        escrow = Escrow(lg)
        assert escrow.check() == []
        return escrow.balance("acme", 0)[0]


class Clients:
    """Clients on every sidecar at once, on the unary, batch and reservation paths; each stops
    after a run of denials. Only acknowledged answers are counted."""

    def __init__(self, sidecars: list) -> None:
        self.sidecars = sidecars
        self.allowed = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def _one(self, d, path: str, n: int) -> int:
        if path == "unary":
            return int(d.meter.Report(pb.ReportRequest(event=_event()), timeout=10).decision == pb.DECISION_ALLOW)
        if path == "batch":
            return d.meter.ReportBatch(pb.ReportBatchRequest(events=[_event()] * (1 + n % 3)), timeout=10).accepted
        a = d.meter.Authorize(pb.AuthorizeRequest(customer_id="acme", meter="input_tokens", quantity=1_000,
                                                  dimensions={"model": "gpt-4o"}), timeout=10)
        if a.decision != pb.DECISION_ALLOW:
            return 0
        assert d.meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=1_000),
                              timeout=10).cost_nano == COST
        return 1

    def client(self, d, path: str) -> None:
        denials = n = 0
        while denials < 6:
            n += 1
            try:
                got = self._one(d, path, n)
            except grpc.RpcError as e:
                self.errors.append(f"{path}: {e.code().name}: {e.details()}")
                return
            with self.lock:
                self.allowed += got
            denials = 0 if got else denials + 1

    def run(self) -> None:
        threads = [threading.Thread(target=self.client, args=(d, path)) for d in self.sidecars
                   for path in ("unary", "batch", "reservation")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    def drain(self) -> None:
        """Once the clients have stopped: one request at each sidecar in turn until all four are denied, so
        that a credit stranded at an idle sidecar (a false deny) would show up as more allowed here."""
        denied = 0
        while denied < len(self.sidecars):
            for d in self.sidecars:
                got = self._one(d, "unary", 0)
                self.allowed += got
                denied = 0 if got else denied + 1


@pytest.mark.parametrize("core", ["compiled", "python"])
def test_four_sidecars_and_twelve_clients_allow_exactly_k(make_daemon, tmp_path: Path, ledger_url: str, core: str):
    k = 300
    sidecars = _sidecars(make_daemon, tmp_path, _migrated(ledger_url), core=core)
    assert sidecars[1].admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=k * COST,
                                                    idempotency_key="g1")).balance_nano == k * COST
    # The same key through another sidecar: the same grant, once.
    assert sidecars[2].admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=k * COST,
                                                    idempotency_key="g1")).grant_id == "G1"
    clients = Clients(sidecars)
    clients.run()
    clients.drain()
    assert clients.errors == []
    assert clients.allowed == k  # no overspend; no credit stranded once recalls are done
    for d in sidecars:
        assert d.stop() == 0  # gives back what its leases hold, and flushes what it spent
    b = _settled(ledger_url)
    assert (b["consumed_nano"], b["available_nano"], b["leased_nano"]) == (k * COST, 0, 0)


def test_sidecars_killed_and_restarted_meanwhile_still_allow_exactly_k(make_daemon, tmp_path: Path, ledger_url: str):
    """Keyed unary reports, retried with their key until answered: every allowed event is counted once,
    even when its answer was lost to a kill."""
    k = 200
    sidecars = _sidecars(make_daemon, tmp_path, _migrated(ledger_url))
    sidecars[0].admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=k * COST))
    allowed = [0] * len(sidecars)
    stop = threading.Event()

    def client(i: int) -> None:
        n = denials = 0
        while denials < 6 and not stop.is_set():
            n += 1
            event = _event()
            event.idempotency_key = f"c{i}-{n}"
            while True:
                try:
                    r = sidecars[i].meter.Report(pb.ReportRequest(event=event), timeout=10)
                    break
                except (grpc.RpcError, AttributeError, ValueError):  # killed: ask again, same key, once it is back
                    if stop.wait(0.05):
                        return
            allowed[i] += r.decision == pb.DECISION_ALLOW
            denials = 0 if r.decision == pb.DECISION_ALLOW else denials + 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sidecars))]
    for t in threads:
        t.start()
    for victim in (1, 2, 1):
        sidecars[victim].kill()  # its leases stay leased; its LMDB knows what it spent
        sidecars[victim].start()
    for t in threads:
        t.join(120)
    stop.set()
    clients = Clients(sidecars)
    clients.drain()
    assert sum(allowed) + clients.allowed == k
    for d in sidecars:
        assert d.stop() == 0
    b = _settled(ledger_url)
    assert (b["consumed_nano"], b["available_nano"] + b["leased_nano"]) == (k * COST, 0)


def test_a_replaced_pod_takes_over_its_sidecar_id_and_the_old_data_directory_is_refused(make_daemon, tmp_path: Path,
                                                                                          ledger_url: str):
    k = 40
    url = _migrated(ledger_url)
    old, other = _sidecars(make_daemon, tmp_path, url, n=2)
    old.admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=k * COST))
    allowed = sum(old.meter.Report(pb.ReportRequest(event=_event())).decision == pb.DECISION_ALLOW
                  for _ in range(10))
    assert old.stop() == 0  # Kubernetes sends SIGTERM first: the lease is given back, the spend flushed
    new = make_daemon(catalog=old.catalog, name="s0-replacement",
                      extra_env={"METERD_BALANCES": "ledger", "METERD_LEDGER": url, "METERD_SIDECAR_ID": "s0",
                                 **FAST}).start()
    clients = Clients([new, other])
    clients.drain()
    assert allowed + clients.allowed == k
    assert new.stop() == 0 and other.stop() == 0
    # The old data directory under the same id is fenced for good: it cannot start spending again.
    old.start()
    r = old.meter.Report(pb.ReportRequest(event=_event()), timeout=10)
    assert r.decision == pb.DECISION_DENY
    assert old.stop() == 0
    b = _settled(url)
    assert (b["consumed_nano"], b["available_nano"] + b["leased_nano"]) == (k * COST, 0)


def test_while_the_ledger_is_stopped_sidecars_serve_from_their_leases_and_fail_closed(make_daemon, tmp_path: Path,
                                                                                       own_postgres):
    k = 100
    url = _migrated(own_postgres("start"))
    sidecars = _sidecars(make_daemon, tmp_path, url, n=2)
    sidecars[0].admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=k * COST))
    allowed = sum(d.meter.Report(pb.ReportRequest(event=_event())).decision == pb.DECISION_ALLOW for d in sidecars)
    assert allowed == 2  # each sidecar holds a lease now
    own_postgres("stop")
    during = 0
    for _ in range(k):  # served from the leases held, then denied: never more than the balance
        for d in sidecars:
            during += d.meter.Report(pb.ReportRequest(event=_event()), timeout=10).decision == pb.DECISION_ALLOW
    assert 0 < during < k - allowed
    assert own_postgres("start") == url
    clients = Clients(sidecars)
    clients.drain()
    assert allowed + during + clients.allowed == k
    for d in sidecars:
        assert d.stop() == 0
    b = _settled(url)
    assert (b["consumed_nano"], b["available_nano"] + b["leased_nano"]) == (k * COST, 0)


def test_an_outage_allowance_lets_each_sidecar_spend_that_much_beyond_its_lease_and_nothing_is_lost(
        make_daemon, tmp_path: Path, own_postgres):
    k, allowance = 100, 3 * COST
    url = _migrated(own_postgres("start"))
    with Ledger(url) as lg:
        Escrow(lg).set_allowance("acme", "usd", allowance, 0)
    sidecars = _sidecars(make_daemon, tmp_path, url, n=2)
    sidecars[0].admin.Grant(apb.GrantRequest(customer_id="acme", credit_type="usd", amount_nano=k * COST))
    allowed = sum(d.meter.Report(pb.ReportRequest(event=_event())).decision == pb.DECISION_ALLOW for d in sidecars)
    assert allowed == 2
    own_postgres("stop")
    for d in sidecars:  # each spends its lease, then its allowance, then is denied
        denials = 0
        while denials < 3:
            got = d.meter.Report(pb.ReportRequest(event=_event()), timeout=10).decision == pb.DECISION_ALLOW
            allowed += got
            denials = 0 if got else denials + 1
        row, = d.admin.GetLedgerStatus(apb.LedgerStatusRequest()).leases
        assert (row.borrowed_nano, row.outage_allowance_nano, row.available_nano) == (allowance, allowance, 0)
    assert own_postgres("start") == url
    clients = Clients(sidecars)
    clients.drain()  # what was borrowed came out of what the ledger had left: still exactly k
    assert allowed + clients.allowed == k
    for d in sidecars:
        assert d.stop() == 0
    b = _settled(url)
    assert (b["consumed_nano"], b["available_nano"] + b["leased_nano"], b["overdrawn_nano"]) == (k * COST, 0, 0)
