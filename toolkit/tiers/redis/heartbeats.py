"""Worker heartbeats: a key per worker with a TTL, and a sorted set of last-seen times."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client, chunks, queue_script

HISTORY_LENGTH = 500
"""How many recent heartbeat times are kept per worker (for gap analytics)."""
HISTORY_TTL_MS = 24 * 3600 * 1000
"""How long a worker's history outlives its last heartbeat (milliseconds)."""
BEAT_CHUNK = 1000
"""Most workers one script call beats, so that no call blocks Redis for long."""


def beat(ns: str, worker_ids: Iterable[str], now: float, ttl: float, *, pipe: Any) -> None:
    """Queue heartbeats of ``worker_ids`` at ``now`` on ``pipe`` (key, last-seen, history).

    One ``beat_workers`` script call per :data:`BEAT_CHUNK` workers, on a
    pipeline from :meth:`Client.pipeline` (which loaded the scripts).
    """
    ids = list(worker_ids)
    head = [repr(now), max(1, int(ttl * 1000)), HISTORY_LENGTH, HISTORY_TTL_MS]
    for chunk in chunks(ids, BEAT_CHUNK):
        ks = [keys.heartbeats(ns)]
        for wid in chunk:
            ks += (keys.heartbeat(ns, wid), keys.heartbeat_history(ns, wid))
        queue_script(pipe, "beat_workers", ks, head + chunk)


def history(client: Client, ns: str, worker_ids: list[str]) -> dict[str, list[float]]:
    """Return worker id -> recent heartbeat times, oldest first (read-only)."""
    def read() -> list[Any]:
        pipe = client.pipeline()
        for wid in worker_ids:
            pipe.lrange(keys.heartbeat_history(ns, wid), 0, -1)
        return list(pipe.execute())

    rows = client.call("read heartbeat history", read) if worker_ids else []
    return {w: sorted(float(x) for x in r) for w, r in zip(worker_ids, rows, strict=True)}


def forget(ns: str, worker_id: str, *, pipe: Any) -> None:
    """Queue removing a worker's heartbeat on ``pipe``."""
    pipe.unlink(keys.heartbeat(ns, worker_id))
    pipe.zrem(keys.heartbeats(ns), worker_id)


def last_seen(client: Client, ns: str) -> dict[str, float]:
    """Return worker id -> last heartbeat (unix seconds) for every worker seen."""
    rows = client.call(
        "read heartbeats", lambda: client.redis.zrange(keys.heartbeats(ns), 0, -1, withscores=True)
    )
    return {wid: float(t) for wid, t in rows}


def boot_time(client: Client, ns: str, now: float) -> float:
    """Return when this namespace's Redis data began, recording ``now`` if unknown.

    After Redis loses its data no worker has a heartbeat; the boot time lets
    the reaper wait a full TTL before it calls any worker dead.
    """
    def go() -> float:
        client.redis.set(keys.boot(ns), repr(now), nx=True)
        return float(client.redis.get(keys.boot(ns)) or now)

    return client.call("read boot time", go)
