"""`medcli train`: one training loop for CNNs and ViTs, resumable, reproducible and fast.

Shaped like torchvision's references/classification/train.py: `train_one_epoch`, `evaluate`,
and `train` / `resume` as the two entry points (the options become a config in
`medcli.config`; the optimizer, schedule and strict mode are `medcli.optim`'s). Each split
lives on the training device as one uint8 tensor (in pinned host memory when it exceeds
--data-budget, copied batch by batch: `medcli.feed`); each epoch draws a
seeded permutation and batches are made by indexing, then
augmented, resized and normalised on the device (`medcli.augment`). There is no DataLoader:
at 28 px the model, not the data, is the cost.

Every epoch writes `checkpoints/last.pt` (model, optimizer, scheduler, scaler, RNG states,
history, the weights' EMA and the monitored values; skipped, not waited for, while the
previous one is still being written, except after the last epoch and before a best.pt, which
is never ahead of it), `checkpoints/best.pt` when the run's
best-checkpoint rule (`medcli.selection`: epoch by epoch, or the mean of a window of epochs
of the EMA weights on a small validation split) improves or ties (the later of equal
epochs: it trained longer at a lower learning rate),
`history.csv` and `figures/curves.png`, all atomically (the checkpoints by a background
thread while the next epoch trains: `medcli.checkpoints`). `resume`
restores all of it, so an interrupted and resumed run ends with the same weights as an
uninterrupted one.

`medcli.datasets` (numpy) and torch are imported inside functions.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from medcli import augment, checkpoints, console, distributed, feed, inference, optim, selection
from medcli.config import MIN_BATCH, fine_tune_lr, fit_to_data, resolve_config, run_name
from medcli.errors import MedcliError, UsageError, check_stop
from medcli.manifest import environment
from medcli.names import MONITORS
from medcli.run import Run
from medcli.selection import compare, monitored
from medcli.tasks import Task

if TYPE_CHECKING:
    from medcli import datasets

__all__ = [
    "EVAL_BATCH", "HISTORY_COLUMNS", "State", "bn_images", "check_finite", "check_launch", "check_sync_bn", "compare",
    "compiled", "generators", "monitored", "reestimate_batchnorm", "resume", "summary", "train", "train_one_epoch",
    "use_cpu_threads",
]

EVAL_BATCH = 512
# Training images whose BatchNorm statistics replace the running averages before every
# validation (and so in every checkpoint): evenly spaced, no augmentation; an eighth of the
# split within [BN_IMAGES_MIN, BN_IMAGES_MAX], so the pass (forward only) costs about 1/24 of
# a training epoch. On a 546-image set the full split took 32 % of the epoch's training time.
BN_IMAGES_MIN, BN_IMAGES_MAX, BN_SHARE = 256, 1024, 1 / 8
# The curves figure is redrawn at most this often (and after the last epoch): on small
# datasets an epoch lasts seconds and matplotlib took a sixth of it.
CURVES_EVERY_S = 30.0
# history.csv; the val columns are those of the weights the best-checkpoint rule ranks (the EMA's under `ema-window`)
HISTORY_COLUMNS = ("epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_auc", "val_f1", "seconds")


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------

def generators(seed: int) -> dict:
    """The data order's and the augmentation's random streams of a run (CPU generators: the same
    streams on any device), each seeded apart from the other and from the model's (the global
    stream, torch.manual_seed(seed): its initialisation, dropout)."""
    import torch

    return {"data_gen": torch.Generator().manual_seed(distributed.derived_seed("data", seed)),
            "aug_gen": torch.Generator().manual_seed(distributed.derived_seed("augment", seed))}


@dataclass
class State:
    """Everything that changes while training, and what last.pt stores to resume it."""

    model: Any
    forward: Any  # the model, or its torch.compile wrapper
    optimizer: Any
    scheduler: Any
    scaler: Any
    data_gen: Any  # CPU generator: epoch permutations
    aug_gen: Any  # CPU generator: augmentation and MixUp draws (batches follow it on any device)
    task: Task
    epoch: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": None, "value": None})
    bad_epochs: int = 0
    curves_at: float = -math.inf  # perf_counter() of the last curves figure
    ema: Any = None  # timm's ModelEmaV3 of the model (the `ema-window` rule), else None
    scores: list = field(default_factory=list)  # the monitored value of every epoch
    step: Any = None  # --compile: the compiled optimizer step (`optim.compiled_step`); None: the scaler's
    train_seconds: float = 0.0  # in the training steps, every epoch so far (kept in last.pt for a resume)

    def rng(self, device) -> dict:
        """Every random stream, with the device type it was taken on (the CUDA states only
        apply to CUDA; the data and augmentation generators live on the CPU everywhere)."""
        import torch

        state = {"torch": torch.get_rng_state(), "data": self.data_gen.get_state(), "aug": self.aug_gen.get_state(),
                 "device_type": device.type}
        if device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng(self, state: dict, device) -> None:
        """Restore the streams saved by `rng`. On the same device type the run continues
        bit-identically; on another one (or a machine with fewer GPUs) what can be restored is,
        and the rest is re-seeded from the run's seed and epoch, with a warning."""
        import torch

        torch.set_rng_state(state["torch"])
        self.data_gen.set_state(state["data"])
        saved_type = state.get("device_type", "cuda" if "cuda" in state else "cpu")
        try:
            self.aug_gen.set_state(state["aug"])
        except RuntimeError:  # a checkpoint from before the generator moved to the CPU (a CUDA state)
            self.aug_gen.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.data_gen)))
            console.warn("the checkpoint's augmentation stream belongs to another device type; re-seeded it")
        if saved_type != device.type:
            console.warn(f"resuming on {device.type} a run that trained on {saved_type}: it continues from the "
                         f"same weights and optimizer state, but not bit-identically")
        elif device.type == "cuda" and state.get("cuda"):
            saved = state["cuda"]
            for index in range(min(len(saved), torch.cuda.device_count())):
                torch.cuda.set_rng_state(saved[index], index)


