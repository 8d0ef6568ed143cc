"""The code's shape: dependencies point one way (no import cycle of any length), no function
over :data:`MAX_FUNCTION_LINES` lines and no file over :data:`MAX_FILE_LINES` lines.

The import graph is read from the source with :mod:`ast`, not by importing anything: every
``import``/``from ... import`` of a module of this repository counts, absolute or relative, at
the top of a file, under ``if TYPE_CHECKING:`` or inside a function. ``from package import
name`` is an edge to the module ``package.name`` when there is one, else to ``package``. The
package ``__init__`` a dotted name passes through is not an edge of its own (Python runs it
first whatever is imported, so counting it would tie every package to its re-exports).

A function's length runs from its ``def`` line to its last line (docstring and comments
included, decorators not); argparse parser builders are exempt by name.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: the code whose imports must form no cycle and whose functions stay short
SOURCES = ("mirage_demo", "train", "benchmarks", "app.py")
MAX_FUNCTION_LINES = 80
MAX_FILE_LINES = 650
#: argparse parser builders: one option after another, long by nature
PARSER_BUILDERS = {"build_parser"}
#: Known exceptions, each owned by another engineer who reshapes it in their current work; the
#: lead empties this when that work lands. Nothing else may join it.
ALLOWED_LONG: set[str] = set()  # none left: add "path:function" or "path" only with a reason


def module_files(root: Path = REPO) -> dict[str, Path]:
    """Every module of :data:`SOURCES` under ``root`` by dotted name."""
    found: dict[str, Path] = {}
    for source in SOURCES:
        path = root / source
        files = [path] if path.is_file() else sorted(path.rglob("*.py"))
        for file in files:
            parts = file.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = file
    return found


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` a module's imports name (anywhere in its source)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                prefixes = (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                found.add(next((p for p in prefixes if p in known), ""))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return found & known


def import_graph(root: Path = REPO) -> dict[str, set[str]]:
    """``module -> the modules of this repository it imports``."""
    files = module_files(root)
    graph: dict[str, set[str]] = {}
    for module, file in files.items():
        tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
        graph[module] = _imports(tree, module, file.name == "__init__.py", set(files))
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), those of two or more modules or of
    one module importing itself, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph.get(node, ()):
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module: ``[a, b, ..., a]``."""
    start, members = component[0], set(component)
    previous: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while (before := previous[path[-1]]) is not None:
                        path.append(before)
                    return [*reversed(path), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    return [start, start]


def describe_cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per import cycle: a cycle through it, and all the modules tied together."""
    lines = []
    for component in strongly_connected(graph):
        cycle = " -> ".join(a_cycle(graph, component))
        lines.append(f"{cycle}  (tied together: {', '.join(component)})")
    return lines


def test_no_import_cycles():
    cycles = describe_cycles(import_graph())
    assert not cycles, "import cycles (move the shared piece down):\n" + "\n".join(cycles)


def test_the_cycle_search_finds_cycles_of_any_length():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}, "f": set()}
    assert strongly_connected(graph) == [["a", "b", "c"], ["e"]]
    assert describe_cycles(graph)[0].startswith("a -> b -> c -> a ")
    assert describe_cycles({"x": {"y"}, "y": {"x"}}) == ["x -> y -> x  (tied together: x, y)"]


def test_the_graph_sees_every_kind_of_import(tmp_path):
    package = tmp_path / "mirage_demo"
    (package / "ui").mkdir(parents=True)
    (package / "__init__.py").write_text("from mirage_demo import models\n")
    (package / "models.py").write_text("import numpy\n")
    (package / "data.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .models import X\n"
    )
    (package / "cache.py").write_text("def f():\n    import mirage_demo.data as d\n")
    (package / "ui" / "__init__.py").write_text("")
    (package / "ui" / "app.py").write_text("from .. import cache\nfrom ..data import Sample\n")
    (package / "ui" / "tab.py").write_text("from . import app\nfrom mirage_demo.ui.app import x\n")
    graph = import_graph(tmp_path)
    assert graph["mirage_demo"] == {"mirage_demo.models"}
    assert graph["mirage_demo.models"] == set()
    assert graph["mirage_demo.data"] == {"mirage_demo.models"}
    assert graph["mirage_demo.cache"] == {"mirage_demo.data"}
    assert graph["mirage_demo.ui.app"] == {"mirage_demo.cache", "mirage_demo.data"}
    assert graph["mirage_demo.ui.tab"] == {"mirage_demo.ui.app"}


def long_functions(root: Path = REPO) -> list[str]:
    """``path:function (N lines)`` for every function or method of :data:`SOURCES` longer than
    :data:`MAX_FUNCTION_LINES`, parser builders and :data:`ALLOWED_LONG` left out."""
    found = []
    for file in module_files(root).values():
        relative = file.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            name = f"{relative}:{node.name}"
            exempt = node.name in PARSER_BUILDERS or name in ALLOWED_LONG
            if lines > MAX_FUNCTION_LINES and not exempt:
                found.append(f"{name} ({lines} lines)")
    return sorted(found)


def long_files(root: Path = REPO) -> list[str]:
    """``path (N lines)`` for every ``.py`` file of the repository (tests included) longer than
    :data:`MAX_FILE_LINES`, :data:`ALLOWED_LONG` left out."""
    found = []
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root).as_posix()
        if relative.startswith(".") or "/." in relative or relative in ALLOWED_LONG:
            continue
        lines = len(file.read_text(encoding="utf-8").splitlines())
        if lines > MAX_FILE_LINES:
            found.append(f"{relative} ({lines} lines)")
    return found


def test_no_long_functions():
    found = long_functions()
    assert not found, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n"
        + "\n".join(found)
    )


def test_no_long_files():
    found = long_files()
    assert not found, f"files over {MAX_FILE_LINES} lines (split by theme):\n" + "\n".join(found)


def test_the_size_checks_see_long_code(tmp_path):
    package = tmp_path / "train"
    package.mkdir()
    body = "".join(f"    x = {i}\n" for i in range(MAX_FUNCTION_LINES))
    method = "".join(f"    {line}\n" for line in ["def method(self):", *body.splitlines()])
    (package / "long.py").write_text(
        f"def short():\n    pass\n\n\nclass A:\n{method}\n\ndef build_parser():\n{body}"
    )
    assert long_functions(tmp_path) == [f"train/long.py:method ({MAX_FUNCTION_LINES + 1} lines)"]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_big.py").write_text("x = 1\n" * (MAX_FILE_LINES + 1))
    assert long_files(tmp_path) == [f"tests/test_big.py ({MAX_FILE_LINES + 1} lines)"]
