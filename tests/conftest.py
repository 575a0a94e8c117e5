"""Shared fixtures: one real redis-server per test session."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from quota_sidecar.redis_server import RedisServerProcess, find_redis_server


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """The redis-server under test: $QUOTA_TEST_REDIS_SERVER, else the newest found."""
    return find_redis_server(os.environ.get("QUOTA_TEST_REDIS_SERVER", ""))


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
