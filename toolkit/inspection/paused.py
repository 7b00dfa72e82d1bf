"""Paused queues as the Inspector sees them: read from PostgreSQL, merged with the queue.

``read`` takes the table ``paused_queues`` (migration 0006) in a read-only
transaction; a schema from before that migration has none, and reads as no
pause. ``queues_frame`` and ``sentence`` work from frames only, so a snapshot
answers the same way. Nothing here writes.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import sqlalchemy as sa

from toolkit.inspection import frames
from toolkit.tiers.postgres import export
from toolkit.tiers.postgres import tables as t
from toolkit.tiers.postgres.db import Database


def read(db: Database) -> pd.DataFrame:
    """The ``paused`` frame: one row per paused queue (index ``queue``), oldest pause first."""
    p = t.paused_queues
    if not export.has_table(db, p.name):
        return frames.empty("paused")
    rows = export.scalar_rows(db, sa.select(p.c.queue, p.c.reason, p.c.actor, p.c.paused_at)
                              .order_by(p.c.paused_at, p.c.queue))
    if not rows:
        return frames.empty("paused")
    return frames.conform("paused", {
        "queue": [r[0] for r in rows], "reason": [r[1] for r in rows],
        "paused_by": [r[2] for r in rows],
        "paused_since": pd.to_datetime([r[3] for r in rows], utc=True).as_unit("us")})


def queues_frame(queue: pd.DataFrame, paused: pd.DataFrame) -> pd.DataFrame:
    """The ``queues`` frame: every queue with a job waiting or a pause (index ``queue``)."""
    waiting = queue[~queue["in_flight"].astype(bool)] if len(queue) else queue
    depth = waiting["queue"].value_counts() if len(waiting) else pd.Series(dtype="Int64")
    names = sorted(set(map(str, depth.index)) | set(map(str, paused.index)))
    if not names:
        return frames.empty("queues")
    out = paused.reindex(pd.Index(names, dtype=frames.STRING, name="queue"))
    out["depth"] = pd.array([int(depth.get(n, 0)) for n in names], dtype="Int64")
    out["paused"] = pd.array([n in paused.index for n in names], dtype="boolean")
    return frames.conform("queues", out)


def sentence(paused: pd.DataFrame, name: str) -> str:
    """``queue 'reports' paused since <time> by <actor>: <reason>.``, or "" when not paused."""
    if name not in paused.index:
        return ""
    stamp: Any = paused.at[name, "paused_since"]
    since = stamp.isoformat(timespec="seconds")
    return (f"Nothing will take it for now: queue {name!r} paused since {since} by "
            f"{paused.at[name, 'paused_by']!s}: {paused.at[name, 'reason']!s} "
            f"(`toolkit resume {name}` hands its jobs out again).")
