"""Merging as a resumable Optuna study: the engine.

A :class:`Worker` is the trial loop of one process: the study's kind (:mod:`evoopt.study.kinds`)
builds the evaluation model once and writes each trial's candidate into it, and the
:class:`~evoopt.study.evaluator.Evaluator` scores it on dev. :func:`run_study` creates or resumes
the study in its storage and runs trials until the config's budget; :func:`run_baselines`
records what the search must beat; :func:`export_trial` rebuilds any trial's model (or the
study's answer) from its parameters.

Storage: the default is a SQLite file in the artifacts folder (several local workers, opens
in optuna-dashboard). With any RDB storage, running trials send heartbeats; a trial whose
process died is failed after ``grace_period`` seconds and retried with the same parameters.
A study remembers its config: resuming with a different one is refused, naming the keys
that differ.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import TrialState

from evoopt.data.objective import Scores
from evoopt.data.outcomes import Outcomes
from evoopt.errors import ConfigError, EvaluationError, EvooptError, RecipeError, WorkerError, problems
from evoopt.merge.merger import pick_device
from evoopt.merge.recipe import Recipe
from evoopt.models.io import atomic_write, reference_problem
from evoopt.search.cma import EvoCmaSampler
from evoopt.search.evolver import NOT_FINITE, SlotSampler
from evoopt.search.samplers import SHARED_SEED, base_seed, make_pruner, make_sampler
from evoopt.study.baselines import greedy_soup, score_baselines  # noqa: F401  (greedy_soup: for evoopt.study.run users)
from evoopt.study.config import StudyConfig
from evoopt.study.evaluator import Evaluator
from evoopt.study.fitness import PRECISION_ATTR, study_autocast, study_estimator
from evoopt.study.kinds import Kind, make_kind, on_cpu
from evoopt.study.report import summary_rows, update_note
from evoopt.study.space import Sources
from evoopt.study.storage import (  # noqa: F401  (re-exported: where evoopt.study.run users found them)
    CONFIG_ATTR,
    CONFIG_ERROR_ATTR,
    DATA_ATTR,
    FINISHED,
    JOINED_ATTR,
    ROOT_ATTR,
    WITHDRAWN_ATTR,
    best_index,
    best_trial,
    better,
    check_config,
    check_data,
    check_experts,
    check_source_weights,
    check_stored,
    data_rules,
    finished_trials,
    get_trial,
    holds_results,
    load_study,
    record_baseline_outcomes,
    storage_from_url,
)

Progress = Callable[[str, int, int], None]


class BudgetReached(RuntimeError):
    """The study has its budget of trials: this trial fails without running and the worker stops."""


def open_storage(config: StudyConfig, kind: Kind | None = None) -> optuna.storages.BaseStorage:
    """The config's storage, checked to be reachable before any work; trials of dead workers are retried
    with the same parameters unless the kind says otherwise (an Evolver slot is taken again instead)."""
    retry = (kind or make_kind(config)).retry_failed
    return storage_from_url(config.storage_url, heartbeat_interval=config.heartbeat_interval,
                            grace_period=config.grace_period, retry=retry)


def open_study(config: StudyConfig, *, worker: int = 0, create: bool = True, kind: Kind | None = None) -> optuna.Study:
    """Create the study with its sampler, or load it and check it was made from the same config.

    The sampler is given the kind's space (built once, and only for samplers that take it).
    To read a study without building anything, use :func:`evoopt.study.storage.load_study`.
    """
    return _open_study(config, worker=worker, create=create, kind=kind)[0]


def check_sources(config: StudyConfig) -> None:
    """The paths of a study's own sources, checked before anything is built, stored or scored, and named by their
    keys in the study config (they were found when the baselines' first recipe opened them, as ``models[0].model``
    of a recipe the user never wrote). ``expert:`` references are the config's own check."""
    references = config.sources.references() if config.sources is not None else []
    found = [f"{key}: {problem}" for key, reference in references
             if not reference.startswith("expert:")
             and (problem := reference_problem(reference, config.root, where="the study config")) is not None]
    if not found:  # (the kind of model each one is, read from its config.json: a mismatch failed after the baselines)
        found = [f"{key}: {problem}" for key, reference in references
                 if not reference.startswith("expert:")
                 and (problem := _model_problem(config, reference, base=key == "sources.base")) is not None]
        if (problem := _positions_problem(config)) is not None:
            found.append(problem)
    if found:
        check_stored(config)  # (a stored study that will be refused anyway, by its config or data rules, says so)
        raise problems(ConfigError, config.source, found)


