"""Dataset records are trusted only while the file is the one they describe (size and mtime,
as `download` checks), and a read-only data root still works."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from medcli import datasets, fileio
from medcli.cli import app
from medcli.errors import MedcliError

runner = CliRunner()
FLAG, SIZE = "bloodmnist", 28


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "data"
    datasets.make_synthetic(datasets.data_path(root, FLAG, SIZE), FLAG, SIZE, (16, 8, 8), seed=0)
    return root


def _other_file(tmp_path):
    return datasets.make_synthetic(tmp_path / "other" / datasets.filename(FLAG, SIZE), FLAG, SIZE, (16, 8, 8), seed=1)


def test_a_swapped_file_is_not_trusted_as_official(root, tmp_path, monkeypatch, capsys):
    """A record says official (its md5 is the official one); someone swaps the npz for another
    valid file. Its record must follow the new file, not keep the old md5 and official: true."""
    path = datasets.data_path(root, FLAG, SIZE)
    original_md5 = fileio.md5_file(path)
    monkeypatch.setattr(datasets, "official_source", lambda flag, size: ("url", original_md5))
    _, record = datasets.resolve(root, FLAG, SIZE)
    record = datasets.make_record(FLAG, SIZE, path, original_md5, "official download", record["n_samples"])
    datasets.write_record(path, record)
    assert datasets.resolve(root, FLAG, SIZE)[1]["official"] is True

    shutil.copyfile(_other_file(tmp_path), path)
    _, record = datasets.resolve(root, FLAG, SIZE)
    assert record["md5"] == fileio.md5_file(path) != original_md5
    assert record["official"] is False and "changed since its record" in capsys.readouterr().err
    assert datasets.read_record(path)["md5"] == record["md5"], "the fresh record is saved"


def test_a_touched_file_keeps_its_record_facts(root):
    """Same bytes, new mtime (a copy, a backup restore): re-hashed once, the facts kept."""
    path = datasets.data_path(root, FLAG, SIZE)
    before = datasets.read_record(path)
    os.utime(path, ns=(before["mtime_ns"] + 10**9, before["mtime_ns"] + 10**9))
    _, record = datasets.resolve(root, FLAG, SIZE)
    assert record["synthetic"] is True and record["signal_box"] == before["signal_box"]
    assert record["source"] == before["source"] and record["mtime_ns"] == before["mtime_ns"] + 10**9
    assert datasets.unchanged(datasets.read_record(path), path)


def test_an_unchanged_file_is_not_hashed_again(root, monkeypatch):
    def no_hashing(path):
        raise AssertionError("hashed a file whose record is current")

    monkeypatch.setattr(fileio, "md5_file", no_hashing)
    assert datasets.resolve(root, FLAG, SIZE)[1]["synthetic"] is True


def test_a_record_from_before_the_current_checks_sends_its_file_through_them_again(tmp_path, monkeypatch):
    """A file recorded by a medcli whose import did not check label columns yet: its record
    says nothing of the check, so load validates it (without hashing it again) and refuses it."""
    import numpy as np

    path = datasets.data_path(tmp_path, FLAG, SIZE)
    datasets.make_synthetic(path, FLAG, SIZE, (16, 8, 8), seed=0)
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["test_labels"] = np.zeros((8, 2), dtype=np.uint8)
    np.savez(path, **arrays)
    old = datasets.make_record(FLAG, SIZE, path, fileio.md5_file(path), "an older medcli", {"train": 16})
    del old["checks"]
    datasets.write_record(path, old)
    good = datasets.make_synthetic(tmp_path / "good" / datasets.filename(FLAG, SIZE), FLAG, SIZE, (16, 8, 8), seed=0)
    record = datasets.read_record(good)
    del record["checks"]
    datasets.write_record(good, record)
    listed = runner.invoke(app, ["download", "--list", "--json", "--root", str(tmp_path), FLAG])
    assert json.loads(listed.stdout)[0]["files"]["28"]["status"] == "unverified"  # until its next use checks it
    monkeypatch.setattr(fileio, "md5_file", lambda p: pytest.fail("hashed a file whose record has its md5"))
    with pytest.raises(MedcliError, match=r"test_labels has shape \(8, 2\), expected \(8, 1\)"):
        datasets.load(tmp_path, FLAG, SIZE)
    assert datasets.resolve(good.parent, FLAG, SIZE)[1]["checks"] == datasets.CHECKS
    assert datasets.read_record(good)["synthetic"] is True, "a file that passes keeps its record's facts"


def test_a_read_only_root_without_records_still_trains(root, tmp_path, monkeypatch):
    """A shared, read-only data root holding a file without a record (e.g. placed by the
    medmnist package): train must work, with the record computed in memory."""
    datasets.record_path(datasets.data_path(root, FLAG, SIZE)).unlink()

    def read_only(path, record):
        raise MedcliError(f"writing {path} failed (Read-only file system)")

    monkeypatch.setattr(datasets, "write_record", read_only)
    result = runner.invoke(app, ["train", "--root", str(root), "--runs-dir", str(tmp_path / "runs"),
                                 "--model", "timm:test_resnet", "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.stderr
    assert not datasets.record_path(datasets.data_path(root, FLAG, SIZE)).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_really_read_only_root(root):
    path = datasets.data_path(root, FLAG, SIZE)
    datasets.record_path(path).unlink()
    root.chmod(0o555)
    try:
        assert datasets.resolve(root, FLAG, SIZE)[1]["md5"] == fileio.md5_file(path)
    finally:
        root.chmod(0o755)


def test_make_subset_is_stratified_relabelled_and_checked_like_an_import(tmp_path, make_subset):
    source = datasets.make_synthetic(tmp_path / "src.npz", "bloodmnist", 28, (80, 40, 40), seed=0)
    # RGB and 2 of 8 classes as retinamnist (RGB, 5 classes): class 5 becomes 0, class 2 becomes 1
    make_subset(source, tmp_path / "rgb" / datasets.filename("retinamnist", 28), "retinamnist", (20, 10, 10),
                classes=(5, 2))
    splits = datasets.load(tmp_path / "rgb", "retinamnist", 28)
    with np.load(source) as archive:
        images, labels = archive["train_images"], archive["train_labels"][:, 0]
    for new_label, old_label in enumerate((5, 2)):
        picked = splits.images["train"][splits.labels["train"] == new_label]
        assert len(picked) == 10  # stratified: the two classes are equally common in the source
        assert all((images[labels == old_label] == image).all(axis=(1, 2, 3)).any() for image in picked)
    gray = tmp_path / "gray" / datasets.filename("breastmnist", 28)
    make_subset(source, gray, "breastmnist", (20, 10, 10), classes=(5, 2), grayscale=True)
    assert datasets.load(tmp_path / "gray", "breastmnist", 28).images["train"].shape == (20, 28, 28, 1)
    # RGB images under a grayscale flag used to pass on the record's word: refused, no file left
    other = tmp_path / "bad" / datasets.filename("breastmnist", 28)
    with pytest.raises(MedcliError, match="expected \\(28, 28\\)"):
        make_subset(source, other, "breastmnist", (20, 10, 10), classes=(5, 2))
    with pytest.raises(MedcliError, match="no train images of class 9"):
        make_subset(source, other, "breastmnist", (20, 10, 10), classes=(1, 9), grayscale=True)
    assert not other.parent.exists() or not any(other.parent.iterdir())
