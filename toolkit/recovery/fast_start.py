"""A fast start: when Redis survived the crash, check only what changed since Redis last agreed.

A new coordinator normally rebuilds: it reads every live row and makes memory
and Redis match (seconds at a million jobs). When Redis survived, most of it is
already right; what may be wrong is what a coordinator committed and died
before sending to Redis. Every coordinator publishes a watermark (see
:mod:`toolkit.tiers.redis.watermark`), so the entities to check are those that
changed since the smallest watermark (less :data:`MARGIN` for clock skew),
found through the job event log and ``updated_at``, plus the deletes noted in
Redis. They are fixed before this returns; memory starts empty and fills on reads.

When Redis lost the mark of the last rebuild (it lost data), or the watermarks
say nothing useful (none, one at 0, from another Redis server run, or older
than :data:`MAX_LAG`), or PostgreSQL may have lost commits that Redis holds (a
coordinator of the namespace committed with ``synchronous_commit = off`` and the
server recovered from a crash since the last rebuild), :func:`fast_start` returns None and
the caller runs the full rebuild.
"""

from __future__ import annotations

import dataclasses
import time
from datetime import UTC, datetime

from toolkit import compare, errors
from toolkit.handles import Tiers
from toolkit.models import EntityKind as Kind
from toolkit.recovery import queues, repairing
from toolkit.tiers.postgres import records, store
from toolkit.tiers.redis import heartbeats, metrics, watermark

MARGIN = 5.0
"""Seconds subtracted from the smallest watermark (clocks of coordinators may differ this much)."""
MAX_LAG = 24 * 3600.0
"""A watermark older than this sends the start to the full rebuild (the event scan would be long)."""
DEAD_AFTER = 60.0
"""A watermark not refreshed for this long belongs to a coordinator that stopped."""


@dataclasses.dataclass(frozen=True)
class FastStartReport:
    """What a fast start checked and fixed."""

    since: datetime
    """Entities changed from this time on were checked."""
    checked: int
    fixed: int
    queue_added: int
    queue_removed: int
    deletes: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.checked} entities changed since {self.since:%H:%M:%S} checked, "
                f"{self.fixed} cache entries fixed, queues +{self.queue_added}/-{self.queue_removed}, "
                f"{self.deletes} noted deletes, {self.seconds:.3f}s")


def horizon(t: Tiers, now: float) -> float | None:
    """The time from which to check, or None when only a full rebuild will do."""
    if not watermark.was_rebuilt(t.redis, t.ns):
        return None  # Redis lost its data since the last rebuild
    if compare.commits_may_be_lost(t):
        return None
    marks = watermark.read(t.redis, t.ns)
    if not marks:
        return None
    server = watermark.run_id(t.redis)
    if any(m.safe <= 0 or m.run_id != server for m in marks):
        return None
    since = min(m.safe for m in marks) - MARGIN
    return since if now - since <= MAX_LAG else None


def fast_start(t: Tiers) -> FastStartReport | None:
    """Fix what changed since Redis last agreed with PostgreSQL; None: run the full rebuild."""
    started = time.time()
    since = horizon(t, started)
    if since is None:
        return None
    return catch_up(t, since, started=started, fresh=True)


def catch_up(t: Tiers, since: float, *, started: float | None = None,
             fresh: bool = False) -> FastStartReport:
    """Make Redis agree with PostgreSQL for what changed from ``since`` on (a UNIX time, the
    margin for clocks already taken off): the cache entries, the queues, the deletes noted,
    counters raised to their checkpoints.

    A running coordinator calls it once Redis answers again after its writes could not
    reach it (see :class:`toolkit.manager.watermark.Watermark`); ``fresh`` (a new
    coordinator's fast start) also returns every claim in flight and resets the
    heartbeats' boot time, which only a coordinator that has served nothing yet may do."""
    started = time.time() if started is None else started
    at = datetime.fromtimestamp(since, UTC)
    with t.db.begin("catch up: read what changed") as conn:
        changed = records.changed_since(conn, at)
        checkpoints = records.metric_checkpoints(conn)
    noted = watermark.deleting(t.redis, t.ns)
    for kind, entity_id in noted:
        changed.setdefault(kind, []).append(entity_id)
    # A running coordinator's catch-up: its own writers are at work, so a cache entry newer
    # than the row read is theirs. A fast start overwrites it, as before (a version
    # PostgreSQL never had, whatever the cause, goes).
    fixed = sum(repairing.fix_cache(t, kind, sorted(set(ids)), live=not fresh)
                for kind, ids in changed.items() if ids)
    if fresh:
        queues.return_claims(t, before=float("inf"))
    added, removed = queues.settle_jobs(t, changed.get(Kind.JOB, []))
    metrics.raise_to(t.redis, t.ns, checkpoints)
    if fresh:
        heartbeats.boot_time(t.redis, t.ns, started)
    _forget(t, noted, started, dead=fresh)
    return FastStartReport(since=at, checked=sum(len(v) for v in changed.values()), fixed=fixed,
                           queue_added=added, queue_removed=removed, deletes=len(noted),
                           seconds=time.time() - started)


def heal_redis(t: Tiers, since: float) -> FastStartReport:
    """A running coordinator's catch-up (:func:`catch_up`) after a failed Redis update at
    ``since`` (its pinned watermark), the clock margin taken off; refused (``StorageUnavailable``)
    when only a repair will do: Redis lost its data, or PostgreSQL may have lost commits."""
    if not watermark.was_rebuilt(t.redis, t.ns) or compare.commits_may_be_lost(t):
        raise errors.StorageUnavailable("Redis lost its data, or PostgreSQL may have lost "
                                        "commits, since the last rebuild: run repair() "
                                        "(toolkit check --repair)")
    return catch_up(t, since - MARGIN)


def _forget(t: Tiers, noted: list[tuple[str, str]], now: float, *, dead: bool) -> None:
    """Drop the notes of deletes that committed (a pending one keeps its note) and, ``dead``
    (a fast start: it checked from the smallest watermark on), the watermarks of coordinators
    that stopped. A catch-up checked from its own pin only: it leaves theirs."""
    by_kind: dict[str, list[str]] = {}
    for kind, entity_id in noted:
        by_kind.setdefault(kind, []).append(entity_id)
    done: list[tuple[str, str]] = []
    with t.db.begin("catch up: deletes committed") as conn:
        for kind, ids in by_kind.items():
            present = {r["id"] for r in store.get_many(conn, kind, ids)}
            done.extend((kind, i) for i in ids if i not in present)

    def go() -> None:
        pipe = t.redis.pipeline()
        watermark.done_deleting(t.ns, done, pipe=pipe)
        pipe.execute()

    if done:
        t.redis.call("forget delete notes", go)
    if dead:
        stopped = [m.coordinator for m in watermark.read(t.redis, t.ns)
                   if now - m.refreshed > DEAD_AFTER]
        watermark.forget(t.redis, t.ns, stopped)
