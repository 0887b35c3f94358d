"""The `medcli` Typer app: one thin function per subcommand.

Each command parses its options and calls one library function. Heavy modules (torch, timm,
the stage modules) are imported inside the command bodies so `medcli --help` stays instant.
Errors are turned into one red line and an exit code in one place: `MedcliGroup.invoke`.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
from pathlib import Path
from enum import Enum
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError as ClickUsageError

# Light modules only (no torch, numpy or pandas at import time: a test checks): their
# constants give the option choices and help texts below. Stage modules are imported inside
# the commands.
from medcli import __version__, console, names
from medcli import config as _config
from medcli import models as _models  # light at import: its family records give train's choices and defaults
from medcli import explainers as _explainers  # light at import: the methods, --layer's help
from medcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, MedcliError, UsageError, clear_stop, request_stop

__all__ = ["app", "main"]

_opt = _config.TrainOptions.help  # train's help texts, written once with its options
ARGV_KEY = "medcli.argv"  # the command line, in the context's meta (`MedcliGroup.make_context`)


class MedcliGroup(TyperGroup):
    """Turns every failure inside a subcommand into one line on stderr and an exit code."""

    def make_context(self, info_name, args, parent=None, **extra):
        argv = list(args)  # the command line as given (`train --nproc` runs it again), not sys.argv:
        ctx = super().make_context(info_name, args, parent=parent, **extra)  # medcli may be called from Python
        ctx.meta[ARGV_KEY] = argv
        return ctx

    def invoke(self, ctx):
        # the subcommand's name, before Click clears it (Click 8.2+: _protected_args; 8.1: protected_args)
        pending = ctx._protected_args if hasattr(ctx, "_protected_args") else getattr(ctx, "protected_args", [])
        sub = next(iter(pending or []), None)
        if (empty := _empty_argument(ctx.meta.get(ARGV_KEY, ()), self, sub)) is not None:
            if _job().local_rank == 0:
                name = f"medcli {sub}" if sub in self.commands else "medcli"
                console.error(f"{empty} is empty (an unset shell variable?); give it a value (see '{name} --help')")
            raise typer.Exit(EXIT_USAGE)
        try:
            return super().invoke(ctx)
        except typer.Abort as exc:  # Click's prompt turns Ctrl-C into Abort ("Aborted!", exit 1)
            if isinstance(exc.__context__, KeyboardInterrupt):
                raise typer.Exit(EXIT_INTERRUPTED) from None
            raise
        except typer.Exit:
            raise
        except ClickUsageError as exc:
            if _job().local_rank != 0:  # every process of a node parses the same command line: one says it
                raise typer.Exit(EXIT_USAGE) from None
            if exc.ctx and exc.ctx.parent:
                name = f"medcli {exc.ctx.info_name}"
            else:  # an option missing its value fails before the subcommand's context exists
                name = f"medcli {sub}" if sub in self.commands else "medcli"
            option = getattr(exc, "option_name", None)
            if name != "medcli" and option in {opt for param in self.params for opt in param.opts}:
                console.error(f"{option} is a global option: put it before the command, "
                              f"as in 'medcli {option} {exc.ctx.info_name} ...'")
            else:
                # Typer words a choice error "Invalid value for '--split': Value error, 'x' is not one of ..."
                console.error(f"{exc.format_message().replace(': Value error, ', ': ')} (see '{name} --help')")
            raise typer.Exit(EXIT_USAGE) from None
        except MedcliError as exc:
            job = _job()
            if isinstance(exc, UsageError) and job.local_rank != 0 and not exc.rank_specific:
                raise typer.Exit(exc.exit_code) from None  # every process of a node finds it: one says it
            if console.is_verbose():
                console.console().print_exception()
            console.error(_from_rank(job) + str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:  # a stage names its run and how to continue (`Run.stage`)
            from medcli import distributed

            clear_stop()
            if distributed.says_interruptions():  # a distributed job's end is said once
                console.error(str(exc) or "interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # an unexpected bug: one line unless --verbose
            if isinstance(exc, BrokenPipeError) and _stdout_gone():  # its reader left (`| head`): Click ends quietly
                raise
            if isinstance(exc, OSError) and exc.errno in _PATH_REFUSALS and not console.is_verbose():
                # the file system's refusal of a path the user gave (a name too long, a loop of links)
                console.error(f"{_from_rank(_job())}cannot use {exc.filename}: {exc.strerror}; give another path "
                              "(re-run with --verbose for the traceback)")
                raise typer.Exit(EXIT_FAILURE) from None
            if console.is_verbose():
                console.console().print_exception()
            console.error(f"{_from_rank(_job())}unexpected {type(exc).__name__}: {exc} "
                          "(re-run with --verbose for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None


_PATH_REFUSALS = {errno.ENAMETOOLONG, errno.ELOOP, errno.ENOTDIR}  # a path no file can have


def _empty_argument(argv, group, sub: str | None) -> str | None:
    """What an empty word of the command line is ("--root" for `--root ""` or `--root=`, "an
    argument" otherwise), or None when there is none (or help is asked for): no medcli option
    or argument takes an empty value, and `--root "$DATA"` with DATA unset meant the current
    folder. Words after "--" are arguments, however they look."""
    takes_value = {name for command in (group, group.commands.get(sub)) if command is not None
                   for param in command.params if param.param_type_name == "option" and not param.is_flag
                   and not param.count for name in param.opts}
    options = argv[:argv.index("--")] if "--" in argv else argv
    if {"-h", "--help"} & set(options):
        return None
    for before, word in zip([None, *argv], argv):
        if word == "--" and before not in takes_value:
            return "an argument" if "" in argv[argv.index(word) + 1:] else None
        if word.endswith("=") and word[:-1] in takes_value:
            return word[:-1]
        if word == "":
            return before if before in takes_value else "an argument"
    return None


def _job():
    """This process's place in a distributed job, or a world of one where the environment that
    would say it is malformed (the error being reported may be that very one)."""
    from medcli import distributed

    try:
        return distributed.from_env()
    except MedcliError:
        return distributed.Context()


def _from_rank(job) -> str:
    """"rank N: " before an error of a distributed job's process other than rank 0 (each
    process says its own: the same line from two ranks is two processes' failures)."""
    return f"rank {job.rank}: " if job.enabled and job.rank != 0 else ""


def _stdout_gone() -> bool:
    """Whether stdout's reader has gone (poll says so of a pipe without a reader): a broken
    pipe elsewhere is a bug to report."""
    import select

    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no file descriptor (a test runner's buffer), no poll
        return False


app = typer.Typer(
    cls=MedcliGroup,
    name="medcli",
    help="MedMNIST from download to a trained, evaluated, explained and compared classifier.",
    no_args_is_help=True,
    # Click's own help layout: two columns that wrap at the terminal width (at most 80), where
    # Rich's six-column option table left train's descriptions 16 characters and cut words.
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr; no progress bars.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logs, and tracebacks on errors.")] = False,
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Global options. Results go to stdout; logs and progress bars to stderr.

    Exit codes: 0 ok, 1 runtime failure, 2 bad usage or input, 130 interrupted.
    """
    console.configure(quiet=quiet, verbose=verbose)
    clear_stop()
    for stop in (signal.SIGINT, signal.SIGTERM):  # SIGTERM behaves like Ctrl-C: stages end "interrupted", exit 130
        signal.signal(stop, request_stop)
    launched = os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1") and \
        any(key in os.environ for key in ("LOCAL_RANK", "TORCHELASTIC_RUN_ID"))  # torchrun's, not any launcher's
    if ctx.invoked_subcommand not in (None, "train") and launched and not {"-h", "--help"} & set(ctx.meta.get(ARGV_KEY, ())):
        # under torchrun every rank would run it: racing for the run's lock, or writing one file twice
        raise UsageError(f"medcli {ctx.invoked_subcommand} runs in one process (only train is distributed); "
                         "run it without torchrun")


def emit(result) -> None:
    """Write a result to stdout: JSON for dicts/lists, plain text otherwise."""
    if isinstance(result, (dict, list)):
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(str(result))


def _given(ctx: typer.Context, names_: set[str], environment: bool = False) -> list[str]:
    """How each of the parameters `names_` was spelled, for those given on the command line
    (or, with `environment`, through their environment variable): the options a mode ignores."""
    sources = ("COMMANDLINE", "ENVIRONMENT") if environment else ("COMMANDLINE",)
    return ["/".join(p.opts + p.secondary_opts) for p in ctx.command.params
            if p.name in names_ and ctx.get_parameter_source(p.name).name in sources]


def _refuse_given(ctx: typer.Context, names_: set[str], mode: str) -> None:
    """A one-line usage error naming the options of `names_` given although `mode` ignores them."""
    given = _given(ctx, names_)
    if given:
        raise UsageError(f"{mode} does not use {', '.join(given)}; leave {'it' if len(given) == 1 else 'them'} out")


def _choice(name: str, values) -> type[Enum]:
    """A str Enum Typer shows as a choice list, built from a library's own constant."""
    return Enum(name, {value: value for value in values}, type=str)


Optimizer = _choice("Optimizer", names.OPTIMIZERS)
Monitor = _choice("Monitor", names.MONITORS)
Amp = _choice("Amp", names.AMP_MODES)
CompileMode = _choice("CompileMode", names.COMPILE_MODES)
EvalSplit = _choice("EvalSplit", names.EVAL_SPLITS)
Checkpoint = _choice("Checkpoint", names.CHECKPOINTS)
OutputFormat = _choice("OutputFormat", names.COMPARE_FORMATS)
ExplainMethod = _choice("ExplainMethod", tuple(_explainers.METHODS))
ExportFormat = _choice("ExportFormat", names.EXPORT_FORMATS)
ExplainSplit = _choice("ExplainSplit", names.SPLITS)
HeadFusion = _choice("HeadFusion", _explainers.HEAD_FUSIONS)


# ---------------------------------------------------------------------------------------
# Subcommands. Each body parses options and calls one library function.
# ---------------------------------------------------------------------------------------


@app.command()
def download(
    ctx: typer.Context,
    flags: Annotated[
        Optional[list[str]],
        typer.Argument(metavar="FLAG", help="Datasets, e.g. bloodmnist pathmnist (see --list).", show_default=False),
    ] = None,
    size: Annotated[str, typer.Option("--size", "-s", help=f"Image size: {', '.join(map(str, names.SIZES))} or all.")] = "28",
    root: Annotated[
        Optional[Path],
        typer.Option(help="Data folder (default: $MEDCLI_DATA, else ~/.medmnist).", show_default=False),
    ] = None,
    from_file: Annotated[
        Optional[Path],
        typer.Option("--from", help="Import this local npz instead of downloading (one dataset, one size)."),
    ] = None,
    allow_unofficial: Annotated[
        bool,
        typer.Option(
            "--allow-unofficial", help="With --from: accept an md5 that is not the official one (recorded as official: false)."
        ),
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace another readable file of the dataset (--from, --sample, download).")] = False,
    synthetic: Annotated[
        bool,
        typer.Option(
            "--synthetic",
            help="Write a small seeded SYNTHETIC stand-in (the flag's classes and channels; works "
            "offline) for demos and tests in ROOT/synthetic. Recorded as synthetic; never overwrites real data.",
        ),
    ] = False,
    sample: Annotated[
        bool,
        typer.Option(
            "--sample",
            help="Place the embedded sample of real blood-cell images (2,900 PBC images, CC BY 4.0; bloodmnist, "
            "28 px; works offline) in ROOT/sample. Recorded as a sample, not the official file.",
        ),
    ] = False,
    list_: Annotated[bool, typer.Option("--list", help="Show every dataset and the files ROOT holds, verified.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the records (or --list entries) as JSON.")] = False,
    mirror: Annotated[
        Optional[str],
        typer.Option(
            envvar="MEDCLI_MIRROR",
            help="Base URL of a mirror holding the official files under their own names "
            "(e.g. http://host/medmnist), used instead of Zenodo; md5s are still checked.",
        ),
    ] = None,
    tries: Annotated[int, typer.Option(min=1, help="Attempts per file; the waits between them double from 1 s.")] = 3,
    timeout: Annotated[float, typer.Option(min=0.1, help="Seconds to wait for the server before an attempt fails.")] = 30.0,
) -> None:
    """Download MedMNIST datasets, verified by md5.

    Or import a local file with --from. Files go to ROOT/<flag>[_<size>].npz (--sample and
    --synthetic: ROOT/sample/, ROOT/synthetic/) with a JSON record beside each (md5, official or not, source). A file already present with the right
    md5 is not fetched again. Prints the file paths (the records with --json).
    """
    from medcli import download as library

    if list_:
        _refuse_given(ctx, {"size", "from_file", "allow_unofficial", "overwrite", "synthetic", "sample", "mirror",
                            "tries", "timeout"}, "--list (every size of the datasets ROOT holds)")
        entries = library.inventory(root, flags or [])
        if json_out:
            emit(entries)
        else:
            from rich.console import Console

            shown = library.table(entries, root)
            console.widened(Console(), shown).print(shown, crop=False)
        return
    def show(records: list[dict]) -> None:
        emit(records if json_out else "\n".join(record["path"] for record in records))

    try:
        records = library.obtain(
            flags or [], size, root, from_file=from_file, allow_unofficial=allow_unofficial, overwrite=overwrite,
            synthetic=synthetic, sample=sample, mirror=mirror, tries=tries, timeout=timeout,
        )
    except library.Incomplete as exc:  # the files saved are still results
        if exc.records:
            show(exc.records)
        raise
    show(records)


@app.command(help=f"Train a CNN or ViT; prints the new run directory.\n\n{_config.defaults_help()}")
def train(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option(help=_opt("dataset"))] = "bloodmnist",
    size: Annotated[int, typer.Option(help=_opt("size"))] = 28,
    model: Annotated[str, typer.Option(help=_opt("model"))] = _models.DEFAULT_MODEL,
    reduced: Annotated[bool, typer.Option("--reduced", help=_opt("reduced"))] = False,
    epochs: Annotated[Optional[int], typer.Option(min=1, help=_opt("epochs"))] = None,
    batch_size: Annotated[Optional[int], typer.Option(min=2, help=_opt("batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(help=_opt("lr"))] = None,  # checked by config: > 0, finite
    weight_decay: Annotated[Optional[float], typer.Option(min=0.0, help=_opt("weight_decay"))] = None,
    optimizer: Annotated[Optional[Optimizer], typer.Option(help=_opt("optimizer"))] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option(min=0.0, help=_opt("warmup_epochs"))] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(min=0.0, max=0.99, help=_opt("label_smoothing"))] = None,
    mixup_alpha: Annotated[Optional[float], typer.Option(min=0.0, help=_opt("mixup_alpha"))] = None,
    flips: Annotated[Optional[bool], typer.Option("--flips/--no-flips", help=_opt("flips"))] = None,
    rotate: Annotated[Optional[float], typer.Option(help=_opt("rotate"))] = None,
    crop_scale: Annotated[Optional[float], typer.Option(help=_opt("crop_scale"))] = None,
    jitter: Annotated[Optional[float], typer.Option(help=_opt("jitter"))] = None,
    patience: Annotated[Optional[int], typer.Option(min=1, help=_opt("patience"))] = None,
    monitor: Annotated[Optional[Monitor], typer.Option(help=_opt("monitor"))] = None,
    seed: Annotated[int, typer.Option(min=0, max=_config.SEED_MAX, help=_opt("seed"))] = 0,
    deterministic: Annotated[bool, typer.Option("--deterministic", help=_opt("deterministic"))] = False,
    device: Annotated[str, typer.Option(help=_opt("device"))] = "auto",
    amp: Annotated[Optional[Amp], typer.Option(help=_opt("amp"))] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", show_default=False, help=_opt("compile"))] = False,
    compile_mode: Annotated[Optional[CompileMode], typer.Option(help=_opt("compile_mode"))] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", show_default=False, help=_opt("pretrained"))] = False,
    weights: Annotated[Optional[Path], typer.Option(help=_opt("weights"))] = None,
    input_size: Annotated[Optional[int], typer.Option(min=8, help=_opt("input_size"))] = None,
    root: Annotated[Optional[Path], typer.Option(help=_opt("root"))] = None,
    runs_dir: Annotated[Path, typer.Option(help=_opt("runs_dir"))] = Path("runs"),
    resume: Annotated[Optional[Path], typer.Option(metavar="RUN", help=(
        "Continue an interrupted run with its own options; only --device, --root, --nproc, --json, --collective-timeout go with it."))] = None,
    nproc: Annotated[Optional[int], typer.Option(min=1, help=(
        "Train with N processes on this machine (one per GPU; gloo on CPU) through torchrun, as "
        "'torchrun --standalone --nproc-per-node N -m medcli train' with the other options would. "
        "--batch-size is the global batch."))] = None,
    sync_bn: Annotated[bool, typer.Option("--sync-bn", help=_opt("sync_bn"))] = False,
    data_budget: Annotated[Optional[float], typer.Option(min=0.0, help=_opt("data_budget_gb"))] = None,
    collective_timeout: Annotated[Optional[float], typer.Option(metavar="SECONDS", help=_opt("collective_timeout"))] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON.")] = False,
) -> None:
    if resume is not None:  # refused before the run is read: the options it would ignore
        own = {"resume", "nproc", "device", "collective_timeout", "root", "json_output"}
        given = _given(ctx, {p.name for p in ctx.command.params} - own, environment=True)
        if given:
            raise UsageError(f"--resume continues RUN with its own options; leave out {', '.join(given)} "
                             "(or start a new run)")
    if compile_mode is not None and not compile and _given(ctx, {"compile"}):
        raise UsageError(f"--compile-mode {compile_mode.value} compiles the model; leave out --no-compile")
    from medcli import distributed
    from medcli import train as library

    options = dict(
        dataset=dataset, size=size, model=model, reduced=reduced, epochs=epochs, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, optimizer=optimizer.value if optimizer else None,
        warmup_epochs=warmup_epochs, label_smoothing=label_smoothing, mixup_alpha=mixup_alpha,
        flips=flips, rotate=rotate, crop_scale=crop_scale, jitter=jitter,
        patience=patience, monitor=monitor.value if monitor else None, seed=seed, deterministic=deterministic, device=device,
        amp=amp.value if amp else None, compile=compile,
        compile_mode=compile_mode.value if compile_mode else None, pretrained=pretrained, weights=weights,
        input_size=input_size, root=root, runs_dir=runs_dir, sync_bn=sync_bn,
        data_budget_gb=data_budget, collective_timeout=collective_timeout,
    )
    if nproc is not None and nproc > 1:
        if resume is None:
            library.check_launch(nproc, **options)
        else:
            library.check_resume_launch(resume, nproc, device)
        from medcli import processes

        raise typer.Exit(distributed.launch(nproc, ctx.meta[ARGV_KEY], lost=processes.mark_lost))
    run = (library.resume(resume, device=device, collective_timeout=collective_timeout, root=root) if resume is not None
           else library.train(**options))
    if distributed.is_main_process():  # the other processes of a distributed job print nothing
        emit(library.summary(run) if json_output else str(run.run_dir.resolve()))


@app.command()
def evaluate(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory printed by 'medcli train'.")],
    split: Annotated[EvalSplit, typer.Option(help="Split to evaluate; all = test, val and train.")] = EvalSplit.test,
    checkpoint: Annotated[Checkpoint, typer.Option(help="best.pt (as the run's selection rule chose it; see 'medcli train --help') or last.pt.")] = Checkpoint.best,
    tta: Annotated[bool, typer.Option("--tta/--no-tta", show_default=False, help=(
        "Average fixed flipped views: the identity and each flip the run trained with (none for a run "
        "trained without flips). Default: off."))] = False,
    calibrate: Annotated[bool, typer.Option("--calibrate", help="Temperature scaling fitted on val; ECE/NLL before and after.")] = False,
    medmnist_csv: Annotated[bool, typer.Option("--medmnist-csv", help="Also write predictions/medmnist/*.csv, the layout medmnist.Evaluator reads.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    amp: Annotated[Optional[Amp], typer.Option(help="Mixed precision (default off: float32 logits feed the metrics).")] = None,
    root: Annotated[Optional[Path], typer.Option(help="Data root, if the dataset file moved since training.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help=(
        "Print the metrics JSON keyed by split, and the written files under 'files'."))] = False,
) -> None:
    """Evaluate a run: metrics, predictions, figures, a report.

    Writes metrics/<split>.json, predictions/<split>.csv, figures/*_<split>.png and
    report.xlsx into the run. Prints the written files; the summary table goes to stderr.
    """
    from medcli import evaluate as library
    from medcli import webpage

    result = library.evaluate_run(run, split=split.value, checkpoint=checkpoint.value, tta=tta, calibrate=calibrate,
                                  medmnist_csv=medmnist_csv,
                                  batch_size=batch_size, device=device, amp=amp.value if amp else None, root=root)
    webpage.refresh_run_page(run)
    files = library.written_files(result)
    emit({**result["splits"], "files": files} if json_output else "\n".join(files))


PairOption = Annotated[Optional[tuple[str, str]], typer.Option(metavar="A B", help=(
    "Paired tests of these two setups (each a run directory, run id or setup label) on the same test images: "
    "McNemar's exact test (accuracy), a paired bootstrap (AUC), and across seeds a t-interval of the mean "
    "difference. Default: the only two setups, when exactly two are compared."))]


def _pair(pair: tuple[str, str] | None) -> tuple[str, str] | None:
    return pair if pair and all(pair) else None


@app.command()
def aggregate(
    ctx: typer.Context,
    runs: Annotated[Optional[list[Path]], typer.Argument(metavar="RUN|DIR", help=(
        "Run directories or folders searched for runs (default: .)."))] = None,
    split: Annotated[str, typer.Option(help="Which metrics/<split>.json to compare: test, val or train.")] = "test",
    metrics: Annotated[Optional[str], typer.Option(help=(
        f"Comma-separated metrics (default: {', '.join(names.COMPARE_METRICS)}); road_<method> (e.g. road_gradcam) "
        "is the mean ROAD faithfulness of that explain method (blank for a model it cannot explain), road that of "
        "each run's own method (rollout for a ViT, a CAM for a CNN), named in the cell."))] = None,
    out: Annotated[Optional[Path], typer.Option(help=(
        "Write comparison CSV, XLSX, Markdown and PNG into this folder; the files written are printed after the "
        "table (json: a files list; csv and md: logged on stderr)."))] = None,
    format: Annotated[OutputFormat, typer.Option("--format", help="What to print on stdout (xlsx needs --out).")] = OutputFormat.table,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON: --format json.")] = False,
    maps: Annotated[bool, typer.Option("--maps", help=(
        "Compare the runs' stored explanation maps instead (no model needed): per common sample, Spearman "
        "correlation and top-20% overlap between every two explained (run, method), per class means, and a "
        "side-by-side figure; needs --out."))] = False,
    method: Annotated[Optional[str], typer.Option(help="With --maps: only these explain methods (comma-separated).")] = None,
    root: Annotated[Optional[Path], typer.Option(help=(
        "With --maps: the data folder holding the runs' dataset, when it is no longer where they trained."))] = None,
    pair: PairOption = None,
    reference: Annotated[bool, typer.Option("--reference", help=(
        "Add the published MedMNIST v2 numbers (ACC, AUC of 7 methods) for each compared dataset, marked as "
        "different data when a run did not use the official 28-px file."))] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Show every column (data, evaluation, run ids, epochs, train time).")] = False,
) -> None:
    """Compare runs in one table and chart.

    Seeds of one setup become mean ± std. Runs that are unfinished, not evaluated or
    unreadable are listed with the reason. With --maps, compare where the runs look instead
    (CNN vs ViT on the same samples).
    """
    if json_output:  # as every other command spells it
        if _given(ctx, {"format"}) and format is not OutputFormat.json:
            raise UsageError(f"--json prints JSON and --format {format.value} a {format.value}; give one of them")
        format = OutputFormat.json
    if maps:
        from medcli import maps as compare_maps

        _refuse_given(ctx, {"split", "metrics", "pair", "reference", "wide"},
                      "--maps (the split and samples the runs explained)")
        methods = [m.strip() for m in method.split(",") if m.strip()] if method else None
        summary = compare_maps.aggregate_maps(runs or ["."], out, methods, fmt=format.value, root=root)
        emit(summary if format is OutputFormat.json else "\n".join([*compare_maps.lines(summary), *summary["files"]]))
        return
    _refuse_given(ctx, {"method", "root"}, "aggregate without --maps (the metrics files evaluate wrote)")
    from medcli import aggregate as library

    chosen = [m.strip() for m in metrics.split(",") if m.strip()] if metrics else names.COMPARE_METRICS
    emit(library.compare(runs or [], split=split, metric_names=chosen, out_dir=out, fmt=format.value,
                         pair=_pair(pair), reference=reference, wide=wide))


@app.command("plot-confusion")
def plot_confusion(
    ctx: typer.Context,
    target: Annotated[Path, typer.Argument(metavar="RUN|CSV", help="A run directory or a predictions CSV.")],
    split: Annotated[str, typer.Option(help="With a run directory: which predictions/<split>.csv.")] = "test",
    normalize: Annotated[Optional[bool], typer.Option("--normalize/--no-normalize", help="Row-normalised or counts only (default: both, side by side, stacked from 9 classes; multi-label: a grid of per-label counts).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Image file to write (.png, .pdf, .svg).")] = None,
) -> None:
    """Redraw a confusion matrix from a predictions CSV.

    No model needed: class names come from the CSV header. Prints the written image path.
    """
    from medcli import reports

    if target.is_file():  # a CSV is one split's predictions already (a mistyped run: plot_confusion says so)
        _refuse_given(ctx, {"split"}, "a predictions CSV (it holds one split)")
    emit(str(reports.plot_confusion(target, split=split, normalize=normalize, out=out).resolve()))


@app.command()
def explain(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory printed by 'medcli train'.")],
    method: Annotated[ExplainMethod, typer.Option(help="CAM method (CNNs and ViTs) or rollout (ViTs only).")] = ExplainMethod("gradcam"),
    split: Annotated[ExplainSplit, typer.Option(help="Split the samples come from.")] = ExplainSplit("test"),
    per_class: Annotated[Optional[int], typer.Option(min=1, help=f"Samples per true class (default {_explainers.DEFAULT_PER_CLASS}), seeded.")] = None,
    indices: Annotated[Optional[str], typer.Option(help="Explain these sample numbers instead, e.g. 3,17,42.")] = None,
    only_errors: Annotated[bool, typer.Option("--only-errors", help="Only samples the model gets wrong on the image alone (no test-time views).")] = False,
    target: Annotated[str, typer.Option(help="Class to explain: pred (the predicted class; multi-label: the most probable label), true, or a class number or name (eigencam and rollout map every class alike; ROAD scores the target).")] = "pred",
    layer: Annotated[Optional[str], typer.Option(help=_explainers.LAYER_HELP)] = None,
    checkpoint: Annotated[Checkpoint, typer.Option(help="best.pt (as the run's selection rule chose it; see 'medcli train --help') or last.pt.")] = Checkpoint.best,
    seed: Annotated[int, typer.Option(min=0, max=_config.SEED_MAX, help="Seed of the sample choice and of ROAD's noise.")] = 0,
    head_fusion: Annotated[HeadFusion, typer.Option(help="Rollout: how the heads of a block are combined.")] = HeadFusion(_explainers.DEFAULT_OPTIONS["head_fusion"]),
    discard_ratio: Annotated[float, typer.Option(help="Rollout: share of the weakest attention to patches dropped per block.")] = _explainers.DEFAULT_OPTIONS["discard_ratio"],
    batch_size: Annotated[int, typer.Option(min=1, help="Images per CAM batch (Score-CAM: one image at a time, this many masked copies per forward pass).")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    root: Annotated[Optional[Path], typer.Option(help="Data root, if the dataset file moved since training.")] = None,
    faithfulness: Annotated[bool, typer.Option("--faithfulness/--no-faithfulness", help=(
        "Score each map's faithfulness to the model with ROAD (Rong et al. 2022, grad-cam's "
        "pytorch_grad_cam.metrics): index.json, the manifest and 'aggregate --metrics road_<method>'."))] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=(
        "Replace this method's earlier maps of other samples, checkpoint, target, layer, faithfulness or "
        "ROAD seed."))] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print index.json on stdout instead of the directory.")] = False,
) -> None:
    """Explain predictions: CAM methods or attention rollout.

    Writes into the run's explain/<method>/: per sample a titled PNG (original | heat map |
    overlay) named <split>_<index>_gt-<class>_pred-<class>.png (multi-label: gt- lists every
    label, or none; top- for the most probable label when none is found), a grid per class, maps.npz (the raw maps) and index.json (with each map's
    ROAD faithfulness). Prints the directory.
    """
    from medcli import explain as library
    from medcli import webpage

    index = library.explain_run(
        run, method=method.value, split=split.value, per_class=per_class, indices=library.parse_indices(indices),
        only_errors=only_errors, target=target, layer=layer, checkpoint=checkpoint.value, seed=seed,
        head_fusion=head_fusion.value, discard_ratio=discard_ratio, batch_size=batch_size, device=device, root=root,
        faithfulness=faithfulness, overwrite=overwrite)
    webpage.refresh_run_page(run)
    emit(index if json_output else index["dir"])


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(metavar="RUN", help=(
        "A run directory, or a model file 'medcli export' wrote (.onnx or TorchScript .pt, its .json beside it)."))],
    paths: Annotated[list[str], typer.Argument(metavar="PATH", show_default=False, help=(
        "Image files (PNG, JPEG, TIFF, BMP; 8/16 bit; gray, RGB, RGBA), folders (searched recursively, sorted), "
        "globs, .npy/.npz arrays in the MedMNIST layout, DICOM (pip install 'medcli[dicom]')."))],
    out: Annotated[Optional[Path], typer.Option(help=(
        "Write the CSV here (default: print it on stdout); written for the readable files also when some fail "
        "(then exit 2 without --skip-bad)."))] = None,
    tta: Annotated[bool, typer.Option("--tta", help="Average the trained flips as test-time views, as evaluate --tta.")] = False,
    calibrated: Annotated[bool, typer.Option("--calibrated", help=(
        "Apply the temperature of the run's calibrated evaluation (evaluate --calibrate)."))] = False,
    explain: Annotated[Optional[ExplainMethod], typer.Option(help=(
        "Also write one overlay per image (image, map, overlay) into OUT's name + _METHOD/; needs --out and a run."))] = None,
    checkpoint: Annotated[Optional[Checkpoint], typer.Option(show_default=False, help=(
        "A run's best.pt (the default) or last.pt; an exported file: only the checkpoint it was exported from."))] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images read and predicted at a time.")] = 256,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N (ONNX models run on the CPU).")] = "auto",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help=(
        "Exit 0 when some files cannot be read (they are listed on stderr and left out); default: exit 2. "
        "None readable is always exit 2."))] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out (and its overlays).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help=(
        "Print JSON instead of CSV: one record per image, the files that failed, and the model used."))] = False,
) -> None:
    """Predict image files with a run or an exported model.

    Each image gets the run's preprocessing: the dataset's channels, a centre crop and a
    bicubic resize to the dataset's image size (as MedMNIST made its images), then what
    evaluate does. Prints (or writes with --out) a CSV: path, prediction, one prob_ column per
    class or label. A file that cannot be read is one line on stderr; the others are predicted.
    """
    from medcli import predict as library

    result = library.predict_files(model, paths, out=out, tta=tta, calibrated=calibrated,
                                   explain=explain.value if explain else None,
                                   checkpoint=checkpoint.value if checkpoint else None,
                                   batch_size=batch_size, device=device, overwrite=overwrite)
    table = result["table"]
    if json_output:
        emit({"predictions": table.to_dict(orient="records"), "failed": result["failed"], "model": result["model"],
              "out": str(result["out"].resolve()) if result["out"] else None})
    elif result["out"] is not None:
        emit(str(result["out"].resolve()))
    else:
        typer.echo(table.to_csv(index=False), nl=False)
    if result["failed"]:
        failed = console.plural(len(result["failed"]), "file")
        if skip_bad:
            console.warn(f"--skip-bad: {failed} left out: {', '.join(f['path'] for f in result['failed'])}")
        else:
            console.error(f"{failed} could not be read (listed above); pass --skip-bad to exit 0 anyway")
            raise typer.Exit(EXIT_USAGE)


