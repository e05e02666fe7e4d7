"""Monthly statements from the central ledger, for the five reference catalogs and the
hybrid one, checked against figures computed by hand from the catalogs' public prices.

Every scenario runs on a real engine with a test clock anchored at 2026-11-01T00:00:00Z,
so that monthly periods are calendar months: usage in November, the clock moved past
2026-12-01 and the housekeeping timer run (the period rolls: cycle-end overage, usage
billed in arrears and gauges are booked at 2026-11-30T23:59:59.999, the next fee at
2026-12-01), a flush to the ledger, then the November statement. Each test runs on a
SQLite and on a PostgreSQL ledger with the same exact figures.

Money is in nano-units: $1 = 1,000,000,000; a cent is 10,000,000.
"""

from __future__ import annotations

import calendar

import pytest
from billing import NANO, Billing

from meterd.errors import InvalidInput
from meterd.ledger import period_bounds, render_statement
from meterd.v1 import meter_pb2 as pb

# 2026-11-01T00:00:00Z, 2026-12-01T00:00:00Z and 2027-01-01T00:00:00Z in ms.
NOV = 1_793_491_200_000
DEC = 1_796_083_200_000
JAN = 1_798_761_600_000
SECOND = 1000
MINUTE = 60_000
DAY = 86_400_000
CENT = 10_000_000


def test_the_clock_anchors_are_calendar_months():
    assert NOV == calendar.timegm((2026, 11, 1, 0, 0, 0)) * 1000
    assert DEC == calendar.timegm((2026, 12, 1, 0, 0, 0)) * 1000 == NOV + 30 * DAY
    assert JAN == calendar.timegm((2027, 1, 1, 0, 0, 0)) * 1000 == DEC + 31 * DAY
    assert period_bounds("2026-11") == (NOV, DEC) and period_bounds("2026-12") == (DEC, JAN)


@pytest.fixture(params=["compiled", "python"])
def make(request, ledger_url, tmp_path, monkeypatch):
    made: list[Billing] = []

    def build(catalog: str) -> Billing:
        b = Billing(tmp_path, catalog, monkeypatch, core=request.param, start_ms=NOV, ledger=ledger_url)
        made.append(b)
        return b

    yield build
    for b in made:
        b.close()


def goto(b: Billing, at_ms: int) -> None:
    """Move the clock to ``at_ms`` and run the housekeeping timer (periods roll)."""
    assert at_ms >= b.now_ms
    b.advance(at_ms - b.now_ms)
    b.tick()


def section(st: dict, name: str) -> list[dict]:
    return [x for x in st["lines"] if x["section"] == name]


def money(st: dict) -> dict:
    (usd,) = st["totals"]
    assert (usd["credit_type"], usd["currency"], usd["minor_decimals"]) == ("usd", "USD", 2)
    return {k: v for k, v in usd.items() if k not in ("credit_type", "currency", "minor_decimals")}


