"""Load: many processes on one queue, one lock, one counter; a thousand heart-beating workers.

All ``slow`` (run with ``pytest -m slow``). Child processes talk to the servers through
the toolkit only; the parent checks the outcome in PostgreSQL and Redis.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
import redis

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import assert_invariants, run_children
from toolkit.tiers.redis import keys, metrics

pytestmark = pytest.mark.slow

DRAIN = r"""
import json, sys, toolkit
ns, schema, wid = sys.argv[1:4]
sm = toolkit.init_state_manager(namespace=ns, schema=schema, rebuild=False)
sm.register_worker(wid)
done, empty = [], 0
while empty < 3:
    job = sm.dequeue(wid, timeout=0.3)
    if job is None:
        empty += 1
        continue
    empty = 0
    sm.start_job(job.id, worker_id=wid, attempt=job.attempts)
    sm.complete_job(job.id, worker_id=wid, attempt=job.attempts)
    done.append(job.id)
print(json.dumps(done))
sm.close()
"""

COUNT = r"""
import sys, toolkit
ns, schema, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
sm = toolkit.init_state_manager(namespace=ns, schema=schema, rebuild=False)
for _ in range(n):
    sm.incr_metric("hits")
sm.close()
"""


def test_eight_processes_drain_2000_jobs_during_rebuilds_each_job_assigned_once(
        sm: toolkit.StateManager, clean: Servers, raw_redis) -> None:
    for w in range(4):
        sm.create_workflow(f"load{w}", jobs=[
            {"name": f"j{i}", "id": f"w{w}-j{i:03d}", "priority": (i * 7) % 5 - 2}
            for i in range(500)])
    rebuilds: list[Any] = []

    def rebuild_twice() -> None:
        time.sleep(1.0)
        rebuilds.append(sm.rebuild())
        time.sleep(1.0)
        rebuilds.append(sm.rebuild())

    rebuilder = threading.Thread(target=rebuild_twice, daemon=True)
    rebuilder.start()
    outs = run_children(clean, DRAIN, [[f"proc-{i}"] for i in range(8)], timeout=240)
    rebuilder.join(60)
    assert len(rebuilds) == 2
    done = Counter(j for out in outs for j in json.loads(out))
    assert len(done) == 2000 and set(done.values()) == {1}, done.most_common(3)
    per_job = Counter(a.job_id for a in sm.list_assignments())
    assert len(per_job) == 2000 and set(per_job.values()) == {1}, per_job.most_common(3)
    assert all(j.status == "completed" for j in sm.list_jobs())
    assert_invariants(sm, raw_redis, clean.libpq_url)


def _contend(redis_url: str, ns: str, barrier: Any, out: Any) -> None:
    from toolkit.lock import Lock
    from toolkit.tiers.redis.client import Client

    client = Client(redis_url)
    raw = redis.Redis.from_url(redis_url, decode_responses=True)
    lock = Lock(client, ns, "hot", ttl=10, blocking_timeout=120)
    barrier.wait(60)
    assert lock.acquire()
    inside = raw.incr(f"{{{ns}}}:test:inside")
    raw.rpush(f"{{{ns}}}:test:order", lock.fencing_token)
    time.sleep(0.002)
    raw.decr(f"{{{ns}}}:test:inside")
    lock.release()
    out.put(inside)
    client.close()
    raw.close()


def test_hundred_processes_on_one_lock_never_overlap_and_fences_grow(
        sm: toolkit.StateManager, clean: Servers, raw_redis) -> None:
    with sm.lock("hot"):  # reserves a block of fencing tokens in PostgreSQL
        pass
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["toolkit", "toolkit.lock", "tests.reliability.test_load"])
    n = 100
    barrier, out = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(clean.redis_url, sm.ns, barrier, out))
             for _ in range(n)]
    for p in procs:
        p.start()
    try:
        inside = [out.get(timeout=180) for _ in range(n)]
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    assert inside == [1] * n, "two processes held the lock at once"
    order = [int(x) for x in raw_redis.lrange(f"{{{sm.ns}}}:test:order", 0, -1)]
    assert len(order) == n and all(a < b for a, b in itertools.pairwise(order)), order


def test_thousand_workers_heartbeating_never_listed_inactive_and_pg_writes_throttled(
        make_sm, clean: Servers) -> None:
    sm = make_sm(heartbeat_ttl=2.0)
    n, seconds, period = 1000, 10.0, 0.1
    ids = [f"hb-{i:04d}" for i in range(n)]
    for w in ids:
        sm.register_worker(w)
    with psycopg.connect(clean.libpq_url, autocommit=True) as pg:
        def updates() -> int:
            pg.execute("SELECT pg_stat_clear_snapshot()")
            pg.execute("SELECT pg_sleep(1.2)")  # let backends flush their table stats
            return int(pg.execute("SELECT n_tup_upd FROM pg_stat_user_tables "
                                  "WHERE schemaname = %s AND relname = 'workers'",
                                  (clean.schema,)).fetchone()[0])

        before = updates()
        stop = threading.Event()
        beats = Counter()
        last_beat: dict[str, float] = {}  # wall time just before the latest successful beat
        errors: list[BaseException] = []

        def beat(chunk: list[str]) -> None:
            while not stop.is_set():
                started = time.monotonic()
                for w in chunk:
                    try:
                        sent = time.time()
                        sm.heartbeat(w)
                        beats[w] += 1
                        last_beat[w] = sent
                    except BaseException as exc:
                        errors.append(exc)
                stop.wait(max(0.0, period - (time.monotonic() - started)))

        threads = [threading.Thread(target=beat, args=(ids[i::20],), daemon=True) for i in range(20)]
        for t in threads:
            t.start()
        started, checks, inactive, late = time.monotonic(), 0, [], 0
        while time.monotonic() - started < seconds:
            time.sleep(0.5)
            seen = dict(last_beat)  # beats that began before this check
            listed = sm.inactive_workers()
            # A worker whose last beat began within the TTL of the end of the check cannot
            # have expired when the check read Redis: listing it would be a false alarm.
            cutoff = time.time() - sm.settings.heartbeat_ttl
            inactive += [w for w in listed if seen.get(w, 0.0) >= cutoff]
            late += sum(1 for w in ids if seen.get(w, 0.0) < cutoff)
            checks += 1
        stop.set()
        for t in threads:
            t.join(10)
        elapsed = time.monotonic() - started
        after = updates()
    assert not errors, errors[:3]
    assert not inactive, f"{len(set(inactive))} live workers listed inactive"
    # The load generator itself must keep most workers inside the TTL, or the check above
    # would hold for want of live workers (this 2-core machine gives ~1,500 beats/s).
    assert late <= checks * n // 10, (late, checks)
    assert checks >= 10 and min(beats.values()) >= 5
    total = sum(beats.values())
    # One batched UPDATE per flush interval (heartbeat_ttl / 3, at least 1 s) per worker at most.
    allowed = n * (elapsed / 1.0 + 3)
    assert after - before <= allowed, (after - before, allowed, total)
    # Throttled: fewer row updates than heartbeats (each worker beats more than once per
    # flush interval here; the bound above is the throttle itself: one write per interval).
    assert after - before < total, (after - before, total)
    print(f"\n{total} heartbeats in {elapsed:.1f}s ({total / elapsed:.0f}/s), "
          f"{after - before} PostgreSQL row updates, {late} worker-checks past the TTL")


def test_eight_processes_incr_metric_count_exactly_and_buckets_sum_to_total(
        sm: toolkit.StateManager, clean: Servers, raw_redis) -> None:
    per = 10_000
    run_children(clean, COUNT, [[str(per)] for _ in range(8)], timeout=300)
    assert sm.get_metric("hits") == 8 * per
    buckets = raw_redis.hgetall(keys.metric_buckets(sm.ns, "hits"))
    assert sum(int(v) for v in buckets.values()) == 8 * per
    assert all(int(k) % metrics.BUCKET_SECONDS == 0 for k in buckets)
