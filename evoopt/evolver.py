"""Evolver's offspring (Du et al., "Knowledge Fusion By Evolving Weights of Language Models", 2024).

Differential evolution whose individuals are whole models. One offspring is a :class:`Move`
(target, donors, F, Cr, crossover seed: plain numbers, so a trial can carry them as its
parameters) applied tensor by tensor: :func:`offspring_tensor` never flattens a model.

Strategies (the mutant ``v`` of target ``x_i``):

- ``paper``: ``v = x_i + F (x_r1 - x_r2)``, the paper's text;
- ``released``: ``v = x_i + F (x_ref - x_i)``, the authors' released code: ``x_ref`` a random
  other individual with probability ``0.5 / (G - g) + 0.5`` at generation g of G, else the
  best other;
- ``rand1``: ``v = x_r0 + F (x_r1 - x_r2)`` (classic DE/rand/1);
- ``best1``: ``v = x_best + F (x_r1 - x_r2)`` (DE/best/1).

Crossover, per element k: ``u[k] = v[k]`` if ``rand_k < Cr`` else ``x_i[k]``; the uniform
draws come from a generator seeded by (move seed, tensor index), so an offspring is rebuilt
exactly from its move and the population.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

STRATEGIES = ("paper", "released", "rand1", "best1")


@dataclass(frozen=True)
class Move:
    """One offspring of the population: who is replaced, from whom, and how."""

    strategy: str
    target: int
    donors: tuple[int, ...]  # paper, rand1, best1: (base, r1, r2) with base = target / r0 / best; released: (ref,)
    f: float
    cr: float
    seed: int


def draw_move(rng: np.random.Generator, strategy: str, *, target: int, size: int, best: int, f: float = 0.5,
              cr: float = 0.5, generation: int = 0, generations: int = 1) -> Move:
    """The donors of ``target``'s offspring, drawn from ``rng``; distinct from each other and the target."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: one of {', '.join(STRATEGIES)}, got {strategy!r}")
    needed = {"released": 2, "paper": 3, "rand1": 4, "best1": 3 if best == target else 4}[strategy]
    if size < needed:
        raise ValueError(f"strategy {strategy!r} needs {needed} distinct individuals here; the population has {size}")
    others = [j for j in range(size) if j != target]
    seed = int(rng.integers(2**31))
    if strategy == "released":
        random_ref = rng.uniform() < 0.5 / max(generations - generation, 1) + 0.5
        best_other = best if best != target else int(rng.choice(others))
        return Move(strategy, target, (int(rng.choice(others)) if random_ref else best_other,), f, cr, seed)
    if strategy == "rand1":
        r0, r1, r2 = (int(j) for j in rng.choice(others, size=3, replace=False))
        return Move(strategy, target, (r0, r1, r2), f, cr, seed)
    pool = [j for j in others if not (strategy == "best1" and j == best)]
    r1, r2 = (int(j) for j in rng.choice(pool, size=2, replace=False))
    return Move(strategy, target, (best if strategy == "best1" else target, r1, r2), f, cr, seed)


def mutant(move: Move, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v`` for one tensor; ``tensors[j]`` is individual j's copy of it (computed in float32)."""
    x = [tensors[j].float() for j in (move.target, *move.donors)]
    if move.strategy == "released":
        return x[0] + move.f * (x[1] - x[0])
    return x[1] + move.f * (x[2] - x[3])


def offspring_tensor(move: Move, tensors: Sequence[torch.Tensor], index: int) -> torch.Tensor:
    """Crossover of the mutant with the target for tensor number ``index``, in the target's dtype."""
    target = tensors[move.target]
    generator = torch.Generator().manual_seed(move.seed * 1_000_003 + index)
    take = torch.rand(target.shape, generator=generator) < move.cr
    return torch.where(take.to(target.device), mutant(move, tensors), target.float()).to(target.dtype)
