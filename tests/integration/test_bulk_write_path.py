"""The bulk write path: batched invalidations, bulk queue moves, binary COPY (real servers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime

import psycopg
import pytest
import redis

import toolkit
from tests.conftest import Servers
from toolkit.tiers.postgres import records
from toolkit.tiers.redis import cache, keys, queue
from toolkit.tiers.redis.client import Client


@pytest.fixture
def client(clean: Servers) -> Iterator[Client]:
    """A toolkit Redis client on the test namespace."""
    c = Client(clean.redis_url, namespace=clean.namespace)
    yield c
    c.close()


def _messages(pubsub: redis.client.PubSub, n: int) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + 5
    while len(got) < n and time.monotonic() < deadline:
        msg = pubsub.get_message(timeout=0.2)
        if msg and msg["type"] == "message":
            got.append(msg["data"])
    return got


def test_publish_many_sends_one_message_per_batch(client: Client, raw_redis: redis.Redis,
                                                  clean: Servers) -> None:
    ns = clean.namespace
    changed = [("job", i, f"j|{i}") for i in range(cache.INVALIDATION_BATCH * 2 + 1)]
    with raw_redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        pubsub.subscribe(keys.invalidation_channel(ns))
        _messages(pubsub, 0)
        pipe = client.pipeline()
        cache.publish_many(ns, changed, pipe=pipe)
        cache.publish_many(ns, [("workflow", 2, "w")], pipe=pipe)
        pipe.execute()
        got = _messages(pubsub, 4)
    assert len(got) == 4 and got[-1] == "workflow|2|w"  # one entity: the single-entity form
    parsed = [t for m in got for t in cache.parse_invalidations(m)]
    assert parsed == [*changed, ("workflow", 2, "w")]


def test_batched_invalidation_refreshes_another_managers_memory(
        sm: toolkit.StateManager, make_sm, raw_redis: redis.Redis, clean: Servers) -> None:
    other = make_sm()
    ids = [f"j{i}" for i in range(50)]
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": i, "id": i} for i in ids])
    deadline = time.monotonic() + 3
    for i in ids:  # now in other's memory, at version 1
        while other.get_job(i) is None:
            assert time.monotonic() < deadline
    assert all(other.memory.get("job", i) is not None for i in ids)
    with raw_redis.pubsub(ignore_subscribe_messages=True) as pubsub:
        pubsub.subscribe(keys.invalidation_channel(clean.namespace))
        _messages(pubsub, 0)
        sm.cancel_workflow("wf")
        batch = _messages(pubsub, 1)
    announced = cache.parse_invalidations(batch[0])
    assert {e for k, _, e in announced if k == "job"} == set(ids)  # one message, every job
    deadline = time.monotonic() + 3
    while any(other.get_job(i).status != "cancelled" for i in ids):
        assert time.monotonic() < deadline, "the other manager kept serving stale jobs"
        time.sleep(0.02)
    assert other.get_workflow("wf").status == "cancelled"


def test_bulk_queue_push_gives_the_scores_of_single_pushes(client: Client, raw_redis: redis.Redis,
                                                           clean: Servers) -> None:
    ns = clean.namespace
    jobs = [(f"j{i}", f"q{i % 3}", i % 5 - 2, 1000 + i) for i in range(2500)]
    pipe = client.pipeline()
    for job_id, q, priority, seq in jobs:  # one plain ZADD per job, scored by queue.score
        pipe.zadd(keys.queue(ns, f"single-{q}"), {job_id: queue.score(priority, seq)})
        pipe.sadd(keys.queues(ns), f"single-{q}")
    queue.push_many(ns, [(j, f"bulk-{q}", p, s) for j, q, p, s in jobs], pipe=pipe)
    pipe.execute()
    for q in ("q0", "q1", "q2"):
        single = raw_redis.zrange(keys.queue(ns, f"single-{q}"), 0, -1, withscores=True)
        assert raw_redis.zrange(keys.queue(ns, f"bulk-{q}"), 0, -1, withscores=True) == single
        assert len(single) in (833, 834)
    assert queue.queue_names(client, ns) == {f"{m}-q{i}" for m in ("single", "bulk") for i in range(3)}


def test_bulk_queue_remove_leaves_what_single_removes_leave(client: Client, raw_redis: redis.Redis,
                                                            clean: Servers) -> None:
    ns = clean.namespace
    jobs = [(f"j{i}", f"q{i % 2}", 0, i) for i in range(10)]
    pipe = client.pipeline()
    queue.push_many(ns, jobs, pipe=pipe)
    for job_id, q, _, seq in jobs:
        pipe.zadd(keys.inflight(ns), {job_id: seq})
        pipe.hset(keys.inflight_meta(ns), job_id, f"{q}|{seq}")
    queue.remove_many(ns, [(j, q) for j, q, _, _ in jobs[:7]] + [("j0", "q0")], pipe=pipe)
    pipe.execute()
    assert [m for q in ("q0", "q1") for m, _ in queue.members(client, ns, q)] == ["j8", "j7", "j9"]
    assert queue.inflight_ids(client, ns) == {"j7", "j8", "j9"}
    assert set(raw_redis.hkeys(keys.inflight_meta(ns))) == {"j7", "j8", "j9"}


def test_create_workflow_queues_jobs_with_their_postgres_scores(
        sm: toolkit.StateManager, client: Client, raw_pg: psycopg.Connection, clean: Servers) -> None:
    jobs = [{"name": f"j{i}", "id": f"j{i}", "priority": i % 4, "queue": f"q{i % 2}"}
            for i in range(40)]
    jobs.append({"name": "later", "id": "later", "depends_on": ["j0"]})
    sm.create_workflow("w", jobs=jobs)
    q = psycopg.sql.SQL("SELECT id, queue, priority, enqueue_seq FROM {} WHERE status = 'queued'")
    rows = raw_pg.execute(q.format(psycopg.sql.Identifier(clean.schema, "jobs"))).fetchall()
    assert len(rows) == 40
    for name in ("q0", "q1"):
        want = sorted(((i, queue.score(p, s)) for i, qn, p, s in rows if qn == name),
                      key=lambda m: m[1])
        assert queue.members(client, clean.namespace, name) == want
    assert sm.check_consistency().ok


def test_binary_copy_of_events_keeps_every_field(sm: toolkit.StateManager, raw_pg: psycopg.Connection,
                                                 clean: Servers) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)
    events = [{"job_id": f"j{i}", "workflow_id": "w", "event": "x", "status": "queued",
               "worker_id": None if i % 2 else "wk", "attempt": None if i % 3 else i, "at": at,
               "detail": None if i % 2 else {"rule": "r", "age_s": 1.5, "n": [i]}}
              for i in range(30)]
    with sm.db.begin("test events") as conn:
        records.insert_events(conn, sm.db.schema, events)
    q = psycopg.sql.SQL("SELECT job_id, workflow_id, event, status, worker_id, attempt, at, detail "
                        "FROM {} ORDER BY id").format(psycopg.sql.Identifier(clean.schema, "job_events"))
    got = raw_pg.execute(q).fetchall()
    assert got == [tuple(e[c] for c in records.EVENT_COPY_COLUMNS) for e in events]
