"""Classification and calibration metrics on plain numpy arrays (no torch).

The same functions (through `medcli.tasks`) serve training (per-epoch validation) and
`evaluate`, so a number called "balanced_accuracy" means the same thing everywhere. It works
from probabilities, not logits, so it also serves predictions read back from a CSV. Undefined
values (an AUC for a class absent from the labels) are `None`, never NaN: the result goes into
JSON, where NaN is not valid.

Temperature scaling lives here too: it is a calibration metric's fix and needs only numpy and
scipy.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from medcli.names import PERCENT_METRICS, SHOWN_DECIMALS

__all__ = [
    "above_threshold", "binary_nll", "binary_rates", "bootstrap_intervals", "classification_metrics", "confusion_counts",
    "bootstrap_test", "evaluated_with", "evaluation_settings", "fit_label_temperatures", "interval_caption",
    "interval_text", "metric_text", "mixed_evaluations", "shown_value",
    "fit_temperature", "label_matrix_metrics", "mcnemar_exact", "mean_difference", "nll", "ordinal_scores",
    "paired_bootstrap_auc", "per_label", "reliability", "sigmoid", "softmax", "temperature_applied",
    "temperature_text", "top_label", "BOOTSTRAP_CHUNK", "CONSTANT", "ONE_SIDED", "SEPARATED", "THRESHOLD",
]


ECE_BINS = 15
THRESHOLD = 0.5  # a label is predicted present above this probability (medmnist's getACC)
_EPS = 1e-12

def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of logits / temperature in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature."""
    return np.exp(log_softmax(logits, temperature))


def sigmoid(logits: np.ndarray, temperature: float | Sequence[float] = 1.0) -> np.ndarray:
    """Element-wise logistic function of logits / temperature in float64 (multi-label scores;
    a sequence of temperatures holds one per label, i.e. per column)."""
    z = np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -z))


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must have shape (N, C) with N={labels.shape[0]}; got {probs.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}; got {labels.min()}..{labels.max()}")
    return labels, probs


