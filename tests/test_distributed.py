"""Distributed studies on a real PostgreSQL server (started by a fixture): four worker processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from optuna.trial import TrialState

from evoopt.data.outcomes import trial_outcomes
from evoopt.search.evolver import ATTR
from tests.helpers.evolver import GENERATIONS, in_process, population_after
from tests.helpers.studies import small_study_config, write_study_config

ROOT = Path(__file__).parent.parent

# a PostgreSQL server, worker processes or real MiniLM experts in every test
pytestmark = pytest.mark.slow


def test_the_server_is_real_and_the_documented_url_opens_it(postgres_url: str) -> None:
    from evoopt.study.run import storage_from_url

    assert postgres_url.startswith("postgresql://")  # as the README writes it, no +driver
    storage = storage_from_url(postgres_url)
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert (storage.engine.dialect.name, storage.engine.dialect.driver) == ("postgresql", "psycopg")
    optuna.create_study(study_name="opened", storage=storage)
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["opened"]


def test_a_plain_url_takes_psycopg2_when_psycopg_is_not_installed(postgres_url: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from evoopt.study.run import storage_from_url

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "psycopg" else find_spec(name, *a))
    storage = storage_from_url(postgres_url)
    assert isinstance(storage, optuna.storages.RDBStorage) and storage.engine.dialect.driver == "psycopg2"
    optuna.create_study(study_name="opened-by-psycopg2", storage=storage)


def test_four_evolver_workers_on_postgresql_reach_the_single_process_population(
        llama_family: list[Path], postgres_url: str, reference: Any) -> None:
    optuna.create_study(study_name="tiny-evolver", storage=postgres_url, direction="maximize")
    workers = [in_process(postgres_url, llama_family, 15, sleep=0.2) for _ in range(4)]
    assert [w.wait() for w in workers] == [0, 0, 0, 0]
    study = optuna.load_study(study_name="tiny-evolver", storage=postgres_url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    slots = [(t.system_attrs[ATTR]["generation"], t.system_attrs[ATTR]["target"]) for t in complete]
    assert len(slots) == len(set(slots)), "two trials evaluated one offspring"
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING)), "a trial was left behind"
    history, population = population_after(postgres_url, [str(p) for p in llama_family], GENERATIONS)
    assert history.accepted == reference[0].accepted and history.fitness == reference[0].fitness
    assert all(torch.equal(a, b) for a, b in zip(population, reference[1]))


def test_four_cma_workers_through_the_engine_keep_the_budget_and_tell_every_trial(
        small_experts: Any, postgres_url: str, tmp_path: Path) -> None:
    """`evoopt worker` x 4 on one PostgreSQL study of real MiniLM experts, evoopt's CMA-ES."""
    from evoopt.search.cma import EvoCmaSampler

    experts, _ = small_experts
    budget = 10
    path = write_study_config(tmp_path, small_study_config(
        tmp_path, experts, name="pg-cma", trials=budget, sampler={"name": "EvoCmaSampler", "options": {"popsize": 4}},
        objective={"limit": 20, "test_limit": 20, "batch_size": 20, "max_length": 48}))
    command = [sys.executable, "-m", "evoopt.cli", "worker", str(path), "--storage", postgres_url]
    workers = [subprocess.Popen([*command, "--index", str(i)], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True) for i in range(4)]
    outputs = [w.communicate()[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, "\n".join(o[-3000:] for o in outputs)
    study = optuna.load_study(study_name="pg-cma", storage=postgres_url)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == budget  # the budget, not one more
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    over = study.get_trials(states=(TrialState.FAIL,))
    assert all("budget" in t.user_attrs.get("fail_reason", "") for t in over), [  # only trials that never ran
        (t.number, t.user_attrs, t.system_attrs) for t in over]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == budget  # none sampled twice
    for trial in complete:  # each worker kept its trials' per-example outcomes in the shared storage
        outcomes = trial_outcomes(trial)
        assert outcomes is not None and outcomes.size == 40
        assert outcomes.scores() == pytest.approx(trial.user_attrs["scores"])
    # the sampler's state: a fresh sampler rebuilt from the storage has told every finished trial
    sampler = EvoCmaSampler(seed=0, popsize=4)
    fresh = optuna.load_study(study_name="pg-cma", storage=postgres_url, sampler=sampler)
    space = sampler.infer_relative_search_space(fresh, complete[-1])
    sampler._state(fresh, tuple(sorted(space)), [space[n] for n in sorted(space)])
    (state,) = sampler._states.values()
    assert sorted(state.told) == sorted(t.number for t in complete)


def test_killed_five_times_at_random_moments_the_study_loses_nothing(llama_family: list[Path], tmp_path: Path,
                                                                     reference: Any) -> None:
    """SIGKILL mid-merge, mid-evaluation or mid-write (seeded random moments), resume each time."""
    import signal
    import time

    import numpy as np

    storage = f"sqlite:///{tmp_path}/study.db"
    optuna.create_study(study_name="tiny-evolver", storage=storage, direction="maximize")
    rng = np.random.default_rng(0)
    seen: dict[int, float] = {}  # completed trials before each kill: number -> value
    kills = 0
    while kills < 5:
        process = in_process(storage, llama_family, 15, sleep=0.3)
        started = len(_trials(storage))
        while len(_trials(storage)) == started and process.poll() is None:  # its first trial has begun
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.0, 1.5)))
        if process.poll() is not None:
            break  # it finished the study before this kill
        process.send_signal(signal.SIGKILL)
        process.wait()
        kills += 1
        seen.update({t.number: t.value for t in _trials(storage) if t.state == TrialState.COMPLETE})
    assert kills == 5
    assert in_process(storage, llama_family, 15).wait() == 0  # the last run finishes the study
    final = _trials(storage)  # the storage is readable
    complete = {t.number: t.value for t in final if t.state == TrialState.COMPLETE}
    assert all(complete.get(n) == v for n, v in seen.items()), "a completed trial was lost"
    failed = [t for t in final if t.state == TrialState.FAIL]
    assert failed, "no kill landed inside a trial"
    done = {(t.system_attrs[ATTR]["generation"], t.system_attrs[ATTR]["target"]) for t in final
            if t.state == TrialState.COMPLETE}
    for trial in failed:  # every killed trial's offspring was evaluated again
        slot = trial.system_attrs.get(ATTR)
        assert slot is None or (slot["generation"], slot["target"]) in done
    history, population = population_after(storage, [str(p) for p in llama_family], GENERATIONS)
    assert history.accepted == reference[0].accepted and history.fitness == reference[0].fitness
    assert all(torch.equal(a, b) for a, b in zip(population, reference[1]))


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="tiny-evolver", storage=storage).get_trials()


def test_the_workers_environment_is_read_only_by_run_workers_own_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    """EVOOPT_WORKER_STORAGE / EVOOPT_TRIAL_TARGET left in a user's shell redirected a plain run's storage, or
    lowered its budget (or, not a number, failed with a ValueError)."""
    from evoopt.study.run import _LOCAL_WORKER_ENV, _TARGET_ENV, WORKER_STORAGE_ENV, from_parent

    monkeypatch.setenv(WORKER_STORAGE_ENV, "sqlite:///elsewhere.db")
    monkeypatch.setenv(_TARGET_ENV, "abc")
    monkeypatch.delenv(_LOCAL_WORKER_ENV, raising=False)
    assert from_parent(WORKER_STORAGE_ENV) is None and from_parent(_TARGET_ENV) is None
    monkeypatch.setenv(_LOCAL_WORKER_ENV, "1")
    assert from_parent(WORKER_STORAGE_ENV) == "sqlite:///elsewhere.db"
