"""The one Rich console (on stderr), log helpers and the progress-bar factory.

stdout is reserved for results a script can consume; everything here goes to stderr.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.markup import escape
from rich.text import Text
from rich.progress import (
    BarColumn,
    ProgressColumn,
    Task,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
    DownloadColumn,
)

__all__ = ["configure", "console", "debug", "error", "info", "is_quiet", "is_verbose", "plural", "progress", "silenced",
           "warn", "widened"]

_state = {"quiet": False, "verbose": False}
_console: Console | None = None


def configure(quiet: bool = False, verbose: bool = False) -> None:
    _state["quiet"] = quiet
    _state["verbose"] = verbose


def is_verbose() -> bool:
    return _state["verbose"]


def is_quiet() -> bool:
    return _state["quiet"]


@contextmanager
def silenced() -> Iterator[None]:
    """Info and warnings off inside: a check whose work runs (and speaks) again later."""
    before = _state["quiet"]
    _state["quiet"] = True
    try:
        yield
    finally:
        _state["quiet"] = before


def console() -> Console:
    """The stderr console (created lazily so tests can swap sys.stderr)."""
    global _console
    if _console is None or _console.file is not sys.stderr:
        _console = Console(stderr=True, highlight=False, soft_wrap=True)
    return _console


def widened(out: Console, renderable) -> Console:
    """`out`, at least as wide as `renderable` can be (a table that cannot fit the terminal
    runs past it, rather than cut its cells to "…")."""
    from rich.measure import Measurement

    unbounded = out.options.update_width(sys.maxsize)  # the renderable's own minimum, not the page's
    out.width = max(out.width, Measurement.get(out, unbounded, renderable).minimum)
    return out


# Messages are plain text: file names ("scan.tif[frame 1]") and library errors ("[/src/pair.cc:534]")
# hold square brackets, which Rich would read as markup; only the prefixes below are styled.
def info(message: str) -> None:
    if not _state["quiet"]:
        console().print(escape(str(message)))


def debug(message: str) -> None:
    if _state["verbose"]:
        console().print(f"[dim]{escape(str(message))}[/dim]")


def warn(message: str) -> None:
    if not _state["quiet"]:  # --quiet: errors only
        console().print(f"[yellow]warning:[/yellow] {escape(str(message))}")


def error(message: str) -> None:
    # One line: collapse any newlines a library message might carry.
    text = " ".join(str(message).split())
    console().print(f"[bold red]error:[/bold red] {escape(text)}", markup=True, highlight=False)


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """'1 sample', '2 samples' ('1 process', '2 processes' with `plural_form`)."""
    return f"{count} {noun if count == 1 else plural_form or noun + 's'}"


def progress_enabled() -> bool:
    """Bars only on an interactive stderr and never with --quiet (Rich's is_terminal alone is
    true under FORCE_COLOR, which CI logs set: the bars' redraws would fill them)."""
    return not _state["quiet"] and console().is_terminal and sys.stderr.isatty()


class _RateColumn(ProgressColumn):
    """Items per second, in the unit named by the task's `unit` field (default "it")."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        if not task.speed:
            return Text(f"- {unit}/s", style="progress.data.speed")
        return Text(f"{task.speed:,.0f} {unit}/s", style="progress.data.speed")


class _StatusColumn(ProgressColumn):
    """Free text a task carries in its `status` field (live loss, accuracy, lr...)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("status", "")))


@contextmanager
def progress(kind: str = "items") -> Iterator[Progress]:
    """A Rich progress bar: spinner, description, bar, done/total, rate, elapsed, ETA.

    kind="bytes" shows transferred size and speed instead of counts. Tasks may carry
    `unit=` (for the rate) and `status=` (free text) fields. The bar is disabled (all calls
    become no-ops) when stderr is not a terminal or with --quiet.
    """
    if kind == "bytes":
        counts = [DownloadColumn(), TransferSpeedColumn()]
    else:
        counts = [MofNCompleteColumn(), _RateColumn()]
    bar = Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        *counts,
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        _StatusColumn(),
        console=console(),
        disable=not progress_enabled(),
    )
    with bar:
        yield bar
