"""Hand-computed merges on tiny tensors; the arithmetic is in the comments."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from evoopt import merge as M
from evoopt.merge import _prepared, get_method
from evoopt.merge._methods import della_ranks, magnitude_spread
from tests.helpers.merge import run

T = torch.tensor


def test_linear_weighted_average() -> None:
    # (1*[1, 2] + 3*[5, 6]) / 4 = [16/4, 20/4] = [4, 5]
    out = M.linear([T([1.0, 2.0]), T([5.0, 6.0])], weights=[1.0, 3.0])
    torch.testing.assert_close(out, T([4.0, 5.0]))
    # without normalisation: [1 + 15, 2 + 18]
    torch.testing.assert_close(M.linear([T([1.0, 2.0]), T([5.0, 6.0])], weights=[1.0, 3.0], normalize=False),
                               T([16.0, 20.0]))


def test_linear_rejects_zero_weight_sum() -> None:
    with pytest.raises(ValueError, match="weights"):
        M.linear([T([1.0]), T([2.0])], weights=[1.0, -1.0])


def test_task_arithmetic() -> None:
    # base [1, 1]; tau_1 = [1, -1], tau_2 = [2, 0]; 1 + 0.5*(0.5*1 + 1*2) = 2.25 ; 1 + 0.5*(-0.5) = 0.75
    base = T([1.0, 1.0])
    out = M.task_arithmetic(base, [T([2.0, 0.0]), T([3.0, 1.0])], weights=[0.5, 1.0], scale=0.5)
    torch.testing.assert_close(out, T([2.25, 0.75]))


def test_ties_trim_elect_disjoint_mean() -> None:
    base = torch.zeros(4)
    a = T([3.0, -1.0, 0.5, -2.0])
    b = T([1.0, 2.0, -4.0, -1.0])
    # density 0.5 keeps the top 2 magnitudes: a -> [3, 0, 0, -2], b -> [0, 2, -4, 0]
    # elected signs (sum of weighted): [3, 2, -4, -2] -> [+, +, -, -]
    # disjoint mean with unit weights: [3/1, 2/1, -4/1, -2/1]
    out = M.ties(base, [a, b], weights=[1.0, 1.0], densities=[0.5, 0.5])
    torch.testing.assert_close(out, T([3.0, 2.0, -4.0, -2.0]))


def test_ties_sign_tie_counts_as_positive() -> None:
    # contributions +1 and -1 sum to 0 -> elected +; only the +1 agrees -> 1 / 1
    out = M.ties(torch.zeros(1), [T([1.0]), T([-1.0])], weights=[1.0, 1.0], densities=[1.0, 1.0])
    torch.testing.assert_close(out, T([1.0]))


def test_ties_weights_in_disjoint_mean() -> None:
    # weights 0.25, 0.75 on agreeing [2], [4]: (0.5 + 3) / (0.25 + 0.75) = 3.5
    out = M.ties(torch.zeros(1), [T([2.0]), T([4.0])], weights=[0.25, 0.75], densities=[1.0, 1.0])
    torch.testing.assert_close(out, T([3.5]))


def test_ties_smallest_density_keeps_one_entry() -> None:
    # max(1, floor(0.01 * 3)) = 1 entry: the largest magnitude, -5
    out = M.ties(torch.zeros(3), [T([1.0, -5.0, 2.0])], weights=[1.0], densities=[0.01])
    torch.testing.assert_close(out, T([0.0, -5.0, 0.0]))


def test_zero_deltas_return_base() -> None:
    base = T([0.3, -0.7])
    for name in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs"):
        out = run(name, base, [base.clone(), base.clone()],
                                     {"weight": [1.0, 1.0], "density": [0.5, 0.5], "gamma": [0.0, 0.0]},
                                     seed=1, name="x")
        torch.testing.assert_close(out, base, msg=name)


def test_size_one_tensor() -> None:
    out = M.ties(T([1.0]), [T([2.0]), T([4.0])], weights=[1.0, 1.0], densities=[0.1, 0.1])
    # both deltas (1, 3) kept (k = 1 of 1), both positive: (1 + 3) / 2 = 2 -> 1 + 2
    torch.testing.assert_close(out, T([3.0]))


def test_dare_rescales_kept_entries_by_inverse_density() -> None:
    base = torch.zeros(10_000)
    expert = torch.ones(10_000)
    out = M.dare(base, [expert], weights=[1.0], densities=[0.25], consensus=False, seed=3, name="w")
    kept = out != 0
    # kept entries are 1 / 0.25 = 4; about a quarter are kept
    assert torch.all(out[kept] == 4.0)
    assert abs(kept.float().mean().item() - 0.25) < 0.02


def test_dare_mask_is_a_function_of_seed_and_name() -> None:
    a = M.dare_mask((1000,), 0.5, M.stream_key(0, "layers.0.w"))
    assert torch.equal(a, M.dare_mask((1000,), 0.5, M.stream_key(0, "layers.0.w")))
    assert not torch.equal(a, M.dare_mask((1000,), 0.5, M.stream_key(1, "layers.0.w")))
    assert not torch.equal(a, M.dare_mask((1000,), 0.5, M.stream_key(0, "layers.1.w")))


def test_uniform_stream_is_uniform_and_chunk_independent() -> None:
    key = M.stream_key(7, "t")
    u = M.uniform_stream(key, 100_000)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.01
    torch.testing.assert_close(M.uniform_stream(key, 100, start=500), u[500:600], rtol=0, atol=0)


def test_breadcrumbs_drops_outliers_and_small() -> None:
    # |tau| = 1..10; gamma 0.1 drops the top 1 (10), density 0.5 keeps 5: ranks 4..8 -> 5, 6, 7, 8, 9
    tau = torch.arange(1.0, 11.0)
    out = M.breadcrumbs(torch.zeros(10), [tau], weights=[1.0], densities=[0.5], gammas=[0.1])
    expected = torch.where((tau >= 5) & (tau <= 9), tau, 0.0)
    torch.testing.assert_close(out, expected)


def test_slerp_endpoints_and_orthogonal_midpoint() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    torch.testing.assert_close(M.slerp(a, b, t=0.0), a)
    torch.testing.assert_close(M.slerp(a, b, t=1.0), b)
    # Omega = pi/2: sin(pi/4)/1 * (a + b) = [0.7071, 0.7071], unit norm (a straight lerp would give 0.5s)
    s = math.sqrt(0.5)
    torch.testing.assert_close(M.slerp(a, b, t=0.5), T([s, s]))


def test_slerp_collinear_falls_back_to_lerp() -> None:
    torch.testing.assert_close(M.slerp(T([1.0, 1.0]), T([3.0, 3.0]), t=0.25), T([1.5, 1.5]))


def test_model_stock_orthogonal_deltas_keep_base() -> None:
    # tau_1 = [1, 0], tau_2 = [0, 1]: cos = 0 -> t = 0 -> base
    base = T([1.0, 1.0])
    torch.testing.assert_close(M.model_stock(base, [T([2.0, 1.0]), T([1.0, 2.0])]), base)


def test_model_stock_equal_deltas_take_average() -> None:
    # cos = 1, k = 2: t = 2 / (1 + 1) = 1 -> the average [3, 1]
    base = T([1.0, 1.0])
    torch.testing.assert_close(M.model_stock(base, [T([3.0, 1.0]), T([3.0, 1.0])]), T([3.0, 1.0]))


def test_model_stock_hand_computed_angle() -> None:
    # tau_1 = [1, 0], tau_2 = [1, 1]: cos = 1/sqrt(2); t = 2c / (1 + c) = 0.828427
    # average = [1 + 1, 0.5] relative to base 0 -> [1, 0.5]; result = t * [1, 0.5]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = M.model_stock(torch.zeros(2), [T([1.0, 0.0]), T([1.0, 1.0])])
    torch.testing.assert_close(out, T([t * 1.0, t * 0.5]))
    # the angle of small deltas is the same angle (the cosine's denominator was clamped at 1e-6: t = 0.10 here)
    small = M.model_stock(torch.zeros(2), [T([1e-4, 0.0]), T([1e-4, 1e-4])])
    torch.testing.assert_close(small, T([t * 1e-4, t * 0.5e-4]))


def test_fisher_weighting() -> None:
    # element 0: (1*1*2 + 1*3*6) / (1 + 3) = 20/4 = 5 ; element 1: Fisher zero on model 2 -> model 1's 4
    out = M.fisher([T([2.0, 4.0]), T([6.0, 8.0])], fishers=[T([1.0, 1.0]), T([3.0, 0.0])],
                   weights=[1.0, 1.0], epsilon=0.0)
    torch.testing.assert_close(out, T([5.0, 4.0]))


def test_regmean_equal_grams_average_and_alpha_zero_is_diagonal() -> None:
    w1, w2 = T([[1.0, 2.0]]), T([[3.0, 6.0]])
    g = T([[2.0, 1.0], [1.0, 2.0]])
    torch.testing.assert_close(M.regmean([w1, w2], grams=[g, g]), T([[2.0, 4.0]]))
    # alpha 0, diagonal grams diag(1, 1) and diag(3, 1): per input column a Gram-weighted mean
    # column 0: (1*1 + 3*3) / 4 = 2.5 ; column 1: (2 + 6) / 2 = 4
    out = M.regmean([w1, w2], grams=[T([[1.0, 5.0], [5.0, 1.0]]), T([[3.0, 0.0], [0.0, 1.0]])], alpha=0.0)
    torch.testing.assert_close(out, T([[2.5, 4.0]]))


def _jacobi_gelsd(gram: torch.Tensor, rhs: torch.Tensor, **options: object) -> torch.Tensor:
    """LAPACK's gelsd (minimum norm, by SVD) on the system scaled to a unit diagonal: X = D lstsq(D G D, D rhs)."""
    d = torch.diagonal(gram)
    d = torch.where(d > 0, d.rsqrt(), torch.ones_like(d))
    return d[:, None] * torch.linalg.lstsq(d[:, None] * gram * d[None, :], d[:, None] * rhs, driver="gelsd",
                                           **options).solution


