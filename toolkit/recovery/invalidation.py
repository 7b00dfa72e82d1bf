"""The invalidation listener: memory is trusted only while it hears every change.

Writers publish ``kind|version|id`` on the namespace's channel after each
commit. Redis pub/sub is fire-and-forget: a subscriber that is disconnected,
even for a moment, never sees what was published meanwhile. So the listener
decides when memory may be trusted:

- not before its subscription is confirmed; every confirmation (the first, and
  each after a reconnect) empties memory, so nothing read during a gap survives;
- not from the moment its connection fails, is closed by Redis (``CLIENT KILL``,
  a restart, an overflowing pub/sub output buffer) or stays silent: a PING goes
  out every :data:`PING_EVERY` seconds and no reply for :data:`SILENT_AFTER`
  seconds counts as a lost connection;
- a read that started in an earlier epoch (before a gap) never lands in memory.

Whatever the listener misses, the StateManager also serves a memory entry only
for ``memory_max_age`` seconds after it was stored: the worst-case staleness.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Collection
from typing import Any, Protocol

from toolkit import models
from toolkit.tiers.redis import cache, keys
from toolkit.tiers.redis.client import Client

log = logging.getLogger(__name__)

POLL = 0.25
"""Seconds between two looks at the subscription (and at the stop flag)."""
PING_EVERY = 1.0
SILENT_AFTER = 3.0
"""Seconds without any reply (message or PONG) after which the connection counts as lost."""
RECONNECT_DELAY = 0.5


class Memory(Protocol):
    """What the listener needs of the memory tier (it touches no other tier's module)."""

    def put(self, kind: str, entity: models.Entity) -> bool: ...
    def drop(self, kind: str, entity_id: str, *, below_version: int | None = None) -> None: ...
    def clear(self) -> None: ...


class SilentConnection(ConnectionError):
    """The subscription connection stopped answering PINGs."""


class InvalidationListener:
    """A daemon thread that drops memory entries other processes have overwritten."""

    def __init__(self, client: Client, ns: str, memory: Memory, kinds: Collection[str]) -> None:
        self._client = client
        self._kinds = frozenset(kinds)
        self._ns = ns
        self._memory = memory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()
        self._subscribed = threading.Event()
        self._pubsub: Any = None
        self.trusted = False
        """Whether memory may answer reads now (subscribed, and emptied since the last gap)."""
        self.epoch = 0
        """Bumped whenever memory is emptied for a gap; a read from an older epoch is not kept."""
        self.gaps = 0
        """How many times the subscription was lost after being confirmed."""

    def start(self) -> None:
        """Start listening (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"toolkit-invalidate-{self._ns}",
                                            daemon=True)
            self._thread.start()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until the first subscription is confirmed; return whether it was."""
        return self._subscribed.wait(timeout)

    def stop(self) -> None:
        """Stop listening and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def put_if_current(self, kind: str, entity: models.Entity, epoch: int) -> None:
        """Keep a read in memory unless a gap began since ``epoch`` (or one is going on)."""
        with self._guard:
            if self.trusted and epoch == self.epoch:
                self._memory.put(kind, entity)

    def local_address(self) -> str | None:
        """``host:port`` of the subscription's socket, as ``CLIENT LIST`` shows it (for tests)."""
        conn = getattr(self._pubsub, "connection", None)
        sock = getattr(conn, "_sock", None)
        if sock is None:
            return None
        with contextlib.suppress(OSError):
            host, port = sock.getsockname()[:2]
            return f"{host}:{port}"
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.redis.pubsub(ignore_subscribe_messages=False)
            self._pubsub = pubsub
            try:
                pubsub.subscribe(keys.invalidation_channel(self._ns))
                self._listen(pubsub)
            except Exception as exc:  # noqa: BLE001 - the thread must survive a Redis outage
                log.info("invalidation listener lost its subscription (memory emptied, not "
                         "trusted until it is back): %s", exc, extra={"action": "invalidate"})
            finally:
                self._distrust(forget=not self._stop.is_set())
                with contextlib.suppress(Exception):
                    pubsub.close()
            self._stop.wait(RECONNECT_DELAY)

    def _listen(self, pubsub: Any) -> None:
        heard = pinged = time.monotonic()
        while not self._stop.is_set():
            msg = pubsub.get_message(timeout=POLL)
            now = time.monotonic()
            if msg is not None:
                heard = now
                if msg["type"] == "message":
                    self._handle(str(msg["data"]))
                elif msg["type"] == "subscribe":
                    self._trust()
            if now - pinged >= PING_EVERY:
                pubsub.ping()
                pinged = now
            if now - heard > SILENT_AFTER:
                raise SilentConnection(f"no reply on the subscription for {now - heard:.1f}s")

    def _trust(self) -> None:
        with self._guard:
            self._memory.clear()
            self.epoch += 1
            self.trusted = True
        self._subscribed.set()

    def _distrust(self, *, forget: bool) -> None:
        """Stop trusting memory; ``forget``: also empty it (not on a plain stop)."""
        with self._guard:
            if self.trusted and forget:
                self.gaps += 1
            self.trusted = False
            if forget:
                self._memory.clear()
            self.epoch += 1

    def _handle(self, message: str) -> None:
        for kind, version, entity_id in cache.parse_invalidations(message):
            if kind in self._kinds:
                self._memory.drop(kind, entity_id, below_version=version)
