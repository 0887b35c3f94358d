"""A training run's checkpoints: `checkpoints/last.pt` (everything `--resume` needs to continue
bit-identically) and `checkpoints/best.pt` (weights and metrics), written atomically and read
back with one-line errors. torch is imported inside functions.

Training does not wait for them (`Writer`): after an epoch the state is copied to host memory
(pinned on CUDA, the copies queued behind the epoch's kernels), and one background thread
serialises, writes and hashes it while the next epoch trains, one file after another in the
order they were asked for. The sha256 is computed from the bytes as they are written
(`fileio.atomic_stream`), never by reading the file back, and recorded in the stage's
artefacts only once the file is complete and renamed into place. A process killed during a
write leaves the previous complete checkpoint (and a temporary file the next run of the stage
removes).

The training state is duck-typed (`medcli.train.State`: model, optimizer, scheduler, scaler,
`rng(device)` / `set_rng(state, device)`, epoch, history, best, bad_epochs, and for the
best-checkpoint rule `ema` (timm's ModelEmaV3 or None) and `scores`, the monitored value of
every epoch: `medcli.selection`).
"""

from __future__ import annotations

import threading
from copy import copy as shallow
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from medcli import console, fileio
from medcli.errors import UsageError
from medcli.names import SCALAR_METRICS
from medcli.run import Run

__all__ = ["RESUME_KEYS", "Writer", "owner", "payload", "read", "restore", "snapshot", "write", "writing"]

# What last.pt must hold for --resume to continue exactly where the run stopped.
RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history", "best", "bad_epochs", "ema",
               "scores")
# Absent from a last.pt written before the best-checkpoint rules: its run follows the old rule.
_SINCE_SELECTION = frozenset({"ema", "scores"})


def owner(run: Run) -> dict:
    """The run a last.pt belongs to, as it records it: its id and its manifest's random `uid`
    (a copy of the run folder is the same run; another run's last.pt copied in is not, even
    one started in the same second); a run from before manifests had one: id, creation time
    and seed."""
    uid = run.data.get("uid")
    return {"run_id": run.run_id, **({"uid": uid} if uid else
                                     {"created": run.data.get("created"), "seed": run.config.get("seed")})}


def payload(state: Any, metrics: dict, full: bool, device, model: Any = None, run: Run | None = None) -> dict:
    """What a checkpoint holds, as references to the live training state (`snapshot` copies it);
    only tensors, numbers, strings, lists and dicts (weights_only). `full`: last.pt's resume
    state too, and the `owner` of `run`. `model`: the module whose weights are saved (default
    the trained one; best.pt under the `ema-window` rule: the EMA's)."""
    content = {"model": (state.model if model is None else model).state_dict(), "epoch": state.epoch,
               "metrics": {key: metrics.get(key) for key in SCALAR_METRICS}}
    if full:
        ema = getattr(state, "ema", None)
        content.update(optimizer=state.optimizer.state_dict(), scheduler=state.scheduler.state_dict(),
                       scaler=state.scaler.state_dict(), rng=state.rng(device), history=state.history,
                       best=state.best, bad_epochs=state.bad_epochs,
                       ema=None if ema is None else ema.module.state_dict(), scores=list(getattr(state, "scores", [])),
                       train_seconds=getattr(state, "train_seconds", 0.0), owner=None if run is None else owner(run))
    return content


