"""The package's shape: imports run one way (no cycles, none hidden inside functions) and modules stay small.

The import graph is built from the source with ``ast``, so it sees every import, including those inside
functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "oodlens"
MAX_LINES = 520  # "no module much over 500 lines"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[tuple[str, ast.AST]]:
    """The oodlens modules one import statement names (``from . import plotting`` names the submodule)."""
    if isinstance(node, ast.Import):
        return [(alias.name, node) for alias in node.names if alias.name.split(".")[0] == "oodlens"]
    if node.level:
        package = importer if MODULES[importer].name == "__init__.py" else importer.rsplit(".", 1)[0]
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    if target.split(".")[0] != "oodlens":
        return []
    named = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
    return [(name, node) for name in named] or [(target, node)]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges ``module → imported modules``, and the imports of oodlens modules made inside functions."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    nested: list[tuple[str, str, int]] = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        inside = {id(inner) for function in functions for inner in ast.walk(function)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, _ in resolve(name, node):
                    assert target in MODULES, f"{name} imports {target}, which does not exist"
                    edges[name].add(target)
                    if id(node) in inside:
                        nested.append((name, target, node.lineno))
    return edges, nested


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path ``[a, b, …, a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in edges:
        if root in state:
            continue
        path, stack = [root], [iter(sorted(edges[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges[nxt])))
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_has_no_cycle():
    edges, _ = import_graph()
    assert sum(len(targets) for targets in edges.values()) > 50  # the graph was really built
    assert find_cycle(edges) is None


def test_no_oodlens_import_hides_inside_a_function():
    _, nested = import_graph()
    assert nested == [], f"imports inside functions: {nested}"


def test_the_engine_never_imports_the_layers_above_it():
    edges, _ = import_graph()
    above = ("oodlens.policies", "oodlens.capture", "oodlens.evaluate", "oodlens.plotting", "oodlens.probe")
    for name, targets in edges.items():
        if name.startswith(("oodlens.attention", "oodlens.models", "oodlens.rope", "oodlens.cache")):
            assert not [t for t in targets if t.startswith(above)], name


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    assert len(MODULES[name].read_text().splitlines()) <= MAX_LINES
