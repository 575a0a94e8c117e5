"""The books (quota_sidecar.books) against a real PostgreSQL the tests start (tests/pg_fixtures.py):
migrations, exactly-once appends, conflicts, ledger pages, purchases, the month report, and what
happens when PostgreSQL stops, crashes and comes back."""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg
import pytest

from quota_sidecar.books.migrate import load_migrations
from quota_sidecar.books.pg import PgBooks
from quota_sidecar.books.postgres_server import (
    SUPERUSER,
    PostgresServerProcess,
    find_postgres,
    postgres_candidates,
)
from quota_sidecar.domain.errors import BooksUnavailable, ConfigError, InvalidArgument, Unavailable
from quota_sidecar.domain.finance import decimal_amount, month_bounds_ms, render_text, to_json
from quota_sidecar.domain.model import CreditTotals, Deltas, LedgerEntry
from quota_sidecar.domain.ports import Books

ROOT = Path(__file__).resolve().parent.parent
MIGRATIONS = [m.name for m in load_migrations()]


def utc_ms(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, ms: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc).timestamp()) * 1000 + ms


def entry(account: str, seq: int, kind: str, at_ms: int, deltas: Deltas = Deltas(), *, entry_id: str = "",
          **fields: str) -> LedgerEntry:
    return LedgerEntry(entry_id=entry_id or f"b0:{at_ms}-{account}-{seq}", at_ms=at_ms, type=kind, fields=fields,
                       account_id=account, seq=seq, deltas=deltas)


def running_totals(entries: list[LedgerEntry]) -> list[CreditTotals]:
    out, g, r, s, x, v, h = [], 0, 0, 0, 0, 0, 0
    for e in entries:
        d = e.deltas
        g, r, s, x, v, h = g + d.granted, r + d.refunded, s + d.spent, x + d.expired, v + d.revoked, h + d.held
        out.append(CreditTotals(granted=g, refunded=r, spent=s, expired=x, revoked=v, held=h,
                                available=g + r - s - x - v - h))
    return out


# A hand-made November 2026 (UTC) with movements on both sides of both month boundaries.
NOV = "2026-11"
ACCOUNT_A = [
    entry("A", 1, "grant", utc_ms(2026, 10, 15), Deltas(granted=1000), pid="p-old", credits="1000",
          source="purchase", price="999", cur="USD", expires_ms=str(utc_ms(2026, 11, 25))),
    entry("A", 2, "hold", utc_ms(2026, 10, 31, 23, 59, 59, 999), Deltas(held=100), rid="r1", product="sora",
          funding="credits", credits="100", pv="v1", lots="p-old,100"),
    entry("A", 3, "commit", utc_ms(2026, 11, 1), Deltas(held=-100, spent=80), rid="r1", product="sora",
          funding="credits", pv="v1", charge="80", returned="20"),
    entry("A", 4, "grant", utc_ms(2026, 11, 10), Deltas(granted=500), pid="p-nov", credits="500", source="purchase",
          price="499", cur="USD", pack="p500", reason="checkout 42"),
    entry("A", 5, "grant", utc_ms(2026, 11, 11), Deltas(granted=50), pid="promo-1", credits="50", source="promo"),
    entry("A", 6, "hold", utc_ms(2026, 11, 12), Deltas(held=30), rid="r2", product="veo", funding="credits",
          credits="30"),
    entry("A", 7, "commit", utc_ms(2026, 11, 13), Deltas(held=-30, spent=30), rid="r2", product="veo",
          funding="credits", charge="30"),
    entry("A", 8, "refund", utc_ms(2026, 11, 20), Deltas(refunded=30), rid="r2", product="veo", funding="credits",
          reason="bad output"),
    entry("A", 9, "lot_expire", utc_ms(2026, 11, 25), Deltas(expired=200), pid="p-old", credits="200"),
    entry("A", 10, "revoke", utc_ms(2026, 11, 30, 23, 59, 59, 999), Deltas(revoked=100), pid="p-nov", credits="100",
          reason="chargeback"),
    entry("A", 11, "hold", utc_ms(2026, 12, 1), Deltas(held=10), rid="r3", product="sora", funding="credits",
          credits="10"),
]
ACCOUNT_B = [
    entry("B", 1, "grant", utc_ms(2026, 11, 5), Deltas(granted=200), pid="p-eur", credits="200", source="purchase",
          price="1999", cur="EUR"),
    entry("B", 2, "hold", utc_ms(2026, 11, 6), Deltas(held=20), rid="r4", product="sora", funding="credits",
          credits="20"),
    # The hold took 5 credits of a lot that expired meanwhile: they go to expired at commit.
    entry("B", 3, "commit", utc_ms(2026, 11, 7), Deltas(held=-20, spent=15, expired=5), rid="r4", product="sora",
          funding="credits", charge="15", to_expired="5"),
    entry("B", 4, "hold", utc_ms(2026, 11, 8), Deltas(held=40), rid="r5", product="sora", funding="credits",
          credits="40"),
    entry("B", 5, "hold", utc_ms(2026, 11, 9), Deltas(free_units=1), rid="r6", product="image", funding="free",
          credits="0", free="1", window="20261109"),
]


