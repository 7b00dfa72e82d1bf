"""Find jobs by their payload (issue 16): JSONB containment, a GIN index, payload columns, a cap."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import psycopg
import pytest

import toolkit
from tests.integration.test_cli import base
from toolkit import cli

PAYLOADS = {"j1": {"customer": {"plan": "pro", "id": 1}, "tags": ["a", "b"]},
            "j2": {"customer": {"plan": "free", "id": 2}},
            "j3": {"customer": {"plan": "pro", "id": 3}, "amount": 12.5},
            "j4": None}


@pytest.fixture
def ins(sm: toolkit.StateManager, clean):
    sm.create_workflow("w", workflow_id="wf", jobs=[
        {"name": k, "id": k, **({"payload": v} if v is not None else {})} for k, v in PAYLOADS.items()])
    with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                           schema=clean.schema) as i:
        yield i


def test_payload_containment_selects_the_matching_jobs(ins) -> None:
    assert list(ins.jobs(payload={"customer": {"plan": "pro"}}).index) == ["j1", "j3"]
    assert list(ins.jobs(payload={"tags": ["b"]}).index) == ["j1"]
    assert list(ins.jobs(payload={}).index) == ["j1", "j2", "j3"]  # every object payload
    assert list(ins.jobs(payload={"customer": {"plan": "pro"}}, status="queued",
                         workflow_id="wf").index) == ["j1", "j3"]
    assert ins.jobs(payload={"customer": {"plan": "enterprise"}}).empty


def test_hostile_values_are_bound_not_formatted(ins, raw_pg, clean) -> None:
    assert ins.jobs(payload={"customer": "'); DROP TABLE jobs; --"}).empty
    assert ins.jobs(payload={"a%": "_*"}).empty
    count = raw_pg.execute(psycopg.sql.SQL("SELECT count(*) FROM {}").format(
        psycopg.sql.Identifier(clean.schema, "jobs"))).fetchone()[0]
    assert count == 4


@pytest.mark.parametrize("bad", [[1, 2], "customer", '{"a": 1}', {"x": {1, 2}},
                                 {"x": float("nan")}, {1: "a"}])
def test_a_bad_payload_filter_is_a_clear_error(ins, bad) -> None:
    with pytest.raises(toolkit.ValidationError, match="payload"):
        ins.jobs(payload=bad)


def test_payload_columns_pull_a_path_into_a_column(ins) -> None:
    df = ins.jobs(payload_columns={"plan": "customer.plan", "cid": "customer.id",
                                   "first_tag": "tags.0", "amount": "amount"})
    assert list(df.columns[-4:]) == ["plan", "cid", "first_tag", "amount"]
    assert df["plan"].tolist()[:3] == ["pro", "free", "pro"] and df["plan"].isna().tolist()[3]
    assert df.loc["j1", "cid"] == 1 and df.loc["j1", "first_tag"] == "a"
    assert df.loc["j3", "amount"] == 12.5 and df["amount"].isna().sum() == 3
    for bad in ({"plan": ""}, {"": "customer"}, {"status": "x"}, {"plan": 5}, ["customer.plan"]):
        with pytest.raises(toolkit.ValidationError, match="payload_columns"):
            ins.jobs(payload_columns=bad)


def test_a_capped_search_says_so(ins, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    full = ins.jobs(payload={"customer": {"plan": "pro"}}, limit=5)
    assert len(full) == 2 and full.attrs["capped"] is False
    capped = ins.jobs(payload={"customer": {"plan": "pro"}}, limit=1)
    assert list(capped.index) == ["j1"] and capped.attrs["capped"] is True
    assert "more than 1" in caplog.text
    with pytest.raises(toolkit.ValidationError, match="limit"):
        ins.jobs(limit=0)


def test_the_gin_index_serves_containment(ins, raw_pg, clean) -> None:
    index = raw_pg.execute("SELECT indexdef FROM pg_indexes WHERE schemaname = %s AND indexname = "
                           "'ix_jobs_payload'", (clean.schema,)).fetchone()
    assert index is not None and "gin" in index[0] and "jsonb_path_ops" in index[0]
    with raw_pg.transaction():
        raw_pg.execute("SET LOCAL enable_seqscan = off")
        plan = raw_pg.execute(psycopg.sql.SQL("EXPLAIN SELECT id FROM {} WHERE payload @> %s::jsonb")
                              .format(psycopg.sql.Identifier(clean.schema, "jobs")),
                              (json.dumps({"customer": {"plan": "pro"}}),)).fetchall()
    assert "ix_jobs_payload" in "\n".join(r[0] for r in plan)


def test_a_snapshot_searches_like_the_live_inspector(ins, tmp_path: Path) -> None:
    offline = toolkit.Inspector.from_snapshot(ins.snapshot(tmp_path / "s"))
    for query in ({"customer": {"plan": "pro"}}, {"tags": ["b"]}, {}, {"amount": 12.5}):
        assert list(offline.jobs(payload=query).index) == list(ins.jobs(payload=query).index), query
    cols = {"plan": "customer.plan"}
    assert offline.jobs(payload_columns=cols)["plan"].tolist()[:3] == ["pro", "free", "pro"]


def test_cli_jobs_payload_flag(ins, clean, capsys) -> None:
    assert cli.main(["jobs", "--payload", '{"customer": {"plan": "pro"}}', "--format", "json",
                     "--payload-column", "plan=customer.plan", *base(clean)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["job_id"], r["plan"]) for r in rows] == [("j1", "pro"), ("j3", "pro")]
    assert cli.main(["jobs", "--payload", "{not json", *base(clean)]) == 2
    assert "payload" in capsys.readouterr().err
    assert cli.main(["jobs", "--payload", '{"customer": {}}', "--limit", "1", *base(clean)]) == 0
    out = capsys.readouterr()
    assert "j1" in out.out and "j3" not in out.out and "more than 1" in out.err


def test_an_older_schema_is_searched_without_the_index_and_never_migrated(clean, raw_pg) -> None:
    """The Inspector reads a schema from before migration 0007 (a sequential scan) and adds nothing."""
    from tests.conftest import drop_schema, unique
    from toolkit.tiers.postgres import migrate
    from toolkit.tiers.postgres.db import Database

    old = unique("old")
    db = Database(clean.database_url, old)
    try:
        migrate.upgrade(db, target=4)
        with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                               schema=old) as ins:
            assert ins.jobs(payload={"customer": {"plan": "pro"}}).empty
        assert migrate.applied(db) == [1, 2, 3, 4]
        index = raw_pg.execute("SELECT 1 FROM pg_indexes WHERE schemaname = %s AND indexname = "
                               "'ix_jobs_payload'", (old,)).fetchone()
        assert index is None
    finally:
        db.dispose()
        drop_schema(clean.libpq_url, old)


def test_a_search_keeps_the_wait_of_the_jobs_it_found(sm: toolkit.StateManager, ins) -> None:
    """A search reads only its jobs' events for wait_s: the same value as the whole frame."""
    sm.register_worker("w1")
    first = sm.dequeue("w1")
    second = sm.dequeue("w1")
    assert first is not None and second is not None
    whole = ins.jobs()
    found = ins.jobs(payload={"customer": {"plan": "pro"}})
    assert found["wait_s"].notna().sum() >= 1
    pd.testing.assert_series_equal(found["wait_s"], whole.loc[found.index, "wait_s"])
    capped = ins.jobs(limit=2)
    pd.testing.assert_series_equal(capped["wait_s"], whole.loc[capped.index, "wait_s"])


