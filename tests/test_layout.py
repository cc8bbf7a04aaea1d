"""The code's layout rules, read from the source: rooms, no cycles, no private reach-ins, small modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "pipelines", "cluster")
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of a project module in a file, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [alias.name for alias in node.names]
            submodules = [f"{node.module}.{name}" for name in names if f"{node.module}.{name}" in MODULES]
            found += [(module, []) for module in submodules]
            if others := [name for name in names if f"{node.module}.{name}" not in MODULES]:
                found.append((node.module, others))
    return [(module, names) for module, names in found if module.split(".")[0] in PACKAGES]


def _graph(level) -> dict[str, set[str]]:
    """Import edges between `level(module)` nodes, self-loops dropped (a package's own modules)."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        for target, _ in _imports(path):
            source, sink = level(name), level(target)
            if source != sink:
                edges.setdefault(source, set()).add(sink)
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def _module_of(name: str) -> str:
    """An imported name's module: the name itself for a module, else its package-qualified parent."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def test_no_import_cycle_between_modules():
    assert _cycle(_graph(_module_of)) is None


def test_no_import_cycle_between_model_sub_packages():
    def sub_package(name: str) -> str:
        parts = name.split(".")
        return ".".join(parts[:2]) if parts[0] == "model" else parts[0]

    assert _cycle(_graph(sub_package)) is None


# Inference (reconstruction, the body fit, the networks, evaluation) never needs the training-data generator.
INFERENCE = ("model.reconstruction", "model.body", "model.network", "model.person", "model.image", "model.evaluation")


@pytest.mark.parametrize("package, forbidden", [("model", ("ray", "pipelines", "cluster")), ("pipelines", ("cluster",)),
                                                *((room, ("model.data", "model.training")) for room in INFERENCE)])
def test_what_a_room_may_not_import(package, forbidden):
    offending = []
    for name, path in MODULES.items():
        if not (name == package or name.startswith(package + ".")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            modules = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                       else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            offending += [f"{name} imports {m}" for m in modules
                          if any(m == room or m.startswith(room + ".") for room in forbidden)]
    assert not offending


def test_no_private_name_is_imported_across_modules():
    reaching = [f"{name} imports {target}.{imported}" for name, path in MODULES.items()
                for target, names in _imports(path) for imported in names if imported.startswith("_")]
    assert not reaching


def test_no_module_is_over_700_lines():
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long
