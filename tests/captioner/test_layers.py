"""Imports go one way: ``training`` and ``service`` use ``captioner``; no module of ``captioner`` imports either.

Read from each module's syntax tree, so an import inside a function (the kind that hides a dependency until a
command runs) counts as much as one at the top, and so does ``importlib.import_module("training...")``.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "captioner"
APPS = ("training", "service")  # the packages built on the library
_DYNAMIC_IMPORTS = {"import_module", "__import__"}  # importlib.import_module(name), __import__(name)
# "module:function", as a launcher names what a console script runs
_ENTRY_POINT = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def imported_modules(source: str) -> Iterator[tuple[int, str]]:
    """(line, module) for every absolute import in ``source``, at any depth, and every dynamic import of a
    module named by a string literal."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            function = node.func
            name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
            if name in _DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def _app_imports(source: str) -> list[tuple[int, str]]:
    return [(line, module) for line, module in imported_modules(source) if module.split(".")[0] in APPS]


def _library_modules() -> list[Path]:
    return sorted(LIBRARY.rglob("*.py"))


def test_the_check_sees_imports_at_any_depth_and_by_name() -> None:
    source = """
import training
from service.app import create_app
import captioner.model

def rules():
    from training.data import load_corpus

class Later:
    def method(self):
        import importlib
        return importlib.import_module("service.batching"), __import__("training.cli")
"""
    assert _app_imports(source) == [
        (2, "training"),
        (3, "service.app"),
        (7, "training.data"),
        (12, "service.batching"),
        (12, "training.cli"),
    ]


@pytest.mark.parametrize("path", _library_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_module_imports_training_or_service(path: Path) -> None:
    found = _app_imports(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)} imports an app: " + ", ".join(f"line {n}: {m}" for n, m in found)


def test_only_the_console_launcher_names_an_app_s_function() -> None:
    """The ``captioner`` console script runs ``training.data_commands.main`` (the library's commands and the two that
    learn from a data set): the launcher names it as pyproject.toml names each script's function, and imports it only
    when the script runs. No other module may name one."""
    named = set()
    for path in _library_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if _ENTRY_POINT.match(text) and text.split(":")[0].split(".")[0] in APPS:
                named.add((str(path.relative_to(ROOT)), text))
    assert named == {("captioner/console.py", "training.data_commands:main")}


def _typing_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``: names for annotations, never imported when run."""
    nodes: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            nodes |= {id(inner) for statement in node.body for inner in ast.walk(statement)}
    return nodes


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _library_import_graph() -> dict[str, set[str]]:
    """Module -> the ``captioner`` modules it imports when run, at any depth (``from captioner import x`` counts as
    the package's ``x`` when it is a module of it, else as the package); imports for type annotations only
    (``if TYPE_CHECKING:``) do not count."""
    modules = {_module_name(p) for p in _library_modules()}
    graph: dict[str, set[str]] = {}
    for path in _library_modules():
        name = _module_name(path)
        targets = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = _typing_only(tree)
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module in modules:
                named = {f"{node.module}.{alias.name}" for alias in node.names}
                targets |= (named & modules) or {node.module}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
        targets.discard(name)
        if name != "captioner":
            targets.discard("captioner")  # the package's lazy names (its __init__ imports nothing at the top)
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_check_finds_a_loop_hidden_in_a_function() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_the_library() -> None:
    """Function-level imports count: they hid the loops between the model, the ONNX backend and the exporter."""
    graph = _library_import_graph()
    assert {"captioner.onnx_export", "captioner.onnx_model"} <= graph["captioner.model"]  # the graph sees them
    assert _cycles(graph) == []
