"""`medcli download`: downloads against a real HTTP server on 127.0.0.1, imports through the
CLI, the --list view, and the real PBC-derived BloodMNIST file when ../shared is present."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medcli import datasets, download, fileio
from medcli.cli import app
from medcli.errors import MedcliError, UsageError

from cli_helpers import as_nobody, one_line_error, shared_folder

FLAG, SIZE = "bloodmnist", 28
NAME = datasets.filename(FLAG, SIZE)
OFFICIAL_MD5 = datasets.official_source(FLAG, SIZE)[1]
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# -- a real HTTP server ----------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    """GET /<route>/<file>: the first path segment picks the behaviour; every hit is counted."""

    def do_GET(self):
        route = self.path.split("/")[1]
        with self.server.lock:
            self.server.hits[route] += 1
            hit = self.server.hits[route]
        body = self.server.body
        if route == "good" or (route == "flaky" and hit > self.server.flaky_failures):
            self._send(200, body)
        elif route in ("flaky", "broken"):
            self._send(500, b"internal error", "text/plain")
        elif route == "truncated":  # a complete response of a truncated copy
            self._send(200, body[: len(body) // 2])
        elif route == "nolength" and hit == 1:  # no Content-Length, the connection dropped halfway
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        elif route == "nolength":
            self._send(200, body)
        elif route == "html":
            self._send(200, b"<!DOCTYPE html><html>quota exceeded</html>", "text/html")
        elif route == "disguised":  # an HTML body labelled as binary
            self._send(200, b"\n<html><body>login</body></html>")
        elif route == "notzip":
            self._send(200, b'{"error": "no such record"}', "application/json")
        elif route == "slow":
            time.sleep(1.0)
            self._send(200, body)
        elif route in ("cut", "cut2", "cut0", "stall"):  # promise the whole body, send a part
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: {"cut2": 2, "cut0": 0}.get(route, 64)])
            self.wfile.flush()
            if route == "stall":
                self.server.stalled.set()
                self.server.release.wait(20)
            self.close_connection = True
        else:
            self._send(404, b"not found", "text/plain")

    def _send(self, status: int, payload: bytes, content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, body: bytes):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body = body
        self.hits: Counter = Counter()
        self.lock = threading.Lock()
        self.flaky_failures = 2
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.base = f"http://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request, client_address):
        pass  # the client hung up on a slow or stalled response: expected here


@pytest.fixture(scope="module")
def good_npz(tmp_path_factory) -> Path:
    """A small valid BloodMNIST-layout npz standing for a real file someone has (made
    synthetically, so its md5 is not the official one, but without medcli's record that would
    say so)."""
    path = datasets.make_synthetic(tmp_path_factory.mktemp("src") / NAME, FLAG, SIZE, (16, 8, 8), seed=1)
    datasets.record_path(path).unlink()
    return path


@pytest.fixture
def server(good_npz):
    srv = _Server(good_npz.read_bytes())
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def _fetch(server, route, root, md5, **kwargs):
    kwargs = {"tries": 3, "timeout": 5.0, "backoff": 0.01, **kwargs}
    return download.fetch(FLAG, SIZE, root, mirror=f"{server.base}/{route}", md5=md5, **kwargs)


def _left(root: Path) -> list[str]:
    return sorted(os.listdir(root)) if root.exists() else []


# -- downloads (library) ---------------------------------------------------------------------


def test_download_verifies_and_records_then_never_fetches_or_rehashes_again(server, good_npz, tmp_path, monkeypatch):
    md5 = fileio.md5_file(good_npz)
    record = _fetch(server, "good", tmp_path, md5)
    target = tmp_path / NAME
    assert record["path"] == str(target.resolve()) and target.read_bytes() == good_npz.read_bytes()
    assert _left(tmp_path) == [NAME.replace(".npz", ".json"), NAME]  # no temporary file left
    saved = datasets.read_record(target)
    assert saved["md5"] == md5 and saved["official"] is False and saved["source"] == f"{server.base}/good/{NAME}"
    assert saved["n_samples"] == {"train": 16, "val": 8, "test": 8}
    assert server.hits["good"] == 1

    def no_hashing(path, *args):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(download.fileio, "md5_file", no_hashing)
    again = _fetch(server, "good", tmp_path, md5)
    assert again["md5"] == md5 and server.hits["good"] == 1  # no request, no hashing
    monkeypatch.undo()

    stat = target.stat()  # touched, same bytes: hashed again, still no download, record refreshed
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    _fetch(server, "good", tmp_path, md5)
    assert server.hits["good"] == 1
    assert datasets.read_record(target)["mtime_ns"] == stat.st_mtime_ns + 10**9


def test_a_wrong_file_at_the_target_is_replaced(server, good_npz, tmp_path):
    (tmp_path / NAME).write_bytes(b"PK\x03\x04 not the right file")
    _fetch(server, "good", tmp_path, fileio.md5_file(good_npz))
    assert server.hits["good"] == 1 and (tmp_path / NAME).read_bytes() == good_npz.read_bytes()


def test_server_errors_are_retried_with_exponential_backoff(server, good_npz, tmp_path, monkeypatch):
    delays = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    record = _fetch(server, "flaky", tmp_path, fileio.md5_file(good_npz), tries=3, backoff=0.5)
    assert server.hits["flaky"] == 3 and delays == [0.5, 1.0]
    assert Path(record["path"]).read_bytes() == good_npz.read_bytes()


@pytest.mark.parametrize(
    "route, tries, hits, reason",
    [
        ("broken", 3, 3, "HTTP 500"),  # transient: every attempt is made
        ("cut", 2, 2, "closed after 64 of"),
        ("cut2", 2, 2, "closed after 2 of"),  # cut inside the zip magic: retried, not "not an npz"
        ("cut0", 2, 2, "closed after 0 of"),
        ("slow", 2, 2, "timed out"),
        ("html", 3, 1, "HTML page"),  # permanent: no second attempt
        ("disguised", 3, 1, "HTML page"),
        ("notzip", 3, 1, "not an npz file"),
        ("missing", 3, 1, "HTTP 404"),
        ("truncated", 3, 1, "its md5 is"),
    ],
)
def test_bad_responses_fail_cleanly(server, good_npz, tmp_path, route, tries, hits, reason):
    md5 = fileio.md5_file(good_npz)
    with pytest.raises(MedcliError) as caught:
        _fetch(server, route, tmp_path, md5, tries=tries, timeout=0.2)
    message = str(caught.value)
    assert caught.value.exit_code == 1 and "\n" not in message
    for part in (reason, f"{server.base}/{route}/{NAME}", md5, str(tmp_path / NAME), "--from"):
        assert part in message
    assert server.hits[route] == hits
    assert _left(tmp_path) == []  # nothing at the final path, no temporary file


def test_a_valid_npz_with_the_wrong_md5_is_rejected(server, tmp_path):
    with pytest.raises(MedcliError, match="its md5 is .*expected 0{32}"):
        _fetch(server, "good", tmp_path, "0" * 32)
    assert server.hits["good"] == 1 and _left(tmp_path) == []


def test_ctrl_c_during_a_download_exits_130_and_removes_the_partial_file(server, tmp_path):
    env = dict(os.environ, MEDCLI_MIRROR=f"{server.base}/stall", PYTHONPATH=str(REPO))
    # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it (a
    # CI run launched with `&` made this test hang): the child gets the default disposition,
    # as a command typed at a terminal has.
    proc = subprocess.Popen(
        [sys.executable, "-m", "medcli", "download", FLAG, "--root", str(tmp_path)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert server.stalled.wait(30), "the download never started"
        assert len(_left(tmp_path)) == 1  # the temporary file being written
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr
    assert _left(tmp_path) == []


# -- the command: downloads, imports, --list --------------------------------------------------


def test_cli_download_from_a_mirror_then_list_shows_it_official(server, good_npz, tmp_path, monkeypatch):
    """The official md5 is pretended to be the synthetic file's: the full official path runs."""
    md5 = fileio.md5_file(good_npz)
    monkeypatch.setattr(datasets, "official_source", lambda flag, size: ("https://zenodo.invalid/x", md5))
    env = {"MEDCLI_MIRROR": f"{server.base}/good"}
    for _ in range(2):
        result = runner.invoke(app, ["download", FLAG, "--root", str(tmp_path)], env=env)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip() == str((tmp_path / NAME).resolve())
    assert server.hits["good"] == 1
    listed = runner.invoke(app, ["download", "--list", "--json", "--root", str(tmp_path), FLAG])
    entry = json.loads(listed.stdout)[0]
    assert entry["files"]["28"]["status"] == "official" and entry["files"]["64"]["status"] == "missing"
    table = runner.invoke(app, ["download", "--list", "--root", str(tmp_path)])
    assert table.exit_code == 0 and "28 official" in table.stdout and "pathmnist" in table.stdout


