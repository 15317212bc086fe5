"""evoopt's CMA-ES sampler: Optuna's sampler contract suites, convergence, resume, parallel workers."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import optuna
import pytest
from cmaes import CMAwM
from optuna.testing.pytest_samplers import BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase

from evoopt.errors import ConfigError
from evoopt.search.cma import EvoCmaSampler, finished_generations
from evoopt.search.samplers import make_sampler
from evoopt.study.config import SamplerSpec

optuna.logging.set_verbosity(optuna.logging.WARNING)


class TestContract(BasicSamplerTestCase, RelativeSamplerTestCase, SingleOnlySamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], optuna.samplers.BaseSampler]:
        return lambda: EvoCmaSampler(seed=0)


class TestContractWithMargin(RelativeSamplerTestCase):
    @pytest.fixture
    def sampler(self) -> Callable[[], optuna.samplers.BaseSampler]:
        return lambda: EvoCmaSampler(seed=0, with_margin=True)


def sphere(trial: optuna.Trial, dim: int = 5) -> float:
    return sum(trial.suggest_float(f"x{i}", -5, 5) ** 2 for i in range(dim))


def rosenbrock(trial: optuna.Trial) -> float:
    x, y = trial.suggest_float("x", -2, 2), trial.suggest_float("y", -2, 2)
    return 100 * (y - x**2) ** 2 + (1 - x) ** 2


@pytest.mark.parametrize(("objective", "options", "budget", "target"), [
    (sphere, {}, 300, 1e-2),
    (rosenbrock, {}, 400, 1e-3),
    (lambda t: sphere(t, 20), {"separable": True}, 600, 1.0),
    (rosenbrock, {"restart": "ipop"}, 600, 1e-6),
    (rosenbrock, {"restart": "bipop"}, 600, 1e-6),
])
@pytest.mark.parametrize("seed", [0, 1])
def test_converges_within_budget(objective: Callable[[optuna.Trial], float], options: dict[str, object],
                                 budget: int, target: float, seed: int) -> None:
    study = optuna.create_study(sampler=EvoCmaSampler(seed=seed, **options))  # type: ignore[arg-type]
    study.optimize(objective, n_trials=budget)
    assert study.best_value < target


def test_random_search_does_not_reach_the_sphere_target() -> None:
    """The convergence targets above are not met by chance."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(sphere, n_trials=300)
    assert study.best_value > 1e-2


