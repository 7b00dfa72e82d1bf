"""Bulk operator actions: plan (no writes), then apply in batches under per-job version guards."""

from __future__ import annotations

import json
from typing import Any

import psycopg
import pytest
import redis

import toolkit
from toolkit import errors
from toolkit.tiers.redis import keys as tk_keys


def _failed(sm: toolkit.StateManager, n: int, *, name: str = "wf", queue: str = "default",
            error: str = "upstream 503") -> list[toolkit.Job]:
    """``n`` jobs failed for good (one attempt each), in one workflow."""
    wf = sm.create_workflow(name, jobs=[{"name": f"j{i}", "queue": queue, "max_attempts": 1}
                                        for i in range(n)])
    sm.register_worker("w-fail", queues=[queue])
    for _ in range(n):
        job = sm.dequeue("w-fail")
        assert job is not None
        sm.start_job(job.id)
        sm.fail_job(job.id, error, retry=False)
    return sorted(sm.list_jobs(workflow_id=wf.id), key=lambda j: j.name)


def _state(raw_pg: psycopg.Connection, raw_redis: redis.Redis, clean: Any) -> tuple[Any, ...]:
    """Every row of the schema's tables and every key of the namespace, with values."""
    schema = psycopg.sql.Identifier(clean.schema)
    rows = {}
    for (table,) in raw_pg.execute("SELECT tablename FROM pg_tables WHERE schemaname = %s "
                                   "ORDER BY 1", (clean.schema,)).fetchall():
        q = psycopg.sql.SQL("SELECT * FROM {}.{}").format(schema, psycopg.sql.Identifier(table))
        rows[table] = sorted(map(repr, raw_pg.execute(q).fetchall()))
    keys = {}
    ticking = {tk_keys.applied(clean.namespace)}  # each coordinator's watermark, once a second
    # A heartbeat's key ends with its TTL (2 s here), which the two reads can outlast: not a
    # write.
    beats = tk_keys.heartbeat(clean.namespace, "")
    for key in sorted(raw_redis.scan_iter(f"{{{clean.namespace}}}:*")):
        if key.endswith(":metrics") or ":metric" in key or key in ticking or key.startswith(beats):
            continue
        keys[key] = repr(raw_redis.dump(key))
    return rows, keys


def test_a_plan_writes_nothing(sm: toolkit.StateManager, raw_pg: psycopg.Connection,
                               raw_redis: redis.Redis, clean: Any) -> None:
    jobs = _failed(sm, 3)
    before = _state(raw_pg, raw_redis, clean)
    plan = sm.plan_action("requeue", status="failed", reason="dependency back", actor="sre-1")
    assert _state(raw_pg, raw_redis, clean) == before
    assert sorted(plan.frame.index) == sorted(j.id for j in jobs)
    assert list(plan.frame["version"]) == [j.version for j in sorted(jobs, key=lambda j: j.id)]
    assert str(plan.frame["status"].dtype) == "category" and plan.frame.index.name == "job_id"
    assert plan.counts.loc[("failed", "default"), "jobs"] == 3
    assert sm.inspector.actions().empty


def test_apply_changes_exactly_the_planned_jobs(sm: toolkit.StateManager) -> None:
    jobs = _failed(sm, 4)
    other = _failed(sm, 2, name="other", error="bad input")
    plan = sm.plan_action("requeue", status="failed", error_contains="503", reason="dep back",
                          actor="sre-1")
    assert set(plan.frame.index) == {j.id for j in jobs}
    result = sm.apply_action(plan, batch=3, progress=False)
    assert (result.applied, result.skipped) == (4, 0)
    for j in jobs:
        now = sm.get_job(j.id)
        assert now is not None and now.status == "queued" and now.version > j.version
    assert {sm.get_job(j.id).status for j in other} == {"failed"}  # type: ignore[union-attr]
    events = sm.inspector.events()
    mine = events[events["detail"].fillna("").str.contains(plan.id)]
    assert set(mine["job_id"]) == {j.id for j in jobs}
    assert all("sre-1" in d and "dep back" in d for d in mine["detail"])
    actions = sm.inspector.actions()
    row = actions.loc[plan.id]
    assert (row["verb"], row["actor"], row["reason"], row["status"]) == \
        ("requeue", "sre-1", "dep back", "finished")
    assert (row["planned"], row["applied"], row["skipped"]) == (4, 4, 0)
    assert sm.check_consistency().ok