def test_cli_offline_fails_with_one_actionable_line_and_no_file(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = runner.invoke(
        app, ["download", FLAG, "--root", str(tmp_path), "--mirror", f"http://127.0.0.1:{port}", "--tries", "1"]
    )
    assert result.exit_code == 1 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    for part in (f"http://127.0.0.1:{port}/{NAME}", OFFICIAL_MD5, str(tmp_path / NAME), "--from FILE"):
        assert part in errors[0]
    assert _left(tmp_path) == []


def _rewrite(source: Path, dest: Path, **changes) -> None:
    with np.load(source) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(changes)
    np.savez(dest, **arrays)


def _bad_files(good: Path, dest: Path, case: str) -> None:
    with np.load(good) as archive:
        images, labels = archive["train_images"], archive["train_labels"]
    if case == "not an npz":
        dest.write_text("hello")
    elif case == "wrong keys":
        np.savez(dest, images=images, labels=labels)
    elif case == "wrong dtype":
        _rewrite(good, dest, train_images=images.astype(np.float32))
    elif case == "labels out of range":
        _rewrite(good, dest, train_labels=np.full_like(labels, 8))
    elif case == "wrong channel count":
        _rewrite(good, dest, train_images=images[..., 0])
    elif case == "a split of another size":
        with np.load(good) as archive:
            _rewrite(good, dest, val_images=np.pad(archive["val_images"], ((0, 0), (0, 4), (0, 4), (0, 0))))
    elif case == "empty train split":
        _rewrite(good, dest, train_images=images[:0], train_labels=labels[:0])
    elif case == "two label columns":
        _rewrite(good, dest, test_labels=np.zeros((8, 2), dtype=labels.dtype))
    else:  # a valid file whose md5 is not the official one
        dest.write_bytes(good.read_bytes())


@pytest.mark.parametrize(
    "case, reason",
    [
        ("not an npz", "not a readable npz"),
        ("wrong keys", "lacks the keys"),
        ("wrong dtype", "expected uint8"),
        ("labels out of range", "expected 0..7"),
        ("wrong channel count", "3 channels"),
        ("empty train split", "train split has 0 images"),
        ("a split of another size", "val_images has shape (32, 32, 3), expected (28, 28, 3)"),
        ("two label columns", "test_labels has shape (8, 2), expected (8, 1)"),
        ("unofficial md5", "--allow-unofficial"),
    ],
)
def test_cli_import_refuses_bad_files_with_one_line(good_npz, tmp_path, case, reason):
    bad = tmp_path / "in.npz"
    _bad_files(good_npz, bad, case)
    root = tmp_path / "root"
    result = runner.invoke(app, ["download", FLAG, "--from", str(bad), "--root", str(root)])
    assert reason in one_line_error(result, 2)
    assert _left(root) == []


def test_cli_import_unofficial_then_list(good_npz, tmp_path):
    result = runner.invoke(
        app, ["download", FLAG, "-s", "28", "--from", str(good_npz), "--allow-unofficial", "--json", "--root", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    (record,) = json.loads(result.stdout)
    assert record["official"] is False and record["md5"] == fileio.md5_file(good_npz)
    assert record["source"] == str(good_npz.resolve())
    assert "16 train, 8 val, 8 test" in result.stderr
    assert Path(record["path"]).read_bytes() == good_npz.read_bytes()
    assert datasets.read_record(record["path"])["official"] is False
    listed = runner.invoke(app, ["download", "--list", "--json", "--root", str(tmp_path)])
    entry = next(e for e in json.loads(listed.stdout) if e["flag"] == FLAG)
    assert entry["files"]["28"]["status"] == "unofficial"


def test_cli_import_never_replaces_another_file_without_overwrite(good_npz, tmp_path):
    """Review: `--from` silently replaced an earlier import, a download or the embedded sample
    with a file of another md5. Refused in one line naming the file there; the same file again
    is accepted; --overwrite replaces it and says so."""
    first = runner.invoke(app, ["download", FLAG, "--from", str(good_npz), "--allow-unofficial", "--root", str(tmp_path)])
    assert first.exit_code == 0, first.output
    target = tmp_path / NAME
    before = target.read_bytes()
    other = datasets.make_synthetic(tmp_path / "src" / NAME, FLAG, SIZE, (16, 8, 8), seed=2)
    args = ["download", FLAG, "--from", str(other), "--allow-unofficial", "--root", str(tmp_path)]
    one_line_error(runner.invoke(app, args), 2, str(target), fileio.md5_file(good_npz), str(good_npz.resolve()),
                   fileio.md5_file(other), "--overwrite")
    assert target.read_bytes() == before and datasets.read_record(target)["source"] == str(good_npz.resolve())
    assert _left(tmp_path) == [NAME.replace(".npz", ".json"), NAME, "src"]  # no temporary file left
    same = runner.invoke(app, ["download", FLAG, "--from", str(good_npz), "--allow-unofficial", "--root", str(tmp_path)])
    assert same.exit_code == 0, same.output
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert target.read_bytes() == other.read_bytes() and "replacing" in replaced.stderr
    assert "--synthetic" in one_line_error(runner.invoke(app, ["download", FLAG, "--synthetic", "--overwrite",
                                                               "--root", str(tmp_path)]), 2)


def test_cli_import_never_replaces_the_embedded_sample_without_overwrite(good_npz, tmp_path):
    assert runner.invoke(app, ["download", FLAG, "--sample", "--root", str(tmp_path)]).exit_code == 0
    sample_root = tmp_path / datasets.SAMPLE_DIR
    result = runner.invoke(app, ["download", FLAG, "--from", str(good_npz), "--allow-unofficial",
                                 "--root", str(sample_root)])
    one_line_error(result, 2, str(sample_root / NAME), download.SAMPLE_MD5, "embedded sample", "--overwrite")
    assert fileio.md5_file(sample_root / NAME) == download.SAMPLE_MD5


def test_sample_never_replaces_another_file_in_root_sample_without_overwrite(good_npz, tmp_path):
    """Review: `--sample` copied the embedded sample over whatever ROOT/sample held (here a file
    the user imported there), without a word."""
    sample_root = tmp_path / datasets.SAMPLE_DIR
    imported = runner.invoke(app, ["download", FLAG, "--from", str(good_npz), "--allow-unofficial",
                                   "--root", str(sample_root)])
    assert imported.exit_code == 0, imported.output
    mine = (sample_root / NAME).read_bytes()
    result = runner.invoke(app, ["download", FLAG, "--sample", "--root", str(tmp_path)])
    one_line_error(result, 2, str(sample_root / NAME), f"md5 {fileio.md5_file(good_npz)}", "--overwrite")
    assert (sample_root / NAME).read_bytes() == mine
    replaced = runner.invoke(app, ["download", FLAG, "--sample", "--overwrite", "--root", str(tmp_path)])
    assert replaced.exit_code == 0, replaced.output
    assert fileio.md5_file(sample_root / NAME) == download.SAMPLE_MD5 and "replacing" in replaced.stderr


def test_list_shows_the_embedded_sample_as_a_sample(tmp_path):
    """Review: --list called the embedded sample "unofficial: imported with --allow-unofficial"."""
    assert runner.invoke(app, ["download", FLAG, "--sample", "--root", str(tmp_path)]).exit_code == 0
    sample_root = str(tmp_path / datasets.SAMPLE_DIR)
    listed = runner.invoke(app, ["download", "--list", "--json", "--root", sample_root, FLAG])
    assert json.loads(listed.stdout)[0]["files"]["28"]["status"] == "sample"
    table = runner.invoke(app, ["download", "--list", "--root", sample_root], terminal_width=200)
    assert table.exit_code == 0 and "28 sample" in table.stdout and "28 unofficial" not in table.stdout
    assert "sample: the embedded" in " ".join(table.stdout.split())


def test_list_tells_synthetic_unrecorded_and_changed_files_apart(tmp_path):
    datasets.make_synthetic(tmp_path / "dermamnist_64.npz", "dermamnist", 64, (4, 2, 2))
    datasets.make_synthetic(tmp_path / "breastmnist.npz", "breastmnist", 28, (4, 2, 2))
    datasets.record_path(tmp_path / "breastmnist.npz").unlink()
    changed = datasets.make_synthetic(tmp_path / NAME, FLAG, SIZE, (4, 2, 2))
    with open(changed, "ab") as handle:
        handle.write(b"x")
    result = runner.invoke(app, ["download", "--list", "--json", "--root", str(tmp_path), "dermamnist", "breastmnist", FLAG])
    status = {e["flag"]: {s: f["status"] for s, f in e["files"].items() if f["status"] != "missing"}
              for e in json.loads(result.stdout)}
    assert status == {"dermamnist": {"64": "synthetic"}, "breastmnist": {"28": "unverified"}, FLAG: {"28": "mismatch"}}


@pytest.mark.parametrize(
    "args, reason",
    [
        ([], "name at least one dataset"),
        ([FLAG, "--size", "32"], "not a MedMNIST size"),
        (["nosuchmnist"], "'nosuchmnist' is not a MedMNIST 2D dataset; (one of: pathmnist,"),
        (["organmnist3d"], "'organmnist3d' is a 3D MedMNIST dataset; medcli trains on the 2D ones"),
        ([FLAG, "--size", "all", "--from", "x.npz"], "exactly one dataset and one --size"),
        ([FLAG, "--allow-unofficial"], "only to --from"),
        (["pathmnist", "--sample"], "bloodmnist sample at 28 px only"),
        ([FLAG, "--size", "64", "--sample"], "bloodmnist sample at 28 px only"),
        ([FLAG, "--sample", "--synthetic"], "pass one of them"),
    ],
)
def test_cli_usage_errors(tmp_path, args, reason):
    result = runner.invoke(app, ["download", *args, "--root", str(tmp_path)])
    assert reason in one_line_error(result, 2)


# -- the real PBC-derived BloodMNIST file (skips without ../shared) ---------------------------


@pytest.mark.realdata
def test_real_bloodmnist_import(shared_data, tmp_path):
    source = shared_data / "bloodmnist_pbc_28.npz"
    refused = runner.invoke(app, ["download", FLAG, "--from", str(source), "--root", str(tmp_path)])
    assert OFFICIAL_MD5 in one_line_error(refused, 2)
    assert _left(tmp_path) == []
    result = runner.invoke(app, ["download", FLAG, "--from", str(source), "--allow-unofficial", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["download", "--list", "--json", "--root", str(tmp_path), FLAG])
    file = json.loads(listed.stdout)[0]["files"]["28"]
    assert file["status"] == "unofficial"
    assert file["n_samples"] == {"train": 11959, "val": 1712, "test": 3421}


def test_cli_synthetic_writes_a_labelled_learnable_set_and_never_overwrites_real_data(good_npz, tmp_path):
    result = runner.invoke(app, ["download", "breastmnist", "--synthetic", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)[0]
    assert record["synthetic"] is True and record["official"] is False
    assert datasets.validate_npz(record["path"], "breastmnist", 28) == dict(zip(datasets.SPLITS, download.SYNTHETIC_SPLITS))
    splits = datasets.load(tmp_path / datasets.SYNTHETIC_DIR, "breastmnist", 28)
    assert set(np.unique(splits.labels["train"])) == {0, 1}
    # A real (imported) file is never replaced by synthetic data.
    synthetic_dir = tmp_path / datasets.SYNTHETIC_DIR
    real = runner.invoke(app, ["download", "bloodmnist", "--from", str(good_npz), "--allow-unofficial", "--root", str(synthetic_dir)])
    assert real.exit_code == 0, real.output
    before = (synthetic_dir / "bloodmnist.npz").read_bytes()
    assert "(real data?)" in one_line_error(runner.invoke(app, ["download", "bloodmnist", "--synthetic", "--root", str(tmp_path)]), 2)
    assert (synthetic_dir / "bloodmnist.npz").read_bytes() == before


# -- the embedded sample ---------------------------------------------------------------------


def test_cli_sample_places_real_images_apart_from_the_official_file_offline(tmp_path):
    """`download bloodmnist --sample` needs no network: the package's own file, checked by its
    md5 and layout, lands in ROOT/sample/ (never the official path), recorded as a sample."""
    result = runner.invoke(app, ["download", FLAG, "--sample", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)[0]
    assert Path(record["path"]) == tmp_path / datasets.SAMPLE_DIR / NAME and not (tmp_path / NAME).exists()
    assert record["sample"] is True and record["official"] is False and record["synthetic"] is False
    assert record["md5"] == download.SAMPLE_MD5 == fileio.md5_file(download.SAMPLE_FILE)
    assert record["n_samples"] == dict(zip(datasets.SPLITS, download.SAMPLE_SPLITS))
    assert "CC BY 4.0" in record["licence"] and "Acevedo" in record["source"]
    assert download.SAMPLE_FILE.stat().st_size <= 6_000_000
    splits = datasets.load(tmp_path / datasets.SAMPLE_DIR, FLAG, SIZE)
    counts = np.bincount(splits.labels["test"], minlength=8)
    assert (counts > 0).all() and counts.sum() == download.SAMPLE_SPLITS[2]  # every class, stratified
    again = runner.invoke(app, ["download", FLAG, "--sample", "--root", str(tmp_path)])
    assert again.exit_code == 0 and "already" in again.stderr


def test_a_missing_dataset_names_the_stand_ins_beside_it(tmp_path):
    """After the offline main job (the sample in ROOT/sample), training on ROOT says where the
    data it used is and how to get the real file, instead of only suggesting a download that
    fails offline."""
    assert runner.invoke(app, ["download", FLAG, "--sample", "--root", str(tmp_path)]).exit_code == 0
    result = runner.invoke(app, ["train", "--root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")])
    line = one_line_error(result, 2, f"--root {tmp_path / datasets.SAMPLE_DIR}", "--from FILE", "--sample", "--synthetic")
    assert "embedded PBC sample" in line


def test_a_missing_size_names_the_size_there_and_never_nests_stand_in_folders(tmp_path):
    """Review: after `download --synthetic --size 64`, training at 28 px on ROOT/synthetic said
    to run `download --root ROOT/synthetic` (which writes ROOT/synthetic/synthetic/) and never
    that the file there is the 64-px one."""
    assert runner.invoke(app, ["download", FLAG, "--synthetic", "--size", "64", "--root", str(tmp_path)]).exit_code == 0
    folder = tmp_path / datasets.SYNTHETIC_DIR
    result = runner.invoke(app, ["train", "--root", str(folder), "--runs-dir", str(tmp_path / "runs")])
    line = one_line_error(result, 2, f"no {FLAG} at 28 px under {folder}", f"it holds {FLAG} at 64 px (pass --size 64)",
                          f"'medcli download {FLAG} --size 28 --root {tmp_path}' (then train with --root {tmp_path})")
    assert f"--root {folder}'" not in line


def test_an_imported_copy_of_synthetic_data_stays_synthetic(tmp_path):
    made = runner.invoke(app, ["download", "breastmnist", "--synthetic", "--root", str(tmp_path / "a"), "--json"])
    source = json.loads(made.stdout)[0]["path"]
    result = runner.invoke(app, ["download", "breastmnist", "--from", source, "--allow-unofficial",
                                 "--root", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)[0]
    assert record["synthetic"] is True and record["signal_box"] == json.loads(made.stdout)[0]["signal_box"]


# -- review: mirrors, damaged archives, read-only roots, stale records, leftovers ------------


@pytest.mark.parametrize("mirror", ["myhost/medmnist", "localhost:8765/good", "http://[::1/good"])
def test_a_mirror_that_is_not_a_url_is_one_usage_line_without_retries(tmp_path, mirror, monkeypatch):
    delays = []
    monkeypatch.setattr(download.time, "sleep", delays.append)
    result = runner.invoke(app, ["download", FLAG, "--root", str(tmp_path), "--mirror", mirror])
    one_line_error(result, 2, mirror, "--mirror")
    assert delays == [] and _left(tmp_path) == []


def _damaged_deflate(good: Path, dest: Path) -> None:
    """A compressed npz whose train_images stream is corrupt but whose zip directory is intact."""
    import zipfile

    with np.load(good) as archive:
        np.savez_compressed(dest, **{key: archive[key] for key in archive.files})
    data = bytearray(dest.read_bytes())
    with zipfile.ZipFile(dest) as archive:
        info = archive.getinfo("train_images.npy")
    name_len, extra_len = np.frombuffer(bytes(data[info.header_offset + 26:info.header_offset + 30]), "<u2")
    start = info.header_offset + 30 + int(name_len) + int(extra_len)  # the local header's own lengths
    for k in range(start + 2, start + 12):
        data[k] ^= 0xFF
    dest.write_bytes(bytes(data))


def test_a_corrupt_compressed_member_is_one_line_on_import_and_load(good_npz, tmp_path):
    bad = tmp_path / "bad.npz"
    _damaged_deflate(good_npz, bad)
    result = runner.invoke(app, ["download", FLAG, "--from", str(bad), "--allow-unofficial", "--root", str(tmp_path / "r")])
    one_line_error(result, 2, "not a readable npz")
    root = tmp_path / "root"
    root.mkdir()
    (root / NAME).write_bytes(bad.read_bytes())  # placed by hand: no import checked it
    for mapped in (False, None):
        with pytest.raises(MedcliError, match="get a fresh copy"):
            datasets.load(root, FLAG, SIZE, mapped=mapped)


def test_a_verified_file_in_a_read_only_root_is_used_without_a_record(server, good_npz, tmp_path, monkeypatch):
    """Review: the file is there with the right md5, but the root is read-only: its record
    cannot be written, which is no reason to fail (datasets.resolve carries on the same way)."""
    md5 = fileio.md5_file(good_npz)
    (tmp_path / NAME).write_bytes(good_npz.read_bytes())

    def read_only(path, record):
        raise MedcliError(f"cannot write {path}: Read-only file system")

    monkeypatch.setattr(datasets, "write_record", read_only)
    record = _fetch(server, "good", tmp_path, md5)
    assert record["md5"] == md5 and server.hits["good"] == 0


@pytest.mark.parametrize("mode", [["--sample"], ["--synthetic"], ["--from", "GOOD", "--allow-unofficial"], []])
def test_a_root_that_is_a_file_is_named_as_such(good_npz, tmp_path, mode):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = [str(good_npz) if arg == "GOOD" else arg for arg in mode]
    result = runner.invoke(app, ["download", FLAG, *args, "--root", str(blocker)])
    one_line_error(result, 2, f"--root {blocker} is a file")
    assert blocker.read_text() == "not a folder"


def test_synthetic_data_goes_to_its_own_folder_and_a_stale_record_never_hides_real_data(good_npz, tmp_path):
    """--synthetic writes ROOT/synthetic/ (as --sample writes ROOT/sample/), never the official
    file's path; and real bytes copied over a synthetic file are not overwritten because its
    old record still says synthetic."""
    result = runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    target = tmp_path / datasets.SYNTHETIC_DIR / NAME
    assert Path(json.loads(result.stdout)[0]["path"]) == target and not (tmp_path / NAME).exists()
    target.write_bytes(good_npz.read_bytes())  # the user puts real data there; the record stays
    line = one_line_error(runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path)]), 2)
    assert "(real data?)" in line and target.read_bytes() == good_npz.read_bytes()


def test_a_synthetic_set_is_never_left_without_the_record_that_says_so(tmp_path, monkeypatch):
    """Review: a disk full (or a stop) after the synthetic npz was renamed into place and before
    its record was written left a file that then passed for real data, and `--synthetic` then
    refused to write it again."""
    real_write = datasets.write_record
    monkeypatch.setattr(datasets, "write_record",
                        lambda *args: (_ for _ in ()).throw(MedcliError("writing the record failed (No space left)")))
    one_line_error(runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path)]), 1, "No space left")
    assert not (tmp_path / datasets.SYNTHETIC_DIR / NAME).exists()
    monkeypatch.setattr(datasets, "write_record", real_write)
    result = runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["synthetic"] is True
    assert datasets.resolve(tmp_path / datasets.SYNTHETIC_DIR, FLAG, SIZE)[1]["synthetic"] is True


