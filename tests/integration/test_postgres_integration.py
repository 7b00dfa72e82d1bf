"""PostgreSQL tier: CRUD, status updates, assignments, persistence (real PostgreSQL)."""

from __future__ import annotations

import psycopg
import pytest

import toolkit
from toolkit import JobStatus, WorkflowStatus
from toolkit.tiers.postgres import migrate, tables
from toolkit.tiers.postgres.db import Database


def pg_row(raw_pg: psycopg.Connection, schema: str, table: str, row_id: str) -> dict:
    cur = raw_pg.cursor(row_factory=psycopg.rows.dict_row)
    q = psycopg.sql.SQL("SELECT * FROM {} WHERE id = %s").format(psycopg.sql.Identifier(schema, table))
    return cur.execute(q, (row_id,)).fetchone()


def test_workflow_crud_persists_rows(sm: toolkit.StateManager, raw_pg, clean) -> None:
    wf = sm.create_workflow("nightly", metadata={"owner": "ops"}, workflow_id="wf-1")
    row = pg_row(raw_pg, clean.schema, "workflows", "wf-1")
    assert row["name"] == "nightly" and row["metadata"] == {"owner": "ops"}
    assert row["status"] == "pending" and row["version"] == 1
    assert wf.created_at.tzinfo is not None and wf.created_at.utcoffset().total_seconds() == 0
    assert [w.id for w in sm.list_workflows()] == ["wf-1"]
    assert sm.list_workflows(status="running") == []


def test_workflow_status_update_bumps_version(sm: toolkit.StateManager, raw_pg, clean) -> None:
    sm.create_workflow("w", workflow_id="wf-2")
    updated = sm.update_workflow_status("wf-2", "running")
    assert updated.status is WorkflowStatus.RUNNING and updated.version == 2
    assert pg_row(raw_pg, clean.schema, "workflows", "wf-2")["version"] == 2
    with pytest.raises(toolkit.InvalidTransition) as info:
        sm.update_workflow_status("wf-2", "pending")
    assert info.value.current == "running" and info.value.requested == "pending"


def test_job_crud_and_status_rows(sm: toolkit.StateManager, raw_pg, clean) -> None:
    sm.create_workflow("w", workflow_id="wf")
    job = sm.create_job("wf", "extract", priority=3, queue="io", payload={"n": 1}, job_id="j1")
    assert job.status is JobStatus.QUEUED and job.queue == "io"
    row = pg_row(raw_pg, clean.schema, "jobs", "j1")
    assert row["payload"] == {"n": 1} and row["priority"] == 3 and row["enqueue_seq"] is not None
    sm.register_worker("w1", queues=["io"])
    assignment = sm.assign_job("j1", "w1")
    assert assignment.status == "active" and assignment.attempt == 1
    row = pg_row(raw_pg, clean.schema, "jobs", "j1")
    assert row["status"] == "assigned" and row["worker_id"] == "w1" and row["attempts"] == 1
    sm.start_job("j1")
    done = sm.complete_job("j1", {"rows": 10})
    row = pg_row(raw_pg, clean.schema, "jobs", "j1")
    assert row["status"] == "completed" and row["result"] == {"rows": 10}
    assert done.finished_at is not None and done.started_at is not None
    assert [j.id for j in sm.list_jobs(worker_id="w1")] == ["j1"]
    assert sm.list_jobs(status="queued") == []


def test_worker_crud_and_listing(sm: toolkit.StateManager, raw_pg, clean) -> None:
    sm.register_worker("a", hostname="host-a", queues=["q1", "q2"], capacity=4, metadata={"v": 1})
    sm.register_worker("b")
    row = pg_row(raw_pg, clean.schema, "workers", "a")
    assert row["queues"] == ["q1", "q2"] and row["capacity"] == 4 and row["hostname"] == "host-a"
    assert [w.id for w in sm.list_workers()] == ["a", "b"]
    sm.deregister_worker("b")
    assert [w.id for w in sm.list_workers(status="inactive")] == ["b"]
    again = sm.register_worker("b", queues=["q3"])
    assert again.status == "active" and again.queues == ("q3",) and again.version > 1


