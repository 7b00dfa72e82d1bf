"""Bulk reads for inspection: one ``COPY (SELECT ...) TO STDOUT`` per frame, parsed by Arrow.

Read-only: the connection runs ``SET TRANSACTION READ ONLY`` first, so the
server refuses any write. Identifiers are composed with ``psycopg.sql``;
filter values are bound by psycopg (never formatted into the text by us).
Times leave PostgreSQL as microseconds since the epoch (no text parsing).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pyarrow as pa
from psycopg import sql
from pyarrow import csv as pacsv

from toolkit.tiers.postgres.db import Database

TIME_COLUMNS = frozenset({"created_at", "updated_at", "started_at", "finished_at", "last_heartbeat",
                          "registered_at", "assigned_at", "bucket_start", "at", "run_at"})


def _column(expr: str, alias: str) -> sql.Composable:
    name = sql.Identifier(expr)
    if expr in TIME_COLUMNS:
        return sql.SQL("(extract(epoch FROM {}) * 1000000)::bigint AS {}").format(
            name, sql.Identifier(alias))
    if expr in ("payload", "result", "metadata", "detail"):
        return sql.SQL("{}::text AS {}").format(name, sql.Identifier(alias))
    if expr in ("queues", "depends_on"):
        return sql.SQL("array_to_string({}, ',') AS {}").format(name, sql.Identifier(alias))
    return sql.SQL("{} AS {}").format(name, sql.Identifier(alias))


def select(db: Database, table: str, columns: Mapping[str, str], *,
           where: Mapping[str, Any] | None = None, order: Sequence[str] = (),
           contains: Mapping[str, str] | None = None, limit: int | None = None) -> pa.Table:
    """Read ``table`` (columns as ``{source: alias}``) with filters, as an Arrow table.

    ``where`` holds equality filters (``None`` values skipped); ``contains`` maps a
    JSONB column to JSON text it must contain (``column @> value::jsonb``, served
    by a GIN index); ``limit`` caps the rows. Every value is a bound parameter.
    """
    cols = sql.SQL(", ").join(_column(src, alias) for src, alias in columns.items())
    query = sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(db.schema, table))
    conds = [sql.SQL("{} = %s").format(sql.Identifier(k)) for k, v in (where or {}).items()
             if v is not None]
    params: list[Any] = [v for v in (where or {}).values() if v is not None]
    for column, text in (contains or {}).items():
        conds.append(sql.SQL("{} @> %s::jsonb").format(sql.Identifier(column)))
        params.append(text)
    if conds:
        query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)
    if order:
        query += sql.SQL(" ORDER BY ") + sql.SQL(", ").join(map(sql.Identifier, order))
    if limit is not None:
        query += sql.SQL(" LIMIT %s")
        params.append(int(limit))
    return copy_query(db, query, params, list(columns.values()))


EVENT_COLUMNS = {"id": "event_id", "job_id": "job_id", "workflow_id": "workflow_id",
                 "worker_id": "worker_id", "event": "event", "status": "status",
                 "attempt": "attempt", "detail": "detail", "at": "at"}
"""``job_events`` columns as ``{source: alias}`` (``at`` leaves as epoch microseconds)."""


def job_events(db: Database, *, since: datetime | None = None,
               equal: Mapping[str, str | None] | None = None) -> pa.Table:
    """Read the job event log in order (``id``), optionally from ``since`` and with equality filters.

    ``since`` is a timezone-aware datetime; every value is a bound parameter.
    """
    cols = sql.SQL(", ").join(_column(src, alias) for src, alias in EVENT_COLUMNS.items())
    query = sql.SQL("SELECT {} FROM {}").format(cols, sql.Identifier(db.schema, "job_events"))
    conds: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (equal or {}).items():
        if value is not None:
            conds.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if since is not None:
        conds.append(sql.SQL("{} >= %s").format(sql.Identifier("at")))
        params.append(since)
    if conds:
        query += sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conds)
    query += sql.SQL(" ORDER BY {}").format(sql.Identifier("id"))
    return copy_query(db, query, params, list(EVENT_COLUMNS.values()))


_ATTEMPT_WAITS = """
SELECT DISTINCT ON (job_id) job_id, extract(epoch FROM at - queued_at)::float8 AS wait_s
FROM (
    SELECT job_id, id, event, at,
           max(CASE WHEN status = 'queued' AND NOT coalesce(after_queued, false) THEN at END)
               OVER (PARTITION BY job_id ORDER BY id) AS queued_at
    FROM (
        SELECT job_id, id, event, status, at,
               lag(status) OVER (PARTITION BY job_id ORDER BY id) = 'queued' AS after_queued
        FROM {events} {where}
    ) stays
) marked
WHERE event = 'assigned' AND queued_at IS NOT NULL
ORDER BY job_id, id DESC
"""


def attempt_waits(db: Database, workflow_id: str | None = None,
                  job_ids: Sequence[str] | None = None) -> pa.Table:
    """Each job's queue wait before its latest assignment (``job_id``, ``wait_s``), from the event log.

    The wait runs from the event that made the job queued (the first of the run of
    queued-status events before the assignment) to the ``assigned`` event: the
    same measure as ``Inspector.wait_times()``. Jobs never assigned have no row.
    ``job_ids`` reads only those jobs' events (a search's few jobs, by the job_id index).
    """
    conds: list[sql.Composable] = []
    params: list[Any] = []
    if workflow_id is not None:
        conds.append(sql.SQL("workflow_id = %s"))
        params.append(workflow_id)
    if job_ids is not None:
        conds.append(sql.SQL("job_id = ANY(%s)"))
        params.append(list(job_ids))
    where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(conds) if conds else sql.SQL("")
    query = sql.SQL(_ATTEMPT_WAITS).format(events=sql.Identifier(db.schema, "job_events"),
                                           where=where)
    return copy_query(db, query, params, ["job_id", "wait_s"])


def dependencies(db: Database) -> pa.Table:
    """One row per dependency edge: ``job_id`` depends on ``depends_on`` (a job id)."""
    query = sql.SQL("SELECT id AS job_id, unnest(depends_on) AS depends_on FROM {} "
                    "ORDER BY 1, 2").format(sql.Identifier(db.schema, "jobs"))
    return copy_query(db, query, (), ["job_id", "depends_on"])


_HAS_KEYS = sql.SQL("SELECT to_regclass(format('%%I.idempotency_keys', %s::text)) IS NOT NULL")


def idempotency_keys(db: Database, kind: str, ids: Sequence[str] | None = None) -> pa.Table:
    """The idempotency key of each ``kind`` (``workflow`` or ``job``) made under one: ``entity_id, key``.

    ``ids``: only these entities (a search that found a few), else all. No rows from a
    schema not yet migrated to 0005 (an Inspector newer than the coordinator).
    """
    if not scalar_rows(db, _HAS_KEYS, [db.schema])[0][0]:
        return pa.table({"entity_id": pa.array([], pa.string()), "key": pa.array([], pa.string())})
    column, made = (("job_id", sql.SQL("job_id IS NOT NULL")) if kind == "job"
                    else ("workflow_id", sql.SQL("job_id IS NULL")))
    query = sql.SQL("SELECT {} AS entity_id, key FROM {} WHERE {}").format(
        sql.Identifier(column), sql.Identifier(db.schema, "idempotency_keys"), made)
    if ids is not None:
        query = sql.SQL("{} AND {} = ANY(%s)").format(query, sql.Identifier(column))
    return copy_query(db, query, () if ids is None else (list(ids),), ["entity_id", "key"])


_HAS_RUN_AT = sql.SQL("SELECT EXISTS (SELECT 1 FROM information_schema.columns WHERE "
                      "table_schema = %s AND table_name = 'jobs' AND column_name = 'run_at')")


def run_at_times(db: Database, ids: Sequence[str] | None = None) -> pa.Table:
    """When each scheduled (or once scheduled) job may run: ``job_id, run_at`` (epoch microseconds).

    ``ids``: only these jobs (read by primary key: a search that found a few no longer
    scans every job), else all. No rows from a schema not yet migrated to 0009 (an
    Inspector newer than the coordinator).
    """
    if not scalar_rows(db, _HAS_RUN_AT, [db.schema])[0][0]:
        return pa.table({"job_id": pa.array([], pa.string()), "run_at": pa.array([], pa.int64())})
    query = sql.SQL("SELECT id AS job_id, {} FROM {} WHERE run_at IS NOT NULL").format(
        _column("run_at", "run_at"), sql.Identifier(db.schema, "jobs"))
    if ids is not None:
        query = sql.SQL("{} AND id = ANY(%s)").format(query)
    return copy_query(db, query, () if ids is None else (list(ids),), ["job_id", "run_at"])


def scheduled_count(db: Database) -> int:
    """Queued jobs whose ``run_at`` is after the server's ``now()`` (0 before migration 0009)."""
    if not scalar_rows(db, _HAS_RUN_AT, [db.schema])[0][0]:
        return 0
    query = sql.SQL("SELECT count(*) FROM {} WHERE status = 'queued' AND run_at > now()").format(
        sql.Identifier(db.schema, "jobs"))
    return int(scalar_rows(db, query)[0][0])


def job_counts(db: Database) -> pa.Table:
    """Jobs per (workflow, status), counted by PostgreSQL."""
    query = sql.SQL("SELECT workflow_id, status, count(*) AS n FROM {} GROUP BY 1, 2").format(
        sql.Identifier(db.schema, "jobs"))
    return copy_query(db, query, (), ["workflow_id", "status", "n"])


def copy_query(db: Database, query: sql.Composable, params: Sequence[Any],
               names: list[str]) -> pa.Table:
    """Run ``COPY (query) TO STDOUT`` in a read-only transaction and parse it with Arrow."""
    copy = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv, HEADER true)").format(query)
    buf = io.BytesIO()
    with db.begin("inspect: read PostgreSQL") as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute("SET TRANSACTION READ ONLY")
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


def scalar_rows(db: Database, query: sql.Composable, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run a small read-only query and return its rows."""
    with db.begin("inspect: read PostgreSQL") as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute("SET TRANSACTION READ ONLY")
        return list(raw.execute(query, params).fetchall())
