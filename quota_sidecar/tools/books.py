"""quota-sidecar books: the system of record (PostgreSQL) from the command line (docs/books.md).

    quota-sidecar books migrate   [--books-url URL]
    quota-sidecar books ship      [--once] [--books-url URL] [--redis-url URL ...] [--metrics-listen HOST:PORT]
    quota-sidecar books report    --month YYYY-MM [--json] [--books-url URL]
    quota-sidecar books purchases [--account A] [--purchase-id P ...] [--since T] [--until T] [--json]
    quota-sidecar books jobs --account A [--limit N] [--json]

Each finds the books as the other tools find Redis: --books-url, else QUOTA_BOOKS_URL, else the
URL a development ``serve`` keeps in <data dir>/books.url while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from datetime import datetime, timezone
from typing import Any, Callable, Coroutine

from quota_sidecar.domain.errors import InvalidArgument, QuotaError
from quota_sidecar.tools.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, print_json, redis_flags

log = logging.getLogger("quota_sidecar.books")


def add_parser(sub: Any) -> None:
    books = sub.add_parser("books", help="the books (PostgreSQL): migrate, ship the outbox, finance report, purchases",
                           description=(
        "The books are the system of record: every movement of credits and free units, copied exactly once "
        "from the Redis outbox by the shipper (docs/books.md). Exit status: 0 done, 1 the books or Redis could "
        "not be reached, 2 bad usage."))
    verbs = books.add_subparsers(dest="books_verb", required=True)

    p = verbs.add_parser("migrate", help="apply the schema migrations not yet applied (safe to run twice)")
    _books_flag(p)

    p = verbs.add_parser("ship", help="copy the Redis outbox into the books, exactly once", description=(
        "Copy every bucket's outbox into the books exactly once (idempotent on each entry's id, in "
        "transactions), then trim what the books hold. Applies the schema migrations first. Runs until "
        "SIGTERM/SIGINT; one shipper of a fleet ships at a time (a lease in Redis), the others stand by. "
        "Redis or PostgreSQL restarts are retried with a growing pause."))
    p.add_argument("--once", action="store_true",
                   help="drain what the outbox holds now, print what was shipped, and exit 0 (no lease)")
    p.add_argument("--batch-entries", type=int, default=10_000, metavar="N",
                   help="entries stored in one PostgreSQL transaction at most [default: 10000]")
    p.add_argument("--metrics-listen", default=None, metavar="HOST:PORT", help=(
        "Prometheus endpoint (quota_books_lag_seconds, quota_books_outbox_entries, ...) [env "
        "QUOTA_METRICS_LISTEN; default: off]"))
    p.add_argument("--log-level", default=None, metavar="LEVEL", help="[env QUOTA_LOG_LEVEL; default: INFO]")
    _books_flag(p, data_dir=False)
    redis_flags(p, "the Redis the sidecars use")  # its --data-dir also serves --books-url's default

    p = verbs.add_parser("report", help="finance: credits sold, spent, refunded, revoked, expired in a month")
    p.add_argument("--month", required=True, metavar="YYYY-MM", help="calendar month, in UTC")
    p.add_argument("--json", action="store_true", help="print the report as JSON (amounts as integers)")
    _books_flag(p)

    p = verbs.add_parser("purchases", help="the purchases the books hold, to reconcile with the billing system",
                         description=(
        "List the purchases (grants) the books hold, by purchase id, with credits, price and what of them "
        "expired or was revoked. A billing system reconciles by comparing its own list of acknowledged "
        "purchases with this one (docs/books.md). Movements still in the Redis outbox are not listed: run "
        "`books ship --once` first, or compare again later."))
    p.add_argument("--account", default=None, help="one account's purchases")
    p.add_argument("--purchase-id", action="append", default=None, metavar="P",
                   help="only these purchase ids (repeatable); missing ones are reported")
    p.add_argument("--since", default=None, metavar="TIME", help="granted at or after (ISO 8601; UTC if no zone)")
    p.add_argument("--until", default=None, metavar="TIME", help="granted before (ISO 8601; UTC if no zone)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _books_flag(p)
    _jobs_parser(verbs)


def _jobs_parser(verbs: Any) -> None:
    p = verbs.add_parser("jobs", help="one line per job of an account: what it cost and from where",
                         description=(
        "List an account's jobs the books hold (the view quota_jobs), oldest first: state, free units or credits "
        "and the lots they came from, cameo royalties and fees, metered cost written off, refunds (docs/books.md). "
        "Movements still in the Redis outbox are not listed: run `books ship --once` first."))
    p.add_argument("--account", required=True, help="the account")
    p.add_argument("--limit", type=int, default=1000, help="at most this many, the latest (default 1000)")
    p.add_argument("--json", action="store_true", help="print JSON")
    _books_flag(p)


def _books_flag(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    p.add_argument("--books-url", default=None, metavar="URL", help=(
        "PostgreSQL URL of the books [env QUOTA_BOOKS_URL; default: the URL a development `serve` keeps in "
        "<data dir>/books.url while it runs]"))
    if data_dir:
        p.add_argument("--data-dir", default=None, metavar="DIR", help=(
            "data folder of that development serve [env QUOTA_DATA_DIR; default: .quota-sidecar]"))


def cli_main(args: argparse.Namespace) -> int:
    from quota_sidecar.server.data_dir import NoBooksUrl, resolve_books_url
    from quota_sidecar.server.logs import mask_credentials

    def fail(text: str, status: int) -> int:
        print(f"quota-sidecar books {args.books_verb}: {mask_credentials(text)}", file=sys.stderr)
        return status

    try:
        url, source = resolve_books_url(args.books_url, data_dir=args.data_dir)
    except NoBooksUrl as exc:
        return fail(str(exc), EXIT_USAGE)
    if source:
        print(f"quota-sidecar books: using books {mask_credentials(url)} (from {source})", file=sys.stderr)
    verb: Callable[[argparse.Namespace, str], Coroutine[Any, Any, int]] = {
        "migrate": _migrate, "ship": _ship, "report": _report, "purchases": _purchases,
        "jobs": _jobs}[args.books_verb]
    try:
        return asyncio.run(verb(args, url))
    except QuotaError as exc:  # InvalidArgument's message names its field
        return fail(exc.message, EXIT_USAGE if isinstance(exc, InvalidArgument) else EXIT_ERROR)
    except ValueError as exc:
        return fail(str(exc), EXIT_USAGE)


async def _connect(url: str) -> Any:
    from quota_sidecar.books.pg import PgBooks

    return await PgBooks.connect(url)


async def _migrate(args: argparse.Namespace, url: str) -> int:
    books = await _connect(url)
    try:
        applied = await books.migrate()
    finally:
        await books.close()
    print(f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "; schema up to date"))
    return EXIT_OK


async def _report(args: argparse.Namespace, url: str) -> int:
    from quota_sidecar.domain.finance import render_text, to_json

    books = await _connect(url)
    try:
        report = await books.report(args.month)
    finally:
        await books.close()
    if args.json:
        print_json(to_json(report))
    else:
        sys.stdout.write(render_text(report))
    return EXIT_OK


def _time_ms(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{flag} must be an ISO 8601 time such as 2026-12-01 or 2026-12-01T00:00:00Z, "
                         f"not {text!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1000)


async def _purchases(args: argparse.Namespace, url: str) -> int:
    since_ms, until_ms = _time_ms(args.since, "--since"), _time_ms(args.until, "--until")
    books = await _connect(url)
    try:
        rows = await books.purchases(account_id=args.account, purchase_ids=args.purchase_id,
                                     since_ms=since_ms, until_ms=until_ms)
    finally:
        await books.close()
    found = {r.purchase_id for r in rows}
    missing = [p for p in (args.purchase_id or []) if p not in found]
    if args.json:
        print_json({"purchases": [r.to_json() for r in rows], "missing": missing})
    else:
        for r in rows:
            print(r.describe())
        for p in missing:
            print(f"MISSING  {p}: not in the books (not granted, or still in the Redis outbox)")
    return EXIT_ERROR if missing else EXIT_OK


async def _jobs(args: argparse.Namespace, url: str) -> int:
    if args.limit < 1:
        raise InvalidArgument("--limit", "must be at least 1")
    books = await _connect(url)
    try:
        rows = await books.jobs(args.account, limit=args.limit)
    finally:
        await books.close()
    if args.json:
        print_json({"jobs": [r.to_json() for r in rows]})
    else:
        for r in rows:
            print(r.describe())
    return EXIT_OK


# -- the shipper --------------------------------------------------------------------------------


async def _ship(args: argparse.Namespace, url: str) -> int:
    from quota_sidecar.domain.clock import RedisClock
    from quota_sidecar.domain.shipping import Shipper, ShipperOptions
    from quota_sidecar.server.app import record_ship_pass, shipper_owner
    from quota_sidecar.server.logs import configure as configure_logging
    from quota_sidecar.server.metrics import Metrics, MetricsHTTPServer
    from quota_sidecar.storage.store import RedisStore
    from quota_sidecar.tools.common import redis_options

    configure_logging(args.log_level or os.environ.get("QUOTA_LOG_LEVEL") or "INFO",
                      os.environ.get("QUOTA_LOG_FORMAT") or "text")
    if args.batch_entries < 1:
        raise ValueError("--batch-entries must be at least 1")
    redis = redis_options(args)
    store = RedisStore.from_url(redis.url, redis_mode=redis.mode, key_prefix=redis.key_prefix,
                                key_buckets=redis.key_buckets)
    books = await _connect(url)
    metrics = Metrics()
    clock = RedisClock()
    options = ShipperOptions(batch_entries=args.batch_entries,
                             per_bucket_entries=min(ShipperOptions.per_bucket_entries, args.batch_entries))
    shipper = Shipper(store, books, clock, owner=shipper_owner(), options=options,
                      on_pass=record_ship_pass(metrics, clock))
    metrics_listen = args.metrics_listen or os.environ.get("QUOTA_METRICS_LISTEN", "")
    http = MetricsHTTPServer(metrics, metrics_listen) if metrics_listen and not args.once else None
    try:
        applied = await books.migrate()
        if applied:
            log.info("books: applied migration(s) %s", ", ".join(applied))
        if args.once:
            counts = await shipper.drain()
            print(f"shipped {counts.inserted} new entr(y/ies), {counts.duplicates} already in the books, "
                  f"{counts.conflicts} conflict(s), {counts.trimmed} trimmed from the outbox in "
                  f"{counts.batches} transaction(s)")
            return EXIT_OK
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        log.info("books shipper %s running (Redis prefix %s, %d buckets)", shipper.owner, redis.key_prefix,
                 redis.key_buckets)
        await shipper.run(stop)
        log.info("books shipper stopped after %d new entr(y/ies)", shipper.totals.inserted)
        return EXIT_OK
    finally:
        if http is not None:
            await http.aclose()
        await books.close()
        await store.close()
