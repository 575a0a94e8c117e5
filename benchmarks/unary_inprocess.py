"""The sidecar's Python work per unary decision, without gRPC: CPU per CheckAndReserve in-process.

    .venv/bin/python benchmarks/unary_inprocess.py [--calls 20000] [--concurrency 32] [--profile FILE]

Builds what ``serve`` builds for a worker (RedisStore with metrics, QuotaEngine with the default
plans, RedisClock and degraded mode, QuotaService) against a redis-server it starts itself, and
calls the servicer's CheckAndReserve from ``--concurrency`` coroutines on uvloop, as grpc.aio
would after parsing the request: request -> JobParams -> engine -> store (the multiplexed
connection to Redis) -> reply decoded -> response message serialized. The figure is this
process' CPU per call (Redis is another process), median of ``--rounds``: what the sidecar
spends on a decision beside gRPC itself, stable on a busy machine where RPC/s are not.

``--profile FILE``: one more run under cProfile, the top functions by own and by cumulative
time written to FILE (cProfile slows the run; compare functions' shares, not the total).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb  # noqa: E402
from quota_sidecar.domain.clock import RedisClock  # noqa: E402
from quota_sidecar.domain.degraded import DegradedMode  # noqa: E402
from quota_sidecar.domain.engine import QuotaEngine  # noqa: E402
from quota_sidecar.server.journal import FileJournal  # noqa: E402
from quota_sidecar.server.metrics import Metrics  # noqa: E402
from quota_sidecar.server.plans_file import load_plans  # noqa: E402
from quota_sidecar.server.servicer import QuotaService  # noqa: E402
from quota_sidecar.server.telemetry import Telemetry  # noqa: E402
from quota_sidecar.storage.redis_server import RedisServerProcess, find_redis_server  # noqa: E402
from quota_sidecar.storage.store import RedisStore  # noqa: E402

ACCOUNTS = 200


class _Context:
    """What the servicer asks of grpc.aio's context on the success path: a 5 s deadline (the
    load-test tool's) and no metadata."""

    def time_remaining(self) -> float:
        return 5.0

    def invocation_metadata(self) -> tuple[()]:
        return ()


def _requests(calls: int) -> list[bytes]:
    """Serialized requests, as grpc.aio receives them: 10 s at 720p over ACCOUNTS accounts."""
    params = pb.JobParams(duration_seconds=10, resolution="720p")
    return [pb.CheckAndReserveRequest(account_id=f"bench-{i % ACCOUNTS}", product="sora",
                                      reservation_id=uuid.uuid4().hex, params=params).SerializeToString()
            for i in range(calls)]


async def _run(service: QuotaService, requests: list[bytes], concurrency: int) -> float:
    """CPU seconds per call of this process for ``requests``, ``concurrency`` at a time."""
    context = _Context()
    queue = iter(requests)

    async def caller() -> None:
        for raw in queue:
            response = await service.CheckAndReserve(pb.CheckAndReserveRequest.FromString(raw), context)
            assert response.allowed, response
            response.SerializeToString()

    started = time.process_time()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return (time.process_time() - started) / len(requests)


async def main_async(args: argparse.Namespace, url: str, workdir: Path) -> None:
    metrics = Metrics()
    store = RedisStore.from_url(url, telemetry=Telemetry(metrics))
    await store.load_scripts()
    engine = QuotaEngine(load_plans(), store, RedisClock(),
                         degraded=DegradedMode(FileJournal(str(workdir / "journal.jsonl"))))
    service = QuotaService(engine, metrics)
    try:
        # Every decision allowed, as in benchmarks/run.py: the free allowance first, then credits.
        await asyncio.gather(*(engine.grant(f"bench-{i}", 1_000_000, f"inproc-{uuid.uuid4().hex}")
                               for i in range(ACCOUNTS)))
        await _run(service, _requests(2000), args.concurrency)  # warm-up: caches, connection
        per_call = []
        for n in range(args.rounds):
            per_call.append(await _run(service, _requests(args.calls), args.concurrency) * 1e6)
            print(f"round {n + 1}: {per_call[-1]:.1f} us CPU per decision", flush=True)
        print(f"median over {args.rounds} rounds: {statistics.median(per_call):.1f} us CPU per decision "
              f"({args.calls} calls, {args.concurrency} at a time)")
        if args.profile:
            requests = _requests(args.calls)
            profiler = cProfile.Profile()
            profiler.enable()
            await _run(service, requests, args.concurrency)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("tottime").print_stats(35)
            stats.sort_stats("cumulative").print_stats(45)
            Path(args.profile).write_text(out.getvalue())
            print(f"profile: {args.profile}")
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU per CheckAndReserve in-process (see the docstring)")
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--profile", default="", metavar="FILE")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qs-inproc-") as tmp:
        redis = RedisServerProcess(find_redis_server(""), Path(tmp) / "redis", appendonly=True,
                                   appendfsync="everysec")
        redis.start()
        try:
            import uvloop

            uvloop.run(main_async(args, redis.url, Path(tmp)))
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
