"""Data-parallel training on PyTorch's own engine: `torch.distributed`, launched by `torchrun`.

`torchrun` (or `medcli train --nproc N`, which runs it) starts one process per GPU (or per
CPU slot) and tells each its RANK, LOCAL_RANK and WORLD_SIZE through the environment, like
timm's and torchvision's reference scripts expect. `session` joins the process group (NCCL
on CUDA, gloo on CPU) when WORLD_SIZE > 1; a plain `medcli train` is a world of one and never
touches `torch.distributed`.

What the processes share and split (see `medcli.train`): every process holds the splits,
draws the same seeded permutation and the same augmentation parameters for each global
batch, and augments and runs only its slice of it; DDP averages the gradients, so the
global batch, the schedule and the result do not depend on the number of processes beyond
floating-point reduction order (and BatchNorm statistics, which are per process unless
SyncBatchNorm is on). Rank 0 alone writes the run directory and prints on stdout.

The model's own randomness (dropout, drop-path) is the exception: each process draws its own
masks (`seed_model`), as one process draws different masks for different images of a batch.
So "the same result as one process" means the same data order, augmentation, MixUp, global
batch and schedule: for a model without dropout or drop-path the same weights up to
floating-point reduction order; with them, a run of the same distribution, not the same
numbers (N processes with a seed are still reproducible as N processes with that seed).

A lost process ends the job within the collective timeout (`--collective-timeout`, default
COLLECTIVE_TIMEOUT_S): on gloo a collective waiting for a process that is gone (or hung, or
behind a lost node) raises and `peers` records the stage interrupted; on NCCL the watchdog
tears the process down at that timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING, set to 3 unless
given). `launch` (`--nproc`) then stops the other processes and marks a stage its rank 0
could not close interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from medcli import console
from medcli.errors import EXIT_INTERRUPTED, Interrupted, MedcliError, UsageError

__all__ = [
    "COLLECTIVE_TIMEOUT_S", "Context", "check_gpus", "collective_timeout", "command_line", "derived_seed", "device_for",
    "from_env", "from_main", "gather", "gpu_index", "is_main_process", "joined", "launch", "says_interruptions",
    "model_seed", "peer_lost", "peers", "seed_model", "session", "sum_", "sync_buffers", "watch_launcher",
]

# How long a collective waits for the other processes before the job counts as lost. The
# processes meet at every step (DDP's gradient all-reduce), so the longest legitimate wait is
# not an epoch but the work one process does alone: rank 0 writing last.pt + best.pt (about
# 1.5 GB for a ViT-B/16 with AdamW and EMA), hashing them and drawing the curves while the
# others wait in the next epoch's first all-reduce; seconds on a local disk, up to a minute on
# a slow network filesystem. 3 minutes leaves a margin of 3 over that, and ends a job with a
# dead peer 3x sooner than NCCL's 10-minute watchdog.
COLLECTIVE_TIMEOUT_S = 180.0
TIMEOUT_ENV = "MEDCLI_COLLECTIVE_TIMEOUT"
# Where `launch` asks rank 0 to say which run it trains (and its pid), so that a stage left
# running by a rank 0 that was killed can be marked interrupted by the launcher.
RUN_FILE_ENV = "MEDCLI_LAUNCH_RUN_FILE"
# The pid of the process that `launch` runs in: its processes watch it (`watch_launcher`).
LAUNCHER_ENV = "MEDCLI_LAUNCHER_PID"
LAUNCHER_POLL_S = 1.0
# What a collective reports when another process of the job is gone or hung (gloo: the peer's
# socket closed; NCCL: the watchdog's timeout or an aborted communicator). Any other error, an
# out-of-memory error or a real NCCL failure among them, is the process's own: `failed`.
_PEER_LOST = re.compile(r"connection (closed|reset|refused)|broken pipe|timed out|timeout|communicator was aborted"
                        r"|socket closed|end of file", re.IGNORECASE)


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job (a world of one when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's contiguous share of n items (the first n % world_size get one more)."""
        size, extra = divmod(n, self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (self.rank < extra))

    def record(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}


