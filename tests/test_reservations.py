"""The decision rules, through the engine, on a real Redis, with a manual clock."""

from __future__ import annotations

import pytest
from quota_fixtures import T0_MS, key, per_task_plans

from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Conflict, InvalidArgument, NotFound, ResolutionConflict
from quota_sidecar.domain.model import DenialReason, Funding, JobParams
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")  # 1 credit
V15 = JobParams(duration_seconds=15, resolution="720p")  # 2 credits
DAY_MS = 86_400_000


async def use_free(engine: QuotaEngine, account: str, n: int, product: str = "sora", job: JobParams = V10) -> None:
    for i in range(n):
        d = await engine.check_and_reserve(account, product, f"free-{i}", job)
        assert d.outcome.allowed and d.outcome.funding is Funding.FREE_QUOTA, d
        await engine.commit(account, f"free-{i}")


async def lots_left(engine: QuotaEngine, account: str) -> dict[str, int]:
    return {lot.lot_id: lot.credits_left for lot in (await engine.balance(account)).lots}


@pytest.mark.parametrize("plan,limit", [("free", 30), ("plus", 30), ("pro", 100)])
async def test_free_daily_allowance_per_plan(engine: QuotaEngine, plan: str, limit: int) -> None:
    if plan != "free":
        await engine.set_account("a", plan=plan)
    await use_free(engine, "a", limit)
    d = await engine.check_and_reserve("a", "sora", "one-too-many", V10)
    assert not d.outcome.allowed
    assert d.outcome.denial is DenialReason.PURCHASE_REQUIRED
    assert (d.outcome.free_used, d.outcome.free_limit) == (limit, limit)


async def test_denial_carries_shortfall_offers_and_reset(engine: QuotaEngine) -> None:
    await use_free(engine, "a", 30)
    d = await engine.check_and_reserve("a", "sora", "r", V15)
    o = d.outcome
    assert (o.allowed, o.denial, o.credits_short, o.cost_credits, o.credit_balance) == (
        False, DenialReason.PURCHASE_REQUIRED, 2, 2, 0)
    assert [(x.pack.pack_id, x.quantity, x.total_price.minor_units) for x in d.offers] == [("pack_10", 1, 400)]
    assert o.free_resets_ms == T0_MS + 12 * 3_600_000  # next UTC midnight
    assert "2 more credit" in d.denial_message
    assert (await engine.balance("a")).holds == ()


async def test_grant_is_usable_by_the_very_next_reservation(engine: QuotaEngine) -> None:
    await use_free(engine, "a", 30)
    assert not (await engine.check_and_reserve("a", "sora", "r1", V15)).outcome.allowed
    g = await engine.grant("a", 10, "purchase-1")
    assert (g.credit_balance, g.replayed) == (10, False)
    d = await engine.check_and_reserve("a", "sora", "r1", V15)  # same id: denials are not remembered
    assert (d.outcome.allowed, d.outcome.funding, d.outcome.credits_held, d.outcome.credit_balance) == (
        True, Funding.CREDITS, 2, 8)


async def test_free_allowance_is_used_before_credits(engine: QuotaEngine) -> None:
    await engine.grant("a", 10, "p1")
    d = await engine.check_and_reserve("a", "sora", "r", V15)
    assert (d.outcome.funding, d.outcome.credits_held, d.outcome.credit_balance, d.outcome.free_used) == (
        Funding.FREE_QUOTA, 0, 10, 1)


async def test_a_job_is_funded_wholly_by_one_source(engine: QuotaEngine) -> None:
    await use_free(engine, "a", 30)
    await engine.grant("a", 1, "p1")
    d = await engine.check_and_reserve("a", "sora", "r", V15)  # costs 2, only 1 credit
    assert (d.outcome.allowed, d.outcome.credits_short) == (False, 1)
    assert await lots_left(engine, "a") == {"p1": 1}


async def test_not_entitled_holds_nothing_and_buying_does_not_help(engine: QuotaEngine) -> None:
    await engine.grant("a", 100, "p1")
    for job in (JobParams(duration_seconds=20, resolution="720p"), JobParams(duration_seconds=10, resolution="1080p")):
        d = await engine.check_and_reserve("a", "sora", "r", job)
        assert (d.outcome.allowed, d.outcome.denial) == (False, DenialReason.NOT_ENTITLED)
        assert d.offers == () and "plan free" in d.denial_message
    b = await engine.balance("a")
    assert (b.allowances[0].free_used, b.credit_balance, b.holds) == (0, 100, ())
    await engine.set_account("a", plan="pro")
    d = await engine.check_and_reserve("a", "sora", "r", JobParams(duration_seconds=25, resolution="1080p"))
    assert d.outcome.allowed
    d = await engine.check_and_reserve("a", "sora", "r2", JobParams(duration_seconds=26, resolution="1080p"))
    assert d.outcome.denial is DenialReason.NOT_ENTITLED


