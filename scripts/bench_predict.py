"""How fast is `medcli predict` on image files, and ONNX Runtime against PyTorch? Prints its numbers.

For the reduced CNN (`resnet18 --reduced`) and the reduced ViT (`vit --reduced`), each trained
for one epoch on the embedded PBC sample (the weights do not change the speed; pass --run to
use real runs instead):

  1. writes 1,000 PNG files (the sample's test images, then its training images) and times
     `medcli predict RUN FOLDER --out FILE` as a user runs it (a fresh process: start-up,
     reading and decoding every file, the model, the CSV), median of --repeats;
  2. exports the run to ONNX (`medcli export`) and times the same command on the .onnx file;
  3. times the forward pass alone on the same preprocessed batches of 256 images: PyTorch
     (float32, inference mode) against ONNX Runtime (CPU provider), images/s, median of
     --repeats passes over the 1,000 images.

    .venv/bin/python scripts/bench_predict.py [--repeats 5] [--threads N] [--run RUN ...]

The timings are disturbed by anything else running on the machine: check `uptime` first.
Both engines use the same number of threads (torch: torch.set_num_threads; ONNX Runtime:
intra_op_num_threads), by default the cores this process may use.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FILES = 1000
BATCH = 256


def train_runs(workdir: Path) -> list[Path]:
    from medcli import datasets, train

    subprocess.run([sys.executable, "-m", "medcli", "--quiet", "download", "bloodmnist", "--sample",
                    "--root", str(workdir / "data")], check=True, stdout=subprocess.DEVNULL)
    root = workdir / "data" / datasets.SAMPLE_DIR
    runs = []
    for model in ("resnet18", "vit"):
        manifest = train.train(root=root, runs_dir=workdir / "runs", model=model, reduced=True, epochs=1, seed=0)
        runs.append(manifest.run_dir)
    return runs


def write_pngs(run: Path, folder: Path) -> str:
    """Up to FILES images of the run's test (then train) split as PNG files; says how many, of what size."""
    from PIL import Image

    from medcli.run import Run

    data = Run.open(run).load_data(splits=["test", "train"])
    folder.mkdir(parents=True, exist_ok=True)
    images = [*data.images["test"], *data.images["train"]][:FILES]
    for k, image in enumerate(images):
        Image.fromarray(image).save(folder / f"cell_{k:04d}.png")
    return f"{len(images):,} at {images[0].shape[0]} px"


def timed(command: list[str], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def forward_rates(run: Path, onnx_file: Path, folder: Path, repeats: int, threads: int) -> tuple[float, float, float]:
    """(PyTorch img/s, ONNX Runtime img/s, largest |logit| difference) on the preprocessed PNGs."""
    import numpy as np
    import onnxruntime
    import torch

    from medcli import augment, datasets, images
    from medcli.run import Run

    torch.set_num_threads(threads)
    opened = Run.open(run)
    model = opened.load_model("best", "cpu")
    target = images.Target(size=opened.dataset["size"], channels=opened.spec["in_chans"])
    pixels = np.concatenate([batch for _, batch, _ in images.batches(images.expand([str(folder)]), target, BATCH)])
    x = augment.preprocess(datasets.as_tensor(pixels), opened.data["preprocess"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(onnx_file), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def torch_pass():
        with torch.inference_mode():
            return np.concatenate([model(x[i:i + BATCH]).numpy() for i in range(0, len(x), BATCH)])

    def onnx_pass():
        return np.concatenate([session.run(None, {name: x[i:i + BATCH].numpy()})[0] for i in range(0, len(x), BATCH)])

    rates = []
    for one_pass in (torch_pass, onnx_pass):
        one_pass()  # warm-up
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            one_pass()
            seconds.append(time.perf_counter() - started)
        rates.append(len(x) / statistics.median(seconds))
    return rates[0], rates[1], float(np.abs(torch_pass() - onnx_pass()).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: the usable cores")
    parser.add_argument("--run", type=Path, nargs="*", help="trained runs to use (default: train two for 1 epoch)")
    args = parser.parse_args()
    from medcli import system

    threads = args.threads or system.usable_cpus()
    medcli = [sys.executable, "-m", "medcli", "--quiet"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        runs = args.run or train_runs(workdir)
        for run in runs:
            folder = workdir / f"pngs-{run.name}"
            pngs = write_pngs(run, folder)
            onnx_file = workdir / f"{run.name}.onnx"
            subprocess.run([*medcli, "export", str(run), "--out", str(onnx_file)], check=True, stdout=subprocess.DEVNULL)
            run_s = timed([*medcli, "predict", str(run), str(folder), "--out", str(workdir / "a.csv"), "--overwrite"], args.repeats)
            onnx_s = timed([*medcli, "predict", str(onnx_file), str(folder), "--out", str(workdir / "b.csv"), "--overwrite"],
                           args.repeats)
            torch_rate, onnx_rate, diff = forward_rates(run, onnx_file, folder, args.repeats, threads)
            from medcli.run import Run

            spec = Run.open(run).spec
            rows.append((f"{spec['name']} ({spec['params'] / 1e6:.1f} M)", pngs, run_s, onnx_s, torch_rate, onnx_rate, diff))
    import torch
    import onnxruntime

    print(f"\nup to {FILES:,} PNG files per run, {threads} threads, median of {args.repeats}; torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}")
    print("| model | PNG files | predict them, run (s) | same, ONNX file (s) | forward PyTorch (img/s) | forward ONNX Runtime (img/s) | ORT / PyTorch | max abs logit diff |")
    print("|---|---|---|---|---|---|---|---|")
    for name, pngs, run_s, onnx_s, torch_rate, onnx_rate, diff in rows:
        print(f"| {name} | {pngs} | {run_s:.2f} | {onnx_s:.2f} | {torch_rate:,.0f} | {onnx_rate:,.0f} | {onnx_rate / torch_rate:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
