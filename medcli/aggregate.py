"""`medcli aggregate`: many runs -> one comparison table (stdout, CSV, XLSX, Markdown, JSON)
and a grouped bar chart.

A pure function of files: each run's `manifest.json` (what was trained) and
`metrics/<split>.json` (how it scored). No model is loaded and torch is never imported, so
comparing a hundred runs takes a second. Runs that differ only by their seed (and by where or
on which device they ran) form one group reported as mean ± std. A run that cannot be compared
(unreadable, unfinished, not evaluated) is listed with the reason, never silently dropped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import console, fileio, reports, tables
from medcli.config import NOT_EXPERIMENT
from medcli.errors import UsageError
from medcli.names import COMPARE_FORMATS as FORMATS, COMPARE_METRICS as DEFAULT_METRICS
from medcli.explainers import METHODS as EXPLAIN_METHODS
from medcli.names import (FAITHFULNESS_PREFIX, LOWER_IS_BETTER, PERCENT_METRICS, SCALAR_METRICS,
                          SPLITS)
from medcli.tasks import EXTRA_METRICS, MultiClass
from medcli.run import Run, find_runs

__all__ = ["aggregate", "compare"]

# Config keys that do not change the experiment: runs differing only in these are repeats.
_RUN_COLUMNS = ("run", "dataset", "size", "model", "pretrained", "epochs", "seed", "train_s", "evaluation")
LEADER_MARK = "★"

# Every metric a run can be compared on: the common ones, each task type's own, faithfulness.
FAITHFULNESS_METRICS = tuple(f"{FAITHFULNESS_PREFIX}{method}" for method in EXPLAIN_METHODS)
COMPARABLE_METRICS = (*SCALAR_METRICS, *dict.fromkeys(m for ms in EXTRA_METRICS.values() for m in ms),
                      *FAITHFULNESS_METRICS)


@dataclass
class Comparison:
    """The aggregate result: per-run rows, seed groups, leaders and the runs left out."""

    split: str
    metrics: list[str]
    runs: list[dict]
    groups: list[dict]
    leaders: dict[str, list[str]]
    skipped: list[dict]

    def to_json(self) -> dict:
        return {"split": self.split, "metrics": self.metrics, "groups": self.groups, "runs": self.runs,
                "leaders": self.leaders, "skipped": self.skipped}


# ---------------------------------------------------------------------------------------
# Finding and reading runs
# ---------------------------------------------------------------------------------------


def read_run(run_dir: Path, split: str, metric_names: Sequence[str]) -> dict:
    """One comparison row; raises UsageError with the reason a run cannot be compared."""
    run = Run.open(run_dir)
    state = run.status("train")
    if state != "completed":
        raise UsageError(f"unfinished: train {state or 'not run'} (finish it with 'medcli train --resume {run_dir}')")
    train = run.stages["train"]
    metrics_file = run.metrics_file(split)
    if not metrics_file.is_file():
        raise UsageError(f"not evaluated on {split} (run 'medcli evaluate {run_dir} --split {split}')")
    try:
        evaluation = json.loads(metrics_file.read_text(encoding="utf-8"))
        values = evaluation["metrics"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{run.relative(metrics_file)} is unreadable ({type(exc).__name__}); re-run 'medcli evaluate'") from None
    values = {**values, **_faithfulness(run, [m for m in metric_names if m in FAITHFULNESS_METRICS], split)}
    missing = [m for m in metric_names if m not in values]
    task = evaluation.get("task", MultiClass.kind)  # recorded since the task layer; older runs were multi-class
    foreign = [m for m in missing if task in EXTRA_METRICS and m not in EXTRA_METRICS[task]
               and any(m in ms for ms in EXTRA_METRICS.values())]
    if foreign:
        raise UsageError(f"{', '.join(foreign)} does not apply to {task} tasks; leave it out of --metrics")
    if missing:
        raise UsageError(f"{run.relative(metrics_file)} lacks {', '.join(missing)}; re-run 'medcli evaluate'")
    config, summary = run.config, train.get("summary", {})
    model = run.data.get("model", {})
    # The weights the run really started from, not the ones asked for: a --pretrained run whose
    # download failed trained from scratch and belongs with the from-scratch runs.
    pretrained = bool(model.get("pretrained", config.get("pretrained")))
    calibrated = bool(evaluation.get("calibration"))
    tta = len(evaluation.get("tta", {}).get("views", [])) > 1  # the identity alone is a plain evaluation
    settings = [evaluation.get("checkpoint", "?")] + (["tta"] if tta else []) + (["calibrated"] if calibrated else [])
    experiment = {key: value for key, value in config.items() if key not in NOT_EXPERIMENT}
    experiment.update(pretrained=pretrained, data_md5=run.dataset.get("md5"), evaluation=settings)
    return {
        "run": run.run_id,
        "path": str(run_dir),
        # Synthetic demo data must never pass for a real result in a comparison table.
        "dataset": f"{run.dataset.get('flag')}{' (SYNTHETIC)' if run.dataset.get('synthetic') else ''}",
        "size": run.dataset.get("size"),
        "model": model.get("name", config.get("model")),
        "pretrained": pretrained,
        "epochs": summary.get("epochs_run"),
        "seed": config.get("seed"),
        "train_s": summary.get("train_seconds", train.get("duration_s")),
        "evaluation": ", ".join(settings),
        "experiment": json.dumps(experiment, sort_keys=True, default=str),
        **{m: values[m] for m in metric_names},
    }


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
    (sample std, ddof=1; None for a single run), ordered best first by the first metric."""
    by_experiment: dict[str, list[dict]] = {}
    for row in runs:
        by_experiment.setdefault(row["experiment"], []).append(row)
    groups = []
    for members in by_experiment.values():
        first = members[0]
        seeds = sorted(m["seed"] for m in members if m["seed"] is not None)
        label = first["run"] if len(members) == 1 else f"{first['run']} +{len(members) - 1}"
        group = {"group": label, "dataset": first["dataset"], "size": first["size"], "model": first["model"],
                 "pretrained": first["pretrained"], "evaluation": first["evaluation"], "n_runs": len(members),
                 "seeds": ", ".join(map(str, seeds)), "runs": [m["run"] for m in members],
                 "epochs": _mean_std([m["epochs"] for m in members])[0],
                 "train_s": _mean_std([m["train_s"] for m in members])[0]}
        for metric in metric_names:
            group[metric], group[f"{metric}_std"] = _mean_std([m[metric] for m in members])
        groups.append(group)
    key = metric_names[0]
    sign = 1 if key in LOWER_IS_BETTER else -1
    groups.sort(key=lambda g: (g[key] is None, sign * (g[key] or 0.0), g["group"]))
    return groups


