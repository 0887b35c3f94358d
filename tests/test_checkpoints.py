"""Checkpoints off the training thread: snapshots that training cannot change, one background
writer that hashes the bytes as it writes them, waits that keep the last complete checkpoint on
disk and recorded, and a training process killed with SIGKILL in the middle of a write."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from medcli import checkpoints, fileio
from medcli.run import Run
from medcli.errors import MedcliError

TRAIN = ["--model", "timm:test_resnet", "--batch-size", "64", "--seed", "0", "--epochs", "5", "--mixup-alpha", "0.4"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture()
def no_read_back(monkeypatch):
    """Hashing a checkpoint by reading it back fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was read back to hash it")

    monkeypatch.setattr(fileio, "sha256_file", refuse)
    monkeypatch.setattr(fileio, "_hash_file", refuse)


class FakeStage:
    """The part of `run.StageRecord` the writer uses: record(path, sha256), saving each time."""

    def __init__(self, root: Path):
        self.entry = {"artefacts": {}, "summary": {}}
        self.run = SimpleNamespace(relative=lambda path: Path(path).relative_to(root).as_posix())
        self.saved = []

    def record(self, path, sha256):
        self.entry["artefacts"][self.run.relative(path)] = sha256
        self.saved.append(dict(self.entry["artefacts"]))


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2)).eval()


def test_the_hash_is_computed_while_writing_and_is_the_files(tmp_path, no_read_back):
    model = _model()
    model(torch.zeros(1, 3, 8, 8))
    digest = checkpoints.write(tmp_path / "last.pt", {"model": model.state_dict(), "epoch": 3})
    assert digest == _sha256(tmp_path / "last.pt")
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 3
    assert not fileio.partial_files(tmp_path / "last.pt")  # nothing left beside it


def test_the_writer_records_each_file_with_its_hash_once_it_is_in_place(tmp_path, no_read_back):
    stage = FakeStage(tmp_path)
    seen = []
    real_write = checkpoints.write

    def write(path, content):
        digest = real_write(path, content)
        seen.append((path.name, path.is_file(), dict(stage.entry["artefacts"])))
        return digest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "write", write)
        with checkpoints.writing(stage) as writer:
            for epoch in (1, 2):
                writer.write({tmp_path / "best.pt": {"epoch": epoch}, tmp_path / "last.pt": {"epoch": epoch}},
                             torch.device("cpu"))
    assert [name for name, *_ in seen] == ["best.pt", "last.pt", "best.pt", "last.pt"]  # in the order asked
    assert all(in_place for _, in_place, _ in seen)
    assert seen[0][2] == {} and seen[1][2].keys() == {"best.pt"}  # recorded after the file is complete, never before
    assert stage.entry["artefacts"] == {"best.pt": _sha256(tmp_path / "best.pt"),
                                        "last.pt": _sha256(tmp_path / "last.pt")}
    assert stage.saved[-1] == stage.entry["artefacts"]
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 2}


def test_a_snapshot_is_what_the_state_was_when_it_was_taken(tmp_path):
    """Training goes on mutating the live tensors and containers while the copy is written."""
    model = _model()
    model(torch.zeros(1, 3, 8, 8))
    live = {"model": model.state_dict(), "history": [{"epoch": 1}], "best": {"epoch": 1},
            "rng": {"torch": torch.get_rng_state()}}
    before = {key: value.clone() for key, value in live["model"].items()}
    (copy,), ready = checkpoints.snapshot([live], torch.device("cpu"))
    assert ready == []  # nothing to wait for on the CPU
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.train()(torch.ones(2, 3, 8, 8))  # BatchNorm's running statistics move too
    live["history"].append({"epoch": 2})
    live["best"]["epoch"] = 2
    assert all(torch.equal(copy["model"][key], before[key]) for key in before)
    assert copy["history"] == [{"epoch": 1}] and copy["best"] == {"epoch": 1}
    assert copy["model"]._metadata == live["model"]._metadata  # load_state_dict's version information
    checkpoints.write(tmp_path / "last.pt", copy)
    model.load_state_dict(torch.load(tmp_path / "last.pt", weights_only=True)["model"])


