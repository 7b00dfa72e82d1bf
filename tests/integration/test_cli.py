"""The command line: exit codes, formats (CSV and JSON round-trip through pandas), errors."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest

import toolkit
from toolkit import cli


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120, check=False)


def base(clean) -> list[str]:
    return ["--database-url", clean.database_url, "--redis-url", clean.redis_url,
            "--namespace", clean.namespace, "--schema", clean.schema]


def test_inspect_jobs_csv_and_json_round_trip(sm, clean, capsys) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}, {"name": "b", "id": "b", "priority": 4}])
    assert cli.main(["inspect", "jobs", "--format", "csv", *base(clean)]) == 0
    frame = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col="job_id")
    assert sorted(frame.index) == ["a", "b"] and set(frame["status"]) == {"queued"}
    assert cli.main(["inspect", "jobs", "--format", "json", "--status", "queued", *base(clean)]) == 0
    back = pd.DataFrame(json.loads(capsys.readouterr().out)).set_index("job_id")
    assert sorted(back.index) == ["a", "b"] and back.loc["b", "priority"] == 4


def test_check_exit_codes(sm, clean, raw_redis, capsys) -> None:
    sm.create_workflow("w", jobs=[{"name": "a", "id": "a"}])
    assert cli.main(["check", *base(clean)]) == 0
    from toolkit.tiers.redis import keys
    raw_redis.delete(keys.queue(clean.namespace, "default"))
    assert cli.main(["check", *base(clean)]) == 1
    assert "not in queue" in capsys.readouterr().out
    assert cli.main(["check", "--repair", *base(clean)]) == 0
    assert cli.main(["check", *base(clean)]) == 0


def test_bad_flags_and_unreachable_servers_are_one_line_errors(clean) -> None:
    out = run("inspect", "jobs", "--database-url", "postgresql://nobody:pw@127.0.0.1:1/x",
              "--redis-url", clean.redis_url)
    assert out.returncode == 3 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "127.0.0.1:1" in out.stderr and "pw" not in out.stderr
    out = run("inspect", "jobs", env={"DATABASE_URL": "", "REDIS_URL": ""})
    assert out.returncode == 2 and "DATABASE_URL" in out.stderr
    out = run("inspect", "nonsense")
    assert out.returncode == 2
    out = run("inspect", "jobs", "--status", "bogus", *base(clean))
    assert out.returncode == 2 and "status" in out.stderr


@pytest.mark.parametrize("command", ["demo", "inspect", "check", "up"])
def test_help_everywhere(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout


def test_demo_passes_on_the_servers_of_this_run(clean) -> None:
    out = run("demo", "--workflows", "4", "--jobs", "10",
              "--database-url", clean.database_url, "--redis-url", clean.redis_url)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS" in out.stdout and "every acknowledged completion is there" in out.stdout
    # The last words say, in plain numbers, what was in flight and what came back.
    flying = re.search(r"when the coordinator was killed, (\d+) jobs were in flight", out.stdout)
    reclaimed = re.search(r"it reclaimed (\d+) once", out.stdout)
    checked = re.search(r"(\d+) acknowledged writes were checked against PostgreSQL: none was lost",
                        out.stdout)
    assert flying and reclaimed and checked, out.stdout
    assert int(flying[1]) > 0 and int(reclaimed[1]) > 0 and int(checked[1]) > 0, out.stdout


def test_version_is_exposed() -> None:
    assert toolkit.__version__
