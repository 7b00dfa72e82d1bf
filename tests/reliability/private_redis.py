"""A throwaway redis-server with the settings a test needs (never the shared one).

Faults that need a Redis configured differently (an eviction policy, an ACL
user, a restart) start their own server here, so the shared loopback Redis of
``REDIS_URL`` never sees a ``CONFIG SET`` or a restart.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import redis

from toolkit import _servers


@dataclass
class RedisServer:
    """One private redis-server process: restart it, kill it, talk to it."""

    args: tuple[str, ...]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="tk_redis_")))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def raw(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **kwargs)  # type: ignore[arg-type]

    def start(self) -> None:
        """Start (again, on the same port) and wait until it answers PING."""
        if not self.port:
            self.port = _servers.free_port(set())
        exe = _servers.find_binaries().redis_server
        argv = [str(exe), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), *self.args]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.raw(socket_timeout=1) as client:
                    client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Kill the server (SIGKILL: whatever it held in memory is gone)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server(*args: str) -> Iterator[RedisServer]:
    """A private redis-server started with extra ``args`` (e.g. ``--maxmemory-policy``)."""
    server = RedisServer(tuple(args))
    server.start()
    try:
        yield server
    finally:
        server.stop()