def test_search_space_given_first_trial_comes_from_x0() -> None:
    space = {"a": optuna.distributions.FloatDistribution(0, 10), "b": optuna.distributions.FloatDistribution(0, 1)}
    sampler = EvoCmaSampler(search_space=space, x0={"a": 2.0}, sigma0=1e-9, seed=0)
    study = optuna.create_study(sampler=sampler)
    trial = study.ask(space)
    assert trial.params["a"] == pytest.approx(2.0, abs=1e-6)
    assert trial.params["b"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(ValueError, match="x0: no parameter"):
        optuna.create_study(sampler=EvoCmaSampler(search_space=space, x0={"c": 1.0})).ask(space)
    with pytest.raises(ValueError, match="sigma0"):
        EvoCmaSampler(sigma0=0)


def flat(trial: optuna.Trial) -> float:
    """A plateau: CMA-ES stops (no progress in the values) and, with a restart strategy, restarts."""
    trial.suggest_float("x", -1, 1)
    trial.suggest_float("y", -1, 1)
    return 1.0


def test_ipop_restarts_grow_the_population() -> None:
    study = optuna.create_study(sampler=EvoCmaSampler(seed=0, restart="ipop", popsize=6))
    study.optimize(flat, n_trials=300)
    infos = [t.system_attrs["evoopt:cma"] for t in study.trials if "evoopt:cma" in t.system_attrs]
    assert max(i["restart"] for i in infos) >= 1
    assert {i["popsize"] for i in infos if i["restart"] == 1} == {12}
    # trials run one at a time: each generation of a restart is exactly its popsize of trials, so a restart
    # with k trials that was restarted from finished k / popsize generations, the last one (k - 1) // popsize
    counts = Counter(i["restart"] for i in infos)
    counts[0] += len(study.trials) - len(infos)  # trial 0, sampled before CMA-ES, is told with generation 0
    sizes = {i["restart"]: i["popsize"] for i in infos}
    last = max(counts)
    expected = sum(k // sizes[r] if r != last else (k - 1) // sizes[r] for r, k in counts.items())
    assert finished_generations(study.trials) == expected > max(i["generation"] for i in infos)
    plain = optuna.create_study(sampler=EvoCmaSampler(seed=0, popsize=6))
    plain.optimize(flat, n_trials=100)
    assert {t.system_attrs["evoopt:cma"]["restart"] for t in plain.trials[1:]} == {0}


def test_a_restart_is_not_told_the_trials_of_the_run_before_it() -> None:
    """Two workers: the trial still running when CMA-ES restarts was sampled from the converged run; the new run's
    first generation is its own popsize of trials (telling the straggler filled it one trial early, pulling the
    new mean back to the old basin). A trial is asked while one runs, so generation 0 is asked popsize + 1 times."""
    study = optuna.create_study(sampler=EvoCmaSampler(seed=0, restart="ipop", popsize=6))
    running: list[tuple[optuna.Trial, float]] = []
    for _ in range(400):
        trial = study.ask()
        running.append((trial, flat(trial)))
        if len(running) == 2:
            study.tell(*running.pop(0))
    infos = [t.system_attrs["evoopt:cma"] for t in study.trials if "evoopt:cma" in t.system_attrs]
    first = Counter(i["restart"] for i in infos if i["generation"] == 0 and i["restart"] > 0)
    assert first == {1: 12 + 1, 2: 24 + 1}


def test_trials_whose_score_is_not_finite_are_told_as_the_worst(monkeypatch: pytest.MonkeyPatch) -> None:
    """A region where merges diverge (x > .6: the score is not finite, the trial fails with ``not_finite``): its
    trials are told, as worse than every finite value of their generation and before it, so CMA-ES learns to leave
    it; a crash is not told."""
    from cmaes import CMA

    told: list[list[float]] = []
    real = CMA.tell
    monkeypatch.setattr(CMA, "tell", lambda self, solutions: (told.append([y for _, y in solutions]),
                                                              real(self, solutions))[1])
    space = {n: optuna.distributions.FloatDistribution(0, 1) for n in ("x", "y")}

    def objective(trial: optuna.Trial) -> float:
        x, y = trial.suggest_float("x", 0, 1), trial.suggest_float("y", 0, 1)
        if trial.number == 5:
            raise RuntimeError("a crash")
        if x > 0.6:
            trial.set_user_attr("not_finite", True)
            raise ValueError("the score is not finite")
        return (x - 0.5) ** 2 + (y - 0.5) ** 2

    sampler = EvoCmaSampler(search_space=space, seed=0, popsize=4)
    study = optuna.create_study(sampler=sampler)
    study.optimize(objective, n_trials=40, catch=(ValueError, RuntimeError))
    failed = {t.number for t in study.trials if t.user_attrs.get("not_finite")}
    (state,) = sampler._states.values()
    assert failed and failed <= set(state.told) and 5 not in state.told
    values = sorted(t.value for t in study.trials if t.value is not None)
    flagged = [y for generation in told for y in generation if y > values[-1]]
    assert told and all(math.isfinite(y) for generation in told for y in generation)
    assert len(flagged) >= len(failed) - len(state.pending)  # every diverged trial told, beyond every finite value
    for generation in told:  # within its generation, ranked last
        finite = [y for y in generation if y <= values[-1]]
        assert all(y > max(finite, default=-math.inf) for y in generation if y > values[-1])


def test_parameters_outside_the_search_are_not_drawn_again_by_a_resumed_study() -> None:
    """A parameter CMA-ES does not search (outside the intersection space) is drawn for its trial alone: one
    RandomSampler seeded once restarted its sequence when the study resumed, so trials 4-7 repeated 0-3's draws."""
    def objective(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", -1, 1) ** 2 + trial.suggest_float(f"z{trial.number % 3}", 0, 1)

    straight = optuna.create_study(sampler=EvoCmaSampler(seed=0))
    straight.optimize(objective, n_trials=8)
    storage = optuna.storages.InMemoryStorage()
    resumed = optuna.create_study(storage=storage, study_name="r", sampler=EvoCmaSampler(seed=0))
    resumed.optimize(objective, n_trials=4)
    resumed = optuna.load_study(storage=storage, study_name="r", sampler=EvoCmaSampler(seed=0))
    resumed.optimize(objective, n_trials=4)
    draws = [[t.params for t in study.trials] for study in (straight, resumed)]
    assert draws[0] == draws[1]
    z = [v for params in draws[0] for name, v in params.items() if name.startswith("z")]
    assert len(set(z)) == 8


def test_finished_generations_add_up_over_restarts() -> None:
    """By hand: restart 0 sampled generations 0 to 2 and was restarted (3 finished), restart 1 is sampling its
    generation 1 (1 finished): 4, where the largest recorded generation says 2."""
    recorded = [(0, 0), (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 1)]
    trials = [SimpleNamespace(system_attrs={"evoopt:cma": {"restart": r, "generation": g, "popsize": 2}})
              for r, g in recorded] + [SimpleNamespace(system_attrs={})]  # a trial of another sampler
    assert finished_generations(cast(Any, trials)) == 4
    assert finished_generations(cast(Any, trials[:4])) == 2 and finished_generations([]) is None


def test_bipop_alternates_population_sizes() -> None:
    study = optuna.create_study(sampler=EvoCmaSampler(seed=0, restart="bipop", popsize=6))
    study.optimize(flat, n_trials=600)
    sizes = [t.system_attrs["evoopt:cma"]["popsize"] for t in study.trials[1:]]
    assert max(sizes) > 6 and min(sizes[sizes.index(max(sizes)):]) < max(sizes)  # a small regime after a large


@pytest.mark.parametrize("seed", [0, 1])
def test_margin_searches_binary_masks(seed: int) -> None:
    """CMA-ES with margin on a 20-bit OneMax: at least 19 bits in 300 trials (random search: p < 1 %)."""
    def onemax(trial: optuna.Trial) -> float:
        return sum(trial.suggest_int(f"b{i:02d}", 0, 1) for i in range(20))

    sampler = EvoCmaSampler(seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(onemax, n_trials=300)
    assert study.best_value >= 19
    assert all(v in (0, 1) and isinstance(v, int) for t in study.trials for v in t.params.values())
    (state,) = sampler._states.values()
    assert isinstance(state.optimizer, CMAwM)  # chosen for a discrete space
    told = study.trials[-1].system_attrs["evoopt:cma"]["x"]  # told with the continuous sample, not the bits
    assert set(told) == set(study.trials[-1].params) and any(v not in (0.0, 1.0) for v in told.values())


def test_warm_start_moves_the_initial_mean() -> None:
    storage = optuna.storages.InMemoryStorage()
    source = optuna.create_study(study_name="source", storage=storage, sampler=optuna.samplers.RandomSampler(seed=0))
    source.optimize(lambda t: (t.suggest_float("x", 0, 1) - 0.9) ** 2 + (t.suggest_float("y", 0, 1) - 0.1) ** 2,
                    n_trials=60)
    space = {n: optuna.distributions.FloatDistribution(0, 1) for n in ("x", "y")}
    target = optuna.create_study(study_name="target", storage=storage,
                                 sampler=EvoCmaSampler(search_space=space, warm_start_study="source", seed=0))
    first = [target.ask(space).params for _ in range(8)]
    assert np.mean([p["x"] for p in first]) > 0.7 and np.mean([p["y"] for p in first]) < 0.3
    with pytest.raises(ValueError, match="warm_start_study"):
        optuna.create_study(storage=storage, sampler=EvoCmaSampler(search_space=space, warm_start_study="target",
                                                                   warm_start_gamma=0.01)).ask(space)


def test_a_warm_start_study_missing_or_too_small_is_refused_before_the_study_is_made() -> None:
    storage = optuna.storages.InMemoryStorage()
    source = optuna.create_study(study_name="source", storage=storage)
    source.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=5)
    EvoCmaSampler(warm_start_study="source", warm_start_gamma=0.2).check_warm_start(storage)  # 5 x 0.2 = 1 trial
    with pytest.raises(ConfigError, match=r"sampler.options.warm_start_study: 'source' has 5 finished trial\(s\); "
                                          r"warm_start_gamma=0.1 needs at least 10"):
        EvoCmaSampler(warm_start_study="source").check_warm_start(storage)
    with pytest.raises(ConfigError, match=r"sampler.options.warm_start_study: no study 'sourse' in this study's "
                                          r"storage; give the name of a study there"):
        EvoCmaSampler(warm_start_study="sourse").check_warm_start(storage)
    EvoCmaSampler().check_warm_start(storage)  # (none asked: nothing read)


def test_sampler_options_are_refused_before_the_space_is_built() -> None:
    """The space may train its experts first (minutes): a misspelt option or a bad value is refused before."""
    def space() -> Any:
        raise AssertionError("the space was built")

    with pytest.raises(ConfigError, match=r"sampler.options: EvoCmaSampler has no option 'sigma'; it takes .*sigma0"):
        make_sampler(SamplerSpec(name="EvoCmaSampler", options={"popsize": 8, "sigma": 0.2}), 0, space)
    with pytest.raises(ConfigError, match=r"sigma0: must be in \(0, 1\]"):
        make_sampler(SamplerSpec(name="EvoCmaSampler", options={"sigma0": 2.0}), 0, space)


def test_every_finished_trial_is_told_under_parallel_workers() -> None:
    sampler = EvoCmaSampler(seed=0, popsize=4)
    study = optuna.create_study(sampler=sampler)
    study.optimize(sphere, n_trials=40, n_jobs=2)
    space = sampler.infer_relative_search_space(study, study.trials[-1])
    sampler.sample_relative(study, study.ask()._cached_frozen_trial, space)
    (state,) = sampler._states.values()
    complete = {t.number for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE}
    assert set(state.told) == complete and len(complete) == 40


@pytest.mark.parametrize("consider", [True, False])
def test_pruned_trials_are_told_so_a_mostly_pruned_search_still_moves(consider: bool) -> None:
    """Every trial starts worse than the pruner's bar: told their last report (the default), CMA-ES moves and
    converges; left out, it never finishes a generation and samples its first distribution for the whole run."""
    def objective(trial: optuna.Trial) -> float:
        value = sphere(trial)
        trial.report(value, 1)  # as evoopt's objectives do: the score so far, the same quantity on fewer examples
        if trial.should_prune():
            raise optuna.TrialPruned()
        return value

    space = {f"x{i}": optuna.distributions.FloatDistribution(-5, 5) for i in range(5)}
    sampler = EvoCmaSampler(search_space=space, x0=0.9, seed=0,  # x = 4 in every dimension: sphere 80
                            **({} if consider else {"consider_pruned_trials": False}))
    study = optuna.create_study(sampler=sampler, pruner=optuna.pruners.ThresholdPruner(upper=30.0))
    study.optimize(objective, n_trials=150)
    generation = max(t.system_attrs["evoopt:cma"]["generation"] for t in study.trials)
    complete = [t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if consider:  # popsize 8: 150 trials are 18 generations
        assert generation == 18 and len(complete) > 100 and min(complete) < 1.0
    else:
        assert generation == 0 and len(complete) < 10 and min(complete, default=30.0) > 5.0


_RUN = textwrap.dedent("""
    import sys, optuna
    from evoopt.search.cma import EvoCmaSampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, n = sys.argv[1], int(sys.argv[2])
    storage = url if url.startswith("sqlite") else optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(url))
    study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                sampler=EvoCmaSampler(seed=3, popsize=5))
    study.optimize(lambda t: sum((t.suggest_float(f"x{i}", -1, 1) - 0.3) ** 2 for i in range(4)), n_trials=n)
    print(repr([t.params for t in study.trials]))
""")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_resume_in_a_fresh_process_continues_the_same_search(tmp_path: Path, kind: str) -> None:
    """12 trials, then 11 more in a new process, sample exactly what one process running 23 samples."""
    def run(name: str, n: int) -> list[dict[str, float]]:
        url = f"sqlite:///{tmp_path / name}.db" if kind == "sqlite" else str(tmp_path / f"{name}.log")
        out = subprocess.run([sys.executable, "-c", _RUN, url, str(n)], capture_output=True, text=True, check=True)
        return eval(out.stdout)  # noqa: S307  (our own repr of floats)

    run("resumed", 12)
    resumed = run("resumed", 11)
    straight = run("straight", 23)
    assert len(resumed) == len(straight) == 23
    assert resumed == straight


def _branched(offsets: dict[str, float]) -> tuple[dict[str, optuna.distributions.BaseDistribution],
                                                   dict[str, dict[str, list[str]]], Callable[[optuna.Trial], float]]:
    """A choice ``m`` among offsets, each with its own two parameters; minimise offset + sphere."""
    space: dict[str, optuna.distributions.BaseDistribution] = {
        "m": optuna.distributions.CategoricalDistribution(list(offsets))}
    branches: dict[str, list[str]] = {}
    for c in offsets:
        branches[c] = [f"{c}:x", f"{c}:y"]
        space.update({n: optuna.distributions.FloatDistribution(-2, 2) for n in branches[c]})

    def objective(trial: optuna.Trial) -> float:
        c = str(trial.suggest_categorical("m", list(offsets)))
        return offsets[c] + sum(trial.suggest_float(n, -2, 2) ** 2 for n in branches[c])

    return space, {"m": branches}, objective


def test_branches_run_one_cma_es_per_choice_and_reject_the_worst_each_round() -> None:
    """Successive rejects with popsize 4: round 1 gives every choice 4 trials; then the worst (offset 3) is
    dropped, round 2 gives the two others 4 more; then the worse of them (offset 1) is dropped and the best
    choice runs alone. Each trial carries its choice's parameters only; a rerun replays every draw."""
    space, branches, objective = _branched({"a": 1.0, "b": 0.0, "c": 3.0})

    def run() -> optuna.Study:
        study = optuna.create_study(sampler=EvoCmaSampler(search_space=space, branches=branches, popsize=4, seed=3))
        study.optimize(objective, n_trials=30)
        return study

    study = run()
    order = [t.params["m"] for t in study.trials]
    assert sorted(order[:12]) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4  # round 1
    assert sorted(order[12:20]) == ["a"] * 4 + ["b"] * 4  # round 2: c rejected
    assert order[20:] == ["b"] * 10  # a rejected: b alone
    for trial in study.trials:
        assert set(trial.params) == {"m", *branches["m"][trial.params["m"]]}
    assert study.best_params["m"] == "b"
    assert [t.params for t in run().trials] == [t.params for t in study.trials]
    with pytest.raises(Exception, match="branches: one categorical parameter"):
        EvoCmaSampler(branches={"m": {}})


def test_branches_restart_from_means_of_their_own() -> None:
    """Two choices of as many parameters restarted from the same mean (the restart's seed named no choice); a
    single search keeps the restart means it had."""
    from evoopt.search.cma import _State

    space, branches, _ = _branched({"a": 0.0, "b": 0.0})
    sampler = EvoCmaSampler(search_space=space, branches=branches, popsize=4, seed=3, restart="ipop")
    means = []
    for choice in ("a", "b"):
        names = tuple(branches["m"][choice])
        state = _State(sampler._optimizer(np.full(2, 0.5), 0.3, 4, None, [space[n] for n in names], seed=0))
        sampler._restart_optimizer(state, names, [space[n] for n in names])
        means.append(state.optimizer.mean)
    assert not np.allclose(means[0], means[1])
    single = EvoCmaSampler(search_space={"x": space["a:x"], "y": space["a:y"]}, popsize=4, seed=3, restart="ipop")
    state = _State(single._optimizer(np.full(2, 0.5), 0.3, 4, None, [space["a:x"]] * 2, seed=0))
    single._restart_optimizer(state, ("x", "y"), [space["a:x"]] * 2)
    np.testing.assert_allclose(state.optimizer.mean, np.random.default_rng([3, 7919, 1]).uniform(0.0, 1.0, 2))


def test_branches_drop_the_same_choices_with_trials_in_flight() -> None:
    """Two workers (a trial always running while the next is asked for): the same successive rejects, c dropped
    after round 1 and a after round 2 (the race ran round-robin while any trial ran: c got a third of them)."""
    space, branches, objective = _branched({"a": 1.0, "b": 0.0, "c": 3.0})
    study = optuna.create_study(sampler=EvoCmaSampler(search_space=space, branches=branches, popsize=4, seed=3))
    running: list[tuple[optuna.Trial, float]] = []
    for _ in range(40):
        trial = study.ask()
        running.append((trial, objective(trial)))  # (its parameters drawn as it starts)
        if len(running) == 2:
            study.tell(*running.pop(0))
    order = [t.params["m"] for t in study.trials]
    assert order.count("c") == 4  # round 1 only
    assert order.count("a") <= 9  # round 1 and 2, and at most one started before round 2's drop
    assert set(order[22:]) == {"b"}


def test_a_crashed_trial_holds_no_slot_in_the_race() -> None:
    """A trial failed without a score (a crash, Ctrl-C) counted as one of its choice's round: the round was decided
    on popsize - 1 values (its retry spilling into the next round). Its slot is given again: c, crashed once, has
    its 4 scored trials before it is dropped."""
    space, branches, objective = _branched({"a": 1.0, "b": 0.0, "c": 3.0})
    study = optuna.create_study(sampler=EvoCmaSampler(search_space=space, branches=branches, popsize=4, seed=3))
    crashed = False
    for _ in range(24):
        trial = study.ask()
        value = objective(trial)
        if not crashed and trial.params["m"] == "c":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            crashed = True
        else:
            study.tell(trial, value)
    scored = [t.params["m"] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert crashed and scored.count("c") == 4 and set(scored[12:]) <= {"a", "b"}


def test_branches_start_from_x0_of_their_own_parameters() -> None:
    """x0 over the whole branched space (a recipe file gives the choice and that choice's parameters): each
    choice's CMA-ES starts from x0's values of its own parameters, the others at the centre (0 in [-2, 2])."""
    space, branches, objective = _branched({"a": 1.0, "b": 0.0})

    def first_round(x0: dict[str, float | str]) -> dict[str, set[tuple[float, float]]]:
        study = optuna.create_study(sampler=EvoCmaSampler(search_space=space, branches=branches, popsize=4, seed=0,
                                                          x0=x0, sigma0=1e-9))
        study.optimize(objective, n_trials=8)  # round 1: four trials of each choice
        return {c: {(round(t.params[f"{c}:x"], 6), round(t.params[f"{c}:y"], 6)) for t in study.trials
                    if t.params["m"] == c} for c in ("a", "b")}

    assert first_round({"m": "a", "a:x": 1.0, "a:y": -1.0}) == {"a": {(1.0, -1.0)}, "b": {(0.0, 0.0)}}
    assert first_round({"a:x": 1.0, "b:y": -1.5}) == {"a": {(1.0, 0.0)}, "b": {(0.0, -1.5)}}
    for x0, error in (({"m": "a", "b:x": 1.0}, r"x0: no parameter\(s\) b:x in the searched parameters of m 'a'"),
                      ({"m": "z"}, "x0.m: one of a, b, got 'z'"), ({"q": 1.0}, r"x0: no parameter\(s\) q in the"),
                      ({"a:x": 3.0}, r"x0: a:x=3.0 is outside its distribution")):
        with pytest.raises(ValueError, match=error):  # at once, not at the first trial of the branch
            EvoCmaSampler(search_space=space, branches=branches, x0=x0)
