"""A split on its way to the training device: resident there as one uint8 tensor, or, when it
exceeds the device-data budget, in (pinned) host memory with each batch gathered and copied
without blocking. torch is imported inside functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medcli import console, npzcache
from medcli.config import DEVICE_DATA_SHARE

if TYPE_CHECKING:
    from medcli import datasets

__all__ = ["Data", "data_budget", "to_device"]


@dataclass
class Data:
    """One split for training: uint8 images (N, C, H, W) and int64 labels (N,) on the device.

    When the images do not fit the device-memory budget they stay in host memory (pinned on
    CUDA, or where they are when mapped from the dataset cache: `datasets.load(...,
    mapped=...)`) and `take` gathers each batch there and copies it with `non_blocking=True`,
    through two alternating pinned buffers so the copy of one batch overlaps the work on the
    previous one. Same batches, same augmentation, same results; only where the bytes wait
    differs."""

    images: Any
    labels: Any
    device: Any
    streamed: bool = False
    _buffers: list = field(default_factory=lambda: [None, None])
    _events: list = field(default_factory=lambda: [None, None])
    _turn: int = 0

    @classmethod
    def of(cls, splits: datasets.Splits, split: str, device, budget: float) -> "Data":
        """The split on `device` if its images take at most `budget` bytes, else streamed. The
        split's numpy images leave `splits` (the tensor replaces them: a split too big for the
        device is not held twice in host memory)."""
        import torch

        from medcli import datasets

        array = splits.images.pop(split)
        labels = torch.from_numpy(splits.labels[split]).to(device)
        if array.nbytes <= budget:
            return cls(datasets.as_tensor(array, device), labels, device)
        # Mapped images stay where they are (the page cache, one copy per node): pinning them
        # would make a private copy per process; batches are gathered into pinned buffers anyway.
        pin = device.type == "cuda" and not npzcache.is_mapped(array)
        where = "mapped from the node's page cache" if npzcache.is_mapped(array) else \
            f"in {'pinned ' if pin else ''}host memory"
        console.info(f"{split} split ({array.nbytes / 2**30:.2f} GiB) exceeds the device-data budget "
                     f"({budget / 2**30:.2f} GiB): kept {where}, batches copied as needed")
        return cls(datasets.as_tensor(array, pin=pin), labels, device, streamed=True)

    def take(self, index, host=None):
        """The images at `index` (a tensor on the device), on the device: a fresh tensor that
        later calls do not overwrite. A streamed split gathers them at `host`, the same
        positions on the CPU (without it, it reads `index` back: a wait for the device)."""
        if not self.streamed:
            return self.images[index]
        import torch

        cuda = self.device.type == "cuda"
        index = index.cpu() if host is None else host
        turn, self._turn = self._turn, 1 - self._turn
        if self._events[turn] is not None:
            self._events[turn].synchronize()  # its previous copy has left the buffer
        if self._buffers[turn] is None or self._buffers[turn].shape[0] < len(index):
            self._buffers[turn] = torch.empty((len(index), *self.images.shape[1:]), dtype=self.images.dtype,
                                              pin_memory=cuda)
        buffer = self._buffers[turn][:len(index)]
        torch.index_select(self.images, 0, index, out=buffer)
        batch = buffer.to(self.device, non_blocking=True, copy=True)
        if cuda:
            self._events[turn] = torch.cuda.Event()
            self._events[turn].record()
        return batch

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def to_device(tensor, device):
    """A CPU tensor on `device`; to a GPU through page-locked memory, without blocking the host
    (a copy from pageable memory waits for the device)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def data_budget(config: dict, device) -> float:
    """Bytes of images that may live on the training device: --data-budget GiB when given,
    else on CUDA half the free memory (the rest is for the model, activations and the
    optimizer), on CPU unlimited (the data is in host memory either way)."""
    import torch

    if config.get("data_budget_gb") is not None:
        return config["data_budget_gb"] * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return DEVICE_DATA_SHARE * free
    return math.inf
