"""Scheduled jobs survive what a coordinator and Redis go through: a SIGKILL between
scheduling and promotion, a Redis restart with due jobs pending. None is lost, none is
handed out before its time, none is handed out twice (issue 15, item 7)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Literal

import pytest

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import Private, assert_invariants, retry_storage, schedule_census


def _drain_on_time(sm: toolkit.StateManager, worker: str, expected: int,
                   seconds: float = 8.0) -> Counter[str]:
    """Take jobs until ``expected`` came; each must come at or after its run_at, once."""
    sm.register_worker(worker)
    got: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and sum(got.values()) < expected:
        job = sm.dequeue(worker, timeout=0.05)
        if job is None:
            continue
        taken = time.time()
        if job.run_at is not None:
            assert taken >= job.run_at.timestamp(), (job.name, taken - job.run_at.timestamp())
        got[job.id] += 1
        sm.start_job(job.id)
        sm.complete_job(job.id)
    time.sleep(0.3)
    assert sm.dequeue(worker) is None  # nothing more, nothing twice
    return got


_CHILD = textwrap.dedent("""
    import os, signal, sys
    import toolkit
    from toolkit import failpoints
    db, rd, ns, schema, when = sys.argv[1:6]
    sm = toolkit.init_state_manager(db, rd, namespace=ns, schema=schema, heartbeat_ttl=1.0)
    sm.create_workflow("warm")  # a write Redis agreed with: the next start may be the fast one
    jobs = [{"name": f"s{i}", "delay": 1.5} for i in range(4)] + [{"name": "now"}]
    if when == "after_commit":  # PostgreSQL has the schedule, Redis never hears of it
        failpoints.arm("after_commit", lambda detail: os.kill(os.getpid(), signal.SIGKILL))
    sm.create_workflow("sched", jobs=jobs)
    os.kill(os.getpid(), signal.SIGKILL)  # scheduled in both tiers; dies before promotion
""")


@pytest.mark.parametrize(("when", "start"), [("after_commit", True), ("after_write", True),
                                             ("after_commit", "fast")])
def test_a_coordinator_killed_between_scheduling_and_promotion_loses_nothing(
        clean: Servers, raw_redis, when: str, start: bool | Literal["fast"]) -> None:
    child = subprocess.run([sys.executable, "-c", _CHILD, clean.database_url, clean.redis_url,
                            clean.namespace, clean.schema, when],
                           env=os.environ.copy(), capture_output=True, text=True, timeout=60,
                           check=False)
    assert child.returncode == -signal.SIGKILL, child.stderr
    in_redis = sum(schedule_census(raw_redis, clean.namespace).values())
    assert in_redis == (0 if when == "after_commit" else 4)  # the fault happened for real
    sm = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema, heartbeat_ttl=1.0, rebuild=start)
    try:
        # the fast start checks only what changed since Redis last agreed, the full one all
        assert (sm.last_fast_start is not None) == (start == "fast")
        assert_invariants(sm, raw_redis, clean.libpq_url)
        got = _drain_on_time(sm, "survivor", 5)
        assert len(got) == 5 and set(got.values()) == {1}, got
        assert_invariants(sm, raw_redis, clean.libpq_url)
    finally:
        sm.close()


def test_a_redis_restart_with_due_jobs_pending_loses_none_and_runs_none_early(
        private: Private) -> None:
    sm = private.manager()
    raw = private.raw_redis()
    try:
        sm.create_workflow("sched", jobs=[{"name": f"soon{i}", "delay": 0.3} for i in range(3)]
                           + [{"name": f"later{i}", "delay": 2.5} for i in range(3)])
        private.stack.restart_redis()  # every key gone; the first three fall due meanwhile
        time.sleep(0.4)
        report = retry_storage(sm.repair)
        assert not report.ok  # it found the empty Redis ...
        assert_invariants(sm, raw, private.libpq_url)  # ... and restored queues and schedule
        got = _drain_on_time(sm, "w", 6)
        assert len(got) == 6 and set(got.values()) == {1}, got
        assert_invariants(sm, raw, private.libpq_url)
    finally:
        raw.close()
        sm.close()

