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
from toolkit import config
from toolkit.tiers.postgres import db, direct
from toolkit.tiers.postgres import tables as t


@contextlib.contextmanager
def _through_sqlalchemy(sm: toolkit.StateManager) -> Iterator[list[str]]:
    """The statements the StateManager's engine runs through ``Connection.execute`` meanwhile."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        seen.append(" ".join(statement.split())[:80])

    for engine in sm.db.engines:
        sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        for engine in sm.db.engines:
            sa.event.remove(engine, "before_cursor_execute", record)


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
    """The server pids of every connection in the StateManager's pools."""
    held = [e.connect() for e in sm.db.engines
            for _ in range(max(1, e.pool.checkedin()))]  # type: ignore[attr-defined]
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
    opened: list[object] = []

    def on_connect(*_: object) -> None:
        opened.append(1)

    for engine in sm.db.engines:
        sa.event.listen(engine, "connect", on_connect)
    try:
        with pytest.raises(toolkit.StorageUnavailable, match="complete") as caught:
            complete()  # the pool trusts a connection used this recently: it meets the loss
    finally:
        for engine in sm.db.engines:
            sa.event.remove(engine, "connect", on_connect)
    # The failed write's clean-up did not dial the server again (a second wait in an outage),
    # and the error is the loss itself, not a follow-up of it.
    assert opened == [], "the error path opened a new connection"
    assert "PendingRollback" not in str(caught.value)
    assert sm.get_job(job_id).status is toolkit.JobStatus.RUNNING  # nothing written
    assert complete().status is toolkit.JobStatus.COMPLETED  # the pool reconnected


@contextlib.contextmanager
def _manager(clean: Servers, monkeypatch: pytest.MonkeyPatch, prepare: str
             ) -> Iterator[toolkit.StateManager]:
    monkeypatch.setenv(config.PG_PREPARE_VAR, prepare)
    schema, ns = unique("tk_explicit"), unique("tk_explicit")
    manager = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=ns,
                                         schema=schema, heartbeat_ttl=2.0)
    try:
        yield manager
    finally:
        manager.close()
        drop_schema(clean.libpq_url, schema)
        wipe_namespace(clean.redis_url, ns)


@pytest.mark.parametrize("prepare", ["on", "off"])
def test_a_transaction_opened_by_its_first_statements_is_all_or_nothing(
        clean: Servers, monkeypatch: pytest.MonkeyPatch, prepare: str) -> None:
    """``direct.explicit`` + ``pipelined``: BEGIN goes with the first statements (pipelined
    where statements are prepared, one by one with ``TOOLKIT_PG_PREPARE=off``); a failing
    statement rolls back the ones before it, and the error is the toolkit's."""
    with _manager(clean, monkeypatch, prepare) as sm:
        with sm.db.engine.connect() as conn:
            assert db.may_pipeline(conn.connection.driver_connection) is (prepare == "on")
        wf = sm.create_workflow("wf", jobs=[{"name": "j"}])
        (job,) = sm.list_jobs()
        rename = sa.update(t.jobs).where(t.jobs.c.id == job.id).values(name="renamed")
        again = sa.insert(t.workflows).from_select(  # the same workflow twice
            list(t.workflows.c.keys()), sa.select(t.workflows).where(t.workflows.c.id == wf.id))

        def ok(conn: sa.Connection, _ch: Any) -> None:
            direct.pipelined(conn, [(rename, {}), (sa.select(t.jobs.c.name), {})])

        def failing(conn: sa.Connection, _ch: Any) -> None:
            direct.pipelined(conn, [(rename.values(name="lost"), {}), (again, {})])

        with pytest.raises(toolkit.ValidationError, match="pk_workflows"):
            sm._pipe.write("test", failing, opens=True)
        assert _name(sm, job.id) == "j"  # the first statement was rolled back with the second
        sm._pipe.write("test", ok, opens=True)
        assert _name(sm, job.id) == "renamed"  # committed

        def sqlalchemy_first(conn: sa.Connection, _ch: Any) -> None:
            conn.execute(rename.values(name="autocommitted"))

        with pytest.raises(RuntimeError, match="ran no statement through direct first"):
            sm._pipe.write("test", sqlalchemy_first, opens=True)


def _name(sm: toolkit.StateManager, job_id: str) -> str:
    with sm.db.engine.connect() as conn:
        conn = conn.execution_options(schema_translate_map={None: sm.settings.schema})
        return str(conn.execute(sa.select(t.jobs.c.name).where(t.jobs.c.id == job_id)).scalar_one())


