"""Scoring a study's candidates: the tokenised dev (and, for reporting, test) data, built once per process.

An :class:`Evaluator` knows the study's objective and nothing of search spaces: it scores
whatever model it is handed (a merge written in place, an Evolver offspring, a data-flow
path model) on a split, reports intermediate scores to a trial's pruner, and turns per-task
scores into the objective's value.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import torch

from evoopt.data.estimate import Estimator
from evoopt.data.objective import ClassifierScorer, LmEvalScorer, PerplexityScorer, Scores, auto_batch_size, combine
from evoopt.data.outcomes import Outcomes, paired_decision, record_outcomes
from evoopt.errors import EvaluationError
from evoopt.models.io import atomic_write
from evoopt.study.config import StudyConfig
from evoopt.study.space import Sources
from evoopt.study.storage import best_index, better


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
        lines += [" ".join(t.split()) for t in load_splits(task, seed=sources.data_seed)["train"]["text"][:per_task]]
    atomic_write(file, "\n".join(lines) + "\n")  # (workers rewrite it while others may read it)
    return str(file.resolve())


class Evaluator:
    """The objective of a study: its tokenizer, per-task heads and scorers, each built on first use.

    With an ``estimator`` (``objective.estimate``), trials are scored on its examples of the search
    split and their full-dev scores estimated; with ``autocast``, trials are scored under bfloat16
    autocast. Scoring without a trial (baselines, reports) reads the whole split in float32.
    """

    def __init__(self, config: StudyConfig, sources: Sources, tokenizer_folder: Path | str,
                 device: torch.device, estimator: Estimator | None = None, *, autocast: bool = False,
                 pending: Callable[[], Estimator | None] | None = None) -> None:
        from transformers import AutoTokenizer

        self.config, self.sources, self.device, self.estimator = config, sources, device, estimator
        self._pending = pending  # the study's estimator once its reference trials are known
        self.autocast = autocast
        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.heads = task_heads(sources, device) if sources.per_task_heads else None
        self._scorers: dict[str, Any] = {}
        self._batch_size: int | None = None

    def batch_size(self, model: torch.nn.Module | list[torch.nn.Module] | None = None) -> int:
        """``objective.batch_size``; ``auto`` is sized once per worker, against the first model scored (see
        :func:`auto_batch_size`: on a GPU it depends on the device's free memory, so workers may differ)."""
        o = self.config.objective
        if o.batch_size != "auto":
            return o.batch_size
        if self._batch_size is None:
            first = model[0] if isinstance(model, list) else model
            self._batch_size = auto_batch_size(first, self.tokenizer, self.device, max_length=o.max_length)
        return self._batch_size

    def scorer(self, split: str, *, estimated: bool = False,
               model: torch.nn.Module | list[torch.nn.Module] | None = None) -> Any:
        """The scorer of a split, built on first use (the test scorer only ever for reporting); ``estimated``:
        the one of the estimator's examples; ``model``: the one to size ``batch_size: auto`` against."""
        key = f"{split}:estimated" if estimated else split
        if key not in self._scorers:
            o = self.config.objective
            batch_size = self.batch_size(model)
            folder = self.config.artifact_dir / ("tasks-estimated" if estimated else "tasks")
            search = split == o.split
            limit = o.limit if search else o.test_limit
            rows = self.estimator.rows if estimated and self.estimator is not None else None
            if self.sources.kind == "causal" and o.metric == "perplexity":
                scorer: Any = PerplexityScorer(self.tokenizer, self.sources.tasks, split=split, limit=limit,
                                               batch_size=batch_size, max_length=o.max_length,
                                               seed=self.sources.data_seed, device=self.device, rows=rows)
            elif self.sources.kind == "causal" or o.kind == "lm-eval":
                scorer = LmEvalScorer(self.tokenizer, split=split, folder=folder,
                                      corpora=[] if o.tasks else self.sources.tasks, tasks=o.tasks,
                                      include_path=o.include_path and str(self.config.root / o.include_path),
                                      limit=limit, batch_size=batch_size,
                                      seed=self.sources.data_seed, rows=rows,
                                      stages=o.fidelities if search and not estimated else ())
            else:
                scorer = ClassifierScorer(self.tokenizer, self.sources.tasks, split=split, limit=limit,
                                          stages=o.fidelities if search else (), batch_size=batch_size,
                                          max_length=o.max_length, metric=o.metric, seed=self.sources.data_seed,
                                          heads=self.heads, device=self.device, rows=rows)
            self._scorers[key] = scorer
        return self._scorers[key]

    def value(self, scores: Scores) -> float | list[float]:
        """The objective's value: the (weighted) mean over tasks, or one value per task (multi-objective)."""
        if self.config.objective.multi_objective:
            return [scores[t] for t in sorted(scores)]
        return combine(scores, self.config.objective.weights)

    def outcomes(self, split: str) -> Outcomes | None:
        """The per-example outcomes of the last model scored on ``split`` (of the examples scored so far)."""
        return self.scorer(split).outcomes if split in self._scorers else None

    def score(self, model: torch.nn.Module | list[torch.nn.Module], split: str,
              trial: optuna.Trial | None = None, *, autocast: bool | None = None,
              rival: tuple[Outcomes, float] | None = None) -> Scores:
        """Per-task scores; with a trial, intermediate values go to its pruner, and the trial keeps its
        per-example outcomes (those scored before a pruning too). ``autocast`` overrides the precision
        (default: the study's for trials, float32 otherwise). ``rival`` (its outcomes and a test level):
        the paired selection rule against it decides the trial (see :func:`paired_decision`)."""
        autocast = (self.autocast and trial is not None) if autocast is None else autocast
        try:
            if trial is not None and split == self.config.objective.split and self._estimator() is not None:
                return self._estimated(model, split, trial, autocast)
            scorer = self.scorer(split, model=model)
            scorer.autocast = autocast
            if trial is None:
                result: Scores = scorer.scores(model)
                return result
            return self._staged(scorer, model, trial, rival)
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError itself from torch 2.5; this name since 1.13)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            cut = "" if self.config.objective.kind == "lm-eval" else " or objective.max_length"  # (lm-eval: prompts
            # are scored whole)
            raise EvaluationError(f"out of memory while scoring; lower objective.batch_size{cut}, or set dtype: "
                                  "bfloat16") from None

    def _estimator(self) -> Estimator | None:
        if self.estimator is None and self._pending is not None:
            self.estimator = self._pending()
        return self.estimator

    def _staged(self, scorer: Any, model: torch.nn.Module | list[torch.nn.Module], trial: optuna.Trial,
                rival: tuple[Outcomes, float] | None) -> Scores:
        """Score a trial stage by stage (``objective.fidelities``; one stage without them, or for scorers
        without stages), keeping the outcomes scored so far on the trial. After each stage but the last,
        the trial stops (pruned, scoring nothing more) when its pruner says so, or, with a ``rival``, once
        the paired rule rejects it; at the last stage the paired rule accepts or rejects it (``selection``)."""
        staged = hasattr(scorer, "staged_scores")  # classifiers and lm-eval; perplexity in one stage
        last = scorer.stage_count - 1 if staged else 0
        results = scorer.staged_scores(model) if staged else iter([(0, scorer.scores(model))])
        maximize = self.config.directions[0] == "maximize"
        for stage, (n, scores) in enumerate(results):
            record_outcomes(trial, scorer.outcomes)  # what a paired pruner (RacingPruner) or rule compares
            if rival is not None:
                decided, record = paired_decision(scorer.outcomes, rival[0], maximize=maximize, alpha=rival[1],
                                                  final=stage == last, weights=self.config.objective.weights)
                if decided is not None:
                    trial.set_user_attr("selection", record)
                stop, why = decided == "rejected", f"rejected after {n} examples per task: worse than its target"
            elif stage < last:
                trial.report(combine(scores, self.config.objective.weights), n)
                stop, why = trial.should_prune(), f"pruned after {n} examples per task"
            if stage == last:
                return scores
            if stop:
                trial.set_user_attr("scores", scores)
                trial.set_user_attr("pruned_at", n)
                raise optuna.TrialPruned(why)
        raise AssertionError("unreachable: the scorer yields a last stage")

    def _estimated(self, model: torch.nn.Module | list[torch.nn.Module], split: str, trial: optuna.Trial,
                   autocast: bool) -> Scores:
        """Score the estimator's examples; the trial keeps their outcomes, the raw subset scores and how it
        was scored, and its scores are the estimated full-split ones. A trial promoted by
        ``objective.estimate.promote_within`` (:meth:`_promotion`) is then scored on the whole split: it keeps
        those outcomes, its scores are the whole-split ones, and ``promoted`` records its estimate and the bar."""
        assert self.estimator is not None
        scorer = self.scorer(split, estimated=True, model=model)
        scorer.autocast = autocast
        subset = scorer.scores(model)
        record_outcomes(trial, scorer.outcomes)
        trial.set_user_attr("subset_scores", subset)
        how = {"method": self.estimator.method, "examples": self.estimator.size,
               "of": sum(t.size for t in self.estimator.tasks.values())}
        estimated = self.estimator.estimate(scorer.outcomes)
        promotion = self._promotion(trial, combine(estimated, self.config.objective.weights))
        if promotion is None:
            trial.set_user_attr("estimated", how)
            return estimated
        whole = self.scorer(split, model=model)
        whole.autocast = autocast
        scores: Scores = whole.scores(model)
        record_outcomes(trial, whole.outcomes)
        trial.set_user_attr("promoted", {**how, **promotion})
        return scores

    def _promotion(self, trial: optuna.Trial, estimate: float) -> dict[str, Any] | None:
        """``objective.estimate.promote_within``: whether an estimated trial is scored on the whole split as well.
        It is when its estimate is better than the best whole-split value of the study's complete trials so far
        (reference, promoted, or scored before the estimator), or within ``promote_within`` of it; the first
        estimated trial of a study with none always is. Returns the estimate and the best it was held against
        (``best``, ``bar``: that trial's number and value), None when the trial is not promoted."""
        spec = self.config.objective.estimate
        if spec is None or spec.promote_within is None:
            return None
        maximize = self.config.directions[0] == "maximize"
        whole = [t for t in trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                 if t.value is not None and "estimated" not in t.user_attrs]
        if not whole:
            return {"estimate": estimate, "best": None, "bar": None}
        best = whole[best_index([float(t.value) for t in whole], maximize=maximize)]  # type: ignore[arg-type]
        bar = float(best.value)  # type: ignore[arg-type]
        reach = bar - spec.promote_within if maximize else bar + spec.promote_within
        if estimate == reach or better(estimate, reach, maximize=maximize):
            return {"estimate": estimate, "best": best.number, "bar": bar}
        return None