@app.command()
def export(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory printed by 'medcli train'.")],
    format: Annotated[ExportFormat, typer.Option("--format", help=(
        "onnx (torch.onnx.export, dynamic batch) or torchscript (the fallback, torch.jit.trace)."))] = ExportFormat.onnx,
    checkpoint: Annotated[Checkpoint, typer.Option(help="best.pt or last.pt.")] = Checkpoint.best,
    out: Annotated[Optional[Path], typer.Option(help=(
        "The model file (default RUN/export/<run id>_<checkpoint>.onnx, or _torchscript.pt); .json and .md beside it."))] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace earlier export files.")] = False,
    root: Annotated[Optional[Path], typer.Option(help="Data root, if the dataset file moved since training.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the files and the check as JSON.")] = False,
) -> None:
    """Export a run to ONNX or TorchScript, with a model card.

    The export is checked before it is kept: its logits must match PyTorch's on the run's
    test images. Beside the model: <name>.json (classes, task, preprocessing, temperature,
    versions, dataset record; what 'medcli predict MODEL' reads) and <name>.md, a model card.
    Needs the export extra: pip install 'medcli[export]'. Prints the three paths.
    """
    from medcli import export as library

    result = library.export_run(run, format=format.value, checkpoint=checkpoint.value, out=out,
                                overwrite=overwrite, root=root)
    emit(result if json_output else "\n".join(result[key] for key in ("model", "sidecar", "card")))


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN", show_default=False, help=(
        "A run directory for its own page; with --out, runs or folders of runs to compare."))],
    out: Annotated[Optional[Path], typer.Option(help=(
        "Write a page comparing the runs into this folder: comparison.html, beside the chart and "
        "maps figure it shows."))] = None,
    pair: PairOption = None,
) -> None:
    """Write one HTML page a person can open or print.

    One run: RUN/report.html, with the data's provenance, the metrics and their intervals,
    the calibration before and after, every figure, the explanation grids and the config.
    With --out: a comparison page (aggregate's table, paired tests and chart, and how the
    runs' explanation maps agree). Self-contained: figures are embedded, nothing is loaded
    from the network. Prints the page's path.
    """
    from medcli import webpage

    emit(str(webpage.report(runs, out, pair=_pair(pair)).resolve()))


