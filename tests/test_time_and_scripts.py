"""Windows in the account's zone, one clock for all sidecars, script loading, sweeping."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis
from quota_fixtures import T0_MS, flush_scripts, has_functions, key, keys_with_prefix, script_calls, utc_ms

from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Unavailable
from quota_sidecar.domain.model import DenialReason, Funding, JobParams
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")


async def fill(engine: QuotaEngine, account: str, n: int, tag: str) -> None:
    for i in range(n):
        d = await engine.check_and_reserve(account, "sora", f"{tag}-{i}", V10)
        assert d.outcome.funding is Funding.FREE_QUOTA
        await engine.commit(account, f"{tag}-{i}")


async def test_window_rolls_over_at_local_midnight_across_spring_forward(engine: QuotaEngine, clock: ManualClock) -> None:
    # New York, Sunday 2026-03-08: clocks jump 02:00 EST -> 03:00 EDT, a 23-hour day.
    await engine.set_account("ny", tz="America/New_York")
    clock.set(utc_ms(2026, 3, 8, 5, 0))  # 00:00 EST, the day's first instant
    d = await engine.check_and_reserve("ny", "sora", "first", V10)
    assert d.outcome.free_resets_ms == utc_ms(2026, 3, 9, 4, 0)  # 00:00 EDT: 23 h later
    await engine.commit("ny", "first")
    await fill(engine, "ny", 29, "day1")
    clock.set(utc_ms(2026, 3, 9, 3, 59, 59))  # 23:59:59 EDT on the 8th
    d = await engine.check_and_reserve("ny", "sora", "late", V10)
    assert (d.outcome.allowed, d.outcome.denial) == (False, DenialReason.PURCHASE_REQUIRED)
    clock.advance(seconds=1)  # local midnight
    d = await engine.check_and_reserve("ny", "sora", "late", V10)
    assert (d.outcome.allowed, d.outcome.free_used) == (True, 1)
    assert d.outcome.free_resets_ms == utc_ms(2026, 3, 10, 4, 0)  # a normal 24-hour day


async def test_window_is_25_hours_on_fall_back_day(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.set_account("ny", tz="America/New_York")
    clock.set(utc_ms(2026, 11, 1, 4, 0))  # 00:00 EDT, Sunday 2026-11-01
    await fill(engine, "ny", 30, "d")
    clock.set(utc_ms(2026, 11, 2, 4, 59, 59))  # 23:59:59 EST: 25 h later, same local day
    assert not (await engine.check_and_reserve("ny", "sora", "x", V10)).outcome.allowed
    clock.advance(seconds=1)
    assert (await engine.check_and_reserve("ny", "sora", "x", V10)).outcome.allowed


async def test_utc_account_and_tokyo_account_reset_at_their_own_midnight(engine: QuotaEngine, clock: ManualClock) -> None:
    await engine.set_account("jp", tz="Asia/Tokyo")
    d_utc = await engine.check_and_reserve("u", "sora", "r", V10)
    d_jp = await engine.check_and_reserve("jp", "sora", "r", V10)
    assert d_utc.outcome.free_resets_ms == utc_ms(2026, 11, 22, 0, 0)
    assert d_jp.outcome.free_resets_ms == utc_ms(2026, 11, 21, 15, 0)  # midnight JST
    b = await engine.balance("jp")
    assert b.time_zone == "Asia/Tokyo" and b.allowances[0].free_resets_ms == utc_ms(2026, 11, 21, 15, 0)


async def test_a_sidecar_with_a_stale_zone_still_uses_the_accounts_zone(store: RedisStore, clock: ManualClock) -> None:
    plans = load_plans()
    sidecar_a, sidecar_b = QuotaEngine(plans, store, clock), QuotaEngine(plans, store, clock)
    assert (await sidecar_b.balance("acct")).time_zone == "UTC"  # b now caches UTC
    await sidecar_a.set_account("acct", tz="Pacific/Auckland")
    d = await sidecar_b.check_and_reserve("acct", "sora", "r", V10)
    assert d.outcome.free_resets_ms == utc_ms(2026, 11, 22, 11, 0)  # midnight NZDT (+13)


class SkewedClock:
    """A sidecar whose own clock is off; Redis' clock decides (nothing pinned)."""

    def __init__(self, skew_ms: int) -> None:
        self.skew_ms = skew_ms

    def local_now_ms(self) -> int:
        return time.time_ns() // 1_000_000 + self.skew_ms

    def pinned_now_ms(self) -> int:
        return 0


