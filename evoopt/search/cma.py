"""evoopt's CMA-ES sampler: the ``cmaes`` optimizers, with the study's trials as their only state.

The search distribution is a pure function of the finished trials: they are told to the
optimizer in the order they finished (finish time, then number), ``popsize`` at a time,
restarts included. So

- a study resumes in a fresh process with the same distribution (it is rebuilt from storage);
- parallel workers never corrupt anything (there is no shared mutable state to write), and
  every finished trial is told, whichever generation it was sampled in: none is thrown
  away, unlike Optuna's ``CmaEsSampler`` under parallelism (after a restart, as there, the
  previous run's trials that finish late are not told to the new run);
- each trial's sample is drawn from a generator seeded by (seed, trial number): a study
  replays exactly with one worker (with several, the distribution a trial is drawn from
  depends on which trials had finished, which the workers' timing decides).

Each process caches the optimizer and tells it only the trials that finished since; the
cache is rebuilt when the order it saw is not a prefix of the stored one.

Set-up of Akiba et al. (2024): every parameter is searched in [0, 1] (its distribution's
bounds, on a log scale where the distribution has ``log=True``), x0 = 0.5, sigma0 = 1/6.
"""

from __future__ import annotations

import math
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

import numpy as np
import optuna
from cmaes import CMA, CMAwM, SepCMA, get_warm_start_mgd
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.search_space import IntersectionSearchSpace
from optuna.trial import FrozenTrial, TrialState

from evoopt.errors import ConfigError
from evoopt.search.evolver import rejected

Optimizer: TypeAlias = CMA | SepCMA | CMAwM
CMA_ATTR = "evoopt:cma"  # per trial: restart, generation, popsize; x, the continuous sample (with margin)


@dataclass
class _State:
    """One process's view: the optimizer after telling ``told`` (trial numbers, in order)."""

    optimizer: Optimizer
    told: list[int] = field(default_factory=list)
    pending: list[tuple[np.ndarray, float]] = field(default_factory=list)
    worst: float | None = None  # the worst finite value told so far (a not-finite one is told beyond it)
    restarts: int = 0
    large_restarts: int = 0
    small_budget: int = 0  # BIPOP: evaluations spent in the regimes
    large_budget: int = 0
    regime: str = "large"


