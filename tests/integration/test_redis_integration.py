"""Redis tier: caching and invalidation, queues, heartbeats, locks, metrics (real Redis)."""

from __future__ import annotations

import time

import pytest

import toolkit
from toolkit.tiers.redis import cache, keys


def test_workflow_and_job_are_cached_with_versions(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "ja"}])
    raw = raw_redis.get(keys.entity(clean.namespace, "workflow", "wf"))
    assert raw is not None and raw.startswith("1|")
    job_raw = raw_redis.get(keys.entity(clean.namespace, "job", "ja"))
    assert cache.decode("job", job_raw).status == "queued"
    sm.cancel_workflow("wf")
    job_raw = raw_redis.get(keys.entity(clean.namespace, "job", "ja"))
    assert cache.version_of(job_raw) == 2 and cache.decode("job", job_raw).status == "cancelled"


def test_cache_fill_never_overwrites_newer_version(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.create_workflow("w", workflow_id="wf")
    sm.update_workflow_status("wf", "running")
    stale = sm.list_workflows()[0]
    assert stale.version == 2
    key = keys.entity(clean.namespace, "workflow", "wf")
    raw_redis.set(key, "9|" + raw_redis.get(key).partition("|")[2])
    sm._pipe.fill_redis([stale])
    assert raw_redis.get(key).startswith("9|")


def test_invalidation_reaches_another_manager(sm: toolkit.StateManager, make_sm) -> None:
    other = make_sm()
    sm.create_workflow("w", workflow_id="wf")
    assert other.get_workflow("wf").status == "pending"  # now in other's memory
    sm.update_workflow_status("wf", "running")
    deadline = time.monotonic() + 3
    while other.get_workflow("wf").status != "running":
        assert time.monotonic() < deadline, "the other manager kept serving a stale entry"
        time.sleep(0.02)


def test_cache_miss_falls_back_to_postgres_and_fills(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.create_workflow("w", workflow_id="wf")
    raw_redis.delete(keys.entity(clean.namespace, "workflow", "wf"))
    sm.memory.clear()
    assert sm.get_workflow("wf").name == "w"
    assert raw_redis.exists(keys.entity(clean.namespace, "workflow", "wf"))
    assert sm.get_workflow("missing") is None


def test_corrupt_cache_value_is_a_miss(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.create_workflow("w", workflow_id="wf")
    key = keys.entity(clean.namespace, "workflow", "wf")
    raw_redis.set(key, "\x80\x04garbage")  # a pickle-looking value: never unpickled
    report = sm.check_consistency()
    assert not report.ok and "corrupt" in report.to_frame()["problem"].iloc[0]
    assert not sm.repair().ok  # the report of what it found
    assert sm.check_consistency().ok
    raw_redis.set(key, "not|json")
    sm.memory.clear()
    assert sm.get_workflow("wf").name == "w"  # a miss: read from PostgreSQL
    assert raw_redis.get(key).startswith("1|")  # and the fill replaced the corrupt value


def test_priority_queue_pops_highest_priority_then_fifo(sm: toolkit.StateManager) -> None:
    jobs = [{"name": n, "id": n, "priority": p} for n, p in
            [("low1", 0), ("high1", 9), ("low2", 0), ("high2", 9), ("mid", 5)]]
    sm.create_workflow("w", jobs=jobs)
    sm.register_worker("w1", capacity=10)
    order = [sm.dequeue("w1").id for _ in range(5)]
    assert order == ["high1", "high2", "mid", "low1", "low2"]
    assert sm.dequeue("w1") is None


def test_dequeue_respects_worker_queues(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a", "queue": "gpu"},
                                  {"name": "b", "id": "b", "queue": "cpu"}])
    sm.register_worker("cpu-worker", queues=["cpu"])
    assert sm.dequeue("cpu-worker").id == "b"
    assert sm.dequeue("cpu-worker") is None
    assert sm.dequeue("cpu-worker", queues=["gpu"]).id == "a"


def test_dequeue_waits_up_to_timeout(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1")
    start = time.monotonic()
    assert sm.dequeue("w1", timeout=0.3) is None
    assert time.monotonic() - start >= 0.29


def test_heartbeat_sets_key_with_ttl(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.register_worker("w1")
    sm.heartbeat("w1")
    ttl_ms = raw_redis.pttl(keys.heartbeat(clean.namespace, "w1"))
    assert 0 < ttl_ms <= 2000
    with pytest.raises(toolkit.NotFound):
        sm.heartbeat("nobody")


def test_active_and_inactive_workers_follow_heartbeats(sm: toolkit.StateManager) -> None:
    sm.register_worker("alive")
    sm.register_worker("quiet")
    assert sm.active_workers() == ["alive", "quiet"]
    deadline = time.monotonic() + 2.6
    while time.monotonic() < deadline:
        sm.heartbeat("alive")
        time.sleep(0.2)
    assert sm.active_workers() == ["alive"]
    assert sm.inactive_workers() == ["quiet"]


def test_lock_acquire_release_and_fencing(sm: toolkit.StateManager) -> None:
    first = sm.lock("res", ttl=5)
    assert first.acquire(blocking=False)
    second = sm.lock("res", ttl=5)
    assert not second.acquire(blocking=False)
    with pytest.raises(toolkit.LockNotOwned):
        second.release()
    token = first.fencing_token
    first.release()
    with pytest.raises(toolkit.LockNotOwned):
        first.release()
    with second:
        assert second.fencing_token > token
    assert not second.locked()


def test_lock_expires_and_stale_owner_cannot_release(sm: toolkit.StateManager) -> None:
    stale = sm.lock("res", ttl=0.2)
    assert stale.acquire()
    time.sleep(0.3)
    fresh = sm.lock("res", ttl=5)
    assert fresh.acquire(blocking=False)
    with pytest.raises(toolkit.LockNotOwned):
        stale.extend()
    with pytest.raises(toolkit.LockNotOwned):
        stale.release()
    assert fresh.owned()
    fresh.release()


def test_metric_counters_and_buckets(sm: toolkit.StateManager, raw_redis, clean) -> None:
    assert sm.incr_metric("jobs_seen") == 1
    assert sm.incr_metric("jobs_seen", 4) == 5
    assert sm.get_metric("jobs_seen") == 5
    assert sm.get_metric("never") == 0
    assert sm.metrics()["jobs_seen"] == 5
    buckets = raw_redis.hgetall(keys.metric_buckets(clean.namespace, "jobs_seen"))
    assert sum(int(v) for v in buckets.values()) == 5


def test_metric_counters_survive_redis_loss(sm: toolkit.StateManager, clean) -> None:
    from tests.conftest import wipe_namespace

    sm.incr_metric("done", 7)
    sm.checkpoint_metrics()
    wipe_namespace(clean.redis_url, clean.namespace)
    assert sm.get_metric("done") == 0
    sm.repair()
    assert sm.get_metric("done") == 7


def test_heartbeat_many_beats_every_worker_in_one_call(sm: toolkit.StateManager, raw_redis, clean) -> None:
    for w in ("a", "b", "c"):
        sm.register_worker(w)
    sm.deregister_worker("c")
    time.sleep(0.05)
    sm.heartbeat_many(["a", "b", "c"])
    for w in ("a", "b", "c"):
        assert 0 < raw_redis.pttl(keys.heartbeat(clean.namespace, w)) <= 2000
    assert sm.get_worker("c").status == "active"  # a heartbeat re-activates
    with pytest.raises(toolkit.NotFound):
        sm.heartbeat_many(["a", "ghost"])


def test_incr_metrics_adds_to_many_counters_at_once(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.incr_metric("x", 2)
    assert sm.incr_metrics({"x": 3, "y": 1}) == {"x": 5, "y": 1}
    assert sm.metrics()["x"] == 5
    buckets = raw_redis.hgetall(keys.metric_buckets(clean.namespace, "y"))
    assert sum(int(v) for v in buckets.values()) == 1
    with pytest.raises(toolkit.ValidationError, match="amount"):
        sm.incr_metrics({"x": 1.5})
    assert sm.get_metric("x") == 5
