"""Bulk reads for inspection: one ``COPY (SELECT ...) TO STDOUT`` per frame, parsed by Arrow.

Read-only: the connection runs ``SET TRANSACTION READ ONLY`` first, so the
server refuses any write. The SELECTs are SQLAlchemy Core over ``tables``, like
every other statement of the tier, with every filter value bound; psycopg only
wraps the compiled SELECT in ``COPY`` (:func:`copy_query`). Times leave
PostgreSQL as microseconds since the epoch (no text parsing).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
import sqlalchemy as sa
from psycopg import sql as pgsql
from pyarrow import csv as pacsv
from sqlalchemy.dialects.postgresql import JSONB

from toolkit.models import JobStatus
from toolkit.tiers.postgres import store
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import Database, driver_sql

TIME_COLUMNS = frozenset({"created_at", "updated_at", "started_at", "finished_at", "last_heartbeat",
                          "registered_at", "assigned_at", "bucket_start", "at", "run_at"})
_JSON_COLUMNS = frozenset({"payload", "result", "metadata", "detail"})
_LIST_COLUMNS = frozenset({"queues", "depends_on"})
_MICROS: sa.ColumnElement[int] = sa.literal_column("1000000")
_ASSIGNED_EVENT = "assigned"


def epoch_us(column: Any) -> sa.ColumnElement[int]:
    """``(extract(epoch FROM column) * 1000000)::bigint``: a timestamp as epoch microseconds."""
    return sa.cast(sa.extract("epoch", column) * _MICROS, sa.BigInteger)


def _column(table: sa.Table, expr: str, alias: str) -> sa.Label[Any]:
    col: sa.ColumnElement[Any] = table.c[expr]
    if expr in TIME_COLUMNS:
        col = epoch_us(col)
    elif expr in _JSON_COLUMNS:
        col = sa.cast(col, sa.Text)
    elif expr in _LIST_COLUMNS:
        col = sa.func.array_to_string(col, sa.literal_column("','"))
    return col.label(alias)


def select(db: Database, table: str, columns: Mapping[str, str], *,
           where: Mapping[str, Any] | None = None, order: Sequence[str] = (),
           contains: Mapping[str, str] | None = None, limit: int | None = None) -> pa.Table:
    """Read ``table`` (columns as ``{source: alias}``) with filters, as an Arrow table.

    ``where`` holds equality filters (``None`` values skipped); ``contains`` maps a
    JSONB column to JSON text it must contain (``column @> value::jsonb``, served
    by a GIN index); ``limit`` caps the rows. Every value is a bound parameter.
    """
    tbl = t.metadata.tables[table]
    stmt = sa.select(*(_column(tbl, src, alias) for src, alias in columns.items()))
    stmt = stmt.where(*(tbl.c[k] == v for k, v in (where or {}).items() if v is not None))
    for column, text in (contains or {}).items():
        stmt = stmt.where(tbl.c[column].op("@>")(sa.cast(sa.cast(text, sa.Text), JSONB)))
    if order:
        stmt = stmt.order_by(*(tbl.c[name] for name in order))
    if limit is not None:
        stmt = stmt.limit(int(limit))
    return copy_query(db, stmt, list(columns.values()))


EVENT_COLUMNS = {"id": "event_id", "job_id": "job_id", "workflow_id": "workflow_id",
                 "worker_id": "worker_id", "event": "event", "status": "status",
                 "attempt": "attempt", "detail": "detail", "at": "at"}
"""``job_events`` columns as ``{source: alias}`` (``at`` leaves as epoch microseconds)."""


def job_events(db: Database, *, since: datetime | None = None,
               equal: Mapping[str, str | None] | None = None) -> pa.Table:
    """Read the job event log in order (``id``), optionally from ``since`` and with equality filters.

    ``since`` is a timezone-aware datetime; every value is a bound parameter.
    """
    e = t.job_events
    stmt = sa.select(*(_column(e, src, alias) for src, alias in EVENT_COLUMNS.items()))
    stmt = stmt.where(*(e.c[k] == v for k, v in (equal or {}).items() if v is not None))
    if since is not None:
        stmt = stmt.where(e.c.at >= since)
    return copy_query(db, stmt.order_by(e.c.id), list(EVENT_COLUMNS.values()))


def attempt_waits(db: Database, workflow_id: str | None = None,
                  job_ids: Sequence[str] | None = None) -> pa.Table:
    """Each job's queue wait before its latest assignment (``job_id``, ``wait_s``), from the event log.

    The wait runs from the event that made the job queued (the first of the run of
    queued-status events before the assignment) to the ``assigned`` event: the
    same measure as ``Inspector.wait_times()``. Jobs never assigned have no row.
    ``job_ids`` reads only those jobs' events (a search's few jobs, by the job_id index).
    """
    e = t.job_events
    after_queued = sa.func.lag(e.c.status).over(partition_by=e.c.job_id, order_by=e.c.id)
    stays = sa.select(e.c.job_id, e.c.id, e.c.event, e.c.status, e.c.at,
                      (after_queued == JobStatus.QUEUED.value).label("after_queued"))
    if workflow_id is not None:
        stays = stays.where(e.c.workflow_id == workflow_id)
    if job_ids is not None:
        stays = stays.where(store.any_of(e.c.job_id, job_ids))
    s = stays.subquery("stays")
    arrived = sa.and_(s.c.status == JobStatus.QUEUED.value,
                      sa.not_(sa.func.coalesce(s.c.after_queued, sa.false())))
    queued_at = sa.func.max(sa.case((arrived, s.c.at))).over(partition_by=s.c.job_id,
                                                             order_by=s.c.id)
    m = sa.select(s.c.job_id, s.c.id, s.c.event, s.c.at, queued_at.label("queued_at")).subquery("marked")
    wait = sa.cast(sa.extract("epoch", m.c.at - m.c.queued_at), sa.Double)
    stmt = (_distinct_on(sa.select(m.c.job_id, wait.label("wait_s")), m.c.job_id)
            .where(m.c.event == _ASSIGNED_EVENT, m.c.queued_at.is_not(None))
            .order_by(m.c.job_id, m.c.id.desc()))
    return copy_query(db, stmt, ["job_id", "wait_s"])


def _distinct_on(stmt: sa.Select[Any], column: Any) -> sa.Select[Any]:
    """``SELECT DISTINCT ON (column)``: SQLAlchemy 2.1's extension, or 2.0's ``distinct(column)``."""
    try:
        from sqlalchemy.dialects.postgresql import distinct_on
    except ImportError:  # SQLAlchemy 2.0
        return stmt.distinct(column)
    return stmt.ext(distinct_on(column))


def dependencies(db: Database) -> pa.Table:
    """One row per dependency edge: ``job_id`` depends on ``depends_on`` (a job id)."""
    j = t.jobs
    stmt = sa.select(j.c.id.label("job_id"), sa.func.unnest(j.c.depends_on).label("depends_on"))
    return copy_query(db, stmt.order_by("job_id", "depends_on"), ["job_id", "depends_on"])


def has_table(db: Database, table: str) -> bool:
    """Whether the schema holds ``table`` (read in a read-only transaction; creates nothing)."""
    with _read_only(db) as conn:
        return store.has_table(conn, db.schema, table)


def has_column(db: Database, table: str, column: str) -> bool:
    """Whether the schema's ``table`` has ``column`` (a schema from before the migration)."""
    with _read_only(db) as conn:
        return store.has_column(conn, db.schema, table, column)


