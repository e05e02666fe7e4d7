"""SIGKILL a loaded daemon again and again: nothing acknowledged is lost or counted twice."""

from __future__ import annotations

import os
import random
import threading
import time

import grpc
from conftest import wait_until

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

KILLS = 50 if os.environ.get("METERD_SOAK") else 6
HARNESS_KILLS = 200 if os.environ.get("METERD_SOAK") else 50
COST_NANO = 2_500  # one gpt-4o input token
GRANT_NANO = 10**15


class Client(threading.Thread):
    """Sends batches with (client_id, sequence) and retries each until it is acknowledged."""

    def __init__(self, target: str, n: int, unary: bool, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.customer = f"crash-{n}"
        self.client_id = f"client-{n}"
        self.unary = unary
        self.stop_event = stop
        self.acked_events = 0
        self.duplicates = 0
        self.retries = 0
        self.rng = random.Random(n)

    def run(self) -> None:
        channel = grpc.insecure_channel(self.target)
        stub = meter_pb2_grpc.MeterStub(channel)
        seq = 0
        while not self.stop_event.is_set():
            seq += 1
            size = 1 if self.unary else self.rng.randrange(1, 400)
            event = pb.UsageEvent(customer_id=self.customer, meter="input_tokens", quantity=1,
                                  dimensions={"model": "gpt-4o"})
            while True:  # the same request until it is acknowledged
                try:
                    if self.unary:
                        event.idempotency_key = f"{self.client_id}-{seq}"
                        r = stub.Report(pb.ReportRequest(event=event), timeout=10, wait_for_ready=True)
                        assert r.decision == pb.DECISION_ALLOW
                        self.duplicates += r.duplicate
                    else:
                        r = stub.ReportBatch(pb.ReportBatchRequest(client_id=self.client_id, sequence=seq,
                                                                   events=[event] * size),
                                             timeout=10, wait_for_ready=True)
                        assert r.accepted == size, r
                        self.duplicates += r.duplicate
                    self.acked_events += size
                    break
                except grpc.RpcError as e:
                    assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                        grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN), e
                    self.retries += 1
                    time.sleep(0.02)
        channel.close()


def wait_for_progress(clients: list) -> None:
    """Until every client has been acknowledged more than it had been: the daemon serves each again."""
    before = [c.acked_events for c in clients]
    wait_until(lambda: all(c.acked_events > n for c, n in zip(clients, before, strict=True)),
               "every client to be acknowledged again")


def test_sigkill_under_load_loses_nothing_and_counts_nothing_twice(make_daemon):
    d = make_daemon().start()
    for n in range(4):
        d.admin.Grant(apb.GrantRequest(customer_id=f"crash-{n}", credit_type="usd", amount_nano=GRANT_NANO))
    stop = threading.Event()
    clients = [Client(d.target, n, unary=(n == 3), stop=stop) for n in range(4)]
    for c in clients:
        c.start()
    rng = random.Random(7)
    for _ in range(KILLS):
        time.sleep(rng.uniform(0.2, 0.8))  # when to kill: a random input, nothing waits on it
        d.kill()
        d.start()  # must open LMDB cleanly and replay its log every time
        wait_for_progress(clients)  # the load is on again before the next kill
    stop.set()
    for c in clients:
        c.join(60)
        assert not c.is_alive()
    assert sum(c.acked_events for c in clients) > 0
    assert sum(c.retries for c in clients) > 0  # the kills did land while clients were waiting
    print("acked", [c.acked_events for c in clients], "duplicates", [c.duplicates for c in clients],
          "retries", [c.retries for c in clients])
    d.restart()
    for c in clients:
        resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=c.customer))
        usd = next(b for b in resp.balances if b.credit_type == "usd")
        used = int(next(u.quantity for u in resp.usage if u.meter == "input_tokens"))
        assert used == c.acked_events, (c.customer, used, c.acked_events, c.duplicates)
        assert usd.balance_nano == GRANT_NANO - COST_NANO * c.acked_events
        assert usd.reserved_nano == 0


PLAN = """
[plans.daily]
period = "day"
fee = { usd = "1.00" }

[plans.daily.credits.premium_requests]
included = "100"
"""
DAY_MS = 86_400_000
OUTPUT_NANO_PER_TOKEN = 10_000  # gpt-4o output tokens at $10 per million


class Reserver(threading.Thread):
    """Authorize, then Commit 600 of the 1,000 tokens reserved; each step retried
    with the same idempotency key (or reservation id) until it is acknowledged."""

    def __init__(self, target: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stop_event = stop
        self.committed = 0
        self.retries = 0

    def _until_acked(self, call):
        while True:
            try:
                return call()
            except grpc.RpcError as e:
                assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                                    grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN), e
                self.retries += 1
                time.sleep(0.02)

    def run(self) -> None:
        channel = grpc.insecure_channel(self.target)
        stub = meter_pb2_grpc.MeterStub(channel)
        n = 0
        while not self.stop_event.is_set():
            n += 1
            request = pb.AuthorizeRequest(customer_id="reserver", meter="output_tokens", quantity=1000,
                                          dimensions={"model": "gpt-4o"}, idempotency_key=f"auth-{n}")
            auth = self._until_acked(lambda r=request: stub.Authorize(r, timeout=10, wait_for_ready=True))
            assert auth.decision == pb.DECISION_ALLOW, auth
            commit = pb.CommitRequest(reservation_id=auth.reservation_id, quantity=600)
            self._until_acked(lambda r=commit: stub.Commit(r, timeout=10, wait_for_ready=True))
            self.committed += 1
        channel.close()


