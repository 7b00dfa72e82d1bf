"""Batched and fused job verbs: many moves, one commit.

``dequeue_many`` pops up to n jobs in one Lua call (``claim_jobs.lua``, the
same in-flight lease as ``dequeue``) and assigns them in one PostgreSQL
transaction of set-based statements; the jobs PostgreSQL refuses are settled.
``start_jobs``, ``complete_jobs`` and ``fail_jobs`` move many jobs in one
transaction, each with its own result or error and fence; an item whose status
or fence does not match is refused alone (its error in its slot of the
returned list), the others go through. Dependents are released and each
workflow rolled up once per batch. ``complete_and_dequeue`` completes one job
and claims the next in one transaction; ``complete_and_dequeue_many`` does the
same for a batch (the batched worker's step: one commit per batch). Items are
parsed by ``items``.

Uses ``dispatch`` (the janitor) and ``workers`` (is the worker active?); the
tiers through the pipeline, ``tiers/postgres/batches.py`` and ``tiers/redis/queue.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import errors, failpoints, models, validate
from toolkit.manager import scheduling
from toolkit.manager.dispatch import Dispatch, settle_back
from toolkit.manager.items import MAX_BATCH, Outcome, item_guard, parse_items
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.manager.workers import Workers
from toolkit.models import EntityKind as Kind
from toolkit.models import JobStatus as JS
from toolkit.tiers.postgres import batches as pgb
from toolkit.tiers.postgres import lifecycle
from toolkit.tiers.redis import queue

log = logging.getLogger(__name__)

_COMPLETABLE = models.values(models.job_sources(JS.COMPLETED))


# -- the steps inside a transaction ----------------------------------------------------------

class _Batch:
    """What one batch transaction did: each refusal, the jobs completed, the workflows whose
    jobs were completed or failed (locked by that move), those a job was claimed in, and
    those whose status the moves cannot have changed."""

    def __init__(self) -> None:
        self.refused: dict[str, errors.ToolkitError] = {}
        self.completed: list[str] = []
        self.workflows: set[str] = set()
        self.claimed: set[str] = set()
        self.steady: set[str] = set()

    def reset(self) -> _Batch:
        """Forget a rolled-back run (the transaction runs again after a deadlock)."""
        self.refused.clear()
        self.completed.clear()
        for s in (self.workflows, self.claimed, self.steady):
            s.clear()
        return self

    def outcomes(self, items: Sequence[pgb.Item], written: Iterable[models.Entity]
                 ) -> list[Outcome]:
        jobs = {e.id: e for e in written if isinstance(e, models.Job)}
        return [self.refused.get(i.job_id) or jobs[i.job_id] for i in items]


def _refuse(pipe: Pipeline, conn: sa.Connection, b: _Batch, items: Sequence[pgb.Item],
            moved: Sequence[Mapping[str, Any]], target: JS) -> None:
    """Record why each item that did not move was refused (read from PostgreSQL)."""
    done = {r["id"] for r in moved}
    for item in items:
        if item.job_id not in done:
            b.refused[item.job_id] = pipe.refusal(conn, Kind.JOB, item.job_id, target, item_guard(item))


def _completed(ch: Changes, b: _Batch, rows: Sequence[Mapping[str, Any]]) -> None:
    """After completing ``rows`` (their events logged by the move; dependents wait for
    :func:`_finish`)."""
    b.completed += [r["id"] for r in rows]
    b.workflows |= {r["workflow_id"] for r in rows}
    ch.counters["jobs_completed"] += len(rows)


def _claim(claims: Sequence[queue.Claim], worker_id: str, start: bool) -> pgb.Claim:
    """The claim of the jobs Redis handed out, each with a new assignment id."""
    ids = [c.job_id for c in claims]
    return pgb.Claim(ids, validate.new_ids(len(ids)), worker_id, bool(start))


def _claimed(ch: Changes, b: _Batch, claim: pgb.Claim, moved: Sequence[Mapping[str, Any]],
             woken: Sequence[Mapping[str, Any]], now: datetime) -> None:
    """After the claim statement: the jobs it moved, their assignments, the workflows it woke."""
    aids = dict(zip(claim.job_ids, claim.assignment_ids, strict=True))
    found = {r["id"]: r for r in moved}
    rows = [found[j] for j in claim.job_ids if j in found]
    assignments = [{"id": aids[r["id"]], "job_id": r["id"], "worker_id": claim.worker_id,
                    "status": models.AssignmentStatus.ACTIVE.value, "attempt": r["attempts"],
                    "assigned_at": now, "finished_at": None} for r in rows]
    ch.add_all(Kind.JOB, rows)
    ch.add_all(Kind.ASSIGNMENT, assignments)
    ch.add_all(Kind.WORKFLOW, woken)  # their events (assigned, started) were logged by the claim
    b.claimed |= {r["workflow_id"] for r in rows}
    ch.counters["jobs_assigned"] += len(rows)


def _claim_now(conn: sa.Connection, ch: Changes, b: _Batch, claims: Sequence[queue.Claim],
               worker_id: str, start: bool, now: datetime) -> None:
    """Assign (or start) the claimed jobs still queued, with their assignments: one statement."""
    claim = _claim(claims, worker_id, start)
    moved, woken = pgb.claim_jobs(conn, claim.job_ids, claim.assignment_ids, worker_id, now,
                                  start=claim.start)
    _claimed(ch, b, claim, moved, woken, now)


def _released(ch: Changes, b: _Batch, released: Sequence[Mapping[str, Any]],
              now: datetime) -> None:
    """The jobs the completions released: queued, each with its ``queued`` event."""
    done = set(b.completed)
    for r in released:
        ch.add(Kind.JOB, r)
        # A refused item already completed may release a dependent too (its release was
        # missed before): None says no job of this batch did.
        ch.event("queued", r, now, released_by=next((d for d in r["depends_on"] if d in done),
                                                    None))


def _finish(conn: sa.Connection, ch: Changes, b: _Batch, now: datetime,
            released: Sequence[Mapping[str, Any]] = ()) -> None:
    """Note the dependents the completions released (``released``: the release statement
    ran with them, see ``pgb.claim_complete_release``), roll each workflow up once.

    The moves that completed or failed jobs locked their workflows (in id order: two
    batches never deadlock on them), so the release and the roll-ups, later statements,
    see every move of these workflows committed before (two batches completing two
    dependencies of one job: the second releases it). No roll-up where it cannot change
    the status: a workflow a job was just claimed in is running (the claim set it so), one
    whose jobs were only re-queued while it was running stays running."""
    _released(ch, b, released, now)
    for wf in sorted(b.workflows - b.claimed - b.steady):
        ch.add(Kind.WORKFLOW, lifecycle.rollup_workflow(conn, wf, now))


class Batches:
    """The batched and fused job verbs of a StateManager."""

    def __init__(self, pipe: Pipeline, workers: Workers, dispatch: Dispatch) -> None:
        self.pipe = pipe
        self.workers = workers
        self.dispatch = dispatch

    # -- claims -------------------------------------------------------------------------

    def _queues(self, worker_id: str, queues: Sequence[str] | None) -> list[str]:
        worker = self.workers.require_active(worker_id)
        return list(validate.names("queues", queues) if queues is not None else worker.queues)

    def _pop(self, names: list[str], n: int) -> list[queue.Claim]:
        p = self.pipe
        self.dispatch.promoter.run(names)  # due scheduled jobs join their queues first
        claims = queue.claim_many(p.redis, p.ns, names, n, time.time() + self.dispatch.claim_lease)
        if claims:  # a crash from here to the commit leaves them in flight, for the janitor
            failpoints.reach("after_claim", ",".join(c.job_id for c in claims))
        return claims

    def _settle(self, claims: Iterable[queue.Claim], *, requeue: bool) -> None:
        for c in claims:
            queue.settle(self.pipe.redis, self.pipe.ns, c, requeue=requeue)

    def _write_with_claims(self, action: str, claims: Sequence[queue.Claim],
                           tx: Callable[[sa.Connection, Changes], None], *,
                           one_statement: bool = False, opens: bool = False
                           ) -> list[models.Entity]:
        """Run ``tx``; the claims PostgreSQL did not assign go back (or are forgotten)."""
        try:
            written = self.pipe.write(action, tx, one_statement=one_statement, opens=opens)
        except BaseException as exc:
            if isinstance(exc, errors.StorageUnavailable):  # the COMMIT may have landed
                exc.claimed = tuple(c.job_id for c in claims)
            settle_back(self.pipe, claims)
            raise
        won = {e.id for e in written if isinstance(e, models.Job) and e.status is not JS.QUEUED}
        try:
            self._settle([c for c in claims if c.job_id not in won], requeue=False)
        except errors.StorageUnavailable as exc:  # committed: the janitor ends them with their lease
            log.warning("%s committed; claims it did not win stay in flight until their lease "
                        "ends: %s", action, exc, extra={"action": "settle_claims"})
        return written

    def dequeue_many(self, worker_id: str, n: int, *, queues: Sequence[str] | None = None,
                     timeout: float = 0.0, start: bool = False) -> list[models.Job]:
        """Take up to ``n`` of the best queued jobs of the worker's queues and assign them.

        One Lua call pops them into the in-flight set (as ``dequeue``, with its
        lease), one PostgreSQL transaction assigns every one still queued; the
        others are settled. Best first. Waits up to ``timeout`` seconds for at
        least one job; returns ``[]`` when none came. ``start``: claim straight
        into running (``assigned`` and ``started`` are both logged), for workers
        that do not need ``start_job``. ``n`` is 1 to ``MAX_BATCH``.
        """
        n = validate.integer("n", n, low=1, high=MAX_BATCH)
        names = self._queues(worker_id, queues)
        deadline = time.monotonic() + validate.seconds("timeout", timeout, allow_zero=True)
        self.dispatch.janitor()
        while True:
            claims = self._pop(names, n)
            if not claims:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                time.sleep(min(0.05, left))
                continue

            def tx(conn: sa.Connection, ch: Changes, claims: list[queue.Claim] = claims) -> None:
                _claim_now(conn, ch, _Batch(), claims, worker_id, bool(start), self.pipe.now())

            # One statement (the claim, its assignments, events and workflows): no BEGIN/COMMIT.
            written = self._write_with_claims("dequeue", claims, tx, one_statement=True)
            jobs = {e.id: e for e in written if isinstance(e, models.Job)}
            got = [jobs[c.job_id] for c in claims if c.job_id in jobs]
            if got:
                return got

    def dequeue(self, worker_id: str, *, queues: Sequence[str] | None = None,
                timeout: float = 0.0, start: bool = False) -> models.Job | None:
        """Take the best queued job of the worker's queues and assign it to the worker.

        Highest priority first, FIFO within a priority. Waits up to ``timeout``
        seconds for a job. A job is never handed to two workers: Redis pops it
        into an in-flight set and PostgreSQL's status guard decides. ``start``:
        claim it straight into running (no ``start_job`` needed).
        """
        if not start:
            return self.dispatch.dequeue(worker_id, queues=queues, timeout=timeout)
        got = self.dequeue_many(worker_id, 1, queues=queues, timeout=timeout, start=True)
        return got[0] if got else None

    # -- moves of many jobs ---------------------------------------------------------------

    def start_jobs(self, items: Sequence[Any], *, worker_id: str | None = None) -> list[Outcome]:
        """Mark many assigned jobs running in one transaction; return one outcome per item.

        An item is a job id or a mapping with ``job_id`` and the fences
        ``worker_id``/``attempt`` (``worker_id=`` fences every item naming none).
        An item refused (stale attempt, wrong worker or status, no such job)
        gets its error in its slot; the others go through. Bad input raises
        ``ValidationError`` and nothing is written.
        """
        parsed = parse_items(items, None, worker_id)
        b = _Batch()

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            b.reset()
            rows = pgb.start_jobs(conn, parsed, models.values(models.job_sources(JS.RUNNING)), now)
            _refuse(self.pipe, conn, b, parsed, rows, JS.RUNNING)
            ch.add_all(Kind.JOB, rows)  # their events were logged by the move

        # One statement (no roll-up: assigned and running weigh the same in it).
        return b.outcomes(parsed, self.pipe.write("start jobs", tx, one_statement=True))

    def complete_jobs(self, items: Sequence[Any], *, worker_id: str | None = None
                      ) -> list[Outcome]:
        """Complete many running jobs in one transaction; return one outcome per item.

        An item is ``(job_id, result)`` or a mapping with ``job_id``, ``result``
        and the fences ``worker_id``/``attempt``. Each item is refused alone (its
        error in its slot); dependents are released and each workflow rolled up
        once. Bad input raises ``ValidationError`` and nothing is written.
        """
        parsed = parse_items(items, "result", worker_id)
        b = _Batch()

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            b.reset()
            # The completion and the release in one round trip (with the BEGIN).
            fused = pgb.claim_complete_release(conn, None, parsed, _COMPLETABLE, now)
            self._complete(conn, ch, b, parsed, fused.ended)
            _finish(conn, ch, b, now, fused.released)

        return b.outcomes(parsed, self.pipe.write("complete jobs", tx, opens=True))

    def _complete(self, conn: sa.Connection, ch: Changes, b: _Batch, items: Sequence[pgb.Item],
                  done: pgb.Ended) -> None:
        """Note what the completion of ``items`` did (``done``), and why any was refused."""
        rows, ended, _ = done
        _refuse(self.pipe, conn, b, items, rows, JS.COMPLETED)
        ch.add_all(Kind.JOB, rows)
        ch.add_all(Kind.ASSIGNMENT, ended)
        _completed(ch, b, rows)

    def fail_jobs(self, items: Sequence[Any], *, retry: bool = True,
                  worker_id: str | None = None, retry_in: float | None = None) -> list[Outcome]:
        """Fail many assigned or running jobs in one transaction; one outcome per item.

        An item is ``(job_id, error)`` or a mapping with ``job_id``, ``error`` and
        the fences ``worker_id``/``attempt``. With ``retry``, a job with attempts
        left is queued again after its backoff, or ``retry_in`` seconds (as
        ``fail_job``). Each item is refused alone.
        """
        parsed = parse_items(items, "error", worker_id)
        wait = scheduling.retry_in_seconds(retry_in)
        b = _Batch()

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            b.reset()
            rows, ended, statuses = pgb.fail_jobs(conn, parsed, bool(retry), now)
            rows = scheduling.back_off(conn, rows, self.pipe.retry_policy, now, wait)
            _refuse(self.pipe, conn, b, parsed, rows, JS.FAILED)
            ch.add_all(Kind.JOB, rows)
            ch.add_all(Kind.ASSIGNMENT, ended)
            _failed(ch, b, rows, statuses)
            _finish(conn, ch, b, now)

        return b.outcomes(parsed, self.pipe.write("fail jobs", tx, opens=True))

    # -- fused ----------------------------------------------------------------------------

    def complete_and_dequeue(self, job_id: str, result: Any = None, *, worker_id: str,
                             attempt: int | None = None, queues: Sequence[str] | None = None,
                             start: bool = False) -> tuple[models.Job, models.Job | None]:
        """Complete a running job and claim the worker's next one, in one transaction.

        Returns ``(completed job, next job or None)``. The completion is
        refused as ``complete_job`` refuses it (nothing is written, the claimed
        job goes back to its queue); when there is nothing to claim, the
        completion still commits. ``start``: the next job is claimed straight
        into running.
        """
        item = parse_items([{"job_id": job_id, "result": result, "attempt": attempt}],
                           "result", worker_id)
        _, claimed, jobs = self._fused("complete and dequeue", item, 1, worker_id, queues,
                                       start, strict=True)
        nxt = claimed[0] if claimed else None
        if claimed and nxt is None:  # the claimed job was no longer queued: try once more
            nxt = self.dequeue(worker_id, queues=queues, start=start)
        return jobs[job_id], nxt

    def complete_and_dequeue_many(self, items: Sequence[Any], n: int, *, worker_id: str,
                                  queues: Sequence[str] | None = None, start: bool = False
                                  ) -> tuple[list[Outcome], list[models.Job]]:
        """Complete many running jobs and claim up to ``n`` next, in one transaction.

        The batched worker's step: one commit per batch instead of two. Returns
        ``(one outcome per item, the jobs claimed, best first)``. Items are those
        of :meth:`complete_jobs`, each refused alone (its error in its slot); the
        claim goes through either way, and when nothing is queued the completions
        still commit. ``start``: claim straight into running. Bad input raises
        ``ValidationError`` and nothing is written or claimed.
        """
        parsed = parse_items(items, "result", worker_id)
        n = validate.integer("n", n, low=1, high=MAX_BATCH)
        b, claimed, jobs = self._fused("complete and dequeue many", parsed, n, worker_id,
                                       queues, start, strict=False)
        return b.outcomes(parsed, jobs.values()), [j for j in claimed if j is not None]

    def _fused(self, action: str, items: list[pgb.Item], n: int, worker_id: str,
               queues: Sequence[str] | None, start: bool, *, strict: bool
               ) -> tuple[_Batch, list[models.Job | None], dict[str, models.Job]]:
        """Claim up to ``n``, complete ``items`` and release their dependents in one round
        trip, roll up, commit (``strict``: a refused item raises, nothing is written).
        Returns the batch, each claim's job (None: no longer queued), the jobs written."""
        names = self._queues(worker_id, queues)
        self.dispatch.janitor()
        popped = self._pop(names, n)
        mine = {i.job_id for i in items}  # a job completed here is not claimed again with it
        claims = [c for c in popped if c.job_id not in mine]
        try:
            self._settle([c for c in popped if c.job_id in mine], requeue=True)
        except BaseException:
            self._settle(claims, requeue=True)
            raise
        b = _Batch()

        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            b.reset()
            claim = _claim(claims, worker_id, bool(start)) if claims else None
            # The claim, the completions and the release in one round trip (with the BEGIN).
            fused = pgb.claim_complete_release(conn, claim, items, _COMPLETABLE, now)
            if claim is not None:
                _claimed(ch, b, claim, fused.claimed, fused.woken, now)
            self._complete(conn, ch, b, items, fused.ended)
            if strict and b.refused:
                raise next(iter(b.refused.values()))
            _finish(conn, ch, b, now, fused.released)

        written = self._write_with_claims(action, claims, tx, opens=True)
        jobs = {e.id: e for e in written if isinstance(e, models.Job)}
        # A claim's job is one this worker now holds (not a dependent the completions released).
        won = [jobs.get(c.job_id) for c in claims]
        return b, [j if j is not None and j.status is not JS.QUEUED else None for j in won], jobs


def _failed(ch: Changes, b: _Batch, rows: Sequence[Mapping[str, Any]],
            statuses: Mapping[str, str]) -> None:
    """After failing ``rows`` (their events, failed and retried, logged by the move).

    A workflow that was running and whose failed jobs were all re-queued stays running:
    queued and assigned or running weigh the same in the roll-up's rules 1 and 2, and
    rules 3 to 5 leave a running workflow running."""
    final = {r["workflow_id"] for r in rows if r["status"] != JS.QUEUED}
    retried = sum(1 for r in rows if r["status"] == JS.QUEUED)
    if retried:
        ch.counters["jobs_retried"] += retried
    touched = {r["workflow_id"] for r in rows}
    b.workflows |= touched
    b.steady |= {wf for wf in touched - final if statuses.get(wf) == "running"}
    ch.counters["jobs_failed"] += len(rows)

