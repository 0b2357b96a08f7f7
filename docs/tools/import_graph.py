"""The import graph between diffusers_hyperlora's subpackages, read from the source with `ast` (nothing imported).

Used by docs/make_pictures.py (the architecture picture) and tests/test_architecture.py (the graph has no cycle
and flows one way). A "part" is a subpackage (`model`, `io`, ...) or a top-level module (`errors`, `cli`).

- import-time edges: the `from ..x import y` statements at a module's top level (or under `if TYPE_CHECKING`
  they would be type-only; those are skipped);
- call-time edges: imports inside functions, run when the function is first called (how `cli` and the package's
  lazy names stay light, and how the predictor reaches `io` for its Hub entry points).
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "diffusers_hyperlora"
FACADE = "__init__"  # the package's own __init__: re-exports everything, so it is left out of the graph


@dataclass
class ImportGraph:
    parts: list[str]
    import_time: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    call_time: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def edges(self, kinds: tuple[str, ...] = ("import_time", "call_time")) -> set[tuple[str, str]]:
        return {(a, b) for kind in kinds for a, targets in getattr(self, kind).items() for b in targets}


def part_of(path: Path, root: Path = PACKAGE) -> str:
    relative = path.relative_to(root).parts
    return relative[0] if len(relative) > 1 else relative[0].removesuffix(".py")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def _imports(tree: ast.Module):
    """`(node, at_import_time)` for each relative import; type-checking-only imports are skipped."""

    def visit(nodes, top: bool):
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                yield node, top
            inner_top = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            yield from visit(ast.iter_child_nodes(node), inner_top)

    yield from visit(tree.body, True)


def _targets(path: Path, node: ast.ImportFrom, root: Path) -> list[str]:
    """The parts a relative import reaches, seen from `path`."""
    folder = list(path.relative_to(root).parts[:-1])
    base = folder[: len(folder) - (node.level - 1)]
    module = node.module.split(".") if node.module else []
    dotted = base + module
    if dotted:
        return [dotted[0]]
    return [alias.name for alias in node.names]  # `from .. import errors`


def _read_graph(
    root: Path,
    node_of: Callable[[Path, Path], str],
    targets_of: Callable[[Path, ast.ImportFrom, Path], list[str]],
) -> ImportGraph:
    """The graph whose nodes are `node_of(file)` (the facade left out), with an edge for every import a file makes
    (`targets_of`), at import time or at call time; self-edges dropped."""
    files = sorted(root.rglob("*.py"))
    graph = ImportGraph(sorted({node_of(path, root) for path in files} - {FACADE}))
    for path in files:
        source = node_of(path, root)
        if source == FACADE:
            continue
        for node, at_import_time in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in targets_of(path, node, root):
                if target not in (source, FACADE):
                    (graph.import_time if at_import_time else graph.call_time)[source].add(target)
    return graph


def read_import_graph(root: Path = PACKAGE) -> ImportGraph:
    """The parts of the package and the import edges between them (self-edges dropped)."""
    return _read_graph(root, part_of, _targets)


def module_name(path: Path, root: Path = PACKAGE) -> str:
    """`training/losses.py` -> `training.losses`, `training/__init__.py` -> `training` (the facade: `__init__`)."""
    dotted = list(path.relative_to(root).with_suffix("").parts)
    if dotted[-1] == "__init__" and len(dotted) > 1:
        dotted.pop()
    return ".".join(dotted)


def _module_targets(path: Path, node: ast.ImportFrom, root: Path) -> list[str]:
    """The modules a relative import reaches, seen from `path` (`from . import x` reaches the submodule `x`)."""
    folder = list(path.relative_to(root).parts[:-1])
    dotted = folder[: len(folder) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    named = [dotted + [alias.name] for alias in node.names]
    submodules = [d for d in named if root.joinpath(*d).with_suffix(".py").exists() or root.joinpath(*d).is_dir()]
    targets = [".".join(d) for d in submodules]
    if len(submodules) < len(named):  # names defined by the module (or package) itself
        targets.append(".".join(dotted) or FACADE)
    return targets


def read_module_graph(root: Path = PACKAGE) -> ImportGraph:
    """The graph between modules (`training.losses`, `io.hub`, ...), both kinds of edges; cycles hide in it that
    the graph between parts cannot show (two modules of one subpackage importing each other, one at call time)."""
    return _read_graph(root, module_name, _module_targets)


def layers(nodes: list[str], edges: set[tuple[str, str]]) -> dict[str, int]:
    """Longest-path layering: a part with no dependency is layer 0, any other is one above its highest dependency.

    Raises `ValueError` naming the parts of a cycle, which has no layering.
    """
    depends = defaultdict(set)
    for a, b in edges:
        depends[a].add(b)
    layer: dict[str, int] = {}
    visiting: list[str] = []

    def visit(node: str) -> int:
        if node in layer:
            return layer[node]
        if node in visiting:
            cycle = visiting[visiting.index(node) :] + [node]
            raise ValueError("import cycle: " + " -> ".join(cycle))
        visiting.append(node)
        layer[node] = 1 + max((visit(d) for d in depends[node]), default=-1)
        visiting.pop()
        return layer[node]

    for node in nodes:
        visit(node)
    return layer
