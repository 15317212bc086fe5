"""Comparing studies and serving them in optuna-dashboard, on small real Optuna studies (no models)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evoopt.errors import ConfigError
from evoopt.study.config import StudyConfig, parse_config
from evoopt.study.report import best_so_far, compare_studies, dashboard_command
from evoopt.study.run import open_study

NOTE = "# tpe-quadratic\n\nA note for the dashboard.\n"
T0 = datetime(2024, 1, 1, 12, 0, 0)


def make_config(tmp: Path, name: str, sampler: str, metric: str = "accuracy") -> StudyConfig:
    return parse_config({"name": name, "storage": f"sqlite:///{tmp}/s.db", "artifacts": str(tmp),
                         "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]},
                         "sampler": {"name": sampler}, "objective": {"metric": metric}})


def frozen(state: TrialState, value: float | None, start: float, end: float) -> optuna.trial.FrozenTrial:
    return optuna.trial.FrozenTrial(
        number=0, trial_id=0, state=state, value=value, params={"x": 0.5},
        distributions={"x": FloatDistribution(0.0, 1.0)}, user_attrs={}, system_attrs={}, intermediate_values={},
        datetime_start=T0 + timedelta(seconds=start), datetime_complete=T0 + timedelta(seconds=end))


def handmade(config: StudyConfig) -> optuna.Study:
    """Known values and times: best 0.9 (trial 5); within 1% of it (>= 0.891) from trial 4; 61 s in all."""
    study = open_study(config)
    for state, value, start, end in [(TrialState.COMPLETE, 0.5, 0, 10), (TrialState.COMPLETE, 0.8, 10, 20),
                                     (TrialState.PRUNED, None, 20, 25), (TrialState.COMPLETE, 0.7, 25, 35),
                                     (TrialState.COMPLETE, 0.895, 35, 45), (TrialState.COMPLETE, 0.9, 45, 60),
                                     (TrialState.FAIL, None, 60, 61)]:
        study.add_trial(frozen(state, value, start, end))
    study.set_user_attr("evoopt:test", {"5": {"test": {"sms-spam": 0.85}, "dev": {}}})
    return study


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("report")
    configs = [make_config(tmp, "tpe-quadratic", "TPESampler"), make_config(tmp, "random-handmade", "RandomSampler"),
               make_config(tmp, "random-mse", "RandomSampler", metric="mse")]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tpe = open_study(configs[0])
    tpe.optimize(lambda t: -(t.suggest_float("x", -1.0, 1.0) - 0.3) ** 2, n_trials=12)
    from optuna_dashboard import save_note

    save_note(tpe, NOTE)
    handmade(configs[1])
    open_study(configs[2]).optimize(lambda t: (t.suggest_float("x", -1.0, 1.0) - 0.3) ** 2, n_trials=10)
    rows, files = compare_studies(configs[:2], tmp / "compare")
    rows += compare_studies(configs[2:], tmp / "compare-mse")[0]  # (another metric: compared on its own)
    return {"tmp": tmp, "configs": configs, "rows": rows, "files": files}


def test_compare_writes_plots_and_rows(compared: dict[str, Any]) -> None:
    png, page = compared["files"]
    umask = os.umask(0)
    os.umask(umask)
    assert png.stat().st_mode & 0o777 == page.stat().st_mode & 0o777 == 0o666 & ~umask  # as any file written
    assert png.name == "compare.png" and png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert page.name == "compare.html"
    text = page.read_text()
    assert "tpe-quadratic" in text and "random-handmade" in text and "best accuracy (higher is better)" in text
    assert "best mse (lower is better)" in (png.parent.parent / "compare-mse" / "compare.html").read_text()
    assert "<script src=" not in text and "Plotly" in text  # plotly.js inline: opens offline
    assert not [f for f in png.parent.iterdir() if f.name.startswith(".")]  # no temporary files left

    tpe, hand, mse = compared["rows"]
    configs = compared["configs"]
    studies = [open_study(c, create=False) for c in configs]
    assert tpe["name"] == "tpe-quadratic" and tpe["sampler"] == "TPESampler" and tpe["space"] == "global ties"
    assert tpe["best"] == max(t.value for t in studies[0].trials if t.value is not None)
    assert tpe["finished"] == 12 and tpe["direction"] == "maximize" and tpe["test"] is None
    assert mse["direction"] == "minimize" and mse["best"] == min(t.value for t in studies[2].trials)
    assert hand == {"name": "random-handmade", "sampler": "RandomSampler", "space": "global ties",
                    "direction": "maximize", "finished": 6, "best": 0.9, "wall_seconds": 61.0,
                    "trials_to_99": 5, "test": pytest.approx(0.85)}
    for row in (tpe, mse):
        assert 1 <= row["trials_to_99"] <= row["finished"] and row["wall_seconds"] > 0

    curve = best_so_far(studies[1])
    assert curve.trials == [1, 2, 4, 5, 6] and curve.by_trial == [0.5, 0.8, 0.8, 0.895, 0.9]
    assert curve.seconds == [10, 20, 35, 45, 60] and curve.by_time == curve.by_trial
    for study, sign in zip(studies, (1, 1, -1)):
        curve = best_so_far(study)
        for values in (curve.by_trial, curve.by_time):
            assert all(sign * (b - a) >= 0 for a, b in zip(values, values[1:]))
            assert values[-1] == study.best_value
        assert curve.seconds == sorted(curve.seconds) and curve.seconds[0] >= 0

    compare_studies(configs[:2], compared["tmp"] / "compare")  # again: the artifacts replaced, not added
    with pytest.raises(ConfigError, match=r"compare: the studies score different metrics \(tpe-quadratic: "
                                          r"accuracy, random-mse: mse\); compare studies of one metric"):
        compare_studies([configs[0], configs[2]], compared["tmp"] / "mixed")
    for config, study in zip(configs[:2], studies):
        metas = optuna.artifacts.get_all_artifact_meta(study, storage=study._storage)
        assert sorted(m.filename for m in metas) == ["compare.html", "compare.png"]
        store = optuna.artifacts.FileSystemArtifactStore(str(config.artifact_dir / "artifacts"))
        png_meta = next(m for m in metas if m.filename == "compare.png")
        with store.open_reader(png_meta.artifact_id) as stored:
            assert stored.read() == png.read_bytes()


def test_compare_shows_the_answers_dev_beside_its_test(tmp_path: Path) -> None:
    """An estimated study: its answer is a confirmed trial (whole-dev 0.75), not the best estimate (0.9, the
    winner's curse); "best (dev)" showed the estimate beside the answer's test."""
    from evoopt.study.report import _row
    from evoopt.study.storage import ANSWER_ATTR

    config = make_config(tmp_path, "estimated", "RandomSampler")
    study = open_study(config)
    for number, value in enumerate((0.7, 0.9)):
        trial = frozen(TrialState.COMPLETE, value, 10 * number, 10 * number + 5)
        trial.user_attrs = {"estimated": True}
        study.add_trial(trial)
    study.set_user_attr(ANSWER_ATTR, {"trial": 0})
    study.set_user_attr("evoopt:test", {"0": {"test": {"sms-spam": 0.85}, "dev": {"sms-spam": 0.75}}})
    row = _row(config, study, best_so_far(study))
    assert (row["best"], row["test"]) == (0.75, 0.85) and row["trials_to_99"] == 2


def test_compare_refuses_missing_or_empty_studies(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no study 'nowhere'"):
        compare_studies([make_config(tmp_path, "nowhere", "TPESampler")], tmp_path / "out")
    empty = make_config(tmp_path, "empty", "TPESampler")
    open_study(empty).add_trial(frozen(TrialState.FAIL, None, 0, 1))
    with pytest.raises(ValueError, match="'empty'.*no completed trial"):
        compare_studies([empty], tmp_path / "out")
    with pytest.raises(ValueError, match="at least one"):
        compare_studies([], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read(), response.headers.get("Content-Type", "")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["serve_dashboard", "cli", "evoopt dashboard"])
def test_dashboard_serves_studies_note_and_artifacts(compared: dict[str, Any], how: str) -> None:
    config = compared["configs"][0]
    port = free_port()
    command = dashboard_command(config, port=port)
    assert command[0] == "optuna-dashboard" and command[1] == config.storage_url
    assert command[command.index("--artifact-dir") + 1] == str(config.artifact_dir / "artifacts")
    if how == "cli":
        command[0] = str(Path(sys.executable).parent / "optuna-dashboard")
    elif how == "evoopt dashboard":  # the storage opened once: checked, then served
        command = [str(Path(sys.executable).parent / "evoopt"), "dashboard",
                   str(write_config(compared["tmp"], config)), "--port", str(port)]
    else:
        code = ("import sys; from evoopt.study.config import load_config; "
                "from evoopt.study.report import serve_dashboard; "
                "serve_dashboard(load_config(sys.argv[1]), port=int(sys.argv[2]))")
        command = [sys.executable, "-c", code, str(write_config(compared["tmp"], config)), str(port)]
    base = f"http://127.0.0.1:{port}"
    log = compared["tmp"] / f"dashboard-{how}.log"
    with open(log, "wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, f"the dashboard exited:\n{log.read_text()}"
            try:
                get(f"{base}/api/meta")
                break
            except OSError:
                assert time.monotonic() < deadline, f"no answer from the dashboard in 60 s:\n{log.read_text()}"
                time.sleep(0.25)

        studies = json.loads(get(f"{base}/api/studies")[0])["study_summaries"]
        ids = {s["study_name"]: s["study_id"] for s in studies}
        assert set(ids) == {"tpe-quadratic", "random-handmade", "random-mse"}
        detail = json.loads(get(f"{base}/api/studies/{ids[config.name]}")[0])
        assert detail["name"] == config.name and len(detail["trials"]) == 12
        assert detail["note"]["body"] == NOTE
        artifacts = {a["filename"]: a for a in detail["artifacts"]}
        assert set(artifacts) == {"compare.png", "compare.html"}
        png, page = compared["files"]
        body, kind = get(f"{base}/artifacts/{ids[config.name]}/{artifacts['compare.png']['artifact_id']}")
        assert body == png.read_bytes() and kind == "image/png"
        body, kind = get(f"{base}/artifacts/{ids[config.name]}/{artifacts['compare.html']['artifact_id']}")
        assert body == page.read_bytes() and kind.startswith("text/html")
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def write_config(tmp: Path, config: StudyConfig) -> Path:
    import yaml

    file = tmp / f"{config.name}.yaml"
    file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    return file
