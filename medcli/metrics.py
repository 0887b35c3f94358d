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

__all__ = [
    "above_threshold", "binary_nll", "binary_rates", "classification_metrics", "confusion_counts", "fit_label_temperatures",
    "fit_temperature", "label_matrix_metrics", "nll", "ordinal_scores", "per_label", "reliability", "sigmoid", "softmax",
    "temperature_text", "top_label", "THRESHOLD",
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


def brier(targets: np.ndarray, probs: np.ndarray) -> float:
    """Brier score: mean over samples of sum over columns of (p - target)^2, with one-hot
    targets for single-label tasks (0 best, 2 worst) and the 0/1 label matrix for multi-label."""
    return float(((np.asarray(probs, dtype=np.float64) - targets) ** 2).sum(axis=1).mean())


def one_hot(labels: np.ndarray, n_classes: int) -> np.ndarray:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    out = np.zeros((labels.size, n_classes))
    out[np.arange(labels.size), labels] = 1.0
    return out


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

    with warnings.catch_warnings():  # classes absent from labels or predictions: defined as 0
        warnings.simplefilter("ignore")
        p, r, f, support = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
        result = {"per_class": (p, r, f, support)}
        for avg in ("macro", "micro"):
            ap, ar, af, _ = precision_recall_fscore_support(labels, preds, labels=classes, average=avg, zero_division=0)
            result.update({f"precision_{avg}": float(ap), f"recall_{avg}": float(ar), f"f1_{avg}": float(af)})
    return result


def _per_class_rows(names: Sequence[str], scores: dict, aucs: Sequence[float | None]) -> list[dict]:
    p, r, f, support = scores.pop("per_class")
    return [{"class": k, "name": name, "precision": float(p[k]), "recall": float(r[k]), "f1": float(f[k]),
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
    {macro,micro}, loss and nll (the same cross-entropy: `loss` is the name training logs use,
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
        "brier": brier(one_hot(labels, n_classes), probs),
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
    confusion matrix (rows = true class); None where the denominator is empty."""
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
    labels), {precision,recall,f1}_{macro,micro} over labels, loss and nll (mean binary
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
        "brier": brier(labels, probs),
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


TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017);
    `fit_label_temperatures` fits one per label of sigmoid outputs. Either way each class's or
    label's ranking (its AUC) is unchanged, as is the argmax.

    A bounded 1-D search over log T within TEMPERATURE_RANGE (0.05 to 20): the NLL is smooth
    and unimodal in log T, so this is deterministic, needs no torch and no learning rate, and
    keeps T away from degenerate values. T > 1 softens an over-confident model.

    A validation split that cannot pin T down gets T = 1 (logits unchanged): one whose
    labels are all on the right side of the decision (perfectly separated, common on a
    78-image split) has its NLL falling all the way to T -> 0, and a multi-label label with
    no positive (or no negative) validation image says nothing about its ranking. The search
    would stop at the bound 0.05 and multiply the test logits by 20.
    """
    labels, logits = _fit_inputs(logits, labels)
    labels = labels.reshape(-1)
    rows = np.arange(labels.size)
    return _fit_log_temperature(lambda log_t: float(-log_softmax(logits, np.exp(log_t))[rows, labels].mean()))


def fit_label_temperatures(logits: np.ndarray, labels: np.ndarray) -> list[float]:
    """One temperature per label of (N, labels) sigmoid logits, each minimising that label's
    binary cross-entropy of sigmoid(logit / T): labels are separate yes/no decisions, over- or
    under-confident to different degrees. A label whose validation images are all positive or
    all negative says nothing about its ranking: T = 1 (see `fit_temperature`)."""
    labels, logits = _fit_inputs(logits, labels)

    def label_objective(k: int):
        return lambda log_t: float((np.logaddexp(0.0, z := logits[:, k] / np.exp(log_t)) - labels[:, k] * z).mean())

    return [_fit_log_temperature(label_objective(k)) if 0 < labels[:, k].sum() < labels.shape[0] else 1.0
            for k in range(logits.shape[1])]


def _fit_inputs(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(np.int64)
    if labels.shape[0] == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    return labels, np.asarray(logits, dtype=np.float64)


def _fit_log_temperature(objective) -> float:
    from scipy.optimize import minimize_scalar

    lower = np.log(TEMPERATURE_RANGE[0])
    found = minimize_scalar(objective, bounds=(lower, np.log(TEMPERATURE_RANGE[1])), method="bounded",
                            options={"xatol": 1e-6})
    return 1.0 if found.x < lower + 1e-3 else float(np.exp(found.x))  # at the bound: T not identified


def temperature_text(temperature: float | Sequence[float]) -> str:
    """A temperature for a log line or a table cell: "1.234", or "0.912-1.518 (14 labels)"."""
    if np.ndim(temperature) == 0:
        return f"{temperature:.3f}"
    return f"{min(temperature):.3f}-{max(temperature):.3f} ({len(temperature)} labels)"
