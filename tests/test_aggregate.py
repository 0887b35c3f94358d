"""aggregate over hand-made run directories: seed groups (mean ± std), leaders, runs left out
with their reasons (never dropped), copies that are not seeds, models named by what ran,
faithfulness of CNNs and ViTs side by side, provenance, a table that fits 80 columns, the
written files, and no torch import. (Paired tests and published numbers: test_compare_stats.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medcli import fileio
from medcli.aggregate import aggregate, display_rows, table_text
from medcli.cli import app

from cli_helpers import heavy_imports, one_line_error
from medcli.run import Run

runner = CliRunner()


def make_run(parent: Path, name: str, *, model: str = "resnet18", seed: int = 0, accuracy: float | None = 0.9,
             train_status: str = "completed", asked_pretrained: bool = False, loaded_pretrained: bool = False,
             spec: dict | None = None, dataset: dict | None = None, checkpoint_sha256: str | None = None,
             calibration: dict | None = None, **config) -> Path:
    """A run directory as train + evaluate leave it (no checkpoints: aggregate reads files only;
    `checkpoint_sha256` is what train recorded for checkpoints/best.pt)."""
    record = {"flag": "bloodmnist", "size": 28, "md5": "abc", "official": True, **(dataset or {})}
    created = Run.create(
        parent, name, config={"dataset": record["flag"], "size": record["size"], "model": model, "epochs": 3, "lr": 0.1,
                              "seed": seed, "device": "cpu", "runs_dir": str(parent), "pretrained": asked_pretrained,
                              **config},
        dataset=record,
        model={"name": model, "pretrained": loaded_pretrained, **(spec or {})},
    )
    artefacts = {"checkpoints/best.pt": checkpoint_sha256} if checkpoint_sha256 else {}
    created.update(lambda data: data["stages"].__setitem__("train", {
        "status": train_status, "duration_s": 12.0, "artefacts": artefacts,
        "summary": {"epochs_run": 3, "train_seconds": 10.0 + seed}}))
    run = created.run_dir
    if accuracy is not None:
        values = {"n": 100, "accuracy": accuracy, "balanced_accuracy": accuracy - 0.05, "f1_macro": accuracy - 0.1,
                  "precision_macro": accuracy - 0.12, "recall_macro": accuracy - 0.08, "auc": 0.95, "ece": 0.05,
                  "nll": 0.4, "brier": 0.1234}
        fileio.write_json(run / "metrics" / "test.json", {"split": "test", "checkpoint": "best", "calibration": calibration,
                                                          "tta": {"enabled": False, "views": ["identity"]},
                                                          "metrics": values})
        created.update(lambda data: data["stages"].__setitem__("evaluate", {
            "status": "completed", "artefacts": {}, "summary": {"test": {"accuracy": accuracy}}}))
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
    assert "★" in result.stdout and "## Not compared" in result.stdout and "90.00% ±10.00" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["comparison.csv", "comparison.md", "comparison.png",
                                                     "comparison.xlsx", "runs.csv"]
    book = load_workbook(out / "comparison.xlsx")
    assert book.sheetnames == ["comparison", "runs", "not compared", "paired tests"]  # two setups: a pair
    sheet = book["comparison"]
    header = [c.value for c in sheet[1]]
    assert header[:2] == ["group", "dataset"] and "accuracy_std" in header and sheet.freeze_panes == "A2"
    first = {h: c.value for h, c in zip(header, sheet[2])}
    assert first["accuracy"] == pytest.approx(0.95) and first["leads"] == "accuracy, auc"
    epochs = sheet.cell(2, header.index("epochs") + 1)
    assert epochs.number_format == "General"  # a whole number of epochs shows as "1", not "1."
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


def test_metrics_that_apply_to_no_run_are_the_error_named(tmp_path):
    """Review: with every run left out because --metrics asks what its task has not, the error
    said the runs were not evaluated (they were)."""
    from cli_helpers import one_line_error

    for seed in range(2):
        make_run(tmp_path, f"multiclass{seed}", seed=seed)
    shown = runner.invoke(app, ["aggregate", str(tmp_path), "--metrics", "accuracy,sensitivity,qwk"])
    line = one_line_error(shown, 2, "none of the 2 runs found has the metrics asked for",
                          "sensitivity, qwk do not apply to multi-class tasks", "leave them out of --metrics")
    assert "evaluate" not in line


def test_bad_metric_and_nothing_to_compare_exit_2(runs_root, tmp_path):
    bad = runner.invoke(app, ["aggregate", str(runs_root), "--metrics", "accuracy,speed"])
    assert bad.exit_code == 2 and "unknown metric speed" in bad.stderr.strip().splitlines()[-1]
    empty = tmp_path / "empty"
    make_run(empty, "only", accuracy=None)
    nothing = runner.invoke(app, ["aggregate", str(empty)])
    assert nothing.exit_code == 2 and "no evaluated runs" in nothing.stderr.strip().splitlines()[-1]


def test_aggregate_does_not_import_torch(runs_root):
    assert "torch" not in heavy_imports(["aggregate", str(runs_root), "--format", "csv"])


# -- review issue 24 ------------------------------------------------------------------------------
REDUCED_VIT = {"name": "vit-tiny", "family": "vit", "params": 1_234_567,
               "overrides": {"depth": 6, "embed_dim": 128, "num_heads": 4, "patch_size": 4}}
RESNET = {"name": "resnet18", "family": "cnn", "params": 11_173_962, "overrides": {"keep_maxpool": True}}


def explained(run: Path, method: str, score: float, split: str = "test") -> None:
    """Record a completed explain:<method> stage with its mean ROAD faithfulness."""
    Run.open(run).update(lambda data: data["stages"].__setitem__(f"explain:{method}", {
        "status": "completed", "artefacts": {}, "summary": {"method": method, "split": split,
                                                              "faithfulness": {"mean": score, "std": 0.01, "n": 8}}}))


def test_models_are_named_by_what_ran(tmp_path):
    """`--model vit --reduced` trains a 6-block, 128-wide ViT: it must not pass for ViT-Tiny."""
    make_run(tmp_path, "vit", model="vit-tiny", spec=REDUCED_VIT)
    make_run(tmp_path, "cnn", spec=RESNET)
    models = {g["model"] for g in aggregate([tmp_path], metric_names=["accuracy"]).groups}
    assert models == {"vit-tiny (6x128, 1.2M)", "resnet18 (11.2M)"}


def test_a_copied_run_is_not_another_seed(tmp_path, capsys):
    """A copied run directory or the same checkpoint under another id is one result: left out
    with the reason, not averaged in as a second seed with ± 0.00 and a star. Without a
    checkpoint hash, the same run id and seed make a copy."""
    import shutil

    original = make_run(tmp_path / "a", "r18-seed0", accuracy=0.8, checkpoint_sha256="f" * 64)
    shutil.copytree(original, tmp_path / "b" / "copied")
    make_run(tmp_path / "c", "renamed", accuracy=0.8, checkpoint_sha256="f" * 64)
    make_run(tmp_path / "c", "r18-seed1", seed=1, accuracy=0.9, checkpoint_sha256="e" * 64)
    unhashed = make_run(tmp_path / "d", "r18-seed2", seed=2, accuracy=0.7)
    shutil.copytree(unhashed, tmp_path / "e" / "copied-unhashed")
    result = aggregate([tmp_path], metric_names=["accuracy"])
    (group,) = result.groups
    assert group["n_runs"] == 3 and group["seeds"] == "0, 1, 2"
    reasons = {Path(s["run"]).name: s["reason"] for s in result.skipped}
    assert set(reasons) == {"copied", "renamed", "copied-unhashed"}
    assert "same checkpoint" in reasons["copied"] and "same checkpoint" in reasons["renamed"]
    assert "same run id and seed" in reasons["copied-unhashed"]
    assert "not another seed" in capsys.readouterr().err


@pytest.mark.parametrize("hashed", [True, False])
def test_seeds_started_in_the_same_second_are_seeds(tmp_path, hashed):
    """Review: the run id is the start time to the second + dataset + model, so seeds started
    together into different --runs-dir folders share it; they are two results, not a copy."""
    for seed in range(2):
        make_run(tmp_path / f"seed{seed}", "20261130-031500_bloodmnist28_resnet18", seed=seed, accuracy=0.8 + seed / 10,
                 checkpoint_sha256=str(seed) * 64 if hashed else None)
    result = aggregate([tmp_path], metric_names=["accuracy"])
    (group,) = result.groups
    assert result.skipped == [] and group["n_runs"] == 2 and group["seeds"] == "0, 1"
    assert group["accuracy"] == pytest.approx(0.85) and group["accuracy_std"] == pytest.approx(0.0707, abs=1e-4)


def test_experiment_is_an_object_in_json(runs_root):
    shown = runner.invoke(app, ["aggregate", str(runs_root), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    document = json.loads(shown.stdout)
    assert all(isinstance(r["experiment"], dict) for r in document["runs"])
    assert document["runs"][0]["experiment"]["lr"] == 0.1


def test_cnn_and_vit_faithfulness_in_one_table(tmp_path, capsys):
    """A CNN can never have rollout: its road_rollout is a blank cell, not a reason to drop it;
    `road` puts each run's own method (Grad-CAM for the CNN, rollout for the ViT) side by side."""
    cnn = make_run(tmp_path, "cnn", spec=RESNET, accuracy=0.9)
    vit = make_run(tmp_path, "vit", model="vit-tiny", spec=REDUCED_VIT, accuracy=0.85)
    explained(cnn, "gradcam", 0.21)
    explained(vit, "rollout", 0.34)
    result = aggregate([tmp_path], metric_names=["accuracy", "road_gradcam", "road_rollout", "road"])
    assert result.skipped == [] and len(result.groups) == 2
    by_model = {g["model"].split()[0]: g for g in result.groups}
    assert by_model["resnet18"]["road_rollout"] is None and by_model["resnet18"]["road_gradcam"] == 0.21
    assert by_model["vit-tiny"]["road_gradcam"] is None and by_model["vit-tiny"]["road_rollout"] == 0.34
    assert (by_model["resnet18"]["road"], by_model["resnet18"]["road_method"]) == (0.21, "gradcam")
    assert (by_model["vit-tiny"]["road"], by_model["vit-tiny"]["road_method"]) == (0.34, "rollout")
    warnings = capsys.readouterr().err
    assert "no road_gradcam" in warnings and "--method gradcam" in warnings  # the ViT could have Grad-CAM
    assert "no road_rollout" not in warnings  # the CNN never can
    text = table_text(result, width=100)
    assert "0.3400 (rollout)" in text and "0.2100 (gradcam)" in text


