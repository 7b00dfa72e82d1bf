"""Rebuild after a crash: ``init_state_manager`` on L live jobs and H finished ones.

    python -m benchmarks.recovery [--quick] [--target ...]

One schema grows in three steps (rows bulk-loaded with COPY, not timed):
(L/10 live, H finished), then (L, H), then (L, 2H). At each step Redis is
emptied (our namespace only) before every run, and the time of
``init_state_manager`` (connect, migrate check, ``_rebuild_from_db``) is taken.
Full: L = H = 1,000,000; quick: 10,000.

Cases
-----
rebuild.rate
    Live jobs/s at (L, H) against the floor at the same state: ``COPY (SELECT
    live jobs) TO STDOUT (FORMAT BINARY)``, every record into a dict, and one
    pipelined ``SET`` per job; PostgreSQL encodes each record as JSON
    (``row_to_json``), the floor parses nothing. Goal: >= 50% of the floor.
rebuild.rate_absolute
    The same rate. Goal: >= 38,000 jobs/s.
rebuild.history_x2
    Time at (L, 2H) over time at (L, H). Goal: < 1.10 (history must not matter).
rebuild.live_x10
    Time at (L, H) over time at (L/10, H). Goal: <= 11 (linear in live state).
rebuild.fast_start_first_dequeue
    At (L, H), Redis intact: a coordinator process (fast start) claims and starts a few
    jobs and is SIGKILLed with a claim in flight; then seconds from
    ``init_state_manager(rebuild="fast")`` to the first job handed out by ``dequeue``,
    against the full rebuild's time at the same state. Goal: <= 1 s absolute.

The rebuild floor's clean-up (SCAN + UNLINK of its keys) is not timed.
"""

from __future__ import annotations

import gc
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from psycopg import sql

import toolkit
from benchmarks import harness

FLOOR_PREFIX = "bench-floor-rebuild:"
CHUNK = 5000


def _rebuild_times(bench: harness.Bench, ns: str, schema: str, live: int) -> list[float]:
    out: list[float] = []
    for _ in range(bench.runs if bench.quick else 3):
        bench.wipe(ns)
        gc.collect()
        out.append(_open_and_check(bench, ns, schema, live))
    return out


def _open_and_check(bench: harness.Bench, ns: str, schema: str, live: int) -> float:
    """Seconds ``init_state_manager`` takes (closing it, which waits for a thread, is not timed)."""
    started = time.perf_counter()
    sm = toolkit.init_state_manager(bench.target.database_url, bench.target.redis_url,
                                    namespace=ns, schema=schema)
    took = time.perf_counter() - started
    report = sm.last_rebuild
    sm.close()
    assert report is not None and report.jobs == live, report
    return took


KILLED = """
import sys, time, toolkit
sm = toolkit.init_state_manager(sys.argv[1], sys.argv[2], namespace=sys.argv[3], schema=sys.argv[4],
                                rebuild="fast")
sm.register_worker("bench-doomed")
for _ in range(3):  # jobs stay live (running, assigned): the rebuild cases count them
    sm.dequeue("bench-doomed", start=True)
sm.heartbeat("bench-doomed")
sm.dequeue("bench-doomed")  # a claim in flight when it dies
print("ready", flush=True)
time.sleep(600)
"""


