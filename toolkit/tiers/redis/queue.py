"""Priority job queues: one sorted set per queue name, plus an in-flight set.

Score = ``-priority * 1e12 + seq``: the lowest score is the highest priority,
and within a priority the smallest enqueue sequence (FIFO). ``seq`` comes from
a PostgreSQL sequence, so the order survives a rebuild.

A pop moves the job into ``{ns}:inflight`` with a lease deadline
(``claim_job.lua``) before PostgreSQL is asked to assign it. If the process
dies between the two, the lease expires and a janitor puts the job back (when
PostgreSQL still calls it queued) or forgets it (when the assignment had
committed). PostgreSQL's status guard decides who gets a job, so no job is
ever handed to two workers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client, Packable, chunks, run_script

PRIORITY_LIMIT = 1_000_000
"""Priorities must lie in ``[-PRIORITY_LIMIT, PRIORITY_LIMIT]`` (exact float scores)."""
_SEQ_SPAN = 1e9


class Claim(NamedTuple):
    """A job popped into the in-flight set."""

    job_id: str
    queue: str
    score: float


def score(priority: int, seq: int) -> float:
    """Return the queue score of a job (lower pops first)."""
    return -priority * _SEQ_SPAN + seq


def unscore(value: float) -> tuple[int, int]:
    """Return ``(priority, seq)`` of a queue score."""
    priority = -math.floor(value / _SEQ_SPAN)
    return priority, round(value + priority * _SEQ_SPAN)


def push(ns: str, job_id: str, queue_name: str, priority: int, seq: int, *, pipe: Any) -> None:
    """Queue adding a job to its queue on ``pipe`` (idempotent)."""
    push_many(ns, [(job_id, queue_name, priority, seq)], pipe=pipe)


PUSH_CHUNK = 1000
"""Most members one ZADD or ZREM of :func:`push_many` and :func:`remove_many` carries."""


def push_many(ns: str, jobs: Iterable[tuple[str, str, int, int]], *, pipe: Any) -> None:
    """Queue adding many ``(job id, queue, priority, seq)`` on ``pipe`` (idempotent).

    Leaves what :func:`push` of each job leaves (same scores), with one ZADD
    per queue (per :data:`PUSH_CHUNK` jobs) and one SADD of the queue names.
    """
    by_queue: dict[str, dict[str, float]] = {}
    for job_id, queue_name, priority, seq in jobs:
        by_queue.setdefault(queue_name, {})[job_id] = score(priority, seq)
    for queue_name, members in by_queue.items():
        for chunk in chunks(list(members.items()), PUSH_CHUNK):
            pipe.zadd(keys.queue(ns, queue_name), dict(chunk))
    if by_queue:
        pipe.sadd(keys.queues(ns), *by_queue)


def push_missing(ns: str, jobs: Iterable[tuple[str, str, int, int]], *, pipe: Any) -> None:
    """Queue adding the ``(job id, queue, priority, seq)`` that their queue lacks (``ZADD NX``).

    A job already queued keeps its place, whatever its score.
    """
    by_queue: dict[str, dict[str, float]] = {}
    for job_id, queue_name, priority, seq in jobs:
        by_queue.setdefault(queue_name, {})[job_id] = score(priority, seq)
    for queue_name, members in by_queue.items():
        for chunk in chunks(list(members.items()), PUSH_CHUNK):
            pipe.zadd(keys.queue(ns, queue_name), dict(chunk), nx=True)
    if by_queue:
        pipe.sadd(keys.queues(ns), *by_queue)


def remove_many(ns: str, jobs: Iterable[tuple[str, str]], *, pipe: Any) -> None:
    """Queue removing many ``(job id, queue)`` from their queues and the in-flight set.

    Leaves what :func:`remove` of each job leaves, with one ZREM per queue and
    one ZREM and HDEL of the in-flight set (per :data:`PUSH_CHUNK` jobs); the same
    for the queue's due-time set and the schedule's meta hash (a scheduled job).
    """
    by_queue: dict[str, list[str]] = {}
    for job_id, queue_name in jobs:
        by_queue.setdefault(queue_name, []).append(job_id)
    every = list(dict.fromkeys(j for ids in by_queue.values() for j in ids))
    for queue_name, ids in by_queue.items():
        for chunk in chunks(ids, PUSH_CHUNK):
            pipe.zrem(keys.queue(ns, queue_name), *chunk)
    for chunk in chunks(every, PUSH_CHUNK):
        pipe.zrem(keys.inflight(ns), *chunk)
        pipe.hdel(keys.inflight_meta(ns), *chunk)
    for queue_name, ids in by_queue.items():  # a scheduled job leaves its due-time set
        for chunk in chunks(ids, PUSH_CHUNK):
            pipe.zrem(keys.scheduled(ns, queue_name), *chunk)
    for chunk in chunks(every, PUSH_CHUNK):
        pipe.hdel(keys.scheduled_meta(ns), *chunk)


def correct(ns: str, queue_name: str, scores: Mapping[str, float], drop: Sequence[str]
            ) -> list[list[Packable]]:
    """The commands that set the scores of ``scores`` and remove ``drop`` in one queue
    (repairs; for :meth:`Client.send_packed`: a rebuild after Redis was lost sends every
    queued job here).

    Unlike :func:`remove_many`, the in-flight set is left alone (the janitor owns it).
    """
    key = keys.queue(ns, queue_name)
    commands: list[list[Packable]] = []
    for members in chunks(list(scores.items()), PUSH_CHUNK):
        command: list[Packable] = ["ZADD", key]
        for job_id, score in members:
            command += (score, job_id)
        commands.append(command)
    commands += [["ZREM", key, *chunk] for chunk in chunks(list(drop), PUSH_CHUNK)]
    commands.append(["SADD", keys.queues(ns), queue_name])
    return commands


def drop_unchanged(client: Client, ns: str, queue_name: str,
                   jobs: Sequence[tuple[str, float, bool]]) -> int:
    """Take ``(job id, score, was in flight)`` out of a queue where nothing moved them since:
    still at that score, and still in flight when they were (``drop_unchanged.lua``); return
    how many were removed. The queue's name goes into the set of queue names either way."""
    removed = 0
    for chunk in chunks(list(jobs), PUSH_CHUNK):
        args: list[Any] = []
        for job_id, score, in_flight in chunk:
            args += (job_id, score, "1" if in_flight else "0")
        removed += client.call("drop jobs no longer queued", functools.partial(
            run_script, client, "drop_unchanged", [keys.queue(ns, queue_name), keys.inflight(ns)],
            args))
    client.call("name the queue", lambda: client.redis.sadd(keys.queues(ns), queue_name))
    return removed


