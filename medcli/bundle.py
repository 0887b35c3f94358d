"""A trained model with everything needed to use it outside its run: its description.

`describe(run, checkpoint)` is the one description of a trained model: class names, task
type, the image size and channels of its dataset, the preprocessing in order, the training
flips (test-time views), the temperature of a calibrated evaluation, the versions and the
dataset record. `export` writes it beside an ONNX or TorchScript file (the sidecar,
`sidecar_path(model_file)`), and `predict` reads it back; `predict` on a run directory builds
the same description in memory, so a run and its export predict through one code path
(`open_model`).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcli import augment, datasets, selection, tasks
from medcli.errors import UsageError
from medcli.names import EXPORT_FORMATS
from medcli.run import Run

__all__ = ["FORMAT", "FORMATS", "Opened", "calibration", "calibrations", "card_calibrations", "describe", "export_kind", "load_exported", "open_model", "preprocessing_steps",
           "sidecar_path", "test_metrics"]

FORMAT, VERSION = "medcli-model", 1
FORMATS = dict(zip(EXPORT_FORMATS, (".onnx", ".pt")))  # export format -> file suffix
_CARD_KEYS = ("run_id", "checkpoint", "task", "class_names", "image", "preprocess", "augment", "model", "dataset",
              "steps")  # what predict reads from a sidecar
_CARD_INNER_KEYS = {"image": ("size", "channels"), "preprocess": ("input_size", "mean", "std", "interpolation")}
RESAMPLING = "bicubic interpolation (PIL), as MedMNIST made its images: a centre crop, then a resize"


def sidecar_path(model_file: str | os.PathLike) -> Path:
    """The description beside an exported model: the model file with `.json` for its suffix."""
    return Path(model_file).with_suffix(".json")


def describe(run: Run, checkpoint: str) -> dict:
    """The description of `run`'s `checkpoint` (see the module docstring); JSON-ready."""
    import torch

    import medcli

    record, config = run.dataset, run.config
    task = datasets.task(record["flag"])
    summary = run.require_trained().get("summary", {})
    card = {
        "format": FORMAT,
        "version": VERSION,
        "run_id": run.run_id,
        "checkpoint": checkpoint,
        "checkpoint_epoch": summary.get("best_epoch" if checkpoint == "best" else "epochs_run"),
        "task": task.kind,
        "class_names": list(task.names),
        "image": {"size": int(record["size"]), "channels": int(run.spec["in_chans"])},
        "preprocess": run.data["preprocess"],
        "augment": config.get("augment", {}),
        "calibrations": calibrations(run, checkpoint),
        "model": run.spec,
        "training": {key: config.get(key) for key in ("epochs", "batch_size", "lr", "optimizer", "weight_decay",
                                                      "label_smoothing", "mixup_alpha", "seed")}
                    | {f"{checkpoint}.pt": selection.describe(selection.rule(config), config.get("epochs")) if checkpoint == "best"
                       else "the weights of the last epoch"},
        "dataset": {key: record.get(key) for key in ("flag", "size", "md5", "official", "synthetic", "sample",
                                                     "source", "n_samples")}
                   | {"provenance": datasets.provenance(record), "licence": _licence(record)},
        "versions": {"medcli": medcli.__version__, "torch": torch.__version__},
    }
    card["calibration"] = calibration(card)  # the newest
    card["steps"] = preprocessing_steps(card)
    return card


def preprocessing_steps(card: dict) -> list[str]:
    """What happens to an image file before the model sees it, in order (for people: the
    sidecar and the model card list them)."""
    image, prep = card["image"], card["preprocess"]
    channels = "one channel (RGB converted with ITU-R 601-2 luma)" if image["channels"] == 1 else \
        "three channels in R, G, B order (grayscale repeated, alpha dropped)"
    task = tasks.for_kind(card["task"], card["class_names"])
    return [
        f"read as 8-bit with {channels}",
        f"centre-cropped to a square and resized to {image['size']} x {image['size']} px (the dataset's image size) "
        f"with {RESAMPLING}",
        "scaled to [0, 1] (divided by 255)",
        f"resized to {prep['input_size']} x {prep['input_size']} px ({prep['interpolation']}, antialiased when "
        "downscaling)" if prep["input_size"] != image["size"] else "kept at that size (the model's input size)",
        f"normalised per channel: (x - mean) / std, mean {prep['mean']}, std {prep['std']}",
        f"the model's scores (logits) turned into probabilities by {task.probability_rule}"
        + (" (logits divided by the temperature when calibrated)" if card.get("calibration") else ""),
        f"decided: {task.decision_rule()}",
    ]


