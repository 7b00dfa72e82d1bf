"""Rebuild and repair: PostgreSQL is the truth, the rest follows it (the check is in ``compare``).

``rebuild`` streams the live state out of PostgreSQL in bulk (one binary,
chunked query per entity kind, as tuples built into entities by
``models.from_row``), replaces memory, and reconciles Redis: cache fills that
never overwrite a newer version (``MSETNX`` per chunk into an emptied cache,
else MGET and versioned fills), every queued job in its queue exactly once,
nothing else in any queue, metric totals raised to their checkpoints.
Its cost grows with the live state, not with the finished history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any

import sqlalchemy as sa

from toolkit import compare, models
from toolkit.tiers.memory import KINDS, Memory
from toolkit.tiers.postgres import store
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import cache, heartbeats, keys, metrics, queue
from toolkit.tiers.redis.client import Client, chunks

log = logging.getLogger(__name__)

PIPELINE_CHUNK = 5_000
FILL_CHUNK = 2_000
"""Cache entries per ``MSETNX`` of the rebuild."""
SCAN_COUNT = 10_000
"""``COUNT`` of the rebuild's SCAN of the namespace."""
WHOLE_QUEUE_AT = 1_000
"""Queue reconciliation reads a whole queue back when it checks at least this many
jobs and at least half of the queue, instead of looking the ids up."""
PROGRESS_STEP = 10_000
"""Rows between two updates of the rebuild's progress bar."""
PROGRESS_THRESHOLD = 50_000
"""Show a progress bar when the live state has at least this many rows."""

@dataclasses.dataclass(frozen=True)
class RebuildReport:
    """What a rebuild loaded: counts per entity kind and the time it took."""

    workflows: int
    jobs: int
    workers: int
    assignments: int
    queued: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.workflows} workflows, {self.jobs} live jobs ({self.queued} queued), "
                f"{self.workers} workers, {self.assignments} active assignments "
                f"in {self.seconds:.3f}s")

# -- invalidation ---------------------------------------------------------------------------

class InvalidationListener:
    """A daemon thread that drops memory entries other processes have overwritten."""

    def __init__(self, client: Client, ns: str, memory: Memory) -> None:
        self._client = client
        self._ns = ns
        self._memory = memory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"toolkit-invalidate-{self._ns}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop listening and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.invalidation_channel(self._ns))
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._handle(str(msg["data"]))
            except Exception as exc:  # noqa: BLE001 - the thread must survive a Redis outage
                log.debug("invalidation listener reconnecting: %s", exc,
                          extra={"action": "invalidate"})
                self._stop.wait(0.5)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _handle(self, message: str) -> None:
        for kind, version, entity_id in cache.parse_invalidations(message):
            if kind in KINDS:
                self._memory.drop(kind, entity_id, below_version=version)


# -- rebuild --------------------------------------------------------------------------------

def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = total >= PROGRESS_THRESHOLD if enabled is None else enabled
    return tqdm(total=total, disable=not show, desc="rebuild", unit="row", leave=False)


def _snapshot(db: Database, progress: bool | None) -> tuple[dict[str, list[models.Entity]],
                                                            dict[str, dict[str, float]],
                                                            dict[str, int]]:
    """Read the live state in one REPEATABLE READ snapshot."""
    entities: dict[str, list[models.Entity]] = {}
    wanted: dict[str, dict[str, float]] = {}
    with db.begin("rebuild: read PostgreSQL") as conn:
        conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        counts = store.count_live(conn)
        bar = _progress(sum(counts.values()), progress)
        try:
            for kind in ("workflow", "worker", "assignment", "job"):
                entities[kind] = _read_live(conn, kind, bar, wanted)
        finally:
            bar.close()
        checkpoints = store.metric_checkpoints(conn)
    return entities, wanted, checkpoints


def _read_live(conn: sa.Connection, kind: str, bar: Any,
               wanted: dict[str, dict[str, float]]) -> list[models.Entity]:
    """Build the live entities of ``kind`` (and note queued jobs in ``wanted``)."""
    columns = compare.live_columns(kind)
    out: list[models.Entity] = []
    append, build, score = out.append, models.row_builder(kind), queue.score
    i_id, i_status, i_queue, i_priority, i_seq = (
        columns.index(c) if c in columns else -1
        for c in ("id", "status", "queue", "priority", "enqueue_seq"))
    is_job = kind == "job"
    step = 0
    for values in store.stream_live(conn, kind, columns):
        append(build(values))
        if is_job and values[i_status] == "queued":
            wanted.setdefault(values[i_queue], {})[values[i_id]] = score(
                values[i_priority], values[i_seq] or 0)
        step += 1
        if step == PROGRESS_STEP:
            bar.update(step)
            step = 0
    bar.update(step)
    return out


