"""Analyses over the Inspector's frames: timelines, heartbeat gaps, wait times.

Everything here works from frames only (the event log, jobs, workers, the
queue, remembered heartbeat times), never from a connection, so the same
code answers on a live system (:class:`~toolkit.Inspector`) and on an
offline snapshot (:func:`toolkit.Inspector.from_snapshot`).
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from toolkit import errors, masking, models, validate
from toolkit.inspection import frames, search

if TYPE_CHECKING:
    from toolkit.inspection.explain import Explanation

TTL_MARGIN = 0.2
"""``suggested_ttl_s`` is the largest heartbeat gap plus this fraction, rounded up to 0.1 s."""
WAIT_BY = ("priority", "queue")


def check_since(since: Any) -> datetime | None:
    """Return ``since`` as an aware datetime (or None); anything else is a ValidationError."""
    if since is None:
        return None
    if not isinstance(since, datetime) or since.tzinfo is None or since.utcoffset() is None:
        raise errors.ValidationError("since", since, "must be a timezone-aware datetime")
    return since


def check_event_filters(job_id: Any, workflow_id: Any, worker_id: Any) -> dict[str, str | None]:
    """Validate the id filters of ``events()`` and return them as ``{column: value}``."""
    given = {"job_id": job_id, "workflow_id": workflow_id, "worker_id": worker_id}
    for field, value in given.items():
        if value is not None:
            validate.identifier(field, value)
    return given


def timeline_frame(events: pd.DataFrame, now: pd.Timestamp) -> pd.DataFrame:
    """One job's events in order with ``state_s``, the seconds spent in the state each event began.

    The last row counts until ``now`` when the job is still live (its last
    status is not final, ``models.FINAL_JOB_STATUSES``, and it was not deleted), else it is
    NA. A job failed for good is live: it waits for an operator's re-queue.
    """
    ev = events.sort_values("at", kind="stable")
    state = (ev["at"].shift(-1) - ev["at"]).dt.total_seconds().astype("Float64")
    last = ev.iloc[-1]
    live = last["event"] != "deleted" and last["status"] not in models.FINAL_JOB_STATUSES
    state.iloc[-1] = (now - last["at"]).total_seconds() if live else None
    run_at = pd.Series([_detail_run_at(d) for d in ev["detail"]], index=ev.index,
                       dtype=frames.UTC_TIME)
    return frames.conform("timeline", ev.assign(
        state_s=state, run_at=run_at, scheduled_s=scheduled_seconds(ev["at"], state, run_at)
    ).reset_index())


def _detail_run_at(detail: Any) -> pd.Timestamp | None:
    """The ``run_at`` a ``retried`` event's detail names (None when it names none)."""
    if not isinstance(detail, str) or "run_at" not in detail:
        return None
    try:
        value = json.loads(detail).get("run_at")
        return pd.Timestamp(value).tz_convert("UTC") if isinstance(value, str) else None
    except (ValueError, TypeError, AttributeError):
        return None


def scheduled_seconds(at: pd.Series, state: pd.Series, run_at: pd.Series) -> pd.Series:
    """Of each state, the seconds spent before its ``run_at``: ``min(run_at, state end) - at``,
    never negative; NA where the event scheduled nothing. A state still open ends at ``run_at``."""
    # In seconds, not timestamps: ``at + state`` carries nanoseconds that a microsecond
    # ``run_at`` column cannot hold, and mixing the two made an object column (a TypeError).
    until = (run_at - at).dt.total_seconds().to_numpy(dtype=float, na_value=np.nan)
    lasted = state.astype(float).fillna(np.inf).to_numpy()
    return pd.Series(np.minimum(until, lasted), index=at.index).clip(lower=0.0).astype("Float64")


def suggest_ttl(max_gap: float | None) -> float | None:
    """The heartbeat TTL that no observed gap would have exceeded: ``max_gap * 1.2``, up to 0.1 s."""
    if max_gap is None or not math.isfinite(max_gap):
        return None
    return max(0.1, math.ceil(max_gap * (1 + TTL_MARGIN) * 10) / 10)


def heartbeat_gaps_frame(times: pd.DataFrame, workers: pd.Index) -> pd.DataFrame:
    """Per worker: heartbeats remembered and the p50/p99/max gap between consecutive ones.

    ``suggested_ttl_s`` (the same on every row, also ``frame.attrs``) is the
    largest gap over all workers with a margin (:func:`suggest_ttl`): a TTL at
    least this long would have called no worker dead during the window the
    history covers. The gap after a worker's last beat is not counted: that
    is a worker that stopped, not a slow one.
    """
    ids = sorted(set(workers) | set(times.index))
    rows: list[dict[str, Any]] = []
    for wid in ids:
        at = times.loc[times.index == wid, "at"].sort_values()
        secs = at.map(lambda t: t.timestamp()).to_numpy(dtype=float)
        gaps = np.diff(secs)
        rows.append({"worker_id": wid, "n_beats": len(secs),
                     "gap_p50_s": float(np.quantile(gaps, 0.5)) if len(gaps) else None,
                     "gap_p99_s": float(np.quantile(gaps, 0.99)) if len(gaps) else None,
                     "gap_max_s": float(gaps.max()) if len(gaps) else None,
                     "first_beat": at.iloc[0] if len(at) else None,
                     "last_beat": at.iloc[-1] if len(at) else None})
    if not rows:
        out = frames.empty("heartbeat_gaps")
        out.attrs["suggested_ttl_s"] = None
        return out
    maxima = [r["gap_max_s"] for r in rows if r["gap_max_s"] is not None]
    ttl = suggest_ttl(max(maxima)) if maxima else None
    for r in rows:
        r["suggested_ttl_s"] = ttl
    out = frames.conform("heartbeat_gaps", pd.DataFrame(rows))
    out.attrs["suggested_ttl_s"] = ttl
    return out


