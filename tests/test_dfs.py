"""Data-flow-space path models on tiny Llama models: against materialised references, with caches and padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evoopt.models.paths import LayerPath, decode_path, decoder_layers, path_model
from tests.helpers.models import tiny_llama_config


def _pool(llama_family: list[Path]) -> list[torch.nn.Module]:
    from transformers import LlamaForCausalLM

    return [LlamaForCausalLM.from_pretrained(str(p)).eval() for p in llama_family[1:3]]


def _materialised(pool: list[torch.nn.Module], path: LayerPath) -> torch.nn.Module:
    """The reference: a plain Llama with copies of the path's layers, scales as forward pre-hooks."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=len(path.hops))).eval()
    state = {k: v for k, v in pool[0].state_dict().items() if not k.startswith("model.layers.")}
    for t, (m, layer) in enumerate(path.hops):
        prefix = f"model.layers.{layer}."
        state.update({f"model.layers.{t}.{k.removeprefix(prefix)}": v for k, v in pool[m].state_dict().items()
                      if k.startswith(prefix)})
    model.load_state_dict(state)
    for block, scale in zip(model.model.layers, path.scales):
        block.register_forward_pre_hook(lambda mod, args, kwargs, s=scale: ((args[0] * s, *args[1:]), kwargs)
                                        if args else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}),
                                        with_kwargs=True)
    return model


IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2]])
PATH = LayerPath(hops=((0, 0), (1, 0), (0, 1), (1, 0), (1, 1)), scales=(1.0, 0.8, 1.3, 0.5, 1.1))


def test_own_layers_in_order_are_the_model_itself(llama_family: list[Path]) -> None:
    pool = _pool(llama_family)
    model = path_model(pool, LayerPath(((0, 0), (0, 1)), (1.0, 1.0)))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, pool[0](IDS).logits)


def test_a_path_across_models_with_repeats_and_scales_matches_its_materialised_model(llama_family: list[Path]) -> None:
    pool = _pool(llama_family)
    model = path_model(pool, PATH)
    reference = _materialised(pool, PATH)
    with torch.no_grad():
        got, want = model(IDS).logits, reference(IDS).logits
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(got, pool[0](IDS).logits, atol=1e-3)  # (the path does change the model)
    # no weight copied, the pool untouched
    assert model.model.layers[1].layer.self_attn.q_proj.weight is decoder_layers(pool[1])[0].self_attn.q_proj.weight
    assert model.model.layers[3].layer.self_attn.layer_idx == 3 and decoder_layers(pool[1])[0].self_attn.layer_idx == 0
    assert pool[0].config.num_hidden_layers == 2 and len(decoder_layers(pool[0])) == 2


