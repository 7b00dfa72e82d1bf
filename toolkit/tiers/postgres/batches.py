"""Set-based statements for batches of job moves: one statement moves every job of a batch.

A batch's items travel as parallel arrays (``unnest``), each with its own fence
(worker, attempt; NULL: not fenced) and its own value (a result as JSON text, an
error): an item whose status or fence does not match is simply not updated, and
the caller reports it on its own. SQLAlchemy Core with bound parameters, built
once; every function takes an open connection, so the caller decides the
transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, NamedTuple, cast

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, array

from toolkit.tiers.postgres import direct, store
from toolkit.tiers.postgres import tables as t

j = t.jobs


class Item(NamedTuple):
    """One job of a batch: its fence (None: not fenced) and its value (result JSON, error)."""

    job_id: str
    worker_id: str | None
    attempt: int | None
    value: str | None


def _literal(status: str) -> sa.ColumnElement[str]:
    """A status written into the statement's text, not a parameter: the planner sees it (as
    a parameter, the generic plan guesses its share of the rows)."""
    assert status.isalpha(), status  # a fixed word of this module, never a caller's value
    return sa.literal_column(f"'{status}'", sa.Text)


def _array(name: str, item_type: Any) -> sa.BindParameter[Any]:
    return sa.bindparam(name, type_=ARRAY(item_type))


_U = sa.func.unnest(_array("_ids", sa.Text), _array("_workers", sa.Text),
                    _array("_attempts", sa.Integer), _array("_vals", sa.Text)).table_valued(
    sa.column("id", sa.Text), sa.column("worker", sa.Text), sa.column("attempt", sa.Integer),
    sa.column("val", sa.Text)).render_derived(name="u")
_NOW = sa.bindparam("_now", type_=t.TZ)


def _move(values: dict[str, Any]) -> sa.Update:
    """``UPDATE jobs ... FROM unnest(items) u`` where status and each item's fence match."""
    return (
        sa.update(j)
        .where(j.c.id == _U.c.id, j.c.status == sa.any_(_array("_statuses", sa.Text)),
               sa.or_(_U.c.worker.is_(None), j.c.worker_id == _U.c.worker),
               sa.or_(_U.c.attempt.is_(None), j.c.attempts == _U.c.attempt))
        .values(**values, version=j.c.version + 1, updated_at=_NOW)
        .returning(j)
    )


_O = sa.func.unnest(_array("_ids", sa.Text)).table_valued(
    sa.column("id", sa.Text), with_ordinality="n").render_derived(name="o")
"""The items' ids with their place in the batch (the order of their events)."""
_EVENT_COLUMNS = ("job_id", "workflow_id", "event", "status", "worker_id", "attempt", "at", "detail")


def _event(moved: Any, order: Any, k: int, event: str, status: Any, worker: Any,
           detail: Any = None) -> sa.Select[Any]:
    """One event per moved job: the columns of ``job_events``, its batch place and ``k``."""
    return sa.select(
        moved.c.id, moved.c.workflow_id, sa.literal(event, sa.Text), status, worker,
        moved.c.attempts, _NOW, sa.cast(detail if detail is not None else sa.null(), JSONB),
        order.c.n.label("n"), sa.literal(k).label("k"),
    ).select_from(moved.join(order, order.c.id == moved.c.id))


def _logged(*events: sa.Select[Any]) -> sa.CTE:
    """``INSERT INTO job_events`` of the events given (each job's in ``k`` order): a CTE."""
    ev = sa.union_all(*events).subquery("ev") if len(events) > 1 else events[0].subquery("ev")
    cols = list(ev.c)
    return sa.insert(t.job_events).from_select(
        list(_EVENT_COLUMNS), sa.select(*cols[:8]).order_by(ev.c.n, ev.c.k)).cte("logged")


def _locked(moved: Any) -> sa.CTE:
    """Lock the moved jobs' workflows, in id order (two batches never deadlock on them)."""
    w = t.workflows
    return (sa.select(w.c.id, w.c.status).where(w.c.id.in_(sa.select(moved.c.workflow_id)))
            .order_by(w.c.id).with_for_update().cte("locked"))


