"""A training run's checkpoints: `checkpoints/last.pt` (everything `--resume` needs to continue
bit-identically) and `checkpoints/best.pt` (weights and metrics), written atomically and read
back with one-line errors. torch is imported inside functions.

The training state is duck-typed (`medcli.train.State`: model, optimizer, scheduler, scaler,
`rng(device)` / `set_rng(state, device)`, epoch, history, best, bad_epochs, and for the
best-checkpoint rule `ema` (timm's ModelEmaV3 or None) and `scores`, the monitored value of
every epoch: `medcli.selection`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medcli import fileio
from medcli.errors import UsageError
from medcli.names import SCALAR_METRICS
from medcli.run import Run

__all__ = ["RESUME_KEYS", "read", "restore", "save"]

# What last.pt must hold for --resume to continue exactly where the run stopped.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "best", "bad_epochs", "ema",
               "scores")
# Absent from a last.pt written before the best-checkpoint rules: its run follows the old rule.
_SINCE_SELECTION = frozenset({"ema", "scores"})


def save(path: Path, state: Any, metrics: dict, full: bool, device, model: Any = None) -> Path:
    """torch.save atomically; only tensors, numbers, strings, lists and dicts (weights_only).
    `model`: the module whose weights are saved (default the trained one; best.pt under the
    `ema-window` rule: the EMA's)."""
    import torch

    payload = {"model": (state.model if model is None else model).state_dict(), "epoch": state.epoch,
               "metrics": {key: metrics.get(key) for key in SCALAR_METRICS}}
    if full:
        ema = getattr(state, "ema", None)
        payload.update(optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                       scaler=state.scaler.state_dict(), rng=state.rng(device), history=state.history,
                       best=state.best, bad_epochs=state.bad_epochs,
                       ema=None if ema is None else ema.module.state_dict(), scores=list(getattr(state, "scores", [])))
    with fileio.atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read(path: Path) -> dict:
    """last.pt as saved, or a one-line UsageError for a damaged or foreign file."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: one line naming the fix
        raise UsageError(f"cannot read {path} ({type(exc).__name__}); the checkpoint is damaged, "
                         f"start a new run") from None
    missing = [key for key in RESUME_KEYS if key not in _SINCE_SELECTION
               and (not isinstance(checkpoint, dict) or key not in checkpoint)]
    if missing:
        raise UsageError(f"{path} is not a medcli training checkpoint (no {', '.join(missing)}); "
                         f"the checkpoint is damaged, start a new run")
    return checkpoint


def restore(state: Any, checkpoint: dict, run: Run, device) -> None:
    """Put last.pt's weights (and their EMA), optimizer, schedule, scaler, random streams,
    history and monitored values into `state`."""
    from medcli import models

    models.load_state(state.model, checkpoint["model"], run.spec["name"], run.relative(run.checkpoint_path("last")),
                      "restore the run's own checkpoint or start a new run")
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] and state.scaler.is_enabled():  # an fp16 scale survives only where fp16 runs
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.set_rng(checkpoint["rng"], device)
    state.epoch = int(checkpoint["epoch"])
    state.history = list(checkpoint["history"])
    state.best = dict(checkpoint["best"])
    state.bad_epochs = int(checkpoint["bad_epochs"])
    state.scores = list(checkpoint.get("scores") or [])
    if state.ema is not None:
        if checkpoint.get("ema") is None:
            raise UsageError(f"{run.relative(run.checkpoint_path('last'))} has no EMA weights for the run's "
                             f"{run.config['select']['rule']} rule; the checkpoint is damaged, start a new run")
        state.ema.module.load_state_dict(checkpoint["ema"])
