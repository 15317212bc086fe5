"""Training loops and scoring for the experts: seeded fine-tuning of encoders (classification) and
causal LMs (answer-only loss), accuracy, and lm-eval scores of a setting's tasks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from evoopt.data.lmeval import global_generators_kept
from evoopt.data.settings import Setting, TrainConfig
from evoopt.errors import ConfigError


def score_causal(model: Any, tokenizer: Any, setting: Setting) -> dict[str, dict[str, float]]:
    """lm-eval scores on every task of the setting, dev and test: {task: {split: score}}."""
    from evoopt.data.lmeval import evaluate_tasks

    scores: dict[str, dict[str, float]] = {}
    for split in ("dev", "test"):
        results = evaluate_tasks(model, tokenizer, list(setting.tasks), split=split, limit=setting.eval_limit,
                                 batch_size=setting.train.eval_batch_size, seed=setting.data_seed)
        for task_name, score in results.items():
            key = task_name.removeprefix("evoopt_").removesuffix(f"_{split}")
            scores.setdefault(key, {})[split] = round(score, 4)
    return scores


def train_loop(model: torch.nn.Module, train: TrainConfig, examples: int,
           make_batch: Callable[[np.ndarray], dict[str, Any]],
           progress: Callable[[int, int], None] | None) -> None:
    """AdamW with linear decay; data order and dropout from explicit seeds."""
    order_rng = np.random.default_rng(train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(1, train.steps))
    model.train()
    order: np.ndarray = np.empty(0, dtype=np.int64)
    with global_generators_kept():
        torch.manual_seed(train.seed)  # dropout masks; the caller's global RNG state is restored afterwards
        for step in range(train.steps):
            if order.size < train.batch_size:
                order = np.concatenate([order, order_rng.permutation(examples)])
            batch, order = order[: train.batch_size], order[train.batch_size :]
            model(**make_batch(batch)).loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if progress:
                progress(step + 1, train.steps)
    model.eval()


def finetune_causal(model: torch.nn.Module, tokenizer: Any, prompts: list[str], answers: list[str],
                    train: TrainConfig, *, progress: Callable[[int, int], None] | None = None) -> None:
    """Full fine-tuning on prompt + answer; the loss is on the answer tokens (and EOS) only."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def make_batch(batch: np.ndarray) -> dict[str, torch.Tensor]:
        rows = []
        for i in batch:
            prompt = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
            answer = tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            room = train.max_length - len(answer)
            if room < 1:  # (prompt[-0:] kept the whole prompt, and a sequence ran past max_length)
                raise ConfigError(f"train.max_length: {train.max_length} tokens leave no room for a prompt beside "
                                  f"an answer of {len(answer)} (with its end token); raise it")
            prompt = prompt[-room:]  # keep the end of long prompts
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        return {
            "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
            "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
            "attention_mask": torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]),
        }

    train_loop(model, train, len(prompts), make_batch, progress)


def finetune(model: torch.nn.Module, tokenizer: Any, texts: list[str], labels: list[int], train: TrainConfig,
             *, progress: Callable[[int, int], None] | None = None) -> None:
    """Full fine-tuning of a sequence classifier."""

    def make_batch(batch: np.ndarray) -> dict[str, torch.Tensor]:
        inputs = tokenizer([texts[i] for i in batch], padding=True, padding_side="right", truncation=True,
                           max_length=train.max_length, return_tensors="pt")
        return {**inputs, "labels": torch.tensor([labels[i] for i in batch])}

    train_loop(model, train, len(texts), make_batch, progress)


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, tokenizer: Any, rows: Any, train: TrainConfig) -> float:
    """Accuracy of a sequence classifier on a dataset split (columns text, label)."""
    model.eval()
    texts, labels = list(rows["text"]), list(rows["label"])
    # batches of similar length waste little compute on padding
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    correct = 0
    for start in range(0, len(order), train.eval_batch_size):
        batch = order[start : start + train.eval_batch_size]
        inputs = tokenizer([texts[i] for i in batch], padding=True, padding_side="right", truncation=True,
                           max_length=train.max_length, return_tensors="pt")
        predicted = model(**inputs).logits.argmax(-1)
        correct += int((predicted == torch.tensor([labels[i] for i in batch])).sum())
    return round(correct / max(1, len(texts)), 4)
