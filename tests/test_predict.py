"""predict on image files and export to ONNX / TorchScript, on the tiny trained run.

The oracles: `evaluate`'s predictions CSV for predict (PNG copies of test images get the same
probabilities, with and without TTA and calibration), PyTorch for an export (the same logits
through ONNX Runtime / TorchScript), and predict on the run for predict on its export."""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from medcli import augment, bundle, datasets, export, models
from medcli.cli import app
from medcli.run import Run

from cli_helpers import calibrated_probabilities, interrupt_at_call, one_line_error

runner = CliRunner()
CHOSEN = [0, 3, 7, 20, 41, 63]  # test images written out as PNG files


@pytest.fixture
def run_copy(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / tiny_run.name)


@pytest.fixture
def pngs(tiny_run, tmp_path):
    """PNG copies of some test images of the tiny run's data, named by their index."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    images = Run.open(tiny_run).load_data(splits=["test"]).images["test"]
    for index in CHOSEN:
        Image.fromarray(images[index]).save(folder / f"test_{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    """A TorchScript export of (a copy of) the tiny run's best checkpoint."""
    run = shutil.copytree(tiny_run, tmp_path_factory.mktemp("exported") / tiny_run.name)
    return Path(export.export_run(run, format="torchscript", out=run.parent / "m.pt")["model"])


def _probs(frame: pd.DataFrame) -> np.ndarray:
    return frame[[c for c in frame.columns if c.startswith("prob_")]].to_numpy()


@pytest.mark.parametrize("options", [[], ["--tta", "--calibrate"]])
def test_predict_on_png_copies_gives_evaluates_probabilities(run_copy, pngs, tmp_path, options):
    evaluated = runner.invoke(app, ["--quiet", "evaluate", str(run_copy), *options])
    assert evaluated.exit_code == 0, evaluated.output
    reference = pd.read_csv(run_copy / "predictions" / "test.csv").iloc[CHOSEN]
    # evaluate writes the model's probabilities and the temperature beside them
    expected = calibrated_probabilities(run_copy / "predictions" / "test.csv", CHOSEN)
    flags = ["--tta", "--calibrated"] if options else []
    predicted = runner.invoke(app, ["predict", str(run_copy), str(pngs), *flags, "--batch-size", "4"])
    assert predicted.exit_code == 0, predicted.output
    ours = pd.read_csv(pd.io.common.StringIO(predicted.stdout))
    assert [Path(p).name for p in ours["path"]] == [f"test_{i:03d}.png" for i in CHOSEN]  # sorted, stable
    np.testing.assert_allclose(_probs(ours), expected, rtol=0, atol=1e-5)
    names = datasets.class_names("bloodmnist")
    assert list(ours["prediction"]) == [names[k] for k in reference["prediction"]]
    if options:  # the temperature really was applied: without it the probabilities differ
        plain = runner.invoke(app, ["predict", str(run_copy), str(pngs), "--tta"])
        assert not np.allclose(_probs(pd.read_csv(pd.io.common.StringIO(plain.stdout))), _probs(ours), atol=1e-4)


def test_predict_writes_json_and_refuses_to_overwrite_its_output(tiny_run, pngs, tmp_path):
    out = tmp_path / "out" / "preds.csv"
    first = runner.invoke(app, ["predict", str(tiny_run), str(pngs / "test_000.png"), str(pngs / "test_003.png"),
                                "--out", str(out), "--json"])
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    assert [Path(r["path"]).name for r in result["predictions"]] == ["test_000.png", "test_003.png"]
    assert result["failed"] == [] and result["out"] == str(out.resolve()) and out.is_file()
    assert abs(sum(v for k, v in result["predictions"][0].items() if k.startswith("prob_")) - 1) < 1e-9
    before = out.read_bytes()
    again = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(out)])
    one_line_error(again, 2, "exists", "--overwrite")
    assert out.read_bytes() == before
    replaced = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(out), "--overwrite"])
    assert replaced.exit_code == 0 and replaced.stdout.strip() == str(out.resolve())
    assert len(pd.read_csv(out)) == len(CHOSEN)
    # review: --out naming one of the input images, with --overwrite, replaced the image by the CSV
    image = pngs / "test_000.png"
    before = image.read_bytes()
    one_line_error(runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(image), "--overwrite"]), 2,
                   "is not a predictions CSV", "choose another --out")
    assert image.read_bytes() == before
    empty = tmp_path / "made-by-mktemp.csv"  # review: an empty file made for the output was refused
    empty.write_bytes(b"")
    written = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(empty), "--overwrite"])
    assert written.exit_code == 0 and len(pd.read_csv(empty)) == len(CHOSEN)


