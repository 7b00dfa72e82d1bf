"""Bulk operator actions over a filter, in two steps: plan (no writes), then apply.

``ActionPlan``, ``ActionResult``, ``plan_on`` and ``plan_read_only`` are re-exported
from :mod:`toolkit.manager.planning`.

:meth:`Bulk.plan` reads the jobs a filter names and the verb may change, and
returns an :class:`~toolkit.manager.planning.ActionPlan` (see that module): the jobs
as a DataFrame (with the version each one had), counts by status and queue, and
the filter. It writes nothing.

:meth:`Bulk.apply` changes the planned jobs in batches, one transaction each
through the pipeline: each job only while it is still at its planned version (a
job a worker finished meanwhile is skipped and reported, never overwritten).
Each changed job gets an event whose detail names the action id, the actor and
the reason; each action is a row of ``operator_actions`` whose ``applied`` count
is written in the same transaction as each batch, so it is true after a crash.
Applying the same plan again finishes the rest: a job whose event names this
action is recognised as done (and its Redis state brought up to date).

Touches the tiers only through :class:`~toolkit.manager.pipeline.Pipeline`,
``store``, ``lifecycle`` and ``tiers/postgres/bulk.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import errors, validate
from toolkit.manager.behind import WriteBehind
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.manager.planning import VERBS, ActionPlan, ActionResult, plan_on, plan_read_only
from toolkit.models import EntityKind as Kind
from toolkit.models import JobStatus as JS
from toolkit.models import WorkflowStatus as WS
from toolkit.tiers.postgres import bulk as pg_bulk
from toolkit.tiers.postgres import lifecycle, store

EVENT_OF = {"requeue": "queued", "cancel": "cancelled", "fail": "failed", "delete": "deleted",
            "set_priority": "edited", "move_queue": "edited"}
"""Verb -> the event each changed job gets (its detail names the action)."""
COUNTER_OF = {"cancel": "jobs_cancelled", "fail": "jobs_failed"}
STATUS_KEPT = frozenset({"set_priority", "move_queue"})
"""Verbs that change no job's status, so no workflow's: no roll-up at all."""
PROGRESS_FROM = 5_000
"""Planned jobs from which :meth:`Bulk.apply` shows a progress bar by default."""


class Bulk:
    """The bulk operator verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def plan(self, verb: str, *, workflow_id: str | None = None, status: str | Sequence[str] | None = None,
             queue: str | None = None, name: str | None = None, worker_id: str | None = None,
             error_contains: str | None = None, older_than: float | None = None,
             since: float | None = None, payload: Any = None, all: bool = False,
             value: Any = None, reason: str | None = None, actor: str | None = None) -> ActionPlan:
        """Plan a bulk action: which jobs it would change. Writes nothing.

        ``verb`` is ``requeue`` (failed jobs, as ``enqueue`` does), ``cancel``,
        ``fail`` (assigned or running jobs; the error is ``reason``), ``delete``
        (finished or failed jobs no live job depends on), ``set_priority`` or
        ``move_queue`` (pending or queued jobs; ``value`` is the new priority or
        queue). The filters combine with AND: ``workflow_id``, ``status`` (one or
        a list), ``queue``, ``name`` (a glob: ``*`` and ``?``; every other
        character, ``%`` and ``_`` included, matches itself), ``worker_id``,
        ``error_contains`` (case-insensitive, literal), ``older_than`` / ``since``
        (seconds since the job last changed), ``payload`` (a JSON object the
        payload contains). No filter means nothing unless ``all=True``; a delete
        always needs one.

        Returns
        -------
        ActionPlan
            ``frame`` (the jobs, with their versions), ``counts`` and the filter;
            pass it to ``apply_action``.

        Raises
        ------
        ValidationError
            A bad verb, filter or value (nothing is read or written).
        """
        return plan_on(self.pipe.db, verb, self.pipe.now(), workflow_id=workflow_id,
                       status=status, queue=queue, name=name, worker_id=worker_id,
                       error_contains=error_contains, older_than=older_than, since=since,
                       payload=payload, all=all, value=value, reason=reason, actor=actor)

    def apply(self, plan: ActionPlan, *, batch: int = 1000, progress: bool | None = None) -> ActionResult:
        """Apply a plan in batches of ``batch`` jobs, each job guarded by its planned version.

        A job changed since the plan is skipped and reported (``skipped_ids``),
        never overwritten. Applying the same plan again (after an interruption)
        changes only what is left: jobs this action already changed are counted
        in ``already``. ``progress`` shows a bar (default: from 5,000 jobs).

        Raises
        ------
        ValidationError
            ``plan`` is not an ActionPlan, or a bad ``batch``.
        """
        if not isinstance(plan, ActionPlan):
            raise errors.ValidationError("plan", type(plan).__name__, "must come from plan_action()")
        size = validate.integer("batch", batch, low=1, high=10_000)
        ids = [str(i) for i in plan.frame.index]
        versions = [int(v) for v in plan.frame["version"]]
        queues = dict(zip(ids, plan.frame["queue"].astype(str), strict=True))
        self.pipe.write(f"start {plan.verb}", lambda conn, ch: pg_bulk.start_action(
            conn, _record(plan), self.pipe.now()))
        applied = already = 0
        skipped: list[str] = []
        with _bar(len(ids), plan.verb, progress) as bar, WriteBehind(self.pipe) as behind:
            for start in range(0, len(ids), size):
                n, done, passed = self._batch(behind, plan, ids[start:start + size],
                                              versions[start:start + size], queues)
                applied, already = applied + n, already + len(done)
                skipped += passed
                bar.update(min(size, len(ids) - start))
        self.pipe.write(f"finish {plan.verb}", lambda conn, ch: _finish(conn, plan.id, self.pipe.now()))
        return ActionResult(plan.id, len(ids), applied, already, len(skipped), tuple(skipped))

    def _batch(self, behind: WriteBehind, plan: ActionPlan, ids: list[str], versions: list[int],
               queues: Mapping[str, str]) -> tuple[int, list[str], list[str]]:
        """One batch in one transaction: changed now, changed by this action before, skipped.

        Its Redis and memory update runs while the next batch's statements do (``behind``).
        """
        out: dict[str, list[str]] = {"changed": [], "done": [], "skipped": []}
        holder: list[Changes] = []

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            holder[:] = [Changes(action=f"resync {plan.verb}")]
            changed = _change(conn, ch, plan, ids, versions, now)
            if ch.deleted:  # a fast start finds a delete only by this note (made before COMMIT)
                self.pipe.note_deleting(ch.deleted)
            for row in changed:
                if plan.verb != "delete" and row["queue"] != queues[row["id"]]:
                    ch.unqueue.append((row["id"], queues[row["id"]]))
            out["changed"] = [r["id"] for r in changed]
            touched = set(out["changed"])
            rest = [i for i in ids if i not in touched]
            done = pg_bulk.changed_by(conn, rest, plan.id) if rest else set()
            out["done"] = [i for i in rest if i in done]
            out["skipped"] = [i for i in rest if i not in done]
            _resync(conn, holder[0], out["done"], queues, plan.id)
            pg_bulk.count_action(conn, plan.id, len(changed), len(out["skipped"]), now)

        behind.write(f"bulk {plan.verb}", tx)
        resync = holder[0]
        if resync.rows or resync.deleted:
            behind.wait()  # a resumed apply's catch-up: after this batch's update
            queued = sum(1 for k, r in resync.rows if k == Kind.JOB and r["status"] == JS.QUEUED)
            resync.counters["jobs_queued"] -= queued  # not queued again: Redis is only caught up
            with self.pipe.watermark.pending():
                self.pipe.apply(resync)
        return len(out["changed"]), out["done"], out["skipped"]


