"""The run manifest (`manifest.json`) as a document: schema, validation, atomic save.

The manifest is the only contract between medcli commands; `medcli.run.Run` owns the run
directory it lives in (locking, stages, model and data). A run directory holds one
manifest. It records the schema version, the medcli version, the resolved config, the
environment, the dataset record and one entry per stage (train, evaluate, explain:<method>)
with its status, times and artefacts. Artefact paths are relative to the
run directory, each with its sha256, so a run can be moved or copied.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from medcli import __version__, distributed, fileio, system
from medcli.errors import UsageError

__all__ = ["FILENAME", "SCHEMA_VERSION", "document", "environment", "now_iso", "read", "write"]

SCHEMA_VERSION = 1
FILENAME = "manifest.json"
STATUSES = ("running", "completed", "failed", "interrupted")
_REQUIRED = ("schema_version", "medcli_version", "created", "run_id", "config", "dataset", "stages")
_SECTIONS = ("model", "preprocess", "environment")  # written by train; objects when there


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
        "usable_cpus": system.usable_cpus(),
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "deterministic": deterministic,
        "argv": distributed.command_line(),  # under torchrun or --nproc, the launcher's
    }
    if device and device.startswith("cuda") and torch.cuda.is_available():
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def document(run_id: str, *, config: dict, dataset: dict, **sections: Any) -> dict:
    """A new manifest document with no stages yet; `uid`: random, this run's alone (two runs
    started in the same second may share their run id and creation time)."""
    import uuid

    return {
        "schema_version": SCHEMA_VERSION,
        "medcli_version": __version__,
        "created": now_iso(),
        "run_id": run_id,
        "uid": uuid.uuid4().hex,
        "config": config,
        "dataset": dataset,
        **sections,
        "stages": {},
    }


def read(run: str | os.PathLike) -> tuple[Path, dict]:
    """(run directory, validated manifest) for a run directory or its manifest.json; every
    problem becomes a one-line UsageError naming the fix."""
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
    return path, data


def write(run_dir: str | os.PathLike, data: dict) -> Path:
    """Save atomically: a crash leaves the previous manifest or the new one, never half of one."""
    return fileio.write_json(Path(run_dir) / FILENAME, data)


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
    malformed = [key for key in ("config", "dataset", "stages", *_SECTIONS) if key in data and not isinstance(data[key], dict)]
    if malformed:
        raise UsageError(f"{source} has malformed {', '.join(malformed)} (not a JSON object): the manifest is damaged")
    for name, entry in data["stages"].items():
        if (not isinstance(entry, dict) or entry.get("status") not in STATUSES
                or any(not isinstance(entry.get(key, {}), dict) for key in ("artefacts", "summary"))):
            raise UsageError(f"{source} has a malformed '{name}' stage: the manifest is damaged")
