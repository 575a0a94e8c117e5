"""Server hardening (issue 14): who may open the admin socket, where the worker API may listen,
idle connections against the open-file limit, and health that does not wait for a hung ping.

Every test runs the real server: ``quota-sidecar serve`` subprocesses (tests/test_serve_cli.py's
helpers) or, for the health watcher, the real watcher against a real redis-server stopped with
SIGSTOP and a clock the test moves. Every wait is a bounded poll on something observable; every
address is loopback or a unix socket.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from test_serve_cli import ServeProcess, _clean_env, _sora, health_status, running_sidecar, short_dir  # noqa: F401

from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.app import HEALTH_NAMES, RedisHealthJudge, RedisHealthWatch
from quota_sidecar.server.metrics import Metrics
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
WAIT_SECONDS = 30.0  # bound of every poll below; each normally ends within a few seconds
POLL_SECONDS = 0.05
TOKEN = "hardening-token-0123456789"


def wait_for(what: str, check: Callable[[], bool], serve: ServeProcess | None = None,
             timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if serve is not None and serve.proc.poll() is not None:
            pytest.fail(f"serve exited with {serve.proc.returncode} while waiting for {what}:\n{serve.stderr}")
        time.sleep(POLL_SECONDS)
    pytest.fail(f"timed out after {timeout} s waiting for {what}" + (f":\n{serve.stderr}" if serve else ""))


def file_mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- item 3: the admin unix socket


@pytest.mark.slow
def test_worker_socket_mode_never_widens_the_admin_socket(short_dir: str, redis_server: RedisServerProcess,
                                                          key_prefix: str) -> None:
    """--unix-socket-mode 0666 opens the worker socket to every local user, not the admin one
    (here without a token: anyone who could open it could grant credits)."""
    extra = ["--unix-socket-mode", "0666", "--degraded-journal", f"{short_dir}/journal"]
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix, extra=extra) as sc:
        assert file_mode(sc.sock) == 0o666
        assert file_mode(sc.admin_sock) == 0o600
        assert health_status(sc.admin_target) == SERVING  # its owner still gets in
        assert sc.serve.terminate() == 0, sc.serve.stderr


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "env"])
def test_an_open_admin_socket_without_credentials_is_refused(short_dir: str, redis_server: RedisServerProcess,
                                                             how: str) -> None:
    sock, admin_sock = f"{short_dir}/q.sock", f"{short_dir}/a.sock"
    args = ["--listen", f"unix:{sock}", "--admin-listen", f"unix:{admin_sock}", "--redis-url", redis_server.url,
            "--degraded-journal", f"{short_dir}/journal"]
    env = {}
    if how == "flag":
        args += ["--admin-unix-socket-mode", "0660"]
    else:
        env["QUOTA_ADMIN_UNIX_SOCKET_MODE"] = "0660"
    serve = ServeProcess(args, _clean_env(env), short_dir)
    try:
        assert serve.wait_exit() == 2, serve.stderr
        lines = serve.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("quota-sidecar: bad setting: admin_unix_socket_mode: "
                                                       "--admin-unix-socket-mode 0660 would let other local users"), \
            serve.stderr
        assert "--admin-token-file" in lines[0]
        assert not os.path.exists(sock) and not os.path.exists(admin_sock)  # refused before anything was bound
    finally:
        serve.kill()


@pytest.mark.slow
def test_admin_unix_socket_mode_applies_with_a_token(short_dir: str, redis_server: RedisServerProcess,
                                                     key_prefix: str) -> None:
    Path(short_dir, "tokens").write_text(TOKEN + "\n")
    extra = ["--admin-unix-socket-mode", "0660", "--admin-token-file", f"{short_dir}/tokens",
             "--degraded-journal", f"{short_dir}/journal"]
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix, extra=extra) as sc:
        assert file_mode(sc.admin_sock) == 0o660
        assert sc.serve.terminate() == 0, sc.serve.stderr


def test_admin_socket_mode_settings() -> None:
    assert Settings().admin_socket_mode() == 0o600
    with pytest.raises(ConfigError) as info:
        Settings(admin_listen=("unix:/tmp/a.sock",), admin_unix_socket_mode="0606")
    assert info.value.field == "admin_unix_socket_mode"
    for bad in ("rw", "0999", ""):
        with pytest.raises(ConfigError) as info:
            Settings(admin_unix_socket_mode=bad)
        assert info.value.field == "admin_unix_socket_mode", bad
    # Owner-only needs nothing; an admin API on TCP has no socket mode to worry about.
    Settings(admin_listen=("unix:/tmp/a.sock",), admin_unix_socket_mode="0700")
    Settings(admin_listen=("127.0.0.1:0",), admin_unix_socket_mode="0666")
    Settings(admin_listen=("unix:/tmp/a.sock",), admin_unix_socket_mode="0666", admin_token_file="/any")


# --------------------------------------------------------------------------- item 10: where the worker API listens


@pytest.mark.parametrize("address", ["0.0.0.0:50051", "[::]:50051", ":50051", "10.1.2.3:50051",
                                     "example.com:50051", "192.0.2.1:50051"])
def test_worker_address_off_loopback_needs_the_private_network_flag(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(listen=(address,))
    assert info.value.field == "listen" and "--listen-on-private-network" in info.value.message
    with pytest.raises(ConfigError):
        Settings.from_sources({}, {"QUOTA_LISTEN": address, "QUOTA_LISTEN_ON_PRIVATE_NETWORK": "false"})
    assert Settings(listen=(address,), listen_on_private_network=True).listen == (address,)
    assert Settings.from_sources({}, {"QUOTA_LISTEN": address,
                                      "QUOTA_LISTEN_ON_PRIVATE_NETWORK": "true"}).listen_on_private_network is True


@pytest.mark.parametrize("address", ["127.0.0.1:50051", "127.9.9.9:0", "[::1]:50051", "localhost:50051",
                                     "unix:/tmp/q.sock", "unix-abstract:qs"])
def test_loopback_worker_addresses_need_no_flag(address: str) -> None:
    assert Settings(listen=(address,)).listen_on_private_network is False


def test_private_network_flag_reads_true_and_false() -> None:
    for raw, expected in (("true", True), ("YES", True), ("1", True), ("false", False), ("off", False)):
        assert Settings.from_sources({}, {"QUOTA_LISTEN_ON_PRIVATE_NETWORK": raw}).listen_on_private_network is expected
    with pytest.raises(ConfigError):
        Settings.from_sources({}, {"QUOTA_LISTEN_ON_PRIVATE_NETWORK": "maybe"})


@pytest.mark.slow
def test_serve_refuses_a_worker_address_off_loopback(short_dir: str, redis_server: RedisServerProcess) -> None:
    # 192.0.2.1 (TEST-NET-1) is nobody's address: even a server without the rule binds nothing there.
    serve = ServeProcess(["--listen", "192.0.2.1:50051", "--redis-url", redis_server.url,
                          "--degraded-journal", f"{short_dir}/journal"], _clean_env(), short_dir)
    try:
        assert serve.wait_exit() == 2, serve.stderr
        lines = serve.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("quota-sidecar: bad setting: listen: 192.0.2.1:50051 is "
                                                       "not loopback"), serve.stderr
        assert "--listen-on-private-network true" in lines[0]
    finally:
        serve.kill()


@pytest.mark.slow
def test_private_network_flag_allows_it_with_a_warning(short_dir: str, redis_server: RedisServerProcess,
                                                       key_prefix: str) -> None:
    # The wildcard address is what a pod on a private network binds; the test only connects
    # through 127.0.0.1, so no traffic leaves the machine.
    name = "0.0.0.0"
    port = free_port()
    extra = ["--listen", f"{name}:{port}", "--listen-on-private-network", "true",
             "--degraded-journal", f"{short_dir}/journal"]
    with running_sidecar(short_dir, redis_url=redis_server.url, key_prefix=key_prefix, extra=extra,
                         admin=False) as sc:
        assert health_status(f"127.0.0.1:{port}") == SERVING
        warnings = [line for line in sc.serve.stderr.splitlines() if "WARNING" in line and f"{name}:{port}" in line]
        assert warnings and "authenticates nobody" in warnings[0], sc.serve.stderr
        assert sc.serve.terminate() == 0, sc.serve.stderr


# --------------------------------------------------------------------------- item 9: idle connections, descriptors


NOFILE = 256  # the sidecar's open-file limit in this test, soft = hard
IDLE_CONNECTIONS = 3 * NOFILE  # silent connections: more than the sidecar can hold at once, three times over


class LimitedServeProcess(ServeProcess):
    """A ServeProcess whose child starts with RLIMIT_NOFILE soft = hard = ``nofile``."""

    def __init__(self, args: Sequence[str], env: dict[str, str], log_dir: str, nofile: int) -> None:
        self.args = list(args)
        self._stdout_path = os.path.join(log_dir, f"serve-{time.monotonic_ns()}.out")
        self._stderr_path = self._stdout_path[:-4] + ".err"
        with open(self._stdout_path, "wb") as out, open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "quota_sidecar", "serve", *self.args], stdin=subprocess.DEVNULL,
                stdout=out, stderr=err, env=env,
                preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))


def _room_for(count: int) -> None:
    """This test process must hold ``count`` more sockets than it has."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = count + 256
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            hard = needed  # root (CI) may raise it; elsewhere setrlimit fails the test with its reason
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _reserve_once(target: str, rid: str, key_prefix: str) -> bool:
    try:
        with grpc.insecure_channel(target) as channel:
            return pb_grpc.QuotaServiceStub(channel).CheckAndReserve(_sora("fd-" + key_prefix, rid), timeout=2).allowed
    except grpc.RpcError:
        return False


