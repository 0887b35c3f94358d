"""Light shared names: splits, checkpoints, metrics and the CLI's choices, each defined once.

Standard library only: the CLI imports this module to build its options and help text, and
`medcli --help` must import neither numpy nor torch.
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = [
    "AMP_MODES", "CHECKPOINTS", "COMPARE_FORMATS", "COMPILE_MODES", "EXPORT_FORMATS",
    "COMPARE_METRICS", "EVAL_SPLITS", "EXPLAIN_TARGETS", 
    "FAITHFULNESS_PREFIX", "LOWER_IS_BETTER", "MONITORS",
    "OPTIMIZERS", "PERCENT_METRICS", "SCALAR_METRICS", "SHOWN_DECIMALS", "SIZES", "SPLITS",
    "sizes_text",
    "file_names", "short_names",
]

SPLITS = ("train", "val", "test")
SIZES = (28, 64, 128, 224)  # MedMNIST's image sizes (MedMNIST+ added all but 28)
EVAL_SPLITS = ("test", "val", "train", "all")  # `evaluate --split`: all = every split
CHECKPOINTS = ("best", "last")  # checkpoints/<name>.pt

# The scalar keys of `metrics.classification_metrics`, in report order: aggregate and the
# workbook pick columns from them, mark leaders (lower is better for the losses) and format
# percentages; checkpoints store them for the epoch they were written at.
SCALAR_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro", "precision_macro", "recall_macro",
                  "f1_micro", "precision_micro", "recall_micro", "loss", "nll", "ece", "brier")
# (What each task type adds to these: `tasks.EXTRA_METRICS`.)
LOWER_IS_BETTER = frozenset({"loss", "nll", "ece", "brier", "mae"})
PERCENT_METRICS = frozenset({"accuracy", "balanced_accuracy", "f1_macro", "precision_macro", "recall_macro",
                             "f1_micro", "precision_micro", "recall_micro", "ece", "sensitivity", "specificity",
                             "ppv", "npv", "subset_accuracy"})
# Tables show a metric to 4 decimals of its value (a percent metric: 91.23 %, two of a percent).
SHOWN_DECIMALS = 4
COMPARE_METRICS = ("accuracy", "balanced_accuracy", "f1_macro", "auc", "ece")  # aggregate's default columns
COMPARE_FORMATS = ("table", "csv", "md", "xlsx", "json")
EXPORT_FORMATS = ("onnx", "torchscript")  # medcli export --format

OPTIMIZERS = ("sgd", "adamw")
# train --monitor choice -> (key in metrics.classification_metrics, direction)
MONITORS = {"acc": ("accuracy", "max"), "auc": ("auc", "max"), "f1": ("f1_macro", "max"), "loss": ("loss", "min")}
AMP_MODES = ("bf16", "fp16", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")  # torch.compile's modes (train --compile-mode)

# aggregate columns read from the explain stages: mean ROAD faithfulness of a method's maps
# (the methods themselves: `explainers.METHODS`)
FAITHFULNESS_PREFIX = "road_"
EXPLAIN_TARGETS = ("pred", "true")


def short_names(names: Sequence[str], width: int = 18) -> list[str]:
    """Display names for axes and captions: drop a parenthesised explanation, then cut to
    `width` characters ("…" says so).

    BloodMNIST's "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)"
    becomes "immature granulocytes". A comma lists classes merged into one and stays:
    BreastMNIST's "normal, benign" is not "normal". Where two names collapse to the same
    text, the class number is appended so they stay distinct.
    """
    shortened = []
    for number, name in enumerate(names):
        text = str(name).split("(", 1)[0].strip() or str(name) or str(number)
        shortened.append(text if len(text) <= width else text[: width - 1].rstrip() + "…")
    return _distinct(shortened, "{text} [{number}]")


def file_names(names: Sequence[str]) -> list[str]:
    """File-name-safe class names: the short name in lower case, [a-z0-9-] only, at most 24
    characters; the class number is appended where two would clash."""
    slugs = [re.sub(r"[^a-z0-9]+", "-", text.rstrip("…").lower()).strip("-") or str(number)
             for number, text in enumerate(short_names(names, width=25))]
    return _distinct([slug[:24].strip("-") for slug in slugs], "{text}-{number}")


def _distinct(texts: list[str], pattern: str) -> list[str]:
    return [text if texts.count(text) == 1 else pattern.format(text=text, number=number)
            for number, text in enumerate(texts)]


def sizes_text() -> str:
    """The sizes for a help text: "28, 64, 128 or 224"."""
    *first, final = map(str, SIZES)
    return f"{', '.join(first)} or {final}"
