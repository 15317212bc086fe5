"""The package's layers: every import (lazy ones included) points down, and no module imports itself back.

Layers, bottom to top (CONTRIBUTING.md), one subpackage each: errors; models (files, sources, path
models, statistics); merge (the merge methods, recipes, the Merger); data (corpora, lm-eval tasks,
settings, experts, objectives); search (samplers, the Evolver's population); study (config, spaces,
kinds, storage, evaluation, baselines, reports, the engine); integrations and the command line.
``evoopt.samplers`` and ``evoopt.lm_eval_model`` are the first plan's import paths, kept as
re-exports. Imports under ``if TYPE_CHECKING:`` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "evoopt"
LAYERS = {
    "errors": 0,
    "models": 1,
    "merge": 2,
    "data": 3,
    "search": 4, "samplers": 4,
    "study": 5,
    "integrations": 6, "lm_eval_model": 6, "display": 6, "cli": 6,
}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(path): path for path in PACKAGE.rglob("*.py")}


def _unit(module: str) -> str:
    """The layer of a module is its subpackage: ``evoopt.study.kinds.dfs`` -> ``study``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every evoopt module ``path`` imports, at the top or inside functions, but not for type checking only.

    ``from evoopt.pkg import name`` counts as an import of ``evoopt.pkg.name`` where that is a module.
    """
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("evoopt"):
            found.update(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                         for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("evoopt"))
    return found


def _graph() -> dict[str, set[str]]:
    """Subpackage -> the subpackages it imports."""
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        graph.setdefault(_unit(module), set()).update(_unit(m) for m in _imports(path))
    for unit in graph:
        graph[unit].discard(unit)
    return graph


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports; a module reading its own package's facade (``__init__``) is not counted."""
    return {module: {m for m in _imports(path) if not module.startswith(m + ".")} for module, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}
    cycles: list[str] = []

    def visit(unit: str, trail: list[str]) -> None:
        state[unit] = "open"
        for target in sorted(graph.get(unit, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*trail[trail.index(target):], target]))
            elif target not in state:
                visit(target, [*trail, target])
        state[unit] = "done"

    for unit in sorted(graph):
        if unit not in state:
            visit(unit, [unit])
    return cycles


def test_every_module_has_a_layer() -> None:
    units = set(_graph()) - {"__init__"}
    assert units <= set(LAYERS), f"give these modules a layer in LAYERS (and CONTRIBUTING.md): {units - set(LAYERS)}"


def test_every_import_points_down_or_sideways() -> None:
    upward = sorted(f"{a} ({LAYERS[a]}) imports {b} ({LAYERS[b]})" for a, targets in _graph().items()
                    for b in targets if a in LAYERS and b in LAYERS and LAYERS[b] > LAYERS[a])
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    """Neither between subpackages nor between the modules inside one."""
    cycles = _cycles(_graph()) + _cycles(_module_graph())
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_a_lazy_upward_import(tmp_path: Path) -> None:
    """The walker finds an import inside a function, and skips one made for type checking only."""
    file = tmp_path / "m.py"
    file.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evoopt.cli import main\n"
                    "def f():\n    from evoopt.study.run import run_study\n")
    assert _imports(file) == {"evoopt.study.run"}
