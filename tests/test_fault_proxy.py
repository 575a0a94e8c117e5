"""The fault proxy itself (tests/fault_proxy.py), against the session's Redis with redis-py."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest
import redis.asyncio as aioredis
from fault_proxy import FaultProxy
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from quota_sidecar.storage.redis_server import RedisServerProcess


@pytest.fixture
async def proxy(redis_server: RedisServerProcess) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


def client(proxy: FaultProxy, timeout: float = 10.0) -> aioredis.Redis:
    # No redis-py retries: each fault must show up as the error it causes. The timeout only
    # matters where a test expects one (then it is short); elsewhere it just bounds a hang.
    return aioredis.Redis(host="127.0.0.1", port=proxy.port, socket_timeout=timeout,
                          socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0), decode_responses=True)


async def test_ping_goes_through_both_ways(proxy: FaultProxy, key_prefix: str) -> None:
    c = client(proxy)
    try:
        assert await c.ping() is True
        await c.set(f"{key_prefix}:k", "v")
        assert await c.get(f"{key_prefix}:k") == "v"
        await c.delete(f"{key_prefix}:k")
    finally:
        await c.aclose()
    stats = proxy.stats
    assert stats.accepted >= 1 and stats.bytes_up > 0 and stats.bytes_down > 0 and stats.cuts == 0


async def test_cut_breaks_open_connections_and_a_retry_reconnects(proxy: FaultProxy) -> None:
    c = client(proxy)
    try:
        assert await c.ping()
        assert await proxy.cut() >= 1
        with pytest.raises(redis_errors.ConnectionError):
            await c.ping()
        assert await c.ping()  # a new connection through the same proxy
    finally:
        await c.aclose()
    assert (proxy.stats.cuts, proxy.stats.accepted) == (1, 2)


async def test_delay_holds_chunks_so_a_later_direct_write_lands_first(proxy: FaultProxy, key_prefix: str) -> None:
    slow = client(proxy)
    direct = aioredis.Redis(host="127.0.0.1", port=proxy.upstream_port, decode_responses=True)
    try:
        await direct.delete(f"{key_prefix}:order")  # connected: the direct INCR below is one round trip
        await slow.ping()  # connected before the delay
        before = proxy.stats
        await proxy.delay(500)  # far longer than the direct round trip below
        slow_call = asyncio.create_task(slow.incr(f"{key_prefix}:order"))
        # The INCR is in the proxy, waiting out its delay (not a guess: the proxy says so).
        await proxy.wait_for(lambda s: s.bytes_held > 0 and s.delayed_chunks > before.delayed_chunks)
        assert proxy.stats.bytes_up == before.bytes_up
        # Ordering: sent after the delayed INCR, straight to Redis, applied first.
        assert await direct.incr(f"{key_prefix}:order") == 1
        assert await slow_call == 2
        # Both ways waited: the INCR on its way up, its reply on its way down.
        assert proxy.stats.delayed_chunks - before.delayed_chunks >= 2
        await proxy.delay(0)
        no_delay = proxy.stats
        assert await slow.ping()
        after = proxy.stats
        assert after.delayed_chunks == no_delay.delayed_chunks  # nothing waited once the delay was off
        assert after.bytes_up > no_delay.bytes_up and after.bytes_down > no_delay.bytes_down
    finally:
        await direct.delete(f"{key_prefix}:order")
        await slow.aclose()
        await direct.aclose()


async def test_half_close_makes_reads_see_eof_while_writes_still_reach_redis(proxy: FaultProxy,
                                                                             key_prefix: str) -> None:
    c, direct = client(proxy), aioredis.Redis(host="127.0.0.1", port=proxy.upstream_port, decode_responses=True)
    try:
        await direct.delete(f"{key_prefix}:half")
        assert await c.ping()
        assert await proxy.half_close() >= 1
        with pytest.raises(redis_errors.ConnectionError):
            await c.incr(f"{key_prefix}:half")  # the write is accepted, the reply never comes back
        for _ in range(50):  # bounded: at most ~1 s for Redis to have run it
            if await direct.get(f"{key_prefix}:half") == "1":
                break
            await asyncio.sleep(0.02)
        assert await direct.get(f"{key_prefix}:half") == "1"
        assert await c.ping()  # a new connection is not half-closed
    finally:
        await direct.delete(f"{key_prefix}:half")
        await c.aclose()
        await direct.aclose()


async def test_refuse_makes_connects_fail_until_turned_off(proxy: FaultProxy) -> None:
    c = client(proxy)
    try:
        await proxy.refuse(True)
        with pytest.raises(redis_errors.ConnectionError):
            await c.ping()
        await proxy.refuse(False)
        assert await c.ping()
    finally:
        await c.aclose()
    assert proxy.stats.refused >= 1


async def test_blackhole_times_out_without_forwarding(proxy: FaultProxy) -> None:
    c = client(proxy, timeout=0.3)  # expected to time out: short
    fresh = client(proxy)
    try:
        await proxy.blackhole(True)
        up_before = proxy.stats.bytes_up
        with pytest.raises((redis_errors.TimeoutError, redis_errors.ConnectionError)):
            await c.ping()
        assert proxy.stats.bytes_up == up_before
        await proxy.blackhole(False)
        assert await fresh.ping()
        assert proxy.stats.bytes_up > up_before
    finally:
        await c.aclose()
        await fresh.aclose()
