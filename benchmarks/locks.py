"""Locks and heartbeats against their raw Redis floors.

    python -m benchmarks.locks [--quick] [--target ...]

Cases
-----
locks.acquire_release
    ``with sm.lock(name, blocking_timeout=0): pass`` (Lua ``SET NX PX`` + fencing
    ``INCR``, then the Lua compare-and-delete release), in cycles/s. Floor: raw
    ``SET NX PX`` + Lua release (``EVALSHA``). Goal: >= 80% of the floor.
locks.heartbeats
    ``sm.heartbeat_many(ids)`` for W registered workers (10,000 full), 1,000 a
    call, in beats/s.
    Floor: one pipeline of W ``SET ... EX``. Goal: >= 50% of the floor.
"""

from __future__ import annotations

import secrets

import toolkit
from benchmarks import harness

RELEASE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
           "else return 0 end")


def _locks(bench: harness.Bench, sm: toolkit.StateManager, n: int) -> None:
    r = bench.redis()
    release = r.register_script(RELEASE)
    key = f"bench-floor-lock:{secrets.token_hex(4)}"

    def floor() -> None:
        for _ in range(n):
            token = secrets.token_hex(16)
            assert r.set(key, token, nx=True, px=30_000)
            release(keys=[key], args=[token])

    def tk() -> None:
        for _ in range(n):
            with sm.lock("bench", blocking_timeout=0):
                pass

    tk_s, floor_s = harness.paired_runs(tk, floor, bench.runs)
    r.close()
    bench.record("locks", "locks.acquire_release", n, harness.rate(n, tk_s, "cycles/s"),
                 harness.rate(n, floor_s, "cycles/s"), harness.at_least(0.8),
                 floor_name="SET NX PX + Lua release")


def _beats_floor(bench: harness.Bench, ids: list[str]) -> harness.Stats:
    r = bench.redis()

    def beat_all() -> None:
        pipe = r.pipeline(transaction=False)
        for w in ids:
            pipe.set(f"bench-floor-hb:{w}", "1", ex=30)
        pipe.execute()

    took = harness.time_runs(beat_all, 3)
    harness.unlink_prefix(r, "bench-floor-hb:*")
    r.close()
    return harness.rate(len(ids), took, "beats/s")


def _beats_toolkit(sm: toolkit.StateManager, ids: list[str]) -> harness.Stats:
    def beat_all() -> None:
        for start in range(0, len(ids), 1000):
            sm.heartbeat_many(ids[start:start + 1000])

    return harness.rate(len(ids), harness.time_runs(beat_all, 3), "beats/s")


def run(bench: harness.Bench) -> None:
    n = bench.n(20_000, 2_000)
    workers = bench.n(10_000, 1_000)
    with bench.state_manager("locks") as sm:
        if bench.wants("locks.acquire_release"):
            _locks(bench, sm, n)
        if bench.wants("locks.heartbeats"):
            ids = [sm.register_worker(f"hb-{i}").id for i in range(workers)]
            bench.record("locks", "locks.heartbeats", workers, _beats_toolkit(sm, ids),
                         _beats_floor(bench, ids), harness.at_least(0.5),
                         floor_name="pipelined SET EX",
                         note="(heartbeat_many, 1,000 workers a call)")


if __name__ == "__main__":
    harness.main(run, __doc__)