def _check_label_matrix(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or labels.shape != probs.shape:
        raise ValueError(f"label-matrix labels and probs must both be (N, labels); got {labels.shape} and {probs.shape}")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("a label matrix holds 0 or 1")
    return labels, probs


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood (= cross-entropy with hard labels); probs clipped at 1e-12."""
    labels, probs = _check(labels, probs)
    picked = np.clip(probs[np.arange(labels.size), labels], _EPS, 1.0)
    return float(-np.log(picked).mean())


def binary_nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean binary cross-entropy over every (sample, label) entry (= BCE-with-logits' mean)."""
    labels, probs = _check_label_matrix(labels, probs)
    p = np.clip(probs, _EPS, 1.0 - _EPS)
    return float(-(labels * np.log(p) + (1 - labels) * np.log1p(-p)).mean())


def brier(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """sklearn's Brier score of single-label decisions: the mean over samples of the squared
    errors summed over the classes (0 best, 2 worst), halved for two classes, where it is the
    usual (p - y)^2 of one probability (0 best, 1 worst)."""
    from sklearn.metrics import brier_score_loss

    if not labels.size:
        return None
    with warnings.catch_warnings():  # scores read back from a CSV need not sum to 1 (rounded, or someone's)
        warnings.simplefilter("ignore", UserWarning)
        return float(brier_score_loss(labels, probs, labels=np.arange(probs.shape[1])))


def label_brier(labels: np.ndarray, probs: np.ndarray) -> float | None:
    """A multi-label Brier score: the mean of each label's binary (p - y)^2 (0 best, 1 worst)."""
    return float(((probs - labels) ** 2).mean()) if labels.size else None


def reliability(confidence: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Confidence histogram: per equal-width bin, the count, mean confidence and accuracy.

    `confidence` and `correct` are flat arrays of one decision each (single-label: the top
    class of a sample; multi-label: each label's yes/no, with confidence max(p, 1 - p)).
    Bins are (k/n, (k+1)/n]; empty bins have confidence/accuracy None. Feeds both the ECE and
    the reliability diagram, so the figure shows exactly the numbers the ECE was computed from.
    """
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct = np.asarray(correct, dtype=np.float64).reshape(-1)
    # ceil(conf * n) - 1 puts conf in (k/n, (k+1)/n] into bin k; conf == 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = conf_sum / counts
        mean_acc = acc_sum / counts
    filled = counts > 0
    gaps = np.abs(mean_acc - mean_conf)[filled]
    ece = float((gaps * counts[filled]).sum() / max(confidence.size, 1))
    return {
        "n_bins": n_bins,
        "edges": np.linspace(0.0, 1.0, n_bins + 1).round(6).tolist(),
        "count": counts.astype(int).tolist(),
        "confidence": [float(c) if f else None for c, f in zip(mean_conf, filled)],
        "accuracy": [float(a) if f else None for a, f in zip(mean_acc, filled)],
        "ece": ece,
    }


def above_threshold(probs: np.ndarray) -> np.ndarray:
    """0/1 per entry: probability above THRESHOLD (medmnist's getACC rule for labels)."""
    return (np.asarray(probs) > THRESHOLD).astype(np.int64)


def top_label(labels: np.ndarray, probs: np.ndarray, preds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of single-label decisions `preds` (default: the argmax): the top
    class's probability."""
    labels, probs = _check(labels, probs)
    return probs.max(axis=1), (probs.argmax(axis=1) if preds is None else preds) == labels


def per_label(labels: np.ndarray, probs: np.ndarray, preds: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of multi-label decisions (default: each label at 0.5): every
    label's yes/no with confidence max(p, 1 - p)."""
    labels, probs = _check_label_matrix(labels, probs)
    preds = above_threshold(probs) if preds is None else preds
    return np.maximum(probs, 1.0 - probs).reshape(-1), (preds == labels).reshape(-1)


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Binary ROC-AUC, or None when only one class is present (AUC is undefined then)."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def _mean_if_defined(values: Sequence[float | None]) -> float | None:
    """The mean of per-class values, None if any is undefined: medmnist's getAUC averages over
    every column, and a column without both classes makes its mean undefined (NaN) too."""
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def _precision_recall_f1(labels: np.ndarray, preds: np.ndarray, classes) -> dict:
    from sklearn.metrics import precision_recall_fscore_support

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # each class's own value is undefined (NaN, reported None) where its denominator is
        # empty: precision of a class never predicted, recall of one the split lacks, F1 of one
        # in neither; the averages count those as 0, as sklearn's zero_division=0
        undefined = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=np.nan)
        p, r, f, support = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
        result = {"per_class": undefined}
        for avg in ("macro", "micro"):
            ap, ar, af, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=avg, zero_division=0)
            result.update({f"precision_{avg}": float(ap), f"recall_{avg}": float(ar), f"f1_{avg}": float(af)})
    if support.any():  # a class the split lacks has no recall: averaged over the others, as balanced accuracy
        result["recall_macro"] = float(r[support > 0].mean())
    # precision and F1 average the classes in the labels or the predictions (sklearn's default):
    # one absent from both was never wrong, and counting it 0 marked perfect predictions down
    predicted = np.asarray(preds).sum(axis=0) > 0 if np.ndim(preds) == 2 else np.isin(classes, preds)
    present = (support > 0) | predicted
    if present.any():
        result.update(precision_macro=float(p[present].mean()), f1_macro=float(f[present].mean()))
    return result


def _per_class_rows(names: Sequence[str], scores: dict, aucs: Sequence[float | None]) -> list[dict]:
    p, r, f, support = scores.pop("per_class")

    def defined(values, k):
        return None if np.isnan(values[k]) else float(values[k])

    return [{"class": k, "name": name, "precision": defined(p, k), "recall": defined(r, k), "f1": defined(f, k),
             "support": int(support[k]), "auc": aucs[k]} for k, name in enumerate(names)]


def _names(class_names: Sequence[str] | None, n: int) -> list[str]:
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    if len(names) != n:
        raise ValueError(f"{len(names)} class names for {n} probability columns")
    return names


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None,
    preds: np.ndarray | None = None, auc_class: int | None = None,
) -> dict:
    """Every metric medcli reports for single-label decisions, as a JSON-ready dict (the task
    classes of `medcli.tasks` pass their decisions and add their own metrics).

    `accuracy` and `auc` are defined exactly as medmnist's `getACC` / `getAUC` when `preds`
    follows the task's rule (default: the argmax) and `auc_class` names the class whose AUC is
    the task's (binary-class: the last), else the AUC is the mean one-vs-rest AUC over every
    class (None, where getAUC gives NaN, when a class is absent from the labels; each class's
    own AUC is in `per_class`). Also: n, balanced_accuracy, {precision,recall,f1}_
    {macro,micro} (recall_macro over the classes the split has, so it is balanced_accuracy;
    precision and F1 over those in the labels or predictions, as sklearn), loss and nll (the same cross-entropy: `loss` is the name training logs use,
    `nll` the calibration name), ece (15 bins), brier, per_class (name, precision, recall, f1,
    support, auc) and confusion_matrix (counts, rows = true class).
    Costs a few ms on 2k samples, so it is fine to call every epoch.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    labels, probs = _check(labels, probs)
    n_classes = probs.shape[1]
    names = _names(class_names, n_classes)
    preds = probs.argmax(axis=1) if preds is None else np.asarray(preds)
    classes = np.arange(n_classes)
    scores = _precision_recall_f1(labels, preds, classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        balanced = float(balanced_accuracy_score(labels, preds)) if labels.size else None
    per_class_auc = [_auc(labels == k, probs[:, k]) for k in classes]
    auc = _mean_if_defined(per_class_auc) if auc_class is None else per_class_auc[auc_class]
    cross_entropy = nll(labels, probs)
    confidence, correct = top_label(labels, probs, preds)
    result = {
        "n": int(labels.size),
        "accuracy": float(correct.mean()) if labels.size else None,
        "balanced_accuracy": balanced,
        "auc": auc,
        "loss": cross_entropy,
        "nll": cross_entropy,
        "ece": reliability(confidence, correct)["ece"],
        "brier": brier(labels, probs),
    }
    result.update(scores)
    cm = confusion_matrix(labels, preds, labels=classes)
    result["per_class"] = _per_class_rows(names, scores, per_class_auc)
    result["confusion_matrix"] = cm.tolist()
    return result


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def binary_rates(cm: np.ndarray) -> dict:
    """Sensitivity, specificity, PPV and NPV of class 1 (the positive finding) from a 2x2
    confusion matrix (rows = true class; `tasks.Binary` puts its finding second); None where
    the denominator is empty."""
    (tn, fp), (fn, tp) = cm
    return {"sensitivity": _ratio(tp, tp + fn), "specificity": _ratio(tn, tn + fp),
            "ppv": _ratio(tp, tp + fp), "npv": _ratio(tn, tn + fn)}


def ordinal_scores(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> dict:
    """Mean absolute error in grades, and Cohen's kappa with quadratic weights (the usual
    agreement score for graded labels such as diabetic-retinopathy severity)."""
    from sklearn.metrics import cohen_kappa_score

    if not labels.size:
        return {"mae": None, "qwk": None}
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        kappa = cohen_kappa_score(labels, preds, labels=np.arange(n_classes), weights="quadratic")
    return {"mae": float(np.abs(labels - preds).mean()), "qwk": float(kappa) if np.isfinite(kappa) else None}


def label_matrix_metrics(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None,
                       preds: np.ndarray | None = None) -> dict:
    """Every metric medcli reports for a multi-label task (ChestMNIST: 14 findings, any number
    of them per image), with each label's yes/no decided at probability 0.5 (or `preds`).

    `accuracy` and `auc` are medmnist's: the mean over labels of each label's accuracy, and
    the mean over labels of each label's AUC (None when a label lacks positives or
    negatives). Also: subset_accuracy (every label right), balanced_accuracy (mean over
    labels), {precision,recall,f1}_{macro,micro} over labels (recall_macro over the labels
    with positives: the others have no recall), loss and nll (mean binary
    cross-entropy per entry, as training's BCE), ece over every (sample, label) decision,
    brier, per_class (name, precision, recall, f1, support = positives, auc) and
    label_confusion (per label [[tn, fp], [fn, tp]]).
    """
    labels, probs = _check_label_matrix(labels, probs)
    names = _names(class_names, probs.shape[1])
    preds = above_threshold(probs) if preds is None else np.asarray(preds)
    matrices = [confusion_counts(labels[:, k], preds[:, k], 2) for k in range(probs.shape[1])]
    # sklearn's multi-label path: a label indicator matrix, one "class" per label
    scores = _precision_recall_f1(labels, preds, np.arange(probs.shape[1]))
    per_label_auc = [_auc(labels[:, k] == 1, probs[:, k]) for k in range(probs.shape[1])]
    confidence, correct = per_label(labels, probs, preds)
    balanced = [np.mean([r for r in (_ratio(m[1][1], m[1].sum()), _ratio(m[0][0], m[0].sum())) if r is not None])
                for m in matrices]
    loss = binary_nll(labels, probs)
    result = {
        "n": int(labels.shape[0]),
        "accuracy": float((preds == labels).mean(axis=0).mean()) if labels.size else None,
        "subset_accuracy": float((preds == labels).all(axis=1).mean()) if labels.size else None,
        "balanced_accuracy": float(np.mean(balanced)) if labels.size else None,
        "auc": _mean_if_defined(per_label_auc),
        "loss": loss,
        "nll": loss,
        "ece": reliability(confidence, correct)["ece"],
        "brier": label_brier(labels, probs),
    }
    result.update(scores)
    result["per_class"] = _per_class_rows(names, scores, per_label_auc)
    result["label_confusion"] = [m.tolist() for m in matrices]
    return result


def confusion_counts(labels: np.ndarray, preds: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class (numpy only; for one yes/no decision,
    n_classes 2: [[tn, fp], [fn, tp]])."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)), 1)
    return cm


BOOTSTRAP_CHUNK = 20  # resamples scored at once: a few (chunk, N) arrays, small enough to stay in cache


def bootstrap_intervals(correct: np.ndarray, positive: np.ndarray, scores: np.ndarray, resamples: int, seed: int,
                        level: float = 0.95) -> dict:
    """Percentile-bootstrap confidence intervals of accuracy and AUC over a split's images.

    `correct` (N,): each image's share of right decisions (their mean is the accuracy);
    `positive` (N, K) booleans and `scores` (N, K): the columns whose one-vs-rest AUCs average
    into the AUC (`tasks.Task.intervals` passes its task's). Each of `resamples` resamples
    draws N images with replacement (numpy's generator seeded with `seed`), kept as counts
    per image: accuracy is then a weighted mean, and AUC the weighted Mann-Whitney statistic
    over scores sorted once, ties counting one half, with no sort per resample. A resample in
    which a column lacks positives or negatives has no AUC and is left out (`auc_used` counts
    the others where there are fewer than `resamples`); the AUC interval is None where the
    whole split lacks them.
    """
    correct = np.asarray(correct, dtype=np.float64)
    positive, scores = np.asarray(positive, dtype=bool), np.asarray(scores, dtype=np.float64)
    n = correct.size
    columns = [_score_order(positive[:, k], scores[:, k]) for k in range(positive.shape[1])]
    has_auc = n > 0 and bool(columns) and all(0 < column[1].size < n for column in columns)
    accuracy, auc = [], []
    for weights in _resample_weights(n, resamples, seed):
        accuracy.append(weights @ correct / n)
        if has_auc:
            auc.append(np.mean([_weighted_auc(weights, *column) for column in columns], axis=0))
    tail = 50.0 * (1.0 - level)

    def finite(values: list):
        values = np.concatenate(values) if values else np.empty(0)
        return values[np.isfinite(values)]

    accuracy, auc = finite(accuracy), finite(auc)
    return {"method": "percentile bootstrap", "level": level, "resamples": resamples, "seed": seed,
            "accuracy": np.percentile(accuracy, [tail, 100.0 - tail]).tolist() if accuracy.size else None,
            "auc": np.percentile(auc, [tail, 100.0 - tail]).tolist() if auc.size else None,
            **({"auc_used": int(auc.size)} if has_auc and auc.size < resamples else {})}


def interval_caption(cis: dict[str, dict]) -> str:
    """What the intervals of `bootstrap_intervals` are (split -> its `ci`), for a table's
    caption: and with how many resamples a split's AUC interval was made where some lacked a
    class (a conditional interval)."""
    ci = next(iter(cis.values()))
    fewer = "; ".join(f"AUC of {split}: the {c['auc_used']} in which every class had positives and negatives"
                      for split, c in cis.items() if c.get("auc_used") is not None)
    return (f"{ci['level']:.0%} CI: {ci['method']} over the images, {ci['resamples']} resamples, seed {ci['seed']}"
            + (f" ({fewer})" if fewer else ""))


def _score_order(positive: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, ...]:
    """One column prepared for `_weighted_auc`: its negatives and its positives (image indices)
    in score order, and for each positive how many negatives score below it (`lo`) and not
    above it (`hi`)."""
    order = np.argsort(score, kind="stable")
    ranked, is_positive = score[order], positive[order]
    negative_scores, positive_scores = ranked[~is_positive], ranked[is_positive]
    return (order[~is_positive], order[is_positive], np.searchsorted(negative_scores, positive_scores, side="left"),
            np.searchsorted(negative_scores, positive_scores, side="right"))


def _weighted_auc(weights: np.ndarray, negatives: np.ndarray, positives: np.ndarray, lo: np.ndarray,
                  hi: np.ndarray) -> np.ndarray:
    """ROC-AUC per row of `weights` (B, N) (each image counted that many times): the weighted
    share of positive-negative pairs ordered right, ties one half; NaN for a row without a
    positive or a negative. One running sum over the negatives in score order (`_score_order`)
    gives each positive the weight of the negatives below it: integer counts keep it exact."""
    below = np.zeros((weights.shape[0], negatives.size + 1), dtype=weights.dtype)
    np.cumsum(weights[:, negatives], axis=1, out=below[:, 1:])
    pos = weights[:, positives]
    pairs = np.einsum("bn,bn->b", pos, below[:, lo] + below[:, hi], dtype=np.float64) / 2  # a tie counts one half
    with np.errstate(invalid="ignore", divide="ignore"):
        return pairs / (pos.sum(axis=1, dtype=np.float64) * below[:, -1])


TEMPERATURE_SPAN = 1e3  # T is searched within scale / 1000 .. scale * 1000 (scale: the logits' RMS)
SEPARATED = "no validation image ranked wrong"
ONE_SIDED = "validation images all positive or all negative"
ONE_CLASS = "validation images all of one class"
AT_BOUND = "no optimum inside the search range"
CONSTANT = "every validation image has the same scores (the model ranks none above another)"


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> tuple[float, str | None]:
    """(T, None) with T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017), or
    (1.0, reason) where the validation split cannot pin T down; `fit_label_temperatures` fits
    one per label of sigmoid outputs. The argmax and each label's ranking (its AUC) are
    unchanged; a softmax's one-vs-rest AUC may move a little (each sample's scores are
    rescaled differently), so `evaluate` keeps the model's own. T > 1 softens an
    over-confident model.

    A bounded 1-D search over log T around the logits' own scale (TEMPERATURE_SPAN either
    side), so fitting 100 x the logits gives 100 x the temperature: the NLL is smooth and
    unimodal in log T, so this is deterministic and needs no torch and no learning rate.

    A perfectly separated split (every validation image's true class above every other
    class, common on a 78-image split) has its NLL falling all the way to T -> 0: the search
    would stop wherever the NLL underflows to 0 (a "fitted" NLL of -0.0 and an ECE of 0) and
    sharpen the test logits by that factor. So has a split whose true classes are at worst
    tied with another class (the NLL falls towards log 2 / N and then lies flat, and the
    search stopped anywhere on that stretch: T = 0.04 once). Both are detected directly,
    whatever the logits' scale, and keep T = 1. Any other split has an image whose true class
    is below another, so the NLL rises again as T -> 0 and has an optimum. An optimum at the
    edge of the search range is not trusted either. Nor is a model that gives every image the
    same scores (a zeroed last layer): T would only match the class frequencies (CONSTANT).
    """
    labels, logits = _fit_inputs(logits, labels)
    labels = labels.reshape(-1)
    if np.unique(labels).size == 1:  # nothing ranked against anything: no temperature to learn
        return 1.0, ONE_CLASS
    if _constant(logits - logits.mean(axis=1, keepdims=True)):  # one softmax for all: T would fit the class frequencies
        return 1.0, CONSTANT
    rows = np.arange(labels.size)
    others = np.where(np.arange(logits.shape[1]) == labels[:, None], -np.inf, logits)
    if (logits[rows, labels] >= others.max(axis=1)).all():
        return 1.0, SEPARATED
    return _fit_log_temperature(lambda log_t: float(-log_softmax(logits, np.exp(log_t))[rows, labels].mean()),
                                logits - logits.mean(axis=1, keepdims=True))


def fit_label_temperatures(logits: np.ndarray, labels: np.ndarray) -> tuple[list[float], list[str | None]]:
    """One temperature per label of (N, labels) sigmoid logits, each minimising that label's
    binary cross-entropy of sigmoid(logit / T): labels are separate yes/no decisions, over- or
    under-confident to different degrees. Returns (temperatures, reasons): a label whose
    validation images are all positive or all negative says nothing about its ranking, one
    whose images all get the same score ranks none (CONSTANT), and one whose images all lie on
    the right side of 0 is separated (see `fit_temperature`); each keeps T = 1 with its reason."""
    labels, logits = _fit_inputs(logits, labels)
    fits = [_fit_label(logits[:, k], labels[:, k]) for k in range(logits.shape[1])]
    return [t for t, _ in fits], [reason for _, reason in fits]


def _fit_label(z: np.ndarray, y: np.ndarray) -> tuple[float, str | None]:
    if y.all() or not y.any():
        return 1.0, ONE_SIDED
    if _constant(z[:, None]):
        return 1.0, CONSTANT
    if ((2 * y - 1) * z >= 0).all():  # right, or on the fence (0), for every image
        return 1.0, SEPARATED
    return _fit_log_temperature(lambda log_t: float((np.logaddexp(0.0, s := z / np.exp(log_t)) - y * s).mean()), z)


def _constant(scores: np.ndarray) -> bool:
    """Whether every row of (N, K) scores is the same, up to rounding."""
    return bool(np.ptp(scores, axis=0).max() <= 1e-9 * max(1.0, float(np.abs(scores).max())))


def _fit_inputs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    return labels, np.asarray(logits, dtype=np.float64)


def _fit_log_temperature(objective, centred: np.ndarray) -> tuple[float, str | None]:
    """Minimise `objective(log T)` within TEMPERATURE_SPAN of the scale (RMS) of the `centred` logits."""
    from scipy.optimize import minimize_scalar

    scale = float(np.sqrt(np.mean(centred ** 2)))
    lower, upper = (np.log(scale or 1.0) + side * np.log(TEMPERATURE_SPAN) for side in (-1, 1))
    found = minimize_scalar(objective, bounds=(lower, upper), method="bounded", options={"xatol": 1e-6})
    if min(found.x - lower, upper - found.x) < 1e-3:
        return 1.0, AT_BOUND
    return float(np.exp(found.x)), None


def temperature_text(temperature: float | Sequence[float]) -> str:
    """A temperature for a log line or a table cell: "1.234", or "0.912-1.518 (14 labels)"."""
    if np.ndim(temperature) == 0:
        return f"{temperature:.3f}"
    return f"{min(temperature):.3f}-{max(temperature):.3f} ({len(temperature)} labels)"


def temperature_applied(calibration: dict | None) -> bool:
    """Whether an evaluation's `calibration` scaled anything: a temperature other than 1 (a
    skipped fit keeps T = 1, for a multi-label task only for the labels it skipped)."""
    return bool(calibration) and bool(np.any(np.asarray(calibration.get("temperature", 1.0)) != 1.0))


def evaluation_settings(result: dict) -> list[str]:
    """How a split was evaluated (a metrics JSON as evaluate writes it): the checkpoint, then
    "tta" (more views than the image alone) and "calibrated" (a temperature other than 1)
    where they apply."""
    tta = len((result.get("tta") or {}).get("views", [])) > 1
    return ([result.get("checkpoint", "?")] + (["tta"] if tta else [])
            + (["calibrated"] if temperature_applied(result.get("calibration")) else []))


def evaluated_with(result: dict) -> str:
    """`evaluation_settings` in words, with the md5 of the file the split was scored on."""
    settings = evaluation_settings(result)
    md5 = (result.get("dataset") or {}).get("md5")
    return (f"checkpoint {settings[0]}, " + ("the test-time views" if "tta" in settings else "the image alone") + ", "
            + ("temperature-scaled" if "calibrated" in settings else "not scaled")
            + (f", data md5 {md5[:8]}" if md5 else ""))


def mixed_evaluations(results: dict[str, dict]) -> str | None:
    """A sentence when the splits shown side by side (split -> metrics JSON) were evaluated
    differently (an `evaluate --split val` beside an `evaluate --tta --calibrate` of test);
    None when they compare like for like."""
    described = {split: evaluated_with(result) for split, result in results.items()} if len(results) > 1 else {}
    if len(set(described.values())) < 2:
        return None
    return ("the splits were evaluated differently (" + "; ".join(f"{s}: {d}" for s, d in described.items())
            + "): their columns do not compare like for like; evaluate them with the same options to compare them")


def shown_value(key: str, value: float) -> float:
    """A metric's value as `metric_text` shows it (91.23 % -> 91.23; 0.95125 -> 0.9512, rounded as
    the format rounds): what tables rank."""
    return float(f"{value * 100:.{SHOWN_DECIMALS - 2}f}" if key in PERCENT_METRICS else f"{value:.{SHOWN_DECIMALS}f}")


def metric_text(key: str, value) -> str:
    """A metric for a table cell: percent metrics in %, the others to 4 decimals, n/a for None."""
    if value is None:
        return "n/a"
    return f"{value:.{SHOWN_DECIMALS - 2}%}" if key in PERCENT_METRICS else f"{value:.{SHOWN_DECIMALS}f}"


def interval_text(key: str, bounds: list[float] | None) -> str:
    """A bootstrap interval for a table cell: "80.00% - 90.00%", or n/a."""
    return "n/a" if bounds is None else f"{metric_text(key, bounds[0])} - {metric_text(key, bounds[1])}"


# -- two classifiers on the same images (`aggregate`'s paired tests) ----------------------------
def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict:
    """McNemar's exact test of two classifiers' accuracy on the same images.

    `correct_a`, `correct_b` (N,): whether each image is decided right. Only the discordant
    images count: `only_a` right by A alone, `only_b` by B alone; under equal accuracy
    only_a ~ Binomial(only_a + only_b, 1/2), and the p-value is scipy's two-sided exact
    binomial test (1.0 when no image is discordant).
    """
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a, dtype=bool).reshape(-1), np.asarray(correct_b, dtype=bool).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"both classifiers must be scored on the same images; got {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    p_value = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"test": "McNemar exact", "n": int(a.size), "accuracy_a": float(a.mean()) if a.size else None,
            "accuracy_b": float(b.mean()) if b.size else None, "only_a": only_a, "only_b": only_b,
            "p_value": float(p_value)}


def paired_bootstrap_auc(positive: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, resamples: int, seed: int,
                         level: float = 0.95) -> dict:
    """Paired bootstrap of the AUC difference A - B on the same images.

    `positive` (N, K) and `scores_a`, `scores_b` (N, K): the columns whose one-vs-rest AUCs
    average into the task's AUC (as in `bootstrap_intervals`). Each resample draws N images
    with replacement (seeded) and scores both classifiers on that same draw, so what the
    images share cancels out. Returns both AUCs and their difference on all images, the
    percentile interval of the difference, and the two-sided p-value 2 x min of (1 + resampled
    differences <= 0) and (1 + those >= 0) over (1 + resamples used), capped at 1: never below
    what the resamples can resolve (2 / 2,001 for 2,000). Resamples in which a column lacks
    positives or negatives are left out (`used` counts the rest).
    """
    positive = np.asarray(positive, dtype=bool)
    n = positive.shape[0]
    columns = [[_score_order(positive[:, k], np.asarray(s, dtype=np.float64)[:, k]) for k in range(positive.shape[1])]
               for s in (scores_a, scores_b)]

    def auc(weights: np.ndarray, model: int) -> np.ndarray:
        return np.mean([_weighted_auc(weights, *column) for column in columns[model]], axis=0)

    everything = np.ones((1, n))
    auc_a, auc_b = float(auc(everything, 0)[0]), float(auc(everything, 1)[0])
    base = {"test": "paired bootstrap", "resamples": resamples, "seed": seed, "level": level,
            "auc_a": auc_a if np.isfinite(auc_a) else None, "auc_b": auc_b if np.isfinite(auc_b) else None}
    if not (np.isfinite(auc_a) and np.isfinite(auc_b)):
        return {**base, "difference": None, "interval": None, "p_value": None, "used": 0}
    differences = np.concatenate([auc(w, 0) - auc(w, 1) for w in _resample_weights(n, resamples, seed)])
    differences = differences[np.isfinite(differences)]
    return {**base, "difference": auc_a - auc_b, "used": int(differences.size),
            **dict(zip(("interval", "p_value"), bootstrap_test(differences, level)))}


def bootstrap_test(differences: np.ndarray, level: float) -> tuple[list[float] | None, float | None]:
    """The interval and two-sided p-value of resampled differences (A - B): p = 2 (1 + the
    resamples on the far side of 0, 0 included) / (B + 1); the interval's ends are order
    statistics (Davison & Hinkley's (B + 1) a / 2-th), the k-th from each end, k the most
    resamples on one side of 0 with which p < 1 - level: it leaves out 0 exactly when p does
    (an interpolated percentile could at p 0.051). No interval where no count gives such a p
    (too few resamples); neither without resamples."""
    d = np.sort(np.asarray(differences, dtype=np.float64))
    used = d.size
    if not used:
        return None, None
    p_value = min(1.0, 2.0 * (1 + min((d <= 0).sum(), (d >= 0).sum())) / (used + 1))
    k = int(np.ceil(round((1.0 - level) * (used + 1) / 2 - 1, 9))) - 1  # integer-exact: 49.99999999 is 50
    return ([float(d[k]), float(d[used - 1 - k])] if 0 <= k < used else None), p_value


def _resample_weights(n: int, resamples: int, seed: int):
    """Bootstrap resamples of n images as counts per image, BOOTSTRAP_CHUNK rows (resamples) at a
    time: numpy's generator seeded with `seed` draws n images with replacement per row."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples if n else 0, BOOTSTRAP_CHUNK):
        chunk = min(BOOTSTRAP_CHUNK, resamples - start)
        draws = rng.integers(0, n, size=(chunk, n)) + n * np.arange(chunk)[:, None]
        yield np.bincount(draws.reshape(-1), minlength=chunk * n).reshape(chunk, n).astype(np.int32)


def mean_difference(differences: Sequence[float], level: float = 0.95) -> dict:
    """Mean of paired differences (A - B, one per seed) with its Student-t interval and the
    paired t-test's two-sided p-value (n - 1 degrees of freedom; needs n >= 2). Differences
    that do not vary (up to rounding: 1/156 + 120/156 - 120/156 is not exactly 1/156) give no
    interval (None: a zero-width one would claim certainty from two seeds), and p 1.0 (mean
    0) or None (no test: two equal differences are no evidence of a certain one)."""
    from scipy import stats

    d = np.asarray(differences, dtype=np.float64).reshape(-1)
    if d.size < 2:
        raise ValueError("a t-interval needs at least two paired differences")
    mean, std = float(d.mean()), float(d.std(ddof=1))
    error = std / np.sqrt(d.size)
    rounding = 1e-9 * max(1.0, float(np.abs(d).max()))
    if std <= rounding:
        interval, p_value = None, 1.0 if abs(mean) <= rounding else None
    else:
        half = float(stats.t.ppf(0.5 + level / 2, d.size - 1) * error)
        interval, p_value = [mean - half, mean + half], float(2 * stats.t.sf(abs(mean) / error, d.size - 1))
    return {"test": "paired t", "n": int(d.size), "mean": mean, "std": std, "level": level,
            "interval": interval, "p_value": p_value}
