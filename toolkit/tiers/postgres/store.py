"""Every SQL statement of the PostgreSQL tier, as SQLAlchemy Core (bound parameters only).

Functions take an open connection, so the caller decides the transaction.
Rows come back as mappings whose keys are the model field names.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from psycopg import sql as pgsql
from sqlalchemy.dialects.postgresql import ARRAY

from toolkit import models
from toolkit.tiers.postgres import tables as t

Row = Mapping[str, Any]
JOB_COPY_COLUMNS = (
    "id", "workflow_id", "name", "status", "priority", "queue", "payload", "result", "error",
    "attempts", "max_attempts", "worker_id", "depends_on", "enqueue_seq", "created_at",
    "updated_at", "started_at", "finished_at", "version",
)
JOB_COPY_TYPES = (
    "text", "text", "text", "text", "int4", "text", "jsonb", "jsonb", "text",
    "int4", "int4", "text", "text[]", "int8", "timestamptz",
    "timestamptz", "timestamptz", "timestamptz", "int8",
)
"""PostgreSQL types of :data:`JOB_COPY_COLUMNS`, for the binary COPY."""


def _in(column: Any, ids: Sequence[str]) -> sa.ColumnElement[bool]:
    """``column = ANY(:ids)`` with the ids bound as ONE array parameter (any number of ids)."""
    clause: sa.ColumnElement[bool] = column == sa.any_(
        sa.bindparam(None, list(ids), type_=ARRAY(sa.Text)))
    return clause


def _one(result: sa.CursorResult[Any]) -> Row | None:
    row = result.mappings().first()
    return dict(row) if row is not None else None


def _all(result: sa.CursorResult[Any]) -> list[Row]:
    return [dict(r) for r in result.mappings()]


# -- generic reads -----------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _get_template(kind: str) -> sa.Select[Any]:
    table = t.ENTITY_TABLES[kind]
    return sa.select(table).where(table.c.id == sa.bindparam("_id"))


def get(conn: sa.Connection, kind: str, entity_id: str) -> Row | None:
    """Return one row by primary key."""
    return _one(conn.execute(_get_template(kind), {"_id": entity_id}))


def get_many(conn: sa.Connection, kind: str, ids: Sequence[str]) -> list[Row]:
    """Return the rows of many ids (one query)."""
    table = t.ENTITY_TABLES[kind]
    return _all(conn.execute(sa.select(table).where(_in(table.c.id, ids))))


def select_where(conn: sa.Connection, kind: str, **equal: Any) -> list[Row]:
    """Return rows whose columns equal the given non-None values, oldest first."""
    table = t.ENTITY_TABLES[kind]
    stmt = sa.select(table)
    for column, value in equal.items():
        if value is not None:
            stmt = stmt.where(table.c[column] == value)
    order = next(table.c[c] for c in ("created_at", "registered_at", "assigned_at") if c in table.c)
    return _all(conn.execute(stmt.order_by(order, table.c.id)))


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
    if kind == "job":
        stmt = stmt.where(t.LIVE_JOB_CLAUSE)
    elif kind == "assignment":
        stmt = stmt.where(table.c.status == "active")
    from psycopg import capabilities

    raw = conn.connection.driver_connection
    assert raw is not None
    size = STREAM_CHUNK if capabilities.has_stream_chunked() else 1
    query, params = _driver_sql(conn, stmt)
    with _live_index_only(conn, kind == "job"), raw.cursor(binary=True) as cur:
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
    return {"workflow": wf, "worker": wk, "job": jb, "assignment": asg}


def statuses(conn: sa.Connection, kind: str, ids: Sequence[str]) -> dict[str, str]:
    """Return id -> status for the ids that exist."""
    table = t.ENTITY_TABLES[kind]
    rows = conn.execute(sa.select(table.c.id, table.c.status).where(_in(table.c.id, ids)))
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

def _param(name: str, column: sa.Column[Any]) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=column.type)


def _statuses_param() -> sa.BindParameter[Any]:
    return sa.bindparam("_statuses", type_=ARRAY(sa.Text))


@functools.lru_cache(maxsize=256)
def _update_template(kind: str, columns: tuple[str, ...], increments: tuple[str, ...],
                     guards: tuple[str, ...], with_statuses: bool, with_now: bool,
                     enqueue: bool, grant: bool = False) -> sa.Update:
    table = t.ENTITY_TABLES[kind]
    stmt = sa.update(table).where(table.c.id == sa.bindparam("_id"))
    for column in guards:
        stmt = stmt.where(table.c[column] == _param(f"_g_{column}", table.c[column]))
    if with_statuses:
        stmt = stmt.where(table.c.status == sa.any_(_statuses_param()))
    vals: dict[str, Any] = {c: _param(f"_v_{c}", table.c[c]) for c in columns}
    vals.update({c: table.c[c] + 1 for c in increments})
    if grant:
        vals["max_attempts"] = sa.func.greatest(table.c.max_attempts, table.c.attempts + 1)
    if "version" in table.c:
        vals["version"] = table.c.version + 1
    if with_now and "updated_at" in table.c:
        vals["updated_at"] = _param("_now", table.c.updated_at)
    if enqueue:
        vals["enqueue_seq"] = t.enqueue_seq.next_value()
    return stmt.values(**vals)


_Shape = tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...], bool, bool, bool, bool]


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
    shape = (kind, columns, increments, guards, statuses_in is not None, now is not None, enqueue,
             grant)
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
    return _update_template(*shape).returning(t.ENTITY_TABLES[shape[0]])


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
    return _one(conn.execute(_update_returning(shape), params))


@functools.lru_cache(maxsize=64)
def _move_template(shape: _Shape, lock_workflow: bool) -> sa.Select[Any]:
    j, w, e = t.jobs, t.workflows, t.job_events
    moved = _update_template(*shape).returning(*j.c).cte("moved")
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
    shape, params = _update_shape("job", job_id, values, statuses_in=statuses_in, now=now,
                                  guard=guard)
    stmt = _move_template(shape, lock_workflow)
    params.update(_event=event, _at=now)
    found = conn.execute(stmt, params).mappings().first()
    if found is None:
        return None, None
    row = dict(found)
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


def _release_statement() -> sa.Update:
    dep = t.jobs.alias("dep")
    unmet = (sa.select(sa.literal(1)).select_from(dep)
             .where(dep.c.id == sa.any_(t.jobs.c.depends_on), dep.c.status != "completed"))
    return (
        sa.update(t.jobs)
        .where(t.jobs.c.workflow_id == sa.bindparam("_wf", type_=sa.Text),
               t.jobs.c.status == "pending",
               sa.bindparam("_job", type_=sa.Text) == sa.any_(t.jobs.c.depends_on),
               ~sa.exists(unmet))
        .values(status="queued", enqueue_seq=t.enqueue_seq.next_value(),
                version=t.jobs.c.version + 1, updated_at=sa.bindparam("_now", type_=t.TZ))
        .returning(t.jobs)
    )


_RELEASE = _release_statement()


def release_dependents(conn: sa.Connection, workflow_id: str, job_id: str, now: datetime) -> list[Row]:
    """Queue the pending jobs of a workflow whose dependencies are now all completed."""
    return _all(conn.execute(_RELEASE, {"_wf": workflow_id, "_job": job_id, "_now": now}))


def cancel_workflow_jobs(conn: sa.Connection, workflow_id: str, now: datetime) -> list[Row]:
    """Cancel every non-final job of a workflow; return the cancelled rows."""
    stmt = (
        sa.update(t.jobs)
        .where(t.jobs.c.workflow_id == workflow_id,
               t.jobs.c.status.in_(models.values(models.LIVE_JOB_STATUSES)))
        .values(status="cancelled", finished_at=now, version=t.jobs.c.version + 1, updated_at=now)
        .returning(t.jobs)
    )
    return _all(conn.execute(stmt))


_END_JOB_ASSIGNMENTS = (
    sa.update(t.job_assignments)
    .where(t.job_assignments.c.status == "active",
           t.job_assignments.c.job_id == sa.any_(sa.bindparam("_jobs", type_=ARRAY(sa.Text))))
    .values(status=sa.bindparam("_status", type_=sa.Text),
            finished_at=sa.bindparam("_now", type_=t.TZ))
    .returning(t.job_assignments)
)


def end_assignments(
    conn: sa.Connection, status: str, now: datetime, *, job_ids: Sequence[str] = (),
    worker_id: str | None = None,
) -> list[Row]:
    """End the active assignments of some jobs or of a worker; return the ended rows."""
    a = t.job_assignments
    if job_ids and worker_id is None:
        return _all(conn.execute(_END_JOB_ASSIGNMENTS, {"_jobs": list(job_ids), "_status": status,
                                                        "_now": now}))
    stmt = sa.update(a).where(a.c.status == "active")
    if job_ids:
        stmt = stmt.where(_in(a.c.job_id, job_ids))
    if worker_id is not None:
        stmt = stmt.where(a.c.worker_id == worker_id)
    return _all(conn.execute(stmt.values(status=status, finished_at=now).returning(a)))


def delete_workflow(conn: sa.Connection, workflow_id: str) -> tuple[Row | None, list[Row], list[str]]:
    """Delete a workflow (the jobs and assignments go by ON DELETE CASCADE).

    Returns the deleted workflow row, its jobs' ``(id, queue, status)`` and
    the ids of their assignments, read in the same transaction.
    """
    jobs = _all(conn.execute(
        sa.select(t.jobs.c.id, t.jobs.c.queue, t.jobs.c.status)
        .where(t.jobs.c.workflow_id == workflow_id)
    ))
    a = t.job_assignments
    assignment_ids = [r[0] for r in conn.execute(
        sa.select(a.c.id).join(t.jobs, t.jobs.c.id == a.c.job_id)
        .where(t.jobs.c.workflow_id == workflow_id)
    )]
    wf = _one(conn.execute(
        sa.delete(t.workflows).where(t.workflows.c.id == workflow_id).returning(t.workflows)
    ))
    return wf, jobs, assignment_ids


def still_queued(conn: sa.Connection, queue_name: str, ids: Sequence[str]) -> set[str]:
    """Return which of ``ids`` PostgreSQL calls queued on ``queue_name`` now."""
    j = t.jobs
    q = sa.select(j.c.id).where(_in(j.c.id, ids), j.c.status == "queued", j.c.queue == queue_name)
    return {r[0] for r in conn.execute(q)}


def queued_jobs(conn: sa.Connection) -> list[tuple[str, str, int, int]]:
    """Return ``(id, queue, priority, enqueue_seq)`` of every queued job."""
    q = (sa.select(t.jobs.c.id, t.jobs.c.queue, t.jobs.c.priority, t.jobs.c.enqueue_seq)
         .where(t.jobs.c.status == "queued"))
    return [(r[0], r[1], r[2], r[3]) for r in conn.execute(q)]


# -- metrics -------------------------------------------------------------------------------

def checkpoint_metrics(conn: sa.Connection, totals: Mapping[str, int], now: datetime) -> None:
    """Store metric totals, never lowering a stored one."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    if not totals:
        return
    m = t.metric_checkpoints
    stmt = pg_insert(m).values([{"name": k, "value": v, "updated_at": now} for k, v in totals.items()])
    stmt = stmt.on_conflict_do_update(
        index_elements=[m.c.name],
        set_={"value": sa.func.greatest(m.c.value, stmt.excluded.value), "updated_at": now},
    )
    conn.execute(stmt)


