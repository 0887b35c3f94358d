"""Benchmark the GPU path of `medcli train`, `evaluate` and `explain`; prints its numbers.

For each case it runs the real command (a fresh process, wall time of the whole command),
reads the run's training images/s from the manifest, and reports the share of the GPU's
dense bf16 peak that training reached: model FLOPs per training image (forward + backward,
counted by `torch.utils.flop_counter` on one batch) x images/s / peak.

Cases (default: all but --full):
  --resnet   ResNet-18, 28 px, 60 epochs, batch 128 and 512, without and with --compile.
             Target: <= 60 s for the whole command on one H100.
  --vit      ViT-B/16 at 224 px (upsampled on the device from the 28-px file), 10 epochs,
             without and with --compile. Target: <= 60 s on one H100.
  --full     the default `medcli train --model resnet18` recipe; test accuracy (best.pt, no
             TTA; target >= 97.5 %) and wall time.
  --post     `evaluate` and `explain --per-class 8` on the runs made above.
  --smoke    a few seconds on the CPU with a tiny model: checks the script itself works.

    .venv/bin/python scripts/bench_gpu.py --data data/bloodmnist_pbc_28.npz [--resnet] [--vit] [--full] [--post]

Peak bf16 dense TFLOP/s is looked up from the device name (override with --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "bloodmnist_pbc_28.npz"
PEAK_BF16_TFLOPS = {  # dense, without sparsity, from the vendors' data sheets
    "H100 80GB HBM3": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0,
    "RTX 3070 Ti": 43.5,
}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    matches = [tflops for key, tflops in PEAK_BF16_TFLOPS.items() if key in name]
    return max(matches) if matches else None


def train_flops_per_image(model_name: str, input_size: int, device: str, **overrides) -> float:
    """Forward + backward FLOPs of one training image (counted on a batch of 8)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from medcli import models

    model, _ = models.create(model_name, 8, 3, input_size, **overrides)
    model.to(device).train()
    x = torch.randn(8, 3, input_size, input_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 8


def medcli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medcli", "--quiet", *args], capture_output=True, text=True)
    return done, time.perf_counter() - start


def root_for(source: Path, work: Path) -> Path:
    root = work / "data"
    root.mkdir(parents=True, exist_ok=True)
    target = root / "bloodmnist.npz"
    if not target.exists():
        target.symlink_to(source.resolve())
    return root


def train_case(label: str, args: list[str], root: Path, work: Path, flops: float | None, peak: float | None,
               runs: list) -> None:
    done, wall = medcli("train", *args, "--root", str(root), "--runs-dir", str(work / "runs"), "--json")
    if done.returncode != 0:
        print(f"{label:44s} FAILED ({done.returncode}): {done.stderr.strip()[-300:]}", flush=True)
        return
    stage = json.loads(done.stdout)
    run = stage["run_dir"]
    ips = stage["images_per_s"]
    share = f"{100 * flops * ips / (peak * 1e12):5.1f} %" if flops and peak else "   n/a"
    print(f"{label:44s} wall {wall:7.1f} s  train {stage['train_seconds']:7.1f} s  {ips:9.0f} img/s  "
          f"peak share {share}  best val acc {stage['best_value']:.4f}", flush=True)
    runs.append((label, run))


def post(runs: list) -> None:
    for label, run in runs:
        done, wall = medcli("evaluate", run, "--json")
        if done.returncode != 0:
            print(f"evaluate {label}: FAILED {done.stderr.strip()[-300:]}")
            continue
        test = json.loads(done.stdout)["test"]["metrics"]
        print(f"evaluate {label:35s} {wall:6.1f} s  test accuracy {test['accuracy']:.4f}  auc {test['auc']:.4f}",
              flush=True)
        method = "rollout" if "vit" in label else "gradcam"
        done, wall = medcli("explain", run, "--method", method, "--per-class", "8")
        print(f"explain --method {method} --per-class 8 {label:18s} {wall:6.1f} s"
              f"{'' if done.returncode == 0 else ' FAILED ' + done.stderr.strip()[-200:]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    for case in ("resnet", "vit", "full", "post", "smoke"):
        parser.add_argument(f"--{case}", action="store_true")
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--work", type=Path, help="keep runs here (default: a temporary directory)")
    options = parser.parse_args()

    import torch

    chosen = {c for c in ("resnet", "vit", "full", "post", "smoke") if getattr(options, c)} or {"resnet", "vit", "post"}
    device = "cpu" if "smoke" in chosen else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU (use --smoke to check the script on a CPU)")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = peak_tflops(name, options.peak_tflops) if device == "cuda" else options.peak_tflops
    print(f"device {name}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"bf16 peak {peak or 'unknown'} TFLOP/s, {os.cpu_count()} CPUs", flush=True)
    work = options.work or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list = []
    if "smoke" in chosen:
        from medcli import datasets

        root = work / "smoke-data"
        datasets.make_synthetic(root / "bloodmnist.npz", "bloodmnist", 28, (64, 32, 32), seed=0)
        flops = train_flops_per_image("resnet18", 28, "cpu")
        train_case("smoke: resnet18 28 px, 1 epoch", ["--model", "resnet18", "--epochs", "1", "--batch-size", "32",
                                                        "--device", "cpu"], root, work, flops, peak, runs)
        post(runs)
        return
    root = root_for(options.data, work)
    if "resnet" in chosen:
        flops = train_flops_per_image("resnet18", 28, device)
        for batch in (128, 512):
            for compiled in (False, True):
                train_case(f"resnet18 28 px, 60 ep, batch {batch}{', compile' if compiled else ''}",
                           ["--model", "resnet18", "--epochs", "60", "--batch-size", str(batch),
                            *(["--compile"] if compiled else [])], root, work, flops, peak, runs)
    if "vit" in chosen:
        flops = train_flops_per_image("vit", 224, device)
        for compiled in (False, True):
            train_case(f"vit-b/16 224 px, 10 ep, batch 256{', compile' if compiled else ''}",
                       ["--model", "vit", "--input-size", "224", "--epochs", "10", "--batch-size", "256",
                        *(["--compile"] if compiled else [])], root, work, flops, peak, runs)
    if "full" in chosen:
        train_case("default resnet18 recipe", ["--model", "resnet18"], root, work,
                   train_flops_per_image("resnet18", 28, device), peak, runs)
    if "post" in chosen:
        post(runs)


if __name__ == "__main__":
    main()
