"""scripts/run_all.sh, the README's main job: every stage chained through the manifests, only
the comparison folder on stdout, and a stop at the first failing stage with its exit code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medcli import datasets

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "run_all.sh"
MEDCLI = Path(sys.executable).parent / "medcli"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or not MEDCLI.exists(),
                                reason="needs bash and the medcli console script beside this Python")


def _run_all(tmp_path: Path, *extra: str, data: tuple[str, ...] = ("--synthetic",)) -> subprocess.CompletedProcess:
    env = {**os.environ, "MEDCLI": str(MEDCLI)}
    args = ["bash", str(SCRIPT), "--reduced", *data, "--root", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs"),
            "--out", str(tmp_path / "comparison"), "--", "--batch-size", "16", *extra]
    return subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_run_all_chains_every_stage_and_prints_only_the_comparison(tmp_path):
    small = datasets.make_synthetic(tmp_path / "small.npz", "bloodmnist", 28, (256, 64, 64), seed=0)  # --from: a quarter of --synthetic's
    done = _run_all(tmp_path, "--epochs", "1", data=("--from", str(small)))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{tmp_path / 'comparison'}\n"
    table = (tmp_path / "comparison" / "comparison.md").read_text()
    assert "resnet18" in table and "vit" in table and "tta, calibrated" in table
    runs = sorted(p for p in (tmp_path / "runs").iterdir() if p.is_dir())
    assert len(runs) == 2
    for run in runs:  # each run was evaluated and explained through its manifest
        assert (run / "metrics" / "test.json").is_file() and (run / "report.xlsx").is_file()
        assert any((run / "explain").rglob("*.png"))
    (log,) = (tmp_path / "logs").iterdir()
    stages = [line.split()[3] for line in log.read_text().splitlines() if line.split()[2:3] == ["done"]]
    assert stages == ["data", "train-resnet18", "train-vit", "evaluate-resnet18", "evaluate-vit",
                      "explain-resnet18", "explain-vit", "aggregate", "report-resnet18", "report-vit",
                      "report-comparison"]
    assert (tmp_path / "comparison" / "comparison.html").is_file()
    assert all((run / "report.html").is_file() for run in runs)
    agreement = json.loads((tmp_path / "comparison" / "maps" / "maps_agreement.json").read_text())
    assert not list((tmp_path / "comparison").glob("maps_*"))  # the maps' files once, in maps/
    assert agreement["samples"] == 32 and len(agreement["pairs"]) == 1  # resnet18 gradcam vs vit rollout
    for run in runs:
        stage = json.loads((run / "manifest.json").read_text())["stages"]
        road = next(v for k, v in stage.items() if k.startswith("explain:"))["summary"]["faithfulness"]
        assert road["n"] + road["constant"] == 32 and road["n"] >= 16  # a constant map has no score


def test_run_all_stops_at_the_first_failure_with_its_exit_code(tmp_path):
    done = _run_all(tmp_path, "--epochs", "0")
    assert done.returncode == 2 and done.stdout == ""
    assert "FAILED train-resnet18 (exit 2)" in done.stderr and "--epochs" in done.stderr
    assert "train-vit" not in done.stderr  # nothing after the failing stage ran
    assert not (tmp_path / "comparison").exists()


def test_run_all_needs_no_home_for_its_help_or_a_given_root(tmp_path):
    """Review: under `set -u`, `$HOME/.medmnist` as the default --root ended even --help with
    "HOME: unbound variable" (exit 1) where HOME is unset (cron, some containers)."""
    env = {key: value for key, value in os.environ.items() if key != "HOME"}
    shown = subprocess.run(["bash", str(SCRIPT), "--help"], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
    assert shown.returncode == 0 and "Usage: scripts/run_all.sh" in shown.stdout, shown.stderr
