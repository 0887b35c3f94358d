"""Comparing explanations across runs, from the maps they stored (no model needed).

`medcli explain` keeps each method's raw maps in `explain/<method>/maps.npz` with the
sample numbers, labels, predictions and confidence they belong to, and the options that chose
those samples. Sample choice depends on
the dataset, split and seed only, so a CNN run and a ViT run explained with the same seed
explain the same images. `compare` lines up every explained (run, method) on their common
samples and measures how much each pair of maps agrees, per sample:

* Spearman rank correlation of the two maps' pixels (1: same ranking of relevance);
* overlap of the top 20 % most relevant pixels (intersection over union; two unrelated maps
  score about 0.11, the IoU of two random 20 % sets).

It is part of `aggregate` (`--maps`): like the metric table, it compares finished runs from
their files alone and writes into `--out`.
"""

from __future__ import annotations

import json
import os
import io
import textwrap
import zipfile
from dataclasses import dataclass
from string import ascii_uppercase
from itertools import combinations
from pathlib import Path
from typing import Sequence

from medcli import console, fileio
from medcli.errors import UsageError
from medcli.explainers import METHODS as EXPLAIN_METHODS
from medcli.names import short_names
from medcli.run import Run, find_runs

__all__ = ["aggregate_maps", "agreement", "compare", "lines", "shown"]

TOP_SHARE = 0.2
# The comparison figure: a row per true class of its first samples, up to MAX_PER_CLASS and no
# more than keep the figure narrow enough that its smallest text (TILE_PT) prints at
# reports.MIN_PRINT_PT on a page reports.PRINT_WIDTH_IN wide; its resolution drops for
# datasets with many classes so that it stays at most MAX_FIGURE_PX high.
MAX_PER_CLASS = 4
TILE_PT, TEXT_PT = 6.5, 7
MAX_FIGURE_PX = 2000
DPI = 110
TILE_IN, GAP_IN, BLOCK_GAP_IN, LABEL_IN = 0.9, 0.04, 0.22, 1.45  # layout, in inches
TITLE_IN, LINE_IN, ROW_GAP_IN = 0.2, 0.15, 0.12
CAPTION_IN = 1.2  # one pair's scores under a sample ("AB  \u03c1 0.76  IoU 0.92"); as many a line as a block is wide


@dataclass
class Column:
    """One run's maps of one method."""

    run: str  # the run folder's name, or as much of its path as tells it from the others' (`_named`)
    method: str
    meta: dict
    data: dict  # the arrays of maps.npz
    path: Path  # the run directory

    @property
    def label(self) -> str:
        return f"{self.run} · {self.method}"


def _named(columns: list[Column]) -> None:
    """Runs of one folder name under different parents (a sweep started in the same second into
    two --runs-dir, a copied run) are named by their paths below the folder they share."""
    if len({column.label for column in columns}) < len(columns):
        base = os.path.commonpath([column.path.parent for column in columns])
        for column in columns:
            column.run = os.path.relpath(column.path, base)


def _columns(run_dirs: Sequence[Path], methods: Sequence[str] | None) -> list[Column]:
    import numpy as np

    columns = []
    for run_dir in run_dirs:
        run = Run.open(run_dir)
        done = [m for m in EXPLAIN_METHODS if run.status(run.explain_stage(m)) == "completed" and (not methods or m in methods)]
        if not done and methods and not any(EXPLAIN_METHODS[m].supports(run.spec) for m in methods):
            explained = [m for m in EXPLAIN_METHODS if run.status(run.explain_stage(m)) == "completed"]
            then = (f"name a method it has: {', '.join(explained)}" if explained
                    else f"explain it first with '{run.command('explain')}'")
            raise UsageError(f"{' and '.join(methods)} {'does' if len(methods) == 1 else 'do'} not apply to the model "
                             f"of run {run_dir} ({run.spec.get('name')}); {then}")
        if not done:
            raise UsageError(f"run {run_dir} has no completed explanation{' with ' + ', '.join(methods) if methods else ''}; "
                             f"explain it first with '{run.command('explain')}'")
        for method in done:
            path = run.maps_file(method)
            if not path.is_file():
                raise UsageError(f"run {run_dir} has no {run.relative(path)} (explained by an older medcli); "
                                 f"explain it again with '{run.command('explain', '--method', method)}'")
            fix = f"explain it again with '{run.command('explain', '--method', method, '--overwrite')}'"
            try:  # checked against the sha256 the explain stage recorded
                with np.load(io.BytesIO(run.read_artefact(path, fix))) as archive:
                    data = {key: archive[key] for key in archive.files}
                meta = json.loads(str(data.pop("meta")))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
                raise UsageError(f"{run.relative(path)} of run {run_dir} is damaged ({type(exc).__name__}); {fix}") from None
            if "maps" not in data:
                raise UsageError(f"{run.relative(path)} of run {run_dir} is damaged (it holds no maps); {fix}")
            columns.append(Column(run.run_dir.name, method, meta, data, run.run_dir.resolve()))
    _named(columns)
    return columns