def test_shared_tensors_are_copied_once():
    weight = torch.arange(6.0).reshape(2, 3)
    (a, b), _ = checkpoints.snapshot([{"w": weight}, {"model": {"w": weight.detach()}}], torch.device("cpu"))
    assert torch.equal(a["w"], weight) and a["w"] is b["model"]["w"]  # best.pt's and last.pt's weights: one copy
    assert a["w"].data_ptr() != weight.data_ptr()


def test_training_goes_on_during_a_write_and_the_next_write_of_a_file_waits_for_it(tmp_path):
    started, release = threading.Event(), threading.Event()
    real_write = checkpoints.write
    order = []

    def slow_write(path, content):
        order.append(("start", content["epoch"]))
        started.set()
        assert release.wait(10)
        digest = real_write(path, content)
        order.append(("done", content["epoch"]))
        return digest

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpoints, "write", slow_write)
        with checkpoints.writing() as writer:
            writer.write({tmp_path / "last.pt": {"epoch": 1}}, torch.device("cpu"))
            assert started.wait(10)  # the write is in progress and the training thread is free
            assert not (tmp_path / "last.pt").exists()
            timer = threading.Timer(0.2, release.set)
            timer.start()
            begun = time.perf_counter()
            writer.write({tmp_path / "last.pt": {"epoch": 2}}, torch.device("cpu"))  # waits for epoch 1's file
            assert time.perf_counter() - begun >= 0.15
            assert order[:2] == [("start", 1), ("done", 1)]
    assert order == [("start", 1), ("done", 1), ("start", 2), ("done", 2)]
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 2}


def test_an_interruption_waits_for_the_pending_write(tmp_path):
    real_write = checkpoints.write

    def slow_write(path, content):
        time.sleep(0.3)
        return real_write(path, content)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(checkpoints, "write", slow_write)
        with checkpoints.writing() as writer:
            writer.write({tmp_path / "last.pt": {"epoch": 1}}, torch.device("cpu"))
            raise KeyboardInterrupt  # Ctrl-C (or SIGTERM) during the next epoch
    assert torch.load(tmp_path / "last.pt", weights_only=True) == {"epoch": 1}  # complete when the stage ends


def test_a_failed_write_raises_on_the_training_thread_and_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "last.pt"
    checkpoints.write(target, {"epoch": 1})
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(MedcliError, match="No space left"):
        with checkpoints.writing() as writer:
            writer.write({target: {"epoch": 2}}, torch.device("cpu"))
    assert torch.load(target, weights_only=True) == {"epoch": 1} and not fileio.partial_files(target)


def test_a_checkpoint_that_fills_the_disk_says_so(tmp_path, monkeypatch):
    """Review: torch.save reports a failed write of its stream as "RuntimeError: [enforce fail at
    inline_container.cc:672] unexpected pos 768 vs 662" ("unexpected RuntimeError" on a full disk)."""
    import errno
    import io

    class FillsUp(io.FileIO):
        def write(self, data):
            if self.tell() + len(data) > 4096:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    monkeypatch.setattr(fileio, "open", lambda path, mode: FillsUp(path, mode.replace("b", "")), raising=False)
    target = tmp_path / "last.pt"
    with pytest.raises(MedcliError, match=r"writing .*last.pt failed \(No space left on device\)"):
        checkpoints.write(target, {"w": torch.zeros(100_000)})
    assert not target.exists() and not fileio.partial_files(target)


