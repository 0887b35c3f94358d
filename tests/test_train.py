"""Training: schedule, autocast, early stopping, checkpoints, resume, strict mode, ViT sizes,
grayscale input and the CLI's stdout/exit-code contract. Tiny synthetic data and models."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medcli import checkpoints, datasets, feed, fileio, models, npzcache, optim, selection, train
from medcli.cli import app
from medcli.errors import UsageError
from medcli.run import Run
from medcli.config import fit_warmup_to_epochs, resolve_config

from cli_helpers import interrupt_at_call, one_line_error

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
    config = {"optimizer": "sgd", "lr": 0.4, "momentum": 0.9, "weight_decay": 0.0, "epochs": 5, "warmup_epochs": 1.0}
    optimizer = torch.optim.SGD([param], lr=config["lr"])
    scheduler = optim.make_scheduler(optimizer, config, steps_per_epoch=10)
    seen = []
    for _ in range(50):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.4 * (s + 1) / 10 for s in range(10)]
    expected += [0.4 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 40)) for s in range(10, 50)]
    assert seen == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert seen[9] == pytest.approx(0.4) and seen[30] == pytest.approx(0.2) and seen[-1] < 0.01


def test_run_history_lr_matches_schedule(tiny_run):
    rows = _history(tiny_run)
    config = Run.open(tiny_run).config
    steps = 256 // config["batch_size"]  # synthetic_root has 256 training images
    epochs = range(1, config["epochs"] + 1)
    warmup = optim.warmup_steps(config, steps)
    expected = [config["lr"] * optim.lr_factor(e * steps - 1, len(epochs) * steps, warmup) for e in epochs]
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected)


def test_a_compiled_run_follows_the_schedule_and_equals_the_eager_run(small_root, tmp_path, monkeypatch):
    """--compile: the forward and the optimizer step compiled (dynamo's `eager` backend runs the
    captured graphs as they are; inductor is too slow on 2 cores), the learning rate a
    device tensor the schedule fills in place. The history's rates, the weights and last.pt's
    rate equal the uncompiled run's within float32 rounding, interrupted after epoch 1 and
    resumed (last.pt's lr tensor goes back into the optimizer) as here. --compile-mode
    reduce-overhead reaches torch.compile for the model (CUDA graphs; torch skips them on the
    CPU) and every step marks a new iteration for the graphs; the resumed run keeps the mode."""
    compile_ = torch.compile
    modes, marks = [], []

    def compile_eager(fn, mode=None, **kw):
        modes.append(mode)
        return compile_(fn, backend="eager", **kw)

    monkeypatch.setattr(torch, "compile", compile_eager)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(True))
    torch._dynamo.reset()
    # 2 steps an epoch, at the rate of batch 8 (lr 0.1 there makes training chaotic: the float32
    # rounding of a compiled step grew into 1 % of the weights within two steps for some seeds)
    options = dict(root=small_root, epochs=4, warmup_epochs=1.0, lr=0.00625, **{**TINY, "batch_size": 8})
    eager = train.train(runs_dir=tmp_path / "eager", **options)
    assert not marks and not modes
    run = _interrupted_run(tmp_path / "compiled", monkeypatch, compile_mode="reduce-overhead", **options)
    assert isinstance(_load(run / "checkpoints/last.pt")["optimizer"]["param_groups"][0]["lr"], torch.Tensor)
    compiled = train.resume(run)
    torch._dynamo.reset()
    assert compiled.config["compile"] and compiled.config["compile_mode"] == "reduce-overhead"
    # the forward in the mode and the optimizer step, before and after the interruption
    assert modes == ["reduce-overhead", None] * 2 and len(marks) == 4 * 2
    rates = [float(row["lr"]) for row in _history(compiled.run_dir)]
    assert len(set(rates)) == 4 and rates == pytest.approx([float(row["lr"]) for row in _history(eager.run_dir)])
    a, b = _load(eager.run_dir / "checkpoints/last.pt"), _load(compiled.run_dir / "checkpoints/last.pt")
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), rtol=1e-4, atol=1e-5) for k in a["model"])
    lr = b["optimizer"]["param_groups"][0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(a["optimizer"]["param_groups"][0]["lr"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_steps_follow_the_schedule_and_the_eager_run(small_root, tmp_path):
    """--compile-mode reduce-overhead on a GPU: the forward and backward replayed as CUDA graphs
    (inductor), the lr tensor filled between replays. The rates equal the eager run's and the
    weights stay within the rounding of fused kernels."""
    torch._dynamo.reset()
    options = dict(root=small_root, epochs=4, warmup_epochs=1.0, device="cuda", amp="off",
                   **{**TINY, "batch_size": 8})
    eager = train.train(runs_dir=tmp_path / "eager", **options)
    graphs = train.train(runs_dir=tmp_path / "graphs", compile_mode="reduce-overhead", **options)
    torch._dynamo.reset()
    rates = [float(row["lr"]) for row in _history(graphs.run_dir)]
    assert len(set(rates)) == 4 and rates == pytest.approx([float(row["lr"]) for row in _history(eager.run_dir)])
    a, b = _load(eager.run_dir / "checkpoints/last.pt"), _load(graphs.run_dir / "checkpoints/last.pt")
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), rtol=1e-3, atol=1e-4) for k in a["model"])


# -- warm-up once: one batch shape for validation and BatchNorm re-estimation -----------------------

def _shapes(model) -> list:
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    return seen


@pytest.mark.parametrize("tta", [False, True])
def test_padded_validation_batches_have_one_shape_and_the_same_scores(tta):
    """`pad=True` (training asks for it on CUDA): every forward pass sees `batch_size` images, the
    last batch filled up with black images whose scores are dropped; the scores equal the
    unpadded ones within rounding and the metrics are the same."""
    from medcli import augment, inference

    torch.manual_seed(0)
    model, _ = models.create("timm:test_resnet", 8, 3, 28)
    model.eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2 * 64 + 37, 3, 28, 28), dtype=torch.uint8, generator=generator)
    labels = torch.arange(len(images)) % 8
    task, prep = datasets.task("bloodmnist"), augment.make_prep(28, 3)
    extra = {"views": [lambda x: x, lambda x: x.flip(-1)], "task": task} if tta else {}
    seen = _shapes(model)
    plain = inference.predict_logits(model, images, prep, batch_size=64, device="cpu", **extra)
    assert sorted(set(seen)) == [(37, 3, 28, 28), (64, 3, 28, 28)]
    seen.clear()
    padded = inference.predict_logits(model, images, prep, batch_size=64, device="cpu", pad=True, **extra)
    assert set(seen) == {(64, 3, 28, 28)} and len(seen) == 3 * (2 if tta else 1)
    assert padded.shape == plain.shape and torch.allclose(padded, plain, rtol=1e-5, atol=1e-5)
    metrics = [task.metrics(labels.numpy(), task.probs_t(scores.double()).numpy()) for scores in (plain, padded)]
    numbers = [{k: v for k, v in m.items() if isinstance(v, float)} for m in metrics]
    assert numbers[0] == pytest.approx(numbers[1], rel=1e-6) and "auc" in numbers[0]
    assert metrics[0]["confusion_matrix"] == metrics[1]["confusion_matrix"]
    seen.clear()
    small = inference.predict_logits(model, images[:5], prep, batch_size=64, device="cpu", pad=True, **extra)
    assert set(seen) == {(64, 3, 28, 28)} and torch.allclose(small, plain[:5], rtol=1e-5, atol=1e-5)


def test_batchnorm_reestimation_runs_one_batch_size():
    """The re-estimation images split into equal batches (a multiple of the batch count: an odd
    601 above one EVAL_BATCH becomes 600), so cuDNN autotunes one shape; MedMNIST's training
    splits all had equal batches already (256, 588, 876 or 1,024 images)."""
    from medcli import augment

    for n, expected in [(546, 256), (4708, 588), (7007, 876), (11959, 1024), (4808, 600), (4120, 514), (100, 100)]:
        assert train.bn_images(n) == expected, n
    n = 4808  # round(n / 8) = 601
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = feed.Data(images, torch.zeros(n, dtype=torch.long), torch.device("cpu"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    seen = _shapes(model)
    train.reestimate_batchnorm(model, data, augment.make_prep(8, 3), {"channels_last": False, "amp": "off"}, "cpu")
    assert seen == [(300, 3, 8, 8)] * 2


# -- artefacts, best.pt -----------------------------------------------------------------------------

def test_tiny_run_writes_loadable_checkpoints_and_best_is_best_window(tiny_run):
    """64 validation images: the `ema-window` rule. Its 3 epochs are one window, so best.pt is
    the EMA weights of epoch 3, and the summary says so."""
    manifest = Run.open(tiny_run)
    epochs = manifest.config["epochs"]
    stage = manifest.stages["train"]
    assert stage["status"] == "completed"
    for rel in ("checkpoints/best.pt", "checkpoints/last.pt", "history.csv", "figures/curves.png"):
        assert rel in stage["artefacts"] and (tiny_run / rel).is_file()
    rows = _history(tiny_run)
    assert list(rows[0]) == list(train.HISTORY_COLUMNS) and len(rows) == epochs
    select = manifest.config["select"]
    assert select["rule"] == "ema-window" and select["monitor"] == "auc" and manifest.config["monitor"] == "acc"
    assert stage["summary"]["monitor"] == "auc"  # the option's value stays in config["monitor"]; the rule's is select's
    assert select["ema_decay"] == pytest.approx(selection.ema_decay(3 * 16))
    best, last = _load(tiny_run / "checkpoints/best.pt"), _load(tiny_run / "checkpoints/last.pt")
    aucs = [float(r["val_auc"]) for r in rows]
    summary = stage["summary"]
    assert best["epoch"] == 3 == summary["best_epoch"] and summary["best_window"] == [1, 3]
    assert summary["best_value"] == pytest.approx(sum(aucs) / 3) and summary["best_weights"] == "ema"
    # review: images_per_s was the last epoch's; it is the run's, each epoch 16 steps of 16 images
    assert summary["images_per_s"] == pytest.approx(3 * 256 / summary["train_seconds"], rel=1e-3)
    assert summary["last_epoch_images_per_s"] > 0
    assert best["metrics"]["auc"] == pytest.approx(aucs[-1])
    assert best["model"].keys() == last["ema"].keys() and all(torch.equal(best["model"][k], last["ema"][k])
                                                              for k in best["model"])
    assert not all(torch.equal(best["model"][k], last["model"][k]) for k in best["model"])  # the EMA, not the model
    assert last["epoch"] == epochs and {"optimizer", "scheduler", "scaler", "rng", "history", "ema", "scores"} <= set(last)
    model = manifest.load_model("best")
    assert not model.training


# -- autocast ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("amp", ["bf16", "off"])
def test_autocast_is_entered_only_when_asked(small_root, tmp_path, monkeypatch, amp):
    seen = []
    create = models.create

    def recording_create(*args, **kwargs):
        model, spec = create(*args, **kwargs)
        model.register_forward_hook(lambda module, *_: seen.append((module.training, torch.is_autocast_enabled("cpu"))))
        return model, spec

    monkeypatch.setattr(models, "create", recording_create)
    manifest = train.train(root=small_root, runs_dir=tmp_path, epochs=1, amp=amp, device="cpu",
                           **{**TINY, "batch_size": 16})
    assert manifest.config["amp"] == amp
    assert any(autocast for training, autocast in seen if training) == (amp == "bf16")  # the training steps
    validation = [autocast for training, autocast in seen if not training]
    assert validation and not any(validation)  # float32 whatever --amp says


# -- larger images ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size, stem", [(64, "small+pool"), (128, "imagenet")])
def test_resnet18_trains_evaluates_and_explains_at_larger_sizes(tmp_path, size, stem):
    """The 64- and 128-px path end to end on a tiny grayscale binary set (BreastMNIST layout):
    the stem the size policy picks, recorded in the manifest, and every later command."""
    root = tmp_path / "data"
    datasets.make_synthetic(root / datasets.filename("breastmnist", size), "breastmnist", size, (32, 8, 8), seed=0)
    trained = runner.invoke(app, ["train", "--dataset", "breastmnist", "--size", str(size), "--root", str(root),
                                  "--runs-dir", str(tmp_path / "runs"), "--model", "resnet18", "--epochs", "1"])
    assert trained.exit_code == 0, trained.output
    run = Path(trained.stdout.strip())
    manifest = Run.open(run)
    assert manifest.spec["stem"] == stem and manifest.spec["input_size"] == size
    _evaluate_and_explain(run)


def _evaluate_and_explain(run: Path) -> dict:
    """`evaluate` (8 test images) and one Grad-CAM per class on a trained run; the explain index."""
    evaluated = runner.invoke(app, ["--quiet", "evaluate", str(run), "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["test"]["metrics"]["n"] == 8
    explained = runner.invoke(app, ["--quiet", "explain", str(run), "--method", "gradcam", "--per-class", "1",
                                    "--no-faithfulness", "--json"])
    assert explained.exit_code == 0, explained.output
    return json.loads(explained.stdout)


def test_densenet121_trains_evaluates_and_explains(small_root, tmp_path):
    """The second torchvision family end to end on 16 synthetic 28-px images: the small stem
    in the manifest, evaluate, and Grad-CAM on the record's default layer (the 7x7 dense block)."""
    trained = runner.invoke(app, ["train", "--root", str(small_root), "--runs-dir", str(tmp_path), "--model",
                                  "densenet121", "--epochs", "1", "--batch-size", "16"])
    assert trained.exit_code == 0, trained.output
    assert "data: SYNTHETIC data" in trained.stderr  # the train log line says what the data is
    run = Path(trained.stdout.strip())
    spec = Run.open(run).spec
    assert spec["name"] == "densenet121" and spec["stem"] == "small"
    assert _evaluate_and_explain(run)["layer"] == "features.denseblock3"


# -- divergence -------------------------------------------------------------------------------------

def test_a_diverged_run_stops_with_one_line_and_keeps_the_last_finite_epoch(small_root, tmp_path, monkeypatch):
    one_epoch = train.train_one_epoch

    def poisoned(state, *args, **kwargs):
        stats = one_epoch(state, *args, **kwargs)
        if state.epoch == 1:  # the second epoch (state.epoch counts finished ones)
            with torch.no_grad():
                next(state.model.parameters()).fill_(float("nan"))
        return stats

    monkeypatch.setattr(train, "train_one_epoch", poisoned)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", "--root", str(small_root), "--runs-dir", str(runs),
                                 "--model", "timm:test_resnet", "--epochs", "3", "--batch-size", "16"])
    one_line_error(result, 1, "diverged in epoch 2", "last.pt keeps an earlier epoch", "lower --lr")
    (run,) = runs.iterdir()
    assert Run.open(run).stages["train"]["status"] == "failed"
    assert _load(run / "checkpoints/last.pt")["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in _load(run / "checkpoints/last.pt")["model"].values()
               if v.is_floating_point())
    assert train.monitored({"loss": float("nan")}, "loss") is None  # an overflowing val loss picks nothing



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_check_finite_finds_one_bad_weight_anywhere_and_passes_huge_finite_ones(bad):
    from medcli.errors import MedcliError
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # finite; its squared norm would overflow float32
    train.check_finite(model, 3, {"amp": "none"})
    with torch.no_grad():
        model[2].bias[1] = bad  # the last element of the last tensor
    with pytest.raises(MedcliError, match="diverged in epoch 3"):
        train.check_finite(model, 3, {"amp": "none"})

