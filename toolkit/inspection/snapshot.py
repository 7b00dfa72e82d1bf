"""Offline snapshots: every Inspector frame in a folder of Parquet files, reopened with no server.

Layout of a snapshot folder::

    manifest.json              time, namespace, schema, toolkit version, heartbeat_ttl (and
                               where the Inspector got it), events_since, row counts,
                               masked and sensitive_keys (never a URL)
    <frame>.parquet            workflows, jobs, workers, assignments, queue, locks, metrics,
                               metric_series (freq 1min), tiers, summary, events
    heartbeat_times.parquet    the heartbeat history Redis remembered (for heartbeat_gaps)
    dependencies.parquet       one row per dependency edge (for explain)
    paused.parquet             one row per paused queue (for queues and explain; absent from
                               snapshots taken before pausing existed: read as no pause)
    actions.parquet            Inspector.actions(), the bulk operator actions (filters masked
                               unless unmask; absent from older snapshots: read as none)

The frames are read one after the other from a live system, so they are a
sequence of consistent reads, not one transaction. ``tiers`` has its memory
columns empty: a snapshot describes the servers, not a process.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import pandas as pd

from toolkit import errors, masking, validate
from toolkit.inspection import analytics, frames, search, series

if TYPE_CHECKING:
    from collections.abc import Iterable

SNAPSHOT_FORMAT = 1
FRAMES = ("workflows", "jobs", "workers", "assignments", "queue", "locks", "metrics", "tiers",
          "summary", "events")
"""Frames with a fixed schema stored in a snapshot (plus ``metric_series`` and the internal ones)."""
SERIES_FREQ = "1min"
"""The resolution ``metric_series`` is stored at; a snapshot can resample it coarser only."""


MASKED_FRAMES = ("workflows", "jobs", "workers")
"""Frames read with the snapshot's ``unmask`` (``events`` too; the others hold no JSON values)."""


def write(ins: analytics.Analytics, path: Path, *, events_since: datetime | None,
          overwrite: bool = False, unmask: bool = False) -> Path:
    """Write ``ins``'s frames to ``path``; see :meth:`toolkit.Inspector.snapshot`."""
    import toolkit

    if path.exists() and not path.is_dir():
        raise errors.ValidationError("path", str(path), "is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise errors.ValidationError("path", str(path), "is not empty: choose a new folder, or "
                                     "overwrite it (overwrite=True, CLI --force)")
    path.mkdir(parents=True, exist_ok=True)
    taken = pd.Timestamp.now(tz="UTC")
    data: dict[str, pd.DataFrame] = {name: getattr(ins, name)(**(
        {"unmask": unmask} if name in MASKED_FRAMES else {})) for name in FRAMES if name != "events"}
    data["events"] = ins.events(since=events_since, unmask=unmask)
    data["metric_series"] = getattr(ins, "metric_series")(freq=SERIES_FREQ)  # noqa: B009
    data["heartbeat_times"] = ins._heartbeat_times()
    data["dependencies"] = ins._dependencies()
    data["paused"] = ins._paused()
    data["actions"] = getattr(ins, "actions")(unmask=unmask)  # noqa: B009 - not on Analytics
    tiers = data["tiers"].copy()
    tiers["in_memory"] = pd.Series(pd.NA, index=tiers.index, dtype="boolean")
    tiers["memory_version"] = pd.Series(pd.NA, index=tiers.index, dtype="Int64")
    data["tiers"] = tiers
    for name, frame in data.items():
        frame.to_parquet(path / f"{name}.parquet", engine="pyarrow")
    settings = getattr(ins, "settings", None)
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "taken_at": taken.isoformat(),
        "namespace": getattr(ins, "ns", None),
        "schema": getattr(settings, "schema", None) if settings is not None else getattr(ins, "schema", None),
        "heartbeat_ttl": ins.heartbeat_ttl,
        "heartbeat_ttl_source": getattr(ins, "heartbeat_ttl_source", None),
        "events_since": events_since.isoformat() if events_since is not None else None,
        "toolkit_version": toolkit.__version__,
        "rows": {name: len(frame) for name, frame in sorted(data.items())},
        "masked": not unmask,
        "sensitive_keys": list(ins.masker.keys),
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _restore(name: str, frame: pd.DataFrame) -> pd.DataFrame:
    """Give a frame read from Parquet exactly its schema again (categories, string, UTC, index)."""
    index_name, columns = frames.SCHEMAS[name]
    if frame.empty:
        return frames.empty(name)
    out = frame.astype(dict(columns))
    out.index = pd.Index(frame.index.astype(frames.INDEX_DTYPES.get(name, frames.STRING)),
                         name=index_name)
    return out[list(columns)]