# -- migrations ---------------------------------------------------------------------------------


async def test_migrate_applies_every_migration_once_and_nothing_the_second_time(books_url: str) -> None:
    books = await PgBooks.connect(books_url)
    try:
        assert await books.migrate() == MIGRATIONS == ["0001_ledger", "0002_royalties", "0003_jobs", "0004_debt"]
        assert await books.migrate() == []
    finally:
        await books.close()
    with psycopg.connect(books_url) as conn:
        assert conn.execute("SELECT version, name FROM quota_schema_migrations").fetchall() == [
            (1, "0001_ledger"), (2, "0002_royalties"), (3, "0003_jobs"), (4, "0004_debt")]
        relations = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'quota%'").fetchall()}
    assert relations == {"quota_ledger_entries", "quota_ledger_conflicts", "quota_schema_migrations",
                         "quota_ledger", "quota_purchases", "quota_royalties", "quota_jobs"}


async def test_two_processes_migrating_at_once_apply_each_migration_once(books_url: str) -> None:
    first, second = PgBooks(books_url), PgBooks(books_url)
    try:
        applied = await asyncio.gather(first.migrate(), second.migrate())
    finally:
        await first.close()
        await second.close()
    # Each migration once, by one or the other (they may share the work: one lock per migration).
    assert sorted(applied[0] + applied[1]) == MIGRATIONS
    with psycopg.connect(books_url) as conn:
        assert conn.execute("SELECT count(*) FROM quota_schema_migrations").fetchone() == (len(MIGRATIONS),)


def test_migrations_are_numbered_and_shipped_as_package_data() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    # Without this glob in pyproject.toml's package-data, an installed wheel has no schema to migrate to.
    assert '"books/migrations/*.sql"' in (ROOT / "pyproject.toml").read_text()


# -- append ---------------------------------------------------------------------------------------


async def test_append_stores_a_batch_once_however_often_it_is_shipped(books: PgBooks) -> None:
    batch = ACCOUNT_A + ACCOUNT_B
    first = await books.append(batch)
    assert (first.inserted, first.duplicates, first.conflicts) == (len(batch), 0, 0)
    again = await books.append(batch)
    assert (again.inserted, again.duplicates, again.conflicts) == (0, len(batch), 0)
    overlapping = await books.append(ACCOUNT_B[3:] + [entry("B", 6, "hold", utc_ms(2026, 11, 10), Deltas(held=1))])
    assert (overlapping.inserted, overlapping.duplicates, overlapping.conflicts) == (1, 2, 0)
    assert len(await books.account_entries("A")) == len(ACCOUNT_A)
    assert [e.seq for e in await books.account_entries("B")] == [1, 2, 3, 4, 5, 6]
    assert (await books.append([])).inserted == 0


async def test_entries_come_back_as_they_were_shipped(books: PgBooks) -> None:
    await books.append(ACCOUNT_A + ACCOUNT_B)
    back = await books.account_entries("A") + await books.account_entries("B")
    for sent, got in zip(ACCOUNT_A + ACCOUNT_B, back):
        assert (got.entry_id, got.account_id, got.seq, got.at_ms, got.type, got.deltas) == (
            sent.entry_id, sent.account_id, sent.seq, sent.at_ms, sent.type, sent.deltas)
        # Fields come back under the outbox's names; empty values and credits "0" are not kept.
        assert got.fields == {k: v for k, v in sent.fields.items() if v not in ("", "0")}


