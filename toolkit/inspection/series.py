"""The arguments of ``metric_series``, checked the same way live and offline.

Counters are kept in one-minute buckets (Redis and the PostgreSQL checkpoints;
a snapshot stores the same). So ``freq`` must be a whole number of minutes (or
a calendar frequency such as ``W``): a finer one would silently return
one-minute buckets. ``names`` may be one name as a ``str``; an unknown name is
refused by name (the counters a StateManager keeps by itself, :data:`AUTOMATIC`,
are always known: zero until their first event). ``since``/``until`` keep the
buckets with ``since <= start < until``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd

from toolkit import errors, validate
from toolkit.inspection import analytics, frames
from toolkit.tiers.postgres import export
from toolkit.tiers.postgres.db import Database

BUCKET = "1min"
"""The width of a stored metric bucket."""
AUTOMATIC = frozenset({"jobs_created", "jobs_queued", "jobs_assigned", "jobs_completed",
                       "jobs_failed", "jobs_retried", "jobs_cancelled", "jobs_reclaimed",
                       "jobs_purged", "workflows_created"})
"""The counters a StateManager counts by itself (see the README)."""


def wanted_names(names: str | Iterable[str] | None, known: Iterable[str]) -> list[str]:
    """The metric names asked for (all known ones for None), each checked and known."""
    known_set = set(known)
    if names is None:
        return sorted(known_set)
    known_set |= AUTOMATIC
    chosen = [names] if isinstance(names, str) else list(names)
    for n in chosen:
        validate.identifier("names", n)
    unknown = sorted(set(chosen) - known_set)
    if unknown:
        raise errors.ValidationError("names", unknown, "no such metric; known: "
                                     + (", ".join(sorted(known_set)) or "none yet"))
    return sorted(set(chosen))


def offset(freq: str) -> Any:
    """The pandas offset of ``freq``, refused when finer than (or not a multiple of) a bucket."""
    off = frames.parse_freq(freq)
    base = pd.tseries.frequencies.to_offset(BUCKET)
    if isinstance(off, pd.offsets.Tick) and off.nanos % base.nanos:
        raise errors.ValidationError("freq", freq, f"must be a multiple of {BUCKET}: counters are "
                                     f"kept in {BUCKET} buckets")
    return off


def window(since: Any, until: Any) -> tuple[datetime | None, datetime | None]:
    """``since`` and ``until`` checked: timezone-aware, ``since`` before ``until``."""
    start = analytics.check_since(since)
    try:
        end = analytics.check_since(until)
    except errors.ValidationError as exc:
        raise errors.ValidationError("until", until, exc.reason) from None
    if start is not None and end is not None and start >= end:
        raise errors.ValidationError("until", until, "must be later than since")
    return start, end


def merge(names: list[str], saved: dict[str, dict[int, int]],
          live: dict[str, dict[int, int]]) -> pd.DataFrame:
    """One column per name of ``{bucket start (unix s): count}``, the larger count of the two sources."""
    columns = {}
    for n in names:
        merged = {**saved.get(n, {}), **{k: max(v, saved.get(n, {}).get(k, 0))
                                         for k, v in live.get(n, {}).items()}}
        s = pd.Series(merged, dtype="int64")
        s.index = pd.to_datetime(s.index.astype("int64"), unit="s", utc=True)
        columns[n] = s
    return pd.DataFrame(columns).sort_index()


def cut(frame: pd.DataFrame, start: datetime | None, end: datetime | None) -> pd.DataFrame:
    """Rows of a time-indexed frame with ``start <= time < end``."""
    if start is not None:
        frame = frame[frame.index >= pd.Timestamp(start)]
    if end is not None:
        frame = frame[frame.index < pd.Timestamp(end)]
    return frame


def empty(names: list[str]) -> pd.DataFrame:
    """The empty series frame: one ``Int64`` column per name, a UTC time index."""
    out = pd.DataFrame({n: pd.Series([], dtype="Int64") for n in names})
    out.index = pd.DatetimeIndex([], tz="UTC", name="time")
    return out


def checkpointed_names(db: Database) -> list[str]:
    """Names of the counters checkpointed to PostgreSQL."""
    t = frames.from_arrow(export.select(db, "metric_checkpoints", {"name": "name"}))
    return list(t["name"]) if len(t) else []


def checkpointed_buckets(db: Database, names: list[str]) -> dict[str, dict[int, int]]:
    """The one-minute buckets checkpointed to PostgreSQL: name -> {epoch second: value}."""
    t = frames.from_arrow(export.select(db, "metric_buckets", {
        "name": "name", "bucket_start": "bucket_start", "value": "value"}))
    out: dict[str, dict[int, int]] = {}
    for n, start, v in zip(t.get("name", []), t.get("bucket_start", []), t.get("value", []),
                           strict=True):
        if n in names:
            out.setdefault(n, {})[int(start) // 1_000_000] = int(v)
    return out