@pytest.mark.parametrize("prepare", ["on", "off"])
def test_the_fused_loop_is_the_same_pipelined_or_not(
        clean: Servers, monkeypatch: pytest.MonkeyPatch, prepare: str) -> None:
    with _manager(clean, monkeypatch, prepare) as sm:
        w = sm.register_worker("w").id
        sm.create_workflow("wf", jobs=[{"name": "a"}, {"name": "b", "depends_on": ["a"]},
                                       {"name": "c", "depends_on": ["b"]}])
        job = sm.dequeue(w, start=True)
        names = []
        while job is not None:
            names.append(job.name)
            done, job = sm.complete_and_dequeue(job.id, {"n": job.name}, worker_id=w, start=True)
            assert done.status is toolkit.JobStatus.COMPLETED
            # The claim goes first: a dependent the completion releases waits for the next call.
            job = job or sm.dequeue(w, start=True)
        assert names == ["a", "b", "c"]  # each released by the one before, in the same round trip
        events = sm.inspector.events()
        queued = events[events["event"] == "queued"]
        assert len(queued) >= 2, events
        assert sm.list_workflows()[0].status is toolkit.WorkflowStatus.COMPLETED


def _idle_connections(sm: toolkit.StateManager) -> list[tuple[bool, str]]:
    """(autocommit, transaction status) of every pooled connection of the autocommit engine."""
    engine = sm.db._autocommit
    held = [engine.connect() for _ in range(max(1, engine.pool.checkedin()))]  # type: ignore[attr-defined]
    try:
        return [(c.connection.driver_connection.autocommit,  # type: ignore[union-attr]
                 psycopg.pq.TransactionStatus(c.connection.driver_connection.pgconn.transaction_status).name)  # type: ignore[union-attr]
                for c in held]
    finally:
        for c in held:
            c.close()


@pytest.mark.parametrize("prepare", ["on", "off"])
def test_a_refused_fused_completion_writes_nothing_and_leaves_the_pool_clean(
        clean: Servers, monkeypatch: pytest.MonkeyPatch, prepare: str) -> None:
    with _manager(clean, monkeypatch, prepare) as sm:
        w = sm.register_worker("w").id
        sm.create_workflow("wf", jobs=[{"name": "a"}, {"name": "b"}])
        job = sm.dequeue(w, start=True)
        assert job is not None
        with pytest.raises(toolkit.StaleAttempt):
            sm.complete_and_dequeue(job.id, None, worker_id=w, attempt=job.attempts + 1,
                                    start=True)
        assert sm.get_job(job.id).status is toolkit.JobStatus.RUNNING  # nothing written
        (other,) = [j for j in sm.list_jobs() if j.id != job.id]
        assert other.status is toolkit.JobStatus.QUEUED  # the claim was rolled back ...
        queued = sm.inspector.queue()
        assert other.id in queued.index and not queued.loc[other.id, "in_flight"]  # queued again
        assert len(direct._pending_begin) == 0
        assert _idle_connections(sm) and all(c == (True, "IDLE") for c in _idle_connections(sm))
        done, nxt = sm.complete_and_dequeue(job.id, None, worker_id=w, start=True)
        assert (done.status, getattr(nxt, "id", None)) == (toolkit.JobStatus.COMPLETED, other.id)
        assert sm.dequeue(w) is None  # a one-statement write after it commits by itself
        assert sm.get_job(other.id).status is toolkit.JobStatus.RUNNING


def test_a_deadlock_in_the_pipeline_runs_the_transaction_again(
        sm: toolkit.StateManager, clean: Servers, raw_pg: psycopg.Connection) -> None:
    """PostgreSQL rolls a deadlocked transaction back whole: the fused verb runs it again."""
    w = sm.register_worker("w").id
    sm.create_workflow("wf", jobs=[{"name": "a"}, {"name": "b"}])
    job = sm.dequeue(w, start=True)
    assert job is not None
    s = psycopg.sql.Identifier(clean.schema)
    raw_pg.execute(psycopg.sql.SQL(
        "CREATE SEQUENCE {s}.once; "
        "CREATE FUNCTION {s}.deadlock_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        "IF nextval({seq}) = 1 THEN RAISE EXCEPTION 'forced' USING ERRCODE = '40P01'; END IF; "
        "RETURN NEW; END $$; "
        "CREATE TRIGGER deadlock_once BEFORE UPDATE ON {s}.jobs FOR EACH ROW "
        "WHEN (NEW.status = 'completed') EXECUTE FUNCTION {s}.deadlock_once()").format(
            s=s, seq=psycopg.sql.Literal(f"{clean.schema}.once")))
    try:
        done, nxt = sm.complete_and_dequeue(job.id, {"ok": 1}, worker_id=w, start=True)
        assert done.status is toolkit.JobStatus.COMPLETED and nxt is not None
        assert raw_pg.execute(psycopg.sql.SQL("SELECT last_value FROM {}.once").format(s)
                              ).fetchone() == (2,)  # refused once, then done
        events = sm.inspector.events()
        assert (events["event"] == "completed").sum() == 1  # the first run left nothing
        assert (events["event"] == "assigned").sum() == 2  # a and b, once each
    finally:
        raw_pg.execute(psycopg.sql.SQL("DROP TRIGGER deadlock_once ON {}.jobs").format(s))