def _check_comparable(columns: list[Column]) -> None:
    first = columns[0]
    for column in columns[1:]:
        for key in ("flag", "size", "split"):
            if column.meta.get(key) != first.meta.get(key):
                raise UsageError(f"cannot compare maps on different {'datasets' if key != 'split' else 'splits'}: "
                                 f"{first.label} has {key} {first.meta.get(key)}, {column.label} has {column.meta.get(key)}")
        md5s = first.meta.get("md5"), column.meta.get("md5")
        if None not in md5s and md5s[0] != md5s[1]:  # sample numbers of other files are other images
            raise UsageError(f"cannot compare maps on different data files: {first.label} explained md5 {md5s[0]}, "
                             f"{column.label} md5 {md5s[1]}; explain runs trained on the same file")
        targets = first.meta.get("target"), column.meta.get("target")
        if None not in targets and targets[0] != targets[1]:  # maps of other classes than the ones compared
            raise UsageError(f"cannot compare maps of different targets: {first.label} explains --target {targets[0]}, "
                             f"{column.label} --target {targets[1]}; explain them with the same --target")
        if column.data["maps"].shape[1:] != first.data["maps"].shape[1:]:
            raise UsageError(f"maps of different sizes: {first.label} {first.data['maps'].shape[1:]}, "
                             f"{column.label} {column.data['maps'].shape[1:]}")


def agreement(a, b, top: float = TOP_SHARE) -> tuple:
    """(Spearman rank correlation, IoU of the top `top` share of pixels) per pair of maps
    (N, H, W); both NaN where a map is constant. The top share of a map is its pixels above
    its k-th largest value, and those at it when they fit: a group of pixels tied across that
    value (the zeros of a ReLU'd map that is mostly zero) stays out, so two maps never share
    pixels only for being tied at the same places; a group tied at the map's maximum is its
    top share whatever its size (a saturated or binary map)."""
    import numpy as np
    from scipy.stats import rankdata

    a = a.reshape(len(a), -1).astype(np.float64)
    b = b.reshape(len(b), -1).astype(np.float64)
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    k = max(1, int(round(top * a.shape[1])))
    tops = []
    for values in (a, b):
        threshold = -np.partition(-values, k - 1, axis=1)[:, k - 1:k]  # each map's k-th largest value
        reached = values >= threshold
        # a group tied across the threshold (the zeros of a ReLU'd map) is left out: which of its
        # pixels made the top share would be arbitrary, and raster order made maps agree
        above = values > threshold
        # ... unless the tie is at the top (a saturated or binary map): then the tied group is it
        tops.append(np.where((reached.sum(1, keepdims=True) == k) | ~above.any(1, keepdims=True), reached, above))
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = (tops[0] & tops[1]).sum(1) / (tops[0] | tops[1]).sum(1)
    constant = ~((a.min(1) < a.max(1)) & (b.min(1) < b.max(1)))  # a constant map, or one holding NaN
    return rho, np.where(constant, np.nan, iou)


OUTPUT_FILES = ("maps_agreement.csv", "maps_agreement.json", "maps_compare.png")


