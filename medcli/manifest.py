"""The run manifest (`manifest.json`): the only contract between medcli commands.

A run directory holds one manifest. It records the schema version, the medcli version, the
resolved config, the environment, the dataset record and one entry per stage (train,
evaluate, explain) with its status, times and artefacts. Artefact paths are relative to the
run directory, each with its sha256, so a run can be moved or copied.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from medcli import __version__, fileio
from medcli.errors import Interrupted, UsageError

SCHEMA_VERSION = 1
FILENAME = "manifest.json"
STATUSES = ("running", "completed", "failed", "interrupted")
_REQUIRED = ("schema_version", "medcli_version", "created", "run_id", "config", "dataset", "stages")


def now_iso() -> str:
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


def environment(device: str | None = None, seed: int | None = None, deterministic: bool = False) -> dict:
    """Facts about where a stage ran (torch is imported here, never at CLI start)."""
    import torch

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "device_name": None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "deterministic": deterministic,
        "argv": sys.argv,
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def create_run_dir(runs_root: str | os.PathLike, name: str) -> Path:
    """Make a brand-new run directory; never reuse one (a numeric suffix is added instead)."""
    root = Path(runs_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create runs directory {root}: {exc.strerror}; pass a writable --runs-dir") from exc
    for attempt in range(1000):
        candidate = root / (name if attempt == 0 else f"{name}-{attempt + 1}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot create run directory {candidate}: {exc.strerror}; pass a writable --runs-dir") from exc
        return candidate
    raise UsageError(f"too many runs named {name} under {root}")


class Manifest:
    """A loaded (or new) manifest bound to its run directory."""

    def __init__(self, run_dir: Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data

    # -- creation and loading -------------------------------------------------------------
    @classmethod
    def new(cls, run_dir: str | os.PathLike, *, config: dict, dataset: dict, **sections: Any) -> "Manifest":
        run_dir = Path(run_dir)
        data = {
            "schema_version": SCHEMA_VERSION,
            "medcli_version": __version__,
            "created": now_iso(),
            "run_id": run_dir.name,
            "config": config,
            "dataset": dataset,
            **sections,
            "stages": {},
        }
        manifest = cls(run_dir, data)
        manifest.save()
        return manifest

    @classmethod
    def load(cls, run: str | os.PathLike) -> "Manifest":
        """Load and validate; every problem becomes a one-line UsageError naming the fix."""
        path = Path(run)
        if path.name == FILENAME and path.is_file():
            path = path.parent
        if not path.exists():
            raise UsageError(f"run directory {path} does not exist; pass a directory printed by 'medcli train'")
        if not path.is_dir():
            raise UsageError(f"{path} is not a run directory; pass a directory printed by 'medcli train'")
        file = path / FILENAME
        if not file.is_file():
            raise UsageError(f"{path} has no {FILENAME}: not a medcli run; pass a directory printed by 'medcli train'")
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UsageError(f"{file} is not valid JSON ({exc}); restore it from a copy or re-run the stage") from exc
        except OSError as exc:
            raise UsageError(f"cannot read {file}: {exc.strerror}") from exc
        validate(data, file)
        return cls(path, data)

    def save(self) -> Path:
        return fileio.write_json(self.run_dir / FILENAME, self.data)

    # -- accessors ------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def dataset(self) -> dict:
        return self.data["dataset"]

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def stage_status(self, name: str) -> str | None:
        return self.stages.get(name, {}).get("status")

    def path(self, relative: str | os.PathLike) -> Path:
        return self.run_dir / relative

    def relative(self, path: str | os.PathLike) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.run_dir.resolve())).as_posix()

    def require_completed(self, name: str, hint: str) -> dict:
        stage = self.stages.get(name)
        if not stage or stage.get("status") != "completed":
            state = stage.get("status") if stage else "not run"
            raise UsageError(f"run {self.run_dir} has no completed {name} stage ({state}); {hint}")
        return stage

    # -- stages ---------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, lock: bool = True) -> Iterator["StageRecord"]:
        """Run a stage: lock the run, mark it running, and record how it ended.

        Completed on normal exit; interrupted on Ctrl-C/SIGTERM; failed on any other error
        (the exception is re-raised after the manifest is saved).
        """
        from medcli.processes import run_lock

        with run_lock(self.run_dir) if lock else nullcontext():
            entry = self.stages.setdefault(name, {})
            entry.update(status="running", started=now_iso(), ended=None, duration_s=None, error=None,
                         pid=os.getpid())
            entry.setdefault("artefacts", {})
            entry.setdefault("summary", {})
            self.save()
            record = StageRecord(self, entry)
            start = time.perf_counter()
            try:
                yield record
            except (KeyboardInterrupt, Interrupted):
                self._end(entry, "interrupted", start, "interrupted by the user")
                raise
            except BaseException as exc:
                self._end(entry, "failed", start, str(exc) or type(exc).__name__)
                raise
            self._end(entry, "completed", start, None)

    def _end(self, entry: dict, status: str, start: float, error: str | None) -> None:
        entry.update(status=status, ended=now_iso(), duration_s=round(time.perf_counter() - start, 3), error=error)
        entry.pop("pid", None)
        self.save()

    def mark_interrupted(self, reason: str) -> bool:
        """Mark every running stage interrupted (used when another process is ended)."""
        changed = False
        for entry in self.stages.values():
            if entry.get("status") == "running":
                entry.update(status="interrupted", ended=now_iso(), error=reason)
                entry.pop("pid", None)
                changed = True
        if changed:
            self.save()
        return changed


class StageRecord:
    """Handle given to a running stage to register artefacts and a summary."""

    def __init__(self, manifest: Manifest, entry: dict):
        self.manifest = manifest
        self.entry = entry

    @property
    def summary(self) -> dict:
        return self.entry["summary"]

    def add(self, *paths: str | os.PathLike, save: bool = True) -> None:
        """Record artefacts (relative path -> sha256). Call after the file is in place."""
        for path in paths:
            rel = self.manifest.relative(path)
            self.entry["artefacts"][rel] = fileio.sha256_file(self.manifest.run_dir / rel)
        if save:
            self.manifest.save()

    def save(self) -> None:
        self.manifest.save()


def validate(data: Any, source: Path | str = "manifest") -> None:
    if not isinstance(data, dict):
        raise UsageError(f"{source} is not a medcli manifest (expected a JSON object)")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise UsageError(f"{source} has no valid schema_version: not a medcli manifest")
    if version > SCHEMA_VERSION:
        raise UsageError(
            f"{source} uses manifest schema {version}, newer than this medcli understands "
            f"({SCHEMA_VERSION}); upgrade medcli (pip install -U medcli)"
        )
    if version < 1:
        raise UsageError(f"{source} has an invalid schema_version {version}")
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise UsageError(f"{source} is missing {', '.join(missing)}: the manifest is damaged; re-run 'medcli train'")
    if not isinstance(data["stages"], dict):
        raise UsageError(f"{source} has malformed stages: the manifest is damaged")
    for name, entry in data["stages"].items():
        if not isinstance(entry, dict) or entry.get("status") not in STATUSES:
            raise UsageError(f"{source} has a malformed '{name}' stage: the manifest is damaged")
