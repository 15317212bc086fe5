"""What a search must beat: each source, their average and best, the logit ensemble, greedy soup, and
fixed merges (linear, task arithmetic, TIES, DARE-TIES, Fisher, RegMean), scored on dev and test.

Every comparison follows the study's direction (perplexity and mse are minimised).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from evoopt.data.objective import combine
from evoopt.merge.merger import Merger, pick_device
from evoopt.study.config import StudyConfig
from evoopt.study.evaluator import Evaluator, calibration_file
from evoopt.study.kinds.parameter import ParameterKind
from evoopt.study.space import Sources, fixed_recipe
from evoopt.study.storage import best_index, better

Progress = Callable[[str, int, int], None]


def score_baselines(config: StudyConfig, sources: Sources, *, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Score the sources, their ensemble, greedy soup and the fixed-recipe merges on dev and test: one row each."""
    rows: list[dict[str, Any]] = []
    _Baselines(config, sources, rows, progress or (lambda stage, done, total: None)).run()
    return rows


class _Baselines:
    def __init__(self, config: StudyConfig, sources: Sources, rows: list[dict[str, Any]], progress: Progress):
        self.config, self.sources, self.rows, self.progress = config, sources, rows, progress
        self.kind = ParameterKind(_linear_config(config), sources)  # sources (one-hot weights) and soups
        self.kind.build(None, pick_device(config.device))
        assert self.kind.tokenizer_folder is not None
        self.evaluator = Evaluator(config, sources, self.kind.tokenizer_folder, self.kind.device)
        self.weights = config.objective.weights
        self.maximize = config.directions[0] == "maximize"  # perplexity and mse: lower is better

    def _row(self, name: str, model: Any, started: float, **extra: Any) -> dict[str, Any]:
        dev = self.evaluator.score(model, self.config.objective.split)
        test = self.evaluator.score(model, "test")
        row = {"name": name, "dev": dev, "test": test, "dev_value": combine(dev, self.weights),
               "test_value": combine(test, self.weights), "seconds": round(time.perf_counter() - started, 2), **extra}
        self.rows.append(row)
        return row

    def _linear(self, weights: list[float]) -> Any:
        recipe = fixed_recipe(self.sources, "linear", {}, [{"weight": w} for w in weights], config=self.config)
        return self.kind.merged(recipe)

    def run(self) -> None:
        wanted = self.config.baselines
        n = len(self.sources.models)
        scored = "sources" in wanted or "greedy-soup" in wanted
        steps = (n if scored else 0) + sum(name != "sources" for name in wanted)  # each source, each other baseline
        done = 0
        sources: list[dict[str, Any]] = []
        if scored:
            for i, label in enumerate(self.sources.labels):
                self.progress("baselines: sources", done, steps)
                started = time.perf_counter()
                sources.append(self._row(f"source {label}", self._linear([float(i == j) for j in range(n)]),
                                         started, kind="source"))
                done += 1
            if "sources" in wanted:
                for name, pick in (("average of sources", None), ("best source (by dev)", "best")):
                    if pick is None:
                        row = {"name": name, "kind": "source",
                               "dev_value": sum(r["dev_value"] for r in sources) / n,
                               "test_value": sum(r["test_value"] for r in sources) / n,
                               "dev": {}, "test": {}, "seconds": 0.0}
                    else:
                        best = sources[best_index([r["dev_value"] for r in sources], maximize=self.maximize)]
                        row = {**best, "name": f"best source ({best['name'].removeprefix('source ')}, by dev)"}
                    self.rows.append(row)
            else:
                del self.rows[:]  # greedy soup alone needs the scores, not the rows
        for name in wanted:
            if name == "sources":
                continue  # scored above
            self.progress(f"baselines: {name}", done, steps)
            done += 1
            started = time.perf_counter()
            if name == "ensemble":
                if self.sources.kind == "causal" or self.sources.per_task_heads:
                    continue  # logit ensembles of classifiers that share a head only
                models = self._load_sources()
                self._row("logit ensemble", models, started, kind="ensemble")
                del models
            elif name == "greedy-soup":
                self._greedy_soup(sources, started)
            else:
                self._merge(name, started)
        self.progress("baselines", steps, steps)

    def _load_sources(self) -> list[torch.nn.Module]:
        from evoopt.models.io import load_target, open_source, resolve_path

        return [load_target(open_source(resolve_path(m, self.sources.root)), dtype=self.kind.merger.dtype,
                            device=self.kind.device) for m in self.sources.models]

    def _greedy_soup(self, sources: list[dict[str, Any]], started: float) -> None:
        def score(members: list[int]) -> float:
            weights = [float(j in members) for j in range(len(sources))]
            return combine(self.evaluator.score(self._linear(weights), self.config.objective.split), self.weights)

        soup = greedy_soup([r["dev_value"] for r in sources], score, maximize=self.maximize)
        labels = [self.sources.labels[i] for i in soup]
        self._row(f"greedy soup ({', '.join(labels)})", self._linear([float(j in soup) for j in
                                                                      range(len(sources))]), started, kind="soup")

    def _merge(self, method: str, started: float) -> None:
        params, per_model = _BASELINE_RECIPES.get(method, ({}, {}))
        calibration = None
        from evoopt.merge import get_method

        if get_method(method).statistic:
            calibration = calibration_file(self.config, self.sources)
        recipe = fixed_recipe(self.sources, method, params, [dict(per_model)] * len(self.sources.models),
                              config=self.config, calibration=calibration)
        merger = Merger(recipe)
        merged = merger.merge()
        own = self.kind.merger.model
        with torch.no_grad():  # score through the worker's model (its head handling and device)
            own.load_state_dict(merged.state_dict())
        self._row(f"{method} (fixed)", own, started, kind="merge", recipe=recipe.model_dump(
            mode="json", exclude_defaults=True))
        del merger, merged


def greedy_soup(scores: list[float], score: Callable[[list[int]], float], *, maximize: bool) -> list[int]:
    """Greedy soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1 / Algorithm 1): the sources in order
    of their own dev score, best first; each joins the uniform soup when the soup with it scores better than
    the soup without it. ``score(members)`` scores the uniform soup of those sources; returns the members,
    in source order. "Best" and "better" follow the study's direction."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i] if maximize else scores[i], i))
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        value = score(sorted([*soup, i]))
        if better(value, best, maximize=maximize):
            soup.append(i)
            best = value
    return sorted(soup)


# fixed recipes of the merge baselines: (shared parameters, per-model parameters)
_BASELINE_RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({"scale": 0.5}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ({"normalize": True}, {"weight": 1.0, "density": 0.5}),
    "fisher": ({}, {"weight": 1.0}),
    "regmean": ({}, {}),
}


def _linear_config(config: StudyConfig) -> StudyConfig:
    """The same study with a linear space: its Merger makes sources (one-hot weights) and soups."""
    space = config.space.model_copy(update={"method": "linear", "search": {"weight": (0.0, 1.0)}, "fixed": {},
                                            "log": [], "kind": "global"})
    return config.model_copy(update={"space": space})
