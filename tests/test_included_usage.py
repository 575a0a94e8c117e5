"""Included usage of metered products (issue 17, part 2): a plan's windows for a metered product
count usage in whole credits-equivalent, not jobs. A job is funded by them when every enforced
window has room for its whole estimate (else credits, whole); Commit charges the actual usage where
the hold was; release and expiry give the estimate back. The packaged codex is such a product."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from quota_fixtures import T0_MS, default_document, key, utc_ms

from quota_sidecar.domain.audit import audit_all, format_report
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Conflict, QuotaError
from quota_sidecar.domain.model import Funding, JobParams, LedgerEntry
from quota_sidecar.domain.shipping import Shipper, ShipperOptions
from quota_sidecar.server.plans_file import load_plans, parse_plans
from quota_sidecar.storage.store import RedisStore

HOUR_MS = 3_600_000
WEEK_END_MS = utc_ms(2026, 11, 23)  # T0 is Saturday 2026-11-21 12:00 UTC
V10 = JobParams(duration_seconds=10, resolution="720p")


def est(credits: int) -> JobParams:
    """Usage of the codex model (62.5 credits per 1M input tokens) costing exactly ``credits``."""
    return JobParams(model="codex", input_tokens=16_000 * credits)


def plans_with(**codex_rules: Any) -> Any:
    document = default_document()
    document["plans"]["free"]["codex"] = codex_rules
    return parse_plans(document)


def by_id(outcome: Any) -> dict[str, tuple[int, int, int]]:
    return {st.limit.limit_id: (st.used, st.limit.free, st.resets_ms) for st in outcome.limits}


async def outbox(store: RedisStore, account: str = "a") -> list[LedgerEntry]:
    return list((await store.raw_state(account))["outbox"])


async def assert_clean(store: RedisStore) -> None:
    audits = await audit_all(store)
    assert all(a.ok for a in audits), format_report(audits)


async def test_usage_taken_by_amount_then_credits_whole(engine: QuotaEngine, store: RedisStore) -> None:
    # The packaged free plan: 10 credits of codex usage per rolling 5 h, 40 per calendar week.
    await engine.grant("a", 20, "p1")
    d = (await engine.check_and_reserve("a", "codex", "r1", est(4))).outcome
    assert (d.funding, d.credits_held, d.free_used, d.free_limit) == (Funding.FREE_QUOTA, 0, 4, 10)
    assert by_id(d) == {"five_hour": (4, 10, T0_MS + 5 * HOUR_MS), "weekly": (4, 40, WEEK_END_MS)}
    # 4 + 7 > 10: no window can hold it, so credits fund the whole job (no split).
    d = (await engine.check_and_reserve("a", "codex", "r2", est(7))).outcome
    assert (d.funding, d.credits_held, d.credit_balance) == (Funding.CREDITS, 7, 13)
    assert by_id(d)["five_hour"][0] == 4
    d = (await engine.check_and_reserve("a", "codex", "r3", est(6))).outcome  # exactly fills it
    assert (d.funding, by_id(d)["five_hour"][0], by_id(d)["weekly"][0]) == (Funding.FREE_QUOTA, 10, 10)
    balance = await engine.balance("a")
    codex = next(a for a in balance.allowances if a.product == "codex")
    sora = next(a for a in balance.allowances if a.product == "sora")
    assert (codex.unit, sora.unit) == ("credits", "generation")
    assert {st.limit.limit_id: (st.used, st.limit.free) for st in codex.limits} == {
        "five_hour": (10, 10), "weekly": (10, 40)}
    holds = [e for e in await outbox(store) if e.type == "hold"]
    assert [(e.fields.get("funding"), e.deltas.free_units, e.fields.get("usage")) for e in holds] == [
        ("free", 4, "4"), ("credits", 0, None), ("free", 6, "6")]
    await assert_clean(store)


async def test_day_limit_and_shadow_limits_count_amounts(store: RedisStore, clock: ManualClock) -> None:
    engine = QuotaEngine(plans_with(limits=[{"id": "daily", "kind": "day", "free": 12},
                                            {"id": "cut", "kind": "rolling", "hours": 5, "free": 5, "shadow": True}]),
                         store, clock)
    first = (await engine.check_and_reserve("a", "codex", "r1", est(4))).outcome
    assert (first.funding, first.shadow_limits) == (Funding.FREE_QUOTA, ())
    second = (await engine.check_and_reserve("a", "codex", "r2", est(4))).outcome  # the shadow cut would refuse
    assert (second.funding, second.shadow_limits) == (Funding.FREE_QUOTA, ("cut",))
    assert by_id(second)["daily"][:2] == (8, 12) and by_id(second)["cut"][:2] == (8, 5)
    third = (await engine.check_and_reserve("a", "codex", "r3", est(5))).outcome  # 8 + 5 > 12
    assert third.funding is not Funding.FREE_QUOTA
    await assert_clean(store)


async def test_release_and_expiry_give_the_estimate_back(engine: QuotaEngine, store: RedisStore,
                                                         clock: ManualClock) -> None:
    await engine.check_and_reserve("a", "codex", "r1", est(6))
    released = await engine.release("a", "r1")
    assert released.free_refunded == 1
    d = (await engine.check_and_reserve("a", "codex", "r2", est(10))).outcome
    assert (d.funding, by_id(d)["five_hour"][0]) == (Funding.FREE_QUOTA, 10)
    clock.advance(seconds=1801)  # codex's default TTL: r2 expires
    d = (await engine.check_and_reserve("a", "codex", "r3", est(3))).outcome
    assert (d.funding, by_id(d)["five_hour"][0], by_id(d)["weekly"][0]) == (Funding.FREE_QUOTA, 3, 3)
    back = [(e.type, e.deltas.free_units, e.fields.get("usage")) for e in await outbox(store)
            if e.type in ("release", "expire")]
    assert back == [("release", -6, "6"), ("expire", -10, "10")]
    await assert_clean(store)


async def test_commit_charges_the_actual_usage_where_the_hold_was(store: RedisStore, clock: ManualClock,
                                                                  redis_client: aioredis.Redis,
                                                                  key_prefix: str) -> None:
    document = default_document()
    document["products"]["codex"]["overage"] = "cap"
    engine = QuotaEngine(parse_plans(document), store, clock)
    await engine.check_and_reserve("a", "codex", "below", est(4))
    await engine.check_and_reserve("a", "codex", "above", est(3))
    c = await engine.commit("a", "below", est(1))  # 4 estimated, 1 used: 3 back to the windows
    assert (c.funding, c.credits_charged, c.free_charged, c.written_off) == (Funding.FREE_QUOTA, 0, 1, 0)
    # Under cap: 3 estimated, 5 used -> the windows keep 3, 2 written off.
    c = await engine.commit("a", "above", est(5))
    assert (c.credits_charged, c.written_off) == (0, 2)
    assert await redis_client.hget(key(key_prefix, "a", "free"), "codex|weekly|w20261116") == "4"
    assert sorted(await redis_client.zrange(key(key_prefix, "a", "rolling"), 0, -1)) == [
        "codex|five_hour|above|3", "codex|five_hour|below|1"]
    commits = [e for e in await outbox(store) if e.type == "commit"]
    assert [(e.deltas.free_units, e.fields["usage"], e.fields["usage_held"], e.fields.get("wo")) for e in commits] == [
        (-3, "1", "4", None), (0, "3", "3", "2")]
    # Replays: the same actual usage replays, another is a conflict.
    assert (await engine.commit("a", "below", est(1))).replayed
    with pytest.raises(Conflict) as err:
        await engine.commit("a", "below", est(2))
    assert err.value.reason == "COMMIT_COST_MISMATCH"
    # Commit without params charges the estimate; RefundJob gives the usage back.
    await engine.check_and_reserve("a", "codex", "whole", est(2))
    assert (await engine.commit("a", "whole")).free_charged == 1
    await engine.refund_job("a", "below", reason="failed")
    balance = await engine.balance("a")
    codex = next(a for a in balance.allowances if a.product == "codex")
    assert {st.limit.limit_id: st.used for st in codex.limits} == {"five_hour": 5, "weekly": 5}  # 3 + 2
    refund = [e for e in await outbox(store) if e.type == "refund"][0]
    assert (refund.deltas.free_units, refund.fields["usage"]) == (-1, "1")
    await assert_clean(store)


async def test_draw_lets_the_windows_take_the_whole_usage(engine: QuotaEngine, store: RedisStore,
                                                         redis_client: aioredis.Redis, key_prefix: str) -> None:
    """The packaged codex draws: usage above the estimate is charged to the windows whole, even past
    their allowance (usage is not money: no credit moves, no debt); the next jobs go to credits."""
    await engine.grant("a", 20, "p1")
    await engine.check_and_reserve("a", "codex", "big", est(8))
    c = await engine.commit("a", "big", est(15))  # 8 estimated, 15 used: the 5 h window reads 15 of 10
    assert (c.funding, c.credits_charged, c.written_off, c.credits_drawn, c.debt_credits) == (
        Funding.FREE_QUOTA, 0, 0, 0, 0)
    assert await redis_client.zrange(key(key_prefix, "a", "rolling"), 0, -1) == ["codex|five_hour|big|15"]
    commit = [e for e in await outbox(store) if e.type == "commit"][0]
    assert (commit.deltas.free_units, commit.deltas.spent, commit.fields["usage"], commit.fields.get("wo")) == (
        7, 0, "15", None)
    d = (await engine.check_and_reserve("a", "codex", "next", est(1))).outcome
    assert (d.funding, d.credits_held, by_id(d)["five_hour"][0]) == (Funding.CREDITS, 1, 15)
    await assert_clean(store)


async def test_reject_refuses_usage_above_the_estimate(store: RedisStore, clock: ManualClock) -> None:
    document = default_document()
    document["products"]["codex"]["overage"] = "reject"
    engine = QuotaEngine(parse_plans(document), store, clock)
    await engine.check_and_reserve("a", "codex", "r1", est(3))
    with pytest.raises(QuotaError) as err:
        await engine.commit("a", "r1", est(4))
    assert err.value.reason == "COST_EXCEEDS_HOLD"
    assert [e.type for e in await outbox(store)] == ["hold"]  # nothing changed
    c = await engine.commit("a", "r1", est(3))
    assert (c.written_off, c.free_charged) == (0, 1)
    await assert_clean(store)


async def test_a_window_rolled_between_hold_and_commit(store: RedisStore, clock: ManualClock,
                                                       redis_client: aioredis.Redis, key_prefix: str) -> None:
    engine = QuotaEngine(plans_with(daily_free=20), store, clock)
    clock.set(utc_ms(2026, 11, 22, 23, 30))  # Sunday 23:30 UTC: the last half hour of the day and week
    await engine.check_and_reserve("a", "codex", "r1", est(5), ttl_seconds=7200)
    clock.advance(hours=1)  # Monday 00:30: a new day
    await engine.check_and_reserve("a", "codex", "r2", est(1))
    await engine.commit("a", "r1", est(2))  # charged to Sunday's counter, where the hold was
    free = await redis_client.hgetall(key(key_prefix, "a", "free"))
    assert free == {"codex|daily|d20261122": "2", "codex|daily|d20261123": "1"}
    await assert_clean(store)


async def test_rolling_resets_at_follows_the_oldest_use(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.check_and_reserve("a", "codex", "r1", est(3))
    await engine.commit("a", "r1")
    clock.advance(hours=1)
    await engine.check_and_reserve("a", "codex", "r2", est(4))
    await engine.commit("a", "r2")
    codex = next(a for a in (await engine.balance("a")).allowances if a.product == "codex")
    assert by_id(codex)["five_hour"] == (7, 10, T0_MS + 5 * HOUR_MS)
    clock.set(T0_MS + 5 * HOUR_MS)  # r1's use leaves the window with its whole amount
    codex = next(a for a in (await engine.balance("a")).allowances if a.product == "codex")
    assert by_id(codex)["five_hour"] == (4, 10, T0_MS + 6 * HOUR_MS)
    assert by_id(codex)["weekly"][:2] == (7, 40)


async def test_quote_agrees_with_check_and_reserve(engine: QuotaEngine) -> None:
    await engine.grant("a", 3, "p1")
    for rid, credits in (("r1", 4), ("r2", 7), ("r3", 6), ("r4", 2), ("r5", 3)):
        quoted = await engine.quote("a", "codex", "", est(credits), 0)
        decided = await engine.check_and_reserve("a", "codex", rid, est(credits))
        assert quoted.outcome == decided.outcome, rid
    # Free, credits (too big for the window), free again, credits, denied for lack of credits.
    assert decided.outcome.allowed is False


async def test_non_metered_products_still_count_jobs(engine: QuotaEngine, store: RedisStore) -> None:
    # sora: one unit per job, the same outbox as before (no usage fields, df 1).
    d = (await engine.check_and_reserve("a", "sora", "v1", V10)).outcome
    assert (d.funding, d.free_used, d.free_limit) == (Funding.FREE_QUOTA, 1, 30)
    await engine.commit("a", "v1")
    await engine.check_and_reserve("a", "sora", "v2", V10)
    await engine.release("a", "v2")
    entries = await outbox(store)
    assert [(e.type, e.deltas.free_units) for e in entries] == [("hold", 1), ("commit", 0), ("hold", 1),
                                                                ("release", -1)]
    assert all("usage" not in e.fields and "usage_held" not in e.fields for e in entries)
    assert entries[1].fields.keys() >= {"credits", "free", "returned"} and "free_units" not in entries[1].fields


async def test_included_usage_reaches_the_books(engine: QuotaEngine, store: RedisStore, books: Any) -> None:
    await engine.check_and_reserve("a", "codex", "r1", est(4))
    await engine.commit("a", "r1", est(2))
    await engine.check_and_reserve("a", "codex", "r2", est(3))
    await engine.release("a", "r2")
    await Shipper(store, books, ManualClock(T0_MS), owner="t", options=ShipperOptions()).drain()
    shipped = await books.account_entries("a")
    assert [(e.type, e.deltas.free_units) for e in shipped] == [("hold", 4), ("commit", -2), ("hold", 3),
                                                                ("release", -3)]
    assert shipped[1].fields["usage"] == "2" and shipped[1].fields["usage_held"] == "4"
    audits = await audit_all(store, books=books)
    assert all(a.ok for a in audits), format_report(audits)


def test_packaged_codex_is_metered_with_included_usage() -> None:
    plans = load_plans()
    assert plans.product("codex").kind == "metered"
    assert plans.job_cost("codex", est(3)) == 3
    assert plans.job_cost("codex", JobParams()) == 5  # the default hold
