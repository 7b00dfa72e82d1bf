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
from toolkit.manager.items import MAX_BATCH
from toolkit.manager.jobs import Jobs
from toolkit.manager.workers import Workers

log = logging.getLogger(__name__)

BATCH_LIMIT = MAX_BATCH
"""Most jobs one claim of the loop takes (what ``dequeue_many`` takes)."""


@dataclasses.dataclass
class WorkerReport:
    """What one ``run_worker`` call did."""

    completed: int = 0
    failed: int = 0
    returned: int = 0
    """Claims given back unstarted: when the loop stopped, or after a claim whose ``COMMIT``
    reply was lost."""
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
        ``batch`` jobs (1 to 1,000) are claimed at a time, never past ``max_jobs``:
        the first claim is a :meth:`dequeue_many`, then the completions of each
        batch claim the next in the same commit (:meth:`complete_and_dequeue_many`;
        the batch's failures commit before, on their own). ``max_jobs`` ends the loop after
        that many finished jobs; ``idle_timeout`` ends it after that many
        seconds without a job (``0``: as soon as the queues are empty);
        ``poll`` is how long one claim waits. ``stop`` (an event) ends it from
        another thread; SIGTERM and SIGINT end it when it runs in the main
        thread (a second signal acts as usual). An unknown worker is registered
        with ``queues`` (default ``["default"]``). Run one loop per worker id.

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
        carried: list[models.Job] = []  # claimed with the completions of the previous batch
        while True:
            room = _room(plan, report, 0)
            stop = "stop" if halt.is_set() else "" if room else "max_jobs"
            if stop:
                self._give_back(plan, carried, report)
                return stop
            claimed, carried = carried or self._claim(plan, room, report), []
            if not claimed:
                if plan.idle_timeout is not None and time.monotonic() - idle_since >= plan.idle_timeout:
                    return "idle"
                continue
            idle_since = time.monotonic()
            carried = self._run(plan, claimed, handler, halt, report)

    def _claim(self, plan: _Plan, n: int, report: WorkerReport) -> list[models.Job]:
        """Claim ``n`` straight into running: one job, or a batch in one Redis script and one
        commit. A failure raises, after giving back what it may have claimed unheard."""
        wait = 0.0 if plan.idle_timeout == 0 else plan.poll
        try:
            if n == 1:
                one = self.batches.dequeue(plan.worker_id, queues=plan.queues, timeout=wait,
                                           start=True)
                return [] if one is None else [one]
            return self.batches.dequeue_many(plan.worker_id, n, queues=plan.queues,
                                             timeout=wait, start=True)
        except errors.StorageUnavailable as exc:
            self._take_back(plan, exc, [], report)
            raise

    def _run(self, plan: _Plan, claimed: list[models.Job], handler: Callable[[models.Job], Any],
             halt: threading.Event, report: WorkerReport) -> list[models.Job]:
        """Run the handler on the claims (until a stop), report them; return a fused next claim."""
        done: list[tuple[models.Job, Any]] = []
        failed: list[tuple[models.Job, str]] = []
        ran = 0
        try:
            for job in claimed:
                if halt.is_set() or not _room(plan, report, ran):
                    break
                ran += 1
                try:  # a result that is not JSON fails its job alone
                    done.append((job, validate.json_value("result", handler(job))))
                except Exception as exc:  # noqa: BLE001 - the handler's failure is the job's
                    failed.append((job, f"{type(exc).__name__}: {exc}"[:10_000]))
        finally:
            self._give_back(plan, claimed[ran:], report)
        self._settle(plan, failed, "error", report)
        more = _room(plan, report, len(done))
        if done and more and not halt.is_set():
            return self._complete_and_claim(plan, done, more, report)
        self._settle(plan, done, "result", report)
        return []

    def _complete_and_claim(self, plan: _Plan, done: list[tuple[models.Job, Any]], more: int,
                            report: WorkerReport) -> list[models.Job]:
        """One commit: complete the jobs that ran and claim up to ``more`` straight into running."""
        try:
            outcomes, nxt = self.batches.complete_and_dequeue_many(
                _items(done, "result"), more, worker_id=plan.worker_id, queues=plan.queues, start=True)
        except (errors.StorageUnavailable, errors.NotFound, errors.ValidationError) as exc:
            # The claim needs Redis and an active worker (the results were checked in _run),
            # the completions only PostgreSQL: record them alone; the loop's next claim
            # meets the cause.
            log.warning("completing without the next claim: %s", exc,
                        extra={"action": "run_worker"})
            self._recover(plan, done, exc, report)
            return []
        _count(outcomes, "result", report)
        return nxt

    def _recover(self, plan: _Plan, done: list[tuple[models.Job, Any]], exc: errors.ToolkitError,
                 report: WorkerReport) -> None:
        """After a fused call failed: complete ``done`` alone, then undo what that call may have
        committed unheard (:meth:`_take_back`).

        Each completion is fenced by its attempt, so one the call did commit is refused, not
        done twice (a reaped worker's are refused too); refused as completed already, its
        fences matched, and it counts as completed.
        """
        outcomes = self.batches.complete_jobs(_items(done, "result"), worker_id=plan.worker_id)
        counted = [job if _completed_already(out) else out
                   for (job, _), out in zip(done, outcomes, strict=True)]
        _count(counted, "result", report)
        landed = [job.id for (job, _), out in zip(done, counted, strict=True) if out is job]
        self._take_back(plan, exc, landed, report)

    def _take_back(self, plan: _Plan, exc: errors.ToolkitError, landed: list[str],
                   report: WorkerReport) -> None:
        """Undo what a failed claiming call may have committed unheard (its ``COMMIT``'s reply
        was lost): give back the jobs it claimed (``exc.claimed``) that PostgreSQL holds for
        this worker, then bring Redis and memory up to what it wrote (``landed``: the jobs
        it completed). When PostgreSQL cannot take the give-back, that error raises: the
        loop stops beating, and the reaper returns the jobs once the heartbeat expires."""
        claimed = list(exc.claimed) if isinstance(exc, errors.StorageUnavailable) else []
        if claimed:
            back = self.dispatch.return_unstarted(plan.worker_id, claimed)
            report.returned += len(back)
            if back:
                log.warning("gave back %d claims a failed call had committed", len(back),
                            extra={"action": "run_worker"})
        if landed or claimed:
            try:
                self.batches.pipe.resync_jobs(landed + claimed)
            except errors.StorageUnavailable as again:  # the watermark stays pinned for it
                log.warning("Redis not brought up to a failed call's commit (caught up once "
                            "Redis answers again): %s", again, extra={"action": "run_worker"})

    def _settle(self, plan: _Plan, outcomes: list[tuple[models.Job, Any]], field: str,
                report: WorkerReport) -> None:
        """Complete (``result``) or fail (``error``) the jobs that ran, in one commit."""
        if not outcomes:
            return
        verb = self.batches.complete_jobs if field == "result" else self.batches.fail_jobs
        _count(verb(_items(outcomes, field), worker_id=plan.worker_id), field, report)

    def _give_back(self, plan: _Plan, jobs: list[models.Job], report: WorkerReport) -> None:
        if jobs:
            back = self.dispatch.return_unstarted(plan.worker_id, [j.id for j in jobs])
            report.returned += len(back)


def _items(ran: list[tuple[models.Job, Any]], field: str) -> list[dict[str, Any]]:
    """The batch items of jobs that ran, each with its ``result`` or ``error`` and fenced by
    its attempt."""
    return [{"job_id": j.id, field: value, "attempt": j.attempts} for j, value in ran]


def _completed_already(outcome: Any) -> bool:
    """Whether a completion was refused because its job is completed already in the attempt
    and by the worker it was fenced to (the fences are checked first, see
    ``Pipeline.refusal``)."""
    return (type(outcome) is errors.InvalidTransition
            and outcome.current == models.JobStatus.COMPLETED.value)


def _count(outcomes: Sequence[Any], field: str, report: WorkerReport) -> None:
    """Count each outcome of a completion (``result``) or failure (``error``) batch."""
    for out in outcomes:
        if not isinstance(out, models.Job):
            log.warning("job result not recorded: %s", out, extra={"action": "run_worker"})
            report.lost += 1
        elif field == "result":
            report.completed += 1
        else:
            report.failed += 1


def _room(plan: _Plan, report: WorkerReport, running: int) -> int:
    """How many jobs the next claim may take, counting ``running`` jobs not reported yet: a
    batch, fewer near ``max_jobs``, 0 when it is reached (a loop never claims a job it will
    not run, unless it is stopped)."""
    if plan.max_jobs is None:
        return plan.batch
    left = plan.max_jobs - (report.completed + report.failed + report.lost + running)
    return max(0, min(plan.batch, left))


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
