"""The jobs frame's search (payload containment, payload columns, a row cap) and frame masking.

Reads only. The live Inspector pushes a payload filter into PostgreSQL
(``payload @> %s::jsonb``, a bound parameter served by the GIN index of
migration 0007); a snapshot applies the same containment rule in Python
(:func:`contains`), so both answer alike. Masking (:mod:`toolkit.masking`) is
applied to the JSON text columns of a frame after it is read and before
payload columns are pulled out, so a sensitive path comes out masked too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from toolkit import errors, masking, models, validate
from toolkit.inspection import frames
from toolkit.tiers.postgres import export
from toolkit.tiers.postgres.db import Database

log = logging.getLogger(__name__)

MASKED_COLUMNS: Mapping[str, tuple[str, ...]] = {
    "jobs": ("payload", "result"), "workflows": ("metadata",), "workers": ("metadata",),
    "events": ("detail",), "timeline": ("detail",)}
"""The JSON text columns of each frame that :func:`mask_frame` masks."""


@dataclasses.dataclass(frozen=True)
class Query:
    """A validated ``jobs()`` selection: filters, payload filter, payload columns, row cap."""

    workflow_id: str | None = None
    status: str | None = None
    payload: dict[str, Any] | None = None
    columns: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    limit: int | None = None

    @property
    def payload_json(self) -> str | None:
        """The payload filter as JSON text (bound as a parameter, never formatted into SQL)."""
        return None if self.payload is None else json.dumps(self.payload)

    @property
    def fetch(self) -> int | None:
        """Rows to read: one more than the cap, so a capped result is known to be capped."""
        return None if self.limit is None else self.limit + 1


def query(workflow_id: Any = None, status: Any = None, payload: Any = None,
          payload_columns: Any = None, limit: Any = None) -> Query:
    """Validate the arguments of ``jobs()``.

    Raises
    ------
    ValidationError
        A bad id or status; ``payload`` not a dict of JSON values; ``payload_columns``
        not ``{new column: "dotted.path"}``; ``limit`` not a positive int.
    """
    if workflow_id is not None:
        validate.identifier("workflow_id", workflow_id)
    if status is not None:
        status = validate.status("status", status, models.JobStatus).value
    if payload is not None:
        if not isinstance(payload, dict):
            raise errors.ValidationError("payload", masking.for_message(payload), "must be a dict "
                                         "the payload contains (JSONB @>), such as "
                                         "{'customer': {'plan': 'pro'}}")
        payload = json.loads(json.dumps(validate.json_value("payload", payload)))  # tuples: lists
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise errors.ValidationError("limit", limit, "must be a whole number of rows >= 1")
    return Query(workflow_id, status, payload, _columns(payload_columns), limit)


_PATH = re.compile(r"[^.]+(\.[^.]+)*")


def _columns(given: Any) -> dict[str, tuple[str, ...]]:
    if given is None:
        return {}
    taken = {frames.SCHEMAS["jobs"][0], *frames.SCHEMAS["jobs"][1]}
    if not isinstance(given, Mapping):
        raise errors.ValidationError("payload_columns", given, "must be {new column: 'dotted.path'}")
    out = {}
    for name, path in given.items():
        if not isinstance(name, str) or not name.strip() or name in taken:
            raise errors.ValidationError("payload_columns", name, "must be a new column name "
                                         f"(not empty, not one of {sorted(taken)})")
        if not isinstance(path, str) or not _PATH.fullmatch(path):
            raise errors.ValidationError("payload_columns", path, "must be a dotted path such as "
                                         "'customer.plan' (a number indexes a list: 'tags.0')")
        out[name] = tuple(path.split("."))
    return out


JOB_COLUMNS = {c: c for c in ("id", "workflow_id", "worker_id", "name", "status", "queue",
                              "priority", "attempts", "max_attempts", "version", "error",
                              "payload", "result", "created_at", "updated_at", "started_at",
                              "finished_at")}
JOB_COLUMNS["id"] = "job_id"


FEW_JOBS = 10_000
"""A search that found at most this many jobs reads only their events (``wait_s``), due times
and idempotency keys, by id, instead of every job's."""


def read_jobs(db: Database, q: Query) -> pd.DataFrame:
    """The jobs frame of ``q`` read from PostgreSQL (up to ``q.fetch`` rows, oldest first)."""
    text = q.payload_json
    table = export.select(db, "jobs", JOB_COLUMNS,
                          where={"workflow_id": q.workflow_id, "status": q.status},
                          order=("created_at", "id"), limit=q.fetch,
                          contains=None if text is None else {"payload": text})
    df = frames.from_arrow(table)
    if df.empty:
        return frames.empty("jobs")
    for col in ("created_at", "updated_at", "started_at", "finished_at"):
        df[col] = frames.epoch_us_to_utc(df[col])
    few = (q.payload is not None or q.limit is not None) and len(df) <= FEW_JOBS
    found = df["job_id"].tolist() if few else None
    waits = frames.from_arrow(export.attempt_waits(db, q.workflow_id, job_ids=found))
    per_job = (pd.Series(waits["wait_s"].astype("Float64").array, index=waits["job_id"])
               if len(waits) else pd.Series([], dtype="Float64"))
    df["wait_s"] = df["job_id"].map(per_job).astype("Float64")
    df.loc[df["status"].isin(["pending", "queued"]), "wait_s"] = pd.NA
    df["duration_s"] = frames.seconds_between(df["finished_at"], df["started_at"])
    frames.add_job_extras(df, export.idempotency_keys(db, "job", found), export.run_at_times(db, found))
    return frames.conform("jobs", df)


