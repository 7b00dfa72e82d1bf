"""The applied watermarks: how far back Redis may lag behind PostgreSQL, per coordinator.

Each coordinator publishes, about once a second, ``safe``: a time before which
every write it committed to PostgreSQL has reached Redis (the start of its
oldest write still in progress, or now). A coordinator that dies takes its
unapplied writes with it, but its last ``safe`` stays, so a new coordinator
need only check what changed in PostgreSQL since the smallest ``safe``
(:mod:`toolkit.recovery.fast_start`). ``safe = 0`` means "do not trust this
Redis": a write failed to reach it, so only a full rebuild will do.

A rebuild marks Redis as whole (``{ns}:rebuilt``); a Redis that lost its data
lost the mark too, and a live coordinator's next watermark does not bring it
back, so the mark, not the watermarks, says that Redis survived.

Deletes leave no row to find, so they are noted in ``{ns}:deleting`` before
their commit and the note is removed with the cache entries after it.

A coordinator that commits with ``synchronous_commit = off`` notes it in
``{ns}:async_commits`` before its first write (and again with each watermark): a
PostgreSQL server that crashed may have lost commits Redis holds. A rebuild keeps the token
of PostgreSQL's UNLOGGED crash sentinel (which a crash recovery empties) when it is the one
in ``{ns}:crash_token``, writes a new one when they differ, and gives it to Redis at its end:
a token PostgreSQL lost says it crashed since.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client


class Mark(NamedTuple):
    """One coordinator's published watermark."""

    coordinator: str
    safe: float
    refreshed: float
    run_id: str


def run_id(client: Client) -> str:
    """The Redis server's run id (it changes when the server restarts)."""
    return str(client.call("read run id", lambda: client.redis.info("server")["run_id"]))


def publish(client: Client, ns: str, coordinator: str, mark: Mark) -> None:
    """Write one coordinator's watermark."""
    value = f"{mark.safe!r}|{mark.refreshed!r}|{mark.run_id}"
    client.call("publish watermark", lambda: client.redis.hset(keys.applied(ns), coordinator, value))


def read(client: Client, ns: str) -> list[Mark]:
    """Every published watermark (unreadable fields count as ``safe = 0``)."""
    raw: dict[str, str] = client.call("read watermarks", lambda: client.redis.hgetall(keys.applied(ns)))
    out = []
    for coordinator, value in raw.items():
        parts = value.split("|")
        try:
            out.append(Mark(coordinator, float(parts[0]), float(parts[1]), parts[2]))
        except (IndexError, ValueError):
            out.append(Mark(coordinator, 0.0, 0.0, ""))
    return out


def forget(client: Client, ns: str, coordinators: Iterable[str]) -> None:
    """Remove watermarks (of coordinators that stopped)."""
    names = list(coordinators)
    if names:
        client.call("forget watermarks", lambda: client.redis.hdel(keys.applied(ns), *names))


def mark_rebuilt(client: Client, ns: str, now: float) -> None:
    """Record that Redis was made whole (by a rebuild); only a rebuild writes this key."""
    client.call("mark rebuilt", lambda: client.redis.set(keys.rebuilt(ns), repr(now)))


def forget_rebuilt(client: Client, ns: str) -> None:
    """Remove the mark of the last rebuild (DEL works even on a Redis out of memory)."""
    client.call("forget rebuilt mark", lambda: client.redis.delete(keys.rebuilt(ns)))


def was_rebuilt(client: Client, ns: str) -> bool:
    """Whether Redis still holds the mark of the last rebuild (a loss of data removes it)."""
    return bool(client.call("read rebuilt mark", lambda: client.redis.exists(keys.rebuilt(ns))))


def set_crash_token(client: Client, ns: str, token: str) -> None:
    """Record the token a rebuild kept or wrote in PostgreSQL's crash sentinel."""
    client.call("record crash token", lambda: client.redis.set(keys.crash_token(ns), token))


def crash_token(client: Client, ns: str) -> str | None:
    """The token of the last rebuild's crash sentinel (None: none recorded)."""
    raw = client.call("read crash token", lambda: client.redis.get(keys.crash_token(ns)))
    return None if raw is None else str(raw)


def note_async_commits(client: Client, ns: str, now: float) -> None:
    """Note, before its first write, that a coordinator of ``ns`` commits without waiting for
    the disk (``synchronous_commit = off``): the first such coordinator's start is kept."""
    client.call("note async commits", lambda: client.redis.set(keys.async_commits(ns), repr(now),
                                                               nx=True))


def async_commits_noted(client: Client, ns: str) -> bool:
    """Whether a coordinator of ``ns`` ever committed with ``synchronous_commit = off`` while
    this Redis kept its data."""
    return bool(client.call("read async commits note",
                            lambda: client.redis.exists(keys.async_commits(ns))))


def note_deleting(client: Client, ns: str, pairs: Iterable[tuple[str, str]]) -> None:
    """Note ``(kind, id)`` pairs about to be deleted (before the PostgreSQL commit)."""
    members = [f"{kind}|{entity_id}" for kind, entity_id in pairs]
    if members:
        client.call("note deletes", lambda: client.redis.sadd(keys.deleting(ns), *members))


def done_deleting(ns: str, pairs: Iterable[tuple[str, str]], *, pipe: Any) -> None:
    """Queue removing the notes of deletes that reached Redis."""
    members = [f"{kind}|{entity_id}" for kind, entity_id in pairs]
    if members:
        pipe.srem(keys.deleting(ns), *members)


def deleting(client: Client, ns: str) -> list[tuple[str, str]]:
    """The ``(kind, id)`` pairs noted as being deleted."""
    raw = client.call("read delete notes", lambda: client.redis.smembers(keys.deleting(ns)))
    return sorted((m.split("|", 1)[0], m.split("|", 1)[1]) for m in raw if "|" in m)
