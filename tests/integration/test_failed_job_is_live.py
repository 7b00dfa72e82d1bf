"""A job failed for good is live everywhere: the rebuild, the memory tier and the Inspector agree."""

from __future__ import annotations

import toolkit
from toolkit import models


def test_a_failed_for_good_job_is_live_in_rebuild_memory_and_inspector(
        sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("w", jobs=[{"name": "a", "id": "a", "max_attempts": 1},
                                       {"name": "b", "id": "b"}])
    sm.register_worker("w1")
    job = sm.dequeue("w1")
    assert job is not None and job.id == "a"
    sm.fail_job("a", "boom", retry=True)  # no attempts left: failed for good
    assert sm.get_job("a").status == models.JobStatus.FAILED

    report = sm.rebuild()
    assert sm.memory.get("job", "a") is not None           # the memory tier keeps it
    assert report.jobs == 2                                 # the rebuild loaded it
    assert not models.is_final(sm.get_job("a"))
    timeline = sm.inspector.timeline("a")
    assert timeline["state_s"].notna().iloc[-1]             # the Inspector: still counting
    sm.enqueue("a")                                         # and it can still move
    assert sm.get_workflow(wf.id).status != models.WorkflowStatus.FAILED