def waits(events: pd.DataFrame) -> pd.DataFrame:
    """Each wait in a queue: from the event that made a job queued to its next ``assigned``.

    Returns columns ``job_id``, ``wait_s``, ``queued_at``, ``assigned_at`` (one row per
    assignment that followed a stay in the queue).
    """
    if events.empty:
        return pd.DataFrame({"job_id": pd.Series([], dtype=frames.STRING),
                             "wait_s": pd.Series([], dtype="Float64"),
                             "queued_at": pd.Series([], dtype=frames.UTC_TIME),
                             "assigned_at": pd.Series([], dtype=frames.UTC_TIME)})
    ev = events.reset_index().sort_values(["job_id", "event_id"], kind="stable")
    queued = ev["status"].astype(object) == "queued"
    prev = queued.groupby(ev["job_id"]).shift(1, fill_value=False).astype(bool)
    entered = ev["at"].where(queued & ~prev)
    ev["queued_at"] = entered.groupby(ev["job_id"]).ffill()
    got = ev[ev["event"].astype(object) == "assigned"].dropna(subset=["queued_at"])
    wait = (got["at"] - got["queued_at"]).dt.total_seconds().astype("Float64")
    return pd.DataFrame({"job_id": got["job_id"].astype(frames.STRING).to_numpy(),
                         "wait_s": wait.to_numpy(), "queued_at": got["queued_at"].to_numpy(),
                         "assigned_at": got["at"].to_numpy()}).astype(
        {"wait_s": "Float64", "queued_at": frames.UTC_TIME, "assigned_at": frames.UTC_TIME})


def wait_times_frame(events: pd.DataFrame, jobs: pd.DataFrame, by: str) -> pd.DataFrame:
    """Queue waits grouped by the jobs' ``priority`` or ``queue``: count, p50, p90, p99, max."""
    name = f"wait_times_{by}"
    w = waits(events)
    w = w[w["job_id"].isin(jobs.index)]
    if w.empty:
        return frames.empty(name)
    w = w.assign(group=jobs.loc[w["job_id"].to_numpy(), by].to_numpy())
    rows = []
    for group, part in w.groupby("group", sort=True):
        s = part["wait_s"].astype(float).to_numpy()
        rows.append({by: group, "count": len(s), "p50_s": np.quantile(s, 0.5),
                     "p90_s": np.quantile(s, 0.9), "p99_s": np.quantile(s, 0.99), "max_s": s.max()})
    return frames.conform(name, pd.DataFrame(rows))


