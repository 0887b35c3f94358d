"""User-facing errors. The CLI turns each into one red line and its exit code."""

__all__ = ["EXIT_FAILURE", "EXIT_INTERRUPTED", "EXIT_USAGE", "Interrupted", "MedcliError", "UsageError"]

EXIT_OK = 0
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
