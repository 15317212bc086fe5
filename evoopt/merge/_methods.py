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
from dataclasses import dataclass
from typing import cast

import torch

from evoopt.merge._pieces import (
    MagnitudeRanks,
    Sparsification,
    compute_dtype,
    dare_mask,
    disjoint_sum,
    divide,
    elect_sign,
    in_window,
    sparsify_mask,
    stream_key,
    task_vectors,
    uniform_stream,
    window_bounds,
)
from evoopt.merge._prepared import della_merge


def _check_lengths(tensors: Sequence[torch.Tensor], **per_model: Sequence[object] | None) -> None:
    if not tensors:
        raise ValueError("tensors: need at least one model to merge, got none")
    for key, values in per_model.items():
        if values is not None and len(values) != len(tensors):
            raise ValueError(
                f"{key}: need one value per model ({len(tensors)}), got {len(values)}"
            )


def sums_to_zero(weights: Sequence[float]) -> bool:
    """Whether weights a merge divides by their sum (a normalized linear merge, Fisher's) sum to 0: relative to their
    magnitudes (scale-free: [3e-9, 3e-9] is fine, [1, -1] is not; all zero is)."""
    return abs(math.fsum(weights)) <= 1e-12 * math.fsum(abs(w) for w in weights)


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
        if sums_to_zero(weights):
            raise ValueError(f"weights: sum to {total}; a normalized average needs a nonzero sum")
        result = divide(result, float(torch.tensor(weights, dtype=dtype).sum()))  # (on CUDA as on the CPU)
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
            keep = dare_mask(delta.shape, density, stream_key(seed, name, m), device=delta.device)
            coef = float(w) / density if density > 0.0 else 0.0  # (density 0: nothing kept)
        else:
            gamma = gammas[m] if (gammas is not None and sparsification == "breadcrumbs") else 0.0
            keep = sparsify_mask(delta, density, gamma=gamma)
        scaled = delta * torch.tensor(coef, dtype=delta.dtype)
        contributions.append(scaled if keep is None else torch.where(keep, scaled, 0.0))
    return _fuse(base, contributions, weights, consensus=consensus, normalize=normalize, scale=scale)


def _fuse(base: torch.Tensor, contributions: Sequence[torch.Tensor], weights: Sequence[float], *, consensus: bool,
          normalize: bool, scale: float) -> torch.Tensor:
    """The shared tail of the task-arithmetic family and DELLA: elect the sign (consensus), sum the agreeing
    contributions, divide by their weights (normalize; a zero divisor counts as 1), scale, add to the base."""
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
            # (mergekit clamps the product at 1e-6, which shrinks the cosine of small deltas: 0.10 for deltas of
            # 1e-4 whose cosine is 1; here only a zero norm, whose cosine is then 0, is kept from dividing by 0)
            norms = (deltas[i].norm() * deltas[j].norm()).clamp(min=torch.finfo(deltas[i].dtype).tiny)
            cosines.append(((deltas[i] * deltas[j]).sum() / norms).clamp(-1.0, 1.0))
    # (their mean on the CPU, on any device: a few numbers, and CUDA's mean multiplied by 1 / n)
    cos = torch.stack(cosines).cpu().mean().to(cosines[0].device)
    k = len(tensors)
    denominator = 1 + (k - 1) * cos
    t = torch.zeros_like(cos) if denominator.abs() < 1e-6 else k * cos / denominator
    dtype = cos.dtype
    average = divide(cast(torch.Tensor, sum(x.to(dtype) for x in tensors)), k)
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
    if sums_to_zero(weights):
        raise ValueError(f"weights: sum to 0 ({list(weights)}); Fisher merging divides by the weighted Fishers")
    dtype = compute_dtype(tensors[0].dtype)
    numerator = torch.zeros_like(tensors[0], dtype=dtype)
    denominator = torch.zeros_like(tensors[0], dtype=dtype)
    for t, f, w in zip(tensors, fishers, weights):
        if f.shape != t.shape:
            raise ValueError(f"fishers: shape {tuple(f.shape)} does not match tensor {tuple(t.shape)}")
        wf = w * (f.to(t.device, dtype) + epsilon)  # (the statistics are estimated on the CPU)
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
    device = tensors[0].device  # (the Gram matrices are estimated on the CPU)
    total_gram = torch.zeros(width, width, dtype=dtype, device=device)
    total_rhs = torch.zeros(width, tensors[0].shape[0], dtype=dtype, device=device)
    for w, g in zip(tensors, grams):
        if w.ndim != 2 or g.shape != (w.shape[1], w.shape[1]) or w.shape != tensors[0].shape:
            raise ValueError(
                f"grams: need an (in, in) = {(w.shape[-1], w.shape[-1])} Gram matrix for a weight of "
                f"shape {tuple(w.shape)}, got {tuple(g.shape)}"
            )
        g = g.to(device, dtype)
        shrunk = alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))
        rhs = shrunk @ w.to(dtype).T
        total_gram = total_gram + shrunk
        total_rhs = total_rhs + rhs
    # (the Gram matrices' own precision sets what is zero: float32 ones, as evoopt estimates them, leave their null
    # directions at about 1e-4 of the largest, which float64's eps would take for signal, 1e3-size weights)
    eps = max(torch.finfo(g.dtype).eps if g.dtype.is_floating_point else 0.0 for g in grams)
    return _symmetric_solve(total_gram, total_rhs, eps=eps).T.contiguous().to(tensors[0].dtype)


