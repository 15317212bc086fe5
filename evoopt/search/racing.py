"""Racing: stop a candidate once a paired test on the same examples shows it is worse than the incumbent.

After Birattari et al., "A Racing Algorithm for Configuring Metaheuristics" (GECCO 2002): candidates
are evaluated on a growing set of instances and discarded as soon as a statistical test on the
results so far shows they are worse than the best. Here the instances are dev examples, the
candidates are trials, and the comparison is with the incumbent (the best complete trial) alone,
on the examples both have scored, so the per-example noise shared by the two cancels out.

The test (a deliberate difference from the paper's Friedman test, which ranks many candidates at
once) compares the candidate with the incumbent alone, on the examples both scored, one-sided, at level
``alpha``, in the study's direction (:func:`evoopt.data.outcomes.paired_test`). Right-or-wrong outcomes:
McNemar's test on the examples the two disagree on (exact where every task weighs the same per example;
else normal with a continuity correction). Losses: with per-example differences ``d = candidate -
incumbent`` on task ``t`` (perplexity: the summed loss's difference scaled to the task's perplexity), the
objective's difference ``D = sum_t w_t mean(d_t)`` with variance ``V = sum_t w_t^2 var(d_t) / n_t``
(``w_t`` the task weights, normalised), ``t = D / sqrt(V)`` against Student's t with Welch-Satterthwaite's
degrees of freedom. Tests start at ``min_examples`` per task; a
task with fewer than 2 shared examples is left out.

Use it with ``objective.fidelities`` (the growing numbers of examples per task at which the trial is
tested; evoopt keeps the outcomes scored so far on the trial before each test). Every tested trial
records its last decision in the user attribute ``race``.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evoopt.data.outcomes import Outcomes, paired, paired_test, trial_outcomes
from evoopt.errors import ConfigError


class RacingPruner(optuna.pruners.BasePruner):
    """Prune a trial that a paired test on the examples scored so far finds worse than the best complete trial.

    ``alpha``: the test's level (lower prunes later and more surely); ``min_examples``: examples per task
    before the first test (a task with fewer: all of them). Single-objective studies; any sampler.
    """

    def __init__(self, *, alpha: float = 0.05, min_examples: int = 30) -> None:
        if not 0 < alpha < 1:
            raise ConfigError(f"pruner.options.alpha: a test level in (0, 1), got {alpha}")
        if min_examples < 2:
            raise ConfigError(f"pruner.options.min_examples: at least 2, got {min_examples}")
        self.alpha, self.min_examples = alpha, min_examples

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        incumbent = _incumbent(study)
        candidate = trial_outcomes(trial)
        if incumbent is None or candidate is None or incumbent[0].number == trial.number:
            return False
        # each task tested from min_examples on, or a smaller task once whole (waiting for more never tested at all)
        tasks, pairs = incumbent[1].tasks, paired(candidate, incumbent[1])
        if not pairs or not all(len(c) >= min(self.min_examples, len(tasks[task].ids))
                                for task, (c, _) in pairs.items()):
            return False
        p, better, shared = paired_test(candidate, incumbent[1], maximize=study.direction.name == "MAXIMIZE",
                                        weights=_weights(study))
        pruned = p < self.alpha
        record: dict[str, Any] = {"against": incumbent[0].number, "examples": shared, "difference": round(better, 6),
                                  "p": round(p, 6), "alpha": self.alpha, "decided": "pruned" if pruned else "go on"}
        study._storage.set_trial_user_attr(trial._trial_id, "race", record)
        return pruned


def _incumbent(study: optuna.Study) -> tuple[FrozenTrial, Outcomes] | None:
    """The best complete trial that kept its outcomes."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not complete:
        return None
    maximize = study.direction.name == "MAXIMIZE"
    for trial in sorted(complete, key=lambda t: (-t.value if maximize else t.value, t.number)):  # type: ignore[operator]
        outcomes = trial_outcomes(trial)
        if outcomes is not None:
            return trial, outcomes
    return None


def _weights(study: optuna.Study) -> dict[str, float] | None:
    weights = study.user_attrs.get("evoopt:config", {}).get("objective", {}).get("weights")
    return {str(k): float(v) for k, v in weights.items()} if weights else None

