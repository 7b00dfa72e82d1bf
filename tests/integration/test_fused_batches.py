"""complete_and_dequeue_many: the batched worker's step, a batch completed and the next claimed
in one transaction. Real PostgreSQL and Redis."""

from __future__ import annotations

import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

import toolkit
from tests.integration.conftest import stale_queue_entry
from toolkit import failpoints
from toolkit.manager import batches
from toolkit.tiers.postgres import batches as pgb
from toolkit.tiers.redis import keys, queue


def _column(raw_pg: psycopg.Connection, schema: str, column: str, ids: list[str]) -> list[Any]:
    q = sql.SQL("SELECT {} FROM {} WHERE id = ANY(%s) ORDER BY array_position(%s, id)").format(
        sql.SQL(column), sql.Identifier(schema, "jobs"))
    return [r[0] for r in raw_pg.execute(q, (ids, ids))]


def _ranked(sm: toolkit.StateManager, n: int) -> toolkit.Workflow:
    """``n`` jobs, the higher the index the higher the priority."""
    return sm.create_workflow("wf", jobs=[{"name": f"j{i}", "priority": i} for i in range(n)])


def test_a_batch_completes_and_the_next_is_claimed_in_one_transaction(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any) -> None:
    _ranked(sm, 7)
    w = sm.register_worker("w1").id
    first = sm.dequeue_many(w, 3, start=True)
    assert [j.name for j in first] == ["j6", "j5", "j4"]
    out, nxt = sm.complete_and_dequeue_many(
        [{"job_id": j.id, "result": {"n": k}, "attempt": j.attempts} for k, j in enumerate(first)],
        3, worker_id=w, start=True)
    assert [(o.status, o.result) for o in out] == [  # type: ignore[union-attr]
        (toolkit.JobStatus.COMPLETED, {"n": 0}), (toolkit.JobStatus.COMPLETED, {"n": 1}),
        (toolkit.JobStatus.COMPLETED, {"n": 2})]
    assert [j.name for j in nxt] == ["j3", "j2", "j1"]  # best first
    assert all(j.status is toolkit.JobStatus.RUNNING and j.worker_id == w for j in nxt)
    ids = [j.id for j in (*first, *nxt)]
    assert _column(raw_pg, clean.schema, "status", ids) == ["completed"] * 3 + ["running"] * 3
    # One transaction wrote all six rows: they carry the same transaction id.
    assert len(set(_column(raw_pg, clean.schema, "xmin::text", ids))) == 1
    assert sm.get_job(nxt[0].id).status is toolkit.JobStatus.RUNNING  # type: ignore[union-attr]
    assert sm.check_consistency().ok


def test_a_refused_item_is_reported_alone_and_the_claim_goes_through(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any) -> None:
    _ranked(sm, 5)
    w = sm.register_worker("w1").id
    a, b = sm.dequeue_many(w, 2, start=True)
    out, nxt = sm.complete_and_dequeue_many(
        [{"job_id": a.id, "attempt": a.attempts}, {"job_id": b.id, "attempt": b.attempts + 1}],
        2, worker_id=w, start=True)
    assert isinstance(out[0], toolkit.Job) and out[0].status is toolkit.JobStatus.COMPLETED
    assert isinstance(out[1], toolkit.StaleAttempt)
    assert len(nxt) == 2
    assert _column(raw_pg, clean.schema, "status", [a.id, b.id, *(j.id for j in nxt)]) == [
        "completed", "running", "running", "running"]
    assert sm.check_consistency().ok


def test_with_nothing_to_claim_the_completions_still_commit(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any) -> None:
    wf = _ranked(sm, 2)
    w = sm.register_worker("w1").id
    got = sm.dequeue_many(w, 2, start=True)
    out, nxt = sm.complete_and_dequeue_many([(j.id, None) for j in got], 10, worker_id=w)
    assert nxt == [] and all(isinstance(o, toolkit.Job) for o in out)
    assert _column(raw_pg, clean.schema, "status", [j.id for j in got]) == ["completed"] * 2
    assert sm.get_workflow(wf.id).status is toolkit.WorkflowStatus.COMPLETED  # type: ignore[union-attr]


