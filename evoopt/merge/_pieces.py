"""Shared pieces that the named merge methods are composed of.

Everything here is a pure function over tensors: no I/O, no device moves, no
global RNG, and arguments are never mutated.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Sparsification = Literal["none", "magnitude", "breadcrumbs", "random"]

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
_FMIX1 = 0x85EBCA6B
_FMIX2 = 0xC2B2AE35


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges are computed in: float64 stays float64, all else float32."""
    if not dtype.is_floating_point:
        raise TypeError(f"merging needs floating-point tensors, got dtype {dtype}")
    return torch.float64 if dtype == torch.float64 else torch.float32


def divide(tensor: torch.Tensor, by: float) -> torch.Tensor:
    """``tensor / by`` as the CPU computes it, on any device: CUDA divides by a host scalar as a product with its
    reciprocal, a bit off the quotient; by a tensor on the device (filled there, no copy), it divides. A 16-bit
    tensor is divided in float32 and rounded, as the CPU does with a number (a 0-dim float32 tensor would be cast
    to the 16-bit dtype first: 0.1 as 0.10009765625 in bfloat16)."""
    wide = torch.promote_types(tensor.dtype, torch.float32)
    quotient = tensor.to(wide) / torch.full((), by, dtype=wide, device=tensor.device)
    return quotient.to(tensor.dtype)


