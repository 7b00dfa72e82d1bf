"""Metric counters: a hash of totals and, per metric, a hash of time buckets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from toolkit.tiers.redis import keys
from toolkit.tiers.redis.client import Client, chunks, run_script

BUCKET_SECONDS = 60
"""Width of a metric time bucket."""
RETENTION_SECONDS = 7 * 24 * 3600
"""How long time buckets are kept in Redis (PostgreSQL keeps its checkpoints)."""
INCR_CHUNK = 1000
"""Most counters one script call adds to, so that no call blocks Redis for long."""


def bucket_start(now: float) -> int:
    """Return the start of the bucket ``now`` falls in (unix seconds)."""
    return int(now // BUCKET_SECONDS) * BUCKET_SECONDS


def incr(client: Client, ns: str, name: str, amount: int, now: float, *, pipe: Any = None) -> Any:
    """Add ``amount`` to a counter and its bucket; never re-sent after a timeout."""
    ks = [keys.metrics(ns), keys.metric_buckets(ns, name)]
    args = [name, amount, bucket_start(now)]
    if pipe is not None:
        return run_script(client, "incr_metric", ks, args, pipe=pipe)
    return int(client.call(
        "incr_metric", lambda: run_script(client, "incr_metric", ks, args), idempotent=False
    ))


def _calls(ns: str, amounts: Mapping[str, int], now: float
           ) -> list[tuple[list[str], list[Any], list[str]]]:
    """The ``incr_metrics`` calls adding ``amounts``: keys, arguments and names, per
    :data:`INCR_CHUNK` counters."""
    out = []
    for chunk in chunks(list(amounts.items()), INCR_CHUNK):
        ks = [keys.metrics(ns), *(keys.metric_buckets(ns, name) for name, _ in chunk)]
        args: list[Any] = [bucket_start(now)]
        for name, amount in chunk:
            args += (name, amount)
        out.append((ks, args, [name for name, _ in chunk]))
    return out


def incr_many(client: Client, ns: str, amounts: Mapping[str, int], now: float) -> dict[str, int]:
    """Add to many counters and their buckets; return their new totals.

    One ``incr_metrics`` script call per :data:`INCR_CHUNK` counters, each
    sent once and never re-sent after a timeout or a connection error.
    """
    calls = _calls(ns, amounts, now)

    def go() -> dict[str, int]:
        out: dict[str, int] = {}
        for ks, args, names in calls:
            new = run_script(client, "incr_metrics", ks, args)
            out.update(zip(names, map(int, new), strict=True))
        return out

    return client.call("incr_metrics", go, idempotent=False) if calls else {}


def incr_many_on(client: Client, ns: str, amounts: Mapping[str, int], now: float, *,
                 pipe: Any) -> None:
    """Queue :func:`incr_many`'s script calls on ``pipe`` (a write's one pipeline)."""
    for ks, args, _ in _calls(ns, amounts, now):
        run_script(client, "incr_metrics", ks, args, pipe=pipe)


def totals(client: Client, ns: str) -> dict[str, int]:
    """Return every counter's total."""
    raw = client.call("read metrics", lambda: client.redis.hgetall(keys.metrics(ns)))
    return {k: int(v) for k, v in raw.items()}


def get(client: Client, ns: str, name: str) -> int:
    """Return one counter's total (0 when absent)."""
    return int(client.call("read metric", lambda: client.redis.hget(keys.metrics(ns), name)) or 0)


def buckets(client: Client, ns: str, names: list[str]) -> dict[str, dict[int, int]]:
    """Return metric name -> {bucket start: count} for ``names``."""
    def read() -> list[Any]:
        pipe = client.pipeline()
        for n in names:
            pipe.hgetall(keys.metric_buckets(ns, n))
        return list(pipe.execute())

    rows = client.call("read metric buckets", read) if names else []
    return {n: {int(k): int(v) for k, v in r.items()} for n, r in zip(names, rows, strict=True)}


def raise_to(client: Client, ns: str, values: dict[str, int]) -> int:
    """Raise totals to at least ``values`` (after a Redis loss); return how many rose."""
    if not values:
        return 0
    args: list[Any] = []
    for k, v in values.items():
        args += [k, v]
    return int(client.call(
        "restore metrics", lambda: run_script(client, "raise_metrics", [keys.metrics(ns)], args)
    ))
