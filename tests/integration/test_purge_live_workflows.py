"""Issue 13, item 2: retention never changes a live workflow (real PostgreSQL and Redis).

The rule: ``purge`` removes jobs of *finished* workflows only (``completed`` or
``cancelled``: nothing can change them again). A pending, running or failed
workflow (a manual re-queue of its failed job resumes it) keeps every job.
"""

from __future__ import annotations

import time

import pytest

import toolkit


def run(sm: toolkit.StateManager, job_id: str, *, fail: bool = False) -> None:
    job = sm.dequeue("w1")
    assert job is not None and job.id == job_id
    sm.start_job(job_id)
    if fail:
        sm.fail_job(job_id, "boom", retry=False)
    else:
        sm.complete_job(job_id)


def abc(sm: toolkit.StateManager, wf: str) -> None:
    sm.create_workflow(wf, workflow_id=wf, jobs=[
        {"name": "a", "id": f"{wf}-a"}, {"name": "b", "id": f"{wf}-b", "max_attempts": 1},
        {"name": "c", "id": f"{wf}-c", "depends_on": ["a", "b"]}])


@pytest.mark.parametrize("b_ends", ["failed", "running"])
def test_purge_never_removes_a_job_of_a_live_workflow(sm: toolkit.StateManager, b_ends: str) -> None:
    sm.register_worker("w1", capacity=10)
    abc(sm, "live")
    run(sm, "live-a")
    if b_ends == "failed":
        run(sm, "live-b", fail=True)
    else:
        sm.dequeue("w1")
        sm.start_job("live-b")
    before = sm.inspector.workflows().loc["live"]
    time.sleep(1.1)
    assert sm.purge(older_than=1, dry_run=True) == 0
    assert sm.purge(older_than=1) == 0
    assert sm.get_job("live-a") is not None
    after = sm.inspector.workflows().loc["live"]
    assert after["jobs_total"] == before["jobs_total"] == 3
    assert after["jobs_completed"] == 1
    text = str(sm.inspector.explain("live-c"))
    assert "deleted" not in text and "1 of 2 dependencies" in text, text


def test_purge_removes_finished_workflows_and_dry_run_matches(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1", capacity=10)
    abc(sm, "done")
    for j in ("done-a", "done-b", "done-c"):
        run(sm, j)
    abc(sm, "stopped")
    run(sm, "stopped-a")
    sm.cancel_workflow("stopped")
    abc(sm, "live")
    run(sm, "live-a")
    time.sleep(1.1)
    assert sm.get_workflow("done").status == "completed"
    planned = sm.purge(older_than=1, dry_run=True)
    assert planned == 6  # done: a, b, c; stopped: a (completed), b and c (cancelled)
    assert sm.purge(older_than=1, batch=4) == planned
    assert {j.id for j in sm.list_jobs()} == {"live-a", "live-b", "live-c"}
    assert sm.purge(older_than=1, dry_run=True) == 0
    assert sm.check_consistency().ok