def _kill_a_coordinator(bench: harness.Bench, ns: str, schema: str) -> None:
    """Run a coordinator that writes, then SIGKILL it (untimed): what the fast start follows."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED, bench.target.database_url,
                             bench.target.redis_url, ns, schema], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert line.strip() == "ready", line


def _fast_first_dequeue(bench: harness.Bench, ns: str, schema: str) -> float:
    """Seconds from a fast start to the first dequeued job, after a coordinator was SIGKILLed."""
    _kill_a_coordinator(bench, ns, schema)
    started = time.perf_counter()
    sm = toolkit.init_state_manager(bench.target.database_url, bench.target.redis_url,
                                    namespace=ns, schema=schema, rebuild="fast")
    sm.register_worker("bench-fast")
    job = sm.dequeue("bench-fast")
    took = time.perf_counter() - started
    quick = sm.last_fast_start
    sm.close()
    assert quick is not None and job is not None, (quick, job)
    return took


def _floor_once(bench: harness.Bench, schema: str) -> int:
    """COPY the live jobs out (PostgreSQL encodes each as JSON), into a dict and pipelined SETs."""
    query = sql.SQL("COPY (SELECT id, row_to_json(j)::text FROM {} AS j "
                    "WHERE status NOT IN ('completed', 'cancelled')) TO STDOUT (FORMAT BINARY)").format(
        sql.Identifier(schema, "jobs"))
    records: dict[str, str] = {}
    r = bench.redis()
    pipe = r.pipeline(transaction=False)
    with bench.pg() as conn, conn.cursor() as cur, cur.copy(query) as copy:
        copy.set_types(["text", "text"])
        for job_id, record in copy.rows():
            records[job_id] = record
            pipe.set(FLOOR_PREFIX + job_id, record)
            if len(pipe) >= CHUNK:
                pipe.execute()
    pipe.execute()
    r.close()
    return len(records)


def _floor_times(bench: harness.Bench, schema: str) -> list[float]:
    """Three timed floors, each followed by its untimed clean-up."""
    out = []
    for _ in range(3):
        out.append(harness.time_once(lambda: _floor_once(bench, schema)))
        r = bench.redis()
        harness.unlink_prefix(r, FLOOR_PREFIX + "*")
        r.close()
    return out


RSS_CHILD = """
import json, sys, toolkit
from benchmarks.harness import rss_mb
before = rss_mb()
sm = toolkit.init_state_manager(sys.argv[1], sys.argv[2], namespace=sys.argv[3], schema=sys.argv[4])
after = rss_mb()
print(json.dumps({"before_mb": before, "after_mb": after, "jobs": sm.last_rebuild.jobs}))
sm.close()
"""


def _rss_of_rebuild(bench: harness.Bench, ns: str, schema: str) -> dict[str, float]:
    """RSS of a fresh process before and after ``init_state_manager`` (its own interpreter)."""
    bench.wipe(ns)
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, bench.target.database_url,
                          bench.target.redis_url, ns, schema], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parent.parent)
    found: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return found


def _measure_steps(bench: harness.Bench, ns: str, schema: str, live: int,
                   history: int) -> dict[str, list[float]]:
    base = live // 10
    times: dict[str, list[float]] = {}
    harness.add_raw_jobs(bench, schema, base, status="queued")
    harness.add_raw_jobs(bench, schema, history, status="completed")
    times["base"] = _rebuild_times(bench, ns, schema, base)
    harness.add_raw_jobs(bench, schema, live - base, status="queued", seq0=base)
    times["main"] = _rebuild_times(bench, ns, schema, live)
    times["floor"] = _floor_times(bench, schema)
    times["fast"] = [_fast_first_dequeue(bench, ns, schema) for _ in range(3)]
    rss = _rss_of_rebuild(bench, ns, schema)
    times["rss_mb"] = [rss["before_mb"], rss["after_mb"]]
    harness.add_raw_jobs(bench, schema, history, status="completed")
    times["history_x2"] = _rebuild_times(bench, ns, schema, live)
    return times


def run(bench: harness.Bench) -> None:
    live = history = bench.n(1_000_000, 10_000)
    with bench.state_manager("rebuild") as sm:
        ns, schema = sm.ns, sm.settings.schema
        t = _measure_steps(bench, ns, schema, live, history)
    before, after = t["rss_mb"]
    extra = {"live": live, "history": history, "rss_mb_before_rebuild": round(before, 1),
             "rss_mb_after_rebuild": round(after, 1),
             "rss_bytes_per_live_job": round((after - before) * 2**20 / live)}
    rate, floor = harness.rate(live, t["main"], "jobs/s"), harness.rate(live, t["floor"], "jobs/s")
    bench.record("recovery", "rebuild.rate", live, rate, floor, harness.at_least(0.5),
                 floor_name="COPY BINARY out + dict + pipelined SET", extra=extra)
    bench.record("recovery", "rebuild.rate_absolute", live, rate, None, harness.absolute_min(38_000),
                 extra=extra)
    bench.record("recovery", "rebuild.fast_start_first_dequeue", live, harness.duration(t["fast"]),
                 harness.duration(t["main"]), harness.absolute_max(1.0),
                 floor_name="full rebuild at the same state", extra=extra)
    bench.record("recovery", "rebuild.history_x2", live, harness.duration(t["history_x2"]),
                 harness.duration(t["main"]), harness.at_most(1.10), floor_name=f"time at H={history:,}",
                 extra=extra)
    bench.record("recovery", "rebuild.live_x10", live, harness.duration(t["main"]),
                 harness.duration(t["base"]), harness.at_most(11.0),
                 floor_name=f"time at L={live // 10:,}", extra=extra)


if __name__ == "__main__":
    harness.main(run, __doc__)
