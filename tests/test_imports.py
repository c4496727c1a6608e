"""The project's import graph, read from the source with `ast`: no module imports, even inside a function, one
that imports it back (a cycle), and the layers hold: the libraries (paliseg/ but paliseg/cli/, vae/, metrics/)
import no stage, a stage (converters/ -> train/ -> infer/) never imports a later one, and only paliseg/cli/
imports paliseg/cli/. Imports under `if TYPE_CHECKING:` never run, so they are not edges."""

from __future__ import annotations

import ast
import collections
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("paliseg", "vae", "metrics", "converters", "train", "infer")
# A module may import modules of its own layer or a lower one.
LAYERS = {"paliseg": 0, "vae": 0, "metrics": 0, "converters": 1, "train": 2, "infer": 3, "paliseg.cli": 4}


def module_files(root: Path, packages: Sequence[str]) -> dict[str, Path]:
    """Dotted module name -> file for every .py under the packages; a package's `__init__` is the package."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: module level, in functions and classes; not `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _enclosing_module(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is a project module (None: not the project's)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in modules:
            return ".".join(parts[:end])
    return None


def import_graph(root: Path, packages: Sequence[str]) -> dict[str, set[str]]:
    """Module -> the project modules it imports. `from a.b import x` is the submodule a.b.x when there is
    one, else the module a.b; relative imports are resolved; a module importing itself is no edge."""
    modules = module_files(root, packages)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(_enclosing_module(alias.name, modules) for alias in node.names)
                continue
            base_parts = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join([*base_parts, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in modules else _enclosing_module(base, modules))
        graph[name] = targets - {None, name}
    return graph


def _components(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _shortest_cycle_through(start: str, graph: dict[str, set[str]], within: set[str]) -> list[str]:
    """Breadth-first from `start` back to it, inside one strongly connected component."""
    came_from: dict[str, str] = {}
    queue = collections.deque([start])
    while queue:
        node = queue.popleft()
        for target in sorted(graph.get(node, ()) & within):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"{start} is on no cycle within {sorted(within)}")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import cycle as a path [a, b, ..., a]: for every module on a cycle, the shortest cycle through it
    (a cycle found from two of its modules is listed once, from its smallest module)."""
    cycles = set()
    for component in _components(graph):
        if len(component) < 2:
            continue
        for start in component:
            cycle = _shortest_cycle_through(start, graph, component)[:-1]
            smallest = cycle.index(min(cycle))
            cycles.add((*cycle[smallest:], *cycle[:smallest], cycle[smallest]))
    return [list(cycle) for cycle in sorted(cycles)]


def _layer(module: str) -> int:
    in_cli = module == "paliseg.cli" or module.startswith("paliseg.cli.")
    return LAYERS["paliseg.cli"] if in_cli else LAYERS[module.split(".")[0]]


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _layer(target) > _layer(module)
    )


# --- the checks themselves, on small graphs and trees --------------------------------------------------------


def test_find_cycles_reports_every_cycle_as_a_path():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"b": {"c"}, "c": {"a"}, "a": {"b"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    two = {"a": {"b"}, "b": {"a", "c"}, "c": {"b"}, "x": {"y"}, "y": {"x"}}
    assert find_cycles(two) == [["a", "b", "a"], ["b", "c", "b"], ["x", "y", "x"]]


def test_import_graph_resolves_submodules_packages_relative_and_local_imports(tmp_path):
    sources = {
        "pkg/__init__.py": "from pkg.sub import helper\n",
        "pkg/sub.py": "import os\n\ndef helper():\n    from pkg import lazy, NAME\n",
        "pkg/lazy.py": "from typing import TYPE_CHECKING\nfrom . import sub\nif TYPE_CHECKING:\n    from other import x\n",
        "pkg/deep/__init__.py": "from .. import lazy\nfrom ..sub import helper\n",
        "other/__init__.py": "import pkg.deep\n",
        "other/x.py": "from other import x\n",
    }
    for name, text in sources.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert import_graph(tmp_path, ["pkg", "other"]) == {
        "pkg": {"pkg.sub"},
        "pkg.sub": {"pkg.lazy", "pkg"},  # `NAME` is no submodule: the package
        "pkg.lazy": {"pkg.sub"},  # not the TYPE_CHECKING import
        "pkg.deep": {"pkg.lazy", "pkg.sub"},
        "other": {"pkg.deep"},
        "other.x": set(),
    }
    assert find_cycles(import_graph(tmp_path, ["pkg", "other"])) == [
        ["pkg", "pkg.sub", "pkg"],
        ["pkg.lazy", "pkg.sub", "pkg.lazy"],
    ]


def test_layer_violations_name_each_import_against_the_layers():
    graph = {"vae.model": {"paliseg.files", "train.run"}, "train.loop": {"infer.sweep", "converters.x"},
             "infer.serve": {"paliseg.cli.main"}, "paliseg.cli.main": {"infer.serve", "paliseg.cli"}}  # fmt: skip
    assert layer_violations(graph) == [
        "infer.serve -> paliseg.cli.main",
        "train.loop -> infer.sweep",
        "vae.model -> train.run",
    ]


# --- the project -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    graph = import_graph(REPO, PACKAGES)
    assert {"paliseg.model", "paliseg.cli.main", "train.loop", "infer.serve"} <= set(graph)  # the walk found them
    return graph


def test_no_import_cycle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_libraries_import_no_stage_and_stages_no_later_one(graph):
    violations = layer_violations(graph)
    assert not violations, "imports against the layers (library < converters < train < infer < paliseg.cli):\n" + (
        "\n".join(violations)
    )
