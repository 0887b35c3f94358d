"""`medcli export`: a trained run as a file a colleague or a service can run without medcli.

ONNX through `torch.onnx.export` (the dynamo exporter, a dynamic batch axis, the opset
recorded), or TorchScript (`torch.jit.trace`) as the fallback format. Every export is checked
before it is kept: the exported model and PyTorch must give the same logits on a batch of the
run's test images (within `TOLERANCE`), else nothing is written. Beside the model go its
description (`bundle.describe`, read back by `medcli predict`) and a model card in Markdown.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from medcli import augment, bundle, console, datasets, fileio, metrics, tasks
from medcli.errors import MedcliError, UsageError
from medcli.run import Run

__all__ = ["TOLERANCE", "VERIFY_IMAGES", "export_run", "model_card"]

VERIFY_IMAGES = 32  # test images the export is checked on (a batch size other than the traced one)
TOLERANCE = 1e-4  # largest |exported - PyTorch| logit difference allowed, relative to max(1, largest |logit|)
TRACE_BATCH = 2


def export_run(
    run: str | os.PathLike,
    format: str = "onnx",
    checkpoint: str = "best",
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    root: str | os.PathLike | None = None,
) -> dict:
    """Export `run`'s `checkpoint`; returns {"model", "sidecar", "card", "verification"}
    (paths as strings). `out`: the model file (default `Run.export_file`); the description
    and card take its name with .json and .md. Existing files are refused unless `overwrite`."""
    import torch

    if format not in bundle.FORMATS:
        raise UsageError(f"unknown --format '{format}'; choose one of {', '.join(bundle.FORMATS)}")
    run = Run.open(run)
    card = bundle.describe(run, checkpoint)
    suffix = bundle.FORMATS[format]
    model_file = (Path(out).expanduser() if out is not None
                  else run.export_file(checkpoint, suffix, "" if format == "onnx" else format))
    if model_file.suffix.lower() != suffix:
        raise UsageError(f"--out {model_file}: a {format} model file ends with {suffix}")
    fileio.output_file(model_file)
    _check_exporter(format)
    files = [model_file, bundle.sidecar_path(model_file), model_file.with_suffix(".md")]
    other = _described(files[1])
    if other not in (None, model_file.name) and (model_file.parent / other).exists():  # even with --overwrite
        raise UsageError(f"{files[1]} describes {model_file.parent / other}, which needs it to be predicted with; "
                         f"give this {format} export another name (e.g. --out {model_file.with_stem(model_file.stem + '_' + format)})")
    existing = [str(p) for p in files if p.exists()]
    if existing and not overwrite:
        raise UsageError(f"{', '.join(existing)} exist; pass --overwrite to replace them, or choose another --out")
    model = run.load_model(checkpoint, "cpu").float()
    x, verified_on = _verification_batch(run, card, root)
    with run.stage("export") as st:
        with fileio.together(model_file.parent) as staging:  # the model, its description and card, or none
            staged = [staging / path.name for path in files]
            with fileio.atomic_path(staged[0]) as tmp:
                with torch.no_grad():
                    reference = model(x).numpy()
                details = _EXPORTERS[format](model, x[:TRACE_BATCH], Path(tmp))
                exported = _run_exported(format, Path(tmp), x)
                verification = _check(reference, exported, verified_on, format,
                                      tasks.for_kind(card["task"], card["class_names"]))
            description = card | {"export": {"format": format, "file": model_file.name, **details,
                                             "input": {"name": "images", "dtype": "float32",
                                                       "shape": ["batch", card["image"]["channels"],
                                                                 card["preprocess"]["input_size"],
                                                                 card["preprocess"]["input_size"]]},
                                             "output": {"name": "logits", "shape": ["batch", len(card["class_names"])]},
                                             "verification": verification}}
            fileio.write_json(staged[1], description)
            fileio.write_text(staged[2], model_card(description, bundle.test_metrics(run, checkpoint)))
        inside = [p for p in files if p.resolve().is_relative_to(run.run_dir.resolve())]
        st.add(*inside, save=False)
        st.summary[format] = {"checkpoint": checkpoint, "files": [str(p.resolve()) for p in files],
                              "max_abs_diff": verification["max_abs_diff"]}
    console.info(f"exported {run.run_id} ({checkpoint}.pt) as {format}: logits within "
                 f"{verification['max_abs_diff']:.2g} of PyTorch's on {verified_on}")
    return {"model": str(files[0].resolve()), "sidecar": str(files[1].resolve()), "card": str(files[2].resolve()),
            "verification": verification}


def _described(sidecar: Path) -> str | None:
    """The model file an existing description beside an export names (None: none readable)."""
    try:
        return json.loads(sidecar.read_text())["export"]["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_exporter(format: str) -> None:
    """Refuse up front, in one line, an ONNX export without the packages it writes and checks
    the file with (the `export` extra)."""
    import importlib.util

    if format == "onnx":
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"exporting to ONNX needs {', '.join(missing)}: pip install 'medcli[export]' "
                             "(or use --format torchscript)")


def _verification_batch(run: Run, card: dict, root):
    """The preprocessed float batch the export is traced and checked on: the first
    VERIFY_IMAGES test images, or seeded random images when the run's data is missing (said)."""
    import torch

    size, channels = card["image"]["size"], card["image"]["channels"]
    try:
        images = run.load_data(root, ["test"]).images["test"][:VERIFY_IMAGES]
        what = f"the first {len(images)} test images"
    except UsageError as exc:
        console.warn(f"checking the export on random images: {exc}")
        images = np.random.default_rng(0).integers(0, 256, (VERIFY_IMAGES, size, size, channels), dtype=np.uint8)
        what = f"{VERIFY_IMAGES} random images (the run's dataset is missing)"
    with torch.no_grad():
        return augment.preprocess(datasets.as_tensor(images), card["preprocess"]), what


