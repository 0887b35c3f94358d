"""Benchmark `medcli train` on real BloodMNIST (PBC-derived); prints its numbers.

Parts (default: all):
  --overhead  medcli's training images/s for resnet18 at 28 px (augmentation, indexing,
              normalisation included) vs a bare forward+backward+step loop on random tensors,
              same model, batch and optimizer, same process. Target: >= 90%.
  --resnet    `medcli train --model resnet18 --reduced` end to end: wall time, test accuracy.
  --vit       `medcli train --model vit --reduced` end to end: wall time, test accuracy.
  --densenet  `medcli train --model densenet121 --reduced` end to end: wall time, test accuracy.
  --full N    the full default `medcli train --model resnet18` recipe (batch 128, SGD lr 0.1,
              label smoothing, the stem of the size policy) shortened to N epochs: test accuracy,
              and the projected wall time of the default epoch count at the measured time per
              epoch (history.csv's seconds; start-up and what follows the epochs counted once).
              Not part of the default set (hours of CPU time at the default epoch count).
The end-to-end runs train at the size of the --data file (28 px, or 64 px with
bloodmnist_pbc_64.npz). Test accuracy comes from the best checkpoint through
`inference.predict_logits`.

    .venv/bin/python scripts/bench_train.py --data ../shared/data/bloodmnist_pbc_28.npz [--resnet] [--vit]

The numbers are disturbed by anything else running on the machine: check `uptime` first.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist_pbc_28.npz"


def image_size(source: Path) -> int:
    """The image size of a BloodMNIST-layout npz (28, 64, ...), from its validation images."""
    with np.load(source) as archive:
        return int(archive["val_images"].shape[1])


def make_root(source: Path, directory: Path, n_train: int | None = None) -> Path:
    """A data root holding `source` under medmnist's file name for its size (optionally only the
    first n_train images)."""
    from medcli import datasets

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / datasets.filename("bloodmnist", image_size(source))
    if n_train is None:
        target.symlink_to(source.resolve())
    else:
        with np.load(source) as archive:
            arrays = {key: archive[key] for key in archive.files}
        arrays["train_images"] = arrays["train_images"][:n_train]
        arrays["train_labels"] = arrays["train_labels"][:n_train]
        np.savez(target, **arrays)
    return directory


def bare_images_per_s(batch: int, steps: int, warmup: int = 2) -> float:
    """A bare loop on random tensors: forward, loss, backward, SGD step (nothing else), in the
    memory format medcli trains CNNs in on CPU, so the ratio measures only the pipeline."""
    import torch
    import torch.nn.functional as F

    from medcli import config, models

    torch.manual_seed(0)
    model, _ = models.create("resnet18", 8, 3, 28)
    model.train()
    x = torch.randn(batch, 3, 28, 28)
    if config.CHANNELS_LAST_ON_CPU:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    y = torch.randint(0, 8, (batch,))
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return batch * steps / (time.perf_counter() - start)


def medcli_images_per_s(root: Path, runs: Path, batch: int) -> float:
    """images/s of medcli's own training loop (its second epoch: the first pays warm-up costs)."""
    from medcli import console, train

    console.configure(quiet=True)
    run = train.train(root=root, runs_dir=runs, model="resnet18", epochs=2, batch_size=batch, device="cpu")
    return run.stages["train"]["summary"]["last_epoch_images_per_s"]


def overhead(source: Path, work: Path, batch: int = 128, n_train: int = 128 * 6) -> None:
    from medcli import train

    train.use_cpu_threads()  # the thread policy medcli trains with
    root = make_root(source, work / "subset", n_train)
    steps = n_train // batch
    bare_before = bare_images_per_s(batch, steps)
    ours = medcli_images_per_s(root, work / "runs-overhead", batch)
    bare_after = bare_images_per_s(batch, steps)
    bare = (bare_before + bare_after) / 2
    print(f"[overhead] resnet18 28 px, batch {batch}, {steps} steps: bare loop {bare:.0f} img/s "
          f"({bare_before:.0f} / {bare_after:.0f}), medcli train {ours:.0f} img/s -> {100 * ours / bare:.1f}% of bare")


