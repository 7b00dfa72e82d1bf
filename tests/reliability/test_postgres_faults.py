"""PostgreSQL stopped, a backend killed mid-transaction, and servers that never answer.

Issue 7, cases 8, 9 and 10.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
import redis

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import Private, assert_invariants, queue_census, silent_server
from toolkit.tiers.memory import KINDS
from toolkit.tiers.redis import keys

WRITE_BOUND_S = 10.0


def _redis_dump(url: str, namespace: str) -> dict[bytes, bytes]:
    """Every key of the namespace with its serialized value (DUMP), for exact comparison."""
    client = redis.Redis.from_url(url)
    try:
        names = sorted(client.scan_iter(match=keys.namespace_pattern(namespace), count=1000))
        # Heartbeat bookkeeping is written by design on every heartbeat; nothing here beats.
        # The applied watermark is refreshed every second by design (not a write of state).
        return {k: client.dump(k) for k in names if k != keys.applied(namespace).encode()}
    finally:
        client.close()


def _memory(sm: toolkit.StateManager) -> dict[str, Any]:
    return {kind: sorted((e.id, e) for e in sm.memory.all(kind)) for kind in KINDS}


def test_postgres_stopped_writes_fail_fast_and_change_nothing(private: Private) -> None:
    sm = private.manager()
    try:
        wf = sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}, {"name": "b", "id": "b"}])
        sm.register_worker("w1")
        sm.dequeue("w1")  # a is assigned, b stays queued
        wf = sm.get_workflow(wf.id)  # rolled up to running by the assignment
        assert wf is not None and wf.status == "running"
        redis_before = _redis_dump(private.redis_url, private.namespace)
        memory_before = _memory(sm)
        private.stack.stop_postgres()

        writes = {
            "create_workflow": lambda: sm.create_workflow("x", jobs=[{"name": "c"}]),
            "create_job": lambda: sm.create_job(wf.id, "d"),
            "dequeue": lambda: sm.dequeue("w1"),
            "start_job": lambda: sm.start_job("a"),
            "cancel_job": lambda: sm.cancel_job("b"),
            "register_worker": lambda: sm.register_worker("w2"),
            "cancel_workflow": lambda: sm.cancel_workflow(wf.id),
            "delete_workflow": lambda: sm.delete_workflow(wf.id),
        }
        for name, write in writes.items():
            started = time.monotonic()
            with pytest.raises(toolkit.StorageUnavailable) as info:
                write()
            took = time.monotonic() - started
            assert took < WRITE_BOUND_S, f"{name} took {took:.1f}s"
            assert "PostgreSQL" in str(info.value) and str(private.stack.pg_port) in str(info.value)
        assert _redis_dump(private.redis_url, private.namespace) == redis_before
        assert _memory(sm) == memory_before

        # Cached reads keep answering: memory, and Redis when memory misses.
        assert sm.get_workflow(wf.id) == wf
        assert sm.get_job("a").status == "assigned"
        sm.memory.drop("job", "b")
        assert sm.get_job("b").status == "queued"

        private.stack.start_postgres()
        again = sm.create_workflow("after", jobs=[{"name": "c", "id": "c"}])
        assert sm.get_workflow(again.id) == again
        raw = private.raw_redis()
        try:
            assert_invariants(sm, raw, private.libpq_url)
            assert queue_census(raw, private.namespace) == {"b": 1, "c": 1}
        finally:
            raw.close()
    finally:
        sm.close()


def test_backend_terminated_mid_create_workflow_leaves_no_trace(sm: toolkit.StateManager,
                                                               clean: Servers, raw_redis) -> None:
    jobs = [{"name": f"j{i:03d}", "id": f"big-{i:03d}", "priority": i % 7} for i in range(100)]
    table = psycopg.sql.Identifier(clean.schema, "jobs")
    outcome: dict[str, BaseException | None] = {}
    with psycopg.connect(clean.libpq_url) as locker, \
            psycopg.connect(clean.libpq_url, autocommit=True) as admin:
        locker.execute(psycopg.sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(table))
        locker_pid = locker.info.backend_pid

        def create() -> None:
            try:
                sm.create_workflow("big", jobs=jobs, workflow_id="big")
                outcome["error"] = None
            except BaseException as exc:
                outcome["error"] = exc

        thread = threading.Thread(target=create, daemon=True)
        thread.start()
        victim = None
        deadline = time.monotonic() + 10
        while victim is None and time.monotonic() < deadline:
            row = admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'toolkit' "
                "AND %s = ANY(pg_blocking_pids(pid))", (locker_pid,)).fetchone()
            victim = row[0] if row else None
            time.sleep(0.05)
        assert victim is not None, "the create_workflow transaction never blocked on the lock"
        assert admin.execute("SELECT pg_terminate_backend(%s)", (victim,)).fetchone()[0]
        locker.rollback()
        thread.join(15)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], toolkit.StorageUnavailable), outcome

    # No trace in any tier.
    with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
        for name in ("workflows", "jobs"):
            n = conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(
                psycopg.sql.Identifier(clean.schema, name))).fetchone()[0]
            assert n == 0, f"{n} rows left in {name}"
    assert not list(raw_redis.scan_iter(match=keys.entity_pattern(clean.namespace, "workflow")))
    assert not list(raw_redis.scan_iter(match=keys.entity_pattern(clean.namespace, "job")))
    assert not queue_census(raw_redis, clean.namespace)
    assert sm.memory.get("workflow", "big") is None and sm.get_workflow("big") is None

    # The next call succeeds on a new connection.
    wf = sm.create_workflow("big", jobs=jobs, workflow_id="big")
    assert wf.id == "big" and len(sm.list_jobs(workflow_id="big")) == 100
    assert sum(queue_census(raw_redis, clean.namespace).values()) == 100
    assert_invariants(sm, raw_redis, clean.libpq_url)


@pytest.mark.parametrize("which", ["postgresql", "redis"])
def test_silent_server_fails_init_in_bounded_time_naming_host_and_port(clean: Servers,
                                                                       which: str) -> None:
    with silent_server() as port:
        if which == "postgresql":
            db, rd = f"postgresql://postgres@127.0.0.1:{port}/test", clean.redis_url
        else:
            db, rd = clean.database_url, f"redis://127.0.0.1:{port}/0"
        started = time.monotonic()
        with pytest.raises(toolkit.StorageUnavailable) as info:
            toolkit.init_state_manager(db, rd, namespace=clean.namespace, schema=clean.schema)
        took = time.monotonic() - started
    assert took < 20, f"init_state_manager hung {took:.1f}s on a silent {which}"
    assert f"127.0.0.1:{port}" in str(info.value)
