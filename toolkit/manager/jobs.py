"""Jobs: create and read them, and every status move, built from named steps.

A move is one guarded ``UPDATE`` of the job (with its event row), followed by
the steps its verb names: end the active assignment, release the dependents,
roll the workflow up, count. A move with no step is a single statement that
commits by itself.

Touches the tiers only through :class:`~toolkit.manager.pipeline.Pipeline` and ``store``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import errors, models, retry_policy, validate
from toolkit.manager import idempotency, scheduling
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.models import EntityKind as Kind
from toolkit.models import JobStatus as JS
from toolkit.tiers.postgres import batches as pgb
from toolkit.tiers.postgres import lifecycle, store

_COMPLETABLE = models.values(models.job_sources(JS.COMPLETED))
_EVENT_OF = {JS.QUEUED: "queued", JS.RUNNING: "started", JS.COMPLETED: "completed",
             JS.CANCELLED: "cancelled"}


def job_row(workflow_id: str, spec: Mapping[str, Any], now: datetime, seqs: Any) -> dict[str, Any]:
    """The row of a new job from a validated spec (queued when it has no dependency)."""
    queued = not spec["depends_on"]
    return {
        "id": spec["id"], "workflow_id": workflow_id, "name": spec["name"],
        "status": JS.QUEUED.value if queued else JS.PENDING.value, "priority": spec["priority"],
        "queue": spec["queue"], "payload": spec["payload"], "result": None, "error": None,
        "attempts": 0, "max_attempts": spec["max_attempts"], "worker_id": None,
        "depends_on": list(spec["depends_on"]), "enqueue_seq": next(seqs) if queued else None,
        "created_at": now, "updated_at": now, "started_at": None, "finished_at": None,
        "version": 1, "run_at": spec.get("run_at"), "retry_policy": spec.get("retry"),
    }


def rollup(conn: sa.Connection, workflow_id: str, now: datetime, *,
           unless_requeued: bool = False) -> Mapping[str, Any] | None:
    """Recompute a workflow's status from its jobs; return the new row if it changed.

    Two statements: the row lock first, so that the roll-up's snapshot sees
    every concurrent job move that committed before this one could proceed.
    ``unless_requeued``: the move re-queued an assigned or running job, so a
    running workflow stays running (queued weighs as assigned and running in the
    rules that could end it): the lock only.
    """
    status = lifecycle.lock_workflow(conn, workflow_id)
    if status is None or (unless_requeued and status == models.WorkflowStatus.RUNNING):
        return None
    return lifecycle.rollup_workflow(conn, workflow_id, now)


def attempt_guard(worker_id: str | None, attempt: int | None) -> dict[str, Any] | None:
    """The columns a fenced call must still match (``StaleAttempt`` when they don't)."""
    guard: dict[str, Any] = {}
    if worker_id is not None:
        guard["worker_id"] = validate.identifier("worker_id", worker_id)
    if attempt is not None:
        guard["attempts"] = validate.integer("attempt", attempt, low=1, high=10_000)
    return guard or None


# -- the steps that may follow a move --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Moved:
    """A job row just moved, in the transaction that moved it."""

    row: Mapping[str, Any]
    workflow_locked: bool
    now: datetime


Step = Callable[[sa.Connection, Changes, Moved], None]


def end_assignment(ending: str) -> Step:
    """End the job's active assignment as ``ending`` (completed, cancelled, ...)."""
    def step(conn: sa.Connection, ch: Changes, m: Moved) -> None:
        ch.add_all(Kind.ASSIGNMENT, lifecycle.end_assignments(conn, ending, m.now, job_ids=[m.row["id"]]))
    return step


def queued(ch: Changes, m: Moved, released: Sequence[Mapping[str, Any]]) -> None:
    """The jobs ``m``'s move released: queued, each with its ``queued`` event."""
    ch.add_all(Kind.JOB, released)
    for r in released:
        ch.event("queued", r, m.now, released_by=m.row["id"])


def log_manual_retry(conn: sa.Connection, ch: Changes, m: Moved) -> None:
    """Log a ``retried`` event (``manual: true``) when a job that ran before is re-queued."""
    if m.row["attempts"]:
        ch.event("retried", m.row, m.now, manual=True, max_attempts=m.row["max_attempts"],
                 attempts_left=m.row["max_attempts"] - m.row["attempts"])


def roll_up(conn: sa.Connection, ch: Changes, m: Moved) -> None:
    """Recompute the workflow's status (its row was locked by the move)."""
    if m.workflow_locked:
        ch.add(Kind.WORKFLOW, lifecycle.rollup_workflow(conn, m.row["workflow_id"], m.now))


def count(counter: str) -> Step:
    """Add one to ``counter``."""
    def step(conn: sa.Connection, ch: Changes, m: Moved) -> None:
        ch.counters[counter] += 1
    return step


class _Now:
    """Placeholder for 'the transaction's now' in update values."""


NOW = _Now()


class Jobs:
    """The job verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def create(self, workflow_id: str, name: str, *, priority: int = 0,
               queue: str = "default", payload: Any = None, max_attempts: int = 3,
               depends_on: Sequence[str] = (), job_id: str | None = None,
               idempotency_key: str | None = None, run_at: datetime | None = None,
               delay: float | None = None,
               retry: retry_policy.RetryPolicy | Mapping[str, float] | None = None) -> models.Job:
        """Add a job to a workflow; queued at once unless a dependency is not completed.

        ``run_at`` (an aware datetime) or ``delay`` (seconds) schedules it: it is not
        handed out before then (a dependent released earlier waits for it). ``retry``
        is its own backoff (a ``RetryPolicy`` or a dict of its fields) instead of the
        manager's ``retry_policy``. ``depends_on`` names jobs of the same workflow, by id or by name. With
        ``idempotency_key``, a repeat of the call returns the job the first call
        made and writes nothing; a different request under the key raises
        ``IdempotencyConflict`` (as in ``create_workflow``).
        """
        validate.identifier("workflow_id", workflow_id)
        taken = idempotency.key(idempotency_key)
        timing = {k: v for k, v in (("run_at", run_at), ("delay", delay), ("retry", retry))
                  if v is not None}
        spec = validate.job_specs([{
            "name": name, "priority": priority, "queue": queue, "payload": payload,
            "max_attempts": max_attempts, "id": job_id, **timing,
        }])[0]
        deps = validate.names("depends_on", depends_on)
        now = self.pipe.now()
        digest = idempotency.request_hash(
            idempotency.job_request(workflow_id, spec, deps, job_id)) if taken else None
        replay: idempotency.Rows = []

        def tx(conn: sa.Connection, ch: Changes) -> None:
            if taken and digest:  # first: a replay returns the job whatever its workflow is now
                replay[:] = idempotency.claim(conn, taken, digest, workflow_id, spec["id"], now) or []
                if replay:
                    return
            wf_status, dep_rows = _lock_and_resolve(conn, workflow_id, deps)
            unmet = [r["id"] for r in dep_rows if r["status"] != JS.COMPLETED]
            seqs = iter(store.next_seqs(conn, 0 if unmet else 1))
            row = job_row(workflow_id, {**spec, "depends_on": unmet}, now, seqs)
            row["depends_on"] = [r["id"] for r in dep_rows]
            store.insert(conn, Kind.JOB, row)
            ch.add(Kind.JOB, row)
            if wf_status == models.WorkflowStatus.FAILED:  # new work: it may be running again
                ch.add(Kind.WORKFLOW, lifecycle.rollup_workflow(conn, workflow_id, now))
            ch.event("created", row, now)
            if row["status"] == JS.QUEUED:
                ch.event("queued", row, now)
            ch.counters["jobs_created"] += 1

        written = self.pipe.write("create job", tx)
        return (self.pipe.restore(replay) if replay else written)[0]  # type: ignore[return-value]

    def get(self, job_id: str) -> models.Job | None:
        """Return a job, or None when there is none with that id."""
        return self.pipe.get(Kind.JOB, job_id)  # type: ignore[return-value]

    def find(self, *, workflow_id: str | None = None, status: str | None = None,
             worker_id: str | None = None) -> list[models.Job]:
        """Return the jobs matching every filter given, oldest first."""
        if status is not None:
            status = validate.status("status", status, JS).value
        for field, value in (("workflow_id", workflow_id), ("worker_id", worker_id)):
            if value is not None:
                validate.identifier(field, value)
        return self.pipe.select(Kind.JOB, workflow_id=workflow_id, status=status, worker_id=worker_id)

    def move(self, job_id: str, target: JS, values: Mapping[str, Any],
             steps: Sequence[Step] = (), guard: Mapping[str, Any] | None = None) -> models.Job:
        """Move a job to ``target`` under a status guard, then run ``steps``, in one transaction."""
        validate.identifier("job_id", job_id)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            vals = {k: (now if v is NOW else v) for k, v in values.items()}
            row, wf_status = store.move_job(
                conn, job_id, {"status": target.value, **vals}, statuses_in=models.job_sources(target),
                now=now, event=_EVENT_OF[target], guard=guard, lock_workflow=roll_up in steps)
            if row is None:
                raise self.pipe.refusal(conn, Kind.JOB, job_id, target, guard)
            moved = Moved(row, wf_status is not None, now)
            for step in steps:
                step(conn, ch, moved)
            ch.rows.insert(0, (Kind.JOB, row))

        # A bare move is one statement (the update, its event): it commits by itself.
        return self.pipe.write(f"job -> {target.value}", tx,  # type: ignore[return-value]
                               one_statement=not steps)[0]

    def update_status(self, job_id: str, status: str, *, result: Any = None,
                      error: str | None = None) -> models.Job:
        """Move a job to ``status`` (the same rules as the dedicated methods).

        ``assigned`` needs a worker: use ``assign_job`` or ``dequeue``.
        """
        target = validate.status("status", status, JS)
        if target is JS.QUEUED:
            return self.enqueue(job_id)
        if target is JS.RUNNING:
            return self.start(job_id)
        if target is JS.COMPLETED:
            return self.complete(job_id, result)
        if target is JS.FAILED:
            return self.fail(job_id, error or "failed", retry=False)
        if target is JS.CANCELLED:
            return self.cancel(job_id)
        raise errors.ValidationError("status", status,
                                     "a job is assigned through assign_job() or dequeue()")

    def enqueue(self, job_id: str, *, run_at: datetime | None = None,
                delay: float | None = None) -> models.Job:
        """Queue a pending or failed job (pushed to its queue, or scheduled).

        ``run_at`` (an aware datetime) or ``delay`` (seconds) schedules it; without
        either it may run at once (a schedule it had is cleared).

        A manual re-queue never runs a job past its budget: a job that used up
        its attempts is granted one more (``max_attempts`` becomes
        ``attempts + 1``), a job with attempts left keeps its budget. A re-queue
        of a job that ran before is logged as a ``retried`` event with
        ``manual: true``, its ``max_attempts`` and ``attempts_left``.
        """
        due = scheduling.when(run_at, delay, self.pipe.now())
        return self.move(job_id, JS.QUEUED, {"enqueue": True, "worker_id": None,
                                             "finished_at": None, "run_at": due,
                                             "max_attempts": store.ONE_MORE_ATTEMPT},
                         steps=[log_manual_retry, roll_up])

    def start(self, job_id: str, *, worker_id: str | None = None,
              attempt: int | None = None) -> models.Job:
        """Mark an assigned job running.

        With ``worker_id`` and/or ``attempt`` (what the worker got from
        ``dequeue``), a worker whose attempt was reclaimed meanwhile is
        refused with :class:`~toolkit.errors.StaleAttempt`.
        """
        # No roll-up: assigned and running weigh the same in it, so it cannot change.
        return self.move(job_id, JS.RUNNING, {"started_at": NOW},
                         guard=attempt_guard(worker_id, attempt))

    def complete(self, job_id: str, result: Any = None, *, worker_id: str | None = None,
                 attempt: int | None = None) -> models.Job:
        """Complete a running job, queue its ready dependents and roll the workflow up.

        ``worker_id``/``attempt`` fence the call to one attempt, as in ``start_job``:
        a stale attempt's result never overwrites the current attempt's.
        """
        validate.identifier("job_id", job_id)
        result = validate.json_value("result", result)
        guard = attempt_guard(worker_id, attempt) or {}
        item = pgb.Item(job_id, guard.get("worker_id"), guard.get("attempts"),
                        None if result is None else json.dumps(result))

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            # One round trip (with the BEGIN): the move, the assignment ended, the event, the
            # workflow locked; then the dependents it released, in a statement of their own.
            fused = pgb.claim_complete_release(conn, None, [item], _COMPLETABLE, now)
            rows, ended, _ = fused.ended
            if not rows:
                raise self.pipe.refusal(conn, Kind.JOB, job_id, JS.COMPLETED, guard)
            ch.rows.insert(0, (Kind.JOB, rows[0]))
            ch.add_all(Kind.ASSIGNMENT, ended)
            moved = Moved(rows[0], True, now)
            queued(ch, moved, fused.released)
            roll_up(conn, ch, moved)
            ch.counters["jobs_completed"] += 1

        return self.pipe.write("job -> completed", tx, opens=True)[0]  # type: ignore[return-value]

    def cancel(self, job_id: str) -> models.Job:
        """Cancel a job that is not final."""
        return self.move(job_id, JS.CANCELLED, {"finished_at": NOW},
                         steps=[end_assignment("cancelled"), roll_up, count("jobs_cancelled")])

    def fail(self, job_id: str, error: str, *, retry: bool = True, worker_id: str | None = None,
             attempt: int | None = None, retry_in: float | None = None) -> models.Job:
        """Fail an assigned or running job; re-queue it while attempts remain (when ``retry``).

        The retry waits: ``retry_in`` seconds when given (0: at once), else the
        job's own ``retry`` policy, else the manager's ``retry_policy`` (by default
        exponential backoff from 1 s, capped at 300 s, ±10 % jitter); its ``run_at``
        says when. A policy function that answers anything but a number of seconds
        in ``[0, 366 days]`` raises ``ValidationError`` and nothing is written.
        ``worker_id``/``attempt`` fence the call to one attempt, as in ``start_job``.
        """
        validate.identifier("job_id", job_id)
        error = validate.text("error", error)
        guard = attempt_guard(worker_id, attempt)
        item = pgb.Item(job_id, (guard or {}).get("worker_id"), (guard or {}).get("attempts"), error)
        wait = scheduling.retry_in_seconds(retry_in)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            locked = lifecycle.failing_job(conn, job_id) if retry else None
            due = (scheduling.retry_at(locked, self.pipe.retry_policy, wait, now)
                   if locked and locked["attempts"] < locked["max_attempts"] else None)
            # One statement: the move, the assignment ended, the events, the workflow locked.
            rows, ended, statuses = pgb.fail_job(conn, item, bool(retry), now, due,
                                                 scheduling.retry_detail({"run_at": due}, now))
            if not rows:
                raise self.pipe.refusal(conn, Kind.JOB, job_id, JS.FAILED, guard)
            row = rows[0]
            ch.rows.insert(0, (Kind.JOB, row))
            ch.add_all(Kind.ASSIGNMENT, ended)
            requeued = row["status"] == JS.QUEUED
            # A re-queue leaves a running workflow running (see ``rollup``): no roll-up then.
            if not (requeued and statuses.get(row["workflow_id"]) == models.WorkflowStatus.RUNNING):
                ch.add(Kind.WORKFLOW, lifecycle.rollup_workflow(conn, row["workflow_id"], now))
            ch.counters["jobs_failed"] += 1
            if requeued:
                ch.counters["jobs_retried"] += 1

        return self.pipe.write("fail job", tx, opens=True)[0]  # type: ignore[return-value]


def _lock_and_resolve(conn: sa.Connection, workflow_id: str, deps: Sequence[str]
                      ) -> tuple[str, list[Mapping[str, Any]]]:
    """Lock the workflow of a new job; return its status and the dependencies (by id or name)."""
    wf_status = lifecycle.lock_workflow(conn, workflow_id)
    if wf_status is None:
        raise errors.NotFound(Kind.WORKFLOW, workflow_id)
    if wf_status in (models.WorkflowStatus.CANCELLED, models.WorkflowStatus.COMPLETED):
        raise errors.ValidationError("workflow_id", workflow_id, f"the workflow is {wf_status}")
    dep_rows = lifecycle.resolve_jobs(conn, workflow_id, deps)
    if len(dep_rows) != len(deps):
        found = {r["id"] for r in dep_rows} | {r["name"] for r in dep_rows}
        missing = [d for d in deps if d not in found]
        raise errors.ValidationError("depends_on", missing, "no such job in the workflow")
    return wf_status, dep_rows
