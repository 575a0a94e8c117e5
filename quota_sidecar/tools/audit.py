"""`quota-sidecar audit`: the conservation audit (quota_sidecar.domain.audit) over accounts read from Redis
and, when given, the books (PostgreSQL): without them, movements already shipped are not checked.

Exit status: 0 clean, 1 violations, 2 could not run. "Could not run" has a status of its own (as
grep's 2): a cron job must tell "the books are wrong" from "the audit never looked".
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from quota_sidecar.domain.audit import audit_account, audit_all, format_report
from quota_sidecar.domain.errors import QuotaError
from quota_sidecar.domain.ports import Books
from quota_sidecar.storage.store import RedisStore

EXIT_CLEAN = 0
EXIT_VIOLATIONS = 1
EXIT_CANNOT_RUN = 2


async def audit_main(redis_url: str, *, account: str | None, all_accounts: bool, key_prefix: str,
                     key_buckets: int, redis_mode: str = "auto", books: Books | None = None) -> int:
    """Prints the report; 0 when clean, 1 on any violation. Exactly one of account / all_accounts.
    ``books``: the books to check with Redis (the caller opens and closes them). Redis and books
    errors (QuotaError, e.g. StoreUnavailable, BooksUnavailable) propagate: cli_main reports them."""
    if bool(account) == all_accounts:
        raise ValueError("audit takes exactly one of --account ID or --all")
    store = RedisStore.from_url(redis_url, redis_mode=redis_mode, key_prefix=key_prefix, key_buckets=key_buckets)
    try:
        audits = [await audit_account(store, account, books)] if account else await audit_all(store, books)
    finally:
        await store.close()
    print(format_report(audits), file=sys.stdout)
    return EXIT_VIOLATIONS if any(a.violations for a in audits) else EXIT_CLEAN


def _books_url(args: argparse.Namespace) -> str:
    """--books-url, else QUOTA_BOOKS_URL, else the development sidecar's books.url; "" when none."""
    from quota_sidecar.server.data_dir import NoBooksUrl, resolve_books_url
    from quota_sidecar.server.logs import mask_credentials

    try:
        url, source = resolve_books_url(args.books_url, data_dir=args.data_dir)
    except NoBooksUrl:
        return ""
    if source:
        print(f"quota-sidecar audit: using books {mask_credentials(url)} (from {source})", file=sys.stderr)
    return url


async def _audit_with_books(args: argparse.Namespace, redis: Any, books_url: str) -> int:
    books = None
    if books_url:
        from quota_sidecar.books.pg import PgBooks

        books = await PgBooks.connect(books_url)
    try:
        return await audit_main(redis.url, account=args.account, all_accounts=args.all, key_prefix=redis.key_prefix,
                                key_buckets=redis.key_buckets, redis_mode=redis.mode, books=books)
    finally:
        if books is not None:
            await books.close()


def cli_main(args: argparse.Namespace) -> int:
    """The verb: Redis from the flags, QUOTA_* or the development sidecar's redis.url; one line on
    stderr and EXIT_CANNOT_RUN for anything that keeps the audit from looking."""
    from quota_sidecar.server.logs import mask_credentials
    from quota_sidecar.tools.common import redis_options

    def cannot_run(text: str) -> int:
        print(f"quota-sidecar audit: cannot run: {mask_credentials(text)}", file=sys.stderr)
        return EXIT_CANNOT_RUN

    try:
        redis = redis_options(args)
    except (ValueError, QuotaError) as exc:
        return cannot_run(str(exc))
    if redis.source:
        print(f"quota-sidecar audit: using Redis {mask_credentials(redis.url)} (from {redis.source})",
              file=sys.stderr)
    books_url = _books_url(args)
    try:
        status = asyncio.run(_audit_with_books(args, redis, books_url))
        if not books_url:  # said once it ran: an audit that could not run needs no such footnote
            print("quota-sidecar audit: no books (--books-url, QUOTA_BOOKS_URL or a development sidecar's "
                  "books.url): checked Redis and its unshipped outbox only", file=sys.stderr)
        return status
    except QuotaError as exc:  # Redis unreachable or refusing, a malformed URL or mode
        return cannot_run(exc.message)
    except (OSError, ValueError) as exc:
        return cannot_run(str(exc))
