"""Input checks run before any I/O: bad input raises ValidationError and changes nothing."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from toolkit import errors, masking, retry_policy

MAX_ID_LENGTH = 255
MAX_JSON_BYTES = 1_000_000
MAX_JSON_DEPTH = 64
PRIORITY_LIMIT = 1_000_000


_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")
"""Control characters, and lone surrogates (no UTF-8 form: neither tier can store them)."""
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_JSON = json.JSONEncoder(allow_nan=False, separators=(",", ":"))
_JSON_UTF8 = json.JSONEncoder(allow_nan=False, separators=(",", ":"), ensure_ascii=False)


def _unencodable(value: str) -> bool:
    """Whether ``value`` holds a lone surrogate (``sys.argv`` and ``os.fsdecode`` make them
    from bytes that are not UTF-8; Redis and PostgreSQL cannot store them)."""
    return not value.isascii() and _SURROGATE.search(value) is not None


def new_id() -> str:
    """Return a fresh random id: a UUID4 string, as ``str(uuid.uuid4())`` makes it."""
    return new_ids(1)[0]


def new_ids(n: int) -> list[str]:
    """Return ``n`` fresh random ids (UUID4 strings) from one read of the OS's randomness."""
    pool = os.urandom(16 * n)
    out: list[str] = []
    for start in range(0, 16 * n, 16):
        raw = bytearray(pool[start:start + 16])
        raw[6] = raw[6] & 0x0F | 0x40  # version 4
        raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
        h = raw.hex()
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def _is_identifier(value: Any) -> bool:
    """Whether :func:`identifier` accepts ``value`` (a fast check, for loops)."""
    return (type(value) is str and 0 < len(value) <= MAX_ID_LENGTH
            and _CONTROL.search(value) is None)


def identifier(field: str, value: Any) -> str:
    """Return ``value`` if it is a usable id or name: 1-255 characters, no control characters."""
    if not isinstance(value, str):
        raise errors.ValidationError(field, value, "must be a string")
    if not value or len(value) > MAX_ID_LENGTH:
        raise errors.ValidationError(field, value, f"must be 1-{MAX_ID_LENGTH} characters")
    if _CONTROL.search(value) is not None:
        raise errors.ValidationError(field, value, "must not contain control characters "
                                     "or lone surrogates (invalid Unicode)")
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
    The error shows the value with its sensitive keys masked (:mod:`toolkit.masking`).
    """
    try:
        _depth(value, MAX_JSON_DEPTH)
        text = _JSON.encode(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise errors.ValidationError(field, masking.for_message(value), f"must be JSON: {exc}") from None
    if isinstance(value, Mapping) and not all(isinstance(k, str) for k in value):
        raise errors.ValidationError(field, masking.for_message(value), "must have string keys")
    if "\\u0000" in text:
        raise errors.ValidationError(field, masking.for_message(value), "must not contain the NUL character")
    if "\\ud" in text and _unencodable(_JSON_UTF8.encode(value)):
        raise errors.ValidationError(field, masking.for_message(value), "must not contain lone surrogates "
                                     "(invalid Unicode)")
    if len(text) > MAX_JSON_BYTES:
        raise errors.ValidationError(field, f"<{len(text)} bytes>", f"must be at most {MAX_JSON_BYTES} bytes")
    return value


_SMALL_INT = 10**15
_MAX_SCALAR_JSON = 24
"""Longest JSON text of a float or of an int below :data:`_SMALL_INT`."""


def _is_plain_json(value: Any) -> bool:
    """Whether :func:`json_value` surely accepts ``value`` (a fast check, for loops).

    True for None and for a flat dict with string keys whose values are
    strings, small ints, bools, None or finite floats, no string holding a
    NUL or a backslash, and whose JSON text is surely below the size limit (a
    character takes at most 12 characters of JSON). False means: ask
    :func:`json_value`.
    """
    if value is None:
        return True
    if type(value) is not dict:
        return False
    size = 2
    for k, v in value.items():
        if type(k) is not str or "\x00" in k or "\\" in k or _unencodable(k):
            return False
        size += 12 * len(k) + 4
        t = type(v)
        if t is str:
            if "\x00" in v or "\\" in v or _unencodable(v):
                return False
            size += 12 * len(v) + 2
        elif t is int:
            if not -_SMALL_INT < v < _SMALL_INT:
                return False
            size += _MAX_SCALAR_JSON
        elif t is float:
            if not math.isfinite(v):
                return False
            size += _MAX_SCALAR_JSON
        elif t is bool or v is None:
            size += 5
        else:
            return False
    return size <= MAX_JSON_BYTES


def json_object(field: str, value: Any) -> dict[str, Any]:
    """Return ``value`` (None becomes ``{}``) if it is a JSON object."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise errors.ValidationError(field, value, "must be a mapping")
    return dict(json_value(field, dict(value)))


