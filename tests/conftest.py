"""Shared fixtures: real PostgreSQL and Redis for every integration test.

With ``DATABASE_URL`` and ``REDIS_URL`` set, the tests use those servers;
otherwise the session starts the embedded stack (``toolkit.local_stack``).
Nothing is ever skipped. Each run gets its own schema and namespace with a
random suffix, reset between tests and dropped by name at the end (never
FLUSHDB, never DROP DATABASE).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
import redis

import toolkit
from toolkit import config, scenarios


@dataclass(frozen=True)
class Servers:
    """Where the test servers are, and the isolated schema/namespace of this run."""

    database_url: str
    redis_url: str
    schema: str
    namespace: str
    embedded: toolkit.LocalStack | None

    @property
    def libpq_url(self) -> str:
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)


def unique(prefix: str) -> str:
    """Return ``prefix`` plus a random suffix, usable as a schema and a namespace."""
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def drop_schema(libpq_url: str, schema: str) -> None:
    """Drop one schema by name."""
    scenarios.drop_schema(libpq_url, schema)


def wipe_namespace(redis_url: str, namespace: str) -> int:
    """Delete every key of one namespace (SCAN + UNLINK); return how many."""
    return scenarios.wipe_namespace(redis_url, namespace)


def truncate_schema(libpq_url: str, schema: str) -> None:
    """Empty every table of a schema (between tests)."""
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> 'schema_migrations'",
            (schema,),
        ).fetchall()
        if rows:
            tables = psycopg.sql.SQL(", ").join(
                psycopg.sql.Identifier(schema, r[0]) for r in rows)
            conn.execute(psycopg.sql.SQL("TRUNCATE {} CASCADE").format(tables))


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    """The PostgreSQL and Redis of this test session."""
    db_url = os.environ.get(config.DATABASE_URL_VAR)
    redis_url = os.environ.get(config.REDIS_URL_VAR)
    stack = None
    if not (db_url and redis_url):
        stack = toolkit.local_stack()
        stack.start()
        db_url, redis_url = stack.database_url, stack.redis_url
    name = unique("tk_test")
    s = Servers(config.resolve_database_url(db_url), redis_url, name, name, stack)
    try:
        yield s
    finally:
        try:
            drop_schema(s.libpq_url, s.schema)
            wipe_namespace(s.redis_url, s.namespace)
        finally:
            if stack is not None:
                stack.stop()


@pytest.fixture
def clean(servers: Servers) -> Iterator[Servers]:
    """The session's servers, with the schema emptied and the namespace wiped before the test."""
    with contextlib.suppress(psycopg.errors.InvalidSchemaName):
        truncate_schema(servers.libpq_url, servers.schema)
    wipe_namespace(servers.redis_url, servers.namespace)
    yield servers


@pytest.fixture
def sm(clean: Servers) -> Iterator[toolkit.StateManager]:
    """A StateManager on the test schema and namespace, closed after the test."""
    manager = toolkit.init_state_manager(
        clean.database_url, clean.redis_url, namespace=clean.namespace, schema=clean.schema,
        heartbeat_ttl=2.0,
    )
    try:
        yield manager
    finally:
        manager.close()


@pytest.fixture
def make_sm(clean: Servers) -> Iterator[object]:
    """A factory of extra StateManagers on the same schema and namespace (all closed after)."""
    made: list[toolkit.StateManager] = []

    def make(**kwargs: object) -> toolkit.StateManager:
        opts: dict[str, object] = {"namespace": clean.namespace, "schema": clean.schema,
                                   "heartbeat_ttl": 2.0, **kwargs}
        manager = toolkit.init_state_manager(clean.database_url, clean.redis_url, **opts)  # type: ignore[arg-type]
        made.append(manager)
        return manager

    yield make
    for m in made:
        m.close()


@pytest.fixture
def raw_redis(servers: Servers) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test server (for looking at keys)."""
    client = redis.Redis.from_url(servers.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def raw_pg(servers: Servers) -> Iterator[psycopg.Connection]:
    """A plain autocommit psycopg connection on the test database."""
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        yield conn


_skipped: list[str] = []
_left_out: dict[str, set[str]] = {}  # node id of a deselected `system` test -> its Debian packages


def pytest_deselected(items: list[pytest.Item]) -> None:
    """Remember the deselected tests that need programs pip cannot install."""
    for item in items:
        marks = list(item.iter_markers("system"))
        if marks:
            _left_out[item.nodeid] = {str(p) for m in marks for p in m.args}


def system_tests_line(left_out: dict[str, set[str]]) -> str:
    """The one line that says which system tests a run left out and how to run them."""
    packages = " ".join(sorted(set().union(*left_out.values())))
    return (f"{len(left_out)} system test(s) left out: they need the Debian packages {packages} "
            f"(apt-get install {packages}); run them with `make test-system`")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """End the run by naming the left-out system tests (the line is the last before the tally)."""
    if _left_out:
        terminalreporter.write_line(system_tests_line(_left_out), yellow=True)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Remember every skipped test: in this project a skip is a failure."""
    if report.skipped and not hasattr(report, "wasxfail"):
        _skipped.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when any test was skipped (integration tests never skip)."""
    if _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"FAILED: {len(_skipped)} test(s) skipped: {_skipped[:5]}", red=True)
