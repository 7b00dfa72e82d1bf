"""A stale attempt cannot finish a job; fencing tokens never go backwards, even across a Redis loss."""

from __future__ import annotations

import time

import pytest

import toolkit
from tests.conftest import wipe_namespace


def test_reclaimed_worker_cannot_complete_or_fail_the_job(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    sm.register_worker("slow")
    first = sm.dequeue("slow")
    sm.start_job("a", worker_id="slow", attempt=first.attempts)
    time.sleep(sm.settings.heartbeat_ttl + 0.3)
    sm.register_worker("fresh")
    assert [j.id for j in sm.reap_dead_workers()] == ["a"]
    second = sm.dequeue("fresh")
    assert second.attempts == 2
    with pytest.raises(toolkit.StaleAttempt) as info:
        sm.complete_job("a", {"by": "slow"}, worker_id="slow", attempt=first.attempts)
    assert info.value.field == "worker_id" and isinstance(info.value, toolkit.InvalidTransition)
    with pytest.raises(toolkit.StaleAttempt):
        sm.fail_job("a", "late", worker_id="fresh", attempt=1)
    sm.start_job("a", worker_id="fresh", attempt=2)
    done = sm.complete_job("a", {"by": "fresh"}, worker_id="fresh", attempt=2)
    assert done.result == {"by": "fresh"}
    assert sm.check_consistency().ok


def test_fencing_tokens_grow_with_every_acquisition(sm: toolkit.StateManager) -> None:
    tokens = []
    for _ in range(5):
        with sm.lock("res") as lock:
            tokens.append(lock.fencing_token)
    assert tokens == sorted(set(tokens)) and len(tokens) == 5


def test_fencing_tokens_never_go_backwards_across_a_redis_loss(sm: toolkit.StateManager, clean) -> None:
    with sm.lock("res") as lock:
        before = lock.fencing_token
    wipe_namespace(clean.redis_url, clean.namespace)  # Redis loses the counter
    with sm.lock("res") as lock:
        after = lock.fencing_token
    assert after > before


def test_fencing_reserves_tokens_in_blocks_not_per_acquisition(sm: toolkit.StateManager, raw_pg,
                                                               clean) -> None:
    for _ in range(3):
        with sm.lock("res"):
            pass
    token = raw_pg.execute(f'SELECT token FROM "{clean.schema}".lock_fences WHERE name = %s',
                           ("res",)).fetchone()[0]
    assert token == sm.FENCE_BLOCK
