"""Samplers by name: every ``optuna.samplers`` class, plus evoopt's own (registered in ``SAMPLERS``)."""

from __future__ import annotations

import inspect
from typing import Any

import optuna

from evoopt.config import ConfigError, SamplerSpec

# evoopt's samplers, name -> class; the search-space modules register theirs here
SAMPLERS: dict[str, type[optuna.samplers.BaseSampler]] = {}


def make_sampler(spec: SamplerSpec, seed: int) -> optuna.samplers.BaseSampler:
    """Instantiate a sampler; ``seed`` is passed when the sampler takes one and the options do not set it."""
    cls = SAMPLERS.get(spec.name) or getattr(optuna.samplers, spec.name)
    options: dict[str, Any] = dict(spec.options)
    if "seed" in inspect.signature(cls).parameters:
        options.setdefault("seed", seed)
    try:
        return cls(**options)
    except TypeError as error:
        raise ConfigError(f"sampler.options: {spec.name} does not accept these options ({error})") from None


def make_pruner(name: str, options: dict[str, Any]) -> optuna.pruners.BasePruner:
    try:
        pruner: optuna.pruners.BasePruner = getattr(optuna.pruners, name)(**options)
    except TypeError as error:
        raise ConfigError(f"pruner.options: {name} does not accept these options ({error})") from None
    return pruner