def _positions_problem(config: StudyConfig) -> str | None:
    """An ``objective.max_length`` beyond a source's learned positions (``max_position_embeddings``, GPT-2's
    ``n_positions``; RoBERTa's less the padding offset), read from its config.json (an ``expert:`` model's: its
    setting's base): evoopt's scorer pads and cuts texts to max_length, and such a model then failed with an
    IndexError while scoring. Rotary positions have no such table: not checked."""
    from evoopt.data.settings import SETTINGS, expert_setting
    from evoopt.models.io import resolve_path

    if config.objective.kind != "dev":  # (lm-eval scores whole prompts: max_length cuts nothing)
        return None
    references = [r for _, r in config.sources.references()] if config.sources is not None else []
    if config.setting in SETTINGS:
        references.append(SETTINGS[config.setting].base)
    for reference in dict.fromkeys(references):
        if (setting := expert_setting(reference)) is not None:
            if setting not in SETTINGS:
                continue  # (named by the config's own check)
            reference = SETTINGS[setting].base
        try:
            path = resolve_path(reference, config.root)
            settings = json.loads(((path if path.is_dir() else path.parent) / "config.json").read_text())
        except (OSError, ValueError, EvooptError):
            continue  # (a missing model, or no config: named elsewhere)
        if any(key in settings for key in ("rope_theta", "rope_parameters", "rope_scaling")):
            continue  # (rotary positions: no table to run past)
        positions = settings.get("max_position_embeddings") or settings.get("n_positions")
        model_type = str(settings.get("model_type", ""))
        offset = "roberta" in model_type or model_type in ("camembert", "longformer", "mpnet")
        if isinstance(positions, int) and offset:
            pad = settings.get("pad_token_id")  # (RoBERTa's positions start past its padding token's)
            positions -= (1 if pad is None else int(pad)) + 1
        if isinstance(positions, int) and config.objective.max_length > positions:
            return (f"objective.max_length: {config.objective.max_length} tokens, but {reference} has {positions} "
                    f"positions (max_position_embeddings): set objective.max_length to at most {positions}")
    return None


def _model_problem(config: StudyConfig, reference: str, *, base: bool) -> str | None:
    """A source that cannot be scored by the study's objective, by the architecture its config.json names (a GGUF
    file is a language model): a language model scored as a classifier (kind dev with accuracy, macro_f1 or mse),
    a classifier scored as a language model (lm-eval, perplexity), or mse on a head of more than one output.
    Nothing is said where the config names no architecture of either kind (a bare encoder as the base)."""
    from evoopt.errors import ModelSourceError
    from evoopt.models.io import resolve_path, weight_files
    from evoopt.study.space import study_sources

    path = resolve_path(reference, config.root)
    folder = path if path.is_dir() else path.parent
    try:
        stored_as = weight_files(path)[0]
    except ModelSourceError:
        return None  # (no weights: the model's opening names it)
    if stored_as == "gguf":
        architectures, labels = ["a GGUF language model"], None
    else:
        try:
            model_config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None  # (a bare weights file, or a config the model's loading names)
        architectures = [str(a) for a in model_config.get("architectures") or []]
        labels = len(model_config.get("id2label") or {}) or model_config.get("num_labels")
    causal_names, classifier_names = _architecture_names()
    causal = stored_as == "gguf" or any(a in causal_names for a in architectures)
    classifier = any(a in classifier_names for a in architectures)
    objective, kind = config.objective, ", ".join(architectures)
    scored_as_lm = study_sources(config).kind == "causal"  # (how the study scores its sources: its scorer's rule)
    if scored_as_lm and classifier and not causal:
        scored = "objective.kind lm-eval" if objective.kind == "lm-eval" else "objective.metric perplexity"
        return (f"{reference} is a {kind}, a classifier; {scored} scores language models: use objective.kind dev "
                "with metric accuracy, macro_f1 or mse")
    if not scored_as_lm and causal and not classifier:
        return (f"{reference} is a {kind}, a language model; objective.metric {objective.metric} scores a "
                "classification head: use metric perplexity, or objective.kind lm-eval (accuracy on lm-eval tasks)")
    if objective.metric == "mse" and classifier and not base and labels not in (None, 1):
        return (f"{reference} has {labels} outputs; objective.metric mse needs regression heads (one output): use "
                "metric accuracy or macro_f1, or models fine-tuned for regression")
    return None