def test_assignment_tracking_keeps_every_attempt(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "x", "id": "jx", "max_attempts": 2}])
    sm.register_worker("w1")
    sm.dequeue("w1")
    sm.fail_job("jx", "boom", retry_in=0)
    sm.dequeue("w1")
    sm.start_job("jx")
    sm.complete_job("jx")
    attempts = sm.list_assignments(job_id="jx")
    assert [(a.attempt, a.status) for a in attempts] == [(1, "failed"), (2, "completed")]
    assert sm.list_assignments(status="active") == []


def test_data_persists_across_managers(sm: toolkit.StateManager, make_sm) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "payload": {"k": [1, 2]}}])
    sm.close()
    other = make_sm()
    jobs = other.list_jobs(workflow_id="wf")
    assert len(jobs) == 1 and jobs[0].payload == {"k": [1, 2]}


def test_bulk_create_uses_one_transaction(sm: toolkit.StateManager, raw_pg, clean) -> None:
    jobs = [{"name": f"j{i}", "priority": i % 5} for i in range(500)]
    jobs.append({"name": "bad", "payload": float("nan")})
    with pytest.raises(toolkit.ValidationError, match="payload"):
        sm.create_workflow("big", jobs=jobs, workflow_id="wf-big")
    assert sm.get_workflow("wf-big") is None
    wf = sm.create_workflow("big", jobs=jobs[:-1], workflow_id="wf-big")
    count = raw_pg.execute(psycopg.sql.SQL("SELECT count(*) FROM {} WHERE workflow_id = %s").format(
        psycopg.sql.Identifier(clean.schema, "jobs")), (wf.id,)).fetchone()[0]
    assert count == 500


def test_fresh_schema_equals_migrated_schema(clean, raw_pg) -> None:
    """metadata.create_all (what the queries assume) and the migrations build one schema."""
    from tests.conftest import drop_schema, unique

    fresh, migrated = unique("fresh"), unique("migr")
    try:
        raw_pg.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(psycopg.sql.Identifier(fresh)))
        db = Database(clean.database_url, fresh)
        with db.begin("create_all") as conn:
            tables.metadata.create_all(conn)
        db.dispose()
        db2 = Database(clean.database_url, migrated)
        versions = [v for v, _, _ in migrate.available()]
        assert migrate.upgrade(db2, target=versions[0]) == versions[:1]  # the oldest schema
        assert migrate.upgrade(db2) == versions[1:]  # plus every later migration
        assert migrate.upgrade(db2) == []  # idempotent
        db2.dispose()
        assert describe(raw_pg, fresh) == describe(raw_pg, migrated)
    finally:
        drop_schema(clean.libpq_url, fresh)
        drop_schema(clean.libpq_url, migrated)


def describe(conn: psycopg.Connection, schema: str) -> dict[str, list]:
    columns = conn.execute(
        "SELECT table_name, column_name, data_type, is_nullable, replace(column_default, %s, '') "
        "FROM information_schema.columns WHERE table_schema = %s ORDER BY 1, 2",
        (schema + ".", schema)).fetchall()
    indexes = conn.execute(
        "SELECT indexname, replace(indexdef, %s, '') FROM pg_indexes WHERE schemaname = %s ORDER BY 1",
        (schema + ".", schema)).fetchall()
    constraints = conn.execute(
        "SELECT conname, replace(pg_get_constraintdef(c.oid), %s, '') FROM pg_constraint c "
        "JOIN pg_namespace n ON n.oid = c.connamespace WHERE n.nspname = %s ORDER BY 1",
        (schema + ".", schema)).fetchall()
    sequences = conn.execute(
        "SELECT sequence_name FROM information_schema.sequences WHERE sequence_schema = %s "
        "ORDER BY 1",
        (schema,)).fetchall()
    return {"columns": columns, "indexes": indexes, "constraints": constraints, "sequences": sequences}
