"""Rebuild, consistency check and repair: PostgreSQL is the truth, the rest follows it.

``rebuild`` streams the live state out of PostgreSQL in bulk (one binary,
chunked query per entity kind, as tuples built into entities by
``models.from_row``), replaces memory, and reconciles Redis: cache fills that
never overwrite a newer version (``MSETNX`` per chunk into an emptied cache,
else MGET and versioned fills), every queued job in its queue exactly once,
nothing else in any queue, metric totals raised to their checkpoints.
Its cost grows with the live state, not with the finished history.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

from toolkit import models
from toolkit.tiers.memory import KINDS, Memory
from toolkit.tiers.postgres import store
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import cache, eviction, heartbeats, keys, metrics, queue
from toolkit.tiers.redis.client import Client, chunks

if TYPE_CHECKING:
    import pandas as pd

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

REPORT_COLUMNS = (
    "entity", "id", "in_memory", "in_redis", "in_postgres",
    "memory_version", "redis_version", "postgres_version", "consistent", "problem",
)
"""Columns of ``ConsistencyReport.to_frame()`` (the same as ``Inspector.tiers()``)."""


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


@dataclasses.dataclass(frozen=True)
class ConsistencyReport:
    """Disagreements between memory, Redis and PostgreSQL (one row each)."""

    rows: tuple[Mapping[str, Any], ...]
    checked: int
    seconds: float
    warnings: tuple[str, ...] = ()
    """Findings that are not disagreements, such as a Redis that may evict our keys
    (``maxmemory-policy`` other than ``noeviction``). They do not make ``ok`` false."""

    @property
    def ok(self) -> bool:
        """True when every tier agrees with PostgreSQL (``warnings`` aside)."""
        return not self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        text = (f"consistent: {self.checked} entities checked in {self.seconds:.3f}s" if self.ok
                else f"{len(self.rows)} disagreements among {self.checked} entities")
        return "".join([text, *(f"\nwarning: {w}" for w in self.warnings)])

    def to_frame(self) -> pd.DataFrame:
        """Return the disagreements as a DataFrame with :data:`REPORT_COLUMNS`."""
        import pandas as pd

        frame = pd.DataFrame(list(self.rows), columns=list(REPORT_COLUMNS))
        for col in ("memory_version", "redis_version", "postgres_version"):
            frame[col] = frame[col].astype("Int64")
        for col in ("in_memory", "in_redis", "in_postgres", "consistent"):
            frame[col] = frame[col].astype(bool)
        frame["entity"] = frame["entity"].astype(pd.CategoricalDtype(list(KINDS)))
        return frame


# -- rebuild --------------------------------------------------------------------------------

def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = total >= PROGRESS_THRESHOLD if enabled is None else enabled
    return tqdm(total=total, disable=not show, desc="rebuild", unit="row", leave=False)


def _columns(kind: str) -> tuple[str, ...]:
    """The columns the rebuild reads: the model's fields, then the job's enqueue sequence."""
    return models.field_names(kind) + (("enqueue_seq",) if kind == "job" else ())


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
    columns = _columns(kind)
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
            for members in chunks(list(add.items()), PIPELINE_CHUNK):
                pipe.zadd(keys.queue(ns, name), dict(members))
            for chunk in chunks(extra, PIPELINE_CHUNK):
                pipe.zrem(keys.queue(ns, name), *chunk)
            pipe.sadd(keys.queues(ns), name)
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


# -- consistency ----------------------------------------------------------------------------

def _pg_versions(db: Database) -> tuple[dict[str, dict[str, Mapping[str, Any]]],
                                        dict[str, dict[str, float]]]:
    rows: dict[str, dict[str, Mapping[str, Any]]] = {}
    wanted: dict[str, dict[str, float]] = {}
    with db.begin("check: read PostgreSQL") as conn:
        conn.execute(sa.text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
        for kind in KINDS:
            columns = _columns(kind)
            rows[kind] = {r[0]: dict(zip(columns, r, strict=True))
                          for r in store.stream_live(conn, kind, columns)}
        for job_id, name, priority, seq in store.queued_jobs(conn):
            wanted.setdefault(name, {})[job_id] = queue.score(priority, seq or 0)
    return rows, wanted


def _version(kind: str, row: Mapping[str, Any] | None) -> int | None:
    if row is None:
        return None
    return models.entity_version(models.from_dict(kind, row))


def _compare(db: Database, client: Client, ns: str, memory: Memory,
             live: dict[str, dict[str, Mapping[str, Any]]], *,
             keep_consistent: bool = False) -> tuple[list[dict[str, Any]], int]:
    problems: list[dict[str, Any]] = []
    checked = 0
    for kind in KINDS:
        pg = dict(live[kind])
        mem = {e.id: models.entity_version(e) for e in memory.all(kind)}
        cached_ids = set(cache.scan_ids(client, ns, kind))
        others = sorted((set(mem) | cached_ids) - set(pg))
        if others:
            with db.begin("check: read PostgreSQL") as conn:
                pg.update({r["id"]: r for r in store.get_many(conn, kind, others)})
        ids = sorted(set(pg) | set(mem) | cached_ids)
        raw = cache.get_raw_many(client, ns, kind, ids)
        for entity_id, value in zip(ids, raw, strict=True):
            checked += 1
            pv = _version(kind, pg.get(entity_id))
            mv = mem.get(entity_id)
            rv = cache.version_of(value)
            why = _why(entity_id in live[kind], pv, mv, rv, value is not None)
            if why or keep_consistent:
                problems.append({
                    "entity": kind, "id": entity_id, "in_memory": mv is not None,
                    "in_redis": value is not None, "in_postgres": pv is not None,
                    "memory_version": mv, "redis_version": rv, "postgres_version": pv,
                    "consistent": not why, "problem": why,
                })
    return problems, checked


def _why(is_live: bool, pv: int | None, mv: int | None, rv: int | None, cached: bool) -> str:
    if pv is None:
        if mv is not None:
            return "in memory but not in PostgreSQL"
        return "in Redis but not in PostgreSQL"
    if mv is not None and mv != pv:
        return f"memory has version {mv}, PostgreSQL {pv}"
    if cached and rv is None:
        return "Redis holds a corrupt value"
    if rv is not None and rv != pv:
        return f"Redis has version {rv}, PostgreSQL {pv}"
    if is_live and not cached:
        return "missing in Redis"
    return ""


def _queue_problems(client: Client, ns: str, wanted: Mapping[str, Mapping[str, float]]
                    ) -> list[dict[str, Any]]:
    inflight = queue.inflight_ids(client, ns)
    problems = []
    seen: dict[str, str] = {}
    for name in sorted(set(wanted) | queue.queue_names(client, ns)):
        current = dict(queue.members(client, ns, name))
        want = wanted.get(name, {})
        for job_id in want:
            if job_id not in current and job_id not in inflight:
                problems.append(_queue_row(job_id, f"queued in PostgreSQL but not in queue {name!r}"))
        for job_id in current:
            if job_id not in want:
                problems.append(_queue_row(job_id, f"in queue {name!r} but not queued there in PostgreSQL"))
            elif job_id in seen:
                problems.append(_queue_row(job_id, f"in queues {seen[job_id]!r} and {name!r}"))
            seen[job_id] = name
    return problems


def _queue_row(job_id: str, why: str) -> dict[str, Any]:
    return {"entity": "job", "id": job_id, "in_memory": False, "in_redis": True,
            "in_postgres": True, "memory_version": None, "redis_version": None,
            "postgres_version": None, "consistent": False, "problem": why}


def compare_all(db: Database, client: Client, ns: str, memory: Memory, *,
                with_memory: bool = True) -> list[dict[str, Any]]:
    """One row per entity (consistent or not) across the tiers; reads only.

    With ``with_memory=False`` (an Inspector not bound to a StateManager) the
    memory columns are empty and memory is not judged.
    """
    live, wanted = _pg_versions(db)
    rows, _ = _compare(db, client, ns, memory if with_memory else Memory(), live,
                       keep_consistent=True)
    by_id = {(r["entity"], r["id"]): r for r in rows}
    for q in _queue_problems(client, ns, wanted):
        row = by_id.get(("job", q["id"]))
        if row is None:
            rows.append(q)
        else:
            row["consistent"] = False
            row["problem"] = "; ".join(p for p in (row["problem"], q["problem"]) if p)
    if not with_memory:
        for r in rows:
            r["in_memory"], r["memory_version"] = None, None
    return rows


def check(db: Database, client: Client, ns: str, memory: Memory) -> ConsistencyReport:
    """Compare memory and Redis with PostgreSQL. Reads only.

    The tiers are read one after the other, so a write landing in between can
    look like a disagreement. Every suspect is therefore read again (a fresh
    PostgreSQL snapshot, then Redis and memory) and only what persists is reported.
    """
    start = time.perf_counter()
    live, wanted = _pg_versions(db)
    problems, checked = _compare(db, client, ns, memory, live)
    problems += _queue_problems(client, ns, wanted)
    if problems:
        live, wanted = _pg_versions(db)
        again, _ = _compare(db, client, ns, memory, live)
        again += _queue_problems(client, ns, wanted)
        first = {(p["entity"], p["id"]) for p in problems}
        problems = [p for p in again if (p["entity"], p["id"]) in first]
    risk = eviction.read(client)
    warnings = () if risk.finding is None else (risk.finding,)
    return ConsistencyReport(tuple(problems), checked, time.perf_counter() - start, warnings)


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


def repair(db: Database, client: Client, ns: str, memory: Memory) -> ConsistencyReport:
    """Make memory and Redis agree with PostgreSQL; return the report of what was wrong."""
    report = check(db, client, ns, memory)
    bad: dict[str, set[str]] = {}
    for row in report.rows:
        bad.setdefault(row["entity"], set()).add(row["id"])
    for kind, ids in bad.items():
        fix_cache(db, client, ns, memory, kind, list(ids))
    _, wanted = _pg_versions(db)
    reconcile_queues(db, client, ns, wanted)
    with db.begin("repair: read metric checkpoints") as conn:
        metrics.raise_to(client, ns, store.metric_checkpoints(conn))
    heartbeats.boot_time(client, ns, time.time())
    return report


# -- metrics checkpoints --------------------------------------------------------------------

def checkpoint_metrics(db: Database, client: Client, ns: str) -> None:
    """Copy metric totals and their time buckets from Redis to PostgreSQL."""
    totals = metrics.totals(client, ns)
    if not totals:
        return
    series = metrics.buckets(client, ns, sorted(totals))
    rows = [(name, datetime.fromtimestamp(start, UTC), value)
            for name, buckets in series.items() for start, value in buckets.items()]
    now = models.utcnow()
    with db.begin("checkpoint metrics") as conn:
        store.checkpoint_metrics(conn, totals, now)
        for chunk in chunks(rows, 1000):
            store.checkpoint_buckets(conn, chunk)