def _record(plan: ActionPlan) -> dict[str, Any]:
    return {"id": plan.id, "verb": plan.verb, "actor": plan.actor, "reason": plan.reason,
            "value": plan.value, "filter": dict(plan.filter), "planned": len(plan.frame)}


def _finish(conn: sa.Connection, action_id: str, now: datetime) -> None:
    pg_bulk.finish_action(conn, action_id, now)


def _change(conn: sa.Connection, ch: Changes, plan: ActionPlan, ids: list[str], versions: list[int],
            now: datetime) -> list[store.Row]:
    """Change the batch's jobs still at their planned version; log, end, roll up, count."""
    detail = {"action_id": plan.id, "actor": plan.actor, "reason": plan.reason}
    held: dict[str, list[str]] = {}  # a deleted job's assignments, named in its event
    if plan.verb == "delete":
        rows, gone = pg_bulk.delete_batch(conn, ids, versions, VERBS["delete"])
        ch.deleted += [(Kind.JOB, r["id"]) for r in rows] + [(Kind.ASSIGNMENT, a) for a, _ in gone]
        ch.unqueue += [(r["id"], r["queue"]) for r in rows]
        for a, job_id in gone:  # so a resumed apply can drop their copies
            held.setdefault(job_id, []).append(a)
    else:
        values = pg_bulk.values_for(plan.verb, plan.value, plan.reason, now)
        rows = pg_bulk.update_batch(conn, ids, versions, VERBS[plan.verb], values,
                                    _event_log(plan, detail, now))
        ch.add_all(Kind.JOB, rows)
    if plan.verb in ("cancel", "fail") and rows:
        ch.add_all(Kind.ASSIGNMENT, lifecycle.end_assignments(
            conn, "cancelled" if plan.verb == "cancel" else "failed", now,
            job_ids=[r["id"] for r in rows]))
    for r in rows if plan.verb == "delete" else ():  # the updates logged theirs in SQL
        ch.event("deleted", r, now, **detail, assignments=held.get(r["id"], []))
    if plan.verb in COUNTER_OF:
        ch.counters[COUNTER_OF[plan.verb]] += len(rows)
    if plan.verb not in STATUS_KEPT:
        for wf in sorted({r["workflow_id"] for r in rows}):
            ch.add(Kind.WORKFLOW, _rollup(conn, plan.verb, wf, now))
    return rows


