"""Search: evoopt's Optuna samplers (CMA-ES with its variants, the Evolver), the Evolver's
population, and the registry that builds a study's sampler and pruner from its config.

Plain Optuna code can use the samplers directly::

    from evoopt.search import EvoCmaSampler, EvolverSampler
"""

from __future__ import annotations

from evoopt.search.cma import EvoCmaSampler
from evoopt.search.evolver import EvolverSampler

__all__ = ["EvoCmaSampler", "EvolverSampler"]