def test_a_method_whose_maps_were_all_constant_is_not_advised_again_nor_the_runs_own(tmp_path, capsys):
    """Self-review: every Grad-CAM map constant (a mean of None) made that method the run's
    `road`, blank, with advice to explain the run again, which gives the same maps."""
    cnn = make_run(tmp_path, "cnn", spec=RESNET, accuracy=0.9)
    explained(cnn, "gradcam", None)
    explained(cnn, "eigencam", 0.23)
    result = aggregate([tmp_path], metric_names=["accuracy", "road_gradcam", "road"])
    (group,) = result.groups
    assert group["road_gradcam"] is None and (group["road"], group["road_method"]) == (0.23, "eigencam")
    warnings = capsys.readouterr().err
    assert "every gradcam map is constant" in warnings and "explain it with" not in warnings


def test_an_undefined_auc_reads_n_a_and_a_metric_a_model_cannot_have_stays_blank(tmp_path):
    """Review: an AUC undefined on a split without both classes was a blank cell, the cell of a
    map method the model cannot have, where `evaluate` and the chart say n/a."""
    run = make_run(tmp_path, "cnn", spec=RESNET, accuracy=0.9)
    metrics_file = run / "metrics" / "test.json"
    document = json.loads(metrics_file.read_text())
    document["metrics"]["auc"] = None
    fileio.write_json(metrics_file, document)
    result = aggregate([tmp_path], metric_names=["accuracy", "auc", "road_rollout"], reference=True)
    _, header, rows = display_rows(result)
    cells = dict(zip(header, rows[0]))
    assert (cells["auc"], cells["road_rollout"]) == ("n/a", "")
    published = dict(zip(header, rows[-1]))  # the published row has no rollout score either
    assert "published" in published["setup"] and published["road_rollout"] == "" and published["auc"] != ""


