"""Coordinators die for real (SIGKILL) at the worst moments; Redis is lost under live workers.

Issue 7, cases 1, 2, 5 (the restart variant) and 6.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter

import pytest

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import (
    Coordinator,
    Private,
    assert_invariants,
    inflight_ids,
    pg_job_statuses,
    queue_census,
    retry_storage,
)
from toolkit.tiers.redis import keys


def _drain(sm: toolkit.StateManager, worker: str, *, seconds: float = 40.0) -> Counter[str]:
    """Dequeue, start and complete until no job is left to do; return completions per job."""
    done: Counter[str] = Counter()
    sm.register_worker(worker)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = sm.dequeue(worker, timeout=0.3)
        if job is None:
            if all(j.is_final for j in sm.list_jobs()):
                return done
            continue
        sm.start_job(job.id, worker_id=worker, attempt=job.attempts)
        sm.complete_job(job.id, {"by": worker}, worker_id=worker, attempt=job.attempts)
        done[job.id] += 1
    raise AssertionError(f"jobs left after {seconds}s: "
                         f"{[(j.id, j.status) for j in sm.list_jobs() if not j.is_final]}")


@pytest.mark.parametrize("start", [True, "fast"], ids=["rebuild", "fast_start"])
@pytest.mark.parametrize("action", ["create workflow", "dequeue", "job -> completed"])
def test_crash_between_commit_and_redis_loses_nothing_after_rebuild(
        clean: Servers, raw_redis, action: str, start: bool | str) -> None:
    coord = Coordinator(clean.database_url, clean.redis_url, clean.namespace, clean.schema,
                        "--workflows", "2", "--jobs", "6", "--workers", "2",
                        "--failure-rate", "0", "--job-seconds", "0.05", "--heartbeat-ttl", "1",
                        "--claim-lease", "1", "--crash-after-commit", action)
    try:
        assert coord.wait_dead(60) == -signal.SIGKILL
    finally:
        coord.close()
    assert coord.acked("crashing") == [{"a": "crashing", "id": action}]
    # The fault happened for real: PostgreSQL has a commit that Redis never heard of.
    before = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                        schema=clean.schema, heartbeat_ttl=1.0, rebuild=False)
    try:
        assert not before.check_consistency().ok
    finally:
        before.close()

    sm = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema, heartbeat_ttl=1.0, rebuild=start)  # type: ignore[arg-type]
    try:
        if start == "fast":  # Redis survived: only what changed since its watermark was checked
            quick = sm.last_fast_start
            assert quick is not None and sm.last_rebuild is None
            assert quick.fixed + quick.queue_added + quick.queue_removed >= 1, quick
            assert quick.checked < len(sm.list_jobs()) + len(sm.list_workflows()) + 10
        # Every committed row (acknowledged or not) is served, at its PostgreSQL version.
        for job in sm.list_jobs():
            got = sm.get_job(job.id)
            assert got is not None and (got.status, got.version) == (job.status, job.version)
        for wf in sm.list_workflows():
            assert sm.get_workflow(wf.id) == wf
        assert sm.list_workflows(), "the committed workflow is gone"
        for rec in coord.acked("workflow"):
            assert sm.get_workflow(rec["id"]) is not None
        for rec in coord.acked("assigned"):
            assert sm.list_assignments(job_id=rec["id"], worker_id=rec["w"])
        for rec in coord.acked("completed"):
            assert sm.get_job(rec["id"]).status == "completed"
        if action == "dequeue":
            assert len(sm.list_assignments(status="active")) >= 1
        if action == "job -> completed":
            assert sm.list_jobs(status="completed")
        assert_invariants(sm, raw_redis, clean.libpq_url)

        # The dead coordinator's workers are reclaimed; everything is then done exactly once.
        time.sleep(1.3)
        sm.reap_dead_workers()
        assert not sm.list_assignments(status="active")
        done = _drain(sm, "survivor")
        assert all(n == 1 for n in done.values()), done
        completed = Counter(a.job_id for a in sm.list_assignments(status="completed"))
        assert all(n == 1 for n in completed.values()), completed
        assert {j.id for j in sm.list_jobs()} == set(completed)
        assert_invariants(sm, raw_redis, clean.libpq_url)
    finally:
        sm.close()


def test_dequeuer_killed_between_pop_and_commit_job_returns_within_lease(
        clean: Servers, raw_redis) -> None:
    coord = Coordinator(clean.database_url, clean.redis_url, clean.namespace, clean.schema,
                        "--workflows", "1", "--jobs", "4", "--workers", "1",
                        "--failure-rate", "0", "--crash-after-claim", "--claim-lease", "1")
    try:
        assert coord.wait_dead(60) == -signal.SIGKILL
    finally:
        coord.close()
    crashed = coord.acked("crashing")
    assert len(crashed) == 1 and coord.crashed_at is not None
    popped = crashed[0]["id"]
    # The fault: Redis popped the job, PostgreSQL never assigned it.
    assert pg_job_statuses(clean.libpq_url, clean.schema)[popped] == "queued"
    assert popped in inflight_ids(raw_redis, clean.namespace)
    assert popped not in queue_census(raw_redis, clean.namespace)

    sm = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema, heartbeat_ttl=2.0)
    try:
        sm.register_worker("w2")
        got: Counter[str] = Counter()
        returned_after = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(got) < 4:
            job = sm.dequeue("w2", timeout=0.1)
            if job is None:
                continue
            got[job.id] += 1
            if job.id == popped:
                returned_after = time.monotonic() - coord.crashed_at
            sm.start_job(job.id)
            sm.complete_job(job.id)
        assert returned_after is not None, f"job {popped} was lost (got {dict(got)})"
        # lease 1 s + the janitor's 1 s period + slack for a loaded machine
        assert returned_after < 4.0, returned_after
        assert all(n == 1 for n in got.values()), got
        per_job = Counter(a.job_id for a in sm.list_assignments())
        assert per_job == Counter({j: 1 for j in got}), per_job
        assert_invariants(sm, raw_redis, clean.libpq_url)
    finally:
        sm.close()


def test_redis_lost_under_live_workers_repair_rebuilds_and_reaps_only_the_dead(
        private: Private) -> None:
    ttl = 2.0
    sm = private.manager(heartbeat_ttl=ttl)
    raw = private.raw_redis()
    stop = threading.Event()
    try:
        sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(5)])
        sm.register_worker("live")
        sm.register_worker("dead")
        live_job = sm.dequeue("live")
        dead_job = sm.dequeue("dead")

        def beat() -> None:
            while not stop.is_set():
                with contextlib.suppress(toolkit.StorageUnavailable):
                    sm.heartbeat("live")  # fails while Redis is down, like a real worker's
                stop.wait(0.3)

        threading.Thread(target=beat, daemon=True).start()
        private.stack.kill_redis()
        time.sleep(ttl + 0.7)  # longer than the TTL: no heartbeat reaches anyone meanwhile
        private.stack.restart_redis()
        came_back = time.monotonic()
        report = retry_storage(sm.repair)
        rebuilt = time.monotonic()  # the grace period runs from the rebuild's end
        assert not report.ok  # it found the empty Redis ...
        assert_invariants(sm, raw, private.libpq_url)  # ... and rebuilt it
        assert queue_census(raw, private.namespace) == Counter({f"j{i}": 1 for i in range(2, 5)})

        # Within heartbeat_ttl of Redis coming back, nobody is reaped.
        while time.monotonic() - came_back < ttl - 0.3:
            assert sm.reap_dead_workers() == []
            assert sm.get_worker("live").status == "active"
            time.sleep(0.25)
        # After it, the really dead worker is reaped, the live one is kept.
        time.sleep(max(0.0, ttl + 0.4 - (time.monotonic() - rebuilt)))
        reaped = sm.reap_dead_workers()
        assert [j.id for j in reaped] == [dead_job.id]
        assert sm.get_worker("dead").status == "inactive"
        assert sm.get_worker("live").status == "active"
        assert [a.job_id for a in sm.list_assignments(status="active")] == [live_job.id]
        assert_invariants(sm, raw, private.libpq_url)
    finally:
        stop.set()
        raw.close()
        sm.close()



def test_fencing_tokens_grow_across_a_real_redis_restart(private: Private) -> None:
    sm = private.manager()
    try:
        with sm.lock("res") as lock:
            before = lock.fencing_token
        private.stack.restart_redis()
        raw = private.raw_redis()
        assert raw.get(keys.fence(private.namespace, "res")) is None  # the counter is gone
        raw.close()
        def take() -> toolkit.Lock:
            fresh = sm.lock("res", blocking_timeout=2)
            assert fresh.acquire()
            return fresh

        lock = retry_storage(take)
        try:
            assert lock.fencing_token > before
        finally:
            lock.release()
    finally:
        sm.close()
