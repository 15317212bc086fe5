"""What a search must beat: each source, their average and best, the logit ensemble, greedy soup, and
fixed merges (linear, task arithmetic, TIES, DARE-TIES, Fisher, RegMean), scored on dev and test.

Every comparison follows the study's direction (perplexity and mse are minimised).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from evoopt.data.objective import combine
from evoopt.data.outcomes import Outcomes
from evoopt.merge.merger import Merger, pick_device
from evoopt.merge.recipe import Recipe
from evoopt.study.config import MINIMIZE, StudyConfig
from evoopt.study.evaluator import Evaluator, calibration_file
from evoopt.study.fitness import PRECISION_CHECK_VERSION
from evoopt.study.kinds.parameter import ParameterKind
from evoopt.study.space import Sources, fixed_recipe
from evoopt.study.storage import best_index, better

Progress = Callable[[str, int, int], None]


@dataclass
class Scored:
    """The baselines' rows; each scored row's per-example outcomes on dev, by name; and the bfloat16 check
    (``objective.precision: auto``: the sources scored on dev in both precisions)."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    outcomes: dict[str, Outcomes] = field(default_factory=dict)
    precision: dict[str, Any] | None = None


def score_baselines(config: StudyConfig, sources: Sources, *, progress: Progress | None = None) -> Scored:
    """Score the sources, their ensemble, greedy soup and the fixed-recipe merges on dev and test: one row each."""
    scored = Scored()
    _Baselines(config, sources, scored, progress or (lambda stage, done, total: None)).run()
    return scored


# bfloat16 is taken where it keeps the sources' dev results: this share of examples unchanged, and no
# task's score moved by more than this (accuracy: points / 100; losses: relative)
AGREEMENT, LARGEST_CHANGE = 0.99, 0.01


def precision_verdict(checks: list[tuple[float, float, float, float]]) -> dict[str, Any] | None:
    """bfloat16 if every checked source kept its dev results (agreement, largest change of a task's score,
    float32 seconds, bfloat16 seconds per source); None if no source was checked."""
    if not checks:
        return None
    agreement, change = min(c[0] for c in checks), max(c[1] for c in checks)
    holds = agreement >= AGREEMENT and change <= LARGEST_CHANGE
    return {"precision": "bfloat16" if holds else "float32", "version": PRECISION_CHECK_VERSION,
            "agreement": round(agreement, 5), "largest_change": round(change, 5), "sources": len(checks),
            "speedup": round(sum(c[2] for c in checks) / sum(c[3] for c in checks), 2),
            "rule": f"agreement >= {AGREEMENT} and largest change <= {LARGEST_CHANGE}"}


