"""StateManager: the only module besides ``recovery`` that knows all three tiers.

Write path: validate (bad input changes nothing), one PostgreSQL transaction
with a status or version guard, then one Redis pipeline (cache fills that
never overwrite a newer version, queue moves, invalidation messages), then
memory. A Redis failure after the commit does not fail the call: the write
stands and the tier is left for ``repair()``.

Read path: memory, then Redis, then PostgreSQL, each miss filling the tiers
above it with versioned writes.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from toolkit import config, errors, invalidation, models, recovery, single_flight, validate
from toolkit.lock import Lock
from toolkit.models import JobStatus as JS
from toolkit.tiers import memory as memory_tier
from toolkit.tiers.postgres import db as pg_db
from toolkit.tiers.postgres import migrate, store
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import cache, eviction, heartbeats, metrics, queue
from toolkit.tiers.redis.client import Client

if TYPE_CHECKING:
    from toolkit.inspection.inspector import Inspector

log = logging.getLogger(__name__)

CLAIM_LEASE = 30.0
"""Seconds a popped job may stay in flight before a janitor returns it to its queue."""
DELETED = 2**62
"""Version announced when an entity is deleted: every cached copy is older."""


@dataclasses.dataclass
class _Changes:
    """What a committed transaction changed, to be pushed to Redis and memory."""

    rows: list[tuple[str, Mapping[str, Any]]] = dataclasses.field(default_factory=list)
    deleted: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    unqueue: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    counters: Counter[str] = dataclasses.field(default_factory=Counter)
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    action: str = ""

    def add(self, kind: str, row: Mapping[str, Any] | None) -> None:
        if row is not None:
            self.rows.append((kind, row))

    def add_all(self, kind: str, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            self.rows.append((kind, row))

    def event(self, name: str, job: Mapping[str, Any], at: datetime, *,
              worker_id: str | None = None, **detail: Any) -> None:
        """Log a job event (written in the same transaction as the change)."""
        self.events.append({
            "job_id": job["id"], "workflow_id": job["workflow_id"], "event": name,
            "status": job["status"], "worker_id": worker_id or job.get("worker_id"),
            "attempt": job.get("attempts"), "at": at, "detail": detail or None,
        })


def _ts(dt: datetime | None) -> float:
    return dt.timestamp() if dt is not None else 0.0


_ROW_BUILDERS = {kind: (models.row_builder(kind), models.field_names(kind))
                 for kind in models.ENTITY_TYPES}
"""Kind -> (fast positional constructor, field names), for :func:`_build_entities`."""


def _build_entities(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[models.Entity]:
    """Build the entities of committed rows (from PostgreSQL or validated input).

    Uses the fast positional constructor: the rows were validated when written.
    """
    out: list[models.Entity] = []
    append, builders = out.append, _ROW_BUILDERS
    for kind, row in rows:
        build, names = builders[kind]
        get = row.get
        append(build([get(n) for n in names]))
    return out


def _queue_moves(rows: Sequence[tuple[str, Mapping[str, Any]]]
                 ) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str]]]:
    """Return the queue pushes and removals that job rows make, to send in bulk.

    Sending every removal, then the pushes of the ``(job, queue)`` pairs whose
    last row is queued, leaves what one push or removal per row in order left.
    """
    last: dict[tuple[str, str], Mapping[str, Any]] = {}
    removes: list[tuple[str, str]] = []
    for kind, row in rows:
        if kind != "job":
            continue
        pair = (row["id"], row["queue"])
        last[pair] = row
        if row["status"] != JS.QUEUED:
            removes.append(pair)
    pushes = [(job_id, q, row["priority"], row["enqueue_seq"])
              for (job_id, q), row in last.items() if row["status"] == JS.QUEUED]
    return pushes, removes


MEMORY_MAX_AGE = 5.0
"""Seconds a memory entry may answer reads after it was stored: the worst-case staleness of
a read, whatever invalidations were lost (see :mod:`toolkit.invalidation`)."""
SUBSCRIBE_WAIT = 5.0
"""Seconds ``init_state_manager`` waits for the invalidation subscription before rebuilding."""


class StateManager:
    """The coordinator's state over memory, Redis and PostgreSQL.

    Build one with :func:`toolkit.init_state_manager`. Thread-safe: one
    instance may be shared by many threads.
    """

    def __init__(self, settings: config.Settings, *, listen: bool = True) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self.db = Database(settings.database_url, settings.schema)
        self.redis = Client(settings.redis_url, namespace=settings.namespace)
        self.memory = memory_tier.Memory()
        self._cold_reads: single_flight.SingleFlight[models.Entity | None] = \
            single_flight.SingleFlight()
        self._closed = False
        self._beat_lock = threading.Lock()
        self._pending_beats: dict[str, datetime] = {}
        self._last_beat_flush = time.monotonic()
        self._last_janitor = 0.0
        self._last_checkpoint = time.monotonic()
        self.last_rebuild: recovery.RebuildReport | None = None
        self.eviction_risk: eviction.EvictionRisk | None = None
        """What Redis said about evicting keys when this manager connected."""
        self._inspector: Inspector | None = None
        # Test hook: called with the action name after a PostgreSQL commit and
        # before Redis is touched (the fault-injection scenarios kill the process here).
        self._after_commit: Callable[[str], None] | None = None
        # Test hook: called with the job id after a Redis pop, before PostgreSQL assigns it.
        self._after_claim: Callable[[str], None] | None = None
        self.claim_lease = CLAIM_LEASE
        self._listener = invalidation.InvalidationListener(self.redis, self.ns, self.memory,
                                                         memory_tier.KINDS)
        self.memory_max_age = MEMORY_MAX_AGE
        if listen:
            self._listener.start()

    # -- lifecycle ----------------------------------------------------------------------

    def __repr__(self) -> str:
        return (f"StateManager(database={config.mask_url(self.settings.database_url)!r}, "
                f"redis={config.mask_url(self.settings.redis_url)!r}, namespace={self.ns!r}, "
                f"schema={self.settings.schema!r})")

    def __enter__(self) -> StateManager:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Flush heartbeats and metric checkpoints (best effort), then close every connection."""
        if self._closed:
            return
        self._closed = True
        for step in (self._flush_heartbeats, self.checkpoint_metrics):
            try:
                step()
            except errors.StorageUnavailable as exc:
                log.warning("on close: %s", exc, extra={"action": "close"})
        self._listener.stop()
        if self._inspector is not None:
            self._inspector.close()
        self.db.dispose()
        self.redis.close()

    @property
    def inspector(self) -> Inspector:
        """A read-only :class:`~toolkit.Inspector` over this manager's tiers (memory included)."""
        from toolkit.inspection.inspector import Inspector

        with self._beat_lock:
            if self._inspector is None:
                self._inspector = Inspector._bound(self)
            return self._inspector

    def _now(self) -> datetime:
        return models.utcnow()

    # -- the write path -------------------------------------------------------------------

    def _apply(self, changes: _Changes) -> list[models.Entity]:
        """Push committed changes to Redis (one pipeline), then memory. Never raises."""
        entities = _build_entities(changes.rows)
        queued = sum(1 for kind, row in changes.rows if kind == "job" and row["status"] == JS.QUEUED)
        if queued:
            changes.counters["jobs_queued"] += queued
        if self._after_commit is not None:
            self._after_commit(changes.action)
        try:
            self._push_redis(changes, entities)
        except Exception as exc:  # noqa: BLE001 - the write is committed: never report it failed
            log.warning("committed to PostgreSQL but Redis was not updated (repair() will): %s",
                        exc, extra={"action": "write_redis"})
            self._drop_cached(entities, changes)
        for e in entities:
            self.memory.put(cache.kind_of(e), e)
        for kind, entity_id in changes.deleted:
            self.memory.drop(kind, entity_id)
        return entities

    def _push_redis(self, changes: _Changes, entities: list[models.Entity]) -> None:
        def go() -> None:
            pipe = self.redis.pipeline()
            cache.put(self.redis, self.ns, entities, pipe=pipe)
            pushes, removes = _queue_moves(changes.rows)
            queue.remove_many(self.ns, removes, pipe=pipe)
            queue.push_many(self.ns, pushes, pipe=pipe)
            for kind, entity_id in changes.deleted:
                cache.delete(self.ns, kind, [entity_id], pipe=pipe)
            announced = [(cache.kind_of(e), models.entity_version(e), e.id) for e in entities]
            announced += [(kind, DELETED, entity_id) for kind, entity_id in changes.deleted]
            cache.publish_many(self.ns, announced, pipe=pipe)
            queue.remove_many(self.ns, changes.unqueue, pipe=pipe)
            now = time.time()
            for name, amount in changes.counters.items():
                metrics.incr(self.redis, self.ns, name, amount, now, pipe=pipe)
            pipe.execute()

        # Not idempotent as a whole (counters), so never re-sent.
        self.redis.call("write-through", go, idempotent=False)

    def _drop_cached(self, entities: list[models.Entity], changes: _Changes) -> None:
        """After a failed Redis update, try at least to remove the now-stale entries."""
        try:
            pipe = self.redis.pipeline()
            for e in entities:
                cache.delete(self.ns, cache.kind_of(e), [e.id], pipe=pipe)
            for kind, entity_id in changes.deleted:
                cache.delete(self.ns, kind, [entity_id], pipe=pipe)
            self.redis.call("invalidate", pipe.execute)
        except errors.StorageUnavailable:
            pass

    def _write(self, action: str, fn: Any, *, one_statement: bool = False) -> list[models.Entity]:
        """Run ``fn(conn, changes)`` in one transaction, then apply the changes.

        ``one_statement``: ``fn`` writes with a single statement (reads after it
        are allowed), which then commits by itself, without BEGIN and COMMIT.
        """
        return self._apply(self._commit(action, fn, one_statement))

    TX_ATTEMPTS = 3
    """Runs of a write transaction that meets a serialization failure or a deadlock."""

    def _commit(self, action: str, fn: Any, one_statement: bool) -> _Changes:
        """Run ``fn`` in a transaction; run it again (fresh) after a serialization failure
        or a deadlock, which PostgreSQL rolled back whole. Other errors raise at once."""
        for attempt in range(1, self.TX_ATTEMPTS + 1):
            changes = _Changes(action=action)
            try:
                with self.db.autocommit(action) if one_statement else self.db.begin(action) as conn:
                    fn(conn, changes)
                    if one_statement:
                        assert not changes.events, "events need a transaction"
                    store.insert_events(conn, self.db.schema, changes.events)
                return changes
            except errors.StorageUnavailable as exc:
                if attempt == self.TX_ATTEMPTS or not pg_db.retryable(exc):
                    raise
                log.info("%s: %s; running it again (attempt %d)", action, exc, attempt + 1,
                         extra={"action": "retry_transaction"})
                time.sleep(random.uniform(0.0, 0.02 * attempt))
        raise AssertionError("unreachable")

    # -- the read path --------------------------------------------------------------------

    def _get(self, kind: str, entity_id: Any) -> models.Entity | None:
        entity_id = validate.identifier(f"{kind}_id", entity_id)
        if self._listener.trusted:  # no invalidation missed since memory was emptied
            found = self.memory.get_fresh(kind, entity_id, self.memory_max_age)
            if found is not None:
                return found
        return self._cold_reads.do((kind, entity_id), lambda: self._get_cold(kind, entity_id))

    def _get_cold(self, kind: str, entity_id: str) -> models.Entity | None:
        """Redis, then PostgreSQL; one at a time per entity in this process (single flight)."""
        epoch = self._listener.epoch
        try:
            found = cache.get(self.redis, self.ns, kind, entity_id)
        except errors.StorageUnavailable:
            found = None
        if found is None:
            with self.db.autocommit(f"get {kind}") as conn:  # one SELECT: no BEGIN/COMMIT
                row = store.get(conn, kind, entity_id)
            if row is None:
                return None
            found = models.from_dict(kind, row)
            self._fill_redis([found])
        self._listener.put_if_current(kind, found, epoch)
        return found

    def _fill_redis(self, entities: list[models.Entity]) -> None:
        try:
            pipe = self.redis.pipeline()
            cache.put(self.redis, self.ns, entities, pipe=pipe)
            self.redis.call("cache fill", pipe.execute)
        except errors.StorageUnavailable as exc:
            log.debug("cache fill skipped: %s", exc, extra={"action": "cache_fill"})

    def _require(self, kind: str, entity_id: Any) -> Any:
        found = self._get(kind, entity_id)
        if found is None:
            raise errors.NotFound(kind, entity_id)
        return found

    def _list(self, kind: str, **equal: Any) -> list[Any]:
        with self.db.begin(f"list {kind}s") as conn:
            rows = store.select_where(conn, kind, **equal)
        return [models.from_dict(kind, r) for r in rows]

    # -- workflows ------------------------------------------------------------------------

    def create_workflow(self, name: str, *, jobs: Sequence[Mapping[str, Any]] = (),
                        metadata: Mapping[str, Any] | None = None,
                        workflow_id: str | None = None) -> models.Workflow:
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

        Raises
        ------
        ValidationError
            Bad input (named field and value), a duplicate id, an unknown or
            cyclic dependency. Nothing is written.
        StorageUnavailable
            PostgreSQL failed; nothing is written.
        """
        now = self._now()
        wf_row: dict[str, Any] = {
            "id": validate.optional_id("workflow_id", workflow_id),
            "name": validate.identifier("name", name),
            "status": models.WorkflowStatus.PENDING.value,
            "metadata": validate.json_object("metadata", metadata),
            "created_at": now, "updated_at": now, "version": 1,
        }
        specs = validate.job_specs(jobs)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            store.insert(conn, "workflow", wf_row)
            seqs = iter(store.next_seqs(conn, sum(1 for s in specs if not s["depends_on"])))
            rows = [self._job_row(wf_row["id"], s, now, seqs) for s in specs]
            store.copy_jobs(conn, self.db.schema, rows)
            ch.add("workflow", wf_row)
            ch.add_all("job", rows)
            for r in rows:
                ch.event("created", r, now)
                if r["status"] == "queued":
                    ch.event("queued", r, now)
            ch.counters["jobs_created"] += len(rows)
            ch.counters["workflows_created"] += 1

        self._write("create workflow", tx)
        return self._require("workflow", wf_row["id"])  # type: ignore[no-any-return]

    def _job_row(self, workflow_id: str, spec: Mapping[str, Any], now: datetime,
                 seqs: Any) -> dict[str, Any]:
        queued = not spec["depends_on"]
        return {
            "id": spec["id"], "workflow_id": workflow_id, "name": spec["name"],
            "status": "queued" if queued else "pending", "priority": spec["priority"],
            "queue": spec["queue"], "payload": spec["payload"], "result": None, "error": None,
            "attempts": 0, "max_attempts": spec["max_attempts"], "worker_id": None,
            "depends_on": list(spec["depends_on"]), "enqueue_seq": next(seqs) if queued else None,
            "created_at": now, "updated_at": now, "started_at": None, "finished_at": None,
            "version": 1,
        }

    def get_workflow(self, workflow_id: str) -> models.Workflow | None:
        """Return a workflow, or None when there is none with that id."""
        return self._get("workflow", workflow_id)  # type: ignore[return-value]

    def list_workflows(self, status: str | None = None) -> list[models.Workflow]:
        """Return every workflow (with that status, when given), oldest first."""
        if status is not None:
            status = validate.status("status", status, models.WorkflowStatus).value
        return self._list("workflow", status=status)

    def update_workflow_status(self, workflow_id: str, status: str) -> models.Workflow:
        """Set a workflow's status, following ``models.WORKFLOW_TRANSITIONS``."""
        target = validate.status("status", status, models.WorkflowStatus)
        validate.identifier("workflow_id", workflow_id)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            row = store.update(conn, "workflow", workflow_id, {"status": target.value},
                               statuses_in=models.workflow_sources(target), now=self._now())
            if row is None:
                raise self._refusal(conn, "workflow", workflow_id, target)
            ch.add("workflow", row)

        return self._write("update workflow", tx, one_statement=True)[0]  # type: ignore[return-value]

    def cancel_workflow(self, workflow_id: str) -> models.Workflow:
        """Cancel a workflow and every job of it that is not final."""
        validate.identifier("workflow_id", workflow_id)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            now = self._now()
            row = store.update(conn, "workflow", workflow_id, {"status": "cancelled"},
                               statuses_in=models.workflow_sources(models.WorkflowStatus.CANCELLED),
                               now=now)
            if row is None:
                raise self._refusal(conn, "workflow", workflow_id, models.WorkflowStatus.CANCELLED)
            jobs = store.cancel_workflow_jobs(conn, workflow_id, now)
            ids = [j["id"] for j in jobs]
            ch.add_all("assignment", store.end_assignments(conn, "cancelled", now, job_ids=ids)
                       if ids else [])
            ch.add_all("job", jobs)
            for j in jobs:
                ch.event("cancelled", j, now, reason="workflow cancelled")
            ch.add("workflow", row)
            ch.counters["jobs_cancelled"] += len(jobs)

        return self._write("cancel workflow", tx)[-1]  # type: ignore[return-value]

    def delete_workflow(self, workflow_id: str) -> None:
        """Delete a workflow, its jobs and their assignments from every tier."""
        validate.identifier("workflow_id", workflow_id)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            wf, jobs, assignment_ids = store.delete_workflow(conn, workflow_id)
            if wf is None:
                raise errors.NotFound("workflow", workflow_id)
            ch.deleted.append(("workflow", workflow_id))
            ch.deleted.extend(("job", j["id"]) for j in jobs)
            ch.deleted.extend(("assignment", a) for a in assignment_ids)
            ch.unqueue.extend((j["id"], j["queue"]) for j in jobs)
            now = self._now()
            for j in jobs:
                ch.event("deleted", {**j, "workflow_id": workflow_id, "status": j["status"]}, now)

        self._write("delete workflow", tx)

    def _refusal(self, conn: sa.Connection, kind: str, entity_id: str, target: str,
                 guard: Mapping[str, Any] | None = None) -> errors.ToolkitError:
        row = store.get(conn, kind, entity_id)
        if row is None:
            return errors.NotFound(kind, entity_id)
        for column, value in (guard or {}).items():
            if row[column] != value:
                field = "attempt" if column == "attempts" else column
                return errors.StaleAttempt(kind, entity_id, field, value, row[column])
        return errors.InvalidTransition(kind, entity_id, row["status"], str(target))

    @staticmethod
    def _attempt_guard(worker_id: str | None, attempt: int | None) -> dict[str, Any] | None:
        guard: dict[str, Any] = {}
        if worker_id is not None:
            guard["worker_id"] = validate.identifier("worker_id", worker_id)
        if attempt is not None:
            guard["attempts"] = validate.integer("attempt", attempt, low=1, high=10_000)
        return guard or None

    def _rollup(self, conn: sa.Connection, workflow_id: str, now: datetime) -> Mapping[str, Any] | None:
        """Recompute a workflow's status from its jobs; return the new row if it changed.

        Two statements: the row lock first, so that the roll-up's snapshot sees
        every concurrent job move that committed before this one could proceed.
        """
        if store.lock_workflow(conn, workflow_id) is None:
            return None
        return store.rollup_workflow(conn, workflow_id, now)

    # -- jobs -----------------------------------------------------------------------------

    def create_job(self, workflow_id: str, name: str, *, priority: int = 0,
                   queue: str = "default", payload: Any = None, max_attempts: int = 3,
                   depends_on: Sequence[str] = (), job_id: str | None = None) -> models.Job:
        """Add a job to a workflow; queued at once unless a dependency is not completed.

        ``depends_on`` names jobs of the same workflow, by id or by name.
        """
        validate.identifier("workflow_id", workflow_id)
        spec = validate.job_specs([{
            "name": name, "priority": priority, "queue": queue, "payload": payload,
            "max_attempts": max_attempts, "id": job_id,
        }])[0]
        deps = validate.names("depends_on", depends_on)
        now = self._now()

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            wf_status = store.lock_workflow(conn, workflow_id)
            if wf_status is None:
                raise errors.NotFound("workflow", workflow_id)
            if wf_status in ("cancelled", "completed"):
                raise errors.ValidationError("workflow_id", workflow_id,
                                             f"the workflow is {wf_status}")
            dep_rows = store.resolve_jobs(conn, workflow_id, deps)
            if len(dep_rows) != len(deps):
                found = {r["id"] for r in dep_rows} | {r["name"] for r in dep_rows}
                missing = [d for d in deps if d not in found]
                raise errors.ValidationError("depends_on", missing, "no such job in the workflow")
            unmet = [r["id"] for r in dep_rows if r["status"] != "completed"]
            seqs = iter(store.next_seqs(conn, 0 if unmet else 1))
            row = self._job_row(workflow_id, {**spec, "depends_on": unmet}, now, seqs)
            row["depends_on"] = [r["id"] for r in dep_rows]
            row["status"] = "pending" if unmet else "queued"
            store.insert(conn, "job", row)
            ch.add("job", row)
            ch.event("created", row, now)
            if row["status"] == "queued":
                ch.event("queued", row, now)
            ch.counters["jobs_created"] += 1

        return self._write("create job", tx)[0]  # type: ignore[return-value]

    def get_job(self, job_id: str) -> models.Job | None:
        """Return a job, or None when there is none with that id."""
        return self._get("job", job_id)  # type: ignore[return-value]

    def list_jobs(self, *, workflow_id: str | None = None, status: str | None = None,
                  worker_id: str | None = None) -> list[models.Job]:
        """Return the jobs matching every filter given, oldest first."""
        if status is not None:
            status = validate.status("status", status, models.JobStatus).value
        for field, value in (("workflow_id", workflow_id), ("worker_id", worker_id)):
            if value is not None:
                validate.identifier(field, value)
        return self._list("job", workflow_id=workflow_id, status=status, worker_id=worker_id)

    def _move(self, job_id: str, target: JS, values: Mapping[str, Any], *,
              end_assignment: str | None = None, release: bool = False,
              rollup: bool = False, counter: str | None = None,
              guard: Mapping[str, Any] | None = None) -> models.Job:
        """Move a job to ``target`` under a status guard, in one transaction."""
        validate.identifier("job_id", job_id)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            now = self._now()
            vals = {k: (now if v is _NOW else v) for k, v in values.items()}
            row, wf_status = store.move_job(
                conn, job_id, {"status": target.value, **vals}, statuses_in=models.job_sources(target),
                now=now, event=_EVENT_OF[target], guard=guard, lock_workflow=rollup)
            if row is None:
                raise self._refusal(conn, "job", job_id, target, guard)
            if end_assignment:
                ch.add_all("assignment",
                           store.end_assignments(conn, end_assignment, now, job_ids=[job_id]))
            if release:
                released = store.release_dependents(conn, row["workflow_id"], job_id, now)
                ch.add_all("job", released)
                for r in released:
                    ch.event("queued", r, now, released_by=job_id)
            ch.rows.insert(0, ("job", row))
            if rollup and wf_status is not None:
                ch.add("workflow", store.rollup_workflow(conn, row["workflow_id"], now))
            if counter:
                ch.counters[counter] += 1

        # A bare move is one statement (the update, its event): it commits by itself.
        alone = not (end_assignment or release or rollup)
        return self._write(f"job -> {target.value}", tx, one_statement=alone)[0]  # type: ignore[return-value]

    def update_job_status(self, job_id: str, status: str, *, result: Any = None,
                          error: str | None = None) -> models.Job:
        """Move a job to ``status`` (the same rules as the dedicated methods).

        ``assigned`` needs a worker: use :meth:`assign_job` or :meth:`dequeue`.
        """
        target = validate.status("status", status, models.JobStatus)
        if target is JS.QUEUED:
            return self.enqueue(job_id)
        if target is JS.RUNNING:
            return self.start_job(job_id)
        if target is JS.COMPLETED:
            return self.complete_job(job_id, result)
        if target is JS.FAILED:
            return self.fail_job(job_id, error or "failed", retry=False)
        if target is JS.CANCELLED:
            return self.cancel_job(job_id)
        raise errors.ValidationError("status", status,
                                     "a job is assigned through assign_job() or dequeue()")

    def enqueue(self, job_id: str) -> models.Job:
        """Queue a pending or failed job (pushed to its queue)."""
        return self._move(job_id, JS.QUEUED, {"enqueue": True, "worker_id": None,
                                              "finished_at": None}, rollup=True)

    def start_job(self, job_id: str, *, worker_id: str | None = None,
                  attempt: int | None = None) -> models.Job:
        """Mark an assigned job running.

        With ``worker_id`` and/or ``attempt`` (what the worker got from
        :meth:`dequeue`), a worker whose attempt was reclaimed meanwhile is
        refused with :class:`~toolkit.errors.StaleAttempt`.
        """
        # No roll-up: assigned and running weigh the same in it, so it cannot change.
        return self._move(job_id, JS.RUNNING, {"started_at": _NOW},
                          guard=self._attempt_guard(worker_id, attempt))

    def complete_job(self, job_id: str, result: Any = None, *, worker_id: str | None = None,
                     attempt: int | None = None) -> models.Job:
        """Complete a running job, queue its ready dependents and roll the workflow up.

        ``worker_id``/``attempt`` fence the call to one attempt, as in :meth:`start_job`:
        a stale attempt's result never overwrites the current attempt's.
        """
        result = validate.json_value("result", result)
        return self._move(job_id, JS.COMPLETED, {"result": result, "finished_at": _NOW},
                          end_assignment="completed", release=True, rollup=True,
                          counter="jobs_completed", guard=self._attempt_guard(worker_id, attempt))

    def cancel_job(self, job_id: str) -> models.Job:
        """Cancel a job that is not final."""
        return self._move(job_id, JS.CANCELLED, {"finished_at": _NOW},
                          end_assignment="cancelled", rollup=True, counter="jobs_cancelled")

    def fail_job(self, job_id: str, error: str, *, retry: bool = True, worker_id: str | None = None,
                 attempt: int | None = None) -> models.Job:
        """Fail an assigned or running job; re-queue it while attempts remain (when ``retry``).

        ``worker_id``/``attempt`` fence the call to one attempt, as in :meth:`start_job`.
        """
        validate.identifier("job_id", job_id)
        error = validate.text("error", error)
        guard = self._attempt_guard(worker_id, attempt)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            now = self._now()
            row = store.fail_job(conn, job_id, error, bool(retry), now, guard)
            if row is None:
                raise self._refusal(conn, "job", job_id, JS.FAILED, guard)
            ch.rows.insert(0, ("job", row))
            ended = store.end_assignments(conn, "failed", now, job_ids=[job_id])
            ch.add_all("assignment", ended)
            failed_by = ended[0]["worker_id"] if ended else None
            ch.event("failed", {**row, "status": "failed"}, now, worker_id=failed_by, error=error)
            if row["status"] == "queued":
                ch.event("retried", row, now, attempts_left=row["max_attempts"] - row["attempts"])
            ch.add("workflow", self._rollup(conn, row["workflow_id"], now))
            ch.counters["jobs_failed"] += 1
            if row["status"] == "queued":
                ch.counters["jobs_retried"] += 1

        return self._write("fail job", tx)[0]  # type: ignore[return-value]

    def assign_job(self, job_id: str, worker_id: str) -> models.JobAssignment:
        """Assign a queued job to a worker directly (bypassing the queue order)."""
        validate.identifier("job_id", job_id)
        self._active_worker(worker_id)

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            self._assign(conn, ch, job_id, worker_id)

        written = self._write("assign job", tx)
        return next(e for e in written if isinstance(e, models.JobAssignment))

    def _assign(self, conn: sa.Connection, ch: _Changes, job_id: str, worker_id: str) -> bool:
        now = self._now()
        row, wf_status = store.move_job(
            conn, job_id, {"status": "assigned", "worker_id": worker_id,
                           "attempts": store.INCREMENT},
            statuses_in=[JS.QUEUED], now=now, event="assigned", lock_workflow=True)
        if row is None:
            return False
        assignment = {"id": validate.new_id(), "job_id": job_id, "worker_id": worker_id,
                      "status": "active", "attempt": row["attempts"], "assigned_at": now,
                      "finished_at": None}
        store.insert(conn, "assignment", assignment)
        ch.add("job", row)
        ch.add("assignment", assignment)
        if wf_status is not None:
            ch.add("workflow", store.rollup_workflow(conn, row["workflow_id"], now))
        ch.counters["jobs_assigned"] += 1
        return True

    def dequeue(self, worker_id: str, *, queues: Sequence[str] | None = None,
                timeout: float = 0.0) -> models.Job | None:
        """Take the best queued job of the worker's queues and assign it to the worker.

        Highest priority first, FIFO within a priority. Waits up to ``timeout``
        seconds for a job. A job is never handed to two workers: Redis pops it
        into an in-flight set and PostgreSQL's status guard decides.
        """
        worker = self._active_worker(worker_id)
        names = list(validate.names("queues", queues) if queues is not None else worker.queues)
        deadline = time.monotonic() + validate.seconds("timeout", timeout, allow_zero=True)
        self._janitor()
        while True:
            claim = queue.claim(self.redis, self.ns, names, time.time() + self.claim_lease)
            if claim is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                time.sleep(min(0.05, left))
                continue
            if self._after_claim is not None:
                self._after_claim(claim.job_id)
            ch = _Changes(action="dequeue")
            try:
                with self.db.begin("dequeue") as conn:
                    won = self._assign(conn, ch, claim.job_id, worker_id)
                    store.insert_events(conn, self.db.schema, ch.events)
            except BaseException:
                queue.settle(self.redis, self.ns, claim, requeue=True)
                raise
            if won:
                return self._apply(ch)[0]  # type: ignore[return-value]
            queue.settle(self.redis, self.ns, claim, requeue=False)

    def _janitor(self, *, force: bool = False) -> int:
        """Return expired in-flight claims to their queues (at most once a second)."""
        now = time.time()
        if not force and now - self._last_janitor < 1.0:
            return 0
        self._last_janitor = now
        return recovery.return_claims(self.db, self.redis, self.ns, before=now)

    # -- workers --------------------------------------------------------------------------

    def register_worker(self, worker_id: str | None = None, *, hostname: str | None = None,
                        queues: Sequence[str] = ("default",), capacity: int = 1,
                        metadata: Mapping[str, Any] | None = None) -> models.Worker:
        """Register a worker (or register it again: active, with the new fields)."""
        now = self._now()
        row = {
            "id": validate.optional_id("worker_id", worker_id),
            "hostname": validate.identifier(
                "hostname", socket.gethostname() if hostname is None else hostname),
            "status": "active", "queues": list(validate.names("queues", queues)),
            "capacity": validate.integer("capacity", capacity, low=1, high=100_000),
            "metadata": validate.json_object("metadata", metadata),
            "last_heartbeat": now, "registered_at": now, "version": 1,
        }
        if not row["queues"]:
            raise errors.ValidationError("queues", queues, "must name at least one queue")

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            ch.add("worker", store.upsert_worker(conn, row))

        worker = self._write("register worker", tx)[0]
        self._beat_redis([worker.id], time.time())
        return worker  # type: ignore[return-value]

    def get_worker(self, worker_id: str) -> models.Worker | None:
        """Return a worker, or None when there is none with that id."""
        return self._get("worker", worker_id)  # type: ignore[return-value]

    def list_workers(self, *, status: str | None = None) -> list[models.Worker]:
        """Return every worker (with that status, when given), oldest first."""
        if status is not None:
            status = validate.status("status", status, models.WorkerStatus).value
        return self._list("worker", status=status)

    def _active_worker(self, worker_id: str) -> models.Worker:
        worker: models.Worker = self._require("worker", worker_id)
        if worker.status is not models.WorkerStatus.ACTIVE:
            raise errors.ValidationError("worker_id", worker_id,
                                         "the worker is inactive; register it again")
        return worker

    def heartbeat(self, worker_id: str) -> None:
        """Record that a worker is alive (a Redis key with TTL ``heartbeat_ttl``).

        PostgreSQL's ``last_heartbeat`` is written in batches at a throttled
        rate. A heartbeat from an inactive worker makes it active again.
        """
        self.heartbeat_many([worker_id])

    def heartbeat_many(self, worker_ids: Sequence[str]) -> None:
        """Record heartbeats of many workers at once (one Redis round trip).

        The same rules as :meth:`heartbeat`, for a process that beats for a
        pool of workers.

        Raises
        ------
        NotFound
            One of the workers is not registered; no heartbeat is recorded.
        """
        ids = list(dict.fromkeys(validate.names("worker_ids", worker_ids)))
        workers: list[models.Worker] = [self._require("worker", w) for w in ids]
        idle = [w.id for w in workers if w.status is not models.WorkerStatus.ACTIVE]
        if idle:
            def tx(conn: sa.Connection, ch: _Changes) -> None:
                for wid in idle:
                    ch.add("worker", store.update(conn, "worker", wid, {"status": "active"}))
            self._write("reactivate workers", tx)
        now = self._now()
        self._beat_redis(ids, now.timestamp())
        with self._beat_lock:
            self._pending_beats.update(dict.fromkeys(ids, now))
        if time.monotonic() - self._last_beat_flush >= self._beat_interval:
            self._flush_heartbeats()

    @property
    def _beat_interval(self) -> float:
        return min(10.0, max(1.0, self.settings.heartbeat_ttl / 3))

    def _beat_redis(self, worker_ids: list[str], now: float) -> None:
        def go() -> None:
            pipe = self.redis.pipeline()
            heartbeats.beat(self.ns, worker_ids, now, self.settings.heartbeat_ttl, pipe=pipe)
            pipe.execute()

        self.redis.call("heartbeat", go)

    def _flush_heartbeats(self) -> None:
        with self._beat_lock:
            beats, self._pending_beats = self._pending_beats, {}
            self._last_beat_flush = time.monotonic()
        if not beats:
            return

        def tx(conn: sa.Connection, ch: _Changes) -> None:
            ch.add_all("worker", store.record_heartbeats(conn, beats))

        self._write("record heartbeats", tx)

    def active_workers(self) -> list[str]:
        """Return the ids of workers whose heartbeat has not expired."""
        cutoff = time.time() - self.settings.heartbeat_ttl
        seen = heartbeats.last_seen(self.redis, self.ns)
        return sorted(w for w, t in seen.items() if t >= cutoff)

    def inactive_workers(self) -> list[str]:
        """Return the ids of registered workers without a live heartbeat."""
        alive = set(self.active_workers())
        return sorted(w.id for w in self.list_workers() if w.id not in alive)

    def deregister_worker(self, worker_id: str) -> models.Worker:
        """Make a worker inactive and put its active jobs back in their queues."""
        self._require("worker", worker_id)
        written = self._retire_worker(worker_id, "reclaimed", respect_attempts=False,
                                      guard=None, rule="worker deregistered")
        self._forget_heartbeat(worker_id)
        return next(e for e in written if isinstance(e, models.Worker))

    def _forget_heartbeat(self, worker_id: str) -> None:
        def go() -> None:
            pipe = self.redis.pipeline()
            heartbeats.forget(self.ns, worker_id, pipe=pipe)
            pipe.execute()

        try:
            self.redis.call("forget heartbeat", go)
        except errors.StorageUnavailable as exc:
            log.warning("heartbeat of %s not removed: %s", worker_id, exc,
                        extra={"action": "deregister"})

    def _retire_worker(self, worker_id: str, ending: str, *, respect_attempts: bool,
                       guard: Sequence[str] | None, rule: str,
                       heartbeat_age_s: float | None = None) -> list[models.Entity]:
        def tx(conn: sa.Connection, ch: _Changes) -> None:
            now = self._now()
            row = store.update(conn, "worker", worker_id, {"status": "inactive"},
                               statuses_in=guard)
            if row is None:
                return
            ended = store.end_assignments(conn, ending, now, worker_id=worker_id)
            jobs = store.reclaim_jobs(conn, [a["job_id"] for a in ended], now,
                                      respect_attempts=respect_attempts)
            ch.add("worker", row)
            ch.add_all("assignment", ended)
            ch.add_all("job", jobs)
            for j in jobs:
                ch.event("reclaimed", j, now, worker_id=worker_id, rule=rule,
                         heartbeat_age_s=heartbeat_age_s)
            for wf in sorted({j["workflow_id"] for j in jobs}):
                ch.add("workflow", self._rollup(conn, wf, now))
            ch.counters["jobs_reclaimed"] += len(jobs)

        return self._write("retire worker", tx)

    def reap_dead_workers(self) -> list[models.Job]:
        """Retire workers whose heartbeat expired; re-queue (or fail) their active jobs.

        A worker is dead when no heartbeat was seen for ``heartbeat_ttl`` seconds,
        counting from the latest of its last heartbeat in Redis or PostgreSQL,
        its registration and the time Redis's data began (so a Redis that lost
        its data does not make every worker look dead). Returns the jobs touched.
        """
        self._janitor(force=True)
        now = time.time()
        boot = heartbeats.boot_time(self.redis, self.ns, now)
        seen = heartbeats.last_seen(self.redis, self.ns)
        touched: list[models.Job] = []
        for w in self.list_workers(status="active"):
            last = max(seen.get(w.id, 0.0), _ts(w.last_heartbeat), _ts(w.registered_at), boot)
            if now - last <= self.settings.heartbeat_ttl:
                continue
            written = self._retire_worker(
                w.id, "reclaimed", respect_attempts=True, guard=["active"],
                rule=f"no heartbeat for heartbeat_ttl={self.settings.heartbeat_ttl}s",
                heartbeat_age_s=round(now - last, 3))
            touched.extend(e for e in written if isinstance(e, models.Job))
            if written:
                log.info("reaped worker %s (no heartbeat for %.1fs)", w.id, now - last,
                         extra={"action": "reap"})
        return touched

    # -- assignments ----------------------------------------------------------------------

    def list_assignments(self, *, job_id: str | None = None, worker_id: str | None = None,
                         status: str | None = None) -> list[models.JobAssignment]:
        """Return the assignments matching every filter given, oldest first."""
        if status is not None:
            status = validate.status("status", status, models.AssignmentStatus).value
        for field, value in (("job_id", job_id), ("worker_id", worker_id)):
            if value is not None:
                validate.identifier(field, value)
        return self._list("assignment", job_id=job_id, worker_id=worker_id, status=status)

    # -- locks and metrics ----------------------------------------------------------------

    def lock(self, name: str, *, ttl: float = 30.0, blocking_timeout: float | None = None) -> Lock:
        """Return a distributed lock (not yet acquired); use it as a context manager."""
        return Lock(self.redis, self.ns, name, ttl=ttl, blocking_timeout=blocking_timeout,
                    reserve=self._reserve_fences)

    FENCE_BLOCK = 1000
    """Fencing tokens reserved in PostgreSQL at a time (one PostgreSQL write per block)."""

    def _reserve_fences(self, name: str, seen: int) -> tuple[int, int]:
        with self.db.begin("reserve fencing tokens") as conn:
            return store.reserve_fences(conn, name, seen, self.FENCE_BLOCK)

    def incr_metric(self, name: str, amount: int = 1, *, at: datetime | None = None) -> int:
        """Add ``amount`` to a counter (and its time bucket); return the new total.

        Sent once: after a timeout it raises ``StorageUnavailable`` rather than
        risk counting twice.

        Parameters
        ----------
        name
            Counter name.
        amount
            Integer to add (may be negative).
        at
            Timezone-aware time whose bucket gets the increment (default: now);
            for importing or backfilling a history.
        """
        validate.identifier("name", name)
        validate.integer("amount", amount, low=-(2**53), high=2**53)
        if at is not None and (not isinstance(at, datetime) or at.tzinfo is None):
            raise errors.ValidationError("at", at, "must be a timezone-aware datetime")
        when = time.time() if at is None else at.timestamp()
        total = metrics.incr(self.redis, self.ns, name, amount, when)
        if time.monotonic() - self._last_checkpoint > 5.0:
            self.checkpoint_metrics()
        return int(total)

    def incr_metrics(self, amounts: Mapping[str, int]) -> dict[str, int]:
        """Add to many counters at once (one Lua call per 1,000); return their new totals.

        Like :meth:`incr_metric`, sent once and never re-sent after a timeout.
        """
        if not isinstance(amounts, Mapping):
            raise errors.ValidationError("amounts", amounts, "must be a mapping of name to integer")
        for name, amount in amounts.items():
            validate.identifier("name", name)
            validate.integer("amount", amount, low=-(2**53), high=2**53)
        totals = metrics.incr_many(self.redis, self.ns, amounts, time.time())
        if time.monotonic() - self._last_checkpoint > 5.0:
            self.checkpoint_metrics()
        return totals

    def get_metric(self, name: str) -> int:
        """Return a counter's total (0 when it was never incremented)."""
        validate.identifier("name", name)
        return metrics.get(self.redis, self.ns, name)

    def metrics(self) -> dict[str, int]:
        """Return every counter's total."""
        return metrics.totals(self.redis, self.ns)

    def checkpoint_metrics(self) -> None:
        """Copy counters and their time buckets to PostgreSQL (never lowering a value)."""
        recovery.checkpoint_metrics(self.db, self.redis, self.ns)
        self._last_checkpoint = time.monotonic()

    # -- retention ------------------------------------------------------------------------

    def purge(self, older_than: float | timedelta, *,
              statuses: Sequence[str] = ("completed", "cancelled"), batch: int = 1000,
              dry_run: bool = False, progress: bool | None = None) -> int:
        """Remove finished jobs, their assignments and their events, in batches.

        Parameters
        ----------
        older_than
            Seconds (or a ``timedelta``) since the job finished.
        statuses
            Which finished statuses to remove: ``completed``, ``cancelled``
            and/or ``failed`` (failed for good). A live job is never removed.
        batch
            Jobs per transaction.
        dry_run
            Count what would be removed, remove nothing.
        progress
            Show a progress bar (default: when more than one batch).

        Returns
        -------
        int
            How many jobs were removed (or would be, with ``dry_run``).
        """
        age = older_than.total_seconds() if isinstance(older_than, timedelta) else older_than
        age = validate.seconds("older_than", age, allow_zero=True)
        allowed = {"completed", "cancelled", "failed"}
        chosen = [validate.status("statuses", st, models.JobStatus).value for st in
                  validate.names("statuses", statuses)]
        if not chosen or not set(chosen) <= allowed:
            raise errors.ValidationError("statuses", statuses, f"must be some of {sorted(allowed)}")
        batch = validate.integer("batch", batch, low=1, high=100_000)
        before = self._now() - timedelta(seconds=age)
        with self.db.begin("purge: count") as conn:
            total = store.purgeable(conn, chosen, before)
        if dry_run or not total:
            return total
        from tqdm.auto import tqdm

        show = total > batch if progress is None else progress
        removed = 0
        with tqdm(total=total, disable=not show, desc="purge", unit="job", leave=False) as bar:
            while True:
                def tx(conn: sa.Connection, ch: _Changes) -> None:
                    jobs, assignment_ids = store.purge_batch(conn, chosen, before, batch)
                    ch.deleted.extend(("job", r["id"]) for r in jobs)
                    ch.deleted.extend(("assignment", a) for a in assignment_ids)
                    ch.unqueue.extend((r["id"], r["queue"]) for r in jobs)
                    ch.counters["jobs_purged"] += len(jobs)

                changes = _Changes(action="purge")
                with self.db.begin("purge") as conn:
                    tx(conn, changes)
                done = sum(1 for kind, _ in changes.deleted if kind == "job")
                self._apply(changes)
                removed += done
                bar.update(done)
                if done < batch:
                    return removed

    # -- recovery -------------------------------------------------------------------------

    def _rebuild_from_db(self, *, progress: bool | None = None) -> recovery.RebuildReport:
        """Reload memory from PostgreSQL and make Redis match it; see :mod:`toolkit.recovery`."""
        self.last_rebuild = recovery.rebuild(self.db, self.redis, self.ns, self.memory,
                                             progress=progress)
        return self.last_rebuild

    def check_consistency(self) -> recovery.ConsistencyReport:
        """Compare memory and Redis with PostgreSQL; one row per disagreement."""
        return recovery.check(self.db, self.redis, self.ns, self.memory)

    def repair(self) -> recovery.ConsistencyReport:
        """Make memory and Redis agree with PostgreSQL; return what was found and fixed."""
        return recovery.repair(self.db, self.redis, self.ns, self.memory)


