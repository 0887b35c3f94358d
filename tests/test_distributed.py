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

from medcli import datasets, npzcache

# SGD, not the ViT's AdamW: AdamW's step does not change when every gradient is scaled, so a sum
# of the ranks' gradients where their mean belongs would still give the one-process weights
OPTIONS = ["--model", "timm:test_vit", "--input-size", "32", "--epochs", "3", "--batch-size", "16",
           "--optimizer", "sgd", "--mixup-alpha", "0.4", "--rotate", "10", "--device", "cpu", "--seed", "3"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp-data")
    datasets.make_synthetic(root / "bloodmnist.npz", "bloodmnist", 28, (128, 32, 32), seed=4)
    return root


def _env(**extra: str) -> dict:
    """One thread per process: the same arithmetic in every process."""
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _medcli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medcli", *args], capture_output=True, text=True, env=_env(),
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
        capture_output=True, text=True, timeout=300, env=_env())
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
    # review: the argv was the process's own, '-m medcli train ...': run again, one process
    assert manifest["environment"]["argv"][1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node"]
    assert manifest["stages"]["train"]["status"] == "completed"
    assert manifest["stages"]["train"]["summary"]["world_size"] == 2
    # images/s counts each image once: the manifest says what rank 0's last epoch line says
    last_line = [line for line in (rank_logs["0"] / "stderr.log").read_text().splitlines() if "epoch 3/3" in line][-1]
    shown = float(re.search(r"(\d+) img/s", last_line).group(1))
    assert manifest["stages"]["train"]["summary"]["last_epoch_images_per_s"] == pytest.approx(shown, abs=1), last_line
    assert _manifest(single)["environment"]["distributed"] == {"world_size": 1, "backend": None}
    _assert_same_model(single, run)
    # Validation covers the whole split in both (gathered, not one shard).
    with open(run / "history.csv") as a, open(single / "history.csv") as b:
        rows_a, rows_b = [r.split(",") for r in a.read().split()[1:]], [r.split(",") for r in b.read().split()[1:]]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        # train_loss and train_acc over all 128 images (summed over the ranks), then val_loss
        for column in (2, 3, 4):
            assert float(ra[column]) == pytest.approx(float(rb[column]), rel=1e-4), column
        assert ra[5] == rb[5]  # val_acc over all 32 images


def _pending(process: psutil.Process, signum: int) -> bool:
    """Whether `signum` waits, undelivered, for `process` (a stopped process takes none)."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (signum - 1) & 1 for mask in masks)


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
    assert _manifest(run)["environment"]["argv"][-2:] == ["--nproc", "2"]  # the command as launched
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] < 3

    resumed = _medcli("--quiet", "train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr
    manifest = _manifest(run)
    assert manifest["stages"]["train"]["status"] == "completed"
    assert manifest["environment"]["distributed"] == {"world_size": 1, "backend": None}
    _assert_same_model(single, run)


def test_global_batch_must_split_evenly(data_root, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medcli",
         "train", *OPTIONS, "--batch-size", "15", "--root", str(data_root), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300, env=_env())
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


# -- a lost process ends the job within the collective timeout, and the run says interrupted -----

@pytest.mark.parametrize("lose", ["kill rank 0", "hang rank 1"])
def test_a_lost_process_ends_the_job_in_bounded_time_and_the_run_says_interrupted(data_root, tmp_path, lose):
    """`train --nproc 2 --collective-timeout 5`, and mid-training one process is lost:
    * rank 0 is SIGKILLed: it cannot record anything, so the launcher marks the stage it left
      `running` interrupted (it used to stay `running`);
    * rank 1 stops answering (SIGSTOP: a hung process or a lost node, no connection closes, as
      NCCL sees a dead peer): rank 0's collective times out after 5 s instead of 10 minutes and
      records the stage interrupted; the launcher stops the hung process (its SIGTERM, found
      pending on the stopped process, which is then continued to take it: torchrun's SIGKILL
      would follow 30 s later, its own fixed grace period).
    Every process is gone well within a minute, and the launcher ends with one line, exit 130."""
    runs = tmp_path / "runs"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "medcli", "train", *OPTIONS, "--epochs", "300", "--collective-timeout", "5",
         "--root", str(data_root), "--runs-dir", str(runs), "--nproc", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    workers: dict = {}
    try:
        deadline = time.time() + 240
        while not list(runs.glob("*/history.csv")) and time.time() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        time.sleep(0.3)  # into the next epoch
        workers = _workers(psutil.Process(launcher.pid))
        assert set(workers) == {0, 1}, "both ranks train"
        if lose == "kill rank 0":
            workers[0].kill()
        else:
            workers[1].send_signal(signal.SIGSTOP)
        lost_at = time.time()
        if lose == "hang rank 1":  # torchrun's own grace period, not medcli's: spared once its SIGTERM waits
            while launcher.poll() is None and time.time() < lost_at + 60 and not _pending(workers[1], signal.SIGTERM):
                time.sleep(0.05)
            asked_to_stop = _pending(workers[1], signal.SIGTERM)
            workers[1].send_signal(signal.SIGCONT)
        stdout, stderr = launcher.communicate(timeout=120)
        ended_in = time.time() - lost_at
        gone, alive = psutil.wait_procs(list(workers.values()), timeout=1)
    finally:
        for worker in workers.values():
            try:
                worker.kill()
            except psutil.Error:
                pass
        if launcher.poll() is None:
            launcher.kill()
    assert not alive and ended_in < 60, (ended_in, stderr[-2000:])
    assert lose != "hang rank 1" or asked_to_stop, "the launcher never stopped the hung process"
    assert launcher.returncode == 130 and stdout == "", stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "medcli train --resume" in last and "--nproc 2'" in last, stderr[-2000:]
    # review: torchrun's own log lines ("Sending process N closing signal SIGTERM", "failed
    # (exitcode: -9) local_rank: 1 ...") came before the launcher's line
    assert "closing signal" not in stderr and "exitcode" not in stderr, stderr[-2000:]
    (run,) = runs.iterdir()
    manifest = _manifest(run)
    assert manifest["stages"]["train"]["status"] == "interrupted", manifest["stages"]["train"]
    assert manifest["config"]["collective_timeout"] == 5.0
    assert str(run) in last or lose == "hang rank 1"  # the launcher names the run it marked


def test_the_collective_timeout_comes_from_the_option_the_environment_or_the_default(monkeypatch):
    from medcli import distributed
    from medcli.errors import UsageError

    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.collective_timeout() == distributed.COLLECTIVE_TIMEOUT_S == 180
    assert distributed.collective_timeout(recorded=30.0) == 30.0  # a resumed run keeps its own
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "45")
    assert distributed.collective_timeout(recorded=30.0) == 45.0
    assert distributed.collective_timeout(20.0, recorded=30.0) == 20.0
    with pytest.raises(UsageError, match="--collective-timeout must be a number of seconds of at least 1"):
        distributed.collective_timeout(0.0)
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "ten")
    with pytest.raises(UsageError, match="MEDCLI_COLLECTIVE_TIMEOUT must be"):
        distributed.collective_timeout()


# -- dropout per process, data and augmentation shared --------------------------------------------

class _Recorder(torch.nn.Module):
    """A linear classifier behind dropout that keeps the images it was given and its masks."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(3 * 28 * 28, 8)
        self.inputs, self.masks = [], []

    def forward(self, x):
        self.inputs.append(x.detach().clone())
        kept = self.drop(torch.ones_like(x.flatten(1))) != 0
        self.masks.append(kept)
        return self.head(x.flatten(1) * kept * 2)


def _first_epoch(rank: int, world_size: int) -> _Recorder:
    from medcli import augment, console, datasets, distributed, feed, optim, train
    from medcli.config import resolve_config

    torch.manual_seed(0)  # the same start on every process (optim.determinism seeds all alike)
    config = resolve_config(model="timm:test_resnet", device="cpu", batch_size=16, rotate=10.0, mixup_alpha=0.0,
                            seed=3)
    model = _Recorder()
    generator = torch.Generator().manual_seed(0)
    data = feed.Data(torch.randint(0, 256, (64, 3, 28, 28), dtype=torch.uint8, generator=generator),
                     torch.randint(0, 8, (64,), generator=generator), torch.device("cpu"))
    optimizer = optim.make_optimizer(model, config, torch.device("cpu"))
    state = train.State(model=model, forward=model, optimizer=optimizer,
                        scheduler=optim.make_scheduler(optimizer, config, 4),
                        scaler=torch.amp.GradScaler("cpu", enabled=False),
                        **train.generators(config["seed"]), task=datasets.task("bloodmnist"))
    with console.progress() as bar:
        train.train_one_epoch(state, data, augment.make_prep(28, 3), config, torch.device("cpu"), bar,
                              bar.add_task("epoch", total=1), distributed.Context(rank=rank, world_size=world_size))
    return model


def test_each_process_draws_its_own_dropout_masks_on_the_shared_batches(monkeypatch):
    """Two processes of a job (rank 0 and rank 1 of 2) see the halves of the batches one process
    sees, augmented alike, but draw different dropout masks (one seed for all used to give
    both halves the same masks)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)  # for the epoch's sum
    try:
        ranks = [_first_epoch(rank, 2) for rank in (0, 1)]
    finally:
        dist.destroy_process_group()
    alone = _first_epoch(0, 1)
    assert len(alone.inputs) == len(ranks[0].inputs) == 4
    for step, whole in enumerate(alone.inputs):  # data order and augmentation are the job's, not the process's
        torch.testing.assert_close(torch.cat([ranks[0].inputs[step], ranks[1].inputs[step]]), whole)
    for step in range(4):
        assert not torch.equal(ranks[0].masks[step], ranks[1].masks[step]), step
    again = [_Recorder()]  # the same rank and epoch draw the same masks: a resumed job repeats them
    from medcli import distributed

    distributed.seed_model(distributed.Context(rank=1, world_size=2), 3, 0)
    first = again[0].drop(torch.ones(8, 100))
    distributed.seed_model(distributed.Context(rank=1, world_size=2), 3, 0)
    assert torch.equal(first, again[0].drop(torch.ones(8, 100)))
    assert distributed.model_seed(3, 0, 0) != distributed.model_seed(3, 1, 0) != distributed.model_seed(3, 1, 1)


# -- validation in float32 ---------------------------------------------------------------------

def test_training_validates_in_float32_like_evaluate(data_root, tmp_path, monkeypatch):
    """`--amp bf16` trains in bf16 but validates in float32, as `medcli evaluate` does: the
    history, best.pt's choice and early stopping see the numbers evaluate reports (they used
    to see bf16 logits)."""
    from medcli import inference, train

    real, used = inference.predict_logits, []

    def spy(*args, **kwargs):
        used.append(kwargs.get("amp", "off"))
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_logits", spy)
    run = train.train(model="timm:test_vit", input_size=32, epochs=1, batch_size=16, device="cpu", amp="bf16",
                      root=str(data_root), runs_dir=str(tmp_path), seed=0)
    assert run.config["amp"] == "bf16"
    assert used and set(used) == {"off"}, used


# -- pretrained weights: rank 0 fetches, the others wait and load them from the cache --------------

_FETCH_SCRIPT = '''
import json, sys, time
from pathlib import Path
import torch.distributed as dist
from medcli import hub

hub.unreachable = lambda url: None  # no network probe: the "download" below is a file
log, cache = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo")
rank = dist.get_rank()

def load(offline):
    start, cached = time.time(), cache.is_file()
    if not cached:
        time.sleep(1.5)  # a download
        cache.write_text("weights")
    with log.open("a") as out:
        out.write(json.dumps({"rank": rank, "start": start, "end": time.time(), "cached": cached}) + "\\n")
    return cache.read_text()

assert hub.fetch("m", "https://example.invalid/m.pth", load) == "weights"
dist.destroy_process_group()
'''


def test_pretrained_weights_are_fetched_by_rank_0_while_the_others_wait(tmp_path):
    """With --pretrained every process used to download the weights into the same cache at
    once; now rank 0 fetches, and rank 1 starts only afterwards and finds them cached."""
    script, log = tmp_path / "fetch.py", tmp_path / "log.jsonl"
    script.write_text(_FETCH_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(log), str(tmp_path / "cache.pth")],
        capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    calls = {entry["rank"]: entry for entry in map(json.loads, log.read_text().splitlines())}
    assert not calls[0]["cached"] and calls[1]["cached"], calls
    assert calls[1]["start"] >= calls[0]["end"], calls


# -- host memory per node: one copy of the split, mapped by every process -------------------------

# The training split of the memory test, in MiB (a parameter: the default keeps the test near
# half a minute on 2 cores and is well above the processes' own noise of ~100-150 MiB each).
SPLIT_MIB = int(os.environ.get("MEDCLI_TEST_DDP_SPLIT_MIB", "512"))

_MEMORY_SCRIPT = '''
"""torchrun worker: `medcli train` (argv[2:]) with this process's private memory recorded in
argv[1]/rank<R>.json: at the moment it starts loading the data, and the most it held after."""
import json, os, sys, threading, time
from pathlib import Path
from medcli import cli, train

def private():
    """Bytes of this process's own (dirty, unshareable) pages: a copy of the data read or
    converted by the process lives there; pages mapped from a file stay the page cache's."""
    with open("/proc/self/smaps_rollup") as rollup:
        return 1024 * sum(int(line.split()[1]) for line in rollup if line.startswith("Private_Dirty:"))

