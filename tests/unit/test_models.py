"""Models: transitions, frozen snapshots, enums."""

from __future__ import annotations

import copy
import pickle
from datetime import UTC, datetime

import pytest

from toolkit import models
from toolkit.models import JobStatus as J


def test_job_transition_table_matches_contract() -> None:
    expected = {
        "pending": {"queued", "cancelled"},
        "queued": {"assigned", "cancelled"},
        "assigned": {"running", "queued", "failed", "cancelled"},
        "running": {"completed", "failed", "queued", "cancelled"},
        "failed": {"queued"},
        "completed": set(),
        "cancelled": set(),
    }
    assert {k.value: {t.value for t in v} for k, v in models.JOB_TRANSITIONS.items()} == expected


def test_job_sources_invert_the_table() -> None:
    assert models.job_sources(J.QUEUED) == {J.PENDING, J.ASSIGNED, J.RUNNING, J.FAILED}
    assert models.job_sources(J.COMPLETED) == {J.RUNNING}


def test_status_enums_compare_as_strings() -> None:
    assert J.QUEUED == "queued" and J.QUEUED == "queued"
    assert models.WorkerStatus("inactive") is models.WorkerStatus.INACTIVE


def _job(**over: object) -> models.Job:
    now = datetime.now(UTC)
    fields = dict(id="j", workflow_id="w", name="n", status="queued", priority=0, queue="default",
                  payload={"a": [1, {"b": 2}]}, result=None, error=None, attempts=0, max_attempts=3,
                  worker_id=None, depends_on=[], created_at=now, updated_at=now, started_at=None,
                  finished_at=None, version=1)
    fields.update(over)
    return models.Job(**fields)  # type: ignore[arg-type]


def test_payload_is_frozen_but_equal_to_plain_json() -> None:
    job = _job()
    assert job.payload == {"a": [1, {"b": 2}]}
    with pytest.raises(TypeError):
        job.payload["a"] = 1
    with pytest.raises(TypeError):
        job.payload["a"].append(3)
    with pytest.raises(TypeError):
        job.payload["a"][1]["c"] = 1
    assert job.status is J.QUEUED and job.depends_on == ()


def test_frozen_values_copy_and_pickle_safely() -> None:
    job = _job()
    assert copy.deepcopy(job.payload) == job.payload
    assert pickle.loads(pickle.dumps(job.payload)) == {"a": [1, {"b": 2}]}
    thawed = models.thaw(job.payload)
    thawed["a"].append(3)
    assert job.payload["a"] == [1, {"b": 2}]


def test_entities_are_frozen_dataclasses() -> None:
    job = _job()
    with pytest.raises(AttributeError):
        job.status = J.RUNNING  # type: ignore[misc]
    assert job.to_dict()["payload"] == {"a": [1, {"b": 2}]}
    assert not job.is_final and _job(status="completed").is_final


def test_utcnow_is_aware_utc() -> None:
    now = models.utcnow()
    assert now.tzinfo is not None and now.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
