"""The Run object and its manifest: round trip, stages and their locks, concurrent writers,
crash-safe saves, refusal of manifests we can't read."""

from __future__ import annotations

import json
import os

import pytest

from medcli import fileio
from medcli.errors import MedcliError, UsageError
from medcli.manifest import SCHEMA_VERSION
from medcli.run import Run, create_run_dir


def _new(tmp_path, name="run"):
    return Run.create(tmp_path, name, config={"epochs": 3, "lr": 0.1}, dataset={"flag": "bloodmnist", "size": 28})


def _files(run):
    """The run directory's files other than the lock files."""
    return sorted(p.name for p in run.run_dir.iterdir() if not p.name.startswith(".") or p.name.endswith(".tmp"))


def test_round_trip(tmp_path):
    manifest = _new(tmp_path)
    loaded = Run.open(manifest.run_dir)
    assert loaded.data == manifest.data
    assert loaded.data["schema_version"] == SCHEMA_VERSION
    assert loaded.config == {"epochs": 3, "lr": 0.1}
    # Loading through the manifest file itself works too.
    assert Run.open(manifest.run_dir / "manifest.json").run_id == manifest.run_id


def test_run_dirs_are_never_reused(tmp_path):
    first = create_run_dir(tmp_path, "same")
    second = create_run_dir(tmp_path, "same")
    assert first != second and first.is_dir() and second.is_dir()


def test_stage_records_status_times_and_artefacts(tmp_path):
    manifest = _new(tmp_path)
    artefact = manifest.run_dir / "metrics" / "test.json"
    with manifest.stage("evaluate") as stage:
        assert Run.open(manifest.run_dir).status("evaluate") == "running"
        fileio.write_json(artefact, {"acc": 0.5})
        stage.add(artefact)
        stage.summary["acc"] = 0.5
    entry = Run.open(manifest.run_dir).stages["evaluate"]
    assert entry["status"] == "completed"
    assert entry["duration_s"] >= 0 and entry["ended"] >= entry["started"]
    assert entry["artefacts"] == {"metrics/test.json": fileio.sha256_file(artefact)}
    assert entry["summary"] == {"acc": 0.5}


@pytest.mark.parametrize("exc, status", [(KeyboardInterrupt, "interrupted"), (RuntimeError, "failed")])
def test_stage_failure_is_recorded(tmp_path, exc, status):
    manifest = _new(tmp_path)
    with pytest.raises(exc):
        with manifest.stage("train"):
            raise exc("boom")
    entry = Run.open(manifest.run_dir).stages["train"]
    assert entry["status"] == status
    assert entry["error"]


def test_a_stage_that_cannot_record_its_failure_says_the_failure(tmp_path, monkeypatch, capsys):
    """Review: on a full disk the workbook's write failed, then so did the manifest's, and the
    error said only "writing manifest.json failed" (the stage stayed running)."""
    from medcli import manifest as manifest_module
    from medcli.errors import MedcliError

    run = _new(tmp_path)
    real_write = manifest_module.write
    with pytest.raises(MedcliError, match="writing report.xlsx failed"):
        with run.stage("evaluate"):
            monkeypatch.setattr(manifest_module, "write", lambda *a, **k: (_ for _ in ()).throw(
                MedcliError("writing manifest.json failed (No space left on device)")))
            raise MedcliError("writing report.xlsx failed (No space left on device)")
    monkeypatch.setattr(manifest_module, "write", real_write)
    assert "could not be recorded as failed: writing manifest.json failed" in capsys.readouterr().err


def test_stage_lock_refuses_a_second_writer_of_the_same_stage(tmp_path):
    manifest = _new(tmp_path)
    other = Run.open(manifest.run_dir)
    with manifest.stage("evaluate"):
        with pytest.raises(UsageError, match=r"in use by another medcli process \(evaluate stage, pid \d+\)") as refused:
            with other.stage("evaluate"):
                pass
    # the advice ends that process alone (clean-processes --yes would end every other medcli process)
    assert f"'kill {os.getpid()}'" in str(refused.value) and "--yes" not in str(refused.value)
    with other.stage("evaluate"):  # free again once the first stage ended
        pass


