"""Samplers by name: every ``optuna.samplers`` class, plus evoopt's own (registered in ``SAMPLERS``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import optuna

from evoopt.errors import ConfigError
from evoopt.search.cma import EvoCmaSampler
from evoopt.search.evolver import EvolverSampler
from evoopt.search.m2n2 import M2N2Sampler
from evoopt.search.racing import RacingPruner

if TYPE_CHECKING:
    from evoopt.study.config import SamplerSpec
    from evoopt.study.space import Sources


class SearchSpace(Protocol):
    """What make_sampler reads of a study's space (each kind's space has these)."""

    sources: Sources

    def sampler_options(self) -> dict[str, Any]: ...

# evoopt's samplers, name -> class
SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {"EvoCmaSampler": EvoCmaSampler,
                                                          "EvolverSampler": EvolverSampler,
                                                          "M2N2Sampler": M2N2Sampler}
# what a space tells the samplers that take it (its sampler_options)
_FROM_SPACE = {"search_space", "population", "integrated", "branches", "members", "task_weights"}


# samplers that every worker and every resumed run give the study's one seed: evoopt's, which draw each trial from
# (seed, trial number) and restart CMA-ES from the seed, and those that keep their place in a sequence in the
# study's storage keyed by their seed (a scrambled QMC sequence: another seed starts a sequence anew). Optuna's
# others draw from their seed alone: one per worker, and a new one per resumed run
SHARED_SEED = frozenset({*SAMPLERS, "QMCSampler"})


def base_seed(spec: SamplerSpec, seed: int) -> int:
    """The seed a study's samplers derive theirs from: ``sampler.options.seed`` where given, else the study's."""
    given = spec.options.get("seed", seed)
    if isinstance(given, bool) or not isinstance(given, int):
        raise ConfigError(f"sampler.options.seed: an integer, got {given!r}")
    return given


def make_sampler(spec: SamplerSpec, seed: int,
                 space: Callable[[], SearchSpace] | None = None) -> optuna.samplers.BaseSampler:
    """Instantiate a sampler; ``seed`` is passed when the sampler takes one (over ``sampler.options.seed``, which
    the caller derived it from: :func:`base_seed`, then per worker or per resumed run).

    A sampler that takes ``search_space`` (or, the Evolver's, ``population``) is given what the
    study's space says (``space()`` is only built then), so that it samples the first trial too;
    an ``x0`` that is a string is a recipe file, read into the space's parameters.
    """
    cls = SAMPLERS.get(spec.name) or getattr(optuna.samplers, spec.name)
    options: dict[str, Any] = dict(spec.options)
    accepted = inspect.signature(cls).parameters
    if "seed" in accepted:
        options["seed"] = seed
    if space is None or not _FROM_SPACE & set(accepted):
        return _instantiate(spec, cls, options)
    if problems := option_problems(spec):  # (the space may train its experts first, for minutes)
        raise ConfigError(problems[0])
    built = space()
    for key, value in built.sampler_options().items():
        if key in accepted:
            options.setdefault(key, value)
    if isinstance(options.get("x0"), str) and hasattr(built, "params"):
        from evoopt.merge.recipe import load_recipe
        from evoopt.models.io import resolve_path

        options["x0"] = built.params(load_recipe(resolve_path(options["x0"], built.sources.root)))
    return _instantiate(spec, cls, options)


def option_problems(spec: SamplerSpec) -> list[str]:
    """What one of evoopt's samplers refuses in ``spec.options`` that can be told before its space is built (which
    may train the experts first): an option it does not take, or, where it needs nothing from the space, a value
    (a recipe file as ``x0`` is read with the space). Optuna's samplers are made without the space, at once."""
    cls = SAMPLERS.get(spec.name)
    if cls is None:
        return []
    accepted = inspect.signature(cls).parameters
    if unknown := sorted(set(spec.options) - set(accepted)):
        return [f"sampler.options: {spec.name} has no option {', '.join(map(repr, unknown))}; it takes "
                f"{', '.join(sorted(set(accepted) - {'seed'}))}"]
    if any(p.default is p.empty and n not in spec.options for n, p in accepted.items() if p.kind == p.KEYWORD_ONLY):
        return []  # (what it needs comes from the space: the Evolver's population, M2N2's members)
    try:
        cls(**{k: v for k, v in spec.options.items() if not (k == "x0" and isinstance(v, str))})
    except (TypeError, ValueError) as error:
        return [f"sampler.options: {spec.name} does not accept these options ({error})"]
    return []


def _instantiate(spec: SamplerSpec, cls: Any, options: dict[str, Any]) -> optuna.samplers.BaseSampler:
    try:
        sampler: optuna.samplers.BaseSampler = cls(**options)
        return sampler
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sampler.options: {spec.name} does not accept these options ({error})") from None


PRUNERS: dict[str, type[optuna.pruners.BasePruner]] = {"RacingPruner": RacingPruner}


def make_pruner(name: str, options: dict[str, Any]) -> optuna.pruners.BasePruner:
    try:
        pruner: optuna.pruners.BasePruner = (PRUNERS.get(name) or getattr(optuna.pruners, name))(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"pruner.options: {name} does not accept these options ({error})") from None
    return pruner
