"""One registry that maps method names to merge methods and their coefficients."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from evoopt.merge import _methods as m
from evoopt.merge._methods import Sparsification

Statistic = Literal["fisher", "gram"]


@dataclass(frozen=True)
class MergeMethod:
    """A named merge method and the coefficients it takes.

    Attributes:
        name: registry key, as written in recipes.
        paper: citation of the method.
        per_model: coefficients with one value per source model, and their defaults
            (None: required).
        shared: coefficients with one value for all models, and their defaults.
        needs_base: whether a base (pretrained) model is required.
        min_models / max_models: how many non-base models the method accepts.
        statistic: data statistic the method needs per model ("fisher", "gram").
        task_arithmetic: when set, the method is these settings of
            :func:`generalized_task_arithmetic`, which enables the fused fast path.
        function: ``(base, tensors, coefficients, seed=, name=, statistics=)``, and ``prepared=`` for
            methods with ``prepare``.
        prepare: ``(base, tensors)`` -> the method's coefficient-independent part of one tensor (TSV-M's
            orthogonalised singular vectors), computed once by a :class:`~evoopt.merge.merger.Merger` and
            handed to ``function`` as ``prepared`` on every merge.
        writes_into: ``function`` takes ``out=``, a tensor of the result's shape (the model's own) to write the
            merge into where it can, returning it then (a copy less per candidate); else a new tensor.
    """

    name: str
    paper: str
    function: Callable[..., torch.Tensor]
    per_model: Mapping[str, float | None] = field(default_factory=dict)
    shared: Mapping[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    min_models: int = 1
    max_models: int | None = None
    statistic: Statistic | None = None
    task_arithmetic: Mapping[str, Any] | None = None
    prepare: Callable[[torch.Tensor, list[torch.Tensor]], Any] | None = None
    writes_into: bool = False

    def count_problem(self, n: int) -> str | None:
        """What is wrong with merging ``n`` non-base models by this method (None: nothing)."""
        if self.min_models <= n and (self.max_models is None or n <= self.max_models):
            return None
        beside = " besides its base" if self.needs_base else ""
        if self.min_models == self.max_models:
            return f"{self.name!r} takes exactly {self.min_models} model{'s' * (self.min_models > 1)}{beside}"
        most = "" if self.max_models is None else f" and at most {self.max_models}"
        return f"{self.name!r} takes at least {self.min_models}{most} models{beside}"

    def apply(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        coefficients: Mapping[str, Any],
        *,
        seed: int = 0,
        name: str = "",
        statistics: Sequence[torch.Tensor] | None = None,
        prepared: Any = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merge one tensor. ``coefficients`` maps per-model names to lists, shared names to values.

        Coefficients left out take the method's defaults; unknown names are an error. ``prepared``: what
        ``prepare`` returned for these tensors (without it, the method's function computes what it needs).
        ``out``: where a method that ``writes_into`` may write the result (it then returns ``out``).
        """
        unknown = set(coefficients) - set(self.per_model) - set(self.shared)
        if unknown:
            raise ValueError(f"coefficients: {self.name!r} has no {sorted(unknown)}; "
                             f"it takes {sorted(self.per_model) + sorted(self.shared)}")
        resolved: dict[str, Any] = dict(self.shared)
        for key, default in self.per_model.items():
            if key not in coefficients and default is None:
                raise ValueError(f"coefficients: {self.name!r} needs {key!r}, one value per model")
            resolved[key] = [default] * len(tensors)
        resolved.update(coefficients)
        extra = {"prepared": prepared} if prepared is not None else {}
        if out is not None and self.writes_into:
            extra["out"] = out
        return self.function(base, list(tensors), resolved, seed=seed, name=name, statistics=statistics, **extra)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry; a name can be registered once."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered; choose another name")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"method: unknown merge method {name!r}; known methods: {', '.join(available_methods())}"
        ) from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def _gta(sparsification: Sparsification, consensus: bool, normalize: bool) -> dict[str, Any]:
    return {"sparsification": sparsification, "consensus": consensus, "normalize": normalize}


def _run_gta(settings: Mapping[str, Any]) -> Callable[..., torch.Tensor]:
    def run(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], *, seed: int,
            name: str, statistics: Any) -> torch.Tensor:
        return m.generalized_task_arithmetic(
            base, tensors, weights=c["weight"], densities=c.get("density"), gammas=c.get("gamma"),
            sparsification=settings["sparsification"], consensus=settings["consensus"],
            normalize=c.get("normalize", settings["normalize"]), scale=c.get("scale", 1.0),
            seed=seed, name=name,
        )

    return run


