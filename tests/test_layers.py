"""The package's layers: every import (lazy ones included) points down, and no module imports itself back.

Layers, bottom to top (CONTRIBUTING.md): errors; merge (pure tensor maths); models (files, recipes,
the Merger, path models); data (corpora, lm-eval tasks, experts, scoring); search (samplers, the
Evolver's population); study (config, spaces, storage, evaluation, kinds, baselines, reports, the
engine); integrations (the lm-eval model, the command line). Imports under ``if TYPE_CHECKING:``
are annotations only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "evoopt"
LAYERS = {
    "errors": 0,
    "merge": 1, "statistics": 1,
    "io": 2, "recipe": 2, "merger": 2, "dfs": 2,
    "data": 3, "lmeval": 3, "objective": 3, "settings": 3, "training": 3, "experts": 3,
    "cma": 4, "evolver": 4, "population": 4, "samplers": 4,
    "config": 5, "space": 5, "storage": 5, "evaluator": 5, "kinds": 5, "report": 5, "baselines": 5, "study": 5,
    "lm_eval_model": 6, "display": 6, "cli": 6,
}


def _unit(module: str) -> str:
    """The layer unit of a module: ``evoopt.kinds.dfs`` -> ``kinds``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> set[str]:
    """Every evoopt module ``path`` imports, at the top or inside functions, but not for type checking only."""
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
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("evoopt"))
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        unit = _unit(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        graph.setdefault(unit, set()).update(_unit(m) for m in _imports(path))
    for unit in graph:
        graph[unit].discard(unit)
    return graph


def test_every_module_has_a_layer() -> None:
    units = set(_graph()) - {"__init__"}
    assert units <= set(LAYERS), f"give these modules a layer in LAYERS (and CONTRIBUTING.md): {units - set(LAYERS)}"


def test_every_import_points_down_or_sideways() -> None:
    upward = sorted(f"{a} ({LAYERS[a]}) imports {b} ({LAYERS[b]})" for a, targets in _graph().items()
                    for b in targets if a in LAYERS and b in LAYERS and LAYERS[b] > LAYERS[a])
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    graph, state, cycles = _graph(), {}, []

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
    assert not cycles, "\n".join(cycles)


def test_the_checks_see_a_lazy_upward_import(tmp_path: Path) -> None:
    """The walker finds an import inside a function, and skips one made for type checking only."""
    file = tmp_path / "m.py"
    file.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from evoopt.cli import main\n"
                    "def f():\n    from evoopt.study import run_study\n")
    assert _imports(file) == {"evoopt.study"}