def test_a_job_changed_after_the_plan_is_skipped_and_reported(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("race", jobs=[{"name": f"j{i}"} for i in range(3)])
    plan = sm.plan_action("cancel", workflow_id=wf.id, reason="bad deploy")
    sm.register_worker("w1")
    taken = sm.dequeue("w1")
    assert taken is not None
    sm.start_job(taken.id)
    sm.complete_job(taken.id, {"ok": True})  # a worker finishes one between plan and apply
    result = sm.apply_action(plan, progress=False)
    assert (result.applied, result.skipped) == (2, 1)
    assert list(result.skipped_ids) == [taken.id]
    done = sm.get_job(taken.id)
    assert done is not None and done.status == "completed" and done.result == {"ok": True}
    assert sm.get_workflow(wf.id).status == "completed"  # type: ignore[union-attr]
    assert sm.inspector.actions().loc[plan.id, "skipped"] == 1
    assert sm.check_consistency().ok


def test_a_plan_lists_jobs_workflow_by_workflow(sm: toolkit.StateManager) -> None:
    """So that each batch of an apply touches one or two workflows and rolls up only those
    (in id order, every batch of 500 touched nearly every workflow: 11.8x the floor at 100k)."""
    jobs = _failed(sm, 10, name="a") + _failed(sm, 10, name="b") + _failed(sm, 10, name="c")
    plan = sm.plan_action("requeue", status="failed")
    order = list(plan.frame["workflow_id"])
    assert len(order) == 30 and order == sorted(order)
    for wf in set(order):  # within a workflow, by id (a stable, resumable order)
        ids = [i for i, w in zip(plan.frame.index, order, strict=True) if w == wf]
        assert ids == sorted(ids)
    assert set(plan.frame.index) == {j.id for j in jobs}


def test_a_requeue_logs_queued_and_retried_for_each_job_naming_the_action(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, clean: Any) -> None:
    jobs = _failed(sm, 3)
    plan = sm.plan_action("requeue", status="failed", reason="dep back", actor="sre-1")
    sm.apply_action(plan, progress=False)
    q = psycopg.sql.SQL("SELECT job_id, workflow_id, event, status, worker_id, attempt, at, detail "
                        "FROM {}.job_events WHERE detail->>'action_id' = %s ORDER BY id").format(
        psycopg.sql.Identifier(clean.schema))
    rows = raw_pg.execute(q, (plan.id,)).fetchall()
    assert sorted((r[0], r[2]) for r in rows) == sorted(
        [(j.id, "queued") for j in jobs] + [(j.id, "retried") for j in jobs])
    for job_id, wf, event, status, worker, attempt, at, detail in rows:
        assert (wf, status, worker, attempt) == (jobs[0].workflow_id, "queued", None, 1)
        assert at.tzinfo is not None and len({r[6] for r in rows}) == 1  # one batch, one time
        expected = {"action_id": plan.id, "actor": "sre-1", "reason": "dep back"}
        if event == "retried":  # a job out of attempts is granted one more: one left
            expected |= {"manual": True, "attempts_left": 1}
        assert detail == expected, (job_id, event, detail)


def test_workflow_statuses_after_a_requeue_and_a_priority_change(sm: toolkit.StateManager) -> None:
    """A failed workflow runs again; a running one stays running, its row untouched (its
    roll-up is skipped: a queued job can neither complete nor fail it); a priority change
    touches no workflow."""
    failed = _failed(sm, 2, name="all-failed")
    wf_failed = failed[0].workflow_id
    assert sm.get_workflow(wf_failed).status == "failed"  # type: ignore[union-attr]
    mixed = sm.create_workflow("mixed", jobs=[{"name": "a", "max_attempts": 1}, {"name": "b"}])
    sm.register_worker("w-mixed")
    job = sm.dequeue("w-mixed")
    assert job is not None
    sm.start_job(job.id)
    sm.fail_job(job.id, "boom", retry=False)
    before = sm.get_workflow(mixed.id)
    assert before is not None and before.status == "running"
    result = sm.apply_action(sm.plan_action("requeue", status="failed"), progress=False)
    assert result.applied == 3
    assert sm.get_workflow(wf_failed).status == "running"  # type: ignore[union-attr]
    after = sm.get_workflow(mixed.id)
    assert after is not None and (after.status, after.version) == ("running", before.version)
    moved = sm.apply_action(sm.plan_action("set_priority", workflow_id=mixed.id, value=7),
                            progress=False)
    assert moved.applied == 2 and sm.get_workflow(mixed.id).version == before.version  # type: ignore[union-attr]
    assert sm.check_consistency().ok


def test_a_second_apply_of_the_same_plan_changes_nothing_more(sm: toolkit.StateManager) -> None:
    _failed(sm, 3)
    plan = sm.plan_action("requeue", status="failed")
    first = sm.apply_action(plan, progress=False)
    again = sm.apply_action(plan, progress=False)
    assert (first.applied, again.applied, again.already, again.skipped) == (3, 0, 3, 0)
    row = sm.inspector.actions().loc[plan.id]
    assert (row["applied"], row["skipped"], row["status"]) == (3, 0, "finished")


def test_set_priority_move_queue_and_fail_keep_the_tiers_consistent(
        sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("ops", jobs=[{"name": f"j{i}"} for i in range(4)])
    sm.apply_action(sm.plan_action("set_priority", workflow_id=wf.id, value=7), progress=False)
    for name in ("j0", "j1"):
        sm.apply_action(sm.plan_action("move_queue", workflow_id=wf.id, name=name, value="urgent"),
                        progress=False)
    jobs = {j.name: j for j in sm.list_jobs(workflow_id=wf.id)}
    assert {j.priority for j in jobs.values()} == {7}
    assert (jobs["j0"].queue, jobs["j1"].queue, jobs["j2"].queue) == ("urgent", "urgent", "default")
    assert sm.check_consistency().ok
    sm.apply_action(sm.plan_action("cancel", workflow_id=wf.id, queue="urgent", reason="poison"),
                    progress=False)
    assert {j.name: j.status for j in sm.list_jobs(workflow_id=wf.id)} == \
        {"j0": "cancelled", "j1": "cancelled", "j2": "queued", "j3": "queued"}
    sm.register_worker("u", queues=["urgent"])
    assert sm.dequeue("u") is None
    sm.register_worker("d", queues=["default"])
    running = sm.dequeue("d")
    assert running is not None
    sm.start_job(running.id)
    plan = sm.plan_action("fail", status="running", reason="poison pill", actor="sre-2")
    assert list(plan.frame.index) == [running.id]
    sm.apply_action(plan, progress=False)
    failed = sm.get_job(running.id)
    assert failed is not None and (failed.status, failed.error) == ("failed", "poison pill")
    assert sm.list_assignments(job_id=running.id)[0].status == "failed"
    assert sm.check_consistency().ok


def test_delete_removes_the_jobs_from_every_tier(sm: toolkit.StateManager) -> None:
    jobs = _failed(sm, 2)
    plan = sm.plan_action("delete", status="failed", reason="junk")
    assert sm.apply_action(plan, progress=False).applied == 2
    assert all(sm.get_job(j.id) is None for j in jobs)
    assert sm.check_consistency().ok


@pytest.mark.parametrize("verb, filters, match", [
    ("requeue", {}, "empty filter"),
    ("delete", {"all": True}, "delete"),
    ("requeue", {"status": "nope"}, "status"),
    ("requeue", {"payload": {1, 2}}, "payload"),
    ("requeue", {"older_than": -5}, "older_than"),
    ("explode", {"status": "failed"}, "verb"),
    ("set_priority", {"status": "queued"}, "value"),
    ("move_queue", {"status": "queued", "value": ""}, "value"),
    ("requeue", {"workflow_id": "x\x00"}, "workflow_id"),
    ("requeue", {"name": "a\x00"}, "name"),
])
def test_hostile_filters_are_refused_with_nothing_written(
        sm: toolkit.StateManager, raw_pg: psycopg.Connection, raw_redis: redis.Redis, clean: Any,
        verb: str, filters: dict[str, Any], match: str) -> None:
    _failed(sm, 1)
    before = _state(raw_pg, raw_redis, clean)
    with pytest.raises(errors.ValidationError, match=match):
        sm.plan_action(verb, **filters)
    assert _state(raw_pg, raw_redis, clean) == before


def test_sql_wildcards_in_a_name_pattern_match_only_themselves(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("names", jobs=[{"name": n} for n in ("a%b", "axxb", "a_c", "abc",
                                                                 "a\\c", "a\\%")])
    assert sorted(sm.plan_action("cancel", workflow_id=wf.id, name="a\\%").frame["name"]) == ["a\\%"]
    assert sorted(sm.plan_action("cancel", workflow_id=wf.id, name="a%b").frame["name"]) == ["a%b"]
    assert sorted(sm.plan_action("cancel", workflow_id=wf.id, name="a_c").frame["name"]) == ["a_c"]
    assert sorted(sm.plan_action("cancel", name="%").frame["name"]) == []
    assert sorted(sm.plan_action("cancel", name="a*").frame["name"]) == \
        sorted(["a%b", "a_c", "abc", "axxb", "a\\c", "a\\%"])
    assert sorted(sm.plan_action("cancel", error_contains="%").frame.index) == []
    assert sm.plan_action("cancel", workflow_id="x' OR 1=1 --").frame.empty


def test_payload_containment_and_all_flag(sm: toolkit.StateManager) -> None:
    sm.create_workflow("pay", jobs=[{"name": "pro", "payload": {"customer": {"plan": "pro"}}},
                                    {"name": "free", "payload": {"customer": {"plan": "free"}}}])
    plan = sm.plan_action("cancel", payload={"customer": {"plan": "pro"}}, reason="churned")
    assert list(plan.frame["name"]) == ["pro"]
    assert "customer" in repr(plan)
    assert sm.apply_action(plan, progress=False).applied == 1
    recorded = json.loads(sm.inspector.actions().loc[plan.id, "filter"])
    assert recorded == {"payload": {"customer": {"plan": "pro"}}}
    assert len(sm.plan_action("cancel", all=True).frame) == 1  # the other one


def test_a_job_a_worker_took_after_the_plan_stays_the_workers(sm: toolkit.StateManager) -> None:
    wf = sm.create_workflow("taken", jobs=[{"name": f"j{i}"} for i in range(3)])
    plan = sm.plan_action("cancel", workflow_id=wf.id, reason="bad deploy")
    sm.register_worker("w1")
    taken = sm.dequeue("w1")  # still cancellable by status, but no longer the planned version
    assert taken is not None
    sm.start_job(taken.id)
    result = sm.apply_action(plan, progress=False)
    assert (result.applied, result.skipped_ids) == (2, (taken.id,))
    done = sm.complete_job(taken.id, {"ok": 1}, worker_id="w1", attempt=taken.attempts)
    assert done.status == "completed"
    assert sm.check_consistency().ok


def test_age_filters_use_the_time_a_job_last_changed(sm: toolkit.StateManager) -> None:
    jobs = _failed(sm, 2)
    assert sm.plan_action("requeue", status="failed", older_than=3600).frame.empty
    assert sorted(sm.plan_action("requeue", status="failed", since=3600).frame.index) == \
        sorted(j.id for j in jobs)


def test_a_secret_in_a_payload_filter_is_masked_in_the_action_record(
        sm: toolkit.StateManager, clean: Any, capsys: Any) -> None:
    from tests.integration.test_cli import base
    from toolkit import cli

    sm.create_workflow("pay", jobs=[{"name": "a", "payload": {"api_key": "sk-live-123", "n": 1}}])
    plan = sm.plan_action("cancel", payload={"api_key": "sk-live-123"}, reason="leaked key")
    assert sm.apply_action(plan, progress=False).applied == 1
    shown = sm.inspector.actions()
    assert "sk-live-123" not in shown.to_csv()
    assert json.loads(shown.loc[plan.id, "filter"]) == {"payload": {"api_key": "***"}}
    assert "sk-live-123" in sm.inspector.actions(unmask=True).loc[plan.id, "filter"]
    assert cli.main(["actions", "--format", "json", *base(clean)]) == 0
    assert "sk-live-123" not in capsys.readouterr().out