def text(field: str, value: Any, *, max_length: int = 10_000) -> str:
    """Return ``value`` if it is a string of at most ``max_length`` characters, without NUL
    or lone surrogates."""
    if not isinstance(value, str):
        raise errors.ValidationError(field, value, "must be a string")
    if "\x00" in value or len(value) > max_length or _unencodable(value):
        raise errors.ValidationError(field, value, f"must be at most {max_length} characters, "
                                     "no NUL, no lone surrogates")
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


def run_at(run_at: Any, delay: Any, now: datetime, prefix: str = "") -> datetime | None:
    """Return when a job may run, from ``run_at`` (an aware datetime) or ``delay`` (seconds).

    At most one of the two; None when neither is given. ``run_at`` must be aware
    and within :data:`~toolkit.retry_policy.MAX_DELAY` of ``now`` either side (a
    time in the recent past runs at once; one further back is a mistake, such as
    an epoch of 0). ``delay`` is finite seconds in ``[0, MAX_DELAY]``.
    """
    if delay is not None and run_at is not None:
        raise errors.ValidationError(f"{prefix}delay", delay, "give run_at or delay, not both")
    if delay is not None:
        return now + timedelta(seconds=retry_policy.checked_delay(f"{prefix}delay", delay))
    if run_at is None:
        return None
    if not isinstance(run_at, datetime) or run_at.utcoffset() is None:
        raise errors.ValidationError(f"{prefix}run_at", run_at, "must be a timezone-aware datetime")
    span = timedelta(seconds=retry_policy.MAX_DELAY)
    if not now - span <= run_at <= now + span:
        raise errors.ValidationError(f"{prefix}run_at", run_at,
                                     "must lie within 366 days of now, either side")
    return run_at.astimezone(UTC)


_SPEC_KEYS = frozenset({"name", "priority", "queue", "payload", "max_attempts", "depends_on", "id",
                        "run_at", "delay", "retry"})
_TIMING_KEYS = ("run_at", "delay", "retry")


def job_specs(jobs: Any) -> list[dict[str, Any]]:
    """Validate the job dicts of ``create_workflow``; resolve ``depends_on`` names to ids.

    Returns one dict per job with every field filled in (``id`` a new UUID
    unless given). Raises ValidationError for an unknown key, a duplicate or
    unknown name, or a dependency cycle.
    """
    if isinstance(jobs, str | bytes | Mapping) or not isinstance(jobs, Iterable):
        raise errors.ValidationError("jobs", jobs, "must be a list of dicts")
    specs = [_job_spec(i, job) for i, job in enumerate(jobs)]
    unnamed = [s for s in specs if s["id"] is None]
    for s, job_id in zip(unnamed, new_ids(len(unnamed)), strict=True):
        s["id"] = job_id
    by_name = {s["name"]: s for s in specs}
    if len(by_name) != len(specs):
        raise errors.ValidationError("jobs", [s["name"] for s in specs], "job names must be unique")
    if len({s["id"] for s in specs}) != len(specs):
        raise errors.ValidationError("jobs", [s["id"] for s in specs], "job ids must be unique")
    dependent = [s for s in specs if s["depends_on"]]
    for s in dependent:
        missing = [d for d in s["depends_on"] if d not in by_name]
        if missing:
            raise errors.ValidationError(f"jobs[{s['name']}].depends_on", missing,
                                         "no job of that name in this workflow")
    if dependent:
        _check_acyclic(by_name)
    for s in dependent:
        s["depends_on"] = tuple(by_name[d]["id"] for d in s["depends_on"])
    return specs