def checkpoint_buckets(conn: sa.Connection, rows: Sequence[tuple[str, datetime, int]]) -> None:
    """Store metric time buckets, never lowering a stored one."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    if not rows:
        return
    b = t.metric_buckets
    stmt = pg_insert(b).values([{"name": n, "bucket_start": s, "value": v} for n, s, v in rows])
    stmt = stmt.on_conflict_do_update(
        index_elements=[b.c.name, b.c.bucket_start],
        set_={"value": sa.func.greatest(b.c.value, stmt.excluded.value)},
    )
    conn.execute(stmt)


def metric_checkpoints(conn: sa.Connection) -> dict[str, int]:
    """Return the checkpointed metric totals."""
    m = t.metric_checkpoints
    return {r[0]: r[1] for r in conn.execute(sa.select(m.c.name, m.c.value))}


# -- job helpers used by the state manager -------------------------------------------------

_LOCK_WORKFLOW = (sa.select(t.workflows.c.status)
                  .where(t.workflows.c.id == sa.bindparam("_wf")).with_for_update())


def lock_workflow(conn: sa.Connection, workflow_id: str) -> str | None:
    """Lock a workflow row for this transaction; return its status (None: no such workflow)."""
    return conn.execute(_LOCK_WORKFLOW, {"_wf": workflow_id}).scalar_one_or_none()


_JS = models.JobStatus
_BEGUN = frozenset({_JS.ASSIGNED, _JS.RUNNING, _JS.COMPLETED})
"""Jobs whose work has begun: a workflow with one is running (or finished)."""


def _rollup_statement() -> sa.Update:
    j, w = t.jobs, t.workflows
    wf = sa.bindparam("_wf", type_=sa.Text)

    def has(statuses: frozenset[models.JobStatus]) -> sa.Exists:
        return sa.exists().where(
            j.c.status == sa.any_(sa.literal(models.values(statuses), ARRAY(sa.Text))),
            j.c.workflow_id == wf)

    # The probes, named once; PostgreSQL runs each as an InitPlan (at most once for the
    # WHERE and once for the SET: ten index probes at worst, whatever the workflow's size).
    f = sa.select(has(models.LIVE_JOB_STATUSES).label("open"),
                  has(frozenset({_JS.COMPLETED})).label("completed"),
                  has(frozenset({_JS.FAILED})).label("failed"), has(_BEGUN).label("active"),
                  has(models.PROGRESSING_JOB_STATUSES).label("progressing")).subquery("f")
    new = sa.case(
        (sa.and_(~f.c.open, f.c.completed), "completed"),
        (sa.and_(f.c.failed, ~f.c.progressing), "failed"),
        (sa.or_(f.c.active, f.c.failed), "running"),
        (w.c.status == "failed", "running"),
        else_=w.c.status,
    )
    return (
        sa.update(w)
        .where(w.c.id == wf, w.c.status.not_in(models.values(models.FINISHED_WORKFLOW_STATUSES)),
               w.c.status != new)
        .values(status=new, version=w.c.version + 1, updated_at=sa.bindparam("_now", type_=t.TZ))
        .returning(w)
    )


_ROLLUP = _rollup_statement()


def rollup_workflow(conn: sa.Connection, workflow_id: str, now: datetime) -> Row | None:
    """Set a workflow's status from its jobs' statuses; return the row if it changed.

    The rules, in order (cancelled and completed workflows never change):

    1. every job is final (completed or cancelled) and one completed: ``completed``;
    2. a job failed for good and no job can still progress (none is queued,
       assigned or running; a pending job waits for a dependency to complete,
       so it cannot move either): ``failed``;
    3. a job is assigned, running, completed or failed (work has begun and some
       of it can still progress): ``running``;
    4. a ``failed`` workflow whose failed job was re-queued: ``running``;
    5. otherwise unchanged.

    One statement: each question ("a failed job?", "an open job?", ...) is an
    EXISTS probe on the ``(status, workflow_id)`` index, so the cost does not grow
    with the size of the workflow. The caller must hold the workflow's row lock
    (:func:`lock_workflow`) from an earlier statement, so that this statement's
    snapshot sees every job move committed before it. Cancelled and completed
    workflows never change.
    """
    return _one(conn.execute(_ROLLUP, {"_wf": workflow_id, "_now": now}))


def resolve_jobs(conn: sa.Connection, workflow_id: str, refs: Sequence[str]) -> list[Row]:
    """Return ``id, name, status`` of the jobs of a workflow named by id or by name."""
    if not refs:
        return []
    j = t.jobs
    q = (sa.select(j.c.id, j.c.name, j.c.status)
         .where(j.c.workflow_id == workflow_id, sa.or_(j.c.id.in_(list(refs)), j.c.name.in_(list(refs)))))
    return _all(conn.execute(q))


def fail_job(conn: sa.Connection, job_id: str, error: str, retry: bool, now: datetime,
             guard: Mapping[str, Any] | None = None) -> Row | None:
    """Fail an assigned or running job; with ``retry`` and attempts left, queue it again."""
    j = t.jobs
    again = sa.and_(sa.literal(retry), j.c.attempts < j.c.max_attempts)
    stmt = (
        sa.update(j)
        .where(j.c.id == job_id, j.c.status.in_(["assigned", "running"]),
               *[j.c[k] == v for k, v in (guard or {}).items()])
        .values(
            status=sa.case((again, "queued"), else_="failed"),
            enqueue_seq=sa.case((again, t.enqueue_seq.next_value()), else_=j.c.enqueue_seq),
            worker_id=sa.case((again, sa.null()), else_=j.c.worker_id),
            finished_at=sa.case((again, sa.null()), else_=now),
            error=error, version=j.c.version + 1, updated_at=now,
        )
        .returning(j)
    )
    return _one(conn.execute(stmt))


def reclaim_jobs(conn: sa.Connection, job_ids: Sequence[str], now: datetime, *,
                 respect_attempts: bool) -> list[Row]:
    """Queue again the assigned or running jobs given (failed for good when out of attempts)."""
    if not job_ids:
        return []
    j = t.jobs
    again = sa.or_(sa.literal(not respect_attempts), j.c.attempts < j.c.max_attempts)
    stmt = (
        sa.update(j)
        .where(_in(j.c.id, job_ids), j.c.status.in_(["assigned", "running"]))
        .values(
            status=sa.case((again, "queued"), else_="failed"),
            enqueue_seq=sa.case((again, t.enqueue_seq.next_value()), else_=j.c.enqueue_seq),
            worker_id=sa.null(),
            finished_at=sa.case((again, sa.null()), else_=now),
            error=sa.case((again, j.c.error), else_="worker lost: out of attempts"),
            version=j.c.version + 1, updated_at=now,
        )
        .returning(j)
    )
    return _all(conn.execute(stmt))


def record_heartbeats(conn: sa.Connection, beats: Mapping[str, datetime]) -> list[Row]:
    """Write many workers' last heartbeat in one statement; return the updated rows."""
    w = t.workers
    ids = list(beats)
    values = sa.values(sa.column("id", sa.Text), sa.column("at", t.TZ), name="beats").data(
        [(i, beats[i]) for i in ids]
    )
    stmt = (
        sa.update(w)
        .where(w.c.id == values.c.id)
        .values(last_heartbeat=sa.func.greatest(w.c.last_heartbeat, values.c.at),
                version=w.c.version + 1)
        .returning(w)
    )
    return _all(conn.execute(stmt))


