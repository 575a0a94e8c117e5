"""The multiplexed Redis connection of the decision path, on a real Redis.

Coalescing, reply order, error classes, connection loss, overdue replies,
auth and database selection, and which clients get one.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import cast

import pytest
import redis.asyncio as aioredis
from fault_proxy import FaultProxy
from quota_fixtures import flush_scripts, has_functions
from redis import exceptions as redis_errors

from quota_sidecar.storage import connect as redis_connect
from quota_sidecar.storage import mux as mux_module
from quota_sidecar.storage.mux import CLIENT_NAME, MuxConnection, Packed, flatten, pack_command
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.storage.transport import MuxTransport, PipelineTransport


def test_pack_command_is_resp_and_splices_packed_blocks() -> None:
    block = Packed(["b", 2])
    assert pack_command(["SET", "k", 7]) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\n7\r\n"
    assert pack_command(["a", block, "c"]) == pack_command(["a", "b", 2, "c"])
    assert flatten(["a", block, "c"]) == ["a", "b", 2, "c"]
    assert pack_command(["é"]) == b"*1\r\n$2\r\n\xc3\xa9\r\n"  # lengths count bytes
    with pytest.raises(TypeError):
        pack_command([None])


def _mux(server: RedisServerProcess, **kwargs: object) -> MuxConnection:
    return MuxConnection(host="127.0.0.1", port=server.port, timeout_seconds=2.0, **kwargs)  # type: ignore[arg-type]


async def _mux_clients(client: aioredis.Redis) -> list[dict[str, object]]:
    return [c for c in await client.client_list() if c.get("name") == CLIENT_NAME]


async def test_concurrent_callers_share_one_connection_and_get_their_own_replies(
        redis_server: RedisServerProcess, redis_client: aioredis.Redis) -> None:
    # Through a proxy, which counts the connections made (Redis' own client list also holds the
    # other tests' connections, some maybe still closing).
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mux = MuxConnection(host="127.0.0.1", port=proxy.port, timeout_seconds=10.0)
        try:
            values = [uuid.uuid4().hex for _ in range(300)]
            replies = await asyncio.gather(*(mux.execute("ECHO", v) for v in values))
            assert replies == values
            assert proxy.stats.accepted == 1
            # One batch: commands written together, applied in order.
            key = "mux:" + uuid.uuid4().hex
            packed = [pack_command(["RPUSH", key, i]) for i in range(50)]
            assert await mux.execute_many(packed) == list(range(1, 51))
            assert await redis_client.lrange(key, 0, -1) == [str(i) for i in range(50)]
            await redis_client.delete(key)
            assert proxy.stats.accepted == 1
        finally:
            await mux.aclose()


@pytest.mark.all_redis_versions
async def test_error_replies_are_redis_py_classes_and_leave_the_connection_usable(
        redis_server: RedisServerProcess, redis_client: aioredis.Redis) -> None:
    mux = _mux(redis_server)
    key = "mux:" + uuid.uuid4().hex
    try:
        await redis_client.set(key, "x")
        replies = await mux.execute_many([pack_command(["EVALSHA", "0" * 40, 0]), pack_command(["HGET", key, "f"]),
                                          pack_command(["GET", key])])
        assert isinstance(replies[0], redis_errors.NoScriptError)
        assert isinstance(replies[1], redis_errors.ResponseError) and "WRONGTYPE" in str(replies[1])
        assert replies[2] == "x"
        with pytest.raises(redis_errors.ResponseError):
            await mux.execute("NOSUCHCOMMAND")
        assert await mux.execute("GET", key) == "x"
    finally:
        await redis_client.delete(key)
        await mux.aclose()


async def test_a_killed_connection_fails_its_calls_and_the_next_call_reconnects(
        redis_server: RedisServerProcess, redis_client: aioredis.Redis) -> None:
    # The timeout only bounds a broken test: the BLPOP below blocks until its connection is killed.
    mux = MuxConnection(host="127.0.0.1", port=redis_server.port, timeout_seconds=30.0)
    try:
        assert await mux.execute("PING") == "PONG"
        # A blocking command keeps a call in flight while the connection is killed under it.
        in_flight = asyncio.ensure_future(mux.execute("BLPOP", "mux:" + uuid.uuid4().hex, 0))
        # Redis says which connection is blocked in the BLPOP (not a sleep and a guess).
        blocked: list[dict[str, object]] = []
        for _ in range(500):  # bounded: ~10 s
            blocked = [c for c in await _mux_clients(redis_client) if c.get("cmd") == "blpop"]
            if blocked:
                break
            await asyncio.sleep(0.02)
        assert len(blocked) == 1, await _mux_clients(redis_client)
        assert not in_flight.done()
        await redis_client.client_kill_filter(_id=blocked[0]["id"])
        with pytest.raises(redis_errors.ConnectionError):
            await in_flight
        assert await mux.execute("PING") == "PONG"
    finally:
        await mux.aclose()


async def test_an_overdue_reply_fails_the_call_with_timeout_then_recovers(redis_server: RedisServerProcess) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        mux = MuxConnection(host="127.0.0.1", port=proxy.port, timeout_seconds=1.0)
        try:
            assert await mux.execute("PING") == "PONG"
            sent = proxy.stats.bytes_up
            # The proxy holds the command back: no reply can come, whatever the machine's speed.
            await proxy.blackhole(True)
            with pytest.raises(redis_errors.TimeoutError):
                await mux.execute("ECHO", "late")
            assert proxy.stats.bytes_held > 0 and proxy.stats.bytes_up == sent
            # Then it reaches Redis after all, which answers on the connection the mux gave up.
            await proxy.blackhole(False)
            await proxy.wait_for(lambda s: s.bytes_up > sent and s.bytes_held == 0)
            # No later call gets the late reply: the next call is on a new connection.
            assert await mux.execute("ECHO", "fresh") == "fresh"
            assert await mux.execute("ECHO", "again") == "again"
            assert proxy.stats.accepted == 2
        finally:
            await mux.aclose()


async def test_a_connection_lost_before_the_set_up_fails_the_call_and_the_next_one_connects(
        redis_server: RedisServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by the chaos run: a connection reset right after it was made (a proxy refusing, a Redis at
    maxclients or shutting down), its loss seen before the mux took the connection up, left the mux
    holding its connect lock while the set-up waited for that same lock: every later call waited
    forever, the mux never reconnected. The reset is made certain here: the connection is aborted as
    soon as it is made. wait_for only turns a hang into a failure."""
    made = 0

    def reset_at_once(protocol: asyncio.Protocol, transport: asyncio.BaseTransport) -> None:
        nonlocal made
        made += 1
        cast(asyncio.Transport, transport).abort()

    mux = MuxConnection(host="127.0.0.1", port=redis_server.port, timeout_seconds=0.5)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(mux_module._Protocol, "connection_made", reset_at_once, raising=False)
            calls = [mux.execute("PING") for _ in range(5)]
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5.0)
            assert made >= 1
            assert all(isinstance(r, redis_errors.ConnectionError) for r in results), results
        # Nothing left holding the connection: the next call connects, and is answered.
        assert await asyncio.wait_for(mux.execute("PING"), 5.0) == "PONG"
    finally:
        await mux.aclose()


