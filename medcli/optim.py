"""The optimizer, the learning-rate schedule and the determinism of a training run.

SGD with Nesterov momentum or AdamW (timm's parameter groups: no weight decay on biases,
norms and a model's own `no_weight_decay()` names), a linear warm-up then cosine decay stepped
after every optimizer step, and strict mode (`--deterministic`). torch is imported inside
functions.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

from medcli.config import WARMUP_MAX_SHARE

__all__ = ["determinism", "determinism_record", "lr_factor", "make_optimizer", "make_scheduler", "warmup_steps"]


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
    """--warmup-epochs in steps, capped at WARMUP_MAX_SHARE of the run."""
    total = config["epochs"] * steps_per_epoch
    return min(round(config["warmup_epochs"] * steps_per_epoch), int(WARMUP_MAX_SHARE * total))


def make_scheduler(optimizer, config: dict, steps_per_epoch: int):
    """Warm-up + cosine, stepped after every optimizer step (the seeds' cosine never stepped)."""
    from functools import partial

    import torch

    total = config["epochs"] * steps_per_epoch
    warmup = warmup_steps(config, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, total_steps=total, warmup_steps=warmup))


@contextmanager
def determinism(config: dict, device) -> Iterator[None]:
    """Seed torch; in strict mode force deterministic kernels (restored afterwards).

    Strict mode: `torch.use_deterministic_algorithms(True)` (an op without a deterministic
    kernel raises), cuBLAS workspace config, cuDNN benchmark off; ops medcli knows to lack a
    deterministic CUDA backward are replaced in the model (`models.make_deterministic`).
    Otherwise cuDNN may benchmark convolutions (fastest, not bit-exact).
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


def determinism_record(config: dict, replaced: list[str]) -> dict:
    """What strict mode did, for the manifest's environment."""
    if not config["deterministic"]:
        return {"strict": False}
    return {"strict": True, "deterministic_algorithms": True, "warn_only": False, "cudnn_benchmark": False,
            "replaced": replaced}
