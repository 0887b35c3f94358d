"""evaluate on the tiny trained run: files, manifest, workbook, determinism (with and without
TTA), calibration; plot-confusion from a CSV alone; bad input exits 2 with one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from medcli import datasets, metrics, tables, tasks
from medcli.cli import app
from medcli.run import Run

from cli_helpers import heavy_imports, one_line_error

runner = CliRunner()
NAMES = datasets.class_names("bloodmnist")


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    """A private copy of the session's tiny run (evaluate adds files and a stage to it)."""
    return shutil.copytree(tiny_run, tmp_path / tiny_run.name)


def test_evaluate_writes_files_workbook_and_stage_and_repeats_identically(run_copy):
    from openpyxl import load_workbook

    from medcli.evaluate import evaluate_run

    first = evaluate_run(run_copy, device="cpu", batch_size=32)
    metrics_json = json.loads((run_copy / "metrics" / "test.json").read_text())
    assert metrics_json["metrics"] == first["splits"]["test"]["metrics"]
    assert metrics_json["tta"] == {"enabled": False, "views": ["identity"]}
    assert metrics_json["calibration"] is None and metrics_json["class_names"] == NAMES

    csv = pd.read_csv(run_copy / "predictions" / "test.csv")
    assert list(csv.columns) == ["index", "label", "prediction", *[f"prob_{n}" for n in NAMES]]
    assert len(csv) == metrics_json["metrics"]["n"] == 64
    assert np.allclose(csv.filter(like="prob_").sum(axis=1), 1.0, atol=1e-4)
    assert (csv["label"] == csv["prediction"]).mean() == pytest.approx(metrics_json["metrics"]["accuracy"])

    stage = Run.open(run_copy).stages["evaluate"]
    assert stage["status"] == "completed"
    for name in ("metrics/test.json", "predictions/test.csv", "figures/confusion_test.png", "figures/samples_test.png",
                 "figures/mistakes_test.png", "figures/reliability_test.png", "report.xlsx"):
        assert name in stage["artefacts"] and (run_copy / name).stat().st_size > 0
    assert stage["summary"]["test"]["accuracy"] == metrics_json["metrics"]["accuracy"]

    book = load_workbook(run_copy / "report.xlsx")
    assert book.sheetnames == ["summary", "per-class", "confusion matrix", "ROC", "training history", "predictions"]
    summary = book["summary"]
    assert summary.freeze_panes == "A2" and summary["A1"].font.bold
    accuracy_row = next(row for row in summary.iter_rows() if row[0].value == "accuracy")
    assert accuracy_row[1].value == pytest.approx(metrics_json["metrics"]["accuracy"])
    assert accuracy_row[1].number_format == "0.00%"
    per_class = book["per-class"]
    assert [c.value for c in per_class[1]][:3] == ["split", "class", "name"] and per_class.max_row == 1 + len(NAMES)
    assert book["predictions"].max_row == 1 + 64
    assert book["training history"]["A1"].value == "epoch" and book["training history"].max_row == 1 + Run.open(run_copy).config["epochs"]

    again = runner.invoke(app, ["evaluate", str(run_copy), "--json", "--device", "cpu", "--batch-size", "32"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["test"]["metrics"] == first["splits"]["test"]["metrics"]


def test_tta_and_calibration_are_deterministic_and_recorded(run_copy):
    from medcli.evaluate import evaluate_run

    runs = [evaluate_run(run_copy, split="val", tta=True, calibrate=True, device="cpu")["splits"]["val"] for _ in range(2)]
    assert runs[0]["metrics"] == runs[1]["metrics"] and runs[0]["calibration"] == runs[1]["calibration"]
    assert runs[0]["tta"] == {"enabled": True, "views": ["identity", "hflip", "vflip", "hvflip"]}
    calibration = runs[0]["calibration"]
    assert calibration["fitted_on"] == "val" and calibration["temperature"] > 0
    assert set(calibration["before"]) == set(calibration["after"]) == {"ece", "nll", "brier", "auc"}
    assert calibration["after"]["nll"] == runs[0]["metrics"]["nll"]
    assert calibration["after"]["auc"] == runs[0]["metrics"]["auc"]


def test_evaluation_runs_in_full_precision_unless_asked(run_copy, monkeypatch):
    """Review defect 6: on a bf16-capable GPU training defaults to bf16, but evaluation (cheap,
    and its logits feed the metrics and the temperature fit) defaults to float32."""
    from medcli import inference
    from medcli.evaluate import evaluate_run

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = torch.device("cuda")
    assert inference.resolve_amp(cuda, None) == "bf16"
    assert inference.resolve_amp(cuda, None, default="off") == "off"
    assert inference.resolve_amp(cuda, "bf16", default="off") == "bf16"

    chosen = []
    real = inference.resolve_amp
    monkeypatch.setattr(inference, "resolve_amp", lambda device, amp, **kw: chosen.append(real(cuda, amp, **kw)) or "off")
    evaluate_run(run_copy, split="val", device="cpu")
    evaluate_run(run_copy, split="val", device="cpu", amp="bf16")
    assert chosen == ["off", "bf16"]


@pytest.mark.parametrize("before, after, warned", [(0.10, 0.02, False), (0.02, 0.05, True)])
def test_a_temperature_that_hurts_calibration_is_reported(before, after, warned, capsys):
    from medcli.evaluate import _warn_if_calibration_hurt

    calibration = {"temperature": 2.0, "before": {"ece": before}, "after": {"ece": after}}
    _warn_if_calibration_hurt({"test": {"calibration": calibration}, "val": {"calibration": None}})
    err = capsys.readouterr().err
    assert ("made the test calibration worse" in err) == warned


@pytest.mark.parametrize("trained, views", [
    ({"hflip": True, "vflip": False, "rot90": False}, ["identity", "hflip"]),
    ({"hflip": False, "vflip": False, "rot90": True}, ["identity", "hvflip"]),
    ({"hflip": False, "vflip": False, "rot90": False}, ["identity"]),
])
def test_tta_uses_only_the_flips_the_run_was_trained_with(run_copy, trained, views, capsys):
    from medcli.evaluate import evaluate_run

    Run.open(run_copy).update(lambda data: data["config"]["augment"].update(trained))
    plain = evaluate_run(run_copy, split="val", device="cpu")["splits"]["val"]
    tta = evaluate_run(run_copy, split="val", tta=True, device="cpu")["splits"]["val"]
    assert tta["tta"] == {"enabled": True, "views": views}
    warned = "no test-time view to add" in capsys.readouterr().err
    assert warned == (views == ["identity"])
    if views == ["identity"]:  # nothing to average: TTA gives the plain predictions
        assert tta["metrics"]["accuracy"] == plain["metrics"]["accuracy"]
        assert tta["metrics"]["nll"] == pytest.approx(plain["metrics"]["nll"], rel=1e-5)


def test_plot_confusion_from_a_csv_alone_without_torch(tmp_path):
    names = ["basophil", "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "platelet"]
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]])
    csv, _ = tables.write_predictions(tmp_path / "test.csv", tasks.MultiClass(names), np.array([0, 1, 2, 2]), probs)
    frame, parsed = tables.read_predictions(csv)
    assert parsed == tasks.MultiClass(names)  # the comma inside a class name survives the CSV header
    assert metrics.confusion_counts(frame["label"], frame["prediction"], 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]

    out = tmp_path / "cm.png"
    assert "torch" not in heavy_imports(["plot-confusion", str(csv), "--no-normalize", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_predictions_csv_keeps_every_probability_exactly(tmp_path):
    """The report's ROC curves and anyone's metrics are computed from the CSV: a probability
    rounded there (0.99999996 -> 1) would tie scores the model kept apart and move the AUC."""
    rng = np.random.default_rng(0)
    probs = metrics.softmax(rng.normal(scale=12, size=(200, 3)))
    probs[0] = [1 - 4e-8, 2e-8, 2e-8]
    labels = rng.integers(0, 3, size=200)
    csv, _ = tables.write_predictions(tmp_path / "test.csv", tasks.MultiClass(list("abc")), labels, probs)
    frame, _ = tables.read_predictions(csv)
    assert np.array_equal(frame[[f"{tables.PROB_PREFIX}{c}" for c in "abc"]].to_numpy(), probs)


def test_plot_confusion_default_output_for_a_run_dir(tmp_path):
    run = Run.create(tmp_path, "run", config={}, dataset={"flag": "bloodmnist", "size": 28}).run_dir  # a run is a directory with a manifest
    tables.write_predictions(run / "predictions" / "val.csv", tasks.MultiClass(["a", "b"]), np.array([0, 1]), np.eye(2))
    result = runner.invoke(app, ["plot-confusion", str(run), "--split", "val", "--normalize"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "figures" / "confusion_val_normalized.png")


def test_csv_with_missing_columns_exits_2(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("index,label,prob_a,prob_b\n0,0,0.9,0.1\n")
    line = one_line_error(runner.invoke(app, ["plot-confusion", str(csv)]), 2)
    assert "lacks the columns prediction" in line


def test_run_without_checkpoint_exits_2_and_leaves_manifest_alone(run_copy):
    (run_copy / "checkpoints" / "best.pt").unlink()
    line = one_line_error(runner.invoke(app, ["evaluate", str(run_copy), "--device", "cpu"]), 2)
    assert "checkpoints/best.pt" in line
    assert "evaluate" not in Run.open(run_copy).stages


def test_untrained_run_exits_2(tmp_path):
    Run.create(tmp_path, "fresh", config={}, dataset={"flag": "bloodmnist", "size": 28})
    line = one_line_error(runner.invoke(app, ["evaluate", str(tmp_path / "fresh")]), 2)
    assert "no completed train stage" in line and "medcli train" in line


def test_moved_dataset_needs_root_and_is_found_again_with_it(run_copy, synthetic_root):
    def move(data):
        data["config"]["root"] = str(run_copy / "gone")
        data["dataset"]["path"] = str(run_copy / "gone" / "bloodmnist.npz")

    Run.open(run_copy).update(move)
    line = one_line_error(runner.invoke(app, ["evaluate", str(run_copy), "--device", "cpu"]), 2)
    assert "is missing" in line and "--root" in line
    assert Run.open(run_copy).load_data(synthetic_root).labels["test"].shape == (64,)


class _Scores(torch.nn.Module):
    """3 class scores per image: `amp_value` under autocast, `value` in full precision."""

    def __init__(self, value: float, amp_value: float):
        super().__init__()
        self.value, self.amp_value = value, amp_value

    def forward(self, x):
        value = self.amp_value if torch.is_autocast_enabled("cpu") else self.value
        return torch.full((x.shape[0], 3), value, dtype=x.dtype)


def test_scores_that_overflow_in_fp16_are_predicted_again_and_diverged_ones_stop(tiny_run, capsys):
    from medcli import inference
    from medcli.errors import MedcliError

    prep, images = Run.open(tiny_run).data["preprocess"], torch.zeros(5, 3, 28, 28, dtype=torch.uint8)
    scores = inference.predict_logits(_Scores(1.0, float("inf")), images, prep, batch_size=2, device="cpu", amp="fp16")
    assert torch.equal(scores, torch.ones(5, 3)) and "predicting again in full precision" in capsys.readouterr().err
    for diverged in (float("nan"), float("inf")):
        with pytest.raises(MedcliError, match="NaN or infinite"):
            inference.predict_logits(_Scores(diverged, diverged), images, prep, batch_size=2, device="cpu")
