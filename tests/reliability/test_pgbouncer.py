"""The state layer through PgBouncer in transaction pooling mode.

Issue 7, "PgBouncer". A stock PgBouncer (``pool_mode = transaction``, a small
server pool, no ``ignore_startup_parameters``) in front of the private
PostgreSQL: every transaction may land on a different server connection, so
anything session-scoped (prepared statements, SET, LISTEN, session advisory
locks, WITH HOLD cursors) breaks. psycopg prepares a statement on the server
after it has run ``prepare_threshold`` (5) times on one client connection; through a
transaction pooler that prepared statement is missing (or a different one) on the
next server connection.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import toolkit
from tests.reliability import servers
from tests.reliability.conftest import Private, assert_invariants, assert_rebuild_loaded_everything

# PgBouncer is not on PyPI: left out of `make test`, run by `make test-system`.
pytestmark = pytest.mark.system("pgbouncer")


@pytest.fixture
def role(private: Private) -> Iterator[str]:
    """A login role whose sessions start in a non-UTC time zone (dropped at the end)."""
    name = f"tk_bnc_{uuid.uuid4().hex[:10]}"
    ident = sql.Identifier(name)
    with psycopg.connect(private.libpq_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(ident))
        conn.execute(sql.SQL("GRANT CREATE ON DATABASE postgres TO {}").format(ident))
        conn.execute(sql.SQL("ALTER ROLE {} SET timezone = 'Asia/Kolkata'").format(ident))
    try:
        yield name
    finally:
        with psycopg.connect(private.libpq_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {} CASCADE").format(ident))
            conn.execute(sql.SQL("DROP ROLE {}").format(ident))


@pytest.fixture
def bouncer(private: Private, role: str) -> Iterator[servers.Bouncer]:
    with servers.pgbouncer(private.stack.pg_port, users=("postgres", role)) as b:
        yield b


def _manager(private: Private, url: str, **kwargs: object) -> toolkit.StateManager:
    return toolkit.init_state_manager(url, private.redis_url, namespace=private.namespace,
                                      schema=private.schema, heartbeat_ttl=2.0, **kwargs)  # type: ignore[arg-type]


def test_state_layer_works_through_pgbouncer_transaction_mode(
        private: Private, bouncer: servers.Bouncer, role: str, tmp_path: Path) -> None:
    url = bouncer.url(role, "postgres")
    # The schema is created through the pooler too (one transaction, advisory xact lock).
    with _manager(private, url) as sm:
        sm.register_worker("w1", queues=["default", "b"])
        sm.register_worker("w2", queues=["default", "b"])
        # Many round trips of the same statements on the pooled connections: well past
        # psycopg's prepare_threshold, so automatic server-side prepares happen.
        wfs = [sm.create_workflow(f"wf{i}", jobs=[
            {"name": "a", "priority": i % 3}, {"name": "b", "depends_on": ["a"], "queue": "b"}])
            for i in range(12)]
        done = 0
        errors: list[BaseException] = []

        def work(worker: str) -> None:
            nonlocal done
            try:
                while True:
                    job = sm.dequeue(worker)
                    if job is None:
                        return
                    sm.start_job(job.id)
                    sm.complete_job(job.id, {"by": worker})
                    done += 1
                    sm.heartbeat(worker)
                    sm.incr_metric("through_bouncer")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(w,)) for w in ("w1", "w2")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert done == 24
        assert all(sm.get_workflow(w.id).status == "completed" for w in wfs)
        # The fused and batched verbs: not pipelined through a pooler (statements one by one
        # after an explicit BEGIN on an autocommit connection), the same outcome.
        fused = sm.create_workflow("fused", jobs=[{"name": f"f{i}"} for i in range(10)])
        job = sm.dequeue("w1", start=True)
        while job is not None:
            _, job = sm.complete_and_dequeue(job.id, {"fused": True}, worker_id="w1", start=True)
        batched = sm.create_workflow("batched", jobs=[{"name": f"b{i}"} for i in range(10)])
        got = sm.dequeue_many("w2", 10, start=True)
        assert all(isinstance(o, toolkit.Job) for o in sm.complete_jobs(
            [(j.id, None) for j in got], worker_id="w2"))
        for wf in (fused, batched):
            assert sm.get_workflow(wf.id).status == "completed"  # type: ignore[union-attr]
            assert {j.status for j in sm.list_jobs(workflow_id=wf.id)} == {"completed"}
        # Failures open their transaction the same way: retried, then failed for good.
        failing = sm.create_workflow("failing", jobs=[{"name": f"x{i}", "max_attempts": 2}
                                                      for i in range(3)])
        got = sm.dequeue_many("w2", 3, start=True)
        assert [o.status for o in sm.fail_jobs(  # type: ignore[union-attr]
            [(j.id, "boom") for j in got], worker_id="w2", retry_in=0)] == ["queued"] * 3
        for _ in range(3):
            job = sm.dequeue("w1", start=True)
            assert job is not None and job.workflow_id == failing.id
            assert sm.fail_job(job.id, "again", worker_id="w1").status == "failed"
        assert sm.get_workflow(failing.id).status == "failed"  # type: ignore[union-attr]
        extra = sm.create_workflow("left", jobs=[{"name": f"q{i}"} for i in range(30)])
        sm.checkpoint_metrics()
        with sm.lock("bounced", ttl=10) as lock:
            assert lock.fencing_token >= 1
        # Rebuild: server-side cursors inside one transaction through the pooler.
        report = sm.rebuild()
        assert_rebuild_loaded_everything(report, private.libpq_url, sm.settings.schema)
        assert_invariants(sm, private.raw_redis(), private.libpq_url)
        assert sm.check_consistency().ok
        ins = sm.inspector
        assert len(ins.jobs(workflow_id=extra.id)) == 30
        assert len(ins.queue()) == 30
        for frame in (ins.workflows, ins.workers, ins.assignments, ins.locks, ins.metrics,
                      ins.metric_series, ins.tiers, ins.summary, ins.events, ins.heartbeat_gaps,
                      ins.wait_times):
            frame()
        assert ins.snapshot(tmp_path / "snap").exists()
        assert sm.get_metric("through_bouncer") == 24
        # Nothing session-wide is set through the pooler (a SET would stay on a server
        # connection other clients share): the server's own choice of plans, in both pools.
        for engine in sm._pipe.db.engines:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW plan_cache_mode").scalar_one() == "auto"
    # A second coordinator through the pooler rebuilds the same state.
    with _manager(private, url) as again:
        rebuilt = again.list_jobs(status="queued")
        assert len(rebuilt) == 30
        # Read back from PostgreSQL by the rebuild: UTC whatever the server session's zone.
        assert all(j.created_at.utcoffset() == timedelta(0) for j in rebuilt), rebuilt[0].created_at
        assert again.check_consistency().ok
        again.delete_workflow(extra.id)
        assert again.check_consistency().ok


def test_two_coordinators_share_one_small_pool(private: Private, bouncer: servers.Bouncer) -> None:
    """Two managers, 4 threads each, through a 10-connection server pool: no job handed out twice."""
    url = bouncer.url("postgres", "postgres")
    with _manager(private, url) as one, _manager(private, url) as two:
        one.create_workflow("many", jobs=[{"name": f"j{i}"} for i in range(60)])
        for sm in (one, two):
            for w in range(4):
                sm.register_worker(f"{id(sm)}-{w}")
        got: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def drain(sm: toolkit.StateManager, worker: str) -> None:
            try:
                while (job := sm.dequeue(worker)) is not None:
                    sm.start_job(job.id)
                    sm.complete_job(job.id)
                    with lock:
                        got.append(job.id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=drain, args=(sm, f"{id(sm)}-{w}"))
                   for sm in (one, two) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert len(got) == len(set(got)) == 60
        assert one.check_consistency().ok