class _Baselines:
    def __init__(self, config: StudyConfig, sources: Sources, scored: Scored, progress: Progress):
        self.config, self.sources, self.scored, self.progress = config, sources, scored, progress
        self.rows = scored.rows
        self.checks: list[tuple[float, float, float, float]] = []  # agreement, change, float32 s, bfloat16 s
        self.kind = ParameterKind(_linear_config(config), sources)  # sources (one-hot weights) and soups
        self.kind.build(None, pick_device(config.device))
        assert self.kind.tokenizer_folder is not None
        self.evaluator = Evaluator(config, sources, self.kind.tokenizer_folder, self.kind.device)
        self.weights = config.objective.weights
        self.maximize = config.directions[0] == "maximize"  # perplexity and mse: lower is better
        self.split = config.objective.split
        # what each recipe scored, by its JSON: {split: scores, "outcomes": on the search split}; a recipe is
        # scored once (greedy soup's candidates, its answer, a soup of one source, linear = the soup of all)
        self.known: dict[str, dict[str, Any]] = {}
        self.members: dict[str, list[Any]] = {}  # the sources' outputs by split, for the logit ensemble

    def _row(self, name: str, build: Callable[[], Any], started: float, *, made_by: Recipe | None = None,
             known: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        """A baseline's row, scored on dev and test; ``build`` makes its model when a split is still to score
        (``made_by``: its recipe, whose scores are kept and taken again; ``known``: scores already there)."""
        if known is None:
            known = self._known(made_by) if made_by is not None else {}
        model = None
        for split in (self.split, "test"):
            if split not in known:
                model = build() if model is None else model
                self._score(model, split, known, source=extra.get("kind") == "source")
        if known.get("outcomes") is not None:
            self.scored.outcomes[name] = known["outcomes"]
        dev, test = dict(known[self.split]), dict(known["test"])
        row = {"name": name, "dev": dev, "test": test, "dev_value": combine(dev, self.weights),
               "test_value": combine(test, self.weights), "seconds": round(time.perf_counter() - started, 2), **extra}
        self.rows.append(row)
        return row

    def _known(self, recipe: Recipe) -> dict[str, Any]:
        """What ``recipe`` has scored so far (filled in by :meth:`_score`)."""
        return self.known.setdefault(recipe.model_dump_json(), {})

    def _score(self, model: Any, split: str, known: dict[str, Any], *, source: bool = False) -> None:
        """Score ``model`` on ``split`` into ``known``; a source's outputs are kept for the ensemble, and on the
        search split its precision is checked (``objective.precision: auto``)."""
        started = time.perf_counter()
        known[split] = scores = self.evaluator.score(model, split)
        seconds = time.perf_counter() - started
        if source:
            self.members.setdefault(split, []).append(getattr(self.evaluator.scorer(split), "outputs", None))
        if split == self.split:
            known["outcomes"] = kept = self.evaluator.outcomes(split)
            if source and kept is not None and self.config.objective.precision == "auto":
                self._check_precision(model, scores, kept, seconds)

    def _check_precision(self, model: Any, dev: dict[str, float], reference: Outcomes, seconds: float) -> None:
        """Score the source on dev again under bfloat16 autocast; compare with its float32 results."""
        started = time.perf_counter()
        lower = self.evaluator.score(model, self.split, autocast=True)
        took = time.perf_counter() - started
        fast = self.evaluator.outcomes(self.split)
        assert fast is not None
        same = np.concatenate([np.isclose(fast.tasks[t].values, reference.tasks[t].values, rtol=1e-2, atol=1e-3)
                               for t in reference.tasks])  # per example, over every task
        relative = self.config.objective.metric in MINIMIZE
        change = max(abs(lower[t] - dev[t]) / (abs(dev[t]) if relative else 1.0) for t in dev)
        self.checks.append((float(same.mean()), float(change), seconds, took))

    def _linear(self, weights: list[float]) -> Recipe:
        return fixed_recipe(self.sources, "linear", {}, [{"weight": w} for w in weights], config=self.config)

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
                recipe = self._linear([float(i == j) for j in range(n)])
                sources.append(self._row(f"source {label}", partial(self.kind.merged, recipe), started,
                                         made_by=recipe, kind="source"))
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
                self._ensemble(started)
            elif name == "greedy-soup":
                self._greedy_soup(sources, started)
            else:
                self._merge(name, started)
        self.progress("baselines", steps, steps)
        self.scored.precision = precision_verdict(self.checks)

    def _ensemble(self, started: float) -> None:
        """The sources' logit ensemble (mean of their probabilities); from the outputs the sources' own rows
        kept, when every source was scored by a classifier scorer (no forward pass), else scored."""
        n = len(self.sources.models)
        splits = (self.split, "test")
        if all(len(self.members.get(s, [])) == n and None not in self.members[s] for s in splits):
            known: dict[str, Any] = {}
            for split in splits:
                known[split] = self.evaluator.scorer(split).ensemble_scores(self.members[split])
                if split == self.split:
                    known["outcomes"] = self.evaluator.outcomes(split)
            self._row("logit ensemble", list, started, known=known, kind="ensemble")  # (nothing left to build)
            return
        self._row("logit ensemble", self._load_sources, started, kind="ensemble")

    def _load_sources(self) -> list[torch.nn.Module]:
        from evoopt.models.io import load_target, open_source, resolve_path

        return [load_target(open_source(resolve_path(m, self.sources.root)), dtype=self.kind.merger.dtype,
                            device=self.kind.device) for m in self.sources.models]

    def _greedy_soup(self, sources: list[dict[str, Any]], started: float) -> None:
        def score(members: list[int]) -> float:
            recipe = self._linear([float(j in members) for j in range(len(sources))])
            known = self._known(recipe)
            if self.split not in known:
                self._score(self.kind.merged(recipe), self.split, known)
            return combine(known[self.split], self.weights)

        soup = greedy_soup([r["dev_value"] for r in sources], score, maximize=self.maximize)
        labels = [self.sources.labels[i] for i in soup]
        recipe = self._linear([float(j in soup) for j in range(len(sources))])  # scored on dev above (or a source)
        self._row(f"greedy soup ({', '.join(labels)})", partial(self.kind.merged, recipe), started, made_by=recipe,
                  kind="soup")

    def _merge(self, method: str, started: float) -> None:
        params, per_model = _BASELINE_RECIPES.get(method, ({}, {}))
        calibration = None
        from evoopt.merge import get_method

        if get_method(method).statistic:
            calibration = calibration_file(self.config, self.sources)
        recipe = fixed_recipe(self.sources, method, params, [dict(per_model)] * len(self.sources.models),
                              config=self.config, calibration=calibration)

        def build() -> torch.nn.Module:  # (not at all for linear after greedy soup of every source: the same recipe)
            merged = Merger(recipe).merge()
            # scored through the worker's model (its head handling and device). Not its excluded per-task heads:
            # after a task is scored, the model's head is that task's own tensor (swapped in), and a copy into it
            # would overwrite that task's head.
            own = self.kind.merger.model
            mine = own.state_dict()
            with torch.no_grad():
                for name, tensor in merged.state_dict().items():
                    if not recipe.excluded(name):
                        mine[name].copy_(tensor)
            return own

        self._row(f"{method} (fixed)", build, started, made_by=recipe, kind="merge",
                  recipe=recipe.model_dump(mode="json", exclude_defaults=True))


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
    "della": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),  # the method search's known-good start
    "della_linear": ({}, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
    "fisher": ({}, {"weight": 1.0}),
    "regmean": ({}, {}),
}


def _linear_config(config: StudyConfig) -> StudyConfig:
    """The same study with a linear space: its Merger makes sources (one-hot weights) and soups."""
    space = config.space.model_copy(update={"method": "linear", "search": {"weight": (0.0, 1.0)}, "fixed": {},
                                            "log": [], "kind": "global"})
    return config.model_copy(update={"space": space})
