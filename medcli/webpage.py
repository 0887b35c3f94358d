"""`medcli report`: pages a person can open or print, one HTML file per run or per comparison.

A page stands alone: every figure is its PNG inlined as a `data:` URI, the style sheet (with
a print style sheet) is inline, and there is no script, font or link to load; its content
security policy lets the browser fetch nothing, so it opens offline, as an attachment, and
makes no network request. Everything on it comes from files the other commands wrote: a page
takes a second and never loads a model.

* The run page (`Run.html_report_file()`, recorded by the run's `report` stage): what the
  data is at the top when it is not the official file, the metrics of every evaluated split
  with their bootstrap intervals and per-class values, the calibration before and after
  temperature scaling with the reliability diagrams, every figure train and evaluate drew,
  each explanation method's class grids, then the run (files, training, stages) and its
  configuration and environment.
* The comparison page (`DIR/comparison.html`): `aggregate`'s table (mean ± std over seeds,
  leaders starred), its paired tests and chart, the agreement of the runs' stored explanation
  maps (`maps`), and the runs compared or left out.

This module sits above the stage modules: a comparison page shows what two of them compute
(`aggregate`, `maps`), which neither may import from the other. No stage imports it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import struct
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Sequence

from medcli import __version__, aggregate, compare_stats, console, datasets, fileio, maps, selection
from medcli.errors import MedcliError, UsageError
from medcli.evaluate import shown_metrics
from medcli.explain import faithfulness_text
from medcli.explainers import METHODS as EXPLAIN_METHODS
from medcli.metrics import interval_caption, interval_text, metric_text, mixed_evaluations, temperature_applied, temperature_text
from medcli.names import SPLITS
from medcli.run import Run

__all__ = ["COMPARISON_PAGE", "REPORT_STAGE", "comparison_page", "report", "run_page", "write_comparison_page",
           "write_run_page"]

REPORT_STAGE = "report"
# a printed page's text box in CSS pixels (1/96 in): A4's width less the margins (182 mm), and a
# little less than `figure img`'s max-height (230 mm), room for a caption
PRINT_WIDTH_PX, PRINT_HEIGHT_PX = 688, 820
LONG_WORD = 20  # characters of a table cell's word kept whole; longer ones wrap (`_cell`)
COMPARISON_PAGE = "comparison.html"
PAGE_CHART = "comparison_page.png"  # not aggregate's comparison.png: a page may be written beside its outputs
MAPS_DIR = "maps"  # the maps agreement files of a comparison, beside its page
SPLIT_ORDER = tuple(reversed(SPLITS))  # test first: the split a result is reported on
EVALUATION_KEYS = ("task", "metrics", "ci", "checkpoint", "tta", "device")  # what the page reads of a metrics JSON
FIGURE_CAPTIONS = (("roc", "ROC and precision-recall curves"), ("samples", "Sample predictions (green right, red wrong)"),
                   ("mistakes", "Most confident mistakes"))  # the confusion matrix goes with the metrics
# The browser may load nothing but the inline style sheet and the inlined images.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
:root { --ink: #1b1f24; --muted: #57606a; --line: #d0d7de; --head: #f3f5f8; --warn: #b00020; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 1.6em; margin: 0 0 .15em; overflow-wrap: anywhere; }
h2 { font-size: 1.3em; margin: 1.8em 0 .5em; padding-bottom: .2em; border-bottom: 2px solid var(--line); }
h3 { font-size: 1.08em; margin: 1.3em 0 .4em; }
.sub, .note, figcaption { color: var(--muted); }
.note { margin: .4em 0 .2em; font-size: .92em; }
.provenance { margin: 1em 0; padding: .7em 1em; border: 2px solid var(--warn); border-left-width: 8px;
              background: #fdecee; color: #6d0015; font-weight: 600; }
nav a { margin-right: 1.1em; color: #0550ae; text-decoration: none; }
.wide { overflow-x: auto; }
table { border-collapse: collapse; margin: .4em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .28em .6em; text-align: left; vertical-align: top;
         overflow-wrap: break-word; }  /* words stay whole; a long path or id wraps at its <wbr> (`_cell`) */
thead th { background: var(--head); }
td.num { text-align: right; white-space: nowrap; }
figure { margin: .8em 0 1.4em; break-inside: avoid; page-break-inside: avoid; }
figure img { display: block; max-width: 100%; width: auto; height: auto; border: 1px solid #e6e8eb; }
figcaption { font-size: .88em; margin-top: .3em; }
figure.strips { break-inside: auto; page-break-inside: auto; }  /* a tall figure's strips: a page each at most */
figure.strips img { border: 0; break-inside: avoid; page-break-inside: avoid; }
.grids { display: grid; grid-template-columns: 1fr; gap: 0 18px; }  /* a grid a row: its captions stay legible */
pre { white-space: pre-wrap; overflow-wrap: anywhere; background: #f6f8fa; border: 1px solid var(--line);
      padding: .7em .9em; font-size: .86em; }
footer { margin-top: 3em; padding-top: .6em; border-top: 1px solid var(--line); color: var(--muted); font-size: .85em; }
@media print {
  @page { margin: 14mm; }
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  nav { display: none; }
  section + section { break-before: page; page-break-before: always; }
  h2, h3 { break-after: avoid; page-break-after: avoid; }
  tr { break-inside: avoid; page-break-inside: avoid; }
  .wide { overflow: visible; }
  figure img { max-height: 230mm; }
  .provenance, thead th { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


# ---------------------------------------------------------------------------------------
# HTML pieces
# ---------------------------------------------------------------------------------------


def _e(value) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str] | None, rows: Iterable[Sequence], numeric: Iterable[int] = (),
           caption: str | None = None) -> str:
    """A table (numeric columns right-aligned) under its caption, in a box that scrolls sideways
    on a narrow screen."""
    numeric = set(numeric)
    head = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>" if header else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{_e(c)}</td>' if i in numeric else f"<td>{_cell(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    title = _note(caption) if caption else ""
    return f'{title}<div class="wide"><table>{head}<tbody>{body}</tbody></table></div>'


def _cell(value) -> str:
    """A text cell: a word longer than LONG_WORD characters (a path, a run id) may wrap after
    its separators, and a stretch of it without any every LONG_WORD characters; shorter words
    stay whole. (CSS cannot do both: overflow-wrap: anywhere lets a table squeeze every text
    column to a few letters, break-word leaves a column as wide as its longest path.)"""
    def breakable(word: str) -> str:
        pieces = re.split(r"(?<=[/\\_\-.:,=])|(?=[(\[])", word)  # after a separator, before a bracket
        return "<wbr>".join(_e(piece[i:i + LONG_WORD]) for piece in pieces for i in range(0, len(piece), LONG_WORD))

    return "".join(breakable(word) if len(word) > LONG_WORD else _e(word) for word in re.split(r"(\s+)", str(value)))


def _pairs(items: Iterable[tuple[str, object]]) -> str:
    """A two-column table of names and values (a number to 6 significant digits; other than
    text, as JSON: true, null, [...])."""
    return _table(None, [(key, value if isinstance(value, str) else f"{value:.6g}" if isinstance(value, float)
                          else json.dumps(value, default=str)) for key, value in items])


def _figure(path: Path, caption: str, data: bytes | None = None) -> str:
    """A PNG (`data`, else the file's bytes) inlined as a data: URI, with its caption; its pixel
    size goes into width and height so the page keeps its layout while it loads."""
    data = Path(path).read_bytes() if data is None else data
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24 or not data.endswith(b"IEND\xaeB`\x82"):  # cut short
        raise UsageError(f"{path} is not a whole PNG image (damaged); draw it again with the command that wrote it")
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk follows the 8-byte signature
    strips = _strips(data, width, height)
    images = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(strip).decode("ascii")}" width="{width}" height="{tall}" '
        f'alt="{_e(caption if len(strips) == 1 else f"{caption} (part {i} of {len(strips)})")}">'
        for i, (strip, tall) in enumerate(strips, 1))
    return (f'<figure{"" if len(strips) == 1 else " class=strips"}>{images}'
            f'<figcaption>{_e(caption)}</figcaption></figure>')


def _strips(data: bytes, width: int, height: int) -> list[tuple[bytes, int]]:
    """A PNG (`width` x `height` pixels) as the pieces (PNG bytes, height) a printed page shows
    at their size: itself, or if it is taller than a page (at most PRINT_WIDTH_PX wide, as
    printed), strips a page high each, cut in the widest band of rows of one colour in a strip's
    lower half (the space between a figure's rows, not between two lines of text). Printed
    whole, `max-height` would shrink it to the page's height (the maps figure's text to a third)."""
    limit = int(PRINT_HEIGHT_PX * max(1.0, width / PRINT_WIDTH_PX))  # a page's height, in the image's pixels
    if height <= limit:
        return [(data, height)]
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        pixels = np.asarray(image.convert("RGB"))
    plain = (pixels == pixels[:, :1]).all(axis=(1, 2))
    cuts = [0]
    while height - cuts[-1] > limit:
        lower = cuts[-1] + limit // 2
        window = plain[lower:cuts[-1] + limit]
        # the widest band of plain rows (between a figure's rows, not between two lines of text)
        edges = np.flatnonzero(np.diff(np.concatenate([[False], window, [False]]).astype(np.int8)))
        starts, ends = edges[::2], edges[1::2]
        widest = int(np.argmax((ends - starts)[::-1])) if len(starts) else None  # the lowest of the widest
        cuts.append(cuts[-1] + limit if widest is None
                    else lower + int(starts[::-1][widest] + ends[::-1][widest]) // 2)
    cuts.append(height)
    strips = []
    for top, bottom in zip(cuts, cuts[1:]):
        buffer = io.BytesIO()
        Image.fromarray(pixels[top:bottom]).save(buffer, format="PNG", optimize=True)
        strips.append((buffer.getvalue(), bottom - top))
    return strips


def _run_figure(run: Run, path: Path, caption: str) -> str:
    """A figure of the run. One whose bytes are not those its stage recorded (redrawn since, e.g.
    by `plot-confusion`, or replaced) says so in its caption; one the run recorded but that is
    gone is a note naming it; one it never drew is left out."""
    stage = run.writer_of(path)
    if not path.is_file():
        return _note(f"{run.relative(path)} is missing ({caption}; the {stage} stage wrote it: run that stage again "
                     "to draw it).") if stage else ""
    data = path.read_bytes()
    if not run.as_recorded(path, data):
        caption += f" (not the file the {stage} stage wrote: redrawn or replaced since)"
    return _figure(path, caption, data)


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _page(title: str, subtitle: str, notes: Sequence[str], sections: Sequence[tuple[str, str, str]],
          source: str) -> str:
    """The whole document: a heading, a red box per note on the data, a contents line, the
    sections (id, heading, HTML body) and a footer naming where it came from."""
    banner = "".join(f'<p class="provenance">Not the official MedMNIST data: {_e(note)}</p>' for note in notes)
    contents = "".join(f'<a href="#{key}">{_e(name)}</a>' for key, name, _ in sections)
    body = "\n".join(f'<section id="{key}"><h2>{_e(name)}</h2>{part}</section>' for key, name, part in sections)
    written = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><main><header><h1>{_e(title)}</h1><p class=\"sub\">{_e(subtitle)}</p>{banner}"
            f"<nav>{contents}</nav></header>\n{body}\n"
            f"<footer>Written by medcli {__version__} on {written} from {_e(source)}. Every figure is embedded: "
            f"the page needs no other file and no network.</footer></main></body></html>\n")


# ---------------------------------------------------------------------------------------
# The run page
# ---------------------------------------------------------------------------------------


def write_run_page(path: str | os.PathLike) -> Path:
    """Write a run's page (`Run.html_report_file()`) inside its `report` stage; returns its path.
    A run that is not trained or not evaluated is a one-line refusal naming the command to run;
    one whose last evaluate attempt (of another split) did not finish shows the splits evaluated
    before it, as `aggregate` compares them, and says so (an attempt at work now is waited for)."""
    run = Run.open(path)
    run.require_trained()
    hint = f"evaluate it first with '{run.command('evaluate')}'"
    evaluated = run.evaluated_splits()
    status = run.status("evaluate")
    if evaluated and status not in ("completed", None):
        run.refuse_if_busy("evaluate")  # an evaluation under way: wait for it
        console.warn(f"the last evaluate attempt of run {run.run_dir} did not finish ({status}); the page shows "
                     f"the splits evaluated before it: {', '.join(evaluated)}")
    else:
        run.require("evaluate", hint)
    evaluations = {split: _evaluation(run, split) for split in SPLIT_ORDER if split in evaluated}
    if not evaluations:
        raise UsageError(f"run {run.run_dir} has no evaluated split left; {hint}")
    with run.stage(REPORT_STAGE) as st:
        page = fileio.write_text(run.html_report_file(), run_page(run, evaluations))
        st.add(page, save=False)
        st.summary.update(splits=list(evaluations), bytes=page.stat().st_size)
    return page


def refresh_run_page(path: str | os.PathLike) -> None:
    """Redraw a run's page when it has one: `medcli evaluate` and `medcli explain` call this
    after they change what the page shows, which would otherwise show the earlier results
    unsaid (called by the CLI: the stages sit below this module)."""
    run = Run.open(path)
    if not run.html_report_file().is_file():
        return
    try:
        console.info(f"redrew {write_run_page(run.run_dir)} with the new results")
    except MedcliError as exc:
        console.warn(f"{run.html_report_file()} shows the earlier results and was not redrawn: {exc}")


def _evaluation(run: Run, split: str) -> dict:
    """A split's metrics JSON, refused with one line when it lacks what the page shows (an older
    medcli wrote no intervals)."""
    fix = f"re-run '{run.evaluate_command(split)}'"
    result = run.read_json(run.metrics_file(split), fix)
    missing = [key for key in EVALUATION_KEYS if key not in result]
    if missing:
        raise UsageError(f"{run.metrics_file(split)} has no {', '.join(missing)} (an older medcli wrote it); {fix}")
    return result


def run_page(run: Run, evaluations: dict[str, dict]) -> str:
    """The HTML of a run's page from its manifest and `evaluations` (split -> metrics JSON)."""
    first = next(iter(evaluations.values()))
    record = run.dataset
    note = datasets.provenance(record)
    subtitle = (f"{aggregate.model_label(run.data.get('model', {}), run.config.get('model'))} on {record.get('flag')} "
                f"{record.get('size')} px ({first['task']}), trained {run.data.get('created')} with medcli "
                f"{run.data.get('medcli_version')}")
    sections = [("metrics", "Metrics", _metrics(run, evaluations)),
                ("calibration", "Calibration", _calibration(run, evaluations)),
                ("figures", "Figures", _figures(run, evaluations)),
                ("explanations", "Explanations", _explanations(run)),
                ("run", "Run", _overview(run, evaluations)),
                ("configuration", "Configuration", _configuration(run))]
    return _page(f"Run {run.run_id}", subtitle, [f"{note}; source: {record.get('source')}"] if note else [],
                 sections, str(run.run_dir.resolve()))


