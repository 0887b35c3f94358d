"""Which weights become `checkpoints/best.pt`: the rule, chosen once the data is loaded
(`choose`), recorded in the manifest's `config["select"]`, and the pieces the training loop
applies it with (`monitored`, `smoothed`, `compare`, `make_ema`).

Two rules:

- `epoch` (1,000 validation images or more, or any explicit `--monitor`): the epoch whose
  `--monitor` value on the trained weights is best; ties go to the later epoch. What medcli
  always did.
- `ema-window` (a validation split under SMALL_VAL images, `--monitor` not given): an
  exponential moving average of the weights is kept during training (timm's `ModelEmaV3`, its
  time constant EMA_SHARE of the run's optimizer steps, shorter at first by timm's warm-up
  1 - (1 + step)^(-2/3)); after every epoch the EMA weights, with BatchNorm statistics
  re-estimated for them, are validated, and best.pt holds the EMA weights at the end of the
  WINDOW consecutive epochs whose mean validation AUC is best (the later window on a tie).
  On BreastMNIST's 78 validation images one image is 1.3 points of accuracy: accuracy epoch
  by epoch picked lucky early epochs (6 of 60) that lost 4.5 test points between seeds.
  Until the first window is complete best.pt follows the latest epoch (a run shorter than
  the window uses all its epochs).

Light at import (torch and timm inside functions): `medcli train --help` states the rule.
"""

from __future__ import annotations

import math
from typing import Any

from medcli.names import MONITORS

__all__ = [
    "EMA_SHARE", "SMALL_MONITOR", "SMALL_VAL", "WINDOW", "best_record", "choose", "compare", "describe", "ema_decay",
    "given",
    "make_ema", "monitored", "rule", "rule_help", "smoothed", "span",
]

SMALL_VAL = 1000  # validation images below which epochs are not ranked one by one
WINDOW = 3  # epochs whose mean value ranks a window
SMALL_MONITOR = "auc"  # continuous: a rank statistic over every positive-negative pair
EMA_SHARE = 0.05  # the EMA's time constant, as a share of the run's optimizer steps
EMA_WARMUP_POWER = 2 / 3  # timm's decay warm-up: 1 - (1 + step)^(-power), capped at the decay


def rule_help() -> str:
    """The rule in words, for `medcli train --help`."""
    return (f"best.pt: with fewer than {SMALL_VAL} validation images and no --monitor, the EMA of the weights "
            f"(timm ModelEmaV3, time constant {EMA_SHARE:.0%} of the optimizer steps; BatchNorm re-estimated for "
            f"it) at the end of the {WINDOW} epochs with the best mean val {SMALL_MONITOR.upper()} of the EMA; "
            f"otherwise the epoch with the best --monitor value")


def given(monitor: str) -> dict:
    """The `epoch` rule for an explicit --monitor: exactly the old selection."""
    return {"rule": "epoch", "monitor": monitor, "window": 1, "weights": "model", "why": "--monitor given"}


def rule(config: dict) -> dict:
    """The run's rule (a run from before the rules existed: the `epoch` rule on its monitor)."""
    return config.get("select") or {**given(config["monitor"]), "why": "run from before the selection rules"}


def describe(select: dict, epochs: int | None = None, short: bool = False) -> str:
    """The rule that chose best.pt, in words: for model cards and pages, or `short` for the
    curves' title ("auc (EMA, mean of 3 epochs)"); a run of `epochs` shorter than the window
    averages all of them."""
    window = select.get("window", 1) if epochs is None else span(select.get("window", 1), epochs)
    if short:
        return select["monitor"] + (f" (EMA, mean of {window} epochs)" if select["weights"] == "ema" else "")
    monitor = select["monitor"].upper()
    if select["rule"] == "ema-window":
        chosen = f"the EMA of the weights at the end of the {window} epochs with the best mean val {monitor}"
    else:
        chosen = f"the epoch with the best val {monitor}"
    return f"{chosen} ({select['why']})"


def ema_decay(total_steps: int) -> float:
    """The EMA decay whose time constant 1 / (1 - decay) is EMA_SHARE of `total_steps` (0: the
    EMA is the weights themselves when that is a step or less)."""
    span = EMA_SHARE * total_steps
    return 0.0 if span <= 1 else 1.0 - 1.0 / span


