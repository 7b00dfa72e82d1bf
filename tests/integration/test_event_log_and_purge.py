"""The job event log (same transaction as each change) and retention (purge)."""

from __future__ import annotations

import time
from datetime import timedelta

import psycopg
import pytest

import toolkit
from toolkit.tiers.redis import heartbeats, keys


def events(raw_pg: psycopg.Connection, schema: str, job_id: str) -> list[tuple]:
    q = psycopg.sql.SQL("SELECT event, status, worker_id, attempt, detail FROM {} "
                        "WHERE job_id = %s ORDER BY id").format(psycopg.sql.Identifier(schema, "job_events"))
    return raw_pg.execute(q, (job_id,)).fetchall()


def test_every_state_change_is_logged_in_order(sm, raw_pg, clean) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a", "max_attempts": 2},
                                  {"name": "b", "id": "b", "depends_on": ["a"]}])
    sm.register_worker("w1")
    sm.dequeue("w1")
    sm.start_job("a")
    sm.fail_job("a", "boom", retry_in=0)
    sm.dequeue("w1")
    sm.start_job("a")
    sm.complete_job("a")
    got = [(e[0], e[1], e[2], e[3]) for e in events(raw_pg, clean.schema, "a")]
    assert got == [
        ("created", "queued", None, 0), ("queued", "queued", None, 0),
        ("assigned", "assigned", "w1", 1), ("started", "running", "w1", 1),
        ("failed", "failed", "w1", 1), ("retried", "queued", None, 1),
        ("assigned", "assigned", "w1", 2), ("started", "running", "w1", 2),
        ("completed", "completed", "w1", 2),
    ]
    assert events(raw_pg, clean.schema, "a")[4][4] == {"error": "boom"}
    b = [(e[0], e[1]) for e in events(raw_pg, clean.schema, "b")]
    assert b == [("created", "pending"), ("queued", "queued")]
    assert events(raw_pg, clean.schema, "b")[1][4] == {"released_by": "a"}


def test_reclaim_logs_the_rule_and_the_heartbeat_age(sm, raw_pg, clean) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    sm.register_worker("dies")
    sm.dequeue("dies")
    time.sleep(sm.settings.heartbeat_ttl + 0.3)
    assert [j.id for j in sm.reap_dead_workers()] == ["a"]
    last = events(raw_pg, clean.schema, "a")[-1]
    assert last[0] == "reclaimed" and last[2] == "dies"
    assert "heartbeat_ttl" in last[4]["rule"] and last[4]["heartbeat_age_s"] > sm.settings.heartbeat_ttl


def test_a_rolled_back_write_logs_nothing(sm, raw_pg, clean) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    with pytest.raises(toolkit.InvalidTransition):
        sm.complete_job("a")
    assert [e[0] for e in events(raw_pg, clean.schema, "a")] == ["created", "queued"]


def test_deleted_jobs_keep_their_history(sm, raw_pg, clean) -> None:
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
    sm.delete_workflow("wf")
    assert [e[0] for e in events(raw_pg, clean.schema, "a")] == ["created", "queued", "deleted"]


def test_bulk_create_logs_events_in_bulk(sm, raw_pg, clean) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}"} for i in range(300)])
    n = raw_pg.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(
        psycopg.sql.Identifier(clean.schema, "job_events"))).fetchone()[0]
    assert n == 600


def test_purge_removes_old_finished_jobs_only(sm, raw_pg, raw_redis, clean) -> None:
    sm.create_workflow("w", jobs=[{"name": f"j{i}", "id": f"j{i}"} for i in range(5)])
    sm.register_worker("w1", capacity=10)
    for _ in range(3):
        job = sm.dequeue("w1")
        sm.start_job(job.id)
        sm.complete_job(job.id)
    sm.cancel_job("j3")
    assert sm.purge(0) == 0  # j4 is queued: the workflow is live, so none of its jobs goes
    sm.cancel_job("j4")
    assert sm.get_workflow(sm.get_job("j0").workflow_id).status == "completed"
    assert sm.purge(timedelta(hours=1)) == 0  # nothing is old enough
    assert sm.purge(0, dry_run=True) == 5
    assert sm.get_job("j0") is not None
    assert sm.purge(0, batch=2) == 5
    assert sm.list_jobs() == []
    assert sm.list_assignments() == []
    assert events(raw_pg, clean.schema, "j0") == []
    assert not raw_redis.exists(keys.entity(clean.namespace, "job", "j0"))
    assert sm.get_job("j0") is None
    assert sm.check_consistency().ok
    with pytest.raises(toolkit.ValidationError, match="statuses"):
        sm.purge(0, statuses=("queued",))


def test_heartbeat_history_is_kept_and_bounded(sm) -> None:
    sm.register_worker("w1")
    for _ in range(5):
        sm.heartbeat("w1")
    hist = heartbeats.history(sm.redis, sm.ns, ["w1"])["w1"]
    assert len(hist) == 6 and hist == sorted(hist)
    assert heartbeats.HISTORY_LENGTH >= 100
