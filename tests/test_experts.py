"""Expert fine-tuning on real data: specialisation, caching, safe recovery.

Builds small MiniLM experts (a few hundred examples) on two VADER domains whose
label balance differs (tweets mostly positive, NYT editorials mostly negative).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evoopt.data.corpora import load_splits
from evoopt.data.experts import build_setting, get_setting
from tests.helpers.small import SMALL


@pytest.fixture(scope="module")
def built(small_experts):  # type: ignore[no-untyped-def]
    return small_experts


def _majority(task: str) -> float:
    labels = list(load_splits(task)["dev"]["label"])
    return max(labels.count(0), labels.count(1)) / len(labels)


@pytest.mark.slow
def test_each_expert_specialises_on_its_own_domain(built) -> None:  # type: ignore[no-untyped-def]
    experts, _ = built
    from evoopt.data.experts import cross_scores

    scores = cross_scores(experts, "dev")
    for task in SMALL.tasks:
        own = scores[task][task]
        assert own > scores["base"][task] + 0.05, (task, scores)
        # more than predicting the majority class: it learned the domain
        assert own > _majority(task) + 0.03, (task, own, _majority(task))


@pytest.mark.slow
def test_expert_folders_are_complete_and_reused(built) -> None:  # type: ignore[no-untyped-def]
    experts, root = built
    folder = experts.experts["vader-tweets"]
    meta = json.loads((folder / "expert.json").read_text())
    assert meta["train"]["steps"] == 40 and meta["train_examples"] == 400
    assert set(meta["scores"]["vader-tweets"]) == {"dev", "test"}
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = build_setting(SMALL, root=root, limit_train=400, multitask=False)
    assert again.experts == experts.experts
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_half_written_expert_is_rebuilt_never_loaded(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    experts, root = built
    copy = tmp_path / "experts"
    shutil.copytree(root, copy)
    nyt = copy / experts.experts["vader-nyt"].name
    (nyt / "expert.json").unlink()  # as if the run was killed before the folder was complete
    (nyt / "model.safetensors").write_bytes(b"partial")
    rebuilt = build_setting(SMALL, root=copy, limit_train=400, multitask=False)
    assert json.loads((rebuilt.experts["vader-nyt"] / "expert.json").read_text())["kind"] == "expert"


def test_the_cache_knows_a_base_by_its_content_and_adopts_folders_of_the_old_keys(monkeypatch: pytest.MonkeyPatch,
                                                                                   tmp_path: Path) -> None:
    """A base rewritten in place with other weights of the same size (a package updated, a model fine-tuned again)
    gives new folders: names and sizes were hashed, and experts of the old weights were kept. Two bases of one
    architecture no longer share a folder. A folder of the old key is adopted where the base is older than it, and
    trained anew where the base changed after it (no training here: the trainers record the folders asked for)."""
    import os
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from evoopt.data import experts as module
    from evoopt.data.settings import Setting
    from tests.helpers.models import save_family, tiny_bert_config

    base, other = save_family(tmp_path / "bases", tiny_bert_config(), experts=1, seed=0,
                              model_class="BertForSequenceClassification")
    monkeypatch.setattr(module, "_ensure_base", lambda pretrained, identity, *args: tmp_path / identity)
    monkeypatch.setattr(module, "_ensure_trained", lambda folder, *args: folder)
    root = tmp_path / "cache"

    def built(path: Path) -> list[str]:
        setting = Setting("identity-test", "no training", str(path), ("vader-tweets",))
        made = build_setting(setting, root=root, multitask=False)
        return [p.name for p in (*made.base.values(), *made.experts.values())]

    first, beside = built(base), built(other)
    assert (base / "model.safetensors").stat().st_size == (other / "model.safetensors").stat().st_size
    assert not set(first) & set(beside)  # (the same names and sizes: one key before)
    assert built(base) == first
    state = load_file(base / "model.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, base / "model.safetensors",
              metadata={"format": "pt"})  # the same size, other weights
    assert not set(built(base)) & set(first)

    # a folder made under the old key (names and sizes) after the base was written: adopted, not trained anew
    name = lambda identity: f"vader-tweets-{identity}"  # noqa: E731
    legacy = root / name(module._legacy_identity(other))
    time.sleep(0.02)  # (trained after the base was written, on any file system's clock)
    legacy.mkdir(parents=True)
    torch.save({}, legacy / "weights.pt")
    identity = module._base_identity(other)
    # one trained from another base path (a second setting of the same architecture and size) is not adopted
    (legacy / "expert.json").write_text(json.dumps({"kind": "expert", "base": str(base), "base_identity": "old"}))
    folder = module._cached(root, name, identity, other)
    assert legacy.exists() and not folder.exists()
    (legacy / "expert.json").write_text(json.dumps({"kind": "expert", "base": str(other), "base_identity": "old"}))
    assert module._cached(root, name, identity, other) == folder
    assert not legacy.exists() and (folder / "weights.pt").exists()
    assert json.loads((folder / "expert.json").read_text()) == {"kind": "expert", "base": str(other),
                                                                "base_identity": identity}
    # ... but where the base changed after it (its mtime set back by a copy that keeps mtimes: its ctime is
    # later), the old folder is left and the model trained anew
    shutil.rmtree(folder)
    legacy.mkdir()
    (legacy / "expert.json").write_text(json.dumps({"base": str(other)}))
    time.sleep(0.01)
    earlier = (legacy / "expert.json").stat().st_mtime_ns - 10**9
    os.utime(other / "model.safetensors", ns=(earlier, earlier))  # (the change itself sets its ctime to now)
    assert module._cached(root, name, identity, other) == folder
    assert legacy.exists() and not folder.exists()


def test_unknown_setting_lists_known() -> None:
    with pytest.raises(ValueError, match="known: minilm-cross-task, minilm-sentiment-domains"):
        get_setting("minilm")


def test_new_split_rules_give_the_experts_new_folders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An expert trained before the splits changed saw what may now be dev or test: the corpora's split version is in
    every expert's and the multi-task model's cache key, and in the expert.json it writes (no training here: the
    trainers are replaced by a record of the folders asked for)."""
    from evoopt.data import corpora
    from evoopt.data import experts as module

    asked: list[Path] = []
    monkeypatch.setattr(module, "_ensure_base", lambda *args: tmp_path / "base")
    monkeypatch.setattr(module, "_ensure_trained", lambda folder, *args: asked.append(folder) or folder)

    def folders() -> list[str]:
        built = build_setting(SMALL, root=tmp_path, multitask=True)
        assert built.multitask is not None
        return [p.name for p in (*built.experts.values(), built.multitask)]

    before = folders()
    assert folders() == before and len(asked) == 6  # the same version: the same folders
    monkeypatch.setattr(corpora, "SPLIT_VERSION", corpora.SPLIT_VERSION + 1)
    after = folders()
    assert len(after) == 3 and not set(after) & set(before)
    module._write_meta(tmp_path, SMALL, ("vader-tweets",), "identity", SMALL.train, examples=1, limit_train=None,
                       seconds=0.0, scores={})
    assert json.loads((tmp_path / "expert.json").read_text())["split_version"] == corpora.SPLIT_VERSION


