"""The `medcli` Typer app: one thin function per subcommand.

Each command parses its options and calls one library function. Heavy modules (torch, timm,
the stage modules) are imported inside the command bodies so `medcli --help` stays instant.
Errors are turned into one red line and an exit code in one place: `MedcliGroup.invoke`.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

try:  # typer >= 0.20 vendors click as typer._click
    from typer._click.exceptions import UsageError as ClickUsageError
except ImportError:  # pragma: no cover - older typer uses click itself
    from click.exceptions import UsageError as ClickUsageError

from medcli import __version__, console
from medcli.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, MedcliError


class MedcliGroup(TyperGroup):
    """Turns every failure inside a subcommand into one line on stderr and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort):
            raise
        except ClickUsageError as exc:
            name = f"medcli {exc.ctx.info_name}" if exc.ctx and exc.ctx.parent else "medcli"
            console.error(f"{exc.format_message()} (see '{name} --help')")
            raise typer.Exit(EXIT_USAGE) from None
        except MedcliError as exc:
            if console.is_verbose():
                console.console().print_exception()
            console.error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # an unexpected bug: one line unless --verbose
            if console.is_verbose():
                console.console().print_exception()
            console.error(f"unexpected {type(exc).__name__}: {exc} (re-run with --verbose for the traceback)")
            raise typer.Exit(EXIT_FAILURE) from None


app = typer.Typer(
    cls=MedcliGroup,
    name="medcli",
    help="MedMNIST from download to a trained, evaluated, explained and compared classifier.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medcli {__version__}")
        raise typer.Exit()


def _sigterm(signum, frame):  # SIGTERM behaves like Ctrl-C: stages end "interrupted", exit 130
    raise KeyboardInterrupt


@app.callback()
def main_options(
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
    signal.signal(signal.SIGTERM, _sigterm)


def emit(result) -> None:
    """Write a result to stdout: JSON for dicts/lists, plain text otherwise."""
    if isinstance(result, (dict, list)):
        typer.echo(json.dumps(result, indent=2, default=str))
    else:
        typer.echo(str(result))


def _not_implemented(name: str) -> None:
    from medcli.errors import UsageError

    raise UsageError(f"'medcli {name}' is not implemented yet")


# ---------------------------------------------------------------------------------------
# Subcommands. Each body parses options and calls one library function.
# ---------------------------------------------------------------------------------------


@app.command()
def download() -> None:
    """Download (or import with --from) MedMNIST datasets, verified by md5."""
    _not_implemented("download")


@app.command()
def train() -> None:
    """Train a CNN or ViT; prints the new run directory."""
    _not_implemented("train")


@app.command()
def evaluate() -> None:
    """Evaluate a trained run: metrics, predictions, figures and an Excel report."""
    _not_implemented("evaluate")


@app.command()
def aggregate() -> None:
    """Compare runs in one table and chart."""
    _not_implemented("aggregate")


@app.command("plot-confusion")
def plot_confusion() -> None:
    """Redraw a confusion matrix from a run's predictions CSV (no model needed)."""
    _not_implemented("plot-confusion")


@app.command()
def explain() -> None:
    """Explain predictions with CAM methods or attention rollout."""
    _not_implemented("explain")


@app.command("clean-processes")
def clean_processes(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list (the default without --yes).")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="End the listed processes without asking.")] = False,
    older_than: Annotated[
        Optional[str], typer.Option(help="Only processes older than this, e.g. 30m, 2h, 1d.")
    ] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds between SIGTERM and SIGKILL.")] = 10.0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the processes as JSON on stdout.")] = False,
) -> None:
    """List this user's other medcli processes (pid, age, command, run, CPU, memory, GPU
    memory); with consent end them: SIGTERM, then SIGKILL after --grace seconds, and mark
    their runs interrupted. Other users' processes and non-medcli processes are never
    touched. Without --yes it only lists, or asks when run from a terminal."""
    from medcli import processes
    from medcli.errors import UsageError

    if dry_run and yes:
        raise UsageError("--dry-run and --yes contradict each other; pass one of them")
    found = processes.find_processes(processes.parse_duration(older_than) if older_than else 0.0)
    if not json_out:
        console.console().print(processes.table(found, f"{len(found)} medcli process(es)"))
    end = bool(found) and not dry_run and (
        yes or (sys.stdin.isatty() and not json_out and typer.confirm(f"End {len(found)} process(es)?", err=True))
    )
    result = processes.end_processes(found, grace) if end else [p.to_dict() for p in found]
    if json_out:
        emit({"ended": end, "processes": result})
    elif end:
        console.info(f"ended {len(result)} process(es)")


def main() -> None:
    app(prog_name="medcli")
