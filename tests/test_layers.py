"""Imports flow one way: memrope <- export <- engine <- runtime, with no circles.

The repository's folders install as one package: ``memrope/`` is ``memrope``, ``export/`` is
``memrope.export``, ``engine/`` is ``memrope.engine`` and ``runtime/`` is ``memrope.runtime``.
Every import in every module (top level and inside functions) is parsed:

- an import of a higher layer fails the test, with the file, line and module named;
- modules import each other without circles, within a layer too (``a -> b -> a``);
- ``bench/`` scripts sit above every layer: they may import any, and nothing imports them.

Two entry points may name the top layer from ``memrope/``: ``memrope/__main__.py`` (``python -m
memrope`` runs the CLI) and the lazy public names of ``memrope/__init__.py`` (``memrope.VideoPipeline``
and friends, imported on first use, from :mod:`memrope.runtime.api`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("memrope", "export", "engine", "runtime", "bench")
# The folder of each layer and the package name it installs as.
PACKAGES = {"memrope": "memrope", "export": "memrope.export", "engine": "memrope.engine",
            "runtime": "memrope.runtime", "bench": "bench"}
ENTRY_POINTS = {"memrope/__main__.py", "memrope/__init__.py"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
            for alias in node.names:  # `from memrope.runtime import vae` imports a module too
                yield node.lineno, f"{node.module}.{alias.name}"


def _layer(module: str) -> str | None:
    """The layer an imported module belongs to, or None for a third-party module."""
    for layer in reversed(LAYERS):  # the longest package name first: memrope.export before memrope
        package = PACKAGES[layer]
        if module == package or module.startswith(package + "."):
            return layer
    return None


def _modules() -> dict[str, tuple[str, Path]]:
    """Every project module by its import name: ``{name: (layer, path)}``."""
    found = {}
    for layer, package in PACKAGES.items():
        for path in sorted((ROOT / layer).rglob("*.py")):
            parts = list(path.relative_to(ROOT / layer).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = (layer, path)
    return found


def test_every_import_goes_down_or_sideways():
    upward = []
    checked = 0
    for _name, (layer, path) in _modules().items():
        rank = LAYERS.index(layer)
        for lineno, module in _imports(path):
            target = _layer(module)
            if target is None:
                continue
            checked += 1
            if LAYERS.index(target) > rank and str(path.relative_to(ROOT)) not in ENTRY_POINTS:
                upward.append(f"{path.relative_to(ROOT)}:{lineno} ({layer}) imports {module} ({target})")
    assert checked > 50, "the parser found almost no project imports: the layout moved"
    assert not upward, "imports that reach a higher layer:\n  " + "\n  ".join(upward)


def _graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (a package import counts as its ``__init__``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (_, path) in modules.items():
        if str(path.relative_to(ROOT)) in ENTRY_POINTS:
            continue
        for _, module in _imports(path):
            while module and module not in modules:  # `from pkg.mod import Name`: the module is pkg.mod
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):  # a parent package runs first
                graph[name].add(module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "modules that import each other in a circle:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


def test_the_circle_check_finds_a_circle():
    """The check itself: a planted a -> b -> c -> a is reported, a chain is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_nothing_imports_bench():
    users = [f"{path.relative_to(ROOT)}" for name, (layer, path) in _modules().items() if layer != "bench"
             for _, module in _imports(path) if _layer(module) == "bench"]
    assert not users, f"library modules importing bench/: {users}"