async def test_unreachable_redis_is_a_connection_error(redis_server: RedisServerProcess) -> None:
    async with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        await proxy.refuse()
        mux = MuxConnection(host="127.0.0.1", port=proxy.port, timeout_seconds=0.5)
        with pytest.raises(redis_errors.ConnectionError):
            await mux.execute("PING")
        await mux.aclose()
        with pytest.raises(redis_errors.ConnectionError):
            await mux.execute("PING")  # closed for good


async def test_auth_and_database_come_from_the_url(redis_server: RedisServerProcess,
                                                   redis_client: aioredis.Redis) -> None:
    user, password, key = "mux" + uuid.uuid4().hex[:8], uuid.uuid4().hex, "mux:" + uuid.uuid4().hex
    await redis_client.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    client = redis_connect.connect(f"redis://{user}:{password}@127.0.0.1:{redis_server.port}/3", timeout_seconds=2)
    bad = redis_connect.connect(f"redis://{user}:wrong@127.0.0.1:{redis_server.port}/3", timeout_seconds=2)
    mux = MuxConnection.for_client(client, timeout_seconds=2)
    bad_mux = MuxConnection.for_client(bad, timeout_seconds=2)
    assert mux is not None and bad_mux is not None
    try:
        await mux.execute("SET", key, "in-db-3")
        db3 = aioredis.from_url(f"redis://127.0.0.1:{redis_server.port}/3", decode_responses=True)
        assert await db3.get(key) == "in-db-3"
        assert await redis_client.get(key) is None  # not db 0
        await db3.delete(key)
        await db3.aclose()
        with pytest.raises(redis_errors.RedisError):
            await bad_mux.execute("PING")
    finally:
        await mux.aclose()
        await bad_mux.aclose()
        await client.aclose()
        await bad.aclose()
        await redis_client.execute_command("ACL", "DELUSER", user)


