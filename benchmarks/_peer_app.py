"""The peers' side of ``benchmarks.peers``: a Celery app, an RQ task, enqueue and work commands.

Runs inside ``benchmarks/.peers-venv`` (Celery and RQ are never toolkit
dependencies), configured by environment variables:

``BENCH_REDIS_URL``  the broker (the same Redis the toolkit uses in the run)
``BENCH_PREFIX``     every key, queue, job id and worker name begins with it

    python _peer_app.py enqueue celery|rq N
    python _peer_app.py work rq                      # RQ SimpleWorker, burst mode
    celery -A _peer_app worker --pool=solo ...       # the Celery worker

The no-op task records the wall-clock time of the first and the last job in
``<prefix>:first`` and ``<prefix>:last``: the drain rate is measured between
them, so worker start-up does not count.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import redis
from celery import Celery

URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("BENCH_PREFIX", "benchpeer")
QUEUE = f"{PREFIX}-queue"

app = Celery("bench_peer", broker=URL)
app.conf.update(
    broker_transport_options={"global_keyprefix": f"{PREFIX}:"},
    task_ignore_result=True,
    task_default_queue=QUEUE,
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

_marks = redis.Redis.from_url(URL)


def mark(i: int, last: int) -> None:
    """The no-op job: note the time of the first and the last one."""
    if i == 0:
        _marks.set(f"{PREFIX}:first", repr(time.time()))
    if i == last:
        _marks.set(f"{PREFIX}:last", repr(time.time()))


@app.task(name="noop")  # type: ignore[misc]
def noop(i: int, last: int) -> None:
    mark(i, last)


def enqueue_celery(n: int) -> None:
    for i in range(n):
        noop.apply_async((i, n - 1), queue=QUEUE)


def enqueue_rq(n: int) -> None:
    from rq import Queue

    q = Queue(QUEUE, connection=redis.Redis.from_url(URL))
    for start in range(0, n, 1000):
        jobs = [Queue.prepare_data("_peer_app.mark", (i, n - 1), job_id=f"{PREFIX}-{i}", result_ttl=0)
                for i in range(start, min(n, start + 1000))]
        q.enqueue_many(jobs)


def work_rq() -> None:
    from rq import Queue, SimpleWorker

    conn = redis.Redis.from_url(URL)
    worker = SimpleWorker([Queue(QUEUE, connection=conn)], connection=conn, name=f"{PREFIX}-worker")
    worker.work(burst=True, logging_level="WARNING")


def main(argv: list[str]) -> None:
    command, peer = argv[0], argv[1]
    if command == "enqueue":
        (enqueue_celery if peer == "celery" else enqueue_rq)(int(argv[2]))
    elif command == "work" and peer == "rq":
        work_rq()
    else:
        raise SystemExit(f"unknown command: {' '.join(argv)}")


def versions() -> dict[str, Any]:
    import celery
    import rq

    return {"celery": celery.__version__, "rq": rq.__version__}


if __name__ == "__main__":
    if sys.argv[1:] == ["versions"]:
        print(versions())
    else:
        main(sys.argv[1:])