_EVENT_OF = {JS.QUEUED: "queued", JS.RUNNING: "started", JS.COMPLETED: "completed",
             JS.CANCELLED: "cancelled"}


class _Now:
    """Placeholder for 'the transaction's now' in update values."""


_NOW = _Now()


def init_state_manager(database_url: str | None = None, redis_url: str | None = None, *,
                       namespace: str = "wf", schema: str = "public",
                       heartbeat_ttl: float = 30.0, rebuild: bool = True,
                       require_noeviction: bool = False) -> StateManager:
    """Connect, create or upgrade the schema, and rebuild memory and Redis from PostgreSQL.

    Parameters
    ----------
    database_url, redis_url
        Default to the environment variables ``DATABASE_URL`` and ``REDIS_URL``.
    namespace
        Prefix of every Redis key (as a hash tag).
    schema
        PostgreSQL schema of the tables.
    heartbeat_ttl
        Seconds after the last heartbeat at which a worker counts as dead.
    rebuild
        Call ``_rebuild_from_db()`` before returning.
    require_noeviction
        Strict mode: refuse a Redis whose ``maxmemory-policy`` is not ``noeviction``
        (without it, such a Redis is only named in a warning, in the log and in
        ``check_consistency().warnings``). A Redis that will not show its CONFIG is
        warned about, not refused.

    Raises
    ------
    ConfigurationError
        A URL is missing or malformed, or a setting is invalid, or (strict mode)
        Redis may evict keys.
    StorageUnavailable
        PostgreSQL or Redis cannot be reached (the message names host and port).
    """
    settings = config.load_settings(database_url, redis_url, namespace=namespace,
                                    schema=schema, heartbeat_ttl=heartbeat_ttl)
    sm = StateManager(settings, listen=False)
    try:
        migrate.upgrade(sm.db)
        sm.redis.call("ping", sm.redis.redis.ping)
        _check_eviction(sm, require_noeviction)
        sm._listener.start()
        if not sm._listener.wait_subscribed(SUBSCRIBE_WAIT):
            log.warning("no invalidation subscription after %.0fs: memory is not used until "
                        "there is one", SUBSCRIBE_WAIT, extra={"action": "invalidate"})
        if rebuild:
            report = sm._rebuild_from_db()
            log.info("rebuilt from PostgreSQL: %s", report, extra={"action": "rebuild"})
    except BaseException:
        sm.close()
        raise
    return sm



def _check_eviction(sm: StateManager, strict: bool) -> None:
    """Name a Redis that may evict our keys (log), or refuse it in strict mode."""
    risk = sm.eviction_risk = eviction.read(sm.redis)
    if strict and risk.policy is not None and risk.policy != eviction.SAFE_POLICY:
        raise errors.ConfigurationError(f"require_noeviction: {risk.finding}")
    eviction.announce(risk)
