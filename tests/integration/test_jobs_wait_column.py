"""Issue 13, item 9: ``jobs().wait_s`` is the queue wait of the job's latest attempt.

One name, one meaning: queued-to-assigned, as ``wait_times()`` measures it, never the
time a job spent pending on a dependency or in earlier attempts. Real servers.
"""

from __future__ import annotations

import time

import pandas as pd

import toolkit
from toolkit.inspection import analytics


def test_wait_s_excludes_pending_time_and_earlier_attempts(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1")
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}, {"name": "b", "id": "b",
                                                              "depends_on": ["a"]}])
    sm.start_job(sm.dequeue("w1").id)
    time.sleep(1.0)  # b is pending all this time: not a wait in a queue
    sm.complete_job("a")
    assert sm.dequeue("w1").id == "b"
    sm.start_job("b")
    sm.fail_job("b", "flaky", retry_in=0)  # re-queued: a second stay in the queue
    time.sleep(0.4)
    assert sm.dequeue("w1").id == "b"
    jobs = sm.inspector.jobs()
    expected = analytics.waits(sm.inspector.events(job_id="b"))["wait_s"].iloc[-1]
    assert 0.4 <= jobs.loc["b", "wait_s"] < 1.0, jobs.loc["b", "wait_s"]
    assert abs(jobs.loc["b", "wait_s"] - expected) < 1e-6
    assert str(jobs["wait_s"].dtype) == "Float64"


def test_wait_s_is_missing_for_a_job_never_assigned(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", jobs=[{"name": "q", "id": "q"}])
    assert pd.isna(sm.inspector.jobs().loc["q", "wait_s"])
