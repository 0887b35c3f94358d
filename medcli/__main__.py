"""`medcli` and `python -m medcli`. A Ctrl-C while the command line starts up (importing the
CLI, building its commands) ends it like one a moment later: exit 130, no traceback. Text a
console's encoding lacks (a Latin-1 or cp1252 terminal) is written as "?"."""

import sys

from medcli.errors import EXIT_INTERRUPTED

__all__ = ["main"]


def main() -> None:
    for stream in (sys.stdout, sys.stderr):  # a console that cannot show "±", "★" or "↓" gets "?", not an error
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        from medcli.cli import main as command_line
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    command_line()


if __name__ == "__main__":
    main()
