"""Scripts read and check everything before their first write (Redis keeps the writes of a script
that fails midway). Corrupt account data makes the decision fail at the point where it used to
have taken the credits already; nothing may be written, for a single reservation or a batch."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from quota_fixtures import keys_with_prefix

from quota_sidecar.domain.engine import QuotaEngine, ReserveItem
from quota_sidecar.domain.errors import QuotaError
from quota_sidecar.domain.model import JobParams, Limit, LimitKind, LimitOverride

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")


async def _snapshot(client: aioredis.Redis, prefix: str) -> dict[str, object]:
    """Every key of the test's prefix with its content (order-insensitive where Redis is)."""
    state: dict[str, object] = {}
    for k in await keys_with_prefix(client, prefix):
        kind = await client.type(k)
        if kind == "hash":
            state[k] = await client.hgetall(k)
        elif kind == "zset":
            state[k] = await client.zrange(k, 0, -1, withscores=True)
        elif kind == "stream":
            state[k] = await client.xrange(k)
        else:
            state[k] = (kind, await client.dump(k))
    return state


async def _corrupt_auto_topup(engine: QuotaEngine, client: aioredis.Redis, prefix: str, account: str) -> None:
    """Credits to spend and an auto top-up whose threshold is not a number (written behind the
    API's back: SetAccount refuses it)."""
    await engine.grant(account, 10, "p1")
    await engine.set_account(account, overrides=(LimitOverride("sora", (Limit("daily", LimitKind.DAY, 1),), 0),))
    acct_key = next(k for k in await keys_with_prefix(client, prefix) if k.endswith(f":{account}:acct"))
    await client.hset(acct_key, mapping={"at_on": "1", "at_thr": "not-a-number", "at_pack": "pack_10"})


async def test_a_reservation_on_corrupt_data_writes_nothing(engine: QuotaEngine, redis_client: aioredis.Redis,
                                                           key_prefix: str) -> None:
    await _corrupt_auto_topup(engine, redis_client, key_prefix, "bad")
    await engine.check_and_reserve("bad", "sora", "free-1", V10)  # the one free unit: no credits touched
    before = await _snapshot(redis_client, key_prefix)
    with pytest.raises(QuotaError) as err:
        await engine.check_and_reserve("bad", "sora", "paid-1", V10)  # would take a credit
    assert err.value.reason == "ACCOUNT_CORRUPT"
    assert await _snapshot(redis_client, key_prefix) == before


async def test_an_all_or_nothing_batch_failing_midway_writes_nothing(engine: QuotaEngine,
                                                                    redis_client: aioredis.Redis,
                                                                    key_prefix: str) -> None:
    await _corrupt_auto_topup(engine, redis_client, key_prefix, "bad")
    before = await _snapshot(redis_client, key_prefix)
    # The first item takes the free unit (a hold, a record, an outbox entry and its seq); the second would take
    # credits and fails: the first must be undone and no trace of either left.
    results = await engine.check_and_reserve_all([ReserveItem("bad", "sora", "b1", V10),
                                                 ReserveItem("bad", "sora", "b2", V10)])
    assert [getattr(r, "reason", None) for r in results] == ["ALL_OR_NOTHING_ABORTED", "ACCOUNT_CORRUPT"]
    assert await _snapshot(redis_client, key_prefix) == before