def _rollup(conn: sa.Connection, verb: str, workflow_id: str, now: datetime) -> store.Row | None:
    """Roll a workflow up after a batch, unless the verb cannot change its status.

    A requeue adds a queued job, so a ``running`` workflow stays ``running`` (it cannot
    complete with an open job, nor fail with one that can progress): its roll-up
    statement is skipped once the row lock shows the status.
    """
    status = lifecycle.lock_workflow(conn, workflow_id)  # as manager.jobs.rollup: lock, then roll up
    if status is None or (verb == "requeue" and status == WS.RUNNING):
        return None
    return lifecycle.rollup_workflow(conn, workflow_id, now)


def _event_log(plan: ActionPlan, detail: Mapping[str, Any], now: datetime) -> pg_bulk.EventLog:
    """The events of an updating verb: its own (naming the action), and ``retried`` for a
    requeued job that had run."""
    extra = {"value": plan.value} if plan.value is not None else {}
    events = [(EVENT_OF[plan.verb], {**detail, **extra}, False)]
    if plan.verb == "requeue":
        events.append(("retried", {"manual": True, **detail, **extra}, True))
    return pg_bulk.EventLog(now, events)


def _resync(conn: sa.Connection, ch: Changes, done: list[str], queues: Mapping[str, str],
            action_id: str) -> None:
    """Bring Redis up to the jobs this action changed in an earlier, interrupted apply."""
    if not done:
        return
    rows = {r["id"]: r for r in store.get_many(conn, Kind.JOB, done)}
    gone = [i for i in done if i not in rows]
    if gone:
        ch.deleted += [(Kind.ASSIGNMENT, a) for a in pg_bulk.deleted_assignments(conn, gone, action_id)]
    for job_id in done:
        row = rows.get(job_id)
        if row is None:
            ch.deleted.append((Kind.JOB, job_id))
            ch.unqueue.append((job_id, queues[job_id]))
            continue
        ch.add(Kind.JOB, row)
        if row["status"] != JS.QUEUED or row["queue"] != queues[job_id]:
            ch.unqueue.append((job_id, queues[job_id]))


class _NoBar:
    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None


def _bar(total: int, verb: str, progress: bool | None) -> Any:
    """A tqdm bar over ``total`` jobs when asked (or from :data:`PROGRESS_FROM` by default)."""
    show = total >= PROGRESS_FROM if progress is None else bool(progress)
    if not show:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=verb, unit="job", leave=False)


__all__ = ["ActionPlan", "ActionResult", "Bulk", "plan_on", "plan_read_only"]
