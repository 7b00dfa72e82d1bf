"""This coordinator's applied watermark: the writes it committed that Redis may not have yet.

Every path that commits to PostgreSQL and then updates Redis runs inside
:meth:`Watermark.pending`. A background thread publishes, once a second, the
start of the oldest write still pending (or now when none is): every commit of
this process before that time has reached Redis. A write whose Redis update
failed pins the watermark until a repair or rebuild covers it, or until the
publisher, once Redis answers again, has caught Redis up itself (:attr:`Watermark.heal`:
what changed since the pin, as a fast start checks it); a delete whose note could not
be written sets it to 0 (only a full rebuild or a repair will do). See
:mod:`toolkit.tiers.redis.watermark` and :mod:`toolkit.recovery.fast_start`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from toolkit import errors
from toolkit.tiers.redis import watermark
from toolkit.tiers.redis.client import Client

log = logging.getLogger(__name__)

PUBLISH_EVERY = 1.0
"""Seconds between two publications of the watermark."""
HEAL_BACKOFF_MAX = 60.0
"""Seconds at most between two tries at catching Redis up when a try fails."""


class Watermark:
    """The pending writes of one StateManager, and the publisher of its watermark."""

    def __init__(self, client: Client, ns: str) -> None:
        self.client, self.ns = client, ns
        self.coordinator = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._pending: dict[int, float] = {}
        self._tokens = itertools.count()
        self._pinned: tuple[float, float] | None = None  # (safe, when the failure happened)
        self._run_id = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.heal: Callable[[float], object] | None = None
        """Makes Redis agree with PostgreSQL for what changed from the given UNIX time on;
        called on the publisher's thread, after a publication, while the watermark is pinned
        (not at 0). Its return value is logged."""
        self._heal_after = 0.0
        self._heal_wait = PUBLISH_EVERY
        self._told_repair = False
        self.async_commits = False
        """This coordinator commits with ``synchronous_commit = off``: each publication notes
        it again (``{ns}:async_commits``; a Redis that lost its data lost the note too)."""

    @contextmanager
    def pending(self) -> Iterator[None]:
        """A write from before its commit until its Redis update is done (or given up)."""
        token = self.begin()
        try:
            yield
        finally:
            self.end(token)

    def begin(self) -> int:
        """:meth:`pending` in two calls, for a write whose Redis update ends on another thread:
        call before the commit; pass the token to :meth:`end` once Redis is updated."""
        token = next(self._tokens)
        with self._lock:
            self._pending[token] = time.time()
        return token

    def end(self, token: int) -> None:
        with self._lock:
            del self._pending[token]

    def failed(self, *, everything: bool = False) -> None:
        """A committed write did not reach Redis: keep the watermark before it (``everything``: 0)."""
        with self._lock:
            now = time.time()
            safe = 0.0 if everything else min([*self._pending.values(), now])
            # The earliest safe time stays; the failure's time is the latest, so a repair or
            # catch-up that began before this failure does not unpin it.
            self._pinned = (safe if self._pinned is None else min(safe, self._pinned[0]), now)

    def repaired(self, started: float) -> None:
        """A repair or rebuild that began at ``started`` fixed every failure before it."""
        with self._lock:
            if self._pinned is not None and self._pinned[1] < started:
                self._pinned = None
                self._told_repair = False
                self._heal_after, self._heal_wait = 0.0, PUBLISH_EVERY
                self._run_id = ""  # Redis agrees now, whichever run of the server it is

    def safe(self) -> float:
        """Every commit of this process before this time has reached Redis."""
        with self._lock:
            candidates = [*self._pending.values(), time.time()]
            if self._pinned is not None:
                candidates.append(self._pinned[0])
            return min(candidates)

    def publish(self) -> None:
        """Publish the watermark now (raises ``StorageUnavailable`` when Redis is down)."""
        if not self._run_id:
            self._run_id = watermark.run_id(self.client)
        now = time.time()
        if self.async_commits:
            watermark.note_async_commits(self.client, self.ns, now)
        watermark.publish(self.client, self.ns, self.coordinator,
                          watermark.Mark(self.coordinator, self.safe(), now, self._run_id))

    def start(self) -> None:
        """Publish once (before any write can happen), then every second in a thread.

        A Redis that refuses the first publication (out of memory, read-only) is
        marked as not rebuilt, so no fast start trusts it until a rebuild.
        """
        try:
            self.publish()
        except errors.StorageUnavailable as exc:
            log.warning("watermark not published (no fast start will trust this Redis until a "
                        "rebuild): %s", exc, extra={"action": "watermark"})
            with contextlib.suppress(errors.StorageUnavailable):
                watermark.forget_rebuilt(self.client, self.ns)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"toolkit-watermark-{self.ns}",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(PUBLISH_EVERY):
            try:
                self.publish()
            except errors.StorageUnavailable as exc:
                log.debug("watermark not published: %s", exc, extra={"action": "watermark"})
                continue
            self.heal_if_pinned()

    def heal_if_pinned(self) -> bool:
        """Catch Redis up with :attr:`heal` when a failed write pinned the watermark; return
        whether it ran and unpinned. A failed try is tried again later, backing off."""
        with self._lock:
            pinned, after = self._pinned, self._heal_after
            tell = pinned is not None and pinned[0] <= 0 and not self._told_repair
            self._told_repair = self._told_repair or tell
        if tell:
            log.warning("a delete could not be noted in Redis: Redis cannot be caught up by "
                        "itself; run repair() (toolkit check --repair)", extra={"action": "heal"})
        if pinned is None or pinned[0] <= 0 or self.heal is None or time.time() < after:
            return False
        started = time.time()
        try:
            if self._run_id and watermark.run_id(self.client) != self._run_id:
                raise errors.StorageUnavailable(
                    "Redis restarted since this coordinator began (it may have lost writes from "
                    "before the failure): run repair() (toolkit check --repair)")
            report = self.heal(pinned[0])
        except Exception as exc:  # noqa: BLE001 - the publisher must survive; tried again later
            with self._lock:
                self._heal_after = time.time() + self._heal_wait
                self._heal_wait = min(self._heal_wait * 2, HEAL_BACKOFF_MAX)
            log.warning("Redis not caught up yet with the writes it missed: %s", exc,
                        extra={"action": "heal"})
            return False
        self.repaired(started)
        log.warning("Redis was caught up with the writes it missed (%s)", report,
                    extra={"action": "heal"})
        return True

    def stop(self) -> None:
        """Stop publishing; remove this coordinator's watermark when nothing is pending."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            clean = not self._pending and self._pinned is None
        if clean and self._run_id:
            try:
                watermark.forget(self.client, self.ns, [self.coordinator])
            except errors.StorageUnavailable as exc:
                log.warning("watermark not removed: %s", exc, extra={"action": "watermark"})
