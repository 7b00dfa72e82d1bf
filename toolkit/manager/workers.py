"""Workers: registration, heartbeats, liveness, and retiring a worker (deregistered or dead).

Heartbeats go to Redis at once (a key with TTL ``heartbeat_ttl`` plus a
last-seen sorted set) and to PostgreSQL's ``last_heartbeat`` in batches, at
most every ``heartbeat_ttl / 3`` seconds (between 1 and 10 s), so a thousand
workers beating each second are not a thousand PostgreSQL writes a second.

Uses ``jobs.rollup`` for the workflows of reclaimed jobs; the tiers through the
pipeline, ``store`` and ``tiers/redis/heartbeats.py``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from toolkit import errors, models, validate
from toolkit.manager import jobs
from toolkit.manager.pipeline import Changes, Pipeline
from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import lifecycle, store
from toolkit.tiers.redis import heartbeats

log = logging.getLogger(__name__)

ORPHAN_CAP = 3
"""A job whose worker died this many times while holding it is failed, not queued again."""

WS = models.WorkerStatus


def _ts(dt: datetime | None) -> float:
    return dt.timestamp() if dt is not None else 0.0


class Workers:
    """The worker verbs of a StateManager."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self.orphan_cap = ORPHAN_CAP
        self.lock = threading.Lock()
        self._pending_beats: dict[str, datetime] = {}
        self._last_flush = time.monotonic()

    @property
    def ttl(self) -> float:
        """The heartbeat TTL (recorded in PostgreSQL when the manager started)."""
        return self.pipe.settings.heartbeat_ttl

    def register(self, worker_id: str | None = None, *, hostname: str | None = None,
                 queues: Sequence[str] = ("default",), capacity: int = 1,
                 metadata: Mapping[str, Any] | None = None) -> models.Worker:
        """Register a worker (or register it again: active, with the new fields)."""
        now = self.pipe.now()
        row = {
            "id": validate.optional_id("worker_id", worker_id),
            "hostname": validate.identifier(
                "hostname", socket.gethostname() if hostname is None else hostname),
            "status": WS.ACTIVE.value, "queues": list(validate.names("queues", queues)),
            "capacity": validate.integer("capacity", capacity, low=1, high=100_000),
            "metadata": validate.json_object("metadata", metadata),
            "last_heartbeat": now, "registered_at": now, "version": 1,
        }
        if not row["queues"]:
            raise errors.ValidationError("queues", queues, "must name at least one queue")

        def tx(conn: sa.Connection, ch: Changes) -> None:
            ch.add(Kind.WORKER, store.upsert_worker(conn, row))

        worker = self.pipe.write("register worker", tx)[0]
        self._beat_redis([worker.id], time.time())
        return worker  # type: ignore[return-value]

    def get(self, worker_id: str) -> models.Worker | None:
        """Return a worker, or None when there is none with that id."""
        return self.pipe.get(Kind.WORKER, worker_id)  # type: ignore[return-value]

    def find(self, *, status: str | None = None) -> list[models.Worker]:
        """Return every worker (with that status, when given), oldest first."""
        if status is not None:
            status = validate.status("status", status, WS).value
        return self.pipe.select(Kind.WORKER, status=status)

    def assignments(self, *, job_id: str | None = None, worker_id: str | None = None,
                    status: str | None = None) -> list[models.JobAssignment]:
        """Return the assignments matching every filter given, oldest first."""
        if status is not None:
            status = validate.status("status", status, models.AssignmentStatus).value
        for field, value in (("job_id", job_id), ("worker_id", worker_id)):
            if value is not None:
                validate.identifier(field, value)
        return self.pipe.select(Kind.ASSIGNMENT, job_id=job_id, worker_id=worker_id, status=status)

    def require_active(self, worker_id: str) -> models.Worker:
        """The worker, which must exist and be active."""
        worker: models.Worker = self.pipe.require(Kind.WORKER, worker_id)
        if worker.status is not WS.ACTIVE:
            raise errors.ValidationError("worker_id", worker_id,
                                         "the worker is inactive; register it again")
        return worker

    # -- heartbeats -----------------------------------------------------------------------

    def heartbeat(self, worker_id: str) -> None:
        """Record that a worker is alive (a Redis key with TTL ``heartbeat_ttl``).

        PostgreSQL's ``last_heartbeat`` is written in batches at a throttled
        rate. A heartbeat from an inactive worker makes it active again.
        """
        self.heartbeat_many([worker_id])

    def heartbeat_many(self, worker_ids: Sequence[str]) -> None:
        """Record heartbeats of many workers at once (one Redis round trip).

        PostgreSQL's ``last_heartbeat`` is written in batches at a throttled
        rate. A heartbeat from an inactive worker makes it active again.

        Raises
        ------
        NotFound
            One of the workers is not registered; no heartbeat is recorded.
        """
        ids = list(dict.fromkeys(validate.names("worker_ids", worker_ids)))
        workers: list[models.Worker] = [self.pipe.require(Kind.WORKER, w) for w in ids]
        idle = [w.id for w in workers if w.status is not WS.ACTIVE]
        if idle:
            def tx(conn: sa.Connection, ch: Changes) -> None:
                for wid in idle:
                    ch.add(Kind.WORKER, store.update(conn, Kind.WORKER, wid, {"status": WS.ACTIVE.value}))
            self.pipe.write("reactivate workers", tx)
        now = self.pipe.now()
        self._beat_redis(ids, now.timestamp())
        with self.lock:
            self._pending_beats.update(dict.fromkeys(ids, now))
        if time.monotonic() - self._last_flush >= self.beat_interval:
            self.flush_heartbeats()

    @property
    def beat_interval(self) -> float:
        """Seconds between two writes of heartbeats to PostgreSQL."""
        return min(10.0, max(1.0, self.ttl / 3))

    def _beat_redis(self, worker_ids: list[str], now: float) -> None:
        p = self.pipe

        def go() -> None:
            pipe = p.redis.pipeline()
            heartbeats.beat(p.ns, worker_ids, now, self.ttl, pipe=pipe)
            pipe.execute()

        p.redis.call("heartbeat", go)

    def flush_heartbeats(self) -> None:
        """Write the heartbeats seen since the last flush to PostgreSQL."""
        with self.lock:
            beats, self._pending_beats = self._pending_beats, {}
            self._last_flush = time.monotonic()
        if not beats:
            return

        def tx(conn: sa.Connection, ch: Changes) -> None:
            ch.add_all(Kind.WORKER, lifecycle.record_heartbeats(conn, beats))

        self.pipe.write("record heartbeats", tx)

    def active(self) -> list[str]:
        """Return the ids of workers whose heartbeat has not expired."""
        cutoff = time.time() - self.ttl
        seen = heartbeats.last_seen(self.pipe.redis, self.pipe.ns)
        return sorted(w for w, t in seen.items() if t >= cutoff)

    def inactive(self) -> list[str]:
        """Return the ids of registered workers without a live heartbeat."""
        alive = set(self.active())
        return sorted(w.id for w in self.find() if w.id not in alive)

    # -- retiring -------------------------------------------------------------------------

    def deregister(self, worker_id: str) -> models.Worker:
        """Make a worker inactive and put its active jobs back in their queues."""
        self.pipe.require(Kind.WORKER, worker_id)
        written = self._retire(worker_id, _Retirement("worker deregistered", respect_attempts=False))
        self._forget_heartbeat(worker_id)
        return next(e for e in written if isinstance(e, models.Worker))

    def _forget_heartbeat(self, worker_id: str) -> None:
        p = self.pipe

        def go() -> None:
            pipe = p.redis.pipeline()
            heartbeats.forget(p.ns, worker_id, pipe=pipe)
            pipe.execute()

        try:
            p.redis.call("forget heartbeat", go)
        except errors.StorageUnavailable as exc:
            log.warning("heartbeat of %s not removed: %s", worker_id, exc,
                        extra={"action": "deregister"})

    def reap_dead(self) -> list[models.Job]:
        """Retire workers whose heartbeat expired; re-queue (or fail) their active jobs.

        A worker is dead when no heartbeat was seen for ``heartbeat_ttl`` seconds,
        counting from the latest of its last heartbeat in Redis or PostgreSQL,
        its registration and the time Redis's data began (so a Redis that lost
        its data does not make every worker look dead). Returns the jobs touched.
        """
        now = time.time()
        boot = heartbeats.boot_time(self.pipe.redis, self.pipe.ns, now)
        seen = heartbeats.last_seen(self.pipe.redis, self.pipe.ns)
        touched: list[models.Job] = []
        for w in self.find(status=WS.ACTIVE.value):
            last = max(seen.get(w.id, 0.0), _ts(w.last_heartbeat), _ts(w.registered_at), boot)
            if now - last <= self.ttl:
                continue
            how = _Retirement(f"no heartbeat for heartbeat_ttl={self.ttl}s", respect_attempts=True,
                              only_if_active=True, heartbeat_age_s=round(now - last, 3))
            written = self._retire(w.id, how)
            touched.extend(e for e in written if isinstance(e, models.Job))
            if written:
                log.info("reaped worker %s (no heartbeat for %.1fs)", w.id, now - last,
                         extra={"action": "reap"})
        return touched

    def _retire(self, worker_id: str, how: _Retirement) -> list[models.Entity]:
        def tx(conn: sa.Connection, ch: Changes) -> None:
            now = self.pipe.now()
            row = store.update(conn, Kind.WORKER, worker_id, {"status": WS.INACTIVE.value},
                               statuses_in=[WS.ACTIVE.value] if how.only_if_active else None)
            if row is None:
                return
            ended = lifecycle.end_assignments(conn, "reclaimed", now, worker_id=worker_id)
            held = [a["job_id"] for a in ended]
            capped = self._over_orphan_cap(conn, held) if how.orphaned else {}
            reclaimed = lifecycle.reclaim_jobs(conn, [j for j in held if j not in capped], now,
                                               respect_attempts=how.respect_attempts)
            ch.add(Kind.WORKER, row)
            ch.add_all(Kind.ASSIGNMENT, ended)
            ch.add_all(Kind.JOB, reclaimed)
            for j in reclaimed:
                ch.event("reclaimed", j, now, worker_id=worker_id, rule=how.rule,
                         heartbeat_age_s=how.heartbeat_age_s, orphaned=how.orphaned or None)
            abandoned = self._abandon(conn, ch, capped, worker_id, now)
            for wf in sorted({j["workflow_id"] for j in [*reclaimed, *abandoned]}):
                ch.add(Kind.WORKFLOW, jobs.rollup(conn, wf, now))
            ch.counters["jobs_reclaimed"] += len(reclaimed)

        return self.pipe.write("retire worker", tx)


    def _over_orphan_cap(self, conn: sa.Connection, job_ids: list[str]) -> dict[str, int]:
        """The jobs already reclaimed from dead workers ``orphan_cap`` times, with that count."""
        counts = lifecycle.orphan_counts(conn, job_ids)
        return {j: n for j, n in counts.items() if n >= self.orphan_cap}

    def _abandon(self, conn: sa.Connection, ch: Changes, capped: dict[str, int], worker_id: str,
                 now: datetime) -> list[Mapping[str, Any]]:
        """Fail for good the jobs over the orphan cap instead of queueing them again."""
        rows: list[Mapping[str, Any]] = []
        for job_id, n in sorted(capped.items()):
            error = (f"orphan cap: its worker died {n + 1} times while holding it "
                     f"(orphan_cap={self.orphan_cap}); not queued again")
            for row in lifecycle.abandon_jobs(conn, [job_id], error, now):
                rows.append(row)
                ch.event("failed", row, now, worker_id=worker_id, error=error, orphaned=True,
                         orphan_cap=self.orphan_cap)
        ch.add_all(Kind.JOB, rows)
        ch.counters["jobs_orphan_capped"] += len(rows)
        return rows


class _Retirement:
    """How a worker is retired: the rule named in its jobs' events, and what it respects."""

    def __init__(self, rule: str, *, respect_attempts: bool, only_if_active: bool = False,
                 heartbeat_age_s: float | None = None) -> None:
        self.rule = rule
        self.respect_attempts = respect_attempts
        self.only_if_active = only_if_active
        self.heartbeat_age_s = heartbeat_age_s
        self.orphaned = heartbeat_age_s is not None
        """The worker died (no heartbeat): its jobs count toward the orphan cap."""
