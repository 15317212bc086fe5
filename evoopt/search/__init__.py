"""Search: evoopt's Optuna samplers (CMA-ES with its variants, the Evolver, M2N2), the Evolver's
population, M2N2's archive, and the registry that builds a study's sampler and pruner from its config.

Plain Optuna code can use the samplers directly::

    from evoopt.search import EvoCmaSampler, EvolverSampler, M2N2Sampler
"""

from __future__ import annotations

from evoopt.search.cma import EvoCmaSampler
from evoopt.search.evolver import EvolverSampler
from evoopt.search.m2n2 import M2N2Sampler

__all__ = ["EvoCmaSampler", "EvolverSampler", "M2N2Sampler"]
