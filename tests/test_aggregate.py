"""aggregate over hand-made run directories: seed groups (mean ± std), leaders, runs left out
with their reasons (never dropped), the written files, and no torch import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medcli import fileio
from medcli.aggregate import aggregate
from medcli.cli import app

from cli_helpers import heavy_imports
from medcli.run import Run

runner = CliRunner()


def make_run(parent: Path, name: str, *, model: str = "resnet18", seed: int = 0, accuracy: float | None = 0.9,
             train_status: str = "completed", asked_pretrained: bool = False, loaded_pretrained: bool = False,
             **config) -> Path:
    """A run directory as train + evaluate leave it (no checkpoints: aggregate reads files only)."""
    created = Run.create(
        parent, name, config={"dataset": "bloodmnist", "size": 28, "model": model, "epochs": 3, "lr": 0.1, "seed": seed,
                     "device": "cpu", "runs_dir": str(parent), "pretrained": asked_pretrained, **config},
        dataset={"flag": "bloodmnist", "size": 28, "md5": "abc"}, model={"name": model, "pretrained": loaded_pretrained},
    )
    created.update(lambda data: data["stages"].__setitem__("train", {
        "status": train_status, "duration_s": 12.0, "artefacts": {}, "summary": {"epochs_run": 3, "train_seconds": 10.0 + seed}}))
    run = created.run_dir
    if accuracy is not None:
        values = {"n": 100, "accuracy": accuracy, "balanced_accuracy": accuracy - 0.05, "f1_macro": accuracy - 0.1,
                  "auc": 0.95, "ece": 0.05, "nll": 0.4}
        fileio.write_json(run / "metrics" / "test.json", {"split": "test", "checkpoint": "best", "calibration": None,
                                                          "tta": {"enabled": False, "views": ["identity"]},
                                                          "metrics": values})
    return run


@pytest.fixture
def runs_root(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, accuracy in enumerate([0.80, 0.90, 1.00]):
        make_run(root / "sweep", f"r18-seed{seed}", seed=seed, accuracy=accuracy)  # nested: found recursively
    make_run(root, "vit-seed0", model="vit-tiny", accuracy=0.95)
    make_run(root, "interrupted", train_status="interrupted")
    make_run(root, "not-evaluated", accuracy=None)
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text("{ not json")
    return root


def test_seed_groups_leaders_and_runs_left_out_with_reasons(runs_root):
    result = aggregate([runs_root], metric_names=["accuracy", "ece"])
    assert len(result.runs) == 4
    r18 = next(g for g in result.groups if g["model"] == "resnet18")
    vit = next(g for g in result.groups if g["model"] == "vit-tiny")
    assert r18["n_runs"] == 3 and r18["seeds"] == "0, 1, 2"
    assert r18["accuracy"] == pytest.approx(0.9) and r18["accuracy_std"] == pytest.approx(0.1)  # sample std
    assert vit["accuracy_std"] is None  # one run: no spread to report
    assert result.groups[0] is vit  # best first by the first metric
    assert result.leaders["accuracy"] == [vit["group"]]
    assert sorted(result.leaders["ece"]) == sorted([vit["group"], r18["group"]])  # a tie marks both

    reasons = {Path(s["run"]).name: s["reason"] for s in result.skipped}
    assert set(reasons) == {"broken", "interrupted", "not-evaluated"}
    assert "not valid JSON" in reasons["broken"]
    assert reasons["interrupted"].startswith("unfinished: train interrupted")
    assert reasons["not-evaluated"].startswith("not evaluated on test") and "medcli evaluate" in reasons["not-evaluated"]


def test_seeds_group_by_the_weights_they_really_started_from(tmp_path):
    """Review defect 4: a --pretrained run whose download failed trained from scratch; it
    belongs with the from-scratch runs, not with the runs that loaded the weights."""
    root = tmp_path / "runs"
    make_run(root, "scratch", seed=0, accuracy=0.80)
    make_run(root, "fallback", seed=1, accuracy=0.82, asked_pretrained=True)
    make_run(root, "loaded-0", seed=0, accuracy=0.95, asked_pretrained=True, loaded_pretrained=True)
    make_run(root, "loaded-1", seed=1, accuracy=0.97, asked_pretrained=True, loaded_pretrained=True)
    groups = {g["pretrained"]: g for g in aggregate([root], metric_names=["accuracy"]).groups}
    assert groups[False]["n_runs"] == 2 and groups[False]["accuracy"] == pytest.approx(0.81)
    assert groups[True]["n_runs"] == 2 and groups[True]["accuracy"] == pytest.approx(0.96)


def test_runs_differing_only_in_where_and_how_fast_they_ran_are_repeats(tmp_path):
    """--data-budget only decides where the split lives (same weights), like --device or --amp."""
    root = tmp_path / "runs"
    make_run(root, "resident", seed=0, accuracy=0.80, data_budget_gb=None)
    make_run(root, "streamed", seed=1, accuracy=0.82, data_budget_gb=0.0, device="cuda", amp="bf16")
    make_run(root, "other-lr", seed=0, accuracy=0.70, lr=0.01)
    groups = sorted(g["n_runs"] for g in aggregate([root], metric_names=["accuracy"]).groups)
    assert groups == [1, 2]


def test_tta_with_only_the_identity_view_is_a_plain_evaluation(tmp_path):
    """A run trained without flips (e.g. an oriented dataset) has nothing to add at test time:
    `--tta` gives the plain numbers and must not make another experiment."""
    root = tmp_path / "runs"
    runs = [make_run(root, f"seed{seed}", seed=seed, accuracy=0.8 + seed / 100) for seed in range(3)]
    for run, views in zip(runs[1:], (["identity"], ["identity", "hflip"])):
        metrics_file = run / "metrics" / "test.json"
        evaluation = json.loads(metrics_file.read_text())
        fileio.write_json(metrics_file, {**evaluation, "tta": {"enabled": True, "views": views}})
    groups = {g["evaluation"]: g["n_runs"] for g in aggregate([root], metric_names=["accuracy"]).groups}
    assert groups == {"best": 2, "best, tta": 1}


def test_cli_writes_every_format_and_marks_leaders(runs_root, tmp_path):
    from openpyxl import load_workbook

    out = tmp_path / "compare"
    result = runner.invoke(app, ["aggregate", str(runs_root), "--metrics", "accuracy,auc", "--out", str(out), "--format", "md"])
    assert result.exit_code == 0, result.output
    assert "★" in result.stdout and "## Not compared" in result.stdout and "90.00% ± 10.00" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.png",
                                                     "comparison.xlsx", "runs.csv"]
    book = load_workbook(out / "comparison.xlsx")
    assert book.sheetnames == ["comparison", "runs", "not compared"]
    sheet = book["comparison"]
    header = [c.value for c in sheet[1]]
    assert header[:2] == ["group", "dataset"] and "accuracy_std" in header and sheet.freeze_panes == "A2"
    first = {h: c.value for h, c in zip(header, sheet[2])}
    assert first["accuracy"] == pytest.approx(0.95) and first["leads"] == "accuracy, auc"
    assert book["not compared"].max_row == 1 + 3

    as_json = runner.invoke(app, ["aggregate", str(runs_root), "--format", "json"])
    assert as_json.exit_code == 0
    assert len(json.loads(as_json.stdout)["skipped"]) == 3


def test_a_metric_of_another_task_type_is_named_as_such(tmp_path):
    from medcli import aggregate

    run = make_run(tmp_path, "multiclass")
    binary = make_run(tmp_path, "binary")
    evaluation = json.loads((binary / "metrics" / "test.json").read_text())
    evaluation["task"], evaluation["metrics"]["sensitivity"] = "binary-class", 0.8
    fileio.write_json(binary / "metrics" / "test.json", evaluation)
    skipped = aggregate.aggregate([run, binary], metric_names=["accuracy", "sensitivity"]).skipped
    assert skipped == [{"run": str(run), "reason": "sensitivity does not apply to multi-class tasks; "
                                                   "leave it out of --metrics"}]


def test_bad_metric_and_nothing_to_compare_exit_2(runs_root, tmp_path):
    bad = runner.invoke(app, ["aggregate", str(runs_root), "--metrics", "accuracy,speed"])
    assert bad.exit_code == 2 and "unknown metric speed" in bad.stderr.strip().splitlines()[-1]
    empty = tmp_path / "empty"
    make_run(empty, "only", accuracy=None)
    nothing = runner.invoke(app, ["aggregate", str(empty)])
    assert nothing.exit_code == 2 and "no evaluated runs" in nothing.stderr.strip().splitlines()[-1]


def test_aggregate_does_not_import_torch(runs_root):
    assert "torch" not in heavy_imports(["aggregate", str(runs_root), "--format", "csv"])