def take_unchanged(client: Client, ns: str, queue_name: str,
                   jobs: Sequence[tuple[str, float]]) -> list[str]:
    """Take ``(job id, score)`` out of a queue where each still has that score
    (``take_unchanged.lua``); return the ids taken out."""
    taken: list[str] = []
    for chunk in chunks(list(jobs), PUSH_CHUNK):
        args: list[Any] = []
        for job_id, score in chunk:
            args += (job_id, score)
        taken += client.call("take jobs out to check them", functools.partial(
            run_script, client, "take_unchanged", [keys.queue(ns, queue_name)], args))
    return taken


def remove(ns: str, job_id: str, queue_name: str, *, pipe: Any) -> None:
    """Queue removing a job from its queue and from the in-flight set on ``pipe``."""
    remove_many(ns, [(job_id, queue_name)], pipe=pipe)


def claim(client: Client, ns: str, queue_names: list[str], lease_deadline: float) -> Claim | None:
    """Pop the best job of ``queue_names`` into the in-flight set (never re-sent).

    Paused queues (:func:`paused`) are skipped inside the script, so a pause
    holds for every coordinator from the moment the mirror is written.
    """
    ks = [keys.inflight(ns), keys.inflight_meta(ns), keys.paused_queues(ns)]
    ks += [keys.queue(ns, q) for q in queue_names]
    res = client.call(
        "dequeue",
        lambda: run_script(client, "claim_job", ks, [lease_deadline, *queue_names]),
        idempotent=False,
    )
    if not res:
        return None
    return Claim(str(res[0]), str(res[1]), float(res[2]))


