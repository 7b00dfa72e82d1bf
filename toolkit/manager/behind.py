"""Batches whose cache update runs one batch behind their commits, on one background thread.

A long run of batches (a bulk apply) spends about as long updating Redis and memory
after each commit as PostgreSQL spends on the next batch's statements. :class:`WriteBehind`
overlaps the two: batch k's update runs on a background thread while batch k+1's
statements and COMMIT run; batch k+1's update is queued once batch k's is done. No
transaction waits on Redis (a slow Redis never holds a row lock), at most two committed
batches are not yet in Redis, each batch is inside the coordinator's watermark
(:meth:`Watermark.begin` / ``end``) from before its commit until its update is done, and
the updates run in commit order.

Uses only :class:`~toolkit.manager.pipeline.Pipeline`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from toolkit.manager.pipeline import Changes, Pipeline, Transaction


class WriteBehind:
    """Write batches through ``pipe``; each batch's cache update overlaps the next batch.

    Use as a context manager: leaving it waits for the last update.
    """

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe = pipe
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="toolkit-write-behind")
        self._last: Future[None] | None = None

    def write(self, action: str, fn: Transaction) -> Changes:
        """Commit ``fn``'s batch, wait for the previous batch's update, queue this one's."""
        mark = self.pipe.watermark
        token = mark.begin()
        try:
            changes = self.pipe.commit(action, fn)
        except BaseException:
            mark.end(token)  # not committed (or not known to be: commit() pinned the mark)
            raise
        try:
            self.wait()  # after this COMMIT, never inside the transaction
            self._last = self._pool.submit(self._apply, changes, token)
        except BaseException:
            mark.failed()  # committed but not queued for Redis: keep the watermark before it
            mark.end(token)
            raise
        return changes

    def _apply(self, changes: Changes, token: int) -> None:
        try:
            self.pipe.apply(changes)
        finally:
            self.pipe.watermark.end(token)

    def wait(self) -> None:
        """Wait until every queued update is done (re-raising what it raised)."""
        last, self._last = self._last, None
        if last is not None:
            last.result()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