def rebuild(db: Database, client: Client, ns: str, memory: Memory, *,
            progress: bool | None = None) -> RebuildReport:
    """Reload memory from PostgreSQL and make Redis match it.

    Raises
    ------
    StorageUnavailable
        PostgreSQL or Redis failed; memory is left as it was if PostgreSQL failed.
    """
    start = time.perf_counter()
    entities, wanted, checkpoints = _snapshot(db, progress)
    for kind in KINDS:
        memory.replace(kind, entities[kind])
    live = {kind: {e.id for e in entities[kind]} for kind in KINDS}
    cached, others = _scan_cache(client, ns, live)
    for kind in KINDS:
        _fill(client, ns, kind, entities[kind], cached[kind])
        # Entries the snapshot does not cover (jobs that became final or were
        # deleted in a commit whose cache update was lost) are checked too.
        if others[kind]:
            fix_cache(db, client, ns, memory, kind, others[kind])
    # A coordinator that crashed between a pop and its commit left claims in
    # flight: return them now rather than after their lease.
    return_claims(db, client, ns, before=float("inf"))
    reconcile_queues(db, client, ns, wanted)
    metrics.raise_to(client, ns, checkpoints)
    heartbeats.boot_time(client, ns, time.time())
    return RebuildReport(
        workflows=len(entities["workflow"]), jobs=len(entities["job"]),
        workers=len(entities["worker"]), assignments=len(entities["assignment"]),
        queued=sum(len(v) for v in wanted.values()), seconds=time.perf_counter() - start,
    )


def _scan_cache(client: Client, ns: str, live: Mapping[str, set[str]]
                ) -> tuple[dict[str, int], dict[str, list[str]]]:
    """One SCAN of the namespace: per kind, how many live entities are cached, and
    the ids of the cached entities that are not live."""
    heads = {kind: keys.entity(ns, kind, "") for kind in KINDS}
    cached = dict.fromkeys(KINDS, 0)
    others: dict[str, set[str]] = {kind: set() for kind in KINDS}
    with client.translate("cache scan"):
        for key in client.redis.scan_iter(match=keys.namespace_pattern(ns), count=SCAN_COUNT):
            for kind, head in heads.items():
                if key.startswith(head):
                    entity_id = key[len(head):]
                    if entity_id in live[kind]:
                        cached[kind] += 1  # SCAN may repeat a key: a count, not a set
                    else:
                        others[kind].add(entity_id)
                    break
    return cached, {kind: sorted(ids) for kind, ids in others.items()}


def _fill(client: Client, ns: str, kind: str, entities: list[models.Entity], cached: int) -> int:
    """Bring the cache up to ``entities`` (live ones); return how many were written.

    ``cached`` of them had a cache entry at the scan. When that is at most
    half (Redis was emptied or restarted: the case to be fast), they are
    written ``MSETNX`` per chunk: one command that writes every entry of the
    chunk or, when one of its keys exists (an entry the scan saw, or one a
    writer created since), none. Such chunks, or all the entities when most
    were cached, go through :func:`cache.fill_missing_or_older` (MGET, then
    ``SET NX`` for the absent and the versioned Lua fill for the older), so a
    newer value is never overwritten.
    """
    if 2 * cached > len(entities):
        return cache.fill_missing_or_older(client, ns, entities)
    fresh: list[models.Entity] = []
    checked: list[models.Entity] = []
    for e in entities:
        # Final entities are cached with a TTL: the versioned path sets it.
        (checked if models.is_final(e) else fresh).append(e)
    written = 0
    for chunk in chunks(fresh, FILL_CHUNK):
        values = {keys.entity(ns, kind, e.id): cache.encode(e) for e in chunk}

        def write(values: dict[str, bytes] = values) -> bool:
            return bool(client.redis.msetnx(values))

        if client.call("cache fill", write):
            written += len(chunk)
        else:
            checked += chunk
    return written + cache.fill_missing_or_older(client, ns, checked)


def return_claims(db: Database, client: Client, ns: str, *, before: float) -> int:
    """End in-flight claims whose lease ends before ``before``; return how many went back.

    A claim's job goes back to its queue when PostgreSQL still calls it queued
    and is forgotten otherwise. Returning the claim of a live coordinator that
    is about to commit is safe: PostgreSQL's status guard lets only one
    assignment win, and the loser drops the stale queue entry.
    """
    claims = queue.expired_claims(client, ns, before)
    if not claims:
        return 0
    with db.begin("check in-flight jobs") as conn:
        status = store.statuses(conn, "job", [c.job_id for c in claims])
    moved = 0
    for c in claims:
        moved += queue.settle(client, ns, c, requeue=status.get(c.job_id) == "queued")
    return moved


