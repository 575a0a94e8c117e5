"""The shipper: copies every bucket's outbox into the books exactly once, then trims what they hold.

Exactly once rests on idempotence, not on luck: the books store an entry once however many times it
is appended (its entry_id is the primary key), and a bucket's outbox is trimmed only up to the last
entry of a batch whose transaction the books committed. So a shipper killed between the books'
COMMIT and the trim ships that batch again, counted as duplicates; two shippers at once ship the
same entries twice to the same effect; and nothing is trimmed that the books do not hold.

The fleet-wide lease (``run``) makes one shipper active and the others stand by, so the work is not
done twice; correctness does not depend on it (``drain``, used by ``books ship --once``, takes no
lease). Decisions never wait for any of this: a stopped shipper is a growing outbox and an alert
(quota_books_lag_seconds), never a refused job.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from quota_sidecar.domain.clock import Clock
from quota_sidecar.domain.errors import QuotaError
from quota_sidecar.domain.model import LedgerEntry, OutboxStats
from quota_sidecar.domain.ports import Books, Outbox

log = logging.getLogger("quota_sidecar.shipper")

LEASE_NAME = "books-shipper"


@dataclass
class ShipCounts:
    """What shipping did, cumulated over batches (and over passes in ``Shipper.totals``)."""

    inserted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    trimmed: int = 0
    batches: int = 0

    def add(self, other: ShipCounts) -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.conflicts += other.conflicts
        self.trimmed += other.trimmed
        self.batches += other.batches


@dataclass(frozen=True)
class ShipperOptions:
    # Entries read from one bucket per round trip; a bucket with more is read again in the same pass.
    per_bucket_entries: int = 1_000
    # Entries appended to the books in one transaction at most (COPY then INSERT ... SELECT).
    batch_entries: int = 10_000
    # Buckets read at once (their XRANGEs share round trips on the multiplexed connection).
    parallel_buckets: int = 64
    # How long an idle shipper waits before looking again, milliseconds.
    idle_interval_ms: int = 200
    # Longest wait after failures (Redis or PostgreSQL away), milliseconds; doubles from idle_interval_ms.
    max_backoff_ms: int = 5_000
    # The lease's lifetime; renewed every pass, so a dead shipper's standby takes over within it.
    lease_ttl_ms: int = 15_000


class Shipper:
    """Copies outbox entries to the books. ``outbox``: RedisStore; ``books``: PgBooks."""

    def __init__(self, outbox: Outbox, books: Books, clock: Clock, *, owner: str,
                 options: ShipperOptions = ShipperOptions(),
                 on_pass: Callable[[ShipCounts, OutboxStats | None, bool], None] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        assert options.per_bucket_entries >= 1 and options.batch_entries >= options.per_bucket_entries
        self.outbox = outbox
        self.books = books
        self.clock = clock
        self.owner = owner
        self.options = options
        self.totals = ShipCounts()
        self._on_pass = on_pass
        self._sleep = sleep
        self._leader = False
        self._migrated = False

    # -- one pass ----------------------------------------------------------

    async def drain(self) -> ShipCounts:
        """Ships until every bucket's outbox is empty (as of its last read). No lease."""
        counts = ShipCounts()
        pending = list(range(self.outbox.buckets))
        while pending:
            pending = await self._ship_round(pending, counts)
        self.totals.add(counts)
        return counts

    async def _ship_round(self, buckets: Sequence[int], counts: ShipCounts) -> list[int]:
        """Reads each bucket once, ships what was read; returns the buckets that had a full page."""
        full: list[int] = []
        step = self.options.parallel_buckets
        groups = [buckets[start:start + step] for start in range(0, len(buckets), step)]
        # The next group is read (and decoded) while this one is in the books' transactions: the groups
        # are other buckets, so no read overlaps a trim of its own bucket.
        reading = asyncio.ensure_future(self._read_group(groups[0])) if groups else None
        try:
            for i in range(len(groups)):
                assert reading is not None
                read = await reading
                reading = asyncio.ensure_future(self._read_group(groups[i + 1])) if i + 1 < len(groups) else None
                full.extend(b for b, page in read if len(page) >= self.options.per_bucket_entries)
                await self._ship_pages(read, counts)
        finally:
            if reading is not None:  # shipping failed: the read ahead is not wanted
                reading.cancel()
                await asyncio.gather(reading, return_exceptions=True)
        return full

    async def _read_group(self, group: Sequence[int]) -> list[tuple[int, list[LedgerEntry]]]:
        """One page of each bucket of ``group``, the empty ones left out."""
        pages = await asyncio.gather(*(self.outbox.read_outbox(b, self.options.per_bucket_entries) for b in group))
        return [(b, page) for b, page in zip(group, pages) if page]

    async def _ship_pages(self, read: Sequence[tuple[int, list[LedgerEntry]]], counts: ShipCounts) -> None:
        """Appends the pages in transactions of at most batch_entries, each followed by the trims
        of the buckets it holds (never before: a trim is safe only once the books committed)."""
        batch: list[tuple[int, list[LedgerEntry]]] = []
        size = 0
        for bucket, page in read:
            if batch and size + len(page) > self.options.batch_entries:
                await self._ship_batch(batch, counts)
                batch, size = [], 0
            batch.append((bucket, page))
            size += len(page)
        if batch:
            await self._ship_batch(batch, counts)

    async def _ship_batch(self, batch: Sequence[tuple[int, list[LedgerEntry]]], counts: ShipCounts) -> None:
        entries = [e for _, page in batch for e in page]
        result = await self.books.append(entries)
        counts.inserted += result.inserted
        counts.duplicates += result.duplicates
        counts.conflicts += result.conflicts
        counts.batches += 1
        if result.conflicts:
            log.error("books: %d outbox entries reuse an account sequence number the books already hold under "
                      "another entry id (Redis lost acknowledged writes?); kept in quota_ledger_conflicts for "
                      "the audit", result.conflicts)
        trimmed = await asyncio.gather(*(self.outbox.trim_outbox(b, page[-1].entry_id) for b, page in batch))
        counts.trimmed += sum(trimmed)

    # -- the daemon --------------------------------------------------------

    async def _hold_lease(self) -> bool:
        ttl_ms = self.options.lease_ttl_ms
        if self._leader:
            self._leader = await self.outbox.renew_lock(LEASE_NAME, self.owner, ttl_ms)
            if not self._leader:
                log.warning("books shipper: lost the lease; another shipper ships now")
        else:
            # Free, or still ours after a failed pass (run() forgets it then: SET NX alone would wait out
            # our own lease, lease_ttl_ms, before shipping again).
            self._leader = (await self.outbox.try_lock(LEASE_NAME, self.owner, ttl_ms)
                            or await self.outbox.renew_lock(LEASE_NAME, self.owner, ttl_ms))
            if self._leader:
                log.info("books shipper: holds the lease, shipping")
        return self._leader

    async def run_once(self) -> ShipCounts | None:
        """One pass of the daemon: the lease, then a drain; None when another shipper holds the lease.
        The active shipper first applies the books' pending migrations (once it has succeeded), so a
        shipper that started while PostgreSQL was away still creates the schema when it is back."""
        if not await self._hold_lease():
            return None
        if not self._migrated:
            applied = await self.books.migrate()
            if applied:
                log.info("books: applied migration(s) %s", ", ".join(applied))
            self._migrated = True
        return await self.drain()

    async def run(self, stop: asyncio.Event) -> None:
        """Ships until ``stop`` is set. Failures (Redis or PostgreSQL unreachable) are logged and retried
        with a growing pause: the stores reconnect on their next call."""
        backoff_ms = self.options.idle_interval_ms
        try:
            while not stop.is_set():
                counts: ShipCounts | None = None
                failed = False
                try:
                    counts = await self.run_once()
                    backoff_ms = self.options.idle_interval_ms
                except QuotaError as exc:
                    failed = True
                    self._leader = False  # the lease may have lapsed while we could not reach Redis
                    log.warning("books shipper: %s; retrying in %d ms", exc, backoff_ms)
                    backoff_ms = min(backoff_ms * 2, self.options.max_backoff_ms)
                if self._on_pass is not None:
                    # Measured even after a failed pass: with PostgreSQL away the outbox grows and the
                    # lag with it, which is what the alert must see.
                    self._on_pass(counts or ShipCounts(), await self._stats(), failed)
                await _wait(stop, backoff_ms / 1000, self._sleep)
        finally:
            await self._give_up_lease()

    async def _stats(self) -> OutboxStats | None:
        try:
            return await self.outbox.outbox_stats()
        except QuotaError:
            return None  # Redis is away: the gauges keep their last values

    async def _give_up_lease(self) -> None:
        """On a clean stop the lease lapses at once (renewed for 1 ms, only if still ours), so a
        standby or the next pod of a rollout ships without waiting out its lifetime."""
        if self._leader:
            try:
                await self.outbox.renew_lock(LEASE_NAME, self.owner, 1)
            except QuotaError as exc:
                log.warning("books shipper: could not give up the lease (%s); it lapses by itself", exc)
            self._leader = False


async def _wait(stop: asyncio.Event, seconds: float, sleep: Callable[[float], Awaitable[None]]) -> None:
    """Sleeps ``seconds`` or until ``stop`` is set, whichever is first."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(sleep(seconds))]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def lag_seconds(stats: OutboxStats | None, now_ms: int) -> float:
    """Age of the oldest unshipped movement, seconds (0 when the outbox is empty)."""
    if stats is None or stats.oldest_ms is None:
        return 0.0
    return max(0.0, (now_ms - stats.oldest_ms) / 1000)