def test_a_released_dependent_is_claimable_after_the_step(sm: toolkit.StateManager) -> None:
    sm.create_workflow("chain", jobs=[{"name": "a"}, {"name": "b", "depends_on": ["a"]}])
    w = sm.register_worker("w1").id
    (a,) = sm.dequeue_many(w, 5, start=True)
    out, nxt = sm.complete_and_dequeue_many([(a.id, None)], 5, worker_id=w, start=True)
    # b was pending when the claim ran; its release commits with a's completion.
    assert isinstance(out[0], toolkit.Job) and nxt == []
    (b,) = sm.dequeue_many(w, 5, start=True)
    assert b.name == "b"


def test_a_job_completed_in_the_step_is_not_claimed_by_it(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, raw_redis: Any, clean: Any) -> None:
    _ranked(sm, 1)
    w = sm.register_worker("w1").id
    (job,) = sm.dequeue_many(w, 1, start=True)
    sm.fail_job(job.id, "boom", retry_in=0)  # queued again, and back in its Redis queue
    out, nxt = sm.complete_and_dequeue_many([(job.id, None)], 1, worker_id=w, start=True)
    # Unfenced, the completion would have completed the attempt the claim had just made.
    assert isinstance(out[0], toolkit.InvalidTransition) and nxt == []
    assert _column(raw_pg, clean.schema, "status", [job.id]) == ["queued"]
    assert raw_redis.zscore(keys.queue(sm.ns, "default"), job.id) is not None
    assert raw_redis.zscore(keys.inflight(sm.ns), job.id) is None


@pytest.mark.parametrize(("items", "n"), [([], 1), ("x", 1), (None, 1), ("ok", 0),
                                          ("ok", 1001), ("ok", True)])
def test_bad_input_writes_and_claims_nothing(sm: toolkit.StateManager, raw_pg: psycopg.Connection,
                                             raw_redis: Any, clean: Any, items: Any, n: Any) -> None:
    _ranked(sm, 3)
    w = sm.register_worker("w1").id
    (job,) = sm.dequeue_many(w, 1, start=True)
    items = [(job.id, None)] if items == "ok" else [(job.id, float("nan"))] if items is None else items
    with pytest.raises(toolkit.ValidationError):
        sm.complete_and_dequeue_many(items, n, worker_id=w, start=True)
    assert _column(raw_pg, clean.schema, "status", [job.id]) == ["running"]
    assert raw_redis.zcard(keys.queue(sm.ns, "default")) == 2  # nothing popped