def from_env() -> Context:
    """The job as torchrun describes it in the environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UsageError("RANK, WORLD_SIZE and LOCAL_RANK must be integers; launch with torchrun") from None
    return Context(rank=rank, world_size=max(1, world), local_rank=local)


def is_main_process() -> bool:
    return from_env().is_main


def says_interruptions() -> bool:
    """Whether this process says how an interrupted job ended: one process alone, or rank 0
    of a job started by plain torchrun; not the processes `launch` started (it says it once,
    naming the run and how to resume it) nor the other ranks."""
    ctx = from_env()
    return not ctx.enabled or (ctx.is_main and not os.environ.get(RUN_FILE_ENV))


def collective_timeout(given: float | None = None, recorded: float | None = None) -> float:
    """Seconds a collective waits for the other processes: `given` (--collective-timeout), else
    $MEDCLI_COLLECTIVE_TIMEOUT, else `recorded` (the run's, on resume), else COLLECTIVE_TIMEOUT_S."""
    source, value = "--collective-timeout", given
    if value is None and os.environ.get(TIMEOUT_ENV, "").strip():
        source, value = TIMEOUT_ENV, os.environ[TIMEOUT_ENV].strip()
    if value is None:
        return float(recorded if recorded is not None else COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 1:  # NaN too
        raise UsageError(f"{source} must be a number of seconds of at least 1 (got {value}); e.g. "
                         f"{COLLECTIVE_TIMEOUT_S:.0f}")
    return seconds


@contextmanager
def session(device: str, timeout_s: float | None = None) -> Iterator[Context]:
    """Join the process group for the whole of a training on `device` (the config's: "cpu",
    "cuda", "cuda:N"), left again afterwards; collectives wait at most `timeout_s` (the config's
    `collective_timeout`) for the other processes. A device this process cannot take in the job
    is refused before anything is written."""
    ctx = from_env()
    if not ctx.enabled:
        yield ctx
        return
    import torch
    import torch.distributed as dist

    watch_launcher()
    own = torch.device(device_for(ctx, device))
    backend = "nccl" if own.type == "cuda" else "gloo"
    if own.type == "cuda":
        torch.cuda.set_device(own)
        # A timed-out NCCL collective tears the process down (torch's default since 2.2, made
        # explicit): NCCL raises nothing when a peer dies, and the CUDA work queued behind the
        # collective cannot be trusted. `launch` (or torchrun) then stops the other processes.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s or COLLECTIVE_TIMEOUT_S))
    if not ctx.is_main:
        console.configure(quiet=True)  # one voice: rank 0 logs, the others only report errors
    try:
        yield replace(ctx, backend=backend)
    finally:
        dist.destroy_process_group()


def watch_launcher() -> None:
    """In a process `launch` started: end it (SIGTERM, so a stage is recorded as interrupted)
    when the launcher is gone. torchrun starts its processes in sessions of their own, so a
    launcher killed by SIGKILL (or the OOM killer) would leave them training, unseen."""
    import signal
    import threading
    import time

    launcher = os.environ.get(LAUNCHER_ENV, "")
    if not launcher.isdigit():  # not started by `launch`
        return

    def watch() -> None:
        while os.getppid() == int(launcher):
            time.sleep(LAUNCHER_POLL_S)
        console.warn(f"the launcher (pid {launcher}) is gone; stopping this process")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="medcli-launcher-watch", daemon=True).start()


def check_gpus(nproc: int, device: str) -> None:
    """`--nproc N` on CUDA trains one process per GPU: refused before any starts when fewer
    GPUs are visible (two processes on one GPU fail later, inside NCCL)."""
    if nproc < 2 or not device.startswith("cuda"):
        return
    import torch

    visible = torch.cuda.device_count()
    if nproc > visible:
        raise UsageError(f"--nproc {nproc} trains one process per GPU, but {console.plural(visible, 'GPU')} "
                         f"{'is' if visible == 1 else 'are'} visible; use --nproc {visible} or fewer, or --device cpu")


def gpu_index(ctx: Context, visible: int) -> int:
    """This process's GPU among the `visible` ones: LOCAL_RANK when the process sees every GPU
    of its node, or the one it sees when its launcher gave each process its own GPU through
    CUDA_VISIBLE_DEVICES (SLURM's --gpus-per-task, some schedulers; never `launch`'s processes,
    which all see every GPU)."""
    if ctx.local_rank < visible:
        return ctx.local_rank
    if visible == 1 and not os.environ.get(RUN_FILE_ENV):
        return 0
    raise UsageError(f"local rank {ctx.local_rank} has no GPU ({visible} visible); start at most one process per GPU "
                     f"(--nproc-per-node), or give each process one GPU through CUDA_VISIBLE_DEVICES",
                     rank_specific=True)


def device_for(ctx: Context, device: str) -> str:
    """The device this process trains on: its own GPU in a CUDA job (`gpu_index`). A GPU chosen
    by number (--device cuda:N) cannot be every process's own: refused in one line."""
    if not (ctx.enabled and device.startswith("cuda")):
        return device
    if device != "cuda":
        raise UsageError(f"--device {device} picks one GPU, but in a distributed job each process trains on its own; "
                         f"pass --device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES")
    import torch

    return f"cuda:{gpu_index(ctx, torch.cuda.device_count())}"


def joined() -> bool:
    """Whether this process is in a process group (inside `session` of a distributed job)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def derived_seed(purpose: str, *parts: int) -> int:
    """The seed (63 bits) of one purpose's random stream, from the run's seed and `parts`: a
    hash, so the streams of two purposes or two run seeds never coincide (seed and seed + 1
    would: one run's augmentation stream was the next seed's data order)."""
    digest = hashlib.sha256(f"medcli-{purpose}-rng:{':'.join(map(str, parts))}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def model_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of process `rank`'s own random stream (dropout, drop-path) in `epoch`."""
    return derived_seed("model", seed, rank, epoch)


def seed_model(ctx: Context, seed: int, epoch: int) -> None:
    """In a distributed job, give this process's model its own random stream for the epoch
    (torch's global generators: dropout and drop-path masks), different on every process; the
    data order and augmentation have their own generators and stay the same on all of them.
    Seeded per epoch, so a resumed job draws what an uninterrupted one would. A world of one
    keeps one stream for the whole run (saved in last.pt)."""
    if ctx.enabled:
        import torch

        torch.manual_seed(model_seed(seed, ctx.rank, epoch))


@contextmanager
def peers(ctx: Context, run_dir: str | os.PathLike | None = None) -> Iterator[None]:
    """Turn the loss of another process of the job (a crash, a kill, a lost node: gloo and
    NCCL then fail the collective this process waits in) into `Interrupted`, so the stage
    is recorded as interrupted and `--resume` continues it. Rank 0 tells `launch` the
    `run_dir` it trains, so that the launcher can mark the run if this process is killed."""
    if not ctx.enabled:
        yield
        return
    import torch.distributed as dist

    if ctx.is_main and run_dir is not None and os.environ.get(RUN_FILE_ENV):
        try:
            Path(os.environ[RUN_FILE_ENV]).write_text(json.dumps({"run_dir": str(run_dir), "pid": os.getpid()}))
        except OSError as exc:
            console.debug(f"could not tell the launcher the run directory: {exc}")

    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if not peer_lost(exc):
            raise
        # gloo's messages start with a source location in brackets ("[/.../pair.cc:534] Connection
        # closed by peer"): dropped, and brackets kept out of a line that Rich prints as markup.
        reason = re.sub(r"^\[[^\]]*\]\s*", "", (str(exc).strip().splitlines() or [""])[0])[:200]
        reason = reason.split(". ")[0].replace("[", "(").replace("]", ")") or type(exc).__name__  # its first sentence
        run = shlex.quote(str(run_dir)) if run_dir is not None else "RUN"
        # medcli's own launcher is one node, restarted with --nproc; a torchrun job restarts as it started
        again = f" --nproc {ctx.world_size}'" if os.environ.get(LAUNCHER_ENV) else "' under the same launcher"
        raise Interrupted(f"another process of this distributed job was lost ({reason}); "
                          f"continue with 'medcli train --resume {run}{again}") from exc


def peer_lost(exc: BaseException) -> bool:
    """Whether an error raised in a collective means another process is gone: torch's network
    and store errors always do; other errors (a backend's own, out of memory) only when their
    text says a connection closed or a collective timed out."""
    import torch.distributed as dist

    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower() \
        and bool(_PEER_LOST.search(str(exc)))


def from_main(ctx: Context, make, timeout_s: float | None = None) -> Any:
    """`make()` run on rank 0 alone, its result (or its one-line error) given to every rank.

    A MedcliError on rank 0 is raised on every rank, so no process waits for a result that
    will never come. The others wait at most the collective timeout, or `timeout_s` (a gloo
    group of its own) for work that may take longer, such as a download."""
    if not ctx.enabled:
        return make()
    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if timeout_s else None
    box: list = [None]
    try:
        if ctx.is_main:
            try:
                box[0] = ("ok", make())
            except MedcliError as exc:
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0, group=group)
    finally:
        if group is not None:
            dist.destroy_process_group(group)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def gather(ctx: Context, value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not ctx.enabled:
        return [value]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out


def sum_(ctx: Context, tensor):
    """Sum a tensor over ranks, in place; returns it."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.all_reduce(tensor)
    return tensor


def sync_buffers(ctx: Context, model) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics): each rank updated
    its own from its shard during the epoch, and validation and checkpoints use rank 0's."""
    if ctx.enabled:
        import torch.distributed as dist

        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def command_line() -> list[str]:
    """The command that started this process's job: a launcher's (torchrun, or `train --nproc`,
    which runs torchrun's in its own process), the parent of every process it starts, names
    the processes; otherwise (one process, or LOCAL_RANK set by some other parent) its own sys.argv."""
    if os.environ.get("LOCAL_RANK") is not None:
        import psutil

        try:
            parent = psutil.Process(os.getppid()).cmdline()
        except psutil.Error:
            parent = []
        if os.environ.get(LAUNCHER_ENV) == str(os.getppid()) or any(
                part == "torch.distributed.run" or Path(part).name == "torchrun" for part in parent):
            return parent
    return list(sys.argv)


def launch(nproc: int, argv: list[str], lost: Callable[[str, int, str], Any] | None = None) -> int:
    """`medcli train --nproc N ...`: run the same command under torchrun's launcher (in this
    process, as `torchrun --standalone --nproc-per-node N -m medcli ...` would) and turn its
    failure report into one line. Returns the exit code: a usage error the processes found
    (exit 2) was already said, once, by the first process of the node, and is not said again.

    When a process fails or dies (killed, out of host memory, torn down by a collective timeout)
    torchrun stops the others (SIGTERM, SIGKILL 30 s later); then `lost(run_dir, pid, reason)`
    is called for the run rank 0 announced (`peers`), to mark the stage interrupted that a
    killed rank 0 left `running`. A child killed by a signal is "interrupted, resume it"; a
    child that exited with its own error is a failure (its error is above)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from medcli import system

    # torchrun would set 1 thread per process, with a banner; share the usable CPUs instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, system.usable_cpus() // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "medcli", *_without_nproc(argv)])
    with tempfile.TemporaryDirectory(prefix="medcli-launch-") as folder, _elastic_logs_quiet():
        announced = Path(folder) / "run.json"
        os.environ[RUN_FILE_ENV] = str(announced)
        os.environ[LAUNCHER_ENV] = str(os.getpid())
        try:
            run(args)
        except SignalException as exc:
            where = _mark_lost(announced, lost, f"the launcher was stopped by {exc.sigval.name}")
            raise Interrupted(f"distributed training stopped by {exc.sigval.name}; resume it with "
                              f"'medcli train --resume {where} --nproc {nproc}'") from None
        except ChildFailedError as exc:
            if any(f.exitcode == UsageError.exit_code for f in exc.failures.values()):  # the others were stopped
                return UsageError.exit_code
            # The first to fail is the cause (torchrun stops the others after it: they exit 130 on
            # SIGTERM, or die by SIGKILL 30 s later); timestamps are whole seconds, so within one
            # second a process killed by a signal explains the job before one that lost it.
            rank, failure = min(exc.failures.items(),
                                key=lambda item: (item[1].timestamp, _cause_order(item[1].exitcode), item[0]))
            what = _describe_exit(rank, failure.pid, failure.exitcode)
            where = _mark_lost(announced, lost, f"{what}; the other processes were stopped")
            if _cause_order(failure.exitcode) == 1:
                raise MedcliError(f"distributed training failed: {what} (its error is above)") from None
            raise Interrupted(f"distributed training interrupted: {what}; resume it with "
                              f"'medcli train --resume {where} --nproc {nproc}'") from None
        finally:
            os.environ.pop(RUN_FILE_ENV, None)
            os.environ.pop(LAUNCHER_ENV, None)
    return 0


@contextmanager
def _elastic_logs_quiet() -> Iterator[None]:
    """torchrun's own log lines ("Sending process N closing signal SIGTERM", "failed (exitcode:
    -9) local_rank: 1 ...") kept off stderr while `launch` runs it: the launcher says how the
    job ended in one line; --verbose shows them."""
    import logging

    if console.is_verbose():
        yield
        return
    names = ("torch.distributed.elastic", "torch.distributed.run")
    loggers = [logging.getLogger(name) for name in {*names, *(name for name in logging.root.manager.loggerDict
                                                             if name.startswith(names))}]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_STOPPED = (EXIT_INTERRUPTED, -2, -15)  # Ctrl-C, SIGINT, SIGTERM: stopped (by the user, or by torchrun after another failed)


def _cause_order(exitcode: int) -> int:
    """Which failure explains a job: a process killed by a signal (SIGKILL, a crash, a watchdog
    abort) first, then one that exited with its own error, then those stopped or interrupted
    because of the others."""
    if exitcode < 0 and exitcode not in _STOPPED:
        return 0
    return 2 if exitcode in _STOPPED else 1


def _describe_exit(rank: int, pid: int, exitcode: int) -> str:
    if exitcode < 0:
        import signal

        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"rank {rank} (pid {pid}) was killed by {name}"
    if exitcode == EXIT_INTERRUPTED:
        return f"rank {rank} stopped (interrupted, or it lost another process of the job: its line is above)"
    return f"rank {rank} exited with code {exitcode}"


def _mark_lost(announced: Path, lost: Callable[[str, int, str], Any] | None, reason: str) -> str:
    """Tell `lost` about the run rank 0 announced; the run directory (or RUN, when none was)."""
    try:
        said = json.loads(announced.read_text())
        run_dir, pid = str(said["run_dir"]), int(said["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return "RUN"
    if lost is not None:
        try:
            lost(run_dir, pid, reason)
        except MedcliError as exc:
            console.warn(f"could not mark run {run_dir} interrupted: {exc}")
    return shlex.quote(run_dir)


def _without_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
