"""The optimizer, the learning-rate schedule and the determinism of a training run.

SGD with Nesterov momentum or AdamW (timm's parameter groups: no weight decay on biases,
norms and a model's own `no_weight_decay()` names), a linear warm-up then cosine decay stepped
after every optimizer step, and strict mode (`--deterministic`). torch is imported inside
functions.

The learning rate lives in a device tensor (`place_lr`) with `--compile` and on CUDA: the
schedule fills it in place before every step, so a compiled or graph-captured step reads the
current value from device memory. A Python float is a constant of a captured step (a CUDA-graph
replay keeps the rate it was captured with, silently; torch.compile guards on it and
recompiles when it changes). torch's fused SGD and AdamW (CUDA), the single-tensor kernels
(CPU) and the compiled step all accept the tensor; the host knows the value from the schedule
itself (`current_lr`), never by reading the device. `capturable` stays off: fused kernels
keep their step counts on the device anyway, torch.compile sets it itself on CUDA, and only a
hand-made CUDA-graph capture of Adam(W) must set it on the parameter groups (torch checks).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager, nullcontext
from typing import Iterator

from medcli.config import WARMUP_MAX_SHARE

__all__ = ["compiled_step", "current_lr", "determinism", "determinism_record", "lr_factor", "lr_on_device",
           "make_optimizer", "make_scheduler", "place_lr", "warmup_steps"]


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up from 1/warmup to 1 over `warmup_steps`, then cosine decay to 0.

    `step` counts optimizer steps from 0; the factor multiplies the base learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, config: dict, device):
    """SGD (Nesterov) or AdamW; timm's parameter groups: no weight decay on biases, norms and the
    model's own `no_weight_decay()` names (ViT tokens and position embeddings)."""
    import torch
    from timm.optim import param_groups_weight_decay

    skip = getattr(model, "no_weight_decay", lambda: set())()
    groups = param_groups_weight_decay(model, config["weight_decay"], no_weight_decay_list=skip)
    fused = {"fused": True} if device.type == "cuda" else {}
    if config["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=config["lr"], momentum=config["momentum"], nesterov=True, **fused)
    return torch.optim.AdamW(groups, lr=config["lr"], **fused)


def warmup_steps(config: dict, steps_per_epoch: int) -> int:
    """--warmup-epochs in steps, capped at WARMUP_MAX_SHARE of the run: the recorded (capped)
    warm-up times the steps per epoch, rounded, as the cap is (it rounded down)."""
    total = config["epochs"] * steps_per_epoch
    return min(round(config["warmup_epochs"] * steps_per_epoch), round(WARMUP_MAX_SHARE * total))


def make_scheduler(optimizer, config: dict, steps_per_epoch: int):
    """Warm-up + cosine, stepped after every optimizer step (the seeds' cosine never stepped)."""
    from functools import partial

    import torch

    total = config["epochs"] * steps_per_epoch
    warmup = warmup_steps(config, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total_steps=total, warmup_steps=warmup))


def current_lr(scheduler) -> float:
    """The learning rate of the next optimizer step, as the host computes it (the schedule's
    own arithmetic: equal to the float the optimizer would hold), without reading the device."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)


def lr_on_device(config: dict, device) -> bool:
    """Whether the learning rate is a device tensor: with --compile and on CUDA. Elsewhere it
    stays a Python float, as before (the CPU's eager kernels read either the same way)."""
    return bool(config.get("compile")) or device.type == "cuda"


def place_lr(optimizer, config: dict, device) -> None:
    """Each parameter group's learning rate as a float32 0-d tensor on `device` (`lr_on_device`)
    or a Python float: call it after the schedule is built (its base rates stay floats, so it
    computes on the host and fills the tensor in place) and after a checkpoint is restored
    (last.pt holds either kind). float32 is what the fused kernels read; an SGD step is
    bit-identical to the float's, an AdamW step equal within float32 rounding."""
    import torch

    tensor = lr_on_device(config, device)
    for group in optimizer.param_groups:
        value = group["lr"]
        if tensor:
            value = value.detach().reshape(()) if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            group["lr"] = value.to(device=device, dtype=torch.float32, copy=True)
        elif isinstance(value, torch.Tensor):
            group["lr"] = float(value)  # once, on resume (a checkpoint's host copy)


def compiled_step(optimizer, config: dict, scaler):
    """With --compile, the optimizer step compiled by torch.compile (its lr a graph input: see
    `place_lr`), or None where the step stays eager: fused optimizers (CUDA: dynamo does not
    trace into fused kernels, which already update every tensor in one launch and read the lr
    tensor themselves) and fp16 loss scaling (the scaler reads the found-inf flag on the host)."""
    import torch

    if not config.get("compile") or scaler.is_enabled() or optimizer.defaults.get("fused"):
        return None

    def step() -> None:
        optimizer.step()

    return torch.compile(step)


@contextmanager
def determinism(config: dict, device) -> Iterator[None]:
    """Seed torch; in strict mode force deterministic kernels (restored afterwards).

    Strict mode: `torch.use_deterministic_algorithms(True)` (an op without a deterministic
    kernel raises), cuBLAS workspace config, cuDNN benchmark off; ops medcli knows to lack a
    deterministic CUDA backward are replaced in the model (`models.make_deterministic`).
    With --compile, strict mode also sets inductor's deterministic mode (no on-device
    benchmarking to choose kernels); inductor itself follows `use_deterministic_algorithms`
    (deterministic scatter and index_put fallbacks, no split reductions). A compiled run
    equals an uncompiled one only within rounding (fused kernels order the arithmetic
    differently).
    Otherwise cuDNN benchmarks convolutions on CUDA (fastest, not bit-exact; recorded by
    `determinism_record`): each input shape is autotuned once, and training keeps their
    number small (full validation batches, one BatchNorm re-estimation batch size).
    """
    import torch

    torch.manual_seed(config["seed"])
    previous = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)
    if config["deterministic"]:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(config["deterministic"])
    torch.backends.cudnn.benchmark = device.type == "cuda" and not config["deterministic"]
    inductor = nullcontext()
    if config["deterministic"] and config.get("compile"):
        import torch._inductor.config

        inductor = torch._inductor.config.patch(deterministic=True)
    try:
        with inductor:
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.backends.cudnn.benchmark = previous[1]


def determinism_record(config: dict, replaced: list[str]) -> dict:
    """What strict mode did, for the manifest's environment (and whether cuDNN benchmarks)."""
    if not config["deterministic"]:
        return {"strict": False, "cudnn_benchmark": str(config["device"]).startswith("cuda")}
    return {"strict": True, "deterministic_algorithms": True, "warn_only": False, "cudnn_benchmark": False,
            "replaced": replaced, **({"inductor_deterministic": True} if config.get("compile") else {})}
