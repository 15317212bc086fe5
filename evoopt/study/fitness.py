"""How a study's trials are scored, decided once and kept in the study: the estimator of ``objective.estimate``
and the precision of ``objective.precision: auto``.

The estimator is fitted from the per-example outcomes of the study's baselines on dev (the sources,
the fixed merges, the soups: :func:`~evoopt.study.storage.baseline_outcomes`), never from test, and
stored as a study system attribute: every worker, and the study resumed, scores its trials on the
same examples with the same weights. Workers that start before the baselines are scored wait for them.
"""

from __future__ import annotations

import logging
import time

import optuna

from evoopt.data.estimate import Estimator, fit_estimator
from evoopt.errors import ConfigError
from evoopt.study.config import StudyConfig
from evoopt.study.storage import baseline_outcomes

ESTIMATOR_ATTR = "evoopt:estimator"
PRECISION_ATTR = "evoopt:precision"  # the bfloat16 check on the sources (objective.precision: auto)
_log = logging.getLogger(__name__)


def stored_estimator(study: optuna.Study) -> Estimator | None:
    stored = study._storage.get_study_system_attrs(study._study_id).get(ESTIMATOR_ATTR)
    return None if stored is None else Estimator.from_dict(stored)


def study_estimator(config: StudyConfig, study: optuna.Study | None, *, wait: float = 3600.0,
                    poll: float = 5.0) -> Estimator | None:
    """The study's estimator (``None`` without ``objective.estimate``): read from the study, or fitted now
    from its baselines' dev outcomes and stored. Waits up to ``wait`` seconds for the baselines."""
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
            references = baseline_outcomes(study)
            if not references:
                raise ConfigError(f"objective.estimate: study {config.name!r} has baselines without per-example "
                                  "results (scored before they were kept); run `evoopt baselines` on it again")
            break
        if time.monotonic() >= deadline:
            waited = f" after {wait:.0f} s" if wait else ""
            raise ConfigError(f"objective.estimate: study {config.name!r} has no baselines' results to fit the "
                              f"estimator on{waited}; run `evoopt baselines` on it first (or run without "
                              "--no-baselines)")
        _log.info("waiting for the baselines of study %s (the estimator is fitted on them)", config.name)
        time.sleep(poll)
    # fitting is deterministic (the references by name, the study's seed): workers racing here store one estimator
    estimator = fit_estimator(spec.method, [references[name] for name in sorted(references)],
                              fraction=spec.fraction, seed=config.seed)
    study._storage.set_study_system_attr(study._study_id, ESTIMATOR_ATTR, estimator.to_dict())
    return estimator


def study_autocast(config: StudyConfig, study: optuna.Study | None) -> bool:
    """Whether trials are scored under bfloat16 autocast: ``objective.precision`` bfloat16, or auto where the
    study's check on its sources held. The first worker to find no check (a study made before the check
    existed, run without baselines, or a worker that started before them) records float32, so every trial
    of a study is scored in one precision."""
    wanted = config.objective.precision
    if wanted != "auto" or study is None:
        return wanted == "bfloat16"
    check = study._storage.get_study_system_attrs(study._study_id).get(PRECISION_ATTR)
    if check is None:
        check = {"precision": "float32", "reason": "no bfloat16 check on the sources before the first trial"}
        study._storage.set_study_system_attr(study._study_id, PRECISION_ATTR, check)
    return bool(check["precision"] == "bfloat16")