def _onnx(model, example, path: Path) -> dict:
    import onnx
    import torch

    batch = torch.export.Dim("batch", min=1)
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), dynamo=True, input_names=["images"],
                              output_names=["logits"], dynamic_shapes=({0: batch},), external_data=False,
                              verbose=False)
    except Exception as exc:  # the exporter raises many kinds; all mean "this model does not export"
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            raise  # but a file that could not be written (a full disk): `atomic_path` says so
        raise MedcliError(f"ONNX export failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
                          "try --format torchscript") from None
    opset = next(entry.version for entry in onnx.load(str(path), load_external_data=False).opset_import
                 if entry.domain in ("", "ai.onnx"))
    return {"opset": int(opset), "onnx": onnx.__version__}


def _torchscript(model, example, path: Path) -> dict:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trace and save are deprecated for torch.export, which has no portable file
            traced = torch.jit.trace(model, example)
            buffer = io.BytesIO()
            torch.jit.save(traced, buffer)
    except Exception as exc:
        raise MedcliError(f"TorchScript export failed ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
    # written by Python: torch's own file writer ends the process (std::terminate) on a full disk
    path.write_bytes(buffer.getvalue())
    return {"torchscript": "torch.jit.trace"}


_EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript}


def _run_exported(format: str, path: Path, x) -> np.ndarray:
    """The exported file's logits for x, through the same loader `predict` uses."""
    import torch

    module = bundle.load_exported(format, path, "cpu")
    with torch.no_grad():
        return module(x).numpy()


def _check(reference: np.ndarray, exported: np.ndarray, verified_on: str, format: str, task: tasks.Task) -> dict:
    """The exported logits within TOLERANCE of PyTorch's, and whether the task's decisions
    (`task.predictions`) are the same."""
    diff = float(np.abs(reference - exported).max()) if reference.shape == exported.shape else float("inf")
    allowed = TOLERANCE * max(1.0, float(np.abs(reference).max()))
    if not diff <= allowed:
        raise MedcliError(f"the {format} export's logits differ from PyTorch's by {diff:.3g} on {verified_on} "
                          f"(allowed {allowed:.2g}); nothing was written"
                          + ("; try --format torchscript" if format == "onnx" else ""))
    return {"images": verified_on, "max_abs_diff": diff, "tolerance": allowed,
            "same_decisions": bool(np.array_equal(task.predictions(task.probabilities(reference)),
                                                  task.predictions(task.probabilities(exported))))}


