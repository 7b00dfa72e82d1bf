"""The memory tier: bytes per cached job against a plain slotted dataclass.

    python -m benchmarks.memtier [--quick] [--target ...]

Cases
-----
memory.bytes_per_job
    ``tracemalloc`` bytes allocated to hold N jobs in a ``Memory`` tier
    (``models.from_dict`` + ``Memory.put``, as a rebuild does), per job, against
    N records of a ``dataclass(slots=True)`` with the same fields (payload as
    JSON text) in a dict. The input rows exist before measuring, so both sides
    share the id strings and datetimes. Goal: <= 1.2x.

RSS for L live jobs after a rebuild is recorded by ``benchmarks.recovery``
(``extra.rss_bytes_per_live_job`` and the RSS before and after, in a child process).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import tracemalloc
from collections.abc import Callable
from datetime import datetime
from typing import Any

from benchmarks import harness
from toolkit import models
from toolkit.tiers.memory import Memory


@dataclasses.dataclass(slots=True)
class JobRecord:
    id: str
    workflow_id: str
    name: str
    status: str
    priority: int
    queue: str
    payload: str | None
    result: str | None
    error: str | None
    attempts: int
    max_attempts: int
    worker_id: str | None
    depends_on: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version: int
    run_at: datetime | None = None


def _rows(n: int) -> list[dict[str, Any]]:
    rows = harness.job_rows("wf-memory", n)
    # Every field of the model, the ones the raw rows leave out (run_at) as None.
    return [{**dict.fromkeys(models.field_names("job")), **dict(zip(harness.JOB_COLUMNS, r, strict=True))}
            for r in rows]


def _allocated(build: Callable[[], object]) -> int:
    gc.collect()
    tracemalloc.start()
    held = build()
    size, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del held
    return size


def _toolkit(rows: list[dict[str, Any]]) -> Memory:
    memory = Memory()
    for r in rows:
        memory.put("job", models.from_dict("job", r))
    return memory


def _records(rows: list[dict[str, Any]]) -> dict[str, JobRecord]:
    out = {}
    for r in rows:
        payload = json.dumps(r["payload"]) if r["payload"] is not None else None
        out[r["id"]] = JobRecord(**{**{k: r[k] for k in models.field_names("job")},
                                    "payload": payload, "depends_on": tuple(r["depends_on"])})
    return out


def run(bench: harness.Bench) -> None:
    n = bench.n(200_000, 20_000)
    rows = _rows(n)
    tk = [_allocated(lambda: _toolkit(rows)) / n for _ in range(3)]
    floor = [_allocated(lambda: _records(rows)) / n for _ in range(3)]
    bench.record("memtier", "memory.bytes_per_job", n, harness.Stats("B/job", *_summary(tk)),
                 harness.Stats("B/job", *_summary(floor)), harness.at_most(1.2),
                 floor_name="dataclass(slots=True), payload JSON text")


def _summary(values: list[float]) -> tuple[float, float, float, int]:
    values = sorted(values)
    return values[len(values) // 2], values[0], values[-1], len(values)


if __name__ == "__main__":
    harness.main(run, __doc__)
