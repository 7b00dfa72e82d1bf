"""The shape of the code a newcomer must be able to change: small modules, short functions,
few flags. Limits from ARCHITECTURE.md; a change that breaks one splits the code instead."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "toolkit"
MODULE_MAX_LINES = 460
FACADE_MAX_LINES = 300
FUNCTION_MAX_LINES = 40
"""Lines of code of one function, its docstring not counted."""
MAX_FLAGS = 2


def _functions() -> list[tuple[Path, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                found.append((path, node))
    return found


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = fn.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        and isinstance(first.value.value, str) and len(fn.body) > 1
    start = fn.body[1].lineno if has_doc else first.lineno
    return (fn.end_lineno or start) - start + 1


def _flags(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    args = fn.args
    params = args.posonlyargs + args.args + args.kwonlyargs
    defaults = [None] * (len(args.posonlyargs + args.args) - len(args.defaults)) + list(args.defaults)
    defaults += list(args.kw_defaults)
    return [p.arg for p, d in zip(params, defaults, strict=True)
            if (isinstance(p.annotation, ast.Name) and p.annotation.id == "bool")
            or (isinstance(d, ast.Constant) and isinstance(d.value, bool))]


def test_no_module_is_too_long_and_the_facade_stays_thin() -> None:
    sizes = {p.relative_to(ROOT).as_posix(): p.read_text().count("\n") for p in ROOT.rglob("*.py")}
    assert {p: n for p, n in sizes.items() if n > MODULE_MAX_LINES} == {}
    assert sizes["state.py"] <= FACADE_MAX_LINES


def test_no_function_is_too_long() -> None:
    long = {f"{p.relative_to(ROOT)}:{fn.name}": _code_lines(fn) for p, fn in _functions()
            if _code_lines(fn) > FUNCTION_MAX_LINES}
    assert long == {}


def test_no_function_takes_more_than_two_flags() -> None:
    many = {f"{p.relative_to(ROOT)}:{fn.name}": _flags(fn) for p, fn in _functions()
            if len(_flags(fn)) > MAX_FLAGS}
    assert many == {}
