"""Integration tests of ``local_stack``: real PostgreSQL and Redis child processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest
import redis

from toolkit import errors
from toolkit.local_stack import LocalStack, local_stack

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A private directory outside pytest's basetemp.

    When run as root the servers run as ``nobody``, and local_stack grants it
    o+x on the ancestors of the data dir; a concurrently starting pytest resets
    its basetemp root to 0700, which would cut ``nobody`` off mid-test.
    """
    with tempfile.TemporaryDirectory(prefix="toolkit-test-") as path:
        yield Path(path)


def _dsn(stack: LocalStack) -> str:
    return stack.database_url.replace("postgresql+psycopg://", "postgresql://")


def _sql(stack: LocalStack, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(_dsn(stack), connect_timeout=5, autocommit=True) as conn:
        cur = conn.execute(statement)
        return cur.fetchall() if cur.description else []


def _redis(stack: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(stack.redis_url, socket_timeout=5, socket_connect_timeout=5)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return bool(out.stdout.strip()) and not out.stdout.strip().startswith("Z")


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def test_local_stack_start_both_servers_answer() -> None:
    began = time.monotonic()
    with local_stack() as stack:
        startup = time.monotonic() - began
        assert _sql(stack, "select 1") == [(1,)]
        with _redis(stack) as client:
            client.set("toolkit-test:key", "value")
            assert client.get("toolkit-test:key") == b"value"
        assert stack.database_url == f"postgresql+psycopg://postgres@127.0.0.1:{stack.pg_port}/postgres"
        assert stack.redis_url == f"redis://127.0.0.1:{stack.redis_port}/0"
        assert stack.postgres_running and stack.redis_running
    assert startup < 10.0


def test_local_stack_exit_removes_throwaway_dir_and_processes() -> None:
    with local_stack() as stack:
        root = stack.data_dir
        pids = [stack.postgres_pid, stack.redis_pid]
        assert root is not None and (root / "pgdata" / "PG_VERSION").is_file()
        backends = _children(pids[0] or 0)
    assert not root.exists()
    assert _wait_gone([p for p in pids + backends if p], timeout=0.5) == []
    assert not stack.postgres_running and not stack.redis_running
    stack.stop()  # idempotent


def test_data_dir_row_survives_new_stack(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "stack"
    with local_stack(data_dir) as first:
        _sql(first, "create table kept (v text)")
        _sql(first, "insert into kept values ('still here')")
    assert (data_dir / "pgdata" / "PG_VERSION").is_file()
    with local_stack(data_dir) as second:
        assert second.data_dir == data_dir.resolve()
        assert _sql(second, "select v from kept") == [("still here",)]


def test_data_dir_with_foreign_files_raises_configuration_error(scratch_dir: Path) -> None:
    (scratch_dir / "pgdata").mkdir()
    (scratch_dir / "pgdata" / "unrelated.txt").write_text("not a cluster")
    stack = local_stack(scratch_dir)
    with pytest.raises(errors.ConfigurationError, match="neither empty nor a PostgreSQL cluster"):
        stack.start()
    assert not stack.postgres_running and not stack.redis_running


def test_kill_redis_then_restart_redis_empty_on_same_port() -> None:
    with local_stack() as stack:
        port = stack.redis_port
        with _redis(stack) as client:
            client.set("toolkit-test:lost", "1")
        stack.kill_redis()
        assert not stack.redis_running
        with _redis(stack) as client, pytest.raises(redis.ConnectionError):
            client.ping()
        stack.restart_redis()
        assert stack.redis_running and stack.redis_port == port
        with _redis(stack) as client:
            assert client.ping()
            assert client.get("toolkit-test:lost") is None
        assert _sql(stack, "select 1") == [(1,)]


def test_stop_postgres_refuses_connections_then_start_postgres_keeps_data() -> None:
    with local_stack() as stack:
        port = stack.pg_port
        _sql(stack, "create table survivors (v int)")
        _sql(stack, "insert into survivors values (7)")
        stack.stop_postgres()
        assert not stack.postgres_running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(_dsn(stack), connect_timeout=2).close()
        stack.start_postgres()
        assert stack.postgres_running and stack.pg_port == port
        assert _sql(stack, "select v from survivors") == [(7,)]
        with _redis(stack) as client:
            assert client.ping()


def test_start_postgres_on_taken_port_raises_storage_unavailable() -> None:
    with local_stack() as stack:
        stack.stop_postgres()
        with socket.socket() as squatter:
            # REUSEADDR: the old server's sockets may sit in TIME_WAIT on that port;
            # listening (never accepting) is what keeps PostgreSQL from binding it.
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind(("127.0.0.1", stack.pg_port))
            squatter.listen(1)
            with pytest.raises(errors.StorageUnavailable, match="log tail"):
                stack.start_postgres()
        assert not stack.postgres_running
        stack.start_postgres()
        assert _sql(stack, "select 1") == [(1,)]


_CHILD = """
import json, time
from toolkit.local_stack import local_stack
with local_stack() as stack:
    print(json.dumps([stack.postgres_pid, stack.redis_pid, str(stack.data_dir)]), flush=True)
    time.sleep(120)
"""


def test_parent_sigkill_leaves_no_orphan_servers() -> None:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert child.stdout is not None
        pg_pid, redis_pid, root = json.loads(child.stdout.readline())
        servers = [pg_pid, redis_pid, *_children(pg_pid)]
        assert all(_alive(p) for p in servers)
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert _wait_gone(servers, timeout=10.0) == []
    deadline = time.monotonic() + 5.0
    while Path(root).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(root).exists()


def test_repr_shows_ports_and_no_password() -> None:
    with local_stack() as stack:
        text = repr(stack)
        assert f"pg_port={stack.pg_port}" in text
        assert f"redis_port={stack.redis_port}" in text
        assert str(stack.data_dir) in text
        assert "password" not in text.lower() and "@" not in text
        assert urlsplit(stack.database_url).password is None
        assert urlsplit(stack.redis_url).password is None