def _live_only(what: str) -> NoReturn:
    raise errors.ToolkitError(f"{what} needs a live server: this Inspector reads an offline "
                              "snapshot (open toolkit.Inspector(...) against the servers)")


class SnapshotInspector(analytics.Analytics):
    """The Inspector's methods over a snapshot folder, with no server.

    Made by :meth:`toolkit.Inspector.from_snapshot`. Frames come back with the
    columns and dtypes of the live ones; ages and "now" are as of the
    snapshot time (``taken_at``). Anything that needs a connection raises
    :class:`~toolkit.ToolkitError`.
    """

    def __init__(self, path: Path, *, unmask: bool = False,
                 sensitive_keys: Iterable[str] | str | None = None) -> None:
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise errors.ValidationError("path", str(path), "is not a toolkit snapshot (no manifest.json)")
        self.path = path
        self.unmask = bool(unmask)
        self.masker = masking.Masker(masking.sensitive_keys(sensitive_keys))
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        self.ns = str(self.manifest["namespace"])
        self.schema = str(self.manifest["schema"])
        self.heartbeat_ttl = float(self.manifest["heartbeat_ttl"])
        self.heartbeat_ttl_source = (f"the snapshot's manifest ("
                                     f"{self.manifest.get('heartbeat_ttl_source') or 'source not kept'})")
        self.taken_at = pd.Timestamp(self.manifest["taken_at"]).tz_convert("UTC")
        self._frames: dict[str, pd.DataFrame] = {}
        for name in (*FRAMES, *frames.INTERNAL_FRAMES):
            self._frames[name] = _restore(name, pd.read_parquet(path / f"{name}.parquet"))
        series = pd.read_parquet(path / "metric_series.parquet")
        # Parquet keeps neither the index name nor its frequency
        index = pd.DatetimeIndex(series.index, name="time")
        series.index = pd.DatetimeIndex(index, freq=SERIES_FREQ, name="time") if len(index) else index
        self._series = series.astype("Int64") if len(series.columns) else series

    def __repr__(self) -> str:
        return (f"SnapshotInspector(path={str(self.path)!r}, namespace={self.ns!r}, "
                f"schema={self.schema!r}, taken_at={self.taken_at.isoformat()!r})")

    def _get(self, name: str) -> pd.DataFrame:
        return self._frames[name].copy()

    @property
    def _db(self) -> NoReturn:
        _live_only("PostgreSQL access")

    @property
    def _redis(self) -> NoReturn:
        _live_only("Redis access")

    def close(self) -> None:
        """Nothing to close: a snapshot holds no connection."""

    def __enter__(self) -> SnapshotInspector:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _now(self) -> pd.Timestamp:
        return self.taken_at

    def workflows(self, *, unmask: bool | None = None) -> pd.DataFrame:
        """Stored ``Inspector.workflows()`` (masked as the live one)."""
        return self._masked("workflows", self._get("workflows"), unmask)

    def jobs(self, workflow_id: str | None = None, status: str | None = None, *,
             payload: dict[str, Any] | None = None, payload_columns: dict[str, str] | None = None,
             limit: int | None = None, unmask: bool | None = None) -> pd.DataFrame:
        """Stored ``Inspector.jobs()``, filtered, searched and masked like the live one.

        A snapshot written masked (``manifest["masked"]``) has no secret to unmask,
        and a search by a masked value finds nothing.
        """
        q = search.query(workflow_id, status, payload, payload_columns, limit)
        return search.finish(self._masked("jobs", search.select(self._get("jobs"), q), unmask), q)

    def workers(self, *, unmask: bool | None = None) -> pd.DataFrame:
        """Stored ``Inspector.workers()`` (ages as of the snapshot time, masked as the live one)."""
        return self._masked("workers", self._get("workers"), unmask)

    def assignments(self, job_id: str | None = None, worker_id: str | None = None) -> pd.DataFrame:
        """Stored ``Inspector.assignments()``, filtered like the live one."""
        df = self._get("assignments")
        for field, value in (("job_id", job_id), ("worker_id", worker_id)):
            if value is not None:
                df = df[df[field] == validate.identifier(field, value)]
        return df

    def queue(self) -> pd.DataFrame:
        """Stored ``Inspector.queue()``."""
        return self._get("queue")

    def locks(self) -> pd.DataFrame:
        """Stored ``Inspector.locks()``."""
        return self._get("locks")

    def metrics(self) -> pd.DataFrame:
        """Stored ``Inspector.metrics()``."""
        return self._get("metrics")

    def tiers(self) -> pd.DataFrame:
        """Stored ``Inspector.tiers()`` (memory columns empty)."""
        return self._get("tiers")

    def summary(self) -> pd.DataFrame:
        """Stored ``Inspector.summary()``."""
        return self._get("summary")

    def events(self, since: datetime | None = None, job_id: str | None = None,
               workflow_id: str | None = None, worker_id: str | None = None, *,
               unmask: bool | None = None) -> pd.DataFrame:
        """Stored ``Inspector.events()`` (from ``manifest['events_since']``), filtered like the live one."""
        start = analytics.check_since(since)
        df = self._get("events")
        for column, value in analytics.check_event_filters(job_id, workflow_id, worker_id).items():
            if value is not None:
                df = df[df[column] == value]
        return self._masked("events", df[df["at"] >= start] if start is not None else df, unmask)

    def metric_series(self, names: str | Iterable[str] | None = None, freq: str = SERIES_FREQ, *,
                      since: datetime | None = None, until: datetime | None = None) -> pd.DataFrame:
        """Stored ``Inspector.metric_series()``, checked and cut like the live one.

        Raises
        ------
        ValidationError
            As the live one: an unknown name, ``freq`` not a whole number of
            minutes, or a bad window.
        """
        wanted = series.wanted_names(names, [*self._series.columns, *self._get("metrics").index])
        offset = series.offset(freq)
        start, end = series.window(since, until)
        out = series.cut(self._series.reindex(columns=wanted, fill_value=0).astype("Int64"), start, end)
        if out.empty:
            return series.empty(wanted)
        if offset == pd.tseries.frequencies.to_offset(SERIES_FREQ):
            return out
        resampled = out.resample(offset).sum().astype("Int64")
        resampled.index.name = "time"
        return resampled

    def actions(self, *, unmask: bool | None = None) -> pd.DataFrame:
        """Stored ``Inspector.actions()`` (empty for a snapshot taken before it was stored).

        Filters are masked as the live frame's; a snapshot written masked has no
        secret to unmask.
        """
        stored = self.path / "actions.parquet"
        if not stored.is_file():
            return frames.empty("actions")
        df = _restore("actions", pd.read_parquet(stored))
        if not (self.unmask if unmask is None else unmask):
            df["filter"] = df["filter"].map(self.masker.text).astype("string")
        return df

    def _heartbeat_times(self) -> pd.DataFrame:
        return self._get("heartbeat_times")

    def _paused(self) -> pd.DataFrame:
        stored = self.path / "paused.parquet"
        return _restore("paused", pd.read_parquet(stored)) if stored.is_file() else frames.empty("paused")

    def _dependencies(self) -> pd.DataFrame:
        return self._get("dependencies")
