"""`medcli evaluate`: predict a trained run on its data, then write metrics, predictions,
figures and the Excel report, and record them in the manifest's `evaluate` stage.

Everything needed comes from the run directory: the manifest names the dataset file, the
model spec, the preprocessing and the checkpoints. Test-time augmentation uses a fixed set of
flips (no random noise) so an evaluation gives the same numbers every time, and only the flips
the run was trained with, so it never shows the model images off its training distribution
(a chest X-ray upside down); the views used are written into the metrics JSON. With
`calibrate`, a temperature is fitted on the validation split and applied to every split;
ECE/NLL/Brier before and after are recorded (a validation split that cannot pin T down keeps
T = 1, and the reason is recorded). Each split also gets seeded bootstrap intervals of its
accuracy and AUC.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import augment, console, datasets, fileio, metrics, reports, tables
from medcli.errors import MedcliError, UsageError
from medcli.names import EVAL_SPLITS, SPLITS
from medcli.run import SPLIT_FIGURES, Run, StageRecord
from medcli.tasks import EXTRA_METRICS, Task

__all__ = ["BOOTSTRAP", "evaluate_run", "shown_metrics", "written_files"]

SUMMARY_METRICS = ("accuracy", "balanced_accuracy", "auc", "f1_macro", "nll", "ece", "brier")
CALIBRATION_METRICS = ("ece", "nll", "brier", "auc")  # recorded before and after temperature scaling
# What temperature scaling is fitted to improve: the only metrics a calibrated split reports
# after it. Everything else (accuracy is unchanged; the one-vs-rest AUC of a softmax moves a
# little) is the model's own, so a calibrated run never gains on a ranking by the transform.
SCALED_METRICS = ("ece", "nll", "brier")
BOOTSTRAP = {"resamples": 1000, "seed": 0}  # the intervals of accuracy and AUC (`tasks.Task.intervals`)


def splits_for(split: str) -> tuple[str, ...]:
    """'all' means every split, train included (train vs test numbers expose over-fitting)."""
    if split not in EVAL_SPLITS:
        raise UsageError(f"unknown --split '{split}'; choose one of {', '.join(EVAL_SPLITS)}")
    return SPLITS if split == "all" else (split,)


def evaluate_run(
    run: str | os.PathLike,
    split: str = "test",
    checkpoint: str = "best",
    tta: bool = False,
    calibrate: bool = False,
    medmnist_csv: bool = False,
    batch_size: int = 256,
    device: str = "auto",
    amp: str | None = None,
    root: str | os.PathLike | None = None,
) -> dict:
    """Evaluate one run; returns {"run", "splits": {split: metrics JSON}, "files": [...]}.

    Inputs are checked before the `evaluate` stage starts (a missing checkpoint or an
    untrained run is a usage error and leaves the manifest untouched). With `medmnist_csv`,
    each split's probabilities are also written in the layout `medmnist.Evaluator` reads
    (`predictions/medmnist/<flag>[_<size>]_<split>_[AUC]..._[ACC]...@<run id>.csv`).
    """
    from medcli import inference

    chosen = splits_for(split)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    run = Run.open(run)
    train_stage = run.require_trained()
    run.refuse_if_busy("evaluate")
    dev = inference.resolve_device(device)
    amp_mode = inference.resolve_amp(dev, amp, default="off")  # full precision unless asked: logits feed the metrics
    model = run.load_model(checkpoint, dev)
    data = run.load_data(root, sorted(set(chosen) | ({"val"} if calibrate else set())))
    task = datasets.task(run.dataset["flag"])
    chosen_views = augment.test_views(augment.Augment.from_dict(run.config.get("augment", {}))) if tta else {"identity": None}
    if tta and len(chosen_views) == 1:
        console.warn("--tta: this run was trained without flips or turns, so there is no test-time view to add")
        tta = False  # recorded as what ran: the image alone
    views = list(chosen_views.values()) if tta else None
    if medmnist_csv and not data.record.get("official"):
        console.warn(f"--medmnist-csv: medmnist.Evaluator scores these files against the labels of the official "
                     f"{run.dataset['flag']} file, and this run's data is not that file ({data.record.get('source')}): "
                     "its numbers there are not this run's")

    def predict(name: str) -> np.ndarray:
        return inference.predict_logits(
            model, datasets.as_view(data.images[name]), run.data["preprocess"], batch_size=batch_size,
            device=dev, amp=amp_mode, views=views, task=task, progress_label=f"evaluate {name}").numpy().astype(np.float64)

    epoch_key = "best_epoch" if checkpoint == "best" else "epochs_run"
    context = {
        "run_id": run.run_id,
        "checkpoint": checkpoint,
        "checkpoint_epoch": train_stage.get("summary", {}).get(epoch_key),
        "dataset": {key: data.record.get(key) for key in ("flag", "size", "md5", "official", "synthetic", "sample", "path")},
        "task": task.kind,
        "class_names": list(task.names),
        **task.facts(),
        "tta": {"enabled": tta, "views": list(chosen_views)},
        "device": str(dev),
        "amp": amp_mode,
    }
    results, written = {}, []
    with run.stage("evaluate", keep_completed=True) as st:  # an attempt that replaced no file leaves the earlier result
        logits = {name: predict(name) for name in chosen}
        fit = None
        if calibrate:
            val_logits = logits["val"] if "val" in logits else predict("val")
            fit = task.fit_temperature(val_logits, data.labels["val"])
            console.info(f"temperature scaling fitted on val ({len(val_logits)} images): T = "
                         f"{metrics.temperature_text(fit[0])}" + (f"; skipped (T = 1): {fit[1]}" if fit[1] else ""))
        st.writing()
        for name in chosen:
            earlier = st.summary.pop(name, None)  # listed again once its files are all written (Run.evaluated_splits)
            if earlier and (earlier.get("checkpoint"), bool(earlier.get("tta")), earlier.get("temperature") is not None) \
                    != (checkpoint, tta, fit is not None):  # evaluated as before: the same files again, unsaid
                console.warn(f"replacing the earlier evaluation of {name} (checkpoint {earlier.get('checkpoint')}"
                             + (", TTA" if earlier.get("tta") else "")
                             + (", calibrated" if earlier.get("temperature") is not None else "") + ")")
            st.drop(*_split_files(run, name))  # a stop halfway leaves no sha256 of a file since replaced
            _drop_medmnist_csv(st, name, data.record, replaced=medmnist_csv)
            result, files = _write_split(run, name, logits[name], data, task, fit, context, medmnist_csv)
            results[name] = result
            written += files
            st.summary[name] = {key: result["metrics"][key] for key in shown_metrics(result)} | {
                "checkpoint": checkpoint, "tta": tta, "temperature": fit and fit[0]}
            st.add(*files, save=False)
        written.append(write_run_report(run, [split for split in SPLITS if split in st.summary]))
        st.add(written[-1])
    _print_summary(results)
    _warn_if_calibration_hurt(results)
    return {"run": str(run.run_dir), "splits": results, "files": [run.relative(p) for p in written]}


def _write_split(run: Run, split: str, logits: np.ndarray, data: datasets.Splits, task: Task,
                 fit: tuple | None, context: dict, medmnist_csv: bool) -> tuple[dict, list[Path]]:
    """Metrics JSON, predictions CSV(s) and the five figures of one split. `fit`: the
    temperature fitted on val and why it was skipped, if it was (`Task.fit_temperature`)."""
    labels = data.labels[split]
    names = list(task.names)
    raw = task.probabilities(logits)
    probs = raw if fit is None else task.probabilities(logits, fit[0])
    values = task.metrics(labels, raw)
    bins = task.reliability(labels, probs)
    calibration = None
    panels = [("uncalibrated", bins)]
    if fit is not None:
        temperature, skipped = fit
        # One-vs-rest AUC changes with the temperature (the classes' scores are rescaled
        # differently per sample): recorded on both sides with the calibration metrics, while
        # the split's AUC, its interval, the predictions and the medmnist CSV stay the model's.
        scaled = task.metrics(labels, probs)
        before = {key: values[key] for key in CALIBRATION_METRICS}
        after = {key: scaled[key] for key in CALIBRATION_METRICS}
        values.update({key: scaled[key] for key in SCALED_METRICS})
        calibration = {"method": "temperature scaling", "fitted_on": "val", "temperature": temperature,
                       "skipped": skipped, "before": before, "after": after,
                       "reliability_before": task.reliability(labels, raw)}
        if np.all(np.asarray(temperature) == 1.0):  # nothing was scaled: one panel says why
            panels = [(f"uncalibrated: temperature fit skipped ({skipped})", bins)]
        else:
            panels = [("before", calibration["reliability_before"]),
                      (f"after T = {metrics.temperature_text(temperature)}"
                       + (f" (T = 1 where skipped: {skipped})" if skipped else ""), bins)]
    result = {**context, "split": split, "calibration": calibration, "metrics": values,
              "ci": task.intervals(labels, raw, **BOOTSTRAP), "reliability": bins}

    title, note = f"{run.run_id} · {split}", datasets.provenance(data.record)
    captions = task.describe(labels, raw)  # the model's own confidences, as in the predictions CSV
    scaled = metrics.temperature_applied(calibration)  # the figures show the model's own, unscaled, confidences
    figure = {name: run.figure_file(name, split) for name in SPLIT_FIGURES}
    files = [
        fileio.write_json(run.metrics_file(split), result),
        *tables.write_predictions(run.predictions_file(split), task, labels, raw, None if fit is None else fit[0]),
        reports.save_task_confusion(figure["confusion"], task.confusion_tables(values), title, note),
        reports.save_samples(figure["samples"], data.images[split], captions,
                             f"{title}: sample predictions (green right, red wrong; "
                             f"{'the confidence before temperature scaling' if scaled else 'confidence'} in brackets)",
                             note),
        reports.save_mistakes(figure["mistakes"], data.images[split], captions, f"{title}: most confident mistakes"
                              + (" (confidence before temperature scaling)" if scaled else ""), note),
        reports.save_reliability(figure["reliability"], panels, f"{title}: reliability", note),
        reports.save_roc(figure["roc"], tables.roc_curves(task.indicator(labels), raw, names, task.roc_classes()),
                         f"{title}: ROC and precision-recall", note),
    ]
    if medmnist_csv:
        files.append(_write_medmnist_csv(run, split, raw, values, data.record))
    return result, files


def _split_files(run: Run, split: str) -> list[Path]:
    """The files `_write_split` writes for `split` (the --medmnist-csv file aside)."""
    csv = run.predictions_file(split)
    return [run.metrics_file(split), csv, tables.task_file(csv), *(run.figure_file(name, split) for name in SPLIT_FIGURES)]


def _medmnist_prefix(record: dict, split: str) -> str:
    """The start of a split's --medmnist-csv file name: flag, size suffix for 64+ px, split."""
    return f"{record['flag']}{datasets.size_suffix(int(record['size']))}_{split}_"


