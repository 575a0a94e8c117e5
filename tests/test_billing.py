"""The credit lifecycle, spend cap, ledger and usage events, on a real Redis."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import grpc
import pytest
from quota_fixtures import T0_MS, Sidecar, utc_ms

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import InvalidArgument, NotFound, ResolutionConflict
from quota_sidecar.domain.model import AutoTopUp, CreditSource, DenialReason, Funding, JobParams
from quota_sidecar.storage.keys import key_bucket
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
V15 = JobParams(duration_seconds=15, resolution="720p")  # 2 credits
DAY_MS = 86_400_000


async def use_free(engine: QuotaEngine, account: str, n: int = 30, tag: str = "free") -> None:
    for i in range(n):
        d = await engine.check_and_reserve(account, "sora", f"{tag}-{i}", V10)
        assert d.outcome.funding is Funding.FREE_QUOTA, d
        await engine.commit(account, f"{tag}-{i}")


async def events_of(store: RedisStore, account: str) -> list[dict[str, str]]:
    rows = await store.events(key_bucket(account, store.key_buckets))
    return [fields for _, fields in rows if fields["account"] == account]


async def ledger_types(engine: QuotaEngine, account: str) -> list[str]:
    entries, _ = await engine.ledger(account, 1000)
    return [e.type for e in entries]


async def test_promo_credits_are_spent_before_purchased_ones_at_the_same_expiry(engine: QuotaEngine) -> None:
    expiry_ms = T0_MS + 30 * DAY_MS
    await engine.grant("a", 3, "bought", expiry_ms, source=CreditSource.PURCHASE)
    await engine.grant("a", 1, "sorry", expiry_ms, source=CreditSource.COMPENSATION)
    await engine.grant("a", 2, "welcome", expiry_ms, source=CreditSource.PROMO)
    await engine.grant("a", 5, "earlier", expiry_ms - 1, source=CreditSource.PURCHASE)
    await engine.set_account("a", plan="pro")
    await use_free(engine, "a", 100)
    await engine.check_and_reserve("a", "sora", "r1", JobParams(duration_seconds=25, resolution="1080p"))  # 6
    left = {lot.lot_id: lot.credits_left for lot in (await engine.account("a")).all_lots}
    # soonest expiry first, then promo before compensation before purchase
    assert left == {"earlier": 0, "welcome": 1, "sorry": 1, "bought": 3}
    await engine.check_and_reserve("a", "sora", "r2", V15)  # 2
    assert [(lot.lot_id, lot.credits_left) for lot in (await engine.balance("a")).lots] == [("bought", 3)]


async def test_revoke_removes_what_is_left_and_reports_what_was_used(engine: QuotaEngine) -> None:
    await use_free(engine, "a")
    await engine.grant("a", 10, "order-1")
    for rid, job in (("spent-2", V15), ("spent-1", V10)):  # 3 spent
        assert (await engine.check_and_reserve("a", "sora", rid, job)).outcome.allowed
        await engine.commit("a", rid)
    await engine.check_and_reserve("a", "sora", "held", V15)  # 2 held
    r = await engine.revoke("a", "order-1", "chargeback #77")
    assert (r.credits_revoked, r.credits_spent, r.credits_held, r.credit_balance, r.replayed) == (5, 3, 2, 0, False)
    # the held credits are revoked when the hold ends unspent, never returned to the balance
    await engine.release("a", "held")
    acct = await engine.account("a")
    assert (acct.balance.credit_balance, acct.totals.revoked, acct.totals.spent) == (0, 7, 3)
    assert acct.all_lots[0].revoked and acct.all_lots[0].credits_left == 0
    again = await engine.revoke("a", "order-1")
    assert (again.replayed, again.credits_revoked, again.credits_spent, again.credits_held) == (True, 5, 3, 0)
    with pytest.raises(NotFound) as err:
        await engine.revoke("a", "never-bought")
    assert err.value.reason == "PURCHASE_NOT_FOUND"
    d = await engine.check_and_reserve("a", "sora", "after", V10)
    assert (d.outcome.allowed, d.outcome.denial) == (False, DenialReason.PURCHASE_REQUIRED)


async def test_revoke_of_a_fully_spent_lot_never_goes_below_zero(engine: QuotaEngine) -> None:
    await use_free(engine, "a")
    await engine.grant("a", 2, "small")
    await engine.check_and_reserve("a", "sora", "r", V15)
    await engine.commit("a", "r")
    r = await engine.revoke("a", "small")
    assert (r.credits_revoked, r.credits_spent, r.credit_balance) == (0, 2, 0)
    assert (await engine.account("a")).totals.revoked == 0


async def test_refund_job_gives_back_once_to_the_lots_it_came_from(engine: QuotaEngine) -> None:
    await use_free(engine, "a")
    await engine.grant("a", 10, "p")
    await engine.check_and_reserve("a", "sora", "job", V15)
    await engine.commit("a", "job")
    r = await engine.refund_job("a", "job", "render failed")
    assert (r.credits_refunded, r.free_refunded, r.credit_balance, r.replayed) == (2, 0, 10, False)
    again = await engine.refund_job("a", "job")
    assert (again.replayed, again.credits_refunded, again.credit_balance) == (True, 2, 10)
    totals = (await engine.account("a")).totals
    assert (totals.spent, totals.refunded, totals.available) == (2, 2, 10)
    await engine.check_and_reserve("a", "sora", "released", V10)
    await engine.release("a", "released")
    with pytest.raises(ResolutionConflict) as err:
        await engine.refund_job("a", "released")
    assert err.value.reason == "NOT_COMMITTED"


async def test_refund_of_a_free_job_gives_the_free_unit_back(engine: QuotaEngine) -> None:
    await engine.check_and_reserve("a", "sora", "job", V10)
    await engine.commit("a", "job")
    assert (await engine.balance("a")).allowances[0].free_used == 1
    r = await engine.refund_job("a", "job")
    assert (r.free_refunded, r.credits_refunded) == (1, 0)
    assert (await engine.balance("a")).allowances[0].free_used == 0


async def test_monthly_spend_cap_denies_with_budget_exceeded(engine: QuotaEngine, clock: ManualClock) -> None:
    await use_free(engine, "a")
    await engine.grant("a", 100, "p")
    settings = await engine.set_account("a", monthly_spend_cap_credits=5)
    assert settings.monthly_spend_cap_credits == 5
    assert (await engine.check_and_reserve("a", "sora", "r1", V15)).outcome.allowed
    assert (await engine.check_and_reserve("a", "sora", "r2", V15)).outcome.allowed
    d = await engine.check_and_reserve("a", "sora", "r3", V15)  # 4 + 2 > 5
    assert (d.outcome.allowed, d.outcome.denial, d.offers) == (False, DenialReason.BUDGET_EXCEEDED, ())
    assert (await engine.check_and_reserve("a", "sora", "r4", V10)).outcome.allowed  # 4 + 1 = 5 fits
    await engine.release("a", "r1")  # released credits do not count
    assert (await engine.check_and_reserve("a", "sora", "r5", V15)).outcome.allowed
    acct = await engine.account("a")
    assert (acct.month_spend_credits, acct.month_resets_ms) == (5, utc_ms(2026, 12, 1))
    clock.set(utc_ms(2026, 12, 1, 0, 0, 1))
    await use_free(engine, "a", tag="dec-free")
    december = await engine.check_and_reserve("a", "sora", "december", V15)
    assert (december.outcome.allowed, december.outcome.funding) == (True, Funding.CREDITS)  # a new month's cap
    await engine.set_account("a", monthly_spend_cap_credits=0)  # 0 = no cap
    for i in range(4):
        assert (await engine.check_and_reserve("a", "sora", f"uncapped-{i}", V15)).outcome.allowed


async def test_set_account_validates_cap_and_top_up(engine: QuotaEngine) -> None:
    with pytest.raises(InvalidArgument) as err:
        await engine.set_account("a", monthly_spend_cap_credits=-1)
    assert err.value.field == "monthly_spend_cap_credits"
    with pytest.raises(InvalidArgument) as err:
        await engine.set_account("a", auto_topup=AutoTopUp(True, 5, "pack_999"))
    assert err.value.field == "auto_topup.pack_id"
    with pytest.raises(InvalidArgument) as err:
        await engine.set_account("a", auto_topup=AutoTopUp(True, 0, "pack_10"))
    assert err.value.field == "auto_topup.threshold_credits"
    s = await engine.set_account("a", auto_topup=AutoTopUp(True, 3, "pack_10"))
    assert s.auto_topup == AutoTopUp(True, 3, "pack_10") and s.plan == "free"


async def test_every_movement_is_in_the_ledger(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.grant("a", 10, "p1", reason="stripe pi_1")
    await engine.grant("a", 1, "short", T0_MS + 3_600_000, source=CreditSource.PROMO)
    await use_free(engine, "a", 2, "f")
    await engine.check_and_reserve("a", "sora", "rel", V10)
    await engine.release("a", "rel")
    await engine.check_and_reserve("a", "sora", "gone", V10, ttl_seconds=5)  # expires below
    await use_free(engine, "a", 27, "g")  # free allowance now used up (2 + gone + 27)
    await engine.check_and_reserve("a", "sora", "paid", V15)  # 1 from short, 1 from p1
    await engine.commit("a", "paid", V10)  # charge 1 (from short), 1 back to p1
    await engine.refund_job("a", "paid")  # 1 back to short
    await engine.revoke("a", "p1")  # 10 revoked
    clock.advance(hours=2)
    await engine.sweep()  # gone expires; short expires with 1 left
    entries, token = await engine.ledger("a", 1000)
    assert token == ""
    assert Counter(e.type for e in entries) == {"grant": 2, "hold": 32, "commit": 30, "release": 1, "expire": 1,
                                                 "refund": 1, "revoke": 1, "lot_expire": 1}
    grant = entries[0]
    assert (grant.fields["pid"], grant.int_field("credits"), grant.fields["reason"], grant.at_ms) == (
        "p1", 10, "stripe pi_1", T0_MS)
    paid = [e for e in entries if e.fields.get("rid") == "paid"]
    assert [e.type for e in paid] == ["hold", "commit", "refund"]
    assert paid[0].fields["pv"] == engine.plans.version and paid[1].int_field("credits") == 1
    totals = (await engine.account("a")).totals
    assert (totals.granted, totals.spent, totals.refunded, totals.revoked, totals.expired, totals.held,
            totals.available) == (11, 1, 1, 10, 1, 0, 0)
    assert entries[-1].totals_after == totals


async def test_ledger_pages(engine: QuotaEngine) -> None:
    for i in range(5):
        await engine.grant("a", 1, f"p{i}")
    seen, token = [], ""
    while True:
        page, token = await engine.ledger("a", 2, token)
        seen += [e.fields["pid"] for e in page]
        assert len(page) <= 2
        if not token:
            break
    assert seen == [f"p{i}" for i in range(5)]
    page, token = await engine.ledger("a", 2, "2")  # the token is the last seq returned
    assert ([e.seq for e in page], token) == ([3, 4], "4")
    assert (await engine.ledger("a", 2, str(2**63 - 1)))[0] == []
    for bad in ("nope", "1-2-3", "0", "-1", "01", "1.5", " 1", str(2**63), "1" * 30):
        with pytest.raises(InvalidArgument) as err:
            await engine.ledger("a", 2, bad)
        assert err.value.field == "page_token"


async def test_a_grant_keeps_what_was_paid_for_the_books(engine: QuotaEngine, store: RedisStore) -> None:
    await engine.grant("a", 0, "by-pack", pack_id="pack_10")  # credits and price from the plans' pack
    await engine.grant("a", 7, "priced", price_minor_units=250, currency="EUR")
    await engine.grant("a", 3, "unpriced")
    await engine.grant("a", 10, "pack-discount", pack_id="pack_10", price_minor_units=300)
    grants = {e.fields["pid"]: e for e in await store.account_outbox("a")}
    assert {pid: (e.deltas.granted, e.fields.get("price"), e.fields["cur"], e.fields["pack"])
            for pid, e in grants.items()} == {
        "by-pack": (10, "400", "USD", "pack_10"), "priced": (7, "250", "EUR", ""),
        "unpriced": (3, None, "", ""), "pack-discount": (10, "300", "USD", "pack_10")}
    refused: list[tuple[str, int, dict[str, Any]]] = [
        ("pack_id", 0, dict(pack_id="pack_nope")), ("credits", 5, dict(pack_id="pack_10")),
        ("credits", 0, {}), ("price_minor_units", 1, dict(price_minor_units=-1, currency="USD")),
        ("currency", 1, dict(currency="USD")),  # a currency without a price
        ("currency", 0, dict(currency="EUR", pack_id="pack_10")),  # the pack's price is in USD
        *[("currency", 1, dict(price_minor_units=100, currency=code)) for code in ("", "usd", "EURO", "U$D")]]
    for field, credits, kwargs in refused:
        with pytest.raises(InvalidArgument) as err:
            await engine.grant("a", credits, "bad", **kwargs)
        assert err.value.field == field, (field, kwargs)
    assert await store.account_seq("a") == 4  # nothing refused was written


async def test_usage_events_fire_once_per_scope(engine: QuotaEngine, store: RedisStore, clock: ManualClock) -> None:
    await use_free(engine, "a", 30)
    for rid in ("x1", "x2", "x3"):
        d = await engine.check_and_reserve("a", "sora", rid, V15)
        assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED
    events = await events_of(store, "a")
    assert [e["type"] for e in events] == ["free_warning", "free_exhausted", "purchase_required"]
    assert (events[0]["used"], events[0]["limit"], events[1]["used"]) == ("24", "30", "30")
    offers = json.loads(events[2]["offers"])
    assert (events[2]["credits_short"], offers) == (
        "2", [{"pack_id": "pack_10", "credits": 10, "quantity": 1, "total_minor": 400, "currency": "USD"}])
    # the next day's window warns again
    clock.advance(days=1)
    await use_free(engine, "a", 24, "day2")
    assert [e["type"] for e in await events_of(store, "a")][3:] == ["free_warning"]


async def test_credit_events_once_until_rearmed(engine: QuotaEngine, store: RedisStore, clock: ManualClock) -> None:
    await use_free(engine, "b", 30)
    await engine.set_account("b", auto_topup=AutoTopUp(True, 4, "pack_10"))
    await engine.grant("b", 5, "p1", T0_MS + 3 * DAY_MS)
    for i in range(4):  # balance 4, 3, 2, 1: credits_low (free plan: < 2) once, top-up (< 4) once
        await engine.check_and_reserve("b", "sora", f"c{i}", V10)
    types = [e["type"] for e in await events_of(store, "b")]
    assert types.count("auto_topup_requested") == 1 and types.count("credits_low") == 1
    topup = next(e for e in await events_of(store, "b") if e["type"] == "auto_topup_requested")
    assert (topup["balance"], topup["pack_id"]) == ("3", "pack_10")
    await engine.grant("b", 10, "p2")  # balance 11; a grant re-arms both
    for i in range(8):  # down to 3: below the top-up threshold again
        assert (await engine.check_and_reserve("b", "sora", f"d{i}", V10)).outcome.allowed
    types = [e["type"] for e in await events_of(store, "b")]
    assert (types.count("auto_topup_requested"), types.count("credits_low")) == (2, 1)  # balance 3 is not < 2
    await engine.set_account("b", monthly_spend_cap_credits=13)  # 12 held this month
    assert (await engine.check_and_reserve("b", "sora", "e0", V10)).outcome.allowed  # reaches the cap
    d = await engine.check_and_reserve("b", "sora", "e1", V10)
    assert d.outcome.denial is DenialReason.BUDGET_EXCEEDED
    budget = [e for e in await events_of(store, "b") if e["type"] == "budget_reached"]
    assert [(e["month"], e["cap"], e["spend"]) for e in budget] == [("202611", "13", "13")]
    # p1 (3 days left) is empty by now: only lots with credits left are announced
    await engine.grant("b", 2, "p3", T0_MS + 5 * DAY_MS)
    await engine.grant("b", 2, "p4", T0_MS + 9 * DAY_MS)  # beyond the 7-day notice
    await engine.sweep()
    await engine.sweep()
    expiring = [e for e in await events_of(store, "b") if e["type"] == "lot_expiring"]
    assert [(e["pid"], e["credits_left"], e["expires_ms"]) for e in expiring] == [("p3", "2", str(T0_MS + 5 * DAY_MS))]
    clock.advance(days=2)  # the uncommitted holds expire and give p1 credits back
    await engine.sweep()
    expiring = [e for e in await events_of(store, "b") if e["type"] == "lot_expiring"]
    assert [e["pid"] for e in expiring] == ["p3", "p1", "p4"]


async def test_admin_rpcs_on_the_wire(sidecar: Sidecar) -> None:
    admin, quota = sidecar.admin, sidecar.quota
    g = await admin.GrantCredits(pb.GrantCreditsRequest(account_id="w", credits=10, purchase_id="p",
                                                        source=pb.CREDIT_SOURCE_PROMO, reason="launch"))
    assert (g.lot.source, g.lot.credits_left) == (pb.CREDIT_SOURCE_PROMO, 10)
    s = await admin.SetAccount(pb.SetAccountRequest(account_id="w", monthly_spend_cap_credits=1,
                                                    auto_topup=pb.AutoTopUp(enabled=True, threshold_credits=2,
                                                                            pack_id="pack_10")))
    assert (s.monthly_spend_cap_credits, s.auto_topup.pack_id) == (1, "pack_10")
    for i in range(30):
        await quota.CheckAndReserve(pb.CheckAndReserveRequest(account_id="w", product="sora", reservation_id=f"f{i}",
                                                              params=pb.JobParams(duration_seconds=5, resolution="720p")))
    d = await quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="w", product="sora", reservation_id="big", params=pb.JobParams(duration_seconds=15, resolution="720p")))
    assert (d.allowed, d.denial.reason) == (False, pb.DENIAL_REASON_BUDGET_EXCEEDED)
    await admin.SetAccount(pb.SetAccountRequest(account_id="w", monthly_spend_cap_credits=0))
    d = await quota.CheckAndReserve(pb.CheckAndReserveRequest(
        account_id="w", product="sora", reservation_id="big", params=pb.JobParams(duration_seconds=15, resolution="720p")))
    assert d.allowed and d.funding == pb.FUNDING_CREDITS
    await quota.Commit(pb.CommitRequest(account_id="w", reservation_id="big"))
    r = await admin.RefundJob(pb.RefundJobRequest(account_id="w", reservation_id="big", reason="failed"))
    assert (r.credits_refunded, r.credit_balance) == (2, 10)
    v = await admin.RevokeCredits(pb.RevokeCreditsRequest(account_id="w", purchase_id="p"))
    assert (v.credits_revoked, v.credit_balance) == (10, 0)
    a = await admin.GetAccount(pb.GetAccountRequest(account_id="w"))
    assert (a.totals.granted, a.totals.revoked, a.totals.refunded, a.totals.spent) == (10, 10, 2, 2)
    assert a.all_lots[0].revoked and a.balance.plan == "free"
    page = await admin.ListLedger(pb.ListLedgerRequest(account_id="w", page_size=3))
    assert [e.type for e in page.entries] == ["grant", "account", "hold"] and page.next_page_token
    assert page.entries[0].reason == "launch" and page.entries[2].funding == pb.FUNDING_FREE_QUOTA
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.ListLedger(pb.ListLedgerRequest(account_id="w", page_token="x"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await admin.GrantCredits(pb.GrantCreditsRequest(account_id="w", credits=1, purchase_id="q", source=99))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_refund_after_the_spend_month_was_pruned_succeeds_once(redis_server, key_prefix: str) -> None:
    # Regression: unspend() sent HINCRBY -0 when the month's spend field had been
    # pruned; Redis refused it mid-script and kept the credits already returned,
    # so each retry minted them again.
    from quota_sidecar.domain.audit import audit_account
    from quota_sidecar.server.plans_file import load_plans

    clock = ManualClock(T0_MS)
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, retention_ms=90 * DAY_MS)
    try:
        engine = QuotaEngine(load_plans(), store, clock)
        await engine.grant("a", 100, "p1", T0_MS + 300 * DAY_MS)
        await use_free(engine, "a")
        await engine.check_and_reserve("a", "sora", "paid", V10)
        await engine.commit("a", "paid")
        clock.advance(days=60)
        await engine.check_and_reserve("a", "sora", "new-day", V10)  # prunes months before last month
        first = await engine.refund_job("a", "paid")
        again = await engine.refund_job("a", "paid")
        assert (first.credits_refunded, first.replayed, again.replayed) == (1, False, True)
        assert first.credit_balance == again.credit_balance == 100
        assert (await audit_account(store, "a")).violations == ()
    finally:
        await store.close()


async def test_a_hold_extended_across_two_month_boundaries_expires_cleanly(engine: QuotaEngine,
                                                                           clock: ManualClock) -> None:
    from quota_sidecar.domain.audit import audit_account

    await use_free(engine, "a")
    await engine.grant("a", 10, "p1", T0_MS + 300 * DAY_MS)
    await engine.check_and_reserve("a", "sora", "long", V15, ttl_seconds=86_400)
    for _ in range(46):  # 2026-11-21 -> 2027-01-05, always renewed before it lapses
        clock.advance(hours=23)
        await engine.extend("a", "long", 86_400)
    # A new day's first free hold prunes spend months before December while the
    # hold (counted in November) is still alive ...
    assert (await engine.check_and_reserve("a", "sora", "prune", V10)).outcome.funding is Funding.FREE_QUOTA
    clock.advance(days=2)  # ... then the hold expires, giving back to a pruned month
    d = await engine.check_and_reserve("a", "sora", "later", V10)
    assert d.outcome.allowed
    acct = await engine.account("a")
    assert (acct.totals.held, acct.balance.credit_balance) == (0, 10)
    assert (await audit_account(engine.store, "a")).violations == ()