def test_regmean_solves_a_singular_system_by_its_minimum_norm_answer() -> None:
    """A feature no example activates (or alpha 1 with fewer examples than features): the Gram matrix is singular.
    The answer is the minimum-norm least-squares one of the system scaled to a unit diagonal, the same on every
    device (torch's lstsq takes a full-rank driver on CUDA). By hand: grams diag(1, 0) and diag(3, 0), weights
    [[1, 2]] and [[3, 6]]: column 0 is the Gram-weighted mean (1 + 9) / 4 = 2.5; column 1 is seen by no example,
    so 0."""
    out = M.regmean([T([[1.0, 2.0]]), T([[3.0, 6.0]])], grams=[T([[1.0, 0.0], [0.0, 0.0]]),
                                                             T([[3.0, 0.0], [0.0, 0.0]])], alpha=1.0)
    torch.testing.assert_close(out, T([[2.5, 0.0]]))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64)  # 3 examples of 6 features: rank 3
    weights = [torch.randn(4, 6, generator=g) for _ in range(2)]
    gram = x.T @ x
    expected = _jacobi_gelsd(2 * gram, gram @ (weights[0] + weights[1]).T.double())
    torch.testing.assert_close(M.regmean(weights, grams=[gram, gram], alpha=1.0), expected.T.float())
    # float32 Gram matrices, as evoopt estimates them (16 examples of 256 features a model): their null directions
    # are rounding noise at about 1e-4 of the largest eigenvalue, and a float64 cutoff inverted them (weights of
    # size 1e3 from weights of size 1); the minimum-norm answer stays the size of the weights
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        grams = [(x.T @ x) for x in (torch.randn(16, 256, generator=g) for _ in range(3))]
        weights = [torch.randn(8, 256, generator=g) for _ in range(3)]
        exact = _jacobi_gelsd(sum(m.double() for m in grams),
                              sum(m.double() @ w.double().T for m, w in zip(grams, weights)), rcond=1e-5).T
        torch.testing.assert_close(M.regmean(weights, grams=grams, alpha=1.0), exact.float(), atol=1e-3, rtol=1e-3)


