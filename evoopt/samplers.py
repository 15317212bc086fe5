"""Samplers by name: every ``optuna.samplers`` class, plus evoopt's own (registered in ``SAMPLERS``)."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import optuna

from evoopt.cma import EvoCmaSampler
from evoopt.config import ConfigError, SamplerSpec

if TYPE_CHECKING:
    from evoopt.space import Space

# evoopt's samplers, name -> class
SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {"EvoCmaSampler": EvoCmaSampler}


def make_sampler(spec: SamplerSpec, seed: int, space: Space | None = None) -> optuna.samplers.BaseSampler:
    """Instantiate a sampler; ``seed`` is passed when the sampler takes one and the options do not set it.

    A sampler that takes ``search_space`` is given the study's space, so that it samples the
    first trial too; an ``x0`` that is a string is a recipe file, read into the space's parameters.
    """
    cls = SAMPLERS.get(spec.name) or getattr(optuna.samplers, spec.name)
    options: dict[str, Any] = dict(spec.options)
    accepted = inspect.signature(cls).parameters
    if "seed" in accepted:
        options.setdefault("seed", seed)
    if space is not None and "search_space" in accepted:
        options.setdefault("search_space", dict(space.distributions))
    if space is not None and isinstance(options.get("x0"), str):
        from evoopt.io import resolve_path
        from evoopt.recipe import load_recipe

        options["x0"] = space.params(load_recipe(resolve_path(options["x0"], space.sources.root)))
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sampler.options: {spec.name} does not accept these options ({error})") from None


def make_pruner(name: str, options: dict[str, Any]) -> optuna.pruners.BasePruner:
    try:
        pruner: optuna.pruners.BasePruner = getattr(optuna.pruners, name)(**options)
    except TypeError as error:
        raise ConfigError(f"pruner.options: {name} does not accept these options ({error})") from None
    return pruner
