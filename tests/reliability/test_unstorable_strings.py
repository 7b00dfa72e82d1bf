"""Strings PostgreSQL or Redis cannot hold are refused at every entry point (issue 17, item 3).

Injected: lone surrogates (what ``sys.argv`` and ``os.fsdecode`` hand over for
bytes that are not UTF-8), NUL and other control characters, over-long values and
non-string keys, through the public API (StateManager verbs, Lock) and the CLI,
against the real servers. Checked: a ``ValidationError`` (CLI: exit 2, one line,
no traceback) that names the field, nothing written in any tier, and no driver
exception (``UnicodeEncodeError``, psycopg, redis) ever leaving.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import toolkit
import toolkit.cli
from tests.conftest import Servers
from tests.reliability.conftest import everything

SETTINGS = settings(max_examples=40, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])

SURROGATE = st.characters(categories=["Cs"])
CONTROL = st.characters(min_codepoint=0, max_codepoint=0x1F) | st.just("\x7f")
ANY_TEXT = st.lists(st.characters() | SURROGATE | CONTROL, max_size=20).map("".join)
"""Any text at all (``st.text`` never draws a surrogate, so joined from characters)."""


def _around(bad: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``bad`` somewhere inside ordinary text."""
    return st.builds(lambda a, b, c: a + b + c, ANY_TEXT, bad, ANY_TEXT)


UNSTORABLE = _around(SURROGATE | st.just("\x00"))
"""Text no tier can hold: a lone surrogate or a NUL inside."""

BAD_IDS = st.one_of(
    UNSTORABLE, _around(CONTROL), st.just(""),
    st.integers(256, 400).map(lambda n: "i" * n),
    st.integers() | st.binary(max_size=4) | st.lists(st.text(max_size=2), max_size=2),
)
BAD_KEYS = st.integers() | st.tuples(st.integers()) | st.none() | UNSTORABLE