seen, load = {}, train._load

def sampled(*args, **kwargs):
    seen["before_data"] = seen["peak"] = private()

    def sample():
        while True:
            seen["peak"] = max(seen["peak"], private())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    return load(*args, **kwargs)

train._load = sampled
sys.argv = ["medcli", *sys.argv[2:]]
try:
    cli.main()
finally:
    seen["peak"] = max(seen.get("peak", 0), private())
    Path(os.environ["MEMORY_LOG"], f"rank{os.environ['RANK']}.json").write_text(json.dumps(seen))
'''


@pytest.fixture(scope="module")
def large_root(tmp_path_factory) -> Path:
    """BloodMNIST at 128 px with a SPLIT_MIB training split (a small synthetic set repeated;
    stored, not deflated, so writing it stays fast: np.load reads a whole copy either way)."""
    import numpy as np

    root = tmp_path_factory.mktemp("ddp-large")
    small = datasets.make_synthetic(tmp_path_factory.mktemp("small") / "bloodmnist_128.npz", "bloodmnist", 128,
                                    (64, 64, 8), seed=5)
    with np.load(small) as archive:
        arrays = dict(archive)
    n = SPLIT_MIB * 2**20 // (128 * 128 * 3)
    repeats = -(-n // 64)
    arrays["train_images"] = np.tile(arrays["train_images"], (repeats, 1, 1, 1))[:n]
    arrays["train_labels"] = np.tile(arrays["train_labels"], (repeats, 1))[:n]
    np.savez(datasets.data_path(root, "bloodmnist", 128), **arrays)
    datasets.resolve(root, "bloodmnist", 128)  # its record, written once here rather than by both processes
    return root


def test_a_node_holds_one_copy_of_the_split_however_many_processes_train(large_root, tmp_path):
    """2 processes train on a split of SPLIT_MIB: each used to read the whole split into its
    own memory (and briefly convert it into a second copy), 2-4 copies per node. Now the split
    is cached uncompressed beside the npz (in the layout training uses) and both processes map
    it: what the two hold privately together, beyond what they held before the data, stays
    well below even one copy."""
    script, log = tmp_path / "train.py", tmp_path / "memory"
    script.write_text(_MEMORY_SCRIPT)
    log.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
         str(log), "--quiet", "train", "--model", "timm:test_vit", "--input-size", "32", "--epochs", "1",
         "--batch-size", "128", "--mixup-alpha", "0", "--device", "cpu", "--size", "128",
         "--root", str(large_root), "--runs-dir", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=300,
        env=_env(MEMORY_LOG=str(log)))
    assert done.returncode == 0, done.stderr[-3000:]
    npz = datasets.data_path(large_root, "bloodmnist", 128)
    split = datasets.read_record(npz)["n_samples"]["train"] * 128 * 128 * 3
    assert split >= 0.99 * SPLIT_MIB * 2**20
    ranks = [json.loads((log / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    grown = [rank["peak"] - rank["before_data"] for rank in ranks]
    assert sum(grown) < 0.5 * (2 * split), (f"{[g / 2**20 for g in grown]} MiB held privately for a split of "
                                            f"{split / 2**20:.0f} MiB")
    cache = npzcache.cache_path(npz, datasets.read_record(npz)["md5"])
    assert (cache / "train_images.npy").stat().st_size >= split  # one copy on disk, beside the npz


@pytest.mark.parametrize("env, says", [({}, True),  # one process: it says how it ended
                                       ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}, False),
                                       ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "LAUNCHED": "1"}, False),
                                       ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, True)])  # plain torchrun
def test_an_interrupted_job_says_so_once(monkeypatch, env, says):
    """Review: a SIGTERM to `train --nproc 2` printed three error lines (the launcher's, rank
    0's and rank 1's bare "interrupted"). Under medcli's launcher, which names the run and how
    to resume, the processes exit 130 silently; under plain torchrun rank 0 alone says it."""
    from typer.testing import CliRunner

    from medcli import distributed, train
    from medcli.cli import app

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", distributed.RUN_FILE_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(distributed.RUN_FILE_ENV if key == "LAUNCHED" else key, "/tmp/run.json" if key == "LAUNCHED" else value)

    def interrupted(**options):
        raise KeyboardInterrupt("run R interrupted; continue it with 'medcli train --resume R'")

    monkeypatch.setattr(train, "train", interrupted)
    result = CliRunner().invoke(app, ["train", "--model", "timm:test_resnet"])
    assert result.exit_code == 130 and result.stdout == ""
    assert ("error: run R interrupted" in result.stderr) is says, result.stderr
    assert "error: interrupted" not in result.stderr


# -- review of the distributed paths --------------------------------------------------------------


@pytest.mark.parametrize("favoured", [2, 5])  # the image's class, another
def test_a_validation_share_may_be_empty(monkeypatch, favoured):
    """Review: with fewer validation images than processes, the last rank's empty share came
    back as a (0,) tensor and torch.cat failed ("Sizes of tensors must match"): the run failed.
    Rank 1 of 2 with one validation image gets the metrics of rank 0's logits."""
    from medcli import distributed, feed, train

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 8))
    images = torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8)
    data = feed.Data(images=images, labels=torch.tensor([2]), device=torch.device("cpu"))
    prep = {"input_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    others = torch.nn.functional.one_hot(torch.tensor([favoured]), 8).float() * 5  # rank 0's logits of the image
    monkeypatch.setattr(distributed, "sync_buffers", lambda ctx, model: None)
    monkeypatch.setattr(distributed, "gather", lambda ctx, mine: [others, mine])  # rank 0's one image, then ours
    metrics = train.evaluate(model, data, prep, "cpu", datasets.task("bloodmnist"),
                             distributed.Context(rank=1, world_size=2))
    assert metrics["accuracy"] == (1.0 if favoured == 2 else 0.0)
    assert metrics["loss"] == pytest.approx(-torch.log_softmax(others, 1)[0, 2].item(), rel=1e-6)


def test_too_few_training_images_for_the_processes_are_named_before_any_starts(tmp_path, monkeypatch):
    """Review: 5 training images under --nproc 3 blamed a --batch-size the user never gave,
    and the advice it gave (--batch-size 6) was capped back to 3; it was found only after the
    processes loaded the data. The launcher refuses it first, naming the processes' limit."""
    from medcli import distributed, train
    from medcli.errors import UsageError

    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("processes started"))
    datasets.make_synthetic(tmp_path / "bloodmnist.npz", "bloodmnist", 28, (5, 2, 2), seed=1)
    options = dict(root=str(tmp_path), model="timm:test_resnet", device="cpu")
    with pytest.raises(UsageError, match=r"5 training images allow at most 2 processes .*fewer processes"):
        train.check_launch(3, **options)
    with pytest.raises(UsageError, match=r"5 training images allow at most 2 processes"):
        train.check_launch(3, batch_size=6, **options)
    train.check_launch(2, **options)
    datasets.make_synthetic(tmp_path / "bloodmnist.npz", "bloodmnist", 28, (1000, 2, 2), seed=1)
    datasets.record_path(tmp_path / "bloodmnist.npz").unlink()
    with pytest.raises(UsageError, match=r"^the default batch size \d+ gives each of 64 processes 1 image a step"
                                         r".*--batch-size 128 or more, or use at most \d+ processes") as refused:
        train.check_launch(64, **options)
    # review: the count named was half the batch fitted to 64 processes (too few: the default
    # batch is fitted to each count); it is the most that works
    most = int(re.search(r"use at most (\d+) processes", str(refused.value)).group(1))
    train.check_launch(most, **options)
    with pytest.raises(UsageError, match=f"use at most {most} processes"):
        train.check_launch(most + 1, **options)


def test_a_resume_under_nproc_is_checked_before_any_process_starts(tmp_path):
    """Review: `--resume RUN --nproc 4` of a run with a global batch of 4 passed the launcher's
    check, then each process said "use --batch-size 8", which --resume refuses; a finished run
    started N processes before saying so."""
    from medcli import train
    from medcli.errors import UsageError
    from medcli.run import Run

    run = Run.create(tmp_path / "runs", "r", config={"batch_size": 4, "device": "cpu"}, dataset={}, model={},
                     preprocess={}, environment={})
    with pytest.raises(UsageError, match="global batch of 4 images.*--nproc 2"):
        train.check_resume_launch(run.run_dir, 4)
    with pytest.raises(UsageError, match="global batch of 4 images.*--nproc 2"):
        train.check_resume_launch(run.run_dir, 3)
    train.check_resume_launch(run.run_dir, 2)
    run.update(lambda data: data["stages"].update(train={"status": "completed", "summary": {"epochs_run": 3}}))
    with pytest.raises(UsageError, match="already finished training"):
        train.check_resume_launch(run.run_dir, 2)


def test_nproc_on_cuda_needs_a_gpu_per_process(monkeypatch):
    """Review: --nproc 2 --device cuda with one GPU put both processes on cuda:0 (NCCL then
    fails with 'Duplicate GPU detected' after the run directory exists)."""
    from medcli import distributed
    from medcli.errors import UsageError

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="--nproc 2 trains one process per GPU, but 1 GPU is visible"):
        distributed.check_gpus(2, "cuda")
    distributed.check_gpus(2, "cpu")
    distributed.check_gpus(1, "cuda")
    monkeypatch.setenv(distributed.RUN_FILE_ENV, "x")  # inside `launch`: every process sees every GPU
    with pytest.raises(UsageError, match="local rank 1 has no GPU"):
        distributed.gpu_index(distributed.Context(rank=1, world_size=2, local_rank=1), 1)


def test_nproc_relaunches_the_command_it_was_given_not_the_hosts_argv(tmp_path, monkeypatch):
    """Review: called from Python (CliRunner, a notebook), `train --nproc 2` relaunched
    sys.argv, the host program's own arguments."""
    from typer.testing import CliRunner

    from medcli import distributed, train
    from medcli.cli import app

    seen = []
    monkeypatch.setattr(train, "check_launch", lambda nproc, **options: None)
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv, lost=None: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["host.py", "--host-flag"])
    args = ["--quiet", "train", "--epochs", "1", "--nproc", "2", "--root", str(tmp_path)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert seen == [args]


def test_a_launched_process_ends_when_its_launcher_is_killed(tmp_path):
    """Review: torchrun starts its processes in sessions of their own, so `kill -9` of the
    launcher left both ranks training to the end, printing to the terminal."""
    from medcli import distributed

    worker = ("import time\nfrom medcli import distributed\ndistributed.watch_launcher()\n"
              "print('watching', flush=True)\ntime.sleep(60)\n")
    launcher = (f"import os, subprocess, sys, time\n"
                f"env = dict(os.environ, {distributed.LAUNCHER_ENV}=str(os.getpid()))\n"
                f"child = subprocess.Popen([sys.executable, '-c', {worker!r}], env=env, start_new_session=True)\n"
                f"print(child.pid, flush=True)\ntime.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, text=True)
    child = psutil.Process(int(parent.stdout.readline()))
    assert parent.stdout.readline().strip() == "watching"
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)
    alive = child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    if alive:
        child.kill()
    assert not alive


def test_too_few_training_images_name_processes_only_where_there_are_several():
    """Review of the session's diff: one process with one training image was told to use a
    smaller --nproc ("1 training image allow at most 1 processes")."""
    from medcli import distributed, train
    from medcli.errors import UsageError

    config = {"batch_size": 32, "batch_source": "default"}
    for world in (1, 2):
        with pytest.raises(UsageError, match=r"^the training split has 1 image; training needs at least"):
            train.global_batch(config, distributed.Context(world_size=world), 1)


def test_a_lost_peers_advice_names_nproc_only_under_medclis_launcher(monkeypatch):
    """Review of the session's diff: a plain (multi-node) torchrun job was told to resume with
    --nproc 8, which is one node's launcher and would be refused on a node with 4 GPUs."""
    from medcli import distributed
    from medcli.errors import Interrupted

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer")
    for env, says in (({}, "'medcli train --resume /runs/R' under the same launcher"),
                      ({distributed.LAUNCHER_ENV: "1"}, "'medcli train --resume /runs/R --nproc 8'")):
        monkeypatch.delenv(distributed.LAUNCHER_ENV, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(Interrupted, match=says):
            with distributed.peers(distributed.Context(rank=0, world_size=8), run_dir="/runs/R"):
                raise lost


def test_the_launcher_says_a_changed_data_file_once(tmp_path, capsys):
    """Review of the session's diff: `check_launch` silenced the dataset's "changed since its
    record" warning while saving the new record, so no process of the job ever said it."""
    from medcli import train

    path = datasets.make_synthetic(tmp_path / "bloodmnist.npz", "bloodmnist", 28, (8, 2, 2), seed=1)
    record = datasets.read_record(path)
    datasets.make_synthetic(tmp_path / "new" / "bloodmnist.npz", "bloodmnist", 28, (8, 2, 2), seed=2)
    os.replace(tmp_path / "new" / "bloodmnist.npz", path)
    datasets.write_record(path, record)  # the old record, beside new content
    capsys.readouterr()
    train.check_launch(2, root=str(tmp_path), model="timm:test_resnet", device="cpu")
    assert "changed since its record" in capsys.readouterr().err


_RANK_1 = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}


def _as_rank(monkeypatch, env: dict) -> None:
    from medcli import distributed

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", distributed.RUN_FILE_ENV, distributed.LAUNCHER_ENV):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("command", [["evaluate", "RUN"], ["explain", "RUN"], ["predict", "RUN", "x.png"],
                                     ["aggregate", "RUN"], ["export", "RUN"]])
def test_commands_other_than_train_refuse_torchrun(monkeypatch, tmp_path, command):
    """Review: `torchrun --nproc-per-node 2 -m medcli evaluate RUN` ran evaluate in both
    processes: one failed on the run's lock (held by its sibling) and torchrun then killed the
    other, leaving the stage interrupted; predict printed its CSV twice. Rank 0 says it once."""
    from typer.testing import CliRunner

    from medcli.cli import app

    _as_rank(monkeypatch, {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    result = CliRunner().invoke(app, [*command])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.strip() == (f"error: medcli {command[0]} runs in one process (only train is distributed); "
                                     "run it without torchrun")
    _as_rank(monkeypatch, _RANK_1)
    result = CliRunner().invoke(app, [*command])
    assert result.exit_code == 2 and result.stdout == "" and result.stderr == ""
    # review of the diff: --help is help; WORLD_SIZE alone (another launcher's) is no torchrun;
    # a malformed environment is one line, not a traceback from the error handler
    assert CliRunner().invoke(app, [command[0], "--help"]).exit_code == 0
    _as_rank(monkeypatch, {"WORLD_SIZE": "2", "RANK": "0"})
    assert "runs in one process" not in CliRunner().invoke(app, [*command]).stderr
    _as_rank(monkeypatch, {"WORLD_SIZE": "abc", "LOCAL_RANK": "0"})
    result = CliRunner().invoke(app, [*command])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_an_error_one_rank_alone_finds_is_said_by_that_rank(monkeypatch):
    """Review: every usage error of a rank other than each node's first was dropped, as if all
    ranks had found it; one only rank 1 finds ("local rank 1 has no GPU") was never said.
    Errors rank 0 says too are dropped, others are said with the rank's number."""
    from typer.testing import CliRunner

    from medcli import train
    from medcli.cli import app
    from medcli.errors import MedcliError, UsageError

    _as_rank(monkeypatch, _RANK_1)
    for error, said in ((UsageError("bad option"), ""),
                        (UsageError("local rank 1 has no GPU", rank_specific=True),
                         "error: rank 1: local rank 1 has no GPU"),
                        (MedcliError("training diverged in epoch 1"), "error: rank 1: training diverged in epoch 1"),
                        (ValueError("boom"), "error: rank 1: unexpected ValueError: boom")):
        def fail(**options):
            raise error

        monkeypatch.setattr(train, "train", fail)
        result = CliRunner().invoke(app, ["train", "--model", "timm:test_resnet"])
        assert result.exit_code != 0 and result.stderr.strip().startswith(said), result.stderr
        assert bool(result.stderr.strip()) is bool(said)
    # review: a bad option under plain torchrun was said by every process
    result = CliRunner().invoke(app, ["train", "--epochs", "0"])
    assert result.exit_code == 2 and result.stderr == ""


def test_a_sync_bn_run_resumed_on_the_cpu_in_two_processes_trains_without_it(data_root, tmp_path):
    """Review: a --sync-bn run (trained on GPUs) resumed with `--device cpu --nproc 2`, as the
    message for a machine without its GPU advises, failed with "unexpected ValueError:
    SyncBatchNorm layers only work with GPU modules", twice. It trains on, saying once that
    each process keeps its own BatchNorm statistics."""
    done = _medcli("--quiet", "train", "--model", "timm:test_resnet", "--epochs", "1", "--batch-size", "16",
                   "--device", "cpu", "--root", str(data_root), "--runs-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    run = Path(done.stdout.strip())
    manifest = _manifest(run)
    manifest["config"].update(sync_bn=True, epochs=2)
    manifest["stages"]["train"]["status"] = "interrupted"
    (run / "manifest.json").write_text(json.dumps(manifest))
    resumed = _medcli("train", "--resume", str(run), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("--sync-bn needs CUDA: on cpu each process keeps its own BatchNorm statistics") == 1
    assert _manifest(run)["stages"]["train"]["status"] == "completed"


def test_a_local_rank_set_by_another_parent_keeps_the_processs_own_command(monkeypatch):
    """Self-review: any LOCAL_RANK (exported in a job script, set by another launcher) made the
    manifest record the parent's command line (bash, slurmstepd): only torchrun's or medcli's
    launcher stands for the job's command."""
    from medcli import distributed

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv(distributed.LAUNCHER_ENV, raising=False)
    assert distributed.command_line() == sys.argv  # this process's parent is no torchrun
    monkeypatch.setenv(distributed.LAUNCHER_ENV, str(os.getppid()))
    assert distributed.command_line() == psutil.Process(os.getppid()).cmdline()