def _overview(run: Run, evaluations: dict[str, dict]) -> str:
    record = run.dataset
    kind = datasets.provenance_kind(record)
    facts = [("run directory", str(run.run_dir.resolve())),
             ("data file", f"{record.get('path')} (md5 {record.get('md5')}, {kind or 'official'})"),
             ("images per split", ", ".join(f"{split} {n}" for split, n in (record.get("n_samples") or {}).items())),
             ("evaluated", "; ".join(f"{split}: checkpoint {e['checkpoint']} (epoch {e.get('checkpoint_epoch')}), "
                                     f"views {', '.join(e['tta']['views'])}, {e['device']}"
                                     for split, e in evaluations.items()))]
    stages = [(name, entry.get("status"), entry.get("ended"), entry.get("duration_s"))
              for name, entry in run.stages.items() if name != REPORT_STAGE]
    return (_pairs(facts) + "<h3>Training</h3>" + _pairs(run.stages["train"].get("summary", {}).items())
            + "<h3>Stages</h3>" + _table(("stage", "status", "ended", "seconds"), stages, numeric=[3]))


def _metrics(run: Run, evaluations: dict[str, dict]) -> str:
    """Every split side by side with the bootstrap intervals, then each split's confusion matrix
    and per-class values."""
    splits, results = list(evaluations), list(evaluations.values())
    ci = results[0]["ci"]
    keys = shown_metrics(results[0])
    rows = [("images", *[r["metrics"]["n"] for r in results])]
    rows += [(key, *[metric_text(key, r["metrics"].get(key)) for r in results]) for key in keys]
    rows += [(f"{key} {ci['level']:.0%} CI", *[interval_text(key, r["ci"].get(key)) for r in results])
             for key in keys if key in ci]
    caption = interval_caption({split: r["ci"] for split, r in evaluations.items()})
    mixed = mixed_evaluations(evaluations)  # said above the columns it is about
    parts = ([_note(mixed[0].upper() + mixed[1:] + ".")] if mixed else []) + [
        _table(("metric", *splits), rows, numeric=range(1, len(splits) + 1), caption=caption)]
    scaled = [split for split, r in evaluations.items() if temperature_applied(r.get("calibration"))]
    if scaled:
        parts.append(_note(f"ECE, NLL and Brier of {', '.join(scaled)} are after temperature scaling (before and "
                           "after: Calibration)."))
    positive = results[0].get("positive_class")
    if positive:
        parts.append(_note(f"The sensitivity, specificity, PPV and NPV are of {positive} (the finding); the AUC is "
                           "medmnist's, of class 1 (the same number for either class of two)."))
    for split, result in evaluations.items():
        parts.append(f"<h3>{_e(split)} split</h3>")
        confusion = run.figure_file("confusion", split)
        parts.append(_run_figure(run, confusion, f"Confusion matrix, {split} split"))
        per_class = result["metrics"].get("per_class") or []
        if per_class:
            columns = [c for c in per_class[0] if c != "class"]
            cells = [[f"{row[c]:.4f}" if isinstance(row[c], float) else ("n/a" if row[c] is None else row[c])
                      for c in columns] for row in per_class]
            parts.append(_table(columns, cells, numeric=range(1, len(columns)), caption=f"Per class, {split} split"))
    return "".join(parts)


