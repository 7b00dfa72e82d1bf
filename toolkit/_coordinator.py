"""A coordinator process for the crash scenarios: ``python -m toolkit._coordinator``.

It connects with ``DATABASE_URL`` and ``REDIS_URL`` from the environment (never
from the command line, where ``ps`` would show a password), creates a workload,
runs simulated workers on it, and prints one JSON line per acknowledged write
until it is killed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Callable

from toolkit import failpoints, simulator, state


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toolkit._coordinator")
    p.add_argument("--namespace", required=True)
    p.add_argument("--schema", required=True)
    p.add_argument("--workflows", type=int, default=20)
    p.add_argument("--jobs", type=int, default=25)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--failure-rate", type=float, default=0.1)
    p.add_argument("--job-seconds", type=float, default=0.01)
    p.add_argument("--heartbeat-ttl", type=float, default=30.0)
    p.add_argument("--crash-after-commit", default=None, metavar="ACTION",
                   help="SIGKILL this process right after the first commit of ACTION, before Redis")
    p.add_argument("--crash-after-claim", action="store_true",
                   help="SIGKILL this process right after its first Redis pop, before PostgreSQL")
    p.add_argument("--claim-lease", type=float, default=None,
                   help="seconds a popped job stays in flight before it is returned")
    return p


def _arm_crashes(args: argparse.Namespace, emit: Callable[[dict[str, str]], None]) -> None:
    """Arm the fail points the arguments name: SIGKILL this process when one is reached."""
    def crash(detail: str) -> None:
        emit({"a": "crashing", "id": detail})
        os.kill(os.getpid(), signal.SIGKILL)

    if args.crash_after_commit:
        failpoints.arm("after_commit",
                       lambda action: crash(action) if action == args.crash_after_commit else None)
    if args.crash_after_claim:
        failpoints.arm("after_claim", crash)


def main(argv: list[str] | None = None) -> None:
    """Run the coordinator until killed."""
    args = _parser().parse_args(argv)
    out = threading.Lock()

    def emit(record: dict[str, str]) -> None:
        with out:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()

    sm = state.init_state_manager(namespace=args.namespace, schema=args.schema,
                                  heartbeat_ttl=args.heartbeat_ttl)
    _arm_crashes(args, emit)
    if args.claim_lease is not None:
        sm.claim_lease = args.claim_lease
    for wf in simulator.make_workflows(sm, args.workflows, args.jobs, prefix="demo"):
        emit({"a": "workflow", "id": wf.id})
    emit({"a": "ready", "id": ""})
    sim = simulator.Simulator(sm, workers=args.workers, failure_rate=args.failure_rate,
                              job_seconds=args.job_seconds, prefix="coord-worker",
                              on_ack=lambda a, j, w: emit({"a": a, "id": j, "w": w}))
    sim.start()
    threading.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    main()