def _by_key(name: str, key: Any, *values: Any) -> Any:
    """The rows of ``key``'s CTE as ONE JSONB object ``{key: [values...]}``, read once: a
    lookup per moved job instead of a join to it. PostgreSQL plans a join of two CTEs from
    their estimated rows, and a data-modifying CTE's estimate is often one row: it chose a
    nested loop, n x n at a batch of n (a completion of 1,000 jobs spent 200 of its 375 ms
    there, 2.5 of 6.5 ms at 100)."""
    agg = sa.func.jsonb_object_agg(key, sa.func.jsonb_build_array(*values)).label("m")
    return sa.select(sa.select(agg).cte(name).c.m).scalar_subquery()


def _get(by_key: Any, key: Any, i: int, type_: Any = sa.Text) -> Any:
    """The ``i``-th value under ``key`` of a :func:`_by_key` object (NULL: no such key)."""
    return sa.cast(by_key.op("->")(key).op("->>")(sa.literal_column(str(i))), type_)


def _ending(values: dict[str, Any], ending: str,
            events: Any) -> sa.Select[Any]:
    """:func:`_move`, the moved jobs' active assignments ended as ``ending``, their events
    (``events(moved, ended)``, ``ended`` a :func:`_by_key` of ``[id, worker, attempt,
    assigned_at]`` by job) logged and their workflows locked: ONE statement.

    Each job row carries its ended assignment's ``_a_id``, ``_a_worker``, ``_a_attempt``,
    ``_a_assigned_at`` (NULL when it had none; at most one is active per job) and its
    workflow's status ``_w_status``, read under the lock."""
    a = t.job_assignments
    moved = _move(values).cte("moved")
    ended = (sa.update(a)
             .where(a.c.status == _literal("active"), a.c.job_id.in_(sa.select(moved.c.id)))
             .values(status=ending, finished_at=_NOW)
             .returning(a.c.id, a.c.job_id, a.c.worker_id, a.c.attempt, a.c.assigned_at)
             ).cte("ended")
    by_job = _by_key("ended_by_job", ended.c.job_id, ended.c.id, ended.c.worker_id,
                     ended.c.attempt, ended.c.assigned_at)
    locked = _locked(moved)
    status = _by_key("locked_by_id", locked.c.id, locked.c.status)
    return (sa.select(*moved.c, _get(by_job, moved.c.id, 0).label("_a_id"),
                      _get(by_job, moved.c.id, 1).label("_a_worker"),
                      _get(by_job, moved.c.id, 2, sa.Integer).label("_a_attempt"),
                      _get(by_job, moved.c.id, 3, t.TZ).label("_a_assigned_at"),
                      _get(status, moved.c.workflow_id, 0).label("_w_status"))
            .add_cte(_logged(*events(moved, by_job))))


def _start_statement() -> sa.Select[Any]:
    moved = _move({"status": "running", "started_at": _NOW}).cte("moved")
    logged = _logged(_event(moved, _O, 1, "started", moved.c.status, moved.c.worker_id))
    return sa.select(*moved.c).add_cte(logged)


_START = _start_statement()
_COMPLETE = _ending({"status": "completed", "finished_at": _NOW,
                     "result": sa.cast(_U.c.val, JSONB(none_as_null=True))}, "completed",
                    lambda m, e: [_event(m, _O, 1, "completed", m.c.status, m.c.worker_id)])


def _fail_events(moved: Any, by_job: Any, waited: Any = None) -> list[sa.Select[Any]]:
    """``failed`` (by the worker whose attempt failed), then ``retried`` when re-queued
    (its detail with ``waited``'s keys too, a JSONB object: the wait of a single failure)."""
    left = sa.func.jsonb_build_object("attempts_left", moved.c.max_attempts - moved.c.attempts)
    failed = _event(moved, _O, 1, "failed", sa.literal("failed", sa.Text),
                    sa.func.coalesce(_get(by_job, moved.c.id, 1), moved.c.worker_id),
                    sa.func.jsonb_build_object("error", moved.c.error))
    retried = _event(moved, _O, 2, "retried", moved.c.status, moved.c.worker_id,
                     left if waited is None else left.op("||")(waited)
                     ).where(moved.c.status == "queued")
    return [failed, retried]