def _metrics_text(port: int) -> str:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            return str(reply.read().decode())
    except OSError:
        return ""


@pytest.mark.all_redis_versions
@pytest.mark.slow
def test_idle_connections_beyond_the_fd_limit_do_not_starve_calls(short_dir: str, redis_server: RedisServerProcess,
                                                                  key_prefix: str) -> None:
    """More silent TCP connections than the sidecar has descriptors: with a short handshake timeout
    they are closed, the descriptors come back and a worker's call gets through; the sidecar says
    why it stalled (a WARNING near the limit, the quota_open_fds / quota_max_fds gauges).

    With gRPC's default handshake timeout (120 s) the idle connections hold every descriptor and
    each call times out in the accept queue for the whole polling deadline."""
    _room_for(IDLE_CONNECTIONS)
    port, metrics_port = free_port(), free_port()
    serve = LimitedServeProcess(
        ["--listen", f"127.0.0.1:{port}", "--redis-url", redis_server.url, "--key-prefix", key_prefix,
         "--server-handshake-timeout-ms", "1500", "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--sweep-interval-seconds", "0", "--degraded-journal", f"{short_dir}/journal"],
        _clean_env(), short_dir, NOFILE)
    idle: list[socket.socket] = []
    try:
        serve.wait_ready(f"127.0.0.1:{port}")
        assert f"open-file limit (RLIMIT_NOFILE): {NOFILE}" in serve.stderr
        for _ in range(IDLE_CONNECTIONS):  # the kernel accepts them into the listen backlog (SOMAXCONN)
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_for("a CheckAndReserve through the idle connections",
                 lambda: _reserve_once(f"127.0.0.1:{port}", "through-idle", key_prefix), serve)
        wait_for("the file descriptor warning", lambda: "file descriptors open" in serve.stderr, serve)
        for conn in idle:
            conn.close()
        wait_for("the descriptor gauges", lambda: f"quota_max_fds {NOFILE}.0" in _metrics_text(metrics_port), serve)
        assert "quota_open_fds " in _metrics_text(metrics_port)
        warnings = [line for line in serve.stderr.splitlines() if "file descriptors open" in line]
        assert len(warnings) == 1, warnings  # rate-limited: one per minute at most
        assert serve.terminate() == 0, serve.stderr
    finally:
        for conn in idle:
            conn.close()
        serve.kill()