def test_regmean_keeps_every_direction_beside_an_outlier_feature() -> None:
    """One input feature 1000 x larger than the others (language models' outlier features), float32 Gram matrices
    at the default alpha 0.9: the system is full rank and its float32 Gram matrices resolve it (their float64
    solve agrees with the exact Grams' to 1e-5). Unscaled, the cutoff (width x float32's eps x the largest
    eigenvalue) zeroed every other direction: the merge differed from the solve by 50 and met the RegMean objective
    no better than the plain average."""
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2048, 256, generator=g) for _ in range(2)]
    for x in inputs:
        x[:, 0] *= 1000.0
    weights = [torch.randn(8, 256, generator=g) for _ in range(2)]
    grams = [x.T @ x for x in inputs]  # float32
    shrunk = [0.9 * m.double() + 0.1 * torch.diag(torch.diagonal(m.double())) for m in grams]
    exact = torch.linalg.solve(sum(shrunk), sum(m @ w.double().T for m, w in zip(shrunk, weights))).T
    merged = M.regmean(weights, grams=grams, alpha=0.9)
    torch.testing.assert_close(merged.double(), exact, atol=1e-4, rtol=1e-4)
    assert merged[:, 1:].norm() > 0.5 * exact[:, 1:].norm()


def test_registry_refuses_duplicates_and_lists_known() -> None:
    with pytest.raises(ValueError, match="already registered"):
        M.register(get_method("ties"))
    with pytest.raises(ValueError, match="known methods: .*ties"):
        get_method("tiess")
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "slerp",
            "model_stock", "fisher", "regmean"} <= set(M.available_methods())


def test_inputs_are_not_mutated() -> None:
    base, a, b = T([1.0, 2.0]), T([3.0, -1.0]), T([0.0, 5.0])
    copies = [x.clone() for x in (base, a, b)]
    for name in M.available_methods():
        method = get_method(name)
        if method.statistic:
            continue
        tensors = [a] if method.max_models == 1 else [a, b]
        coefs = {k: [v or 0.5] * len(tensors) for k, v in method.per_model.items()}
        coefs.update({k: v for k, v in method.shared.items()})
        method.apply(base, tensors, coefs, seed=0, name="x")
    for x, c in zip((base, a, b), copies):
        assert torch.equal(x, c)


def test_magprune_probabilities_rank_magnitudes_per_row() -> None:
    # row [0.1, -3, 2, 0.5]: ascending magnitude ranks 0, 3, 2, 1 of n - 1 = 3;
    # p = (d - eps) + 2 eps r / 3 with d = 0.5, eps = 0.15: 0.35, 0.65, 0.55, 0.45
    delta = T([[0.1, -3.0, 2.0, 0.5], [1.0, 2.0, 3.0, 4.0]])
    p = M.magprune_probabilities(delta, 0.5, 0.15)
    torch.testing.assert_close(p[0], T([0.35, 0.65, 0.55, 0.45]))
    torch.testing.assert_close(p[1], T([0.35, 0.45, 0.55, 0.65]))
    assert float(p.mean()) == pytest.approx(0.5)  # the mean keep rate is the density
    assert M.magprune_probabilities(T([7.0]), 0.4, 0.1).tolist() == pytest.approx([0.4])  # one entry: d
    with pytest.raises(ValueError, match="epsilon"):
        M.magprune_probabilities(delta, 0.9, 0.15)  # d + eps >= 1
    with pytest.raises(ValueError, match="epsilon: >= 0"):
        M.magprune_probabilities(delta, 0.5, -0.2)  # would keep small magnitudes more often: [0.7, 0.5, 0.3]
    with pytest.raises(ValueError, match="weights: sum to 0"):
        M.fisher([delta, delta], fishers=[delta.abs(), delta.abs()], weights=[1.0, -1.0])  # was -inf and NaN


def test_della_drops_by_magprune_and_rescales_by_keep_probability() -> None:
    # one model, no consensus, no normalize: theta = base + w k tau / p, k = u < p from the stream
    base = torch.zeros(2, 5)
    expert = T([[0.5, -1.0, 2.0, -4.0, 3.0], [1.0, 1.5, -0.5, 0.25, -2.0]])
    out = get_method("della_linear").apply(base, [expert], {"weight": [2.0], "density": [0.5], "epsilon": [0.2]},
                                           seed=3, name="w")
    p = M.magprune_probabilities(expert, 0.5, 0.2)
    u = M.uniform_stream(M.stream_key(3, "w", 0), 10).reshape(2, 5)
    torch.testing.assert_close(out, torch.where(u < p, 2.0 * expert / p, 0.0))
    again = get_method("della_linear").apply(base, [expert], {"weight": [2.0], "density": [0.5], "epsilon": [0.2]},
                                             seed=3, name="w")
    assert torch.equal(out, again)  # the same bytes from (seed, name, model)
    # at density 1 DELLA is TIES without trimming
    experts = [expert, -0.5 * expert + 1.0]
    torch.testing.assert_close(get_method("della").apply(base, experts, {"weight": [0.6, 1.2]}),
                               get_method("ties").apply(base, experts, {"weight": [0.6, 1.2]}))


