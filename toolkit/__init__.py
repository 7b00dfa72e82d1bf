"""toolkit: the state layer of a workflow orchestrator's coordinator, and its inspection kit.

Importing toolkit connects to nothing. The public names are listed in
``__all__``; everything else (``toolkit.tiers`` above all) is internal.
"""

from __future__ import annotations

from toolkit import state
from toolkit.compare import ConsistencyReport
from toolkit.errors import (
    ConfigurationError,
    IdempotencyConflict,
    InvalidTransition,
    LockNotOwned,
    NotFound,
    StaleAttempt,
    StorageUnavailable,
    ToolkitError,
    ValidationError,
)
from toolkit.inspection.inspector import Inspector
from toolkit.local_stack import LocalStack, local_stack
from toolkit.lock import Lock
from toolkit.manager.planning import ActionPlan, ActionResult
from toolkit.models import (
    AssignmentStatus,
    Job,
    JobAssignment,
    JobStatus,
    Worker,
    WorkerStatus,
    Workflow,
    WorkflowStatus,
)
from toolkit.recovery import RebuildReport
from toolkit.retry_policy import RetryPolicy
from toolkit.state import StateManager, init_state_manager

state.register_inspector_factory(Inspector._bound)

__version__ = "0.1.0"

__all__ = [
    "ActionPlan",
    "ActionResult",
    "AssignmentStatus",
    "ConfigurationError",
    "ConsistencyReport",
    "IdempotencyConflict",
    "Inspector",
    "InvalidTransition",
    "Job",
    "JobAssignment",
    "JobStatus",
    "LocalStack",
    "Lock",
    "LockNotOwned",
    "NotFound",
    "RebuildReport",
    "RetryPolicy",
    "StaleAttempt",
    "StateManager",
    "StorageUnavailable",
    "ToolkitError",
    "ValidationError",
    "Worker",
    "WorkerStatus",
    "Workflow",
    "WorkflowStatus",
    "__version__",
    "init_state_manager",
    "local_stack",
]
