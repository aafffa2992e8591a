"""The package's import graph: no circles, and no module imports a layer above its own.

Layers, bottom up: the file and command-line helpers; models, schedulers and the timm wrapper; pipelines;
evaluation, training, conversion and the Hub templates; experiments; the demo page. The package's
``__init__`` is the facade above them all, so no module inside may import it. Imports are read from the
source (every ``import`` statement, inside functions too).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "arcee_diffusers"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE
LAYERS = (
    ("files", "command_line"),
    ("models", "schedulers", "timm_models"),
    ("pipelines",),
    ("evaluation", "training", "conversion", "hub_templates"),
    ("experiments",),
    ("demo",),
)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports (a package's ``__init__`` stands for ``from pkg import``
    of a name that is not a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        found |= {target for target in targets if target in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def layer(module: str) -> int:
    if module == PACKAGE:
        return len(LAYERS)  # the facade
    top = module.split(".")[1]
    return next(index for index, names in enumerate(LAYERS) if top in names)


def test_find_cycle_finds_a_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_relative_imports_and_imports_inside_functions():
    graph = import_graph()
    assert "arcee_diffusers.models.variants" in graph["arcee_diffusers.models.arcee_zigma_transformer"]
    assert "arcee_diffusers.pipelines" in graph["arcee_diffusers.conversion.core"]


def test_no_import_circles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_has_a_layer_and_imports_only_its_own_or_lower_ones():
    upward = [
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(module)
    ]
    assert not upward, upward