@functools.cache
def _architecture_names() -> tuple[frozenset[str], frozenset[str]]:
    """transformers' causal-LM and sequence-classification class names."""
    from transformers.models.auto import modeling_auto

    def names(mapping: Mapping[str, Any]) -> frozenset[str]:
        return frozenset(n for v in mapping.values() for n in ((v,) if isinstance(v, str) else v))

    return (names(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
            names(modeling_auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))


def default_worker_index() -> int:
    """A worker's number when none is given: from the host's name and the process id, never 0 (worker 0 has
    `evoopt run`'s first duties). The pid alone repeated across containers, whose first process is often pid 1:
    their samplers drew the same trials."""
    return zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % (2**24 - 1) + 1  # (seeds stay < 2^32)


def worker_seed(config: StudyConfig, worker: int, *, one_seed: bool = False) -> int:
    """The seed of worker ``worker``'s sampler: ``sampler.options.seed`` or the study's, plus the worker's index
    except for the samplers of :data:`~evoopt.search.samplers.SHARED_SEED` (with one each, two workers' CMA-ES
    restarts differed over the same trials). ``one_seed``: the kind's say."""
    base = base_seed(config.sampler, config.seed)
    return base if one_seed or config.sampler.name in SHARED_SEED else base + worker


def _open_study(config: StudyConfig, *, worker: int = 0, create: bool = True,
                kind: Kind | None = None) -> tuple[optuna.Study, bool]:
    """:func:`open_study`, and whether this call made the study.

    A process that loads a study another one made joins it (:data:`JOINED_ATTR`), once its config is found to be
    the study's, and then checks that its maker is not taking it back (:func:`_take_back`); if it is, it opens
    the study again (made anew, or kept by its maker). A stored study is checked before anything is built
    (:func:`check_stored`): a sampler's space resolves the sources, which may train or rescore experts first."""
    if create:
        check_stored(config)
    kind = kind or make_kind(config)
    seed = worker_seed(config, worker, one_seed=kind.one_seed)
    sampler = make_sampler(config.sampler, seed, lambda: kind.space)  # (bad options refused before any storage)
    pruner = make_pruner(config.pruner.name, config.pruner.options)
    storage = open_storage(config, kind)
    if create and isinstance(sampler, EvoCmaSampler):  # (else found at the first trial, after the baselines)
        other = sampler.warm_start_storage
        try:
            warm = storage if other is None else storage_from_url(other, create=False)
        except ConfigError as error:  # ("storage: ..." names this study's key: the warm start's instead)
            raise ConfigError(f"sampler.options.warm_start_storage: {str(error).removeprefix('storage: ')}") from None
        sampler.check_warm_start(warm)
    patience = time.monotonic() + 10.0
    while True:
        try:
            study = optuna.load_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner)
            made = False
        except KeyError:
            if not create:
                raise ConfigError(f"name: no study {config.name!r} in {config.storage_shown}; run it first") from None
            try:
                study = optuna.create_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner,
                                            directions=config.directions)
                made = True
            except optuna.exceptions.DuplicatedStudyError:  # a worker beside made it first
                continue
        if not create:
            return study, made
        try:
            stored = study.user_attrs.get(CONFIG_ATTR)
            if stored is None and not made and time.monotonic() < patience:
                time.sleep(0.1)  # its maker is writing its config: this one is checked against it, not written over
                continue
            if stored is None:
                study.set_user_attr(CONFIG_ATTR, config.identity())
                study.set_user_attr(DATA_ATTR, data_rules())
                study.set_user_attr(ROOT_ATTR, str(config.root))
            else:
                check_config(study, config)
                check_data(study, config)
            if made or os.environ.get(_LOCAL_WORKER_ENV) or _joined(study, give_up=time.monotonic() > patience):
                check_source_weights(study, config)  # (once, not on every wait; made: recorded)
                break
        except KeyError:  # taken back by its maker after this process loaded it
            pass
        time.sleep(0.1)
    held = 0 if made or config.sampler.name in SHARED_SEED else study._storage.get_n_trials(study._study_id)
    if held:  # Optuna's samplers draw from their seed alone: resumed, they repeated the first run's draws (TPE's
        # start-up trials, every trial of RandomSampler); evoopt's draw each trial from (seed, trial number)
        resumed = int(np.random.SeedSequence([seed, held]).generate_state(1)[0])  # a replay resumes the same
        study.sampler = make_sampler(config.sampler, resumed, lambda: kind.space)
    if study.metric_names != config.metric_names:  # new studies, and studies made before evoopt named them
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(config.metric_names)
    return study, made


_log = logging.getLogger(__name__)
_LOCAL_WORKER_ENV = "EVOOPT_LOCAL_WORKER"  # set for run --workers' processes: their parent waits for them
WORKER_STORAGE_ENV = "EVOOPT_WORKER_STORAGE"  # run --workers' processes: the study's storage URL
_TARGET_ENV = "EVOOPT_TRIAL_TARGET"  # run --workers' processes: the finished trials their parent allowed in all


