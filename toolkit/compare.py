"""The read-only comparison of the three tiers: what ``check`` reports and ``Inspector.tiers()`` shows.

Both sides import it: the recovery side (``check_consistency``, ``repair``) and
the read-only inspection kit. It only reads: one REPEATABLE READ READ ONLY
snapshot of PostgreSQL, then Redis (``MGET``, ``SCAN``, ``ZRANGE``), then the
memory tier it is given. Nothing here writes to any tier.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

from toolkit import models
from toolkit.handles import Tiers
from toolkit.models import EntityKind as Kind
from toolkit.tiers.memory import KINDS, Memory
from toolkit.tiers.postgres import records, store
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import cache, eviction, queue, schedule, watermark
from toolkit.tiers.redis.client import Client

if TYPE_CHECKING:
    import pandas as pd

REPORT_COLUMNS = (
    "entity", "id", "in_memory", "in_redis", "in_postgres",
    "memory_version", "redis_version", "postgres_version", "consistent", "problem",
)
"""Columns of ``ConsistencyReport.to_frame()`` (the same as ``Inspector.tiers()``)."""


def live_columns(kind: str) -> tuple[str, ...]:
    """The columns the rebuild and the check read: the model's fields, then the job's enqueue sequence."""
    return models.field_names(kind) + (("enqueue_seq",) if kind == Kind.JOB else ())


@dataclasses.dataclass(frozen=True)
class ConsistencyReport:
    """Disagreements between memory, Redis and PostgreSQL (one row each)."""

    rows: tuple[Mapping[str, Any], ...]
    checked: int
    seconds: float
    warnings: tuple[str, ...] = ()
    """Findings that are not disagreements, such as a Redis that may evict our keys
    (``maxmemory-policy`` other than ``noeviction``). They do not make ``ok`` false."""
    paused: tuple[str, ...] = ()
    """Disagreements of the paused queues' Redis mirror with PostgreSQL, one sentence each
    (a queue paused in one tier only). They make ``ok`` false; ``repair()`` fixes them."""

    @property
    def ok(self) -> bool:
        """True when every tier agrees with PostgreSQL (``warnings`` aside)."""
        return not self.rows and not self.paused

    @property
    def postgres_crashed(self) -> bool:
        """True when ``warnings`` hold :data:`CRASH_WARNING`: PostgreSQL crashed since the
        last rebuild while commits did not wait for the disk; the caches may hold lost
        commits that no comparison sees (``repair()`` then runs the full rebuild)."""
        return CRASH_WARNING in self.warnings

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        text = (f"consistent: {self.checked} entities checked in {self.seconds:.3f}s" if self.ok
                else f"{len(self.rows)} disagreements among {self.checked} entities")
        return "".join([text, *(f"\npaused: {p}" for p in self.paused),
                        *(f"\nwarning: {w}" for w in self.warnings)])

    def to_frame(self) -> pd.DataFrame:
        """Return the disagreements as a DataFrame with :data:`REPORT_COLUMNS`."""
        import pandas as pd

        frame = pd.DataFrame(list(self.rows), columns=list(REPORT_COLUMNS))
        for col in ("memory_version", "redis_version", "postgres_version"):
            frame[col] = frame[col].astype("Int64")
        for col in ("in_memory", "in_redis", "in_postgres", "consistent"):
            frame[col] = frame[col].astype(bool)
        frame["entity"] = frame["entity"].astype(pd.CategoricalDtype([k.value for k in KINDS]))
        return frame


Wanted = dict[str, dict[str, float]]
"""Queue name -> job id -> queue score: the queued jobs due now, as their queues should hold them."""
Later = dict[str, dict[str, tuple[float, float]]]
"""Queue name -> job id -> (due time, queue score): the queued jobs scheduled for later, as
their queues' due-time sets should hold them."""


def place(wanted: Wanted, later: Later, row: tuple[str, str, int, int | None, datetime | None],
          now: float) -> None:
    """Note where a queued job ``(id, queue, priority, seq, run_at)`` belongs in Redis."""
    job_id, name, priority, seq, run_at = row
    score = queue.score(priority, seq or 0)
    if run_at is not None and run_at.timestamp() > now:
        later.setdefault(name, {})[job_id] = (run_at.timestamp(), score)
    else:
        wanted.setdefault(name, {})[job_id] = score