def _calibration(run: Run, evaluations: dict[str, dict]) -> str:
    """Per split: the temperature and the calibration metrics before and after it (or how to
    fit one), and the reliability diagram (before and after side by side when calibrated)."""
    parts = []
    for split, result in evaluations.items():
        calibration = result.get("calibration")
        parts.append(f"<h3>{_e(split)} split</h3>")
        if calibration:
            fitted = (f"Temperature scaling fitted on {calibration['fitted_on']}: T = "
                      f"{temperature_text(calibration['temperature'])}"
                      + (f"; skipped (T = 1): {calibration['skipped']}" if calibration["skipped"] else ""))
            parts.append(f"<p>{_e(fitted)}</p>" + _table(
                ("metric", "before", "after"),
                [(key, metric_text(key, before), metric_text(key, calibration["after"][key]))
                 for key, before in calibration["before"].items()], numeric=[1, 2]))
            if isinstance(calibration["temperature"], list):  # multi-label: one per label
                parts.append(_table(("label", "temperature"),
                                    [(name, f"{t:.3f}") for name, t in zip(result["class_names"], calibration["temperature"])],
                                    numeric=[1], caption=f"The temperature of each label, {split} split"))
        elif split == "val":  # where evaluate fits the temperature: its numbers after it would flatter it
            test = ("the test split's section shows its calibration before and after it"
                    if (evaluations.get("test") or {}).get("calibration") else
                    f"'{run.evaluate_command('test', '--calibrate')}' fits it and shows the test split's "
                    "calibration before and after it")
            parts.append(_note(f"Not calibrated. The temperature is fitted on this split; {test}."))
        else:
            parts.append(_note(f"Not calibrated: '{run.evaluate_command(split, '--calibrate')}' fits a "
                               "temperature on val and shows the calibration before and after it."))
        figure = run.figure_file("reliability", split)
        parts.append(_run_figure(run, figure, f"Reliability diagram, {split} split"
                                 + (", before and after temperature scaling" if temperature_applied(calibration) else "")))
    return "".join(parts)


