"""The data folder of a development ``serve`` (--data-dir, default ./.quota-sidecar): who uses it, and
where its Redis is.

Without --redis-url, ``serve`` starts an embedded redis-server on a free loopback port, a new one at
every start. So that the local tools (``audit``, ``loadtest --audit``, examples/events_consumer.py)
find it without a port copied from a log line, serve writes the URL to ``<data_dir>/redis.url`` once
that Redis answers and removes it when it stops; a tool given no --redis-url and no QUOTA_REDIS_URL
reads it (``resolve_redis_url``).

Two serves on one folder would run two redis-servers on one AOF. Before it starts anything, serve
takes an exclusive flock on ``<data_dir>/serve.lock`` and keeps it until its Redis has stopped
(that is, for the life of the process); a second serve is refused with the first one's pid. The
kernel drops a flock when its holder dies, so a crashed serve never leaves the folder locked.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Mapping

from quota_sidecar.storage.redis_server import RedisServerProcess

DEFAULT_DATA_DIR = ".quota-sidecar"  # Settings.data_dir's default: where the tools look
REDIS_URL_FILE = "redis.url"
BOOKS_URL_FILE = "books.url"  # the embedded development books' PostgreSQL URL, while serve runs
BOOKS_URL_ENV = "QUOTA_BOOKS_URL"
LOCK_FILE = "serve.lock"
REDIS_URL_ENV = "QUOTA_REDIS_URL"
DATA_DIR_ENV = "QUOTA_DATA_DIR"


class DataDirInUse(RuntimeError):
    """Another serve holds the data folder's lock; ``serve`` exits 2 with this message."""


class NoRedisUrl(ValueError):
    """A tool was given no Redis URL and found no development sidecar's redis.url."""


def shown(path: str | os.PathLike[str]) -> str:
    """A folder as the user would type it: ./.quota-sidecar rather than .quota-sidecar."""
    text = os.fspath(path)
    if os.path.isabs(text) or text.startswith(("./", "../")):
        return text
    return "./" + text


class DataDirLock:
    """The exclusive flock on ``<data_dir>/serve.lock``; the file holds the holder's pid (for the message)."""

    def __init__(self, data_dir: str, fd: int) -> None:
        self.data_dir = data_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, data_dir: str) -> DataDirLock:
        """Takes the lock (creating the folder, 0700 like the embedded Redis makes it); DataDirInUse if held."""
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        # os.open's descriptors are not inherited (PEP 446): the lock is this process's alone.
        fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(f"another quota-sidecar serve uses data folder {shown(data_dir)} (pid {pid}); "
                               "stop it or give this one --data-dir and --listen of its own") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        return cls(data_dir, fd)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def write_url(data_dir: str | os.PathLike[str], name: str, url: str) -> None:
    """Writes ``url`` to <data_dir>/<name> (redis.url, books.url) atomically (a reader never sees half a
    URL), owner-only."""
    path = Path(data_dir) / name
    tmp = path.with_name(f".{name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(url + "\n")
    os.replace(tmp, path)


def remove_url(data_dir: str | os.PathLike[str], name: str, url: str) -> None:
    """Removes <data_dir>/<name> if it still names ``url`` (never another process's)."""
    path = Path(data_dir) / name
    try:
        if path.read_text(encoding="utf-8").strip() == url:
            path.unlink()
    except OSError:
        pass  # already gone: nothing to withdraw


def read_url(data_dir: str | os.PathLike[str], name: str) -> str | None:
    try:
        text = (Path(data_dir) / name).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return text or None


def resolve_redis_url(flag: str | None, *, data_dir: str | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(URL, where it came from) for a tool: --redis-url, else $QUOTA_REDIS_URL, else the development
    sidecar's <data_dir>/redis.url (data_dir: the flag, else $QUOTA_DATA_DIR, else ./.quota-sidecar).

    The second item is "" for the flag (the user just typed it), else a text for "using ... (from X)".
    NoRedisUrl, with a one-line message, when there is none.
    """
    environ = os.environ if environ is None else environ
    if flag:
        return flag, ""
    if environ.get(REDIS_URL_ENV):
        return environ[REDIS_URL_ENV], REDIS_URL_ENV
    folder = data_dir or environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    url = read_url(folder, REDIS_URL_FILE)
    if url is None:
        raise NoRedisUrl(f"no Redis URL: give --redis-url or set {REDIS_URL_ENV}, or run this where a "
                         f"development `quota-sidecar serve` (no --redis-url) is running ({shown(folder)}/"
                         f"{REDIS_URL_FILE} not found)")
    return url, f"{shown(folder)}/{REDIS_URL_FILE}, written by the development sidecar"


class NoBooksUrl(ValueError):
    """A tool was given no books URL and found no development sidecar's books.url."""


def resolve_books_url(flag: str | None, *, data_dir: str | None = None,
                      environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """As resolve_redis_url, for the books: --books-url, else $QUOTA_BOOKS_URL, else the development
    sidecar's <data_dir>/books.url. NoBooksUrl when there is none."""
    environ = os.environ if environ is None else environ
    if flag:
        return flag, ""
    if environ.get(BOOKS_URL_ENV):
        return environ[BOOKS_URL_ENV], BOOKS_URL_ENV
    folder = data_dir or environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    url = read_url(folder, BOOKS_URL_FILE)
    if url is None:
        raise NoBooksUrl(f"no books URL: give --books-url or set {BOOKS_URL_ENV}, or run this where a development "
                         f"`quota-sidecar serve` (no --redis-url, no --books-url) is running ({shown(folder)}/"
                         f"{BOOKS_URL_FILE} not found)")
    return url, f"{shown(folder)}/{BOOKS_URL_FILE}, written by the development sidecar"


class EmbeddedRedis(RedisServerProcess):
    """The development redis-server of ``serve``: owns the data folder's lock and publishes its URL in
    <data_dir>/redis.url while it runs. Stopping withdraws the URL first (no tool picks a Redis that is
    going away), then stops Redis (its AOF flushed), then drops the lock."""

    def __init__(self, binary: str, data_dir: str, lock: DataDirLock, **options: Any) -> None:
        super().__init__(binary, data_dir, **options)
        self._lock = lock

    def start(self, timeout_seconds: float = 10.0) -> None:
        super().start(timeout_seconds)
        write_url(self.data_dir, REDIS_URL_FILE, self.url)

    def stop(self, timeout_seconds: float = 10.0) -> None:
        try:
            self._withdraw_url()
            super().stop(timeout_seconds)
        finally:
            self._lock.release()

    def restart(self, timeout_seconds: float = 10.0) -> None:
        # Keeps the lock across the restart: only the process and its published URL go and come back.
        self._withdraw_url()
        super().stop(timeout_seconds)
        self.start(timeout_seconds)

    def _withdraw_url(self) -> None:
        try:
            url = self.url
        except RuntimeError:
            return  # never started: nothing was published
        remove_url(self.data_dir, REDIS_URL_FILE, url)
