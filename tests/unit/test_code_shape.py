"""Modules stay small enough to read in one sitting, and functions small enough to hold in
mind: no module over 400 lines, no function over 60 (from `def` to its last line)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "exporters", "agents")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_no_module_is_over_400_lines() -> None:
    lines = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in _modules()}
    assert len(lines) > 50  # the walk found the packages
    assert {p: n for p, n in lines.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_60_lines() -> None:
    long = {}
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert long == {}


def test_no_module_imports_itself_through_a_circle() -> None:
    """import-linter checks the layers; a circle inside one layer is caught here, on the same
    import graph (grimp), lazy imports included."""
    import grimp

    graph = grimp.build_graph(*PACKAGES)
    circles = [c for c in _strongly_connected(graph) if len(c) > 1]
    assert circles == []


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's algorithm over the modules' direct imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph.find_modules_directly_imported_by(module):
            if imported not in graph.modules:
                continue
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            found.append(component)

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found
