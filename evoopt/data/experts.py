"""Experts to merge: fine-tunes of one pretrained model on packaged corpora.

A *setting* names a pretrained base, the tasks (corpora) to make one expert each
for, and the training recipe. :func:`build_setting` fine-tunes the experts (and a
multi-task reference model) into a content-addressed cache: a folder's name is a
hash of everything that determines its weights, it is written atomically, and an
existing complete folder is reused. Each folder is a Hugging Face model with an
``expert.json`` holding the training settings and dev/test scores (scored anew, the
weights kept, when evoopt's dev or test rows change: :func:`_scored_anew`).

Encoder settings start every expert from the same *base*: the pretrained encoder
plus a classification head drawn from an explicit seeded generator, saved once.
Task vectors are taken relative to that base. Experts of tasks with different
label counts have heads of different shapes; a merge must exclude them
(:data:`HEAD_PATTERNS`) and keep each task's own head.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoopt.data import corpora
from evoopt.data.corpora import get_corpus, load_splits
from evoopt.data.settings import (  # noqa: F401  (re-exported)
    HEAD_PATTERNS,
    SETTINGS,
    Setting,
    TrainConfig,
    expert_problem,
    get_setting,
)
from evoopt.data.training import evaluate_accuracy, finetune, finetune_causal, score_causal, train_loop  # noqa: F401
from evoopt.errors import ModelSourceError
from evoopt.models.io import atomic_folder, atomic_write, cache_dir, model_digest, register_scheme, resolve_path

logger = logging.getLogger(__name__)
_VERSION = 1
Progress = Callable[[str, int, int], None]


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()[:12]


def _base_identity(path: Path) -> str:
    """Identity of a pretrained checkpoint by content (:func:`~evoopt.models.io.model_digest`): a base updated in
    place, of the same size, trains new experts (names and sizes were hashed before, and old experts were kept)."""
    return _key(model_digest(path))


def _legacy_identity(path: Path) -> str:
    """The identity cache keys were made of before 2026-12-07: the base's weight files' names and sizes."""
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return _key([(f.name, f.stat().st_size) for f in files])


def _cached(root: Path, name: Callable[[str], str], identity: str, pretrained: Path) -> Path:
    """The folder ``root / name(identity)``; a folder of the same model keyed by the base's legacy identity is
    adopted (renamed into place, its expert.json given the new identity) where it was trained from this base path
    and the base's files are older than its training (their mtime and ctime: a copy that kept old mtimes is not),
    i.e. the base it was trained from is the one there now; else the model is trained anew."""
    folder = root / name(identity)
    legacy = root / name(_legacy_identity(pretrained))
    if _trained(folder) or not _trained(legacy):
        return folder
    try:
        meta = _read_meta(legacy)
        trained_at = (legacy / "expert.json").stat().st_mtime_ns
    except (OSError, ValueError):  # (another process adopted it meanwhile)
        return folder
    files = [pretrained] if pretrained.is_file() else [f for f in pretrained.iterdir() if f.is_file()]
    if meta.get("base") != str(pretrained) or any(
            max((seen := f.stat()).st_mtime_ns, seen.st_ctime_ns) >= trained_at for f in files):
        logger.warning("%s was trained from another or an earlier %s: training anew", legacy.name, pretrained)
        return folder
    try:
        legacy.rename(folder)  # (one process wins; the others find the folder in place)
    except OSError:
        return folder
    atomic_write(folder / "expert.json", json.dumps({**meta, "base_identity": identity}, indent=2))
    logger.info("cache folder %s keyed by its base's content now: %s", legacy.name, folder.name)
    return folder


@dataclass
class ExpertSet:
    """Where a setting's models are: base, one expert per task, the multi-task model."""

    setting: Setting
    base: dict[int, Path]  # label count -> base folder (pretrained + seeded head)
    experts: dict[str, Path]
    multitask: Path | None
    seconds: float = 0.0

    def scores(self) -> dict[str, dict[str, Any]]:
        """expert.json of every model, by label: base@<labels>, each task, mtl."""
        # a causal setting's base is the converted pretrained model, which has no expert.json
        rows = {f"base@{k}": _read_meta(p) for k, p in self.base.items() if _trained(p)}
        rows.update({task: _read_meta(p) for task, p in self.experts.items()})
        if self.multitask is not None:
            rows["mtl"] = _read_meta(self.multitask)
        return rows


