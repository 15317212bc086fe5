"""Kept for code written against the first plan: ``import evoopt.lm_eval_model`` registers lm-eval's
``evoopt`` model. It lives in :mod:`evoopt.integrations.lm_eval`."""

from __future__ import annotations

from evoopt.integrations.lm_eval import EvooptLM, resolve_recipe

__all__ = ["EvooptLM", "resolve_recipe"]