@pytest.mark.parametrize(("consensus", "normalize", "scale"), [(True, True, 1.0), (False, False, 0.7),
                                                                (True, False, 1.3), (False, True, 1.0)])
def test_della_in_the_fused_kernel_gives_the_torch_formulas_bytes(monkeypatch: pytest.MonkeyPatch, consensus: bool,
                                                                  normalize: bool, scale: float) -> None:
    # DELLA in the fused kernel (float32 arithmetic on the CPU) against the torch formula (fast=False), bit for
    # bit: keep draws, 1 / p rescaling, election, disjoint mean, a model at density 1, exact zeros and negative
    # zeros, over several of the kernel's blocks
    passes = []
    into = _prepared._into
    monkeypatch.setattr(_prepared, "_into", lambda *args: (passes.append(args[2][-5]), into(*args)))
    g = torch.Generator().manual_seed(1)
    base = torch.randn(37, 129, generator=g)
    base[0, :8] = -0.0
    experts = [base + 0.01 * torch.randn(37, 129, generator=g) for _ in range(3)]
    experts[1][0, :4] = base[0, :4]  # zero task-vector entries
    config = dict(weights=[0.7, 1.3, -0.4], densities=[0.5, 1.0, 0.3], epsilons=[0.1, 0.2, 0.29], seed=4,
                  name="layer.weight", consensus=consensus, normalize=normalize, scale=scale)
    fast, plain = M.della(base, experts, **config), M.della(base, experts, fast=False, **config)
    assert passes == [3]  # (the fused kernel ran, in its DELLA mode)
    assert torch.equal(fast.view(torch.int32), plain.view(torch.int32))  # (the signs of zeros too)
    monkeypatch.setattr(_prepared, "UNROLLED", 2)  # more sources than the kernel unrolls: a pass per source
    assert torch.equal(M.della(base, experts, **config).view(torch.int32), plain.view(torch.int32))
    monkeypatch.undo()
    ranks = della_ranks(base, experts)
    assert torch.equal(M.della(base, experts, ranks=ranks, **config), fast)
    # views with other strides (a transposed matrix) are read in their own element order, as the formula reads them
    flipped = [base.T, *(e.T for e in experts)]
    assert torch.equal(M.della(flipped[0], flipped[1:], **config), M.della(flipped[0], flipped[1:], fast=False,
                                                                           **config))
    # bfloat16 tensors are read as stored and widened where used, as the formula widens them: the same bytes again
    narrow = [base.bfloat16(), *(e.bfloat16() for e in experts)]
    got = M.della(narrow[0], narrow[1:], **config)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), M.della(narrow[0], narrow[1:], fast=False, **config).view(torch.int16))
    # float64 takes the torch formula
    assert M.della(base.double(), [e.double() for e in experts], **config).dtype == torch.float64
    # written straight into a given tensor (the model's own) when it can hold the result; else a new one
    into_model = torch.full((37, 129), float("nan"))
    assert M.della(base, experts, out=into_model, **config) is into_model
    assert torch.equal(into_model.view(torch.int32), plain.view(torch.int32))
    for unfit in (torch.empty(129, 37).T, torch.empty(37, 129, dtype=torch.bfloat16)):  # strided; another dtype
        got = M.della(base, experts, out=unfit, **config)
        assert got is not unfit and torch.equal(got.view(torch.int32), plain.view(torch.int32))
    assert M.della(base, experts, out=into_model, fast=False, **config) is not into_model


@pytest.mark.parametrize("shape", [(2, 40_000), (70_000,), (6, 1)], ids=["16-bit ranks past 2^15",
                                                                       "32-bit ranks", "rows of one entry"])
