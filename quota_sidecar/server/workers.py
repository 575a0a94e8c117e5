"""``serve --workers N``: N server processes sharing the listen ports.

The parent (the supervisor) serves nothing itself. It starts the embedded
Redis when there is no --redis-url, and the embedded books when there is no
--books-url either (once, so every worker shares them), then
starts N children, each ``python -m quota_sidecar serve`` with its settings in
the WORKER_ENV variable, and then only relays signals and watches:

- Every worker binds the --listen TCP addresses with SO_REUSEPORT (the kernel
  spreads new connections over them) and has its own Redis connections,
  engine and plans reloader (each reloads the plans file itself; SIGHUP is
  forwarded to all).
- Worker 0 alone serves --admin-listen, --metrics-listen and --health-listen
  (so those need no shared port; metrics describe worker 0 only, its health
  reflects the shared Redis) and runs the sweeper and the books shipper
  (both run under a Redis lease anyway). Each worker K > 0 has its own degraded journal,
  ``<--degraded-journal>.w<K>``: a journal is one process's file.
- SIGTERM/SIGINT are forwarded to every worker; each stops gracefully within
  --shutdown-grace-seconds. The parent waits for them all (then kills what
  is left after a margin) and exits 0 when every worker exited 0.
- A worker that dies unexpectedly stops the whole group: the parent stops
  the others and exits 1. There is no restart loop; the process manager
  (systemd, Kubernetes) restarts the sidecar.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, fields
from typing import Any

from quota_sidecar.server.settings import Settings

log = logging.getLogger("quota_sidecar.server.workers")

# Set in a worker's environment by the supervisor: {"index": K, "settings": {...}}. Not a user setting.
WORKER_ENV = "QUOTA_SIDECAR_WORKER"
# Beyond the grace period, what a worker gets to close its Redis connections and exit.
STOP_MARGIN_SECONDS = 5.0
# How long the supervisor sleeps in sigtimedwait between looks at its children; a child's exit
# (SIGCHLD) or a signal wakes it at once, so this only bounds a missed wake-up.
WATCH_SECONDS = 1.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_PR_SET_PDEATHSIG = 1


def worker_settings(settings: Settings, index: int, redis_url: str, books_url: str = "") -> Settings:
    """What worker ``index`` runs with (see the module docstring for who does what)."""
    changes: dict[str, Any] = {"workers": 1, "redis_url": redis_url, "books_url": books_url or settings.books_url}
    if index > 0:
        changes.update(admin_listen=(), metrics_listen="", health_listen="", sweep_interval_seconds=0, ship_books=False,
                       degraded_journal=f"{settings.degraded_journal}.w{index}")
    return settings.with_(**changes)


def encode_worker(index: int, settings: Settings) -> str:
    return json.dumps({"index": index, "settings": asdict(settings)})


def decode_worker(raw: str) -> tuple[int, Settings]:
    data = json.loads(raw)
    tuples = {f.name for f in fields(Settings) if isinstance(f.default, tuple)}
    values: dict[str, Any] = {k: tuple(v) if k in tuples else v for k, v in data["settings"].items()}
    return int(data["index"]), Settings(**values)


def _in_child() -> None:
    # The supervisor blocks the signals it waits for; the mask survives exec.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
    # A SIGKILLed supervisor must not leave workers serving on its port (Linux only).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(index: int, settings: Settings) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env[WORKER_ENV] = encode_worker(index, settings)
    return subprocess.Popen([sys.executable, "-m", "quota_sidecar", "serve"], env=env, stdin=subprocess.DEVNULL,
                            preexec_fn=_in_child)


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.children: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.failed = False

    def start(self, redis_url: str, books_url: str = "") -> None:
        for index in range(self.settings.workers):
            self.children.append(_spawn(index, worker_settings(self.settings, index, redis_url, books_url)))
        log.info("started %d workers (pids %s) on %s", len(self.children),
                 ", ".join(str(c.pid) for c in self.children), ", ".join(self.settings.listen))

    def _signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.poll() is None:
                child.send_signal(sig)

    def _stop(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("stopping every worker (%s)", why)
            self._signal_all(signal.SIGTERM)

    def _look(self) -> None:
        """Notices workers that exited while nobody asked them to."""
        for index, child in enumerate(self.children):
            code = child.poll()
            if code is not None and not self.stopping:
                log.error("worker %d (pid %d) exited unexpectedly with status %s; stopping the others",
                          index, child.pid, code)
                self.failed = True
                self._stop("a worker died")

    def watch(self) -> None:
        """Until every worker has exited; signals are taken synchronously (blocked, then sigtimedwait)."""
        deadline = None
        while any(child.poll() is None for child in self.children):
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
            if deadline is not None and time.monotonic() > deadline:
                log.error("workers still running %.1f s after SIGTERM: killing them", STOP_MARGIN_SECONDS)
                self._signal_all(signal.SIGKILL)
                for child in self.children:
                    child.wait()
                self.failed = True
                break
            info = signal.sigtimedwait(_SIGNALS, WATCH_SECONDS)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop(signal.Signals(info.si_signo).name)
            elif info is not None and info.si_signo == signal.SIGHUP:
                self._signal_all(signal.SIGHUP)
            self._look()

    def exit_status(self) -> int:
        if self.failed or any(child.returncode != 0 for child in self.children):
            return 1
        return 0


def supervise(settings: Settings) -> int:
    """Runs ``settings.workers`` workers until SIGTERM/SIGINT or until one dies; the exit status."""
    from quota_sidecar.server.app import start_embedded_books, start_embedded_redis, stop_embedded_books

    supervisor = Supervisor(settings)

    def early_stop(signum: int, frame: Any) -> None:
        supervisor.stopping = True  # no worker started yet: nothing to forward

    # A SIGTERM while the embedded Redis starts must still stop it: noted here, acted on below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, early_stop)
    embedded = None if settings.redis_url else start_embedded_redis(settings)
    embedded_books = None
    # From here signals wait in the queue for watch() (sigtimedwait): no handler runs mid-bookkeeping.
    # Blocked after the embedded Redis started, which must stay stoppable; workers unblock them (_in_child).
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        if supervisor.stopping:
            return 0
        if embedded is not None and not settings.books_url:
            embedded_books = start_embedded_books(settings)
        supervisor.start(settings.redis_url or (embedded.url if embedded else ""),
                         embedded_books.url if embedded_books is not None else "")
        supervisor.watch()
    finally:
        if any(child.poll() is None for child in supervisor.children):
            supervisor._signal_all(signal.SIGKILL)
        if embedded_books is not None:
            stop_embedded_books(settings, embedded_books)
        if embedded is not None:
            embedded.stop()
    status = supervisor.exit_status()
    log.info("all workers stopped (exit status %d)", status)
    return status