def _licence(record: dict) -> str:
    kind = datasets.provenance_kind(record)
    if kind == "synthetic":
        return "synthetic data generated by medcli (no licence applies)"
    if kind == "sample":
        return "CC BY 4.0 (images from Acevedo et al., Data in Brief 30, 2020; Mendeley Data snkd93bnjr)"
    licence = datasets.info(record["flag"]).get("license", "see medmnist.com")
    return licence if kind is None else f"that of its source (MedMNIST's {record['flag']} is {licence})"


def _evaluations(run: Run, checkpoint: str):
    """The metrics JSON of every split evaluated with `checkpoint` (of the completed evaluate
    stage, checked against its recorded hash), by split."""
    for split in run.evaluated_splits():
        result = run.read_json(run.metrics_file(split), f"redo it with '{run.evaluate_command(split)}'")
        if result.get("checkpoint") == checkpoint:
            yield split, result


def calibrations(run: Run, checkpoint: str) -> list[dict]:
    """The temperatures calibrated evaluations of `checkpoint` fitted (on val), newest first
    (by their metrics files), each with whether it was fitted on test-time views: one per TTA
    setting, so a prediction can apply the temperature fitted the way it predicts. Each split
    keeps its latest evaluation only: to hold both settings, evaluate two splits (or the same
    split again with the setting predictions will use) with --calibrate."""
    found = sorted(((run.metrics_file(split).stat().st_mtime_ns, result) for split, result in _evaluations(run, checkpoint)
                    if result.get("calibration")), key=lambda item: item[0], reverse=True)
    fits: dict[bool, dict] = {}
    for _, result in found:
        fit = result["calibration"]
        fits.setdefault(result["tta"]["enabled"], {"temperature": fit["temperature"], "fitted_on": fit["fitted_on"],
                                                   "skipped": fit["skipped"], "tta": result["tta"]["enabled"]})
    return list(fits.values())


def card_calibrations(card: dict) -> list[dict]:
    """The calibrations a description holds, newest first (one from before `calibrations`
    holds at most its single `calibration`)."""
    return card.get("calibrations") or ([card["calibration"]] if card.get("calibration") else [])


def calibration(card: dict, tta: bool | None = None) -> dict | None:
    """The calibration a description holds for predictions with (`tta`) or without test-time
    views: the one fitted that way, else the newest (None: the model was never calibrated)."""
    fits = card_calibrations(card)
    return next((fit for fit in fits if fit["tta"] == tta), fits[0] if fits else None)


def test_metrics(run: Run, checkpoint: str) -> dict | None:
    """The test split's metrics JSON for `checkpoint` (None when not evaluated)."""
    return dict(_evaluations(run, checkpoint)).get("test")


@dataclass
class Opened:
    """A model ready to predict: `model` maps a preprocessed float batch to scores (a
    PyTorch module, or a wrapped ONNX Runtime session or TorchScript module), `card` is its
    description, `kind` "run", "onnx" or "torchscript", `run` the run it came from (None for
    an exported file)."""

    model: Any
    card: dict
    kind: str
    source: Path
    run: Run | None = None

    @property
    def task(self) -> tasks.Task:
        return tasks.for_kind(self.card["task"], self.card["class_names"])

    def views(self, tta: bool) -> dict:
        """The test-time views by name (`augment.test_views`), or only the identity."""
        views = augment.test_views(augment.Augment.from_dict(self.card["augment"]))
        return views if tta else {"identity": views["identity"]}


def export_kind(path: str | os.PathLike) -> str | None:
    """The format of an exported model file at `path` ("onnx", "torchscript"), None for anything
    else (a run directory or its manifest)."""
    path = Path(path).expanduser()
    return next((name for name, suffix in FORMATS.items() if path.suffix.lower() == suffix and path.is_file()), None)


