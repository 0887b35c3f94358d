"""Device choice, mixed precision and batched prediction shared by train, evaluate and explain.

One place decides which device a stage runs on and how autocast is entered, so that "bf16"
means the same thing everywhere (the seeds had a mixed-precision flag that built a GradScaler
but never entered autocast). `predict_logits` is the only batched forward pass over a uint8
image tensor: train uses it for validation, evaluate for every split (with test-time views).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

from medcli import console
from medcli.errors import MedcliError, UsageError, check_stop
from medcli.names import AMP_MODES

__all__ = ["autocast", "predict_logits", "resolve_amp", "resolve_device"]


def resolve_device(name: str = "auto"):
    """'auto' -> the first CUDA GPU if there is one, else CPU; 'cpu', 'cuda', 'cuda:N'.

    An explicit CUDA device that is not there is a usage error (not a silent CPU fallback:
    a run meant for a GPU that quietly trains on CPU wastes hours).
    """
    import torch

    text = (name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"device '{name}' is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {name} asks for a CUDA GPU but none is available here; use --device cpu or auto")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return device


def resolve_amp(device, amp: str | None, default: str = "bf16") -> str:
    """The precision a stage really uses. None/'auto' -> `default` on CUDA (training: bf16;
    evaluate and explain pass "off": evaluation is cheap and its logits feed the metrics and
    the temperature fit, which bf16 would round), off on CPU.

    fp16 is CUDA-only (it needs a GradScaler, and CPU kernels gain nothing from it); bf16 on
    CPU is allowed when asked for explicitly (useful for tests and newer CPUs).
    """
    import torch

    device = torch.device(device)
    mode = (amp or "auto").lower()
    if mode == "auto":
        if device.type != "cuda" or (default == "bf16" and not torch.cuda.is_bf16_supported()):
            return "off"
        return default
    if mode not in AMP_MODES:
        raise UsageError(f"unknown --amp '{amp}'; choose one of {', '.join(AMP_MODES)}")
    if mode == "fp16" and device.type != "cuda":
        raise UsageError("--amp fp16 needs a CUDA GPU; use --amp bf16 or --amp off on CPU")
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bf16; use --amp fp16 or --amp off")
    return mode


def autocast(device, amp: str):
    """A context that runs the forward pass in `amp` precision ('off' -> a no-op context)."""
    import torch

    if amp == "off":
        return nullcontext()
    if amp not in ("bf16", "fp16"):
        raise UsageError(f"unknown amp mode '{amp}'; choose one of {', '.join(AMP_MODES)}")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def predict_logits(
    model,
    images,
    prep: dict,
    *,
    batch_size: int,
    device,
    amp: str = "off",
    views: Sequence[Callable] | None = None,
    task=None,
    progress_label: str | None = None,
    pad: bool = False,
):
    """Class scores for a uint8 (N, C, H, W) tensor, as a float32 CPU tensor (N, classes).

    Batches are moved to `device` (a no-op when the tensor already lives there), run through
    `augment.preprocess` on the device and the model under `inference_mode` and autocast.

    With `views` (deterministic functions uint8 batch -> uint8 batch, e.g. flips for
    test-time augmentation) and the run's `task` (a `tasks.Task`), the probabilities of the
    views are averaged and turned back into scores (`task.scores_of_probs`: log for softmax,
    logit for sigmoid), so callers treat the TTA and the plain result the same way
    (`task.probabilities` gives the averaged probabilities). The model's train/eval mode is
    restored afterwards.

    `pad`: every forward pass sees `batch_size` images (the last batch, or a split smaller than
    one batch, is filled up with black images whose scores are dropped), so cuDNN autotunes one
    shape instead of two. In eval mode every image's scores are its own; the padded shape
    may pick other kernels, so they are equal only within rounding. Training asks for it on
    CUDA (validation every epoch); evaluate and predict keep their outputs as they were.

    Scores that overflow under `amp` (fp16's largest value is 65,504) are computed again in
    full precision, with a warning; scores that are still not finite mean a diverged model
    and stop with one line (they would turn every metric into NaN).
    """
    import torch

    arguments = dict(batch_size=batch_size, device=torch.device(device), views=views, task=task,
                     progress_label=progress_label, pad=pad)
    scores = _predict(model, images, prep, amp=amp, **arguments)
    if amp != "off" and not torch.isfinite(scores).all():
        console.warn(f"the model's outputs overflowed in {amp}; predicting again in full precision")
        scores = _predict(model, images, prep, amp="off", **arguments)
    if not torch.isfinite(scores).all():
        raise MedcliError("the model's outputs are NaN or infinite: its weights or BatchNorm statistics have "
                          "diverged; evaluate another checkpoint or train again with a lower --lr")
    return scores


def _predict(model, images, prep: dict, *, batch_size: int, device, amp: str, views, task, progress_label, pad):
    import torch

    from medcli import augment

    was_training = model.training
    model.eval()
    total = int(images.shape[0])
    outputs = []
    try:
        # Only a labelled call opens a bar: Rich allows one live display, and train calls this
        # (unlabelled) while its own epoch bars are showing.
        with torch.inference_mode(), (console.progress() if progress_label else nullcontext()) as bar:
            row = bar.add_task(progress_label, total=total, unit="img") if progress_label else None
            for start in range(0, total, batch_size):
                check_stop()
                batch = images[start:start + batch_size].contiguous().to(device, non_blocking=True)  # of a view too
                real = int(batch.shape[0])
                if pad and real < batch_size:
                    batch = torch.cat([batch, batch.new_zeros((batch_size - real, *batch.shape[1:]))])
                if views:
                    probs = sum(task.probs_t(_forward(model, augment.preprocess(view(batch), prep), device, amp))
                                for view in views)
                    scores = task.scores_of_probs(probs / len(views))
                else:
                    scores = _forward(model, augment.preprocess(batch, prep), device, amp)
                outputs.append(scores[:real].cpu())
                if row is not None:
                    bar.advance(row, real)
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty(0, 0)
    return torch.cat(outputs)


def _forward(model, x, device, amp: str):
    with autocast(device, amp):
        return model(x).float()
