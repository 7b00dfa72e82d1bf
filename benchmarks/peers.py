"""End-to-end job flow, one worker, no-op jobs: the toolkit against Celery 5 and RQ.

    python -m benchmarks.peers [--quick] [--target ...]

Cases
-----
peers.drain.vs_celery / peers.drain.vs_rq
    Toolkit: one in-process worker loops ``dequeue`` (pop + assign), ``start_job``,
    ``complete_job`` over N queued no-op jobs (created untimed beforehand), in
    jobs/s. Celery 5 ``worker --pool=solo`` and RQ ``SimpleWorker`` (burst) drain
    N pre-enqueued no-op tasks from the same Redis; their rate is taken between
    the first and the last task's wall-clock marks, so start-up is not counted.
    Goals: >= 1.5x Celery, >= 3x RQ.

Celery and RQ are installed into ``benchmarks/.peers-venv`` (created on first
use, gitignored), never into the project's environment. Every peer key,
queue, job id and worker name carries a random prefix; only those keys are
removed afterwards.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from benchmarks import harness, queues

HERE = Path(__file__).resolve().parent
VENV = HERE / ".peers-venv"
STAMP = VENV / ".installed"
# pgqueuer and procrastinate are the PostgreSQL-backed peers of ``benchmarks.pg_peers``.
PEER_PACKAGES = ("celery[redis]>=5.3,<6", "rq>=1.16", "redis>=5",
                 "pgqueuer[asyncpg]>=1.6,<2", "procrastinate>=3.10,<4")
PEER_TIMEOUT = 600.0


def peer_python() -> Path:
    """The peers' interpreter: their venv, created on first use, topped up when PEER_PACKAGES changes.

    The stamp file holds the package list it was installed with; a venv whose
    stamp differs (or an older, empty stamp) gets the list installed again.
    """
    python = VENV / "bin" / "python"
    wanted = "\n".join(PEER_PACKAGES) + "\n"
    if not python.exists():
        print("   creating benchmarks/.peers-venv", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    if not STAMP.exists() or STAMP.read_text() != wanted:
        print(f"   installing into benchmarks/.peers-venv: {', '.join(PEER_PACKAGES)}", flush=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
        STAMP.write_text(wanted)
    return python


def _env(redis_url: str, prefix: str) -> dict[str, str]:
    return {**os.environ, "BENCH_REDIS_URL": redis_url, "BENCH_PREFIX": prefix,
            "PYTHONPATH": str(HERE)}


def _wait_for(bench: harness.Bench, key: str, proc: subprocess.Popen[bytes]) -> None:
    r = bench.redis()
    deadline = time.monotonic() + PEER_TIMEOUT
    try:
        while not r.exists(key):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{key} not set within {PEER_TIMEOUT}s")
            if proc.poll() is not None and not r.exists(key):
                raise RuntimeError(f"peer worker exited with {proc.returncode} before {key}")
            time.sleep(0.05)
    finally:
        r.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _worker_cmd(python: Path, peer: str) -> list[str]:
    if peer == "rq":
        return [str(python), str(HERE / "_peer_app.py"), "work", "rq"]
    return [str(python), "-m", "celery", "-A", "_peer_app", "worker", "--pool=solo", "-c", "1",
            "--without-mingle", "--without-gossip", "--without-heartbeat", "-l", "WARNING"]


def peer_drain(bench: harness.Bench, python: Path, peer: str, n: int) -> float:
    """Seconds a peer worker takes from the first to the last of ``n`` no-op tasks."""
    prefix = f"benchpeer_{uuid.uuid4().hex[:8]}"
    env = _env(bench.target.redis_url, prefix)
    try:
        subprocess.run([str(python), str(HERE / "_peer_app.py"), "enqueue", peer, str(n)],
                       env=env, cwd=HERE, check=True)
        harness.RESULTS.mkdir(exist_ok=True)
        with (harness.RESULTS / f"{peer}-worker.log").open("ab") as log:
            proc = subprocess.Popen(_worker_cmd(python, peer), env=env, cwd=HERE,
                                    stdout=log, stderr=log)
        try:
            _wait_for(bench, f"{prefix}:last", proc)
        finally:
            _stop(proc)
        r = bench.redis()
        first, last = float(r.get(f"{prefix}:first") or 0), float(r.get(f"{prefix}:last") or 0)
        r.close()
        return (last - first) * n / max(1, n - 1)
    finally:
        _cleanup(bench, prefix)


def _cleanup(bench: harness.Bench, prefix: str) -> None:
    """Remove this run's peer keys only: ours carry ``prefix``; RQ's shared sets lose our names."""
    r = bench.redis()
    harness.unlink_prefix(r, f"{prefix}*")
    harness.unlink_prefix(r, f"rq:*{prefix}*")
    for shared in ("rq:workers", "rq:queues"):
        ours = [m for m in r.smembers(shared) if prefix in m]
        if ours:
            r.srem(shared, *ours)
    r.close()


def _peer_versions(python: Path) -> str:
    out = subprocess.run([str(python), str(HERE / "_peer_app.py"), "versions"], cwd=HERE,
                         capture_output=True, text=True, check=True, env=_env("redis://", "x"))
    return out.stdout.strip()


def run(bench: harness.Bench) -> None:
    n = bench.n(5_000, 500)
    runs = 3
    python = peer_python()
    versions = _peer_versions(python)
    with bench.state_manager("peers") as sm:
        worker = sm.register_worker("bench-drain").id

        def drain() -> None:
            assert queues.drain(sm, worker, n) == n

        tk = harness.rate(n, harness.time_runs(drain, runs,
                                               setup=lambda: queues.queued_jobs(sm, n)), "jobs/s")
    for peer, goal in (("celery", 1.5), ("rq", 3.0)):
        if not bench.wants(f"peers.drain.vs_{peer}"):
            continue
        took = [peer_drain(bench, python, peer, n) for _ in range(runs)]
        name = "Celery --pool=solo" if peer == "celery" else "RQ SimpleWorker"
        bench.record("peers", f"peers.drain.vs_{peer}", n, tk, harness.rate(n, took, "jobs/s"),
                     harness.at_least(goal), floor_name=name, extra={"peers": versions})


if __name__ == "__main__":
    harness.main(run, __doc__)
