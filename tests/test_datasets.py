"""Dataset records are trusted only while the file is the one they describe (size and mtime,
as `download` checks), and a read-only data root still works."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medcli import datasets, fileio, npzcache
from medcli.cli import app
from medcli.errors import MedcliError

from cli_helpers import as_nobody, one_line_error, shared_folder

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


def test_a_really_read_only_root(root):
    """A data root nobody may write to (checked as another user when this runs as root, whom
    directory permissions do not stop): the file is checked and used, its record not kept."""
    path = datasets.data_path(root, FLAG, SIZE)
    datasets.record_path(path).unlink()
    if os.geteuid() != 0:
        root.chmod(0o555)
        try:
            assert datasets.resolve(root, FLAG, SIZE)[1]["md5"] == fileio.md5_file(path)
        finally:
            root.chmod(0o755)
        return
    with shared_folder() as folder:
        shutil.copytree(root, folder / "data")
        (folder / "data").chmod(0o555)
        nobody = as_nobody(f"from medcli import datasets; print(datasets.resolve({str(folder / 'data')!r}, "
                           f"{FLAG!r}, {SIZE})[1]['md5'])")
        assert nobody.returncode == 0, nobody.stderr
        assert nobody.stdout.split() == [fileio.md5_file(path)]
        assert not datasets.record_path(folder / "data" / path.name).exists()


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


# -- the uncompressed, mapped cache training reads --------------------------------------------------

def _cache_files(root):
    return sorted(p.relative_to(root).as_posix() for p in (root / npzcache.CACHE_DIR).rglob("*") if p.is_file())


def test_the_cache_is_written_once_then_mapped_and_holds_the_file_s_data(root, monkeypatch):
    """Deflated npz -> .npy files (N, C, H, W) beside it, written on the first mapped load and
    mapped by the next ones; the data equal the npz's, and `as_tensor` copies nothing."""
    import torch

    writes = []
    real = npzcache._write_cache
    monkeypatch.setattr(npzcache, "_write_cache", lambda *args: writes.append(args[2]) or real(*args))
    plain = datasets.load(root, FLAG, SIZE)
    first = datasets.load(root, FLAG, SIZE, mapped=True)
    assert sorted(writes) == sorted(datasets.SPLITS)
    md5 = first.record["md5"]
    assert first.cache == root / npzcache.CACHE_DIR / f"bloodmnist-{md5}" == \
        npzcache.cache_path(datasets.data_path(root, FLAG, SIZE), md5)
    names = sorted([".lock", *(f"{s}_{k}.npy" for s in datasets.SPLITS for k in ("images", "labels"))])
    assert _cache_files(root) == [f"{npzcache.CACHE_DIR}/bloodmnist-{md5}/{name}" for name in names]
    second = datasets.load(root, FLAG, SIZE, ("train",), mapped=True)
    assert sorted(writes) == sorted(datasets.SPLITS)  # reused, not written again
    for split in datasets.SPLITS:
        assert first.images[split].shape == plain.images[split].shape == (plain.labels[split].shape[0], SIZE, SIZE, 3)
        assert np.array_equal(first.images[split], plain.images[split])
        assert np.array_equal(first.labels[split], plain.labels[split]) and first.labels[split].dtype == np.int64
        assert npzcache.is_mapped(first.images[split]) and not npzcache.is_mapped(plain.images[split])
    tensor = datasets.as_tensor(second.images["train"])
    assert np.shares_memory(tensor.numpy(), second.images["train"])  # no host copy: the page cache's pages
    assert tensor.is_contiguous() and torch.equal(tensor, datasets.as_tensor(plain.images["train"]))
    assert not datasets.load(root, FLAG, SIZE).cache  # other commands read the file as before


