"""The moves of M2N2 (Abrantes, Lange and Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025),
as pure functions over an archive's per-example results and the parents' tensors.

Read from the authors' released code (github.com/SakanaAI/natural_niches, ``natural_niches_fn.py`` and
``helper_fn.py``), which the paper's description follows except where noted:

- **Resource competition** (:func:`competition_fitness`): with S[i, j] the result of archive member i on
  example j (1 right, 0 wrong) and z_j = sum_k S[k, j] the archive's total on example j,
  F[i, j] = S[i, j] / z_j^alpha and f_i = sum_j F[i, j]. An example that few members solve is worth more
  to each of them, so members that solve what others cannot survive. alpha = 1 (the code's default);
  alpha = 0 is plain accuracy. Where z_j = 0 the divisor is 1 (the code; the paper writes z + eps).
  Deliberate extension for several tasks (the paper has one): each example's share is weighted by
  c_j = (w_t / sum w) / n_t for its task t of n_t examples (``objective.weights``, else 1), so that at
  alpha = 0 the fitness is the (weighted) mean of the tasks' mean per-example results (the study's own value for
  right-or-wrong outcomes; for perplexity the mean likelihood exp(-nll / tokens), not the token-weighted
  perplexity; for macro-F1 the accuracy), and a large task does not outweigh the others by its size.
- **Attraction** (:func:`pick_parents`): the first parent A is drawn with probability f_A / sum f; the
  second, B, with probability proportional to g_B = sum_j max(0, S[B, j] - S[A, j]) / z_j^alpha, its
  strength where A is weak. Deliberate addition: where A is at least as good as every member on every
  example (all g = 0, undefined in the code), B is drawn by fitness among the others.
- **Crossover at a split** (:func:`crossover`): a split point s in the parameters' order and a ratio
  w ~ U[0, 1); coordinate i takes v_i = w before the split and 1 - w after it, and the child is the
  spherical interpolation with one angle Omega between the whole parents,
  child_i = (sin((1 - v_i) Omega) A_i + sin(v_i Omega) B_i) / sin Omega (linear when sin Omega <= 1e-6,
  or with ``linear``): in the linear limit (1 - w) A + w B before the split, w A + (1 - w) B after.
- **Replacement** (:func:`replaced`): the fitness of the archive and the child is recomputed together;
  the child takes the place of the least fit member when the child is not itself strictly the least fit
  (ties go to the child, as in the code).

The search (:class:`M2N2Sampler`): generation 0 scores the experts, the archive's first members; every
later generation holds ``brood`` children (1: the paper's one child per step), all drawn from the archive
as the previous generation left it, then placed in turn: while the archive has fewer than ``archive``
members a child joins it, afterwards it replaces the least fit when fitter (:func:`replaced`). Like the
Evolver's, the archive is replayed from the study's trials (a child's parents, split and ratio are its
trial's parameters), so a study resumes in a fresh process and several workers share it.

Scores for the competition (:func:`resources`) are the trials' per-example outcomes on dev, on the examples
every member scored: correctness as 0/1 (the paper's accuracy); a deliberate extension for the losses, the
example's likelihood in (0, 1]: exp(-nll / tokens) for perplexity, exp(-squared error / its mean over the members
and the task's examples) for mse (scale-free: the task's units may be any).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from evoopt.data.outcomes import Outcomes, trial_outcomes
from evoopt.errors import ConfigError, EvaluationError
from evoopt.search.evolver import SlotSampler, is_finished, rejected, slot_trials

logger = logging.getLogger(__name__)
_WARNED: list[bool] = []  # (the warning of a result below 0: once a process)
SLERP_FLOOR = 1e-6  # below this sin(Omega) the parents are (anti)parallel: interpolate linearly


def _divisor(scores: np.ndarray, alpha: float, weights: np.ndarray | None) -> np.ndarray:
    """z_j^alpha / c_j: z_j = sum_k S[k, j] (1 where it is 0), c_j the example's weight (1 without weights)."""
    total = scores.sum(axis=0)
    divisor = np.where(total > 0, total, 1.0) ** alpha
    return divisor if weights is None else divisor / np.asarray(weights, dtype=float)