def test_connection_limit_settings() -> None:
    s = Settings()
    assert (s.server_handshake_timeout_ms, s.max_connection_idle_ms, s.max_connection_age_ms,
            s.max_connection_age_grace_ms, s.max_concurrent_streams) == (10_000, 300_000, 3_600_000, 30_000, 1000)
    Settings(max_connection_idle_ms=0, max_connection_age_ms=0)  # 0 = never
    for name, bad in (("server_handshake_timeout_ms", 0), ("server_handshake_timeout_ms", 600_001),
                      ("max_connection_idle_ms", 500), ("max_connection_age_ms", -1),
                      ("max_connection_age_grace_ms", -1), ("max_concurrent_streams", 0)):
        with pytest.raises(ConfigError) as info:
            Settings(**{name: bad})
        assert info.value.field == name


# --------------------------------------------------------------------------- item 14: health and a hung ping


def test_health_judge_looks_at_the_last_answer_only() -> None:
    judge = RedisHealthJudge(2.0, now_seconds=100.0)
    assert judge.judge(102.0)  # the grace period runs from the start
    assert not judge.judge(102.01)
    judge.observe_ok(105.0)
    assert judge.judge(107.0) and not judge.judge(107.5)
    judge.observe_ok(104.0)  # an answer reported late never moves the last one back
    assert judge.last_ok_seconds == 105.0


