"""The named merge methods, as pure functions over the tensors of one parameter.

Conventions for every function here:

- ``tensors`` holds one tensor per source model, all of one shape; ``base`` is the
  common pretrained tensor where the method needs one.
- Computation is in float32 (float64 when the inputs are float64); the result has
  the dtype of ``base`` (or of ``tensors[0]`` when there is no base).
- Per-model coefficients are sequences with one entry per model, so a layer-wise
  merge is the same call with other numbers.
- Randomness (DARE) is drawn from :func:`~evoopt.merge._pieces.uniform_stream`,
  keyed by ``(seed, name, model index)``: the same call returns the same bytes.
- Inputs are never mutated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from evoopt.merge._pieces import (
    compute_dtype,
    dare_mask,
    disjoint_sum,
    elect_sign,
    sparsify_mask,
    stream_key,
    task_vectors,
)

Sparsification = Literal["none", "magnitude", "breadcrumbs", "random"]


def _check_lengths(tensors: Sequence[torch.Tensor], **per_model: Sequence[object] | None) -> None:
    if not tensors:
        raise ValueError("tensors: need at least one model to merge, got none")
    for key, values in per_model.items():
        if values is not None and len(values) != len(tensors):
            raise ValueError(
                f"{key}: need one value per model ({len(tensors)}), got {len(values)}"
            )


def linear(
    tensors: Sequence[torch.Tensor], *, weights: Sequence[float], normalize: bool = True
) -> torch.Tensor:
    """Weighted average (model soup, Wortsman et al. 2022).

    theta = sum_m w_m theta_m / sum_m w_m   (without the division if normalize=False)
    """
    _check_lengths(tensors, weights=weights)
    dtype = compute_dtype(tensors[0].dtype)
    result = torch.zeros_like(tensors[0], dtype=dtype)
    for t, w in zip(tensors, weights):
        result = result + t.to(dtype) * w
    if normalize:
        total = math.fsum(weights)
        if abs(total) < 1e-8:
            raise ValueError(f"weights: sum to {total}; a normalized average needs a nonzero sum")
        result = result / torch.tensor(weights, dtype=dtype).sum()
    return result.to(tensors[0].dtype)


def generalized_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    sparsification: Sparsification = "none",
    consensus: bool = False,
    normalize: bool = False,
    scale: float = 1.0,
    seed: int = 0,
    name: str = "",
) -> torch.Tensor:
    """Task arithmetic, TIES, DARE and breadcrumbs as settings of one method.

    With tau_m = theta_m - theta_base (task vectors) and a keep-mask k_m:

        c_m   = w_m * k_m * tau_m                 (DARE: w_m / d_m * k_m * tau_m)
        s     = sign(sum_m c_m)                   (consensus only; >= 0 counts as +)
        a_m   = [sign(c_m) == s]                  (consensus) or 1
        delta = sum_m a_m c_m / sum_m a_m w_m     (normalize) or sum_m a_m c_m
        theta = theta_base + scale * delta

    The keep-mask k_m is all-ones ("none"), the top max(1, floor(d_m n)) magnitudes
    ("magnitude", TIES), the breadcrumbs window that drops the top gamma_m outliers
    and the smallest magnitudes ("breadcrumbs"), or Bernoulli(d_m) ("random", DARE).
    A zero divisor is replaced by 1, as in TIES and mergekit.

    Deliberate difference from mergekit: DARE rescales the kept entries by 1/d_m,
    as the DARE paper does (eq. 2 of Yu et al. 2024), where mergekit matches the L1
    norm of the whole tensor instead. At density 1 the two agree.
    """
    _check_lengths(tensors, weights=weights, densities=densities, gammas=gammas)
    if sparsification != "none" and densities is None:
        raise ValueError(f"densities: sparsification {sparsification!r} needs one density per model")
    deltas = task_vectors(base, tensors)
    contributions = []
    for m, (delta, w) in enumerate(zip(deltas, weights)):
        density = densities[m] if densities is not None else 1.0
        coef = float(w)
        if sparsification == "none" or density >= 1.0:
            keep = None
        elif sparsification == "random":
            keep = dare_mask(delta.shape, density, stream_key(seed, name, m))
            coef = float(w) / density
        else:
            gamma = gammas[m] if (gammas is not None and sparsification == "breadcrumbs") else 0.0
            keep = sparsify_mask(delta, density, gamma=gamma)
        scaled = delta * torch.tensor(coef, dtype=delta.dtype)
        contributions.append(scaled if keep is None else torch.where(keep, scaled, 0.0))
    elected = elect_sign(contributions) if consensus else None
    numerator, divisor = disjoint_sum(contributions, weights, elected)
    mixed = numerator
    if normalize:
        zero = divisor == 0 if consensus else divisor.abs() < 1e-8
        mixed = numerator / torch.where(zero, 1.0, divisor)
    if scale != 1.0:
        mixed = mixed * scale
    return (base.to(mixed.dtype) + mixed).to(base.dtype)


def task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): theta = theta_base + scale * sum_m w_m tau_m."""
    return generalized_task_arithmetic(
        base, tensors, weights=weights, scale=scale, normalize=normalize
    )


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    scale: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-Merging (Yadav et al. 2023): trim to the top-d magnitudes, elect sign, disjoint mean."""
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsification="magnitude",
        consensus=True, normalize=normalize, scale=scale,
    )


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    consensus: bool,
    seed: int,
    name: str,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """DARE (Yu et al. 2024): drop each task-vector entry with p = 1 - d, rescale by 1/d.

    consensus=False is DARE-linear, consensus=True is DARE-TIES.
    """
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, sparsification="random",
        consensus=consensus, normalize=normalize, scale=scale, seed=seed, name=name,
    )


def breadcrumbs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    consensus: bool = False,
    scale: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the top gamma outliers and the smallest
    magnitudes so that a fraction d remains, then task arithmetic (or TIES with consensus)."""
    return generalized_task_arithmetic(
        base, tensors, weights=weights, densities=densities, gammas=gammas,
        sparsification="breadcrumbs", consensus=consensus, normalize=normalize, scale=scale,
    )


