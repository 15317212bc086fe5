"""evoopt and mergekit agree on the deterministic settings of the shared methods.

mergekit is a test-only dependency. Where evoopt differs on purpose (DARE's
rescaling at density < 1, see ``generalized_task_arithmetic``), only density 1 is
compared.
"""

from __future__ import annotations

# (imported, not importorskip: mergekit is in the test extra, and a missing one must fail the run, not skip the
# agreement the README says is tested)
import mergekit.merge_methods.base as base_mod
import mergekit.merge_methods.registry as registry
import pytest
import torch

from evoopt.merge import get_method, magprune_probabilities

SHAPES = [(7,), (16, 12), (3, 5, 4)]


def _models(shape: tuple[int, ...], count: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(count)]


def _mergekit_group(name: str, base: torch.Tensor, experts: list[torch.Tensor], **params: object) -> torch.Tensor:
    group = base_mod.TensorGroup.from_tensors([base, *experts], base_index=0)
    method = registry.get(name)
    defaults = {p.name: p.default for p in method.spec.parameters if p.default is not None}
    per_model = {k: {i + 1: v for i, v in enumerate(vals)} for k, vals in params.items() if isinstance(vals, list)}
    shared = {k: v for k, v in params.items() if not isinstance(v, list)}
    return method.merge_group(group, **{**defaults, **shared, **per_model})


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count", [2, 3])
def test_linear_agrees(shape: tuple[int, ...], count: int) -> None:
    _, experts = _models(shape, count, seed=1)
    weights = [0.2, 0.5, 0.9][:count]
    theirs = registry.get("linear").merge_batch(
        base_mod.TensorBatch(tuple(t.unsqueeze(0) for t in experts)),
        weight=torch.tensor([weights]), normalize=True,
    )[0]
    ours = get_method("linear").apply(None, experts, {"weight": weights, "normalize": True})
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("task_arithmetic", {"weight": [0.7, -0.3, 1.1]}),
        ("task_arithmetic", {"weight": [0.7, 0.3, 1.1], "normalize": True, "lambda": 0.8}),
        ("ties", {"weight": [0.7, 0.3, 1.1], "density": [0.5, 0.3, 0.9]}),
        ("ties", {"weight": [1.0, 1.0, 1.0], "density": [1.0, 0.2, 0.01], "lambda": 1.5}),
        ("ties", {"weight": [0.4, 0.6, 1.0], "density": [0.6, 0.6, 0.6], "normalize": False}),
        ("breadcrumbs", {"weight": [0.5, 0.5, 0.5], "density": [0.8, 0.6, 0.9], "gamma": [0.05, 0.1, 0.0]}),
        ("breadcrumbs_ties", {"weight": [0.5, 0.9, 0.2], "density": [0.7, 0.5, 0.9], "gamma": [0.1, 0.02, 0.2]}),
        ("dare_linear", {"weight": [0.5, 0.2, 0.9], "density": [1.0, 1.0, 1.0]}),
        ("dare_ties", {"weight": [0.5, 0.2, 0.9], "density": [1.0, 1.0, 1.0]}),
    ],
)
def test_task_arithmetic_family_agrees(shape: tuple[int, ...], name: str, params: dict[str, object]) -> None:
    base, experts = _models(shape, 3, seed=2)
    theirs = _mergekit_group(name, base, experts, **params)
    ours_params = {("scale" if k == "lambda" else k): v for k, v in params.items()}
    ours = get_method(name).apply(base, experts, ours_params, seed=0, name="t")
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce_agrees(shape: tuple[int, ...], select_topk: float) -> None:
    base, experts = _models(shape, 3, seed=4)
    theirs = _mergekit_group("sce", base, experts, select_topk=select_topk)
    ours = get_method("sce").apply(base, experts, {"select_topk": select_topk})
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_at_density_one_agrees(name: str) -> None:
    base, experts = _models((16, 12), 3, seed=5)
    params = {"weight": [0.7, 0.3, 1.1], "density": [1.0, 1.0, 1.0], "epsilon": [0.1, 0.1, 0.1]}
    theirs = _mergekit_group(name, base, experts, **params)
    torch.testing.assert_close(get_method(name).apply(base, experts, params), theirs, rtol=1e-6, atol=1e-6)


def test_della_keep_probabilities_agree() -> None:
    """mergekit draws its MAGPRUNE mask from torch's global generator: its keep rate per magnitude rank,
    over 4,000 identical rows, matches evoopt's probabilities (binomial sd about 0.008)."""
    sparsify = pytest.importorskip("mergekit.sparsify")
    row = torch.tensor([0.3, -2.0, 0.01, 1.5, -0.7, 0.05, 4.0, -0.2, 0.9, -1.1, 0.6])
    rows = row.repeat(4000, 1)
    torch.manual_seed(0)
    kept = sparsify.della_magprune(rows, density=0.4, epsilon=0.2, rescale_norm=None) != 0
    torch.testing.assert_close(kept.float().mean(dim=0), magprune_probabilities(row, 0.4, 0.2), atol=0.035, rtol=0)