# -- the job event log ----------------------------------------------------------------------

EVENT_COPY_COLUMNS = ("job_id", "workflow_id", "event", "status", "worker_id", "attempt", "at",
                      "detail")
EVENT_COPY_TYPES = ("text", "text", "text", "text", "text", "int4", "timestamptz", "jsonb")
"""PostgreSQL types of :data:`EVENT_COPY_COLUMNS`, for the binary COPY."""


def insert_events(conn: sa.Connection, schema: str, events: Sequence[Row]) -> None:
    """Append job events: one INSERT for a few, one COPY for many."""
    if not events:
        return
    if len(events) <= 20:
        conn.execute(sa.insert(t.job_events), list(events))
        return
    raw = conn.connection.driver_connection
    assert raw is not None
    stmt = pgsql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        pgsql.Identifier(schema, "job_events"),
        pgsql.SQL(", ").join(map(pgsql.Identifier, EVENT_COPY_COLUMNS)))
    with raw.cursor() as cur, cur.copy(stmt) as copy:
        copy.set_types(list(EVENT_COPY_TYPES))
        write = copy.write_row
        for e in events:
            write([e[c] for c in EVENT_COPY_COLUMNS])


# -- retention ------------------------------------------------------------------------------

def _purgeable(statuses: Sequence[str], before: datetime) -> list[sa.ColumnElement[bool]]:
    """The jobs a purge removes: a chosen status, finished before ``before``, in a finished workflow.

    A pending, running or failed workflow is live (a manual re-queue of a failed
    job resumes it), so none of its jobs is ever removed: its counts and its
    jobs' dependencies stay whole.
    """
    j, w = t.jobs, t.workflows
    finished = sa.exists().where(w.c.id == j.c.workflow_id,
                                 w.c.status.in_(models.values(models.FINISHED_WORKFLOW_STATUSES)))
    return [j.c.status.in_(list(statuses)), j.c.finished_at < before, finished]


