"""The statements of a job's and a workflow's life after a move: jobs cancelled or
reclaimed, assignments ended, the roll-up, failures and heartbeats (dependents are released
by ``batches.py``, in the completion's round trip).

SQLAlchemy Core with bound parameters, built once where the shape is fixed; every function
takes an open connection, so the caller decides the transaction.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY

from toolkit import models
from toolkit.tiers.postgres import direct, store
from toolkit.tiers.postgres import tables as t


def cancel_workflow_jobs(conn: sa.Connection, workflow_id: str, now: datetime) -> list[store.Row]:
    """Cancel every non-final job of a workflow; return the cancelled rows."""
    stmt = (
        sa.update(t.jobs)
        .where(t.jobs.c.workflow_id == workflow_id,
               t.jobs.c.status.in_(models.values(models.LIVE_JOB_STATUSES)))
        .values(status="cancelled", finished_at=now, version=t.jobs.c.version + 1, updated_at=now)
        .returning(t.jobs)
    )
    return store.all_rows(conn.execute(stmt))


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
) -> list[store.Row]:
    """End the active assignments of some jobs or of a worker; return the ended rows."""
    a = t.job_assignments
    if job_ids and worker_id is None:
        return direct.rows(conn, _END_JOB_ASSIGNMENTS,
                           {"_jobs": list(job_ids), "_status": status, "_now": now})
    stmt = sa.update(a).where(a.c.status == "active")
    if job_ids:
        stmt = stmt.where(store.any_of(a.c.job_id, job_ids))
    if worker_id is not None:
        stmt = stmt.where(a.c.worker_id == worker_id)
    return store.all_rows(conn.execute(stmt.values(status=status, finished_at=now).returning(a)))


def delete_workflow(conn: sa.Connection, workflow_id: str
                    ) -> tuple[store.Row | None, list[store.Row], list[str]]:
    """Delete a workflow (the jobs and assignments go by ON DELETE CASCADE).

    Returns the deleted workflow row, its jobs' ``(id, queue, status)`` and
    the ids of their assignments, read in the same transaction.
    """
    jobs = store.all_rows(conn.execute(
        sa.select(t.jobs.c.id, t.jobs.c.queue, t.jobs.c.status)
        .where(t.jobs.c.workflow_id == workflow_id)
    ))
    a = t.job_assignments
    assignment_ids = [r[0] for r in conn.execute(
        sa.select(a.c.id).join(t.jobs, t.jobs.c.id == a.c.job_id)
        .where(t.jobs.c.workflow_id == workflow_id)
    )]
    wf = store.one_row(conn.execute(
        sa.delete(t.workflows).where(t.workflows.c.id == workflow_id).returning(t.workflows)
    ))
    return wf, jobs, assignment_ids



_LOCK_WORKFLOW = (sa.select(t.workflows.c.status)
                  .where(t.workflows.c.id == sa.bindparam("_wf")).with_for_update())


def lock_workflow(conn: sa.Connection, workflow_id: str) -> str | None:
    """Lock a workflow row for this transaction; return its status (None: no such workflow)."""
    found = direct.first(conn, _LOCK_WORKFLOW, {"_wf": workflow_id})
    return None if found is None else str(found["status"])


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
        .where(w.c.id == wf,
               w.c.status != sa.all_(sa.literal(models.values(models.FINISHED_WORKFLOW_STATUSES),
                                                ARRAY(sa.Text))),
               w.c.status != new)
        .values(status=new, version=w.c.version + 1, updated_at=sa.bindparam("_now", type_=t.TZ))
        .returning(w)
    )


_ROLLUP = _rollup_statement()


def rollup_workflow(conn: sa.Connection, workflow_id: str, now: datetime) -> store.Row | None:
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
    params = {"_wf": workflow_id, "_now": now}
    if not direct.plans_once(conn):
        return direct.first(conn, _ROLLUP, params)
    schema = (conn.get_execution_options().get("schema_translate_map") or {}).get(None, "")
    when, estimate = _estimates.get(schema, (-ESTIMATE_MAX_AGE, 0.0))
    calls: list[direct.Call] = [(_CUSTOM_PLANS, {})] if estimate >= CUSTOM_PLANS_FROM else []
    calls.append((_ROLLUP, params))
    stale = time.monotonic() - when >= ESTIMATE_MAX_AGE
    if stale:  # read again in the same round trip, for the next roll-ups
        calls.append((_ESTIMATE, {"_table": f"{conn.dialect.identifier_preparer.quote(schema)}.jobs"
                                  if schema else "jobs"}))
    out = direct.pipelined(conn, calls)
    if stale:
        found = out.pop()
        _estimates[schema] = (time.monotonic(), float(found[0]["n"]) if found else 0.0)
    return out[-1][0] if out[-1] else None


_CUSTOM_PLANS = sa.text("SET LOCAL plan_cache_mode TO force_custom_plan")
"""Sent with the roll-up (same round trip where statements are pipelined): its plan is made
with the workflow's id. Each probe is an EXISTS, and the plan made for any workflow (the
generic plan, which the single-statement pool forces and PostgreSQL itself picks after five
runs) guesses many matching jobs and reads the jobs table in order, hoping for one soon: a
probe for a status the workflow lacks read every row, 90-130 ms a roll-up at 300,000 jobs
in a few workflows, against 1.2-1.5 ms planned with the id. Until the transaction ends. The
price: about 1.1-1.3 ms of planning each roll-up (a generic plan: 0.05 ms), so only from
:data:`CUSTOM_PLANS_FROM` jobs on, and only where statements may run on a plan made once
(:func:`db.plans_once`): an unnamed statement is planned with its values anyway, and before
PostgreSQL 12 there is no such setting."""

CUSTOM_PLANS_FROM = 50_000
"""Jobs in the table (PostgreSQL's estimate) from which a roll-up is planned with its
workflow: a read of the whole table there costs ten times the planning or more."""
ESTIMATE_MAX_AGE = 60.0
"""Seconds a schema's estimate of its jobs is kept before it is read again."""

_estimates: dict[str, tuple[float, float]] = {}
"""Per schema: when its estimate of jobs was read (``time.monotonic``) and the estimate."""
_pg_class = sa.table("pg_class", sa.column("oid"), sa.column("reltuples"), schema="pg_catalog")
_ESTIMATE = sa.select(sa.func.greatest(_pg_class.c.reltuples, 0).label("n")).where(
    _pg_class.c.oid == sa.func.to_regclass(sa.bindparam("_table", type_=sa.Text)))
"""PostgreSQL's estimate of a table's rows (0 before its first ANALYZE: -1 there)."""


def resolve_jobs(conn: sa.Connection, workflow_id: str, refs: Sequence[str]) -> list[store.Row]:
    """Return ``id, name, status`` of the jobs of a workflow named by id or by name."""
    if not refs:
        return []
    j = t.jobs
    q = (sa.select(j.c.id, j.c.name, j.c.status)
         .where(j.c.workflow_id == workflow_id, sa.or_(j.c.id.in_(list(refs)), j.c.name.in_(list(refs)))))
    return store.all_rows(conn.execute(q))


def failing_job(conn: sa.Connection, job_id: str) -> store.Row | None:
    """Lock a job about to fail; return its attempts, budget and own retry policy.

    None when it is not assigned or running (the failure's update will say why).
    """
    return direct.first(conn, _FAILING, {"_id": job_id})


_FAILING = (sa.select(t.jobs.c.id, t.jobs.c.attempts, t.jobs.c.max_attempts, t.jobs.c.retry_policy)
            .where(t.jobs.c.id == sa.bindparam("_id", type_=sa.Text),
                   t.jobs.c.status == sa.any_(sa.literal(["assigned", "running"], ARRAY(sa.Text))))
            .with_for_update())


def set_run_at(conn: sa.Connection, due: Mapping[str, datetime]) -> None:
    """Set ``run_at`` of jobs just moved in this transaction (job id -> when): ONE statement.

    The version is not bumped: the rows keep the version their move gave them.
    """
    if not due:
        return
    j = t.jobs
    u = sa.func.unnest(sa.bindparam("_ids", list(due), type_=ARRAY(sa.Text)),
                       sa.bindparam("_ats", list(due.values()), type_=ARRAY(t.TZ))).table_valued(
        sa.column("id", sa.Text), sa.column("at", t.TZ)).render_derived(name="u")
    conn.execute(sa.update(j).where(j.c.id == u.c.id).values(run_at=u.c.at))


def reclaim_jobs(conn: sa.Connection, job_ids: Sequence[str], now: datetime, *,
                 respect_attempts: bool) -> list[store.Row]:
    """Queue again the assigned or running jobs given (failed for good when out of attempts)."""
    if not job_ids:
        return []
    j = t.jobs
    again = sa.or_(sa.literal(not respect_attempts), j.c.attempts < j.c.max_attempts)
    stmt = (
        sa.update(j)
        .where(store.any_of(j.c.id, job_ids), j.c.status.in_(["assigned", "running"]))
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
    return store.all_rows(conn.execute(stmt))


def orphan_counts(conn: sa.Connection, job_ids: Sequence[str]) -> dict[str, int]:
    """How many times each job was reclaimed from a dead worker (its ``orphaned`` events)."""
    if not job_ids:
        return {}
    e = t.job_events
    stmt = (sa.select(e.c.job_id, sa.func.count())
            .where(store.any_of(e.c.job_id, job_ids), e.c.event == "reclaimed",
                   e.c.detail["orphaned"].as_boolean().is_(True))
            .group_by(e.c.job_id))
    return {job_id: n for job_id, n in conn.execute(stmt)}


def abandon_jobs(conn: sa.Connection, job_ids: Sequence[str], error: str, now: datetime
                 ) -> list[store.Row]:
    """Fail for good the assigned or running jobs given (a worker keeps dying on them)."""
    if not job_ids:
        return []
    j = t.jobs
    stmt = (
        sa.update(j)
        .where(store.any_of(j.c.id, job_ids), j.c.status.in_(["assigned", "running"]))
        .values(status="failed", worker_id=sa.null(), finished_at=now, error=error,
                version=j.c.version + 1, updated_at=now)
        .returning(j)
    )
    return store.all_rows(conn.execute(stmt))


def lock_job(conn: sa.Connection, job_id: str) -> store.Row | None:
    """Read a job's row and lock it for the rest of the transaction (None: no such job)."""
    j = t.jobs
    return store.one_row(conn.execute(sa.select(j).where(j.c.id == job_id).with_for_update()))


def unclaim_jobs(conn: sa.Connection, job_ids: Sequence[str], worker_id: str, now: datetime
                 ) -> list[store.Row]:
    """Queue again jobs claimed by ``worker_id`` whose work never began, giving their attempt back.

    Assigned, or running when the worker claimed them straight into running and
    stopped before it ran them. They keep their enqueue sequence, so they return
    to the head of their priority.
    """
    if not job_ids:
        return []
    j = t.jobs
    stmt = (
        sa.update(j)
        .where(store.any_of(j.c.id, job_ids), j.c.status.in_(["assigned", "running"]),
               j.c.worker_id == worker_id)
        .values(status="queued", attempts=j.c.attempts - 1, worker_id=sa.null(), started_at=sa.null(),
                version=j.c.version + 1, updated_at=now)
        .returning(j)
    )
    return store.all_rows(conn.execute(stmt))


def record_heartbeats(conn: sa.Connection, beats: Mapping[str, datetime]) -> list[store.Row]:
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
    return store.all_rows(conn.execute(stmt))




def touched(conn: sa.Connection, job_ids: Sequence[str]) -> list[tuple[str, Mapping[str, Any]]]:
    """The rows a move of ``job_ids`` may have changed, as ``(kind, row)``: the jobs, their
    assignments, their workflows, and the queued jobs that wait on them (a completion
    releases those)."""
    j, a = t.jobs, t.job_assignments
    jobs = store.get_many(conn, models.EntityKind.JOB, job_ids)
    wf_ids = sorted({r["workflow_id"] for r in jobs})
    released = store.all_rows(conn.execute(sa.select(j).where(  # (status, workflow_id) index
        j.c.status == "queued", store.any_of(j.c.workflow_id, wf_ids),
        j.c.depends_on.overlap(sa.bindparam(None, list(job_ids), type_=ARRAY(sa.Text))))))
    ended = store.all_rows(conn.execute(sa.select(a).where(store.any_of(a.c.job_id, job_ids))))
    workflows = store.get_many(conn, models.EntityKind.WORKFLOW, wf_ids)
    out: list[tuple[str, Mapping[str, Any]]] = [(models.EntityKind.JOB, r) for r in (*jobs, *released)]
    out += [(models.EntityKind.ASSIGNMENT, r) for r in ended]
    return out + [(models.EntityKind.WORKFLOW, r) for r in workflows]