# -- early stopping -------------------------------------------------------------------------------

def test_early_stopping_stops_after_patience_and_keeps_best(small_root, tmp_path, monkeypatch):
    scripted = iter([0.5, 0.7, 0.6, 0.65, 0.9, 0.95])

    def fake_evaluate(*args, **kwargs):
        acc = next(scripted)
        return {"accuracy": acc, "loss": 1 - acc, "auc": acc, "f1_macro": acc}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    manifest = train.train(root=small_root, runs_dir=tmp_path, epochs=6, patience=2, monitor="acc",
                           **{**TINY, "batch_size": 16})
    summary = manifest.stages["train"]["summary"]
    assert summary["epochs_run"] == 4 and summary["stopped_early"] is True
    assert summary["best_epoch"] == 2 and summary["best_value"] == 0.7
    assert _load(manifest.run_dir / "checkpoints/best.pt")["epoch"] == 2
    assert len(_history(manifest.run_dir)) == 4


@pytest.mark.parametrize("monitor, scripted, best_epoch", [
    ("acc", [0.5, 0.7, 0.7, 0.6, 0.7, 0.9], 3),  # the tie at epoch 3 takes best.pt, then patience runs out
    ("loss", [0.5, 0.7, 0.7, 0.6, 0.7, 0.9], 3),
])
def test_a_tie_moves_best_to_the_later_epoch_but_does_not_reset_patience(small_root, tmp_path, monkeypatch,
                                                                          monitor, scripted, best_epoch):
    values = iter(scripted)

    def fake_evaluate(*args, **kwargs):
        acc = next(values)
        return {"accuracy": acc, "loss": 1 - acc, "auc": acc, "f1_macro": acc}

    hashed, written = [], []
    real_sha256, real_write = fileio.sha256_file, checkpoints.write
    monkeypatch.setattr(fileio, "sha256_file", lambda path: hashed.append(Path(path).name) or real_sha256(path))
    monkeypatch.setattr(checkpoints, "write", lambda path, content: written.append(path.name) or real_write(path, content))
    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    manifest = train.train(root=small_root, runs_dir=tmp_path, epochs=6, patience=2, monitor=monitor,
                           **{**TINY, "batch_size": 16})
    summary = manifest.stages["train"]["summary"]
    assert summary["epochs_run"] == 4 and summary["stopped_early"] is True
    assert summary["best_epoch"] == best_epoch == _load(manifest.run_dir / "checkpoints/best.pt")["epoch"]
    # best.pt is written (and hashed as it is written) at epochs 1-3, not again at epoch 4; no
    # checkpoint is read back to hash it; the recorded hashes are the files'
    assert written.count("best.pt") == best_epoch and written.count("last.pt") == 4
    assert "best.pt" not in hashed and "last.pt" not in hashed
    for name in ("best.pt", "last.pt"):
        path = manifest.run_dir / "checkpoints" / name
        assert manifest.stages["train"]["artefacts"][f"checkpoints/{name}"] == real_sha256(path)
    assert train.compare(0.7, 0.7, monitor) == 0


