"""The task layer: metrics identical to medmnist's evaluator for all four task types (random
and degenerate inputs), the task-specific metrics against hand counts, and every command on a
tiny multi-label, binary and ordinal dataset (ChestMNIST, BreastMNIST, RetinaMNIST layouts)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medcli import datasets, metrics
from medcli.errors import MedcliError
from medcli.cli import app
from medcli.tasks import EXTRA_METRICS, Binary, MultiClass, MultiLabel, Ordinal, for_kind

from cli_helpers import calibrated_probabilities

MULTI_CLASS, BINARY, ORDINAL, MULTI_LABEL = (cls.kind for cls in (MultiClass, Binary, Ordinal, MultiLabel))

runner = CliRunner()
N = 60


def _single(rng, classes: int, kind: str = "random"):
    labels = rng.integers(0, classes, size=N)
    logits = rng.normal(size=(N, classes))
    logits[np.arange(N), labels] += 1.0
    probs = metrics.softmax(logits)
    if kind == "absent":
        labels = labels % (classes - 1)  # the last class never occurs
    elif kind == "constant":
        probs = np.full((N, classes), 1.0 / classes)
    elif kind == "one positive":
        labels = np.zeros(N, dtype=np.int64)
        labels[7] = classes - 1
    elif kind == "unnormalised":  # scores read back from someone's CSV: rows need not sum to 1
        probs = rng.random((N, classes)) * 0.6
    return labels, probs


def _multilabel(rng, kind: str = "random"):
    labels = (rng.random((N, 5)) < 0.3).astype(np.int64)
    labels[0], labels[1] = 1, 0  # every label has both values
    probs = np.clip(labels * 0.3 + rng.random((N, 5)) * 0.7, 0, 1)
    if kind == "absent":
        labels[:, 2] = 0
    elif kind == "constant":
        probs = np.full((N, 5), 0.5)
    elif kind == "one positive":
        labels[:, 3] = 0
        labels[11, 3] = 1
    elif kind == "unnormalised":
        probs = rng.random((N, 5)) * 0.6
    return labels, probs


CASES = [(task, kind) for task in (MULTI_CLASS, BINARY, ORDINAL, MULTI_LABEL)
         for kind in ("random", "absent", "constant", "one positive", "unnormalised")] + [(MULTI_CLASS, "two classes")]


@pytest.mark.parametrize("task,kind", CASES)
def test_accuracy_and_auc_equal_medmnists_evaluator(task, kind):
    from medmnist.evaluator import getACC, getAUC

    rng = np.random.default_rng(len(kind) + len(task))
    if task == MULTI_LABEL:
        labels, probs = _multilabel(rng, kind)
        oracle_labels = labels
    else:
        classes = {MULTI_CLASS: 2 if kind == "two classes" else 6, BINARY: 2, ORDINAL: 5}[task]
        labels, probs = _single(rng, classes, "random" if kind == "two classes" else kind)
        oracle_labels = labels[:, None]  # the npz layout medmnist reads: (N, 1)
    ours = for_kind(task, tuple(f"c{k}" for k in range(probs.shape[1]))).metrics(labels, probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn's "only one class present" (its AUC is NaN)
        acc, auc = getACC(oracle_labels, probs, task), getAUC(oracle_labels, probs, task)
    assert ours["accuracy"] == pytest.approx(acc, abs=1e-12)
    if np.isnan(auc):
        assert ours["auc"] is None
    else:
        assert ours["auc"] == pytest.approx(auc, abs=1e-12)
    assert set(EXTRA_METRICS[task]) <= set(ours)


@pytest.mark.parametrize("task,kind", [(task, kind) for task in (MULTI_CLASS, BINARY, ORDINAL, MULTI_LABEL)
                                       for kind in ("random", "absent", "one positive")])
def test_brier_and_per_class_scores_are_sklearns_and_undefined_ones_are_none(task, kind):
    """Review: a binary Brier score was twice sklearn's (both columns summed), a multi-label one
    summed over the labels (4.6 for 14 random labels), and a class's precision, recall or F1
    over an empty denominator was 0.0 beside a sensitivity of None."""
    from sklearn.metrics import brier_score_loss, precision_recall_fscore_support

    rng = np.random.default_rng(len(kind) + len(task))
    if task == MULTI_LABEL:
        labels, probs = _multilabel(rng, kind)
        brier = np.mean([brier_score_loss(labels[:, k], probs[:, k], labels=[0, 1]) for k in range(labels.shape[1])])
    else:
        labels, probs = _single(rng, {MULTI_CLASS: 6, BINARY: 2, ORDINAL: 5}[task], kind)
        brier = brier_score_loss(labels, probs[:, 1]) if task == BINARY else \
            brier_score_loss(labels, probs, labels=np.arange(probs.shape[1]))
    chosen = for_kind(task, tuple(f"c{k}" for k in range(probs.shape[1])))
    ours = chosen.metrics(labels, probs)
    assert ours["brier"] == pytest.approx(brier, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oracle = precision_recall_fscore_support(labels, chosen.predictions(probs), zero_division=np.nan,
                                                 labels=np.arange(probs.shape[1]))[:3]
    for row in ours["per_class"]:
        for name, values in zip(("precision", "recall", "f1"), oracle):
            expected = values[row["class"]]
            assert (row[name] is None) if np.isnan(expected) else row[name] == pytest.approx(expected, abs=1e-12)
    if kind == "absent":  # the class (label) the split lacks has no recall
        assert None in [row["recall"] for row in ours["per_class"]]


@pytest.mark.parametrize("task", [MULTI_CLASS, BINARY, ORDINAL, MULTI_LABEL])
def test_bootstrap_intervals_follow_each_tasks_accuracy_and_auc(task):
    """The intervals resample the task's own numbers: the mean of `image_accuracy` is its
    accuracy, the mean AUC over `roc_classes` its AUC (class 1's alone for a binary task)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    if task == MULTI_LABEL:
        labels, probs = _multilabel(rng)
    else:
        labels, probs = _single(rng, {MULTI_CLASS: 6, BINARY: 2, ORDINAL: 5}[task])
    kind = for_kind(task, tuple(f"c{k}" for k in range(probs.shape[1])))
    ours = kind.metrics(labels, probs)
    assert kind.image_accuracy(labels, probs).mean() == pytest.approx(ours["accuracy"])
    indicator = kind.indicator(labels)
    assert np.mean([roc_auc_score(indicator[:, k], probs[:, k]) for k in kind.roc_classes()]) == pytest.approx(ours["auc"])
    ci = kind.intervals(labels, probs, resamples=400, seed=0)
    assert ci["resamples"] == 400 and ci["seed"] == 0
    for key in ("accuracy", "auc"):
        assert ci[key][0] < ours[key] < ci[key][1]


@pytest.mark.parametrize("task", [MULTI_CLASS, BINARY, MULTI_LABEL])
def test_roc_curves_are_sklearns_and_binary_draws_the_class_the_auc_is_of(task):
    from sklearn.metrics import roc_auc_score

    from medcli import tables

    rng = np.random.default_rng(5)
    if task == MULTI_LABEL:
        labels, probs = _multilabel(rng, "absent")  # label 2 has no positives: no curve
    else:
        labels, probs = _single(rng, 2 if task == BINARY else 4)
    t = for_kind(task, tuple(f"c{k}" for k in range(probs.shape[1])))
    curves = tables.roc_curves(t.indicator(labels), probs, t.names, t.roc_classes())
    indicator = t.indicator(labels)
    expected = {BINARY: [1], MULTI_CLASS: [0, 1, 2, 3], MULTI_LABEL: [0, 1, 3, 4]}[task]
    assert [c["class"] for c in curves] == expected
    for c in curves:
        assert c["auc"] == pytest.approx(roc_auc_score(indicator[:, c["class"]], probs[:, c["class"]]), abs=1e-12)
    if task == BINARY:
        assert curves[0]["auc"] == pytest.approx(t.metrics(labels, probs)["auc"], abs=1e-12)


def test_a_binary_precision_recall_curve_is_of_the_finding():
    """Review: BreastMNIST's precision-recall curve and AP were of class 1, "normal, benign" (the
    majority: AP 0.91 where malignant's is 0.63), beside rates said to be of malignant."""
    from sklearn.metrics import average_precision_score

    from medcli import tables

    rng = np.random.default_rng(3)
    labels = (rng.random(156) > 0.27).astype(int)  # 27 % malignant (class 0), as BreastMNIST's test split
    p1 = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, 156), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    breast = for_kind(BINARY, ("malignant", "normal, benign"))
    (curve,) = tables.roc_curves(breast.indicator(labels), probs, breast.names, breast.roc_classes())
    assert curve["name"] == "malignant" and curve["prevalence"] == pytest.approx((labels == 0).mean())
    assert curve["ap"] == pytest.approx(average_precision_score(labels == 0, probs[:, 0]))
    assert curve["auc"] == pytest.approx(breast.metrics(labels, probs)["auc"], abs=1e-12)  # medmnist's, of class 1
    assert breast.intervals(labels, probs, resamples=50, seed=0)["auc"] == \
        pytest.approx(for_kind(BINARY, ("c0", "c1")).intervals(labels, probs, resamples=50, seed=0)["auc"])
    # review: with a saturated softmax (p1 == 1.0 exactly, p0 still 1e-20...) class 0's ranking is
    # not class 1's reversed: the intervals and paired tests stay on class 1, as the AUC is
    gaps = np.where(labels == 1, 45.0, -45.0) * np.where(rng.random(156) < 0.1, -1, 1) + rng.normal(0, 3, 156)
    saturated = np.stack([1 / (1 + np.exp(gaps)), 1 / (1 + np.exp(-gaps))], axis=1)
    assert (saturated[:, 1] == 1.0).sum() > 10
    auc = breast.metrics(labels, saturated)["auc"]
    low, high = breast.intervals(labels, saturated, resamples=200, seed=0)["auc"]
    assert low <= auc <= high
    assert breast.auc_columns() == [1]


