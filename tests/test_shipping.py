"""The shipper: the Redis outbox into the books (PostgreSQL) exactly once, through faults.

Real redis-server and PostgreSQL processes started by the tests. After every fault the books hold
every movement exactly once (entry ids unique, each account's seq 1..N with no gap), the outbox is
empty, and the audit across both stores is clean.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import psycopg
import pytest
from quota_fixtures import T0_MS

from quota_sidecar.domain.clock import ManualClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.errors import Unavailable
from quota_sidecar.domain.model import AppendResult, JobParams, LedgerEntry
from quota_sidecar.domain.shipping import Shipper, ShipperOptions
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage.redis_server import RedisServerProcess
from quota_sidecar.storage.store import RedisStore
from quota_sidecar.tools.audit import audit_all

pytestmark = pytest.mark.all_redis_versions

ACCOUNTS = [f"ship-{i}" for i in range(12)]
JOB = JobParams(duration_seconds=10, resolution="720p")


async def make_movements(engine: QuotaEngine, rounds: int, tag: str = "r") -> None:
    """Grants, then jobs on credits and on the free allowance: committed, released, abandoned."""
    for account in ACCOUNTS:
        await engine.grant(account, 50, f"{tag}-grant-{account}")
    for i in range(rounds):
        for j, account in enumerate(ACCOUNTS):
            rid = f"{tag}-{i}-{j}"
            d = await engine.check_and_reserve(account, "sora", rid, JOB)
            if not d.outcome.allowed:
                continue
            if (i + j) % 3 == 0:
                await engine.release(account, rid)
            elif (i + j) % 3 == 1:
                await engine.commit(account, rid)


async def books_rows(url: str) -> list[tuple[str, str, int]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT entry_id, account_id, seq FROM quota_ledger ORDER BY account_id, seq")
        return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


async def assert_books_exact(store: RedisStore, url: str, books: Any) -> None:
    await assert_books_exact_for(store, url, books, ACCOUNTS)


async def assert_books_exact_for(store: RedisStore, url: str, books: Any, accounts: Sequence[str]) -> None:
    """Every movement once: no duplicate entry, each account's seq 1..its Redis seq, outbox empty, audit clean."""
    rows = await books_rows(url)
    assert len({r[0] for r in rows}) == len(rows)
    for account in accounts:
        seqs = [r[2] for r in rows if r[1] == account]
        assert seqs == list(range(1, await store.account_seq(account) + 1)), account
    assert (await store.outbox_stats()).entries == 0
    audits = await audit_all(store, books=books)
    assert [a for a in audits if not a.ok] == []
    assert sum(a.entries_checked for a in audits) == len(rows)


def new_shipper(store: RedisStore, books: Any, owner: str = "t", **options: int) -> Shipper:
    return Shipper(store, books, ManualClock(T0_MS), owner=owner, options=ShipperOptions(**options))


async def test_drain_ships_every_movement_once_and_trims_the_outbox(store: RedisStore, engine: QuotaEngine,
                                                                     books: Any, books_url: str) -> None:
    await make_movements(engine, 3)
    before = (await store.outbox_stats()).entries
    assert before > 60
    counts = await new_shipper(store, books, per_bucket_entries=7, batch_entries=20).drain()
    assert (counts.inserted, counts.duplicates, counts.conflicts, counts.trimmed) == (before, 0, 0, before)
    assert counts.batches >= before // 20
    await assert_books_exact(store, books_url, books)
    again = await new_shipper(store, books).drain()
    assert (again.inserted, again.trimmed, again.batches) == (0, 0, 0)


class CrashAfterCommit:
    """The real books, but the shipper 'dies' right after the books committed its Nth batch: the
    window between COMMIT and the outbox trim that idempotence must cover."""

    def __init__(self, books: Any, crash_at_batch: int) -> None:
        self.books = books
        self.crash_at_batch = crash_at_batch
        self.batches = 0

    async def append(self, entries: Sequence[LedgerEntry]) -> AppendResult:
        result = await self.books.append(entries)
        self.batches += 1
        if self.batches == self.crash_at_batch:
            raise Unavailable("shipper killed after the books' COMMIT, before the trim")
        return result


async def test_a_batch_committed_but_not_trimmed_is_shipped_again_without_duplicates(
        store: RedisStore, engine: QuotaEngine, books: Any, books_url: str) -> None:
    await make_movements(engine, 2)
    total = (await store.outbox_stats()).entries
    with pytest.raises(Unavailable):
        await new_shipper(store, CrashAfterCommit(books, 2), per_bucket_entries=5, batch_entries=10).drain()
    stored = len(await books_rows(books_url))
    assert 0 < stored < total
    assert (await store.outbox_stats()).entries > total - stored  # the crashed batch is still in the outbox
    counts = await new_shipper(store, books).drain()
    assert counts.duplicates > 0 and counts.inserted + stored == total
    await assert_books_exact(store, books_url, books)