def _symmetric_solve(gram: torch.Tensor, rhs: torch.Tensor, *, eps: float) -> torch.Tensor:
    """A least-squares X of gram X = rhs for a symmetric positive semi-definite ``gram``, the same on every device:
    scaled to a unit diagonal first (Jacobi: S = D gram D with D = diag(gram)^-1/2, 1 where the diagonal is 0), then
    the minimum-norm answer Y of S Y = D rhs by S's eigendecomposition, eigenvalues below width x ``eps`` (the
    precision ``gram`` was computed in) x the largest taken as 0, and X = D Y. A full-rank system's answer is the
    solve's, to float64 rounding; a feature no example activates gets 0.
    (``torch.linalg.lstsq`` takes the gelsy driver on the CPU and gels, which assumes full rank, on CUDA: a Gram
    matrix of a feature never active, or alpha 1 with fewer examples than features, gave entries 5.6e3 on one and
    1.68 on the other.) The scaling: a float32 Gram matrix's rounding is relative to each entry's own features, not
    to its largest eigenvalue; unscaled, one input feature 150 x larger than the others (the outlier features of
    language models) put every other direction under the cutoff, and the merge dropped nearly all its input columns
    (width 576: a column's norm 4.4e-5 against 2.23)."""
    diagonal = torch.diagonal(gram)
    scale = torch.where(diagonal > 0, diagonal.clamp_min(torch.finfo(gram.dtype).tiny).rsqrt(),
                        torch.ones_like(diagonal))
    scaled = scale[:, None] * gram * scale[None, :]
    values, vectors = torch.linalg.eigh(scaled)
    cutoff = values.abs().max() * gram.shape[-1] * eps
    inverse = torch.where(values > cutoff, 1.0 / values, torch.zeros_like(values))
    return scale[:, None] * (vectors @ (inverse[:, None] * (vectors.T @ (scale[:, None] * rhs))))


def magnitude_spread(delta: torch.Tensor) -> torch.Tensor:
    """Each entry's magnitude rank within its row, r / (n - 1) in [0, 1] (r = 0 the smallest; 0.5 for a row of
    one entry; ties in index order), in the delta's compute dtype. A 1-D tensor is one row; more dimensions are
    flattened to ``(shape[0], -1)`` (:class:`MagnitudeRanks`, which DELLA keeps)."""
    return MagnitudeRanks.of(delta).spread(compute_dtype(delta.dtype))


def _check_epsilon(density: float, epsilon: float) -> None:
    if not (epsilon >= 0.0 and 0.0 < density - epsilon and density + epsilon < 1.0):
        raise ValueError(f"epsilon: >= 0, with density - epsilon and density + epsilon in (0, 1); got density "
                         f"{density} and epsilon {epsilon}")


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float, *,
                           spread: torch.Tensor | None = None) -> torch.Tensor:
    """DELLA's MAGPRUNE keep probabilities (Deep et al. 2024, Sec. 3, step 1 "Drop"), per row.

    Within each row the entries are ranked by magnitude (:func:`magnitude_spread`, or ``spread`` when it
    was computed before), r = 0 the smallest, r = n - 1 the largest, and kept with probability

        p_r = (d - eps) + 2 eps * r / (n - 1)

    so the mean keep rate is d and larger magnitudes are kept more often (p_r = d for a row of one entry).
    As in mergekit, ``d - eps`` and ``d + eps`` must lie in (0, 1).
    """
    _check_epsilon(density, epsilon)
    spread = magnitude_spread(delta) if spread is None else spread
    return (density - epsilon) + 2 * epsilon * spread


