"""Training configuration: `resolve_config` turns the options of `medcli train` into the
manifest's `config`, starting from the model family's record (`models.FAMILIES`: its training
defaults and `--reduced` preset).

A light module (no torch or numpy at import): the CLI builds `medcli train --help` from it.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from pathlib import Path
from dataclasses import dataclass, field, fields
from typing import Any

from medcli import augment, distributed, models, selection, tasks
from medcli.distributed import COLLECTIVE_TIMEOUT_S
from medcli.errors import UsageError
from medcli.names import MONITORS, OPTIMIZERS, sizes_text

__all__ = [
    "CHANNELS_LAST_ON_CPU", "DEVICE_DATA_SHARE", "FINE_TUNE_LR_DIVISOR", "MIN_DEFAULT_BATCH",
    "MIN_STEPS_PER_EPOCH", "NOT_EXPERIMENT", "TrainOptions", "WARMUP_MAX_SHARE", "defaults_help", "experiment",
    "fine_tune_lr", "SMALL_TRAIN", "SMALL_TRAIN_CROP", "fit_augment_to_data", "fit_batch_to_data", "fit_epochs_to_data",
    "fit_to_data", "fit_warmup_to_epochs", "reduced_help", "resolve_config", "run_name",
]

FINE_TUNE_LR_DIVISOR = 10
# Warm-up takes at most this share of the run, so the schedule decays within any epoch count
# (one epoch with a one-epoch warm-up used to end at the peak learning rate, untouched by decay).
WARMUP_MAX_SHARE = 0.2

# channels_last (NHWC) suits cuDNN and oneDNN convolutions: one ResNet-18 (28 px, max-pool
# kept, batch 128) training step took 3.7-4.0 s instead of 4.7-5.2 s on this 2-core CPU.
CHANNELS_LAST_ON_CPU = True
# A default batch is halved (down to MIN_DEFAULT_BATCH) until an epoch has this many optimizer
# steps: BreastMNIST's 546 training images give 4 steps per epoch at batch 128, 240 in a
# 60-epoch run. The learning rate follows the batch linearly (Goyal et al., 2017). Measured on
# 546 PBC images (scripts/bench_small.py, seed 0, 60 epochs): batch 128 / lr 0.1 35.3 % test,
# batch 32 / lr 0.025 79.5 %, batch 16 / lr 0.0125 86.5 % (MedMNIST v2's recipe: 78.9 %).
MIN_STEPS_PER_EPOCH = 32
MIN_DEFAULT_BATCH = 16
SEED_MAX = 2**32 - 1  # --seed's largest: 32 bits (numpy's SeedSequence and torch's 2^64 - 1 take it whole)
MIN_BATCH = 2  # images per step and process: BatchNorm's batch statistics and a MixUp partner need two
# Of the free GPU memory, the share the uint8 splits may take (else kept in pinned host memory).
DEVICE_DATA_SHARE = 0.5
# A training split below SMALL_TRAIN images gets a random-resized crop keeping SMALL_TRAIN_CROP to
# all of the image area unless --crop-scale is given (BreastMNIST's 546 images and RetinaMNIST's
# 1,080 were learnt by heart within a dozen epochs).
SMALL_TRAIN = 2000
SMALL_TRAIN_CROP = 0.8


_OPTIMIZER_NAMES = {"sgd": "SGD (Nesterov)", "adamw": "AdamW"}  # for help texts


def reduced_help() -> str:
    """The `--reduced` preset of every model family, in words, for `medcli train --help`."""

    def preset(rec: models.Family) -> str:
        text = ", ".join(f"{key}={value}" for key, value in {**rec.reduced, **rec.reduced_overrides}.items())
        if rec.reduced_alias:
            variant, shape = rec.reduced_alias
            text += f" (the built-in names become {variant} with {', '.join(f'{k}={v}' for k, v in shape.items())})"
        return text

    return (f"CPU-friendly preset. {_by_family(preset)}. A smaller training set trains more epochs, until the run "
            "makes min_steps optimizer steps.")


def defaults_help() -> str:
    base = models.record(models.DEFAULT_MODEL).defaults

    def recipe(rec: models.Family) -> str:
        values = rec.defaults
        text = (f"{_OPTIMIZER_NAMES[values['optimizer']]} lr {values['lr']} wd {values['weight_decay']} "
                f"{values['epochs']} epochs, {values['warmup_epochs']:g} warm-up")
        return (text + (f", MixUp {values['mixup_alpha']}" if values["mixup_alpha"] else "")
                + (f", {values['input_size']}-px input" if "input_size" in values else ""))

    return (f"Defaults: {_by_family(recipe)}; cosine per step (warm-up at most {WARMUP_MAX_SHARE:.0%} of the run), "
            f"label smoothing {base['label_smoothing']}, batch {base['batch_size']} (halved for small training sets until "
            f"an epoch has {MIN_STEPS_PER_EPOCH} steps, not below {MIN_DEFAULT_BATCH}, lr scaled with it); BatchNorm "
            f"re-estimated before each validation; lr / {FINE_TUNE_LR_DIVISOR} with pretrained weights; augmentation "
            f"per dataset (--flips), a crop of {SMALL_TRAIN_CROP:g}-1 of the area below {SMALL_TRAIN} training images; "
            f"{selection.rule_help()}.")


def _task_monitors() -> str:
    """The task types whose default --monitor is not accuracy, in words."""
    return "; ".join(f"{cls.default_monitor} for {'multi-label' if cls.several_per_image else cls.kind} sets"
                     for cls in tasks.TASKS.values() if cls.default_monitor != "acc")


def _input_sizes() -> str:
    """--input-size's default of every family, full and --reduced, in words."""
    def size(values: dict) -> str:
        return str(values["input_size"]) if "input_size" in values else "dataset size"

    return (f"{_by_kind(lambda rec: size(rec.defaults))}; "
            f"{_by_kind(lambda rec: size({**rec.defaults, **rec.reduced}))} with --reduced")


