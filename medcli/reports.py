"""Figures and Excel workbooks for people: confusion matrices, sample grids, reliability
diagrams, and the styled `report.xlsx` / aggregate workbook.

Everything here is a pure function of arrays, DataFrames or files; nothing imports torch, so
`plot-confusion` can redraw a confusion matrix from a predictions CSV on a machine without a
GPU stack. Figures use matplotlib's object API (`Figure`, no pyplot): no global state, no
backend to select, safe in tests. Every file is written through `fileio.atomic_path`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import fileio
from medcli.metrics import confusion_counts, temperature_text
from medcli.errors import UsageError
from medcli.names import BINARY, MULTI_CLASS, PERCENT_METRICS, SCALAR_METRICS, TASK_METRICS, short_names

PROB_PREFIX = "prob_"
TRUE_PREFIX, PRED_PREFIX = "true_", "pred_"  # multi-label predictions: one column of each per label
PERCENT = "0.00%"
DECIMAL = "0.0000"
INTEGER = "0"
_DPI = 130


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save a matplotlib Figure atomically (the format follows the file suffix)."""
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=_DPI)
    return Path(path)


def draw_confusion(ax, cm: np.ndarray, names: Sequence[str], normalize: bool) -> None:
    """Draw one confusion matrix on `ax` (rows = true class): counts, or row-normalised shares.

    The single drawing routine behind evaluate's figure and `plot-confusion`. Rows of classes
    absent from the labels stay 0 when normalised instead of dividing by zero.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=1.0)
        labels = [[f"{v:.0%}" if v else "0" for v in row] for row in values]
    else:
        values = cm
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=max(values.max(), 1.0))
        labels = [[f"{int(v)}" for v in row] for row in values]
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    n = len(names)
    threshold = image.norm.vmax / 2
    fontsize = 9 if n <= 10 else 7
    for i in range(n):
        for j in range(n):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=fontsize,
                    color="white" if values[i, j] > threshold else "black")
    axis_names = short_names(names)
    ax.set_xticks(range(n), axis_names, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), axis_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("row-normalised (recall on the diagonal)" if normalize else "counts")


def save_confusion(path: str | os.PathLike, cm: np.ndarray, names: Sequence[str], title: str,
                   panels: Sequence[bool] = (False, True)) -> Path:
    """A confusion-matrix figure with one panel per entry of `panels` (False = counts,
    True = row-normalised); evaluate draws both side by side."""
    from matplotlib.figure import Figure

    side = max(4.5, 0.55 * len(names) + 2.5)
    fig = Figure(figsize=(side * len(panels), side), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, normalize in zip(axes, panels):
        draw_confusion(ax, cm, names, normalize)
    fig.suptitle(title)
    return save_figure(fig, path)


def _image_grid(path, images: np.ndarray, titles: Sequence[str], correct: Sequence[bool], title: str,
                columns: int = 8) -> Path:
    """Thumbnails with a caption each; a green frame marks a right prediction, red a wrong one.

    The tiles are composed into one mosaic array drawn on a single axes: one image instead of
    32 subplots keeps a grid at a fraction of a second.
    """
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    n = len(images)
    rows = max(1, -(-n // columns))
    height, width = (images.shape[1], images.shape[2]) if n else (28, 28)
    frame = max(1, height // 14)
    cell_h, cell_w = height + 2 * frame, width + 2 * frame
    gap, caption_h = max(2, cell_w // 8), cell_h // 2  # room under each tile for a two-line caption
    mosaic = np.ones((rows * (cell_h + caption_h), columns * (cell_w + gap), 3))
    inch = 1.6 / (cell_w + gap)
    fig = Figure(figsize=(mosaic.shape[1] * inch, mosaic.shape[0] * inch + 0.5), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    for k, (image, caption, ok) in enumerate(zip(images, titles, correct)):
        top, left = (k // columns) * (cell_h + caption_h), (k % columns) * (cell_w + gap)
        colour = "tab:green" if ok else "tab:red"
        mosaic[top:top + cell_h, left:left + cell_w] = to_rgb(colour)
        tile = image.astype(np.float64) / 255.0
        mosaic[top + frame:top + frame + height, left + frame:left + frame + width] = (
            np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile)
        ax.text(left + cell_w / 2, top + cell_h + 0.5, caption, ha="center", va="top", fontsize=6.5, color=colour)
    ax.imshow(mosaic, interpolation="nearest")
    if n == 0:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    return save_figure(fig, path)


Captions = tuple  # (true texts, predicted texts, right or wrong, confidence): tasks.Task.describe


def save_samples(path, images: np.ndarray, captions: Captions, title: str, count: int = 32) -> Path:
    """A representative grid: `count` samples evenly spaced over the split (deterministic),
    captioned true / predicted, framed green (right) or red (wrong)."""
    truth, predicted, right, _ = captions
    picks = np.unique(np.linspace(0, len(truth) - 1, num=min(count, len(truth))).round().astype(int))
    texts = [f"T: {truth[i]}\nP: {predicted[i]}" for i in picks]
    return _image_grid(path, images[picks], texts, [right[i] for i in picks], title)


def save_mistakes(path, images: np.ndarray, captions: Captions, title: str, count: int = 16) -> Path:
    """The `count` wrong predictions the model was most sure of: where to look for label noise
    or a systematic confusion."""
    truth, predicted, right, confidence = captions
    wrong = np.flatnonzero(~np.asarray(right, dtype=bool))
    worst = wrong[np.argsort(-np.asarray(confidence)[wrong], kind="stable")][:count]
    texts = [f"#{i} T: {truth[i]}\nP: {predicted[i]} ({confidence[i]:.0%})" for i in worst]
    return _image_grid(path, images[worst], texts, [False] * len(worst), title)


def save_label_confusions(path, matrices: Sequence, names: Sequence[str], title: str, normalize: bool = False,
                          columns: int = 5) -> Path:
    """One 2x2 matrix per label of a multi-label task (rows = true absent/present), in a grid."""
    from matplotlib.figure import Figure

    n = len(matrices)
    cols = min(columns, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(3.2 * cols, 2.9 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, name, cm in zip(axes, short_names(names, width=22), matrices):
        draw_confusion(ax, np.asarray(cm), ["absent", "present"], normalize)
        ax.set_title(name, fontsize=9)
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.suptitle(f"{title}{' (row-normalised)' if normalize else ''}")
    return save_figure(fig, path)


def save_task_confusion(path, values: dict, names: Sequence[str], title: str) -> Path:
    """Evaluate's confusion figure from a split's metrics: the class confusion matrix, or for a
    multi-label task one 2x2 matrix per label."""
    if "label_confusion" in values:
        return save_label_confusions(path, values["label_confusion"], names, title)
    return save_confusion(path, np.asarray(values["confusion_matrix"]), names, title)


def roc_curves(indicator: np.ndarray, probs: np.ndarray, names: Sequence[str], kind: str) -> list[dict]:
    """ROC and precision-recall curve points per class, one-vs-rest (`indicator` (N, K): which
    samples belong to each class or carry each label), or for a binary-class task (`kind`) of
    class 1 alone, whose AUC is the task's. A class without positives or negatives has no
    curve. For the figure and the workbook."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    indicator = np.asarray(indicator, dtype=bool)
    curves = []
    for k in ([len(names) - 1] if kind == BINARY else range(len(names))):
        positive = indicator[:, k]
        if positive.all() or not positive.any():
            continue
        fpr, tpr, thresholds = roc_curve(positive, probs[:, k])
        precision, recall, _ = precision_recall_curve(positive, probs[:, k])
        curves.append({"class": int(k), "name": names[k], "fpr": fpr, "tpr": tpr, "threshold": thresholds,
                       "precision": precision, "recall": recall, "auc": float(auc(fpr, tpr)),
                       "prevalence": float(positive.mean())})
    return curves


