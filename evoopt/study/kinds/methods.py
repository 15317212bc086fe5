"""Method search: the merge method is a searched choice, and each method brings its own coefficients, one
per model (``methods``) or per model and layer group (``methods-layerwise``).

A trial first draws ``method`` (a categorical parameter), then that method's coefficients, named
``<method>:<model>[.<unit>].<coefficient>`` so that each method's parameters are its own (conditional on
the choice). TPE models the choice and the coefficients together; evoopt's CMA-ES runs one CMA-ES per
method over that method's coefficients, and the methods race by successive rejects (see
:class:`~evoopt.search.cma.EvoCmaSampler`'s ``branches``). One CMA-ES per method rather than CMA-ES with
margin over the choice: the methods' coefficient spaces differ in size and meaning, so one Gaussian over
their union would move coefficients that the trial does not use, and a method index has no order for a
margin to follow.

A new study first scores each method at its known-good start (``space.methods.<m>.start``: the papers'
and mergekit's usual settings, the same for every model and layer), so every sampler starts from them.
One evaluation model is shared by all methods; each method has its own Merger (the task-arithmetic
family and TSV-M keep their preprocessed state, in memory, for the whole run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, cast

import optuna
import torch
from optuna.trial import TrialState

from evoopt.merge import get_method
from evoopt.merge.merger import Merger
from evoopt.merge.recipe import Recipe, RecipeError
from evoopt.models.io import open_source, resolve_path
from evoopt.search.evolver import rejected
from evoopt.study.config import (
    MethodChoice,
    StudyConfig,
    bounds_problems,
    changed_keys,
    fixed_problems,
    fixed_range_problems,
    log_problems,
    method_source_problems,
)
from evoopt.study.kinds.base import Progress
from evoopt.study.kinds.parameter import ParameterKind
from evoopt.study.space import Sources, Space, fixed_recipe, layer_units
from evoopt.study.storage import START_ATTR

CHOICE = "method"  # the categorical parameter
DEFAULT_METHODS: dict[str, dict[str, Any]] = {
    # TIES (Yadav et al. 2023) and DARE (Yu et al. 2024): mergekit's usual weight 1, density 0.5
    "ties": {"search": {"weight": (0.0, 1.5), "density": (0.1, 1.0)}, "start": {"weight": 1.0, "density": 0.5}},
    "dare_ties": {"search": {"weight": (0.0, 1.5), "density": (0.1, 1.0)},
                  "start": {"weight": 1.0, "density": 0.5}},
    # DELLA (Deep et al. 2024): epsilon 0.1; density inside (epsilon, 1 - epsilon)
    "della": {"search": {"weight": (0.0, 1.5), "density": (0.2, 0.85)}, "fixed": {"epsilon": 0.1},
              "start": {"weight": 1.0, "density": 0.5}},
    # TSV-M (Gargiulo et al. 2025) and Iso-CTS (Marczak et al. 2025): alpha 1 as in FusionBench. Iso-CTS's
    # spectrum is flat at the mean singular value and its authors tune alpha on validation data; the weights
    # scale it, and on minilm-cross-task's dev set alpha 1 scored .70, 2 .81, 3 .86, 4 .88, 5 and 6 .89 (TIES
    # .73; benchmarks/beyond.py --iso-scales), so its bounds reach 6 (CMA-ES starts from their middle)
    "tsv": {"search": {"weight": (0.0, 1.5)}, "start": {"weight": 1.0}},
    "iso_cts": {"search": {"weight": (0.0, 6.0)}, "start": {"weight": 1.0}},
}


def method_choices(config: StudyConfig) -> dict[str, MethodChoice]:
    """The searched methods: ``space.methods``, or the defaults."""
    if config.space.methods:
        return dict(config.space.methods)
    return {name: MethodChoice(**spec) for name, spec in DEFAULT_METHODS.items()}


class MethodSpace:
    """``method`` and, per method, a :class:`Space` of its coefficients (prefixed with ``<method>:``)."""

    def __init__(self, config: StudyConfig, sources: Sources, units: list[Any] | None = None) -> None:
        self.config, self.sources = config, sources
        self.choices = method_choices(config)
        self.spaces = {name: Space(_for_method(config, name, choice), sources, units, prefix=f"{name}:")
                       for name, choice in self.choices.items()}
        self.distributions: dict[str, optuna.distributions.BaseDistribution] = {
            CHOICE: optuna.distributions.CategoricalDistribution(list(self.spaces))}
        for space in self.spaces.values():
            self.distributions.update(space.distributions)

    def suggest(self, trial: optuna.Trial) -> Recipe:
        method = trial.suggest_categorical(CHOICE, list(self.spaces))
        return self.spaces[str(method)].suggest(trial)

    def recipe(self, params: Mapping[str, Any]) -> Recipe:
        method = params.get(CHOICE)
        if method not in self.spaces:
            raise RecipeError(f"trial: parameter {CHOICE!r} is {method!r}; the study searches {list(self.spaces)}")
        return self.spaces[str(method)].recipe(dict(params))

    def params(self, recipe: Recipe) -> dict[str, Any]:
        """The parameters of a recipe of one of the searched methods (a warm start)."""
        if recipe.method not in self.spaces:
            raise RecipeError(f"recipe: method {recipe.method!r} is not searched; the study searches "
                              f"{list(self.spaces)}")
        return {CHOICE: recipe.method, **self.spaces[recipe.method].params(recipe)}

    def default(self) -> Recipe:
        """The evaluation model's first recipe: the first method at the centre of its space."""
        return next(iter(self.spaces.values())).default()

    def starts(self) -> list[dict[str, Any]]:
        """Each method's known-good start, as trial parameters (methods without a start are left out)."""
        found = []
        for name, choice in self.choices.items():
            if choice.start:
                space = self.spaces[name]
                found.append({CHOICE: name, **{param: choice.start[key] for param, (_, _, key) in space.names.items()}})
        return found

    def sampler_options(self) -> dict[str, Any]:
        """The distributions, and the choice with each method's own parameters (one CMA-ES per method)."""
        return {"search_space": dict(self.distributions),
                "branches": {CHOICE: {name: list(space.distributions) for name, space in self.spaces.items()}}}