def choose(config: dict, n_val: int, total_steps: int) -> dict:
    """The config with its rule (`select`, whose `monitor` is the metric the rule follows;
    `config["monitor"]` stays the --monitor option's resolved value), once the size of the
    validation split and the run's optimizer steps are known. A given --monitor (`select`
    already set by `config.resolve_config`) is kept."""
    if config.get("select"):
        return config
    if n_val >= SMALL_VAL:
        chosen = {"rule": "epoch", "monitor": config["monitor"], "window": 1, "weights": "model",
                  "why": f"{n_val} validation images (at least {SMALL_VAL})"}
    else:
        chosen = {"rule": "ema-window", "monitor": SMALL_MONITOR, "window": WINDOW, "weights": "ema",
                  "ema_decay": ema_decay(total_steps), "ema_share": EMA_SHARE, "ema_warmup_power": EMA_WARMUP_POWER,
                  "why": f"{n_val} validation images (fewer than {SMALL_VAL}): one image moves accuracy by "
                         f"{100 / max(1, n_val):.1f} points"}
    return {**config, "select": chosen}


def make_ema(model, select: dict):
    """timm's ModelEmaV3 of `model` for an `ema` rule, else None. Only the parameters are
    averaged; the buffers (BatchNorm statistics) are copied from the model at each update and
    re-estimated for the EMA weights before they are validated or saved (the training loop's
    `reestimate_batchnorm`). The model's parameters are the same on every process of a
    distributed run, so the EMA is too."""
    if select.get("weights") != "ema":
        return None
    from timm.utils import ModelEmaV3

    ema = ModelEmaV3(model, decay=select["ema_decay"], use_warmup=True, warmup_power=select["ema_warmup_power"],
                     exclude_buffers=True)
    ema.module.requires_grad_(False)
    return ema


def monitored(metrics: dict, monitor: str) -> float | None:
    """The validation value best.pt and early stopping follow. An undefined AUC (a class or
    label absent from the validation split: medmnist's AUC is undefined then) is replaced by
    the mean AUC of the classes whose AUC is defined, so small validation splits still pick
    a best epoch."""
    value = metrics.get(MONITORS[monitor][0])
    if value is not None and not math.isfinite(value):  # an overflowing (fp16) validation loss
        return None
    if value is None and monitor == "auc":
        defined = [row["auc"] for row in metrics["per_class"] if row["auc"] is not None]
        value = sum(defined) / len(defined) if defined else None
    return value


def smoothed(values: list, window: int, epochs: int) -> float | None:
    """The mean of the last `window` epochs' values (of all `epochs` when the run is shorter);
    None (ranked below any defined value) until that many exist or when one is undefined."""
    width = span(window, epochs)
    recent = values[-width:]
    if len(recent) < width or any(value is None for value in recent):
        return None
    return sum(recent) / width


def span(window: int, epochs: int) -> int:
    """How many epochs a window of `window` averages in a run of `epochs` (all of a shorter run)."""
    return max(1, min(window, epochs))


def compare(value: float | None, best: float | None, monitor: str) -> int:
    """1 if `value` is strictly better than `best`, 0 if equal, -1 if worse. An undefined
    value is worse than a defined one; while the monitor has never been defined, every epoch
    improves on the last (best.pt always exists)."""
    if best is None:
        return 1
    if value is None or value == best:
        return -1 if value is None else 0
    return 1 if (value < best if MONITORS[monitor][1] == "min" else value > best) else -1


def best_record(best: dict, select: dict, epochs: int) -> dict[str, Any]:
    """The stage summary's account of best.pt: its epoch, value, the epochs the value is the
    mean of (None while no window was complete: best.pt then follows the latest epoch) and
    which weights it holds (`model` or `ema`)."""
    epoch, width = best["epoch"], span(select.get("window", 1), epochs)
    window = [epoch - width + 1, epoch] if epoch is not None and best["value"] is not None else None
    return {"best_epoch": epoch, "best_value": best["value"], "best_window": window, "best_weights": select["weights"],
            "select_rule": select["rule"]}
