"""Scheduled jobs (``run_at=`` / ``delay=``) and retries with backoff, against real servers.

A scheduled job is ``queued`` in PostgreSQL with ``run_at`` in the future, and
waits in Redis in its queue's due-time set until promotion moves it into the
queue: never handed out before its time, handed out within about a second after.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

import toolkit
from tests.conftest import wipe_namespace

SLACK = 1.0
"""Seconds after its due time by which a scheduled job must be handed out."""


def _take_when_due(sm: toolkit.StateManager, worker: str, due: datetime,
                   wait: float = 5.0) -> tuple[toolkit.Job, float]:
    """Dequeue until a job comes; return it and when it came (unix seconds)."""
    deadline = time.time() + wait
    while time.time() < deadline:
        got = sm.dequeue(worker, timeout=0.05)
        if got is not None:
            return got, time.time()
    raise AssertionError(f"nothing handed out by {wait}s (due {due})")


def test_a_delayed_job_waits_for_its_time_then_comes_within_a_second(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("later", jobs=[{"name": "a", "delay": 1.5}])
    job = sm.list_jobs(workflow_id=wf.id)[0]
    assert job.status == "queued" and job.run_at is not None
    assert abs((job.run_at - job.created_at).total_seconds() - 1.5) < 0.01
    sm.register_worker("w")
    assert sm.dequeue("w") is None
    got, at = _take_when_due(sm, "w", job.run_at)
    assert got.id == job.id
    assert job.run_at.timestamp() <= at <= job.run_at.timestamp() + SLACK
    assert sm.dequeue("w") is None
    assert sm.check_consistency().ok


def test_create_job_at_a_time_and_in_the_past(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("at")
    past = sm.create_job(wf.id, "past", run_at=datetime.now(UTC) - timedelta(seconds=30))
    soon = sm.create_job(wf.id, "soon", run_at=datetime.now(UTC) + timedelta(seconds=1))
    sm.register_worker("w")
    got = sm.dequeue("w")
    assert got is not None and got.id == past.id
    assert sm.dequeue("w") is None
    assert soon.run_at is not None
    later, _ = _take_when_due(sm, "w", soon.run_at)
    assert later.id == soon.id


def test_a_dependent_released_before_its_time_waits_for_it(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("dep", jobs=[{"name": "first"},
                                         {"name": "then", "depends_on": ["first"], "delay": 1.5}])
    then = next(j for j in sm.list_jobs(workflow_id=wf.id) if j.name == "then")
    assert then.status == "pending" and then.run_at is not None
    sm.register_worker("w")
    first = sm.dequeue("w")
    assert first is not None and first.name == "first"
    sm.start_job(first.id)
    sm.complete_job(first.id)
    assert sm.get_job(then.id).status == "queued"  # type: ignore[union-attr]
    assert sm.dequeue("w") is None
    got, at = _take_when_due(sm, "w", then.run_at)
    assert got.id == then.id and at >= then.run_at.timestamp()
    assert sm.check_consistency().ok


def test_enqueue_with_a_delay_schedules_a_failed_job(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("again", jobs=[{"name": "a"}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    assert a is not None
    sm.fail_job(a.id, "boom", retry=False)
    again = sm.enqueue(a.id, delay=1.0)
    assert again.status == "queued" and again.run_at is not None
    assert sm.dequeue("w") is None
    got, _ = _take_when_due(sm, "w", again.run_at)
    assert got.id == a.id
    sm.fail_job(a.id, "boom", retry=False)
    now = sm.enqueue(a.id)
    assert now.run_at is None
    assert sm.dequeue("w") is not None
    del wf


def _fail_and_check(sm: toolkit.StateManager, job_id: str, low: float, high: float) -> toolkit.Job:
    before = time.time()
    failed = sm.fail_job(job_id, "flaky")
    after = time.time()
    assert failed.status == "queued" and failed.run_at is not None
    due = failed.run_at.timestamp()
    assert before + low - 0.01 <= due <= after + high + 0.01, (due - before, low, high)
    return failed


def test_a_retry_backs_off_exponentially_within_the_jitter(make_sm: Any) -> None:
    sm = make_sm(retry_policy=toolkit.RetryPolicy(base=0.5, factor=2.0, cap=10.0, jitter=0.1))
    wf = sm.create_workflow("flaky", jobs=[{"name": "a", "max_attempts": 5}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    failed = _fail_and_check(sm, a.id, 0.45, 0.55)  # attempt 1: base
    assert sm.dequeue("w") is None
    a2, _ = _take_when_due(sm, "w", failed.run_at)
    assert (a2.id, a2.attempts) == (a.id, 2)
    _fail_and_check(sm, a.id, 0.9, 1.1)  # attempt 2: base * factor
    del wf


def test_a_job_policy_wins_and_retry_in_zero_retries_at_once(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("own", jobs=[{"name": "a", "retry": {"base": 3.0, "jitter": 0.0}}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    _fail_and_check(sm, a.id, 3.0, 3.0)
    a2 = sm.assign_job(a.id, "w")
    assert a2.attempt == 2
    retried = sm.fail_job(a.id, "flaky", retry_in=0)
    assert retried.status == "queued" and retried.run_at is not None
    got = sm.dequeue("w")
    assert got is not None and got.id == a.id
    del wf


def test_the_default_policy_backs_off(sm: toolkit.StateManager) -> None:
    sm.create_workflow("default", jobs=[{"name": "a"}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    failed = sm.fail_job(a.id, "flaky")
    assert failed.run_at is not None and failed.run_at > failed.updated_at
    assert sm.dequeue("w") is None


def test_a_rebuild_restores_the_schedule_exactly(sm: toolkit.StateManager, make_sm: Any,
                                                 clean: Any) -> None:
    wf = sm.create_workflow("sched", jobs=[{"name": f"j{i}", "delay": 1.5} for i in range(5)]
                            + [{"name": "now"}])
    sm.register_worker("w")
    wipe_namespace(clean.redis_url, clean.namespace)
    other = make_sm()  # a new coordinator: rebuilds from PostgreSQL
    other.register_worker("w2")
    now = other.dequeue("w2")
    assert now is not None and now.name == "now"
    assert other.dequeue("w2") is None  # not early
    report = other.check_consistency()
    assert report.ok, str(report)
    due = max(j.run_at for j in other.list_jobs(workflow_id=wf.id) if j.run_at)
    got = set()
    deadline = due.timestamp() + SLACK
    while time.time() < deadline + 0.5:
        j = other.dequeue("w2", timeout=0.05)
        if j is not None:
            assert time.time() >= j.run_at.timestamp()  # type: ignore[union-attr]
            assert j.id not in got  # not twice
            got.add(j.id)
    assert len(got) == 5  # not lost
    assert sm.dequeue("w") is None


def test_check_consistency_sees_a_lost_schedule_and_repair_restores_it(
        sm: toolkit.StateManager, raw_redis: Any, clean: Any) -> None:
    sm.create_workflow("sched", jobs=[{"name": "a", "delay": 30}])
    assert sm.check_consistency().ok
    for key in raw_redis.scan_iter(match="{" + clean.namespace + "}:scheduled*"):
        raw_redis.delete(key)
    assert not sm.check_consistency().ok
    sm.repair()
    assert sm.check_consistency().ok
    sm.register_worker("w")
    assert sm.dequeue("w") is None


def test_the_inspector_shows_when_a_job_will_run(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("sched", jobs=[{"name": "a", "delay": 60}, {"name": "b"}])
    df = sm.inspector.jobs()
    assert str(df["run_at"].dtype).startswith("datetime64")
    by_name = df.set_index("name")["run_at"]
    assert by_name.isna()["b"] and not by_name.isna()["a"]
    a = next(j for j in sm.list_jobs(workflow_id=wf.id) if j.name == "a")
    text = str(sm.inspector.explain(a.id))
    assert "scheduled" in text and "run" in text


@pytest.mark.parametrize("bad", [
    {"run_at": datetime(2030, 1, 1)},  # naive
    {"run_at": datetime(1990, 1, 1, tzinfo=UTC)},  # far past
    {"run_at": datetime.now(UTC) + timedelta(days=4000)},  # beyond the maximum
    {"delay": float("nan")}, {"delay": -1.0}, {"delay": float("inf")}, {"delay": True},
    {"delay": "5"}, {"delay": 1e12},
    {"delay": 1.0, "run_at": datetime.now(UTC)},  # both
    {"run_at": "2030-01-01T00:00:00Z"},
    {"retry": {"base": float("nan")}}, {"retry": {"base": -1}}, {"retry": {"jitter": 2}},
    {"retry": {"what": 1}}, {"retry": "fast"},
])
def test_hostile_schedules_are_refused_and_nothing_is_written(sm: toolkit.StateManager,
                                                              bad: dict[str, Any]) -> None:
    wf = sm.create_workflow("host")
    with pytest.raises(toolkit.ValidationError):
        sm.create_workflow("hostile", jobs=[{"name": "a", **bad}])
    if "retry" not in bad:
        with pytest.raises(toolkit.ValidationError):
            sm.create_job(wf.id, "a", **bad)
    assert len(sm.list_workflows()) == 1
    assert sm.list_jobs() == []


@pytest.mark.parametrize("backoff", [
    lambda attempt: float("nan"), lambda attempt: -1.0, lambda attempt: 1e12,
    lambda attempt: "soon", lambda attempt: None, lambda attempt: 1 / 0,
])
def test_a_backoff_that_returns_nonsense_is_refused_and_nothing_is_written(
        make_sm: Any, backoff: Any) -> None:
    sm = make_sm(retry_policy=backoff)
    sm.create_workflow("bad", jobs=[{"name": "a"}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    sm.start_job(a.id)
    with pytest.raises(toolkit.ValidationError):
        sm.fail_job(a.id, "flaky")
    after = sm.get_job(a.id)
    assert (after.status, after.version, after.error) == ("running", a.version + 1, None)
    assert sm.inspector.explain(a.id) is not None
    sm.retry_policy = lambda attempt: 0.25 * attempt
    again = sm.fail_job(a.id, "flaky")
    assert again.status == "queued" and again.run_at is not None


def test_enqueue_refuses_a_hostile_delay_and_writes_nothing(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("e", jobs=[{"name": "a"}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    sm.fail_job(a.id, "x", retry=False)
    for bad in ({"delay": float("nan")}, {"delay": -3}, {"run_at": datetime(2030, 1, 1)}):
        with pytest.raises(toolkit.ValidationError):
            sm.enqueue(a.id, **bad)
    assert sm.get_job(a.id).status == "failed"  # type: ignore[union-attr]
    with pytest.raises(toolkit.ValidationError):
        sm.fail_job(a.id, "x", retry_in=float("nan"))
    del wf


def test_an_edited_scheduled_job_keeps_its_time_in_its_new_queue(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("edit", jobs=[{"name": "a", "delay": 1.0}])
    a = sm.list_jobs(workflow_id=wf.id)[0]
    sm.edit_job(a.id, queue="urgent", priority=5)
    report = sm.check_consistency()
    assert report.ok, str(report)
    sm.register_worker("u", queues=["urgent"])
    assert sm.dequeue("u") is None
    got, at = _take_when_due(sm, "u", a.run_at)  # type: ignore[arg-type]
    assert (got.id, got.queue, got.priority) == (a.id, "urgent", 5)
    assert at >= a.run_at.timestamp()  # type: ignore[union-attr]


def test_a_repeat_under_an_idempotency_key_with_a_delay_replays_the_first_job(
        sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("idem")
    first = sm.create_job(wf.id, "later", delay=30, idempotency_key="k-later")
    time.sleep(0.05)  # the same delay asked later: the same request, the first due time
    again = sm.create_job(wf.id, "later", delay=30, idempotency_key="k-later")
    assert (again.id, again.run_at) == (first.id, first.run_at)
    with pytest.raises(toolkit.IdempotencyConflict):
        sm.create_job(wf.id, "later", delay=31, idempotency_key="k-later")


def test_the_retried_event_says_when_the_retry_runs(sm: toolkit.StateManager) -> None:
    sm.create_workflow("ev", jobs=[{"name": "a", "retry": {"base": 2.0, "jitter": 0.0}}])
    sm.register_worker("w")
    a = sm.dequeue("w")
    failed = sm.fail_job(a.id, "flaky")
    events = sm.inspector.events(job_id=a.id)
    retried = events[events["event"] == "retried"]
    detail = json.loads(retried["detail"].iloc[-1])
    assert detail["backoff_s"] == 2.0
    assert detail["run_at"] == failed.run_at.isoformat()  # type: ignore[union-attr]


def test_explain_of_a_due_job_not_yet_promoted_says_the_next_dequeue_takes_it(
        sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("due", jobs=[{"name": "a", "delay": 0.2}])
    a = sm.list_jobs(workflow_id=wf.id)[0]
    time.sleep(0.4)  # due, but no dequeue has promoted it yet
    text = str(sm.inspector.explain(a.id))
    assert "is due" in text and "repair" not in text, text


def test_fail_jobs_backs_off_like_fail_job(make_sm: Any) -> None:
    sm = make_sm(retry_policy=toolkit.RetryPolicy(base=2.0, jitter=0.0))
    sm.create_workflow("many", jobs=[{"name": "a"}, {"name": "b", "retry": {"base": 4.0, "jitter": 0}}])
    sm.register_worker("w")
    got = sm.dequeue_many("w", 2)
    before = time.time()
    out = sm.fail_jobs([(j.id, "flaky") for j in got])
    waits = {j.name: j.run_at.timestamp() - before for j in out}  # type: ignore[union-attr]
    assert 1.9 <= waits["a"] <= 2.5 and 3.9 <= waits["b"] <= 4.5, waits
    assert sm.dequeue("w") is None
    for j in out:
        assert sm.get_job(j.id).run_at == j.run_at  # type: ignore[union-attr]
    assert sm.check_consistency().ok


def test_a_bulk_requeue_runs_at_once_like_enqueue(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("bulk", jobs=[{"name": "a", "delay": 60}])
    a = sm.list_jobs(workflow_id=wf.id)[0]
    sm.register_worker("w")
    sm.assign_job(a.id, "w")  # an operator's direct assignment, before the job's time
    sm.fail_job(a.id, "boom", retry=False)
    sm.apply_action(sm.plan_action("requeue", status="failed", reason="test"), progress=False)
    assert sm.get_job(a.id).run_at is None  # type: ignore[union-attr]
    got = sm.dequeue("w")
    assert got is not None and got.id == a.id
    assert sm.check_consistency().ok
