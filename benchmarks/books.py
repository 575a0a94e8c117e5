"""The books' benchmarks (issue 16): shipper throughput into PostgreSQL, and Redis memory per account
over 30 simulated days with the shipper running.

    .venv/bin/python benchmarks/books.py                     # ~1.5 minutes on 2 cores
    .venv/bin/python benchmarks/books.py --quick             # smoke run, ~10 s
    .venv/bin/python benchmarks/books.py --entries 200000 --accounts 100 --days 30 --json FILE

What it starts (127.0.0.1, temp dirs, all stopped at the end): a redis-server as the sidecar's
embedded one runs (AOF on, appendfsync everysec) and a PostgreSQL (quota_sidecar.books.postgres_server,
fsync ON, as production would run it).

A  Shipper throughput. The outbox is filled with ``--entries`` entries copied from real ones (an
   engine run writes the templates: grants, holds, commits, releases, expiries), spread over
   accounts and buckets with each account's own sequence numbers, then ``Shipper.drain()`` (the
   code ``books ship`` runs) copies them into the books and trims the outbox. Reported: entries/s
   over the whole drain (Redis reads, PostgreSQL transactions, trims; target: >= 20,000 entries/s),
   the share of the drain spent in ``books.append`` (staging rows, COPY, INSERT, COMMIT; the
   shipper reads and decodes the next buckets meanwhile, so the shares overlap), and the CPU per
   entry of this process (the shipper), of its PostgreSQL backend and of Redis.
B  Redis memory per account. ``--accounts`` accounts each run 20 jobs a day (reserve then commit)
   for ``--days`` days on a ManualClock; every simulated day ends with a sweeper pass and a
   shipper drain. MEMORY USAGE of every key of every account, plus the accounts' share of the
   bucket outboxes, at the end of day 1 and of the last day, by key kind. The outbox (what
   replaced the 400-day ledger stream) must not grow with days.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import psycopg
import redis.asyncio as aioredis

from quota_sidecar.books.pg import PgBooks
from quota_sidecar.books.postgres_server import PostgresServerProcess
from quota_sidecar.domain.clock import ManualClock, RedisClock
from quota_sidecar.domain.engine import QuotaEngine
from quota_sidecar.domain.model import AppendResult, JobParams, LedgerEntry
from quota_sidecar.domain.shipping import Shipper
from quota_sidecar.server.plans_file import load_plans
from quota_sidecar.storage.keys import DEFAULT_KEY_BUCKETS, bucket_tag, key_bucket
from quota_sidecar.storage.redis_server import RedisServerProcess, find_redis_server
from quota_sidecar.storage.store import RedisStore

T0_MS = 1_795_003_200_000  # 2026-11-18 12:00 UTC
DAY_MS = 86_400_000
JOB = JobParams(duration_seconds=10, resolution="720p")
PREFIX = "bench"


class TimedBooks:
    """The real books, timing their appends (the books' share of a drain)."""

    def __init__(self, books: PgBooks) -> None:
        self.books = books
        self.seconds = 0.0

    async def append(self, entries: Sequence[LedgerEntry]) -> AppendResult:
        start = time.perf_counter()
        try:
            return await self.books.append(entries)
        finally:
            self.seconds += time.perf_counter() - start


async def templates(store: RedisStore, client: aioredis.Redis) -> list[dict[str, str]]:
    """Real outbox entries of every kind, from a short engine run (then the outbox is emptied)."""
    clock = ManualClock(T0_MS)
    engine = QuotaEngine(load_plans(), store, clock)
    for a in range(8):
        account = f"tpl-{a}"
        await engine.grant(account, 40, f"tpl-grant-{a}")
        for j in range(40):  # past the free allowance, so credit holds come too
            rid = f"tpl-{a}-{j}"
            d = await engine.check_and_reserve(account, "sora", rid, JOB, ttl_seconds=60)
            if d.outcome.allowed and j % 4 == 0:
                await engine.release(account, rid)
            elif d.outcome.allowed and j % 4 != 3:
                await engine.commit(account, rid)
        clock.advance(seconds=120)
        await engine.sweep()  # the j % 4 == 3 holds expire
    rows: list[dict[str, str]] = []
    for bucket in range(DEFAULT_KEY_BUCKETS):
        key = f"{bucket_tag(PREFIX, bucket)}:outbox"
        for _, fields in await client.xrange(key):
            rows.append({k.decode(): v.decode() for k, v in fields.items()})
        await client.delete(key)
    return rows


async def fill_outbox(client: aioredis.Redis, rows: list[dict[str, str]], entries: int,
                      per_account: int) -> None:
    """``entries`` copies of the template rows, ``per_account`` per synthetic account, seq 1, 2, ..."""
    pipe = client.pipeline(transaction=False)
    for i in range(entries):
        account, seq = f"fill-{i // per_account}", i % per_account + 1
        fields = dict(rows[i % len(rows)], a=account, q=str(seq))
        bucket = key_bucket(account, DEFAULT_KEY_BUCKETS)
        pipe.xadd(f"{bucket_tag(PREFIX, bucket)}:outbox", fields)
        if len(pipe) >= 5_000:
            await pipe.execute()
    await pipe.execute()


async def _backend_pid(conn: Any) -> int:
    row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
    return int(row[0])


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (its PostgreSQL backend), from /proc (Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _redis_cpu_seconds(client: aioredis.Redis) -> float:
    cpu = await client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def throughput(store: RedisStore, client: aioredis.Redis, books_url: str, entries: int,
                     runs: int) -> dict[str, Any]:
    rows = await templates(store, client)
    kinds = sorted({r["k"] for r in rows})
    results = []
    for run in range(runs):
        books = await PgBooks.connect(books_url)
        async with await psycopg.AsyncConnection.connect(books_url, autocommit=True) as conn:
            await books.migrate()
            await conn.execute("TRUNCATE quota_ledger_entries, quota_ledger_conflicts")
        await fill_outbox(client, rows, entries, per_account=500)
        timed = TimedBooks(books)
        shipper = Shipper(store, timed, RedisClock(), owner="bench")  # type: ignore[arg-type]
        backend = await books._run("pid", _backend_pid)
        cpu_before = (time.process_time(), _process_cpu_seconds(backend), await _redis_cpu_seconds(client))
        start = time.perf_counter()
        counts = await shipper.drain()
        seconds = time.perf_counter() - start
        cpu_after = (time.process_time(), _process_cpu_seconds(backend), await _redis_cpu_seconds(client))
        await books.close()
        assert counts.inserted == entries and counts.trimmed == entries, counts
        cpu_us = {name: (after - before) / entries * 1e6
                  for name, before, after in zip(("shipper", "postgres_backend", "redis"), cpu_before, cpu_after)}
        results.append({"entries": entries, "seconds": seconds, "entries_per_second": entries / seconds,
                        "books_append_seconds": timed.seconds, "transactions": counts.batches,
                        "cpu_us_per_entry": cpu_us})
        print(f"A  run {run + 1}: {entries:,} entries in {seconds:.2f} s = {entries / seconds:,.0f} entries/s "
              f"({timed.seconds / seconds:.0%} of it in books.append, {counts.batches} transactions); CPU per entry: "
              + ", ".join(f"{name} {us:.1f} us" for name, us in cpu_us.items()), flush=True)
    best = statistics.median(r["entries_per_second"] for r in results)
    cpu = {name: statistics.median(r["cpu_us_per_entry"][name] for r in results)
           for name in ("shipper", "postgres_backend", "redis")}
    return {"runs": results, "median_entries_per_second": best, "median_cpu_us_per_entry": cpu, "template_kinds": kinds,
            "template_entry_fields_bytes": statistics.mean(sum(len(k) + len(v) for k, v in r.items()) for r in rows)}


async def account_memory(client: aioredis.Redis, accounts: list[str]) -> dict[str, float]:
    """Average bytes per account by key kind (MEMORY USAGE ... SAMPLES 0: exact), the bucket-shared
    keys (outbox, events) shared out over the accounts; ``records``: resolved reservations kept."""
    by_kind: dict[str, int] = defaultdict(int)
    records = 0
    wanted = set(accounts)
    async for raw in client.scan_iter(match=f"{PREFIX}:*", count=1000):
        key = raw.decode()
        parts = key.split(":")
        if parts[-1] in ("outbox", "events") or (len(parts) >= 4 and parts[-2] in wanted):
            by_kind[parts[-1]] += int(await client.memory_usage(key, samples=0) or 0)
            if parts[-1] == "res":
                records += int(await client.hlen(key))
    out = {kind: total / len(accounts) for kind, total in sorted(by_kind.items())}
    out["total"] = sum(by_kind.values()) / len(accounts)
    out["records"] = records / len(accounts)
    return out


async def outbox_bytes(client: aioredis.Redis, n_accounts: int) -> float:
    """The bucket outboxes' bytes per account (before a drain: a day of unshipped movements)."""
    total = 0
    for bucket in range(DEFAULT_KEY_BUCKETS):
        total += int(await client.memory_usage(f"{bucket_tag(PREFIX, bucket)}:outbox", samples=0) or 0)
    return total / n_accounts


async def memory(store: RedisStore, client: aioredis.Redis, books_url: str, n_accounts: int,
                 days: int) -> dict[str, Any]:
    clock = ManualClock(T0_MS)
    engine = QuotaEngine(load_plans(), store, clock)
    books = await PgBooks.connect(books_url)
    await books.migrate()
    shipper = Shipper(store, books, clock, owner="bench-memory")
    accounts = [f"mem-{i}" for i in range(n_accounts)]
    for account in accounts:
        await engine.grant(account, 1_000, f"mem-grant-{account}")

    async def job(account: str, day: int, j: int) -> bool:
        rid = f"d{day}-{j}"
        if (await engine.check_and_reserve(account, "sora", rid, JOB, ttl_seconds=600)).outcome.allowed:
            await engine.commit(account, rid)
            return True
        return False

    # Day 1, the day the 7-day record retention (RedisStore's default --retention-seconds) starts to
    # prune, the day after, and the last: the records plateau at the retention; the outbox never grows.
    snapshot_days = sorted({d for d in (1, 7, 8, days) if 1 <= d <= days})
    snapshots: dict[int, dict[str, float]] = {}
    committed = 0
    shipped_total = 0
    for day in range(1, days + 1):
        for j in range(20):
            committed += sum(await asyncio.gather(*(job(a, day, j) for a in accounts)))
            clock.advance(ms=30 * 60_000)
        clock.set(T0_MS + day * DAY_MS)
        await engine.sweep()
        unshipped = await outbox_bytes(client, n_accounts) if day in snapshot_days else 0.0
        shipped = await shipper.drain()
        shipped_total += shipped.inserted
        if day in snapshot_days:
            snap = await account_memory(client, accounts)
            snap["outbox_before_drain"] = unshipped
            snapshots[day] = snap
            print(f"B  day {day}: {snap['total']:,.0f} bytes per account in Redis, {snap['records']:.0f} "
                  f"resolved reservations kept ({shipped.inserted:,} entries shipped that day; outbox before the "
                  f"drain {unshipped:,.0f} B/account); by key: "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in snap.items()
                              if k not in ("total", "records", "outbox_before_drain")), flush=True)
    books_entries = len(await books.account_entries(accounts[0]))
    await books.close()
    assert committed == n_accounts * days * 20, f"only {committed} of {n_accounts * days * 20} jobs were committed"
    return {"accounts": n_accounts, "days": days, "jobs_per_day": 20, "jobs_committed": committed,
            "entries_shipped": shipped_total, "books_entries_first_account": books_entries,
            "bytes_per_account": snapshots}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="quota-books-bench-") as tmp:
        redis = RedisServerProcess(find_redis_server(args.redis_server), Path(tmp) / "redis",
                                   appendonly=True, appendfsync="everysec")
        postgres = PostgresServerProcess(Path(tmp) / "pg", fsync=True, grant_traverse=True)
        redis.start()
        postgres.start()
        print(f"Redis {'.'.join(map(str, redis.version))}, {postgres.describe()} (fsync on)", flush=True)
        store = RedisStore.from_url(redis.url, key_prefix=PREFIX, retention_ms=args.retention_seconds * 1000)
        client = aioredis.Redis.from_url(redis.url)
        try:
            results: dict[str, Any] = {}
            if args.only in ("", "A"):
                results["throughput"] = await throughput(store, client, postgres.url, args.entries, args.runs)
                await client.flushall()
            if args.only in ("", "B"):
                results["memory"] = await memory(store, client, postgres.url, args.accounts, args.days)
            return results
        finally:
            await client.aclose()
            await store.close()
            postgres.stop()
            redis.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the books' benchmarks (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20,000 entries, 20 accounts, 3 days")
    p.add_argument("--entries", type=int, default=200_000, help="outbox entries to ship per run [200000]")
    p.add_argument("--runs", type=int, default=3, help="throughput runs; the median is reported [3]")
    p.add_argument("--accounts", type=int, default=100, help="accounts of the memory simulation [100]")
    p.add_argument("--days", type=int, default=30, help="simulated days [30]")
    p.add_argument("--redis-server", default="", metavar="PATH", help="redis-server binary (default: newest)")
    p.add_argument("--retention-seconds", type=int, default=7 * 86_400, metavar="S",
                   help="resolved reservations' retention of the memory simulation (the sidecar's "
                        "--retention-seconds) [604800]")
    p.add_argument("--only", choices=("A", "B"), default="", help="run one part only (default: both)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every figure to FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.entries, args.runs, args.accounts, args.days = 20_000, 1, 20, 3
    results = asyncio.run(main_async(args))
    print("\n| figure | value | target | met |\n|---|---:|---|---|")
    if "throughput" in results:
        a = results["throughput"]["median_entries_per_second"]
        print(f"| A shipper throughput (median of {args.runs}) | {a:,.0f} entries/s | >= 20,000 | "
              f"{'yes' if a >= 20_000 else 'no'} |")
        cpu = results["throughput"]["median_cpu_us_per_entry"]
        print("| A CPU per entry shipped (median): shipper / PostgreSQL backend / Redis | "
              + " / ".join(f"{cpu[k]:.1f}" for k in ("shipper", "postgres_backend", "redis")) + " us | | |")
    if "memory" in results:
        mem = results["memory"]["bytes_per_account"]
        first, last = mem[1], mem[args.days]
        print(f"| B Redis bytes per account, day 1 / day {args.days} | {first['total']:,.0f} / {last['total']:,.0f} "
              f"| | |")
        ob_first, ob_last = first.get("outbox", 0), last.get("outbox", 0)
        print(f"| B outbox bytes per account after the drain, day 1 / day {args.days} | {ob_first:,.0f} / "
              f"{ob_last:,.0f} | no growth | {'yes' if ob_last <= ob_first + 1 else 'no'} |")
        pre_first, pre_last = first["outbox_before_drain"], last["outbox_before_drain"]
        grew = pre_last > pre_first * 1.05 + 1
        print(f"| B outbox bytes per account before the drain (a day unshipped), day 1 / day {args.days} | "
              f"{pre_first:,.0f} / {pre_last:,.0f} | no growth | {'no' if grew else 'yes'} |")
        for day, snap in mem.items():
            by_key = ", ".join(f"{k} {v:,.0f}" for k, v in snap.items() if k != "records")
            print(f"| B day {day} by key (B/account) | {by_key}; records {snap['records']:.0f} | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
