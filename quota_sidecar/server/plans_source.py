"""Where the served plans come from, and how they change without a restart.

``PlansSource`` loads the plans file at start-up and reloads it on demand
(SIGHUP) or when a poll sees the file change. A reload that validates is
handed to ``on_change`` (the engine's ``set_plans``); one that does not is
refused: the last good plans stay in use and the error is logged, kept and
exported as a metric.

Change detection is polling, not inotify: a Kubernetes ConfigMap volume
replaces its files by swapping the ``..data`` symlink to a new timestamped
folder, which inotify on the file itself never reports, and polling works the
same on every filesystem. A poll compares the file's identity (``os.stat``
following symlinks: device, inode, mtime, size; plus the resolved path, which
is what a ``..data`` swap changes) and a SHA-256 of its bytes (mtime
granularity can hide a same-size rewrite). A reload whose bytes equal the
plans in use is "unchanged" and changes nothing.

Disk reads and YAML validation run in a worker thread so the event loop keeps
answering calls while a file is read; reloads are serialized by a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable, Literal

from quota_sidecar.domain.errors import PlansError
from quota_sidecar.domain.plans import Plans
from quota_sidecar.server.metrics import Metrics, ReloadOutcome
from quota_sidecar.server.plans_file import load_plans

log = logging.getLogger("quota_sidecar.domain.plans")

#: ok/unchanged/error as counted in quota_plans_reloads_total; no_file: nothing to reload (packaged plans).
ReloadStatus = Literal["ok", "unchanged", "error", "no_file"]

# A file rewritten in place while being validated is read again, this many times at most.
_CONSISTENT_READ_ATTEMPTS = 3


@dataclass(frozen=True)
class FileIdentity:
    """What a poll compares: where the path leads and which file version is there."""

    realpath: str
    device: int = 0
    inode: int = 0
    mtime_ns: int = 0
    size_bytes: int = 0
    problem: str = ""  # why stat failed (missing file, permissions); "" when it did not


@dataclass(frozen=True)
class ReloadResult:
    status: ReloadStatus
    reason: str  # what asked for the reload: "SIGHUP", "file changed", ...
    version: str  # the plans version in use after the reload
    previous_version: str
    error: str | None = None  # PlansError message when refused


def file_identity(path: str) -> FileIdentity:
    realpath = os.path.realpath(path)
    try:
        st = os.stat(path)  # follows symlinks: the ConfigMap's plans.yaml -> ..data/plans.yaml
    except OSError as exc:
        return FileIdentity(realpath, problem=exc.strerror or str(exc))
    return FileIdentity(realpath, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def file_digest(path: str) -> str:
    """SHA-256 of the file's bytes (hex); PlansError when unreadable, as load_plans would say."""
    try:
        with open(path, "rb") as handle:
            return hashlib.sha256(handle.read()).hexdigest()
    except OSError as exc:
        raise PlansError("<file>", f"cannot read: {exc.strerror or exc}", source=path) from exc


def _observe(path: str) -> tuple[FileIdentity, str]:
    """Identity first, then content: a change after this look differs from it at the next one."""
    identity = file_identity(path)
    try:
        return identity, file_digest(path)
    except PlansError:
        return identity, ""


def _load_if_changed(path: str, digest_in_use: str) -> tuple[str, Plans | None]:
    """(digest, plans) of the file; plans is None when the bytes are those of the plans in use.

    The bytes are hashed before and after validation, so the digest kept is the
    one of the content validated even if a writer rewrites the file meanwhile.
    """
    for _ in range(_CONSISTENT_READ_ATTEMPTS):
        before = file_digest(path)
        if before == digest_in_use:
            return before, None
        plans = load_plans(path)
        if file_digest(path) == before:
            return before, plans
    raise PlansError("<file>", f"changed while being read, {_CONSISTENT_READ_ATTEMPTS} times in a row; "
                     "write it atomically (a temporary file renamed onto it)", source=path)


