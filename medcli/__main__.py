"""`medcli` and `python -m medcli`. A Ctrl-C while the command line starts up (importing the
CLI, building its commands) ends it like one a moment later: exit 130, no traceback."""

import sys

__all__ = ["main"]


def main() -> None:
    try:
        from medcli.cli import main as command_line
    except KeyboardInterrupt:
        sys.exit(130)
    command_line()


if __name__ == "__main__":
    main()