def competition_fitness(scores: np.ndarray, alpha: float = 1.0, weights: np.ndarray | None = None) -> np.ndarray:
    """Each member's share of the examples' resources (M2N2's fitness), from S (members x examples):
    f_i = sum_j c_j S[i, j] / z_j^alpha (``weights`` c: each example's, from :func:`resources`; default 1)."""
    scores = np.asarray(scores, dtype=float)
    return np.asarray((scores / _divisor(scores, alpha, weights)).sum(axis=1))


def attraction(scores: np.ndarray, first: int, alpha: float = 1.0, weights: np.ndarray | None = None) -> np.ndarray:
    """g_B = sum_j c_j max(0, S[B, j] - S[A, j]) / z_j^alpha for every member B, A = ``first`` (g_A = 0)."""
    scores = np.asarray(scores, dtype=float)
    return np.asarray((np.maximum(0.0, scores - scores[first]) / _divisor(scores, alpha, weights)).sum(axis=1))


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    weights = np.asarray(weights, dtype=float)
    if weights.sum() <= 0:
        weights = np.ones_like(weights)
    return int(rng.choice(len(weights), p=weights / weights.sum()))


def pick_parents(scores: np.ndarray, rng: np.random.Generator, *, alpha: float = 1.0, attract: bool = True,
                 weights: np.ndarray | None = None) -> tuple[int, int]:
    """Parents A (by competition fitness) and B (by attraction to A; without ``attract``, by fitness too,
    with replacement, as the code's ``--no_matchmaker``); ``weights``: each example's (:func:`resources`)."""
    fitness = competition_fitness(scores, alpha, weights)
    first = _draw(fitness, rng)
    if not attract:
        return first, _draw(fitness, rng)
    pull = attraction(scores, first, alpha, weights)
    if pull.sum() <= 0:  # A is at least as good everywhere: fall back to fitness among the others
        pull = np.where(np.arange(len(fitness)) == first, 0.0, np.maximum(fitness, 1e-12))
    return first, _draw(pull, rng)


def replaced(scores: np.ndarray, child: np.ndarray, alpha: float = 1.0,
             weights: np.ndarray | None = None) -> int | None:
    """The archive member the child replaces (the least fit, fitness recomputed with the child among them),
    or None when the child is strictly the least fit."""
    together = np.vstack([np.asarray(scores, dtype=float), np.asarray(child, dtype=float)[None, :]])
    fitness = competition_fitness(together, alpha, weights)
    weakest = int(np.argmin(fitness[:-1]))
    return None if fitness[-1] < fitness[weakest] else weakest


def _sum(x: torch.Tensor, chunk: int = 1 << 15) -> float:
    """The sum of ``x``'s entries in float64, the same bits whatever the number of threads: rows of ``chunk``
    entries each summed by one thread, the row sums added exactly (a plain sum split over threads rounds by their
    count: ``run --workers`` gives each worker fewer threads than one process has)."""
    flat = x.double().flatten()
    whole = flat.numel() - flat.numel() % chunk  # (the rows a view, the tail apart: no padded copy)
    rows = flat[:whole].view(-1, chunk).sum(dim=1).tolist() if whole else []
    return math.fsum([*rows, float(flat[whole:].sum())])


def slerp_angle(first: Sequence[torch.Tensor], second: Sequence[torch.Tensor]) -> float:
    """Omega between two parents, each a sequence of tensors (their parameters in order), as whole vectors."""
    dot = math.fsum(_sum(a.double() * b.double()) for a, b in zip(first, second))
    norm_a = math.sqrt(math.fsum(_sum(a.double().square()) for a in first))
    norm_b = math.sqrt(math.fsum(_sum(b.double().square()) for b in second))
    if norm_a == 0.0 or norm_b == 0.0:
        return 0.0
    return math.acos(max(-1.0, min(1.0, dot / (norm_a * norm_b))))


