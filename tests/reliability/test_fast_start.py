"""The fast start: a new coordinator checks only what changed since Redis last agreed.

Faults are real: a coordinator SIGKILLs itself between a commit and its Redis
update (a fail point armed in a child process), Redis loses the namespace.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import redis

import toolkit
from tests.conftest import Servers, wipe_namespace
from tests.reliability.conftest import assert_invariants
from toolkit.manager.watermark import Watermark
from toolkit.tiers.redis import keys

_DELETE_THEN_DIE = textwrap.dedent("""
    import os, signal, sys, toolkit
    from toolkit import failpoints
    db, rd, ns, schema, victim = sys.argv[1:6]
    sm = toolkit.init_state_manager(db, rd, namespace=ns, schema=schema)
    def die(action):
        if action == "delete workflow":
            os.kill(os.getpid(), signal.SIGKILL)
    failpoints.arm("after_commit", die)
    sm.delete_workflow(victim)
""")


def _start(clean: Servers, **kwargs: object) -> toolkit.StateManager:
    return toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                      schema=clean.schema, **kwargs)  # type: ignore[arg-type]


def test_a_delete_cut_off_before_redis_is_never_served_after_a_fast_start(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with _start(clean) as sm:
        victim = sm.create_workflow("victim", jobs=[{"name": "a"}, {"name": "b"}])
        keep = sm.create_workflow("keep", jobs=[{"name": "c"}])
        job_ids = [j.id for j in sm.list_jobs(workflow_id=victim.id)]
    child = subprocess.run([sys.executable, "-c", _DELETE_THEN_DIE, clean.database_url,
                            clean.redis_url, clean.namespace, clean.schema, victim.id],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    # The fault is real: PostgreSQL deleted, Redis still caches and queues the deleted jobs.
    assert raw_redis.exists(keys.entity(clean.namespace, "workflow", victim.id))
    assert {raw_redis.zscore(keys.queue(clean.namespace, "default"), j) is not None
            for j in job_ids} == {True}

    with _start(clean, rebuild="fast") as sm:
        quick = sm.last_fast_start
        assert quick is not None and quick.deletes == 1 + 2 + 0, quick  # workflow, 2 jobs
        assert sm.get_workflow(victim.id) is None
        assert all(sm.get_job(j) is None for j in job_ids)
        assert sm.get_workflow(keep.id) is not None
        assert not raw_redis.exists(keys.entity(clean.namespace, "workflow", victim.id))
        assert raw_redis.smembers(keys.deleting(clean.namespace)) == set()
        sm.register_worker("w")
        got = sm.dequeue("w")
        assert got is not None and got.workflow_id == keep.id
        assert_invariants(sm, raw_redis, clean.libpq_url)


def test_redis_that_lost_the_namespace_gets_the_full_rebuild(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with _start(clean) as sm:
        wf = sm.create_workflow("wf", jobs=[{"name": "a"}])
    wipe_namespace(clean.redis_url, clean.namespace)
    with _start(clean, rebuild="fast") as sm:
        assert sm.last_fast_start is None
        assert sm.last_rebuild is not None and sm.last_rebuild.jobs == 1
        sm.register_worker("w")
        got = sm.dequeue("w")
        assert got is not None and got.workflow_id == wf.id


def test_a_watermark_from_another_redis_run_or_at_zero_means_a_full_rebuild(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with _start(clean) as sm:
        sm.create_workflow("wf", jobs=[{"name": "a"}])
    raw_redis.hset(keys.applied(clean.namespace), "ghost", f"{time.time()!r}|{time.time()!r}|old-run")
    with _start(clean, rebuild="fast") as sm:
        assert sm.last_fast_start is None and sm.last_rebuild is not None
    raw_redis.delete(keys.applied(clean.namespace))
    raw_redis.hset(keys.applied(clean.namespace), "ghost", "0.0|0.0|x")
    with _start(clean, rebuild="fast") as sm:
        assert sm.last_fast_start is None and sm.last_rebuild is not None


def test_a_clean_close_removes_the_watermark_and_a_dead_one_is_forgotten(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with _start(clean) as sm:
        mine = sm._pipe.watermark.coordinator
        assert raw_redis.hexists(keys.applied(clean.namespace), mine)
    assert not raw_redis.hexists(keys.applied(clean.namespace), mine)
    run = raw_redis.info("server")["run_id"]
    old = time.time() - 120
    raw_redis.hset(keys.applied(clean.namespace), "dead", f"{old!r}|{old!r}|{run}")
    with _start(clean, rebuild="fast") as sm:
        quick = sm.last_fast_start
        assert quick is not None and quick.since.timestamp() <= old
        assert not raw_redis.hexists(keys.applied(clean.namespace), "dead")


def test_the_watermark_stays_before_every_pending_or_failed_write(clean: Servers) -> None:
    client = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                        schema=clean.schema, rebuild=False)
    try:
        mark = Watermark(client.redis, clean.namespace)
        with mark.pending():
            held = time.time()
            time.sleep(0.05)
            assert mark.safe() <= held
        assert mark.safe() >= held
        with mark.pending():
            mark.failed()
        failed_at = time.time()
        time.sleep(0.05)
        assert mark.safe() < failed_at  # pinned until a repair covers it
        mark.repaired(time.time() - 10)  # a repair that began before the failure covers nothing
        assert mark.safe() < failed_at
        mark.repaired(time.time())
        assert mark.safe() > failed_at
        mark.failed(everything=True)
        assert mark.safe() == 0.0
    finally:
        client.close()


@pytest.mark.parametrize("bad", ["yes", 2, None])
def test_a_bad_rebuild_argument_is_refused_before_connecting(bad: object) -> None:
    with pytest.raises(toolkit.ConfigurationError, match="rebuild"):
        toolkit.init_state_manager("postgresql://nobody@127.0.0.1:1/x", "redis://127.0.0.1:1/0",
                                   rebuild=bad)  # type: ignore[arg-type]


def test_a_pinned_watermark_heals_itself_and_backs_off_while_it_cannot(
        clean: Servers, caplog: pytest.LogCaptureFixture) -> None:
    client = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                        schema=clean.schema, rebuild=False)
    try:
        mark = Watermark(client.redis, clean.namespace)
        calls: list[float] = []

        def heal(since: float) -> str:
            calls.append(since)
            if len(calls) == 1:
                raise toolkit.StorageUnavailable("Redis went away again")
            return "caught up"

        mark.heal = heal
        assert not mark.heal_if_pinned() and calls == []  # nothing pinned: nothing to catch up
        with mark.pending():
            pending_since = time.time()
            mark.failed()
        failed_at = time.time()
        assert not mark.heal_if_pinned()  # the first try fails: still pinned
        assert not mark.heal_if_pinned()  # and the next waits (backing off)
        assert len(calls) == 1 and calls[0] <= pending_since and mark.safe() < failed_at
        mark._heal_after = 0.0  # the wait is over
        assert mark.heal_if_pinned()
        assert len(calls) == 2 and mark.safe() > failed_at  # caught up: no longer pinned
        # A write that fails while a catch-up runs is not covered by it: still pinned after.
        mark.failed()
        pinned_at = mark.safe()
        time.sleep(0.05)
        mark.heal = lambda since: mark.failed()
        mark.heal_if_pinned()
        assert mark.safe() == pinned_at  # unpinned, it would be now
        mark.failed(everything=True)  # a lost delete note: only a full repair will do
        with caplog.at_level(logging.WARNING, logger="toolkit.manager.watermark"):
            assert not mark.heal_if_pinned() and not mark.heal_if_pinned()
        assert mark.safe() == 0.0
        assert caplog.text.count("run repair()") == 1  # said once, not every second
    finally:
        client.close()
