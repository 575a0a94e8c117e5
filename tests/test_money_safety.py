"""Money safety (issue 14): a retried job never runs free, an acknowledged degraded commit is
never lost, one account cannot fill Redis, retention reaches idle accounts, a commit cannot
charge a free hold for a bigger job than it covers, and the account views stay bounded.

Each test ran against the code before these rules and failed there; all run on real Redis
and, where a worker sees it, through the real gRPC server and client library.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import AsyncIterator

import grpc
import pytest
import redis.asyncio as aioredis
from quota_fixtures import T0_MS, Sidecar, key
from test_degraded import fail_open_plans
from test_grpc import details, reserve_request

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar.client import QuotaClient, ReservationError
from quota_sidecar.domain.audit import audit_account
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.degraded import DegradedMode
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import ResolutionConflict
from quota_sidecar.domain.model import DenialReason, Funding, JobParams
from quota_sidecar.server.journal import FileJournal
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

V10 = JobParams(duration_seconds=10, resolution="720p")
V1_480 = JobParams(duration_seconds=1, resolution="480p")
DAY_MS = 86_400_000


# -- 1. a replay tells the truth about the reservation now ---------------------------------------

@pytest.mark.parametrize("ending", ["commit", "release", "expire"])
async def test_a_retry_of_a_resolved_reservation_is_refused_not_allowed(sidecar: Sidecar, clock: ManualClock,
                                                                        ending: str) -> None:
    await sidecar.engine.grant("rita", 10, "p1")
    first = await sidecar.quota.CheckAndReserve(reserve_request("rita", "job-7", ttl_seconds=60))
    assert first.allowed and not first.replayed
    if ending == "commit":
        await sidecar.quota.Commit(pb.CommitRequest(account_id="rita", reservation_id="job-7"))
    elif ending == "release":
        await sidecar.quota.Release(pb.ReleaseRequest(account_id="rita", reservation_id="job-7"))
    else:
        clock.advance(ms=61_000)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await sidecar.quota.CheckAndReserve(reserve_request("rita", "job-7", ttl_seconds=60))
    expected = {"commit": "ALREADY_COMMITTED", "release": "ALREADY_RELEASED", "expire": "EXPIRED"}[ending]
    assert (err.value.code(), details(err.value)["ErrorInfo"].reason) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                                          expected)
    # Nothing was held again: the free unit is back (or spent once), no open hold.
    balance = await sidecar.quota.GetBalance(pb.GetBalanceRequest(account_id="rita"))
    assert (len(balance.holds), balance.allowances[0].free_used) == (0, 1 if ending == "commit" else 0)


async def test_a_retry_of_a_live_hold_replays_with_its_extended_expiry(sidecar: Sidecar, clock: ManualClock) -> None:
    first = await sidecar.quota.CheckAndReserve(reserve_request("lee", "job-1", ttl_seconds=60))
    clock.advance(ms=30_000)
    extended = await sidecar.quota.ExtendReservation(pb.ExtendReservationRequest(
        account_id="lee", reservation_id="job-1", ttl_seconds=600))
    again = await sidecar.quota.CheckAndReserve(reserve_request("lee", "job-1", ttl_seconds=60))
    assert (again.allowed, again.replayed, again.funding) == (True, True, first.funding)
    assert again.expires_at == extended.expires_at != first.expires_at


async def test_the_client_never_runs_a_job_body_under_a_released_reservation(sidecar: Sidecar) -> None:
    ran = []
    async with QuotaClient(f"127.0.0.1:{sidecar.port}") as client:
        with pytest.raises(RuntimeError):
            async with client.job("rob", "sora", {"duration_seconds": 10, "resolution": "720p"},
                                  reservation_id="render-42"):
                ran.append("first try")
                raise RuntimeError("render failed")  # the block releases the hold
        with pytest.raises(ReservationError) as err:
            async with client.job("rob", "sora", {"duration_seconds": 10, "resolution": "720p"},
                                  reservation_id="render-42"):
                ran.append("retry")  # would run free: nothing holds or charges it
    assert (ran, err.value.reason) == (["first try"], "ALREADY_RELEASED")


async def test_a_degraded_reservation_resolved_locally_does_not_replay_as_allowed(tmp_path: Path,
                                                                                  redis_binary: str) -> None:
    redis = RedisServerProcess(redis_binary, tmp_path / "redis")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=0.3)
    engine = QuotaEngine(fail_open_plans(), store, ManualClock(T0_MS),
                         degraded=DegradedMode(FileJournal(str(tmp_path / "journal.jsonl"))))
    try:
        redis.kill()
        assert (await engine.check_and_reserve("a", "sora", "d1", V10)).outcome.degraded
        await engine.release("a", "d1")
        with pytest.raises(ResolutionConflict) as err:
            await engine.check_and_reserve("a", "sora", "d1", V10)
        assert err.value.reason == "ALREADY_RELEASED"
    finally:
        await store.close()


# -- 2. an acknowledged degraded commit ends committed -------------------------------------------

@pytest.fixture
async def paused_rig(tmp_path: Path, redis_binary: str) -> AsyncIterator[tuple[RedisServerProcess, QuotaEngine]]:
    redis = RedisServerProcess(redis_binary, tmp_path / "redis", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=0.3)
    engine = QuotaEngine(fail_open_plans(), store, ManualClock(T0_MS),
                         degraded=DegradedMode(FileJournal(str(tmp_path / "journal.jsonl"))))
    # The connection is up before the stall, as on a live sidecar: a call then sends its script
    # and waits for the reply (a connection opened during the stall sends nothing).
    await store.load_scripts()  # as `serve` does at start-up
    await engine.balance("warm-up")
    try:
        yield redis, engine
    finally:
        os.kill(redis.pid, signal.SIGCONT)
        await store.close()
        redis.stop()


async def _record_state(redis: RedisServerProcess, account: str, rid: str) -> str | None:
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    try:
        raw = await client.hget(key("qs", account, "res"), rid)
    finally:
        await client.aclose()
    return None if raw is None else str(json.loads(raw)["s"])


async def _until_recorded(redis: RedisServerProcess, account: str, rid: str) -> str:
    for _ in range(200):  # bounded: ~10 s
        state = await _record_state(redis, account, rid)
        if state is not None:
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the reserve script sent before the stall never ran for {rid}")


async def test_an_acknowledged_commit_survives_the_reserve_script_that_ran_late(
        paused_rig: tuple[RedisServerProcess, QuotaEngine]) -> None:
    redis, engine = paused_rig
    os.kill(redis.pid, signal.SIGSTOP)
    decision = await engine.check_and_reserve("a", "sora", "late-1", V10)  # its script waits in Redis
    assert decision.outcome.degraded
    committed = await engine.commit("a", "late-1")  # acknowledged from the journal
    assert committed.degraded
    os.kill(redis.pid, signal.SIGCONT)
    assert await _until_recorded(redis, "a", "late-1") == "held"  # the late script made a real hold
    assert await engine.flush_degraded()
    assert await _record_state(redis, "a", "late-1") == "committed"
    again = await engine.commit("a", "late-1")  # the worker's retry, through Redis now
    assert (again.replayed, again.degraded) == (True, False)
    assert (await audit_account(engine.store, "a")).violations == ()


async def test_the_journal_first_then_the_late_script_holds_nothing(
        paused_rig: tuple[RedisServerProcess, QuotaEngine]) -> None:
    redis, engine = paused_rig
    redis_client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    os.kill(redis.pid, signal.SIGSTOP)
    assert (await engine.check_and_reserve("a", "sora", "late-2", V10)).outcome.degraded
    await engine.commit("a", "late-2")
    os.kill(redis.pid, signal.SIGCONT)
    await _until_recorded(redis, "a", "late-2")
    # Whatever ran first, the record ends committed and no hold stays open.
    assert await engine.flush_degraded()
    with pytest.raises(ResolutionConflict) as err:  # the same reserve script, arriving after the journal
        await engine.check_and_reserve("a", "sora", "late-2", V10)
    assert err.value.reason == "ALREADY_COMMITTED"
    assert await redis_client.zcard(key("qs", "a", "holds")) == 0
    await redis_client.aclose()
    assert await _record_state(redis, "a", "late-2") == "committed"


async def test_a_journalled_commit_that_redis_cannot_apply_is_shown_by_the_audit(
        paused_rig: tuple[RedisServerProcess, QuotaEngine]) -> None:
    redis, engine = paused_rig
    os.kill(redis.pid, signal.SIGSTOP)
    assert (await engine.check_and_reserve("a", "sora", "late-3", V10)).outcome.degraded
    await engine.commit("a", "late-3")
    os.kill(redis.pid, signal.SIGCONT)
    await _until_recorded(redis, "a", "late-3")
    await engine.store.release("a", "late-3", engine._stamp())  # another sidecar released the real hold
    assert await engine.flush_degraded()
    audit = await audit_account(engine.store, "a")
    assert [v.check for v in audit.violations] == ["degraded_journal"]
    assert "acknowledged 'committed'" in audit.violations[0].detail


# -- 5. what one account can make Redis hold -----------------------------------------------------

async def test_reserve_release_churn_keeps_a_bounded_number_of_records(redis_server: RedisServerProcess,
                                                                      key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, max_records_per_account=100,
                                max_open_holds_per_account=50)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for i in range(300):  # a churning account: each cycle gives its free unit back
            await engine.check_and_reserve("churn", "sora", f"c{i}", V10)
            await engine.release("churn", f"c{i}")
        records = await client.hlen(key(key_prefix, "churn", "res"))
        # The bound, plus the one resolved since the last prune (each call prunes first).
        assert records <= 101
        assert await client.zcard(key(key_prefix, "churn", "resdone")) <= 101
        # The newest are kept: a retry of a recent one is still refused, not decided again.
        with pytest.raises(ResolutionConflict):
            await engine.check_and_reserve("churn", "sora", "c299", V10)
    finally:
        await client.aclose()
        await store.close()


async def test_open_holds_per_account_are_bounded(redis_server: RedisServerProcess, key_prefix: str) -> None:
    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, max_open_holds_per_account=40)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    try:
        await engine.grant("many", 100, "p1")
        allowed = [(await engine.check_and_reserve("many", "sora", f"h{i}", V10)).outcome for i in range(40)]
        assert all(o.allowed for o in allowed)
        refused = (await engine.check_and_reserve("many", "sora", "h40", V10)).outcome
        assert (refused.allowed, refused.denial) == (False, DenialReason.CONCURRENCY_LIMIT)
        await engine.release("many", "h0")
        assert (await engine.check_and_reserve("many", "sora", "h40", V10)).outcome.allowed
    finally:
        await store.close()


# -- 6. retention reaches idle accounts ----------------------------------------------------------

async def test_the_sweeper_drops_an_idle_free_only_accounts_old_records(engine: QuotaEngine, clock: ManualClock,
                                                                       redis_client: aioredis.Redis,
                                                                       key_prefix: str) -> None:
    for i in range(20):
        await engine.check_and_reserve("idle", "sora", f"f{i}", V10)
        await engine.commit("idle", f"f{i}")
    assert await redis_client.hlen(key(key_prefix, "idle", "res")) == 20
    clock.advance(days=8)  # past the 7-day retention, nobody calls for the account
    await engine.sweep()
    assert await redis_client.hlen(key(key_prefix, "idle", "res")) == 0
    assert await redis_client.exists(key(key_prefix, "idle", "resdone")) == 0


async def test_the_sweeper_stops_when_its_lease_is_lost(engine: QuotaEngine, clock: ManualClock) -> None:
    for account in ("s1", "s2", "s3"):
        await engine.check_and_reserve(account, "sora", "r", V10, ttl_seconds=60)
    clock.advance(ms=61_000)
    calls = []

    async def lease_lost_after_one() -> bool:
        calls.append(1)
        return len(calls) == 1

    assert await engine.sweep(lease_lost_after_one) == 1  # one account, then the lease was gone
    assert await engine.sweep() == 2


async def test_a_lease_is_renewed_only_by_its_holder(store: RedisStore) -> None:
    assert await store.try_lock("job", "me", 10_000)
    assert await store.renew_lock("job", "me", 60_000)
    assert not await store.renew_lock("job", "someone-else", 60_000)
    assert not await store.renew_lock("other-job", "me", 60_000)  # lapsed or never held


# -- 13. a commit's actual job must be one the hold covers ----------------------------------------

async def test_a_free_hold_cannot_be_committed_for_a_bigger_or_unentitled_job(engine: QuotaEngine) -> None:
    await engine.check_and_reserve("fay", "sora", "small", V1_480)  # 1 credit's worth, free
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("fay", "small", JobParams(duration_seconds=25, resolution="1080p"))
    assert err.value.reason == "ACTUAL_NOT_ENTITLED"  # the free plan has no 1080p
    with pytest.raises(ResolutionConflict) as err:
        await engine.commit("fay", "small", JobParams(duration_seconds=15, resolution="720p"))
    assert err.value.reason == "COST_EXCEEDS_HOLD"  # 2 credits' worth on a 1-credit free unit
    done = await engine.commit("fay", "small", JobParams(duration_seconds=1, resolution="720p"))
    assert (done.funding, done.free_charged, done.credits_charged) == (Funding.FREE_QUOTA, 1, 0)


async def test_a_credit_hold_cannot_be_committed_for_an_unentitled_job(engine: QuotaEngine) -> None:
    await engine.grant("cal", 10, "p1")
    for i in range(30):
        await engine.check_and_reserve("cal", "sora", f"free-{i}", V10)
    await engine.check_and_reserve("cal", "sora", "paid", JobParams(duration_seconds=15, resolution="720p"))
    with pytest.raises(ResolutionConflict) as err:  # cheaper, but 1080p is not in the free plan
        await engine.commit("cal", "paid", JobParams(duration_seconds=5, resolution="1080p"))
    assert err.value.reason == "ACTUAL_NOT_ENTITLED"


# -- GetBalance and RevokeCredits on an account with many holds ----------------------------------

async def test_balance_lists_a_bounded_number_of_holds_and_revoke_counts_per_lot(
        engine: QuotaEngine, redis_client: aioredis.Redis, key_prefix: str) -> None:
    await engine.grant("big", 300, "p1")
    await engine.grant("big", 50, "p2")
    for i in range(30):
        await engine.check_and_reserve("big", "sora", f"free-{i}", V10)
        await engine.commit("big", f"free-{i}")
    for i in range(150):
        await engine.check_and_reserve("big", "sora", f"h{i}", V10)
    balance = await engine.balance("big")
    assert (len(balance.holds), balance.holds_total, balance.credits_held) == (100, 150, 150)
    # Revoke reads the lot's held counter (no scan of the holds): p1 expires first in the
    # spending order? Same expiry: lot id order, so p1's credits are the ones held.
    held_by_lot = {lot: int(await redis_client.hget(key(key_prefix, "big", "lotrem"), f"{lot}|h") or 0)
                   for lot in ("p1", "p2")}
    revoked = await engine.revoke("big", "p1", "chargeback")
    assert (revoked.credits_held, revoked.credits_held + revoked.credits_revoked) == (held_by_lot["p1"], 300)
    await engine.release("big", "h0")
    assert (await audit_account(engine.store, "big")).violations == ()
