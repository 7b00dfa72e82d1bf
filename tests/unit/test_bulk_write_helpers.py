"""The bulk write path's pure helpers: cache encoding, invalidation messages, queue moves,
and the fast checks of job specs (no sockets)."""

from __future__ import annotations

import math
import random
import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from toolkit import errors, models, validate
from toolkit.manager import pipeline
from toolkit.tiers.redis import cache

NOW = datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)

ENTITIES: list[models.Entity] = [
    models.from_dict("workflow", dict(id="w", name="n", status="running",
                                      metadata={"x": [1, {"y": None}]}, created_at=NOW,
                                      updated_at=NOW, version=4)),
    models.from_dict("job", dict(id="j|1", workflow_id="w", name="n", status="completed",
                                 priority=-2, queue="q", payload={"a": {"b": [1, 2.5, "\u2603"]}},
                                 result=[1, "r"], error="boom", attempts=1, max_attempts=3,
                                 worker_id="wk", depends_on=["a", "b"], created_at=NOW,
                                 updated_at=NOW, started_at=NOW, finished_at=NOW, version=7)),
    models.from_dict("worker", dict(id="wk", hostname="h", status="active", queues=["d", "x"],
                                    capacity=2, metadata={}, last_heartbeat=None,
                                    registered_at=NOW, version=1)),
    models.from_dict("assignment", dict(id="a", job_id="j", worker_id="wk", status="completed",
                                        attempt=1, assigned_at=NOW, finished_at=NOW)),
]


@pytest.mark.parametrize("entity", ENTITIES, ids=[cache.kind_of(e) for e in ENTITIES])
def test_encode_of_the_dataclass_equals_the_encoding_of_its_fields(entity: models.Entity) -> None:
    fields = {n: getattr(entity, n) for n in models.field_names(cache.kind_of(entity))}
    assert cache.encode(entity) == b"%d|%s" % (models.entity_version(entity), orjson.dumps(fields))
    assert cache.decode(cache.kind_of(entity), cache.encode(entity).decode()) == entity


def test_parse_invalidations_reads_a_single_entity_message() -> None:
    assert cache.parse_invalidations("job|3|a|b") == [("job", 3, "a|b")]
    assert cache.parse_invalidations("job|x|a") == []


def test_parse_invalidations_reads_a_batched_message() -> None:
    triples = [("job", 1, "a"), ("workflow", 2**62, "w|x"), ("job", 2, "[b]")]
    message = orjson.dumps(triples).decode()
    assert cache.parse_invalidations(message) == triples


@pytest.mark.parametrize("message", ["[", "[1]", '{"a": 1}', '[["job", "1", "a"]]',
                                     '[["job", 1]]', '[["job", true, "a"]]', "[[null, 1, \"a\"]]"])
def test_parse_invalidations_skips_malformed_messages(message: str) -> None:
    assert cache.parse_invalidations(message) == []


def test_parse_invalidations_keeps_the_good_triples_of_a_mixed_batch() -> None:
    assert cache.parse_invalidations('[["job", 1, "a"], 7, ["job", "x", "b"]]') == [("job", 1, "a")]


def _sequential(rows: list[tuple[str, dict[str, Any]]]) -> tuple[dict[tuple[str, str], float],
                                                                  set[str]]:
    """One push or removal per job row, in order (what the write path used to send)."""
    queued: dict[tuple[str, str], float] = {}
    unflight: set[str] = set()
    for kind, row in rows:
        if kind != "job":
            continue
        pair = (row["id"], row["queue"])
        if row["status"] == "queued":
            queued[pair] = row["priority"] * -1e9 + row["enqueue_seq"]
        else:
            queued.pop(pair, None)
            unflight.add(row["id"])
    return queued, unflight


def _batched(rows: list[tuple[str, dict[str, Any]]]) -> tuple[dict[tuple[str, str], float],
                                                               set[str]]:
    """All removals, then the pushes (what the write path now sends)."""
    pushes, removes = pipeline.queue_moves(rows)
    queued: dict[tuple[str, str], float] = {}
    for pair in removes:
        queued.pop(pair, None)
    for job_id, q, priority, seq in pushes:
        queued[(job_id, q)] = priority * -1e9 + seq
    return queued, {job_id for job_id, _ in removes}