def test_a_search_keeps_the_due_time_and_key_of_the_jobs_it_found(sm: toolkit.StateManager,
                                                                   ins) -> None:
    """Due times and idempotency keys are read by id for the jobs a search found (not for
    every job, which scanned the whole table): the same values as the whole frame."""
    sm.create_job("wf", "later", job_id="j5", payload={"customer": {"plan": "pro"}}, delay=3600,
                  idempotency_key="order-5")
    sm.create_job("wf", "other", job_id="j6", payload={"customer": {"plan": "free"}}, delay=60,
                  idempotency_key="order-6")
    whole = ins.jobs()
    found = ins.jobs(payload={"customer": {"plan": "pro"}})
    assert sorted(found.index) == ["j1", "j3", "j5"]
    assert found.loc["j5", "idempotency_key"] == "order-5" and pd.notna(found.loc["j5", "run_at"])
    for column in ("run_at", "idempotency_key"):
        pd.testing.assert_series_equal(found[column], whole.loc[found.index, column])


def test_a_tuple_in_the_filter_is_a_json_list_live_and_offline(ins, tmp_path: Path) -> None:
    offline = toolkit.Inspector.from_snapshot(ins.snapshot(tmp_path / "s"))
    assert list(ins.jobs(payload={"tags": ("a",)}).index) == ["j1"]
    assert list(offline.jobs(payload={"tags": ("a",)}).index) == ["j1"]
    with pytest.raises(toolkit.ValidationError) as bad:
        ins.jobs(payload=[{"password": "Hush-77"}])
    assert "Hush-77" not in str(bad.value)