def _release_plans(sm: toolkit.StateManager) -> list[tuple[int, int]]:
    """(generic, custom) plans of the release, for each single-statement connection holding it
    prepared."""
    engine = sm.db._autocommit
    held = [engine.connect() for _ in range(max(1, engine.pool.checkedin()))]  # type: ignore[attr-defined]
    try:
        return [(int(r[0]), int(r[1])) for c in held for r in c.execute(sa.text(
            "SELECT generic_plans, custom_plans FROM pg_prepared_statements "
            "WHERE statement LIKE '%depends_on &&%' AND statement LIKE '%enqueue_seq%'"))]
    finally:
        for c in held:
            c.close()


def test_a_single_completion_releases_on_a_kept_plan(clean: Servers,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-job release takes its job as a scalar, so PostgreSQL keeps its generic plan
    (with the jobs as an array it planned the statement at every run: the generic plan of
    ``= ANY($1)`` expects ten elements). It releases a dependent once all its dependencies
    are completed, and not before."""
    with _manager(clean, monkeypatch, "on") as sm:
        w = sm.register_worker("w").id
        jobs = [{"name": f"{x}{i}", "priority": 1} for x in "ab" for i in range(12)]
        jobs += [{"name": "c", "depends_on": ["a0", "b0"], "priority": 1}]
        jobs += [{"name": f"later{i}"} for i in range(1000)]  # the table a plan is chosen for
        wf = sm.create_workflow("wf", jobs=jobs)
        with sm.db.engine.begin() as conn:
            conn.execute(sa.text(f'ANALYZE "{sm.db.schema}".jobs'))
        c = next(j for j in sm.list_jobs(workflow_id=wf.id) if j.name == "c")
        done: set[str] = set()
        job = sm.dequeue(w, start=True)
        while job is not None and job.name != "c":
            done.add(job.name)
            _, job = sm.complete_and_dequeue(job.id, None, worker_id=w, start=True)
            released = sm.get_job(c.id).status is not toolkit.JobStatus.PENDING
            assert released is ({"a0", "b0"} <= done), (done, sm.get_job(c.id).status)
        assert job is not None and job.name == "c" and len(done) == 24, (job, done)
        plans = _release_plans(sm)
        # psycopg prepares it after PREPARE_THRESHOLD runs on a connection; PostgreSQL tries
        # five custom plans, then keeps the generic one (a second connection, opened by a
        # thread of the manager meanwhile, would split the runs: hence per connection).
        assert plans and all(custom <= 5 for _, custom in plans), plans
        generic = sum(g for g, _ in plans)
        assert generic >= 24 - (db.PREPARE_THRESHOLD + 5) * len(plans) and generic > 0, plans


@pytest.mark.parametrize("prepare", ["on", "off"])
def test_a_commit_the_server_refuses_writes_nothing_and_leaves_the_pool_clean(
        clean: Servers, monkeypatch: pytest.MonkeyPatch, prepare: str) -> None:
    """The COMMIT of an explicit transaction is where a deferred constraint fires: refused
    there, the call raises the toolkit's error, nothing of it stays (the claim neither),
    and the connection goes back to the pool idle."""
    with _manager(clean, monkeypatch, prepare) as sm, psycopg.connect(clean.libpq_url,
                                                                      autocommit=True) as admin:
        schema = psycopg.sql.Identifier(sm.db.schema)
        admin.execute(psycopg.sql.SQL(
            "CREATE FUNCTION {}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF NEW.status = 'completed' AND NEW.name = 'boom' THEN "
            "RAISE EXCEPTION 'refused at commit'; END IF; RETURN NULL; END $$").format(schema))
        admin.execute(psycopg.sql.SQL(
            "CREATE CONSTRAINT TRIGGER refuse AFTER UPDATE ON {}.jobs DEFERRABLE INITIALLY "
            "DEFERRED FOR EACH ROW EXECUTE FUNCTION {}.refuse()").format(schema, schema))
        w = sm.register_worker("w").id
        sm.create_workflow("wf", jobs=[{"name": "boom", "priority": 1}, {"name": "next"}])
        boom = sm.dequeue(w, start=True)
        assert boom is not None and boom.name == "boom"
        with pytest.raises(toolkit.StorageUnavailable, match="refused at commit"):
            sm.complete_and_dequeue(boom.id, None, worker_id=w, start=True)
        assert {j.name: j.status.value for j in sm.list_jobs()} == {"boom": "running",
                                                                    "next": "queued"}
        assert _idle_connections(sm) == [(True, "IDLE")] * len(_idle_connections(sm))
        admin.execute(psycopg.sql.SQL("DROP TRIGGER refuse ON {}.jobs").format(schema))
        done, nxt = sm.complete_and_dequeue(boom.id, None, worker_id=w, start=True)
        assert done.status is toolkit.JobStatus.COMPLETED and nxt is not None
        assert nxt.name == "next"  # the refused call's claim went back to its queue


def test_a_claim_finds_its_jobs_by_id_before_the_table_has_statistics(
        clean: Servers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Right after a bulk create the jobs table has no statistics (autovacuum analyzes it
    later), and a plan made then guessed that few jobs were queued: the claim's generic plan
    read every queued job through the status index and kept the one it wanted, a cost that
    grows with the queue. It finds its jobs by id whatever the statistics."""
    with _manager(clean, monkeypatch, "on") as sm, psycopg.connect(clean.libpq_url,
                                                                      autocommit=True) as admin:
        schema = sm.db.schema
        admin.execute(psycopg.sql.SQL("ALTER TABLE {}.jobs SET (autovacuum_enabled = false)")
                      .format(psycopg.sql.Identifier(schema)))
        w = sm.register_worker("w").id
        sm.create_workflow("wf", jobs=[{"name": f"j{i}"} for i in range(3000)])

        def status_index_reads() -> int:
            with sm.db.autocommit("flush statistics") as conn:  # the claims' connection
                conn.exec_driver_sql("SELECT pg_stat_force_next_flush()")
                conn.exec_driver_sql("SELECT 1")
            admin.execute("SELECT pg_stat_clear_snapshot()")
            row = admin.execute(
                "SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes "
                "WHERE schemaname = %s AND indexrelname = 'ix_jobs_status_workflow_id'",
                (schema,)).fetchone()
            assert row is not None
            return int(row[0])

        before = status_index_reads()
        for _ in range(20):
            assert sm.dequeue(w, start=True) is not None
        read = status_index_reads() - before
        assert read < 100, f"20 claims read {read} index entries by status"


@pytest.mark.parametrize("mode", ["begin", "opens"])
def test_a_transaction_whose_failed_statement_was_swallowed_is_not_taken_as_committed(
        sm: toolkit.StateManager, mode: str) -> None:
    """PostgreSQL answers the COMMIT of a transaction one of whose statements failed with a
    ROLLBACK, and no error: a caller that caught the statement's error would take its
    writes as committed (and on an explicit transaction, SQLAlchemy's own ROLLBACK after the
    error left the later statements to commit one by one). The toolkit refuses the later
    statements and the COMMIT (nothing is written) and raises; the connections go back to
    the pool idle."""
    sm.create_workflow("wf", jobs=[{"name": "j"}])
    (job,) = sm.list_jobs()
    rename = sa.update(t.jobs).where(t.jobs.c.id == job.id).values(name="lost")

    def swallowed(conn: sa.Connection, _ch: Any) -> None:
        direct.rows(conn, rename)
        with contextlib.suppress(sa.exc.DBAPIError, psycopg.Error):
            direct.rows(conn, sa.select(sa.literal(1) / sa.literal(0)))
        with contextlib.suppress(sa.exc.DBAPIError, psycopg.Error):  # must not commit alone
            direct.rows(conn, rename.values(name="committed alone"))
        with contextlib.suppress(sa.exc.DBAPIError, psycopg.Error):  # nor through SQLAlchemy
            conn.execute(rename.values(name="committed alone by SQLAlchemy"))

    with pytest.raises(toolkit.StorageUnavailable, match="rolled back, nothing written"):
        sm._pipe.write("test", swallowed, opens=mode == "opens")
    assert _name(sm, job.id) == "j"
    for engine in sm.db.engines:  # every pooled connection idle, none left in the failed one
        with engine.connect() as conn:
            status = conn.connection.driver_connection.pgconn.transaction_status  # type: ignore[union-attr]
            assert psycopg.pq.TransactionStatus(status).name == "IDLE"
