"""RetryPolicy's waits and the checks on schedules and backoffs (no servers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from toolkit import errors, retry_policy, validate
from toolkit.retry_policy import RetryPolicy

NOW = datetime(2026, 6, 1, tzinfo=UTC)


def test_the_wait_grows_by_the_factor_up_to_the_cap() -> None:
    p = RetryPolicy(base=1.0, factor=2.0, cap=10.0, jitter=0.0)
    assert [p.delay(n, 0.0) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert p.delay(10_000, 0.0) == 10.0  # no overflow for a huge attempt


def test_jitter_spreads_either_side_and_never_beyond_the_cap() -> None:
    p = RetryPolicy(base=4.0, factor=2.0, cap=5.0, jitter=0.5)
    assert (p.delay(1, -1.0), p.delay(1, 1.0)) == (2.0, 5.0)  # 4 * 1.5 = 6, capped at 5


@pytest.mark.parametrize("fields", [{"base": float("nan")}, {"base": -1}, {"factor": 0.5},
                                    {"cap": float("inf")}, {"jitter": 1.5}, {"base": True},
                                    {"base": "1"}])
def test_a_policy_out_of_range_is_refused(fields: dict[str, object]) -> None:
    with pytest.raises(errors.ValidationError):
        RetryPolicy(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [float("nan"), -0.5, float("inf"), 1e12, "3", None, True])
def test_a_backoff_function_answering_nonsense_is_refused(answer: object) -> None:
    with pytest.raises(errors.ValidationError):
        retry_policy.backoff_of(lambda attempt: answer, 1, 0.0)  # type: ignore[arg-type, return-value]


def test_a_backoff_function_that_raises_is_a_validation_error() -> None:
    with pytest.raises(errors.ValidationError, match="ZeroDivisionError"):
        retry_policy.backoff_of(lambda attempt: 1 / 0, 1, 0.0)


def test_run_at_and_delay_give_an_aware_utc_due_time() -> None:
    assert validate.run_at(None, None, NOW) is None
    assert validate.run_at(None, 90, NOW) == NOW + timedelta(seconds=90)
    paris = datetime(2026, 6, 1, 2, tzinfo=UTC).astimezone(
        datetime(2026, 6, 1, tzinfo=UTC).astimezone().tzinfo)
    assert validate.run_at(paris, None, NOW).tzinfo is UTC  # type: ignore[union-attr]


@pytest.mark.parametrize(("at", "delay"), [
    (datetime(2026, 6, 2), None), (NOW - timedelta(days=367), None),
    (NOW + timedelta(days=367), None), (None, -1), (None, float("nan")), (NOW, 1),
    ("2026-06-02T00:00:00Z", None), (None, 367 * 86_400),
])
def test_hostile_times_are_refused(at: object, delay: object) -> None:
    with pytest.raises(errors.ValidationError):
        validate.run_at(at, delay, NOW)


def test_a_push_with_run_at_in_the_future_goes_to_the_due_time_set() -> None:
    from toolkit.manager import pipeline

    later, past = NOW + timedelta(seconds=5), NOW - timedelta(seconds=5)
    rows = [("job", {"id": "a", "run_at": later}), ("job", {"id": "b", "run_at": past}),
            ("job", {"id": "c", "run_at": None}), ("workflow", {"id": "w"})]
    pushes = [("a", "q", 0, 1), ("b", "q", 0, 2), ("c", "q", 0, 3)]
    ready, scheduled = pipeline.split_scheduled(rows, pushes, NOW.timestamp())
    assert ready == [("b", "q", 0, 2), ("c", "q", 0, 3)]
    assert scheduled == [("a", "q", 0, 1, later.timestamp())]
    assert pipeline.split_scheduled(rows[2:], pushes[2:], NOW.timestamp()) == (pushes[2:], [])
