"""Bulk operator actions: plan + apply of a requeue against a bare ``UPDATE`` and hand-made queue moves.

    python -m benchmarks.actions [--quick] [--target auto|embedded|loopback|both]

N failed jobs are bulk-loaded (COPY, untimed) into a fresh schema. Before each timed
run (untimed) every one of them is set back to ``failed`` and the queue keys are removed,
so both sides always move the same N rows. Full: N = 100,000; quick: 5,000.

Cases
-----
bulk.plan_apply.vs_raw
    ``sm.plan_action("requeue", status="failed", reason=...)`` then
    ``sm.apply_action(plan, progress=False)`` (batches of 1,000, each job guarded by its
    planned version, an event per job, the workflow roll-ups, the action's record, the
    cache fills and queue pushes in Redis) against the floor: one bare ``UPDATE jobs SET
    status = 'queued', enqueue_seq = nextval(...), ... WHERE status = 'failed' RETURNING
    id, priority, enqueue_seq`` (psycopg, autocommit) plus the ``ZADD`` of every job into
    a queue by hand (redis-py pipeline, 10,000 members per ``ZADD``), same rows, same run,
    runs interleaved. Goal: <= 3x the floor's time.
"""

from __future__ import annotations

import uuid
from typing import Any

import toolkit
from benchmarks import harness
from toolkit.tiers.redis import keys

CHUNK = 10_000


def _reset(bench: harness.Bench, schema: str, queue_keys: list[str]) -> None:
    """Every job back to failed, no queue in Redis (untimed)."""
    from psycopg import sql

    with bench.pg() as conn:
        conn.execute(sql.SQL("UPDATE {} SET status = 'failed', finished_at = now(), "
                             "updated_at = now() - interval '1 second', version = version + 1"
                             ).format(sql.Identifier(schema, "jobs")))
    r = bench.redis()
    try:
        r.unlink(*queue_keys)
    finally:
        r.close()


def _floor(bench: harness.Bench, schema: str, queue_key: str) -> int:
    """The bare UPDATE of the failed rows, then their queue pushes by hand."""
    from psycopg import sql

    stmt = sql.SQL(
        "UPDATE {jobs} SET status = 'queued', enqueue_seq = nextval({seq}::regclass), "
        "worker_id = NULL, finished_at = NULL, run_at = NULL, updated_at = now(), "
        "max_attempts = greatest(max_attempts, attempts + 1), version = version + 1 "
        "WHERE status = 'failed' RETURNING id, priority, enqueue_seq").format(
        jobs=sql.Identifier(schema, "jobs"), seq=sql.Literal(f'"{schema}".job_enqueue_seq'))
    with bench.pg() as conn:
        rows = conn.execute(stmt).fetchall()
    r = bench.redis()
    try:
        pipe = r.pipeline(transaction=False)
        for start in range(0, len(rows), CHUNK):
            pipe.zadd(queue_key, {job_id: -priority * 1e9 + seq
                                  for job_id, priority, seq in rows[start:start + CHUNK]})
        pipe.execute()
    finally:
        r.close()
    return len(rows)


def _toolkit(sm: toolkit.StateManager) -> int:
    plan = sm.plan_action("requeue", status="failed", reason="benchmark", actor="bench")
    return sm.apply_action(plan, progress=False).applied


def run(bench: harness.Bench) -> None:
    if not bench.wants("bulk.plan_apply"):
        return
    n = bench.n(100_000, 5_000)
    with bench.state_manager("actions", rebuild=False) as sm:
        schema = sm.settings.schema
        harness.add_raw_jobs(bench, schema, n, status="failed")
        floor_key = f"bench-floor-{uuid.uuid4().hex[:8]}:queue"
        queue_keys = [keys.queue(sm.ns, "default"), floor_key]
        tk: list[float] = []
        floor: list[float] = []
        counts: dict[str, Any] = {}
        try:
            for _ in range(bench.runs):
                _reset(bench, schema, queue_keys)
                tk.append(harness.time_once(lambda: counts.__setitem__("toolkit", _toolkit(sm))))
                _reset(bench, schema, queue_keys)
                floor.append(harness.time_once(
                    lambda: counts.__setitem__("floor", _floor(bench, schema, floor_key))))
                assert counts == {"toolkit": n, "floor": n}, counts
        finally:
            r = bench.redis()
            r.unlink(floor_key)
            r.close()
        bench.record("actions", "bulk.plan_apply.vs_raw", n, harness.duration(tk),
                     harness.duration(floor), harness.at_most(3.0),
                     floor_name="bare UPDATE ... WHERE + ZADD by hand (redis-py pipeline)",
                     extra={"batch": 1000})


if __name__ == "__main__":
    harness.main(run, __doc__)
