"""When a failed job runs again: :class:`RetryPolicy` and the checks on a backoff.

A retry waits ``min(cap, base * factor ** (attempt - 1))`` seconds, spread by
``± jitter`` (a fraction of the wait) and capped again at ``cap``. A policy may
also be any function of the attempt (``attempt -> seconds``): its answer is
checked by :func:`checked_delay`, and a wait that is not a finite number of
seconds in ``[0, MAX_DELAY]`` is refused with a ``ValidationError`` (never
clamped), so the failure that asked for it writes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from toolkit import errors

MAX_DELAY = 366 * 86_400.0
"""The longest wait a schedule or a backoff may ask for (seconds: 366 days)."""

Backoff = Callable[[int], float]
"""A backoff given as a function: the failed attempt (1 for the first) -> seconds to wait."""


def _number(field: str, value: Any, low: float, high: float) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or not low <= value <= high:
        raise errors.ValidationError(field, value, f"must be a finite number in [{low:g}, {high:g}]")
    return float(value)


@dataclasses.dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with a cap and jitter, for the retries of a failed job.

    Parameters
    ----------
    base
        Seconds the first retry waits (before jitter), ``[0, MAX_DELAY]``.
    factor
        Growth per attempt, ``[1, 100]``: 2 doubles the wait each time, 1 keeps it fixed.
    cap
        The longest wait, ``[0, MAX_DELAY]`` (jitter never goes beyond it).
    jitter
        Fraction of the wait drawn at random either side, ``[0, 1]``: 0.1 is ±10 %.
    """

    base: float = 1.0
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        for name, high in (("base", MAX_DELAY), ("factor", 100.0), ("cap", MAX_DELAY),
                           ("jitter", 1.0)):
            low = 1.0 if name == "factor" else 0.0
            object.__setattr__(self, name, _number(f"retry.{name}", getattr(self, name), low, high))

    def delay(self, attempt: int, spread: float) -> float:
        """Seconds to wait after failed ``attempt`` (1 for the first); ``spread`` in [-1, 1]."""
        steps = max(attempt - 1, 0)
        if self.base == 0 or self.factor == 1 or steps * math.log(self.factor) < math.log(
                max(self.cap, 1e-300) / self.base):
            raw = min(self.cap, self.base * self.factor ** steps)
        else:
            raw = self.cap
        return max(0.0, min(self.cap, raw * (1.0 + self.jitter * spread)))

    def to_json(self) -> dict[str, float]:
        """The policy as a JSON object (how a job's own policy is stored)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_value(cls, field: str, value: Any) -> RetryPolicy:
        """A policy from a ``RetryPolicy`` or a mapping of its fields (``ValidationError`` else)."""
        if isinstance(value, RetryPolicy):
            return value
        if not isinstance(value, Mapping):
            raise errors.ValidationError(field, value, "must be a RetryPolicy or a dict of "
                                         "base, factor, cap, jitter")
        unknown = sorted(set(value) - {"base", "factor", "cap", "jitter"})
        if unknown:
            raise errors.ValidationError(field, unknown, "unknown keys (base, factor, cap, jitter)")
        return cls(**value)


def checked_delay(field: str, value: Any) -> float:
    """Return a backoff's answer as seconds, or raise ``ValidationError`` (NaN, < 0, huge, not a number)."""
    return _number(field, value, 0.0, MAX_DELAY)


def backoff_of(policy: RetryPolicy | Backoff, attempt: int, spread: float) -> float:
    """Seconds to wait after failed ``attempt`` under ``policy`` (a function's answer checked).

    Raises
    ------
    ValidationError
        The function raised, or returned something that is not a wait in ``[0, MAX_DELAY]``.
    """
    if isinstance(policy, RetryPolicy):
        return policy.delay(attempt, spread)
    try:
        answer = policy(attempt)
    except Exception as exc:  # the caller's function: reported, never half-applied
        raise errors.ValidationError("retry_policy", policy, f"raised {exc!r}") from exc
    return checked_delay(f"retry_policy({attempt})", answer)


def policy_setting(value: Any) -> RetryPolicy | Backoff:
    """Check a manager's default policy: a ``RetryPolicy``, a dict of its fields, or a function."""
    if callable(value) and not isinstance(value, RetryPolicy):
        return value  # type: ignore[no-any-return]
    return RetryPolicy.from_value("retry_policy", value)