def test_a_bad_file_is_one_line_the_others_are_predicted_and_the_exit_code_says_so(tiny_run, pngs, tmp_path):
    (pngs / "broken.png").write_bytes((pngs / "test_000.png").read_bytes()[:60])  # truncated
    (pngs / "empty.png").write_bytes(b"")
    (pngs / "notes.png").write_text("not an image")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.stderr
    for name in ("broken.png", "empty.png", "notes.png"):
        assert sum(name in line for line in result.stderr.splitlines()) >= 1, result.stderr
    assert len(pd.read_csv(out)) == len(CHOSEN)  # the readable files are all there
    skipped = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--skip-bad"])
    assert skipped.exit_code == 0, skipped.output
    assert "--skip-bad: 3 files left out" in " ".join(skipped.stderr.split())
    assert "error" not in skipped.stderr  # review: each bad file was an "error:" line although it exited 0
    assert len(pd.read_csv(pd.io.common.StringIO(skipped.stdout))) == len(CHOSEN)


@pytest.mark.parametrize("options", [[], ["--skip-bad"]])
def test_no_readable_file_is_an_error_and_writes_nothing(tiny_run, tmp_path, options):
    (tmp_path / "a.png").write_text("not an image")
    (tmp_path / "b.png").write_bytes(b"")
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "a.png"), str(tmp_path / "b.png"),
                                 "--out", str(out), *options])
    assert result.exit_code == 2 and result.stdout == "" and "Traceback" not in result.stderr, result.output
    assert "none of the 2 files could be read (listed above)" in result.stderr.splitlines()[-1]
    assert not out.exists()


def test_out_naming_a_folder_is_refused_up_front(tiny_run, pngs, tmp_path):
    for flags in ([], ["--overwrite"]):
        result = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(tmp_path), *flags])
        one_line_error(result, 2, "--out is a directory", "predictions.csv")
        assert "predicted" not in result.stderr


def test_dicom_without_pydicom_stops_predict_naming_the_extra(tiny_run, pngs, tmp_path, monkeypatch):
    scan = tmp_path / "scan.dcm"
    scan.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    monkeypatch.setitem(sys.modules, "pydicom", None)
    out = tmp_path / "p.csv"
    result = runner.invoke(app, ["predict", str(tiny_run), str(pngs), str(scan), "--skip-bad", "--out", str(out)])
    one_line_error(result, 1, "scan.dcm", "pip install 'medcli[dicom]'")
    assert not out.exists()


