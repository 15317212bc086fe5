"""Estimated fitness: score a candidate on a few informative dev examples, estimate its full-dev score.

Fitted once per study from the per-example outcomes of reference models on the whole dev set
(the sources and baselines, :mod:`evoopt.data.outcomes`), per task; then every candidate is
scored on the chosen examples only. Five estimators:

``random``
    A uniform random subset of ``k`` examples, each of weight 1: the reference every other
    estimator must beat.

``anchor``
    Anchor points (Vivek et al., "Anchor Points: Benchmarking Models with Much Fewer Examples",
    EACL 2024, Sec. 3; used by tinyBenchmarks, Polo et al., ICML 2024, Sec. 3.1): each example is
    embedded by the reference models' results on it, the examples are clustered (k-means), and
    each cluster is represented by its medoid, weighted by the cluster's size; the estimate is the
    weighted score of the anchors (Eq. 1 of Vivek et al.). Deliberate difference: with few
    reference models many examples share one pattern, so there are fewer distinct clusters than
    anchors; the ``k`` anchor slots are then shared out among the clusters in proportion to their
    size times the spread of the references' results inside them, plus 0.05 so that a cluster
    every reference agrees on still counts (Neyman allocation of stratified sampling; at least one
    slot each, largest remainder), the medoid first and the rest drawn at random from the cluster,
    each anchor weighted by its cluster's size over its slots. With ``k`` distinct clusters this is
    exactly one medoid per cluster.

``strata``
    Anchor points over the examples the references disagree on, with the examples every reference
    gets right (or every one gets wrong) as a known stratum, counted at that shared result and
    never scored (stratified estimation with a stratum taken as known: Cochran, "Sampling
    Techniques", 1977, Sec. 5.2, the stratified mean, a stratum's variance taken as 0). The
    estimate of a task is ``(known + sum_j w_j y_j) / N``: ``known`` the number of agreed examples
    all references get right, the anchors' weights summing to the number of contested examples.
    So every slot goes where candidates can differ. The assumption is that a candidate agrees with
    all references where they agree: plausible for merges of the same experts once the references
    include a study's first trials (``references``), less so from a few baselines. Right-or-wrong
    outcomes only (with losses no two models agree exactly: ``anchor`` is used); where fewer
    examples are contested than the share, only those are scored. Measured (``benchmarks/fitness_cost.py``, 20
    reference trials) at 10 % of dev: tau 0.82, 0.78 and 0.84 on minilm-sentiment-domains, smollm2-tasks and
    minilm-cross-task, against anchor points' 0.81, 0.72 and 0.83.

``mixture``
    The examples ``strata`` chooses, and the candidate taken as a mixture of the reference models: a
    weight per reference (on the simplex) fitted to the candidate's results on the chosen examples, and
    each other example predicted as the weighted share of references that get it right. The estimate
    of a task is ``(sum_S y_j + sum_i w_i R_i) / N``, ``R_i`` the number of other examples reference
    ``i`` gets right: the observed examples at face value and the rest predicted, as the p-IRT
    estimate below (Polo et al. 2024, Eq. 3.3). After MERGE3 (Mencattini et al., "MERGE3: Efficient
    Evolutionary Merging on Consumer-grade GPUs", ICML 2025, Sec. 3, mp-IRT: a merged model's ability
    is a linear combination of its endpoint models' abilities, the combination fitted by maximum
    likelihood on the reduced dataset). Deliberate difference: the combination is of the references'
    per-example results (a finite mixture, each reference right or wrong on each example up to a
    slip ``eps`` = 0.05), not of abilities in an IRT model, and the references are the baselines and
    a study's first trials, not only the endpoints; the weights are the maximum a posteriori of a
    symmetric Dirichlet prior (0.05 pseudo-observations per reference, which shrinks the noisy fits of
    few examples toward the plain average), by EM (Dempster, Laird and Rubin 1977). Right-or-wrong
    outcomes only.

    **On margins** (where the references and the candidate keep them: evoopt's classifier scorer and lm-eval's
    multiple choice do, :mod:`evoopt.data.outcomes`; a generated-answer task is fitted on bits): a bit says
    only which side of the boundary an example fell on, a margin ``m`` (the right label's probability minus
    the largest other's) how far. The candidate's margins are
    fitted as a combination of the references' on the chosen examples, ``m_j ~ sum_i w_i M_ij + e_j`` with
    ``w >= 0`` by least squares (:func:`nonnegative_least_squares`) and ``e_j ~ N(0, sd^2)``, ``sd`` the
    fit's residual; an unscored example is right with probability ``Phi(sum_i w_i M_ij / sd)``, and the
    estimate of a task is ``(sum_S y_j + sum_{j not in S} Phi(...)) / N`` (:func:`margin_mixture`).
    The same combination of the references, fitted on numbers instead of bits. The weights need not sum
    to 1: a merge's margins need not lie on its references' scale. Iso-CTS's flat spectrum leaves it less
    sure of its answers than any TIES-family merge (its weights sum to about 0.3 on minilm-cross-task's experts
    before the data revision of 2026-12-06), unnormalised DARE-TIES surer (1.9). On the simplex (the first version,
    kept for estimators stored without ``combination``) such a candidate fits badly, its error scale is large and
    its unscored examples are pulled toward one half: from the 8 baselines alone at 20 % of dev, Iso-CTS
    candidates of the method search were estimated 7.9 points low and the method search's 97 candidates ranked
    at tau 0.73 (a random 20 % subset: 0.86); with ``w >= 0``, -1.3 points and 0.90
    (``benchmarks/fitness_candidates.py`` on ``benchmarks/fitness_search.py``'s full-dev runs, 2026-12-05). A free
    sum is also closer to MERGE3's linear combination of abilities than the simplex was.

    Measured (``benchmarks/fitness_cost.py``, 20 reference trials, judged on the other 80 candidates; the runs
    of 2026-12-05 and 12-06) at 5 / 10 / 20 % of dev, on margins: tau 0.77 / 0.89 / 0.93 on
    minilm-sentiment-domains, 0.91 / 0.93 / 0.95 on minilm-cross-task and 0.72 / 0.87 / 0.89 on smollm2-tasks,
    where a random half of dev reaches 0.66, 0.94 and 0.79; on right-or-wrong outcomes 0.66 / 0.87 / 0.92,
    0.76 / 0.82 / 0.87 and 0.69 / 0.81 / 0.83. From the baselines alone at 10 %: 0.75, 0.90 and 0.83 on
    margins, and on bits 0.62, 0.82 and 0.81, no better than strata (0.71, 0.80, 0.80): a mixture of a few
    fixed merges predicts a search's candidates less well than one that includes the search's first trials.

``irt``
    Item response theory (tinyBenchmarks, Polo et al. 2024, Sec. 3.2-3.3): a two-parameter
    logistic model ``P(example j right | model i) = sigmoid(alpha_j * theta_i - beta_j)`` fitted
    to the reference outcomes (maximum a posteriori, standard normal priors on theta and beta,
    log-normal on alpha, by Adam in torch; a small fit of our own, tested on simulated data with
    known parameters); anchors are chosen by clustering the examples' (alpha, beta), and a
    candidate's score is the p-IRT estimate (their Eq. 3.3): with ``lambda = |S| / N``,
    ``lambda * mean_S(y) + (1 - lambda) * mean_{j not in S} sigmoid(alpha_j theta_hat - beta_j)``,
    ``theta_hat`` the candidate's ability fitted on the anchors' results ``y``. Correctness only.

Fitting reads dev only; the fitted estimator (its examples, weights and item parameters) is
plain data (:meth:`Estimator.to_dict`), stored once in the study so every worker and a resumed
study use the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evoopt.data.outcomes import LOSSES, Outcomes, pack_bits, pack_margins, unpack_bits, unpack_margins
from evoopt.errors import ConfigError

METHODS = ("anchor", "strata", "mixture", "irt", "random")


@dataclass
class TaskEstimator:
    """One task's chosen examples (positions in its split) and their weights; for IRT, every example's item
    parameters."""

    ids: np.ndarray
    weights: np.ndarray
    size: int  # examples of the task's full dev set
    alpha: np.ndarray | None = None  # irt: per example of the full dev set, aligned with all_ids
    beta: np.ndarray | None = None
    all_ids: np.ndarray | None = None  # irt: the full dev set's ids, aligned with alpha and beta
    known: float = 0.0  # strata: the agreed examples' summed shared result (how many all references get right)
    known_count: int = 0  # strata: how many examples every reference agrees on (not scored)
    seen: np.ndarray | None = None  # mixture: each reference's results on the chosen examples (references x ids)
    rest: np.ndarray | None = None  # mixture: how many of the task's other examples each reference gets right
    margins: np.ndarray | None = None  # mixture: each reference's margins on every example (references x all_ids)


@dataclass
class Estimator:
    method: str
    tasks: dict[str, TaskEstimator] = field(default_factory=dict)
    combination: str = "cone"  # mixture on margins: the weights w >= 0 ("cone") or on the simplex (stored before)

    @property
    def rows(self) -> dict[str, list[int]]:
        """The examples to score, per task (what a scorer's ``rows`` takes)."""
        return {task: t.ids.tolist() for task, t in self.tasks.items()}

    @property
    def size(self) -> int:
        return sum(len(t.ids) for t in self.tasks.values())

    def estimate(self, outcomes: Outcomes) -> dict[str, float]:
        """Per task, the estimated full-dev score of a candidate from its outcomes on the chosen examples."""
        scores = {}
        for task, t in self.tasks.items():
            observed = outcomes.select({task: t.ids})
            if self.method == "mixture":
                assert t.seen is not None and t.rest is not None
                got = observed.tasks[task]
                y = got.values.astype(np.float64)
                if t.margins is not None and got.margins is not None:
                    assert t.all_ids is not None
                    scores[task] = (float(y.sum()) + margin_mixture(t.margins, _positions(t.all_ids, t.ids),
                                                                    _stored(got.margins),
                                                                    combination=self.combination)) / t.size
                else:  # right-or-wrong only (references or candidate without margins)
                    scores[task] = (float(y.sum()) + float(mixture_weights(t.seen, y) @ t.rest)) / t.size
                continue
            if self.method != "irt":
                score = observed.score(task, t.weights)
                if t.known_count:  # strata: the anchors stand for the contested examples, sum(weights) of them
                    scored = float(np.sum(t.weights))
                    score = (score * scored + t.known) / (scored + t.known_count)
                scores[task] = score
                continue
            assert t.alpha is not None and t.beta is not None and t.all_ids is not None
            y = observed.tasks[task].values.astype(np.float64)
            index = _positions(t.all_ids, t.ids)
            unseen = np.ones(len(t.all_ids), dtype=bool)
            unseen[index] = False
            theta = fit_ability(y, t.alpha[index], t.beta[index])
            scores[task] = p_irt(y, theta, t.alpha[unseen], t.beta[unseen])
        return scores

    def weights(self, outcomes: Outcomes) -> dict[str, np.ndarray]:
        """``mixture`` on margins: per task, the candidate's weights on the references (:func:`margin_weights`, the
        fit :meth:`estimate` predicts its unscored examples with); tasks without margins are left out."""
        found = {}
        for task, t in self.tasks.items():
            got = outcomes.select({task: t.ids}).tasks[task]
            if self.method == "mixture" and t.margins is not None and t.all_ids is not None and got.margins is not None:
                found[task] = margin_weights(t.margins, _positions(t.all_ids, t.ids), _stored(got.margins),
                                             combination=self.combination)
        return found

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "combination": self.combination, "tasks": {}}
        for task, t in self.tasks.items():
            item: dict[str, Any] = {"ids": t.ids.tolist(), "weights": np.round(t.weights, 6).tolist(), "size": t.size}
            if t.alpha is not None and t.beta is not None and t.all_ids is not None:
                item.update(alpha=np.round(t.alpha, 5).tolist(), beta=np.round(t.beta, 5).tolist(),
                            all_ids=t.all_ids.tolist())
            if t.known_count:
                item.update(known=t.known, known_count=t.known_count)
            if t.seen is not None and t.rest is not None:  # each reference's results, bit-packed as outcomes are
                item.update(seen=[pack_bits(row) for row in t.seen], rest=t.rest.tolist())
            if t.margins is not None and t.all_ids is not None:  # int8, as outcomes keep them
                item.update(margins=[pack_margins(row) for row in t.margins], all_ids=t.all_ids.tolist())
            out["tasks"][task] = item
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Estimator:
        tasks = {}
        for task, item in data["tasks"].items():
            irt = {k: np.asarray(item[k], dtype=np.float64) for k in ("alpha", "beta") if k in item}
            tasks[task] = TaskEstimator(
                np.asarray(item["ids"], dtype=np.int64), np.asarray(item["weights"], dtype=np.float64),
                int(item["size"]), irt.get("alpha"), irt.get("beta"),
                all_ids=np.asarray(item["all_ids"], dtype=np.int64) if "all_ids" in item else None,
                known=float(item.get("known", 0.0)), known_count=int(item.get("known_count", 0)),
                seen=np.stack([unpack_bits(row, len(item["ids"])) for row in item["seen"]]) if "seen" in item else None,
                rest=np.asarray(item["rest"], dtype=np.float64) if "rest" in item else None,
                margins=np.stack([unpack_margins(row) for row in item["margins"]]) if "margins" in item else None)
        combination = str(data.get("combination", "simplex"))  # stored before the cone: the simplex
        if combination not in COMBINATIONS:
            raise ValueError(f"estimator: combination {combination!r} is none of {sorted(COMBINATIONS)}")
        return cls(str(data["method"]), tasks, combination)


