"""PgBooks: the domain's Books port on PostgreSQL with psycopg 3 (async). The schema is docs/books.md.

One connection, opened on first use and opened again after a failure: the books have one writer (the
shipper) and a few readers (ListLedger, the audit, the finance tools), and a lock keeps one operation
(one transaction) on it at a time. Every operation is idempotent (appends are idempotent on entry_id,
reads read), so one that fails because a connection opened earlier broke (PostgreSQL restarted) is run
once more on a new connection before it fails: the first call after a restart succeeds.

PostgreSQL errors end here: a connection failure, a restart, a deadlock, a serialization failure or a
timeout is BooksUnavailable (retry later); any other (a bug, a schema someone changed) is a QuotaError
with reason BOOKS_ERROR.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Iterable, Mapping, Sequence, TypeVar

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import TupleRow

from quota_sidecar.books.migrate import apply_migrations
from quota_sidecar.domain.errors import BooksUnavailable, ConfigError, QuotaError
from quota_sidecar.domain.finance import (
    Balances,
    CameoRoyalty,
    FinanceReport,
    JobRecord,
    MoneyByCurrency,
    ProductUse,
    PurchaseRecord,
    SoldBySource,
    month_bounds_ms,
)
from quota_sidecar.domain.model import AppendResult, CreditTotals, Deltas, LedgerEntry

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = AsyncConnection[TupleRow]

# Outbox field -> text column. Everything else a field carries goes to details (jsonb, as strings).
_TEXT_FIELDS = {"rid": "reservation_id", "pid": "purchase_id", "product": "product", "funding": "funding",
                "pv": "plans_version", "source": "source", "cur": "currency", "pack": "pack_id", "reason": "reason"}
# Outbox field -> integer column; "" means absent. A value that is not an integer stays in details as
# sent, rather than failing the batch (and with it every later movement) forever.
_INT_FIELDS = {"credits": "credits", "price": "price_minor_units", "expires_ms": "expires_ms"}
_FIELD_OF_INT = {column: field for field, column in _INT_FIELDS.items()}
# The outbox's own keys, already in LedgerEntry's attributes (account_id, seq, at_ms, type, deltas).
_ENTRY_KEYS = frozenset({"a", "q", "t", "k", "dg", "dr", "ds", "dx", "dv", "dh", "df", "dd"})

_STAGING_COLUMNS = ("ord", "entry_id", "account_id", "seq", "at_ms", "kind", "product", "reservation_id",
                    "purchase_id", "funding", "credits", "granted_delta", "refunded_delta", "spent_delta",
                    "expired_delta", "revoked_delta", "held_delta", "free_units_delta", "plans_version",
                    "source", "price_minor_units", "currency", "pack_id", "expires_ms", "reason", "details",
                    "debt_delta")
# ON COMMIT DELETE ROWS and IF NOT EXISTS: created once per session, emptied by every commit, and still
# right behind a transaction-mode pooler that hands this client another session.
_STAGING_DDL = """CREATE TEMP TABLE IF NOT EXISTS quota_staging (
    ord integer, entry_id text, account_id text, seq bigint, at_ms bigint, kind text, product text,
    reservation_id text, purchase_id text, funding text, credits bigint, granted_delta bigint,
    refunded_delta bigint, spent_delta bigint, expired_delta bigint, revoked_delta bigint, held_delta bigint,
    free_units_delta bigint, plans_version text, source text, price_minor_units bigint, currency text,
    pack_id text, expires_ms bigint, reason text, details jsonb, debt_delta bigint
) ON COMMIT DELETE ROWS"""
_LEDGER_COLUMNS = ("entry_id, account_id, seq, occurred_at, kind, product, reservation_id, purchase_id, funding, "
                   "credits, granted_delta, refunded_delta, spent_delta, expired_delta, revoked_delta, held_delta, "
                   "free_units_delta, plans_version, source, price_minor_units, currency, pack_id, expires_at, "
                   "reason, details, debt_delta")
_STAGED_AS_LEDGER = ("s.entry_id, s.account_id, s.seq, timestamptz 'epoch' + s.at_ms * interval '1 millisecond', "
                     "s.kind, s.product, s.reservation_id, s.purchase_id, s.funding, s.credits, s.granted_delta, "
                     "s.refunded_delta, s.spent_delta, s.expired_delta, s.revoked_delta, s.held_delta, "
                     "s.free_units_delta, s.plans_version, s.source, s.price_minor_units, s.currency, s.pack_id, "
                     "timestamptz 'epoch' + s.expires_ms * interval '1 millisecond', s.reason, s.details, "
                     "s.debt_delta")
# Lowest (account, seq) first: two writers lock rows in one order (no deadlock between shippers), and
# of two entries of one batch under one (account, seq) the earlier one in the outbox is the movement.
_INSERT = (f"INSERT INTO quota_ledger_entries ({_LEDGER_COLUMNS}) SELECT {_STAGED_AS_LEDGER} "
           "FROM quota_staging s ORDER BY s.account_id, s.seq, s.ord ON CONFLICT DO NOTHING")
_NOT_IN_LEDGER = "NOT EXISTS (SELECT 1 FROM quota_ledger_entries e WHERE e.entry_id = s.entry_id)"
_COUNT_CONFLICTS = f"SELECT count(*) FROM quota_staging s WHERE {_NOT_IN_LEDGER}"
_KEEP_CONFLICTS = (f"INSERT INTO quota_ledger_conflicts ({_LEDGER_COLUMNS}) SELECT DISTINCT ON (s.entry_id) "
                   f"{_STAGED_AS_LEDGER} FROM quota_staging s WHERE {_NOT_IN_LEDGER} "
                   "ORDER BY s.entry_id, s.ord ON CONFLICT (entry_id) DO NOTHING")

# A row as LedgerEntry wants it: times in ms, then the running totals after it.
_ROW_NAMES = ("entry_id", "account_id", "seq", "at_ms", "kind", "product", "reservation_id", "purchase_id",
              "funding", "credits", "granted_delta", "refunded_delta", "spent_delta", "expired_delta",
              "revoked_delta", "held_delta", "free_units_delta", "plans_version", "source", "price_minor_units",
              "currency", "pack_id", "expires_ms", "reason", "details", "debt_delta")
_MS_OF = {"at_ms": "occurred_at", "expires_ms": "expires_at"}
_ROW_COLUMNS = ", ".join(f"round(extract(epoch FROM {_MS_OF[n]}) * 1000)::bigint AS {n}" if n in _MS_OF else n
                         for n in _ROW_NAMES)
_AT = {name: i for i, name in enumerate(_ROW_NAMES)}  # a row's index of each column
_DELTA_COLUMNS = ("granted_delta", "refunded_delta", "spent_delta", "expired_delta", "revoked_delta", "held_delta",
                  "debt_delta")
_SUMS = ", ".join(f"coalesce(sum({c}), 0)::bigint AS {c}" for c in _DELTA_COLUMNS)
_RUNNING = ", ".join(f"(base.{c} + sum(page.{c}) OVER w)::bigint" for c in _DELTA_COLUMNS)
# One account's entries with seq > after, at most `n` (NULL: all), each with the totals after it: the
# sums of the entries up to `after` plus a running sum over the page. The page is limited before the
# window, so a page costs one aggregate and `n` rows, not a window over the account's whole history.
_PAGE = f"""WITH base AS (
    SELECT {_SUMS} FROM quota_ledger_entries WHERE account_id = %(a)s AND seq <= %(after)s
), page AS (
    SELECT {_ROW_COLUMNS} FROM quota_ledger_entries WHERE account_id = %(a)s AND seq > %(after)s
    ORDER BY seq LIMIT %(n)s
)
SELECT page.*, {_RUNNING} FROM page CROSS JOIN base
WINDOW w AS (ORDER BY page.seq ROWS UNBOUNDED PRECEDING)
ORDER BY page.seq"""
# Text column -> outbox field, for the way back.
_TEXT_COLUMN_FIELDS = tuple((field, _AT[column]) for field, column in _TEXT_FIELDS.items())
_LAST_TOTALS = f"SELECT coalesce(max(seq), 0)::bigint, {_SUMS} FROM quota_ledger_entries WHERE account_id = %s"
_PURCHASES = ("SELECT purchase_id, account_id, credits, source, price_minor_units, currency, pack_id, "
              "round(extract(epoch FROM granted_at) * 1000)::bigint, "
              "round(extract(epoch FROM expires_at) * 1000)::bigint, credits_expired, credits_revoked, reason, "
              "entry_id FROM quota_purchases")

_JOBS = ("SELECT account_id, reservation_id, product, round(extract(epoch FROM held_at) * 1000)::bigint, "
         "round(extract(epoch FROM resolved_at) * 1000)::bigint, state, funding, credits_charged, free_units, "
         "lots, royalty_credits, fees, written_off, plans_version, credits_refunded, hold_seq, credits_drawn, "
         "debt_opened FROM quota_jobs")


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(account_id=row[0], reservation_id=row[1], product=row[2], held_ms=int(row[3]),
                     resolved_ms=None if row[4] is None else int(row[4]), state=row[5], funding=row[6],
                     credits_charged=int(row[7]), free_units=int(row[8]), lots=row[9], royalty_credits=int(row[10]),
                     fees=int(row[11]), written_off=int(row[12]), plans_version=row[13],
                     credits_refunded=int(row[14]), credits_drawn=int(row[16]), debt_opened=int(row[17]))


def _ts(param: str) -> str:
    """SQL for a ms-since-epoch parameter as a timestamptz (exact: integer milliseconds)."""
    return f"(timestamptz 'epoch' + {param} * interval '1 millisecond')"


# Every field a staging row has a column for (the rest go to details), and the details' encoder (one
# JSONEncoder for every row: json.dumps with options would build a new one per call).
_COLUMN_FIELDS = frozenset(_TEXT_FIELDS) | frozenset(_INT_FIELDS) | _ENTRY_KEYS
_encode_details = json.JSONEncoder(separators=(",", ":")).encode


def _int_column(fields: Mapping[str, str], name: str, default: int | None, details: dict[str, str]) -> int | None:
    """An integer field's column: ``default`` when absent or "", else its value; a value that is not an
    integer stays in details as sent (and the column keeps ``default``)."""
    value = fields.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        details[name] = value
        return default


def _staging_row(ord_: int, entry: LedgerEntry) -> tuple[object, ...]:
    """One row of the staging table (_STAGING_COLUMNS; the text fields are _TEXT_FIELDS', by name).
    Runs for every shipped entry, so one pass and no per-row dicts but details."""
    f = entry.fields
    get = f.get
    details = {name: value for name, value in f.items() if name not in _COLUMN_FIELDS}
    credits = _int_column(f, "credits", 0, details)
    price = _int_column(f, "price", None, details)
    expires_ms = _int_column(f, "expires_ms", None, details) or None  # 0: never expires
    d = entry.deltas
    return (ord_, entry.entry_id, entry.account_id, entry.seq, entry.at_ms, entry.type, get("product", ""),
            get("rid", ""), get("pid", ""), get("funding", ""), credits, d.granted, d.refunded,
            d.spent, d.expired, d.revoked, d.held, d.free_units, get("pv", ""), get("source", ""),
            price, get("cur", ""), get("pack", ""), expires_ms, get("reason", ""), _encode_details(details), d.debt)


def _totals(granted: int, refunded: int, spent: int, expired: int, revoked: int, held: int,
            debt: int = 0) -> CreditTotals:
    available = granted + refunded - spent - expired - revoked - held + debt
    return CreditTotals(granted=granted, spent=spent, expired=expired, revoked=revoked, refunded=refunded,
                        held=held, available=available, debt=debt)


def _entry(row: Sequence[Any]) -> LedgerEntry:
    """A row of _ROW_COLUMNS (then, for pages, the six running sums) as a LedgerEntry. ``fields`` get
    back the outbox's names of the non-empty columns, and details."""
    fields: dict[str, str] = {name: row[i] for name, i in _TEXT_COLUMN_FIELDS if row[i]}
    if row[_AT["credits"]]:
        fields["credits"] = str(row[_AT["credits"]])
    for name in ("price_minor_units", "expires_ms"):
        if row[_AT[name]] is not None:
            fields[_FIELD_OF_INT[name]] = str(row[_AT[name]])
    fields.update(row[_AT["details"]] or {})
    first = _AT["granted_delta"]
    granted, refunded, spent, expired, revoked, held, free_units = row[first:first + 7]
    deltas = Deltas(granted=granted, refunded=refunded, spent=spent, expired=expired, revoked=revoked, held=held,
                    free_units=free_units, debt=row[_AT["debt_delta"]])
    totals = _totals(*row[len(_ROW_NAMES):]) if len(row) > len(_ROW_NAMES) else CreditTotals()
    return LedgerEntry(entry_id=row[_AT["entry_id"]], at_ms=int(row[_AT["at_ms"]]), type=row[_AT["kind"]],
                       fields=fields, totals_after=totals, account_id=row[_AT["account_id"]],
                       seq=int(row[_AT["seq"]]), deltas=deltas)


def _purchase(row: Sequence[Any]) -> PurchaseRecord:
    return PurchaseRecord(purchase_id=row[0], account_id=row[1], credits=int(row[2]), source=row[3],
                          price_minor_units=row[4], currency=row[5], pack_id=row[6], granted_ms=int(row[7]),
                          expires_ms=None if row[8] is None else int(row[8]), credits_expired=int(row[9]),
                          credits_revoked=int(row[10]), reason=row[11], entry_id=row[12])


def _connection_options(url: str) -> dict[str, Any]:
    """Defaults the URL does not set: a bounded connect, and TCP keepalives with a user timeout so a
    PostgreSQL host that vanished fails the call in tens of seconds instead of hanging the shipper."""
    try:
        given = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        raise ConfigError("books_url", f"not a PostgreSQL URL or connection string: {exc}") from None
    defaults: dict[str, Any] = {"connect_timeout": 5, "application_name": "quota-sidecar", "keepalives": 1,
                                "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
                                "tcp_user_timeout": 30_000}
    return {k: v for k, v in defaults.items() if k not in given}


def _where(clauses: Iterable[tuple[bool, str]]) -> str:
    chosen = [sql for wanted, sql in clauses if wanted]
    return (" WHERE " + " AND ".join(chosen)) if chosen else ""


class PgBooks:
    """The books on PostgreSQL (quota_sidecar.domain.ports.Books), plus the finance reads.

    ``PgBooks(url)`` does no I/O (the first call connects: a serve starts while PostgreSQL is away);
    ``await PgBooks.connect(url)`` connects at once (the tools: fail early)."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._options = _connection_options(url)
        self._conn: Conn | None = None
        self._lock = asyncio.Lock()

    @classmethod
    async def connect(cls, url: str) -> PgBooks:
        books = cls(url)
        await books._run("connect", lambda conn: conn.execute("SELECT 1"))
        return books

    async def close(self) -> None:
        async with self._lock:
            await self._drop()

    # -- the connection and the error edge ----------------------------------

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection; nothing to save
                pass

    async def _run(self, what: str, work: Callable[[Conn], Awaitable[T]]) -> T:
        """``work`` on the connection, under the lock; PostgreSQL errors become domain errors. A reused
        connection found broken is replaced and ``work`` run once more (every operation is idempotent)."""
        async with self._lock:
            for attempt in (1, 2):
                reused = self._conn is not None
                try:
                    if self._conn is None:
                        self._conn = await AsyncConnection.connect(self._url, autocommit=True, **self._options)
                    return await work(self._conn)
                except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                    broken = self._conn is None or self._conn.broken or self._conn.closed
                    if broken:
                        await self._drop()
                    if broken and reused and attempt == 1:
                        log.info("books: connection lost (%s); reconnecting", str(exc).strip())
                        continue
                    raise BooksUnavailable(f"books unavailable ({what}): {str(exc).strip()}") from exc
                except psycopg.Error as exc:
                    hint = ("; the schema is missing: run `quota-sidecar books migrate`"
                            if isinstance(exc, psycopg.errors.UndefinedTable) else "")
                    raise QuotaError(f"books failed ({what}): {type(exc).__name__}: {str(exc).strip()}{hint}",
                                     reason="BOOKS_ERROR") from exc
                except BaseException:
                    # Cancelled (or worse) mid-operation: the connection's state is unknown.
                    await self._drop()
                    raise
            raise AssertionError("unreachable")

    # -- Books ----------------------------------------------------------------

    async def migrate(self) -> list[str]:
        return await self._run("migrate", apply_migrations)

    async def append(self, entries: Sequence[LedgerEntry]) -> AppendResult:
        if not entries:
            return AppendResult(inserted=0, duplicates=0, conflicts=0)
        rows = [_staging_row(i, e) for i, e in enumerate(entries)]
        return await self._run("append", lambda conn: self._append(conn, rows))

    @staticmethod
    async def _append(conn: Conn, rows: list[tuple[object, ...]]) -> AppendResult:
        async with conn.transaction():
            await conn.execute(_STAGING_DDL)
            async with conn.cursor() as cur:
                async with cur.copy(f"COPY quota_staging ({', '.join(_STAGING_COLUMNS)}) FROM STDIN") as copy:
                    for row in rows:
                        await copy.write_row(row)
                await cur.execute(_INSERT)
                inserted = max(cur.rowcount, 0)
                conflicts = 0
                if inserted < len(rows):
                    await cur.execute(_COUNT_CONFLICTS)
                    conflicts = int((await cur.fetchone() or (0,))[0])
                    if conflicts:
                        await cur.execute(_KEEP_CONFLICTS)
        return AppendResult(inserted=inserted, duplicates=len(rows) - inserted - conflicts, conflicts=conflicts)

    async def ledger_page(self, account_id: str, after_seq: int, count: int) -> list[LedgerEntry]:
        return await self._page("ledger_page", account_id, after_seq, count)

    async def account_entries(self, account_id: str) -> list[LedgerEntry]:
        return await self._page("account_entries", account_id, 0, None)

    async def _page(self, what: str, account_id: str, after_seq: int, count: int | None) -> list[LedgerEntry]:
        async def work(conn: Conn) -> list[LedgerEntry]:
            cursor = await conn.execute(_PAGE, {"a": account_id, "after": after_seq, "n": count})
            return [_entry(row) for row in await cursor.fetchall()]

        return await self._run(what, work)

    async def last_totals(self, account_id: str) -> tuple[int, CreditTotals]:
        async def work(conn: Conn) -> tuple[int, CreditTotals]:
            row = await (await conn.execute(_LAST_TOTALS, (account_id,))).fetchone()
            assert row is not None  # an aggregate without GROUP BY returns one row
            return int(row[0]), _totals(*row[1:8])

        return await self._run("last_totals", work)

    # -- finance and support --------------------------------------------------

    async def conflicts(self, account_id: str | None = None) -> list[LedgerEntry]:
        """Entries kept aside because their (account_id, seq) is another entry's (totals_after zero)."""
        where = _where([(account_id is not None, "account_id = %s")])
        sql = f"SELECT {_ROW_COLUMNS} FROM quota_ledger_conflicts{where} ORDER BY account_id, seq, detected_at"
        params = (account_id,) if account_id is not None else ()

        async def work(conn: Conn) -> list[LedgerEntry]:
            return [_entry(row) for row in await (await conn.execute(sql, params)).fetchall()]

        return await self._run("conflicts", work)

    async def purchases(self, account_id: str | None = None, purchase_ids: Sequence[str] | None = None,
                        since_ms: int | None = None, until_ms: int | None = None) -> list[PurchaseRecord]:
        """The grants the books hold (quota_purchases), oldest first: of one account, of some purchase
        ids, granted in [since_ms, until_ms). Whatever is still in Redis' outbox is not listed."""
        where = _where([(account_id is not None, "account_id = %(a)s"),
                        (purchase_ids is not None, "purchase_id = ANY(%(p)s)"),
                        (since_ms is not None, f"granted_at >= {_ts('%(since)s')}"),
                        (until_ms is not None, f"granted_at < {_ts('%(until)s')}")])
        params = {"a": account_id, "p": list(purchase_ids or ()), "since": since_ms, "until": until_ms}
        sql = f"{_PURCHASES}{where} ORDER BY granted_at, purchase_id, account_id"

        async def work(conn: Conn) -> list[PurchaseRecord]:
            return [_purchase(row) for row in await (await conn.execute(sql, params)).fetchall()]

        return await self._run("purchases", work)

    async def jobs(self, account_id: str, limit: int = 1000) -> list[JobRecord]:
        """One account's jobs the books hold (quota_jobs), the latest ``limit`` oldest first. Movements still
        in Redis' outbox are not listed."""
        sql = f"SELECT * FROM ({_JOBS} WHERE account_id = %(a)s ORDER BY hold_seq DESC LIMIT %(n)s) j ORDER BY hold_seq"

        async def work(conn: Conn) -> list[JobRecord]:
            return [_job(row) for row in await (await conn.execute(sql, {"a": account_id, "n": limit})).fetchall()]

        return await self._run("jobs", work)

    async def report(self, month: str) -> FinanceReport:
        """The month's finance report (UTC calendar month ``YYYY-MM``); InvalidArgument("month") if malformed."""
        start_ms, end_ms = month_bounds_ms(month)
        return await self._run("report", lambda conn: _report(conn, month, start_ms, end_ms))


_IN_MONTH = f"occurred_at >= {_ts('%(start)s')} AND occurred_at < {_ts('%(end)s')}"
_SOLD = (f"SELECT source, count(*), coalesce(sum(granted_delta), 0)::bigint FROM quota_ledger_entries "
         f"WHERE kind = 'grant' AND {_IN_MONTH} GROUP BY source ORDER BY source")
_MONEY = (f"SELECT currency, count(*), sum(price_minor_units)::bigint FROM quota_ledger_entries "
          f"WHERE kind = 'grant' AND price_minor_units IS NOT NULL AND {_IN_MONTH} GROUP BY currency ORDER BY currency")
_BY_PRODUCT = (f"SELECT product, coalesce(sum(spent_delta), 0)::bigint, coalesce(sum(refunded_delta), 0)::bigint "
               f"FROM quota_ledger_entries WHERE (spent_delta <> 0 OR refunded_delta <> 0) AND {_IN_MONTH} "
               "GROUP BY product ORDER BY product")
# Royalties owed per owner for the month, net of refunds (the view quota_royalties, 0002_royalties.sql).
_ROYALTIES = (f"SELECT owner_account_id, cameo_id, count(*) FILTER (WHERE kind = 'commit'), "
              f"count(*) FILTER (WHERE kind = 'refund'), coalesce(sum(credits), 0)::bigint FROM quota_royalties "
              f"WHERE {_IN_MONTH} GROUP BY owner_account_id, cameo_id ORDER BY owner_account_id, cameo_id")
_AVAILABLE = "granted_delta + refunded_delta - spent_delta - expired_delta - revoked_delta - held_delta + debt_delta"
_BEFORE_START = f"occurred_at < {_ts('%(start)s')}"
# The month's movements, and the balances before its start and before its end, in one scan.
_MONTH_TOTALS = f"""SELECT
    coalesce(sum(granted_delta) FILTER (WHERE NOT {_BEFORE_START}), 0)::bigint,
    coalesce(sum(spent_delta) FILTER (WHERE NOT {_BEFORE_START}), 0)::bigint,
    coalesce(sum(refunded_delta) FILTER (WHERE NOT {_BEFORE_START}), 0)::bigint,
    coalesce(sum(expired_delta) FILTER (WHERE NOT {_BEFORE_START}), 0)::bigint,
    coalesce(sum(revoked_delta) FILTER (WHERE NOT {_BEFORE_START}), 0)::bigint,
    coalesce(sum({_AVAILABLE}) FILTER (WHERE {_BEFORE_START}), 0)::bigint,
    coalesce(sum(held_delta) FILTER (WHERE {_BEFORE_START}), 0)::bigint,
    coalesce(sum({_AVAILABLE}), 0)::bigint,
    coalesce(sum(held_delta), 0)::bigint,
    coalesce(sum(debt_delta) FILTER (WHERE {_BEFORE_START}), 0)::bigint,
    coalesce(sum(debt_delta), 0)::bigint,
    coalesce(sum(debt_delta) FILTER (WHERE NOT {_BEFORE_START} AND debt_delta > 0), 0)::bigint,
    coalesce(-sum(debt_delta) FILTER (WHERE NOT {_BEFORE_START} AND kind = 'debt_repay'), 0)::bigint,
    coalesce(-sum(debt_delta) FILTER (WHERE NOT {_BEFORE_START} AND kind = 'refund'), 0)::bigint
FROM quota_ledger_entries WHERE occurred_at < {_ts('%(end)s')}"""


async def _report(conn: Conn, month: str, start_ms: int, end_ms: int) -> FinanceReport:
    params = {"start": start_ms, "end": end_ms}
    async with conn.transaction():
        # One snapshot for every query: the numbers add up even while the shipper writes.
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        sold = [SoldBySource(r[0], int(r[1]), int(r[2])) for r in await (await conn.execute(_SOLD, params)).fetchall()]
        money = [MoneyByCurrency(r[0], int(r[1]), int(r[2]))
                 for r in await (await conn.execute(_MONEY, params)).fetchall()]
        by_product = [ProductUse(r[0], int(r[1]), int(r[2]))
                      for r in await (await conn.execute(_BY_PRODUCT, params)).fetchall()]
        totals = await (await conn.execute(_MONTH_TOTALS, params)).fetchone()
        royalties = [CameoRoyalty(owner_account_id=r[0], cameo_id=r[1], uses=int(r[2]), refunds=int(r[3]),
                                  credits=int(r[4]))
                     for r in await (await conn.execute(_ROYALTIES, params)).fetchall()]
    assert totals is not None  # an aggregate without GROUP BY returns one row
    (granted, spent, refunded, expired, revoked, open_available, open_held, close_available, close_held, open_debt,
     close_debt, debt_opened, debt_repaid, debt_cancelled) = (int(v) for v in totals)
    return FinanceReport(
        month=month.strip(), start_ms=start_ms, end_ms=end_ms, sold=tuple(sold), money=tuple(money),
        unpriced_grants=sum(s.grants for s in sold) - sum(m.grants for m in money), by_product=tuple(by_product),
        granted=granted, spent=spent, refunded=refunded, expired=expired, revoked=revoked,
        opening=Balances(available=open_available, held=open_held, debt=open_debt),
        closing=Balances(available=close_available, held=close_held, debt=close_debt), royalties=tuple(royalties),
        debt_opened=debt_opened, debt_repaid=debt_repaid, debt_cancelled=debt_cancelled)
