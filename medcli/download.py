"""`medcli download`: fetch MedMNIST npz files (streamed, retried, md5-verified), import local
ones, and list what a data root holds.

Every file lands through `fileio.atomic_path`: the bytes go into a uniquely named temporary
file beside the target and are checked (zip magic, length, md5, npz layout) before it is
renamed to `<root>/<flag>[_<size>].npz`. The final path never holds a partial or unchecked
file, and a failed or interrupted attempt deletes its temporary file. Downloads are not
resumed: a fresh temporary file per attempt means two concurrent downloads never write into
the same partial file, and starting over is always correct.

The JSON record beside each file (`datasets.make_record`) also stores the file's size and
mtime (and inode) when its md5 was computed. `--list` and the "already present" check trust
that md5 while those are unchanged, so they do not re-hash gigabytes (224 px files) each time.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import os
import re
import shlex
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

from medcli import __version__, console, datasets, fileio
from medcli.errors import Interrupted, MedcliError, UsageError

__all__ = ["SAMPLE_FILE", "SAMPLE_SPLITS", "SYNTHETIC_SPLITS", "Incomplete", "fetch", "inventory", "obtain", "table"]

CHUNK = 1 << 20
ZIP_MAGIC = b"PK\x03\x04"  # an npz is a zip archive
DEFAULT_TRIES = 3
DEFAULT_TIMEOUT = 30.0
SYNTHETIC_SPLITS = (1024, 256, 256)  # train/val/test images written by --synthetic
# The embedded sample (--sample): real blood-cell images shipped inside the package, a seeded
# class-stratified subset of each split of the PBC-derived BloodMNIST (scripts/make_sample.py
# builds it). Not the official BloodMNIST file: it lands in <root>/sample/ and is recorded as
# official: false, sample: true.
SAMPLE_FLAG, SAMPLE_SIZE = datasets.SAMPLE_OF
_KEPT_ON_IMPORT = ("synthetic", "sample", "signal_box", "licence")  # record facts a copy of the same bytes keeps
SAMPLE_FILE = Path(__file__).parent / "data" / "bloodmnist_pbc_sample_28.npz"
SAMPLE_SPLITS = (2000, 250, 650)  # train/val/test images
SAMPLE_MD5 = "d00efd7992c1fdf5034fab52ce6ac77c"
SAMPLE_SOURCE = ("embedded sample of PBC blood-cell images (Acevedo et al., Data in Brief 30, 2020, "
                 "Mendeley Data snkd93bnjr; CC BY 4.0), prepared as MedMNIST's BloodMNIST, not the official split")
DEFAULT_BACKOFF = 1.0
MIRROR_SCHEMES = ("http", "https", "ftp", "file")


class _Retry(Exception):
    """A failure that another attempt may fix: network error, timeout, HTTP 5xx/429, cut-off body."""


class _Reject(Exception):
    """A response that another attempt would not fix: HTTP 4xx, an HTML page, not an npz, wrong md5."""


class Incomplete(MedcliError):
    """Some of several files could not be fetched; `records` are those that were (the CLI still
    prints their paths)."""

    def __init__(self, message: str, records: list[dict], usage: bool = False):
        super().__init__(message)
        self.records = records
        if usage:  # every failure was the user's to fix (another readable file in place, a bad mirror)
            self.exit_code = UsageError.exit_code


def source(flag: str, size: int, mirror: str | None = None) -> tuple[str, str]:
    """(url, md5) of a file: the official Zenodo URL, or `<mirror>/<file name>` when a mirror
    (a folder URL holding the official files under their official names) is given."""
    url, md5 = datasets.official_source(flag, size)
    if mirror:
        url = f"{mirror.rstrip('/')}/{datasets.filename(flag, size)}"
    return url, md5


def _check_mirror(mirror: str | None) -> None:
    """A mirror must be a folder URL; checked when a download starts (a bad $MEDCLI_MIRROR is
    no error while every file is present)."""
    if not mirror:
        return
    shown = re.sub(r"^([A-Za-z][\w+.-]*://)?[^/@]*@", r"\1***@", mirror)  # user and password never printed
    if shown != mirror:  # urllib takes "user:secret@host" for the host name; medcli's lines would show it
        raise UsageError(f"--mirror {shown} holds a user name or password, which medcli does not send (and would "
                         "print); give a mirror that needs none, or download with another tool and import "
                         "the files with --from")
    try:
        scheme = urllib.parse.urlsplit(mirror).scheme
    except ValueError as exc:  # e.g. an unclosed IPv6 bracket
        scheme = str(exc)
    if scheme not in MIRROR_SCHEMES:
        raise UsageError(f"--mirror {mirror} is not a folder URL ({', '.join(s + '://' for s in MIRROR_SCHEMES)}); "
                         "check --mirror / $MEDCLI_MIRROR")


def parse_size(text: str) -> list[int]:
    """A --size value: one of datasets.SIZES, or 'all' for every one."""
    if text.strip().lower() == "all":
        return list(datasets.SIZES)
    size = int(text) if text.strip().isascii() and text.strip().isdecimal() else None  # not "²"
    if size not in datasets.SIZES:
        choices = ", ".join(map(str, datasets.SIZES))
        raise UsageError(f"--size {text} is not a MedMNIST size; choose one of {choices} or all")
    return [size]


def obtain(
    flags: Iterable[str],
    size: str = "28",
    root: str | os.PathLike | None = None,
    *,
    from_file: str | os.PathLike | None = None,
    allow_unofficial: bool = False,
    overwrite: bool = False,
    synthetic: bool = False,
    sample: bool = False,
    mirror: str | None = None,
    tries: int = DEFAULT_TRIES,
    timeout: float = DEFAULT_TIMEOUT,
) -> list[dict]:
    """What `medcli download FLAG...` does: import `from_file`, write synthetic data, place the
    embedded sample, or fetch every flag x size.

    Returns the records (each with the file's absolute `path`). Files fetched before a
    failure stay in place (verified), so re-running resumes at the failed one.
    """
    flags = _flags(flags)
    if not flags:
        raise UsageError("name at least one dataset, e.g. 'medcli download bloodmnist', or pass --list to see them")
    sizes = parse_size(size)
    root = _root(root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--root {root} is a file; pass a folder (--root {root.parent})")
    if sum(map(bool, (from_file is not None, synthetic, sample))) > 1:
        raise UsageError("--from, --synthetic and --sample each choose the data; pass one of them")
    if overwrite and synthetic:
        raise UsageError("--overwrite does not apply to --synthetic: synthetic data lives in its own folder")
    if sample:
        return [_place_sample(flags, sizes, root, overwrite=overwrite)]
    if from_file is not None:
        if len(flags) != 1 or len(sizes) != 1:
            raise UsageError("--from imports one file: name exactly one dataset and one --size (not all)")
        return [import_file(from_file, flags[0], sizes[0], root, allow_unofficial=allow_unofficial,
                            overwrite=overwrite)]
    if allow_unofficial:
        raise UsageError("--allow-unofficial applies only to --from imports; downloads must match the official md5")
    if synthetic:
        return [_synthesize(flag, s, root) for flag in flags for s in sizes]
    wanted = [(flag, s) for flag in flags for s in sizes]
    if len(wanted) == 1:
        return [fetch(*wanted[0], root, mirror=mirror, tries=tries, timeout=timeout, overwrite=overwrite)]
    records, failed = [], {}
    for flag, s in wanted:  # one file's failure does not stop the others
        try:
            records.append(fetch(flag, s, root, mirror=mirror, tries=tries, timeout=timeout, overwrite=overwrite))
        except Interrupted:
            raise
        except MedcliError as exc:
            console.error(str(exc))
            failed[datasets.filename(flag, s)] = exc
    if failed:
        raise Incomplete(f"{len(failed)} of {len(wanted)} files not downloaded ({', '.join(failed)}): see the errors "
                         f"above", records, usage=all(isinstance(exc, UsageError) for exc in failed.values()))
    return records


def fetch(
    flag: str,
    size: int,
    root: str | os.PathLike,
    *,
    mirror: str | None = None,
    md5: str | None = None,
    tries: int = DEFAULT_TRIES,
    timeout: float = DEFAULT_TIMEOUT,
    backoff: float = DEFAULT_BACKOFF,
    overwrite: bool = False,
) -> dict:
    """Make `<root>/<file name>` hold the file whose md5 is `md5` (default: the official one)
    and return its record. No network access when it is already there. A readable dataset
    file of another md5 (an import, the embedded sample, a copy placed by hand) is replaced
    only with `overwrite`; a damaged one is downloaded over (`_present`).

    Transient failures are retried, `tries` attempts in all, waiting backoff, 2*backoff,
    4*backoff... s between them. The final failure is one MedcliError that also says how to
    get the file by hand.
    """
    url, official_md5 = source(flag, size, mirror)
    md5 = md5 or official_md5
    target = datasets.data_path(root, flag, size)
    present = _present(target, flag, size, md5, overwrite)
    if present is not None:
        return present
    _check_mirror(mirror)
    _writable(target)
    _clear_partials(target)
    console.info(f"downloading {url} -> {target}")
    for attempt in itertools.count(1):
        try:
            counts = _download_once(url, target, flag, size, md5, timeout)
        except _Retry as exc:
            if attempt >= tries:
                raise MedcliError(
                    f"cannot download {url} ({exc}; {tries} attempt{'s' if tries > 1 else ''}); "
                    f"{_by_hand(flag, size, target, md5)}"
                ) from exc
            delay = backoff * 2 ** (attempt - 1)
            console.warn(f"{url}: {exc}; retrying in {delay:g} s (attempt {attempt + 1} of {tries})")
            time.sleep(delay)
        except _Reject as exc:
            raise MedcliError(f"{url} did not give a valid {target.name}: {exc}; {_by_hand(flag, size, target, md5)}") from exc
        else:
            console.info(f"saved {target} (md5 {md5} verified)")
            return _save_record(flag, size, target, md5, url, counts)


def import_file(
    source_file: str | os.PathLike,
    flag: str,
    size: int,
    root: str | os.PathLike,
    *,
    allow_unofficial: bool = False,
    overwrite: bool = False,
) -> dict:
    """Copy a local npz into root under the official name, after checking its layout and md5.

    A file whose md5 is not the official one is refused unless allow_unofficial; it is then
    recorded with `official: false`, which `train` copies into every run made from it. A file
    of another md5 already at the target (an earlier import, a download, the embedded sample)
    is replaced only with `overwrite`.
    """
    source_file = Path(source_file).expanduser()
    counts = datasets.validate_npz(source_file, flag, size)
    target = _writable(datasets.data_path(root, flag, size))
    _, official_md5 = datasets.official_source(flag, size)
    # Hash while copying (one read of a possibly multi-GB file); a refused copy is deleted.
    with fileio.atomic_path(target) as tmp, open(source_file, "rb") as handle:
        md5, _ = _copy(iter(lambda: handle.read(CHUNK), b""), tmp, os.fstat(handle.fileno()).st_size, target.name)
        if md5 != official_md5 and not allow_unofficial:
            raise UsageError(
                f"{source_file} has md5 {md5}, not the official {official_md5} of {target.name}; "
                "pass --allow-unofficial to import it anyway (recorded as official: false)"
            )
        earlier = _other_file_at(target, flag, size, md5)
        if earlier and not overwrite:
            raise UsageError(f"{target} already holds another file ({earlier}); pass --overwrite to replace it "
                             f"with {source_file} (md5 {md5})")
        if earlier:
            console.warn(f"replacing {target} ({earlier}) with {source_file}")
    # A copy of a file medcli made (synthetic data, the embedded sample) keeps what its record says it is.
    origin = datasets.record_of(source_file, flag, size) or {}
    kept = {key: origin[key] for key in _KEPT_ON_IMPORT if key in origin and origin.get("md5") == md5}
    itself = source_file.resolve() == target.resolve() and origin.get("md5") == md5  # imported onto itself
    record = _save_record(flag, size, target, md5, origin["source"] if itself and origin.get("source")
                          else str(source_file.resolve()), counts, **kept)
    kind = "official" if record["official"] else f"unofficial, md5 {md5}"
    kind += "".join(f", {key}" for key in ("synthetic", "sample") if record.get(key))
    splits = ", ".join(f"{n} {split}" for split, n in counts.items())
    console.info(f"imported {source_file} as {target} ({kind}): {splits} images")
    return record


def inventory(root: str | os.PathLike | None = None, flags: Iterable[str] = ()) -> list[dict]:
    """One entry per dataset (default: every 2D flag): the INFO facts, for each size the
    file's path and status under root (see `_file_status`), and the stand-ins of it in
    root's sample/ and synthetic/ folders."""
    root = _root(root)
    entries = []
    for flag in _flags(flags) or datasets.flags():
        meta = datasets.info(flag)
        entries.append({
            "flag": flag,
            "task": meta["task"],
            "classes": len(meta["label"]),
            "channels": meta["n_channels"],
            "n_samples": meta["n_samples"],
            "files": {
                str(size): _file_status(datasets.data_path(root, flag, size), flag, size) for size in datasets.SIZES
            },
            # the stand-ins --sample and --synthetic keep in folders of their own under root
            "stand_ins": [dict(_file_status(path, flag, size), size=size, folder=sub)
                          for size in datasets.SIZES for sub in (datasets.SAMPLE_DIR, datasets.SYNTHETIC_DIR)
                          if (path := datasets.data_path(root / sub, flag, size)).is_file()],
        })
    return entries


_TASK_WIDTH = 12  # the --list table's task column: a longer word is shown with spaces for its hyphens
_STATUS_CELLS = {
    "official": "[green]official[/green]",
    "unofficial": "[yellow]unofficial[/yellow]",
    "synthetic": "[magenta]synthetic[/magenta]",
    "sample": "[cyan]sample[/cyan]",
    "mismatch": "[red]md5 mismatch[/red]",
    "unverified": "[yellow]no record[/yellow]",
}


def table(entries: list[dict], root: str | os.PathLike | None = None):
    """The --list entries as a Rich table: one row per dataset, its present files in one
    column (narrow enough for 80 columns; --json has every size)."""
    from rich import box
    from rich.table import Table

    grid = Table(
        title=f"MedMNIST 2D datasets under {_root(root)} (each in {', '.join(map(str, datasets.SIZES))} px)",
        caption=(
            "unofficial: imported with --allow-unofficial; sample: the embedded sample (--sample); sample/, synthetic/: the "
            "folders --sample and --synthetic put their stand-ins in (train on one with --root ROOT/sample); no record: not "
            "placed by medcli, "
            "'medcli download FLAG -s N' verifies it; md5 mismatch: changed since recorded"
        ),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    grid.add_column("dataset", no_wrap=True)
    grid.add_column("task", min_width=_TASK_WIDTH, max_width=_TASK_WIDTH)
    for name in ("classes", "train", "val", "test"):
        grid.add_column(name, justify="right", no_wrap=True)
    grid.add_column("files (px)", no_wrap=True)
    for entry in entries:
        present = [
            f"{size} {_STATUS_CELLS[file['status']]}"
            for size, file in entry["files"].items() if file["status"] != "missing"
        ] + [f"{file['size']} [dim]{file['folder']}/[/dim]"  # a stand-in: its folder, and what it is when not that
             + ("" if file["status"] == file["folder"] else f"\n   {_STATUS_CELLS[file['status']]}")
             for file in entry["stand_ins"]]
        grid.add_row(
            entry["flag"],
            " ".join(word.replace("-", " ") if len(word) > _TASK_WIDTH else word for word in entry["task"].split(" ")),
            str(entry["classes"]),
            *(f"{entry['n_samples'][split]:,}" for split in datasets.SPLITS),
            "\n".join(present) or "[dim]-[/dim]",
        )
    return grid


# -- helpers -------------------------------------------------------------------------------


def _synthesize(flag: str, size: int, root: Path) -> dict:
    """A seeded synthetic stand-in (datasets.make_synthetic) under the official file name in
    `<root>/synthetic/` (datasets.SYNTHETIC_DIR), never where the real file goes.

    Its record says `synthetic: true`, which train copies into the manifest and every later
    command shows, so demo numbers can't pass for BloodMNIST results. The set already there
    is kept (also on a read-only root); a file there whose bytes are not the ones a synthetic
    record describes may be real data and stays.
    """
    target = datasets.data_path(root / datasets.SYNTHETIC_DIR, flag, size)
    _clear_partials(target)  # a killed write's (a 224-px set's is hundreds of MB)
    if target.is_file():
        existing = datasets.record_of(target, flag, size)
        if not (existing and existing.get("synthetic") and datasets.current_md5(target, existing) == existing["md5"]):
            raise UsageError(f"{target} holds a file medcli did not write as its synthetic set (real data?); refusing "
                             "to overwrite it with synthetic data: move it or pass another --root for the synthetic set")
        if existing["n_samples"] == dict(zip(datasets.SPLITS, SYNTHETIC_SPLITS)):
            console.info(f"the synthetic {flag} at {size} px is already at {target}")
            return _with_path(existing, target)
    fileio.output_file(target, "--root")
    target.unlink(missing_ok=True)  # another medcli's set: gone first, so a stop while the new one is written leaves none
    datasets.make_synthetic(target, flag, size, SYNTHETIC_SPLITS, seed=0)
    console.warn(f"wrote SYNTHETIC {flag} at {size} px to {target} ({'/'.join(map(str, SYNTHETIC_SPLITS))} "
                 f"train/val/test images): for demos and tests, not real data; train on it with --root {target.parent}")
    return _with_path(datasets.read_record(target), target)


def _place_sample(flags: list[str], sizes: list[int], root: Path, *, overwrite: bool = False) -> dict:
    """Copy the embedded sample to `<root>/sample/` (datasets.SAMPLE_DIR) under BloodMNIST's
    file name, checked (md5, layout) like an import, and record it `sample: true`. Another file
    already there (one imported into that folder) is replaced only with `overwrite`."""
    if flags != [SAMPLE_FLAG] or sizes != [SAMPLE_SIZE]:
        raise UsageError(f"--sample is the embedded {SAMPLE_FLAG} sample at {SAMPLE_SIZE} px only: "
                         f"'medcli download {SAMPLE_FLAG} --sample'")
    target = datasets.data_path(root / datasets.SAMPLE_DIR, SAMPLE_FLAG, SAMPLE_SIZE)
    existing = datasets.record_of(target, SAMPLE_FLAG, SAMPLE_SIZE) if target.exists() else None
    if existing is not None and existing.get("sample") and datasets.unchanged(existing, target):
        console.info(f"the embedded sample is already at {target}")  # also on a read-only root
        return _with_path(existing, target)
    fileio.output_file(target, "--root")
    if not SAMPLE_FILE.is_file():
        raise MedcliError(f"this medcli installation lacks its embedded sample {SAMPLE_FILE}; reinstall medcli")
    earlier = _other_file_at(target, SAMPLE_FLAG, SAMPLE_SIZE, SAMPLE_MD5)
    if earlier and not overwrite:
        raise UsageError(f"{target} already holds another file ({earlier}); pass --overwrite to replace it with "
                         "the embedded sample")
    if earlier:
        console.warn(f"replacing {target} ({earlier}) with the embedded sample")
    with fileio.atomic_path(target) as tmp, open(SAMPLE_FILE, "rb") as handle:
        md5, _ = _copy(iter(lambda: handle.read(CHUNK), b""), tmp, os.fstat(handle.fileno()).st_size, target.name)
        if md5 != SAMPLE_MD5:
            raise MedcliError(f"the embedded sample {SAMPLE_FILE} is damaged (md5 {md5}, expected {SAMPLE_MD5}); "
                              "reinstall medcli")
        counts = datasets.validate_npz(tmp, SAMPLE_FLAG, SAMPLE_SIZE)
    record = _save_record(SAMPLE_FLAG, SAMPLE_SIZE, target, md5, SAMPLE_SOURCE, counts, sample=True,
                          licence="CC BY 4.0")
    splits = ", ".join(f"{n} {split}" for split, n in counts.items())
    console.info(f"placed the embedded PBC blood-cell sample at {target} ({splits} images; not the official "
                 f"BloodMNIST): train on it with --root {target.parent}")
    return record


def _root(root: str | os.PathLike | None) -> Path:
    """The data folder: `root`, else the default; a file given as root is refused in one line."""
    folder = Path(root).expanduser() if root else datasets.default_root()
    if folder.is_file():
        raise UsageError(f"--root {folder} is a file; pass the folder that holds it (--root {folder.parent})")
    return folder


def _flags(flags: Iterable[str]) -> list[str]:
    """Lower-cased, de-duplicated flags, each checked against INFO (one-line UsageError)."""
    unique = list(dict.fromkeys(flag.lower() for flag in flags))
    for flag in unique:
        datasets.info(flag)
    return unique


def _file_status(path: Path, flag: str, size: int) -> dict:
    """missing | unverified (no record: not placed by medcli; or recorded before the current
    import checks, which its next use runs) | mismatch (changed since its record) | official |
    synthetic | sample (the embedded one) | unofficial. Read-only: never writes a record."""
    entry = {"path": str(path), "status": "missing"}
    if not path.is_file():
        return entry
    record = datasets.record_of(path, flag, size)
    if record is None or record.get("checks") != datasets.CHECKS:
        return dict(entry, status="unverified")
    md5 = datasets.current_md5(path, record)
    status = "mismatch" if md5 != record["md5"] else datasets.provenance_kind(record) or "official"
    return dict(entry, status=status, md5=md5, n_samples=record.get("n_samples"), source=record.get("source"))


def _other_file_at(target: Path, flag: str, size: int, md5: str) -> str | None:
    """What target holds when it is a file whose md5 is not `md5` ("md5 X, from SOURCE"), else None."""
    if not target.is_file():
        return None
    record = datasets.record_of(target, flag, size)
    actual = datasets.current_md5(target, record)
    if actual == md5:
        return None
    origin = record.get("source") if record is not None and record["md5"] == actual else None
    return f"md5 {actual}, from {origin or 'an unrecorded source'}"


def _present(target: Path, flag: str, size: int, md5: str, overwrite: bool = False) -> dict | None:
    """target's record when it already holds the file with `md5`, else None (download it).

    A matching file without a current record (e.g. placed by the medmnist package, or
    touched since) gets a fresh one, so the next check needs no hashing. Another readable
    dataset file (an import, the sample, a copy placed by hand that runs were trained on) is
    refused unless `overwrite`: those runs would otherwise be evaluated on other data. A file
    that cannot be read as the dataset (cut short, damaged) is downloaded over.
    """
    if not target.is_file():
        return None
    record = datasets.record_of(target, flag, size)
    actual = datasets.current_md5(target, record)
    if actual != md5:
        if not overwrite and _readable(target, flag, size):
            known = record if record is not None and record["md5"] == actual else {}
            raise UsageError(f"{target} holds another {flag} file ({datasets.provenance_kind(known) or 'unrecorded'}, "
                             f"md5 {actual}, from {known.get('source') or 'an unrecorded source'}); "
                             "pass --overwrite to download the official file over it")
        console.info(f"{target} has md5 {actual}, not {md5}: downloading the file over it")
        return None
    console.info(f"{target} is present and verified (md5 {md5}); nothing to download")
    if record is not None and record["md5"] == md5 and datasets.unchanged(record, target):
        _clear_partials(target)
        return _with_path(record, target)
    origin = record.get("source") if record is not None and record["md5"] == md5 else None
    return _save_record(flag, size, target, md5, origin or str(target.resolve()),
                        datasets.validate_npz(target, flag, size), required=False)


def _readable(path: Path, flag: str, size: int) -> bool:
    """Whether path passes `datasets.validate_npz` for (flag, size)."""
    try:
        datasets.validate_npz(path, flag, size)
    except UsageError:
        return False
    return True


def _writable(target: Path) -> Path:
    """target, refused before any transfer when a folder stands there or its folder is not writable."""
    if target.is_dir():
        raise UsageError(f"{target} is a folder, where the dataset file goes; move it away or choose another --root")
    return fileio.output_file(target, "--root")


def _download_once(url: str, target: Path, flag: str, size: int, md5: str, timeout: float) -> dict[str, int]:
    """One attempt: stream url into a temporary file beside target, check it, rename it into
    place; return the split sizes. Raises _Retry or _Reject (the temporary file is removed)."""
    with fileio.atomic_path(target) as tmp:
        with _open(url, timeout) as response:
            length = response.headers.get("Content-Length", "")
            total = int(length) if length.isdigit() else None
            blocks = _blocks(response)
            first = b""
            for block in blocks:  # enough bytes to recognise the file (a read may return fewer)
                first += block
                if len(first) >= len(ZIP_MAGIC):
                    break
            if total is not None and len(first) < min(total, len(ZIP_MAGIC)):
                raise _Retry(f"the connection closed after {len(first)} of {total} bytes")
            _check_start(response.headers.get_content_type(), first)
            actual, received = _copy(itertools.chain([first], blocks), tmp, total, target.name)
        if total is not None and received < total:
            raise _Retry(f"the connection closed after {received} of {total} bytes")
        if actual != md5 and total is None and not zipfile.is_zipfile(tmp):  # no length given: cut off early?
            raise _Retry(f"the connection closed after {received} bytes, before the end of the file")
        if actual != md5:
            raise _Reject(f"its md5 is {actual}, expected {md5}")
        try:
            return datasets.validate_npz(tmp, flag, size)
        except UsageError as exc:
            raise _Reject(f"it is not a usable MedMNIST npz ({exc})") from exc


def _open(url: str, timeout: float):
    """urlopen with a User-Agent; sorts failures into _Retry and _Reject."""
    try:
        request = urllib.request.Request(url, headers={"User-Agent": f"medcli/{__version__}"})
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        transient = exc.code >= 500 or exc.code == 429
        raise (_Retry if transient else _Reject)(f"HTTP {exc.code} {exc.reason}") from exc
    except ValueError as exc:  # not a URL at all, e.g. a mirror without a scheme
        raise UsageError(f"{url} is not a valid URL ({exc}); check --mirror / $MEDCLI_MIRROR") from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError is an OSError
        local = urllib.parse.urlsplit(url).scheme == "file"  # a missing or unreadable file stays so
        raise (_Reject if local else _Retry)(_reason(exc)) from exc


def _blocks(response) -> Iterator[bytes]:
    """The body in CHUNK-sized blocks; network errors while reading become _Retry."""
    while True:
        try:
            block = response.read(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise _Retry(_reason(exc)) from exc
        if not block:
            return
        yield block


def _check_start(content_type: str, first: bytes) -> None:
    """Reject a body that is not an npz before saving it: an HTML page (a login, quota or
    error page served with status 200) or anything without the zip magic number."""
    if content_type == "text/html" or first.lstrip()[:1] == b"<":
        raise _Reject("the server sent an HTML page instead of the file")
    if not first.startswith(ZIP_MAGIC):
        raise _Reject("the response is empty" if not first else f"the response is not an npz file (it starts with {first[:8]!r})")


def _copy(blocks: Iterable[bytes], dest: Path, total: int | None, label: str) -> tuple[str, int]:
    """Write blocks to dest under a bytes progress bar; return (md5, byte count)."""
    digest, count = hashlib.md5(), 0
    with console.progress(kind="bytes") as bar, open(dest, "wb") as out:
        task = bar.add_task(label, total=total)
        for block in blocks:
            out.write(block)
            digest.update(block)
            count += len(block)
            bar.update(task, advance=len(block))
    return digest.hexdigest(), count


def _reason(exc: BaseException) -> str:
    """A short human reason for a network error (URLError wraps the socket error)."""
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _by_hand(flag: str, size: int, target: Path, md5: str) -> str:
    return (
        f"download it by hand, check its md5 is {md5} and put it at {target}, or import a copy "
        f"you have: medcli download {flag} --size {size} --root {shlex.quote(str(target.parent))} --from FILE"
    )


def _save_record(flag: str, size: int, target: Path, md5: str, origin: str, counts: dict, *, required: bool = True,
                 **extra) -> dict:
    """Write target's JSON record, with the size and mtime its md5 belongs to. For a file
    medcli did not just write (`required=False`) a root it cannot write to is no failure
    (`datasets.keep_record`); then remove what killed writes of target left."""
    record = datasets.make_record(flag, size, target, md5, origin, counts, **extra)
    (datasets.write_record if required else datasets.keep_record)(target, record)
    _clear_partials(target)
    return _with_path(record, target)


def _clear_partials(target: Path) -> None:
    """Remove the temporary files killed writes of target left beside it (a 224-px file's are
    gigabytes) whenever target is looked for; a concurrent download's stays (its writer holds
    it: `fileio.abandoned_partials`)."""
    removed = 0
    try:
        for path in fileio.abandoned_partials(target):
            path.unlink(missing_ok=True)
            removed += 1
    except OSError as exc:  # a read-only root, or a concurrent download renamed its own
        console.debug(f"temporary files beside {target} left as they are ({exc})")
    if removed:
        console.info(f"removed {console.plural(removed, 'temporary file')} an interrupted write of {target} left")


def _with_path(record: dict, target: Path) -> dict:
    return dict(record, path=str(target.resolve()))