class EvoCmaSampler(optuna.samplers.BaseSampler):
    """CMA-ES over an Optuna search space, resumable and safe with parallel workers.

    Args:
        search_space: the distributions to search from the first trial on (the study engine
            passes its space's); default: the intersection of the finished trials' spaces.
        x0: the initial mean in [0, 1] coordinates, one number for all parameters, or a
            mapping from parameter names to values in their own units (others 0.5). With
            ``branches``, the mapping may name a choice (``{"method": "ties", "ties:weight": ...}``,
            as a recipe file gives it): its values then all belong to that choice; each choice's
            CMA-ES starts from x0's values of its own parameters (the others' from 0.5).
        sigma0: the initial step size in [0, 1] coordinates.
        popsize: the population size (default the cmaes library's 4 + 3 ln d).
        restart: None, ``"ipop"`` (population grows by ``inc_popsize`` on each restart) or
            ``"bipop"`` (alternates large and small populations, Hansen 2009).
        separable: diagonal covariance (sep-CMA): linear cost in the dimension, for large spaces.
        with_margin: CMA-ES with margin for integer and stepped parameters (binary masks);
            default: whenever the space has any.
        warm_start_study: a finished study (same storage unless ``warm_start_storage``) whose
            best trials set the initial mean and covariance (Nomura et al. 2021).
        consider_pruned_trials: tell pruned trials with their last intermediate value (default). evoopt's
            objectives report a trial's score on the examples scored so far, the quantity its value would
            have been on fewer examples, so a pruned trial's last report is a noisy estimate of its value
            (a deliberate difference from Optuna's CmaEsSampler, whose default, False, suits pruners of
            learning curves). Left out, pruned trials starve CMA-ES wherever most trials are pruned:
            measured, the racing pruner stopped 1,516 of 1,525 trials of a layer-wise TIES search behind
            an early lucky trial, and CMA-ES (population 15) never finished a generation in 60 minutes
            (``benchmarks/fitness_search.py``). Set False for objectives that report learning curves.
        branches: a categorical parameter whose choices bring their own parameters,
            ``{"method": {"ties": [names...], "tsv": [names...]}}`` (the method search passes it): one
            CMA-ES per choice over that choice's parameters, and the choices race by successive rejects
            (Audibert & Bubeck 2010): each round, every remaining choice runs one generation (its
            population size), then the one whose best value is worst is dropped, until one is left.
            A round's drop waits until its trials have finished and counts them alone (with several
            workers, trials of the next round start meanwhile).
        seed: seeds every draw; trial n's sample comes from a generator seeded by (seed, n).
        independent_sampler: for parameters outside the searched space (default random).
    """

    def __init__(
        self,
        *,
        search_space: dict[str, BaseDistribution] | None = None,
        x0: float | dict[str, float | str] = 0.5,
        sigma0: float = 1 / 6,
        popsize: int | None = None,
        restart: Literal["ipop", "bipop"] | None = None,
        inc_popsize: int = 2,
        separable: bool = False,
        with_margin: bool | None = None,
        warm_start_study: str | None = None,
        warm_start_storage: str | None = None,
        warm_start_gamma: float = 0.1,
        consider_pruned_trials: bool = True,
        seed: int | None = None,
        independent_sampler: optuna.samplers.BaseSampler | None = None,
        branches: dict[str, dict[str, list[str]]] | None = None,
    ) -> None:
        problems = []
        if branches is not None and (len(branches) != 1 or not next(iter(branches.values()))):
            problems.append("branches: one categorical parameter with at least one choice")
        if isinstance(x0, dict):
            problems += [f"x0.{name}: must be a finite number, got {value}" for name, value in x0.items()
                         if isinstance(value, (int, float)) and not math.isfinite(value)]
        branch = next(iter(branches.items())) if branches is not None and len(branches) == 1 else None
        if isinstance(x0, dict) and search_space is not None:  # checked once, against every branch
            problems += _x0_problems(x0, search_space, branch)
        if isinstance(x0, (int, float)) and not 0 <= x0 <= 1:
            problems.append(f"x0: a number is a point in [0, 1] coordinates, got {x0}")
        if not 0 < sigma0 <= 1:
            problems.append(f"sigma0: must be in (0, 1] ([0, 1] coordinates), got {sigma0}")
        if popsize is not None and popsize < 4:  # fewer leaves the rank-mu update without a learning rate
            problems.append(f"popsize: must be at least 4, got {popsize}")
        if restart not in (None, "ipop", "bipop"):
            problems.append(f"restart: None, 'ipop' or 'bipop', got {restart!r}")
        if inc_popsize < 1:
            problems.append(f"inc_popsize: must be at least 1, got {inc_popsize}")
        if separable and with_margin:
            problems.append("separable / with_margin: the cmaes library has no separable CMA with margin")
        if not 0 < warm_start_gamma <= 1:
            problems.append(f"warm_start_gamma: the share of best source trials, in (0, 1], got {warm_start_gamma}")
        if problems:
            raise ConfigError("EvoCmaSampler: " + "; ".join(problems))
        self._search_space = search_space
        self._x0 = x0
        self._sigma0 = sigma0
        self._popsize = popsize
        self._restart = restart
        self._inc_popsize = inc_popsize
        self._separable = separable
        self._with_margin = with_margin
        self._warm_start = (warm_start_study, warm_start_storage, warm_start_gamma)
        self._warm_opened: optuna.storages.BaseStorage | None = None  # (check_warm_start's)
        self._consider_pruned = consider_pruned_trials
        self._seed: int = int(np.random.SeedSequence().entropy) if seed is None else seed  # type: ignore[arg-type]
        self._independent = independent_sampler  # (None: a seeded draw per trial and parameter)
        self._intersection = IntersectionSearchSpace()
        self._states: dict[tuple[int, tuple[str, ...]], _State] = {}
        self._encoded: dict[tuple[int, tuple[str, ...]], dict[int, np.ndarray | None]] = {}
        self._lock = threading.Lock()
        self._branches = branch

    # --- Optuna's sampler interface ---------------------------------------------------------------

    def reseed_rng(self) -> None:
        if self._independent is not None:
            self._independent.reseed_rng()

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        _single_objective(study)
        space = self._search_space or self._intersection.calculate(study)
        choice = self._branches[0] if self._branches is not None else None
        return {name: d for name, d in space.items() if _searchable(d) or name == choice}

    def sample_relative(self, study: optuna.Study, trial: FrozenTrial,
                        search_space: dict[str, BaseDistribution]) -> dict[str, Any]:
        _single_objective(study)
        rng = np.random.default_rng([self._seed, trial.number])
        params: dict[str, Any] = {}
        numeric = {}
        if self._branches is not None:  # one CMA-ES per choice, over the choice's own parameters
            key, branches = self._branches
            params[key] = choice = self._branch(study, trial, key, {
                c: [n for n in names if n in search_space and _searchable(search_space[n])]
                for c, names in branches.items()})
            search_space = {name: search_space[name] for name in branches[choice] if name in search_space}
        for name, d in search_space.items():
            if isinstance(d, CategoricalDistribution):  # CMA-ES is for numbers: drawn uniformly
                params[name] = d.choices[int(rng.integers(len(d.choices)))]
            elif _searchable(d):  # (a single-value distribution is left to the independent sampler)
                numeric[name] = d
        if not numeric:
            return params
        names = tuple(sorted(numeric))
        with self._lock:  # threads of one process (n_jobs > 1) share the cached optimizer
            state = self._state(study, names, [numeric[n] for n in names])
            state.optimizer.reseed_rng(int(rng.integers(2**31)))
            x_tell = None
            if isinstance(state.optimizer, CMAwM):
                x, x_tell = state.optimizer.ask()
            else:
                x = state.optimizer.ask()
            info: dict[str, Any] = {"restart": state.restarts, "generation": state.optimizer.generation,
                                    "popsize": state.optimizer.population_size}
        if x_tell is not None:  # CMA with margin is told the continuous sample, not the grid value
            info["x"] = {n: float(v) for n, v in zip(names, x_tell)}
        study._storage.set_trial_system_attr(trial._trial_id, CMA_ATTR, info)  # one storage write
        for name, value in zip(names, x):
            params[name] = _decode(float(value), numeric[name])
        return params

    def sample_independent(self, study: optuna.Study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        _single_objective(study)
        if self._independent is not None:
            return self._independent.sample_independent(study, trial, param_name, param_distribution)
        # a parameter outside the searched space: drawn from a generator of its own (seed, trial, name), so that a
        # resumed study or another worker never repeats the draws (one RandomSampler's sequence restarted with them)
        seed = zlib.crc32(f"{self._seed}|{trial.number}|{param_name}".encode())
        return optuna.samplers.RandomSampler(seed=seed).sample_independent(study, trial, param_name,
                                                                            param_distribution)

    def after_trial(self, study: optuna.Study, trial: FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        if self._independent is not None:
            self._independent.after_trial(study, trial, state, values)

    def _branch(self, study: optuna.Study, trial: FrozenTrial, key: str, branches: dict[str, list[str]]) -> str:
        """The choice of ``key`` for this trial: successive rejects over the trials so far (see ``branches``);
        ``branches``: each choice's searched parameters, whose count sets its CMA-ES population size.

        Round r counts each remaining choice's first r generations of trials (by trial number) and is decided once
        they have all finished, on their best values alone: a trial of a later round, running or finished, never
        holds up or changes a drop, so the drops are the same whatever the number of workers and whenever a
        worker asks (with several workers it waited for every running trial, and gave the next trial to a choice
        already dropped meanwhile: the race ran round-robin)."""
        choices = list(branches)
        sizes = {c: self._popsize or 4 + math.floor(3 * math.log(max(1, len(branches[c])))) for c in choices}
        trials: dict[str, list[FrozenTrial]] = {c: [] for c in choices}  # each choice's, by number
        for t in sorted(study._get_trials(deepcopy=False, use_cache=True), key=lambda t: t.number):
            crashed = t.state == TrialState.FAIL and not rejected(t)  # (its retry, if any, takes its slot)
            if t.number != trial.number and t.params.get(key) in sizes and not crashed:
                trials[t.params[key]].append(t)
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0

        def least_run(among: list[str]) -> str:
            return min(among, key=lambda c: (len(trials[c]) / sizes[c], choices.index(c)))

        survivors, round_ = choices, 1
        while len(survivors) > 1:
            counted = {c: trials[c][: round_ * sizes[c]] for c in survivors}
            if behind := [c for c in survivors if len(counted[c]) < round_ * sizes[c]]:
                return least_run(behind)
            if not all(t.state.is_finished() for c in survivors for t in counted[c]):
                return least_run(survivors)  # the next round's trials start while this round's finish
            best = {c: min((sign * t.value for t in counted[c] if t.state == TrialState.COMPLETE
                            and t.value is not None and math.isfinite(t.value)), default=math.inf)
                    for c in survivors}
            worst = max(survivors, key=lambda c: (best[c], choices.index(c)))
            survivors = [c for c in survivors if c != worst]
            round_ += 1
        return survivors[0]

    # --- the distribution, rebuilt from the finished trials ---------------------------------------------

    def _state(self, study: optuna.Study, names: tuple[str, ...], dists: list[BaseDistribution]) -> _State:
        key = (study._study_id, names)
        solutions = self._solutions(study, self._encoded.setdefault(key, {}), names, dists)
        numbers = [number for number, *_ in solutions]
        state = self._states.get(key)
        if state is None or numbers[: len(state.told)] != state.told:
            state = _State(self._initial(study, names, dists))
            self._states[key] = state
        for number, x, y, restart in solutions[len(state.told):]:
            state.told.append(number)
            if restart != state.restarts:  # sampled before the restart (another worker's): not the new run's
                continue
            state.pending.append((x, y))
            if len(state.pending) == state.optimizer.population_size:
                self._tell(state)
                if self._restart and state.optimizer.should_stop():
                    self._restart_optimizer(state, names, dists)
        return state

    @staticmethod
    def _tell(state: _State) -> None:
        """Tell a generation; a not-finite value (inf) is told as the worst finite one of the generation and of the
        values told before it, plus max(1, its size): ranked last, whenever it finished."""
        finite = [y for _, y in state.pending if math.isfinite(y)]
        if finite:
            state.worst = max(finite) if state.worst is None else max(state.worst, *finite)
        worst = 0.0 if state.worst is None else state.worst
        state.optimizer.tell([(x, y if math.isfinite(y) else worst + max(1.0, abs(worst))) for x, y in state.pending])
        state.pending = []

    def _solutions(self, study: optuna.Study, encoded: dict[int, np.ndarray | None], names: tuple[str, ...],
                   dists: list[BaseDistribution]) -> list[tuple[int, np.ndarray, float, int]]:
        """(number, x in [0, 1] coordinates, value to minimise, the restart it was sampled in: 0 where CMA-ES did
        not sample it) of every finished trial, in finishing order.

        ``encoded`` caches each finished trial's point (finished trials do not change). A trial that failed on its
        own score (not finite: a diverged merge, :func:`~evoopt.search.evolver.rejected`) has the value inf here,
        and is told (:meth:`_tell`) as worse than every finite value of its generation and before it, so that the
        distribution learns to leave that region (left out, each such sample cost an evaluation and taught nothing).
        """
        states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) if self._consider_pruned else (
            TrialState.COMPLETE, TrialState.FAIL)
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
        out = []
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=True):
            if trial.state == TrialState.FAIL:
                if not rejected(trial):  # (a crash: retried, or nothing to learn from)
                    continue
                y = math.inf
            else:
                value = trial.value if trial.state == TrialState.COMPLETE else (
                    trial.intermediate_values[max(trial.intermediate_values)] if trial.intermediate_values else None)
                if value is None or not math.isfinite(value):
                    continue
                y = sign * value
            if trial.number not in encoded:
                encoded[trial.number] = _encode_trial(trial, names, dists)
            if (x := encoded[trial.number]) is None:
                continue
            restart = trial.system_attrs.get(CMA_ATTR, {}).get("restart", 0)
            out.append((trial.datetime_complete, trial.number, x, y, restart))
        out.sort(key=lambda s: (s[0], s[1]))
        return [(number, x, y, restart) for _, number, x, y, restart in out]

    @property
    def warm_start_storage(self) -> str | None:
        """The storage URL of ``warm_start_study`` where it is not this study's."""
        return self._warm_start[1]

    def check_warm_start(self, storage: optuna.storages.BaseStorage) -> None:
        """Refuse a ``warm_start_study`` that ``storage`` (this study's, or the caller's opening of
        ``warm_start_storage``) does not hold, or whose finished trials are too few for ``warm_start_gamma``: before
        the study is made, not at its first trial (whose parameters its trials are matched to then)."""
        study_name, _, gamma = self._warm_start
        if study_name is None:
            return
        self._warm_opened = storage  # (read again at the first trial, as opened here: journal files, drivers)
        source = self._warm_source(study_name, storage)
        finished = len(source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if math.floor(finished * gamma) < 1:
            raise ConfigError(f"sampler.options.warm_start_study: {study_name!r} has {finished} finished trial(s); "
                              f"warm_start_gamma={gamma} needs at least {math.ceil(1 / gamma)}")

    def _warm_source(self, study_name: str, storage: str | optuna.storages.BaseStorage) -> optuna.Study:
        try:
            return optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            where = "warm_start_storage" if self._warm_start[1] else "this study's storage"
            raise ConfigError(f"sampler.options.warm_start_study: no study {study_name!r} in {where}; give the name "
                              "of a study there (`optuna studies --storage URL` lists them), or its storage as "
                              "warm_start_storage") from None

    def _initial(self, study: optuna.Study, names: tuple[str, ...], dists: list[BaseDistribution]) -> Optimizer:
        mean = self._mean(names, dists)
        sigma, cov = self._sigma0, None
        study_name, storage, gamma = self._warm_start
        if study_name is not None:
            source = self._warm_source(study_name, self._warm_opened or storage or study._storage)
            sign = -1.0 if source.direction == optuna.study.StudyDirection.MAXIMIZE else 1.0
            found = [(x, sign * t.value) for t in source.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                     if t.value is not None and (x := _encode_trial(t, names, dists)) is not None]
            if math.floor(len(found) * gamma) < 1:
                raise ConfigError(f"warm_start_study: {study_name!r} has {len(found)} finished trial(s) over these "
                                  f"parameters; warm_start_gamma={gamma} needs at least {math.ceil(1 / gamma)}")
            mean, sigma, cov = get_warm_start_mgd(found, gamma=gamma)
            mean = np.clip(mean, 0.0, 1.0)
        return self._optimizer(mean, sigma, self._popsize, cov, dists, seed=0)

    def _optimizer(self, mean: np.ndarray, sigma: float, popsize: int | None, cov: np.ndarray | None,
                   dists: list[BaseDistribution], *, seed: int) -> Optimizer:
        bounds = np.array([[0.0, 1.0]] * len(dists))
        steps = np.array([_step(d) for d in dists])
        margin = self._with_margin if self._with_margin is not None else bool((steps > 0).any())
        if self._separable:
            return SepCMA(mean, sigma, bounds=bounds, seed=seed, population_size=popsize)
        if margin:
            return CMAwM(mean, sigma, bounds=bounds, steps=steps, seed=seed, population_size=popsize, cov=cov)
        return CMA(mean, sigma, bounds=bounds, seed=seed, population_size=popsize, cov=cov)

    def _mean(self, names: tuple[str, ...], dists: list[BaseDistribution]) -> np.ndarray:
        """x0 over ``names`` (with branches, one choice's parameters): x0's values of them, 0.5 elsewhere."""
        if not isinstance(self._x0, dict):
            return np.full(len(names), float(self._x0))
        if self._search_space is None and (problems := _x0_problems(self._x0, dict(zip(names, dists)), None)):
            raise ConfigError("; ".join(problems))  # (the space is known only now: the finished trials')
        return np.array([_encode(float(self._x0[name]), d) if name in self._x0 else 0.5
                         for name, d in zip(names, dists)])

    def _restart_optimizer(self, state: _State, names: tuple[str, ...], dists: list[BaseDistribution]) -> None:
        """IPOP: a bigger population from a random mean; BIPOP: alternate large and small regimes."""
        state.restarts += 1
        # with branches, each choice's restarts from means of their own (two choices of as many parameters restarted
        # from the same ones); a single search keeps the seed it had
        branch = [zlib.crc32("|".join(names).encode())] if self._branches is not None else []
        rng = np.random.default_rng([self._seed, 7919, state.restarts, *branch])
        mean = rng.uniform(0.0, 1.0, len(names))
        base = self._popsize or 4 + math.floor(3 * math.log(len(names)))
        spent = state.optimizer.population_size * state.optimizer.generation
        sigma = self._sigma0
        if self._restart == "ipop":
            popsize = base * self._inc_popsize ** state.restarts
        else:
            if state.regime == "large":
                state.large_budget += spent
            else:
                state.small_budget += spent
            if state.restarts == 1 or state.small_budget >= state.large_budget:
                state.regime, state.large_restarts = "large", state.large_restarts + 1
                popsize = base * self._inc_popsize ** state.large_restarts
            else:
                state.regime = "small"
                u = rng.uniform()
                large = base * self._inc_popsize ** state.large_restarts
                popsize = max(4, math.floor(base * (0.5 * large / base) ** (u**2)))
                sigma = self._sigma0 * 10 ** (-2 * rng.uniform())
        state.optimizer = self._optimizer(mean, sigma, popsize, None, dists, seed=state.restarts)
        state.pending = []


def finished_generations(trials: Sequence[FrozenTrial]) -> int | None:
    """The generations CMA-ES had finished when it sampled the last of these trials (one search space), restarts
    included: each trial records its restart and the generation it was sampled in, and a restart begins only once
    its predecessor's last generation was told, so an earlier restart finished its largest recorded generation
    plus one and the last restart its largest recorded generation. None when no trial came from EvoCmaSampler."""
    largest: dict[int, int] = {}
    for trial in trials:
        info = trial.system_attrs.get(CMA_ATTR)
        if info is not None:
            largest[info["restart"]] = max(largest.get(info["restart"], 0), info["generation"])
    if not largest:
        return None
    last = max(largest)
    return sum(generation + (restart != last) for restart, generation in largest.items())


def _single_objective(study: optuna.Study) -> None:
    if len(study.directions) > 1:
        raise ConfigError("EvoCmaSampler: CMA-ES optimises one objective; use NSGAIISampler for multi-objective "
                          "studies")


def _x0_problems(x0: dict[str, float | str], space: dict[str, BaseDistribution],
                 branch: tuple[str, dict[str, list[str]]] | None) -> list[str]:
    """What is wrong with a mapping x0 over ``space``: names of no searched parameter, values outside their
    distributions; with a branch key in x0, a choice that is not one, or parameters of another choice."""
    searched = {name for name, d in space.items() if _searchable(d)}
    key, choices = branch if branch is not None else (None, {})
    where = "the searched space"
    if key in x0:
        if x0[key] not in choices:
            return [f"x0.{key}: one of {', '.join(choices)}, got {x0[key]!r}"]
        searched &= set(choices[str(x0[key])])
        where = f"the searched parameters of {key} {x0[key]!r} (x0.{key})"
    if unknown := sorted(set(x0) - searched - {key}):
        return [f"x0: no parameter(s) {', '.join(unknown)} in {where}"]
    return [f"x0: {name}={x0[name]} is outside its distribution {space[name]}" for name in sorted(set(x0) - {key})
            if not space[name]._contains(space[name].to_internal_repr(x0[name]))]  # type: ignore[arg-type]


def _searchable(d: BaseDistribution) -> bool:
    return isinstance(d, (FloatDistribution, IntDistribution)) and d.high > d.low


def _encode(value: float, d: BaseDistribution) -> float:
    assert isinstance(d, (FloatDistribution, IntDistribution))
    if d.log:
        return (math.log(value) - math.log(d.low)) / (math.log(d.high) - math.log(d.low))
    return (value - d.low) / (d.high - d.low)


def _decode(u: float, d: BaseDistribution) -> float | int:
    """A point of [0, 1] back to the distribution's value (on its grid for steps and integers)."""
    assert isinstance(d, (FloatDistribution, IntDistribution))
    u = min(max(u, 0.0), 1.0)  # only floating-point error: samples are inside [0, 1]
    if d.log:
        value = math.exp(math.log(d.low) + u * (math.log(d.high) - math.log(d.low)))
    else:
        value = d.low + u * (d.high - d.low)
    if d.step is not None:
        value = d.low + round((value - d.low) / d.step) * d.step
    value = min(max(value, d.low), d.high)
    return int(round(value)) if isinstance(d, IntDistribution) else float(value)


def _step(d: BaseDistribution) -> float:
    """The grid step in [0, 1] coordinates (0: continuous); log-scale integers are searched as continuous."""
    assert isinstance(d, (FloatDistribution, IntDistribution))
    if d.step is None or d.log:
        return 0.0
    return float(d.step) / (d.high - d.low)


def _encode_trial(trial: FrozenTrial, names: tuple[str, ...], dists: list[BaseDistribution]) -> np.ndarray | None:
    """A trial's point in [0, 1] coordinates, or None when it lacks a parameter or lies outside."""
    if any(name not in trial.params for name in names):
        return None
    told = trial.system_attrs.get(CMA_ATTR, {}).get("x")
    if isinstance(told, dict) and all(name in told for name in names):
        return np.array([told[name] for name in names], dtype=float)
    x = []
    for name, d in zip(names, dists):
        value = trial.params[name]
        if not d._contains(d.to_internal_repr(value)):
            return None
        x.append(_encode(value, d))
    return np.array(x, dtype=float)
