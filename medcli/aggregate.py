"""`medcli aggregate`: many runs -> one comparison table (stdout, CSV, XLSX, Markdown, JSON)
and a grouped bar chart.

A pure function of files: each run's `manifest.json` (what was trained) and
`metrics/<split>.json` (how it scored); the paired tests also read the predictions CSVs. No
model is loaded and torch is never imported, so comparing a hundred runs takes a second. Runs
that differ only by their seed (and by where or on which device they ran) form one group
reported as mean ± std; a copy of a run (the same checkpoint) is not another seed. A
run that cannot be compared (unreadable, unfinished, not evaluated, a copy) is listed with the
reason, never silently dropped; a metric a run cannot have (rollout faithfulness of a CNN) is a
blank cell. Models are named by what ran (`model_label`), data that is not the official file
says so, and two setups get paired tests (`compare_stats`).
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
import textwrap
from string import ascii_uppercase
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import compare_stats, console, datasets, fileio, reports, tables
from medcli.config import experiment as experiment_of
from medcli.metrics import evaluation_settings, metric_text
from medcli.errors import UsageError
from medcli.names import COMPARE_FORMATS as FORMATS, COMPARE_METRICS as DEFAULT_METRICS
from medcli.explainers import METHODS as EXPLAIN_METHODS
from medcli.names import (CHECKPOINTS, FAITHFULNESS_PREFIX, LOWER_IS_BETTER, PERCENT_METRICS, SCALAR_METRICS,
                          SPLITS)
from medcli.tasks import EXTRA_METRICS, MultiClass
from medcli.run import Run, find_runs

__all__ = ["Comparison", "aggregate", "compare", "display_rows", "heading", "model_label", "table_text", "write_chart"]

_RUN_COLUMNS = ("run", "dataset", "size", "data", "model", "pretrained", "epochs", "seed", "train_s", "evaluation")
LEADER_MARK = "★"

# Every metric a run can be compared on: the common ones, each task type's own, faithfulness
# (`road_<method>`: that method's; `road`: the run's own method's, named beside the score).
FAITHFULNESS_METRICS = tuple(f"{FAITHFULNESS_PREFIX}{method}" for method in EXPLAIN_METHODS)
OWN_FAITHFULNESS = FAITHFULNESS_PREFIX.rstrip("_")
ROAD_METRICS = (*FAITHFULNESS_METRICS, OWN_FAITHFULNESS)
COMPARABLE_METRICS = (*SCALAR_METRICS, *dict.fromkeys(m for ms in EXTRA_METRICS.values() for m in ms), *ROAD_METRICS)


@dataclass
class Comparison:
    """The aggregate result: per-run rows, seed groups, leaders and the runs left out."""

    split: str
    metrics: list[str]
    runs: list[dict]
    groups: list[dict]
    leaders: dict[str, list[str]]
    skipped: list[dict]
    paired: dict | None = None  # `compare_stats.paired_tests` of the two setups compared, if any
    references: list[dict] = field(default_factory=list)  # `compare_stats.references` (--reference)

    def to_json(self) -> dict:
        return {"split": self.split, "metrics": self.metrics, "groups": self.groups, "runs": self.runs,
                "leaders": self.leaders, "skipped": self.skipped, "paired": self.paired,
                "references": self.references}


# ---------------------------------------------------------------------------------------
# Finding and reading runs
# ---------------------------------------------------------------------------------------


class NotApplicable(UsageError):
    """Metrics asked for that are another task type's (`by_task`: task type -> those metrics)."""

    def __init__(self, by_task: dict[str, list[str]]):
        self.by_task = by_task
        them = "it" if len({m for ms in by_task.values() for m in ms}) == 1 else "them"
        super().__init__("; ".join(f"{', '.join(ms)} {'does' if len(ms) == 1 else 'do'} not apply to {task} tasks"
                                   for task, ms in by_task.items()) + f"; leave {them} out of --metrics")