def pg_versions(db: Database) -> tuple[dict[str, dict[str, Mapping[str, Any]]], Wanted, Later]:
    rows: dict[str, dict[str, Mapping[str, Any]]] = {}
    wanted: Wanted = {}
    later: Later = {}
    with db.begin("check: read PostgreSQL") as conn:
        store.begin_snapshot(conn)
        for kind in KINDS:
            columns = live_columns(kind)
            rows[kind] = {r[0]: dict(zip(columns, r, strict=True))
                          for r in store.stream_live(conn, kind, columns)}
        now = time.time()
        for queued in store.queued_jobs_timed(conn):
            place(wanted, later, queued, now)
    return rows, wanted, later


def _version(kind: str, row: Mapping[str, Any] | None) -> int | None:
    if row is None:
        return None
    return models.entity_version(models.from_dict(kind, row))


def _compare(t: Tiers, live: dict[str, dict[str, Mapping[str, Any]]], *,
             keep_consistent: bool = False) -> tuple[list[dict[str, Any]], int]:
    db, client, ns, memory = t.db, t.redis, t.ns, t.memory
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


def _queue_problems(client: Client, ns: str, wanted: Mapping[str, Mapping[str, float]],
                    later: Later) -> list[dict[str, Any]]:
    inflight = queue.inflight_ids(client, ns)
    problems = []
    seen: dict[str, str] = {}
    for name in sorted(set(wanted) | set(later) | queue.queue_names(client, ns)):
        current = dict(queue.members(client, ns, name))
        want = wanted.get(name, {})
        waiting = dict(schedule.members(client, ns, name))  # due, awaiting promotion
        scores = schedule.queue_scores(client, ns, list(waiting))
        problems += _schedule_problems(name, waiting, scores, later.get(name, {}), want)
        for job_id in want:
            if job_id not in current and job_id not in inflight and job_id not in waiting:
                problems.append(_queue_row(job_id, f"queued in PostgreSQL but not in queue {name!r}"))
        for job_id in current:
            if job_id in later.get(name, {}):
                problems.append(_queue_row(job_id, f"in queue {name!r} before its run_at"))
            elif job_id not in want:
                problems.append(_queue_row(job_id, f"in queue {name!r} but not queued there in PostgreSQL"))
            elif job_id in seen:
                problems.append(_queue_row(job_id, f"in queues {seen[job_id]!r} and {name!r}"))
            seen[job_id] = name
    return problems


def _schedule_problems(name: str, waiting: Mapping[str, float], scores: Mapping[str, float],
                       later: Mapping[str, tuple[float, float]],
                       want: Mapping[str, float]) -> list[dict[str, Any]]:
    """A queue's due-time set against PostgreSQL: every job scheduled for later, at its time,
    with the queue score its promotion will give it."""
    problems = []
    for job_id, (due, score) in later.items():
        if job_id not in waiting:
            problems.append(_queue_row(job_id, f"scheduled in PostgreSQL but not in the "
                                               f"due-time set of queue {name!r}"))
        elif abs(waiting[job_id] - due) > 1e-3:
            problems.append(_queue_row(job_id, f"due at {waiting[job_id]:.3f} in Redis, "
                                               f"{due:.3f} in PostgreSQL"))
        elif scores.get(job_id) != score:
            problems.append(_queue_row(job_id, f"scheduled in queue {name!r} with queue score "
                                               f"{scores.get(job_id)} in Redis, {score} expected"))
    for job_id in waiting:
        if job_id not in later and job_id not in want:
            problems.append(_queue_row(job_id, f"in the due-time set of queue {name!r} but "
                                               "not queued there in PostgreSQL"))
    return problems


def _queue_row(job_id: str, why: str) -> dict[str, Any]:
    return {"entity": Kind.JOB.value, "id": job_id, "in_memory": False, "in_redis": True,
            "in_postgres": True, "memory_version": None, "redis_version": None,
            "postgres_version": None, "consistent": False, "problem": why}


def paused_problems(t: Tiers) -> list[str]:
    """Queues paused in PostgreSQL but not in Redis's mirror (the claim script would serve
    them), or the other way round (it would hold them back); reads only."""
    with t.db.begin("check: read paused queues") as conn:
        truth = set(records.paused_queues(conn, t.db.schema))
    mirror = queue.paused(t.redis, t.ns)
    return ([f"queue {q!r} is paused in PostgreSQL but not in Redis: it is still served"
             for q in sorted(truth - mirror)]
            + [f"queue {q!r} is paused in Redis but not in PostgreSQL: it is held back"
               for q in sorted(mirror - truth)])