def find_leaders(groups: list[dict], metric_names: Sequence[str]) -> dict[str, list[str]]:
    """Per metric, the group(s) with the best mean (lower is better for losses and ECE)."""
    leaders = {}
    for metric in metric_names:
        scored = [(g[metric], g["group"]) for g in groups if g[metric] is not None]
        if scored:
            best = (min if metric in LOWER_IS_BETTER else max)(value for value, _ in scored)
            leaders[metric] = [name for value, name in scored if np.isclose(value, best, rtol=0, atol=1e-12)]
    return leaders


def _faithfulness(run: Run, wanted: Sequence[str], split: str) -> dict:
    """road_<method> -> the mean ROAD faithfulness of the run's explain:<method> stage on `split`."""
    values = {}
    for metric in wanted:
        method = metric[len(FAITHFULNESS_PREFIX):]
        summary = run.stages.get(run.explain_stage(method), {}).get("summary", {})
        if run.status(run.explain_stage(method)) != "completed" or not summary.get("faithfulness") \
                or summary.get("split") != split:
            raise UsageError(f"no {metric}: not explained with {method} on {split} with faithfulness scores "
                             f"(run 'medcli explain {run.run_dir} --method {method} --split {split}')")
        values[metric] = summary["faithfulness"]["mean"]
    return values


