"""The column schema of every Inspector frame (names, order, dtypes, index), pinned."""

from __future__ import annotations

import pandas as pd
import pytest

from toolkit import models
from toolkit.inspection import frames

S, I64, F64, B, T = "string", "Int64", "Float64", "boolean", "datetime64[us, UTC]"
JOB_COUNTS = [(f"jobs_{s.value}", I64) for s in models.JobStatus]
WAITS = [("count", I64), ("p50_s", F64), ("p90_s", F64), ("p99_s", F64), ("max_s", F64)]

PINNED: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "workflows": ("workflow_id", S, [("name", S), ("status", "category"), ("jobs_total", I64),
                                     *JOB_COUNTS, ("version", I64), ("metadata", S),
                                     ("idempotency_key", S), ("created_at", T), ("updated_at", T)]),
    "jobs": ("job_id", S, [("workflow_id", S), ("worker_id", S), ("name", S), ("status", "category"),
                           ("queue", S), ("priority", I64), ("attempts", I64), ("max_attempts", I64),
                           ("version", I64), ("error", S), ("payload", S), ("result", S),
                           ("idempotency_key", S), ("wait_s", F64), ("duration_s", F64),
                           ("created_at", T), ("updated_at", T),
                           ("started_at", T), ("finished_at", T), ("run_at", T)]),
    "workers": ("worker_id", S, [("hostname", S), ("status", "category"), ("alive", B),
                                 ("active_jobs", I64), ("capacity", I64), ("queues", S),
                                 ("heartbeat_age_s", F64), ("version", I64), ("metadata", S),
                                 ("last_heartbeat", T), ("registered_at", T)]),
    "assignments": ("assignment_id", S, [("job_id", S), ("worker_id", S), ("status", "category"),
                                         ("attempt", I64), ("duration_s", F64), ("assigned_at", T),
                                         ("finished_at", T)]),
    "queue": ("job_id", S, [("queue", S), ("position", I64), ("priority", I64),
                            ("enqueue_seq", I64), ("in_flight", B)]),
    "locks": ("name", S, [("held", B), ("ttl_s", F64), ("fencing_token", I64)]),
    "metrics": ("name", S, [("value", I64), ("checkpoint", I64)]),
    "tiers": ("id", S, [("entity", "category"), ("in_memory", B), ("in_redis", B), ("in_postgres", B),
                        ("memory_version", I64), ("redis_version", I64), ("postgres_version", I64),
                        ("consistent", B), ("problem", S)]),
    "summary": ("item", S, [("value", I64)]),
    "events": ("event_id", I64, [("job_id", S), ("workflow_id", S), ("worker_id", S),
                                 ("event", "category"), ("status", "category"), ("attempt", I64),
                                 ("detail", S), ("at", T)]),
    "timeline": ("event_id", I64, [("event", "category"), ("status", "category"), ("worker_id", S),
                                   ("attempt", I64), ("state_s", F64), ("scheduled_s", F64),
                                   ("run_at", T), ("detail", S), ("at", T)]),
    "heartbeat_gaps": ("worker_id", S, [("n_beats", I64), ("gap_p50_s", F64), ("gap_p99_s", F64),
                                        ("gap_max_s", F64), ("suggested_ttl_s", F64),
                                        ("first_beat", T), ("last_beat", T)]),
    "wait_times_priority": ("priority", I64, WAITS),
    "wait_times_queue": ("queue", S, WAITS),
    "heartbeat_times": ("worker_id", S, [("at", T)]),
    "dependencies": ("job_id", S, [("depends_on", S)]),
    "paused": ("queue", S, [("reason", S), ("paused_by", S), ("paused_since", T)]),
    "queues": ("queue", S, [("depth", I64), ("paused", B), ("reason", S), ("paused_by", S),
                            ("paused_since", T)]),
    "backlog": ("queue", S, [("depth", I64), ("oldest_age_s", F64), ("enqueued_per_s", F64),
                             ("dispatched_per_s", F64), ("drain_eta_s", F64), ("scheduled", I64),
                             ("next_due", T)]),
    "actions": ("action_id", S, [("verb", S), ("status", S), ("actor", S), ("reason", S),
                                 ("planned", I64), ("applied", I64), ("skipped", I64), ("value", S),
                                 ("filter", S), ("created_at", T), ("updated_at", T),
                                 ("finished_at", T)]),
}


def test_every_schema_is_pinned() -> None:
    assert set(frames.SCHEMAS) == set(PINNED)


@pytest.mark.parametrize("name", sorted(PINNED))
def test_frame_schema_matches_the_pin(name: str) -> None:
    index_name, index_dtype, columns = PINNED[name]
    frame = frames.empty(name)
    assert frame.index.name == index_name and str(frame.index.dtype) == index_dtype
    assert [(c, str(frame[c].dtype)) for c in frame.columns] == columns


@pytest.mark.parametrize(("name", "column", "enum"), [
    ("events", "status", models.JobStatus), ("timeline", "status", models.JobStatus),
    ("jobs", "status", models.JobStatus), ("workers", "status", models.WorkerStatus),
    ("workflows", "status", models.WorkflowStatus),
    ("assignments", "status", models.AssignmentStatus)])
def test_status_categories_hold_every_status(name: str, column: str, enum: type) -> None:
    assert list(frames.empty(name)[column].cat.categories) == [m.value for m in enum]


def test_event_category_holds_every_event_name() -> None:
    assert list(frames.EVENTS) == ["created", "queued", "assigned", "started", "completed", "failed",
                                   "retried", "reclaimed", "cancelled", "deleted", "edited"]
    for name in ("events", "timeline"):
        assert list(frames.empty(name)["event"].cat.categories) == list(frames.EVENTS)


def test_conform_keeps_an_integer_index_and_utc_times() -> None:
    got = frames.conform("events", pd.DataFrame({
        "event_id": [3, 1], "job_id": ["a", "b"], "event": ["queued", "reclaimed"],
        "status": ["queued", "queued"], "at": pd.to_datetime([0, 1], unit="s", utc=True)}))
    assert list(got.index) == [3, 1] and str(got.index.dtype) == "Int64"
    assert str(got["at"].dtype) == T and got["worker_id"].isna().all()


def test_column_docs_name_real_columns_and_define_wait_s_as_a_queue_wait() -> None:
    for name, docs in frames.COLUMN_DOCS.items():
        assert set(docs) <= set(frames.SCHEMAS[name][1]), name
    assert "assigned" in frames.COLUMN_DOCS["jobs"]["wait_s"]
