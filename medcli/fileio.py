"""Atomic file writes and hashing: the only way medcli puts a file at its final path.

Every writer goes through `atomic_path`: the content is written to a temporary file in the
same directory, flushed to disk, then renamed over the target. A crash at any point leaves
either the old file or the new one, never a half-written one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from medcli.errors import MedcliError, UsageError

try:
    import fcntl
except ImportError:  # Windows: no lock (a file open in its writer cannot be removed there anyway)
    fcntl = None

_UMASK = os.umask(0)  # read once: setting it to read it races with threads creating files
os.umask(_UMASK)
QUIET_PARTIAL_S = 60  # a temporary file untouched this long and unlocked is a killed writer's

__all__ = ["HashingWriter", "abandoned_partials", "atomic_path", "atomic_stream", "md5_file", "output_file",
           "output_folder", "partial_files", "sha256_file", "together", "write_bytes", "write_json", "write_text"]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically.

    The temporary file keeps the target's suffix (matplotlib and openpyxl pick the format
    from it). On any exception the temporary file is removed and `path` is untouched. The new
    file gets the mode of the one it replaces (else a plain open()'s). Where the file system
    allows, the writer holds a lock on the temporary file until it is renamed or removed, so a
    killed writer's file is told from a live one's (`abandoned_partials`).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=_temporary_prefix(target), suffix=".tmp" + target.suffix,
                                        dir=target.parent)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror or exc}; choose a writable location") from exc
    tmp = Path(tmp_name)
    try:
        if fcntl is None:  # a file still open cannot be renamed on Windows
            os.close(fd)
            fd = None
        else:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd closes, or when this process dies
            except OSError:  # a file system without locks (NFS without lockd): `abandoned_partials` goes by age
                pass
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        try:  # mkstemp made it private (0600); set now, so a read-only mode does not stop its writer
            mode = target.stat().st_mode & 0o7777
        except OSError:
            mode = 0o666 & ~_UMASK
        os.chmod(tmp, mode)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:  # disk full, read-only file system, I/O error...
        tmp.unlink(missing_ok=True)
        raise MedcliError(f"writing {target} failed ({exc.strerror or exc}); {_write_advice(exc, target)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def _write_advice(exc: OSError, target: Path) -> str:
    """What to do about a failed atomic write, by its cause."""
    import errno

    if exc.errno in (errno.EISDIR, errno.ENOTEMPTY) or target.is_dir():
        return "a folder stands there: move it away or choose another location"
    kept = "any previous version is unchanged: "
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return kept + "free some space or choose another location"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return kept + "choose a location you can write to"
    return kept + "choose another location"


class HashingWriter:
    """A binary file open for writing that hashes every byte on its way to disk, so a large
    file's hash costs no second read (`torch.save` and other writers take it as a file object)."""

    def __init__(self, handle: BinaryIO, digest: Any):
        self.handle = handle
        self.digest = digest
        self.error: OSError | None = None  # a failed write, which torch's writer reports as a RuntimeError

    def write(self, data) -> int:
        self.digest.update(data)
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()

    def hexdigest(self) -> str:
        return self.digest.hexdigest()


