"""The rebuild a new coordinator runs: PostgreSQL is the truth, memory and Redis follow it.

``rebuild`` streams the live state out of PostgreSQL in bulk (one binary,
chunked query per entity kind, as tuples built into entities by
``models.from_row``), replaces memory, and reconciles Redis: cache fills that
never overwrite a newer version (``MSETNX`` per chunk into an emptied cache,
else MGET and versioned fills), every queued job in its queue exactly once,
nothing else in any queue, the paused queues mirrored, metric totals raised to their
checkpoints.
Its cost grows with the live state, not with the finished history.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import gc
import time
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import sqlalchemy as sa

from toolkit import compare, models
from toolkit.handles import Tiers
from toolkit.models import EntityKind as Kind
from toolkit.recovery import queues, repairing
from toolkit.tiers.memory import KINDS
from toolkit.tiers.postgres import records, store
from toolkit.tiers.redis import cache, heartbeats, keys, metrics, queue, watermark
from toolkit.tiers.redis.client import Client, Packable

FILL_CHUNK = 2_000
"""Cache entries per ``MSETNX`` of the rebuild."""
FILL_AHEAD = 4
"""Commands of the rebuild's fills that may wait to be sent (bounds the memory they hold)."""
REBUILDING_TTL_MS = 3_600_000
"""How long the token of a rebuild stays in Redis at most (it is deleted at the end)."""
SCAN_COUNT = 10_000
"""``COUNT`` of the rebuild's SCAN of the namespace."""
PROGRESS_STEP = 10_000
"""Rows between two updates of the rebuild's progress bar."""
PROGRESS_THRESHOLD = 50_000
"""Show a progress bar when the live state has at least this many rows."""


@dataclasses.dataclass(frozen=True)
class RebuildReport:
    """What a rebuild loaded: counts per entity kind and the time it took."""

    workflows: int
    jobs: int
    workers: int
    assignments: int
    queued: int
    seconds: float

    def __str__(self) -> str:
        return (f"{self.workflows} workflows, {self.jobs} live jobs ({self.queued} queued), "
                f"{self.workers} workers, {self.assignments} active assignments "
                f"in {self.seconds:.3f}s")