def purgeable(conn: sa.Connection, statuses: Sequence[str], before: datetime) -> int:
    """Count the jobs a purge would remove (the same rule as :func:`purge_batch`)."""
    q = sa.select(sa.func.count()).select_from(t.jobs).where(*_purgeable(statuses, before))
    return int(conn.execute(q).scalar_one())


def purge_batch(conn: sa.Connection, statuses: Sequence[str], before: datetime,
                batch: int) -> tuple[list[Row], list[str]]:
    """Delete up to ``batch`` purgeable jobs (:func:`_purgeable`) with their assignments and events.

    Returns the deleted jobs' ``id, queue`` and the deleted assignment ids.
    """
    j, a, e = t.jobs, t.job_assignments, t.job_events
    ids = [r[0] for r in conn.execute(
        sa.select(j.c.id).where(*_purgeable(statuses, before))
        .order_by(j.c.finished_at).limit(batch).with_for_update(of=j, skip_locked=True))]
    if not ids:
        return [], []
    gone = [r[0] for r in conn.execute(sa.delete(a).where(a.c.job_id.in_(ids)).returning(a.c.id))]
    conn.execute(sa.delete(e).where(e.c.job_id.in_(ids)))
    rows = _all(conn.execute(sa.delete(j).where(j.c.id.in_(ids)).returning(j.c.id, j.c.queue)))
    return rows, gone