class HealthProbe:
    """The health service on a real server, asked over a real channel."""

    def __init__(self, health: health_aio.HealthServicer) -> None:
        self.server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.port}")

    async def statuses(self) -> set[int]:
        assert self.channel is not None
        stub = health_pb2_grpc.HealthStub(self.channel)
        return {(await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status
                for name in HEALTH_NAMES}

    async def wait_for(self, wanted: int, what: str) -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while await self.statuses() != {wanted}:
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(POLL_SECONDS)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        await self.server.stop(None)


async def _until(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(POLL_SECONDS)


class ManualMonotonic:
    def __init__(self, now_seconds: float) -> None:
        self.now_seconds = now_seconds

    def __call__(self) -> float:
        return self.now_seconds


async def test_health_turns_not_serving_while_a_ping_hangs(tmp_path: Path, redis_binary: str) -> None:
    """Redis is SIGSTOPped: the watcher's ping hangs (the Redis deadline is far beyond the test),
    yet NOT_SERVING comes as soon as the injected clock passes the grace period; SERVING comes
    back with the first answer once Redis resumes."""
    redis = RedisServerProcess(redis_binary, tmp_path / "r")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=300.0)
    health = health_aio.HealthServicer()
    for name in HEALTH_NAMES:
        await health.set(name, SERVING)  # as the server starts
    probe = HealthProbe(health)
    metrics = Metrics()
    clock = ManualMonotonic(1000.0)
    watcher: asyncio.Task[Any] | None = None
    stopped = False
    try:
        await probe.start()
        await store.ping()  # connected before the stall
        os.kill(redis.pid, signal.SIGSTOP)
        stopped = True
        watch = RedisHealthWatch(store, health, 2.0, metrics=metrics, monotonic=clock)
        watcher = asyncio.create_task(watch.run(probe_interval_seconds=0.05, judge_interval_seconds=0.02))
        await _until(lambda: watch.pinging and watch.judgements >= 3, "a hung ping and a few verdicts")
        assert await probe.statuses() == {SERVING}  # the clock has not moved: within the grace period

        clock.now_seconds += 2.5
        await probe.wait_for(NOT_SERVING, "NOT_SERVING while the ping hangs")
        assert watch.pinging, "the verdict must not wait for the ping"
        assert b"quota_redis_up 0.0" in metrics.exposition()

        os.kill(redis.pid, signal.SIGCONT)
        stopped = False
        await probe.wait_for(SERVING, "SERVING at the first answer")
        assert b"quota_redis_up 1.0" in metrics.exposition()
    finally:
        if stopped:
            os.kill(redis.pid, signal.SIGCONT)
        if watcher is not None:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        await store.close()
        await probe.close()
        redis.stop()
