"""Redis faults: health follows Redis, deadlines hold, grants are durable before they are acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Callable

import grpc
import pytest
import redis as redis_sync
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio
from quota_fixtures import T0_MS

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.domain.audit import audit_all
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Unavailable
from quota_sidecar.server.app import create_server, watch_redis_health
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def wait_until(predicate: Callable[[], bool], what: str, timeout_seconds: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.mark.newest_redis_only
async def test_health_follows_redis(tmp_path: Path, redis_binary: str) -> None:
    redis = RedisServerProcess(redis_binary, tmp_path / "r", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=0.2)
    health = health_aio.HealthServicer()
    watcher = asyncio.create_task(watch_redis_health(store, health, 0.3, probe_interval_seconds=0.05))
    try:
        status = lambda: health._server_status[""]  # noqa: E731 - the servicer's own view of each service
        await wait_until(lambda: status() == SERVING, "SERVING while Redis answers")
        redis.kill()
        await wait_until(lambda: status() == NOT_SERVING, "NOT_SERVING after Redis died")
        assert health._server_status["quota.v1.QuotaService"] == NOT_SERVING
        redis.start()
        await wait_until(lambda: status() == SERVING, "SERVING once Redis answers again")
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await store.close()
        redis.stop()


async def test_the_callers_deadline_bounds_the_call_and_a_retry_holds_once(tmp_path: Path, redis_binary: str) -> None:
    redis = RedisServerProcess(redis_binary, tmp_path / "r")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=5.0)  # longer than the caller waits
    server, port = create_server(Settings(listen=("127.0.0.1:0",)), QuotaEngine(load_plans(), store, ManualClock(T0_MS)))
    await server.start()
    admin = redis_sync.Redis(port=redis.port)
    request = pb.CheckAndReserveRequest(account_id="a", product="sora", reservation_id="r1",
                                        params=pb.JobParams(duration_seconds=10, resolution="720p"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = quota_pb2_grpc.QuotaServiceStub(channel)
            admin.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # Redis stalls every client
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.CheckAndReserve(request, timeout=0.3)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            admin.execute_command("CLIENT", "UNPAUSE")
            retry = await stub.CheckAndReserve(request, timeout=5)
            assert retry.allowed
            balance = await stub.GetBalance(pb.GetBalanceRequest(account_id="a"), timeout=5)
            assert (len(balance.holds), balance.allowances[0].free_used) == (1, 1)
    finally:
        admin.close()
        await server.stop(None)
        await store.close()
        redis.stop()


async def wait_replica_synced(master: RedisServerProcess) -> None:
    client = redis_sync.Redis(port=master.port)
    try:
        # connected_slaves counts a replica still loading; WAIT only counts one that is online
        await wait_until(lambda: client.info("replication").get("slave0", {}).get("state") == "online",
                         "replica online")
    finally:
        client.close()


@pytest.mark.slow
async def test_grants_wait_for_the_required_replicas(tmp_path: Path, redis_binary: str) -> None:
    # Full syncs start at once instead of after Redis' default 5 s gathering delay.
    master = RedisServerProcess(redis_binary, tmp_path / "master", extra_args=["--repl-diskless-sync-delay", "0"])
    master.start()
    replica = RedisServerProcess(redis_binary, tmp_path / "replica",
                                 extra_args=["--replicaof", "127.0.0.1", str(master.port)])
    replica.start()
    store = RedisStore.from_url(master.url, grant_min_replicas=1, grant_wait_timeout_ms=1000)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    try:
        await wait_replica_synced(master)
        assert (await engine.grant("a", 10, "p1")).credit_balance == 10
        on_replica = redis_sync.Redis(port=replica.port, decode_responses=True)
        assert on_replica.hget(store.key("a", "lotrem"), "p1") == "10"
        on_replica.close()
        replica.kill()  # the replica is lost (a graceful stop of a replica takes Redis 10 s)
        with pytest.raises(Unavailable) as err:  # applied on the master, but not acknowledged
            await engine.grant("a", 5, "p2")
        assert err.value.reason == "REPLICAS_BEHIND"
        replica.start()
        await wait_replica_synced(master)
        again = await engine.grant("a", 5, "p2")  # the retry replays and is acknowledged
        assert (again.replayed, again.credit_balance) == (True, 15)
    finally:
        await store.close()
        replica.kill()
        master.stop()


async def test_acknowledged_grants_survive_sigkill(tmp_path: Path, redis_binary: str) -> None:
    redis = RedisServerProcess(redis_binary, tmp_path / "r", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=1.0)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    try:
        acknowledged = []
        for i in range(40):
            await engine.grant(f"acct-{i % 8}", 1 + i % 5, f"order-{i}")
            acknowledged.append((f"acct-{i % 8}", 1 + i % 5))
        redis.kill()
        redis.start()
        for i in range(8):
            expected = sum(c for a, c in acknowledged if a == f"acct-{i}")
            assert (await engine.balance(f"acct-{i}")).credit_balance == expected
        assert [a for a in await audit_all(store) if a.violations] == []
    finally:
        await store.close()
        redis.stop()
