"""Metric values against hand-computed cases, medmnist's own Evaluator functions, and
temperature scaling on over-confident toy logits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medcli import metrics

# Four samples, three classes; predictions 0, 1, 1, 2 (the second sample is wrong).
LABELS = np.array([0, 0, 1, 2])
PROBS = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]])


def test_hand_computed_three_class_case():
    m = metrics.classification_metrics(LABELS, PROBS, ["a", "b", "c"])
    assert m["n"] == 4
    assert m["accuracy"] == pytest.approx(0.75)
    # per class: a P=1 R=1/2, b P=1/2 R=1, c P=R=1
    assert [c["precision"] for c in m["per_class"]] == pytest.approx([1.0, 0.5, 1.0])
    assert [c["recall"] for c in m["per_class"]] == pytest.approx([0.5, 1.0, 1.0])
    assert [c["f1"] for c in m["per_class"]] == pytest.approx([2 / 3, 2 / 3, 1.0])
    assert [c["support"] for c in m["per_class"]] == [2, 1, 1]
    assert [c["name"] for c in m["per_class"]] == ["a", "b", "c"]
    assert m["precision_macro"] == pytest.approx(2.5 / 3)
    assert m["recall_macro"] == pytest.approx(2.5 / 3)
    assert m["balanced_accuracy"] == pytest.approx(2.5 / 3)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert m["f1_micro"] == m["precision_micro"] == m["recall_micro"] == pytest.approx(0.75)
    expected_nll = -(math.log(0.7) + math.log(0.4) + math.log(0.6) + math.log(0.7)) / 4
    assert m["nll"] == m["loss"] == pytest.approx(expected_nll)
    assert m["brier"] == pytest.approx((0.14 + 0.62 + 0.24 + 0.14) / 4)
    # every sample sits alone in its confidence bin: (|1-.7|*2 + |0-.5| + |1-.6|) / 4
    assert m["ece"] == pytest.approx(0.375)
    assert m["auc"] == pytest.approx(1.0)  # each class's positives outscore its negatives
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]


def test_binary_auc_is_plain_auc_of_class_one():
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    m = metrics.classification_metrics(labels, np.stack([1 - p1, p1], axis=1))
    assert m["auc"] == pytest.approx(0.75)  # 3 of the 4 positive/negative pairs ordered right


def test_absent_class_gives_none_not_a_crash():
    m = metrics.classification_metrics(np.array([0, 0, 1, 1]), PROBS)
    assert m["per_class"][2]["auc"] is None and m["per_class"][2]["support"] == 0
    assert m["per_class"][0]["auc"] is not None
    assert m["auc"] is None  # medmnist's getAUC averages every class: undefined (NaN) with one absent
    single = metrics.classification_metrics(np.zeros(4, dtype=int), PROBS)
    assert single["auc"] is None and single["accuracy"] == pytest.approx(0.25)


def test_reliability_bins_cover_every_sample_including_confidence_one():
    probs = np.array([[1.0, 0.0], [0.5, 0.5], [0.9, 0.1]])
    bins = metrics.reliability(*metrics.top_label(np.array([0, 1, 1]), probs))
    assert sum(bins["count"]) == 3
    assert bins["count"][-1] == 1 and bins["count"][7] == 1  # 1.0 -> last bin, 0.5 -> (7/15, 8/15]
    assert bins["accuracy"][0] is None  # empty bins are None, not NaN


def _toy_logits(n: int, seed: int):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, 4))
    labels = np.array([rng.choice(4, p=p) for p in metrics.softmax(logits)])  # calibrated by construction
    return logits, labels


def test_temperature_scaling_fixes_an_over_confident_model():
    logits, labels = _toy_logits(3000, seed=1)
    sharp = logits * 4.0  # same ranking, four times too confident
    t = metrics.fit_temperature(sharp, labels)
    assert t == pytest.approx(4.0, rel=0.15)
    before, after = metrics.softmax(sharp), metrics.softmax(sharp, t)
    assert metrics.nll(labels, after) < metrics.nll(labels, before)
    assert (metrics.reliability(*metrics.top_label(labels, after))["ece"]
            < metrics.reliability(*metrics.top_label(labels, before))["ece"])
    assert (after.argmax(1) == before.argmax(1)).all()  # accuracy is untouched


def test_a_perfectly_separated_validation_split_keeps_the_logits():
    logits, _ = _toy_logits(78, seed=4)
    labels = logits.argmax(1)  # every validation image right: the NLL falls all the way to T -> 0
    assert metrics.fit_temperature(logits, labels) == 1.0
    multi = np.column_stack([logits[:, 0], logits[:, 1]])
    one_sided = np.column_stack([multi[:, 0] > 0, np.zeros(78, int)])  # label 1: no positive at all
    assert metrics.fit_label_temperatures(multi, one_sided) == [1.0, 1.0]


def test_temperature_is_about_one_for_a_calibrated_model():
    logits, labels = _toy_logits(3000, seed=2)
    assert metrics.fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.15)
