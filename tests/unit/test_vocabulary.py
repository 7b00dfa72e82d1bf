"""One vocabulary: final, live and the other status sets come from the transition tables."""

from __future__ import annotations

import re

from toolkit import models
from toolkit.models import JobStatus as JS
from toolkit.tiers.postgres import tables


def test_final_is_what_no_transition_leaves_and_live_is_the_rest() -> None:
    assert {JS.COMPLETED, JS.CANCELLED} == models.FINAL_JOB_STATUSES
    assert set(JS) - models.FINAL_JOB_STATUSES == models.LIVE_JOB_STATUSES
    assert JS.FAILED in models.LIVE_JOB_STATUSES  # a failed job can be re-queued
    finished = {models.WorkflowStatus.COMPLETED, models.WorkflowStatus.CANCELLED}
    assert finished == models.FINISHED_WORKFLOW_STATUSES


def test_the_partial_index_of_live_jobs_excludes_exactly_the_final_statuses() -> None:
    text = str(tables.LIVE_JOB_CLAUSE)
    assert set(re.findall(r"'(\w+)'", text)) == set(models.values(models.FINAL_JOB_STATUSES))
    assert "NOT IN" in text


def test_is_final_agrees_with_the_status_sets() -> None:
    for status in JS:
        job = models.from_dict("job", {
            "id": "j", "workflow_id": "w", "name": "n", "status": status.value, "priority": 0,
            "queue": "default", "payload": None, "result": None, "error": None, "attempts": 0,
            "max_attempts": 3, "worker_id": None, "depends_on": [], "created_at": models.utcnow(),
            "updated_at": models.utcnow(), "started_at": None, "finished_at": None, "version": 1})
        assert models.is_final(job) is (status in models.FINAL_JOB_STATUSES), status


def test_values_are_sorted_plain_strings() -> None:
    assert models.values(models.PURGEABLE_JOB_STATUSES) == ["cancelled", "completed", "failed"]
    assert all(type(v) is str for v in models.values(models.LIVE_JOB_STATUSES))


def test_entity_kinds_are_defined_once_and_every_tier_uses_them() -> None:
    from toolkit.tiers import memory
    from toolkit.tiers.redis import keys

    assert memory.KINDS is models.ENTITY_KINDS
    assert keys.ENTITY_KINDS is models.ENTITY_KINDS
    assert [k.value for k in models.ENTITY_KINDS] == ["workflow", "job", "worker", "assignment"]
    for kind in models.EntityKind:
        assert models.field_names(kind), kind  # the model knows every kind
        assert keys.entity("ns", kind, "x") == f"{{ns}}:{kind.value}:x"


def test_the_writers_name_entity_kinds_through_the_enum() -> None:
    """No writer module spells a kind as a string literal in code (docstrings aside)."""
    import ast
    from pathlib import Path

    root = Path(models.__file__).parent
    kinds = {k.value for k in models.EntityKind}
    found = []
    for path in [*root.glob("manager/*.py"), *root.glob("recovery/*.py"), root / "compare.py",
                 root / "tiers/postgres/store.py"]:
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef)
                      and n.body and isinstance(n.body[0], ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "unit":
                docstrings.add(id(node.value))  # a progress bar's unit is a word, not a kind
            if isinstance(node, ast.Dict):
                for key, value in zip(node.keys, node.values, strict=True):
                    if isinstance(key, ast.Constant) and key.value == "create":
                        docstrings.add(id(value))
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                docstrings.update(id(e) for e in node.value.elts)  # entity, entity_id = "job", ...
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and node.value in kinds
                    and id(node) not in docstrings):
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert found == [], found