def _by_kind(describe) -> str:
    """`describe(record)` per kind of model ("sgd for CNNs, adamw for ViTs"), the text alone when
    all agree, `_by_family` when the records of one kind differ."""
    texts: dict[str, set[str]] = {}
    for rec in models.FAMILIES.values():
        texts.setdefault(rec.kind, set()).add(str(describe(rec)))
    if any(len(text) > 1 for text in texts.values()):
        return _by_family(describe)
    if len(set.union(*texts.values())) == 1:
        return next(iter(set.union(*texts.values())))
    return ", ".join(f"{text} for {models.KINDS[kind]}" for kind, (text,) in texts.items())


def _by_family(describe) -> str:
    """`describe(record)` of every family record; records described alike share one entry
    (the text alone when all are alike)."""
    labels: dict[str, list[str]] = {}
    for rec in models.FAMILIES.values():
        labels.setdefault(str(describe(rec)), []).append(rec.label)
    if len(labels) == 1:
        return next(iter(labels))
    return "; ".join(f"{', '.join(names)}: {text}" for text, names in labels.items())


# ---------------------------------------------------------------------------------------
# The options of `medcli train`, written once
# ---------------------------------------------------------------------------------------

def _option(default: Any, help: str, experiment: bool = True) -> Any:
    """A `TrainOptions` field: its default, its `--help` text, and whether it defines the
    experiment (runs that differ only in options that do not are repeats for `aggregate`)."""
    return field(default=default, metadata={"help": help, "experiment": experiment})


