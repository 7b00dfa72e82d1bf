"""The per-key in-flight guard of cold reads: sharing, error propagation, timeout."""

from __future__ import annotations

import threading
import time

import pytest

import toolkit
from toolkit.single_flight import SingleFlight


def _herd(flight: SingleFlight[int], fn: object, n: int = 8) -> list[object]:
    out: list[object] = []
    gate = threading.Barrier(n)

    def run() -> None:
        gate.wait()
        try:
            out.append(flight.do("k", fn))  # type: ignore[arg-type]
        except Exception as exc:
            out.append(exc)

    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return out


def test_concurrent_callers_share_one_call_and_its_result() -> None:
    calls = []

    def slow() -> int:
        calls.append(1)
        time.sleep(0.3)
        return 42

    flight: SingleFlight[int] = SingleFlight()
    assert _herd(flight, slow) == [42] * 8
    assert len(calls) == 1 and flight.shared == 7
    assert flight.do("k", lambda: 7) == 7  # nothing in flight: a new call


def test_the_leaders_error_reaches_every_follower() -> None:
    def boom() -> int:
        time.sleep(0.3)
        raise toolkit.StorageUnavailable("PostgreSQL at h:1 failed during get job: down")

    out = _herd(SingleFlight(), boom)
    assert len(out) == 8 and all(isinstance(e, toolkit.StorageUnavailable) for e in out)
    assert all("down" in str(e) for e in out)


def test_a_follower_gives_up_after_the_timeout() -> None:
    release = threading.Event()
    flight: SingleFlight[int] = SingleFlight(timeout=0.2)
    leader = threading.Thread(target=lambda: flight.do("k", lambda: release.wait(5) and 1))
    leader.start()
    time.sleep(0.05)
    with pytest.raises(toolkit.StorageUnavailable, match="waiting for a concurrent read"):
        flight.do("k", lambda: 2)
    release.set()
    leader.join(5)
