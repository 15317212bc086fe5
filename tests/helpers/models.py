"""Tiny random models built from a config, saved as a family: a base and perturbed experts."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                    tie_word_embeddings=False)
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_bert_config(**overrides: object):  # type: ignore[no-untyped-def]
    from transformers import BertConfig

    settings = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=64, num_labels=3)
    settings.update(overrides)
    return BertConfig(**settings)


def save_family(root: Path, config: object, *, experts: int, seed: int, model_class: str = "LlamaForCausalLM",
                noise: float = 0.02) -> list[Path]:
    """Save a random base model and `experts` perturbed copies; returns [base, expert_0, ...]."""
    import transformers

    cls = getattr(transformers, model_class)
    model = cls(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    paths = [root / "base"]
    model.save_pretrained(paths[0])
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(experts):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(base_state[name] + torch.randn(p.shape, generator=g) * noise)
        paths.append(root / f"expert_{i}")
        model.save_pretrained(paths[-1])
    return paths
