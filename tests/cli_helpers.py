"""Helpers shared by the CLI tests."""

from __future__ import annotations

import subprocess
import sys


def cli_imports_torch(args: list[str]) -> bool:
    """Run `medcli ARGS` in a fresh interpreter; True if torch got imported on the way."""
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from medcli.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"