def aggregate(paths: Sequence[str | os.PathLike], split: str = "test",
              metric_names: Sequence[str] = DEFAULT_METRICS) -> Comparison:
    """Read every run under `paths` and compare them on `metric_names` of `split`."""
    if split not in SPLITS:
        raise UsageError(f"unknown --split '{split}'; choose test, val or train")
    metric_names = list(dict.fromkeys(metric_names))
    unknown = [m for m in metric_names if m not in COMPARABLE_METRICS]
    if unknown or not metric_names:
        raise UsageError(f"unknown metric {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(m for m in COMPARABLE_METRICS if m not in FAITHFULNESS_METRICS)} "
                         f"or road_<explain method>")
    run_dirs, skipped = find_runs(paths or ["."])
    runs = []
    for run_dir in run_dirs:
        try:
            runs.append(read_run(run_dir, split, metric_names))
        except UsageError as exc:
            skipped.append({"run": str(run_dir), "reason": str(exc)})
    for entry in skipped:
        console.warn(f"not compared: {entry['run']}: {entry['reason']}")
    if not runs:
        raise UsageError(f"no evaluated runs to compare among {len(run_dirs)} found; "
                         f"evaluate them first with 'medcli evaluate RUN --split {split}'")
    groups = group_runs(runs, metric_names)
    return Comparison(split, metric_names, runs, groups, find_leaders(groups, metric_names), skipped)


# ---------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------


def _display(metric: str, mean, std) -> str:
    if mean is None:
        return "n/a"
    percent = metric in PERCENT_METRICS
    value = f"{mean:.2%}" if percent else f"{mean:.4f}"
    if std is not None:
        value += f" ± {std * 100:.2f}" if percent else f" ± {std:.4f}"
    return value


