"""`medcli predict`: a trained run, or a model `export` wrote, applied to a user's own image
files with exactly the preprocessing the model was trained with.

Files are read in batches (`images.batches`: converted to the dataset's channels and image
size), then go through the same batched forward pass as `evaluate` (`inference.predict_logits`:
the run's input size and normalisation, the trained flips as test-time views with --tta), so
a PNG copy of a test image gets the probabilities `evaluate` wrote for it. A file that cannot
be read is one line naming it; the others are still predicted (none readable is an error).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import bundle, console, datasets, explainers, fileio, images, inference, tasks
from medcli.errors import UsageError
from medcli.names import file_names
from medcli.tables import PROB_PREFIX

__all__ = ["overlay_dir", "predict_files"]


def overlay_dir(out: Path, method: str) -> Path:
    """Where `--explain METHOD` writes its overlays: beside --out, named after it and the method."""
    return out.with_name(f"{out.stem}_{method}")


def predict_files(
    source: str | os.PathLike,
    paths: Sequence[str],
    out: str | os.PathLike | None = None,
    tta: bool = False,
    calibrated: bool = False,
    explain: str | None = None,
    checkpoint: str | None = None,
    batch_size: int = 256,
    device: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Predict every image in `paths` with the model at `source` (a run directory, or an
    exported .onnx / TorchScript .pt file with its sidecar).

    Returns {"table": a DataFrame (path, prediction, prob_<class>... [, overlay]), "failed":
    [{"path", "error"}], "out": the CSV written or None, "model": what predicted}. With `out`
    the CSV is written atomically (an existing file is refused unless `overwrite`); the
    caller prints the table otherwise. `checkpoint`: a run's (None: best); an exported file
    has its own. No image read from any of the files is a UsageError, and nothing is written.
    """
    import pandas as pd

    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1 (got {batch_size})")
    out = Path(out).expanduser() if out is not None else None
    if explain is not None:
        if explain not in explainers.METHODS:
            raise UsageError(f"unknown --explain '{explain}'; choose one of {', '.join(explainers.METHODS)}")
        exported = bundle.export_kind(source)
        if exported:
            raise UsageError(f"--explain needs the run directory: {Path(source).name} is an exported "
                             f"{exported} model, which the explainers cannot open")
        if out is None:
            raise UsageError("--explain writes one overlay per image beside the CSV: give --out FILE.csv")
    earlier = _earlier_results(out, overwrite, explain)
    files = _inputs(paths, out)
    dev = inference.resolve_device(device)
    opened = bundle.open_model(source, checkpoint, dev)
    if opened.kind == "onnx":
        dev = inference.resolve_device("cpu")  # ONNX Runtime runs here on the CPU
    card, task = opened.card, opened.task
    views = opened.views(tta)
    if tta and len(views) == 1:
        console.warn("--tta: this model was trained without flips or turns, so there is no test-time view to add")
        tta = False  # as `evaluate` records it: the image alone, the calibration fitted without views
    temperature = _temperature(opened, calibrated, tta)
    target = images.Target(size=card["image"]["size"], channels=card["image"]["channels"])
    names = list(task.names)

    rows, failed, overlays = [], [], []
    chosen = explainers.METHODS[explain] if explain else None
    explainer, caption = _open_explainer(chosen, opened, batch_size) if chosen else (None, None)
    with _staged(out, explain) as staging, (explainer if explainer is not None else nullcontext()) as active, \
            console.progress() as bar:
        row = bar.add_task("predict", total=None, unit="img")
        for batch_names, pixels, bad in images.batches(files, target, batch_size):
            for path, reason in bad:  # a warning: --skip-bad makes the command succeed; its end says the error
                console.warn(f"{path}: {reason}")
                failed.append({"path": path, "error": reason})
            if not len(batch_names):
                continue
            tensor = datasets.as_tensor(pixels)
            scores = inference.predict_logits(opened.model, tensor, card["preprocess"], batch_size=batch_size,
                                              device=dev, views=list(views.values()) if tta else None, task=task)
            probs = task.probabilities(scores.numpy().astype(np.float64), temperature)
            decisions = task.decision_names(probs)
            for k, name in enumerate(batch_names):
                rows.append({"path": name, "prediction": decisions[k],
                             **{f"{PROB_PREFIX}{label}": probs[k, j] for j, label in enumerate(names)}})
            if active is not None:
                overlays += _overlays(active, caption, opened, batch_names, pixels, tensor, probs, staging,
                                      len(rows), batch_size, dev)
            bar.advance(row, len(batch_names))
        if not rows:
            raise UsageError("the file could not be read (see above)" if len(files) == 1
                             else f"none of the {len(files)} files could be read (listed above)")
        table = pd.DataFrame(rows, columns=[*_CSV_FIRST, *(f"{PROB_PREFIX}{n}" for n in names)])
        if explain:
            table["overlay"] = _publish(overlays, earlier, overlay_dir(out, explain))
        written = _write(out, table) if out is not None else None
    console.info(f"{console.plural(len(rows), 'image')} predicted with {opened.kind} {opened.source}"
                 + (f"; {console.plural(len(failed), 'file')} failed" if failed else ""))
    return {"table": table, "failed": failed, "out": written,
            "model": {"source": str(opened.source), "kind": opened.kind, "checkpoint": card["checkpoint"],
                      "tta": list(views) if tta else ["identity"], "temperature": temperature}}


