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
import re
import textwrap
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import console, fileio
from medcli.errors import UsageError
from medcli.names import SPLITS, short_names
from medcli.datasets import provenance
from medcli.tables import read_predictions

__all__ = [
    "DISPLAY_PX", "GRID_COLUMNS", "MAP_CMAP", "TITLE_PX", "panels", "plot_confusion", "save_class_grid", "save_curves", "save_figure",
    "save_mistakes", "save_reliability", "save_roc", "save_sample_figure", "save_samples", "save_task_confusion",
]

_DPI = 130
# Paper figures (confusion, ROC, reliability, training curves) keep every text at least
# MIN_PRINT_PT points when printed PRINT_WIDTH_IN wide (178 mm, a two-column page's text width).
PRINT_WIDTH_IN, MIN_PRINT_PT = 7.0, 6.0
# a grid tile: its width in inches and its caption's font size (eight tiles a row print at their size on a page)
_TILE_IN, _CAPTION_PT = 0.875, 6.5


# ---------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------


def save_figure(fig, path: str | os.PathLike, dpi: float | None = None) -> Path:
    """Save a matplotlib Figure atomically (the format follows the file suffix). A constrained
    layout is laid out once before the save lays it out again: laid out once, an axes it made
    shorter could get finer ticks with longer labels than it made room for (a loss panel's
    "2.0950" cut to ".0950"). The layout pass alone, not a whole draw: half the cost."""
    if fig.axes and fig.get_layout_engine() is not None:  # (a figure without axes has nothing to lay out)
        fig.get_layout_engine().execute(fig)
    with fileio.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi or _DPI)
    return Path(path)


def _heading(width_in: float, title: str, note: str | None) -> tuple[str, str | None, float]:
    """A figure's title and data footer wrapped to its width, and the inches they take."""
    def fill(text: str, chars: int) -> str:  # each line of `text` wrapped to `chars`, never after a " ·"
        return "\n".join(textwrap.fill(line.replace(" \u00b7 ", " \u00b7\u00a0"), chars).replace("\u00a0", " ")
                         for line in text.split("\n"))

    chars = int(width_in * 72 / (0.6 * 12))  # a 12-pt line as wide as the figure
    title = fill(title, chars)
    note = fill(f"data: {note}", int(chars * 12 / 9)) if note else None
    lines = (title.count("\n") + 1) * 12 + ((note.count("\n") + 1) * 9 if note else 0)
    return title, note, lines * 1.3 / 72 + 0.2


def _finish(fig, path, title: str, note: str | None) -> Path:
    """Title a figure, add a red footer naming data that is not the official MedMNIST file
    (`datasets.provenance`), and save it."""
    title, note, _ = _heading(fig.get_figwidth(), title, note)
    fig.suptitle(title)
    if note:
        fig.supxlabel(note, color="tab:red", fontsize=9)
    return save_figure(fig, path)


def _wrapped(names: Sequence[str], width: int = 16) -> list[str]:
    """Class names for axis ticks and legends: shortened (`short_names`) but never cut, wrapped
    onto lines of about `width` characters."""
    return ["\n".join(textwrap.wrap(name, width)) for name in short_names(names, width=60)]


def _share(value: float) -> str:
    """A row-normalised cell, in percent of its row (the panel's title says "%": "100%" was wider
    than an eight-class cell): whole numbers, but a share that is neither none nor all never
    reads as 0 or 100 (1 of 218 images is "<1", 217 of 218 ">99")."""
    text = f"{value * 100:.0f}"
    if 0 < value < 1:  # rounded as the format rounds (0.005 reads "0": half to even)
        return {"0": "<1", "100": ">99"}.get(text, text)
    return text


