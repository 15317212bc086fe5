"""How a study's trials are scored, decided once and kept in the study: the estimator of ``objective.estimate``
and the precision of ``objective.precision: auto``.

The estimator is fitted from the per-example outcomes of the study's baselines on dev (the sources,
the fixed merges, the soups: :func:`~evoopt.study.storage.baseline_outcomes`), never from test, and
stored as a study system attribute: every worker, and the study resumed, scores its trials on the
same examples with the same weights. Workers that start before the baselines are scored wait for them.
With ``objective.estimate.references: N`` the study's first N complete trials are scored on the whole
dev set and join the references (candidates of the search itself inform the anchors far better than
the baselines alone); the estimator is fitted once they are all known.
"""

from __future__ import annotations

import logging
import time

import optuna
from optuna.trial import TrialState

from evoopt.data.estimate import Estimator, fit_estimator
from evoopt.data.outcomes import Outcomes, trial_outcomes
from evoopt.errors import ConfigError
from evoopt.study.config import StudyConfig
from evoopt.study.storage import BASELINE_OUTCOMES_ATTR, PRECISION_ATTR, baseline_outcomes

ESTIMATOR_ATTR = "evoopt:estimator"
# the check's version: 2 where lm-eval objectives were really scored under bfloat16 (before, lm-eval switched
# the autocast off, so an lm-eval study's check compared float32 with float32)
PRECISION_CHECK_VERSION = 2
_log = logging.getLogger(__name__)


def stored_estimator(study: optuna.Study) -> Estimator | None:
    stored = study._storage.get_study_system_attrs(study._study_id).get(ESTIMATOR_ATTR)
    return None if stored is None else Estimator.from_dict(stored)


def study_estimator(config: StudyConfig, study: optuna.Study | None, *, wait: float = 3600.0,
                    poll: float = 5.0) -> Estimator | None:
    """The study's estimator: read from the study, or fitted now from its baselines' dev outcomes (and its
    first ``references`` full-dev trials) and stored. ``None`` without ``objective.estimate``, or while the
    reference trials are not all known. Waits up to ``wait`` seconds for the baselines."""
    spec = config.objective.estimate
    if spec is None:
        return None
    if study is None:
        raise ConfigError("objective.estimate: the estimator lives in the study; score trials through a study")
    deadline = time.monotonic() + wait
    while True:
        found = stored_estimator(study)
        if found is not None:
            return found
        if "evoopt:baselines" in study.user_attrs:  # written after every baseline's outcomes
            break
        if time.monotonic() >= deadline:
            waited = f" after {wait:.0f} s" if wait else ""
            raise ConfigError(f"objective.estimate: study {config.name!r} has no baselines' results to fit the "
                              f"estimator on{waited}; run `evoopt baselines` on it first (or run without "
                              "--no-baselines)")
        _log.info("waiting for the baselines of study %s (the estimator is fitted on them)", config.name)
        time.sleep(poll)
    attrs = study._storage.get_study_system_attrs(study._study_id)
    if not any(key.startswith(BASELINE_OUTCOMES_ATTR) for key in attrs):
        raise ConfigError(f"objective.estimate: study {config.name!r} has baselines without per-example "
                          "results (scored before they were kept); run `evoopt baselines` on it again")
    early: list[Outcomes] = []
    if spec.references:  # checked before the baselines' outcomes are decoded: while pending, once per trial
        found_early = reference_trials(study, spec.references)
        if found_early is None:
            return None  # not yet: trials are scored on the whole dev set until the references are known
        early = found_early
    references = baseline_outcomes(study)
    known = [references[name] for name in sorted(references)] + early
    # fitting is deterministic (the references by name and trial number, the study's seed; IRT on one thread), so
    # workers racing here store the same estimator; one that finds it stored meanwhile takes it; each scores with
    # it as read back (as every other worker and a resumed run read it, rounded)
    stored = fit_estimator(spec.method, known, fraction=spec.fraction, seed=config.seed).to_dict()
    if (found := stored_estimator(study)) is not None:
        return found
    study._storage.set_study_system_attr(study._study_id, ESTIMATOR_ATTR, stored)
    return stored_estimator(study) or Estimator.from_dict(stored)


def reference_trials(study: optuna.Study, count: int) -> list[Outcomes] | None:
    """The per-example dev outcomes of the study's first ``count`` complete trials scored on the whole dev
    set, by trial number; None until they are known (fewer of them, or an earlier trial still running),
    so every worker takes the same ones."""
    found: list[Outcomes] = []
    for trial in study.get_trials(deepcopy=False):  # in number order
        if not trial.state.is_finished():
            return None
        outcomes = trial_outcomes(trial) if trial.state == TrialState.COMPLETE else None
        if outcomes is not None and "estimated" not in trial.user_attrs:
            found.append(outcomes)
            if len(found) == count:
                return found
    return None


def study_autocast(config: StudyConfig, study: optuna.Study | None) -> bool:
    """Whether trials are scored under bfloat16 autocast: ``objective.precision`` bfloat16, or auto where the
    study's check on its sources held. The first worker to find no check (a study made before the check
    existed, run without baselines, or a worker that started before them) records float32, so every trial
    of a study is scored in one precision. An lm-eval study checked before lm-eval's autocast was fixed (its
    check has no version) stays in float32, the precision its trials were really scored in."""
    wanted = config.objective.precision
    if wanted != "auto" or study is None:
        return wanted == "bfloat16"
    check = study._storage.get_study_system_attrs(study._study_id).get(PRECISION_ATTR)
    if check is None:
        check = {"precision": "float32", "reason": "no bfloat16 check on the sources before the first trial"}
        study._storage.set_study_system_attr(study._study_id, PRECISION_ATTR, check)
    if config.objective.kind == "lm-eval" and check.get("version", 1) < PRECISION_CHECK_VERSION:
        return False  # its check compared float32 with float32, and its trials were scored in float32: kept so
    return bool(check["precision"] == "bfloat16")
