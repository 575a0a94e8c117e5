"""The transport floor: a grpc.aio QuotaService that decides nothing.

    python benchmarks/noop_server.py --listen 127.0.0.1:0 --responses FILE

Every QuotaService method answers at once with a canned response captured from
the real sidecar by run.py (FILE: JSON of method name -> base64 of the
serialized response), so messages have the same size and shape as the
sidecar's; a batch answers one copy of the captured item result per request
item. The server is built like the sidecar's worker server
(quota_sidecar.server.app): the same grpc options, health and reflection
registered, one process, the event loop ``serve`` picks by default (uvloop when
installed, through quota_sidecar.server.app.run_until_complete). It prints ``PORT <n>`` once it is
serving, then runs until SIGTERM/SIGINT.

``--redis-ping URL``: CheckAndReserve first awaits one PING on the sidecar's multiplexed Redis
connection (quota_sidecar.storage.mux): the floor of any server that asks Redis once per call,
which is what benchmarks/unary_cpu.py sets beside the no-op server and the sidecar.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.server import app as sidecar_server
from quota_sidecar.server.settings import Settings

# Method -> response message class; batch methods also have their per-item result class.
UNARY = {"CheckAndReserve": pb.CheckAndReserveResponse, "Commit": pb.CommitResponse,
         "Release": pb.ReleaseResponse, "ExtendReservation": pb.ExtendReservationResponse,
         "GetBalance": pb.GetBalanceResponse}
BATCH = {"CheckAndReserveBatch": (pb.CheckAndReserveBatchResponse, pb.BatchReserveResult),
         "CommitBatch": (pb.CommitBatchResponse, pb.BatchCommitResult),
         "ReleaseBatch": (pb.ReleaseBatchResponse, pb.BatchReleaseResult)}


def load_responses(path: str) -> dict[str, Any]:
    """Method -> canned message (unary) or canned item result (batch)."""
    with open(path, encoding="utf-8") as f:
        raw = {name: base64.b64decode(data) for name, data in json.load(f).items()}
    canned: dict[str, Any] = {}
    for name, cls in UNARY.items():
        canned[name] = cls.FromString(raw.get(name, b""))
    for name, (_, item_cls) in BATCH.items():
        canned[name] = item_cls.FromString(raw.get(name, b""))
    return canned


class NoopQuotaService(pb_grpc.QuotaServiceServicer):
    """Canned answers; batch responses are built once per item count (the floor builds nothing per call)."""

    def __init__(self, canned: dict[str, Any], redis: Any = None) -> None:
        self._canned = canned
        self._batches: dict[tuple[str, int], Any] = {}
        self._redis = redis  # a MuxConnection with --redis-ping, else None

    def _batch(self, name: str, items: int) -> Any:
        key = (name, items)
        response = self._batches.get(key)
        if response is None:
            response = BATCH[name][0](results=[self._canned[name]] * items)
            if len(self._batches) < 1024:  # bounded: item counts are at most --max-batch-items
                self._batches[key] = response
        return response

    async def CheckAndReserve(self, request: Any, context: Any) -> Any:
        if self._redis is not None:
            await self._redis.execute("PING")
        return self._canned["CheckAndReserve"]

    async def Commit(self, request: Any, context: Any) -> Any:
        return self._canned["Commit"]

    async def Release(self, request: Any, context: Any) -> Any:
        return self._canned["Release"]

    async def ExtendReservation(self, request: Any, context: Any) -> Any:
        return self._canned["ExtendReservation"]

    async def GetBalance(self, request: Any, context: Any) -> Any:
        return self._canned["GetBalance"]

    async def CheckAndReserveBatch(self, request: Any, context: Any) -> Any:
        return self._batch("CheckAndReserveBatch", len(request.items))

    async def CommitBatch(self, request: Any, context: Any) -> Any:
        return self._batch("CommitBatch", len(request.items))

    async def ReleaseBatch(self, request: Any, context: Any) -> Any:
        return self._batch("ReleaseBatch", len(request.items))


async def serve(listen: str, responses: str, redis_url: str = "") -> None:
    settings = Settings(listen=(listen,))
    # The sidecar's own option list (message limits, SO_REUSEPORT off), so transport costs match.
    server = grpc.aio.server(options=sidecar_server._options(settings))
    redis = None
    if redis_url:
        from urllib.parse import urlsplit

        from quota_sidecar.storage.mux import MuxConnection

        url = urlsplit(redis_url)
        redis = MuxConnection(host=url.hostname or "127.0.0.1", port=url.port or 6379)
        await redis.execute("PING")
    pb_grpc.add_QuotaServiceServicer_to_server(NoopQuotaService(load_responses(responses), redis), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((sidecar_server.SERVICE_NAME, sidecar_server.HEALTH_NAME,
                                         reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"PORT {port}", flush=True)
    await stop.wait()
    await server.stop(1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port; port 0 picks a free one")
    parser.add_argument("--responses", required=True, help="JSON file of canned responses (written by run.py)")
    parser.add_argument("--redis-ping", default="", metavar="URL",
                        help="CheckAndReserve awaits one PING to this Redis first (see the docstring)")
    args = parser.parse_args()
    run_loop(serve(args.listen, args.responses, args.redis_ping))
    return 0


def run_loop(main: Any) -> None:
    """The sidecar's own event loop choice (uvloop when installed, by default) and runner."""
    runner = getattr(sidecar_server, "run_until_complete", None)
    if runner is None:  # a sidecar from before --event-loop: plain asyncio
        asyncio.run(main)
    else:
        runner(main, getattr(Settings(), "event_loop", "auto"))


if __name__ == "__main__":
    sys.exit(main())