def draw_confusion(ax, cm: np.ndarray, names: Sequence[str], normalize: bool) -> None:
    """Draw one confusion matrix on `ax` (rows = true class): counts, or row-normalised shares.

    The single drawing routine behind evaluate's figure and `plot-confusion`. Rows of classes
    absent from the labels stay 0 when normalised instead of dividing by zero.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if normalize:
        totals = cm.sum(axis=1, keepdims=True)
        values = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
        labels = [[_share(v) for v in row] for row in values]
        values = values * 100
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=100.0)
    else:
        values = cm
        image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=max(values.max(), 1.0))
        labels = [[f"{int(v)}" for v in row] for row in values]
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    n = len(names)
    threshold = image.norm.vmax / 2
    fontsize = _cell_fontsize(n)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=fontsize,
                    color="white" if values[i, j] > threshold else "black")
    # slanted names on few long lines (more lines would run into the next name), upright on short ones
    ax.set_xticks(range(n), _wrapped(names, width=28), rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(n), _wrapped(names), fontsize=9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("% of the true class\n(recall on the diagonal)" if normalize else "counts")  # fits a 2-class panel


def _cell_fontsize(classes: int) -> int:
    """The points of a confusion matrix's cell values (and the smallest of its texts)."""
    return 9 if classes <= 10 else 8 if classes <= 12 else 7  # "100" and ">99" fit a cell


