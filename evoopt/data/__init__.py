"""Data: the corpora and their splits (:mod:`~evoopt.data.corpora`), lm-eval tasks, the benchmark
settings, the experts and their training, and the objectives that score a model on a split.

The corpora's functions are re-exported here (``from evoopt.data import write_lm_eval_tasks``).
"""

from __future__ import annotations

from evoopt.data.corpora import (
    SPLITS,
    Corpus,
    get_corpus,
    load_splits,
    mc_prompt,
    read_corpus,
    split_examples,
    write_lm_eval_tasks,
)

__all__ = ["SPLITS", "Corpus", "get_corpus", "load_splits", "mc_prompt", "read_corpus", "split_examples",
           "write_lm_eval_tasks"]
