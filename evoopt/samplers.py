"""Kept for code written against the first plan: ``from evoopt.samplers import EvoCmaSampler, EvolverSampler``.

The samplers live in :mod:`evoopt.search`.
"""

from __future__ import annotations

from evoopt.search.cma import EvoCmaSampler
from evoopt.search.evolver import EvolverSampler
from evoopt.search.samplers import SAMPLERS, make_pruner, make_sampler

__all__ = ["SAMPLERS", "EvoCmaSampler", "EvolverSampler", "make_pruner", "make_sampler"]