@dataclass(frozen=True)
class TrainOptions:
    """Every option of `medcli train` (None: the model family's default or preset). The CLI's
    signature mirrors it (a test checks names, defaults and help), `resolve_config` reads it,
    the manifest's `config` holds each resolved value, and `aggregate` groups runs by the
    options marked `experiment`."""

    dataset: str = _option("bloodmnist", "MedMNIST 2D dataset flag (any task type: multi-class, binary, ordinal, "
                                         "multi-label).")
    size: int = _option(28, f"Dataset image size: {sizes_text()}.")
    model: str = _option(models.DEFAULT_MODEL, f"{models.VALID_NAMES}.")
    reduced: bool = _option(False, reduced_help())
    epochs: int | None = _option(None, "Epochs (default per family/preset).")
    batch_size: int | None = _option(None, (
        f"Global batch size (default {models.record(models.DEFAULT_MODEL).defaults['batch_size']}, smaller for small "
        "training sets as above, rounded down to a multiple of --nproc; a given --batch-size keeps the lr, a "
        "warning names the scaled one)."))
    lr: float | None = _option(None, "Peak learning rate (default per family).")
    weight_decay: float | None = _option(None, "Weight decay (not on norms/biases).")
    optimizer: str | None = _option(None, f"Default: {_by_kind(lambda rec: rec.defaults['optimizer'])}.")
    warmup_epochs: float | None = _option(None, "Linear warm-up length in epochs.")
    label_smoothing: float | None = _option(None, (
        f"Label smoothing (default {_by_kind(lambda rec: rec.defaults['label_smoothing'])}; for ordinal grades it "
        "goes to the neighbouring grades)."))
    mixup_alpha: float | None = _option(None, "MixUp Beta(alpha, alpha); 0 = off.")
    flips: bool | None = _option(None, (
        "Random flips and 90-degree turns on (--flips) or off (--no-flips). Default: per dataset and axis, "
        f"{augment.flips_help()}."))
    rotate: float | None = _option(None, "Extra random rotation within +-DEGREES (default 0; 10 for chest X-rays "
                                         "and breast ultrasound).")
    crop_scale: float | None = _option(None, "Random-resized-crop of this share of the area up to all of it "
                                             f"(default {SMALL_TRAIN_CROP:g} below {SMALL_TRAIN} training images, "
                                             "else 1 = off).")
    jitter: float | None = _option(None, "Brightness/contrast jitter in [1-v, 1+v] (default 0.1).")
    patience: int | None = _option(None, "Early stopping after N epochs without improvement (default off).")
    monitor: str | None = _option(None, (
        "Validation metric for best.pt and early stopping, epoch by epoch on the trained weights (default acc; "
        f"{_task_monitors()}; below {selection.SMALL_VAL} validation images the EMA rule above unless given); "
        "ties go to the later epoch."))
    seed: int = _option(0, "Seed for weights, data order and augmentation.", experiment=False)
    deterministic: bool = _option(False, "Strict mode: deterministic kernels; reruns give bit-identical weights.", experiment=False)
    device: str = _option("auto", "auto, cpu, cuda or cuda:N.", experiment=False)
    amp: str | None = _option(None, "Mixed precision (default bf16 on CUDA, off on CPU).", experiment=False)
    compile: bool = _option(False, "torch.compile the model and the optimizer step (default off).", experiment=False)
    compile_mode: str | None = _option(None, "torch.compile mode (implies --compile); reduce-overhead replays "
                                             "each step as CUDA graphs.", experiment=False)
    pretrained: bool = _option(False, "Start from ImageNet weights (default off).")
    weights: str | None = _option(None, "Start from a local state dict / timm checkpoint.")
    input_size: int | None = _option(None, f"Model input size (default: {_input_sizes()}).")
    root: str | None = _option(None, "Data root (default $MEDCLI_DATA or ~/.medmnist).", experiment=False)
    runs_dir: str = _option("runs", "Where run directories are created.", experiment=False)
    sync_bn: bool = _option(False, (
        "Multi-GPU CNNs: BatchNorm statistics over the global batch (SyncBatchNorm), not each process's slice."))
    data_budget_gb: float | None = _option(None, (
        f"GiB of images kept on the training device (default {DEVICE_DATA_SHARE:.0%} of free GPU memory; "
        "unlimited on CPU); a larger split streams from pinned host memory."),
        experiment=False)
    collective_timeout: float | None = _option(None, (
        f"Seconds to wait for a lost process of a distributed job (default {COLLECTIVE_TIMEOUT_S:.0f})."),
        experiment=False)

    @classmethod
    def help(cls, name: str) -> str:
        return _FIELDS[name].metadata["help"]


