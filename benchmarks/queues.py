"""The job queue: unpipelined enqueue + dequeue cycles, and one worker draining no-op jobs.

    python -m benchmarks.queues [--quick] [--target ...]

Cases
-----
queue.cycle.state_manager
    ``sm.enqueue(job)`` (a pending job) then ``sm.dequeue(worker)``, one after
    the other, in cycles/s. Both commit to PostgreSQL (status guard), so this is
    the cost of a *durable* queue.
queue.cycle.redis_tier
    The toolkit's Redis queue alone (``queue.push`` in a pipeline, ``queue.claim``
    Lua pop into the in-flight set, then the in-flight entry removed), in cycles/s.
    Floor for both: raw ``ZADD`` + ``ZPOPMIN``. Goal: >= 50% of the floor.

The end-to-end drain (one worker, no-op jobs) against Celery and RQ is in
``benchmarks.peers``, which uses :func:`drain` and :func:`queued_jobs` from here.
"""

from __future__ import annotations

import toolkit
from benchmarks import harness
from toolkit.tiers.redis import keys, queue

QUEUE = "bench"


def _pending_jobs(sm: toolkit.StateManager, n: int) -> list[str]:
    """``n`` pending jobs (they wait for a gate job that never completes)."""
    out: list[str] = []
    for start in range(0, n, 1000):
        size = min(1000, n - start)
        specs = [{"name": "gate", "queue": "gate"}] + [
            {**s, "depends_on": ["gate"]} for s in harness.job_specs(size)]
        wf = sm.create_workflow(f"q-{start}", jobs=specs)
        out += [j.id for j in sm.list_jobs(workflow_id=wf.id, status="pending")]
    return out


def drain(sm: toolkit.StateManager, worker: str, n: int) -> int:
    """Dequeue, start and complete jobs until ``n`` are done or the queue is empty."""
    done = 0
    while done < n:
        job = sm.dequeue(worker)
        if job is None:
            break
        sm.start_job(job.id)
        sm.complete_job(job.id)
        done += 1
    return done


def queued_jobs(sm: toolkit.StateManager, n: int) -> None:
    """Create ``n`` queued no-op jobs in workflows of 1,000."""
    for start in range(0, n, 1000):
        sm.create_workflow(f"drain-{start}", jobs=harness.job_specs(min(1000, n - start)))


def _floor(bench: harness.Bench, n: int) -> harness.Stats:
    r = bench.redis()
    key = f"bench-floor-queue:{id(r)}"

    def cycle() -> None:
        for i in range(n):
            r.zadd(key, {f"j{i}": i})
            r.zpopmin(key)

    took = harness.time_runs(cycle, bench.runs)
    r.delete(key)
    r.close()
    return harness.rate(n, took, "cycles/s")


def _redis_tier(sm: toolkit.StateManager, n: int, runs: int) -> harness.Stats:
    client, ns = sm.redis, sm.ns

    def cycle() -> None:
        for i in range(n):
            pipe = client.redis.pipeline(transaction=False)
            queue.push(ns, f"t{i}", QUEUE, 0, i, pipe=pipe)
            pipe.execute()
            claim = queue.claim(client, ns, [QUEUE], 1e12)
            assert claim is not None
            pipe = client.redis.pipeline(transaction=False)
            queue.remove(ns, claim.job_id, QUEUE, pipe=pipe)
            pipe.execute()

    return harness.rate(n, harness.time_runs(cycle, runs), "cycles/s")


def _state_manager_cycle(sm: toolkit.StateManager, n: int, runs: int) -> harness.Stats:
    worker = sm.register_worker("bench-queue").id
    pending = _pending_jobs(sm, n * runs)
    batches = iter(range(0, n * runs, n))

    def cycle() -> None:
        start = next(batches)
        for job_id in pending[start:start + n]:
            sm.enqueue(job_id)
            sm.dequeue(worker)

    return harness.rate(n, harness.time_runs(cycle, runs), "cycles/s")


def run(bench: harness.Bench) -> None:
    n = bench.n(10_000, 1_000)
    floor = _floor(bench, n)
    with bench.state_manager("queue") as sm:
        if bench.wants("queue.cycle.redis_tier"):
            bench.record("queue", "queue.cycle.redis_tier", n, _redis_tier(sm, n, bench.runs), floor,
                         harness.at_least(0.5), floor_name="ZADD + ZPOPMIN")
        if bench.wants("queue.cycle.state_manager"):
            tk = _state_manager_cycle(sm, n // 5, bench.runs)
            bench.record("queue", "queue.cycle.state_manager", n // 5, tk, floor,
                         harness.at_least(0.5), floor_name="ZADD + ZPOPMIN",
                         note="(durable: two PostgreSQL commits a cycle)")
        sm.redis.redis.unlink(keys.queue(sm.ns, QUEUE))


if __name__ == "__main__":
    harness.main(run, __doc__)
