"""The uncompressed, memory-mapped copy of an npz that training reads (`datasets.load(...,
mapped=True)`): MedMNIST's npz files are zip-deflated and cannot be mapped, so each split is
written once as .npy files in the training layout (N, C, H, W) under
`<data root>/medcli-cache/<flag>[_<size>]-<md5>/`, and every process maps them: the page cache
holds one copy per node however many processes train on it. Also the chunked reading of an
npz member into (N, C, H, W) that the cache and in-memory training loads share.
"""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Sequence

import numpy as np

from medcli import console, fileio
from medcli.errors import MedcliError

__all__ = ["CACHE_DIR", "CACHE_ENV", "cache_path", "drop_stale", "is_mapped", "mapped", "open_member", "read_member", "read_nchw"]

# The cache's folder in a file's data root; `CACHE_ENV` = auto (default: `datasets.use_cache`
# decides), always or never.
CACHE_DIR, CACHE_ENV = "medcli-cache", "MEDCLI_DATA_CACHE"
_CHUNK_BYTES = 64 * 2**20  # images converted at a time while a split is read or cached


def cache_path(npz_path: str | os.PathLike, md5: str) -> Path:
    """The folder of the uncompressed copy of the npz whose content has this md5 (a changed
    file gets a new folder; the old one is removed when the new one is written)."""
    npz_path = Path(npz_path)
    return npz_path.parent / CACHE_DIR / f"{npz_path.stem}-{md5}"


def is_mapped(images) -> bool:
    """True for images mapped from the cache (their pages are the page cache's, not this
    process's: a copy of them, pinned or not, would be a private one)."""
    return isinstance(images, np.memmap)


def open_member(archive: zipfile.ZipFile, key: str):
    """(open member, shape, Fortran order, dtype) of one array of an npz, positioned at its data."""
    fmt = np.lib.format
    handle = archive.open(f"{key}.npy")
    version = fmt.read_magic(handle)
    reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, fortran, dtype = reader(handle)
    if dtype.hasobject:
        handle.close()
        raise ValueError(f"{key} holds Python objects, not images")
    return handle, shape, fortran, dtype


