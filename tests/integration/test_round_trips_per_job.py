"""PostgreSQL round trips per job on the hot path, pinned (issue 18, "fewer statements per change").

The job's event, its assignment and its workflow's lock (or its move to running) go
in the statement that moves the job, and no roll-up runs where the status cannot
change. Counted from libpq's own trace of the messages sent: a round trip is an
extended-protocol ``Sync`` or a simple ``Query`` (``BEGIN``, ``COMMIT``, ``COPY``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import toolkit


@contextlib.contextmanager
def _traced(sm: toolkit.StateManager) -> Iterator[Counter[str]]:
    """Count what the StateManager's connections send inside the block (fresh connections)."""
    fd, path = tempfile.mkstemp(prefix="pgtrace")
    seen: Counter[str] = Counter()

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.pgconn.trace(fd)
        dbapi_conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS
                                          | psycopg.pq.Trace.REGRESS_MODE)

    for engine in sm.db.engines:
        sa.event.listen(engine, "connect", on_connect)
    sm.db.dispose()
    try:
        yield seen
        sm.db.dispose()  # flushes and stops the traces
    finally:
        for engine in sm.db.engines:
            sa.event.remove(engine, "connect", on_connect)
        os.close(fd)
        with open(path, encoding="utf-8", errors="replace") as f:
            _count(f, seen)
        os.unlink(path)


def _count(trace: Any, seen: Counter[str]) -> None:
    """Count round trips in a libpq trace. A ``Parse`` synced without a ``Bind`` is psycopg
    preparing a statement on the server (once per statement and connection, after it ran
    PREPARE_THRESHOLD times): counted as ``prepares``, not as a round trip of the job."""
    parse_only = False
    for line in trace:
        parts = line.rstrip("\n").split("\t")
        if len(parts) <= 2 or parts[0] != "F":
            continue
        message = parts[2].split(" ")[0]
        if message == "Parse" and len(parts) > 3:  # a transaction command sent unprepared
            command = parts[3].strip().split(" ")[1].strip('"') if " " in parts[3].strip() else ""
            if command in ("BEGIN", "COMMIT"):
                seen[command] += 1
        if message in ("Parse", "Bind"):
            parse_only = message == "Parse"
        elif message == "Sync" and parse_only:
            seen["prepares"] += 1
            parse_only = False
        elif message in ("Sync", "Query"):
            seen["round trips"] += 1
            if message == "Query":
                seen[parts[3].strip().strip('"').split()[0].upper()] += 1


def _running_workflow(sm: toolkit.StateManager, n: int) -> str:
    """A worker, and ``n`` queued jobs in a workflow already running (one job claimed and done)."""
    w = sm.register_worker("w").id
    sm.create_workflow("wf", jobs=[{"name": f"j{i}"} for i in range(n + 1)])
    first = sm.dequeue(w, start=True)
    assert first is not None
    sm.complete_job(first.id)
    return w


def test_the_fused_verb_costs_two_round_trips_per_job(sm: toolkit.StateManager) -> None:
    w = _running_workflow(sm, 12)
    job = sm.dequeue(w, start=True)
    assert job is not None
    with _traced(sm) as seen:
        for _ in range(10):
            done, job = sm.complete_and_dequeue(job.id, {"ok": True}, worker_id=w, start=True)
            assert done.status is toolkit.JobStatus.COMPLETED and job is not None
    # BEGIN, claim (+ assignment, events), complete (+ assignment, event, lock) and release
    # in one round trip, then COMMIT; no roll-up (the workflow keeps a job in hand) and no
    # event INSERT.
    assert seen["round trips"] == 10 * 2, seen
    assert (seen["BEGIN"], seen["COMMIT"], seen["COPY"]) == (10, 10, 0), seen


def test_single_claims_commit_by_themselves(sm: toolkit.StateManager) -> None:
    w = _running_workflow(sm, 20)
    with _traced(sm) as seen:
        for start in (False, True) * 5:
            assert sm.dequeue(w, start=start) is not None
    assert seen["round trips"] == 10, seen  # one statement each, no BEGIN/COMMIT
    assert seen["BEGIN"] == 0, seen


