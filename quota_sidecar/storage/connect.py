"""Builds the redis-py client for a ``--redis-url``: one Redis, a Cluster, or Sentinel.

    redis://[user:pass@]host:port/db, rediss://..., unix:///path.sock   one Redis
    redis+cluster://[user:pass@]h1:p1,h2:p2[/]                         Redis Cluster
    rediss+cluster://...                                               Redis Cluster over TLS
    redis+sentinel://[user:pass@]h1:p1,h2:p2/<master name>[?db=N]      Sentinel (follows failovers)

``mode`` ("auto" | "single" | "cluster" | "sentinel") overrides the scheme:
"cluster" also accepts a plain redis:// or rediss:// URL (its host is the one
startup node). Only the store (quota_sidecar.storage.store) calls this.
"""

from __future__ import annotations

from typing import Any, Union

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

from quota_sidecar.storage.url import MODES, parse_url

__all__ = ["MODES", "RedisClient", "close", "connect", "parse_url"]

RedisClient = Union[aioredis.Redis, RedisCluster]


def _single_retry() -> Retry:
    # One quick retry: a pooled connection to a restarted Redis fails once and the retry
    # reconnects. Every script is idempotent, so re-sending one is safe; longer outages
    # surface as UNAVAILABLE at once instead of stalling the call (redis-py's default
    # retries three times with backoff of up to seconds).
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1)


def connect(url: str, *, mode: str = "auto", timeout_seconds: float) -> RedisClient:
    """A client that decodes replies to str; nothing is sent to Redis until the first command."""
    parsed = parse_url(url, mode)
    timeouts: dict[str, Any] = {"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds}
    retry_on = [redis_errors.ConnectionError, redis_errors.TimeoutError]
    if parsed.mode == "single":
        return aioredis.from_url(url, decode_responses=True, retry=_single_retry(), retry_on_error=retry_on,
                                 **timeouts)
    if parsed.mode == "cluster":
        # A few attempts: on a connection error or CLUSTERDOWN, redis-py re-reads the slot map
        # before the next one, which is what carries a call across a failover once a replica
        # is promoted. MOVED and ASK are followed by redis-py without using attempts.
        # reinitialize_steps=0: a MOVED only patches the slot map. Otherwise every 5th MOVED
        # (a slot migration, a failover) closes every connection of the client, including
        # ones other calls are using at that moment, which then fail with AttributeError
        # from inside redis-py instead of a ConnectionError (redis-py 8.1, seen in tests).
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in parsed.hosts],
                            decode_responses=True, username=parsed.username, password=parsed.password,
                            ssl=parsed.ssl, retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=3),
                            reinitialize_steps=0, **timeouts)
    sentinel = Sentinel(list(parsed.hosts), sentinel_kwargs=dict(timeouts), **timeouts)
    # master_for's pool asks the sentinels for the master's address on every new connection,
    # and drops a connection whose server answers READONLY (a demoted master): the retry then
    # lands on the promoted replica.
    return sentinel.master_for(parsed.service_name, decode_responses=True, username=parsed.username,
                               password=parsed.password, db=parsed.db, retry=_single_retry(),
                               retry_on_error=retry_on)


async def close(client: RedisClient) -> None:
    """Closes the client and, for Sentinel, the connections to the sentinels too."""
    try:
        await client.aclose()
    finally:
        pool = getattr(client, "connection_pool", None)
        manager = getattr(pool, "sentinel_manager", None)
        if isinstance(manager, Sentinel):
            await manager.aclose()
