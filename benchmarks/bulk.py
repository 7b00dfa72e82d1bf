"""Bulk create: workflows of 1,000 jobs through all three tiers vs ``COPY ... FORMAT BINARY``.

    python -m benchmarks.bulk [--quick] [--target auto|embedded|loopback|both]

Cases
-----
bulk.create_workflow
    ``sm.create_workflow(name, jobs=[1,000 specs])`` until N jobs exist
    (PostgreSQL transaction, Redis pipeline, memory), in jobs/s, against
    psycopg ``COPY jobs FROM STDIN (FORMAT BINARY)`` of the same rows into the
    same table. Goal: >= 30% of the floor.
bulk.postgres_part
    The PostgreSQL part of ``create_workflow`` alone (validation, row building,
    the workflow INSERT, ``next_seqs`` and ``store.copy_jobs`` in one
    transaction, no Redis, no memory). Goal: >= 50% of the floor.
"""

from __future__ import annotations

import uuid
from typing import Any

import toolkit
from benchmarks import harness
from toolkit import models, validate
from toolkit.manager import jobs
from toolkit.tiers.postgres import store

BATCH = 1000


def _toolkit_run(sm: toolkit.StateManager, n: int) -> None:
    specs = harness.job_specs(BATCH)
    for start in range(0, n, BATCH):
        sm.create_workflow(f"bulk-{start}", jobs=specs[:min(BATCH, n - start)])


def _postgres_part_run(sm: toolkit.StateManager, n: int) -> None:
    """What create_workflow does inside its transaction, and nothing after it."""
    specs = harness.job_specs(BATCH)
    for start in range(0, n, BATCH):
        checked = validate.job_specs(specs[:min(BATCH, n - start)])
        now = models.utcnow()
        wf: dict[str, Any] = {"id": uuid.uuid4().hex, "name": f"pg-{start}", "status": "pending",
                              "metadata": {}, "created_at": now, "updated_at": now, "version": 1}
        with sm.db.begin("bench: postgres part") as conn:
            store.insert(conn, "workflow", wf)
            seqs = iter(store.next_seqs(conn, len(checked)))
            rows = [jobs.job_row(wf["id"], s, now, seqs) for s in checked]
            store.copy_jobs(conn, sm.db.schema, rows)


def _floor_run(bench: harness.Bench, schema: str, n: int) -> None:
    with bench.pg(autocommit=False) as conn:
        for start in range(0, n, BATCH):
            wf = uuid.uuid4().hex
            harness.insert_workflows(conn, schema, [wf])
            harness.copy_jobs_binary(conn, schema, harness.job_rows(wf, min(BATCH, n - start),
                                                                     seq0=start))
            conn.commit()


def run(bench: harness.Bench) -> None:
    n = bench.n(1_000_000, 20_000)
    runs = 3
    with bench.state_manager("bulk") as sm:
        schema = sm.settings.schema
        floor = harness.time_runs(lambda: _floor_run(bench, schema, n), runs)
        if bench.wants("bulk.create_workflow"):
            tk = harness.time_runs(lambda: _toolkit_run(sm, n), runs, setup=sm.memory.clear)
            bench.record("bulk", "bulk.create_workflow", n, harness.rate(n, tk, "jobs/s"),
                         harness.rate(n, floor, "jobs/s"), harness.at_least(0.30),
                         floor_name="COPY FORMAT BINARY", extra={"rss_mb": harness.rss_mb()})
        if bench.wants("bulk.postgres_part"):
            pg = harness.time_runs(lambda: _postgres_part_run(sm, n), runs)
            bench.record("bulk", "bulk.postgres_part", n, harness.rate(n, pg, "jobs/s"),
                         harness.rate(n, floor, "jobs/s"), harness.at_least(0.50),
                         floor_name="COPY FORMAT BINARY")


if __name__ == "__main__":
    harness.main(run, __doc__)