def compare(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, methods: Sequence[str] | None = None,
            root: str | os.PathLike | None = None) -> dict:
    """Line up the stored maps of `run_dirs` on their common samples; write the agreement
    table (CSV, JSON) and a side-by-side figure into `out_dir`; returns the summary."""
    import numpy as np

    from medcli import datasets

    unknown = [m for m in methods or () if m not in EXPLAIN_METHODS]
    if unknown:
        raise UsageError(f"unknown --method {', '.join(unknown)}; choose from {', '.join(EXPLAIN_METHODS)}")
    columns = _columns([Path(p) for p in run_dirs], methods)
    if len(columns) < 2:
        raise UsageError("comparing maps needs at least two explained runs (or one run explained with two methods)")
    _check_comparable(columns)
    common = sorted(set.intersection(*(set(c.data["indices"].tolist()) for c in columns)))
    if not common:
        chosen = "; ".join(f"{c.label} explained {c.meta.get('selection') or 'samples chosen by an older medcli'}"
                           for c in columns)
        raise UsageError(f"the explained runs share no sample ({chosen}); explain them with the same options "
                         "(add --overwrite to replace an explanation of other samples)")
    # each column's row of every common sample (a list: two columns may share a label until `_named`)
    rows = [[int(np.flatnonzero(c.data["indices"] == i)[0]) for i in common] for c in columns]
    split, flag = columns[0].meta["split"], columns[0].meta["flag"]
    data = Run.open(run_dirs[0]).load_data(root, [split])  # before any file is written: it may be missing
    explained_md5 = next((c.meta["md5"] for c in columns if c.meta.get("md5")), None)
    if explained_md5 and data.record.get("md5") and data.record["md5"] != explained_md5:
        raise UsageError(f"{data.record.get('path')} is not the file the maps were made on (md5 {data.record['md5']}, "
                         f"explained {explained_md5}): its sample numbers are other images; pass --root DIR holding "
                         "that file")
    present = np.asarray(datasets.task(flag).indicator(data.labels[split][common]), dtype=bool)  # (N, K)
    labels = _row_class(present)
    # per column and sample: the prediction is one of the sample's labels (no label: not judged)
    right = [present[np.arange(len(common)), c.data["predictions"][rows[i]]] | ~present.any(axis=1)
             for i, c in enumerate(columns)]
    names = [*datasets.class_names(flag), NO_LABEL]  # labels[i] == -1: names[-1]
    out_dir = fileio.output_folder(out_dir, OUTPUT_FILES)
    table, pairs, scores = [], [], []
    for (first, a), (second, b) in combinations(enumerate(columns), 2):
        rho, iou = agreement(a.data["maps"][rows[first]], b.data["maps"][rows[second]])
        scores.append((_letter(first) + _letter(second), rho, iou))
        defined = np.isfinite(rho)  # a pair with a constant map has no rank correlation (nor IoU)
        per_class = {names[k]: {"spearman": _mean(rho[labels == k]), "top20_iou": _mean(iou[labels == k]),
                                "n": int((defined & (labels == k)).sum()),
                                "undefined": int((~defined & (labels == k)).sum())} for k in _classes(labels)}
        pairs.append({"a": a.label, "b": b.label, "spearman": _mean(rho), "top20_iou": _mean(iou),
                      "n": int(defined.sum()), "undefined": int((~defined).sum()), "per_class": per_class})
        for i, sample in enumerate(common):
            table.append({"sample": sample, "label": names[labels[i]], "a": a.label, "b": b.label,
                          "spearman": _round(rho[i]), "top20_iou": _round(iou[i])})
    summary = {"split": split, "dataset": flag, "samples": len(common), "columns": [c.label for c in columns],
               "pairs": pairs}
    target = next((c.meta["target"] for c in columns if c.meta.get("target") not in (None, "pred")), None)
    if target is not None:  # the captions name the prediction; the class-specific maps are of another class
        summary["target"] = names[int(target)] if target.isdigit() else f"the {target} class"
    from medcli import tables

    note = datasets.provenance(data.record)  # data that is not the official file says so
    with fileio.together(out_dir) as staging:  # the three replace the earlier comparison's, or none does
        agreement_csv, agreement_json, figure = (staging / name for name in OUTPUT_FILES)
        tables.write_table(agreement_csv, table, list(table[0]))
        fileio.write_json(agreement_json, summary)
        save_figure(figure, columns, rows, right, common, labels, scores,
                    data.images[split], names, lines(summary)[0] + (f"; data: {note}" if note else ""))
    summary["files"] = [str(out_dir / name) for name in OUTPUT_FILES]
    return summary