def test_stages_writing_different_files_run_side_by_side_and_both_are_recorded(tmp_path):
    first = _new(tmp_path)
    second = Run.open(first.run_dir)  # another command's view of the same run
    with first.stage("explain:gradcam") as a:
        with second.stage("explain:rollout") as b:
            b.summary["maps"] = 2
        a.summary["maps"] = 1
    stages = Run.open(first.run_dir).stages
    assert stages["explain:gradcam"]["status"] == stages["explain:rollout"]["status"] == "completed"
    assert stages["explain:gradcam"]["summary"] == {"maps": 1} and stages["explain:rollout"]["summary"] == {"maps": 2}


def test_update_rereads_the_manifest_so_no_writer_loses_another_ones_entries(tmp_path):
    first = _new(tmp_path)
    stale = Run.open(first.run_dir)
    first.update(lambda data: data["stages"].__setitem__("evaluate", {"status": "completed"}))
    stale.update(lambda data: data["stages"].__setitem__("explain:gradcam", {"status": "completed"}))
    assert set(Run.open(first.run_dir).stages) == {"evaluate", "explain:gradcam"}
    assert set(stale.stages) == {"evaluate", "explain:gradcam"}  # the object sees what it wrote


def test_crash_during_save_leaves_previous_manifest(tmp_path, monkeypatch):
    manifest = _new(tmp_path)
    before = (manifest.run_dir / "manifest.json").read_bytes()

    def crash(src, dst):
        raise OSError("disk died during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(MedcliError, match="previous version is unchanged"):
        manifest.update(lambda data: data["config"].update(epochs=99))
    monkeypatch.undo()
    assert (manifest.run_dir / "manifest.json").read_bytes() == before
    assert _files(manifest) == ["manifest.json"]  # no temp file left


def test_crash_while_serialising_leaves_previous_manifest(tmp_path):
    manifest = _new(tmp_path)
    before = (manifest.run_dir / "manifest.json").read_bytes()

    class Exploding:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError):
        manifest.update(lambda data: data["config"].update(bad=Exploding()))
    assert (manifest.run_dir / "manifest.json").read_bytes() == before
    assert _files(manifest) == ["manifest.json"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps([1, 2]), "not a medcli manifest"),
        (json.dumps({"schema_version": SCHEMA_VERSION + 1}), "newer than this medcli"),
        (json.dumps({"schema_version": "1"}), "no valid schema_version"),
        (json.dumps({"schema_version": 1, "config": {}}), "missing"),
    ],
)
def test_refuses_unreadable_manifests(tmp_path, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(content)
    with pytest.raises(UsageError, match=message):
        Run.open(run)


def test_refuses_missing_run_and_missing_manifest(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Run.open(tmp_path / "nope")
    with pytest.raises(UsageError, match="no manifest.json"):
        Run.open(tmp_path)


def test_mark_interrupted_only_touches_the_ended_process_running_stages(tmp_path):
    manifest = _new(tmp_path)

    def stages(data):
        data["stages"].update(train={"status": "running", "pid": 11, "artefacts": {}, "summary": {}},
                              **{"explain:gradcam": {"status": "running", "pid": 12, "artefacts": {}, "summary": {}},
                                 "evaluate": {"status": "completed", "artefacts": {}, "summary": {}}})

    manifest.update(stages)
    assert manifest.mark_interrupted("ended by clean-processes", pid=11) == ["train"]
    loaded = Run.open(manifest.run_dir)
    assert loaded.status("train") == "interrupted" and "pid" not in loaded.stages["train"]
    assert loaded.status("explain:gradcam") == "running"
    assert loaded.status("evaluate") == "completed"


def test_the_evaluate_command_a_hint_gives_redoes_the_recorded_evaluation(tmp_path, monkeypatch):
    """Review: the report's hint for a run evaluated with --tta said 'medcli evaluate runs/r --split
    test --calibrate': followed, it turned TTA off (54.7 % -> 47.7 %), and the relative path
    failed from another folder. The command keeps the split's recorded checkpoint, TTA and
    calibration, and the run's absolute path; train has no --split of its own (all)."""
    monkeypatch.chdir(tmp_path)
    run = Run.create("runs", "r", config={}, dataset={"flag": "bloodmnist", "size": 28})
    run.update(lambda data: data["stages"].__setitem__("evaluate", {"status": "completed", "summary": {
        "test": {"checkpoint": "last", "tta": True, "temperature": None},
        "val": {"checkpoint": "best", "tta": False, "temperature": 1.3}}}))
    where = str((tmp_path / "runs" / "r").resolve())
    assert run.evaluate_command("test") == f"medcli evaluate {where} --split test --checkpoint last --tta"
    assert run.evaluate_command("test", "--calibrate") == \
        f"medcli evaluate {where} --split test --checkpoint last --tta --calibrate"
    assert run.evaluate_command("val") == f"medcli evaluate {where} --split val --calibrate"
    assert run.evaluate_command("val", "--calibrate") == f"medcli evaluate {where} --split val --calibrate"
    assert run.evaluate_command("train") == f"medcli evaluate {where} --split train"  # that split alone


def test_the_resume_command_keeps_a_distributed_runs_process_count(tmp_path):
    """Review: a `--nproc 2` run was told to resume with 'medcli train --resume RUN', which
    continues it in one process (another batch split, not the run it was)."""
    from medcli import manifest
    from medcli.run import Run

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    manifest.write(run_dir, manifest.document("r", config={}, dataset={},
                                              environment={"distributed": {"world_size": 2}}))
    assert Run.open(run_dir).resume_command().endswith(" --nproc 2")
    Run.open(run_dir).update(lambda data: data["environment"]["distributed"].update(world_size=1))
    assert Run.open(run_dir).resume_command() == f"medcli train --resume {run_dir.resolve()}"


def test_a_stage_marked_running_is_told_apart_as_live_or_ended(tmp_path):
    """Review: `report` on a run whose evaluate was running said "no completed evaluate stage
    (running); evaluate it first", both while it ran and after it was killed."""
    from filelock import FileLock

    from medcli.run import stage_lock_path

    run = _new(tmp_path)
    run.update(lambda data: data["stages"].update(evaluate={"status": "running", "pid": 4242, "artefacts": {},
                                                            "summary": {}}))
    with pytest.raises(UsageError, match=r"did not finish: its process \(pid 4242\) ended .* evaluate it first"):
        Run.open(run.run_dir).require("evaluate", "evaluate it first")
    with FileLock(stage_lock_path(run.run_dir, "evaluate")):  # the evaluating process, alive
        with pytest.raises(UsageError, match=r"is still running \(pid 4242\); wait for it to finish"):
            Run.open(run.run_dir).require("evaluate", "evaluate it first")


@pytest.mark.parametrize("kind, record, hint", [
    ("synthetic", {"synthetic": True, "official": False},
     "write it again with 'medcli download bloodmnist --synthetic --size 28 --root {root}'"),
    ("sample", {"sample": True, "official": False}, "place it again with 'medcli download bloodmnist --sample --root {root}'"),
    ("", {"official": False, "md5": "abc"}, "restore that file (it was imported, not downloaded: md5 abc)"),
    ("", {"official": True}, "fetch it with 'medcli download bloodmnist --size 28 --root {root}'"),
])
def test_a_missing_dataset_is_put_back_where_the_run_looks(tmp_path, kind, record, hint):
    """Review: a run whose data was gone advised 'medcli download bloodmnist --size 28', which
    saves the official file in ~/.medmnist (the run does not look there) and, for a synthetic or
    sample run, another file than the one it trained on."""
    root = tmp_path / "gone"
    path = (root / kind if kind else root) / "bloodmnist.npz"
    run = Run.create(tmp_path / "runs", "r", config={"root": str(path.parent)},
                     dataset={"flag": "bloodmnist", "size": 28, "path": str(path), **record})
    with pytest.raises(UsageError) as refused:
        run.load_data()
    assert "is missing; pass --root DIR holding it, or " + hint.format(root=root) in str(refused.value)


def test_a_runs_dir_that_is_a_file_is_named_as_one(tmp_path):
    """Review: `train --runs-dir r1.out` (an existing file) said "File exists"."""
    from medcli.errors import UsageError

    (tmp_path / "r1.out").write_text("a log")
    with pytest.raises(UsageError, match=r"--runs-dir .*r1.out is a file, not a folder"):
        create_run_dir(tmp_path / "r1.out", "run")
    assert (tmp_path / "r1.out").read_text() == "a log"


def test_a_figure_file_is_one_of_the_runs_figures(tmp_path):
    """Run owns the figure names: a renamed figure cannot silently drop off the pages that read it."""
    run = Run.create(tmp_path, "r", config={}, dataset={})
    assert run.figure_file("confusion", "test", "_counts") == run.run_dir / "figures" / "confusion_test_counts.png"
    assert run.figure_file("curves") == run.run_dir / "figures" / "curves.png"
    for name, split in (("confusion", None), ("curves", "test"), ("confusions", "test")):
        with pytest.raises(ValueError, match="a run has no figure"):
            run.figure_file(name, split)
