"""Metric values against hand-computed cases, scikit-learn and scipy, and temperature scaling
on over-confident toy logits (medmnist's own Evaluator functions: test_tasks.py)."""

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


def test_macro_recall_is_balanced_accuracy_when_a_class_is_absent():
    """Review: with a class absent from the split, balanced_accuracy (sklearn: over the classes
    present) and recall_macro (the absent class counted as recall 0) differed, though they are
    the same quantity. Both average the classes the split has."""
    from sklearn.metrics import balanced_accuracy_score

    labels = np.array([0, 0, 1, 1])
    m = metrics.classification_metrics(labels, PROBS)
    preds = PROBS.argmax(1)
    assert m["recall_macro"] == pytest.approx(m["balanced_accuracy"])
    assert m["recall_macro"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert m["per_class"][2]["support"] == 0


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
    t, skipped = metrics.fit_temperature(sharp, labels)
    assert t == pytest.approx(4.0, rel=0.15) and skipped is None
    before, after = metrics.softmax(sharp), metrics.softmax(sharp, t)
    assert metrics.nll(labels, after) < metrics.nll(labels, before)
    assert (metrics.reliability(*metrics.top_label(labels, after))["ece"]
            < metrics.reliability(*metrics.top_label(labels, before))["ece"])
    assert (after.argmax(1) == before.argmax(1)).all()  # accuracy is untouched


@pytest.mark.parametrize("scale", [1.0, 12.0, 30.0, 1000.0])
def test_a_perfectly_separated_validation_split_keeps_the_logits_whatever_their_scale(scale):
    """Issue 24: a separated split with large logits got T = 0.085 (its NLL underflowed to
    -0.0 inside the search range, so the optimum looked interior); separation is now detected
    directly, with the reason recorded."""
    logits, _ = _toy_logits(78, seed=4)
    labels = logits.argmax(1)  # every validation image right: the NLL falls all the way to T -> 0
    assert metrics.fit_temperature(logits * scale, labels) == (1.0, metrics.SEPARATED)
    multi = np.column_stack([logits[:, 0], logits[:, 1], logits[:, 2]]) * scale
    labels = np.column_stack([multi[:, 0] > 0, np.zeros(78, int), multi[:, 2] > 0])  # label 1: no positive at all
    labels[np.argmax(multi[:, 2]), 2] = 0  # label 2: one image on the wrong side, so T is fitted
    temperatures, reasons = metrics.fit_label_temperatures(multi, labels)
    assert temperatures[:2] == [1.0, 1.0] and reasons == [metrics.SEPARATED, metrics.ONE_SIDED, None]
    assert temperatures[2] != 1.0


@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_the_temperature_follows_the_scale_of_the_logits(scale):
    """The search range sits around the logits' own scale: a model with 100 x the logits needs
    100 x the temperature (the old fixed range 0.05-20 stopped at its bound)."""
    logits, labels = _toy_logits(2000, seed=5)
    sharp = logits * 3.0
    t, _ = metrics.fit_temperature(sharp, labels)
    assert metrics.fit_temperature(sharp * scale, labels) == (pytest.approx(t * scale, rel=1e-3), None)


def test_a_fitted_temperature_never_drives_the_validation_nll_to_zero():
    """One image on the wrong side is enough to keep the fit proper: its p_true <= 1/2 at every
    T, so the fitted NLL stays at least log 2 / N even with huge logits."""
    logits, _ = _toy_logits(78, seed=4)
    labels = logits.argmax(1)
    labels[0] = (labels[0] + 1) % 4
    t, skipped = metrics.fit_temperature(logits * 1000.0, labels)
    assert skipped is None
    assert metrics.nll(labels, metrics.softmax(logits * 1000.0, t)) >= math.log(2) / 78


def test_temperature_is_about_one_for_a_calibrated_model():
    logits, labels = _toy_logits(3000, seed=2)
    assert metrics.fit_temperature(logits, labels) == (pytest.approx(1.0, abs=0.15), None)


def _naive_bootstrap(correct, positive, scores, resamples, seed):
    """The same draws as `bootstrap_intervals`, scored image by image with sklearn."""
    from sklearn.metrics import roc_auc_score

    rng, n = np.random.default_rng(seed), correct.size
    draws = np.concatenate([rng.integers(0, n, size=(min(metrics.BOOTSTRAP_CHUNK, resamples - start), n))
                            for start in range(0, resamples, metrics.BOOTSTRAP_CHUNK)])
    accuracy = [correct[d].mean() for d in draws]
    auc = [np.mean([roc_auc_score(positive[d, k], scores[d, k]) for k in range(positive.shape[1])]) for d in draws]
    return np.percentile(accuracy, [2.5, 97.5]), np.percentile(auc, [2.5, 97.5])


def test_bootstrap_intervals_equal_a_resample_by_resample_computation():
    rng = np.random.default_rng(0)
    positive = np.eye(3, dtype=bool)[rng.integers(0, 3, size=300)]
    scores = np.round(positive * 0.3 + rng.random((300, 3)), 1)  # rounded: many tied scores
    correct = (rng.random(300) < 0.8).astype(float)
    ci = metrics.bootstrap_intervals(correct, positive, scores, resamples=120, seed=3)
    accuracy, auc = _naive_bootstrap(correct, positive, scores, 120, 3)
    assert ci["accuracy"] == pytest.approx(accuracy.tolist()) and ci["auc"] == pytest.approx(auc.tolist())
    assert {k: ci[k] for k in ("method", "level", "resamples", "seed")} == {
        "method": "percentile bootstrap", "level": 0.95, "resamples": 120, "seed": 3}
    assert metrics.bootstrap_intervals(correct, positive, scores, resamples=120, seed=3) == ci
    lonely = metrics.bootstrap_intervals(correct, np.zeros((300, 1), bool), scores[:, :1], resamples=10, seed=0)
    assert lonely["auc"] is None and lonely["accuracy"] is not None  # no positive: no AUC at all


def test_macro_precision_and_f1_leave_out_a_class_neither_in_the_split_nor_predicted():
    """Review: a class the split lacks and no image was predicted as counted as precision and
    F1 0, so perfect predictions scored f1_macro 0.8 (--monitor f1, aggregate's column).
    sklearn's default averages the classes in the labels or the predictions; so do we."""
    from sklearn.metrics import f1_score, precision_score

    labels = np.array([0, 1, 2, 4, 0, 1])
    for preds in (labels, np.array([0, 1, 2, 4, 3, 1])):  # perfect; then a class absent from the labels is predicted
        probs = np.eye(5)[preds] * 0.9 + 0.02
        m = metrics.classification_metrics(labels, probs)
        assert m["f1_macro"] == pytest.approx(f1_score(labels, preds, average="macro", zero_division=0))
        assert m["precision_macro"] == pytest.approx(precision_score(labels, preds, average="macro", zero_division=0))
    assert metrics.classification_metrics(labels, np.eye(5)[labels] * 0.9 + 0.02)["f1_macro"] == 1.0


def test_a_tie_with_the_true_class_keeps_the_temperature():
    """Review: one validation image whose true logit tied another class (a multi-label logit
    of exactly 0) let the NLL fall to log 2 / N and lie flat; the search stopped there at
    T = 0.02-0.04, with no reason, and held-out NLL went from 0.51 to 5.55."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 40)
    z = (2 * y - 1) * (1 + rng.random(40) * 3)
    z[0] = 0.0
    assert metrics.fit_label_temperatures(z[:, None], y[:, None]) == ([1.0], [metrics.SEPARATED])
    logits, _ = _toy_logits(40, seed=2)
    labels = logits.argmax(1)
    logits[0, (labels[0] + 1) % logits.shape[1]] = logits[0, labels[0]]  # a tie, every other image right
    assert metrics.fit_temperature(logits, labels) == (1.0, metrics.SEPARATED)


def test_equal_differences_up_to_rounding_are_not_a_significant_t_test():
    """Review: one image better in each of two seeds (120/156 - 119/156, 121/156 - 120/156)
    differs in the last bit, and the t-test gave p = 5.5e-15."""
    n = 156
    found = metrics.mean_difference([120 / n - 119 / n, 121 / n - 120 / n])
    assert found["p_value"] is None
    # review: a zero-width 95 % interval ("+5.00 points to +5.00 points") claimed certainty from two seeds
    assert found["interval"] is None
    assert metrics.mean_difference([0.0, 1e-17])["p_value"] == 1.0
    assert metrics.mean_difference([0.01, 0.02])["p_value"] is not None


def test_an_auc_interval_made_without_some_resamples_says_so(tmp_path):
    """Review: with one image of a class in 200, only 635 of 1,000 resamples held it; the AUC
    interval came from those, and every caption said "1000 resamples"."""
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(100, int), np.ones(99, int), 2]
    scores = metrics.softmax(np.eye(3)[labels] + rng.normal(0, 1, (200, 3)))
    positive = np.eye(3, dtype=bool)[labels]
    ci = metrics.bootstrap_intervals(scores.argmax(1) == labels, positive, scores, 1000, 0)
    held = sum(bool(positive[w > 0, 2].any()) for w in np.concatenate(list(metrics._resample_weights(200, 1000, 0))))
    assert ci["auc_used"] == held < 1000
    assert f"AUC of test: the {held} in which every class had positives and negatives" in \
        metrics.interval_caption({"test": ci})
    whole = metrics.bootstrap_intervals(labels == labels, np.eye(3, dtype=bool)[np.arange(200) % 3], scores, 100, 0)
    assert "auc_used" not in whole and "(" not in metrics.interval_caption({"test": whole})


def test_a_validation_split_of_one_class_keeps_t_1_and_says_why():
    """Review: a binary task whose validation split held one class only was "no optimum
    inside the search range"; nothing was ranked against anything."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(20, 2))
    assert metrics.fit_temperature(logits, np.zeros(20, dtype=int)) == (1.0, metrics.ONE_CLASS)


def test_a_model_with_one_output_for_every_image_is_not_calibrated():
    """Review: a model whose last layer was zeroed (or biased to -4 for every label) got
    T = 2.1-3.0 per label and "ECE 14.33 % -> 0.70 %" with no warning: a temperature that only
    matches the class frequencies, reported as an improvement. A model tying every class was
    told "no validation image ranked wrong". Both keep T = 1 and say why."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 50)
    labels[:3] = [0, 1, 2]
    for logits in (np.zeros((50, 3)), np.tile([50.0, 0.0, 1.0], (50, 1)), np.tile([3.0, 1.0, 2.0], (50, 1)) + 7.0):
        assert metrics.fit_temperature(logits, labels) == (1.0, metrics.CONSTANT)
    y = (rng.random((50, 3)) < 0.3).astype(int)
    y[:2] = [[1, 1, 1], [0, 0, 0]]
    z = np.column_stack([np.full(50, -4.0), np.zeros(50), rng.normal(size=50)])
    temperatures, reasons = metrics.fit_label_temperatures(z, y)
    assert temperatures[:2] == [1.0, 1.0] and reasons == [metrics.CONSTANT, metrics.CONSTANT, None]
