"""Operator verbs: change jobs by hand during an incident, with a record of who and why.

Every change is a guarded write through the pipeline and logs an event that
names the actor, the reason and each value before and after. Waiting jobs only
(pending or queued): a job a worker holds is the worker's.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import errors, models, validate
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.models import EntityKind as Kind
from toolkit.models import JobStatus as JS
from toolkit.tiers.postgres import lifecycle, store

EDITABLE = (JS.PENDING, JS.QUEUED)
"""Statuses :meth:`Operations.edit_job` may change (a job no worker holds yet)."""


def _who(reason: str | None, actor: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if actor is not None:
        out["actor"] = validate.identifier("actor", actor)
    if reason is not None:
        out["reason"] = validate.text("reason", reason, max_length=1000)
    return out


class Operations:
    """The operator verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def edit_job(self, job_id: str, *, priority: int | None = None, queue: str | None = None,
                 run_at: datetime | None = None, delay: float | None = None,
                 reason: str | None = None, actor: str | None = None) -> models.Job:
        """Change the priority, queue and/or due time of a pending or queued job.

        ``run_at`` (an aware datetime) or ``delay`` (seconds from now) sets when the
        job may run, as for ``enqueue``; ``delay=0`` makes a scheduled job due now.
        A queued job moves in Redis with its row, in one MULTI after the commit: out
        of its old queue and due-time set, into its new queue (keeping its place
        among jobs of its priority by its enqueue order) or, when it is due later,
        into the new queue's due-time set. The change is an ``edited`` event whose
        detail holds ``actor``, ``reason`` and ``[before, after]`` of each value
        that changed (times in ISO 8601).

        Raises
        ------
        ValidationError
            Nothing to change, or a bad value (nothing is written).
        NotFound
            No such job.
        InvalidTransition
            The job is not pending or queued any more (a worker has it, or it ended).
        """
        validate.identifier("job_id", job_id)
        values = _values(priority, queue, (run_at, delay), self.pipe.now())
        who = _who(reason, actor)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            before = lifecycle.lock_job(conn, job_id)
            if before is None:
                raise errors.NotFound(Kind.JOB, job_id)
            if before["status"] not in EDITABLE:
                raise errors.InvalidTransition(Kind.JOB, job_id, before["status"], "edited")
            now = self.pipe.now()
            row = store.update(conn, Kind.JOB, job_id, values, now=now)
            assert row is not None  # locked above, in a status that stays
            ch.add(Kind.JOB, row)
            if row["status"] == JS.QUEUED and (row["queue"] != before["queue"] or "run_at" in values):
                # Out of the old queue and due-time set; the pipeline pushes or schedules it anew.
                ch.unqueue.append((job_id, before["queue"]))
            ch.event("edited", row, now, **who, **_changed(values, before, row))

        return self.pipe.write("edit job", tx)[0]  # type: ignore[return-value]


def _values(priority: Any, queue: Any, due: tuple[Any, Any], now: datetime) -> dict[str, Any]:
    """The checked columns an edit sets (``ValidationError`` for a bad one or for none)."""
    values: dict[str, Any] = {}
    if priority is not None:
        values["priority"] = validate.integer("priority", priority, low=-validate.PRIORITY_LIMIT,
                                              high=validate.PRIORITY_LIMIT)
    if queue is not None:
        values["queue"] = validate.identifier("queue", queue)
    if due != (None, None):
        values["run_at"] = validate.run_at(due[0], due[1], now)
    if not values:
        raise errors.ValidationError("edit", None,
                                     "give a priority, a queue or a due time (run_at or delay) to change")
    return values


def _changed(values: dict[str, Any], before: Any, row: Any) -> dict[str, Any]:
    """``{column: [before, after]}`` of the columns that changed (times as ISO 8601)."""
    def shown(v: Any) -> Any:
        return v.isoformat() if isinstance(v, datetime) else v
    return {k: [shown(before[k]), shown(row[k])] for k in values if before[k] != row[k]}
