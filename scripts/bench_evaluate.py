"""Benchmark `medcli evaluate` on real BloodMNIST (PBC-derived); prints its numbers.

Trains `resnet18 --reduced` on the real data (or reuses a run given with --run), then
evaluates the test split twice, each time with temperature scaling fitted on val:
  - without test-time augmentation, and
  - with the fixed TTA views the run was trained with (for BloodMNIST's default augmentation:
    identity, h-flip, v-flip, both).
Targets (issue 3): TTA does not lower accuracy; temperature scaling lowers ECE.

    .venv/bin/python scripts/bench_evaluate.py [--data ../shared/data/bloodmnist_pbc_28.npz] [--run RUN]

The timings are disturbed by anything else running on the machine: check `uptime` first.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist_pbc_28.npz"


def train_run(data: Path, workdir: Path, device: str, epochs: int | None) -> Path:
    """A reduced resnet18 run on `data` (linked into a fresh data root as bloodmnist.npz)."""
    from medcli import train

    root = workdir / "data"
    root.mkdir(parents=True, exist_ok=True)  # a --keep folder used before
    link = root / "bloodmnist.npz"
    link.unlink(missing_ok=True)
    link.symlink_to(data.resolve())
    started = time.perf_counter()
    manifest = train.train(root=root, runs_dir=workdir / "runs", model="resnet18", reduced=True, epochs=epochs,
                           device=device, seed=0)
    print(f"trained {manifest.run_dir.name} in {time.perf_counter() - started:.0f} s")
    return manifest.run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="real BloodMNIST npz (28 px)")
    parser.add_argument("--run", type=Path, help="evaluate this trained run instead of training one")
    parser.add_argument("--epochs", type=int, help="override the --reduced preset's epochs")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--keep", type=Path, help="train into this folder and keep the run (default: a temporary one)")
    args = parser.parse_args()
    if args.run is not None and not (args.run / "manifest.json").is_file():
        parser.error(f"--run {args.run} is not a run directory (no manifest.json)")
    if args.run is None and not args.data.is_file():
        parser.error(f"--data {args.data} not found; pass the real bloodmnist_pbc_28.npz or --run RUN")

    from medcli import console, datasets
    from medcli.evaluate import evaluate_run
    from medcli.run import Run

    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        if args.run:  # evaluated as a copy: the run's own evaluation stays as it was
            run = Path(shutil.copytree(args.run, Path(tmp) / args.run.resolve().name))
        else:
            run = train_run(args.data, args.keep or Path(tmp), args.device, args.epochs)
        data = datasets.provenance(Run.open(run).dataset) or "the official file"
        console.configure(quiet=True)
        evaluate_run(run, split="val", device=args.device)  # untimed: the imports and first calls, paid once
        rows = []
        for tta in (False, True):
            started = time.perf_counter()
            result = evaluate_run(run, split="test", tta=tta, calibrate=True, device=args.device)["splits"]["test"]
            seconds = time.perf_counter() - started
            calibration = result["calibration"]
            rows.append((", ".join(result["tta"]["views"]), result["metrics"], calibration, seconds))

    print(f"\ntest split of {data}, {rows[0][1]['n']} images, run {Path(run).name}")
    print(f"{'views':<32} {'acc':>7} {'bal acc':>7} {'AUC':>7} {'T':>6} {'ECE before':>10} {'ECE after':>9} "
          f"{'NLL before':>10} {'NLL after':>9} {'seconds':>7}")
    for views, m, cal, seconds in rows:
        print(f"{views:<32} {m['accuracy']:>7.2%} {m['balanced_accuracy']:>7.2%} {m['auc']:>7.4f} "
              f"{cal['temperature']:>6.3f} {cal['before']['ece']:>10.2%} {cal['after']['ece']:>9.2%} "
              f"{cal['before']['nll']:>10.4f} {cal['after']['nll']:>9.4f} {seconds:>7.1f}")
    plain, tta = rows[0][1]["accuracy"], rows[1][1]["accuracy"]
    print(f"\nTTA accuracy {tta:.2%} vs {plain:.2%} without: {'not lower' if tta >= plain else 'LOWER'}")
    for views, _, cal, _ in rows:
        lowered = cal["after"]["ece"] < cal["before"]["ece"]
        print(f"temperature scaling ({views}): ECE {cal['before']['ece']:.2%} -> {cal['after']['ece']:.2%} "
              f"({'lowered' if lowered else 'NOT lowered'})")


if __name__ == "__main__":
    main()
