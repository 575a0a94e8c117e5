"""--health-listen: grpc.health.v1 alone on TCP, for Kubernetes probes, with the main server's status.

Each test runs ``server.run`` in this process (so the ports come back through
``on_ready``) against a real redis-server behind the fault proxy, and stops it
with a real SIGTERM, which ``run`` handles on the event loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest
from fault_proxy import FaultProxy
from grpc_health.v1 import health_pb2, health_pb2_grpc

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.app import HEALTH_NAMES, LIVENESS_NAME, run
from quota_sidecar.server.settings import Settings
from quota_sidecar.server.workers import worker_settings
from quota_sidecar.storage.redis_server import RedisServerProcess

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALL_TIMEOUT_SECONDS = 5.0
WAIT_SECONDS = 15.0  # bound of every poll below; each normally ends in well under a second
POLL_SECONDS = 0.05


class Running:
    """A ``run`` task and what it reported when ready."""

    def __init__(self, settings: Settings) -> None:
        self.ready: asyncio.Future[dict[str, int]] = asyncio.get_running_loop().create_future()
        self.task = asyncio.create_task(run(settings, on_ready=self.ready.set_result))
        self.health_channel: grpc.aio.Channel | None = None

    async def ports(self) -> dict[str, int]:
        done, _ = await asyncio.wait({self.ready, self.task}, timeout=WAIT_SECONDS,
                                     return_when=asyncio.FIRST_COMPLETED)
        assert self.ready in done, f"run did not become ready: {self.task.exception() if self.task.done() else 'timeout'}"
        ports = self.ready.result()
        self.health_channel = grpc.aio.insecure_channel(f"127.0.0.1:{ports['health']}")
        return ports

    async def status(self, service: str = "") -> int:
        assert self.health_channel is not None
        reply = await health_pb2_grpc.HealthStub(self.health_channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT_SECONDS)
        return reply.status

    async def wait_status(self, wanted: int) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        last: Any = None
        while time.monotonic() < deadline:
            last = await self.status()
            if last == wanted:
                return
            await asyncio.sleep(POLL_SECONDS)
        pytest.fail(f"health never became {wanted} (last {last})")

    async def stop(self) -> None:
        """A real SIGTERM, as Kubernetes sends it; run() must return (graceful stop)."""
        if not self.task.done():
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(self.task, WAIT_SECONDS)
        if self.health_channel is not None:
            await self.health_channel.close()


@pytest.fixture
async def proxy(redis_server: RedisServerProcess) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", redis_server.port) as p:
        yield p


def _settings(tmp_path: Path, proxy: FaultProxy, key_prefix: str, **changes: Any) -> Settings:
    base = Settings(listen=(f"unix:{tmp_path}/q.sock",), health_listen="127.0.0.1:0",
                    redis_url=f"redis://127.0.0.1:{proxy.port}/0", key_prefix=key_prefix,
                    sweep_interval_seconds=0, plans_reload_interval_seconds=0,
                    degraded_journal=str(tmp_path / "journal.jsonl"))
    return base.with_(**changes)


async def test_health_port_follows_redis_and_serves_nothing_else(
        tmp_path: Path, proxy: FaultProxy, key_prefix: str) -> None:
    running = Running(_settings(tmp_path, proxy, key_prefix, redis_unhealthy_after_seconds=0.3,
                                redis_timeout_ms=300))
    try:
        ports = await running.ports()
        assert ports["health"] not in (0, ports["listen"])
        for name in HEALTH_NAMES:
            assert await running.status(name) == SERVING, name
        # The worker API is not on the probe port, whatever a caller tries there.
        assert running.health_channel is not None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await pb_grpc.QuotaServiceStub(running.health_channel).GetBalance(
                pb.GetBalanceRequest(account_id="a"), timeout=CALL_TIMEOUT_SECONDS)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED

        await proxy.refuse()
        await proxy.cut()
        await running.wait_status(NOT_SERVING)
        # Liveness does not follow Redis: an outage takes pods out of rotation, it does not restart them.
        assert await running.status(LIVENESS_NAME) == SERVING
        await proxy.refuse(False)
        await running.wait_status(SERVING)
    finally:
        await running.stop()


@pytest.mark.all_redis_versions
async def test_health_port_says_not_serving_through_the_drain(
        tmp_path: Path, proxy: FaultProxy, key_prefix: str) -> None:
    """During the grace period the probe port answers NOT_SERVING (not a refused connection),
    while a call already in flight still completes."""
    running = Running(_settings(tmp_path, proxy, key_prefix, redis_unhealthy_after_seconds=0,
                                redis_timeout_ms=10_000, shutdown_grace_seconds=10))
    try:
        await running.ports()
        async with grpc.aio.insecure_channel(f"unix:{tmp_path}/q.sock") as channel:
            quota = pb_grpc.QuotaServiceStub(channel)
            # Warm: the decision path's connection to Redis is open (a blackhole stalls open
            # connections, keeping their bytes, and never forwards new ones).
            assert (await quota.CheckAndReserve(pb.CheckAndReserveRequest(
                account_id="warm", product="sora", reservation_id="w1",
                params=pb.JobParams(duration_seconds=5, resolution="480p")), timeout=CALL_TIMEOUT_SECONDS)).allowed
            held_before = proxy.stats.bytes_held
            await proxy.blackhole(True)  # the next call waits on Redis until the drain has been seen
            call = asyncio.ensure_future(quota.CheckAndReserve(pb.CheckAndReserveRequest(
                account_id="drain", product="sora", reservation_id="r1",
                params=pb.JobParams(duration_seconds=5, resolution="480p")), timeout=WAIT_SECONDS))
            # The reserve is on its way to Redis: held in the proxy (no sleep, no guess).
            await proxy.wait_for(lambda st: st.bytes_held > held_before, timeout=WAIT_SECONDS)
            os.kill(os.getpid(), signal.SIGTERM)
            await running.wait_status(NOT_SERVING)
            assert await running.status(LIVENESS_NAME) == NOT_SERVING
            assert not call.done(), "the in-flight call should still be running during the drain"
            await proxy.blackhole(False)
            reply = await call
            assert reply.allowed
    finally:
        await running.stop()
    assert running.task.result() is None


def test_health_listen_setting() -> None:
    assert Settings().health_listen == ""
    assert Settings.from_sources(environ={"QUOTA_HEALTH_LISTEN": "0.0.0.0:8081"}).health_listen == "0.0.0.0:8081"
    for bad in ("8081", "host:", "::1:8081", "[::1]:99999"):
        with pytest.raises(ConfigError) as info:
            Settings(health_listen=bad)
        assert info.value.field == "health_listen", bad


def test_only_worker_0_binds_the_health_port() -> None:
    settings = Settings(listen=("127.0.0.1:50051",), workers=3, health_listen="0.0.0.0:8081")
    assert worker_settings(settings, 0, "redis://r").health_listen == "0.0.0.0:8081"
    assert worker_settings(settings, 1, "redis://r").health_listen == ""


async def test_unix_socket_mode_lets_another_user_connect(tmp_path: Path, proxy: FaultProxy, key_prefix: str) -> None:
    running = Running(_settings(tmp_path, proxy, key_prefix, unix_socket_mode="0666"))
    try:
        await running.ports()
        assert stat.S_IMODE(os.stat(tmp_path / "q.sock").st_mode) == 0o666
    finally:
        await running.stop()


def test_unix_socket_mode_setting() -> None:
    assert Settings().socket_mode() is None
    assert Settings(unix_socket_mode="660").socket_mode() == 0o660
    for bad in ("rw", "0999", "1777", "-1"):
        with pytest.raises(ConfigError) as info:
            Settings(unix_socket_mode=bad)
        assert info.value.field == "unix_socket_mode", bad