def test_a_failed_transaction_leaves_no_claim_in_flight(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, raw_redis: Any, clean: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _ranked(sm, 4)
    w = sm.register_worker("w1").id
    got = sm.dequeue_many(w, 2, start=True)

    def down(*args: Any, **kwargs: Any) -> Any:
        raise toolkit.StorageUnavailable("PostgreSQL went away")

    monkeypatch.setattr(pgb, "claim_complete_release", down)
    with pytest.raises(toolkit.StorageUnavailable):
        sm.complete_and_dequeue_many([(j.id, None) for j in got], 2, worker_id=w, start=True)
    # The two claims it popped are back in their queue, none left in flight.
    assert raw_redis.zcard(keys.queue(sm.ns, "default")) == 2
    assert raw_redis.zcard(keys.inflight(sm.ns)) == 0
    assert _column(raw_pg, clean.schema, "status", [j.id for j in got]) == ["running"] * 2


def test_run_worker_records_a_batch_when_its_next_claim_cannot_be_made(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _ranked(sm, 4)
    sm.register_worker("w1")
    ran: list[str] = []
    pop = batches.Batches._pop

    def pop_once(self: batches.Batches, names: list[str], n: int) -> Any:
        if ran:  # the claim made with the first batch's completions, and every one after
            raise toolkit.StorageUnavailable("Redis went away")
        return pop(self, names, n)

    monkeypatch.setattr(batches.Batches, "_pop", pop_once)
    with pytest.raises(toolkit.StorageUnavailable):
        sm.run_worker("w1", lambda job: ran.append(job.id), batch=2, idle_timeout=0)
    # The results of the batch that ran are committed all the same (PostgreSQL alone).
    assert len(ran) == 2
    assert _column(raw_pg, clean.schema, "status", ran) == ["completed"] * 2


def test_when_putting_back_a_claim_it_completes_fails_the_other_claims_go_back_too(
        sm: toolkit.StateManager, raw_redis: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _ranked(sm, 2)
    w = sm.register_worker("w1").id
    first, second = sm.dequeue_many(w, 2, start=True)
    sm.fail_job(first.id, "boom", retry_in=0)  # queued again: popped by the step completing it
    sm.fail_job(second.id, "boom", retry_in=0)
    settle = queue.settle

    def settle_but_first(client: Any, ns: str, claim: Any, *, requeue: bool) -> bool:
        if claim.job_id == first.id:
            raise toolkit.StorageUnavailable("Redis went away")
        return settle(client, ns, claim, requeue=requeue)

    monkeypatch.setattr(queue, "settle", settle_but_first)
    with pytest.raises(toolkit.StorageUnavailable):
        sm.complete_and_dequeue_many([(first.id, None)], 2, worker_id=w, start=True)
    # The other claim is back in its queue, not left in flight until its lease ends.
    assert raw_redis.zscore(keys.queue(sm.ns, "default"), second.id) is not None
    assert raw_redis.zscore(keys.inflight(sm.ns), second.id) is None


def test_a_committed_claim_is_not_reported_failed_when_forgetting_a_lost_claim_fails(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, raw_redis: Any, clean: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    _ranked(sm, 3)
    w = sm.register_worker("w1").id
    gone = stale_queue_entry(sm, raw_redis, w)

    def down(*args: Any, **kwargs: Any) -> bool:
        raise toolkit.StorageUnavailable("Redis went away")

    monkeypatch.setattr(queue, "settle", down)
    got = sm.dequeue_many(w, 3, start=True)  # committed: its answer is the jobs it holds
    assert len(got) == 2 and gone not in {j.id for j in got}
    assert _column(raw_pg, clean.schema, "status", [j.id for j in got]) == ["running"] * 2
    assert raw_redis.zscore(keys.inflight(sm.ns), gone) is not None  # until its lease ends


def test_run_worker_recovers_from_a_fused_commit_whose_reply_was_lost(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any) -> None:
    # PostgreSQL commits the step (two completions, two claims) but the worker hears
    # StorageUnavailable, as when the connection drops during COMMIT.
    wf = _ranked(sm, 6)
    sm.register_worker("w1")
    dropped: list[str] = []

    def lose_the_reply(action: str) -> None:
        if action == "complete and dequeue many" and not dropped:
            dropped.append(action)
            raise toolkit.StorageUnavailable("the connection dropped during COMMIT")

    ran: list[str] = []
    failpoints.arm("after_commit", lose_the_reply)
    try:
        report = sm.run_worker("w1", lambda job: ran.append(job.id), batch=2, idle_timeout=0)
    finally:
        failpoints.disarm("after_commit")
    assert dropped
    ids = [j.id for j in sm.list_jobs(workflow_id=wf.id)]
    # The claims that commit made were given back and run later, each once, attempt 1;
    # the completions it committed are counted as completed, not lost.
    assert sorted(ran) == sorted(ids)
    assert _column(raw_pg, clean.schema, "status", ids) == ["completed"] * 6
    assert _column(raw_pg, clean.schema, "attempts", ids) == [1] * 6
    assert (report.completed, report.lost) == (6, 0)


def test_another_coordinators_memory_hears_what_a_lost_commit_wrote(
        sm: toolkit.StateManager, make_sm: Any) -> None:
    # Another process read the jobs while they ran. The step that completed them lost its
    # reply, so it published nothing; the worker's recovery announces what it restores.
    wf = _ranked(sm, 2)
    other = make_sm()
    other.memory_max_age = 60.0  # only an invalidation can make its memory drop an entry
    sm.register_worker("w1")
    seen: list[str] = []
    read: list[toolkit.JobStatus] = []

    def handler(job: toolkit.Job) -> None:
        # Its memory holds the job as its start loaded it, queued, until the claim's
        # invalidation arrives; then it reads the running job, and keeps that in memory.
        deadline = time.monotonic() + 5.0
        while (other.get_job(job.id).status is not toolkit.JobStatus.RUNNING
               and time.monotonic() < deadline):
            time.sleep(0.02)
        read.append(other.get_job(job.id).status)
        seen.append(job.id)

    dropped = _lose_reply_of("complete and dequeue many")
    try:
        report = sm.run_worker("w1", handler, batch=2, idle_timeout=0)
    finally:
        failpoints.disarm("after_commit")
    assert read == [toolkit.JobStatus.RUNNING] * 2
    assert dropped and report.completed == 2 and len(seen) == 2
    assert {j.status for j in sm.list_jobs(workflow_id=wf.id)} == {toolkit.JobStatus.COMPLETED}
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and any(
            other.get_job(j).status is not toolkit.JobStatus.COMPLETED for j in seen):
        time.sleep(0.05)
    assert [other.get_job(j).status for j in seen] == [toolkit.JobStatus.COMPLETED] * 2


def _lose_reply_of(action: str) -> list[str]:
    """Arm ``after_commit`` to raise StorageUnavailable once for ``action``: PostgreSQL has
    committed, the caller hears a failure (a ``COMMIT`` whose reply was lost)."""
    dropped: list[str] = []

    def lose(detail: str) -> None:
        if detail == action and not dropped:
            dropped.append(detail)
            raise toolkit.StorageUnavailable("the connection dropped during COMMIT")

    failpoints.arm("after_commit", lose)
    return dropped


def test_a_claim_whose_reply_was_lost_names_its_jobs_even_when_redis_refuses_them_back(
        sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    _ranked(sm, 3)
    w = sm.register_worker("w1").id

    def down(*args: Any, **kwargs: Any) -> bool:
        raise toolkit.StorageUnavailable("Redis went away")

    monkeypatch.setattr(queue, "settle", down)
    dropped = _lose_reply_of("dequeue")
    try:
        with pytest.raises(toolkit.StorageUnavailable, match="during COMMIT") as failed:
            sm.dequeue_many(w, 2, start=True)
    finally:
        failpoints.disarm("after_commit")
    assert dropped
    assert len(failed.value.claimed) == 2  # the call's own error, naming what it claimed
    assert {j.status for j in sm.list_jobs(worker_id=w)} == {toolkit.JobStatus.RUNNING}
    monkeypatch.undo()
    back = sm.return_unstarted(w, failed.value.claimed)  # what the README tells a caller
    assert sorted(j.id for j in back) == sorted(failed.value.claimed)
    assert all(j.status is toolkit.JobStatus.QUEUED and j.attempts == 0 for j in back)
    assert sm.list_jobs(worker_id=w) == []


def test_run_worker_gives_back_a_first_claim_whose_reply_was_lost_before_raising(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any) -> None:
    wf = _ranked(sm, 4)
    sm.register_worker("w1")
    dropped = _lose_reply_of("dequeue")
    try:
        with pytest.raises(toolkit.StorageUnavailable):
            sm.run_worker("w1", lambda job: None, batch=2, idle_timeout=0)
    finally:
        failpoints.disarm("after_commit")
    assert dropped
    ids = [j.id for j in sm.list_jobs(workflow_id=wf.id)]
    # Nothing is left claimed by the worker: the two jobs are queued again, attempt given back.
    assert _column(raw_pg, clean.schema, "status", ids) == ["queued"] * 4
    assert _column(raw_pg, clean.schema, "attempts", ids) == [0] * 4
    assert sm.check_consistency().ok
    report = sm.run_worker("w1", lambda job: None, batch=2, idle_timeout=0)
    assert report.completed == 4


def test_run_worker_stops_when_it_cannot_give_back_a_lost_commits_claims(
        sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch) -> None:
    # PostgreSQL fails again while the loop gives back what the lost commit claimed: the
    # loop raises (its heartbeat stops, so the reaper returns them), never runs on beating.
    _ranked(sm, 6)
    sm.register_worker("w1")

    def still_down(*args: Any, **kwargs: Any) -> Any:
        raise toolkit.StorageUnavailable("PostgreSQL went away again")

    monkeypatch.setattr(sm._dispatch, "return_unstarted", still_down)
    dropped = _lose_reply_of("complete and dequeue many")
    try:
        with pytest.raises(toolkit.StorageUnavailable, match="again"):
            sm.run_worker("w1", lambda job: None, batch=2, idle_timeout=0)
    finally:
        failpoints.disarm("after_commit")
    assert dropped