def _read_meta(folder: Path) -> dict[str, Any]:
    meta: dict[str, Any] = json.loads((folder / "expert.json").read_text())
    return meta


def build_setting(name: str | Setting, *, root: Path | None = None, progress: Progress | None = None,
                  limit_train: int | None = None, multitask: bool = True,
                  train: TrainConfig | None = None) -> ExpertSet:
    """Build (or reuse) the base, experts and multi-task model of a setting.

    ``limit_train`` caps the training examples per task (for quick checks);
    ``train`` overrides the setting's training recipe. Both enter the cache key.
    """
    setting = name if isinstance(name, Setting) else get_setting(name)
    train = train or setting.train
    root = root or cache_dir() / "experts"
    report = progress or (lambda stage, done, total: None)
    pretrained = resolve_path(setting.base)
    identity = _base_identity(pretrained)
    started = time.perf_counter()
    if setting.kind == "causal":
        from evoopt.models.io import convert_gguf

        label_counts = [0]  # no head: the answer is text
        bases = {0: convert_gguf(pretrained) if pretrained.suffix == ".gguf" else pretrained}
    else:
        label_counts = sorted({len(get_corpus(t).labels) for t in setting.tasks})
        bases = {k: _ensure_base(pretrained, identity, k, train.seed, root) for k in label_counts}
    experts = {}
    for i, task in enumerate(setting.tasks):
        report(f"expert {task}", i, len(setting.tasks))
        base = bases[0] if setting.kind == "causal" else bases[len(get_corpus(task).labels)]
        folder = _cached(root, lambda ident, task=task: f"{task}-" + _key(  # type: ignore[misc]
            setting.name, ident, task, asdict(train), limit_train, *_data(setting)), identity, pretrained)
        experts[task] = _ensure_trained(folder, base, identity, (task,), setting, train, limit_train, report)
    mtl = None
    if multitask:
        mtl_train = TrainConfig(**{**asdict(train), "steps": train.steps * len(setting.tasks)})
        folder = _cached(root, lambda ident: f"mtl-{setting.name}-" + _key(
            setting.name, ident, "mtl", setting.tasks, asdict(train), limit_train, *_data(setting)), identity,
            pretrained)
        if setting.shared_head:
            mtl = _ensure_trained(folder, bases[label_counts[0]], identity, setting.tasks, setting, mtl_train,
                                  limit_train, report)
        else:
            mtl = _ensure_multihead(folder, bases, identity, setting, mtl_train, limit_train, report)
    return ExpertSet(setting, bases, experts, mtl, time.perf_counter() - started)


def _data(setting: Setting) -> list[object]:
    """What a setting's models learn from and are scored on, for their cache keys: the splits' seed and rules
    (:data:`~evoopt.data.corpora.SPLIT_VERSION`: new rules move examples between train, dev and test, and an expert
    trained before would have seen what is now dev or test), the revisions of its corpora that have one (a corpus
    never revised adds nothing: the keys made before revisions existed stand) and, for causal models,
    :func:`_answers`."""
    revised = [f"{t} revision {get_corpus(t).revision}" for t in setting.tasks if get_corpus(t).revision]
    return [setting.data_seed, corpora.SPLIT_VERSION, *revised, *_answers(setting)]


def _answers(setting: Setting) -> list[object]:
    """A causal model learns the label names as its answer text, and its scores are lm-eval's on evoopt's tasks
    (:data:`~evoopt.data.corpora.TASK_VERSION`): they enter its cache keys."""
    if setting.kind != "causal":
        return []
    return [corpora.TASK_VERSION, *(get_corpus(t).labels for t in setting.tasks)]


def _ensure_base(pretrained: Path, identity: str, labels: int, seed: int, root: Path) -> Path:
    folder = _cached(root, lambda ident: f"base-{labels}-{_key(ident, labels, seed)}", identity, pretrained)
    if _trained(folder):
        return folder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(pretrained), num_labels=labels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the head every expert of this label count starts from
        model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
        model.classifier.bias.zero_()
    _clear_stale(folder)
    with atomic_folder(folder, done=_trained) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(pretrained)).save_pretrained(tmp)
        meta = {"kind": "base", "base": str(pretrained), "base_identity": identity, "num_labels": labels,
                "head_seed": seed}
        (tmp / "expert.json").write_text(json.dumps(meta, indent=2))
    return folder


