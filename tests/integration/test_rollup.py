"""The workflow roll-up (one SQL statement of EXISTS probes) against a reference in Python."""

from __future__ import annotations

import contextlib
import itertools

import psycopg
import pytest
from psycopg import sql

import toolkit
from toolkit.tiers.postgres import lifecycle

JOB_STATUSES = ("pending", "queued", "assigned", "running", "completed", "failed", "cancelled")
WORKFLOW_STATUSES = ("pending", "running", "failed", "completed", "cancelled")


def reference(current: str, statuses: list[str]) -> str:
    """The roll-up rules, spelled out: what the workflow's status should become."""
    if current in ("cancelled", "completed"):
        return current
    if statuses and all(s in ("completed", "cancelled") for s in statuses) and "completed" in statuses:
        return "completed"
    # Failed only when no job can still progress: nothing queued, assigned or running
    # (a pending job is released only when a dependency completes, so it cannot move either).
    progressing = any(s in ("queued", "assigned", "running") for s in statuses)
    if "failed" in statuses and not progressing:
        return "failed"
    if "failed" in statuses or any(s in ("assigned", "running", "completed") for s in statuses):
        return "running"
    return "running" if current == "failed" else current


# Every workflow status with: no jobs, each status alone, and each pair of statuses.
MIXES = [[]] + [[s] for s in JOB_STATUSES] + [list(p) for p in itertools.combinations(JOB_STATUSES, 2)]


def test_rollup_matches_the_rules_for_every_mix(sm: toolkit.StateManager, raw_pg: psycopg.Connection,
                                                clean) -> None:
    cases = [(w, mix) for w in WORKFLOW_STATUSES for mix in MIXES]
    wf_ids = []
    for i, (current, mix) in enumerate(cases):
        wf = sm.create_workflow(f"r{i}", jobs=[{"name": f"j{k}"} for k in range(len(mix))])
        wf_ids.append(wf.id)
        jobs = sm.list_jobs(workflow_id=wf.id)
        for job, status in zip(jobs, mix, strict=True):
            raw_pg.execute(sql.SQL("UPDATE {} SET status = %s WHERE id = %s").format(
                sql.Identifier(clean.schema, "jobs")), (status, job.id))
        raw_pg.execute(sql.SQL("UPDATE {} SET status = %s WHERE id = %s").format(
            sql.Identifier(clean.schema, "workflows")), (current, wf.id))

    now = toolkit.models.utcnow()
    wrong = []
    with sm.db.begin("test roll-up") as conn:
        for wf_id, (current, mix) in zip(wf_ids, cases, strict=True):
            assert lifecycle.lock_workflow(conn, wf_id) == current
            row = lifecycle.rollup_workflow(conn, wf_id, now)
            got = row["status"] if row is not None else current
            if got != reference(current, mix):
                wrong.append((current, mix, got))
            if row is not None:
                assert row["version"] >= 2 and row["updated_at"] == now
    assert not wrong
    assert len(cases) == 5 * (1 + 7 + 21)


def test_rollup_of_a_large_workflow_reads_no_job_rows(sm: toolkit.StateManager,
                                                      raw_pg: psycopg.Connection, clean) -> None:
    """A probe that finds nothing uses the (status, workflow_id) index, not a scan of the jobs."""
    wf = sm.create_workflow("big", jobs=[{"name": f"j{k}"} for k in range(3000)])
    raw_pg.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(clean.schema, "jobs")))
    with sm.db.begin("explain") as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        raw.execute(sql.SQL("SET LOCAL search_path TO {}").format(sql.Identifier(clean.schema)))
        plan = "\n".join(r[0] for r in raw.execute(
            "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) SELECT EXISTS (SELECT 1 FROM jobs "
            "WHERE workflow_id = %s AND status = ANY(%s))",
            (wf.id, ["failed", "completed"])).fetchall())
    assert "ix_jobs_status_workflow_id" in plan, plan
    assert "Seq Scan" not in plan, plan


@pytest.mark.parametrize("idle", [False, True])
def test_pool_hands_out_a_working_connection_after_the_server_dropped_it(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, monkeypatch, idle: bool) -> None:
    """An idle connection is pinged (and replaced); a busy one fails once, then reconnects."""
    from toolkit.tiers.postgres import db as db_module

    wf = sm.create_workflow("ping")
    monkeypatch.setattr(db_module, "PING_AFTER_IDLE", -1.0 if idle else 3600.0)
    # Terminate every backend of this manager's pool (and nothing else).
    with sm.db.autocommit("warm up") as conn:  # both pools hold a connection
        conn.exec_driver_sql("SELECT 1")
    counts = [e.pool.checkedin() for e in sm.db.engines]  # type: ignore[attr-defined]
    n = sum(counts)
    assert all(counts), counts
    with contextlib.ExitStack() as stack:
        conns = [stack.enter_context(e.connect())
                 for e, k in zip(sm.db.engines, counts, strict=True) for _ in range(k)]
        pids = [c.exec_driver_sql("SELECT pg_backend_pid()").scalar() for c in conns]
    killed = raw_pg.execute("SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                            "unnest(%s::int[]) AS pid) t", (pids,)).fetchone()
    assert killed == (n,)
    if idle:
        assert sm.update_workflow_status(wf.id, "running").status == "running"
    else:
        with pytest.raises(toolkit.errors.StorageUnavailable):
            sm.update_workflow_status(wf.id, "running")  # the single statements' pool meets it
        # One outage fails one call: the transactions' pool, whose connection sat idle since
        # before the loss was seen, pings it and reconnects.
        assert sm.create_workflow("after", jobs=[{"name": "j"}]).name == "after"
        assert sm.update_workflow_status(wf.id, "running").status == "running"