@pytest.mark.parametrize("names, finding", [(("malignant", "normal, benign"), 0), (("normal", "pneumonia"), 1),
                                             (("c0", "c1"), 1)])
def test_binary_rates_are_of_the_finding_not_of_class_1(names, finding):
    """Review: BreastMNIST's class 1 is "normal, benign", so its "sensitivity" was the recall of
    benign lesions. The rates are of the finding (the class not named normal; class 1 when the
    names do not say), named in the metrics file; the AUC stays medmnist's (class 1's)."""
    labels = np.array([finding] * 4 + [1 - finding] * 6)
    hits = np.array([1, 1, 1, 0, 1, 1, 1, 1, 0, 0], bool)  # finding: tp 3, fn 1; other: tn 4, fp 2
    predicted = np.where(hits, labels, 1 - labels)
    p1 = np.where(predicted == 1, 0.8, 0.2)
    task = for_kind(BINARY, names)
    m = task.metrics(labels, np.stack([1 - p1, p1], 1))
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == pytest.approx((3 / 4, 4 / 6, 3 / 5, 4 / 5))
    assert m["sensitivity"] == pytest.approx(m["per_class"][finding]["recall"])
    assert task.facts() == {"positive_class": names[finding]}
    from medcli import names as display

    assert display.short_names(names) == list(names)  # "normal, benign" is not "normal"


