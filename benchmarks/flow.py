"""The worker loop, one worker, no-op jobs: the fused and the batched verbs against the plain loop.

    python -m benchmarks.flow [--quick] [--target ...]

Cases
-----
flow.fused.vs_loop
    One in-process worker: ``dequeue(start=True)`` once, then
    ``complete_and_dequeue(job, start=True)`` (finish one, claim the next straight
    into running: one PostgreSQL commit per job) over N queued no-op jobs, jobs/s.
    Against the plain loop ``dequeue`` -> ``start_job`` -> ``complete_job`` (three
    commits per job; what ``peers.drain`` measures) over the same N, same run.
    Goal: >= 2x (one commit per job instead of three).
flow.batch100.vs_loop
    The same worker in batches of 100: ``dequeue_many(100, start=True)`` then
    ``complete_jobs`` of the batch (two commits per 100 jobs), jobs/s, against the
    same plain loop. Goal: >= 10x.

The jobs are created untimed before each run (workflows of 1,000, five priorities).
"""

from __future__ import annotations

import toolkit
from benchmarks import harness, queues

BATCH = 100


def drain_fused(sm: toolkit.StateManager, worker: str, n: int) -> int:
    """Claim straight into running, then complete-and-claim until ``n`` are done or none is left."""
    job = sm.dequeue(worker, start=True)
    done = 0
    while job is not None and done < n:
        _, job = sm.complete_and_dequeue(job.id, None, worker_id=worker, start=True)
        done += 1
    return done


def drain_batched(sm: toolkit.StateManager, worker: str, n: int, batch: int = BATCH) -> int:
    """Claim ``batch`` jobs straight into running, complete them in one call, until ``n`` are done."""
    done = 0
    while done < n:
        jobs = sm.dequeue_many(worker, min(batch, n - done), start=True)
        if not jobs:
            break
        out = sm.complete_jobs([(j.id, None) for j in jobs], worker_id=worker)
        assert all(isinstance(o, toolkit.Job) for o in out), out
        done += len(jobs)
    return done


def run(bench: harness.Bench) -> None:
    if not bench.wants("flow."):
        return
    n = bench.n(5_000, 500)
    runs = bench.runs
    with bench.state_manager("flow") as sm:
        worker = sm.register_worker("bench-flow").id

        def measure(loop: object) -> harness.Stats:
            def go() -> None:
                assert loop(sm, worker, n) == n  # type: ignore[operator]
            return harness.rate(n, harness.time_runs(go, runs, setup=lambda: queues.queued_jobs(sm, n)),
                                "jobs/s")

        plain = measure(queues.drain)
        name = "dequeue -> start_job -> complete_job"
        if bench.wants("flow.fused.vs_loop"):
            bench.record("flow", "flow.fused.vs_loop", n, measure(drain_fused), plain,
                         harness.at_least(2.0), floor_name=name,
                         note="one commit per job (complete + claim next) vs three")
        if bench.wants("flow.batch100.vs_loop"):
            bench.record("flow", "flow.batch100.vs_loop", n, measure(drain_batched), plain,
                         harness.at_least(10.0), floor_name=name,
                         note=f"batches of {BATCH}: two commits per batch")


if __name__ == "__main__":
    harness.main(run, __doc__)
