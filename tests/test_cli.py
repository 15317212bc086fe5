"""The `evoopt` command line on tiny models."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from evoopt.cli import main


def _write(tmp_path: Path, recipe: dict[str, object]) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_merge_exports_a_model(llama_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {
        "method": "dare_ties", "base": str(llama_family[0]), "seed": 3,
        "models": [{"model": str(p), "parameters": {"weight": 0.4, "density": 0.5}} for p in llama_family[1:]],
    })
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "dare_ties" in result.output and "tensors merged" in result.output
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_bad_recipe_fails_cleanly_and_writes_nothing(llama_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {"method": "ties", "models": [{"model": str(llama_family[1]),
                                                              "parameters": {"density": 2}}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "density: must be in (0, 1], got 2" in result.output and "base:" in result.output
    assert not (tmp_path / "out").exists()


def test_every_model_that_cannot_be_opened_is_named_at_once(llama_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {"method": "linear", "base": str(tmp_path / "no-base"),
                               "models": [{"model": str(tmp_path / "no-such")}, {"model": str(llama_family[1])},
                                          {"model": "expert:minilm-sentiment-domains/nyt"}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "Error: 3 models cannot be opened:"
    assert lines[1].startswith("  - models[0].model: ") and "no-such" in lines[1]
    assert lines[2].startswith("  - models[2].model: expert:minilm-sentiment-domains/nyt: setting ")
    assert lines[3].startswith("  - base: ") and "no-base" in lines[3]
    assert not (tmp_path / "out").exists()


def test_once_a_model_fails_to_open_no_expert_is_built_for_the_rest(llama_family: list[Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import evoopt.data.experts as experts

    built: list[str] = []
    monkeypatch.setattr(experts, "build_setting", lambda name, **kwargs: built.append(name))
    (tmp_path / "damaged.safetensors").write_bytes(b"\x00" * 64)
    recipe = _write(tmp_path, {"method": "linear", "base": str(llama_family[0]),
                               "models": [{"model": str(tmp_path / "damaged.safetensors")},
                                          {"model": "expert:minilm-sentiment-domains/vader-nyt"}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and "damaged.safetensors" in result.output, result.output
    assert built == []  # it would train the setting's experts (minutes) before the error


def test_mismatched_models_fail_cleanly(llama_family: list[Path], bert_family: list[Path], tmp_path: Path) -> None:
    recipe = _write(tmp_path, {"method": "linear", "models": [{"model": str(llama_family[0])},
                                                              {"model": str(bert_family[0])}]})
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "cannot be merged" in result.output
    assert not (tmp_path / "out").exists()


def test_methods_lists_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every name and default whole, in a pipe (rich's 80 columns cut them: breadcrumbs_ti…) and on an 80-column
    terminal (wrapped there)."""
    from evoopt.merge import available_methods, get_method

    monkeypatch.delenv("COLUMNS", raising=False)
    result = CliRunner().invoke(main, ["methods"])
    assert result.exit_code == 0 and "…" not in result.output
    for name in available_methods():
        assert f"│ {name} " in result.output
        assert all(f"{k}={v}" in result.output for k, v in get_method(name).per_model.items())
    monkeypatch.setenv("COLUMNS", "80")
    narrow = CliRunner().invoke(main, ["methods"])
    assert narrow.exit_code == 0 and "…" not in narrow.output and "model_stock" in narrow.output
    assert max(len(line) for line in narrow.output.splitlines()) <= 80


def test_version_is_printed() -> None:
    from importlib.metadata import version

    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output.strip().endswith(version("evoopt"))


def test_help_explains() -> None:
    result = CliRunner().invoke(main, ["merge", "--help"])
    assert result.exit_code == 0 and "--overwrite" in result.output and "pkg:" in result.output


@pytest.mark.parametrize("args", [["--help"], []], ids=["--help", "nothing"])
def test_lm_eval_help_shows_evoopts_model_args_then_lm_evals_own(args: list[str]) -> None:
    result = CliRunner().invoke(main, ["lm-eval", *args])
    assert result.exit_code == 0, result.output
    ours, theirs = result.output.index("--model_args recipe=RECIPE.yaml"), result.output.index("usage: lm-eval")
    assert ours < theirs


