"""Helpers shared by the CLI tests."""

from __future__ import annotations

import json
import subprocess
import sys


HEAVY = ("torch", "numpy", "timm", "torchvision", "sklearn", "matplotlib", "pandas", "scipy")


def heavy_imports(args: list[str]) -> list[str]:
    """Run `medcli ARGS` in a fresh interpreter; the heavy packages it imported on the way."""
    code = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from medcli.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        "assert r.exit_code == 0, r.output\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def one_line_error(result, code: int | None = None, *needles: str) -> str:
    """Assert medcli's error contract on a CliRunner result and return the error line: a
    non-zero exit (`code` if given), nothing on stdout, no traceback, exactly one `error:` line
    on stderr (warnings may precede it) holding every needle."""
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, result.output
    assert result.stdout == "", result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], result.stderr
    return errors[0]


def calibrated_probabilities(csv, rows=slice(None)):
    """The probabilities of `evaluate`'s predictions CSV (the model's own) scaled by the
    temperature its sidecar records: what `predict --calibrated` gives for those images."""
    import numpy as np
    import pandas as pd

    from medcli import tables, tasks

    frame = pd.read_csv(csv).iloc[rows]
    sidecar = json.loads(tables.task_file(csv).read_text())
    probs = frame[[c for c in frame.columns if str(c).startswith(tables.PROB_PREFIX)]].to_numpy(dtype=float)
    temperature = np.asarray(sidecar.get("temperature", 1.0), dtype=float)
    if sidecar["task"] == tasks.MultiLabel.kind:  # one sigmoid per label
        return 1.0 / (1.0 + np.exp(-(np.log(probs) - np.log1p(-probs)) / temperature))
    scaled = np.log(probs) / temperature  # softmax(z / T) from softmax(z): log p is z up to a constant
    scaled -= scaled.max(axis=1, keepdims=True)
    return np.exp(scaled) / np.exp(scaled).sum(axis=1, keepdims=True)


def interrupt_at_call(monkeypatch, owner, name: str, call: int = 2):
    """Replace `owner.name` by a stand-in whose `call`-th call raises KeyboardInterrupt (Ctrl-C
    there) and whose other calls go through; returns the original."""
    real, calls = getattr(owner, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return real
