from __future__ import annotations

from typing import Any

import torch

from evoopt.merge import get_method


def run(method_name: str, base: torch.Tensor | None, tensors: list[torch.Tensor], coefficients: dict[str, Any],
        **kwargs: Any) -> torch.Tensor:
    """Apply a registered method with the coefficients from a superset that it takes."""
    method = get_method(method_name)
    taken = {k: v for k, v in coefficients.items() if k in method.per_model or k in method.shared}
    return method.apply(base, tensors, taken, **kwargs)