def test_della_ranks_keep_the_spread_in_16_or_32_bits(shape: tuple[int, ...]) -> None:
    """DELLA's prepared ranks: 16 bits an entry for rows of up to 2^16 entries (ranks of 2^15 and more stored
    wrapped), 32 above; their spread is each entry's rank / (n - 1), and the fused kernel, which divides the
    ranks itself, gives the torch formula's bytes."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=g)
    experts = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(2)]
    ranks = della_ranks(base, experts)
    delta = experts[0] - base
    rows = delta.reshape(shape[0], -1) if len(shape) > 1 else delta.reshape(1, -1)
    n = rows.shape[1]
    assert ranks[0].ranks.dtype == (torch.int16 if n <= 1 << 16 else torch.int32)
    if n > 1:
        order = rows.abs().argsort(dim=1, stable=True)
        assert torch.equal(ranks[0].unsigned().reshape(rows.shape).gather(1, order),
                           torch.arange(n, dtype=torch.int32).expand(rows.shape[0], n))
    expected = torch.full(rows.shape, 0.5) if n == 1 else ranks[0].unsigned().float().reshape(rows.shape) / (n - 1)
    assert torch.equal(magnitude_spread(delta), expected.reshape(shape))
    config = dict(weights=[0.7, 1.3], densities=[0.5, 0.3], epsilons=[0.1, 0.2], seed=4, name="w",
                  consensus=True, normalize=True, scale=1.0)
    fast = M.della(base, experts, ranks=ranks, **config)
    assert torch.equal(fast.view(torch.int32), M.della(base, experts, fast=False, **config).view(torch.int32))


def test_sce_select_calculate_erase_by_hand() -> None:
    # c_1 = [2, 0, -1, 4], c_2 = [0, 0, 1, 2] (base 0, weights 1)
    # Select top 50 % of the nonzero variances: var = [1, 0, 1, 1] (three nonzero): int(3 * 0.5) = 1 entry; the
    # three tied at the cut are ranked by index, so entry 3 alone stays (keeping every tie kept 3 of 4)
    # Calculate: mean squares of [0, 0, 0, 4] and [0, 0, 0, 2]: 16/4 and 4/4 -> lambda = 4/5, 1/5
    # Erase: sum 6 at entry 3 -> +, both agree: (4/5 * 4 + 1/5 * 2) / 1 = 18/5
    base = torch.zeros(4)
    experts = [T([2.0, 0.0, -1.0, 4.0]), T([0.0, 0.0, 1.0, 2.0])]
    out = get_method("sce").apply(base, experts, {"select_topk": 0.5})
    torch.testing.assert_close(out, T([0.0, 0.0, 0.0, 18 / 5]))
    # two of three: entries 2 and 3; c = [0, 0, -1, 4] and [0, 0, 1, 2]: lambda 17/22, 5/22; entry 2: sum 0 -> +,
    # c_2 agrees: 1; entry 3: (17/22 * 4 + 5/22 * 2) / 1 = 78/22
    out = get_method("sce").apply(base, experts, {"select_topk": 0.7})
    torch.testing.assert_close(out, T([0.0, 0.0, 1.0, 78 / 22]))
    # select_topk 1 keeps everything; scale multiplies the fused delta
    plain = get_method("sce").apply(base, experts, {"scale": 0.5})
    torch.testing.assert_close(plain, 0.5 * T([2.0, 0.0, 1.0, 94 / 26]))


def _outer(scale: float, u: list[float], v: list[float]) -> torch.Tensor:
    return scale * torch.outer(T(u), T(v))


def test_tsv_merge_of_orthogonal_rank_one_tasks_is_their_sum() -> None:
    # tau_1 = 3 e1 f1^T, tau_2 = 2 e2 f2^T: r = 2, T = 2, k = 1 per task; U = [e1 e2] and V = [f1 f2]
    # are orthonormal already (their polar factors are themselves): delta = tau_1 + tau_2
    base = torch.ones(2, 3)
    experts = [base + _outer(3, [1, 0], [1, 0, 0]), base + _outer(2, [0, 1], [0, 0, 1])]
    out = get_method("tsv").apply(base, experts, {"scale": 0.5})
    torch.testing.assert_close(out, base + 0.5 * (_outer(3, [1, 0], [1, 0, 0]) + _outer(2, [0, 1], [0, 0, 1])))
    # not a matrix: the mean task vector
    torch.testing.assert_close(get_method("tsv").apply(torch.zeros(3), [T([1.0, 2, 3]), T([3.0, 0, 1])], {}),
                               T([2.0, 1.0, 2.0]))
    # more tasks than the rank: the base, as in the authors' code
    assert torch.equal(get_method("tsv").apply(torch.zeros(2, 1), [torch.ones(2, 1)] * 2, {}), torch.zeros(2, 1))


@pytest.mark.parametrize("shape", [(6, 4), (4, 4), (4, 6)])
def test_tsv_merge_with_a_zero_task_vector_is_the_others_truncation(shape: tuple[int, int]) -> None:
    """A task vector of rank below its k slots (zero here: an expert that never trained this matrix) adds nothing:
    its slots stay empty instead of LAPACK's arbitrary vectors rotating the other task's (max difference 1.64)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g)
    expert = base + torch.randn(*shape, generator=g)
    merged = M.tsv_merge(base, [expert, base.clone()], weights=[1.0, 1.0])
    u, s, vt = torch.linalg.svd(expert - base, full_matrices=False)
    k = min(shape) // 2
    torch.testing.assert_close(merged, base + u[:, :k] @ torch.diag(s[:k]) @ vt[:k], rtol=1e-5, atol=1e-5)