def open_model(source: str | os.PathLike, checkpoint: str | None = None, device="cpu") -> Opened:
    """A run directory (or its manifest), an exported `.onnx` file or a TorchScript `.pt`
    file with its sidecar, opened for prediction on `device` (ONNX Runtime runs on the CPU).
    `checkpoint`: a run's (None: best); an exported file holds one, and another is refused."""
    path = Path(source).expanduser()
    kind = export_kind(path)
    if kind is None and path.suffix.lower() in FORMATS.values() and not path.exists():
        raise UsageError(f"{path} does not exist; pass a model file 'medcli export' wrote, or a run directory")
    if kind is None:
        run = Run.open(path)
        checkpoint = checkpoint or "best"
        return Opened(run.load_model(checkpoint, device), describe(run, checkpoint), "run", run.run_dir, run)
    card_path = sidecar_path(path)
    if not card_path.is_file():
        raise UsageError(f"{path} has no description beside it ({card_path.name}); export the model with "
                         "'medcli export RUN', which writes both")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {card_path} ({' '.join(str(exc).split())}); export the model again") from None
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        raise UsageError(f"{card_path} is not a medcli model description; export the model with 'medcli export RUN'")
    missing = [key for key in _CARD_KEYS if key not in card]
    missing += [f"{key} (as a mapping)" for key in _CARD_INNER_KEYS if key in card and not isinstance(card[key], dict)]
    missing += [f"{key}.{inner}" for key, inner_keys in _CARD_INNER_KEYS.items()
                if isinstance(card.get(key), dict) for inner in inner_keys if inner not in card[key]]
    missing += [] if isinstance(card.get("class_names", []), list) else ["class_names (as a list)"]
    missing += [f"calibrations[{k}]" for k, fit in enumerate(card.get("calibrations") or [])
                if not (isinstance(fit, dict) and {"temperature", "tta", "fitted_on"} <= fit.keys())]
    if card.get("version") != VERSION or missing:
        what = f"lacks {', '.join(missing)}" if missing else f"is version {card.get('version')}, not {VERSION}"
        raise UsageError(f"{card_path} {what}: it is incomplete or from another medcli; export the model again "
                         "with 'medcli export RUN'")
    if checkpoint is not None and checkpoint != card.get("checkpoint"):
        raise UsageError(f"{path.name} was exported from the {card.get('checkpoint')} checkpoint; --checkpoint applies "
                         f"to run directories (export the {checkpoint} one with 'medcli export RUN --checkpoint "
                         f"{checkpoint}')")
    model = load_exported(kind, path, device)
    _check_matches(model, card, path, card_path, device)
    return Opened(model, card, kind, path)


def _check_matches(model, card: dict, path: Path, card_path: Path, device) -> None:
    """One blank image through an exported model: refused in one line unless it takes the
    description's input and gives one score per class (a description of another export, copied
    beside it, ended in the runtime's own error)."""
    import torch

    shape = (1, card["image"]["channels"], card["preprocess"]["input_size"], card["preprocess"]["input_size"])
    try:
        with torch.no_grad():
            scores = model(torch.zeros(shape, device=device))
        fits = tuple(scores.shape) == (1, len(card["class_names"]))
        problem = f"it gives {tuple(scores.shape)[1:]} scores for {len(card['class_names'])} classes"
    except Exception as exc:  # the runtimes raise their own types for an input of the wrong shape
        fits, problem = False, f"it does not take a {shape[1:]} input ({type(exc).__name__})"
    if not fits:
        raise UsageError(f"{path.name} does not match its description {card_path.name}: {problem}; keep each "
                         "export's files together, or export the model again")


def load_exported(kind: str, path: Path, device="cpu"):
    """An exported model file as a torch module (float batch in, scores out): ONNX through an
    ONNX Runtime session on the CPU, TorchScript through `torch.jit.load`."""
    return _onnx_module(path) if kind == "onnx" else _torchscript_module(path, device)


def _onnx_module(path: Path):
    """An ONNX Runtime session (CPU) wrapped as a torch module: float batch in, scores out."""
    import torch

    try:
        import onnxruntime
    except ImportError:
        raise UsageError("running an ONNX model needs onnxruntime: pip install 'medcli[export]'") from None
    try:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for damaged files
        raise UsageError(f"{path} is not a readable ONNX model ({' '.join(str(exc).split())[:200]}); export it again") from None

    class OnnxModel(torch.nn.Module):
        def forward(self, x):
            scores = session.run(None, {session.get_inputs()[0].name: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(scores).to(x.device)

    return OnnxModel()


def _torchscript_module(path: Path, device):
    import torch

    try:
        with warnings.catch_warnings():  # torch.jit.load is deprecated for torch.export, which has no portable file
            warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
            return torch.jit.load(str(path), map_location=device).eval()
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"{path} is not a readable TorchScript model ({' '.join(str(exc).split())[:200]}); "
                         "export it again") from None
