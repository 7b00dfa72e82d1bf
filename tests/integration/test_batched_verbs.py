"""Batched and fused job verbs: dequeue_many, start_jobs/complete_jobs/fail_jobs, complete_and_dequeue.

Real PostgreSQL and Redis. Each batch commits once; a refused item is reported
in its own slot (the error), the others go through.
"""

from __future__ import annotations

import threading
from typing import Any

import psycopg
import pytest
from psycopg import sql

import toolkit
from tests.integration.conftest import stale_queue_entry
from toolkit.manager import batches


def _events(raw_pg: psycopg.Connection, schema: str, job_id: str) -> list[str]:
    q = sql.SQL("SELECT event FROM {} WHERE job_id = %s ORDER BY id").format(
        sql.Identifier(schema, "job_events"))
    return [r[0] for r in raw_pg.execute(q, (job_id,))]


def _pg_status(raw_pg: psycopg.Connection, schema: str, job_id: str) -> str:
    q = sql.SQL("SELECT status FROM {} WHERE id = %s").format(sql.Identifier(schema, "jobs"))
    row = raw_pg.execute(q, (job_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _flat(sm: toolkit.StateManager, n: int, name: str = "wf") -> toolkit.Workflow:
    return sm.create_workflow(name, jobs=[{"name": f"j{i}", "priority": 0} for i in range(n)])


def test_a_batch_with_stale_items_refuses_those_alone(sm: toolkit.StateManager, raw_pg, clean) -> None:
    _flat(sm, 4)
    w = sm.register_worker("w1").id
    got = sm.dequeue_many(w, 4)
    assert len(got) == 4 and all(j.status is toolkit.JobStatus.ASSIGNED for j in got)
    a, b, c, d = got
    started = sm.start_jobs([
        {"job_id": a.id, "worker_id": w, "attempt": a.attempts},
        {"job_id": b.id, "worker_id": w, "attempt": 99},          # stale attempt
        {"job_id": c.id, "worker_id": "someone-else"},            # wrong worker
        {"job_id": d.id},
    ])
    assert isinstance(started[0], toolkit.Job) and started[0].status is toolkit.JobStatus.RUNNING
    assert isinstance(started[1], toolkit.StaleAttempt)
    assert isinstance(started[2], toolkit.StaleAttempt)
    assert isinstance(started[3], toolkit.Job)
    assert _pg_status(raw_pg, clean.schema, b.id) == "assigned"
    done = sm.complete_jobs([(a.id, {"n": 1}), (b.id, {"n": 2}), (d.id, None)], worker_id=w)
    assert isinstance(done[0], toolkit.Job) and done[0].result == {"n": 1}
    assert isinstance(done[1], toolkit.InvalidTransition)  # b is assigned, not running
    assert isinstance(done[2], toolkit.Job) and done[2].status is toolkit.JobStatus.COMPLETED
    assert [_pg_status(raw_pg, clean.schema, j.id) for j in got] == [
        "completed", "assigned", "assigned", "completed"]
    assert sm.get_job(a.id).result == {"n": 1}  # type: ignore[union-attr]
    assert [x.status.value for x in sm.list_assignments(job_id=a.id)] == ["completed"]
    assert [x.status.value for x in sm.list_assignments(job_id=b.id)] == ["active"]
    assert _events(raw_pg, clean.schema, a.id) == ["created", "queued", "assigned", "started",
                                                   "completed"]
    assert sm.check_consistency().ok


def test_fail_jobs_retries_and_fails_per_item(sm: toolkit.StateManager, raw_pg, clean) -> None:
    sm.create_workflow("wf", jobs=[{"name": "a", "max_attempts": 2}, {"name": "b", "max_attempts": 1}])
    w = sm.register_worker("w1").id
    a, b = sm.dequeue_many(w, 2, start=True)
    out = sm.fail_jobs([(a.id, "boom a"), {"job_id": b.id, "error": "boom b", "attempt": 1},
                        ("nope", "x")], worker_id=w, retry_in=0)
    assert isinstance(out[0], toolkit.Job) and out[0].status is toolkit.JobStatus.QUEUED
    assert isinstance(out[1], toolkit.Job) and out[1].status is toolkit.JobStatus.FAILED
    assert out[1].error == "boom b"
    assert isinstance(out[2], toolkit.NotFound)
    assert [x.status.value for x in sm.list_assignments(job_id=a.id)] == ["failed"]
    assert sm.get_workflow(a.workflow_id).status is toolkit.WorkflowStatus.RUNNING  # type: ignore[union-attr]
    assert sm.dequeue(w).id == a.id  # type: ignore[union-attr]
    assert sm.check_consistency().ok


def test_concurrent_dequeue_many_never_hands_a_job_twice(sm: toolkit.StateManager, make_sm,
                                                          raw_pg, clean) -> None:
    for k in range(3):
        _flat(sm, 100, f"wf{k}")
    managers = [sm, make_sm(), make_sm()]
    seen: list[list[str]] = [[] for _ in range(6)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        m = managers[i % 3]
        w = m.register_worker(f"w{i}").id
        try:
            while True:
                got = m.dequeue_many(w, 7)
                if not got:
                    return
                seen[i] += [j.id for j in got]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    every = [j for s in seen for j in s]
    assert len(every) == 300 and len(set(every)) == 300
    q = sql.SQL("SELECT count(*), count(DISTINCT job_id) FROM {} WHERE status = 'active'").format(
        sql.Identifier(clean.schema, "job_assignments"))
    assert raw_pg.execute(q).fetchone() == (300, 300)


def test_dependents_released_and_workflow_completes_with_the_last_batch(
        sm: toolkit.StateManager, raw_pg, clean) -> None:
    wf = sm.create_workflow("dag", jobs=[{"name": "a"}, {"name": "b"},
                                         {"name": "c", "depends_on": ["a", "b"]},
                                         {"name": "d", "depends_on": ["a"]}])
    w = sm.register_worker("w1").id
    first = sm.dequeue_many(w, 10, start=True)
    assert sorted(j.name for j in first) == ["a", "b"]
    out = sm.complete_jobs([(j.id, j.name) for j in first])
    assert all(isinstance(o, toolkit.Job) for o in out)
    jobs = {j.name: j for j in sm.list_jobs(workflow_id=wf.id)}
    assert jobs["c"].status is toolkit.JobStatus.QUEUED
    assert jobs["d"].status is toolkit.JobStatus.QUEUED
    assert _events(raw_pg, clean.schema, jobs["c"].id) == ["created", "queued"]
    assert sm.get_workflow(wf.id).status is toolkit.WorkflowStatus.RUNNING  # type: ignore[union-attr]
    second = sm.dequeue_many(w, 10, start=True)
    assert sorted(j.name for j in second) == ["c", "d"]
    sm.complete_jobs([(j.id, None) for j in second], worker_id=w)
    assert sm.get_workflow(wf.id).status is toolkit.WorkflowStatus.COMPLETED  # type: ignore[union-attr]
    q = sql.SQL("SELECT status FROM {} WHERE id = %s").format(sql.Identifier(clean.schema, "workflows"))
    assert raw_pg.execute(q, (wf.id,)).fetchone() == ("completed",)
    assert sm.check_consistency().ok


def test_fused_complete_and_dequeue(sm: toolkit.StateManager, raw_pg, clean) -> None:
    _flat(sm, 2)
    w = sm.register_worker("w1").id
    first = sm.dequeue(w, start=True)
    assert first is not None and first.status is toolkit.JobStatus.RUNNING
    assert _events(raw_pg, clean.schema, first.id)[-2:] == ["assigned", "started"]
    done, nxt = sm.complete_and_dequeue(first.id, {"ok": 1}, worker_id=w, attempt=first.attempts)
    assert done.status is toolkit.JobStatus.COMPLETED and done.result == {"ok": 1}
    assert nxt is not None and nxt.status is toolkit.JobStatus.ASSIGNED and nxt.worker_id == w
    sm.start_job(nxt.id, worker_id=w)
    # Nothing left to claim: the completion is still committed.
    last, none = sm.complete_and_dequeue(nxt.id, "r", worker_id=w)
    assert none is None and last.status is toolkit.JobStatus.COMPLETED
    assert _pg_status(raw_pg, clean.schema, nxt.id) == "completed"
    assert sm.check_consistency().ok


def test_fused_verb_refused_completion_keeps_the_next_job_queued(sm: toolkit.StateManager,
                                                                 raw_pg, clean) -> None:
    _flat(sm, 2)
    w = sm.register_worker("w1").id
    first = sm.dequeue(w, start=True)
    assert first is not None
    with pytest.raises(toolkit.StaleAttempt):
        sm.complete_and_dequeue(first.id, None, worker_id=w, attempt=first.attempts + 1)
    assert _pg_status(raw_pg, clean.schema, first.id) == "running"
    other = sm.dequeue(w)
    assert other is not None and other.id != first.id  # the claimed one went back to its queue
    assert sm.check_consistency().ok


BAD_BATCHES: list[tuple[str, Any]] = [
    ("empty", []),
    ("oversized", [("j", None)] * (batches.MAX_BATCH + 1)),
    ("duplicate ids", "dup"),
    ("bad result", "nan"),
    ("not an item", [42]),
    ("unknown field", [{"job_id": "x", "colour": "red"}]),
]


@pytest.mark.parametrize(("label", "items"), BAD_BATCHES, ids=[b[0] for b in BAD_BATCHES])
def test_bad_batches_are_refused_with_nothing_written(sm: toolkit.StateManager, raw_pg, clean,
                                                      label: str, items: Any) -> None:
    _flat(sm, 2)
    w = sm.register_worker("w1").id
    a, b = sm.dequeue_many(w, 2, start=True)
    if items == "dup":
        items = [(a.id, 1), (a.id, 2)]
    elif items == "nan":
        items = [(a.id, 1), (b.id, float("nan"))]
    with pytest.raises(toolkit.ValidationError):
        sm.complete_jobs(items)
    assert [_pg_status(raw_pg, clean.schema, j.id) for j in (a, b)] == ["running", "running"]


def test_bad_dequeue_many_sizes(sm: toolkit.StateManager) -> None:
    w = sm.register_worker("w1").id
    for n in (0, -1, batches.MAX_BATCH + 1, 2.5, True):
        with pytest.raises(toolkit.ValidationError):
            sm.dequeue_many(w, n)  # type: ignore[arg-type]
    assert sm.dequeue_many(w, 5) == []


def test_a_crash_between_the_batch_claim_and_the_commit_loses_no_job(sm: toolkit.StateManager,
                                                                     raw_pg, clean) -> None:
    from toolkit import failpoints

    _flat(sm, 3)
    w = sm.register_worker("w1").id
    sm.claim_lease = 0.2

    def crash(detail: str) -> None:
        raise RuntimeError(f"coordinator died after claiming {detail}")

    failpoints.arm("after_claim", crash)
    try:
        with pytest.raises(RuntimeError, match="coordinator died"):
            sm.dequeue_many(w, 3)
    finally:
        failpoints.disarm("after_claim")
    q = sql.SQL("SELECT count(*) FROM {} WHERE status = 'queued'").format(
        sql.Identifier(clean.schema, "jobs"))
    assert raw_pg.execute(q).fetchone() == (3,)
    sm.reap_dead_workers()  # runs the janitor now; the leases have not expired yet
    import time

    time.sleep(0.3)
    sm.reap_dead_workers()  # the leases expired: the janitor returns the claims
    assert len(sm.dequeue_many(w, 3)) == 3


def test_two_concurrent_batches_completing_the_last_two_dependencies_release_the_job(
        sm: toolkit.StateManager, make_sm) -> None:
    other = make_sm()
    for round_ in range(8):
        wf = sm.create_workflow(f"dag{round_}", jobs=[
            {"name": "a", "queue": f"q{round_}"}, {"name": "b", "queue": f"q{round_}"},
            {"name": "c", "depends_on": ["a", "b"], "queue": f"q{round_}"}])
        w = sm.register_worker(f"w{round_}", queues=[f"q{round_}"]).id
        a, b = sm.dequeue_many(w, 2, start=True)
        barrier = threading.Barrier(2)

        def finish(m: toolkit.StateManager, job: toolkit.Job,
                   barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            m.complete_jobs([(job.id, None)])

        threads = [threading.Thread(target=finish, args=(sm, a)),
                   threading.Thread(target=finish, args=(other, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        c = next(j for j in sm.list_jobs(workflow_id=wf.id) if j.name == "c")
        assert c.status is toolkit.JobStatus.QUEUED, f"round {round_}: c is {c.status}"


def test_claimed_jobs_postgresql_refuses_are_forgotten_and_the_rest_assigned(
        sm: toolkit.StateManager, raw_redis, raw_pg, clean) -> None:
    from toolkit.tiers.redis import keys

    _flat(sm, 3)
    w = sm.register_worker("w1").id
    gone = stale_queue_entry(sm, raw_redis, w)
    got = sm.dequeue_many(w, 3)
    assert len(got) == 2 and gone not in {j.id for j in got}
    assert _pg_status(raw_pg, clean.schema, gone) == "cancelled"
    assert raw_redis.zscore(keys.queue(sm.ns, "default"), gone) is None
    assert raw_redis.zscore(keys.inflight(sm.ns), gone) is None
    assert sm.check_consistency().ok


def test_batch_and_fused_claims_skip_a_paused_queue(sm: toolkit.StateManager) -> None:
    sm.create_workflow("wf", jobs=[{"name": f"h{i}", "queue": "held", "priority": 9}
                                   for i in range(3)] + [{"name": "o", "queue": "open"}])
    w = sm.register_worker("w1", queues=["held", "open"]).id
    sm.pause_queue("held", reason="maintenance")
    got = sm.dequeue_many(w, 10, start=True)
    assert [j.name for j in got] == ["o"]
    assert sm.dequeue_many(w, 10) == []
    done, nxt = sm.complete_and_dequeue(got[0].id, None, worker_id=w)
    assert done.status is toolkit.JobStatus.COMPLETED and nxt is None
    sm.resume_queue("held")
    assert sorted(j.name for j in sm.dequeue_many(w, 10)) == ["h0", "h1", "h2"]