def test_new_lm_eval_tasks_give_the_causal_experts_new_folders(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    """A causal expert's recorded scores are lm-eval's on evoopt's tasks: a change of how those score
    (corpora.TASK_VERSION) gives it another folder, and its scores are taken anew; an encoder expert keeps its own."""
    from evoopt.data import corpora
    from evoopt.data import experts as module
    from evoopt.data.settings import Setting

    monkeypatch.setattr(module, "_ensure_base", lambda *args: tmp_path / "base")
    monkeypatch.setattr(module, "_ensure_trained", lambda folder, *args: folder)
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()
    save_file({"w": torch.zeros(2)}, tmp_path / "base" / "model.safetensors")  # (a base is known by its weights)
    causal = Setting("causal-test", "no training", str(tmp_path / "base"), ("sms-spam",), kind="causal")

    def folders() -> list[str]:
        built = [build_setting(setting, root=tmp_path, multitask=False) for setting in (causal, SMALL)]
        return [folder.name for experts in built for folder in experts.experts.values()]

    before = folders()
    monkeypatch.setattr(corpora, "TASK_VERSION", corpora.TASK_VERSION + 1)
    after = folders()
    assert after[0] != before[0] and after[1:] == before[1:]


def test_a_revised_corpus_gives_its_settings_experts_new_folders(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    """A corpus whose reader changed the texts it holds (Corpus.revision) gives the settings that read it new
    expert folders, and no other setting; a corpus never revised adds nothing to the keys, so those made before
    revisions existed stand."""
    from dataclasses import replace

    from evoopt.data import corpora
    from evoopt.data import experts as module
    from evoopt.data.settings import Setting

    monkeypatch.setattr(module, "_ensure_base", lambda *args: tmp_path / "base")
    monkeypatch.setattr(module, "_ensure_trained", lambda folder, *args: folder)
    cross = Setting("cross-test", "with rotten tomatoes", SMALL.base, ("vader-nyt", "rotten-tomatoes"))

    def folders(setting: Setting) -> list[str]:
        return [folder.name for folder in build_setting(setting, root=tmp_path, multitask=False).experts.values()]

    before = {setting.name: folders(setting) for setting in (cross, SMALL)}
    assert module._data(SMALL) == [0, corpora.SPLIT_VERSION]
    assert module._data(cross) == [0, corpora.SPLIT_VERSION, "rotten-tomatoes revision 1"]
    monkeypatch.setitem(corpora.CORPORA, "rotten-tomatoes", replace(corpora.CORPORA["rotten-tomatoes"], revision=2))
    assert folders(SMALL) == before[SMALL.name]
    assert not set(folders(cross)) & set(before[cross.name])


def _stale(folder: Path) -> dict[str, object]:
    """Make ``folder``'s expert.json look written before the dev and test rules it has (bogus scores, no
    eval_version); returns what it held."""
    meta: dict[str, object] = json.loads((folder / "expert.json").read_text())
    stale = {k: v for k, v in meta.items() if k != "eval_version"}
    stale["scores"] = {task: {"dev": -1.0, "test": -1.0} for task in meta["scores"]}  # type: ignore[attr-defined]
    (folder / "expert.json").write_text(json.dumps(stale))
    return meta


@pytest.mark.slow
def test_new_dev_and_test_rules_score_the_experts_anew_without_training(built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A rule that changes dev or test but not train (corpora.EVAL_VERSION) keeps each expert's folder and weights
    and takes its scores anew: the same as when it was trained on the same rows. The same for a multi-task model
    with a model per task in folder/<task>."""
    from evoopt.data import corpora
    from evoopt.data.experts import _scored_anew

    experts, root = built
    copy = tmp_path / "experts"
    shutil.copytree(root, copy)
    folder = copy / experts.experts["vader-nyt"].name
    meta = _stale(folder)
    assert meta["eval_version"] == corpora.EVAL_VERSION
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    current = sorted(p for p in copy.glob("*/expert.json") if p.parent != folder)  # scored under today's rules
    assert current
    stamps = [p.stat().st_mtime_ns for p in current]
    rebuilt = build_setting(SMALL, root=copy, limit_train=400, multitask=False)
    assert rebuilt.experts["vader-nyt"] == folder
    assert json.loads((folder / "expert.json").read_text()) == meta
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.stat().st_mtime_ns for p in current] == stamps  # not scored again

    per_task = tmp_path / "mtl"  # the two experts as the heads of a per-task-head multi-task model
    for task, expert in experts.experts.items():
        shutil.copytree(expert, per_task / task)
    scores = {task: json.loads((expert / "expert.json").read_text())["scores"][task]
              for task, expert in experts.experts.items()}
    (per_task / "expert.json").write_text(json.dumps({"heads": "per task", "scores": {}}))
    _scored_anew(per_task, SMALL, SMALL.train)
    assert json.loads((per_task / "expert.json").read_text())["scores"] == scores


@pytest.mark.slow
def test_a_causal_expert_is_scored_anew_through_lm_eval(smol_tiny_family: list[Path], tmp_path: Path) -> None:
    """A causal model's scores are lm-eval's on the setting's tasks, dev and test, taken again from its folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data import corpora
    from evoopt.data.experts import _scored_anew, score_causal
    from evoopt.data.settings import Setting

    causal = Setting("causal-test", "tiny", str(smol_tiny_family[0]), ("sms-spam",), kind="causal", eval_limit=8)
    folder = tmp_path / "expert"
    shutil.copytree(smol_tiny_family[1], folder)
    (folder / "expert.json").write_text(json.dumps({"scores": {"sms-spam": {"dev": -1.0, "test": -1.0}}}))
    _scored_anew(folder, causal, causal.train)
    meta = json.loads((folder / "expert.json").read_text())
    assert meta["eval_version"] == corpora.EVAL_VERSION
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    assert meta["scores"] == score_causal(model, AutoTokenizer.from_pretrained(str(folder)), causal)
    assert set(meta["scores"]["sms-spam"]) == {"dev", "test"} and meta["eval_limit"] == 8
    stamp = (folder / "expert.json").stat().st_mtime_ns
    _scored_anew(folder, causal, causal.train)
    assert (folder / "expert.json").stat().st_mtime_ns == stamp  # the same examples: not scored again
    fewer = Setting("causal-test", "tiny", str(smol_tiny_family[0]), ("sms-spam",), kind="causal", eval_limit=4)
    _scored_anew(folder, fewer, fewer.train)  # other examples: its scores were on 8 of each, the base's now on 4
    again = json.loads((folder / "expert.json").read_text())
    assert again["eval_limit"] == 4 and again["scores"] == score_causal(model, AutoTokenizer.from_pretrained(
        str(folder)), fewer)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_statistic_merges_on_real_experts(built, tmp_path: Path, method: str) -> None:  # type: ignore[no-untyped-def]
    import torch
    from transformers import AutoTokenizer

    from evoopt.data.experts import evaluate_accuracy
    from evoopt.merge.merger import Merger
    from evoopt.merge.recipe import parse_recipe

    experts, _ = built
    calibration = tmp_path / "calibration.txt"
    # calibration texts from training data, never dev or test (as the README asks of users)
    train = list(load_splits("vader-tweets")["train"]["text"]) + list(load_splits("vader-nyt")["train"]["text"])
    calibration.write_text("\n".join(t.replace("\n", " ") for t in train[::200]))
    models = [{"model": str(p)} for p in experts.experts.values()]
    merger = Merger(parse_recipe({"method": method, "models": models,
                                  "calibration": {"texts": str(calibration), "max_examples": 24}}))
    assert merger.statistics is not None and len(merger.statistics) > 10
    merged = merger.merge()
    average = Merger(parse_recipe({"method": "linear", "models": models})).merge()
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.allclose(dict(merged.named_parameters())[name], dict(average.named_parameters())[name])
    tokenizer = AutoTokenizer.from_pretrained(str(merger.structure.folder))
    for task in SMALL.tasks:
        assert evaluate_accuracy(merged, tokenizer, load_splits(task)["dev"], SMALL.train) > _majority(task), task
