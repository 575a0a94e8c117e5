"""Fixtures for the engine and the gRPC server, on the session's real Redis.

Each test gets its own key prefix, so tests never see each other's keys and a
test can assert exactly which keys it wrote.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
import pytest
import redis.asyncio as aioredis
import yaml

from quota_sidecar._proto.quota.v1 import quota_pb2_grpc
from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Unavailable
from quota_sidecar.domain.ledger import with_running_totals
from quota_sidecar.domain.model import CreditTotals, LedgerEntry
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.app import create_admin_server, create_server
from quota_sidecar.server.plans_file import load_plans, parse_plans
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


DOCS_PLANS = Path(__file__).resolve().parent.parent / "docs" / "plans.md"


def default_document() -> dict[str, Any]:
    """The packaged plans file, as a document to edit."""
    text = importlib.resources.files("quota_sidecar").joinpath("default_plans.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def per_task_codex_block() -> dict[str, Any]:
    """The per-task codex of docs/plans.md (the YAML block after <!-- per-task-codex -->)."""
    text = DOCS_PLANS.read_text("utf-8").split("<!-- per-task-codex -->", 1)[1]
    return yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])


def per_task_document() -> dict[str, Any]:
    """The packaged plans with codex priced per task (the documented alternative): what tests of
    jobs counted one unit each, with a price known up front, use."""
    document = default_document()
    block = per_task_codex_block()
    document["products"].update(block["products"])
    for plan, rules in block["plans"].items():
        document["plans"][plan].update(rules)
    return document


def per_task_plans() -> Plans:
    return parse_plans(per_task_document())


def key(prefix: str, account: str, suffix: str) -> str:
    """The Redis key of one of an account's structures, as the store names it."""
    return account_key(prefix, DEFAULT_KEY_BUCKETS, account, suffix)


async def keys_with_prefix(client: aioredis.Redis, prefix: str) -> list[str]:
    return sorted([k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)])


async def has_functions(client: aioredis.Redis) -> bool:
    """Whether the server has Redis Functions (>= 7.0): the store then calls FCALL, else EVALSHA."""
    version = str((await client.info("server"))["redis_version"])
    return tuple(int(part) for part in version.split(".")[:2]) >= (7, 0)


async def script_verb(client: aioredis.Redis) -> str:
    """The command the store sends each decision as on this server (lower case, as commandstats names it)."""
    return "fcall" if await has_functions(client) else "evalsha"


async def script_calls(client: aioredis.Redis, verb: str = "") -> int:
    """Calls of ``verb`` (default: the store's, script_verb) Redis has served (INFO commandstats)."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{verb or await script_verb(client)}", {}).get("calls", 0))


async def flush_scripts(client: aioredis.Redis) -> None:
    """What a Redis restart without persistence loses: every script and every function library
    (SCRIPT FLUSH, and FUNCTION FLUSH on Redis >= 7)."""
    await client.script_flush()
    if await has_functions(client):
        await client.function_flush()


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


class ShippedBooks:
    """The Books port's reads (account_entries, ledger_page, last_totals) over what ship() moved
    out of one bucket's outbox the way the shipper does: read, kept, then trimmed.

    For the readers' merge of books and outbox (ListLedger, the audit), not for the books
    themselves: PgBooks is tested against PostgreSQL with the shipper. ``ship_on_read`` entries
    are shipped just before and just after every read, as a shipper at work between a reader's
    reads: a reader that read Redis after the books would miss what is shipped after."""

    def __init__(self, store: RedisStore, bucket: int, *, ship_on_read: int = 0) -> None:
        self.store, self.bucket, self.ship_on_read = store, bucket, ship_on_read
        self.entries: list[LedgerEntry] = []

    async def ship(self, count: int = 1000) -> int:
        batch = await self.store.read_outbox(self.bucket, count) if count else []
        if batch:
            self.entries += batch
            await self.store.trim_outbox(self.bucket, batch[-1].entry_id)
        return len(batch)

    async def _held(self, account_id: str) -> list[LedgerEntry]:
        await self.ship(self.ship_on_read)
        held = with_running_totals(sorted((e for e in self.entries if e.account_id == account_id),
                                          key=lambda e: e.seq))
        await self.ship(self.ship_on_read)
        return held

    async def account_entries(self, account_id: str) -> list[LedgerEntry]:
        return await self._held(account_id)

    async def ledger_page(self, account_id: str, after_seq: int, count: int) -> list[LedgerEntry]:
        return [e for e in await self._held(account_id) if e.seq > after_seq][:count]

    async def last_totals(self, account_id: str) -> tuple[int, CreditTotals]:
        held = await self._held(account_id)
        return (held[-1].seq, held[-1].totals_after) if held else (0, CreditTotals())

    async def conflicts(self, account_id: str | None = None) -> list[LedgerEntry]:
        """Entries it moves out of the outbox always get stored: none is ever set aside."""
        return []


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
