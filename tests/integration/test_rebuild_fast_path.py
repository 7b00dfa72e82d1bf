"""The rebuild's fast path gives exactly what the normal read path gives, entity by entity.

The rebuild streams tuples (``store.stream_live``), builds entities with
``models.from_row`` and fills Redis with ``MSETNX``; each test here compares
its output with ``models.from_dict`` of a PostgreSQL row read the normal way
(SQLAlchemy) and with ``cache.encode`` of that entity, so a fast path that
drifts from the normal one fails.
"""

from __future__ import annotations

import gc
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
from psycopg import sql

import toolkit
from tests.conftest import wipe_namespace
from toolkit import compare, models
from toolkit.recovery import queues as recovered_queues
from toolkit.recovery import rebuilding
from toolkit.tiers.postgres import store
from toolkit.tiers.redis import cache, keys
from toolkit.tiers.redis.client import Client

PAYLOADS: list[Any] = [
    {"i": 1, "kind": "bench"},
    {f"k{i}": i for i in range(12)},  # a flat dict of more than 8 keys (dict sizes differ)
    {"nested": {"a": [1, 2, {"b": None}]}, "list": [], "empty": {}},
    [1, "two", 3.5, True, None, {"x": "y"}],
    "text with \u00e9 and \u2603",
    42,
    -1.25,
    False,
    None,
    {"big": 2**62, "tiny": 1e-300, "unicode": "\u4e2d\u6587", "quote": "a\"b\\c"},
]


def _rich_state(sm: toolkit.StateManager) -> None:
    """Workflows, workers, assignments and live jobs in every shape the rebuild reads."""
    sm.register_worker("w1", queues=["default", "other"], capacity=3,
                       metadata={"zone": "a", "tags": ["x", "y"], "n": {"deep": 1}})
    sm.register_worker("w2", metadata={})
    sm.create_workflow("wf-meta", workflow_id="wf1", metadata={"owner": "me", "nums": [1, 2]},
                       jobs=[{"name": f"j{i}", "id": f"j{i}", "priority": i % 4,
                              "payload": p, "queue": "other" if i % 3 == 0 else "default"}
                             for i, p in enumerate(PAYLOADS)])
    sm.create_workflow("wf-deps", workflow_id="wf2", jobs=[
        {"name": "a", "id": "a"}, {"name": "b", "id": "b", "depends_on": ["a"]},
        {"name": "c", "id": "c", "depends_on": ["a", "b"], "max_attempts": 5}])
    running = sm.dequeue("w1")
    assert running is not None
    sm.start_job(running.id)  # running: started_at set, an active assignment
    failed = sm.dequeue("w1")
    assert failed is not None
    sm.fail_job(failed.id, "boom \u2603", retry=False)  # failed: live, error set, finished_at
    done = sm.dequeue("w2")
    assert done is not None
    sm.start_job(done.id)
    sm.complete_job(done.id, {"rows": 3, "nested": [{"a": 1}]})  # final: not read by the rebuild
    sm.dequeue("w1")  # assigned, not started


def _normal_rows(sm: toolkit.StateManager, kind: str) -> dict[str, models.Entity]:
    """Every row of ``kind`` read the normal way (SQLAlchemy mappings), as entities."""
    with sm.db.begin("test: read") as conn:
        rows = store.select_where(conn, kind)
    return {r["id"]: models.from_dict(kind, r) for r in rows}


def _assert_same(a: Any, b: Any, where: str) -> None:
    """Equal, and of the same types all the way down (FrozenDict, enums, tuples, tzinfo)."""
    assert type(a) is type(b), (where, type(a), type(b))
    assert a == b, where
    if isinstance(a, dict):
        assert sys.getsizeof(a) == sys.getsizeof(b), where  # the memory tier must not grow
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "tzinfo") and a.tzinfo is not None:
        assert a.tzinfo is b.tzinfo or a.tzinfo == b.tzinfo, where
        assert a.utcoffset() == timedelta(0), where


def _assert_entities_same(a: models.Entity, b: models.Entity) -> None:
    assert type(a) is type(b)
    for name in models.field_names(cache.kind_of(a)):
        _assert_same(getattr(a, name), getattr(b, name), f"{a.id}.{name}")


