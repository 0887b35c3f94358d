"""Tables for people and programs: the predictions CSV (with its task sidecar), plain CSV
tables, ROC curve points, and the styled Excel workbooks (`report.xlsx`, the aggregate
workbook).

Pure functions of arrays, DataFrames or files; nothing imports torch. Every file is written
through `fileio.atomic_path`.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import datasets, fileio, tasks
from medcli.errors import UsageError
from medcli.metrics import interval_caption, mixed_evaluations, temperature_applied, temperature_text
from medcli.names import PERCENT_METRICS, SCALAR_METRICS

__all__ = [
    "Block", "DECIMAL", "INTEGER", "PERCENT", "PROB_PREFIX", "frame_arrays", "metric_format", "predictions_frame",
    "read_predictions", "roc_curves", "task_file", "write_predictions", "write_report", "write_table",
    "write_workbook",
]

PROB_PREFIX = "prob_"
PERCENT = "0.00%"
DECIMAL = "0.0000"
INTEGER = "0"
LR = "0.00E+00"  # a learning rate: 3.6e-06 is not "0.0000"


def roc_curves(indicator: np.ndarray, probs: np.ndarray, names: Sequence[str], classes: Sequence[int]) -> list[dict]:
    """ROC and precision-recall curve points of `classes` (the task's `roc_classes`: every
    class, or the finding alone for a binary-class task), one-vs-rest
    (`indicator` (N, K): which samples belong to each class or carry each label). A class
    without positives or negatives has no curve. For the figure and the workbook; `ap` is
    sklearn's average precision (the step-wise area under the precision-recall curve)."""
    from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

    indicator = np.asarray(indicator, dtype=bool)
    curves = []
    for k in classes:
        positive = indicator[:, k]
        if positive.all() or not positive.any():
            continue
        fpr, tpr, thresholds = roc_curve(positive, probs[:, k])
        precision, recall, _ = precision_recall_curve(positive, probs[:, k])
        curves.append({"class": int(k), "name": names[k], "fpr": fpr, "tpr": tpr, "threshold": thresholds,
                       "precision": precision, "recall": recall, "auc": float(auc(fpr, tpr)),
                       "ap": float(average_precision_score(positive, probs[:, k])),
                       "prevalence": float(positive.mean())})
    return curves


def frame_arrays(frame, task: tasks.Task) -> tuple[np.ndarray, np.ndarray]:
    """(indicator (N, K), probabilities (N, K)) of a predictions table of `task`."""
    probs = frame[[f"{PROB_PREFIX}{n}" for n in task.names]].to_numpy(dtype=np.float64)
    return task.indicator(task.csv_decisions(frame)[0]), probs


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


def predictions_frame(task: tasks.Task, labels: np.ndarray, probs: np.ndarray):
    """The predictions table: index, the task's label and decision columns (single-label:
    label, prediction; multi-label: `true_<label>` and `pred_<label>` per label), then
    `prob_<class>` per class or label."""
    import pandas as pd

    columns = {"index": np.arange(len(labels)), **task.csv_columns(labels, task.predictions(probs))}
    columns |= {f"{PROB_PREFIX}{name}": probs[:, k] for k, name in enumerate(task.names)}
    return pd.DataFrame(columns)


def task_file(csv: str | os.PathLike) -> Path:
    """The sidecar that names a predictions CSV's task type and classes (`<csv>.task.json`)."""
    return Path(csv).with_suffix(".task.json")


def write_predictions(path, task: tasks.Task, labels: np.ndarray, probs: np.ndarray,
                      temperature=None) -> tuple[Path, Path]:
    """The CSV and its task sidecar. Probabilities are written in the shortest text that reads
    back to the same float (rounded ones would tie scores the model kept apart, and the AUC
    computed from the file would move). They are the model's own; `temperature` (fitted by
    `evaluate --calibrate`, per label for multi-label tasks) is recorded in the sidecar: the
    calibrated probabilities are those of the logits divided by it."""
    with fileio.atomic_path(path) as tmp:
        predictions_frame(task, labels, probs).to_csv(tmp, index=False)
    sidecar = {"task": task.kind, "class_names": list(task.names), "probabilities": "uncalibrated",
               **({} if temperature is None else {"temperature": temperature})}
    return Path(path), fileio.write_json(task_file(path), sidecar)


