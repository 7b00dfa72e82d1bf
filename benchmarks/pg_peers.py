"""End-to-end job flow, one worker, no-op jobs: the toolkit against the PostgreSQL-backed peers.

    python -m benchmarks.pg_peers [--quick] [--target ...]

Cases
-----
peers.drain.vs_pgqueuer
    Toolkit: the same drain as ``benchmarks.peers`` (one in-process worker loops
    ``dequeue``, ``start_job``, ``complete_job`` over N queued no-op jobs), in
    jobs/s. pgqueuer: one ``QueueManager.run(batch_size=1, mode=drain)``
    process (asyncpg, its default driver) over N pre-enqueued no-op jobs.
peers.drain.vs_pgqueuer.batch10 / .batch100
    The same pgqueuer worker with ``batch_size=10`` / ``100``: one dequeue
    statement claims that many jobs, completions are logged in batches.
peers.drain.vs_procrastinate
    procrastinate 3: ``run_worker(concurrency=1, wait=False)``, one job fetched
    at a time (procrastinate has no batched fetch).

Like Celery and RQ in ``benchmarks.peers``, a peer's rate is taken between
the first and the last task's wall-clock marks (start-up not counted); the
toolkit's runs and the peers' runs are interleaved, one of each in turn. The
rate until the worker process has returned (every buffered completion
committed) is in ``extra.until_exit``. Issue 18 sets no goal for these
one-at-a-time comparisons ("reported beside it"): they are recorded with
``ratio >= 0``. Its ``>= 3x pgqueuer`` and ``>= 10x procrastinate`` are for
the toolkit's batched loop (batches of 100), which :func:`toolkit_drain`
does not measure yet.

The peers live in ``benchmarks/.peers-venv`` (``benchmarks.peers.peer_python``),
never in the project's environment. Each peer run gets its own PostgreSQL
schema ``benchpeer_<random>`` (created here, every connection of the peer
has it as ``search_path``; pgqueuer's objects and its NOTIFY channel carry
the same prefix, procrastinate's queue is named after it); afterwards that
schema alone is dropped by name and the run's Redis mark keys are unlinked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from psycopg import sql

import toolkit
from benchmarks import harness, peers, queues

APP = peers.HERE / "_pg_peer_app.py"
EXIT_TIMEOUT = 60.0
# case, peer, batch size, the floor's name in the report
CASES = (
    ("peers.drain.vs_pgqueuer", "pgqueuer", 1, "pgqueuer batch_size=1"),
    ("peers.drain.vs_pgqueuer.batch10", "pgqueuer", 10, "pgqueuer batch_size=10"),
    ("peers.drain.vs_pgqueuer.batch100", "pgqueuer", 100, "pgqueuer batch_size=100"),
    ("peers.drain.vs_procrastinate", "procrastinate", 1, "procrastinate concurrency=1"),
)
NOTES = {
    "pgqueuer": "(reported beside it; issue 18's >= 3x pgqueuer is for the toolkit's batched loop)",
    "procrastinate": "(reported beside it; issue 18's >= 10x is for the toolkit's batched loop)",
}


def toolkit_drain(sm: toolkit.StateManager, worker: str, n: int) -> float:
    """Seconds of the toolkit's one-worker drain of ``n`` queued no-op jobs (as ``benchmarks.peers``)."""
    queues.queued_jobs(sm, n)
    started = time.perf_counter()
    assert queues.drain(sm, worker, n) == n
    return time.perf_counter() - started


def _schema_sql(bench: harness.Bench, template: str, schema: str) -> None:
    with bench.pg() as conn:
        conn.execute(sql.SQL(template).format(sql.Identifier(schema)))


def _worker(python: Path, peer: str, batch: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    harness.RESULTS.mkdir(exist_ok=True)
    with (harness.RESULTS / f"{peer}-worker.log").open("ab") as log:
        return subprocess.Popen([str(python), str(APP), "work", peer, str(batch)], env=env,
                                cwd=peers.HERE, stdout=log, stderr=log)


def pg_peer_drain(bench: harness.Bench, python: Path, peer: str, n: int,
                  batch: int) -> tuple[float, float]:
    """Seconds from the first to the last of ``n`` no-op jobs, and to the worker's return."""
    schema = f"benchpeer_{uuid.uuid4().hex[:10]}"
    env = {**peers._env(bench.target.redis_url, schema),
           "BENCH_PG_DSN": harness.pg_dsn(bench.target.database_url)}
    _schema_sql(bench, "CREATE SCHEMA {}", schema)  # fails on a name in use: never drop another's
    try:
        subprocess.run([str(python), str(APP), "enqueue", peer, str(n)], env=env, cwd=peers.HERE,
                       check=True)
        proc = _worker(python, peer, batch, env)
        try:
            peers._wait_for(bench, f"{schema}:last", proc)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=EXIT_TIMEOUT)
        finally:
            peers._stop(proc)
        return _marks(bench, schema, n)
    finally:
        _schema_sql(bench, "DROP SCHEMA IF EXISTS {} CASCADE", schema)
        r = bench.redis()
        harness.unlink_prefix(r, f"{schema}:*")
        r.close()


def _marks(bench: harness.Bench, schema: str, n: int) -> tuple[float, float]:
    r = bench.redis()
    first, last, done = (float(v or "nan") for v in r.mget(f"{schema}:first", f"{schema}:last",
                                                            f"{schema}:exit"))
    r.close()
    scale = n / max(1, n - 1)
    return (last - first) * scale, (done - first) * scale


def _peer_versions(python: Path) -> str:
    out = subprocess.run([str(python), str(APP), "versions"], cwd=peers.HERE, capture_output=True,
                         text=True, check=True, env=peers._env("redis://", "x"))
    return out.stdout.strip()


def _rates(n: int, seconds: list[float]) -> dict[str, Any] | None:
    valid = [s for s in seconds if s > 0]
    return dataclasses.asdict(harness.rate(n, valid, "jobs/s")) if valid else None


def run(bench: harness.Bench) -> None:
    wanted = [case for case in CASES if bench.wants(case[0])]
    if not wanted:
        return
    n = bench.n(5_000, 500)
    runs = 3
    python = peers.peer_python()
    versions = _peer_versions(python)
    tk: list[float] = []
    took: dict[str, list[tuple[float, float]]] = {case[0]: [] for case in wanted}
    with bench.state_manager("pgpeers") as sm:
        worker = sm.register_worker("bench-drain").id
        for _ in range(runs):  # interleaved, so that load on a shared machine hits every side
            tk.append(toolkit_drain(sm, worker, n))
            for case, peer, batch, _ in wanted:
                took[case].append(pg_peer_drain(bench, python, peer, n, batch))
    tk_rate = harness.rate(n, tk, "jobs/s")
    for case, peer, batch, name in wanted:
        bench.record("peers", case, n, tk_rate, harness.rate(n, [t[0] for t in took[case]], "jobs/s"),
                     harness.at_least(0), floor_name=name, note=NOTES[peer],
                     extra={"peers": versions, "batch_size": batch,
                            "until_exit": _rates(n, [t[1] for t in took[case]])})


if __name__ == "__main__":
    harness.main(run, __doc__)
