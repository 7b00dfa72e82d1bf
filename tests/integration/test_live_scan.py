"""The rebuild reads live jobs through the partial index, whatever the size of the history."""

from __future__ import annotations

import psycopg
from psycopg import sql

import toolkit
from toolkit.tiers.postgres import store


def test_live_jobs_are_read_through_the_partial_index(sm: toolkit.StateManager,
                                                      raw_pg: psycopg.Connection, clean) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{k}"} for k in range(2000)])
    jobs = sql.Identifier(clean.schema, "jobs")
    # Half the jobs finished: the planner alone would scan the whole table.
    raw_pg.execute(sql.SQL("UPDATE {} SET status = 'completed' WHERE name < 'j5'").format(jobs))
    raw_pg.execute(sql.SQL("ANALYZE {}").format(jobs))
    query = sql.SQL("EXPLAIN SELECT id FROM {} WHERE status NOT IN ('completed', 'cancelled')"
                    ).format(jobs)
    with sm.db.begin("explain") as conn:
        raw = conn.connection.driver_connection
        assert raw is not None
        with store._live_index_only(conn):
            plan = "\n".join(r[0] for r in raw.execute(query))
        assert raw.execute("SHOW enable_seqscan").fetchone() == ("on",)  # not leaked
        counts = store.count_live(conn)
        streamed = list(store.stream_live(conn, "job", ["id"]))
    assert "ix_jobs_live" in plan and "Seq Scan" not in plan, plan
    live = raw_pg.execute(sql.SQL("SELECT count(*) FROM {} WHERE status <> 'completed'").format(
        jobs)).fetchone()
    assert live is not None and counts["job"] == len(streamed) == live[0] > 0
