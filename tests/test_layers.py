"""The import layering of docs/contracts.md: no module imports a higher layer, no stage module
imports another, and only the CLI imports Typer or Click. Function-level imports count too
(they are how heavy modules are kept out of `--help`, not a way around the layering). The
layers are read from the module map in docs/contracts.md: it is the one list."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import medcli

PACKAGE = Path(medcli.__file__).parent
CONTRACTS = PACKAGE.parent / "docs" / "contracts.md"
CLI_ONLY = {"typer", "click"}


def module_map(text: str) -> dict[str, int]:
    """module -> layer, from the rows of the `| layer | module | owns |` table (a row may name
    several modules, each in backticks)."""
    layers, in_table = {}, False
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:3] == ["layer", "module", "owns"]:
            in_table = True
        elif not cells:
            in_table = False
        elif in_table and cells[0].isdigit():
            for module in re.findall(r"`([\w.]+)`", cells[1]):
                assert module not in layers, f"{module} has two rows in docs/contracts.md's module map"
                layers[module] = int(cells[0])
    return layers


LAYERS = module_map(CONTRACTS.read_text(encoding="utf-8"))
STAGES = {name for name, layer in LAYERS.items() if layer == LAYERS["train"]}  # one entry point per command


def _imports(path: Path) -> set[str]:
    """Top-level packages and medcli modules a file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "medcli":
                found |= {f"medcli.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def _modules() -> set[str]:
    return {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}


def test_the_module_map_parses():
    assert {"names", "run", "train", "cli", "__main__"} <= set(LAYERS)
    assert {"train", "evaluate", "explain", "aggregate", "download"} <= STAGES and "cli" not in STAGES


def test_every_module_has_a_layer():
    assert _modules() == set(LAYERS), "give each module one row of docs/contracts.md's module map (and no other)"


def test_no_module_imports_a_higher_layer_and_only_the_cli_imports_typer():
    upward, cli_only = [], []
    for name, layer in LAYERS.items():
        for imported in _imports(PACKAGE / f"{name}.py"):
            top = imported.split(".")[0]
            if top in CLI_ONLY and name != "cli":
                cli_only.append(f"{name} imports {top}")
            if top == "medcli" and imported.count(".") >= 1:
                target = imported.split(".")[1]
                if target in LAYERS and LAYERS[target] > layer:
                    upward.append(f"{name} (layer {layer}) imports {target} (layer {LAYERS[target]})")
    assert upward == [] and cli_only == []


def test_no_stage_module_imports_another():
    """One stage never imports another (not even inside a function): what two stages share
    moves down a layer."""
    crossing = []
    for name in sorted(STAGES):
        for imported in _imports(PACKAGE / f"{name}.py"):
            parts = imported.split(".")
            if parts[0] == "medcli" and len(parts) > 1 and parts[1] in STAGES - {name}:
                crossing.append(f"{name} imports {parts[1]}")
    assert crossing == []


def test_every_module_declares_its_public_names():
    """`__all__`: a list of the names other modules, tests and scripts use, each defined."""
    missing, unknown = [], []
    for name in sorted(_modules()):
        module = importlib.import_module(f"medcli.{name}")
        public = getattr(module, "__all__", None)
        if not isinstance(public, (list, tuple)) or not all(isinstance(n, str) for n in public):
            missing.append(name)
            continue
        unknown += [f"{name}.{n}" for n in public if not hasattr(module, n)]
        unknown += [f"{name}.{n} (twice)" for n in set(public) if list(public).count(n) > 1]
    assert missing == [] and unknown == []


def test_one_module_owns_each_fact():
    """The run layout is spelled only in run.py and the task types only in tasks.py: a path
    literal inside a run directory, or a branch on a task type, anywhere else fails."""
    owners = {
        "run": ('"metrics/', '"predictions/', '"explain/', '"figures/', '"checkpoints/', '"history.csv"', '"maps.npz"',
                '"index.json"', '"report.xlsx"', '"report.html"'),
        "manifest": ('"manifest.json"',),
        "tasks": ("multilabel", '"multi-label, binary-class"', '"binary-class"', '"ordinal-regression"', '"multi-class"'),
    }
    found = [f"{path.stem}: {needle}" for owner, needles in owners.items() for path in sorted(PACKAGE.glob("*.py"))
             if path.stem != owner for needle in needles if needle in path.read_text()]
    assert found == []