def reconcile_queues(db: Database, client: Client, ns: str,
                     wanted: Mapping[str, Mapping[str, float]]) -> tuple[int, int]:
    """Make every queue hold exactly the jobs PostgreSQL calls queued; return (added, removed).

    A job found in a queue that the snapshot did not call queued is checked
    again in PostgreSQL before it is removed, so a job another coordinator
    queued after the snapshot is left alone. Jobs in flight are left to the
    janitor.
    """
    inflight = queue.inflight_ids(client, ns)
    added = removed = 0
    for name in sorted(set(wanted) | queue.queue_names(client, ns)):
        current = dict(queue.members(client, ns, name))
        want = wanted.get(name, {})
        add = {j: s for j, s in want.items() if current.get(j) != s and j not in inflight}
        extra = [j for j in current if j not in want]
        if extra or add:
            # Read both sets again: another coordinator may have moved them since the snapshot.
            with db.begin("reconcile queues") as conn:
                still = _still_queued(conn, name, [*extra, *add], len(want))
            extra = [j for j in extra if j not in still]
            add = {j: s for j, s in add.items() if j in still}

        def go(add: dict[str, float] = add, extra: list[str] = extra, name: str = name) -> None:
            pipe = client.pipeline()
            queue.correct(ns, name, add, extra, pipe=pipe)
            pipe.execute()

        if add or extra or name in wanted:
            client.call("reconcile queues", go)
        added += len(add)
        removed += len(extra)
    return added, removed


def _still_queued(conn: sa.Connection, name: str, ids: list[str], expected: int) -> set[str]:
    """Which of ``ids`` PostgreSQL calls queued on ``name`` now.

    When they are most of the queue (``expected`` jobs at the snapshot; all
    of them after Redis was emptied) the whole queue is read, else the ids are looked up.
    """
    if len(ids) >= WHOLE_QUEUE_AT and 2 * len(ids) >= expected:
        return store.queued_ids(conn, name).intersection(ids)
    return store.still_queued(conn, name, ids)


def fix_cache(db: Database, client: Client, ns: str, memory: Memory, kind: str,
              ids: list[str]) -> int:
    """Make the cache and memory entries of ``ids`` agree with PostgreSQL; return how many changed.

    Gone from PostgreSQL: removed. Missing or older in Redis: a versioned fill
    (a write that lands meanwhile keeps its newer entry). Corrupt, or claiming a
    version PostgreSQL never had: overwritten, PostgreSQL wins.
    """
    changed = 0
    for chunk in chunks(sorted(ids), PIPELINE_CHUNK):
        with db.begin("repair: read PostgreSQL") as conn:
            rows = {r["id"]: r for r in store.get_many(conn, kind, chunk)}
        raw = cache.get_raw_many(client, ns, kind, chunk)
        gone = [i for i in chunk if i not in rows]
        older: list[models.Entity] = []
        wrong: list[models.Entity] = []
        for entity_id, value in zip(chunk, raw, strict=True):
            row = rows.get(entity_id)
            if row is None:
                continue
            e = models.from_dict(kind, row)
            rv = cache.version_of(value)
            if value is not None and (rv is None or rv > models.entity_version(e)
                                      or cache.decode(kind, value) is None):
                wrong.append(e)
            elif rv is None or rv < models.entity_version(e):
                older.append(e)
            memory.put(kind, e)

        def go(older: list[models.Entity] = older, wrong: list[models.Entity] = wrong,
               gone: list[str] = gone) -> None:
            pipe = client.pipeline()
            cache.put(client, ns, older, pipe=pipe)
            cache.force_put(ns, wrong, pipe=pipe)
            cache.delete(ns, kind, gone, pipe=pipe)
            pipe.execute()

        client.call("repair cache", go)
        for entity_id in gone:
            memory.drop(kind, entity_id)
        changed += len(older) + len(wrong) + len(gone)
    return changed


def repair(db: Database, client: Client, ns: str, memory: Memory) -> compare.ConsistencyReport:
    """Make memory and Redis agree with PostgreSQL; return the report of what was wrong."""
    report = compare.check(db, client, ns, memory)
    bad: dict[str, set[str]] = {}
    for row in report.rows:
        bad.setdefault(row["entity"], set()).add(row["id"])
    for kind, ids in bad.items():
        fix_cache(db, client, ns, memory, kind, list(ids))
    _, wanted = compare.pg_versions(db)
    reconcile_queues(db, client, ns, wanted)
    with db.begin("repair: read metric checkpoints") as conn:
        metrics.raise_to(client, ns, store.metric_checkpoints(conn))
    heartbeats.boot_time(client, ns, time.time())
    return report
