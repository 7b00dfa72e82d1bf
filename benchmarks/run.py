"""Run every benchmark area, then print the report.

    python -m benchmarks.run [--quick] [--target auto|embedded|loopback|both] [--only PREFIX ...]

``make bench-quick`` runs ``--quick`` on one target (minutes; CI runs it);
``make bench`` runs full N on both targets (the loopback servers from
DATABASE_URL/REDIS_URL, and the embedded stack). Exits 0 whatever the ratios:
the report marks the misses.
"""

from __future__ import annotations

from benchmarks import (
    actions,
    bulk,
    counters,
    flow,
    flow_goals,
    harness,
    inspection,
    locks,
    memtier,
    peers,
    pg_peers,
    queues,
    recovery,
    report,
    schedule,
    single,
)

AREAS: list[tuple[str, harness.Area]] = [
    ("bulk", bulk.run),
    ("actions", actions.run),
    ("single", single.run),
    ("queues", queues.run),
    ("peers", peers.run),
    ("pgpeers", pg_peers.run),
    ("flow", flow.run),
    ("flowgoals", flow_goals.run),
    ("locks", locks.run),
    ("counters", counters.run),
    ("recovery", recovery.run),
    ("inspection", inspection.run),
    ("memtier", memtier.run),
    ("schedule", schedule.run),
]


def main() -> None:
    args = harness.parser(__doc__).parse_args()
    run_id = harness.run_areas(AREAS, args)
    print()
    print(report.render(report.load(run_id)))


if __name__ == "__main__":
    main()
