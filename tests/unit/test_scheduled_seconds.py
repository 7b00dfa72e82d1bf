"""``scheduled_seconds``: of each state in a job's timeline, the seconds spent before its due time."""

from __future__ import annotations

import pandas as pd

from toolkit.inspection.analytics import scheduled_seconds


def _at(*stamps: str) -> pd.Series:
    return pd.Series(pd.to_datetime(list(stamps), utc=True)).astype("datetime64[us, UTC]")


def test_a_state_ending_before_its_due_time_counts_its_length_even_in_nanoseconds() -> None:
    """CI once failed here: ``at + state`` had nanoseconds a microsecond column cannot hold,
    and the mixed column raised ``TypeError: cannot subtract DatetimeArray from ndarray``."""
    at = _at("2026-11-29 14:26:01.040443", "2026-11-29 14:26:01.053389",
             "2026-11-29 14:26:01.061438")
    state = pd.Series([0.012946, 0.0082481234, 0.0082481234], dtype="Float64")
    run_at = pd.Series([pd.NaT, pd.NaT, pd.Timestamp("2026-11-29 14:26:31.06", tz="UTC")],
                       dtype="datetime64[us, UTC]")
    out = scheduled_seconds(at, state, run_at)
    assert str(out.dtype) == "Float64" and out.isna().tolist() == [True, True, False]
    assert abs(out.iloc[2] - 0.0082481234) < 1e-9


def test_an_open_state_waits_until_its_due_time_and_a_past_one_counts_zero() -> None:
    at = _at("2026-11-29 14:26:01.040443", "2026-11-29 14:26:01.061438")
    state = pd.Series([0.5, None], dtype="Float64")  # the last state is still open
    run_at = pd.Series([pd.Timestamp("2026-11-29 14:26:00", tz="UTC"),
                        pd.Timestamp("2026-11-29 14:26:31.061438", tz="UTC")],
                       dtype="datetime64[us, UTC]")
    assert scheduled_seconds(at, state, run_at).tolist() == [0.0, 30.0]
