"""The books: PostgreSQL as the system of record of every credit movement (docs/books.md).

The only package that touches PostgreSQL: quota_sidecar.books.pg (PgBooks, the domain's Books port,
with its schema migrations in migrations/) and quota_sidecar.books.postgres_server (a real PostgreSQL
server for the development sidecar and the tests). PostgreSQL errors become domain errors here.
"""