def read_run(run_dir: Path, split: str, metric_names: Sequence[str]) -> dict:
    """One comparison row; raises UsageError with the reason a run cannot be compared."""
    run = Run.open(run_dir)
    state = run.status("train")
    if state == "running":  # still training, or its process died: require says which
        run.require("train", f"finish it with '{run.resume_command()}'")
    if state != "completed":
        raise UsageError(f"unfinished: train {state or 'not run'} (finish it with '{run.resume_command()}')")
    train = run.stages["train"]
    metrics_file = run.metrics_file(split)
    if split not in run.evaluated_splits():  # the split leaves the stage's list while an evaluation rewrites it
        if metrics_file.is_file():
            raise UsageError(f"its evaluation on {split} did not finish (stopped while its files were written); "
                             f"re-run '{run.evaluate_command(split)}'")
        raise UsageError(f"not evaluated on {split} (run '{run.evaluate_command(split)}')")
    try:
        evaluation = json.loads(run.read_evaluated(metrics_file, split))
        values = evaluation["metrics"]
        if not isinstance(evaluation, dict) or not isinstance(values, dict):
            raise TypeError("not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{run.relative(metrics_file)} is unreadable ({type(exc).__name__}); re-run 'medcli evaluate'") from None
    spec = run.data.get("model", {})
    values = {**values, **_faithfulness(run, spec, [m for m in metric_names if m in ROAD_METRICS], split)}
    missing = [m for m in metric_names if m not in values]
    task = evaluation.get("task", MultiClass.kind)  # recorded since the task layer; older runs were multi-class
    foreign = [m for m in missing if task in EXTRA_METRICS and m not in EXTRA_METRICS[task]
               and any(m in ms for ms in EXTRA_METRICS.values())]
    if foreign:
        raise NotApplicable({task: foreign})
    if missing:
        raise UsageError(f"{run.relative(metrics_file)} lacks {', '.join(missing)}; re-run 'medcli evaluate'")
    config, summary = run.config, train.get("summary", {})
    # The weights the run really started from, not the ones asked for: a --pretrained run whose
    # download failed trained from scratch and belongs with the from-scratch runs.
    pretrained = bool(spec.get("pretrained", config.get("pretrained")))
    calibration = evaluation.get("calibration") or {}
    before, after = calibration.get("before") or {}, calibration.get("after") or {}
    if values.get("auc") is not None and values["auc"] == after.get("auc") != before.get("auc"):
        values["auc"] = before["auc"]  # written before evaluate kept the model's own AUC under --calibrate
    settings = evaluation_settings(evaluation)  # a skipped temperature fit (T = 1) is no calibration
    experiment = experiment_of(config)
    # what the split was scored on (`evaluate --root` may point at another file than training's)
    tested = evaluation["dataset"] if isinstance(evaluation.get("dataset"), dict) and evaluation["dataset"].get("md5") \
        else run.dataset
    experiment.update(pretrained=pretrained, data_md5=run.dataset.get("md5"), evaluation=settings,
                      evaluated_md5=tested.get("md5"))
    checkpoint = evaluation.get("checkpoint")
    return {
        "run": run.run_id,
        "path": str(run_dir),
        "dataset": run.dataset.get("flag"),
        "size": run.dataset.get("size"),
        "data": datasets.provenance_kind(tested) or "",
        "model": model_label(spec, config.get("model")),
        "pretrained": pretrained,
        "epochs": summary.get("epochs_run"),
        "seed": config.get("seed"),
        "train_s": summary.get("train_seconds", train.get("duration_s")),
        "evaluation": ", ".join(settings),
        "checkpoint_sha256": train.get("artefacts", {}).get(run.relative(run.checkpoint_path(checkpoint)))
        if checkpoint in CHECKPOINTS else None,
        "experiment": experiment,
        **{m: values[m] for m in (*metric_names, f"{OWN_FAITHFULNESS}_method") if m in values},
    }


def model_label(spec: dict, fallback: str | None = None) -> str:
    """The model as it ran: the spec's name, then depth x width where the run set them (the
    --reduced ViT is 6 blocks of width 128, not ViT-Tiny's 12 x 192) and the parameter count,
    e.g. "vit-tiny (6x128, 1.2M)", "resnet18 (11.2M)"; the bare name when the spec has neither."""
    overrides, params = spec.get("overrides") or {}, spec.get("params")
    parts = [f"{overrides.get('depth', '?')}x{overrides.get('embed_dim', '?')}"] \
        if {"depth", "embed_dim"} & set(overrides) else []
    if params:
        parts.append(f"{params / 1e6:.1f}M" if params >= 1e5 else f"{params / 1e3:.0f}k")
    name = spec.get("name") or fallback or "?"
    return f"{name} ({', '.join(parts)})" if parts else name


# ---------------------------------------------------------------------------------------
# Grouping and leaders
# ---------------------------------------------------------------------------------------


def _mean_std(values: list) -> tuple[float | None, float | None]:
    present = [float(v) for v in values if v is not None]
    if not present:
        return None, None
    std = float(np.std(present, ddof=1)) if len(present) > 1 else None
    return float(np.mean(present)), std


