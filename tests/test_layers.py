"""The layering rule of ARCHITECTURE.md: imports point down the list of layers only, no module takes part in an
import cycle, and no module imports another module's private names. Every import counts, including the ones inside
functions (the lazy imports that keep `chatforge --help` fast) and the type-only ones."""

from __future__ import annotations

import ast
from pathlib import Path

import chatforge

PACKAGE = Path(chatforge.__file__).parent

# Lowest first. A module may import its own layer and the ones before it, never a later one.
LAYERS: list[set[str]] = [
    {"errors"},
    {"io", "device", "plots"},
    {"privacy"},
    {"data"},
    {"tokenizer"},
    {"model"},
    {"config"},
    {"weights"},
    {"generation"},
    {"train"},
    {"guard"},
    {"eval"},  # above guard: eval --safety measures the guard
    {"serve"},
    {"tools"},
    {"commands"},
    {"cli", "__init__", "__main__"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every chatforge import in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "chatforge"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "chatforge":
            found.append((node.module, [a.name for a in node.names], node.lineno))
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: its folder {top!r} is in no layer of tests/test_layers.py (add it)")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for target, names, _ in _imports(path):
            for name in names or [None]:  # `from chatforge.weights import gguf` imports the module weights.gguf
                sub = f"{target}.{name}" if name else target
                dep = sub if sub in modules else target
                if dep in modules and dep != module:
                    graph[module].add(dep)
    return graph


def test_every_module_is_in_a_layer():
    for module in _modules():
        _layer(module)


def test_imports_point_down_the_layers():
    wrong = []
    for module, path in _modules().items():
        for target, _, line in _imports(path):
            if _layer(target) > _layer(module):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {module} imports {target}, a higher layer")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_across_modules():
    modules = _modules()
    wrong = []
    for module, path in modules.items():
        for target, names, line in _imports(path):
            for name in names:
                if name.startswith("_") and not name.startswith("__") and target != module:
                    wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {target}.{name}")
    assert not wrong, "\n".join(wrong)
