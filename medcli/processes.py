"""Finding and ending stale medcli processes.

A medcli process is recognised by its command line (the `medcli` console script, or
`python -m medcli`), never by a substring match, so editors or greps that mention medcli
are left alone. Only the current user's processes are ever considered. The runs a process
works on are the run directories whose stage locks (`medcli.run.STAGE_LOCK_PREFIX`) it
holds open. Processes are signalled through the psutil handle they were found with, which
checks the process's start time, so a pid reused by an unrelated process is never hit.

Distributed jobs: `train --nproc`'s launcher marks the run of a process that died
interrupted (`mark_lost`). Under torchrun itself a rank 0 killed hard leaves its train stage
`running`; `medcli train --resume RUN` continues it all the same, and `clean-processes --pid
PID --yes` (any process of the job) ends the processes of a hung job and marks their runs
interrupted.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from medcli import console, manifest
from medcli.errors import MedcliError, UsageError

__all__ = ["MedcliProcess", "clean", "end_processes", "find_processes", "job_of", "mark_lost", "other_trainings", "parse_duration"]

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
CPU_SAMPLE_S = 0.2  # psutil's first cpu_percent() reading is always 0: prime, wait, read
KILL_WAIT_S = 5.0  # the least wait for SIGKILL'd processes to go (with --grace 0 too) before one counts as stuck


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
    handle: Any = field(default=None, repr=False, compare=False)  # psutil.Process, start-time checked

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "handle"}


_PYTHON_OPTIONS_WITH_VALUE = ("-X", "-W", "--check-hash-based-pycs")
_TORCHRUN_FLAGS = ("--standalone", "--no-python", "--no_python", "--run-path", "--run_path", "--virtual-local-rank",
                   "--virtual_local_rank")  # torchrun's options that take no value


def _is_medcli(cmdline: list[str]) -> int | None:
    """Index of the first medcli argument in a command line, or None if it isn't medcli: the
    console script, `python [options] -m medcli` (torchrun starts its processes as `python -u
    -m medcli`), `python [options] path/to/medcli`, or torchrun (`torchrun`, `python -m
    torch.distributed.run`) running `-m medcli`. Only the interpreter's and torchrun's own
    options are looked through: an argument of another program is never taken for medcli."""
    if not cmdline:
        return None
    if Path(cmdline[0]).name == "medcli":
        return 1
    i = 0
    if Path(cmdline[0]).name.startswith("python"):
        i = 1
        while i < len(cmdline) and cmdline[i].startswith("-") and cmdline[i] not in ("-", "--", "-m", "-c"):
            i += 2 if cmdline[i] in _PYTHON_OPTIONS_WITH_VALUE else 1
        if cmdline[i:i + 2] == ["-m", "medcli"]:
            return i + 2
        if cmdline[i:i + 2] == ["-m", "torch.distributed.run"]:
            return _torchrun_medcli(cmdline, i + 2)
        if i < len(cmdline) and Path(cmdline[i]).name == "medcli":
            return i + 1
    if i < len(cmdline) and Path(cmdline[i]).name == "torchrun":
        return _torchrun_medcli(cmdline, i + 1)
    return None


def _torchrun_medcli(cmdline: list[str], start: int) -> int | None:
    """Where medcli's arguments start when torchrun's options (from `start`) run `-m medcli`:
    `-m`/`--module` (a flag, anywhere among the options) and `medcli` as the first argument
    after them; None for anything else (another program)."""
    module, k = False, start
    while k < len(cmdline) and cmdline[k].startswith("-") and cmdline[k] != "--":
        arg = cmdline[k]
        module = module or arg in ("-m", "--module")
        attached = "=" in arg or (not arg.startswith("--") and len(arg) > 2)  # --opt=v, -r3
        k += 1 if arg in ("-m", "--module") or attached or arg in _TORCHRUN_FLAGS else 2  # an option and its value
    return k + 1 if module and cmdline[k:k + 1] == ["medcli"] else None


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


def _run_dirs(proc) -> list[str]:
    from medcli.run import STAGE_LOCK_PREFIX

    return sorted({str(Path(f.path).parent) for f in proc.open_files() if Path(f.path).name.startswith(STAGE_LOCK_PREFIX)})


def find_processes(older_than_s: float = 0.0) -> list[MedcliProcess]:
    """The current user's medcli processes other than this one, oldest first."""
    import psutil

    skip = _protected_pids()
    uid = os.getuid()
    now = time.time()
    candidates = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "create_time"]):
        try:
            if proc.pid in skip or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            cmdline = proc.info["cmdline"] or []
            start = _is_medcli(cmdline)
            if start is None or now - proc.info["create_time"] < older_than_s:
                continue
            proc.cpu_percent(interval=None)  # prime: the reading after the sample below is real
            candidates.append((proc, cmdline[start:]))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    if not candidates:
        return []
    time.sleep(CPU_SAMPLE_S)
    gpu = _gpu_memory()
    found = []
    for proc, args in candidates:
        try:
            with proc.oneshot():
                found.append(
                    MedcliProcess(
                        pid=proc.pid,
                        age_s=round(now - proc.info["create_time"], 1),
                        command=" ".join(["medcli", *args]),
                        subcommand=_subcommand(args),
                        run_dirs=_run_dirs(proc),
                        cpu_percent=proc.cpu_percent(interval=None),
                        rss_mb=round(proc.memory_info().rss / 2**20, 1),
                        gpu_mb=gpu.get(proc.pid),
                        device=_option(args, "--device"),
                        handle=proc,
                    )
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sorted(found, key=lambda p: -p.age_s)


def _signal(procs: list, method: str) -> tuple[list, dict[int, str]]:
    """Call terminate/kill on each handle; the ones signalled, and pid -> why not for the rest."""
    import psutil

    sent, failed = [], {}
    for proc in procs:
        try:
            getattr(proc, method)()  # psutil checks the start time: a reused pid raises NoSuchProcess
            sent.append(proc)
        except psutil.NoSuchProcess:
            pass
        except psutil.AccessDenied:
            failed[proc.pid] = "permission denied"
    return sent, failed


def end_processes(procs: list[MedcliProcess], grace_s: float = 10.0) -> list[dict]:
    """SIGTERM each process (but those whose launcher is among them: it passes the signal on),
    SIGKILL whatever is left after `grace_s`, then mark the stages they were running as
    interrupted (a process killed hard cannot do that itself)."""
    import psutil

    from medcli.run import Run

    handles = [p.handle or psutil.Process(p.pid) for p in procs]
    pids = {handle.pid for handle in handles}

    def launched(handle) -> bool:  # by another process being ended: its launcher (torchrun, --nproc)
        try:
            return handle.ppid() in pids
        except psutil.Error:
            return False

    # A launcher passes SIGTERM on to its processes: one sent to them too would land while they
    # stop (a second Ctrl-C), so they get theirs from it, and SIGKILL if still there after the grace.
    children = [handle for handle in handles if launched(handle)]
    terminated, failed = _signal([handle for handle in handles if handle not in children], "terminate")
    _, alive = psutil.wait_procs([*terminated, *children], timeout=grace_s)
    killed, kill_failed = _signal(alive, "kill")
    failed.update(kill_failed)
    _, survivors = psutil.wait_procs(killed, timeout=max(grace_s, KILL_WAIT_S))
    still_alive = {p.pid for p in survivors} | set(failed)
    results = []
    for entry in procs:
        marked = []
        if entry.pid not in still_alive:
            for run_dir in entry.run_dirs:
                try:
                    stages = Run.open(run_dir).mark_interrupted(f"ended by clean-processes (pid {entry.pid})", pid=entry.pid)
                except UsageError:
                    continue
                if stages:
                    marked.append(run_dir)
        signal = None if entry.pid in still_alive else "SIGKILL" if entry.pid in {p.pid for p in killed} else "SIGTERM"
        results.append({**entry.to_dict(), "signal": signal, "ended": entry.pid not in still_alive,
                        "error": failed.get(entry.pid) or ("still running after SIGKILL" if entry.pid in still_alive else None),
                        "runs_marked_interrupted": marked})
    return results


def mark_lost(run_dir: str, pid: int, reason: str) -> list[str]:
    """Mark the stages process `pid` left running in `run_dir` interrupted (it ended without
    recording it: killed, torn down by a collective timeout, its node lost); their names. What
    `train --nproc`'s launcher does when one of its processes dies."""
    from medcli.run import Run

    try:
        return Run.open(run_dir).mark_interrupted(reason, pid=pid)
    except UsageError:
        return []


def job_of(found: list[MedcliProcess], run: str | os.PathLike | None = None,
           pid: int | None = None) -> list[MedcliProcess]:
    """The processes of `found` that make up one job: the one with `pid`, or those working on
    the run directory `run`, with their medcli ancestors (a `--nproc` or torchrun launcher)
    and all the medcli descendants of those (the other ranks, which hold no stage lock)."""
    by_pid = {p.pid: p for p in found}
    if pid is not None:
        seeds = [by_pid[pid]] if pid in by_pid else []
    else:
        target = Path(run).resolve()
        seeds = [p for p in found if any(Path(d).resolve() == target for d in p.run_dirs)]
    members = set()
    for proc in seeds:
        root = proc
        while _parent(root) in by_pid:
            root = by_pid[_parent(root)]
        members.add(root.pid)
        try:
            members.update(child.pid for child in root.handle.children(recursive=True) if child.pid in by_pid)
        except Exception:  # psutil.Error: the process went meanwhile
            pass
    return [p for p in found if p.pid in members]


def clean(dry_run: bool = False, yes: bool = False, older_than: str | None = None, grace_s: float = 10.0,
          show: Callable[[Any], None] | None = None, confirm: Callable[[int], bool] | None = None, run: str | os.PathLike | None = None,
          pid: int | None = None) -> dict:
    """`medcli clean-processes`: find this user's other medcli processes (older than
    `older_than`, e.g. '2h'; only the job of `run` or `pid`, `job_of`, when given), show them
    as a table to `show` (a Rich renderable), and end them with `yes`, or when `confirm(count)` says so
    (never with `dry_run`). Returns {"ended": bool, "processes": [...]}: end_processes'
    reports when they were ended (each with `ended`), else the processes found; a process
    that could not be ended is warned about. A `pid` that is no medcli process of this user
    is a MedcliError (exit 1, as kill(1)); a `run` nobody works on is an empty listing."""
    if dry_run and yes:
        raise UsageError("--dry-run and --yes contradict each other; pass one of them")
    if run is not None and pid is not None:
        raise UsageError("--run and --pid each choose one job; pass one of them")
    if run is not None and not Path(run).is_dir():
        raise UsageError(f"--run {run}: no such run directory")
    if run is not None and not (Path(run) / manifest.FILENAME).is_file():
        raise UsageError(f"--run {run} is no run directory (it has no {manifest.FILENAME}); pass the folder "
                         "'medcli train' printed")
    if pid is not None and pid < 1:
        raise UsageError(f"--pid {pid} is not a process id")
    found = find_processes(parse_duration(older_than) if older_than is not None else 0.0)
    if run is not None or pid is not None:
        found = job_of(found, run, pid)
        if not found and pid is not None and older_than is not None and job_of(find_processes(), None, pid):
            console.info(f"pid {pid} is not older than {older_than}")
        elif not found and pid is not None:  # like kill(1): the one process named is not there
            raise MedcliError(f"pid {pid} is no medcli process of this user")
        elif not found:
            console.info(f"no medcli process of this user is working on {run}")
    if show is not None:  # the listing is the command's result: the CLI prints it on stdout
        show(table(found, f"{console.plural(len(found), 'medcli process', 'medcli processes')}"))
    end = bool(found) and not dry_run and (yes or (confirm is not None and bool(confirm(len(found)))))
    result = end_processes(found, grace_s) if end else [p.to_dict() for p in found]
    if end:
        stuck = [p for p in result if not p["ended"]]
        console.info(f"ended {console.plural(len(result) - len(stuck), 'process', 'processes')}")
        for p in stuck:
            console.warn(f"could not end pid {p['pid']}: {p['error']}")
    return {"ended": end, "processes": result}


def other_trainings(device: str, exclude_parent: int | None = None) -> list[MedcliProcess]:
    """Other medcli trainings of this user that target the same device ('auto' matches any),
    leaving out the children of `exclude_parent` (the launcher of a distributed job)."""
    same = []
    for proc in find_processes():
        if proc.subcommand != "train" or (exclude_parent is not None and _parent(proc) == exclude_parent):
            continue
        theirs = proc.device or "auto"
        if "auto" in (theirs, device) or theirs == device:
            same.append(proc)
    return same


def _parent(proc: MedcliProcess) -> int | None:
    import psutil

    try:
        return proc.handle.ppid() if proc.handle else None
    except psutil.Error:
        return None


def table(procs: list[MedcliProcess], title: str):
    """A Rich table of processes (pid, age, command, run, CPU, memory, GPU memory)."""
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    rows = [(str(p.pid), _human_age(p.age_s), p.command, "\n".join(p.run_dirs) or "-", f"{p.cpu_percent:.0f}",
             f"{p.rss_mb:.0f}", "-" if p.gpu_mb is None else f"{p.gpu_mb:.0f}") for p in procs]
    for i, column in enumerate(("pid", "age", "command", "run directory", "CPU %", "RSS MiB", "GPU MiB")):
        whole = column not in ("command", "run directory")  # numbers kept whole on a narrow terminal: a pid is copied
        out.add_column(column, overflow="fold", min_width=max((len(row[i]) for row in rows), default=1) if whole else None)
    for row in rows:
        out.add_row(*row)
    return out


def _human_age(seconds: float) -> str:
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"
