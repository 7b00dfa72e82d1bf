"""The command line: ``python -m toolkit`` (also installed as ``toolkit``).

Global options (``--database-url``, ``--redis-url``, ``--namespace``, ``--schema``,
``-v``) go before or after the command. Read commands (``check`` without
``--repair``, ``purge --dry-run``, ``inspect``, ``jobs``, ``explain``, ``snapshot``,
``metrics``, ``serve-metrics``, ``events``, ``timeline``, ``wait-times``,
``heartbeat-gaps``, ``metric-series``) never write, migrate or create anything, and
print sensitive payload, result and metadata values as ``***`` unless ``--unmask``.

Exit codes scripts can rely on:

- 0 success
- 1 a check failed: ``check`` found a disagreement, ``demo`` lost a write, no such job;
  or the operator declined a confirmation prompt (``pause``, ``resume``, ``requeue``,
  ``cancel-jobs``: nothing changed)
- 2 bad usage or configuration: a flag, a URL (scheme, non-numeric port,
  unencoded ``@`` in a PostgreSQL password), a value
- 3 a server could not be reached, or failed while answering
- 4 the servers answered but the setup is wrong: no toolkit tables in the schema,
  unknown database or role, refused password, permission denied
- 130 interrupted

Modules: :mod:`~toolkit.cli.parser` (options, ages), :mod:`~toolkit.cli.output`
(formats), :mod:`~toolkit.cli.read` (read commands), :mod:`~toolkit.cli.admin`
(demo, up, check, snapshot, serve-metrics, purge), :mod:`~toolkit.cli.operate` (pause, resume, edit),
:mod:`~toolkit.cli.bulk` (requeue, cancel-jobs, actions: bulk operator actions).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from toolkit import errors, validate
from toolkit.cli import admin, bulk, operate, read
from toolkit.cli.parser import build, join_ages, parse_duration

__all__ = ["EXIT_CHECK_FAILED", "EXIT_OK", "EXIT_SETUP", "EXIT_UNAVAILABLE", "EXIT_USAGE", "main",
           "parse_duration"]

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_SETUP = 0, 1, 2, 3, 4
COMMANDS = {**admin.COMMANDS, **operate.COMMANDS, **read.COMMANDS, **bulk.COMMANDS}


_IDS = ("job_id", "workflow_id", "worker_id")
"""Arguments that name an entity: checked as ids before any server is asked."""


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse what no tier can store (lone surrogates, NUL, control characters, over-long
    ids) before any server is contacted, so bad usage is exit 2 whatever the servers say."""
    for name, value in vars(args).items():
        if not isinstance(value, str) or name in ("database_url", "redis_url"):
            continue
        if name in _IDS:
            validate.identifier(name, value)
        else:
            validate.text(name, value)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = build([admin.add_commands, operate.add_commands, read.add_commands, bulk.add_commands])
    args = parser.parse_args(join_ages(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_arguments(args)
        return COMMANDS[args.command](args)
    except errors.SetupError as exc:
        print(f"toolkit: setup: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except (errors.ConfigurationError, errors.ValidationError) as exc:
        print(f"toolkit: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except errors.StorageUnavailable as exc:
        print(f"toolkit: unavailable: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except errors.ToolkitError as exc:
        print(f"toolkit: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except KeyboardInterrupt:
        return 130
