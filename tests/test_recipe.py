"""Recipe validation: every problem at once, with its key path; per-group coefficients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evoopt.errors import ModelSourceError
from evoopt.merge.recipe import RecipeError, load_recipe, parse_recipe, tensor_group


def test_unknown_method_lists_known() -> None:
    with pytest.raises(RecipeError, match="unknown merge method 'tie'.*dare_ties.*ties"):
        parse_recipe({"method": "tie", "base": "b", "models": [{"model": "a"}]})


def test_all_problems_reported_at_once() -> None:
    with pytest.raises(RecipeError) as error:
        parse_recipe({
            "method": "ties",
            "models": [{"model": "a", "parameters": {"density": 1.5, "weigth": 1}},
                       {"model": "b", "parameters": {"density": "high"}}],
            "dtype": "float8",
            "colour": "blue",
        })
    text = str(error.value)
    with pytest.raises(RecipeError, match=r"models\[1\]\.paramters: unknown key; did you mean 'parameters'\?"):
        parse_recipe({"method": "linear", "models": [{"model": "a"}, {"model": "b", "paramters": {"weight": 1}}]})
    for expected in ("dtype:", "colour: unknown key; known: method, base, models, parameters, dtype, ",
                     "models[0].parameters.weigth",
                     "models[0].parameters.density: must be in (0, 1], got 1.5",
                     "base: method 'ties' needs a base"):
        assert expected in text, (expected, text)


def test_model_entries_must_have_model_key() -> None:
    with pytest.raises(RecipeError, match=r"models\[0\]\.model: Field required"):
        parse_recipe({"method": "linear", "models": [{"path": "a"}]})


def test_density_zero_is_refused_and_one_allowed() -> None:
    with pytest.raises(RecipeError, match=r"density: must be in \(0, 1\], got 0"):
        parse_recipe({"method": "ties", "base": "b", "models": [{"model": "a", "parameters": {"density": 0}}]})
    parse_recipe({"method": "ties", "base": "b", "models": [{"model": "a", "parameters": {"density": 1}}]})


def test_slerp_takes_one_model_and_fisher_needs_calibration() -> None:
    with pytest.raises(RecipeError, match="models: .slerp. takes exactly 1 model besides its base, got 2"):
        parse_recipe({"method": "slerp", "base": "b", "models": [{"model": "a"}, {"model": "c"}]})
    with pytest.raises(RecipeError, match="calibration"):
        parse_recipe({"method": "fisher", "models": [{"model": "a"}, {"model": "c"}]})


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: None, "texts.txt does not exist"),
    (lambda p: p.mkdir(), "texts.txt is a folder; give a text file, one text a line"),
    (lambda p: p.write_bytes("caf\xe9 au lait\n".encode("latin-1")), "texts.txt is not UTF-8 text .* at byte 3"),
    (lambda p: p.write_text("\n  \n"), "texts.txt holds no non-empty lines"),
])
def test_calibration_texts_that_cannot_be_read_say_why(tmp_path: Path, make: Any, message: str) -> None:
    from evoopt.merge.merger import calibration_batches

    make(tmp_path / "texts.txt")
    recipe = parse_recipe({"method": "fisher", "models": [{"model": "a"}, {"model": "c"}],
                           "calibration": {"texts": "texts.txt"}}, root=tmp_path)
    with pytest.raises(RecipeError, match=f"calibration.texts: .*{message}"):
        calibration_batches(recipe, tmp_path)


def test_missing_calibration_texts_are_named_before_any_source_is_opened(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The texts were read after the models were opened and the target loaded (an expert: trained first)."""
    import evoopt.merge.merger as merger

    opened: list[Any] = []
    monkeypatch.setattr(merger, "open_source", lambda path: opened.append(path))
    for name in ("a", "c"):
        (tmp_path / name).mkdir()
    recipe = parse_recipe({"method": "fisher", "models": [{"model": "a"}, {"model": "c"}],
                           "calibration": {"texts": "texts.txt"}}, root=tmp_path)
    with pytest.raises(ModelSourceError, match=r"calibration.texts: .*texts.txt does not exist"):
        merger._open_sources(recipe)
    assert not opened


def test_coefficients_in_range_alone_but_not_together_are_refused_with_the_recipe() -> None:
    """Each was a raw ValueError from the merge, after the sources' preprocessing."""
    two = [{"model": "a", "parameters": {"density": 0.9}}, {"model": "c", "parameters": {"density": {"*": 0.5}}}]
    with pytest.raises(RecipeError, match=r"models\[0\].parameters: density 0.9 \+- epsilon 0.15 must stay in "
                                          r"\(0, 1\)") as caught:
        parse_recipe({"method": "della", "base": "b", "models": two})
    assert "models[1]" not in str(caught.value)
    with pytest.raises(RecipeError, match=r"parameters.common_fraction: must be in \(0, 1\], got 0"):
        parse_recipe({"method": "iso_cts", "base": "b", "models": two[1:] * 2,
                      "parameters": {"common_fraction": 0}})
    with pytest.raises(RecipeError, match="models: the weights sum to 0, and normalize: true divides by their sum"):
        parse_recipe({"method": "linear", "models": [{"model": "a", "parameters": {"weight": 1}},
                                                     {"model": "c", "parameters": {"weight": -1}}]})
    with pytest.raises(RecipeError, match="models: the weights sum to 0, and Fisher merging divides by their sum"):
        parse_recipe({"method": "fisher", "models": [{"model": "a", "parameters": {"weight": 0}},
                                                     {"model": "c", "parameters": {"weight": 0}}],
                      "calibration": {"texts": "t.txt"}})
    with pytest.raises(RecipeError, match=r"models\[0\].parameters.epsilon: must be >= 0, got -0.2"):
        parse_recipe({"method": "della", "base": "b", "models": [{"model": "a", "parameters": {
            "density": 0.5, "epsilon": -0.2}}]})
    parse_recipe({"method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": "a", "parameters": {"weight": 1}}, {"model": "c", "parameters": {"weight": -1}}]})


