"""Small benchmark sets cut from real data: `make_subset` writes a stratified subset of a
MedMNIST npz as some flag's file, with its dataset record, checked like an import. Not part
of medcli (no command needs it): `scripts/bench_small.py` and two tests use it, the tests
with scripts/ put on sys.path (tests/conftest.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import fileio
from medcli.datasets import make_record, validate_npz, write_record
from medcli.errors import UsageError
from medcli.names import SPLITS

__all__ = ["CONFUSED", "PBC_CLASSES", "class_ids", "make_subset"]

# The classes of the PBC BloodMNIST files (../shared/data/bloodmnist_pbc_*.npz), in label order.
PBC_CLASSES = ("basophil", "eosinophil", "erythroblast", "immature granulocyte", "lymphocyte", "monocyte",
               "neutrophil", "platelet")
# The classes a full BloodMNIST run confuses most (its confusion matrix): the immature
# granulocytes with monocytes and neutrophils (and basophils), lymphocytes with monocytes. In
# this order each class's nearest neighbours are the ones it is confused with, so as grades
# (RetinaMNIST's ordinal layout) neighbouring grades are the confusable ones.
CONFUSED = ("lymphocyte", "monocyte", "immature granulocyte", "neutrophil", "basophil")


def class_ids(names: Sequence[str]) -> tuple[int, ...]:
    """PBC BloodMNIST labels of class `names` (PBC_CLASSES), in the order given."""
    unknown = [name for name in names if name not in PBC_CLASSES]
    if unknown:
        raise UsageError(f"no PBC class {', '.join(unknown)}; choose from {', '.join(PBC_CLASSES)}")
    return tuple(PBC_CLASSES.index(name) for name in names)


def make_subset(
    source: str | os.PathLike,
    path: str | os.PathLike,
    flag: str,
    counts: tuple[int, int, int],
    seed: int = 0,
    classes: Sequence[int] | None = None,
    grayscale: bool = False,
) -> Path:
    """Write a stratified subset of a single-label npz (official layout) as `flag`'s file:
    `counts` images per split drawn from the same split of `source`, each class keeping its
    share; `classes` keeps only those (relabelled 0..k-1 in that order); `grayscale` turns RGB
    into one luma channel (ITU-R BT.601). The record names the source and is marked neither
    official nor synthetic. For small benchmark sets cut from real data (a BreastMNIST-sized
    two-class grayscale set from BloodMNIST, for example)."""
    source = Path(source)
    arrays = {}
    rng = np.random.default_rng(seed)
    with np.load(source, allow_pickle=False) as archive:
        for split, n in zip(SPLITS, counts):
            images, labels = archive[f"{split}_images"], archive[f"{split}_labels"].reshape(-1)
            if classes is not None:
                absent = sorted(set(classes) - set(np.unique(labels).tolist()))
                if absent:
                    raise UsageError(f"{source} has no {split} images of class {', '.join(map(str, absent))}")
                if len(set(classes)) != len(classes):
                    raise UsageError(f"classes {list(classes)} name a class twice")
                keep = np.isin(labels, classes)
                relabel = np.zeros(labels.max() + 1, dtype=np.int64)  # every kept class is <= labels.max()
                relabel[list(classes)] = np.arange(len(classes))
                images, labels = images[keep], relabel[labels[keep]]
            if n > len(labels):
                raise UsageError(f"{source} has {len(labels)} {split} images of the chosen classes; cannot take {n}")
            chosen = _stratified(labels, n, rng)
            picked = images[chosen]
            if grayscale and picked.ndim == 4:
                picked = np.clip(np.round(picked @ np.array([0.299, 0.587, 0.114])), 0, 255).astype(np.uint8)
            arrays[f"{split}_images"] = picked
            arrays[f"{split}_labels"] = labels[chosen].reshape(-1, 1).astype(np.uint8)
    target = Path(path)
    size = arrays["train_images"].shape[1]
    with fileio.atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        validate_npz(tmp, flag, size)  # the checks resolve() trusts the record for; nothing kept on failure
    record = make_record(flag, size, target, fileio.md5_file(target),
                         f"stratified subset (seed {seed}) of {source.name}", dict(zip(SPLITS, counts)))
    write_record(target, record)
    return target


def _stratified(labels: np.ndarray, n: int, rng) -> np.ndarray:
    """`n` sorted indices with each class's share of `labels` (largest remainders round)."""
    classes, sizes = np.unique(labels, return_counts=True)
    exact = sizes * n / sizes.sum()
    take = np.floor(exact).astype(int)
    take[np.argsort(-(exact - take), kind="stable")[: n - take.sum()]] += 1
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == k), t, replace=False)
                                   for k, t in zip(classes, take)]))