async def test_the_columns_finance_and_support_query(books: PgBooks, books_url: str) -> None:
    await books.append(ACCOUNT_A + ACCOUNT_B)
    with psycopg.connect(books_url) as conn:
        grant = conn.execute(
            "SELECT kind, purchase_id, credits, source, price_minor_units, currency, pack_id, reason, occurred_at, "
            "credits_available_delta, credits_granted_delta, details FROM quota_ledger WHERE entry_id = %s",
            (ACCOUNT_A[3].entry_id,)).fetchone()
        hold = conn.execute(
            "SELECT reservation_id, product, funding, plans_version, credits, credits_held_delta, "
            "credits_available_delta, occurred_at, expires_at, details FROM quota_ledger WHERE account_id = 'A' "
            "AND seq = 2").fetchone()
        free = conn.execute("SELECT free_units_delta, credits_available_delta, details FROM quota_ledger "
                            "WHERE account_id = 'B' AND seq = 5").fetchone()
        old_grant_expires = conn.execute("SELECT expires_at FROM quota_ledger_entries WHERE seq = 1 AND "
                                         "account_id = 'A'").fetchone()
    assert grant == ("grant", "p-nov", 500, "purchase", 499, "USD", "p500", "checkout 42",
                     datetime(2026, 11, 10, tzinfo=timezone.utc), 500, 500, {})
    assert hold == ("r1", "sora", "credits", "v1", 100, 100, -100,
                    datetime(2026, 10, 31, 23, 59, 59, 999000, tzinfo=timezone.utc), None, {"lots": "p-old,100"})
    assert free == (1, 0, {"free": "1", "window": "20261109"})
    assert old_grant_expires == (datetime(2026, 11, 25, tzinfo=timezone.utc),)


async def test_a_field_that_should_be_a_number_but_is_not_is_kept_in_details(books: PgBooks) -> None:
    odd = entry("C", 1, "grant", utc_ms(2026, 11, 2), Deltas(granted=5), credits="5", price="4.99", cur="USD")
    assert (await books.append([odd])).inserted == 1
    [back] = await books.account_entries("C")
    assert back.fields == {"credits": "5", "price": "4.99", "cur": "USD"}
    [purchase] = await books.purchases(account_id="C")
    assert purchase.price_minor_units is None


async def test_a_reused_sequence_number_is_kept_aside_as_a_conflict(books: PgBooks, books_url: str) -> None:
    await books.append(ACCOUNT_B[:3])
    # Redis lost B's seq 3 and wrote another movement under it: another entry id, same (account, seq).
    reused = entry("B", 3, "release", utc_ms(2026, 11, 7, 0, 0, 1), Deltas(held=-20), entry_id="b0:9-9", rid="r4")
    result = await books.append([reused, ACCOUNT_B[3]])
    assert (result.inserted, result.duplicates, result.conflicts) == (1, 0, 1)
    retried = await books.append([reused, ACCOUNT_B[3]])
    assert (retried.inserted, retried.duplicates, retried.conflicts) == (0, 1, 1)
    assert [e.entry_id for e in await books.account_entries("B")] == [e.entry_id for e in ACCOUNT_B[:4]]
    [kept] = await books.conflicts("B")
    assert (kept.entry_id, kept.seq, kept.type, kept.deltas, kept.fields) == ("b0:9-9", 3, "release",
                                                                              Deltas(held=-20), {"rid": "r4"})
    assert await books.conflicts("A") == []
    assert [e.entry_id for e in await books.conflicts()] == ["b0:9-9"]
    with psycopg.connect(books_url) as conn:
        assert conn.execute("SELECT count(*) FROM quota_ledger_conflicts WHERE detected_at <= now()").fetchone() == (1,)


async def test_of_two_entries_of_one_batch_under_one_sequence_number_the_earlier_is_the_movement(
        books: PgBooks) -> None:
    first = entry("D", 1, "grant", utc_ms(2026, 11, 3), Deltas(granted=10), entry_id="b1:100-0")
    second = entry("D", 1, "grant", utc_ms(2026, 11, 3), Deltas(granted=99), entry_id="b1:100-1")
    result = await books.append([first, second])
    assert (result.inserted, result.duplicates, result.conflicts) == (1, 0, 1)
    assert [e.entry_id for e in await books.account_entries("D")] == ["b1:100-0"]
    assert [e.entry_id for e in await books.conflicts("D")] == ["b1:100-1"]


# -- reads --------------------------------------------------------------------------------------------