def test_a_failed_write_is_said_once_when_another_error_ends_the_stage(tmp_path, monkeypatch, capsys):
    """Review: with best.pt and last.pt queued behind a failed write, the stage's end said the
    same failure once per queued file."""
    monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(KeyboardInterrupt):
        with checkpoints.writing() as writer:
            writer.write({tmp_path / "best.pt": {"epoch": 2}, tmp_path / "last.pt": {"epoch": 2}},
                         torch.device("cpu"))
            raise KeyboardInterrupt
    warnings = [line for line in capsys.readouterr().err.splitlines() if "checkpoint write failed" in line]
    assert len(warnings) == 1 and "No space left" in warnings[0], warnings


def test_a_killed_writers_partial_files_are_removed_when_the_stage_starts_again(tmp_path):
    target = tmp_path / "last.pt"
    partial = tmp_path / ".last.pt.abc123.tmp.pt"
    partial.write_bytes(b"PK half a checkpoint")
    assert fileio.partial_files(target) == [partial]
    with checkpoints.writing(paths=(target,)):
        assert not partial.exists()


# -- a real training process killed with SIGKILL during a checkpoint write ---------------------------

def _medcli(*args: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same arithmetic in every process
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "medcli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=Path(__file__).resolve().parents[1])


def _kill_during_last_write(root: Path, runs: Path, log: Path) -> Path | None:
    """Train a run and SIGKILL it while last.pt is being rewritten (a temporary file of last.pt
    beside an existing last.pt); the run dir, or None when the process ended first or the write
    finished before the signal landed."""
    process = _medcli("train", "--root", str(root), "--runs-dir", str(runs), *TRAIN, log=log)
    try:
        while process.poll() is None:
            checkpoints_dir = next(runs.glob("*/checkpoints"), None)
            if checkpoints_dir is not None and (checkpoints_dir / "last.pt").is_file() \
                    and fileio.partial_files(checkpoints_dir / "last.pt"):
                process.send_signal(signal.SIGKILL)
                process.wait()
                return checkpoints_dir.parent if fileio.partial_files(checkpoints_dir / "last.pt") else None
            time.sleep(0.0002)
        return None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigkill_during_a_write_leaves_the_previous_checkpoint_and_resume_matches(synthetic_root, tmp_path):
    log = tmp_path / "log.txt"
    # the uninterrupted oracle trains meanwhile (one thread each: two cores, the same arithmetic)
    straight = _medcli("train", "--root", str(synthetic_root), "--runs-dir", str(tmp_path / "straight"), *TRAIN, log=log)
    try:
        _killed_and_resumed(synthetic_root, tmp_path, log, straight)
    finally:
        if straight.poll() is None:  # a failed check leaves no training behind
            straight.kill()
            straight.wait()


def _killed_and_resumed(synthetic_root, tmp_path, log, straight) -> None:
    """The test above, while `straight` trains: kill a run during a write, check it, resume it."""
    for attempt in range(4):  # the write may finish (or the run end) before the signal lands
        run = _kill_during_last_write(synthetic_root, tmp_path / f"runs{attempt}", log)
        if run is not None:
            break
    else:
        pytest.fail(f"never caught a last.pt write in progress in 4 runs:\n{log.read_text()[-2000:]}")
    last = run / "checkpoints" / "last.pt"
    assert fileio.partial_files(last)  # the half-written file was never renamed over last.pt
    checkpoint = checkpoints.read(last, Run.open(run))  # loads: the previous complete checkpoint
    assert 1 <= checkpoint["epoch"] < 5
    data = json.loads((run / "manifest.json").read_text())
    assert data["stages"]["train"]["status"] == "running"  # SIGKILL: nothing could record the end
    assert data["stages"]["train"]["artefacts"]["checkpoints/last.pt"] == _sha256(last)  # the file on disk
    best = run / "checkpoints" / "best.pt"
    assert data["stages"]["train"]["artefacts"]["checkpoints/best.pt"] == _sha256(best)

    resumed = _medcli("train", "--resume", str(run), log=log)
    assert resumed.wait() == 0 and straight.wait() == 0, log.read_text()[-2000:]
    assert not fileio.partial_files(last)  # the resumed stage removed the killed writer's file
    (other,) = (tmp_path / "straight").iterdir()
    for name in ("last.pt", "best.pt"):
        a = torch.load(run / "checkpoints" / name, weights_only=True)
        b = torch.load(other / "checkpoints" / name, weights_only=True)
        assert a["epoch"] == b["epoch"] and a["model"].keys() == b["model"].keys()
        assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"]), name
    data = json.loads((run / "manifest.json").read_text())
    assert data["stages"]["train"]["status"] == "completed"
    # review: train_seconds continued from the stage summary, which may hold an epoch last.pt
    # does not (or miss one it does): it is kept in last.pt with the state it times
    final = torch.load(last, weights_only=True)
    assert data["stages"]["train"]["summary"]["train_seconds"] == round(final["train_seconds"], 3)
    assert 0 < final["train_seconds"] <= sum(row["seconds"] for row in final["history"])
    for name in ("last.pt", "best.pt"):
        assert data["stages"]["train"]["artefacts"][f"checkpoints/{name}"] == _sha256(run / "checkpoints" / name)


def _scripted_aucs(monkeypatch, aucs: list) -> None:
    """Validation replaced by a scripted AUC curve: which epochs take best.pt is known."""
    from medcli import train

    values = iter(aucs)

    def fake_evaluate(model, *args, **kwargs):
        auc = next(values)
        return {"accuracy": 0.5, "loss": 1 - auc, "auc": auc, "f1_macro": 0.5}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)


