"""Figures for people: confusion matrices, sample grids, reliability diagrams, ROC curves,
training curves, and the explanation figures (per-sample panels, class grids).

Everything here is a pure function of arrays, DataFrames or files; nothing imports torch, so
`plot-confusion` can redraw a confusion matrix from a predictions CSV on a machine without a
GPU stack. Figures use matplotlib's object API (`Figure`, no pyplot): no global state, no
backend to select, safe in tests. Every file is written through `fileio.atomic_path`.
Tables and workbooks live in `medcli.tables`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import fileio
from medcli.errors import UsageError
from medcli.names import short_names
from medcli.tables import read_predictions

__all__ = [
    "panels", "plot_confusion", "save_class_grid", "save_curves", "save_figure", "save_mistakes", "save_reliability",
    "save_roc", "save_sample_figure", "save_samples", "save_task_confusion",
]

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



# ---------------------------------------------------------------------------------------
# plot-confusion
# ---------------------------------------------------------------------------------------


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
        csv = run.predictions_file(split)
        default_out = run.figure_file(f"confusion_{split}{suffix}")
        title = f"{run.run_id} · {split}"
    else:
        csv = target
        default_out = target.with_name(f"confusion_{target.stem}{suffix}.png")
        title = target.name
    frame, task = read_predictions(csv)
    destination = Path(out) if out else default_out
    if destination.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise UsageError(f"--out {destination}: unsupported image type; use a .png, .pdf, .svg or .jpg file name")
    values = task.confusion(*task.csv_decisions(frame))
    names = list(task.names)
    if "label_confusion" in values:
        return save_label_confusions(destination, values["label_confusion"], names, title, normalize=bool(normalize))
    panels = (False, True) if normalize is None else (normalize,)
    return save_confusion(destination, np.asarray(values["confusion_matrix"]), names, title, panels)


# ---------------------------------------------------------------------------------------
# Explanation figures
# ---------------------------------------------------------------------------------------
DISPLAY_PX = 224  # per-sample panels are upsampled (nearest) to at least this many pixels
GAP_PX = 4
TITLE_PX = 18

def _as_rgb01(image):
    """uint8 (H, W, C) with 1 or 3 channels -> float32 (H, W, 3) in [0, 1]."""
    rgb = image.astype(np.float32) / 255.0
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb


def panels(image, heat) -> tuple:
    """(original, heat map, overlay) as uint8 RGB at the image's size; grad-cam's colouring."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = _as_rgb01(image)
    return ((rgb * 255).round().astype(np.uint8), show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.0),
            show_cam_on_image(rgb, heat, use_rgb=True, image_weight=0.5))


def save_sample_figure(path, image, heat, title: str) -> None:
    """original | heat map | overlay side by side, upsampled (nearest) for visibility, under a
    one-line title (true and predicted class, confidence, method, layer)."""
    from PIL import Image, ImageDraw

    parts = panels(image, heat)
    scale = max(1, -(-DISPLAY_PX // max(image.shape[:2])))
    big = [part.repeat(scale, axis=0).repeat(scale, axis=1) for part in parts]
    gap = np.full((big[0].shape[0], GAP_PX, 3), 255, dtype=np.uint8)
    body = np.concatenate([big[0], gap, big[1], gap, big[2]], axis=1)
    canvas = Image.new("RGB", (body.shape[1], body.shape[0] + TITLE_PX), "white")
    canvas.paste(Image.fromarray(body), (0, TITLE_PX))
    ImageDraw.Draw(canvas).text((4, 4), title, fill="black")
    with fileio.atomic_path(path) as tmp:
        canvas.save(tmp)


def save_class_grid(path, title: str, items: Sequence[tuple]) -> None:
    """One class's samples: originals above their overlays, a caption per column.

    `items`: (image uint8 (H, W, C), heat (H, W), caption) per sample.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed margins instead of tight_layout, which cost about a second per grid.
    fig, axes = plt.subplots(2, len(items), figsize=(1.8 * len(items) + 0.4, 4.2), squeeze=False,
                             gridspec_kw={"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 0.82,
                                          "wspace": 0.08, "hspace": 0.08})
    for column, (image, heat, caption) in enumerate(items):
        original, _, overlay = panels(image, heat)
        axes[0, column].imshow(original, interpolation="nearest")
        axes[1, column].imshow(overlay, interpolation="nearest")
        axes[0, column].set_title(caption, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    try:
        with fileio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
