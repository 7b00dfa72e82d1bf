"""Lock primitives: ``SET NX PX`` with a random owner token, compare-and-act Lua."""

from __future__ import annotations

from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client, run_script


def acquire(client: Client, ns: str, name: str, token: str, ttl_ms: int, floor: int = 0) -> int:
    """Try once to take the lock; return the fencing token, or 0 when it is held."""
    ks = [keys.lock(ns, name), keys.fence(ns, name)]
    return int(client.call(
        "lock acquire", lambda: run_script(client, "acquire_lock", ks, [token, ttl_ms, floor]),
        idempotent=False,
    ))


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