def display_rows(result: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and text rows of the comparison (mean ± std, leaders starred), shared by the
    Rich table and the Markdown file."""
    header = ["run", "setup", "evaluation", "seeds", "epochs", "train time", *result.metrics]
    rows = []
    for g in result.groups:
        setup = f"{g['dataset']} {g['size']}px, {g['model']}{', pretrained' if g['pretrained'] else ''}"
        cells = [g["group"], setup, g["evaluation"], g["seeds"],
                 "" if g["epochs"] is None else f"{g['epochs']:g}",
                 "" if g["train_s"] is None else f"{g['train_s']:.0f} s"]
        for metric in result.metrics:
            text = _display(metric, g[metric], g[f"{metric}_std"])
            cells.append(f"{text} {LEADER_MARK}" if g["group"] in result.leaders.get(metric, []) else text)
        rows.append(cells)
    return header, rows


def rich_tables(result: Comparison) -> list:
    """The comparison as a Rich table, plus one listing runs left out (for stdout)."""
    from rich.table import Table

    header, rows = display_rows(result)
    arrows = {m: "↓" if m in LOWER_IS_BETTER else "↑" for m in result.metrics}
    table = Table(title=f"{result.split} split ({LEADER_MARK} = best)", title_justify="left")
    for name in header:
        numeric = name in result.metrics or name in ("epochs", "train time")
        table.add_column(f"{name} {arrows[name]}" if name in arrows else name, justify="right" if numeric else "left")
    for row in rows:
        table.add_row(*row)
    shown = [table]
    if result.skipped:
        left_out = Table(title="not compared", title_justify="left")
        left_out.add_column("run")
        left_out.add_column("reason")
        for entry in result.skipped:
            left_out.add_row(entry["run"], entry["reason"])
        shown.append(left_out)
    return shown


def to_markdown(result: Comparison) -> str:
    header, rows = display_rows(result)
    def escape(text) -> str:
        return str(text).replace("|", "\\|")

    lines = [f"## Comparison on the {result.split} split ({LEADER_MARK} = best)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    if result.skipped:
        lines += ["", "## Not compared", "", "| run | reason |", "|---|---|"]
        lines += [f"| {escape(s['run'])} | {escape(s['reason'])} |" for s in result.skipped]
    return "\n".join(lines) + "\n"


def _frames(result: Comparison):
    """(groups, runs, skipped) DataFrames with numeric metric columns (mean, std)."""
    import pandas as pd

    group_columns = ["group", "dataset", "size", "model", "pretrained", "evaluation", "n_runs", "seeds", "epochs",
                     "train_s"]
    for metric in result.metrics:
        group_columns += [metric, f"{metric}_std"]
    groups = pd.DataFrame(result.groups, columns=group_columns)
    groups["leads"] = [", ".join(m for m in result.metrics if g in result.leaders.get(m, [])) for g in groups["group"]]
    runs = pd.DataFrame(result.runs, columns=[*_RUN_COLUMNS, *result.metrics, "path"])
    skipped = pd.DataFrame(result.skipped, columns=["run", "reason"])
    return groups, runs, skipped


def to_csv(result: Comparison) -> str:
    return _frames(result)[0].to_csv(index=False, float_format="%.6g")


def write_chart(path: str | os.PathLike, result: Comparison) -> Path:
    """Grouped bar chart: one cluster per metric, one bar per group, error bars = std."""
    from matplotlib.figure import Figure

    n = len(result.groups)
    width = 0.8 / max(n, 1)
    fig = Figure(figsize=(max(6.0, 1.6 * len(result.metrics) + 0.3 * n), 4.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(result.metrics))
    for i, g in enumerate(result.groups):
        means = [g[m] if g[m] is not None else np.nan for m in result.metrics]
        stds = [g[f"{m}_std"] or 0.0 for m in result.metrics] if g["n_runs"] > 1 else None
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=stds, capsize=3, label=g["group"])
    ax.set_xticks(x, [f"{m} {'↓' if m in LOWER_IS_BETTER else '↑'}" for m in result.metrics])
    ax.set_ylabel("value (mean ± std over seeds)")
    ax.set_title(f"comparison on the {result.split} split")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(n, 3))
    return reports.save_figure(fig, path)


def write_xlsx(path: str | os.PathLike, result: Comparison) -> Path:
    groups, runs, skipped = _frames(result)
    formats = {"size": tables.INTEGER, "n_runs": tables.INTEGER, "train_s": "0.0", "epochs": "0.#"}
    for metric in result.metrics:
        formats[metric] = formats[f"{metric}_std"] = tables.metric_format(metric)
    return tables.write_workbook(path, {
        "comparison": [tables.Block(groups, formats=formats)],
        "runs": [tables.Block(runs, formats=formats)],
        "not compared": [tables.Block(skipped)],
    })


def _table_text(result: Comparison) -> str:
    """The Rich tables as text: coloured and terminal-wide on a terminal; plain and wide enough
    for the whole table (instead of Rich's 80 columns) when piped."""
    from rich.console import Console

    terminal = sys.stdout.isatty()
    buffer = io.StringIO()
    width = shutil.get_terminal_size().columns if terminal else 240
    Console(file=buffer, width=width, force_terminal=terminal, no_color=not terminal).print(*rich_tables(result))
    return buffer.getvalue().rstrip("\n")


def render(result: Comparison, fmt: str, out_dir: str | os.PathLike | None = None) -> str:
    """What `medcli aggregate --format FMT` prints on stdout (xlsx: the workbook's path)."""
    if fmt == "table":
        return _table_text(result)
    if fmt == "csv":
        return to_csv(result).rstrip("\n")
    if fmt == "md":
        return to_markdown(result).rstrip("\n")
    if fmt == "json":
        return json.dumps(result.to_json(), indent=2, default=str)
    if fmt == "xlsx":
        return str(Path(out_dir) / "comparison.xlsx")
    raise UsageError(f"unknown --format '{fmt}'; choose from {', '.join(FORMATS)}")


def compare(paths: Sequence[str | os.PathLike], split: str = "test", metric_names: Sequence[str] = DEFAULT_METRICS,
            out_dir: str | os.PathLike | None = None, fmt: str = "table") -> str:
    """`medcli aggregate`: compare the runs, write the files into `out_dir` (if given) and
    return the text for stdout in format `fmt`."""
    if fmt == "xlsx" and out_dir is None:
        raise UsageError("--format xlsx writes a file; add --out DIR (the workbook goes to DIR/comparison.xlsx)")
    result = aggregate(paths, split=split, metric_names=metric_names)
    if out_dir is not None:
        for path in write_outputs(out_dir, result):
            console.info(f"wrote {path}")
    return render(result, fmt, out_dir)


def write_outputs(out_dir: str | os.PathLike, result: Comparison) -> list[Path]:
    """comparison.csv (groups), runs.csv, comparison.xlsx, comparison.md and comparison.png."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory for the comparison files")
    return [
        fileio.write_text(out / "comparison.csv", to_csv(result)),
        fileio.write_text(out / "runs.csv", _frames(result)[1].to_csv(index=False, float_format="%.6g")),
        write_xlsx(out / "comparison.xlsx", result),
        fileio.write_text(out / "comparison.md", to_markdown(result)),
        write_chart(out / "comparison.png", result),
    ]
