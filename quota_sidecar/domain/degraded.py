"""Degraded mode: deciding without Redis under a product's fail_open_free policy.

While Redis cannot be reached, a sidecar may allow a few free jobs per account
and product per local day (the plans file's degraded_free_per_window) from an
allowance of its own: bounded, never credits, marked degraded. Each such
reservation and its resolution is appended to a local journal (JSON lines,
flushed and fsynced) and written into Redis, with its ledger entries, once
Redis answers again; the journal then shrinks to what is still unwritten. A
sidecar restarted during an outage reloads its journal and replays it too.

Pure bookkeeping: the journal is a port (Journal), a file in the server
(quota_sidecar.server.journal); the engine calls the store to replay.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterable, Protocol

log = logging.getLogger("quota_sidecar.domain.degraded")

MAX_ALLOWANCE_ENTRIES = 100_000  # (account, product, day) counters kept in memory


@dataclass(frozen=True)
class DegradedReservation:
    account_id: str
    reservation_id: str
    product: str
    fingerprint: str
    window_label: str  # the local day (YYYYMMDD) by this sidecar's clock
    allowance: int
    at_ms: int
    ttl_ms: int
    plans_version: str
    state: str = "held"  # held, committed, released
    resolved_ms: int = 0


class Journal(Protocol):
    """Where reservations decided without Redis are kept until Redis has them."""

    def append(self, res: DegradedReservation) -> None:
        """Called for every new or resolved degraded reservation, before the caller is answered;
        durable when it returns (an fsync per call)."""

    def rewrite(self, pending: Iterable[DegradedReservation]) -> None:
        """Called after a replay wrote some into Redis: the journal becomes exactly ``pending``,
        atomically (a crash leaves the old or the new journal, never half of one)."""

    def load(self) -> Iterable[DegradedReservation]:
        """Called once, at start-up: what an earlier run left, in the order it was appended."""


class DegradedMode:
    """The local allowance, the reservations decided without Redis, and their journal."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._lock = threading.Lock()
        self._pending: OrderedDict[tuple[str, str], DegradedReservation] = OrderedDict()
        self._used: OrderedDict[tuple[str, str, str], int] = OrderedDict()
        self._load()

    @property
    def pending(self) -> tuple[DegradedReservation, ...]:
        return tuple(self._pending.values())

    def get(self, account_id: str, reservation_id: str) -> DegradedReservation | None:
        return self._pending.get((account_id, reservation_id))

    def try_reserve(self, res: DegradedReservation) -> bool:
        """Takes one unit of the local allowance; False when it is used up."""
        key = (res.account_id, res.product, res.window_label)
        used = self._used.get(key, 0)
        if used >= res.allowance:
            return False
        self._used[key] = used + 1
        self._used.move_to_end(key)
        while len(self._used) > MAX_ALLOWANCE_ENTRIES:
            self._used.popitem(last=False)
        self._record(res)
        return True

    def resolve(self, res: DegradedReservation, state: str, at_ms: int) -> DegradedReservation:
        done = replace(res, state=state, resolved_ms=at_ms)
        if state == "released":
            key = (res.account_id, res.product, res.window_label)
            self._used[key] = max(0, self._used.get(key, 0) - 1)
        self._record(done)
        return done

    def written(self, items: Iterable[DegradedReservation]) -> None:
        """These are in Redis now: forget them and rewrite the journal without them."""
        with self._lock:
            for res in items:
                current = self._pending.get((res.account_id, res.reservation_id))
                if current == res:  # not resolved again meanwhile
                    del self._pending[(res.account_id, res.reservation_id)]
            self._rewrite()

    def _record(self, res: DegradedReservation) -> None:
        with self._lock:
            self._pending[(res.account_id, res.reservation_id)] = res
            self._journal.append(res)

    def _rewrite(self) -> None:
        self._journal.rewrite(self._pending.values())

    def _load(self) -> None:
        """A journal left by an earlier run: its last line per reservation wins."""
        for res in self._journal.load():
            self._pending[(res.account_id, res.reservation_id)] = res
            self._pending.move_to_end((res.account_id, res.reservation_id))
        if self._pending:
            log.warning("degraded journal holds %d reservation(s) to write to Redis", len(self._pending))
