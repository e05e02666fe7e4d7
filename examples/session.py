"""A session of calls against one example catalog, printing each decision.

    meterd serve --config examples/cursor.toml      # in one terminal
    python examples/session.py cursor                # in another

The README shows the output of each. Amounts are exact: nano-units of the
credit type, shown as decimals.
"""

from __future__ import annotations

import sys
import time
from decimal import Decimal

import grpc

from meterd.v1 import admin_pb2 as apb
from meterd.v1 import admin_pb2_grpc, meter_pb2_grpc
from meterd.v1 import meter_pb2 as pb


def amount(nano: int) -> str:
    return format((Decimal(nano) / 10**9).normalize(), "f") if nano else "0"


class Session:
    def __init__(self, target: str, admin_target: str, admin_token_file: str) -> None:
        self.meter = meter_pb2_grpc.MeterStub(grpc.insecure_channel(target))
        self.admin = admin_pb2_grpc.AdminStub(grpc.insecure_channel(admin_target))
        # Admin always needs a token: by default the one meterd keeps in its data directory.
        with open(admin_token_file) as f:
            self.admin_auth = [("authorization", "Bearer " + f.read().strip())]

    def report(self, customer: str, meter: str, quantity: int | str, quiet: bool = False,
               **dims: str) -> pb.ReportResponse:
        event = pb.UsageEvent(customer_id=customer, meter=meter, dimensions=dims)
        if isinstance(quantity, str):
            event.quantity_decimal = quantity
        else:
            event.quantity = quantity
        r = self.meter.Report(pb.ReportRequest(event=event))
        if not quiet:
            dim = " ".join(f"{k}={v}" for k, v in dims.items())
            line = f"Report {customer} {meter}={quantity} {dim} -> {pb.Decision.Name(r.decision)[9:]}"
            if r.decision == pb.DECISION_DENY:
                line += f" {pb.Reason.Name(r.reason)[7:]}"
            elif r.decision == pb.DECISION_DEGRADE:
                line += f" mode={r.mode} priority={r.priority}"
            else:
                line += f" cost={amount(r.cost_nano)} {r.credit_type}"
            print(line + f", balance {amount(r.balance_nano)} {r.credit_type}")
        return r

    def batch(self, customer: str, meter: str, n: int, **dims: str) -> pb.ReportBatchResponse:
        events = [pb.UsageEvent(customer_id=customer, meter=meter, quantity=1, dimensions=dims)] * n
        r = self.meter.ReportBatch(pb.ReportBatchRequest(events=events))
        print(f"ReportBatch {n} x {customer} {meter}=1 {' '.join(f'{k}={v}' for k, v in dims.items())} -> "
              f"accepted {r.accepted}, degraded {r.degraded}, denied {r.denied}")
        return r

    def audit(self, customer: str, kind: str) -> None:
        for e in self.admin.ListAudit(apb.ListAuditRequest(customer_id=customer, limit=1000),
                                      metadata=self.admin_auth).entries:
            if e.kind == kind:
                what = f"{amount(e.amount_nano)} {e.credit_type}" if e.amount_nano else ""
                money = f"{amount(e.charge_nano)} {e.charge_credit_type}" if e.charge_nano else ""
                print(f"  audit {e.kind}: {', '.join(x for x in (what, money) if x)} ({e.reference})")


def openai(s: Session) -> None:
    s.report("acme", "input_tokens", 1000, model="gpt-4o")
    s.report("acme", "output_tokens", 500, model="gpt-4o")
    s.report("acme", "output_tokens", 600_000, model="gpt-4o")  # $6: below the $5 threshold
    s.audit("acme", "auto_topup_requested")
    s.report("acme", "output_tokens", 399_250, model="gpt-4o")  # exactly what is left
    s.report("acme", "input_tokens", 1, model="gpt-4o-mini")


def cursor(s: Session) -> None:
    s.batch("alice", "requests", 499, model="claude-3.5-sonnet")
    for _ in range(3):
        s.report("alice", "requests", 1, model="claude-3.5-haiku")
    s.report("alice", "requests", 1, model="o1")
    s.report("alice", "requests", 1, model="cursor-small")
    s.batch("bob", "requests", 1000, model="gpt-4o")
    s.audit("bob", "overage_charged")
    s.report("bob", "requests", 1, model="gpt-4o")


def elevenlabs(s: Session) -> None:
    s.report("studio", "characters", 140_000, model="eleven_flash_v2_5")
    s.report("studio", "characters", 30_000, model="eleven_multilingual_v2")
    s.report("studio", "characters", 40_000, model="eleven_v3")  # into overage (Creator allows it)
    s.audit("studio", "included")


def midjourney(s: Session) -> None:
    s.report("painter", "gpu_seconds", "60", job="turbo")
    s.report("painter", "gpu_seconds", "30", job="video")
    s.report("painter", "gpu_seconds", "53640", job="image")
    for _ in range(3):
        s.report("painter", "gpu_seconds", "600", job="image")
    s.report("sketcher", "gpu_seconds", "12000", job="image")
    s.report("sketcher", "gpu_seconds", "20", job="image")
    s.admin.Grant(apb.GrantRequest(customer_id="sketcher", credit_type="fast_seconds", amount_nano=3600 * 10**9,
                                   source="extra fast hour, $4"), metadata=s.admin_auth)
    print("Grant sketcher 3600 fast_seconds (an extra fast hour)")
    s.report("sketcher", "gpu_seconds", "20", job="image")


def replicate(s: Session) -> None:
    s.report("lab", "gpu_seconds", "3600", hardware="8x-nvidia-h100")
    s.report("hobbyist", "gpu_seconds", "3571.428", hardware="nvidia-a100-80gb")
    s.report("hobbyist", "gpu_seconds", "1", hardware="nvidia-a100-80gb")
    r = s.meter.StartSession(pb.StartSessionRequest(customer_id="lab", meter="gpu_seconds",
                                                    dimensions={"hardware": "nvidia-h100"}))
    print(f"StartSession lab gpu_seconds hardware=nvidia-h100 -> {pb.Decision.Name(r.decision)[9:]}")
    time.sleep(1.0)
    r = s.meter.EndSession(pb.EndSessionRequest(session_id=r.session_id))
    print(f"EndSession after about a second -> billed {r.billed_quantity} s, cost {amount(r.cost_nano)} usd")


def hybrid(s: Session) -> None:
    s.report("acme", "gpu_seconds", "3600.5", hardware="nvidia-l40s")  # the first hour is free
    s.report("acme", "output_tokens", 1_000_000, model="gpt-4o")
    s.report("acme", "input_tokens", 1_000_000, model="gpt-4o")  # past the $10 included: overage
    s.report("acme", "seats", 12)
    s.batch("acme", "requests", 100, model="o1")
    s.report("acme", "requests", 1, model="claude-3.5-haiku")


SESSIONS = {f.__name__: f for f in (openai, cursor, elevenlabs, midjourney, replicate, hybrid)}


def main(name: str, target: str = "127.0.0.1:50051", data_dir: str = "") -> None:
    data_dir = data_dir or f"./meterd-data/{name}"
    SESSIONS[name](Session(target, f"unix:{data_dir}/admin.sock", f"{data_dir}/admin.token"))


if __name__ == "__main__":
    main(*sys.argv[1:])