def test_cache_slots_per_hop_give_the_uncached_tokens(llama_family: list[Path]) -> None:
    pool = _pool(llama_family)
    model = path_model(pool, PATH)
    with torch.no_grad():
        cached = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(IDS, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
        assert torch.equal(cached, uncached)
        # one step with the cache of the prefix equals the full forward's last position
        prefix = model(IDS[:, :-1], use_cache=True)
        step = model(IDS[:, -1:], past_key_values=prefix.past_key_values, use_cache=True).logits[:, -1]
        assert torch.allclose(step, model(IDS).logits[:, -1], atol=1e-5)


def test_left_padded_batch_matches_single_examples(llama_family: list[Path]) -> None:
    pool = _pool(llama_family)
    model = path_model(pool, PATH)
    short = torch.tensor([[9, 4, 33]])
    batch = torch.tensor([[0] * 5 + [9, 4, 33], IDS[0].tolist()])
    mask = torch.tensor([[0] * 5 + [1] * 3, [1] * 8])
    with torch.no_grad():
        both = model(batch, attention_mask=mask).logits
        assert torch.allclose(both[0, 5:], model(short).logits[0], atol=1e-5)
        assert torch.allclose(both[1], model(IDS).logits[0], atol=1e-5)


def test_bad_paths_are_named(llama_family: list[Path]) -> None:
    pool = _pool(llama_family)
    with pytest.raises(ValueError, match=r"hops\[1\]: model 0 has layers 0..1, not 5"):
        path_model(pool, LayerPath(((0, 0), (0, 5)), (1.0, 1.0)))
    with pytest.raises(ValueError, match=r"hops\[0\]: model 3 is not in the pool"):
        path_model(pool, LayerPath(((3, 0),), (1.0,)))
    with pytest.raises(ValueError, match="scales: one per hop"):
        LayerPath(((0, 0),), (1.0, 2.0))
    with pytest.raises(TypeError, match="keeps no decoder blocks in model.layers"):
        path_model([torch.nn.Linear(2, 2)], LayerPath(((0, 0),), (1.0,)))


def test_indicators_and_scaling_matrix_decode_to_a_path_by_hand() -> None:
    # two models of two layers: M = 4, layout (0,0) (0,1) (1,0) (1,1), repeated r = 2 times: T = 8 slots
    indicators = [1.0, -1.0, 0.5, 0.0, -1.0, 2.0, 1.0, -0.5]  # slots 0, 2, 5, 6 -> layers 0, 2, 1, 2
    scales = [[10 * i + j for j in range(4)] for i in range(5)]  # scales[i][j] = 10 i + j; row 4: embeddings
    path = decode_path(indicators, scales, [2, 2])
    assert path.hops == ((0, 0), (1, 0), (0, 1), (1, 0))
    # embeddings -> 0: W[4][0] = 40; 0 -> 2: W[0][2] = 2; 2 -> 1: W[2][1] = 21; 1 -> 2: W[1][2] = 12
    assert path.scales == (40.0, 2.0, 21.0, 12.0)
    with pytest.raises(ValueError, match="no slot is on the path"):
        decode_path([-1.0] * 8, scales, [2, 2])
    with pytest.raises(ValueError, match="a multiple of M = 4"):
        decode_path([1.0] * 6, scales, [2, 2])
    with pytest.raises(ValueError, match=r"an \(M \+ 1\) x M = 5 x 4 matrix"):
        decode_path([1.0] * 8, scales[:4], [2, 2])


def test_a_pool_of_other_layer_settings_is_refused() -> None:
    """A path runs every layer with pool[0]'s config: models of one width but other layer shapes ran until the
    export failed; other rotary or norm settings ran silently with pool[0]'s. GPT-2's per-index attention scale
    moves with a layer's place on the path (and the export rebuilt it from the new index)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    for change in ({"intermediate_size": 48}, {"rms_norm_eps": 1e-5}, {"num_key_value_heads": 4}):
        other = LlamaForCausalLM(tiny_llama_config(**change)).eval()
        key = next(iter(change))
        with pytest.raises(ValueError, match=rf"pool: the models' {key} differ \(pool\[0\]: .*, pool\[1\]: .*\); "
                                             "a path runs every layer with the first model's settings"):
            path_model([base, other], PATH)
    path_model([base, LlamaForCausalLM(tiny_llama_config()).eval()], PATH)
    scaled = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        scale_attn_by_inverse_layer_idx=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx is set"):
        path_model([GPT2LMHeadModel(scaled).eval()] * 2, PATH)


def test_gpt2_paths_match_a_materialised_model_with_and_without_cache(tmp_path: Path) -> None:
    """GPT-2 keeps its blocks in transformer.h and adds positions before them: the same path model works."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from evoopt.models.paths import export_path

    config = GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    pool = [GPT2LMHeadModel(config).eval() for _ in range(2)]
    model = path_model(pool, PATH)
    reference = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=len(PATH.hops), n_head=4,
                                           n_positions=64)).eval()
    state = {k: v for k, v in pool[0].state_dict().items() if not k.startswith("transformer.h.")}
    for t, (m, layer) in enumerate(PATH.hops):
        prefix = f"transformer.h.{layer}."
        state.update({f"transformer.h.{t}.{k.removeprefix(prefix)}": v for k, v in pool[m].state_dict().items()
                      if k.startswith(prefix)})
    reference.load_state_dict(state, strict=False)
    for block, scale in zip(reference.transformer.h, PATH.scales):
        block.register_forward_pre_hook(lambda mod, args, kwargs, s=scale: ((args[0] * s, *args[1:]), kwargs)
                                        if args else (args, {**kwargs, "hidden_states": kwargs["hidden_states"] * s}),
                                        with_kwargs=True)
    with torch.no_grad():
        assert torch.allclose(model(IDS).logits, reference(IDS).logits, atol=1e-6, rtol=1e-5)
        cached = model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        assert torch.equal(cached, model.generate(IDS, max_new_tokens=6, do_sample=False, use_cache=False,
                                                  pad_token_id=0))
    # the source's generation settings go with it (several end tokens: a generative task stopped elsewhere)
    pool[0].generation_config.eos_token_id = [2, 7]
    pool[0].generation_config.do_sample, pool[0].generation_config.temperature = True, 0.3
    out = export_path(pool, PATH, tmp_path / "gpt2", tokenizer_from=None, card="", info={})
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
    assert reloaded.generation_config.eos_token_id == [2, 7] and reloaded.generation_config.temperature == 0.3