def read_predictions(path: str | os.PathLike, content: bytes | None = None):
    """Read and check a predictions CSV; returns (DataFrame, its task). The task comes from the
    CSV's sidecar (`task_file`); a CSV without one (written before medcli recorded it) is read
    by its layout. `content`: the file's bytes, already read (and checked) by the caller."""
    import pandas as pd

    path = Path(path)
    if content is None and not path.is_file():
        raise UsageError(f"no predictions file {path}; run 'medcli evaluate' on the run first (or pass the CSV path)")
    try:
        frame = pd.read_csv(path if content is None else io.BytesIO(content))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path} as CSV ({' '.join(str(exc).split())}); pass a file written by 'medcli evaluate'") from None
    if frame.empty:
        raise UsageError(f"{path} holds no predictions (a header only); re-run 'medcli evaluate'")
    names = [c[len(PROB_PREFIX):] for c in frame.columns if str(c).startswith(PROB_PREFIX)]
    if len(names) < 2:
        raise UsageError(f"{path} lacks the columns {PROB_PREFIX}<class> (one per class); pass a predictions CSV "
                         f"written by 'medcli evaluate'")
    task = _csv_task(path, frame, names)
    required = task.csv_required()
    missing = [c for c in ("index", *required) if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} lacks the columns {', '.join(missing)}; pass a predictions CSV written by 'medcli evaluate'")
    for column, upper in required.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any() or (values % 1 != 0).any() or values.min() < 0 or values.max() > upper:
            raise UsageError(f"{path}: column '{column}' must hold integers 0..{upper}; the file is damaged, re-run 'medcli evaluate'")
        frame[column] = values.astype(np.int64)
    return frame, task