def crowded(root: Path) -> Path:
    """Runs of the kind a CNN-vs-ViT study leaves: three seeds, a pretrained twin, a reduced ViT,
    synthetic data, and two runs left out with long paths in their reasons."""
    for seed in range(3):
        make_run(root / "sweeps" / "a-long-folder-name-for-the-sweep", f"20261130-031500_bloodmnist28_resnet18-{seed}",
                 seed=seed, accuracy=0.9 + seed / 100, spec=RESNET, dataset={"synthetic": True})
    make_run(root, "20261130-041500_bloodmnist28_resnet18", spec=RESNET, loaded_pretrained=True,
             asked_pretrained=True, dataset={"synthetic": True})
    make_run(root, "20261130-051500_bloodmnist28_vit-tiny", model="vit-tiny", spec=REDUCED_VIT,
             dataset={"synthetic": True})
    make_run(root, "20261130-061500_bloodmnist28_vit-tiny-interrupted", train_status="interrupted")
    make_run(root, "20261130-071500_bloodmnist28_vit-tiny-not-evaluated", accuracy=None)
    return root


@pytest.mark.parametrize("width", [80, 100])
def test_the_default_table_fits_the_terminal(tmp_path, width):
    """Review: lines of 206 characters and cells cut to `20261...`. Each line fits, nothing is
    cut off with an ellipsis, no line ends in spaces, and the setups are named by model and seeds."""
    result = aggregate([crowded(tmp_path)])
    text = table_text(result, width=width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width, "\n" + text
    assert all(line[-1] in "┓┃┩│┘" for line in lines if line[0] in "┏┃┡│└")  # no column cropped away
    assert "…" not in text and "..." not in text
    assert all(line == line.rstrip() for line in lines)
    assert "resnet18 (11.2M) s0-2" in text and "(SYNTHETIC)" in text
    assert "20261130-031500" not in text.split("not compared")[0]  # run ids only in --wide
    assert "20261130-031500_bloodmnist28_resnet18-0" in table_text(result, wide=True, width=240)  # --wide, piped
    assert "train time: in the training steps (not validation" in table_text(result, wide=True, width=240)  # review: undefined
    assert "train time:" not in text


def test_a_narrow_table_never_splits_a_number_or_a_heading(tmp_path):
    """Review: at 80 columns with many metrics, numbers folded mid-digit ("20." / "12%") and
    headings mid-word ("acc/ura/cy"). The table runs past the width instead."""
    from medcli.aggregate import display_rows, heading

    for seed in range(3):
        make_run(tmp_path / "cnn", f"cnn{seed}", seed=seed, accuracy=0.9 + seed / 100, spec=RESNET)
        make_run(tmp_path / "vit", f"vit{seed}", seed=seed, accuracy=0.8 + seed / 100, model="vit-tiny",
                 spec=REDUCED_VIT)
    metrics = ["accuracy", "balanced_accuracy", "f1_macro", "precision_macro", "recall_macro", "auc", "ece", "nll",
               "brier"]
    result = aggregate([tmp_path], metric_names=metrics)
    tokens = {word for line in table_text(result, width=80).splitlines() for cell in line.split("│")
              for word in cell.replace("┃", " ").split()}
    rows = display_rows(result, gap="\n")[2]
    numbers = {word for row in rows for cell in row[-len(metrics):] for word in cell.split() if word != "★"}
    assert numbers - tokens == set()
    assert {word for m in metrics for word in heading(m).split()} - tokens == set()


@pytest.mark.parametrize("data, marker", [({"synthetic": True}, "SYNTHETIC"), ({"sample": True}, "SAMPLE"),
                                          ({"official": False}, "UNOFFICIAL"), ({}, None)])
def test_data_that_is_not_the_official_file_says_so(tmp_path, data, marker):
    make_run(tmp_path, "run", dataset=data)
    text = table_text(aggregate([tmp_path], metric_names=["accuracy"]), width=100)
    assert (f"({marker})" in text) if marker else not any(m in text for m in ("SYNTHETIC", "SAMPLE", "UNOFFICIAL"))


def test_out_prints_the_files_it_wrote(runs_root, tmp_path):
    out = tmp_path / "compare"
    shown = runner.invoke(app, ["aggregate", str(runs_root), "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    written = sorted(str(p) for p in out.iterdir())
    assert sorted(shown.stdout.strip().splitlines()[-5:]) == written
    as_json = runner.invoke(app, ["aggregate", str(runs_root), "--out", str(out), "--format", "json"])
    assert sorted(json.loads(as_json.stdout)["files"]) == written
    as_csv = runner.invoke(app, ["aggregate", str(runs_root), "--out", str(out), "--format", "csv"])
    assert str(out) not in as_csv.stdout  # a CSV on stdout stays a CSV


def test_chart_is_labelled_by_model_and_seed(tmp_path):
    from medcli.aggregate import write_chart

    make_run(tmp_path, "cnn", spec=RESNET, accuracy=0.0)  # a zero bar
    make_run(tmp_path, "vit", model="vit-tiny", spec=REDUCED_VIT, accuracy=0.9)
    result = aggregate([tmp_path], metric_names=["accuracy", "auc", "ece"])
    path = write_chart(tmp_path / "chart.png", result)
    assert path.stat().st_size > 10_000
    assert {g["group"] for g in result.groups} == {"resnet18 (11.2M) s0", "vit-tiny (6x128, 1.2M) s0"}


def test_setups_on_other_data_are_labelled_by_their_data(tmp_path):
    """Review: same-named setups on different datasets were told apart by the first two settings
    in alphabetical order (augment, data_md5...), not by the dataset they ran on."""
    make_run(tmp_path, "blood", augment_source="bloodmnist: cells, any orientation")
    make_run(tmp_path, "chest", dataset={"flag": "chestmnist", "md5": "def"},
             augment_source="chestmnist: frontal X-rays, no flips")
    make_run(tmp_path, "chest-64", dataset={"flag": "chestmnist", "md5": "ghi", "size": 64},
             augment_source="chestmnist: frontal X-rays, no flips")
    make_run(tmp_path, "vit-chest", model="vit-tiny", dataset={"flag": "chestmnist", "md5": "def"})
    labels = {g["group"] for g in aggregate([tmp_path], metric_names=["accuracy"]).groups}
    assert labels == {"resnet18 s0 on bloodmnist 28 px", "resnet18 s0 on chestmnist 28 px",
                      "resnet18 s0 on chestmnist 64 px", "vit-tiny s0 on chestmnist 28 px"}  # each says its data


def test_labels_keep_short_values_whole_and_pair_takes_what_the_table_shows(tmp_path):
    """Review: values cut to 8 characters ("lr_source=reduced " with its space, which the table
    does not show, so --pair refused the label it printed) and Rich ate "[...]" as markup."""
    make_run(tmp_path, "preset", lr=0.1)
    make_run(tmp_path, "given", lr=0.0125)
    make_run(tmp_path, "long", model="vit-tiny", augment={"flips": ["hflip", "vflip"], "rotate": 90})
    make_run(tmp_path, "short", model="vit-tiny", augment={"flips": ["hflip"]})
    result = aggregate([tmp_path], metric_names=["accuracy"])
    labels = {g["group"] for g in result.groups}
    # review: a dict cut after 24 characters ("select={'rule': 'ema-window'…") hid what differed
    assert labels == {"resnet18 s0 lr=0.1", "resnet18 s0 lr=0.0125",
                      "vit-tiny s0 augment.flips=hflip+vflip, augment.rotate=90",
                      "vit-tiny s0 augment.flips=hflip, augment.rotate=None"}
    shown = [line.split("│")[1].strip() for line in table_text(result, width=240).splitlines()
             if line.startswith("│")]
    assert sorted(shown) == sorted(labels)
    for pair in (shown[:2], shown[2:]):
        paired = runner.invoke(app, ["aggregate", str(tmp_path), "--metrics", "accuracy", "--pair", *pair,
                                     "--format", "json"])
        assert paired.exit_code == 0, paired.output
        assert [json.loads(paired.stdout)["paired"][k] for k in "ab"] == pair


@pytest.mark.parametrize("setups", [1, 4, 7])
def test_chart_legend_and_metric_names_are_whole_apart_and_print_at_size(tmp_path, setups):
    """Review: long setup labels pushed the legend past both edges of comparison.png, and the
    metric names ran into each other ("accuracbalanced accuracf1 macro") even with one setup.
    Review: the chart grew 0.45 in wider per setup (16.5 in for 6 setups and 5 metrics), so a
    page printed its 9-pt values at 4 pt: it is a page wide and grows taller instead."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from medcli import reports
    from medcli.aggregate import chart_figure

    retina, chest = {"flag": "retinamnist", "synthetic": True}, {"flag": "chestmnist", "size": 64}
    preset, given = {"flips": ["hflip", "vflip"], "rotate": 90, "crop_scale": 0.8}, {"flips": []}
    kinds = [("resnet18", retina, preset), ("resnet18", retina, given), ("resnet18", chest, preset),
             ("vit-tiny", retina, preset)]
    for i in range(setups):
        model, data, augment = kinds[i % 4]
        make_run(tmp_path, f"r{i}", model=model, augment=augment, dataset=data, lr=0.1 + i // 4,
                 spec=RESNET if model == "resnet18" else REDUCED_VIT)
    metrics = ["accuracy", "balanced_accuracy", "f1_macro", "auc", "ece"]
    fig = chart_figure(aggregate([tmp_path], metric_names=metrics))
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [" ".join(ax.get_title().split()) for ax in panels] == ["accuracy", "balanced accuracy", "f1 macro", "auc",
                                                                  "ece ↓"]
    (legend,) = fig.legends
    assert len(legend.get_texts()) == setups
    keys = {t.get_text(): t.get_position()[1] for t in panels[0].get_yticklabels()}
    assert sorted(keys, key=keys.get, reverse=True) == list("ABCDEFG"[:setups])  # A on top
    titles = [ax.title.get_window_extent(renderer) for ax in panels]
    for box in [legend.get_window_extent(renderer), fig._suptitle.get_window_extent(renderer), *titles]:
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1 and fig.bbox.y0 <= box.y0 and box.y1 <= fig.bbox.y1
    frames = [ax.get_window_extent(renderer) for ax in panels]
    for i, frame in enumerate(frames):  # panels apart, each title clear of the other panels
        assert not any(frame.overlaps(other) or titles[i].overlaps(other) for other in frames[:i] + frames[i + 1:])
    assert not any(legend.get_window_extent(renderer).overlaps(box) for box in frames + titles)
    assert fig.get_figwidth() == pytest.approx(reports.PRINT_WIDTH_IN)
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert min(sizes) >= reports.MIN_PRINT_PT


def test_faithfulness_does_not_import_torch(tmp_path):
    """Whether a method applies is read from the spec: a ViT's family without importing timm."""
    explained(make_run(tmp_path, "vit", model="vit-tiny", spec=REDUCED_VIT), "rollout", 0.3)
    explained(make_run(tmp_path, "cnn", spec=RESNET), "gradcam", 0.2)
    assert "torch" not in heavy_imports(["aggregate", str(tmp_path), "--metrics", "accuracy,road,road_rollout",
                                         "--format", "csv"])


def test_a_skipped_calibration_is_not_called_calibrated(tmp_path):
    """A validation split that could not fix a temperature (perfectly separated) kept T = 1:
    the run is grouped and labelled as uncalibrated, not as a calibrated result."""
    fitted = {"temperature": 1.3, "skipped": None}
    skipped = {"temperature": 1.0, "skipped": "validation split perfectly separated"}
    make_run(tmp_path, "fitted", calibration=fitted)
    make_run(tmp_path, "skipped", calibration=skipped, seed=1)
    runs = {row["run"].split("_")[-1]: row for row in aggregate([tmp_path]).runs}
    assert "calibrated" in runs["fitted"]["evaluation"] and "calibrated" not in runs["skipped"]["evaluation"]


def test_a_multi_label_calibration_skipped_for_some_labels_is_calibrated(tmp_path):
    """evaluate scales every label it could fit and keeps T = 1 for the rest, naming them in
    `skipped`: the other labels were scaled, so the evaluation is calibrated; with T = 1 for
    every label nothing was."""
    partly = {"temperature": [1.4, 1.0], "skipped": "no positives in the validation split: hernia"}
    wholly = {"temperature": [1.0, 1.0], "skipped": "no positives in the validation split: effusion, hernia"}
    make_run(tmp_path, "partly", calibration=partly)
    make_run(tmp_path, "wholly", calibration=wholly, seed=1)
    runs = {row["run"]: row["evaluation"] for row in aggregate([tmp_path]).runs}
    assert runs == {"partly": "best, calibrated", "wholly": "best"}


def test_best_is_only_among_setups_on_the_same_data(tmp_path):
    """Review: a synthetic retinamnist run was starred over chestmnist and bloodmnist runs, and
    a lone setup got a star on every metric. Setups compete only on the same data (dataset,
    size, provenance); a dataset with one setup has no best."""
    make_run(tmp_path, "blood-cnn", accuracy=0.80)
    make_run(tmp_path, "blood-vit", model="vit-tiny", accuracy=0.85)
    make_run(tmp_path, "blood-64", model="vit-tiny", accuracy=0.95, dataset={"size": 64})
    make_run(tmp_path, "retina", accuracy=0.99, dataset={"flag": "retinamnist", "synthetic": True})
    result = aggregate([tmp_path], metric_names=["accuracy", "ece"])
    vit = next(g for g in result.groups if g["model"] == "vit-tiny" and g["size"] == 28)
    assert result.leaders["accuracy"] == [vit["group"]]
    assert len(result.leaders["ece"]) == 2  # the tie of the two bloodmnist 28 px setups
    assert "★ = best mean on its data (not a test)" in table_text(result, width=120)

    (tmp_path / "one").mkdir()
    make_run(tmp_path / "one", "alone")
    alone = aggregate([tmp_path / "one"], metric_names=["accuracy", "ece"])
    assert alone.leaders == {} and "★" not in table_text(alone, width=120)


def test_where_a_value_came_from_does_not_split_a_setup(tmp_path):
    """Review: `warmup_source`, new in the configs of later runs, put them in another group than
    the same setup trained before it was recorded; and a value given with --lr equal to the
    preset's is the same experiment. `*_source` keys say where a value came from, not what ran."""
    make_run(tmp_path, "old", seed=0, warmup_epochs=0.3)
    make_run(tmp_path, "new", seed=1, warmup_epochs=0.3, warmup_source="recipe")
    make_run(tmp_path, "given", seed=2, warmup_epochs=0.3, warmup_source="--warmup-epochs", lr_source="--lr")
    make_run(tmp_path, "other", seed=0, warmup_epochs=0.5, warmup_source="recipe")
    groups = aggregate([tmp_path], metric_names=["accuracy"]).groups
    # review: the setups' other seeds do not tell them apart; the setting they differ in does
    assert sorted((g["group"], g["n_runs"]) for g in groups) == [
        ("resnet18 s0 warmup_epochs=0.5", 1), ("resnet18 s0-2 warmup_epochs=0.3", 3)]


def test_a_second_comparison_into_the_same_folder_says_it_replaces_the_first(tmp_path):
    """Review: `aggregate --out DIR` replaced an earlier comparison's files without a word."""
    make_run(tmp_path / "runs", "a")
    args = ["aggregate", str(tmp_path / "runs"), "--out", str(tmp_path / "cmp")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0 and "replacing" not in first.stderr
    again = runner.invoke(app, args)
    assert again.exit_code == 0
    assert f"replacing the earlier comparison.csv, runs.csv, comparison.xlsx, comparison.md, comparison.png in " \
           f"{tmp_path / 'cmp'}" in " ".join(again.stderr.split())


def test_a_run_that_recorded_its_warm_up_uncapped_is_a_repeat_of_one_that_records_the_cap(tmp_path):
    """Review: before warm-ups over 20 % of the run were recorded as capped, a run recorded the
    value asked for (the schedule capped it all the same): 0.5 epochs of a 1-epoch run then,
    0.2 now, the same schedule, two setups."""
    make_run(tmp_path, "before", seed=0, epochs=1, warmup_epochs=0.5)
    make_run(tmp_path, "after", seed=1, epochs=1, warmup_epochs=0.2, warmup_source="--warmup-epochs 0.5 -> 0.2")
    make_run(tmp_path, "other", seed=0, epochs=1, warmup_epochs=0.1)
    groups = aggregate([tmp_path], metric_names=["accuracy"]).groups
    assert sorted(g["n_runs"] for g in groups) == [1, 2]


def test_markdown_shows_names_as_written(tmp_path):
    """Review: comparison.md escaped only "|": a run name with <img ...>, *stars* or [brackets]
    became a tag, emphasis or a link wherever the Markdown was rendered."""
    from markdown_it import MarkdownIt

    from medcli.aggregate import aggregate, to_markdown

    name = "r <b>*bold*<b> & [link](x) _u_ `c` | #"
    make_run(tmp_path, name)
    result = aggregate([tmp_path / name, tmp_path / name / "gone"])
    rendered = MarkdownIt("commonmark").enable("table").render(to_markdown(result, wide=True))
    assert not re.search(r"<(b|em|a|code)\b", rendered)
    assert rendered.count("r &lt;b&gt;*bold*&lt;b&gt; &amp; [link](x) _u_ `c` | #") == 2, rendered  # run ids, the missing run


def test_the_chart_says_which_numbers_are_calibrated(tmp_path):
    """Review: the table had an evaluation column ("best" vs "best, calibrated") but the chart's
    legend and title did not, so calibrated and uncalibrated ECE bars looked alike."""
    from medcli.aggregate import chart_figure

    make_run(tmp_path, "plain", seed=0)
    make_run(tmp_path, "calibrated", seed=1, calibration={"temperature": 1.2})
    fig = chart_figure(aggregate([tmp_path], metric_names=["accuracy", "ece"]))
    legend = sorted(" ".join(t.get_text().split()) for t in fig.legends[0].get_texts())
    assert legend == ["A: resnet18 s0 (best)", "B: resnet18 s1 (best, calibrated)"]
    fig = chart_figure(aggregate([tmp_path / "calibrated"], metric_names=["ece"]))
    assert fig._suptitle.get_text().replace("\n", " ").endswith("test split, evaluation: best, calibrated")


def test_three_setups_without_pair_say_their_best_means_are_untested(tmp_path, capsys):
    """Review (statistics): with three or more setups and no --pair, no test ran and nothing
    said so; the stars looked like findings."""
    for seed, model in enumerate(("resnet18", "vit", "densenet121")):
        make_run(tmp_path, model, model=model, seed=seed)
    result = aggregate([tmp_path])
    assert result.paired is None and "untested; --pair A B" in capsys.readouterr().err
    aggregate([tmp_path / "resnet18", tmp_path / "vit"])
    assert "untested" not in capsys.readouterr().err
    other = tmp_path / "other"  # review of the session's diff: three setups on three datasets have no stars
    for k, flag in enumerate(("bloodmnist", "pathmnist", "dermamnist")):
        make_run(other, flag, seed=k, dataset={"flag": flag, "size": 28, "md5": flag})
    aggregate([other])
    assert "untested" not in capsys.readouterr().err


# -- review: copies evaluated differently, different test files, broken files, many setups -------


def test_a_copy_evaluated_differently_is_a_setup_not_a_duplicate(tmp_path):
    """Review: a run copied to evaluate it once more with --calibrate (or --tta) was dropped as
    "a copy of ... not another seed", though it is the paired comparison of two evaluations of
    one model; which one survived depended on the folders' names."""
    make_run(tmp_path, "plain", checkpoint_sha256="same")
    make_run(tmp_path, "scaled", checkpoint_sha256="same", calibration={"temperature": 1.3})
    make_run(tmp_path, "twin", checkpoint_sha256="same")  # a copy evaluated alike: the same result
    result = aggregate([tmp_path], metric_names=["accuracy"])
    assert sorted(g["evaluation"] for g in result.groups) == ["best", "best, calibrated"]
    assert [Path(s["run"]).name for s in result.skipped] == [Path(next(tmp_path.glob("*twin"))).name]


def test_setups_tested_on_different_files_are_no_rivals_and_say_which_file(tmp_path):
    """Review: runs on two unofficial bloodmnist files were ranked against each other (one
    starred best), paired by default, and titled as if they shared one dataset."""
    from medcli.aggregate import chart_figure

    make_run(tmp_path, "a", dataset={"md5": "aaaaaaaa11", "official": False})
    make_run(tmp_path, "b", model="vit-tiny", accuracy=0.95, dataset={"md5": "bbbbbbbb22", "official": False})
    result = aggregate([tmp_path], metric_names=["accuracy"])
    assert result.leaders == {} and result.paired is None
    assert sorted(g["group"] for g in result.groups) == [
        "resnet18 s0 on bloodmnist 28 px (UNOFFICIAL) md5 aaaaaaaa",
        "vit-tiny s0 on bloodmnist 28 px (UNOFFICIAL) md5 bbbbbbbb"]
    title, _, _ = display_rows(result)
    assert "UNOFFICIAL" not in title
    assert "(2 files)" in chart_figure(result)._suptitle.get_text().replace("\n", " ")


def test_a_malformed_metrics_file_leaves_its_run_out_not_the_comparison(tmp_path):
    """Review: `{"metrics": null}` in one run's metrics file ended the whole command with
    "unexpected TypeError"."""
    make_run(tmp_path, "good")
    bad = make_run(tmp_path, "bad", seed=1)
    for text in ('{"metrics": null}', '{"metrics": [1, 2]}', "[]"):
        (bad / "metrics" / "test.json").write_text(text)
        result = aggregate([tmp_path], metric_names=["accuracy"])
        assert len(result.runs) == 1
        assert [s["reason"] for s in result.skipped] == ["metrics/test.json is unreadable (TypeError); "
                                                         "re-run 'medcli evaluate'"]


def test_a_metric_below_zero_is_drawn_inside_its_panel(tmp_path):
    """Self-review: the panel's axis ran from the lowest value to the highest + room, so bars of
    a metric below zero (a ROAD score, a kappa) fell outside it, their values on the bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from medcli.aggregate import chart_figure

    make_run(tmp_path, "a")
    make_run(tmp_path, "b", model="vit-tiny")
    result = aggregate([tmp_path], metric_names=["auc"])
    for group, value in zip(result.groups, (-0.02, -0.01)):
        group["auc"] = value
    fig = chart_figure(result)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (ax,) = fig.axes
    low, high = ax.get_xlim()
    assert low < -0.02 and high >= 0.0
    frame = ax.get_window_extent(renderer)
    for text in ax.texts:  # each value inside the panel, left of its bar
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and text.get_ha() == "right", text.get_text()


def test_the_chart_tells_more_than_ten_setups_apart(tmp_path):
    """Review: from the 11th setup on, the bars reused the first setups' colours."""
    from matplotlib.colors import to_hex

    from medcli.aggregate import chart_figure

    for number in range(12):
        make_run(tmp_path, f"r{number}", lr=0.01 * (number + 1))
    (ax,) = chart_figure(aggregate([tmp_path], metric_names=["accuracy"])).axes
    looks = {(to_hex(patch.get_facecolor()), patch.get_hatch()) for patch in ax.patches}
    assert len(looks) == 12


def _evaluated_on(run: Path, **record) -> None:
    """Rewrite a made run's test metrics as if evaluated on the file `record` describes."""
    path = run / "metrics" / "test.json"
    data = json.loads(path.read_text())
    data["dataset"] = {"flag": "bloodmnist", "size": 28, **record}
    path.write_text(json.dumps(data))


def test_what_a_run_was_tested_on_is_the_evaluated_file_not_the_training_one(tmp_path):
    """Review of the diff: provenance and the paired tests' check came from the training file:
    a run trained on the sample and tested on the official file was labelled SAMPLE and no rival
    of the official runs, and two runs tested on one file but trained on two were refused."""
    sample = make_run(tmp_path, "sample", dataset={"md5": "sss", "official": False, "sample": True})
    _evaluated_on(sample, md5="abc", official=True)
    make_run(tmp_path, "vit", model="vit-tiny", accuracy=0.95)
    result = aggregate([tmp_path], metric_names=["accuracy"])
    assert {g["data"] for g in result.groups} == {""} and result.leaders["accuracy"] == ["vit-tiny s0"]
    (pair,) = result.paired["pairs"]  # refused here only for the predictions these made runs lack
    assert "different files" not in pair["refused"] and "no predictions file" in pair["refused"]


def test_a_calibrated_evaluation_from_before_keeps_the_models_own_auc(tmp_path):
    """Review of the diff: metrics files written before evaluate kept the model's own AUC under
    --calibrate hold the scaled one; they are compared by the AUC before scaling, like new ones."""
    make_run(tmp_path, "old", calibration={"temperature": 1.5, "before": {"auc": 0.91}, "after": {"auc": 0.95}})
    (row,) = aggregate([tmp_path], metric_names=["auc"]).runs
    assert row["auc"] == 0.91
    make_run(tmp_path / "new", "new", calibration={"temperature": 1.5, "before": {"auc": 0.95}, "after": {"auc": 0.97}})
    (row,) = aggregate([tmp_path / "new"], metric_names=["auc"]).runs
    assert row["auc"] == 0.95


def test_a_folder_where_an_output_goes_is_refused_before_any_file_is_written(tmp_path):
    """Review: a folder named comparison.png in --out let the CSVs, workbook and Markdown be
    replaced before the chart failed ("any previous version is unchanged: free some space")."""
    make_run(tmp_path / "runs", "a")
    (tmp_path / "cmp" / "comparison.png").mkdir(parents=True)
    result = runner.invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(tmp_path / "cmp")])
    one_line_error(result, 2, "holds a folder named comparison.png", "choose another --out")
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["comparison.png"]


def test_a_split_whose_re_evaluation_stopped_midway_or_whose_metrics_were_changed_is_left_out(tmp_path):
    """Review: aggregate read metrics/test.json whatever the evaluate stage said. An evaluation
    stopped while it rewrote the split (the split leaves the stage's list until its files are
    all written) mixed the new metrics with the old predictions in the paired tests, and a
    metrics file edited or copied in from elsewhere was compared as this run's."""
    import hashlib

    make_run(tmp_path, "good")
    stopped = Run.open(make_run(tmp_path, "stopped", seed=1))
    stopped.update(lambda data: data["stages"]["evaluate"].update(status="interrupted", summary={}))
    edited = Run.open(make_run(tmp_path, "edited", seed=2))
    metrics_file = edited.metrics_file("test")
    sha = hashlib.sha256(metrics_file.read_bytes()).hexdigest()
    # review: the check was skipped once a later attempt at another split had stopped the stage
    edited.update(lambda data: (data["stages"]["evaluate"]["artefacts"].__setitem__("metrics/test.json", sha),
                                data["stages"]["evaluate"].update(status="interrupted")))
    metrics_file.write_text(metrics_file.read_text().replace('"accuracy": 0.9', '"accuracy": 0.99'))
    result = aggregate([tmp_path], metric_names=["accuracy"])
    assert [Path(r["path"]).name for r in result.runs] == ["good"]
    reasons = {Path(s["run"]).name: s["reason"] for s in result.skipped}
    assert reasons["stopped"].startswith("its evaluation on test did not finish"), reasons
    assert "medcli evaluate" in reasons["stopped"]
    assert "is not the file evaluate wrote" in reasons["edited"], reasons


def test_a_comparison_that_fails_midway_leaves_the_earlier_one_whole(tmp_path, monkeypatch):
    """Review: the five files were replaced one by one, so a comparison that failed at the chart
    (a full disk, a drawing error) left the new tables beside the old chart."""
    from medcli import aggregate as aggregate_module
    from medcli.errors import MedcliError

    make_run(tmp_path / "runs", "a")
    out = tmp_path / "cmp"
    assert runner.invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(out)]).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    make_run(tmp_path / "runs", "b", model="vit-tiny", accuracy=0.7)

    def fail(path, result):
        raise MedcliError(f"writing {path} failed (No space left on device)")

    monkeypatch.setattr(aggregate_module, "write_chart", fail)
    failed = runner.invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(out)])
    assert failed.exit_code == 1 and "No space left" in failed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no new table, no leftover folder
    monkeypatch.undo()
    assert runner.invoke(app, ["aggregate", str(tmp_path / "runs"), "--out", str(out)]).exit_code == 0
    assert "vit-tiny" in (out / "comparison.csv").read_text() and sorted(p.name for p in out.iterdir()) == sorted(before)


def test_a_run_still_training_is_said_to_be_not_told_to_resume(tmp_path):
    """Review: a run in training was left out with "finish it with 'medcli train --resume ...'",
    which its lock refuses; a running stage whose process is gone is told to resume."""
    import os

    from filelock import FileLock

    from medcli.run import stage_lock_path

    make_run(tmp_path, "done")
    busy = make_run(tmp_path, "busy", seed=1, train_status="running")
    Run.open(busy).update(lambda data: data["stages"]["train"].update(pid=os.getpid()))
    with FileLock(stage_lock_path(busy, "train")):
        reasons = [s["reason"] for s in aggregate([tmp_path], metric_names=["accuracy"]).skipped]
    assert len(reasons) == 1 and f"is still running (pid {os.getpid()}); wait for it to finish" in reasons[0], reasons
    (reason,) = [s["reason"] for s in aggregate([tmp_path], metric_names=["accuracy"]).skipped]
    assert "ended without recording how (killed?); finish it with 'medcli train --resume" in reason