def slerp(
    base: torch.Tensor, other: torch.Tensor, *, t: float, dot_threshold: float = 0.9995
) -> torch.Tensor:
    """Spherical interpolation of two models (Shoemake 1985), per tensor.

    With a = base/|base|, b = other/|other|, cos(Omega) = a.b:
        theta = sin((1-t) Omega)/sin(Omega) * base + sin(t Omega)/sin(Omega) * other
    falling back to (1-t) base + t other when |cos(Omega)| > dot_threshold (nearly
    collinear), as mergekit does. t = 0 returns base, t = 1 returns other.
    """
    if base.shape != other.shape:
        raise ValueError(f"slerp: shapes differ, {tuple(base.shape)} vs {tuple(other.shape)}")
    dtype = compute_dtype(base.dtype)
    v0, v1 = base.to(dtype), other.to(dtype)
    n0, n1 = v0.norm(), v1.norm()
    n0 = n0 if n0 > 1e-8 else torch.ones_like(n0)
    n1 = n1 if n1 > 1e-8 else torch.ones_like(n1)
    dot = ((v0 / n0) * (v1 / n1)).sum().clamp(-1.0, 1.0)
    if dot.abs() > dot_threshold:
        result = (1 - t) * v0 + t * v1
    else:
        omega = torch.acos(dot)
        result = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    return result.to(base.dtype)


