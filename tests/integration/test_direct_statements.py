"""The hot statements run on psycopg's own cursor (``tiers/postgres/direct.py``), issue 18 item 4.

The job loop's statements (claim, start, complete, fail, release, roll-up, read by id,
guarded update, job move) are Core compiled once per schema and run without SQLAlchemy's
per-call execution path. These tests pin that they do, that the compiled text follows each
connection's schema, and that a driver error on that path is still the toolkit's error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa

import toolkit
from tests.conftest import Servers, drop_schema, unique, wipe_namespace


@contextlib.contextmanager
def _through_sqlalchemy(sm: toolkit.StateManager) -> Iterator[list[str]]:
    """The statements the StateManager's engine runs through ``Connection.execute`` meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split())[:80])

    sa.event.listen(sm.db.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(sm.db.engine, "before_cursor_execute", record)


def test_the_job_loops_run_no_statement_through_sqlalchemy(sm: toolkit.StateManager) -> None:
    w = sm.register_worker("w").id
    sm.create_workflow("wf", jobs=[{"name": f"j{i}", "max_attempts": 2} for i in range(40)])
    with _through_sqlalchemy(sm) as seen:
        for _ in range(5):  # the plain loop
            job = sm.dequeue(w)
            assert job is not None
            sm.start_job(job.id, worker_id=w, attempt=job.attempts)
            sm.complete_job(job.id, {"ok": True}, worker_id=w, attempt=job.attempts)
        job = sm.dequeue(w, start=True)  # the fused loop
        for _ in range(5):
            assert job is not None
            _, job = sm.complete_and_dequeue(job.id, None, worker_id=w, start=True)
        assert job is not None
        sm.fail_job(job.id, "boom", worker_id=w, retry_in=0)  # a failure re-queued
        got = sm.dequeue_many(w, 10, start=True)  # batches
        sm.complete_jobs([(j.id, None) for j in got[:5]], worker_id=w)
        sm.fail_jobs([(j.id, "x") for j in got[5:]], worker_id=w, retry=False)
    assert seen == [], f"{len(seen)} statement(s) took SQLAlchemy's execute path: {seen}"
    statuses = sorted(j.status.value for j in sm.list_jobs())
    assert statuses.count("completed") == 15 and statuses.count("failed") == 5


def test_one_statement_follows_each_connections_schema(sm: toolkit.StateManager,
                                                       clean: Servers) -> None:
    other_schema, other_ns = unique("tk_direct"), unique("tk_direct")
    other = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=other_ns,
                                       schema=other_schema, heartbeat_ttl=2.0)
    try:
        for manager, name in ((sm, "here"), (other, "there")):
            manager.register_worker("w")
            manager.create_workflow(name, jobs=[{"name": name}])
        for manager in (sm, other, sm, other):  # the same compiled statements, alternating
            job = manager.dequeue("w", start=True)
            if job is not None:
                manager.complete_job(job.id, {"by": manager.settings.schema}, worker_id="w")
        for manager, name in ((sm, "here"), (other, "there")):
            (job,) = manager.list_jobs()
            assert (job.name, job.status, job.result) == (
                name, toolkit.JobStatus.COMPLETED, {"by": manager.settings.schema})
    finally:
        other.close()
        drop_schema(clean.libpq_url, other_schema)
        wipe_namespace(clean.redis_url, other_ns)


def _backend_pids(sm: toolkit.StateManager) -> list[int]:
    """The server pids of every connection in the StateManager's pool."""
    pool = sm.db.engine.pool
    held = [sm.db.engine.connect() for _ in range(max(1, pool.checkedin()))]  # type: ignore[attr-defined]
    try:
        return [int(c.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()) for c in held]
    finally:
        for c in held:
            c.close()


def test_a_connection_lost_under_a_direct_statement_is_a_toolkit_error(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection) -> None:
    w = sm.register_worker("w").id
    sm.create_workflow("wf", jobs=[{"name": "j"}])
    job = sm.dequeue(w, start=True)
    assert job is not None
    job_id = job.id

    def complete() -> toolkit.Job:
        return sm.complete_job(job_id, None, worker_id=w)

    for pid in _backend_pids(sm):
        raw_pg.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(toolkit.StorageUnavailable, match="complete"):
        complete()  # the pool trusts a connection used this recently: the statement meets the loss
    assert sm.get_job(job_id).status is toolkit.JobStatus.RUNNING  # nothing written
    assert complete().status is toolkit.JobStatus.COMPLETED  # the pool reconnected