def test_only_plain_single_redis_clients_get_a_multiplexed_connection(tmp_path: object) -> None:
    single = redis_connect.connect("redis://127.0.0.1:1/0", timeout_seconds=1)
    unix = redis_connect.connect("unix:///tmp/redis.sock", timeout_seconds=1)
    tls = redis_connect.connect("rediss://127.0.0.1:1/0", timeout_seconds=1)
    cluster = redis_connect.connect("redis+cluster://127.0.0.1:1", timeout_seconds=1)
    sentinel = redis_connect.connect("redis+sentinel://127.0.0.1:1/mymaster", timeout_seconds=1)
    assert MuxConnection.for_client(single, timeout_seconds=1) is not None
    assert MuxConnection.for_client(unix, timeout_seconds=1) is not None
    for other in (tls, cluster, sentinel):
        assert MuxConnection.for_client(other, timeout_seconds=1) is None
    assert isinstance(RedisStore(single)._transport, MuxTransport)
    assert isinstance(RedisStore(single, multiplex=False)._transport, PipelineTransport)


@pytest.mark.all_redis_versions
async def test_the_store_sends_decisions_over_the_multiplexed_connection(
        redis_server: RedisServerProcess, redis_client: aioredis.Redis, key_prefix: str) -> None:
    from quota_sidecar.domain.engine import QuotaEngine
    from quota_sidecar.domain.model import JobParams
    from quota_sidecar.server.plans_file import load_plans

    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
    engine = QuotaEngine(load_plans(), store)
    try:
        await flush_scripts(redis_client)  # NOSCRIPT on the first call: loaded and sent again
        job = JobParams(duration_seconds=10, resolution="720p")
        decisions = await asyncio.gather(*(engine.check_and_reserve(f"acct{i % 4}", "sora", f"r{i}", job)
                                           for i in range(40)))
        assert all(d.outcome.allowed for d in decisions)
        assert [c for c in await _mux_clients(redis_client)]
        replay = await engine.check_and_reserve("acct0", "sora", "r0", job)
        assert replay.outcome.replayed and replay.outcome.expires_ms == decisions[0].outcome.expires_ms
    finally:
        await store.close()


async def _script_loads(client: aioredis.Redis) -> int:
    """Loads Redis has served: FUNCTION LOAD on Redis 7 (the store's one library), SCRIPT LOAD on
    6.2 (all of SCRIPT, whose other subcommands this test's store never sends)."""
    stats = await client.info("commandstats")
    if await has_functions(client):
        return int(stats.get("cmdstat_function|load", {"calls": 0})["calls"])
    return int(stats.get("cmdstat_script", {"calls": 0})["calls"])


@pytest.mark.all_redis_versions
@pytest.mark.parametrize("multiplex", [True, False], ids=["mux", "redis-py"])
async def test_concurrent_noscript_shares_one_script_load(
        redis_server: RedisServerProcess, redis_client: aioredis.Redis, key_prefix: str, multiplex: bool) -> None:
    from quota_sidecar.domain.engine import QuotaEngine
    from quota_sidecar.domain.model import JobParams
    from quota_sidecar.server.plans_file import load_plans

    store = RedisStore.from_url(redis_server.url, key_prefix=key_prefix, multiplex=multiplex)
    engine = QuotaEngine(load_plans(), store)
    try:
        await store.load_scripts()
        job = JobParams(duration_seconds=10, resolution="720p")
        await engine.check_and_reserve("warm", "sora", "w", job)
        await flush_scripts(redis_client)  # as after a Redis restart: every call in flight meets NOSCRIPT
        before = await _script_loads(redis_client)
        decisions = await asyncio.gather(*(engine.check_and_reserve(f"acct{i}", "sora", f"r{i}", job)
                                           for i in range(30)))
        assert all(d.outcome.allowed for d in decisions)
        assert await _script_loads(redis_client) - before == 1  # not one per call
    finally:
        await store.close()