def test_kill_harness_through_flushes_and_a_period_rollover(make_daemon, tmp_path):
    """50 SIGKILLs (200 with METERD_SOAK=1) of a daemon under batch, unary and
    reservation load, flushing to its ledger every 50 ms, with a period boundary
    of three subscribers in the middle. Afterwards, against the clients' own
    records: balances, reservations, LMDB aggregates and the ledger agree."""
    from importlib import resources

    from meterd.ledger import Ledger

    catalog = tmp_path / "catalog.toml"
    catalog.write_text(resources.files("meterd").joinpath("demo_catalog.toml").read_text() + PLAN)
    d = make_daemon(catalog=str(catalog), extra_env={"METERD_LEDGER_FLUSH_INTERVAL_S": "0.05",
                                                     "METERD_SNAPSHOT_INTERVAL_S": "0.3"}).start()
    for n in range(4):
        d.admin.Grant(apb.GrantRequest(customer_id=f"crash-{n}", credit_type="usd", amount_nano=GRANT_NANO))
    d.admin.Grant(apb.GrantRequest(customer_id="reserver", credit_type="usd", amount_nano=GRANT_NANO))
    boundary_in_s = 6.0
    for n in range(3):  # their day ends in the middle of the run
        d.admin.Grant(apb.GrantRequest(customer_id=f"sub-{n}", credit_type="usd", amount_nano=GRANT_NANO))
        sub = d.admin.Subscribe(apb.SubscribeRequest(
            customer_id=f"sub-{n}", plan="daily", start_ms=int(time.time() * 1000 + boundary_in_s * 1000) - DAY_MS))
    boundary = time.monotonic() + (sub.period_end_ms - time.time() * 1000) / 1000
    stop = threading.Event()
    clients: list = [Client(d.target, n, unary=(n == 3), stop=stop) for n in range(4)]
    reserver = Reserver(d.target, stop)
    for c in clients + [reserver]:
        c.start()
    rng = random.Random(20261127)
    # Three kills around the boundary (just before, during and after the roll), the rest at random.
    kills = sorted([boundary - 0.05, boundary + 0.02, boundary + 0.25]
                   + [time.monotonic() + rng.uniform(0.1, 0.45) * i for i in range(1, HARNESS_KILLS - 2)])
    for at in kills:
        time.sleep(max(0.0, at - time.monotonic()))  # when to kill: a random input, nothing waits on it
        d.kill()
        d.start()  # LMDB must open cleanly and replay its log every time
    wait_for_progress(clients)  # the daemon serves again after the last kill...
    committed = reserver.committed
    wait_until(lambda: reserver.committed > committed, "a reservation to be committed after the last kill")

    def renewed() -> bool:  # ...and it has rolled the subscribers' day over
        return all(sum(e.kind == "fee" for e in d.admin.ListAudit(apb.ListAuditRequest(
            customer_id=f"sub-{n}", limit=100)).entries) >= 2 for n in range(3))

    wait_until(renewed, "the subscribers' period to roll over")
    stop.set()
    for c in clients + [reserver]:
        c.join(60)
        assert not c.is_alive()
    assert sum(c.retries for c in clients) + reserver.retries > 0  # kills landed while clients waited
    d.restart()
    for c in clients:
        usd, used = _balance(d, c.customer)
        assert used == c.acked_events and usd.balance_nano == GRANT_NANO - COST_NANO * c.acked_events
        assert usd.reserved_nano == 0
    usd, _ = _balance(d, "reserver")
    assert usd.reserved_nano == 0  # no reservation leaked: every one was committed exactly once
    assert usd.balance_nano == GRANT_NANO - reserver.committed * 600 * OUTPUT_NANO_PER_TOKEN
    for n in range(3):
        fees = [e for e in d.admin.ListAudit(apb.ListAuditRequest(customer_id=f"sub-{n}", limit=100)).entries
                if e.kind == "fee"]
        assert len(fees) == 2, fees  # the period it was in, then exactly one renewal
        premium = next(b for b in d.meter.GetBalance(pb.GetBalanceRequest(customer_id=f"sub-{n}")).balances
                       if b.credit_type == "premium_requests")
        assert premium.balance_nano == 100 * 10**9
    assert d.stop() == 0  # a graceful stop flushes the rest to the ledger
    with Ledger("sqlite:///" + str(d.data_dir / "ledger.sqlite3")) as lg:
        for c in clients:
            assert sum(r.events for r in lg.usage_rows(c.customer, 0, 1 << 62)) == c.acked_events
        settled = [r for r in lg.usage_rows("reserver", 0, 1 << 62)]
        assert sum(r.events for r in settled) == reserver.committed
        assert sum(r.quantity for r in settled) == reserver.committed * 600
    print(f"{len(kills)} kills; acked {[c.acked_events for c in clients]}, {reserver.committed} reservations")


def _balance(d, customer: str) -> tuple[pb.CreditBalance, int]:
    resp = d.meter.GetBalance(pb.GetBalanceRequest(customer_id=customer))
    usd = next(b for b in resp.balances if b.credit_type == "usd")
    used = int(next((u.quantity for u in resp.usage if u.meter == "input_tokens"), 0))
    return usd, used