_FIELDS = {f.name: f for f in fields(TrainOptions)}
# Config keys that do not define the experiment: those options, and channels_last (it follows --device).
NOT_EXPERIMENT = frozenset({name for name, f in _FIELDS.items() if not f.metadata["experiment"]} | {"channels_last"})


def experiment(config: dict) -> dict:
    """The part of a run's config that defines its experiment (runs that agree on it are
    repeats for `aggregate`): not the options in NOT_EXPERIMENT, nor the `*_source` records of
    where a value came from (the value is the setting: `--lr 0.1` equal to the preset's lr is
    the same experiment, and a run from before a source was recorded is still a repeat)."""
    chosen = {key: value for key, value in config.items() if key not in NOT_EXPERIMENT and not key.endswith("_source")}
    if isinstance(chosen.get("warmup_epochs"), (int, float)) and isinstance(chosen.get("epochs"), int):
        # the warm-up the schedule ran: older runs recorded the value asked for, newer ones the cap
        chosen["warmup_epochs"] = min(chosen["warmup_epochs"], warmup_cap(chosen["epochs"]))
    return chosen


def warmup_cap(epochs: int) -> float:
    """The longest warm-up of an `epochs`-epoch run: WARMUP_MAX_SHARE of it."""
    return round(WARMUP_MAX_SHARE * epochs, 6)  # 0.6, not 0.6000000000000001


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

