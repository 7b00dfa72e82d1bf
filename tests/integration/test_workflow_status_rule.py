"""Issue 13, item 13: a workflow is failed only when none of its jobs can still progress.

The roll-up (PostgreSQL), ``workflows()``, ``summary()``, the dashboard's board and
``explain`` must all tell the same story, against real servers.
"""

from __future__ import annotations

import toolkit
from toolkit.inspection import widgets


def views(sm: toolkit.StateManager, wf: str, job: str) -> dict[str, object]:
    ins = sm.inspector
    summary = ins.summary()["value"]
    board = widgets.take_snapshot(ins).summary["value"]
    explanation = ins.explain(job)
    return {"manager": sm.get_workflow(wf).status.value,
            "frame": str(ins.workflows().loc[wf, "status"]),
            "summary": [s for s in ("running", "failed") if summary[f"workflows_{s}"] == 1],
            "board": [s for s in ("running", "failed") if board[f"workflows_{s}"] == 1],
            "explain": explanation.facts.get("workflow_status"),
            "text": str(explanation)}


def test_failed_job_with_work_left_keeps_the_workflow_running(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1", capacity=10)
    sm.create_workflow("w", workflow_id="wf", jobs=[
        {"name": "x", "id": "x"}, {"name": "b", "id": "b", "max_attempts": 1},
        {"name": "c", "id": "c", "depends_on": ["b"]}])
    for _ in range(2):
        sm.start_job(sm.dequeue("w1").id)
    sm.fail_job("b", "boom", retry=False)
    frame = sm.inspector.workflows().loc["wf"]
    assert (frame["jobs_running"], frame["jobs_pending"], frame["jobs_failed"]) == (1, 1, 1)
    seen = views(sm, "wf", "c")
    assert seen["manager"] == seen["frame"] == seen["explain"] == "running", seen
    assert seen["summary"] == seen["board"] == ["running"], seen
    assert "can still progress" in str(seen["text"])

    sm.complete_job("x")  # now nothing can progress: c waits on b, which failed for good
    seen = views(sm, "wf", "c")
    assert seen["manager"] == seen["frame"] == seen["explain"] == "failed", seen
    assert seen["summary"] == seen["board"] == ["failed"], seen
    assert "no job of it can progress" in str(seen["text"])

    sm.enqueue("b")  # a manual re-queue resumes the workflow
    assert views(sm, "wf", "c")["frame"] == "running"