def frame_arrays(frame, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(indicator (N, K), probabilities (N, K)) of a predictions table of either layout."""
    probs = frame[[f"{PROB_PREFIX}{n}" for n in names]].to_numpy(dtype=np.float64)
    if is_multilabel(frame, names):
        return frame[[f"{TRUE_PREFIX}{n}" for n in names]].to_numpy() == 1, probs
    return frame["label"].to_numpy()[:, None] == np.arange(len(names)), probs


def save_roc(path, curves: Sequence[dict], title: str) -> Path:
    """ROC curves (left) and precision-recall curves (right), one line per class or label."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5), layout="constrained")
    roc_ax, pr_ax = fig.subplots(1, 2)
    for curve, name in zip(curves, short_names([c["name"] for c in curves], width=22)):
        roc_ax.plot(curve["fpr"], curve["tpr"], lw=1.2, label=f"{name} (AUC {curve['auc']:.3f})")
        pr_ax.plot(curve["recall"], curve["precision"], lw=1.2, label=name)
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    pr_ax.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.01))
    if curves:
        roc_ax.legend(fontsize=7, loc="lower right")
    else:
        roc_ax.text(0.5, 0.5, "no class has both positives and negatives", ha="center", va="center")
    fig.suptitle(title)
    return save_figure(fig, path)


