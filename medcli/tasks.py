"""The task layer: one class per MedMNIST task type, registered under medmnist's task string.

`medmnist.INFO[flag]["task"]` names one of four task types; `datasets.task(flag)` gives the
object of its class, which train, evaluate, explain, the reports and the datasets ask instead
of assuming a softmax:

| task type | class | outputs | loss | probabilities | decision | metrics added |
|---|---|---|---|---|---|---|
| multi-class (Blood, Path, Derma, OCT, Tissue, OrganA/C/S) | `MultiClass` | one per class | cross-entropy | softmax | argmax | - |
| binary-class (Breast, Pneumonia) | `Binary` | two | cross-entropy | softmax | p1 > 0.5 (getACC's rule) | sensitivity, specificity, PPV, NPV of the finding |
| ordinal-regression (Retina) | `Ordinal` | one per grade | cross-entropy, smoothing on the neighbouring grades | softmax | argmax | MAE, quadratic weighted kappa |
| multi-label, binary-class (Chest) | `MultiLabel` | one per label | binary cross-entropy | sigmoid per label | each p > 0.5 | subset accuracy |

Ordinal grades are trained as classes, as MedMNIST v2's baselines do, so accuracy and AUC
compare with the published numbers; the ordinal metrics say how far off the wrong grades are.
Label smoothing applies to both losses (BCE targets move towards 0.5 by half the factor); for
ordinal grades it goes to the grades next to the true one, not to all of them.

A new task type is one subclass here with `kind` set (and its tests): `TASKS` registers it.

Light at import (no numpy or torch).
"""

from __future__ import annotations

from typing import ClassVar, Sequence

__all__ = ["Task", "SingleLabel", "MultiClass", "Binary", "Ordinal", "MultiLabel", "TASKS", "EXTRA_METRICS",
           "explained_text", "for_kind", "from_columns", "SigmoidTarget"]

TRUE_PREFIX, PRED_PREFIX = "true_", "pred_"  # multi-label predictions CSV: one column of each per label


class Task:
    """What every task type answers; a subclass per type fills it in."""

    kind: ClassVar[str]  # medmnist's spelling of the task type
    extra_metrics: ClassVar[tuple[str, ...]] = ()  # scalar metrics this type adds to the common ones
    default_monitor: ClassVar[str] = "acc"  # the validation metric that picks best.pt by default
    several_per_image: ClassVar[bool] = False  # an image may carry several labels (synthetic data draws them)
    probability_rule: ClassVar[str] = "a softmax over the classes"  # how scores become probabilities, for people

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)  # class (or label) names, one per model output

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.names == self.names

    def __hash__(self) -> int:
        return hash((self.kind, self.names))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.names)} outputs)"

    @property
    def outputs(self) -> int:
        return len(self.names)

    def facts(self) -> dict:
        """What a reader of this task's metrics file needs beyond the task and class names."""
        return {}

    def auc_columns(self) -> list[int]:
        """The columns whose AUCs, averaged, are the task's AUC (its intervals and paired tests)."""
        return self.roc_classes()

    def intervals(self, labels, probs, resamples: int, seed: int) -> dict:
        """Bootstrap 95 % intervals of this task's accuracy and AUC (the AUC of `auc_columns`,
        averaged: every class, class 1 of a binary task, every label): `metrics.bootstrap_intervals`."""
        from medcli import metrics

        columns = self.auc_columns()
        return metrics.bootstrap_intervals(self.image_accuracy(labels, probs), self.indicator(labels)[:, columns],
                                           probs[:, columns], resamples, seed)