def test_a_changed_file_gets_a_new_cache_and_the_old_one_goes(root, tmp_path):
    path = datasets.data_path(root, FLAG, SIZE)
    old = datasets.load(root, FLAG, SIZE, ("train",), mapped=True)
    shutil.copy(_other_file(tmp_path), path)  # another file at the same path: a new md5
    new = datasets.load(root, FLAG, SIZE, ("train",), mapped=True)
    assert new.record["md5"] == fileio.md5_file(path) != old.record["md5"]
    assert new.cache != old.cache and not old.cache.exists()
    assert [p.name for p in (root / npzcache.CACHE_DIR).iterdir()] == [new.cache.name]
    assert np.array_equal(new.images["train"], datasets.load(root, FLAG, SIZE, ("train",)).images["train"])
    np.save(new.cache / "train_labels.npy", np.zeros(3, np.uint8))  # a damaged cache is written again
    again = datasets.load(root, FLAG, SIZE, ("train",), mapped=True)
    assert np.array_equal(again.labels["train"], datasets.load(root, FLAG, SIZE, ("train",)).labels["train"])


_RACE = '''
import json, os, sys, time
from pathlib import Path
from medcli import datasets, npzcache

root, me, other = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
real = npzcache._write_cache

def slow(*args):
    with open(root / "writes.log", "a") as log:
        log.write(f"{os.getpid()} {args[2]}\\n")
    time.sleep(0.5)  # the other process arrives while this one writes
    real(*args)

npzcache._write_cache = slow
me.touch()
while not other.exists():
    time.sleep(0.01)
splits = datasets.load(root, "bloodmnist", 28, mapped=True)
print(json.dumps({s: int(splits.images[s].astype("int64").sum()) for s in splits.images}))
'''


def test_two_processes_creating_the_cache_at_once_write_it_once(root, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "race.py"
    script.write_text(_RACE)
    flags = [tmp_path / "ready0", tmp_path / "ready1"]
    procs = [subprocess.Popen([sys.executable, str(script), str(root), str(flags[i]), str(flags[1 - i])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    sums = {s: int(a.astype(np.int64).sum()) for s, a in datasets.load(root, FLAG, SIZE).images.items()}
    assert [json.loads(out) for out, _ in outs] == [sums, sums]
    writes = (root / "writes.log").read_text().split()
    assert sorted(writes[1::2]) == sorted(datasets.SPLITS)  # each split written by one process only
    assert not [p for p in (root / npzcache.CACHE_DIR).rglob("*.tmp*")]  # no partial files left


def test_a_cache_that_cannot_be_written_is_one_warning_and_the_data_is_read(root, monkeypatch, capsys):
    (root / npzcache.CACHE_DIR).write_text("not a folder")  # as unwritable as a read-only root, also for root
    splits = datasets.load(root, FLAG, SIZE, ("train", "val"), mapped=True)
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "cannot cache bloodmnist.npz uncompressed" in warning[0], warning
    assert splits.cache is None and not npzcache.is_mapped(splits.images["train"])
    plain = datasets.load(root, FLAG, SIZE, ("train", "val"))
    assert np.array_equal(splits.images["train"], plain.images["train"])
    assert splits.images["train"].transpose(0, 3, 1, 2).flags.c_contiguous  # read in the training layout
    (root / npzcache.CACHE_DIR).unlink()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 1000))
    assert datasets.load(root, FLAG, SIZE, ("val",), mapped=True).cache is None
    assert "GiB free" in capsys.readouterr().err


def test_training_maps_large_splits_or_when_told(monkeypatch):
    record = {"flag": "pathmnist", "size": 224, "n_samples": {"train": 89996, "val": 10004, "test": 7180}}
    small = {"flag": "bloodmnist", "size": 28, "n_samples": {"train": 11959, "val": 1712, "test": 3421}}
    monkeypatch.delenv(npzcache.CACHE_ENV, raising=False)
    assert datasets.use_cache(record, ("train", "val"))  # 15 GB: mapped even in one process
    assert not datasets.use_cache(small, ("train", "val"))  # 31 MB
    assert not datasets.use_cache(small, ("train", "val"), processes=8)  # 8 copies: 250 MB
    assert datasets.use_cache({**small, "size": 64}, ("train", "val"), processes=4)  # 4 x 168 MB
    monkeypatch.setenv(npzcache.CACHE_ENV, "never")
    assert not datasets.use_cache(record, ("train",))
    monkeypatch.setenv(npzcache.CACHE_ENV, "always")
    assert datasets.use_cache(small, ("val",))
    monkeypatch.setenv(npzcache.CACHE_ENV, "sometimes")
    with pytest.raises(MedcliError, match="MEDCLI_DATA_CACHE='sometimes' is not one of auto, always, never"):
        datasets.use_cache(small, ("val",))


def test_what_a_killed_cache_writer_left_is_removed_by_the_next_one(root):
    """Review: a writer killed by SIGKILL (the OOM killer, caching a 224-px split) left its
    temporary file in the cache folder for good: gigabytes that also count against the free
    space the next cache needs."""
    path = datasets.data_path(root, FLAG, SIZE)
    directory = npzcache.cache_path(path, datasets.load(root, FLAG, SIZE, ("train",)).record["md5"])
    directory.mkdir(parents=True, exist_ok=True)
    orphan = directory / ".train_images.npy.k1ll3d.tmp.npy"
    orphan.write_bytes(b"\x93NUMPY half a split")
    datasets.load(root, FLAG, SIZE, ("train",), mapped=True)
    assert not orphan.exists() and (directory / "train_images.npy").is_file()


def test_evaluate_reads_a_split_batch_by_batch_without_a_second_copy(root, monkeypatch):
    """Review: evaluate made each RGB split contiguous (N, C, H, W) on the host before
    predicting: a second copy of the whole split (13.5 GB more for PathMNIST's train at 224 px)
    where a batch at a time is enough. The images reach predict_logits as a view."""
    import torch

    from medcli import inference

    split = datasets.load(root, FLAG, SIZE, ("test",))
    view = datasets.as_view(split.images["test"])
    assert np.shares_memory(view.numpy(), split.images["test"]) and tuple(view.shape[1:]) == (3, SIZE, SIZE)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, 8))
    prep = {"input_size": SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}
    got = inference.predict_logits(model, view, prep, batch_size=7, device="cpu")
    want = inference.predict_logits(model, datasets.as_tensor(split.images["test"]), prep, batch_size=7, device="cpu")
    assert torch.equal(got, want)


