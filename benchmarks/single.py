"""Single writes and reads of one entity, per-call latency (p50, p99).

    python -m benchmarks.single [--quick] [--target ...]

Cases
-----
write.workflow_status
    ``update_workflow_status`` (running <-> failed): one guarded UPDATE ... RETURNING,
    commit, a Redis pipeline (versioned fill + invalidation), memory.
write.start_job
    ``start_job`` on assigned jobs (status guard, workflow roll-up, Redis, memory).
    Floor for both: [autocommit PK UPDATE p50 + Redis SET p50], raw. Goal: p50 <= 1.5x,
    p99 <= 2x.
read.memory_hit
    ``get_job`` served from memory. Goal: p50 <= 2 us (absolute).
read.redis_hit
    ``get_job`` with memory cleared before each call (untimed). Floor: raw ``GET``.
    Goal: p50 <= 1.5x.
read.postgres_fallback
    ``get_job`` with memory cleared and the cache key deleted before each call. Floor:
    SQLAlchemy Core PK SELECT in ``engine.begin()``. Goal: p50 <= 1.5x.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from psycopg import sql

import toolkit
from benchmarks import harness
from toolkit.tiers.redis import keys


def _floor_write(bench: harness.Bench, schema: str, ids: list[str], n: int) -> harness.Stats:
    """p50 of a raw autocommit PK UPDATE plus p50 of a raw SET (p99 likewise)."""
    stmt = sql.SQL("UPDATE {} SET version = version + 1, updated_at = now() WHERE id = %s").format(
        sql.Identifier(schema, "jobs"))
    r = bench.redis()
    k = len(ids)
    with bench.pg() as conn:
        pg = harness.latency(harness.sample_latency(lambda i: conn.execute(stmt, (ids[i % k],)), n))
    rd = harness.latency(harness.sample_latency(lambda i: r.set(f"bench-floor:{ids[i % k]}", "x"), n))
    harness.unlink_prefix(r, "bench-floor:*")
    r.close()
    assert pg.p50 is not None and rd.p50 is not None and pg.p99 is not None and rd.p99 is not None
    return harness.Stats("us", pg.p50 + rd.p50, pg.min + rd.min, pg.max + rd.max, n,
                         p50=pg.p50 + rd.p50, p99=pg.p99 + rd.p99)


def _record_write(bench: harness.Bench, case: str, tk: harness.Stats, floor: harness.Stats) -> None:
    for metric, goal in (("p50", 1.5), ("p99", 2.0)):
        bench.record("single", f"{case}.{metric}", tk.runs, tk, floor, harness.at_most(goal, metric),
                     floor_name="PK UPDATE + SET")


def _workflow_status(sm: toolkit.StateManager, n: int) -> harness.Stats:
    wf = sm.create_workflow("single-write").id
    sm.update_workflow_status(wf, "running")
    states = ("failed", "running")
    return harness.latency(harness.sample_latency(
        lambda i: sm.update_workflow_status(wf, states[i % 2]), n))


def _start_job(sm: toolkit.StateManager, n: int) -> harness.Stats:
    worker = sm.register_worker("bench-single").id
    job_ids = [j.id for j in _jobs(sm, n + 50)]
    for j in job_ids:
        sm.assign_job(j, worker)
    return harness.latency(harness.sample_latency(lambda i: sm.start_job(job_ids[i + 50]), n,
                                                  warmup=0))


def _jobs(sm: toolkit.StateManager, n: int) -> list[toolkit.Job]:
    out: list[toolkit.Job] = []
    for start in range(0, n, 1000):
        wf = sm.create_workflow(f"single-{start}", jobs=harness.job_specs(min(1000, n - start)))
        out += sm.list_jobs(workflow_id=wf.id)
    return out


def _writes(bench: harness.Bench, sm: toolkit.StateManager, n: int) -> None:
    ids = [j.id for j in _jobs(sm, 2000)]
    floor = _floor_write(bench, sm.settings.schema, ids, n)
    if bench.wants("write.workflow_status"):
        _record_write(bench, "write.workflow_status", _workflow_status(sm, n), floor)
    if bench.wants("write.start_job"):
        _record_write(bench, "write.start_job", _start_job(sm, n), floor)


def _reads(bench: harness.Bench, sm: toolkit.StateManager, n: int) -> None:
    ids = [j.id for j in _jobs(sm, min(n, 5000))]
    k = len(ids)
    ns = sm.ns
    r = bench.redis()
    for i in ids:
        sm.get_job(i)
    if bench.wants("read.memory_hit"):
        tk = harness.latency(harness.sample_latency(lambda i: sm.get_job(ids[i % k]), n * 10))
        bench.record("single", "read.memory_hit", tk.runs, tk, None, harness.absolute_max(2.0, "p50"),
                     note="includes ~0.1 us of perf_counter overhead")
    if bench.wants("read.redis_hit"):
        tk = harness.latency(harness.sample_latency(
            lambda i: sm.get_job(ids[i % k]), n, setup=lambda _: sm.memory.clear()))
        floor = harness.latency(harness.sample_latency(
            lambda i: r.get(keys.entity(ns, "job", ids[i % k])), n))
        bench.record("single", "read.redis_hit", n, tk, floor, harness.at_most(1.5, "p50"),
                     floor_name="GET")
    if bench.wants("read.postgres_fallback"):
        _read_postgres(bench, sm, ids, n, r)
    r.close()


def _read_postgres(bench: harness.Bench, sm: toolkit.StateManager, ids: list[str], n: int,
                   r: Any) -> None:
    k = len(ids)

    def forget(i: int) -> None:
        sm.memory.clear()
        r.delete(keys.entity(sm.ns, "job", ids[i % k]))

    tk = harness.latency(harness.sample_latency(lambda i: sm.get_job(ids[i % k]), n, setup=forget))
    engine = sa.create_engine(sm.settings.database_url,
                              execution_options={"schema_translate_map": {None: sm.settings.schema}})
    from toolkit.tiers.postgres import tables

    jobs = tables.jobs

    def select(i: int) -> Any:
        with engine.begin() as conn:
            return conn.execute(sa.select(jobs).where(jobs.c.id == ids[i % k])).first()

    floor = harness.latency(harness.sample_latency(select, n))
    engine.dispose()
    bench.record("single", "read.postgres_fallback", n, tk, floor, harness.at_most(1.5, "p50"),
                 floor_name="SQLAlchemy Core PK SELECT")


def run(bench: harness.Bench) -> None:
    n = bench.n(10_000, 1_000)
    with bench.state_manager("single") as sm:
        _writes(bench, sm, n)
        _reads(bench, sm, n)


if __name__ == "__main__":
    harness.main(run, __doc__)
