"""Scoring a study's candidates: the tokenised dev (and, for reporting, test) data, built once per process.

An :class:`Evaluator` knows the study's objective and nothing of search spaces: it scores
whatever model it is handed (a merge written in place, an Evolver offspring, a data-flow
path model) on a split, reports intermediate scores to a trial's pruner, and turns per-task
scores into the objective's value.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import optuna
import torch

from evoopt.data.objective import ClassifierScorer, LmEvalScorer, PerplexityScorer, Scores, combine
from evoopt.errors import EvaluationError
from evoopt.study.config import StudyConfig
from evoopt.study.space import Sources


def task_heads(sources: Sources, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's own head (the tensors the sources exclude from merging), from its expert."""
    from evoopt.models.io import open_source, resolve_path

    heads = {}
    for task, model in zip(sources.tasks, sources.models):
        source = open_source(resolve_path(model, sources.root))
        names = [n for n in source.keys() if source.dtype(n).is_floating_point
                 and any(fnmatch.fnmatchcase(n, pattern) for pattern in sources.exclude)]
        heads[task] = {n: source.get(n).to(device) for n in names}
    return heads


def calibration_file(config: StudyConfig, sources: Sources, per_task: int = 8) -> str:
    """Training texts (never dev or test) for the statistics of Fisher and RegMean."""
    from evoopt.data.corpora import load_splits

    file = config.artifact_dir / "calibration.txt"
    lines = []
    for task in sources.tasks:
        lines += [" ".join(t.split()) for t in load_splits(task, seed=config.seed)["train"]["text"][:per_task]]
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("\n".join(lines) + "\n")
    return str(file.resolve())


class Evaluator:
    """The objective of a study: its tokenizer, per-task heads and scorers, each built on first use."""

    def __init__(self, config: StudyConfig, sources: Sources, tokenizer_folder: Path | str,
                 device: torch.device) -> None:
        from transformers import AutoTokenizer

        self.config, self.sources, self.device = config, sources, device
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.heads = task_heads(sources, device) if sources.per_task_heads else None
        self._scorers: dict[str, Any] = {}

    def scorer(self, split: str) -> Any:
        """The scorer of a split, built on first use (the test scorer only ever for reporting)."""
        if split not in self._scorers:
            o = self.config.objective
            folder = self.config.artifact_dir / "tasks"
            search = split == o.split
            limit = o.limit if search else o.test_limit
            if self.sources.kind == "causal" and o.metric == "perplexity":
                scorer: Any = PerplexityScorer(self.tokenizer, self.sources.tasks, split=split, limit=limit,
                                               batch_size=o.batch_size, max_length=o.max_length,
                                               seed=self.config.seed, device=self.device)
            elif self.sources.kind == "causal" or o.kind == "lm-eval":
                scorer = LmEvalScorer(self.tokenizer, split=split, folder=folder,
                                      corpora=[] if o.tasks else self.sources.tasks, tasks=o.tasks,
                                      include_path=o.include_path, limit=limit, batch_size=o.batch_size,
                                      seed=self.config.seed)
            else:
                scorer = ClassifierScorer(self.tokenizer, self.sources.tasks, split=split, limit=limit,
                                          stages=o.fidelities if search else (), batch_size=o.batch_size,
                                          max_length=o.max_length, metric=o.metric, seed=self.config.seed,
                                          heads=self.heads, device=self.device)
            self._scorers[split] = scorer
        return self._scorers[split]

    def value(self, scores: Scores) -> float | list[float]:
        """The objective's value: the (weighted) mean over tasks, or one value per task (multi-objective)."""
        if self.config.objective.multi_objective:
            return [scores[t] for t in sorted(scores)]
        return combine(scores, self.config.objective.weights)

    def score(self, model: torch.nn.Module | list[torch.nn.Module], split: str,
              trial: optuna.Trial | None = None) -> Scores:
        """Per-task scores; with a trial, intermediate values go to its pruner."""
        scorer = self.scorer(split)
        try:
            if trial is None or not isinstance(scorer, ClassifierScorer) or len(self.config.objective.fidelities) == 0:
                result: Scores = scorer.scores(model)
                return result
            stages = list(scorer.staged_scores(model))
            for n, scores in stages[:-1]:
                trial.report(combine(scores, self.config.objective.weights), n)
                if trial.should_prune():
                    trial.set_user_attr("scores", scores)
                    trial.set_user_attr("pruned_at", n)
                    raise optuna.TrialPruned(f"pruned after {n} examples per task")
            return stages[-1][1]
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise EvaluationError("out of memory while scoring; lower objective.batch_size or "
                                  "objective.max_length, or set dtype: bfloat16") from None
