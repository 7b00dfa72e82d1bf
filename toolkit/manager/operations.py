"""Operator verbs: change jobs by hand during an incident, with a record of who and why.

Every change is a guarded write through the pipeline and logs an event that
names the actor, the reason and each value before and after. Waiting jobs only
(pending or queued): a job a worker holds is the worker's.
"""

from __future__ import annotations

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
                 reason: str | None = None, actor: str | None = None) -> models.Job:
        """Change the priority and/or queue of a pending or queued job.

        A queued job moves in Redis with its row (one MULTI: out of the old
        queue, into the new one, keeping its place among jobs of its new
        priority by its enqueue order). The change is an ``edited`` event whose
        detail holds ``actor``, ``reason`` and ``[before, after]`` of each value.

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
        values: dict[str, Any] = {}
        if priority is not None:
            values["priority"] = validate.integer("priority", priority, low=-validate.PRIORITY_LIMIT,
                                                  high=validate.PRIORITY_LIMIT)
        if queue is not None:
            values["queue"] = validate.identifier("queue", queue)
        if not values:
            raise errors.ValidationError("edit", None, "give a priority or a queue to change")
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
            if row["status"] == JS.QUEUED and row["queue"] != before["queue"]:
                ch.unqueue.append((job_id, before["queue"]))
            detail: dict[str, Any] = {k: [before[k], row[k]] for k in values if before[k] != row[k]}
            ch.event("edited", row, now, **who, **detail)

        return self.pipe.write("edit job", tx)[0]  # type: ignore[return-value]
