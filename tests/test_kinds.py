"""The search-space kinds' registry: a kind brings its own config checks; nothing else asks a study's kind."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

import pytest

from evoopt.errors import ConfigError
from evoopt.study import config as config_module
from evoopt.study import kinds
from evoopt.study.config import KIND_CHECKS, KIND_KEYS, StudyConfig, parse_config

PACKAGE = Path(__file__).parent.parent / "evoopt"
SOURCES = {"base": "b", "models": ["m1", "m2"], "tasks": ["vader-tweets"]}


def _problems(space: dict[str, object], **extra: object) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"name": "k", "sources": SOURCES, "space": space, **extra})
    return str(caught.value)


def test_an_unknown_kind_names_the_registered_ones() -> None:
    message = _problems({"kind": "genetic"})
    assert "space.kind: unknown kind 'genetic'; known: global, layerwise, evolver, dfs" in message


def test_each_kind_checks_its_own_keys_and_refuses_them_elsewhere() -> None:
    assert ("space.layers_per_group / space.split_blocks: only for space.kind layerwise or methods-layerwise"
            in _problems({"kind": "global", "layers_per_group": 2, "split_blocks": True}))
    assert "space.repeats: only for space.kind dfs" in _problems({"kind": "layerwise", "repeats": 2})
    assert "space.kind evolver and sampler EvolverSampler go together (got global and EvolverSampler)" in _problems(
        {"kind": "global"}, sampler={"name": "EvolverSampler"})
    assert "'ties' has no per-model coefficient 'lambda'" in _problems({"kind": "global", "search": {"lambda": [0, 1]}})


def test_a_new_kind_is_one_class_and_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a kind makes its ``space.kind`` valid and runs its check on every config."""
    checks = dict(KIND_CHECKS)  # the registries as they are, restored after the test
    monkeypatch.setattr(kinds, "KINDS", dict(kinds.KINDS))
    monkeypatch.setattr(kinds, "KIND_CHECKS", checks)
    monkeypatch.setattr(config_module, "KIND_CHECKS", checks)
    keys = dict(KIND_KEYS)
    monkeypatch.setattr(kinds, "KIND_KEYS", keys)
    monkeypatch.setattr(config_module, "KIND_KEYS", keys)

    class ToyKind(kinds.Kind[None]):
        names: ClassVar[tuple[str, ...]] = ("toy",)
        keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"toy": ("repeats",)}

        @classmethod
        def problems(cls, config: StudyConfig) -> list[str]:
            toy = config.space.kind == "toy" and config.space.fixed
            return ["space.fixed: a toy study fixes nothing"] if toy else []

    kinds.register(ToyKind)
    config = parse_config({"name": "k", "sources": SOURCES, "space": {"kind": "toy"}})
    assert isinstance(kinds.make_kind(config), ToyKind)
    assert "space.fixed: a toy study fixes nothing" in _problems({"kind": "toy", "fixed": {"lambda": 1.0}})
    # its keys are refused where no kind reads them, with every kind that reads them named
    assert "space.repeats: only for space.kind dfs or toy" in _problems({"kind": "global", "repeats": 2})
    assert "space.repeats" not in _problems({"kind": "toy", "repeats": 2, "fixed": {"lambda": 1.0}})
    with pytest.raises(RuntimeError, match="registered twice"):
        kinds.register(ToyKind)


def test_nothing_outside_the_kinds_branches_on_a_space_kind() -> None:
    """Only the kinds and their registry (the lookup of ``space.kind`` in ``KIND_CHECKS``) read the kind."""
    branch = re.compile(r"space\.kind\s*(==|!=|\bin\b|\bnot in\b)|isinstance\([^)]*(DfsSpace|EvolverSpace|Space\b)")
    found = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
             for path in PACKAGE.rglob("*.py") if "kinds" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if branch.search(line) and "KIND_CHECKS" not in line]
    assert not found, "ask the study's Kind instead:\n" + "\n".join(found)
