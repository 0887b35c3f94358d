"""Image files a user brings (`medcli predict RUN PATH...`): paths expanded, files read and
converted to a dataset's channels and size, the way MedMNIST built its own images.

- `expand(paths)`: files (any suffix), folders (walked recursively, image suffixes only,
  hidden entries skipped, a stable order by path parts) and glob patterns -> files, each once.
- `read(path, target)`: every image in one file as (name, uint8 (size, size, channels)).
- `batches(paths, target, batch)`: the same, streamed in batches with per-file failures; a
  file that fails never stops the others (a missing optional package, as pydicom, does).

Conversions, and why:

- Bit depth. 16- and 32-bit integer images are scaled by the full range of their type
  (uint16: x * 255 / 65535, rounded). A 32-bit image (mode 'I') whose values fit 16 bits
  (0..65535, or -32768..32767) is 16-bit data, as PNG and a TIFF saved from an int32 array
  hold it: it is scaled as such. A fixed scale, never a per-image min..max stretch, keeps
  intensities comparable between files: a dark image stays dark, as it would in the
  dataset. Float images ('F') are taken as values in [0, 1]: x * 255, clipped to 0..255.
- DICOM stores raw detector or Hounsfield values and no 8-bit display range except its
  window: the modality LUT (rescale) and VOI LUT / window are applied, and a window's own
  output range maps to 0..255; with no window the min..max of the file's values (all its
  frames together) maps to 0..255. MONOCHROME1 is inverted so that bright means dense.
- Channels. For a one-channel dataset, RGB becomes grayscale through PIL's convert("L")
  (ITU-R 601-2 luma); for a three-channel dataset, grayscale is repeated into 3 channels.
  Alpha is dropped (ignored, not composited); palette images become RGB first.
- Orientation. A frame is turned as its EXIF Orientation tag says (phones store photos
  unturned and tag them); of an MPO file (a phone JPEG with preview or depth frames after
  the photo) only the first frame is read.
- Size. A non-square image is centre-cropped to a square (its shorter side), then resized
  to the dataset's side with PIL's BICUBIC resampling: how MedMNIST built its images from
  the sources (the PBC-derived BloodMNIST too). An image already at the dataset's size and
  channels is passed on byte-identical.

The first time each kind of conversion happens in a process, one `console.info` line says
so (`reset_notes()` forgets them, for tests).
"""

from __future__ import annotations

import glob
import os
import struct
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps

from medcli import console
from medcli.errors import EXIT_FAILURE, UsageError

__all__ = ["ARRAY_SUFFIXES", "BadFile", "DICOM_SUFFIXES", "PIL_SUFFIXES", "SUFFIXES", "Target", "batches", "expand",
           "read", "reset_notes"]

PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ARRAY_SUFFIXES = (".npy", ".npz")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUFFIXES = PIL_SUFFIXES + ARRAY_SUFFIXES + DICOM_SUFFIXES

_GLOB_CHARS = "*?["
_SPLIT_ORDER = ("train_images", "val_images", "test_images")
_CHUNK = 256  # images read from an array file at a time
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError)
_ORIENTATION = 0x0112  # the EXIF Orientation tag
_NPY_LAYOUTS = "(N, H, W), (N, H, W, C), (H, W) or (H, W, C) with C 1 or 3 (2 or 4: with alpha, dropped)"
_MIN_WIDTH = 8  # px: a 3-D array whose last axis is shorter (and more than 4) is no stack of (N, H, W) images

_notes: set[str] = set()


