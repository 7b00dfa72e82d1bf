"""Issue 13, item 11: ``summary()`` counts are integers in the frame, the table, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import pytest

import toolkit
from toolkit import cli


def base(clean: Any) -> list[str]:
    return ["--database-url", clean.database_url, "--redis-url", clean.redis_url,
            "--namespace", clean.namespace, "--schema", clean.schema]


@pytest.fixture
def busy(sm: toolkit.StateManager) -> toolkit.StateManager:
    for i in range(3):
        sm.create_workflow(f"w{i}", jobs=[{"name": "a"}, {"name": "b", "depends_on": ["a"]}])
    sm.register_worker("w")
    return sm


def test_summary_frame_counts_are_int64(busy: toolkit.StateManager) -> None:
    s = busy.inspector.summary()
    assert str(s["value"].dtype) == "Int64"
    assert s.loc["workflows", "value"] == 3 and s.loc["jobs", "value"] == 6


def test_summary_table_and_csv_print_integers(busy: toolkit.StateManager, clean: Any,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "summary", *base(clean)]) == 0
    table = capsys.readouterr().out
    assert "3.0" not in table and "6.0" not in table
    assert any(line.split() == ["workflows", "3"] for line in table.splitlines()), table
    assert cli.main(["inspect", "summary", "--format", "csv", *base(clean)]) == 0
    rows = {r["item"]: r["value"] for r in csv.DictReader(io.StringIO(capsys.readouterr().out))}
    assert rows["workflows"] == "3" and rows["jobs"] == "6" and rows["jobs_queued"] == "3"


def test_summary_json_values_are_json_integers(busy: toolkit.StateManager, clean: Any,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["inspect", "summary", "--format", "json", *base(clean)]) == 0
    doc = json.loads(capsys.readouterr().out)
    records = doc["data"] if isinstance(doc, dict) else doc
    values = {r["item"]: r["value"] for r in records}
    assert values["workflows"] == 3 and values["jobs_pending"] == 3
    assert all(type(v) is int for v in values.values()), values