def group_runs(runs: list[dict], metric_names: Sequence[str]) -> list[dict]:
    """Merge runs with the same experiment (all but seed/location/device) into mean ± std
    (sample std, ddof=1; None for a single run), ordered best first by the first metric. Each
    group is named by its model and seeds (`_name_groups`)."""
    by_experiment: dict[str, list[dict]] = {}
    for row in runs:
        by_experiment.setdefault(json.dumps(row["experiment"], sort_keys=True, default=str), []).append(row)
    groups, seed_texts = [], []
    for members in by_experiment.values():
        first = members[0]
        seeds = sorted(m["seed"] for m in members if m["seed"] is not None)
        seed_texts.append(f" s{_seed_text(seeds)}" if seeds else "")
        group = {"group": f"{first['model']}{' pretrained' if first['pretrained'] else ''}",
                 "dataset": first["dataset"], "size": first["size"], "data": first["data"], "model": first["model"],
                 "pretrained": first["pretrained"], "evaluation": first["evaluation"], "n_runs": len(members),
                 "seeds": ", ".join(map(str, seeds)), "runs": [m["run"] for m in members],
                 "paths": [m["path"] for m in members], "experiment": first["experiment"],
                 "epochs": _mean_std([m["epochs"] for m in members])[0],
                 "train_s": _mean_std([m["train_s"] for m in members])[0]}
        for metric in metric_names:
            group[metric], group[f"{metric}_std"] = _mean_std([m[metric] for m in members])
        if OWN_FAITHFULNESS in metric_names:
            group[f"{OWN_FAITHFULNESS}_method"] = "/".join(dict.fromkeys(
                m[f"{OWN_FAITHFULNESS}_method"] for m in members if m[f"{OWN_FAITHFULNESS}_method"])) or None
        groups.append(group)
    _name_groups(groups, seed_texts)
    key = metric_names[0]
    sign = 1 if key in LOWER_IS_BETTER else -1
    groups.sort(key=lambda g: (g[key] is None, sign * (g[key] or 0.0), g["group"]))
    return groups


def _seed_text(seeds: list) -> str:
    """"0", "0-2" for consecutive seeds, else "0,3,7"."""
    consecutive = all(isinstance(s, int) for s in seeds) and seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    return f"{seeds[0]}-{seeds[-1]}" if consecutive and len(seeds) > 2 else ",".join(map(str, seeds))


def _name_groups(groups: list[dict], seed_texts: list[str]) -> None:
    """Label each group by its model and seeds (`seed_texts`, one per group), unique. In a
    comparison across data every label says its data ("on chestmnist 64 px": the md5 and the
    data's presets follow from it; two files of one flag and provenance by their md5); groups
    whose labels without the seeds still agree (seeds differ, settings too: they must not read
    as seeds of one setup) get what their experiments differ in, two things at most: the
    model's and weights' settings before the others, and the file's md5 last; then a number if
    need be. Values are whole up to a length, else cut after a word with "…" (`_brief`)."""
    across = len({compare_stats.data_key(g) for g in groups}) > 1
    bases = {id(g): g["group"] for g in groups}
    for g, seeds in zip(groups, seed_texts):
        g["group"] += seeds
        if across:
            on = f" on {_data_text(g)}"
            if len({compare_stats.data_key(o) for o in groups if _data_text(o) == _data_text(g)}) > 1:
                on += f" md5 {(g['experiment'].get('evaluated_md5') or 'unknown')[:8]}"  # files of one flag
            g["group"] += on
            bases[id(g)] += on
    # the evaluation has its own column, legend entry and title: named only where it alone differs
    for ignored in (("evaluation",), ()):  # first by the labels without seeds, then by the whole labels
        labels = bases if ignored else {id(g): g["group"] for g in groups}
        for label in set(labels.values()):
            same = [g for g in groups if labels[id(g)] == label]
            flat = {id(g): _flat(g["experiment"]) for g in same}  # a rule's settings by name: select.window
            keys = sorted((k for k in set().union(*flat.values()) if k.split(".")[0] not in ignored
                           and len({json.dumps(flat[id(g)].get(k), default=str) for g in same}) > 1),
                          key=_label_rank)
            for g in same if len(same) > 1 and keys else ():
                g["group"] += " " + ", ".join(f"{k}={_brief(flat[id(g)].get(k))}" for k in keys[:2])
    for label in {g["group"] for g in groups}:
        same = [g for g in groups if g["group"] == label]
        for number, g in enumerate(same[1:], start=2):
            g["group"] += f" #{number}"


_LEADING_KEYS = ("model", "pretrained")


def _flat(settings: dict, prefix: str = "") -> dict:
    """`settings` with every nested dict's entries as keys of their own ("select.window"), so
    a label names the one that differs, not a dict cut after 24 characters."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _label_rank(key: str) -> tuple:
    """Labels name the model and weights first, then the settings alphabetically, then the
    data's md5."""
    top = key.split(".")[0]
    return (_LEADING_KEYS.index(top) if top in _LEADING_KEYS else len(_LEADING_KEYS),
            top in ("data_md5", "evaluated_md5"), key)


def _brief(value, limit: int = 24) -> str:
    """A setting's value in a label: whole up to `limit` characters, else cut after the last
    whole word that fits, with "…"."""
    text = "+".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)
    if len(text) <= limit:
        return text
    cut = text[:limit]
    return (cut.rsplit(" ", 1)[0] if " " in cut else cut).rstrip(" ,;:") + "…"


