"""Distributed training on CPU: 2 processes with gloo, launched by torchrun itself and by
`medcli train --nproc 2`. The oracle is a 1-process run with the same global batch and seed.

The model is a ViT (LayerNorm): with BatchNorm each process would normalise its own slice,
which is a documented difference (`--sync-bn` on GPUs), not an error. MixUp and rotation
are on, so the test also covers the shared augmentation stream and MixUp partners that live
in the other process's slice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from medcli import datasets

OPTIONS = ["--model", "timm:test_vit", "--input-size", "32", "--epochs", "3", "--batch-size", "16",
           "--mixup-alpha", "0.4", "--rotate", "10", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    datasets.make_synthetic(root / "bloodmnist.npz", "bloodmnist", 28, (128, 32, 32), seed=4)
    return root


def _medcli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "medcli", *args], capture_output=True, text=True, env=env,
                          timeout=300, **kwargs)


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory) -> Path:
    """The oracle: the same training in one process."""
    done = _medcli("--quiet", "train", *OPTIONS, "--root", str(data_root), "--runs-dir",
                   str(tmp_path_factory.mktemp("single")))
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip())


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)["model"]


def _assert_same_model(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:  # equal up to the order of floating-point reductions
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-4, msg=key)


def _manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_torchrun_with_two_processes_trains_the_one_process_model(single, data_root, tmp_path):
    runs, logs = tmp_path / "runs", tmp_path / "logs"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--log-dir", str(logs), "--redirects", "3", "-m", "medcli", "train", *OPTIONS,
         "--root", str(data_root), "--runs-dir", str(runs)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rank_logs = {p.parent.name: p.parent for p in logs.rglob("stdout.log")}
    run = Path((rank_logs["0"] / "stdout.log").read_text().strip())
    # Rank 0 alone prints the run directory and logs; rank 1 prints nothing on stdout.
    assert (rank_logs["1"] / "stdout.log").read_text() == ""
    assert "epoch 1/3" in (rank_logs["0"] / "stderr.log").read_text()
    assert "epoch" not in (rank_logs["1"] / "stderr.log").read_text()
    assert [p for p in runs.iterdir()] == [run]
    manifest = _manifest(run)
    assert manifest["environment"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert manifest["stages"]["train"]["status"] == "completed"
    assert manifest["stages"]["train"]["summary"]["world_size"] == 2
    # images/s counts each image once: the manifest says what rank 0's last epoch line says
    last_line = [line for line in (rank_logs["0"] / "stderr.log").read_text().splitlines() if "epoch 3/3" in line][-1]
    shown = float(re.search(r"(\d+) img/s", last_line).group(1))
    assert manifest["stages"]["train"]["summary"]["images_per_s"] == pytest.approx(shown, abs=1), last_line
    assert _manifest(single)["environment"]["distributed"] == {"world_size": 1, "backend": None}
    _assert_same_model(single, run)
    # Validation covers the whole split in both (gathered, not one shard).
    with open(run / "history.csv") as a, open(single / "history.csv") as b:
        rows_a, rows_b = [r.split(",") for r in a.read().split()[1:]], [r.split(",") for r in b.read().split()[1:]]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert float(ra[4]) == pytest.approx(float(rb[4]), rel=1e-4)  # val_loss
        assert ra[5] == rb[5]  # val_acc over all 32 images


def _workers(parent: psutil.Process) -> dict[int, psutil.Process]:
    """rank -> process, among the launcher's descendants."""
    found = {}
    for child in parent.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "medcli" in " ".join(child.cmdline()):
            found[int(rank)] = child
    return found


