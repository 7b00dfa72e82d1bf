"""``toolkit pause`` and ``toolkit resume``: arguments, help and the prompt (no sockets).

Bad input and a declined prompt end before any server is contacted, so the URLs
below point at nothing and the exit codes still come out right.
"""

from __future__ import annotations

import io

import pytest

from toolkit import cli

NOWHERE = ["--database-url", "postgresql://u@127.0.0.1:1/none", "--redis-url", "redis://127.0.0.1:1/0"]


class Terminal(io.StringIO):
    """A stdin that says it is a terminal and answers with ``text``."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("verb", ["pause", "resume"])
def test_help_names_the_prompt_and_the_exit_codes(verb: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([verb, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--yes" in out and "exit codes" in out and "QUEUE" in out


def test_pause_needs_a_reason(capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["pause", "reports", *NOWHERE])
    assert done.value.code == 2
    assert "--reason" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "field"), [
    (["pause", "reports", "--reason", "   "], "reason"),
    (["pause", "bad\tqueue", "--reason", "x"], "queue"),
    (["resume", "bad\tqueue"], "queue"),
    (["pause", "reports", "--reason", "x", "--actor", ""], "actor"),
])
def test_bad_input_is_usage_before_any_server(argv: list[str], field: str, capsys) -> None:
    assert cli.main([*argv, "--yes", *NOWHERE]) == 2
    assert field in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["pause", "reports", "--reason", "x"], ["resume", "reports"]])
def test_a_declined_prompt_on_a_terminal_does_nothing(argv: list[str], monkeypatch, capsys) -> None:
    monkeypatch.setattr("sys.stdin", Terminal("n\n"))
    assert cli.main([*argv, *NOWHERE]) == 1  # the servers are never asked
    captured = capsys.readouterr()
    assert "queue 'reports'" in captured.err and "nothing changed" in captured.err
