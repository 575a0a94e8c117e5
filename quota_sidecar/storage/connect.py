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

import urllib.parse
from dataclasses import dataclass
from typing import Any, Union

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialWithJitterBackoff

from quota_sidecar.domain.errors import InvalidArgument

__all__ = ["MODES", "RedisClient", "close", "connect", "parse_url"]

MODES = ("auto", "single", "cluster", "sentinel")
RedisClient = Union[aioredis.Redis, RedisCluster]

_SINGLE_SCHEMES = ("redis", "rediss", "unix")
_CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
_SENTINEL_SCHEMES = ("redis+sentinel",)
_FIELD = "redis_url"


@dataclass(frozen=True)
class ParsedUrl:
    """What connect() needs of a cluster or sentinel URL (single URLs go to redis-py as they are)."""

    mode: str
    hosts: tuple[tuple[str, int], ...] = ()
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    service_name: str = ""
    db: int = 0


def _bad(description: str) -> InvalidArgument:
    return InvalidArgument(_FIELD, description)


def _host_port(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise _bad(f"bad address {text!r}")
        port_text = rest[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(f"bad address {text!r}: no host")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise _bad(f"bad port in {text!r}")
    return host, int(port_text)


def _split_netloc(netloc: str, default_port: int) -> tuple[str | None, str | None, tuple[tuple[str, int], ...]]:
    """``[user:pass@]h1:p1,h2:p2`` (urllib cannot parse several hosts)."""
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    parts = [part.strip() for part in hostlist.split(",")]
    if not any(parts):
        raise _bad("names no host")
    if not all(parts):
        raise _bad("has an empty host in its host list")
    return username, password, tuple(_host_port(part, default_port) for part in parts)


def _check_query(query: str, allowed: tuple[str, ...]) -> dict[str, str]:
    values = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise _bad(f"unknown option(s) {', '.join(unknown)} (allowed: {', '.join(allowed) or 'none'})")
    return values


def parse_url(url: str, mode: str = "auto") -> ParsedUrl:
    """Validates ``url`` against ``mode``; InvalidArgument naming redis_url on any problem."""
    if mode not in MODES:
        raise InvalidArgument("redis_mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    if not url:
        raise _bad("is empty")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SINGLE_SCHEMES + _CLUSTER_SCHEMES + _SENTINEL_SCHEMES:
        raise _bad("must start with redis://, rediss://, unix://, redis+cluster:// or redis+sentinel://")
    implied = "cluster" if scheme in _CLUSTER_SCHEMES else "sentinel" if scheme in _SENTINEL_SCHEMES else "single"
    chosen = implied if mode == "auto" else mode
    if chosen == "cluster" and scheme in ("redis", "rediss"):
        implied = "cluster"  # a plain URL names one startup node of the cluster
    if chosen != implied:
        raise _bad(f"a {scheme}:// URL cannot be used with redis_mode {mode}")
    if chosen == "single":
        return ParsedUrl(mode="single")
    split = urllib.parse.urlsplit(f"x://{rest}")
    if chosen == "cluster":
        username, password, hosts = _split_netloc(split.netloc, 6379)
        _check_query(split.query, ())
        if split.path.strip("/") not in ("", "0"):
            raise _bad("a cluster has only database 0")
        return ParsedUrl(mode="cluster", hosts=hosts, username=username, password=password,
                         ssl=scheme.startswith("rediss"))
    username, password, hosts = _split_netloc(split.netloc, 26379)
    service = urllib.parse.unquote(split.path.strip("/"))
    if not service or "/" in service:
        raise _bad("a sentinel URL names the master after the hosts: redis+sentinel://h1:p1,h2:p2/mymaster")
    db_text = _check_query(split.query, ("db",)).get("db", "0")
    if not db_text.isdigit():
        raise _bad(f"db must be a number, not {db_text!r}")
    return ParsedUrl(mode="sentinel", hosts=hosts, username=username, password=password, service_name=service,
                     db=int(db_text))


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
