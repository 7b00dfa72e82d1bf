"""Fixtures of the reliability suite: a private server pair for destructive faults, helpers.

Faults that stop, stall or restart a server run against ``private`` (a throwaway
``toolkit.local_stack()`` started once for the session), so the shared servers of
``DATABASE_URL``/``REDIS_URL`` are never stopped, stalled or flushed, and the
tests run identically with or without those variables.

Tests marked ``slow`` are deselected (never skipped) by pyproject's ``-m "not
slow"``: ``pytest`` runs the default part, ``pytest -m slow`` (``make test-slow``)
the heavy part.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

import toolkit
from tests.conftest import Servers, unique
from toolkit import config, models
from toolkit.faults import TcpProxy
from toolkit.scenarios.common import retry as scenarios_retry
from toolkit.tiers.memory import KINDS
from toolkit.tiers.redis import keys

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Private:
    """A private PostgreSQL + Redis pair and a fresh schema/namespace on it."""

    stack: toolkit.LocalStack
    database_url: str
    redis_url: str
    schema: str
    namespace: str

    @property
    def libpq_url(self) -> str:
        return self.database_url.replace("postgresql+psycopg://", "postgresql://", 1)

    def manager(self, **kwargs: Any) -> toolkit.StateManager:
        opts: dict[str, Any] = {"namespace": self.namespace, "schema": self.schema,
                                "heartbeat_ttl": 2.0, **kwargs}
        return toolkit.init_state_manager(self.database_url, self.redis_url, **opts)

    def raw_redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, decode_responses=True)


@pytest.fixture(scope="session")
def private_stack() -> Iterator[toolkit.LocalStack]:
    """A throwaway PostgreSQL + Redis pair owned by this test session."""
    stack = toolkit.local_stack()
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture
def private(private_stack: toolkit.LocalStack) -> Iterator[Private]:
    """The private pair, both servers up, with a fresh schema and namespace."""
    if not private_stack.postgres_running:
        private_stack.start_postgres()
    if not private_stack.redis_running:
        private_stack.restart_redis()
    name = unique("tk_rel")
    yield Private(private_stack, config.resolve_database_url(private_stack.database_url),
                  private_stack.redis_url, name, name)
    if not private_stack.postgres_running:
        private_stack.start_postgres()
    if not private_stack.redis_running:
        private_stack.restart_redis()


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback socket that accepts connections and never answers; yields its port."""
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("127.0.0.1", 0))
    lst.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        lst.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = lst.accept()
                held.append(conn)  # kept open, never read, never written
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield lst.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=2)
        for c in held:
            c.close()
        lst.close()


# -- coordinator child processes -----------------------------------------------------------