@app.command("clean-processes")
def clean_processes(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list, never ask (without --yes: asks on a terminal, else lists).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="End the listed processes without asking.")] = False,
    older_than: Annotated[
        Optional[str], typer.Option(help="Only processes older than this, e.g. 30m, 2h, 1d.")
    ] = None,
    run: Annotated[Optional[Path], typer.Option(help="Only the job working on this run directory (its launcher and ranks too).")] = None,
    pid: Annotated[Optional[int], typer.Option(help="Only the job of this process (its launcher and ranks too); exit 1 if it is no medcli process of yours.")] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the processes as JSON on stdout.")] = False,
) -> None:
    """List or end this user's other medcli processes.

    Shows pid, age, command, run, CPU, memory and GPU memory. Ending a process: SIGTERM, then
    SIGKILL after --grace seconds, and its runs are marked interrupted; --run or --pid keeps
    to one job (a launcher and its ranks). Other users' processes
    and processes other than medcli are never touched. Without --yes it only lists, or asks
    when run from a terminal."""
    from medcli import processes

    def ask(count: int) -> bool:  # only from a terminal, and never when stdout carries JSON
        question = f"End {console.plural(count, 'process', 'processes')}?"
        return sys.stdin.isatty() and not json_out and typer.confirm(question, err=True)

    from rich.console import Console

    report = processes.clean(dry_run=dry_run, yes=yes, older_than=older_than, grace_s=grace,
                             show=None if json_out else Console(highlight=False).print,  # the listing: stdout
                             confirm=ask, run=run, pid=pid)
    if json_out:
        emit(report)
    if report["ended"] and not all(p["ended"] for p in report["processes"]):
        raise typer.Exit(EXIT_FAILURE)


def main() -> None:
    code: int | str | None = 0
    try:
        app(prog_name="medcli")
    except SystemExit as exc:
        code = exc.code
        raise
    except KeyboardInterrupt:  # before a command began (its commands being built): nothing to record
        code = EXIT_INTERRUPTED
        raise SystemExit(code) from None
    finally:  # the command has ended and said so: a Ctrl-C or SIGTERM while the interpreter tears torch
        # down (a second or more) ends the process at once with the command's own exit code, not by
        # the signal and without a traceback (and a teardown that hangs can still be stopped)
        def finished(signum, frame):
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(code if isinstance(code, int) else 0 if code is None else 1)

        signal.signal(signal.SIGINT, finished)
        signal.signal(signal.SIGTERM, finished)