def test_queue_moves_leave_what_one_move_per_row_in_order_left() -> None:
    rnd = random.Random(7)
    for _ in range(500):
        rows: list[tuple[str, dict[str, Any]]] = []
        for seq in range(rnd.randint(0, 12)):
            kind = rnd.choice(["job", "job", "job", "workflow"])
            rows.append((kind, {"id": rnd.choice("abc"), "queue": rnd.choice(["q1", "q2"]),
                                "status": rnd.choice(["queued", "pending", "assigned"]),
                                "priority": rnd.randint(-2, 2), "enqueue_seq": seq}))
        assert _batched(rows) == _sequential(rows)


PLAIN_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text())
PAYLOADS = st.one_of(st.dictionaries(st.text(), PLAIN_VALUES, max_size=8),
                     st.dictionaries(st.integers(), PLAIN_VALUES, max_size=3),
                     st.lists(PLAIN_VALUES, max_size=3), PLAIN_VALUES)


@given(PAYLOADS)
def test_plain_json_fast_check_never_passes_what_json_value_refuses(payload: Any) -> None:
    if validate._is_plain_json(payload):
        assert validate.json_value("payload", payload) is payload


def test_plain_json_fast_check_sends_edge_cases_to_the_full_check() -> None:
    for payload in ({"a": math.nan}, {"a": "x\x00"}, {"a\\u0000": 1}, {1: 1}, {"a": 10**20},
                    {"a": [1]}, {"a": "x" * (validate.MAX_JSON_BYTES // 12)}):
        assert not validate._is_plain_json(payload)
    assert validate._is_plain_json({"i": 1, "kind": "bench", "f": 1.5, "b": True, "n": None})


@pytest.mark.parametrize(("job", "field", "reason"), [
    ({"name": "a", "id": ""}, "jobs[0].id", "characters"),
    ({"name": "a\n"}, "jobs[0].name", "control characters"),
    ({"name": "a", "priority": True}, "jobs[0].priority", "must be an integer"),
    ({"name": "a", "priority": 10**7}, "jobs[0].priority", "between"),
    ({"name": "a", "queue": 3}, "jobs[0].queue", "must be a string"),
    ({"name": "a", "payload": {"x": math.inf}}, "jobs[0].payload", "must be JSON"),
    ({"name": "a", "max_attempts": 0}, "jobs[0].max_attempts", "between"),
    ({"name": "a", "depends_on": "b"}, "jobs[0].depends_on", "list of strings"),
    ({"name": "a", "extra": 1}, "jobs[0]", "unknown keys"),
])
def test_job_specs_still_name_the_field_of_bad_input(job: dict[str, Any], field: str,
                                                     reason: str) -> None:
    with pytest.raises(errors.ValidationError) as info:
        validate.job_specs([job])
    assert info.value.field == field and reason in str(info.value)


def test_job_specs_fill_defaults_and_resolve_dependencies() -> None:
    specs = validate.job_specs([{"name": "a", "payload": {"i": 1}}, {"name": "b", "depends_on": ["a"],
                                                                     "id": "b-id"}])
    assert specs[0]["priority"] == 0 and specs[0]["queue"] == "default"
    assert specs[0]["max_attempts"] == 3 and specs[0]["depends_on"] == ()
    assert specs[1] == {"id": "b-id", "name": "b", "priority": 0, "queue": "default",
                        "payload": None, "max_attempts": 3, "depends_on": (specs[0]["id"],)}


def test_new_id_is_a_random_uuid4_string() -> None:
    ids = {validate.new_id() for _ in range(1000)}
    assert len(ids) == 1000
    for i in ids:
        u = uuid.UUID(i)
        assert str(u) == i and u.version == 4 and u.variant == uuid.RFC_4122
