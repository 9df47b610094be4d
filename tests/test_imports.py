"""The library's import graph: no module of ``adapt/`` imports itself back through others, and
``adapt`` never imports ``app`` or ``training`` (data flows one way: app -> adapt, training -> adapt).

The graph is read from the source with ``ast``, so it holds every import a module can make: at the
top, inside functions (lazy imports), under ``if TYPE_CHECKING:``, and relative ones. A lazy import
breaks no circle: it only hides it until the day some module imports the other one first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "adapt"


def module_name(path: Path, root: Path = ROOT) -> str:
    """``adapt/regions/base.py`` -> ``adapt.regions.base``; ``adapt/regions/__init__.py`` -> ``adapt.regions``
    (``path`` relative to ``root``)."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, root: Path = ROOT, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every dotted name the module at ``path`` (below ``root``) imports, relative imports resolved.

    ``from X import y`` counts as importing ``X.y`` when that is one of ``modules`` (a submodule),
    else as importing ``X``. A package's ``__init__`` that Python runs before a submodule is not
    counted, or every package that imports its own submodules would be a circle.
    """
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                source = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                         for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """Each module of ``adapt`` -> the modules of ``adapt`` it imports."""
    paths = {module_name(path): path for path in sorted((ROOT / PACKAGE).rglob("*.py"))}
    modules = frozenset(paths)
    return {name: (imported_names(path, modules=modules) & modules) - {name} for name, path in paths.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) through each strongly connected group of modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

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
            group = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(group, graph) for group in groups]


def _cycle_in(group: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest closed path through the group's first module (breadth first), for the message."""
    start = min(group)
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for nxt in sorted(graph[node] & group):
            if nxt == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if nxt not in came_from:
                came_from[nxt] = node
                frontier.append(nxt)
    raise AssertionError(f"{sorted(group)} is not strongly connected")


def test_graph_reader_sees_lazy_type_checking_and_relative_imports(tmp_path: Path) -> None:
    source = tmp_path / "adapt" / "sub" / "mod.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "from ..other import thing\n"
        "if TYPE_CHECKING:\n    from adapt.typed import T\n"
        "def f():\n    import adapt.lazy\n",
        encoding="utf-8")
    names = imported_names(source, root=tmp_path, modules=frozenset({"adapt.sub.sibling"}))
    assert names == {"typing", "adapt.sub.sibling", "adapt.other", "adapt.typed", "adapt.lazy"}


def test_cycle_finder_names_the_modules_of_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_adapt_has_no_import_cycle() -> None:
    graph = import_graph()
    assert {"adapt.similarity", "adapt.encoders"} <= graph["adapt.model"], "the reader must see real imports"
    cycles = find_cycles(graph)
    assert not cycles, "import cycles in adapt/: " + "; ".join(" -> ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("outside", ["app", "training"])
def test_adapt_never_imports_app_or_training(outside: str) -> None:
    offenders = sorted(
        f"{module_name(path)} imports {name}"
        for path in (ROOT / PACKAGE).rglob("*.py")
        for name in imported_names(path)
        if name == outside or name.startswith(outside + ".")
    )
    assert not offenders, "adapt must not import app or training: " + "; ".join(offenders)