# -- coordinator settings (0004) -------------------------------------------------------------

def read_settings(conn: sa.Connection, namespace: str) -> Row | None:
    """Return the settings recorded for ``namespace`` (None when none are)."""
    s = t.settings
    return _one(conn.execute(sa.select(s).where(s.c.namespace == namespace)))


def record_settings(conn: sa.Connection, row: Row) -> Row | None:
    """Record a coordinator's settings (last writer wins); return the row it replaced, if any."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    s = t.settings
    before = _one(conn.execute(sa.select(s).where(s.c.namespace == row["namespace"])
                               .with_for_update()))
    stmt = pg_insert(s).values(**row)
    stmt = stmt.on_conflict_do_update(index_elements=[s.c.namespace],
                                      set_={c: stmt.excluded[c] for c in row if c != "namespace"})
    conn.execute(stmt)
    return before


# -- lock fencing reservations --------------------------------------------------------------

def reserve_fences(conn: sa.Connection, name: str, at_least: int, block: int) -> tuple[int, int]:
    """Reserve ``block`` more fencing tokens for a lock.

    Returns ``(floor, reserved)``: every token handed out so far is <= floor
    (the previous reservation, or ``at_least``), and tokens up to ``reserved``
    may now be handed out.
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    f = t.lock_fences
    floor = conn.execute(sa.select(f.c.token).where(f.c.name == name).with_for_update()
                         ).scalar_one_or_none() or 0
    floor = max(floor, at_least)
    stmt = pg_insert(f).values(name=name, token=floor + block)
    stmt = stmt.on_conflict_do_update(index_elements=[f.c.name],
                                      set_={"token": sa.func.greatest(f.c.token, stmt.excluded.token)})
    conn.execute(stmt)
    return floor, floor + block


