"""The books in the chaos run (tests/test_chaos.py): a shipper, PostgreSQL restarts, the final checks.

The shipper (quota_sidecar.domain.shipping.Shipper, ``run(stop)`` in-process, as ``serve`` runs it) reads
the outbox through the same store and fault proxy as the decisions, so every Redis fault and restart
reaches it too, with entries not yet shipped; it ships into a PostgreSQL of the test's own (tests/
pg_fixtures.py ``postgres_server``), which is stopped (fast shutdown) once and SIGKILLed (crash
recovery) once while the clients run, each time aimed at a batch in flight.

PostgreSQL stops and starts again in this very process, beside the gRPC threads the chaos keeps busy
(PgControl): a start that forked there once crashed (SIGSEGV) before postgres ran; it must not.

Each outage lasts until the clients were answered DOWN_ANSWERS decisions and at least one of the
shipper's transactions failed (decisions never wait for the books); then PostgreSQL starts again and the outage is
over once the shipper shipped again. Every wait is bounded polling of what it waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Sequence, cast

import psycopg

from quota_sidecar.books.pg import PgBooks
from quota_sidecar.books.postgres_server import PostgresServerProcess
from quota_sidecar.domain.audit import AccountAudit, audit_all
from quota_sidecar.domain.clock import RedisClock
from quota_sidecar.domain.model import AppendResult, LedgerEntry, OutboxStats
from quota_sidecar.domain.ports import Books
from quota_sidecar.domain.shipping import ShipCounts, Shipper, ShipperOptions
from quota_sidecar.storage.store import RedisStore

# (share of the ops started, how): between and around the two Redis restarts (0.3, 0.65).
PG_OUTAGES = ((0.15, "graceful"), (0.5, "kill"))
DOWN_ANSWERS = 500  # decisions the clients must be answered during each outage
# Small batches: many transactions, so a restart finds one in flight; a short backoff, so the
# shipper is back soon after PostgreSQL; a lease far longer than the run, so a shipper that lost
# its own lease (instead of keeping it through a failed pass) never ships again and fails the run.
SHIPPER_OPTIONS = ShipperOptions(per_bucket_entries=50, batch_entries=200, idle_interval_ms=200,
                                 max_backoff_ms=400, lease_ttl_ms=600_000)
POLL_S = 0.02


class PgControl:
    """Stops, kills and starts the test's PostgreSQL (tests/pg_fixtures.py ``postgres_server``: its
    folder, port and clean-up). Blocking (like PostgresServerProcess): call it off the event loop.

    Straight on the fixture's process, beside this process's busy gRPC threads: PostgresServerProcess
    starts postgres without a fork (vfork + setpriv), which once crashed here when it forked."""

    def __init__(self, server: PostgresServerProcess) -> None:
        self.server = server

    def stop(self) -> None:
        self.server.stop()

    def kill(self) -> None:
        self.server.kill()

    def start(self) -> None:
        self.server.start()

    def close(self) -> None:
        """Nothing to do: the fixture stops PostgreSQL."""


class ObservedBooks:
    """The shipper's PgBooks, counting its appends in flight (a restart aims at one) and those that
    failed (the shipper met the outage)."""

    def __init__(self, books: PgBooks) -> None:
        self.books = books
        self.in_flight = 0
        self.failed = 0

    def __getattr__(self, name: str) -> Any:  # migrate, and whatever else the shipper asks the books
        return getattr(self.books, name)

    async def append(self, entries: Sequence[LedgerEntry]) -> AppendResult:
        self.in_flight += 1
        try:
            return await self.books.append(entries)
        except Exception:
            self.failed += 1
            raise
        finally:
            self.in_flight -= 1


@dataclass
class Outage:
    how: str  # "graceful" (stop(): fast shutdown) or "kill" (SIGKILL to every process: crash recovery)
    during_clients: bool  # down while the clients ran, throughout (a tiny QUOTA_CHAOS_OPS may finish first)
    mid_append: bool = False  # a shipper transaction was in flight when PostgreSQL went down
    answered: int = 0  # decisions answered to the clients while PostgreSQL was down
    failed_appends: int = 0  # the shipper's transactions that failed meanwhile
    outbox_at_start: int = 0  # outbox entries when PostgreSQL came back
    down_s: float = 0.0
    resumed_s: float | None = None  # from PostgreSQL back to the shipper's next entries in the books


@dataclass
class ShipperWatch:
    """What the daemon's passes did (its on_pass callback)."""

    passes: int = 0
    failed: int = 0
    inserted: int = 0
    duplicates: int = 0
    conflicts: int = 0
    last_stats: OutboxStats | None = None

    def on_pass(self, counts: ShipCounts, stats: OutboxStats | None, failed: bool) -> None:
        self.passes += 1
        self.failed += failed
        self.inserted += counts.inserted
        self.duplicates += counts.duplicates
        self.conflicts += counts.conflicts
        self.last_stats = stats or self.last_stats


