"""Training: schedule, autocast, early stopping, checkpoints, resume, strict mode, ViT sizes,
grayscale input and the CLI's stdout/exit-code contract. Tiny synthetic data and models."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medcli import datasets, models, train
from medcli.cli import app
from medcli.errors import UsageError
from medcli.run import Run
from medcli.config import REDUCED, resolve_config

from cli_helpers import one_line_error

runner = CliRunner()
TINY = {"model": "timm:test_resnet", "batch_size": 64, "seed": 0}


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    """Tiny models gain nothing from threads, and on a shared 2-core machine OpenMP workers
    spin-waiting for busy cores make training several times slower (train.fit honours this)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """16 training images: one optimizer step per epoch at batch 16."""
    root = tmp_path_factory.mktemp("small")
    datasets.make_synthetic(root / "bloodmnist.npz", "bloodmnist", 28, (16, 8, 8), seed=1)
    return root


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _weights_equal(a: Path, b: Path) -> bool:
    sa, sb = _load(a)["model"], _load(b)["model"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- schedule -----------------------------------------------------------------------------------

def test_lr_follows_linear_warmup_then_cosine_per_step():
    param = torch.nn.Parameter(torch.zeros(1))
    config = {"optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 0.0, "epochs": 3, "warmup_epochs": 1.0}
    optimizer = torch.optim.SGD([param], lr=config["lr"])
    scheduler = train.make_scheduler(optimizer, config, steps_per_epoch=10)
    seen = []
    for _ in range(30):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.4 * (s + 1) / 10 for s in range(10)]
    expected += [0.4 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 20)) for s in range(10, 30)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert seen[9] == pytest.approx(0.4) and seen[20] == pytest.approx(0.2) and seen[-1] < 0.01


def test_run_history_lr_matches_schedule(tiny_run):
    rows = _history(tiny_run)
    config = Run.open(tiny_run).config
    steps = 256 // config["batch_size"]  # synthetic_root has 256 training images
    epochs = range(1, config["epochs"] + 1)
    warmup = round(config["warmup_epochs"] * steps)
    expected = [config["lr"] * train.lr_factor(e * steps - 1, len(epochs) * steps, warmup) for e in epochs]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected)


# -- artefacts, best.pt -----------------------------------------------------------------------------

def test_tiny_run_writes_loadable_checkpoints_and_best_is_best_epoch(tiny_run):
    manifest = Run.open(tiny_run)
    epochs = manifest.config["epochs"]
    stage = manifest.stages["train"]
    assert stage["status"] == "completed"
    for rel in ("checkpoints/best.pt", "checkpoints/last.pt", "history.csv", "figures/curves.png"):
        assert rel in stage["artefacts"] and (tiny_run / rel).is_file()
    rows = _history(tiny_run)
    assert list(rows[0]) == list(train.HISTORY_COLUMNS) and len(rows) == epochs
    accs = [float(r["val_acc"]) for r in rows]
    best_epoch = accs.index(max(accs)) + 1
    best, last = _load(tiny_run / "checkpoints/best.pt"), _load(tiny_run / "checkpoints/last.pt")
    assert best["epoch"] == best_epoch == stage["summary"]["best_epoch"]
    assert best["metrics"]["accuracy"] == pytest.approx(max(accs))
    assert last["epoch"] == epochs and {"optimizer", "scheduler", "scaler", "rng", "history"} <= set(last)
    model = manifest.load_model("best")
    assert not model.training


# -- autocast ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_autocast_is_entered_only_when_asked(small_root, tmp_path, monkeypatch, amp):
    seen = []
    create = models.create

    def recording_create(*args, **kwargs):
        model, spec = create(*args, **kwargs)
        model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        return model, spec

    monkeypatch.setattr(models, "create", recording_create)
    manifest = train.train(root=small_root, runs_dir=tmp_path, epochs=1, amp=amp, device="cpu",
                           **{**TINY, "batch_size": 16})
    assert manifest.config["amp"] == amp
    assert seen and all(seen) == (amp == "bf16") and any(seen) == (amp == "bf16")


# -- early stopping -------------------------------------------------------------------------------

def test_early_stopping_stops_after_patience_and_keeps_best(small_root, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])

    def fake_evaluate(*args, **kwargs):
        acc = next(scripted)
        return {"accuracy": acc, "loss": 1 - acc, "auc": acc, "f1_macro": acc}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    manifest = train.train(root=small_root, runs_dir=tmp_path, epochs=6, patience=2, **{**TINY, "batch_size": 16})
    summary = manifest.stages["train"]["summary"]
    assert summary["epochs_run"] == 4 and summary["stopped_early"] is True
    assert summary["best_epoch"] == 2 and summary["best_value"] == 0.7
    assert _load(manifest.run_dir / "checkpoints/best.pt")["epoch"] == 2
    assert len(_history(manifest.run_dir)) == 4


# -- resume and strict mode --------------------------------------------------------------------------

def test_interrupted_then_resumed_run_matches_uninterrupted(synthetic_root, tmp_path, monkeypatch):
    options = dict(root=synthetic_root, epochs=2, mixup_alpha=0.4, **TINY)
    straight = train.train(runs_dir=tmp_path / "a", **options)

    real_epoch = train.train_one_epoch
    calls = []

    def interrupt_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train, "train_one_epoch", interrupt_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.train(runs_dir=tmp_path / "b", **options)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    (run,) = (tmp_path / "b").iterdir()
    assert Run.open(run).stages["train"]["status"] == "interrupted"
    assert _load(run / "checkpoints/last.pt")["epoch"] == 1

    resumed = train.resume(run)
    assert resumed.stages["train"]["status"] == "completed"
    assert _weights_equal(straight.run_dir / "checkpoints/last.pt", run / "checkpoints/last.pt")
    assert _history(run)[-1]["val_loss"] == _history(straight.run_dir)[-1]["val_loss"]
    with pytest.raises(UsageError, match="already finished training"):
        train.resume(run)