async def test_two_shippers_at_once_while_decisions_go_on(store: RedisStore, engine: QuotaEngine, books: Any,
                                                          books_url: str) -> None:
    from quota_sidecar.books.pg import PgBooks

    other_books = await PgBooks.connect(books_url)
    try:
        first = new_shipper(store, books, "a", per_bucket_entries=3, batch_entries=9)
        second = new_shipper(store, other_books, "b", per_bucket_entries=4, batch_entries=8)

        async def keep_draining(shipper: Shipper, done: asyncio.Event) -> None:
            while not done.is_set():
                await shipper.drain()
                await asyncio.sleep(0)

        done = asyncio.Event()
        drains = [asyncio.create_task(keep_draining(s, done)) for s in (first, second)]
        await make_movements(engine, 4)
        done.set()
        await asyncio.gather(*drains)
        await first.drain()
        assert first.totals.inserted + second.totals.inserted == len(await books_rows(books_url))
        assert first.totals.conflicts == second.totals.conflicts == 0
        await assert_books_exact(store, books_url, books)
    finally:
        await other_books.close()


async def test_the_lease_makes_one_daemon_ship_and_the_other_stand_by(store: RedisStore, engine: QuotaEngine,
                                                                     books: Any, books_url: str) -> None:
    await make_movements(engine, 1)
    active, standby = new_shipper(store, books, "active"), new_shipper(store, books, "standby")
    assert await active.run_once() is not None
    assert await standby.run_once() is None  # the lease is held: standby ships nothing
    await make_movements(engine, 1, tag="s")
    assert await standby.run_once() is None
    counts = await active.run_once()
    assert counts is not None and counts.inserted > 0
    await assert_books_exact(store, books_url, books)


async def test_the_shipper_rides_through_a_postgresql_restart(store: RedisStore, engine: QuotaEngine,
                                                              postgres_server: Any) -> None:
    from quota_sidecar.books.pg import PgBooks

    books = await PgBooks.connect(postgres_server.url)
    await books.migrate()
    stop = asyncio.Event()
    shipper = new_shipper(store, books, idle_interval_ms=20, max_backoff_ms=100, per_bucket_entries=5,
                          batch_entries=10)
    task = asyncio.create_task(shipper.run(stop))
    try:
        await make_movements(engine, 1)
        postgres_server.stop()
        await make_movements(engine, 2, tag="while-down")  # decisions never wait for the books
        assert (await store.outbox_stats()).entries > 0
        postgres_server.start()
        for _ in range(500):  # bounded: 500 x 20 ms
            if (await store.outbox_stats()).entries == 0:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await task
        await assert_books_exact(store, postgres_server.url, books)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await books.close()


async def test_unshipped_movements_survive_a_redis_restart(tmp_path: Path, redis_binary: str, books: Any,
                                                          books_url: str) -> None:
    redis = RedisServerProcess(redis_binary, tmp_path / "r", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=1.0)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    try:
        await make_movements(engine, 2)
        await new_shipper(store, books, per_bucket_entries=5, batch_entries=5).drain()
        await make_movements(engine, 2, tag="after")
        unshipped = (await store.outbox_stats()).entries
        assert unshipped > 0
        redis.kill()  # SIGKILL: only the AOF (fsync always) brings the outbox back
        redis.start()
        assert (await store.outbox_stats()).entries == unshipped
        await new_shipper(store, books).drain()
        await assert_books_exact(store, books_url, books)
    finally:
        await store.close()
        redis.stop()


