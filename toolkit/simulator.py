"""A small workload simulator: worker threads that dequeue, heartbeat, run, complete or fail jobs.

It drives the scenarios and the notebooks so that they show a living system
rather than three hand-made rows. Every acknowledged write is reported to an
optional callback, so a crash test can later prove that none was lost.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from toolkit import errors

if TYPE_CHECKING:
    from toolkit.state import StateManager

log = logging.getLogger(__name__)

Ack = Callable[[str, str, str], None]
"""Called as ``ack(action, job_id, worker_id)`` after each acknowledged write."""


class Simulator:
    """N worker threads working through the queues of one StateManager.

    Parameters
    ----------
    sm
        The StateManager the workers talk to.
    workers
        How many worker threads.
    failure_rate
        Probability that a job attempt fails (it is retried while attempts remain).
    job_seconds
        How long each job "runs".
    queues
        Queues the workers serve.
    seed
        Seed of the failure draws (reproducible runs).
    on_ack
        Called after every acknowledged write (see :data:`Ack`).
    prefix
        Worker ids are ``f"{prefix}-{i}"``.
    """

    def __init__(self, sm: StateManager, *, workers: int = 4, failure_rate: float = 0.1,
                 job_seconds: float = 0.01, queues: tuple[str, ...] = ("default",),
                 seed: int | None = 0, on_ack: Ack | None = None, prefix: str = "worker") -> None:
        if not 0 <= failure_rate <= 1:
            raise errors.ValidationError("failure_rate", failure_rate, "must be between 0 and 1")
        self.sm = sm
        self.worker_ids = [f"{prefix}-{i}" for i in range(workers)]
        self.failure_rate = failure_rate
        self.job_seconds = job_seconds
        self.queues = queues
        self._random = random.Random(seed)
        self._on_ack = on_ack
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.errors: list[BaseException] = []

    def start(self) -> Simulator:
        """Register the workers and start their threads."""
        for wid in self.worker_ids:
            self.sm.register_worker(wid, queues=self.queues, capacity=1, metadata={"simulated": True})
            t = threading.Thread(target=self._work, args=(wid,), name=f"sim-{wid}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the workers to stop after their current job and wait for them."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def run_until_idle(self, timeout: float = 60.0, idle: float = 0.3) -> bool:
        """Wait until no job is left to take (or ``timeout``); return whether it went idle."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            busy = any(j.status in ("queued", "assigned", "running")
                       for j in self.sm.memory.live("job"))
            if busy:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= idle:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ack(self, action: str, job_id: str, worker_id: str) -> None:
        with self._lock:
            self.counts[action] += 1
        if self._on_ack is not None:
            self._on_ack(action, job_id, worker_id)

    def _work(self, worker_id: str) -> None:
        last_beat = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() - last_beat > 0.5:
                    self.sm.heartbeat(worker_id)
                    last_beat = time.monotonic()
                job = self.sm.dequeue(worker_id, timeout=0.2)
                if job is None:
                    continue
                self._ack("assigned", job.id, worker_id)
                self._run(job.id, worker_id)
            except errors.ToolkitError as exc:
                log.debug("worker %s: %s", worker_id, exc, extra={"action": "simulate"})
                with self._lock:
                    self.errors.append(exc)
                self._stop.wait(0.1)

    def _run(self, job_id: str, worker_id: str) -> None:
        self.sm.start_job(job_id)
        self._ack("started", job_id, worker_id)
        if self.job_seconds:
            time.sleep(self.job_seconds)
        with self._lock:
            fail = self._random.random() < self.failure_rate
        if fail:
            # Retried at once, as before retries backed off: the scenarios time their runs.
            self.sm.fail_job(job_id, "simulated failure", retry_in=0)
            self._ack("failed", job_id, worker_id)
        else:
            self.sm.complete_job(job_id, {"worker": worker_id})
            self._ack("completed", job_id, worker_id)


def make_workflows(sm: StateManager, count: int, jobs_per_workflow: int, *,
                   seed: int = 0, prefix: str = "wf") -> list[Any]:
    """Create ``count`` workflows of ``jobs_per_workflow`` jobs: mixed priorities, a few dependencies."""
    rng = random.Random(seed)
    made = []
    for i in range(count):
        jobs: list[dict[str, Any]] = []
        for k in range(jobs_per_workflow):
            job: dict[str, Any] = {"name": f"step-{k:03d}", "priority": rng.choice([0, 0, 1, 5, 9]),
                                   "payload": {"n": k}, "max_attempts": 3}
            if k and rng.random() < 0.2:
                job["depends_on"] = [f"step-{rng.randrange(k):03d}"]
            jobs.append(job)
        made.append(sm.create_workflow(f"{prefix}-{i:03d}", jobs=jobs, metadata={"batch": i}))
    return made