# --- fitting ---------------------------------------------------------------------------------------------

def fit_estimator(method: str, references: list[Outcomes], *, fraction: float, seed: int) -> Estimator:
    """Choose ``fraction`` of each task's dev examples (at least one) from the reference models' outcomes.

    ``references`` are outcomes on the whole dev set (every one on the same examples per task).
    """
    if method not in METHODS:
        raise ConfigError(f"objective.estimate.method: unknown estimator {method!r}; known: {', '.join(METHODS)}")
    if not references:
        raise ConfigError("objective.estimate: no reference outcomes to fit the estimator on; keep the "
                          "'sources' baseline (baselines: [sources, ...])")
    rng = np.random.default_rng(seed)
    estimator = Estimator(method)
    for task in references[0].tasks:
        ids = references[0].tasks[task].ids
        matrix = np.stack([r.select({task: ids}).tasks[task].values.astype(np.float64) for r in references])
        k = max(1, min(len(ids), round(fraction * len(ids))))
        if method in ("mixture", "irt") and not _right_or_wrong(references, task):
            raise ConfigError(f"objective.estimate.method: {method} models right-or-wrong outcomes; "
                              f"use anchor or random with metric {references[0].metric}")
        if method == "random":
            chosen = np.sort(rng.choice(len(ids), size=k, replace=False))
            estimator.tasks[task] = TaskEstimator(ids[chosen], np.ones(k), len(ids))
        elif method == "mixture":
            chosen, _, _ = _contested_anchors(matrix, k, rng)
            others = np.ones(len(ids), dtype=bool)
            others[chosen] = False
            kept = [r.select({task: ids}).tasks[task].margins for r in references]
            margins = np.stack(kept) if all(m is not None for m in kept) else None  # type: ignore[arg-type]
            estimator.tasks[task] = TaskEstimator(ids[chosen], np.ones(len(chosen)), len(ids),
                                                  seen=matrix[:, chosen] > 0.5, rest=matrix[:, others].sum(1),
                                                  margins=None if margins is None else _stored(margins),
                                                  all_ids=None if margins is None else ids.copy())
        elif method in ("anchor", "strata"):
            embedding = matrix.T  # an example: the reference models' results on it
            if references[0].metric in LOSSES:
                tokens = references[0].tasks[task].weights
                per_token = embedding / tokens[:, None] if tokens is not None else embedding
                embedding = (per_token - per_token.mean(0)) / (per_token.std(0) + 1e-12)
            if method == "strata" and _right_or_wrong(references, task):
                estimator.tasks[task] = _strata(matrix, ids, k, rng)
            else:  # (strata with losses: no two models agree exactly, so anchor points over every example)
                chosen, weights = anchors(embedding, k, rng)
                estimator.tasks[task] = TaskEstimator(ids[chosen], weights, len(ids))
        else:
            alpha, beta, _ = fit_irt(matrix, seed=seed)
            chosen, weights = anchors(np.stack([alpha, beta], 1), k, rng)
            estimator.tasks[task] = TaskEstimator(ids[chosen], weights, len(ids), alpha, beta, ids.copy())
    return estimator