@dataclass
class BooksChaos:
    server: PostgresServerProcess
    control: PgControl
    books: PgBooks  # the shipper's connection
    observed: ObservedBooks
    shipper: Shipper
    watch: ShipperWatch
    task: asyncio.Task[None]
    stop: asyncio.Event
    outages: list[Outage] = field(default_factory=list)
    final: ShipCounts | None = None  # the final drain

    def report(self) -> str:
        w = self.watch
        lines = [f"  shipper: {w.passes} passes ({w.failed} failed), {w.inserted} entries shipped during the run "
                 f"({w.duplicates} again as duplicates, {w.conflicts} conflicts)"
                 + (f", {self.final.inserted} by the final drain" if self.final else "")]
        for o in self.outages:
            resumed = "never" if o.resumed_s is None else f"{o.resumed_s:.2f} s after"
            lines.append(f"  postgres {o.how}: down {o.down_s:.2f} s{' mid-append' if o.mid_append else ''}"
                         f"{'' if o.during_clients else ' (after the clients)'}, {o.answered} decisions "
                         f"answered, {o.failed_appends} shipper transactions failed, {o.outbox_at_start} entries "
                         f"waiting at restart, shipping again {resumed}")
        return "\n".join(lines)


@contextlib.asynccontextmanager
async def running_shipper(server: PostgresServerProcess, store: RedisStore) -> AsyncIterator[BooksChaos]:
    """The books migrated, and the shipper daemon on ``store`` until the block ends (BooksChaos.stop
    may end it sooner)."""
    books = await PgBooks.connect(server.url)
    control = PgControl(server)
    try:
        await books.migrate()
        watch, observed, stop = ShipperWatch(), ObservedBooks(books), asyncio.Event()
        shipper = Shipper(store, cast(Books, observed), RedisClock(), owner="chaos-shipper", options=SHIPPER_OPTIONS,
                          on_pass=watch.on_pass)
        task = asyncio.create_task(shipper.run(stop))
        try:
            yield BooksChaos(server, control, books, observed, shipper, watch, task, stop)
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        await books.close()
        await asyncio.to_thread(control.close)


