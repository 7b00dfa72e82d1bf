"""Secrets in payloads, results and metadata never reach an operator's screen unless asked (issue 16).

One system holds secrets under sensitive keys (top level, nested, inside lists, in a job's
payload and result, a workflow's and a worker's metadata). Every Inspector frame, the
explanation, the CLI in each format, a snapshot's files, the dashboard and the log are
searched for them: none is found. With ``unmask`` they are all there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import toolkit
import toolkit.widgets
from tests.integration.test_cli import base
from toolkit import cli

SECRETS = [f"Sekr1t-{i}-Qw9" for i in range(6)]
"""Each planted under a different sensitive key; none may show."""
PAYLOAD = {"customer": {"plan": "pro", "password": SECRETS[0]},
           "items": [{"sku": "a"}, {"refresh_token": SECRETS[1]}], "db_password": SECRETS[2]}
RESULT = {"ok": True, "auth": {"Authorization": f"Bearer {SECRETS[3]}"}, "api-key": SECRETS[4]}


@pytest.fixture
def system(sm: toolkit.StateManager, caplog: pytest.LogCaptureFixture) -> toolkit.StateManager:
    caplog.set_level(logging.DEBUG)
    sm.register_worker("w1", metadata={"session_cookie": SECRETS[5]})
    sm.create_workflow("etl", workflow_id="wf", metadata={"apiKey": SECRETS[5], "team": "data"},
                       jobs=[{"name": "a", "id": "ja", "payload": PAYLOAD},
                             {"name": "b", "id": "jb", "payload": PAYLOAD},
                             {"name": "c", "id": "jc", "payload": {"plain": 1}}])
    sm.heartbeat("w1")
    job = sm.dequeue("w1")
    assert job is not None and job.id == "ja"
    sm.start_job("ja")
    sm.complete_job("ja", RESULT)
    return sm


@pytest.fixture
def ins(system: toolkit.StateManager, clean) -> Iterator[toolkit.Inspector]:
    with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                           schema=clean.schema) as i:
        yield i


def found(text: str | bytes) -> list[str]:
    data = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    return [s for s in SECRETS if s in data]


def every_output(ins) -> str:
    """Everything the Inspector shows, as text."""
    parts = [ins.jobs().to_csv(), ins.workflows().to_csv(), ins.workers().to_csv(),
             ins.events().to_csv(), ins.timeline("ja").to_csv(), str(ins.explain("ja")),
             ins.explain("ja")._repr_html_(), ins.jobs(workflow_id="wf", status="completed").to_csv(),
             ins.jobs(payload_columns={"pw": "customer.password", "plan": "customer.plan"}).to_csv()]
    return "\n".join(parts)


def test_no_frame_shows_a_secret_and_unmask_shows_them_all(ins, clean) -> None:
    shown = every_output(ins)
    assert found(shown) == []
    assert "***" in shown and "pro" in shown and "data" in shown  # the rest is kept
    assert sorted(found(every_output(ins) + ins.jobs(unmask=True).to_csv()
                        + ins.workflows(unmask=True).to_csv()
                        + ins.workers(unmask=True).to_csv())) == sorted(SECRETS)
    with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                           schema=clean.schema, unmask=True) as open_ins:
        assert sorted(found(every_output(open_ins))) == sorted(SECRETS)
        assert found(open_ins.jobs(unmask=False).to_csv()) == []


def test_the_bound_inspector_masks_too(system) -> None:
    assert found(every_output(system.inspector)) == []


def test_a_custom_key_list_masks_more_and_never_less(clean, system) -> None:
    with toolkit.Inspector(clean.database_url, clean.redis_url, namespace=clean.namespace,
                           schema=clean.schema, sensitive_keys=["plan"]) as i:
        jobs = i.jobs().to_csv()
    assert "pro" not in jobs and found(jobs) == []


def test_cli_output_shows_no_secret_in_any_format_unless_unmasked(system, clean, capsys) -> None:
    commands = [["inspect", what, "--format", fmt] for what in ("jobs", "workflows", "workers")
                for fmt in ("table", "csv", "json")]
    commands += [["events", "--format", "json"], ["timeline", "ja", "--format", "csv"],
                 ["explain", "ja"], ["jobs", "--format", "json"],
                 ["jobs", "--payload", '{"customer": {"plan": "pro"}}', "--format", "csv"]]
    for command in commands:
        assert cli.main([*command, *base(clean)]) == 0, command
        out = capsys.readouterr()
        assert found(out.out + out.err) == [], command
    assert cli.main(["inspect", "jobs", "--format", "json", "--unmask", *base(clean)]) == 0
    assert sorted(found(capsys.readouterr().out)) == sorted(SECRETS[:5])


def test_snapshot_files_hold_no_secret_and_reopen_masked(ins, clean, tmp_path: Path, capsys) -> None:
    folder = ins.snapshot(tmp_path / "snap")
    blobs = b"".join(p.read_bytes() for p in sorted(folder.iterdir()))
    assert found(blobs) == []
    assert cli.main(["snapshot", str(tmp_path / "cli"), *base(clean)]) == 0
    assert found(b"".join(p.read_bytes() for p in (tmp_path / "cli").iterdir())) == []
    # an unmasked snapshot (asked for) holds them, and still reopens masked unless asked
    raw = ins.snapshot(tmp_path / "raw", unmask=True)
    assert sorted(found(b"".join(p.read_bytes() for p in raw.iterdir()))) == sorted(SECRETS)
    offline = toolkit.Inspector.from_snapshot(raw)
    assert found(every_output(offline)) == []
    assert sorted(found(offline.jobs(unmask=True).to_csv())) == sorted(SECRETS[:5])


def test_dashboard_shows_no_secret(ins) -> None:
    frames = toolkit.widgets.dashboard(ins, limit=10)
    assert found("".join(f.to_csv() for f in frames.values())) == []
    dash = toolkit.widgets.Dashboard(ins, limit=10)
    try:
        texts = [dash.board.value, dash.table.value, dash.jobs_table().to_html(), repr(dash)]
        texts += [f.to_csv() for f in dash.frames().values()]
        assert found("".join(texts)) == []
    finally:
        dash.close()


def test_logs_and_errors_show_no_secret(system, ins, caplog: pytest.LogCaptureFixture) -> None:
    every_output(ins)
    with pytest.raises(toolkit.ValidationError) as bad:
        system.create_workflow("x", jobs=[{"name": "n", "payload": {"token": SECRETS[0],
                                                                     "x": float("nan")}}])
    assert found(str(bad.value)) == [] and "payload" in str(bad.value)
    with pytest.raises(toolkit.ValidationError) as bad:
        system.complete_job("jb", {"password": SECRETS[1], "v": {1, 2}})
    assert found(str(bad.value)) == []
    assert caplog.records and found(caplog.text) == []
