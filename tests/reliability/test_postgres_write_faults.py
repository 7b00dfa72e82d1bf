"""PostgreSQL refuses a write half-way: statement timeout, serialization failure (issue 17, item 5).

Injected for real on the shared PostgreSQL, in this run's schema: the
manager's sessions get ``statement_timeout`` (and, for the conflicts,
``default_transaction_isolation=serializable``) through the URL's libpq
``options``; another connection holds a lock on ``job_events`` (so the
timeout strikes at the last statement of a multi-statement write, after the
workflow and job rows went in) or commits a concurrent update of the row
the manager is changing. Checked: a ``StorageUnavailable`` that says what
happened and that nothing was written, PostgreSQL, Redis and memory exactly
as before; a serialization failure is run again (the transaction was rolled
back whole) and the write lands once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import redis
from psycopg import sql

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import assert_invariants, everything

TIMEOUT_MS = 300


def _options(**settings: str) -> str:
    return "?options=" + "%20".join(f"-c%20{k}%3D{v}" for k, v in settings.items())


@pytest.fixture
def strict_sm(clean: Servers) -> Iterator[toolkit.StateManager]:
    """A manager whose sessions have a short statement_timeout and SERIALIZABLE transactions."""
    url = clean.database_url + _options(statement_timeout=f"{TIMEOUT_MS}ms",
                                        default_transaction_isolation="serializable")
    sm = toolkit.init_state_manager(url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema, heartbeat_ttl=30.0)
    try:
        yield sm
    finally:
        sm.close()


def _started(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"},
                                                    {"name": "b", "id": "b"}])
    sm.register_worker("w1")
    job = sm.dequeue("w1")
    assert job is not None and job.id == "a"
    sm.start_job("a", worker_id="w1")


def test_a_statement_timeout_mid_write_is_a_clear_error_and_nothing_is_half_applied(
        strict_sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    sm = strict_sm
    _started(sm)
    before = everything(sm, clean)
    holder = psycopg.connect(clean.libpq_url)
    try:  # another session blocks every insert into job_events: the last statement of a write
        holder.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
            sql.Identifier(clean.schema, "job_events")))
        holder.execute(sql.SQL("SELECT 1 FROM {} WHERE id = 'wf' FOR UPDATE").format(
            sql.Identifier(clean.schema, "workflows")))
        writes = {
            "create workflow": lambda: sm.create_workflow("x", jobs=[{"name": "c"}] * 1),
            "create job": lambda: sm.create_job("wf", "d"),
            "job -> cancelled": lambda: sm.cancel_job("b"),
            "update workflow": lambda: sm.update_workflow_status("wf", "failed"),
        }
        for action, write in writes.items():
            started = time.monotonic()
            with pytest.raises(toolkit.StorageUnavailable) as info:
                write()
            assert time.monotonic() - started < 5.0
            message = str(info.value)
            assert "statement_timeout" in message and "nothing written" in message, message
            assert action in message, message
    finally:
        holder.rollback()
        holder.close()
    assert everything(sm, clean) == before
    assert_invariants(sm, raw_redis, clean.libpq_url)
    sm.create_job("wf", "d", depends_on=["a"])  # the same writes go through once unblocked
    assert sm.cancel_job("b").status == "cancelled"
    assert_invariants(sm, raw_redis, clean.libpq_url)


def _concurrent_update(clean: Servers, job_id: str, commit_after: float) -> threading.Thread:
    """Another session updates ``job_id`` and commits after ``commit_after`` seconds."""
    ready = threading.Event()

    def run() -> None:
        with psycopg.connect(clean.libpq_url) as conn:
            conn.execute(sql.SQL("UPDATE {} SET priority = priority WHERE id = %s").format(
                sql.Identifier(clean.schema, "jobs")), (job_id,))
            ready.set()
            time.sleep(commit_after)
            conn.commit()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    return thread


def test_a_serialization_failure_is_run_again_and_the_write_lands_once(
        strict_sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis,
        caplog: pytest.LogCaptureFixture) -> None:
    sm = strict_sm
    _started(sm)
    caplog.set_level(logging.INFO)
    writer = _concurrent_update(clean, "b", commit_after=0.1)
    cancelled = sm.cancel_job("b")  # blocks on the row, then 40001 when the other commits
    writer.join(5)
    assert cancelled.status == "cancelled" and sm.get_job("b") == cancelled
    again = [r for r in caplog.records if "running it again" in r.getMessage()]
    assert again and "could not serialize" in again[0].getMessage()
    with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
        events = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE job_id = 'b' AND "
                                      "event = 'cancelled'").format(
            sql.Identifier(clean.schema, "job_events"))).fetchone()
    assert events == (1,)
    assert_invariants(sm, raw_redis, clean.libpq_url)


def test_a_serialization_failure_past_the_retries_is_a_clear_error_and_changes_nothing(
        strict_sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    sm = strict_sm
    _started(sm)
    sm._pipe.tx_attempts = 1
    before = everything(sm, clean)
    writer = _concurrent_update(clean, "b", commit_after=0.1)
    with pytest.raises(toolkit.StorageUnavailable) as info:
        sm.cancel_job("b")
    writer.join(5)
    assert "serialization conflict" in str(info.value) and "nothing written" in str(info.value)
    assert everything(sm, clean) == before
    assert_invariants(sm, raw_redis, clean.libpq_url)
