"""A worker whose fused step's COMMIT reply is lost: PostgreSQL committed the completions and
the next claims, the worker heard ``StorageUnavailable``. Real PostgreSQL behind a TCP proxy
that drops the answer to one ``COMMIT`` and cuts that connection; real Redis."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest
import redis
from psycopg import sql

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import assert_invariants, behind_pg_proxy
from toolkit.tiers.redis import keys


def _jobs(clean: Servers) -> dict[str, tuple[str, int]]:
    q = sql.SQL("SELECT name, status, attempts FROM {}").format(
        sql.Identifier(clean.schema, "jobs"))
    with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
        return {name: (status, attempts) for name, status, attempts in conn.execute(q)}


def test_run_worker_gives_back_the_claims_and_resyncs_what_a_lost_commit_reply_hid(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with behind_pg_proxy(clean) as (sm, proxy):
        # a and b run first; c waits for both (the lost commit releases it); d, e, f after.
        sm.create_workflow("wf", jobs=[
            {"name": "a", "priority": 9}, {"name": "b", "priority": 8},
            {"name": "c", "priority": 9, "depends_on": ["a", "b"]},
            {"name": "d", "priority": 1}, {"name": "e", "priority": 1}, {"name": "f", "priority": 1}])
        sm.register_worker("w1")
        ran: list[str] = []

        def handler(job: toolkit.Job) -> None:
            ran.append(job.name)
            if len(ran) == 2:  # the step completing a and b, claiming d and e, loses its reply
                proxy.lose_next_reply()

        report = sm.run_worker("w1", handler, batch=2, idle_timeout=0)
        assert not proxy.losing, "no COMMIT reply was lost"
        # Each job ran once, in its first attempt (the lost commit's claims were given back
        # with their attempt); the released dependent ran; nothing is left running.
        assert sorted(ran) == ["a", "b", "c", "d", "e", "f"]
        assert _jobs(clean) == {n: ("completed", 1) for n in "abcdef"}
        assert (report.completed, report.failed, report.lost) == (6, 0, 0)
        assert sm.get_workflow(sm.list_workflows()[0].id).status is toolkit.WorkflowStatus.COMPLETED  # type: ignore[union-attr]
        assert_invariants(sm, raw_redis, clean.libpq_url)


_LOSE_THEN_DIE = textwrap.dedent("""
    import os, signal, sys, time, toolkit
    from toolkit.faults import TcpProxy
    db, rd, ns, schema, job_id, worker = sys.argv[1:7]
    proxy = TcpProxy.to_url(db).start()
    sm = toolkit.init_state_manager(proxy.url_for(db), rd, namespace=ns, schema=schema)
    sm._pipe.watermark.heal = None  # it dies before catching Redis up (that takes a second)
    sm.list_jobs()
    proxy.lose_next_reply()
    try:
        sm.complete_job(job_id, worker_id=worker)
    except toolkit.StorageUnavailable:
        time.sleep(7.0)  # past the fast start's 5 s margin (published every second)
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(3)  # no reply was lost
""")


def test_a_fast_start_after_a_lost_commit_reply_does_not_serve_the_stale_entry(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema) as sm:
        sm.create_workflow("wf", jobs=[{"name": "a"}, {"name": "b"}])
        sm.register_worker("w1")
        job = sm.dequeue("w1", start=True)
        assert job is not None
    child = subprocess.run([sys.executable, "-c", _LOSE_THEN_DIE, clean.database_url,
                            clean.redis_url, clean.namespace, clean.schema, job.id, "w1"],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # The fault is real: PostgreSQL completed the job, Redis still caches it running.
    assert _jobs(clean)["a"] == ("completed", 1)
    cached = raw_redis.get(keys.entity(clean.namespace, "job", job.id))
    assert cached is not None and '"status":"running"' in cached

    with toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema, rebuild="fast") as sm:
        assert sm.last_fast_start is not None  # Redis was trusted up to the watermark
        got = sm.get_job(job.id)
        assert got is not None and got.status is toolkit.JobStatus.COMPLETED
        assert_invariants(sm, raw_redis, clean.libpq_url)


def test_a_live_coordinator_catches_redis_up_after_a_lost_commit_reply(
        clean: Servers, raw_redis: redis.Redis) -> None:
    # No rebuild, no repair, no retry by the caller: the coordinator that heard
    # StorageUnavailable finds the commit that landed and brings Redis up to it.
    with behind_pg_proxy(clean) as (sm, proxy):
        sm.create_workflow("wf", jobs=[{"name": "a"}])
        sm.register_worker("w1")
        job = sm.dequeue("w1", start=True)
        assert job is not None
        proxy.lose_next_reply()
        with pytest.raises(toolkit.StorageUnavailable):
            sm.complete_job(job.id, worker_id="w1")
        assert not proxy.losing and _jobs(clean)["a"] == ("completed", 1)
        key = keys.entity(clean.namespace, "job", job.id)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and '"status":"running"' in (raw_redis.get(key) or ""):
            time.sleep(0.1)
        assert '"status":"completed"' in (raw_redis.get(key) or "")
        assert_invariants(sm, raw_redis, clean.libpq_url)
