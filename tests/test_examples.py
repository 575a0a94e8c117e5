"""The examples keep working: they run against a real Redis here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from quota_sidecar.engine import QuotaEngine
from quota_sidecar.model import JobParams
from quota_sidecar.redis_server import RedisServerProcess
from quota_sidecar.store import RedisStore

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_events_consumer_reads_every_event_once_with_a_group(
        engine: QuotaEngine, store: RedisStore, redis_server: RedisServerProcess, key_prefix: str) -> None:
    consumer = load_example("events_consumer")
    for account in ("ann", "bob", "cy"):
        for i in range(31):  # 80 %, 100 %, then purchase required
            await engine.check_and_reserve(account, "sora", f"r{i}", JobParams(duration_seconds=10, resolution="720p"))
    seen: list[tuple[str, str]] = []

    async def handle(entry_id: str, fields: dict[str, str]) -> None:
        seen.append((fields["account"], fields["type"]))

    total = await consumer.consume(redis_server.url, key_prefix=key_prefix, key_buckets=store.key_buckets,
                                   handle=handle, idle_rounds=1, idle_sleep_seconds=0)
    expected = {(a, t) for a in ("ann", "bob", "cy") for t in ("free_warning", "free_exhausted", "purchase_required")}
    assert total == 9 and sorted(seen) == sorted(expected)
    # acknowledged: a second consumer of the same group gets nothing again
    again = await consumer.consume(redis_server.url, key_prefix=key_prefix, key_buckets=store.key_buckets,
                                   consumer="notifier-2", handle=handle, idle_rounds=1, idle_sleep_seconds=0)
    assert again == 0