NO_LABEL = "no label"  # the row of multi-label samples without any label (ChestMNIST's "no finding")


def _row_class(present):
    """The class each sample is grouped under, from its labels alone (`present`: the (N, K)
    `Task.indicator` of the data's labels; the same whatever the models): its label; a
    multi-label sample's first label, or -1 without any."""
    import numpy as np

    return np.where(present.any(axis=1), present.argmax(axis=1), -1)


def _classes(labels) -> list[int]:
    """The row classes present, in class order, the samples without a label last."""
    return sorted(set(labels.tolist()), key=lambda k: (k < 0, k))


def _letter(column: int) -> str:
    """A, B, ... Z, AA, BB, ...: a column's name in the figure."""
    return ascii_uppercase[column % 26] * (column // 26 + 1)


def save_figure(path, columns: list[Column], rows: list[list[int]], right: list, common: list[int], labels, scores: list[tuple], images,
                names: Sequence[str], title: str) -> Path:
    """The maps side by side on a compact grid: a row per true class (its first samples, as many
    as print at a page's width allows), a block per sample (the image, then each column's overlay, titled with its letter,
    prediction, red when it is not one of the sample's labels (`right`), and confidence) captioned with every
    pair's Spearman and IoU (`scores`: (pair letters, rho, iou) over `common`); a legend names
    the lettered columns."""
    from matplotlib.figure import Figure

    from medcli.reports import MIN_PRINT_PT, PRINT_WIDTH_IN, panels, save_figure as save

    brief = short_names(names, width=10)  # in captions; rows are labelled with longer names
    import numpy as np

    classes = _classes(labels)
    undecided = any("decided" in column.data and not column.data["decided"].all() for column in columns)
    block = (len(columns) + 1) * TILE_IN + len(columns) * GAP_IN
    widest = PRINT_WIDTH_IN * TILE_PT / MIN_PRINT_PT  # printed at a page's width, TILE_PT stays readable
    fits = max(1, int((widest - LABEL_IN - 0.1 + BLOCK_GAP_IN) // (block + BLOCK_GAP_IN)))
    counts = np.unique(labels, return_counts=True)[1]
    per_class = min(MAX_PER_CLASS, fits, int(counts.max()))  # as many slots as the fullest class fills
    width = LABEL_IN + per_class * block + (per_class - 1) * BLOCK_GAP_IN + 0.1
    across = max(1, int(block // CAPTION_IN))  # pairs' scores side by side under a sample, then down
    down = -(-len(scores) // across)
    row_height = TITLE_IN + TILE_IN + down * LINE_IN + ROW_GAP_IN
    chars = int((width - 0.2) * 17)  # 7-pt characters per line of the figure's width
    heading = textwrap.wrap(title, int(chars * 7 / 8))  # bold, 8 pt
    legend = textwrap.wrap((f"Shown: the first {f'{per_class} ' if per_class > 1 else ''}of each class's samples "
                            f"(the scores of all are in {OUTPUT_FILES[0]}). " if per_class < counts.max() else "")
                           + "Over each map: its column, the predicted class (red: not the sample's) and its confidence"
                           + ("; \"top\": the most probable label, where no label reached 0.5" if undecided else "") + ". "
                           f"Under each sample: the Spearman \u03c1 and top-{TOP_SHARE:.0%} IoU of every two maps.", chars)
    lines = len(heading) * 1.2 + len(legend) + 0.3  # the column names follow
    header = 0.2 + LINE_IN * (lines + len(columns))
    height = header + len(classes) * row_height
    fig = Figure(figsize=(width, height))

    def place(x: float, y: float, **text) -> None:  # text at (x, y) inches from the top left
        fig.text(x / width, 1 - y / height, text.pop("s"), **{"fontsize": TEXT_PT, "va": "top", **text})

    place(0.1, 0.1, s="\n".join(heading), fontsize=8, weight="bold")
    place(0.1, 0.1 + LINE_IN * 1.2 * len(heading), s="\n".join(legend))
    for c, column in enumerate(columns):
        place(0.1, 0.1 + LINE_IN * (c + lines), s=f"{_letter(c)}   {column.label}")
    for r, k in enumerate(classes):
        top = header + r * row_height
        place(LABEL_IN - 0.1, top + TITLE_IN + TILE_IN / 2, s=short_names(names)[k], ha="right", va="center",
              fontsize=8)  # k == -1: the last name, NO_LABEL
        for slot, i in enumerate([i for i in range(len(common)) if labels[i] == k][:per_class]):
            left = LABEL_IN + slot * (block + BLOCK_GAP_IN)
            first = rows[0][i]
            tiles = [(f"#{common[i]}", "black",
                      panels(images[common[i]], columns[0].data["maps"][first].astype("float32"))[0])]
            for c, column in enumerate(columns):
                row = rows[c][i]
                predicted = int(column.data["predictions"][row])
                no_label = "decided" in column.data and not column.data["decided"][row]
                tiles.append((f"{_letter(c)} {'top ' if no_label else ''}{brief[predicted]} "
                              f"{float(column.data['confidence'][row]):.2f}",
                              "black" if right[c][i] else "red",
                              panels(images[common[i]], column.data["maps"][row].astype("float32"))[2]))
            for t, (caption, colour, picture) in enumerate(tiles):
                ax = fig.add_axes([(left + t * (TILE_IN + GAP_IN)) / width, 1 - (top + TITLE_IN + TILE_IN) / height,
                                   TILE_IN / width, TILE_IN / height])
                ax.imshow(picture, interpolation="nearest")
                ax.set_axis_off()
                ax.set_title(caption, fontsize=TILE_PT, pad=2, color=colour)
            for j in range(0, len(scores), down):  # a column of captions: AB, AC, AD, then AE, ...
                place(left + j // down * CAPTION_IN, top + TITLE_IN + TILE_IN + 0.03, s="\n".join(
                    f"{pair}  \u03c1 {shown(rho[i], 2)}  IoU {shown(iou[i], 2)}" for pair, rho, iou in scores[j:j + down]))
    return save(fig, path, dpi=min(DPI, MAX_FIGURE_PX / height))


def shown(value, digits: int = 3) -> str:
    """An agreement value as text, with fixed decimals; "n/a" where there is none (the maps of
    a sample or class are all constant: no rank correlation)."""
    return "n/a" if value is None or value != value else f"{float(value):.{digits}f}"


def _mean(values) -> float | None:
    import numpy as np

    values = values[np.isfinite(values)]
    return _round(values.mean()) if len(values) else None


def _round(value) -> float | None:
    value = float(value)
    return round(value, 4) if value == value else None


def aggregate_maps(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None,
                   methods: Sequence[str] | None = None, fmt: str = "table",
                   root: str | os.PathLike | None = None) -> dict:
    """`medcli aggregate --maps`: compare the stored maps of the runs found under `paths`
    (run directories or folders of runs; default: .) into `out_dir`; returns the summary,
    printed as lines and the files written (`fmt` table) or JSON."""
    if fmt not in ("table", "json"):
        raise UsageError(f"--maps prints --format table or json (its CSV goes to --out as {OUTPUT_FILES[0]}), "
                         f"not {fmt}")
    if out_dir is None:
        raise UsageError("--maps writes a figure and tables: give --out DIR")
    run_dirs, skipped = find_runs(paths or ["."])
    if skipped:
        raise UsageError(f"{skipped[0]['run']}: {skipped[0]['reason']}")
    return compare(run_dirs, out_dir, methods, root)


def lines(summary: dict) -> list[str]:
    """Human-readable agreement lines for the terminal (`shown`)."""
    target = f"; the class-specific maps explain {summary['target']}" if summary.get("target") else ""
    out = [f"{console.plural(summary['samples'], 'common ' + summary['split'] + ' sample')} of {summary['dataset']}{target}"]
    for pair in summary["pairs"]:
        over = (f" over {pair['n']} of {console.plural(pair['n'] + pair['undefined'], 'sample')} "
                f"({pair['undefined']} with a constant map)" if pair.get("undefined") else "")
        out.append(f"{pair['a']}  vs  {pair['b']}: Spearman {shown(pair['spearman'])}, top-20% IoU "
                   f"{shown(pair['top20_iou'])}{over}")
        out += [f"    {name}: {shown(v['spearman'])} / {shown(v['top20_iou'])} (n={v['n']}"
                + (f"; {v['undefined']} undefined" if v.get("undefined") else "") + ")"
                for name, v in pair["per_class"].items()]
    return out