def save_reliability(path, panels: Sequence[tuple[str, dict]], title: str) -> Path:
    """Reliability diagram(s) from `Task.reliability` bins: accuracy per confidence bin
    against the diagonal, the gap shaded, and the share of samples per bin underneath.
    Several panels (e.g. before / after temperature scaling) sit side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.6 * len(panels), 5.4), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False, sharex=True, height_ratios=[3, 1])
    for column, (name, bins) in enumerate(panels):
        top, bottom = axes[0][column], axes[1][column]
        edges = np.asarray(bins["edges"])
        centres = (edges[:-1] + edges[1:]) / 2
        width = edges[1] - edges[0]
        filled = [i for i, c in enumerate(bins["count"]) if c]
        acc = np.array([bins["accuracy"][i] for i in filled])
        conf = np.array([bins["confidence"][i] for i in filled])
        top.bar(centres[filled], acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
        top.bar(centres[filled], conf - acc, bottom=acc, width=width, color="tab:red", alpha=0.3,
                hatch="//", edgecolor="tab:red", label="gap to confidence")
        top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(f"{name}: ECE {bins['ece']:.2%}")
        top.legend(loc="upper left", fontsize=8)
        share = np.asarray(bins["count"], dtype=float) / max(sum(bins["count"]), 1)
        bottom.bar(centres, share, width=width, color="gray", edgecolor="black")
        bottom.set_xlabel(f"confidence ({bins['confidence_of']})")
        bottom.set_ylabel("share")
    fig.suptitle(title)
    return save_figure(fig, path)


def save_curves(path, history: Sequence[dict], monitor: str) -> Path:
    """Training curves: loss, accuracy (with validation macro F1 and AUC) and learning rate
    per epoch (train's `history`); the title names the monitored metric."""
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    axes[1].plot(epochs, [r["val_acc"] for r in history], "o-", label="val")
    axes[1].plot(epochs, [r["val_f1"] for r in history], "--", label="val macro F1")
    axes[1].plot(epochs, [np.nan if r["val_auc"] is None else r["val_auc"] for r in history], ":", label="val AUC")
    axes[1].set_title("accuracy, F1, AUC")
    axes[2].plot(epochs, [r["lr"] for r in history], "o-")
    axes[2].set_title("learning rate (last step of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(f"monitor: val {monitor}")
    return save_figure(fig, path)


def write_table(path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    """A CSV of `rows` with exactly `columns` (a missing value is an empty cell)."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row.get(key) for key in columns} for row in rows)
    return fileio.write_text(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------
# Predictions CSV and plot-confusion
# ---------------------------------------------------------------------------------------


def predictions_frame(labels: np.ndarray, preds: np.ndarray, probs: np.ndarray, names: Sequence[str]):
    """The predictions table. Single-label: index, label, prediction, then `prob_<class>` per
    class. Multi-label (2-D labels): index, then `true_<label>`, `pred_<label>` (0/1 at 0.5)
    and `prob_<label>` per label."""
    import pandas as pd

    columns = {"index": np.arange(len(labels))}
    if np.ndim(labels) == 2:
        columns |= {f"{TRUE_PREFIX}{name}": labels[:, k] for k, name in enumerate(names)}
        columns |= {f"{PRED_PREFIX}{name}": preds[:, k] for k, name in enumerate(names)}
    else:
        columns |= {"label": labels, "prediction": preds}
    columns |= {f"{PROB_PREFIX}{name}": probs[:, k] for k, name in enumerate(names)}
    return pd.DataFrame(columns)


def write_predictions(path, frame) -> Path:
    """The CSV, probabilities in the shortest text that reads back to the same float (rounded
    ones would tie scores the model kept apart, and the AUC computed from the file would move)."""
    with fileio.atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)
    return Path(path)


def is_multilabel(frame, names: Sequence[str]) -> bool:
    return f"{TRUE_PREFIX}{names[0]}" in frame.columns


def read_predictions(path: str | os.PathLike):
    """Read and check a predictions CSV of either layout; returns (DataFrame, class names
    from the header)."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no predictions file {path}; run 'medcli evaluate' on the run first (or pass the CSV path)")
    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} as CSV ({' '.join(str(exc).split())}); pass a file written by 'medcli evaluate'") from None
    names = [c[len(PROB_PREFIX):] for c in frame.columns if str(c).startswith(PROB_PREFIX)]
    if len(names) < 2:
        raise UsageError(f"{path} lacks the columns {PROB_PREFIX}<class> (one per class); pass a predictions CSV "
                         f"written by 'medcli evaluate'")
    if is_multilabel(frame, names):
        required = {f"{prefix}{name}": 1 for prefix in (TRUE_PREFIX, PRED_PREFIX) for name in names}
    else:
        required = {column: len(names) - 1 for column in ("label", "prediction")}
    missing = [c for c in ("index", *required) if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} lacks the columns {', '.join(missing)}; pass a predictions CSV written by 'medcli evaluate'")
    for column, upper in required.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values % 1 != 0).any() or values.min() < 0 or values.max() > upper:
            raise UsageError(f"{path}: column '{column}' must hold integers 0..{upper}; the file is damaged, re-run 'medcli evaluate'")
        frame[column] = values.astype(np.int64)
    return frame, names