def test_experts_help_names_every_setting() -> None:
    from evoopt.data.settings import SETTINGS

    result = CliRunner().invoke(main, ["experts", "--help"])
    assert result.exit_code == 0 and all(name in result.output for name in SETTINGS), result.output


def test_a_nan_coefficient_is_refused_naming_the_key(llama_family: list[Path], tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: linear\nmodels:\n  - model: {llama_family[1]}\n    parameters: {{weight: .nan}}\n"
                      f"  - model: {llama_family[2]}\n    parameters: {{weight: 0.5}}\n")
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output  # today's main merged NaN weights and exited 0
    assert "models[0].parameters.weight: must be a finite number, got nan" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args", [
    ["run", "--n-trials", "-3"], ["run", "--n-trials", "0"], ["run", "--timeout", "0"], ["run", "--timeout", "-5"],
    ["run", "--timeout", "nan"], ["run", "--timeout", "inf"], ["run", "--workers", "0"],
    ["worker", "--n-trials", "-1"], ["worker", "--timeout", "0"], ["worker", "--index", "-2"]])
def test_non_positive_counts_and_timeouts_are_refused_naming_the_option(args: list[str], tmp_path: Path) -> None:
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "never", "setting": "minilm-sentiment-domains",
                                     "artifacts": str(tmp_path / "out")}))
    command, option, value = args
    result = CliRunner().invoke(main, [command, str(study), option, value])
    assert result.exit_code == 2, result.output  # a usage error, before anything runs
    assert f"Invalid value for '{option}'" in result.output
    assert not (tmp_path / "out").exists()


