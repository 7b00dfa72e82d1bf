"""A coordinator catches Redis up by itself after Redis comes back from an outage.

The fault is real: the coordinator's Redis connections go through a TCP proxy, which is
cut (every connection closed, new ones refused) while writes commit to PostgreSQL, then
restored. The shared Redis server itself keeps its data, so what those writes did not
send stays stale there until something fixes it. Checked straight on the server (not
through the proxy): the cache entry, the queue, and the coordinator's watermark.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import redis

import toolkit
from tests.conftest import Servers, wipe_namespace
from tests.reliability.conftest import assert_invariants, behind_pg_proxy
from toolkit.faults import TcpProxy
from toolkit.tiers.redis import keys

HEAL_BOUND_S = 10.0
"""From Redis answering again to Redis agreeing: the watermark's next tick (1 s) and the
catch-up itself, with margin for a loaded machine."""


@pytest.fixture
def behind_redis_proxy(clean: Servers) -> Iterator[tuple[toolkit.StateManager, TcpProxy]]:
    with behind_pg_proxy(clean, redis_instead=True) as pair:
        yield pair


def test_writes_committed_while_redis_was_away_reach_it_when_it_is_back(
        behind_redis_proxy: tuple[toolkit.StateManager, TcpProxy], raw_redis: redis.Redis,
        clean: Servers) -> None:
    sm, proxy = behind_redis_proxy
    wf = sm.create_workflow("heal", jobs=[{"name": "first"}])
    before = sm.get_workflow(wf.id).version

    proxy.cut()
    # Both commit to PostgreSQL; neither can tell Redis (and neither raises for it).
    moved = sm.update_workflow_status(wf.id, "running")
    late = sm.create_job(wf.id, "late")
    failed_at = time.time()
    assert moved.version > before
    stale = raw_redis.get(keys.entity(sm.ns, "workflow", wf.id))
    queue_key = keys.queue(sm.ns, late.queue)
    assert raw_redis.zscore(queue_key, late.id) is None  # not in its queue: never dequeued

    proxy.restore()
    back = time.monotonic()
    while time.monotonic() - back < HEAL_BOUND_S and (
            raw_redis.zscore(queue_key, late.id) is None
            or raw_redis.get(keys.entity(sm.ns, "workflow", wf.id)) == stale
            or sm._pipe.watermark.safe() <= failed_at):
        time.sleep(0.1)
    assert raw_redis.zscore(queue_key, late.id) is not None, "the late job never reached its queue"
    assert raw_redis.get(keys.entity(sm.ns, "workflow", wf.id)) != stale, "the cache stayed stale"
    assert sm.get_workflow(wf.id).status is toolkit.WorkflowStatus.RUNNING
    assert_invariants(sm, raw_redis, clean.libpq_url)
    # Healed without an operator: the watermark no longer stays before the outage.
    assert sm._pipe.watermark.safe() > failed_at
    worker = sm.register_worker("w").id
    got = [sm.dequeue(worker) for _ in range(2)]
    assert {j.id for j in got if j is not None} == {j.id for j in sm.list_jobs(workflow_id=wf.id)}


def test_a_redis_that_came_back_empty_is_left_to_repair(
        behind_redis_proxy: tuple[toolkit.StateManager, TcpProxy], raw_redis: redis.Redis,
        clean: Servers, caplog: pytest.LogCaptureFixture) -> None:
    # What changed since the outage is not enough when Redis lost everything: the catch-up
    # does not pretend it is (the watermark stays pinned), and repair() restores it all.
    sm, proxy = behind_redis_proxy
    wf = sm.create_workflow("heal", jobs=[{"name": "first"}])
    proxy.cut()
    sm.update_workflow_status(wf.id, "running")
    failed_at = time.time()
    assert wipe_namespace(clean.redis_url, clean.namespace) > 0  # as a restart without persistence
    caplog.set_level(logging.INFO, logger="toolkit.manager.watermark")
    proxy.restore()
    deadline = time.monotonic() + HEAL_BOUND_S
    while time.monotonic() < deadline and "run repair()" not in caplog.text:
        time.sleep(0.1)
    assert "Redis lost its data, or PostgreSQL may have lost commits" in caplog.text
    assert sm._pipe.watermark.safe() < failed_at  # still pinned
    assert not sm.check_consistency().ok
    repaired_at = time.time()
    sm.repair()
    assert_invariants(sm, raw_redis, clean.libpq_url)
    assert sm._pipe.watermark.safe() >= repaired_at