def test_an_older_synthetic_set_made_again_is_never_left_with_the_new_ones_record(tmp_path, monkeypatch):
    """Self-review: with the record written first, a stop before the new set was renamed into
    place left the older set (other split sizes) beside the new set's record: an md5 mismatch,
    so the older set was then recorded as unofficial real data."""
    target = tmp_path / datasets.SYNTHETIC_DIR / NAME
    datasets.make_synthetic(target, FLAG, SIZE, (16, 8, 8), seed=0)  # an older medcli's stand-in
    real_write = datasets.write_record

    def stopped_after_the_record(npz, record):
        real_write(npz, record)
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "write_record", stopped_after_the_record)
    assert runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path)]).exit_code == 130
    assert not target.exists()  # no file: the next call writes it; never the old one under the new record
    monkeypatch.setattr(datasets, "write_record", real_write)
    assert runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path)]).exit_code == 0
    assert datasets.resolve(target.parent, FLAG, SIZE)[1]["synthetic"] is True


@pytest.mark.parametrize("mode", ["--sample", "--synthetic"])
def test_a_stand_in_already_there_is_used_on_a_read_only_root_and_not_made_again(tmp_path, monkeypatch, mode):
    """Review: `--sample` and `--synthetic` refused a read-only root where the verified file
    already was (the plain download used it), and `--synthetic` made the set again each time
    (42 s and 1.9 GB at 224 px)."""
    first = runner.invoke(app, ["download", FLAG, mode, "--root", str(tmp_path), "--json"])
    assert first.exit_code == 0, first.output
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if str(tmp_path) in str(path) and mode & os.W_OK
                        else real_access(path, mode, *a, **k))  # the root mounted read-only
    monkeypatch.setattr(datasets, "make_synthetic", lambda *a, **k: pytest.fail("made again"))
    again = runner.invoke(app, ["download", FLAG, mode, "--root", str(tmp_path), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == json.loads(first.stdout) and "already" in again.stderr


def test_a_fortran_ordered_import_trains_as_it_imports(good_npz, tmp_path):
    """Arrays saved from scipy.io.loadmat are Fortran-ordered: the import accepted them but
    training's chunked reader refused them with 're-download it'."""
    with np.load(good_npz) as archive:
        arrays = {key: np.asfortranarray(archive[key]) for key in archive.files}
    src = tmp_path / "fortran.npz"
    np.savez(src, **arrays)
    root = tmp_path / "root"
    assert runner.invoke(app, ["download", FLAG, "--from", str(src), "--allow-unofficial", "--root", str(root)]).exit_code == 0
    plain, training = datasets.load(root, FLAG, SIZE, mapped=False), datasets.load(root, FLAG, SIZE, mapped=None)
    for split in datasets.SPLITS:
        np.testing.assert_array_equal(training.images[split], plain.images[split])
        np.testing.assert_array_equal(training.images[split], arrays[f"{split}_images"])
        np.testing.assert_array_equal(training.labels[split], plain.labels[split])


def test_a_successful_download_removes_what_a_killed_one_left(server, good_npz, tmp_path):
    """Review: a killed download's temporary file younger than 10 minutes was kept as maybe a
    running download's, and then for good (a later call found the file present and looked no
    further). Its writer's lock tells: a killed writer's file goes once it is a minute old (a
    lock taken on another host of a shared file system may not show), a live one's stays."""
    minutes_ago = (time.time() - 120,) * 2
    leftover = tmp_path / f".{NAME}.abc123.tmp.npz"  # what atomic_path leaves when kill -9 stops a write
    leftover.write_bytes(b"PK\x03\x04 half a file")
    os.utime(leftover, minutes_ago)
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_path(tmp_path / NAME) as concurrent:  # another download at work, stalled
            concurrent.write_bytes(b"PK")
            os.utime(concurrent, minutes_ago)
            _fetch(server, "good", tmp_path, fileio.md5_file(good_npz))
            assert _left(tmp_path) == sorted([concurrent.name, NAME.replace(".npz", ".json"), NAME])
            leftover.write_bytes(b"PK\x03\x04 another killed write")
            _fetch(server, "good", tmp_path, fileio.md5_file(good_npz))  # a moment old: it stays
            assert leftover.exists()
            os.utime(leftover, minutes_ago)
            _fetch(server, "good", tmp_path, fileio.md5_file(good_npz))  # present: still looked at
            assert not leftover.exists() and concurrent.exists() and server.hits["good"] == 1
            raise KeyboardInterrupt  # the other download is stopped
    assert _left(tmp_path) == sorted([NAME.replace(".npz", ".json"), NAME])


def test_a_writer_killed_mid_write_leaves_a_file_known_as_abandoned(tmp_path):
    target = tmp_path / NAME
    code = ("import sys, time; from medcli import fileio\n"
            "with fileio.atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.write_bytes(b'PK half'); print('writing', flush=True); time.sleep(60)\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        (partial,) = fileio.partial_files(target)
        assert fileio.abandoned_partials(target) == []  # its writer is at work
    finally:
        writer.kill()
        writer.wait()
    os.utime(partial, (time.time() - 120,) * 2)
    assert fileio.abandoned_partials(target) == [partial]  # kill -9: the file stays, its lock is gone


def test_a_file_whose_name_is_near_the_limit_is_written_and_its_partials_found(tmp_path):
    """Review: a legal 249-character --out name failed after all the work: the temporary file's
    name (".<name>.XXXXXXXX.tmp<suffix>") passed the 255-byte limit."""
    target = tmp_path / ("é" * 60 + "a" * 120 + ".csv")  # 245 bytes
    assert fileio.write_text(target, "x").read_text() == "x" and fileio.partial_files(target) == []
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_path(target) as tmp:
            assert fileio.partial_files(target) == [tmp]
            raise KeyboardInterrupt


@pytest.mark.parametrize("mode", [0o640, 0o444])
def test_a_file_written_again_keeps_its_mode(tmp_path, mode):
    """Review: writing a manifest (or any file) again reset a mode the user had set (0444 to
    0644); and a read-only mode must not stop the writer of the new file (checked as another
    user when this runs as root: root writes anything)."""
    root = os.geteuid() == 0
    with shared_folder() if root else contextlib.nullcontext(tmp_path) as folder:
        target = fileio.write_text(folder / "manifest.json", "{}")
        os.chmod(target, mode)
        if root:
            os.chmod(folder, 0o777)
            nobody = as_nobody(f"from medcli import fileio; fileio.write_text({str(target)!r}, '{{ }}')")
            assert nobody.returncode == 0, nobody.stderr
        else:
            fileio.write_text(target, "{ }")
        assert target.stat().st_mode & 0o777 == mode and target.read_text() == "{ }"


def test_progress_bars_stay_off_when_stderr_is_not_a_terminal_even_with_force_color(monkeypatch):
    from medcli import console

    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setattr(console, "_console", None, raising=False)
    assert not console.progress_enabled()


def test_a_present_file_needs_no_mirror_and_left_temporaries_that_cannot_go_are_no_error(server, good_npz, tmp_path,
                                                                                        monkeypatch):
    """Review of the fixes: a bad $MEDCLI_MIRROR failed even with every file present; on a
    read-only root removing a killed download's temporary file escaped as an OSError."""
    md5 = fileio.md5_file(good_npz)
    (tmp_path / NAME).write_bytes(good_npz.read_bytes())
    record = download.fetch(FLAG, SIZE, tmp_path, mirror="mirror.example.org/medmnist", md5=md5)
    assert record["md5"] == md5
    leftover = tmp_path / f".{NAME}.abc123.tmp.npz"
    leftover.write_bytes(b"PK")
    os.utime(leftover, (time.time() - 3600,) * 2)
    os.utime(tmp_path / NAME)  # touched: hashed and recorded again, then the leftovers are looked at
    real_unlink = Path.unlink

    def read_only(path, *args, **kwargs):
        if path.name.endswith(".tmp.npz"):
            raise OSError(30, "Read-only file system")
        return real_unlink(path, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", read_only)
    assert _fetch(server, "good", tmp_path, md5)["md5"] == md5 and leftover.exists() and server.hits["good"] == 0


def test_list_shows_the_stand_ins_beside_the_official_files_and_every_task_name(tmp_path):
    """Review: after `download --sample` (or --synthetic), `--list` on the same root showed the
    dataset as missing, and the task column cut "ordinal-regression" to "ordinal-reg…"."""
    for mode in ("--sample", "--synthetic"):
        assert runner.invoke(app, ["download", FLAG, mode, "--root", str(tmp_path)]).exit_code == 0
    listed = runner.invoke(app, ["download", "--list", "--json", "--root", str(tmp_path), FLAG])
    entry = json.loads(listed.stdout)[0]
    assert [(f["folder"], f["status"], f["size"]) for f in entry["stand_ins"]] == [("sample", "sample", 28),
                                                                                  ("synthetic", "synthetic", 28)]
    assert entry["files"]["28"]["status"] == "missing"  # the official path itself holds nothing
    table = runner.invoke(app, ["download", "--list", "--root", str(tmp_path)], env={"COLUMNS": "80"})
    assert "28 sample/" in table.stdout and "28 synthetic/" in table.stdout
    assert "…" not in table.stdout and "regression" in table.stdout and max(map(len, table.stdout.splitlines())) <= 80
    datasets.record_path(tmp_path / datasets.SYNTHETIC_DIR / NAME).unlink()  # a stand-in whose record is gone
    table = runner.invoke(app, ["download", "--list", "--root", str(tmp_path)], env={"COLUMNS": "80"})
    assert "no record" in [line.strip() for line in table.stdout.splitlines()]  # the cell's own line, not cut
    assert max(map(len, table.stdout.splitlines())) <= 80


@pytest.mark.parametrize("mode, folder", [("--sample", datasets.SAMPLE_DIR), ("--synthetic", datasets.SYNTHETIC_DIR)])
def test_a_stand_in_folder_that_is_a_file_is_named(tmp_path, mode, folder):
    """Review: with ROOT/synthetic a file, --synthetic said "cannot write ROOT/synthetic/
    bloodmnist.npz: File exists", as if the dataset file were in the way."""
    (tmp_path / folder).write_text("a file")
    one_line_error(runner.invoke(app, ["download", FLAG, mode, "--root", str(tmp_path)]), 2,
                   f"{tmp_path / folder} is a file, not a folder")


# -- review of download edge cases ------------------------------------------------------------


def test_a_body_cut_off_without_a_length_is_retried_not_called_a_wrong_md5(server, good_npz, tmp_path, capsys):
    """Review: a server that sends no Content-Length and drops the connection halfway gave one
    attempt and "its md5 is ..., expected ...". The cut-off file is no complete zip: retried."""
    record = _fetch(server, "nolength", tmp_path, fileio.md5_file(good_npz), tries=2)
    assert server.hits["nolength"] == 2 and (tmp_path / NAME).read_bytes() == good_npz.read_bytes()
    assert record["md5"] == fileio.md5_file(good_npz)
    assert "before the end of the file" in capsys.readouterr().err


def test_a_download_never_replaces_an_imported_file_without_overwrite(server, good_npz, tmp_path, monkeypatch):
    """Review: a plain `download` replaced a file the user had imported with --allow-unofficial
    (only an info line); runs trained on it were then evaluated on other data."""
    other = datasets.make_synthetic(tmp_path / "src" / NAME, FLAG, SIZE, (16, 8, 8), seed=2)
    root = tmp_path / "root"
    imported = runner.invoke(app, ["download", FLAG, "--from", str(other), "--allow-unofficial", "--root", str(root)])
    assert imported.exit_code == 0, imported.output
    md5 = fileio.md5_file(good_npz)
    monkeypatch.setattr(datasets, "official_source", lambda flag, size: ("https://zenodo.invalid/x", md5))
    args = ["download", FLAG, "--root", str(root), "--mirror", f"{server.base}/good"]
    one_line_error(runner.invoke(app, args), 2, str(root / NAME), "holds another bloodmnist file",
                   fileio.md5_file(other), "--overwrite")
    assert (root / NAME).read_bytes() == other.read_bytes() and server.hits["good"] == 0
    replaced = runner.invoke(app, [*args, "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert (root / NAME).read_bytes() == good_npz.read_bytes() and datasets.read_record(root / NAME)["official"]


@pytest.mark.parametrize("how", ["imported in place", "placed by hand and used", "placed by hand"])
def test_a_download_never_replaces_a_readable_file_in_place_without_overwrite(server, good_npz, tmp_path, monkeypatch,
                                                                               how):
    """Review: a file imported where it already was (`--from ROOT/bloodmnist.npz`) or placed by
    hand (recorded when a run was trained on it, under a relative --root from another folder)
    has itself as its source, so it did not count as imported on purpose and a plain
    `download` replaced it. Any readable file of the dataset stays without --overwrite."""
    root = tmp_path / "root"
    other = datasets.make_synthetic(tmp_path / "src" / NAME, FLAG, SIZE, (16, 8, 8), seed=2)
    (root).mkdir()
    os.replace(other, root / NAME)
    datasets.record_path(other).unlink()
    if how == "imported in place":
        result = runner.invoke(app, ["download", FLAG, "--from", str(root / NAME), "--allow-unofficial",
                                     "--root", str(root)])
        assert result.exit_code == 0, result.output
    elif how == "placed by hand and used":
        monkeypatch.chdir(tmp_path)
        datasets.resolve("root", FLAG, SIZE)  # as `evaluate --root root` records it
        monkeypatch.chdir(root)
    md5 = fileio.md5_file(good_npz)
    monkeypatch.setattr(datasets, "official_source", lambda flag, size: ("https://zenodo.invalid/x", md5))
    before = (root / NAME).read_bytes()
    one_line_error(runner.invoke(app, ["download", FLAG, "--root", str(root), "--mirror", f"{server.base}/good"]), 2,
                   "holds another bloodmnist file", "--overwrite")
    assert (root / NAME).read_bytes() == before and server.hits["good"] == 0


def test_a_damaged_file_in_place_is_downloaded_over(server, good_npz, tmp_path, monkeypatch):
    root = tmp_path / "root"
    root.mkdir()
    (root / NAME).write_bytes(good_npz.read_bytes()[: good_npz.stat().st_size // 2])  # cut short
    md5 = fileio.md5_file(good_npz)
    monkeypatch.setattr(datasets, "official_source", lambda flag, size: ("https://zenodo.invalid/x", md5))
    result = runner.invoke(app, ["download", FLAG, "--root", str(root), "--mirror", f"{server.base}/good"])
    assert result.exit_code == 0, result.output
    assert (root / NAME).read_bytes() == good_npz.read_bytes()


def test_list_refuses_a_file_as_root(tmp_path):
    """Review: `--list --root FILE` printed an empty table and exit 0."""
    path = datasets.make_synthetic(tmp_path / NAME, FLAG, SIZE, (16, 8, 8), seed=2)
    one_line_error(runner.invoke(app, ["download", "--list", "--root", str(path)]), 2, "is a file",
                   f"--root {tmp_path}")


def test_a_changed_file_drops_the_cache_of_its_old_content(good_npz, tmp_path, monkeypatch):
    """Review: the uncompressed cache of a replaced file stayed until a cached training run
    (gigabytes at 224 px). Recording the new content removes the old cache."""
    monkeypatch.setenv("MEDCLI_DATA_CACHE", "always")
    path = datasets.make_synthetic(tmp_path / NAME, FLAG, SIZE, (16, 8, 8), seed=1)
    splits = datasets.load(tmp_path, FLAG, SIZE, mapped=True)
    old = splits.cache
    assert old is not None and old.is_dir()
    datasets.make_synthetic(tmp_path / "new" / NAME, FLAG, SIZE, (16, 8, 8), seed=2)
    os.replace(tmp_path / "new" / NAME, path)
    _, record = datasets.resolve(tmp_path, FLAG, SIZE)
    assert record["md5"] == fileio.md5_file(path) and not old.exists()


def test_a_folder_given_to_from_is_named_a_folder(tmp_path):
    (tmp_path / "folder").mkdir()
    one_line_error(runner.invoke(app, ["download", FLAG, "--from", str(tmp_path / "folder"), "--allow-unofficial",
                                       "--root", str(tmp_path / "root")]), 2, "is a folder")


def test_a_missing_file_on_a_file_mirror_is_not_retried(tmp_path, monkeypatch):
    """Review: a file:// mirror without the file was retried with back-off, as a network error."""
    monkeypatch.setattr(download.time, "sleep", lambda s: pytest.fail("retried a missing local file"))
    with pytest.raises(MedcliError, match="did not give a valid"):
        download.fetch(FLAG, SIZE, tmp_path / "root", mirror=(tmp_path / "nomirror").as_uri(), tries=3)


def test_several_files_one_failing_still_fetches_and_prints_the_others(server, good_npz, tmp_path, monkeypatch):
    """Review: `download pathmnist bloodmnist` stopped at the first failure and printed nothing,
    though other files were (or could have been) saved."""
    md5 = fileio.md5_file(good_npz)
    monkeypatch.setattr(datasets, "official_source",
                        lambda flag, size: ("https://zenodo.invalid/x", md5 if flag == FLAG else "0" * 32))
    result = runner.invoke(app, ["download", "pathmnist", FLAG, "--tries", "1", "--root", str(tmp_path),
                                 "--mirror", f"{server.base}/good"])
    assert result.exit_code == 1
    assert result.stdout.strip() == str((tmp_path / NAME).resolve())
    assert "pathmnist.npz" in result.stderr and "1 of 2 files not downloaded" in result.stderr
    assert (tmp_path / NAME).read_bytes() == good_npz.read_bytes() and not (tmp_path / "pathmnist.npz").exists()


def test_a_folder_at_the_target_is_refused_before_any_transfer(server, good_npz, tmp_path):
    (tmp_path / NAME).mkdir()
    with pytest.raises(UsageError, match="is a folder, where the dataset file goes"):
        _fetch(server, "good", tmp_path, fileio.md5_file(good_npz))
    assert server.hits["good"] == 0


def test_a_failed_download_still_removes_what_a_killed_one_left(server, tmp_path):
    """Review: old temporary files were removed only after a successful write of the same file."""
    tmp_path.mkdir(exist_ok=True)
    leftover = tmp_path / f".{NAME}.abc123.tmp.npz"
    leftover.write_bytes(b"PK\x03\x04 half a file")
    os.utime(leftover, (time.time() - 3600,) * 2)
    with pytest.raises(MedcliError):
        _fetch(server, "missing", tmp_path, "0" * 32)
    assert not leftover.exists()


def test_a_file_medcli_only_hashed_is_downloaded_over_with_overwrite(server, good_npz, tmp_path):
    """A file placed by hand (or by the medmnist package) gets a record from `resolve` with
    itself as its source; runs may have been trained on it, so only --overwrite replaces it."""
    other = datasets.make_synthetic(tmp_path / "src" / NAME, FLAG, SIZE, (16, 8, 8), seed=2)
    datasets.record_path(other).unlink()
    (tmp_path / NAME).write_bytes(other.read_bytes())
    datasets.resolve(tmp_path, FLAG, SIZE)
    assert datasets.read_record(tmp_path / NAME)["official"] is False
    with pytest.raises(UsageError, match="holds another bloodmnist file"):
        _fetch(server, "good", tmp_path, fileio.md5_file(good_npz))
    _fetch(server, "good", tmp_path, fileio.md5_file(good_npz), overwrite=True)
    assert (tmp_path / NAME).read_bytes() == good_npz.read_bytes()


def test_one_files_usage_error_does_not_stop_the_others(server, good_npz, tmp_path, monkeypatch):
    """Review of the session's diff: a file imported on purpose (a UsageError) stopped a
    download of several files and hid the paths saved."""
    md5 = fileio.md5_file(good_npz)
    other = datasets.make_synthetic(tmp_path / "src" / "pathmnist.npz", "pathmnist", SIZE, (16, 8, 8), seed=2)
    imported = runner.invoke(app, ["download", "pathmnist", "--from", str(other), "--allow-unofficial",
                                   "--root", str(tmp_path)])
    assert imported.exit_code == 0, imported.output
    monkeypatch.setattr(datasets, "official_source", lambda flag, size: ("https://zenodo.invalid/x", md5))
    result = runner.invoke(app, ["download", "pathmnist", FLAG, "--root", str(tmp_path),
                                 "--mirror", f"{server.base}/good"])
    assert result.exit_code == 2 and result.stdout.strip() == str((tmp_path / NAME).resolve())
    assert "holds another pathmnist file" in result.stderr and "1 of 2 files not downloaded" in result.stderr


def test_the_list_is_never_cut_at_a_narrow_terminal(tmp_path):
    """Review: at 40 columns `download --list` cut every number ("89…", "7,…"); the table runs
    past a narrow terminal instead, as aggregate's does."""
    table = runner.invoke(app, ["download", "--list", "--root", str(tmp_path)], env={"COLUMNS": "40"})
    assert table.exit_code == 0, table.output
    assert "…" not in table.stdout
    for flag in ("pathmnist", "organsmnist"):
        counts = [f"{n:,}" for n in datasets.info(flag)["n_samples"].values()]
        row = next(line for line in table.stdout.splitlines() if line.strip().startswith(flag))
        assert all(count in row for count in counts), row


def test_odd_sizes_sources_and_mirrors_are_one_line_usage_errors(tmp_path):
    """Review: `--size ²` (a digit to str.isdigit, not to int) was an "unexpected ValueError";
    `--from` a FIFO or a device "does not exist"; a mirror with "user:secret@" failed as an
    unknown host, was retried and printed the secret."""
    size = runner.invoke(app, ["download", FLAG, "--synthetic", "--size", "\u00b2", "--root", str(tmp_path)])
    assert size.exit_code == 2 and "is not a MedMNIST size" in size.stderr, size.output
    fifo = tmp_path / "data.npz"
    os.mkfifo(fifo)
    source = runner.invoke(app, ["download", FLAG, "--from", str(fifo), "--root", str(tmp_path / "r")])
    assert source.exit_code == 2 and f"{fifo} is not a regular file" in source.stderr, source.output
    mirror = runner.invoke(app, ["download", FLAG, "--root", str(tmp_path / "r"), "--tries", "1",
                                 "--mirror", "http://user:s3cret@127.0.0.1:9/files"])
    assert mirror.exit_code == 2 and "holds a user name or password" in mirror.stderr, mirror.output
    assert "s3cret" not in mirror.output
    for bad in ("sftp://me:s3cret@host/files", "me:s3cret@host/files"):  # review: the scheme's error printed it
        other = runner.invoke(app, ["download", FLAG, "--root", str(tmp_path / "r"), "--mirror", bad])
        assert other.exit_code == 2 and "s3cret" not in other.output, other.output


def test_a_synthetic_set_cleans_up_what_a_killed_write_of_it_left(tmp_path):
    """Review: a `--synthetic` write killed halfway left its temporary file (170 MB at 224 px)
    for good, even after a later write of the set succeeded."""
    target = datasets.data_path(tmp_path / datasets.SYNTHETIC_DIR, FLAG, SIZE)
    target.parent.mkdir(parents=True)
    partial = target.parent / f".{target.name}.abcdefgh.tmp.npz"
    partial.write_bytes(b"PK half")
    os.utime(partial, (time.time() - 120,) * 2)
    assert fileio.abandoned_partials(target) == [partial]
    result = runner.invoke(app, ["download", FLAG, "--synthetic", "--root", str(tmp_path)])
    assert result.exit_code == 0 and target.is_file() and not partial.exists(), result.output


def test_importing_a_file_onto_itself_keeps_where_it_came_from(good_npz, tmp_path):
    """Review: `--from ROOT/file.npz` of the file already there recorded that path as its source."""
    args = ["download", FLAG, "--allow-unofficial", "--root", str(tmp_path)]
    assert runner.invoke(app, [*args, "--from", str(good_npz)]).exit_code == 0
    target = datasets.data_path(tmp_path, FLAG, SIZE)
    again = runner.invoke(app, [*args, "--from", str(target)])
    assert again.exit_code == 0, again.output
    assert datasets.record_of(target, FLAG, SIZE)["source"] == str(good_npz.resolve())
