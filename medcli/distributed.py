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
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Iterator

from medcli import console
from medcli.errors import Interrupted, MedcliError, UsageError

__all__ = [
    "Context", "device_for", "from_env", "from_main", "gather", "gpu_index", "is_main_process", "launch", "peer_lost", "peers",
    "session", "sum_", "sync_buffers",
]

TIMEOUT = timedelta(minutes=10)
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


@contextmanager
def session(device: str) -> Iterator[Context]:
    """Join the process group for the whole of a training on `device` (the config's: "cpu",
    "cuda", "cuda:N"), left again afterwards. A device this process cannot take in the job is
    refused before anything is written."""
    ctx = from_env()
    if not ctx.enabled:
        yield ctx
        return
    import torch
    import torch.distributed as dist

    own = torch.device(device_for(ctx, device))
    backend = "nccl" if own.type == "cuda" else "gloo"
    if own.type == "cuda":
        torch.cuda.set_device(own)
    dist.init_process_group(backend, timeout=TIMEOUT)
    if not ctx.is_main:
        console.configure(quiet=True)  # one voice: rank 0 logs, the others only report errors
    try:
        yield replace(ctx, backend=backend)
    finally:
        dist.destroy_process_group()


def gpu_index(ctx: Context, visible: int) -> int:
    """This process's GPU among the `visible` ones: LOCAL_RANK when the process sees every GPU
    of its node, or the one it sees when its launcher gave each process its own GPU through
    CUDA_VISIBLE_DEVICES (SLURM's --gpus-per-task, some schedulers)."""
    if ctx.local_rank < visible:
        return ctx.local_rank
    if visible == 1:
        return 0
    raise UsageError(f"local rank {ctx.local_rank} has no GPU ({visible} visible); start at most one process per GPU "
                     f"(--nproc-per-node), or give each process one GPU through CUDA_VISIBLE_DEVICES")


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


@contextmanager
def peers(ctx: Context) -> Iterator[None]:
    """Turn the loss of another process of the job (a crash, a kill, a lost node: gloo and
    NCCL then fail the collective this process waits in) into `Interrupted`, so the stage
    is recorded as interrupted and `--resume` continues it."""
    if not ctx.enabled:
        yield
        return
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if not peer_lost(exc):
            raise
        reason = str(exc).strip().splitlines()[0][:200]
        raise Interrupted(f"another process of this distributed job was lost ({reason}); "
                          f"continue with 'medcli train --resume RUN'") from exc


def peer_lost(exc: BaseException) -> bool:
    """Whether an error raised in a collective means another process is gone: torch's network
    and store errors always do; other errors (a backend's own, out of memory) only when their
    text says a connection closed or a collective timed out."""
    import torch.distributed as dist

    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower() \
        and bool(_PEER_LOST.search(str(exc)))


def from_main(ctx: Context, make) -> Any:
    """`make()` run on rank 0 alone, its result (or its one-line error) given to every rank.

    A MedcliError on rank 0 is raised on every rank, so no process waits for a result that
    will never come."""
    if not ctx.enabled:
        return make()
    import torch.distributed as dist

    box: list = [None]
    if ctx.is_main:
        try:
            box[0] = ("ok", make())
        except MedcliError as exc:
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0)
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


def launch(nproc: int, argv: list[str]) -> int:
    """`medcli train --nproc N ...`: run the same command under torchrun's launcher (in this
    process, as `torchrun --standalone --nproc-per-node N -m medcli ...` would) and turn its
    failure report into one line. Returns the exit code: a usage error the processes found
    (exit 2) was already said, once, by the first process of the node, and is not said again."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from medcli import system

    # torchrun would set 1 thread per process, with a banner; share the usable CPUs instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, system.usable_cpus() // nproc)))
    args = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "medcli", *_without_nproc(argv)])
    try:
        run(args)
    except SignalException as exc:
        raise Interrupted(f"distributed training stopped by {exc.sigval.name}; resume it with "
                          f"'medcli train --resume RUN'") from None
    except ChildFailedError as exc:
        if any(f.exitcode == UsageError.exit_code for f in exc.failures.values()):  # the others were stopped
            return UsageError.exit_code
        rank, failure = min(exc.failures.items())
        if failure.exitcode in (130, -2, -15):
            raise Interrupted("distributed training interrupted; resume it with 'medcli train --resume RUN'") from None
        raise MedcliError(f"distributed training failed: rank {rank} exited with code {failure.exitcode} "
                          f"(its error is above)") from None
    return 0


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