def _nested(leaf: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``leaf`` at some depth inside JSON-like dicts and lists."""
    return st.recursive(leaf, lambda inner: st.lists(inner, min_size=1, max_size=2)
                        | st.dictionaries(st.text(max_size=4), inner, min_size=1, max_size=2),
                        max_leaves=4)


@pytest.fixture
def busy(sm: toolkit.StateManager) -> toolkit.StateManager:
    """A manager with a workflow, a running job ``a`` on worker ``w1`` and a queued job ``b``."""
    sm.create_workflow("w", workflow_id="wf", jobs=[{"name": "a", "id": "a"},
                                                    {"name": "b", "id": "b"}])
    sm.register_worker("w1")
    sm.dequeue("w1", timeout=0)
    sm.start_job("a", worker_id="w1")
    return sm


def _id_verbs(sm: toolkit.StateManager, bad: Any) -> dict[str, Callable[[], Any]]:
    """Verbs that take ``bad`` as an id or a name, keyed by the field the refusal must name."""
    verbs: dict[str, Callable[[], Any]] = {
        "workflow_id": lambda: sm.create_workflow("w", workflow_id=bad),
        "name": lambda: sm.create_workflow(bad),
        "jobs[0].name": lambda: sm.create_workflow("w", jobs=[{"name": bad}]),
        "jobs[0].queue": lambda: sm.create_workflow("w", jobs=[{"name": "j", "queue": bad}]),
        "jobs[0].id": lambda: sm.create_workflow("w", jobs=[{"name": "j", "id": bad}]),
        "job_id": lambda: sm.get_job(bad),
        "worker_id": lambda: sm.register_worker(bad),
        "hostname": lambda: sm.register_worker("w2", hostname=bad),
        "queues": lambda: sm.register_worker("w2", queues=[bad]),
        "depends_on": lambda: sm.create_job("wf", "c", depends_on=[bad]),
        "lock name": lambda: sm.lock(bad),
        "metric name": lambda: sm.incr_metric(bad),
        "metric names": lambda: sm.incr_metrics({bad: 1}) if _hashable(bad) else sm.incr_metric(bad),
    }
    return verbs


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def _field_of(label: str) -> str:
    return {"lock name": "name", "metric name": "name", "metric names": "name"}.get(label, label)


@SETTINGS
@given(bad=BAD_IDS)
def test_unstorable_ids_and_names_are_refused_naming_the_field_and_write_nothing(
        busy: toolkit.StateManager, clean: Servers, bad: Any) -> None:
    before = everything(busy, clean)
    for label, call in _id_verbs(busy, bad).items():
        with pytest.raises(toolkit.ValidationError) as info:
            call()
        assert _field_of(label) in str(info.value), (label, str(info.value)[:200])
    lock = busy.lock("ok")
    assert lock.acquire(blocking=False)
    lock.release()
    assert everything(busy, clean)[0] == before[0]


@SETTINGS
@given(bad=UNSTORABLE | st.integers(10_001, 10_050).map(lambda n: "e" * n))
def test_unstorable_error_texts_are_refused_and_the_job_stays_running(
        busy: toolkit.StateManager, clean: Servers, bad: str) -> None:
    before = everything(busy, clean)
    with pytest.raises(toolkit.ValidationError) as info:
        busy.fail_job("a", bad, worker_id="w1")
    assert "error" in str(info.value)
    assert busy.get_job("a").status == "running"
    assert everything(busy, clean) == before


@SETTINGS
@given(bad=_nested(UNSTORABLE) | _nested(st.dictionaries(BAD_KEYS, st.integers(), min_size=1,
                                                          max_size=1)))
def test_unstorable_payload_result_and_metadata_at_any_depth_are_refused(
        busy: toolkit.StateManager, clean: Servers, bad: Any) -> None:
    before = everything(busy, clean)
    calls = {
        "jobs[0].payload": lambda: busy.create_workflow("x", jobs=[{"name": "p", "payload": bad}]),
        "payload": lambda: busy.create_job("wf", "p", payload={"k": bad}),
        "metadata": lambda: busy.create_workflow("x", metadata={"m": bad}),
        "result": lambda: busy.complete_job("a", [bad], worker_id="w1"),
    }
    calls["metadata "] = lambda: busy.register_worker("w3", metadata={"m": bad})
    for field, call in calls.items():
        with pytest.raises(toolkit.ValidationError) as info:
            call()
        assert field.strip() in str(info.value), (field, str(info.value)[:200])
    assert everything(busy, clean) == before


@SETTINGS
@given(text=ANY_TEXT)
def test_any_string_either_works_or_is_a_validation_error_never_a_driver_error(
        busy: toolkit.StateManager, text: str) -> None:
    calls: list[Callable[[], Any]] = [
        lambda: busy.get_job(text), lambda: busy.get_workflow(text), lambda: busy.get_worker(text),
        lambda: busy.list_jobs(workflow_id=text), lambda: busy.list_jobs(status=text),
        lambda: busy.get_metric(text), lambda: busy.lock(text, ttl=1).acquire(blocking=False),
        lambda: busy.inspector.jobs(workflow_id=text),
        lambda: busy.inspector.metric_series([text]),
    ]
    for call in calls:
        with contextlib.suppress(toolkit.ValidationError):
            call()


# -- the command line ------------------------------------------------------------------------

@SETTINGS
@given(bad=UNSTORABLE | _around(CONTROL) | st.just("j" * 300))
@example(bad="-\u00f9\x1eM\uda7f\x1b")  # starts with "-": once taken for an option
def test_cli_refuses_unstorable_arguments_with_exit_2_and_one_line(
        clean: Servers, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    where = ["--database-url", clean.database_url, "--redis-url", clean.redis_url,
             "--namespace", clean.namespace, "--schema", clean.schema]
    # Passed as ``--flag=value`` or after ``--``: a value that starts with "-" is still a value.
    for argv in (["explain", *where, "--", bad], ["inspect", "jobs", f"--workflow-id={bad}", *where],
                 ["inspect", "assignments", *where[:4], f"--namespace={bad}",
                  "--schema", clean.schema]):
        code = toolkit.cli.main(argv)
        out, err = capsys.readouterr()
        assert code == toolkit.cli.EXIT_USAGE, (argv[:2], code, err[-500:])
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err[-500:]
        assert err.startswith("toolkit: error:") and out == ""
