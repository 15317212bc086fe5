"""A tiny M2N2 study (three tiny Llama experts, a cheap fitness with per-example outcomes), run in this process
or in a fresh one: determinism tests compare the archive such runs reach with an uninterrupted process's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch

from evoopt.search.m2n2 import ATTR, replay
from tests.helpers.evolver import ROOT, run_until

GENERATIONS = 5  # generation 0 (three experts), then five generations of two children: 13 trials
OPTIONS = {"archive": 4, "brood": 2, "poll": 0.05}  # children join until 4 members, then compete


def _experts(paths: list[str]) -> tuple[list[Any], list[str]]:
    from evoopt.models.io import open_source

    experts = [open_source(Path(p)) for p in paths[1:]]
    return experts, sorted(experts[0].keys())


def tiny_study(storage: str, paths: list[str], *, trials: int, sleep: float = 0.0) -> None:
    """An M2N2 study over three tiny Llama experts. An "example" is a random probe p: the candidate x solves it
    when |p . (x - goal)| is below the experts' median on it (goal: their mean): real per-example outcomes."""
    from evoopt.data.outcomes import Outcomes, TaskOutcomes, record_outcomes
    from evoopt.search.archive import Archive
    from evoopt.search.samplers import base_seed, make_sampler
    from evoopt.study.config import parse_config
    from evoopt.study.kinds import make_kind

    config = parse_config({"name": "tiny-m2n2", "sources": {"base": paths[0], "models": paths[1:],
                                                            "tasks": ["vader-tweets"]},
                           "space": {"kind": "m2n2"}, "sampler": {"name": "M2N2Sampler", "options": OPTIONS},
                           "trials": trials, "seed": 5})
    kind = make_kind(config)
    sampler = make_sampler(config.sampler, base_seed(config.sampler, config.seed), lambda: kind.space)
    experts, names = _experts(paths)
    archive = Archive(experts, names, dtype=torch.float32)
    out = {n: torch.empty(experts[0].shape(n)) for n in names}
    flat = lambda tensors: torch.cat([tensors[n].flatten() for n in names])  # noqa: E731
    goal = sum(flat({n: e.get(n) for n in names}) for e in experts) / 3
    probes = torch.randn(40, goal.numel(), generator=torch.Generator().manual_seed(0))
    threshold = torch.stack([(probes @ (flat({n: e.get(n) for n in names}) - goal)).abs() for e in experts]).median(0)
    ids = np.arange(len(probes))

    def objective(trial: optuna.Trial) -> float:
        offspring = kind.space.suggest(trial)
        archive.advance(sampler.history(trial.study), max(offspring.generation - 1, 0))  # type: ignore[attr-defined]
        archive.write(out, offspring.child, member=offspring.member)
        solved = ((probes @ (flat(out) - goal)).abs() < threshold.values).numpy()
        record_outcomes(trial, Outcomes("accuracy", {"probes": TaskOutcomes(ids, solved)}))
        time.sleep(sleep)
        return float(solved.mean())

    run_until(storage, config.name, sampler, objective, trials)


def archive_after(storage: str, paths: list[str], generation: int) -> tuple[Any, list[torch.Tensor]]:
    """The history up to ``generation`` and the archive it gives (each member flattened), from the stored trials."""
    from evoopt.search.archive import Archive

    study = optuna.load_study(study_name="tiny-m2n2", storage=storage)
    trials = [t for t in study.get_trials() if t.system_attrs.get(ATTR, {}).get("generation", 99) <= generation]
    history = replay(trials, members=3, size=OPTIONS["archive"], brood=OPTIONS["brood"], alpha=1.0, maximize=True)
    assert history.generation == generation + 1, "the study did not finish the generations compared"
    experts, names = _experts(paths)
    archive = Archive(experts, names, dtype=torch.float32)
    archive.advance(history, generation)
    return history, [torch.cat([m[n].flatten() for n in names]) for m in archive.members]


def in_process(storage: str, paths: list[Path], trials: int, sleep: float = 0.0) -> Any:
    """``tiny_study`` in a fresh Python process (a Popen)."""
    code = (f"from tests.helpers.m2n2 import tiny_study; tiny_study({storage!r}, {[str(p) for p in paths]!r}, "
            f"trials={trials}, sleep={sleep})")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)