def plot_confusion(target: str | os.PathLike, split: str = "test", normalize: bool | None = None,
                   out: str | os.PathLike | None = None) -> Path:
    """Redraw a confusion matrix from a predictions CSV alone (no model, no torch).

    `target` is a run directory (its `predictions/<split>.csv` is used) or a CSV path.
    normalize None draws counts and row-normalised side by side (evaluate's figure); True or
    False draws that one panel. The default output is the run's
    `figures/confusion_<split>[_normalized|_counts].png`, or beside the CSV.
    """
    from medcli.run import Run

    target = Path(target)
    suffix = {None: "", True: "_normalized", False: "_counts"}[normalize]
    if not target.exists():
        raise UsageError(f"{target} does not exist; pass a run directory or a predictions CSV from 'medcli evaluate'")
    if target.is_dir():
        run = Run.open(target)  # a directory must be a readable run (one-line refusal otherwise)
        csv = run.path(f"predictions/{split}.csv")
        default_out = run.path(f"figures/confusion_{split}{suffix}.png")
        title = f"{run.run_id} · {split}"
    else:
        csv = target
        default_out = target.with_name(f"confusion_{target.stem}{suffix}.png")
        title = target.name
    frame, names = read_predictions(csv)
    destination = Path(out) if out else default_out
    if destination.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise UsageError(f"--out {destination}: unsupported image type; use a .png, .pdf, .svg or .jpg file name")
    if is_multilabel(frame, names):
        matrices = [confusion_counts(frame[f"{TRUE_PREFIX}{n}"].to_numpy(), frame[f"{PRED_PREFIX}{n}"].to_numpy(), 2)
                    for n in names]
        return save_label_confusions(destination, matrices, names, title, normalize=bool(normalize))
    cm = confusion_counts(frame["label"].to_numpy(), frame["prediction"].to_numpy(), len(names))
    panels = (False, True) if normalize is None else (normalize,)
    return save_confusion(destination, cm, names, title, panels)


# ---------------------------------------------------------------------------------------
# Workbooks
# ---------------------------------------------------------------------------------------


@dataclass
class Block:
    """A table on a sheet: a DataFrame, an optional title row above it, and number formats
    by column name (`formats`) or by the value in the first column (`row_formats`)."""

    frame: object
    title: str | None = None
    formats: dict = field(default_factory=dict)
    row_formats: dict = field(default_factory=dict)


def metric_format(name: str) -> str:
    return PERCENT if name in PERCENT_METRICS else DECIMAL


def _cell_value(value):
    if value is None:
        return None
    if isinstance(value, (float, np.floating)) and not np.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, dict)):
        return str(value)
    return value


