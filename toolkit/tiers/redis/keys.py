"""Every Redis key of a namespace, and the only place that builds them.

All keys begin with the namespace as a hash tag, ``{ns}:``, so that every key
of one namespace lives in one Redis Cluster slot and multi-key Lua scripts
stay legal. Ids are used literally (they are never put in a SCAN pattern
except after the namespace prefix, with glob characters escaped).

=====================================  ==========  ==========================================
key                                    type        holds
=====================================  ==========  ==========================================
``{ns}:workflow:<id>``                 string      cached workflow: ``<version>|<json>``
``{ns}:job:<id>``                      string      cached job: ``<version>|<json>``
``{ns}:worker:<id>``                   string      cached worker: ``<version>|<json>``
``{ns}:assignment:<id>``               string      cached active assignment: ``<version>|<json>``
``{ns}:queue:<name>``                  zset        queued job ids; score = -priority*1e12 + seq
``{ns}:queues``                        set         names of queues that were ever used
``{ns}:scheduled:<name>``              zset        a queue's jobs not due yet (queued in
                                                   PostgreSQL with ``run_at`` in the future);
                                                   score = due time (unix seconds)
``{ns}:scheduled_meta``                hash        job id -> its score in the queue, for
                                                   the promotion (``promote_due.lua``)
``{ns}:paused``                        set         names of paused queues (mirror of PostgreSQL's
                                                   ``paused_queues``; the claim script skips them)
``{ns}:inflight``                      zset        job ids popped but not yet committed;
                                                   score = lease deadline (unix seconds)
``{ns}:inflight:meta``                 hash        job id -> ``<queue>|<score>`` to put it back
``{ns}:hb:<worker_id>``                string      last heartbeat (unix seconds), with TTL
``{ns}:heartbeats``                    zset        worker id -> last heartbeat (unix seconds)
``{ns}:hbhist:<worker_id>``            list        the worker's recent heartbeat times, newest first
``{ns}:boot``                          string      when this namespace's Redis data began
``{ns}:applied``                       hash        coordinator -> ``<safe>|<refreshed>|<run_id>``:
                                                   its commits before ``safe`` are all in Redis
``{ns}:rebuilt``                       string      when a rebuild last made Redis whole (a Redis
                                                   without it lost data: no fast start)
``{ns}:deleting``                      set         ``<kind>|<id>`` being deleted (noted before
                                                   the commit, removed when Redis has the delete)
``{ns}:lock:<name>``                   string      lock owner token, with PX expiry
``{ns}:fence:<name>``                  string      fencing counter of a lock (INCR)
``{ns}:fence:<name>:reserved``         string      tokens reserved in PostgreSQL up to here
``{ns}:metrics``                       hash        metric name -> total
``{ns}:metric:<name>:buckets``         hash        bucket start (unix seconds) -> count
``{ns}:invalidate``                    channel     ``<kind>|<version>|<id>``, or a JSON array of
                                                   ``[kind, version, id]`` for many, per write
=====================================  ==========  ==========================================
"""

from __future__ import annotations

from toolkit import models

ENTITY_KINDS = models.ENTITY_KINDS


def prefix(ns: str) -> str:
    """Return the hash-tag prefix every key of ``ns`` begins with."""
    return "{" + ns + "}:"


def entity(ns: str, kind: str, entity_id: str) -> str:
    """Return the cache key of one entity (``kind`` from :data:`ENTITY_KINDS`)."""
    return f"{prefix(ns)}{kind}:{entity_id}"


def entity_pattern(ns: str, kind: str) -> str:
    """Return the SCAN pattern matching every cached entity of ``kind``."""
    return f"{escape_glob(prefix(ns))}{kind}:*"


def namespace_pattern(ns: str) -> str:
    """Return the SCAN pattern matching every key of the namespace."""
    return f"{escape_glob(prefix(ns))}*"


