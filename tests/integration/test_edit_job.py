"""``sm.edit_job``: change a waiting job's priority or queue; the Redis queue moves with the row."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
import redis

import toolkit
from toolkit import errors
from toolkit.tiers.redis import keys


def _three(sm: toolkit.StateManager) -> list[toolkit.Job]:
    wf = sm.create_workflow("edit", jobs=[{"name": n} for n in ("a", "b", "c")])
    return sorted(sm.list_jobs(workflow_id=wf.id), key=lambda j: j.name)


def test_a_new_priority_changes_the_order_jobs_are_handed_out(sm: toolkit.StateManager) -> None:
    a, b, c = _three(sm)
    edited = sm.edit_job(c.id, priority=9, reason="customer escalation", actor="sre-1")
    assert (edited.priority, edited.status, edited.version) == (9, "queued", c.version + 1)
    sm.register_worker("w1")
    order = [sm.dequeue("w1").id for _ in range(3)]  # type: ignore[union-attr]
    assert order == [c.id, a.id, b.id]


def test_a_new_queue_moves_the_job_between_redis_queues(
        sm: toolkit.StateManager, raw_redis: redis.Redis, clean: Any) -> None:
    a, _, _ = _three(sm)
    sm.edit_job(a.id, queue="urgent")
    ns = clean.namespace
    assert raw_redis.zscore(keys.queue(ns, "default"), a.id) is None
    assert raw_redis.zscore(keys.queue(ns, "urgent"), a.id) is not None
    sm.register_worker("old", queues=["default"])
    sm.register_worker("new", queues=["urgent"])
    assert sm.dequeue("new").id == a.id  # type: ignore[union-attr]
    assert sm.dequeue("new") is None
    assert sm.dequeue("old").id != a.id  # type: ignore[union-attr]
    report = sm.check_consistency()
    assert report.ok, str(report)


def test_a_pending_job_keeps_its_edit_when_its_dependency_completes(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("dep", jobs=[{"name": "first"}, {"name": "then", "depends_on": ["first"]}])
    jobs = {j.name: j for j in sm.list_jobs(workflow_id=wf.id)}
    sm.edit_job(jobs["then"].id, queue="reports", priority=3)
    sm.register_worker("w1")
    first = sm.dequeue("w1")
    sm.start_job(first.id)  # type: ignore[union-attr]
    sm.complete_job(first.id)  # type: ignore[union-attr]
    sm.register_worker("r", queues=["reports"])
    got = sm.dequeue("r")
    assert got is not None and (got.id, got.queue, got.priority) == (jobs["then"].id, "reports", 3)


def test_the_edit_is_an_event_naming_actor_reason_and_both_values(sm: toolkit.StateManager) -> None:
    a, _, _ = _three(sm)
    sm.edit_job(a.id, priority=5, queue="urgent", reason="reroute", actor="sre-1")
    events = sm.inspector.events(job_id=a.id)
    edited = events[events["event"] == "edited"]
    assert len(edited) == 1
    detail = json.loads(edited.iloc[0]["detail"])
    assert detail == {"actor": "sre-1", "reason": "reroute",
                      "priority": [0, 5], "queue": ["default", "urgent"]}


def test_a_job_that_started_cannot_be_edited_and_nothing_changes(sm: toolkit.StateManager) -> None:
    a, _, _ = _three(sm)
    sm.register_worker("w1")
    job = sm.dequeue("w1")
    assert job is not None and job.id == a.id
    with pytest.raises(errors.InvalidTransition) as info:
        sm.edit_job(a.id, priority=9)
    assert info.value.current == "assigned"
    after = sm.get_job(a.id)
    assert after is not None and (after.priority, after.version) == (0, job.version)
    events = sm.inspector.events(job_id=a.id)
    assert "edited" not in set(events["event"].astype(str))


@pytest.mark.parametrize("kwargs, field", [
    ({}, "edit"), ({"priority": 10**9}, "priority"), ({"priority": "9"}, "priority"),
    ({"queue": ""}, "queue"), ({"queue": "x\x00"}, "queue"), ({"priority": 1, "reason": 5}, "reason"),
])
def test_bad_edits_are_refused_before_anything_is_written(
        sm: toolkit.StateManager, kwargs: dict[str, Any], field: str) -> None:
    a, _, _ = _three(sm)
    with pytest.raises(errors.ValidationError) as info:
        sm.edit_job(a.id, **kwargs)
    assert info.value.field == field
    assert sm.get_job(a.id).version == a.version  # type: ignore[union-attr]


def test_an_unknown_job_is_not_found(sm: toolkit.StateManager) -> None:
    with pytest.raises(errors.NotFound):
        sm.edit_job("no-such-job", priority=1)


def test_a_queued_job_edited_to_run_later_leaves_its_queue_for_its_due_time_set(
        sm: toolkit.StateManager, raw_redis: redis.Redis, clean: Any) -> None:
    a, _, _ = _three(sm)
    edited = sm.edit_job(a.id, delay=3600, reason="wait for the fix", actor="sre-1")
    assert edited.status == "queued" and edited.run_at is not None
    ns = clean.namespace
    assert raw_redis.zscore(keys.queue(ns, "default"), a.id) is None
    assert raw_redis.zscore(keys.scheduled(ns, "default"), a.id) is not None
    sm.register_worker("w1")
    assert {sm.dequeue("w1").id for _ in range(2)} == {j.id for j in _three_ids(sm, a)}  # type: ignore[union-attr]
    assert sm.dequeue("w1") is None  # a is not due
    events = sm.inspector.events(job_id=a.id)
    detail = json.loads(events[events["event"] == "edited"].iloc[0]["detail"])
    assert detail["run_at"][0] is None and detail["run_at"][1] == edited.run_at.isoformat()
    report = sm.check_consistency()
    assert report.ok, str(report)


def _three_ids(sm: toolkit.StateManager, a: toolkit.Job) -> list[toolkit.Job]:
    return [j for j in sm.list_jobs(workflow_id=a.workflow_id) if j.id != a.id]


def test_a_scheduled_job_edited_to_run_now_is_handed_out_from_its_new_queue(
        sm: toolkit.StateManager, raw_redis: redis.Redis, clean: Any) -> None:
    wf = sm.create_workflow("later", jobs=[{"name": "a", "delay": 3600}])
    (a,) = sm.list_jobs(workflow_id=wf.id)
    assert raw_redis.zscore(keys.scheduled(clean.namespace, "default"), a.id) is not None
    edited = sm.edit_job(a.id, delay=0, queue="urgent")
    assert edited.queue == "urgent"
    assert raw_redis.zscore(keys.scheduled(clean.namespace, "default"), a.id) is None
    assert raw_redis.hget(keys.scheduled_meta(clean.namespace), a.id) is None
    assert raw_redis.zscore(keys.queue(clean.namespace, "urgent"), a.id) is not None
    sm.register_worker("w1", queues=["urgent"])
    got = sm.dequeue("w1")
    assert got is not None and got.id == a.id
    report = sm.check_consistency()
    assert report.ok, str(report)


def test_a_scheduled_job_moved_to_another_queue_stays_scheduled_there(
        sm: toolkit.StateManager, raw_redis: redis.Redis, clean: Any) -> None:
    wf = sm.create_workflow("later", jobs=[{"name": "a", "delay": 3600}])
    (a,) = sm.list_jobs(workflow_id=wf.id)
    sm.edit_job(a.id, queue="urgent")
    ns = clean.namespace
    assert raw_redis.zscore(keys.scheduled(ns, "default"), a.id) is None
    assert raw_redis.zscore(keys.scheduled(ns, "urgent"), a.id) is not None
    assert raw_redis.zscore(keys.queue(ns, "urgent"), a.id) is None
    report = sm.check_consistency()
    assert report.ok, str(report)


def test_a_pending_job_edited_to_run_later_waits_after_its_dependency(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("dep", jobs=[{"name": "first"}, {"name": "then", "depends_on": ["first"]}])
    jobs = {j.name: j for j in sm.list_jobs(workflow_id=wf.id)}
    sm.edit_job(jobs["then"].id, delay=3600)
    sm.register_worker("w1")
    first = sm.dequeue("w1")
    sm.start_job(first.id)  # type: ignore[union-attr]
    sm.complete_job(first.id)  # type: ignore[union-attr]
    assert sm.get_job(jobs["then"].id).status == "queued"  # type: ignore[union-attr]
    assert sm.dequeue("w1") is None


@pytest.mark.parametrize("kwargs, field", [
    ({"delay": 5, "run_at": datetime.now(UTC)}, "delay"), ({"delay": -1}, "delay"),
    ({"run_at": datetime(2026, 1, 1)}, "run_at"), ({"run_at": "tomorrow"}, "run_at"),
])
def test_bad_due_times_are_refused_before_anything_is_written(
        sm: toolkit.StateManager, kwargs: dict[str, Any], field: str) -> None:
    a, _, _ = _three(sm)
    with pytest.raises(errors.ValidationError) as info:
        sm.edit_job(a.id, **kwargs)
    assert info.value.field == field
    assert sm.get_job(a.id).version == a.version  # type: ignore[union-attr]