def write_workbook(path: str | os.PathLike, sheets: dict[str, list[Block]],
                   images: dict[str, Sequence[Path]] | None = None) -> Path:
    """Write styled sheets: bold white-on-blue headers, titles in bold, number formats,
    column widths fitted to the content (first 500 rows), the first table's header frozen;
    `images` (sheet -> PNG files) are placed beside that sheet's tables."""
    from openpyxl import Workbook
    from openpyxl.drawing.image import Image
    from openpyxl.styles import Alignment, Font, PatternFill
    from openpyxl.utils import get_column_letter

    header_font = Font(bold=True, color="FFFFFF")
    header_fill = PatternFill("solid", fgColor="1F4E78")
    title_font = Font(bold=True, size=12)
    book = Workbook()
    book.remove(book.active)
    for sheet_name, blocks in sheets.items():
        ws = book.create_sheet(sheet_name[:31])
        widths: dict[int, int] = {}
        row = 1
        freeze = None
        for block in blocks:
            if block.title:
                ws.cell(row=row, column=1, value=block.title).font = title_font
                row += 1
            columns = [str(c) for c in block.frame.columns]
            for j, name in enumerate(columns, start=1):
                cell = ws.cell(row=row, column=j, value=name)
                cell.font, cell.fill = header_font, header_fill
                cell.alignment = Alignment(horizontal="center", vertical="center", wrap_text=False)
                widths[j] = max(widths.get(j, 0), len(name))
            freeze = freeze or f"A{row + 1}"
            for i, values in enumerate(block.frame.itertuples(index=False, name=None)):
                row += 1
                row_format = block.row_formats.get(values[0]) if values else None
                for j, (name, value) in enumerate(zip(columns, values), start=1):
                    cell = ws.cell(row=row, column=j, value=_cell_value(value))
                    fmt = block.formats.get(name) or (row_format if j > 1 else None)
                    if fmt and isinstance(cell.value, (int, float)) and not isinstance(cell.value, bool):
                        cell.number_format = fmt
                    if i < 500:
                        shown = 8 if fmt in (PERCENT, DECIMAL) else len(str(cell.value if cell.value is not None else ""))
                        widths[j] = max(widths[j], shown)
            row += 2
        for j, width in widths.items():
            ws.column_dimensions[get_column_letter(j)].width = min(max(width + 2, 8), 60)
        if freeze:
            ws.freeze_panes = freeze
        anchor_column = get_column_letter(len(widths) + 2)
        for k, picture in enumerate((images or {}).get(sheet_name, [])):
            image = Image(str(picture))
            image.width, image.height = image.width * 0.6, image.height * 0.6
            ws.add_image(image, f"{anchor_column}{1 + k * 24}")
    with fileio.atomic_path(path) as tmp:
        book.save(tmp)
    return Path(path)


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out.append((prefix, value))