def _drop_medmnist_csv(st: StageRecord, split: str, record: dict, replaced: bool) -> None:
    """An earlier evaluation's --medmnist-csv file of `split` holds that evaluation's
    probabilities: it goes (file and manifest entry) before the split is evaluated again, with
    a line saying so unless this evaluation writes its own."""
    run = st.run
    earlier = sorted(run.medmnist_dir().glob(f"{_medmnist_prefix(record, split)}*@{run.run_id}.csv"))
    for path in earlier:
        path.unlink()
        st.entry["artefacts"].pop(run.relative(path), None)
    if earlier and not replaced:
        console.info(f"removed the earlier --medmnist-csv file of {split} ({earlier[0].name}): it held an earlier "
                     "evaluation's probabilities; pass --medmnist-csv to write this one's")


def _write_medmnist_csv(run: Run, split: str, probs: np.ndarray, values: dict, record: dict) -> Path:
    """The split's probabilities as `medmnist.Evaluator.evaluate(..., save_folder)` writes
    them (row index, then one column per class or label; no header), under the file name
    `Evaluator.parse_and_evaluate` reads (flag, size suffix for 64+ px, split, metrics, run)."""
    import pandas as pd

    auc = float("nan") if values["auc"] is None else values["auc"]
    name = f"{_medmnist_prefix(record, split)}[AUC]{auc:.3f}_[ACC]{values['accuracy']:.3f}@{run.run_id}.csv"
    path = run.medmnist_dir() / name
    with fileio.atomic_path(path) as tmp:
        pd.DataFrame(probs).to_csv(tmp, header=False)
    return path


