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


def test_train_options_are_written_once():
    """`config.TrainOptions` is the one list of train's options: the CLI signature has each of
    them (and its own launch options) with the same default and the help written there, and
    the resolved config (the manifest's) holds a value for each."""
    import dataclasses
    import inspect
    import typing
    from enum import Enum
    from pathlib import Path

    from medcli import cli, config

    cli_only = {"resume", "nproc", "json_output"}
    renamed = {"data_budget": "data_budget_gb"}  # --data-budget takes GiB
    fields = {f.name: f for f in dataclasses.fields(config.TrainOptions)}
    hints = typing.get_type_hints(cli.train, include_extras=True)
    parameters = {name: p for name, p in inspect.signature(cli.train).parameters.items() if name not in cli_only}
    assert {renamed.get(name, name) for name in parameters} == set(fields)
    for name, parameter in parameters.items():
        field = fields[renamed.get(name, name)]
        default = parameter.default
        default = default.value if isinstance(default, Enum) else str(default) if isinstance(default, Path) else default
        assert default == field.default, name
        assert hints[name].__metadata__[0].help == field.metadata["help"], name
    resolved = config.resolve_config()
    augment = {"flips", "rotate", "crop_scale", "jitter"}  # resolved into the augment record
    assert set(fields) - augment <= set(resolved) and resolved["augment"]
    assert config.NOT_EXPERIMENT <= set(resolved)