def test_binary_rates_and_ordinal_scores_against_hand_counts():
    labels = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    p1 = np.array([0.9, 0.8, 0.3, 0.2, 0.1, 0.6, 0.4, 0.7])  # tp 3, fn 1, tn 3, fp 1
    m = for_kind(BINARY, ("benign", "malignant")).metrics(labels, np.stack([1 - p1, p1], 1))
    assert (m["sensitivity"], m["specificity"], m["ppv"], m["npv"]) == pytest.approx((0.75, 0.75, 0.75, 0.75))
    grades = np.array([0, 1, 2, 3, 4, 4])
    predicted = np.array([0, 2, 2, 1, 4, 3])
    from sklearn.metrics import cohen_kappa_score

    o = for_kind(ORDINAL, tuple("01234")).metrics(grades, np.eye(5)[predicted])
    assert o["mae"] == pytest.approx((0 + 1 + 0 + 2 + 0 + 1) / 6)
    assert o["qwk"] == pytest.approx(cohen_kappa_score(grades, predicted, weights="quadratic"))


@pytest.mark.parametrize("task", [MULTI_CLASS, BINARY, ORDINAL, MULTI_LABEL])
def test_every_monitor_has_a_value_for_every_task(task):
    """--monitor acc|auc|f1|loss picks best.pt for any task: each names a metric the task has."""
    from medcli import train
    from medcli.names import MONITORS

    rng = np.random.default_rng(0)
    labels, probs = _multilabel(rng) if task == MULTI_LABEL else _single(rng, {BINARY: 2}.get(task, 5))
    values = for_kind(task, tuple(f"c{k}" for k in range(probs.shape[1]))).metrics(labels, probs)
    for monitor in MONITORS:
        value = train.monitored(values, monitor)
        assert isinstance(value, float) and np.isfinite(value), (monitor, value)


