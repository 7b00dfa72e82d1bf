"""The Inspector's frames read from Redis: queues in pop order, locks, counters over time.

Read commands only (ZRANGE, PTTL, GET, HGETALL, SCAN with a budget); the
PostgreSQL side of the counters comes from the read-only export functions.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd

from toolkit.inspection import frames, series
from toolkit.tiers.postgres import export
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import keys, metrics, queue
from toolkit.tiers.redis.client import Client

SCAN_BUDGET = 100_000
"""At most this many keys are looked at by one SCAN-based frame (``locks()``)."""


class RedisFrames:
    """The Redis frames of an Inspector (a mixin: it needs ``_redis``, ``_db`` and ``ns``)."""

    _redis: Client
    _db: Database
    ns: str

    def queue(self) -> pd.DataFrame:
        """One row per queued job (index ``job_id``) in pop order within each queue."""
        rows: list[dict[str, Any]] = []
        inflight = queue.inflight_ids(self._redis, self.ns)
        for name in sorted(queue.queue_names(self._redis, self.ns)):
            for pos, (job_id, score) in enumerate(queue.members(self._redis, self.ns, name)):
                priority, seq = queue.unscore(score)
                rows.append({"job_id": job_id, "queue": name, "position": pos, "priority": priority,
                             "enqueue_seq": seq, "in_flight": False})
        for job_id in sorted(inflight):
            rows.append({"job_id": job_id, "queue": None, "position": None, "priority": None,
                         "enqueue_seq": None, "in_flight": True})
        return frames.conform("queue", pd.DataFrame(rows)) if rows else frames.empty("queue")

    def locks(self) -> pd.DataFrame:
        """One row per held lock (index ``name``) with its TTL and fencing token."""
        prefix = keys.lock(self.ns, "")
        found: list[str] = []
        with self._redis.translate("inspect locks"):
            for i, key in enumerate(self._redis.redis.scan_iter(
                    match=keys.escape_glob(prefix) + "*", count=1000)):
                if i >= SCAN_BUDGET:
                    break
                found.append(key[len(prefix):])
            pipe = self._redis.pipeline()
            for name in found:
                pipe.pttl(keys.lock(self.ns, name))
                pipe.get(keys.fence(self.ns, name))
            replies = pipe.execute() if found else []
        rows = [{"name": n, "held": True, "ttl_s": (ttl / 1000 if ttl and ttl > 0 else None),
                 "fencing_token": int(fence) if fence else None}
                for n, ttl, fence in zip(found, replies[::2], replies[1::2], strict=True)]
        return frames.conform("locks", pd.DataFrame(rows)).sort_index() if rows else frames.empty("locks")

    def metrics(self) -> pd.DataFrame:
        """One row per counter (index ``name``): its value in Redis and its PostgreSQL checkpoint."""
        live = metrics.totals(self._redis, self.ns)
        table = frames.from_arrow(export.select(self._db, "metric_checkpoints",
                                         {"name": "name", "value": "value"}))
        saved = dict(zip(table["name"], table["value"], strict=True)) if len(table) else {}
        names = sorted(set(live) | set(saved))
        if not names:
            return frames.empty("metrics")
        return frames.conform("metrics", {"name": names, "value": [live.get(n) for n in names],
                                          "checkpoint": [saved.get(n) for n in names]})

    def metric_series(self, names: str | Iterable[str] | None = None, freq: str = "1min", *,
                      since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
        """Counters over time: a UTC time index at ``freq``, one column per metric (counts per bin).

        Redis time buckets are merged with the PostgreSQL checkpoints, so the
        history survives a Redis loss up to the last checkpoint. ``names`` is
        one name or several (default: every counter); ``since``/``until``
        (aware datetimes) keep the buckets with ``since <= start < until``.

        Raises
        ------
        ValidationError
            An unknown name (named in the message), ``freq`` not a whole number
            of minutes (counters are kept per minute), or a bad window.
        """
        known = set(metrics.totals(self._redis, self.ns)) | set(series.checkpointed_names(self._db))
        wanted = series.wanted_names(names, known)
        offset = series.offset(freq)
        start, end = series.window(since, until)
        live = metrics.buckets(self._redis, self.ns, wanted)
        saved = series.checkpointed_buckets(self._db, wanted)
        frame = series.cut(series.merge(wanted, saved, live), start, end)
        if frame.empty:
            return series.empty(wanted)
        frame = frame.fillna(0).resample(offset).sum().astype("Int64")
        frame.index.name = "time"
        return frame