class PlansSource:
    """The plans file of a sidecar: initial load, reloads, and the watcher that triggers them.

    ``path`` None means the packaged default plans: nothing to watch, and a
    reload only logs that there is no plans file.
    """

    def __init__(self, path: str | None, on_change: Callable[[Plans], None], *,
                 metrics: Metrics | None = None, wall_clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._on_change = on_change
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._lock = asyncio.Lock()
        self._plans: Plans | None = None
        self._digest_in_use = ""
        self._seen: tuple[FileIdentity, str] | None = None  # the watcher's last look
        self.last_reload_at_seconds: float | None = None
        self.last_error: str | None = None
        self.reloads_ok = 0
        self.reloads_unchanged = 0
        self.reloads_failed = 0

    @property
    def plans(self) -> Plans:
        if self._plans is None:
            raise RuntimeError("load_initial() first")
        return self._plans

    @property
    def version(self) -> str:
        return self.plans.version

    def load_initial(self) -> Plans:
        """Loads the plans at start-up; PlansError (naming the field) when the file is invalid."""
        if self.path is None:
            plans = load_plans(None)
        else:
            self._seen = _observe(self.path)
            self._digest_in_use, loaded = _load_if_changed(self.path, "")
            assert loaded is not None  # no digest is in use yet, so the file is always parsed
            plans = loaded
        self._plans = plans
        self.last_reload_at_seconds = self._wall_clock()
        if self._metrics is not None:
            self._metrics.plans_loaded(plans.version, self.last_reload_at_seconds)
        return plans

    async def reload(self, reason: str) -> ReloadResult:
        """Re-reads the file; valid and different → on_change(new); invalid → refused, last good kept."""
        current = self.plans
        if self.path is None:
            log.info("plans reload (%s): no plans file (--plans); the packaged plans %s stay", reason, current.version)
            return ReloadResult("no_file", reason, current.version, current.version)
        async with self._lock:
            current = self.plans
            try:
                digest, new = await asyncio.to_thread(_load_if_changed, self.path, self._digest_in_use)
            except PlansError as exc:
                return self._refused(reason, current, exc.message)
            if new is None:
                return self._finished("unchanged", reason, current.version, current.version)
            if new.version == current.version:
                # Reservations are priced and committed by version: other content under the same
                # version would silently re-price them.
                return self._refused(reason, current, f"the content changed but `version:` is still "
                                                      f"{new.version}; give every change a new version")
            try:
                self._on_change(new)
            except Exception as exc:  # noqa: BLE001 - a failed switch must not kill the watcher
                log.exception("plans reload (%s): applying plans %s failed", reason, new.version)
                return self._refused(reason, current, f"applying the new plans failed: {exc!r}")
            self._plans, self._digest_in_use = new, digest
            self._log_applied(reason, current, new)
            return self._finished("ok", reason, new.version, current.version)

    def _log_applied(self, reason: str, old: Plans, new: Plans) -> None:
        log.info("plans reloaded (%s) from %s: version %s -> %s", reason, self.path, old.version, new.version)

    def _refused(self, reason: str, current: Plans, message: str) -> ReloadResult:
        log.warning("plans reload (%s) refused, still serving plans %s: %s", reason, current.version, message)
        return self._finished("error", reason, current.version, current.version, message)

    def _finished(self, status: ReloadOutcome, reason: str, version: str, previous_version: str,
                  error: str | None = None) -> ReloadResult:
        self.last_reload_at_seconds = self._wall_clock()
        self.last_error = error
        if status == "ok":
            self.reloads_ok += 1
        elif status == "unchanged":
            self.reloads_unchanged += 1
        else:
            self.reloads_failed += 1
        if self._metrics is not None:
            if status == "ok":
                self._metrics.plans_loaded(version, self.last_reload_at_seconds)
            self._metrics.plans_reloaded(status, self.last_reload_at_seconds)
        return ReloadResult(status, reason, version, previous_version, error)

    async def poll(self) -> ReloadResult | None:
        """One watcher step: reloads when the file's identity or bytes differ from the last look."""
        if self.path is None:
            return None
        seen = await asyncio.to_thread(_observe, self.path)
        if seen == self._seen:
            return None
        # Remembered even when the reload fails: a bad file is reported once, not at every poll.
        self._seen = seen
        return await self.reload("file changed")

    async def watch(self, interval_seconds: float, stop: asyncio.Event) -> None:
        """Polls every ``interval_seconds`` until ``stop`` is set; returns at once without a file or interval."""
        if self.path is None or interval_seconds <= 0:
            return
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval_seconds)
                return
            try:
                await self.poll()
            except Exception:  # noqa: BLE001 - keep watching; the next poll may succeed
                log.exception("plans watcher: a poll failed; next one in %s s", interval_seconds)
