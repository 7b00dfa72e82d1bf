"""Execute the notebooks in place and normalize them, so stored notebooks are reproducible.

Usage (from the repository root; ``make notebooks`` and ``make notebooks-check`` call it)::

    python notebooks/tools.py run   [NOTEBOOK ...]   # execute with nbclient, then normalize
    python notebooks/tools.py check [NOTEBOOK ...]   # exit 1 when a stored notebook is not clean
    python notebooks/tools.py normalize [NOTEBOOK ...]

Without arguments every ``notebooks/[0-9]*.ipynb`` is used. ``run`` twice in a row
gives byte-identical files: the kernel is this interpreter (``sys.executable``),
no timing is recorded, cell ids are ``cell-00``, ``cell-01`` ..., widget state is
dropped and widget model ids become ``widget-00`` ..., and the kernelspec and
``language_info`` are fixed values without a Python patch version.

Only the standard library, ``nbformat`` and ``nbclient`` are imported, and
``nbclient`` only by ``run``: ``check`` needs no kernel (the unit test
``tests/unit/test_notebooks_clean.py`` imports :func:`problems`).
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
import time
from pathlib import Path
from typing import Any

import nbformat

HERE = Path(__file__).resolve().parent
NB_VERSION = 4
NB_MINOR = 5
TIMEOUT_S = 120
"""Per-cell timeout of ``run`` (a notebook should finish in well under a minute)."""

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
LANGUAGE_INFO = {
    "codemirror_mode": {"name": "ipython", "version": 3},
    "file_extension": ".py",
    "mimetype": "text/x-python",
    "name": "python",
    "nbconvert_exporter": "python",
    "pygments_lexer": "ipython3",
    "version": "3",
}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
CELL_METADATA_DROP = ("execution", "collapsed", "scrolled", "ExecuteTime", "jp-MarkdownHeadingCollapsed")
"""Per-cell metadata that records a session rather than the notebook."""
IGNORE_OUTPUT = "# NBVAL_IGNORE_OUTPUT"
"""Timing cells carry this comment: nbval does not compare their output."""
VARIES = re.compile(r"\d+\.\d+")
"""In a timing cell's stored output, decimal numbers become ``<varies>`` (a live run shows them)."""
THIS_RUN = re.compile(r"^this run:.*$", re.MULTILINE)
"""In such a cell, a line starting ``this run:`` holds run-to-run counts: all its numbers are masked."""
SILENT_TAG = "no-output"
"""A code cell tagged with this is allowed to have no stored output."""


def notebooks(paths: list[str] | None = None) -> list[Path]:
    """The notebooks to work on: ``paths``, or every numbered notebook next to this file."""
    if paths:
        return [Path(p) for p in paths]
    return sorted(HERE.glob("[0-9]*.ipynb"))


def normalize(nb: Any) -> Any:
    """Return a copy of ``nb`` without anything that changes from one run to the next."""
    nb = copy.deepcopy(nb)
    nb.nbformat, nb.nbformat_minor = NB_VERSION, NB_MINOR
    nb.metadata.pop("widgets", None)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = copy.deepcopy(LANGUAGE_INFO)
    widget_ids: dict[str, str] = {}
    count = 0
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
        for key in CELL_METADATA_DROP:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            continue
        count += 1  # every code cell runs, top to bottom, exactly once
        cell.execution_count = count
        cell.outputs = _merge_streams(cell.outputs)
        if IGNORE_OUTPUT in cell.source:
            _mask_numbers(cell.outputs)
        for out in cell.outputs:
            if out.output_type == "execute_result":
                out["execution_count"] = count
            data = out.get("data", {})
            if WIDGET_VIEW in data:
                model = data[WIDGET_VIEW].get("model_id", "")
                data[WIDGET_VIEW]["model_id"] = widget_ids.setdefault(
                    model, f"widget-{len(widget_ids):02d}")
    return nb


def _merge_streams(outputs: list[Any]) -> list[Any]:
    """Join consecutive stream outputs of one stream: how a print is chunked depends on timing."""
    merged: list[Any] = []
    for out in outputs:
        if (out.output_type == "stream" and merged and merged[-1].output_type == "stream"
                and merged[-1].name == out.name):
            merged[-1].text = _text(merged[-1].text) + _text(out.text)
        else:
            if out.output_type == "stream":
                out.text = _text(out.text)
            merged.append(out)
    return merged