def resolve_config(**given: Any) -> dict:
    """Every option of `TrainOptions` (keyword arguments; the rest keep their defaults)
    resolved to a value (None -> family default or preset), validated.

    The result is the manifest's `config`: a run can be repeated from it alone.
    """
    from medcli import datasets, inference

    o = TrainOptions(**given)
    flag = o.dataset.lower()
    meta = datasets.info(flag)
    monitor = o.monitor or tasks.TASKS[meta["task"]].default_monitor
    datasets.check_size(o.size)
    rec = models.record(o.model)
    if o.pretrained and o.weights:
        raise UsageError("--pretrained and --weights each choose the starting weights (ImageNet's, or a file's); "
                         "pass one of them")
    if o.reduced and o.pretrained and rec.reduced_alias and o.model in models.ALIASES:
        raise UsageError(f"--reduced makes {o.model} a smaller ViT ({rec.reduced_alias[0]}) that no pretrained weights "
                         f"fit; leave out --reduced (or --pretrained) to start from ImageNet weights")
    chosen = dict(rec.defaults)
    overrides: dict[str, Any] = {}
    name = o.model
    if o.reduced:
        chosen.update(rec.reduced)
        overrides.update(rec.reduced_overrides)
        if rec.reduced_alias and o.model in models.ALIASES:
            name, shape = rec.reduced_alias
            overrides.update(shape)
    recipe = ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "warmup_epochs", "label_smoothing",
              "mixup_alpha", "input_size")
    chosen.update({key: getattr(o, key) for key in recipe if getattr(o, key) is not None})
    lr_source = "--lr" if o.lr is not None else _source(o.reduced, "lr", rec)
    chosen.setdefault("input_size", o.size)
    _check_numbers(chosen, o.patience, monitor)
    if not 0 <= o.seed <= SEED_MAX:  # the CLI's range too, for a caller of the library
        raise UsageError(f"--seed must be 0 to {SEED_MAX} (got {o.seed})")
    dev = inference.resolve_device(o.device)
    if o.sync_bn and (dev.type != "cuda" or rec.kind != "cnn"):
        raise UsageError("--sync-bn needs CUDA GPUs and a CNN (SyncBatchNorm has no CPU kernel, and ViTs have no "
                         "BatchNorm); without it each process keeps its own BatchNorm statistics")
    return {
        "dataset": flag,
        "size": int(o.size),
        "model": o.model,
        "variant": name,
        "model_overrides": overrides,
        "reduced": bool(o.reduced),
        "epochs": int(chosen["epochs"]),
        "epochs_source": "--epochs" if o.epochs is not None else _source(o.reduced, "epochs", rec),
        # --reduced on a small training set: at least this many optimizer steps (`fit_epochs_to_data`)
        "min_steps": chosen.get("min_steps") if o.reduced and o.epochs is None else None,
        "batch_size": int(chosen["batch_size"]),
        "batch_source": "--batch-size" if o.batch_size is not None else _source(o.reduced, "batch_size", rec),
        "lr": float(chosen["lr"]),
        "lr_source": lr_source,
        "weight_decay": float(chosen["weight_decay"]),
        "optimizer": chosen["optimizer"].lower(),
        "momentum": 0.9,
        "warmup_epochs": float(chosen["warmup_epochs"]),
        "warmup_source": "--warmup-epochs" if o.warmup_epochs is not None else _source(o.reduced, "warmup_epochs", rec),
        "label_smoothing": float(chosen["label_smoothing"]),
        "mixup_alpha": float(chosen["mixup_alpha"]),
        "patience": int(o.patience) if o.patience else None,
        "monitor": monitor,
        # the best-checkpoint rule: a given --monitor's now, else `selection.choose` once the data is loaded
        "select": selection.given(monitor) if o.monitor else None,
        "task": meta["task"],
        "seed": int(o.seed),
        "deterministic": bool(o.deterministic),
        "device": str(dev),
        "amp": inference.resolve_amp(dev, o.amp),
        "compile": bool(o.compile or o.compile_mode),
        "compile_mode": (o.compile_mode or "default") if (o.compile or o.compile_mode) else None,
        "sync_bn": bool(o.sync_bn),
        "data_budget_gb": None if o.data_budget_gb is None else float(o.data_budget_gb),
        "collective_timeout": distributed.collective_timeout(o.collective_timeout),
        "channels_last": rec.channels_last and (dev.type == "cuda" or CHANNELS_LAST_ON_CPU),
        "pretrained": bool(o.pretrained),
        "weights": str(Path(o.weights).expanduser().resolve()) if o.weights else None,
        "input_size": int(chosen["input_size"]),
        "root": str(Path(o.root if o.root is not None else datasets.default_root()).expanduser().resolve()),
        "runs_dir": str(Path(o.runs_dir).expanduser().resolve()),
        "augment": augment.for_dataset(flag, flips=o.flips, rotate=o.rotate, crop_scale=o.crop_scale, jitter=o.jitter).to_dict(),
        "augment_source": augment.source(flag, flips=o.flips, rotate=o.rotate, crop_scale=o.crop_scale, jitter=o.jitter),
    }


def _source(reduced: bool, key: str, rec: models.Family) -> str:
    """Where a value the user did not give comes from: the --reduced preset or the family default."""
    return "reduced preset" if reduced and key in rec.reduced else f"{rec.kind} default"