def test_a_batch_of_100_costs_four_round_trips(sm: toolkit.StateManager, raw_pg: psycopg.Connection,
                                              clean: Any) -> None:
    w = _running_workflow(sm, 100)
    with _traced(sm) as seen:
        got = sm.dequeue_many(w, 100, start=True)
        assert len(got) == 100
    assert seen["round trips"] == 1, seen  # one statement: claims, assignments, events
    with _traced(sm) as seen:
        out = sm.complete_jobs([(j.id, None) for j in got], worker_id=w)
        assert all(isinstance(o, toolkit.Job) for o in out)
    # BEGIN, complete (+ assignments, events, locks) and release in one round trip, roll-up
    # (the workflow is now done), COMMIT: no COPY of events.
    assert seen["round trips"] == 3, seen
    assert (seen["BEGIN"], seen["COMMIT"]) == (1, 1), seen
    assert seen["COPY"] == 0, seen
    assert sm.get_workflow(got[0].workflow_id).status is toolkit.WorkflowStatus.COMPLETED  # type: ignore[union-attr]
    q = sql.SQL("SELECT event, count(*) FROM {} GROUP BY event").format(
        sql.Identifier(clean.schema, "job_events"))
    counts = dict(raw_pg.execute(q).fetchall())
    assert counts == {"created": 101, "queued": 101, "assigned": 101, "started": 101,
                      "completed": 101}


def test_a_requeued_failure_in_a_running_workflow_skips_the_roll_up(sm: toolkit.StateManager) -> None:
    w = _running_workflow(sm, 4)
    got = sm.dequeue_many(w, 4, start=True)
    with _traced(sm) as seen:
        out = sm.fail_jobs([(j.id, "boom") for j in got], worker_id=w, retry_in=0)
        assert all(isinstance(o, toolkit.Job) and o.status is toolkit.JobStatus.QUEUED for o in out)
    # Fail (+ assignments, events, locks) with the BEGIN, retry times, COMMIT.
    assert seen["round trips"] == 3, seen
    assert sm.get_workflow(got[0].workflow_id).status is toolkit.WorkflowStatus.RUNNING  # type: ignore[union-attr]


@pytest.mark.parametrize("final", [False, True])
def test_a_failure_for_good_still_rolls_the_workflow_up(sm: toolkit.StateManager, final: bool) -> None:
    w = sm.register_worker("w").id
    wf = sm.create_workflow("wf", jobs=[{"name": "only", "max_attempts": 1 if final else 2}])
    job = sm.dequeue(w, start=True)
    assert job is not None
    sm.fail_jobs([(job.id, "boom")], worker_id=w, retry_in=0)
    want = toolkit.WorkflowStatus.FAILED if final else toolkit.WorkflowStatus.RUNNING
    assert sm.get_workflow(wf.id).status is want  # type: ignore[union-attr]


def test_single_completions_and_requeued_failures(sm: toolkit.StateManager) -> None:
    w = _running_workflow(sm, 6)
    jobs = [sm.dequeue(w, start=True) for _ in range(6)]
    with _traced(sm) as seen:
        for job in jobs[:3]:
            sm.complete_job(job.id, worker_id=w, attempt=job.attempts)  # type: ignore[union-attr]
    # BEGIN, complete (+ assignment, event, lock) and release in one round trip, roll-up,
    # COMMIT.
    assert seen["round trips"] == 3 * 3, seen
    assert (seen["BEGIN"], seen["COMMIT"]) == (3, 3), seen
    with _traced(sm) as seen:
        for job in jobs[3:]:
            again = sm.fail_job(job.id, "boom", retry_in=0)  # type: ignore[union-attr]
            assert again.status is toolkit.JobStatus.QUEUED
    # Lock and read the job's budget with the BEGIN, fail (+ assignment, events, lock),
    # COMMIT: the workflow stays running, no roll-up.
    assert seen["round trips"] == 3 * 3, seen


def test_a_fused_batch_of_100_costs_two_round_trips(sm: toolkit.StateManager) -> None:
    w = _running_workflow(sm, 300)
    got = sm.dequeue_many(w, 100, start=True)
    with _traced(sm) as seen:
        for _ in range(2):
            out, got = sm.complete_and_dequeue_many([(j.id, None) for j in got], 100,
                                                    worker_id=w, start=True)
            assert all(isinstance(o, toolkit.Job) for o in out) and len(got) == 100
    # Per batch: BEGIN, claim (+ assignments, events), complete (+ assignments, events, locks)
    # and release in one round trip, then COMMIT; no roll-up (the workflow has jobs in hand).
    assert seen["round trips"] == 2 * 2, seen
    assert (seen["BEGIN"], seen["COMMIT"], seen["COPY"]) == (2, 2, 0), seen


def test_run_worker_commits_once_per_batch(sm: toolkit.StateManager) -> None:
    w = _running_workflow(sm, 300)
    with _traced(sm) as seen:
        report = sm.run_worker(w, lambda job: None, batch=100, idle_timeout=0)
    assert report.completed == 300
    # The first claim is one statement; then each batch's completions and the next claim go
    # in one round trip with the BEGIN, then the COMMIT; the last batch, which claims
    # nothing, rolls the workflow up: 1 + 3 * 2 + 1. Completing and claiming apart took 12
    # (each completion 3 with its roll-up, each later claim 1).
    assert seen["round trips"] == 8, seen
    assert (seen["BEGIN"], seen["COMMIT"]) == (3, 3), seen