async def _until(condition: Callable[[], bool], bound_s: float) -> bool:
    """Polls ``condition`` until it holds (True) or ``bound_s`` passed (False)."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + bound_s
    while not condition():
        if loop.time() > give_up_at:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def one_outage(bc: BooksChaos, how: str, outbox: RedisStore, answered: Callable[[], int],
                     clients_done: asyncio.Event, down_answers: int, bound_s: float) -> Outage:
    loop = asyncio.get_running_loop()
    outage = Outage(how, during_clients=not clients_done.is_set())
    # Aim at a transaction in flight (best effort: a batch takes milliseconds; reported, not required).
    await _until(lambda: bc.observed.in_flight > 0 or clients_done.is_set(), bound_s)
    outage.mid_append = bc.observed.in_flight > 0
    answered_before, failed_before, down_at = answered(), bc.observed.failed, loop.time()
    # PostgresServerProcess blocks (waits for the processes): off the event loop, decisions go on.
    await asyncio.to_thread(bc.control.stop if how == "graceful" else bc.control.kill)
    # Down until the clients were answered enough decisions and the shipper met it. Once the
    # clients are done no decision comes, and an empty outbox gives the shipper nothing to fail on.
    await _until(lambda: clients_done.is_set() or (answered() - answered_before >= down_answers
                                                   and bc.observed.failed > failed_before), bound_s)
    outage.during_clients = outage.during_clients and not clients_done.is_set()  # down with them throughout
    outage.answered = answered() - answered_before
    outage.failed_appends = bc.observed.failed - failed_before
    outage.outbox_at_start = (await outbox.outbox_stats()).entries
    await asyncio.to_thread(bc.control.start)  # same port and folder; after kill(): crash recovery
    back_at = loop.time()
    outage.down_s = back_at - down_at
    shipped_before = bc.watch.inserted
    if outage.outbox_at_start == 0 or await _until(lambda: bc.watch.inserted > shipped_before, bound_s):
        outage.resumed_s = loop.time() - back_at
    return outage


async def pg_chaos(bc: BooksChaos, outbox: RedisStore, *, ops: int, started: Callable[[], int],
                   answered: Callable[[], int], clients_done: asyncio.Event, bound_s: float,
                   chaos: Counter[str]) -> None:
    """The PostgreSQL outages of PG_OUTAGES, each once its share of the ops started (or the clients
    are done: a tiny QUOTA_CHAOS_OPS still gets its restarts, over an idle outbox)."""
    down_answers = min(DOWN_ANSWERS, max(1, ops // 20))
    for share, how in PG_OUTAGES:
        while started() < share * ops and not clients_done.is_set():  # ends: the clients' run is bounded
            await asyncio.sleep(POLL_S)
        bc.outages.append(await one_outage(bc, how, outbox, answered, clients_done, down_answers, bound_s))
        chaos[f"pg_{how}"] += 1


async def books_rows(url: str) -> list[tuple[str, str, int]]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute("SELECT entry_id, account_id, seq FROM quota_ledger ORDER BY account_id, seq")
        return [(str(r[0]), str(r[1]), int(r[2])) for r in await cur.fetchall()]


@dataclass
class BooksEnd:
    rows: int
    audits: list[AccountAudit]
    problems: list[str]


async def drain_and_check(bc: BooksChaos, store: RedisStore) -> BooksEnd:
    """Stops the daemon (it must still be running: a crash is reported), drains the outbox (no
    lease, faults off), then: every movement in the books exactly once, the outbox empty, no
    conflict, and the audit across both stores (returned for the caller's report)."""
    problems: list[str] = []
    if bc.task.done():
        problems.append(f"the shipper daemon ended during the run: {bc.task.exception()!r}")
    bc.stop.set()
    await asyncio.gather(bc.task, return_exceptions=True)
    bc.final = await Shipper(store, bc.books, RedisClock(), owner="chaos-final-drain").drain()
    url = bc.server.url
    rows = await books_rows(url)
    duplicated = [entry_id for entry_id, n in Counter(r[0] for r in rows).items() if n > 1]
    if duplicated:
        problems.append(f"{len(duplicated)} entry id(s) twice in the books, e.g. {duplicated[:5]}")
    accounts = await store.all_accounts()
    seqs: dict[str, list[int]] = {}
    for _, account, seq in rows:
        seqs.setdefault(account, []).append(seq)
    for account in accounts:
        want = list(range(1, await store.account_seq(account) + 1))
        have = seqs.get(account, [])
        if have != want:
            missing = sorted(set(want) - set(have))
            extra = sorted(s for s, n in Counter(have).items() if n > 1 or s > len(want))
            problems.append(f"{account}: books hold {len(have)} entries, Redis' seq is {len(want)}; "
                            f"missing {missing[:10]}, doubled or beyond {extra[:10]}")
    if strangers := sorted(set(seqs) - set(accounts)):
        problems.append(f"books hold accounts Redis does not know: {strangers[:10]}")
    if (left := (await store.outbox_stats()).entries) != 0:
        problems.append(f"{left} entries still in the outbox after the drain")
    conflicts = await bc.books.conflicts()
    if conflicts or bc.watch.conflicts or bc.final.conflicts:
        problems.append(f"conflicts: {len(conflicts)} kept aside in the books, {bc.watch.conflicts} reported by "
                        f"the daemon, {bc.final.conflicts} by the drain")
    audits = await audit_all(store, bc.books)
    if (checked := sum(a.entries_checked for a in audits)) != len(rows):
        problems.append(f"the audit checked {checked} entries, the books hold {len(rows)}")
    if partial := [a.account_id for a in audits if a.ledger_trimmed or not a.books_given]:
        problems.append(f"accounts not audited over the whole ledger: {partial[:10]}")
    return BooksEnd(len(rows), audits, problems)


def outage_problems(outages: Sequence[Outage], ops: int) -> list[str]:
    """Each outage while the clients ran: decisions answered, the shipper failing (it felt the
    outage), entries waiting, then shipped again once PostgreSQL was back."""
    down_answers = min(DOWN_ANSWERS, max(1, ops // 20))
    problems = []
    if sorted(o.how for o in outages) != sorted(how for _, how in PG_OUTAGES):
        problems.append(f"outages {[o.how for o in outages]}, planned {[how for _, how in PG_OUTAGES]}")
    for o in outages:
        if o.during_clients:
            if o.answered < down_answers:
                problems.append(f"postgres {o.how}: only {o.answered} decisions answered while it was down "
                                f"(want {down_answers}): did decisions wait for the books?")
            if o.failed_appends < 1 or o.outbox_at_start < 1:
                problems.append(f"postgres {o.how}: no transaction failed ({o.failed_appends}) or nothing waited "
                                f"({o.outbox_at_start} entries): the outage went unnoticed")
        if o.resumed_s is None:
            problems.append(f"postgres {o.how}: the shipper never shipped again once it was back")
    if ops >= 1000 and not all(o.during_clients for o in outages):
        problems.append("an outage came after the clients were done")
    return problems


def await_chain(task: asyncio.Task[Any]) -> str:
    """Where a task waits, down its whole chain of awaits (Task.print_stack shows only the outer
    coroutine, and raises TypeError on grpc's Cython coroutines, whose frames have no line)."""
    steps, awaited = [], cast(Any, task.get_coro())
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            steps.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
        else:
            steps.append(repr(awaited)[:200])
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    waiter = getattr(task, "_fut_waiter", None)
    return f"task {task.get_name()}:\n    " + "\n    ".join(steps) + f"\n    awaiting {waiter!r:.300}"


@contextlib.asynccontextmanager
async def hang_watchdog(bound_s: float) -> AsyncIterator[None]:
    """Bounds the whole run: past ``bound_s`` every task's chain of awaits goes to stderr (where it
    waits) and the run is cancelled, so a hang fails the test with its evidence instead of stalling
    the suite. The run is cancelled whatever the printing meets."""
    main = asyncio.current_task()
    assert main is not None
    fired = False

    async def bark() -> None:
        nonlocal fired
        await asyncio.sleep(bound_s)
        fired = True
        try:
            print(f"\nchaos run still going after {bound_s:.0f} s; the tasks and where they wait:", file=sys.stderr)
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    try:
                        print(await_chain(task), file=sys.stderr)
                    except Exception as exc:  # noqa: BLE001 - one odd task must not hide the others
                        print(f"task {task!r:.300}: no chain ({exc!r})", file=sys.stderr)
        finally:
            main.cancel()

    dog = asyncio.create_task(bark())
    try:
        yield
    except asyncio.CancelledError:
        if fired:
            raise AssertionError(f"the chaos run hung (over {bound_s:.0f} s); task stacks on stderr") from None
        raise
    finally:
        dog.cancel()

