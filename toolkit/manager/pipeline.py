"""The write pipeline and the read path: the only code that moves data between the three tiers.

Write: the caller validates, then :meth:`Pipeline.write` runs its transaction
function in one PostgreSQL transaction (or one autocommitted statement), which
records what it changed in a :class:`Changes` batch; after the commit the batch
goes to Redis in one pipeline (versioned cache fills, queue moves, invalidation
messages, counters), then to memory. A Redis failure after the commit does not
fail the call: the write stands and Redis is left for ``repair()``. A batch is
the unit: one job is a batch of one, and a batch commits once.

Read: memory, then Redis, then PostgreSQL; each miss fills the tiers above it
with versioned writes that never overwrite a newer entry.

Touches: every tier, through its own functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import config, errors, failpoints, models, retry_policy, single_flight, validate
from toolkit.handles import Tiers
from toolkit.manager.watermark import Watermark
from toolkit.models import EntityKind as Kind
from toolkit.models import JobStatus as JS
from toolkit.recovery import invalidation
from toolkit.recovery.fast_start import heal_redis
from toolkit.tiers.memory import KINDS, Memory
from toolkit.tiers.postgres import db as pg_db
from toolkit.tiers.postgres import direct, lifecycle, records, store
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import cache, metrics, queue, schedule, watermark
from toolkit.tiers.redis.client import Client

log = logging.getLogger(__name__)

DELETED = 2**62
"""Version announced when an entity is deleted: every cached copy is older."""
MEMORY_MAX_AGE = 5.0
"""Seconds a memory entry may answer reads after it was stored: the worst-case staleness of
a read, whatever invalidations were lost (see :mod:`toolkit.recovery.invalidation`)."""
TX_ATTEMPTS = 3
"""Runs of a write transaction that meets a serialization failure or a deadlock."""


@dataclasses.dataclass
class Changes:
    """A batch: what one committed transaction changed, to be pushed to Redis and memory."""

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


Transaction = Callable[[sa.Connection, Changes], None]
"""What a verb runs inside the transaction: statements, and the changes they made."""

_ROW_BUILDERS = {kind: (models.row_builder(kind), models.field_names(kind))
                 for kind in models.ENTITY_TYPES}
"""Kind -> (fast positional constructor, field names), for :func:`build_entities`."""


def build_entities(rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[models.Entity]:
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


def queue_moves(rows: Sequence[tuple[str, Mapping[str, Any]]]
                ) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str]]]:
    """Return the queue pushes and removals that job rows make, to send in bulk.

    Sending every removal, then the pushes of the ``(job, queue)`` pairs whose
    last row is queued, leaves what one push or removal per row in order left.
    """
    last: dict[tuple[str, str], Mapping[str, Any]] = {}
    removes: list[tuple[str, str]] = []
    for kind, row in rows:
        if kind != Kind.JOB:
            continue
        pair = (row["id"], row["queue"])
        last[pair] = row
        if row["status"] != JS.QUEUED:
            removes.append(pair)
    pushes = [(job_id, q, row["priority"], row["enqueue_seq"])
              for (job_id, q), row in last.items() if row["status"] == JS.QUEUED]
    return pushes, removes


def split_scheduled(rows: Sequence[tuple[str, Mapping[str, Any]]],
                    pushes: list[tuple[str, str, int, int]], now: float
                    ) -> tuple[list[tuple[str, str, int, int]], list[tuple[str, str, int, int, float]]]:
    """Split queue pushes into the jobs due now and those scheduled later (with their due time).

    A job whose last row has ``run_at`` after ``now`` goes to its queue's due-time set.
    """
    if not pushes or all(row.get("run_at") is None for _, row in rows):
        return pushes, []  # the usual batch: one pass, nothing built
    due_at = {row["id"]: row.get("run_at") for kind, row in rows if kind == Kind.JOB}
    ready: list[tuple[str, str, int, int]] = []
    later: list[tuple[str, str, int, int, float]] = []
    for push in pushes:
        at = due_at.get(push[0])
        due = at.timestamp() if at is not None else 0.0
        if due > now:
            later.append((*push, due))
        else:
            ready.append(push)
    return ready, later


class Pipeline:
    """The three tiers of one StateManager, and the paths through them."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.ns = settings.namespace
        self.db = Database(settings.database_url, settings.schema,
                           synchronous_commit=settings.synchronous_commit)
        self.redis = Client(settings.redis_url, namespace=settings.namespace)
        self.memory = Memory()
        self.tiers = Tiers(self.db, self.redis, self.ns, self.memory)
        self.listener = invalidation.InvalidationListener(self.redis, self.ns, self.memory, KINDS)
        self.watermark = Watermark(self.redis, self.ns)
        self.watermark.async_commits = settings.synchronous_commit == "off"
        self.watermark.heal = functools.partial(heal_redis, self.tiers)
        self.memory_max_age = MEMORY_MAX_AGE
        self.tx_attempts = TX_ATTEMPTS
        self.retry_policy: retry_policy.RetryPolicy | retry_policy.Backoff = retry_policy.RetryPolicy()
        """The default wait before a retry (``StateManager.retry_policy``)."""
        self._cold_reads: single_flight.SingleFlight[models.Entity | None] = \
            single_flight.SingleFlight()

    @staticmethod
    def now() -> datetime:
        return models.utcnow()

    # -- writes -------------------------------------------------------------------------

    def write(self, action: str, fn: Transaction, *, one_statement: bool = False,
              opens: bool = False) -> list[models.Entity]:
        """Run ``fn(conn, changes)`` in one transaction, then apply the changes.

        ``one_statement``: ``fn`` writes with a single statement (reads after it
        are allowed), which then commits by itself, without BEGIN and COMMIT.
        ``opens``: ``fn``'s first statement goes through ``direct`` and carries the
        transaction's BEGIN (``direct.explicit``): one round trip less.
        """
        mode = "one statement" if one_statement else "opens" if opens else "begin"
        with self.watermark.pending():
            return self.apply(self._commit(action, fn, mode))

    def commit(self, action: str, fn: Transaction) -> Changes:
        """Run ``fn`` in one transaction and return its changes, not yet applied: the caller
        is inside the watermark and applies them (see :mod:`toolkit.manager.behind`)."""
        return self._commit(action, fn, "begin")

    def note_unknown_outcome(self, exc: errors.StorageUnavailable, *, sent: bool) -> None:
        """After a write failed: when the connection failed inside the transaction (no
        answer from the server, the ``COMMIT`` perhaps sent), PostgreSQL may have committed
        with Redis never told. Keep the watermark before this write until a repair, so a
        fast start replays it. An error the server answered, or one before anything was
        sent, changed nothing."""
        if sent and pg_db.sqlstate(exc) is None:
            self.watermark.failed()

    @contextlib.contextmanager
    def _transaction(self, action: str, mode: str) -> Iterator[sa.Connection]:
        if mode == "begin":
            with self.db.begin(action) as conn:
                yield conn
        else:
            with self.db.autocommit(action) as conn:
                if mode == "one statement":
                    yield conn
                else:
                    with self.db.translate(action), direct.explicit(conn):
                        yield conn

    def _commit(self, action: str, fn: Transaction, mode: str) -> Changes:
        """Run ``fn`` in a transaction; run it again (fresh) after a serialization failure
        or a deadlock, which PostgreSQL rolled back whole. Other errors raise at once."""
        for attempt in range(1, self.tx_attempts + 1):
            changes = Changes(action=action)
            sent = False
            try:
                with self._transaction(action, mode) as conn:
                    sent = True
                    fn(conn, changes)
                    if mode == "one statement":
                        assert not changes.events, "events need a transaction"
                    records.insert_events(conn, self.db.schema, changes.events)
                return changes
            except errors.StorageUnavailable as exc:
                self.note_unknown_outcome(exc, sent=sent)
                if attempt == self.tx_attempts or not pg_db.retryable(exc):
                    raise
                log.info("%s: %s; running it again (attempt %d)", action, exc, attempt + 1,
                         extra={"action": "retry_transaction"})
                time.sleep(random.uniform(0.0, 0.02 * attempt))
        raise AssertionError("unreachable")

    def apply(self, changes: Changes) -> list[models.Entity]:
        """Push committed changes to Redis (one pipeline), then memory. Never raises."""
        entities = build_entities(changes.rows)
        queued = sum(1 for kind, row in changes.rows if kind == Kind.JOB and row["status"] == JS.QUEUED)
        if queued:
            changes.counters["jobs_queued"] += queued
        failpoints.reach("after_commit", changes.action)
        try:
            self._push_redis(changes, entities)
        except Exception as exc:  # noqa: BLE001 - the write is committed: never report it failed
            log.warning("committed to PostgreSQL but Redis was not updated (caught up once "
                        "Redis answers again): %s", exc, extra={"action": "write_redis"})
            self.watermark.failed()
            self._drop_cached(entities, changes)
        for e in entities:
            self.memory.put(cache.kind_of(e), e)
        for kind, entity_id in changes.deleted:
            self.memory.drop(kind, entity_id)
        return entities

    def _push_redis(self, changes: Changes, entities: list[models.Entity]) -> None:
        def go() -> None:
            pipe = self.redis.commands()
            cache.put(self.redis, self.ns, entities, pipe=pipe)
            pushes, removes = queue_moves(changes.rows)
            pushes, later = split_scheduled(changes.rows, pushes, time.time())
            # Removals first: a job leaving one queue for another keeps what its push wrote
            # (a scheduled job's queue score is keyed by the job alone).
            queue.remove_many(self.ns, removes, pipe=pipe)
            queue.remove_many(self.ns, changes.unqueue, pipe=pipe)
            queue.push_many(self.ns, pushes, pipe=pipe)
            schedule.add_many(self.ns, later, pipe=pipe)
            for kind, entity_id in changes.deleted:
                cache.delete(self.ns, kind, [entity_id], pipe=pipe)
            watermark.done_deleting(self.ns, changes.deleted, pipe=pipe)
            announced = [(cache.kind_of(e), models.entity_version(e), e.id) for e in entities]
            announced += [(kind, DELETED, entity_id) for kind, entity_id in changes.deleted]
            cache.publish_many(self.ns, announced, pipe=pipe)
            metrics.incr_many_on(self.redis, self.ns, changes.counters, time.time(), pipe=pipe)
            self.redis.send_commands(pipe)

        # Not idempotent as a whole (counters), so never re-sent.
        self.redis.call("write-through", go, idempotent=False)

    def restore(self, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> list[models.Entity]:
        """Bring Redis up to rows read from PostgreSQL without writing them (a replayed create).

        Fills the cache (versioned: never over a newer entry), announces the entities on
        the invalidation channel (another process may hold an older one in memory), and
        puts each job that the rows call queued back in its queue when no queue holds it
        and it is not in flight (``ZADD NX``): what the lost first call's Redis update
        would have done. Best
        effort, like every Redis step after a commit; returns the entities.
        """
        entities = build_entities(rows)
        self.fill_redis(entities, announce=True)
        pushes, _ = queue_moves(rows)
        pushes, later = split_scheduled(rows, pushes, time.time())
        if pushes or later:
            try:
                inflight = queue.inflight_ids(self.redis, self.ns)
                pipe = self.redis.pipeline()
                queue.push_missing(self.ns, [p for p in pushes if p[0] not in inflight], pipe=pipe)
                schedule.add_many(self.ns, later, pipe=pipe)
                self.redis.call("restore queued jobs", pipe.execute)
            except errors.StorageUnavailable as exc:
                log.warning("queued jobs not restored to Redis (repair() will): %s", exc,
                            extra={"action": "restore_queued"})
        return entities

    def resync_jobs(self, job_ids: Sequence[str]) -> None:
        """Bring Redis and memory up to PostgreSQL for jobs a call may have moved without
        saying so (its ``COMMIT``'s reply was lost), and for what that move touched: their
        assignments, their workflows, the dependents it released (put in their queue when
        no queue holds them). Versioned: a newer entry stays."""
        with self.db.begin("resync jobs") as conn:
            rows = lifecycle.touched(conn, job_ids)
        for e in self.restore(rows):
            self.memory.put(cache.kind_of(e), e)

    def note_deleting(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Note in Redis, before the commit, the ``(kind, id)`` a transaction is deleting.

        A delete leaves no row to find: a coordinator that dies between the commit
        and the cache update is caught by this note at the next fast start. When
        Redis cannot take it, the watermark drops to 0 (only a full rebuild will do).
        """
        try:
            watermark.note_deleting(self.redis, self.ns, pairs)
        except errors.StorageUnavailable:
            self.watermark.failed(everything=True)

    def _drop_cached(self, entities: list[models.Entity], changes: Changes) -> None:
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

    @staticmethod
    def refusal(conn: sa.Connection, kind: str, entity_id: str, target: str,
                guard: Mapping[str, Any] | None = None) -> errors.ToolkitError:
        """The error for a guarded write that changed nothing: why, read from PostgreSQL."""
        row = store.get(conn, kind, entity_id)
        if row is None:
            return errors.NotFound(kind, entity_id)
        for column, value in (guard or {}).items():
            if row[column] != value:
                field = "attempt" if column == "attempts" else column
                return errors.StaleAttempt(kind, entity_id, field, value, row[column])
        return errors.InvalidTransition(kind, entity_id, row["status"], str(target))

    # -- reads --------------------------------------------------------------------------

    def get(self, kind: str, entity_id: Any) -> models.Entity | None:
        """Memory, then Redis, then PostgreSQL; a miss fills the tiers above it.

        Memory answers only while the invalidation listener hears every change, and
        only for ``memory_max_age`` seconds after an entry was stored. Cold reads of one
        entity are single-flight: concurrent readers in this process share one read.
        """
        entity_id = validate.identifier(f"{kind}_id", entity_id)
        if self.listener.trusted:  # no invalidation missed since memory was emptied
            found = self.memory.get_fresh(kind, entity_id, self.memory_max_age)
            if found is not None:
                return found
        return self._cold_reads.do((kind, entity_id), lambda: self._get_cold(kind, entity_id))

    def _get_cold(self, kind: str, entity_id: str) -> models.Entity | None:
        """Redis, then PostgreSQL; one at a time per entity in this process (single flight)."""
        epoch = self.listener.epoch
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
            self.fill_redis([found])
        self.listener.put_if_current(kind, found, epoch)
        return found

    def require(self, kind: str, entity_id: Any) -> Any:
        """Like :meth:`get`, but raise ``NotFound`` when there is no such entity."""
        found = self.get(kind, entity_id)
        if found is None:
            raise errors.NotFound(kind, entity_id)
        return found

    def fill_redis(self, entities: list[models.Entity], *, announce: bool = False) -> None:
        """Put ``entities`` in the cache (versioned: never over a newer entry); ``announce``:
        also publish them on the invalidation channel, for entities a commit changed without
        saying so (its reply was lost), which other processes may hold older in memory."""
        try:
            pipe = self.redis.pipeline()
            cache.put(self.redis, self.ns, entities, pipe=pipe)
            if announce:
                cache.publish_many(self.ns, [(cache.kind_of(e), models.entity_version(e), e.id)
                                             for e in entities], pipe=pipe)
            self.redis.call("cache fill", pipe.execute)
        except errors.StorageUnavailable as exc:
            log.debug("cache fill skipped: %s", exc, extra={"action": "cache_fill"})

    def select(self, kind: str, **equal: Any) -> list[Any]:
        """Every row of ``kind`` whose columns equal the non-None filters, from PostgreSQL."""
        with self.db.begin(f"list {kind}s") as conn:
            rows = store.select_where(conn, kind, **equal)
        return [models.from_dict(kind, r) for r in rows]