def write_run_report(run: Run, splits: Sequence[str]) -> Path:
    """(Re)write `report.xlsx` from every split evaluated so far (`splits`: those the evaluate
    stage lists, each written to the end), so an evaluation of `val` after one of `test`
    yields one workbook holding both. A split whose files are unreadable (damaged since) is
    left out with one line saying how to redo it."""
    import json

    import pandas as pd

    evaluations = {}
    for split in splits:
        metrics_file, csv = run.metrics_file(split), run.predictions_file(split)
        if not (metrics_file.is_file() and csv.is_file()):
            continue
        try:
            read = metrics_file
            meta = json.loads(metrics_file.read_text(encoding="utf-8"))
            read = csv
            evaluations[split] = (meta, tables.read_predictions(csv)[0])
        except (ValueError, OSError, MedcliError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            reason = str(exc) if isinstance(exc, MedcliError) else f"{type(exc).__name__}: {exc}"
            console.warn(f"report.xlsx leaves out {split}: {read} is unreadable ({' '.join(reason.split())}); "
                         f"redo it with '{run.evaluate_command(split)}'")
    history_file = run.history_file()
    history = pd.read_csv(history_file) if history_file.is_file() else None
    figures = {sheet: [p for s in evaluations if (p := run.figure_file(kind, s)).is_file()]
               for sheet, kind in (("ROC", "roc"), ("reliability", "reliability"))}
    return tables.write_report(run.report_file(), run.data, evaluations, history, figures)


def _print_summary(results: dict) -> None:
    """A Rich table of the main metrics per split on stderr (skipped with --quiet): the data's
    provenance in the title when it is not the official file, the bootstrap intervals, and
    the temperature with the calibration metrics before scaling and the AUC after it (or why
    the fit was skipped)."""
    if console.is_quiet():
        return
    from rich.table import Table

    first = next(iter(results.values()))
    note = datasets.provenance(first["dataset"])
    captions = [metrics.interval_caption({split: result["ci"] for split, result in results.items()})]
    table = Table(title="evaluation" + (f" · data: {note}" if note else ""), title_justify="left",
                  title_style="bold red" if note else None, caption_justify="left")
    table.add_column("metric")
    for split in results:
        table.add_column(split, justify="right")
    rows = [("images", [str(r["metrics"]["n"]) for r in results.values()])]
    for key in shown_metrics(first):
        rows.append((key, [metrics.metric_text(key, r["metrics"][key]) for r in results.values()]))
    rows += [(f"{key} {first['ci']['level']:.0%} CI",
              [metrics.interval_text(key, r["ci"][key]) for r in results.values()])
             for key in ("accuracy", "auc")]
    calibrations = [r["calibration"] for r in results.values()]
    if all(calibrations):  # one evaluation calibrates every split or none
        rows.append(("temperature", [metrics.temperature_text(c["temperature"]) for c in calibrations]))
        rows += [(f"{key} before scaling", [metrics.metric_text(key, c["before"][key]) for c in calibrations])
                 for key in ("ece", "nll")]
        rows.append(("auc after scaling", [metrics.metric_text("auc", c["after"]["auc"]) for c in calibrations]))
        captions.append("ece, nll and brier after temperature scaling; every other metric is the model's own"
                        + (" (val: the split T was fitted on, so its scaled values flatter it)" if "val" in results
                           else ""))
        if first["calibration"]["skipped"]:
            captions.append(f"temperature fit skipped (T = 1): {first['calibration']['skipped']}")
    for key, cells in rows:
        table.add_row(key, *cells)
    table.caption = "\n".join(captions)
    console.console().print(table)


def _warn_if_calibration_hurt(results: dict) -> None:
    """One warning line per split whose ECE got worse with the temperature fitted on val (a
    small or unrepresentative validation split can do that)."""
    for split, result in results.items():
        calibration = result["calibration"]
        if calibration and calibration["after"]["ece"] > calibration["before"]["ece"]:
            console.warn(f"temperature scaling made the {split} calibration worse (ECE {calibration['before']['ece']:.2%}"
                         f" -> {calibration['after']['ece']:.2%}, T = {metrics.temperature_text(calibration['temperature'])} fitted on val); "
                         f"report the uncalibrated numbers for {split}")


def shown_metrics(result: dict) -> tuple[str, ...]:
    """The metrics a split's summary shows: the common ones, then its task's own."""
    return (*SUMMARY_METRICS, *EXTRA_METRICS[result["task"]])


def written_files(result: dict) -> list[str]:
    """The files an evaluation wrote, as absolute paths: what `evaluate` prints on stdout (its
    summary table went to stderr)."""
    return [str(Path(result["run"]).resolve() / path) for path in result["files"]]