def _mask_numbers(outputs: list[Any]) -> None:
    for out in outputs:
        if out.output_type == "stream":
            out.text = _masked(_text(out.text))
        elif "text/plain" in out.get("data", {}):
            out.data["text/plain"] = _masked(_text(out.data["text/plain"]))


def _masked(text: str) -> str:
    text = VARIES.sub("<varies>", text)
    return THIS_RUN.sub(lambda m: re.sub(r"\d+", "<varies>", m.group(0)), text)


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _ran_silently(cell: Any) -> bool:
    return SILENT_TAG in cell.metadata.get("tags", [])


def dumps(nb: Any) -> str:
    """The on-disk text of ``nb``: nbformat's JSON layout plus one trailing newline."""
    text: str = nbformat.writes(nb, version=NB_VERSION)
    return text if text.endswith("\n") else text + "\n"


def problems(path: Path) -> list[str]:
    """Why the stored notebook at ``path`` is not clean (empty when it is)."""
    text = path.read_text(encoding="utf-8")
    nb = nbformat.reads(text, as_version=NB_VERSION)
    found = []
    if dumps(normalize(nb)) != text:
        found.append("not normalized (run `make notebooks`)")
    if "widgets" in nb.metadata:
        found.append("widget state in notebook metadata")
    if nb.metadata.get("language_info", {}).get("version", "").count(".") >= 2:
        found.append("language_info.version has a patch version")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        if any(k in cell.metadata for k in CELL_METADATA_DROP):
            volatile = sorted(set(cell.metadata) & set(CELL_METADATA_DROP))
            found.append(f"cell {i}: volatile metadata {volatile}")
        if not cell.outputs and not _ran_silently(cell):
            found.append(f"cell {i}: no stored output (run `make notebooks`, or tag it {SILENT_TAG!r})")
        for out in cell.outputs:
            if out.output_type == "error":
                found.append(f"cell {i}: stored an error ({out.get('ename')})")
            if out.output_type == "stream" and out.get("name") == "stderr":
                found.append(f"cell {i}: stored stderr output")
    return found


def run(path: Path) -> float:
    """Execute ``path`` in place with this interpreter's kernel, normalize it; return seconds."""
    import nbclient
    from jupyter_client.kernelspec import KernelSpec
    from jupyter_client.manager import KernelManager

    nb = nbformat.read(path, as_version=NB_VERSION)
    km = KernelManager(kernel_name=KERNELSPEC["name"])
    # The kernel is the interpreter running this script (the venv), whatever kernelspec is installed.
    km._kernel_spec = KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f",
                                       "{connection_file}"],
                                 display_name=KERNELSPEC["display_name"], language="python")
    client = nbclient.NotebookClient(nb, km=km, timeout=TIMEOUT_S, record_timing=False,
                                     resources={"metadata": {"path": str(path.parent)}})
    started = time.perf_counter()
    client.execute()
    seconds = time.perf_counter() - started
    path.write_text(dumps(normalize(nb)), encoding="utf-8")
    return seconds


def main(argv: list[str] | None = None) -> int:
    """Command line: ``run``, ``normalize`` or ``check``."""
    p = argparse.ArgumentParser(prog="python notebooks/tools.py")
    p.add_argument("command", choices=("run", "normalize", "check"))
    p.add_argument("paths", nargs="*")
    args = p.parse_args(argv)
    bad = 0
    for path in notebooks(args.paths):
        if args.command == "run":
            try:
                print(f"{path.name}: executed in {run(path):.1f}s", flush=True)
            except Exception as exc:  # noqa: BLE001  # report, keep the stored file, go on with the others
                bad += 1
                print(f"{path.name}: FAILED, left unchanged\n{exc}", flush=True)
        elif args.command == "normalize":
            nb = nbformat.read(path, as_version=NB_VERSION)
            path.write_text(dumps(normalize(nb)), encoding="utf-8")
        else:
            found = problems(path)
            bad += bool(found)
            for msg in found:
                print(f"{path.name}: {msg}")
    if args.command == "check":
        print("notebooks clean" if not bad else f"{bad} notebook(s) not clean")
    elif args.command == "run" and bad:
        print(f"{bad} notebook(s) failed")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
