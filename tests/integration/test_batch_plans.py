"""A batch's claim, completion and failure read no CTE again per job (issue 18).

Each statement joined what it moved to what it did beside: the assignments it ended, the
workflows it locked or woke. As a join of two CTEs, PostgreSQL planned it from the
data-modifying CTE's estimate (one row) and chose a nested loop: every job read every row
of the other CTE, n x n at a batch of n (a completion of 1,000 jobs spent 200 of its 375 ms
there). Now the completion and the failure look each job up in one object built once, and
the claim returns its woken workflows as rows of their own: every CTE is read once, on the
plan made with the values and on the generic one the single-statement pool keeps.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from typing import Any, cast

import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

import toolkit
from toolkit.tiers.postgres import batches, direct

N = 200


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _explain(conn: sa.Connection, stmt: Any, params: Mapping[str, Any], generic: bool
             ) -> dict[str, Any]:
    """``EXPLAIN ANALYZE`` of ``stmt`` as the direct path sends it (its ``$n`` text): the plan
    made with the values, or (``generic``) the one made without them, as a prepared
    statement on the single-statement pool runs. It runs the statement: roll back after."""
    compiled = direct._compile(conn, stmt)
    args = direct._args(compiled, params)
    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    if not generic:
        with psycopg.RawCursor(raw) as cur:
            cur.execute(b"EXPLAIN (ANALYZE, FORMAT JSON) " + compiled.text, args)
            row = cur.fetchone()
    else:  # EXECUTE takes values, not parameters: each quoted by psycopg
        raw.execute("SET LOCAL plan_cache_mode TO force_generic_plan")
        raw.execute(b"PREPARE explained AS " + compiled.text)  # for the session: deallocated
        try:
            values = sql.SQL(", ").join(sql.Literal(a) for a in args)
            row = raw.execute(sql.SQL("EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE explained({})")
                              .format(values)).fetchone()
        finally:
            raw.execute("DEALLOCATE explained")
    assert row is not None
    return cast(dict[str, Any], row[0][0]["Plan"])


def _call(sm: toolkit.StateManager, statement: str) -> tuple[Any, Mapping[str, Any]]:
    """The statement and its values for N jobs, each of its own workflow."""
    for k in range(N):
        sm.create_workflow(f"plans-{k}", jobs=[{"name": "j"}])
    worker = sm.register_worker("w").id
    now = toolkit.models.utcnow()
    if statement == "claim":
        ids = [j.id for j in sm.list_jobs(status="queued")]
        claim = batches.Claim(ids, [str(uuid.uuid4()) for _ in ids], worker, True)
        return batches._claim_call(claim, now)
    jobs = sm.dequeue_many(worker, N, start=True)
    items = [batches.Item(j.id, worker, j.attempts, '"v"') for j in jobs]
    stmt = batches._COMPLETE if statement == "complete" else batches._FAIL
    return stmt, {**batches._params(items, ["running"], now), "_retry": True}


@pytest.mark.parametrize("generic", [False, True], ids=["custom", "generic"])
@pytest.mark.parametrize("statement", ["claim", "complete", "fail"])
def test_a_batch_reads_each_cte_once(sm: toolkit.StateManager, statement: str,
                                     generic: bool) -> None:
    stmt, params = _call(sm, statement)
    with sm.db.begin("explain") as conn:
        plan = _explain(conn, stmt, params, generic)
        conn.rollback()
    ctes = [n for n in _nodes(plan) if n["Node Type"] == "CTE Scan"]
    rescans = {(n["CTE Name"], n["Alias"]): n["Actual Loops"] for n in ctes
               if n["Actual Loops"] > 1}
    assert ctes and rescans == {}
    woken = N if statement == "claim" else 0
    assert plan["Actual Rows"] == N + woken


def test_a_release_finds_the_dependents_by_index(sm: toolkit.StateManager, raw_pg: Any,
                                                 clean: Any) -> None:
    """A completion releases the pending jobs that list it in ``depends_on``; without an index
    on it, that read every pending job of the workflow (86 ms at 100,000 pending). The plan
    made with the job's id uses it here; the generic plan (the single-statement pool's) does
    once a sequential read costs more: at 300,000 jobs, not at 20,000 (measured)."""
    jobs = ([{"name": "a"}, {"name": "z"}] + [{"name": f"b{k}", "depends_on": ["a"]} for k in range(3)]
            + [{"name": f"w{k}", "depends_on": ["z"]} for k in range(2000)])
    wf = sm.create_workflow("dag", jobs=jobs)
    a = next(j.id for j in sm.list_jobs(workflow_id=wf.id) if j.name == "a")
    table = sql.Identifier(clean.schema, "jobs")
    raw_pg.execute(sql.SQL("UPDATE {} SET status = 'completed' WHERE id = %s").format(table), (a,))
    raw_pg.execute(sql.SQL("ANALYZE {}").format(table))
    with sm.db.begin("explain") as conn:
        plan = _explain(conn, batches._RELEASE_ONE, {"_job": a, "_now": toolkit.models.utcnow()},
                        generic=False)
        conn.rollback()
    nodes = list(_nodes(plan))
    assert "ix_jobs_dependents" in {n.get("Index Name") for n in nodes}
    # No pending list: a search would read every entry added since the last vacuum.
    (options,) = raw_pg.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass",
                                (f"{clean.schema}.ix_jobs_dependents",)).fetchone()
    assert options == ["fastupdate=off"]
    assert sum(n.get("Rows Removed by Filter", 0) for n in nodes) < 10
    assert plan["Actual Rows"] == 3