def _figures(run: Run, evaluations: dict[str, dict]) -> str:
    parts = []
    curves = run.figure_file("curves")
    parts.append("<h3>Training</h3>" + _run_figure(run, curves, "Training curves"))
    for split in evaluations:
        shown = [(run.figure_file(kind, split), text) for kind, text in FIGURE_CAPTIONS]
        parts.append(f"<h3>{_e(split)} split</h3>"
                     + "".join(_run_figure(run, path, f"{text}, {split} split") for path, text in shown))
    return "".join(parts)


def _explanations(run: Run) -> str:
    """Each explained method: how its samples were chosen, its faithfulness, its class grids."""
    parts = []
    for method in EXPLAIN_METHODS:
        if run.status(run.explain_stage(method)) != "completed":
            continue
        index = run.read_json(run.explain_index(method), f"re-run '{run.command('explain', '--method', method)}'")
        road, mass = index.get("faithfulness"), index.get("mean_box_mass")
        facts = [f"{len(index['samples'])} {index['split']} samples ({index.get('selection')})",
                 f"target {index['target']}", f"checkpoint {index['checkpoint']}"]
        facts += [f"layer {index['layer']}"] if index.get("layer") else []
        facts += [f"{road['metric']} {faithfulness_text(road, '±')}"] if road else []
        facts += [f"mean heat-map share in the evidence box {mass:.2f}"] if mass is not None else []
        grids = [(run.explain_dir(method) / file, f"{method}: true class {name}")
                 for name, file in index["grids"].items()]
        parts.append(f"<h3>{_e(method)}</h3><p>{_e('; '.join(facts))}</p><div class=\"grids\">"
                     + "".join(_run_figure(run, path, caption) for path, caption in grids) + "</div>")
    return "".join(parts) or _note(f"Not explained yet: '{run.command('explain')}' draws heat maps of where the "
                                   "model looks, with a grid per class.")