def test_tsv_merge_agrees_with_the_eigendecomposition_route() -> None:
    # the authors' second variant orthogonalises by U (U^T U)^(-1/2) (eigh), the same polar factor
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g, dtype=torch.float64)
    experts = [base + torch.randn(6, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    weights = [0.7, 1.3]
    k, us, ss, vs = 2, [], [], []
    for expert, w in zip(experts, weights):
        u, s, vt = torch.linalg.svd(w * (expert - base), full_matrices=False)
        us.append(u[:, :k]), ss.append(s[:k]), vs.append(vt[:k])
    u, s, v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)

    def inverse_root(a: torch.Tensor) -> torch.Tensor:
        values, vectors = torch.linalg.eigh(a)
        return vectors @ torch.diag(values.rsqrt()) @ vectors.T

    expected = base + (u @ inverse_root(u.T @ u)) @ torch.diag(s) @ (inverse_root(v @ v.T) @ v)
    torch.testing.assert_close(get_method("tsv").apply(base, experts, {"weight": weights}), expected)


def test_iso_c_flattens_the_spectrum_of_the_task_sum() -> None:
    # M = diag(3, 1) + diag(0, 0): singular values 3, 1 -> both 2, directions kept
    base = torch.zeros(2, 2)
    out = get_method("iso_c").apply(base, [torch.diag(T([3.0, 0.0])), torch.diag(T([0.0, 1.0]))], {"scale": 1.5})
    torch.testing.assert_close(out, 1.5 * torch.diag(T([2.0, 2.0])))
    # a negative entry keeps its sign (U V^T), at the mean magnitude
    out = get_method("iso_c").apply(base, [torch.diag(T([3.0, 0.0])), torch.diag(T([0.0, -1.0]))], {})
    torch.testing.assert_close(out, torch.diag(T([2.0, -2.0])))


def test_iso_cts_adds_each_tasks_own_directions() -> None:
    # r = 4, T = 2, f = 0.5: k0 = 2, s = round(2 / 2) = 1 per task, k = 2 common directions.
    # tau_1 = diag(4, 0, 1, 0), tau_2 = diag(0, 3, -0.5, 1): M = diag(4, 3, 0.5, 1).
    # Iso-C: mean(4, 3, 1, 0.5) = 2.125 on every direction of M.
    # Iso-CTS: common e1, e2 (4, 3); tau_1 without them: diag(0, 0, 1, 0) -> e3 (1);
    # tau_2 without them: diag(0, 0, -0.5, 1) -> e4 (1); sigma = mean(1, 1, 4, 3) = 2.25 on e1..e4.
    base = torch.zeros(4, 4)
    experts = [torch.diag(T([4.0, 0, 1, 0])), torch.diag(T([0.0, 3, -0.5, 1]))]
    torch.testing.assert_close(get_method("iso_c").apply(base, experts, {}), 2.125 * torch.eye(4))
    out = get_method("iso_cts").apply(base, experts, {"common_fraction": 0.5})
    torch.testing.assert_close(out, 2.25 * torch.eye(4))
    # f = 1 leaves no task-specific directions: Iso-C
    torch.testing.assert_close(get_method("iso_cts").apply(base, experts, {"common_fraction": 1.0}),
                               2.125 * torch.eye(4))
    with pytest.raises(ValueError, match="common_fraction"):
        get_method("iso_cts").apply(base, experts, {"common_fraction": 0.0})


@pytest.mark.parametrize("shape", [(20, 8), (8, 8), (8, 20)])
@pytest.mark.parametrize("case", ["rank one", "zero", "weight 0"])
def test_iso_cts_stays_isotropic_when_a_task_has_fewer_directions_than_its_share(shape: tuple[int, int],
                                                                              case: str) -> None:
    """Iso-CTS (Marczak et al. 2025, eq. 10-11): the merge's update has one singular value on every direction.
    A task vector of lower rank than its share (a LoRA expert, a layer an expert never trained, a weight 0) leaves
    LAPACK's arbitrary vectors in its slots: the polar factor of the whole [U_1 ... U_T U_k] keeps the spectrum
    flat (its max / min was 2.5 for a rank-one task on a tall matrix, and a zero task's directions were lost)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g)
    first = torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g) if case == "rank one" \
        else torch.zeros(shape) if case == "zero" else torch.randn(*shape, generator=g)
    experts = [base + first, base + torch.randn(*shape, generator=g)]
    weights = [0.0, 1.0] if case == "weight 0" else [1.0, 1.0]
    values = torch.linalg.svdvals(M.iso_merge(base, experts, weights=weights, common_fraction=0.5) - base)
    assert float(values.max() / values.min()) == pytest.approx(1.0, abs=1e-4)


def test_the_polar_factor_has_a_route_where_the_svd_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """LAPACK's SVD can fail on nearly orthonormal matrices (all singular values near 1): the Gram route gives
    the same factor, tall or wide; a zero column (an unused slot, whose polar column is arbitrary and meets a
    zero singular value) stays zero there."""
    from evoopt.merge import _methods

    g = torch.Generator().manual_seed(1)
    tall = torch.randn(7, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_methods._polar_by_gram(tall), _methods._polar(tall))
    torch.testing.assert_close(_methods._polar_by_gram(tall.T), _methods._polar(tall.T))
    tall[:, 3] = 0.0
    by_gram = _methods._polar_by_gram(tall)
    torch.testing.assert_close(by_gram[:, :3], _methods._polar(tall)[:, :3])
    assert torch.equal(by_gram[:, 3], torch.zeros(7, dtype=torch.float64))

    base = torch.zeros(6, 4)
    experts = [torch.randn(6, 4, generator=g) for _ in range(2)]
    want = get_method("iso_cts").apply(base, experts, {"common_fraction": 0.5})
    calls = []

    def svd(a: torch.Tensor, full_matrices: bool = True) -> object:
        calls.append(a.shape)  # Iso-CTS's one LAPACK SVD, V's polar factor, fails
        raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "svd", svd)
    torch.testing.assert_close(get_method("iso_cts").apply(base, experts, {"common_fraction": 0.5}), want)
    assert calls == [torch.Size([4, 4])]  # it failed and was computed by the Gram route


@pytest.mark.parametrize("fails", ["float32", "both"])
def test_the_svd_has_routes_where_lapack_fails_to_converge(monkeypatch: pytest.MonkeyPatch, fails: str) -> None:
    """Seen in a SmolLM2 method search: LAPACK's SVD failed on Iso-CTS's residual of a task (its common directions
    projected out), and the trial's exception ended the study. The SVD is retried in float64, then taken from the
    Gram matrix's eigendecomposition: the same factors either way, wide and tall matrices alike."""
    from evoopt.merge import _methods

    g = torch.Generator().manual_seed(2)
    for shape in [(6, 9), (9, 6)]:
        a = torch.randn(*shape, generator=g)
        u, s, vt = _methods._svd(a)
        seen: list[torch.dtype] = []

        def svd(a: torch.Tensor, full_matrices: bool = True, real: object = torch.linalg.svd,
                seen: list[torch.dtype] = seen) -> object:
            seen.append(a.dtype)
            if fails == "both" or a.dtype == torch.float32:
                raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
            return real(a, full_matrices=full_matrices)  # type: ignore[operator]

        with monkeypatch.context() as patched:
            patched.setattr(torch.linalg, "svd", svd)
            u2, s2, vt2 = _methods._svd(a)
        assert seen == [torch.float32, torch.float64]
        torch.testing.assert_close(s2, s)
        torch.testing.assert_close((u2 * s2) @ vt2, a)
        torch.testing.assert_close((u2.T @ u).abs(), torch.eye(6), atol=1e-4, rtol=0)  # the same directions


def test_iso_merges_of_a_tall_matrix_from_the_task_vectors_gram_matrix_agree_with_the_direct_route() -> None:
    """A tall matrix's Iso-C and Iso-CTS from the task vectors' Gram matrix (``iso_grams``, prepared once: every
    eigendecomposition n x n or smaller) are its direct route's merges, and closer to the merge in float64; where a
    residual is rank deficient (a task at weight 0) the direct route is taken (the same bytes)."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(200, 8, generator=g)
    experts = [base + torch.randn(200, 8, generator=g) * torch.logspace(0, -1.5, 8) for _ in range(3)]
    grams = M.iso_grams(base, experts)
    assert grams is not None and grams.shape == (24, 24) and grams.dtype == torch.float64
    stacked = torch.cat([e - base for e in experts], dim=1).double()
    torch.testing.assert_close(grams, stacked.T @ stacked)
    for weights, fraction in [([0.6, 1.0, 0.3], None), ([1.0, 1.0, 1.0], 0.5), ([1.0, 0.5, 0.8], 0.2)]:
        fast = M.iso_merge(base, experts, weights=weights, common_fraction=fraction, grams=grams)
        direct = M.iso_merge(base, experts, weights=weights, common_fraction=fraction)
        exact = M.iso_merge(base.double(), [e.double() for e in experts], weights=weights, common_fraction=fraction)
        assert not torch.equal(fast, direct)  # (another route)
        torch.testing.assert_close(fast, direct, rtol=1e-4, atol=5e-5)
        # closer to the float64 merge than the direct route's float32 residuals (measured: 2e-6 against 3e-5)
        torch.testing.assert_close(fast.double(), exact, rtol=0, atol=5e-6)
    zero = {"weights": [1.0, 0.0, 0.8], "common_fraction": 0.5}
    assert torch.equal(M.iso_merge(base, experts, grams=grams, **zero), M.iso_merge(base, experts, **zero))
    # the registry hands the prepared matrix over; kept only where it is no larger than a float32 task vector
    method = get_method("iso_cts")
    assert torch.equal(method.apply(base, experts, {}, prepared=method.prepare(base, experts)),
                       M.iso_merge(base, experts, weights=[1.0] * 3, common_fraction=0.8, grams=grams))
    assert M.iso_grams(base[:20], [e[:20] for e in experts]) is None  # 2 (3 x 8)^2 > 20 x 8
    assert M.iso_grams(base.T, [e.T for e in experts]) is None and M.iso_grams(base[0], [e[0] for e in experts]) is None


@pytest.mark.parametrize("shape", [(12, 12), (8, 20), (20, 8)])
def test_iso_merges_from_the_gram_matrix_agree_with_lapacks_svd(monkeypatch: pytest.MonkeyPatch,
                                                                shape: tuple[int, int]) -> None:
    """Iso-C and Iso-CTS take their singular vectors from the Gram matrix's eigendecomposition (faster on tall and
    wide matrices): the merge is that of the plain SVD route (the paper's), square, wide (each residual's SVD then an
    (r - k) x n one's) and tall; and a rank-deficient task sum, whose zero directions the Gram matrix does not
    determine, takes the SVD route."""
    from evoopt.merge import _methods

    g = torch.Generator().manual_seed(3)
    base = torch.randn(*shape, generator=g)
    experts = [base + torch.randn(*shape, generator=g) * torch.logspace(0, -1.5, shape[1]) for _ in range(3)]
    settings: list[dict[str, object]] = [{"weight": [0.6, 1.0, 0.3]}, {"common_fraction": 0.5},
                                         {"common_fraction": 0.2, "weight": [1.0, 0.5, 0.8]}]
    methods = ["iso_c", "iso_cts", "iso_cts"]
    leading, found = _methods._leading_svd, []

    def counted(*args: object, **kwargs: object) -> object:  # the Gram route, recording whether it answered
        result = leading(*args, **kwargs)
        found.append(result is not None)
        return result

    with monkeypatch.context() as patched:
        patched.setattr(_methods, "_leading_svd", counted)
        gram = [get_method(m).apply(base, experts, c) for m, c in zip(methods, settings)]
    assert found and all(found)  # every merge took its singular vectors from the Gram matrix
    with monkeypatch.context() as patched:
        patched.setattr(_methods, "_leading_svd", lambda *a, **k: None)
        plain = [get_method(m).apply(base, experts, c) for m, c in zip(methods, settings)]
    for got, want in zip(gram, plain):
        assert not torch.equal(got, want)  # (another route)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # a task sum of rank 1: only its first direction is known from the Gram matrix
    low = base + torch.outer(torch.randn(shape[0], generator=g), torch.randn(shape[1], generator=g))
    assert _methods._leading_svd(low - base, 2) is None
    u, s, vt = torch.linalg.svd(low - base, full_matrices=False)  # its other directions: LAPACK's completion
    torch.testing.assert_close(get_method("iso_c").apply(base, [low, base, base], {}), base + s.mean() * (u @ vt))


def test_fisher_of_a_token_classifier_is_its_predicted_labels_not_the_next_token() -> None:
    """3-D logits were taken for a causal LM's: a token classifier's 3 classes were indexed by token ids up to the
    vocabulary's 96 (an index error). Now each token's predicted label, by hand on one token: the loss is minus
    its largest log-probability."""
    from transformers import BertForTokenClassification

    from evoopt.models.statistics import _loss, estimate_fisher
    from tests.helpers.models import tiny_bert_config

    torch.manual_seed(0)
    model = BertForTokenClassification(tiny_bert_config()).eval()
    batch = {"input_ids": torch.tensor([[5, 90, 17, 3]]), "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    fisher = estimate_fisher(model, [batch])
    assert all(torch.isfinite(f).all() for f in fisher.values()) and fisher["classifier.weight"].abs().sum() > 0
    one = {"input_ids": batch["input_ids"][:, :1], "attention_mask": batch["attention_mask"][:, :1]}
    logprobs = torch.log_softmax(model(**one).logits.float(), -1)[0, 0]
    assert float(_loss(model, one)) == pytest.approx(-float(logprobs.max()))


@pytest.mark.slow  # (SmolLM2's tokenizer: its GGUF converted once a session)
def test_regmean_solves_gpt2s_conv1d_weights_stored_in_out(smol_tiny_family: list[Path], tmp_path: Path) -> None:
    """GPT-2's Conv1D stores W as (in, out), y = x W: RegMean's solve (for (out, in) weights) raised on c_attn's
    (32, 96) and silently transposed the math of the square c_proj. By hand on c_proj: W* = (sum G~)^-1 sum G~ W_m,
    G~ = alpha G + (1 - alpha) diag(G) (Jin et al. 2023, eq. 2, for y = x W)."""
    import shutil

    from transformers import AutoConfig, GPT2Config, GPT2LMHeadModel

    from evoopt.merge.merger import Merger
    from evoopt.merge.recipe import parse_recipe
    from evoopt.models.io import TOKENIZER_FILES

    vocab = AutoConfig.from_pretrained(str(smol_tiny_family[0])).vocab_size
    config = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=1, n_head=4)
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        path = tmp_path / f"gpt2-{i}"
        GPT2LMHeadModel(config).save_pretrained(path)
        for name in TOKENIZER_FILES:
            if (smol_tiny_family[0] / name).exists():
                shutil.copy2(smol_tiny_family[0] / name, path / name)
        paths.append(path)
    texts = tmp_path / "calibration.txt"
    texts.write_text("the cat sat on the mat\nmerging models without training\nspam or ham\n")
    merger = Merger(parse_recipe({"method": "regmean", "models": [{"model": str(p)} for p in paths],
                                  "calibration": {"texts": str(texts)}}))
    name = "transformer.h.0.attn.c_proj.weight"
    assert merger.statistics is not None and "transformer.h.0.attn.c_attn.weight" in merger.in_out
    merged = dict(merger.merge().named_parameters())
    shrunk = [0.9 * g.double() + 0.1 * torch.diag(torch.diagonal(g.double())) for g in merger.statistics[name]]
    weights = [GPT2LMHeadModel.from_pretrained(p).state_dict()[name].double() for p in paths]
    expected = torch.linalg.solve(sum(shrunk), sum(g @ w for g, w in zip(shrunk, weights)))
    torch.testing.assert_close(merged[name].double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear", "fisher", "tsv"])
def test_merges_make_their_tensors_on_the_inputs_device(name: str) -> None:
    """On the GPU the merges got masks, random draws, ranks and bases made on the CPU (a device mismatch: DARE,
    DELLA, TSV-M; Fisher's statistics are estimated on the CPU). The meta device refuses a CPU tensor beside it as
    CUDA does, so the merges run here on meta tensors (the methods whose steps read values cannot: on the GPU check)."""
    method = get_method(name)
    meta = torch.device("meta")
    base, experts = torch.randn(6, 5).to(meta), [torch.randn(6, 5).to(meta) for _ in range(3)]
    coefficients = {k: [{"weight": 1.0, "epsilon": 0.1}.get(k, 0.5)] * 3 for k in method.per_model}
    fishers = [torch.rand(6, 5) for _ in range(3)] if method.statistic == "fisher" else None  # (on the CPU)
    prepared = method.prepare(base, experts) if method.prepare else None
    merged = method.apply(base, experts, coefficients, name="w", statistics=fishers, prepared=prepared)
    assert merged.device == meta and merged.shape == (6, 5)


def test_divisions_on_a_device_are_by_a_tensor_there() -> None:
    """CUDA divides by a host scalar (a Python number, a CPU 0-dim tensor) as a product with its reciprocal, a bit
    off the CPU's quotient: DELLA's drop probabilities, so its masks, the normalized linear merge and the SVD
    methods' mean task vector differed from the CPU's. On meta tensors (no values), every division of a floating
    tensor off the CPU is recorded: none may be by a host scalar. And ``divide`` is the CPU's division, byte for
    byte."""
    from torch.overrides import TorchFunctionMode

    from evoopt.merge._pieces import divide

    divisions = (torch.Tensor.div, torch.Tensor.div_, torch.Tensor.__truediv__, torch.div, torch.true_divide)

    class HostDivisors(TorchFunctionMode):
        found: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func in divisions and len(args) >= 2 and isinstance(args[0], torch.Tensor) and \
                    args[0].device.type != "cpu" and args[0].is_floating_point() and \
                    (not isinstance(args[1], torch.Tensor) or args[1].device.type == "cpu"):
                self.found.append(f"{func.__name__} by {args[1]!r}")
            return func(*args, **(kwargs or {}))

    meta = torch.device("meta")
    base, experts = torch.randn(6, 5).to(meta), [torch.randn(6, 5).to(meta) for _ in range(3)]
    with HostDivisors() as mode:
        M.linear(experts, weights=[0.5, 0.3, 0.4], normalize=True)
        M.della(base, experts, weights=[1.0] * 3, densities=[0.5] * 3, epsilons=[0.1] * 3)
        M.tsv_merge(base[0], [e[0] for e in experts], weights=[1.0] * 3)
    assert mode.found == []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        t = (100 * torch.randn(1000, generator=torch.Generator().manual_seed(0))).to(dtype)
        for by in (3.0, 7, 0.1, 65535):
            assert divide(t, by).dtype == dtype and torch.equal(divide(t, by), t / by)
