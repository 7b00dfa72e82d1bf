"""Repair: make memory and Redis agree with PostgreSQL (what ``check`` found, then the paused
queues' mirror, then the queues)."""

from __future__ import annotations

import time
from typing import Any

from toolkit import compare, models
from toolkit.handles import Tiers
from toolkit.recovery import queues
from toolkit.tiers.postgres import records, store
from toolkit.tiers.redis import cache, heartbeats, metrics
from toolkit.tiers.redis.client import chunks

PIPELINE_CHUNK = 5_000
"""Entities per PostgreSQL read and Redis pipeline of a repair."""


def _stale(kind: str, value: Any, e: models.Entity, pg_wins: bool, live: bool = False) -> str:
    """How the cached ``value`` of ``e`` is wrong: ``"wrong"`` (overwrite it), ``"older"``
    (a versioned fill) or ``""`` (right). ``pg_wins``: also an entry of the same version
    with other content (PostgreSQL, after losing commits, issued that version again).
    ``live``: an entry newer than ``e`` is right (a write that landed since ``e`` was read)."""
    rv = cache.version_of(value)
    version = models.entity_version(e)
    if value is not None:
        decoded = cache.decode(kind, value)
        if live and rv is not None and rv > version and decoded is not None:
            return ""
        if rv is None or rv > version or decoded is None or (pg_wins and rv == version
                                                             and decoded != e):
            return "wrong"
    return "older" if rv is None or rv < version else ""


def fix_cache(t: Tiers, kind: str, ids: list[str], *, pg_wins: bool = False,
              live: bool = False) -> int:
    """Make the cache and memory entries of ``ids`` agree with PostgreSQL; return how many changed.

    Gone from PostgreSQL: removed. Missing or older in Redis: a versioned fill
    (a write that lands meanwhile keeps its newer entry). Corrupt, or claiming a
    version PostgreSQL never had: overwritten, PostgreSQL wins. ``pg_wins`` (PostgreSQL
    may have lost commits, see :func:`toolkit.compare.commits_may_be_lost`): an entry of PostgreSQL's
    version with other content is overwritten too. ``live`` (writers may be at work, and
    PostgreSQL lost nothing): an entry newer than the row read is left as it is.
    """
    db, client, ns, memory = t.db, t.redis, t.ns, t.memory
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
            how = _stale(kind, value, e, pg_wins, live)
            if how:
                (wrong if how == "wrong" else older).append(e)
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


def repair(t: Tiers) -> compare.ConsistencyReport:
    """Make memory and Redis agree with PostgreSQL; return the report of what was wrong."""
    report = compare.check(t)
    bad: dict[str, set[str]] = {}
    for row in report.rows:
        bad.setdefault(row["entity"], set()).add(row["id"])
    for kind, ids in bad.items():
        fix_cache(t, kind, list(ids))
    _, wanted, later = compare.pg_versions(t.db)
    queues.restore_paused(t)
    queues.reconcile(t, wanted, later)
    with t.db.begin("repair: read metric checkpoints") as conn:
        metrics.raise_to(t.redis, t.ns, records.metric_checkpoints(conn))
    heartbeats.boot_time(t.redis, t.ns, time.time())
    return report
