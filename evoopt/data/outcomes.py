"""Per-example outcomes of a scored candidate: which dev examples it got right, or its loss on each.

A score is a mean over examples. Keeping each example's own result lets two candidates be
compared on the same examples (paired tests), lets a few examples stand for the whole dev set
(estimated fitness), and lets a score be recomputed on any subset afterwards.

An example is named by its task and its position in the task's seeded split (the rows the
scorers read, :func:`evoopt.data.corpora.load_splits`; lm-eval's ``doc_id`` for evoopt's local
tasks). Values by metric:

- ``accuracy``, ``macro_f1``, lm-eval tasks: correct or not (bit-packed when stored; an lm-eval
  metric that is not 0/1 per example is kept as a float);
- ``mse``: the squared error (float16 when stored; float32 where a value is past float16's 65504);
- ``perplexity``: the example's summed token negative log-likelihood (float16 or, past 65504, float32)
  and its token count (uint16), so the perplexity of any subset is ``exp(sum nll / sum tokens)``.

Beside correctness, evoopt's classifier scorer keeps each example's **margin**: the probability of the
right label minus the largest other label's, in [-1, 1], positive exactly where the example is right. It
says how near an example is to flipping, which a single bit cannot: the ``mixture`` estimator fits a
candidate to the reference models on it (:mod:`evoopt.data.estimate`). Stored as int8 (steps of 1/127).

Stored (:func:`encode`), 1,200 examples take about 200 bytes for correctness (1.8 kB with margins) and
3.2 kB for losses (6.4 kB with perplexity's token counts), in JSON-safe base64.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna

from evoopt.errors import EvooptError

LOSSES = ("mse", "perplexity")  # per-example losses; every other metric keeps correctness
TIED = float(np.finfo(np.float32).tiny)  # the margin of an example tied with another answer, signed as its correctness


@dataclass
class TaskOutcomes:
    """One task's examples: their ids (positions in the task's split) and values."""

    ids: np.ndarray  # int64
    values: np.ndarray  # bool (correct) or float32 (loss)
    weights: np.ndarray | None = None  # perplexity: token counts
    margins: np.ndarray | None = None  # classifiers: p(right label) - max p(other label), float32 in [-1, 1]

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.values = np.asarray(self.values)
        if self.margins is not None:
            self.margins = np.asarray(self.margins, dtype=np.float32)
        if len(self.ids) != len(self.values) or any(extra is not None and len(extra) != len(self.ids)
                                                    for extra in (self.weights, self.margins)):
            raise ValueError(f"outcomes: {len(self.ids)} ids for {len(self.values)} values")

    def select(self, ids: np.ndarray) -> TaskOutcomes:
        """The outcomes of ``ids`` (each must be present), in that order."""
        where = {int(i): k for k, i in enumerate(self.ids)}
        try:
            index = np.asarray([where[int(i)] for i in ids], dtype=np.int64)
        except KeyError as missing:
            raise EvooptError(f"outcomes: example {missing} was not scored") from None
        return TaskOutcomes(self.ids[index], self.values[index],
                            None if self.weights is None else self.weights[index],
                            None if self.margins is None else self.margins[index])


@dataclass
class Outcomes:
    """Per-example outcomes of one candidate on one split, per task."""

    metric: str
    tasks: dict[str, TaskOutcomes] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(t.ids) for t in self.tasks.values())

    def score(self, task: str, weights: np.ndarray | None = None) -> float:
        """The task's metric over its examples (``weights``: one per example, e.g. an estimator's).

        Accuracy and mse are (weighted) means; perplexity is ``exp(sum w nll / sum w tokens)``.
        Macro-F1 needs the predictions, not correctness: it cannot be recomputed from outcomes.
        """
        t = self.tasks[task]
        w = np.ones(len(t.ids)) if weights is None else np.asarray(weights, dtype=np.float64)
        if self.metric == "perplexity":
            assert t.weights is not None
            tokens = np.sum(w * t.weights)
            return float(np.exp(np.sum(w * t.values) / tokens)) if tokens else 1.0  # no token, no loss
        if self.metric == "macro_f1":
            raise EvooptError("outcomes: macro-F1 cannot be recomputed from per-example correctness")
        return float(np.sum(w * t.values.astype(np.float64)) / np.sum(w))

    def scores(self) -> dict[str, float]:
        return {task: self.score(task) for task in self.tasks}

    def select(self, ids: Mapping[str, np.ndarray]) -> Outcomes:
        """The outcomes of some examples of some tasks."""
        return Outcomes(self.metric, {task: self.tasks[task].select(np.asarray(chosen))
                                      for task, chosen in ids.items()})

    def ids(self) -> dict[str, np.ndarray]:
        return {task: t.ids for task, t in self.tasks.items()}


def _shared(a: Outcomes, b: Outcomes) -> dict[str, tuple[TaskOutcomes, TaskOutcomes]]:
    """Per task, the outcomes of ``a`` and ``b`` on the examples both scored (in ``a``'s order; the tasks too: a
    set's order, and so the paired test's sums, changed with the process's hash seed)."""
    out = {}
    for task in [t for t in a.tasks if t in b.tasks]:
        mine = a.tasks[task]
        ids = mine.ids[np.isin(mine.ids, b.tasks[task].ids)]
        out[task] = (mine.select(ids), b.tasks[task].select(ids))
    return out


def paired(a: Outcomes, b: Outcomes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per task, the values of ``a`` and ``b`` on the examples both scored (in ``a``'s order)."""
    return {task: (x.values.astype(np.float64), y.values.astype(np.float64)) for task, (x, y) in _shared(a, b).items()}


def paired_test(candidate: Outcomes, incumbent: Outcomes, *, maximize: bool,
                weights: dict[str, float] | None = None) -> tuple[float, float, int]:
    """A one-sided paired test on the examples both scored (see :mod:`evoopt.search.racing` for its derivation):
    the p-value that ``candidate`` is worse than ``incumbent`` on those examples, with the estimated difference of
    their scores (positive: candidate better in the study's direction) and the number of shared examples per task
    (the smallest, of the tasks tested). See :func:`_paired_tails` for the tasks tested and the exact cases."""
    p_worse, _, better, shared = _paired_tails(candidate, incumbent, maximize=maximize, weights=weights)
    return p_worse, better, shared


def _paired_tails(candidate: Outcomes, incumbent: Outcomes, *, maximize: bool,
                  weights: dict[str, float] | None) -> tuple[float, float, float, int]:
    """Both one-sided p-values of the paired test (candidate worse, candidate better), the difference and the
    number of shared examples per task.

    A task with fewer than 2 shared examples is left out (no variance to estimate); the weights of the others are
    normalised among them. Nothing left: undecided, both p-values 0.5, difference 0, 0 examples.

    Right-or-wrong outcomes (0/1): only the examples the two disagree on say anything, and with few of them the
    normal approximation on the sample variance is far too sure (3 disagreements all one way: p = .036 where the
    exact test gives .125). McNemar's test instead, conditional on the disagreements: under no difference each
    one favours either side with probability 1/2. Where every task with disagreements weighs the same per example
    (one task; or equal sizes and weights), exactly: of the ``n`` disagreements ``k`` favour the candidate,
    ``K ~ Binomial(n, 1/2)``, p(worse) = P(K <= k) and p(better) = P(K >= k) (``n`` all one way: 2^-n); else
    D = sum_t c_t (k_t - (n_t - k_t)) with c_t = w_t / (shared examples of t), normal with the null variance
    sum_t c_t^2 n_t and a continuity correction of half the smallest step (min c_t). No disagreement: undecided.

    Losses: ``t = D / sqrt(V)`` with V = sum_t w_t^2 s_t^2 / n_t, against Student's t with Welch-Satterthwaite's
    degrees of freedom V^2 / sum_t (w_t^2 s_t^2 / n_t)^2 / (n_t - 1) (the normal's tail was too sure on few
    examples). Where every tested task's differences are constant (no variance), a sign test as for right-or-wrong
    outcomes, each non-zero difference weighing w_t |d_t| / n_t, so that the side it favours is the side of D (an
    unweighted count let two examples worse by 1.0 lose to fifty better by 0.01). A non-finite loss (an inf mse, a
    perplexity past float64) decides by the sign of D alone: an infinite difference is certain, an undefined one
    (inf - inf) is never better.

    Perplexity: the study's value is the mean of the tasks' perplexities exp(sum nll / T), not of the examples'
    summed losses, so each example's difference of summed losses is scaled to its share of its task's perplexity
    difference: by n_t (ppl_c - ppl_b) / (S_c - S_b), the secant between the two summed losses S on the shared
    examples (computed as n_t ppl_b expm1(dS / T) / dS; n_t ppl_b / T where dS = 0), so that D is exactly the
    weighted difference of the tasks' perplexities. Unscaled, a task of high perplexity counted as little per nat
    as one of low perplexity; scaled by the incumbent's slope alone (the delta method), exp's convexity overstated
    a task that improved against one that got worse, and a candidate worse by the study's value could test
    better."""
    shared_outcomes = {task: pair for task, pair in _shared(candidate, incumbent).items() if len(pair[0].ids) >= 2}
    if not shared_outcomes:
        return 0.5, 0.5, 0.0, 0
    given = weights or {}
    total = sum(given.get(t, 1.0) for t in shared_outcomes)
    share = {task: given.get(task, 1.0) / total for task in shared_outcomes}
    shared = min(len(c.ids) for c, _ in shared_outcomes.values())
    perplexity = incumbent.metric == "perplexity"
    with np.errstate(over="ignore", invalid="ignore"):
        gaps = {task: _value(c, perplexity) - _value(b, perplexity) for task, (c, b) in shared_outcomes.items()}
    if not all(math.isfinite(g) for g in gaps.values()):  # (an inf loss; sums of inf - inf are NaN: not better)
        gap = math.fsum(share[task] * g for task, g in gaps.items())
        better = gap if maximize else -gap
        return (1.0, 0.0, better, shared) if better > 0 else (0.0, 1.0, better, shared) if better < 0 \
            else (0.5, 1.0, better, shared)
    pairs = {task: (c.values.astype(np.float64), b.values.astype(np.float64))
             for task, (c, b) in shared_outcomes.items()}
    scales = {task: _perplexity_scale(c, b) for task, (c, b) in shared_outcomes.items()} if perplexity else {}
    differences = {task: (c - b) * scales.get(task, 1.0) for task, (c, b) in pairs.items()}
    difference, variance, spread = 0.0, 0.0, 0.0
    for task, d in differences.items():
        term = share[task] ** 2 * float(d.var(ddof=1)) / len(d)
        difference += share[task] * float(d.mean())
        variance += term
        spread += term**2 / (len(d) - 1)
    better = difference if maximize else -difference
    if candidate.metric not in LOSSES and all(np.isin(c, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()
                                              for c, b in pairs.values()):
        per_example = {task: share[task] / len(d) for task, d in differences.items()}
        return (*_mcnemar(differences, per_example, maximize=maximize), better, shared)
    if variance > 0.0:
        t = -better / math.sqrt(variance)  # positive: worse
        p_worse = _student_sf(t, variance**2 / spread)  # Welch-Satterthwaite's degrees of freedom
        return p_worse, 1.0 - p_worse, better, shared
    per_example = {task: share[task] * abs(float(d[0])) / len(d) for task, d in differences.items()}
    return (*_mcnemar(differences, per_example, maximize=maximize), better, shared)


def _value(outcomes: TaskOutcomes, perplexity: bool) -> float:
    """A task's value on some examples: the mean of their values, or the perplexity of their losses."""
    values = outcomes.values.astype(np.float64)
    if not perplexity:
        return float(values.mean())
    tokens = float(np.sum(outcomes.weights)) if outcomes.weights is not None else 0.0
    return float(np.exp(values.sum() / tokens)) if tokens > 0 else 1.0  # (no token, no loss: as Outcomes.score)


def _student_sf(t: float, df: float) -> float:
    """P(T >= t) for Student's t with ``df`` degrees of freedom: 1/2 I_x(df/2, 1/2) at x = df / (df + t^2) for
    t >= 0 (Abramowitz & Stegun 26.7.1 and 26.5.27). The normal's tail was too sure on few examples: 12 % of
    equal candidates found worse at level 0.05 on 3 shared examples, 8 % on 5."""
    tail = 0.5 * _beta_regularized(df / (df + t * t), df / 2.0, 0.5)
    return tail if t >= 0 else 1.0 - tail


def _beta_regularized(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz's method;
    Numerical Recipes, 3rd ed., section 6.4), on the side of x where it converges fast."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _beta_regularized(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * fraction


def _binomial_tails(n: int, k: int) -> tuple[float, float]:
    """P(K <= k) and P(K >= k) for K ~ Binomial(n, 1/2); (0.5, 0.5) for n = 0 (undecided)."""
    if n == 0:
        return 0.5, 0.5
    log_half = n * math.log(0.5)
    pmf = [math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + log_half) for i in range(n + 1)]
    return min(1.0, math.fsum(pmf[: k + 1])), min(1.0, math.fsum(pmf[k:]))


def _mcnemar(differences: Mapping[str, np.ndarray], per_example: Mapping[str, float], *,
             maximize: bool) -> tuple[float, float]:
    """McNemar's test of right-or-wrong outcomes, weighted by task (see :func:`_paired_tails`): p(worse),
    p(better)."""
    sign = 1.0 if maximize else -1.0
    counts = {task: (int(np.count_nonzero(d)), int(np.sum(sign * d > 0))) for task, d in differences.items()}
    steps = {per_example[task] for task, (n, _) in counts.items() if n}
    if len(steps) <= 1:  # one weight per example: exact
        return _binomial_tails(sum(n for n, _ in counts.values()), sum(k for _, k in counts.values()))
    favour = sum(per_example[task] * (2 * k - n) for task, (n, k) in counts.items())
    deviation = math.sqrt(sum(per_example[task] ** 2 * n for task, (n, _) in counts.items()))
    half_step = min(steps)
    p_worse = 0.5 * math.erfc(-(favour + half_step) / deviation / math.sqrt(2))  # P(S <= favour)
    p_better = 0.5 * math.erfc((favour - half_step) / deviation / math.sqrt(2))  # P(S >= favour)
    return min(1.0, p_worse), min(1.0, p_better)


def _perplexity_scale(candidate: TaskOutcomes, incumbent: TaskOutcomes) -> float:
    """n (ppl_c - ppl_b) / (S_c - S_b) on the examples both scored (see :func:`_paired_tails`); 1 without tokens."""
    tokens = float(np.sum(incumbent.weights)) if incumbent.weights is not None else 0.0
    if tokens <= 0:
        return 1.0
    n = len(incumbent.ids)
    incumbent_ppl = math.exp(float(np.sum(incumbent.values, dtype=np.float64)) / tokens)
    change = float(np.sum(candidate.values.astype(np.float64) - incumbent.values.astype(np.float64)))
    if change == 0.0:
        return n * incumbent_ppl / tokens
    return n * incumbent_ppl * math.expm1(change / tokens) / change


def paired_decision(candidate: Outcomes, rival: Outcomes, *, maximize: bool, alpha: float, final: bool,
                    weights: dict[str, float] | None = None) -> tuple[str | None, dict[str, Any]]:
    """The paired selection rule after a stage of scoring: ``rejected`` as soon as the candidate is worse than
    its rival at level ``alpha``; at the final stage ``accepted`` only if it is better at that level, else
    ``rejected`` (undecided, e.g. no shared examples, is not better); None: score more examples. Returns the
    decision and its record."""
    p_worse, p_better, better, shared = _paired_tails(candidate, rival, maximize=maximize, weights=weights)
    decided = "rejected" if p_worse < alpha else ("accepted" if p_better < alpha else "rejected") if final else None
    return decided, {"decided": decided, "examples": shared, "difference": round(better, 6),
                     "p_worse": round(p_worse, 6), "p_better": round(p_better, 6), "alpha": alpha}


def challenge_in_turn(incumbent: int, challengers: Sequence[int], outcomes: Mapping[int, Outcomes],
                      scores: Mapping[int, float], *, maximize: bool, alpha: float,
                      weights: dict[str, float] | None = None) -> tuple[int, list[dict[str, Any]]]:
    """The paired answer rule, challenger by challenger: each takes the incumbent's place only when it is better
    by :func:`paired_decision` at its final stage (a one-sided paired test at level ``alpha``), and the next
    challenges whichever holds the place then. Where either has no kept ``outcomes`` the better of ``scores``
    holds it (no test). Returns the last incumbent and each test's record (``challenger``, ``incumbent``, then
    :func:`paired_decision`'s)."""
    records = []
    for challenger in challengers:
        if challenger in outcomes and incumbent in outcomes:
            decided, record = paired_decision(outcomes[challenger], outcomes[incumbent], maximize=maximize,
                                              alpha=alpha, final=True, weights=weights)
            records.append({"challenger": challenger, "incumbent": incumbent, **record})
            taken = decided == "accepted"
        else:
            taken = scores[challenger] > scores[incumbent] if maximize else scores[challenger] < scores[incumbent]
        if taken:
            incumbent = challenger
    return incumbent, records


# --- storage: JSON-safe and compact ------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def pack_bits(values: np.ndarray) -> str:
    """Right-or-wrong values, bit-packed and base64 (1,200 examples: 200 characters)."""
    return _b64(np.packbits(np.asarray(values, dtype=bool)).tobytes())


def unpack_bits(text: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(_unb64(text), dtype=np.uint8))[:count].astype(bool)


def pack_margins(margins: np.ndarray) -> str:
    """Margins in [-1, 1] as int8 in steps of 1/127, base64 (1,200 examples: 1,600 characters). The sign is
    kept: a right example's margin never rounds to a wrong one's."""
    m = np.clip(np.asarray(margins, dtype=np.float64), -1.0, 1.0)
    q = np.round(m * 127)
    q = np.where((q == 0) & (m > 0), 1, np.where((q == 0) & (m < 0), -1, q))
    return _b64(q.astype(np.int8).tobytes())


def unpack_margins(text: str) -> np.ndarray:
    return np.frombuffer(_unb64(text), dtype=np.int8).astype(np.float32) / 127


def _encode_ids(ids: np.ndarray) -> str:
    if len(ids) and np.array_equal(ids, np.arange(ids[0], ids[0] + len(ids))):
        return f"range:{int(ids[0])}:{int(ids[0]) + len(ids)}"  # the first n rows: the usual case
    if len(ids) == 0:
        return "range:0:0"
    dtype = np.uint16 if int(ids.max()) < 2**16 else np.uint32
    return f"{np.dtype(dtype).name}:{_b64(ids.astype(dtype).tobytes())}"


def _decode_ids(text: str) -> np.ndarray:
    kind, _, rest = text.partition(":")
    if kind == "range":
        low, high = (int(x) for x in rest.split(":"))
        return np.arange(low, high, dtype=np.int64)
    return np.frombuffer(_unb64(rest), dtype=np.dtype(kind)).astype(np.int64)


def encode(outcomes: Outcomes) -> dict[str, Any]:
    """A JSON-safe form: correctness bit-packed, losses as float16 (float32 where one would overflow float16:
    a long text's summed loss under a poor candidate), token counts as uint16."""
    tasks: dict[str, Any] = {}
    for task, t in outcomes.tasks.items():
        item = {"ids": _encode_ids(t.ids)}
        if t.values.dtype == np.bool_:
            item["bits"] = pack_bits(t.values)
        else:
            with np.errstate(over="ignore"):  # (a value past float16's range: inf here, kept as float32 then)
                half = t.values.astype(np.float16)
            if np.isfinite(half).sum() == np.isfinite(t.values).sum():
                item["f16"] = _b64(half.tobytes())
            else:
                item["f32"] = _b64(t.values.astype(np.float32).tobytes())
        if t.weights is not None:
            item["tokens"] = _b64(np.minimum(t.weights, 2**16 - 1).astype(np.uint16).tobytes())
        if t.margins is not None:
            item["margins"] = pack_margins(t.margins)
        tasks[task] = item
    return {"metric": outcomes.metric, "tasks": tasks}


def decode(data: Mapping[str, Any]) -> Outcomes:
    tasks = {}
    for task, item in data["tasks"].items():
        ids = _decode_ids(item["ids"])
        if "bits" in item:
            values = unpack_bits(item["bits"], len(ids))
        else:
            half = "f16" in item
            values = np.frombuffer(_unb64(item["f16" if half else "f32"]),
                                   dtype=np.float16 if half else np.float32).astype(np.float32)
        weights = (np.frombuffer(_unb64(item["tokens"]), dtype=np.uint16).astype(np.float64)
                   if "tokens" in item else None)
        tasks[task] = TaskOutcomes(ids, values, weights, unpack_margins(item["margins"]) if "margins" in item else None)
    return Outcomes(str(data["metric"]), tasks)


# --- on a trial --------------------------------------------------------------------------------------

OUTCOMES_ATTR = "evoopt:outcomes"  # a trial's per-example outcomes on the search split (a system attribute)


def record_outcomes(trial: optuna.Trial, outcomes: Outcomes | None) -> None:
    """Keep a trial's per-example outcomes (a system attribute: compact, not shown as a user attribute)."""
    if outcomes is not None:
        trial.study._storage.set_trial_system_attr(trial._trial_id, OUTCOMES_ATTR, encode(outcomes))


def trial_outcomes(trial: optuna.trial.FrozenTrial) -> Outcomes | None:
    """The trial's per-example outcomes, if it kept them (trials of studies made before they were kept do not)."""
    stored = trial.system_attrs.get(OUTCOMES_ATTR)
    return None if stored is None else decode(stored)