def _write_meta(folder: Path, setting: Setting, tasks: tuple[str, ...], identity: str, train: TrainConfig, *,
                examples: int, limit_train: int | None, seconds: float, scores: Any, **extra: str) -> None:
    """A trained model's expert.json: what made it (setting, base, training) and its dev/test scores."""
    meta = {"kind": "multitask" if len(tasks) > 1 else "expert", "setting": setting.name, "tasks": list(tasks),
            "base": str(resolve_path(setting.base)), "base_identity": identity, **extra, "train": asdict(train),
            "train_examples": examples, "limit_train": limit_train,
            "split_version": corpora.SPLIT_VERSION, "train_seconds": round(seconds, 1),
            "eval_version": corpora.EVAL_VERSION, "eval_limit": setting.eval_limit, "scores": scores}
    (folder / "expert.json").write_text(json.dumps(meta, indent=2))


def _save_trained(folder: Path, model: Any, tokenizer: Any, *meta: Any, **extra: Any) -> Path:
    """A trained model, its tokenizer and its expert.json (:func:`_write_meta`), written atomically."""
    with atomic_folder(folder, done=_trained) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_meta(tmp, *meta, **extra)
    return folder


def _trained(folder: Path) -> bool:
    """Whether a model's folder is complete: another process that trained the same model (the same seeds and rows)
    may have finished it while this one trained; it is kept."""
    return (folder / "expert.json").exists()  # (written last, inside the folder renamed into place)


def _clear_stale(folder: Path) -> None:
    """A folder without expert.json was left by a killed run of an older layout: remove it."""
    import shutil

    if folder.exists() and not _trained(folder):
        logger.warning("removing incomplete model folder %s", folder)
        shutil.rmtree(folder)


def _ensure_trained(folder: Path, base: Path, identity: str, tasks: tuple[str, ...], setting: Setting,
                    train: TrainConfig, limit_train: int | None, report: Progress) -> Path:
    if _trained(folder):
        return _scored_anew(folder, setting, train, report)
    _clear_stale(folder)
    if setting.kind == "causal":
        return _train_causal(folder, base, identity, tasks, setting, train, limit_train, report)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForSequenceClassification.from_pretrained(str(base))
    splits = {t: load_splits(t, seed=setting.data_seed) for t in tasks}
    texts: list[str] = []
    labels: list[int] = []
    for t in tasks:
        rows = splits[t]["train"]
        rows = rows.select(range(min(limit_train, len(rows)))) if limit_train else rows
        texts += rows["text"]
        labels += rows["label"]
    label = "+".join(tasks) if len(tasks) > 1 else tasks[0]
    started = time.perf_counter()
    finetune(model, tokenizer, texts, labels, train, progress=lambda d, n: report(f"training {label}", d, n))
    seconds = time.perf_counter() - started
    scores = {t: _accuracies(model, tokenizer, t, setting, train)
              for t in setting.tasks if len(get_corpus(t).labels) == model.config.num_labels}
    return _save_trained(folder, model, tokenizer, setting, tasks, identity, train, examples=len(texts),
                         limit_train=limit_train, seconds=seconds, scores=scores, start=str(base))


def _accuracies(model: Any, tokenizer: Any, task: str, setting: Setting, train: TrainConfig) -> dict[str, float]:
    """A classifier's accuracy on a task's dev and test rows."""
    splits = load_splits(task, seed=setting.data_seed)
    return {split: evaluate_accuracy(model, tokenizer, splits[split], train) for split in ("dev", "test")}


