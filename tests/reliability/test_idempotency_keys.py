"""Idempotency keys (issue 15, item 4): a create retried under its key is carried out once.

Checked against the real servers: a repeat returns the first entity and writes
nothing (no row, no event, no queue push, no counter); a different request
under a used key is an ``IdempotencyConflict`` with nothing written; a hostile
key is refused before any I/O; concurrent creates under one key make one
entity; and the reply of a COMMIT lost on the wire (cut by the toolkit's TCP
proxy once PostgreSQL has answered) is survived by a retry with the same key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pandas as pd
import psycopg
import pytest
import redis
from psycopg import sql

import toolkit
from tests.conftest import Servers
from tests.reliability.conftest import assert_invariants, behind_pg_proxy, everything

JOBS: list[dict[str, Any]] = [
    {"name": "extract", "payload": {"url": "s3://in/1"}},
    {"name": "load", "depends_on": ["extract"], "priority": 2},
]


def _pg_counts(clean: Servers) -> dict[str, int]:
    """Rows per table in this run's schema, counted straight from PostgreSQL."""
    tables = ("workflows", "jobs", "job_events", "idempotency_keys")
    with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
        return {t: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier(clean.schema, t))).fetchone()[0] for t in tables}  # type: ignore[index]


def test_a_repeated_workflow_create_returns_the_first_and_writes_nothing(
        sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    first = sm.create_workflow("etl", jobs=JOBS, metadata={"run": 1}, idempotency_key="etl-2026-11-29")
    before = everything(sm, clean)
    again = sm.create_workflow("etl", jobs=JOBS, metadata={"run": 1},
                               idempotency_key="etl-2026-11-29")
    assert again.id == first.id and again == sm.get_workflow(first.id)
    assert everything(sm, clean) == before  # no row, no event, no queue push, no counter
    assert _pg_counts(clean) == {"workflows": 1, "jobs": 2, "job_events": 3, "idempotency_keys": 1}
    assert_invariants(sm, raw_redis, clean.libpq_url)


def test_a_repeated_job_create_returns_the_first_and_writes_nothing(
        sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    sm.create_workflow("w", workflow_id="wf")
    first = sm.create_job("wf", "a", payload={"n": 1}, queue="q", idempotency_key="job-a")
    before = everything(sm, clean)
    again = sm.create_job("wf", "a", payload={"n": 1}, queue="q", idempotency_key="job-a")
    assert again == first == sm.get_job(first.id)
    assert everything(sm, clean) == before
    assert _pg_counts(clean) == {"workflows": 1, "jobs": 1, "job_events": 2, "idempotency_keys": 1}
    assert_invariants(sm, raw_redis, clean.libpq_url)


def test_a_repeat_after_the_entity_moved_on_returns_it_as_it_is_now(
        sm: toolkit.StateManager, clean: Servers) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}],
                       idempotency_key="wf-key")
    sm.register_worker("w1")
    assert sm.dequeue("w1") is not None
    sm.start_job("a")
    sm.complete_job("a", {"ok": True})
    again = sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}],
                               idempotency_key="wf-key")
    assert again.status == "completed" and again == sm.get_workflow("wf")


def test_deleting_the_entity_frees_its_key(sm: toolkit.StateManager, clean: Servers) -> None:
    first = sm.create_workflow("w", jobs=JOBS, idempotency_key="k")
    sm.create_job(first.id, "extra", idempotency_key="k-job")
    sm.delete_workflow(first.id)
    assert _pg_counts(clean)["idempotency_keys"] == 0
    second = sm.create_workflow("other", idempotency_key="k")  # a new request under the freed key
    assert second.id != first.id and sm.get_workflow(first.id) is None


def _conflicts(sm: toolkit.StateManager) -> dict[str, Callable[[], object]]:
    return {
        "other name": lambda: sm.create_workflow("etl2", jobs=JOBS, idempotency_key="k-wf"),
        "other payload": lambda: sm.create_workflow(
            "etl", jobs=[{**JOBS[0], "payload": {"url": "s3://in/2"}}, JOBS[1]],
            idempotency_key="k-wf"),
        "other metadata": lambda: sm.create_workflow("etl", jobs=JOBS, metadata={"x": 1},
                                                     idempotency_key="k-wf"),
        "fewer jobs": lambda: sm.create_workflow("etl", jobs=JOBS[:1], idempotency_key="k-wf"),
        "a job under a workflow's key": lambda: sm.create_job("wf-other", "z",
                                                              idempotency_key="k-wf"),
        "other job payload": lambda: sm.create_job("wf-other", "j", payload=2,
                                                   idempotency_key="k-job"),
        "other job workflow": lambda: sm.create_job("wf-third", "j", payload=1,
                                                    idempotency_key="k-job"),
        "a workflow under a job's key": lambda: sm.create_workflow("etl", jobs=JOBS,
                                                                   idempotency_key="k-job"),
    }