# -- driver-level reads (the rebuild) ---------------------------------------------------------

STREAM_CHUNK = 1_000
"""Rows per chunk of :func:`stream_live`."""


def queued_ids(conn: sa.Connection, queue_name: str) -> set[str]:
    """Return the ids of every job PostgreSQL calls queued on ``queue_name`` now.

    Cheaper than :func:`still_queued` when most of a queue is to be checked
    (one scan of the queued-jobs index, no id list sent).
    """
    j = t.jobs
    stmt = sa.select(j.c.id).where(j.c.status == "queued", j.c.queue == queue_name)
    query, params = _driver_sql(conn, stmt)
    raw = conn.connection.driver_connection
    assert raw is not None
    with raw.cursor(binary=True) as cur:
        cur.execute(query, params)
        return {r[0] for r in cur.fetchall()}


def _driver_sql(conn: sa.Connection, stmt: sa.Select[Any]) -> tuple[pgsql.SQL, dict[str, Any]]:
    """Compile a Core statement for the driver: SQL text (schema applied) and its parameters."""
    schema_map = conn.get_execution_options().get("schema_translate_map")
    compiled = stmt.compile(dialect=conn.dialect, schema_translate_map=schema_map,
                            render_schema_translate=True)
    return pgsql.SQL(str(compiled)), dict(compiled.params)
