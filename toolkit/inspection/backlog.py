"""Backlog gauges per queue: how old the oldest waiting job is, how fast jobs arrive and
leave, and when the queue would be empty at that pace.

Computed from frames only (``jobs`` and ``events``), so an Inspector and a snapshot
answer alike; nothing here reads a server or writes.
"""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pandas as pd

from toolkit import errors, validate
from toolkit.inspection import frames

DEFAULT_WINDOW = 900.0
"""Seconds of event log the rates are taken over (15 minutes)."""

ARRIVALS = ("queued", "retried", "reclaimed")
"""Events that put a job in its queue (when the status they leave is ``queued``). One move
may log two of them at the same instant (a manual re-queue: ``queued`` and ``retried``):
an arrival is one ``(job, time)``."""


def window_seconds(window: float | timedelta) -> float:
    """``window`` as positive seconds (a number of seconds or a ``timedelta``)."""
    seconds = window.total_seconds() if isinstance(window, timedelta) else window
    try:
        return validate.seconds("window", seconds)
    except errors.ValidationError:
        raise errors.ValidationError("window", window, "must be a positive number of seconds "
                                     "or a timedelta") from None


def frame(jobs: pd.DataFrame, events: pd.DataFrame, now: pd.Timestamp, window_s: float
          ) -> pd.DataFrame:
    """The ``backlog`` frame: one row per queue with a waiting job or traffic in the window.

    ``scheduled`` and ``next_due`` count the queued jobs whose ``run_at`` is after ``now``.

    ``events`` should hold at least the window (older rows are ignored).
    """
    queued = jobs[jobs["status"] == "queued"]
    due = queued["run_at"] if "run_at" in queued else pd.Series(pd.NaT, index=queued.index)
    ahead = queued[due.notna() & (due > now)]  # a snapshot from before run_at has none
    scheduled = ahead.groupby("queue", observed=True).size()
    next_due = ahead.groupby("queue", observed=True)["run_at"].min()
    depth = queued.groupby("queue", observed=True).size()
    oldest = queued.groupby("queue", observed=True)["updated_at"].min()
    recent = events[events["at"] >= now - pd.Timedelta(seconds=window_s)]
    queue_of = jobs["queue"]
    recent = recent.assign(queue=recent["job_id"].map(queue_of))
    arrived = recent[recent["event"].isin(ARRIVALS) & (recent["status"] == "queued")]
    arrived = arrived.drop_duplicates(["job_id", "at"])
    left = recent[recent["event"] == "assigned"]
    enq = arrived.groupby("queue", observed=True).size() / window_s
    deq = left.groupby("queue", observed=True).size() / window_s
    names = sorted(set(depth.index) | set(enq.index) | set(deq.index))
    if not names:
        return frames.empty("backlog")
    d = depth.reindex(names, fill_value=0).astype("int64")
    e = enq.reindex(names, fill_value=0.0)
    q = deq.reindex(names, fill_value=0.0)
    net = q - e
    eta = np.where(d == 0, 0.0, np.where(net > 0, d / net.where(net > 0, 1.0), np.nan))
    age = (now - oldest.reindex(names)).dt.total_seconds()
    return frames.conform("backlog", {
        "queue": names, "depth": d.to_numpy(), "oldest_age_s": age.to_numpy(),
        "enqueued_per_s": e.to_numpy(), "dispatched_per_s": q.to_numpy(), "drain_eta_s": eta,
        "scheduled": scheduled.reindex(names, fill_value=0).astype("int64").to_numpy(),
        "next_due": next_due.reindex(names).to_numpy()})