def della(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float],
    epsilons: Sequence[float],
    consensus: bool = True,
    normalize: bool = True,
    scale: float = 1.0,
    seed: int = 0,
    name: str = "",
    ranks: Sequence[MagnitudeRanks] | None = None,
    fast: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """DELLA-Merging (Deep et al., "DELLA-Merging: Reducing Interference in Model Merging through
    Magnitude-Based Sampling", 2024, Sec. 3): Drop, Elect, Fuse.

        Drop:  k_m ~ Bernoulli(p_m) with p_m of :func:`magprune_probabilities`,
               c_m = w_m * k_m * tau_m / p_m          (each kept entry rescaled by 1 / p)
        Elect: s = sign(sum_m c_m)                    (consensus; >= 0 counts as +)
        Fuse:  delta = sum_m [sign(c_m) = s] c_m / sum_m [sign(c_m) = s] w_m   (normalize)
        theta = theta_base + scale * delta            (the paper's lambda)

    consensus=False, normalize=False is mergekit's ``della_linear``. The draws are evoopt's
    counter-based stream keyed by ``(seed, name, model index)``: the same call gives the same bytes.

    Deliberate difference from mergekit 0.1.5: the kept entries are rescaled by 1 / p per entry,
    as the paper does (and as evoopt's DARE does), where mergekit rescales the whole tensor to its
    L1 norm before the drop. The keep probabilities agree with mergekit's (tested). ``ranks``: each
    model's :class:`MagnitudeRanks`, computed once (``prepare``): a candidate is then elementwise work.
    On the CPU the merge is the fused kernel's pass in float32 (:func:`~evoopt.merge._prepared.della_merge`;
    bfloat16 read as stored and widened exactly where used, as the formula widens it), the same bytes as this
    formula in torch (``fast=False``, and float64 tensors and other devices). ``out``: a contiguous tensor of
    the result's shape and dtype (the model's own) that the kernel writes into, returned then; else (or on
    the torch formula's route) a new tensor.
    """
    _check_lengths(tensors, weights=weights, densities=densities, epsilons=epsilons)
    for d, eps in zip(densities, epsilons):
        if d < 1.0:
            _check_epsilon(d, eps)
    if fast and compute_dtype(base.dtype) == torch.float32 and all(t.device.type == "cpu" for t in (base, *tensors)):
        if ranks is None:
            ranks = della_ranks(base, tensors)
        return della_merge(base, tensors, weights, densities, epsilons,
                           [stream_key(seed, name, m) for m in range(len(tensors))], ranks,
                           consensus=consensus, normalize=normalize, scale=scale, out=out).to(base.dtype)
    contributions = []
    for m, (delta, w, d, eps) in enumerate(zip(task_vectors(base, tensors), weights, densities, epsilons)):
        scaled = delta * torch.tensor(float(w), dtype=delta.dtype)
        if d < 1.0:
            spread = ranks[m].spread(delta.dtype) if ranks is not None else None
            p = magprune_probabilities(delta, d, eps, spread=spread)
            u = uniform_stream(stream_key(seed, name, m), delta.numel(), device=delta.device)
            u = u.reshape(delta.shape).to(p.dtype)
            scaled = torch.where(u < p, scaled / p, 0.0)
        contributions.append(scaled)
    return _fuse(base, contributions, weights, consensus=consensus, normalize=normalize, scale=scale)


