"""Racing: the paired test by hand, and the pruner on crafted outcomes in a real Optuna study."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import optuna
import pytest

from evoopt.data.outcomes import (
    OUTCOMES_ATTR,
    Outcomes,
    TaskOutcomes,
    encode,
    paired_decision,
    paired_test,
    record_outcomes,
)
from evoopt.errors import ConfigError
from evoopt.search.racing import RacingPruner


def _right(values: list[int], start: int = 0) -> Outcomes:
    return Outcomes("accuracy", {"t": TaskOutcomes(np.arange(start, start + len(values)), np.asarray(values, bool))})


def test_paired_test_by_hand() -> None:
    # right or wrong: d = candidate - incumbent = [0, -1, 0, -1], 2 disagreements, both for the incumbent: McNemar's
    # exact p = 2^-2 = .25 (the normal approximation on the sample variance said z = 1.7321, p = .0416: pruned on
    # two examples)
    p, better, shared = paired_test(_right([1, 0, 1, 0]), _right([1, 1, 1, 1]), maximize=True)
    assert (better, shared, p) == (-0.5, 4, 0.25)
    # losses: d = [0, -1, 0, -1] (x 2): t = 1 / sqrt(4/3 / 4) = sqrt(3) on 3 degrees of freedom, whose tail is
    # 1/2 - (atan(t / sqrt 3) + (t / sqrt 3) / (1 + t^2 / 3)) / pi = 1/2 - (pi/4 + 1/2) / pi = 0.090845 (the
    # normal's, P(Z >= 1.7321) = 0.041632, was too sure on 4 examples); the same numbers minimised: better
    as_losses = [Outcomes("mse", {"t": TaskOutcomes(np.arange(4), np.asarray(v, np.float32) * 2)})
                 for v in ([1, 0, 1, 0], [1, 1, 1, 1])]
    p, better, _ = paired_test(*as_losses, maximize=True)
    assert better == -1.0 and p == pytest.approx(0.5 - (math.pi / 4 + 0.5) / math.pi, abs=1e-9)
    assert p == pytest.approx(0.090845, abs=1e-6)
    losses = [Outcomes("mse", {"t": TaskOutcomes(np.arange(4), np.asarray(v, np.float32))})
              for v in ([1, 0, 1, 0], [1, 1, 1, 1])]
    p, better, _ = paired_test(*losses, maximize=False)
    assert better == 0.5 and p == pytest.approx(1 - 0.090845, abs=1e-6)
    # only the examples both scored count: the incumbent scored 0..5, the candidate 4..7
    p, better, shared = paired_test(_right([0, 0, 1, 1], start=4), _right([1, 1, 1, 1, 1, 1]), maximize=True)
    # wrong on both, no variance: the exact sign test, 2 of 2 worse, p = 2^-2 (the z-test said 0: surely worse)
    assert shared == 2 and better == -1.0 and p == 0.25
    # two tasks, weights 3 and 1: D = 3/4 * (-0.5) + 1/4 * 0
    two = Outcomes("accuracy", {"a": TaskOutcomes(np.arange(4), np.array([1, 0, 1, 0], bool)),
                                "b": TaskOutcomes(np.arange(2), np.array([1, 1], bool))})
    top = Outcomes("accuracy", {"a": TaskOutcomes(np.arange(4), np.ones(4, bool)),
                                "b": TaskOutcomes(np.arange(2), np.ones(2, bool))})
    assert paired_test(two, top, maximize=True, weights={"a": 3, "b": 1})[1] == pytest.approx(-0.375)


def test_perplexity_is_tested_as_the_mean_of_the_tasks_perplexities() -> None:
    """Task a at perplexity 100, b at 5; the candidate loses .05 nat a token on a and gains .1 on b (50 tokens an
    example, 200 examples each). The study's value: 52.5 against 54.8 (minimised: worse), as the test now finds;
    on the summed losses it found the candidate better (2.5 nats an example lost on a, 5 gained on b)."""
    rng = np.random.default_rng(0)
    tokens = np.full(200, 50.0)

    def outcomes(nll_a: float, nll_b: float) -> Outcomes:
        return Outcomes("perplexity", {task: TaskOutcomes(np.arange(200), (50 * nll + rng.normal(0, 1, 200))
                                                          .astype(np.float32), tokens)
                                       for task, nll in (("a", nll_a), ("b", nll_b))})

    incumbent, candidate = outcomes(math.log(100), math.log(5)), outcomes(math.log(100) + 0.05, math.log(5) - 0.1)
    assert np.mean(list(candidate.scores().values())) > np.mean(list(incumbent.scores().values())) + 2
    p, better, shared = paired_test(candidate, incumbent, maximize=False)
    assert p < 0.001 and shared == 200
    expected = np.mean(list(incumbent.scores().values())) - np.mean(list(candidate.scores().values()))
    assert better == pytest.approx(expected, rel=1e-9)  # perplexity points, exactly (the secant)


def test_perplexity_trading_between_tasks_is_tested_by_the_exact_difference() -> None:
    """Both tasks at perplexity 10; the candidate loses .5 nat a token on a (16.5) and gains .6 on b (5.5): mean
    11.0 against 10.0, worse. Scaled by the incumbent's slope alone (the delta method), exp's convexity made it
    test better (p_worse 1.0, accepted); with the secant the difference is the perplexities' to rounding."""
    rng = np.random.default_rng(1)
    tokens = np.full(200, 20.0)
    base = {task: 20 * math.log(10) + rng.normal(0, 0.5, 200) for task in ("a", "b")}
    incumbent = Outcomes("perplexity", {t: TaskOutcomes(np.arange(200), v.astype(np.float32), tokens)
                                        for t, v in base.items()})
    candidate = Outcomes("perplexity", {t: TaskOutcomes(np.arange(200), (v + 20 * shift + rng.normal(0, 0.1, 200))
                                                        .astype(np.float32), tokens)
                                        for (t, v), shift in zip(base.items(), (0.5, -0.6))})
    values = [np.mean(list(o.scores().values())) for o in (candidate, incumbent)]
    assert values[0] > values[1] + 0.9
    decided, record = paired_decision(candidate, incumbent, maximize=False, alpha=0.05, final=True)
    assert decided == "rejected" and record["p_worse"] < 1e-6
    assert record["difference"] == pytest.approx(values[1] - values[0], abs=1e-6)


