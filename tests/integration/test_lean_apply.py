"""A lean batch (a bulk action's) is applied without building entities: its cache values are
encoded from the rows, and must be the bytes the entities would have given."""

from __future__ import annotations

import redis

import toolkit
from toolkit.manager.pipeline import build_entities
from toolkit.models import EntityKind as Kind
from toolkit.tiers.postgres import store
from toolkit.tiers.redis import cache
from toolkit.tiers.redis import keys as tk_keys


def _everything(sm: toolkit.StateManager) -> list[tuple[str, str]]:
    """A workflow with metadata; jobs with flat, nested and no payloads, a result, an error,
    dependencies, a due time, a retry policy; a worker; an active and an ended assignment."""
    wf = sm.create_workflow("lean", metadata={"team": "data", "tags": ["x", 1.5]}, jobs=[
        {"name": "flat", "payload": {"a": 1, "b": "two", "c": None}},
        {"name": "nested", "payload": {"customer": {"plan": "pro"}, "list": [1, {"k": True}]},
         "retry": {"base": 2.0, "cap": 60.0}},
        {"name": "bare"}, {"name": "after", "depends_on": ["flat"]}])
    sm.create_job(wf.id, "later", delay=3600)
    sm.register_worker("w-lean", queues=["default"])
    first = sm.dequeue("w-lean", start=True)
    second = sm.dequeue("w-lean", start=True)
    assert first is not None and second is not None
    sm.complete_job(first.id, {"rows": 3, "nested": {"ok": [True, None]}})
    sm.fail_job(second.id, "upstream 503", retry=False)
    out = [(Kind.WORKFLOW, wf.id), (Kind.WORKER, "w-lean")]
    out += [(Kind.JOB, j.id) for j in sm.list_jobs(workflow_id=wf.id)]
    out += [(Kind.ASSIGNMENT, a.id) for a in sm.list_assignments()]
    return out


def test_a_row_encodes_to_the_bytes_of_its_entity(sm: toolkit.StateManager) -> None:
    named = _everything(sm)
    assert {k for k, _ in named} == {Kind.WORKFLOW, Kind.WORKER, Kind.JOB, Kind.ASSIGNMENT}
    with sm.db.engine.connect() as conn:
        rows = [(kind, store.get(conn, kind, entity_id)) for kind, entity_id in named]
    for (kind, row), entity in zip(rows, build_entities(rows), strict=True):
        assert row is not None
        assert cache.encode_row(kind, row) == cache.encode(entity), (kind, row)
        assert cache.row_version(kind, row) == toolkit.models.entity_version(entity)
        assert cache._row_ttl_ms(kind, row) == cache._ttl_ms(entity), (kind, row["status"])


def test_a_bulk_apply_fills_redis_as_a_single_write_would(sm: toolkit.StateManager,
                                                          raw_redis: redis.Redis) -> None:
    wf = sm.create_workflow("bulk", jobs=[{"name": f"j{i}", "payload": {"i": i}} for i in range(6)])
    plan = sm.plan_action("set_priority", workflow_id=wf.id, value=4)
    assert sm.apply_action(plan, batch=4, progress=False).applied == 6
    for job in sm.list_jobs(workflow_id=wf.id):  # from PostgreSQL, entity by entity
        raw = raw_redis.get(tk_keys.entity(sm.ns, "job", job.id))
        assert raw is not None and raw.encode() == cache.encode(job)
        assert job.priority == 4
    assert sm.check_consistency().ok