class SingleLabel(Task):
    """One class per image, a softmax over the classes (multi-class, binary, ordinal)."""

    # -- labels in files ----------------------------------------------------------------------
    def label_layout(self) -> tuple[int, int]:
        """(columns, largest value) of a valid label array in the npz: one class index per image."""
        return 1, self.outputs - 1

    def labels_from_file(self, raw):
        """The npz's (N, 1) labels as this task uses them: (N,) class indices."""
        return raw.reshape(-1)

    def encode(self, present):
        """Labels to store in an npz for the boolean (N, outputs) class matrix `present`."""
        return present.argmax(axis=1).reshape(-1, 1)

    # -- torch: training ------------------------------------------------------------------------
    def targets(self, labels):
        """Float training targets (N, outputs): one-hot classes (so MixUp mixes them)."""
        import torch.nn.functional as F

        return F.one_hot(labels, self.outputs).float()

    def loss(self, logits, targets, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def hits(self, logits, labels):
        """Correct decisions in a batch (1 per right argmax), as a double tensor."""
        return (logits.argmax(1) == labels).sum().double()

    def probs_t(self, logits):
        """Torch probabilities of the logits."""
        return logits.softmax(1)

    def scores_of_probs(self, probs):
        """Logit-like scores whose probabilities are `probs` (averaged test-time views): log p,
        finite for p = 0."""
        import torch

        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    confidence_name = "softmax of the explained class"  # what `confidence_target` measures, in words

    def confidence_target(self, k: int):
        """grad-cam model target whose change ROAD measures: the softmax probability of class k."""
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

        return ClassifierOutputSoftmaxTarget(k)

    # -- numpy: evaluation ----------------------------------------------------------------------
    def probabilities(self, logits, temperature: float = 1.0):
        from medcli import metrics

        return metrics.softmax(logits, temperature)

    def predictions(self, probs):
        """Predicted class per sample (N,)."""
        return probs.argmax(axis=1)

    def decision_rule(self) -> str:
        """How `predictions` decides, for people (model cards)."""
        return "the class of highest probability"

    def decision_names(self, probs) -> list[str]:
        """Each sample's decision in words: the predicted class's name."""
        return [self.names[k] for k in self.predictions(probs)]

    def auc_class(self) -> int | None:
        """The class whose one-vs-rest AUC is the task's AUC; None: the mean over classes."""
        return None

    def roc_classes(self) -> list[int]:
        """The classes that get a ROC curve."""
        return list(range(self.outputs))

    def metrics(self, labels, probs) -> dict:
        from medcli import metrics

        preds = self.predictions(probs)
        result = metrics.classification_metrics(labels, probs, self.names, preds=preds, auc_class=self.auc_class())
        extra = self.added_metrics(metrics, labels, preds, result)
        cm = result.pop("confusion_matrix")
        return {**result, **extra, "per_class": result.pop("per_class"), "confusion_matrix": cm}

    def added_metrics(self, metrics, labels, preds, result: dict) -> dict:
        """This task type's own metrics (`extra_metrics`), from the common ones."""
        return {}

    def reliability(self, labels, probs) -> dict:
        from medcli import metrics

        confidence, correct = metrics.top_label(labels, probs, self.predictions(probs))
        return {**metrics.reliability(confidence, correct), "confidence_of": "top-class probability"}

    def fit_temperature(self, logits, labels) -> tuple[float, str | None]:
        """(T, None), or (1.0, why the validation split cannot pin T down)."""
        from medcli import metrics

        return metrics.fit_temperature(logits, labels)

    def image_accuracy(self, labels, probs):
        """(N,) 1.0 where the image's class is predicted right (their mean is the accuracy)."""
        import numpy as np

        return (self.predictions(probs) == np.asarray(labels).reshape(-1)).astype(np.float64)

    # -- explanations and captions -----------------------------------------------------------------
    def explained_class(self, probs):
        """The class a map explains by default (N,): the predicted class."""
        return self.predictions(probs)

    def decided(self, probs, classes):
        """(N,) booleans: each row's class is the model's decision (one of them, multi-label);
        a caption calls it "pred" only then."""
        return self.predictions(probs) == classes

    def mistaken(self, labels, probs):
        """(N,) booleans: the prediction is wrong."""
        return self.predictions(probs) != labels

    def true_class(self, labels, probs):
        """The true class a sample stands for (N,): its label."""
        import numpy as np

        return np.asarray(labels)

    def label_sets(self, labels):
        """Every label of each sample, for samples that may carry several; None here."""
        return None

    def indicator(self, labels):
        """(N, outputs) booleans: which class each sample is."""
        import numpy as np

        return np.asarray(labels).reshape(-1, 1) == np.arange(self.outputs)

    def describe(self, labels, probs, width: int = 14) -> tuple[list[str], list[str], list[bool], list[float]]:
        """Per sample: true text, predicted text, whether the prediction is right, and its
        confidence, for figure captions."""
        from medcli.names import short_names

        names = short_names(self.names, width=width)
        preds = self.predictions(probs)
        return ([names[k] for k in labels], [names[k] for k in preds], (preds == labels).tolist(),
                probs.max(axis=1).tolist())

    # -- the predictions CSV ---------------------------------------------------------------------
    def csv_columns(self, labels, preds) -> dict:
        """The label and decision columns of the predictions CSV (the `prob_` columns follow)."""
        return {"label": labels, "prediction": preds}

    def csv_required(self) -> dict[str, int]:
        """Integer columns a predictions CSV must have, with their largest valid value."""
        return {"label": self.outputs - 1, "prediction": self.outputs - 1}

    def csv_decisions(self, frame):
        """(labels, predictions) read back from a predictions CSV."""
        return frame["label"].to_numpy(), frame["prediction"].to_numpy()

    def csv_named(self, frame) -> dict:
        """Readable columns for the workbook's predictions sheet: class names and correctness."""
        return {"true class": [self.names[k] for k in frame["label"]],
                "predicted class": [self.names[k] for k in frame["prediction"]],
                "correct": frame["label"] == frame["prediction"]}

    def confusion(self, labels, preds) -> dict:
        """The confusion entry of the metrics for these decisions (rows = true class)."""
        from medcli import metrics

        return {"confusion_matrix": metrics.confusion_counts(labels, preds, self.outputs).tolist()}

    def confusion_tables(self, values: dict) -> list[tuple[str | None, list[str], "np.ndarray"]]:
        """The confusion entry of `values` (a split's metrics) as (caption, axis names, counts)
        tables for figures and workbooks: one uncaptioned class matrix."""
        import numpy as np

        return [(None, list(self.names), np.asarray(values["confusion_matrix"], dtype=np.int64))]


class MultiClass(SingleLabel):
    kind = "multi-class"


class Binary(SingleLabel):
    """Two classes. medmnist decides p1 > 0.5 (not the argmax: scores read from a CSV need not
    sum to one) and its AUC is class 1's. Sensitivity, specificity, PPV and NPV are of the
    finding: the class not named "normal" (BreastMNIST: class 0, malignant, its class 1 being
    "normal, benign"; PneumoniaMNIST: class 1, pneumonia), else class 1."""

    kind = "binary-class"
    extra_metrics = ("sensitivity", "specificity", "ppv", "npv")

    def predictions(self, probs):
        from medcli import metrics

        return metrics.above_threshold(probs[:, -1])

    def decision_rule(self) -> str:
        from medcli import metrics

        return (f"class 1 ({self.names[1]}) when its probability is above {metrics.THRESHOLD}, "
                f"else class 0 ({self.names[0]})")

    def auc_class(self) -> int:
        return self.outputs - 1

    def roc_classes(self) -> list[int]:
        """The finding's curves: its precision-recall curve and AP are its own; its ROC AUC is
        class 1's (two softmax scores rank the images in reverse) up to ties of a saturated
        softmax (p1 == 1.0 exactly where p0 still tells images apart)."""
        return [self.finding]

    def auc_columns(self) -> list[int]:
        """medmnist's AUC is class 1's: its intervals and paired tests are too, tie for tie."""
        return [self.auc_class()]

    @property
    def finding(self) -> int:
        """The class the rates are of (see the class docstring)."""
        normal = [name.lower().startswith("normal") for name in self.names]
        return normal.index(False) if normal.count(False) == 1 else self.outputs - 1

    def facts(self) -> dict:
        return {"positive_class": self.names[self.finding]}

    def added_metrics(self, metrics, labels, preds, result: dict) -> dict:
        import numpy as np

        cm = np.asarray(result["confusion_matrix"])
        return metrics.binary_rates(cm if self.finding == 1 else cm[::-1, ::-1])


class Ordinal(SingleLabel):
    """Grades in order, trained as classes; the grade errors are measured."""

    kind = "ordinal-regression"
    extra_metrics = ("mae", "qwk")

    def loss(self, logits, targets, label_smoothing: float = 0.0):
        """Cross-entropy whose label smoothing respects the order: the smoothed share of each
        grade goes half to each neighbouring grade (all of it to the one neighbour of the first
        and last grades), so grade 2 is nearer grade 1 than grade 4. Soft (MixUp) targets are
        smoothed alike; the decision stays the argmax grade."""
        import torch
        import torch.nn.functional as F

        k = self.outputs
        if label_smoothing <= 0 or k < 2:
            return F.cross_entropy(logits, targets)
        near = torch.zeros(k, k, device=targets.device, dtype=targets.dtype)
        grades = torch.arange(k - 1, device=targets.device)
        near[grades, grades + 1] = near[grades + 1, grades] = 1.0
        kernel = (1 - label_smoothing) * torch.eye(k, device=targets.device, dtype=targets.dtype) \
            + label_smoothing * near / near.sum(1, keepdim=True)
        return F.cross_entropy(logits, targets @ kernel)

    def added_metrics(self, metrics, labels, preds, result: dict) -> dict:
        import numpy as np

        return metrics.ordinal_scores(np.asarray(labels).reshape(-1).astype(np.int64), preds, self.outputs)


class MultiLabel(Task):
    """Any number of findings per image, each a sigmoid decided at 0.5 (ChestMNIST)."""

    kind = "multi-label, binary-class"
    extra_metrics = ("subset_accuracy",)
    # accuracy at 0.5 is dominated by the many absent findings: AUC picks best.pt
    default_monitor = "auc"
    several_per_image = True
    probability_rule = "a sigmoid per label"

    def label_layout(self) -> tuple[int, int]:
        return self.outputs, 1

    def labels_from_file(self, raw):
        return raw

    def encode(self, present):
        return present

    def targets(self, labels):
        """The 0/1 label matrix as floats (so MixUp mixes it as it mixes one-hot classes)."""
        return labels.float()

    def loss(self, logits, targets, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        soft = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
        return F.binary_cross_entropy_with_logits(logits, soft)

    def hits(self, logits, labels):
        """The share of each sample's labels right at 0.5, summed (hits / samples is
        medmnist's accuracy)."""
        return ((logits > 0) == labels.bool()).double().mean(1).sum()

    def probs_t(self, logits):
        return logits.sigmoid()

    def scores_of_probs(self, probs):
        """log(p / (1 - p)), finite for p at 0 or 1."""
        import torch

        eps = torch.finfo(probs.dtype).eps
        p = probs.clamp(eps, 1 - eps)
        return (p / (1 - p)).log()

    confidence_name = "sigmoid of the explained label"

    def confidence_target(self, k: int):
        return SigmoidTarget(k)

    def probabilities(self, logits, temperature: float | list[float] = 1.0):
        from medcli import metrics

        return metrics.sigmoid(logits, temperature)

    def predictions(self, probs):
        """0/1 per label (N, labels)."""
        from medcli import metrics

        return metrics.above_threshold(probs)

    def decision_rule(self) -> str:
        from medcli import metrics

        return f"each label whose probability is above {metrics.THRESHOLD} present"

    def decision_names(self, probs) -> list[str]:
        """The labels found (probability above 0.5), joined by '; ' (empty: none found)."""
        return ["; ".join(name for name, found in zip(self.names, row) if found) for row in self.predictions(probs)]

    def roc_classes(self) -> list[int]:
        return list(range(self.outputs))

    def metrics(self, labels, probs) -> dict:
        from medcli import metrics

        return metrics.label_matrix_metrics(labels, probs, self.names, self.predictions(probs))

    def reliability(self, labels, probs) -> dict:
        from medcli import metrics

        return {**metrics.reliability(*metrics.per_label(labels, probs, self.predictions(probs))),
                "confidence_of": "each label's yes/no decision", "counted": "label decisions"}

    def fit_temperature(self, logits, labels) -> tuple[list[float], str | None]:
        """One temperature per label (the findings are over- or under-confident to different
        degrees), and the labels kept at T = 1 grouped by reason ("reason: a, b; ..."), or None."""
        from medcli import metrics

        temperatures, reasons = metrics.fit_label_temperatures(logits, labels)
        skipped: dict[str, list[str]] = {}
        for name, reason in zip(self.names, reasons):
            if reason:
                skipped.setdefault(reason, []).append(name)
        return temperatures, "; ".join(f"{reason}: {', '.join(names)}" for reason, names in skipped.items()) or None

    def image_accuracy(self, labels, probs):
        """(N,) each image's share of labels right at 0.5 (their mean is medmnist's accuracy)."""
        return (self.predictions(probs) == labels).mean(axis=1)

    def explained_class(self, probs):
        """The most probable label (the finding the model is surest is present)."""
        return probs.argmax(axis=1)

    def decided(self, probs, classes):
        """False where no label reaches the threshold: the most probable one is then no finding."""
        import numpy as np

        return self.predictions(probs)[np.arange(len(classes)), classes].astype(bool)

    def mistaken(self, labels, probs):
        """Any label wrong at 0.5."""
        return (self.predictions(probs) != labels).any(axis=1)

    def true_class(self, labels, probs):
        """The most probable of a sample's labels (the most probable label overall when it has none)."""
        import numpy as np

        present = np.where(np.asarray(labels) == 1, probs, -1.0)
        return np.where(present.max(axis=1) >= 0, present.argmax(axis=1), probs.argmax(axis=1))

    def label_sets(self, labels):
        return labels

    def indicator(self, labels):
        import numpy as np

        return np.asarray(labels) == 1

    def describe(self, labels, probs, width: int = 14) -> tuple[list[str], list[str], list[bool], list[float]]:
        """Captions name the sets of labels present ("none" without any)."""
        import numpy as np

        from medcli.names import short_names

        names = short_names(self.names, width=width)
        preds = self.predictions(probs)

        def spell(row) -> str:
            present = [names[k] for k in np.flatnonzero(row)]
            return "+".join(present) if present else "none"

        right = (preds == labels).all(axis=1)
        sure = np.where(preds == 1, probs, 1 - probs)  # each label's yes/no confidence
        # right: its least sure decision; wrong: its surest wrong one (what "the most confident
        # mistakes" rank)
        confidence = np.where(right, sure.min(axis=1), np.where(preds != labels, sure, 0.0).max(axis=1))
        return [spell(r) for r in labels], [spell(r) for r in preds], right.tolist(), confidence.tolist()

    def csv_columns(self, labels, preds) -> dict:
        return ({f"{TRUE_PREFIX}{name}": labels[:, k] for k, name in enumerate(self.names)}
                | {f"{PRED_PREFIX}{name}": preds[:, k] for k, name in enumerate(self.names)})

    def csv_required(self) -> dict[str, int]:
        return {f"{prefix}{name}": 1 for prefix in (TRUE_PREFIX, PRED_PREFIX) for name in self.names}

    def csv_decisions(self, frame):
        return (frame[[f"{TRUE_PREFIX}{n}" for n in self.names]].to_numpy(),
                frame[[f"{PRED_PREFIX}{n}" for n in self.names]].to_numpy())

    def csv_named(self, frame) -> dict:
        return {}

    def confusion(self, labels, preds) -> dict:
        from medcli import metrics

        return {"label_confusion": [metrics.confusion_counts(labels[:, k], preds[:, k], 2).tolist()
                                    for k in range(self.outputs)]}

    def confusion_tables(self, values: dict) -> list[tuple[str | None, list[str], "np.ndarray"]]:
        """One 2x2 table per label, captioned with its name (rows = truly absent / present)."""
        import numpy as np

        return [(name, ["absent", "present"], np.asarray(cm, dtype=np.int64))
                for name, cm in zip(self.names, values["label_confusion"])]


TASKS: dict[str, type[Task]] = {cls.kind: cls for cls in (MultiClass, Binary, Ordinal, MultiLabel)}
EXTRA_METRICS = {kind: cls.extra_metrics for kind, cls in TASKS.items()}


def explained_text(name: str, probability: float, decided: bool) -> str:
    """A figure title's words for the class a map explains (`Task.decided`): "pred NAME (p)",
    or "top NAME (p; no label found)" for a multi-label image's most probable label."""
    return f"pred {name} ({probability:.2f})" if decided else f"top {name} ({probability:.2f}; no label found)"


def for_kind(kind: str, names: Sequence[str]) -> Task:
    """The task object of medmnist's task type `kind` with these class (label) names."""
    if kind not in TASKS:
        raise ValueError(f"unknown task type {kind!r}; medcli knows {', '.join(TASKS)}")
    return TASKS[kind](names)


def from_columns(columns: Sequence[str], names: Sequence[str]) -> Task:
    """The task of a predictions CSV written before the task was recorded beside it: its
    layout tells multi-label from single-label (a binary-class file reads as multi-class,
    which changes only which ROC curves are drawn)."""
    multi = f"{TRUE_PREFIX}{names[0]}" in columns
    return (MultiLabel if multi else MultiClass)(names)


class SigmoidTarget:
    """grad-cam target: the sigmoid probability of one label, the counterpart of
    `ClassifierOutputSoftmaxTarget` for outputs that are not a softmax."""

    def __init__(self, label: int):
        self.label = label

    def __call__(self, model_output):
        return model_output[..., self.label].sigmoid()
