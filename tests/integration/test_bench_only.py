"""A benchmark script's ``--only`` that matches no case says so (it raised FileNotFoundError)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import Servers


def test_an_only_that_matches_no_case_says_so(servers: Servers) -> None:
    env = {**os.environ, "DATABASE_URL": servers.database_url, "REDIS_URL": servers.redis_url}
    out = subprocess.run([sys.executable, "-m", "benchmarks.flow_goals", "--target", "loopback",
                          "--only", "fused"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1, out.stderr
    assert "no case of flow_goals starts with fused" in out.stderr and "Traceback" not in out.stderr