def test_constant_differences_are_weighed_by_their_size_and_task() -> None:
    """mse: task a's 2 examples each 1.0 worse, task b's 50 each 0.01 better: the study's value is worse by .495.
    An unweighted sign test counted 50 votes to 2 for the candidate (p_better 3e-13: accepted); each difference
    now weighs w_t |d_t| / n_t, .25 against .0001: D = -.495, null sd .354, p_better .92."""
    def mse(a: float, b: float) -> Outcomes:
        return Outcomes("mse", {"a": TaskOutcomes(np.arange(2), np.full(2, a, np.float32)),
                                "b": TaskOutcomes(np.arange(50), np.full(50, b, np.float32))})

    decided, record = paired_decision(mse(1.0, 0.49), mse(0.0, 0.5), maximize=False, alpha=0.05, final=True)
    assert decided == "rejected" and record["difference"] == pytest.approx(-0.495, abs=1e-6)
    assert record["p_better"] == pytest.approx(0.9192, abs=1e-3)
    assert record["p_worse"] == pytest.approx(0.0808, abs=1e-3)
    # one task, equal differences: the exact binomial as before (5 of 5 better: 2^-5)
    one = paired_decision(Outcomes("mse", {"t": TaskOutcomes(np.arange(5), np.full(5, 0.25, np.float32))}),
                          Outcomes("mse", {"t": TaskOutcomes(np.arange(5), np.full(5, 0.75, np.float32))}),
                          maximize=False, alpha=0.05, final=True)
    assert one[0] == "accepted" and one[1]["p_better"] == 0.03125


def test_a_non_finite_loss_decides_by_the_sign_of_the_difference() -> None:
    """mse: a candidate 0.01 better on 99 examples and inf on one has an infinite mse: certainly worse (it was
    accepted: inf made the variance NaN, and the unweighted sign test counted 99 to 1); the other way round,
    certainly better; inf against inf on different examples is undefined, never better. Racing prunes it."""
    values = np.random.default_rng(0).uniform(0, 1.1, 100).astype(np.float32)
    broken = values - 0.01
    broken[5] = np.inf
    good, bad = (Outcomes("mse", {"t": TaskOutcomes(np.arange(100), v)}) for v in (values, broken))
    assert paired_decision(bad, good, maximize=False, alpha=0.05, final=False)[0] == "rejected"
    decided, record = paired_decision(good, bad, maximize=False, alpha=0.05, final=True)
    assert decided == "accepted" and record["difference"] == math.inf
    other = values.copy()
    other[7] = np.inf
    both = Outcomes("mse", {"t": TaskOutcomes(np.arange(100), other)})
    assert paired_decision(both, bad, maximize=False, alpha=0.05, final=True)[1]["p_better"] == 1.0
    assert paired_test(bad, good, maximize=False)[0] == 0.0  # (RacingPruner prunes below alpha)