def _faithfulness(run: Run, spec: dict, wanted: Sequence[str], split: str) -> dict:
    """The ROAD faithfulness metrics of a run: road_<method> -> the mean score of its
    explain:<method> stage on `split`; `road` -> the score of the run's own method (the one its
    family alone supports, rollout for a ViT, else the first explained in METHODS order), named
    in `road_method`. A method the run's model cannot be explained with is None (a blank cell);
    one it could have but was not explained with is None with a warning naming the command."""
    scores, unscored = {}, set()  # unscored: explained, every map constant (no ROAD score)
    for method in EXPLAIN_METHODS:
        summary = run.stages.get(run.explain_stage(method), {}).get("summary", {})
        if run.status(run.explain_stage(method)) == "completed" and summary.get("faithfulness") \
                and summary.get("split") == split:
            if summary["faithfulness"]["mean"] is None:
                unscored.add(method)
            else:
                scores[method] = summary["faithfulness"]["mean"]
    preferred = sorted(EXPLAIN_METHODS, key=lambda m: EXPLAIN_METHODS[m].supported_by is None)
    own = next((m for m in preferred if m in scores), None)
    values = {f"{OWN_FAITHFULNESS}_method": own}
    for metric in wanted:
        method = metric[len(FAITHFULNESS_PREFIX):] if metric != OWN_FAITHFULNESS \
            else own or next(m for m in preferred if EXPLAIN_METHODS[m].supports(spec))
        values[metric] = scores.get(method)
        if method in unscored and values[metric] is None:
            console.warn(f"{run.run_id} has no {metric} on {split}: every {method} map is constant (no ROAD score)")
        elif values[metric] is None and EXPLAIN_METHODS[method].supports(spec):
            console.warn(f"{run.run_id} has no {metric} on {split}: explain it with "
                         f"'{run.command('explain', '--method', method, '--split', split)}'")
    return values




def aggregate(paths: Sequence[str | os.PathLike], split: str = "test", metric_names: Sequence[str] = DEFAULT_METRICS,
              pair: Sequence[str] | None = None, reference: bool = False) -> Comparison:
    """Read every run under `paths` and compare them on `metric_names` of `split`; the two
    setups `pair` names (or the only two) get paired tests, and with `reference` the
    published MedMNIST v2 numbers of their datasets come along."""
    if split not in SPLITS:
        raise UsageError(f"unknown --split '{split}'; choose test, val or train")
    metric_names = list(dict.fromkeys(metric_names))
    unknown = [m for m in metric_names if m not in COMPARABLE_METRICS]
    if unknown or not metric_names:
        raise UsageError(f"unknown metric {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(m for m in COMPARABLE_METRICS if m not in FAITHFULNESS_METRICS)} "
                         f"(the faithfulness of each run's own explain method) or road_<explain method>")
    run_dirs, skipped = find_runs(paths or ["."])
    if not run_dirs and skipped:  # nothing found at all: the paths are the problem
        raise UsageError("no runs to compare: " + "; ".join(f"{entry['run']} {entry['reason']}" for entry in skipped))
    runs, foreign = [], {}
    for run_dir in run_dirs:
        try:
            runs.append(read_run(run_dir, split, metric_names))
        except UsageError as exc:
            skipped.append({"run": str(run_dir), "reason": str(exc)})
            if isinstance(exc, NotApplicable):
                for task, names in exc.by_task.items():
                    foreign.setdefault(task, {}).update(dict.fromkeys(names))
    runs = _drop_copies(runs, skipped)
    for entry in skipped:
        console.warn(f"not compared: {entry['run']}: {entry['reason']}")
    if not runs and foreign:
        raise UsageError(f"none of the {len(run_dirs)} runs found has the metrics asked for: "
                         f"{NotApplicable({task: list(names) for task, names in foreign.items()})}")
    if not runs:
        raise UsageError(f"no evaluated runs to compare among {len(run_dirs)} found; "
                         f"evaluate them first with 'medcli evaluate RUN --split {split}'")
    groups = group_runs(runs, metric_names)
    chosen = compare_stats.pair_groups(groups, pair)
    rivals = Counter(compare_stats.data_key(g) for g in groups)  # setups on the same data
    if chosen is None and max(rivals.values()) > 2:
        console.info(f"{len(groups)} setups: the best means are marked, untested; --pair A B (a label, run id "
                     f"or directory of each) tests two of them on the same images")
    return Comparison(split, metric_names, runs, groups, compare_stats.leaders(groups, metric_names), skipped,
                      paired=compare_stats.paired_tests(*chosen, runs, split, metric_names) if chosen else None,
                      references=compare_stats.references(runs) if reference else [])


