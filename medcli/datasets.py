"""Dataset registry (from `medmnist.INFO`), file layout, validation, loading and a seeded
synthetic generator.

Files live at `<root>/<flag>[_<size>].npz` (the medmnist convention) with a small JSON record
beside each (`<flag>[_<size>].json`): flag, size, md5, official, source, time. `train` copies
that record into the run manifest.

Training data that would take much host memory is mapped instead of read (`load(...,
mapped=...)`, `use_cache`): the npz (zip-deflated, which cannot be memory-mapped) is written
once, uncompressed and already in the training layout (N, C, H, W), as .npy files under
`<root>/medcli-cache/<flag>[_<size>]-<md5>/`, and every process maps them: the page cache
holds one copy per node however many processes train on it.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shlex
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medcli import console, fileio, npzcache, tasks
from medcli.errors import MedcliError, UsageError
from medcli.names import SIZES, SPLITS

__all__ = [
    "CHECKS", "MAP_MIN_BYTES", "SAMPLE_DIR", "SAMPLE_OF", "provenance", "provenance_kind", "SIZES", "SPLITS", "SYNTHETIC_DIR", "Splits", "as_tensor", "as_view", "check_size", "class_names", "current_md5", "data_path",
    "default_root", "filename", "flags", "info", "load", "make_record", "make_synthetic", "official_source",
    "keep_record", "read_record", "record_of", "record_path", "resolve", "restore_hint", "size_suffix", "task", "unchanged", "use_cache", "validate_npz", "write_record",
]

# Stand-ins medcli keeps in folders of their own under a data root, never under the official
# file's path: the embedded real sample (`download --sample`, of SAMPLE_OF's flag and size) and
# synthetic data (`download --synthetic` as scripts/run_all.sh uses it).
SAMPLE_DIR, SYNTHETIC_DIR = "sample", "synthetic"
SAMPLE_OF = ("bloodmnist", 28)
# auto maps the training splits when the copies a node's processes would hold in host memory
# reach this many bytes (28-px files in one process stay in memory: nothing to save there).
MAP_MIN_BYTES = 512 * 2**20


@functools.lru_cache(maxsize=1)
def _info_table() -> dict:
    """medmnist.INFO, loaded from medmnist/info.py by path.

    `import medmnist.info` would first run medmnist/__init__.py, which imports torch (3+ s);
    `download` and `--help` must stay light, and info.py itself needs only the stdlib.
    """
    spec = importlib.util.find_spec("medmnist")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("the medmnist package is not installed; pip install medmnist")
    path = Path(spec.submodule_search_locations[0]) / "info.py"
    info_spec = importlib.util.spec_from_file_location("medmnist.info", path)
    module = importlib.util.module_from_spec(info_spec)
    with warnings.catch_warnings():  # it makes ~/.medmnist, medmnist's own default root, which medcli never uses
        warnings.filterwarnings("ignore", message="Failed to setup default root", category=UserWarning)
        info_spec.loader.exec_module(module)
    return module.INFO


def flags() -> list[str]:
    """Every 2D MedMNIST dataset flag (the 3D ones are out of medcli's scope)."""
    return [flag for flag in _info_table() if not flag.endswith("3d")]


def info(flag: str) -> dict:
    flag = flag.lower()
    if flag not in flags():
        if flag in _info_table():
            raise UsageError(f"'{flag}' is a 3D MedMNIST dataset; medcli trains on the 2D ones: {', '.join(flags())}")
        import difflib

        close = difflib.get_close_matches(flag, flags(), n=1, cutoff=0.8)  # a typo, not any other flag
        raise UsageError(f"'{flag}' is not a MedMNIST 2D dataset; "
                         + (f"did you mean {close[0]}? " if close else "") + f"(one of: {', '.join(flags())})")
    return _info_table()[flag]


def class_names(flag: str) -> list[str]:
    labels = info(flag)["label"]
    return [labels[str(i)] for i in range(len(labels))]


def task(flag: str) -> tasks.Task:
    """The task object of a dataset: its medmnist.INFO task type, with its class names."""
    return tasks.for_kind(info(flag)["task"], class_names(flag))


def check_size(size: int) -> int:
    if size not in SIZES:
        raise UsageError(f"size {size} is not a MedMNIST size; choose one of {', '.join(map(str, SIZES))}")
    return size


def size_suffix(size: int) -> str:
    """What MedMNIST's names add for a size: nothing at 28 px (the original files), else _<size>."""
    return "" if size == 28 else f"_{size}"


def filename(flag: str, size: int) -> str:
    return f"{flag}{size_suffix(size)}.npz"


def official_source(flag: str, size: int) -> tuple[str, str]:
    """(url, md5) of the official file on Zenodo."""
    meta = info(flag)
    return meta[f"url{size_suffix(size)}"], meta[f"MD5{size_suffix(size)}"]


def default_root() -> Path:
    return Path(os.environ.get("MEDCLI_DATA") or Path.home() / ".medmnist").expanduser()


def data_path(root: str | os.PathLike, flag: str, size: int) -> Path:
    return Path(root).expanduser() / filename(flag, size)


def record_path(npz_path: str | os.PathLike) -> Path:
    return Path(npz_path).with_suffix(".json")


def read_record(npz_path: str | os.PathLike) -> dict | None:
    import json

    path = record_path(npz_path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_record(npz_path: str | os.PathLike, record: dict) -> Path:
    """Save the record of the file at npz_path, and drop the uncompressed caches of its earlier
    contents (at 224 px, gigabytes nothing reads any more)."""
    written = fileio.write_json(record_path(npz_path), record)
    npzcache.drop_stale(npzcache.cache_path(npz_path, record["md5"]))
    return written


def keep_record(npz_path: str | os.PathLike, record: dict) -> None:
    """Write the record of a file medcli found in place, where its folder can be written: on a
    read-only root the file is still used, and hashed again next time."""
    try:
        write_record(npz_path, record)
    except MedcliError as exc:
        console.debug(f"dataset record not saved ({exc}); the file is hashed again next time")


def _npy_header(archive: zipfile.ZipFile, key: str, path: Path) -> tuple[tuple, np.dtype]:
    """(shape, dtype) of one array in an npz, read from its header without loading it; a member
    shorter than its header says (cut short inside an intact zip) is refused."""
    handle, shape, _, dtype = npzcache.open_member(archive, key)
    with handle:
        needed = handle.tell() + math.prod(shape) * dtype.itemsize
    if archive.getinfo(f"{key}.npy").file_size < needed:
        raise UsageError(f"{path}: {key} is cut short (its header promises {shape}); get a fresh copy of the file")
    return shape, dtype


def validate_npz(path: str | os.PathLike, flag: str, size: int) -> dict[str, int]:
    """Check a file is a usable MedMNIST npz for (flag, size); return split sizes.

    Checks: a readable zip whose members pass their CRC (streamed: a truncated or corrupted
    file is caught without holding it in memory), the six keys, uint8 images of size x size
    with the channel count INFO gives (from the array headers: the images of a 224-px file
    are gigabytes and are never loaded here), and labels of shape (N, 1) (multi-label:
    (N, labels)) with values inside the class range, with no split empty.
    """
    meta = info(flag)
    path = Path(path)
    channels = meta["n_channels"]
    columns, upper = task(flag).label_layout()
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give the npz file")
    if not path.is_file():
        raise UsageError(f"{path} is not a regular file; give the npz file" if path.exists() else f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
            missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in names]
            if missing:
                raise UsageError(f"{path} lacks the keys {', '.join(missing)}; it is not a MedMNIST npz")
            damaged = archive.testzip()
            if damaged is not None:
                raise UsageError(f"{path}: member {damaged} is corrupted (CRC mismatch); re-download the file")
            counts = {split: _check_split(archive, split, path, flag, size, channels, upper, columns)
                      for split in SPLITS}
    except _READ_ERRORS as exc:
        _reraise_bugs(exc)
        raise UsageError(f"{path} is not a readable npz file ({exc}); get a fresh copy of it") from None
    return counts


def _check_split(archive, split, path, flag, size, channels, upper, columns) -> int:
    shape, dtype = _npy_header(archive, f"{split}_images", path)
    if dtype != np.uint8:
        raise UsageError(f"{path}: {split}_images has dtype {dtype}, expected uint8")
    expected = (size, size) if channels == 1 else (size, size, channels)
    image_shape = shape[1:]
    if channels == 1 and image_shape == (size, size, 1):
        image_shape = (size, size)
    if len(shape) >= 1 and shape[0] == 0:
        raise UsageError(f"{path}: the {split} split has 0 images; a MedMNIST file has images in every split")
    if len(shape) < 3 or image_shape != expected:
        raise UsageError(
            f"{path}: {split}_images has shape {shape[1:]}, expected {expected} "
            f"for {flag} at {size} px ({channels} channel{'s' if channels > 1 else ''})"
        )
    with archive.open(f"{split}_labels.npy") as handle:
        labels = np.lib.format.read_array(handle, allow_pickle=False)
    if labels.ndim != 2 or labels.shape != (shape[0], columns):
        raise UsageError(f"{path}: {split}_labels has shape {labels.shape}, expected ({shape[0]}, {columns})")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UsageError(f"{path}: {split}_labels has dtype {labels.dtype}, expected integers")
    if labels.size and (labels.min() < 0 or labels.max() > upper):
        raise UsageError(f"{path}: {split}_labels has values {labels.min()}..{labels.max()}, expected 0..{upper}")
    return int(shape[0])


_MADE_BY_MAKE_RECORD = ("flag", "size", "file", "md5", "official_md5", "official", "source", "created", "n_samples",
                        "bytes", "mtime_ns", "inode", "device", "checks")


# What validate_npz checks; bumped whenever it checks more, so a record written by an older
# medcli (e.g. before the label-column check) sends its file through validate_npz again.
CHECKS = 3


def make_record(flag: str, size: int, npz: Path, md5: str, source: str, counts: dict, *,
                written: Path | None = None, **extra: Any) -> dict:
    """npz's record: what it holds, its md5, and the size and mtime that md5 belongs to.
    `written`: the temporary file about to be renamed to npz (a rename keeps them)."""
    from medcli.manifest import now_iso

    _, official_md5 = official_source(flag, size)
    stat = Path(written or npz).stat()
    return {
        "flag": flag,
        "size": size,
        "file": Path(npz).name,
        "md5": md5,
        "official_md5": official_md5,
        "official": md5 == official_md5,
        "synthetic": False,
        "source": source,
        "created": now_iso(),
        "n_samples": counts,
        "bytes": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "inode": stat.st_ino,
        "device": stat.st_dev,
        "checks": CHECKS,
        **extra,
    }


def record_of(path: Path, flag: str, size: int) -> dict | None:
    """path's JSON record when it is one medcli wrote for this flag and size."""
    record = read_record(path)
    if isinstance(record, dict) and record.get("flag") == flag and record.get("size") == size \
            and isinstance(record.get("md5"), str):
        return record
    return None


def unchanged(record: dict, path: Path) -> bool:
    """True when path has the size, mtime and inode its record's md5 was computed for (another
    file renamed over it has another inode, whatever its size and mtime). Inodes are a file
    system's own: a data root copied elsewhere with its records (`cp -a`, rsync) goes by size
    and mtime, as do records written before the inode was kept."""
    stat = path.stat()
    same_file = record.get("device") != stat.st_dev or record.get("inode") == stat.st_ino
    return record.get("bytes") == stat.st_size and record.get("mtime_ns") == stat.st_mtime_ns and same_file


def current_md5(path: Path, record: dict | None) -> str:
    """path's md5: the record's while the file is unchanged, else hashed (seconds per GB)."""
    if record is not None and unchanged(record, path):
        return record["md5"]
    return fileio.md5_file(path)


def provenance_kind(record: dict) -> str | None:
    """What a dataset record says its data is when it is not the official MedMNIST file:
    "synthetic" (demo data), "sample" (the embedded sample) or "unofficial" (any other file);
    None for the official file."""
    for kind in ("synthetic", "sample"):
        if record.get(kind):
            return kind
    return None if record.get("official", True) else "unofficial"


def provenance(record: dict) -> str | None:
    """The sentence every log line, figure, workbook and summary of a run says about its data
    when it is not the official file (None when it is)."""
    flag = record.get("flag", "?")
    return {"synthetic": f"SYNTHETIC data (a {flag} stand-in, not a real result)",
            "sample": f"embedded PBC sample (not the official {flag} file)",
            "unofficial": f"unofficial {flag} data (md5 {record.get('md5')})",
            None: None}[provenance_kind(record)]


def _missing(root: Path, flag: str, size: int) -> str:
    """Why (flag, size) is not under root, and the ways to get it: the stand-ins medcli keeps
    beside the real files (the embedded sample, synthetic data) that hold it, then download,
    --from, --sample and --synthetic."""
    if root.is_file():
        return f"--root {root} is a file; pass the folder that holds it (--root {root.parent})"
    stand_ins = [f"{root / sub} holds {what} (pass --root {root / sub})"
                 for sub, what in ((SAMPLE_DIR, "the embedded PBC sample that scripts/run_all.sh uses offline"),
                                   (SYNTHETIC_DIR, "SYNTHETIC stand-in data"))
                 if data_path(root / sub, flag, size).is_file()]
    others = [str(other) for other in SIZES if other != size and data_path(root, flag, other).is_file()]
    if others:
        stand_ins.append(f"it holds {flag} at {' and '.join(others)} px (pass --size {others[0]})")
    base = root.parent if root.name in (SAMPLE_DIR, SYNTHETIC_DIR) else root  # download places stand-ins below it
    ways = [f"'medcli download {flag} --size {size} --root {shlex.quote(str(base))}'"
            + ("" if base == root else f" (then train with --root {shlex.quote(str(base))})"),
            "--from FILE to import a copy you have"]
    if (flag, size) == SAMPLE_OF:
        ways.append("--sample for the embedded real sample")
    ways.append("--synthetic for a demo stand-in")
    return "; ".join([f"no {flag} at {size} px under {root}", *stand_ins, f"get it with {', '.join(ways)}"])


def resolve(root: str | os.PathLike, flag: str, size: int) -> tuple[Path, dict]:
    """Find a dataset file under root and return (path, record); a clear error if absent.

    The record is trusted only while the file keeps the size and mtime its md5 was computed
    for and its checks are the current ones (CHECKS). A file without a record (e.g. placed by the medmnist package) or changed since its
    record is validated and hashed again: a file with another md5 gets a new record (its
    `official` flag from that md5, with a warning), a file only touched keeps its record's
    facts. The record is then saved when the root is writable; on a read-only root the
    fresh record is used as it is.
    """
    info(flag)
    check_size(size)
    path = data_path(root, flag, size)
    if not path.is_file():
        raise UsageError(_missing(Path(root).expanduser(), flag, size))
    record = record_of(path, flag, size)
    if record is not None and unchanged(record, path) and record.get("checks") == CHECKS:
        return path, record
    counts = validate_npz(path, flag, size)
    md5 = current_md5(path, record)  # an unchanged file whose record predates CHECKS is not hashed again
    if record is not None and record["md5"] == md5:  # touched or copied, same content: keep its facts
        kept = {k: v for k, v in record.items() if k not in _MADE_BY_MAKE_RECORD}
        record = make_record(flag, size, path, md5, record.get("source", str(path)), counts, **kept)
    else:
        if record is not None:
            console.warn(f"{path} changed since its record (md5 {record['md5']} -> {md5}); recording it again "
                         f"({'official' if md5 == official_source(flag, size)[1] else 'not official'})")
        record = make_record(flag, size, path, md5, str(path.resolve()), counts)
    keep_record(path, record)
    return path, record


@dataclass
class Splits:
    """Images as uint8 arrays (N, H, W, C) and labels as int64 arrays (N,) or (N, k).

    Loaded for training (`load(..., mapped=...)`), the images are (N, H, W, C) views of
    arrays laid out (N, C, H, W), mapped from `cache` when it is set (copy-on-write: the pages
    stay the page cache's, shared by every process mapping them, unless written)."""

    images: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    record: dict
    path: Path
    cache: Path | None = None


def load(root: str | os.PathLike, flag: str, size: int, splits: Sequence[str] = SPLITS,
         mapped: bool | None = False, processes: int = 1) -> Splits:
    """The named splits of (flag, size) under root (the others are not read: PathMNIST's train
    split at 224 px is 13.5 GB).

    `mapped` (training): True maps the splits from the uncompressed cache (`npzcache`,
    written on first use; a cache that cannot be written is one warning, and the splits are
    read into memory), None lets `use_cache` decide for `processes` processes on this node.
    Either way the images come in the training layout, so `as_tensor` makes no second copy.
    False (the other commands) reads them into memory as they are in the file."""
    path, record = resolve(root, flag, size)
    kind = task(flag)
    training = mapped is not False
    if mapped is None:
        mapped = use_cache(record, splits, processes)
    images, labels, cache = {}, {}, None
    try:
        found = npzcache.mapped(path, record["md5"], splits, info(flag)["n_channels"], record) if mapped else None
        if found is not None:
            cache = npzcache.cache_path(path, record["md5"])
            for split, (array, raw) in found.items():
                images[split] = array.transpose(0, 2, 3, 1)
                labels[split] = kind.labels_from_file(raw.astype(np.int64))
        else:
            with zipfile.ZipFile(path) if training else np.load(path, allow_pickle=False) as archive:
                for split in splits:
                    if training:  # read chunk by chunk into (N, C, H, W): one copy, no transient second
                        images[split] = npzcache.read_nchw(archive, f"{split}_images").transpose(0, 2, 3, 1)
                        raw = npzcache.read_member(archive, f"{split}_labels")
                    else:
                        array = archive[f"{split}_images"]
                        images[split] = array[..., None] if array.ndim == 3 else array
                        raw = archive[f"{split}_labels"]
                    labels[split] = kind.labels_from_file(raw.astype(np.int64))
    except (KeyError, *_READ_ERRORS) as exc:
        _reraise_bugs(exc)
        raise UsageError(f"{path} cannot be read ({exc}); {_fresh_copy(path, flag, size)}") from None
    return Splits(images, labels, dict(record, path=str(path.resolve())), path, cache)


# What reading a damaged or unreadable npz raises; NotImplementedError and RuntimeError: a zip
# feature Python cannot read (Deflate64, an encrypted member; `_reraise_bugs`).
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, NotImplementedError, RuntimeError)


def _reraise_bugs(exc: Exception) -> None:
    """Re-raise a plain RuntimeError that is not zipfile's "encrypted" (its only one for a
    file): a bug, not the file."""
    if type(exc) is RuntimeError and "encrypted" not in str(exc):
        raise exc


def _fresh_copy(path: Path, flag: str, size: int) -> str:
    """How to put a good copy where the damaged dataset file `path` is, for the folder it is in."""
    return _put_back(path.resolve().parent, flag, size, {}, overwrite=True)


def restore_hint(record: dict, where: str | os.PathLike) -> str:
    """How to put back the missing dataset file a run's `record` describes, in the folder
    `where` it was (the recorded file's folder): written again (synthetic), placed again (the
    embedded sample), fetched (an official file), or restored by hand (an import)."""
    if record.get("official") is False and not record.get("synthetic") and not record.get("sample") \
            and Path(where).name not in (SYNTHETIC_DIR, SAMPLE_DIR):
        return "restore that file (it was imported, not downloaded: md5 " + str(record.get("md5")) + ")"
    return _put_back(Path(where), record.get("flag"), record.get("size"), record, overwrite=False)


def _put_back(folder: Path, flag, size, record: dict, overwrite: bool) -> str:
    """The download command that writes a dataset file into `folder` again: its synthetic
    stand-in, the embedded sample, or the official file."""
    if record.get("synthetic") or folder.name == SYNTHETIC_DIR:
        root = folder.parent if folder.name == SYNTHETIC_DIR else folder
        return (f"{'delete it and ' if overwrite else ''}write it again with 'medcli download {flag} --synthetic "
                f"--size {size} --root {shlex.quote(str(root))}'")  # the synthetic writer refuses to replace
    if record.get("sample") or (folder.name == SAMPLE_DIR and (flag, size) == SAMPLE_OF):
        return (f"place it again with 'medcli download {flag} --sample --root {shlex.quote(str(folder.parent))}"
                + (" --overwrite'" if overwrite else "'"))
    return (f"{'download it again' if overwrite else 'fetch it'} with 'medcli download {flag} --size {size} "
            f"--root {shlex.quote(str(folder))}" + (" --overwrite'" if overwrite else "'"))


def use_cache(record: dict, splits: Sequence[str], processes: int = 1) -> bool:
    """Whether training maps `splits` of the file `record` describes: MEDCLI_DATA_CACHE=always
    or never, else (auto) when the images `processes` processes on one node would each hold
    reach MAP_MIN_BYTES together (PathMNIST's train split at 224 px in any job; at 28 px only
    from 3 processes on)."""
    env = npzcache.CACHE_ENV
    choice = (os.environ.get(env) or "auto").strip().lower()
    if choice not in ("auto", "always", "never"):
        raise UsageError(f"{env}={os.environ[env]!r} is not one of auto, always, never")
    if choice != "auto":
        return choice == "always"
    counts = record.get("n_samples") or {}
    per_image = record["size"] ** 2 * info(record["flag"])["n_channels"]
    return sum(counts.get(split, 0) for split in splits) * per_image * max(1, processes) >= MAP_MIN_BYTES


def make_synthetic(
    path: str | os.PathLike,
    flag: str = "bloodmnist",
    size: int = 28,
    n_per_split: tuple[int, int, int] = (256, 64, 64),
    seed: int = 0,
) -> Path:
    """Write a small, learnable npz in the official layout for `flag`'s classes and channels.

    Each class draws oriented stripes (angle and colour tint depend on the class) inside a
    fixed central square; outside it there is only noise. The square is the known "evidence
    region" (recorded in the dataset record as `signal_box` = [y0, y1, x0, x1]). For a
    multi-label flag (ChestMNIST) every image has one label in turn plus each other label with
    probability 0.1, and shows the sum of its labels' stripes.
    """
    meta = info(flag)
    n_classes = len(meta["label"])
    channels = meta["n_channels"]
    kind = task(flag)
    rng = np.random.default_rng(seed)
    lo, hi = size // 4, size - size // 4
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    arrays = {}
    for split, n in zip(SPLITS, n_per_split):
        labels = np.arange(n) % n_classes
        rng.shuffle(labels)
        present = np.eye(n_classes, dtype=bool)[labels]
        if kind.several_per_image:
            present |= rng.random((n, n_classes)) < 0.1
        imgs = rng.normal(60, 20, size=(n, size, size, channels)).astype(np.float32)
        freq = 2 * np.pi / max(3.0, size / 7)
        for i in range(n):
            patch = np.zeros((size, size, channels))
            for k in np.flatnonzero(present[i]):
                angle = np.pi * k / n_classes
                wave = np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 2 * np.pi))
                tint = 0.6 + 0.4 * np.cos(2 * np.pi * (k / n_classes + np.arange(channels) / 3))
                patch += wave[..., None] * tint
            patch = 140 + 90 * patch / present[i].sum()
            imgs[i, lo:hi, lo:hi] = patch[lo:hi, lo:hi] + rng.normal(0, 10, size=(hi - lo, hi - lo, channels))
        images = np.clip(imgs, 0, 255).astype(np.uint8)
        if channels == 1:
            images = images[..., 0]
        arrays[f"{split}_labels"] = kind.encode(present).astype(np.uint8)
        arrays[f"{split}_images"] = images
    target = Path(path)
    with fileio.atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
        # the record first: a stop in between leaves a record of no file, never a synthetic
        # file without the record that says so (which would pass for real data)
        write_record(target, make_record(flag, size, target, fileio.md5_file(tmp), f"synthetic (seed {seed})",
                                         dict(zip(SPLITS, n_per_split)), written=tmp, synthetic=True,
                                         signal_box=[lo, hi, lo, hi]))
    return target


