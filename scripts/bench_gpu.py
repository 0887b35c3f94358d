"""Benchmark the GPU path of `medcli train`, `evaluate` and `explain` against issue 26's
targets; prints its numbers, the table last.

Each case runs the real command in a fresh process under its own time limit (and the whole
benchmark under --budget seconds: a case that cannot finish in what is left is skipped and
says so). It reports the whole command's wall time, the training images/s from the
manifest, the share of the GPU's dense bf16 peak the training steps reached (model FLOPs per
training image, forward + backward, counted by `torch.utils.flop_counter`, x images/s /
peak), the GPU busy share (`nvidia-smi` sampled every 200 ms, mean over the train stage, or
over the whole command for evaluate / explain) and test accuracy where there is one.

Cases, in order (the targets of issue 26 on one H100/H200, PBC BloodMNIST 28 px):
  resnet18      the default `medcli train --model resnet18` (60 epochs): <= 30 s, GPU busy
                >= 80 %
  resnet18-evaluate  `evaluate` of that run (best.pt): test accuracy >= 98.5 %
  vit           ViT-B/16 at 224 px from scratch, 10 epochs, batch 256: <= 50 s, >= 40 % of
                the bf16 peak in the training steps
  explain       `explain --method rollout --per-class 8` with ROAD on that ViT: <= 15 s
  resnet18-graphs  the resnet18 recipe with --compile-mode reduce-overhead (CUDA graphs)
  vit-compile   the ViT with --compile
  gradcam       `explain --method gradcam --per-class 8` on the resnet18 run

    python scripts/bench_gpu.py --data data/bloodmnist_pbc_28.npz
                                [--cases resnet18,resnet18-evaluate,vit,explain] [--budget 450]
    python scripts/bench_gpu.py --smoke     # minutes on the CPU: checks the script itself

It exits 1 when a case failed, was killed at its limit or was skipped (a missed target is a
measurement: the table says it, the exit status does not).

Peak bf16 dense TFLOP/s is looked up from the device name (override with --peak-tflops).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist_pbc_28.npz"
PEAK_BF16_TFLOPS = {  # dense, without sparsity, from the vendors' data sheets
    "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
    "RTX 3070 Ti": 43.5,
}
RESNET = ["--model", "resnet18"]
VIT = ["--model", "vit", "--input-size", "224", "--epochs", "10", "--batch-size", "256"]


@dataclass
class Case:
    name: str
    command: str  # train, evaluate or explain
    args: list[str]
    limit_s: float  # this case's own time limit
    target_s: float | None = None
    target_busy: float | None = None  # share of the train stage the GPU was busy
    target_peak: float | None = None  # share of the bf16 peak in the training steps
    target_acc: float | None = None  # test accuracy of the evaluate that follows
    flops: tuple | None = None  # (model, input size) whose training FLOPs per image to count
    on: str | None = None  # explain / evaluate: the case whose run they use
    row: dict = field(default_factory=dict)


CASES = [
    Case("resnet18", "train", RESNET, 150, target_s=30, target_busy=0.8, flops=("resnet18", 28)),
    Case("resnet18-evaluate", "evaluate", [], 60, target_acc=0.985, on="resnet18"),
    Case("vit", "train", VIT, 180, target_s=50, target_peak=0.40, flops=("vit", 224)),
    Case("explain", "explain", ["--method", "rollout", "--per-class", "8"], 120, target_s=15, on="vit"),
    Case("resnet18-graphs", "train", [*RESNET, "--compile-mode", "reduce-overhead"], 180, flops=("resnet18", 28)),
    Case("vit-compile", "train", [*VIT, "--compile"], 200, flops=("vit", 224)),
    Case("gradcam", "explain", ["--method", "gradcam", "--per-class", "8"], 60, on="resnet18"),
]
SMOKE = [  # the same code paths on the CPU, tiny
    Case("resnet18", "train", [*RESNET, "--epochs", "1", "--batch-size", "32", "--device", "cpu"], 300,
         target_s=30, target_busy=0.8, flops=("resnet18", 28)),
    Case("resnet18-evaluate", "evaluate", ["--device", "cpu"], 120, target_acc=0.985, on="resnet18"),
    Case("gradcam", "explain", ["--method", "gradcam", "--per-class", "1", "--device", "cpu"], 120, on="resnet18"),
]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    matches = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
    return max(matches) if matches else None


@functools.cache
def train_flops_per_image(model_name: str, input_size: int, device: str) -> float:
    """Forward + backward FLOPs of one training image (counted once per model, on a batch of 8)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medcli import models

    model, _ = models.create(model_name, 8, 3, input_size)
    model.to(device).train()
    x = torch.randn(8, 3, input_size, input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def gpu_uuid() -> str:
    """The UUID nvidia-smi names the training GPU by (torch's device 0; some torch versions
    print it without nvidia-smi's "GPU-")."""
    import torch

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


class BusySampler:
    """`nvidia-smi`'s utilization.gpu of the GPU `gpu` (its UUID, which names it whatever
    CUDA_VISIBLE_DEVICES says; without -i nvidia-smi prints a line per GPU of the machine)
    every 200 ms, with the time each sample was read; no samples (and busy shares of None)
    where there is no nvidia-smi or no GPU."""

    def __init__(self, gpu: str | None) -> None:
        self.samples: list[tuple[float, float]] = []
        self.process = None
        if gpu is None:
            return
        try:
            self.process = subprocess.Popen(
                ["nvidia-smi", "-i", gpu, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-lms", "200"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.process = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.samples.append((time.time(), float(line.split(",")[0]) / 100))
            except ValueError:
                continue

    def share(self, start: float, end: float) -> float | None:
        inside = [value for when, value in self.samples if start <= when <= end]
        return sum(inside) / len(inside) if inside else None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


def medcli(args: list[str], limit_s: float) -> tuple[subprocess.CompletedProcess | None, float]:
    """The command's result (None when it ran past `limit_s` and was killed) and wall seconds."""
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "medcli", "--quiet", *args], capture_output=True, text=True,
                              timeout=limit_s)
    except subprocess.TimeoutExpired:
        done = None
    return done, time.perf_counter() - start


def run_case(case: Case, root: Path, work: Path, device: str, peak: float | None, busy: BusySampler,
             runs: dict, left_s: float) -> None:
    """Run one case, filling `case.row`; a case whose run is missing or that cannot finish in
    `left_s` is skipped with the reason."""
    row = case.row
    if case.on is not None and case.on not in runs:
        row["note"] = f"skipped: no {case.on} run"
        return
    limit = min(case.limit_s, left_s)
    if limit < min(case.limit_s, 30):
        row["note"] = f"skipped: {left_s:.0f} s of the budget left"
        return
    if case.command == "train":
        args = ["train", *case.args, "--root", str(root), "--runs-dir", str(work / "runs"), "--json"]
    else:
        args = [case.command, runs[case.on], *case.args, *(["--json"] if case.command == "evaluate" else [])]
    started = time.time()
    done, wall = medcli(args, limit)
    row["wall_s"] = wall
    if done is None or done.returncode != 0:
        row["failed"] = True
        row["note"] = (f"killed at its {limit:.0f} s limit" if done is None
                       else f"FAILED ({done.returncode}): {done.stderr.strip()[-200:]}")
        return
    window = (started, time.time())
    if case.command == "train":
        summary = json.loads(done.stdout)
        runs[case.name] = summary["run_dir"]
        row["images_per_s"] = summary["last_epoch_images_per_s"]  # warm, as measured before (the run's rate has epoch 1)
        stage = json.loads((Path(summary["run_dir"]) / "manifest.json").read_text())["stages"]["train"]
        window = tuple(datetime.fromisoformat(stage[key]).timestamp() for key in ("started", "ended"))
        row["train_s"] = summary["train_seconds"]
        if case.flops and peak:
            flops = train_flops_per_image(*case.flops, device)
            row["peak_share"] = flops * row["images_per_s"] / (peak * 1e12)
    elif case.command == "evaluate":
        row["accuracy"] = json.loads(done.stdout)["test"]["metrics"]["accuracy"]
    row["busy"] = busy.share(*window)


def verdict(case: Case) -> str:
    """met / missed over the targets measured; the ones that could not be (no nvidia-smi, a
    skipped step) are named; a case that failed or was killed has no verdict (its time is
    the time to the failure)."""
    row, checks, unmeasured = case.row, [], []
    if row.get("failed"):
        return "FAILED"
    for key, target, higher in (("wall_s", case.target_s, False), ("busy", case.target_busy, True),
                                ("peak_share", case.target_peak, True), ("accuracy", case.target_acc, True)):
        if target is not None and row.get(key) is None:
            unmeasured.append(key)
        elif target is not None:
            checks.append(row[key] >= target if higher else row[key] <= target)
    said = ("met" if all(checks) else "missed") if checks else "-"
    return said + (f" ({', '.join(unmeasured)} not measured)" if unmeasured else "")


def table(cases: list[Case]) -> None:
    def pct(value):
        return f"{100 * value:.1f} %" if value is not None else "-"

    def target(case):
        parts = [f"<= {case.target_s:g} s" if case.target_s else "", f"busy >= {pct(case.target_busy)}" if case.target_busy else "",
                 f">= {pct(case.target_peak)} peak" if case.target_peak else "",
                 f"acc >= {pct(case.target_acc)}" if case.target_acc else ""]
        return ", ".join(p for p in parts if p) or "-"

    head = f"{'case':18s} {'wall s':>7s} {'train s':>7s} {'img/s':>8s} {'peak':>7s} {'GPU busy':>8s} {'test acc':>8s}  " \
           f"{'target':30s} verdict"
    print("\n" + head + "\n" + "-" * len(head))
    for case in cases:
        row = case.row
        number = (lambda key, fmt: format(row[key], fmt) if row.get(key) is not None else "-")
        print(f"{case.name:18s} {number('wall_s', '7.1f'):>7s} {number('train_s', '7.1f'):>7s} "
              f"{number('images_per_s', '8.0f'):>8s} {pct(row.get('peak_share')):>7s} {pct(row.get('busy')):>8s} "
              f"{pct(row.get('accuracy')):>8s}  {target(case):30s} {verdict(case)}"
              + (f"  ({row['note']})" if row.get("note") else ""))


def root_for(source: Path, work: Path) -> Path:
    root = work / "data"
    root.mkdir(parents=True, exist_ok=True)
    target = root / "bloodmnist.npz"
    if not target.exists():
        target.symlink_to(source.resolve())
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--cases", help="comma-separated case names (default: all, in order)")
    parser.add_argument("--budget", type=float, default=450, help="seconds for the whole benchmark (default 450)")
    parser.add_argument("--smoke", action="store_true", help="a tiny run on the CPU: checks the script itself")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--work", type=Path, help="keep runs here (default: a temporary directory)")
    options = parser.parse_args()
    began = time.perf_counter()

    import torch

    cases = SMOKE if options.smoke else CASES
    if options.cases:
        wanted = options.cases.split(",")
        unknown = set(wanted) - {case.name for case in cases}
        if unknown:
            sys.exit(f"unknown cases {sorted(unknown)}; known: {', '.join(case.name for case in cases)}")
        cases = [case for case in cases if case.name in wanted]
    device = "cpu" if options.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (use --smoke to check the script on a CPU)")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(name, options.peak_tflops) if device == "cuda" else options.peak_tflops
    import timm

    print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, timm {timm.__version__}, "
          f"bf16 peak {peak or 'unknown'} TFLOP/s, {os.cpu_count()} CPUs", flush=True)
    with contextlib.nullcontext(options.work) if options.work else tempfile.TemporaryDirectory(prefix="bench-gpu-") as w:
        measure(options, cases, device, peak, Path(w), began)
    table(cases)
    unfinished = [case.name for case in cases if case.row.get("note")]
    if unfinished:
        sys.exit(f"not measured: {', '.join(unfinished)} (see the table)")


def measure(options, cases: list, device: str, peak: float | None, work: Path, began: float) -> None:
    """Run `cases` with their files in `work` (removed afterwards unless --work kept it)."""
    work.mkdir(parents=True, exist_ok=True)
    if options.smoke:
        from medcli import datasets

        root = work / "smoke-data"
        datasets.make_synthetic(root / "bloodmnist.npz", "bloodmnist", 28, (64, 32, 32), seed=0)
    else:
        root = root_for(options.data, work)
    busy, runs = BusySampler(gpu_uuid() if device == "cuda" else None), {}
    try:
        for case in cases:
            run_case(case, root, work, device, peak, busy, runs, options.budget - (time.perf_counter() - began))
            print(f"  {case.name}: {case.row}", flush=True)
    finally:
        busy.stop()


if __name__ == "__main__":
    main()
