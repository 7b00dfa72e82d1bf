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

The jobs are created untimed before each run (workflows of 1,000, five priorities); the
three loops run interleaved (at least 5 runs each), so load on a shared machine hits each
of them alike.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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


def drain_fused_batched(sm: toolkit.StateManager, worker: str, n: int, batch: int = BATCH) -> int:
    """Claim a batch straight into running, then complete each batch and claim the next in one
    call (``complete_and_dequeue_many``: one commit per batch) until ``n`` are done."""
    jobs = sm.dequeue_many(worker, min(batch, n), start=True)
    done = 0
    while jobs:
        done += len(jobs)
        items = [(j.id, None) for j in jobs]
        if done >= n:
            out = sm.complete_jobs(items, worker_id=worker)
            jobs = []
        else:
            out, jobs = sm.complete_and_dequeue_many(items, min(batch, n - done), worker_id=worker,
                                                     start=True)
        assert all(isinstance(o, toolkit.Job) for o in out), out
    return done


def _timed(loop: Callable[[toolkit.StateManager, str, int], int], sm: toolkit.StateManager,
           worker: str, n: int) -> float:
    started = time.perf_counter()
    done = loop(sm, worker, n)
    took = time.perf_counter() - started
    assert done == n, f"{loop.__name__} drained {done} of {n}"
    return took


def run(bench: harness.Bench) -> None:
    if not bench.wants("flow."):
        return
    n = bench.n(5_000, 300)
    loops = {"plain": queues.drain, "fused": drain_fused, "batch100": drain_batched}
    wanted = {k: f for k, f in loops.items()
              if k == "plain" or bench.wants(f"flow.{k}.vs_loop")}
    took: dict[str, list[float]] = {k: [] for k in wanted}
    with bench.state_manager("flow") as sm:
        worker = sm.register_worker("bench-flow").id
        for _ in range(max(5, bench.runs)):  # interleaved: load on a shared machine hits each loop
            for name, loop in wanted.items():
                queues.queued_jobs(sm, n)
                took[name].append(_timed(loop, sm, worker, n))
    plain = harness.rate(n, took.pop("plain"), "jobs/s")
    floor_name = "dequeue -> start_job -> complete_job"
    goals = {"fused": (2.0, "one commit per job (complete + claim next) vs three"),
             "batch100": (10.0, f"batches of {BATCH}: two commits per batch")}
    for name, seconds in took.items():
        goal, note = goals[name]
        bench.record("flow", f"flow.{name}.vs_loop", n, harness.rate(n, seconds, "jobs/s"), plain,
                     harness.at_least(goal), floor_name=floor_name, note=note)


if __name__ == "__main__":
    harness.main(run, __doc__)