def test_quiet_run_keeps_its_workers_and_report_and_spawned_workers_leave_the_report(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--quiet` only hides the bar and the table: it dropped --workers and the test report before. A worker
    process that `--workers N` spawns (given its --worker-index) leaves the report to its parent."""
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr("evoopt.study.run.run_study", lambda config, **kwargs: calls.append(kwargs))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "q", "setting": "minilm-sentiment-domains",
                                     "artifacts": str(tmp_path / "out")}))
    for args in (["--workers", "4", "--quiet"], ["--quiet", "--no-baselines", "--worker-index", "0"]):
        result = CliRunner().invoke(main, ["run", str(study), *args])
        assert result.exit_code == 0, result.output
    assert (calls[0]["workers"], calls[0]["worker_index"], calls[0]["report"]) == (4, 0, True)
    assert (calls[1]["workers"], calls[1]["worker_index"], calls[1]["report"]) == (1, 0, False)


def test_the_read_commands_take_the_storage_the_study_was_run_on(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A study run with `run --storage URL` (or workers on a database): status, best, export, baselines and the
    dashboard read it with the same `--storage` (the README says export reads the study from the database)."""
    import optuna

    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    optuna.create_study(study_name="s", storage=url, direction="maximize").add_trial(
        optuna.trial.create_trial(value=0.5))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "setting": "minilm-sentiment-domains",
                                     "artifacts": str(tmp_path / "out")}))
    missing = CliRunner().invoke(main, ["status", str(study)])
    assert missing.exit_code != 0 and "'s'" in missing.output  # the config's own storage has no such study
    shown = CliRunner().invoke(main, ["status", str(study), "--storage", url])
    assert shown.exit_code == 0 and "1/" in shown.output, shown.output
    seen: list[str] = []
    def record(config: Any, *args: Any, **kwargs: Any) -> tuple[Path, str]:
        seen.append(config.storage_url)
        return tmp_path / "m", "trial 0 (value 0.5)"

    for name in ("evoopt.study.run.export_described", "evoopt.study.report.serve_dashboard",
                 "evoopt.study.run.run_baselines"):
        monkeypatch.setattr(name, record)
    for command in (["export", str(study), "--out", str(tmp_path / "m")], ["dashboard", str(study)],
                    ["baselines", str(study)]):
        result = CliRunner().invoke(main, [*command, "--storage", url])
        assert result.exit_code == 0, result.output
    assert seen == [url] * 3
    monkeypatch.setattr("evoopt.study.kinds.make_kind", lambda config: SimpleNamespace(
        best_text=lambda opened: f"{len(opened.trials)} trials in {config.storage_url}\n"))
    best = CliRunner().invoke(main, ["best", str(study), "--storage", url])
    assert best.exit_code == 0 and f"1 trials in {url}" in best.output, best.output


def test_an_interrupted_demo_exports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during the demo's run: it stops there (it went on to export, and failed without a finished trial)."""
    import optuna

    from evoopt.study.run import RunReport

    exported: list[Any] = []
    monkeypatch.setattr("evoopt.data.experts.build_setting", lambda *args, **kwargs: None)
    monkeypatch.setattr("evoopt.study.run.run_study", lambda config, **kwargs: RunReport(
        optuna.create_study(), interrupted=True))
    monkeypatch.setattr("evoopt.study.run.export_described", lambda *args, **kwargs: exported.append(args))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "d", "setting": "minilm-sentiment-domains",
                                     "artifacts": str(tmp_path / "out")}))
    result = CliRunner().invoke(main, ["demo", "--study", str(study), "--out", str(tmp_path / "best")])
    assert result.exit_code == 0, result.output
    assert "interrupted" in result.output and not exported


def test_the_demo_builds_only_its_settings_experts_and_says_where_to_run_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study of the user's own sources trained the four MiniLM experts first; outside the repository, the
    demo's default config was only 'not found'."""
    import optuna

    from evoopt.study.run import RunReport

    built: list[Any] = []
    monkeypatch.setattr("evoopt.data.experts.build_setting", lambda *args, **kwargs: built.append(args))
    monkeypatch.setattr("evoopt.study.run.run_study", lambda config, **kwargs: RunReport(
        optuna.create_study(), interrupted=True))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "d", "artifacts": str(tmp_path / "out"),
                                     "sources": {"base": "b", "models": ["m1", "m2"], "tasks": ["sms-spam"]}}))
    result = CliRunner().invoke(main, ["demo", "--study", str(study), "--out", str(tmp_path / "best")])
    assert result.exit_code == 1 and "sources.base: " in result.output, result.output  # (checked before anything)
    for name in ("b", "m1", "m2"):
        (tmp_path / name).mkdir()
    result = CliRunner().invoke(main, ["demo", "--study", str(study), "--out", str(tmp_path / "best")])
    assert result.exit_code == 0 and not built, result.output
    # a folder of the user's is not replaced unasked (--out studies deleted the study configs), refused before
    # anything runs
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    result = CliRunner().invoke(main, ["demo", "--study", str(study), "--out", str(tmp_path / "mine")])
    assert result.exit_code == 1 and "already exists and is not empty" in result.output, result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "out").exists()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["demo"])
    assert result.exit_code == 2 and "run the demo from the repository's root folder, or give --study" in \
        result.output


def test_the_demo_refuses_an_edited_config_of_a_stored_study_before_training_its_experts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import optuna

    from evoopt.study.config import load_config
    from evoopt.study.storage import CONFIG_ATTR, DATA_ATTR, data_rules, storage_from_url

    built: list[Any] = []
    monkeypatch.setattr("evoopt.data.experts.build_setting", lambda *args, **kwargs: built.append(args))
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "d", "setting": "minilm-sentiment-domains", "seed": 7,
                                     "artifacts": str(tmp_path / "out")}))
    edited = load_config(study)
    before = edited.model_copy(update={"seed": 0})  # the config the study was made from
    stored = optuna.create_study(study_name="d", storage=storage_from_url(edited.storage_url))
    stored.set_user_attr(CONFIG_ATTR, before.identity())
    stored.set_user_attr(DATA_ATTR, data_rules())
    result = CliRunner().invoke(main, ["demo", "--study", str(study), "--out", str(tmp_path / "best")])
    assert result.exit_code == 1 and "made from another config" in result.output, result.output
    assert "seed: stored 0, now 7" in result.output and not built


@pytest.mark.parametrize(("command", "missing"), [("dashboard", "optuna_dashboard"), ("compare", "plotly")])
def test_a_command_whose_optional_package_is_missing_says_how_to_install_it(
        command: str, missing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It failed with an ImportError traceback, after loading the studies (compare) or after saying it serves
    (dashboard)."""
    import importlib.util

    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else found(name, *a))
    result = CliRunner().invoke(main, [command, str(tmp_path / "nowhere.yaml")])
    assert result.exit_code == 1, result.output
    assert f"evoopt {command} needs {missing.replace('_', '-')}, not installed here: pip install 'evoopt[eval]'" \
        in result.output


@pytest.mark.parametrize("args", [["experts", "minilm-sentiment-domains", "--steps", "0"],
                                  ["experts", "minilm-sentiment-domains", "--limit-train", "-1"],
                                  ["dashboard", "study.yaml", "--port", "0"]])
def test_other_counts_are_checked_too(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and f"Invalid value for '{args[2]}'" in result.output


def test_resolving_an_expert_builds_the_multitask_model_only_when_asked(monkeypatch: pytest.MonkeyPatch,
                                                                        tmp_path: Path) -> None:
    """The main job names its experts as expert:SETTING/TASK; building the setting for them trained the
    multi-task model too (4.5 minutes on 2 cores) that nothing in the study used."""
    import evoopt.data.experts as experts

    asked: list[bool] = []

    def build(name: str, **kwargs: object) -> experts.ExpertSet:
        asked.append(bool(kwargs["multitask"]))
        folder = tmp_path / name
        return experts.ExpertSet(experts.get_setting(name), {2: folder / "base"}, {"vader-tweets": folder / "t"},
                                 folder / "mtl" if kwargs["multitask"] else None, 0.0)

    monkeypatch.setattr(experts, "build_setting", build)
    assert experts.resolve_expert("minilm-sentiment-domains/vader-tweets").name == "t"
    assert experts.resolve_expert("minilm-sentiment-domains/base").name == "base"
    assert experts.resolve_expert("minilm-sentiment-domains/mtl").name == "mtl"
    assert asked == [False, False, True]
    for reference, message in [("minilm-sentiment-domains/nyt", "has no 'nyt'; known: base, vader-tweets"),
                               ("minilm-sentiment/base", "unknown benchmark setting 'minilm-sentiment'; known: "),
                               ("minilm-cross-task/mtl/nope", "has no 'mtl/nope'; known: base, sms-spam, trec-coarse, "
                                                              "bbc-news, rotten-tomatoes, mtl/TASK (its multi-task "
                                                              "model has a head per task: name the task)"),
                               ("minilm-cross-task/mtl", "has no 'mtl'; known: base, sms-spam, "),  # (no model there)
                               ("minilm-sentiment-domains/mtl/vader-nyt", "has no 'mtl/vader-nyt'; known: base, "
                                "vader-tweets, vader-movies, vader-amazon, vader-nyt, mtl")]:  # (one shared head)
        with pytest.raises(experts.ModelSourceError, match=f"^expert:{re.escape(reference)}: .*{re.escape(message)}"):
            experts.resolve_expert(reference)  # a typo is refused before the setting trains
    assert asked == [False, False, True]


@pytest.mark.slow
def test_a_run_logged_to_a_file_shows_each_phase_with_its_time(small_experts: Any, tmp_path: Path) -> None:
    from tests.helpers.studies import small_study_config

    experts, _ = small_experts
    study = tmp_path / "logged.yaml"
    study.write_text(yaml.safe_dump(small_study_config(tmp_path, experts, name="logged", trials=2,
                                                       baselines=["sources", "ties"])))
    result = CliRunner().invoke(main, ["run", str(study)])  # not a terminal: lines, not bars
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for expected in (r"baselines: sources: \d+\.\d s", r"baselines: ties: \d+\.\d s", r"baselines: done in \d+\.\d s",
                     r"trial 0: complete value 0\.\d{4} in \d+\.\d s; 1/2 finished; best 0\.\d{4} \(#0\)",
                     r"trial 1: complete .*; 2/2 finished; best .*", r"trials: 2 ran in \d+\.\d s"):
        assert any(re.fullmatch(expected, line) for line in lines), (expected, result.output)
    assert not [line for line in lines[lines.index(next(x for x in lines if x.startswith("trial 0:"))):]
                if line.startswith("merging")]  # a trial's own merge is no phase of its own
    assert "best found (trial" in result.output, result.output  # and the table at the end


def test_log_lines_of_stages_phases_and_long_stages() -> None:
    import io

    from rich.console import Console

    from evoopt.display import Bars

    out = io.StringIO()
    with Bars(Console(file=out)) as bars:  # not a terminal
        bars.EVERY = 0.0  # every update of a running stage says how far it is
        bars("training a", 0, 2)
        bars("training a", 1, 2)
        bars("training a", 2, 2)
        bars("baselines: sources", 0, 3)
        bars("baselines: ties", 2, 3)
        bars("baselines", 3, 3)
        bars("merging", 0, 5)
    lines = out.getvalue().splitlines()
    assert [re.sub(r"\d+\.\d s|\d+ s", "T", line) for line in lines] == [
        "training a: 1/2 after T", "training a: T", "baselines: sources: T", "baselines: ties: T",
        "baselines: done in T", "merging: T"]


def test_user_errors_are_one_message_and_bugs_keep_their_traceback(llama_family: list[Path], tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from evoopt.errors import EvooptError

    recipe = _write(tmp_path, {"method": "linear", "models": [{"model": str(p)} for p in llama_family[1:]]})
    missing = CliRunner().invoke(main, ["merge", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    assert missing.exit_code == 1 and "Error: " in missing.output and "recipe file not found" in missing.output
    assert isinstance(missing.exception, SystemExit)  # printed by click, no traceback

    def bug(self: object, *args: object, **kwargs: object) -> None:
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr("evoopt.merge.merger.Merger.merge", bug)
    result = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert isinstance(result.exception, ValueError) and not isinstance(result.exception, EvooptError)
    assert "Error: a bug" not in result.output  # not passed off as a user error
    assert not (tmp_path / "out").exists()


def test_commands_on_a_busy_port_an_odd_trial_and_missing_sources_say_so(tmp_path: Path) -> None:
    """`dashboard` on a port taken printed "serving" and then a traceback; `export --trial ²` (a digit to
    str.isdigit) a ValueError traceback; `baselines` on missing sources made the study's storage first."""
    import socket

    from evoopt.study.config import parse_config
    from evoopt.study.run import open_study

    study = tmp_path / "s.yaml"
    data = {"name": "s", "storage": f"sqlite:///{tmp_path / 's.db'}", "artifacts": str(tmp_path / "out"),
            "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]}}
    study.write_text(yaml.safe_dump(data))
    open_study(parse_config(data, root=tmp_path))
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["dashboard", str(study), "--port", str(port)])
    assert result.exit_code == 1 and f"--port {port}: cannot serve there" in result.output, result.output
    assert "serving" not in result.output
    result = CliRunner().invoke(main, ["export", str(study), "--trial", "²", "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and "--trial" in result.output and "Traceback" not in result.output, result.output
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump({**data, "name": "fresh", "storage": None, "artifacts": str(tmp_path / "art")}))
    result = CliRunner().invoke(main, ["baselines", str(fresh)])
    assert result.exit_code == 1 and "sources.base" in result.output, result.output
    assert not (tmp_path / "art").exists()


@pytest.mark.slow
def test_the_demo_and_baselines_commands_run_a_real_study_end_to_end(small_experts: Any, tmp_path: Path) -> None:
    """The demo and baselines commands were tested only with the study engine stubbed: here on real experts, the
    demo runs, exports its best model (replaced by the next run, which resumes), and baselines prints its table."""
    from tests.helpers.studies import small_study_config, write_study_config

    experts, _ = small_experts
    study = write_study_config(tmp_path, small_study_config(tmp_path, experts, name="cli-demo", trials=2))
    out = tmp_path / "best"
    for _ in range(2):  # (the second resumes the study and replaces the export)
        result = CliRunner().invoke(main, ["demo", "--study", str(study), "--out", str(out), "--overwrite"])
        assert result.exit_code == 0, result.output
        assert re.search(r"best merged model \(trial \d+ \(value [-0-9.e]+\)\)\s+written to", result.output)
        assert (out / "config.json").is_file() and (out / "evoopt_recipe.yaml").is_file()
    other = write_study_config(tmp_path, small_study_config(tmp_path, experts, name="cli-baselines", trials=1,
                                                            baselines=["sources"]))
    result = CliRunner().invoke(main, ["baselines", str(other)])
    assert result.exit_code == 0, result.output
    assert all(f"source {task}" in result.output for task in experts.experts), result.output
