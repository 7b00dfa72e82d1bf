"""A job's payload is stored packed (values + shared keys) but reads as the same FrozenDict."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import sys
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from toolkit import models
from toolkit.tiers.redis import cache

NOW = datetime(2026, 1, 2, 3, 4, 5, 678900, tzinfo=UTC)

PAYLOADS: list[Any] = [
    None, 0, 2**62, 1.5, "", [], {}, [1, {"a": 2}], {"a": 1}, {"i": 7, "kind": "bench"},
    {"b": 1, "a": 2.5, "c": None, "d": True, "e": "\u2603"}, {f"k{i}": i for i in range(40)},
    {"a": {"b": [1]}}, {"t": (1, 2)},
]


def _job(payload: Any, **over: Any) -> models.Job:
    fields: dict[str, Any] = dict(
        id="j", workflow_id="w", name="n", status="queued", priority=0, queue="default",
        payload=payload, result=None, error=None, attempts=0, max_attempts=3, worker_id=None,
        depends_on=[], created_at=NOW, updated_at=NOW, started_at=None, finished_at=None,
        version=1)
    fields.update(over)
    return models.Job(**fields)


def _slot(job: models.Job) -> Any:
    return object.__getattribute__(job, "__class__").__dict__["payload"]._get(job)


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_packed_payload_reads_as_the_frozen_payload(payload: Any) -> None:
    job = _job(payload)
    frozen = models.freeze(payload)
    assert type(job.payload) is type(frozen) and job.payload == frozen == models.thaw(payload)
    assert json.dumps(job.payload) == json.dumps(frozen)
    assert orjson.dumps(job.payload) == orjson.dumps(frozen)
    if isinstance(payload, dict):
        assert list(job.payload) == list(payload)
        assert isinstance(job.payload, dict)


@pytest.mark.parametrize("payload", PAYLOADS, ids=range(len(PAYLOADS)))
def test_packed_payload_cache_value_is_unchanged(payload: Any) -> None:
    job = _job(payload)
    fields = {n: getattr(job, n) for n in models.field_names("job")}
    fields["payload"] = models.freeze(payload)  # what the cache held before packing
    expected = b"1|" + orjson.dumps(fields)
    assert cache.encode(job) == expected


def test_packed_payload_is_read_only_and_a_new_equal_object_each_read() -> None:
    job = _job({"i": 1, "kind": "x"})
    with pytest.raises(TypeError):
        job.payload["i"] = 2
    with pytest.raises(TypeError):
        job.payload.update(i=2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.payload = {}  # type: ignore[misc]
    first, second = job.payload, job.payload
    assert first == second and first is not second
    assert models.thaw(job.payload) == {"i": 1, "kind": "x"}


def test_payloads_with_the_same_keys_share_one_key_tuple() -> None:
    a, b = _job({"i": 1, "kind": "x"}), _job({"i": 2, "kind": "y"})
    packed_a, packed_b = _slot(a), _slot(b)
    assert type(packed_a) is tuple and packed_a[:-1] == (1, "x")
    assert packed_a[-1] is packed_b[-1] == ("i", "kind")
    assert sys.getsizeof(packed_a) < sys.getsizeof(a.payload)


def test_nested_or_non_string_keyed_payloads_stay_frozen_dicts() -> None:
    for payload in ({"a": {"b": 1}}, {"l": [1]}, {1: "x"}):
        assert type(_slot(_job(payload))) is models.FrozenDict
    assert _slot(_job({})) is models.freeze({})


def test_packed_payload_pickles_copies_and_replaces() -> None:
    job = _job({"i": 1, "kind": "x"})
    for other in (pickle.loads(pickle.dumps(job)), copy.copy(job), copy.deepcopy(job),
                  dataclasses.replace(job, version=2)):
        assert other.payload == job.payload and type(_slot(other)) is tuple
    assert pickle.dumps(job) == pickle.dumps(_job(models.FrozenDict({"i": 1, "kind": "x"})))
    assert dataclasses.asdict(job)["payload"] == {"i": 1, "kind": "x"}
    assert job == _job({"i": 1, "kind": "x"}) != _job({"kind": "x", "i": 2})


def test_job_hashability_is_unchanged_by_packing() -> None:
    assert hash(_job(None)) == hash(_job(None))
    assert hash(_job("text")) == hash(_job("text"))
    with pytest.raises(TypeError):
        hash(_job({"i": 1}))
    with pytest.raises(TypeError):
        hash(_job({"i": 1}).payload)


def test_from_row_packs_like_the_constructor() -> None:
    row = _job({"i": 1, "kind": "x"}).to_dict()
    fast = models.from_row("job", [row[n] for n in models.field_names("job")])
    assert fast == models.from_dict("job", row)
    assert _slot(fast)[-1] is _slot(_job({"i": 5, "kind": "z"}))[-1]