def model_card(card: dict, test: dict | None) -> str:
    """The model card (Markdown): what the model is for and not for, its data and licence,
    its test metrics with their intervals, how to feed it, and its known limitations."""
    data, image, model, export = card["dataset"], card["image"], card["model"], card["export"]
    flag, size = data["flag"], image["size"]
    info = datasets.info(flag)
    outputs = "labels" if tasks.for_kind(card["task"], card["class_names"]).several_per_image else "classes"
    lines = [
        f"# Model card: {model['name']} on {flag} at {size} px ({card['run_id']}, {card['checkpoint']}.pt)",
        "",
        "## Intended use",
        f"Research and teaching: classifying {flag} images ({card['task']}, {len(card['class_names'])} "
        f"{outputs}) and comparing models. "
        "**Not a medical device**: not for diagnosis or any clinical decision.",
        "",
        "## Model",
        f"- Architecture: {model['name']} ({model.get('arch')}, {model.get('params', 0):,} parameters), trained from "
        f"{'pretrained weights' if model.get('pretrained') else 'scratch'} by medcli {card['versions']['medcli']} "
        f"(torch {card['versions']['torch']}); epoch {card['checkpoint_epoch']} ({card['checkpoint']}.pt).",
        f"- Training: {', '.join(f'{k} {v}' for k, v in card['training'].items() if v is not None)}.",
        f"- File: {export['file']} ({export['format']}"
        + (f", opset {export['opset']}" if "opset" in export else "") + "); input `images` float32 "
        f"{export['input']['shape']}, output `logits` {export['output']['shape']}.",
        f"- Checked at export: logits within {export['verification']['max_abs_diff']:.2g} of PyTorch's on "
        f"{export['verification']['images']} (allowed {export['verification']['tolerance']:.2g}).",
        f"- {outputs.capitalize()} (output: name): "
        + "; ".join(f"{i}: {name}" for i, name in enumerate(card["class_names"])) + ".",
        "",
        "## Data",
        (f"- Trained on **{data['provenance']}**, not the official {flag}, for which MedMNIST says: "
         if data.get("provenance") else f"- {flag} at {size} px: ") + info.get("description", "").strip(),
        f"- This run's file: md5 {data['md5']}"
        + (f"; **{data['provenance']}**" if data.get("provenance") else " (the official MedMNIST file)")
        + "; images per split: " + (", ".join(f"{split} {n:,}" for split, n in data["n_samples"].items())
                                     if isinstance(data.get("n_samples"), dict) else "not recorded") + ".",
        f"- Licence: {data['licence']}.",
        "",
        "## Test metrics",
        *_metric_lines(test),
        "",
        "## Preprocessing, in order",
        *(f"{k}. {step}" for k, step in enumerate(card["steps"], 1)),
        "",
        "`medcli predict` applies these steps to image files (PNG, JPEG, TIFF, BMP, DICOM, .npy/.npz) and reads "
        "this card's JSON twin for them.",
        "",
        "## Known limitations",
        f"- Trained on {size}-px images: detail finer than {size} px is lost before the model sees an image, and "
        "images unlike the training data (another scanner, stain, crop or modality) are out of distribution.",
        f"- One training run (seed {card['training'].get('seed')}); another seed gives somewhat different numbers.",
        _calibration_line(card),
        *([f"- Data: {data['provenance']}."] if data.get("provenance") else []),
        "- Not a medical device.",
        "",
    ]
    return "\n".join(lines)


def _calibration_line(card: dict) -> str:
    """The temperatures `predict --calibrated` applies: the one fitted without test-time views,
    and the one fitted with them (`--tta --calibrated`), where each exists."""
    fits = bundle.card_calibrations(card)
    if not fits:
        return "- Not calibrated: the probabilities may be over- or under-confident."
    said = [f"temperature {metrics.temperature_text(fit['temperature'])} fitted on the {fit['fitted_on']} split "
            + ("with test-time views (`medcli predict --tta --calibrated` applies it)" if fit["tta"] else
               "without test-time views (`medcli predict --calibrated` applies it)") for fit in fits]
    return "- Calibrated: " + "; ".join(said) + "."


def _metric_lines(test: dict | None) -> list[str]:
    if test is None:
        return ["Not evaluated with this checkpoint: run `medcli evaluate RUN`, then export again."]
    values, ci = test["metrics"], test.get("ci", {})
    rows = ["| metric | value | 95 % CI |", "|---|---|---|"]
    for key in ("accuracy", "auc", "balanced_accuracy", "f1_macro", "ece", "nll"):
        if key in values:
            rows.append(f"| {key} | {metrics.metric_text(key, values[key])} | "
                        f"{metrics.interval_text(key, ci[key]) if key in ci else '-'} |")
    views = test["tta"]["views"] if test["tta"]["enabled"] else []
    fit = test.get("calibration")
    how = (f"with test-time views ({', '.join(views)})" if len(views) > 1 else "without test-time views") + (
        f"; after temperature scaling, T = {metrics.temperature_text(fit['temperature'])} fitted on {fit['fitted_on']}"
        if fit else "")
    return [f"On the test split ({values['n']} images, {how}; intervals: {ci.get('method', 'bootstrap')} over the "
            "images):", "", *rows]
