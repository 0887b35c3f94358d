"""A training epoch reads device values on the host a fixed number of times, however many
steps it makes: on a GPU every read (`.item()`, `.tolist()`, `.cpu()`, `bool()` of a tensor...)
and every tensor built from Python numbers on the device is a synchronisation that makes the
GPU wait for the host. On the CPU they are not, but they are counted all the same."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from cli_helpers import run_epoch, tiny_epoch

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _reads_in_one_epoch(monkeypatch, images: int, lr_tensor: bool = False, **options) -> Counter:
    """Host reads (and tensors built from Python data) while `train_one_epoch` trains a tiny
    CNN on `images` random images, batch 16, as a run's first epoch (`tiny_epoch`)."""
    state, data, prep, config = tiny_epoch(images, lr_tensor, **options)
    counts: Counter = Counter()

    def counted(name, original):
        def read(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in READS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        patch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
        run_epoch(state, data, prep, config)
    return counts


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_an_epoch_reads_the_device_a_fixed_number_of_times(monkeypatch, mixup):
    """The counts of a 4-step and an 8-step epoch are the same handful: the losses summed on the
    device and read once, the augmentation (and MixUp) draws of the whole epoch made up front
    and copied once, normalisation constants built once per run."""
    short = _reads_in_one_epoch(monkeypatch, 64, mixup_alpha=mixup)
    long = _reads_in_one_epoch(monkeypatch, 128, mixup_alpha=mixup)
    assert long == short, (short, long)
    assert sum(long.values()) <= 4, long



def test_a_learning_rate_tensor_is_never_read_by_the_host(monkeypatch):
    """With the lr a tensor (--compile, CUDA) the schedule fills it in place and the progress
    bar and history take the rate from the schedule's own arithmetic: the same handful."""
    short = _reads_in_one_epoch(monkeypatch, 64, lr_tensor=True)
    long = _reads_in_one_epoch(monkeypatch, 128, lr_tensor=True)
    assert long == short, (short, long)
    assert sum(long.values()) <= 4, long