def _study_with_incumbent(direction: str = "maximize") -> optuna.Study:
    study = optuna.create_study(direction=direction, pruner=RacingPruner(alpha=0.05, min_examples=20))
    incumbent = _right([1] * 90 + [0] * 10)
    study.add_trial(optuna.trial.create_trial(value=0.9, system_attrs={OUTCOMES_ATTR: encode(incumbent)}))
    study.add_trial(optuna.trial.create_trial(value=0.5, system_attrs={OUTCOMES_ATTR: encode(_right([1, 0] * 50))}))
    return study


@pytest.mark.parametrize(("scored", "pruned"), [
    ([1, 0] * 20, True),  # 50 % where the incumbent has 90 %, on 40 shared examples
    ([1] * 39 + [0], False),  # one example worse of 40: McNemar's p = 1/2 (one disagreement), not sure enough
    ([0] * 10, False),  # worse, but fewer examples than min_examples: not tested yet
])
def test_the_pruner_stops_a_trial_surely_worse_than_the_incumbent(scored: list[int], pruned: bool) -> None:
    study = _study_with_incumbent()
    trial = study.ask()
    record_outcomes(trial, _right(scored))
    assert trial.should_prune() is pruned
    race: dict[str, Any] | None = study._storage.get_trial(trial._trial_id).user_attrs.get("race")
    if len(scored) < 20:
        assert race is None
    else:
        assert race is not None and race["against"] == 0 and race["examples"] == len(scored)
        assert race["decided"] == ("pruned" if pruned else "go on") and (race["p"] < 0.05) is pruned


def test_a_task_smaller_than_min_examples_is_tested_once_whole() -> None:
    """A task of 12 dev examples with min_examples 20: the test waits for all 12 (it never tested: no pruning)."""
    study = optuna.create_study(direction="maximize", pruner=RacingPruner(alpha=0.05, min_examples=20))
    study.add_trial(optuna.trial.create_trial(value=1.0, system_attrs={OUTCOMES_ATTR: encode(_right([1] * 12))}))
    trial = study.ask()
    record_outcomes(trial, _right([0] * 6))
    assert trial.should_prune() is False  # 6 of 12: not yet
    record_outcomes(trial, _right([0] * 12))
    assert trial.should_prune() is True  # wrong on all 12 where the incumbent is right: p = 2^-12
    # beside a task of 1,000 examples, the large one still waits for its min_examples (the smallest task's size
    # was everyone's threshold)
    two = optuna.create_study(direction="maximize", pruner=RacingPruner(alpha=0.05, min_examples=20))
    whole = Outcomes("accuracy", {"small": TaskOutcomes(np.arange(12), np.ones(12, bool)),
                                  "large": TaskOutcomes(np.arange(1000), np.ones(1000, bool))})
    two.add_trial(optuna.trial.create_trial(value=1.0, system_attrs={OUTCOMES_ATTR: encode(whole)}))
    trial = two.ask()
    record_outcomes(trial, Outcomes("accuracy", {"small": TaskOutcomes(np.arange(12), np.zeros(12, bool)),
                                                 "large": TaskOutcomes(np.arange(12), np.zeros(12, bool))}))
    assert trial.should_prune() is False  # large: 12 of its 20
    record_outcomes(trial, Outcomes("accuracy", {"small": TaskOutcomes(np.arange(12), np.zeros(12, bool)),
                                                 "large": TaskOutcomes(np.arange(20), np.zeros(20, bool))}))
    assert trial.should_prune() is True


def test_the_pruner_follows_the_direction_and_needs_outcomes() -> None:
    study = optuna.create_study(direction="minimize", pruner=RacingPruner(min_examples=5))
    losses = Outcomes("mse", {"t": TaskOutcomes(np.arange(40), np.full(40, 0.1, np.float32))})
    study.add_trial(optuna.trial.create_trial(value=0.1, system_attrs={OUTCOMES_ATTR: encode(losses)}))
    trial = study.ask()
    assert trial.should_prune() is False  # no outcomes yet: nothing to compare
    rng = np.random.default_rng(0)
    record_outcomes(trial, Outcomes("mse", {"t": TaskOutcomes(np.arange(40), (0.5 + rng.random(40) * 0.1)
                                                                 .astype(np.float32))}))
    assert trial.should_prune() is True  # a much larger loss than the incumbent's
    with pytest.raises(ConfigError, match="alpha"):
        RacingPruner(alpha=1.5)


