"""Queues an operator pauses and resumes: ``pause_queue`` and ``resume_queue``.

PostgreSQL's ``paused_queues`` table is the truth (one row per paused queue: why,
by whom, since when), so a pause survives a coordinator restart and a Redis loss.
Redis holds a mirror, the set ``{ns}:paused``, which the claim script reads: a
paused queue hands out no job to any coordinator, the worker's other queues still
do, and jobs already assigned or running finish as usual. The rebuild and the
repair restore the mirror from PostgreSQL (``recovery/``). A direct
``assign_job`` names its job and is not held back by a pause.

Uses the pipeline's PostgreSQL and Redis handles; the set only through
``tiers/redis/queue.py``, the table only through ``tiers/postgres/records.py``.
"""

from __future__ import annotations

import getpass
import logging
import socket

from toolkit import errors, validate
from toolkit.manager.pipeline import Pipeline
from toolkit.tiers.postgres import records
from toolkit.tiers.redis import queue as redis_queue

log = logging.getLogger(__name__)

MAX_REASON = 1_000
"""Most characters a pause's reason may hold."""


def default_actor() -> str:
    """``user@host`` of this process: who paused a queue when the caller names no one."""
    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name (a container without USER)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def check_reason(value: object) -> str:
    """Return ``value`` if it is a non-blank reason of at most :data:`MAX_REASON` characters."""
    reason = validate.text("reason", value, max_length=MAX_REASON)
    if not reason.strip():
        raise errors.ValidationError("reason", value, "must say why the queue is paused")
    return reason


class Queues:
    """The queue verbs of a StateManager: pause and resume."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe

    def pause(self, queue: str, *, reason: str, actor: str | None = None) -> bool:
        """Pause a queue: no job of it is handed out until :meth:`resume`.

        Recorded in PostgreSQL (survives a restart and a Redis loss) and
        mirrored to Redis, where the claim script skips paused queues; a
        worker's other queues keep serving and work in flight finishes.
        Pausing a queue that is already paused changes nothing: the first
        pause keeps its reason, actor and time (``False`` says so).

        Parameters
        ----------
        queue
            The queue's name (it need not hold jobs yet).
        reason
            Why, in words (required, not blank, at most 1000 characters).
        actor
            Who pauses it; default ``user@host`` of this process.

        Returns
        -------
        bool
            True when this call paused the queue, False when it was already paused.

        Raises
        ------
        ValidationError
            A bad queue name, reason or actor; nothing is written.
        StorageUnavailable
            PostgreSQL failed (nothing is paused).
        """
        validate.identifier("queue", queue)
        reason = check_reason(reason)
        actor = default_actor() if actor is None else validate.identifier("actor", actor)
        row = {"queue": queue, "reason": reason, "actor": actor, "paused_at": self.pipe.now()}
        with self.pipe.db.begin("pause queue") as conn:
            changed = records.insert_pause(conn, row)
        self._mirror(queue, paused=True)
        if changed:
            log.warning("queue %r paused by %s: %s", queue, actor, reason,
                        extra={"action": "pause_queue"})
        return changed

    def resume(self, queue: str, *, actor: str | None = None) -> bool:
        """Resume a paused queue: its jobs are handed out again.

        Returns
        -------
        bool
            True when the queue was paused, False when it was not (nothing changed).

        Raises
        ------
        ValidationError
            A bad queue name or actor; nothing is written.
        StorageUnavailable
            PostgreSQL failed (the queue stays paused).
        """
        validate.identifier("queue", queue)
        actor = default_actor() if actor is None else validate.identifier("actor", actor)
        with self.pipe.db.begin("resume queue") as conn:
            changed = records.delete_pause(conn, queue)
        self._mirror(queue, paused=False)
        if changed:
            log.warning("queue %r resumed by %s", queue, actor, extra={"action": "resume_queue"})
        return changed

    def _mirror(self, queue_name: str, *, paused: bool) -> None:
        """Write the Redis mirror after the commit; a failure leaves it to ``repair()``."""
        client, ns = self.pipe.redis, self.pipe.ns

        def go() -> None:
            pipe = client.pipeline()
            (redis_queue.mark_paused if paused else redis_queue.mark_resumed)(ns, queue_name, pipe=pipe)
            pipe.execute()

        try:
            client.call("mirror paused queue", go)
        except errors.StorageUnavailable as exc:
            log.error("queue %r is %s in PostgreSQL but Redis could not be told (%s): run "
                      "repair() (toolkit check --repair) before relying on it", queue_name,
                      "paused" if paused else "resumed", exc, extra={"action": "pause_queue"})
