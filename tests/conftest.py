"""Shared fixtures: tiny synthetic datasets (official npz layout) and the real-data path."""

from __future__ import annotations

from pathlib import Path

import pytest

from medcli import console, datasets

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(autouse=True)
def _reset_console():
    console.configure(quiet=False, verbose=False)
    yield
    console.configure(quiet=False, verbose=False)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A data root holding a small synthetic BloodMNIST (28 px, 8 classes, RGB)."""
    root = tmp_path_factory.mktemp("data")
    datasets.make_synthetic(root / datasets.filename("bloodmnist", 28), "bloodmnist", 28, (256, 64, 64), seed=0)
    return root


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data with the real PBC-derived BloodMNIST files; skips when absent."""
    if not (SHARED_DATA / "bloodmnist_pbc_28.npz").is_file():
        pytest.skip("../shared/data is not present (real-data tests run only beside it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def make_subset():
    """scripts/subsets.py's `make_subset` (benchmark sets cut from real data; not part of medcli)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("subsets", SCRIPTS / "subsets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_subset


@pytest.fixture(scope="session")
def tiny_run(synthetic_root, tmp_path_factory) -> Path:
    """A completed training run that has really learned (timm:test_resnet, 3 epochs of 16
    steps on `synthetic_root`: about 0.9 val accuracy in eval mode, BatchNorm's running
    statistics caught up; a few seconds). Session-scoped and shared by the evaluate/explain tests: treat it as read-only (copy it
    with shutil.copytree before adding stages to it).
    """
    from medcli import train

    manifest = train.train(root=synthetic_root, runs_dir=tmp_path_factory.mktemp("runs"), model="timm:test_resnet",
                           epochs=3, batch_size=16, optimizer="adamw", lr=2e-3, warmup_epochs=0.0, seed=0)
    return manifest.run_dir


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches, so no real download can be attempted or succeed."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
