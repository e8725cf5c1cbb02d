"""The package's layers import only downward, and no modules import each other in a cycle.

Every module of pyflat is parsed (not imported) and each of its imports, those inside
functions included, is resolved to a module of the package. A module may import from
its own layer or the layers below it; the import graph must have no cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyflat"

#: lowest first; a module belongs to the first layer one of whose prefixes it starts with
LAYERS = [
    ("base", ["pyflat.errors", "pyflat.precision", "pyflat._progress", "pyflat.activations",
              "pyflat.allocator", "pyflat._C"]),
    ("ops", ["pyflat.ops"]),
    ("linear algebra over any operator", ["pyflat.linalg"]),
    ("engines", ["pyflat.engines"]),
    ("reference", ["pyflat.reference"]),
    ("curvature front door", ["pyflat.curvature", "pyflat.generic"]),
    ("analysis", ["pyflat.analysis"]),
    ("applications", ["pyflat.applications"]),
    ("command line and public API", ["pyflat.cli", "pyflat.paper", "pyflat.__main__",
                                     "pyflat"]),
]


def layer_of(module: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                return index
    return None


def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules ``module`` imports: ``from X import name`` counts as an
    import of X.name where that is a module, else of X."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in known
                       else source for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a.b.c -> a.b where c is a name
                target = target.rpartition(".")[0]
            if target.startswith("pyflat") and target != module:
                found.add(target)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    names = module_names()
    return {name: imports_of(name, path, set(names)) for name, path in names.items()}


def test_every_module_has_a_layer(graph):
    missing = [name for name in graph if layer_of(name) is None]
    assert not missing, f"modules outside every layer (add them to LAYERS): {missing}"


def test_imports_go_downward(graph):
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
              f"({LAYERS[layer_of(target)][0]})"
              for name, targets in sorted(graph.items()) for target in sorted(targets)
              if layer_of(target) > layer_of(name)]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycles(graph):
    state: dict[str, str] = {}
    stack: list[str] = []
    cycles = []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_upward_imports_and_cycles(tmp_path):
    """The parser resolves relative imports, imports inside functions and imported names."""
    pkg = tmp_path / "pyflat"
    (pkg / "linalg").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "linalg" / "__init__.py").write_text("from .lanczos import eigsh\n")
    (pkg / "linalg" / "lanczos.py").write_text(
        "def eigsh():\n    from ..curvature import GGN\n")
    (pkg / "curvature.py").write_text("from .linalg import eigsh\n")
    known = {"pyflat", "pyflat.linalg", "pyflat.linalg.lanczos", "pyflat.curvature"}
    assert imports_of("pyflat.linalg.lanczos", pkg / "linalg" / "lanczos.py", known) == {
        "pyflat.curvature"}
    assert imports_of("pyflat.linalg", pkg / "linalg" / "__init__.py", known) == {
        "pyflat.linalg.lanczos"}
    assert imports_of("pyflat.curvature", pkg / "curvature.py", known) == {"pyflat.linalg"}
    assert layer_of("pyflat.curvature") > layer_of("pyflat.linalg.lanczos")