def idempotency_keys(db: Database, kind: str, ids: Sequence[str] | None = None) -> pa.Table:
    """The idempotency key of each ``kind`` (``workflow`` or ``job``) made under one: ``entity_id, key``.

    ``ids``: only these entities (a search that found a few), else all. No rows from a
    schema not yet migrated to 0005 (an Inspector newer than the coordinator).
    """
    if not has_table(db, t.idempotency_keys.name):
        return pa.table({"entity_id": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    k = t.idempotency_keys
    column, made = ((k.c.job_id, k.c.job_id.is_not(None)) if kind == "job"
                    else (k.c.workflow_id, k.c.job_id.is_(None)))
    stmt = sa.select(column.label("entity_id"), k.c.key).where(made)
    if ids is not None:
        stmt = stmt.where(store.any_of(column, ids))
    return copy_query(db, stmt, ["entity_id", "key"])


def run_at_times(db: Database, ids: Sequence[str] | None = None) -> pa.Table:
    """When each scheduled (or once scheduled) job may run: ``job_id, run_at`` (epoch microseconds).

    ``ids``: only these jobs (read by primary key: a search that found a few no longer
    scans every job), else all. No rows from a schema not yet migrated to 0009 (an
    Inspector newer than the coordinator).
    """
    if not has_column(db, "jobs", "run_at"):
        return pa.table({"job_id": pa.array([], pa.string()), "run_at": pa.array([], pa.int64())})
    j = t.jobs
    stmt = sa.select(j.c.id.label("job_id"), _column(j, "run_at", "run_at")).where(
        j.c.run_at.is_not(None))
    if ids is not None:
        stmt = stmt.where(store.any_of(j.c.id, ids))
    return copy_query(db, stmt, ["job_id", "run_at"])


def scheduled_count(db: Database) -> int:
    """Queued jobs whose ``run_at`` is after the server's ``now()`` (0 before migration 0009)."""
    if not has_column(db, "jobs", "run_at"):
        return 0
    j = t.jobs
    stmt = sa.select(sa.func.count()).select_from(j).where(
        j.c.status == JobStatus.QUEUED.value, j.c.run_at > sa.func.now())
    return int(scalar_rows(db, stmt)[0][0])


def oldest_queued_age(db: Database) -> int:
    """Whole seconds since the oldest queued job was last updated, by the server's clock (0: none)."""
    j = t.jobs
    age = sa.func.coalesce(sa.extract("epoch", sa.func.now() - sa.func.min(j.c.updated_at)), 0)
    stmt = sa.select(sa.cast(age, sa.BigInteger)).where(j.c.status == JobStatus.QUEUED.value)
    return int(scalar_rows(db, stmt)[0][0])


def job_counts(db: Database) -> pa.Table:
    """Jobs per (workflow, status), counted by PostgreSQL."""
    j = t.jobs
    stmt = sa.select(j.c.workflow_id, j.c.status, sa.func.count().label("n")).group_by(
        j.c.workflow_id, j.c.status)
    return copy_query(db, stmt, ["workflow_id", "status", "n"])


def copy_query(db: Database, stmt: sa.Select[Any], names: list[str]) -> pa.Table:
    """Run ``COPY (stmt) TO STDOUT`` in a read-only transaction and parse it with Arrow."""
    buf = io.BytesIO()
    with _read_only(db) as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        query, params = driver_sql(conn, stmt)
        copy = pgsql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER true)").format(query)
        with raw.cursor() as cur, cur.copy(copy, params) as cp:
            for block in cp:
                buf.write(block)
    buf.seek(0)
    if buf.getbuffer().nbytes == 0:
        return pa.table({n: pa.array([], pa.string()) for n in names})
    types = {n: pa.int64() for n in names if n in TIME_COLUMNS}
    return pacsv.read_csv(
        buf,
        convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, quoted_strings_can_be_null=False,
            true_values=["t"], false_values=["f"]),
    )


def scalar_rows(db: Database, stmt: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """Run a small read-only query and return its rows."""
    with _read_only(db) as conn:
        return [tuple(row) for row in conn.execute(stmt)]


@contextlib.contextmanager
def _read_only(db: Database) -> Iterator[sa.Connection]:
    """``db.begin`` whose transaction is ``READ ONLY`` from its first statement."""
    with db.begin("inspect: read PostgreSQL") as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute("SET TRANSACTION READ ONLY")
        yield conn