async def test_soonest_expiring_lot_is_spent_first(engine: QuotaEngine) -> None:
    await engine.grant("a", 10, "later", T0_MS + 200 * DAY_MS)
    await engine.grant("a", 2, "sooner", T0_MS + 20 * DAY_MS)
    await engine.grant("a", 10, "default")  # 12 months
    await use_free(engine, "a", 30)
    await engine.check_and_reserve("a", "sora", "r1", V10)
    assert await lots_left(engine, "a") == {"sooner": 1, "later": 10, "default": 10}
    await engine.check_and_reserve("a", "sora", "r2", V15)  # 2 credits: 1 from sooner, 1 from later
    assert await lots_left(engine, "a") == {"later": 9, "default": 10}
    assert [lot.lot_id for lot in (await engine.balance("a")).lots] == ["later", "default"]


async def test_expired_lot_is_never_spent(engine: QuotaEngine, clock: ManualClock) -> None:
    six_hours_ms = 6 * 3_600_000  # expires before the free window ends at midnight
    await engine.grant("a", 5, "short", T0_MS + six_hours_ms)
    await use_free(engine, "a", 30)
    clock.advance(ms=six_hours_ms - 1)
    assert (await engine.balance("a")).credit_balance == 5
    clock.advance(ms=1)  # exactly at expiry: gone
    b = await engine.balance("a")
    assert (b.credit_balance, b.lots) == (0, ())
    d = await engine.check_and_reserve("a", "sora", "r", V10)
    assert (d.outcome.allowed, d.outcome.denial, d.outcome.credits_short) == (
        False, DenialReason.PURCHASE_REQUIRED, 1)


async def test_partial_commit_returns_the_rest_to_the_lots_it_came_from(engine: QuotaEngine) -> None:
    await engine.set_account("a", plan="pro")
    await engine.grant("a", 3, "sooner", T0_MS + 10 * DAY_MS)
    await engine.grant("a", 10, "later", T0_MS + 100 * DAY_MS)
    await use_free(engine, "a", 100)
    d = await engine.check_and_reserve("a", "sora", "r", JobParams(duration_seconds=25, resolution="1080p"))
    assert d.outcome.credits_held == 6  # 3 steps x 2
    assert await lots_left(engine, "a") == {"later": 7}
    c = await engine.commit("a", "r", JobParams(duration_seconds=8, resolution="1080p"))  # actual cost 2
    assert (c.credits_charged, c.credits_refunded, c.credit_balance, c.replayed) == (2, 4, 11, False)
    # the 2 spent are the soonest-expiring ones; what comes back goes to the lots it was taken from
    assert await lots_left(engine, "a") == {"sooner": 1, "later": 10}


async def test_commit_above_the_hold_is_refused_and_changes_nothing(engine: QuotaEngine) -> None:
    await use_free(engine, "a", 30)
    await engine.grant("a", 10, "p")
    await engine.check_and_reserve("a", "sora", "r", V10)
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("a", "r", V15)
    assert err.value.reason == "COST_EXCEEDS_HOLD"
    with pytest.raises(InvalidArgument) as bad:
        await engine.commit("a", "r", JobParams(duration_seconds=5, resolution="4k"))
    assert bad.value.field == "params.resolution"
    b = await engine.balance("a")
    assert (b.credit_balance, b.credits_held) == (9, 1)
    assert (await engine.commit("a", "r")).credits_charged == 1


async def test_release_refunds_free_unit_and_credits(engine: QuotaEngine) -> None:
    await engine.check_and_reserve("a", "sora", "free", V10)
    r = await engine.release("a", "free")
    assert (r.funding, r.free_refunded, r.credits_refunded) == (Funding.FREE_QUOTA, 1, 0)
    assert (await engine.balance("a")).allowances[0].free_used == 0
    await use_free(engine, "a", 30)
    await engine.grant("a", 10, "p")
    await engine.check_and_reserve("a", "sora", "paid", V15)
    r = await engine.release("a", "paid")
    assert (r.funding, r.credits_refunded, r.credit_balance) == (Funding.CREDITS, 2, 10)
    assert await lots_left(engine, "a") == {"p": 10}


