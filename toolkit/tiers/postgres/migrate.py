"""Numbered SQL migrations: ``migrations/NNNN_name.sql`` applied in order.

A small migration table (``schema_migrations``) rather than Alembic: the
schema is a handful of tables owned by this package, upgrades must run inside
``init_state_manager`` on any PostgreSQL the user points at (including a role
that only has DML once the schema exists, which then needs no DDL at all), and
the migration files must be plain SQL an operator can read and run by hand.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from importlib import resources

import sqlalchemy as sa
from psycopg import sql as pgsql

from toolkit import errors
from toolkit.tiers.postgres import store, tables
from toolkit.tiers.postgres.db import Database

log = logging.getLogger(__name__)
_LOCK_KEY = 0x746F6F6C6B6974  # "toolkit": serialises migrations across processes
_BOOK = tables.schema_migrations


@contextlib.contextmanager
def _refused_as_configuration(message: str) -> Iterator[None]:
    """Turn PostgreSQL's "permission denied" into a ConfigurationError (a role, not an outage)."""
    try:
        yield
    except (errors.StorageUnavailable, errors.SetupError) as exc:
        if "permission denied" in str(exc):
            raise errors.SetupError(f"{message}: {exc}") from exc
        raise


def available() -> list[tuple[int, str, str]]:
    """Return ``(version, name, sql)`` of every migration shipped, in order."""
    pkg = resources.files("toolkit.tiers.postgres") / "migrations"
    out = []
    for item in pkg.iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", item.name)
        if m:
            out.append((int(m.group(1)), m.group(2), item.read_text(encoding="utf-8")))
    return sorted(out)


def applied(db: Database) -> list[int]:
    """Return the versions applied to the schema (empty when it has no migration table)."""
    with db.begin("read schema version") as conn:
        if not store.has_toolkit_tables(conn, db.schema):
            return []
        rows = conn.execute(sa.select(tables.schema_migrations.c.version))
        return sorted(r[0] for r in rows)


def upgrade(db: Database, *, target: int | None = None) -> list[int]:
    """Create the schema if needed and apply missing migrations up to ``target``.

    Returns the versions applied now. A schema that is already current needs
    no DDL privilege at all.
    """
    wanted = [m for m in available() if target is None or m[0] <= target]
    with _refused_as_configuration(f"this role may not read schema {db.schema!r} (grant USAGE "
                                   "on the schema and SELECT on its tables)"):
        done = set(applied(db))
    if all(v in done for v, _, _ in wanted):
        return []
    schema = pgsql.Identifier(db.schema)
    new: list[int] = []
    missing = [v for v, _, _ in wanted if v not in done]
    refused = f"schema {db.schema!r} needs migrations {missing} but this role may not run DDL"
    with _refused_as_configuration(refused), db.begin("migrate schema") as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_LOCK_KEY)))
        raw.execute(pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        raw.execute(pgsql.SQL("SET LOCAL search_path TO {}").format(schema))
        conn.execute(sa.schema.CreateTable(_BOOK, if_not_exists=True))
        done = {r[0] for r in conn.execute(sa.select(_BOOK.c.version))}
        for version, name, sql in wanted:
            if version in done:
                continue
            raw.execute(sql)
            conn.execute(sa.insert(_BOOK).values(version=version, name=name, applied_at=sa.func.now()))
            new.append(version)
    if new:
        log.info("applied migrations %s to schema %s", new, db.schema, extra={"action": "migrate"})
    return new
