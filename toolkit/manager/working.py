"""The worker loop: heartbeats, claims, the handler, a report per job, and a clean stop.

``run_worker`` is the easy way to use the verbs right: it claims (in batches
when asked), starts each job fenced by its attempt, runs the handler, completes
the job with the handler's return value or fails it with the exception's text,
and beats in a background thread, so a long handler never looks dead. On
SIGTERM or SIGINT (when it runs in the main thread), on ``stop``, after
``max_jobs`` or after ``idle_timeout`` seconds without work, it finishes the
job in hand and puts the claims it never started back in their queues.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any

from toolkit import errors, models, validate
from toolkit.manager.batches import Batches
from toolkit.manager.dispatch import Dispatch
from toolkit.manager.jobs import Jobs
from toolkit.manager.workers import Workers

log = logging.getLogger(__name__)

BATCH_LIMIT = 10_000
"""Most jobs one claim of the loop takes."""


@dataclasses.dataclass
class WorkerReport:
    """What one ``run_worker`` call did."""

    completed: int = 0
    failed: int = 0
    returned: int = 0
    """Claims given back unstarted when the loop stopped."""
    lost: int = 0
    """Jobs whose attempt was taken away meanwhile (reclaimed): neither completed nor failed here."""
    stopped_by: str = ""
    """``"idle"``, ``"max_jobs"``, ``"stop"`` or ``"signal SIGTERM"`` / ``"signal SIGINT"``."""
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class _Plan:
    worker_id: str
    queues: tuple[str, ...] | None
    batch: int
    max_jobs: int | None
    idle_timeout: float | None
    poll: float


class Working:
    """The worker loop of a StateManager (it drives the jobs, dispatch and workers rooms)."""

    def __init__(self, jobs: Jobs, dispatch: Dispatch, workers: Workers, batches: Batches) -> None:
        self.jobs, self.dispatch, self.workers, self.batches = jobs, dispatch, workers, batches

    def run_worker(self, worker_id: str, handler: Callable[[models.Job], Any], *,
                   queues: Sequence[str] | None = None, batch: int = 1,
                   max_jobs: int | None = None, idle_timeout: float | None = None,
                   poll: float = 1.0, stop: threading.Event | None = None) -> WorkerReport:
        """Run jobs with ``handler`` until stopped; return what was done.

        ``handler(job)`` returns the job's result (JSON) or raises: the job is then
        failed with ``"ExceptionType: message"`` (retried by its attempts rule,
        after the wait of its retry policy).
        ``batch`` jobs are claimed at a time (one Redis script and one
        transaction, :meth:`dequeue_many`); ``max_jobs`` ends the loop after
        that many finished jobs; ``idle_timeout`` ends it after that many
        seconds without a job (``0``: as soon as the queues are empty);
        ``poll`` is how long one claim waits. ``stop`` (an event) ends it from
        another thread; SIGTERM and SIGINT end it when it runs in the main
        thread (a second signal acts as usual). An unknown worker is registered
        with ``queues`` (default ``["default"]``).

        Raises
        ------
        ValidationError
            A bad argument (nothing is written).
        """
        plan = self._plan(worker_id, handler, queues, batch, max_jobs, idle_timeout, poll)
        if self.workers.get(worker_id) is None:
            self.workers.register(worker_id, queues=plan.queues or ("default",))
        report = WorkerReport()
        halt = stop if stop is not None else threading.Event()
        started = time.monotonic()
        with _beating(self.workers, worker_id), _signals(halt) as caught:
            report.stopped_by = self._loop(plan, handler, halt, report)
        if caught:
            report.stopped_by = f"signal {caught[0]}"
        report.seconds = time.monotonic() - started
        return report

    @staticmethod
    def _plan(worker_id: str, handler: Any, queues: Sequence[str] | None, batch: int,
              max_jobs: int | None, idle_timeout: float | None, poll: float) -> _Plan:
        validate.identifier("worker_id", worker_id)
        if not callable(handler):
            raise errors.ValidationError("handler", handler, "must be callable with a job")
        return _Plan(
            worker_id=worker_id,
            queues=validate.names("queues", queues) if queues is not None else None,
            batch=validate.integer("batch", batch, low=1, high=BATCH_LIMIT),
            max_jobs=(validate.integer("max_jobs", max_jobs, low=1, high=2**62)
                      if max_jobs is not None else None),
            idle_timeout=(validate.seconds("idle_timeout", idle_timeout, allow_zero=True)
                          if idle_timeout is not None else None),
            poll=validate.seconds("poll", poll),
        )

    def _loop(self, plan: _Plan, handler: Callable[[models.Job], Any], halt: threading.Event,
              report: WorkerReport) -> str:
        idle_since = time.monotonic()
        while True:
            if halt.is_set():
                return "stop"
            if plan.max_jobs is not None and report.completed + report.failed >= plan.max_jobs:
                return "max_jobs"
            claimed = self._claim(plan)
            if not claimed:
                if plan.idle_timeout is not None and time.monotonic() - idle_since >= plan.idle_timeout:
                    return "idle"
                continue
            idle_since = time.monotonic()
            try:
                while claimed and not halt.is_set() and not _full(plan, report):
                    self._one(plan.worker_id, claimed.pop(0), handler, report)
            finally:
                if claimed:
                    back = self.dispatch.return_unstarted(plan.worker_id, [j.id for j in claimed])
                    report.returned += len(back)

    def _claim(self, plan: _Plan) -> list[models.Job]:
        wait = 0.0 if plan.idle_timeout == 0 else plan.poll
        if plan.batch == 1:
            one = self.dispatch.dequeue(plan.worker_id, queues=plan.queues, timeout=wait)
            return [] if one is None else [one]
        # One Redis script and one transaction for the whole batch of claims.
        return self.batches.dequeue_many(plan.worker_id, plan.batch, queues=plan.queues, timeout=wait)

    def _one(self, worker_id: str, job: models.Job, handler: Callable[[models.Job], Any],
             report: WorkerReport) -> None:
        attempt = job.attempts
        try:
            running = self.jobs.start(job.id, worker_id=worker_id, attempt=attempt)
        except (errors.StaleAttempt, errors.InvalidTransition):
            report.lost += 1
            return
        try:
            result = handler(running)
        except Exception as exc:  # noqa: BLE001 - the handler's failure is the job's, not the loop's
            error = f"{type(exc).__name__}: {exc}"[:10_000]
            self._settle(report, "failed", lambda: self.jobs.fail(
                job.id, error, worker_id=worker_id, attempt=attempt))
            return
        self._settle(report, "completed", lambda: self.jobs.complete(
            job.id, result, worker_id=worker_id, attempt=attempt))

    @staticmethod
    def _settle(report: WorkerReport, outcome: str, call: Callable[[], models.Job]) -> None:
        try:
            call()
        except (errors.StaleAttempt, errors.InvalidTransition) as exc:
            log.warning("job result not recorded: %s", exc, extra={"action": "run_worker"})
            report.lost += 1
            return
        setattr(report, outcome, getattr(report, outcome) + 1)


def _full(plan: _Plan, report: WorkerReport) -> bool:
    return plan.max_jobs is not None and report.completed + report.failed >= plan.max_jobs


@contextmanager
def _beating(workers: Workers, worker_id: str) -> Iterator[None]:
    """Beat for ``worker_id`` every third of the heartbeat TTL until the block ends."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(workers.ttl / 3):
            try:
                workers.heartbeat(worker_id)
            except errors.StorageUnavailable as exc:
                log.warning("heartbeat of %s failed: %s", worker_id, exc,
                            extra={"action": "run_worker"})

    workers.heartbeat(worker_id)
    thread = threading.Thread(target=beat, name=f"toolkit-beat-{worker_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _signals(halt: threading.Event) -> Iterator[list[str]]:
    """In the main thread, SIGTERM and SIGINT set ``halt`` once (then act as usual again)."""
    caught: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    wanted = (signal.SIGTERM, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in wanted}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        caught.append(signal.Signals(signum).name)
        halt.set()
        for s, handler in before.items():
            signal.signal(s, handler)

    for s in wanted:
        signal.signal(s, on_signal)
    try:
        yield caught
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