def end_to_end(model: str, source: Path, work: Path, extra: list[str], reduced: bool = True) -> None:
    from medcli import datasets, inference, models
    from medcli.run import Run

    size = image_size(source)
    root = work / f"full-{size}"
    if not root.exists():
        make_root(source, root)
    preset = ["--reduced"] if reduced else []
    runs = work / f"runs-{model}-{size}{'' if reduced else '-full'}"
    command = [sys.executable, "-m", "medcli", "--quiet", "train", "--model", model, *preset, "--size", str(size),
               "--root", str(root), "--runs-dir", str(runs), "--device", "cpu", *extra]
    label = f"[{model} {size} px {' '.join(preset + extra)}]"
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        print(f"{label} failed ({done.returncode}): {done.stderr.strip()}")
        return
    run = Run.open(done.stdout.strip())
    net = run.load_model("best", "cpu")
    splits = datasets.load(root, "bloodmnist", size)
    logits = inference.predict_logits(net, datasets.as_tensor(splits.images["test"]), run.data["preprocess"],
                                      batch_size=512, device="cpu")
    accuracy = float((logits.argmax(1).numpy() == splits.labels["test"]).mean())
    summary = run.stages["train"]["summary"]
    rule = "" if summary.get("select_rule", "epoch") == "epoch" else f", {summary['select_rule']} rule"
    print(f"{label} wall {wall / 60:.2f} min, epochs {summary['epochs_run']}, "
          f"best epoch {summary['best_epoch']} (val {summary['monitor']} {summary['best_value']:.4f}{rule}), "
          f"train {summary['images_per_s']:.0f} img/s (last epoch {summary['last_epoch_images_per_s']:.0f}), TEST accuracy {accuracy:.4f}  ({run.run_dir})")
    if not reduced:
        default_epochs = models.record(model).defaults["epochs"]
        with run.history_file().open() as history:
            epochs_s = sum(float(row["seconds"]) for row in csv.DictReader(history))
        projected = wall - epochs_s + epochs_s / summary["epochs_run"] * default_epochs  # start-up and the end once
        print(f"{label} projected wall for the default {default_epochs} epochs: {projected / 3600:.1f} h "
              f"({epochs_s / summary['epochs_run']:.0f} s per epoch, {wall - epochs_s:.0f} s outside the epochs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="bloodmnist_pbc_28.npz (or _64.npz: --resnet/--vit/--full then train at 64 px)")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--resnet", action="store_true")
    parser.add_argument("--vit", action="store_true")
    parser.add_argument("--densenet", action="store_true")
    parser.add_argument("--full", type=int, metavar="N", help="full default resnet18 recipe, shortened to N epochs")
    parser.add_argument("--work", type=Path, help="where data roots and runs go (default: a temp dir)")
    parser.add_argument("--extra", default="", help="extra 'medcli train' options for the end-to-end runs")
    args = parser.parse_args()
    if args.full is not None and args.full < 1:
        parser.error(f"--full {args.full}: give the number of epochs, at least 1")
    everything = not (args.overhead or args.resnet or args.vit or args.densenet or args.full)
    if not args.data.is_file():
        sys.exit(f"{args.data} not found; pass --data PATH/bloodmnist_pbc_28.npz")
    with contextlib.nullcontext(args.work) if args.work else tempfile.TemporaryDirectory(prefix="medcli-bench-") as w:
        run_benchmarks(args, everything, Path(w))


def run_benchmarks(args, everything: bool, work: Path) -> None:
    """The benchmarks `args` chose, with data roots and runs in `work`."""
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; work dir {work}")
    extra = args.extra.split()
    if everything or args.overhead:
        overhead(args.data, work)
    if everything or args.resnet:
        end_to_end("resnet18", args.data, work, extra)
    if everything or args.vit:
        end_to_end("vit", args.data, work, extra)
    if everything or args.densenet:
        end_to_end("densenet121", args.data, work, extra)
    if args.full:
        end_to_end("resnet18", args.data, work, ["--epochs", str(args.full), *extra], reduced=False)


if __name__ == "__main__":
    main()