def test_a_different_request_under_a_used_key_is_a_conflict_and_writes_nothing(
        sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    wf = sm.create_workflow("etl", jobs=JOBS, idempotency_key="k-wf")
    sm.create_workflow("other", workflow_id="wf-other")
    sm.create_workflow("third", workflow_id="wf-third")
    job = sm.create_job("wf-other", "j", payload=1, idempotency_key="k-job")
    before, counts = everything(sm, clean), _pg_counts(clean)
    for case, create in _conflicts(sm).items():
        with pytest.raises(toolkit.IdempotencyConflict) as info:
            create()
        assert isinstance(info.value, toolkit.ValidationError), case
        assert info.value.field == "idempotency_key", case
        message = str(info.value)
        key = "k-wf" if info.value.value == "k-wf" else "k-job"
        owner = wf.id if key == "k-wf" else job.id
        assert key in message and owner in message and "different request" in message, (case, message)
        assert info.value.entity_id == owner, case
    assert everything(sm, clean) == before and _pg_counts(clean) == counts
    assert_invariants(sm, raw_redis, clean.libpq_url)


HOSTILE = [("", "1-255 characters"), ("k" * 256, "1-255 characters"), (42, "must be a string"),
           (b"key", "must be a string"), (["k"], "must be a string"),
           ("a\x00b", "control characters"), ("\ud800", "control characters")]


@pytest.mark.parametrize("key,reason", HOSTILE, ids=lambda v: repr(v)[:12])
def test_a_hostile_key_is_refused_and_nothing_is_written(
        sm: toolkit.StateManager, clean: Servers, key: Any, reason: str) -> None:
    sm.create_workflow("w", workflow_id="wf")
    before, counts = everything(sm, clean), _pg_counts(clean)
    for create in (lambda: sm.create_workflow("x", jobs=JOBS, idempotency_key=key),
                   lambda: sm.create_job("wf", "y", idempotency_key=key)):
        with pytest.raises(toolkit.ValidationError) as info:
            create()
        assert info.value.field == "idempotency_key" and reason in str(info.value), str(info.value)
    assert everything(sm, clean) == before and _pg_counts(clean) == counts


THREADS = 8


def _race(create: Callable[[], Any]) -> list[Any]:
    """Run ``create`` in THREADS threads released at once; return what each returned or raised."""
    gate = threading.Barrier(THREADS)
    out: list[Any] = [None] * THREADS

    def run(i: int) -> None:
        gate.wait()
        try:
            out[i] = create()
        except Exception as exc:  # reported by the assertion below
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def test_concurrent_creates_under_one_key_make_one_workflow(
        sm: toolkit.StateManager, make_sm: Callable[..., toolkit.StateManager], clean: Servers,
        raw_redis: redis.Redis) -> None:
    other = make_sm()  # two coordinators, four threads each
    managers = [sm, other]
    turn = iter(range(THREADS))
    lock = threading.Lock()

    def create() -> toolkit.Workflow:
        with lock:
            manager = managers[next(turn) % 2]
        return manager.create_workflow("etl", jobs=JOBS, idempotency_key="race")

    got = _race(create)
    assert all(isinstance(g, toolkit.Workflow) for g in got), got
    assert len({g.id for g in got}) == 1
    assert _pg_counts(clean) == {"workflows": 1, "jobs": 2, "job_events": 3, "idempotency_keys": 1}
    assert sm.metrics()["workflows_created"] == 1 and sm.metrics()["jobs_created"] == 2
    assert_invariants(sm, raw_redis, clean.libpq_url)


def test_concurrent_job_creates_under_one_key_make_one_job(
        sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    sm.create_workflow("w", workflow_id="wf")
    got = _race(lambda: sm.create_job("wf", "a", idempotency_key="race-job"))
    assert all(isinstance(g, toolkit.Job) for g in got), got
    assert len({g.id for g in got}) == 1
    assert _pg_counts(clean) == {"workflows": 1, "jobs": 1, "job_events": 2, "idempotency_keys": 1}
    assert_invariants(sm, raw_redis, clean.libpq_url)


def test_a_create_whose_commit_reply_is_lost_is_retried_once_under_its_key(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with behind_pg_proxy(clean) as (sm, proxy):
        sm.create_workflow("warm-up")  # the pool holds a connection: no new one opens below
        proxy.lose_next_reply()  # the next COMMIT reaches PostgreSQL; its answer never returns
        with pytest.raises(toolkit.StorageUnavailable):
            sm.create_workflow("etl", jobs=JOBS, idempotency_key="lost-reply")
        assert _pg_counts(clean)["workflows"] == 2, "the COMMIT did not land: no reply was lost"
        wf = sm.create_workflow("etl", jobs=JOBS, idempotency_key="lost-reply")  # the retry
        assert _pg_counts(clean) == {"workflows": 2, "jobs": 2, "job_events": 3,
                                     "idempotency_keys": 1}
        assert sorted(j.name for j in sm.list_jobs(workflow_id=wf.id)) == ["extract", "load"]
        sm.register_worker("w1")
        job = sm.dequeue("w1")  # the first call never reached Redis: the retry queued its job
        assert job is not None and job.workflow_id == wf.id and job.name == "extract"
        assert_invariants(sm, raw_redis, clean.libpq_url)


def test_a_job_create_whose_commit_reply_is_lost_is_retried_once_under_its_key(
        clean: Servers, raw_redis: redis.Redis) -> None:
    with behind_pg_proxy(clean) as (sm, proxy):
        sm.create_workflow("w", workflow_id="wf")
        proxy.lose_next_reply()
        with pytest.raises(toolkit.StorageUnavailable):
            sm.create_job("wf", "a", payload={"n": 1}, idempotency_key="lost-job")
        assert _pg_counts(clean)["jobs"] == 1, "the COMMIT did not land: no reply was lost"
        job = sm.create_job("wf", "a", payload={"n": 1}, idempotency_key="lost-job")
        assert _pg_counts(clean) == {"workflows": 1, "jobs": 1, "job_events": 2,
                                     "idempotency_keys": 1}
        sm.register_worker("w1")
        got = sm.dequeue("w1")
        assert got is not None and got.id == job.id
        assert_invariants(sm, raw_redis, clean.libpq_url)


def test_the_inspector_shows_the_keys(sm: toolkit.StateManager) -> None:
    sm.create_workflow("keyed", workflow_id="wf1", jobs=[{"name": "a", "id": "a"}],
                       idempotency_key="wf-key")
    sm.create_workflow("plain", workflow_id="wf2")
    sm.create_job("wf2", "b", job_id="b", idempotency_key="job-key")
    wfs = sm.inspector.workflows()
    assert wfs.loc["wf1", "idempotency_key"] == "wf-key"
    assert pd.isna(wfs.loc["wf2", "idempotency_key"])
    jobs = sm.inspector.jobs()
    assert jobs.loc["b", "idempotency_key"] == "job-key"
    assert pd.isna(jobs.loc["a", "idempotency_key"])


def test_an_inspector_on_a_schema_without_keys_shows_none(clean: Servers) -> None:
    """A schema a coordinator has not migrated to 0005 yet: the frames read, with NA keys."""
    from tests.conftest import drop_schema, unique
    from toolkit.tiers.postgres import migrate
    from toolkit.tiers.postgres.db import Database

    old = unique("tk_old")
    db = Database(clean.database_url, old)
    try:
        migrate.upgrade(db, target=4)
        with psycopg.connect(clean.libpq_url, autocommit=True) as conn:
            conn.execute(sql.SQL("INSERT INTO {} VALUES ('wf', 'w', 'pending', '{{}}', now(), "
                                 "now(), 1)").format(sql.Identifier(old, "workflows")))
        with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=old,
                               schema=old) as ins:
            assert pd.isna(ins.workflows().loc["wf", "idempotency_key"])
            assert ins.jobs().empty
    finally:
        db.dispose()
        drop_schema(clean.libpq_url, old)
