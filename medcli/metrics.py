"""Classification and calibration metrics on plain numpy arrays (no torch).

One function, `classification_metrics`, is shared by training (per-epoch validation) and
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


ECE_BINS = 15
_EPS = 1e-12

def log_softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise log-softmax of logits / temperature in float64, stable for large logits."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of logits / temperature."""
    return np.exp(log_softmax(logits, temperature))


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
        raise ValueError(f"probs must have shape (N, C) with N={labels.shape[0]}; got {probs.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1}; got {labels.min()}..{labels.max()}")
    return labels, probs


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean negative log-likelihood (= cross-entropy with hard labels); probs clipped at 1e-12."""
    labels, probs = _check(labels, probs)
    picked = np.clip(probs[np.arange(labels.size), labels], _EPS, 1.0)
    return float(-np.log(picked).mean())


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
    """Multi-class Brier score: mean over samples of sum_c (p_c - onehot_c)^2 (0 best, 2 worst)."""
    labels, probs = _check(labels, probs)
    onehot = np.zeros_like(probs)
    onehot[np.arange(labels.size), labels] = 1.0
    return float(((probs - onehot) ** 2).sum(axis=1).mean())


def reliability(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict:
    """Top-label confidence histogram: per equal-width bin, the count, mean confidence and accuracy.

    Bins are (k/n, (k+1)/n]; empty bins have confidence/accuracy None. Feeds both the ECE and the
    reliability diagram, so the figure shows exactly the numbers the ECE was computed from.
    """
    labels, probs = _check(labels, probs)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # ceil(conf * n) - 1 puts conf in (k/n, (k+1)/n] into bin k; conf == 0 goes to bin 0.
    index = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(index, minlength=n_bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(index, weights=correct.astype(np.float64), minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = conf_sum / counts
        mean_acc = acc_sum / counts
    filled = counts > 0
    gaps = np.abs(mean_acc - mean_conf)[filled]
    ece = float((gaps * counts[filled]).sum() / max(labels.size, 1))
    return {
        "n_bins": n_bins,
        "edges": np.linspace(0.0, 1.0, n_bins + 1).round(6).tolist(),
        "count": counts.astype(int).tolist(),
        "confidence": [float(c) if f else None for c, f in zip(mean_conf, filled)],
        "accuracy": [float(a) if f else None for a, f in zip(mean_acc, filled)],
        "ece": ece,
    }


def ece(labels: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error: bin-weighted mean |accuracy - confidence| over 15 equal bins."""
    return reliability(labels, probs, n_bins)["ece"]


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    """Binary ROC-AUC, or None when only one class is present (AUC is undefined then)."""
    from sklearn.metrics import roc_auc_score

    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str] | None = None
) -> dict:
    """Every metric medcli reports for single-label classification, as a JSON-ready dict.

    Keys: n, accuracy, balanced_accuracy, {precision,recall,f1}_{macro,micro}, auc (macro
    one-vs-rest over the classes present in `labels`; plain AUC of class 1 for two classes;
    None if undefined), loss and nll (the same cross-entropy: `loss` is the name training logs
    use, `nll` the calibration name), ece (15 bins), brier, per_class (name, precision, recall,
    f1, support, auc) and confusion_matrix (counts, rows = true class). Costs a few ms on 2k
    samples, so it is fine to call every epoch.
    """
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    labels, probs = _check(labels, probs)
    n_classes = probs.shape[1]
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} probability columns")
    preds = probs.argmax(axis=1)
    classes = np.arange(n_classes)

    with warnings.catch_warnings():  # classes absent from labels or predictions: defined as 0
        warnings.simplefilter("ignore")
        p, r, f, support = precision_recall_fscore_support(labels, preds, labels=classes, zero_division=0)
        averaged = {
            avg: precision_recall_fscore_support(labels, preds, labels=classes, average=avg, zero_division=0)[:3]
            for avg in ("macro", "micro")
        }
        balanced = float(balanced_accuracy_score(labels, preds)) if labels.size else None

    per_class_auc = [_auc(labels == k, probs[:, k]) for k in classes]
    if n_classes == 2:
        auc = per_class_auc[1]
    else:
        defined = [a for a in per_class_auc if a is not None]
        auc = float(np.mean(defined)) if defined else None

    cross_entropy = nll(labels, probs)
    result = {
        "n": int(labels.size),
        "accuracy": float((preds == labels).mean()) if labels.size else None,
        "balanced_accuracy": balanced,
        "auc": auc,
        "loss": cross_entropy,
        "nll": cross_entropy,
        "ece": ece(labels, probs),
        "brier": brier(labels, probs),
    }
    for avg, (ap, ar, af) in averaged.items():
        result.update({f"precision_{avg}": float(ap), f"recall_{avg}": float(ar), f"f1_{avg}": float(af)})
    result["per_class"] = [
        {"class": int(k), "name": names[k], "precision": float(p[k]), "recall": float(r[k]),
         "f1": float(f[k]), "support": int(support[k]), "auc": per_class_auc[k]}
        for k in classes
    ]
    result["confusion_matrix"] = confusion_matrix(labels, preds, labels=classes).tolist()
    return result


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    A bounded 1-D search over log T in [log 0.05, log 20]: the NLL is smooth and unimodal in
    log T, so this is deterministic, needs no torch and no learning rate, and keeps T away
    from degenerate values. T > 1 softens an over-confident model; argmax (accuracy) is unchanged.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if labels.size == 0:
        raise ValueError("cannot fit a temperature on zero samples")

    rows = np.arange(labels.size)

    def objective(log_t: float) -> float:
        return float(-log_softmax(logits, np.exp(log_t))[rows, labels].mean())

    found = minimize_scalar(objective, bounds=(np.log(0.05), np.log(20.0)), method="bounded",
                            options={"xatol": 1e-6})
    return float(np.exp(found.x))