@contextmanager
def atomic_stream(path: str | os.PathLike, algorithm: str = "sha256") -> Iterator[HashingWriter]:
    """`atomic_path` for content written to a stream: yields a `HashingWriter` on the temporary
    file, whose `hexdigest()` after the block is the hash of the file now at `path`."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        writer = HashingWriter(handle, hashlib.new(algorithm))
        try:
            yield writer
        except RuntimeError as exc:  # "unexpected pos ..." from torch.save: the disk's own error says why
            if writer.error is None:
                raise
            raise writer.error from exc


def _temporary_prefix(target: Path) -> str:
    """".<name>." for `atomic_path`'s temporary files of `target`, the name cut where the whole
    temporary name (8 random characters and ".tmp<suffix>" follow) would pass the 255 bytes a
    file name may have."""
    room = 255 - len(os.fsencode(f"..{'x' * 8}.tmp{target.suffix}"))
    return f".{os.fsdecode(os.fsencode(target.name)[:room])}."  # the bytes kept as they are


def partial_files(path: str | os.PathLike) -> list[Path]:
    """The temporary files of `atomic_path` beside `path`: those of writers at work and those
    killed writers left (`abandoned_partials` tells them apart)."""
    target = Path(path)
    return sorted(target.parent.glob(f"{glob.escape(_temporary_prefix(target))}*.tmp{target.suffix}"))


def abandoned_partials(path: str | os.PathLike) -> list[Path]:
    """The temporary files beside `path` that no live process writes: unlocked (a killed
    writer's lock ended with it) and untouched for QUIET_PARTIAL_S (a lock taken on another
    host of a shared file system may not show here), so they can be removed."""
    quiet = time.time() - QUIET_PARTIAL_S
    return [partial for partial in partial_files(path) if not _being_written(partial) and _untouched_since(partial, quiet)]


def _untouched_since(partial: Path, moment: float) -> bool:
    try:
        return partial.stat().st_mtime < moment
    except OSError:
        return False


def _being_written(partial: Path) -> bool:
    if fcntl is None:
        return False  # Windows refuses to remove a file its writer holds open
    try:
        with open(partial, "rb") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # freed again when handle closes
    except FileNotFoundError:
        return False
    except OSError:  # BlockingIOError: its writer holds it; or it is not ours to read
        return True
    return False


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def output_folder(path: str | os.PathLike, names: Sequence[str]) -> Path:
    """The `--out DIR` a command writes the files `names` into: refused before any is written
    when it is a file, a folder stands where one of the files goes, or it cannot be written;
    the earlier files it will replace are named on stderr (never replaced unsaid)."""
    from medcli import console

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a directory for the files ({', '.join(names)})")
    folders = [name for name in names if (out / name).is_dir()]
    files = [str(parent.relative_to(out)) for name in names for parent in (out / name).parents
             if parent != out and parent.is_relative_to(out) and parent.exists() and not parent.is_dir()]
    if files:
        raise UsageError(f"--out {out} holds a file named {files[0]}, where a folder of its files goes; move it away "
                         "or choose another --out")
    if folders:
        raise UsageError(f"--out {out} holds {'a folder' if len(folders) == 1 else 'folders'} named "
                         f"{', '.join(folders)}, where the file{'s go' if len(folders) > 1 else ' goes'}; "
                         f"move {'it' if len(folders) == 1 else 'them'} away or choose another --out")
    output_file(out / names[0], "--out")  # a file on the way, or a folder that cannot be written
    earlier = [name for name in names if (out / name).exists()]
    if earlier:
        console.warn(f"replacing the earlier {', '.join(earlier)} in {out}")
    return out


@contextmanager
def together(out: Path) -> Iterator[Path]:
    """A hidden folder in `out` for a set of files that replace the earlier ones together: the
    files written into it (each atomically; in subfolders too) are moved to the same places in
    `out` only when the block ends without an error, by renames, which take no space; on any
    error none is moved and `out` holds the earlier set whole. The folder is removed either way."""
    import shutil

    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".medcli-writing-", dir=out))
    except OSError as exc:
        raise UsageError(f"cannot write into {out}: {exc.strerror or exc}; choose a writable location") from exc
    try:
        yield staging
        moved: list[Path] = []
        for file in sorted(path for path in staging.rglob("*") if path.is_file()):
            target = out / file.relative_to(staging)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(file, target)
            except OSError as exc:  # a folder or file put in the way since output_folder looked
                done = f" ({', '.join(str(p) for p in moved)} already replaced)" if moved else ""
                raise MedcliError(f"could not put {target} in place ({exc.strerror or exc}){done}; "
                                  f"{_write_advice(exc, target)}") from exc
            moved.append(target)
            _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """The `--out FILE` a command writes: refused up front, before any work, when it is a
    folder, a folder on its way is a file, or the folder it goes into cannot be written."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{option} {out} is a folder; give the file to write")
    blocker = next((parent for parent in out.parents if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UsageError(f"{option} {out}: {blocker} is a file, not a folder; choose another {option}")
    if blocker is not None and not os.access(blocker, os.W_OK | os.X_OK):  # a read-only file system, or permissions
        raise UsageError(f"{option} {out}: {blocker} is not writable; choose a writable location")
    return out


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    return _hash_file(path, hashlib.sha256(), chunk)


def md5_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    return _hash_file(path, hashlib.md5(), chunk)


def _hash_file(path, digest, chunk: int) -> str:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
