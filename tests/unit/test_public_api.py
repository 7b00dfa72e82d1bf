"""The public surface is pinned: a change here is a breaking change."""

from __future__ import annotations

import subprocess
import sys

import toolkit

EXPECTED = [
    "ActionPlan", "ActionResult",
    "AssignmentStatus", "ConfigurationError", "ConsistencyReport", "IdempotencyConflict", "Inspector",
    "InvalidTransition",
    "Job", "JobAssignment", "JobStatus", "LocalStack", "Lock", "LockNotOwned", "NotFound",
    "RebuildReport", "RetryPolicy", "StaleAttempt", "StateManager", "StorageUnavailable",
    "ToolkitError", "ValidationError",
    "Worker", "WorkerStatus", "Workflow", "WorkflowStatus", "__version__", "init_state_manager",
    "local_stack",
]


def test_all_is_sorted_and_pinned() -> None:
    assert toolkit.__all__ == sorted(toolkit.__all__)
    assert toolkit.__all__ == EXPECTED
    for name in toolkit.__all__:
        assert hasattr(toolkit, name), name


def test_import_connects_nothing_and_skips_widgets() -> None:
    code = (
        "import sys, socket\n"
        "def refuse(*a, **k): raise AssertionError('import opened a socket')\n"
        "socket.socket.connect = refuse\n"
        "import toolkit\n"
        "assert 'ipywidgets' not in sys.modules, 'ipywidgets imported'\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_py_typed_is_shipped() -> None:
    from importlib import resources

    assert (resources.files("toolkit") / "py.typed").is_file()
