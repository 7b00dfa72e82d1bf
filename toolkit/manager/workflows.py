"""Workflows: create (with their jobs, in one transaction), read, move, cancel, delete; the roll-up.

Touches the tiers only through :class:`~toolkit.manager.pipeline.Pipeline` and
``store``. Uses ``jobs.job_row`` to build the rows of a new workflow's jobs, and
``idempotency`` for a create under an idempotency key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import sqlalchemy as sa

from toolkit import errors, models, validate
from toolkit.manager import idempotency
from toolkit.manager import jobs as jobs_room
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import lifecycle, store

WS = models.WorkflowStatus


class Workflows:
    """The workflow verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def create(self, name: str, *, jobs: Sequence[Mapping[str, Any]] = (),
               metadata: Mapping[str, Any] | None = None,
               workflow_id: str | None = None,
               idempotency_key: str | None = None) -> models.Workflow:
        """Create a workflow and its jobs in one PostgreSQL transaction.

        Parameters
        ----------
        name
            Workflow name.
        jobs
            Dicts with ``name`` and optional ``priority``, ``queue``, ``payload``,
            ``max_attempts``, ``depends_on`` (names of jobs of this workflow).
            Jobs with no dependency are queued at once, the others are pending.
        metadata
            JSON object stored with the workflow.
        workflow_id
            Id to use; a UUID by default.
        idempotency_key
            When given (1-255 characters, no control characters), a repeat of this
            call with the same key returns the workflow the first call made, as it is
            now, and writes nothing (see ``toolkit.manager.idempotency``). Unique in
            the schema, across workflows and jobs, for as long as its workflow exists.

        Raises
        ------
        ValidationError
            Bad input (named field and value), a duplicate id, an unknown or
            cyclic dependency. Nothing is written.
        IdempotencyConflict
            The key was used by a different request. Nothing is written.
        StorageUnavailable
            PostgreSQL failed; nothing is written. (When the reply to the COMMIT was
            lost, it may have been written: a retry under the same key says which.)
        """
        now = self.pipe.now()
        taken = idempotency.key(idempotency_key)
        if isinstance(jobs, Iterator):
            jobs = list(jobs)  # read twice with a key: validated, then hashed
        wf_row: dict[str, Any] = {
            "id": validate.optional_id("workflow_id", workflow_id),
            "name": validate.identifier("name", name),
            "status": WS.PENDING.value,
            "metadata": validate.json_object("metadata", metadata),
            "created_at": now, "updated_at": now, "version": 1,
        }
        specs = validate.job_specs(jobs)
        digest = idempotency.request_hash(idempotency.workflow_request(
            wf_row["name"], wf_row["metadata"], workflow_id, jobs, specs)) if taken else None
        replay: idempotency.Rows = []

        def tx(conn: sa.Connection, ch: Changes) -> None:
            if taken and digest:
                replay[:] = idempotency.claim(conn, taken, digest, wf_row["id"], None, now) or []
                if replay:
                    return
            store.insert(conn, Kind.WORKFLOW, wf_row)
            seqs = iter(store.next_seqs(conn, sum(1 for s in specs if not s["depends_on"])))
            rows = [jobs_room.job_row(wf_row["id"], s, now, seqs) for s in specs]
            store.copy_jobs(conn, self.pipe.db.schema, rows)
            ch.add(Kind.WORKFLOW, wf_row)
            ch.add_all(Kind.JOB, rows)
            for r in rows:
                ch.event("created", r, now)
                if r["status"] == models.JobStatus.QUEUED:
                    ch.event("queued", r, now)
            ch.counters["jobs_created"] += len(rows)
            ch.counters["workflows_created"] += 1

        self.pipe.write("create workflow", tx)
        if replay:
            return self.pipe.restore(replay)[0]  # type: ignore[return-value]
        return self.pipe.require(Kind.WORKFLOW, wf_row["id"])  # type: ignore[no-any-return]

    def get(self, workflow_id: str) -> models.Workflow | None:
        """Return a workflow, or None when there is none with that id."""
        return self.pipe.get(Kind.WORKFLOW, workflow_id)  # type: ignore[return-value]

    def find(self, status: str | None = None) -> list[models.Workflow]:
        """Return every workflow (with that status, when given), oldest first."""
        if status is not None:
            status = validate.status("status", status, WS).value
        return self.pipe.select(Kind.WORKFLOW, status=status)

    def update_status(self, workflow_id: str, status: str) -> models.Workflow:
        """Set a workflow's status, following ``models.WORKFLOW_TRANSITIONS``."""
        target = validate.status("status", status, WS)
        validate.identifier("workflow_id", workflow_id)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            row = store.update(conn, Kind.WORKFLOW, workflow_id, {"status": target.value},
                               statuses_in=models.workflow_sources(target), now=self.pipe.now())
            if row is None:
                raise self.pipe.refusal(conn, Kind.WORKFLOW, workflow_id, target)
            ch.add(Kind.WORKFLOW, row)

        return self.pipe.write("update workflow", tx, one_statement=True)[0]  # type: ignore[return-value]

    def cancel(self, workflow_id: str) -> models.Workflow:
        """Cancel a workflow and every job of it that is not final."""
        validate.identifier("workflow_id", workflow_id)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            row = store.update(conn, Kind.WORKFLOW, workflow_id, {"status": WS.CANCELLED.value},
                               statuses_in=models.workflow_sources(WS.CANCELLED), now=now)
            if row is None:
                raise self.pipe.refusal(conn, Kind.WORKFLOW, workflow_id, WS.CANCELLED)
            jobs = lifecycle.cancel_workflow_jobs(conn, workflow_id, now)
            ids = [j["id"] for j in jobs]
            ch.add_all(Kind.ASSIGNMENT, lifecycle.end_assignments(conn, "cancelled", now, job_ids=ids)
                       if ids else [])
            ch.add_all(Kind.JOB, jobs)
            for j in jobs:
                ch.event("cancelled", j, now, reason="workflow cancelled")
            ch.add(Kind.WORKFLOW, row)
            ch.counters["jobs_cancelled"] += len(jobs)

        return self.pipe.write("cancel workflow", tx)[-1]  # type: ignore[return-value]

    def delete(self, workflow_id: str) -> None:
        """Delete a workflow, its jobs and their assignments from every tier."""
        validate.identifier("workflow_id", workflow_id)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            wf, jobs, assignment_ids = lifecycle.delete_workflow(conn, workflow_id)
            if wf is None:
                raise errors.NotFound(Kind.WORKFLOW, workflow_id)
            ch.deleted.append((Kind.WORKFLOW, workflow_id))
            ch.deleted.extend((Kind.JOB, j["id"]) for j in jobs)
            ch.deleted.extend((Kind.ASSIGNMENT, a) for a in assignment_ids)
            self.pipe.note_deleting(ch.deleted)
            ch.unqueue.extend((j["id"], j["queue"]) for j in jobs)
            now = self.pipe.now()
            for j in jobs:
                ch.event("deleted", {**j, "workflow_id": workflow_id, "status": j["status"]}, now)

        self.pipe.write("delete workflow", tx)
