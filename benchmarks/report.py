"""Print the results of a benchmark run as markdown tables.

    python -m benchmarks.report [RUN_ID | path/to/results.jsonl]

Without an argument, the newest file in ``benchmarks/results/``. One table per
target (case, toolkit, raw floor, ratio, goal, pass/fail) and, when the run
covered both targets, the embedded stack against the loopback servers
(every case within 0.8-1.2x). A miss is marked, never an error: the exit
status is 0 whatever the ratios.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS

Line = dict[str, Any]
SAME_BAND = (0.8, 1.2)


def load(run: str | None = None) -> list[Line]:
    """The lines of one run (a run id, a path, or the newest run)."""
    if run and Path(run).is_file():
        path = Path(run)
    elif run:
        path = RESULTS / f"{run}.jsonl"
    else:
        files = sorted(RESULTS.glob("*.jsonl"), key=lambda f: f.stat().st_mtime)
        if not files:
            return []
        path = files[-1]
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def _measure(stats: Line | None, metric: str) -> str:
    if not stats:
        return "-"
    main = stats.get(metric) if stats.get(metric) is not None else stats["median"]
    if stats.get("p99") is not None:
        return f"p50 {_fmt(stats['p50'])} / p99 {_fmt(stats['p99'])} {stats['unit']}"
    return (f"{_fmt(main, stats['unit'])} ({_fmt(stats['min'])}-{_fmt(stats['max'])}, "
            f"{stats['runs']} runs)")


def _row(line: Line) -> str:
    ratio = "-" if line["ratio"] is None else f"{line['ratio']:.2f}"
    verdict = "pass" if line["pass"] else "**MISS**"
    floor = _measure(line["floor"], line["metric"])
    if line.get("floor_name"):
        floor = f"{line['floor_name']}: {floor}"
    note = f" {line['note']}" if line.get("note") else ""
    return (f"| {line['case']} | {line['n']:,} | {_measure(line['toolkit'], line['metric'])} | "
            f"{floor} | {ratio} | {line['goal']} | {verdict}{note} |")


def _header(lines: list[Line]) -> str:
    first = lines[0]
    return (f"run {first['run_id']} ({'quick' if first['quick'] else 'full'} N), {first['date']}, "
            f"toolkit {first['toolkit_version']}, Python {first['python']}, PostgreSQL {first['postgres']}, "
            f"Redis {first['redis']}, {first['nproc']} x {first['cpu']}, {first['os']}")


def _target_table(target: str, lines: list[Line]) -> list[str]:
    out = [f"### target: {target}", "", _header(lines), "",
           "| case | N | toolkit (median, min-max) | raw floor | ratio | goal | result |",
           "|---|---:|---|---|---:|---|---|"]
    out += [_row(x) for x in lines]
    misses = sum(1 for x in lines if not x["pass"])
    out += ["", f"{len(lines) - misses} pass, {misses} miss", ""]
    return out


def _compare_targets(by_target: dict[str, list[Line]]) -> list[str]:
    loop = {x["case"]: x for x in by_target.get("loopback", [])}
    emb = {x["case"]: x for x in by_target.get("embedded", [])}
    shared = [c for c in loop if c in emb]
    if not shared:
        return []
    out = ["### embedded stack vs loopback servers (toolkit figure, embedded / loopback)", "",
           "| case | loopback | embedded | embedded/loopback | goal 0.8-1.2 |", "|---|---|---|---:|---|"]
    for case in shared:
        a, b = loop[case], emb[case]
        va = a["toolkit"].get(a["metric"]) or a["toolkit"]["median"]
        vb = b["toolkit"].get(b["metric"]) or b["toolkit"]["median"]
        ratio = vb / va if va else float("nan")
        ok = SAME_BAND[0] <= ratio <= SAME_BAND[1]
        out.append(f"| {case} | {_fmt(va, a['toolkit']['unit'])} | {_fmt(vb, b['toolkit']['unit'])} | "
                   f"{ratio:.2f} | {'pass' if ok else '**MISS**'} |")
    return [*out, ""]


def render(lines: list[Line]) -> str:
    """The markdown report of one run's lines."""
    if not lines:
        return "no results (run `python -m benchmarks.run --quick` first)"
    by_target: dict[str, list[Line]] = {}
    for x in lines:
        by_target.setdefault(x["target"], []).append(x)
    out: list[str] = []
    for target, rows in by_target.items():
        out += _target_table(target, rows)
    out += _compare_targets(by_target)
    return "\n".join(out)


def main() -> None:
    print(render(load(sys.argv[1] if len(sys.argv) > 1 else None)))


if __name__ == "__main__":
    main()
