"""The task layer: what a MedMNIST task type means for training, prediction and metrics.

`medmnist.INFO[flag]["task"]` names one of four task types. `Task.of(flag)` gives the one
object that train, evaluate, explain and the reports ask instead of assuming a softmax:

| task type | outputs | loss | probabilities | prediction | metrics |
|---|---|---|---|---|---|
| multi-class (Blood, Path, Derma, OCT, Tissue, OrganA/C/S) | one per class | cross-entropy | softmax | argmax | `metrics.classification_metrics` |
| binary-class (Breast, Pneumonia) | two | cross-entropy | softmax | p1 > 0.5 (getACC's rule) | + sensitivity, specificity, PPV, NPV |
| ordinal-regression (Retina) | one per grade | cross-entropy | softmax | argmax | + MAE, quadratic weighted kappa |
| multi-label, binary-class (Chest) | one per label | binary cross-entropy | sigmoid per label | each p > 0.5 | `metrics.multilabel_metrics` |

Ordinal grades are trained as classes, as MedMNIST v2's baselines do, so accuracy and AUC
compare with the published numbers; the ordinal metrics say how far off the wrong grades are.
Label smoothing applies to both losses (BCE targets move towards 0.5 by half the factor).

Light at import (no numpy or torch).
"""

from __future__ import annotations

from dataclasses import dataclass

from medcli.names import MULTI_LABEL, TASK_TYPES


