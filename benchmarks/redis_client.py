"""The measurement behind quota_sidecar/storage/mux.py: Python CPU per reserve EVALSHA.

    .venv/bin/python benchmarks/redis_client.py [--calls 6000] [--concurrency 32]

Runs the reserve script with a real decision's KEYS/ARGV (14 keys, ~70
arguments) against a redis-server it starts itself on 127.0.0.1, side by
side in one run, through:

  redis-py pool   redis.asyncio's client and connection pool, the kept library;
  mux             the store's multiplexed connection (one connection, commands of
                  one event-loop tick written together, hiredis parsing).
  mux + packed    the same with the blocks that repeat call after call (windows,
                  prices, keys) encoded once, as the store sends them.

and prints the client process' CPU per call (what a sidecar pays, whatever
Redis does) and the ratio to the pool. Every run is bounded by --calls.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis.asyncio as aioredis  # noqa: E402

from quota_sidecar.domain.engine import QuotaEngine  # noqa: E402
from quota_sidecar.domain.model import JobParams  # noqa: E402
from quota_sidecar.server.plans_file import load_plans  # noqa: E402
from quota_sidecar.storage import mux as redis_mux  # noqa: E402
from quota_sidecar.storage.codec import reserve_args  # noqa: E402
from quota_sidecar.storage.keys import script_keys  # noqa: E402
from quota_sidecar.storage.redis_server import RedisServerProcess, find_redis_server  # noqa: E402
from quota_sidecar.storage.scripts import load_script_source  # noqa: E402
from quota_sidecar.storage.store import RedisStore  # noqa: E402

Call = Callable[[str], Awaitable[Any]]


async def _captured_command(url: str) -> tuple[list[str], list[Any]]:
    """The header and arguments of one real reserve call (reservation id at index 6)."""
    store = RedisStore.from_url(url, key_prefix="bench")
    captured: dict[str, Any] = {}

    async def capture(cmd: Any) -> Any:
        captured["cmd"] = cmd
        return await original(cmd)

    original, store.reserve = store.reserve, capture  # type: ignore[method-assign]
    await QuotaEngine(load_plans(), store).check_and_reserve(
        "bench-acct", "sora", "warm", JobParams(duration_seconds=10, resolution="720p"))
    cmd = captured["cmd"]
    await store.close()
    return store._header(cmd.account_id, cmd.stamp), reserve_args(cmd)


async def _run(call: Call, calls: int, concurrency: int) -> tuple[float, float]:
    """(client CPU µs per call, calls per second) for ``calls`` calls from ``concurrency`` tasks."""
    async def worker(count: int) -> None:
        for _ in range(count):
            await call(uuid.uuid4().hex)

    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    done = calls // concurrency * concurrency
    return (time.process_time() - cpu0) / done * 1e6, done / (time.perf_counter() - wall0)


def _callers(url: str, header: list[Any], args: list[Any]) -> tuple[dict[str, Call], list[Any]]:
    client = aioredis.from_url(url, decode_responses=True)
    script = client.register_script(load_script_source("reserve"))
    keys = script_keys("bench", 256, "bench-acct")
    flat, flat_header = redis_mux.flatten(args), redis_mux.flatten(header)
    mux = redis_mux.MuxConnection.for_client(client, timeout_seconds=5)
    assert mux is not None

    def with_rid(base: list[Any], rid: str, head: list[Any] = flat_header) -> list[Any]:
        return [*head, rid, *base[1:]]

    async def pool(rid: str) -> Any:
        return await script(keys=list(keys), args=with_rid(flat, rid))

    async def mux_plain(rid: str) -> Any:
        return (await mux.execute_many([redis_mux.pack_command(["EVALSHA", script.sha, len(keys), *keys,
                                                                 *with_rid(flat, rid)])]))[0]

    async def mux_packed(rid: str) -> Any:
        return (await mux.execute_many([redis_mux.pack_command(["EVALSHA", script.sha, len(keys), keys.packed,
                                                                 *with_rid(args, rid, header)])]))[0]

    return {"redis-py pool": pool, "mux": mux_plain, "mux + packed": mux_packed}, [client, mux]


async def main(calls: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServerProcess(find_redis_server(), Path(tmp))
        server.start()
        try:
            header, args = await _captured_command(server.url)
            callers, closables = _callers(server.url, header, args)
            await callers["redis-py pool"]("warm-up")  # loads the script
            results = {}
            for name, call in callers.items():
                await _run(call, min(calls, 500), concurrency)  # warm-up
                results[name] = await _run(call, calls, concurrency)
            base_cpu = results["redis-py pool"][0]
            print(f"reserve EVALSHA, {len(header) + len(redis_mux.flatten(args))} arguments + 14 keys, "
                  f"{concurrency} concurrent callers, {calls} calls each way")
            for name, (cpu_us, rate) in results.items():
                print(f"  {name:15s} {cpu_us:7.1f} µs client CPU/call  {rate:8.0f} calls/s  "
                      f"pool/this CPU {base_cpu / cpu_us:4.1f}x")
            for closable in closables:
                await closable.aclose()
        finally:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=6000, help="calls per client kind (bounded)")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent callers")
    ns = parser.parse_args()
    asyncio.run(main(ns.calls, ns.concurrency))
