"""Metric counters against raw ``HINCRBY``.

    python -m benchmarks.counters [--quick] [--target ...]

Cases
-----
counters.incr_single
    ``sm.incr_metric(name)`` one call at a time (Lua: total + time bucket), in
    ops/s. Floor: raw ``HINCRBY``, one at a time. Goal: >= 70% of the floor.
counters.incr_batched
    N increments over 100 counter names, ``sm.incr_metrics`` with the 100 names a
    call (each also counts its time bucket). Floor: the same N ``HINCRBY`` in one
    pipeline. Goal: >= 50% of the floor.
"""

from __future__ import annotations

import secrets

import redis

import toolkit
from benchmarks import harness

NAMES = [f"m{i}" for i in range(100)]


def _loop(sm: toolkit.StateManager, n: int) -> None:
    for i in range(n):
        sm.incr_metric(NAMES[i % len(NAMES)])


def _batched(sm: toolkit.StateManager, n: int) -> None:
    for _ in range(0, n, len(NAMES)):
        sm.incr_metrics(dict.fromkeys(NAMES, 1))


def _raw_single(r: redis.Redis, key: str, n: int) -> None:
    for i in range(n):
        r.hincrby(key, NAMES[i % len(NAMES)], 1)


def _raw_pipelined(r: redis.Redis, key: str, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.hincrby(key, NAMES[i % len(NAMES)], 1)
    pipe.execute()


def run(bench: harness.Bench) -> None:
    n = bench.n(50_000, 5_000)
    r = bench.redis()
    key = f"bench-floor-metrics:{secrets.token_hex(4)}"
    with bench.state_manager("counters") as sm:
        if bench.wants("counters.incr_single"):
            tk, floor = harness.paired_runs(lambda: _loop(sm, n), lambda: _raw_single(r, key, n),
                                            bench.runs)
            bench.record("counters", "counters.incr_single", n, harness.rate(n, tk),
                         harness.rate(n, floor), harness.at_least(0.7), floor_name="HINCRBY")
        if bench.wants("counters.incr_batched"):
            tk, floor = harness.paired_runs(lambda: _batched(sm, n),
                                            lambda: _raw_pipelined(r, key, n), bench.runs)
            bench.record("counters", "counters.incr_batched", n, harness.rate(n, tk),
                         harness.rate(n, floor), harness.at_least(0.5),
                         floor_name="pipelined HINCRBY",
                         note="(incr_metrics, 100 counters a call)")
    r.delete(key)
    r.close()


if __name__ == "__main__":
    harness.main(run, __doc__)
