"""Merge methods as pure functions over tensors, and the registry that names them.

>>> import torch
>>> from evoopt.merge import get_method
>>> base = torch.zeros(4)
>>> experts = [torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([1.0, 2.0, -0.1, 0.0])]
>>> get_method("ties").apply(base, experts, {"weight": [1.0, 1.0], "density": [1.0, 1.0]})
tensor([1.0000, 2.0000, 0.5000, 0.0000])
"""

from __future__ import annotations

from evoopt.merge._methods import (
    SingularBasis,
    breadcrumbs,
    dare,
    della,
    fisher,
    generalized_task_arithmetic,
    iso_grams,
    iso_merge,
    linear,
    magprune_probabilities,
    model_stock,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
    tsv_basis,
    tsv_merge,
)
from evoopt.merge._pieces import (
    dare_mask,
    elect_sign,
    sparsify_mask,
    stream_key,
    task_vectors,
    uniform_stream,
)
from evoopt.merge._prepared import PreparedTensor, merge_prepared
from evoopt.merge._registry import MergeMethod, available_methods, get_method, register

__all__ = [
    "MergeMethod",
    "PreparedTensor",
    "SingularBasis",
    "available_methods",
    "breadcrumbs",
    "dare",
    "dare_mask",
    "della",
    "elect_sign",
    "fisher",
    "generalized_task_arithmetic",
    "iso_grams",
    "iso_merge",
    "get_method",
    "linear",
    "magprune_probabilities",
    "merge_prepared",
    "model_stock",
    "register",
    "regmean",
    "sce",
    "slerp",
    "sparsify_mask",
    "stream_key",
    "task_arithmetic",
    "task_vectors",
    "ties",
    "tsv_basis",
    "tsv_merge",
    "uniform_stream",
]