def _fail_statement(single: bool) -> sa.Select[Any]:
    """Fail jobs; ``single``: one job, whose retry's ``run_at`` and wait detail are known."""
    again = sa.and_(sa.bindparam("_retry", type_=sa.Boolean), j.c.attempts < j.c.max_attempts)
    values: dict[str, Any] = {
        "status": sa.case((again, "queued"), else_="failed"),
        "enqueue_seq": sa.case((again, t.enqueue_seq.next_value()), else_=j.c.enqueue_seq),
        "worker_id": sa.case((again, sa.null()), else_=j.c.worker_id),
        "finished_at": sa.case((again, sa.null()), else_=_NOW),
        "error": _U.c.val,
    }
    if not single:
        return _ending(values, "failed", _fail_events)
    values["run_at"] = sa.case((again, sa.bindparam("_run_at", type_=t.TZ)), else_=j.c.run_at)
    waited = sa.bindparam("_waited", type_=JSONB)
    return _ending(values, "failed", lambda m, e: _fail_events(m, e, waited))


_FAIL = _fail_statement(False)
_FAIL_ONE = _fail_statement(True)


class Ended(NamedTuple):
    """What a completion (:func:`claim_complete_release`) or :func:`fail_jobs` did: the job rows, the ended
    assignments, and the status of each workflow of the moved jobs (locked meanwhile)."""

    jobs: list[store.Row]
    ended: list[store.Row]
    workflows: dict[str, str]


def split_ended(rows: Sequence[store.Row], ending: str, now: datetime) -> Ended:
    """The job rows, ended assignment rows and workflow statuses of a moving statement."""
    jobs: list[store.Row] = []
    ended: list[store.Row] = []
    workflows: dict[str, str] = {}
    for r in rows:
        row = dict(r)
        workflows[row["workflow_id"]] = row.pop("_w_status")
        aid, worker, attempt, at = (row.pop(k) for k in ("_a_id", "_a_worker", "_a_attempt",
                                                          "_a_assigned_at"))
        jobs.append(row)
        if aid is not None:
            ended.append({"id": aid, "job_id": row["id"], "worker_id": worker, "status": ending,
                          "attempt": attempt, "assigned_at": at, "finished_at": now})
    return Ended(jobs, ended, workflows)


def _params(items: Sequence[Item], statuses: Sequence[str], now: datetime) -> dict[str, Any]:
    return {"_ids": [i.job_id for i in items], "_workers": [i.worker_id for i in items],
            "_attempts": [i.attempt for i in items], "_vals": [i.value for i in items],
            "_statuses": list(statuses), "_now": now}


def start_jobs(conn: sa.Connection, items: Sequence[Item], statuses: Sequence[str],
               now: datetime) -> list[store.Row]:
    """Mark running the jobs whose status is in ``statuses`` and whose fence matches, and log
    ``started``: ONE statement."""
    return direct.rows(conn, _START, _params(items, statuses, now))


def fail_jobs(conn: sa.Connection, items: Sequence[Item], retry: bool, now: datetime) -> Ended:
    """Fail the matching assigned or running jobs (``value``: the error; with ``retry``, a
    job with attempts left is queued again instead), end their active assignments, log
    ``failed`` (and ``retried``) and lock their workflows: ONE statement."""
    params = _params(items, ["assigned", "running"], now)
    rows = direct.rows(conn, _FAIL, {**params, "_retry": bool(retry)})
    return split_ended(rows, "failed", now)


def fail_job(conn: sa.Connection, item: Item, retry: bool, now: datetime,
             run_at: datetime | None, waited: dict[str, Any]) -> Ended:
    """Fail one assigned or running job as :func:`fail_jobs` does, its retry due at ``run_at``
    (None: at once) and ``waited`` (the wait) added to its ``retried`` event: ONE statement."""
    params = {**_params([item], ["assigned", "running"], now), "_retry": bool(retry),
              "_run_at": run_at, "_waited": waited}
    return split_ended(direct.rows(conn, _FAIL_ONE, params), "failed", now)


