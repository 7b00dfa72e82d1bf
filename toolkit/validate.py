"""Input checks run before any I/O: bad input raises ValidationError and changes nothing."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from toolkit import errors

MAX_ID_LENGTH = 255
MAX_JSON_BYTES = 1_000_000
MAX_JSON_DEPTH = 64
PRIORITY_LIMIT = 1_000_000


def new_id() -> str:
    """Return a fresh random id (a UUID4 string)."""
    return str(uuid.uuid4())


def identifier(field: str, value: Any) -> str:
    """Return ``value`` if it is a usable id or name: 1-255 characters, no control characters."""
    if not isinstance(value, str):
        raise errors.ValidationError(field, value, "must be a string")
    if not value or len(value) > MAX_ID_LENGTH:
        raise errors.ValidationError(field, value, f"must be 1-{MAX_ID_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise errors.ValidationError(field, value, "must not contain control characters")
    return value


def optional_id(field: str, value: Any) -> str:
    """Return ``value`` as an id, or a new UUID when it is None."""
    return new_id() if value is None else identifier(field, value)


def integer(field: str, value: Any, *, low: int, high: int) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[low, high]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise errors.ValidationError(field, value, "must be an integer")
    if not low <= value <= high:
        raise errors.ValidationError(field, value, f"must be between {low} and {high}")
    return value


def _depth(value: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            raise ValueError(f"nested deeper than {limit} levels")
        if isinstance(item, Mapping):
            if not all(isinstance(k, str) for k in item):
                raise ValueError("object keys must be strings")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)


def json_value(field: str, value: Any) -> Any:
    """Return ``value`` if PostgreSQL JSONB and JSON can both hold it.

    Refused: NaN and infinities, bytes, sets and other non-JSON objects,
    non-string keys, the NUL character, more than 64 levels, more than 1 MB.
    """
    try:
        _depth(value, MAX_JSON_DEPTH)
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.ValidationError(field, value, f"must be JSON: {exc}") from None
    if isinstance(value, Mapping) and not all(isinstance(k, str) for k in value):
        raise errors.ValidationError(field, value, "must have string keys")
    if "\\u0000" in text:
        raise errors.ValidationError(field, value, "must not contain the NUL character")
    if len(text) > MAX_JSON_BYTES:
        raise errors.ValidationError(field, f"<{len(text)} bytes>", f"must be at most {MAX_JSON_BYTES} bytes")
    return value


def json_object(field: str, value: Any) -> dict[str, Any]:
    """Return ``value`` (None becomes ``{}``) if it is a JSON object."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errors.ValidationError(field, value, "must be a mapping")
    return dict(json_value(field, dict(value)))


def text(field: str, value: Any, *, max_length: int = 10_000) -> str:
    """Return ``value`` if it is a string without NUL of at most ``max_length`` characters."""
    if not isinstance(value, str):
        raise errors.ValidationError(field, value, "must be a string")
    if "\x00" in value or len(value) > max_length:
        raise errors.ValidationError(field, value, f"must be at most {max_length} characters, no NUL")
    return value


def names(field: str, values: Any) -> tuple[str, ...]:
    """Return a tuple of identifiers from a list or tuple (a lone string is refused)."""
    if isinstance(values, str) or not isinstance(values, Iterable):
        raise errors.ValidationError(field, values, "must be a list of strings")
    out = tuple(identifier(field, v) for v in values)
    if len(set(out)) != len(out):
        raise errors.ValidationError(field, values, "must not repeat a name")
    return out


def seconds(field: str, value: Any, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float seconds if finite and positive (or zero when allowed)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise errors.ValidationError(field, value, "must be a finite number of seconds"
                                     + (" >= 0" if allow_zero else " > 0"))
    return float(value)


def status(field: str, value: Any, enum: type[Any]) -> Any:
    """Return ``value`` as a member of the status ``enum``."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise errors.ValidationError(field, value, f"must be one of {allowed}") from None


def job_specs(jobs: Any) -> list[dict[str, Any]]:
    """Validate the job dicts of ``create_workflow``; resolve ``depends_on`` names to ids.

    Returns one dict per job with every field filled in (``id`` a new UUID
    unless given). Raises ValidationError for an unknown key, a duplicate or
    unknown name, or a dependency cycle.
    """
    if isinstance(jobs, str | bytes | Mapping) or not isinstance(jobs, Iterable):
        raise errors.ValidationError("jobs", jobs, "must be a list of dicts")
    allowed = {"name", "priority", "queue", "payload", "max_attempts", "depends_on", "id"}
    specs: list[dict[str, Any]] = []
    for i, job in enumerate(jobs):
        if not isinstance(job, Mapping):
            raise errors.ValidationError(f"jobs[{i}]", job, "must be a dict")
        unknown = set(job) - allowed
        if unknown:
            raise errors.ValidationError(f"jobs[{i}]", sorted(unknown), "unknown keys")
        specs.append({
            "id": optional_id(f"jobs[{i}].id", job.get("id")),
            "name": identifier(f"jobs[{i}].name", job.get("name")),
            "priority": integer(f"jobs[{i}].priority", job.get("priority", 0),
                                low=-PRIORITY_LIMIT, high=PRIORITY_LIMIT),
            "queue": identifier(f"jobs[{i}].queue", job.get("queue", "default")),
            "payload": json_value(f"jobs[{i}].payload", job.get("payload")),
            "max_attempts": integer(f"jobs[{i}].max_attempts", job.get("max_attempts", 3),
                                    low=1, high=1000),
            "depends_on": names(f"jobs[{i}].depends_on", job.get("depends_on", ())),
        })
    by_name = {s["name"]: s for s in specs}
    if len(by_name) != len(specs):
        raise errors.ValidationError("jobs", [s["name"] for s in specs], "job names must be unique")
    if len({s["id"] for s in specs}) != len(specs):
        raise errors.ValidationError("jobs", [s["id"] for s in specs], "job ids must be unique")
    for s in specs:
        missing = [d for d in s["depends_on"] if d not in by_name]
        if missing:
            raise errors.ValidationError(f"jobs[{s['name']}].depends_on", missing,
                                         "no job of that name in this workflow")
    _check_acyclic(by_name)
    for s in specs:
        s["depends_on"] = tuple(by_name[d]["id"] for d in s["depends_on"])
    return specs


def _check_acyclic(by_name: Mapping[str, Mapping[str, Any]]) -> None:
    state: dict[str, int] = {}
    for root in by_name:
        stack = [(root, iter(by_name[root]["depends_on"]))]
        state[root] = state.get(root, 0) or 1
        if state[root] == 2:
            continue
        while stack:
            node, deps = stack[-1]
            nxt = next(deps, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                raise errors.ValidationError("depends_on", nxt, "dependency cycle")
            elif state.get(nxt) is None:
                state[nxt] = 1
                stack.append((nxt, iter(by_name[nxt]["depends_on"])))