def _right_or_wrong(references: list[Outcomes], task: str) -> bool:
    """Whether every reference's outcomes on ``task`` are right-or-wrong (what irt and strata's known stratum need)."""
    return references[0].metric not in LOSSES and all(r.tasks[task].values.dtype == np.bool_ for r in references)


def _contested_anchors(matrix: np.ndarray, k: int, rng: np.random.Generator,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anchor points among the examples the references disagree on (right-or-wrong ``matrix``, references x
    examples): their positions, their weights (summing to the contested examples) and the mask of the agreed
    examples (none when the references agree everywhere: then every example is a candidate for an anchor)."""
    agreed = (matrix == matrix[0]).all(0)
    contested = np.flatnonzero(~agreed)
    if not len(contested):  # every reference alike on every example: nothing tells them apart, sample all
        contested, agreed = np.arange(matrix.shape[1]), np.zeros(matrix.shape[1], dtype=bool)
    chosen, weights = anchors(matrix[:, contested].T, min(k, len(contested)), rng)
    return contested[chosen], weights, agreed


def _strata(matrix: np.ndarray, ids: np.ndarray, k: int, rng: np.random.Generator) -> TaskEstimator:
    """``strata`` for one task (right-or-wrong outcomes): the examples all references agree on known, anchors
    among the others."""
    chosen, weights, agreed = _contested_anchors(matrix, k, rng)
    return TaskEstimator(ids[chosen], weights, len(ids), known=float(matrix[0, agreed].sum()),
                         known_count=int(agreed.sum()))


def mixture_weights(seen: np.ndarray, y: np.ndarray, *, eps: float = 0.05, prior: float = 0.05,
                    steps: int = 500) -> np.ndarray:
    """``mixture``'s weights: the candidate's results ``y`` (0/1 on the chosen examples) as a mixture of the
    references' (``seen``, references x examples), each reference agreeing with the candidate on an example with
    probability ``1 - eps``; the maximum a posteriori under a symmetric Dirichlet(1 + ``prior``), by EM."""
    agree = np.where(np.asarray(seen, dtype=bool) == (np.asarray(y) > 0.5)[None], 1.0 - eps, eps)
    count = len(agree)
    weights = np.full(count, 1.0 / count)
    for _ in range(steps):
        share = weights[:, None] * agree
        share /= share.sum(0, keepdims=True)  # E step: each example's responsibilities
        new = (share.sum(1) + prior) / (agree.shape[1] + prior * count)  # M step
        done = np.abs(new - weights).max() < 1e-10
        weights = new
        if done:
            break
    return weights


def margin_weights(margins: np.ndarray, index: np.ndarray, observed: np.ndarray, *,
                   combination: str = "cone") -> np.ndarray:
    """The weights of :func:`margin_mixture`'s combination of the references: least squares of the candidate's
    margins ``observed`` on the references' at the scored examples' positions ``index``, with ``w >= 0`` ("cone")
    or on the simplex. Their sum says how sure of its answers the candidate is against its references (1: on
    their scale)."""
    return COMBINATIONS[combination](margins[:, index].T.astype(np.float64), np.asarray(observed, dtype=np.float64))


def margin_mixture(margins: np.ndarray, index: np.ndarray, observed: np.ndarray, *, floor: float = 0.02,
                   combination: str = "cone") -> float:
    """``mixture`` on margins: the expected number of the task's unscored examples a candidate gets right.

    ``margins``: each reference's margin on every example (references x examples); ``index``: the scored
    examples' positions among them; ``observed``: the candidate's margins there. The candidate's margins are
    taken as a combination of the references' (weights ``w >= 0``, least squares on the scored examples,
    :func:`nonnegative_least_squares`; with ``combination`` "simplex" on the simplex,
    :func:`simplex_least_squares`), plus a normal error whose scale is the fit's residual (its root mean
    square over the scored examples less the references used, at least ``floor``); an unscored example
    ``j`` is then right with probability ``Phi(sum_i w_i m_ij / sd)``."""
    fitted = margins[:, index].T.astype(np.float64)
    y = np.asarray(observed, dtype=np.float64)
    w = COMBINATIONS[combination](fitted, y)  # (margin_weights, with the scored examples' margins taken once)
    residual = y - fitted @ w
    free = max(1, len(y) - int(np.count_nonzero(w > 1e-9)))
    sd = max(math.sqrt(float(residual @ residual) / free), floor)
    rest = np.ones(margins.shape[1], dtype=bool)
    rest[index] = False
    predicted = w @ margins[:, rest].astype(np.float64)
    return float(np.sum(0.5 * (1.0 + _erf(predicted / (sd * math.sqrt(2.0))))))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def simplex_least_squares(a: np.ndarray, b: np.ndarray, *, ridge: float = 1e-6, steps: int = 5000) -> np.ndarray:
    """``argmin_w |a w - b|^2 + ridge |w - 1/n|^2`` over the simplex (``w >= 0``, ``sum w = 1``), by
    :func:`_projected_least_squares` with the Euclidean projection onto the simplex (Duchi et al., "Efficient
    Projections onto the l1-Ball", ICML 2008, Fig. 1). The tiny ridge toward equal weights makes the minimiser
    unique where references outnumber the examples."""
    return _projected_least_squares(a, b, _onto_simplex, ridge=ridge, steps=steps)


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray, *, ridge: float = 1e-6, steps: int = 5000) -> np.ndarray:
    """``argmin_w |a w - b|^2 + ridge |w - 1/n|^2`` over ``w >= 0`` (the cone: the weights' sum is free), by
    :func:`_projected_least_squares` with the projection ``max(w, 0)``."""
    return _projected_least_squares(a, b, lambda v: np.maximum(v, 0.0), ridge=ridge, steps=steps)


# mixture on margins: the weights' constraint, by the name an estimator stores (``Estimator.combination``)
COMBINATIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "cone": nonnegative_least_squares, "simplex": simplex_least_squares}


def _projected_least_squares(a: np.ndarray, b: np.ndarray, project: Callable[[np.ndarray], np.ndarray], *,
                             ridge: float, steps: int) -> np.ndarray:
    """``argmin_w |a w - b|^2 + ridge |w - 1/n|^2`` over the convex set ``project`` maps onto: projected gradient
    with Nesterov's momentum (FISTA, Beck and Teboulle 2009), restarted whenever the momentum points uphill
    (O'Donoghue and Candes, "Adaptive Restart for Accelerated Gradient Schemes", 2015, Sec. 3.2)."""
    n = a.shape[1]
    gram = a.T @ a + ridge * np.eye(n)
    target = a.T @ b + ridge / n
    step = 1.0 / max(float(np.linalg.eigvalsh(gram)[-1]), 1e-12)
    w = z = np.full(n, 1.0 / n)
    momentum = 1.0
    for _ in range(steps):
        new = project(z - step * (gram @ z - target))
        if float((z - new) @ (new - w)) > 0:  # the momentum points uphill: restart it
            momentum = 1.0
        following = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        z = new + (momentum - 1) / following * (new - w)
        done = float(np.abs(new - w).max()) < 1e-9
        w, momentum = new, following
        if done:
            break
    return w


def _onto_simplex(v: np.ndarray) -> np.ndarray:
    """The Euclidean projection of ``v`` onto the probability simplex (Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    cumulative = np.cumsum(u) - 1.0
    rho = np.flatnonzero(u - cumulative / np.arange(1, len(v) + 1) > 0)[-1]
    return np.maximum(v - cumulative[rho] / (rho + 1), 0.0)


def _stored(margins: np.ndarray) -> np.ndarray:
    """Margins at the precision they are stored in (int8 steps), so a fresh and a reloaded estimator agree."""
    return unpack_margins(pack_margins(margins.ravel())).reshape(margins.shape)


def _positions(all_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The positions of ``ids`` among ``all_ids``."""
    order = np.argsort(all_ids)
    return order[np.searchsorted(all_ids, ids, sorter=order)]


def anchors(embedding: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``k`` anchor examples (sorted positions) and their weights (the examples each stands for; sum = N)."""
    n = len(embedding)
    patterns, inverse, counts = np.unique(embedding, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    labels_of_pattern = _kmeans(patterns, counts.astype(np.float64), min(k, len(patterns)), rng)
    centres = int(labels_of_pattern.max()) + 1  # (k-means may leave a cluster empty: it is dropped)
    label = labels_of_pattern[inverse]
    sizes = np.bincount(label, minlength=centres)
    spread = np.array([embedding[label == c].std(0).mean() for c in range(centres)])
    slots = _shares(sizes, k, sizes * (spread + 0.05))
    chosen, weights = [], []
    for c in range(centres):
        members = np.flatnonzero(label == c)
        if slots[c] == 0:
            continue
        centre = embedding[members].mean(0)
        medoid = members[np.argmin(((embedding[members] - centre) ** 2).sum(1))]
        rest = rng.permutation(members[members != medoid])[: slots[c] - 1]
        picked = [medoid, *rest]
        chosen += picked
        weights += [sizes[c] / len(picked)] * len(picked)
    order = np.argsort(chosen)
    weights_array = np.asarray(weights, dtype=np.float64)[order]
    assert abs(weights_array.sum() - n) < 1e-6
    return np.asarray(chosen, dtype=np.int64)[order], weights_array


def _shares(sizes: np.ndarray, k: int, need: np.ndarray | None = None) -> np.ndarray:
    """``k`` slots shared among clusters in proportion to ``need`` (default: their sizes): at least one each,
    largest remainder, never more than a cluster's members."""
    need = sizes if need is None else need
    slots = np.minimum(sizes, 1)
    left = k - int(slots.sum())
    if left > 0:
        want = need / need.sum() * k - slots
        for _ in range(left):
            room = np.where(slots < sizes, want, -np.inf)
            if not np.isfinite(room).any():
                break
            i = int(np.argmax(room))
            slots[i] += 1
            want[i] -= 1
    return slots


def _kmeans(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator,
            iterations: int = 50) -> np.ndarray:
    """Weighted k-means (k-means++ start, Lloyd steps) on distinct points; returns each point's cluster."""
    if k >= len(points):
        return np.arange(len(points))
    centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
    for _ in range(1, k):
        distance = np.min([((points - c) ** 2).sum(1) for c in centres], axis=0)
        p = weights * distance
        centres.append(points[rng.choice(len(points), p=p / p.sum())] if p.sum() > 0 else points[len(centres)])
    centre = np.stack(centres)
    label = np.zeros(len(points), dtype=np.int64)
    for _ in range(iterations):
        label = ((points[:, None, :] - centre[None]) ** 2).sum(-1).argmin(1)
        moved = centre.copy()
        for c in range(k):
            mine = label == c
            if mine.any():
                moved[c] = np.average(points[mine], axis=0, weights=weights[mine])
        if np.allclose(moved, centre):
            break
        centre = moved
    used = np.unique(label)  # drop empty clusters: labels 0..c-1
    return np.searchsorted(used, label)


# --- item response theory ---------------------------------------------------------------------------

def fit_irt(responses: np.ndarray, *, seed: int = 0, steps: int = 600,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a 2PL model to ``responses`` (models x examples, 0/1): returns (alpha, beta, theta).

    ``P(y_ij = 1) = sigmoid(alpha_j * theta_i - beta_j)``; maximum a posteriori with theta ~ N(0, 1),
    beta ~ N(0, 2^2), log alpha ~ N(0, 0.5^2) (the priors keep items that every reference model got
    right, or wrong, finite), by Adam on the mean negative log posterior.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(responses, dtype=torch.float64)
    models, items = y.shape
    theta = (torch.randn(models, generator=generator, dtype=torch.float64) * 0.1).requires_grad_()
    log_alpha = torch.zeros(items, dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(items, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.Adam([theta, log_alpha, beta], lr=0.05)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # (a sum split over threads may round otherwise: every worker's fit the same bits)
    try:
        for _ in range(steps):
            optimiser.zero_grad()
            logits = log_alpha.exp()[None] * theta[:, None] - beta[None]
            nll = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
            prior = (theta**2).sum() / 2 + (beta**2).sum() / (2 * 4.0) + (log_alpha**2).sum() / (2 * 0.25)
            loss = (nll + prior) / (models * items)
            loss.backward()
            optimiser.step()
    finally:
        torch.set_num_threads(threads)
    return (log_alpha.exp().detach().numpy(), beta.detach().numpy(), theta.detach().numpy())


def fit_ability(y: np.ndarray, alpha: np.ndarray, beta: np.ndarray, *, prior: float = 1.0) -> float:
    """A candidate's ability from its 0/1 results on some items: the maximum of the log posterior
    (theta ~ N(0, prior^2)) by Newton's method (the log posterior is concave in theta)."""
    theta = 0.0
    for _ in range(100):
        p = 1 / (1 + np.exp(-(alpha * theta - beta)))
        gradient = float(np.sum(alpha * (y - p))) - theta / prior**2
        curvature = -float(np.sum(alpha**2 * p * (1 - p))) - 1 / prior**2
        step = gradient / curvature
        theta -= step
        if abs(step) < 1e-10:
            break
    return theta


def p_irt(y: np.ndarray, theta: float, alpha_unseen: np.ndarray, beta_unseen: np.ndarray) -> float:
    """The p-IRT estimate (Polo et al. 2024, Eq. 3.3): the anchors' observed mean and the model's predicted
    mean on the other examples, weighted by their shares of the dev set."""
    seen, unseen = len(y), len(alpha_unseen)
    lam = seen / (seen + unseen)
    predicted = float(np.mean(1 / (1 + np.exp(-(alpha_unseen * theta - beta_unseen))))) if unseen else 0.0
    return lam * float(np.mean(y)) + (1 - lam) * predicted