def test_missing_paths_and_bad_options_are_one_line(tiny_run, pngs, tmp_path):
    one_line_error(runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "nowhere.png")]), 2, "nowhere.png")
    one_line_error(runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--explain", "gradcam"]), 2, "--out")
    one_line_error(runner.invoke(app, ["predict", str(tmp_path / "norun"), str(pngs)]), 2)


def test_calibrated_without_a_calibrated_evaluation_says_so(tiny_run, exported, pngs):
    """... with a command that works: the run's evaluation with its path; for an export (whose
    description was fixed when written; review: the hint to evaluate did not help) the export too.
    Review: it was a warning, so under --quiet uncalibrated probabilities passed for calibrated
    ones (exit 0); it is a usage error."""
    for flags in ([], ["--quiet"]):
        result = runner.invoke(app, [*flags, "predict", str(tiny_run), str(pngs), "--calibrated"])
        one_line_error(result, 2, "no calibrated evaluation",
                       f"medcli evaluate {tiny_run.resolve()} --split test --calibrate", "or drop --calibrated")
    one_line_error(runner.invoke(app, ["predict", str(exported), str(pngs), "--calibrated"]), 2,
                   "then export it again with --overwrite")


def test_the_calibration_hint_names_the_checkpoint_predicted_with(run_copy, pngs):
    """Review of the fix: after `evaluate --checkpoint last`, the hint for best.pt repeated the
    recorded --checkpoint last: following it changed nothing."""
    assert runner.invoke(app, ["--quiet", "evaluate", str(run_copy), "--checkpoint", "last"]).exit_code == 0
    said = " ".join(runner.invoke(app, ["predict", str(run_copy), str(pngs), "--calibrated"]).stderr.split())
    command = said.split("run '")[1].split("'")[0]
    assert command == f"medcli evaluate {run_copy.resolve()} --split test --calibrate"
    assert runner.invoke(app, ["--quiet", *command.split()[1:]]).exit_code == 0
    fixed = runner.invoke(app, ["predict", str(run_copy), str(pngs), "--calibrated"])
    assert fixed.exit_code == 0 and "no calibrated evaluation" not in fixed.stderr


def test_a_damaged_evaluation_is_one_line_for_predict_and_export(run_copy, pngs, tmp_path):
    """Review: predict and export read metrics/test.json unchecked: a truncated file was an
    "unexpected JSONDecodeError" (exit 1) where report gave one line naming the fix."""
    assert runner.invoke(app, ["--quiet", "evaluate", str(run_copy), "--calibrate"]).exit_code == 0
    metrics_file = run_copy / "metrics" / "test.json"
    metrics_file.write_bytes(metrics_file.read_bytes()[:100])
    for args in (["predict", str(run_copy), str(pngs), "--calibrated"], ["export", str(run_copy), "--out", str(tmp_path / "m.pt")]):
        line = one_line_error(runner.invoke(app, args), 2)
        assert "metrics/test.json" in line and f"medcli evaluate {run_copy.resolve()} --split test --calibrate" in line, line


def test_an_overlay_folder_that_cannot_be_made_is_one_line(tiny_run, pngs, tmp_path):
    """Review: `--explain` made its folder unguarded: an unwritable place was an "unexpected
    OSError" (exit 1), where the CSV's own failure is one line."""
    (tmp_path / "preds_gradcam").write_text("a file where the overlays' folder goes")
    result = runner.invoke(app, ["--quiet", "predict", str(tiny_run), str(pngs), "--out", str(tmp_path / "preds.csv"),
                                 "--explain", "gradcam"])
    assert "preds_gradcam" in one_line_error(result, 2)


def test_explain_writes_one_overlay_per_image(tiny_run, pngs, tmp_path):
    out = tmp_path / "preds.csv"
    result = runner.invoke(app, ["--quiet", "predict", str(tiny_run), str(pngs), "--out", str(out), "--explain", "gradcam"])
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out)
    overlays = [Path(p) for p in frame["overlay"]]
    assert len(overlays) == len(CHOSEN) and all(p.is_file() and p.parent == tmp_path / "preds_gradcam" for p in overlays)
    assert overlays[0].name == "00000_test-000.png"
    assert Image.open(overlays[0]).size[0] > 3 * 28  # image | map | overlay, upsampled
    again = runner.invoke(app, ["--quiet", "predict", str(tiny_run), str(pngs / "test_000.png"), "--out", str(out),
                                "--explain", "gradcam"])
    one_line_error(again, 2, "--overwrite")
    fewer = runner.invoke(app, ["predict", str(tiny_run), str(pngs / "test_000.png"), "--out", str(out),
                                "--explain", "gradcam", "--overwrite"])
    assert fewer.exit_code == 0, fewer.output
    assert sorted(p.name for p in (tmp_path / "preds_gradcam").iterdir()) == ["00000_test-000.png"]


def test_overwrite_keeps_earlier_overlays_until_new_ones_are_written(tiny_run, exported, pngs, tmp_path):
    out = tmp_path / "ex" / "p.csv"
    first = runner.invoke(app, ["--quiet", "predict", str(tiny_run), str(pngs), "--out", str(out), "--explain", "gradcam"])
    assert first.exit_code == 0, first.output
    folder = tmp_path / "ex" / "p_gradcam"
    earlier = sorted(folder.iterdir())
    (tmp_path / "bad.png").write_text("not an image")
    for source, paths, code in [(tiny_run, [tmp_path / "typo.png"], 2),  # no such file
                                (exported, [pngs], 2),  # --explain needs the run
                                (tiny_run, [tmp_path / "bad.png"], 2)]:  # nothing readable
        result = runner.invoke(app, ["predict", str(source), *map(str, paths), "--out", str(out),
                                     "--explain", "gradcam", "--overwrite"])
        assert result.exit_code == code, result.output
        assert sorted(folder.iterdir()) == earlier, result.output


def test_gray_inputs_are_converted_to_the_runs_three_channels(tiny_run, tmp_path):
    image = Run.open(tiny_run).load_data(splits=["test"]).images["test"][0]
    Image.fromarray(image).convert("L").save(tmp_path / "gray.png")
    gray = np.asarray(Image.open(tmp_path / "gray.png"))
    np.save(tmp_path / "gray3.npy", np.repeat(gray[:, :, None], 3, axis=2)[None])
    result = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "gray.png"), str(tmp_path / "gray3.npy")])
    assert result.exit_code == 0, result.output
    assert "grayscale" in result.stderr.lower()  # one note on the conversion
    frame = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert list(frame["path"]) == [str(tmp_path / "gray.png"), f"{tmp_path / 'gray3.npy'}[0]"]
    np.testing.assert_array_equal(_probs(frame)[0], _probs(frame)[1])  # repeated gray = the converted file