def test_rebuild_memory_and_redis_equal_the_normal_read(sm: toolkit.StateManager, make_sm,
                                                        raw_redis, clean) -> None:
    _rich_state(sm)
    sm.close()
    wipe_namespace(clean.redis_url, clean.namespace)

    fresh = make_sm()
    live_kinds = {"workflow": lambda e: True, "worker": lambda e: True,
                  "assignment": lambda e: e.status == "active", "job": lambda e: not e.is_final}
    for kind, is_live in live_kinds.items():
        normal = {i: e for i, e in _normal_rows(fresh, kind).items() if is_live(e)}
        rebuilt = {e.id: e for e in fresh.memory.live(kind)}
        assert set(rebuilt) == set(normal) and normal, kind
        for entity_id, expected in normal.items():
            _assert_entities_same(rebuilt[entity_id], expected)
            raw = raw_redis.get(keys.entity(clean.namespace, kind, entity_id))
            assert raw == cache.encode(expected).decode(), (kind, entity_id)
            decoded = cache.decode(kind, raw)
            assert decoded is not None
            _assert_entities_same(decoded, expected)
    assert fresh.check_consistency().ok


def test_rebuild_reads_times_as_aware_utc(sm: toolkit.StateManager, make_sm) -> None:
    _rich_state(sm)
    fresh = make_sm()
    job = next(j for j in fresh.memory.live("job") if j.status == "running")
    assert job.started_at is not None and job.started_at.tzinfo is not None
    assert job.started_at.utcoffset() == timedelta(0)
    assert job.created_at.tzinfo == UTC


def test_stream_live_rows_equal_sqlalchemy_rows(sm: toolkit.StateManager) -> None:
    _rich_state(sm)
    with sm.db.begin("test: stream") as conn:
        for kind in ("workflow", "worker", "assignment", "job"):
            columns = compare.live_columns(kind)
            streamed = {r[0]: dict(zip(columns, r, strict=True))
                        for r in store.stream_live(conn, kind, columns)}
            normal = {r["id"]: r for r in store.get_many(conn, kind, list(streamed))}
            assert set(streamed) == set(normal) and streamed, kind
            for entity_id, row in streamed.items():
                for column, value in row.items():
                    _assert_same(value, normal[entity_id][column], f"{kind}.{entity_id}.{column}")


def test_rebuild_never_overwrites_a_newer_cached_value(sm: toolkit.StateManager, raw_redis,
                                                       clean) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(50)])
    wipe_namespace(clean.redis_url, clean.namespace)
    newer = cache.encode(sm.get_job("j7")).decode().replace("1|", "99|", 1)
    raw_redis.set(keys.entity(clean.namespace, "job", "j7"), newer)
    sm.rebuild()
    assert raw_redis.get(keys.entity(clean.namespace, "job", "j7")) == newer
    assert raw_redis.get(keys.entity(clean.namespace, "job", "j8")) == cache.encode(
        sm.get_job("j8")).decode()


def test_rebuild_fill_falls_back_when_a_writer_got_there_first(
        sm: toolkit.StateManager, raw_redis, clean, monkeypatch: pytest.MonkeyPatch) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(30)])
    wipe_namespace(clean.redis_url, clean.namespace)
    # Written after the scan (the scan is told it saw nothing): MSETNX writes nothing,
    # and the chunk goes through the versioned path, which keeps the newer value.
    newer = cache.encode(sm.get_job("j3")).decode().replace("1|", "5|", 1)
    raw_redis.set(keys.entity(clean.namespace, "job", "j3"), newer)
    monkeypatch.setattr(rebuilding, "_scan_cache", lambda client, ns: (
        {k: set() for k in keys.ENTITY_KINDS}, False))
    monkeypatch.setattr(rebuilding, "FILL_CHUNK", 7)
    sm.memory.clear()
    sm.rebuild()
    assert raw_redis.get(keys.entity(clean.namespace, "job", "j3")) == newer
    for i in range(30):
        if i != 3:
            job = sm.memory.get("job", f"j{i}")
            assert job is not None
            assert raw_redis.get(keys.entity(clean.namespace, "job", f"j{i}")) == cache.encode(
                job).decode()