def _configuration(run: Run) -> str:
    """The run's options (best.pt's rule in words instead of the --monitor value it may not
    follow), model, preprocessing and environment."""
    options = {key: value for key, value in run.config.items() if key not in ("monitor", "select")}
    blocks = [("Training options", {**options, "best.pt": selection.describe(selection.rule(run.config), run.config.get("epochs"))}), ("Model", run.data.get("model") or {}),
              ("Preprocessing", run.data.get("preprocess") or {}), ("Environment", run.data.get("environment") or {})]
    return "".join(f"<h3>{_e(name)}</h3>" + _pairs(values.items()) for name, values in blocks)


# ---------------------------------------------------------------------------------------
# The comparison page
# ---------------------------------------------------------------------------------------


def write_comparison_page(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                          pair: Sequence[str] | None = None) -> Path:
    """Compare the runs under `paths` (`aggregate.aggregate`, test split, default metrics, paired
    tests of `pair` as `aggregate --pair`) and
    their stored explanation maps (`maps.compare`, its files in `out_dir/maps/`, where
    `aggregate --maps --out out_dir/maps` would put them), and write `out_dir/comparison.html`
    beside its chart (PAGE_CHART); returns the page's path."""
    result = aggregate.aggregate(paths, pair=pair)  # a bad --pair is refused before anything is replaced
    maps_files = [f"{MAPS_DIR}/{name}" for name in maps.OUTPUT_FILES]
    out = fileio.output_folder(out_dir, (COMPARISON_PAGE, PAGE_CHART, *maps_files))
    with fileio.together(out) as staging:  # the page, its chart and its maps replace the earlier ones together
        chart = aggregate.write_chart(staging / PAGE_CHART, result)
        try:
            agreement: dict | str = maps.compare([row["path"] for row in result.runs], staging / MAPS_DIR)
        except UsageError as exc:  # nothing to compare (fewer than two explanations, no common sample...)
            agreement = str(exc)
            console.info(f"the page has no comparison of explanation maps: {agreement}")
        fileio.write_text(staging / COMPARISON_PAGE, comparison_page(result, chart, agreement))
    earlier = [path for name in maps_files if isinstance(agreement, str) and (path := out / name).is_file()]
    for path in earlier:  # the replaced page's, which this one does not show
        path.unlink()
    if earlier:
        console.warn(f"removed the earlier comparison of explanation maps in {out / MAPS_DIR}: this page has none")
    return out / COMPARISON_PAGE