def _recording_writes(monkeypatch, hold=None) -> list:
    """(file name, epoch) of every checkpoint write, in the order written; `hold(name, epoch)`
    may block a write."""
    write, written = checkpoints.write, []

    def recorded(path, content):
        if hold is not None:
            hold(path.name, content["epoch"])
        written.append((path.name, content["epoch"]))
        return write(path, content)

    monkeypatch.setattr(checkpoints, "write", recorded)
    return written


def test_a_last_pt_still_being_written_is_skipped_not_waited_for_and_the_final_one_is_written(
        synthetic_root, tmp_path, monkeypatch):
    """Training never waits for the disk: while epoch 1's last.pt is still being written (held
    here until epoch 2 is recorded) epoch 2, which best.pt does not take, writes none; the last
    epoch's last.pt is written. The manifest's hash is the final file's."""
    from medcli import train

    release, record = threading.Event(), train._record_epoch
    written = _recording_writes(monkeypatch, lambda name, epoch: name == "last.pt" and epoch == 1
                                and release.wait(timeout=30))

    def recorded(run, st, state, *args):
        record(run, st, state, *args)
        if state.epoch == 2:
            release.set()

    monkeypatch.setattr(train, "_record_epoch", recorded)
    _scripted_aucs(monkeypatch, [0.8, 0.7, 0.6, 0.5])
    run = train.train(root=synthetic_root, runs_dir=tmp_path, epochs=4, monitor="auc", model="timm:test_resnet",
                      batch_size=64, seed=0)
    lasts = [epoch for name, epoch in written if name == "last.pt"]
    assert lasts[0] == 1 and 2 not in lasts and lasts[-1] == 4  # epoch 3: written if epoch 1's was done by then
    assert run.stages["train"]["summary"]["last_skipped"] == 4 - len(lasts)
    assert [epoch for name, epoch in written if name == "best.pt"] == [1]
    final = checkpoints.read(run.checkpoint_path("last"), run)
    assert final["epoch"] == 4 and len(final["history"]) == 4
    assert run.stages["train"]["artefacts"]["checkpoints/last.pt"] == _sha256(run.checkpoint_path("last"))


