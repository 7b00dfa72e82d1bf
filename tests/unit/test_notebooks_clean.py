"""The stored notebooks are clean: normalized, with their outputs, without volatile metadata.

No kernel and no server: this reads the files only. ``make notebooks`` fixes a failure.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"


def _tools() -> ModuleType:
    spec = importlib.util.spec_from_file_location("notebook_tools", NOTEBOOKS / "tools.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tools = _tools()
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def test_notebooks_one_to_six_exist() -> None:
    prefixes = {p.name[:3] for p in PATHS}
    assert {f"0{i}-" for i in range(1, 7)} <= prefixes


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_is_clean(path: Path) -> None:
    assert tools.problems(path) == []


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_normalization_is_idempotent(path: Path) -> None:
    nb = tools.nbformat.read(path, as_version=4)
    once = tools.dumps(tools.normalize(nb))
    assert tools.dumps(tools.normalize(tools.nbformat.reads(once, as_version=4))) == once


def test_normalize_removes_volatile_fields() -> None:
    nbformat = tools.nbformat
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.metadata["execution"] = {"iopub.status.busy": "2026-01-01T00:00:00Z"}
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="a\n"),
        nbformat.v4.new_output("stream", name="stdout", text="b\n"),
        nbformat.v4.new_output("display_data", data={
            "text/plain": "bar", tools.WIDGET_VIEW: {"model_id": "5f1e9c", "version_major": 2}}),
    ]
    nb.cells = [nbformat.v4.new_markdown_cell("# t"), cell]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11.7"}

    out = tools.normalize(nb)

    assert [c.id for c in out.cells] == ["cell-00", "cell-01"]
    assert "widgets" not in out.metadata
    assert out.metadata["language_info"]["version"] == "3"
    assert "execution" not in out.cells[1].metadata
    assert out.cells[1].outputs[0].text == "a\nb\n"
    assert out.cells[1].outputs[1].data[tools.WIDGET_VIEW]["model_id"] == "widget-00"
    assert tools.dumps(out).endswith("}\n")
