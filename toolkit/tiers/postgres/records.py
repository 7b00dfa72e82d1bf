"""Records kept beside the entities: the job event log, metric checkpoints, retention, idempotency
keys, the coordinator's recorded settings, paused queues and the fencing-token reservations of locks.

SQLAlchemy Core with bound parameters (binary COPY for the event log); every function
takes an open connection, so the caller decides the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import cast

import sqlalchemy as sa
from psycopg import sql as pgsql

from toolkit import models
from toolkit.tiers.postgres import store
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import refuse_if_broken

# -- the job event log ----------------------------------------------------------------------

EVENT_COPY_COLUMNS = ("job_id", "workflow_id", "event", "status", "worker_id", "attempt", "at",
                      "detail")
EVENT_COPY_TYPES = ("text", "text", "text", "text", "text", "int4", "timestamptz", "jsonb")
"""PostgreSQL types of :data:`EVENT_COPY_COLUMNS`, for the binary COPY."""


def insert_events(conn: sa.Connection, schema: str, events: Sequence[store.Row]) -> None:
    """Append job events: one INSERT for a few, one COPY for many."""
    if not events:
        return
    if len(events) <= 20:
        conn.execute(sa.insert(t.job_events), list(events))
        return
    refuse_if_broken(conn)  # the COPY below is not SQLAlchemy's: its hook does not see it
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
                batch: int) -> tuple[list[store.Row], list[str]]:
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
    rows = store.all_rows(conn.execute(sa.delete(j).where(j.c.id.in_(ids)).returning(j.c.id, j.c.queue)))
    return rows, gone


# -- coordinator settings (0004) -------------------------------------------------------------

def read_settings(conn: sa.Connection, namespace: str) -> store.Row | None:
    """Return the settings recorded for ``namespace`` (None when none are)."""
    s = t.settings
    return store.one_row(conn.execute(sa.select(s).where(s.c.namespace == namespace)))


def record_settings(conn: sa.Connection, row: store.Row) -> store.Row | None:
    """Record a coordinator's settings (last writer wins); return the row it replaced, if any."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    s = t.settings
    before = store.one_row(conn.execute(sa.select(s).where(s.c.namespace == row["namespace"])
                               .with_for_update()))
    stmt = pg_insert(s).values(**row)
    stmt = stmt.on_conflict_do_update(index_elements=[s.c.namespace],
                                      set_={c: stmt.excluded[c] for c in row if c != "namespace"})
    conn.execute(stmt)
    return before


# -- idempotency keys (0005) ------------------------------------------------------------------

def claim_key(conn: sa.Connection, row: store.Row) -> store.Row | None:
    """Take an idempotency key for a create; return None, or the row of the create that has it.

    One ``INSERT ... ON CONFLICT DO NOTHING``: a transaction that holds the same key
    uncommitted makes this wait until it ends (committed: the key is taken; rolled
    back: it is ours). The entity the row names is checked at COMMIT (deferred
    foreign keys), so this may run before the entity is written.
    """
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    k = t.idempotency_keys
    for _ in range(3):  # the holder may be deleted between the two statements: try again
        taken = pg_insert(k).values(**row).on_conflict_do_nothing(index_elements=[k.c.key])
        if conn.execute(taken.returning(k.c.key)).first() is not None:
            return None
        found = store.one_row(conn.execute(sa.select(k).where(k.c.key == row["key"])))
        if found is not None:
            return found
    raise AssertionError(f"idempotency key {row['key']!r} neither free nor taken")


# -- paused queues (0006) -------------------------------------------------------------------

def insert_pause(conn: sa.Connection, row: store.Row) -> bool:
    """Record a pause; False (and nothing written) when the queue is already paused."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    p = t.paused_queues
    stmt = pg_insert(p).values(**row).on_conflict_do_nothing(index_elements=[p.c.queue])
    return conn.execute(stmt.returning(p.c.queue)).first() is not None


def delete_pause(conn: sa.Connection, queue_name: str) -> bool:
    """Remove a pause; False when the queue was not paused."""
    p = t.paused_queues
    return conn.execute(sa.delete(p).where(p.c.queue == queue_name).returning(p.c.queue)
                        ).first() is not None


def paused_queues(conn: sa.Connection, schema: str) -> list[str]:
    """Return the names of the paused queues, sorted (none in a schema from before 0006)."""
    p = t.paused_queues
    if not store.has_table(conn, schema, p.name):
        return []
    return [r[0] for r in conn.execute(sa.select(p.c.queue).order_by(p.c.queue))]


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




# -- what changed since a time (a fast start) ------------------------------------------------

def renew_sentinel(conn: sa.Connection, namespace: str, token: str, *,
                   keep: str | None = None) -> str:
    """Write ``token`` to ``namespace``'s crash sentinel (0010: a crash recovery empties the
    table) unless it holds ``keep`` (not None), read in the same transaction, locked; return
    the token it holds now (``keep`` or ``token``)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    c = t.crash_sentinel
    old = sentinel(conn, namespace, lock=True)
    if old is not None and old == keep:
        return old
    stmt = pg_insert(c).values(namespace=namespace, token=token)
    conn.execute(stmt.on_conflict_do_update(index_elements=[c.c.namespace],
                                            set_={"token": stmt.excluded.token}))
    return token


def sentinel(conn: sa.Connection, namespace: str, *, lock: bool = False) -> str | None:
    """``namespace``'s crash sentinel token, or None (never written, or a crash emptied it);
    ``lock``: its row locked for the transaction."""
    c = t.crash_sentinel
    query = sa.select(c.c.token).where(c.c.namespace == namespace)
    return cast(str | None, conn.execute(query.with_for_update() if lock else query
                                         ).scalar_one_or_none())


def changed_since(conn: sa.Connection, since: datetime) -> dict[str, list[str]]:
    """Ids of the entities that may have changed at or after ``since``, per kind.

    Jobs from the event log (every job change logs an event; ``ix_job_events_at``),
    workflows by ``updated_at``, the assignments of those jobs or assigned or
    finished since, and every worker (a small table whose rows carry no change time).
    """
    e, w, a = t.job_events, t.workflows, t.job_assignments
    jobs = sorted({r[0] for r in conn.execute(sa.select(e.c.job_id).where(e.c.at >= since))})
    workflows = [r[0] for r in conn.execute(sa.select(w.c.id).where(w.c.updated_at >= since))]
    assignments = [r[0] for r in conn.execute(sa.select(a.c.id).where(sa.or_(
        store.any_of(a.c.job_id, jobs), a.c.assigned_at >= since, a.c.finished_at >= since)))]
    workers = [r[0] for r in conn.execute(sa.select(t.workers.c.id))]
    return {models.EntityKind.JOB: jobs, models.EntityKind.WORKFLOW: workflows,
            models.EntityKind.ASSIGNMENT: assignments, models.EntityKind.WORKER: workers}
