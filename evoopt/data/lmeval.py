"""lm-evaluation-harness on an in-memory model (imported lazily: lm-eval is heavy).

lm-eval's request cache is keyed without the model's identity, so it is never used
here: every merge candidate is a different model.
"""

from __future__ import annotations

import contextlib
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoopt.data.outcomes import TIED


@contextlib.contextmanager
def global_generators_kept() -> Iterator[None]:
    """Python's, NumPy's and torch's global generators (the CPU's and every CUDA device's) as they were, afterwards:
    for code that seeds them (torch.manual_seed seeds the CUDA devices too; lm-eval seeds all three)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count()))):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def run_lm_eval(model: Any, tokenizer: Any, tasks: list[str], manager: Any, *, batch_size: int = 16,
                seed: int = 0, limit: int | None = None) -> dict[str, float]:
    """``{task: accuracy, or exact match for generative tasks}`` of ``model`` as it is in memory."""
    return lm_eval_examples(model, tokenizer, tasks, manager, batch_size=batch_size, seed=seed, limit=limit)[0]


def lm_eval_examples(model: Any, tokenizer: Any, tasks: list[str], manager: Any, *, batch_size: int = 16,
                     seed: int = 0, limit: int | None = None, samples: dict[str, list[int]] | None = None,
                     autocast: bool = False,
                     ) -> tuple[dict[str, float], dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """The scores, and per task each example's ``doc_id``, value of the scored metric (lm-eval's
    per-sample log) and, for multiple-choice accuracy, margin (:func:`_margin`; else None). ``samples`` scores
    only those doc ids of each task (instead of ``limit``).

    ``autocast``: the forward passes and generation under bfloat16 autocast. It has to be lm-eval's own
    (``mixed_precision_dtype``): HFLM wraps every model call in ``torch.autocast(enabled=False)`` when that
    is unset, which switches off an autocast entered around ``simple_evaluate`` (measured: 0.96 x the
    float32 time, results identical, on SmolLM2-135M)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if samples:  # (lm-eval walks a task's docs in order and names the k-th one samples[k]: sorted, each once)
        samples = {task: sorted(set(ids)) for task, ids in samples.items()}

    # (under autocast the logits are bfloat16: their log-softmax in float32, as evoopt's own scorers take it, else
    # lm-eval's was bfloat16 too and every log-likelihood fell on bfloat16's grid)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
              mixed_precision_dtype=torch.bfloat16 if autocast else None,
              softmax_dtype=torch.float32 if autocast else None)
    with global_generators_kept():  # (lm-eval seeds them: the caller's states are put back after)
        results = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=None if samples else limit,
                                  samples=samples, cache_requests=False, use_cache=None, log_samples=True,
                                  random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                  fewshot_random_seed=seed, verbosity="ERROR")
    scores, examples = {}, {}
    for name in tasks:
        metrics = results["results"][name]
        key = next((k for k in ("acc,none", "acc_norm,none") if k in metrics), None)
        key = key or next(k for k, v in metrics.items() if isinstance(v, float) and "stderr" not in k)
        scores[name] = float(metrics[key])
        metric, _, filter_key = key.partition(",")
        logged = sorted((s["doc_id"], float(s[metric]), _margin(s) if metric == "acc" else None)
                        for s in results["samples"][name] if s.get("filter", filter_key) == filter_key)
        margins = [m for _, _, m in logged]
        examples[name] = (np.asarray([d for d, _, _ in logged], dtype=np.int64),
                          np.asarray([v for _, v, _ in logged], dtype=np.float32),
                          None if not logged or any(m is None for m in margins) else np.asarray(margins, np.float32))
    return scores, examples


def _margin(sample: dict[str, Any]) -> float | None:
    """A multiple-choice example's margin (as evoopt's classifier scorer keeps it, :mod:`evoopt.data.outcomes`):
    the softmax over the choices' log-likelihoods, the right choice's probability minus the largest other's;
    positive exactly where ``acc`` is 1 (a tie, as bfloat16 makes them: the smallest float32 of the sign of ``acc``,
    whose argmax takes the first of tied choices). None where the sample is not one (generated answers)."""
    try:
        lls = np.asarray([float(r[0]) for r in sample["filtered_resps"]], dtype=np.float64)
        gold = int(sample["target"])
    except (TypeError, ValueError, IndexError, KeyError):
        return None
    if len(lls) < 2 or not 0 <= gold < len(lls):
        return None
    p = np.exp(lls - lls.max())
    p /= p.sum()
    margin = float(p[gold] - np.delete(p, gold).max())
    return margin or (TIED if int(np.argmax(lls)) == gold else -TIED)


def evaluate_tasks(model: Any, tokenizer: Any, corpora: list[str], *, split: str, limit: int | None = None,
                   batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """Accuracy (exact match for generative tasks) of a causal LM on evoopt's local tasks.

    ``corpora`` are corpus names (see :mod:`evoopt.data.corpora`); their ``split`` is
    written as lm-eval tasks into a temporary folder and evaluated on ``model``
    as it is in memory. Returns ``{task name: score}``.
    """
    from lm_eval.tasks import TaskManager

    from evoopt.data.corpora import write_lm_eval_tasks

    with tempfile.TemporaryDirectory(prefix="evoopt-tasks-") as folder:
        names = write_lm_eval_tasks(corpora, Path(folder), split=split, seed=seed, limit=limit)
        manager = TaskManager(include_path=folder, include_defaults=False)  # the bundled index takes ~30 s
        return run_lm_eval(model, tokenizer, names, manager, batch_size=batch_size, seed=seed)
