"""Issue 13, item 3: the settings that change the meaning of state live with the state.

A coordinator records its heartbeat TTL and claim lease in PostgreSQL; an Inspector in
another process (no TTL given) judges liveness with the coordinator's TTL, so
``workers()``, ``explain`` and ``reap_dead_workers()`` agree. Real servers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg
import pytest
from psycopg import sql

import toolkit
from tests.conftest import drop_schema, unique
from toolkit import cli
from toolkit.inspection import prometheus
from toolkit.tiers.postgres import migrate
from toolkit.tiers.postgres.db import Database


def other_process_inspector(clean: Any, schema: str | None = None) -> toolkit.Inspector:
    return toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                             schema=schema or clean.schema)


def settings_rows(raw_pg: psycopg.Connection, schema: str) -> list[tuple[Any, ...]]:
    q = sql.SQL("SELECT namespace, heartbeat_ttl, claim_lease FROM {}").format(
        sql.Identifier(schema, "settings"))
    return raw_pg.execute(q).fetchall()


def test_inspector_uses_the_coordinators_ttl_and_agrees_with_the_reaper(
        sm: toolkit.StateManager, clean: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert sm.settings.heartbeat_ttl == 2.0
    sm.register_worker("quiet")
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    sm.start_job(sm.dequeue("quiet").id)
    with other_process_inspector(clean) as ins:
        assert ins.heartbeat_ttl == 2.0
        assert "recorded" in ins.heartbeat_ttl_source
        assert bool(ins.workers().loc["quiet", "alive"])
        assert ins.explain("a").facts["will_be_reclaimed"] is False
        time.sleep(2.6)  # the worker stops beating while it holds 'a'
        assert not bool(ins.workers().loc["quiet", "alive"])
        assert 'toolkit_workers{state="unresponsive"} 1.0' in prometheus.render(ins)
        ex = ins.explain("a")
        assert ex.facts["heartbeat_ttl_s"] == 2.0 and ex.facts["will_be_reclaimed"] is True, str(ex)
    assert cli.main(["explain", "a", "--database-url", clean.database_url, "--redis-url",
                     clean.redis_url, "--namespace", clean.namespace, "--schema", clean.schema]) == 0
    said = capsys.readouterr().out
    assert "heartbeat TTL 2.0s)" in said and "counts as dead" in said, said
    assert [j.id for j in sm.reap_dead_workers()] == ["a"]


def test_two_coordinators_with_different_ttls_last_writer_wins_with_a_warning(
        sm: toolkit.StateManager, make_sm: Any, clean: Any, raw_pg: psycopg.Connection,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="toolkit"):
        make_sm(heartbeat_ttl=3.0)
    assert any("heartbeat_ttl" in r.getMessage() and "2.0" in r.getMessage()
               for r in caplog.records), caplog.text
    assert settings_rows(raw_pg, clean.schema) == [(clean.namespace, 3.0, 30.0)]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="toolkit"):
        adopted = make_sm(heartbeat_ttl=None)  # states no TTL: adopts the recorded one
    assert adopted.settings.heartbeat_ttl == 3.0 and not caplog.records
    with other_process_inspector(clean) as ins:
        assert ins.heartbeat_ttl == 3.0


def test_inspector_without_recorded_settings_falls_back_and_says_so(
        clean: Any, raw_pg: psycopg.Connection) -> None:
    old = unique("old")
    db = Database(clean.database_url, old)
    try:
        migrate.upgrade(db, target=3)  # a schema from before the settings table
        with other_process_inspector(clean, old) as ins:
            assert ins.heartbeat_ttl == 30.0
            assert "default" in ins.heartbeat_ttl_source and "no settings table" in ins.heartbeat_ttl_source
            ins.workers()
        exists = raw_pg.execute("SELECT to_regclass(%s)", (f'"{old}".settings',)).fetchone()
        assert exists == (None,)  # read-only: nothing created
    finally:
        db.dispose()
        drop_schema(clean.libpq_url, old)


def test_inspector_with_no_row_for_its_namespace_falls_back_and_says_so(
        sm: toolkit.StateManager, clean: Any, raw_pg: psycopg.Connection) -> None:
    raw_pg.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(clean.schema, "settings")))
    with other_process_inspector(clean) as ins:
        assert ins.heartbeat_ttl == 30.0
        assert "no coordinator has recorded" in ins.heartbeat_ttl_source
    assert settings_rows(raw_pg, clean.schema) == []