async def test_redis_clock_decides_the_window_whatever_the_sidecar_clock(store: RedisStore) -> None:
    plans = load_plans()
    honest = QuotaEngine(plans, store, SkewedClock(0))
    fast = QuotaEngine(plans, store, SkewedClock(5 * 3_600_000))  # 5 hours ahead
    slow = QuotaEngine(plans, store, SkewedClock(-20 * 3_600_000))  # 20 hours behind
    outcomes = [(await e.check_and_reserve("acct", "sora", f"r{i}", V10)).outcome for i, e in
                enumerate((honest, fast, slow))]
    assert {o.free_resets_ms for o in outcomes} == {outcomes[0].free_resets_ms}
    assert [o.free_used for o in outcomes] == [1, 2, 3]
    far_off = QuotaEngine(plans, store, SkewedClock(3 * 86_400_000))
    with pytest.raises(Unavailable) as err:
        await far_off.check_and_reserve("acct", "sora", "r9", V10)
    assert err.value.reason == "CLOCK_SKEW"


async def test_scripts_survive_script_flush(engine: QuotaEngine, redis_client: aioredis.Redis) -> None:
    # SCRIPT FLUSH, and FUNCTION FLUSH on Redis 7: what the store calls is gone each time.
    assert (await engine.check_and_reserve("a", "sora", "r1", V10)).outcome.allowed
    await flush_scripts(redis_client)
    assert (await engine.check_and_reserve("a", "sora", "r2", V10)).outcome.free_used == 2
    await flush_scripts(redis_client)
    assert (await engine.commit("a", "r1")).free_charged == 1
    await flush_scripts(redis_client)
    assert (await engine.balance("a")).allowances[0].free_used == 2


async def test_the_store_calls_fcall_on_redis_7_and_evalsha_on_6(engine: QuotaEngine, store: RedisStore,
                                                                  redis_client: aioredis.Redis) -> None:
    functions = await has_functions(redis_client)
    await store.load_scripts()  # the mode chosen, every script loaded: no NOSCRIPT below (6.2 counts it a call)
    fcalls, evalshas = await script_calls(redis_client, "fcall"), await script_calls(redis_client, "evalsha")
    assert (await engine.check_and_reserve("a", "sora", "r1", V10)).outcome.allowed
    await engine.commit("a", "r1")
    # Two decisions, two script calls, all of them of the one verb.
    assert (await script_calls(redis_client, "fcall") - fcalls,
            await script_calls(redis_client, "evalsha") - evalshas) == ((2, 0) if functions else (0, 2))
    assert store.script_verb == ("FCALL" if functions else "EVALSHA")


# Functions exist only on Redis 7: run on the newest server (a 6.2-only machine skips).
@pytest.mark.newest_redis_only
async def test_decisions_survive_function_flush(engine: QuotaEngine, redis_client: aioredis.Redis) -> None:
    if not await has_functions(redis_client):
        pytest.skip("Redis 6.2 has no Functions (SCRIPT FLUSH: test_scripts_survive_script_flush)")
    assert (await engine.check_and_reserve("a", "sora", "r1", V10)).outcome.allowed
    await redis_client.function_flush()  # "ERR Function not found": the library is loaded again
    assert (await engine.check_and_reserve("a", "sora", "r2", V10)).outcome.free_used == 2
    assert await redis_client.function_list(library="quota_sidecar_*")
    await redis_client.function_flush()
    assert (await engine.commit("a", "r1")).free_charged == 1
    await redis_client.function_flush()
    assert (await engine.release("a", "r2")).free_refunded == 1


