"""Method search (space.kind methods): the method as a categorical choice with its own coefficients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from evoopt.errors import ConfigError
from evoopt.study.config import parse_config

SOURCES = {"base": "b", "models": ["m1", "m2"], "tasks": ["vader-tweets"]}


def _problems(space: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config({"name": "k", "sources": SOURCES, "space": space})
    return str(caught.value)


def test_method_search_config_errors_name_the_key_and_the_fix() -> None:
    message = _problems({"kind": "methods", "methods": {
        "tiez": {"search": {"weight": [0, 1]}},
        "fisher": {"search": {"weight": [0, 1]}},
        "ties": {"search": {"lambda": [0, 1], "density": [1, 0]}, "fixed": {"gamma": 0.1},
                 "start": {"density": 2.0, "weight": 1.0}}}})
    assert "space.methods.tiez: unknown merge method 'tiez'" in message
    assert "space.methods.fisher: fisher needs data statistics (fisher)" in message
    assert "space.methods.ties.search.lambda: 'ties' has no per-model coefficient 'lambda'" in message
    assert "space.methods.ties.search.density: bounds must be [low, high] with low < high" in message
    assert "space.methods.ties.fixed.gamma: 'ties' has no coefficient 'gamma'" in message
    assert "space.methods.ties.start.density: 2.0 lies outside the search bounds [1.0, 0.0]" in message
    assert "space.methods.ties.start.weight: not a searched coefficient of 'ties'" in message
    assert "space.methods.ties.start: no value for density; give every searched coefficient a start, or no start" \
        in _problems({"kind": "methods", "methods": {"ties": {"search": {"weight": [0, 1.5], "density": [0.1, 1]},
                                                              "start": {"weight": 1.0}}}})
    assert "space.search: not used by space.kind methods; give it per method in space.methods.<method>.search" in \
        _problems({"kind": "methods", "search": {"weight": [0, 2]}})
    logs = _problems({"kind": "methods", "methods": {"ties": {"search": {"weight": [0, 1], "density": [0.1, 1]},
                                                             "log": ["weight", "gamma"]}}})
    assert "space.methods.ties.search.weight: a log-scale coefficient needs low > 0, got 0.0" in logs
    assert "space.methods.ties.log: 'gamma' is not searched (space.methods.ties.search has weight, density)" in logs
    assert "space.methods: only for space.kind methods or methods-layerwise" in _problems(
        {"kind": "global", "methods": {"ties": {"search": {"weight": [0, 1]}}}})
    parse_config({"name": "k", "sources": SOURCES, "space": {"kind": "methods-layerwise", "layers_per_group": 2}})
    # sources without a base: every method that needs one is named before the baselines (it failed after them)
    with pytest.raises(ConfigError) as caught:
        parse_config({"name": "k", "sources": {"models": ["m1", "m2"], "tasks": ["vader-tweets"]},
                      "space": {"kind": "methods"}})
    assert "space.methods.ties: 'ties' needs a base (pretrained) model; give sources.base" in str(caught.value)
    assert "space.methods.iso_cts: 'iso_cts' needs a base" in str(caught.value)


def test_the_method_space_names_each_methods_own_parameters() -> None:
    from evoopt.study.kinds import make_kind
    from evoopt.study.kinds.methods import DEFAULT_METHODS, MethodSpace

    config = parse_config({"name": "k", "sources": SOURCES, "space": {"kind": "methods"}})
    space = make_kind(config).space
    assert isinstance(space, MethodSpace) and list(space.spaces) == list(DEFAULT_METHODS)
    assert set(space.distributions) == {"method", "ties:m1.weight", "ties:m1.density", "ties:m2.weight",
                                        "ties:m2.density", "dare_ties:m1.weight", "dare_ties:m1.density",
                                        "dare_ties:m2.weight", "dare_ties:m2.density", "della:m1.weight",
                                        "della:m1.density", "della:m2.weight", "della:m2.density",
                                        "tsv:m1.weight", "tsv:m2.weight", "iso_cts:m1.weight", "iso_cts:m2.weight"}
    branches = space.sampler_options()["branches"]["method"]
    assert branches["tsv"] == ["tsv:m1.weight", "tsv:m2.weight"]
    params = {"method": "della", "della:m1.weight": 0.7, "della:m1.density": 0.4, "della:m2.weight": 1.1,
              "della:m2.density": 0.6, "tsv:m1.weight": 9.0}  # another method's parameter is ignored
    recipe = space.recipe(params)
    assert recipe.method == "della" and recipe.coefficients("x", 2) == {
        "weight": [0.7, 1.1], "density": [0.4, 0.6], "epsilon": [0.1, 0.1], "scale": 1.0, "normalize": True}
    assert space.params(recipe) == {k: v for k, v in params.items() if not k.startswith("tsv")}
    assert space.starts()[3] == {"method": "tsv", "tsv:m1.weight": 1.0, "tsv:m2.weight": 1.0}
    # Iso-CTS's flat spectrum wants a larger scale: its weights reach 6 (the others' 1.5)
    assert space.distributions["iso_cts:m1.weight"].high == 6.0 and space.distributions["tsv:m1.weight"].high == 1.5


def test_a_start_that_failed_unscored_is_enqueued_again_and_a_refused_run_takes_back_its_starts() -> None:
    """A start trial failed without a score (Ctrl-C before it ran, the budget reached, a crash) counted as the
    method's start: every later run took it for done, and the method was never scored at its start. One rejected
    on its own score (not finite) counts. The enqueued starts (and a data-flow study's pinned pool) are what the
    maker writes, not results: a run refused after them takes its study back (it kept it, refusing the corrected
    config's name)."""
    import optuna
    from optuna.trial import TrialState

    from evoopt.search.evolver import NOT_FINITE
    from evoopt.study.kinds import make_kind
    from evoopt.study.storage import holds_results

    kind = make_kind(parse_config({"name": "k", "sources": SOURCES, "space": {"kind": "methods"}}))
    study = optuna.create_study(direction="maximize")
    kind.start(study)
    starts = [t.user_attrs["start"] for t in study.trials]
    assert len(starts) == 5 and not holds_results(study)
    study.set_user_attr("evoopt:pool", {"study:ps.yaml": 3})
    assert not holds_results(study)
    trial = study.ask()  # the first start, failed unrun
    study.tell(trial, state=TrialState.FAIL)
    rejected = study.ask()  # the second, failed on its own score
    study._storage.set_trial_user_attr(rejected._trial_id, NOT_FINITE, True)
    study.tell(rejected, state=TrialState.FAIL)
    assert holds_results(study)
    kind.start(study)
    again = [t.user_attrs["start"] for t in study.get_trials(states=(TrialState.WAITING,))]
    assert again == [*starts[2:], starts[0]]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["TPESampler", "EvoCmaSampler"])
def test_a_method_search_study_starts_from_known_settings_and_merges_each_method(
        small_experts: Any, tmp_path: Path, sampler: str) -> None:
    """On the small real experts: the starts first (one per method), then the sampler's trials; every trial's
    model is its method's merge (rebuilt from its parameters, exported); TPE and the CMA-ES per method both run."""
    import torch
    from optuna.trial import TrialState

    from evoopt.merge.merger import Merger
    from evoopt.study.kinds import make_kind
    from evoopt.study.run import export_trial, run_study
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts
    methods = {"ties": {"search": {"weight": [0.2, 1.2], "density": [0.2, 1.0]}, "start": {"weight": 1.0,
                                                                                           "density": 0.5}},
               "tsv": {"search": {"weight": [0.2, 1.2]}, "start": {"weight": 1.0}},
               "della": {"search": {"weight": [0.2, 1.2], "density": [0.3, 0.7]}, "fixed": {"epsilon": 0.1}}}
    data = small_study_config(tmp_path, experts, name=f"methods-{sampler}", trials=7,
                              space={"kind": "methods", "methods": methods}, sampler={"name": sampler})
    config = parse_config(data, root=tmp_path)
    # in two calls sharing one kind (as fitness_search.py's stops do): the methods' Mergers, with their
    # preparation (TSV-M's basis, DELLA's ranks), are built once
    kind = make_kind(config)
    # the first call as a worker of another number (`evoopt worker` started before `evoopt run`): the process
    # that makes the study enqueues the starts (only worker 0 did: the starts came once the budget was spent)
    run_study(config.model_copy(update={"trials": 4}), report=False, kind=kind, worker_index=7)
    built = dict(kind.mergers)  # type: ignore[attr-defined]
    assert {"ties", "tsv"} <= set(built)  # (the starts; worker 7's TPE seed may or may not draw della among 4)
    # on the GPU path every method's Merger leaves the evaluation the first one's reserve (None on a CPU)
    assert {m.gpu_reserve for m in built.values()} == {kind.merger.gpu_reserve}  # type: ignore[attr-defined]
    study = run_study(config, kind=kind).study
    assert all(kind.mergers[name] is merger for name, merger in built.items())  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="kind: built for study"):
        run_study(config.model_copy(update={"name": "another"}), kind=kind)
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 7
    # the starts are enqueued once each: a start missing (another worker's first trials came before, or a crash
    # mid-enqueue) is enqueued; one among the trials is not again (it enqueued only into an empty study)
    import optuna

    partial = optuna.create_study(direction="maximize")
    partial.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"start": "ties"}))
    for _ in range(2):
        kind.start(partial)
        assert [t.user_attrs.get("start") for t in partial.get_trials(states=(TrialState.WAITING,))] == ["tsv"]
    raced = optuna.create_study(direction="maximize")  # a method the race has trials of gets no start
    raced.add_trial(optuna.trial.create_trial(value=0.5, params={"method": "tsv"}, distributions={
        "method": optuna.distributions.CategoricalDistribution(["ties", "tsv", "della"])}))
    kind.start(raced)
    assert [t.user_attrs.get("start") for t in raced.get_trials(states=(TrialState.WAITING,))] == ["ties"]
    assert [(t.params["method"], t.user_attrs.get("start")) for t in trials[:2]] == [("ties", "ties"),
                                                                                       ("tsv", "tsv")]
    labels = [name for name in space_labels(config)]
    assert trials[1].params == {"method": "tsv", **{f"tsv:{label}.weight": 1.0 for label in labels}}
    for trial in trials:
        assert trial.user_attrs["recipe"]["method"] == trial.params["method"]
        assert all(name == "method" or name.startswith(trial.params["method"] + ":") for name in trial.params)
    kind = make_kind(config)  # a fresh one: the model rebuilt from the parameters alone
    best = study.best_trial
    kind.built(study)
    model = kind.trial_model(best.params)
    expected = Merger(kind.recipe(best.params)).merge()
    for (name, mine), theirs in zip(model.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(mine, theirs), name
    out = export_trial(config, "best", tmp_path / "best")
    assert (out / "config.json").exists()


def space_labels(config: Any) -> list[str]:
    from evoopt.study.kinds import make_kind

    return list(make_kind(config).sources.labels)