@contextmanager
def _staged(out: Path | None, explain: str | None):
    """A hidden folder inside the overlay folder (one file system: the moves are renames) where
    `--explain`'s new overlays wait until every image is predicted (`_publish`), removed on the
    way out, with the folders made for it when they stayed empty: a stop or a failure before
    then leaves the earlier CSV and the overlays it names whole, and nothing new. None without
    --explain."""
    if not explain:
        yield None
        return
    folder = overlay_dir(out, explain)
    made = [folder, *(parent for parent in folder.parents if not parent.exists())]
    made = [path for path in made if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for path in made:  # innermost first
            try:
                path.rmdir()
            except OSError:  # holds the new overlays (or anything else): kept
                break


def _publish(overlays: list[str], earlier: list[Path], folder: Path) -> list[str]:
    """The new overlays (drawn in a staging folder) moved into `folder`, then the `earlier` ones they did not
    replace removed; returns their paths there."""
    moved = []
    for drawn in overlays:
        os.replace(drawn, folder / Path(drawn).name)
        moved.append(folder / Path(drawn).name)
    for path in set(earlier) - set(moved):
        path.unlink()
    if earlier:
        console.info(f"--overwrite: {console.plural(len(earlier), 'earlier overlay')} in {folder} replaced")
    return [str(path) for path in moved]


def _earlier_results(out: Path | None, overwrite: bool, explain: str | None) -> list[Path]:
    """The earlier overlays --overwrite is to replace. Earlier results are never replaced
    silently: an existing --out (or overlay folder with files in it) needs --overwrite; the
    earlier overlays are removed (`_publish`) when the new ones take their place, once every
    image is predicted (a shorter list of images would otherwise leave some of them beside the
    new ones)."""
    if out is None:
        return []
    if out.is_dir():
        raise UsageError(f"--out is a directory; give the CSV file to write, e.g. {out / 'predictions.csv'}")
    fileio.output_file(out)
    folder = overlay_dir(out, explain) if explain else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder}, where --explain puts its overlays, is a file; move it or choose another --out")
    earlier = sorted(folder.glob("[0-9][0-9][0-9][0-9][0-9]_*.png")) if folder is not None and folder.is_dir() else []
    if out.exists() and overwrite and not _predictions_csv(out):  # an input image, or a file of someone else's
        raise UsageError(f"{out} exists and is not a predictions CSV (its first line is not 'path,prediction,...'); "
                         "--overwrite replaces only those: choose another --out")
    if not overwrite:
        if out.exists():
            raise UsageError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
        if earlier:
            raise UsageError(f"{folder} holds earlier overlays; pass --overwrite to replace them, or choose another --out")
    return earlier