def from_parent(name: str) -> str | None:
    """What ``run --workers`` gave its worker processes in environment variable ``name``; None in any other process
    (a variable left in a user's shell redirected a plain run's storage, or lowered its budget)."""
    return os.environ.get(name) if os.environ.get(_LOCAL_WORKER_ENV) else None
_IDLE_TRIALS = 3  # trials in a row that failed, none finishing, before a worker stops


def _others_running(study: optuna.Study, config: StudyConfig, started: float, timeout: float | None) -> bool:
    """After a round in which nothing finished: whether trials are still running (another worker's, or a dead
    worker's not failed yet) that may yet leave budget to this worker. Waits for them (failing stale ones, the
    heartbeat's job) at most until they are failed after ``grace_period``, or the run's timeout; True when some
    left the running state meanwhile (the loop then goes on: a dead worker's trial counted against the budget)."""
    def running() -> set[int]:
        return {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}

    waiting = running()
    if not waiting:
        return False
    storage = study._storage
    interval = storage.get_heartbeat_interval() if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(
        storage) else None  # (a journal file has no heartbeats: nothing fails its dead trials)
    deadline = time.perf_counter() + (config.grace_period + interval + 5 if interval else 0)
    if timeout is not None:
        deadline = min(deadline, started + timeout)
    while time.perf_counter() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            fail_stale_trials(study)
        if waiting - running():
            return True
        time.sleep(1.0)
    _log.warning("trial(s) %s still running (another worker's; or a dead worker's, failed after grace_period where "
                 "the storage has heartbeats, never in a journal file: fail it there by hand); this worker stops",
                 ", ".join(map(str, sorted(waiting))))
    return False


def _joined(study: optuna.Study, *, give_up: bool) -> bool:
    """Mark the study as opened by this process, then whether its maker is not taking it back: each write and read
    is one storage transaction, and :func:`_take_back` does the same the other way round (marks, then reads), so
    one of the two always sees the other. ``give_up``: a withdrawal that has lasted this long is a maker that died
    in the middle of it; the mark is cleared."""
    storage, study_id = study._storage, study._study_id
    if JOINED_ATTR not in storage.get_study_system_attrs(study_id):  # written once, not on every open
        storage.set_study_system_attr(study_id, JOINED_ATTR, True)
    if storage.get_study_system_attrs(study_id).get(WITHDRAWN_ATTR) and not give_up:
        return False
    if give_up:
        storage.set_study_system_attr(study_id, WITHDRAWN_ATTR, False)
    return True


def _take_back(study: optuna.Study) -> None:
    """Delete the study this process made, if nothing has been done in it (:func:`_unused`), so that a corrected
    config can have its name. The study is marked withdrawn before it is read; a failure to take it back is
    logged, never raised over the error that caused it."""
    storage, study_id = study._storage, study._study_id
    try:
        storage.set_study_system_attr(study_id, WITHDRAWN_ATTR, True)
        if _unused(study):
            optuna.delete_study(study_name=study.study_name, storage=storage)
        else:
            storage.set_study_system_attr(study_id, WITHDRAWN_ATTR, False)
    except KeyError:
        pass  # taken back already
    except Exception as error:  # the storage failing too: the error that brought us here is the one to show
        warnings.warn(f"study {study.study_name!r} could not be taken back: {error}", stacklevel=2)


def _unused(study: optuna.Study) -> bool:
    """Nothing run yet (:func:`holds_results`), and no other process has opened it (:data:`JOINED_ATTR`; it may
    still be loading its models)."""
    return not holds_results(study, precision=False) and \
        JOINED_ATTR not in study._storage.get_study_system_attrs(study._study_id)


@contextlib.contextmanager
def taken_back_if_refused(config: StudyConfig, *, worker: int = 0, kind: Kind | None = None
                          ) -> Iterator[tuple[optuna.Study, bool]]:
    """:func:`open_study` for a command that may be refused before it does anything (a model path that does not
    exist, say), and whether this call made the study: it is then taken back, so that the corrected config can
    have the name; not once another process has opened it, nor once anything has been done in it."""
    study, made = _open_study(config, worker=worker, kind=kind)
    try:
        yield study, made
    except BaseException:  # (refused, interrupted, or a library's error: a model that will not load)
        if made:
            _take_back(study)
        raise


# --- the worker -------------------------------------------------------------------------------------

