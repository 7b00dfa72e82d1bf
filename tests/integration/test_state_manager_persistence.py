"""Three tiers together: caching order, rebuild after a restart or a real crash, cascades."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import toolkit
from toolkit.tiers.redis import keys


def test_three_tier_read_order(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.create_workflow("w", workflow_id="wf")
    first = sm.get_workflow("wf")
    assert sm.get_workflow("wf") is first  # memory hit hands out the immutable snapshot
    sm.memory.clear()
    from_redis = sm.get_workflow("wf")
    assert from_redis == first and from_redis is not first
    sm.memory.clear()
    raw_redis.delete(keys.entity(clean.namespace, "workflow", "wf"))
    assert sm.get_workflow("wf") == first  # PostgreSQL fallback
    with pytest.raises(TypeError):
        first.metadata["x"] = 1  # snapshots cannot be changed through a get


def test_rebuild_from_db_after_restart(sm: toolkit.StateManager, make_sm, raw_redis, clean) -> None:
    sm.register_worker("w1")
    sm.register_worker("w2")
    wf = sm.create_workflow("etl", jobs=[
        {"name": "a", "id": "a", "priority": 2}, {"name": "b", "id": "b"},
        {"name": "c", "id": "c", "depends_on": ["a"]}])
    sm.dequeue("w1")  # a: assigned to w1
    sm.close()  # the coordinator goes away
    from tests.conftest import wipe_namespace
    wipe_namespace(clean.redis_url, clean.namespace)  # and Redis with it

    fresh = make_sm()  # init_state_manager() calls _rebuild_from_db()
    assert fresh.memory.get("workflow", wf.id) is not None
    assert {w.id for w in fresh.memory.live("worker")} == {"w1", "w2"}
    assert {a.job_id for a in fresh.memory.live("assignment")} == {"a"}
    assert {j.id for j in fresh.memory.live("job")} == {"a", "b", "c"}
    assert raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1) == ["b"]
    assert fresh.check_consistency().ok
    assert fresh.dequeue("w2").id == "b"  # immediately operational


def test_rebuild_returns_claims_left_in_flight(sm: toolkit.StateManager, raw_redis, clean) -> None:
    from toolkit.tiers.redis import queue

    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    # A coordinator popped "a" into the in-flight set, then died before PostgreSQL.
    claim = queue.claim(sm.redis, sm.ns, ["default"], time.time() + 3600)
    assert claim is not None and claim.job_id == "a"
    assert raw_redis.zcard(keys.queue(clean.namespace, "default")) == 0
    sm._rebuild_from_db()
    assert raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1) == ["a"]
    assert raw_redis.zcard(keys.inflight(clean.namespace)) == 0
    sm.register_worker("w1")
    assert sm.dequeue("w1").id == "a"  # long before the one-hour lease


def test_rebuild_report_counts(sm: toolkit.StateManager) -> None:
    sm.register_worker("w1")
    sm.create_workflow("w", jobs=[{"name": str(i)} for i in range(20)])
    sm.dequeue("w1")
    report = sm._rebuild_from_db()
    assert (report.workflows, report.workers, report.jobs, report.assignments, report.queued) == (
        1, 1, 20, 1, 19)
    assert report.seconds > 0
    again = sm.rebuild()  # the public name of the same rebuild
    assert sm.last_rebuild is again
    assert (again.workflows, again.workers, again.jobs, again.assignments, again.queued) == (
        1, 1, 20, 1, 19)


def test_consistency_check_finds_and_repair_fixes(sm: toolkit.StateManager, raw_redis, clean) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}, {"name": "b", "id": "b"}])
    assert sm.check_consistency().ok
    raw_redis.zrem(keys.queue(clean.namespace, "default"), "a")  # lost queue entry
    raw_redis.zadd(keys.queue(clean.namespace, "default"), {"ghost": 1})  # foreign entry
    raw_redis.delete(keys.entity(clean.namespace, "workflow", "wf"))  # lost cache entry
    report = sm.check_consistency()
    frame = report.to_frame()
    assert not report.ok and set(frame["id"]) == {"a", "ghost", "wf"}
    assert list(frame.columns) == list(toolkit.compare.REPORT_COLUMNS)
    sm.repair()
    assert sm.check_consistency().ok
    assert raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1) == ["a", "b"]


def test_cascading_delete_clears_every_tier(sm: toolkit.StateManager, raw_redis, raw_pg, clean) -> None:
    sm.register_worker("w1")
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}, {"name": "b", "id": "b"}])
    sm.dequeue("w1")
    sm.delete_workflow("wf")
    for table in ("workflows", "jobs", "job_assignments"):
        n = raw_pg.execute(f'SELECT count(*) FROM "{clean.schema}".{table}').fetchone()[0]
        assert n == 0, table
    left = [k for k in raw_redis.scan_iter(match=keys.namespace_pattern(clean.namespace))
            if ":workflow:" in k or ":job:" in k or ":assignment:" in k]
    assert left == []
    assert raw_redis.zcard(keys.queue(clean.namespace, "default")) == 0
    assert sm.memory.live("job") == [] and sm.get_workflow("wf") is None
    with pytest.raises(toolkit.NotFound):
        sm.delete_workflow("wf")
    assert sm.check_consistency().ok


def test_end_to_end_dependencies_and_rollup(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("pipe", jobs=[
        {"name": "extract"}, {"name": "transform", "depends_on": ["extract"]},
        {"name": "load", "depends_on": ["transform"]}])
    sm.register_worker("w")
    names = []
    while (job := sm.dequeue("w")) is not None:
        names.append(job.name)
        sm.start_job(job.id)
        assert sm.get_workflow(wf.id).status == "running"
        sm.complete_job(job.id, {"step": job.name})
    assert names == ["extract", "transform", "load"]
    assert sm.get_workflow(wf.id).status == "completed"
    assert sm.check_consistency().ok


def test_failed_for_good_fails_workflow(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("w", jobs=[{"name": "x", "id": "x", "max_attempts": 1}])
    sm.register_worker("w")
    sm.dequeue("w")
    job = sm.fail_job("x", "boom")
    assert job.status == "failed" and job.error == "boom"
    assert sm.get_workflow(wf.id).status == "failed"
    retried = sm.enqueue("x")
    assert retried.status == "queued" and sm.get_workflow(wf.id).status == "running"


def test_invalid_transition_changes_nothing(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", jobs=[{"name": "x", "id": "x"}])
    with pytest.raises(toolkit.InvalidTransition) as info:
        sm.complete_job("x")
    assert (info.value.current, info.value.requested) == ("queued", "completed")
    assert sm.get_job("x").status == "queued" and sm.get_job("x").version == 1
    with pytest.raises(toolkit.NotFound):
        sm.start_job("nope")
    assert sm.check_consistency().ok


@pytest.mark.parametrize("call, field", [
    (lambda sm: sm.create_workflow(""), "name"),
    (lambda sm: sm.create_workflow("w", metadata={"x": {1, 2}}), "metadata"),
    (lambda sm: sm.create_workflow("w", jobs=[{"name": "a", "payload": b"raw"}]), "payload"),
    (lambda sm: sm.create_workflow("w", jobs=[{"name": "a", "payload": "x\x00y"}]), "payload"),
    (lambda sm: sm.create_workflow("w", jobs=[{"name": "a", "depends_on": ["b"]},
                                              {"name": "b", "depends_on": ["a"]}]), "depends_on"),
    (lambda sm: sm.create_workflow("w", jobs=[{"name": "a", "priority": 10**9}]), "priority"),
    (lambda sm: sm.create_workflow("w", jobs=[{"name": "a"}, {"name": "a"}]), "jobs"),
    (lambda sm: sm.register_worker("w", capacity=0), "capacity"),
    (lambda sm: sm.register_worker("w", queues="default"), "queues"),
    (lambda sm: sm.list_jobs(status="bogus"), "status"),
    (lambda sm: sm.lock("l", ttl=float("nan")), "ttl"),
    (lambda sm: sm.incr_metric("m", 1.5), "amount"),
])
def test_bad_input_names_field_and_changes_nothing(sm: toolkit.StateManager, call, field) -> None:
    sm.create_workflow("seed", workflow_id="seed")
    with pytest.raises(toolkit.ValidationError) as info:
        call(sm)
    assert field in str(info.value)
    assert [w.id for w in sm.list_workflows()] == ["seed"]
    assert sm.list_workers() == []
    assert sm.check_consistency().ok


def test_no_job_is_handed_to_two_workers(sm: toolkit.StateManager, make_sm) -> None:
    import threading

    sm.create_workflow("w", jobs=[{"name": str(i)} for i in range(60)])
    managers = [sm, make_sm(), make_sm()]
    got: list[tuple[str, str]] = []
    lock = threading.Lock()

    def drain(m: toolkit.StateManager, worker: str) -> None:
        m.register_worker(worker, capacity=100)
        while (job := m.dequeue(worker)) is not None:
            with lock:
                got.append((job.id, worker))

    threads = [threading.Thread(target=drain, args=(m, f"w{i}")) for i, m in enumerate(managers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [j for j, _ in got]
    assert len(ids) == 60 and len(set(ids)) == 60
    assert len(sm.list_assignments(status="active")) == 60


CHILD = textwrap.dedent("""
    import json, sys, toolkit
    sm = toolkit.init_state_manager(sys.argv[1], sys.argv[2], namespace=sys.argv[3], schema=sys.argv[3])
    sm.register_worker("w1", capacity=1000)
    for i in range(10_000):
        wf = sm.create_workflow(f"wf{i}", jobs=[{"name": "a"}, {"name": "b"}], workflow_id=f"wf{i}")
        job = sm.dequeue("w1")
        print(json.dumps({"wf": wf.id, "assigned": job.id}), flush=True)
""")


def test_sigkill_mid_work_loses_no_acknowledged_write(clean, make_sm) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, clean.database_url, clean.redis_url, clean.namespace],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    acked = []
    assert proc.stdout is not None
    for line in proc.stdout:
        acked.append(json.loads(line))
        if len(acked) == 25:
            break
    proc.send_signal(signal.SIGKILL)  # a real crash, mid-work
    proc.wait(timeout=10)
    rest = proc.stdout.read().splitlines()
    proc.stdout.close()
    acked += [json.loads(x) for x in rest if x.strip()]
    started = time.perf_counter()
    fresh = make_sm()
    took = time.perf_counter() - started
    for ack in acked:
        assert fresh.get_workflow(ack["wf"]) is not None
        job = fresh.memory.get("job", ack["assigned"])
        assert job is not None and job.status == "assigned" and job.worker_id == "w1"
    report = fresh.check_consistency()
    assert report.ok, report.to_frame().to_string()
    assert took < 10
    assert fresh.dequeue("w1") is not None  # the rebuilt coordinator works at once
