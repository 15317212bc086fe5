"""Scores have a direction: perplexity and mse are minimised everywhere a score is compared."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from evoopt.study.config import parse_config
from evoopt.study.report import best_so_far
from evoopt.study.run import best_index, best_trial, greedy_soup, open_study, run_baselines, summary_rows


def test_best_index_follows_the_direction_and_keeps_the_first_of_equals() -> None:
    assert best_index([0.7, 0.9, 0.9, 0.2], maximize=True) == 1
    assert best_index([0.7, 0.9, 0.9, 0.2], maximize=False) == 3
    assert best_index([5.0, 3.0, 3.0], maximize=False) == 1


def test_greedy_soup_by_hand_in_both_directions() -> None:
    # Three sources with their own dev scores; the uniform soup of a set of them scores as in the table.
    soups = {(0,): 0.60, (1,): 0.80, (2,): 0.70, (0, 1): 0.85, (1, 2): 0.78, (0, 1, 2): 0.90, (0, 2): 0.75}
    tried: list[list[int]] = []

    def score(members: list[int]) -> float:
        tried.append(members)
        return soups[tuple(members)]

    # maximised: order 1 (.80), 2 (.70), 0 (.60); {1,2} .78 < .80 rejected; {0,1} .85 > .80 kept
    assert greedy_soup([0.60, 0.80, 0.70], score, maximize=True) == [0, 1]
    assert tried == [[1, 2], [0, 1]]
    # minimised (perplexity): order 0 (.60), 2 (.70), 1 (.80); {0,2} .75 > .60 rejected; {0,1} .85 rejected
    tried.clear()
    assert greedy_soup([0.60, 0.80, 0.70], score, maximize=False) == [0]
    assert tried == [[0, 2], [0, 1]]
    # minimised, where a soup helps: {0,2} scores lower than source 0 alone, then {0,1,2} is higher: rejected
    soups[(0, 2)] = 0.50
    assert greedy_soup([0.60, 0.80, 0.70], score, maximize=False) == [0, 2]


@pytest.mark.slow
def test_a_perplexity_study_picks_the_lowest_source_and_soups_downwards(smol_tiny_family: list[Path],
                                                                       tmp_path: Path) -> None:
    base, *experts = smol_tiny_family
    config = parse_config({
        "name": "ppl", "sources": {"base": str(base), "models": [str(e) for e in experts], "tasks": ["sms-spam"]},
        "space": {"method": "task_arithmetic", "search": {"weight": [0.0, 1.0]}},
        "objective": {"kind": "dev", "metric": "perplexity", "limit": 6, "test_limit": 6, "batch_size": 6,
                      "max_length": 48},
        "trials": 2, "baselines": ["sources", "greedy-soup"], "artifacts": str(tmp_path)}, root=tmp_path)
    rows = run_baselines(config)
    sources = [r for r in rows if r["name"].startswith("source ")]
    assert len({r["dev_value"] for r in sources}) == 2  # the two experts differ, so the pick matters
    lowest = min(sources, key=lambda r: r["dev_value"])
    best = next(r for r in rows if r["name"].startswith("best source"))
    assert best["dev_value"] == lowest["dev_value"]  # today's main picked the highest perplexity here
    assert best["name"] == f"best source ({lowest['name'].removeprefix('source ')}, by dev)"
    soup = next(r for r in rows if r["name"].startswith("greedy soup"))
    assert lowest["name"].removeprefix("source ") in soup["name"]  # the soup starts from the lowest perplexity
    assert soup["dev_value"] <= lowest["dev_value"] + 1e-9  # and takes a member only when perplexity drops
    study = open_study(config)
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert study.metric_names == ["dev perplexity"]


def test_the_best_of_a_minimised_multi_objective_front_has_the_lowest_sum() -> None:
    study = optuna.create_study(directions=["minimize", "minimize"])
    for values in ([1.0, 9.0], [4.0, 4.0], [9.0, 1.0], [2.0, 3.0]):
        study.add_trial(optuna.trial.create_trial(values=values))
    trial = best_trial(study)
    assert trial is not None and trial.values == [2.0, 3.0]
    maximised = optuna.create_study(directions=["maximize", "maximize"])
    for values in ([1.0, 9.0], [4.0, 4.0], [9.0, 2.0]):
        maximised.add_trial(optuna.trial.create_trial(values=values))
    trial = best_trial(maximised)
    assert trial is not None and trial.values == [9.0, 2.0]


def test_a_multi_objective_best_shows_its_mean_dev_beside_the_baselines_means() -> None:
    """The best trial's dev row is the (weighted) mean of its tasks, as the baselines' rows and its test are (it
    showed the sum: dev 3.42 beside a baseline's 0.85)."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    study.set_user_attr("evoopt:config", {"objective": {"weights": {"b": 3.0}}})
    study.add_trial(optuna.trial.create_trial(values=[0.8, 0.6], user_attrs={"scores": {"a": 0.8, "b": 0.6}}))
    study.add_trial(optuna.trial.create_trial(values=[0.5, 0.5]))
    assert summary_rows(study)[-1]["dev"] == pytest.approx((0.8 + 3 * 0.6) / 4)
    study.add_trial(optuna.trial.create_trial(values=[0.9, 0.9]))  # no per-task scores kept: the plain mean
    assert summary_rows(study)[-1]["dev"] == pytest.approx(0.9)


@pytest.mark.parametrize("maximize", [True, False])
def test_the_best_of_a_weighted_multi_objective_front_has_the_best_weighted_mean(maximize: bool) -> None:
    """Picked by the plain sum, the answer was trial 1 (.6625 weighted) over trial 0 (.80 weighted), and the
    table's 'best found' showed the lower number; minimised, the same with losses."""
    sign = 1.0 if maximize else -1.0
    study = optuna.create_study(directions=["maximize" if maximize else "minimize"] * 2)
    study.set_user_attr("evoopt:config", {"objective": {"weights": {"a": 3.0}}})
    for a, b in ((0.9, 0.5), (0.6, 0.85)):
        study.add_trial(optuna.trial.create_trial(values=[sign * a, sign * b],
                                                  user_attrs={"scores": {"a": sign * a, "b": sign * b}}))
    trial = best_trial(study)
    assert trial is not None and trial.number == 0
    assert summary_rows(study)[-1] == {"name": "best found (trial 0)", "dev": pytest.approx(sign * 0.8), "test": None}
    assert best_so_far(study).by_trial == pytest.approx([sign * 0.8, sign * 0.8])
    # the progress line after a trial shows the same number (it printed the front's values as a list)
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from evoopt.display import TrialBar

    out = io.StringIO()
    with TrialBar(Console(file=out), SimpleNamespace(trials=2)) as bar:
        bar.trial(study, study.trials[-1])
    assert f"2/2 finished; best mean {sign * 0.8:.4f} (#0)" in out.getvalue(), out.getvalue()


@pytest.mark.parametrize("maximize", [True, False])
def test_summary_rows_report_the_best_trial_in_the_study_direction(maximize: bool) -> None:
    study = optuna.create_study(direction="maximize" if maximize else "minimize")
    for value in (3.0, 1.0, 2.0):
        study.add_trial(optuna.trial.create_trial(value=value))
    row = summary_rows(study)[-1]
    assert row["dev"] == (3.0 if maximize else 1.0)