def contains(doc: Any, wanted: Any) -> bool:
    """PostgreSQL's JSONB containment (``doc @> wanted``) for JSON values in Python."""
    if isinstance(wanted, dict):
        return isinstance(doc, dict) and all(k in doc and contains(doc[k], v)
                                             for k, v in wanted.items())
    if isinstance(wanted, list):
        return isinstance(doc, list) and all(any(contains(d, w) for d in doc) for w in wanted)
    if isinstance(doc, bool) or isinstance(wanted, bool):
        return type(doc) is type(wanted) and doc == wanted
    return not isinstance(doc, dict | list) and doc == wanted


def select(jobs: pd.DataFrame, q: Query) -> pd.DataFrame:
    """Apply ``q``'s filters to a stored jobs frame, as the live SQL does (snapshots)."""
    keep = pd.Series(True, index=jobs.index)
    if q.workflow_id is not None:
        keep &= jobs["workflow_id"] == q.workflow_id
    if q.status is not None:
        keep &= jobs["status"] == q.status
    if q.payload is not None:
        keep &= jobs["payload"].map(lambda t: isinstance(t, str) and contains(json.loads(t), q.payload),
                                    na_action="ignore").fillna(False).astype(bool)
    out = jobs[keep.fillna(False).astype(bool)]
    return out if q.fetch is None else out.head(q.fetch)


def _walk(value: Any, path: tuple[str, ...]) -> Any:
    for part in path:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return json.dumps(value) if isinstance(value, dict | list) else value


def finish(jobs: pd.DataFrame, q: Query) -> pd.DataFrame:
    """Cut a jobs frame read with ``q.fetch`` to ``q.limit`` (saying so), then add payload columns.

    ``frame.attrs["capped"]`` is True when more rows matched than ``limit`` (and a
    warning is logged); it is False when every match is there.
    """
    capped = q.limit is not None and len(jobs) > q.limit
    if capped:
        jobs = jobs.iloc[: q.limit]
        log.warning("more than %d jobs match: only the first %d (oldest) are shown; raise the "
                    "limit or narrow the search", q.limit, q.limit, extra={"action": "search"})
    if q.columns:
        jobs = jobs.copy()
        docs = jobs["payload"].map(json.loads, na_action="ignore")
        for name, path in q.columns.items():
            values = [None if isinstance(d, float) or d is None or d is pd.NA else _walk(d, path)
                      for d in docs]
            jobs[name] = pd.Series(values, index=jobs.index, dtype=object).convert_dtypes()
    jobs.attrs["capped"] = capped
    jobs.attrs["limit"] = q.limit
    return jobs


def _cells(values: pd.Series) -> np.ndarray[Any, np.dtype[np.object_]]:
    """The cells of a text column as an object array, a missing cell as None."""
    cells: np.ndarray[Any, np.dtype[np.object_]] = (
        values.astype(object).where(values.notna(), None).to_numpy(dtype=object))
    return cells


def _candidates(values: pd.Series, masker: masking.Masker) -> np.ndarray[Any, np.dtype[np.bool_]]:
    """Rows whose text may hold a sensitive key (vectorized in Arrow; False means surely not)."""
    arr = (pa.array(values.array) if isinstance(values.dtype, pd.StringDtype)
           else pa.array(_cells(values), type=pa.string()))
    hits: np.ndarray[Any, np.dtype[np.bool_]] = (
        pc.match_substring_regex(arr, masking.pattern(masker.keys)).fill_null(False)
        .to_numpy(zero_copy_only=False))
    return hits


def mask_frame(name: str, frame: pd.DataFrame, masker: masking.Masker) -> pd.DataFrame:
    """``frame`` (an Inspector frame called ``name``) with its JSON text columns masked."""
    columns = [c for c in MASKED_COLUMNS.get(name, ()) if c in frame.columns]
    if frame.empty or not columns or not masker.keys:
        return frame
    out = frame
    for col in columns:
        hits = _candidates(frame[col], masker)
        if hits.any():
            out = out.copy() if out is frame else out
            values = _cells(frame[col]).copy()
            values[hits] = [masker.text(v) for v in values[hits]]
            out[col] = pd.Series(values, index=out.index, dtype=frame[col].dtype)
    return out
