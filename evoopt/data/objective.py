"""Scoring a candidate model: dev-set metrics per task, batched, on the model as it is in memory.

A scorer is built once per worker (data read and tokenised once) and called for
every candidate. :class:`ClassifierScorer` scores sequence classifiers (accuracy,
macro-F1, MSE) on fixed subsets of each task and can yield intermediate scores on
growing subsets for pruning; :class:`LmEvalScorer` scores causal LMs through
lm-evaluation-harness (evoopt's local multiple-choice tasks, or any task by name);
:class:`PerplexityScorer` scores causal LMs by perplexity on the tasks' texts.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoopt.data.corpora import load_splits
from evoopt.data.outcomes import TIED, Outcomes, TaskOutcomes
from evoopt.errors import ConfigError, EvaluationError

Scores = dict[str, float]


def macro_f1(predicted: np.ndarray, labels: np.ndarray) -> float:
    classes = np.unique(labels)
    f1 = []
    for c in classes:
        tp = float(np.sum((predicted == c) & (labels == c)))
        fp = float(np.sum((predicted == c) & (labels != c)))
        fn = float(np.sum((predicted != c) & (labels == c)))
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(f1))


def _predicted(outputs: np.ndarray) -> np.ndarray:
    """Each example's predicted label; -1 (no label, so wrong) where the model's outputs are not finite (argmax
    would name the first class: a model that gives NaN scored the first label's share)."""
    return np.where(np.isfinite(outputs).all(-1), outputs.argmax(-1), -1)


def precision(autocast: bool, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast for scoring, or nothing. The weight cache is off: with it, a weight swapped in place
    (a task's own head, ``params[name].data = head``) would be scored through the previous weight's
    bfloat16 copy (measured: TREC .827 -> .227 on minilm-cross-task)."""
    if not autocast:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


CPU_BATCH = 64  # objective.batch_size "auto" on a CPU: the default batch


def largest_batch(fits: Callable[[int], bool], *, most: int = 512) -> int:
    """The largest power of two up to ``most`` for which ``fits(size)`` holds, tried 1, 2, 4, ... until one does
    not fit; raises :class:`EvaluationError` when not even one example fits."""
    if not fits(1):
        raise EvaluationError("objective.batch_size auto: one example of objective.max_length tokens does not fit "
                              "on the device; lower objective.max_length or set dtype: bfloat16")
    size = 1
    while size * 2 <= most and fits(size * 2):
        size *= 2
    return size


def auto_batch_size(model: torch.nn.Module | None, tokenizer: Any, device: torch.device, *, max_length: int,
                    most: int = 512) -> int:
    """``objective.batch_size: auto``: :data:`CPU_BATCH` on a CPU; on a GPU, half the largest power of two (up to
    ``most``) whose float32 forward pass on inputs of ``max_length`` tokens runs without running out of memory
    (the half: headroom for what scoring adds to the forward pass, the softmax, a loss over the vocabulary,
    lm-eval's bookkeeping, and for a merge's buffers between trials)."""
    if device.type != "cuda":
        return CPU_BATCH
    if model is None:
        raise EvaluationError("objective.batch_size auto on a GPU: the first scorer needs a model to size its "
                              "batches against")
    where = next(model.parameters()).device

    @torch.no_grad()
    def fits(size: int) -> bool:
        inputs = tokenizer(["evoopt " * max_length] * size, truncation=True, max_length=max_length,
                           padding="max_length", padding_side="right", return_tensors="pt")
        try:
            model(**{k: v.to(where) for k, v in inputs.items()})
            return True
        except torch.cuda.OutOfMemoryError:  # (torch.OutOfMemoryError itself from torch 2.5; this name since 1.13)
            return False
        finally:
            torch.cuda.empty_cache()

    model.eval()
    return max(1, largest_batch(fits, most=most) // 2)


def combine(scores: Scores, weights: dict[str, float] | None = None) -> float:
    """The study's value: the (weighted) mean of the per-task scores, to 12 significant digits.

    Equal means of different task scores are then one float: (.70 + .70 + .70 + .72) / 4 is 0.7049999999999998
    in floating point and (.70 + .70 + .71 + .71) / 4 is 0.705, a last-bit difference that would break a tie
    (the Evolver keeps the parent on one; a best trial is the first among equals)."""
    weights = weights or {}
    total = math.fsum(weights.get(t, 1.0) for t in scores)
    return float(f"{math.fsum(weights.get(t, 1.0) * s for t, s in scores.items()) / total:.12g}")


def _chosen(task: str, split: str, size: int, limit: int | None, rows: Mapping[str, Sequence[int]] | None,
            ) -> np.ndarray:
    """The rows of a task's split to score: ``rows[task]`` if given, else the first ``limit``."""
    if rows is not None and task in rows:
        chosen = np.asarray(rows[task], dtype=np.int64)
        if len(chosen) and (chosen.min() < 0 or chosen.max() >= size):
            raise ConfigError(f"objective: task {task!r} has {size} examples in its {split} split; "
                              f"rows {chosen.min()}..{chosen.max()} were asked for")
    else:
        chosen = np.arange(min(limit or size, size))
    if len(chosen) == 0:
        raise ConfigError(f"objective: task {task!r} has no examples in its {split} split")
    return chosen


class ClassifierScorer:
    """Sequence-classifier scores on the first ``limit`` examples of each task's split (or on ``rows``).

    The splits are already a seeded shuffle, so the first ``limit`` rows are a fixed
    random subset. ``heads`` maps a task to the head tensors written into the model
    before it is scored on that task (settings with per-task heads). After each stage,
    ``outcomes`` holds the per-example results of the examples scored so far, and ``outputs``
    the model's outputs (probabilities; mse: values) by task, one row per example.
    """

    def __init__(self, tokenizer: Any, tasks: Sequence[str], *, split: str, limit: int | None = None,
                 stages: Sequence[int] = (), batch_size: int = 64, max_length: int = 128,
                 metric: str = "accuracy", seed: int = 0, heads: dict[str, dict[str, torch.Tensor]] | None = None,
                 device: torch.device | None = None, rows: Mapping[str, Sequence[int]] | None = None) -> None:
        self.tasks = list(tasks)
        self.metric = metric
        self.heads = heads or {}
        self.device = device or torch.device("cpu")
        self.labels: dict[str, np.ndarray] = {}
        self.ids: dict[str, np.ndarray] = {}
        self.outcomes: Outcomes | None = None
        self.outputs: dict[str, np.ndarray] = {}
        self.autocast = False  # bfloat16 autocast (see precision())
        # per task, per stage: batches (input tensors, positions of its rows)
        self.batches: dict[str, list[list[tuple[dict[str, torch.Tensor], np.ndarray]]]] = {}
        for task in self.tasks:
            split_rows = load_splits(task, seed=seed)[split]
            self.ids[task] = _chosen(task, split, len(split_rows), limit, rows)
            n = len(self.ids[task])
            selected = split_rows.select(self.ids[task])
            texts = selected["text"]
            self.labels[task] = np.asarray(selected["label"])
            cuts = [0, *[s for s in stages if s < n], n]
            staged = []
            for lo, hi in zip(cuts, cuts[1:]):
                order = sorted(range(lo, hi), key=lambda i: len(texts[i]))  # little padding per batch
                stage = []
                for start in range(0, len(order), batch_size):
                    chosen = np.asarray(order[start : start + batch_size])
                    inputs = tokenizer([texts[i] for i in chosen], padding=True, padding_side="right", truncation=True,
                                       max_length=max_length, return_tensors="pt")
                    stage.append(({k: v.to(self.device) for k, v in inputs.items()}, chosen))
                staged.append(stage)
            self.batches[task] = staged

    def size(self, task: str) -> int:
        return len(self.labels[task])

    @property
    def stage_count(self) -> int:
        return max(len(stages) for stages in self.batches.values())

    def _metric(self, outputs: np.ndarray, labels: np.ndarray) -> float:
        if self.metric == "macro_f1":
            return macro_f1(_predicted(outputs), labels)
        return float(np.mean(self._per_example(outputs, labels)))  # accuracy, mse

    @torch.no_grad()
    def staged_scores(self, model: torch.nn.Module | Sequence[torch.nn.Module]) -> Iterator[tuple[int, Scores]]:
        """Scores after each stage: (examples per task so far, {task: score}).

        A sequence of models is scored as their ensemble (mean of probabilities).
        """
        models = list(model) if isinstance(model, Sequence) else [model]
        for m in models:
            m.eval()
        outputs = {t: np.zeros((self.size(t), 0), dtype=np.float32) for t in self.tasks}
        for stage in range(self.stage_count):
            for task in self.tasks:
                if stage >= len(self.batches[task]):
                    continue
                for m in models:
                    self._use_head(m, task)
                for inputs, rows in self.batches[task][stage]:
                    out = _mean([self._forward(m, inputs).float() for m in models]).cpu().numpy()
                    if outputs[task].shape[1] == 0:
                        outputs[task] = np.zeros((self.size(task), out.shape[1]), dtype=np.float32)
                    outputs[task][rows] = out
            seen = {t: sum(len(r) for b in self.batches[t][: stage + 1] for _, r in b) for t in self.tasks}
            yield max(seen.values()), self._scored(outputs, seen)

    def ensemble_scores(self, members: Sequence[Mapping[str, np.ndarray]]) -> Scores:
        """The ensemble of models already scored here, from their ``outputs`` (each taken after its
        :meth:`scores`), with no forward pass: the mean :meth:`staged_scores` takes of a sequence of models,
        the same to the bit. ``outcomes`` and ``outputs`` are then the ensemble's."""
        outputs = {t: _mean([torch.from_numpy(m[t]) for m in members]).numpy() for t in self.tasks}
        return self._scored(outputs, {t: self.size(t) for t in self.tasks})

    def _scored(self, outputs: dict[str, np.ndarray], seen: dict[str, int]) -> Scores:
        """Keep the outputs and outcomes of the first ``seen`` examples of each task; their scores."""
        self.outputs = outputs
        self.outcomes = Outcomes(self.metric, {
            t: TaskOutcomes(self.ids[t][: seen[t]],
                            self._per_example(outputs[t][: seen[t]], self.labels[t][: seen[t]]),
                            margins=self._margins(outputs[t][: seen[t]], self.labels[t][: seen[t]]))
            for t in self.tasks})
        return {t: self._metric(outputs[t][: seen[t]], self.labels[t][: seen[t]]) for t in self.tasks}

    def _per_example(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each example's squared error (mse) or whether it was right (every other metric)."""
        if self.metric == "mse":
            if outputs.shape[-1] != 1:  # a classifier's first logit is no prediction of the label
                raise EvaluationError(f"objective.metric: mse needs regression heads (one output); the model gives "
                                      f"{outputs.shape[-1]}: use accuracy or macro_f1")
            return np.asarray((outputs[:, 0] - labels) ** 2)
        return np.asarray(_predicted(outputs) == labels)

    def _margins(self, outputs: np.ndarray, labels: np.ndarray) -> np.ndarray | None:
        """Each example's margin: the probability of its label minus the largest other (None for mse)."""
        if self.metric == "mse":
            return None
        rows = np.arange(len(labels))
        others = outputs.copy()
        others[rows, labels] = -np.inf
        margins = outputs[rows, labels] - others.max(-1)  # (a tie: the sign of _predicted's answer, argmax's first)
        margins = np.where(margins == 0, np.where(outputs.argmax(-1) == labels, TIED, -TIED), margins)
        return np.where(np.isfinite(outputs).all(-1), margins, -1.0)

    def _forward(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with precision(self.autocast, self.device):
            logits = model(**inputs).logits
        return logits if self.metric == "mse" else torch.softmax(logits.float(), -1)

    def _use_head(self, model: torch.nn.Module, task: str) -> None:
        head = self.heads.get(task)
        if head:
            params = dict(model.named_parameters())
            for name, tensor in head.items():
                # heads of different tasks differ in shape: swapped, not copied (in the model's dtype: a study
                # scored in bfloat16 has float32 heads)
                params[name].data = tensor.to(params[name].dtype)

    def scores(self, model: torch.nn.Module | Sequence[torch.nn.Module]) -> Scores:
        *_, (_, last) = self.staged_scores(model)
        return last


def _mean(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The members' mean, element by element in member order (an ensemble's probabilities): summed one member after
    another and divided by their number as the CPU divides (:func:`~evoopt.merge._pieces.divide`), the same bytes on
    any device (``torch.stack(outputs).mean(0)`` multiplied by 1 / n on a GPU; on the CPU it gave these bytes for
    up to 3 members, and differed in the last bit for some entries from 5 on: its sum keeps several accumulators)."""
    from evoopt.merge._pieces import divide

    return divide(sum(outputs[1:], outputs[0]), len(outputs))


def registered_docs(tasks: Sequence[str], manager: Any, *, split: str, seed: int) -> dict[str, list[int]]:
    """The documents of registered lm-eval tasks that ``split`` may score, by task: a permutation of a task's
    evaluation documents seeded by (``seed``, its name), the first half for dev and the rest for test.

    lm-eval gives a task one evaluation split, so without this ``limit`` and ``test_limit`` both took its first
    documents, and the test score reported beside a study's answer was partly on the documents that chose it.
    Each task is loaded once here for its size (lm-eval loads it again for every run)."""
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    if split not in ("dev", "test"):
        raise ValueError(f"split: registered lm-eval tasks have a dev and a test part, got {split!r}")
    if files := [name for name in tasks if Path(name).is_file()]:  # (lm-eval keys a task file by its task's name)
        raise ConfigError(f"objective.tasks: {', '.join(map(repr, files))}: a task file; put its folder in "
                          "objective.include_path and name its task")
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        close = {n: difflib.get_close_matches(n, manager.all_tasks, n=1) for n in unknown}
        raise ConfigError("objective.tasks: " + "; ".join(
            f"{n!r} is not a registered lm-eval task" + (f" (did you mean {close[n][0]!r}?)" if close[n] else "")
            for n in unknown) + "; `lm-eval ls tasks` lists them (objective.include_path adds a folder of your own)")
    loaded = get_task_dict(list(tasks), manager)
    parts = {}
    for name in tasks:
        task = loaded.get(name)
        if not isinstance(task, Task):
            raise ConfigError(f"objective.tasks: {name!r} is not one lm-eval task (a group?); name its tasks one by "
                              "one")
        if problem := _metric_problem(name, task) or _fewshot_problem(name, task):
            raise ConfigError(f"objective.tasks: {problem}")
        count = len(task.eval_docs)
        if count < 2:
            raise ConfigError(f"objective.tasks: {name!r} has too few documents ({count}) to split into dev and test")
        order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(count)
        parts[name] = [int(i) for i in (order[: count // 2] if split == "dev" else order[count // 2 :])]
    return parts


def _metric_problem(name: str, task: Any) -> str | None:
    """Why evoopt cannot take a task's scored metric (acc, else its first): one lm-eval aggregates over the whole task
    (mcc, f1, bleu, word_perplexity: a per-example pair, not a score), or one lower-is-better (evoopt maximises an
    lm-eval objective). None where it can."""
    aggregation, higher = task.aggregation(), task.higher_is_better()
    metric = next((m for m in ("acc", "acc_norm") if m in aggregation), next(iter(aggregation), None))
    if metric is None:
        return None
    if getattr(aggregation[metric], "__name__", "") != "mean":
        return (f"{name!r} scores {metric}, which lm-eval computes over the whole task, not as a mean of per-example "
                "scores as evoopt's fitness needs; choose a task scored by acc or exact_match")
    if not higher.get(metric, True):
        return f"{name!r} scores {metric}, lower-is-better; evoopt maximises an lm-eval objective"
    return None


def _fewshot_problem(name: str, task: Any) -> str | None:
    """Why a task's few-shot examples would leak its test half into dev: it shows ``num_fewshot`` > 0 examples,
    with their answers, drawn from the split it is scored on (no ``fewshot_split``, no training split; lm-eval's
    rule), which evoopt halves into dev and test. None where they come from elsewhere."""
    config = task.config
    if not (getattr(config, "num_fewshot", None) or 0) > 0:
        return None
    own = getattr(task, "fewshot_cfg", None)
    fewshot = getattr(own, "split", None) or getattr(config, "fewshot_split", None)
    if fewshot is None and getattr(config, "fewshot_config", None) is not None and getattr(own, "samples", None):
        return None  # (fixed examples of its own)
    if fewshot is None:
        fewshot = config.training_split if task.has_training_docs() else \
            config.validation_split if task.has_validation_docs() else config.test_split
    scored = config.test_split if task.has_test_docs() else config.validation_split
    if fewshot != scored:
        return None
    return (f"{name!r} draws its {config.num_fewshot} few-shot examples, with their answers, from the split it is "
            f"scored on ({scored!r}), which evoopt halves into dev and test: test documents would be shown in dev's "
            "prompts; give the task a fewshot_split (or training_split) of other documents, or num_fewshot: 0")


def _lm_eval_name(task: str, split: str) -> str:
    """evoopt_sms-spam_dev -> sms-spam; other tasks keep their names (a task of the user's named foo_dev too)."""
    return task.removeprefix("evoopt_").removesuffix(f"_{split}") if task.startswith("evoopt_") else task


class LmEvalScorer:
    """Causal-LM scores through lm-evaluation-harness on the in-memory model.

    ``corpora`` are written once as local tasks into ``folder``; ``tasks`` adds
    registered tasks (or tasks of ``include_path``) by name, scored on ``split``'s part of their documents
    (:func:`registered_docs`: dev and test disjoint). ``stages`` (growing numbers of
    examples per task, the corpora's tasks only): :meth:`staged_scores` scores the examples
    stage by stage, one lm-eval run per stage on the stage's new doc ids (lm-eval's ``samples``).
    """

    def __init__(self, tokenizer: Any, *, split: str, folder: Path, corpora: Sequence[str] = (),
                 tasks: Sequence[str] = (), include_path: str | None = None, limit: int | None = None,
                 batch_size: int = 16, seed: int = 0, rows: Mapping[str, Sequence[int]] | None = None,
                 stages: Sequence[int] = ()) -> None:
        from lm_eval.tasks import TaskManager

        from evoopt.data.corpora import write_lm_eval_tasks

        if stages and tasks:
            raise ConfigError("objective.fidelities: stages need evoopt's own lm-eval tasks (the setting's corpora); "
                              f"registered tasks {list(tasks)} have sizes unknown up front")
        self.tokenizer = tokenizer
        self.split = split
        self.limit = limit
        self.batch_size = batch_size
        self.seed = seed
        folder = folder / split
        self.names = list(write_lm_eval_tasks(list(corpora), folder, split=split, seed=seed, limit=limit))
        self.names += list(tasks)
        paths = [str(folder)] + ([include_path] if include_path else [])
        self.manager = TaskManager(include_path=paths, include_defaults=bool(tasks))  # the bundled index is slow
        # rows are named by task (sms-spam, or an lm-eval task's name): here by lm-eval task name
        samples = {} if rows is None else {n: [int(i) for i in rows[_lm_eval_name(n, split)]]
                                           for n in self.names if _lm_eval_name(n, split) in rows}
        for name, part in (registered_docs(tasks, self.manager, split=split, seed=seed) if tasks else {}).items():
            outside = set(samples.get(name, ())) - set(part)
            if outside:  # an estimator fitted on the first documents, before dev and test were disjoint
                raise EvaluationError(f"objective.estimate: {len(outside)} of the estimator's documents of {name!r} "
                                      f"are not in its {split} part; start a new study to fit it again")
            samples.setdefault(name, sorted(part[:limit]))
        self.samples = samples or None
        self.outcomes: Outcomes | None = None
        self.autocast = False  # bfloat16 autocast (lm-eval's own: see lm_eval_examples)
        # per stage, the doc ids each task scores in it (one stage: every example, as scores() does)
        self.stages: list[dict[str, list[int]]] = [{}]
        if stages and rows is None:
            sizes = {n: len(load_splits(_lm_eval_name(n, split).removesuffix("_gen"), seed=seed)[split])
                     for n in self.names}
            sizes = {n: min(size, limit or size) for n, size in sizes.items()}
            cuts = {n: [0, *[s for s in stages if s < size], size] for n, size in sizes.items()}
            self.stages = [{n: list(range(c[k], c[k + 1])) for n, c in cuts.items() if k + 1 < len(c)}
                           for k in range(max(len(c) for c in cuts.values()) - 1)]

    @property
    def stage_count(self) -> int:
        return len(self.stages)

    def _outcomes(self, examples: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                  ) -> dict[str, TaskOutcomes]:
        return {_lm_eval_name(name, self.split): TaskOutcomes(ids, values.astype(bool)
                                                              if np.isin(values, (0, 1)).all() else values,
                                                              margins=margins)
                for name, (ids, values, margins) in examples.items()}

    def scores(self, model: torch.nn.Module) -> Scores:
        from evoopt.data.lmeval import lm_eval_examples

        results, examples = lm_eval_examples(model, self.tokenizer, self.names, self.manager,
                                             batch_size=self.batch_size, seed=self.seed, limit=self.limit,
                                             samples=self.samples, autocast=self.autocast)
        self.outcomes = Outcomes("accuracy", self._outcomes(examples))
        return {_lm_eval_name(name, self.split): score for name, score in results.items()}

    def staged_scores(self, model: torch.nn.Module) -> Iterator[tuple[int, Scores]]:
        """Scores after each stage: (examples per task so far, {task: mean of its examples so far}); after
        the last, every example, as :meth:`scores` (lm-eval's metrics here are means over examples)."""
        if len(self.stages) == 1:
            yield max((len(ids) for ids in self.stages[0].values()), default=0), self.scores(model)
            return
        from evoopt.data.lmeval import lm_eval_examples

        seen: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]] = {}
        for stage in self.stages:
            _, examples = lm_eval_examples(model, self.tokenizer, list(stage), self.manager,
                                           batch_size=self.batch_size, seed=self.seed, samples=stage,
                                           autocast=self.autocast)
            for name, found in examples.items():
                seen.setdefault(name, []).append(found)
            self.outcomes = Outcomes("accuracy", self._outcomes(
                {n: (np.concatenate([i for i, _, _ in parts]), np.concatenate([v for _, v, _ in parts]),
                     None if any(m is None for _, _, m in parts) else np.concatenate([m for _, _, m in parts]))
                 for n, parts in seen.items()}))
            yield max(len(t.ids) for t in self.outcomes.tasks.values()), self.outcomes.scores()


class PerplexityScorer:
    """Perplexity of a causal LM on the texts of each task's split (lower is better)."""

    def __init__(self, tokenizer: Any, tasks: Sequence[str], *, split: str, limit: int | None = None,
                 batch_size: int = 16, max_length: int = 128, seed: int = 0,
                 device: torch.device | None = None, rows: Mapping[str, Sequence[int]] | None = None) -> None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.device = device or torch.device("cpu")
        self.batches: dict[str, list[dict[str, torch.Tensor]]] = {}
        self.ids: dict[str, np.ndarray] = {}
        self.outcomes: Outcomes | None = None
        self.autocast = False  # bfloat16 autocast (see precision())
        for task in tasks:
            split_rows = load_splits(task, seed=seed)[split]
            self.ids[task] = _chosen(task, split, len(split_rows), limit, rows)
            texts = split_rows.select(self.ids[task])["text"]
            self.batches[task] = [
                {k: v.to(self.device) for k, v in tokenizer(list(texts[i : i + batch_size]), padding=True,
                                                             padding_side="right", truncation=True,
                                                             max_length=max_length, return_tensors="pt").items()}
                for i in range(0, len(texts), batch_size)
            ]

    @torch.no_grad()
    def scores(self, model: torch.nn.Module) -> Scores:
        model.eval()
        examples = {}
        for task, batches in self.batches.items():
            sums, tokens = [], []  # per example: summed token loss, and its tokens
            for inputs in batches:
                with precision(self.autocast, self.device):
                    logits = model(**inputs).logits[:, :-1].float()
                target = inputs["input_ids"][:, 1:]
                mask = inputs["attention_mask"][:, 1:].bool()
                nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                sums.append((nll * mask).sum(1).cpu().numpy())
                tokens.append(mask.sum(1).cpu().numpy())
            examples[task] = TaskOutcomes(self.ids[task], np.concatenate(sums).astype(np.float32),
                                          np.concatenate(tokens).astype(np.float64))
        self.outcomes = Outcomes("perplexity", examples)
        return self.outcomes.scores()  # exp(total loss / total tokens) per task