def _csv_task(path: Path, frame, names: list[str]) -> tasks.Task:
    """The task a predictions CSV was written for: its sidecar's, checked against the header."""
    import json

    sidecar = task_file(path)
    if not sidecar.is_file():
        return tasks.from_columns(frame.columns, names)
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8"))
        task = tasks.for_kind(recorded["task"], recorded["class_names"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{sidecar} is unreadable ({type(exc).__name__}); re-run 'medcli evaluate' "
                         f"(or delete it to read {path.name} by its columns)") from None
    if list(task.names) != names:
        raise UsageError(f"{path} does not match {sidecar.name} (its classes differ); re-run 'medcli evaluate'")
    return task


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
    buffer = io.BytesIO()  # saved to a file, openpyxl keeps it open after a failed write (a full disk stays full)
    book.save(buffer)
    return fileio.write_bytes(path, buffer.getvalue())


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out.append((prefix, value))


def write_report(path, manifest: dict, evaluations: dict[str, tuple[dict, object]], history=None,
                 figures: dict[str, Sequence[Path]] | None = None) -> Path:
    """`report.xlsx` for one run: summary (metrics per split under the data's `provenance`,
    their bootstrap intervals, calibration before and after temperature scaling, then run and
    config), per-class, confusion matrix (counts and row-normalised per split; per label for
    multi-label), ROC (AUC, average precision and curve points per class and split, beside the
    figures), reliability (the bins behind each reliability diagram), training history,
    predictions.

    `evaluations` maps split -> (metrics JSON as written by evaluate, predictions DataFrame);
    `figures` maps a sheet name to PNG files to place on it.
    """
    import pandas as pd

    splits = list(evaluations)
    first = evaluations[splits[0]][0]
    task = tasks.for_kind(first.get("task", tasks.MultiClass.kind), first["class_names"])
    shown = (*SCALAR_METRICS, *task.extra_metrics)
    metrics_rows = [["n"] + [evaluations[s][0]["metrics"]["n"] for s in splits]]
    metrics_rows += [[m] + [evaluations[s][0]["metrics"].get(m) for s in splits] for m in shown]
    model = manifest.get("model", {})
    dataset = manifest.get("dataset", {})
    # what each split was evaluated on (`evaluate --root` may point at another file than training's)
    notes = {s: datasets.provenance(evaluations[s][0].get("dataset") or dataset) for s in splits}
    note = next(iter(notes.values())) if len(set(notes.values())) == 1 else \
        "; ".join(f"{s}: {n or 'the official file'}" for s, n in notes.items())
    scaled = [s for s in splits if temperature_applied(evaluations[s][0].get("calibration"))]
    titles = ([f"data: {note}"] if note else []) + ([
        f"ece, nll and brier of {', '.join(scaled)} are after temperature scaling (loss is the model's own; before "
        "and after: the calibration rows below)"] if scaled else [])
    titles += [mixed] if (mixed := mixed_evaluations({s: evaluations[s][0] for s in splits})) else []
    summary = Block(pd.DataFrame(metrics_rows, columns=["metric", *splits]), title="; ".join(titles) or None,
                    row_formats={"n": INTEGER, **{m: metric_format(m) for m in shown}})
    info = [("run", manifest.get("run_id")), ("created", manifest.get("created")),
            ("dataset", dataset.get("flag")), ("size", dataset.get("size")),
            ("dataset official", dataset.get("official")), ("dataset synthetic", dataset.get("synthetic")),
            ("dataset sample", dataset.get("sample")),
            ("model", model.get("name")), ("pretrained", model.get("pretrained")), ("parameters", model.get("params"))]
    for split in splits:
        meta = evaluations[split][0]
        calibration = meta.get("calibration") or {}
        info += [(f"{split}: data", notes[split] or "the official file"),
                 (f"{split}: checkpoint", meta.get("checkpoint")),
                 (f"{split}: test-time views", ", ".join(meta["tta"]["views"])),
                 (f"{split}: temperature", temperature_text(calibration["temperature"]) if calibration
                  else "not calibrated")]
    _flatten("config", manifest.get("config", {}), info)
    run_block = Block(pd.DataFrame(info, columns=["item", "value"]), title="run and config")

    per_class = pd.DataFrame([{"split": s, **row} for s in splits for row in evaluations[s][0]["metrics"]["per_class"]])
    per_class_formats = {"precision": PERCENT, "recall": PERCENT, "f1": PERCENT, "auc": DECIMAL, "support": INTEGER}

    confusion_blocks = []
    for split in splits:
        meta = evaluations[split][0]
        task = tasks.for_kind(meta["task"], meta["class_names"])
        for caption, names, cm in task.confusion_tables(meta["metrics"]):
            caption = split if caption is None else f"{split} · {caption}"
            totals = cm.sum(axis=1, keepdims=True)
            shares = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
            for values, kind, fmt in ((cm, "counts", INTEGER), (shares, "row-normalised", PERCENT)):
                frame = pd.DataFrame(values, columns=names)
                frame.insert(0, "true \\ predicted", names)
                confusion_blocks.append(Block(frame, title=f"{caption}: {kind} (rows = true class)",
                                              formats={n: fmt for n in names}))

    roc_rows, point_rows = [], []
    for split in splits:
        for curve in roc_curves(*frame_arrays(evaluations[split][1], task), task.names, task.roc_classes()):
            roc_rows.append({"split": split, "class": curve["name"], "auc": curve["auc"], "ap": curve["ap"],
                             "prevalence": curve["prevalence"], "points": len(curve["fpr"])})
            point_rows += [{"split": split, "class": curve["name"], "fpr": f, "tpr": t, "threshold": h}
                           for f, t, h in zip(curve["fpr"], curve["tpr"], curve["threshold"])]
    roc_blocks = [Block(pd.DataFrame(roc_rows or [{"note": "no class with both positives and negatives"}]),
                        title="ROC AUC and average precision (AP) per class (one-vs-rest; binary-class: the finding)",
                        formats={"auc": DECIMAL, "ap": DECIMAL, "prevalence": PERCENT}),
                  Block(pd.DataFrame(point_rows or [{"note": "no curve"}]), title="ROC curve points",
                        formats={"fpr": DECIMAL, "tpr": DECIMAL, "threshold": DECIMAL})]

    if history is not None and len(history):
        ema = manifest.get("config", {}).get("select", {}).get("weights") == "ema"
        history_blocks = [Block(history, title="val_*: the validation metrics of the weights' EMA, which best.pt holds; "
                                               "train_*: of the weights trained" if ema else None,
                                formats={c: LR if c == "lr" else DECIMAL
                                         for c in history.columns if history[c].dtype.kind == "f"})]
    else:
        history_blocks = [Block(pd.DataFrame({"note": ["this run has no training history"]}))]

    prediction_frames = []
    for split in splits:
        frame = evaluations[split][1].copy()
        frame.insert(0, "split", split)
        first_prob = next(i for i, c in enumerate(frame.columns) if str(c).startswith(PROB_PREFIX))
        for offset, (column, values) in enumerate(task.csv_named(frame).items()):  # before the probabilities
            frame.insert(first_prob + offset, column, values)
        prediction_frames.append(frame)
    predictions = pd.concat(prediction_frames, ignore_index=True)
    prob_formats = {c: DECIMAL for c in predictions.columns if str(c).startswith(PROB_PREFIX)}

    return write_workbook(path, {
        "summary": [summary, *_interval_blocks(evaluations), *_calibration_blocks(evaluations), run_block],
        "per-class": [Block(per_class, formats=per_class_formats)],
        "confusion matrix": confusion_blocks,
        "ROC": roc_blocks,
        "reliability": _reliability_blocks(evaluations),
        "training history": history_blocks,
        "predictions": [Block(predictions, formats=prob_formats)],
    }, images=figures)


def _interval_blocks(evaluations: dict) -> list[Block]:
    """The bootstrap confidence intervals of each split's accuracy and AUC (none for splits
    evaluated before medcli computed them)."""
    import pandas as pd

    rows = []
    for split, (meta, _) in evaluations.items():
        for metric in ("accuracy", "auc") if meta.get("ci") else ():
            low, high = meta["ci"][metric] or (None, None)
            rows.append({"metric": metric, "split": split, "value": meta["metrics"][metric], "low": low, "high": high})
    if not rows:
        return []
    title = interval_caption({split: meta["ci"] for split, (meta, _) in evaluations.items() if meta.get("ci")})
    return [Block(pd.DataFrame(rows), title=title, row_formats={m: metric_format(m) for m in ("accuracy", "auc")})]


def _calibration_blocks(evaluations: dict) -> list[Block]:
    """Temperature scaling per calibrated split: T (or why the fit was skipped) and each
    calibration metric before and after; a multi-label task's temperature of each label."""
    import pandas as pd

    rows = []
    for split, (meta, _) in evaluations.items():
        calibration = meta.get("calibration")
        if calibration:
            rows += [{"metric": m, "split": split, "before": calibration["before"][m], "after": calibration["after"][m],
                      "temperature": _temperature_cell(calibration["temperature"]),
                      "fit": f"skipped ({calibration['skipped']})" if calibration.get("skipped") else "fitted"}
                     for m in calibration["before"]]
    if not rows:
        return []
    per_label = [{"split": split, "label": name, "temperature": float(t)} for split, (meta, _) in evaluations.items()
                 if meta.get("calibration") and np.ndim(meta["calibration"]["temperature"]) == 1
                 for name, t in zip(meta["class_names"], meta["calibration"]["temperature"])]
    return [Block(pd.DataFrame(rows), title="temperature scaling fitted on val: before and after",
                  formats={"temperature": "0.000"}, row_formats={m: metric_format(m) for m in {row["metric"] for row in rows}}),
            *([Block(pd.DataFrame(per_label), title="the temperature of each label (one fitted per label on val)",
                     formats={"temperature": "0.000"})] if per_label else [])]


def _temperature_cell(temperature: float | Sequence[float]) -> float | str:
    """A number a spreadsheet can compute with; a multi-label fit's one per label as text."""
    return float(temperature) if np.ndim(temperature) == 0 else temperature_text(temperature)


def _reliability_blocks(evaluations: dict) -> list[Block]:
    """The confidence bins behind each reliability diagram: count, share, mean confidence,
    accuracy and their gap, per split (before and after temperature scaling)."""
    import pandas as pd

    blocks = []
    for split, (meta, _) in evaluations.items():
        calibration = meta.get("calibration") or {}
        before = calibration.get("reliability_before")  # absent from files of older medcli versions
        after = "uncalibrated" if not calibration else (
            f"after T = {temperature_text(calibration['temperature'])}{' (fit skipped)' if calibration.get('skipped') else ''}")
        panels = ([("before temperature scaling", before)] if before else []) + [(after, meta["reliability"])]
        for name, bins in panels:
            total = max(sum(bins["count"]), 1)
            counted = bins.get("counted", "images")  # multi-label: one yes/no decision per label and image
            frame = pd.DataFrame({
                "from": bins["edges"][:-1], "to": bins["edges"][1:], counted: bins["count"],
                "share": [c / total for c in bins["count"]], "mean confidence": bins["confidence"],
                "accuracy": bins["accuracy"],
                "accuracy - confidence": [None if a is None else a - c
                                          for a, c in zip(bins["accuracy"], bins["confidence"])]})
            blocks.append(Block(frame, title=f"{split} · {name}: ECE {bins['ece']:.2%} ({bins.get('confidence_of')})",
                                formats={"from": DECIMAL, "to": DECIMAL, counted: INTEGER, "share": PERCENT,
                                         **dict.fromkeys(("mean confidence", "accuracy", "accuracy - confidence"), PERCENT)}))
    return blocks