async def test_ledger_pages_carry_running_totals_and_page_by_sequence_number(books: PgBooks) -> None:
    await books.append(ACCOUNT_B + ACCOUNT_A)
    expected = running_totals(ACCOUNT_A)
    pages, after = [], 0
    while page := await books.ledger_page("A", after, 4):
        pages.append([e.seq for e in page])
        assert [e.totals_after for e in page] == expected[after:after + len(page)]
        after = page[-1].seq
    assert pages == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11]]
    assert await books.ledger_page("A", 11, 4) == []
    assert [e.totals_after for e in await books.account_entries("A")] == expected
    assert await books.last_totals("A") == (11, expected[-1])
    assert expected[-1] == CreditTotals(granted=1550, refunded=30, spent=110, expired=200, revoked=100, held=10,
                                        available=1160)
    assert await books.last_totals("nobody") == (0, CreditTotals())
    assert await books.ledger_page("nobody", 0, 10) == []


async def test_purchases_list_every_grant_with_its_price_and_what_expired_or_was_revoked(books: PgBooks) -> None:
    await books.append(ACCOUNT_A + ACCOUNT_B)
    every = await books.purchases()
    assert [(p.purchase_id, p.account_id, p.credits, p.source, p.price_minor_units, p.currency, p.pack_id,
             p.credits_expired, p.credits_revoked) for p in every] == [
        ("p-old", "A", 1000, "purchase", 999, "USD", "", 200, 0),
        ("p-eur", "B", 200, "purchase", 1999, "EUR", "", 0, 0),
        ("p-nov", "A", 500, "purchase", 499, "USD", "p500", 0, 100),
        ("promo-1", "A", 50, "promo", None, "", "", 0, 0),
    ]
    old, eur = every[0], every[1]
    assert (old.granted_ms, old.expires_ms, eur.expires_ms) == (utc_ms(2026, 10, 15), utc_ms(2026, 11, 25), None)
    assert [p.purchase_id for p in await books.purchases(account_id="B")] == ["p-eur"]
    assert [p.purchase_id for p in await books.purchases(purchase_ids=["p-nov", "p-old", "unknown"])] == [
        "p-old", "p-nov"]
    assert await books.purchases(purchase_ids=[]) == []
    in_november = await books.purchases(since_ms=utc_ms(2026, 11, 1), until_ms=utc_ms(2026, 11, 10))
    assert [p.purchase_id for p in in_november] == ["p-eur"]
    assert old.to_json() == {
        "purchase_id": "p-old", "account_id": "A", "credits": 1000, "source": "purchase",
        "price": {"currency": "USD", "minor_units": 999, "amount": "9.99"}, "pack_id": "",
        "granted_at": "2026-10-15T00:00:00Z", "expires_at": "2026-11-25T00:00:00Z", "credits_expired": 200,
        "credits_revoked": 0, "reason": "", "entry_id": ACCOUNT_A[0].entry_id}
    assert "p-old  account A: 1,000 credits (purchase), USD 9.99" in old.describe()


async def test_the_month_report_counts_what_moved_inside_the_month_only(books: PgBooks) -> None:
    await books.append(ACCOUNT_A + ACCOUNT_B)
    report = await books.report(NOV)
    assert (report.start_ms, report.end_ms) == (utc_ms(2026, 11, 1), utc_ms(2026, 12, 1))
    assert [(s.source, s.grants, s.credits) for s in report.sold] == [("promo", 1, 50), ("purchase", 2, 700)]
    assert [(m.currency, m.grants, m.minor_units, m.amount) for m in report.money] == [
        ("EUR", 1, 1999, "19.99"), ("USD", 1, 499, "4.99")]
    assert report.unpriced_grants == 1
    assert [(p.product, p.spent, p.refunded) for p in report.by_product] == [("sora", 95, 0), ("veo", 30, 30)]
    assert (report.granted, report.spent, report.refunded, report.expired, report.revoked) == (750, 125, 30, 205, 100)
    # Before November 1st: A's first grant and a hold of 100 made one millisecond before midnight.
    assert (report.opening.available, report.opening.held) == (900, 100)
    # Before December 1st: everything but A's hold made at midnight exactly.
    assert (report.closing.available, report.closing.held) == (1310, 40)
    assert report.balanced
    as_json = to_json(report)
    assert as_json["credits_sold"] == 750 and as_json["credits_expired"] == 205
    assert as_json["money_by_currency"] == [
        {"currency": "EUR", "grants": 1, "minor_units": 1999, "amount": "19.99"},
        {"currency": "USD", "grants": 1, "minor_units": 499, "amount": "4.99"}]
    assert as_json["closing_balance"] == {"available": 1310, "held": 40, "debt": 0}
    text = render_text(report)
    assert "Books for 2026-11 (UTC, 2026-11-01T00:00:00Z to 2026-12-01T00:00:00Z)" in text
    assert "EUR" in text and "19.99" in text and "(breakage)" in text and ": yes" in text
    october, december = await books.report("2026-10"), await books.report("2026-12")
    assert (october.granted, october.closing) == (1000, report.opening)
    assert (december.opening, december.closing.held) == (report.closing, 50)
    empty = await books.report("2020-01")
    assert (empty.granted, empty.sold, empty.closing.total, empty.balanced) == (0, (), 0, True)