@pytest.mark.slow
async def test_a_shipper_process_sigkilled_mid_batch(store: RedisStore, engine: QuotaEngine, books: Any,
                                                     books_url: str, redis_server: RedisServerProcess,
                                                     key_prefix: str) -> None:
    for round_ in range(6):
        await make_movements(engine, 5, tag=f"k{round_}")
    total = (await store.outbox_stats()).entries
    env = {**os.environ, "QUOTA_KEY_PREFIX": key_prefix}
    cmd = [sys.executable, "-m", "quota_sidecar", "books", "ship", "--books-url", books_url,
           "--redis-url", redis_server.url, "--batch-entries", "10"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(1000):  # bounded: until the books have some of it, then kill mid-stream
            if len(await books_rows(books_url)) > 0:
                break
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = len(await books_rows(books_url))
    assert 0 < stored <= total
    once = subprocess.run(cmd + ["--once"], env=env, capture_output=True, text=True, timeout=60)
    assert once.returncode == 0, once.stderr
    assert "shipped" in once.stdout
    await assert_books_exact(store, books_url, books)


async def test_the_daemon_rides_through_a_redis_restart(tmp_path: Path, redis_binary: str, books: Any,
                                                        books_url: str) -> None:
    redis = RedisServerProcess(redis_binary, tmp_path / "r", appendfsync="always")
    redis.start()
    store = RedisStore.from_url(redis.url, timeout_seconds=1.0)
    engine = QuotaEngine(load_plans(), store, ManualClock(T0_MS))
    stop = asyncio.Event()
    failures: list[bool] = []
    shipper = Shipper(store, books, ManualClock(T0_MS), owner="t",
                      options=ShipperOptions(idle_interval_ms=20, max_backoff_ms=100),
                      on_pass=lambda counts, stats, failed: failures.append(failed) if failed else None)
    task = asyncio.create_task(shipper.run(stop))
    try:
        await make_movements(engine, 1)
        redis.kill()
        for _ in range(500):  # bounded: until the daemon has met the dead Redis
            if failures:
                break
            await asyncio.sleep(0.02)
        assert failures, "the shipper never noticed Redis was gone"
        redis.start()
        await make_movements(engine, 1, tag="after")
        for _ in range(500):  # bounded: 500 x 20 ms
            if (await store.outbox_stats()).entries == 0 and shipper.totals.inserted > 0:
                break
            await asyncio.sleep(0.02)
        stop.set()
        await task
        await assert_books_exact(store, books_url, books)
    finally:
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        await store.close()
        redis.stop()


async def test_the_billing_system_reconciles_its_purchases_with_the_books(
        store: RedisStore, engine: QuotaEngine, books: Any, books_url: str) -> None:
    """The billing system's own list against `books purchases`: a purchase whose grant never reached
    Redis shows as missing, and granting it again (idempotent by purchase id) closes the gap without
    granting anything twice."""
    sold = {f"order-{i}": ("rec-1" if i % 2 else "rec-2") for i in range(5)}
    for purchase_id, account in list(sold.items())[:4]:  # order-4's grant was lost on the way
        await engine.grant(account, 10, purchase_id, pack_id="pack_10")
    await new_shipper(store, books).drain()

    found = await books.purchases(purchase_ids=sorted(sold))
    assert sorted(p.purchase_id for p in found) == [f"order-{i}" for i in range(4)]
    assert {(p.credits, p.price_minor_units, p.currency) for p in found} == {(10, 400, "USD")}
    cli = subprocess.run([sys.executable, "-m", "quota_sidecar", "books", "purchases", "--books-url", books_url,
                          *(arg for p in sorted(sold) for arg in ("--purchase-id", p))],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1, cli.stderr  # something is missing: not a clean reconciliation
    assert "MISSING  order-4" in cli.stdout and "MISSING  order-0" not in cli.stdout, cli.stdout

    for purchase_id, account in sold.items():  # re-send everything the billing system sold
        await engine.grant(account, 10, purchase_id, pack_id="pack_10")
    await new_shipper(store, books).drain()
    found = await books.purchases(purchase_ids=sorted(sold))
    assert sorted(p.purchase_id for p in found) == sorted(sold)
    assert (await engine.balance("rec-1")).credit_balance == 20
    assert (await engine.balance("rec-2")).credit_balance == 30
    await assert_books_exact_for(store, books_url, books, ["rec-1", "rec-2"])


async def test_a_reused_sequence_number_is_set_aside_and_the_audit_reports_it(
        store: RedisStore, engine: QuotaEngine, books: Any, books_url: str, redis_client: Any,
        key_prefix: str) -> None:
    """What Redis losing acknowledged writes looks like: a new movement numbered with a seq the books
    already hold. The books keep the first, set the second aside, and the audit says so."""
    from quota_sidecar.domain.audit import audit_account
    from quota_sidecar.storage.keys import DEFAULT_KEY_BUCKETS, key_bucket, outbox_key

    await engine.grant("lost-1", 5, "p-lost-1")
    await new_shipper(store, books).drain()
    stored = await books.account_entries("lost-1")
    assert [e.seq for e in stored] == [1]
    # The same seq again under a new stream id, as a Redis that lost the first entry would write it.
    await redis_client.xadd(outbox_key(key_prefix, key_bucket("lost-1", DEFAULT_KEY_BUCKETS)),
                            {"a": "lost-1", "q": "1", "t": str(T0_MS), "k": "grant", "dg": "7", "pid": "p-other",
                             "credits": "7"})
    counts = await new_shipper(store, books).drain()
    assert (counts.inserted, counts.conflicts) == (0, 1)
    assert [e.entry_id for e in await books.account_entries("lost-1")] == [stored[0].entry_id]
    audit = await audit_account(store, "lost-1", books)
    assert [v.check for v in audit.violations] == ["ledger_conflict"], audit.violations
    assert "seq 1" in audit.violations[0].detail
