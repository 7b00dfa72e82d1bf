"""Inspector: every tier as a typed pandas DataFrame, read-only.

PostgreSQL is read through ``READ ONLY`` transactions (the server refuses a
write), one bulk ``COPY`` per frame parsed by Arrow. Redis is read with read
commands only (GET, MGET, HGETALL, ZRANGE, SCAN with a budget, PTTL), never
KEYS. An Inspector never writes, so it is safe against a live coordinator.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd

from toolkit import compare, config, masking, models, validate
from toolkit.handles import Tiers
from toolkit.inspection import actions, analytics, frames, live, paused, recorded, search, target
from toolkit.tiers.memory import Memory
from toolkit.tiers.postgres import export
from toolkit.tiers.postgres.db import Database
from toolkit.tiers.redis import eviction, heartbeats
from toolkit.tiers.redis.client import Client

if TYPE_CHECKING:
    from toolkit.inspection.snapshot import SnapshotInspector


class _Bound(Protocol):
    """What an Inspector needs of a StateManager: its settings and its memory tier."""

    @property
    def settings(self) -> config.Settings: ...

    @property
    def memory(self) -> Memory: ...


SCAN_BUDGET = live.SCAN_BUDGET

class Inspector(live.RedisFrames, analytics.Analytics, actions.Actions):
    """Read-only views of the coordinator's state as DataFrames.

    Parameters
    ----------
    database_url, redis_url
        Default to ``DATABASE_URL`` and ``REDIS_URL``.
    namespace, schema
        The Redis namespace and PostgreSQL schema to look at.
    heartbeat_ttl
        Seconds without a heartbeat after which a worker counts as dead
        (liveness in ``workers()``, ``explain()``, the dashboard, Prometheus).
        Default: the TTL the coordinator recorded in PostgreSQL for this
        namespace (re-read every few seconds), or 30 when none is recorded
        (logged as a warning; ``heartbeat_ttl_source`` says which). An
        Inspector bound to a StateManager uses the manager's TTL.
    unmask
        Show sensitive payload, result and metadata values (:mod:`toolkit.masking`);
        default False: they read ``"***"``. Each method's ``unmask`` overrides it.
    sensitive_keys
        Keys to mask besides the defaults (``"-name"`` drops one); default ``$TOOLKIT_SENSITIVE_KEYS``.

    Examples
    --------
    >>> ins = toolkit.Inspector(namespace="wf")          # doctest: +SKIP
    >>> ins.jobs(status="queued").groupby("queue").size()  # doctest: +SKIP
    """

    def __init__(self, database_url: str | None = None, redis_url: str | None = None, *,
                 namespace: str = "wf", schema: str = "public",
                 heartbeat_ttl: float | None = None, unmask: bool = False,
                 sensitive_keys: Iterable[str] | str | None = None) -> None:
        self.settings = config.load_settings(database_url, redis_url, namespace=namespace,
                                             schema=schema)
        self.unmask = bool(unmask)
        self.masker = masking.Masker(masking.sensitive_keys(sensitive_keys))
        if heartbeat_ttl is not None:
            config.validate_seconds("heartbeat_ttl", heartbeat_ttl)
        self.ns = namespace
        self._db = Database(self.settings.database_url, schema, read_only=True, pool_size=2)
        self._redis = Client(self.settings.redis_url, read_only=True, namespace=namespace)
        self._memory: Memory | None = None
        self._eviction: eviction.EvictionRisk | None = None
        self._ttl_given = None if heartbeat_ttl is None else float(heartbeat_ttl)
        self._recorded = recorded.Cache(self._db, namespace)

    @property
    def heartbeat_ttl(self) -> float:
        """The heartbeat TTL liveness is judged with (given, or recorded by the coordinator)."""
        if self._ttl_given is not None:
            return self._ttl_given
        return self._recorded.get().heartbeat_ttl

    @heartbeat_ttl.setter
    def heartbeat_ttl(self, value: float) -> None:
        self._ttl_given = config.validate_seconds("heartbeat_ttl", value)

    @property
    def heartbeat_ttl_source(self) -> str:
        """Where :attr:`heartbeat_ttl` comes from, in words."""
        if self._ttl_given is not None:
            return f"given: {self._ttl_given}s"
        return self._recorded.get().source

    @classmethod
    def _bound(cls, sm: _Bound) -> Inspector:
        s = sm.settings
        ins = cls(s.database_url, s.redis_url, namespace=s.namespace, schema=s.schema,
                  heartbeat_ttl=s.heartbeat_ttl)
        ins._memory = sm.memory
        return ins

    @staticmethod
    def from_snapshot(path: str | Path, *, unmask: bool = False,
                      sensitive_keys: Iterable[str] | str | None = None) -> SnapshotInspector:
        """Reopen a folder written by :meth:`snapshot`, with no server.

        The result has the same frame methods, columns and dtypes, plus
        ``events``, ``timeline``, ``explain``, ``heartbeat_gaps`` and
        ``wait_times`` computed from the stored data, as of the snapshot time,
        masked (``unmask``, ``sensitive_keys``) as a live Inspector.

        Raises
        ------
        ValidationError
            ``path`` is not a snapshot folder.
        """
        from toolkit.inspection.snapshot import SnapshotInspector

        return SnapshotInspector(Path(path), unmask=unmask, sensitive_keys=sensitive_keys)

    def __repr__(self) -> str:
        return (f"Inspector(database={config.mask_url(self.settings.database_url)!r}, "
                f"redis={config.mask_url(self.settings.redis_url)!r}, namespace={self.ns!r}, "
                f"schema={self.settings.schema!r}, memory={self._memory is not None})")

    def close(self) -> None:
        """Close the Inspector's connections."""
        self._db.dispose()
        self._redis.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- PostgreSQL frames ------------------------------------------------------------------

    def jobs(self, workflow_id: str | None = None, status: str | None = None, *,
             payload: dict[str, Any] | None = None, payload_columns: dict[str, str] | None = None,
             limit: int | None = None, unmask: bool | None = None) -> pd.DataFrame:
        """One row per job (index ``job_id``), with ``wait_s`` and ``duration_s``.

        ``wait_s`` is the queue wait of the job's latest attempt: from the event that
        made it queued to its ``assigned`` event (what ``wait_times()`` measures),
        never time pending on a dependency or spent in earlier attempts; NA for a
        job that is pending or queued now, or was never assigned. ``duration_s`` is
        ``finished_at - started_at``.

        ``payload``, ``result`` are JSON text (``frame.payload.map(json.loads)`` for
        objects); values of sensitive keys (:mod:`toolkit.masking`) read ``"***"``
        unless ``unmask=True`` (default: the Inspector's ``unmask``).
        ``payload={"customer": {"plan": "pro"}}`` keeps the jobs whose payload
        contains that (JSONB ``@>``, a bound parameter served by a GIN index).
        ``payload_columns={"plan": "customer.plan"}`` adds a column per dotted path
        (``"tags.0"`` indexes a list; NA where the path is missing). ``limit`` caps
        the rows (oldest first); ``frame.attrs["capped"]`` says whether more matched
        (a capped frame also logs a warning).

        Raises
        ------
        ValidationError
            A bad ``status`` or ``workflow_id``; ``payload`` not a dict of JSON values,
            ``payload_columns`` not ``{name: path}``, ``limit`` not a positive int.
        """
        q = search.query(workflow_id, status, payload, payload_columns, limit)
        return search.finish(self._masked("jobs", search.read_jobs(self._db, q), unmask), q)

    def workflows(self, *, unmask: bool | None = None) -> pd.DataFrame:
        """One row per workflow (index ``workflow_id``), job counts per status, ``metadata`` masked."""
        cols = {"id": "workflow_id", "name": "name", "status": "status", "version": "version",
                "metadata": "metadata", "created_at": "created_at", "updated_at": "updated_at"}
        df = frames.from_arrow(export.select(self._db, "workflows", cols, order=("created_at", "id")))
        if df.empty:
            return frames.empty("workflows")
        for col in ("created_at", "updated_at"):
            df[col] = frames.epoch_us_to_utc(df[col])
        counts = frames.from_arrow(export.job_counts(self._db))
        table = (counts.pivot(index="workflow_id", columns="status", values="n") if len(counts)
                 else pd.DataFrame())
        for s in models.JobStatus:
            per_status = table[s.value] if s.value in table else pd.Series(dtype="Int64")
            df[f"jobs_{s.value}"] = df["workflow_id"].map(per_status).fillna(0).astype("Int64")
        df["jobs_total"] = df[[f"jobs_{s.value}" for s in models.JobStatus]].sum(axis=1)
        df["idempotency_key"] = frames.key_column(df["workflow_id"],
                                                  export.idempotency_keys(self._db, "workflow"))
        return self._masked("workflows", frames.conform("workflows", df), unmask)

    def workers(self, *, unmask: bool | None = None) -> pd.DataFrame:
        """One row per worker (index ``worker_id``), liveness from heartbeats, ``metadata`` masked."""
        cols = {"id": "worker_id", "hostname": "hostname", "status": "status",
                "capacity": "capacity", "queues": "queues", "version": "version",
                "metadata": "metadata", "last_heartbeat": "last_heartbeat",
                "registered_at": "registered_at"}
        df = frames.from_arrow(export.select(self._db, "workers", cols, order=("registered_at", "id")))
        if df.empty:
            return frames.empty("workers")
        for col in ("last_heartbeat", "registered_at"):
            df[col] = frames.epoch_us_to_utc(df[col])
        seen = heartbeats.last_seen(self._redis, self.ns)
        pg_seen = df["last_heartbeat"].map(lambda t: t.timestamp() if pd.notna(t) else 0.0)
        last = [max(seen.get(w, 0.0), p) for w, p in zip(df["worker_id"], pg_seen, strict=True)]
        df["last_heartbeat"] = frames.epoch_us_to_utc([int(x * 1e6) if x else None for x in last])
        now = time.time()
        df["heartbeat_age_s"] = pd.Series([now - x if x else None for x in last], dtype="Float64")
        df["alive"] = pd.Series([w in seen and now - seen[w] <= self.heartbeat_ttl
                                 for w in df["worker_id"]], dtype="boolean")
        active = frames.from_arrow(export.select(self._db, "job_assignments", {"worker_id": "worker_id"},
                                          where={"status": "active"}))
        per = active["worker_id"].value_counts() if len(active) else pd.Series(dtype="int64")
        df["active_jobs"] = df["worker_id"].map(per).fillna(0).astype("Int64")
        return self._masked("workers", frames.conform("workers", df), unmask)

    def assignments(self, job_id: str | None = None, worker_id: str | None = None) -> pd.DataFrame:
        """One row per assignment (index ``assignment_id``): every attempt of every job."""
        for field, value in (("job_id", job_id), ("worker_id", worker_id)):
            if value is not None:
                validate.identifier(field, value)
        cols = {"id": "assignment_id", "job_id": "job_id", "worker_id": "worker_id",
                "status": "status", "attempt": "attempt", "assigned_at": "assigned_at",
                "finished_at": "finished_at"}
        df = frames.from_arrow(export.select(self._db, "job_assignments", cols,
                                      where={"job_id": job_id, "worker_id": worker_id},
                                      order=("assigned_at", "id")))
        if df.empty:
            return frames.empty("assignments")
        for col in ("assigned_at", "finished_at"):
            df[col] = frames.epoch_us_to_utc(df[col])
        df["duration_s"] = frames.seconds_between(df["finished_at"], df["assigned_at"])
        return frames.conform("assignments", df)

    def events(self, since: datetime | None = None, job_id: str | None = None,
               workflow_id: str | None = None, worker_id: str | None = None, *,
               unmask: bool | None = None) -> pd.DataFrame:
        """The job event log, one row per event (index ``event_id``), oldest first.

        Every filter is pushed into SQL as a bound parameter. ``event`` is a
        category of every event name (:data:`frames.EVENTS`), ``status`` the
        job's new status, ``attempt`` its attempts count, ``detail`` JSON text
        (``error`` of a failure; ``rule``, ``heartbeat_age_s`` of a reclaim), its
        sensitive keys masked unless ``unmask``.

        Raises
        ------
        ValidationError
            ``since`` is not a timezone-aware datetime or an id filter is not an id.
        """
        start = analytics.check_since(since)
        equal = analytics.check_event_filters(job_id, workflow_id, worker_id)
        df = frames.from_arrow(export.job_events(self._db, since=start, equal=equal))
        if df.empty:
            return frames.empty("events")
        df["at"] = frames.epoch_us_to_utc(df["at"])
        return self._masked("events", frames.conform("events", df), unmask)

    def _heartbeat_times(self) -> pd.DataFrame:
        ids = list(self.workers().index)
        hist = heartbeats.history(self._redis, self.ns, ids)
        rows = [(w, t) for w in ids for t in hist.get(w, [])]
        if not rows:
            return frames.empty("heartbeat_times")
        return frames.conform("heartbeat_times", {
            "worker_id": [w for w, _ in rows],
            "at": frames.epoch_us_to_utc([round(t * 1e6) for _, t in rows]).to_numpy()})

    def _dependencies(self) -> pd.DataFrame:
        df = frames.from_arrow(export.dependencies(self._db))
        return frames.conform("dependencies", df) if len(df) else frames.empty("dependencies")

    def _now(self) -> pd.Timestamp:
        return pd.Timestamp.now(tz="UTC")

    def _paused(self) -> pd.DataFrame:
        return paused.read(self._db)

    # -- what this Inspector points at -------------------------------------------------------

    def check_target(self) -> list[str]:
        """Check the schema and namespace this Inspector reads; return notes for the operator.

        Reads only. The notes say in plain words when the namespace holds no
        key in Redis or the schema no workflow, job or worker (a typo looks
        like an outage otherwise: every worker ``alive=False``, every queue
        empty). The CLI prints them to stderr.

        Raises
        ------
        SetupError
            The schema has no toolkit tables (nothing is created), or the
            database, role or password is wrong.
        """
        target.require_tables(self._db)
        return target.notes(self._db, self._redis, self.ns)

    def check_consistency(self) -> compare.ConsistencyReport:
        """Compare Redis with PostgreSQL, like ``StateManager.check_consistency`` but reads only.

        There is no memory tier to judge: this Inspector belongs to no coordinator.
        """
        return compare.check(Tiers(self._db, self._redis, self.ns, Memory()))

    def purgeable(self, older_than: float, statuses: list[str]) -> int:
        """How many jobs ``StateManager.purge(older_than, statuses=...)`` would remove now."""
        return target.purgeable(self._db, older_than, statuses, self._now().to_pydatetime())

    # -- across tiers ----------------------------------------------------------------------

    @property
    def eviction_risk(self) -> eviction.EvictionRisk:
        """What Redis says about evicting keys (read once, and logged once when risky).

        Its ``finding`` names a ``maxmemory-policy`` other than ``noeviction``,
        used memory near ``maxmemory``, or a CONFIG this client may not read.
        """
        if self._eviction is None:
            self._eviction = eviction.read(self._redis)
            eviction.announce(self._eviction)
        return self._eviction

    def tiers(self) -> pd.DataFrame:
        """Per entity: present and version in memory (when bound), Redis and PostgreSQL.

        Logs a warning first when Redis may evict keys (see :attr:`eviction_risk`).
        """
        self.eviction_risk  # noqa: B018 - read once: named before Redis is trusted
        memory = self._memory if self._memory is not None else Memory()
        rows = compare.compare_all(Tiers(self._db, self._redis, self.ns, memory),
                                   with_memory=self._memory is not None)
        if not rows:
            return frames.empty("tiers")
        return frames.conform("tiers", pd.DataFrame(rows))

    def summary(self) -> pd.DataFrame:
        """A status board of counts (index ``item``, ``value`` Int64); ``queues()`` names the paused.

        ``jobs_queued`` counts every queued job; ``jobs_scheduled`` those of them whose
        ``run_at`` is still in the future (scheduled, or a retry backing off);
        ``jobs_orphan_capped`` the jobs the orphan cap failed (``sm.orphan_cap``).
        """
        jobs = frames.from_arrow(export.select(self._db, "jobs", {"status": "status"}))
        counts = jobs["status"].value_counts() if len(jobs) else pd.Series(dtype="int64")
        workers = self.workers()
        wf = frames.from_arrow(export.select(self._db, "workflows", {"status": "status"}))
        wf_counts = wf["status"].value_counts() if len(wf) else pd.Series(dtype="int64")
        q = self.queue()
        items: dict[str, int] = {"workflows": len(wf)}
        items.update({f"workflows_{s.value}": int(wf_counts.get(s.value, 0))
                      for s in models.WorkflowStatus})
        items["jobs"] = len(jobs)
        items.update({f"jobs_{s.value}": int(counts.get(s.value, 0)) for s in models.JobStatus})
        items["jobs_scheduled"] = export.scheduled_count(self._db)
        items["workers"] = len(workers)
        items["workers_alive"] = int(workers["alive"].sum()) if len(workers) else 0
        items["queue_depth"] = int((~q["in_flight"]).sum()) if len(q) else 0
        items["in_flight"] = int(q["in_flight"].sum()) if len(q) else 0
        items["queues_paused"] = len(self._paused())
        items["oldest_queued_age_s"] = self._oldest_queued_age()
        items["jobs_orphan_capped"] = self._counter("jobs_orphan_capped")
        return frames.conform("summary", {"item": list(items), "value": list(items.values())})

    def _counter(self, name: str) -> int:
        """A counter as Prometheus shows it: the larger of Redis and its checkpoint (0 if none)."""
        m = self.metrics()
        if name not in m.index:
            return 0
        row = m.loc[[name], ["value", "checkpoint"]].astype("Float64").max(axis=1, skipna=True)
        return 0 if pd.isna(row.iloc[0]) else int(row.iloc[0])

    def _oldest_queued_age(self) -> int:
        """Whole seconds since the oldest queued job was last updated (0 when none is queued)."""
        return max(0, export.oldest_queued_age(self._db))

    def _repr_html_(self) -> str:
        s = self.summary()["value"]
        cells = []
        for label, key in (("workflows", "workflows"), ("running", "workflows_running"),
                           ("jobs queued", "jobs_queued"), ("jobs running", "jobs_running"),
                           ("jobs failed", "jobs_failed"), ("jobs completed", "jobs_completed"),
                           ("workers alive", "workers_alive"), ("queue depth", "queue_depth")):
            value = s.get(key, np.nan)
            cells.append(f"<td style='padding:4px 12px;text-align:center'><b style='font-size:1.4em'>"
                         f"{int(value) if pd.notna(value) else '-'}</b><br>{html.escape(label)}</td>")
        title = html.escape(repr(self))
        return f"<table title='{title}'><tr>{''.join(cells)}</tr></table>"
