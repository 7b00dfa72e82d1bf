"""Bulk action planning without servers: filters, patterns, the plan frame's schema."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from toolkit import errors
from toolkit.manager import planning
from toolkit.tiers.postgres import bulk as pg_bulk


@pytest.mark.parametrize("glob, like", [
    ("a*", "a%"), ("a?c", "a_c"), ("50%", "50\\%"), ("a_b", "a\\_b"), ("a\\b", "a\\\\b"),
    ("%_*", "\\%\\_%"),
])
def test_a_glob_becomes_a_like_pattern_whose_wildcards_are_only_its_own(glob: str, like: str) -> None:
    assert pg_bulk.glob_to_like(glob) == like


def test_error_text_is_matched_literally() -> None:
    assert pg_bulk.like_literal("100% _done_\\") == "100\\% \\_done\\_\\\\"


@pytest.mark.parametrize("verb, filters, all_jobs, field", [
    ("requeue", {}, False, "filter"),
    ("delete", {}, True, "filter"),
    ("nope", {"queue": "q"}, False, "verb"),
    ("cancel", {"status": ["queued", "bogus"]}, False, "status"),
    ("cancel", {"payload": "text"}, False, "payload"),
    ("cancel", {"payload": {}}, False, "payload"),
    ("cancel", {"since": 0}, False, "since"),
    ("cancel", {"queue": ""}, False, "queue"),
])
def test_bad_plans_are_refused_by_field(verb: str, filters: dict, all_jobs: bool, field: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        planning.check_filter(verb, filters, all_jobs)
    assert info.value.field == field


def test_a_filter_is_stored_validated_and_json_ready() -> None:
    got = planning.check_filter("cancel", {"status": "queued", "name": "x*", "since": 60}, False)
    assert got == {"status": ["queued"], "name": "x*", "since": 60.0}
    assert planning.check_filter("cancel", {}, True) == {}


@pytest.mark.parametrize("verb, value, ok", [
    ("set_priority", 5, True), ("set_priority", None, False), ("set_priority", 10**9, False),
    ("move_queue", "urgent", True), ("move_queue", None, False), ("cancel", 3, False),
])
def test_a_value_goes_with_its_verb_only(verb: str, value: object, ok: bool) -> None:
    if ok:
        assert planning.check_value(verb, value) == value
    else:
        with pytest.raises(errors.ValidationError):
            planning.check_value(verb, value)


def test_the_plan_frame_has_one_schema_empty_or_not() -> None:
    row = {"id": "j1", "workflow_id": "w", "name": "n", "status": "failed", "queue": "q",
           "priority": 0, "version": 3, "attempts": 1, "worker_id": None, "error": "boom",
           "updated_at": datetime(2026, 1, 1, tzinfo=UTC)}
    full, empty = planning.plan_frame([row]), planning.plan_frame([])
    assert list(full.columns) == list(planning.FRAME_DTYPES) == list(empty.columns)
    assert dict(full.dtypes) == dict(empty.dtypes)
    assert full.index.name == empty.index.name == "job_id"
    assert str(full["updated_at"].dtype) == "datetime64[us, UTC]"
    counts = planning.count_frame(full)
    assert counts.loc[("failed", "q"), "jobs"] == 1 and planning.count_frame(empty).empty
