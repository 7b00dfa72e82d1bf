"""The statements of bulk operator actions: select jobs by a filter, change a batch of them
under per-job version guards, recognise the jobs an action already changed, and keep the
action's record (``operator_actions``, migration 0008).

SQLAlchemy Core with bound parameters only: a name pattern or an error text is a bound
value whose ``LIKE`` wildcards the caller escaped, a payload filter is a bound JSONB
value. Every function takes an open connection, so the caller decides the transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB

from toolkit import models
from toolkit.tiers.postgres import store
from toolkit.tiers.postgres import tables as t

PLAN_COLUMNS = ("id", "workflow_id", "name", "status", "queue", "priority", "version", "attempts",
                "worker_id", "error", "updated_at")
"""The job columns a plan holds (its frame's columns, ``id`` as the index)."""


def like_literal(text: str) -> str:
    r"""``text`` with ``\``, ``%`` and ``_`` escaped: a ``LIKE`` pattern matching only itself."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def glob_to_like(pattern: str) -> str:
    """A glob (``*`` any run, ``?`` one character, everything else literal) as a LIKE pattern."""
    return "".join("%" if c == "*" else "_" if c == "?" else like_literal(c) for c in pattern)


def where(f: Mapping[str, Any], now: datetime) -> list[sa.ColumnElement[bool]]:
    """The conditions of a validated filter (keys as in ``manager.bulk.FILTER_KEYS``)."""
    j = t.jobs
    out: list[sa.ColumnElement[bool]] = []
    for column in ("workflow_id", "queue", "worker_id"):
        if f.get(column) is not None:
            out.append(j.c[column] == f[column])
    if f.get("status"):
        out.append(j.c.status == sa.any_(sa.bindparam(None, list(f["status"]), type_=ARRAY(sa.Text))))
    if f.get("name") is not None:
        out.append(j.c.name.like(glob_to_like(f["name"]), escape="\\"))
    if f.get("error_contains") is not None:
        out.append(j.c.error.ilike("%" + like_literal(f["error_contains"]) + "%", escape="\\"))
    if f.get("older_than") is not None:
        out.append(j.c.updated_at < now - timedelta(seconds=f["older_than"]))
    if f.get("since") is not None:
        out.append(j.c.updated_at >= now - timedelta(seconds=f["since"]))
    if f.get("payload") is not None:
        out.append(j.c.payload.op("@>")(sa.bindparam(None, f["payload"], type_=JSONB)))
    return out


def _needed() -> sa.Exists:
    """A live job of the same workflow depends on this one (it must not be deleted)."""
    dep = t.jobs.alias("dependent")
    return sa.exists().where(dep.c.workflow_id == t.jobs.c.workflow_id,
                             t.jobs.c.id == sa.any_(dep.c.depends_on),
                             dep.c.status.not_in(models.values(models.FINAL_JOB_STATUSES)))


def select_jobs(conn: sa.Connection, conditions: Sequence[sa.ColumnElement[bool]],
                statuses: Sequence[str], *, deletable: bool = False) -> list[store.Row]:
    """The :data:`PLAN_COLUMNS` of the jobs matching ``conditions`` in ``statuses``, by workflow
    then id: an apply's batch then touches one or two workflows and rolls up only those."""
    j = t.jobs
    stmt = sa.select(*[j.c[c] for c in PLAN_COLUMNS]).where(
        *conditions, j.c.status == sa.any_(sa.bindparam(None, list(statuses), type_=ARRAY(sa.Text))))
    if deletable:
        stmt = stmt.where(~_needed())
    return store.all_rows(conn.execute(stmt.order_by(j.c.workflow_id, j.c.id)))


def _planned(ids: Sequence[str], versions: Sequence[int]) -> Any:
    """``unnest(:ids, :versions) AS planned(id, version)``: the batch and its planned versions."""
    return (sa.func.unnest(sa.bindparam(None, list(ids), type_=ARRAY(sa.Text)),
                           sa.bindparam(None, list(versions), type_=ARRAY(sa.BigInteger)))
            .table_valued(sa.column("id", sa.Text), sa.column("version", sa.BigInteger))
            .render_derived(name="planned"))


def update_batch(conn: sa.Connection, ids: Sequence[str], versions: Sequence[int],
                 statuses: Sequence[str], values: Mapping[str, Any], log: EventLog) -> list[store.Row]:
    """Update each job of the batch still at its planned version and in ``statuses``, and log
    its events in the same statement.

    ``values`` may use the markers of :func:`values_for`. Bumps the version; returns
    the changed rows (a job that moved since the plan is left alone and not returned).
    One round trip: the job events of ``log`` are inserted by a data-modifying CTE
    over the changed rows, so no event row is built or sent from Python.
    """
    j, p = t.jobs, _planned(ids, versions)
    moved = (sa.update(j).where(j.c.id == p.c.id, j.c.version == p.c.version,
                                j.c.status == sa.any_(sa.bindparam(None, list(statuses),
                                                                   type_=ARRAY(sa.Text))))
             .values(**values, version=j.c.version + 1).returning(*j.c).cte("moved"))
    logged = sa.insert(t.job_events).from_select(
        ["job_id", "workflow_id", "event", "status", "worker_id", "attempt", "at", "detail"],
        sa.union_all(*[_event_rows(moved, e, log.at) for e in log.events])).cte("logged")
    stmt = sa.select(moved).add_cte(logged) if log.events else sa.select(moved)
    return store.all_rows(conn.execute(stmt))


class EventLog:
    """The events each job a bulk batch changes gets: ``(event, detail, retried)`` triples.

    ``retried``: only jobs that had run (``attempts > 0``), with ``attempts_left`` added to
    the detail; the rest: every changed job. ``at`` is the time of every event.
    """

    def __init__(self, at: datetime, events: Sequence[tuple[str, Mapping[str, Any], bool]]) -> None:
        self.at, self.events = at, list(events)


def _event_rows(moved: Any, event: tuple[str, Mapping[str, Any], bool], at: datetime
                ) -> sa.Select[Any]:
    name, detail, retried = event
    body: Any = sa.bindparam(None, dict(detail), type_=JSONB)
    if retried:
        body = body.op("||")(sa.func.jsonb_build_object(
            "attempts_left", moved.c.max_attempts - moved.c.attempts))
    stmt = sa.select(moved.c.id, moved.c.workflow_id, sa.literal(name, sa.Text), moved.c.status,
                     moved.c.worker_id, moved.c.attempts, sa.bindparam(None, at, type_=t.TZ), body)
    return stmt.where(moved.c.attempts > 0) if retried else stmt


def values_for(verb: str, value: Any, reason: str | None, now: datetime) -> dict[str, Any]:
    """The SET of each updating verb (``delete`` has none)."""
    j = t.jobs
    if verb == "requeue":  # what enqueue() does: a job out of attempts is granted one more
        return {"status": "queued", "enqueue_seq": t.enqueue_seq.next_value(), "worker_id": None,
                "finished_at": None, "updated_at": now, "run_at": None,  # at once, as enqueue()
                "max_attempts": sa.func.greatest(j.c.max_attempts, j.c.attempts + 1)}
    if verb == "cancel":
        return {"status": "cancelled", "finished_at": now, "updated_at": now}
    if verb == "fail":
        return {"status": "failed", "finished_at": now, "updated_at": now,
                "error": reason or "failed by an operator"}
    if verb == "set_priority":
        return {"priority": value, "updated_at": now}
    if verb == "move_queue":
        return {"queue": value, "updated_at": now}
    raise AssertionError(f"no update for verb {verb!r}")


def delete_batch(conn: sa.Connection, ids: Sequence[str], versions: Sequence[int],
                 statuses: Sequence[str]) -> tuple[list[store.Row], list[tuple[str, str]]]:
    """Delete each job of the batch still at its planned version, in ``statuses`` and needed by
    no live job; return the deleted rows and ``(assignment id, job id)`` of their assignments
    (gone by cascade)."""
    j, a, p = t.jobs, t.job_assignments, _planned(ids, versions)
    held = [(r[0], r[1]) for r in conn.execute(
        sa.select(a.c.id, a.c.job_id).where(store.any_of(a.c.job_id, ids)))]
    stmt = (sa.delete(j).where(j.c.id == p.c.id, j.c.version == p.c.version, ~_needed(),
                               j.c.status == sa.any_(sa.bindparam(None, list(statuses),
                                                                  type_=ARRAY(sa.Text))))
            .returning(j))
    rows = store.all_rows(conn.execute(stmt))
    deleted = {r["id"] for r in rows}
    gone = [(aid, job_id) for aid, job_id in held if job_id in deleted]
    return rows, gone


def changed_by(conn: sa.Connection, ids: Sequence[str], action_id: str) -> set[str]:
    """Which of ``ids`` have an event naming ``action_id`` (this action changed them)."""
    e = t.job_events
    stmt = (sa.select(e.c.job_id).distinct()
            .where(store.any_of(e.c.job_id, ids), e.c.detail["action_id"].astext == action_id))
    return {r[0] for r in conn.execute(stmt)}


def deleted_assignments(conn: sa.Connection, ids: Sequence[str], action_id: str) -> list[str]:
    """The assignment ids that ``deleted`` events of ``action_id`` name for ``ids``."""
    e = t.job_events
    names = sa.func.jsonb_array_elements_text(e.c.detail["assignments"]).table_valued("value")
    stmt = (sa.select(names.c.value).select_from(e).join(names, sa.true())
            .where(store.any_of(e.c.job_id, ids), e.c.event == "deleted",
                   e.c.detail["action_id"].astext == action_id))
    return [r[0] for r in conn.execute(stmt)]


# -- the action's record ---------------------------------------------------------------------

def start_action(conn: sa.Connection, row: Mapping[str, Any], now: datetime) -> None:
    """Record an action (or, applied again, mark it applying with ``skipped`` counted afresh)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    a = t.operator_actions
    stmt = pg_insert(a).values(**row, status="applying", applied=0, skipped=0, created_at=now,
                               updated_at=now, finished_at=None)
    conn.execute(stmt.on_conflict_do_update(
        index_elements=[a.c.id],
        set_={"status": "applying", "skipped": 0, "updated_at": now, "finished_at": None}))


def count_action(conn: sa.Connection, action_id: str, applied: int, skipped: int,
                 now: datetime) -> None:
    """Add a batch's counts to the action (in the batch's transaction)."""
    a = t.operator_actions
    conn.execute(sa.update(a).where(a.c.id == action_id).values(
        applied=a.c.applied + applied, skipped=a.c.skipped + skipped, updated_at=now))


def finish_action(conn: sa.Connection, action_id: str, now: datetime) -> store.Row | None:
    """Mark the action finished; return its row."""
    a = t.operator_actions
    return store.one_row(conn.execute(
        sa.update(a).where(a.c.id == action_id)
        .values(status="finished", finished_at=now, updated_at=now).returning(a)))