def _register_task_arithmetic_family() -> None:
    family = [
        ("task_arithmetic", "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
         _gta("none", False, False), {"weight": 1.0}),
        ("ties", "Yadav et al., TIES-Merging, NeurIPS 2023",
         _gta("magnitude", True, True), {"weight": 1.0, "density": 1.0}),
        ("dare_linear", "Yu et al., Language Models are Super Mario (DARE), ICML 2024",
         _gta("random", False, False), {"weight": 1.0, "density": 1.0}),
        ("dare_ties", "Yu et al., Language Models are Super Mario (DARE), ICML 2024",
         _gta("random", True, False), {"weight": 1.0, "density": 1.0}),
        ("breadcrumbs", "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024",
         _gta("breadcrumbs", False, False), {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
        ("breadcrumbs_ties", "Davari & Belilovsky, Model Breadcrumbs, ECCV 2024",
         _gta("breadcrumbs", True, False), {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
    ]
    for name, paper, settings, per_model in family:
        register(MergeMethod(
            name=name, paper=paper, function=_run_gta(settings), per_model=per_model,
            shared={"scale": 1.0, "normalize": settings["normalize"]}, task_arithmetic=settings,
        ))


def _linear(base: Any, tensors: list[torch.Tensor], c: dict[str, Any], **_: Any) -> torch.Tensor:
    return m.linear(tensors, weights=c["weight"], normalize=c["normalize"])


def _slerp(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], **_: Any) -> torch.Tensor:
    return m.slerp(base, tensors[0], t=c["t"])


def _model_stock(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], **_: Any) -> torch.Tensor:
    return m.model_stock(base, tensors)


def _fisher(base: Any, tensors: list[torch.Tensor], c: dict[str, Any], *,
            statistics: Sequence[torch.Tensor] | None, **_: Any) -> torch.Tensor:
    if statistics is None:
        return m.linear(tensors, weights=c["weight"])
    return m.fisher(tensors, fishers=statistics, weights=c["weight"], epsilon=c["epsilon"])


def _regmean(base: Any, tensors: list[torch.Tensor], c: dict[str, Any], *,
             statistics: Sequence[torch.Tensor] | None, **_: Any) -> torch.Tensor:
    return m.regmean(tensors, grams=statistics, alpha=c["alpha"])


_register_task_arithmetic_family()
register(MergeMethod("linear", "Wortsman et al., Model soups, ICML 2022", _linear,
                     per_model={"weight": 1.0}, shared={"normalize": True}, needs_base=False))
register(MergeMethod("slerp", "Shoemake, Animating rotation with quaternion curves, 1985", _slerp,
                     shared={"t": 0.5}, min_models=1, max_models=1))
register(MergeMethod("model_stock", "Jang et al., Model Stock, ECCV 2024", _model_stock, min_models=2))
register(MergeMethod("fisher", "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, "
                     "NeurIPS 2022", _fisher, per_model={"weight": 1.0}, shared={"epsilon": 1e-8},
                     needs_base=False, statistic="fisher"))
register(MergeMethod("regmean", "Jin et al., Dataless Knowledge Fusion by Merging Weights of "
                     "Language Models (RegMean), ICLR 2023", _regmean, shared={"alpha": 0.9},
                     needs_base=False, min_models=2, statistic="gram"))


def _della(consensus: bool) -> Callable[..., torch.Tensor]:
    def run(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], *, seed: int, name: str,
            prepared: list[m.MagnitudeRanks] | None = None, out: torch.Tensor | None = None,
            **_: Any) -> torch.Tensor:
        return m.della(base, tensors, weights=c["weight"], densities=c["density"], epsilons=c["epsilon"],
                       consensus=consensus, normalize=c["normalize"], scale=c["scale"], seed=seed, name=name,
                       ranks=prepared, out=out)

    return run


def _sce(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], **_: Any) -> torch.Tensor:
    return m.sce(base, tensors, weights=c["weight"], select_topk=c["select_topk"], scale=c["scale"])


_DELLA = "Deep et al., DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling, 2024"
register(MergeMethod("della", _DELLA, _della(True), per_model={"weight": 1.0, "density": 1.0, "epsilon": 0.15},
                     shared={"scale": 1.0, "normalize": True}, prepare=m.della_ranks, writes_into=True))
register(MergeMethod("della_linear", _DELLA, _della(False),
                     per_model={"weight": 1.0, "density": 1.0, "epsilon": 0.15},
                     shared={"scale": 1.0, "normalize": False}, prepare=m.della_ranks, writes_into=True))
register(MergeMethod("sce", "Wan et al., FuseChat: Knowledge Fusion of Chat Models, 2024 (SCE)", _sce,
                     per_model={"weight": 1.0}, shared={"select_topk": 1.0, "scale": 1.0}))


def _tsv(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], *,
         prepared: m.SingularBasis | None = None, **_: Any) -> torch.Tensor:
    return m.tsv_merge(base, tensors, weights=c["weight"], scale=c["scale"], basis=prepared)


def _iso(task_specific: bool) -> Callable[..., torch.Tensor]:
    def run(base: torch.Tensor, tensors: list[torch.Tensor], c: dict[str, Any], *,
            prepared: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        fraction = c["common_fraction"] if task_specific else None
        return m.iso_merge(base, tensors, weights=c["weight"], common_fraction=fraction, scale=c["scale"],
                           grams=prepared)

    return run


_ISO = ("Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
        "ICML 2025")
register(MergeMethod("tsv", "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, "
                     "CVPR 2025 (TSV-M)", _tsv, per_model={"weight": 1.0}, shared={"scale": 1.0},
                     prepare=m.tsv_basis))
register(MergeMethod("iso_c", _ISO, _iso(False), per_model={"weight": 1.0}, shared={"scale": 1.0},
                     prepare=m.iso_grams))
register(MergeMethod("iso_cts", _ISO, _iso(True), per_model={"weight": 1.0},
                     shared={"scale": 1.0, "common_fraction": 0.8}, prepare=m.iso_grams))
