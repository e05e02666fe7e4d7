"""SIGKILL a loaded daemon again and again: nothing acknowledged is lost or counted twice."""

from __future__ import annotations

import os
import random
import threading
import time

import grpc

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc

KILLS = 50 if os.environ.get("METERD_SOAK") else 6
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
        time.sleep(rng.uniform(0.2, 0.8))
        d.kill()
        d.start()  # must open LMDB cleanly and replay its log every time
    time.sleep(0.5)
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
