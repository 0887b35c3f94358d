"""usable_cpus: affinity capped by the cgroup CPU quota (v1 and v2), never below 1."""

import os

import pytest

from medcli import system


@pytest.fixture
def fake_affinity(monkeypatch):
    monkeypatch.setattr(system, "_affinity", lambda: 8)


def _proc(tmp_path, text):
    path = tmp_path / "proc_cgroup"
    path.write_text(text)
    return path


def test_v2_quota_caps_affinity(tmp_path, fake_affinity):
    root = tmp_path / "cg"
    (root / "job").mkdir(parents=True)
    (root / "job" / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs
    assert system.usable_cpus(root, _proc(tmp_path, "0::/job\n")) == 2


def test_v2_unlimited_keeps_affinity(tmp_path, fake_affinity):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    assert system.usable_cpus(root, _proc(tmp_path, "0::/\n")) == 8


def test_v1_cfs_quota(tmp_path, fake_affinity):
    root = tmp_path / "cg"
    cpu = root / "cpu,cpuacct" / "slurm"
    cpu.mkdir(parents=True)
    (cpu / "cpu.cfs_quota_us").write_text("300000")
    (cpu / "cpu.cfs_period_us").write_text("100000")
    assert system.usable_cpus(root, _proc(tmp_path, "4:cpu,cpuacct:/slurm\n")) == 3


def test_v1_unlimited_quota_is_minus_one(tmp_path, fake_affinity):
    root = tmp_path / "cg"
    (root / "cpu").mkdir(parents=True)
    (root / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    (root / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert system.usable_cpus(root, _proc(tmp_path, "2:cpu:/\n")) == 8


def test_tiny_quota_still_one_thread(tmp_path, fake_affinity):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("10000 100000\n")  # 0.1 CPU
    assert system.usable_cpus(root, _proc(tmp_path, "0::/\n")) == 1


def test_no_cgroup_files_means_affinity(tmp_path, fake_affinity):
    assert system.usable_cpus(tmp_path / "missing", tmp_path / "missing_proc") == 8


def test_real_machine_answer_is_within_affinity():
    cpus = system.usable_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))


def test_training_sets_torch_threads_from_usable_cpus(monkeypatch):
    import torch

    from medcli import train

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(system, "usable_cpus", lambda: 3)  # none of torch's usual counts here
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train.use_cpu_threads()
        assert torch.get_num_threads() == 3
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes of a job on this node share the cores
        train.use_cpu_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's setting is left alone
        torch.set_num_threads(2)
        train.use_cpu_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_limit_on_a_parent_cgroup_counts(tmp_path, fake_affinity, version):
    """Review: only the process's own cgroup and the root were read, so a job limited at
    `a/` with the process in `a/b` (unlimited itself) got every core."""
    root = tmp_path / "cg"
    if version == "v2":
        (root / "a" / "b").mkdir(parents=True)
        (root / "a" / "cpu.max").write_text("100000 100000\n")
        (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
        proc = _proc(tmp_path, "0::/a/b\n")
    else:
        (root / "cpu" / "slurm" / "job").mkdir(parents=True)
        for folder, quota in ((root / "cpu" / "slurm", "100000"), (root / "cpu" / "slurm" / "job", "-1")):
            (folder / "cpu.cfs_quota_us").write_text(quota)
            (folder / "cpu.cfs_period_us").write_text("100000")
        proc = _proc(tmp_path, "2:cpu:/slurm/job\n")
    assert system.usable_cpus(root, proc) == 1


def test_a_malformed_cpu_max_is_no_limit_not_a_crash(tmp_path, fake_affinity):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cpu.max").write_text("abc 100000\n")
    assert system.usable_cpus(root, _proc(tmp_path, "0::/\n")) == 8