def test_the_cache_of_an_earlier_file_being_written_by_another_process_is_left_alone(root, tmp_path):
    """Review: the caches of earlier versions of a file were removed without their lock, under
    a process still writing one (its rename then failed)."""
    from filelock import FileLock

    path = datasets.data_path(root, FLAG, SIZE)
    busy = npzcache.cache_path(path, "0" * 32)  # another version's cache, being written
    busy.mkdir(parents=True)
    (busy / "train_images.npy").write_bytes(b"written")
    with FileLock(busy / ".lock"):  # held by "the other process" (flock: per open file, so this conflicts)
        current = datasets.load(root, FLAG, SIZE, ("train",), mapped=True).cache
        assert (busy / "train_images.npy").is_file()
    shutil.rmtree(current)  # the next load writes its cache again, and clears what is stale
    datasets.load(root, FLAG, SIZE, ("train",), mapped=True)
    assert not busy.exists()


# -- review: files that changed unseen, zip features Python lacks, members cut short ------------


def test_a_file_renamed_over_with_the_same_size_and_mtime_is_hashed_again(root, tmp_path):
    """Review: a record was trusted while size and mtime matched, so another file of the same
    size renamed over the npz with its mtime copied (`touch -r`, `cp -p`, rsync) kept the old
    md5, and training read the old images from the cache. The inode is part of the check."""
    path = datasets.data_path(root, FLAG, SIZE)
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    np.savez(path.with_suffix(".tmp.npz"), **arrays)  # uncompressed: the same size whatever the pixels
    os.replace(path.with_suffix(".tmp.npz"), path)
    _, before = datasets.resolve(root, FLAG, SIZE)
    arrays["train_images"][0] ^= 0xFF
    other = tmp_path / "other.npz"
    np.savez(other, **arrays)
    assert other.stat().st_size == path.stat().st_size
    os.utime(other, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    os.replace(other, path)
    _, after = datasets.resolve(root, FLAG, SIZE)
    assert after["md5"] == fileio.md5_file(path) != before["md5"]


def _patched_central_directory(source: Path, target: Path, member: str, offset: int, value: bytes) -> Path:
    """A copy of the zip `source` with `value` written at `offset` of `member`'s central directory entry."""
    import zipfile

    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        start = archive.start_dir
    index = data.index(b"PK\x01\x02", start)
    while data[index + 46: index + 46 + len(member)] != member.encode():
        index = data.index(b"PK\x01\x02", index + 4)
    data[index + offset: index + offset + len(value)] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(bytes(data))
    return target


@pytest.mark.parametrize("offset, value, what", [(8, b"\x01\x00", "encrypted"), (10, b"\x09\x00", "Deflate64")])
def test_zip_features_python_cannot_read_are_one_line(root, tmp_path, offset, value, what):
    """Review: an encrypted member, or one compressed with Deflate64 (Windows' built-in zip
    for large files), gave "unexpected RuntimeError / NotImplementedError", exit 1."""
    path = _patched_central_directory(datasets.data_path(root, FLAG, SIZE), tmp_path / "bad" / "x.npz",
                                      "train_images.npy", offset, value)
    one_line_error(runner.invoke(app, ["download", FLAG, "--from", str(path), "--allow-unofficial", "--root",
                                       str(tmp_path / "into")]), 2, "is not a readable npz file")


def test_a_member_shorter_than_its_header_is_refused_on_import(root, tmp_path):
    """Review: an npz member cut short inside an intact zip (correct CRCs) was imported and
    recorded as checked; training then failed on it."""
    import io
    import zipfile

    with np.load(datasets.data_path(root, FLAG, SIZE)) as data:
        arrays = {key: data[key] for key in data.files}
    path = tmp_path / "short" / datasets.filename(FLAG, SIZE)
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, array)
            payload = buffer.getvalue()
            archive.writestr(f"{key}.npy", payload[:-2 * 28 * 28 * 3] if key == "train_images" else payload)
    one_line_error(runner.invoke(app, ["download", FLAG, "--from", str(path), "--allow-unofficial", "--root",
                                       str(tmp_path / "into")]), 2, "train_images is cut short")


