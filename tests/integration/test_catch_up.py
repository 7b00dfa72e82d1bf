"""The catch-up of a running coordinator (``heal_redis``) beside live writers.

A write's Redis update is made to fail once (as in a Redis blip: PostgreSQL committed, Redis
never heard), then the catch-up runs while another write lands at the moment that used to
go wrong, cued by a hook on the catch-up's own reads. Real PostgreSQL and Redis. The
background catch-up is switched off so that the test runs it at the chosen moment.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

import toolkit
from toolkit.recovery import queues, repairing
from toolkit.recovery.fast_start import FastStartReport, heal_redis
from toolkit.tiers.postgres import store
from toolkit.tiers.redis import cache, keys


def _lose_next_redis_update(sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    real = sm._pipe._push_redis
    left = [1]

    def push(*args: Any) -> None:
        if left[0]:
            left[0] -= 1
            raise toolkit.StorageUnavailable("Redis went away during the update")
        real(*args)

    monkeypatch.setattr(sm._pipe, "_push_redis", push)


def _once(real: Callable[..., Any], before: Callable[[], object]) -> Callable[..., Any]:
    """``real``, which runs ``before`` first the first time it is called."""
    fired: list[bool] = []

    def call(*args: Any, **kwargs: Any) -> Any:
        if not fired:
            fired.append(True)
            before()
        return real(*args, **kwargs)

    return call


def _catch_up(sm: toolkit.StateManager) -> FastStartReport:
    return heal_redis(sm._pipe.tiers, time.time() - 2.0)


@pytest.fixture
def quiet_sm(sm: toolkit.StateManager) -> toolkit.StateManager:
    sm._pipe.watermark.heal = None  # the test runs the catch-up itself
    return sm


def test_a_job_moved_to_another_queue_leaves_the_old_one(
        quiet_sm: toolkit.StateManager, raw_redis: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sm = quiet_sm
    wf = sm.create_workflow("m", jobs=[{"name": "a", "queue": "A"}])
    job = sm.list_jobs(workflow_id=wf.id)[0]
    _lose_next_redis_update(sm, monkeypatch)
    sm.edit_job(job.id, queue="B")
    assert raw_redis.zscore(keys.queue(sm.ns, "A"), job.id) is not None  # Redis never heard
    _catch_up(sm)
    assert raw_redis.zscore(keys.queue(sm.ns, "A"), job.id) is None
    assert raw_redis.zscore(keys.queue(sm.ns, "B"), job.id) is not None
    assert sm.dequeue(sm.register_worker("wa", queues=["A"]).id) is None
    assert sm.check_consistency().ok


class _Reads:
    """``store`` as the queue settling sees it, running ``steps`` (in turn) after its reads."""

    def __init__(self, *steps: Callable[[], object]) -> None:
        self.steps = list(steps)

    def __getattr__(self, name: str) -> Any:
        return getattr(store, name)

    def get_many(self, *args: Any, **kwargs: Any) -> Any:
        rows = store.get_many(*args, **kwargs)
        if self.steps:
            self.steps.pop(0)()
        return rows


def _queued_once(raw_redis: redis.Redis, sm: toolkit.StateManager, job_id: str) -> bool:
    return [raw_redis.zscore(keys.queue(sm.ns, n), job_id) is not None
            for n in raw_redis.smembers(keys.queues(sm.ns))].count(True) == 1


def _edited_unheard(sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch
                    ) -> tuple[str, toolkit.Job]:
    """A worker id, and a queued job whose priority change Redis never heard."""
    w = sm.register_worker("w").id
    wf = sm.create_workflow("s", jobs=[{"name": "a"}])
    job = sm.list_jobs(workflow_id=wf.id)[0]
    _lose_next_redis_update(sm, monkeypatch)
    sm.edit_job(job.id, priority=1)  # still queued; Redis keeps the old entry
    return w, job


def test_a_job_claimed_while_the_queues_are_settled_is_not_put_back(
        quiet_sm: toolkit.StateManager, raw_redis: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sm = quiet_sm
    w, job = _edited_unheard(sm, monkeypatch)
    got: list[toolkit.Job | None] = []
    # The settling reads the job as queued; a worker claims it right after that read.
    monkeypatch.setattr(queues, "store", _Reads(lambda: got.append(sm.dequeue(w))))
    _catch_up(sm)
    assert got and got[0] is not None and got[0].id == job.id
    assert raw_redis.zscore(keys.queue(sm.ns, "default"), job.id) is None  # not handed out again
    assert sm.check_consistency().ok


def test_a_job_given_back_while_the_queues_are_settled_stays_in_its_queue(
        quiet_sm: toolkit.StateManager, raw_redis: redis.Redis,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The job is claimed after the first read, then given back (same place, same score)
    # after the settling read it again: it must end in its queue, once.
    sm = quiet_sm
    w, job = _edited_unheard(sm, monkeypatch)
    monkeypatch.setattr(queues, "store", _Reads(
        lambda: sm.dequeue(w), lambda: sm.return_unstarted(w, [job.id])))
    _catch_up(sm)
    assert sm.get_job(job.id).status is toolkit.JobStatus.QUEUED
    assert _queued_once(raw_redis, sm, job.id)
    assert sm.check_consistency().ok
    assert sm.dequeue(sm.register_worker("w2").id).id == job.id  # type: ignore[union-attr]


def test_a_write_that_lands_during_the_catch_up_keeps_its_cache_entry(
        quiet_sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    sm = quiet_sm
    wf = sm.create_workflow("f", jobs=[{"name": "a"}])
    job = sm.list_jobs(workflow_id=wf.id)[0]
    _lose_next_redis_update(sm, monkeypatch)
    sm.edit_job(job.id, priority=1)
    # Between the catch-up's read of PostgreSQL and its read of Redis, another write lands.
    monkeypatch.setattr(repairing.cache, "get_raw_many", _once(
        repairing.cache.get_raw_many, lambda: sm.edit_job(job.id, priority=2)))
    _catch_up(sm)
    cached = cache.get(sm._pipe.redis, sm.ns, "job", job.id)
    assert cached is not None and (cached.priority, cached.version) == (2, 3)
    assert sm.check_consistency().ok


def test_a_priority_change_redis_missed_puts_the_job_in_its_place(
        quiet_sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    sm = quiet_sm
    wf = sm.create_workflow("p", jobs=[{"name": "first"}, {"name": "urgent"}])
    urgent = next(j for j in sm.list_jobs(workflow_id=wf.id) if j.name == "urgent")
    _lose_next_redis_update(sm, monkeypatch)
    sm.edit_job(urgent.id, priority=5)
    _catch_up(sm)
    assert sm.dequeue(sm.register_worker("w").id).name == "urgent"  # type: ignore[union-attr]
    assert sm.check_consistency().ok