@pytest.mark.parametrize("month", ["2026-13", "2026-1", "nov", "1969-12", ""])
async def test_a_malformed_month_is_an_invalid_argument(books: PgBooks, month: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        await books.report(month)
    assert raised.value.field == "month"


def test_month_bounds_and_amounts() -> None:
    assert month_bounds_ms("2026-12") == (utc_ms(2026, 12, 1), utc_ms(2027, 1, 1))
    assert month_bounds_ms(" 2024-02 ") == (utc_ms(2024, 2, 1), utc_ms(2024, 3, 1))
    assert [decimal_amount(n) for n in (0, 5, 499, 100000, -5)] == ["0.00", "0.05", "4.99", "1000.00", "-0.05"]


# -- failures and recovery ------------------------------------------------------------------------


async def test_books_unavailable_while_postgres_is_stopped_then_back_after_restart(
        postgres_server: PostgresServerProcess) -> None:
    books = await PgBooks.connect(postgres_server.url)
    try:
        await books.migrate()
        assert (await books.append(ACCOUNT_B[:2])).inserted == 2
        postgres_server.stop()
        with pytest.raises(BooksUnavailable) as raised:
            await books.append(ACCOUNT_B[2:])
        assert isinstance(raised.value, Unavailable) and raised.value.reason == "BOOKS_UNAVAILABLE"
        with pytest.raises(BooksUnavailable):
            await books.ledger_page("B", 0, 10)
        postgres_server.start()  # same port, same data folder
        result = await books.append(ACCOUNT_B)
        assert (result.inserted, result.duplicates) == (3, 2)
        # A restart under an open connection: the next call reconnects by itself.
        postgres_server.restart()
        assert [e.seq for e in await books.account_entries("B")] == [1, 2, 3, 4, 5]
    finally:
        await books.close()


async def test_a_crashed_postgres_keeps_every_committed_batch(postgres_server: PostgresServerProcess) -> None:
    books = await PgBooks.connect(postgres_server.url)
    try:
        await books.migrate()
        await books.append(ACCOUNT_A)
        postgres_server.kill()  # SIGKILL to the postmaster and every backend
        with pytest.raises(BooksUnavailable):
            await books.last_totals("A")
        postgres_server.start()  # crash recovery from the WAL
        assert (await books.append(ACCOUNT_A)).duplicates == len(ACCOUNT_A)
        assert (await books.last_totals("A"))[0] == 11
    finally:
        await books.close()


async def test_connecting_to_nothing_is_books_unavailable_and_a_bad_url_a_config_error() -> None:
    with pytest.raises(BooksUnavailable):
        await PgBooks.connect("postgresql://quota@127.0.0.1:1/quota?connect_timeout=2")
    lazy = PgBooks("postgresql://quota@127.0.0.1:1/quota")  # no I/O until the first call
    with pytest.raises(BooksUnavailable):
        await lazy.migrate()
    await lazy.close()
    with pytest.raises(ConfigError) as raised:
        PgBooks("postgresql://quota@127.0.0.1:1/quota?no_such_option=1")
    assert raised.value.field == "books_url"


# -- the port and the server ------------------------------------------------------------------------


def _parameters(function: object) -> list[tuple[str, inspect._ParameterKind]]:
    return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]  # type: ignore[arg-type]


def test_pgbooks_implements_every_books_method_with_the_same_parameters() -> None:
    methods = sorted(n for n, v in vars(Books).items() if inspect.isfunction(v) and not n.startswith("_"))
    assert methods, "the protocol lists its methods"
    for name in methods:
        implementation = getattr(PgBooks, name, None)
        assert implementation is not None, f"PgBooks lacks {name}"
        assert inspect.iscoroutinefunction(implementation), f"PgBooks.{name} must be async like the protocol"
        assert _parameters(implementation) == _parameters(getattr(Books, name)), (
            f"PgBooks.{name}{inspect.signature(implementation)} != Books.{name}")