def stream_key(seed: int, name: str, model_index: int = 0) -> int:
    """A 64-bit key for the random stream of one (seed, tensor name, model) triple.

    The key is a hash, so streams of different tensors and models are
    independent and do not depend on the order in which tensors are merged.
    """
    digest = hashlib.sha256(f"{seed}\x00{name}\x00{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def uniform_stream(key: int, numel: int, *, start: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """Uniform draws in [0, 1) for elements ``start .. start+numel-1`` of stream ``key``, made on ``device``.

    A counter-based generator: with k_lo, k_hi the halves of the 64-bit key,
    x = ((i+1) * 0x9E3779B9 + k_lo) xor k_hi (mod 2^32), then MurmurHash3's fmix32
    finaliser; the draw is its top 24 bits / 2^24 (exact in float32). Element i's
    draw depends only on (key, i), never on chunking, threads or device, so the fused
    CPU kernel and this reference produce the same masks; 32-bit arithmetic keeps the
    kernel vectorised. Streams hold up to 2^32 elements.
    """
    return stream_bits(key, numel, start=start, device=device).to(torch.float32) * (1.0 / (1 << 24))


def stream_bits(key: int, numel: int, *, start: int = 0, device: torch.device | None = None) -> torch.Tensor:
    """The 24-bit integers (int64) behind :func:`uniform_stream`'s draws, computed on ``device``: a draw is
    below a density d exactly when its integer is below ceil(d * 2^24), which is how the merge kernels test it."""
    if start + numel > 1 << 32:
        raise ValueError(f"numel: random streams hold 2^32 entries, asked for {start + numel}")
    x = torch.arange(start + 1, start + numel + 1, dtype=torch.int64, device=device)
    x = ((x * _GOLDEN32 + (key & _MASK32)) & _MASK32) ^ (key >> 32)
    x = x ^ (x >> 16)
    x = (x * _FMIX1) & _MASK32
    x = x ^ (x >> 13)
    x = (x * _FMIX2) & _MASK32
    x = x ^ (x >> 16)
    return x >> 8


def task_vectors(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """tau_m = theta_m - theta_base (Ilharco et al. 2023), in the compute dtype."""
    dtype = compute_dtype(base.dtype)
    base_c = base.to(dtype)
    return [t.to(dtype) - base_c for t in tensors]


def trim_count(numel: int, density: float) -> int:
    """How many entries TIES' magnitude trimming keeps: max(1, floor(density * n))."""
    return max(1, int(density * numel))


def rank_window(numel: int, density: float, *, gamma: float = 0.0) -> tuple[int, int]:
    """Ascending magnitude ranks [lo, hi) that a sparsifier keeps.

    gamma = 0: magnitude trimming (TIES, Yadav et al. 2023), the top
    ``trim_count`` entries. gamma > 0: Model Breadcrumbs (Davari & Belilovsky
    2023), drop the top gamma*n outliers and then the smallest entries so that
    floor(density * n) remain.
    """
    if gamma == 0.0:
        return numel - trim_count(numel, density), numel
    keep = int(density * numel)
    top = int(gamma * numel)
    bottom = max(0, numel - keep - top)
    return bottom, min(numel, bottom + keep)


Cut = tuple[float, int]  # an entry's (magnitude, flat index): a rank in the order of magnitude, ties by index


def window_bounds(magnitude: torch.Tensor, window: tuple[int, int]) -> tuple[Cut, Cut]:
    """The entries at ascending ranks ``lo`` and ``hi`` of ``window`` in the order of (magnitude, flat index):
    ties ordered by their index, so that a window keeps exactly hi - lo entries whatever the ties
    (:func:`in_window`). ``hi`` = n: (inf, 0), nothing above it. An empty window: lo's cut above every entry.

    Found by selection (``kthvalue``, linear time) and the tied entries' positions, not by sorting: about 6 x
    faster on a 12M-entry tensor. Ties matter: a bfloat16 model's task vectors take few distinct magnitudes, and
    keeping every entry tied at the cut kept 0.327 of a 256 x 256 tensor at density 0.2 (a fine-tune's change of 1 %
    of the weights; mergekit's ``topk`` keeps 0.200, its ties in an arbitrary order).
    """
    lo, hi = window
    flat = magnitude.flatten()
    n = flat.numel()
    if hi <= lo:
        return (math.inf, 0), (math.inf, 0)
    return _cut(flat, lo), ((math.inf, 0) if hi >= n else _cut(flat, hi))


def _cut(flat: torch.Tensor, rank: int) -> Cut:
    """The entry at ascending ``rank`` of (value, index): the value by selection, then among its ties (in index
    order) the one ``rank`` minus the count below it."""
    value = flat.kthvalue(rank + 1).values
    tied = torch.nonzero(flat == value).flatten()
    return float(value), int(tied[rank - int(torch.count_nonzero(flat < value))])


def in_window(magnitude: torch.Tensor, bounds: tuple[Cut, Cut]) -> torch.Tensor:
    """Boolean mask of the entries at or above ``bounds[0]`` and below ``bounds[1]`` in (magnitude, index) order."""
    (low, first), (high, stop) = bounds
    index = torch.arange(magnitude.numel(), device=magnitude.device).view(magnitude.shape)
    above = (magnitude > low) | ((magnitude == low) & (index >= first))
    return above & ((magnitude < high) | ((magnitude == high) & (index < stop)))


def sparsify_mask(
    delta: torch.Tensor, density: float, *, gamma: float = 0.0
) -> torch.Tensor:
    """Boolean keep-mask of magnitude trimming (gamma=0) or breadcrumbs (gamma>0): exactly the rank window's
    entries, ties at its bounds by index (:func:`window_bounds`).

    density >= 1 keeps everything, as in the papers.
    """
    if density >= 1.0:
        return torch.ones_like(delta, dtype=torch.bool)
    magnitude = delta.abs()
    return in_window(magnitude, window_bounds(magnitude, rank_window(delta.numel(), density, gamma=gamma)))


def dare_mask(shape: torch.Size | tuple[int, ...], density: float, key: int,
              device: torch.device | None = None) -> torch.Tensor:
    """DARE's random keep-mask (Yu et al. 2024): keep each entry with probability density (made on ``device``)."""
    numel = math.prod(shape)
    if density >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    threshold = torch.tensor(density, dtype=torch.float32)
    return (uniform_stream(key, numel, device=device) < threshold).reshape(shape)


def elect_sign(contributions: Sequence[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: +1 where the sum of weighted deltas is >= 0, else -1.

    This is the "sum" rule of the TIES paper (eq. 'elect'): the sign of the
    total mass, not the majority count.
    """
    total = contributions[0].clone()
    for c in contributions[1:]:
        total = total + c
    return torch.where(total >= 0, 1.0, -1.0).to(total.dtype)


def disjoint_sum(
    contributions: Sequence[torch.Tensor],
    weights: Sequence[float],
    elected: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Numerator and divisor of TIES' disjoint mean.

    With ``elected`` given, only contributions whose sign equals it count, and the
    divisor is the sum of the weights of those that count (a zero contribution
    never counts). Without it, every contribution counts and the divisor is the
    plain sum of weights. Summation is in model order, so results are
    reproducible to the bit.
    """
    numerator = torch.zeros_like(contributions[0])
    divisor = torch.zeros_like(contributions[0])
    for c, w in zip(contributions, weights):
        if elected is None:
            numerator = numerator + c
            divisor = divisor + w
        else:
            agree = torch.sign(c) == elected
            numerator = numerator + torch.where(agree, c, 0.0)
            divisor = divisor + torch.where(agree, w, 0.0)
    return numerator, divisor


@dataclass(frozen=True)
class MagnitudeRanks:
    """Each entry's magnitude rank within its row, r = 0 the smallest (ties in index order): DELLA's
    coefficient-independent part of a task vector (its ``prepare``), kept in 16 bits an entry where the rows have at
    most 65,536 entries (else 32), not as the float32 spread: half the memory, and half the bytes a candidate reads.
    A 1-D tensor is one row; more dimensions are flattened to ``(shape[0], -1)``."""

    ranks: torch.Tensor  # the delta's shape; int16 holding each rank's 16 bits, or int32
    span: int  # the divisor of the spread: n - 1 (a row of one entry: its rank stored as 1 and the span 2)

    @classmethod
    def of(cls, delta: torch.Tensor) -> MagnitudeRanks:
        rows = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
        n = rows.shape[1]
        dtype = torch.int16 if n <= 1 << 16 else torch.int32
        if n == 1:
            return cls(torch.ones(delta.shape, dtype=dtype, device=delta.device), 2)
        order = rows.abs().argsort(dim=1, stable=True)  # one sort; the ranks are scattered back, not sorted again
        positions = torch.arange(n, dtype=torch.int32, device=delta.device).to(dtype).expand(rows.shape[0], n)
        ranks = torch.empty(rows.shape, dtype=dtype, device=delta.device)  # (positions >= 2^15: wrapped to int16)
        return cls(ranks.scatter_(1, order, positions).reshape(delta.shape), n - 1)

    def unsigned(self) -> torch.Tensor:
        """The ranks as int32 (the 16-bit ones read as unsigned)."""
        return self.ranks.to(torch.int32) & 0xFFFF if self.ranks.dtype == torch.int16 else self.ranks

    def spread(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """r / (n - 1) in [0, 1] in ``dtype`` (0.5 for a row of one entry): :func:`magnitude_spread`."""
        return divide(self.unsigned().to(dtype), self.span)  # (on CUDA too: DELLA's p, so its mask)