_STILL_QUEUED = j.c.status.is_not_distinct_from(_literal("queued"))
"""The claim's status check. Its jobs are found by id; the status only filters. PostgreSQL
cannot search an index with IS NOT DISTINCT FROM (status is never NULL: the same as =), so a
plan made before the table has statistics (a bulk create, autovacuum not yet by) cannot read
every queued job through the status index and filter them by id: the claim statement took
0.8-1.2 ms at 5,000 queued, growing with the queue, and 0.34 ms with its jobs found by id."""


def _claim_statement() -> sa.CompoundSelect[Any]:
    a, w = t.job_assignments, t.workflows
    moved = (
        sa.update(j)
        .where(j.c.id == sa.any_(_array("_ids", sa.Text)), _STILL_QUEUED)
        .values(status=sa.bindparam("_status", type_=sa.Text),
                worker_id=sa.bindparam("_worker", type_=sa.Text), attempts=j.c.attempts + 1,
                started_at=sa.case((sa.bindparam("_start", type_=sa.Boolean), _NOW),
                                   else_=j.c.started_at),
                version=j.c.version + 1, updated_at=_NOW)
        .returning(*j.c)
    ).cte("moved")
    u = sa.func.unnest(_array("_ids", sa.Text), _array("_aids", sa.Text)).table_valued(
        sa.column("id", sa.Text), sa.column("aid", sa.Text), with_ordinality="n"
    ).render_derived(name="u")
    assigned = sa.insert(a).from_select(
        ["id", "job_id", "worker_id", "status", "attempt", "assigned_at"],
        sa.select(u.c.aid, moved.c.id, sa.bindparam("_worker", type_=sa.Text),
                  sa.literal("active", sa.Text), moved.c.attempts, _NOW)
        .select_from(moved.join(u, u.c.id == moved.c.id)),
    ).cte("assigned")
    logged = _logged(
        _event(moved, u, 1, "assigned", sa.literal("assigned", sa.Text), moved.c.worker_id),
        _event(moved, u, 2, "started", moved.c.status, moved.c.worker_id)
        .where(sa.bindparam("_start", type_=sa.Boolean)))
    # A job assigned makes its workflow running, whatever else it holds (lifecycle's rule 3:
    # that job is open and progressing): no roll-up needed, only this update.
    woken = (sa.select(w.c.id).where(w.c.id.in_(sa.select(moved.c.workflow_id)),
                                     w.c.status == sa.any_(sa.literal(["pending", "failed"],
                                                                      ARRAY(sa.Text))))
             .order_by(w.c.id).with_for_update().cte("woken"))
    running = (sa.update(w).where(w.c.id.in_(sa.select(woken.c.id)))
               .values(status="running", version=w.c.version + 1, updated_at=_NOW)
               .returning(*w.c)).cte("running")
    # The job rows, then the workflow rows, each padded with the other's columns as NULLs:
    # a join of the two CTEs was planned as a nested loop (n jobs x the workflows woken).
    return sa.union_all(
        sa.select(*moved.c, *[_none(c).label(f"_w_{c.name}") for c in running.c]),
        sa.select(*[_none(c).label(c.name) for c in moved.c],
                  *[c.label(f"_w_{c.name}") for c in running.c]),
    ).add_cte(assigned, logged)


def _none(column: Any) -> Any:
    return sa.cast(sa.null(), column.type)


_CLAIM = _claim_statement()
_W_COLUMNS = tuple(f"_w_{c.name}" for c in t.workflows.c)


class Claim(NamedTuple):
    """Jobs to claim for a worker: their ids and the ids of their new assignments (in order)."""

    job_ids: Sequence[str]
    assignment_ids: Sequence[str]
    worker_id: str
    start: bool


def _claim_call(claim: Claim, now: datetime) -> direct.Call:
    return _CLAIM, {"_ids": list(claim.job_ids), "_aids": list(claim.assignment_ids),
                    "_worker": claim.worker_id, "_start": claim.start, "_now": now,
                    "_status": "running" if claim.start else "assigned"}


def _claimed(rows: Sequence[dict[str, Any]]) -> tuple[list[store.Row], list[store.Row]]:
    jobs: list[store.Row] = []
    woken: list[store.Row] = []
    for row in rows:
        wf = {c[3:]: row.pop(c) for c in _W_COLUMNS}
        if row["id"] is None:
            woken.append(wf)
        else:
            jobs.append(row)
    return jobs, woken


