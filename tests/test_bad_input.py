"""The bad-input matrix: every subcommand, every kind of bad input.

Each case must end with a non-zero exit code, exactly one line on stderr that names the
problem, no traceback, and nothing half-written (no temporary files left, earlier files
unchanged).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medcli.cli import app

from cli_helpers import one_line_error

runner = CliRunner()

# Commands that take a run directory, with the arguments that make them otherwise valid.
RUN_COMMANDS = {
    "evaluate": lambda run: ["evaluate", str(run)],
    "explain": lambda run: ["explain", str(run), "--method", "gradcam", "--per-class", "1"],
    "plot-confusion": lambda run: ["plot-confusion", str(run)],
    "report": lambda run: ["report", str(run)],
    "train --resume": lambda run: ["train", "--resume", str(run)],
}
# Commands that load a checkpoint, and which one.
CHECKPOINT_COMMANDS = {
    "evaluate": ("best.pt", lambda run: ["evaluate", str(run)]),
    "explain": ("best.pt", lambda run: ["explain", str(run), "--method", "gradcam", "--per-class", "1"]),
    "train --resume": ("last.pt", lambda run: ["train", "--resume", str(run)]),
}


def no_temp_files(root: Path) -> None:
    leftovers = [p for p in root.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    assert not leftovers, leftovers


@pytest.fixture
def run(tiny_run, tmp_path) -> Path:
    """A private, writable copy of the tiny trained run (plus an evaluation, so that
    plot-confusion has predictions to read)."""
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    return copy


# -- run directories ---------------------------------------------------------------------


def _missing(run: Path) -> Path:
    return run.parent / "no-such-run"


def _no_manifest(run: Path) -> Path:
    (run / "manifest.json").unlink()
    return run


def _invalid_json(run: Path) -> Path:
    (run / "manifest.json").write_text('{"schema_version": 1, "config": ')
    return run


def _future_schema(run: Path) -> Path:
    data = json.loads((run / "manifest.json").read_text())
    data["schema_version"] = 999
    (run / "manifest.json").write_text(json.dumps(data))
    return run


def _edited(change):
    """A manifest edited by hand (review: wrong types were "unexpected AttributeError", exit 1,
    and a missing preprocess failed inside the evaluate stage, marking it failed)."""
    def make(run: Path) -> Path:
        data = json.loads((run / "manifest.json").read_text())
        change(data)
        (run / "manifest.json").write_text(json.dumps(data))
        return run
    return make


RUN_PROBLEMS = {
    "missing": (_missing, "does not exist"),
    "no manifest": (_no_manifest, "no manifest.json"),
    "invalid JSON": (_invalid_json, "not valid JSON"),
    "future schema": (_future_schema, "newer than this medcli"),
    "config null": (_edited(lambda data: data.update(config=None)), "malformed config"),
    "environment a string": (_edited(lambda data: data.update(environment="x")), "malformed environment"),
    "train summary null": (_edited(lambda data: data["stages"]["train"].update(summary=None)), "malformed 'train' stage"),
}


@pytest.mark.parametrize("problem", RUN_PROBLEMS)
@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_bad_run_directory(run, command, problem):
    make, message = RUN_PROBLEMS[problem]
    target = make(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    line = one_line_error(runner.invoke(app, RUN_COMMANDS[command](target)), 2)
    assert message in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written


@pytest.mark.parametrize("command", ["evaluate", "explain"])
def test_a_manifest_without_the_preprocessing_is_refused_before_the_stage(run, command):
    _edited(lambda data: data.pop("preprocess"))(run)
    assert "has no preprocess" in one_line_error(runner.invoke(app, RUN_COMMANDS[command](run)), 2)
    assert command not in json.loads((run / "manifest.json").read_text())["stages"]  # no stage marked failed


# -- checkpoints -------------------------------------------------------------------------


def _checkpoint_missing(path: Path) -> None:
    path.unlink()


def _checkpoint_truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _checkpoint_other_architecture(path: Path) -> None:
    import torch

    from medcli import models

    other, _ = models.create("resnet18", num_classes=8, in_chans=3, input_size=28)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"] = other.state_dict()  # everything else stays as the run wrote it
    torch.save(checkpoint, path)


def _checkpoint_of_another_run(path: Path) -> None:
    """A valid checkpoint of the same architecture that another run wrote (the same weights,
    one changed a little: what evaluate used to report under this run's name)."""
    import torch

    checkpoint = torch.load(path, weights_only=True)
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    first = next(key for key, value in state.items() if value.is_floating_point())
    state[first] = state[first] + 0.01
    torch.save(checkpoint, path)


NOT_ITS_OWN = "not the file this run wrote"
CHECKPOINT_PROBLEMS = {
    "missing": (_checkpoint_missing, ("no checkpoints", "does not exist", "missing", "not found")),
    "truncated": (_checkpoint_truncated, ("damaged", "truncated", "cannot be read", "not a", NOT_ITS_OWN)),
    "other architecture": (_checkpoint_other_architecture, ("does not fit", "architecture", "mismatch", NOT_ITS_OWN)),
}


@pytest.mark.parametrize("command", ["evaluate", "explain"])
def test_a_checkpoint_another_run_wrote_is_refused(run, command):
    """The manifest records each checkpoint's sha256: a command reading best.pt notices that it
    is not the file this run wrote, instead of reporting another model's numbers as this run's."""
    name, args = CHECKPOINT_COMMANDS[command]
    _checkpoint_of_another_run(run / "checkpoints" / name)
    assert NOT_ITS_OWN in one_line_error(runner.invoke(app, args(run)), 2)


@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_a_damaged_model_spec_is_said_to_be_the_manifests(run, command):
    """Review: `"num_classes": "eight"` in manifest.json was reported as "model timm:test_resnet
    does not accept that option (...); drop it or pick another model", an option nobody gave."""
    _, args = CHECKPOINT_COMMANDS[command]
    data = json.loads((run / "manifest.json").read_text())
    data["model"]["num_classes"] = "eight"
    if command == "train --resume":
        data["stages"]["train"]["status"] = "interrupted"
    (run / "manifest.json").write_text(json.dumps(data))
    line = one_line_error(runner.invoke(app, args(run)), 2)
    assert "has malformed model.num_classes ('eight'): the manifest is damaged" in line, line


@pytest.mark.parametrize("problem", CHECKPOINT_PROBLEMS)
@pytest.mark.parametrize("command", CHECKPOINT_COMMANDS)
def test_bad_checkpoint(run, command, problem):
    name, args = CHECKPOINT_COMMANDS[command]
    damage, messages = CHECKPOINT_PROBLEMS[problem]
    if command == "train --resume":  # only an unfinished run can be resumed
        data = json.loads((run / "manifest.json").read_text())
        data["stages"]["train"]["status"] = "interrupted"
        (run / "manifest.json").write_text(json.dumps(data))
    damage(run / "checkpoints" / name)
    line = one_line_error(runner.invoke(app, args(run)), 2)
    assert any(m in line for m in messages), line
    no_temp_files(run)


# -- datasets ----------------------------------------------------------------------------


def test_truncated_dataset_file(synthetic_root, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    data = (synthetic_root / "bloodmnist.npz").read_bytes()
    (root / "bloodmnist.npz").write_bytes(data[: len(data) // 2])
    runs = tmp_path / "runs"
    line = one_line_error(runner.invoke(app, ["train", "--root", str(root), "--runs-dir", str(runs),
                                                "--model", "timm:test_resnet", "--epochs", "1"]), 2)
    assert "bloodmnist.npz" in line
    assert not runs.exists() or not any(runs.iterdir())  # no half-made run directory
    imported = tmp_path / "imported"
    line = one_line_error(runner.invoke(app, ["download", "bloodmnist", "--root", str(imported),
                                                "--from", str(root / "bloodmnist.npz"), "--allow-unofficial"]), 2)
    assert not (imported / "bloodmnist.npz").exists()


# -- option values -----------------------------------------------------------------------

OPTION_CASES = {
    "epochs 0": (["train", "--epochs", "0"], "--epochs"),
    "size 27": (["train", "--size", "27"], "27"),
    "unknown model": (["train", "--model", "alexnet-9000"], "alexnet-9000"),
    "unknown dataset": (["train", "--dataset", "nosuchmnist"], "nosuchmnist"),
    "rotate 200": (["train", "--rotate", "200"], "--rotate"),
    "crop-scale 0": (["train", "--crop-scale", "0"], "--crop-scale"),
    # review: these passed the checks and failed in the first step, leaving a failed run directory
    "batch-size 1": (["train", "--batch-size", "1"], "--batch-size"),
    "one image per process": (["train", "--nproc", "2", "--batch-size", "2"], "--batch-size 4 or more, or train in one process"),
    "lr inf": (["train", "--lr", "inf"], "--lr must be positive and finite"),
    # review: nan and 0 got Typer's "greater than or equal to 0" ([x>=0.0] in --help), 0 rejected later
    "lr nan": (["train", "--lr", "nan"], "--lr must be positive and finite (got nan)"),
    "lr 0": (["train", "--lr", "0"], "--lr must be positive and finite (got 0.0)"),
    # review: 2^64 - 1 ended in "unexpected ValueError: Overflow" with a failed run left behind
    "seed 2^64-1": (["train", "--seed", str(2**64 - 1)], "--seed"),
    "seed 2^70": (["train", "--seed", str(2**70)], "--seed"),
    "explain seed 2^64": (["explain", "RUN", "--seed", str(2**64)], "--seed"),
    "weight-decay inf": (["train", "--weight-decay", "inf"], "--weight-decay must be >= 0 and finite"),
    "unknown method": (["explain", "RUN", "--method", "magic"], "magic"),
    "download size 27": (["download", "bloodmnist", "--size", "27"], "27"),
    "download unknown dataset": (["download", "nosuchmnist"], "nosuchmnist"),
    "evaluate unknown split": (["evaluate", "RUN", "--split", "holdout"], "holdout"),
    "aggregate unknown format": (["aggregate", "RUN", "--format", "pdf"], "pdf"),
    "clean-processes bad duration": (["clean-processes", "--older-than", "soon"], "soon"),
    # review: a typo got the list of twelve flags and no suggestion; Typer's choice error began
    # "Value error,"; a missing path gave "no evaluated runs to compare among 0 found"
    "dataset typo": (["download", "bloodmnst"], "'bloodmnst' is not a MedMNIST 2D dataset; did you mean bloodmnist?"),
    "split typo": (["evaluate", "RUN", "--split", "tset"], "Invalid value for '--split': 'tset' is not one of"),
    "aggregate missing path": (["aggregate", "no/such/runs"], "no runs to compare: no/such/runs does not exist"),
}


@pytest.mark.parametrize("case", OPTION_CASES)
def test_option_values_out_of_range(case, run, synthetic_root, tmp_path):
    args, needle = OPTION_CASES[case]
    args = [str(run) if a == "RUN" else a for a in args]
    if args[0] == "train":
        args += ["--root", str(synthetic_root), "--runs-dir", str(tmp_path / "runs")]
    line = one_line_error(runner.invoke(app, args), 2)
    assert needle in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


# -- outputs that can't be written -------------------------------------------------------


def test_unwritable_outputs(run, synthetic_root, tmp_path):
    assert runner.invoke(app, ["evaluate", str(run)]).exit_code == 0
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cases = [
        ["train", "--root", str(synthetic_root), "--runs-dir", str(blocker / "runs"), "--model", "timm:test_resnet",
         "--epochs", "1"],
        ["download", "bloodmnist", "--synthetic", "--root", str(blocker / "data")],
        ["aggregate", str(run), "--out", str(blocker / "out"), "--format", "csv"],
    ]
    for args in cases:
        line = one_line_error(runner.invoke(app, args))
        assert str(blocker) in line, line
    assert blocker.read_text() == "not a directory"


def test_a_write_that_fails_halfway_keeps_the_previous_file(run, monkeypatch):
    first = runner.invoke(app, ["evaluate", str(run)])
    assert first.exit_code == 0, first.output
    metrics = run / "metrics" / "test.json"
    before = metrics.read_bytes()
    manifest_before = json.loads((run / "manifest.json").read_text())

    import os

    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith("test.json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    line = one_line_error(runner.invoke(app, ["evaluate", str(run), "--tta"]), 1)
    assert "No space left on device" in line and "unchanged" in line
    monkeypatch.undo()
    assert metrics.read_bytes() == before
    no_temp_files(run)
    after = json.loads((run / "manifest.json").read_text())
    assert after["stages"]["evaluate"]["status"] == "failed"
    assert after["stages"]["train"] == manifest_before["stages"]["train"]


def test_plot_confusion_of_an_unevaluated_split_names_the_evaluate_command(run):
    """Review #24: the error named 'medcli evaluate' without the split the user asked for."""
    one_line_error(runner.invoke(app, ["plot-confusion", str(run), "--split", "val"]), 2,
                   "predictions/val.csv", f"'medcli evaluate {run} --split val'")
    assert not (run / "figures" / "confusion_val.png").exists()


def test_a_folder_where_a_file_goes_is_named_a_folder(tmp_path):
    """Review: `aggregate --out` over a folder named comparison.png said "any previous version
    is unchanged: free some space", which fits a full disk, not a folder in the way."""
    from medcli import fileio
    from medcli.errors import MedcliError

    (tmp_path / "x.json").mkdir()
    with pytest.raises(MedcliError, match="a folder stands there: move it away or choose another location"):
        fileio.write_json(tmp_path / "x.json", {"a": 1})
