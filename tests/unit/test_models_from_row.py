"""models.from_row (the rebuild's constructor) builds what from_dict builds, types included."""

from __future__ import annotations

import pickle
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from toolkit import models
from toolkit.tiers.redis import cache

NOW = datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)

JSON_VALUES: list[Any] = [
    None, 0, -3, 2**62, 1.5, True, "", "\u2603", [], {}, [1, [2, [3]]],
    {"a": 1}, {f"k{i}": i for i in range(9)}, {f"k{i}": str(i) for i in range(30)},
    {"a": {"b": [1, {"c": None}]}, "d": []}, {"t": (1, 2)},
]

ROWS: dict[str, dict[str, Any]] = {
    "workflow": dict(id="w", name="n", status="running", metadata={"x": [1]}, created_at=NOW,
                     updated_at=NOW, version=4),
    "job": dict(id="j", workflow_id="w", name="n", status="failed", priority=2, queue="q",
                payload={"i": 1}, result={"r": [1]}, error="boom", attempts=1, max_attempts=3,
                worker_id="wk", depends_on=["a", "b"], created_at=NOW, updated_at=NOW,
                started_at=NOW, finished_at=None, version=7, run_at=NOW),
    "worker": dict(id="wk", hostname="h", status="active", queues=["default", "x"], capacity=2,
                   metadata={}, last_heartbeat=None, registered_at=NOW, version=1),
    "assignment": dict(id="a", job_id="j", worker_id="wk", status="active", attempt=1,
                       assigned_at=NOW, finished_at=None),
}


def _same(a: Any, b: Any) -> None:
    assert type(a) is type(b) and a == b
    if isinstance(a, dict):
        assert sys.getsizeof(a) == sys.getsizeof(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, list | tuple):
        for x, y in zip(a, b, strict=True):
            _same(x, y)


def _check(kind: str, row: dict[str, Any]) -> None:
    values = [row[n] for n in models.field_names(kind)]
    fast = models.from_row(kind, values)
    normal = models.from_dict(kind, row)
    assert type(fast) is type(normal) and fast == normal
    for name in models.field_names(kind):
        _same(getattr(fast, name), getattr(normal, name))
    assert cache.encode(fast) == cache.encode(normal)
    assert hash(pickle.dumps(fast)) == hash(pickle.dumps(normal))


@pytest.mark.parametrize("kind", sorted(ROWS))
def test_from_row_equals_from_dict(kind: str) -> None:
    _check(kind, ROWS[kind])


@pytest.mark.parametrize("value", JSON_VALUES, ids=range(len(JSON_VALUES)))
def test_from_row_freezes_json_like_post_init(value: Any) -> None:
    _check("job", {**ROWS["job"], "payload": value, "result": value})
    if isinstance(value, dict):
        _check("workflow", {**ROWS["workflow"], "metadata": value})
        _check("worker", {**ROWS["worker"], "metadata": value})


def test_from_row_freezes_decoded_json_the_same_way() -> None:
    for value in JSON_VALUES:
        decoded = orjson.loads(orjson.dumps(value))
        _check("job", {**ROWS["job"], "payload": decoded})


@pytest.mark.parametrize("status", [s.value for s in models.JobStatus])
def test_from_row_gives_status_enums(status: str) -> None:
    job = models.from_row("job", [{**ROWS["job"], "status": status}[n]
                                  for n in models.field_names("job")])
    assert job.status is models.JobStatus(status)


def test_from_row_ignores_trailing_values_and_refuses_bad_status() -> None:
    values = [ROWS["job"][n] for n in models.field_names("job")]
    assert models.from_row("job", [*values, 12345]) == models.from_row("job", values)
    with pytest.raises(ValueError, match="nope"):
        models.from_row("job", [*values[:3], "nope", *values[4:]])


def test_from_row_entities_stay_frozen() -> None:
    job = models.from_row("job", [ROWS["job"][n] for n in models.field_names("job")])
    with pytest.raises(AttributeError):
        job.status = models.JobStatus.QUEUED  # type: ignore[misc]
    with pytest.raises(TypeError):
        job.payload["i"] = 2


def test_row_builder_is_from_row() -> None:
    values = [ROWS["worker"][n] for n in models.field_names("worker")]
    assert models.row_builder("worker")(values) == models.from_row("worker", values)
