"""The rooms behind :class:`toolkit.StateManager`, one concern each.

``state.py`` is a thin facade: each public verb delegates to one of these.

- ``pipeline``: the one write path (validate → one PostgreSQL transaction →
  Redis → memory; its unit is a batch of changes) and the read path (memory only
  while the invalidation listener is trusted, single-flight cold reads).
- ``workflows``: create, read, move, cancel and delete workflows; the roll-up.
- ``jobs``: create and read jobs; every status move, as named steps.
- ``idempotency``: creates under an idempotency key (the key taken first, a repeat replayed).
- ``dispatch``: assignment and ``dequeue`` (the Redis claim, then PostgreSQL decides).
- ``queues``: pausing and resuming a queue (PostgreSQL's record, Redis's mirror).
- ``workers``: registration, heartbeats, liveness and the reaper.
- ``counters``: metric counters, their checkpoints to PostgreSQL, and locks.
- ``retention``: purging finished jobs.
- ``recorded``: the settings that change the meaning of state, recorded in PostgreSQL.
- ``startup``: ``init_state_manager`` (connect, migrate, record, check Redis, rebuild).

Each module may use the tiers only through ``pipeline`` and the tiers' own
functions; none imports another concern except where its docstring says so.
"""