def test_losing_one_process_interrupts_the_run_and_it_resumes_in_one(single, data_root, tmp_path):
    """`medcli train --nproc 2`; after the first checkpoint rank 1 is killed (SIGKILL: no
    chance to clean up). The job ends non-zero with one line, rank 0 records the stage
    interrupted, and the run resumes in a single process to the one-process model."""
    runs = tmp_path / "runs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "medcli", "train", *OPTIONS, "--root", str(data_root), "--runs-dir", str(runs),
         "--nproc", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not list(runs.glob("*/checkpoints/last.pt")) and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.02)
        workers = _workers(psutil.Process(launcher.pid))
        assert set(workers) == {0, 1}, "both ranks run until the first checkpoint"
        for worker in workers.values():  # freeze the job where it is, then lose rank 1
            worker.send_signal(signal.SIGSTOP)
        workers[1].kill()
        workers[0].send_signal(signal.SIGCONT)
        stdout, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0 and stdout == ""
    assert stderr.strip().splitlines()[-1].startswith("error:"), stderr[-2000:]
    (run,) = runs.iterdir()
    stage = _manifest(run)["stages"]["train"]
    assert stage["status"] == "interrupted", stage
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] < 3

    resumed = _medcli("--quiet", "train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    manifest = _manifest(run)
    assert manifest["stages"]["train"]["status"] == "completed"
    assert manifest["environment"]["distributed"] == {"world_size": 1, "backend": None}
    _assert_same_model(single, run)


def test_global_batch_must_split_evenly(data_root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medcli",
         "train", *OPTIONS, "--batch-size", "15", "--root", str(data_root), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0 and "must split evenly over 2 processes" in done.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_sync_bn_needs_cuda_and_a_cnn(data_root, tmp_path):
    done = _medcli("train", "--sync-bn", "--device", "cpu", "--root", str(data_root), "--runs-dir", str(tmp_path))
    assert done.returncode == 2 and "--sync-bn needs CUDA" in done.stderr


# -- failures and devices, without a process group ---------------------------------------------

@pytest.mark.parametrize("error, lost", [
    (RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:52012"), True),
    (RuntimeError("[gloo/transport/tcp/pair.cc:598] Connection reset by peer"), True),
    (RuntimeError("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for "
                  "600000 milliseconds before timing out."), True),
    (RuntimeError("NCCL communicator was aborted on rank 1."), True),
    (RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO)"), False),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total; NCCL buffers 1 GiB)"), False),
    (RuntimeError("gloo: unsupported reduction op"), False),
])
def test_only_a_lost_peer_interrupts_a_distributed_run(error, lost):
    """A collective that fails because another process is gone means 'interrupted, resume';
    the process's own error (out of memory, a real NCCL failure) is a failure with its message
    (every message naming gloo or NCCL used to count as a lost peer)."""
    from medcli import distributed
    from medcli.errors import Interrupted

    assert distributed.peer_lost(error) is lost
    with pytest.raises(Interrupted if lost else RuntimeError) as raised:
        with distributed.peers(distributed.Context(rank=0, world_size=2)):
            raise error
    assert isinstance(raised.value, Interrupted) == lost


def test_each_process_takes_its_own_gpu_also_when_the_launcher_hides_the_others():
    from medcli import distributed
    from medcli.errors import UsageError

    ctx = distributed.Context(rank=3, world_size=8, local_rank=3)
    assert distributed.gpu_index(ctx, 8) == 3
    assert distributed.gpu_index(ctx, 1) == 0  # CUDA_VISIBLE_DEVICES gave this process one GPU
    with pytest.raises(UsageError, match="local rank 3 has no GPU"):
        distributed.gpu_index(ctx, 2)
    with pytest.raises(UsageError, match="--device cuda:1 picks one GPU"):
        distributed.device_for(ctx, "cuda:1")  # used to be ignored silently
    assert distributed.device_for(ctx, "cpu") == "cpu"
    assert distributed.device_for(distributed.Context(), "cuda:1") == "cuda:1"  # one process: its choice


def test_a_usage_error_inside_the_processes_reaches_the_user_once_as_a_usage_error(data_root, tmp_path):
    """`train --nproc 2 --batch-size 15`: 15 does not split over 2; the user gets that one line
    once and exit code 2, found before any process starts (it used to be every process's line,
    then 'rank 0 exited with code 2 (its error is above)', exit 1)."""
    done = _medcli("train", "--nproc", "2", *OPTIONS, "--batch-size", "15", "--root", str(data_root),
                   "--runs-dir", str(tmp_path / "runs"))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and "must split evenly over 2 processes" in errors[0], done.stderr
