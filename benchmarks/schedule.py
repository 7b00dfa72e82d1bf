"""Scheduled jobs: how fast due jobs are promoted, and what a big schedule costs ``dequeue``.

    python -m benchmarks.schedule [--quick] [--target ...]

Cases
-----
schedule.promote.vs_floor
    N due jobs (full 100,000; quick 5,000) in a queue's due-time set (due in the past),
    moved into the queue by the toolkit's promotion (``schedule.promote``: the script
    ``dequeue`` runs, ``promote_due.lua``, 1,000 a call) called back to back until the
    set is empty, jobs/s. Floor: a hand-written Lua script on the same data
    (``ZRANGEBYSCORE ... LIMIT 0 1000``, one ``ZADD`` and one ``ZREM`` of the batch),
    called the same way. Goal: >= 50% of the floor.
schedule.promote.via_dequeue
    The same N promoted by the manager's ``Promoter`` as ``dequeue`` calls it (at most
    one script call per 0.1 s per set of queues): the rate a polling worker sees.
    Reported beside the floor (its rate is capped at 1,000 / 0.1 s by design).
schedule.dequeue.vs_empty_schedule
    ``sm.dequeue(worker, queues=[q])`` per call from a queue whose due-time set holds
    S future jobs (full 100,000; quick 5,000, made by ``create_workflow`` with a delay
    of an hour), against the same call on a queue with an empty schedule, the two
    interleaved call by call in the same run. Goal: p50 ratio <= 1.2 (within noise).
schedule.dequeue_promote_each.vs_empty_schedule
    The same with the promotion's rate limit off (``PROMOTE_EVERY = 0``): the script
    runs on every call, the worst case. Goal: p50 ratio <= 1.2.
"""

from __future__ import annotations

import time
from typing import Any

import toolkit
from benchmarks import harness
from toolkit.manager import scheduling
from toolkit.tiers.redis import keys, schedule

QUEUE = "bench-due"

_FLOOR_LUA = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #due == 0 then return 0 end
local args = {}
for i, id in ipairs(due) do args[#args + 1] = i; args[#args + 1] = id end
redis.call('ZADD', KEYS[2], unpack(args))
redis.call('ZREM', KEYS[1], unpack(due))
return #due
"""


def _fill_toolkit(sm: toolkit.StateManager, n: int) -> None:
    """N due jobs in QUEUE's due-time set, the queue emptied (untimed)."""
    past = time.time() - 3600
    sm.redis.redis.unlink(keys.queue(sm.ns, QUEUE), keys.scheduled(sm.ns, QUEUE))
    pipe = sm.redis.redis.pipeline(transaction=False)
    schedule.add_many(sm.ns, [(f"p{i}", QUEUE, i % 5, i, past + i * 1e-3) for i in range(n)],
                      pipe=pipe)
    pipe.execute()


def _promote_all(sm: toolkit.StateManager, n: int) -> None:
    moved = 0
    while moved < n:
        moved += schedule.promote(sm.redis, sm.ns, [QUEUE], time.time())


def _promote_via_dequeue(sm: toolkit.StateManager, n: int) -> None:
    promoter = scheduling.Promoter(sm._dispatch.promoter.tiers)  # a fresh limiter, as dequeue's
    moved = 0
    while moved < n:
        moved += promoter.run([QUEUE])


def _floor_promotion(bench: harness.Bench, n: int) -> harness.Stats:
    r = bench.redis()
    src, dst = f"bench-floor-sched:{id(r)}", f"bench-floor-due:{id(r)}"
    script = r.register_script(_FLOOR_LUA)
    past = time.time() - 3600

    def fill() -> None:
        r.unlink(src, dst)
        pipe = r.pipeline(transaction=False)
        for start in range(0, n, 1000):
            pipe.zadd(src, {f"p{i}": past + i * 1e-3 for i in range(start, min(n, start + 1000))})
        pipe.execute()

    def promote_all() -> None:
        moved = 0
        while moved < n:
            moved += int(script(keys=[src, dst], args=[repr(time.time()), 1000]))

    took = harness.time_runs(promote_all, bench.runs, setup=fill)
    r.unlink(src, dst)
    r.close()
    return harness.rate(n, took, "jobs/s")


def _queued(sm: toolkit.StateManager, queue_name: str, n: int, **extra: Any) -> None:
    for start in range(0, n, 1000):
        specs = [{**s, "queue": queue_name, **extra} for s in harness.job_specs(min(1000, n - start))]
        sm.create_workflow(f"{queue_name}-{start}", jobs=specs)


def _interleaved(sm: toolkit.StateManager, worker: str, m: int) -> tuple[list[float], list[float]]:
    """Per-call seconds of dequeue from ``busy`` and from ``plain``, alternating."""
    busy: list[float] = []
    plain: list[float] = []
    clock = time.perf_counter
    for i in range(-20, m):
        for name, out in (("busy", busy), ("plain", plain)):
            started = clock()
            got = sm.dequeue(worker, queues=[name])
            took = clock() - started
            assert got is not None, f"queue {name} ran dry"
            if i >= 0:
                out.append(took)
    return busy, plain


def _dequeue_cases(bench: harness.Bench) -> None:
    s, m = bench.n(100_000, 5_000), bench.n(2_000, 300)
    with bench.state_manager("sched_deq") as sm:
        _queued(sm, "plain", 2 * (m + 20))
        _queued(sm, "busy", 2 * (m + 20))
        _queued(sm, "busy", s, delay=3600.0)
        worker = sm.register_worker("bench-sched").id
        assert sm.redis.redis.zcard(keys.scheduled(sm.ns, "busy")) == s
        for case, every in (("schedule.dequeue.vs_empty_schedule", scheduling.PROMOTE_EVERY),
                            ("schedule.dequeue_promote_each.vs_empty_schedule", 0.0)):
            saved = scheduling.PROMOTE_EVERY
            scheduling.PROMOTE_EVERY = every
            try:
                busy, plain = _interleaved(sm, worker, m)
            finally:
                scheduling.PROMOTE_EVERY = saved
            if bench.wants(case):
                bench.record("schedule", case, m, harness.latency(busy), harness.latency(plain),
                             harness.at_most(1.2), floor_name="dequeue, empty schedule",
                             note=f"({s:,} future jobs scheduled in the queue; calls interleaved)")


def run(bench: harness.Bench) -> None:
    n = bench.n(100_000, 5_000)
    if bench.wants("schedule.promote"):
        floor = _floor_promotion(bench, n)
        with bench.state_manager("sched_promote") as sm:
            tk = harness.rate(n, harness.time_runs(lambda: _promote_all(sm, n), bench.runs,
                                                   setup=lambda: _fill_toolkit(sm, n)), "jobs/s")
            bench.record("schedule", "schedule.promote.vs_floor", n, tk, floor,
                         harness.at_least(0.5), floor_name="Lua ZRANGEBYSCORE + ZADD + ZREM",
                         note="(1,000 per script call, back to back)")
            via = harness.rate(n, harness.time_runs(lambda: _promote_via_dequeue(sm, n),
                                                    bench.runs, setup=lambda: _fill_toolkit(sm, n)),
                               "jobs/s")
            bench.record("schedule", "schedule.promote.via_dequeue", n, via, floor,
                         harness.at_least(0.0), floor_name="Lua ZRANGEBYSCORE + ZADD + ZREM",
                         note="(dequeue's Promoter: one call per 0.1 s; reported)")
    if bench.wants("schedule.dequeue"):
        _dequeue_cases(bench)


if __name__ == "__main__":
    harness.main(run, __doc__)