@pytest.mark.slow
@pytest.mark.parametrize("origin", ["debian", "wheel"])
def test_each_installation_found_runs_the_books(origin: str) -> None:
    engines = [e for e in postgres_candidates() if e.origin == origin]
    if not engines:
        pytest.skip(f"no {origin} PostgreSQL on this machine")
    folder = tempfile.mkdtemp(prefix="quota-pg-")
    server = PostgresServerProcess(folder, engine=engines[0], fsync=False)
    try:
        server.start()
        with psycopg.connect(server.url) as conn:
            version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            assert conn.execute("SELECT current_database(), current_user").fetchone() == ("quota", "quota")
        assert version.startswith(f"{engines[0].major}.")
        assert str(engines[0].bin_dir) in server.describe()
        server.stop()
        # The folder remembers its major version: a later start picks that installation again.
        assert PostgresServerProcess(folder).engine.major == engines[0].major
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_a_folder_of_another_major_version_is_refused() -> None:
    majors = {e.major: e for e in postgres_candidates()}
    if len(majors) < 2:
        pytest.skip("needs two PostgreSQL major versions (Debian's and the wheel's)")
    (old, new) = sorted(majors)[:2]
    folder = tempfile.mkdtemp(prefix="quota-pg-")
    try:
        server = PostgresServerProcess(folder, engine=majors[new], fsync=False)
        server.start()
        server.stop()
        with pytest.raises(RuntimeError, match=f"PostgreSQL {new} cluster"):
            PostgresServerProcess(folder, engine=majors[old], fsync=False).start()
        with pytest.raises(RuntimeError, match=f"of PostgreSQL {new}"):
            find_postgres(str(majors[old].bin_dir), major=new)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs PostgreSQL as another user")
def test_under_root_a_folder_the_postgres_user_cannot_enter_is_named() -> None:
    outer = tempfile.mkdtemp(prefix="quota-pg-")  # 0700, root's
    try:
        server = PostgresServerProcess(os.path.join(outer, "books"), fsync=False)
        with pytest.raises(RuntimeError, match=f"cannot enter {outer} .*chmod o\\+x {outer}"):
            server.start()
        granted = PostgresServerProcess(os.path.join(outer, "books"), fsync=False, grant_traverse=True)
        granted.start()
        granted.stop()
        assert os.stat(outer).st_mode & 0o777 == 0o701
    finally:
        shutil.rmtree(outer, ignore_errors=True)


def test_a_postgres_left_running_by_an_earlier_process_is_stopped_at_start(
        postgres_server: PostgresServerProcess) -> None:
    # A serve killed with SIGKILL leaves its postgres running (its own session): the next start on
    # that folder stops it rather than failing on its lock file.
    orphaned_pid = postgres_server.pid
    successor = PostgresServerProcess(postgres_server.data_dir, port=postgres_server.port, fsync=False)
    try:
        successor.start()
        assert successor.pid != orphaned_pid and not postgres_server.running()
        with psycopg.connect(successor.url) as conn:
            assert conn.execute("SELECT pg_postmaster_start_time() IS NOT NULL").fetchone() == (True,)
        assert f"stopping postgres pid {orphaned_pid}" in successor.log_path.read_text()
    finally:
        successor.stop()


async def test_a_shipper_role_without_create_rights_starts_on_an_up_to_date_schema(books: PgBooks,
                                                                                   books_url: str) -> None:
    """Production gives the shipper a role that may only read and write the books: once the schema is
    up to date, migrate() must need no DDL (and append no more than TEMP, which PUBLIC has)."""
    role = f"shipper_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(books_url, autocommit=True) as admin:
        await admin.execute(f"CREATE ROLE {role} LOGIN")
        await admin.execute(f"GRANT SELECT, INSERT ON quota_ledger_entries, quota_ledger_conflicts, "
                            f"quota_schema_migrations TO {role}")
        await admin.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
    assert books_url.startswith(f"postgresql://{SUPERUSER}@"), books_url
    url = books_url.replace(f"{SUPERUSER}@", f"{role}@", 1)
    limited = await PgBooks.connect(url)
    try:
        assert await limited.migrate() == []
        entry = LedgerEntry(entry_id="b1:1-0", at_ms=1_700_000_000_000, type="grant", account_id="role-1", seq=1,
                            fields={"pid": "p1", "credits": "3"}, deltas=Deltas(granted=3))
        assert (await limited.append([entry])).inserted == 1
    finally:
        await limited.close()
