"""Fixtures for the engine and the gRPC server, on the session's real Redis.

Each test gets its own key prefix, so tests never see each other's keys and a
test can assert exactly which keys it wrote.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import AsyncIterator, Awaitable, Callable, TypeVar

import grpc
import pytest
import redis.asyncio as aioredis

from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Unavailable
from quota_sidecar.server.app import create_admin_server, create_server
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.keys import DEFAULT_KEY_BUCKETS, account_key
from quota_sidecar.storage.redis_server import RedisServerProcess

# Saturday 2026-11-21 12:00:00 UTC: far from any midnight or DST change.
from quota_sidecar.storage.store import RedisStore

# Saturday 2026-11-21 12:00:00 UTC: far from any midnight or DST change.
T0_MS = int(datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc).timestamp() * 1000)


def utc_ms(*args: int) -> int:
    return int(datetime(*args, tzinfo=timezone.utc).timestamp() * 1000)


@pytest.fixture
def key_prefix() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0_MS)


@pytest.fixture
async def redis_client(redis_server: RedisServerProcess) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_server: RedisServerProcess, key_prefix: str) -> AsyncIterator[RedisStore]:
    s = RedisStore.from_url(redis_server.url, key_prefix=key_prefix)
    yield s
    await s.close()


@pytest.fixture
def engine(store: RedisStore, clock: ManualClock) -> QuotaEngine:
    return QuotaEngine(load_plans(), store, clock)


def key(prefix: str, account: str, suffix: str) -> str:
    """The Redis key of one of an account's structures, as the store names it."""
    return account_key(prefix, DEFAULT_KEY_BUCKETS, account, suffix)


async def keys_with_prefix(client: aioredis.Redis, prefix: str) -> list[str]:
    return sorted([k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)])


class Sidecar:
    """A started worker server and admin server on ephemeral ports, with async stubs."""

    def __init__(self, engine: QuotaEngine, port: int, admin_port: int) -> None:
        self.engine = engine
        self.port = port
        self.admin_port = admin_port
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.admin_channel = grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}")
        self.quota = quota_pb2_grpc.QuotaServiceStub(self.channel)
        self.admin = quota_pb2_grpc.QuotaAdminStub(self.admin_channel)


@pytest.fixture
async def sidecar(engine: QuotaEngine) -> AsyncIterator[Sidecar]:
    settings = Settings(listen=("127.0.0.1:0",), admin_listen=("127.0.0.1:0",))
    server, port = create_server(settings, engine)
    admin, admin_port = create_admin_server(settings, engine)
    await server.start()
    await admin.start()
    sc = Sidecar(engine, port, admin_port)
    try:
        yield sc
    finally:
        await sc.channel.close()
        await sc.admin_channel.close()
        await server.stop(None)
        await admin.stop(None)


T = TypeVar("T")


async def retrying(call: Callable[[], Awaitable[T]], *, attempts: int = 100, pause: float = 0.05) -> T:
    """Retries UNAVAILABLE with the same arguments (so the same ids), as a worker does; bounded by
    ``attempts`` (~attempts x pause seconds)."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except Unavailable:
            await asyncio.sleep(pause)
    return await call()