# Functions exist only on Redis 7: run on the newest server (a 6.2-only machine skips).
@pytest.mark.newest_redis_only
async def test_the_library_of_another_code_version_stays(store: RedisStore, engine: QuotaEngine,
                                                         redis_client: aioredis.Redis) -> None:
    # Another sidecar of a rolling deploy, on other code: its library and functions are its own.
    if not await has_functions(redis_client):
        pytest.skip("Redis 6.2 has no Functions")
    other = "#!lua name=quota_sidecar_000000000000\n" \
            "redis.register_function('qs_reserve_000000000000', function(keys, args) return 'other' end)"
    await redis_client.function_load(other, replace=True)
    try:
        await store.load_scripts()
        assert (await engine.check_and_reserve("a", "sora", "r1", V10)).outcome.allowed
        assert await redis_client.fcall("qs_reserve_000000000000", 0) == "other"
        # FUNCTION LIST's reply: [["library_name", name, "engine", ..., "functions", [...]], ...]
        names = {dict(zip(lib[::2], lib[1::2]))["library_name"]
                 for lib in await redis_client.function_list(library="quota_sidecar_*")}
        assert "quota_sidecar_000000000000" in names and len(names) >= 2
    finally:
        await redis_client.function_delete("quota_sidecar_000000000000")


async def test_sweeper_refunds_holds_of_idle_accounts(engine: QuotaEngine, clock: ManualClock,
                                                      redis_client: aioredis.Redis, key_prefix: str) -> None:
    await engine.grant("idle", 10, "p")
    for i in range(30):
        await engine.check_and_reserve("idle", "sora", f"f-{i}", V10)  # free holds, default TTL 900 s
    await engine.check_and_reserve("idle", "sora", "paid", V10, ttl_seconds=30)
    await engine.check_and_reserve("busy", "sora", "r", V10, ttl_seconds=3600)
    assert await redis_client.hget(key(key_prefix, "idle", "lotrem"), "p") == "9"
    assert await engine.sweep() == 0
    clock.advance(seconds=900)
    assert await engine.sweep() == 31
    holds_keys = [k for k in await keys_with_prefix(redis_client, key_prefix) if k.endswith(":holds")]
    assert holds_keys == [key(key_prefix, "busy", "holds")]
    lefts = await redis_client.hgetall(key(key_prefix, "idle", "lotrem"))
    assert lefts == {"p": "10"}
    assert await engine.sweep() == 0


async def test_resolved_reservations_are_pruned_after_retention(redis_server, key_prefix: str) -> None:
    clock = ManualClock(T0_MS)
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, retention_ms=86_400_000)
    try:
        engine = QuotaEngine(load_plans(), store, clock)
        await engine.check_and_reserve("a", "sora", "old", V10)
        await engine.commit("a", "old")
        client = aioredis.from_url(redis_server.url, decode_responses=True)
        assert await client.hexists(key(key_prefix, "a", "res"), "old")
        clock.advance(days=1, ms=1)
        await engine.check_and_reserve("a", "sora", "new", V10)
        assert not await client.hexists(key(key_prefix, "a", "res"), "old")
        assert await client.zcard(key(key_prefix, "a", "resdone")) == 0
        await client.aclose()
    finally:
        await store.close()


async def test_old_free_windows_are_pruned(engine: QuotaEngine, clock: ManualClock,
                                           redis_client: aioredis.Redis, key_prefix: str) -> None:
    for day in range(4):
        await engine.check_and_reserve("a", "sora", f"s{day}", V10)
        await engine.commit("a", f"s{day}")
        await engine.check_and_reserve("a", "codex", f"c{day}", JobParams())
        await engine.commit("a", f"c{day}")
        clock.advance(days=1)
    fields = sorted(await redis_client.hkeys(key(key_prefix, "a", "free")))
    # On 2026-11-24 the oldest day still proposed is yesterday (11-23), the oldest week the one before
    # this one (from Monday 11-16): codex's included usage counts 5 credits a task (its default hold).
    assert fields == ["codex|weekly|w20261116", "codex|weekly|w20261123", "sora|daily|d20261123",
                      "sora|daily|d20261124"]
    assert await redis_client.hget(key(key_prefix, "a", "free"), "codex|weekly|w20261123") == "10"  # 2 x 5 credits
    # The rolling window's uses carry their amounts (pruned after 168 hours).
    assert await redis_client.zrange(key(key_prefix, "a", "rolling"), 0, -1) == [
        f"codex|five_hour|c{day}|5" for day in range(4)]
    clock.advance(days=7)
    await engine.check_and_reserve("a", "codex", "later", JobParams())
    assert sorted(await redis_client.hkeys(key(key_prefix, "a", "free"))) == [
        "codex|weekly|w20261123", "codex|weekly|w20261130"]
    assert await redis_client.zrange(key(key_prefix, "a", "rolling"), 0, -1) == ["codex|five_hour|later|5"]
