"""The package's layers (docs/architecture.md): the import graph between subpackages has no cycle and flows one way.

The graph is read from the source with `ast` by docs/tools/import_graph.py, the same reader that draws the
architecture picture. Adding an import that goes up a layer, or a new subpackage, fails here: place it, and update
docs/architecture.md.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs" / "tools"))

from import_graph import PACKAGE, layers, read_import_graph, read_module_graph  # noqa: E402

# Bottom to top; a part may import only from parts on lower layers (docs/architecture.md, "The layers").
EXPECTED_LAYERS = {
    "errors": 0,
    "utils": 1,
    "identities": 2,
    "model": 3,
    "adapters": 4,
    "io": 5,
    "face": 6,
    "pipeline": 7,
    "training": 7,
    "testing": 7,
    "demo": 8,
    "cli": 9,
}

# The one import that goes up, by design and only at call time: `io` builds predictors (so it sits above `model`),
# and `HyperLoRAPredictor.from_pretrained` / `save_pretrained` / `push_to_hub` / `export_lora` are documented
# one-line entries into it.
UPWARD_AT_CALL_TIME = {("model", "io")}
PREDICTOR_ENTRIES_INTO_IO = {"from_pretrained", "save_pretrained", "push_to_hub", "export_lora"}


@pytest.fixture(scope="module")
def graph():
    return read_import_graph()


def test_every_part_has_a_place_in_the_layers(graph):
    assert set(graph.parts) == set(EXPECTED_LAYERS), "place a new subpackage in EXPECTED_LAYERS and the docs"


def test_imports_at_import_time_have_no_cycle_and_go_down(graph):
    edges = graph.edges(("import_time",))
    layers(graph.parts, edges)  # raises on a cycle
    upward = sorted((a, b) for a, b in edges if EXPECTED_LAYERS[b] >= EXPECTED_LAYERS[a])
    assert not upward, f"imports that do not go down a layer: {upward}"


def test_all_imports_flow_one_way_with_the_documented_exception(graph):
    edges = graph.edges()
    upward = {(a, b) for a, b in edges if EXPECTED_LAYERS[b] >= EXPECTED_LAYERS[a]}
    assert upward == UPWARD_AT_CALL_TIME, f"imports going up a layer: {sorted(upward - UPWARD_AT_CALL_TIME)}"
    assert not UPWARD_AT_CALL_TIME & graph.edges(("import_time",))
    assert layers(graph.parts, edges - UPWARD_AT_CALL_TIME) == EXPECTED_LAYERS, "the layering changed: update docs"


def test_modules_have_no_import_cycle_even_through_imports_inside_functions():
    """Between modules (two of one subpackage too), imports inside functions count: only the predictor's documented
    call-time entries into `io` may close a loop (`io` builds predictors)."""
    graph = read_module_graph()
    into_io = {(a, b) for a, b in graph.edges(("call_time",)) if a == "model.predictor" and b.split(".")[0] == "io"}
    assert into_io and not into_io & graph.edges(("import_time",))
    layers(graph.parts, graph.edges() - into_io)  # raises `ValueError: import cycle: ...` naming the modules


def test_the_module_reader_sees_a_cycle_inside_a_subpackage_through_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("from .first import f\n")
    (package / "a" / "first.py").write_text("def f():\n    from .second import g\n")
    (package / "a" / "second.py").write_text("from . import first\nfrom .. import b\ng = 1\n")
    (package / "b.py").write_text("from .a.first import f\n")
    graph = read_module_graph(package)
    assert graph.parts == ["a", "a.first", "a.second", "b"]
    assert graph.edges(("import_time",)) == {
        ("a", "a.first"),
        ("a.second", "a.first"),
        ("a.second", "b"),
        ("b", "a.first"),
    }
    assert graph.edges(("call_time",)) == {("a.first", "a.second")}
    assert not read_import_graph(package).edges(("call_time",))  # the graph between parts drops it (inside `a`)
    with pytest.raises(ValueError, match="import cycle: .*a.first -> a.second"):
        layers(graph.parts, graph.edges())


def test_no_module_imports_another_ones_private_names():
    """A name starting with `_` is its module's own: another module that needs it needs a public name."""
    private = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            ours = isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGE.name))
            if ours:
                names = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                private += [f"{path.relative_to(PACKAGE)}:{node.lineno} {name}" for name in names]
    assert not private, f"private names imported across modules: {private}"


def test_the_predictor_reaches_io_only_from_its_documented_entries_and_knows_no_adapters():
    tree = ast.parse((PACKAGE / "model" / "predictor.py").read_text(encoding="utf-8"))
    entries = set()
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and (node.module or "").startswith("io"):
                    entries.add(function.name)
    assert entries == PREDICTOR_ENTRIES_INTO_IO
    model_source = "\n".join(path.read_text(encoding="utf-8") for path in (PACKAGE / "model").glob("*.py"))
    assert "Slider" not in model_source and "adapters" not in model_source, "model/ must not know sliders/adapters"


def test_the_reader_finds_cycles_and_call_time_imports(tmp_path):
    package = tmp_path / "pkg"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import x\n")
    (package / "a" / "__init__.py").write_text("from ..b import y\n")
    (package / "b.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "from . import c\n"
        "if TYPE_CHECKING:\n"
        "    from .a import x\n"
        "def f():\n"
        "    from .a import x\n"
    )
    (package / "c.py").write_text("")
    graph = read_import_graph(package)
    assert graph.parts == ["a", "b", "c"]
    assert graph.edges(("import_time",)) == {("a", "b"), ("b", "c")}
    assert graph.edges(("call_time",)) == {("b", "a")}
    assert layers(graph.parts, graph.edges(("import_time",))) == {"c": 0, "b": 1, "a": 2}
    with pytest.raises(ValueError, match="import cycle: a -> b -> a|import cycle: b -> a -> b"):
        layers(graph.parts, graph.edges())


def test_architecture_page_describes_every_part():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for part in EXPECTED_LAYERS:
        name = f"`{part}.py`" if (PACKAGE / f"{part}.py").exists() else f"`{part}/`"
        assert f"### {name}" in text, f"docs/architecture.md has no section for {name}"
    assert "images/generated/architecture.png" in text
