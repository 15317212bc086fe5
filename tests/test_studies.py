"""Every recipe in studies/ validates, and its expert: references name real settings and members."""

from __future__ import annotations

from pathlib import Path

import pytest

from evoopt.experts import get_setting
from evoopt.recipe import load_recipe

STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_study_recipe_is_valid(path: Path) -> None:
    recipe = load_recipe(path)
    for reference in [recipe.base or "", *(m.model for m in recipe.models)]:
        if reference.startswith("expert:"):
            setting, _, member = reference.removeprefix("expert:").partition("/")
            assert member in ("base", "mtl", *get_setting(setting).tasks), reference


def test_there_are_studies() -> None:
    assert STUDIES
