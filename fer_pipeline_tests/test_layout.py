"""The layout rules docs/development.md states: core packages never import Dagster, and layers import
only downwards (defs → analysis → ml → dataset → contracts)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fer_pipeline"
LAYERS = ["contracts", "dataset", "ml", "analysis", "defs"]  # bottom to top
CONTRACTS = {"classes", "paths", "schema", "atomic"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fer_pipeline" or len(parts) < 2:
        return None
    head = parts[1]
    return "contracts" if head in CONTRACTS else head if head in LAYERS else None


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _modules(layer: str) -> list[Path]:
    if layer == "contracts":
        return [PACKAGE / f"{name}.py" for name in sorted(CONTRACTS)]
    return sorted((PACKAGE / layer).rglob("*.py"))


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = {f"{path.relative_to(PACKAGE)} imports {name}" for path in _modules(layer) for name in _imports(path)
             if (target := _layer(name)) is not None and target not in allowed}
    assert not wrong, sorted(wrong)


@pytest.mark.parametrize("layer", ["contracts", "dataset", "ml", "analysis"])
def test_core_has_no_dagster(layer: str) -> None:
    wrong = [str(p.relative_to(PACKAGE)) for p in _modules(layer) if any(n.split(".")[0] == "dagster" for n in _imports(p))]
    assert not wrong
