"""The layering of STYLE.md, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "toolkit"


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("toolkit")}


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_base_modules_import_nothing_else_from_toolkit() -> None:
    for name in ("models", "errors"):
        assert imports_of(ROOT / f"{name}.py") == set(), name
    assert imports_of(ROOT / "config.py") <= {"toolkit", "toolkit.errors"}


def test_a_tier_never_imports_another_tier() -> None:
    tiers = {"memory": "toolkit.tiers.memory", "redis": "toolkit.tiers.redis",
             "postgres": "toolkit.tiers.postgres"}
    for tier, prefix in tiers.items():
        paths = [ROOT / "tiers" / "memory.py"] if tier == "memory" else modules(f"tiers/{tier}")
        for path in paths:
            for imported in imports_of(path):
                if imported.startswith("toolkit.tiers."):
                    assert imported.startswith(prefix), f"{path.name} imports {imported}"


def test_only_state_and_recovery_combine_tiers() -> None:
    for path in ROOT.rglob("*.py"):
        if "tiers" in path.parts or path.name in ("state.py", "recovery.py"):
            continue
        used = {m.split(".")[2] for m in imports_of(path)
                if m.startswith("toolkit.tiers.") and len(m.split(".")) > 2}
        if path.parts[-2] == "inspection":
            continue  # the inspector reads every tier through read functions (checked below)
        assert len(used) <= 1, f"{path.name} combines tiers {used}"


def test_inspection_never_imports_state() -> None:
    for path in modules("inspection"):
        assert not any(m.startswith("toolkit.state") for m in imports_of(path)), path.name