def sce(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    select_topk: float = 1.0,
    scale: float = 1.0,
) -> torch.Tensor:
    """SCE (Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024, Sec. 3.3): Select,
    Calculate, Erase, over the weighted task vectors c_m = w_m tau_m (w_m = 1 is the paper's and
    mergekit's method; the weights let a search scale each model).

        Select:    keep the entries whose variance across models, Var_m(c_m), is among the top
                   ``select_topk`` share of the nonzero variances (ties at the cut by index)
        Calculate: lambda_m = mean(c_m^2) / sum_j mean(c_j^2)   (the matrix-level weights)
        Erase:     s = sign(sum_m c_m); drop the entries of c_m whose sign is not s
        theta = theta_base + scale * sum_m lambda_m c_m [sign c_m = s] / max(sum_m lambda_m [sign c_m = s], 1e-6)

    The fused mean divides by the weights of the models that agree, as mergekit 0.1.5 does.
    Deliberate difference: mergekit falls back to equal lambdas when sum_j mean(c_j^2) < 1e-6,
    which fine-tuning deltas of 1e-3 already reach; here only an all-zero sum does.
    """
    _check_lengths(tensors, weights=weights)
    contributions = [d * torch.tensor(float(w), dtype=d.dtype) for d, w in zip(task_vectors(base, tensors), weights)]
    stacked = torch.stack(contributions)
    if select_topk < 1.0:
        variance = stacked.var(dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(variance)) * max(select_topk, 0.0))
        keep = in_window(variance, window_bounds(variance, (variance.numel() - k, variance.numel())))
        stacked = torch.where(keep, stacked, 0.0)
    energy = stacked.square().reshape(len(tensors), -1).mean(dim=1)
    total = energy.sum()
    lambdas = energy / total if total > 0 else torch.full_like(energy, 1.0 / len(tensors))
    elected = elect_sign(list(stacked))
    agree = torch.sign(stacked) == elected
    shape = (-1,) + (1,) * (stacked.ndim - 1)
    weighted = torch.where(agree, lambdas.reshape(shape), 0.0)
    mixed = (stacked * weighted).sum(dim=0) / weighted.sum(dim=0).clamp(min=1e-6)
    return (base.to(mixed.dtype) + scale * mixed).to(base.dtype)


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Q^T of ``matrix`` = P S Q^T: the nearest matrix with orthonormal columns
    (or rows), which TSV-M and Iso-CTS use to orthogonalise the concatenated singular vectors.

    The concatenated vectors are nearly orthonormal already, so all their singular values are close to 1, and
    LAPACK's divide-and-conquer SVD can fail to converge on such a matrix (seen on SmolLM2's matrices). Then the
    same factor is computed as M (M^T M)^(-1/2) (the TSV authors' second route) in float64, through the
    eigendecomposition of the Gram matrix; zero columns (TSV-M's unused slots) stay zero.
    """
    try:
        p, _, qt = torch.linalg.svd(matrix, full_matrices=False)
        return p @ qt
    except torch.linalg.LinAlgError:
        return _polar_by_gram(matrix)


def _svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reduced SVD ``(U, S, V^T)``, descending. LAPACK's divide-and-conquer SVD can fail to converge (seen on
    Iso-CTS's residual of a SmolLM2 matrix once the common subspace is projected out, in a method search): then
    it is computed in float64, and if that fails too, from the eigendecomposition of the Gram matrix in float64
    (accurate for the leading directions, the ones TSV-M and Iso-CTS keep)."""
    try:
        return torch.linalg.svd(matrix, full_matrices=False)
    except torch.linalg.LinAlgError:
        pass
    m, wide = _tall64(matrix)
    try:
        u, s, vt = torch.linalg.svd(m, full_matrices=False)
    except torch.linalg.LinAlgError:
        return _svd_by_gram(matrix)
    if wide:
        u, vt = vt.T, u.T
    return u.to(matrix.dtype), s.to(matrix.dtype), vt.to(matrix.dtype)


def _tall64(matrix: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The matrix in float64, transposed if it is wide (so its Gram matrix is the smaller one), and whether it was."""
    wide = matrix.shape[0] < matrix.shape[1]
    return (matrix.T if wide else matrix).double(), wide


def _svd_by_gram(matrix: torch.Tensor, count: int | None = None, *, precise: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``count`` (default all) singular triples ``(U, S, V^T)`` from the eigendecomposition of the
    smaller Gram matrix: one product and a small symmetric eigenproblem. ``precise``: the Gram matrix in float64,
    whose eigenvectors are then at least as accurate as a float32 SVD's for every direction above 1e-6 of the
    first (the error grows with (s_1 / s_i)^2 times float64's epsilon, against s_1 / s_i times float32's); else in
    the matrix's own dtype, enough for directions near the top of the spectrum. Directions of a zero singular
    value get zero columns of U (the Gram matrix does not determine them)."""
    work, wide = _tall64(matrix) if precise else ((matrix.T, True) if matrix.shape[0] < matrix.shape[1]
                                                  else (matrix, False))
    values, vectors = torch.linalg.eigh((work.T @ work).double())  # ascending: flipped
    s, vectors = values.flip(0)[:count].clamp(min=0).sqrt(), vectors.flip(1)[:, :count]
    u, vt = work @ (vectors / torch.where(s > 0, s, 1.0)).to(work.dtype), vectors.T
    if wide:
        u, vt = vt.T, u.T
    return u.to(matrix.dtype), s.to(matrix.dtype), vt.to(matrix.dtype)


def _leading_svd(matrix: torch.Tensor, count: int, *, precise: bool = True,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """:func:`_svd_by_gram`'s leading ``count`` triples, or None where the ``count``-th singular value is below 1e-6
    of the first (1e-3 unless ``precise``: a Gram matrix in float32 resolves no finer): a rank-deficient matrix's
    directions are not determined by its Gram matrix, and the caller takes the SVD. Faster than LAPACK's SVD on
    tall and wide matrices, no faster on square ones (Iso-CTS per candidate 1.29 x faster on SmolLM2-135M, whose
    matrices are mostly square: ``benchmarks/merge_speed.py --methods iso_cts``)."""
    if count == 0:
        return None
    u, s, vt = _svd_by_gram(matrix, count, precise=precise)
    return (u, s, vt) if s[-1] > s[0] * (1e-6 if precise else 1e-3) else None


def _inverse_root(gram: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """G^(-1/2) of a float64 Gram matrix as its factors (V diag(lambda^(-1/2)), V), to be applied as M @ A @ V^T;
    directions whose eigenvalue is below ``size`` float64 epsilons of the largest get 0 (zero columns stay zero)."""
    values, vectors = torch.linalg.eigh(gram)
    floor = values.max().clamp(min=0) * size * torch.finfo(torch.float64).eps
    return vectors * torch.where(values > floor, values.clamp(min=floor).rsqrt(), 0.0), vectors


def _polar_by_gram(matrix: torch.Tensor) -> torch.Tensor:
    m, wide = _tall64(matrix)
    scaled, vectors = _inverse_root(m.T @ m, max(m.shape))
    polar = (m @ scaled @ vectors.T).to(matrix.dtype)
    return polar.T if wide else polar


def _weighted_deltas(base: torch.Tensor, tensors: Sequence[torch.Tensor],
                     weights: Sequence[float]) -> list[torch.Tensor]:
    return [d * torch.tensor(float(w), dtype=d.dtype) for d, w in zip(task_vectors(base, tensors), weights)]


def _mean_delta(base: torch.Tensor, deltas: Sequence[torch.Tensor], scale: float) -> torch.Tensor:
    """What the SVD methods do with tensors that are not matrices (biases, norms): the mean task vector."""
    mixed = divide(sum(deltas[1:], deltas[0]), len(deltas))
    return (base.to(mixed.dtype) + scale * mixed).to(base.dtype)


@dataclass(frozen=True)
class SingularBasis:
    """What TSV-M keeps of one matrix, independent of the coefficients: the orthogonalised singular vectors
    of every task (``u``: m x r, ``v``: r x n), their singular values ``s`` (r; task t in slots
    t k .. t k + k - 1, the last r - T k zero) and ``k`` components per task."""

    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    k: int


def tsv_basis(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> SingularBasis | None:
    """TSV-M's coefficient-independent part of a matrix (None for tensors that are not matrices)."""
    if base.ndim != 2:
        return None
    deltas = task_vectors(base, tensors)
    dtype, r = deltas[0].dtype, min(base.shape)
    k = r // len(deltas)
    u_cat = torch.zeros(base.shape[0], r, dtype=dtype, device=base.device)
    s_cat = torch.zeros(r, dtype=dtype, device=base.device)
    v_cat = torch.zeros(r, base.shape[1], dtype=dtype, device=base.device)
    if k == 0:
        return SingularBasis(u_cat, s_cat, v_cat, 0)
    for t, delta in enumerate(deltas):
        u, s, vt = _svd(delta)
        # directions of a zero singular value (a zero or low-rank task vector) are LAPACK's arbitrary vectors: in
        # the polar factor they would rotate the other tasks' directions, so their slots stay zero as unused ones
        # (the authors' code keeps them; the Gram route gives zeros there too)
        real = (s[:k] > s[0] * max(delta.shape) * torch.finfo(s.dtype).eps).to(u.dtype)  # (all 0 where s_1 is)
        u_cat[:, t * k:(t + 1) * k], s_cat[t * k:(t + 1) * k] = u[:, :k] * real, s[:k]
        v_cat[t * k:(t + 1) * k] = vt[:k] * real[:, None]
    return SingularBasis(_polar(u_cat), s_cat, _polar(v_cat), k)


def tsv_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    scale: float = 1.0,
    basis: SingularBasis | None = None,
) -> torch.Tensor:
    """TSV-M (Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging",
    CVPR 2025, Sec. 4), per matrix. With tau_t = U_t S_t V_t^T (thin SVD), r = min(m, n) and
    k = r // T components kept per task:

        U = [U_1[:, :k] ... U_T[:, :k]], S = diag(w_1 S_1[:k] ... w_T S_T[:k]), V = [V_1[:, :k] ... V_T[:, :k]]
        (the last r - T k slots zero), U_perp = polar(U), V_perp = polar(V) (P Q^T of their SVDs)
        theta = theta_base + scale * U_perp S V_perp^T

    The per-task singular values are kept. Tensors that are not matrices take the mean of w_t tau_t, as
    in the authors' code (github.com/AntoAndGar/task_singular_vectors, ``compute_and_sum_svd_mem_reduction``);
    with more tasks than r the matrix keeps the base (k = 0), as there. ``scale`` is the paper's alpha;
    the weights w_t (1 in the paper) scale each task's singular values, which for w_t > 0 is the SVD of
    w_t tau_t (FusionBench's per-task alpha) and keeps the directions of a task at weight 0, so that the
    basis (:func:`tsv_basis`) is computed once per study and every candidate is one product.
    Deliberate difference: k is r // T, where the authors' int(r * (1 / T)) can round one below it.
    """
    _check_lengths(tensors, weights=weights)
    if base.ndim != 2:
        return _mean_delta(base, _weighted_deltas(base, tensors, weights), scale)
    basis = basis if basis is not None else tsv_basis(base, tensors)
    assert basis is not None
    if basis.k == 0:
        return base.clone()
    slots = torch.zeros_like(basis.s)
    slots[: len(weights) * basis.k] = torch.tensor(weights, dtype=basis.s.dtype).repeat_interleave(basis.k)
    mixed = (basis.u * (basis.s * slots)) @ basis.v
    return (base.to(mixed.dtype) + scale * mixed).to(base.dtype)


def iso_grams(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """Iso-C / Iso-CTS's coefficient-independent part of a tall matrix (m > n): the Gram matrix of the task vectors
    side by side, G = [tau_1 ... tau_T]^T [tau_1 ... tau_T] (T n x T n, float64), from which every candidate's Gram
    matrices are small products (:func:`_iso_from_grams`). Kept where it is no larger than one float32 task vector
    (2 (T n)^2 <= m n: embeddings, whose SVDs dominate an Iso candidate), else None (the direct route)."""
    if base.ndim != 2 or base.shape[0] <= base.shape[1] or 2 * (len(tensors) * base.shape[1]) ** 2 > base.numel():
        return None
    stacked = torch.cat(task_vectors(base, tensors), dim=1).double()
    return stacked.T @ stacked


def _iso_from_grams(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float],
                    grams: torch.Tensor, per_task: int) -> torch.Tensor | None:
    """Iso-C (``per_task`` 0) or Iso-CTS's merged direction ``sigma polar(U) polar(V)^T`` of a tall matrix from the
    task vectors' Gram matrix (:func:`iso_grams`), the same merge as :func:`iso_merge`'s direct route (tested).

    Every left singular vector there is a combination of the task vectors' columns, [tau_1 ... tau_T] C with a
    T n-row coefficient matrix C, whose Gram matrix is C^T G C: so the eigendecompositions are of n x n matrices
    (M^T M = L^T G L = sum_ij w_i w_j G_ij, L the blocks w_t I; each residual's tau_t^T (I - U_k U_k^T) tau_t =
    G_tt w_t^2 - P_t^T P_t, P_t = U_k^T w_t tau_t) and of polar(U)'s T s x T s Gram matrix, all in float64, and the
    m-row products are
    those of the result: one m x T n x n product (Iso-C: one m x n x n product, of the task sum). None where a
    needed direction is not determined (a rank-deficient task sum or residual): the caller takes the direct route."""
    tasks, (m, n) = len(tensors), base.shape
    dtype = compute_dtype(base.dtype)
    w = torch.tensor([float(x) for x in weights], dtype=grams.dtype, device=grams.device)
    blocks = grams.view(tasks, n, tasks, n)  # G_ij = tau_i^T tau_j
    k = n - tasks * per_task
    values, vectors = torch.linalg.eigh(torch.einsum("i,iajb,j->ab", w, blocks, w))  # L^T G L = sum_ij w_i w_j G_ij
    s, v = values.flip(0).clamp(min=0).sqrt(), vectors.flip(1)
    if s[k - 1] <= s[0] * 1e-6:
        return None
    if per_task == 0:  # Iso-C: mean(S) U V^T = M (mean(S) V S^-1 V^T), the task sum times an n x n matrix
        deltas = _weighted_deltas(base, tensors, weights)
        return sum(deltas[1:], deltas[0]) @ ((v / s) @ v.T * s.mean()).to(dtype)
    common = (w.reshape(-1, 1, 1) * (v[:, :k] / s[:k])).reshape(tasks * n, k)  # U_k's coefficients, L V_k S_k^-1
    parts, s_parts, v_parts = [], [], []
    for t in range(tasks):
        rows = slice(t * n, (t + 1) * n)
        projected = common.T @ grams[:, rows] * w[t]  # P_t = U_k^T (w_t tau_t): k x n
        values, vectors = torch.linalg.eigh(grams[rows, rows] * w[t] ** 2 - projected.T @ projected)
        st, vt = values.flip(0)[:per_task].clamp(min=0).sqrt(), vectors.flip(1)[:, :per_task]
        if st[-1] <= st[0] * 1e-6:
            return None
        own = grams.new_zeros(tasks * n, per_task)
        own[rows] = w[t] * vt
        parts.append((own - common @ projected @ vt) / st)  # U'_t = (w_t tau_t - U_k P_t) V'_t S'_t^-1
        s_parts.append(st)
        v_parts.append(vt.T)
    coefficients = torch.cat(parts, dim=1)
    scaled, vectors = _inverse_root(coefficients.T @ grams @ coefficients, m)  # polar(U_parts), as _polar_by_gram
    coefficients = coefficients @ scaled @ vectors.T
    v_cat = torch.cat([*v_parts, v[:, :k].T], dim=0).to(dtype)
    sigma = torch.cat([*s_parts, s[:k]]).mean()
    final = torch.cat([coefficients, common], dim=1).to(dtype) @ _polar(v_cat) * sigma.to(dtype)
    stacked = torch.empty(m, tasks * n, dtype=dtype, device=base.device)  # [tau_1 ... tau_T], in place: one product
    base_c = base.to(dtype)
    for t, tensor in enumerate(tensors):
        torch.sub(tensor.to(dtype), base_c, out=stacked[:, t * n:(t + 1) * n])
    return stacked @ final


def iso_merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weights: Sequence[float],
    common_fraction: float | None = None,
    scale: float = 1.0,
    grams: torch.Tensor | None = None,
) -> torch.Tensor:
    """Isotropic merging (Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", ICML 2025), per matrix, on the task-arithmetic matrix M = sum_t w_t tau_t
    = U S V^T (thin SVD, r = min(m, n) singular values).

    Iso-C (``common_fraction`` None, Sec. 4.1): a flat spectrum, every direction at the mean singular value,

        theta = theta_base + scale * mean(S) U V^T

    Iso-CTS (Sec. 4.2): k0 = int(r f), s = round((r - k0) / T) task-specific directions per task, k = r - T s
    common ones (U_k, V_k: M's top k). Each task's own directions are the top s of its task vector with the
    common subspace projected out on the left, (I - U_k U_k^T) c_t = U'_t S'_t V'_t^T; then

        U = [U'_1[:, :s] ... U'_T[:, :s], U_k], V likewise, sigma = mean of their r singular values
        theta = theta_base + scale * sigma polar(U) polar(V)^T

    With s = 0 Iso-CTS is Iso-C. Tensors that are not matrices take the mean task vector, as in the authors'
    code (github.com/danielm1405/iso-merging, ``src/utils/iso.py``; FusionBench agrees). Deliberate
    difference: s is capped at (r - 1) // T so that at least one common direction remains (the authors'
    rounding can ask for more task directions than r holds when f is small). Where M has zero singular
    values, their directions (any orthonormal completion) enter at the mean, as in the authors' code.

    Computed (the same merge, within float32's rounding) from Gram matrices' eigendecompositions
    (:func:`_leading_svd`: M's in float64, only the s leading directions of each residual), with polar(U) as
    polar([U'_1 ... U'_T]) next to U_k (orthogonal to them), and for m <= n each residual as U_rest (U_rest^T c_t),
    whose SVD is an (r - k) x n one's: 2.5 x faster than LAPACK's SVDs on MiniLM (13.6 s -> 5.5 s a candidate;
    ``benchmarks/fitness_candidates.py``), 1.29 x on SmolLM2 (``benchmarks/merge_speed.py``), with the SVDs kept where
    M is rank deficient. ``grams``: a tall matrix's :func:`iso_grams`, prepared once; the same merge is then computed
    from it (:func:`_iso_from_grams`, closer to the merge in float64; a MiniLM cross-task Iso-CTS candidate 5.5 s ->
    3.9 s in the method search's trials, ``benchmarks/fitness_candidates.py``; SmolLM2 1.13 x, ``merge_speed.py``).
    """
    _check_lengths(tensors, weights=weights)
    if base.ndim != 2:
        return _mean_delta(base, _weighted_deltas(base, tensors, weights), scale)
    tasks, r = len(tensors), min(base.shape)
    per_task = 0
    if common_fraction is not None:
        if not 0.0 < common_fraction <= 1.0:
            raise ValueError(f"common_fraction: must lie in (0, 1], got {common_fraction}")
        per_task = min(round((r - int(r * common_fraction)) / tasks), (r - 1) // tasks)
    mixed = _iso_from_grams(base, tensors, weights, grams, per_task) if grams is not None else None
    if mixed is not None:
        return (base.to(mixed.dtype) + scale * mixed).to(base.dtype)
    deltas = _weighted_deltas(base, tensors, weights)
    total = sum(deltas[1:], deltas[0])
    # for m <= n, M's r left singular vectors are a basis of R^m (their complement of U_k is U_rest)
    k, basis = r - tasks * per_task, base.shape[0] <= base.shape[1]
    u, s, vt = _leading_svd(total, r if per_task == 0 or basis else k) or _svd(total)
    if per_task == 0:
        mixed = s.mean() * (u @ vt)
    else:
        common_u, rest = u[:, :k], u[:, k:]
        u_parts, s_parts, v_parts, deficient = [], [], [], False
        for delta in deltas:
            if basis:  # the residual is U_rest (U_rest^T tau_t): the SVD of an (r - k) x n matrix
                leading = _leading_svd(small := rest.T @ delta, per_task)
                ut, st, vtt = leading or _svd(small)
                ut = rest @ ut
            else:
                residual = delta - common_u @ (common_u.T @ delta)
                leading = _leading_svd(residual, per_task, precise=False)
                ut, st, vtt = leading or _svd(residual)
            deficient |= leading is None
            u_parts.append(ut[:, :per_task])
            s_parts.append(st[:per_task])
            v_parts.append(vtt[:per_task])
        # the tasks' directions are orthogonal to the common ones (they were projected out), so U's polar
        # factor is theirs next to U_k: only their own (T s x T s) Gram matrix is needed. Not where a residual
        # has fewer than s directions (a zero or low-rank task vector, a weight 0): LAPACK fills the rest with
        # arbitrary vectors, neither orthogonal to U_k nor to the other tasks', and only the polar factor of
        # the whole [U_1 ... U_T U_k] (as the authors compute it, always) keeps the merge isotropic
        tasks_u = torch.cat(u_parts, dim=1)
        u_cat = _polar(torch.cat([tasks_u, common_u], dim=1)) if deficient else \
            torch.cat([_polar_by_gram(tasks_u), common_u], dim=1)
        v_cat = torch.cat([*v_parts, vt[:k]], dim=0)
        sigma = torch.cat([*s_parts, s[:k]]).mean()
        mixed = sigma * (u_cat @ _polar(v_cat))
    return (base.to(mixed.dtype) + scale * mixed).to(base.dtype)


def della_ranks(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> list[MagnitudeRanks]:
    """DELLA's coefficient-independent part of one tensor: each model's :class:`MagnitudeRanks`."""
    return [MagnitudeRanks.of(delta) for delta in task_vectors(base, tensors)]