@pytest.mark.parametrize("kept", [3, 17])  # a few cached (MSETNX first), most cached (MGET)
def test_rebuild_fills_a_partly_emptied_cache(sm: toolkit.StateManager, raw_redis, clean,
                                              kept: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rebuilding, "FILL_CHUNK", 4)
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(20)])
    names = [keys.entity(clean.namespace, "job", f"j{i}") for i in range(20)]
    expected = {n: raw_redis.get(n) for n in names}
    raw_redis.unlink(*names[kept:])
    newer = expected[names[0]].replace("1|", "8|", 1)
    raw_redis.set(names[0], newer)
    sm.rebuild()
    assert {n: raw_redis.get(n) for n in names} == {**expected, names[0]: newer}
    assert raw_redis.ttl(names[-1]) == -1  # live entries never expire


def test_rebuild_with_redis_intact_writes_nothing(sm: toolkit.StateManager, raw_redis,
                                                  clean) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(20)])
    sm.rebuild()
    before = {k: raw_redis.get(k) for k in raw_redis.scan_iter(
        match=keys.entity_pattern(clean.namespace, "job"))}
    sm.rebuild()
    after = {k: raw_redis.get(k) for k in raw_redis.scan_iter(
        match=keys.entity_pattern(clean.namespace, "job"))}
    assert before == after and len(after) == 20


def test_rebuild_reconciles_a_large_emptied_queue(sm: toolkit.StateManager, raw_redis,
                                                  clean) -> None:
    n = recovered_queues.WHOLE_QUEUE_AT + 50
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}", "priority": i % 3}
                                  for i in range(n)])
    expected = raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1, withscores=True)
    wipe_namespace(clean.redis_url, clean.namespace)
    report = sm.rebuild()
    assert report.queued == n
    assert raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1,
                            withscores=True) == expected


def test_whole_queue_recheck_drops_jobs_no_longer_queued(sm: toolkit.StateManager, raw_redis,
                                                         clean) -> None:
    n = recovered_queues.WHOLE_QUEUE_AT + 10
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(n)])
    with sm.db.begin("test: snapshot") as conn:
        wanted: dict[str, dict[str, float]] = {}
        for job_id, name, priority, seq in store.queued_jobs(conn):
            wanted.setdefault(name, {})[job_id] = -priority * 1e12 + (seq or 0)
    sm.register_worker("w1")
    taken = sm.dequeue("w1")  # assigned after the "snapshot"
    assert taken is not None
    wipe_namespace(clean.redis_url, clean.namespace)
    added, removed = recovered_queues.reconcile(sm._pipe.tiers, wanted)
    members = set(raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1))
    assert taken.id not in members and added == n - 1 and removed == 0
    assert len(members) == n - 1


def test_rebuild_progress_counts_every_row(sm: toolkit.StateManager,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    sm.register_worker("w1")
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(25)])
    seen: dict[str, int] = {"total": -1, "done": 0, "closed": 0}

    class Bar:
        def update(self, n: int) -> None:
            seen["done"] += n

        def close(self) -> None:
            seen["closed"] += 1

    def progress(total: int, enabled: bool | None) -> Bar:
        seen["total"] = total
        return Bar()

    monkeypatch.setattr(rebuilding, "_progress", progress)
    monkeypatch.setattr(rebuilding, "PROGRESS_STEP", 10)
    sm.rebuild(progress=True)
    assert seen == {"total": 27, "done": 27, "closed": 1}


@pytest.mark.parametrize("enabled", [True, False])
def test_rebuild_pauses_the_cyclic_collector_and_restores_it(sm: toolkit.StateManager, clean,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             enabled: bool) -> None:
    """Millions of long-lived objects, no cycles: a collection during the load would scan
    them all again and again. None runs inside; the collector is as it was afterwards."""
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}", "payload": {"i": i}}
                                  for i in range(3_000)])
    wipe_namespace(clean.redis_url, clean.namespace)
    collections: list[int] = []
    inside: list[int] = []
    last_step = rebuilding.watermark.mark_rebuilt

    def watched(*args: Any) -> None:
        last_step(*args)
        inside.append(len(collections))  # the rebuild's last step: the collector not restored yet

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    monkeypatch.setattr(rebuilding.watermark, "mark_rebuilt", watched)
    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    gc.callbacks.append(seen)
    try:
        report = sm.rebuild()
        after = gc.isenabled()
    finally:
        gc.callbacks.remove(seen)
        (gc.enable if was else gc.disable)()
    assert report.jobs == 3_000
    assert inside == [0] and after is enabled