def _drop_copies(runs: list[dict], skipped: list[dict]) -> list[dict]:
    """The runs without copies of an earlier one (the same checkpoint by sha256; where no hash
    was recorded, the same run id and seed; evaluated alike, on the same file): a copied run
    directory is the same result, not another seed (a copy evaluated with TTA or calibration,
    or on another file, is another setup). The run id alone is no proof: it is the start time to the second, dataset and
    model, shared by seeds started together into different folders. Copies join `skipped`."""
    kept, seen = [], {}
    for row in runs:
        key = ("checkpoint", row["checkpoint_sha256"]) if row["checkpoint_sha256"] \
            else ("run id and seed", row["run"], row["seed"])
        key += (json.dumps(row["experiment"]["evaluation"]), row["experiment"]["evaluated_md5"])  # evaluated alike
        if key in seen:
            skipped.append({"run": row["path"], "reason": f"a copy of {seen[key]['path']} (the same {key[0]}), "
                                                          f"not another seed; compare one of them"})
            continue
        seen[key] = row
        kept.append(row)
    return kept


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _display(metric: str, mean, std, method: str | None = None, gap: str = " ") -> str:
    """A metric's cell: mean ±std (percent metrics in % and points; `gap` before the std), the
    faithfulness method named; "n/a" where it is undefined (an AUC of a split without both
    classes), blank where there is none (a map method the model cannot have)."""
    if mean is None:
        return "" if metric in ROAD_METRICS else "n/a"
    percent = metric in PERCENT_METRICS
    value = metric_text(metric, mean)
    if std is not None:
        value += f"{gap}±{std * 100:.2f}" if percent else f"{gap}±{std:.4f}"
    return f"{value} ({method})" if method else value


def heading(name: str) -> str:
    """A column heading: metric names with spaces (so a narrow table can wrap them), an arrow
    on those where lower is better."""
    return name.replace("_", " ") + (" ↓" if name in LOWER_IS_BETTER else "")


def _data_text(entry: dict) -> str:
    """"bloodmnist 28 px", with the provenance of data that is not the official file in capitals."""
    return f"{entry['dataset']} {entry['size']} px" + (f" ({entry['data'].upper()})" if entry["data"] else "")


_BAR_HATCHES = ("", "//", "..", "xx")  # the chart's setups past matplotlib's 10 colours repeat them hatched
CHART_COLUMNS = 3  # the chart's metric panels a row
_SHARED = {"data": _data_text, "evaluation": lambda g: g["evaluation"]}  # in the title when every setup shares it


def _shared(result: Comparison) -> dict[str, str]:
    """The columns of `_SHARED` whose text every setup shares, with that text (the data only
    when every setup was tested on the same file)."""
    one_file = len({compare_stats.data_key(g) for g in result.groups}) == 1
    return {name: next(iter(values)) for name, text in _SHARED.items()
            if len(values := {text(g) for g in result.groups}) == 1 and (name != "data" or one_file)}


def display_rows(result: Comparison, wide: bool = False, gap: str = " ") -> tuple[str, list[str], list[list[str]]]:
    """Title, header and text rows of the comparison (mean ±std, leaders starred, then any
    published rows), shared by the Rich table and the Markdown file. The default view is the
    setup (model and seeds) and the metrics, with the data and the evaluation in the title when
    every setup shares them (else as columns); `wide` shows every column. `gap` goes between a
    mean and its std (the table puts the std on a line of its own)."""
    shared = {} if wide else _shared(result)
    extra = [name for name in _SHARED if name not in shared] + (["runs", "epochs", "train time"] if wide else [])
    rows = []
    for g in result.groups:
        cells = {"setup": g["group"], "data": _data_text(g), "evaluation": g["evaluation"], "runs": " ".join(g["runs"]),
                 "epochs": "" if g["epochs"] is None else f"{g['epochs']:g}",
                 "train time": "" if g["train_s"] is None else f"{g['train_s']:.0f} s"}
        metric_cells = [_display(m, g[m], g[f"{m}_std"], g.get(f"{m}_method"), gap) for m in result.metrics]
        rows.append([cells[c] for c in ("setup", *extra)]
                    + [f"{t} {LEADER_MARK}" if g["group"] in result.leaders.get(m, []) else t
                       for m, t in zip(result.metrics, metric_cells)])
    several = len({r["dataset"] for r in result.references}) > 1
    for ref in result.references:
        label = f"{ref['method']} published" + (f" [{ref['dataset']}]" if several else "") \
            + (f" (different data: {ref['different_data']})" if ref["different_data"] else "")
        cells = {"setup": label, "data": f"{ref['dataset']} {ref['size']} px"}
        rows.append([cells.get(c, "") for c in ("setup", *extra)]
                    + [_display(m, ref[m], None) if m in ref else "" for m in result.metrics])
    several_data = len({_data_text(g) for g in result.groups}) > 1
    title = f"{result.split} split" + (f" of {shared['data']}" if "data" in shared else "") \
        + (f", evaluation: {shared['evaluation']}" if "evaluation" in shared else "") \
        + "; mean ±std over seeds" \
        + (f", {LEADER_MARK} = best mean{' on its data' if several_data else ''} (not a test)"
           if result.leaders else "") \
        + (", ↓ = lower is better" if LOWER_IS_BETTER & set(result.metrics) else "") \
        + ("; train time: in the training steps (not validation, checkpoints or start-up)" if wide else "")
    return title, ["setup", *extra, *result.metrics], rows


