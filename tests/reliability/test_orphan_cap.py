"""The orphan cap: a job whose workers keep dying is failed, not queued forever.

The workers die for real as far as the coordinator can tell: they stop
heartbeating and their heartbeat key expires in Redis.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import toolkit
from toolkit import errors
from toolkit.inspection import prometheus, widgets


def _hold_and_die(sm: toolkit.StateManager, worker: str) -> toolkit.Job | None:
    """A worker takes the job, starts it and dies (no heartbeat until its TTL runs out)."""
    sm.register_worker(worker)
    job = sm.dequeue(worker)
    if job is None:
        return None
    sm.start_job(job.id, worker_id=worker, attempt=job.attempts)
    time.sleep(sm.settings.heartbeat_ttl + 0.3)
    sm.reap_dead_workers()
    return job


def test_a_job_whose_workers_keep_dying_is_failed_at_the_cap(make_sm: Any) -> None:
    sm = make_sm(heartbeat_ttl=1.0)
    assert sm.orphan_cap == 3
    wf = sm.create_workflow("poison", jobs=[{"name": "pill", "max_attempts": 20}])
    statuses = []
    for i in range(4):
        job = _hold_and_die(sm, f"w{i}")
        assert job is not None, f"death {i + 1}: nothing to dequeue"
        statuses.append(sm.get_job(job.id).status)  # type: ignore[union-attr]
    assert statuses == ["queued", "queued", "queued", "failed"]
    pill = sm.list_jobs(workflow_id=wf.id)[0]
    assert pill.error == ("orphan cap: its worker died 4 times while holding it "
                          "(orphan_cap=3); not queued again")
    assert pill.attempts == 4 < pill.max_attempts  # the cap, not the attempts rule, stopped it
    assert sm.get_metric("jobs_orphan_capped") == 1
    assert sm.get_workflow(wf.id).status == "failed"  # type: ignore[union-attr]
    sm.register_worker("w9")
    assert sm.dequeue("w9") is None
    # Seen where an operator looks.
    ins = sm.inspector
    assert "orphan cap" in ins.explain(pill.id).verdict
    assert "toolkit_jobs_orphan_capped_total 1.0" in prometheus.render(ins)
    assert ins.jobs(workflow_id=wf.id).loc[pill.id, "error"].startswith("orphan cap")
    assert ins.summary().loc["jobs_orphan_capped", "value"] == 1
    board = widgets.summary_html(ins.summary())
    assert "data-item='jobs_orphan_capped'" in board
    assert "jobs_orphan_capped" in widgets.board_alerts({"jobs_orphan_capped": 1})
    report = sm.check_consistency()
    assert report.ok, str(report)


def test_a_smaller_cap_fires_sooner_and_a_deregistered_worker_does_not_count(make_sm: Any) -> None:
    sm = make_sm(heartbeat_ttl=1.0)
    sm.orphan_cap = 1
    sm.create_workflow("wf", jobs=[{"name": "a", "max_attempts": 20}])
    sm.register_worker("polite")
    job = sm.dequeue("polite")
    assert job is not None
    sm.deregister_worker("polite")  # a clean goodbye: re-queued, not an orphan
    assert sm.get_job(job.id).status == "queued"  # type: ignore[union-attr]
    assert _hold_and_die(sm, "w1") is not None
    assert sm.get_job(job.id).status == "queued"  # type: ignore[union-attr]
    assert _hold_and_die(sm, "w2") is not None
    assert sm.get_job(job.id).status == "failed"  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "3", None])
def test_a_bad_cap_is_refused(sm: toolkit.StateManager, bad: object) -> None:
    with pytest.raises(errors.ValidationError):
        sm.orphan_cap = bad  # type: ignore[assignment]
    assert sm.orphan_cap == 3