def _scored_anew(folder: Path, setting: Setting, train: TrainConfig, report: Progress | None = None) -> Path:
    """A cached model whose scores were taken on other dev or test rows (:data:`~evoopt.data.corpora.EVAL_VERSION`:
    a rule that changed them but not train) scored again; its weights stand. Returns ``folder``."""
    meta = _read_meta(folder)
    # a causal model's scores are lm-eval's on the setting's eval_limit examples (not recorded before: once anew)
    other_limit = setting.kind == "causal" and meta.get("eval_limit", "unrecorded") != setting.eval_limit
    if meta.get("eval_version", 0) == corpora.EVAL_VERSION and not other_limit:
        return folder
    logger.info("scoring %s anew: evoopt's dev and test rows, or the examples scored, changed since it was trained",
                folder.name)
    stage = f"scoring {folder.name} anew (dev and test rows changed)"
    report = report or (lambda stage, done, total: None)
    report(stage, 0, 1)
    if setting.kind == "causal":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
        scores = score_causal(model, AutoTokenizer.from_pretrained(str(folder)), setting)
    else:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        def load(path: Path) -> tuple[Any, Any]:
            model = AutoModelForSequenceClassification.from_pretrained(str(path))
            return model, AutoTokenizer.from_pretrained(str(path))

        per_task = meta.get("heads") == "per task"  # (_ensure_multihead: a model per task in folder/<task>)
        shared = None if per_task else load(folder)
        scores = {}
        for t in setting.tasks:
            model, tokenizer = shared or load(folder / t)
            if len(get_corpus(t).labels) == model.config.num_labels:
                scores[t] = _accuracies(model, tokenizer, t, setting, train)
    atomic_write(folder / "expert.json", json.dumps({**meta, "eval_version": corpora.EVAL_VERSION,
                                                     "eval_limit": setting.eval_limit, "scores": scores}, indent=2))
    report(stage, 1, 1)
    return folder


class _SharedEncoder(torch.nn.Module):
    """Per-task classifiers sharing one encoder; a batch mixes tasks, the loss is their example-weighted mean."""

    def __init__(self, models: dict[str, torch.nn.Module]) -> None:
        super().__init__()
        self.tasks = torch.nn.ModuleDict(models)

    def forward(self, parts: list[tuple[str, dict[str, torch.Tensor]]]) -> Any:
        from types import SimpleNamespace

        total = sum(len(inputs["labels"]) for _, inputs in parts)
        loss = sum(self.tasks[task](**inputs).loss * len(inputs["labels"]) / total for task, inputs in parts)
        return SimpleNamespace(loss=loss)


def _ensure_multihead(folder: Path, bases: dict[int, Path], identity: str, setting: Setting, train: TrainConfig,
                      limit_train: int | None, report: Progress) -> Path:
    """The MTL reference of a per-task-head setting: one encoder trained on the union with one head per task.

    Saved as one Hugging Face model per task (the shared encoder with that task's
    head) in ``folder/<task>``, and the scores of all of them in ``folder/expert.json``.
    """
    if _trained(folder):
        return _scored_anew(folder, setting, train, report)
    _clear_stale(folder)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(next(iter(bases.values()))))
    models = {t: AutoModelForSequenceClassification.from_pretrained(str(bases[len(get_corpus(t).labels)]))
              for t in setting.tasks}
    first = models[setting.tasks[0]]
    for model in models.values():  # one encoder object: its gradients accumulate over all tasks
        setattr(model, first.base_model_prefix, getattr(first, first.base_model_prefix))
    rows: list[tuple[str, str, int]] = []
    for t in setting.tasks:
        split = load_splits(t, seed=setting.data_seed)["train"]
        split = split.select(range(min(limit_train, len(split)))) if limit_train else split
        rows += [(t, text, label) for text, label in zip(split["text"], split["label"])]

    def make_batch(batch: np.ndarray) -> dict[str, Any]:
        parts = []
        for t in setting.tasks:
            chosen = [rows[i] for i in batch if rows[i][0] == t]
            if chosen:
                inputs = tokenizer([text for _, text, _ in chosen], padding=True, padding_side="right", truncation=True,
                                   max_length=train.max_length, return_tensors="pt")
                parts.append((t, {**inputs, "labels": torch.tensor([label for _, _, label in chosen])}))
        return {"parts": parts}

    started = time.perf_counter()
    train_loop(_SharedEncoder(models), train, len(rows), make_batch,
           lambda d, n: report("training multi-task (per-task heads)", d, n))
    seconds = time.perf_counter() - started
    scores = {t: _accuracies(models[t], tokenizer, t, setting, train) for t in setting.tasks}
    with atomic_folder(folder, done=_trained) as tmp:
        for t, model in models.items():
            model.save_pretrained(tmp / t)
            tokenizer.save_pretrained(tmp / t)
        _write_meta(tmp, setting, setting.tasks, identity, train, examples=len(rows), limit_train=limit_train,
                    seconds=seconds, scores=scores, heads="per task")
    return folder


