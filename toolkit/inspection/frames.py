"""The column schema of every Inspector frame, written down once, and the dtype helpers.

Each frame has an index (named after its id) and columns in a fixed order:
ids first, then status, then the rest, then times. Times are
``datetime64[us, UTC]``; statuses are ``category`` with every status as a
category even when absent; counts are nullable ``Int64``; JSON is kept as
text (``string``) unless asked for. An empty frame has the same columns and
dtypes. A unit test pins these schemas.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import pyarrow as pa

from toolkit import errors, models

UTC_TIME = pd.DatetimeTZDtype(unit="us", tz="UTC")
STRING = pd.StringDtype()


def status_dtype(enum: type[Any]) -> pd.CategoricalDtype:
    """A categorical dtype holding every value of a status enum, in declaration order."""
    return pd.CategoricalDtype([m.value for m in enum], ordered=False)


JOB_STATUS = status_dtype(models.JobStatus)
WORKFLOW_STATUS = status_dtype(models.WorkflowStatus)
WORKER_STATUS = status_dtype(models.WorkerStatus)
ASSIGNMENT_STATUS = status_dtype(models.AssignmentStatus)
ENTITY = pd.CategoricalDtype(["workflow", "job", "worker", "assignment"])
EVENTS = ("created", "queued", "assigned", "started", "completed", "failed", "retried",
          "reclaimed", "cancelled", "deleted", "edited")
"""Every event name of the job event log (``job_events.event``), in lifecycle order."""
EVENT = pd.CategoricalDtype(list(EVENTS), ordered=False)

_WAITS: Mapping[str, Any] = {"count": "Int64", "p50_s": "Float64", "p90_s": "Float64",
                             "p99_s": "Float64", "max_s": "Float64"}
_JOB_COUNTS = {f"jobs_{s.value}": "Int64" for s in models.JobStatus}

SCHEMAS: Mapping[str, tuple[str, Mapping[str, Any]]] = {
    "workflows": ("workflow_id", {
        "name": STRING, "status": WORKFLOW_STATUS, "jobs_total": "Int64", **_JOB_COUNTS,
        "version": "Int64", "metadata": STRING, "idempotency_key": STRING, "created_at": UTC_TIME,
        "updated_at": UTC_TIME,
    }),
    "jobs": ("job_id", {
        "workflow_id": STRING, "worker_id": STRING, "name": STRING, "status": JOB_STATUS,
        "queue": STRING, "priority": "Int64", "attempts": "Int64", "max_attempts": "Int64",
        "version": "Int64", "error": STRING, "payload": STRING, "result": STRING,
        "idempotency_key": STRING, "wait_s": "Float64", "duration_s": "Float64", "created_at": UTC_TIME,
        "updated_at": UTC_TIME, "started_at": UTC_TIME, "finished_at": UTC_TIME, "run_at": UTC_TIME,
    }),
    "workers": ("worker_id", {
        "hostname": STRING, "status": WORKER_STATUS, "alive": "boolean", "active_jobs": "Int64",
        "capacity": "Int64", "queues": STRING, "heartbeat_age_s": "Float64", "version": "Int64",
        "metadata": STRING, "last_heartbeat": UTC_TIME, "registered_at": UTC_TIME,
    }),
    "assignments": ("assignment_id", {
        "job_id": STRING, "worker_id": STRING, "status": ASSIGNMENT_STATUS, "attempt": "Int64",
        "duration_s": "Float64", "assigned_at": UTC_TIME, "finished_at": UTC_TIME,
    }),
    "queue": ("job_id", {
        "queue": STRING, "position": "Int64", "priority": "Int64", "enqueue_seq": "Int64",
        "in_flight": "boolean",
    }),
    "locks": ("name", {
        "held": "boolean", "ttl_s": "Float64", "fencing_token": "Int64",
    }),
    "metrics": ("name", {
        "value": "Int64", "checkpoint": "Int64",
    }),
    "tiers": ("id", {
        "entity": ENTITY, "in_memory": "boolean", "in_redis": "boolean", "in_postgres": "boolean",
        "memory_version": "Int64", "redis_version": "Int64", "postgres_version": "Int64",
        "consistent": "boolean", "problem": STRING,
    }),
    "summary": ("item", {
        "value": "Int64",
    }),
    "events": ("event_id", {
        "job_id": STRING, "workflow_id": STRING, "worker_id": STRING, "event": EVENT,
        "status": JOB_STATUS, "attempt": "Int64", "detail": STRING, "at": UTC_TIME,
    }),
    "timeline": ("event_id", {
        "event": EVENT, "status": JOB_STATUS, "worker_id": STRING, "attempt": "Int64",
        "state_s": "Float64", "scheduled_s": "Float64", "run_at": UTC_TIME, "detail": STRING,
        "at": UTC_TIME,
    }),
    "heartbeat_gaps": ("worker_id", {
        "n_beats": "Int64", "gap_p50_s": "Float64", "gap_p99_s": "Float64", "gap_max_s": "Float64",
        "suggested_ttl_s": "Float64", "first_beat": UTC_TIME, "last_beat": UTC_TIME,
    }),
    "wait_times_priority": ("priority", _WAITS),
    "wait_times_queue": ("queue", _WAITS),
    "heartbeat_times": ("worker_id", {
        "at": UTC_TIME,
    }),
    "dependencies": ("job_id", {
        "depends_on": STRING,
    }),
    "paused": ("queue", {
        "reason": STRING, "paused_by": STRING, "paused_since": UTC_TIME,
    }),
    "queues": ("queue", {
        "depth": "Int64", "paused": "boolean", "reason": STRING, "paused_by": STRING,
        "paused_since": UTC_TIME,
    }),
    "backlog": ("queue", {
        "depth": "Int64", "oldest_age_s": "Float64", "enqueued_per_s": "Float64",
        "dispatched_per_s": "Float64", "drain_eta_s": "Float64", "scheduled": "Int64",
        "next_due": UTC_TIME,
    }),
    "actions": ("action_id", {
        "verb": STRING, "status": STRING, "actor": STRING, "reason": STRING, "planned": "Int64",
        "applied": "Int64", "skipped": "Int64", "value": STRING, "filter": STRING,
        "created_at": UTC_TIME, "updated_at": UTC_TIME, "finished_at": UTC_TIME,
    }),
}
"""frame name -> (index name, {column: dtype}) in column order."""

COLUMN_DOCS: Mapping[str, Mapping[str, str]] = {
    "jobs": {
        "wait_s": "queue wait of the latest attempt: from the event that made the job queued to "
                  "its 'assigned' event (the measure of wait_times()); NA while pending or queued "
                  "and for a job never assigned. Never includes time pending on a dependency.",
        "duration_s": "finished_at - started_at (NA until both are set).",
        "run_at": "when the job may be handed out (set by run_at=/delay= or a retry's backoff); "
                  "a queued job with run_at in the future is scheduled. NA: at once.",
    },
    "assignments": {"duration_s": "finished_at - assigned_at of the attempt."},
    "workers": {"heartbeat_age_s": "seconds since the latest heartbeat seen in Redis or PostgreSQL."},
    "backlog": {"depth": "jobs PostgreSQL calls queued.",
                "oldest_age_s": "seconds since the oldest queued job was last updated "
                                "(queued, re-queued or edited).",
                "enqueued_per_s": "jobs that entered the queue per second over the window "
                                  "(created, queued, retried or reclaimed into it).",
                "dispatched_per_s": "jobs handed to a worker per second over the window.",
                "drain_eta_s": "depth / (dispatched - enqueued): seconds to empty the queue at "
                               "the window's pace; NA when it is not shrinking, 0 when empty.",
                "scheduled": "queued jobs (counted in depth) whose run_at is still in the future: "
                             "scheduled, or a retry backing off.",
                "next_due": "the soonest run_at of those scheduled jobs (NA when none)."},
    "timeline": {"run_at": "when the retry this event scheduled may run (a retried event's "
                           "detail); NA on other events.",
                 "scheduled_s": "the part of state_s spent waiting for run_at (the backoff); "
                                "state_s - scheduled_s is the wait in the queue after it."},
    "queues": {"depth": "jobs waiting in the Redis queue (in-flight pops excluded).",
               "paused": "an operator paused the queue (sm.pause_queue): no job of it is handed out."},
}
"""What the derived columns mean, frame -> {column: meaning}: one name, one meaning."""

INDEX_DTYPES: Mapping[str, Any] = {"events": "Int64", "timeline": "Int64",
                                   "wait_times_priority": "Int64"}
"""The index dtype of the frames whose index is not a ``string`` id."""

INTERNAL_FRAMES = ("heartbeat_times", "dependencies")
"""Frames kept in a snapshot for the analytics, not Inspector methods of their own:
``heartbeat_times`` (one row per remembered heartbeat, index ``worker_id``, not unique) and
``dependencies`` (one row per dependency edge, index ``job_id``, not unique)."""

CLI_FRAMES = ("workflows", "jobs", "workers", "assignments", "queue", "queues", "backlog", "locks",
              "metrics", "tiers", "summary")
"""Frames ``toolkit inspect`` can print."""


def empty(name: str) -> pd.DataFrame:
    """An empty frame with the columns, dtypes and index of ``name``."""
    index_name, columns = SCHEMAS[name]
    frame = pd.DataFrame({c: pd.Series([], dtype=d) for c, d in columns.items()})
    frame.index = pd.Index([], dtype=INDEX_DTYPES.get(name, STRING), name=index_name)
    return frame


def conform(name: str, data: pd.DataFrame | Mapping[str, Any]) -> pd.DataFrame:
    """Return ``data`` with exactly the schema of ``name`` (order, dtypes, index)."""
    index_name, columns = SCHEMAS[name]
    frame = data if isinstance(data, pd.DataFrame) else pd.DataFrame(dict(data))
    if len(frame) == 0:
        return empty(name)
    index = frame[index_name] if index_name in frame else frame.index.to_series()
    out = pd.DataFrame(index=pd.Index(index.astype(INDEX_DTYPES.get(name, STRING)).to_numpy(),
                                      dtype=INDEX_DTYPES.get(name, STRING), name=index_name))
    for col, dtype in columns.items():
        if col not in frame:
            out[col] = _cast(pd.Series([None] * len(frame), index=out.index), dtype)
            continue
        source = frame[col]
        if source.dtype == dtype:
            # Already right: reuse the array (no per-cell objects, no copy through numpy).
            out[col] = pd.Series(source.array, index=out.index, copy=False)
        else:
            out[col] = _cast(pd.Series(source.array, index=out.index), dtype)
    return out


def _cast(series: pd.Series, dtype: Any) -> pd.Series:
    if dtype == UTC_TIME:
        if pd.api.types.is_integer_dtype(series.dtype) or (series.dtype == object and len(series) and \
                isinstance(series.dropna().iloc[0] if series.notna().any() else None, int)):
            return pd.to_datetime(series, unit="us", utc=True).astype(UTC_TIME)
        return pd.to_datetime(series, utc=True).astype(UTC_TIME)
    return series.astype(dtype)


def epoch_us_to_utc(values: Any) -> pd.Series:
    """Microseconds since the epoch (nullable) to ``datetime64[us, UTC]``."""
    return pd.to_datetime(pd.Series(values, dtype="Int64"), unit="us", utc=True).astype(UTC_TIME)


def parse_freq(freq: str) -> Any:
    """Return the pandas offset of a resampling frequency such as ``"1min"``.

    Raises
    ------
    ValidationError
        ``freq`` is not a pandas frequency.
    """
    try:
        return pd.tseries.frequencies.to_offset(freq)
    except (ValueError, TypeError) as exc:
        raise errors.ValidationError("freq", freq, str(exc)) from None


def key_column(ids: pd.Series, keys: pa.Table) -> pd.Series:
    """The idempotency key of each id in ``ids`` (NA for none), from ``export.idempotency_keys``."""
    table = from_arrow(keys)
    by_id = pd.Series(table["key"].array, index=table["entity_id"]) if len(table) else \
        pd.Series([], dtype=STRING)
    return ids.map(by_id).astype(STRING)


def add_job_extras(df: pd.DataFrame, keys: pa.Table, run_at: pa.Table) -> None:
    """Add ``idempotency_key`` (from ``export.idempotency_keys``) and ``run_at`` (from
    ``export.run_at_times``: when a queued job may run; NA for none) to a jobs frame."""
    df["idempotency_key"] = key_column(df["job_id"], keys)
    times = from_arrow(run_at)
    by_id = (pd.Series(times["run_at"].astype("Int64").array, index=times["job_id"]) if len(times)
             else pd.Series([], dtype="Int64"))
    df["run_at"] = epoch_us_to_utc(df["job_id"].map(by_id).astype("Int64").array)


def from_arrow(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as a DataFrame with nullable pandas dtypes (string, Int64, Float64, boolean)."""
    def mapper(t: pa.DataType) -> Any:
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return pd.StringDtype()
        if pa.types.is_integer(t):
            return pd.Int64Dtype()
        if pa.types.is_floating(t):
            return pd.Float64Dtype()
        if pa.types.is_boolean(t):
            return pd.BooleanDtype()
        return None

    frame: pd.DataFrame = table.to_pandas(types_mapper=mapper)
    return frame


def seconds_between(later: pd.Series, earlier: pd.Series) -> pd.Series:
    """``later - earlier`` in float seconds (Float64, NA where either is missing)."""
    return ((later - earlier).dt.total_seconds()).astype("Float64")
