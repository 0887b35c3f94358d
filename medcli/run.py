"""`Run`: the one object that owns a run directory.

Every command after `train` opens a run the same way: `Run.open(path)` reads and validates
the manifest, `require("train")` refuses a run whose stage has not completed, `load_model`
and `load_data` give the trained model and the split data the run was trained on, and
`stage(name)` records a stage (running, then completed / failed / interrupted).

Locking. Two locks, both `filelock` files in the run directory:
* `.manifest.lock` is held only around a read-modify-write of `manifest.json`: the file is
  re-read under the lock, one stage entry (or section) is changed, and the result is saved
  atomically. Two commands working on one run therefore never lose each other's entries.
* `.lock-<stage>` is held for the whole of a stage, so two commands that would write the
  same files refuse with one line, while stages that write different files (explains with
  different methods) run side by side. `clean-processes` finds a process's runs through the
  stage locks it holds open.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from medcli import console, fileio, manifest
from medcli.errors import Interrupted, MedcliError, UsageError
from medcli.names import CHECKPOINTS, SPLITS

__all__ = ["RUN_FIGURES", "Run", "SPLIT_FIGURES", "STAGE_LOCK_PREFIX", "create_run_dir", "find_runs"]

# The layout of a run directory (see the `Run` methods that build paths from these).
CHECKPOINT_DIR = "checkpoints"
FIGURE_DIR = "figures"
METRICS_DIR = "metrics"
PREDICTIONS_DIR = "predictions"
EXPLAIN_DIR = "explain"
EXPORT_DIR = "export"
HISTORY_FILE = "history.csv"
# The figures: figures/<name>_<split>.png, drawn by evaluate for each split, and
# figures/<name>.png, drawn by train (`Run.figure_file` refuses any other name)
SPLIT_FIGURES = ("confusion", "samples", "mistakes", "reliability", "roc")
RUN_FIGURES = ("curves",)
REPORT_FILE = "report.xlsx"
HTML_REPORT_FILE = "report.html"
MAPS_FILE = "maps.npz"
EXPLAIN_INDEX = "index.json"
EXPLAIN_STAGE_PREFIX = "explain:"
MANIFEST_LOCK = ".manifest.lock"
STAGE_LOCK_PREFIX = ".lock-"
MANIFEST_LOCK_WAIT_S = 60.0  # a read-modify-write takes milliseconds; waiting this long means a hung writer


def create_run_dir(runs_root: str | os.PathLike, name: str) -> Path:
    """Make a brand-new run directory; never reuse one (a numeric suffix is added instead)."""
    root = Path(runs_root)
    if root.exists() and not root.is_dir():
        raise UsageError(f"--runs-dir {root} is a file, not a folder; pass a folder for the runs")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create runs directory {root}: {exc.strerror}; pass a writable --runs-dir") from exc
    for attempt in range(1000):
        candidate = root / (name if attempt == 0 else f"{name}-{attempt + 1}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot create run directory {candidate}: {exc.strerror}; pass a writable --runs-dir") from exc
        return candidate
    raise UsageError(f"too many runs named {name} under {root}")


def stage_lock_path(run_dir: str | os.PathLike, stage: str) -> Path:
    return Path(run_dir) / f"{STAGE_LOCK_PREFIX}{re.sub(r'[^A-Za-z0-9._-]+', '_', stage)}"


def find_runs(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[dict]]:
    """Run directories under `paths` (a run dir, its manifest.json, or a folder searched
    recursively), deduplicated, plus `skipped` entries for paths that hold no run."""
    found: dict[Path, None] = {}
    skipped = []
    for raw in paths:
        path = Path(raw)
        if path.name == manifest.FILENAME and path.is_file():
            path = path.parent
        if not path.exists():
            skipped.append({"run": str(raw), "reason": "does not exist"})
        elif (path / manifest.FILENAME).is_file():
            found[path.resolve()] = None
        elif path.is_dir():
            runs = sorted(p.parent.resolve() for p in path.rglob(manifest.FILENAME))
            if not runs:
                skipped.append({"run": str(raw), "reason": f"no {manifest.FILENAME} found in it"})
            found.update(dict.fromkeys(runs))
        else:
            skipped.append({"run": str(raw), "reason": "not a run directory or folder of runs"})
    return list(found), skipped


class Run:
    """A run directory and its manifest (`data`, as last read or written by this object)."""

    def __init__(self, run_dir: Path, data: dict):
        self.run_dir = Path(run_dir)
        self.data = data

    # -- opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, runs_root: str | os.PathLike, name: str, *, config: dict, dataset: dict, **sections: Any) -> "Run":
        """A new run directory (never an existing one) with its first manifest."""
        run_dir = create_run_dir(runs_root, name)
        run = cls(run_dir, manifest.document(run_dir.name, config=config, dataset=dataset, **sections))
        manifest.write(run_dir, run.data)
        return run

    @classmethod
    def of_predictions(cls, csv: str | os.PathLike) -> "Run | None":
        """The run whose `predictions/<split>.csv` this file is, else None (a CSV elsewhere)."""
        folder = Path(csv).resolve().parent
        if folder.name != PREDICTIONS_DIR or not (folder.parent / manifest.FILENAME).is_file():
            return None
        return cls.open(folder.parent)

    @classmethod
    def of_checkpoint(cls, path: str | os.PathLike | None) -> "Run | None":
        """The run whose `checkpoints/<name>.pt` this file is, else None (weights from elsewhere);
        a run whose manifest cannot be read is `open`'s one-line UsageError."""
        if not path:
            return None
        folder = Path(path).resolve().parent
        if folder.name != CHECKPOINT_DIR or not (folder.parent / manifest.FILENAME).is_file():
            return None
        return cls.open(folder.parent)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Run":
        """An existing run (its directory or manifest.json); one-line UsageError otherwise."""
        return cls(*manifest.read(path))

    # -- the manifest -----------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    @property
    def config(self) -> dict:
        return self.data["config"]

    @property
    def dataset(self) -> dict:
        return self.data["dataset"]

    @property
    def spec(self) -> dict:
        """The model spec (`models.create`), or a one-line refusal when the manifest has none or
        a damaged one (its sizes not positive whole numbers: a builder's error would blame an option)."""
        spec = self.data.get("model")
        if not isinstance(spec, dict) or "name" not in spec:
            raise UsageError(f"run {self.run_dir} has no model spec in its manifest; re-train it with medcli train")
        bad = [f"model.{key} ({spec[key]!r})" for key in ("num_classes", "in_chans", "input_size")
               if key in spec and (isinstance(spec[key], bool) or not isinstance(spec[key], int) or spec[key] < 1)]
        if bad:
            raise UsageError(f"{self.run_dir / manifest.FILENAME} has malformed {', '.join(bad)}: the manifest is "
                             "damaged; restore it or train the run again")
        return spec

    @property
    def stages(self) -> dict:
        return self.data["stages"]

    def status(self, stage: str) -> str | None:
        return self.stages.get(stage, {}).get("status")

    def path(self, relative: str | os.PathLike) -> Path:
        return self.run_dir / relative

    def relative(self, path: str | os.PathLike) -> str:
        return Path(os.path.relpath(Path(path).resolve(), self.run_dir.resolve())).as_posix()

    def require(self, stage: str, hint: str) -> dict:
        """The completed entry of `stage`; otherwise a one-line refusal naming its state and `hint`."""
        entry = self.stages.get(stage)
        if entry and entry.get("status") == "running":
            pid = f" (pid {entry['pid']})" if entry.get("pid") else ""
            held = self._stage_held(stage)
            if held is not False:
                raise UsageError(f"the {stage} stage of run {self.run_dir} is {'still' if held else 'marked as'} "
                                 f"running{pid}; wait for it to finish, then run this again"
                                 + ("" if held else f" (if its process has ended: {hint})"))
            raise UsageError(f"the {stage} stage of run {self.run_dir} did not finish: its process{pid} ended "
                             f"without recording how (killed?); {hint}")
        if not entry or entry.get("status") != "completed":
            state = entry.get("status") if entry else "not run"
            raise UsageError(f"run {self.run_dir} has no completed {stage} stage ({state}); {hint}")
        return entry

    def refuse_if_busy(self, name: str) -> None:
        """The stage lock's one-line refusal now, before a command loads its model and data, when
        another process works on it (`stage` refuses it again, for one that starts meanwhile)."""
        with self._stage_lock(name):
            pass

    def _stage_held(self, name: str) -> bool | None:
        """Whether a process holds the stage's lock (is working on it) now; None when that
        cannot be told (a read-only run directory)."""
        from filelock import FileLock, Timeout

        lock = FileLock(stage_lock_path(self.run_dir, name), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            return True
        except OSError:
            return None
        lock.release()
        return False

    def require_trained(self) -> dict:
        entry = self.require("train", f"train it first with 'medcli train' (or finish it with "
                                      f"'{self.resume_command()}')")
        missing = [key for key in ("model", "preprocess") if key not in self.data]
        if missing:
            raise UsageError(f"the manifest of run {self.run_dir} has no {' or '.join(missing)}, which training "
                             "records: the manifest is damaged; restore it or train the run again")
        return entry

    def command(self, name: str, *options: str) -> str:
        """`medcli NAME RUN OPTIONS` with this run's absolute path, quoted for a shell: a hint that
        works from any folder (and on a page read elsewhere)."""
        return " ".join([f"medcli {name}", shlex.quote(str(self.run_dir.resolve())), *options])

    def resume_command(self) -> str:
        """The exact command that continues this run's training (with as many processes as it had)."""
        world = self.data.get("environment", {}).get("distributed", {}).get("world_size") or 1
        return self.command("train --resume", *(["--nproc", str(world)] if world > 1 else []))

    def evaluate_command(self, split: str, *options: str, checkpoint: str | None = None) -> str:
        """The command that (re)writes a split's evaluation as it was made (the checkpoint, TTA
        and calibration the evaluate stage recorded for it), plus the flags `options`, with the
        run's absolute path; that split alone, so no other split's evaluation changes.
        `checkpoint` replaces the recorded one."""
        done = self.stages.get("evaluate", {}).get("summary", {}).get(split, {})
        checkpoint = checkpoint or done.get("checkpoint", "best")
        recorded = [*(["--checkpoint", checkpoint] if checkpoint != "best" else []),
                    *(["--tta"] if done.get("tta") else []), *(["--calibrate"] if done.get("temperature") else [])]
        return self.command("evaluate", "--split", split, *recorded,
                            *(flag for flag in dict.fromkeys(options) if flag not in recorded))

    def update(self, change: Callable[[dict], None]) -> None:
        """Apply `change` to the manifest on disk under the manifest lock (re-read, change, save
        atomically); `self.data` becomes the result."""
        from filelock import FileLock, Timeout

        lock = FileLock(self.run_dir / MANIFEST_LOCK, timeout=MANIFEST_LOCK_WAIT_S)
        try:
            with lock:
                _, data = manifest.read(self.run_dir)
                change(data)
                manifest.write(self.run_dir, data)
        except Timeout:
            raise UsageError(f"the manifest of run {self.run_dir} stayed locked for {MANIFEST_LOCK_WAIT_S:.0f} s; "
                             f"if no medcli process uses it, delete {lock.lock_file}") from None
        self.data = data

    # -- stages -----------------------------------------------------------------------------
    @contextmanager
    def stage(self, name: str, keep_completed: bool = False) -> Iterator["StageRecord"]:
        """Run a stage under its own lock: mark it running, and record how it ended.

        Completed on normal exit; interrupted on Ctrl-C/SIGTERM; failed on any other error
        (the exception is re-raised after the manifest is saved). With `keep_completed`, an
        attempt that ends before it recorded or forgot any file leaves the earlier completed
        entry as it was (its files are untouched, so its result stands). A second process asking for
        the same stage of the same run is refused at once with one line. Ctrl-C (and SIGTERM,
        which the CLI turns into it) leaves as a KeyboardInterrupt whose message names the run
        and how to continue.
        """
        with self._stage_lock(name):
            entry = {"status": "running", "started": manifest.now_iso(), "ended": None, "duration_s": None,
                     "error": None, "pid": os.getpid()}

            earlier: dict = {}

            def begin(data: dict) -> None:  # an earlier run of the stage keeps its artefacts and summary
                previous = data["stages"].get(name, {})
                entry.update(artefacts=dict(previous.get("artefacts", {})), summary=dict(previous.get("summary", {})))
                if keep_completed and previous.get("status") == "completed":
                    earlier.update(previous)
                data["stages"][name] = entry

            self.update(begin)
            record = StageRecord(self, name, entry, earlier or None)
            start = time.perf_counter()

            def ended(status: str, error: str) -> None:  # the error that ended the stage is the one to say
                try:
                    record.end(status, start, error)
                except MedcliError as failed:  # a full disk: the manifest cannot be written either
                    console.warn(f"the {name} stage could not be recorded as {status}: {failed}")

            try:
                yield record
            except Interrupted as exc:
                ended("interrupted", str(exc))
                raise
            except KeyboardInterrupt:
                kept = record.earlier is not None and not record.touched
                ended("interrupted", "interrupted by the user")
                if kept:
                    raise KeyboardInterrupt(f"the {name} stage of run {self.run_dir.resolve()} was interrupted before "
                                            "it changed any file: its earlier result stands") from None
                then = (f"continue it with '{self.resume_command()}'" if name == "train"
                        else "run the command again to redo it")
                raise KeyboardInterrupt(f"the {name} stage of run {self.run_dir.resolve()} was interrupted; "
                                        f"{then}") from None
            except BaseException as exc:
                ended("failed", str(exc) or type(exc).__name__)
                raise
            record.end("completed", start, None)

    @contextmanager
    def _stage_lock(self, name: str) -> Iterator[None]:
        from filelock import FileLock, Timeout

        lock = FileLock(stage_lock_path(self.run_dir, name), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            pid = manifest.read(self.run_dir)[1]["stages"].get(name, {}).get("pid")  # the holder's, from disk
            end = f"end it alone with 'kill {pid}'" if pid else "end it"  # not clean-processes --yes: it ends all
            raise UsageError(f"run {self.run_dir} is in use by another medcli process ({name} stage"
                             f"{f', pid {pid}' if pid else ''}); wait for it to finish, or if it is stale {end} "
                             f"(list medcli's processes with 'medcli clean-processes')") from None
        except OSError as exc:
            raise UsageError(f"cannot lock run {self.run_dir}: {exc.strerror}; check the directory is writable") from exc
        try:
            yield
        finally:
            lock.release()

    def mark_interrupted(self, reason: str, pid: int | None = None) -> list[str]:
        """Mark running stages interrupted (those of process `pid`, or all); returns their names.
        Used for a process that was ended and could not record it itself."""
        marked: list[str] = []

        def change(data: dict) -> None:
            for name, entry in data["stages"].items():
                if entry.get("status") == "running" and pid in (None, entry.get("pid")):
                    entry.update(status="interrupted", ended=manifest.now_iso(), error=reason)
                    entry.pop("pid", None)
                    marked.append(name)

        self.update(change)
        return marked

    # -- the layout: every path inside a run directory is spelled here, and only here ----------
    def checkpoint_path(self, checkpoint: str) -> Path:
        if checkpoint not in CHECKPOINTS:
            raise UsageError(f"unknown checkpoint '{checkpoint}'; choose {' or '.join(CHECKPOINTS)}")
        return self.path(f"{CHECKPOINT_DIR}/{checkpoint}.pt")

    def history_file(self) -> Path:
        """Per-epoch training history (`train`)."""
        return self.path(HISTORY_FILE)

    def figure_file(self, name: str, split: str | None = None, variant: str = "") -> Path:
        """`figures/<name>.png` (RUN_FIGURES), or `figures/<name>_<split><variant>.png` for a
        split's figure (SPLIT_FIGURES; `variant`: another drawing of it, e.g. "_counts")."""
        if name not in (SPLIT_FIGURES if split else RUN_FIGURES):
            raise ValueError(f"a run has no figure {name!r}{f' of a split' if split else ''}")
        return self.path(f"{FIGURE_DIR}/{name}{f'_{split}' if split else ''}{variant}.png")

    def metrics_file(self, split: str) -> Path:
        """A split's metrics (`evaluate`; read by `aggregate` and the report)."""
        return self.path(f"{METRICS_DIR}/{split}.json")

    def predictions_file(self, split: str) -> Path:
        """A split's predictions CSV (`evaluate`; read by `plot-confusion` and the report)."""
        return self.path(f"{PREDICTIONS_DIR}/{split}.csv")

    def medmnist_dir(self) -> Path:
        """Where `evaluate --medmnist-csv` writes the files medmnist's evaluator reads."""
        return self.path(f"{PREDICTIONS_DIR}/medmnist")

    def report_file(self) -> Path:
        return self.path(REPORT_FILE)

    def html_report_file(self) -> Path:
        """The run's page for people (`report`): every figure and number in one HTML file."""
        return self.path(HTML_REPORT_FILE)

    def export_file(self, checkpoint: str, suffix: str, tag: str = "") -> Path:
        """An exported model (`export`): `export/<run id>_<checkpoint>[_<tag>]<suffix>`; its
        description and model card sit beside it with .json and .md."""
        self.checkpoint_path(checkpoint)  # checks the name
        return self.path(f"{EXPORT_DIR}/{self.run_id}_{checkpoint}{f'_{tag}' if tag else ''}{suffix}")

    def explain_dir(self, method: str) -> Path:
        """Everything one explanation method wrote (`explain`)."""
        return self.path(f"{EXPLAIN_DIR}/{method}")

    def explain_prefix(self, method: str) -> str:
        """The artefact prefix of `explain_dir(method)` in the manifest."""
        return f"{self.relative(self.explain_dir(method))}/"

    def maps_file(self, method: str) -> Path:
        """A method's raw maps (`explain`; read by `aggregate --maps`)."""
        return self.explain_dir(method) / MAPS_FILE

    def explain_index(self, method: str) -> Path:
        return self.explain_dir(method) / EXPLAIN_INDEX

    @staticmethod
    def explain_stage(method: str) -> str:
        """The manifest stage of one method: explains with different methods write different
        files, so each has its own stage (and lock) and they can run side by side."""
        return f"{EXPLAIN_STAGE_PREFIX}{method}"

    # -- model and data ---------------------------------------------------------------------

    def load_model(self, checkpoint: str = "best", device="cpu"):
        """The trained model (the manifest's spec + checkpoints/<checkpoint>.pt) on `device`, in
        eval mode; a missing, damaged or mismatched checkpoint is a one-line UsageError."""
        from medcli import models

        path = self.checkpoint_path(checkpoint)
        relative = self.relative(path)
        other = CHECKPOINTS[1 - CHECKPOINTS.index(checkpoint)]
        if not path.is_file():
            raise UsageError(f"run {self.run_dir} has no {relative}; " + (
                f"use --checkpoint {other}, or restore the file" if self.checkpoint_path(other).is_file()
                else "restore it, or train a new run"))
        state = models.read_state_dict(path, f"re-train or use --checkpoint {other}", data=self.read_artefact(path))
        model = models.rebuild(self.spec)
        models.load_state(model, state, self.spec["name"], relative, "re-train this run or restore its checkpoint")
        return model.to(device).eval()

    def writer_of(self, path: Path) -> str | None:
        """The completed stage that recorded `path` as one of its files, else None."""
        relative = self.relative(path)
        return next((name for name, entry in self.stages.items()
                     if entry.get("status") == "completed" and relative in entry.get("artefacts", {})), None)

    def as_recorded(self, path: Path, data: bytes) -> bool:
        """Whether `data` are the bytes the completed stage that recorded `path` wrote (True when
        no completed stage recorded it)."""
        import hashlib

        stage = self.writer_of(path)
        return stage is None or hashlib.sha256(data).hexdigest() == self.stages[stage]["artefacts"][self.relative(path)]

    def read_artefact(self, path: Path, fix: str = "restore the run's own file or train the run again") -> bytes:
        """The bytes of a file a completed stage of this run recorded, read and hashed once and
        checked against the sha256 in the manifest: a file that is not the one this run wrote
        (another run's checkpoint copied over it, a damaged copy) is a one-line UsageError. A
        stage that did not complete (interrupted while writing) vouches for nothing: its files
        are read as they are."""
        data = Path(path).read_bytes()
        if not self.as_recorded(path, data):
            raise UsageError(f"{self.relative(path)} of run {self.run_dir} is not the file this run wrote (its sha256 "
                             f"differs from the manifest's); {fix}")
        return data

    def read_json(self, path: Path, fix: str) -> Any:
        """A JSON file of the run, checked against its recorded sha256 (`read_artefact`); a
        missing, damaged or undecodable file is a one-line UsageError ending in `fix`."""
        import json

        try:
            return json.loads(self.read_artefact(path, fix).decode("utf-8"))
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise UsageError(f"{path} is unreadable ({type(exc).__name__}); {fix}") from None

    def read_evaluated(self, path: Path, split: str) -> bytes:
        """The bytes of a file of a split the evaluate stage lists, checked against the sha256
        it recorded for the file, whatever the stage's status (an attempt at another split that
        stopped leaves the listed splits' records as they were); a one-line UsageError when the
        file is not the one evaluate wrote."""
        import hashlib

        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UsageError(f"{self.relative(path)} of run {self.run_dir} cannot be read ({exc.strerror or exc}); "
                             f"re-run '{self.evaluate_command(split)}'") from None
        recorded = self.stages.get("evaluate", {}).get("artefacts", {}).get(self.relative(path))
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            raise UsageError(f"{self.relative(path)} of run {self.run_dir} is not the file evaluate wrote (its sha256 "
                             f"differs from the manifest's); re-run '{self.evaluate_command(split)}'")
        return data

    def evaluated_splits(self) -> list[str]:
        """The splits the evaluate stage lists (each evaluated to the end, its files recorded;
        a later attempt at another split, failed or running, leaves them be), whose metrics file
        is there; a split an attempt left half-written is not one."""
        listed = self.stages.get("evaluate", {}).get("summary", {})  # a split leaves it while it is rewritten
        return [split for split in SPLITS if split in listed and self.metrics_file(split).is_file()]

    def load_data(self, root: str | os.PathLike | None = None, splits: Sequence[str] = SPLITS, *,
                  same_file: bool = False, **load_options: Any):
        """The run's dataset (`datasets.Splits`, only `splits`; `load_options` as `datasets.load`'s), found
        again by flag and size: under `root` when given (a moved run or dataset), else under the data root
        training used, else beside the recorded file. A file that differs from the one training used
        is a warning (the numbers may not compare), or with `same_file` (resuming) a usage error."""
        from medcli import datasets

        record = self.dataset
        flag, size = record.get("flag"), record.get("size")
        if not flag or not size:
            raise UsageError(f"run {self.run_dir} has no dataset flag/size in its manifest; re-train it with medcli train")
        if root is None:
            candidates = [Path(p) for p in (self.config.get("root"), Path(record.get("path", "")).parent) if p]
            root = next((c for c in candidates if datasets.data_path(c, flag, size).is_file()), None)
            if root is None:
                where = Path(record["path"]).parent if record.get("path") else Path(self.config.get("root") or ".")
                raise UsageError(f"the dataset this run was trained on ({datasets.filename(flag, size)} under "
                                 f"{self.config.get('root') or record.get('path')}) is missing; pass --root DIR holding "
                                 f"it, or {datasets.restore_hint(record, where)}")
        data = datasets.load(root, flag, size, splits, **load_options)
        if record.get("md5") and data.record.get("md5") != record.get("md5"):
            differs = (f"{data.path} differs from the file this run was trained on (md5 {data.record.get('md5')} "
                       f"vs {record.get('md5')})")
            if same_file:
                raise UsageError(f"{differs}; pass --root DIR holding the run's own file")
            console.warn(f"{differs}; numbers may not be comparable")
        return data


class StageRecord:
    """Handle given to a running stage to register artefacts and a summary."""

    def __init__(self, run: Run, name: str, entry: dict, earlier: dict | None = None):
        self.run = run
        self.name = name
        self.entry = entry
        self.earlier = earlier  # the completed entry an attempt that changes no file leaves in place
        self.touched = False  # a file was recorded or forgotten

    @property
    def summary(self) -> dict:
        return self.entry["summary"]

    def add(self, *paths: str | os.PathLike, save: bool = True) -> None:
        """Record artefacts (relative path -> sha256). Call after the file is in place."""
        for path in paths:
            self.record(path, fileio.sha256_file(path), save=False)
        if save:
            self.save()

    def writing(self) -> None:
        """Files of the earlier result are about to be replaced: from here on an interruption
        ends the stage as interrupted or failed, never as the earlier completed entry."""
        self.touched = True

    def record(self, path: str | os.PathLike, sha256: str, save: bool = True) -> None:
        """Record one artefact whose sha256 is already known (hashed while it was written)."""
        self.touched = True
        self.entry["artefacts"][self.run.relative(path)] = sha256
        if save:
            self.save()

    def drop(self, *paths: str | os.PathLike) -> None:
        """Unlist files about to be written again (they stay on disk): a stop halfway leaves
        no sha256 of a file replaced since."""
        self.touched = True
        for path in paths:
            self.entry["artefacts"].pop(self.run.relative(path), None)

    def forget(self, prefix: str, keep: Sequence[str | os.PathLike] = ()) -> None:
        """Delete the files this stage recorded under `prefix` (an earlier run of the stage),
        so none outlives the index that listed it; `keep`: files just written over them."""
        self.touched = True
        artefacts, kept = self.entry["artefacts"], {self.run.relative(path) for path in keep}
        for relative in [rel for rel in artefacts if rel.startswith(prefix) and rel not in kept]:
            self.run.path(relative).unlink(missing_ok=True)
            del artefacts[relative]

    def save(self) -> None:
        """Write this stage's entry into the manifest (other entries are left as they are on disk)."""
        self.run.update(lambda data: data["stages"].__setitem__(self.name, self.entry))

    def end(self, status: str, start: float, error: str | None) -> None:
        if status != "completed" and self.earlier is not None and not self.touched:
            self.entry = self.earlier  # nothing of the earlier result was replaced: it stands
            self.save()
            return
        self.entry.update(status=status, ended=manifest.now_iso(), duration_s=round(time.perf_counter() - start, 3),
                          error=error)
        self.entry.pop("pid", None)
        self.save()
