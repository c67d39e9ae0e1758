"""The import graph of server/: no circles, and torch and training/ only in server/bench/.

    .venv/bin/python -m pytest tests/test_import_layers.py -q     # the check
    .venv/bin/python tests/test_import_layers.py server.bench     # print a package's edges

Read from the source with ast (nothing is imported), so the check is instant and
sees modules whose optional dependencies are not installed.

An edge A -> B is a module-level import in A of a module B under server/: `import
B`, `from B import name`, and `from P import B` where P.B is a module; class bodies,
`try` and `if` blocks at module level run on import, so they count. Imports in
functions are deferred until called and make no edge (they are listed apart). Imports
under `if TYPE_CHECKING:` never run, but a circle through them is still two modules
that each need the other to be read, so the check is made twice: without them (a
circle Python would trip over) and with them (a circle of types). Importing B does
not count as importing its parent packages: Python finds a package already being
initialised and goes on, so those edges would only make every package a circle with
its children.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER = REPO_ROOT / "server"
# Packages that load torch (training/, export/ through its pipeline) or are torch itself.
TORCH_SIDE = ("torch", "training", "export")
# The one package allowed to reach them: the benchmark's PyTorch row and ceiling model.
MAY_IMPORT_TORCH = "server.bench"


@dataclass
class Imports:
    """What one module imports: on import, for type checkers only, and in functions (when called)."""

    now: set[str] = field(default_factory=set)
    typing: set[str] = field(default_factory=set)
    later: set[str] = field(default_factory=set)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def server_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SERVER.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(body: list[ast.stmt], when: str) -> Iterator[tuple[ast.stmt, str]]:
    """Every statement, with when it runs: "now" (on import), "typing" (never) or "later" (in a function)."""
    for node in body:
        yield node, when
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield from _statements(node.body, "later")
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _statements(node.body, "later" if when == "later" else "typing")
            yield from _statements(node.orelse, when)
        else:
            for name in ("body", "orelse", "finalbody", "handlers"):
                yield from _statements(getattr(node, name, []), when)


def _imported(node: ast.stmt, importer: str, is_package: bool, modules: dict[str, Path]) -> Iterator[str]:
    """The names of the modules an import statement imports (those under server/ resolved to modules)."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level:  # relative: from the importer's package (itself, for an __init__)
            package = importer.split(".")
            package = package if is_package else package[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
        yield from submodules
        if len(submodules) < len(node.names):  # some names are attributes of `base` itself
            yield base


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> Imports:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = Imports()
    for node, when in _statements(tree.body, "now"):
        for target in _imported(node, name, path.name == "__init__.py", modules):
            getattr(found, when).add(target)
    return found


def import_graph() -> dict[str, Imports]:
    modules = server_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every circle of the graph as one path round it (A, B, ..., A): one per strongly connected component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm; the graph is small enough to recurse
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges.get(node, ()):
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return [_path_round(sorted(component), edges) for component in components]


def _path_round(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to it, inside the component."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(edges.get(node, set()) & members):
                if target == start:
                    return paths[node] + [start]
                if target not in paths:
                    paths[target] = paths[node] + [target]
                    following.append(target)
        frontier = following
    raise AssertionError(f"{component} is not a circle")


def _internal(graph: dict[str, Imports], with_typing: bool) -> dict[str, set[str]]:
    return {name: {target for target in found.now | (found.typing if with_typing else set()) if target in graph}
            for name, found in graph.items()}


def test_the_graph_sees_the_server() -> None:
    graph = import_graph()
    assert "server.app" in graph and "server.engine.scheduling.scheduler" in graph and "server.bench.bench" in graph
    assert "server.engine.observer" in graph["server.engine.scheduling.scheduler"].now  # a `from ... import` edge
    assert "server.bench.clients" in graph["server.bench.spread"].now  # `from server.bench import clients`
    assert "torch" in graph["server.bench.ceiling"].later  # imported in the function that builds the model


def test_cycles_names_the_circle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert sorted(cycles(edges)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("with_typing", [False, True], ids=["on-import", "with-type-checking-imports"])
def test_no_import_circle_in_server(with_typing: bool) -> None:
    found = cycles(_internal(import_graph(), with_typing))
    kind = "module-level and TYPE_CHECKING imports" if with_typing else "module-level imports"
    assert not found, f"import circles in server/ ({kind}); move what both sides need into a module both import:\n" \
        + "\n".join("  " + " -> ".join(circle) for circle in found)


def test_only_the_benchmark_imports_torch_or_training() -> None:
    offenders = []
    for name, found in import_graph().items():
        if name == MAY_IMPORT_TORCH or name.startswith(MAY_IMPORT_TORCH + "."):
            continue
        for target in sorted(found.now | found.typing | found.later):  # deferred too: the server must never load torch
            if target.split(".")[0] in TORCH_SIDE:
                offenders.append(f"  {name} imports {target}")
    assert not offenders, f"only {MAY_IMPORT_TORCH} may import {', '.join(TORCH_SIDE)}:\n" + "\n".join(offenders)


# The engine's layers (server/engine/__init__.py), lowest first: a module may import its own layer, the
# layers before it, and the shared modules at the engine's top (generation, sampling and its
# float32 screen, observer).
ENGINE_LAYERS = ("model", "graphs", "runner", "scheduling", "runtime")
ENGINE_SHARED = ("server.engine.generation", "server.engine.sampling", "server.engine.sampling_screen",
                 "server.engine.observer", "server.engine.prefix_cache")
OUTSIDE_ALLOWED = ("server.structured_log",)  # the log line format: imports nothing of the server


def engine_layer(name: str) -> int | None:
    """The index of the engine layer a module belongs to; None outside the layers."""
    parts = name.split(".")
    if parts[:2] != ["server", "engine"] or len(parts) < 3 or parts[2] not in ENGINE_LAYERS:
        return None
    return ENGINE_LAYERS.index(parts[2])


def test_the_engine_layers_point_one_way() -> None:
    graph = import_graph()
    assert {engine_layer(name) for name in graph} >= set(range(len(ENGINE_LAYERS)))  # every layer has modules
    wrong = []
    for name, found in graph.items():
        layer = engine_layer(name)
        shared = name in ENGINE_SHARED
        if layer is None and not shared:
            continue
        for target in sorted(found.now | found.typing | found.later):
            target_layer = engine_layer(target)
            if target_layer is None:
                if (target.startswith("server.") and target not in ENGINE_SHARED + OUTSIDE_ALLOWED
                        and target != "server.engine"):
                    wrong.append(f"  {name} imports {target}, outside the engine")
            elif shared or target_layer > layer:
                wrong.append(f"  {name} imports {target}, a layer above it")
    assert not wrong, f"the engine's layers are {' < '.join(ENGINE_LAYERS)}:\n" + "\n".join(wrong)


def main(prefix: str) -> None:
    """Print the edges of the modules under `prefix` to the others under server/ (and to the torch side)."""
    graph = import_graph()

    def shown(targets: set[str]) -> list[str]:
        return sorted(t for t in targets if t in graph or t.split(".")[0] in TORCH_SIDE)

    for name in sorted(n for n in graph if n == prefix or n.startswith(prefix + ".")):
        found = graph[name]
        extra = [f"{label}: {', '.join(targets)}" for label, targets in
                 (("type checking", shown(found.typing - found.now)), ("in functions", shown(found.later - found.now)))
                 if targets]
        print(f"{name} -> {', '.join(shown(found.now)) or '-'}" + "".join(f"   ({text})" for text in extra))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    main(sys.argv[1] if len(sys.argv) > 1 else "server")