def _progress(total: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    show = total >= PROGRESS_THRESHOLD if enabled is None else enabled
    return tqdm(total=total, disable=not show, desc="rebuild", unit="row", leave=False)


class _Sender:
    """One thread that sends the rebuild's bulk commands, in order, while the rows are read.

    At most :data:`FILL_AHEAD` commands wait to be sent (they hold memory):
    :meth:`send` waits for the oldest beyond that. :meth:`close` drops the
    commands not sent yet (after an error nothing more is sent) and waits for
    the one being sent.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="rebuild-fill")
        self.waiting: collections.deque[Future[list[Any]]] = collections.deque()

    def send(self, action: str, command: list[Packable]) -> Future[list[Any]]:
        """Queue ``command`` (through :meth:`Client.call`); its future gives the replies."""
        future = self.pool.submit(self.client.call, action,
                                  functools.partial(self.client.send_packed, [command]))
        self.waiting.append(future)
        if len(self.waiting) > FILL_AHEAD:
            self.waiting.popleft().result()
        return future

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Fill:
    """The cache fill of one kind while its rows stream in (Redis emptied or restarted:
    the case to be fast).

    Each row is encoded from its values (:func:`cache.row_encoder`, the same
    bytes as :func:`cache.encode` of its entity) and written ``MSETNX`` per
    :data:`FILL_CHUNK`: one command that writes every entry of the chunk or,
    when one of its keys exists (an entry the scan saw, or one a writer created
    since), none. The chunks go out through ``sender``, so Redis works on
    one while the next is read. :meth:`finish` returns the entities of the
    refused chunks, for :func:`cache.fill_missing_or_older` (MGET, then ``SET
    NX`` for the absent and the versioned Lua fill for the older), so a newer
    value is never overwritten. The rows are live ones (:func:`store.stream_live`):
    none is final, so none needs the TTL of a final entry.
    """

    def __init__(self, ns: str, kind: str, sender: _Sender) -> None:
        self.sender = sender
        self.head, self.encode = keys.entity(ns, kind, ""), cache.row_encoder(kind)
        self.command: list[Packable] = ["MSETNX"]
        self.chunk: list[models.Entity] = []
        self.sent: list[tuple[Future[list[Any]], list[models.Entity]]] = []

    def add(self, entity: models.Entity, values: tuple[Any, ...]) -> None:
        self.command += (self.head + entity.id, self.encode(values))
        self.chunk.append(entity)
        if len(self.chunk) == FILL_CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self.chunk:
            return
        self.sent.append((self.sender.send("cache fill", self.command), self.chunk))
        self.command, self.chunk = ["MSETNX"], []

    def finish(self) -> list[models.Entity]:
        """Send the last chunk, wait for every reply (raising the first error); return the
        entities of the chunks ``MSETNX`` refused."""
        self.flush()
        refused: list[models.Entity] = []
        for future, chunk in self.sent:
            if not future.result()[0]:
                refused += chunk
        return refused


class _EarlyQueues:
    """The queues filled while the rows stream in, when the scan found no queue and nothing
    in flight (Redis emptied or restarted).

    Each queued job of the snapshot goes out ``ZADD NX`` (a score a writer set
    meanwhile is kept) per :data:`FILL_CHUNK`, through the fill's ``sender``, so
    Redis inserts while the next rows are read. The snapshot may be older than
    the queues by then: :func:`queues.drop_not_queued` then checks every job
    added here against PostgreSQL and takes out those no longer queued, before
    the queues are reconciled.
    """

    def __init__(self, ns: str, sender: _Sender) -> None:
        self.ns, self.sender = ns, sender
        self.commands: dict[str, list[Packable]] = {}
        self.filled: set[str] = set()
        self.sent: list[Future[list[Any]]] = []

    def add(self, name: str, job_id: str, score: float) -> None:
        command = self.commands.get(name)
        if command is None:
            command = self.commands[name] = ["ZADD", keys.queue(self.ns, name), "NX"]
            self.filled.add(name)
        command += (score, job_id)
        if len(command) >= 2 * FILL_CHUNK:
            self.flush(name)

    def flush(self, name: str) -> None:
        command = self.commands.pop(name, None)
        if command is not None:
            self.sent.append(self.sender.send("queue fill", command))

    def finish(self) -> set[str]:
        """Send what is left and wait for every reply (raising the first error); return the
        names of the queues filled (each with every job of its ``wanted``)."""
        for name in list(self.commands):
            self.flush(name)
        for future in self.sent:
            future.result()
        return self.filled


@dataclasses.dataclass
class _Snapshot:
    """What the rebuild read, and what is left to write after the read."""

    entities: dict[str, list[models.Entity]]
    wanted: compare.Wanted
    later: compare.Later
    checkpoints: dict[str, int]
    versioned: dict[str, list[models.Entity]]
    """Per kind, the entities still to go through the versioned cache fill."""
    filled: set[str]
    """The queues filled as the rows streamed in (:class:`_EarlyQueues`)."""


def _snapshot(t: Tiers, progress: bool | None, cached: Mapping[str, set[str]], empty: bool
              ) -> _Snapshot:
    """Read the live state in one REPEATABLE READ snapshot.

    A kind of which at most half as many entries were cached at the scan as it
    has live rows is cached as the rows stream in (:class:`_Fill`); the others
    (most cached: a crash with Redis intact) are left for the versioned fill.
    When no queue existed at the scan (``empty``), the queues are filled as the
    rows stream in too (:class:`_EarlyQueues`). After an error, the chunks not
    sent yet are dropped.
    """
    entities: dict[str, list[models.Entity]] = {}
    wanted: compare.Wanted = {}
    later: compare.Later = {}
    with t.db.begin("rebuild: read PostgreSQL") as conn:
        store.begin_snapshot(conn)
        counts = store.count_live(conn)
        with contextlib.closing(_Sender(t.redis)) as sender:
            fills = {kind: _Fill(t.ns, kind, sender) for kind in KINDS
                     if 2 * len(cached[kind]) <= counts[kind]}
            early = _EarlyQueues(t.ns, sender) if empty else None
            with contextlib.closing(_progress(sum(counts.values()), progress)) as bar:
                for kind in (Kind.WORKFLOW, Kind.WORKER, Kind.ASSIGNMENT, Kind.JOB):
                    entities[kind] = _read_live(conn, kind, bar, (wanted, later, early),
                                                fills.get(kind))
            checkpoints = records.metric_checkpoints(conn)
            versioned = {kind: fill.finish() for kind, fill in fills.items()}
            filled = early.finish() if early is not None else set()
    left: dict[str, list[models.Entity]] = {k: versioned.get(k, entities[k]) for k in KINDS}
    return _Snapshot(entities, wanted, later, checkpoints, left, filled)


def _read_live(conn: sa.Connection, kind: str, bar: Any,
               queued: tuple[compare.Wanted, compare.Later, _EarlyQueues | None],
               fill: _Fill | None) -> list[models.Entity]:
    """Build the live entities of ``kind`` (and note queued jobs in ``wanted`` or ``later``,
    and hand the due ones to ``early``; hand each entity and its row to ``fill``; each
    when given)."""
    wanted, later, early = queued
    columns = compare.live_columns(kind)
    out: list[models.Entity] = []
    append, build, score = out.append, models.row_builder(kind), queue.score
    i_id, i_status, i_queue, i_priority, i_seq, i_run_at = (
        columns.index(c) if c in columns else -1
        for c in ("id", "status", "queue", "priority", "enqueue_seq", "run_at"))
    is_job = kind == Kind.JOB
    step = 0
    now = time.time()
    for values in store.stream_live(conn, kind, columns):
        entity = build(values)
        append(entity)
        if fill is not None:
            fill.add(entity, values)
        if is_job and values[i_status] == "queued":
            if values[i_run_at] is None:  # the usual case, kept fast
                at = wanted.setdefault(values[i_queue], {})[values[i_id]] = score(
                    values[i_priority], values[i_seq] or 0)
                if early is not None:
                    early.add(values[i_queue], values[i_id], at)
            else:
                compare.place(wanted, later, (values[i_id], values[i_queue], values[i_priority],
                                              values[i_seq], values[i_run_at]), now)
                due = wanted.get(values[i_queue], {}).get(values[i_id])
                if early is not None and due is not None:
                    early.add(values[i_queue], values[i_id], due)
        step += 1
        if step == PROGRESS_STEP:
            bar.update(step)
            step = 0
    bar.update(step)
    return out


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector for the block; restore it as it was.

    The rebuild allocates millions of long-lived objects and no cycles (their
    memory is freed by reference counting). With the collector on, every
    full collection during the load walks every object loaded so far: 13-18 %
    of a rebuild of 500,000 live jobs on the test machine. It is process-wide
    for the seconds of the rebuild; cyclic garbage made meanwhile by other
    threads is collected after it.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def rebuild(t: Tiers, *, progress: bool | None = None) -> RebuildReport:
    """Reload memory from PostgreSQL and make Redis match it.

    Runs with the cyclic garbage collector paused (:func:`collector_paused`).

    Raises
    ------
    StorageUnavailable
        PostgreSQL or Redis failed; memory is left as it was if PostgreSQL failed.
    """
    with collector_paused():
        return _rebuild(t, progress)


def _rebuild(t: Tiers, progress: bool | None) -> RebuildReport:
    start = time.perf_counter()
    # The paused mirror first: a queue filled early is never served while its pause is missing.
    queues.restore_paused(t)
    token = _mark_rebuilding(t)
    # Before the snapshot, in one transaction: the crash sentinel's token, and a new one
    # unless it is the one Redis holds (lost: then PostgreSQL wins over every cached entry).
    lost, sentinel = _renew_sentinel(t)
    cached, empty = _scan_cache(t.redis, t.ns)
    read = _snapshot(t, progress, cached, empty)
    for kind in KINDS:
        t.memory.replace(kind, read.entities[kind])
    _fill_cache(t, read, cached, lost)
    checked = read.filled
    queues.drop_not_queued(t, {name: read.wanted.get(name, {}) for name in checked})
    if checked and not _still_rebuilding(t, token):
        # Redis lost its data during the rebuild: what was filled early is gone too.
        queues.restore_paused(t)
        checked = set()
    # A coordinator that crashed between a pop and its commit left claims in
    # flight: return them now rather than after their lease.
    queues.return_claims(t, before=float("inf"))
    queues.reconcile(t, read.wanted, read.later, checked=checked)
    metrics.raise_to(t.redis, t.ns, read.checkpoints)
    heartbeats.boot_time(t.redis, t.ns, time.time())
    watermark.mark_rebuilt(t.redis, t.ns, time.time())
    _publish_sentinel(t, sentinel)
    t.redis.call("rebuild done", lambda: t.redis.redis.delete(keys.rebuilding(t.ns)))
    return RebuildReport(
        workflows=len(read.entities[Kind.WORKFLOW]), jobs=len(read.entities[Kind.JOB]),
        workers=len(read.entities[Kind.WORKER]),
        assignments=len(read.entities[Kind.ASSIGNMENT]),
        queued=sum(len(v) for v in read.wanted.values()) + sum(len(v) for v in read.later.values()),
        seconds=time.perf_counter() - start,
    )


def _fill_cache(t: Tiers, read: _Snapshot, cached: Mapping[str, set[str]], lost: bool) -> None:
    """The versioned fills of what the snapshot read; then the cached entries it does not
    cover (jobs that became final or were deleted in a commit whose cache update was lost)
    are checked against PostgreSQL, and every cached entry when commits may be ``lost``
    (PostgreSQL wins, see :func:`repairing.fix_cache`)."""
    for kind in KINDS:
        cache.fill_missing_or_older(t.redis, t.ns, read.versioned[kind])
        if cached[kind]:
            live = set() if lost else {e.id for e in read.entities[kind]}
            others = sorted(i for i in cached[kind] if i not in live)
            if others:
                repairing.fix_cache(t, kind, others, pg_wins=lost)


def _renew_sentinel(t: Tiers) -> tuple[bool, str]:
    """Return whether PostgreSQL may have lost commits Redis holds, and this rebuild's crash
    sentinel token (PostgreSQL's ``crash_sentinel``, UNLOGGED: a crash recovery empties it).

    The token stays when it is the one Redis holds: no crash since the last rebuild ended,
    and rebuilds that overlap change nothing, so the two tokens differ only after a crash
    (or with Redis's token lost) until a rebuild that saw it ends. Otherwise a new token,
    written in the transaction that read the old one; Redis gets it when this rebuild ends
    (:func:`_publish_sentinel`); with commits asynchronous, PostgreSQL then wins."""
    noted = watermark.async_commits_noted(t.redis, t.ns)
    held = watermark.crash_token(t.redis, t.ns)
    with t.db.begin("rebuild: crash sentinel") as conn:
        token = records.renew_sentinel(conn, t.ns, uuid.uuid4().hex, keep=held)
    return noted and token != held, token


def _publish_sentinel(t: Tiers, token: str) -> None:
    """Give Redis this rebuild's sentinel ``token`` if PostgreSQL still holds it. If not, a
    crash emptied it since this rebuild began, or a rebuild that began later (and saw a crash,
    or Redis without a token) renewed it: Redis keeps its token, and the check and the next
    fast start see the difference until that rebuild, or another, ends."""
    with t.db.autocommit("rebuild: read the crash sentinel") as conn:
        current = records.sentinel(conn, t.ns)
    if current == token:
        watermark.set_crash_token(t.redis, t.ns, token)


def _mark_rebuilding(t: Tiers) -> str:
    """Write a token of this rebuild into Redis (kept an hour at most); return it."""
    token = uuid.uuid4().hex
    t.redis.call("rebuild mark", lambda: t.redis.redis.set(keys.rebuilding(t.ns), token,
                                                           px=REBUILDING_TTL_MS))
    return token


def _still_rebuilding(t: Tiers, token: str) -> bool:
    """Whether Redis still holds this rebuild's token (it lost nothing since the mark; another
    coordinator's rebuild replacing the token reads as a loss: a full reconcile, no harm)."""
    return bool(t.redis.call("rebuild check", lambda: t.redis.redis.get(keys.rebuilding(t.ns)))
                == token)


def _scan_cache(client: Client, ns: str) -> tuple[dict[str, set[str]], bool]:
    """One SCAN of the namespace, before the snapshot: per kind, the ids of the cached
    entities (it decides how each kind is filled, and which cached entities the
    snapshot does not cover); and whether no queue and no in-flight set exist."""
    heads = {kind: keys.entity(ns, kind, "") for kind in KINDS}
    cached: dict[str, set[str]] = {kind: set() for kind in KINDS}
    queue_head, inflight = keys.queue(ns, ""), keys.inflight(ns)
    empty = True
    with client.translate("cache scan"):
        for key in client.redis.scan_iter(match=keys.namespace_pattern(ns), count=SCAN_COUNT):
            for kind, head in heads.items():
                if key.startswith(head):
                    cached[kind].add(key[len(head):])
                    break
            else:
                if key.startswith(queue_head) or key == inflight:
                    empty = False
    return cached, empty
