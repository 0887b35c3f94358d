"""User-facing errors. The CLI turns each into one red line and its exit code."""

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "Interrupted", "MedcliError", "UsageError", "check_stop",
           "clear_stop", "request_stop"]

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class MedcliError(Exception):
    """A failure we can explain to the user in one line (exit 1: runtime failure)."""

    exit_code = EXIT_FAILURE

    def __init__(self, *args, rank_specific: bool = False):
        super().__init__(*args)
        # in a distributed job: found by this process alone, so said by it (a usage error every
        # process finds is said by each node's first)
        self.rank_specific = rank_specific


class UsageError(MedcliError):
    """Bad usage or bad input: wrong option value, missing or malformed file (exit 2)."""

    exit_code = EXIT_USAGE


class Interrupted(MedcliError):
    """Ctrl-C or SIGTERM (exit 130)."""

    exit_code = EXIT_INTERRUPTED


_stops: list[int] = []  # signals asked to stop this command, not yet answered by its exit


def request_stop(signum: int, frame=None) -> None:
    """The handler of SIGINT and SIGTERM: Ctrl-C, remembered. A KeyboardInterrupt raised while
    Python runs a finaliser or a weakref callback is printed as "Exception ignored" and dropped,
    so the loops that run long call `check_stop` and raise it again."""
    _stops.append(signum)
    raise KeyboardInterrupt


def check_stop() -> None:
    """KeyboardInterrupt when a stop was asked for and never reached the command (`request_stop`)."""
    if _stops:
        raise KeyboardInterrupt


def clear_stop() -> None:
    """The stop asked for has ended the command (or a new command starts)."""
    _stops.clear()
