"""Inspector: columns and dtypes of every frame, filters, empty state, read-only guarantees."""

from __future__ import annotations

import psycopg
import pytest

import toolkit
from toolkit.inspection import frames
from toolkit.tiers.redis import keys

FRAME_NAMES = ["workflows", "jobs", "workers", "assignments", "queue", "locks", "metrics", "tiers",
               "summary"]


@pytest.fixture
def ins(clean) -> toolkit.Inspector:
    inspector = toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                  schema=clean.schema)
    yield inspector
    inspector.close()


def busy(sm: toolkit.StateManager) -> None:
    sm.create_workflow("w", workflow_id="wf",
                       jobs=[{"name": f"j{i}", "id": f"j{i}", "priority": i % 3} for i in range(6)])
    sm.register_worker("w1", capacity=5)
    job = sm.dequeue("w1")
    sm.start_job(job.id)
    sm.complete_job(job.id, {"ok": True})
    sm.dequeue("w1")
    sm.lock("maintenance", ttl=30).acquire()
    sm.incr_metric("custom", 3)


def assert_schema(name: str, frame) -> None:
    index_name, columns = frames.SCHEMAS[name]
    assert frame.index.name == index_name
    assert list(frame.columns) == list(columns)
    for col, dtype in columns.items():
        assert frame[col].dtype == dtype, (name, col, frame[col].dtype, dtype)


@pytest.mark.parametrize("name", FRAME_NAMES)
def test_every_frame_has_its_schema_when_empty_and_busy(sm, ins, name) -> None:
    assert_schema(name, getattr(ins, name)())
    busy(sm)
    frame = getattr(ins, name)()
    assert_schema(name, frame)
    assert len(frame) > 0


def test_jobs_frame_values_and_derived_columns(sm, ins) -> None:
    busy(sm)
    jobs = ins.jobs()
    assert len(jobs) == 6 and set(jobs["status"]) == {"completed", "assigned", "queued"}
    done = jobs[jobs["status"] == "completed"].iloc[0]
    assert done["duration_s"] >= 0 and done["result"] == '{"ok": true}'
    assert list(jobs["status"].cat.categories) == [s.value for s in toolkit.JobStatus]
    assert str(jobs["created_at"].dt.tz) == "UTC"


def test_filters_are_pushed_down_and_validated(sm, ins) -> None:
    busy(sm)
    assert set(ins.jobs(status="queued").index) == {f"j{i}" for i in range(6)} - set(
        ins.jobs(status="completed").index) - set(ins.jobs(status="assigned").index)
    assert ins.jobs(workflow_id="wf' OR '1'='1").empty  # a literal value, never SQL
    with pytest.raises(toolkit.ValidationError, match="status"):
        ins.jobs(status="queued' OR 1=1 --")


def test_workers_frame_shows_liveness_and_active_jobs(sm, ins) -> None:
    busy(sm)
    w = ins.workers().loc["w1"]
    assert bool(w["alive"]) and w["active_jobs"] == 1 and w["heartbeat_age_s"] < 5


def test_queue_frame_is_in_pop_order(sm, ins) -> None:
    busy(sm)
    q = ins.queue()
    assert list(q["position"]) == list(range(len(q)))
    assert list(q["priority"]) == sorted(q["priority"], reverse=True)
    assert sm.dequeue("w1").id == q.index[0]


def test_tiers_frame_marks_a_stale_redis_entry(sm, ins, raw_redis, clean) -> None:
    busy(sm)
    assert ins.tiers()["consistent"].all()
    raw_redis.delete(keys.entity(clean.namespace, "workflow", "wf"))
    t = ins.tiers()
    assert not t.loc["wf", "consistent"] and "missing in Redis" in t.loc["wf", "problem"]
    bound = sm.inspector.tiers()
    assert bound.loc["wf", "in_memory"]


def test_metric_series_has_a_time_index(sm, ins) -> None:
    busy(sm)
    s = ins.metric_series(["custom", "jobs_completed"], freq="1min")
    assert str(s.index.tz) == "UTC" and list(s.columns) == ["custom", "jobs_completed"]
    assert int(s["custom"].sum()) == 3
    with pytest.raises(toolkit.ValidationError, match="freq"):
        ins.metric_series(freq="every tuesday")


def test_full_inspection_changes_nothing(sm, ins, raw_redis, raw_pg, clean) -> None:
    busy(sm)
    sm.close()
    pattern = keys.namespace_pattern(clean.namespace)
    for k in raw_redis.scan_iter(match=pattern):
        raw_redis.persist(k)  # a heartbeat's 2 s TTL must not run out mid-test on a slow machine
    before_keys = {k: raw_redis.dump(k) for k in raw_redis.scan_iter(match=pattern)}
    before_rows = table_digest(raw_pg, clean.schema)
    for name in FRAME_NAMES:
        getattr(ins, name)()
    ins.metric_series()
    after_keys = {k: raw_redis.dump(k) for k in raw_redis.scan_iter(match=pattern)}
    assert after_keys == before_keys
    assert table_digest(raw_pg, clean.schema) == before_rows


def table_digest(conn: psycopg.Connection, schema: str) -> dict[str, str]:
    out = {}
    for (table,) in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,)):
        q = psycopg.sql.SQL(
            "SELECT md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {} t")
        out[table] = conn.execute(q.format(psycopg.sql.Identifier(schema, table))).fetchone()[0]
    return out


@pytest.mark.parametrize("way", ["begin", "autocommit"])
def test_writes_through_the_inspector_connections_are_refused(sm, ins, clean, way) -> None:
    busy(sm)
    with pytest.raises(toolkit.StorageUnavailable, match="read-only"), \
            getattr(ins._db, way)("attempt a write") as conn:
        conn.exec_driver_sql(f'DELETE FROM "{clean.schema}".workflows')
    assert [w.id for w in sm.list_workflows()] == ["wf"]
    assert ins._redis.scripts == {}  # no Lua scripts: nothing that could write


def test_repr_and_html_never_show_a_password(sm, clean) -> None:
    user, sep, rest = clean.database_url.partition("@")
    url = f"{user}:s3cr%40t-pw{sep}{rest}"  # trust auth: the password is accepted and ignored
    ins = toolkit.Inspector(url, clean.redis_url, namespace=clean.namespace, schema=clean.schema)
    try:
        shown = repr(ins) + ins._repr_html_() + repr(ins.settings)
        assert "s3cr" not in shown and "***" in repr(ins)
        assert rest.split("/")[0] in repr(ins)  # host and port stay visible
    finally:
        ins.close()
