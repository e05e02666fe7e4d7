"""The five billing models and a hybrid, from the example catalogs, with exact
amounts from the published prices; period boundaries crossed on a test clock."""

from __future__ import annotations

import pytest
from billing import DAY_MS, NANO, START_MS, Billing

from meterd.v1 import meter_pb2 as pb


@pytest.fixture(params=["compiled", "python"])
def make(request, tmp_path, monkeypatch):
    made = []

    def build(catalog: str) -> Billing:
        b = Billing(tmp_path, catalog, monkeypatch, core=request.param)
        made.append(b)
        return b

    yield build
    for b in made:
        b.close()


def test_openai_prepaid_dollars(make):
    b = make("openai")
    # 1,000 input plus 500 output tokens of gpt-4o cost exactly $0.0075
    cost = b.report("acme", "input_tokens", 1000, model="gpt-4o").cost_nano
    cost += b.report("acme", "output_tokens", 500, model="gpt-4o").cost_nano
    assert cost == 7_500_000
    assert b.bal("acme", "usd") == 10 * NANO - 7_500_000
    # promotional credit is spent before paid credit, and expires after a year
    promo = b.grant("acme", "usd", NANO, priority=0, source="promo", expires_at_ms=START_MS + 365 * DAY_MS)
    b.report("acme", "output_tokens", 50_000, model="gpt-4o")  # $0.50
    grants = {g.grant_id: g.remaining_nano for g in b.balance("acme").balances[0].grants}
    assert grants[promo.grant_id] == NANO // 2
    # below $5: one automatic top-up request, for what restores $20
    b.report("acme", "output_tokens", 600_000, model="gpt-4o")  # $6.00
    b.report("acme", "output_tokens", 1_000, model="gpt-4o")
    requests = b.audit("acme", "auto_topup_requested")
    assert len(requests) == 1
    assert requests[0].charge_nano == 20 * NANO - requests[0].balance_after_nano
    assert requests[0].charge_credit_type == "usd"
    # the top-up arrives (outside meterd) and re-arms the request
    b.grant("acme", "usd", requests[0].charge_nano, source="topup", priority=10)
    b.report("acme", "output_tokens", 1_600_000, model="gpt-4o")  # $16.00
    assert len(b.audit("acme", "auto_topup_requested")) == 2
    # at zero balance: denied, insufficient balance (OpenAI's insufficient_quota)
    b.report("acme", "output_tokens", int(b.bal("acme", "usd") // 10_000), model="gpt-4o")
    r = b.report("acme", "output_tokens", 1, model="gpt-4o")
    assert (r.decision, r.reason, b.bal("acme", "usd")) == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE, 0)
    b.check_conservation("acme")


def test_cursor_premium_requests_slow_pool_and_usage_based_overage(make):
    b = make("cursor")
    # model weights: 499 sonnet requests and three haiku requests (1/3 each) use exactly 500
    for _ in range(499):
        b.report("alice", "requests", 1, model="claude-3.5-sonnet")
    for _ in range(3):
        assert b.report("alice", "requests", 1, model="claude-3.5-haiku").decision == pb.DECISION_ALLOW
    assert b.bal("alice", "requests") == 0
    r = b.report("alice", "requests", 1, model="o1")
    assert (r.decision, r.mode, r.priority, r.cost_nano) == (pb.DECISION_DEGRADE, "slow", 100, 0)
    assert b.report("alice", "requests", 1, model="gpt-4o-mini").decision == pb.DECISION_ALLOW  # free model
    # usage-based: past the pool, $0.04 a request up to the $20 limit, billed when it is reached
    for _ in range(500):
        assert b.report("bob", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW
    for _ in range(500):
        r = b.report("bob", "requests", 1, model="gpt-4o")
        assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, NANO)
    charged = b.audit("bob", "overage_charged")
    assert [(e.amount_nano, e.charge_nano, e.charge_credit_type) for e in charged] == [
        (500 * NANO, 20 * NANO, "usd")]
    r = b.report("bob", "requests", 1, model="gpt-4o")
    assert (r.decision, r.mode) == (pb.DECISION_DEGRADE, "slow")  # the spend limit is reached
    # a new month: 500 fresh requests, and the overage allowance again
    b.advance(31 * DAY_MS)
    assert b.report("bob", "requests", 1, model="gpt-4o").decision == pb.DECISION_ALLOW
    assert b.bal("bob", "requests") == 499 * NANO
    assert len(b.audit("bob", "fee")) == 2
    b.check_conservation("alice")
    b.check_conservation("bob")


def test_elevenlabs_rollover_caps_and_overage(make):
    b = make("elevenlabs")
    # Flash costs half a credit a character: 140,000 characters use 70,000 credits
    assert b.report("studio", "characters", 140_000, model="eleven_flash_v2_5").cost_nano == 70_000 * NANO
    # a Creator plan with 30,000 credits unused rolls them into the next month: 130,000
    b.advance(29 * DAY_MS)  # anchored on Jan 31: the first period ends on Feb 28
    b.report("studio", "characters", 0, model="eleven_v3")
    assert b.bal("studio", "credits") == 130_000 * NANO
    rolled = b.audit("studio", "rolled_over")
    assert [e.amount_nano for e in rolled] == [30_000 * NANO]
    # unused for two more months: rolled credits roll only once, at most 2x the quota
    b.advance(31 * DAY_MS)
    b.tick()
    assert b.bal("studio", "credits") == 200_000 * NANO  # 100k rolled (max count reached for the older 30k)
    assert [e.amount_nano for e in b.audit("studio", "rollover_forfeited")] == [-30_000 * NANO]
    b.advance(30 * DAY_MS)
    b.tick()
    assert b.bal("studio", "credits") == 200_000 * NANO
    assert b.bal("studio", "credits") <= 300_000 * NANO
    # overage: 10,000 credits past the balance, billed at cycle end at $0.30 per 1,000
    b.report("studio", "characters", 210_000, model="eleven_multilingual_v2")
    assert b.bal("studio", "credits") == -10_000 * NANO
    b.advance(31 * DAY_MS)
    b.tick()
    charged = b.audit("studio", "overage_charged")
    assert [(e.amount_nano, e.charge_nano) for e in charged] == [(10_000 * NANO, 3 * NANO)]
    assert b.bal("studio", "credits") == 100_000 * NANO
    b.check_conservation("studio")


def test_elevenlabs_overage_billed_early_past_twice_the_plan_price(make):
    b = make("elevenlabs")
    b.report("studio", "characters", 100_000, model="eleven_v3")
    # $44 of overage at $0.30 per 1,000 credits is 146,666.666... credits
    b.report("studio", "characters", 146_666, model="eleven_v3")
    assert b.audit("studio", "overage_charged") == []
    b.report("studio", "characters", 1, model="eleven_v3")
    charged = b.audit("studio", "overage_charged")
    assert [(e.amount_nano, e.charge_nano, e.reference) for e in charged] == [
        (146_667 * NANO, 44_000_100_000, "threshold")]
    assert b.bal("studio", "credits") == 0


def test_midjourney_fast_time_then_relax_with_falling_priority(make):
    b = make("midjourney")
    # job types multiply GPU time: turbo 2x, video 8x, draft 1/2
    assert b.report("painter", "gpu_seconds", "10", job="turbo").cost_nano == 20 * NANO
    assert b.report("painter", "gpu_seconds", "10", job="video").cost_nano == 80 * NANO
    assert b.report("painter", "gpu_seconds", "10", job="draft").cost_nano == 5 * NANO
    b.report("painter", "gpu_seconds", "53895", job="image")  # 15 hours used exactly
    assert b.bal("painter", "fast_seconds") == 0
    priorities = [b.report("painter", "gpu_seconds", "300", job="image") for _ in range(6)]
    assert all(r.decision == pb.DECISION_DEGRADE and r.mode == "relax" for r in priorities)
    assert [r.priority for r in priorities] == [100, 99, 99, 98, 98, 97]  # one step per 10 relax minutes
    # renewal: fast time again, and relax priority resets
    b.advance(29 * DAY_MS)
    assert b.report("painter", "gpu_seconds", "60", job="image").decision == pb.DECISION_ALLOW
    assert b.bal("painter", "fast_seconds") == 53_940 * NANO
    # Basic has no Relax: denied when fast time is gone, until extra fast hours are bought
    b.report("sketcher", "gpu_seconds", "12000", job="image")
    r = b.report("sketcher", "gpu_seconds", "1", job="image")
    assert (r.decision, r.reason) == (pb.DECISION_DENY, pb.REASON_INSUFFICIENT_BALANCE)
    b.grant("sketcher", "fast_seconds", 3600 * NANO, source="extra-fast-hour")
    assert b.report("sketcher", "gpu_seconds", "1", job="image").decision == pb.DECISION_ALLOW


def test_replicate_per_second_in_arrears_or_prepaid(make):
    b = make("replicate")
    # in arrears: no balance check; 1,000.5 s of H100 at $0.001525/s
    r = b.report("lab", "gpu_seconds", "1000.5", hardware="nvidia-h100")
    assert (r.decision, r.cost_nano) == (pb.DECISION_ALLOW, 1_525_762_500)
    big = b.report("lab", "gpu_seconds", "1000000", hardware="8x-nvidia-h100")
    assert (big.decision, big.balance_nano) == (pb.DECISION_ALLOW, -(1_525_762_500 + 12_200 * NANO))
    # from prepaid credit: $5 buys 3,571.428 s of A100 and not a second more
    assert b.report("hobbyist", "gpu_seconds", "3571.428", hardware="nvidia-a100-80gb").decision == \
        pb.DECISION_ALLOW
    r = b.report("hobbyist", "gpu_seconds", "1", hardware="nvidia-a100-80gb")
    assert r.decision == pb.DECISION_DENY


def test_hybrid_fee_included_credits_gauges_and_graduated_overage(make):
    b = make("hybrid")
    assert [e.charge_nano for e in b.audit("acme", "fee")] == [49 * NANO]
    # the first GPU hour of the period is free: 3,600.5 s of L40S cost half a second
    assert b.report("acme", "gpu_seconds", "3600.5", hardware="nvidia-l40s").cost_nano == 487_500
    # $160 of tokens against $10 included (less the half second): $150.0004875 of overage
    b.report("acme", "output_tokens", 16_000_000, model="gpt-4o")
    assert b.bal("acme", "usd") == -150 * NANO - 487_500
    b.grant("acme", "usd", 487_500, source="goodwill")
    for seats in (3, 7, 5):
        b.report("acme", "seats", seats)
    for _ in range(3000):
        b.report("acme", "requests", 1, model="claude-3.5-haiku")  # 1,000 requests
    r = b.report("acme", "requests", 1, model="claude-3.5-haiku")
    assert (r.decision, r.mode) == (pb.DECISION_DEGRADE, "slow")
    b.advance(29 * DAY_MS)
    b.tick()
    # seats are charged on the period's maximum (7 x $8), then the overage is billed by tier:
    # $206 = $100 at list + $106 at 90%
    assert [e.amount_nano for e in b.audit("acme", "gauge_charged")] == [-56 * NANO]
    assert [(e.amount_nano, e.charge_nano) for e in b.audit("acme", "overage_charged")] == [
        (206 * NANO, 100 * NANO + 95_400_000_000)]
    assert b.bal("acme", "usd") == 10 * NANO
    assert b.bal("acme", "requests") == 1000 * NANO
    assert len(b.audit("acme", "fee")) == 2


def test_period_rollover_is_identical_after_a_crash(make, tmp_path):
    b = make("elevenlabs")
    b.report("studio", "characters", 50_000, model="eleven_v3")
    b.advance(29 * DAY_MS)
    b.report("studio", "characters", 1, model="eleven_v3")  # the first event after the boundary rolls
    before = b.balance("studio")
    b.restart(clean=False)
    assert b.balance("studio") == before
    b.tick()  # nothing is rolled twice
    assert b.balance("studio") == before
    assert len(b.audit("studio", "rolled_over")) == 1


def test_upgrades_prorate_now_and_downgrades_wait_for_the_period_end(make):
    b = make("elevenlabs")
    b.subscribe("newco", "starter", start_ms=START_MS)
    assert b.bal("newco", "credits") == 30_000 * NANO
    b.advance(14 * DAY_MS)  # the first period runs from Jan 31 to Feb 28
    sub = b.change_plan("newco", "creator")
    left = sub.period_end_ms - b.now_ms
    length = sub.period_end_ms - sub.period_start_ms
    assert b.bal("newco", "credits") == 30_000 * NANO + 70_000 * NANO * left // length
    fees = b.audit("newco", "fee")
    assert fees[-1].charge_nano == -((-17 * NANO * left) // length)  # $17 more a month, for the time left
    assert b.balance("newco").plan == "creator"
    # spending it all and downgrading at once mints nothing: the downgrade waits
    b.report("newco", "characters", b.bal("newco", "credits") // NANO, model="eleven_v3")
    sub = b.change_plan("newco", "starter")
    assert (sub.plan, sub.next_plan) == ("creator", "starter")
    assert b.bal("newco", "credits") == 0
    b.advance(15 * DAY_MS)
    b.tick()
    assert b.balance("newco").plan == "starter"
    assert b.bal("newco", "credits") == 30_000 * NANO
    b.check_conservation("newco")
    b.cancel("newco")
    assert b.bal("newco", "credits") == 0
    assert b.balance("newco").plan == ""


def test_rollover_spares_credits_held_by_a_reservation(make):
    b = make("midjourney")
    b.advance(28 * DAY_MS - 10_000)  # ten seconds before the first period ends (Feb 28)
    a = b.authorize("painter", "gpu_seconds", 54_000, job="image")  # all 15 fast hours held
    assert a.decision == pb.DECISION_ALLOW
    b.advance(20_000)
    b.tick()
    assert b.bal("painter", "fast_seconds") == 108_000 * NANO  # the held hours did not expire under it
    b.commit(a.reservation_id, 54_000)
    b.tick()
    assert b.bal("painter", "fast_seconds") == 54_000 * NANO  # paid once, from the old period's hours


def test_immediate_cancel_bills_gauges_and_overage(make):
    b = make("hybrid")
    b.report("acme", "output_tokens", 16_000_000, model="gpt-4o")
    b.report("acme", "seats", 7)
    b.cancel("acme")
    assert [e.amount_nano for e in b.audit("acme", "gauge_charged")] == [-56 * NANO]
    assert [e.charge_nano for e in b.audit("acme", "overage_charged")] == [100 * NANO + 95_400_000_000]
    assert b.bal("acme", "usd") == 0 and b.balance("acme").balances[0].floor_nano == 0


def test_arrears_are_billed_each_period(make):
    b = make("replicate")
    b.report("lab", "gpu_seconds", "100", hardware="nvidia-h100")
    b.advance(29 * DAY_MS)
    b.tick()
    billed = b.audit("lab", "usage_billed")
    assert [(e.charge_nano, e.charge_credit_type) for e in billed] == [(152_500_000, "usd")]
    assert b.bal("lab", "usd") == 0


def test_unique_count_meter_charges_distinct_users_at_period_end(make):
    b = make("hybrid")
    for user in ("ann", "bob", "ann", "cy", "bob", "ann"):
        assert b.report("acme", "active_users", 0, user=user).cost_nano == 0
    assert {u.meter: u.quantity for u in b.balance("acme").usage}["active_users"] == "3"
    b.restart(clean=False)  # the distinct users of the period survive a crash
    b.report("acme", "active_users", 0, user="dee")
    b.report("acme", "active_users", 0, user="ann")
    b.advance(29 * DAY_MS)
    b.tick()
    charged = [e for e in b.audit("acme", "gauge_charged") if e.reference.startswith("active_users")]
    assert [(e.amount_nano, e.reference) for e in charged] == [(-8 * NANO, "active_users=4")]
    assert {u.meter: u.quantity for u in b.balance("acme").usage}["active_users"] == "0"


CARRY = """
[credit_types.usd]
kind = "fiat"
[credit_types.cr]
kind = "custom"
[meters.m]
credit_type = "cr"
price = "1"
[plans.p]
period = "month"
[plans.p.credits.cr]
included = "100"
overage = { price = "0.10", price_in = "usd", at_cycle_end = "AT_END" }
"""


@pytest.mark.parametrize("at_end, balance_after, charges", [
    ("bill", 100, [(50, 5)]),
    ("forgive", 100, []),
    ("carry", 100, []),          # billed a period later; the new credits stay whole
    ("carry_repay", 50, []),     # the new credits pay the deficit back
])
def test_what_happens_to_a_deficit_at_the_period_end(tmp_path, monkeypatch, at_end, balance_after, charges):
    path = tmp_path / "carry.toml"
    path.write_text(CARRY.replace("AT_END", at_end))
    b = Billing(tmp_path, str(path), monkeypatch)
    try:
        b.subscribe("x", "p", start_ms=START_MS)
        b.report("x", "m", 150)
        b.advance(29 * DAY_MS)
        b.tick()
        assert b.bal("x", "cr") == balance_after * NANO
        assert [(e.amount_nano // NANO, e.charge_nano // 10**8 // 10) for e in b.audit("x", "overage_charged")] \
            == charges
        if at_end == "carry":
            assert [e.amount_nano for e in b.audit("x", "deficit_carried")] == [50 * NANO]
            b.advance(31 * DAY_MS)
            b.tick()
            assert [(e.amount_nano, e.charge_nano) for e in b.audit("x", "overage_charged")] == [(50 * NANO, 5 * NANO)]
        b.check_conservation("x")
    finally:
        b.close()


def test_a_burst_of_expiring_reservations_is_released_in_chunks(make):
    b = make("openai")  # acme holds $10.00
    for _ in range(700):  # more than one housekeeping commit's worth
        assert b.authorize("acme", "output_tokens", 10, model="gpt-4o").decision == pb.DECISION_ALLOW
    held = next(x for x in b.balance("acme").balances if x.credit_type == "usd")
    assert held.reserved_nano == 700 * 100_000  # 10 gpt-4o output tokens: $0.0001 each
    b.advance(61_000)  # past the default 60 s lifetime
    b.tick()
    after = next(x for x in b.balance("acme").balances if x.credit_type == "usd")
    assert (after.reserved_nano, after.available_nano) == (0, 10 * NANO)
    b.restart(clean=False)  # and every release was committed
    assert next(x for x in b.balance("acme").balances if x.credit_type == "usd").reserved_nano == 0


ROLLOVER_CATALOG = """
[credit_types.credits]
kind = "custom"

[meters.characters]
credit_type = "credits"
price = "1"

[plans.creator]
period = "month"
[plans.creator.credits.credits]
included = "100000"
rollover = { max_percent = 100, max_count = 1, max = "30000" }

[customers.studio]
plan = "creator"
"""


def across_a_boundary(make, tmp_path, *holds: int, catalog: str = ROLLOVER_CATALOG):
    """50,000 of the period's 100,000 used, then ``holds`` reserved ten seconds before
    it ends, then the boundary: 30,000 roll over, and of the 20,000 forfeited, what
    the holds stand on (up to 20,000) is spared for them."""
    path = tmp_path / "rollover.toml"
    path.write_text(catalog)
    b = make(str(path))
    assert b.report("studio", "characters", 50_000).decision == pb.DECISION_ALLOW
    b.advance(28 * DAY_MS - 10_000)  # ten seconds before the period ends (Feb 28)
    made = [b.authorize("studio", "characters", amount) for amount in holds]
    b.advance(20_000)
    b.tick()
    return b, made


def test_credits_freed_by_an_old_period_hold_go_in_the_same_commit(make, tmp_path):
    b, (hold,) = across_a_boundary(make, tmp_path, 10_000)
    assert [e.amount_nano for e in b.audit("studio", "rolled_over")] == [30_000 * NANO]
    assert sum(e.amount_nano for e in b.audit("studio", "rollover_forfeited")) == -10_000 * NANO
    assert b.bal("studio", "credits") == 140_000 * NANO
    c = b.commit(hold.reservation_id, 6_000)
    # The 4,000 the hold no longer needs were the old period's: they go with the commit, not a second later.
    assert c.balance_nano == 130_000 * NANO
    assert b.bal("studio", "credits") == 130_000 * NANO
    assert b.report("studio", "characters", 130_001).decision == pb.DECISION_DENY
    assert b.report("studio", "characters", 130_000).decision == pb.DECISION_ALLOW
    assert [e.amount_nano for e in b.audit("studio", "expire")] == [-4_000 * NANO]
    b.check_conservation("studio")


def test_an_old_period_hold_released_or_expired_forfeits_what_it_spared(make, tmp_path):
    b, (released, expiring) = across_a_boundary(make, tmp_path, 6_000, 4_000)
    assert b.bal("studio", "credits") == 140_000 * NANO
    r = b.release(released.reservation_id)
    assert r.available_nano == 134_000 * NANO - 4_000 * NANO  # the other hold still stands on 4,000
    assert b.bal("studio", "credits") == 134_000 * NANO
    b.advance(60_000)  # past the second hold's TTL: the sweep releases it, and its spared credits go with it
    b.tick()
    assert (b.bal("studio", "credits"), b.balance("studio").balances[0].reserved_nano) == (130_000 * NANO, 0)
    assert sorted(e.amount_nano for e in b.audit("studio", "expire")) == [-6_000 * NANO, -4_000 * NANO]
    with pytest.raises(Exception, match="unknown, expired or already settled"):
        b.commit(expiring.reservation_id, 1)
    b.check_conservation("studio")


SPEND_LIMIT_CATALOG = """
[credit_types.usd]
kind = "fiat"
currency = "USD"

[credit_types.requests]
kind = "custom"

[meters.requests]
credit_type = "requests"
price = "1"

[plans.budget5]
period = "month"
fee = { usd = "10.00" }
[plans.budget5.credits.requests]
included = "300"
overage = { price = "0.04", price_in = "usd", spend_limit = "5.00", at_cycle_end = "bill" }

[plans.budget20]
period = "month"
fee = { usd = "10.00" }
[plans.budget20.credits.requests]
included = "300"
overage = { price = "0.04", price_in = "usd", spend_limit = "20.00", at_cycle_end = "bill" }

[customers.dev]
plan = "budget5"
"""


def test_a_raised_spend_limit_counts_the_overage_already_billed_this_period(make, tmp_path):
    path = tmp_path / "copilot.toml"
    path.write_text(SPEND_LIMIT_CATALOG)
    b = make(str(path))
    assert b.report("dev", "requests", 400).decision == pb.DECISION_ALLOW  # 300 included, then $4 of overage
    b.change_plan("dev", "budget20")  # the $5 budget raised to $20: the $4 so far is billed at once
    assert [e.charge_nano for e in b.audit("dev", "overage_charged")] == [4 * NANO]
    assert b.report("dev", "requests", 50).decision == pb.DECISION_ALLOW  # $6 of overage in the month
    requests = next(x for x in b.balance("dev").balances if x.credit_type == "requests")
    assert requests.available_nano == 350 * NANO  # $20 is 500 requests, and 150 were used
    assert b.report("dev", "requests", 351).decision != pb.DECISION_ALLOW
    assert b.report("dev", "requests", 350).decision == pb.DECISION_ALLOW
    b.advance(28 * DAY_MS + 1)
    b.tick()  # the month ends: its overage adds up to the $20 budget, not $24
    assert sum(e.charge_nano for e in b.audit("dev", "overage_charged")) == 20 * NANO


@pytest.mark.parametrize("settle", ["release", "commit nothing", "expire"])
def test_new_period_usage_is_never_paid_with_credits_spared_for_an_old_hold(make, tmp_path, settle):
    b, (old,) = across_a_boundary(make, tmp_path, 10_000)
    b.report("studio", "characters", 5_000)  # the new period's own usage, while the old hold is open
    if settle == "release":
        b.release(old.reservation_id)
    elif settle == "commit nothing":
        b.commit(old.reservation_id, 0)
    else:
        b.advance(60_000)
        b.tick()
    # 100,000 included + 30,000 rolled - 5,000 used: the spared 10,000 all go.
    assert b.bal("studio", "credits") == 125_000 * NANO
    assert [e.amount_nano for e in b.audit("studio", "expire")] == [-10_000 * NANO]
    b.check_conservation("studio")


def test_a_new_period_hold_does_not_keep_what_was_spared_for_an_old_one(make, tmp_path):
    b, (old,) = across_a_boundary(make, tmp_path, 10_000)
    new = b.authorize("studio", "characters", 20_000)
    b.release(old.reservation_id)
    assert b.bal("studio", "credits") == 130_000 * NANO
    assert b.report("studio", "characters", 110_001).decision == pb.DECISION_DENY  # 130,000 less the new hold
    assert b.report("studio", "characters", 110_000).decision == pb.DECISION_ALLOW
    b.commit(new.reservation_id, 20_000)
    assert b.bal("studio", "credits") == 0
    b.check_conservation("studio")


def test_an_old_hold_that_costs_more_than_was_spared_pays_the_rest_from_the_new_period(make, tmp_path):
    b, (old,) = across_a_boundary(make, tmp_path, 10_000)
    assert b.commit(old.reservation_id, 12_000).balance_nano == 128_000 * NANO  # 10,000 spared, 2,000 new
    assert b.audit("studio", "expire") == []
    b.check_conservation("studio")


SESSION_CATALOG = ROLLOVER_CATALOG.replace('[plans.creator]', '''[meters.seconds]
credit_type = "credits"
price = "100"

[plans.creator]''')


def test_a_session_closed_by_its_timeout_after_a_boundary_forfeits_what_was_spared(make, tmp_path):
    path = tmp_path / "session.toml"
    path.write_text(SESSION_CATALOG)
    b = make(str(path))
    b.report("studio", "characters", 50_000)
    b.advance(28 * DAY_MS - 10_000)
    s = b.start_session("studio", "seconds", timeout_ms=30_000)  # holds 30 s at 100 a second
    b.advance(20_000)
    b.tick()  # 3,000 of the forfeited credits are spared for the session's hold
    assert b.bal("studio", "credits") == 133_000 * NANO
    b.advance(25_000)  # no heartbeat for 45 s: the sweep closes the session at its last one, billing nothing
    b.tick()
    assert b.bal("studio", "credits") == 130_000 * NANO
    assert [e.amount_nano for e in b.audit("studio", "expire")] == [-3_000 * NANO]
    assert b.report("studio", "characters", 130_001).decision == pb.DECISION_DENY
    assert b.heartbeat(s.session_id).duplicate
    b.check_conservation("studio")


def test_a_spend_limit_counts_money_across_a_plan_change_to_other_prices(make, tmp_path):
    catalog = SPEND_LIMIT_CATALOG.replace(
        'overage = { price = "0.04", price_in = "usd", spend_limit = "20.00", at_cycle_end = "bill" }',
        'overage = { price = "0.02", price_in = "usd", spend_limit = "20.00", at_cycle_end = "bill" }')
    path = tmp_path / "cheaper.toml"
    path.write_text(catalog)
    b = make(str(path))
    assert b.report("dev", "requests", 400).decision == pb.DECISION_ALLOW  # 100 over, $4 at $0.04
    b.change_plan("dev", "budget20")  # $4 billed at once; $16 of the $20 are left, at $0.02: 800 requests
    requests = next(x for x in b.balance("dev").balances if x.credit_type == "requests")
    assert requests.available_nano == 800 * NANO
    assert b.report("dev", "requests", 801).decision != pb.DECISION_ALLOW
    assert b.report("dev", "requests", 800).decision == pb.DECISION_ALLOW
    b.advance(28 * DAY_MS + 1)
    b.tick()
    assert sum(e.charge_nano for e in b.audit("dev", "overage_charged")) == 20 * NANO