# -- resume and strict mode --------------------------------------------------------------------------

def _interrupted_run(runs, monkeypatch, **options) -> Path:
    """A run interrupted during its second epoch (last.pt holds epoch 1)."""
    real_epoch = interrupt_at_call(monkeypatch, train, "train_one_epoch")
    with pytest.raises(KeyboardInterrupt):
        train.train(runs_dir=runs, **options)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    (run,) = runs.iterdir()
    return run


def test_interrupted_then_resumed_run_matches_uninterrupted(synthetic_root, tmp_path, monkeypatch):
    options = dict(root=synthetic_root, epochs=2, mixup_alpha=0.4, **TINY)
    straight = train.train(runs_dir=tmp_path / "a", **options)
    run = _interrupted_run(runs=tmp_path / "b", monkeypatch=monkeypatch, **options)
    assert Run.open(run).stages["train"]["status"] == "interrupted"
    assert _load(run / "checkpoints/last.pt")["epoch"] == 1

    assert _load(run / "checkpoints/last.pt")["ema"] is not None  # the EMA rule's state is in last.pt
    resumed = train.resume(run)
    assert resumed.stages["train"]["status"] == "completed"
    assert resumed.config["select"]["rule"] == "ema-window"  # 64 validation images
    assert _weights_equal(straight.run_dir / "checkpoints/last.pt", run / "checkpoints/last.pt")
    assert _weights_equal(straight.run_dir / "checkpoints/best.pt", run / "checkpoints/best.pt")  # the EMA weights
    a, b = _load(straight.run_dir / "checkpoints/last.pt"), _load(run / "checkpoints/last.pt")
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"]) and a["scores"] == b["scores"]
    assert resumed.stages["train"]["summary"]["best_value"] == straight.stages["train"]["summary"]["best_value"]
    assert _history(run)[-1]["val_loss"] == _history(straight.run_dir)[-1]["val_loss"]
    with pytest.raises(UsageError, match="already finished training"):
        train.resume(run)


def test_a_resume_of_a_run_another_process_trains_is_refused_before_anything_loads(small_root, tmp_path, monkeypatch,
                                                                                    capsys):
    """Review: a second `train --resume` of a run being resumed loaded its data and said
    "resuming on cpu ... with 1 process; the run trained ... with 2 processes" before the stage
    lock refused it; `--nproc` started its processes first."""
    from filelock import FileLock

    from medcli.run import stage_lock_path

    run = _interrupted_run(tmp_path / "runs", monkeypatch, root=small_root, epochs=2, **{**TINY, "batch_size": 16})
    monkeypatch.setattr(train, "_load", lambda *a, **k: pytest.fail("the data loaded"))
    capsys.readouterr()
    with FileLock(stage_lock_path(run, "train")):  # the other resume, at work
        with pytest.raises(UsageError, match=r"in use by another medcli process \(train stage"):
            train.resume(run, device="cpu")
        with pytest.raises(UsageError, match=r"in use by another medcli process \(train stage"):
            train.check_resume_launch(run, 2)
    assert "resuming" not in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one, as Python says it
def test_a_sigterm_whose_interrupt_a_finaliser_swallowed_still_stops_training(small_root, tmp_path, monkeypatch):
    """Review: a SIGTERM that arrived while Python ran a weakref callback (torch runs many)
    raised its KeyboardInterrupt there, where Python prints "Exception ignored" and drops it:
    training went on as if nothing had been asked."""
    import os
    import signal

    from medcli import augment

    class Finaliser:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # delivered while this finaliser runs
            sum(range(10_000))

    real_apply, calls = augment.apply, []

    def apply_then_finalise(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            Finaliser()  # made and dropped at once: its __del__ runs here
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(augment, "apply", apply_then_finalise)
    runs = tmp_path / "runs"
    args = ["train", "--model", "timm:test_resnet", "--batch-size", "16", "--epochs", "2", "--root", str(small_root),
            "--runs-dir", str(runs)]
    try:
        result = runner.invoke(app, args)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    assert result.exit_code == 130, result.output
    (run,) = runs.iterdir()
    assert Run.open(run).stages["train"]["status"] == "interrupted"


@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError("CUDA out of memory")])
def test_a_stop_or_failure_while_training_is_set_up_is_recorded_in_the_run(small_root, tmp_path, monkeypatch, stop):
    """Review: between the run's creation and its train stage (the model and data moved to the
    device: seconds on a GPU) a Ctrl-C or an error left a run with no stage at all, and the
    message did not name it. The stage is interrupted (resumable) or failed."""
    from medcli import feed

    real = feed.Data.of

    def stopped(*args, **kwargs):
        raise stop

    monkeypatch.setattr(feed.Data, "of", stopped)
    result = runner.invoke(app, ["train", "--root", str(small_root), "--runs-dir", str(tmp_path), "--epochs", "1",
                                 "--batch-size", "16", "--model", "timm:test_resnet"])
    (run,) = tmp_path.iterdir()
    status = Run.open(run).stages["train"]["status"]
    if stop is KeyboardInterrupt:
        assert result.exit_code == 130 and status == "interrupted"
        assert f"medcli train --resume {run}" in result.stderr.replace("'", ""), result.stderr
        monkeypatch.setattr(feed.Data, "of", real)
        assert train.resume(run).stages["train"]["status"] == "completed"
    else:
        assert result.exit_code == 1 and status == "failed", result.stderr


def test_a_run_trained_on_cuda_resumes_on_the_cpu(small_root, tmp_path, monkeypatch, capsys):
    """Review defect 1: last.pt written on a GPU holds CUDA RNG states and (before the
    augmentation generator moved to the CPU) a CUDA generator state, and the manifest says
    cuda and bf16. Resuming it on a CPU must continue the run, with a warning, not crash."""
    run = _interrupted_run(tmp_path / "runs", monkeypatch, root=small_root, epochs=2, batch_size=16,
                           model="timm:test_resnet")
    last = run / "checkpoints" / "last.pt"
    checkpoint = _load(last)
    cuda_generator_state = torch.tensor([7, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8)
    checkpoint["rng"].update(device_type="cuda", aug=cuda_generator_state,
                             cuda=[torch.zeros(16, dtype=torch.uint8), torch.zeros(16, dtype=torch.uint8)])
    torch.save(checkpoint, last)
    Run.open(run).update(lambda data: data["config"].update(device="cuda", amp="bf16"))
    if not torch.cuda.is_available():  # review: its own device was used unchecked (a driver's error, or
        for amp in ("bf16", "off"):    # "this GPU does not support bf16; use --amp ...", which --resume refuses)
            Run.open(run).update(lambda data: data["config"].update(amp=amp))
            with pytest.raises(UsageError, match=r"trained on cuda, which this machine does not have; .* --device cpu"):
                train.resume(run)
        assert Run.open(run).stages["train"]["status"] == "interrupted"

    resumed = train.resume(run, device="cpu")
    err = capsys.readouterr().err
    assert resumed.stages["train"]["status"] == "completed" and resumed.stages["train"]["summary"]["epochs_run"] == 2
    assert "trained on cuda" in err and "re-seeded" in err
    assert resumed.config["device"] == "cpu" and resumed.config["amp"] == "off"


def test_a_run_whose_data_moved_resumes_with_root_but_only_on_its_own_file(small_root, tmp_path, monkeypatch):
    """Review defect 2: the data folder moved; resume looked only in the old one, ignored
    --root and could not continue. It finds the run's file under --root, refuses another
    file (its md5 differs), and says where to look when the file is gone."""
    import shutil

    data = shutil.copytree(small_root, tmp_path / "data")
    run = _interrupted_run(tmp_path / "runs", monkeypatch, root=data, epochs=2, batch_size=16,
                           model="timm:test_resnet")
    moved = data.rename(tmp_path / "moved")
    one_line_error(runner.invoke(app, ["train", "--resume", str(run)]), 2, "is missing; pass --root DIR")
    other = tmp_path / "other"
    datasets.make_synthetic(other / datasets.filename("bloodmnist", 28), "bloodmnist", 28, (16, 8, 8), seed=2)
    one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--root", str(other)]), 2,
                   "differs from the file this run was trained on")
    assert Run.open(run).stages["train"]["status"] == "interrupted"
    result = runner.invoke(app, ["train", "--resume", str(run), "--root", str(moved)])
    assert result.exit_code == 0, result.output
    assert Run.open(run).stages["train"]["summary"]["epochs_run"] == 2


def test_the_device_sharing_warning_names_the_process_to_end_not_all_of_them(monkeypatch, capsys):
    """Review defect 3: the advice was 'medcli clean-processes --yes', which ends every other
    medcli process of the user (parallel trainings included)."""
    from types import SimpleNamespace

    from medcli import processes

    other = SimpleNamespace(pid=4242, age_s=600.0, device="cpu")
    monkeypatch.setattr(processes, "other_trainings", lambda device, exclude_parent=None: [other])
    train._warn_if_device_shared("cpu")
    err = capsys.readouterr().err
    assert "pid 4242" in err and "kill 4242" in err and "'medcli clean-processes'" in err and "--yes" not in err


