"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


HEAVY = ("torch", "numpy", "timm", "torchvision", "sklearn", "matplotlib", "pandas", "scipy")


def heavy_imports(args: list[str]) -> list[str]:
    """Run `medcli ARGS` in a fresh interpreter; the heavy packages it imported on the way."""
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from medcli.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(result, code: int | None = None, *needles: str) -> str:
    """Assert medcli's error contract on a CliRunner result and return the error line: a
    non-zero exit (`code` if given), nothing on stdout, no traceback, exactly one `error:` line
    on stderr (warnings may precede it) holding every needle."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr
    return errors[0]


def calibrated_probabilities(csv, rows=slice(None)):
    """The probabilities of `evaluate`'s predictions CSV (the model's own) scaled by the
    temperature its sidecar records: what `predict --calibrated` gives for those images."""
    import numpy as np
    import pandas as pd

    from medcli import tables, tasks

    frame = pd.read_csv(csv).iloc[rows]
    sidecar = json.loads(tables.task_file(csv).read_text())
    probs = frame[[c for c in frame.columns if str(c).startswith(tables.PROB_PREFIX)]].to_numpy(dtype=float)
    temperature = np.asarray(sidecar.get("temperature", 1.0), dtype=float)
    if sidecar["task"] == tasks.MultiLabel.kind:  # one sigmoid per label
        return 1.0 / (1.0 + np.exp(-(np.log(probs) - np.log1p(-probs)) / temperature))
    scaled = np.log(probs) / temperature  # softmax(z / T) from softmax(z): log p is z up to a constant
    scaled -= scaled.max(axis=1, keepdims=True)
    return np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)


def interrupt_at_call(monkeypatch, owner, name: str, call: int = 2):
    """Replace `owner.name` by a stand-in whose `call`-th call raises KeyboardInterrupt (Ctrl-C
    there) and whose other calls go through; returns the original."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return real


def tiny_epoch(images: int, lr_tensor: bool = False, task=None, **options):
    """A first training epoch ready to run on the CPU: (state, data, prep, config) for
    `train.train_one_epoch` with a tiny CNN on `images` random 28-px RGB images of 8 classes,
    batch 16 (`lr_tensor`: the learning rate a tensor the schedule fills, as with --compile and
    on CUDA; `task`: the task object, BloodMNIST's by default; `options`: resolve_config's)."""
    import torch

    from medcli import augment, datasets, feed, models, optim, train
    from medcli.config import resolve_config

    augment._normalisation.cache_clear()  # built in the first epoch of a run (and then kept)
    torch.manual_seed(0)
    config = resolve_config(model="timm:test_resnet", device="cpu", batch_size=16, rotate=10.0, crop_scale=0.6,
                            **options)
    model, _ = models.create("timm:test_resnet", 8, 3, 28)
    device = torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    data = feed.Data(torch.randint(0, 256, (images, 3, 28, 28), dtype=torch.uint8, generator=generator),
                     torch.randint(0, 8, (images,), generator=generator), device)
    optimizer = optim.make_optimizer(model, config, device)
    scheduler = optim.make_scheduler(optimizer, config, images // 16)
    optim.place_lr(optimizer, {"compile": lr_tensor}, device)
    state = train.State(model=model, forward=model, optimizer=optimizer, scheduler=scheduler,
                        scaler=torch.amp.GradScaler("cpu", enabled=False), data_gen=torch.Generator().manual_seed(0),
                        aug_gen=torch.Generator().manual_seed(1), task=task or datasets.task("bloodmnist"))
    return state, data, augment.make_prep(28, 3), config


def run_epoch(state, data, prep, config) -> None:
    """`train.train_one_epoch` of `tiny_epoch`'s parts, with a progress bar (off the terminal)."""
    import torch

    from medcli import console, train

    with console.progress() as bar:
        task = bar.add_task("epoch", total=1)
        train.train_one_epoch(state, data, prep, config, torch.device("cpu"), bar, task)


@contextlib.contextmanager
def shared_folder():
    """A folder every user may enter, removed afterwards: pytest's own folders are their owner's alone."""
    folder = Path(tempfile.mkdtemp(dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def as_nobody(code: str) -> subprocess.CompletedProcess:
    """Python `code` run as the unprivileged user nobody (setpriv), for the checks that root's
    rights would void (it reads and writes anything); skips where that is not possible."""
    import pytest

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run as another user")
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
                          capture_output=True, text=True)
    if done.returncode != 0 and "setpriv" in done.stderr:
        pytest.skip(f"cannot run as another user: {done.stderr.strip()}")
    return done
