"""Run locking (one writer per run directory) and, later, clean-processes."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from medcli.errors import UsageError

LOCK_NAME = ".lock"


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on a run directory, or fail at once with a clear message."""
    from filelock import FileLock, Timeout

    path = Path(run_dir) / LOCK_NAME
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UsageError(
            f"run {run_dir} is in use by another medcli process; wait for it to finish "
            f"or end it with 'medcli clean-processes --yes'"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot lock run {run_dir}: {exc.strerror}; check the directory is writable") from exc
    try:
        yield
    finally:
        lock.release()
