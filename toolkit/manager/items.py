"""The items of a batch verb: a job id, a ``(job_id, value)`` pair or a mapping with fences.

``parse_items`` validates a whole batch before anything is written (one bad item
refuses the call); ``batches`` moves the parsed items.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from toolkit import errors, models, validate
from toolkit.tiers.postgres import batches as pgb

MAX_BATCH = 1000
"""Most items (or jobs claimed) in one batch call."""

Outcome = models.Job | errors.ToolkitError
"""One item's outcome in a batch: the moved job, or why it was refused."""

_FENCES = ("worker_id", "attempt")


def _item_fields(k: int, raw: Any, value_field: str | None) -> dict[str, Any]:
    """One item as a dict: a job id, a ``(job_id, value)`` tuple, or a mapping."""
    allowed = {"job_id", *_FENCES, *([value_field] if value_field else [])}
    if isinstance(raw, str) and value_field is None:
        return {"job_id": raw}
    if isinstance(raw, tuple | list) and 1 <= len(raw) <= (2 if value_field else 1):
        return dict(zip(("job_id", str(value_field)), raw, strict=False))
    if isinstance(raw, Mapping) and "job_id" in raw and set(raw) <= allowed:
        return dict(raw)
    shape = f"(job_id, {value_field}) or a mapping" if value_field else "a job id or a mapping"
    raise errors.ValidationError(f"items[{k}]", raw, f"must be {shape} with keys among "
                                 f"{sorted(allowed)}")


def _value(value_field: str | None, value: Any) -> str | None:
    if value_field == "result":
        value = validate.json_value("result", value)
        return None if value is None else json.dumps(value)
    if value_field == "error":
        return validate.text("error", value)
    return None


def parse_items(items: Any, value_field: str | None, worker_id: str | None) -> list[pgb.Item]:
    """Validate a batch: 1 to :data:`MAX_BATCH` items, each job once, every field checked.

    ``worker_id`` fences every item that names no worker of its own.
    """
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Sequence):
        raise errors.ValidationError("items", items, "must be a list of items")
    if not 1 <= len(items) <= MAX_BATCH:
        raise errors.ValidationError("items", f"{len(items)} items",
                                     f"a batch holds 1 to {MAX_BATCH} items")
    default_worker = None if worker_id is None else validate.identifier("worker_id", worker_id)
    out: list[pgb.Item] = []
    for k, raw in enumerate(items):
        f = _item_fields(k, raw, value_field)
        worker = f.get("worker_id", default_worker)
        attempt = f.get("attempt")
        out.append(pgb.Item(
            validate.identifier("job_id", f["job_id"]),
            None if worker is None else validate.identifier("worker_id", worker),
            None if attempt is None else validate.integer("attempt", attempt, low=1, high=10_000),
            _value(value_field, f.get(value_field)) if value_field else None))
    ids = [i.job_id for i in out]
    if len(set(ids)) != len(ids):
        raise errors.ValidationError("items", sorted({i for i in ids if ids.count(i) > 1}),
                                     "a job may appear once in a batch")
    return out


def item_guard(item: pgb.Item) -> dict[str, Any] | None:
    guard: dict[str, Any] = {}
    if item.worker_id is not None:
        guard["worker_id"] = item.worker_id
    if item.attempt is not None:
        guard["attempts"] = item.attempt
    return guard or None