def check_sync_bn(config: dict, ctx: distributed.Context) -> None:
    """--sync-bn for a new run of one process: it would do nothing, yet be recorded (and split
    its runs from the same runs without it in `aggregate`)."""
    if config.get("sync_bn") and not ctx.enabled:
        raise UsageError("--sync-bn synchronises BatchNorm over the processes of a distributed run; with one "
                         "process it does nothing: drop it, or train with --nproc N")


def global_batch(config: dict, ctx: distributed.Context, n: int | None = None, most: int | None = None) -> int:
    """Images per optimizer step over all processes: --batch-size (at most the `n` training
    images), each process taking an equal slice of it. `most`: the most processes the data
    allows, for the error that asks for fewer (by default batch // MIN_BATCH)."""
    batch, world = config["batch_size"], ctx.world_size
    if n is not None and n < MIN_BATCH * world:
        if world == 1 or n < MIN_BATCH:
            raise UsageError(f"the training split has {console.plural(n, 'image')}; training needs at least "
                             f"{MIN_BATCH * world} ({MIN_BATCH} a step for BatchNorm and MixUp in each process)")
        raise UsageError(f"{n} training images allow at most {n // MIN_BATCH} processes ({MIN_BATCH} images each a "
                         f"step, which BatchNorm and MixUp need); start fewer processes (--nproc)")
    if batch % world:
        raise UsageError(f"--batch-size {batch} is the global batch and must split evenly over {world} "
                         f"processes; use a multiple of {world}")
    if batch // world < MIN_BATCH:
        given = "--batch-size" if config["batch_source"] == "--batch-size" else "the default batch size"
        fewer = batch // MIN_BATCH if most is None else most
        raise UsageError(f"{given} {batch} gives each of {world} processes {batch // world} image a step; BatchNorm "
                         f"and MixUp need {MIN_BATCH}: pass --batch-size {MIN_BATCH * world} or more, or "
                         + (f"use at most {fewer} processes" if fewer > 1 else "train in one process"))
    if n is not None:
        batch = min(batch, n - n % world)
    return batch


def check_launch(nproc: int, **options: Any) -> None:
    """What `train --nproc N` checks before it starts N processes (each would find the same, N
    times, and later): the options resolve, there is a GPU for each process on CUDA, and the
    batch fitted to the training split (as each process will fit it) splits over them."""
    from medcli import datasets

    with console.silenced():  # rank 0 says these warnings again
        config = resolve_config(**options)
    distributed.check_gpus(nproc, config["device"])
    # said here, once: the record it saves (a changed file recorded again) is current for the processes
    n_train = datasets.resolve(config["root"], config["dataset"], config["size"])[1]["n_samples"]["train"]

    def batch(processes: int, most: int | None = None) -> int:
        return global_batch(fit_to_data(config, n_train, processes), distributed.Context(world_size=processes), n_train,
                            most)

    def allows(processes: int) -> bool:
        try:
            batch(processes)
        except UsageError:
            return False
        return True

    with console.silenced():
        if not allows(nproc):  # the default batch is fitted to each count: the most that works is searched for
            batch(nproc, most=max((k for k in range(1, nproc) if allows(k)), default=1))