def _job_spec(i: int, job: Any) -> dict[str, Any]:
    """Validate one job dict of :func:`job_specs` (fast checks first; the full
    validators, with their messages, for anything the fast checks do not pass)."""
    if not isinstance(job, Mapping):
        raise errors.ValidationError(f"jobs[{i}]", job, "must be a dict")
    if not _SPEC_KEYS.issuperset(job):
        raise errors.ValidationError(f"jobs[{i}]", sorted(set(job) - _SPEC_KEYS), "unknown keys")
    get = job.get
    job_id = get("id")  # None: job_specs draws the new ids in one go
    if job_id is not None and not _is_identifier(job_id):
        job_id = identifier(f"jobs[{i}].id", job_id)
    name = get("name")
    if not _is_identifier(name):
        name = identifier(f"jobs[{i}].name", name)
    priority = get("priority", 0)
    if not (type(priority) is int and -PRIORITY_LIMIT <= priority <= PRIORITY_LIMIT):
        priority = integer(f"jobs[{i}].priority", priority, low=-PRIORITY_LIMIT, high=PRIORITY_LIMIT)
    queue = get("queue", "default")
    if not _is_identifier(queue):
        queue = identifier(f"jobs[{i}].queue", queue)
    payload = get("payload")
    if not _is_plain_json(payload):
        payload = json_value(f"jobs[{i}].payload", payload)
    max_attempts = get("max_attempts", 3)
    if not (type(max_attempts) is int and 1 <= max_attempts <= 1000):
        max_attempts = integer(f"jobs[{i}].max_attempts", max_attempts, low=1, high=1000)
    depends_on = get("depends_on", ())
    if type(depends_on) in (list, tuple) and not depends_on:
        depends_on = ()
    else:
        depends_on = names(f"jobs[{i}].depends_on", depends_on)
    spec = {"id": job_id, "name": name, "priority": priority, "queue": queue, "payload": payload,
            "max_attempts": max_attempts, "depends_on": depends_on}
    if any(k in job for k in _TIMING_KEYS):  # absent otherwise: request hashes stay as they were
        _timing(f"jobs[{i}].", job, spec)
    return spec


def _timing(prefix: str, job: Mapping[str, Any], spec: dict[str, Any]) -> None:
    """Fill ``run_at`` and ``retry`` (the job's own policy, as JSON) of a spec."""
    given_at, delay = job.get("run_at"), job.get("delay")
    spec["run_at"] = run_at(given_at, delay, datetime.now(UTC), prefix)
    # The request as asked (a repeat under an idempotency key asks for the same delay, not
    # for the same due time): what the key's request hash covers instead of run_at.
    spec["schedule"] = {"run_at": given_at.isoformat() if given_at is not None else None,
                        "delay": float(delay) if delay is not None else None}
    spec["retry"] = None
    if job.get("retry") is not None:
        spec["retry"] = retry_policy.RetryPolicy.from_value(f"{prefix}retry", job["retry"]).to_json()


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


MAX_METRIC_NAME_LENGTH = 100
_METRIC_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def metric_name(field: str, value: Any) -> str:
    """Return ``value`` if it is a counter name: ``[a-z_][a-z0-9_]*``, 1-100 characters.

    The same name then works as a Redis key part and, prefixed, as a Prometheus name.
    """
    if not isinstance(value, str):
        raise errors.ValidationError(field, value, "must be a string")
    if not 1 <= len(value) <= MAX_METRIC_NAME_LENGTH or _METRIC_NAME.fullmatch(value) is None:
        raise errors.ValidationError(
            field, value, f"must match [a-z_][a-z0-9_]* (1-{MAX_METRIC_NAME_LENGTH} characters)")
    return value


def metric_amount(field: str, value: Any) -> int:
    """Return ``value`` if it is a positive int: a counter never goes down or stands still."""
    return integer(field, value, low=1, high=2**53)
