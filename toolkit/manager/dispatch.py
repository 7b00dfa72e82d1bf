"""Dispatch: assign a queued job to a worker, directly or through the Redis queue.

``dequeue`` pops the best job of the worker's queues into an in-flight set with
a lease (one Lua script), then PostgreSQL decides under the job's status guard
and the unique index of active assignments; a popped job that PostgreSQL
refuses is settled, and an expired lease is returned by the janitor. So a job
is never handed to two workers, and a coordinator that dies between the pop and
the commit loses nothing.

Uses ``workers`` (is the worker active?) and the pipeline; the in-flight set
and the queue only through ``tiers/redis/queue.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import sqlalchemy as sa

from toolkit import errors, failpoints, models, validate
from toolkit.manager import jobs, scheduling
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.manager.workers import Workers
from toolkit.models import EntityKind as Kind
from toolkit.recovery import queues as recovered_queues
from toolkit.tiers.postgres import batches as pgb
from toolkit.tiers.postgres import lifecycle
from toolkit.tiers.redis import queue

log = logging.getLogger(__name__)

CLAIM_LEASE = 30.0
"""Seconds a popped job may stay in flight before a janitor returns it to its queue."""


def settle_back(pipe: Pipeline, claims: Sequence[queue.Claim]) -> None:
    """Put the claims of a failed claiming call back in their queue. When Redis refuses,
    they stay in flight until their lease ends and the janitor returns them: the caller
    sees the call's own error, not Redis's."""
    for k, claim in enumerate(claims):
        try:
            queue.settle(pipe.redis, pipe.ns, claim, requeue=True)
        except errors.StorageUnavailable as exc:  # the next would wait on Redis as long
            log.warning("%d claims of a failed call left in flight until their lease ends: %s",
                        len(claims) - k, exc, extra={"action": "settle_claims"})
            return


def assign(conn: sa.Connection, ch: Changes, job_id: str, worker_id: str, pipe: Pipeline) -> bool:
    """Assign a queued job; False when it is no longer queued.

    ONE statement (:func:`~toolkit.tiers.postgres.batches.claim_jobs`): the move, the
    assignment, the ``assigned`` event and the workflow set running when it was not (an
    assigned job makes it running whatever else it holds: no roll-up needed).
    """
    now = pipe.now()
    aid = validate.new_id()
    rows, woken = pgb.claim_jobs(conn, [job_id], [aid], worker_id, now, start=False)
    if not rows:
        return False
    row = rows[0]
    assignment = {"id": aid, "job_id": job_id, "worker_id": worker_id,
                  "status": models.AssignmentStatus.ACTIVE.value, "attempt": row["attempts"],
                  "assigned_at": now, "finished_at": None}
    ch.add(Kind.JOB, row)
    ch.add(Kind.ASSIGNMENT, assignment)
    ch.add_all(Kind.WORKFLOW, woken)
    ch.counters["jobs_assigned"] += 1
    return True


class Dispatch:
    """The dispatch verbs of a StateManager."""

    def __init__(self, pipe: Pipeline, workers: Workers) -> None:
        self.pipe = pipe
        self.workers = workers
        self.claim_lease = CLAIM_LEASE
        self._last_janitor = 0.0
        self.promoter = scheduling.Promoter(pipe.tiers)

    def assign_job(self, job_id: str, worker_id: str) -> models.JobAssignment:
        """Assign a queued job to a worker directly (bypassing the queue order)."""
        validate.identifier("job_id", job_id)
        self.workers.require_active(worker_id)

        def tx(conn: sa.Connection, ch: Changes) -> None:
            assign(conn, ch, job_id, worker_id, self.pipe)

        written = self.pipe.write("assign job", tx, one_statement=True)
        return next(e for e in written if isinstance(e, models.JobAssignment))

    def dequeue(self, worker_id: str, *, queues: Sequence[str] | None = None,
                timeout: float = 0.0) -> models.Job | None:
        """Take the best queued job of the worker's queues and assign it to the worker.

        Highest priority first, FIFO within a priority. Waits up to ``timeout``
        seconds for a job. A job is never handed to two workers: Redis pops it
        into an in-flight set and PostgreSQL's status guard decides.
        """
        worker = self.workers.require_active(worker_id)
        names = list(validate.names("queues", queues) if queues is not None else worker.queues)
        deadline = time.monotonic() + validate.seconds("timeout", timeout, allow_zero=True)
        self.janitor()
        p = self.pipe
        while True:
            self.promoter.run(names)  # due scheduled jobs join their queues first
            claim = queue.claim(p.redis, p.ns, names, time.time() + self.claim_lease)
            if claim is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                time.sleep(min(0.05, left))
                continue
            failpoints.reach("after_claim", claim.job_id)
            ch = Changes(action="dequeue")
            with p.watermark.pending():
                sent = False
                try:
                    with p.db.autocommit("dequeue") as conn:  # one statement: no BEGIN/COMMIT
                        sent = True
                        won = assign(conn, ch, claim.job_id, worker_id, p)
                except BaseException as exc:
                    if isinstance(exc, errors.StorageUnavailable):  # it may have committed
                        exc.claimed = (claim.job_id,)
                        p.note_unknown_outcome(exc, sent=sent)
                    settle_back(p, [claim])
                    raise
                if won:
                    return p.apply(ch)[0]  # type: ignore[return-value]
            queue.settle(p.redis, p.ns, claim, requeue=False)

    def reap_dead_workers(self) -> list[models.Job]:
        self.janitor(force=True)
        return self.workers.reap_dead()

    reap_dead_workers.__doc__ = Workers.reap_dead.__doc__

    def return_unstarted(self, worker_id: str, job_ids: Sequence[str]) -> list[models.Job]:
        """Put back jobs a worker claimed and will not run (it is stopping).

        Only jobs still assigned to ``worker_id`` (or running, claimed straight into
        running and never run) move: back to ``queued`` at the
        head of their priority, the attempt given back, the assignment ended as
        ``reclaimed`` (event rule: "returned unstarted"). Returns the jobs moved.
        """
        validate.identifier("worker_id", worker_id)
        ids = [validate.identifier("job_ids", j) for j in job_ids]

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            moved = lifecycle.unclaim_jobs(conn, ids, worker_id, now)
            ended = lifecycle.end_assignments(conn, "reclaimed", now,
                                              job_ids=[r["id"] for r in moved])
            ch.add_all(Kind.JOB, moved)
            ch.add_all(Kind.ASSIGNMENT, ended)
            for row in moved:
                ch.event("reclaimed", row, now, worker_id=worker_id, rule="returned unstarted")
            for wf in sorted({r["workflow_id"] for r in moved}):
                ch.add(Kind.WORKFLOW, jobs.rollup(conn, wf, now, unless_requeued=True))

        if not ids:
            return []
        return [e for e in self.pipe.write("return claims", tx) if isinstance(e, models.Job)]

    def janitor(self, *, force: bool = False) -> int:
        """Return expired in-flight claims to their queues (at most once a second)."""
        now = time.time()
        if not force and now - self._last_janitor < 1.0:
            return 0
        self._last_janitor = now
        return recovered_queues.return_claims(self.pipe.tiers, before=now)
