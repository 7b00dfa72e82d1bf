"""The batched and the fused worker loops and the worker helper, SIGKILLed at random points: no
acknowledged completion is lost, and no job is handed to two workers (issue 18's reliability
criterion, items 1, 2 and 5); with the default commits and with the opt-in
``synchronous_commit="off"``, which loses nothing when only the coordinator dies."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import psycopg
import pytest
from psycopg import sql

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import assert_invariants

LOOP = r"""
import json, sys, toolkit
mode, worker, ns, schema, sync = sys.argv[1:6]
sm = toolkit.init_state_manager(namespace=ns, schema=schema, heartbeat_ttl=1.0,
                                synchronous_commit=sync)
sm.claim_lease = 1.0
sm.register_worker(worker)
print(json.dumps({"ready": worker}), flush=True)
if mode.startswith("worker"):
    def handler(job):
        print(json.dumps({"ran": job.id}), flush=True)
        return {"by": worker}
    sm.run_worker(worker, handler, batch=int(mode[len("worker"):]), idle_timeout=0)
elif mode == "fused":
    job = sm.dequeue(worker, start=True)
    while job is not None:
        done, job = sm.complete_and_dequeue(job.id, {"by": worker}, worker_id=worker,
                                            attempt=job.attempts, start=True)
        print(json.dumps({"acked": [done.id]}), flush=True)
elif mode == "fused_batch":
    jobs = sm.dequeue_many(worker, 10, start=True)
    while jobs:
        out, jobs = sm.complete_and_dequeue_many(
            [{"job_id": j.id, "result": {"by": worker}, "attempt": j.attempts} for j in jobs], 10,
            worker_id=worker, start=True)
        print(json.dumps({"acked": [o.id for o in out if isinstance(o, toolkit.Job)]}), flush=True)
else:
    while True:
        jobs = sm.dequeue_many(worker, 10, start=True)
        if not jobs:
            break
        out = sm.complete_jobs([{"job_id": j.id, "result": {"by": worker}, "attempt": j.attempts}
                                for j in jobs], worker_id=worker)
        print(json.dumps({"acked": [o.id for o in out if isinstance(o, toolkit.Job)]}), flush=True)
"""


WORKFLOWS = 4
"""Of 500 jobs each: enough that the fast loops killed early leave work to the later rounds."""


def _run_and_kill(clean: Servers, mode: str, worker: str, after: float, sync: str) -> list[str]:
    """Run one loop process and SIGKILL it ``after`` seconds after its first sign of progress
    (an ack or a handler run), so a slow machine still kills each loop mid-flight rather than
    before it did anything; its acked job ids."""
    env = {**os.environ, "DATABASE_URL": clean.database_url, "REDIS_URL": clean.redis_url}
    proc = subprocess.Popen([sys.executable, "-c", LOOP, mode, worker, clean.namespace, clean.schema,
                             sync], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert "ready" in first, first
    seen = [proc.stdout.readline()]  # blocks until the loop has done something (or ran dry)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    return [j for line in [*seen, *out.splitlines()] if line.strip()
            for j in json.loads(line).get("acked", [])]


def _drain(sm: toolkit.StateManager, worker: str, seconds: float = 40.0) -> None:
    sm.register_worker(worker)
    deadline = time.monotonic() + seconds
    while not all(j.is_final for j in sm.list_jobs()):
        assert time.monotonic() < deadline, [j for j in sm.list_jobs() if not j.is_final][:5]
        jobs = sm.dequeue_many(worker, 50, start=True, timeout=0.3)
        if jobs:
            out = sm.complete_jobs([(j.id, {"by": worker}) for j in jobs], worker_id=worker)
            assert all(isinstance(o, toolkit.Job) for o in out), out


@pytest.mark.parametrize("sync", ["on", "off"])
def test_batched_fused_and_worker_loops_killed_at_random_lose_no_acked_completion(
        clean: Servers, make_sm, raw_redis, sync: str) -> None:
    rng = random.Random(18)
    setup = make_sm(heartbeat_ttl=1.0)
    for k in range(WORKFLOWS):  # the second half of each workflow waits for the first (releases)
        setup.create_workflow(f"wf{k}", jobs=[
            {"name": f"j{i}", "max_attempts": 20, "depends_on": [f"j{i - 250}"] if i >= 250 else []}
            for i in range(500)])
    setup.close()
    acked: dict[str, str] = {}
    for round_ in range(15):
        mode = ("batch", "fused", "worker1", "worker10", "fused_batch")[round_ % 5]
        worker = f"{mode}-{round_}"
        for job_id in _run_and_kill(clean, mode, worker, rng.uniform(0.0, 0.4), sync):
            assert job_id not in acked, f"{job_id} acked twice"
            acked[job_id] = worker
    assert len(set(acked.values())) >= 5, "most loops acknowledged nothing before they were killed"

    time.sleep(1.3)  # the killed workers' heartbeats and claim leases expire
    sm = make_sm(heartbeat_ttl=1.0)  # a new coordinator: rebuild from PostgreSQL
    sm.reap_dead_workers()
    _drain(sm, "final")

    schema = sql.Identifier(clean.schema)
    with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
        results = dict(conn.execute(sql.SQL(
            "SELECT id, result->>'by' FROM {}.jobs WHERE status = 'completed'").format(schema)))
        completions = Counter(r[0] for r in conn.execute(sql.SQL(
            "SELECT job_id FROM {}.job_events WHERE event = 'completed'").format(schema)))
        finished = Counter(r[0] for r in conn.execute(sql.SQL(
            "SELECT job_id FROM {}.job_assignments WHERE status = 'completed'").format(schema)))
    assert len(results) == WORKFLOWS * 500
    for job_id, worker in acked.items():  # every acknowledged completion stands, as acked
        assert results[job_id] == worker, (job_id, worker, results[job_id])
    assert set(completions.values()) == {1} and len(completions) == WORKFLOWS * 500
    assert set(finished.values()) == {1} and len(finished) == WORKFLOWS * 500
    assert_invariants(sm, raw_redis, clean.libpq_url)
