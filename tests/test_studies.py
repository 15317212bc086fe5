"""Every file in studies/ validates: merge recipes and study configs, naming real settings and members."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evoopt.data.experts import get_setting
from evoopt.merge.recipe import load_recipe
from evoopt.models.io import open_source, resolve_path
from evoopt.study.config import load_config
from evoopt.study.kinds import make_kind

STUDIES = sorted((Path(__file__).parents[1] / "studies").glob("*.yaml"))


def _marked(path: Path) -> object:
    """Slow: a layer-wise study on a GGUF model (SmolLM2), whose blocks are listed by converting the real model."""
    data = yaml.safe_load(path.read_text())
    layerwise = (data.get("space") or {}).get("kind") == "layerwise" and data.get("setting")
    if layerwise and get_setting(data["setting"]).base.endswith(".gguf"):
        return pytest.param(path, marks=pytest.mark.slow)
    return path


@pytest.mark.parametrize("path", [_marked(p) for p in STUDIES], ids=lambda p: p.name)
def test_study_file_is_valid(path: Path) -> None:
    if "method" in yaml.safe_load(path.read_text()):  # a merge recipe (`evoopt merge`)
        recipe = load_recipe(path)
    else:  # a study config (`evoopt run`): its space decodes to a recipe without building any expert
        config = load_config(path)
        if config.space.kind == "dfs":  # its pool: experts of the setting, or other studies' files
            _check_pool(config, path)
            return
        names = None
        if config.space.kind == "layerwise":  # the blocks of the setting's pretrained model, plus a head
            pretrained = open_source(resolve_path(get_setting(config.setting or "").base))
            names = [*pretrained.keys(), "classifier.weight"]
        kind = make_kind(config)
        recipe = (kind.make_space(names) if names else kind.space).default()
        assert config.objective.split == "dev"
    for reference in [recipe.base or "", *(m.model for m in recipe.models)]:
        if reference.startswith("expert:"):
            setting, _, member = reference.removeprefix("expert:").partition("/")
            assert member in ("base", "mtl", *get_setting(setting).tasks), reference


def _check_pool(config, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Names only: DfsSpace reads each pool model's layer count, which would build the experts."""
    assert config.objective.split == "dev" and config.space.pool
    for reference in config.space.pool:
        if reference.startswith("study:"):
            other = load_config(path.parent / reference.removeprefix("study:"))
            assert other.setting == config.setting and other.space.kind != "dfs", reference
        else:
            setting, _, member = reference.removeprefix("expert:").partition("/")
            assert reference.startswith("expert:") and member in get_setting(setting).tasks, reference


def test_there_are_studies_on_both_main_settings() -> None:
    settings = {yaml.safe_load(p.read_text()).get("setting") for p in STUDIES}
    assert {"minilm-sentiment-domains", "smollm2-tasks"} <= settings


def test_a_recipe_and_a_study_config_given_to_each_other_name_the_right_command(tmp_path: Path) -> None:
    from evoopt.errors import ConfigError, RecipeError

    recipe = next(p for p in STUDIES if "method" in yaml.safe_load(p.read_text()))
    study = next(p for p in STUDIES if "method" not in yaml.safe_load(p.read_text()))
    with pytest.raises(ConfigError, match=r"this is a merge recipe \(method, models\), not a study config; merge it "
                                          r"with `evoopt merge RECIPE --out DIR`"):
        load_config(recipe)
    with pytest.raises(RecipeError, match=r"this is a study config \(name, space, ...\), not a merge recipe; run it "
                                          r"with `evoopt run STUDY`"):
        load_recipe(study)
