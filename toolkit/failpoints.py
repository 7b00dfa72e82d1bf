"""Fail points: named places in the write path where a test or a scenario can inject a fault.

Production code calls :func:`reach` at each point; it costs one dict lookup and
does nothing unless a hook is armed. Scenarios and tests own the faults: they
:func:`arm` a point with a callable (for instance one that SIGKILLs the process,
to crash between a PostgreSQL commit and the Redis update) and :func:`disarm`
it afterwards. Hooks are per process.

Points
------
``after_commit``
    The PostgreSQL transaction of a write committed; Redis and memory are not
    updated yet. The detail is the write's action (``"job -> completed"``).
``after_claim``
    ``dequeue`` popped a job into the in-flight set; PostgreSQL has not decided
    yet. The detail is the job id.
"""

from __future__ import annotations

from collections.abc import Callable

POINTS = ("after_commit", "after_claim")

_armed: dict[str, Callable[[str], None]] = {}


def arm(point: str, hook: Callable[[str], None]) -> None:
    """Call ``hook(detail)`` each time the write path reaches ``point``."""
    if point not in POINTS:
        raise ValueError(f"unknown fail point {point!r}: expected one of {POINTS}")
    _armed[point] = hook


def disarm(point: str | None = None) -> None:
    """Remove the hook of ``point`` (every hook when ``point`` is None)."""
    if point is None:
        _armed.clear()
    else:
        _armed.pop(point, None)


def reach(point: str, detail: str) -> None:
    """Run the hook armed at ``point``, if any (called by the write path)."""
    hook = _armed.get(point)
    if hook is not None:
        hook(detail)
