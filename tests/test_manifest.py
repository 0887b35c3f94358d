"""The run manifest: round trip, crash-safe saves, refusal of manifests we can't read."""

from __future__ import annotations

import json
import os

import pytest

from medcli import fileio
from medcli.errors import MedcliError, UsageError
from medcli.manifest import SCHEMA_VERSION, Manifest, create_run_dir


def _new(tmp_path, name="run"):
    run = create_run_dir(tmp_path, name)
    return Manifest.new(run, config={"epochs": 3, "lr": 0.1}, dataset={"flag": "bloodmnist", "size": 28})


def test_round_trip(tmp_path):
    manifest = _new(tmp_path)
    loaded = Manifest.load(manifest.run_dir)
    assert loaded.data == manifest.data
    assert loaded.data["schema_version"] == SCHEMA_VERSION
    assert loaded.config == {"epochs": 3, "lr": 0.1}
    # Loading through the manifest file itself works too.
    assert Manifest.load(manifest.run_dir / "manifest.json").run_id == manifest.run_id


def test_run_dirs_are_never_reused(tmp_path):
    first = create_run_dir(tmp_path, "same")
    second = create_run_dir(tmp_path, "same")
    assert first != second and first.is_dir() and second.is_dir()


def test_stage_records_status_times_and_artefacts(tmp_path):
    manifest = _new(tmp_path)
    artefact = manifest.run_dir / "metrics" / "test.json"
    with manifest.stage("evaluate") as stage:
        assert Manifest.load(manifest.run_dir).stage_status("evaluate") == "running"
        fileio.write_json(artefact, {"acc": 0.5})
        stage.add(artefact)
        stage.summary["acc"] = 0.5
    entry = Manifest.load(manifest.run_dir).stages["evaluate"]
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
    entry = Manifest.load(manifest.run_dir).stages["train"]
    assert entry["status"] == status
    assert entry["error"]


def test_stage_lock_refuses_a_second_writer(tmp_path):
    manifest = _new(tmp_path)
    other = Manifest.load(manifest.run_dir)
    with manifest.stage("train"):
        with pytest.raises(UsageError, match="in use by another medcli process"):
            with other.stage("evaluate"):
                pass
    with other.stage("evaluate"):  # free again once the first stage ended
        pass


def test_crash_during_save_leaves_previous_manifest(tmp_path, monkeypatch):
    manifest = _new(tmp_path)
    before = (manifest.run_dir / "manifest.json").read_bytes()

    def crash(src, dst):
        raise OSError("disk died during rename")

    manifest.config["epochs"] = 99
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(MedcliError, match="previous version is unchanged"):
        manifest.save()
    monkeypatch.undo()
    assert (manifest.run_dir / "manifest.json").read_bytes() == before
    assert [p.name for p in manifest.run_dir.iterdir()] == ["manifest.json"]  # no temp file left


def test_crash_while_serialising_leaves_previous_manifest(tmp_path):
    manifest = _new(tmp_path)
    before = (manifest.run_dir / "manifest.json").read_bytes()

    class Exploding:
        def __str__(self):
            raise RuntimeError("cannot serialise")

    manifest.config["bad"] = Exploding()
    with pytest.raises(RuntimeError):
        manifest.save()
    assert (manifest.run_dir / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in manifest.run_dir.iterdir()) == ["manifest.json"]


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
        Manifest.load(run)


def test_refuses_missing_run_and_missing_manifest(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        Manifest.load(tmp_path / "nope")
    with pytest.raises(UsageError, match="no manifest.json"):
        Manifest.load(tmp_path)


def test_mark_interrupted_only_touches_running_stages(tmp_path):
    manifest = _new(tmp_path)
    manifest.stages["train"] = {"status": "running", "artefacts": {}, "summary": {}}
    manifest.stages["evaluate"] = {"status": "completed", "artefacts": {}, "summary": {}}
    assert manifest.mark_interrupted("ended by clean-processes")
    loaded = Manifest.load(manifest.run_dir)
    assert loaded.stage_status("train") == "interrupted"
    assert loaded.stage_status("evaluate") == "completed"