def escape_glob(text: str) -> str:
    """Escape Redis glob characters so ``text`` matches only itself."""
    out = []
    for ch in text:
        if ch in "*?[]\\":
            out.append("\\")
        out.append(ch)
    return "".join(out)


def applied(ns: str) -> str:
    """Return the hash of each coordinator's applied watermark."""
    return f"{prefix(ns)}applied"


def rebuilt(ns: str) -> str:
    """Return the key a rebuild sets when it has made Redis whole."""
    return f"{prefix(ns)}rebuilt"


def async_commits(ns: str) -> str:
    """Return the key a coordinator committing with ``synchronous_commit = off`` sets first."""
    return f"{prefix(ns)}async_commits"


def crash_token(ns: str) -> str:
    """Return the key holding the token of the last rebuild's crash sentinel (PostgreSQL's)."""
    return f"{prefix(ns)}crash_token"


def deleting(ns: str) -> str:
    """Return the set of entities whose delete may not have reached Redis yet."""
    return f"{prefix(ns)}deleting"


def queue(ns: str, name: str) -> str:
    """Return the sorted-set key of a job queue."""
    return f"{prefix(ns)}queue:{name}"


def queues(ns: str) -> str:
    """Return the set of known queue names."""
    return f"{prefix(ns)}queues"


def scheduled(ns: str, name: str) -> str:
    """Return the due-time sorted set of a queue's scheduled jobs (score: due time)."""
    return f"{prefix(ns)}scheduled:{name}"


def scheduled_meta(ns: str) -> str:
    """Return the hash of the queue scores of scheduled jobs (job id -> score)."""
    return f"{prefix(ns)}scheduled_meta"
def paused_queues(ns: str) -> str:
    """Return the set of paused queue names (a mirror of PostgreSQL's ``paused_queues``)."""
    return f"{prefix(ns)}paused"


def inflight(ns: str) -> str:
    """Return the sorted set of popped-but-uncommitted job ids (score: lease deadline)."""
    return f"{prefix(ns)}inflight"


def inflight_meta(ns: str) -> str:
    """Return the hash that remembers where an in-flight job came from."""
    return f"{prefix(ns)}inflight:meta"


def heartbeat(ns: str, worker_id: str) -> str:
    """Return the per-worker heartbeat key (expires after the heartbeat TTL)."""
    return f"{prefix(ns)}hb:{worker_id}"


def heartbeats(ns: str) -> str:
    """Return the sorted set of last heartbeat times per worker."""
    return f"{prefix(ns)}heartbeats"


def heartbeat_history(ns: str, worker_id: str) -> str:
    """Return the list of a worker's recent heartbeat times (bounded)."""
    return f"{prefix(ns)}hbhist:{worker_id}"


def boot(ns: str) -> str:
    """Return the key holding when this namespace's Redis data began."""
    return f"{prefix(ns)}boot"


def rebuilding(ns: str) -> str:
    """Return the key holding the token of the rebuild going on (gone: Redis lost it)."""
    return f"{prefix(ns)}rebuilding"


def lock(ns: str, name: str) -> str:
    """Return the key of a distributed lock."""
    return f"{prefix(ns)}lock:{name}"


def fence(ns: str, name: str) -> str:
    """Return the fencing counter of a lock."""
    return f"{prefix(ns)}fence:{name}"


def fence_reserved(ns: str, name: str) -> str:
    """Return the key holding how far a lock's fencing tokens are reserved in PostgreSQL."""
    return f"{prefix(ns)}fence:{name}:reserved"


def metrics(ns: str) -> str:
    """Return the hash of metric totals."""
    return f"{prefix(ns)}metrics"


def metric_buckets(ns: str, name: str) -> str:
    """Return the hash of per-interval counts of one metric."""
    return f"{prefix(ns)}metric:{name}:buckets"


def invalidation_channel(ns: str) -> str:
    """Return the pub/sub channel that announces writes to other processes."""
    return f"{prefix(ns)}invalidate"
