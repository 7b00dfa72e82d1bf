"""Lock primitives: ``SET NX PX`` with a random owner token, compare-and-act Lua."""

from __future__ import annotations

from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client, run_script

NEED_RESERVATION = -1


def acquire(client: Client, ns: str, name: str, token: str, ttl_ms: int,
            reservation: tuple[int, int] | None = None) -> int:
    """Try once to take the lock.

    Returns the fencing token (> 0), 0 when the lock is held, or
    :data:`NEED_RESERVATION` when tokens must first be reserved in PostgreSQL;
    then call again with ``reservation=(floor, new_reserved)``.
    """
    ks = [keys.lock(ns, name), keys.fence(ns, name), keys.fence_reserved(ns, name)]
    floor, reserved = reservation if reservation is not None else ("", "")
    return int(client.call(
        "lock acquire",
        lambda: run_script(client, "acquire_lock", ks, [token, ttl_ms, floor, reserved]),
        idempotent=False,
    ))


def counter(client: Client, ns: str, name: str) -> int:
    """Return the last fencing token handed out (0 when unknown to Redis)."""
    return int(client.call("fence read", lambda: client.redis.get(keys.fence(ns, name))) or 0)


def release(client: Client, ns: str, name: str, token: str) -> bool:
    """Release the lock if ``token`` owns it; return whether it did."""
    return bool(client.call(
        "lock release",
        lambda: run_script(client, "release_lock", [keys.lock(ns, name)], [token]),
    ))


def extend(client: Client, ns: str, name: str, token: str, ttl_ms: int) -> bool:
    """Set a new TTL if ``token`` owns the lock; return whether it did."""
    return bool(client.call(
        "lock extend",
        lambda: run_script(client, "extend_lock", [keys.lock(ns, name)], [token, ttl_ms]),
    ))


def owner(client: Client, ns: str, name: str) -> str | None:
    """Return the token that holds the lock, or None."""
    value = client.call("lock read", lambda: client.redis.get(keys.lock(ns, name)))
    return None if value is None else str(value)
