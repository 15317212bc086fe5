"""Search-space kinds: one strategy object per ``space.kind``, behind one interface (:class:`Kind`).

Adding a kind is one module (a :class:`Kind` subclass) and one entry in the tuple below.
Registering a kind also registers its config check (:meth:`Kind.problems`) with
:func:`~evoopt.study.config.parse_config`. Nothing above this package asks which kind a study has.
"""

from __future__ import annotations

from evoopt.study.config import KIND_CALIBRATED, KIND_CHECKS, KIND_IN_POOLS, KIND_KEYS, StudyConfig
from evoopt.study.kinds.base import Kind
from evoopt.study.kinds.dfs import DfsKind
from evoopt.study.kinds.evolver import EvolverKind
from evoopt.study.kinds.m2n2 import M2N2Kind
from evoopt.study.kinds.methods import MethodsKind
from evoopt.study.kinds.parameter import ParameterKind
from evoopt.study.space import Sources, study_sources

__all__ = ["KINDS", "Kind", "make_kind", "on_cpu", "register"]

KINDS: dict[str, type[Kind]] = {}


def register(kind: type[Kind]) -> type[Kind]:
    """Serve ``kind.names`` as ``space.kind`` values, check every study config with ``kind.problems``, and
    refuse ``kind.keys`` in the studies of the kinds that do not read them."""
    for name in kind.names:
        if name in KINDS:
            raise RuntimeError(f"space.kind {name!r} is registered twice ({KINDS[name].__name__}, {kind.__name__})")
        KINDS[name] = kind
        KIND_CHECKS[name] = kind.problems
        KIND_CALIBRATED[name] = kind.calibrated
        KIND_KEYS[name] = kind.keys.get(name, ())
        KIND_IN_POOLS[name] = kind.in_pools
    return kind


for _kind in (ParameterKind, EvolverKind, DfsKind, MethodsKind, M2N2Kind):
    register(_kind)


def make_kind(config: StudyConfig, sources: Sources | None = None) -> Kind:
    """The study's kind, with its sources (nothing is loaded until its space or model is asked for)."""
    return KINDS[config.space.kind](config, sources or study_sources(config))


def on_cpu(config: StudyConfig) -> StudyConfig:
    """The same study (its root kept), its models on the CPU (export, away from the trials' GPU)."""
    return config.model_copy(update={"device": "cpu"})