def write_report(path, manifest: dict, evaluations: dict[str, tuple[dict, object]], history=None,
                 figures: dict[str, Sequence[Path]] | None = None) -> Path:
    """`report.xlsx` for one run: summary (metrics per split, then run and config), per-class,
    confusion matrix (counts and row-normalised per split; per label for multi-label), ROC
    (AUC and curve points per class and split, beside the figures), training history,
    predictions.

    `evaluations` maps split -> (metrics JSON as written by evaluate, predictions DataFrame);
    `figures` maps a sheet name to PNG files to place on it.
    """
    import pandas as pd

    splits = list(evaluations)
    task = evaluations[splits[0]][0].get("task", MULTI_CLASS)
    shown = (*SCALAR_METRICS, *TASK_METRICS[task])
    metrics_rows = [["n"] + [evaluations[s][0]["metrics"]["n"] for s in splits]]
    metrics_rows += [[m] + [evaluations[s][0]["metrics"].get(m) for s in splits] for m in shown]
    summary = Block(pd.DataFrame(metrics_rows, columns=["metric", *splits]),
                    row_formats={"n": INTEGER, **{m: metric_format(m) for m in shown}})

    model = manifest.get("model", {})
    dataset = manifest.get("dataset", {})
    info = [("run", manifest.get("run_id")), ("created", manifest.get("created")),
            ("dataset", dataset.get("flag")), ("size", dataset.get("size")),
            ("dataset official", dataset.get("official")), ("dataset synthetic", dataset.get("synthetic")),
            ("model", model.get("name")), ("pretrained", model.get("pretrained")), ("parameters", model.get("params"))]
    for split in splits:
        meta = evaluations[split][0]
        calibration = meta.get("calibration") or {}
        info += [(f"{split}: checkpoint", meta.get("checkpoint")),
                 (f"{split}: test-time views", ", ".join(meta["tta"]["views"])),
                 (f"{split}: temperature", temperature_text(calibration["temperature"]) if calibration else None)]
    _flatten("config", manifest.get("config", {}), info)
    run_block = Block(pd.DataFrame(info, columns=["item", "value"]), title="run and config")

    per_class = pd.DataFrame([{"split": s, **row} for s in splits for row in evaluations[s][0]["metrics"]["per_class"]])
    per_class_formats = {"precision": PERCENT, "recall": PERCENT, "f1": PERCENT, "auc": DECIMAL, "support": INTEGER}

    confusion_blocks = []
    for split in splits:
        meta = evaluations[split][0]
        if "label_confusion" in meta["metrics"]:
            tables = [(f"{split} · {name}", ["absent", "present"], np.asarray(cm, dtype=np.int64))
                      for name, cm in zip(meta["class_names"], meta["metrics"]["label_confusion"])]
        else:
            tables = [(split, meta["class_names"], np.asarray(meta["metrics"]["confusion_matrix"], dtype=np.int64))]
        for caption, names, cm in tables:
            totals = cm.sum(axis=1, keepdims=True)
            shares = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
            for values, kind, fmt in ((cm, "counts", INTEGER), (shares, "row-normalised", PERCENT)):
                frame = pd.DataFrame(values, columns=names)
                frame.insert(0, "true \\ predicted", names)
                confusion_blocks.append(Block(frame, title=f"{caption}: {kind} (rows = true class)",
                                              formats={n: fmt for n in names}))

    roc_rows, point_rows = [], []
    for split in splits:
        names = evaluations[split][0]["class_names"]
        for curve in roc_curves(*frame_arrays(evaluations[split][1], names), names, task):
            roc_rows.append({"split": split, "class": curve["name"], "auc": curve["auc"],
                             "prevalence": curve["prevalence"], "points": len(curve["fpr"])})
            point_rows += [{"split": split, "class": curve["name"], "fpr": f, "tpr": t, "threshold": h}
                           for f, t, h in zip(curve["fpr"], curve["tpr"], curve["threshold"])]
    roc_blocks = [Block(pd.DataFrame(roc_rows or [{"note": "no class with both positives and negatives"}]),
                        title="ROC AUC per class (one-vs-rest; binary-class: class 1)",
                        formats={"auc": DECIMAL, "prevalence": PERCENT}),
                  Block(pd.DataFrame(point_rows or [{"note": "no curve"}]), title="ROC curve points",
                        formats={"fpr": DECIMAL, "tpr": DECIMAL, "threshold": DECIMAL})]

    if history is not None and len(history):
        history_blocks = [Block(history, formats={c: DECIMAL for c in history.columns if history[c].dtype.kind == "f"})]
    else:
        history_blocks = [Block(pd.DataFrame({"note": ["no history.csv in this run"]}))]

    prediction_frames = []
    for split in splits:
        names = evaluations[split][0]["class_names"]
        frame = evaluations[split][1].copy()
        frame.insert(0, "split", split)
        if not is_multilabel(frame, names):
            frame.insert(3, "true class", [names[k] for k in frame["label"]])
            frame.insert(5, "predicted class", [names[k] for k in frame["prediction"]])
            frame.insert(6, "correct", frame["label"] == frame["prediction"])
        prediction_frames.append(frame)
    predictions = pd.concat(prediction_frames, ignore_index=True)
    prob_formats = {c: DECIMAL for c in predictions.columns if str(c).startswith(PROB_PREFIX)}

    return write_workbook(path, {
        "summary": [summary, run_block],
        "per-class": [Block(per_class, formats=per_class_formats)],
        "confusion matrix": confusion_blocks,
        "ROC": roc_blocks,
        "training history": history_blocks,
        "predictions": [Block(predictions, formats=prob_formats)],
    }, images=figures)
