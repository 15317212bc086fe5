"""A tiny Evolver study (three tiny Llama experts, a cheap fitness) run in this process or in a fresh one.

Determinism tests compare the population such runs reach with the one an uninterrupted process reaches
(the ``reference`` fixture).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from evoopt.search.evolver import ATTR, replay

GENERATIONS = 4  # after generation 0 (three experts) and four generations of three offspring: 15 trials
ROOT = Path(__file__).resolve().parents[2]  # the repository: `tests.helpers` imports from there


def tiny_study(storage: str, paths: list[str], *, trials: int, sleep: float = 0.0, method: str = "none") -> None:
    """An Evolver study over three tiny Llama experts; fitness: closeness of the candidate to the experts' mean.

    The fitness is real and cheap (no data): the same evolution code as a study's, another objective.
    ``method``: ``task_arithmetic`` for X_Evolver: X(P) is the population's mean, and the goal the first expert
    (offspring moved towards it win).
    """
    from evoopt.merge import get_method
    from evoopt.models.io import open_source
    from evoopt.search.population import Population
    from evoopt.search.samplers import base_seed, make_sampler
    from evoopt.study.config import parse_config
    from evoopt.study.kinds import make_kind
    from evoopt.study.space import EvolverSpace, study_sources

    config = parse_config({"name": "tiny-evolver", "sources": {"base": paths[0], "models": paths[1:],
                                                               "tasks": ["vader-tweets"]},
                           "space": {"kind": "evolver", "method": method},
                           "sampler": {"name": "EvolverSampler", "options": {"poll": 0.05, "F": 0.8, "Cr": 0.6,
                                                                           "strategy": "released"}},
                           "trials": trials, "seed": 3})
    sources = study_sources(config)
    space = make_kind(config, sources).space
    assert isinstance(space, EvolverSpace)
    sampler = make_sampler(config.sampler, base_seed(config.sampler, config.seed), lambda: space)
    experts = [open_source(Path(p)) for p in paths[1:]]
    names = sorted(experts[0].keys())
    goal = {n: sum(e.get(n) for e in experts) / 3 if method == "none" else experts[0].get(n) for n in names}
    x = {"method": get_method(method), "base": open_source(Path(paths[0])),
         "coefficients": lambda name, n: {"weight": [1 / n] * n, "scale": 1.0}} if method != "none" else {}
    population = Population(experts, names, dtype=torch.float32, **x)
    out = {n: torch.empty(experts[0].shape(n)) for n in names}

    def objective(trial: optuna.Trial) -> float:
        candidate = space.suggest(trial)
        history = sampler.history(trial.study)  # type: ignore[attr-defined]
        population.advance(history, max(candidate.generation - 1, 0))
        if candidate.target == 3:  # X_Evolver: the generation's winners together
            population.write(out, together=history.together[candidate.generation].moves)
        else:
            population.write(out, candidate.move, individual=candidate.target)
        time.sleep(sleep)
        return -float(sum(((out[n] - goal[n]) ** 2).sum() for n in names))

    run_until(storage, config.name, sampler, objective, trials)


def run_until(storage: str, name: str, sampler: optuna.samplers.BaseSampler, objective: Any, trials: int) -> None:
    """Create or resume the study and run it until it has ``trials`` finished trials."""
    from evoopt.study.run import storage_from_url

    # heartbeats as in a study: a trial of a killed process is failed after 2 s and its slot taken again
    opened = storage_from_url(storage, heartbeat_interval=1, grace_period=2, retry=False)
    study = optuna.create_study(study_name=name, storage=opened, sampler=sampler, direction="maximize",
                                load_if_exists=True)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    left = trials - len(study.get_trials(states=done))
    if left > 0:
        study.optimize(objective, n_trials=left, callbacks=[optuna.study.MaxTrialsCallback(trials, states=done)])


def population_after(storage: str, paths: list[str], generation: int, *,
                     integrated: bool = False) -> tuple[Any, list[torch.Tensor]]:
    """The history up to ``generation`` and the population P_generation it gives, from the stored trials."""
    from evoopt.models.io import open_source
    from evoopt.search.population import Population

    study = optuna.load_study(study_name="tiny-evolver", storage=storage)
    trials = [t for t in study.get_trials() if t.system_attrs.get(ATTR, {}).get("generation", 99) <= generation]
    history = replay(trials, size=3, integrated=integrated, maximize=True, f=0.8, cr=0.6)
    assert history.generation == generation + 1, "the study did not finish the generations compared"
    experts = [open_source(Path(p)) for p in paths[1:]]
    population = Population(experts, sorted(experts[0].keys()), dtype=torch.float32)
    population.advance(history, generation)
    return history, [torch.cat([t.flatten() for t in population.tensors(n)]) for n in population.names]


def in_process(storage: str, paths: list[Path], trials: int, sleep: float = 0.0, method: str = "none") -> Any:
    """``tiny_study`` in a fresh Python process (a Popen)."""
    code = (f"from tests.helpers.evolver import tiny_study; tiny_study({storage!r}, {[str(p) for p in paths]!r}, "
            f"trials={trials}, sleep={sleep}, method={method!r})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