def _check_numbers(chosen: dict, patience: int | None, monitor: str) -> None:
    checks = [
        (chosen["epochs"] > 0, f"--epochs must be at least 1 (got {chosen['epochs']})"),
        (chosen["batch_size"] >= MIN_BATCH, f"--batch-size must be at least {MIN_BATCH} (got {chosen['batch_size']}): "
                                             "BatchNorm and MixUp need two images a step"),
        (0 < chosen["lr"] < math.inf, f"--lr must be positive and finite (got {chosen['lr']})"),
        (0 <= chosen["weight_decay"] < math.inf, f"--weight-decay must be >= 0 and finite (got {chosen['weight_decay']})"),
        (0 <= chosen["warmup_epochs"] < math.inf, f"--warmup-epochs must be >= 0 and finite (got {chosen['warmup_epochs']})"),
        (0 <= chosen["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1) (got {chosen['label_smoothing']})"),
        (0 <= chosen["mixup_alpha"] < math.inf, f"--mixup-alpha must be >= 0 and finite (got {chosen['mixup_alpha']})"),
        (chosen["optimizer"].lower() in OPTIMIZERS, f"unknown --optimizer '{chosen['optimizer']}'; choose one of {', '.join(OPTIMIZERS)}"),
        (chosen["input_size"] >= 8, f"--input-size must be at least 8 px (got {chosen['input_size']})"),
        (patience is None or patience >= 0, f"--patience must be >= 0 (got {patience})"),
        (monitor in MONITORS, f"unknown --monitor '{monitor}'; choose one of {', '.join(MONITORS)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)


def run_name(config: dict) -> str:
    model = re.sub(r"[^A-Za-z0-9._-]+", "-", config["model"])
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}_{config['dataset']}{config['size']}_{model}"


def fine_tune_lr(config: dict, pretrained: bool) -> dict:
    """The config with the learning rate a start from loaded weights needs: the default divided
    by FINE_TUNE_LR_DIVISOR when weights really loaded (`pretrained` is the model spec's value,
    known only after the download or file load) and --lr was not given. A fallback to random
    weights keeps the from-scratch rate."""
    if not pretrained or config["lr_source"] == "--lr":
        return config
    return {**config, "lr": config["lr"] / FINE_TUNE_LR_DIVISOR,
            "lr_source": f"{config['lr_source']} / {FINE_TUNE_LR_DIVISOR} (pretrained weights loaded)"}


def fit_to_data(config: dict, n_train: int, processes: int = 1) -> dict:
    """The config a run on `n_train` training images over `processes` trains with (the
    manifest's): its batch, then its epochs, warm-up and augmentation fitted to the data."""
    config = fit_epochs_to_data(fit_batch_to_data(config, n_train, processes), n_train)
    return fit_augment_to_data(fit_warmup_to_epochs(config), n_train)


def fit_epochs_to_data(config: dict, n_train: int) -> dict:
    """The config with the epochs a --reduced run on a small training split needs: the preset's
    epochs, raised until the run makes at least the preset's `min_steps` optimizer steps (what
    its epochs make on BloodMNIST's 11,959 training images). A given --epochs is kept. Decided
    once the data is loaded and the batch fitted."""
    min_steps = config.get("min_steps")
    steps = max(1, n_train // config["batch_size"])
    if not min_steps or config["epochs"] * steps >= min_steps:
        return config
    epochs = -(-min_steps // steps)
    return {**config, "epochs": epochs,
            "epochs_source": f"{config['epochs_source']} {config['epochs']} -> {epochs}: at least {min_steps} steps "
                             f"({steps} per epoch on {n_train} training images)"}


def fit_warmup_to_epochs(config: dict) -> dict:
    """The config with the warm-up the schedule uses: at most WARMUP_MAX_SHARE of the run
    (`optim.warmup_steps` makes the same cap in steps); a given --warmup-epochs over it is capped
    with a warning. Decided once the epochs are."""
    most = warmup_cap(config["epochs"])
    if config["warmup_epochs"] <= most:
        return config
    reason = f"capped to {WARMUP_MAX_SHARE:.0%} of the {config['epochs']}-epoch run"
    source = f"{config['warmup_source']} {config['warmup_epochs']:g} -> {most:g}, {reason}"
    if config["warmup_source"] == "--warmup-epochs":
        _warn_capped(source)
    return {**config, "warmup_epochs": most, "warmup_source": source}


def _warn_capped(source: str) -> None:
    """One warning line for a given option the data or the run could not take as asked."""
    from medcli import console

    console.warn(f"{source} (the run's config records the value used)")


def fit_augment_to_data(config: dict, n_train: int) -> dict:
    """The config with the augmentation a small training split gets: a random-resized crop
    keeping SMALL_TRAIN_CROP to all of the area below SMALL_TRAIN images, unless --crop-scale
    was given. Decided once the data is loaded."""
    source = config.get("augment_source", "")
    if n_train >= SMALL_TRAIN or "--crop-scale" in source or config["augment"].get("crop_scale"):
        return config
    return {**config, "augment": {**config["augment"], "crop_scale": (SMALL_TRAIN_CROP, 1.0)},
            "augment_source": f"{source}; crop {SMALL_TRAIN_CROP:g}-1 of the area: {n_train} training images "
                              f"(fewer than {SMALL_TRAIN})"}


def _warn_unscaled_lr(config: dict) -> None:
    """One warning line when --batch-size differs from the batch the default learning rate was
    chosen for and --lr was not given: the rate is kept, not scaled (a run's config stays what
    was asked for; the linear rule's value is named)."""
    from medcli import console

    rec = models.record(config["model"])
    recipe = {**rec.defaults, **(rec.reduced if config["reduced"] else {})}["batch_size"]
    if config["lr_source"] != "--lr" and config["batch_size"] != recipe:
        console.warn(f"--batch-size {config['batch_size']} without --lr keeps lr {config['lr']:g} "
                     f"({config['lr_source']}, chosen for batch {recipe}); the linear rule would scale it to "
                     f"{config['lr'] * config['batch_size'] / recipe:g}")


def fit_batch_to_data(config: dict, n_train: int, processes: int = 1) -> dict:
    """The config with the batch (and, unless --lr was given, the learning rate) a small
    training split needs, split evenly over `processes`; a given --batch-size is kept (and
    checked by the training loop) unless the split is smaller (`_cap_batch`). Decided once
    the data is loaded."""
    given = config["batch_source"] == "--batch-size"
    fitted = _cap_batch(config if given else _default_batch(config, n_train, processes), n_train, processes)
    if given:
        _warn_unscaled_lr(fitted)
    return fitted


def _default_batch(config: dict, n_train: int, processes: int) -> dict:
    """A default batch halved for a small training split and split over `processes`, the
    learning rate scaled with it unless --lr was given (see MIN_STEPS_PER_EPOCH)."""
    batch = config["batch_size"]
    reasons = []
    while batch // 2 >= MIN_DEFAULT_BATCH and n_train // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    if batch != config["batch_size"]:
        reasons.append(f"halved: {n_train} training images (at least {MIN_STEPS_PER_EPOCH} steps per epoch)")
    if batch % processes:
        batch = max(processes, batch - batch % processes)
        reasons.append(f"a multiple of the {processes} processes")
    if not reasons:
        return config
    fitted = {**config, "batch_size": batch,
              "batch_source": f"{config['batch_source']} {config['batch_size']} -> {batch}, {'; '.join(reasons)}"}
    if config["lr_source"] != "--lr":
        fitted.update(lr=config["lr"] * batch / config["batch_size"],
                      lr_source=f"{config['lr_source']} x {batch}/{config['batch_size']} (scaled with the batch)")
    return fitted


def _cap_batch(config: dict, n_train: int, processes: int) -> dict:
    """The config with a batch over the training split capped to it (to a multiple of
    `processes`), the batch the training loop (`train.global_batch`) takes; the learning rate
    is kept. A given --batch-size is capped with a warning."""
    most = n_train - n_train % processes
    if config["batch_size"] <= most:
        return config
    source = f"{config['batch_source']} {config['batch_size']} -> {most}, capped to the {n_train:,} training images"
    if config["batch_source"] == "--batch-size":
        _warn_capped(source)
    return {**config, "batch_size": most, "batch_source": source}
