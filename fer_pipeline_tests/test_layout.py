"""The layout rules docs/development.md states, over every module of the package and every
import in it (at module level or inside a function alike): each room imports only rooms below
it, the core never imports Dagster, every module sits in a room the rules know, and there is no
import loop, hidden or not."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fer_pipeline"
CONTRACTS = {"classes", "paths", "schema", "atomic", "limits", "config_yaml", "settings", "publish_lock"}
RANK = {
    "contracts": 0,  # names, paths, table schemas, atomic writes, size limits, the settings file, the publication lock
    "sources": 1, "demo": 1,  # catalogue, readers, inventory, watching / the generated demo data
    "faces": 2,  # decode, detect, align, hash, store
    "dedup": 3,
    "dataset": 4,  # manifest, splits, pool
    "quality": 5, "publish": 5,  # validations and plots / write-audit-publish
    "storage": 6,  # the object-store data root
    "ml": 7,
    "analysis": 8,
    "review": 8,  # the review queue and the Label Studio round trip (reads dataset/ml outputs, the face store)
    "defs": 9,  # Dagster wiring
    "outputs": 9,  # the summary of what is under the data root
    "definitions": 10, "cli": 10,  # entry points
}
CORE = [room for room, rank in RANK.items() if rank < RANK["defs"]]


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "fer_pipeline" or len(parts) < 2:
        return None
    return "contracts" if parts[1] in CONTRACTS else parts[1]


def _name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


@cache
def _modules() -> dict[str, Path]:
    return {_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def _imports(path: Path) -> frozenset[str]:
    """Every module name an import statement anywhere in ``path`` names (absolute imports; a
    relative one is refused below)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            found.add(f"<relative import in {path.name}>")
    return frozenset(found)


def test_every_module_sits_in_a_known_room() -> None:
    unknown = sorted(m for m in _modules() if m != "fer_pipeline" and _room(m) not in RANK)
    assert not unknown, f"place these in a room of RANK (and say why in its package docstring): {unknown}"


def test_no_relative_imports() -> None:
    relative = sorted(m for m, p in _modules().items() if any(n.startswith("<relative") for n in _imports(p)))
    assert not relative


@pytest.mark.parametrize("room", sorted(RANK))
def test_rooms_import_only_downwards(room: str) -> None:
    wrong = sorted(f"{m} imports {name}" for m, p in _modules().items() if _room(m) == room
                   for name in _imports(p) if (target := _room(name)) not in (None, room)
                   and RANK.get(target, 99) >= RANK[room])
    assert not wrong


@pytest.mark.parametrize("room", CORE)
def test_core_has_no_dagster(room: str) -> None:
    wrong = sorted(m for m, p in _modules().items()
                   if _room(m) == room and any(n.split(".")[0] == "dagster" for n in _imports(p)))
    assert not wrong


def test_no_import_loops() -> None:
    """No cycle among modules, counting imports inside functions (they hide loops, not remove them)."""
    modules = _modules()
    graph = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}  # a package's own __init__
    loops, state = [], dict.fromkeys(graph, 0)

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state[nxt] == 1:
                loops.append(" -> ".join([*trail[trail.index(nxt):], nxt]))
            elif state[nxt] == 0:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for start in sorted(graph):
        if state[start] == 0:
            visit(start, [start])
    assert not loops
