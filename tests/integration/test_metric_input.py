"""Issue 13, item 7: counters never go down and their names are Prometheus-safe, against real servers."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

import toolkit
from toolkit.inspection import prometheus


def counter_value(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"{name} not exported")


@pytest.mark.parametrize("amount", [-5, 0])
def test_incr_metric_refuses_amounts_below_one_and_writes_nothing(sm: toolkit.StateManager,
                                                                   amount: int) -> None:
    sm.incr_metric("jobs_done", 3)
    before = counter_value(prometheus.render(sm.inspector), "toolkit_jobs_done_total")
    with pytest.raises(toolkit.ValidationError, match="invalid amount="):
        sm.incr_metric("jobs_done", amount)
    with pytest.raises(toolkit.ValidationError, match="invalid amount="):
        sm.incr_metrics({"jobs_done": 1, "other": amount})
    after = counter_value(prometheus.render(sm.inspector), "toolkit_jobs_done_total")
    assert after >= before == 3.0
    assert sm.metrics() == {"jobs_done": 3}


@pytest.mark.parametrize("name", ["my metric!", "Jobs", "9lives", "a-b", "x" * 101, ""])
def test_incr_metric_refuses_names_prometheus_cannot_hold(sm: toolkit.StateManager, name: str) -> None:
    with pytest.raises(toolkit.ValidationError, match="invalid name="):
        sm.incr_metric(name)
    with pytest.raises(toolkit.ValidationError, match="name"):
        sm.incr_metrics({"fine": 1, name: 1})
    assert sm.metrics() == {}


def test_incr_metric_accepts_lowercase_snake_names(sm: toolkit.StateManager) -> None:
    assert sm.incr_metric("_private_2") == 1
    assert sm.incr_metrics({"a" * 100: 2}) == {"a" * 100: 2}