def save_confusion(path: str | os.PathLike, cm: np.ndarray, names: Sequence[str], title: str,
                   panels: Sequence[bool] = (False, True), note: str | None = None) -> Path:
    """A confusion-matrix figure with one panel per entry of `panels` (False = counts,
    True = row-normalised); evaluate draws both, side by side up to 8 classes and stacked above
    (their text would print below MIN_PRINT_PT at a page's width)."""
    from matplotlib.figure import Figure

    side = max(3.6, 0.42 * len(names) + 1.8)
    # side by side while the smallest text still prints at MIN_PRINT_PT on a page's width, else stacked
    beside = _cell_fontsize(len(names)) * PRINT_WIDTH_IN / (side * len(panels)) >= MIN_PRINT_PT
    columns = len(panels) if beside else 1
    width = side * columns  # and as high as its panels, plus its title and data footer
    fig = Figure(figsize=(width, side * -(-len(panels) // columns) + _heading(width, title, note)[2]),
                 layout="constrained")
    axes = fig.subplots(-(-len(panels) // columns), columns, squeeze=False).ravel()
    for ax, normalize in zip(axes, panels):
        draw_confusion(ax, cm, names, normalize)
    return _finish(fig, path, title, note)


def _caption_lines(caption: str, width_pt: float = 0.92 * _TILE_IN * 72) -> list[str]:
    """A tile's caption wrapped to `width_pt`, measured in the caption's font: at spaces, and
    after the "+" that joins a multi-label sample's labels; a name is split only when it alone
    is wider than the tile."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import text_to_path

    font = FontProperties(size=_CAPTION_PT)

    def fits(text: str) -> bool:  # the laid-out advance width: 30x faster than a TextPath's extents
        return text_to_path.get_text_width_height_descent(text, font, ismath=False)[0] <= width_pt

    lines = []
    for paragraph in caption.split("\n"):
        line = ""
        for word in re.findall(r"\S+?\+|\S+", paragraph):  # "a+b c" -> "a+", "b", "c"
            joined = line + ("" if not line or line.endswith("+") else " ") + word
            if fits(joined):
                line = joined
                continue
            if line:
                lines.append(line)
            while not fits(word):  # one name wider than the tile: split it where it must
                cut = max(k for k in range(1, len(word) + 1) if k == 1 or fits(word[:k]))
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    return lines


def _image_grid(path, images: np.ndarray, titles: Sequence[str], correct: Sequence[bool], title: str,
                note: str | None, empty: str = "nothing to show", columns: int = 8) -> Path:
    """Thumbnails with a caption each; a green frame marks a right prediction, red a wrong one.

    The tiles are composed into one mosaic array drawn on a single axes: one image instead of
    32 subplots keeps a grid at a fraction of a second. Each cell is _TILE_IN wide, so eight a
    row print at their size on a page; captions are wrapped to it and the caption row grows
    with the longest one.
    """
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure

    n = len(images)
    rows = max(1, -(-n // columns))
    height, width = (images.shape[1], images.shape[2]) if n else (28, 28)
    frame = max(1, height // 14)
    cell_h, cell_w = height + 2 * frame, width + 2 * frame
    gap = max(2, cell_w // 8)
    inch = _TILE_IN / (cell_w + gap)
    titles = ["\n".join(_caption_lines(caption)) for caption in titles]
    lines = max((caption.count("\n") + 1 for caption in titles), default=2)
    caption_h = max(cell_h // 2, int(np.ceil((lines * _CAPTION_PT * 1.3 / 72 + 0.08) / inch)))
    mosaic = np.ones((rows * (cell_h + caption_h), columns * (cell_w + gap), 3))
    size = (mosaic.shape[1] * inch, mosaic.shape[0] * inch)
    fig = Figure(figsize=(size[0], size[1] + _heading(size[0], title, note)[2]), layout="constrained")
    ax = fig.subplots()
    ax.set_axis_off()
    for k, (image, caption, ok) in enumerate(zip(images, titles, correct)):
        top, left = (k // columns) * (cell_h + caption_h), (k % columns) * (cell_w + gap)
        colour = "tab:green" if ok else "tab:red"
        mosaic[top:top + cell_h, left:left + cell_w] = to_rgb(colour)
        tile = image.astype(np.float64) / 255.0
        mosaic[top + frame:top + frame + height, left + frame:left + frame + width] = (
            np.repeat(tile, 3, axis=-1) if tile.shape[-1] == 1 else tile)
        ax.text(left + cell_w / 2, top + cell_h + 0.5, caption, ha="center", va="top", fontsize=_CAPTION_PT,
                color=colour)
    ax.imshow(mosaic, interpolation="nearest")
    if n == 0:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
    return _finish(fig, path, title, note)


Captions = tuple  # (true texts, predicted texts, right or wrong, confidence): tasks.Task.describe


def save_samples(path, images: np.ndarray, captions: Captions, title: str, note: str | None = None,
                 count: int = 32) -> Path:
    """A representative grid: `count` samples evenly spaced over the split (deterministic),
    captioned true / predicted with the prediction's confidence, framed green (right) or red
    (wrong)."""
    truth, predicted, right, confidence = captions
    picks = np.unique(np.linspace(0, len(truth) - 1, num=min(count, len(truth))).round().astype(int))
    texts = [f"T: {truth[i]}\nP: {predicted[i]} ({confidence[i]:.0%})" for i in picks]
    return _image_grid(path, images[picks], texts, [right[i] for i in picks], title, note)


def save_mistakes(path, images: np.ndarray, captions: Captions, title: str, note: str | None = None,
                  count: int = 16) -> Path:
    """The `count` wrong predictions the model was most sure of: where to look for label noise
    or a systematic confusion. Without any, the figure says so."""
    truth, predicted, right, confidence = captions
    wrong = np.flatnonzero(~np.asarray(right, dtype=bool))
    worst = wrong[np.argsort(-np.asarray(confidence)[wrong], kind="stable")][:count]
    texts = [f"#{i} T: {truth[i]}\nP: {predicted[i]} ({confidence[i]:.0%})" for i in worst]
    return _image_grid(path, images[worst], texts, [False] * len(worst), title, note,
                       empty=f"no mistakes: all {len(truth)} predictions are right")


def _save_confusion_grid(path, tables: Sequence[tuple], title: str, normalize: bool = False,
                         note: str | None = None, columns: int = 4) -> Path:
    """Captioned matrices in a grid (a multi-label task: one 2x2 per label, rows = truly
    absent / present), the axis names only on the left column and under each column's last
    matrix; four columns keep it within PRINT_WIDTH_IN's scale for MIN_PRINT_PT."""
    from matplotlib.figure import Figure

    n = len(tables)
    cols = min(columns, max(n, 1))
    rows = max(1, -(-n // cols))
    fig = Figure(figsize=(2.45 * cols, 2.35 * rows + 0.5), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    captions = _wrapped([caption for caption, _, _ in tables], width=28)
    for k, (ax, caption, (_, names, cm)) in enumerate(zip(axes, captions, tables)):
        draw_confusion(ax, np.asarray(cm), names, normalize)
        ax.set_title(caption, fontsize=9)
        if k % cols:
            ax.set_ylabel("")
        if k + cols < n:  # another matrix below it
            ax.set_xlabel("")
    for ax in axes[n:]:
        ax.set_axis_off()
    return _finish(fig, path, f"{title}{' (row-normalised: % of the true class)' if normalize else ''}", note)


def save_task_confusion(path, tables: Sequence[tuple], title: str, note: str | None = None,
                        normalize: bool | None = None) -> Path:
    """The confusion figure of `Task.confusion_tables`: one class matrix, counts and
    row-normalised (`save_confusion`: side by side, stacked from 9 classes) unless `normalize` picks one; or a grid of captioned matrices
    (a multi-label task's 2x2 per label)."""
    if len(tables) == 1 and tables[0][0] is None:
        _, names, cm = tables[0]
        return save_confusion(path, cm, names, title, (False, True) if normalize is None else (normalize,), note)
    return _save_confusion_grid(path, tables, title, normalize=bool(normalize), note=note)


_LINE_STYLES = ("-", "--", ":", "-.")
_LEGEND_INSIDE = 4  # with more classes, one legend (AUC and AP) goes below both plots


def save_roc(path, curves: Sequence[dict], title: str, note: str | None = None) -> Path:
    """ROC curves (left) and precision-recall curves (right), one line per class or label
    (`tables.roc_curves`), each legend giving the class's AUC or average precision (AP); the
    precision-recall title gives the macro average of the APs (of two or more curves). With more than _LEGEND_INSIDE
    curves one legend below both plots gives each class's AUC and AP (inside, it would hide
    the curves)."""
    from matplotlib.figure import Figure

    below = len(curves) > _LEGEND_INSIDE
    key_h = 0.17 * -(-len(curves) // 2) + 0.15 if below else 0.0  # the legend's own row under the plots
    fig = Figure(figsize=(8.4, 4.2 + key_h), layout="constrained")
    axes = fig.subplot_mosaic([["roc", "pr"], ["key", "key"]] if below else [["roc", "pr"]],
                              height_ratios=[3.6, key_h] if below else None)
    roc_ax, pr_ax = axes["roc"], axes["pr"]
    for k, (curve, name) in enumerate(zip(curves, _wrapped([c["name"] for c in curves], width=30))):
        # ten colours, then the same colours dashed, dotted...: no two curves look alike
        style = {"lw": 1.2, "color": f"C{k % 10}", "ls": _LINE_STYLES[k // 10 % len(_LINE_STYLES)]}
        roc_ax.plot(curve["fpr"], curve["tpr"], **style, label=f"{name} (AUC {curve['auc']:.3f})")
        pr_ax.plot(curve["recall"], curve["precision"], **style, drawstyle="steps-post",
                   label=f"{name} (AP {curve['ap']:.3f})")
    roc_ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    # a mean over two or more curves; one curve (a binary task's) has its AP in its legend
    macro_ap = f" (macro AP {np.mean([c['ap'] for c in curves]):.3f})" if len(curves) > 1 else ""
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"precision-recall{macro_ap}", xlim=(0, 1), ylim=(0, 1.01))
    if below:
        axes["key"].set_axis_off()
        axes["key"].legend(roc_ax.get_lines()[:len(curves)],
                           [f"{name} (AUC {c['auc']:.3f}, AP {c['ap']:.3f})"
                            for c, name in zip(curves, _wrapped([c["name"] for c in curves], width=30))],
                           loc="center", ncols=2, fontsize=8, handlelength=2.6)
    elif curves:
        roc_ax.legend(fontsize=8, loc="lower right")
        pr_ax.legend(fontsize=8, loc="lower left")
    else:
        roc_ax.text(0.5, 0.5, "no class has both positives and negatives", ha="center", va="center")
    return _finish(fig, path, title, note)


def save_reliability(path, panels: Sequence[tuple[str, dict]], title: str, note: str | None = None) -> Path:
    """Reliability diagram(s) from `Task.reliability` bins: accuracy per confidence bin (solid
    bars) against the diagonal, the gap to the bin's mean confidence as a hatched outline drawn
    over them without hiding them, and the share of samples per bin underneath. Several
    panels (e.g. before / after temperature scaling) sit side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.9 * len(panels) + 1.8, 5.0), layout="constrained")
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
        top.bar(centres[filled], conf - acc, bottom=acc, width=width, fill=False, hatch="///", edgecolor="tab:red",
                linewidth=0.8, label="gap to mean confidence")
        top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        top.set_title(textwrap.fill(f"{name}: ECE {bins['ece']:.2%}", 50), fontsize=10)
        share = np.asarray(bins["count"], dtype=float) / max(sum(bins["count"]), 1)
        bottom.bar(centres, share, width=width, color="gray", edgecolor="black")
        bottom.set_xlabel(f"confidence ({bins['confidence_of']})")
        bottom.set_ylabel("share")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=9)  # beside the bars, hiding none
    return _finish(fig, path, title, note)


def save_curves(path, history: Sequence[dict], manifest: dict, best_epoch: int, best_by: str,
                val: str = "val") -> Path:
    """Training curves: loss, accuracy (with validation macro F1 and AUC) and learning rate
    per epoch (train's `history`) on integer epoch ticks, the best epoch (best.pt) marked,
    titled with the model, data and run of `manifest` and what best.pt was chosen by
    (`best_by`, e.g. "auc (EMA, mean of 3 epochs)"), and the data's `provenance` as a footer.
    `val` names the validation curves (the EMA's weights are not the ones the train curves are of)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], "o-", label=val)
    axes[0].set_title("loss")
    axes[1].plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    axes[1].plot(epochs, [r["val_acc"] for r in history], "o-", label=val)
    axes[1].plot(epochs, [r["val_f1"] for r in history], "--", label=f"{val} macro F1")
    axes[1].plot(epochs, [np.nan if r["val_auc"] is None else r["val_auc"] for r in history], ":", label=f"{val} AUC")
    axes[1].set_title("accuracy, F1, AUC")
    axes[2].plot(epochs, [r["lr"] for r in history], "o-")
    axes[2].set_title("learning rate (last step of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.axvline(best_epoch, color="black", ls="-.", lw=1.0, label=f"best epoch ({best_epoch})")
    for ax in axes[:2]:  # below the panel: a legend inside hid the curves it names
        ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    config, data = manifest["config"], manifest["dataset"]
    title = (f"{config['model']} · {data['flag']} {data['size']} px · run {manifest['run_id']}\n"
             f"best val {best_by}: epoch {best_epoch}")
    return _finish(fig, path, title, provenance(data))



# ---------------------------------------------------------------------------------------
# plot-confusion
# ---------------------------------------------------------------------------------------


def plot_confusion(target: str | os.PathLike, split: str = "test", normalize: bool | None = None,
                   out: str | os.PathLike | None = None) -> Path:
    """Redraw a confusion matrix from a predictions CSV alone (no model, no torch).

    `target` is a run directory (its `predictions/<split>.csv` is used) or a CSV path.
    normalize None draws counts and row-normalised, side by side or stacked (evaluate's figure; a
    multi-label run: a grid of per-label counts); True or False draws that one panel (grid). The default output is the run's
    `figures/confusion_<split>[_normalized|_counts].png`, or beside the CSV.
    """
    from medcli.run import Run

    target = Path(target)
    suffix = {None: "", True: "_normalized", False: "_counts"}[normalize]
    if split not in SPLITS:
        raise UsageError(f"unknown --split '{split}'; choose one of {', '.join(SPLITS)}")
    if not target.exists():
        raise UsageError(f"{target} does not exist; pass a run directory or a predictions CSV from 'medcli evaluate'")
    if target.is_dir():
        run = Run.open(target)  # a directory must be a readable run (one-line refusal otherwise)
        csv = run.predictions_file(split)
        if not csv.is_file():
            raise UsageError(f"run {run.run_dir} has no {run.relative(csv)}; write it with "
                             f"'{run.evaluate_command(split)}'")
        default_out = run.figure_file("confusion", split, suffix)
        title, note = f"{run.run_id} · {split}", provenance(run.dataset)
    else:
        csv = target
        default_out = target.with_name(f"confusion_{target.stem}{suffix}.png")
        run = Run.of_predictions(target)  # a run's own CSV keeps the run's title and data provenance
        title, note = (f"{run.run_id} · {target.stem}", provenance(run.dataset)) if run else (target.name, None)
    frame, task = read_predictions(csv)
    destination = Path(out) if out else default_out
    fileio.output_file(destination)  # a folder there, a file on its way, or an unwritable folder: refused
    if destination.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise UsageError(f"--out {destination}: unsupported image type; use a .png, .pdf, .svg or .jpg file name")
    if destination.exists():
        console.warn(f"replacing the earlier {destination}")
    tables = task.confusion_tables(task.confusion(*task.csv_decisions(frame)))
    return save_task_confusion(destination, tables, title, note, normalize)


# ---------------------------------------------------------------------------------------
# Explanation figures
# ---------------------------------------------------------------------------------------
DISPLAY_PX = 224  # per-sample panels are upsampled (nearest) to at least this many pixels
GAP_PX = 4
FONT_PX = 18  # text on a sample figure (Pillow's scalable font): about 6 pt printed 3.5 in wide, 11 pt at 6.5 in
LINE_PX = FONT_PX + 6
TITLE_PX = LINE_PX + 4  # one title line above the panels
BAR_PX = 12  # the colour bar beside a sample figure
MAP_CMAP = "inferno"  # perceptually uniform (unlike jet), dark where a map is low, bright where high
OVERLAY_WEIGHT = 0.5  # the coloured map's share of an overlay, the image keeps the rest


def _as_rgb01(image):
    """uint8 (H, W, C) with 1 or 3 channels -> float32 (H, W, 3) in [0, 1]."""
    rgb = image.astype(np.float32) / 255.0
    return np.repeat(rgb, 3, axis=2) if rgb.shape[2] == 1 else rgb


def _coloured(values) -> np.ndarray:
    """Map values in [0, 1] -> float (..., 3) RGB in MAP_CMAP."""
    from matplotlib import colormaps

    return colormaps[MAP_CMAP](np.clip(values, 0.0, 1.0))[..., :3].astype(np.float32)


def _uint8(rgb01) -> np.ndarray:
    return (rgb01 * 255).round().astype(np.uint8)


def panels(image, heat) -> tuple:
    """(original, heat map, overlay) as uint8 RGB at the image's size: the map coloured with
    MAP_CMAP, and blended with the image (OVERLAY_WEIGHT) for the overlay."""
    rgb = _as_rgb01(image)
    heat_rgb = _coloured(heat)
    return _uint8(rgb), _uint8(heat_rgb), _uint8((1 - OVERLAY_WEIGHT) * rgb + OVERLAY_WEIGHT * heat_rgb)


def _text_lines(draw, text: str, font, width: int) -> list[str]:
    """`text` wrapped at its spaces onto lines at most `width` pixels wide in `font` (a longer
    word keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def save_sample_figure(path, image, heat, title: str, note: str | None = None) -> Path:
    """original | heat map | overlay side by side, upsampled (nearest) for visibility, with a
    colour bar (map value 0 to 1), under a title (true and predicted class, confidence, method,
    layer; wrapped to the width); `note` (`datasets.provenance`) goes underneath in red."""
    from PIL import Image, ImageDraw, ImageFont

    parts = panels(image, heat)
    scale = max(1, -(-DISPLAY_PX // max(image.shape[:2])))
    big = [part.repeat(scale, axis=0).repeat(scale, axis=1) for part in parts]
    height = big[0].shape[0]
    gap = np.full((height, GAP_PX, 3), 255, dtype=np.uint8)
    bar = _uint8(_coloured(np.linspace(1.0, 0.0, height))[:, None, :].repeat(BAR_PX, axis=1))
    body = np.concatenate([big[0], gap, big[1], gap, big[2], gap, gap, bar], axis=1)
    width = body.shape[1] + 4 * GAP_PX + FONT_PX
    font = ImageFont.load_default(size=FONT_PX)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heading = _text_lines(measure, title, font, width - 8)
    footer = _text_lines(measure, f"data: {note}", font, width - 8) if note else []
    top = 4 + LINE_PX * len(heading)
    canvas = Image.new("RGB", (width, top + height + (4 + LINE_PX * len(footer) if footer else 0)), "white")
    canvas.paste(Image.fromarray(body), (0, top))
    draw = ImageDraw.Draw(canvas)
    for number, line in enumerate(heading):
        draw.text((4, 4 + LINE_PX * number), line, fill="black", font=font)
    draw.text((body.shape[1] + GAP_PX, top), "1", fill="black", font=font)
    draw.text((body.shape[1] + GAP_PX, top + height - LINE_PX), "0", fill="black", font=font)
    for number, line in enumerate(footer):
        draw.text((4, top + height + 4 + LINE_PX * number), line, fill=(200, 0, 0), font=font)
    with fileio.atomic_path(path) as tmp:
        canvas.save(tmp)
    return Path(path)


GRID_COLUMNS = 8  # samples a row of a class grid; more wrap onto further rows (no strip too wide to print)


def save_class_grid(path, title: str, items: Sequence[tuple], note: str | None = None) -> Path:
    """One class's samples: originals above their map overlays, GRID_COLUMNS a row, a
    caption per column, the rows labelled, a colour bar for the map, and `note`
    (`datasets.provenance`) as a red footer.

    `items`: (image uint8 (H, W, C), heat (H, W), caption) per sample.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    columns = min(len(items), GRID_COLUMNS)
    blocks = -(-len(items) // columns)  # an image row above its overlay row, per GRID_COLUMNS samples
    width = 1.8 * columns + 1.5
    heading = textwrap.fill(title, max(30, int(7 * width)))
    # Fixed margins instead of a layout engine, which cost about a second per grid: the title's
    # lines (suptitle, 'large': 0.25 in each) and two caption lines (7 pt) above each block.
    top_in, caption_in, block_in = 0.15 + 0.25 * (heading.count("\n") + 1) + 0.35, 0.35, 3.5
    height = top_in + blocks * block_in + (blocks - 1) * caption_in
    left, right, bottom = 0.45 / width, 1 - 1.0 / width, (0.35 if note else 0.05) / height
    fig = Figure(figsize=(width, height))
    outer = fig.add_gridspec(blocks, 1, left=left, right=right, bottom=bottom, top=1 - top_in / height,
                             hspace=caption_in / block_in)
    rows = []  # (image axes, overlay axes) per block
    for block in range(blocks):
        grid = outer[block].subgridspec(2, columns, wspace=0.08, hspace=0.08)
        shown = range(min(columns, len(items) - block * columns))
        rows.append(([fig.add_subplot(grid[0, c]) for c in shown], [fig.add_subplot(grid[1, c]) for c in shown]))
    for number, (image, heat, caption) in enumerate(items):
        original, _, overlay = panels(image, heat)
        above, below = (row[number % columns] for row in rows[number // columns])
        above.imshow(original, interpolation="nearest")
        below.imshow(overlay, interpolation="nearest")
        above.set_title(caption, fontsize=7)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.spines[:].set_visible(False)
    for above, below in rows:
        above[0].set_ylabel("image", fontsize=8)
        below[0].set_ylabel("map over image", fontsize=8)
    overlay_box = rows[0][1][-1].get_position()
    colour_bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap=MAP_CMAP), cax=fig.add_axes(
        (right + 0.15 / width, overlay_box.y0, 0.12 / width, overlay_box.height)))
    colour_bar.set_label("map value", fontsize=7)
    colour_bar.ax.tick_params(labelsize=7)
    return _finish(fig, path, heading, note)
