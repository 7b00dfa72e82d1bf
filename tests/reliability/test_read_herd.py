"""A cold entity read by many threads, and many processes, at once (issue 17, item 2).

Injected: the entity is cold (dropped from memory, its Redis key deleted) and
PostgreSQL is slow: another session holds ``LOCK TABLE jobs IN ACCESS EXCLUSIVE
MODE`` while the readers pile up, then lets go. Measured: the table's
``seq_scan + idx_scan`` in ``pg_stat_user_tables`` (this run's schema only),
read once the readers' backends have exited (which flushes their statistics).
Checked: one PostgreSQL read for 32 threads of one process; at most one per
process for 4 processes of 8 threads; every reader gets the right entity.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
import redis
from psycopg import sql

import toolkit
from tests.conftest import Servers
from toolkit import config
from toolkit.tiers.redis import keys

THREADS = 32
PROCESSES, PROCESS_THREADS = 4, 8


def table_reads(servers: Servers, table: str = "jobs") -> int:
    """Scans of ``table`` in this run's schema, once every reader's statistics are flushed."""
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        last = -1
        for _ in range(40):  # a backend flushes its counters by 1 s idle or at exit: wait
            conn.execute("SELECT pg_stat_clear_snapshot()")
            row = conn.execute(
                "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
                "WHERE schemaname = %s AND relname = %s", (servers.schema, table)).fetchone()
            now = int(row[0]) if row else 0
            if now == last:
                return now
            last = now
            time.sleep(1.2)
    return last


def waiting_on(servers: Servers, table: str = "jobs") -> int:
    """Sessions waiting for a lock on ``table`` of this run's schema."""
    with psycopg.connect(servers.libpq_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE NOT l.granted AND n.nspname = %s AND c.relname = %s",
            (servers.schema, table)).fetchone()
    return int(row[0]) if row else 0


@contextlib.contextmanager
def slow_table(servers: Servers, table: str = "jobs") -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on ``table``: every read of it waits until the block ends."""
    with psycopg.connect(servers.libpq_url) as holder:
        holder.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            sql.Identifier(servers.schema, table)))
        try:
            yield
        finally:
            holder.rollback()


def _make_cold(sm: toolkit.StateManager, raw: redis.Redis, job_id: str) -> None:
    sm.memory.drop("job", job_id)
    raw.delete(keys.entity(sm.ns, "job", job_id))


@pytest.fixture
def herd_sm(clean: Servers) -> Iterator[toolkit.StateManager]:
    sm = toolkit.init_state_manager(clean.database_url, clean.redis_url, namespace=clean.namespace,
                                    schema=clean.schema, heartbeat_ttl=30.0)
    try:
        yield sm
    finally:
        sm.close()


def test_a_thread_herd_on_a_cold_entity_costs_one_postgres_read(
        herd_sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    sm = herd_sm
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
    truth = sm.get_job("a")
    _make_cold(sm, raw_redis, "a")
    sm.db.dispose()  # flush this process's statistics so far
    before = table_reads(clean)
    got: list[object] = []
    gate = threading.Barrier(THREADS)

    def read() -> None:
        gate.wait()
        got.append(sm.get_job("a"))

    with slow_table(clean):
        threads = [threading.Thread(target=read) for _ in range(THREADS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while waiting_on(clean) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # every thread has missed memory and Redis by now
    for t in threads:
        t.join(30)
    sm.db.dispose()
    reads = table_reads(clean) - before
    print(f"\nPostgreSQL reads of the cold job for {THREADS} threads of one process: {reads}")
    assert got == [truth] * THREADS
    assert reads == 1


CHILD = """
import os, sys, threading, toolkit
sm = toolkit.init_state_manager(namespace=sys.argv[1], schema=sys.argv[1], rebuild=False)
n = int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
gate, got = threading.Barrier(n), []
def read():
    gate.wait()
    got.append(sm.get_job("a").version)
threads = [threading.Thread(target=read) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
print("got", *got, flush=True)
sm.close()
"""


def test_a_process_herd_on_a_cold_entity_costs_at_most_one_read_per_process(
        herd_sm: toolkit.StateManager, clean: Servers, raw_redis: redis.Redis) -> None:
    sm = herd_sm
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"}])
    truth = sm.get_job("a")
    _make_cold(sm, raw_redis, "a")
    env = {**os.environ, config.DATABASE_URL_VAR: clean.database_url,
           config.REDIS_URL_VAR: clean.redis_url}
    children = [subprocess.Popen([sys.executable, "-c", CHILD, clean.namespace,
                                  str(PROCESS_THREADS)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, env=env)
                for _ in range(PROCESSES)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        sm.db.dispose()
        before = table_reads(clean)
        with slow_table(clean):
            for child in children:
                assert child.stdin is not None
                child.stdin.write("go\n")
                child.stdin.flush()
            deadline = time.monotonic() + 10
            while waiting_on(clean) < PROCESSES and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.5)
        outs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    reads = table_reads(clean) - before
    print(f"\nPostgreSQL reads of the cold job for {PROCESSES} processes x {PROCESS_THREADS} "
          f"threads: {reads}")
    assert all(out.split() == ["got", *[str(truth.version)] * PROCESS_THREADS] for out in outs), outs
    assert 1 <= reads <= PROCESSES
