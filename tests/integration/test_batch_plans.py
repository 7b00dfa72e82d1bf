"""A batch's completion and failure read no CTE again per job (issue 18).

Each statement joins what it moved to the assignments it ended and the workflows it locked.
As a join of two CTEs, PostgreSQL planned it from the data-modifying CTE's estimate (one row)
and chose a nested loop: every job read every ended assignment, n x n at a batch of n (a
completion of 1,000 jobs spent 200 of its 375 ms there). Now each is looked up in one object
built once, so every CTE is read once, whatever the batch's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import toolkit
from toolkit.tiers.postgres import batches, direct


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


@pytest.mark.parametrize("statement", ["complete", "fail"])
def test_a_batch_reads_each_cte_once(sm: toolkit.StateManager, statement: str) -> None:
    n = 200
    sm.create_workflow("plans", jobs=[{"name": f"j{k}"} for k in range(n)])
    worker = sm.register_worker("w").id
    jobs = sm.dequeue_many(worker, n, start=True)
    assert len(jobs) == n
    items = [batches.Item(j.id, worker, j.attempts, '"v"') for j in jobs]
    params = {**batches._params(items, ["running"], toolkit.models.utcnow()), "_retry": True}
    stmt = batches._COMPLETE if statement == "complete" else batches._FAIL
    with sm.db.begin("explain") as conn:
        plan = direct.explain(conn, stmt, params)
        conn.rollback()
    rescans = {(node.get("CTE Name"), node.get("Alias")): node["Actual Loops"]
               for node in _nodes(plan) if node["Node Type"] == "CTE Scan"
               and node["Actual Loops"] > 1}
    assert plan["Actual Rows"] == n
    assert rescans == {}
