"""The layering of the package, checked on the source against import-rules.toml.

Every rule comes from the data file at the repository root: the parts, the
allowed arrows, the arrows that must never exist and the parts that may combine
tiers. A rule written there is a rule checked here.
"""

from __future__ import annotations

import ast
import fnmatch
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RULES = tomllib.loads((REPO / "import-rules.toml").read_text())


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and (
        (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
        or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING"))


def _walk_runtime(node: ast.AST) -> Iterator[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only)."""
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            yield from (n for b in child.orelse for n in [b, *_walk_runtime(b)])
            continue
        yield child
        yield from _walk_runtime(child)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The toolkit modules ``path`` imports at run time (``from a import b`` is ``a.b`` when a module)."""
    found: set[str] = set()
    for node in _walk_runtime(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
    return {m for m in found if m == "toolkit" or m.startswith("toolkit.")}


def part_of(module: str, parts: dict[str, list[str]]) -> list[str]:
    return [part for part, patterns in parts.items()
            if any(fnmatch.fnmatchcase(module, p) for p in patterns)]


def arrows(root: Path, parts: dict[str, list[str]]) -> list[tuple[str, str, str, str]]:
    """(module, imported, its part, imported part) for every import inside the package."""
    paths = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    found = []
    for module, path in paths.items():
        for imported in sorted(imports_of(path, set(paths))):
            (a,), (b,) = part_of(module, parts), part_of(imported, parts)
            found.append((module, imported, a, b))
    return found


def violations(root: Path, rules: dict[str, object] = RULES) -> list[str]:
    """Every broken rule of ``rules`` in the package at ``root``, as one line each."""
    parts: dict[str, list[str]] = rules["parts"]  # type: ignore[assignment]
    allowed: dict[str, list[str]] = rules["may_import"]  # type: ignore[assignment]
    nevers: list[dict[str, str]] = rules["never"]  # type: ignore[assignment]
    combine: dict[str, list[str]] = rules["combine"]  # type: ignore[assignment]
    problems = []
    for path in sorted(root.rglob("*.py")):
        owners = part_of(module_name(path, root), parts)
        if len(owners) != 1:
            problems.append(f"{module_name(path, root)} belongs to {owners or 'no part'}: "
                            "give it exactly one in import-rules.toml [parts]")
    if problems:
        return problems
    tiers_used: dict[str, set[str]] = {}
    for module, imported, a, b in arrows(root, parts):
        for rule in nevers:
            if (a, b) == (rule["from"], rule["to"]):
                problems.append(f"never: {module} imports {imported} ({rule['why']})")
        if a != b and b not in allowed[a]:
            problems.append(f"{module} ({a}) imports {imported} ({b}): not in may_import.{a}")
        if b in combine["tiers"]:
            tiers_used.setdefault(module, set()).add(b)
    for module, tiers in sorted(tiers_used.items()):
        (part,) = part_of(module, parts)
        if len(tiers) > 1 and part not in combine["allowed"]:
            problems.append(f"{module} ({part}) combines tiers {sorted(tiers)}")
    return problems


def test_the_rules_file_is_coherent() -> None:
    parts = set(RULES["parts"])
    assert set(RULES["may_import"]) == parts, "every part needs a may_import entry"
    for part, targets in RULES["may_import"].items():
        assert set(targets) <= parts, f"may_import.{part} names an unknown part"
    for rule in RULES["never"]:
        assert {rule["from"], rule["to"]} <= parts and rule["why"], rule
        assert rule["to"] not in RULES["may_import"][rule["from"]], f"never contradicted: {rule}"
    assert set(RULES["combine"]["tiers"]) | set(RULES["combine"]["allowed"]) <= parts


def test_every_import_follows_the_rules() -> None:
    assert violations(REPO / "toolkit") == []


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("inspection/frames.py", "from toolkit import state", "never: toolkit.inspection.frames imports"),
    ("state.py", "from toolkit.inspection import frames", "never: toolkit.state imports"),
    ("models.py", "from toolkit import config", "toolkit.models (base) imports toolkit.config"),
    ("tiers/redis/queue.py", "from toolkit.tiers.postgres import store", "not in may_import.redis"),
    ("cli.py", "from toolkit.tiers.postgres import store", "not in may_import.apps"),
    ("newmodule.py", "x = 1", "toolkit.newmodule belongs to no part"),
])
def test_a_forbidden_import_in_a_scratch_copy_fails(
        tmp_path: Path, module: str, line: str, expected: str) -> None:
    """Add one forbidden import to a copy of the package: the check names it."""
    import shutil

    copy = tmp_path / "toolkit"
    shutil.copytree(REPO / "toolkit", copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    target.write_text((target.read_text() if target.exists() else "") + f"\n{line}\n")
    found = violations(copy)
    assert any(expected in v for v in found), found


def test_type_checking_imports_are_not_arrows(tmp_path: Path) -> None:
    copy = tmp_path / "toolkit"
    copy.mkdir()
    (copy / "__init__.py").write_text("")
    (copy / "models.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from toolkit import state\n")
    assert imports_of(copy / "models.py", set()) == set()
