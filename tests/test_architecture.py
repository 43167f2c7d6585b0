"""The layers of docs/architecture.md, checked on the source: who may import whom, and no import circle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "msgfm"

# Each part of msgfm and the parts it may import (besides itself); docs/architecture.md draws this.
BASE = {"errors", "sensors"}
ALLOWED = {
    "errors": set(),
    "backbone": BASE | {"config"},  # the DeepSpeed-free backbone: torch, timm, safetensors, yaml only
    "sensors": {"errors"},
    "config": BASE,
    "ops": BASE | {"config"},
    "data": BASE | {"config"},
    "models": BASE | {"config", "ops"},
    "tasks": BASE | {"config", "ops", "models", "data"},
    "train": BASE | {"config", "ops", "models", "data", "tasks"},
    "finetune": BASE | {"config", "ops", "models", "data", "tasks", "train"},
}
# entry points: may import anything
TOP = {"bench", "doctor", "runfolder", "export", "predict", "cli", "__init__", "__main__"}


def part(module: str) -> str:
    """``msgfm.train.trainer`` -> ``train``."""
    return module.split(".")[1] if "." in module else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """msgfm modules imported by ``path`` (every import, or only those run when the module loads)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("msgfm"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # "from msgfm.x import module"
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("msgfm")}
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in SOURCES}


def test_every_part_is_placed_in_a_layer():
    parts = {part(m) for m in MODULES if m != "msgfm"}
    assert parts - set(ALLOWED) - TOP == set(), "a new part of msgfm: add it to ALLOWED and docs/architecture.md"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_lower_layer_imports_an_upper_one(path):
    importer = part(module_name(path))
    if importer in TOP:
        return
    # the package root holds only __version__ (and lazy names), so every part may read it
    bad = sorted(m for m in imports(path, top_level_only=False)
                 if part(m) != importer and part(m) not in ALLOWED[importer] and m in MODULES - {"msgfm"})
    assert not bad, f"{module_name(path)} ({importer}) may not import {bad} (docs/architecture.md)"


def test_module_level_imports_form_no_circle():
    graph = {module_name(p): {m for m in imports(p, top_level_only=True) if m in MODULES} for p in SOURCES}
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt.startswith(node + "."):  # a package importing its own submodules
                continue
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
                pytest.fail(f"import circle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