def test_queues_filled_while_reading_drop_what_changed_since_the_snapshot(
        sm: toolkit.StateManager, raw_redis, raw_pg, clean,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis emptied: the queues are filled from the snapshot as it is read. A job finished
    since the snapshot and one claimed since (in flight) are not left in the queue."""
    n = recovered_queues.WHOLE_QUEUE_AT + 20  # the re-check reads the whole queue
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}", "priority": i % 3}
                                  for i in range(n)])
    expected = raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1, withscores=True)
    wipe_namespace(clean.redis_url, clean.namespace)
    finish = rebuilding._EarlyQueues.finish

    def after_the_snapshot(early: rebuilding._EarlyQueues) -> set[str]:
        added = finish(early)
        raw_pg.execute(sql.SQL("UPDATE {} SET status = 'cancelled' WHERE id = %s").format(
            sql.Identifier(clean.schema, "jobs")), ["j5"])  # its writer's Redis update was lost
        raw_redis.zadd(keys.inflight(clean.namespace), {"j7": time.time() + 60})
        raw_redis.zrem(keys.queue(clean.namespace, "default"), "j7")  # claimed meanwhile
        return added

    monkeypatch.setattr(rebuilding._EarlyQueues, "finish", after_the_snapshot)
    monkeypatch.setattr(recovered_queues, "return_claims", lambda t, before: 0)  # keep j7 out
    report = rebuilding.rebuild(sm._pipe.tiers)
    assert report.queued == n
    members = raw_redis.zrange(keys.queue(clean.namespace, "default"), 0, -1, withscores=True)
    assert members == [(j, s) for j, s in expected if j not in ("j5", "j7")]
    assert raw_redis.sismember(keys.queues(clean.namespace), "default")


def test_queues_are_not_filled_while_reading_when_redis_holds_a_queue(
        sm: toolkit.StateManager, raw_redis, clean, monkeypatch: pytest.MonkeyPatch) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(30)])
    raw_redis.zrem(keys.queue(clean.namespace, "default"), "j3", "j4")
    added: list[str] = []
    monkeypatch.setattr(rebuilding._EarlyQueues, "add",
                        lambda self, name, job_id, score: added.append(job_id))
    rebuilding.rebuild(sm._pipe.tiers)
    assert added == []
    assert raw_redis.zcard(keys.queue(clean.namespace, "default")) == 30  # reconciled as before


def _fill_early_then(monkeypatch: pytest.MonkeyPatch, meanwhile: Any) -> None:
    """Run ``meanwhile()`` right after the rebuild's early queue fill, before its check."""
    finish = rebuilding._EarlyQueues.finish

    def then(early: rebuilding._EarlyQueues) -> set[str]:
        filled = finish(early)
        meanwhile()
        return filled

    monkeypatch.setattr(rebuilding._EarlyQueues, "finish", then)


def test_check_of_early_queues_keeps_a_job_queued_again_and_drops_one_not_due(
        sm: toolkit.StateManager, raw_redis, raw_pg, clean,
        monkeypatch: pytest.MonkeyPatch) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(40)])
    wipe_namespace(clean.redis_url, clean.namespace)
    q = keys.queue(clean.namespace, "default")

    def meanwhile() -> None:
        raw_pg.execute(sql.SQL("UPDATE {} SET run_at = now() + interval '1 hour' "
                               "WHERE id = 'j6'").format(sql.Identifier(clean.schema, "jobs")))
        raw_pg.execute(sql.SQL("UPDATE {} SET status = 'cancelled' WHERE id = 'j5'").format(
            sql.Identifier(clean.schema, "jobs")))

    due_ids = recovered_queues.store.due_ids

    def checked_then_requeued(*args: Any) -> set[str]:
        found = due_ids(*args)
        raw_redis.zadd(q, {"j5": 12345.0})  # queued again (a new score) after the check
        return found

    _fill_early_then(monkeypatch, meanwhile)
    monkeypatch.setattr(recovered_queues.store, "due_ids", checked_then_requeued)
    rebuilding.rebuild(sm._pipe.tiers)
    members = dict(raw_redis.zrange(q, 0, -1, withscores=True))
    assert "j6" not in members  # scheduled for later since the snapshot: not handed out now
    assert members["j5"] == 12345.0  # moved since the check: left to its writer
    assert len(members) == 39


