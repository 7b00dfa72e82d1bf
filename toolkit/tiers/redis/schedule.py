"""Scheduled jobs: one due-time sorted set per queue, promoted into the queue when due.

A job that PostgreSQL calls ``queued`` with ``run_at`` in the future waits in
``{ns}:scheduled:<queue>`` (score: due time, unix seconds) instead of its queue,
with its queue score in ``{ns}:scheduled_meta``. ``promote_due.lua`` moves the
due ones into their queues in one script (ZRANGEBYSCORE, ZADD, ZREM), so a job
is in its queue or in its due-time set, never both and never neither. A job
leaving ``queued`` is removed from both by :func:`toolkit.tiers.redis.queue.remove_many`.
PostgreSQL's ``run_at`` is the truth: the rebuild and ``repair()`` restore these
sets from it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from toolkit.tiers.redis import keys, queue
from toolkit.tiers.redis.client import Client, chunks, run_script

PROMOTE_LIMIT = 1000
"""Most jobs one promotion moves per queue (the next call moves the rest)."""


def add_many(ns: str, jobs: Iterable[tuple[str, str, int, int, float]], *, pipe: Any) -> None:
    """Queue scheduling many ``(job id, queue, priority, seq, due)`` on ``pipe`` (idempotent).

    Each job leaves its queue (it may have been there before it was scheduled again).
    """
    by_queue: dict[str, dict[str, float]] = {}
    scores: dict[str, str] = {}
    for job_id, queue_name, priority, seq, due in jobs:
        by_queue.setdefault(queue_name, {})[job_id] = due
        scores[job_id] = repr(queue.score(priority, seq))
    for queue_name, members in by_queue.items():
        for due_chunk in chunks(list(members.items()), queue.PUSH_CHUNK):
            pipe.zadd(keys.scheduled(ns, queue_name), dict(due_chunk))
            pipe.zrem(keys.queue(ns, queue_name), *[job_id for job_id, _ in due_chunk])
    for score_chunk in chunks(list(scores.items()), queue.PUSH_CHUNK):
        pipe.hset(keys.scheduled_meta(ns), mapping=dict(score_chunk))
    if by_queue:
        pipe.sadd(keys.queues(ns), *by_queue)


def remove_many(ns: str, jobs: Iterable[tuple[str, str]], *, pipe: Any) -> None:
    """Queue removing many ``(job id, queue)`` from their due-time sets on ``pipe``."""
    by_queue: dict[str, list[str]] = {}
    for job_id, queue_name in jobs:
        by_queue.setdefault(queue_name, []).append(job_id)
    for queue_name, ids in by_queue.items():
        for chunk in chunks(ids, queue.PUSH_CHUNK):
            pipe.zrem(keys.scheduled(ns, queue_name), *chunk)
            pipe.hdel(keys.scheduled_meta(ns), *chunk)


def promote(client: Client, ns: str, queue_names: Sequence[str], now: float) -> int:
    """Move the jobs of ``queue_names`` due at ``now`` into their queues; return how many."""
    ks = [keys.scheduled_meta(ns)]
    for name in queue_names:
        ks += [keys.scheduled(ns, name), keys.queue(ns, name)]
    return int(client.call("promote due jobs",
                           lambda: run_script(client, "promote_due", ks, [repr(now), PROMOTE_LIMIT])))


def members(client: Client, ns: str, queue_name: str) -> list[tuple[str, float]]:
    """Return ``(job id, due time)`` of every scheduled job of a queue, soonest first."""
    return list(client.call(
        "read schedule",
        lambda: client.redis.zrange(keys.scheduled(ns, queue_name), 0, -1, withscores=True)))


def queue_scores(client: Client, ns: str, ids: Sequence[str]) -> dict[str, float]:
    """Return the queue score each scheduled job will have when promoted (ids that have one)."""
    if not ids:
        return {}
    found = client.call("read schedule", lambda: client.redis.hmget(keys.scheduled_meta(ns), list(ids)))
    return {j: float(s) for j, s in zip(ids, found, strict=True) if s is not None}


def correct(ns: str, queue_name: str, add: Mapping[str, tuple[float, float]],
            drop: Sequence[str], *, pipe: Any) -> None:
    """Queue setting ``add`` (job id -> (due, queue score)) and removing ``drop`` (repairs)."""
    if add:
        add_many(ns, [(j, queue_name, *queue.unscore(s), due) for j, (due, s) in add.items()],
                 pipe=pipe)
    if drop:
        remove_many(ns, [(j, queue_name) for j in drop], pipe=pipe)