def crossover(a: torch.Tensor, b: torch.Tensor, *, offset: int, split: int, ratio: float, omega: float = 0.0,
              linear: bool = False) -> torch.Tensor:
    """One tensor of the child: ``a`` and ``b`` are the parents' tensor whose first entry is entry ``offset``
    of the parameters' order, ``split`` the split point in that order, ``ratio`` w, ``omega`` the parents'
    angle (:func:`slerp_angle`). The split falls in at most one tensor: the others take one v throughout."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    cut = min(max(split - offset, 0), a.numel())  # entries of this tensor before the split
    sine = math.sin(omega)
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    child = torch.empty(a.numel(), dtype=dtype, device=a.device)
    for part, v in ((slice(0, cut), ratio), (slice(cut, a.numel()), 1.0 - ratio)):
        a_, b_ = flat_a[part].to(dtype), flat_b[part].to(dtype)
        if linear or sine <= SLERP_FLOOR:
            child[part] = a_ * (1.0 - v) + b_ * v
        else:
            child[part] = (a_ * math.sin((1.0 - v) * omega) + b_ * math.sin(v * omega)) / sine
    return child.to(a.dtype).reshape(a.shape)


# --- the archive's history, replayed from the study's trials --------------------------------------

ATTR = "evoopt:m2n2"  # trial system attribute: {"generation": g, "slot": i, "interpolation": "slerp" | "linear"}
INTERPOLATIONS = ("slerp", "linear")


@dataclass(frozen=True)
class Child:
    """One child: its parents (archive members), the split (a fraction of the parameters' order) and w."""

    first: int
    second: int
    split: float
    ratio: float


def child_of(params: dict[str, Any]) -> Child:
    return Child(int(params["parent_a"]), int(params["parent_b"]), float(params["split"]), float(params["ratio"]))


def resources(outcomes: Sequence[Outcomes],
              task_weights: Mapping[str, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """S (members x examples): each member's result on the examples all of them scored, in [0, 1], higher
    better (correctness; the likelihood of an example for the losses); and each example's weight c_j =
    (w_t / sum w) / n_t, its task's weight (``task_weights``, else 1) shared among the task's n_t examples."""
    tasks = sorted(set.intersection(*(set(o.tasks) for o in outcomes))) if outcomes else []
    rows: list[list[np.ndarray]] = [[] for _ in outcomes]
    given = task_weights or {}
    total = sum(given.get(t, 1.0) for t in tasks) or 1.0
    weights: list[np.ndarray] = []
    for task in tasks:
        shared = reduce(np.intersect1d, [o.tasks[task].ids for o in outcomes])
        if len(shared):
            weights.append(np.full(len(shared), given.get(task, 1.0) / total / len(shared)))
        for row, o in zip(rows, outcomes):
            t = o.tasks[task].select(shared)
            values = t.values.astype(np.float64)
            if o.metric == "perplexity":
                assert t.weights is not None
                values = np.exp(-values / np.maximum(t.weights, 1.0))
            row.append(values)
        if outcomes and outcomes[0].metric == "mse":  # squared errors, in the task's own units: the scale is its
            # mean over the members (exp(-error) was 0.0 for every member at squared errors above about 745, errors
            # of 30 and more: no signal, every child then replaced member 0)
            errors = np.vstack([r[-1] for r in rows])
            scale = float(errors.mean()) if errors.size and errors.mean() > 0 else 1.0
            for r in rows:
                r[-1] = np.exp(-r[-1] / scale)
    scores = np.vstack([np.concatenate(r) if r else np.zeros(0) for r in rows]) if rows else np.zeros((0, 0))
    if scores.size and not scores.min() >= 0:  # (a share of a negative result: the fitness, and the draws from it,
        # undefined. Every metric a study accepts is >= 0; said once, and taken as 0, not raised: this runs as a
        # trial is asked for, and when a stored study is reported)
        if not _WARNED:
            logger.warning("M2N2: per-example results below 0 or not numbers (lowest %s) count as 0 in the "
                           "competition", scores.min())
            _WARNED.append(True)
        scores = np.nan_to_num(np.maximum(scores, 0.0), nan=0.0)
    return scores, np.concatenate(weights) if weights else np.zeros(0)


@dataclass
class ArchiveHistory:
    """What the finished trials say about the archive.

    Attributes:
        generation: the first generation whose trials are not all finished.
        holders, values, outcomes: each member's trial, its plain dev score (the trial's value) and its
            per-example outcomes, in the archive as ``generation - 1`` left it.
        placed: placed[g] = the children of generation g that entered the archive, with the member each
            replaced (or, equal to the archive's size then, joined as).
        taken: slots of ``generation`` that a live trial already holds.
    """

    generation: int
    holders: list[int] = field(default_factory=list)
    values: list[float | None] = field(default_factory=list)
    outcomes: list[Outcomes] = field(default_factory=list)
    placed: list[list[tuple[Child, int]]] = field(default_factory=lambda: [[]])
    taken: set[int] = field(default_factory=set)
    maximize: bool = True
    task_weights: Mapping[str, float] | None = None

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        """S and each example's weight (:func:`resources`) of the archive's members."""
        return resources(self.outcomes, self.task_weights)

    @property
    def best(self) -> int:
        """The member with the best plain dev score (the lowest index among equals): the search's answer."""
        sign = 1.0 if self.maximize else -1.0
        return int(np.argmax([-math.inf if v is None else sign * v for v in self.values]))


def replay(trials: Sequence[FrozenTrial], *, members: int, size: int, brood: int, alpha: float, maximize: bool,
           exclude: int | None = None, task_weights: Mapping[str, float] | None = None) -> ArchiveHistory:
    """The archive's history from the study's trials (``exclude``: a trial number to ignore; ``task_weights``:
    the study's ``objective.weights``, for the competition).

    A child enters when its trial completed with per-example outcomes; a pruned child, or one failed on its score
    (:func:`~evoopt.search.evolver.rejected`), does not.
    """
    by_slot = slot_trials(trials, ATTR, "slot", exclude)
    history = ArchiveHistory(0, maximize=maximize, task_weights=task_weights)
    while True:
        g = history.generation
        found = {i: by_slot.get((g, i), []) for i in range(members if g == 0 else brood)}
        done = {i: next((t for t in ts if is_finished(t)), None) for i, ts in found.items()}
        if any(t is None for t in done.values()):
            history.taken = {i for i, ts in found.items() if ts}
            return history
        placed: list[tuple[Child, int]] = []
        for i, trial in done.items():
            assert trial is not None
            outcomes = trial_outcomes(trial)
            if g == 0:
                if rejected(trial):
                    raise EvaluationError(f"M2N2: expert {i}'s score is not finite (trial {trial.number}: "
                                          f"{trial.user_attrs.get('fail_reason', 'no reason kept')}); the archive "
                                          "starts from every expert: check that expert, or score in float32 "
                                          "(dtype, objective.precision)")
                if outcomes is None or trial.state != TrialState.COMPLETE:
                    raise EvaluationError(f"M2N2: expert {i}'s trial {trial.number} kept no per-example outcomes; "
                                          "the competition needs every member's")
                history.holders.append(trial.number)
                history.values.append(trial.value)
                history.outcomes.append(outcomes)
                continue
            if trial.state != TrialState.COMPLETE or trial.value is None or outcomes is None:
                continue
            place: int | None = len(history.holders)  # joins while the archive is not full
            if len(history.holders) >= size:
                together, weights = resources([*history.outcomes, outcomes], task_weights)
                place = replaced(together[:-1], together[-1], alpha, weights)
            if place is None:
                continue
            if place == len(history.holders):
                history.holders.append(trial.number)
                history.values.append(trial.value)
                history.outcomes.append(outcomes)
            else:
                history.holders[place], history.values[place], history.outcomes[place] = (
                    trial.number, trial.value, outcomes)
            placed.append((child_of(trial.params), place))
        if g > 0:
            history.placed.append(placed)
        history.generation += 1


# --- the sampler --------------------------------------------------------------------------------------

class M2N2Sampler(SlotSampler):
    """M2N2 (Abrantes et al. 2025) as an Optuna sampler: each trial is one child of the archive.

    Generation 0 scores the experts (parameter ``member``); a child's parameters are its parents
    ``parent_a`` (drawn by competition fitness) and ``parent_b`` (by attraction to A), the ``split``
    (a fraction of the parameters' order) and the ``ratio`` w, drawn from a generator seeded by (seed,
    generation, slot). Generations and slots work as the Evolver's (:class:`~evoopt.search.evolver.SlotSampler`):
    the archive is replayed from the study's finished trials, so the same seed reaches the same archive
    whatever the number of workers or interruptions.

    Args:
        members: the experts (the study engine passes their number).
        archive: the archive's size (at least ``members``; default ``members``): children join until it is
            full, then replace the least fit when fitter.
        brood: children per generation, drawn from the same archive (1: the paper's steady state; more lets
            as many workers run at once).
        alpha: the competition's exponent (1: the paper; 0: the tasks' (weighted) mean of per-example results,
            the study's value for accuracy).
        attract: draw the second parent by attraction (False: by fitness, the paper's ablation).
        interpolation: ``slerp`` (the code's) or ``linear``.
        task_weights: the tasks' weights in the competition (the study engine passes ``objective.weights``;
            a task not named weighs 1).
        seed, poll, wait_timeout: as the Evolver's.
    """

    attr = ATTR
    key = "slot"

    def __init__(self, *, members: int, archive: int | None = None, brood: int = 1, alpha: float = 1.0,
                 attract: bool = True, interpolation: str = "slerp", task_weights: Mapping[str, float] | None = None,
                 seed: int | None = None, poll: float = 0.5, wait_timeout: float = 3600.0) -> None:
        size = members if archive is None else archive
        problems = []
        if members < 2:
            problems.append(f"members: M2N2 needs at least 2 experts, got {members}")
        if size < members:
            problems.append(f"archive: at least the {members} experts it starts with, got {size}")
        if brood < 1:
            problems.append(f"brood: at least 1 child per generation, got {brood}")
        if alpha < 0:
            problems.append(f"alpha: the competition's exponent must be >= 0, got {alpha}")
        if interpolation not in INTERPOLATIONS:
            problems.append(f"interpolation: one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        if problems:
            raise ConfigError("M2N2Sampler: " + "; ".join(problems))
        super().__init__(seed=seed, poll=poll, wait_timeout=wait_timeout)
        self.members, self.size, self.brood, self.alpha = members, size, brood, alpha
        self.attract, self.interpolation = attract, interpolation
        self.task_weights = dict(task_weights or {})

    def slots(self, generation: int) -> int:
        return self.members if generation == 0 else self.brood

    def slot(self, generation: int, index: int) -> dict[str, Any]:
        return {**super().slot(generation, index), "interpolation": self.interpolation}

    def history(self, study: optuna.Study, exclude: int | None = None) -> ArchiveHistory:
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        return replay(study.get_trials(deepcopy=False), members=self.members, size=self.size, brood=self.brood,
                      alpha=self.alpha, maximize=maximize, exclude=exclude, task_weights=self.task_weights)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) > 1:
            raise ConfigError("M2N2Sampler: the archive's competition needs one objective; "
                              "set objective.multi_objective false")
        return {"member": IntDistribution(0, self.members - 1), "parent_a": IntDistribution(0, self.size - 1),
                "parent_b": IntDistribution(0, self.size - 1), "split": FloatDistribution(0.0, 1.0),
                "ratio": FloatDistribution(0.0, 1.0)}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space or trial.system_attrs.get(ATTR):  # (a trial holding a slot has its parameters)
            return {}
        generation, index, history = self._claim(study, trial)
        self._claimed[trial.number] = history
        if generation == 0:
            return {"member": index}
        rng = np.random.default_rng([self.seed, generation, index])
        scores, weights = history.scores()
        first, second = pick_parents(scores, rng, alpha=self.alpha, attract=self.attract, weights=weights)
        return {"parent_a": first, "parent_b": second, "split": float(rng.uniform()), "ratio": float(rng.uniform())}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        raise ConfigError(f"M2N2Sampler: M2N2 decides every parameter of a trial; {param_name!r} is not one of "
                          "member, parent_a, parent_b, split, ratio (use space.kind m2n2 with this sampler)")
