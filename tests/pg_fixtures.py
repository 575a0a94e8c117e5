"""Fixtures for the books: real PostgreSQL servers started by the tests (no mocks, no SQLite).

- ``books_postgres`` (session): one server (quota_sidecar.books.postgres_server) on a free loopback
  port in a temporary folder, fsync off (the tests never survive a machine crash anyway);
- ``books_url``: a fresh, empty database of that server for one test (CREATE DATABASE quota_t<n>),
  dropped afterwards;
- ``books``: a PgBooks on such a database, migrated;
- ``postgres_server``: a server of the test's own, for tests that stop, kill and restart it.

$QUOTA_POSTGRES_BIN_DIR pins the PostgreSQL installation, as for serve (docs/books.md).
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from typing import AsyncIterator, Iterator

import psycopg
import pytest

from quota_sidecar.books.pg import PgBooks
from quota_sidecar.books.postgres_server import PostgresServerProcess

_DATABASES = itertools.count(1)


def _server_folder() -> str:
    # Not tmp_path: under root PostgreSQL runs as another user, who may not enter pytest's 0700 folders.
    return tempfile.mkdtemp(prefix="quota-pg-")


@contextlib.contextmanager
def _running_server() -> Iterator[PostgresServerProcess]:
    """A PostgreSQL of its own (fsync off), stopped and its folder removed at the end."""
    folder = _server_folder()
    server = PostgresServerProcess(folder, fsync=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def books_postgres() -> Iterator[PostgresServerProcess]:
    with _running_server() as server:
        yield server


@pytest.fixture
def books_url(books_postgres: PostgresServerProcess) -> Iterator[str]:
    name = f"quota_t{next(_DATABASES)}"
    with psycopg.connect(books_postgres.url_for("postgres"), autocommit=True) as admin:
        # FILE_COPY (PostgreSQL 15+): 5x faster than the default WAL_LOG for a small template, fsync off.
        strategy = " STRATEGY FILE_COPY" if admin.info.server_version >= 150000 else ""
        admin.execute(f"CREATE DATABASE {name}{strategy}")
    try:
        yield books_postgres.url_for(name)
    finally:
        with psycopg.connect(books_postgres.url_for("postgres"), autocommit=True) as admin:
            # FORCE: a test that failed may have left a connection open.
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
async def books(books_url: str) -> AsyncIterator[PgBooks]:
    b = await PgBooks.connect(books_url)
    await b.migrate()
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def postgres_server() -> Iterator[PostgresServerProcess]:
    with _running_server() as server:
        yield server