class _Interrupt:
    """Ctrl-C (SIGINT) in a run loop: inside a trial's objective it stops the trial (Optuna fails it and stores
    everything finished); between trials, where Optuna is asking for or telling one (a trial stored as RUNNING
    that nothing would fail until its heartbeat's grace period), it is kept until the next trial starts, which
    then fails at once. A second Ctrl-C stops at once, wherever it lands."""

    def __init__(self) -> None:
        self.pending = False
        self._inside = False

    @contextlib.contextmanager
    def inside(self) -> Iterator[None]:
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    @contextlib.contextmanager
    def handled(self) -> Iterator[None]:
        """The handler, installed for the loop (only the main thread can: elsewhere Python's own)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._inside or self.pending:
                raise KeyboardInterrupt
            self.pending = True
            _log.warning("interrupted: stopping once this step of the study is stored (Ctrl-C again: at once)")

        previous = signal.signal(signal.SIGINT, handler)
        optuna_log = logging.getLogger("optuna.study._optimize")  # (its "Trial N failed" with the interrupt's
        quiet = _QuietInterrupted()  # traceback, dozens of lines that read as a crash: the run says it)
        optuna_log.addFilter(quiet)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
            optuna_log.removeFilter(quiet)


class _QuietInterrupted(logging.Filter):
    """Drops Optuna's two lines on a trial failed by Ctrl-C: "Trial N failed with parameters ... because of the
    following error: KeyboardInterrupt()" with its traceback, then "Trial N failed with value None."."""

    def __init__(self) -> None:
        super().__init__()
        self.trials: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        words = record.getMessage().split(" ", 2)
        if record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt):
            self.trials.add(words[1] if len(words) > 1 else "")
            return False
        return not (len(words) > 2 and words[0] == "Trial" and words[1] in self.trials
                    and words[2].startswith("failed with value"))


class Worker:
    """The trial loop of one process: the kind's evaluation model (unless the kind was built before) and the
    evaluator, built once."""

    def __init__(self, config: StudyConfig, *, progress: Progress | None = None, study: optuna.Study | None = None,
                 kind: Kind | None = None, budget: int | None = None) -> None:
        self.config = config
        # the trials the study may hold now: config.trials (a local worker of run --workers N --n-trials: fewer)
        self.budget = config.trials if budget is None else budget
        self.interrupt = _Interrupt()
        self.kind = kind or make_kind(config)
        self.sources: Sources = self.kind.sources
        self.device = pick_device(config.device)
        self.model = self.kind.built(study, progress)  # (a kind built before, run_study's ``kind``, as it is)
        assert self.kind.tokenizer_folder is not None
        self.tokenizer_folder = self.kind.tokenizer_folder
        estimator = study_estimator(config, study)
        pending = None  # with estimate.references, the estimator is fitted once the reference trials are known
        if estimator is None and config.objective.estimate is not None and study is not None:
            pending = functools.partial(study_estimator, config, study, wait=0.0)
        self.evaluator = Evaluator(config, self.sources, self.tokenizer_folder, self.device, estimator,
                                   autocast=study_autocast(config, study), pending=pending)
        self.tokenizer = self.evaluator.tokenizer

    @property
    def space(self) -> Any:
        return self.kind.space

    def __getattr__(self, name: str) -> Any:  # the kind's own parts: merger, population, pool
        if name in ("merger", "population", "pool"):
            return getattr(self.kind, name)
        raise AttributeError(name)

    def scorer(self, split: str) -> Any:
        return self.evaluator.scorer(split, model=self.model)

    def value(self, scores: Scores) -> float | list[float]:
        return self.evaluator.value(scores)

    def score(self, model: torch.nn.Module | list[torch.nn.Module], split: str,
              trial: optuna.Trial | None = None) -> Scores:
        """Per-task scores; with a trial, intermediate values go to its pruner, and the kind's rival (the
        Evolver's paired rule) decides it."""
        return self.evaluator.score(model, split, trial, rival=None if trial is None else self.kind.rival(trial))

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        if self.interrupt.pending:  # (a Ctrl-C between trials: this trial fails at once, as one it would stop)
            raise KeyboardInterrupt
        with self.interrupt.inside():
            try:
                return self._objective(trial)
            except ConfigError:  # (found by the trial, e.g. an lm-eval task that is not there: the run stops, and a
                trial.set_user_attr(CONFIG_ERROR_ATTR, True)  # study holding nothing else is taken back for the fix)
                raise

    def _objective(self, trial: optuna.Trial) -> float | list[float]:
        self._check_budget(trial)
        try:
            model, started = self.kind.candidate(trial)
        except RecipeError as error:  # a sampled recipe no merge can take (weights of zero sum, say): this trial
            if isinstance(error, ConfigError):  # fails, not the run; a config's own problem stops the run
                raise
            trial.set_user_attr("fail_reason", f"its recipe is refused: {error}")
            raise EvaluationError(f"trial {trial.number}: its recipe is refused ({error}); trial failed") from None
        if self.kind.device.type == "cuda":  # (the merge's kernels run asynchronously: its time, not their launch)
            torch.cuda.synchronize(self.kind.device)
        merged = time.perf_counter()
        trial.set_user_attr("merge_seconds", round(merged - started, 4))
        scores = self.score(model, self.config.objective.split, trial)
        trial.set_user_attr("eval_seconds", round(time.perf_counter() - merged, 4))
        trial.set_user_attr("scores", scores)
        value = self.value(scores)
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("fail_reason", f"the objective is not finite: {scores}")
            trial.set_user_attr(NOT_FINITE, True)  # (the Evolver and M2N2 then reject it, rather than retry it)
            raise EvaluationError(f"trial {trial.number}: the score is not finite ({scores}); trial failed")
        return value

    def _check_budget(self, trial: optuna.Trial) -> None:
        """Fail this trial unrun if trials before it already make the budget (finished or still running).

        Several workers may each start a trial when one is left; this check puts the trials in
        number order, so exactly the first ``trials`` of them run. (A running trial whose worker
        died counts until it is failed; its retry comes later and runs in its place.)
        """
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        before = sum(1 for t in trial.study.get_trials(deepcopy=False, states=live) if t.number < trial.number)
        if before >= self.budget:
            trial.set_user_attr("fail_reason", f"budget reached: the study had its {self.budget} trials "
                                "when this one began; it did not run")
            trial.study.stop()
            raise BudgetReached(f"trial {trial.number}: the study has its budget of {self.budget} trials")

    def merged(self, recipe: Recipe) -> torch.nn.Module:
        """A recipe over the sources written into the evaluation model (parameter-space kinds)."""
        return self.kind.merged(recipe)  # type: ignore[attr-defined, no-any-return]

    def trial_model(self, params: dict[str, Any]) -> torch.nn.Module:
        """The model of a finished trial's parameters: its merge, or (data-flow space) its path's model."""
        return self.kind.trial_model(params)