def read_member(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    with archive.open(f"{key}.npy") as handle:
        return np.lib.format.read_array(handle, allow_pickle=False)


def _nchw_chunks(archive: zipfile.ZipFile, key: str):
    """((N, C, H, W), dtype, chunks): an npz's (N, H, W[, C]) images streamed from the file a
    few dozen MB at a time, each chunk turned to (n, C, H, W); the whole array is never held,
    except one stored in Fortran order (e.g. saved from scipy.io.loadmat), whose images are
    not contiguous in the file: it is read whole, as one chunk."""
    handle, shape, fortran, dtype = open_member(archive, key)
    if len(shape) not in (3, 4):
        handle.close()
        raise ValueError(f"{key} has shape {shape}, expected (N, H, W[, C])")
    n, h, w = shape[:3]
    c = shape[3] if len(shape) == 4 else 1
    per = max(1, _CHUNK_BYTES // max(1, h * w * c * dtype.itemsize))

    def whole():
        handle.close()
        yield 0, read_member(archive, key).reshape(n, h, w, c).transpose(0, 3, 1, 2)

    def chunks():
        with handle:
            for start in range(0, n, per):
                k = min(per, n - start)
                raw = handle.read(k * h * w * c * dtype.itemsize)
                if len(raw) != k * h * w * c * dtype.itemsize:
                    raise ValueError(f"{key} is truncated")
                yield start, np.frombuffer(raw, dtype).reshape(k, h, w, c).transpose(0, 3, 1, 2)

    return (n, c, h, w), dtype, whole() if fortran else chunks()


def read_nchw(archive: zipfile.ZipFile, key: str) -> np.ndarray:
    """An npz's images read into memory as one (N, C, H, W) array, chunk by chunk."""
    shape, dtype, chunks = _nchw_chunks(archive, key)
    out = np.empty(shape, dtype)
    for start, chunk in chunks:
        out[start:start + len(chunk)] = chunk
    return out


def _cached(directory: Path, split: str, record: dict, channels: int):
    """(images (N, C, H, W) mapped copy-on-write, labels) of a split in the cache; None when
    it is not there whole (a file is only ever renamed into place complete)."""
    try:
        images = np.load(directory / f"{split}_images.npy", mmap_mode="c", allow_pickle=False)
        labels = np.load(directory / f"{split}_labels.npy", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    n = (record.get("n_samples") or {}).get(split, len(labels))
    if images.shape != (n, channels, record["size"], record["size"]) or len(labels) != n:
        return None
    return images, labels


def mapped(path: Path, md5: str, splits: Sequence[str], channels: int, record: dict) -> dict | None:
    """split -> (mapped images, labels) from the cache, written first where missing under a
    file lock (processes that start together: one writes, the others wait and map it); None
    with one warning when it cannot be written (read-only root, disk full)."""
    directory = cache_path(path, md5)
    found = {split: _cached(directory, split, record, channels) for split in splits}
    if all(value is not None for value in found.values()):
        return found
    from filelock import FileLock

    try:
        directory.mkdir(parents=True, exist_ok=True)
        with FileLock(directory / ".lock"):
            for orphan in directory.glob(".*.tmp.npy"):  # a writer killed mid-file (none writes while we hold the lock)
                orphan.unlink()
            for split in splits:
                found[split] = _cached(directory, split, record, channels)  # another process may have written it
                if found[split] is None:
                    _write_cache(path, directory, split)
                    found[split] = _cached(directory, split, record, channels)
                if found[split] is None:
                    raise MedcliError(f"the {split} split written to {directory} does not read back")
        drop_stale(directory)
    except (OSError, MedcliError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        console.warn(f"cannot cache {path.name} uncompressed in {directory.parent} ({reason}); each process reads "
                     f"its own copy into memory: make that folder writable with room for the file's splits, or "
                     f"set {CACHE_ENV}=never")
        return None
    return found


def _write_cache(path: Path, directory: Path, split: str) -> None:
    """One split of the npz as two .npy files: the labels, then the images (N, C, H, W),
    streamed chunk by chunk, each renamed into place once complete."""
    fmt = np.lib.format
    with zipfile.ZipFile(path) as archive:
        shape, dtype, chunks = _nchw_chunks(archive, f"{split}_images")
        need, free = int(np.prod(shape)) * dtype.itemsize, shutil.disk_usage(directory).free
        if need > free:
            raise MedcliError(f"the {split} split needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")
        labels = read_member(archive, f"{split}_labels")
        with fileio.atomic_path(directory / f"{split}_labels.npy") as tmp, open(tmp, "wb") as handle:
            np.save(handle, labels, allow_pickle=False)
        with fileio.atomic_path(directory / f"{split}_images.npy") as tmp, open(tmp, "wb") as handle:
            fmt.write_array_header_1_0(handle, {"descr": fmt.dtype_to_descr(dtype), "fortran_order": False,
                                                "shape": shape})
            for _, chunk in chunks:
                handle.write(np.ascontiguousarray(chunk).data)


def drop_stale(directory: Path) -> None:
    """Remove the caches of earlier versions of the same file (best-effort), each under its own
    lock: one that another process is writing (it holds the lock) stays until a later call."""
    from filelock import FileLock, Timeout

    stem = directory.name.rsplit("-", 1)[0]
    try:
        others = list(directory.parent.iterdir()) if directory.parent.is_dir() else []
    except OSError:  # another user's cache folder: not ours to clean
        return
    for other in others:
        if other != directory and re.fullmatch(rf"{re.escape(stem)}-[0-9a-f]{{32}}", other.name):
            try:
                with FileLock(other / ".lock", timeout=0):
                    shutil.rmtree(other, ignore_errors=True)
            except (Timeout, OSError):  # being written, or not ours to lock
                continue
