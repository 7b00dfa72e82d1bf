"""Pause and resume a queue (issue 16, item 2): persisted in PostgreSQL, mirrored to Redis,
enforced inside the claim script, restored by the rebuild and the repair, seen by the Inspector."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import toolkit
from tests.conftest import wipe_namespace
from toolkit import errors
from toolkit.inspection import prometheus
from toolkit.tiers.redis import keys


def two_queues(sm: toolkit.StateManager) -> None:
    """Jobs r1, r2 on queue 'reports', d1 on 'default', and worker w serving both."""
    sm.register_worker("w", queues=["reports", "default"])
    sm.create_workflow("wf", jobs=[
        {"name": "r1", "id": "r1", "queue": "reports", "priority": 5},
        {"name": "r2", "id": "r2", "queue": "reports", "priority": 5},
        {"name": "d1", "id": "d1", "queue": "default"}])


def paused_rows(raw_pg, schema: str) -> list[tuple]:
    from psycopg import sql
    return raw_pg.execute(sql.SQL("SELECT queue, reason, actor FROM {} ORDER BY queue").format(
        sql.Identifier(schema, "paused_queues"))).fetchall()


def test_paused_queue_hands_out_nothing_while_another_queue_serves(sm) -> None:
    two_queues(sm)
    assert sm.pause_queue("reports", reason="upstream API down", actor="alice") is True
    got = sm.dequeue("w")
    assert got is not None and got.id == "d1"  # r1 has the higher priority, but it is paused
    assert sm.dequeue("w") is None
    assert sm.dequeue("w", queues=["reports"]) is None
    assert sm.get_job("r1").status == "queued"


def test_resume_serves_again(sm) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="maintenance")
    assert sm.dequeue("w", queues=["reports"]) is None
    assert sm.resume_queue("reports", actor="bob") is True
    assert sm.dequeue("w", queues=["reports"]).id == "r1"
    assert sm.resume_queue("reports") is False  # not paused: nothing to do


def test_work_in_flight_finishes_after_a_pause(sm) -> None:
    two_queues(sm)
    job = sm.dequeue("w", queues=["reports"])
    sm.pause_queue("reports", reason="stop new work")
    sm.start_job(job.id, worker_id="w")
    assert sm.complete_job(job.id, {"ok": 1}, worker_id="w").status == "completed"


def test_pausing_again_keeps_the_first_pause(sm, raw_pg, clean) -> None:
    sm.pause_queue("reports", reason="first", actor="alice")
    assert sm.pause_queue("reports", reason="second", actor="bob") is False
    assert paused_rows(raw_pg, clean.schema) == [("reports", "first", "alice")]


@pytest.mark.parametrize(("queue", "reason"), [
    ("", "why"), ("bad\x00name", "why"), ("x" * 300, "why"), (None, "why"),
    ("reports", ""), ("reports", "   "), ("reports", None), ("reports", 5)])
def test_bad_input_is_refused_and_writes_nothing(sm, raw_pg, raw_redis, clean, queue, reason) -> None:
    with pytest.raises(errors.ValidationError):
        sm.pause_queue(queue, reason=reason)
    assert paused_rows(raw_pg, clean.schema) == []
    assert raw_redis.smembers(keys.paused_queues(clean.namespace)) == set()


def test_bad_actor_is_refused(sm, raw_pg, clean) -> None:
    with pytest.raises(errors.ValidationError):
        sm.pause_queue("reports", reason="why", actor="")
    with pytest.raises(errors.ValidationError):
        sm.resume_queue("bad\nqueue")
    assert paused_rows(raw_pg, clean.schema) == []


def test_pause_survives_a_coordinator_restart(sm, make_sm) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="incident 42")
    sm.close()
    fresh = make_sm()
    assert fresh.dequeue("w").id == "d1"
    assert fresh.dequeue("w") is None


def test_pause_survives_a_redis_loss_and_rebuild(sm, raw_redis, clean) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="incident 42")
    wipe_namespace(clean.redis_url, clean.namespace)  # Redis lost everything
    sm.rebuild()
    assert raw_redis.smembers(keys.paused_queues(clean.namespace)) == {"reports"}
    assert sm.dequeue("w").id == "d1"
    assert sm.dequeue("w") is None


def test_check_finds_a_lost_mirror_and_repair_restores_it(sm, raw_redis, clean) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="incident 42")
    assert sm.check_consistency().ok
    raw_redis.delete(keys.paused_queues(clean.namespace))
    report = sm.check_consistency()
    assert not report.ok and "queue 'reports' is paused in PostgreSQL" in str(report)
    sm.repair()
    assert sm.check_consistency().ok
    assert sm.dequeue("w").id == "d1" and sm.dequeue("w") is None
    raw_redis.sadd(keys.paused_queues(clean.namespace), "default")  # a stray pause
    assert "queue 'default' is paused in Redis" in str(sm.check_consistency())
    sm.repair()
    assert raw_redis.smembers(keys.paused_queues(clean.namespace)) == {"reports"}


def test_inspector_shows_the_pause(sm) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="upstream API down", actor="alice")
    ins = sm.inspector
    q = ins.queues()
    assert bool(q.loc["reports", "paused"]) and not bool(q.loc["default", "paused"])
    assert q.loc["reports", "reason"] == "upstream API down"
    assert q.loc["reports", "paused_by"] == "alice"
    assert q.loc["reports", "paused_since"].tzname() == "UTC"
    assert int(q.loc["reports", "depth"]) == 2
    assert int(ins.summary().loc["queues_paused", "value"]) == 1
    sm.resume_queue("reports")
    assert not ins.queues()["paused"].any()
    assert int(ins.summary().loc["queues_paused", "value"]) == 0


def test_explain_names_the_pause(sm) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="upstream API down", actor="alice")
    text = str(sm.inspector.explain("r1"))
    assert "queue 'reports' paused since " in text
    assert " by alice: upstream API down" in text
    assert "paused" not in str(sm.inspector.explain("d1"))


def test_prometheus_has_a_paused_gauge_per_queue(sm) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="x")
    text = prometheus.render(sm.inspector)
    assert 'toolkit_queue_paused{queue="reports"} 1.0' in text
    assert 'toolkit_queue_paused{queue="default"} 0.0' in text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert "toolkit_queue_paused" in names


def test_cli_pause_and_resume_round_trip(sm, clean, capsys) -> None:
    from tests.integration.test_cli import base
    from toolkit import cli

    two_queues(sm)
    argv = ["pause", "reports", "--reason", "upstream API down", "--actor", "sre-bot", "--yes"]
    assert cli.main([*argv, *base(clean)]) == 0
    assert "queue 'reports' paused" in capsys.readouterr().out
    assert sm.dequeue("w").id == "d1" and sm.dequeue("w") is None
    assert cli.main([*argv, *base(clean)]) == 0  # again: nothing changes, and it says so
    out = capsys.readouterr().out
    assert "already paused" in out and "by sre-bot: upstream API down" in out
    assert cli.main(["inspect", "queues", "--format", "json", *base(clean)]) == 0
    assert '"paused": true' in capsys.readouterr().out
    assert cli.main(["resume", "reports", "--yes", *base(clean)]) == 0
    assert "queue 'reports' resumed" in capsys.readouterr().out
    assert sm.dequeue("w").id == "r1"
    assert cli.main(["resume", "reports", "--yes", *base(clean)]) == 0
    assert "was not paused" in capsys.readouterr().out


def test_a_snapshot_keeps_the_pause_and_an_older_one_reads_as_none(sm, tmp_path) -> None:
    two_queues(sm)
    sm.pause_queue("reports", reason="upstream API down", actor="alice")
    path = sm.inspector.snapshot(tmp_path / "snap")
    off = toolkit.Inspector.from_snapshot(path)
    assert bool(off.queues().loc["reports", "paused"])
    assert "paused since " in str(off.explain("r1")) and "by alice" in str(off.explain("r1"))
    assert 'toolkit_queue_paused{queue="reports"} 1.0' in prometheus.render(off)
    (path / "paused.parquet").unlink()  # a snapshot taken before pausing existed
    older = toolkit.Inspector.from_snapshot(path)
    assert not older.queues()["paused"].any() and "paused" not in str(older.explain("r1"))


def test_cli_check_names_a_lost_mirror_and_repair_fixes_it(sm, clean, raw_redis, capsys) -> None:
    from tests.integration.test_cli import base
    from toolkit import cli

    sm.pause_queue("reports", reason="x")
    raw_redis.delete(keys.paused_queues(clean.namespace))
    assert cli.main(["check", *base(clean)]) == 1
    assert "paused: queue 'reports' is paused in PostgreSQL but not in Redis" in capsys.readouterr().out
    assert cli.main(["check", "--repair", *base(clean)]) == 0
    assert cli.main(["check", *base(clean)]) == 0
