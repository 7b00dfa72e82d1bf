"""Profile one toolkit operation with pyinstrument (to find why a ratio misses).

    python -m benchmarks.profile CASE [-n N] [--flat]   (CASE: bulk, write, start, read_pg, drain,
                                                fused, batch, fused_batch, heartbeat, incr, rebuild, jobs)

Needs ``pip install pyinstrument``. Runs on DATABASE_URL/REDIS_URL or the
embedded stack, in a fresh schema and namespace removed afterwards, and prints
the call tree of the timed part only (setup is not profiled).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import toolkit
from benchmarks import flow, harness, queues

Prepared = Callable[[], object]


def _bulk(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    specs = harness.job_specs(1000)
    return lambda: [sm.create_workflow(f"p{i}", jobs=specs) for i in range(max(1, n // 1000))]


def _write(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    wf = sm.create_workflow("p").id
    sm.update_workflow_status(wf, "running")
    return lambda: [sm.update_workflow_status(wf, ("failed", "running")[i % 2]) for i in range(n)]


def _start(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    w = sm.register_worker("p").id
    queues.queued_jobs(sm, n)
    ids = [j.id for j in sm.list_jobs(status="queued")]
    for j in ids:
        sm.assign_job(j, w)
    return lambda: [sm.start_job(j) for j in ids]


def _read_pg(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    queues.queued_jobs(sm, n)
    ids = [j.id for j in sm.list_jobs()]

    def go() -> None:
        for j in ids:
            sm.memory.clear()
            sm.redis.redis.delete(f"{{{sm.ns}}}:job:{j}")
            sm.get_job(j)

    return go


def _drain(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    w = sm.register_worker("p").id
    queues.queued_jobs(sm, n)
    return lambda: queues.drain(sm, w, n)


def _fused(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    w = sm.register_worker("p").id
    queues.queued_jobs(sm, n)
    return lambda: flow.drain_fused(sm, w, n)


def _batch(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    w = sm.register_worker("p").id
    queues.queued_jobs(sm, n)
    return lambda: flow.drain_batched(sm, w, n)


def _fused_batch(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    w = sm.register_worker("p").id
    queues.queued_jobs(sm, n)
    return lambda: flow.drain_fused_batched(sm, w, n)


def _heartbeat(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    ids = [sm.register_worker(f"p{i}").id for i in range(n)]
    return lambda: [sm.heartbeat(w) for w in ids]


def _incr(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    return lambda: [sm.incr_metric("p") for _ in range(n)]


def _rebuild(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    harness.add_raw_jobs(b, sm.settings.schema, n, status="queued")

    def go() -> None:
        b.wipe(sm.ns)
        sm.rebuild(progress=False)

    return go


def _jobs(sm: toolkit.StateManager, b: harness.Bench, n: int) -> Prepared:
    harness.add_raw_jobs(b, sm.settings.schema, n, status="completed")
    return lambda: sm.inspector.jobs()


CASES: dict[str, Callable[[toolkit.StateManager, harness.Bench, int], Prepared]] = {
    "bulk": _bulk, "write": _write, "start": _start, "read_pg": _read_pg, "drain": _drain,
    "fused": _fused, "batch": _batch, "fused_batch": _fused_batch,
    "heartbeat": _heartbeat, "incr": _incr, "rebuild": _rebuild, "jobs": _jobs,
}


def main() -> None:
    from pyinstrument import Profiler

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("case", choices=sorted(CASES))
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--flat", action="store_true",
                   help="cProfile's functions by their own time instead of pyinstrument's tree")
    args = p.parse_args()
    label = harness._targets("auto")[0]
    with harness.open_target(label) as t:
        bench = harness.Bench(t, label, True, "profile", harness.machine_facts())
        with bench.state_manager("profile") as sm:
            op = CASES[args.case](sm, bench, args.n)
            if args.flat:
                _flat(op)
                return
            profiler = Profiler(interval=0.0005)
            profiler.start()
            op()
            profiler.stop()
            print(profiler.output_text(unicode=False, color=False))


def _flat(op: Prepared) -> None:
    import cProfile
    import pstats

    with cProfile.Profile() as prof:
        op()
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