def check_resume_launch(path: str | os.PathLike, nproc: int, device: str | None = None) -> None:
    """What `train --resume RUN --nproc N` checks before it starts N processes: the run is
    not finished, there is a GPU for each process on CUDA, and the run's own batch (which a
    resume keeps) splits over them, at least MIN_BATCH images each."""
    run = Run.open(path)
    _require_unfinished(run)
    run.refuse_if_busy("train")
    distributed.check_gpus(nproc, inference.resolve_device(device).type if device not in (None, "auto")
                           else run.config["device"])
    batch = run.config["batch_size"]
    if batch % nproc or batch // nproc < MIN_BATCH:
        fits = [k for k in range(2, batch // MIN_BATCH + 1) if batch % k == 0]
        raise UsageError(f"run {run.run_dir} trains with a global batch of {batch} images, which does not split "
                         f"over {nproc} processes in equal shares of at least {MIN_BATCH}; resume with "
                         + (f"--nproc {' or '.join(map(str, fits))}" if fits else "one process (no --nproc)"))


def _require_unfinished(run: Run) -> None:
    if run.status("train") == "completed":
        epochs = run.stages["train"].get("summary", {}).get("epochs_run")
        done = f" ({console.plural(epochs, 'epoch')})" if epochs is not None else ""
        raise UsageError(f"run {run.run_dir} already finished training{done}; evaluate it with "
                         f"'{run.command('evaluate')}' or start a new run")


def train_one_epoch(state: State, data: feed.Data, prep: dict, config: dict, device, bar, task,
                    ctx: distributed.Context = distributed.Context()) -> dict:
    """One pass over a seeded permutation of the training split.

    Every process draws the same permutation and the same augmentation (and MixUp)
    parameters for each global batch, then augments and runs only its slice: the batches do
    not depend on the number of processes (dropout masks do: `distributed.seed_model`). MixUp partners from other slices are
    augmented here too (with their own parameters), so the mixed images are the ones one
    process would make.

    The host never waits for the device inside the epoch: the permutation and the epoch's
    augmentation and MixUp draws (`augment.draw_epoch`: the numbers a draw per step would
    make) reach the device in one copy each, and losses and hits are summed there and read
    once, at the end. The progress bar follows images and the learning rate meanwhile, and
    shows loss and accuracy when the epoch ends.

    Returns mean loss and accuracy (against the unmixed labels, over all processes), the
    learning rate of the epoch's last step, seconds (until the device is done), images and images/s (all processes' images).
    Incomplete last batches are dropped (a batch of one would break BatchNorm and skew the
    step count the schedule was built for).
    """
    import torch

    distributed.seed_model(ctx, config["seed"], state.epoch)  # each process its own dropout masks
    aug = augment.Augment.from_dict(config["augment"])
    n = len(data)
    batch = global_batch(config, ctx, n)
    mine = ctx.shard(batch)
    steps = n // batch
    refresh = max(1, steps // 50)  # progress-bar updates
    order = torch.randperm(n, generator=state.data_gen)
    draws = augment.draw_epoch(steps, batch, aug, config["mixup_alpha"], state.aug_gen)
    positions, moved = feed.to_device(order, device), draws.map(lambda values: feed.to_device(values, device))
    state.model.train()
    graphs = config.get("compile_mode") == "reduce-overhead"
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, correct
    start = time.perf_counter()
    bar.reset(task, total=steps * batch, description=f"epoch {state.epoch + 1}")
    for step in range(steps):
        check_stop()  # a SIGTERM whose KeyboardInterrupt a finaliser swallowed
        rows = slice(step * batch, (step + 1) * batch)
        index, host = positions[rows], order[rows]
        params = {key: values[step] for key, values in moved.params.items()}
        labels = data.labels[index[mine]]
        x = augment.apply(data.take(index[mine], host[mine]), prep, aug, augment.take(params, mine))
        targets = state.task.targets(labels)
        if config["mixup_alpha"] > 0:
            partners = moved.perms[step][mine]
            if ctx.enabled:
                other = index[partners]
                x_other = augment.apply(data.take(other, host[draws.perms[step][mine]]), prep, aug,
                                        augment.take(params, partners))
                t_other = state.task.targets(data.labels[other])
            else:
                x_other, t_other = x[partners], targets[partners]
            lam = draws.lams[step]
            x, targets = torch.lerp(x_other, x, lam), torch.lerp(t_other, targets, lam)
        if config["channels_last"]:
            x = x.contiguous(memory_format=torch.channels_last)
        if graphs:  # a new step: the last one's graph outputs (read above) may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with inference.autocast(device, config["amp"]):
            logits = state.forward(x)
        loss = state.task.loss(logits.float(), targets, config["label_smoothing"])
        state.optimizer.zero_grad(set_to_none=True)
        state.scaler.scale(loss).backward()
        if state.step is not None:
            state.step()
        else:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        lr = optim.current_lr(state.scheduler)  # the host's value: the optimizer's may be a device tensor
        state.scheduler.step()
        if state.ema is not None:  # the same parameters on every process: the same EMA
            state.ema.update(state.model, step=state.scheduler.last_epoch)
        totals += torch.stack([loss.detach().double() * labels.shape[0], state.task.hits(logits.detach(), labels)])
        if (step + 1) % refresh == 0 or step + 1 == steps:
            bar.update(task, completed=(step + 1) * batch, status=f"lr {optim.current_lr(state.scheduler):.2e}")
    loss_sum, correct = distributed.sum_(ctx, totals).tolist()  # waits for the device: the epoch's work is done
    seconds = time.perf_counter() - start
    seen = steps * batch
    bar.update(task, status=f"loss {loss_sum / seen:.3f} acc {correct / seen:.3f}")
    return {"loss": loss_sum / seen, "acc": correct / seen, "lr": lr, "seconds": seconds, "images": seen,
            "images_per_s": seen / seconds}


def evaluate(model, data: feed.Data, prep: dict, device, task: Task,
             ctx: distributed.Context = distributed.Context()) -> dict:
    """Validation metrics (`task.metrics`) over the whole split: each process predicts its
    share, the logits are gathered, and every process gets the same metrics."""
    import torch

    distributed.sync_buffers(ctx, model)
    mine = ctx.shard(len(data))
    logits = inference.predict_logits(model, data.images[mine], prep, batch_size=EVAL_BATCH, device=device,
                                      amp="off",  # float32 like `medcli evaluate`: history and best.pt agree with it
                                      pad=torch.device(device).type == "cuda")  # one shape: cuDNN tunes it once
    logits = torch.cat([part for part in distributed.gather(ctx, logits.cpu()) if len(part)])  # a share may be empty
    probs = task.probs_t(logits.double()).numpy()
    return task.metrics(data.labels.cpu().numpy(), probs)


def reestimate_batchnorm(model, data: feed.Data, prep: dict, config: dict, device) -> None:
    """Precise BatchNorm (Wu & Johnson, "Rethinking 'Batch' in BatchNorm", 2021): replace the
    running statistics, an average that lags weights moving fast early in training or at a
    high learning rate, by those of the current weights on `bn_images(n)` training images
    (evenly spaced, as the model sees them at evaluation). With few steps per epoch (small
    datasets, `--epochs 1`) the lagging averages made the evaluated model collapse to one
    class while training accuracy rose. torch's `update_bn` does the pass; a model without
    BatchNorm (ViTs) is left alone. Every process computes the same statistics."""
    import torch
    from torch.optim.swa_utils import update_bn

    n = len(data)
    index = torch.linspace(0, n - 1, bn_images(n)).round().long().to(data.labels.device)

    def batches():  # equal sizes (`bn_images`): update_bn averages batches with equal weight
        for chunk in torch.tensor_split(index, math.ceil(len(index) / EVAL_BATCH)):
            x = augment.preprocess(data.take(chunk), prep)
            yield x.contiguous(memory_format=torch.channels_last) if config["channels_last"] else x

    with inference.autocast(device, config["amp"]):
        update_bn(batches(), model)


def bn_images(n: int) -> int:
    """How many of `n` training images re-estimate BatchNorm (see BN_IMAGES_MIN): a multiple of
    the number of EVAL_BATCH batches, so they are equal and cuDNN autotunes one shape (an odd
    count above one batch, e.g. 601, loses one image; no MedMNIST training split has one)."""
    m = min(n, max(BN_IMAGES_MIN, min(BN_IMAGES_MAX, round(n * BN_SHARE))))
    return m - m % math.ceil(m / EVAL_BATCH)


def check_finite(model, epoch: int, config: dict) -> None:
    """Stop a diverged run with one line: weights that are NaN or infinite never come back, so
    training on would only overwrite last.pt with them. (A step whose fp16 gradients overflow
    is skipped by the GradScaler and leaves the weights finite.)"""
    import torch

    # One host sync for the whole model: the largest |weight| of every tensor (NaN propagates).
    largest = torch._foreach_norm([p.detach() for p in model.parameters()], float("inf"))
    if torch.stack(largest).isfinite().all():
        return
    hint = "lower --lr" + (" or train with --amp bf16" if config["amp"] == "fp16" else "")
    kept = "last.pt keeps an earlier epoch" if epoch > 1 else "no checkpoint was written"
    raise MedcliError(f"training diverged in epoch {epoch}: the weights are no longer finite ({kept}); {hint}")


def should_stop(bad_epochs: int, patience: int | None) -> bool:
    """Early stopping: `patience` epochs in a row without improvement (None: never)."""
    return bool(patience) and bad_epochs >= patience


# ---------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------

def train(**options: Any) -> Run:
    """Train a new run (options as `config.resolve_config`); returns it.

    Everything that can be wrong with the options (model, dataset, size, weights, device) is
    checked before the run directory exists, so a usage error leaves nothing behind.
    """
    import torch

    from medcli import datasets, models

    config = resolve_config(**options)
    with distributed.session(config["device"], config["collective_timeout"]) as ctx:
        check_sync_bn(config, ctx)
        splits = _load(config, ctx)
        n_train = len(splits.labels["train"])
        config = fit_to_data(config, n_train, ctx.world_size)
        steps = n_train // global_batch(config, ctx, n_train)
        config = selection.choose(config, len(splits.labels["val"]), config["epochs"] * steps)
        channels = splits.images["train"].shape[-1]
        num_classes = len(datasets.class_names(config["dataset"]))
        with optim.determinism(config, torch.device(config["device"])):
            model, spec = _create_model(config, num_classes, channels)
            config = fine_tune_lr(config, spec["pretrained"])
            replaced = _strict_model(model, config)
            prep = augment.make_prep(config["input_size"], channels,
                                     models.pretrained_stats(model, spec, _source_preprocess(spec.get("weights"))))
            run = distributed.from_main(ctx, lambda: Run.create(
                config["runs_dir"], run_name(config), config=config, dataset=splits.record, model=spec,
                preprocess=prep,
                environment={**environment(config["device"], config["seed"], config["deterministic"]),
                             "determinism": optim.determinism_record(config, replaced), "distributed": ctx.record()},
            ))
            console.info(f"run {run.run_dir}: {config['model']} ({spec.get('params', 0) / 1e6:.1f} M params) on "
                         f"{config['dataset']} {config['size']} px -> {config['input_size']} px, {config['device']}"
                         f"{f' x {ctx.world_size} processes ({ctx.backend})' if ctx.enabled else ''}, "
                         f"amp {config['amp']}, lr {config['lr']:g} ({config['lr_source']})"
                         + (f"; data: {note}" if (note := datasets.provenance(splits.record)) else ""))
            fit(run, model, splits, checkpoint=None, ctx=ctx)
    return run


def resume(path: str | os.PathLike, device: str | None = None, collective_timeout: float | None = None, root=None) -> Run:
    """Continue an interrupted run from its last.pt, on its own device or `device` (another device type
    continues from the same state, but not bit-identically), with its collective timeout or
    `collective_timeout` (`distributed.collective_timeout`), on its own data file (under `root` if given)."""
    import torch

    from medcli import models

    run = Run.open(path)
    _require_unfinished(run)
    if not distributed.from_env().enabled:  # a job's other ranks would find its own rank 0 at work
        run.refuse_if_busy("train")  # before the data loads (`fit`'s stage lock refuses it again)
    config = dict(run.config)
    if device is not None and device != "auto":
        dev = inference.resolve_device(device)
        if dev.type != torch.device(config["device"]).type:  # the precision follows the new device's default
            config["amp"] = inference.resolve_amp(dev, None)
        config["device"] = str(dev)
    else:  # its own device: a run trained on a GPU this machine lacks is one line, not a driver's error
        try:
            inference.resolve_device(config["device"])
        except UsageError:
            raise UsageError(f"run {run.run_dir} trained on {config['device']}, which this machine does not have; "
                             f"continue it on another device with '{run.resume_command()} --device cpu' "
                             "(or --device cuda)") from None
    dev = torch.device(config["device"])
    inference.resolve_amp(dev, config["amp"])  # refuses fp16 on a CPU, bf16 on a GPU without it
    last = run.checkpoint_path("last")
    restart = not last.is_file() and run.checkpoint_path("best").is_file()
    # best.pt was written before last.pt until medcli wrote last.pt first: such a run that never
    # recorded a last.pt was stopped before the first one was complete (a later epoch skipped
    # its own while that one was written); one that recorded it lost it (with best.pt, too:
    # nothing is there to say what is lost)
    if not last.is_file() and run.relative(last) in run.stages.get("train", {}).get("artefacts", {}):  # none: stopped first
        raise UsageError(f"run {run.run_dir} finished epochs but has no {run.relative(last)} to resume from; "
                         f"restore the file or start a new run")
    checkpoint = checkpoints.read(last, run) if last.is_file() else None
    timeout = distributed.collective_timeout(collective_timeout, run.config.get("collective_timeout"))
    with distributed.session(config["device"], timeout) as ctx:
        global_batch(config, ctx)
        config["collective_timeout"] = timeout
        splits = _load(config, ctx, run, root)
        before = run.data.get("environment", {}).get("distributed", {"world_size": 1, "backend": None})
        moved = (config["device"], config["amp"]) != (run.config["device"], run.config["amp"]) or before != ctx.record()
        elsewhere = (f"resuming on {config['device']} (amp {config['amp']}) with "
                     f"{console.plural(ctx.world_size, 'process', 'processes')}; the run trained on "
                     f"{run.config['device']} (amp {run.config['amp']}) with "
                     f"{console.plural(before['world_size'], 'process', 'processes')}")

        def change(data: dict) -> None:
            data["config"].update({key: config[key] for key in ("device", "amp", "collective_timeout")})
            environment = data.setdefault("environment", {})
            environment["distributed"] = ctx.record()
            # config holds where the run goes on; each resume says where the epochs after it ran
            environment.setdefault("resumes", []).append({
                "after_epoch": checkpoint["epoch"] if checkpoint else 0, "device": config["device"], "amp": config["amp"],
                "world_size": ctx.world_size})

        def begin() -> None:  # rank 0, once the stage is locked: a refused resume changes and says nothing
            if moved:
                console.info(elsewhere)
            console.info(f"resuming {run.run_dir} after epoch {checkpoint['epoch'] if checkpoint else 0}")
            if restart:
                console.warn(f"run {run.run_dir} was stopped before its first {run.relative(last)} was complete: "
                             "training starts again from epoch 1 (best.pt is replaced)")
            run.update(change)

        run.data["config"].update({key: config[key] for key in ("device", "amp", "collective_timeout")})
        with optim.determinism(config, dev):
            if checkpoint is None:  # interrupted before the first epoch ended: start it again
                model = _starting_model(run, config)
            else:
                model = models.rebuild(run.spec)
            _strict_model(model, config)
            fit(run, model, splits, checkpoint=checkpoint, ctx=ctx, begin=begin)
    return run


def _source_preprocess(weights: str | None) -> dict | None:
    """The preprocessing of the medcli run whose checkpoint `weights` is (fine-tuning keeps the
    statistics it trained with); None for other weights, with a warning where that run's
    manifest cannot be read."""
    try:
        source = Run.of_checkpoint(weights)
    except UsageError as exc:
        console.warn(f"{weights} is a checkpoint of a run whose manifest cannot be read ({exc}): its inputs are "
                     "normalised with the model's pretrained statistics, not the ones that run trained with")
        return None
    return source.data.get("preprocess") if source is not None else None


def _create_model(config: dict, num_classes: int, channels: int):
    """(model, spec) for the config (seeded by the caller's `determinism` context)."""
    from medcli import models

    return models.create(config["variant"], num_classes, channels, config["input_size"],
                         pretrained=config["pretrained"], weights=config["weights"], **config["model_overrides"])


def _starting_model(run: Run, config: dict):
    """The model a run started from, built again (a resume before its first checkpoint): from the
    weights its spec says were loaded (a file, or ImageNet's), not those the options asked for;
    refused when they cannot be had as they were (a changed file, ImageNet's out of reach)."""
    recorded = run.spec
    given = recorded.get("weights")
    model, spec = _create_model({**config, "pretrained": bool(recorded["pretrained"]), "weights": given},
                                recorded["num_classes"], recorded["in_chans"])
    if spec["pretrained"] != recorded["pretrained"] or recorded.get("weights_sha256") not in (None, spec.get("weights_sha256")):
        what = f"the weights file {given}, which has changed since" if given else "ImageNet weights, which cannot be loaded now"
        raise UsageError(f"run {run.run_dir} was stopped before its first checkpoint and started from {what}; "
                         "start a new run")
    return model


def _strict_model(model, config: dict) -> list[str]:
    """In strict mode, replace the modules without a deterministic CUDA kernel; their names."""
    from medcli import models

    return models.make_deterministic(model) if config["deterministic"] else []


def _load(config: dict, ctx: distributed.Context, run: Run | None = None, root=None) -> datasets.Splits:
    """The train and val splits (fit never tests) of a new run, or a resumed `run`'s own file (`Run.load_data`:
    under `root` if given), mapped from the dataset cache when large (`datasets.use_cache`)."""
    from medcli import datasets

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or ctx.world_size) if ctx.enabled else 1  # on this node
    options = dict(splits=("train", "val"), mapped=None, processes=local)
    splits = (run.load_data(root, same_file=True, **options) if run is not None
              else datasets.load(config["root"], config["dataset"], config["size"], **options))
    if splits.cache is not None:
        console.info(f"train and val splits mapped from {splits.cache} (one copy per node, shared by its processes)")
    return splits


def fit(run: Run, model, splits: datasets.Splits, checkpoint: dict | None,
        ctx: distributed.Context = distributed.Context(), begin: Callable[[], None] | None = None) -> None:
    """The epoch loop inside the run's train stage (locked; interrupted on Ctrl-C). In a
    distributed job every process trains; rank 0 alone records the stage and writes files,
    first calling `begin` (a resume records its changes there). A resumed run's history, curves and summary are
    written again from its checkpoint, which may hold an epoch they do not (the interruption
    came between them), and an early stop it holds ends the run."""
    import torch

    from medcli import datasets

    config = run.config
    device = torch.device(distributed.device_for(ctx, config["device"]))
    prep = run.data["preprocess"]
    with ExitStack() as stack:  # the stage first: a stop or failure while the model and data are set up is recorded
        st = stack.enter_context(run.stage("train")) if ctx.is_main else None
        stack.enter_context(distributed.peers(ctx, run.run_dir))
        if ctx.is_main:
            _warn_if_device_shared(config["device"], ctx)
        if device.type == "cpu":
            use_cpu_threads(ctx)
        if config.get("sync_bn") and ctx.enabled:
            if device.type == "cuda":
                model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif ctx.is_main:  # a --sync-bn run resumed on another device (torch's SyncBatchNorm is CUDA-only)
                console.warn(f"--sync-bn needs CUDA: on {device.type} each process keeps its own BatchNorm statistics")
        model.to(device)
        if config["channels_last"]:
            model.to(memory_format=torch.channels_last)
        budget = feed.data_budget(config, device)
        train_data = feed.Data.of(splits, "train", device, budget)
        val_data = feed.Data.of(splits, "val", device, budget - (0 if train_data.streamed else train_data.images.numel()))
        steps = len(train_data) // global_batch(config, ctx, len(train_data))
        optimizer = optim.make_optimizer(model, config, device)
        select = selection.rule(config)
        ema = selection.make_ema(model, select)  # before DDP wraps the model, as timm's training script does
        forward = model
        if ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel

            forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        state = State(model=model, forward=compiled(forward, config), optimizer=optimizer,
                      scheduler=optim.make_scheduler(optimizer, config, steps),
                      scaler=torch.amp.GradScaler(device.type, enabled=config["amp"] == "fp16"),
                      **generators(config["seed"]), task=datasets.task(config["dataset"]), ema=ema)
        if checkpoint is not None:
            checkpoints.restore(state, checkpoint, run, device)
        optim.place_lr(optimizer, config, device)  # a device tensor the schedule fills (--compile, CUDA)
        state.step = optim.compiled_step(optimizer, config, state.scaler)
        bar = stack.enter_context(console.progress())
        writer = None if st is None else stack.enter_context(  # pending writes finish before the stage ends
            checkpoints.writing(st, (run.checkpoint_path("last"), run.checkpoint_path("best"))))
        epochs_task = bar.add_task("epochs", total=config["epochs"], completed=state.epoch, unit="epoch")
        batch_task = bar.add_task("epoch", total=steps, unit="img")
        stopped_early = checkpoint is not None and should_stop(state.bad_epochs, config["patience"]) \
            and state.epoch < config["epochs"]
        if st is not None and begin is not None:
            begin()
        if st is not None and checkpoint is not None:
            _mend_best(run, checkpoint, state, writer, device)
            _record_progress(run, st, state, stopped_early, True, writer.lock)
        while state.epoch < config["epochs"] and not stopped_early:
            started = time.perf_counter()
            train_stats = train_one_epoch(state, train_data, prep, config, device, bar, batch_task, ctx)
            state.train_seconds += train_stats["seconds"]
            check_finite(model, state.epoch + 1, config)
            ranked = model if state.ema is None else state.ema.module  # the weights the rule ranks (and best.pt holds)
            reestimate_batchnorm(ranked, train_data, prep, config, device)
            val = evaluate(ranked, val_data, prep, device, state.task, ctx)
            state.epoch += 1
            state.scores.append(monitored(val, select["monitor"]))
            if not state.history and ctx.is_main and val.get(MONITORS[select["monitor"]][0]) is None:
                console.warn(f"val {select['monitor']} is undefined (a class is absent from the validation split): "
                             + ("best.pt follows the mean AUC of the classes present" if state.scores[-1] is not None
                                else "best.pt follows the last epoch and --patience cannot stop early"))
            value = selection.smoothed(state.scores, select["window"], config["epochs"])
            change = compare(value, state.best["value"], select["monitor"])
            # A tie moves best.pt to this epoch (a 78-image validation set has 79 possible
            # accuracies; the later epoch trained longer at a lower learning rate), but only
            # a strict improvement resets --patience.
            is_best = change >= 0
            if is_best:
                state.best = {"epoch": state.epoch, "value": value}
            state.bad_epochs = 0 if change > 0 else state.bad_epochs + 1
            stopped_early = should_stop(state.bad_epochs, config["patience"]) and state.epoch < config["epochs"]
            if ranked is not model and (stopped_early or state.epoch == config["epochs"]):
                # last.pt's own statistics, once: training never reads them (train-mode BatchNorm
                # uses the batch's) and the EMA gets its own, so a mid-run last.pt (for resuming)
                # keeps the running averages; a second pass every epoch cost ~13 % of a 546-image run.
                reestimate_batchnorm(model, train_data, prep, config, device)
            state.history.append({
                "epoch": state.epoch, "lr": train_stats["lr"],
                "train_loss": train_stats["loss"], "train_acc": train_stats["acc"],
                "val_loss": val["loss"], "val_acc": val["accuracy"], "val_auc": val["auc"],
                "val_f1": val["f1_macro"], "seconds": round(time.perf_counter() - started, 3),
            })
            if st is not None:
                _record_epoch(run, st, state, val, train_stats, is_best, stopped_early, device, ctx, ranked, writer)
            bar.update(epochs_task, completed=state.epoch)
            console.info(_epoch_line(state, config, train_stats, val, is_best))
        if stopped_early:
            console.info(f"early stop: val {select['monitor']} did not improve for "
                         f"{console.plural(config['patience'], 'epoch')}")


def _record_epoch(run: Run, st, state: State, val: dict, train_stats: dict, is_best: bool, stopped_early: bool,
                  device, ctx: distributed.Context, ranked, writer: checkpoints.Writer) -> None:
    """Rank 0's files after an epoch: checkpoints (best.pt: the `ranked` weights, the model's or
    their EMA's; snapshotted here, written, hashed and recorded by the `writer`'s thread while
    the next epoch trains), history, curves, and the stage summary."""
    files = {"last": run.checkpoint_path("last"), "best": run.checkpoint_path("best")}  # hashed as they are written
    final = stopped_early or state.epoch == run.config["epochs"]
    # never wait for the disk (a later epoch's last.pt will do), except in an epoch best.pt
    # takes: last.pt is written first, so best.pt is never ahead of the last.pt a resume starts
    # from (a resumed run that did not rank that epoch best again would keep it under another
    # epoch's name), and a run stopped between the two has best.pt rebuilt (`_mend_best`)
    skip_last = not final and not is_best and writer.busy(files["last"])
    saved = {} if skip_last else {files["last"]: checkpoints.payload(state, val, full=True, device=device, run=run)}
    if is_best:
        saved[files["best"]] = checkpoints.payload(state, val, full=False, device=device, model=ranked)
    writer.write(saved, device)  # an unchanged best.pt keeps its file and hash
    _record_progress(run, st, state, stopped_early, final, writer.lock,
                     train_seconds=(seconds := round(state.train_seconds, 3)),
                     # all processes' images, each epoch the same number: the run's rate, and the last epoch's (warm)
                     images_per_s=round(state.epoch * train_stats["images"] / seconds, 1),
                     last_epoch_images_per_s=round(train_stats["images_per_s"], 1), world_size=ctx.world_size,
                     last_skipped=st.summary.get("last_skipped", 0) + skip_last)  # epochs whose last.pt was not written


def _mend_best(run: Run, checkpoint: dict, state: State, writer: checkpoints.Writer, device) -> None:
    """Before a resumed run trains: a run stopped after writing an epoch's last.pt and before
    its best.pt (or while writing it) gets that best.pt from last.pt, which holds the same
    weights (the EMA's under `ema-window`) and validation metrics. A best.pt ahead of last.pt
    (written before this order was kept) is named: the resumed run trains that epoch again."""
    path = run.checkpoint_path("best")
    try:
        import torch

        held = int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:  # absent, or cut short by the stop
        held = None
    if state.best["epoch"] == state.epoch != held:
        console.info(f"{run.relative(path)} of epoch {state.epoch} is written from {run.relative(run.checkpoint_path('last'))} "
                     "(the run stopped between the two)")
        weights = checkpoint["model"] if state.ema is None else checkpoint["ema"]
        writer.write({path: {"model": weights, "epoch": state.epoch, "metrics": checkpoint.get("metrics", {})}}, device)
    elif held is not None and held > state.epoch:
        console.warn(f"{run.relative(path)} holds epoch {held}, after last.pt's {state.epoch} (written before medcli "
                     f"kept them in order): epoch {held} is trained again and replaces it only if ranked best again")


def _record_progress(run: Run, st, state: State, stopped_early: bool, final: bool, lock, **summary) -> None:
    """history.csv, the curves (at the end, else every CURVES_EVERY_S) and the stage summary
    (with `summary`'s entries) from `state`, recorded in the stage under the writer's `lock`."""
    from medcli import reports, tables

    config, select = run.config, selection.rule(run.config)
    history = tables.write_table(run.history_file(), state.history, HISTORY_COLUMNS)  # hashed here
    with lock:  # the writer's thread records the checkpoints in the same stage entry
        st.summary.update(epochs_run=state.epoch, monitor=select["monitor"], stopped_early=stopped_early,
                          **selection.best_record(state.best, select, config["epochs"]), **summary)
        st.add(history)  # recorded before the curves are drawn (a second or so): a stop then loses no epoch
    if final or time.perf_counter() - state.curves_at >= CURVES_EVERY_S:
        curves = reports.save_curves(run.figure_file("curves"), state.history, run.data, state.best["epoch"],
                                     selection.describe(select, config["epochs"], short=True),
                                     val="val (EMA weights)" if state.ema is not None else "val")
        state.curves_at = time.perf_counter()
        with lock:
            st.add(curves)


def compiled(forward, config: dict):
    """The model as the training steps call it: itself, or with --compile its torch.compile
    wrapper in the run's --compile-mode. `reduce-overhead` records the forward and backward as
    CUDA graphs (torch's CUDA-graph trees) and replays them, one launch per graph instead of
    one per kernel; the inputs are copied into the graph's static buffers, the learning rate
    is a device tensor (`optim.place_lr`), and the step marks each new iteration. On the CPU
    torch skips the graphs and the mode compiles as `default` does."""
    import torch

    if not config["compile"]:
        return forward
    return torch.compile(forward, mode=config.get("compile_mode") or "default")


def _warn_if_device_shared(device: str, ctx: distributed.Context = distributed.Context()) -> None:
    """Warn (never kill) when another medcli training of this user runs on the same device:
    both will be slower, and a forgotten one is a common cause of 'training got slow'. The
    other processes of this job (children of the same launcher) are not others."""
    from medcli import processes

    for other in processes.other_trainings(device, exclude_parent=os.getppid() if ctx.enabled else None):
        console.warn(f"another medcli training (pid {other.pid}, running {other.age_s / 60:.0f} min) uses "
                     f"device {other.device or 'auto'}; both will be slower. If it is stale, end it alone with "
                     f"'kill {other.pid}' (list medcli's processes with 'medcli clean-processes')")


def use_cpu_threads(ctx: distributed.Context = distributed.Context()) -> None:
    """One thread per CPU this process may run on (affinity and cgroup quota, not the host's
    core count; shared among the processes of this job on this node), unless
    OMP_NUM_THREADS says otherwise.

    Oversubscription is expensive: OpenMP workers spin-wait for cores that other processes
    hold (measured 3x slower on 2 busy cores).
    """
    import torch

    from medcli import system

    if "OMP_NUM_THREADS" not in os.environ:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(max(1, system.usable_cpus() // max(1, local)))


def _epoch_line(state: State, config: dict, train_stats: dict, val: dict, is_best: bool) -> str:
    auc = f"{val['auc']:.4f}" if val["auc"] is not None else "n/a"
    return (f"epoch {state.epoch}/{config['epochs']}  train loss {train_stats['loss']:.4f} acc {train_stats['acc']:.4f}  "
            f"val{' (EMA)' if state.ema is not None else ''} loss {val['loss']:.4f} acc {val['accuracy']:.4f} auc {auc} f1 {val['f1_macro']:.4f}  "
            f"lr {train_stats['lr']:.2e}  {state.history[-1]['seconds']:.1f}s "
            f"{train_stats['images_per_s']:.0f} img/s{'  *best' if is_best else ''}")


def summary(run: Run) -> dict:
    """What `medcli train --json` prints: where the run is and how training ended."""
    stage = run.stages.get("train", {})
    return {"run_dir": str(run.run_dir.resolve()), "run_id": run.run_id, "model": run.config["model"],
            "dataset": run.config["dataset"], "size": run.config["size"], "status": stage.get("status"),
            **stage.get("summary", {})}