@dataclass(frozen=True)
class Task:
    kind: str  # one of names.TASK_TYPES
    names: tuple[str, ...]  # class (or label) names, one per model output

    def __post_init__(self) -> None:
        if self.kind not in TASK_TYPES:
            raise ValueError(f"unknown task type {self.kind!r}; medcli knows {', '.join(TASK_TYPES)}")

    @classmethod
    def of(cls, flag: str) -> "Task":
        """The task of a MedMNIST dataset, from medmnist.INFO (via `datasets.info`)."""
        from medcli import datasets

        meta = datasets.info(flag)
        return cls(meta["task"], tuple(datasets.class_names(flag)))

    @property
    def multilabel(self) -> bool:
        return self.kind == MULTI_LABEL

    @property
    def outputs(self) -> int:
        return len(self.names)

    # --- torch: training ------------------------------------------------------------------

    def targets(self, labels):
        """Float training targets (N, outputs): one-hot classes, or the 0/1 label matrix (so
        MixUp mixes both the same way)."""
        import torch.nn.functional as F

        return labels.float() if self.multilabel else F.one_hot(labels, self.outputs).float()

    def loss(self, logits, targets, label_smoothing: float = 0.0):
        import torch.nn.functional as F

        if self.multilabel:
            soft = targets * (1.0 - label_smoothing) + 0.5 * label_smoothing
            return F.binary_cross_entropy_with_logits(logits, soft)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    def hits(self, logits, labels):
        """Correct decisions in a batch, summed per sample: 1 per right argmax, or the share of
        a sample's labels right at 0.5 (so hits / samples is medmnist's accuracy)."""
        if self.multilabel:
            return ((logits > 0) == labels.bool()).double().mean(1).sum()
        return (logits.argmax(1) == labels).sum().double()

    def probs_t(self, logits):
        """Torch probabilities of the logits (softmax over classes, or sigmoid per label)."""
        return logits.sigmoid() if self.multilabel else logits.softmax(1)

    def scores_of_probs(self, probs):
        """Logit-like scores whose `probabilities` are `probs` (for averaged test-time views):
        log p for a softmax, log(p / (1 - p)) for sigmoids; finite for p at 0 or 1."""
        import torch

        tiny = torch.finfo(probs.dtype).tiny
        if self.multilabel:
            eps = torch.finfo(probs.dtype).eps
            p = probs.clamp(eps, 1 - eps)
            return (p / (1 - p)).log()
        return probs.clamp_min(tiny).log()

    # --- numpy: evaluation ----------------------------------------------------------------

    def probabilities(self, logits, temperature: float | list[float] = 1.0):
        from medcli import metrics

        return (metrics.sigmoid if self.multilabel else metrics.softmax)(logits, temperature)

    def predictions(self, probs):
        """Predicted class per sample (N,), or 0/1 per label (N, labels)."""
        from medcli import metrics

        return metrics.predict(probs, self.kind)

    def metrics(self, labels, probs) -> dict:
        from medcli import metrics

        if self.multilabel:
            return metrics.multilabel_metrics(labels, probs, self.names)
        return metrics.classification_metrics(labels, probs, self.names, task=self.kind)

    def reliability(self, labels, probs) -> dict:
        from medcli import metrics

        if self.multilabel:
            return {**metrics.reliability(*metrics.per_label(labels, probs)),
                    "confidence_of": "each label's yes/no decision"}
        return {**metrics.reliability(*metrics.top_label(labels, probs, self.kind)), "confidence_of": "top-class probability"}

    def fit_temperature(self, logits, labels) -> float | list[float]:
        from medcli import metrics

        return metrics.fit_temperature(logits, labels, multilabel=self.multilabel)

    def confidence_target(self, k: int):
        """grad-cam model target: the probability of class k (softmax), or of label k (its
        sigmoid) for multi-label models: what ROAD measures the change of."""
        if self.multilabel:
            return SigmoidTarget(k)
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

        return ClassifierOutputSoftmaxTarget(k)

    def explained_class(self, probs):
        """The class a map explains by default (N,): the predicted class, or for multi-label
        the most probable label (the finding the model is surest is present)."""
        return probs.argmax(axis=1) if self.multilabel else self.predictions(probs)

    def mistaken(self, labels, probs):
        """(N,) booleans: the prediction is wrong (multi-label: any label is wrong at 0.5)."""
        wrong = self.predictions(probs) != labels
        return wrong.any(axis=1) if self.multilabel else wrong

    def true_class(self, labels, probs):
        """The true class a sample stands for (N,): its label, or for multi-label the most
        probable of its labels (the most probable label overall when it has none)."""
        import numpy as np

        if not self.multilabel:
            return np.asarray(labels)
        present = np.where(np.asarray(labels) == 1, probs, -1.0)
        return np.where(present.max(axis=1) >= 0, present.argmax(axis=1), probs.argmax(axis=1))

    def indicator(self, labels):
        """(N, outputs) booleans: which class each sample is, or which labels it carries."""
        import numpy as np

        labels = np.asarray(labels)
        return labels == 1 if self.multilabel else labels.reshape(-1, 1) == np.arange(self.outputs)

    def describe(self, labels, probs, width: int = 14) -> tuple[list[str], list[str], list[bool], list[float]]:
        """Per sample: true text, predicted text, whether the prediction is right, and its
        confidence, for figure captions (multi-label: the sets of labels present)."""
        import numpy as np

        from medcli.names import short_names

        names = short_names(self.names, width=width)
        preds = self.predictions(probs)
        if self.multilabel:
            def spell(row) -> str:
                present = [names[k] for k in np.flatnonzero(row)]
                return "+".join(present) if present else "none"

            right = (preds == labels).all(axis=1)
            sure = np.where(preds == 1, probs, 1 - probs)  # each label's yes/no confidence
            # right: its least sure decision; wrong: its surest wrong one (what "the most
            # confident mistakes" rank)
            confidence = np.where(right, sure.min(axis=1), np.where(preds != labels, sure, 0.0).max(axis=1))
            return [spell(r) for r in labels], [spell(r) for r in preds], right.tolist(), confidence.tolist()
        return ([names[k] for k in labels], [names[k] for k in preds], (preds == labels).tolist(),
                probs.max(axis=1).tolist())


class SigmoidTarget:
    """grad-cam target: the sigmoid probability of one label, the counterpart of
    `ClassifierOutputSoftmaxTarget` for outputs that are not a softmax."""

    def __init__(self, label: int):
        self.label = label

    def __call__(self, model_output):
        return model_output[..., self.label].sigmoid()


def default_monitor(kind: str) -> str:
    """The validation metric that picks best.pt: AUC for multi-label (accuracy at 0.5 is
    dominated by the many absent findings), accuracy otherwise."""
    return "auc" if kind == MULTI_LABEL else "acc"

