"""Run locking (one writer per run directory) and finding / ending stale medcli processes.

A medcli process is recognised by its command line (the `medcli` console script, or
`python -m medcli`), never by a substring match, so editors or greps that mention medcli
are left alone. Only the current user's processes are ever considered.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from medcli.errors import UsageError

LOCK_NAME = ".lock"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


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


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1d', '1h30m' -> seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    parts = _DURATION.findall(cleaned)
    if not cleaned or "".join(n + u for n, u in parts) != cleaned:
        raise UsageError(f"cannot read duration '{text}'; use forms like 90s, 10m, 2h, 1d or 1h30m")
    return sum(float(n) * _UNITS[u] for n, u in parts)


@dataclass
class MedcliProcess:
    pid: int
    age_s: float
    command: str
    subcommand: str | None
    run_dirs: list[str] = field(default_factory=list)
    cpu_percent: float = 0.0
    rss_mb: float = 0.0
    gpu_mb: float | None = None
    device: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _is_medcli(cmdline: list[str]) -> int | None:
    """Index of the first medcli argument in a command line, or None if it isn't medcli."""
    if not cmdline:
        return None
    if Path(cmdline[0]).name == "medcli":
        return 1
    if Path(cmdline[0]).name.startswith("python"):
        if len(cmdline) > 1 and Path(cmdline[1]).name == "medcli":
            return 2
        if cmdline[1:3] == ["-m", "medcli"]:
            return 3
    return None


def _subcommand(args: list[str]) -> str | None:
    return next((a for a in args if not a.startswith("-")), None)


def _option(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _gpu_memory() -> dict[int, float]:
    """pid -> MiB of GPU memory, where nvidia-smi can tell; empty otherwise."""
    if not shutil.which("nvidia-smi"):
        return {}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    usage = {}
    for line in out.splitlines():
        pid, _, mem = line.partition(",")
        if pid.strip().isdigit():
            usage[int(pid)] = float(mem.strip() or 0)
    return usage


def _protected_pids() -> set[int]:
    """This process and its ancestors (e.g. the script that launched us)."""
    import psutil

    me = psutil.Process()
    return {me.pid, *(p.pid for p in me.parents())}


def find_processes(older_than_s: float = 0.0) -> list[MedcliProcess]:
    """The current user's medcli processes other than this one, oldest first."""
    import psutil

    skip = _protected_pids()
    uid = os.getuid()
    gpu = _gpu_memory()
    now = time.time()
    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "create_time"]):
        try:
            if proc.pid in skip or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            cmdline = proc.info["cmdline"] or []
            start = _is_medcli(cmdline)
            if start is None:
                continue
            age = now - proc.info["create_time"]
            if age < older_than_s:
                continue
            args = cmdline[start:]
            locks = [Path(f.path).parent for f in proc.open_files() if Path(f.path).name == LOCK_NAME]
            found.append(
                MedcliProcess(
                    pid=proc.pid,
                    age_s=round(age, 1),
                    command=" ".join(["medcli", *args]),
                    subcommand=_subcommand(args),
                    run_dirs=sorted(str(p) for p in locks),
                    cpu_percent=proc.cpu_percent(interval=None),
                    rss_mb=round(proc.memory_info().rss / 2**20, 1),
                    gpu_mb=gpu.get(proc.pid),
                    device=_option(args, "--device"),
                )
            )
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(found, key=lambda p: -p.age_s)


def end_processes(procs: list[MedcliProcess], grace_s: float = 10.0) -> list[dict]:
    """SIGTERM each process, SIGKILL whatever is left after `grace_s`, then mark the runs
    they held as interrupted (a process killed hard cannot do that itself)."""
    import psutil

    from medcli.manifest import Manifest

    handles = []
    for entry in procs:
        try:
            proc = psutil.Process(entry.pid)
            proc.terminate()
            handles.append(proc)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(handles, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    killed = {p.pid for p in alive}
    results = []
    for entry in procs:
        marked = []
        for run_dir in entry.run_dirs:
            try:
                if Manifest.load(run_dir).mark_interrupted(f"ended by clean-processes (pid {entry.pid})"):
                    marked.append(run_dir)
            except UsageError:
                continue
        results.append({**entry.to_dict(), "signal": "SIGKILL" if entry.pid in killed else "SIGTERM",
                        "runs_marked_interrupted": marked})
    return results


def other_trainings(device: str) -> list[MedcliProcess]:
    """Other medcli trainings of this user that target the same device ('auto' matches any)."""
    same = []
    for proc in find_processes():
        if proc.subcommand != "train":
            continue
        theirs = proc.device or "auto"
        if "auto" in (theirs, device) or theirs == device:
            same.append(proc)
    return same


def table(procs: list[MedcliProcess], title: str):
    """A Rich table of processes (pid, age, command, run, CPU, memory, GPU memory)."""
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    for column in ("pid", "age", "command", "run directory", "CPU %", "RSS MiB", "GPU MiB"):
        out.add_column(column, overflow="fold")
    for p in procs:
        out.add_row(
            str(p.pid), _human_age(p.age_s), p.command, "\n".join(p.run_dirs) or "-",
            f"{p.cpu_percent:.0f}", f"{p.rss_mb:.0f}", "-" if p.gpu_mb is None else f"{p.gpu_mb:.0f}",
        )
    return out


def _human_age(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
