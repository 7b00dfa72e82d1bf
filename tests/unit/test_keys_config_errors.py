"""Key layout, settings, URL masking and error messages: no servers needed."""

from __future__ import annotations

import re

import pytest

from toolkit import config, errors
from toolkit.tiers.redis import cache, keys, queue


def test_every_key_carries_the_namespace_hash_tag() -> None:
    built = [keys.entity("wf", "job", "j1"), keys.queue("wf", "q"), keys.queues("wf"),
             keys.inflight("wf"), keys.inflight_meta("wf"), keys.heartbeat("wf", "w"),
             keys.heartbeats("wf"), keys.boot("wf"), keys.lock("wf", "l"), keys.fence("wf", "l"),
             keys.metrics("wf"), keys.metric_buckets("wf", "m"), keys.invalidation_channel("wf")]
    assert all(k.startswith("{wf}:") for k in built)
    assert len(set(built)) == len(built)


def test_every_key_function_is_documented_in_the_module_docstring() -> None:
    doc = keys.__doc__ or ""
    for name in ("queue", "inflight", "heartbeats", "lock", "fence", "metrics", "boot"):
        assert f"{{ns}}:{name}" in doc, name


def test_glob_characters_are_escaped_in_scan_patterns() -> None:
    assert keys.escape_glob("a*b?[c]\\") == "a\\*b\\?\\[c\\]\\\\"
    assert keys.entity_pattern("n*", "job") == "{n\\*}:job:*"


def test_queue_score_orders_priority_then_fifo() -> None:
    scores = [queue.score(9, 2), queue.score(9, 5), queue.score(0, 1), queue.score(-3, 0)]
    assert scores == sorted(scores)
    assert queue.score(1_000_000, 10**9) != queue.score(1_000_000, 10**9 - 1)


def test_cache_value_round_trip_and_corruption() -> None:
    assert cache.version_of("12|{}") == 12
    assert cache.version_of("garbage") is None
    assert cache.decode("job", "3|not json") is None
    assert cache.decode("job", None) is None


@pytest.mark.parametrize("url, masked", [
    ("postgresql://u:secret@db:5432/x", "postgresql://u:***@db:5432/x"),
    ("redis://:p%40ss@cache:6379/1", "redis://:***@cache:6379/1"),
    ("postgresql://u:p@ss:w/rd@h:1/d", "postgresql://u:***@h:1/d"),
    ("postgresql://u:ü@h/d?password=x&sslmode=require", "postgresql://u:***@h/d?password=***&sslmode=require"),
    ("redis://cache:6379", "redis://cache:6379"),
])
def test_mask_url_hides_password_keeps_host(url: str, masked: str) -> None:
    assert config.mask_url(url) == masked


def test_settings_repr_never_shows_password() -> None:
    s = config.load_settings("postgresql://u:hunter2@h:1/d", "redis://:hunter2@r:2/0")
    assert "hunter2" not in repr(s) and "h:1" in repr(s) and "r:2" in repr(s)
    assert s.database_url.startswith("postgresql+psycopg://")


def test_missing_url_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(errors.ConfigurationError, match="DATABASE_URL"):
        config.resolve_database_url(None)
    with pytest.raises(errors.ConfigurationError, match="REDIS_URL"):
        config.resolve_redis_url(None)
    with pytest.raises(errors.ConfigurationError, match="scheme"):
        config.resolve_database_url("mysql://h/d")


@pytest.mark.parametrize("bad", ["", "wf}x", "a*", "a:b", "x" * 65, "pub\"; DROP SCHEMA x"])
def test_bad_namespace_is_refused(bad: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="namespace"):
        config.validate_namespace(bad)


@pytest.mark.parametrize("bad", ["", "Public", "pub\"; DROP SCHEMA x", "a" * 64, "1abc", "a-b"])
def test_bad_schema_is_refused(bad: str) -> None:
    with pytest.raises(errors.ConfigurationError, match="schema"):
        config.validate_schema(bad)


def test_error_messages_name_field_and_value() -> None:
    e = errors.ValidationError("priority", 10**9, "must be between")
    assert str(e) == "invalid priority=1000000000: must be between" and isinstance(e, ValueError)
    nf = errors.NotFound("job", "j1")
    assert str(nf) == "job not found: id='j1'" and isinstance(nf, KeyError)
    it = errors.InvalidTransition("job", "j1", "queued", "completed")
    assert (it.current, it.requested) == ("queued", "completed")
    assert re.search("queued.*completed", str(it))
    assert str(errors.LockNotOwned()) == "The lock is not held by this owner."
