"""The grpc.aio unary floor of whichever grpcio this interpreter has (grpc/grpc#43092).

    .venv/bin/python benchmarks/grpcio_floor.py [--seconds 5] [--concurrency 32]
    /path/to/other-venv/bin/python benchmarks/grpcio_floor.py   # another grpcio, same machine

Needs nothing but grpcio, so it runs in a throwaway venv holding an older or
newer release: a no-op unary server (generic handler, raw bytes of the size of
a CheckAndReserve exchange) in one process, a closed-loop grpc.aio client in
another, on 127.0.0.1. Prints RPC/s and the server's CPU per RPC. Bounded by
--seconds. GRPCIO_FLOOR_UVLOOP=1 runs both sides on uvloop (when installed).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import time
from typing import Any

import grpc

REQUEST_BYTES = 90    # a CheckAndReserveRequest with params
RESPONSE_BYTES = 160  # an allowed CheckAndReserveResponse with one limit
METHOD = "/bench.Noop/Call"


def _serve(port_queue: multiprocessing.Queue[int], stop: multiprocessing.Event) -> None:  # type: ignore[name-defined]
    async def main() -> None:
        reply = b"x" * RESPONSE_BYTES

        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return reply

        handler = grpc.method_handlers_generic_handler("bench.Noop", {
            "Call": grpc.unary_unary_rpc_method_handler(call)})
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        while not stop.is_set():
            await asyncio.sleep(0.05)
        await server.stop(0.5)

    _run(main())


def _run(coro: Any) -> Any:
    if os.environ.get("GRPCIO_FLOOR_UVLOOP"):
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


async def _load(port: int, seconds: float, concurrency: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(METHOD)
        body = b"r" * REQUEST_BYTES
        deadline = time.monotonic() + seconds
        count = 0

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                await call(body)
                count += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=32)
    ns = parser.parse_args()
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    stop = multiprocessing.Event()
    server = multiprocessing.Process(target=_serve, args=(queue, stop), daemon=True)
    server.start()
    try:
        port = queue.get(timeout=30)
        _run(_load(port, min(1.0, ns.seconds), ns.concurrency))  # warm-up
        cpu_before = _cpu_seconds(server.pid)
        count = _run(_load(port, ns.seconds, ns.concurrency))
        server_cpu = _cpu_seconds(server.pid) - cpu_before
        loop = "uvloop" if os.environ.get("GRPCIO_FLOOR_UVLOOP") else "asyncio"
        print(f"grpcio {grpc.__version__} on {loop}: {count / ns.seconds:.0f} RPC/s, "
              f"server {server_cpu / count * 1e6:.0f} µs CPU/RPC ({ns.concurrency} callers, {ns.seconds:g} s)")
    finally:
        stop.set()
        server.join(10)
        if server.is_alive():
            server.kill()


def _cpu_seconds(pid: int | None) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