# --- running ----------------------------------------------------------------------------------------

@dataclass
class RunReport:
    study: optuna.Study
    ran: int = 0
    interrupted: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_study(config: StudyConfig, *, n_trials: int | None = None, timeout: float | None = None,
              workers: int = 1, worker_index: int = 0, progress: Progress | None = None,
              on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None,
              baselines: bool = True, report: bool = True, kind: Kind | None = None) -> RunReport:
    """Create or resume the study and run it until it has ``config.trials`` finished trials.

    ``n_trials`` caps the trials this call runs; ``timeout``: seconds after the baselines past which no trial
    starts (in each worker); ``workers`` > 1 runs that many local worker processes on the same storage. At the
    end (unless ``report`` is off) the best trial is scored on the test split, for reporting only. ``kind``: the
    study's kind built before (``make_kind(config)``), for a caller that runs one study in several calls in one
    process: its sources, evaluation model and merge methods' preparation (TSV-M's basis, DELLA's ranks, Iso's
    Gram matrices) are then built once.
    """
    if kind is not None and kind.config.name != config.name:
        raise ConfigError(f"kind: built for study {kind.config.name!r}, not {config.name!r}; "
                          "build it with make_kind(config)")
    check_sources(config)
    kind = kind if kind is not None else make_kind(config)  # built once: the sampler's space and the worker's share it
    with taken_back_if_refused(config, worker=worker_index, kind=kind) as (study, made):
        return _run(config, study, kind, n_trials=n_trials, timeout=timeout, workers=workers,
                    worker_index=worker_index, progress=progress, on_trial=on_trial, baselines=baselines, report=report,
                    made=made)


