"""The CLI shell: help is instant (no torch import) and reads at 80 columns, errors are one line
with exit codes, results go to stdout and the rest to stderr."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medcli import __version__
from medcli.cli import app

from cli_helpers import heavy_imports, one_line_error

runner = CliRunner()
COMMANDS = ["download", "train", "evaluate", "aggregate", "plot-confusion", "explain", "report", "clean-processes"]


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


@pytest.mark.parametrize("argv, exit_code", [(["--version"], 0), (["train", "--no-such-option"], 2)])
def test_a_signal_after_the_command_has_ended_changes_nothing(argv, exit_code):
    """Review: SIGTERM or Ctrl-C during the interpreter's teardown (1.1-1.4 s with torch loaded),
    after the result was printed, killed the command by the signal (exit 143) or printed a
    traceback from an atexit callback. It ends the process with the command's own exit code
    (a teardown that hangs can still be stopped)."""
    code = ("import atexit, os, signal, sys, time\n"
            "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)))\n"
            f"sys.argv = ['medcli', *{argv!r}]\n"
            "from medcli.cli import main\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert proc.returncode == exit_code and "Traceback" not in proc.stderr, proc
    assert proc.stdout.strip() == (f"medcli {__version__}" if exit_code == 0 else "")


def test_a_console_without_the_tables_characters_gets_question_marks_not_an_error(tmp_path):
    """Review: on a Latin-1 (or cp1252) console `aggregate` ended in "unexpected
    UnicodeEncodeError: 'latin-1' codec can't encode character '\\u2193'" (its ↓ and ★)."""
    from test_aggregate import make_run

    make_run(tmp_path, "a")
    make_run(tmp_path, "b", model="vit-tiny")
    env = {**os.environ, "PYTHONIOENCODING": "latin-1"}
    proc = subprocess.run([sys.executable, "-m", "medcli", "aggregate", str(tmp_path)], capture_output=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert b"ece ?" in proc.stdout and b"\xb1" in proc.stdout  # ↓ has no Latin-1 byte, ± has


@pytest.mark.parametrize("stop", [  # importing the CLI; Typer building its commands
    "import builtins\nreal = builtins.__import__\n"
    "builtins.__import__ = lambda name, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if name == 'typer' "
    "else real(name, *a, **k)\n",
    "import typer.main\ntyper.main.get_command = lambda *a: (_ for _ in ()).throw(KeyboardInterrupt)\n"])
def test_a_ctrl_c_while_the_command_line_starts_up_is_exit_130_without_a_traceback(stop):
    """Review: Ctrl-C in the first second (the imports, then Typer building the commands)
    printed a 16-47-line KeyboardInterrupt traceback."""
    code = f"import sys\nsys.argv = ['medcli', 'download', '--list']\n{stop}from medcli.__main__ import main\nmain()\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr and proc.stdout == "", proc


def test_a_path_the_file_system_refuses_is_one_line(tmp_path):
    """Review: a 300-character folder name ended evaluate, report, explain and predict with
    "unexpected OSError: [Errno 36] File name too long"."""
    long = tmp_path / ("b" * 300)
    result = CliRunner().invoke(app, ["evaluate", str(long)])
    line = one_line_error(result, None, "File name too long")
    assert "unexpected" not in line and result.exit_code != 0


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

    cli_only = {"ctx", "resume", "nproc", "json_output"}
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


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[]] + [[c] for c in COMMANDS])
def test_every_help_reads_at_80_columns(command):
    """Review #24: Rich's six-column table left train's descriptions 16 characters wide, cut
    texts with an ellipsis and showed flags as taking a <bool> value."""
    result = runner.invoke(app, [*command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= 80, max(lines, key=len)
    assert "…" not in result.stdout and "<bool>" not in result.stdout
    # '...' only where Click marks a repeated value (usage line, `runs...`, `<str,str>...`), never a cut
    text = "\n".join(re.sub(r"(^\s+\w+|>)\.\.\.", "", line) for line in lines if not line.startswith("Usage:"))
    assert "..." not in text
    assert command != ["train"] or len(lines) < 120


def test_a_global_option_after_the_command_says_where_it_goes():
    one_line_error(runner.invoke(app, ["train", "--verbose"]), 2, "--verbose is a global option",
                   "'medcli --verbose train ...'")
    one_line_error(runner.invoke(app, ["evaluate", "-q"]), 2, "medcli -q evaluate")


# -- streams ---------------------------------------------------------------------------------------
def test_sigterm_names_the_run_and_the_exact_resume_command(synthetic_root, tmp_path, monkeypatch):
    """SIGTERM (and Ctrl-C, which takes the same path) in the middle of training: exit 130,
    one line naming the run and the command that continues it; that command, run as printed,
    finishes the run and prints the same absolute directory as train does."""
    import medcli.train as library

    real_epoch = library.train_one_epoch
    calls = []

    def terminated_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler turns it into an interrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(library, "train_one_epoch", terminated_in_second_epoch)
    stopped = runner.invoke(app, ["train", "--root", str(synthetic_root), "--runs-dir", "runs", "--model",
                                  "timm:test_resnet", "--epochs", "2", "--batch-size", "16"])
    (run,) = (tmp_path / "runs").iterdir()
    line = one_line_error(stopped, 130, f"the train stage of run {run} was interrupted",
                          f"continue it with 'medcli train --resume {run}'")
    monkeypatch.setattr(library, "train_one_epoch", real_epoch)
    resume = shlex.split(line.split("continue it with ")[1].strip("'"))
    assert resume[:3] == ["medcli", "train", "--resume"]
    resumed = runner.invoke(app, resume[1:])
    assert resumed.exit_code == 0, resumed.output
    assert resumed.stdout == f"{run}\n" and run.is_absolute()
    again = runner.invoke(app, ["train", "--resume", "runs/" + run.name])
    one_line_error(again, 2, "already finished training (2 epochs)")


def test_resume_refuses_the_options_it_would_ignore_before_reading_the_run(tmp_path):
    """--resume continues a run with its own options: any other given with it (even at its
    default value) is named in one line, before the run is opened; --device, --root,
    --collective-timeout and --json are resume's own."""
    missing = str(tmp_path / "no-such-run")
    given = ["--epochs", "3", "--lr", "0.5", "--model", "vit", "--dataset", "chestmnist", "--seed", "0", "--no-flips"]
    line = one_line_error(runner.invoke(app, ["train", "--resume", missing, *given]), 2,
                          "--resume continues RUN with its own options; leave out --dataset, --model, --epochs, "
                          "--lr, --flips/--no-flips, --seed (or start a new run)")
    assert "does not exist" not in line
    own = ["--device", "cpu", "--root", str(tmp_path), "--collective-timeout", "5", "--json"]
    one_line_error(runner.invoke(app, ["train", "--resume", missing, *own]), 2, "does not exist")


def test_evaluate_prints_the_files_it_wrote_and_quiet_keeps_only_errors(tiny_run, tmp_path):
    """stdout carries the written files (absolute; --json: under 'files'), the summary table
    and warnings go to stderr, and --quiet leaves stderr to errors alone."""
    from medcli.run import Run

    run = shutil.copytree(tiny_run, tmp_path / "run")
    Run.open(run).update(lambda data: data["dataset"].update(md5="0" * 32))  # load_data warns about the file
    result = runner.invoke(app, ["evaluate", str(run)])
    assert result.exit_code == 0, result.output
    files = result.stdout.splitlines()
    assert str(run / "metrics" / "test.json") in files and str(run / "report.xlsx") in files
    assert all(Path(f).is_absolute() and Path(f).is_file() for f in files)
    assert "warning:" in result.stderr and "evaluation" in result.stderr
    as_json = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert json.loads(as_json.stdout)["files"] == files
    quiet = runner.invoke(app, ["--quiet", "evaluate", str(run)])
    assert quiet.exit_code == 0 and quiet.stderr == "" and quiet.stdout.splitlines() == files
    one_line_error(runner.invoke(app, ["--quiet", "evaluate", str(tmp_path / "nothing")]), 2, "does not exist")


def test_counts_read_as_english():
    from medcli import console

    assert [console.plural(n, "test sample") for n in (0, 1, 2)] == ["0 test samples", "1 test sample",
                                                                     "2 test samples"]
    assert console.plural(1, "process", "processes") == "1 process"
    assert console.plural(3, "process", "processes") == "3 processes"


@pytest.mark.parametrize("say", ["info", "warn", "error", "debug"])
def test_log_lines_print_brackets_in_messages_literally(say, capsys):
    """File names ("scan.tif[frame 1]") and gloo's errors ("[/src/pair.cc:534] ...") hold square
    brackets; Rich must not read them as markup (a closing tag crashed rank 0 before)."""
    from medcli import console

    console.configure(quiet=False, verbose=True)
    text = "[/src/pair.cc:534] Connection closed by peer; scan.tif[frame 1] [bold]x[/bold]"
    getattr(console, say)(text)
    assert text in capsys.readouterr().err


def test_an_option_missing_its_value_points_at_the_subcommands_help():
    """Review: `aggregate --pair a` said "(see 'medcli --help')", whose help has no --pair."""
    one_line_error(runner.invoke(app, ["aggregate", "--pair", "a"]), 2, "--pair", "see 'medcli aggregate --help'")
    one_line_error(runner.invoke(app, ["train", "--epochs"]), 2, "see 'medcli train --help'")


def test_a_reader_that_has_gone_ends_the_command_quietly(tmp_path):
    """Review: `medcli report RUN | true` said "unexpected BrokenPipeError" after its work was
    done; a closed stdout ends it as Click ends a command: no message, exit 1."""
    read, write = os.pipe()
    os.close(read)  # the reader has gone before the result is printed
    try:
        done = subprocess.run([sys.executable, "-m", "medcli", "download", "bloodmnist", "--synthetic", "--root",
                               str(tmp_path)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert (tmp_path / "synthetic" / "bloodmnist.npz").is_file()
    assert done.returncode == 1 and "unexpected" not in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_a_broken_pipe_other_than_stdout_is_reported(monkeypatch, tmp_path):
    """Review of the fix above: every BrokenPipeError ended the command without a word, one of
    a worker's or a socket's pipe too."""
    from medcli import download

    def broken(*args, **kwargs):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(download, "_synthesize", broken)
    line = one_line_error(CliRunner().invoke(app, ["download", "bloodmnist", "--synthetic", "--root", str(tmp_path)]), 1)
    assert "unexpected BrokenPipeError" in line


def test_options_a_mode_does_not_use_are_refused_not_ignored(tmp_path):
    """Review: `download --list --synthetic`, `aggregate --maps --wide` and `aggregate --method
    gradcam` (without --maps) ran as if the option were not there, exit 0."""
    cases = [(["download", "--list", "--synthetic", "--root", str(tmp_path)], "--list", "--synthetic"),
             (["download", "--list", "--size", "64", "--root", str(tmp_path)], "--size"),
             (["aggregate", str(tmp_path), "--maps", "--out", str(tmp_path / "o"), "--wide", "--split", "val"],
              "--maps", "--split", "--wide"),
             (["aggregate", str(tmp_path), "--method", "gradcam"], "without --maps", "--method")]
    for args, *needles in cases:
        one_line_error(runner.invoke(app, args), 2, *needles)
    listed = runner.invoke(app, ["download", "--list", "--root", str(tmp_path)], env={"MEDCLI_MIRROR": "http://x"})
    assert listed.exit_code == 0, listed.output  # a mirror set in the environment is not an option given


def test_no_compile_with_a_compile_mode_is_a_contradiction_not_a_compiled_run(tmp_path):
    """Review: `--no-compile --compile-mode reduce-overhead` compiled silently."""
    result = runner.invoke(app, ["train", "--no-compile", "--compile-mode", "reduce-overhead", "--runs-dir", str(tmp_path)])
    one_line_error(result, 2, "--compile-mode reduce-overhead", "--no-compile")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, said", [
    (["download", "bloodmnist", "--synthetic", "--root", ""], "--root is empty"),
    (["download", "bloodmnist", "--synthetic", "--root="], "--root is empty"),
    (["evaluate", "--tta", ""], "an argument is empty"),
    (["aggregate", ""], "an argument is empty")])
def test_an_empty_word_on_the_command_line_is_refused(args, said, tmp_path, monkeypatch):
    """Review: `--root "$DATA"` with DATA unset wrote the data into the current folder (Path("")
    is "."); no medcli option or argument takes an empty value."""
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and said + " (an unset shell variable?)" in result.stderr, result.output
    assert list(tmp_path.iterdir()) == []


def test_help_texts_name_each_kind_of_model_or_each_family(monkeypatch):
    """The defaults in train's help come from the family records: said per kind of model while
    the records of a kind agree, per family where they do not, once when all agree."""
    import dataclasses

    from medcli import config, models

    assert config._by_kind(lambda rec: rec.defaults["optimizer"]) == "sgd for CNNs, adamw for ViTs"
    assert config._by_kind(lambda rec: rec.defaults["label_smoothing"]) == "0.1"
    families = dict(models.FAMILIES)
    families["densenet121"] = dataclasses.replace(families["densenet121"],
                                                  defaults={**families["densenet121"].defaults, "optimizer": "adamw"})
    monkeypatch.setattr(models, "FAMILIES", families)
    assert (config._by_kind(lambda rec: rec.defaults["optimizer"])
            == "resnet18, other timm models: sgd; densenet121, vit, vit-small, vit-tiny and timm ViTs: adamw")
