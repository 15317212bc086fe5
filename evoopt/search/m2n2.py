"""The moves of M2N2 (Abrantes, Lange and Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025),
as pure functions over an archive's per-example results and the parents' tensors.

Read from the authors' released code (github.com/SakanaAI/natural_niches, ``natural_niches_fn.py`` and
``helper_fn.py``), which the paper's description follows except where noted:

- **Resource competition** (:func:`competition_fitness`): with S[i, j] the result of archive member i on
  example j (1 right, 0 wrong) and z_j = sum_k S[k, j] the archive's total on example j,
  F[i, j] = S[i, j] / z_j^alpha and f_i = sum_j F[i, j]. An example that few members solve is worth more
  to each of them, so members that solve what others cannot survive. alpha = 1 (the code's default);
  alpha = 0 is plain accuracy. Where z_j = 0 the divisor is 1 (the code; the paper writes z + eps).
- **Attraction** (:func:`pick_parents`): the first parent A is drawn with probability f_A / sum f; the
  second, B, with probability proportional to g_B = sum_j max(0, S[B, j] - S[A, j]) / z_j^alpha, its
  strength where A is weak. Deliberate addition: where A is at least as good as every member on every
  example (all g = 0, undefined in the code), B is drawn by fitness among the others.
- **Crossover at a split** (:func:`crossover`): a split point s in the parameters' order and a ratio
  w ~ U[0, 1); coordinate i takes v_i = w before the split and 1 - w after it, and the child is the
  spherical interpolation with one angle Omega between the whole parents,
  child_i = (sin((1 - v_i) Omega) A_i + sin(v_i Omega) B_i) / sin Omega (linear when sin Omega <= 1e-6,
  or with ``linear``): in the linear limit (1 - w) A + w B before the split, w A + (1 - w) B after.
- **Replacement** (:func:`replaced`): the fitness of the archive and the child is recomputed together;
  the child takes the place of the least fit member when the child is not itself strictly the least fit
  (ties go to the child, as in the code).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SLERP_FLOOR = 1e-6  # below this sin(Omega) the parents are (anti)parallel: interpolate linearly


def _shares(scores: np.ndarray, alpha: float) -> np.ndarray:
    """F[i, j] = S[i, j] / z_j^alpha, z_j = sum_k S[k, j] (1 where it is 0)."""
    scores = np.asarray(scores, dtype=float)
    total = scores.sum(axis=0)
    divisor = np.where(total > 0, total, 1.0) ** alpha
    return np.asarray(scores / divisor)


def competition_fitness(scores: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Each member's share of the examples' resources (M2N2's fitness), from S (members x examples)."""
    return np.asarray(_shares(scores, alpha).sum(axis=1))


def attraction(scores: np.ndarray, first: int, alpha: float = 1.0) -> np.ndarray:
    """g_B = sum_j max(0, S[B, j] - S[A, j]) / z_j^alpha for every member B, A = ``first`` (g_A = 0)."""
    scores = np.asarray(scores, dtype=float)
    total = scores.sum(axis=0)
    divisor = np.where(total > 0, total, 1.0) ** alpha
    return np.asarray((np.maximum(0.0, scores - scores[first]) / divisor).sum(axis=1))


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    weights = np.asarray(weights, dtype=float)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def pick_parents(scores: np.ndarray, rng: np.random.Generator, *, alpha: float = 1.0,
                 attract: bool = True) -> tuple[int, int]:
    """Parents A (by competition fitness) and B (by attraction to A; without ``attract``, by fitness too,
    with replacement, as the code's ``--no_matchmaker``)."""
    fitness = competition_fitness(scores, alpha)
    first = _draw(fitness, rng)
    if not attract:
        return first, _draw(fitness, rng)
    pull = attraction(scores, first, alpha)
    if pull.sum() <= 0:  # A is at least as good everywhere: fall back to fitness among the others
        pull = np.where(np.arange(len(fitness)) == first, 0.0, np.maximum(fitness, 1e-12))
    return first, _draw(pull, rng)


def replaced(scores: np.ndarray, child: np.ndarray, alpha: float = 1.0) -> int | None:
    """The archive member the child replaces (the least fit, fitness recomputed with the child among them),
    or None when the child is strictly the least fit."""
    together = np.vstack([np.asarray(scores, dtype=float), np.asarray(child, dtype=float)[None, :]])
    fitness = competition_fitness(together, alpha)
    weakest = int(np.argmin(fitness[:-1]))
    return None if fitness[-1] < fitness[weakest] else weakest


def slerp_angle(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """Omega between two parents, each a sequence of tensors (their parameters in order), as whole vectors."""
    dot = sum(float((a.double() * b.double()).sum()) for a, b in zip(first, second))
    norm_a = math.sqrt(sum(float(a.double().square().sum()) for a in first))
    norm_b = math.sqrt(sum(float(b.double().square().sum()) for b in second))
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return math.acos(max(-1.0, min(1.0, dot / (norm_a * norm_b))))


def crossover(a: torch.Tensor, b: torch.Tensor, *, offset: int, split: int, ratio: float, omega: float = 0.0,
              linear: bool = False) -> torch.Tensor:
    """One tensor of the child: ``a`` and ``b`` are the parents' tensor whose first entry is entry ``offset``
    of the parameters' order, ``split`` the split point in that order, ``ratio`` w, ``omega`` the parents'
    angle (:func:`slerp_angle`)."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    index = torch.arange(offset, offset + a.numel(), dtype=torch.int64).reshape(a.shape)
    v = torch.where(index < split, ratio, 1.0 - ratio).to(dtype)
    a_, b_ = a.to(dtype), b.to(dtype)
    sine = math.sin(omega)
    if linear or sine <= SLERP_FLOOR:
        child = (1.0 - v) * a_ + v * b_
    else:
        child = (torch.sin((1.0 - v) * omega) * a_ + torch.sin(v * omega) * b_) / sine
    return child.to(a.dtype)
