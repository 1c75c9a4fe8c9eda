"""Imports flow one way: memrope <- export <- engine <- runtime.

Every import in every module (top level and inside functions) is parsed; an import of a higher
layer fails the test with the file, line and module named."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("memrope", "export", "engine", "runtime")


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module


def test_every_import_goes_down_or_sideways():
    upward = []
    checked = 0
    for rank, layer in enumerate(LAYERS):
        for path in sorted((ROOT / layer).rglob("*.py")):
            for lineno, module in _imports(path):
                top = module.split(".")[0]
                if top in LAYERS:
                    checked += 1
                    if LAYERS.index(top) > rank:
                        upward.append(f"{path.relative_to(ROOT)}:{lineno} ({layer}) imports {module} ({top})")
    assert checked > 50, "the parser found almost no project imports: the layout moved"
    assert not upward, "imports that reach a higher layer:\n  " + "\n  ".join(upward)