def claim_jobs(conn: sa.Connection, job_ids: Sequence[str], assignment_ids: Sequence[str],
               worker_id: str, now: datetime, *, start: bool
               ) -> tuple[list[store.Row], list[store.Row]]:
    """Assign (``start``: straight to running) the jobs of ``job_ids`` still queued, insert
    their active assignments (ids from ``assignment_ids``, in the same order), log
    ``assigned`` (and ``started``) and set their pending or failed workflows running: ONE
    statement. Returns the job rows and the workflow rows it changed."""
    stmt, params = _claim_call(Claim(job_ids, assignment_ids, worker_id, start), now)
    return _claimed(direct.dicts(conn, stmt, params))


def _release_statement(*, one: bool) -> sa.Update:
    """The release of the jobs ``_jobs`` completed (``one``: of the one job ``_job``).

    The one-job form takes a scalar: PostgreSQL plans a statement with an array parameter
    for every run (its generic plan expects ten elements, ten times the custom plan's cost,
    so it is never chosen), and that planning measured as long as the release itself; with
    a scalar the generic plan is as cheap as the custom one and is kept after five runs. The
    statuses are in the text for the same reason: as parameters, the generic plan would
    expect a third of the jobs to be pending (the custom plan sees how few are)."""
    dep = j.alias("dep")
    unmet = (sa.select(sa.literal(1)).select_from(dep)
             .where(dep.c.id == sa.any_(j.c.depends_on), dep.c.status != _literal("completed")))
    done = j.alias("done")
    if one:
        job = sa.bindparam("_job", type_=sa.Text)
        same_workflow = j.c.workflow_id == (sa.select(done.c.workflow_id)
                                            .where(done.c.id == job).scalar_subquery())
        depends = j.c.depends_on.overlap(array([sa.cast(job, sa.Text)]))
    else:
        workflows = sa.func.array(sa.select(done.c.workflow_id)
                                  .where(done.c.id == sa.any_(_array("_jobs", sa.Text)))
                                  .scalar_subquery())
        same_workflow = j.c.workflow_id == sa.any_(workflows)
        depends = j.c.depends_on.overlap(_array("_jobs", sa.Text))
    return (
        sa.update(j)
        .where(same_workflow, j.c.status == _literal("pending"), depends, ~sa.exists(unmet))
        .values(status="queued", enqueue_seq=t.enqueue_seq.next_value(),
                version=j.c.version + 1, updated_at=_NOW)
        .returning(j)
    )


_RELEASE = _release_statement(one=False)
_RELEASE_ONE = _release_statement(one=True)


def _release_call(items: Sequence[Item], now: datetime) -> direct.Call:
    if len(items) == 1:
        return _RELEASE_ONE, {"_job": items[0].job_id, "_now": now}
    return _RELEASE, {"_jobs": [i.job_id for i in items], "_now": now}


class Fused(NamedTuple):
    """What :func:`claim_complete_release` did: the claim's job and workflow rows, the
    completion and the jobs released."""

    claimed: list[store.Row]
    woken: list[store.Row]
    ended: Ended
    released: list[store.Row]


def claim_complete_release(conn: sa.Connection, claim: Claim | None, items: Sequence[Item],
                           statuses: Sequence[str], now: datetime) -> Fused:
    """Claim (as :func:`claim_jobs`), complete the matching ``items`` (each with its result;
    their active assignments ended, ``completed`` logged, their workflows locked) and release
    their ready dependents (the pending jobs of their workflows that depend on an item and
    whose dependencies are all completed: an item not completed releases nothing), three
    statements in order, in ONE round trip.

    The release is a later statement than the completion, which locked the workflows: it
    sees every move of them committed before, as when it runs by itself."""
    calls: list[direct.Call] = [(_COMPLETE, _params(items, statuses, now)),
                                _release_call(items, now)]
    if claim is not None:
        calls.insert(0, _claim_call(claim, now))
    out = direct.pipelined(conn, calls)
    claimed, woken = _claimed(out[0]) if claim is not None else ([], [])
    return Fused(claimed, woken, split_ended(out[-2], "completed", now),
                 cast(list[store.Row], out[-1]))