def snapshot(contents: list[dict], device) -> tuple[list[dict], list]:
    """Copies of `contents` that training can no longer change (every tensor copied to host
    memory, every dict and list rebuilt), and the CUDA events to synchronize before reading
    them: none on the CPU; on CUDA the device tensors' copies go to pinned host memory without
    blocking, queued on each device's current stream behind the epoch's kernels (the next
    epoch's kernels queue behind them), and one event per device marks their end. A tensor
    that two contents share (last.pt's and best.pt's weights) is copied once."""
    import torch

    cuda = device.type == "cuda" and torch.cuda.is_available()
    copied: dict[tuple, Any] = {}
    devices = set()

    def host(tensor):
        tensor = tensor.detach()
        key = (str(tensor.device), tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if key not in copied:
            on_device = tensor.device.type != "cpu"
            if cuda and on_device:
                devices.add(tensor.device)
            copied[key] = torch.empty_like(tensor, device="cpu", pin_memory=cuda and on_device).copy_(
                tensor, non_blocking=cuda and on_device)
        return copied[key]

    def copy(value):
        if isinstance(value, torch.Tensor):
            return host(value)
        if isinstance(value, (dict, list)):
            out = shallow(value)  # its own type and attributes (a state dict's `_metadata`)
            for key in (out if isinstance(out, dict) else range(len(out))):
                out[key] = copy(out[key])
            return out
        if type(value) is tuple:
            return tuple(copy(item) for item in value)
        return value  # numbers, strings, None: immutable

    copies = [copy(content) for content in contents]
    events = []
    for each in devices:
        events.append(torch.cuda.Event())
        events[-1].record(torch.cuda.current_stream(each))
    return copies, events


def write(path: Path, content: dict) -> str:
    """torch.save `content` atomically to `path`; the sha256 of the file, hashed as it was written."""
    import torch

    with fileio.atomic_stream(path) as stream:
        torch.save(content, stream)
    return stream.hexdigest()


class Writer:
    """Checkpoints written by one background thread, in order, while training goes on.

    `write({path: content, ...}, device)` waits for the previous write of those files, snapshots
    the contents to host memory and hands them to the thread (once a write failed, it raises
    here and the thread writes nothing more); `wait()` returns once everything
    asked for is on disk (and raises a write's error on the training thread). With a `stage`,
    each file is recorded in its artefacts (relative path -> sha256 computed while writing) by
    the writing thread once the file is in place; `lock` serialises that with the training
    thread's own changes to the stage (hold it around them).
    """

    def __init__(self, stage: Any = None):
        self.stage = stage
        self.lock = threading.Lock()
        self._pending: dict[Path, Future] = {}
        self._failed: BaseException | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medcli-checkpoints")
        self._closed = False

    def write(self, contents: dict[Path, dict], device) -> None:
        for path in [*contents, *(path for path, future in self._pending.items() if future.done())]:
            self._wait(path)  # and an earlier write that failed raises here, on the training thread
        copies, ready = snapshot(list(contents.values()), device)
        for path, copy in zip(contents, copies):
            self._pending[path] = self._thread.submit(self._write, path, copy, ready)

    def busy(self, path: Path) -> bool:
        """Whether an earlier write of `path` is still under way."""
        future = self._pending.get(path)
        return future is not None and not future.done()

    def _write(self, path: Path, content: dict, ready: list) -> str:
        if self._failed is not None:  # a later checkpoint never lands after an earlier one failed
            raise self._failed  # (last.pt naming a best epoch whose best.pt was never written)
        try:
            for event in ready:  # the host copies are complete
                event.synchronize()
            digest = write(path, content)
        except BaseException as exc:
            self._failed = exc
            raise
        if self.stage is not None:
            with self.lock:
                self.stage.record(path, digest)
        return digest

    def _wait(self, path: Path) -> None:
        future = self._pending.get(path)
        if future is None:
            return
        try:
            future.result()
        finally:
            if future.done():  # a Ctrl-C during the wait leaves the write pending
                self._pending.pop(path, None)

    def wait(self) -> None:
        """Return when every checkpoint asked for is on disk (and recorded); a failed write raises here."""
        for path in list(self._pending):
            self._wait(path)

    def close(self, raise_errors: bool = True, leaving: BaseException | None = None) -> None:
        """Finish the pending writes, then stop the thread. A second Ctrl-C while waiting does
        not abandon a write half done (it is re-raised once the write is finished); without
        `raise_errors` a failed write is one warning (another error, `leaving`, is already on
        its way; the writes queued behind a failed one raise its error again: said once)."""
        if self._closed:
            return
        interrupted, said = None, leaving
        while True:
            try:
                self.wait()
                break
            except KeyboardInterrupt as exc:
                interrupted = interrupted or exc
                console.warn("finishing the checkpoint being written (the previous one stays until it is complete)")
            except Exception as exc:
                if raise_errors and interrupted is None:
                    self._thread.shutdown(wait=True)
                    self._closed = True
                    raise
                if exc is not said:  # the writes queued behind a failed one raise its error again
                    console.warn(f"a checkpoint write failed: {exc}")
                said = exc
        self._thread.shutdown(wait=True)
        self._closed = True
        if interrupted is not None:
            raise interrupted


@contextmanager
def writing(stage: Any = None, paths: tuple[Path, ...] = ()) -> Iterator[Writer]:
    """A `Writer` for one stage of training: the temporary files a killed writer of `paths` left
    are removed first (the caller holds the stage's lock, so none is being written), and on the
    way out, normally, on Ctrl-C/SIGTERM or on an error, the pending writes finish, so the last
    checkpoint asked for is complete on disk and recorded before the stage ends."""
    for path in paths:
        for partial in fileio.partial_files(path):
            partial.unlink(missing_ok=True)
    writer = Writer(stage)
    try:
        yield writer
    except BaseException as exc:
        writer.close(raise_errors=False, leaving=exc)
        raise
    writer.close()


def read(path: Path, run: Run) -> dict:
    """`run`'s last.pt as saved, or a one-line UsageError for a damaged file or another run's
    (its `owner`). A last.pt from before owners were recorded whose sha256 is not the one the
    train stage recorded is a warning: it may be another run's, or this run's own written
    after the manifest was last saved (a kill between the two)."""
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign file: one line naming the fix
        raise UsageError(f"cannot read {path} ({type(exc).__name__}); the checkpoint is damaged, "
                         f"start a new run") from None
    missing = [key for key in RESUME_KEYS if key not in _SINCE_SELECTION
               and (not isinstance(checkpoint, dict) or key not in checkpoint)]
    if missing:
        raise UsageError(f"{path} is not a medcli training checkpoint (no {', '.join(missing)}); "
                         f"the checkpoint is damaged, start a new run")
    mine, relative = owner(run), run.relative(path)
    recorded = run.stages.get("train", {}).get("artefacts", {}).get(relative)
    if checkpoint.get("owner") not in (None, mine):
        other = checkpoint["owner"]
        raise UsageError(f"{relative} of run {run.run_dir} was written by another run ({other.get('run_id')}"
                         + (f", uid {other['uid'][:8]}" if other.get("uid") else "")
                         + "); restore this run's own last.pt or start a new run")
    if "owner" not in checkpoint and recorded and fileio.sha256_file(path) != recorded:
        console.warn(f"{relative} of run {run.run_dir} is not the one its manifest recorded: written after the "
                     "manifest was last saved (a kill in between), or another run's copied in (a last.pt of an "
                     "older medcli names no run); resuming from it")
    return checkpoint


def restore(state: Any, checkpoint: dict, run: Run, device) -> None:
    """Put last.pt's weights (and their EMA), optimizer, schedule, scaler, random streams,
    history and monitored values into `state`."""
    from medcli import models

    models.load_state(state.model, checkpoint["model"], run.spec["name"], run.relative(run.checkpoint_path("last")),
                      "restore the run's own checkpoint or start a new run")
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"] and state.scaler.is_enabled():  # an fp16 scale survives only where fp16 runs
        state.scaler.load_state_dict(checkpoint["scaler"])
    state.set_rng(checkpoint["rng"], device)
    state.epoch = int(checkpoint["epoch"])
    state.history = list(checkpoint["history"])
    # a last.pt from before train_seconds was kept: its epochs' whole seconds (validation too)
    state.train_seconds = float(checkpoint.get("train_seconds", sum(row["seconds"] for row in state.history)))
    state.best = dict(checkpoint["best"])
    state.bad_epochs = int(checkpoint["bad_epochs"])
    state.scores = list(checkpoint.get("scores") or [])
    if state.ema is not None:
        if checkpoint.get("ema") is None:
            raise UsageError(f"{run.relative(run.checkpoint_path('last'))} has no EMA weights for the run's "
                             f"{run.config['select']['rule']} rule; the checkpoint is damaged, start a new run")
        state.ema.module.load_state_dict(checkpoint["ema"])