class BadFile(UsageError):
    """One file that cannot be read as images: `path` and a one-line `reason`. `missing_extra`:
    the file is fine but an optional package is missing (exit code 1, not bad input)."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, missing_extra: bool = False):
        self.path = None if path is None else str(path)
        self.reason = _one_line(message)
        self.missing_extra = missing_extra
        if missing_extra:
            self.exit_code = EXIT_FAILURE
        super().__init__(self.reason if self.path is None else f"{self.path}: {self.reason}")


@dataclass(frozen=True)
class Target:
    """What a dataset's images look like: side `size` (e.g. 28) and `channels` (1 or 3)."""

    size: int
    channels: int

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 1:
            raise UsageError(f"image size {self.size!r} is not a positive integer; give a MedMNIST size such as 28")
        if self.channels not in (1, 3):
            raise UsageError(f"{self.channels!r} channels: a dataset's images have 1 or 3 channels")


def reset_notes() -> None:
    """Forget which conversions were announced (each is said once per process)."""
    _notes.clear()


def _note(key: str, message: str) -> None:
    if key not in _notes:
        _notes.add(key)
        console.info(message)


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _why(exc: BaseException) -> str:
    return _one_line(exc) or type(exc).__name__


def _to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """`values` clipped to low..high, mapped linearly to 0..255 and rounded."""
    return np.rint((np.clip(values, low, high) - low) * 255.0 / (high - low)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Paths


def _walk(folder: Path) -> list[Path]:
    """Readable files under `folder`, sorted by their path parts: those of a known suffix, and
    DICOM files without one (as scanners export a series); hidden entries skipped; linked
    folders followed, each folder once. One line says what else was left out."""
    found, seen, left_out = [], set(), {}
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or a second link to one folder
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # a folder reached twice: by the first name
        for name in files:
            path, suffix = Path(root) / name, Path(name).suffix.lower()
            if name.startswith("."):
                continue
            if suffix in SUFFIXES or (not suffix and _is_dicom(path)):
                found.append(path)
            else:
                left_out[suffix or "no suffix"] = left_out.get(suffix or "no suffix", 0) + 1
    if left_out:
        console.info(f"{folder}: left out {console.plural(sum(left_out.values()), 'file')} of other types ("
                     + ", ".join(f"{count} {kind}" for kind, count in sorted(left_out.items()))
                     + f"); medcli reads {' '.join(SUFFIXES)} and DICOM")
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def expand(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, folders and glob patterns -> the files to read, in argument order, each once.

    A file is taken whatever its suffix (a bad one fails when read); a folder is walked as in
    the module docstring; a missing path holding one of `*?[` is a glob pattern (recursive
    `**`). A missing path, a pattern matching nothing or a folder without images is a
    UsageError. A file given twice is read once (the first time), with one warning.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for arg in paths:
        path = Path(os.path.expanduser(str(arg)))
        if path.is_dir():
            found = _walk(path)
            if not found:
                raise UsageError(f"{path}: no image files ({' '.join(SUFFIXES)}) in this folder or below; "
                                 "give another folder or the files themselves")
            files += found
        elif path.exists():
            files.append(path)
        elif any(ch in str(arg) for ch in _GLOB_CHARS):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise UsageError(f"no file matches {arg}; check the pattern (quote it to let medcli expand it)")
            for match in map(Path, matches):
                files += _walk(match) if match.is_dir() else [match]
            if not files:
                raise UsageError(f"{arg} matches only folders without image files; give another pattern")
        else:
            raise UsageError(f"{arg}: no such file or folder; check the path")
    unique: dict[Path, Path] = {}  # resolved -> the first path given for it
    twice = [path for path in files if unique.setdefault(path.resolve(), path) is not path]
    if twice:
        console.warn(f"{console.plural(len(twice), 'file')} given more than once (e.g. {twice[0]}); "
                     "each is read once")
    return list(unique.values())


# ---------------------------------------------------------------------------------------------
# One image -> the dataset's channels and size


def _to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> 'L' or 'RGB' (8 bits), alpha dropped, palettes expanded."""
    mode = img.mode
    if mode in ("L", "RGB"):
        return img
    if mode in ("1", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("L" if mode == "1" else "RGB")
    if mode in ("P", "PA"):
        _note("palette", "converting palette images to RGB")
        if mode == "P" and "transparency" not in img.info:
            return img.convert("RGB")
    if mode in ("P", "PA", "RGBA", "RGBa", "LA", "La"):
        _note("alpha", "dropping the alpha channel (transparency is ignored, not composited)")
        if mode.startswith("P"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return img.convert("RGBA").convert("RGB")
        return img.convert("L" if mode.startswith("L") else "RGB")  # PIL drops alpha, no compositing
    if mode.startswith("I;16") or mode.startswith("I;32") or mode == "I":
        return Image.fromarray(_scale_integers(img, path), "L")
    if mode == "F":
        _note("float", "float images: values taken as 0..1 (x 255, clipped to 0..255)")
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        return Image.fromarray(_to_uint8(values, 0.0, 1.0), "L")
    raise BadFile(f"unsupported image mode {mode}; save it as 8- or 16-bit grayscale or RGB", path=path)


def _integer_range(img: Image.Image, values: np.ndarray) -> tuple[int, int, int, int]:
    """(low, high, bits, declared bits) of an integer image: the full range of its type, its
    dtype, or for mode 'I' (int32 in memory) what the file declares (TIFF BitsPerSample /
    SampleFormat). Mode 'I' declaring nothing (PNG and others) or 32 bits is 16-bit data
    when its values fit 16 bits (0..65535, else -32768..32767): a 16-bit image saved from an
    int32 array would be a flat grey by the int32 range."""
    if img.mode != "I":
        info = np.iinfo(values.dtype)
        return int(info.min), int(info.max), info.bits, info.bits
    declared, signed = _declared(img)
    if declared in (None, 32):
        low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if 0 <= low and high <= 65535:
            return 0, 65535, 16, declared or 16
        if -32768 <= low and high <= 32767:
            return -32768, 32767, 16, declared or 16
        signed = signed if declared else low < 0
    bits = declared or 32
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, bits, bits
    return 0, 2**bits - 1, bits, bits


def _declared(img: Image.Image) -> tuple[int | None, bool]:
    """(bits per sample, signed) a TIFF declares (BitsPerSample, SampleFormat); (None, False)
    for a file that declares nothing."""
    tags = getattr(img, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    signed = (tags.get(339) if tags is not None else None) in (2, (2,))
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    return (int(bits) if bits else None), signed


def _scale_integers(img: Image.Image, path: Path) -> np.ndarray:
    try:
        values = np.asarray(img)
    except (TypeError, ValueError):
        img = img.convert("I")
        values = np.asarray(img)
    if values.ndim != 2 or values.dtype.kind not in "iu":
        raise BadFile(f"unsupported image mode {img.mode} (array {values.dtype} {values.shape})", path=path)
    if img.mode == "I" and values.dtype == np.int32 and _declared(img) == (32, False):
        values = values.view(np.uint32)  # PIL holds unsigned 32-bit data as int32: 2**31 and above wrapped
    low, high, bits, declared = _integer_range(img, values)
    what = (f"{bits}-bit images" if declared == bits
            else f"{declared}-bit images whose values fit {bits} bits (as {bits}-bit data)")
    _note(f"bits{declared}-{bits}", f"scaling {what} to 8 bits by the full range of the type "
                                    f"({low}..{high} -> 0..255), the same for every file, never stretched per image")
    if values.size and int(values.max()) - int(values.min()) < (high - low) / 16 and "flat" not in _notes:
        _notes.add("flat")  # 12-bit data in 16 bits, 8-bit data in 32: once, with the first such file
        console.warn(f"{path}: its values span {int(values.min())}..{int(values.max())} of the {low}..{high} its "
                     "type allows: it reads as a nearly flat image (others like it are not named); save such "
                     "images as 8-bit, or scaled to their type")
    return _to_uint8(values.astype(np.float64), low, high)


def _fit(img: Image.Image, target: Target, path: Path) -> np.ndarray:
    """A PIL image -> uint8 (size, size, channels): 8 bits, channels, centre crop, bicubic resize."""
    img = _to_8bit(img, path)
    if target.channels == 1 and img.mode == "RGB":
        _note("gray", "converting RGB images to grayscale (ITU-R 601-2 luma), as the dataset has one channel")
        img = img.convert("L")
    width, height = img.size
    if width == 0 or height == 0:
        raise BadFile(f"the image is empty ({width}x{height} px)", path=path)
    if (width, height) != (target.size, target.size):
        _note("geometry", f"fitting images to {target.size}x{target.size} px the way MedMNIST built its "
                          "images: a centre crop to a square, then a bicubic resize (PIL BICUBIC)")
        side = min(width, height)
        if width != height:
            left, top = (width - side) // 2, (height - side) // 2
            img = img.crop((left, top, left + side, top + side))
        if side != target.size:
            img = img.resize((target.size, target.size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    if target.channels == 3 and array.shape[2] == 1:
        _note("rgb", "repeating grayscale images into 3 channels, as the dataset has three")
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _fit_array(image: np.ndarray, target: Target, path: Path) -> np.ndarray:
    """One uint8 (H, W) or (H, W, C) array image -> (size, size, channels); as is when it fits."""
    if image.ndim == 2:
        image = image[:, :, None]
    if image.shape[2] in (2, 4):  # gray or RGB with alpha, as a PNG's alpha: dropped
        _note("alpha", "dropping the alpha channel (transparency is ignored, not composited)")
        image = image[:, :, :-1]
    if image.shape == (target.size, target.size, target.channels):
        return np.array(image, dtype=np.uint8)  # a copy: the source may be a memory map
    image = np.ascontiguousarray(image[:, :, 0] if image.shape[2] == 1 else image)
    return _fit(Image.fromarray(image, "L" if image.ndim == 2 else "RGB"), target, path)


# ---------------------------------------------------------------------------------------------
# Files


def _frame_name(path: Path, i: int, frames: int) -> str:
    return str(path) if frames == 1 else f"{path}[frame {i}]"


def _upright(img: Image.Image) -> Image.Image:
    """A frame turned as its EXIF Orientation tag says (phones store photos unturned)."""
    if img.getexif().get(_ORIENTATION, 1) not in range(2, 9):
        return img
    _note("exif", "turning images by their EXIF orientation tag, as viewers show them")
    return ImageOps.exif_transpose(img)


def _unreadable(exc: OSError, path: Path) -> BadFile:
    return BadFile(f"cannot read it ({exc.strerror or _why(exc)})", path=path)


def _read_pil(path: Path, target: Target) -> list[tuple[str, np.ndarray]]:
    out = []
    saved = ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated file must fail, whatever another library set
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                frames = getattr(img, "n_frames", 1)
                if img.format == "MPO" and frames > 1:
                    _note("mpo", "MPO files (phone JPEGs with preview or depth frames): reading the first frame, "
                                 "the photo")
                    frames = 1
                for i in range(frames):
                    img.seek(i)
                    img.load()
                    out.append((_frame_name(path, i, frames), _fit(_upright(img), target, path)))
    except Image.UnidentifiedImageError:
        raise BadFile("not an image file PIL can read (PNG, JPEG, TIFF, BMP, ...)", path=path) from None
    except Image.DecompressionBombError:
        raise BadFile(f"the image is larger than Pillow's safety limit ({2 * Image.MAX_IMAGE_PIXELS} pixels); "
                      "downscale it first", path=path) from None
    except BadFile:
        raise
    except _PIL_ERRORS as exc:
        if isinstance(exc, OSError) and exc.errno is not None:  # from the system (permission, I/O), not the decoder
            raise _unreadable(exc, path) from None
        raise BadFile(f"truncated or damaged image ({_why(exc)})", path=path) from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return out


def _layout(shape: tuple, path: Path, key: str | None = None, dtype: np.dtype | None = None) -> bool:
    """Whether an array of `shape` is a stack (N, H, W[, C]) rather than one image; raises on
    a shape that is neither, or on a `dtype` given that is not uint8."""
    if dtype is not None and dtype != np.uint8:
        raise BadFile(f"{key + ': ' if key else ''}expected uint8 images (MedMNIST layout), got {dtype}", path=path)
    where = f"{key} has" if key else "array of"
    if len(shape) == 2:
        stack = False
    elif len(shape) == 3:
        stack = shape[2] not in (1, 2, 3, 4)  # 2 and 4: gray or RGB with alpha
        if stack and shape[2] < _MIN_WIDTH:  # (64, 64, 6) is no stack of 64 strips
            raise BadFile(f"{where} shape {tuple(shape)}: a last axis of {shape[2]} is neither an image's channels "
                          f"(1 to 4) nor the width of a stack's images (at least {_MIN_WIDTH} px)", path=path)
        where_ = f"{path}{':' + key if key else ''}"
        if stack and shape[0] in (1, 3) and shape[1] == shape[2] and f"chw {where_}" not in _notes:
            _notes.add(f"chw {where_}")  # once per array: an npz's arrays are laid out twice
            console.warn(f"{where_}: shape {tuple(shape)} read as {shape[0]} grayscale image(s); a channel-first "
                         f"image must be saved as (H, W, {shape[0]})")
    elif len(shape) == 4 and shape[3] in (1, 2, 3, 4):
        stack = True
    else:
        raise BadFile(f"{where} shape {tuple(shape)}: expected {_NPY_LAYOUTS} (MedMNIST layout)", path=path)
    image_shape = shape[1:3] if stack else shape[:2]
    if (stack and shape[0] == 0) or 0 in image_shape:
        raise BadFile(f"{where} shape {tuple(shape)}: no images in it", path=path)
    return stack


def _read_npy(path: Path, target: Target) -> Iterator[tuple[str, np.ndarray]]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise BadFile(f"not a readable .npy array ({_one_line(exc)})", path=path) from None
    if not isinstance(array, np.ndarray):
        raise BadFile("not a .npy array", path=path)
    return _array_images(array, _layout(array.shape, path, dtype=array.dtype), str(path), target, path)


def _array_images(array, stack: bool, prefix: str, target: Target, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    if not stack:
        yield prefix, _fit_array(np.asarray(array), target, path)
        return
    for start in range(0, array.shape[0], _CHUNK):
        chunk = np.asarray(array[start:start + _CHUNK])
        for i, image in enumerate(chunk, start):
            yield f"{prefix}[{i}]", _fit_array(image, target, path)


def _npy_header(handle) -> tuple:
    """(shape, fortran_order, dtype) of an .npy stream, read up to its data."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    return (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(handle)


def _npz_keys(archive: zipfile.ZipFile, path: Path) -> list[tuple[str, tuple, bool]]:
    """The image arrays of an npz: (key, shape, is a stack), checked before any is read."""
    keys = [name[:-4] for name in archive.namelist() if name.endswith(".npy")]
    headers = {}
    for key in keys:
        try:
            with archive.open(f"{key}.npy") as handle:
                headers[key] = _npy_header(handle)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            headers[key] = exc
    named = [k for k in _SPLIT_ORDER if k in keys] + sorted(k for k in keys if k.endswith("_images")
                                                            and k not in _SPLIT_ORDER)
    if not named:  # no MedMNIST keys: every array shaped like images; one (H, W) image only without them
        for dims in ((3, 4), (2,)):
            for key in sorted(keys):
                header = headers[key]
                if isinstance(header, tuple) and len(header[0]) in dims and (dims != (2,) or header[2] == np.uint8):
                    try:
                        _layout(header[0], path, key)
                    except BadFile:
                        continue
                    named.append(key)
            if named:
                break
        if not named:
            raise BadFile(f"no image arrays among its keys ({', '.join(sorted(keys)) or 'none'}); "
                          f"expected train_images / val_images / test_images or {_NPY_LAYOUTS}", path=path)
    chosen = []
    for key in named:
        header = headers[key]
        if not isinstance(header, tuple):
            raise BadFile(f"{key} is not a readable array ({_one_line(header)})", path=path)
        chosen.append((key, header[0], _layout(header[0], path, key, header[2])))
    return chosen


def _read_npz(path: Path, target: Target) -> Iterator[tuple[str, np.ndarray]]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise BadFile(f"not a readable .npz file ({_one_line(exc)})", path=path) from None
    try:
        return _npz_images(archive, _npz_keys(archive, path), target, path)
    except BaseException as exc:
        archive.close()
        if isinstance(exc, (zipfile.BadZipFile, OSError, EOFError)):
            raise BadFile(f"not a readable .npz file ({_one_line(exc)})", path=path) from None
        raise


def _npz_images(archive: zipfile.ZipFile, chosen, target: Target, path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Streams each chosen array from the zip, _CHUNK images at a time (a 224-px split is
    gigabytes: it is never held whole)."""
    with archive:
        for key, shape, stack in chosen:
            prefix = f"{path}:{key}"
            try:
                with archive.open(f"{key}.npy") as handle:
                    if _npy_header(handle)[1] or not stack:  # Fortran order or one image: read whole
                        handle.seek(0)
                        array = np.lib.format.read_array(handle, allow_pickle=False)
                        yield from _array_images(array, stack, prefix, target, path)
                        continue
                    per_image = int(np.prod(shape[1:]))
                    for start in range(0, shape[0], _CHUNK):
                        count = min(_CHUNK, shape[0] - start)
                        data = handle.read(count * per_image)
                        if len(data) != count * per_image:
                            raise BadFile(f"{key} is truncated after {start + len(data) // per_image} of "
                                          f"{shape[0]} images", path=path)
                        chunk = np.frombuffer(data, dtype=np.uint8).reshape((count,) + tuple(shape[1:]))
                        for i, image in enumerate(chunk, start):
                            yield f"{prefix}[{i}]", _fit_array(image, target, path)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error) as exc:
                raise BadFile(f"{key} is damaged ({_one_line(exc)}); re-create the file", path=path) from None


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _read_dicom(path: Path, target: Target) -> list[tuple[str, np.ndarray]]:
    try:
        import pydicom
    except ImportError:
        raise BadFile("reading DICOM needs pydicom: pip install 'medcli[dicom]'", path=path,
                      missing_extra=True) from None
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds (InvalidDicomError, AttributeError, RuntimeError...)
        raise BadFile(f"not a readable DICOM image ({_why(exc)})", path=path) from None
    try:
        return _dicom_images(ds, pixels, path, target)
    except BadFile:
        raise
    except Exception as exc:  # a window, LUT or layout pydicom refuses: this file fails, not the batch
        raise BadFile(f"DICOM image not supported ({_why(exc)})", path=path) from None


def _dicom_images(ds, pixels: np.ndarray, path: Path, target: Target) -> list[tuple[str, np.ndarray]]:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":  # indices into the file's colour table (ultrasound): RGB
        try:
            from pydicom.pixels import apply_color_lut  # pydicom >= 3
        except ImportError:
            from pydicom.pixel_data_handlers.util import apply_color_lut  # pydicom 2
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        pixels = _to_uint8(np.asarray(apply_color_lut(pixels, ds), dtype=np.float64), 0, 2 ** bits - 1)
        samples = 3
    if frames == 1:
        pixels = pixels[None]
    if pixels.ndim != (4 if samples == 3 else 3) or 0 in pixels.shape:
        raise BadFile(f"unsupported DICOM pixel layout {pixels.shape} ({samples} samples per pixel)", path=path)
    if samples == 3:
        if pixels.dtype != np.uint8:
            pixels = _to_uint8(pixels.astype(np.float64), 0, 2 ** int(ds.get("BitsStored", 8)) - 1)
        images = [Image.fromarray(np.ascontiguousarray(frame), "RGB") for frame in pixels]
    else:
        images = [Image.fromarray(frame, "L") for frame in _dicom_gray(ds, pixels, photometric)]
        _note("dicom", "DICOM: modality LUT and window applied, the window's range (else the file's "
                       "min..max) scaled to 0..255")
    return [(_frame_name(path, i, frames), _fit(img, target, path)) for i, img in enumerate(images)]


def _dicom_gray(ds, pixels: np.ndarray, photometric: str) -> np.ndarray:
    """Stored grayscale values (frames, H, W) -> uint8 display values."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut  # pydicom >= 3
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut  # pydicom 2
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    windowed = "WindowCenter" in ds and "WindowWidth" in ds and not ds.get("VOILUTSequence")
    if windowed or ds.get("VOILUTSequence"):
        values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if windowed:  # the window's output range (what a viewer shows as black..white)
        ends = np.asarray(apply_voi_lut(np.array([-1e300, 1e300]), ds), dtype=np.float64)
        low, high = float(ends.min()), float(ends.max())
    else:
        low, high = float(values.min()), float(values.max())
    out = _to_uint8(values, low, high) if high > low else np.zeros(values.shape, np.uint8)
    if photometric == "MONOCHROME1":  # 0 is white
        out = 255 - out
    return out


def _images(path: Path, target: Target) -> Iterator[tuple[str, np.ndarray]]:
    """The images of one file, lazily for arrays. Whatever makes the whole file unusable is
    raised here, before the first image (a damaged array member may still fail midway)."""
    path = Path(path)
    try:
        if path.is_dir():
            raise BadFile("is a folder; give the folder itself to expand() or its files", path=path)
        size = path.stat().st_size
    except OSError as exc:
        raise _unreadable(exc, path) from None
    if size == 0:
        raise BadFile("empty file (0 bytes)", path=path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _read_npy(path, target)
    if suffix == ".npz":
        return _read_npz(path, target)
    if _is_dicom(path):
        return iter(_read_dicom(path, target))
    return iter(_read_pil(path, target))


def read(path: str | os.PathLike, target: Target) -> list[tuple[str, np.ndarray]]:
    """Every image in one file as (name, uint8 array (size, size, channels)).

    name: the path for a one-image file, `path[frame i]` for each frame of a multi-frame
    TIFF or DICOM, `path[i]` for a .npy stack, `path:key[i]` for an .npz. Raises BadFile with a
    one-line reason for a file that is unreadable, empty, truncated, not an image, or laid out
    in a way medcli does not read.
    """
    return list(_images(Path(path), target))


def batches(paths: Sequence[str | os.PathLike], target: Target, batch: int
            ) -> Iterator[tuple[list[str], np.ndarray, list[tuple[str, str]]]]:
    """Reads `paths` lazily: yields (names, uint8 (n, size, size, channels), failures) with
    1..`batch` images (the last yield may hold none, only failures); failures are (path, one-line
    reason) for the files that failed since the previous yield. A big array file spreads over
    several yields; a file that fails never stops the others. A missing optional package
    (BadFile.missing_extra) is raised: no file of its kind could be read."""
    if batch < 1:
        raise UsageError(f"batch size {batch} must be at least 1")
    names: list[str] = []
    arrays: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []

    def flush():
        stacked = np.stack(arrays) if arrays else np.empty((0, target.size, target.size, target.channels), np.uint8)
        out = (list(names), stacked, list(failures))
        names.clear(), arrays.clear(), failures.clear()
        return out

    for path in paths:
        try:
            for name, image in _images(Path(path), target):
                names.append(name)
                arrays.append(image)
                if len(names) == batch:
                    yield flush()
        except BadFile as exc:
            if exc.missing_extra:
                raise
            failures.append((str(path), exc.reason))
    if names or failures:
        yield flush()
