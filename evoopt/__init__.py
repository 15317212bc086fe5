"""evoopt: evolutionary model merging as Optuna studies.

Heavy libraries (torch, transformers, lm-eval) are imported by the submodules that
need them, so ``import evoopt`` stays fast.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