def rich_tables(result: Comparison, wide: bool = False) -> list:
    """The comparison as a Rich table (with the citation of any published rows), one listing
    runs left out, and the paired tests in words. Text cells wrap at spaces and fold long
    words; a metric column is as wide as its longest number or heading word, never narrower
    (`table_text` widens the page instead): nothing is cut off, whatever the width. Cells are
    shown as written (no Rich markup: "[bloodmnist]" stays)."""
    from rich.table import Table
    from rich.text import Text

    title, header, rows = display_rows(result, wide, gap="\n")
    table = Table(title=title, title_justify="left", caption_justify="left",
                  caption=f"published: {compare_stats.CITATION}" if result.references else None)
    for index, name in enumerate(header):
        numeric = name in result.metrics or name in ("epochs", "train time")
        # a metric column is as wide as its longest number or heading word: the room left goes to the setups
        fit = max(len(word) for word in [*heading(name).split(), *(line for row in rows
                                                                     for line in row[index].splitlines())])
        table.add_column(heading(name), justify="right" if numeric else "left", overflow="fold",
                         width=fit if name in result.metrics else None)
    for row in rows:
        table.add_row(*map(Text, row))
    shown = [table]
    if result.skipped:
        left_out = Table(title="not compared", title_justify="left")
        left_out.add_column("run", overflow="fold")
        left_out.add_column("reason", overflow="fold")
        for entry in result.skipped:
            left_out.add_row(Text(entry["run"]), Text(entry["reason"]))
        shown.append(left_out)
    return shown + [Text("\n".join(compare_stats.paired_lines(result.paired)))] if result.paired else shown


def _md(text) -> str:
    """Text for a Markdown cell or heading, shown as written: one line, Markdown's and HTML's
    characters backslash-escaped (a run name with <b> or * is neither a tag nor emphasis)."""
    return re.sub(r"([\\`*_\[\]|<>&#])", r"\\\1", " ".join(str(text).split()))


