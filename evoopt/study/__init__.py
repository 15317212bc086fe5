"""Studies: the config, the search-space kinds, storage, evaluation, baselines, reports and the
engine that runs trials (:mod:`~evoopt.study.run`).

The engine's entry points are re-exported here (``from evoopt.study import run_study``).
Importing this package registers the search-space kinds (:mod:`evoopt.study.kinds`), whose
configuration checks :func:`~evoopt.study.config.parse_config` runs.
"""

from __future__ import annotations

from evoopt.errors import EvaluationError
from evoopt.study.run import (
    BudgetReached,
    RunReport,
    Worker,
    export_trial,
    open_storage,
    open_study,
    report_best,
    report_result,
    run_baselines,
    run_study,
)

__all__ = ["BudgetReached", "EvaluationError", "RunReport", "Worker", "export_trial", "open_storage", "open_study",
           "report_best", "report_result", "run_baselines", "run_study"]
