"""The books' schema migrations: quota_sidecar/books/migrations/NNNN_name.sql, applied in order.

Each migration runs in its own transaction under a transaction-scoped advisory lock, and is recorded
in quota_schema_migrations in that same transaction: a migration is applied entirely or not at all,
and two processes migrating at once (two shippers starting, `books migrate` beside a serve) apply each
one once: the second waits for the lock, then finds it recorded. Running it again applies nothing.
Migrations are never edited once released; a change is a new file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from psycopg import AsyncConnection
from psycopg.rows import TupleRow

# pg_advisory_xact_lock key of every migration transaction: b"quota_mg" as a big-endian bigint, so it
# cannot collide with another application's small integer keys by accident.
MIGRATION_LOCK_KEY = int.from_bytes(b"quota_mg", "big")
_FILE_RE = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_BOOKKEEPING = """CREATE TABLE IF NOT EXISTS quota_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str  # "0001_ledger": the file name without .sql
    sql: str


def load_migrations() -> list[Migration]:
    """Every migration shipped with the package (package data), in version order."""
    found: list[Migration] = []
    for item in (resources.files("quota_sidecar.books") / "migrations").iterdir():
        match = _FILE_RE.fullmatch(item.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), item.name[:-len(".sql")], item.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    assert len(set(versions)) == len(versions), f"two migrations share a version: {versions}"
    return found


async def _applied(conn: AsyncConnection[TupleRow]) -> set[int] | None:
    """The versions already applied, or None when the bookkeeping table does not exist yet. Read only."""
    cursor = await conn.execute("SELECT to_regclass('quota_schema_migrations') IS NOT NULL")
    row = await cursor.fetchone()
    if row is None or not row[0]:
        return None
    cursor = await conn.execute("SELECT version FROM quota_schema_migrations")
    return {int(r[0]) for r in await cursor.fetchall()}


async def apply_migrations(conn: AsyncConnection[TupleRow], migrations: list[Migration] | None = None) -> list[str]:
    """Applies the migrations ``conn``'s database lacks; returns their names. ``conn`` is in autocommit
    mode (each migration opens its own transaction)."""
    migrations = load_migrations() if migrations is None else migrations
    applied = await _applied(conn)
    if applied is not None and all(m.version in applied for m in migrations):
        # Up to date: no DDL, no lock, so a shipper whose role may only read and write the
        # books' tables starts without CREATE rights.
        return []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        await conn.execute(_BOOKKEEPING)
        cursor = await conn.execute("SELECT version FROM quota_schema_migrations")
        applied = {int(row[0]) for row in await cursor.fetchall()}
    done: list[str] = []
    for migration in migrations:
        if migration.version in applied:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
            # Another process may have applied it while this one waited for the lock.
            cursor = await conn.execute("SELECT 1 FROM quota_schema_migrations WHERE version = %s",
                                        (migration.version,))
            if await cursor.fetchone() is not None:
                continue
            await conn.execute(migration.sql.encode("utf-8"))  # no parameters: several statements at once
            await conn.execute("INSERT INTO quota_schema_migrations (version, name) VALUES (%s, %s)",
                               (migration.version, migration.name))
        done.append(migration.name)
    return done