# -- export ------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_pytorch_and_predict_on_it_matches_the_run(run_copy, pngs, tmp_path, fmt):
    runner.invoke(app, ["--quiet", "evaluate", str(run_copy), "--calibrate"])
    result = runner.invoke(app, ["export", str(run_copy), "--format", fmt, "--json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.stdout)
    model_file = Path(files["model"])
    assert model_file.parent == run_copy / "export" and model_file.suffix == bundle.FORMATS[fmt]
    card = json.loads(Path(files["sidecar"]).read_text())
    assert card["class_names"] == datasets.class_names("bloodmnist") and card["task"] == "multi-class"
    assert card["image"] == {"size": 28, "channels": 3} and card["calibration"]["temperature"] > 0
    assert card["dataset"]["md5"] == Run.open(run_copy).dataset["md5"] and "SYNTHETIC" in card["dataset"]["provenance"]
    assert card["export"]["verification"]["max_abs_diff"] <= card["export"]["verification"]["tolerance"]
    if fmt == "onnx":
        assert card["export"]["opset"] >= 17
    text = Path(files["card"]).read_text()
    for needle in ("Not a medical device", "## Test metrics", "accuracy", "Trained on 28-px images", "Licence"):
        assert needle in text, needle
    # review: "Classes: a, b, c" cut a class name with commas in it (bloodmnist's immature
    # granulocytes) into several; the steps said neither the channel order nor the decision
    names = card["class_names"]
    assert "- Classes (output: name): " + "; ".join(f"{i}: {name}" for i, name in enumerate(names)) + "." in text
    assert any("," in name for name in names)
    assert "in R, G, B order" in card["steps"][0] and card["steps"][-1] == "decided: the class of highest probability"
    # review: the card said "monitor acc" for a best.pt the EMA-window rule chose by mean val AUC
    select = Run.open(run_copy).config["select"]
    chosen = card["training"]["best.pt"]
    assert "monitor" not in card["training"] and chosen in " ".join(text.split())
    assert select["monitor"].upper() in chosen and (("EMA" in chosen) == (select["rule"] == "ema-window"))
    # the oracle, independent of medcli's own check: PyTorch on a batch size the export never saw
    run = Run.open(run_copy)
    images = run.load_data(splits=["test"]).images["test"][:5]
    x = augment.preprocess(datasets.as_tensor(images), run.data["preprocess"])
    with torch.no_grad():
        reference = run.load_model("best").float()(x).numpy()
        exported = bundle.load_exported(fmt, model_file)(x).numpy()
    np.testing.assert_allclose(exported, reference, rtol=0, atol=1e-4)
    # predict on the export = predict on the run
    through_file = runner.invoke(app, ["predict", str(model_file), str(pngs), "--calibrated"])
    through_run = runner.invoke(app, ["predict", str(run_copy), str(pngs), "--calibrated"])
    assert through_file.exit_code == 0 and through_run.exit_code == 0, through_file.output + through_run.output
    a, b = (pd.read_csv(pd.io.common.StringIO(r.stdout)) for r in (through_file, through_run))
    np.testing.assert_allclose(_probs(a), _probs(b), rtol=0, atol=1e-5)
    assert list(a["prediction"]) == list(b["prediction"])
    assert json.loads((run_copy / "manifest.json").read_text())["stages"]["export"]["status"] == "completed"
    again = runner.invoke(app, ["export", str(run_copy), "--format", fmt])
    one_line_error(again, 2, "--overwrite")


def test_an_export_that_does_not_match_is_refused_and_nothing_is_written(run_copy, monkeypatch, tmp_path):
    monkeypatch.setattr(export, "TOLERANCE", -1.0)
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", str(run_copy), "--out", str(out)])
    one_line_error(result, 1, "differ from PyTorch's", "nothing was written")
    assert list(tmp_path.glob("m*")) == []


def test_same_decisions_follow_the_task_not_an_argmax():
    """Review: the export check compared argmaxes for every task type; a multi-label logit
    crossing 0 (a label's decision flipping) still gave same_decisions: true."""
    from medcli import tasks

    reference, exported = np.array([[1e-5, 2.0]]), np.array([[-1e-5, 2.0]])
    multilabel = tasks.for_kind("multi-label, binary-class", ["a", "b"])
    assert export._check(reference, exported, "x", "onnx", multilabel)["same_decisions"] is False
    multiclass = tasks.for_kind("multi-class", ["a", "b"])
    assert export._check(reference, exported, "x", "onnx", multiclass)["same_decisions"] is True


def test_explain_with_a_method_the_model_cannot_take_names_predicts_option(run_copy, pngs, tmp_path):
    """Review: predict's refusal told the user to pass --method, which predict does not have."""
    one_line_error(runner.invoke(app, ["predict", str(run_copy), str(pngs), "--explain", "rollout", "--out",
                                       str(tmp_path / "p.csv")]), 2,
                   "--explain gradcam")


def test_exported_model_without_its_description_is_one_line(run_copy, tmp_path):
    result = runner.invoke(app, ["export", str(run_copy), "--out", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0, result.output
    (tmp_path / "m.json").unlink()
    one_line_error(runner.invoke(app, ["predict", str(tmp_path / "m.onnx"), str(tmp_path)]), 2, "m.json", "medcli export")


def test_a_description_that_does_not_fit_its_export_is_one_line(exported, pngs, tmp_path):
    """Review: another export's description copied beside a model ended in the runtime's own
    error ("unexpected InvalidArgument"), and a description whose "image" was not a mapping in
    "unexpected TypeError"."""
    model = Path(shutil.copy(exported, tmp_path / "m.pt"))
    card = json.loads(bundle.sidecar_path(exported).read_text())
    for change, needle in [(lambda c: c["class_names"].pop(), "it gives (8,) scores for 7 classes"),
                           (lambda c: c["image"].update(channels=1), "it does not take a (1, 28, 28) input"),
                           (lambda c: c.update(image="x"), "lacks image (as a mapping)")]:
        changed = json.loads(json.dumps(card))
        change(changed)
        bundle.sidecar_path(model).write_text(json.dumps(changed))
        result = runner.invoke(app, ["predict", str(model), str(pngs / "test_000.png")])
        one_line_error(result, 2, needle)


def test_checkpoint_applies_to_runs_and_an_export_refuses_another(tiny_run, exported, pngs):
    one_line_error(runner.invoke(app, ["predict", str(exported), str(pngs), "--checkpoint", "last"]), 2,
                   "exported from the best checkpoint", "--checkpoint applies to run directories")
    for source, flags, expected in [(exported, ["--checkpoint", "best"], "best"), (exported, [], "best"),
                                    (tiny_run, [], "best"), (tiny_run, ["--checkpoint", "last"], "last")]:
        result = runner.invoke(app, ["predict", str(source), str(pngs / "test_000.png"), "--json", *flags])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["model"]["checkpoint"] == expected


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_a_full_disk_during_an_export_is_one_line_and_leaves_nothing(run_copy, tmp_path, monkeypatch, fmt):
    """Review: on a full disk `export --format torchscript` ended by SIGABRT (torch's file writer
    throws from a destructor) with 50 lines of C++ stack, its stage left running and its staging
    folder behind; ONNX said the model "does not export" and advised TorchScript."""
    import errno

    real = Path.write_bytes
    if fmt == "onnx":
        def export_on_full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch.onnx, "export", export_on_full_disk)
    else:
        monkeypatch.setattr(Path, "write_bytes", lambda self, data: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device")) if self.suffix == ".pt" else real(self, data))
    out = tmp_path / "out"
    line = one_line_error(runner.invoke(app, ["export", str(run_copy), "--format", fmt, "--out",
                                              str(out / f"m{bundle.FORMATS[fmt]}")]), 1, "No space left on device")
    assert "try --format" not in line and (not out.exists() or not any(out.iterdir())), line
    assert Run.open(run_copy).stages["export"]["status"] == "failed"


def test_torchscript_save_and_load_keep_deprecation_warnings_to_themselves(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    x = torch.randn(2, 3, 2, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export._torchscript(model, x, tmp_path / "m.pt")
        bundle.load_exported("torchscript", tmp_path / "m.pt")
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []


@pytest.mark.parametrize("name, size, overrides", [
    ("resnet18", 28, {}), ("resnet18", 64, {}), ("resnet18", 224, {}),
    ("vit", 28, {"patch_size": 4, "depth": 2}), ("vit", 224, {"depth": 1}),
])
def test_every_model_family_exports_to_onnx_at_its_stems_and_sizes(name, size, overrides, tmp_path):
    import onnxruntime

    model, spec = models.create(name, num_classes=5, in_chans=3, input_size=size, **overrides)
    model.eval()
    x = torch.randn(3, 3, size, size)
    details = export._onnx(model, x[:export.TRACE_BATCH], tmp_path / "m.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        reference = model(x).numpy()
    np.testing.assert_allclose(session.run(None, {"images": x.numpy()})[0], reference, rtol=0, atol=1e-4)
    assert details["opset"] >= 17 and spec["input_size"] == size


# -- review: calibration choice, own outputs among the inputs, bad --out, exporter, sidecars --------


def test_calibrated_applies_the_temperature_fitted_the_way_it_predicts(run_copy, pngs, tmp_path):
    """Review: --calibrated took the first calibrated metrics file (train, val, test), though a
    later evaluation of test had refitted it with TTA: predict disagreed with evaluate by 0.6."""
    for options in (["--split", "all", "--calibrate"], ["--split", "test", "--calibrate", "--tta"]):
        assert runner.invoke(app, ["--quiet", "evaluate", str(run_copy), *options]).exit_code == 0
    reference = calibrated_probabilities(run_copy / "predictions" / "test.csv", CHOSEN)
    with_tta = runner.invoke(app, ["predict", str(run_copy), str(pngs), "--tta", "--calibrated"])
    assert with_tta.exit_code == 0 and "fitted without" not in with_tta.stderr, with_tta.output
    np.testing.assert_allclose(_probs(pd.read_csv(pd.io.common.StringIO(with_tta.stdout))), reference, atol=1e-5)
    plain = runner.invoke(app, ["predict", str(run_copy), str(pngs), "--calibrated", "--json"])
    assert plain.exit_code == 0 and "fitted with" not in plain.stderr, plain.output
    val = json.loads((run_copy / "metrics" / "val.json").read_text())["calibration"]["temperature"]
    assert json.loads(plain.stdout)["model"]["temperature"] == val
    # Review of the fix: the model card named the newest temperature (fitted with TTA) as the one
    # `predict --calibrated` applies, which applies the one fitted without TTA. It names both.
    with_tta = json.loads((run_copy / "metrics" / "test.json").read_text())["calibration"]["temperature"]
    text = Path(export.export_run(run_copy, format="torchscript", out=tmp_path / "m.pt")["card"]).read_text()
    assert f"temperature {val:.3f} fitted on the val split without test-time views (`medcli predict --calibrated`" in text
    assert f"temperature {with_tta:.3f} fitted on the val split with test-time views (`medcli predict --tta" in text


def test_earlier_results_inside_the_input_folder_are_not_read_as_images(tiny_run, pngs):
    """Review: with --out inside the input folder, the second run read its own overlays as
    inputs, then removed them while they were still to be read."""
    out = pngs / "p.csv"
    for extra in ([], ["--overwrite", "--batch-size", "2"]):
        result = runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--explain", "gradcam", "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        assert len(pd.read_csv(out)) == len(CHOSEN)
    assert "left out" in result.stderr


def test_an_out_under_a_file_is_refused_before_any_work(tiny_run, pngs, tmp_path, monkeypatch):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    monkeypatch.setattr(bundle, "open_model", lambda *a, **k: pytest.fail("the model was opened"))
    one_line_error(runner.invoke(app, ["predict", str(tiny_run), str(pngs), "--out", str(blocker / "p.csv")]), 2,
                   f"{blocker} is a file")
    monkeypatch.setattr(export, "_verification_batch", lambda *a, **k: pytest.fail("the export started"))
    one_line_error(runner.invoke(app, ["export", str(tiny_run), "--out", str(blocker / "m.onnx")]), 2,
                   f"{blocker} is a file")



def test_an_out_in_a_read_only_folder_is_refused_before_any_work(run_copy, pngs, tmp_path, monkeypatch):
    """Review: export into a read-only folder failed inside its stage, marking the run's
    completed export "failed"; predict --explain's folder was an unexpected OSError."""
    assert runner.invoke(app, ["--quiet", "export", str(run_copy), "--format", "torchscript"]).exit_code == 0
    shut = tmp_path / "read-only"
    shut.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != shut and real(path, mode, **kw))  # root writes anyway
    for args in (["export", str(run_copy), "--format", "torchscript", "--out", str(shut / "m.pt")],
                 ["predict", str(run_copy), str(pngs), "--out", str(shut / "p.csv")]):
        one_line_error(runner.invoke(app, args), 2, f"{shut} is not writable")
    assert Run.open(run_copy).status("export") == "completed"


def test_onnx_export_without_its_packages_is_one_line_before_any_work(run_copy, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if the export extra were not installed
    out = tmp_path / "m.onnx"
    one_line_error(runner.invoke(app, ["export", str(run_copy), "--out", str(out)]), 2, "onnx", "medcli[export]")
    assert list(tmp_path.glob("m*")) == []


@pytest.mark.parametrize("change, reason", [(lambda card: card.pop("task"), "lacks task"),
                                            (lambda card: card["image"].pop("channels"), "lacks image.channels"),
                                            (lambda card: card.update(calibrations=[{"temperature": 1.5}]),
                                             "lacks calibrations[0]"),
                                            (lambda card: card.update(version=99), "version 99")])
def test_an_incomplete_or_foreign_sidecar_is_one_line(exported, pngs, tmp_path, change, reason):
    model = tmp_path / "y.pt"
    shutil.copy(exported, model)
    card = json.loads(bundle.sidecar_path(exported).read_text())
    change(card)
    bundle.sidecar_path(model).write_text(json.dumps(card))
    one_line_error(runner.invoke(app, ["predict", str(model), str(pngs)]), 2, reason, "export")


def test_a_missing_model_file_is_named_as_one(pngs, tmp_path):
    one_line_error(runner.invoke(app, ["predict", str(tmp_path / "nothere.onnx"), str(pngs)]), 2,
                   "nothere.onnx does not exist", "model file")


def test_the_model_card_says_its_test_metrics_are_after_temperature_scaling(run_copy, tmp_path):
    assert runner.invoke(app, ["--quiet", "evaluate", str(run_copy), "--calibrate"]).exit_code == 0
    result = export.export_run(run_copy, format="torchscript", out=tmp_path / "m.pt")
    text = Path(result["card"]).read_text()
    temperature = json.loads((run_copy / "metrics" / "test.json").read_text())["calibration"]["temperature"]
    assert f"without test-time views; after temperature scaling, T = {temperature:.3f} fitted on val" in text
    assert "; images per split: train 256, val 64, test 64." in text  # review: a Python dict was printed
    # review: the Data section opened with the official dataset's description (its 17,092 images)
    data = text.split("## Data\n", 1)[1].splitlines()[0]
    assert data.startswith("- Trained on **SYNTHETIC data") and "not the official bloodmnist, for which" in data
    card = bundle.sidecar_path(result["model"])
    upper = card.with_name("M.PT")  # review: an upper-case suffix was "not a run directory"
    Path(result["model"]).rename(upper)
    card.rename(bundle.sidecar_path(upper))
    assert bundle.open_model(upper).kind == "torchscript"


def test_an_export_stopped_midway_keeps_the_earlier_files_together(run_copy, tmp_path, monkeypatch):
    """Review: `export --overwrite` replaced the model, then its description, then its card: a
    stop between them left a new model beside the old description (another checkpoint's name
    and temperature). They are replaced together; an upper-case suffix is an export file too."""
    out = tmp_path / "exp" / "M.PT"
    export.export_run(run_copy, format="torchscript", out=out)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    assert sorted(before) == ["M.PT", "M.json", "M.md"]

    def stop(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "model_card", stop)
    with pytest.raises(KeyboardInterrupt):
        export.export_run(run_copy, format="torchscript", checkpoint="last", out=out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before


def test_overlays_of_files_in_a_folder_with_brackets_keep_their_names(tiny_run, pngs, tmp_path):
    folder = shutil.copytree(pngs, tmp_path / "br[1]")
    out = tmp_path / "ex" / "p.csv"
    result = runner.invoke(app, ["--quiet", "predict", str(tiny_run), str(folder), "--out", str(out), "--explain", "gradcam"])
    assert result.exit_code == 0, result.output
    assert Path(pd.read_csv(out)["overlay"][0]).name == "00000_test-000.png"


def test_an_overwrite_stopped_halfway_keeps_the_earlier_csv_and_its_overlays(tiny_run, pngs, tmp_path, monkeypatch):
    """Review: `predict --explain --overwrite` removed the earlier overlays at its first batch;
    stopped after it, the earlier CSV named overlays that no longer existed. The new ones now
    wait in a hidden folder until every image is predicted, which a stop removes."""
    from medcli import predict

    out = tmp_path / "p.csv"
    args = ["--quiet", "predict", str(tiny_run), str(pngs), "--out", str(out), "--explain", "gradcam", "--batch-size", "2"]
    assert runner.invoke(app, args).exit_code == 0
    before = {path.name: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    interrupt_at_call(monkeypatch, predict, "_overlays")  # at the second batch
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 130
    assert {path.name: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()} == before
    assert all(Path(p).is_file() for p in pd.read_csv(out)["overlay"])


def test_an_export_never_takes_the_description_of_another_format_of_one_name(exported):
    """Review: `export --out m.onnx` beside m.pt (with --overwrite) rewrote m.json and m.md to
    describe m.onnx, leaving m.pt without the description it is predicted with."""
    before = exported.with_suffix(".json").read_text()
    run = next(exported.parent.glob("*/manifest.json")).parent
    result = runner.invoke(app, ["export", str(run),
                                 "--format", "onnx", "--out", str(exported.with_suffix(".onnx")), "--overwrite"])
    one_line_error(result, 2, "describes", "m.pt", "m_onnx.onnx")
    assert exported.with_suffix(".json").read_text() == before and not exported.with_suffix(".onnx").exists()


def test_explain_over_unreadable_files_leaves_no_new_folder(tiny_run, tmp_path):
    """Review: the staging folder made --out's missing folders before any image was read; with
    none readable it exits 2 and leaves nothing behind."""
    (tmp_path / "bad.png").write_text("not an image")
    result = runner.invoke(app, ["predict", str(tiny_run), str(tmp_path / "bad.png"), "--out",
                                 str(tmp_path / "new" / "dir" / "p.csv"), "--explain", "gradcam"])
    assert result.exit_code == 2 and not (tmp_path / "new").exists(), result.output


def test_tta_without_a_view_to_add_uses_the_calibration_evaluate_recorded_for_it(run_copy, pngs):
    """Review of the diff: evaluate records `--tta` on a run trained without flips as not used;
    predict kept it as used, so `--tta --calibrated` looked for a fit made with views and said
    the one it found "was fitted without test-time views"."""
    Run.open(run_copy).update(lambda data: data["config"]["augment"].update(hflip=False, vflip=False, rot90=False))
    assert runner.invoke(app, ["--quiet", "evaluate", str(run_copy), "--calibrate", "--tta"]).exit_code == 0
    result = runner.invoke(app, ["predict", str(run_copy), str(pngs), "--tta", "--calibrated"])
    assert result.exit_code == 0 and "no test-time view to add" in result.stderr
    assert "fitted without" not in result.stderr and "no calibrated" not in result.stderr, result.stderr
    np.testing.assert_allclose(_probs(pd.read_csv(pd.io.common.StringIO(result.stdout))),
                               calibrated_probabilities(run_copy / "predictions" / "test.csv", CHOSEN), atol=1e-5)


def test_an_overlay_of_a_constant_map_says_it_shows_nothing(tiny_run, pngs, tmp_path, monkeypatch):
    """Review: `predict --explain` drew an all-zero map as a black heat map with nothing saying it
    carries no information (explain's figures say so)."""
    from medcli import explainers, reports

    real, titles = explainers.heatmaps, []

    def first_constant(*args, **kwargs):
        maps, scores = real(*args, **kwargs)
        maps[0] = 0.0
        return maps, scores

    monkeypatch.setattr(explainers, "heatmaps", first_constant)
    monkeypatch.setattr(reports, "save_sample_figure", lambda path, image, heat, title, note=None: (
        titles.append((title, bool(np.ptp(heat) == 0))), Path(path).write_bytes(b"png")))
    result = runner.invoke(app, ["--quiet", "predict", str(tiny_run), str(pngs), "--out", str(tmp_path / "p.csv"),
                                 "--explain", "gradcam"])
    assert result.exit_code == 0, result.stderr
    assert titles[0] == (titles[0][0], True) and titles[0][0].endswith("| constant map: no information")
    assert all(title.endswith("| constant map: no information") == flat for title, flat in titles)


def test_explain_with_an_exported_model_is_refused_for_that_first(exported, tiny_run, pngs):
    """Review: `predict MODEL.onnx x.png --explain gradcam` first asked for --out; given one, it
    then said an exported model cannot be explained: one try, one reason."""
    line = one_line_error(runner.invoke(app, ["predict", str(exported), str(pngs), "--explain", "gradcam"]), 2)
    assert "--explain needs the run directory" in line and "--out" not in line
    manifest = tiny_run / "manifest.json"  # a run named by its manifest is a run: it asks for --out
    line = one_line_error(runner.invoke(app, ["predict", str(manifest), str(pngs), "--explain", "gradcam"]), 2)
    assert "give --out FILE.csv" in line