@pytest.mark.slow
def test_a_raced_study_records_each_decision(small_experts: Any, tmp_path: Any) -> None:
    """Real MiniLM experts: each trial after the first is tested at 20 and 30 examples per task against the
    best complete trial; a pruned trial stopped scoring there, and kept the outcomes it was judged on."""
    from optuna.trial import TrialState

    from evoopt.data.outcomes import trial_outcomes
    from evoopt.study.config import parse_config
    from evoopt.study.run import run_study
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts
    config = parse_config(small_study_config(
        tmp_path, experts, name="raced", trials=6, space={"method": "ties", "search": {"weight": [0.0, 1.2],
                                                                                      "density": [0.2, 1.0]}},
        objective={"limit": 40, "test_limit": 40, "batch_size": 40, "max_length": 48, "fidelities": [20, 30]},
        pruner={"name": "RacingPruner", "options": {"alpha": 0.2, "min_examples": 10}}))
    trials = run_study(config, report=False).study.get_trials()
    assert "race" not in trials[0].user_attrs and trials[0].state == TrialState.COMPLETE  # nothing to race yet
    # both branches below are taken (the seeded search prunes some trials and finishes others)
    assert {t.state for t in trials[1:]} == {TrialState.COMPLETE, TrialState.PRUNED}, [t.state for t in trials]
    for trial in trials[1:]:
        race = trial.user_attrs["race"]
        pruned = trial.state == TrialState.PRUNED
        assert (race["decided"] == "pruned") is pruned and (race["p"] < 0.2) is pruned
        outcomes = trial_outcomes(trial)
        assert outcomes is not None
        assert outcomes.size == (2 * trial.user_attrs["pruned_at"] if pruned else 80)
        assert race["examples"] == (trial.user_attrs["pruned_at"] if pruned else 30)


@pytest.mark.slow
def test_a_raced_lm_eval_study_stops_trials_at_its_stages(tmp_path: Any) -> None:
    """lm-eval objectives race too: a trial is scored through lm-eval stage by stage (4, then 8 examples of
    each task) and a pruned one stops there, keeping the outcomes it was judged on; a finished one keeps all.
    (Experts far apart: the shared tiny family's merges all answer alike, and nothing is pruned.)"""
    from optuna.trial import TrialState

    from evoopt.data.outcomes import trial_outcomes
    from evoopt.study.config import parse_config
    from evoopt.study.run import run_study
    from tests.helpers.models import smol_tiny

    base, *experts = smol_tiny(tmp_path / "family", noise=1.0)
    config = parse_config({
        "name": "raced-lm-eval", "trials": 5, "baselines": [], "artifacts": str(tmp_path / "out"),
        "sources": {"base": str(base), "models": [str(e) for e in experts], "tasks": ["sms-spam"]},
        "space": {"kind": "global", "method": "linear", "search": {"weight": [0.0, 1.0]}},
        "sampler": {"name": "RandomSampler"},
        "objective": {"kind": "lm-eval", "limit": 12, "test_limit": 4, "batch_size": 8, "fidelities": [4, 8]},
        "pruner": {"name": "RacingPruner", "options": {"alpha": 0.4, "min_examples": 4}}}, root=tmp_path)
    trials = run_study(config, report=False).study.get_trials()
    assert trials[0].state == TrialState.COMPLETE and "race" not in trials[0].user_attrs
    # tested at each stage (the last test's examples recorded), and stopped at one (seeded: at 4 here)
    assert {4} <= {t.user_attrs.get("pruned_at") for t in trials[1:]}
    assert {t.user_attrs["race"]["examples"] for t in trials[1:]} == {4, 8}
    for trial in trials:
        outcomes = trial_outcomes(trial)
        assert outcomes is not None
        pruned = trial.state == TrialState.PRUNED
        assert outcomes.size == (trial.user_attrs["pruned_at"] if pruned else 12)
        if trial.number > 0:
            assert (trial.user_attrs["race"]["decided"] == "pruned") is pruned
    assert parse_config({"name": "x", "sources": {"base": "c", "models": ["a", "b"], "tasks": ["sms-spam"]},
                         "objective": {"kind": "lm-eval", "fidelities": [4]}}).objective.fidelities == [4]
    with pytest.raises(ConfigError, match="lm-eval reports stages on evoopt's own tasks"):
        parse_config({"name": "x", "sources": {"models": ["a", "b"]},
                      "objective": {"kind": "lm-eval", "tasks": ["arc_easy"], "fidelities": [4]}})