def test_a_multilabel_mistake_is_as_confident_as_its_surest_wrong_label():
    """A sample wrong on one label at 0.99 is a more confident mistake than one wrong at 0.6,
    whatever its other labels; a right sample is as sure as its least sure label."""
    task = for_kind(MULTI_LABEL, ("a", "b", "c"))
    labels = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0]])
    probs = np.array([[0.99, 0.45, 0.1], [0.6, 0.0, 0.0], [0.8, 0.3, 0.1]])
    _, _, right, confidence = task.describe(labels, probs)
    assert right == [False, False, True]
    assert confidence == pytest.approx([0.99, 0.6, 0.7])


def test_label_matrix_metrics_by_hand():
    labels = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.6, 0.4], [0.7, 0.1], [0.2, 0.8]])  # label 0: 1 fp; label 1: 1 fn
    m = for_kind(MULTI_LABEL, ("a", "b")).metrics(labels, probs)
    assert m["accuracy"] == pytest.approx(0.75) and m["subset_accuracy"] == pytest.approx(0.5)
    assert m["label_confusion"] == [[[1, 1], [0, 2]], [[2, 0], [1, 1]]]
    assert [c["support"] for c in m["per_class"]] == [2, 2]
    # the mean over images and labels of -log p(the label's truth), written out
    by_hand = -np.mean([np.log(0.9), np.log(0.8), np.log(0.6), np.log(0.4), np.log(0.3), np.log(0.9),
                        np.log(0.8), np.log(0.8)])
    assert m["nll"] == pytest.approx(by_hand)
    t = for_kind(MULTI_LABEL, ("a", "b"))
    assert t.mistaken(labels, probs).tolist() == [False, True, True, False]
    assert t.true_class(labels, probs).tolist() == [0, 0, 0, 1]  # no labels: the most probable one


def test_multilabel_temperatures_are_per_label_and_keep_each_labels_ranking():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2000, 4))
    labels = (rng.random((2000, 4)) < metrics.sigmoid(logits)).astype(int)  # calibrated by construction
    assert metrics.fit_label_temperatures(logits, labels)[0] == pytest.approx([1.0] * 4, abs=0.15)
    sharper = logits * np.array([3.0, 1.0, 0.5, 1.0])  # over-confident, calibrated, under-confident labels
    t, skipped = for_kind(MULTI_LABEL, tuple("abcd")).fit_temperature(sharper, labels)
    assert t == pytest.approx([3.0, 1.0, 0.5, 1.0], rel=0.15) and skipped is None
    one_sided = labels.copy()
    one_sided[:, 1] = 0
    one_sided[:, 3] = sharper[:, 3] > 0
    assert for_kind(MULTI_LABEL, tuple("abcd")).fit_temperature(sharper, one_sided)[1] == (
        f"{metrics.ONE_SIDED}: b; {metrics.SEPARATED}: d")
    scaled = for_kind(MULTI_LABEL, tuple("abcd")).probabilities(sharper, t)
    assert metrics.binary_nll(labels, scaled) < metrics.binary_nll(labels, metrics.sigmoid(sharper))
    before, after = (metrics.label_matrix_metrics(labels, p)["per_class"] for p in (metrics.sigmoid(sharper), scaled))
    assert [r["auc"] for r in after] == pytest.approx([r["auc"] for r in before], abs=1e-12)
    assert metrics.temperature_text(t).endswith("(4 labels)") and metrics.temperature_text(2.0) == "2.000"


@pytest.fixture(scope="module")
def task_roots(tmp_path_factory):
    root = tmp_path_factory.mktemp("task-data")
    for flag in ("chestmnist", "breastmnist", "retinamnist"):
        datasets.make_synthetic(root / datasets.filename(flag, 28), flag, 28, (128, 48, 48), seed=1)
    return root


