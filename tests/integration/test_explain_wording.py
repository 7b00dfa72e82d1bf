"""Issue 13, item 14: ``explain`` in plain words, and what a manual re-queue does to the attempt budget.

Real PostgreSQL and Redis. The rule: ``sm.enqueue(job)`` of a job that used up its attempts
grants one more (``max_attempts`` becomes ``attempts + 1``), so ``attempts <= max_attempts``
always holds; the re-queue is recorded as a ``retried`` event with ``manual: true``.
"""

from __future__ import annotations

import json
import re

import pytest

import toolkit
from toolkit.inspection import explain


def test_queue_position_is_said_in_words(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", jobs=[{"name": "r", "id": "r", "queue": "reports"}]
                       + [{"name": f"q{i}", "id": f"q{i}", "queue": "bulk"} for i in range(10)])
    alone = str(sm.inspector.explain("r"))
    assert "next in line in queue 'reports' (1 job queued)" in alone, alone
    assert "position 0" not in alone and "pops next" not in alone
    third = str(sm.inspector.explain("q2"))
    assert "3rd of 10 in queue 'bulk'" in third, third


def test_no_ratio_against_a_median_wait_of_about_zero(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1", queues=["reports"], capacity=10)
    sm.create_workflow("w", jobs=[{"name": f"r{i}", "id": f"r{i}", "queue": "reports"}
                                  for i in range(3)])
    for _ in range(3):
        sm.dequeue("w1")
    sm.create_workflow("w2", jobs=[{"name": "late", "id": "late", "queue": "reports"}])
    text = str(sm.inspector.explain("late"))
    assert "0.0s" not in text, text
    assert re.search(r"\(\d+(\.\d+)?x\)", text) is None, text
    assert "median wait" in text


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0, "under 0.1s"), (0.04, "under 0.1s"), (0.25, "0.2s"), (9.96, "10s"), (42.4, "42s"),
    (61.0, "1m 01s"), (3725.0, "1h 02m")])
def test_durations_are_rounded_for_people(seconds: float, shown: str) -> None:
    assert explain.human_seconds(seconds) == shown


@pytest.mark.parametrize(("n", "word"), [(1, "1st"), (2, "2nd"), (3, "3rd"), (4, "4th"),
                                         (11, "11th"), (12, "12th"), (13, "13th"), (21, "21st"),
                                         (102, "102nd"), (111, "111th")])
def test_ordinals(n: int, word: str) -> None:
    assert explain.ordinal(n) == word


def fail_once(sm: toolkit.StateManager, job_id: str) -> toolkit.Job:
    assert sm.dequeue("w1").id == job_id
    sm.start_job(job_id)
    return sm.fail_job(job_id, "boom", retry=False)


def test_manual_requeue_of_a_spent_job_grants_one_attempt(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1")
    sm.create_workflow("w", jobs=[{"name": "once", "id": "once", "max_attempts": 1}])
    failed = fail_once(sm, "once")
    assert (failed.status, failed.attempts, failed.max_attempts) == ("failed", 1, 1)
    again = sm.enqueue("once")
    assert (again.status, again.attempts, again.max_attempts) == ("queued", 1, 2)
    retried = sm.inspector.events(job_id="once")
    last = retried.iloc[-1]
    assert str(last["event"]) == "retried" and str(last["status"]) == "queued"
    assert json.loads(str(last["detail"])) == {"manual": True, "max_attempts": 2, "attempts_left": 1}
    assert sm.dequeue("w1").attempts == 2
    text = str(sm.inspector.explain("once"))
    assert "attempt 2 of 2" in text, text
    sm.start_job("once")
    done = sm.complete_job("once")
    assert done.attempts <= done.max_attempts


def test_manual_requeue_keeps_a_budget_that_is_not_spent(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1")
    sm.create_workflow("w", jobs=[{"name": "j", "id": "j", "max_attempts": 3}])
    fail_once(sm, "j")
    again = sm.enqueue("j")
    assert (again.attempts, again.max_attempts) == (1, 3)
    assert sm.get_job("j").max_attempts == 3
