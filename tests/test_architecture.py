"""The layout promised in docs/architecture.md, checked: layers point one way and nothing imports in a circle.

Read from the sources (``ast``), not by importing: every ``import`` statement counts, at module level or inside
a function (a lazy import is still a dependency). Imports under ``if TYPE_CHECKING:`` are for type checkers only
and never run, so they do not count toward a cycle; but the engine and the core may not name an integration even
there.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gradguard"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(runtime imports, type-checking-only imports) of gradguard modules in ``path``."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    runtime, typed = set(), set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            if name.startswith("gradguard"):
                (typed if id(node) in typing_only else runtime).add(name)
    return runtime, typed


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The gradguard module an imported name lives in (``gradguard.engine.policy.apply`` -> the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for mod, path in MODULES.items():
        runtime, _ = _imports(path)
        targets = {_resolve(n) for n in runtime}
        # A package's __init__ is not an edge of interest (gradguard/__init__ re-exports lazily by name).
        graph[mod] = {t for t in targets if t and t != mod and MODULES[t].name != "__init__.py"}
    return graph


def test_engine_and_core_import_no_integration() -> None:
    offenders = []
    for mod, path in MODULES.items():
        if mod.startswith(("gradguard.engine", "gradguard.core")):
            runtime, typed = _imports(path)
            offenders += [f"{mod} -> {n}" for n in runtime | typed if n.startswith("gradguard.integrations")]
    assert not offenders, offenders


def test_no_import_cycle() -> None:
    graph = _graph()
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", ["core", "report"])
def test_lower_layers_do_not_reach_up(layer: str) -> None:
    """core (groups, audit) and report (the data model, renderers) know nothing of the running engine."""
    graph = _graph()
    up = [
        f"{m} -> {d}"
        for m, deps in graph.items()
        if m.startswith(f"gradguard.{layer}")
        for d in deps
        if d.startswith(("gradguard.engine", "gradguard.integrations", "gradguard.testing"))
    ]
    assert not up, up