def test_cuda_rng_states_restore_onto_fewer_gpus(monkeypatch):
    """Review defect 1: a checkpoint from a 2-GPU machine resumed on a 1-GPU one restores the
    state of the GPU that exists instead of failing on the missing one."""
    restored = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.append(index))
    generator = torch.Generator()
    state = train.State(model=None, forward=None, optimizer=None, scheduler=None, scaler=None,
                        data_gen=torch.Generator(), aug_gen=generator, task=None)
    saved = {"torch": torch.get_rng_state(), "data": generator.get_state(), "aug": generator.get_state(),
             "device_type": "cuda", "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2}
    state.set_rng(saved, torch.device("cuda"))
    assert restored == [0]


def test_strict_mode_replaces_nondeterministic_modules_and_says_so(small_root, tmp_path):
    """Review defect 2: strict mode swaps global average pooling (no deterministic CUDA
    backward) for an exact mean and records the swap in the manifest."""
    run = train.train(root=small_root, runs_dir=tmp_path, epochs=1, batch_size=16, deterministic=True,
                      model="timm:test_resnet")
    record = run.data["environment"]["determinism"]
    assert record["strict"] is True and record["deterministic_algorithms"] is True
    assert record["replaced"] and all("AdaptiveAvgPool2d" in line for line in record["replaced"])
    assert run.load_model("best", "cpu")(torch.zeros(1, 3, 28, 28)).shape == (1, 8)
    plain = train.train(root=small_root, runs_dir=tmp_path, epochs=1, batch_size=16, model="timm:test_resnet")
    assert plain.data["environment"]["determinism"] == {"strict": False, "cudnn_benchmark": False}  # CPU


def test_pretrained_fallback_keeps_the_from_scratch_learning_rate(small_root, tmp_path, offline):
    """Review defect 4: --pretrained whose weights cannot be fetched trains from scratch, so it
    must keep the from-scratch learning rate, not the fine-tuning one."""
    scratch = resolve_config(model="timm:test_resnet", root=small_root)
    run = train.train(root=small_root, runs_dir=tmp_path, epochs=1, batch_size=16, model="timm:test_resnet",
                      pretrained=True)
    assert run.spec["pretrained"] is False and run.config["pretrained"] is True
    assert run.config["lr"] == scratch["lr"] and "pretrained" not in run.config["lr_source"]


def test_loaded_weights_get_the_fine_tuning_rate_and_their_own_statistics(small_root, tmp_path, capsys):
    """Review defects 4 and 5: weights that really load divide the default lr by
    FINE_TUNE_LR_DIVISOR (an explicit --lr is kept), and the inputs are normalised with the
    statistics of the weights (timm ViTs: 0.5/0.5, not ImageNet's)."""
    import timm

    from medcli.config import FINE_TUNE_LR_DIVISOR

    weights = tmp_path / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), weights)
    scratch = resolve_config(model="timm:test_vit", root=small_root)
    run = train.train(root=small_root, runs_dir=tmp_path / "a", epochs=1, batch_size=16, model="timm:test_vit",
                      weights=weights)
    assert run.spec["pretrained"] is True
    assert run.config["lr"] == pytest.approx(scratch["lr"] / FINE_TUNE_LR_DIVISOR)
    assert run.data["preprocess"]["mean"] == [0.5] * 3 and run.data["preprocess"]["std"] == [0.5] * 3
    given = train.train(root=small_root, runs_dir=tmp_path / "b", epochs=1, batch_size=16, model="timm:test_vit",
                        weights=weights, lr=0.01)
    assert given.config["lr"] == 0.01
    # review: a medcli run's checkpoint keeps the statistics that run trained with (its manifest's)
    Run.open(run.run_dir).update(lambda data: data["preprocess"].update(mean=[0.4] * 3, std=[0.2] * 3))
    tuned = train.train(root=small_root, runs_dir=tmp_path / "c", epochs=1, batch_size=16, model="timm:test_vit",
                        weights=run.checkpoint_path("best"))
    assert tuned.data["preprocess"]["mean"] == [0.4] * 3 and tuned.data["preprocess"]["std"] == [0.2] * 3
    (run.run_dir / "manifest.json").write_text("{ damaged")  # its statistics cannot be known: said, not silent
    capsys.readouterr()
    unknown = train.train(root=small_root, runs_dir=tmp_path / "d", epochs=1, batch_size=16, model="timm:test_vit",
                          weights=run.checkpoint_path("best"))
    assert "whose manifest cannot be read" in capsys.readouterr().err
    assert unknown.data["preprocess"]["mean"] == [0.5] * 3


def test_a_split_over_the_device_budget_is_streamed_with_the_same_result(small_root, tmp_path, capsys):
    """Splits above --data-budget stay in host memory and are copied batch by batch; the
    batches, augmentation and result are those of the on-device run (forced on CPU here with
    a zero budget: the gather into alternating buffers and the copy run as on a GPU, only the
    buffers are not page-locked and no CUDA event is recorded)."""
    options = dict(root=small_root, epochs=2, mixup_alpha=0.4, **{**TINY, "batch_size": 8})
    on_device = train.train(runs_dir=tmp_path / "a", **options)
    streamed = train.train(runs_dir=tmp_path / "b", data_budget_gb=0.0, **options)
    assert "exceeds the device-data budget" in capsys.readouterr().err
    assert streamed.config["data_budget_gb"] == 0.0
    assert _weights_equal(on_device.run_dir / "checkpoints/last.pt", streamed.run_dir / "checkpoints/last.pt")
    assert _history(on_device.run_dir)[-1]["val_loss"] == _history(streamed.run_dir)[-1]["val_loss"]


def test_data_mapped_from_the_cache_trains_the_same_model_resident_or_streamed(small_root, tmp_path, monkeypatch,
                                                                              capsys):
    """MEDCLI_DATA_CACHE=always: the splits are mapped from the uncompressed cache (what a large
    split or a distributed job gets by default), on the device or streamed from the mapping,
    and train to the weights the in-memory splits give."""
    import shutil

    root = tmp_path / "data"
    root.mkdir()
    for name in ("bloodmnist.npz", "bloodmnist.json"):
        shutil.copy(small_root / name, root / name)
    options = dict(root=root, epochs=2, mixup_alpha=0.4, **{**TINY, "batch_size": 8})
    monkeypatch.setenv(npzcache.CACHE_ENV, "never")
    in_memory = train.train(runs_dir=tmp_path / "a", **options)
    assert not (root / npzcache.CACHE_DIR).exists()
    monkeypatch.setenv(npzcache.CACHE_ENV, "always")
    capsys.readouterr()
    mapped = train.train(runs_dir=tmp_path / "b", **options)
    assert "train and val splits mapped from" in capsys.readouterr().err
    streamed = train.train(runs_dir=tmp_path / "c", data_budget_gb=0.0, **options)
    assert "kept mapped from the node's page cache" in capsys.readouterr().err
    for run in (mapped, streamed):
        assert _weights_equal(in_memory.run_dir / "checkpoints/last.pt", run.run_dir / "checkpoints/last.pt")
        assert _history(in_memory.run_dir)[-1]["val_loss"] == _history(run.run_dir)[-1]["val_loss"]


def test_streamed_batches_equal_the_on_device_ones_and_survive_later_batches(synthetic_root):
    splits = datasets.load(synthetic_root, "bloodmnist", 28, ("train",))
    assert list(splits.images) == ["train"]  # the splits asked for, nothing else read
    cpu = torch.device("cpu")
    resident = feed.Data.of(datasets.load(synthetic_root, "bloodmnist", 28), "train", cpu, float("inf"))
    streamed = feed.Data.of(splits, "train", cpu, 0)
    assert not resident.streamed and streamed.streamed
    assert "train" not in splits.images  # the tensor replaced the numpy copy: the split is held once
    generator = torch.Generator().manual_seed(0)
    indices = [torch.randperm(len(resident), generator=generator)[:n] for n in (5, 9, 3, 12, 7)]  # buffers regrow
    batches = [streamed.take(i) for i in indices]
    for index, batch in zip(indices, batches):  # earlier batches are not overwritten by later takes
        assert torch.equal(batch, resident.take(index))


def test_an_undefined_val_auc_still_picks_a_best_epoch(tmp_path, capsys):
    """4 validation images for 8 classes: medmnist's AUC is undefined, best.pt follows the
    mean AUC of the classes present instead of never being written."""
    root = tmp_path / "data"
    datasets.make_synthetic(root / "bloodmnist.npz", "bloodmnist", 28, (32, 4, 8), seed=2)
    run = train.train(root=root, runs_dir=tmp_path / "runs", epochs=2, monitor="auc", **{**TINY, "batch_size": 16})
    assert all(row["val_auc"] == "" for row in _history(run.run_dir))  # the official AUC stays undefined
    assert "best.pt follows the mean AUC of the classes present" in capsys.readouterr().err
    summary = run.stages["train"]["summary"]
    assert summary["best_value"] is not None and summary["best_epoch"] in (1, 2)
    assert run.checkpoint_path("best").is_file()
    assert train.compare(None, None, "auc") == train.compare(0.5, None, "auc") == 1
    assert train.compare(None, 0.5, "auc") == -1


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
    assert config["epochs"] == models.record("resnet18").reduced["epochs"] and config["optimizer"] == "sgd"
    vit = resolve_config(model="vit", reduced=True)
    assert vit["variant"] == "vit-tiny" and vit["optimizer"] == "adamw" and vit["model_overrides"]["patch_size"] == 4