def to_markdown(result: Comparison, wide: bool = False) -> str:
    title, header, rows = display_rows(result, wide)
    lines = [f"## {_md(title)}", "", "| " + " | ".join(_md(heading(h)) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    if result.references:
        lines += ["", f"Published: {compare_stats.CITATION}."]
    if result.paired:
        lines += ["", "```", *compare_stats.paired_lines(result.paired), "```"]
    if result.skipped:
        lines += ["", "## Not compared", "", "| run | reason |", "|---|---|"]
        lines += [f"| {_md(s['run'])} | {_md(s['reason'])} |" for s in result.skipped]
    return "\n".join(lines) + "\n"


def _frames(result: Comparison):
    """(groups, runs, skipped) DataFrames with numeric metric columns (mean, std); any
    published rows follow the groups, with their source."""
    import pandas as pd

    group_columns = ["group", "dataset", "size", "data", "model", "pretrained", "evaluation", "n_runs", "seeds",
                     "epochs", "train_s"]
    for metric in result.metrics:
        group_columns += [metric, f"{metric}_std"] + ([f"{metric}_method"] if metric == OWN_FAITHFULNESS else [])
    groups = pd.DataFrame(result.groups, columns=group_columns)
    groups["leads"] = [", ".join(m for m in result.metrics if g in result.leaders.get(m, [])) for g in groups["group"]]
    if result.references:  # the published rows, as in the table: a source column says whose numbers each row is
        published = pd.DataFrame([{**ref, "group": f"{ref['method']} published", "model": ref["method"]}
                                  for ref in result.references],
                                 columns=[*group_columns, "source", "different_data"])
        groups = pd.concat([groups.assign(source="medcli runs"), published], ignore_index=True)
    runs = pd.DataFrame(result.runs, columns=[*_RUN_COLUMNS, *result.metrics, "path"])
    skipped = pd.DataFrame(result.skipped, columns=["run", "reason"])
    return groups, runs, skipped


def to_csv(result: Comparison) -> str:
    return _frames(result)[0].to_csv(index=False, float_format="%.6g")


def write_chart(path: str | os.PathLike, result: Comparison) -> Path:
    """`chart_figure` saved to `path`."""
    return reports.save_figure(chart_figure(result), path)


def chart_figure(result: Comparison):
    """One panel per metric (up to CHART_COLUMNS a row), one horizontal bar per setup, keyed A,
    B, C... on every panel and in the legend below (colours too, hatched past ten), with its
    value printed beside it and the std over seeds as an error bar; a missing value reads n/a.
    The data, split and any shared evaluation are the title. The figure is PRINT_WIDTH_IN wide
    whatever the number of setups and metrics, and grows taller instead, so each text prints at
    its size (at least reports.MIN_PRINT_PT) on a page."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import PercentFormatter

    n, metrics = len(result.groups), result.metrics
    columns = min(len(metrics), CHART_COLUMNS)
    rows = -(-len(metrics) // columns)
    width = reports.PRINT_WIDTH_IN

    def wrapped(text: str, points: float, room: int = 0) -> str:  # lines as wide as the figure holds
        return "\n".join(textwrap.wrap(text, int(width * 72 / (points * 0.62)) - room))

    shared = _shared(result)
    keys = [_bar_key(i) for i in range(n)]
    labels = [wrapped(f"{key}: {g['group']}" + ("" if "evaluation" in shared else f" ({g['evaluation']})"), 8, room=6)
              for key, g in zip(keys, result.groups)]  # room for the legend's swatch
    panel_in = 0.55 + 0.22 * n  # a panel's title, axis and bars
    legend_in = 0.3 + 0.14 * sum(label.count("\n") + 1 for label in labels)
    fig = Figure(figsize=(width, 0.5 + rows * panel_in + legend_in), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    y = np.arange(n)[::-1]  # A on top
    for ax, metric in zip(axes, metrics):
        values = [g[metric] for g in result.groups]
        stds = [(g[f"{metric}_std"] or 0.0) if g["n_runs"] > 1 else 0.0 for g in result.groups]
        bars = ax.barh(y, [v or 0.0 for v in values], 0.75, xerr=stds if any(stds) else None,
                       capsize=2, edgecolor="black", linewidth=0.6, error_kw={"linewidth": 0.8},
                       color=[f"C{i % 10}" for i in range(n)])
        for i, bar in enumerate(bars):  # 10 colours, then hatched
            bar.set_hatch(_BAR_HATCHES[i // 10 % len(_BAR_HATCHES)])
        shown = [("n/a" if value is None else f"{value:.1%}" if metric in PERCENT_METRICS else f"{value:.3f}")
                 + (f" {g[f'{metric}_method']}" if g.get(f"{metric}_method") else "") for g, value in zip(result.groups, values)]
        for bar, text, value, std in zip(bars, shown, values, stds):  # beyond the error bar, on the bar's side
            side = -1 if (value or 0.0) < 0 else 1
            ax.annotate(text, ((value or 0.0) + side * std, bar.get_y() + bar.get_height() / 2), xytext=(2 * side, 0),
                        textcoords="offset points", ha="left" if side > 0 else "right", va="center", fontsize=7)
        # the values printed beside the bars fit in the panel: the longest takes this share of its axis
        room = min(0.6, (4 + 7 * 0.6 * max(map(len, shown))) / 72 / (width / columns - 0.5))
        low = min([0.0] + [(v or 0.0) - s for v, s in zip(values, stds)])
        high = max([0.0] + [(v or 0.0) + s for v, s in zip(values, stds)])
        pad = ((high - low) or 1.0) * room / (1 - room)
        ax.set_xlim(low - (pad if low < 0 else 0.0), high + (pad if high > 0 or low == 0 else 0.0))
        ax.set_xticks([tick for tick in ax.get_xticks() if low - 1e-9 <= tick <= high + 1e-9] or [0.0])  # none in the room
        if metric in PERCENT_METRICS:
            ax.xaxis.set_major_formatter(PercentFormatter(xmax=1, decimals=None))
        ax.set_yticks(y, keys, fontsize=8)
        ax.set_title("\n".join(textwrap.wrap(heading(metric), 24)), fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    texts, files = dict.fromkeys(_data_text(g) for g in result.groups), {compare_stats.data_key(g) for g in result.groups}
    title = f"{', '.join(texts)}{f' ({len(files)} files)' if len(files) > len(texts) else ''}: {result.split} split" \
        + (f", evaluation: {shared['evaluation']}" if "evaluation" in shared else "") \
        + ("; mean over seeds, error bar: std" if any(g["n_runs"] > 1 for g in result.groups) else "")
    fig.suptitle(wrapped(title, 10), fontsize=10)
    fig.legend(list(axes[0].patches)[:n], labels, fontsize=8, loc="outside lower center", ncols=1)  # the bars A, B...
    return fig


def _bar_key(i: int) -> str:
    """A, B, ..., Z, AA, AB, ...: a setup's key on the chart."""
    return _bar_key(i // 26 - 1) + ascii_uppercase[i % 26] if i >= 26 else ascii_uppercase[i]


def write_xlsx(path: str | os.PathLike, result: Comparison) -> Path:
    groups, runs, skipped = _frames(result)
    formats = {"size": tables.INTEGER, "n_runs": tables.INTEGER, "train_s": "0.0", "epochs": "General"}
    for metric in result.metrics:
        formats[metric] = formats[f"{metric}_std"] = tables.metric_format(metric)
    sheets = {
        "comparison": [tables.Block(groups, formats=formats)],
        "runs": [tables.Block(runs, formats=formats)],
        "not compared": [tables.Block(skipped)],
    }
    if result.paired:  # A and B named above the table, as in the text
        import pandas as pd

        paired = result.paired
        sheets["paired tests"] = [tables.Block(
            pd.DataFrame(compare_stats.paired_rows(paired)),
            title=f"A = {paired['a']} vs B = {paired['b']} ({paired['split']} split; p_holm: Holm-adjusted over "
                  f"the {paired.get('tests', 0)} tests)",
            formats={"a": tables.DECIMAL, "b": tables.DECIMAL, "difference": tables.DECIMAL,
                     "ci_low": tables.DECIMAL, "ci_high": tables.DECIMAL})]
    return tables.write_workbook(path, sheets)


def table_text(result: Comparison, wide: bool = False, width: int | None = None) -> str:
    """The Rich tables as text, `width` columns wide: by default coloured and terminal-wide on
    a terminal; plain and wide enough for the whole table (instead of Rich's 80 columns) when
    piped. A table that cannot fit (many metrics) runs past the width rather than lose its
    right-hand columns. No line ends in spaces."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    buffer = io.StringIO()
    shown = rich_tables(result, wide)
    out = console.widened(Console(file=buffer, width=width or (shutil.get_terminal_size().columns if terminal else 240),
                                  force_terminal=terminal, no_color=not terminal), shown[0])
    out.print(*shown, crop=False)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip("\n").splitlines())


def render(result: Comparison, fmt: str, files: Sequence[Path] = (), wide: bool = False) -> str:
    """What `medcli aggregate --format FMT` prints on stdout: the comparison, then the files
    written (`files`), one per line (json: a "files" list; xlsx: the files alone; csv and md
    print the comparison alone, so their output stays a CSV or Markdown document)."""
    listed = "".join(f"\n{path}" for path in files)
    if fmt == "table":
        return table_text(result, wide) + (f"\n{listed}" if files else "")
    if fmt == "csv":
        return to_csv(result).rstrip("\n")
    if fmt == "md":
        return to_markdown(result, wide).rstrip("\n")
    if fmt == "json":
        return json.dumps({**result.to_json(), "files": [str(path) for path in files]}, indent=2, default=str)
    if fmt == "xlsx":
        return listed.lstrip("\n")
    raise UsageError(f"unknown --format '{fmt}'; choose from {', '.join(FORMATS)}")


def compare(paths: Sequence[str | os.PathLike], split: str = "test", metric_names: Sequence[str] = DEFAULT_METRICS,
            out_dir: str | os.PathLike | None = None, fmt: str = "table", pair: Sequence[str] | None = None,
            reference: bool = False, wide: bool = False) -> str:
    """`medcli aggregate`: compare the runs, write the files into `out_dir` (if given) and
    return the text for stdout in format `fmt` (`render`)."""
    if fmt == "xlsx" and out_dir is None:
        raise UsageError("--format xlsx writes a file; add --out DIR (the workbook goes to DIR/comparison.xlsx)")
    result = aggregate(paths, split=split, metric_names=metric_names, pair=pair, reference=reference)
    files = write_outputs(out_dir, result, wide) if out_dir is not None else []
    if fmt in ("csv", "md"):
        for path in files:
            console.info(f"wrote {path}")
    return render(result, fmt, files, wide)


OUTPUT_FILES = ("comparison.csv", "runs.csv", "comparison.xlsx", "comparison.md", "comparison.png")


def write_outputs(out_dir: str | os.PathLike, result: Comparison, wide: bool = False) -> list[Path]:
    """comparison.csv (groups), runs.csv, comparison.xlsx, comparison.md and comparison.png."""
    out = fileio.output_folder(out_dir, OUTPUT_FILES)
    with fileio.together(out) as staging:  # all five replace the earlier comparison, or none does
        groups, runs, workbook, markdown, chart = (staging / name for name in OUTPUT_FILES)
        fileio.write_text(groups, to_csv(result))
        fileio.write_text(runs, _frames(result)[1].to_csv(index=False, float_format="%.6g"))
        write_xlsx(workbook, result)
        fileio.write_text(markdown, to_markdown(result, wide))
        write_chart(chart, result)
    return [out / name for name in OUTPUT_FILES]
