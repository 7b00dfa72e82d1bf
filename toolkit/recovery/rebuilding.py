"""The rebuild a new coordinator runs: PostgreSQL is the truth, memory and Redis follow it.

``rebuild`` streams the live state out of PostgreSQL in bulk (one binary,
chunked query per entity kind, as tuples built into entities by
``models.from_row``), replaces memory, and reconciles Redis: cache fills that
never overwrite a newer version (``MSETNX`` per chunk into an emptied cache,
else MGET and versioned fills), every queued job in its queue exactly once,
nothing else in any queue, the paused queues mirrored, metric totals raised to their
checkpoints.
Its cost grows with the live state, not with the finished history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import time
from collections.abc import Iterator, Mapping
from typing import Any

import sqlalchemy as sa

from toolkit import compare, models
from toolkit.handles import Tiers
from toolkit.models import EntityKind as Kind
from toolkit.recovery import queues, repairing
from toolkit.tiers.memory import KINDS
from toolkit.tiers.postgres import records, store
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import cache, heartbeats, keys, metrics, queue, watermark
from toolkit.tiers.redis.client import Client, Packable, chunks

FILL_CHUNK = 2_000
"""Cache entries per ``MSETNX`` of the rebuild."""
SCAN_COUNT = 10_000
"""``COUNT`` of the rebuild's SCAN of the namespace."""
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

def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = total >= PROGRESS_THRESHOLD if enabled is None else enabled
    return tqdm(total=total, disable=not show, desc="rebuild", unit="row", leave=False)


def _snapshot(db: Database, progress: bool | None
              ) -> tuple[dict[str, list[models.Entity]], compare.Wanted, compare.Later,
                         dict[str, int]]:
    """Read the live state in one REPEATABLE READ snapshot."""
    entities: dict[str, list[models.Entity]] = {}
    wanted: compare.Wanted = {}
    later: compare.Later = {}
    with db.begin("rebuild: read PostgreSQL") as conn:
        store.begin_snapshot(conn)
        counts = store.count_live(conn)
        bar = _progress(sum(counts.values()), progress)
        try:
            for kind in (Kind.WORKFLOW, Kind.WORKER, Kind.ASSIGNMENT, Kind.JOB):
                entities[kind] = _read_live(conn, kind, bar, wanted, later)
        finally:
            bar.close()
        checkpoints = records.metric_checkpoints(conn)
    return entities, wanted, later, checkpoints


def _read_live(conn: sa.Connection, kind: str, bar: Any, wanted: compare.Wanted,
               later: compare.Later) -> list[models.Entity]:
    """Build the live entities of ``kind`` (and note queued jobs in ``wanted`` or ``later``)."""
    columns = compare.live_columns(kind)
    out: list[models.Entity] = []
    append, build, score = out.append, models.row_builder(kind), queue.score
    i_id, i_status, i_queue, i_priority, i_seq, i_run_at = (
        columns.index(c) if c in columns else -1
        for c in ("id", "status", "queue", "priority", "enqueue_seq", "run_at"))
    is_job = kind == Kind.JOB
    step = 0
    now = time.time()
    for values in store.stream_live(conn, kind, columns):
        append(build(values))
        if is_job and values[i_status] == "queued":
            if values[i_run_at] is None:  # the usual case, kept fast
                wanted.setdefault(values[i_queue], {})[values[i_id]] = score(
                    values[i_priority], values[i_seq] or 0)
            else:
                compare.place(wanted, later, (values[i_id], values[i_queue], values[i_priority],
                                              values[i_seq], values[i_run_at]), now)
        step += 1
        if step == PROGRESS_STEP:
            bar.update(step)
            step = 0
    bar.update(step)
    return out


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block; restore it as it was.

    The rebuild allocates millions of long-lived objects and no cycles (their
    memory is freed by reference counting). With the collector on, every
    full collection during the load walks every object loaded so far: 13-18 %
    of a rebuild of 500,000 live jobs on the test machine. It is process-wide
    for the seconds of the rebuild; cyclic garbage made meanwhile by other
    threads is collected after it.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def rebuild(t: Tiers, *, progress: bool | None = None) -> RebuildReport:
    """Reload memory from PostgreSQL and make Redis match it.

    Runs with the cyclic garbage collector paused (:func:`collector_paused`).

    Raises
    ------
    StorageUnavailable
        PostgreSQL or Redis failed; memory is left as it was if PostgreSQL failed.
    """
    with collector_paused():
        return _rebuild(t, progress)


def _rebuild(t: Tiers, progress: bool | None) -> RebuildReport:
    start = time.perf_counter()
    entities, wanted, later, checkpoints = _snapshot(t.db, progress)
    for kind in KINDS:
        t.memory.replace(kind, entities[kind])
    live: dict[str, set[str]] = {kind: {e.id for e in entities[kind]} for kind in KINDS}
    cached, others = _scan_cache(t.redis, t.ns, live)
    for kind in KINDS:
        _fill(t.redis, t.ns, kind, entities[kind], cached[kind])
        # Entries the snapshot does not cover (jobs that became final or were
        # deleted in a commit whose cache update was lost) are checked too.
        if others[kind]:
            repairing.fix_cache(t, kind, others[kind])
    # A coordinator that crashed between a pop and its commit left claims in
    # flight: return them now rather than after their lease.
    queues.return_claims(t, before=float("inf"))
    queues.restore_paused(t)
    queues.reconcile(t, wanted, later)
    metrics.raise_to(t.redis, t.ns, checkpoints)
    heartbeats.boot_time(t.redis, t.ns, time.time())
    watermark.mark_rebuilt(t.redis, t.ns, time.time())
    return RebuildReport(
        workflows=len(entities[Kind.WORKFLOW]), jobs=len(entities[Kind.JOB]),
        workers=len(entities[Kind.WORKER]), assignments=len(entities[Kind.ASSIGNMENT]),
        queued=sum(len(v) for v in wanted.values()) + sum(len(v) for v in later.values()),
        seconds=time.perf_counter() - start,
    )


def _scan_cache(client: Client, ns: str, live: Mapping[str, set[str]]
                ) -> tuple[dict[str, int], dict[str, list[str]]]:
    """One SCAN of the namespace: per kind, how many live entities are cached, and
    the ids of the cached entities that are not live."""
    heads = {kind: keys.entity(ns, kind, "") for kind in KINDS}
    cached: dict[str, int] = dict.fromkeys(KINDS, 0)
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
    head, encode = keys.entity(ns, kind, ""), cache.encode
    for chunk in chunks(fresh, FILL_CHUNK):
        command: list[Packable] = ["MSETNX"]
        for e in chunk:
            command += (head + e.id, encode(e))
        if client.call("cache fill", functools.partial(client.send_packed, [command]))[0]:
            written += len(chunk)
        else:
            checked += chunk
    return written + cache.fill_missing_or_older(client, ns, checked)
