"""The import layering of docs/contracts.md: no module imports a higher layer, and only the
CLI imports Typer or Click. Function-level imports count too (they are how heavy modules are
kept out of `--help`, not a way around the layering)."""

from __future__ import annotations

import ast
from pathlib import Path

import medcli

PACKAGE = Path(medcli.__file__).parent
LAYERS = {
    "names": 0, "errors": 0, "console": 0, "system": 0, "metrics": 0,
    "fileio": 1, "distributed": 1,
    "manifest": 2, "augment": 2, "models": 2,
    "datasets": 3, "inference": 3,
    "run": 4, "tasks": 4,
    "config": 5, "reports": 5, "processes": 5,
    "train": 6, "evaluate": 6, "explain": 6, "aggregate": 6, "download": 6, "maps": 6,
    "cli": 7, "__main__": 8,
}
CLI_ONLY = {"typer", "click"}


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


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(LAYERS), "add the new module to docs/contracts.md and LAYERS"


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
