"""Every SQL statement of the PostgreSQL tier, as SQLAlchemy Core (bound parameters only).

Functions take an open connection, so the caller decides the transaction.
Rows come back as mappings whose keys are the model field names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy.dialects.postgresql import ARRAY

from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import direct
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import driver_sql

Row = Mapping[str, Any]
JOB_COPY_COLUMNS = (
    "id", "workflow_id", "name", "status", "priority", "queue", "payload", "result", "error",
    "attempts", "max_attempts", "worker_id", "depends_on", "enqueue_seq", "created_at",
    "updated_at", "started_at", "finished_at", "version", "run_at", "retry_policy",
)
JOB_COPY_TYPES = (
    "text", "text", "text", "text", "int4", "text", "jsonb", "jsonb", "text",
    "int4", "int4", "text", "text[]", "int8", "timestamptz",
    "timestamptz", "timestamptz", "timestamptz", "int8", "timestamptz", "jsonb",
)
"""PostgreSQL types of :data:`JOB_COPY_COLUMNS`, for the binary COPY."""


def any_of(column: Any, ids: Sequence[str]) -> sa.ColumnElement[bool]:
    """``column = ANY(:ids)`` with the ids bound as ONE array parameter (any number of ids)."""
    clause: sa.ColumnElement[bool] = column == sa.any_(
        sa.bindparam(None, list(ids), type_=ARRAY(sa.Text)))
    return clause


def one_row(result: sa.CursorResult[Any]) -> Row | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


def all_rows(result: sa.CursorResult[Any]) -> list[Row]:
    names = tuple(result.keys())  # fetchall, then zip: much faster than .mappings() row by row
    return [dict(zip(names, r, strict=True)) for r in result.all()]


# -- generic reads -----------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _get_template(kind: str) -> sa.Select[Any]:
    table = t.ENTITY_TABLES[kind]
    return sa.select(table).where(table.c.id == sa.bindparam("_id"))


def get(conn: sa.Connection, kind: str, entity_id: str) -> Row | None:
    """Return one row by primary key."""
    return direct.first(conn, _get_template(kind), {"_id": entity_id})


def get_many(conn: sa.Connection, kind: str, ids: Sequence[str]) -> list[Row]:
    """Return the rows of many ids (one query)."""
    table = t.ENTITY_TABLES[kind]
    return all_rows(conn.execute(sa.select(table).where(any_of(table.c.id, ids))))


def select_where(conn: sa.Connection, kind: str, **equal: Any) -> list[Row]:
    """Return rows whose columns equal the given non-None values, oldest first."""
    table = t.ENTITY_TABLES[kind]
    stmt = sa.select(table)
    for column, value in equal.items():
        if value is not None:
            stmt = stmt.where(table.c[column] == value)
    order = next(table.c[c] for c in ("created_at", "registered_at", "assigned_at") if c in table.c)
    return all_rows(conn.execute(stmt.order_by(order, table.c.id)))


def stream_live(conn: sa.Connection, kind: str, columns: Sequence[str]) -> Iterator[tuple[Any, ...]]:
    """Stream ``columns`` of every live row of ``kind`` as tuples.

    Live: every workflow and worker, active assignments, jobs that are not final.
    One query in the caller's transaction (so it reads the caller's snapshot),
    fetched in binary in chunks of :data:`STREAM_CHUNK` rows (libpq's chunked
    rows mode; one row at a time with a libpq older than 17), so memory does
    not grow with the table. The values are decoded by the connection's own
    loaders, so they have the types a normal read gives (aware UTC datetimes,
    JSON decoded by the engine's deserializer, lists for arrays).
    """
    table = t.ENTITY_TABLES[kind]
    stmt = sa.select(*[table.c[c] for c in columns])
    if kind == Kind.JOB:
        stmt = stmt.where(t.LIVE_JOB_CLAUSE)
    elif kind == Kind.ASSIGNMENT:
        stmt = stmt.where(table.c.status == "active")
    from psycopg import capabilities

    raw = conn.connection.driver_connection
    assert raw is not None
    size = STREAM_CHUNK if capabilities.has_stream_chunked() else 1
    query, params = driver_sql(conn, stmt)
    with _live_index_only(conn, kind == Kind.JOB), raw.cursor(binary=True) as cur:
        yield from cur.stream(query, params, size=size)


@contextlib.contextmanager
def _live_index_only(conn: sa.Connection, on: bool = True) -> Iterator[None]:
    """Read live jobs through the partial index ``ix_jobs_live``, never by a sequential scan.

    With as many finished jobs as live ones the planner prefers a sequential scan of
    the whole table, so the rebuild's time grew with the history (1.37x for twice the
    history at 1,000,000 live jobs). A bitmap scan of the partial index reads only the
    heap pages that hold live jobs. ``SET LOCAL``: this transaction only.
    """
    if not on:
        yield
        return
    conn.exec_driver_sql("SET LOCAL enable_seqscan = off")
    try:
        yield
    finally:
        conn.exec_driver_sql("SET LOCAL enable_seqscan TO DEFAULT")  # the session's value


def count_live(conn: sa.Connection) -> dict[str, int]:
    """Return how many live rows of each kind there are (for progress bars)."""
    q = sa.select(
        sa.select(sa.func.count()).select_from(t.workflows).scalar_subquery(),
        sa.select(sa.func.count()).select_from(t.workers).scalar_subquery(),
        sa.select(sa.func.count()).select_from(t.jobs).where(t.LIVE_JOB_CLAUSE).scalar_subquery(),
        sa.select(sa.func.count()).select_from(t.job_assignments)
        .where(t.job_assignments.c.status == "active").scalar_subquery(),
    )
    with _live_index_only(conn):
        wf, wk, jb, asg = conn.execute(q).one()
    return {Kind.WORKFLOW: wf, Kind.WORKER: wk, Kind.JOB: jb, Kind.ASSIGNMENT: asg}


def statuses(conn: sa.Connection, kind: str, ids: Sequence[str]) -> dict[str, str]:
    """Return id -> status for the ids that exist."""
    table = t.ENTITY_TABLES[kind]
    rows = conn.execute(sa.select(table.c.id, table.c.status).where(any_of(table.c.id, ids)))
    return {r[0]: r[1] for r in rows}


# -- writes --------------------------------------------------------------------------------

def insert(conn: sa.Connection, kind: str, row: Row) -> None:
    """Insert one row."""
    conn.execute(sa.insert(t.ENTITY_TABLES[kind]).values(**row))


def copy_jobs(conn: sa.Connection, schema: str, rows: Iterable[Row]) -> int:
    """Insert many jobs with one ``COPY ... FROM STDIN (FORMAT BINARY)``; return how many."""
    raw = conn.connection.driver_connection
    stmt = pgsql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        pgsql.Identifier(schema, "jobs"), pgsql.SQL(", ").join(map(pgsql.Identifier, JOB_COPY_COLUMNS))
    )
    n = 0
    with raw.cursor() as cur, cur.copy(stmt) as copy:  # type: ignore[union-attr]
        copy.set_types(list(JOB_COPY_TYPES))
        write = copy.write_row
        for row in rows:
            values = [row[c] for c in JOB_COPY_COLUMNS]
            values[12] = list(values[12])
            write(values)
            n += 1
    return n


def next_seqs(conn: sa.Connection, n: int) -> list[int]:
    """Return ``n`` fresh enqueue sequence numbers (one round trip)."""
    if n <= 0:
        return []
    q = sa.select(t.enqueue_seq.next_value()).select_from(sa.func.generate_series(1, n))
    return [r[0] for r in conn.execute(q)]


INCREMENT: Any = object()
"""An :func:`update` value meaning ``column = column + 1``."""
ONE_MORE_ATTEMPT: Any = object()
"""An :func:`update` value of ``max_attempts`` meaning ``greatest(max_attempts, attempts + 1)``:
at least one attempt is left (a manual re-queue of a job that used up its attempts)."""


# Statements on the hot path are built once per shape, with bound parameters, and
# reused: building a SQLAlchemy statement costs more than its round trip to the server.

def param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


def statuses_param() -> sa.BindParameter[Any]:
    return sa.bindparam("_statuses", type_=ARRAY(sa.Text))


class _Shape(NamedTuple):
    """What an update statement looks like (the key of its cached, compiled form)."""

    kind: str
    columns: tuple[str, ...]
    increments: tuple[str, ...]
    guards: tuple[str, ...]
    with_statuses: bool
    with_now: bool
    enqueue: bool
    grant: bool


@functools.lru_cache(maxsize=256)
def _update_template(shape: _Shape) -> sa.Update:
    table = t.ENTITY_TABLES[shape.kind]
    stmt = sa.update(table).where(table.c.id == sa.bindparam("_id"))
    for column in shape.guards:
        stmt = stmt.where(table.c[column] == param(f"_g_{column}", table.c[column]))
    if shape.with_statuses:
        stmt = stmt.where(table.c.status == sa.any_(statuses_param()))
    vals: dict[str, Any] = {c: param(f"_v_{c}", table.c[c]) for c in shape.columns}
    vals.update({c: table.c[c] + 1 for c in shape.increments})
    if shape.grant:
        vals["max_attempts"] = sa.func.greatest(table.c.max_attempts, table.c.attempts + 1)
    if "version" in table.c:
        vals["version"] = table.c.version + 1
    if shape.with_now and "updated_at" in table.c:
        vals["updated_at"] = param("_now", table.c.updated_at)
    if shape.enqueue:
        vals["enqueue_seq"] = t.enqueue_seq.next_value()
    return stmt.values(**vals)


def _update_shape(
    kind: str, entity_id: str, values: Mapping[str, Any], *,
    statuses_in: Iterable[str] | None = None, now: datetime | None = None,
    guard: Mapping[str, Any] | None = None,
) -> tuple[_Shape, dict[str, Any]]:
    """The shape of this update (the key of its cached statement) and its parameters."""
    vals = dict(values)
    enqueue = bool(vals.pop("enqueue", False))
    grant = vals.get("max_attempts") is ONE_MORE_ATTEMPT
    if grant:
        del vals["max_attempts"]
    increments = tuple(sorted(c for c, v in vals.items() if v is INCREMENT))
    columns = tuple(sorted(c for c, v in vals.items() if v is not INCREMENT))
    guard = guard or {}
    guards = tuple(sorted(guard))
    shape = _Shape(kind, columns, increments, guards, statuses_in is not None, now is not None,
                   enqueue, grant)
    params: dict[str, Any] = {"_id": entity_id}
    params.update({f"_v_{c}": vals[c] for c in columns})
    params.update({f"_g_{c}": guard[c] for c in guards})
    if statuses_in is not None:
        params["_statuses"] = [str(s) for s in statuses_in]
    if now is not None:
        params["_now"] = now
    return shape, params


@functools.lru_cache(maxsize=256)
def _update_returning(shape: _Shape) -> sa.Update:
    return _update_template(shape).returning(t.ENTITY_TABLES[shape[0]])


def update(
    conn: sa.Connection, kind: str, entity_id: str, values: Mapping[str, Any], *,
    statuses_in: Iterable[str] | None = None, now: datetime | None = None,
    guard: Mapping[str, Any] | None = None,
) -> Row | None:
    """Update one row if its status is in ``statuses_in`` (and ``guard`` columns match).

    A value of :data:`INCREMENT` adds one to the column. Bumps the version;
    returns the new row, or None when the guard refused.
    """
    shape, params = _update_shape(kind, entity_id, values, statuses_in=statuses_in, now=now,
                                  guard=guard)
    return direct.first(conn, _update_returning(shape), params)


@functools.lru_cache(maxsize=64)
def _move_template(shape: _Shape, lock_workflow: bool) -> sa.Select[Any]:
    j, w, e = t.jobs, t.workflows, t.job_events
    moved = _update_template(shape).returning(*j.c).cte("moved")
    logged = sa.insert(e).from_select(
        ["job_id", "workflow_id", "event", "status", "worker_id", "attempt", "at"],
        sa.select(moved.c.id, moved.c.workflow_id, sa.bindparam("_event", type_=sa.Text),
                  moved.c.status, moved.c.worker_id, moved.c.attempts,
                  sa.bindparam("_at", type_=t.TZ)),
    ).cte("logged")
    columns: list[Any] = list(moved.c)
    if lock_workflow:
        locked = (sa.select(w.c.status)
                  .where(w.c.id == sa.select(moved.c.workflow_id).scalar_subquery())
                  .with_for_update().cte("locked"))
        columns.append(sa.select(locked.c.status).scalar_subquery().label("_workflow_status"))
    return sa.select(*columns).add_cte(logged)


def move_job(
    conn: sa.Connection, job_id: str, values: Mapping[str, Any], *, statuses_in: Iterable[str],
    now: datetime, event: str, guard: Mapping[str, Any] | None = None, lock_workflow: bool = False,
) -> tuple[Row | None, str | None]:
    """Update a job as :func:`update` does, log ``event`` and lock its workflow: ONE statement.

    Returns the new row (None when refused) and, with ``lock_workflow``, the
    workflow's status, its row now locked for this transaction (a later
    statement's snapshot sees every move committed before the lock was granted).
    """
    shape, params = _update_shape(Kind.JOB, job_id, values, statuses_in=statuses_in, now=now,
                                  guard=guard)
    stmt = _move_template(shape, lock_workflow)
    params.update(_event=event, _at=now)
    row = direct.first(conn, stmt, params)
    if row is None:
        return None, None
    return row, row.pop("_workflow_status", None)


def upsert_worker(conn: sa.Connection, row: Row) -> Row:
    """Register a worker, or re-register it (active again, new fields, version + 1)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    stmt = pg_insert(t.workers).values(**row)
    keep = ("hostname", "queues", "capacity", "metadata", "status", "last_heartbeat")
    stmt = stmt.on_conflict_do_update(
        index_elements=[t.workers.c.id],
        set_={**{c: stmt.excluded[c] for c in keep}, "version": t.workers.c.version + 1},
    )
    return dict(conn.execute(stmt.returning(t.workers)).mappings().one())