def as_view(images: np.ndarray):
    """(N, H, W, C) uint8 array -> an (N, C, H, W) tensor sharing its memory (no copy), for
    reading a batch at a time (`inference.predict_logits` makes each batch contiguous)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2)


def as_tensor(images: np.ndarray, device="cpu", pin: bool = False):
    """(N, H, W, C) uint8 array -> one contiguous (N, C, H, W) uint8 tensor on `device`, or
    with `pin` in page-locked host memory (written there directly: one host copy, not two;
    needs a GPU). The layout changes on the host, so the device never holds two copies.
    Images already laid out (N, C, H, W) underneath (`load(..., mapped=...)`) are not copied
    on the host at all: on the CPU the tensor shares their memory (a mapped cache's pages
    stay shared with the other processes), to a GPU they are copied straight from them."""
    import torch

    layout = images.transpose(0, 3, 1, 2)
    if layout.flags.c_contiguous:
        source = torch.from_numpy(layout)
        if pin:
            return torch.empty(source.shape, dtype=source.dtype, pin_memory=True).copy_(source)
        return source.to(device)
    source = torch.from_numpy(np.ascontiguousarray(images))
    if pin:
        n, h, w, c = source.shape
        return torch.empty((n, c, h, w), dtype=source.dtype, pin_memory=True).copy_(source.permute(0, 3, 1, 2))
    return source.permute(0, 3, 1, 2).contiguous().to(device)
