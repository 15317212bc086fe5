"""Search-space kinds: one strategy object per ``space.kind``, behind one interface (:class:`Kind`).

Adding a kind is one module (a :class:`Kind` subclass) and one line in ``KINDS`` below.
Nothing above this package asks which kind a study has.
"""

from __future__ import annotations

from evoopt.config import StudyConfig
from evoopt.kinds.base import Kind
from evoopt.kinds.dfs import DfsKind
from evoopt.kinds.evolver import EvolverKind
from evoopt.kinds.parameter import ParameterKind
from evoopt.space import Sources, study_sources

__all__ = ["KINDS", "Kind", "make_kind", "on_cpu"]

KINDS: dict[str, type[Kind]] = {}
for _kind in (ParameterKind, EvolverKind, DfsKind):
    for _name in _kind.names:
        if _name in KINDS:
            raise RuntimeError(f"space.kind {_name!r} is registered twice ({KINDS[_name].__name__}, {_kind.__name__})")
        KINDS[_name] = _kind


def make_kind(config: StudyConfig, sources: Sources | None = None) -> Kind:
    """The study's kind, with its sources (nothing is loaded until its space or model is asked for)."""
    return KINDS[config.space.kind](config, sources or study_sources(config))


def on_cpu(config: StudyConfig) -> StudyConfig:
    """The same study (its root kept), its models on the CPU (export, away from the trials' GPU)."""
    return config.model_copy(update={"device": "cpu"})