def test_best_pt_is_never_ahead_of_last_pt(synthetic_root, tmp_path, monkeypatch):
    """Review: an epoch that took best.pt while the previous last.pt was still being written
    skipped its own last.pt, so best.pt held an epoch last.pt did not; a run stopped then
    resumed from the earlier last.pt, and where the epoch trained again was not ranked best
    (another device, a GPU's non-deterministic kernels) best.pt kept the abandoned epoch's
    weights under the name of an earlier best epoch. An epoch best.pt takes waits for the
    disk and writes last.pt first; others still skip it."""
    from medcli import train

    monkeypatch.setattr(checkpoints.Writer, "busy", lambda self, path: True)  # a disk slower than every epoch
    written = _recording_writes(monkeypatch)
    _scripted_aucs(monkeypatch, [0.8, 0.9, 0.85, 0.84])
    run = train.train(root=synthetic_root, runs_dir=tmp_path, epochs=4, monitor="auc", model="timm:test_resnet",
                      batch_size=64, seed=0)
    assert written == [("last.pt", 1), ("best.pt", 1), ("last.pt", 2), ("best.pt", 2), ("last.pt", 4)]
    assert run.stages["train"]["summary"]["last_skipped"] == 1


def test_a_failed_checkpoint_write_is_said_once(synthetic_root, tmp_path, monkeypatch, capsys):
    """Review: a full disk failing last.pt, with best.pt queued behind it (which raises the same
    error), gave "warning: a checkpoint write failed: X" and then "error: X"."""
    from medcli import train

    def fail(name, epoch):
        if (name, epoch) == ("last.pt", 2):
            raise OSError(28, "No space left on device")

    _recording_writes(monkeypatch, fail)
    _scripted_aucs(monkeypatch, [0.8, 0.9, 0.85])
    capsys.readouterr()
    with pytest.raises(OSError, match="No space left on device"):
        train.train(root=synthetic_root, runs_dir=tmp_path, epochs=3, monitor="auc", model="timm:test_resnet",
                    batch_size=64, seed=0)
    assert "No space left on device" not in capsys.readouterr().err  # the error itself is the CLI's one line


def test_a_run_stopped_between_last_pt_and_best_pt_resumes_with_the_best_pt_it_would_have(
        synthetic_root, tmp_path, monkeypatch, capsys):
    """A write of epoch 2's best.pt that never finished (the disk, a kill) leaves epoch 1's
    best.pt beside epoch 2's last.pt, which ranks epoch 2 best: resume writes epoch 2's best.pt
    from last.pt, and the run ends with the best.pt and manifest of an uninterrupted one."""
    from medcli import train

    options = dict(root=synthetic_root, epochs=3, monitor="auc", model="timm:test_resnet", batch_size=64, seed=0)
    _scripted_aucs(monkeypatch, [0.8, 0.9, 0.85])
    straight = train.train(runs_dir=tmp_path / "a", **options)

    def fail(name, epoch):
        if (name, epoch) == ("best.pt", 2):
            raise OSError(28, "No space left on device")

    original = checkpoints.write
    _recording_writes(monkeypatch, fail)
    _scripted_aucs(monkeypatch, [0.8, 0.9, 0.85])
    with pytest.raises(OSError):
        train.train(runs_dir=tmp_path / "b", **options)
    (path,) = (tmp_path / "b").iterdir()
    assert torch.load(path / "checkpoints/best.pt", weights_only=True)["epoch"] == 1
    assert checkpoints.read(path / "checkpoints/last.pt", Run.open(path))["epoch"] == 2
    monkeypatch.setattr(checkpoints, "write", original)
    _scripted_aucs(monkeypatch, [0.85])
    capsys.readouterr()
    resumed = train.resume(path)
    assert "checkpoints/best.pt of epoch 2 is written from checkpoints/last.pt" in capsys.readouterr().err
    a = torch.load(straight.checkpoint_path("best"), weights_only=True)
    b = torch.load(resumed.checkpoint_path("best"), weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["metrics"] == b["metrics"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    summary = resumed.stages["train"]["summary"]
    assert summary["best_epoch"] == straight.stages["train"]["summary"]["best_epoch"] == 2
    assert resumed.stages["train"]["artefacts"]["checkpoints/best.pt"] == _sha256(resumed.checkpoint_path("best"))