def test_strict_mode_reruns_are_bit_identical(synthetic_root, tmp_path):
    runs = [train.train(root=synthetic_root, runs_dir=tmp_path, epochs=1, deterministic=True, mixup_alpha=0.2,
                        **TINY) for _ in range(2)]
    assert runs[0].run_dir != runs[1].run_dir  # never the same directory
    assert _weights_equal(runs[0].run_dir / "checkpoints/last.pt", runs[1].run_dir / "checkpoints/last.pt")
    env = runs[0].data["environment"]
    assert env["deterministic"] is True and env["seed"] == 0
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run


# -- models: ViT sizes, reduced presets, grayscale ---------------------------------------------------

@pytest.mark.parametrize("model,size,reduced", [
    ("vit", 28, True), ("timm:test_vit", 28, True),
    ("timm:test_vit", 64, False), ("timm:test_vit", 128, False), ("timm:test_vit", 224, False),
])
def test_vit_trains_at_every_size(small_root, tmp_path, model, size, reduced):
    manifest = train.train(root=small_root, runs_dir=tmp_path, model=model, reduced=reduced, epochs=1,
                           batch_size=16, input_size=None if reduced else size)
    spec = manifest.data["model"]
    assert spec["family"] == "vit" and spec["input_size"] == size == manifest.data["preprocess"]["input_size"]
    assert manifest.stages["train"]["status"] == "completed"
    assert math.isfinite(float(_history(manifest.run_dir)[0]["train_loss"]))


def test_reduced_resnet_keeps_maxpool():
    config = resolve_config(model="resnet18", reduced=True)
    assert config["model_overrides"] == {"keep_maxpool": True} and config["input_size"] == 28
    assert config["epochs"] == REDUCED["cnn"]["epochs"] and config["optimizer"] == "sgd"
    vit = resolve_config(model="vit", reduced=True)
    assert vit["variant"] == "vit-tiny" and vit["optimizer"] == "adamw" and vit["model_overrides"]["patch_size"] == 4


def test_grayscale_dataset_trains(tmp_path):
    root = tmp_path / "data"
    datasets.make_synthetic(root / "breastmnist.npz", "breastmnist", 28, (32, 16, 16), seed=2)
    manifest = train.train(root=root, runs_dir=tmp_path / "runs", dataset="breastmnist", epochs=1,
                           **{**TINY, "batch_size": 16})
    assert manifest.data["model"]["in_chans"] == 1 and manifest.data["model"]["num_classes"] == 2
    assert len(manifest.data["preprocess"]["mean"]) == 1


# -- CLI ---------------------------------------------------------------------------------------------

def test_cli_prints_exactly_the_run_dir(small_root, tmp_path):
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", "--root", str(small_root), "--runs-dir", str(runs),
                                 "--model", "timm:test_resnet", "--epochs", "1", "--batch-size", "16",
                                 "--no-flips", "--rotate", "10", "--crop-scale", "0.6", "--jitter", "0.2"])
    assert result.exit_code == 0, result.stderr
    (run,) = runs.iterdir()
    assert result.stdout == f"{run}\n"
    assert Run.open(run).config["augment"] == {"hflip": False, "vflip": False, "rot90": False, "degrees": 10.0,
                                                    "crop_scale": [0.6, 1.0], "brightness": 0.2, "contrast": 0.2}
    assert "epoch 1/1" in result.stderr
    again = runner.invoke(app, ["train", "--resume", str(run)])
    assert again.exit_code == 2 and "already finished training" in again.stderr


def test_cli_json_summary(small_root, tmp_path):
    result = runner.invoke(app, ["train", "--root", str(small_root), "--runs-dir", str(tmp_path),
                                 "--model", "timm:test_resnet", "--epochs", "1", "--batch-size", "16", "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["epochs_run"] == 1 and Path(summary["run_dir"]).is_dir()


def _bad_weights(tmp_path: Path) -> tuple[Path, Path]:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), foreign)
    return garbage, foreign


@pytest.mark.parametrize("args,message", [
    (["--model", "no-such-net"], "unknown model"),
    (["--size", "64"], "no bloodmnist at 64 px"),
    (["--size", "30"], "not a MedMNIST size"),
    (["--dataset", "chestmnist"], "multi-label"),
    (["--epochs", "0"], "--epochs"),
    (["--monitor", "speed"], "--monitor"),
    (["--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--weights", "{garbage}"], "damaged or not a PyTorch weights file"),
    (["--weights", "{foreign}"], "does not fit model"),
    (["--root", "{empty}"], "no bloodmnist at 28 px"),
])
def test_bad_options_exit_2_with_one_line_and_no_run_dir(small_root, tmp_path, args, message):
    garbage, foreign = _bad_weights(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(garbage=garbage, foreign=foreign, empty=empty) for a in args]
    root = [] if "--root" in args else ["--root", str(small_root)]
    runs = tmp_path / "runs"
    model = [] if "--model" in args else ["--model", "timm:test_resnet"]
    result = runner.invoke(app, ["train", *root, "--runs-dir", str(runs), *model, *args])
    one_line_error(result, 2, message)
    assert not runs.exists() or not any(runs.iterdir())