def compare_all(t: Tiers, *, with_memory: bool = True) -> list[dict[str, Any]]:
    """One row per entity (consistent or not) across the tiers; reads only.

    With ``with_memory=False`` (an Inspector not bound to a StateManager) the
    memory columns are empty and memory is not judged.
    """
    live, wanted, later = pg_versions(t.db)
    rows, _ = _compare(t if with_memory else dataclasses.replace(t, memory=Memory()), live,
                       keep_consistent=True)
    by_id = {(r["entity"], r["id"]): r for r in rows}
    for q in _queue_problems(t.redis, t.ns, wanted, later):
        row = by_id.get((Kind.JOB, q["id"]))
        if row is None:
            rows.append(q)
        else:
            row["consistent"] = False
            row["problem"] = "; ".join(p for p in (row["problem"], q["problem"]) if p)
    if not with_memory:
        for r in rows:
            r["in_memory"], r["memory_version"] = None, None
    return rows


def commits_may_be_lost(t: Tiers) -> bool:
    """Whether PostgreSQL may have lost commits that Redis holds: a coordinator of this
    namespace committed with ``synchronous_commit = off`` (a server crash loses its last
    acknowledged commits) and PostgreSQL crashed since the last rebuild (its UNLOGGED
    crash sentinel lost the token that rebuild wrote, or none was ever written). Redis
    then holds versions PostgreSQL never kept and will issue again for other changes, so
    only a fill where PostgreSQL wins puts it right."""
    if not watermark.async_commits_noted(t.redis, t.ns):
        return False
    with t.db.autocommit("read the crash sentinel") as conn:
        kept = records.sentinel(conn, t.ns)
    token = watermark.crash_token(t.redis, t.ns)
    return token is None or kept != token


def crashed_since_rebuild(t: Tiers) -> bool:
    """What :data:`CRASH_WARNING` says, for :func:`check`: as :func:`commits_may_be_lost`,
    but not when Redis holds no token (Redis lost its data: its missing entries are the
    check's rows), nor on a schema from before the sentinel. A rebuild renews PostgreSQL's
    token only when it differs from Redis's (``rebuilding._renew_sentinel``), so the two
    differ only after a crash, while a rebuild that saw it runs, and after one that died."""
    if not watermark.async_commits_noted(t.redis, t.ns):
        return False
    token = watermark.crash_token(t.redis, t.ns)
    if token is None:
        return False
    with t.db.autocommit("read the crash sentinel") as conn:
        if not store.has_table(conn, t.db.schema, "crash_sentinel"):
            return False
        return records.sentinel(conn, t.ns) != token


CRASH_WARNING = (
    "PostgreSQL crashed after the last rebuild, and a coordinator of this namespace commits "
    "with synchronous_commit=off: Redis and the coordinators' memory may hold commits "
    "PostgreSQL lost, some at versions it issues again for other changes, which no version "
    "comparison sees. Run rebuild() on one coordinator, or restart them (the others' memory "
    "follows within memory_max_age).")


def check(t: Tiers) -> ConsistencyReport:
    """Compare memory and Redis with PostgreSQL. Reads only.

    The tiers are read one after the other, so a write landing in between can
    look like a disagreement. Every suspect is therefore read again (a fresh
    PostgreSQL snapshot, then Redis and memory) and only what persists is reported.
    """
    start = time.perf_counter()
    live, wanted, later = pg_versions(t.db)
    problems, checked = _compare(t, live)
    problems += _queue_problems(t.redis, t.ns, wanted, later)
    if problems:
        live, wanted, later = pg_versions(t.db)
        again, _ = _compare(t, live)
        again += _queue_problems(t.redis, t.ns, wanted, later)
        first = {(p["entity"], p["id"]) for p in problems}
        problems = [p for p in again if (p["entity"], p["id"]) in first]
    paused = paused_problems(t)
    if paused:  # read again: a pause or resume may have landed between the two reads
        paused = [p for p in paused_problems(t) if p in paused]
    risk = eviction.read(t.redis)
    warnings = (*(() if risk.finding is None else (risk.finding,)),
                *((CRASH_WARNING,) if crashed_since_rebuild(t) else ()))
    return ConsistencyReport(tuple(problems), checked, time.perf_counter() - start, warnings,
                             tuple(paused))
