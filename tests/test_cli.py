"""The `evoopt` command line on tiny models."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from evoopt.cli import main


def _write(tmp_path: Path, recipe: dict[str, object]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_exports_a_model(llama_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {
        "method": "dare_ties", "base": str(llama_family[0]), "seed": 3,
        "models": [{"model": str(p), "parameters": {"weight": 0.4, "density": 0.5}} for p in llama_family[1:]],
    })
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "dare_ties" in result.output and "tensors merged" in result.output
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_bad_recipe_fails_cleanly_and_writes_nothing(llama_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {"method": "ties", "models": [{"model": str(llama_family[1]),
                                                              "parameters": {"density": 2}}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "density: must be in (0, 1], got 2" in result.output and "base:" in result.output
    assert not (tmp_path / "out").exists()


def test_mismatched_models_fail_cleanly(llama_family: list[Path], bert_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {"method": "linear", "models": [{"model": str(llama_family[0])},
                                                              {"model": str(bert_family[0])}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "cannot be merged" in result.output
    assert not (tmp_path / "out").exists()


def test_methods_lists_registry() -> None:
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0 and "model_stock" in result.output and "regmean" in result.output


def test_help_explains() -> None:
    result = CliRunner().invoke(main, ["merge", "--help"])
    assert result.exit_code == 0 and "--overwrite" in result.output and "pkg:" in result.output