async def test_expired_hold_is_refunded_like_a_release(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.grant("a", 10, "p")
    await use_free(engine, "a", 29)
    await engine.check_and_reserve("a", "sora", "free", V10, ttl_seconds=60)
    await engine.check_and_reserve("a", "sora", "paid", V15, ttl_seconds=60)
    b = await engine.balance("a")
    assert (b.allowances[0].free_used, b.credit_balance, b.credits_held) == (30, 8, 2)
    clock.advance(seconds=59.999)
    assert len((await engine.balance("a")).holds) == 2
    clock.advance(ms=1)
    b = await engine.balance("a")
    assert (b.allowances[0].free_used, b.credit_balance, b.holds) == (29, 10, ())
    for resolve in (engine.commit, engine.release):
        with pytest.raises(ResolutionConflict) as err:
            await resolve("a", "paid")
        assert err.value.reason == "EXPIRED"


async def test_hold_past_its_ttl_expires_on_commit_even_before_any_sweep(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.check_and_reserve("a", "sora", "r", V10, ttl_seconds=5)
    clock.advance(seconds=5)
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("a", "r")
    assert err.value.reason == "EXPIRED"
    assert (await engine.balance("a")).allowances[0].free_used == 0


async def test_extend_pushes_expiry_and_never_shortens(engine: QuotaEngine, clock: ManualClock) -> None:
    d = await engine.check_and_reserve("a", "sora", "r", V10, ttl_seconds=60)
    assert d.outcome.expires_ms == T0_MS + 60_000
    clock.advance(seconds=50)
    assert await engine.extend("a", "r", 120) == T0_MS + 170_000
    assert await engine.extend("a", "r", 1) == T0_MS + 170_000  # never shortens
    clock.advance(seconds=100)  # past the original expiry
    assert await engine.extend("a", "r") == clock.now_ms + 60_000  # 0 = the original lifetime
    c = await engine.commit("a", "r")
    assert (c.funding, c.free_charged) == (Funding.FREE_QUOTA, 1)
    with pytest.raises(ResolutionConflict) as err:
        await engine.extend("a", "r", 60)
    assert err.value.reason == "ALREADY_COMMITTED"


async def test_each_reservation_resolves_exactly_once(engine: QuotaEngine) -> None:
    await use_free(engine, "a", 30)
    await engine.grant("a", 10, "p")
    await engine.check_and_reserve("a", "sora", "c", V15)
    first = await engine.commit("a", "c", V10)
    again = await engine.commit("a", "c", V10)
    assert (first.credits_charged, again.credits_charged, again.replayed) == (1, 1, True)
    assert again.credit_balance == first.credit_balance == 9
    with pytest.raises(Conflict) as conflict:
        await engine.commit("a", "c")  # whole hold: a different outcome
    assert conflict.value.reason == "COMMIT_COST_MISMATCH"
    with pytest.raises(ResolutionConflict) as err:
        await engine.release("a", "c")
    assert err.value.reason == "ALREADY_COMMITTED"

    await engine.check_and_reserve("a", "sora", "x", V15)
    assert (await engine.release("a", "x")).credits_refunded == 2
    replay = await engine.release("a", "x")
    assert (replay.replayed, replay.credit_balance) == (True, 9)
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("a", "x")
    assert err.value.reason == "ALREADY_RELEASED"
    with pytest.raises(NotFound):
        await engine.release("a", "never-made")
    assert (await engine.balance("a")).credit_balance == 9


async def test_retry_with_same_id_replays_and_never_holds_twice(engine: QuotaEngine) -> None:
    first = await engine.check_and_reserve("a", "sora", "job-1", V10, ttl_seconds=300)
    again = await engine.check_and_reserve("a", "sora", "job-1", V10, ttl_seconds=300)
    assert (first.outcome.replayed, again.outcome.replayed) == (False, True)
    assert again.outcome.expires_ms == first.outcome.expires_ms and again.outcome.free_used == 1
    b = await engine.balance("a")
    assert (b.allowances[0].free_used, len(b.holds)) == (1, 1)
    for changed in ((V15, 300), (V10, 301), (JobParams(duration_seconds=10, resolution="720p", extra={"k": "v"}), 300)):
        with pytest.raises(Conflict) as err:
            await engine.check_and_reserve("a", "sora", "job-1", changed[0], ttl_seconds=changed[1])
        assert err.value.reason == "RESERVATION_PARAMS_MISMATCH"
    with pytest.raises(Conflict):
        await engine.check_and_reserve("a", "codex", "job-1", JobParams())
    assert (await engine.balance("a")).allowances[0].free_used == 1


async def test_reservation_ids_are_scoped_to_the_account(engine: QuotaEngine) -> None:
    await engine.check_and_reserve("a", "sora", "same", V10)
    d = await engine.check_and_reserve("b", "sora", "same", V10)
    assert (d.outcome.allowed, d.outcome.replayed) == (True, False)


async def test_server_makes_an_id_when_none_is_given(engine: QuotaEngine) -> None:
    d1 = await engine.check_and_reserve("a", "sora", "", V10)
    d2 = await engine.check_and_reserve("a", "sora", "", V10)
    assert d1.reservation_id != d2.reservation_id and d1.reservation_id.startswith("r-")
    assert (await engine.commit("a", d1.reservation_id)).free_charged == 1


async def test_codex_allowance_and_model_pricing(store: RedisStore, clock: ManualClock) -> None:
    # codex priced per task (docs/plans.md, the documented alternative); metered: test_metered.py.
    engine = QuotaEngine(per_task_plans(), store, clock)
    await use_free(engine, "a", 10, product="codex", job=JobParams(model="codex-mini"))
    await engine.grant("a", 10, "p")
    d = await engine.check_and_reserve("a", "codex", "r", JobParams(model="codex", units=3))
    assert (d.outcome.funding, d.outcome.credits_held) == (Funding.CREDITS, 6)
    d = await engine.check_and_reserve("a", "codex", "r2", JobParams(model="codex-max"))
    assert d.outcome.denial is DenialReason.NOT_ENTITLED
    # sora's allowance is separate; the wallet is shared
    d = await engine.check_and_reserve("a", "sora", "v", V10)
    assert (d.outcome.funding, d.outcome.credit_balance) == (Funding.FREE_QUOTA, 4)


async def test_grant_is_idempotent_by_purchase_id(engine: QuotaEngine) -> None:
    g1 = await engine.grant("a", 10, "order-1")
    g2 = await engine.grant("a", 10, "order-1")
    assert (g2.replayed, g2.credit_balance, g2.lot) == (True, 10, g1.lot)
    assert g1.lot.expires_ms == T0_MS + 365 * DAY_MS  # 2026-11-21 -> 2027-11-21
    with pytest.raises(Conflict) as err:
        await engine.grant("a", 20, "order-1")
    assert err.value.reason == "PURCHASE_ID_CONFLICT"
    with pytest.raises(InvalidArgument) as bad:
        await engine.grant("a", 5, "order-2", T0_MS)
    assert bad.value.field == "expires_at"
    assert (await engine.balance("a")).credit_balance == 10


async def test_unknown_plan_in_store_is_reported(engine: QuotaEngine, store, redis_client, key_prefix) -> None:
    await redis_client.hset(key(key_prefix, "a", "acct"), "plan", "legacy")
    with pytest.raises(ResolutionConflict) as err:
        await engine.check_and_reserve("a", "sora", "r", V10)
    assert err.value.reason == "UNKNOWN_PLAN"


async def test_many_lots_expiring_at_once_are_never_spent(engine: QuotaEngine, clock: ManualClock,
                                                          redis_client, key_prefix: str) -> None:
    # More lots than lazy expiry settles in one call (64): none may stay spendable.
    expiry_ms = T0_MS + 3_600_000
    for i in range(70):
        await engine.grant("a", 1, f"promo-{i:02d}", expiry_ms)
    await engine.grant("a", 3, "paid", T0_MS + 100 * DAY_MS)
    await use_free(engine, "a", 30)
    assert (await engine.balance("a")).credit_balance == 73
    clock.advance(hours=1)
    d = await engine.check_and_reserve("a", "sora", "r", V15)
    assert (d.outcome.credits_held, d.outcome.credit_balance) == (2, 1)
    assert await lots_left(engine, "a") == {"paid": 1}
    expired = await redis_client.hget(key(key_prefix, "a", "acct"), "credits_expired")
    assert expired == "70"  # settled over the calls above (balance, reserve, balance)


@pytest.mark.parametrize("ending", ["commit", "release", "expire"])
async def test_a_resolved_record_drops_its_stored_decision(engine: QuotaEngine, clock: ManualClock, redis_client,
                                                            key_prefix: str, ending: str) -> None:
    """The decision JSON replays only a live hold; the record kept for retries after resolution is
    smaller without it, and a retry still answers the resolution."""
    import json

    job = JobParams(duration_seconds=10, resolution="720p")
    first = await engine.check_and_reserve("acct", "sora", "r1", job, ttl_seconds=60)
    records = key(key_prefix, "acct", "res")
    assert "d" in json.loads(await redis_client.hget(records, "r1"))
    assert (await engine.check_and_reserve("acct", "sora", "r1", job, ttl_seconds=60)).outcome.replayed
    if ending == "commit":
        await engine.commit("acct", "r1")
    elif ending == "release":
        await engine.release("acct", "r1")
    else:
        clock.advance(seconds=61)
        await engine.balance("acct")  # settles the expired hold
    kept = json.loads(await redis_client.hget(records, "r1"))
    assert "d" not in kept and kept["s"] == {"commit": "committed", "release": "released", "expire": "expired"}[ending]
    with pytest.raises(ResolutionConflict):
        await engine.check_and_reserve("acct", "sora", "r1", job, ttl_seconds=60)
    assert first.outcome.allowed
