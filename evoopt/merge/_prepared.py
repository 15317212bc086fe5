"""Fast repeated merges of one parameter: preprocess once, merge many candidates.

A study merges the same sources thousands of times with other coefficients. What
does not depend on the coefficients is computed once per tensor
(:class:`PreparedTensor`): the float32 task vectors, stacked, and a grid of their
sorted magnitudes for trimming. Each candidate is then a single fused pass over
memory (a numba kernel on CPU) that writes the merged tensor straight into the
evaluation model's parameter.

The fused pass computes exactly the formula of
:func:`evoopt.merge.generalized_task_arithmetic`, in the same float32 operation
order, with the same counter-based random stream, so both give the same bytes.
One documented approximation: for tensors of more than 65,536 entries the rank
cut of trimming and breadcrumbs is rounded to a grid of 65,536 ranks (the kept
fraction is off by less than 1/65,536); smaller tensors are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from evoopt.merge._methods import Sparsification, generalized_task_arithmetic
from evoopt.merge._pieces import rank_window, stream_key

GRID_SIZE = 65_536
_MODES = {"none": 0, "magnitude": 1, "breadcrumbs": 1, "random": 2}


@dataclass(frozen=True)
class PreparedTensor:
    """The coefficient-independent part of merging one parameter.

    Attributes:
        name: the parameter's name (keys the random stream).
        base: the base tensor, float32, flat.
        deltas: task vectors, float32, shape (models, numel).
        grid_ranks: ascending ranks at which sorted magnitudes are kept.
        grid_values: sorted |delta| at those ranks, shape (models, len(grid_ranks)),
            or None when no magnitude sparsification is needed.
    """

    name: str
    base: torch.Tensor
    deltas: torch.Tensor
    grid_ranks: np.ndarray | None
    grid_values: np.ndarray | None

    @classmethod
    def build(
        cls,
        name: str,
        base: torch.Tensor,
        tensors: Sequence[torch.Tensor],
        *,
        magnitudes: bool,
    ) -> PreparedTensor:
        if base.dtype != torch.float32 and base.dtype.is_floating_point:
            base32 = base.to(torch.float32)
        else:
            base32 = base
        flat_base = base32.reshape(-1).contiguous()
        deltas = torch.empty((len(tensors), flat_base.numel()), dtype=torch.float32)
        for m, t in enumerate(tensors):
            torch.sub(t.reshape(-1).to(torch.float32), flat_base, out=deltas[m])
        grid_ranks = grid_values = None
        if magnitudes:
            n = flat_base.numel()
            stride = max(1, math.ceil(n / GRID_SIZE))
            grid_ranks = np.unique(np.append(np.arange(0, n, stride), n - 1))
            grid_values = np.empty((len(tensors), grid_ranks.size), dtype=np.float32)
            for m in range(len(tensors)):
                grid_values[m] = np.sort(np.abs(deltas[m].numpy()))[grid_ranks]
        return cls(name, flat_base, deltas, grid_ranks, grid_values)

    @property
    def numel(self) -> int:
        return self.base.numel()

    def bounds(self, model: int, window: tuple[int, int]) -> tuple[float, float]:
        """Magnitude bounds of a rank window, with ranks rounded to the grid."""
        assert self.grid_ranks is not None and self.grid_values is not None, "built without magnitudes"
        lo, hi = window
        if hi <= lo:
            return math.inf, -math.inf
        values = self.grid_values[model]
        return float(values[self._grid_index(lo)]), float(values[self._grid_index(hi - 1)])

    def _grid_index(self, rank: int) -> int:
        assert self.grid_ranks is not None
        stride = int(self.grid_ranks[1] - self.grid_ranks[0]) if self.grid_ranks.size > 1 else 1
        return min(round(rank / stride), self.grid_ranks.size - 1)


def merge_prepared(
    prepared: PreparedTensor,
    out: torch.Tensor,
    *,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    sparsification: Sparsification = "none",
    consensus: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    seed: int = 0,
) -> None:
    """Write ``generalized_task_arithmetic`` of the prepared tensor into ``out``.

    ``out`` must have ``prepared.numel`` entries. On CPU with float32 ``out`` the
    fused kernel writes in place; otherwise the reference function runs and its
    result is copied into ``out`` (cast to ``out``'s dtype).
    """
    models = prepared.deltas.shape[0]
    densities = list(densities) if densities is not None else [1.0] * models
    gammas = list(gammas) if gammas is not None else [0.0] * models
    if len(weights) != models or len(densities) != models or len(gammas) != models:
        raise ValueError(f"weights/densities/gammas: need {models} values each")
    if out.numel() != prepared.numel:
        raise ValueError(f"out: has {out.numel()} entries, tensor {prepared.name!r} has {prepared.numel}")
    if out.device.type != "cpu" or not out.is_contiguous():
        _merge_reference(prepared, out, weights, densities, gammas, sparsification, consensus,
                         normalize, scale, seed)
        return
    params = _kernel_params(prepared, weights, densities, gammas, sparsification, seed)
    target = out if out.dtype == torch.float32 else torch.empty(prepared.numel, dtype=torch.float32)
    _fused_kernel()(
        target.view(-1).numpy(), prepared.base.numpy(), prepared.deltas.numpy(), *params,
        _MODES[sparsification], consensus, normalize, np.float32(scale),
    )
    if target is not out:
        out.view(-1).copy_(target)


def _kernel_params(
    prepared: PreparedTensor,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    sparsification: Sparsification,
    seed: int,
) -> tuple[np.ndarray, ...]:
    models = len(weights)
    coefs = np.empty(models, dtype=np.float32)
    lows = np.full(models, -np.inf, dtype=np.float32)
    highs = np.full(models, np.inf, dtype=np.float32)
    dens = np.ones(models, dtype=np.float32)
    keys = np.zeros(models, dtype=np.uint64)
    for m in range(models):
        coefs[m] = weights[m]
        if sparsification == "none" or densities[m] >= 1.0:
            continue
        if sparsification == "random":
            coefs[m] = weights[m] / densities[m]
            dens[m] = densities[m]
            keys[m] = stream_key(seed, prepared.name, m)
        else:
            gamma = gammas[m] if sparsification == "breadcrumbs" else 0.0
            lows[m], highs[m] = prepared.bounds(m, rank_window(prepared.numel, densities[m], gamma=gamma))
    weight_arr = np.asarray(weights, dtype=np.float32)
    return coefs, weight_arr, lows, highs, dens, keys


def _merge_reference(prepared: PreparedTensor, out: torch.Tensor, weights: Sequence[float],
                     densities: Sequence[float], gammas: Sequence[float],
                     sparsification: Sparsification, consensus: bool, normalize: bool,
                     scale: float, seed: int) -> None:
    base = prepared.base.to(out.device)
    tensors = [base + prepared.deltas[m].to(out.device) for m in range(prepared.deltas.shape[0])]
    merged = generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, gammas=gammas,
        sparsification=sparsification, consensus=consensus, normalize=normalize, scale=scale,
        seed=seed, name=prepared.name,
    )
    with torch.no_grad():
        out.view(-1).copy_(merged)


_KERNEL: Any = None


def _fused_kernel() -> Any:
    """Compile (once per process, cached on disk by numba) the fused merge pass."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _compile()
    return _KERNEL


def _compile() -> Any:
    import numba

    golden = np.uint64(0x9E3779B97F4A7C15)
    mix1 = np.uint64(0xBF58476D1CE4E5B9)
    mix2 = np.uint64(0x94D049BB133111EB)
    s30, s27, s31, s40 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(40)
    inv24 = np.float32(1.0 / (1 << 24))
    block = 16_384

    @numba.njit(inline="always")
    def add_contributions(acc, d, m, start, mode, coefs, lows, highs, dens, keys, agree_with, weights, divisor):  # type: ignore[no-untyped-def]
        # acc += c_m (agree_with is None) or, for consensus, acc += c_m and divisor += w_m
        # where sign(c_m) equals the elected sign. Written branch-free so LLVM vectorises it.
        coef, lo, hi, density, key, w = coefs[m], lows[m], highs[m], dens[m], keys[m], weights[m]
        zero = np.float32(0.0)
        for j in range(acc.size):
            x = d[j]
            if mode == 1:
                a = abs(x)
                c = x * coef if (a >= lo) & (a <= hi) else zero
            elif mode == 2:
                z = key + np.uint64(start + j + 1) * golden
                z = (z ^ (z >> s30)) * mix1
                z = (z ^ (z >> s27)) * mix2
                z = z ^ (z >> s31)
                c = x * coef if np.float32(z >> s40) * inv24 < density else zero
            else:
                c = x * coef
            if agree_with is None:
                acc[j] = acc[j] + c
            else:
                agree = ((c > zero) & agree_with[j]) | ((c < zero) & ~agree_with[j])
                acc[j] = acc[j] + (c if agree else zero)
                divisor[j] = divisor[j] + (w if agree else zero)

    @numba.njit(parallel=True, cache=True, nogil=True)
    def kernel(out, base, deltas, coefs, weights, lows, highs, dens, keys,  # type: ignore[no-untyped-def]
               mode, consensus, normalize, scale):
        models, n = deltas.shape
        weight_sum = np.float32(0.0)
        for m in range(models):
            weight_sum = weight_sum + weights[m]
        if abs(weight_sum) < np.float32(1e-8):
            weight_sum = np.float32(1.0)
        for b in numba.prange((n + block - 1) // block):
            start, stop = b * block, min(n, (b + 1) * block)
            total = np.zeros(stop - start, dtype=np.float32)
            for m in range(models):
                add_contributions(total, deltas[m, start:stop], m, start, mode, coefs, lows, highs,
                                  dens, keys, None, weights, total)
            if consensus:
                positive = total >= np.float32(0.0)
                numerator = np.zeros_like(total)
                divisor = np.zeros_like(total)
                for m in range(models):
                    add_contributions(numerator, deltas[m, start:stop], m, start, mode, coefs, lows,
                                      highs, dens, keys, positive, weights, divisor)
                for j in range(divisor.size):
                    divisor[j] = np.float32(1.0) if divisor[j] == np.float32(0.0) else divisor[j]
            else:
                numerator = total
                divisor = np.full_like(total, weight_sum)
            for j in range(numerator.size):
                mixed = numerator[j] / divisor[j] if normalize else numerator[j]
                if scale != np.float32(1.0):
                    mixed = mixed * scale
                out[start + j] = base[start + j] + mixed

    return kernel