def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Model Stock (Jang et al. 2024), per tensor.

    cos = mean over pairs m<n of cos(tau_m, tau_n); with k models,
        t = k cos / (1 + (k - 1) cos)                       (eq. 6)
        theta = t * mean_m theta_m + (1 - t) * theta_base
    Where 1 + (k-1) cos vanishes the base is kept, as mergekit does.
    """
    if len(tensors) < 2:
        raise ValueError(f"tensors: Model Stock needs at least 2 fine-tuned models, got {len(tensors)}")
    deltas = [d.flatten() for d in task_vectors(base, tensors)]
    cosines = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            norms = (deltas[i].norm() * deltas[j].norm()).clamp(min=1e-6)
            cosines.append(((deltas[i] * deltas[j]).sum() / norms).clamp(-1.0, 1.0))
    cos = torch.stack(cosines).mean()
    k = len(tensors)
    denominator = 1 + (k - 1) * cos
    t = torch.zeros_like(cos) if denominator.abs() < 1e-6 else k * cos / denominator
    dtype = cos.dtype
    average = sum(x.to(dtype) for x in tensors) / k
    return (t * average + (1 - t) * base.to(dtype)).to(base.dtype)


def fisher(
    tensors: Sequence[torch.Tensor],
    *,
    fishers: Sequence[torch.Tensor],
    weights: Sequence[float],
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """Fisher-weighted averaging (Matena & Raffel 2022, eq. 3), diagonal Fisher:

        theta = sum_m w_m F_m theta_m / sum_m w_m F_m     (element-wise, + epsilon)

    ``fishers`` are the per-model diagonal Fisher estimates of this tensor (see
    :func:`evoopt.models.statistics.estimate_fisher`). Entries where every Fisher is zero
    fall back to the weighted average through epsilon.
    """
    _check_lengths(tensors, fishers=fishers, weights=weights)
    dtype = compute_dtype(tensors[0].dtype)
    numerator = torch.zeros_like(tensors[0], dtype=dtype)
    denominator = torch.zeros_like(tensors[0], dtype=dtype)
    for t, f, w in zip(tensors, fishers, weights):
        if f.shape != t.shape:
            raise ValueError(f"fishers: shape {tuple(f.shape)} does not match tensor {tuple(t.shape)}")
        wf = w * (f.to(dtype) + epsilon)
        numerator = numerator + wf * t.to(dtype)
        denominator = denominator + wf
    return (numerator / denominator).to(tensors[0].dtype)


def regmean(
    tensors: Sequence[torch.Tensor],
    *,
    grams: Sequence[torch.Tensor] | None,
    alpha: float = 0.9,
) -> torch.Tensor:
    """RegMean (Jin et al. 2023, eq. 4) for the weight of a linear layer y = W x.

    With G_m = X_m^T X_m the Gram matrix of the layer's inputs on model m's data and
    the off-diagonal shrink G~_m = alpha G_m + (1 - alpha) diag(G_m):

        W^T = (sum_m G~_m)^-1  sum_m G~_m W_m^T

    ``tensors`` are (out, in) weights. Tensors without Gram matrices (biases,
    norms, embeddings) are averaged, as in the paper.
    """
    if grams is None:
        return linear(tensors, weights=[1.0] * len(tensors))
    _check_lengths(tensors, grams=grams)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: must lie in [0, 1], got {alpha}")
    dtype = torch.float64  # the solve is ill-conditioned in float32 for small alpha
    width = tensors[0].shape[-1]
    total_gram = torch.zeros(width, width, dtype=dtype)
    total_rhs = torch.zeros(width, tensors[0].shape[0], dtype=dtype)
    for w, g in zip(tensors, grams):
        if w.ndim != 2 or g.shape != (w.shape[1], w.shape[1]) or w.shape != tensors[0].shape:
            raise ValueError(
                f"grams: need an (in, in) = {(w.shape[-1], w.shape[-1])} Gram matrix for a weight of "
                f"shape {tuple(w.shape)}, got {tuple(g.shape)}"
            )
        g = g.to(dtype)
        shrunk = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        rhs = shrunk @ w.to(dtype).T
        total_gram = total_gram + shrunk
        total_rhs = total_rhs + rhs
    merged_t = torch.linalg.lstsq(total_gram, total_rhs).solution
    return merged_t.T.contiguous().to(tensors[0].dtype)