def test_per_group_coefficients() -> None:
    recipe = parse_recipe({
        "method": "ties", "base": "b",
        "models": [{"model": "a", "parameters": {"density": {"layers.0[0-1]": 0.2, "embed": 0.9, "*": 0.5}}},
                   {"model": "c"}],
        "parameters": {"weight": 0.3, "density": 0.7},
    })
    assert recipe.coefficients("model.layers.1.mlp.up_proj.weight", 2)["density"] == [0.2, 0.7]
    assert recipe.coefficients("model.layers.12.mlp.up_proj.weight", 2)["density"] == [0.5, 0.7]
    assert recipe.coefficients("model.embed_tokens.weight", 2) == {
        "weight": [0.3, 0.3], "density": [0.9, 0.7], "scale": 1.0, "normalize": True}


def test_unmatched_group_is_an_error() -> None:
    recipe = parse_recipe({"method": "ties", "base": "b",
                           "models": [{"model": "a", "parameters": {"density": {"layers.*": 0.2}}}]})
    with pytest.raises(RecipeError, match="no pattern matches tensor 'lm_head.weight'.*'\\*'"):
        recipe.coefficients("lm_head.weight", 1)


@pytest.mark.parametrize(("name", "group"), [
    ("model.embed_tokens.weight", "embed"),
    ("model.layers.7.self_attn.q_proj.weight", "layers.07"),
    ("bert.encoder.layer.11.output.dense.bias", "layers.11"),
    ("transformer.h.3.attn.c_attn.weight", "layers.03"),
    ("model.norm.weight", "norm"),
    ("lm_head.weight", "head"),
    ("classifier.weight", "head"),
    ("bert.embeddings.LayerNorm.weight", "embed"),
])
def test_tensor_groups(name: str, group: str) -> None:
    assert tensor_group(name) == group


def test_load_recipe_resolves_relative_to_file(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("method: linear\nmodels:\n  - model: a\n")
    assert load_recipe(tmp_path / "r.yaml").root == tmp_path.resolve()
    (tmp_path / "bad.yaml").write_text("method: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


@pytest.mark.parametrize(("text", "message"), [
    (b"", r"r.yaml: the recipe file is empty; write its keys"),
    (b"method: linear\nmodels: []\nmethod: ties\n", r"not valid YAML \(key 'method' is given twice; keep one"),
    (b"method: lin\xe9ar\n", r"r.yaml: not UTF-8 text .*; save the recipe file as UTF-8"),
    (b"name: s\nsetting: minilm-sentiment-domains\nspace: {method: ties}\n",
     r"this is a study config \(name, space, ...\), not a merge recipe; run it with `evoopt run STUDY`"),
], ids=["empty", "key twice", "not UTF-8", "a study config"])
def test_a_file_that_is_no_recipe_says_why(tmp_path: Path, text: bytes, message: str) -> None:
    (tmp_path / "r.yaml").write_bytes(text)
    with pytest.raises(RecipeError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_yaml_merge_keys_may_repeat_a_key_on_purpose(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("method: linear\nmodels:\n  - model: a\n    parameters: {<<: {weight: 0.5}, "
                                     "weight: 0.7}\n")
    assert load_recipe(tmp_path / "r.yaml").models[0].parameters == {"weight": 0.7}


def test_numbers_in_exponent_notation_are_numbers(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 5e-1 and 1.5e0 as text; a recipe, and a study config's options, read them as YAML 1.2
    does."""
    (tmp_path / "r.yaml").write_text("method: linear\nmodels:\n  - {model: a, parameters: {weight: 5e-1}}\n"
                                     "  - {model: b, parameters: {weight: 1.5e0}}\n  - {model: c, parameters: "
                                     "{weight: '5e-1'}}\n")
    with pytest.raises(RecipeError, match=r"^[^\n]*1 problem\(s\):\n  - models\[2\]\.parameters\.weight: expected a "
                                          r"number, got '5e-1'$"):
        load_recipe(tmp_path / "r.yaml")  # quoted: text, as the user wrote it
    (tmp_path / "r.yaml").write_text("method: linear\nmodels:\n  - {model: a, parameters: {weight: 5e-1}}\n"
                                     "  - {model: b, parameters: {weight: 1.5e0}}\n")
    assert [m.parameters["weight"] for m in load_recipe(tmp_path / "r.yaml").models] == [0.5, 1.5]
    # text that only looks like a number stays text (it raised float's ValueError)
    (tmp_path / "r.yaml").write_text("method: linear\nmodels:\n  - {model: a, parameters: {weight: ._e3}}\n"
                                     "  - {model: b, parameters: {weight: .5e0}}\n")
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters\.weight: expected a number, got '\._e3'$"):
        load_recipe(tmp_path / "r.yaml")