def comparison_page(result: aggregate.Comparison, chart: Path, agreement: dict | str) -> str:
    """The HTML of a comparison: `result`, its chart, and the maps' agreement (`maps.compare`'s
    summary, or why there is none)."""
    notes = sorted({note for row in result.runs if (note := datasets.provenance(Run.open(row["path"]).dataset))})
    title, header, rows = aggregate.display_rows(result)
    numeric = [i for i, name in enumerate(header) if name in result.metrics or name in ("epochs", "train time")]
    table = _table([aggregate.heading(name) for name in header], rows, numeric, caption=title)
    tested_on = [compare_stats.data_key(group) for group in result.groups]
    why_not = ("no two of its setups were tested on the same data file" if len(set(tested_on)) == len(tested_on) > 1
               else f"this page has {console.plural(len(result.groups), 'setup')}; choose two with "
                    "'medcli report --pair A B'")
    tests = (f"<h3>Paired tests</h3><pre>{_e(chr(10).join(compare_stats.paired_lines(result.paired)))}</pre>"
             if result.paired else _note(f"No paired tests: they compare two setups on the same images, and {why_not}."))
    setups = {path: group["group"] for group in result.groups for path in group["paths"]}  # ids need not be unique
    runs = _table(("run", "setup", "seed", "evaluation", "directory"),
                  [(r["run"], setups[r["path"]], r["seed"], r["evaluation"], r["path"]) for r in result.runs])
    if result.skipped:
        runs += "<h3>Not compared</h3>" + _table(("run", "reason"), [(s["run"], s["reason"]) for s in result.skipped])
    sections = [("comparison", "Comparison", table + tests),
                ("chart", "Chart", _figure(chart, f"Mean over seeds with the std as error bar, {result.split} split")),
                ("maps", "Explanation maps", _agreement(agreement)),
                ("runs", "Runs", runs)]
    datasets_shown = ", ".join(dict.fromkeys(f"{g['dataset']} {g['size']} px" for g in result.groups))
    return _page(f"Comparison of {console.plural(len(result.runs), 'run')}",
                 f"{console.plural(len(result.groups), 'setup')} on {datasets_shown}, "
                 f"{result.split} split", notes, sections, ", ".join(dict.fromkeys(str(Path(r["path"]).parent)
                                                                                   for r in result.runs)))


