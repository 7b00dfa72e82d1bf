"""One cold read per key at a time in a process: the callers that arrive meanwhile share it.

Without it, a cold entity read by many threads at once is a herd: every
thread misses memory and Redis and runs the same SELECT. With it, the first
caller (the leader) reads; the others wait for its answer, or its error,
for at most ``timeout`` seconds. A shared answer is as fresh as a read that
started a moment before the follower asked: never older than the leader's
start, which the follower's own read could not have beaten anyway.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from toolkit import errors

T = TypeVar("T")


class _Call(Generic[T]):
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: T | None = None
        self.error: BaseException | None = None


class SingleFlight(Generic[T]):
    """A per-key in-flight guard.

    Parameters
    ----------
    timeout
        Seconds a follower waits for the leader's read before it raises
        ``StorageUnavailable``.
    """

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout
        self.shared = 0
        """How many callers were answered by another caller's read (for tests and metrics)."""
        self._lock = threading.Lock()
        self._calls: dict[Hashable, _Call[T]] = {}

    def do(self, key: Hashable, fn: Callable[[], T]) -> T:
        """Return ``fn()``, or the result of the ``fn`` already running for ``key``.

        Raises
        ------
        StorageUnavailable
            The leader's read did not finish within ``timeout`` seconds.
        Exception
            Whatever the leader's ``fn`` raised, re-raised in every follower.
        """
        with self._lock:
            call = self._calls.get(key)
            if call is None:
                call = self._calls[key] = _Call()
                leader = True
            else:
                self.shared += 1
                leader = False
        if leader:
            return self._lead(key, call, fn)
        if not call.done.wait(self.timeout):
            raise errors.StorageUnavailable(
                f"gave up after {self.timeout:g}s waiting for a concurrent read of {key!r}")
        if call.error is not None:
            raise call.error
        return call.result  # type: ignore[return-value]

    def _lead(self, key: Hashable, call: _Call[T], fn: Callable[[], T]) -> T:
        try:
            call.result = fn()
            return call.result
        except BaseException as exc:
            call.error = exc
            raise
        finally:
            with self._lock:
                del self._calls[key]
            call.done.set()