def test_densenet121_gets_the_cnn_recipe_and_a_pooled_reduced_preset():
    recipe = ("optimizer", "lr", "lr_source", "weight_decay", "epochs", "batch_size", "warmup_epochs", "label_smoothing",
              "mixup_alpha", "input_size", "channels_last", "model_overrides")
    for reduced in (False, True):
        densenet = resolve_config(model="densenet121", reduced=reduced, device="cpu")
        resnet = resolve_config(model="resnet18", reduced=reduced, device="cpu")
        assert {k: densenet[k] for k in recipe} == {k: resnet[k] for k in recipe}
    assert densenet["model_overrides"] == {"keep_maxpool": True} and densenet["variant"] == "densenet121"


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
    (["--dataset", "chestmnist"], "no chestmnist at 28 px"),
    (["--epochs", "0"], "--epochs"),
    (["--monitor", "speed"], "--monitor"),
    (["--amp", "fp16", "--device", "cpu"], "fp16 needs a CUDA GPU"),
    (["--weights", "{garbage}"], "damaged or not a PyTorch weights file"),
    (["--weights", "{foreign}"], "does not fit model"),
    (["--root", "{empty}"], "no bloodmnist at 28 px"),
    # review: a file given as --root got a download hint with --root FILE; a folder as --weights "does not exist"
    (["--root", "{garbage}"], "--root {garbage} is a file; pass the folder that holds it (--root {folder})"),
    (["--weights", "{empty}"], "weights file {empty} is a folder; pass the path of a .pt/.pth state dict"),
])
def test_bad_options_exit_2_with_one_line_and_no_run_dir(small_root, tmp_path, args, message):
    garbage, foreign = _bad_weights(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.format(garbage=garbage, foreign=foreign, empty=empty) for a in args]
    message = message.format(garbage=garbage, empty=empty, folder=tmp_path)
    root = [] if "--root" in args else ["--root", str(small_root)]
    runs = tmp_path / "runs"
    model = [] if "--model" in args else ["--model", "timm:test_resnet"]
    result = runner.invoke(app, ["train", *root, "--runs-dir", str(runs), *model, *args])
    one_line_error(result, 2, message)
    assert not runs.exists() or not any(runs.iterdir())


def test_a_capped_batch_and_warm_up_are_recorded_as_used_with_one_warning_each(small_root, tmp_path):
    """Review defect 4: --batch-size over the training split and a warm-up over WARMUP_MAX_SHARE
    of the run were capped silently, and the manifest recorded the values asked for."""
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["train", "--root", str(small_root), "--runs-dir", str(runs), "--model",
                                 "timm:test_resnet", "--epochs", "1", "--batch-size", "5000", "--warmup-epochs", "50"])
    assert result.exit_code == 0, result.output
    config = Run.open(next(runs.iterdir())).config
    assert (config["batch_size"], config["warmup_epochs"]) == (16, pytest.approx(0.2))
    assert config["batch_source"] == "--batch-size 5000 -> 16, capped to the 16 training images"
    assert config["warmup_source"] == "--warmup-epochs 50 -> 0.2, capped to 20% of the 1-epoch run"
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:") and "capped to" in line]
    assert [w.split(" -> ")[0] for w in warnings] == ["warning: --batch-size 5000", "warning: --warmup-epochs 50"]
    assert resolve_config(device="cpu", model="vit")["warmup_source"] == "vit default"


def test_warm_up_is_capped_so_that_even_one_epoch_decays():
    """Issue 12: one epoch with a one-epoch warm-up ended at the peak learning rate."""
    config = {"epochs": 1, "warmup_epochs": 1.0}
    warmup = optim.warmup_steps(config, 100)
    assert warmup == 20
    factors = [optim.lr_factor(step, 100, warmup) for step in range(100)]
    assert max(factors) == 1.0 and factors[-1] < 0.01
    assert optim.warmup_steps({"epochs": 60, "warmup_epochs": 1.0}, 100) == 100  # long runs keep theirs
    # review: the config records the capped warm-up (0.4 of 2 epochs); its steps are that, rounded
    for epochs, steps in ((2, 64), (1, 4), (3, 7)):
        capped = fit_warmup_to_epochs({"epochs": epochs, "warmup_epochs": 5.0, "warmup_source": "x"})
        assert optim.warmup_steps(capped, steps) == round(capped["warmup_epochs"] * steps), (epochs, steps)