class Coordinator:
    """A ``python -m toolkit._coordinator`` child and the JSON lines it printed."""

    def __init__(self, database_url: str, redis_url: str, namespace: str, schema: str,
                 *args: str) -> None:
        env = {**os.environ, config.DATABASE_URL_VAR: database_url,
               config.REDIS_URL_VAR: redis_url, "PYTHONUNBUFFERED": "1"}
        argv = [sys.executable, "-m", "toolkit._coordinator", "--namespace", namespace,
                "--schema", schema, *args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.records: list[dict[str, str]] = []
        self.crashed_at: float | None = None
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                with self._lock:
                    if rec.get("a") == "crashing":
                        self.crashed_at = time.monotonic()
                    self.records.append(rec)

    def wait_dead(self, timeout: float = 60.0) -> int:
        """Wait for the child to exit (it kills itself); kill it at the deadline."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            raise AssertionError(f"the coordinator did not crash within {timeout}s: "
                                 f"{self.stderr()[-2000:]}") from None
        finally:
            self._reader.join(timeout=10)

    def stderr(self) -> str:
        assert self.proc.stderr is not None
        with contextlib.suppress(Exception):
            return self.proc.stderr.read()
        return ""

    def acked(self, action: str) -> list[dict[str, str]]:
        with self._lock:
            return [r for r in self.records if r["a"] == action]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


# -- invariants ----------------------------------------------------------------------------

@contextlib.contextmanager
def behind_pg_proxy(clean: Servers, *, redis_instead: bool = False
                    ) -> Iterator[tuple[toolkit.StateManager, TcpProxy]]:
    """A StateManager on this run's schema and namespace whose PostgreSQL connections go
    through a TCP proxy (``proxy.lose_next_reply()`` drops one COMMIT's answer);
    ``redis_instead``: its Redis connections do, and PostgreSQL is reached directly."""
    proxy = TcpProxy.to_url(clean.redis_url if redis_instead else clean.database_url).start()
    db, rd = clean.database_url, clean.redis_url
    if redis_instead:
        rd = proxy.url_for(rd)
    else:
        db = proxy.url_for(db)
    sm = toolkit.init_state_manager(db, rd, namespace=clean.namespace, schema=clean.schema)
    try:
        yield sm, proxy
    finally:
        sm.close()
        proxy.cut()


def queue_census(raw: redis.Redis, namespace: str) -> Counter[str]:
    """How many times each job id appears across every queue zset of the namespace."""
    counts: Counter[str] = Counter()
    for name in raw.smembers(keys.queues(namespace)):
        for job_id in raw.zrange(keys.queue(namespace, name), 0, -1):
            counts[job_id] += 1
    return counts


def schedule_census(raw: redis.Redis, namespace: str) -> Counter[str]:
    """How many times each job id appears across every due-time set (scheduled jobs)."""
    counts: Counter[str] = Counter()
    for name in raw.smembers(keys.queues(namespace)):
        for job_id in raw.zrange(keys.scheduled(namespace, name), 0, -1):
            counts[job_id] += 1
    return counts


def inflight_ids(raw: redis.Redis, namespace: str) -> set[str]:
    return set(raw.zrange(keys.inflight(namespace), 0, -1))


def pg_job_statuses(libpq_url: str, schema: str) -> dict[str, str]:
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        rows = conn.execute(psycopg.sql.SQL("SELECT id, status FROM {}.jobs").format(
            psycopg.sql.Identifier(schema))).fetchall()
    return {r[0]: r[1] for r in rows}


def assert_invariants(sm: toolkit.StateManager, raw: redis.Redis, libpq_url: str) -> None:
    """Tiers agree; each queued job is in Redis exactly once; no job in two active assignments."""
    report = sm.check_consistency()
    assert report.ok, report.to_frame().to_string()
    statuses = pg_job_statuses(libpq_url, sm.settings.schema)
    census = queue_census(raw, sm.ns) + schedule_census(raw, sm.ns)
    queued = {j for j, s in statuses.items() if s == "queued"}
    inflight = inflight_ids(raw, sm.ns)
    for job_id in queued:  # in exactly one queue or due-time set, or popped and in flight
        ok = census[job_id] == 1 or (census[job_id] == 0 and job_id in inflight)
        assert ok, (job_id, census[job_id], job_id in inflight)
    assert set(census) <= queued, set(census) - queued
    active = Counter(a.job_id for a in sm.list_assignments(status="active"))
    assert all(n == 1 for n in active.values()), active


def pg_live_counts(libpq_url: str, schema: str) -> dict[str, int]:
    """What a rebuild must load, counted straight from PostgreSQL (the report's fields)."""
    final = sorted(str(s) for s in models.FINAL_JOB_STATUSES)
    q = psycopg.sql.SQL(
        "SELECT (SELECT count(*) FROM {s}.workflows), (SELECT count(*) FROM {s}.workers),"
        " (SELECT count(*) FROM {s}.jobs WHERE status <> ALL(%(final)s)),"
        " (SELECT count(*) FROM {s}.jobs WHERE status = 'queued'),"
        " (SELECT count(*) FROM {s}.job_assignments WHERE status = 'active')"
    ).format(s=psycopg.sql.Identifier(schema))
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        row = conn.execute(q, {"final": final}).fetchone()
    assert row is not None
    return dict(zip(("workflows", "workers", "jobs", "queued", "assignments"), row, strict=True))


def assert_rebuild_loaded_everything(report: toolkit.RebuildReport, libpq_url: str,
                                     schema: str) -> None:
    """The rebuild's counts equal the live rows in PostgreSQL, field by field."""
    got = {k: getattr(report, k) for k in ("workflows", "workers", "jobs", "queued", "assignments")}
    assert got == pg_live_counts(libpq_url, schema)


def everything(sm: toolkit.StateManager, servers: Any) -> tuple[Any, ...]:
    """Every PostgreSQL row, Redis key (heartbeats and the applied watermark aside: both are
    refreshed in the background by design) and memory entry of ``sm``'s schema and namespace:
    what a write that was refused or rolled back must leave as it was."""
    client = redis.Redis.from_url(servers.redis_url)
    background = keys.applied(sm.ns).encode()
    try:
        names = sorted(client.scan_iter(match=keys.namespace_pattern(sm.ns), count=1000))
        rds = {k: client.dump(k) for k in names
               if b"heartbeat" not in k and b":hb" not in k and k != background}
    finally:
        client.close()
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        pg = {t: conn.execute(psycopg.sql.SQL("SELECT * FROM {} ORDER BY 1").format(
            psycopg.sql.Identifier(sm.settings.schema, t))).fetchall()
            for t in ("workflows", "jobs", "workers", "job_assignments", "job_events")}
    mem = {kind: sorted((e.id, repr(e)) for e in sm.memory.all(kind)) for kind in KINDS}
    return pg, rds, mem


retry_storage = scenarios_retry
"""Call ``fn`` again after a StorageUnavailable (pooled connections to a restarted server fail
once): the scenarios' own helper, under the name these tests use."""


def run_children(clean: Servers, script: str, argvs: list[list[str]], timeout: float) -> list[str]:
    """Run ``python -c script namespace schema *argv`` once per argv, all at once, on the test's
    servers; return their outputs (each must exit 0). Any left running are killed."""
    env = {**os.environ, config.DATABASE_URL_VAR: clean.database_url,
           config.REDIS_URL_VAR: clean.redis_url}
    procs = [subprocess.Popen([sys.executable, "-c", script, clean.namespace, clean.schema, *a],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for a in argvs]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs
