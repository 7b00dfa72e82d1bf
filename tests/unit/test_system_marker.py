"""`make test` needs only Python: tests that need a Debian package are left out, and the run says so.

The tests marked ``system`` (Chromium, PgBouncer, TLS Redis, SSL PostgreSQL) are deselected
by pyproject's ``-m "not slow and not system"``. The run's last lines must name how many were
left out, the Debian packages they need, and the command that runs them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_FILES = ["tests/browser", "tests/reliability/test_pgbouncer.py"]


def _pytest(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_default_run_leaves_system_tests_out_and_says_how_to_run_them() -> None:
    out = _pytest(*SYSTEM_FILES, "tests/unit/test_models.py")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    last = out.stdout.strip().splitlines()[-2:]
    line = last[0]
    assert line.startswith("3 system test(s) left out"), last
    assert "chromium" in line and "pgbouncer" in line and "make test-system" in line, line
    assert "3 deselected" in last[1], last


def test_make_test_system_selects_exactly_the_tests_that_need_a_debian_package() -> None:
    out = _pytest(*SYSTEM_FILES, "tests/reliability/test_tls.py", "-m", "system", "--collect-only")
    assert out.returncode == 0, out.stdout[-3000:]
    for name in ("test_dashboard_notebook_filter_and_refresh_change_rendered_table",
                 "test_state_layer_works_through_pgbouncer_transaction_mode",
                 "test_rediss_with_the_ca_works", "test_postgres_verify_full_with_the_ca_uses_tls"):
        assert f"::{name}" in out.stdout, (name, out.stdout)
    # Needs only the pip-installed PostgreSQL: stays in the default run.
    assert "test_sslmode_reaches_libpq_on_a_server_without_ssl" not in out.stdout
    assert "left out" not in out.stdout, out.stdout
