"""The examples keep working: they run against a real Redis here."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Awaitable, Callable

import pytest
from quota_fixtures import Sidecar

from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import JobParams
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

pytestmark = pytest.mark.all_redis_versions

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


# -- the worker examples, as subprocesses against a real sidecar started here ------------------------

ROOT = EXAMPLES.parent


async def _run_example(name: str, *args: str, feed: Callable[[str], Awaitable[str | None]] | None = None) -> str:
    """Runs examples/<name>.py; ``feed`` sees each output line and may answer on stdin. Bounded."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / f"{name}.py"), *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None and proc.stdin is not None
    lines: list[str] = []
    try:
        for _ in range(10_000):
            raw = await asyncio.wait_for(proc.stdout.readline(), 60)
            if not raw:
                break
            lines.append(raw.decode())
            answer = await feed(lines[-1]) if feed else None
            if answer is not None:
                proc.stdin.write(answer.encode())
                await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 30) == 0, "".join(lines)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return "".join(lines)


async def test_video_worker_example(sidecar: Sidecar) -> None:
    out = await _run_example("video_worker", "--target", f"127.0.0.1:{sidecar.port}", "--account", "vid")
    assert out.count("committed") == 3
    assert "job 1: committed: 0 credit(s), 1 free unit(s)" in out


async def test_code_worker_example(sidecar: Sidecar) -> None:
    out = await _run_example("code_worker", "--target", f"127.0.0.1:{sidecar.port}", "--account", "cod")
    assert out.count("committed") == 2 and "task 2: failed" in out
    assert "included usage used: 4/10 credits; holds left: 0" in out  # 2 tasks of 2 credits of usage


async def test_story_example_plays_end_to_end(sidecar: Sidecar, clock: ManualClock) -> None:
    async def travel(line: str) -> str | None:
        if "waiting for the sidecar's clock" in line:
            clock.advance(days=366)  # 12 months and a day later
            return "\n"
        return None

    out = await _run_example("story", "--target", f"127.0.0.1:{sidecar.port}", "--admin-target",
                             f"127.0.0.1:{sidecar.admin_port}", "--account", "sto", "--time-travel", "stdin",
                             feed=travel)
    assert "denied: PURCHASE_REQUIRED" in out and "1 x pack_10 (10 credits) for 4.00 USD" in out
    assert "funded by credits, 1 credit(s) held" in out
    assert "committed; credit balance 9" in out
    assert "after expiry: credit balance 0; lots []" in out and "story complete" in out
