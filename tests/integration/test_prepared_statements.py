"""Server-side prepared statements where the connection allows them (issue 18, item 4).

On a direct connection psycopg prepares a statement after it ran PREPARE_THRESHOLD times;
through anything in between (PgBouncer, a proxy: the server's port is not the one the client
dialled) nothing is prepared unless ``TOOLKIT_PG_PREPARE=on``. ``tests/reliability/
test_pgbouncer.py`` runs the whole state layer through a stock PgBouncer in transaction mode.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import sqlalchemy as sa

import toolkit
from tests.conftest import Servers
from toolkit import config, errors
from toolkit.faults import TcpProxy
from toolkit.tiers.postgres import db as pg_db
from toolkit.tiers.postgres import lifecycle


@pytest.fixture
def proxy(clean: Servers) -> Iterator[TcpProxy]:
    p = TcpProxy(*TcpProxy.to_url(clean.database_url).target).start()
    try:
        yield p
    finally:
        p.cut()


def _prepared_after_runs(url: str, schema: str) -> tuple[object, list[str]]:
    """The connection's threshold, and the statements the server holds prepared for it after
    one query ran past the threshold."""
    db = pg_db.Database(url, schema, pool_size=1)
    try:
        with db.engine.connect() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            for _ in range(pg_db.PREPARE_THRESHOLD + 2):
                conn.execute(sa.text("SELECT 41 + 1 AS answer")).scalar_one()
            held = [r[0] for r in conn.execute(sa.text("SELECT statement FROM pg_prepared_statements"))]
            return raw.prepare_threshold, held
    finally:
        db.dispose()


def test_a_direct_connection_prepares_hot_statements(clean: Servers,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    threshold, held = _prepared_after_runs(clean.database_url, clean.schema)
    assert threshold == pg_db.PREPARE_THRESHOLD
    assert any("41 + 1" in s for s in held), held


def test_nothing_is_prepared_through_something_in_between(
        clean: Servers, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    threshold, held = _prepared_after_runs(proxy.url_for(clean.database_url), clean.schema)
    assert threshold is None and not any("41 + 1" in s for s in held), held


@pytest.mark.parametrize("mode,expected", [("on", pg_db.PREPARE_THRESHOLD), ("off", None)])
def test_the_setting_overrides_the_detection(clean: Servers, proxy: TcpProxy,
                                             monkeypatch: pytest.MonkeyPatch,
                                             mode: str, expected: int | None) -> None:
    monkeypatch.setenv(config.PG_PREPARE_VAR, mode)
    url = clean.database_url if mode == "off" else proxy.url_for(clean.database_url)
    threshold, held = _prepared_after_runs(url, clean.schema)
    assert threshold == expected and any("41 + 1" in s for s in held) == (mode == "on")


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def socket_relay(clean: Servers) -> Iterator[str]:
    """A Unix socket on port 6432 relaying one connection to the server's TCP port, as
    PgBouncer's ``unix_socket_dir`` gives: a libpq conninfo that reaches the server through it."""
    where = urlsplit(clean.database_url.replace("+psycopg", ""))
    folder = tempfile.mkdtemp(prefix="tk-sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(os.path.join(folder, ".s.PGSQL.6432"))
    listener.listen(1)
    held: list[socket.socket] = [listener]

    def relay() -> None:
        with contextlib.suppress(OSError):
            client, _ = listener.accept()
            upstream = socket.create_connection((where.hostname or "127.0.0.1", where.port or 5432))
            held.extend([client, upstream])
            back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
            back.start()
            _pump(client, upstream)
            back.join(5)

    thread = threading.Thread(target=relay, daemon=True)
    thread.start()
    try:
        yield f"host={folder} port=6432 user={where.username or 'postgres'} dbname={where.path.lstrip('/')}"
    finally:
        for sock in held:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        thread.join(5)
        os.unlink(os.path.join(folder, ".s.PGSQL.6432"))
        os.rmdir(folder)


def test_a_unix_socket_that_is_not_the_servers_is_not_direct(clean: Servers, socket_relay: str) -> None:
    with psycopg.connect(socket_relay) as conn:
        assert conn.info.host.startswith("/") and conn.info.port == 6432
        assert pg_db._direct(conn) is False


def test_an_idle_ping_keeps_the_prepared_statements(clean: Servers,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkout ping ends its transaction with COMMIT: psycopg's rollback() would drop
    every prepared statement of the connection (and send DEALLOCATE ALL)."""
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    db = pg_db.Database(clean.database_url, clean.schema, pool_size=1)
    query = sa.text("SELECT count(*) FROM pg_prepared_statements WHERE statement LIKE '%41 + 1%'")
    try:
        for _ in range(pg_db.PREPARE_THRESHOLD + 2):
            with db.begin("warm") as conn:
                conn.execute(sa.text("SELECT 41 + 1 AS answer")).scalar_one()
        time.sleep(pg_db.PING_AFTER_IDLE + 0.2)  # the next checkout pings
        with db.begin("after an idle ping") as conn:
            assert conn.execute(query).scalar_one() == 1
    finally:
        db.dispose()


def test_a_bad_setting_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(config.PG_PREPARE_VAR, "sometimes")
    with pytest.raises(errors.ConfigurationError, match="TOOLKIT_PG_PREPARE must be auto, on or off"):
        config.pg_prepare_mode()
    assert config.pg_prepare_mode({config.PG_PREPARE_VAR: " ON "}) == "on"
    assert config.pg_prepare_mode({}) == "auto"


def _plan_cache_mode(engine: sa.Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(sa.text("SHOW plan_cache_mode")).scalar_one())


@pytest.fixture
def sm(make_sm: Any, monkeypatch: pytest.MonkeyPatch) -> toolkit.StateManager:
    """A StateManager made with ``TOOLKIT_PG_PREPARE`` unset (``auto``): the pools read it
    when they are made, so the conftest's ``sm``, made before a test's ``delenv``, would keep
    a value from the environment."""
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    return make_sm()  # type: ignore[no-any-return]


def _plans(sm: toolkit.StateManager) -> list[Any]:
    """(statement, generic plans, custom plans) of what the single-statement pool's
    connection holds prepared (one thread: one connection)."""
    with sm._pipe.db.autocommit("read the plans") as conn:
        return list(conn.execute(sa.text(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements")))


def _planned(sm: toolkit.StateManager, marker: str) -> tuple[int, int]:
    """(generic plans, custom plans) of the one statement held prepared whose text has
    ``marker``, on the single-statement pool's connection."""
    held = [r for r in _plans(sm) if marker in r[0]]
    assert len(held) == 1, _plans(sm)
    return held[0][1], held[0][2]


def test_the_hot_statements_are_planned_once_on_a_direct_connection(sm: toolkit.StateManager) -> None:
    """PostgreSQL re-plans a prepared statement at every run while its generic plan looks
    dearer than a custom one, as a completion's over ``unnest`` of its items always did at
    5,000 jobs (0 generic plans, 65 custom): the single-statement pool plans each once. The
    transaction pool, whose reads filter by any value, keeps the server's choice."""
    w = sm.register_worker("w").id
    wf = sm.create_workflow("plans").id
    for i in range(pg_db.PREPARE_THRESHOLD + 12):
        sm.create_job(wf, f"j{i}")
    job = sm.dequeue(w, start=True)
    while job is not None:
        _, job = sm.complete_and_dequeue(job.id, {"n": 1}, worker_id=w, start=True)
    assert _plan_cache_mode(sm._pipe.db.engines[1]) == "force_generic_plan"
    assert _plan_cache_mode(sm._pipe.db.engine) == "auto"
    assert _planned(sm, "result=CAST(u.val AS JSONB") == (12, 0)


def test_a_failure_is_planned_once_too(sm: toolkit.StateManager) -> None:
    """A failure's statement, over ``unnest`` as a completion's, was planned again at every
    run on the transaction pool (0 generic, 15 custom at 5,000 jobs): it opens its
    transaction on the single-statement pool now, as a completion does."""
    w = sm.register_worker("w").id
    sm.create_workflow("fails", jobs=[{"name": "j", "max_attempts": 100}])
    for _ in range(pg_db.PREPARE_THRESHOLD + 12):
        job = sm.dequeue(w, start=True)
        assert job is not None
        assert sm.fail_job(job.id, "boom", worker_id=w, retry_in=0).status == "queued"
    assert _planned(sm, "error=u.val") == (12, 0)


@pytest.mark.parametrize(("from_jobs", "planned"), [(0, (0, 12)), (50_000, (12, 0))],
                         ids=["large", "small"])
def test_a_roll_up_is_planned_with_its_workflow_in_a_large_table(
        sm: toolkit.StateManager, monkeypatch: pytest.MonkeyPatch, from_jobs: int,
        planned: tuple[int, int]) -> None:
    """The roll-up's EXISTS probes, planned for any workflow, read the jobs table in order
    (90-130 ms at 300,000 jobs in a few workflows): from ``CUSTOM_PLANS_FROM`` jobs on it is
    planned with its workflow's id at every run, even on the pool that plans everything else
    once. Below, planning (about 1.2 ms) would cost more than the read it avoids."""
    monkeypatch.setattr(lifecycle, "CUSTOM_PLANS_FROM", from_jobs)
    w = sm.register_worker("w").id
    for i in range(pg_db.PREPARE_THRESHOLD + 12):
        wf = sm.create_workflow(f"one-{i}", jobs=[{"name": "j"}])
        job = sm.dequeue(w, start=True)
        assert job is not None
        sm.complete_job(job.id, worker_id=w)
        assert sm.get_workflow(wf.id).status == "completed"  # type: ignore[union-attr]
    assert _planned(sm, "AS progressing") == planned


def test_the_estimate_of_jobs_is_postgresqls(sm: toolkit.StateManager, raw_pg: Any,
                                             clean: Servers, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    """Read with a roll-up (same round trip), kept a minute per schema."""
    monkeypatch.setattr(lifecycle, "_estimates", {})  # the tests share one schema name
    w = sm.register_worker("w").id
    sm.create_workflow("counted", jobs=[{"name": f"j{i}"} for i in range(40)])
    raw_pg.execute(f'ANALYZE "{clean.schema}".jobs')
    for expected in (40.0, 40.0):  # the second: kept, though the table holds 41 by then
        sm.create_workflow(f"one-{expected}", jobs=[{"name": "j"}])
        job = sm.dequeue(w, start=True)
        assert job is not None
        sm.complete_job(job.id, worker_id=w)  # rolls its workflow up
        raw_pg.execute(f'ANALYZE "{clean.schema}".jobs')
        assert lifecycle._estimates[clean.schema][1] == expected


def test_only_a_direct_connection_runs_statements_on_a_plan_made_once(
        clean: Servers, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """``plans_once``, which gates the roll-up's ``SET LOCAL``: through something in between
    (statements unnamed, planned with their values) the setting would only cost a round
    trip; directly it is needed."""
    monkeypatch.delenv(config.PG_PREPARE_VAR, raising=False)
    for url, want in ((proxy.url_for(clean.database_url), False), (clean.database_url, True)):
        db = pg_db.Database(url, clean.schema, pool_size=1)
        try:
            for engine in db.engines:
                with engine.connect() as conn:
                    assert pg_db.plans_once(conn.connection.driver_connection) is want
        finally:
            db.dispose()


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_nothing_is_planned_generic_through_something_in_between(
        clean: Servers, proxy: TcpProxy, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """A session SET through a pooler would stay on a server connection other clients
    share: through anything in between nothing is set, whether statements are prepared
    there (``on``) or not (``auto`` finds the connection is not direct)."""
    monkeypatch.setenv(config.PG_PREPARE_VAR, mode)
    db = pg_db.Database(proxy.url_for(clean.database_url), clean.schema, pool_size=1)
    try:
        assert [_plan_cache_mode(e) for e in db.engines] == ["auto", "auto"]
    finally:
        db.dispose()