def _train_causal(folder: Path, base: Path, identity: str, tasks: tuple[str, ...], setting: Setting,
                  train: TrainConfig, limit_train: int | None, report: Progress) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evoopt.data.corpora import mc_prompt

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    prompts: list[str] = []
    answers: list[str] = []
    for t in tasks:
        rows = load_splits(t, seed=setting.data_seed)["train"]
        rows = rows.select(range(min(limit_train, len(rows)))) if limit_train else rows
        names = get_corpus(t).labels
        prompts += [mc_prompt(t, text) for text in rows["text"]]
        answers += [" " + names[label] for label in rows["label"]]
    label = "+".join(tasks)
    started = time.perf_counter()
    finetune_causal(model, tokenizer, prompts, answers, train,
                    progress=lambda d, n: report(f"training {label}", d, n))
    seconds = time.perf_counter() - started
    scores = score_causal(model, tokenizer, setting)
    return _save_trained(folder, model, tokenizer, setting, tasks, identity, train, examples=len(prompts),
                         limit_train=limit_train, seconds=seconds, scores=scores, start=str(base))


def cross_scores(experts: ExpertSet, split: str = "dev") -> dict[str, dict[str, float]]:
    """Accuracy of the base, every expert and the MTL model on every task (shared-head settings).

    The diagonal is each expert on its own domain; the off-diagonal is the
    specialisation a merge has to reconcile. ``split`` is 'dev' or 'test'. Expert
    scores come from their expert.json (taken after training, and again when the dev or test rows change).
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    setting = experts.setting
    if not setting.shared_head:
        raise ValueError(f"setting: {setting.name!r} has per-task heads; models score only on their own task")
    base = next(iter(experts.base.values()))
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    if setting.kind == "causal":
        table = {"base": {t: s[split] for t, s in _base_causal_scores(base, setting).items()}}
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(base))
        table = {"base": {t: evaluate_accuracy(model, tokenizer, load_splits(t, seed=setting.data_seed)[split],
                                               setting.train) for t in setting.tasks}}
    models = dict(experts.experts)
    if experts.multitask is not None:
        models["mtl"] = experts.multitask
    for label, folder in models.items():
        scores = _read_meta(folder)["scores"]
        table[label] = {t: scores[t][split] for t in scores if split in scores[t]}
    return table


def _base_causal_scores(base: Path, setting: Setting) -> dict[str, dict[str, float]]:
    """lm-eval scores of the untouched base, cached beside the experts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    key = _key(str(base), setting.tasks, setting.eval_limit, *_data(setting), corpora.EVAL_VERSION)
    file = cache_dir() / "experts" / f"base-scores-{setting.name}-{key}.json"
    if file.exists():
        scores: dict[str, dict[str, float]] = json.loads(file.read_text())
        return scores
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    scores = score_causal(model, AutoTokenizer.from_pretrained(str(base)), setting)
    atomic_write(file, json.dumps(scores, indent=2))
    return scores


def resolve_expert(reference: str) -> Path:
    """``SETTING/TASK``, ``SETTING/base``, ``SETTING/mtl`` or ``SETTING/mtl/TASK`` to a model folder."""
    if (problem := expert_problem(reference)) is not None:
        raise ModelSourceError(problem)  # before anything trains
    name, _, member = reference.partition("/")
    # the multi-task model only when it is the one asked for: it trains for minutes, and a study of the
    # setting's experts (the main job) does not use it
    multitask = member == "mtl" or member.startswith("mtl/")
    experts = build_setting(name, multitask=multitask)
    if member == "base":
        return next(iter(experts.base.values()))
    if multitask:
        assert experts.multitask is not None  # built: it was asked for
        return experts.multitask / member.removeprefix("mtl").lstrip("/")  # "mtl/TASK": a per-task-head MTL's
        # folder for the task; "mtl": the shared-head MTL itself
    return experts.experts[member]


register_scheme("expert", resolve_expert, expert_problem)  # expert:SETTING/TASK references, for every model path