@pytest.mark.parametrize("flag", ["chestmnist", "breastmnist", "retinamnist"])
def test_every_command_works_for_the_task(flag, task_roots, tmp_path):
    from medmnist import Evaluator

    task = datasets.task(flag)
    trained = runner.invoke(app, ["--quiet", "train", "--dataset", flag, "--root", str(task_roots), "--runs-dir", str(tmp_path),
                                  "--model", "timm:test_resnet", "--epochs", "2", "--batch-size", "16",
                                  "--optimizer", "adamw", "--lr", "2e-3", "--warmup-epochs", "0",
                                  "--mixup-alpha", "0.2"])
    assert trained.exit_code == 0, trained.output
    run = Path(trained.stdout.strip())
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["task"] == task.kind
    assert manifest["config"]["monitor"] == ("auc" if isinstance(task, MultiLabel) else "acc")

    evaluated = runner.invoke(app, ["evaluate", str(run), "--tta", "--calibrate", "--medmnist-csv", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert "is not that file" in " ".join(evaluated.stderr.split())  # synthetic data: the evaluator's labels differ
    ours = json.loads(evaluated.stdout)["test"]
    temperature = np.asarray(ours["calibration"]["temperature"])
    assert ours["task"] == task.kind and (temperature > 0).all()
    assert temperature.shape == ((len(task.names),) if isinstance(task, MultiLabel) else ())  # one per label
    assert set(EXTRA_METRICS[task.kind]) <= set(ours["metrics"])
    # the official evaluator, reading our medmnist-layout CSV as its parse_and_evaluate does
    (csv,) = (run / "predictions" / "medmnist").glob(f"{flag}_test_*@{run.name}.csv")
    scores = pd.read_csv(csv, index_col=0, header=None).sort_index().values
    official = Evaluator(flag, "test", size=28, root=str(task_roots)).evaluate(scores)
    assert ours["metrics"]["accuracy"] == pytest.approx(official.ACC, abs=1e-6)
    assert ours["metrics"]["auc"] == pytest.approx(official.AUC, abs=1e-6)
    frame = pd.read_csv(run / "predictions" / "test.csv")
    if isinstance(task, MultiLabel):
        assert {f"true_{n}" for n in task.names} | {f"prob_{n}" for n in task.names} <= set(frame.columns)
    from openpyxl import load_workbook

    book = load_workbook(run / "report.xlsx", read_only=True)
    assert "ROC" in book.sheetnames
    # the reliability bins count label decisions (image x label) for multi-label (it said "images")
    headings = {cell for row in book["reliability"].iter_rows(values_only=True) for cell in row if isinstance(cell, str)}
    assert ("label decisions" in headings) == isinstance(task, MultiLabel) and ("images" in headings) != isinstance(task, MultiLabel)
    assert (run / "figures" / "roc_test.png").is_file()

    out = tmp_path / "cm.png"
    drawn = runner.invoke(app, ["plot-confusion", str(run / "predictions" / "test.csv"), "--out", str(out)])
    assert drawn.exit_code == 0 and out.is_file(), drawn.output

    explained = runner.invoke(app, ["--quiet", "explain", str(run), "--method", "gradcam", "--per-class", "1", "--target", "true",
                                    "--json"])
    assert explained.exit_code == 0, explained.output
    index = json.loads(explained.stdout)
    road = index["faithfulness"]  # a constant map has no score: counted apart
    assert road["n"] + road["constant"] == len(index["samples"]) >= 2 and road["n"] >= 1
    # review: the metric's name said softmax for multi-label runs too, scored on each label's sigmoid
    assert ("sigmoid of the explained label" if isinstance(task, MultiLabel) else "softmax of the explained class") \
        in index["faithfulness"]["metric"]
    if isinstance(task, MultiLabel):
        assert all(s["label_name"] in s["true_labels"] for s in index["samples"])
    with np.load(run / "explain" / "gradcam" / "maps.npz") as stored:  # aggregate --maps captions what index.json says
        assert list(stored["decided"]) == [s["decided"] for s in index["samples"]]
    named = runner.invoke(app, ["--quiet", "explain", str(run), "--method", "gradcam", "--indices", "0,1",
                                "--target", task.names[1], "--json", "--no-faithfulness", "--overwrite"])
    assert named.exit_code == 0, named.output
    assert {s["target"] for s in json.loads(named.stdout)["samples"]} == {1}

    extra = EXTRA_METRICS[task.kind][0]
    compared = runner.invoke(app, ["aggregate", str(run), "--metrics", f"accuracy,auc,{extra}", "--format", "json"])
    assert compared.exit_code == 0, compared.output
    assert extra in compared.stdout

    # predict on .npy copies of test images = evaluate's (calibrated, TTA) probabilities, through the
    # run and through its ONNX export
    images = np.load(task_roots / datasets.filename(flag, 28))["test_images"][:6]
    np.save(tmp_path / "some.npy", images)
    evaluated = calibrated_probabilities(run / "predictions" / "test.csv", slice(0, 6))
    columns = [f"prob_{n}" for n in task.names]
    exported = runner.invoke(app, ["export", str(run), "--json"])
    assert exported.exit_code == 0, exported.output
    for source in (run, json.loads(exported.stdout)["model"]):
        predicted = runner.invoke(app, ["predict", str(source), str(tmp_path / "some.npy"), "--tta", "--calibrated"])
        assert predicted.exit_code == 0, predicted.output
        frame = pd.read_csv(pd.io.common.StringIO(predicted.stdout), keep_default_na=False, dtype={"prediction": str})
        np.testing.assert_allclose(frame[columns].to_numpy(), evaluated, rtol=0, atol=1e-5)
        assert list(frame["prediction"]) == task.decision_names(evaluated)


def test_an_unknown_explain_target_is_one_line(tiny_run):
    from cli_helpers import one_line_error

    line = one_line_error(runner.invoke(app, ["explain", str(tiny_run), "--target", "neutrophilz"]), 2)
    assert "unknown --target 'neutrophilz'" in line and "basophil" in line


@pytest.mark.parametrize("flag, target, expected", [
    ("breastmnist", "normal", 1), ("breastmnist", "Normal, Benign", 1), ("breastmnist", "1", 1),
    ("bloodmnist", "immature granulocytes", 3), ("chestmnist", "pleural", 12),
])
def test_explain_targets_accept_the_names_the_error_lists(flag, target, expected):
    from medcli.datasets import class_names
    from medcli.explain import _target_class

    names = class_names(flag)
    assert _target_class(target, names) == expected
    with pytest.raises(MedcliError) as raised:
        _target_class("no such class", names)
    listed = str(raised.value).split(" or name (")[1].rstrip(")").split("; ")
    assert [_target_class(name, names) for name in listed] == list(range(len(names)))


def test_a_multilabel_label_below_the_threshold_is_not_called_a_prediction():
    """Review: predict's overlays and explain called a multi-label image's most probable label
    "pred mass (0.33)" while its CSV said no label was found. Only a decision is "pred"."""
    from medcli import tasks

    probs = np.array([[0.2, 0.33, 0.1], [0.7, 0.9, 0.1]])
    task = MultiLabel(["effusion", "mass", "edema"])
    classes = task.explained_class(probs)
    assert task.decided(probs, classes).tolist() == [False, True]
    assert task.decided(probs, np.array([0, 0])).tolist() == [False, True]
    single = MultiClass(["a", "b", "c"])
    assert single.decided(probs, single.explained_class(probs)).all()
    assert tasks.explained_text("mass", 0.33, False) == "top mass (0.33; no label found)"
    assert tasks.explained_text("mass", 0.9, True) == "pred mass (0.90)"


def test_the_decision_rule_a_model_card_gives_is_the_tasks():
    """Review: the model card said how scores become probabilities, not how they become a
    decision (a binary task's class 1 above 0.5, not the argmax; a label above 0.5)."""
    from medcli import tasks

    binary = tasks.for_kind(BINARY, ["malignant", "normal, benign"])
    assert binary.decision_rule() == "class 1 (normal, benign) when its probability is above 0.5, else class 0 (malignant)"
    assert binary.predictions(np.array([[0.6, 0.55], [0.3, 0.5]])).tolist() == [1, 0]  # not the argmax
    labels = tasks.for_kind(MULTI_LABEL, ["a", "b", "c"])
    assert labels.decision_rule() == "each label whose probability is above 0.5 present"
    assert labels.predictions(np.array([[0.7, 0.5, 0.51]])).tolist() == [[1, 0, 1]]
    for kind in (MULTI_CLASS, ORDINAL):
        task = tasks.for_kind(kind, ["a", "b", "c"])
        assert task.decision_rule() == "the class of highest probability"
        assert task.predictions(np.array([[0.2, 0.45, 0.35]])).tolist() == [1]
