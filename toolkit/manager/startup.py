"""Starting a StateManager: connect, migrate, record the settings, check Redis, rebuild.

``init_state_manager`` is re-exported by ``toolkit.state`` and ``toolkit``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from toolkit import config, errors, recovery
from toolkit.manager import recorded
from toolkit.retry_policy import Backoff, RetryPolicy, policy_setting
from toolkit.tiers.postgres import migrate
from toolkit.tiers.redis import eviction, watermark

if TYPE_CHECKING:
    from toolkit import state

log = logging.getLogger(__name__)

SUBSCRIBE_WAIT = 5.0
"""Seconds ``init_state_manager`` waits for the invalidation subscription before rebuilding."""


def init_state_manager(database_url: str | None = None, redis_url: str | None = None, *,
                       namespace: str = "wf", schema: str = "public",
                       heartbeat_ttl: float | None = None,
                       rebuild: bool | Literal["fast"] = True,
                       require_noeviction: bool = False,
                       retry_policy: RetryPolicy | Mapping[str, float] | Backoff | None = None,
                       synchronous_commit: Literal["on", "off"] = "on",
                       ) -> state.StateManager:
    """Connect, create or upgrade the schema, and rebuild memory and Redis from PostgreSQL.

    Parameters
    ----------
    database_url, redis_url
        Default to the environment variables ``DATABASE_URL`` and ``REDIS_URL``.
    namespace
        Prefix of every Redis key (as a hash tag).
    schema
        PostgreSQL schema of the tables.
    heartbeat_ttl
        Seconds after the last heartbeat at which a worker counts as dead.
        Recorded in PostgreSQL for the namespace (with the claim lease), where
        Inspectors and CLI commands read it; the last coordinator to start
        wins, and a warning is logged when it replaces a different value.
        ``None``: adopt the recorded TTL, or use and record 30 s when none is.
    rebuild
        ``True``: call :meth:`StateManager.rebuild` before returning. ``"fast"``: when
        Redis survived (every coordinator's watermark is there, from this Redis server
        run), check only what changed since Redis last agreed with PostgreSQL instead:
        the manager serves ``dequeue`` and reads at once, and memory fills as entities
        are read (``last_fast_start`` says what was checked); otherwise the full
        rebuild runs. ``False``: neither.
    require_noeviction
        Strict mode: refuse a Redis whose ``maxmemory-policy`` is not ``noeviction``
        (without it, such a Redis is only named in a warning, in the log and in
        ``check_consistency().warnings``). A Redis that will not show its CONFIG is
        warned about, not refused.
    retry_policy
        The default wait before a job's retry (``StateManager.retry_policy``): a
        ``RetryPolicy``, a dict of its fields, or a function ``attempt -> seconds``.
        ``None``: ``RetryPolicy()`` (1 s, doubling, capped at 300 s, ±10 % jitter).
    synchronous_commit
        ``"on"`` (the default): a write returns once PostgreSQL has flushed its commit to
        disk (the server's own setting is left alone). ``"off"``, opt-in: this manager's
        sessions run with PostgreSQL's ``synchronous_commit = off``, so a commit returns
        before its WAL is flushed (no step waits for the disk). What it can lose: when the
        PostgreSQL *server* crashes (or its machine loses power), the writes acknowledged in
        the last moments before, up to three times ``wal_writer_delay`` (600 ms by
        default), are gone from PostgreSQL, while Redis may still hold them. So the mode is
        noted in Redis before the first write, and after a crash recovery of the server
        (seen by its ``UNLOGGED`` crash sentinel) the next rebuild lets PostgreSQL win
        over every cached entry (``rebuild="fast"`` runs the full rebuild instead).
        Coordinators that ran on through the server's crash serve those entries until
        then: restart them, or call ``rebuild()`` on one (``check_consistency()`` warns
        meanwhile, and ``repair()`` runs the rebuild). A crash of the coordinator
        itself loses nothing, the data stays consistent, and other sessions see each
        commit at once, as with ``"on"``. Through a transaction pooler (PgBouncer), a
        session's ``SET`` is not kept to this manager's sessions: see the README.

    Raises
    ------
    ConfigurationError
        A URL is missing or malformed, or a setting is invalid, or (strict mode)
        Redis may evict keys.
    StorageUnavailable
        PostgreSQL or Redis cannot be reached (the message names host and port).
    """
    if rebuild not in (True, False, "fast"):
        raise errors.ConfigurationError(f"rebuild must be True, False or 'fast', not {rebuild!r}")
    settings = config.load_settings(
        database_url, redis_url, namespace=namespace, schema=schema,
        heartbeat_ttl=recorded.DEFAULT_HEARTBEAT_TTL if heartbeat_ttl is None else heartbeat_ttl,
        synchronous_commit=synchronous_commit)
    from toolkit.state import StateManager  # the facade imports this module

    try:
        policy = policy_setting(RetryPolicy() if retry_policy is None else retry_policy)
    except errors.ValidationError as exc:
        raise errors.ConfigurationError(str(exc)) from None
    sm = StateManager(settings, listen=False)
    sm.retry_policy = policy
    try:
        migrate.upgrade(sm.db)
        recorded.settle(sm._pipe, stated=heartbeat_ttl is not None, claim_lease=sm.claim_lease)
        sm.redis.call("ping", sm.redis.redis.ping)
        _check_eviction(sm, require_noeviction)
        if settings.synchronous_commit == "off":  # before any write that reaches Redis (the
            # migrations' and settle's commits do not): a rebuild must know. Fails closed.
            watermark.note_async_commits(sm.redis, sm.ns, time.time())
        sm._listener.start()
        if not sm._listener.wait_subscribed(SUBSCRIBE_WAIT):
            log.warning("no invalidation subscription after %.0fs: memory is not used until "
                        "there is one", SUBSCRIBE_WAIT, extra={"action": "invalidate"})
        sm._pipe.watermark.start()
        if rebuild:
            _recover(sm, rebuild == "fast")
    except BaseException:
        sm.close()
        raise
    return sm


def _recover(sm: state.StateManager, fast: bool) -> None:
    """The fast start when asked for and possible, else the full rebuild."""
    if fast:
        quick = recovery.fast_start(sm._pipe.tiers)
        if quick is not None:
            sm.last_fast_start = quick
            log.info("fast start: %s", quick, extra={"action": "rebuild"})
            return
        log.info("fast start not possible (no usable watermark in Redis): full rebuild",
                 extra={"action": "rebuild"})
    report = sm.rebuild()
    log.info("rebuilt from PostgreSQL: %s", report, extra={"action": "rebuild"})


def _check_eviction(sm: state.StateManager, strict: bool) -> None:
    """Name a Redis that may evict our keys (log), or refuse it in strict mode."""
    risk = sm.eviction_risk = eviction.read(sm.redis)
    if strict and risk.policy is not None and risk.policy != eviction.SAFE_POLICY:
        raise errors.ConfigurationError(f"require_noeviction: {risk.finding}")
    eviction.announce(risk)
