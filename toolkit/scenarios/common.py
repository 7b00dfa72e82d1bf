"""What every scenario shares: the target servers, the result, sandboxes and clean-up."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pandas as pd

from toolkit import config, errors
from toolkit.local_stack import LocalStack
from toolkit.state import StateManager, init_state_manager

Say = Callable[[str], None]


def quiet(_: str) -> None:
    return None


@dataclasses.dataclass
class ScenarioResult:
    """What a scenario did, what it checked, and whether every check held."""

    name: str
    checks: dict[str, bool]
    timings: dict[str, float]
    before: pd.DataFrame
    after: pd.DataFrame
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check held."""
        return all(self.checks.values())

    @property
    def verdict(self) -> str:
        """``PASS`` or ``FAIL``."""
        return "PASS" if self.ok else "FAIL"

    def checks_frame(self) -> pd.DataFrame:
        """The checks as a two-column frame (``check``, ``ok``)."""
        return pd.DataFrame({"check": list(self.checks), "ok": list(self.checks.values())})

    def __str__(self) -> str:
        lines = [f"{self.name}: {self.verdict}"]
        lines += [f"  [{'ok' if v else 'FAILED'}] {k}" for k, v in self.checks.items()]
        lines += [f"  {k}: {v:.3f}s" for k, v in self.timings.items()]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a scenario runs: URLs, and the embedded stack when there is one."""

    database_url: str
    redis_url: str
    stack: LocalStack | None = None

    def __repr__(self) -> str:
        return (f"Target(database={config.mask_url(self.database_url)!r}, "
                f"redis={config.mask_url(self.redis_url)!r}, embedded={self.stack is not None})")


@contextlib.contextmanager
def target(database_url: str | None = None, redis_url: str | None = None) -> Iterator[Target]:
    """Use the given URLs, else ``DATABASE_URL``/``REDIS_URL``, else start the embedded stack."""
    db = database_url or os.environ.get(config.DATABASE_URL_VAR)
    rd = redis_url or os.environ.get(config.REDIS_URL_VAR)
    if db and rd:
        yield Target(config.resolve_database_url(db), config.resolve_redis_url(rd))
        return
    with LocalStack() as stack:
        yield Target(stack.database_url, stack.redis_url, stack)


def fresh_names(prefix: str = "demo") -> tuple[str, str]:
    """Return a new (namespace, schema) pair so a scenario never touches other data."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    return name, name


def status_counts(sm: StateManager) -> pd.DataFrame:
    """Jobs per status in PostgreSQL, every status present (the frame scenarios compare)."""
    from toolkit.models import JobStatus

    counts = Counter(j.status.value for j in sm.list_jobs())
    return pd.DataFrame({"status": [s.value for s in JobStatus],
                         "jobs": [counts.get(s.value, 0) for s in JobStatus]}).set_index("status")


def wipe_namespace(redis_url: str, ns: str) -> int:
    """Delete every key of one namespace (SCAN + UNLINK, never FLUSHDB); return how many."""
    import redis

    from toolkit.tiers.redis import keys

    r = redis.Redis.from_url(redis_url)
    try:
        names = list(r.scan_iter(match=keys.namespace_pattern(ns), count=1000))
        for i in range(0, len(names), 1000):
            r.unlink(*names[i:i + 1000])
        return len(names)
    finally:
        r.close()


def drop_schema(database_url: str, schema: str) -> None:
    """Drop one PostgreSQL schema by name (never a database)."""
    import sqlalchemy as sa

    name = config.validate_schema(schema)
    engine = sa.create_engine(config.resolve_database_url(database_url),
                              isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sa.schema.DropSchema(name, cascade=True, if_exists=True))
    finally:
        engine.dispose()


def cleanup(sm: StateManager, t: Target, keep: bool = False) -> None:
    """Close ``sm`` and remove its schema and namespace (unless ``keep``); best effort."""
    ns, schema = sm.ns, sm.settings.schema
    sm.close()
    if keep:
        return
    with contextlib.suppress(Exception):
        wipe_namespace(t.redis_url, ns)
    with contextlib.suppress(Exception):
        drop_schema(t.database_url, schema)


@contextlib.contextmanager
def sandbox(t: Target, prefix: str = "sandbox", *, heartbeat_ttl: float = 2.0,
            keep: bool = False) -> Iterator[StateManager]:
    """A StateManager on a fresh schema and namespace, removed (by name) on exit.

    Parameters
    ----------
    t
        Where to run (see :func:`target`).
    prefix
        Start of the schema and namespace name (a random suffix follows).
    heartbeat_ttl
        The manager's heartbeat TTL (short, so scenarios see reclaims quickly).
    keep
        Leave the schema and namespace in place, for a look afterwards.
    """
    ns, schema = fresh_names(prefix)
    sm = init_state_manager(t.database_url, t.redis_url, namespace=ns, schema=schema,
                            heartbeat_ttl=heartbeat_ttl)
    try:
        yield sm
    finally:
        cleanup(sm, t, keep)


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; return whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def unfinished(counts: pd.DataFrame) -> int:
    """Jobs not in a final status in a :func:`status_counts` frame."""
    final = {"completed", "failed", "cancelled"}
    return int(counts.loc[[s for s in counts.index if s not in final], "jobs"].sum())


def retry(fn: Callable[[], Any], attempts: int = 5) -> Any:
    """Call ``fn``, retrying briefly while pooled connections notice a restarted server."""
    for i in range(attempts):
        try:
            return fn()
        except errors.StorageUnavailable:
            if i == attempts - 1:
                raise
            time.sleep(0.2)
    return None