def _predictions_csv(path: Path) -> bool:
    """Whether `path` starts as the CSV predict writes, or is empty (made ready for it, e.g. by mktemp)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(_CSV_START)) in (_CSV_START, b"")
    except OSError:
        return False


_CSV_FIRST = ("path", "prediction")  # the CSV's first columns (the class probabilities follow)
_CSV_START = ",".join((*_CSV_FIRST, "")).encode()


def _inputs(paths: Sequence[str], out: Path | None) -> list[Path]:
    """The files to predict (`images.expand`), without this command's own earlier results: an
    --out inside an input folder, and its overlay folders."""
    files = images.expand(paths)
    if out is None:
        return files
    own = [out.resolve(), *(overlay_dir(out, method).resolve() for method in explainers.METHODS)]
    kept = [path for path in files if not any(path.resolve() == mine or path.resolve().is_relative_to(mine) for mine in own)]
    if len(kept) < len(files):
        console.info(f"left out {console.plural(len(files) - len(kept), 'file')} of earlier results (--out {out} and "
                     "its overlays) found among the inputs")
    if not kept:
        raise UsageError("the inputs hold only this command's earlier results (--out and its overlays); give the images")
    return kept


def _temperature(opened: bundle.Opened, calibrated: bool, tta: bool):
    """The temperature --calibrated applies (1 when not asked for); a model never calibrated is
    refused, naming the command that calibrates it (uncalibrated numbers asked for as calibrated
    would pass unnoticed under --quiet)."""
    if not calibrated:
        return 1.0
    card = opened.card
    fit = bundle.calibration(card, tta)
    if fit is None:
        checkpoint = card["checkpoint"]
        flags = ["--calibrate", *(["--tta"] if tta else [])]
        how = (f"run '{opened.run.evaluate_command('test', *flags, checkpoint=checkpoint)}'" if opened.run is not None
               else  # an export's description was fixed when it was written
               f"calibrate its run {card['run_id']} ('medcli evaluate RUN {' '.join(flags)}"
               f"{'' if checkpoint == 'best' else ' --checkpoint ' + checkpoint}'), then export it again with --overwrite")
        raise UsageError(f"--calibrated: {opened.source.name} ({card['run_id']}, {card['checkpoint']}.pt) has no "
                         f"calibrated evaluation: {how}, or drop --calibrated")
    if fit["tta"] != tta:
        console.warn(f"--calibrated: the temperature was fitted {'with' if fit['tta'] else 'without'} test-time views "
                     f"and this prediction is {'with' if tta else 'without'} them; it may fit less well")
    return fit["temperature"]


def _open_explainer(method, opened: bundle.Opened, batch_size: int):
    """The explainer (with explain's defaults) and the caption its figures carry (method · layer)."""
    spec = opened.card["model"]
    method.check_model(spec, opened.card["run_id"], "--explain")
    layer = explainers.resolve_layer(opened.model, spec, None) if method.uses_layer else None
    options = {**explainers.DEFAULT_OPTIONS, "batch_size": batch_size}
    return method.open(opened.model, spec, layer, options), f"{method.name}{f' · {layer}' if layer else ''}"


def _overlays(active, caption: str, opened: bundle.Opened, batch_names, pixels, tensor, probs, folder: Path,
              done: int, batch_size: int, dev) -> list[str]:
    """One figure per image (image | map | overlay, as `explain` draws them) for the class
    each image is explained for (`Task.explained_class`), into `folder`; returns the files' paths."""
    from medcli import reports

    task = opened.task
    classes = task.explained_class(probs)
    decided = task.decided(probs, classes)
    maps, _ = explainers.heatmaps(active, tensor, opened.card["preprocess"], classes, batch_size=batch_size, device=dev)
    flat = explainers.constant(maps)
    first = done - len(batch_names)
    written = []
    for k, name in enumerate(batch_names):
        stem = file_names([Path(re.sub(r"\[(frame )?\d+\]$", "", name)).stem])[0]  # not a frame's "[i]"
        path = folder / f"{first + k:05d}_{stem}.png"
        title = (f"{Path(name).name} | {tasks.explained_text(task.names[classes[k]], probs[k, classes[k]], decided[k])}"
                 f" | {caption}" + (f" | {explainers.CONSTANT_NOTE}" if flat[k] else ""))
        reports.save_sample_figure(path, pixels[k], maps[k], title, note=opened.card["dataset"].get("provenance"))
        written.append(str(path))
    return written


def _write(out: Path, table) -> Path:
    with fileio.atomic_path(out) as tmp:
        table.to_csv(tmp, index=False)
    return out