def test_redis_lost_during_the_rebuild_gets_the_full_reconciliation(
        sm: toolkit.StateManager, raw_redis, clean, monkeypatch: pytest.MonkeyPatch) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}", "queue": q}
                                  for i, q in enumerate(["default", "other"] * 10)])
    sm.pause_queue("other", reason="test")
    wipe_namespace(clean.redis_url, clean.namespace)
    _fill_early_then(monkeypatch, lambda: wipe_namespace(clean.redis_url, clean.namespace))
    report = rebuilding.rebuild(sm._pipe.tiers)
    assert report.queued == 20
    for name in ("default", "other"):
        assert raw_redis.zcard(keys.queue(clean.namespace, name)) == 10, name
    assert raw_redis.smembers(keys.paused_queues(clean.namespace)) == {"other"}
    assert not raw_redis.exists(keys.rebuilding(clean.namespace))


def test_scan_sees_queues_as_empty_only_without_a_queue_or_a_claim(raw_redis, clean) -> None:
    client = Client(clean.redis_url, namespace=clean.namespace)
    try:
        raw_redis.set(keys.entity(clean.namespace, "job", "a"), "1|{}")
        assert rebuilding._scan_cache(client, clean.namespace) == (
            {**{k: set() for k in keys.ENTITY_KINDS}, "job": {"a"}}, True)
        raw_redis.zadd(keys.inflight(clean.namespace), {"x": 1.0})
        assert rebuilding._scan_cache(client, clean.namespace)[1] is False
        raw_redis.delete(keys.inflight(clean.namespace))
        raw_redis.zadd(keys.queue(clean.namespace, "q"), {"y": 1.0})
        assert rebuilding._scan_cache(client, clean.namespace)[1] is False
    finally:
        client.close()


def test_a_failed_fill_stops_the_rebuild_quickly_and_leaves_nothing_running(
        sm: toolkit.StateManager, clean, monkeypatch: pytest.MonkeyPatch) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(200)])
    wipe_namespace(clean.redis_url, clean.namespace)
    monkeypatch.setattr(rebuilding, "FILL_CHUNK", 10)
    sent: list[int] = []

    def refuse(commands: Any, **options: Any) -> list[Any]:
        if not any(c[0] in ("MSETNX", "ZADD") for c in commands):
            return real(commands, **options)  # not the fill: a script call of the rebuild
        sent.append(1)
        time.sleep(0.05)
        raise redis.ResponseError("OOM command not allowed")

    real = sm._pipe.tiers.redis.send_packed
    monkeypatch.setattr(sm._pipe.tiers.redis, "send_packed", refuse)
    before = {k: list(v) for k, v in ((k, sm.memory.live(k)) for k in keys.ENTITY_KINDS)}
    with pytest.raises(toolkit.StorageUnavailable, match="OOM"):
        rebuilding.rebuild(sm._pipe.tiers)
    assert gc.isenabled()
    assert not [t for t in threading.enumerate() if t.name.startswith("rebuild-fill")]
    assert len(sent) <= 3  # the chunks still waiting were dropped (5 would be sent otherwise)
    assert {k: list(v) for k, v in ((k, sm.memory.live(k)) for k in keys.ENTITY_KINDS)} == before


@pytest.mark.parametrize("kind", list(keys.ENTITY_KINDS))
def test_row_encoder_equals_the_entity_encoder(sm: toolkit.StateManager, kind: str) -> None:
    _rich_state(sm)
    sm.create_workflow("sched", jobs=[{"name": "later", "delay": 3600},
                                      {"name": "due", "run_at": datetime.now(UTC) - timedelta(hours=1)}])
    encode = cache.row_encoder(kind)
    with sm.db.begin("test: stream") as conn:
        rows = list(store.stream_live(conn, kind, compare.live_columns(kind)))
    assert rows
    if kind == "job":
        assert sum(1 for r in rows if r[compare.live_columns(kind).index("run_at")]) == 2
    for row in rows:
        assert encode(row) == cache.encode(models.from_row(kind, row)), row[0]
