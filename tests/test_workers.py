"""``quota-sidecar serve --workers N``: N processes on one TCP port, one supervisor.

Real subprocesses on a loopback port; every wait is a bounded poll. The
supervisor's children are found with ``pgrep -P`` (its direct children), and
each worker's stop line says how many calls it took, which shows that the
kernel spread the connections over more than one worker.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from test_serve_cli import ServeProcess, _clean_env, health_status

from quota_sidecar._proto.quota.v1 import quota_pb2 as pb
from quota_sidecar._proto.quota.v1 import quota_pb2_grpc as pb_grpc
from quota_sidecar.domain.errors import ConfigError
from quota_sidecar.server.settings import Settings
from quota_sidecar.storage.redis_server import RedisServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.all_redis_versions]

WAIT_SECONDS = 20.0
POLL_SECONDS = 0.05
SERVING = re.compile(r"worker (\d+) \(pid (\d+)\) serving")
STOPPED = re.compile(r"worker (\d+) \(pid (\d+)\) stopped after (\d+) call")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, timeout=10, check=False)
    return {int(x) for x in out.stdout.split()}


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_until(what: str, check: Callable[[], bool], serve: ServeProcess, timeout: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if serve.proc.poll() is not None:
            pytest.fail(f"serve exited with {serve.proc.returncode} while waiting for {what}:\n{serve.stderr}")
        time.sleep(POLL_SECONDS)
    pytest.fail(f"timed out waiting for {what}:\n{serve.stderr}")


def serving(port: int) -> bool:
    try:
        return health_status(f"127.0.0.1:{port}") == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def start_workers(directory: str, port: int, extra: list[str]) -> ServeProcess:
    serve = ServeProcess(["--workers", "2", "--listen", f"127.0.0.1:{port}", "--sweep-interval-seconds", "0",
                          "--shutdown-grace-seconds", "2", *extra], _clean_env(), directory)
    wait_until("both workers serving", lambda: len(SERVING.findall(serve.stderr)) == 2, serve)
    wait_until("health SERVING", lambda: serving(port), serve)
    return serve


@pytest.fixture
def tmpdir_short() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="qw", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def reserve_on_fresh_channel(port: int, rid: str) -> pb.CheckAndReserveResponse:
    # A new channel is a new TCP connection, which SO_REUSEPORT hashes to one of the workers.
    with grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        return pb_grpc.QuotaServiceStub(channel).CheckAndReserve(pb.CheckAndReserveRequest(
            account_id="shared", product="sora", reservation_id=rid,
            params=pb.JobParams(duration_seconds=10, resolution="720p")), timeout=10)


def test_two_workers_share_the_port_and_the_account_and_stop_on_sigterm(
        tmpdir_short: str, redis_server: RedisServerProcess, key_prefix: str) -> None:
    port = free_port()
    serve = start_workers(tmpdir_short, port, ["--redis-url", redis_server.url, "--key-prefix", key_prefix])
    try:
        workers = children(serve.proc.pid)
        assert len(workers) == 2, serve.stderr
        assert {int(pid) for _, pid in SERVING.findall(serve.stderr)} == workers

        results = [reserve_on_fresh_channel(port, f"job-{i}") for i in range(40)]
        assert sum(r.allowed for r in results) == 30
        assert sorted(r.free_used for r in results if r.allowed) == list(range(1, 31))
        assert {r.denial.reason for r in results if not r.allowed} == {pb.DENIAL_REASON_PURCHASE_REQUIRED}

        assert serve.terminate(timeout=WAIT_SECONDS) == 0, serve.stderr
        # Stopped by their own drain, not killed by the supervisor once grace and margin ran out.
        assert "killing them" not in serve.stderr, serve.stderr
        assert not any(alive(pid) for pid in workers)
        calls = {int(k): int(n) for k, _, n in STOPPED.findall(serve.stderr)}
        assert set(calls) == {0, 1}, serve.stderr
        assert all(n > 0 for n in calls.values()), f"one worker took every connection: {calls}"
    finally:
        serve.kill()


@pytest.mark.newest_redis_only
def test_a_worker_that_dies_stops_the_group_with_status_1(
        tmpdir_short: str, redis_server: RedisServerProcess, key_prefix: str) -> None:
    port = free_port()
    serve = start_workers(tmpdir_short, port, ["--redis-url", redis_server.url, "--key-prefix", key_prefix])
    try:
        workers = sorted(children(serve.proc.pid))
        os.kill(workers[0], signal.SIGKILL)
        assert serve.wait_exit(WAIT_SECONDS) == 1
        assert "exited unexpectedly" in serve.stderr
        assert not any(alive(pid) for pid in workers)
    finally:
        serve.kill()


def test_embedded_redis_is_started_once_and_stopped_with_the_group(tmpdir_short: str) -> None:
    port = free_port()
    serve = start_workers(tmpdir_short, port, ["--data-dir", os.path.join(tmpdir_short, "data")])
    try:
        group = children(serve.proc.pid)
        names = {pid: open(f"/proc/{pid}/comm").read().strip() for pid in group}
        assert sorted(names.values()).count("redis-server") == 1, names
        assert reserve_on_fresh_channel(port, "one").allowed
        assert serve.terminate(timeout=WAIT_SECONDS) == 0, serve.stderr
        assert not any(alive(pid) for pid in group)
    finally:
        serve.kill()


@pytest.mark.parametrize("listen, problem", [
    ("unix:/tmp/qs-w.sock", "unix socket cannot be shared"),
    ("127.0.0.1:0", "fixed port"),
])
def test_workers_need_shareable_listen_addresses(listen: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        Settings(listen=(listen,), workers=2)
    result = subprocess.run([sys.executable, "-m", "quota_sidecar", "serve", "--workers", "2", "--listen", listen],
                            capture_output=True, text=True, timeout=30, env=_clean_env(), check=False)
    assert result.returncode == 2
    assert problem in result.stderr
