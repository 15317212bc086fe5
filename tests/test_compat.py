"""Nothing breaks for users: a study database written by main before the architecture change
(tests/data/made-by-main-b96d5a6, made by its make_db.py with that version's code) opens and is shown
by today's code (resuming it is refused: its dev rows have changed since), and the first plan's public imports still
work."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner

from evoopt.cli import main
from evoopt.study.config import load_config

MADE = Path(__file__).parent / "data" / "made-by-main-b96d5a6"


@pytest.fixture()
def old_study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "made"
    shutil.copytree(MADE, folder)
    monkeypatch.chdir(folder)  # its storage URL is relative: sqlite:///study.db
    return folder / "study.yaml"


def test_a_database_made_by_the_previous_main_opens_and_is_refused_on_resume(old_study: Path) -> None:
    """It reads as it was; resuming it is refused by name, as its trials were scored on sms-spam's dev rows before
    dev left out the near-duplicates of training texts (2026-12-06), and nothing is written to it."""
    from evoopt.errors import ConfigError
    from evoopt.study.report import summary_rows
    from evoopt.study.run import open_study
    from evoopt.study.storage import load_study

    config = load_config(old_study)
    study = load_study(config)  # read: the stored config is the same study; today's keys take defaults
    assert [t.value for t in study.trials] == [41.5, 39.25, 40.0]
    assert study.direction == optuna.study.StudyDirection.MINIMIZE
    assert summary_rows(study)[-1] == {"name": "best found (trial 1)", "dev": 39.25, "test": None}
    attrs = (dict(study.user_attrs), study._storage.get_study_system_attrs(study._study_id))
    with pytest.raises(ConfigError, match=r"was made before evoopt recorded the rules of its corpora's rows.*"
                                          r"give the study a new name"):
        open_study(config)
    again = load_study(config)
    assert (dict(again.user_attrs), again._storage.get_study_system_attrs(again._study_id)) == attrs
    assert len(again.trials) == 3


def test_it_resumes_once_its_rows_are_known_to_be_todays(old_study: Path) -> None:
    """Its other upgrades on resume, as for a study whose data rules are today's (stamped here: resuming it as it
    is, is refused above): its metric named, and, made before the bfloat16 check, its later trials in float32."""
    from evoopt.study.fitness import PRECISION_ATTR, study_autocast
    from evoopt.study.report import summary_rows
    from evoopt.study.run import open_study
    from evoopt.study.storage import DATA_ATTR, data_rules, load_study

    config = load_config(old_study)
    load_study(config).set_user_attr(DATA_ATTR, data_rules())
    study = open_study(config)  # resumed: the stored config is the same study; today's keys take defaults
    assert [t.value for t in study.trials] == [41.5, 39.25, 40.0]
    assert study.metric_names == ["dev perplexity"]  # named on resume
    assert summary_rows(study)[-1] == {"name": "best found (trial 1)", "dev": 39.25, "test": None}
    assert study_autocast(config, study) is False
    assert study_autocast(config, open_study(config)) is False
    assert study._storage.get_study_system_attrs(study._study_id)[PRECISION_ATTR]["precision"] == "float32"


def test_status_and_best_read_it_without_building_models(old_study: Path) -> None:
    status = CliRunner().invoke(main, ["status", str(old_study)])
    assert status.exit_code == 0, status.output
    assert "best found (trial 1)" in status.output and "3 complete" in status.output
    best = CliRunner().invoke(main, ["best", str(old_study)])  # the models do not exist: nothing is loaded
    assert best.exit_code == 0, best.output
    assert "# trial 1: value 39.25;" in best.output and "method: task_arithmetic" in best.output
    assert "weight: 0.9" in best.output and "weight: 0.1" in best.output


def test_the_first_plans_imports_still_work() -> None:
    """The import paths of the first plan, from before the layered subpackages."""
    import evoopt.lm_eval_model  # noqa: F401  (registers lm-eval's evoopt model)
    from evoopt.data import write_lm_eval_tasks  # noqa: F401
    from evoopt.merge import get_method, ties  # noqa: F401
    from evoopt.samplers import EvoCmaSampler, EvolverSampler
    from evoopt.study import EvaluationError, Worker, export_trial, open_study, run_baselines, run_study  # noqa: F401

    assert issubclass(EvoCmaSampler, optuna.samplers.BaseSampler)
    assert issubclass(EvolverSampler, optuna.samplers.BaseSampler)
    assert issubclass(EvaluationError, RuntimeError)


def test_an_lm_eval_study_checked_before_lm_evals_autocast_fix_stays_in_float32(tmp_path: Path) -> None:
    """lm-eval switched evoopt's autocast off, so an lm-eval study's bfloat16 check compared float32 with float32
    and its trials were scored in float32 whatever it recorded: such a study (its check without a version) stays
    in float32; a check made since (version 2) decides as recorded."""
    from evoopt.study.baselines import precision_verdict
    from evoopt.study.config import parse_config
    from evoopt.study.fitness import PRECISION_ATTR, study_autocast

    def config(kind: str) -> Any:
        return parse_config({"name": "lm", "sources": {"base": "b", "models": ["m1", "m2"], "tasks": ["sms-spam"]},
                             "objective": {"kind": kind}, "artifacts": str(tmp_path)}, root=tmp_path)

    verdict = precision_verdict([(1.0, 0.0, 4.0, 2.0)])
    assert verdict is not None and verdict["precision"] == "bfloat16" and verdict["version"] == 2
    old = {k: v for k, v in verdict.items() if k != "version"}
    for check, lm_eval, dev in [(old, False, True), (verdict, True, True)]:
        study = optuna.create_study()
        study._storage.set_study_system_attr(study._study_id, PRECISION_ATTR, check)
        assert study_autocast(config("lm-eval"), study) is lm_eval
        assert study_autocast(config("dev"), study) is dev  # evoopt's own scoring had bfloat16 all along