class Analytics:
    """The analyses every Inspector offers, computed from its frames.

    A subclass provides the frames (``events``, ``jobs``, ``workflows``, ``workers``,
    ``queue``...), ``_heartbeat_times()``, ``_dependencies()``, ``_paused()``, ``_now()``
    and ``heartbeat_ttl``; the live :class:`~toolkit.Inspector` reads them
    from the servers, a snapshot from Parquet files.
    """

    heartbeat_ttl: float
    unmask: bool = False
    """Show sensitive values (:mod:`toolkit.masking`) by default; each method's ``unmask`` overrides it."""
    masker: masking.Masker = masking.Masker()
    """Which keys are sensitive (the defaults, extended by ``sensitive_keys``)."""

    def _masked(self, name: str, frame: pd.DataFrame, unmask: bool | None) -> pd.DataFrame:
        """``frame`` masked, unless ``unmask`` (or, when it is None, the Inspector's ``unmask``)."""
        if self.unmask if unmask is None else unmask:
            return frame
        return search.mask_frame(name, frame, self.masker)

    def events(self, since: datetime | None = None, job_id: str | None = None,
               workflow_id: str | None = None, worker_id: str | None = None, *,
               unmask: bool | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def jobs(self, workflow_id: str | None = None, status: str | None = None, *,
             payload: dict[str, Any] | None = None, payload_columns: dict[str, str] | None = None,
             limit: int | None = None, unmask: bool | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def workflows(self, *, unmask: bool | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def workers(self, *, unmask: bool | None = None) -> pd.DataFrame:
        raise NotImplementedError

    def queue(self) -> pd.DataFrame:
        raise NotImplementedError

    def _heartbeat_times(self) -> pd.DataFrame:
        raise NotImplementedError

    def _dependencies(self) -> pd.DataFrame:
        raise NotImplementedError

    def _paused(self) -> pd.DataFrame:
        raise NotImplementedError

    def _now(self) -> pd.Timestamp:
        raise NotImplementedError

    def timeline(self, job_id: str, *, unmask: bool | None = None) -> pd.DataFrame:
        """One job's events in order (index ``event_id``) with ``state_s``, the time spent in each state.

        ``state_s`` runs until the next event; on the last row it runs until
        now for a live job and is NA for a finished or deleted one.

        Raises
        ------
        NotFound
            The event log holds nothing for ``job_id``.
        ValidationError
            ``job_id`` is not an id.
        """
        validate.identifier("job_id", job_id)
        ev = self.events(job_id=job_id, unmask=unmask)
        if ev.empty:
            raise errors.NotFound("job", job_id)
        return timeline_frame(ev, self._now())

    def heartbeat_gaps(self) -> pd.DataFrame:
        """Per worker (index ``worker_id``): beats remembered, gap p50/p99/max in seconds.

        Built from the recent heartbeat times Redis keeps per worker (the last
        500, for a day). ``suggested_ttl_s`` is the largest gap over every
        worker plus 20 %, rounded up to 0.1 s: the shortest TTL that would have
        flagged no worker while it was beating. It is also in
        ``frame.attrs["suggested_ttl_s"]`` (None without two beats of any worker).
        """
        return heartbeat_gaps_frame(self._heartbeat_times(), self.workers().index)

    def queues(self) -> pd.DataFrame:
        """One row per queue with a job waiting or a pause (index ``queue``).

        ``depth`` counts the jobs waiting in Redis; ``paused``, ``reason``,
        ``paused_by`` and ``paused_since`` come from PostgreSQL's record of
        ``sm.pause_queue`` (``toolkit pause``): a paused queue hands out no job.
        """
        from toolkit.inspection import paused

        return paused.queues_frame(self.queue(), self._paused())

    def backlog(self, window: float | timedelta = 900.0) -> pd.DataFrame:
        """Backlog gauges per queue (index ``queue``): ``depth``, ``oldest_age_s``,
        ``enqueued_per_s`` and ``dispatched_per_s`` over the last ``window`` seconds (or a
        ``timedelta``; default 15 minutes) of the event log, and ``drain_eta_s``.

        Raises
        ------
        ValidationError
            ``window`` is not a positive number of seconds or a timedelta.
        """
        from toolkit.inspection import backlog

        seconds = backlog.window_seconds(window)
        now = self._now()
        since = (now - pd.Timedelta(seconds=seconds)).to_pydatetime()
        return backlog.frame(self.jobs(), self.events(since=since), now, seconds)

    def wait_times(self, by: str = "priority", *, since: datetime | None = None) -> pd.DataFrame:
        """How long jobs waited in a queue, from the event log, per ``priority`` or ``queue``.

        A wait runs from the event that made a job queued (created, queued,
        retried, reclaimed) to its next ``assigned`` event. Columns: ``count``,
        ``p50_s``, ``p90_s``, ``p99_s``, ``max_s``; the index is ``by``.

        Raises
        ------
        ValidationError
            ``by`` is neither ``"priority"`` nor ``"queue"``, or ``since`` is not aware.
        """
        if by not in WAIT_BY:
            raise errors.ValidationError("by", by, "must be 'priority' or 'queue'")
        return wait_times_frame(self.events(since=since), self.jobs(), by)

    def explain(self, job_id: str, *, unmask: bool | None = None) -> Explanation:
        """Why is this job where it is? An :class:`~toolkit.inspection.explain.Explanation`.

        Its timeline's ``detail`` is masked like ``events()`` unless ``unmask``.

        Raises
        ------
        NotFound
            No job and no event with that id.
        """
        from toolkit.inspection import explain

        return explain.explain(self, job_id, unmask=unmask)

    def snapshot(self, path: str | Path, *, events_since: datetime | None = None,
                 overwrite: bool = False, unmask: bool | None = None) -> Path:
        """Write every frame to ``path`` (a folder of Parquet files plus ``manifest.json``).

        A folder that exists and is not empty is refused (``ValidationError``)
        unless ``overwrite=True``: an earlier snapshot is never replaced silently.

        Reopen it with :meth:`toolkit.Inspector.from_snapshot`, with no server.
        ``events_since`` keeps only the events from that time (default: all).
        The manifest holds the time, namespace, schema, toolkit version and row
        counts, never a URL. Sensitive values are masked in the files (the manifest
        says ``"masked": true``) unless ``unmask`` (default: the Inspector's).
        """
        from toolkit.inspection import snapshot

        return snapshot.write(self, Path(path), events_since=check_since(events_since),
                              overwrite=overwrite, unmask=self.unmask if unmask is None else unmask)