def _agreement(agreement: dict | str) -> str:
    if isinstance(agreement, str):
        return _note(f"No comparison of explanation maps: {agreement}")
    figure = next(Path(f) for f in agreement["files"] if f.endswith(".png"))

    def samples(counts: dict) -> str:  # the samples a mean is over, and those without an agreement
        undefined = counts.get("undefined", 0)
        return f"{counts['n']}" + (f" ({undefined} more with a constant map)" if undefined else "")

    pairs = [(p["a"], p["b"], maps.shown(p["spearman"]), maps.shown(p["top20_iou"]),
              samples(p) if "n" in p else agreement["samples"]) for p in agreement["pairs"]]
    per_class = [(f"{p['a']} vs {p['b']}", name, maps.shown(v["spearman"]), maps.shown(v["top20_iou"]), samples(v))
                 for p in agreement["pairs"] for name, v in p["per_class"].items()]
    return (_table(("A", "B", "Spearman", "top-20% IoU", "samples"), pairs, numeric=[2, 3, 4],
                   caption=maps.lines(agreement)[0])
            + _figure(figure, "The explained samples side by side, each map over its image")
            + "<h3>Per class</h3>" + _table(("pair", "class", "Spearman", "top-20% IoU", "samples"), per_class,
                                             numeric=[2, 3, 4]))


def report(paths: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None,
           pair: Sequence[str] | None = None) -> Path:
    """`medcli report`: one run without `out_dir` gets its own page; with `out_dir`, the runs
    under `paths` get a comparison page there (`pair` as `aggregate --pair`). Returns the
    page's path."""
    if pair and out_dir is None:
        raise UsageError("--pair chooses the setups a comparison page tests; give it with --out DIR")
    if out_dir is not None:
        return write_comparison_page(paths, out_dir, pair)
    if len(paths) != 1:
        raise UsageError("one RUN gets its own page; a comparison of several needs --out DIR (it gets "
                         f"DIR/{COMPARISON_PAGE})")
    return write_run_page(paths[0])
