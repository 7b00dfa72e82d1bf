"""The invalidation listener: drops memory entries that other processes have overwritten.

Writers publish ``(kind, version, id)`` on the namespace's channel after each
commit (``cache.publish_many``); a daemon thread per StateManager listens and
drops older memory entries.
"""

from __future__ import annotations

import contextlib
import logging
import threading

from toolkit.tiers.memory import KINDS, Memory
from toolkit.tiers.redis import cache, keys
from toolkit.tiers.redis.client import Client

log = logging.getLogger(__name__)


class InvalidationListener:
    """A daemon thread that drops memory entries other processes have overwritten."""

    def __init__(self, client: Client, ns: str, memory: Memory) -> None:
        self._client = client
        self._ns = ns
        self._memory = memory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start listening (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"toolkit-invalidate-{self._ns}",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop listening and wait for the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _run(self) -> None:
        while not self._stop.is_set():
            pubsub = self._client.redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.invalidation_channel(self._ns))
                while not self._stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg and msg.get("type") == "message":
                        self._handle(str(msg["data"]))
            except Exception as exc:  # noqa: BLE001 - the thread must survive a Redis outage
                log.debug("invalidation listener reconnecting: %s", exc,
                          extra={"action": "invalidate"})
                self._stop.wait(0.5)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def _handle(self, message: str) -> None:
        for kind, version, entity_id in cache.parse_invalidations(message):
            if kind in KINDS:
                self._memory.drop(kind, entity_id, below_version=version)