def still_queued(conn: sa.Connection, queue_name: str, ids: Sequence[str]) -> set[str]:
    """Return which of ``ids`` PostgreSQL calls queued on ``queue_name`` now."""
    j = t.jobs
    q = sa.select(j.c.id).where(any_of(j.c.id, ids), j.c.status == "queued", j.c.queue == queue_name)
    return {r[0] for r in conn.execute(q)}


def queued_jobs(conn: sa.Connection) -> list[tuple[str, str, int, int]]:
    """Return ``(id, queue, priority, enqueue_seq)`` of every queued job."""
    q = (sa.select(t.jobs.c.id, t.jobs.c.queue, t.jobs.c.priority, t.jobs.c.enqueue_seq)
         .where(t.jobs.c.status == "queued"))
    return [(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]


def queued_jobs_timed(conn: sa.Connection) -> list[tuple[str, str, int, int, datetime | None]]:
    """Return ``(id, queue, priority, enqueue_seq, run_at)`` of every queued job."""
    j = t.jobs
    q = sa.select(j.c.id, j.c.queue, j.c.priority, j.c.enqueue_seq, j.c.run_at).where(j.c.status == "queued")
    return [(r[0], r[1], r[2], r[3], r[4]) for r in conn.execute(q)]


def still_scheduled(conn: sa.Connection, queue_name: str, ids: Sequence[str], after: datetime
                    ) -> set[str]:
    """Which of ``ids`` PostgreSQL calls queued on ``queue_name`` with ``run_at`` after ``after``."""
    j = t.jobs
    q = sa.select(j.c.id).where(any_of(j.c.id, ids), j.c.status == "queued",
                                j.c.queue == queue_name, j.c.run_at > after)
    return {r[0] for r in conn.execute(q)}


# -- driver-level reads (the rebuild) ---------------------------------------------------------

STREAM_CHUNK = 1_000
"""Rows per chunk of :func:`stream_live`."""


def _ids(conn: sa.Connection, stmt: sa.Select[Any]) -> set[str]:
    """The first column of every row of ``stmt``, read through the driver in binary."""
    query, params = driver_sql(conn, stmt)
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor(binary=True) as cur:
        cur.execute(query, params)
        return {r[0] for r in cur.fetchall()}


def due_ids(conn: sa.Connection, queue_name: str, ids: Sequence[str] | None, now: datetime
            ) -> set[str]:
    """Return which of ``ids`` (``None``: the whole queue, one scan of the queued-jobs index)
    PostgreSQL calls queued on ``queue_name`` and due (no ``run_at`` after ``now``)."""
    j = t.jobs
    stmt = sa.select(j.c.id).where(j.c.status == "queued", j.c.queue == queue_name,
                                   sa.or_(j.c.run_at.is_(None), j.c.run_at <= now))
    if ids is not None:
        stmt = stmt.where(any_of(j.c.id, ids))
    return _ids(conn, stmt)


def queued_ids(conn: sa.Connection, queue_name: str) -> set[str]:
    """Return the ids of every job PostgreSQL calls queued on ``queue_name`` now.

    Cheaper than :func:`still_queued` when most of a queue is to be checked
    (one scan of the queued-jobs index, no id list sent).
    """
    j = t.jobs
    stmt = sa.select(j.c.id).where(j.c.status == "queued", j.c.queue == queue_name)
    return _ids(conn, stmt)


# -- transactions and the catalog -----------------------------------------------------------

_SNAPSHOT = sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")


def begin_snapshot(conn: sa.Connection) -> None:
    """Make the caller's transaction one read-only snapshot (call it first in the transaction)."""
    conn.execute(_SNAPSHOT)


def has_toolkit_tables(conn: sa.Connection, schema: str) -> bool:
    """Whether ``schema`` holds the toolkit's tables (reads the catalog; creates nothing)."""
    return has_table(conn, schema, t.schema_migrations.name)


def has_table(conn: sa.Connection, schema: str, table: str) -> bool:
    """Whether ``schema`` holds ``table`` (a schema from before the migration that made it)."""
    name = sa.func.format("%I.%I", sa.cast(schema, sa.Text), sa.cast(table, sa.Text))
    return bool(conn.execute(sa.select(sa.func.to_regclass(name).is_not(None))).scalar_one())


_COLUMNS = sa.table("columns", sa.column("table_schema"), sa.column("table_name"),
                    sa.column("column_name"), schema="information_schema")


def has_column(conn: sa.Connection, schema: str, table: str, column: str) -> bool:
    """Whether ``schema.table`` has ``column`` (a schema from before the migration that added it)."""
    c = _COLUMNS.c
    found = sa.exists().where(c.table_schema == schema, c.table_name == table, c.column_name == column)
    return bool(conn.execute(sa.select(found)).scalar_one())
