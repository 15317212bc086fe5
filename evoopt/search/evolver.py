"""Evolver's offspring (Du et al., "Knowledge Fusion By Evolving Weights of Language Models", 2024).

Differential evolution whose individuals are whole models. One offspring is a :class:`Move`
(target, donors, F, Cr, crossover seed: plain numbers, so a trial can carry them as its
parameters) applied tensor by tensor: :func:`offspring_tensor` never flattens a model.

Strategies (the mutant ``v`` of target ``x_i``):

- ``paper``: ``v = x_i + F (x_r1 - x_r2)``, the paper's text;
- ``released``: ``v = x_i + F (x_ref - x_i)``, the authors' released code: ``x_ref`` a random
  other individual with probability ``0.5 / (G - g) + 0.5`` at generation g of G, else the
  best other (merge-integrated, always a random other: the individuals have no scores of their own);
- ``rand1``: ``v = x_r0 + F (x_r1 - x_r2)`` (classic DE/rand/1);
- ``best1``: ``v = x_best + F (x_r1 - x_r2)`` (DE/best/1).

Crossover, per element k: ``u[k] = v[k]`` if ``rand_k < Cr`` else ``x_i[k]``; the uniform
draws come from a generator seeded by (move seed, tensor index), so an offspring is rebuilt
exactly from its move and the population.

Selection. Plain Evolver: an offspring replaces its target when it scores better than the target.
Merge-integrated (X_Evolver): the population has one score, that of X(P), the merge of the current
population. The authors' code (``evolve_with_merger``) takes the offspring one at a time, in a random
order, and keeps one when X of the population with it in its target's place scores better than the
current X(P), which it then becomes. evoopt scores a generation's offspring in parallel, all against
X(P_{g-1}) (a deliberate difference: workers need not wait for each other, and a run replays the
same whatever their number). When one offspring wins, X(P_g) is its own candidate, already scored;
when several win, one more trial scores them together (slot ``N`` of the generation), and P_g takes
them all if that scores better than the best of them alone, else only the best. So every accepted
step raises the score of X(P), and the answer X(P_last) is the best candidate scored.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import torch
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import FrozenTrial, TrialState

from evoopt.errors import ConfigError, TimeUp, WorkerError

STRATEGIES = ("paper", "released", "rand1", "best1")


@dataclass(frozen=True)
class Move:
    """One offspring of the population: who is replaced, from whom, and how."""

    strategy: str
    target: int
    donors: tuple[int, ...]  # paper, rand1, best1: (base, r1, r2) with base = target / r0 / best; released: (ref,)
    f: float
    cr: float
    seed: int


def draw_move(rng: np.random.Generator, strategy: str, *, target: int, size: int, best: int,
              best_other: int | None = None, f: float = 0.5, cr: float = 0.5, generation: int = 0,
              generations: int = 1, scored: bool = True) -> Move:
    """The donors of ``target``'s offspring, drawn from ``rng``; distinct from each other and the target.

    ``best``: the fittest individual; ``best_other``: the fittest one but the target (``released``'s
    reference; by default ``best``, which then must not be the target). ``scored``: whether the
    individuals have scores of their own; merge-integrated they have not, and ``released`` always
    takes a random other (the authors' ``mutate_and_crossover`` with a merger).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: one of {', '.join(STRATEGIES)}, got {strategy!r}")
    needed = {"released": 2, "paper": 3, "rand1": 4, "best1": 3 if best == target else 4}[strategy]
    if size < needed:
        raise ValueError(f"strategy {strategy!r} needs {needed} distinct individuals here; the population has {size}")
    others = [j for j in range(size) if j != target]
    seed = int(rng.integers(2**31))
    if strategy == "released":
        best_other = best if best_other is None else best_other
        if best_other == target:
            raise ValueError(f"best_other: the fittest individual other than the target, got the target {target} "
                             "itself; pass best_other when the target is the fittest")
        # the authors' mutate_and_crossover: a random other with p = 0.5 / (G - g) + 0.5, else
        # find_max_index_after_removing_idx(score, idx), the best other
        random_ref = rng.uniform() < 0.5 / max(generations - generation, 1) + 0.5 or not scored
        return Move(strategy, target, (int(rng.choice(others)) if random_ref else best_other,), f, cr, seed)
    if strategy == "rand1":
        r0, r1, r2 = (int(j) for j in rng.choice(others, size=3, replace=False))
        return Move(strategy, target, (r0, r1, r2), f, cr, seed)
    pool = [j for j in others if not (strategy == "best1" and j == best)]
    r1, r2 = (int(j) for j in rng.choice(pool, size=2, replace=False))
    return Move(strategy, target, (best if strategy == "best1" else target, r1, r2), f, cr, seed)


def mutant(move: Move, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``v`` for one tensor; ``tensors[j]`` is individual j's copy of it (computed in float32).

    One new tensor: the difference, then scaled and shifted in place (the same roundings as
    ``x + F (a - b)``).
    """
    x = [tensors[j] for j in (move.target, *move.donors)]
    start, a, b = (x[0], x[1], x[0]) if move.strategy == "released" else (x[1], x[2], x[3])
    v = a.float() - b.float()  # (float() of a float32 tensor is the tensor itself: no copy)
    return v.mul_(move.f).add_(start.float())


def offspring_tensor(move: Move, tensors: Sequence[torch.Tensor], index: int, *, out: torch.Tensor | None = None,
                     chunk: int = 1 << 20) -> torch.Tensor:
    """Crossover of the mutant with the target for tensor number ``index``, in the target's dtype.

    Built ``chunk`` elements at a time into ``out`` (a new tensor by default; the evaluation
    model's own tensor when given), so no tensor-sized temporary is ever allocated. The
    crossover draws come from one generator seeded by (move seed, tensor index), consumed in
    order: the same move gives the same offspring.
    """
    target = tensors[move.target]
    out = torch.empty_like(target) if out is None else out
    if out.shape != target.shape or not out.is_contiguous():
        raise ValueError(f"out: a contiguous tensor of shape {tuple(target.shape)}, got {tuple(out.shape)}")
    generator = torch.Generator().manual_seed(move.seed * 1_000_003 + index)
    flat = [t.reshape(-1) for t in tensors]
    destination = out.view(-1)
    for start in range(0, destination.numel(), chunk):
        part = [f[start : start + chunk] for f in flat]
        take = torch.rand(part[0].numel(), generator=generator) < move.cr
        v = mutant(move, part)
        destination[start : start + chunk] = torch.where(take.to(v.device), v, part[move.target].float(), out=v)
    return out


# --- the population's history, replayed from the study's trials ------------------------------------

ATTR = "evoopt:evolver"  # trial system attribute: {"generation": g, "target": i, "strategy": s}
PARAMS = ("target", "donor_1", "donor_2", "donor_3", "F", "Cr", "seed")
_LIVE = (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE, TrialState.PRUNED)
_DONE = (TrialState.COMPLETE, TrialState.PRUNED)
# User attribute of a trial that ran and was failed on its own score (not finite): its slot is done and its
# offspring rejected. A trial failed otherwise (its worker died, the budget was reached) frees its slot for a retry,
# which draws the same move; retrying a candidate whose score is never finite would stall its generation forever.
NOT_FINITE = "not_finite"
# greedy: the paper's rule (the offspring replaces its target when it scores better); paired: only when a paired
# test on the same dev examples finds it better at level alpha (the trial records the decision, "selection")
SELECTIONS = ("greedy", "paired")


def slots(generation: int, size: int, integrated: bool) -> int:
    """Trials in a generation: generation 0 scores the initial population (one merge when integrated)."""
    return 1 if generation == 0 and integrated else size


@dataclass(frozen=True)
class Together:
    """X_Evolver, a generation in which several offspring beat X of the population: they are scored together.

    Attributes:
        moves: the winning offspring, the best first.
        trials: their trials, in the same order.
    """

    moves: tuple[Move, ...]
    trials: tuple[int, ...]


@dataclass
class History:
    """What the finished trials say about the population.

    Generation 0 scores the experts (or, merge-integrated, their merge); generation g >= 1 holds one
    offspring per target, built from the population P_{g-1}. Plain Evolver: P_g keeps each target or its
    offspring, whichever scored better (synchronous greedy selection, ties keep the parent).
    Merge-integrated: every offspring is compared with X(P_{g-1}), and P_g takes the winner, or the winners
    together when a trial of them together (slot N of the generation) scores better than the best alone
    (see the module's text).

    Attributes:
        generation: the first generation whose trials are not all finished.
        fitness: each individual's score in P_{generation-1} (None before generation 0 is done);
            merge-integrated, every entry is the score of X(P_{generation-1}).
        f, cr: each individual's F and Cr (jDE adapts them; otherwise the configured values).
        accepted: accepted[g] = the offspring that replaced their targets in generation g.
        taken: slots of ``generation`` that a live trial already holds.
        holders: each individual's trial (whose per-example outcomes a paired selection compares with; None
            for an expert whose score was not finite);
            merge-integrated, the trial that scored X(P_{generation-1}).
        together: merge-integrated, the generations whose winners were (or are to be) scored together.
        open: the slots of ``generation`` that can be claimed now (None: all of them); ``[N]`` while its
            winners wait to be scored together.
    """

    generation: int
    fitness: list[float | None]
    f: list[float]
    cr: list[float]
    accepted: list[list[Move]]
    taken: set[int]
    maximize: bool = True
    holders: list[int | None] = field(default_factory=list)
    together: dict[int, Together] = field(default_factory=dict)
    open: list[int] | None = None

    @property
    def best(self) -> int:
        """The fittest individual (the lowest index among equals); 0 before any score."""
        return self.fittest()

    def fittest(self, exclude: int | None = None) -> int:
        """The fittest individual but ``exclude``, by the study's direction (the lowest index among equals)."""
        sign = 1.0 if self.maximize else -1.0
        scores = [-math.inf if s is None else sign * s for s in self.fitness]
        return max((i for i in range(len(scores)) if i != exclude), key=lambda i: scores[i])


def move_of(params: dict[str, Any], strategy: str) -> Move:
    """The offspring a generation >= 1 trial's parameters describe."""
    donors = tuple(int(params[f"donor_{k}"]) for k in (1, 2, 3) if f"donor_{k}" in params)
    return Move(strategy, int(params["target"]), donors, float(params["F"]), float(params["Cr"]), int(params["seed"]))


def rejected(trial: FrozenTrial) -> bool:
    """Whether a trial failed on its own score (:data:`NOT_FINITE`): finished, and never better."""
    return trial.state == TrialState.FAIL and bool(trial.user_attrs.get(NOT_FINITE))


def is_finished(trial: FrozenTrial) -> bool:
    """Whether a trial's slot is decided: complete, pruned, or :func:`rejected`."""
    return trial.state in _DONE or rejected(trial)


def slot_trials(trials: Sequence[FrozenTrial], attr: str, key: str = "target",
                exclude: int | None = None) -> dict[tuple[int, int], list[FrozenTrial]]:
    """The live trials of each slot (generation, index), by trial number (``exclude``: a trial number to ignore)."""
    by_slot: dict[tuple[int, int], list[FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        slot = trial.system_attrs.get(attr)
        if slot is not None and trial.number != exclude and (trial.state in _LIVE or rejected(trial)):
            by_slot.setdefault((int(slot["generation"]), int(slot[key])), []).append(trial)
    return by_slot


# Slot record key of a merge-integrated trial selected by the rule of this module (one score, X of the population).
# Before it, each X_Evolver offspring was compared with the score its target held since it last won, and several
# could be accepted together unscored; such a study's trials cannot be replayed by this rule.
RULE = "rule"


def wins(trial: FrozenTrial, rival: float | None, sign: float) -> bool:
    """Whether a finished trial beats the score ``rival`` (the paired rule's decision, where it recorded one)."""
    if trial.state != TrialState.COMPLETE or trial.value is None:
        return False
    decided = trial.user_attrs.get("selection")
    return decided["decided"] == "accepted" if decided else rival is None or sign * trial.value > sign * rival


def replay(trials: Sequence[FrozenTrial], *, size: int, integrated: bool, maximize: bool, f: float, cr: float,
           exclude: int | None = None) -> History:
    """The population's history from the study's trials (``exclude``: a trial number to ignore)."""
    by_slot = slot_trials(trials, ATTR, exclude=exclude)
    sign = 1.0 if maximize else -1.0
    history = History(0, [None] * size, [f] * size, [cr] * size, [[]], set(), maximize)
    while True:
        g = history.generation
        found = {i: by_slot.get((g, i), []) for i in range(slots(g, size, integrated))}
        done = {i: next((t for t in ts if is_finished(t)), None) for i, ts in found.items()}
        finished = {i: t for i, t in done.items() if t is not None}
        if len(finished) < len(done):
            history.taken = {i for i, ts in found.items() if ts}
            return history
        if g == 0:
            values = [t.value if t.state == TrialState.COMPLETE else None for t in finished.values()]
            history.fitness = values * size if integrated else values
            numbers = [t.number if t.state == TrialState.COMPLETE else None for t in finished.values()]  # (a
            # score never finite: no trial to compare its offspring with; the first complete one replaces it)
            history.holders = list(numbers * size if integrated else numbers)
            history.generation += 1
            continue
        winners = [(t, move_of(t.params, t.system_attrs[ATTR]["strategy"])) for i, t in finished.items()
                   if wins(t, history.fitness[i], sign)]
        if integrated:
            if any(RULE not in t.system_attrs[ATTR] for t in finished.values()):
                raise ConfigError("space.kind evolver: this X_Evolver study was run by an evoopt that selected "
                                  "offspring by an older rule, and its trials cannot be replayed by the current "
                                  "one (one score, X of the population); start it again under a new study name")
            winners.sort(key=lambda w: (-sign * (w[0].value or 0.0), w[1].target))  # (a winner has a value)
            scored = winners[:1]
            if len(winners) > 1:
                history.together[g] = Together(tuple(m for _, m in winners), tuple(t.number for t, _ in winners))
                held = by_slot.get((g, size), [])
                both = next((t for t in held if is_finished(t)), None)
                if both is None:
                    history.open, history.taken = [size], {size} if held else set()
                    return history
                if wins(both, winners[0][0].value, sign):
                    scored = [(both, m) for _, m in winners]
            for _, move in scored:
                history.f[move.target], history.cr[move.target] = move.f, move.cr
            if scored:
                history.fitness, history.holders = [scored[0][0].value] * size, [scored[0][0].number] * size
        else:
            for trial, move in winners:
                history.fitness[move.target], history.f[move.target], history.cr[move.target] = \
                    trial.value, move.f, move.cr
                history.holders[move.target] = trial.number
            scored = winners
        history.accepted.append([m for _, m in scored])
        history.generation += 1


# --- the sampler --------------------------------------------------------------------------------------

class SlotSampler(optuna.samplers.BaseSampler):
    """A sampler of synchronous generations: each trial claims a slot (generation, index) of the generation
    that the study's finished trials have reached, and waits while every slot of it is held by a running
    trial. Shared by the Evolver and M2N2 (:mod:`evoopt.search.m2n2`); a subclass says where a slot is
    stored (``attr``, the index under ``key``), how many slots a generation has and what the history is.
    """

    attr: str
    key: str = "target"

    def __init__(self, *, seed: int | None, poll: float, wait_timeout: float) -> None:
        self.seed: int = int(np.random.default_rng().integers(2**31)) if seed is None else seed
        self.poll, self.wait_timeout = poll, wait_timeout
        self.deadline: float | None = None  # time.monotonic() at which the run's time ends (set by the run)
        self._claimed: dict[int, Any] = {}  # trial number -> the history its slot was claimed from

    def claimed(self, trial_number: int) -> Any:
        """The history a trial of this process claimed its slot from (generations before its own are complete
        in it), once: the trial's candidate is built from it without replaying the study again."""
        return self._claimed.pop(trial_number, None)

    def history(self, study: optuna.Study, exclude: int | None = None) -> Any:
        """What the study's trials say now: an object with ``generation`` and ``taken`` (the slots of that
        generation held by live trials)."""
        raise NotImplementedError

    def slots(self, generation: int) -> int:
        raise NotImplementedError

    def open_slots(self, history: Any) -> Sequence[int]:
        """The slots of the history's current generation that can be claimed now (taken or not)."""
        return range(self.slots(history.generation))

    def slot(self, generation: int, index: int) -> dict[str, Any]:
        """The slot's record (a trial system attribute)."""
        return {"generation": generation, self.key: index}

    def _claim(self, study: optuna.Study, trial: FrozenTrial) -> tuple[int, int, Any]:
        """Take the first free slot of the current generation, waiting while the generation runs.

        A claim is written, then kept only if no other live trial claims the slot: of two claims,
        the one checked later sees the earlier, so at most one keeps it. One that sees a rival
        withdraws and tries again after a short seeded jitter.
        """
        storage = study._storage
        jitter = np.random.default_rng([self.seed, trial.number])
        waited = 0.0
        while True:
            history = self.history(study, exclude=trial.number)
            g = history.generation
            free = [i for i in self.open_slots(history) if i not in history.taken]
            if free:
                if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
                    # optuna's heartbeat thread may not have beaten yet: a worker killed now would leave a trial
                    # holding a slot that no heartbeat can fail, and every worker would wait for it
                    storage.record_heartbeat(trial._trial_id)
                storage.set_trial_system_attr(trial._trial_id, self.attr, self.slot(g, free[0]))
                rivals = [t.number for t in study.get_trials(deepcopy=False, states=_LIVE) if t.number != trial.number
                          and (t.system_attrs.get(self.attr) or {}).get("generation") == g
                          and t.system_attrs[self.attr][self.key] == free[0]]
                if not rivals:
                    return g, free[0], history
                storage.set_trial_system_attr(trial._trial_id, self.attr, None)
                time.sleep(float(jitter.uniform(0, self.poll)))
                continue
            if self.deadline is not None and time.monotonic() >= self.deadline:
                raise TimeUp(f"trial {trial.number}: the run's time ended while it waited for generation {g}, "
                             "running in other trials; it did not run")
            if waited >= self.wait_timeout:
                raise WorkerError(f"{type(self).__name__}: generation {g} has run for {waited:.0f} s in other trials; "
                                  "are its workers alive? (journal storages have no heartbeats to fail dead ones)")
            time.sleep(self.poll)
            waited += self.poll
            if is_heartbeat_enabled(storage):
                fail_stale_trials(study)


class EvolverSampler(SlotSampler):
    """Evolver (Du et al. 2024) as an Optuna sampler: each trial is one offspring.

    The sampler decides a trial's generation and target (its *slot*, stored as a system
    attribute) and draws the offspring's move, which becomes the trial's parameters:
    ``target``, ``donor_1..3``, ``F``, ``Cr`` and the crossover ``seed``. The objective
    (:class:`evoopt.search.population.Population`) builds the offspring from those parameters and the
    population ``P_{g-1}``, which it replays from the study's finished trials; so does the
    sampler, for the fitness. There is no other state: a study resumes in a fresh process,
    and several workers share one study.

    Generations are synchronous: generation g's offspring are all built from ``P_{g-1}`` and
    selected together, so a run reaches the same population whatever the number of workers
    or interruptions. A worker that asks for a trial while all of the current generation's
    slots are held by running trials waits (``poll`` seconds between looks, failing stale
    trials of dead workers on the way) for the generation to finish. A failed trial frees its
    slot: the next trial takes it and, drawn from the same generator, the same move.

    Each move comes from a generator seeded by (seed, generation, target).

    Args:
        population: the number of individuals N (the study engine passes the number of experts).
        integrated: merge-integrated Evolver (X_Evolver): generation 0 is one trial, the merge
            of the initial population; a generation whose offspring beat it more than once has one
            more trial, target ``population``, that scores the winners together.
        strategy: ``paper``, ``released``, ``rand1`` or ``best1`` (see :mod:`evoopt.search.evolver`;
            ``best1`` needs the individuals' own scores, which merge-integrated they have not).
        F, Cr: the differential weight and crossover rate (the paper: 0.5 and 0.5).
        adapt: ``jde`` for self-adaptive F and Cr per individual (Brest et al. 2006): with
            probability 0.1 each, an offspring draws F in [0.1, 1] and Cr in [0, 1] and its
            target adopts them when it wins; None keeps F and Cr fixed.
        generations: the planned number of generations G (the ``released`` strategy's schedule; part
            of the study's config, so that a resumed run draws the same moves).
        seed: seeds every draw.
        selection: ``greedy`` (the paper's rule: the offspring replaces its target when it scores
            better) or ``paired``: the offspring is scored stage by stage (``objective.fidelities``)
            against its target on the same dev examples, rejected as soon as a paired test finds it
            worse at level ``alpha``, and accepted at the end only when the test finds it better
            (the study's kind runs the test; the trial records ``selection``).
        alpha: the paired rule's test level.
        poll: seconds between looks at the storage while waiting for a generation.
        wait_timeout: seconds to wait for a generation before failing with an error.
    """

    attr = ATTR

    def __init__(self, *, population: int, integrated: bool = False, strategy: str = "paper", F: float = 0.5,
                 Cr: float = 0.5, adapt: str | None = None, generations: int = 10, seed: int | None = None,
                 poll: float = 0.5, wait_timeout: float = 3600.0, selection: str = "greedy",
                 alpha: float = 0.05) -> None:
        problems = []
        if selection not in SELECTIONS:
            problems.append(f"selection: one of {', '.join(SELECTIONS)}, got {selection!r}")
        if not 0 < alpha < 1:
            problems.append(f"alpha: a test level in (0, 1), got {alpha}")
        if strategy not in STRATEGIES:
            problems.append(f"strategy: one of {', '.join(STRATEGIES)}, got {strategy!r}")
        elif strategy == "best1" and integrated:
            problems.append("strategy: 'best1' mutates around the fittest individual, and X_Evolver scores only the "
                            "merge of the population; use paper, rand1 or released")
        elif population < (needed := {"released": 2, "paper": 3, "rand1": 4, "best1": 4}[strategy]):
            problems.append(f"population: strategy {strategy!r} needs at least {needed} individuals, got {population}")
        if not 0 < F <= 2:
            problems.append(f"F: the differential weight must be in (0, 2], got {F}")
        if not 0 < Cr <= 1:  # (0: no entry from the mutant, every offspring its target's copy, every trial wasted)
            problems.append(f"Cr: the crossover rate must be in (0, 1], got {Cr}")
        if adapt not in (None, "jde"):
            problems.append(f"adapt: None or 'jde', got {adapt!r}")
        if generations < 1:
            problems.append(f"generations: must be at least 1, got {generations}")
        if problems:
            raise ConfigError("EvolverSampler: " + "; ".join(problems))
        self.population, self.integrated, self.strategy = population, integrated, strategy
        self.F, self.Cr, self.adapt, self.generations = F, Cr, adapt, generations
        super().__init__(seed=seed, poll=poll, wait_timeout=wait_timeout)
        self.selection, self.alpha = selection, alpha

    def slots(self, generation: int) -> int:
        return slots(generation, self.population, self.integrated)

    def open_slots(self, history: History) -> Sequence[int]:
        return history.open if history.open is not None else super().open_slots(history)

    def slot(self, generation: int, index: int) -> dict[str, Any]:
        return {**super().slot(generation, index), "strategy": self.strategy, **({RULE: 2} if self.integrated else {})}

    def history(self, study: optuna.Study, exclude: int | None = None) -> History:
        """The population's history as the study's trials say it now."""
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        return replay(study.get_trials(deepcopy=False), size=self.population, integrated=self.integrated,
                      maximize=maximize, f=self.F, cr=self.Cr, exclude=exclude)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        if len(study.directions) > 1:
            raise ConfigError("EvolverSampler: greedy selection needs one objective; "
                              "set objective.multi_objective false")
        last = self.population - 1
        # (merge-integrated, target N is the trial that scores a generation's winners together)
        return {"target": IntDistribution(0, last + self.integrated),
                **{f"donor_{k}": IntDistribution(0, last) for k in (1, 2, 3)},
                "F": FloatDistribution(0.0, 2.0), "Cr": FloatDistribution(0.0, 1.0),
                "seed": IntDistribution(0, 2**31 - 1)}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        if not search_space:
            return {}
        if trial.system_attrs.get(ATTR):  # a trial that already holds a slot (its parameters are stored)
            return {}
        generation, target, history = self._claim(study, trial)
        self._claimed[trial.number] = history
        if generation == 0 or target == self.population:
            return {"target": target}
        rng = np.random.default_rng([self.seed, generation, target])
        f, cr = history.f[target], history.cr[target]
        if self.adapt == "jde":  # Brest et al. 2006, tau1 = tau2 = 0.1, F in [Fl, Fl + Fu] = [0.1, 1]
            f = 0.1 + 0.9 * float(rng.uniform()) if rng.uniform() < 0.1 else f
            cr = float(rng.uniform()) if rng.uniform() < 0.1 else cr
        move = draw_move(rng, self.strategy, target=target, size=self.population, best=history.best,
                         best_other=history.fittest(exclude=target), f=f, cr=cr, generation=generation - 1,
                         generations=self.generations, scored=not self.integrated)
        donors = {f"donor_{k}": d for k, d in enumerate(move.donors, start=1)}
        return {"target": target, **donors, "F": move.f, "Cr": move.cr, "seed": move.seed}

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        raise ConfigError(f"EvolverSampler: the Evolver decides every parameter of a trial; {param_name!r} is not one "
                          f"of {', '.join(PARAMS)} (use space.kind evolver with this sampler)")