def claim_many(client: Client, ns: str, queue_names: list[str], n: int,
               lease_deadline: float) -> list[Claim]:
    """Pop up to ``n`` of the best jobs of ``queue_names`` into the in-flight set, best first,
    in one script (the order ``n`` calls of :func:`claim` would give, paused queues skipped
    as there; never re-sent)."""
    ks = [keys.inflight(ns), keys.inflight_meta(ns), keys.paused_queues(ns)]
    ks += [keys.queue(ns, q) for q in queue_names]
    res = client.call(
        "dequeue",
        lambda: run_script(client, "claim_jobs", ks, [lease_deadline, n, *queue_names]),
        idempotent=False,
    )
    return [Claim(str(res[i]), str(res[i + 1]), float(res[i + 2])) for i in range(0, len(res), 3)]


def settle(client: Client, ns: str, claim_: Claim, *, requeue: bool) -> bool:
    """End an in-flight claim: put the job back on its queue, or just forget it."""
    ks = [keys.inflight(ns), keys.inflight_meta(ns), keys.queue(ns, claim_.queue)]
    args = [claim_.job_id, repr(claim_.score), "1" if requeue else "0"]
    return bool(client.call("settle claim", lambda: run_script(client, "return_inflight", ks, args)))


def expired_claims(client: Client, ns: str, now: float) -> list[Claim]:
    """Return the in-flight claims whose lease has run out."""
    def read() -> tuple[list[str], list[str | None]]:
        ids = client.redis.zrangebyscore(keys.inflight(ns), "-inf", "+inf" if math.isinf(now) else now)
        meta = client.redis.hmget(keys.inflight_meta(ns), ids) if ids else []
        return ids, meta

    ids, meta = client.call("read in-flight", read)
    out = []
    for job_id, m in zip(ids, meta, strict=True):
        q, _, s = (m or "|0").rpartition("|")
        out.append(Claim(job_id, q, float(s or 0)))
    return out


def inflight_ids(client: Client, ns: str) -> set[str]:
    """Return every job id in flight."""
    return set(client.call("read in-flight", lambda: client.redis.zrange(keys.inflight(ns), 0, -1)))


def queue_names(client: Client, ns: str) -> set[str]:
    """Return the names of every queue used in the namespace."""
    return set(client.call("read queue names", lambda: client.redis.smembers(keys.queues(ns))))


def scores_in(client: Client, ns: str, pairs: Sequence[tuple[str, str]]) -> list[float | None]:
    """The score of each ``(job id, queue name)`` (None: not in that queue), in one pipeline."""
    if not pairs:
        return []

    def go() -> list[float | None]:
        pipe = client.redis.pipeline(transaction=False)
        for job_id, queue_name in pairs:
            pipe.zscore(keys.queue(ns, queue_name), job_id)
        return list(pipe.execute())

    return client.call("read queue scores", go)


def members(client: Client, ns: str, queue_name: str) -> list[tuple[str, float]]:
    """Return ``(job id, score)`` of every job in a queue, in pop order."""
    return list(client.call(
        "read queue",
        lambda: client.redis.zrange(keys.queue(ns, queue_name), 0, -1, withscores=True),
    ))


def mark_paused(ns: str, queue_name: str, *, pipe: Any) -> None:
    """Queue adding ``queue_name`` to the paused set on ``pipe`` (idempotent)."""
    pipe.sadd(keys.paused_queues(ns), queue_name)


def mark_resumed(ns: str, queue_name: str, *, pipe: Any) -> None:
    """Queue removing ``queue_name`` from the paused set on ``pipe`` (idempotent)."""
    pipe.srem(keys.paused_queues(ns), queue_name)


def set_paused(ns: str, names: Iterable[str], *, pipe: Any) -> None:
    """Queue replacing the paused set with exactly ``names`` on ``pipe`` (rebuild and repair).

    Give a transactional pipeline (MULTI/EXEC), so no claim sees the set empty in between.
    """
    wanted = sorted(set(names))
    pipe.delete(keys.paused_queues(ns))
    if wanted:
        pipe.sadd(keys.paused_queues(ns), *wanted)


def paused(client: Client, ns: str) -> set[str]:
    """Return the names of the queues the claim script treats as paused."""
    return set(client.call("read paused queues",
                           lambda: client.redis.smembers(keys.paused_queues(ns))))