def test_checkpoints_hold_batchnorm_statistics_of_their_own_weights(synthetic_root, tmp_path):
    """Before each validation the BatchNorm running statistics are re-estimated from the
    current weights (torch's update_bn over training images), so best.pt does not carry
    averages that lag the weights."""
    from torch.optim.swa_utils import update_bn

    from medcli import augment

    run = train.train(root=synthetic_root, runs_dir=tmp_path, model="timm:test_resnet", epochs=1, batch_size=32,
                      lr=0.05, seed=0)
    model = run.load_model("best", "cpu")
    stored = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    splits = datasets.load(synthetic_root, "bloodmnist", 28)
    images = datasets.as_tensor(splits.images["train"])
    index = torch.linspace(0, len(images) - 1, train.bn_images(len(images))).round().long()
    x = augment.preprocess(images[index], run.data["preprocess"])
    update_bn(torch.tensor_split(x, -(-len(x) // train.EVAL_BATCH)), model)
    assert stored and all(torch.allclose(stored[k], v, atol=1e-5) for k, v in model.state_dict().items() if k in stored)
    drifted = models.rebuild(run.spec)
    assert not all(torch.allclose(stored[k], v) for k, v in drifted.state_dict().items() if k in stored)


def test_batchnorm_reestimation_weighs_every_image_alike():
    """update_bn averages batch statistics with equal weight per batch: 600 images as 512 + 88
    gave the last 88 images almost six times the weight of the others. Equal batches give
    the first BatchNorm the exact mean of its input over the images used."""
    from medcli import augment

    n = 4800  # bn_images: 600 images, more than one EVAL_BATCH
    images = torch.linspace(0, 255, n).round().to(torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    data = feed.Data(images, torch.zeros(n, dtype=torch.long), torch.device("cpu"))
    prep = augment.make_prep(4, 1)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(1))
    train.reestimate_batchnorm(model, data, prep, {"channels_last": False, "amp": "off"}, "cpu")
    index = torch.linspace(0, n - 1, train.bn_images(n)).round().long()
    exact = augment.preprocess(images[index], prep).mean()
    assert train.bn_images(n) > train.EVAL_BATCH
    assert model[0].running_mean.item() == pytest.approx(exact.item(), abs=1e-5)


@pytest.mark.realdata
def test_one_epoch_on_real_data_does_not_collapse(shared_data, tmp_path, make_subset):
    """Issue 12: `--epochs 1` reached 68 % train but 26 % test accuracy (the schedule ended at
    its peak and BatchNorm's averages lagged). On 3,000 real PBC images, with the full default
    recipe's learning rate, batch and warm-up given explicitly (the reduced preset's own are
    gentler; it is used for its cheaper pooled stem), test accuracy after the epoch must be at
    least the accuracy measured during it minus 5 points (before the fix: 36.9 % during, 13.8 %
    after on validation)."""
    from medcli import evaluate

    root = tmp_path / "data"
    root.mkdir()
    make_subset(shared_data / "bloodmnist_pbc_28.npz", root / datasets.filename("bloodmnist", 28), "bloodmnist",
                (3000, 300, 600), seed=0)
    run = train.train(root=root, runs_dir=tmp_path / "runs", model="resnet18", reduced=True, epochs=1, batch_size=128,
                      lr=0.1, warmup_epochs=1.0, seed=0)
    train_acc = float(list(csv.DictReader(run.path("history.csv").open()))[-1]["train_acc"])
    test = evaluate.evaluate_run(run.run_dir)["splits"]["test"]["metrics"]
    test_acc = test["accuracy"]
    assert test_acc >= train_acc - 0.05, (train_acc, test_acc)
    # review: relative alone, a model that learned nothing passed. Measured 28.2 % during the
    # epoch and 37.3 % on test; one class predicted for all is at most 21 % of this test split
    assert test_acc >= 0.30, test_acc
    assert sum(any(row[k] for row in test["confusion_matrix"]) for k in range(8)) >= 4  # classes ever predicted


@pytest.mark.parametrize("n_train,batch,lr", [(546, 16, 0.0125), (1080, 32, 0.025), (11959, 128, 0.1), (100, 16, 0.0125)])
def test_small_training_sets_get_a_smaller_default_batch_and_lr(n_train, batch, lr):
    from medcli.config import fit_batch_to_data

    config = resolve_config(device="cpu")
    fitted = fit_batch_to_data(config, n_train)
    assert (fitted["batch_size"], fitted["lr"]) == (batch, pytest.approx(lr))
    assert fitted["batch_source"].startswith("cnn default") and (batch == 128) == (fitted is config)
    given = resolve_config(device="cpu", batch_size=128, lr=0.3)
    assert fit_batch_to_data(given, 546) is given  # what the user chose stays
    only_batch = fit_batch_to_data(resolve_config(device="cpu", lr=0.3), 546)
    assert (only_batch["batch_size"], only_batch["lr"]) == (16, 0.3)
    three = fit_batch_to_data(config, n_train, processes=3)  # a default splits over the processes
    assert three["batch_size"] % 3 == 0 and batch - 2 <= three["batch_size"] <= batch
    assert three["lr"] == pytest.approx(lr * three["batch_size"] / batch)


def test_a_given_batch_without_lr_keeps_the_default_lr_and_says_so_in_one_line(capsys):
    """--batch-size 512 alone trains with the lr chosen for batch 128 (the config stays what was
    asked for), and one warning names that and the linearly scaled rate."""
    from medcli.config import fit_batch_to_data

    config = resolve_config(device="cpu", batch_size=512)
    assert fit_batch_to_data(config, 11959) is config and config["lr"] == 0.1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--batch-size 512 without --lr keeps lr 0.1" in lines[0], lines
    assert "chosen for batch 128" in lines[0] and "scale it to 0.4" in lines[0]
    for asked in (dict(batch_size=512, lr=0.1), dict(batch_size=128), dict(model="vit", batch_size=128),
                  dict(reduced=True, batch_size=64)):
        fit_batch_to_data(resolve_config(device="cpu", **asked), 11959)
    assert capsys.readouterr().err == ""
    fit_batch_to_data(resolve_config(device="cpu", reduced=True, batch_size=128), 11959)
    assert "chosen for batch 64" in capsys.readouterr().err  # the --reduced preset's batch


@pytest.mark.parametrize("n_train,model,epochs", [(11959, "resnet18", 3), (2000, "resnet18", 9), (2000, "vit", 12),
                                                 (11959, "vit", 8), (100000, "resnet18", 3)])
def test_reduced_keeps_its_steps_on_a_small_training_set(n_train, model, epochs):
    """--reduced was measured on BloodMNIST's 11,959 training images; on a 2,000-image set its 3
    CNN epochs made a third of the optimizer steps (87 % test on the embedded sample). It keeps
    at least its steps by training more epochs; a given --epochs is kept."""
    from medcli.config import fit_batch_to_data, fit_epochs_to_data

    config = resolve_config(device="cpu", model=model, reduced=True)
    fitted = fit_epochs_to_data(fit_batch_to_data(config, n_train), n_train)
    assert fitted["epochs"] == epochs
    assert fitted["epochs"] * (n_train // fitted["batch_size"]) >= config["min_steps"]
    assert ("->" in fitted["epochs_source"]) == (epochs != config["epochs"])
    given = resolve_config(device="cpu", model=model, reduced=True, epochs=2)
    assert fit_epochs_to_data(given, n_train)["epochs"] == 2 and given["min_steps"] is None
    assert resolve_config(device="cpu", model=model)["min_steps"] is None  # the full recipe is untouched


# -- the best-checkpoint rule (medcli.selection) ------------------------------------------------------

# A validation AUC curve with one lucky early epoch (epoch 2), then a higher plateau on average.
SPIKE = [0.80, 0.93, 0.80, 0.85, 0.86, 0.87, 0.87, 0.86]


def _replay(values: list, select: dict) -> dict:
    """The training loop's selection over a validation curve: best epoch and value."""
    best = {"epoch": None, "value": None}
    for epoch in range(1, len(values) + 1):
        value = selection.smoothed(values[:epoch], select["window"], len(values))
        if selection.compare(value, best["value"], select["monitor"]) >= 0:
            best = {"epoch": epoch, "value": value}
    return best


def test_one_lucky_epoch_does_not_win_the_window_rule_but_does_win_epoch_by_epoch():
    small = selection.choose(resolve_config(device="cpu"), n_val=78, total_steps=2040)["select"]
    assert small["rule"] == "ema-window" and small["window"] == 3 and small["monitor"] == "auc"
    assert _replay(SPIKE, small) == {"epoch": 8, "value": pytest.approx((0.87 + 0.87 + 0.86) / 3)}  # tie: the later
    assert _replay(SPIKE, selection.given("auc")) == {"epoch": 2, "value": 0.93}  # the old rule takes the spike
    # One image of 78 in accuracy: 71/78 at epoch 6 between 69/78s, then a plateau at 70/78.
    accs = [n / 78 for n in (60, 66, 68, 69, 69, 71, 69, 70, 70, 70, 70, 70)]
    assert _replay(accs, {**small, "monitor": "acc"})["epoch"] == 12
    assert _replay(accs, selection.given("acc"))["epoch"] == 6
    # before the first complete window best.pt follows the latest epoch; a short run uses all its epochs
    assert selection.smoothed([0.9], 3, 60) is None and selection.smoothed([0.9, 0.7], 3, 2) == pytest.approx(0.8)
    assert selection.smoothed([0.9, None, 0.8, 0.7], 3, 60) is None and selection.compare(None, 0.5, "auc") == -1


def test_the_rule_is_chosen_by_the_validation_size_and_an_explicit_monitor_keeps_the_old_one():
    config = resolve_config(device="cpu")
    assert config["select"] is None and config["monitor"] == "acc"  # decided once the data is loaded
    small = selection.choose(config, n_val=120, total_steps=1000)
    assert small["select"]["monitor"] == "auc" and small["select"]["weights"] == "ema" and small["monitor"] == "acc"
    assert small["select"]["ema_decay"] == pytest.approx(1 - 1 / 50) and "120 validation images" in small["select"]["why"]
    large = selection.choose(config, n_val=1712, total_steps=5000)["select"]
    assert (large["rule"], large["monitor"], large["window"], large["weights"]) == ("epoch", "acc", 1, "model")
    given = resolve_config(device="cpu", monitor="acc")
    assert selection.choose(given, n_val=78, total_steps=2040) is given
    assert given["select"] == {"rule": "epoch", "monitor": "acc", "window": 1, "weights": "model", "why": "--monitor given"}
    assert selection.ema_decay(20) == 0.0 and selection.ema_decay(2000) == pytest.approx(0.99)
    assert selection.rule({"monitor": "loss"})["rule"] == "epoch"  # a run from before the rules


def _scripted(monkeypatch, aucs: list) -> list:
    """Replace validation by a scripted AUC curve (accuracy fixed); returns the models it was asked about."""
    values, asked = iter(aucs), []

    def fake_evaluate(model, *args, **kwargs):
        asked.append(model)
        auc = next(values)
        return {"accuracy": 0.5, "loss": 1 - auc, "auc": auc, "f1_macro": 0.5}

    monkeypatch.setattr(train, "evaluate", fake_evaluate)
    return asked


def test_a_tiny_validation_split_picks_the_best_window_of_ema_weights(small_root, tmp_path, monkeypatch):
    """8 validation images: best.pt holds the EMA weights at the end of the best 3-epoch window,
    not the lucky epoch 2; the manifest records the rule and the summary where best.pt came from."""
    asked = _scripted(monkeypatch, SPIKE)
    run = train.train(root=small_root, runs_dir=tmp_path, epochs=len(SPIKE), **{**TINY, "batch_size": 16})
    summary = run.stages["train"]["summary"]
    assert run.config["select"]["rule"] == "ema-window" and summary["monitor"] == "auc"
    assert summary["best_epoch"] == 8 and summary["best_window"] == [6, 8] and summary["best_weights"] == "ema"
    assert summary["best_value"] == pytest.approx((0.87 + 0.87 + 0.86) / 3)
    best, last = _load(run.checkpoint_path("best")), _load(run.checkpoint_path("last"))
    assert best["epoch"] == 8 and all(torch.equal(best["model"][k], last["ema"][k]) for k in best["model"])
    assert len({id(model) for model in asked}) == 1 and last["scores"] == SPIKE


def test_an_explicit_monitor_selects_epoch_by_epoch_as_before(small_root, tmp_path, monkeypatch):
    asked = _scripted(monkeypatch, SPIKE)
    run = train.train(root=small_root, runs_dir=tmp_path, epochs=len(SPIKE), monitor="auc", **{**TINY, "batch_size": 16})
    summary = run.stages["train"]["summary"]
    assert run.config["select"]["rule"] == "epoch" and summary["best_weights"] == "model"
    assert summary["best_epoch"] == 2 and summary["best_value"] == 0.93 and summary["best_window"] == [2, 2]
    assert _load(run.checkpoint_path("best"))["epoch"] == 2 and _load(run.checkpoint_path("last"))["ema"] is None
    assert len(asked) == len(SPIKE)


def test_the_ema_averages_the_parameters_and_gets_its_own_batchnorm_statistics(synthetic_root, tmp_path):
    """The EMA differs from the weights it averages, and its BatchNorm statistics are those of its
    own weights on the training images (re-estimated), not copies of the model's."""
    from torch.optim.swa_utils import update_bn

    from medcli import augment

    run = train.train(root=synthetic_root, runs_dir=tmp_path, epochs=3, lr=0.05, **{**TINY, "batch_size": 16})
    last = _load(run.checkpoint_path("last"))
    assert 0 < run.config["select"]["ema_decay"] < 1
    params = [k for k, v in last["model"].items() if v.is_floating_point() and "running" not in k]
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in params)
    images = datasets.as_tensor(datasets.load(synthetic_root, "bloodmnist", 28).images["train"])
    index = torch.linspace(0, len(images) - 1, train.bn_images(len(images))).round().long()
    batch = augment.preprocess(images[index], run.data["preprocess"])
    ema = run.load_model("best", "cpu")
    stored = {k: v.clone() for k, v in ema.state_dict().items() if "running" in k}
    update_bn([batch], ema)
    # the same statistics up to float32 rounding (training sums them in batches of EVAL_BATCH)
    assert stored and all(torch.allclose(stored[k], v, rtol=1e-4, atol=1e-5) for k, v in ema.state_dict().items()
                          if k in stored)
    assert not all(torch.allclose(stored[k], last["model"][k]) for k in stored)
    trained = run.load_model("last", "cpu")  # last.pt's own statistics are re-estimated at the end too
    update_bn([batch], trained)
    assert all(torch.allclose(last["model"][k], v, atol=1e-5) for k, v in trained.state_dict().items() if k in stored)


def test_the_ema_rule_re_estimates_the_trained_weights_batchnorm_only_for_the_final_last_pt(synthetic_root, tmp_path,
                                                                                           monkeypatch):
    """Under the EMA rule an epoch re-estimates BatchNorm once, for the EMA it validates; the
    trained weights' statistics are re-estimated once, after the last epoch (a second pass
    every epoch was ~13 % of a 546-image run)."""
    passes, reestimate = [], train.reestimate_batchnorm

    def counted(model, *args):
        passes.append(model)
        reestimate(model, *args)

    monkeypatch.setattr(train, "reestimate_batchnorm", counted)
    run = train.train(root=synthetic_root, runs_dir=tmp_path, epochs=3, **TINY)
    assert run.config["select"]["rule"] == "ema-window"
    assert len(passes) == 4 and len({id(m) for m in passes[:3]}) == 1 and passes[3] is not passes[0]


def test_ordinal_label_smoothing_goes_to_the_neighbouring_grades():
    """RetinaMNIST's grades: the smoothed share of grade 2 goes to grades 1 and 3, none to 0 or 4;
    without smoothing the loss is plain cross-entropy."""
    import torch.nn.functional as F

    task = datasets.task("retinamnist")
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    targets = task.targets(torch.tensor([0, 2, 4, 2]))
    near = torch.tensor([[0.9, 0.1, 0, 0, 0], [0, 0.05, 0.9, 0.05, 0], [0, 0, 0, 0.1, 0.9], [0, 0.05, 0.9, 0.05, 0]])
    assert task.loss(logits, targets, 0.1).item() == pytest.approx(F.cross_entropy(logits, near).item(), rel=1e-6)
    assert task.loss(logits, targets, 0.0).item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    blood = datasets.task("bloodmnist")  # other tasks keep uniform smoothing
    assert blood.loss(logits, targets, 0.1).item() == pytest.approx(
        F.cross_entropy(logits, targets, label_smoothing=0.1).item(), rel=1e-6)


# -- review: resume after a kill or an interruption at the very end -----------------------------


def test_a_run_stopped_in_its_first_epoch_resumes_from_the_weights_it_started_from(small_root, tmp_path, monkeypatch):
    """Review: a run stopped before its first checkpoint was built again from the options, not
    from what it recorded: a --weights file replaced in between (or ImageNet weights out of reach
    offline, or within reach for a run that trained from scratch) changed what the run trained.
    It starts from the recorded weights, refused when they changed; each resume is recorded."""
    import timm

    weights = tmp_path / "start.pth"
    torch.save(timm.create_model("test_vit", num_classes=8).state_dict(), weights)
    options = dict(root=small_root, epochs=1, batch_size=16, model="timm:test_vit", seed=0, weights=weights)
    straight = train.train(runs_dir=tmp_path / "a", **options)
    real_epoch = train.train_one_epoch

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train_one_epoch", stop)
    with pytest.raises(KeyboardInterrupt):
        train.train(runs_dir=tmp_path / "b", **options)
    monkeypatch.setattr(train, "train_one_epoch", real_epoch)
    (run,) = (tmp_path / "b").iterdir()
    assert not (run / "checkpoints" / "last.pt").exists()
    original = weights.read_bytes()
    torch.save(timm.create_model("test_vit", num_classes=8).state_dict(), weights)  # other random weights
    with pytest.raises(UsageError, match="started from the weights file .* which has changed since"):
        train.resume(run)
    weights.write_bytes(original)
    resumed = train.resume(run)
    assert _weights_equal(straight.run_dir / "checkpoints/last.pt", run / "checkpoints/last.pt")
    assert resumed.data["environment"]["resumes"] == [{"after_epoch": 0, "device": "cpu", "amp": resumed.config["amp"],
                                                       "world_size": 1}]


def test_the_library_refuses_a_seed_beyond_the_clis_range():
    """Self-review: --seed's bound was Typer's alone; `train.train(seed=2**64 - 1)` still
    overflowed in torch.Generator().manual_seed(seed + 1), after the run was made."""
    with pytest.raises(UsageError, match=r"--seed must be 0 to 4294967295 \(got 18446744073709551615\)"):
        resolve_config(device="cpu", seed=2**64 - 1)


def test_the_random_streams_of_a_run_and_of_other_seeds_never_coincide(small_root, tmp_path, monkeypatch):
    """Review: the data order was seeded with the run's seed, as the model's initialisation (the
    global stream: the same numbers), and the augmentation with seed + 1, the next seed's data
    order and initialisation: seeds 0, 1, 2, repeats `aggregate` treats as independent, shared
    their streams. Every (seed, purpose) now draws its own."""
    draws = {}
    for seed in range(4):
        torch.manual_seed(seed)
        draws[seed, "model"] = torch.rand(8)
        for purpose, generator in train.generators(seed).items():
            draws[seed, purpose] = torch.rand(8, generator=generator)
    again = {purpose: torch.rand(8, generator=generator) for purpose, generator in train.generators(3).items()}
    assert all(torch.equal(again[purpose], draws[3, purpose]) for purpose in again)  # a seed's streams are its own
    streams = list(draws.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(streams) for b in streams[i + 1:]), sorted(draws)
    made, real = [], train.generators  # and training draws from them
    monkeypatch.setattr(train, "generators", lambda seed: (made.append(seed), real(seed))[1])
    train.train(root=small_root, runs_dir=tmp_path, epochs=1, **{**TINY, "batch_size": 16, "seed": 7})
    assert made == [7]


def test_a_run_stopped_before_its_train_stage_was_recorded_resumes_from_the_start(small_root, tmp_path):
    """Review: a stop between the run's creation and its train stage's first record left a run
    whose `train --resume` ended in "unexpected KeyError: 'train'"."""
    options = dict(root=small_root, epochs=1, batch_size=16, model="timm:test_resnet", seed=0)
    straight = train.train(runs_dir=tmp_path / "a", **options)
    run = shutil.copytree(straight.run_dir, tmp_path / "b" / straight.run_dir.name)
    shutil.rmtree(run / "checkpoints")
    Run.open(run).update(lambda data: data["stages"].clear())
    resumed = train.resume(run)
    assert resumed.status("train") == "completed"
    assert _weights_equal(straight.run_dir / "checkpoints/last.pt", run / "checkpoints/last.pt")


def test_a_kill_while_the_first_last_pt_is_written_restarts_the_run(small_root, tmp_path, monkeypatch, capsys):
    """Review: best.pt is written before last.pt; a kill between them in epoch 1 (or later,
    while epoch 1's last.pt was still being written and later epochs skipped theirs) left a
    run that resume refused ("restore the file"), though there is no file to restore. It
    starts again from epoch 1, says so once the stage is locked, and ends as an uninterrupted
    run does; a last.pt that was recorded and then lost is still refused."""
    options = dict(root=small_root, epochs=2, **{**TINY, "batch_size": 16})
    straight = train.train(runs_dir=tmp_path / "a", **options)
    run = _interrupted_run(tmp_path / "b", monkeypatch, **options)
    (run / "checkpoints" / "last.pt").unlink()  # killed while writing the first last.pt: never recorded

    def never_recorded(data):
        data["stages"]["train"]["artefacts"].pop("checkpoints/last.pt")
        data["stages"]["train"]["summary"].update(epochs_run=2, last_skipped=1)

    Run.open(run).update(never_recorded)
    capsys.readouterr()
    with pytest.raises(UsageError):  # refused (no data here): it says nothing about starting again
        train.resume(run, root=tmp_path / "nodata")
    assert "starts again" not in capsys.readouterr().err
    resumed = train.resume(run)
    assert capsys.readouterr().err.count("starts again from epoch 1") == 1
    assert resumed.stages["train"]["status"] == "completed"
    assert _weights_equal(straight.run_dir / "checkpoints/last.pt", run / "checkpoints/last.pt")
    assert _history(run) == [{**row, "seconds": mine["seconds"]} for row, mine in zip(_history(straight.run_dir), _history(run))]
    Run.open(run).update(lambda data: data["stages"]["train"].update(status="interrupted"))
    (run / "checkpoints" / "last.pt").unlink()  # recorded, then lost: there was one to restore
    with pytest.raises(UsageError, match="no checkpoints/last.pt to resume from"):
        train.resume(run)
    # review: with best.pt lost too, it started again from epoch 1 and rewrote the history unsaid
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(UsageError, match="no checkpoints/last.pt to resume from"):
        train.resume(run)
    assert "resuming" not in capsys.readouterr().err  # review: said before a refusal


@pytest.mark.parametrize("aucs, patience, epochs_run", [([0.80, 0.90, 0.85, 0.84, 0.83], 1, 3), ([0.80, 0.90], None, 2)])
def test_an_interruption_after_the_last_epochs_checkpoint_resumes_to_the_same_end(small_root, tmp_path, monkeypatch,
                                                                                 aucs, patience, epochs_run):
    """Review: Ctrl-C after the final (or early-stopping) epoch's last.pt was queued, before
    its summary: resume forgot the early stop and trained on, or completed with the summary
    of the epoch before. It ends where the uninterrupted run ended, with its summary."""
    from medcli import reports

    options = dict(root=small_root, epochs=len(aucs), monitor="auc", patience=patience, **{**TINY, "batch_size": 16})
    _scripted(monkeypatch, aucs)
    straight = train.train(runs_dir=tmp_path / "a", **options)
    assert straight.stages["train"]["summary"]["epochs_run"] == epochs_run
    real_curves = reports.save_curves

    def interrupt_at_the_end(path, history, *args, **kwargs):
        if len(history) == epochs_run:
            raise KeyboardInterrupt
        return real_curves(path, history, *args, **kwargs)

    _scripted(monkeypatch, aucs)
    monkeypatch.setattr(reports, "save_curves", interrupt_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        train.train(runs_dir=tmp_path / "b", **options)
    monkeypatch.setattr(reports, "save_curves", real_curves)
    (run,) = (tmp_path / "b").iterdir()
    resumed = train.resume(run)
    keys = ("epochs_run", "stopped_early", "best_epoch", "best_value", "monitor")
    assert {k: resumed.stages["train"]["summary"][k] for k in keys} == \
           {k: straight.stages["train"]["summary"][k] for k in keys}
    assert _load(run / "checkpoints/last.pt")["epoch"] == epochs_run and len(_history(run)) == epochs_run
    assert _weights_equal(straight.run_dir / "checkpoints/last.pt", run / "checkpoints/last.pt")
    assert resumed.stages["train"]["artefacts"]["figures/curves.png"] == fileio.sha256_file(run / "figures/curves.png")


def test_a_resume_refuses_another_runs_last_pt_but_takes_a_copy_of_its_own(small_root, tmp_path, monkeypatch, capsys):
    """Review: another run's last.pt copied into an interrupted run was resumed from: the run
    ended "completed" with the other run's epochs in its history and best.pt, and every hash
    check after it passed. last.pt names its run by the manifest's random uid (two runs
    started in the same second share run id and creation time); one from before that whose
    sha256 is not the recorded one is said."""
    import shutil

    options = dict(root=small_root, epochs=2, **{**TINY, "batch_size": 16})
    run = _interrupted_run(tmp_path / "runs", monkeypatch, **options)
    other = _interrupted_run(tmp_path / "others", monkeypatch, **{**options, "seed": 1})
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    legacy = Path(shutil.copytree(run, tmp_path / "legacy"))
    own = (run / "checkpoints/last.pt").read_bytes()
    shutil.copyfile(other / "checkpoints/last.pt", run / "checkpoints/last.pt")
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(UsageError, match=r"checkpoints/last.pt of run .* was written by another run \("):
        train.resume(run)
    assert (run / "manifest.json").read_bytes() == before
    twin = json.loads((other / "manifest.json").read_text())  # review: started in the same second as this run
    twin.update(run_id=Run.open(run).run_id, created=Run.open(run).data["created"])
    (other / "manifest.json").write_text(json.dumps(twin))
    older = _load(other / "checkpoints/last.pt")
    older["owner"] = {**older["owner"], "run_id": twin["run_id"]}
    torch.save(older, run / "checkpoints/last.pt")
    with pytest.raises(UsageError, match="was written by another run"):
        train.resume(run)
    del older["owner"]  # as an older medcli wrote it, naming no run: its sha256 is not the recorded one, said
    torch.save(older, legacy / "checkpoints/last.pt")
    capsys.readouterr()
    train.resume(legacy)  # and resumed from (a last.pt written after the manifest was saved is one too)
    assert "is not the one its manifest recorded" in capsys.readouterr().err
    (run / "checkpoints/last.pt").write_bytes(own)
    assert train.resume(run).stages["train"]["status"] == "completed"
    assert train.resume(copy).stages["train"]["status"] == "completed"  # a copy of the folder is the same run


def test_a_refused_resume_leaves_the_manifest_as_it_was(small_root, tmp_path, monkeypatch):
    """Review: --collective-timeout (and a new device) were written into the manifest before
    the data was found and the stage lock taken: a refused resume changed the run anyway."""
    run = _interrupted_run(tmp_path / "runs", monkeypatch, root=small_root, epochs=2, **{**TINY, "batch_size": 16})
    before = (run / "manifest.json").read_bytes()
    with pytest.raises(UsageError):
        train.resume(run, collective_timeout=50.0, root=tmp_path / "nodata")
    assert (run / "manifest.json").read_bytes() == before
    resumed = train.resume(run, collective_timeout=50.0)
    assert resumed.config["collective_timeout"] == 50.0 and Run.open(run).config["collective_timeout"] == 50.0


def test_resume_with_nproc_checks_the_runs_batch_before_launching(small_root, tmp_path, monkeypatch):
    run = _interrupted_run(tmp_path / "runs", monkeypatch, root=small_root, epochs=2,
                           **{**TINY, "batch_size": 15})
    launched = []
    monkeypatch.setattr("medcli.distributed.launch", lambda *args, **kwargs: launched.append(args) or 0)
    line = one_line_error(runner.invoke(app, ["train", "--resume", str(run), "--nproc", "2"]), 2,
                          "batch of 15", "--nproc")
    assert "--batch-size" not in line and launched == []


def test_the_epoch_line_shows_the_learning_rate_history_records(small_root, tmp_path, capsys):
    """Review: the console showed the next step's learning rate (0 after the last epoch) and
    history.csv the epoch's last step's."""
    run = train.train(root=small_root, runs_dir=tmp_path, epochs=2, **{**TINY, "batch_size": 16})
    shown = [line.split(" lr ")[1].split()[0] for line in capsys.readouterr().err.splitlines() if line.startswith("epoch ")]
    assert shown == [f"{float(row['lr']):.2e}" for row in _history(run.run_dir)]


def test_options_that_choose_the_starting_weights_twice_or_impossibly_are_refused():
    """Review: --pretrained beside --weights was ignored while the manifest recorded both; and
    --reduced turns vit into a 6-block, 128-wide ViT that no ImageNet weights fit, so
    --pretrained could only fail ("could not fetch ... training from scratch")."""
    with pytest.raises(UsageError, match="--pretrained and --weights"):
        resolve_config(model="resnet18", pretrained=True, weights="w.pt", device="cpu")
    for model in ("vit", "vit-tiny"):
        with pytest.raises(UsageError, match="no pretrained weights fit"):
            resolve_config(model=model, reduced=True, pretrained=True, device="cpu")
    assert resolve_config(model="vit", pretrained=True, device="cpu")["pretrained"] is True


def test_a_run_shorter_than_the_window_says_it_averaged_all_its_epochs():
    """Review: a 2-epoch run's curves title (and model card) said "mean of 3 epochs" while the
    manifest's best_window was [1, 2]."""
    from medcli import selection

    select = {"monitor": "auc", "weights": "ema", "rule": "ema-window", "window": 3, "why": "78 val images"}
    assert selection.describe(select, 2, short=True) == "auc (EMA, mean of 2 epochs)"
    assert "end of the 2 epochs" in selection.describe(select, 2) and "end of the 3 epochs" in selection.describe(select, 9)
    assert selection.best_record({"epoch": 2, "value": 0.9}, select, 2)["best_window"] == [1, 2]


def test_sync_bn_in_one_process_is_refused_not_recorded():
    """Review: `--sync-bn` without --nproc (CUDA, a CNN) trained exactly as without it, but the
    manifest said sync_bn: true, which split the runs into two setups in aggregate."""
    from medcli import distributed

    with pytest.raises(UsageError, match="with one process it does nothing"):
        train.check_sync_bn({"sync_bn": True}, distributed.Context())
    train.check_sync_bn({"sync_bn": True}, distributed.Context(rank=0, world_size=2, local_rank=0))
    train.check_sync_bn({"sync_bn": False}, distributed.Context())


def test_a_stop_while_the_curves_are_drawn_keeps_the_epochs_summary(small_root, tmp_path, monkeypatch):
    """Review: history.csv was written, then the curves drawn (the first draw imports matplotlib:
    a second or more), and only then the summary and artefacts recorded; a Ctrl-C in between
    left an interrupted stage with an empty summary beside a history of that epoch."""
    from medcli import reports

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(reports, "save_curves", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.train(root=small_root, runs_dir=tmp_path, epochs=2, **{**TINY, "batch_size": 16})
    (run,) = tmp_path.iterdir()
    stage = Run.open(run).stages["train"]
    assert stage["status"] == "interrupted" and stage["summary"]["epochs_run"] == 1
    assert "history.csv" in stage["artefacts"] and len(_history(run)) == 1