def _run(config: StudyConfig, study: optuna.Study, kind: Kind, *, n_trials: int | None, timeout: float | None,
         workers: int, worker_index: int, progress: Progress | None,
         on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None, baselines: bool,
         report: bool, made: bool = False) -> RunReport:
    run = RunReport(study)
    # (before the baselines: workers that join meanwhile take the enqueued trials first; by the process that made
    # the study too, a worker's when workers start before `evoopt run`: else the starts came after the budget)
    if worker_index == 0 or made:
        kind.start(study)
    if baselines and config.baselines and "evoopt:baselines" not in study.user_attrs and worker_index == 0:
        run_baselines(config, progress=progress, study=study, sources=kind.sources)
    if worker_index == 0:
        study_estimator(config, study, wait=0.0)  # fitted once, before any worker needs it
    started = time.perf_counter()  # the timeout counts from here: with one worker as with several, each of which
    # is given all of it after the baselines (a worker's build of its model counts in its time)
    before = finished_trials(study)
    # the study's budget now: config.trials, or (a local worker of run --workers N --n-trials M) the finished trials
    # its parent allowed in all, shared by its workers (each one was given M: N x M ran)
    budget = min(config.trials, int(from_parent(_TARGET_ENV) or config.trials))
    remaining = max(0, budget - before)
    if n_trials is not None:
        remaining = min(remaining, n_trials)
    timeout = timeout if timeout is not None else config.timeout
    worker = None
    if remaining and workers > 1:
        run.interrupted = _run_workers(config, workers, remaining, timeout, study, on_trial, target=before + remaining)
    elif remaining:
        worker = Worker(config, progress=progress, study=study, kind=kind, budget=budget)
        interrupt = worker.interrupt

        def stop_if_interrupted(study: optuna.Study, _: optuna.trial.FrozenTrial) -> None:
            if interrupt.pending:  # (Ctrl-C between trials: no next one asked)
                study.stop()

        callbacks: list[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = [
            optuna.study.MaxTrialsCallback(budget, states=FINISHED), stop_if_interrupted]
        if on_trial is not None:
            callbacks.append(on_trial)  # type: ignore[arg-type]
        try:
            with interrupt.handled():
                # failed trials do not count towards the budget: go on while trials finish
                idle = 0  # trials in a row that did not finish (failed), over rounds in which none finished
                while remaining > 0 and not interrupt.pending and (timeout is None or
                                                                   time.perf_counter() - started < timeout):
                    done, first = finished_trials(study), len(study.get_trials(deepcopy=False))
                    left = None if timeout is None else timeout - (time.perf_counter() - started)
                    if isinstance(study.sampler, SlotSampler):  # (its wait for a generation ends with the run's
                        study.sampler.deadline = None if left is None else time.monotonic() + left
                    study.optimize(worker.objective, n_trials=remaining, timeout=left, callbacks=callbacks,
                                   catch=(EvaluationError, BudgetReached), gc_after_trial=False)
                    progress_made = finished_trials(study) - done
                    # a round with nothing finished: its trials (numbered from ``first``) failed, or the budget
                    # refused
                    failed = [] if progress_made else [t for t in study.get_trials(deepcopy=False, states=(
                        TrialState.FAIL,)) if t.number >= first]
                    refused = not progress_made and (not failed or any(
                        str(t.user_attrs.get("fail_reason", "")).startswith("budget reached") for t in failed))
                    idle = 0 if progress_made else idle if refused else idle + len(failed)
                    if refused and not _others_running(study, config, started, timeout):
                        break  # the budget is held by trials still running: waited for, gone on where they failed
                    if idle >= _IDLE_TRIALS:
                        break  # trials keep failing, none finishing: stop rather than fail forever
                    remaining = min(remaining - progress_made, budget - finished_trials(study))
            run.interrupted = interrupt.pending  # (kept until a trial that never started: none is RUNNING)
        except KeyboardInterrupt:
            run.interrupted = True  # Optuna has failed the running trial; everything finished is stored
    run.ran = finished_trials(study) - before
    if report and worker_index == 0 and not run.interrupted:
        report_best(config, study, worker, kind=kind)
        update_note(config, study, kind)
    run.rows = summary_rows(study)
    return run


def worker_env(workers: int, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of one of ``workers`` local worker processes: the machine's cores shared between them
    (torch's and numba's threads), unless ``OMP_NUM_THREADS`` is set. Each would take every core otherwise, and
    OpenMP threads that wait by spinning slow each other down (the same oversubscription, two one-thread
    benchmark jobs on 2 cores running on two threads each, measured 25 to 46 s per SmolLM2 candidate instead of
    9 to 10; local workers' throughput itself is not measured)."""
    env = dict(os.environ if environ is None else environ)
    if "OMP_NUM_THREADS" not in env:
        share = str(max(1, len(os.sched_getaffinity(0)) // workers))
        env["OMP_NUM_THREADS"] = share
        env.setdefault("NUMBA_NUM_THREADS", share)
    return env


def worker_config(config: StudyConfig) -> Path:
    """The config file local workers read (with ``--root``, the study's folder): its storage as printed (the URL,
    password and all, is given in their environment, :data:`WORKER_STORAGE_ENV`)."""
    return atomic_write(config.artifact_dir / "config.json",
                        json.dumps({**config.model_dump(mode="json"), "storage": config.storage_shown}))


def _run_workers(config: StudyConfig, workers: int, remaining: int, timeout: float | None, study: optuna.Study,
                 on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None, *, target: int) -> bool:
    """Local worker processes on the study's storage, sharing a budget of ``target`` finished trials in all;
    returns whether it was interrupted."""
    config_file = worker_config(config)
    command = [sys.executable, "-m", "evoopt.cli", "run", str(config_file), "--root", str(config.root),
               "--no-baselines", "--quiet", "--n-trials", str(remaining)]
    if timeout is not None:
        command += ["--timeout", str(timeout)]
    env = {**worker_env(workers), _LOCAL_WORKER_ENV: "1", _TARGET_ENV: str(target),
           WORKER_STORAGE_ENV: config.storage_url}  # (they do not join: this
    # process waits for them; in their own sessions a terminal's Ctrl-C reaches this process alone, which passes it
    # on once: a second KeyboardInterrupt while a worker failed its trial left the trial running)
    processes = [subprocess.Popen([*command, "--worker-index", str(i)], env=env, start_new_session=True)
                 for i in range(workers)]
    seen: set[int] = set()
    try:
        while any(p.poll() is None for p in processes):
            time.sleep(1.0)
            for trial in study.get_trials(deepcopy=False, states=FINISHED):
                if trial.number not in seen:
                    seen.add(trial.number)
                    if on_trial is not None:
                        on_trial(study, trial)
    except KeyboardInterrupt:
        for p in processes:  # each worker fails its running trial and exits (terminated, a trial stayed RUNNING)
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait()
        return True
    failed = [p.returncode for p in processes if p.returncode]
    if failed:
        raise WorkerError(f"{len(failed)} of {workers} worker processes failed (exit codes {failed}); "
                          "see their output above")
    return False


def run_baselines(config: StudyConfig, *, progress: Progress | None = None, study: optuna.Study | None = None,
                  sources: Sources | None = None) -> list[dict[str, Any]]:
    """Score the sources, their ensemble, greedy soup and the fixed-recipe merges on dev and test; stored on
    the study (made if it is new) and in its note."""
    from evoopt.study.space import study_sources

    check_sources(config)
    study = study or open_study(config)
    scored = score_baselines(config, sources or study_sources(config), progress=progress)
    for name, kept in scored.outcomes.items():
        record_baseline_outcomes(study, name, kept)
    decided = study._storage.get_study_system_attrs(study._study_id)
    if scored.precision is not None and PRECISION_ATTR not in decided:  # one precision for all of a study's trials
        study._storage.set_study_system_attr(study._study_id, PRECISION_ATTR, scored.precision)
    study.set_user_attr("evoopt:baselines", scored.rows)
    update_note(config, study)
    return scored.rows


def report_best(config: StudyConfig, study: optuna.Study, worker: Worker | None = None, *,
                kind: Kind | None = None) -> None:
    """Score the study's answer (its best trial, or the Evolver's population answer) on test, for reporting
    only; stored on the study. Builds the evaluation model only when there is something new to report."""
    kind = worker.kind if worker is not None else kind or make_kind(config)
    kind.report(study, _ReportScore(config, kind, worker.evaluator if worker is not None else None,
                                    study_autocast(config, study)))


class _ReportScore:
    """What :meth:`Kind.report` scores with (:class:`evoopt.study.kinds.base.Score`): the worker's evaluator, or
    one made on first use (after the kind has built its model)."""

    def __init__(self, config: StudyConfig, kind: Kind, evaluator: Evaluator | None, autocast: bool) -> None:
        self.config, self.kind, self.evaluator, self.autocast = config, kind, evaluator, autocast

    def __call__(self, model: torch.nn.Module, split: str, *, like_trials: bool = False) -> Scores:
        if self.evaluator is None:
            assert self.kind.tokenizer_folder is not None
            self.evaluator = Evaluator(self.config, self.kind.sources, self.kind.tokenizer_folder, self.kind.device)
        return self.evaluator.score(model, split, autocast=self.autocast and like_trials)

    def outcomes(self, split: str) -> Outcomes | None:
        return None if self.evaluator is None else self.evaluator.outcomes(split)


def report_result(config: StudyConfig, study: optuna.Study, worker: Worker | None = None) -> None:
    """The Evolver's answer reported (kept for callers of the first plan: :func:`report_best` does it)."""
    report_best(config, study, worker)


def export_trial(config: StudyConfig, which: str | int, out: Path, *, overwrite: bool = False) -> Path:
    """Rebuild a trial's model (``best``: the study's answer) from its parameters and save it, on the CPU."""
    return export_described(config, which, out, overwrite=overwrite)[0]


def export_described(config: StudyConfig, which: str | int, out: Path, *,
                     overwrite: bool = False) -> tuple[Path, str]:
    """:func:`export_trial`, and what it saved in words (``trial 12 (value 0.8632)``), for the command line."""
    from evoopt.models.io import check_writable

    check_writable(out, overwrite=overwrite)
    kind = make_kind(on_cpu(config))
    study = load_study(config)
    check_experts(study, config)  # (before the sources: new rules would train other experts)
    check_sources(config)  # (named by their study keys, not as a recipe's the user never wrote)
    check_source_weights(study, config, record=False)
    return kind.export(study, which, out, overwrite=overwrite)