def _for_method(config: StudyConfig, name: str, choice: MethodChoice) -> StudyConfig:
    """The study config as a single-method space over ``name`` (what a per-method Space reads)."""
    space = config.space.model_copy(update={"method": name, "search": dict(choice.search), "fixed": dict(choice.fixed),
                                            "log": list(choice.log)})
    return config.model_copy(update={"space": space})


class MethodsKind(ParameterKind):
    """``space.kind: methods`` / ``methods-layerwise``: the method searched with its coefficients."""

    names = ("methods", "methods-layerwise")
    keys: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "methods": ("methods",), "methods-layerwise": ("methods", "layers_per_group", "split_blocks")}

    @classmethod
    def problems(cls, config: StudyConfig) -> list[str]:
        if config.space.kind not in cls.names:
            return []
        space, problems = config.space, []
        for key in changed_keys(space, "method", "search", "fixed", "log"):
            problems.append(f"space.{key}: not used by space.kind {space.kind}; give it per method in "
                            f"space.methods.<method>.{key}")
        for name, choice in method_choices(config).items():
            where = f"space.methods.{name}"
            try:
                method = get_method(name)
            except ValueError as error:
                problems.append(f"{where}: {str(error).removeprefix('method: ')}")
                continue
            problems += method_source_problems(config, where, name)
            if method.statistic:
                problems.append(f"{where}: {name} needs data statistics ({method.statistic}); the method search "
                                "takes data-free methods")
            if not choice.search:
                problems.append(f"{where}.search: give at least one coefficient to search")
            for key, (low, high) in choice.search.items():
                if key not in method.per_model:
                    problems.append(f"{where}.search.{key}: {name!r} has no per-model coefficient {key!r}; "
                                    f"allowed: {', '.join(sorted(method.per_model)) or 'none'}")
                problems += bounds_problems(f"{where}.search.{key}", low, high)
            problems += log_problems(where, choice.search, choice.log) + fixed_problems(where, method, choice.fixed)
            problems += fixed_range_problems(where, choice.fixed)
            for key, value in choice.start.items():
                low, high = choice.search.get(key, (value, value))
                if key not in choice.search:
                    problems.append(f"{where}.start.{key}: not a searched coefficient of {name!r}")
                elif not low <= value <= high:
                    problems.append(f"{where}.start.{key}: {value} lies outside the search bounds [{low}, {high}]")
            missing = [key for key in choice.search if key in method.per_model and key not in choice.start]
            if choice.start and missing:  # (the start trial is enqueued whole, before the first trial)
                problems.append(f"{where}.start: no value for {', '.join(missing)}; give every searched "
                                "coefficient a start, or no start")
        return problems

    def title(self) -> str:
        return f"{self.config.space.kind} ({', '.join(method_choices(self.config))})"

    def make_space(self) -> MethodSpace:  # type: ignore[override]
        if self.config.space.kind == "methods":
            return MethodSpace(self.config, self.sources)
        structure = self.sources.base or self.sources.models[0]
        source = open_source(resolve_path(structure, self.sources.root))
        probe = fixed_recipe(self.sources, next(iter(method_choices(self.config))), config=self.config)
        names = [n for n in source.keys() if source.dtype(n).is_floating_point and not probe.excluded(n)]
        units = layer_units(names, per_group=self.config.space.layers_per_group,
                            split=self.config.space.split_blocks, model=structure)
        return MethodSpace(self.config, self.sources, units)

    def build(self, study: optuna.Study | None, device: torch.device,
              progress: Progress | None = None) -> torch.nn.Module:
        self._progress = progress
        self.merger = Merger(self.space.default(), progress=progress)
        self.mergers = {self.merger.recipe.method: self.merger}
        self.model, self.tokenizer_folder, self.device = self.merger.model, self.merger.structure.folder, device
        return self.model

    def merged(self, recipe: Recipe) -> torch.nn.Module:
        """The recipe written into the shared evaluation model by its method's Merger (built on first use)."""
        merger = self.mergers.get(recipe.method)
        if merger is None:
            # (on the GPU path, beside the evaluation's reserve set by the first: each Merger put its state in
            # GPU_SHARE of what was free when built, after the evaluation's batches were sized: two left it 6 %)
            reserve = next((m.gpu_reserve for m in self.mergers.values() if m.gpu_reserve is not None), None)
            merger = self.mergers[recipe.method] = Merger(recipe, progress=self._progress, model=self.merger.model,
                                                          gpu_reserve=reserve)  # (the first method may have none:
            # no state, e.g. SLERP, Fisher)
        return merger.merge(recipe)

    def start(self, study: optuna.Study) -> None:
        """The study scores each method at its known-good start, enqueued once: unless the method has a trial
        already (its start, run or waiting, or a trial of the race: a start left out by a crash or by another
        worker's first trials is enqueued, never one for a method the race has moved past). A trial that failed
        without a score (Ctrl-C, the budget reached before it ran, a crash) does not count: its start was lost
        for good when every later run took it for done."""
        trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL or rejected(t)]
        had = {t.user_attrs.get(START_ATTR) for t in trials} | {t.params.get(CHOICE) for t in trials}
        for params in cast(MethodSpace, self.space).starts():
            if params[CHOICE] not in had:
                study.enqueue_trial(params, user_attrs={START_ATTR: params[CHOICE]})