def totals(fees=0, overage=0, usage=0, applied=0, billed=0, carried_in=0) -> dict:
    """The totals entry from its parts, by the statement's definitions: the exact charge is
    fees + overage + usage billed in arrears; the amount due is what the cumulative charges
    add in whole cents; the rest is carried to the next month."""
    total = fees + overage + billed
    return {"fees_nano": fees, "overage_nano": overage, "usage_nano": usage, "credits_applied_nano": applied,
            "usage_billed_nano": billed, "total_nano": total, "carried_in_nano": carried_in,
            "carried_out_nano": (carried_in + total) % CENT, "due_minor": (carried_in + total) // CENT}


def use(description: str, quantity: str, amount: int, events: int, ct: str = "usd", kind: str = "usage") -> dict:
    return {"section": kind, "description": description, "credit_type": ct, "amount_nano": amount,
            "quantity": quantity, "events": events}


def fee(description: str, amount: int) -> dict:
    return {"section": "fees", "description": description, "credit_type": "usd", "amount_nano": amount}


def tier(n: int, units: int, price: str, charge: int) -> dict:
    return {"tier": n, "units_nano": units, "unit_price": price, "charge_nano": charge}


def overage(description: str, amount: int, tiers: list[dict]) -> dict:
    return {"section": "overage", "description": description, "credit_type": "usd", "amount_nano": amount,
            "tiers": tiers}


# ---- OpenAI: prepaid dollars ------------------------------------------------------------------


def test_openai_prepaid_usage_is_paid_from_credit_and_nothing_is_due(make):
    b = make("openai")  # acme: plan "prepaid" (no fee), a $10 balance granted on first start
    # USD per 1M tokens (input / cached input / output): gpt-4o 2.50 / 1.25 / 10.00, gpt-4o-mini 0.15 / - / -,
    # gpt-4.1 - / - / 8.00, gpt-4.1-mini 0.40 / - / -, o4-mini - / - / 4.40.
    b.report("acme", "input_tokens", 1_000, model="gpt-4o")          # 1,000 x $2.50/1M  = $0.0025
    b.report("acme", "output_tokens", 500, model="gpt-4o")           # 500 x $10.00/1M   = $0.005
    b.flush()  # a flush mid-month: what follows in the same minute is merged into the ledger's rows
    b.report("acme", "input_tokens", 1_000, model="gpt-4o")          # another $0.0025
    b.advance(3 * DAY)
    b.report("acme", "cached_input_tokens", 10_000, model="gpt-4o")  # 10,000 x $1.25/1M = $0.0125
    b.report("acme", "input_tokens", 20_000, model="gpt-4o-mini")    # 20,000 x $0.15/1M = $0.003
    b.report("acme", "output_tokens", 3_333, model="o4-mini")        # 3,333 x $4.40/1M  = $0.0146652
    b.report("acme", "input_tokens", 1, model="gpt-4.1-mini")        # 1 x $0.40/1M      = $0.0000004
    b.advance(5 * DAY + 7 * MINUTE)
    b.report("acme", "output_tokens", 600_000, model="gpt-4o")       # 600,000 x $10/1M  = $6
    # spent so far: 2 x 0.0025 + 0.005 + 0.0125 + 0.003 + 0.0146652 + 0.0000004 + 6 = $6.0401656;
    # the balance, $3.9598344, is below $5: a top-up to $20 is requested, $16.0401656 (paid elsewhere)
    (req,) = b.audit("acme", "auto_topup_requested")
    assert (req.balance_after_nano, req.charge_nano) == (3_959_834_400, 16_040_165_600)
    b.grant("acme", "usd", req.charge_nano, source="topup", priority=10)
    b.advance(10 * DAY)
    b.report("acme", "output_tokens", 100_000, model="gpt-4.1")      # 100,000 x $8/1M = $0.80
    # at zero, OpenAI answers insufficient_quota: nothing more is used, nothing is owed
    assert b.bal("acme", "usd") == 20 * NANO - 800_000_000
    goto(b, DEC + SECOND)
    b.flush()

    st = b.statement("acme", "2026-11")
    assert (st["customer_id"], st["period"], st["from_ms"], st["to_ms"]) == ("acme", "2026-11", NOV, DEC)
    assert section(st, "usage") == [
        use("cached_input_tokens (model=gpt-4o)", "10000", 12_500_000, 1),
        use("input_tokens (model=gpt-4.1-mini)", "1", 400, 1),
        use("input_tokens (model=gpt-4o)", "2000", 5_000_000, 2),  # one minute, two flushes
        use("input_tokens (model=gpt-4o-mini)", "20000", 3_000_000, 1),
        use("output_tokens (model=gpt-4.1)", "100000", 800_000_000, 1),
        use("output_tokens (model=gpt-4o)", "600500", 6_005_000_000, 2),  # $0.005 + $6, two events
        use("output_tokens (model=o4-mini)", "3333", 14_665_200, 1),
    ]
    # all of it, $6.8401656, came out of the prepaid balance; the top-up request is not a charge
    used = 12_500_000 + 400 + 5_000_000 + 3_000_000 + 800_000_000 + 6_005_000_000 + 14_665_200
    assert used == 6_840_165_600
    assert section(st, "credits_applied") == [{"section": "credits_applied", "credit_type": "usd",
                                               "description": "usage paid from prepaid or granted credit",
                                               "amount_nano": -used}]
    assert section(st, "fees") == section(st, "overage") == section(st, "usage_billed") == []
    assert money(st) == totals(usage=used, applied=used)
    assert money(st)["due_minor"] == 0 and money(st)["total_nano"] == 0
    assert "Amount due: USD 0.00" in render_statement(st)
    # nothing happened in December: nothing is owed
    dec = b.statement("acme", "2026-12")
    assert (dec["lines"], dec["totals"]) == ([], [])


# ---- Cursor: premium requests, slow pool, usage-based pricing ---------------------------------


def batch(b: Billing, customer: str, n: int, model: str) -> pb.ReportBatchResponse:
    events = [pb.UsageEvent(customer_id=customer, meter="requests", quantity=1, dimensions={"model": model})
              for _ in range(n)]
    return b.batch(events)


def test_cursor_premium_requests_slow_pool_and_usage_based_overage(make):
    b = make("cursor")  # alice: pro; bob: pro_usage_based; both $20/month with 500 premium requests
    b.subscribe("carol", "pro_usage_based", start_ms=NOV)
    # alice: 499 sonnet (1 each) and 3 haiku (1/3 each) use the 500 exactly; then the slow pool
    assert batch(b, "alice", 499, "claude-3.5-sonnet").accepted == 499
    for _ in range(3):
        b.report("alice", "requests", 1, model="claude-3.5-haiku")
    assert b.bal("alice", "requests") == 0
    r = b.report("alice", "requests", 1, model="o1")  # 10 requests' worth, but queued: free
    assert (r.decision, r.mode) == (pb.DECISION_DEGRADE, "slow")
    b.report("alice", "requests", 2, model="cursor-small")  # a free model
    # bob: 1,000 gpt-4o; the 500 past the pool at $0.04 reach the $20 threshold: invoiced at once,
    # and $20 is also the spend limit: request 1,001 goes to the slow pool
    b.advance(2 * DAY)
    assert batch(b, "bob", 1000, "gpt-4o").degraded == 0
    assert b.report("bob", "requests", 1, model="gpt-4o").decision == pb.DECISION_DEGRADE
    # carol: 510 sonnet and 2 haiku: 10 + 0.333333333 + 0.333333333 (the third's extra nano would come
    # with a third haiku) = 10.666666666 requests past the pool, billed at the end of the month
    b.advance(20 * DAY)
    batch(b, "carol", 510, "claude-3.5-sonnet")
    b.report("carol", "requests", 1, model="claude-3.5-haiku")
    b.report("carol", "requests", 1, model="claude-3.5-haiku")
    assert b.bal("carol", "requests") == -10_666_666_666
    goto(b, DEC + SECOND)
    b.flush()

    alice = b.statement("alice", "2026-11")
    assert section(alice, "fees") == [fee("pro period 0", 20 * NANO)]
    assert section(alice, "credits_used") == [
        use("requests (model=claude-3.5-haiku)", "3", NANO, 3, "requests", "credits_used"),  # 3 x 1/3
        use("requests (model=claude-3.5-sonnet)", "499", 499 * NANO, 499, "requests", "credits_used"),
        use("requests (model=cursor-small)", "2", 0, 1, "requests", "credits_used"),
        use("requests (model=o1)", "1", 0, 1, "requests", "credits_used"),  # the slow pool costs nothing
    ]
    assert section(alice, "overage") == section(alice, "usage") == section(alice, "credits_applied") == []
    assert money(alice) == totals(fees=20 * NANO)  # $20.00 due

    bob = b.statement("bob", "2026-11")
    assert section(bob, "fees") == [fee("pro_usage_based period 0", 20 * NANO)]
    # 500 requests x $0.04 = $20.00, billed when it accrued ("threshold"), nothing more at the end
    assert section(bob, "overage") == [overage("500 requests over the included amount (threshold)", 20 * NANO,
                                               [tier(1, 500 * NANO, "0.04", 20 * NANO)])]
    assert section(bob, "credits_used") == [
        use("requests (model=gpt-4o)", "1001", 1000 * NANO, 1001, "requests", "credits_used")]
    assert money(bob) == totals(fees=20 * NANO, overage=20 * NANO)
    assert money(bob)["due_minor"] == 4000  # $40.00

    carol = b.statement("carol", "2026-11")
    # 10.666666666 requests x $0.04 = $0.42666666664, rounded up to the nano: $0.426666667
    assert section(carol, "overage") == [overage("10.666666666 requests over the included amount (cycle end)",
                                                 426_666_667, [tier(1, 10_666_666_666, "0.04", 426_666_667)])]
    assert section(carol, "credits_used") == [
        use("requests (model=claude-3.5-haiku)", "2", 666_666_666, 2, "requests", "credits_used"),
        use("requests (model=claude-3.5-sonnet)", "510", 510 * NANO, 510, "requests", "credits_used"),
    ]
    # $20.426666667: 2,042 cents due, 0.6666667 of a cent carried to December
    assert money(carol) == totals(fees=20 * NANO, overage=426_666_667)
    assert (money(carol)["due_minor"], money(carol)["carried_out_nano"]) == (2042, 6_666_667)

    dec = b.statement("carol", "2026-12")
    # December: the next period's fee, and the carried 0.6666667 cent, still under a cent
    assert dec["lines"] == [fee("pro_usage_based period 1", 20 * NANO)]
    assert money(dec) == totals(fees=20 * NANO, carried_in=6_666_667)
    assert (money(dec)["due_minor"], money(dec)["carried_out_nano"]) == (2000, 6_666_667)


# ---- ElevenLabs: character credits, rollover, overage -----------------------------------------


def test_elevenlabs_rollover_then_overage_at_the_end_of_the_next_month(make):
    b = make("elevenlabs")  # studio: Creator, $22/month, 100,000 credits, $0.30 per 1,000 over
    b.report("studio", "characters", 140_000, model="eleven_flash_v2_5")  # Flash: 0.5 credit/char = 70,000
    goto(b, DEC + SECOND)
    # 30,000 unused credits roll over (within 2x the quota, the balance within 3x): 130,000 for December
    assert b.bal("studio", "credits") == 130_000 * NANO
    b.report("studio", "characters", 100_000, model="eleven_v3")               # 100,000 credits
    b.advance(9 * DAY)
    b.report("studio", "characters", 60_001, model="eleven_flash_v2_5")        # 30,000.5 credits
    b.report("studio", "characters", 10_000, model="eleven_multilingual_v2")   # 10,000 credits
    # 140,000.5 used against 130,000: 10,000.5 credits over, billed at the end of December
    goto(b, JAN + SECOND)
    b.flush()

    nov = b.statement("studio", "2026-11")
    assert nov["lines"] == [
        fee("creator period 0", 22 * NANO),
        use("characters (model=eleven_flash_v2_5)", "140000", 70_000 * NANO, 1, "credits", "credits_used"),
    ]
    assert money(nov) == totals(fees=22 * NANO)

    dec = b.statement("studio", "2026-12")
    assert section(dec, "fees") == [fee("creator period 1", 22 * NANO)]
    # 10,000.5 credits x $0.30/1,000 = $3.00015
    assert section(dec, "overage") == [overage("10000.5 credits over the included amount (cycle end)",
                                               3_000_150_000, [tier(1, 10_000_500_000_000, "0.0003", 3_000_150_000)])]
    assert section(dec, "credits_used") == [
        use("characters (model=eleven_flash_v2_5)", "60001", 30_000_500_000_000, 1, "credits", "credits_used"),
        use("characters (model=eleven_multilingual_v2)", "10000", 10_000 * NANO, 1, "credits", "credits_used"),
        use("characters (model=eleven_v3)", "100000", 100_000 * NANO, 1, "credits", "credits_used"),
    ]
    # $25.00015: 2,500 cents due, 0.015 of a cent carried into January
    assert money(dec) == totals(fees=22 * NANO, overage=3_000_150_000)
    assert (money(dec)["due_minor"], money(dec)["carried_out_nano"]) == (2500, 150_000)
    jan = b.statement("studio", "2027-01")
    assert jan["lines"] == [fee("creator period 2", 22 * NANO)]
    assert money(jan) == totals(fees=22 * NANO, carried_in=150_000)
    assert money(jan)["due_minor"] == 2200


def test_elevenlabs_overage_billed_early_then_at_the_end_of_the_month(make):
    b = make("elevenlabs")
    b.subscribe("voiceco", "creator", start_ms=NOV)
    b.report("voiceco", "characters", 100_000, model="eleven_v3")  # the month's 100,000 credits
    # $44 (2x the plan price) at $0.30/1,000 is 146,666.67 credits: 146,666 over is not yet there
    b.report("voiceco", "characters", 146_666, model="eleven_v3")
    assert b.audit("voiceco", "overage_charged") == []
    b.report("voiceco", "characters", 1, model="eleven_v3")  # 146,667 over x $0.0003 = $44.0001, billed now
    b.advance(12 * DAY)
    b.report("voiceco", "characters", 20_001, model="eleven_flash_v2_5")  # 10,000.5 credits over
    goto(b, DEC + SECOND)
    b.flush()

    st = b.statement("voiceco", "2026-11")
    assert section(st, "fees") == [fee("creator period 0", 22 * NANO)]
    # the end-of-month bill continues from the early one: 156,667.5 credits in all cost $47.00025,
    # of which $44.0001 was billed early: $3.00015 at the end
    assert section(st, "overage") == [
        overage("146667 credits over the included amount (threshold)", 44_000_100_000,
                [tier(1, 146_667 * NANO, "0.0003", 44_000_100_000)]),
        overage("10000.5 credits over the included amount (cycle end)", 3_000_150_000,
                [tier(1, 10_000_500_000_000, "0.0003", 3_000_150_000)]),
    ]
    assert section(st, "credits_used") == [
        use("characters (model=eleven_flash_v2_5)", "20001", 10_000_500_000_000, 1, "credits", "credits_used"),
        use("characters (model=eleven_v3)", "246667", 246_667 * NANO, 3, "credits", "credits_used"),
    ]
    # $22 + $47.00025 = $69.00025: 6,900 cents due, 0.025 of a cent carried
    assert money(st) == totals(fees=22 * NANO, overage=47_000_250_000)
    assert (money(st)["due_minor"], money(st)["carried_out_nano"]) == (6900, 250_000)


def test_elevenlabs_upgrade_mid_month_pays_the_fee_difference_for_the_time_left(make):
    b = make("elevenlabs")
    b.subscribe("dubber", "creator", start_ms=NOV)
    b.report("dubber", "characters", 90_000, model="eleven_v3")
    goto(b, NOV + 15 * DAY)  # half of November's 30 days are left
    b.change_plan("dubber", "pro")
    # Pro is $99, Creator $22: $77 x 15/30 = $38.50 now; 400,000 more credits x 15/30 = 200,000
    assert b.bal("dubber", "credits") == 10_000 * NANO + 200_000 * NANO
    b.report("dubber", "characters", 220_000, model="eleven_v3")  # 10,000 over, at Pro's $0.24/1,000
    goto(b, DEC + SECOND)
    b.flush()

    st = b.statement("dubber", "2026-11")
    assert section(st, "fees") == [fee("creator period 0", 22 * NANO), fee("pro upgrade proration", 38_500_000_000)]
    assert section(st, "overage") == [overage("10000 credits over the included amount (cycle end)", 2_400_000_000,
                                              [tier(1, 10_000 * NANO, "0.00024", 2_400_000_000)])]
    assert section(st, "credits_used") == [
        use("characters (model=eleven_v3)", "310000", 310_000 * NANO, 2, "credits", "credits_used")]
    # $22 + $38.50 + $2.40 = $62.90
    assert money(st) == totals(fees=60_500_000_000, overage=2_400_000_000)
    assert money(st)["due_minor"] == 6290
    dec = b.statement("dubber", "2026-12")
    assert dec["lines"] == [fee("pro period 1", 99 * NANO)]
    assert money(dec)["due_minor"] == 9900


# ---- Midjourney: fast hours, then Relax ---------------------------------------------------------


def test_midjourney_subscription_fee_only_and_relax_costs_nothing(make):
    b = make("midjourney")  # painter: Standard, $30, 15 fast hours (54,000 s); sketcher: Basic, $10, 200 min
    b.report("painter", "gpu_seconds", "60", job="turbo")    # 2x: 120 fast seconds
    b.report("painter", "gpu_seconds", "30", job="video")    # 8x: 240
    b.report("painter", "gpu_seconds", "10", job="draft")    # 1/2: 5
    b.report("painter", "gpu_seconds", "53635", job="image")  # the rest of the 54,000
    assert b.bal("painter", "fast_seconds") == 0
    b.advance(4 * DAY)
    for _ in range(3):  # Relax: queued, not charged
        r = b.report("painter", "gpu_seconds", "600", job="image")
        assert (r.decision, r.mode, r.cost_nano) == (pb.DECISION_DEGRADE, "relax", 0)
    b.report("sketcher", "gpu_seconds", "12000", job="image")  # Basic's 200 minutes
    assert b.report("sketcher", "gpu_seconds", "20", job="image").decision == pb.DECISION_DENY  # no Relax
    b.grant("sketcher", "fast_seconds", 3600 * NANO, source="extra-fast-hour")  # $4, paid elsewhere
    b.report("sketcher", "gpu_seconds", "20.5", job="image")
    goto(b, DEC + SECOND)
    b.flush()

    st = b.statement("painter", "2026-11")
    assert section(st, "fees") == [fee("standard period 0", 30 * NANO)]
    cu = "credits_used"
    assert section(st, "credits_used") == [
        use("gpu_seconds (job=draft)", "10.000", 5 * NANO, 1, "fast_seconds", cu),
        use("gpu_seconds (job=image)", "55435.000", 53_635 * NANO, 4, "fast_seconds", cu),  # 53,635 + 3 x 600 relax
        use("gpu_seconds (job=turbo)", "60.000", 120 * NANO, 1, "fast_seconds", cu),
        use("gpu_seconds (job=video)", "30.000", 240 * NANO, 1, "fast_seconds", cu),
    ]
    assert [x["section"] for x in st["lines"]] == ["fees"] + [cu] * 4
    assert money(st) == totals(fees=30 * NANO)
    assert money(st)["due_minor"] == 3000  # $30.00: the fee and nothing else

    sk = b.statement("sketcher", "2026-11")
    assert sk["lines"] == [fee("basic period 0", 10 * NANO),
                           use("gpu_seconds (job=image)", "12020.500", 12_020_500_000_000, 2, "fast_seconds", cu)]
    assert money(sk) == totals(fees=10 * NANO)

    dec = b.statement("painter", "2026-12")
    assert dec["lines"] == [fee("standard period 1", 30 * NANO)]
    assert money(dec) == totals(fees=30 * NANO)


# ---- Replicate: per second, in arrears or prepaid -----------------------------------------------


def test_replicate_per_second_usage_billed_in_arrears_with_sub_cent_carry(make):
    b = make("replicate")  # lab: in arrears; hobbyist: $5 prepaid
    b.subscribe("startup", "arrears", start_ms=NOV)
    b.grant("startup", "usd", NANO, source="promo")  # $1 of promotional credit
    # USD per second: cpu 0.0001, T4 0.000225, L40S 0.000975, A100 0.0014, H100 0.001525, 8x H100 0.0122
    b.report("lab", "gpu_seconds", "1000.5", hardware="nvidia-h100")    # x 0.001525 = $1.5257625
    b.advance(DAY)
    b.report("lab", "gpu_seconds", "3600", hardware="8x-nvidia-h100")   # x 0.0122   = $43.92
    b.report("lab", "gpu_seconds", "123.457", hardware="nvidia-t4")     # x 0.000225 = $0.027777825
    b.advance(DAY)
    s = b.start_session("lab", "gpu_seconds", hardware="nvidia-l40s")   # meterd keeps the time
    b.advance(20_000)
    b.heartbeat(s.session_id)
    b.advance(25_250)
    assert b.end_session(s.session_id).billed_quantity == "45.250"      # x 0.000975 = $0.04411875
    b.report("hobbyist", "gpu_seconds", "3571.428", hardware="nvidia-a100-80gb")  # x 0.0014 = $4.9999992
    assert b.report("hobbyist", "gpu_seconds", "1", hardware="nvidia-a100-80gb").decision == pb.DECISION_DENY
    b.report("startup", "gpu_seconds", "2000", hardware="nvidia-l40s")  # x 0.000975 = $1.95, $1 of it promo
    goto(b, DEC + SECOND)
    b.report("lab", "gpu_seconds", "30", hardware="cpu")                # December: x 0.0001 = $0.003
    b.report("lab", "gpu_seconds", "1", hardware="nvidia-h100")         # and $0.001525
    goto(b, JAN + SECOND)
    b.flush()

    st = b.statement("lab", "2026-11")
    usage = [
        use("gpu_seconds (hardware=8x-nvidia-h100)", "3600.000", 43_920_000_000, 1),
        use("gpu_seconds (hardware=nvidia-h100)", "1000.500", 1_525_762_500, 1),
        use("gpu_seconds (hardware=nvidia-l40s)", "45.250", 44_118_750, 2),  # a heartbeat and the end
        use("gpu_seconds (hardware=nvidia-t4)", "123.457", 27_777_825, 1),
    ]
    assert section(st, "usage") == usage
    # 43.92 + 1.5257625 + 0.04411875 + 0.027777825 = $45.517659075, all of it billed in arrears
    nov_total = 45_517_659_075
    assert sum(x["amount_nano"] for x in usage) == nov_total
    assert section(st, "usage_billed") == [{"section": "usage_billed", "description": "usage billed in arrears "
                                            "(period 0)", "credit_type": "usd", "amount_nano": nov_total}]
    assert section(st, "fees") == section(st, "credits_applied") == []
    assert money(st) == totals(usage=nov_total, billed=nov_total)
    # 4,551 cents due; 0.7659075 of a cent carried
    assert (money(st)["due_minor"], money(st)["carried_out_nano"]) == (4551, 7_659_075)
    assert "Amount due: USD 45.51" in render_statement(st)

    dec = b.statement("lab", "2026-12")
    assert section(dec, "usage") == [use("gpu_seconds (hardware=cpu)", "30.000", 3_000_000, 1),
                                     use("gpu_seconds (hardware=nvidia-h100)", "1.000", 1_525_000, 1)]
    # $0.004525 billed, less than a cent; with the 0.7659075 cent carried in it makes 1.2184075:
    # one cent due, 0.2184075 carried on
    assert money(dec) == totals(usage=4_525_000, billed=4_525_000, carried_in=7_659_075)
    assert (money(dec)["due_minor"], money(dec)["carried_out_nano"]) == (1, 2_184_075)

    hob = b.statement("hobbyist", "2026-11")
    assert section(hob, "usage") == [use("gpu_seconds (hardware=nvidia-a100-80gb)", "3571.428", 4_999_999_200, 1)]
    assert money(hob) == totals(usage=4_999_999_200, applied=4_999_999_200)  # prepaid: nothing due

    su = b.statement("startup", "2026-11")
    # $1.95 of usage: $1 from the promotional credit, $0.95 billed in arrears
    assert section(su, "usage_billed")[0]["amount_nano"] == 950_000_000
    assert section(su, "credits_applied")[0]["amount_nano"] == -NANO
    assert money(su) == totals(usage=1_950_000_000, applied=NANO, billed=950_000_000)
    assert money(su)["due_minor"] == 95


# ---- Hybrid: fee, included credits, gauges, graduated overage -----------------------------------


def test_hybrid_fee_gauges_and_graduated_overage(make):
    b = make("hybrid")  # acme: team, $49/month, $10 and 1,000 requests included, the first GPU hour free
    b.report("acme", "gpu_seconds", "3600.5", hardware="nvidia-l40s")  # 0.5 s past the free hour x $0.000975
    b.report("acme", "output_tokens", 16_000_000, model="gpt-4o")      # 16M x $10/1M   = $160
    b.advance(DAY)
    b.report("acme", "input_tokens", 1_000_000, model="gpt-4o-mini")   # 1M x $0.15/1M  = $0.15
    for seats in (3, 7, 5):                                             # the most: 7 x $8 = $56
        b.report("acme", "seats", seats)
    for user in ("ann", "bob", "ann", "cy", "dee"):                     # 4 distinct x $2 = $8
        b.report("acme", "active_users", 0, user=user)
    b.batch([pb.UsageEvent(customer_id="acme", meter="requests", quantity=1, dimensions={"model": "o1"})
             for _ in range(100)])                                      # 100 x 10 = the 1,000 included
    assert b.report("acme", "requests", 1, model="claude-3.5-haiku").decision == pb.DECISION_DEGRADE
    goto(b, DEC + SECOND)
    b.flush()

    st = b.statement("acme", "2026-11")
    assert section(st, "fees") == [fee("team period 0", 49 * NANO)]
    # dollars used: 0.0004875 + 160 + 0.15 + 56 + 8 = $224.1504875; $10 included: $214.1504875 over.
    # Tiers: the first $100 at 1.00 = $100, the other $114.1504875 at 0.90 = $102.73543875
    assert section(st, "overage") == [
        overage("214.1504875 usd over the included amount (cycle end)", 202_735_438_750,
                [tier(1, 100 * NANO, "1", 100 * NANO), tier(2, 114_150_487_500, "0.9", 102_735_438_750)])]
    usage = section(st, "usage")
    assert [x for x in usage if x["quantity"] and x["amount_nano"]] == [
        use("gpu_seconds (hardware=nvidia-l40s)", "3600.500", 487_500, 1),
        use("input_tokens (model=gpt-4o-mini)", "1000000", 150_000_000, 1),
        use("output_tokens (model=gpt-4o)", "16000000", 160 * NANO, 1),
    ]
    gauges = [(x["description"], x["amount_nano"]) for x in usage if "=" in x["description"].split(" ")[0]]
    assert gauges == [("seats=7", 56 * NANO), ("active_users=4", 8 * NANO)]
    # A max meter's usage line shows the period's largest value; distinct counts do not add up across windows.
    assert [(x["description"], x["quantity"]) for x in usage if x["description"] == "seats"] == [("seats", "7")]
    assert {x["quantity"] for x in usage if x["description"].startswith("active_users (")} == {""}
    assert sum(x["amount_nano"] for x in usage) == 224_150_487_500  # gauge meters' own rows cost nothing
    assert section(st, "credits_used") == [
        use("requests (model=claude-3.5-haiku)", "1", 0, 1, "requests", "credits_used"),  # slow: free
        use("requests (model=o1)", "100", 1000 * NANO, 100, "requests", "credits_used"),
    ]
    # the $10 included paid for the rest
    assert section(st, "credits_applied")[0]["amount_nano"] == -10 * NANO
    # $49 + $202.73543875 = $251.73543875: 25,173 cents due, 0.543875 of a cent carried
    assert money(st) == totals(fees=49 * NANO, overage=202_735_438_750, usage=224_150_487_500, applied=10 * NANO)
    assert (money(st)["due_minor"], money(st)["carried_out_nano"]) == (25173, 5_438_750)
    dec = b.statement("acme", "2026-12")
    assert dec["lines"] == [fee("team period 1", 49 * NANO)]
    assert money(dec) == totals(fees=49 * NANO, carried_in=5_438_750)
    assert money(dec)["due_minor"] == 4900


# ---- statements per billing period: balances from opening to closing, and the period's activity ----

PERIODS = """
[credit_types.usd]
kind = "fiat"
currency = "USD"

[credit_types.req]
kind = "custom"

[meters.calls]
credit_type = "req"
price = "1"

[plans.pro]
period = "month"
fee = { usd = "20.00" }
free = { calls = "10" }

[plans.pro.credits.req]
included = "100"
rollover = { max_percent = 50 }
fallback = "slow"

[customers.ann]
plan = "pro"
"""


def activity(st: dict, name: str) -> list[tuple[str, int, str]]:
    return [(x["description"], x["amount_nano"], x.get("quantity", "")) for x in st["activity"]
            if x["section"] == name]


def test_a_statement_per_billing_period_takes_each_balance_from_its_opening_to_its_closing(make, tmp_path):
    (tmp_path / "periods.toml").write_text(PERIODS)
    b = make(str(tmp_path / "periods.toml"))  # ann on pro from 2026-11-01: 100 req a month, the first 10 calls free
    for _ in range(12):
        b.report("ann", "calls", 1)  # 10 free, 2 req
    b.grant("ann", "req", 30 * NANO, source="topup")
    for _ in range(60):
        b.report("ann", "calls", 1)  # 60 req: 38 of the included 100 are left, and the top-up's 30
    goto(b, DEC)  # half of the 38 rolls over, half is forfeited; 100 more are included
    assert b.bal("ann", "req") == (30 + 19 + 100) * NANO
    served = [b.report("ann", "calls", 1).decision for _ in range(170)]
    assert served.count(pb.DECISION_ALLOW) == 10 + 149 and served.count(pb.DECISION_DEGRADE) == 11
    assert activity(b.statement("ann", "2026-11"), "free_units") == [("calls: 10 of 10 free", 0, "10")]  # no more
    running = b.statement("ann", "billing")  # December, still running: its free units and slow usage so far
    assert activity(running, "free_units") == [("calls: 10 of 10 free (this period so far)", 0, "10")]
    assert activity(running, "degraded") == [("req served in slow mode, not charged (this period so far)",
                                              11 * NANO, "")]
    goto(b, JAN)
    b.flush()

    nov, dec = b.statement("ann", "billing-2"), b.statement("ann", "billing-1")
    assert (nov["label"], nov["from_ms"], nov["to_ms"]) == ("pro period 0", NOV, DEC)
    assert (dec["label"], dec["from_ms"], dec["to_ms"]) == ("pro period 1", DEC, JAN)
    assert b.statement("ann", "billing")["label"] == "pro period 2"
    (req,) = [x for x in nov["balances"] if x["credit_type"] == "req"]
    assert {k: v // NANO for k, v in req.items() if k != "credit_type" and v} == {
        "included_nano": 100, "granted_nano": 30, "used_nano": -62, "forfeited_nano": -19, "closing_nano": 49,
        "rolled_over_nano": 19}
    assert req["opening_nano"] == 0
    (req,) = [x for x in dec["balances"] if x["credit_type"] == "req"]
    assert {k: v // NANO for k, v in req.items() if k != "credit_type" and v} == {
        "opening_nano": 49, "included_nano": 100, "used_nano": -149}
    assert req["closing_nano"] == 0 == b.engine.core.state(0)[0][1][0] - 100 * NANO  # January's 100 aside
    assert [d for d, _, _ in activity(nov, "grants")][1] == "grant (g_2 topup)"
    assert [a for _, a, _ in activity(nov, "grants")] == [100 * NANO, 30 * NANO]
    assert [(a, d.split(" (")[0]) for d, a, _ in activity(nov, "rollovers")] == [(-19 * NANO, "forfeited"),
                                                                                (19 * NANO, "rolled over")]
    assert activity(nov, "free_units") == [("calls: 10 of 10 free", 0, "10")]
    assert activity(dec, "free_units") == [("calls: 10 of 10 free", 0, "10")]
    assert activity(dec, "degraded") == [("req served in slow mode, not charged", 11 * NANO, "")]
    assert activity(nov, "degraded") == []
    # The month and the same range read alike; a statement in the calendar month is the same period here.
    month = b.statement("ann", "2026-11")
    assert b.statement("ann", "2026-11-01..2026-12-01")["balances"] == month["balances"] == nov["balances"]
    text = render_statement(nov)
    assert "Statement for ann, pro period 0" in text and "closing balance" in text and "Free units" in text


@pytest.mark.parametrize("period, words", [
    ("billing-7", "the ledger has 3 billing periods of customer 'ann'"),
    ("2026-12-01..2026-11-01", "the range must end after it starts"),
    ("2026-11-01..soon", "is not a month like 2026-11, a range like"),
    ("billing-1001", "at most billing-1000"),
    ("billing-", "is not a month like 2026-11"),
])
def test_a_statement_period_that_is_not_one_is_refused_naming_it(make, tmp_path, period, words):
    (tmp_path / "periods.toml").write_text(PERIODS)
    b = make(str(tmp_path / "periods.toml"))
    goto(b, JAN)
    with pytest.raises(InvalidInput) as e:
        b.statement("ann", period)
    assert e.value.field == "period" and words in str(e.value), str(e.value)
