"""The CLI shell: help is instant (no torch import), errors are one line with exit codes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from medcli import __version__
from medcli.cli import app

from cli_helpers import heavy_imports, one_line_error

runner = CliRunner()
COMMANDS = ["download", "train", "evaluate", "aggregate", "plot-confusion", "explain", "clean-processes"]


def test_help_lists_every_command_and_imports_neither_torch_nor_numpy():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and all(command in result.stdout for command in COMMANDS)
    assert heavy_imports(["--help"]) == []


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_help_is_light(command):
    assert heavy_imports([command, "--help"]) == []


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"medcli {__version__}"


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "medcli", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"medcli {__version__}"


def test_unknown_option_is_one_line_exit_2():
    one_line_error(runner.invoke(app, ["train", "--no-such-option"]), 2, "--no-such-option")


def test_unexpected_errors_are_one_line_unless_verbose(monkeypatch):
    import medcli.datasets as datasets

    def broken():
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(datasets, "flags", broken)
    result = runner.invoke(app, ["download", "--list"])
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "ZeroDivisionError" in result.stderr
    verbose = runner.invoke(app, ["--verbose", "download", "--list"])
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr
