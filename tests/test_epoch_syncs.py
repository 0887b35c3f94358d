"""A training epoch reads device values on the host a fixed number of times, however many
steps it makes: on a GPU every read (`.item()`, `.tolist()`, `.cpu()`, `bool()` of a tensor...)
and every tensor built from Python numbers on the device is a synchronisation that makes the
GPU wait for the host. On the CPU they are not, but they are counted all the same."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from medcli import augment, console, datasets, feed, models, optim, train
from medcli.config import resolve_config

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _reads_in_one_epoch(monkeypatch, images: int, lr_tensor: bool = False, **options) -> Counter:
    """Host reads (and tensors built from Python data) while `train_one_epoch` trains a tiny
    CNN on `images` random images, batch 16, as a run's first epoch (`lr_tensor`: the learning
    rate a tensor the schedule fills, as with --compile and on CUDA)."""
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
                        aug_gen=torch.Generator().manual_seed(1), task=datasets.task("bloodmnist"))
    counts: Counter = Counter()

    def counted(name, original):
        def read(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)
        return read

    with console.progress() as bar, monkeypatch.context() as patch:
        task = bar.add_task("epoch", total=1)
        for name in READS:
            patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
        patch.setattr(torch, "tensor", counted("torch.tensor", torch.tensor))
        train.train_one_epoch(state, data, augment.make_prep(28, 3), config, device, bar, task)
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
