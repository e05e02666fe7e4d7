"""A first client: report usage, reserve-then-settle, read the balance.

Run `meterd serve` in another terminal first, then: python examples/quickstart.py
"""

from __future__ import annotations

import sys

import grpc

from meterd.v1 import meter_pb2 as pb
from meterd.v1 import meter_pb2_grpc


def main(target: str = "127.0.0.1:50051") -> None:
    with grpc.insecure_channel(target) as channel:
        meter = meter_pb2_grpc.MeterStub(channel)

        # One event: 1,200 prompt tokens of gpt-4o for the demo customer.
        r = meter.Report(pb.ReportRequest(event=pb.UsageEvent(
            customer_id="demo", meter="input_tokens", quantity=1200, dimensions={"model": "gpt-4o"})))
        print("report:", pb.Decision.Name(r.decision), "cost_nano", r.cost_nano, "balance_nano", r.balance_nano)

        # A batch, with (client_id, sequence) so that a retry is never counted twice.
        events = [pb.UsageEvent(customer_id="demo", meter="requests", quantity=1, dimensions={"model": "o3-mini"})
                  for _ in range(3)]
        b = meter.ReportBatch(pb.ReportBatchRequest(client_id="quickstart", sequence=1, events=events))
        print("batch: accepted", b.accepted, "denied", b.denied, "duplicate", b.duplicate)

        # Reserve max_tokens worth before generating, settle the real count after.
        a = meter.Authorize(pb.AuthorizeRequest(customer_id="demo", meter="output_tokens", quantity=4096,
                                                dimensions={"model": "gpt-4o"}))
        if a.decision == pb.DECISION_ALLOW:
            c = meter.Commit(pb.CommitRequest(reservation_id=a.reservation_id, quantity=512))
            print("commit: cost_nano", c.cost_nano, "released_nano", c.released_nano)

        for bal in meter.GetBalance(pb.GetBalanceRequest(customer_id="demo")).balances:
            print(f"balance {bal.credit_type}: {bal.balance_nano / 1e9:.9f} (available {bal.available_nano})")


if __name__ == "__main__":
    main(*sys.argv[1:])