def test_a_file_damaged_after_its_record_names_the_command_for_its_own_folder_and_size(tmp_path):
    """Review: bit rot in a file whose record was still trusted failed training with "re-download
    it with 'medcli download bloodmnist'", which fetches the 28-px file into the default root."""
    root = tmp_path / "data"
    path = datasets.make_synthetic(datasets.data_path(root, FLAG, 64), FLAG, 64, (16, 8, 8), seed=0)
    datasets.resolve(root, FLAG, 64)
    stat = path.stat()
    with open(path, "r+b") as handle:  # flip bytes inside the first member's data, in place
        handle.seek(200)
        chunk = handle.read(64)
        handle.seek(200)
        handle.write(bytes(b ^ 0xFF for b in chunk))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(MedcliError, match=f"--size 64 --root {root} --overwrite"):
        datasets.load(root, FLAG, 64)


def test_a_data_root_copied_to_another_file_system_keeps_its_records(root):
    """Review of the diff: inodes are a file system's own, so a root copied elsewhere with its
    records (`cp -a`, rsync; read-only there) was hashed again by every command."""
    path = datasets.data_path(root, FLAG, SIZE)
    _, record = datasets.resolve(root, FLAG, SIZE)
    assert datasets.unchanged({**record, "device": record["device"] + 1, "inode": record["inode"] + 1}, path)
    assert not datasets.unchanged({**record, "inode": record["inode"] + 1}, path)  # same file system: another file


def test_a_home_without_room_for_medmnists_folder_prints_no_python_warning():
    """Review: medmnist's info.py makes ~/.medmnist when loaded and, where it cannot (a
    read-only home), a raw "UserWarning: Failed to setup default root." reached stderr of
    every command that looks a dataset up; medcli never uses that folder."""
    code = "from medcli import datasets\nprint(len(datasets.flags()))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": "/proc"})  # no folder can be made there, even by root
    assert proc.returncode == 0 and proc.stdout.strip() == "12" and "Warning" not in proc.stderr, proc.stderr
