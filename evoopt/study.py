"""Merging as a resumable Optuna study.

A :class:`Worker` holds what one process needs to score candidates, built once:
the sources, the evaluation model (a :class:`~evoopt.merger.Merger` writes each
candidate into it in place) and the tokenised dev data. :func:`run_study` creates
or resumes the study in its storage and runs trials until the config's budget;
:func:`run_baselines` records what the search must beat; :func:`export_trial`
rebuilds any trial's model from its parameters.

Storage: the default is a SQLite file in the artifacts folder (several local
workers, opens in optuna-dashboard). With any RDB storage, running trials send
heartbeats; a trial whose process died is failed after ``grace_period`` seconds
and retried with the same parameters. A study remembers its config: resuming
with a different one is refused, naming the keys that differ.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from evoopt.config import ConfigError, StudyConfig, same_study
from evoopt.dfs import LayerPath, path_model
from evoopt.evolver import EvolverSampler, History
from evoopt.merge import get_method
from evoopt.merger import DTYPES, Merger, pick_device
from evoopt.objective import ClassifierScorer, LmEvalScorer, PerplexityScorer, Scores, combine
from evoopt.population import Population
from evoopt.recipe import Recipe
from evoopt.samplers import make_pruner, make_sampler
from evoopt.space import DfsSpace, EvolverSpace, Sources, Space, fixed_recipe, make_space, study_sources

logger = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONFIG_ATTR = "evoopt:config"


class EvaluationError(RuntimeError):
    """A candidate could not be scored (out of memory, ...): its trial fails, the worker goes on."""


class BudgetReached(RuntimeError):
    """The study has its budget of trials: this trial fails without running and the worker stops."""


# --- storage ----------------------------------------------------------------------------------------

def open_storage(config: StudyConfig) -> optuna.storages.BaseStorage:
    """The config's storage, checked to be reachable before any work."""
    # An Evolver trial that died frees its slot, and the next trial takes it with the same move: a
    # retried copy of it as well would be a duplicate offspring.
    return storage_from_url(config.storage_url, heartbeat_interval=config.heartbeat_interval,
                            grace_period=config.grace_period, retry=config.space.kind != "evolver")


def storage_from_url(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                     create: bool = True, retry: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage: ``journal:PATH`` (or a .log/.journal file), else an RDB URL (sqlite, PostgreSQL, ...).

    With a heartbeat interval, RDB trials of dead processes are failed after
    ``grace_period`` and (``retry``) retried with the same parameters. ``create=False``
    refuses a file storage that does not exist yet instead of making it. A server URL
    without a driver (``postgresql://``) gets the installed one (see :func:`database_url`).
    """
    journal = url.startswith("journal:") or url.endswith((".log", ".journal"))
    path = Path(url.removeprefix("journal:")) if journal else None
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
    if path is not None and not create and not path.is_file():
        raise ConfigError(f"storage: no such file {path}; give the storage URL the study was run with")
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(f"storage: cannot open {url!r}: cannot make its folder ({error}); "
                              "give a storage file in a folder that can be written") from None
    if journal:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    from sqlalchemy.exc import ArgumentError, OperationalError

    shown = _shown(url)
    url = database_url(url)
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}  # several local workers share the file
    if heartbeat_interval is not None:
        retried = optuna.storages.RetryHeartbeatStaleTrialCallback(3) if retry else None
        kwargs.update(heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                      heartbeat_stale_trial_callback=retried)
    try:
        return _rdb_storage(url, kwargs)
    except ImportError as error:  # Optuna's "Failed to import DB access module", from the driver's ImportError
        cause = error.__cause__ or error.__context__ or error
        raise ConfigError(f"storage: the database driver of {shown} is not installed ({cause}); install it, "
                          "or name an installed one in the URL (dialect+driver://...)") from None
    except OperationalError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise ConfigError(f"storage: cannot connect to {shown}: {reason}; check that the server is up and "
                          "reachable, the URL and the credentials") from None
    except ArgumentError as error:
        raise ConfigError(f"storage: {shown} is not a storage URL SQLAlchemy knows ({error}); use sqlite:///FILE, "
                          "postgresql://USER@HOST/DB, mysql://USER@HOST/DB or journal:PATH") from None


# a server URL without +driver gets the first installed of these (SQLAlchemy's own default varies by version:
# psycopg2 before 2.1, psycopg from 2.1), so the documented postgresql:// works with either
_DRIVERS = {"postgresql": (("psycopg", "psycopg"), ("psycopg2", "psycopg2")),
            "mysql": (("mysqldb", "MySQLdb"), ("pymysql", "pymysql"))}
_DRIVER_HINTS = {"postgresql": "pip install 'evoopt[postgres]' (psycopg)", "mysql": "pip install PyMySQL"}


def database_url(url: str) -> str:
    """``url`` with its driver named: ``postgresql://`` (or ``postgres://``) becomes ``postgresql+psycopg://``
    when psycopg is installed, else ``postgresql+psycopg2://``; ``mysql://`` likewise with MySQLdb or PyMySQL.

    A URL that names its driver, and every other URL, is returned as it is.
    """
    import importlib.util

    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"storage: {url!r} is not a storage URL; use sqlite:///FILE, postgresql://USER@HOST/DB, "
                          "mysql://USER@HOST/DB or journal:PATH") from None
    dialect = "postgresql" if parsed.drivername == "postgres" else parsed.drivername
    if dialect not in _DRIVERS:
        return url
    for driver, module in _DRIVERS[dialect]:
        if importlib.util.find_spec(module) is not None:
            return parsed.set(drivername=f"{dialect}+{driver}").render_as_string(hide_password=False)
    names = " or ".join(module for _, module in _DRIVERS[dialect])
    raise ConfigError(f"storage: the database driver of {_shown(url)} is not installed (no {names}); "
                      f"{_DRIVER_HINTS[dialect]}")


def _shown(url: str) -> str:
    """The URL for messages, its password masked."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return repr(make_url(url).render_as_string(hide_password=True))
    except ArgumentError:  # not a URL: as given
        return repr(url)


def _rdb_storage(url: str, kwargs: dict[str, Any], attempts: int = 5) -> optuna.storages.RDBStorage:
    """Workers started together on an empty database race to create Optuna's tables: the losers,
    refused with a duplicate table or type, open it again once the winner has made them."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError) as error:
            if attempt == attempts - 1 or "already exists" not in str(error):
                raise
            logger.info("storage: another worker is creating the schema; opening again")
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(config: StudyConfig, *, worker: int = 0, create: bool = True) -> optuna.Study:
    """Create the study, or load it and check it was made from the same config."""
    storage = open_storage(config)
    # Evolver: every worker draws the moves of one run (its generators are keyed by generation and target)
    seed = config.seed if config.space.kind == "evolver" else config.seed + worker
    sampler = make_sampler(config.sampler, seed, lambda: make_space(config, study_sources(config)))
    pruner = make_pruner(config.pruner.name, config.pruner.options)
    if not create:
        try:
            return optuna.load_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner)
        except KeyError:
            raise ConfigError(f"name: no study {config.name!r} in {config.storage_url}; run it first") from None
    study = optuna.create_study(study_name=config.name, storage=storage, sampler=sampler, pruner=pruner,
                                directions=config.directions, load_if_exists=True)
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is None:
        study.set_user_attr(CONFIG_ATTR, config.identity())
        study.set_user_attr("evoopt:root", str(config.root))
    elif changed := same_study(stored, config):
        raise ConfigError(f"name: study {config.name!r} in {config.storage_url} was made from another config; "
                          "give this one a new name, or restore the old values:\n  - " + "\n  - ".join(changed))
    if study.metric_names != config.metric_names:  # new studies, and studies made before evoopt named them
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(config.metric_names)
    return study


def evolver_history(study: optuna.Study) -> History:
    """An Evolver study's population history, replayed from its trials by its sampler."""
    sampler = study.sampler
    if not isinstance(sampler, EvolverSampler):
        raise ConfigError("sampler.name: space.kind evolver needs EvolverSampler")
    return sampler.history(study)


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


# --- the worker -------------------------------------------------------------------------------------

def task_heads(sources: Sources, recipe: Recipe, device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Each task's own head (the tensors the recipe excludes), from its expert: heads that differ in shape."""
    from evoopt.io import open_source, resolve_path

    heads = {}
    for task, model in zip(sources.tasks, sources.models):
        source = open_source(resolve_path(model, sources.root))
        names = [n for n in source.keys() if recipe.excluded(n) and source.dtype(n).is_floating_point]
        heads[task] = {n: source.get(n).to(device) for n in names}
    return heads


class Worker:
    """Sources, evaluation model and dev data of one process, built once and reused by every trial."""

    def __init__(self, config: StudyConfig, *, progress: Progress | None = None,
                 study: optuna.Study | None = None) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.sources: Sources = study_sources(config)
        self.space = make_space(config, self.sources)
        self.device = pick_device(config.device)
        self.pool: list[torch.nn.Module] = []
        if isinstance(self.space, DfsSpace):  # the pool's models, as they are: a path shares their weights
            from evoopt.io import load_target, open_source

            dtype = DTYPES.get(config.dtype, torch.float32)  # (auto: float32)
            opened = [open_source(folder) for folder in dfs_pool(self.space, study)]
            self.pool = [load_target(source, dtype=dtype, device=self.device) for source in opened]
            try:  # models of other widths, or not decoders: said before any trial
                path_model(self.pool, self.space.path(self.space.identity()))
            except (TypeError, ValueError) as error:
                raise ConfigError(f"space.pool: {error}") from None
            self.model = self.pool[0]
            folder = opened[0].folder
        else:
            self.merger = Merger(self.space.default(), progress=progress)
            self.model = self.merger.model
            folder = self.merger.structure.folder
        self.tokenizer_folder = folder
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.heads = task_heads(self.sources, self.merger.recipe, self.device) if self.sources.per_task_heads else None
        self._scorers: dict[str, Any] = {}
        self.population = self._population() if isinstance(self.space, EvolverSpace) else None

    def _population(self) -> Population:
        assert isinstance(self.space, EvolverSpace)
        method = self.space.method and get_method(self.space.method)
        calibration = calibration_file(self.config, self.sources) if method and method.statistic else None
        x = self.space.merge_recipe(calibration)
        folder = None
        if self.config.space.population == "mmap":
            import tempfile

            self.config.artifact_dir.mkdir(parents=True, exist_ok=True)
            self._population_dir = tempfile.TemporaryDirectory(prefix="population-", dir=self.config.artifact_dir)
            folder = Path(self._population_dir.name)
        return Population(self.merger.sources, list(self.merger.targets), dtype=self.merger.dtype, folder=folder,
                          device=self.device, method=x.merge_method if x else None, base=self.merger.base,
                          coefficients=x.coefficients if x else None, seed=self.config.seed,
                          statistics=self._estimator(x) if calibration and x else None)

    def _estimator(self, recipe: Recipe) -> Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]:
        """Fisher or RegMean statistics of an individual: its weights written into the model, calibration run."""
        from evoopt.merger import calibration_batches
        from evoopt.statistics import estimate_fisher, gram_matrices

        assert self.merger.structure.folder is not None
        batches = [{k: v.to(self.device) for k, v in b.items()}
                   for b in calibration_batches(recipe, self.merger.structure.folder)]
        estimate = estimate_fisher if recipe.merge_method.statistic == "fisher" else gram_matrices

        def statistics(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                for name, tensor in weights.items():
                    self.merger.targets[name].copy_(tensor)
            return estimate(self.model, batches)

        return statistics

    def write_result(self, history: History) -> torch.nn.Module:
        """The Evolver's answer (the fittest individual, or X of the population) of the history's last generation."""
        assert self.population is not None
        if history.generation == 0:
            raise ConfigError("trial: the study has not scored its initial population yet")
        self.population.advance(history, history.generation - 1)
        self.population.write_result(self.merger.targets, history)
        return self.model

    def scorer(self, split: str) -> Any:
        """The scorer of a split, built on first use (the test scorer only ever for reporting)."""
        if split not in self._scorers:
            o = self.config.objective
            folder = self.config.artifact_dir / "tasks"
            search = split == o.split
            limit = o.limit if search else o.test_limit
            if self.sources.kind == "causal" and o.metric == "perplexity":
                scorer: Any = PerplexityScorer(self.tokenizer, self.sources.tasks, split=split, limit=limit,
                                               batch_size=o.batch_size, max_length=o.max_length,
                                               seed=self.config.seed, device=self.device)
            elif self.sources.kind == "causal" or o.kind == "lm-eval":
                scorer = LmEvalScorer(self.tokenizer, split=split, folder=folder,
                                      corpora=[] if o.tasks else self.sources.tasks, tasks=o.tasks,
                                      include_path=o.include_path, limit=limit, batch_size=o.batch_size,
                                      seed=self.config.seed)
            else:
                scorer = ClassifierScorer(self.tokenizer, self.sources.tasks, split=split,
                                          limit=limit,
                                          stages=o.fidelities if search else (), batch_size=o.batch_size,
                                          max_length=o.max_length, metric=o.metric, seed=self.config.seed,
                                          heads=self.heads, device=self.device)
            self._scorers[split] = scorer
        return self._scorers[split]

    def value(self, scores: Scores) -> float | list[float]:
        if self.config.objective.multi_objective:
            return [scores[t] for t in sorted(scores)]
        return combine(scores, self.config.objective.weights)

    def score(self, model: torch.nn.Module | list[torch.nn.Module], split: str,
              trial: optuna.Trial | None = None) -> Scores:
        """Per-task scores; with a trial, intermediate values go to its pruner."""
        scorer = self.scorer(split)
        try:
            if trial is None or not isinstance(scorer, ClassifierScorer) or len(self.config.objective.fidelities) == 0:
                result: Scores = scorer.scores(model)
                return result
            stages = list(scorer.staged_scores(model))
            for n, scores in stages[:-1]:
                trial.report(combine(scores, self.config.objective.weights), n)
                if trial.should_prune():
                    trial.set_user_attr("scores", scores)
                    trial.set_user_attr("pruned_at", n)
                    raise optuna.TrialPruned(f"pruned after {n} examples per task")
            return stages[-1][1]
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise EvaluationError("out of memory while scoring; lower objective.batch_size or "
                                  "objective.max_length, or set dtype: bfloat16") from None

    def objective(self, trial: optuna.Trial) -> float | list[float]:
        self._check_budget(trial)
        model = self.model
        if isinstance(self.space, EvolverSpace):
            started = self._write_offspring(trial)
        elif isinstance(self.space, DfsSpace):
            try:
                path = self.space.suggest(trial)
            except ValueError as error:  # e.g. no slot on the path
                trial.set_user_attr("fail_reason", str(error))
                raise EvaluationError(f"trial {trial.number}: {error}") from None
            trial.set_user_attr("path", self.space.describe(path))
            trial.set_user_attr("path_length", len(path.hops))
            started = time.perf_counter()
            model = path_model(self.pool, path)
        else:
            recipe = self.space.suggest(trial)
            trial.set_user_attr("recipe", recipe.model_dump(mode="json", exclude_defaults=True))
            started = time.perf_counter()  # the merge alone: sampling and storage writes are not in it
            self.merger.merge(recipe)
        merged = time.perf_counter()
        trial.set_user_attr("merge_seconds", round(merged - started, 4))
        scores = self.score(model, self.config.objective.split, trial)
        trial.set_user_attr("eval_seconds", round(time.perf_counter() - merged, 4))
        trial.set_user_attr("scores", scores)
        value = self.value(scores)
        values = value if isinstance(value, list) else [value]
        if not all(math.isfinite(v) for v in values):
            trial.set_user_attr("fail_reason", f"the objective is not finite: {scores}")
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
        if before >= self.config.trials:
            trial.set_user_attr("fail_reason", f"budget reached: the study had its {self.config.trials} trials "
                                "when this one began; it did not run")
            trial.study.stop()
            raise BudgetReached(f"trial {trial.number}: the study has its budget of {self.config.trials} trials")

    def _write_offspring(self, trial: optuna.Trial) -> float:
        """Bring the population to P_{g-1} and write the trial's candidate into the model; returns when it began."""
        assert isinstance(self.space, EvolverSpace) and self.population is not None
        candidate = self.space.suggest(trial)
        trial.set_user_attr("generation", candidate.generation)
        history = evolver_history(trial.study)
        started = time.perf_counter()
        self.population.advance(history, max(candidate.generation - 1, 0))
        self.population.write(self.merger.targets, candidate.move, individual=candidate.target)
        return started

    def merged(self, recipe: Recipe) -> torch.nn.Module:
        self.merger.merge(recipe)
        return self.model

    def trial_model(self, params: dict[str, Any]) -> torch.nn.Module:
        """The model of a finished trial's parameters: its merge, or (data-flow space) its path's model."""
        if isinstance(self.space, DfsSpace):
            return path_model(self.pool, self.space.path(params))
        assert isinstance(self.space, Space)
        return self.merged(self.space.recipe(params))


def dfs_pool(space: DfsSpace, study: optuna.Study | None = None) -> list[Path]:
    """The folders of a data-flow study's pool.

    ``study:OTHER.yaml`` is that study's best trial (PS+DFS: the best parameter-space model
    as A), exported once into this study's artifacts folder. The trial is pinned in ``study``
    (user attribute ``evoopt:pool``): a better trial found there later does not change this
    study's pool under its trials.
    """
    from evoopt.config import load_config
    from evoopt.io import resolve_path

    config = space.config
    pinned: dict[str, int] = dict(study.user_attrs.get("evoopt:pool", {})) if study is not None else {}
    folders = []
    for ref in space.pool:
        if not ref.startswith("study:"):
            folders.append(resolve_path(ref, config.root))
            continue
        other = load_config(resolve_path(ref.removeprefix("study:"), config.root))
        if ref not in pinned:
            pinned[ref] = get_trial(open_study(other, create=False), "best").number
        folder = config.artifact_dir / "pool" / f"{other.name}-trial-{pinned[ref]}"
        if not folder.exists():
            try:
                export_trial(other, pinned[ref], folder)
            except (FileExistsError, OSError):
                if not folder.exists():  # (another worker exporting the same folder at once is fine)
                    raise
        folders.append(folder)
    if study is not None and pinned and pinned != study.user_attrs.get("evoopt:pool"):
        study.set_user_attr("evoopt:pool", pinned)
    return folders


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
              baselines: bool = True, report: bool = True) -> RunReport:
    """Create or resume the study and run it until it has ``config.trials`` finished trials.

    ``n_trials`` caps the trials this call runs; ``workers`` > 1 runs that many
    local worker processes on the same storage. At the end (unless ``report`` is
    off) the best trial is scored on the test split, for reporting only.
    """
    study = open_study(config, worker=worker_index)
    started = time.perf_counter()
    run = RunReport(study)
    if baselines and config.baselines and "evoopt:baselines" not in study.user_attrs and worker_index == 0:
        run_baselines(config, progress=progress)
    before = finished_trials(study)
    remaining = max(0, config.trials - before)
    if n_trials is not None:
        remaining = min(remaining, n_trials)
    timeout = timeout if timeout is not None else config.timeout
    worker = None
    if remaining and workers > 1:
        run.interrupted = _run_workers(config, workers, remaining, timeout, study, on_trial)
    elif remaining:
        worker = Worker(config, progress=progress, study=study)
        callbacks = [optuna.study.MaxTrialsCallback(config.trials, states=FINISHED)]
        if on_trial is not None:
            callbacks.append(on_trial)  # type: ignore[arg-type]
        try:
            # failed trials do not count towards the budget: go on while trials finish
            while remaining > 0 and (timeout is None or time.perf_counter() - started < timeout):
                done = finished_trials(study)
                left = None if timeout is None else timeout - (time.perf_counter() - started)
                study.optimize(worker.objective, n_trials=remaining, timeout=left, callbacks=callbacks,
                               catch=(EvaluationError, BudgetReached), gc_after_trial=False)
                progress_made = finished_trials(study) - done
                if progress_made == 0:
                    break  # every trial of this round failed: stop rather than fail forever
                remaining = min(remaining - progress_made, config.trials - finished_trials(study))
        except KeyboardInterrupt:
            run.interrupted = True  # Optuna has failed the running trial; everything finished is stored
    run.ran = finished_trials(study) - before
    if report and worker_index == 0 and not run.interrupted:
        report_best(config, study, worker)
        update_note(config, study)
    run.rows = summary_rows(study)
    return run


def _run_workers(config: StudyConfig, workers: int, remaining: int, timeout: float | None, study: optuna.Study,
                 on_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None) -> bool:
    """Local worker processes on the study's storage; returns whether it was interrupted."""
    config_file = config.artifact_dir / "config.json"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    data = {**config.model_dump(mode="json"), "storage": config.storage_url}
    tmp = config_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.rename(config_file)
    command = [sys.executable, "-m", "evoopt.cli", "run", str(config_file), "--root", str(config.root),
               "--no-baselines", "--quiet", "--n-trials", str(remaining)]
    if timeout is not None:
        command += ["--timeout", str(timeout)]
    processes = [subprocess.Popen([*command, "--worker-index", str(i)], env=dict(os.environ))
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
        for p in processes:
            p.terminate()  # each worker fails its running trial and exits
        for p in processes:
            p.wait()
        return True
    failed = [p.returncode for p in processes if p.returncode]
    if failed:
        raise RuntimeError(f"{len(failed)} of {workers} worker processes failed (exit codes {failed}); "
                           "see their output above")
    return False


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    if len(study.directions) > 1:  # one objective per task, all in one direction: the best sum on the front
        front = study.best_trials
        if not front:
            return None
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        return front[best_index([float(sum(t.values)) for t in front], maximize=maximize)]
    try:
        return study.best_trial
    except ValueError:
        return None


def get_trial(study: optuna.Study, which: str | int) -> optuna.trial.FrozenTrial:
    if which == "best":
        trial = best_trial(study)
        if trial is None:
            raise ConfigError(f"trial: study {study.study_name!r} has no completed trial yet")
        return trial
    number = int(which)
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials):
        raise ConfigError(f"trial: study {study.study_name!r} has trials 0..{len(trials) - 1}, not {number}")
    if trials[number].state != TrialState.COMPLETE:
        raise ConfigError(f"trial: trial {number} is {trials[number].state.name}, not COMPLETE")
    return trials[number]


def report_best(config: StudyConfig, study: optuna.Study, worker: Worker | None = None) -> None:
    """Score the best trial on dev (again, full) and test, for reporting only; stored on the study."""
    if config.space.kind == "evolver":
        return report_result(config, study, worker)
    trial = best_trial(study)
    if trial is None:
        return
    reports = dict(study.user_attrs.get("evoopt:test", {}))
    if str(trial.number) in reports:
        return
    worker = worker or Worker(config, study=study)
    model = worker.trial_model(trial.params)
    reports[str(trial.number)] = {"test": worker.score(model, "test"), "dev": trial.user_attrs.get("scores", {})}
    study.set_user_attr("evoopt:test", reports)
    _upload_recipe(config, study, trial, worker)


def report_result(config: StudyConfig, study: optuna.Study, worker: Worker | None = None) -> None:
    """Score the Evolver's answer for the last finished generation on dev and test; stored on the study."""
    history = evolver_history(study)
    if history.generation == 0 or study.user_attrs.get("evoopt:result", {}).get("generation") == history.generation - 1:
        return  # nothing scored yet, or this generation's answer is reported: no worker to build
    worker = worker or Worker(config)
    model = worker.write_result(history)
    split = config.objective.split
    study.set_user_attr("evoopt:result", {
        "generation": history.generation - 1, "best": history.best, "method": config.space.method,
        "dev": worker.score(model, split), "test": worker.score(model, "test")})


def _upload_recipe(config: StudyConfig, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                   worker: Worker) -> None:
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    if isinstance(worker.space, DfsSpace):
        text = dfs_yaml(dfs_record(worker.space, trial))
    else:
        text = worker.space.recipe(trial.params).to_yaml()  # type: ignore[union-attr]
    folder = config.artifact_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    file = config.artifact_dir / f"best-trial-{trial.number}.yaml"
    file.write_text(text)
    upload_artifact(artifact_store=FileSystemArtifactStore(str(folder)), file_path=str(file),
                    study_or_trial=study, storage=study._storage)


# --- baselines --------------------------------------------------------------------------------------

def calibration_file(config: StudyConfig, sources: Sources, per_task: int = 8) -> str:
    """Training texts (never dev or test) for the statistics of Fisher and RegMean."""
    from evoopt.data import load_splits

    file = config.artifact_dir / "calibration.txt"
    lines = []
    for task in sources.tasks:
        lines += [" ".join(t.split()) for t in load_splits(task, seed=config.seed)["train"]["text"][:per_task]]
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text("\n".join(lines) + "\n")
    return str(file.resolve())


def run_baselines(config: StudyConfig, *, progress: Progress | None = None) -> list[dict[str, Any]]:
    """Score the sources, their ensemble, greedy soup and the fixed-recipe merges on dev and test."""
    study = open_study(config)
    worker_progress = progress or (lambda stage, done, total: None)
    sources = study_sources(config)
    rows: list[dict[str, Any]] = []
    base = _Baselines(config, sources, rows, worker_progress)
    base.run()
    study.set_user_attr("evoopt:baselines", rows)
    update_note(config, study)
    return rows


class _Baselines:
    def __init__(self, config: StudyConfig, sources: Sources, rows: list[dict[str, Any]], progress: Progress):
        self.config, self.sources, self.rows, self.progress = config, sources, rows, progress
        self.worker = Worker(_linear_config(config))
        self.weights = config.objective.weights
        self.maximize = config.directions[0] == "maximize"  # perplexity and mse: lower is better

    def _row(self, name: str, model: Any, started: float, **extra: Any) -> dict[str, Any]:
        dev = self.worker.score(model, self.config.objective.split)
        test = self.worker.score(model, "test")
        row = {"name": name, "dev": dev, "test": test, "dev_value": combine(dev, self.weights),
               "test_value": combine(test, self.weights), "seconds": round(time.perf_counter() - started, 2), **extra}
        self.rows.append(row)
        return row

    def _linear(self, weights: list[float]) -> Any:
        recipe = fixed_recipe(self.sources, "linear", {}, [{"weight": w} for w in weights], config=self.config)
        return self.worker.merged(recipe)

    def run(self) -> None:
        wanted = self.config.baselines
        n = len(self.sources.models)
        scored = "sources" in wanted or "greedy-soup" in wanted
        steps = (n if scored else 0) + sum(name != "sources" for name in wanted)  # each source, each other baseline
        done = 0
        sources: list[dict[str, Any]] = []
        if scored:
            for i, label in enumerate(self.sources.labels):
                self.progress("baselines: sources", done, steps)
                started = time.perf_counter()
                sources.append(self._row(f"source {label}", self._linear([float(i == j) for j in range(n)]),
                                         started, kind="source"))
                done += 1
            if "sources" in wanted:
                for name, pick in (("average of sources", None), ("best source (by dev)", "best")):
                    if pick is None:
                        row = {"name": name, "kind": "source",
                               "dev_value": sum(r["dev_value"] for r in sources) / n,
                               "test_value": sum(r["test_value"] for r in sources) / n,
                               "dev": {}, "test": {}, "seconds": 0.0}
                    else:
                        best = sources[best_index([r["dev_value"] for r in sources], maximize=self.maximize)]
                        row = {**best, "name": f"best source ({best['name'].removeprefix('source ')}, by dev)"}
                    self.rows.append(row)
            else:
                del self.rows[:]  # greedy soup alone needs the scores, not the rows
        for name in wanted:
            if name == "sources":
                continue  # scored above
            self.progress(f"baselines: {name}", done, steps)
            done += 1
            started = time.perf_counter()
            if name == "ensemble":
                if self.sources.kind == "causal" or self.sources.per_task_heads:
                    continue  # logit ensembles of classifiers that share a head only
                models = self._load_sources()
                self._row("logit ensemble", models, started, kind="ensemble")
                del models
            elif name == "greedy-soup":
                self._greedy_soup(sources, started)
            else:
                self._merge(name, started)
        self.progress("baselines", steps, steps)

    def _load_sources(self) -> list[torch.nn.Module]:
        from evoopt.io import load_target, open_source, resolve_path

        return [load_target(open_source(resolve_path(m, self.sources.root)), dtype=self.worker.merger.dtype,
                            device=self.worker.device) for m in self.sources.models]

    def _greedy_soup(self, sources: list[dict[str, Any]], started: float) -> None:
        def score(members: list[int]) -> float:
            weights = [float(j in members) for j in range(len(sources))]
            return combine(self.worker.score(self._linear(weights), self.config.objective.split), self.weights)

        soup = greedy_soup([r["dev_value"] for r in sources], score, maximize=self.maximize)
        labels = [self.sources.labels[i] for i in soup]
        self._row(f"greedy soup ({', '.join(labels)})", self._linear([float(j in soup) for j in
                                                                      range(len(sources))]), started, kind="soup")

    def _merge(self, method: str, started: float) -> None:
        params, per_model = _BASELINE_RECIPES.get(method, ({}, {}))
        calibration = None
        from evoopt.merge import get_method

        if get_method(method).statistic:
            calibration = calibration_file(self.config, self.sources)
        recipe = fixed_recipe(self.sources, method, params, [dict(per_model)] * len(self.sources.models),
                              config=self.config, calibration=calibration)
        merger = Merger(recipe)
        merged = merger.merge()
        own = self.worker.merger.model
        with torch.no_grad():  # score through the worker's model (its head handling and device)
            own.load_state_dict(merged.state_dict())
        self._row(f"{method} (fixed)", own, started, kind="merge", recipe=recipe.model_dump(
            mode="json", exclude_defaults=True))
        del merger, merged


def better(value: float, than: float, *, maximize: bool) -> bool:
    """Whether ``value`` beats ``than`` in the study's direction (perplexity and mse are minimised)."""
    return value > than if maximize else value < than


def best_index(values: list[float], *, maximize: bool) -> int:
    """The position of the best value in the study's direction; the first among equals."""
    best = 0
    for i, value in enumerate(values):
        if better(value, values[best], maximize=maximize):
            best = i
    return best


def greedy_soup(scores: list[float], score: Callable[[list[int]], float], *, maximize: bool) -> list[int]:
    """Greedy soup (Wortsman et al., "Model soups", ICML 2022, Recipe 1 / Algorithm 1): the sources in order
    of their own dev score, best first; each joins the uniform soup when the soup with it scores better than
    the soup without it. ``score(members)`` scores the uniform soup of those sources; returns the members,
    in source order. "Best" and "better" follow the study's direction."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i] if maximize else scores[i], i))
    soup, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        value = score(sorted([*soup, i]))
        if better(value, best, maximize=maximize):
            soup.append(i)
            best = value
    return sorted(soup)


# fixed recipes of the merge baselines: (shared parameters, per-model parameters)
_BASELINE_RECIPES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "linear": ({}, {"weight": 1.0}),
    "task_arithmetic": ({"scale": 0.5}, {"weight": 1.0}),
    "ties": ({}, {"weight": 1.0, "density": 0.5}),
    "dare_ties": ({"normalize": True}, {"weight": 1.0, "density": 0.5}),
    "fisher": ({}, {"weight": 1.0}),
    "regmean": ({}, {}),
}


def _linear_config(config: StudyConfig) -> StudyConfig:
    """The same study with a linear space: its Merger makes sources (one-hot weights) and soups."""
    space = config.space.model_copy(update={"method": "linear", "search": {"weight": (0.0, 1.0)}, "fixed": {},
                                            "log": [], "kind": "global" if config.space.kind == "dfs" else
                                            config.space.kind})
    copy = config.model_copy(update={"space": space})
    copy._root = config.root
    return copy


# --- reporting --------------------------------------------------------------------------------------

def summary_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Baselines and the best trial found: name, dev and test values."""
    rows = [{"name": r["name"], "dev": r["dev_value"], "test": r["test_value"]}
            for r in study.user_attrs.get("evoopt:baselines", [])]
    trial = best_trial(study)
    if trial is not None:
        report = study.user_attrs.get("evoopt:test", {}).get(str(trial.number))
        dev = trial.value if trial.values and len(trial.values) == 1 else float(sum(trial.values or [0.0]))
        test = None
        if report:
            test = combine(report["test"], _weights(study))
        rows.append({"name": f"best found (trial {trial.number})", "dev": dev, "test": test})
    if result := study.user_attrs.get("evoopt:result"):
        weights = _weights(study)
        what = "fittest individual" if result["method"] == "none" else f"{result['method']} of the population"
        rows.append({"name": f"Evolver result ({what}, generation {result['generation']})",
                     "dev": combine(result["dev"], weights), "test": combine(result["test"], weights)})
    return rows


def _weights(study: optuna.Study) -> dict[str, float]:
    config = study.user_attrs.get(CONFIG_ATTR, {})
    weights: dict[str, float] = config.get("objective", {}).get("weights", {})
    return weights


def update_note(config: StudyConfig, study: optuna.Study) -> None:
    """The study's Markdown note in optuna-dashboard: sources, baselines, best so far."""
    try:
        from optuna_dashboard import save_note
    except ImportError:
        return
    sources = study_sources(config)
    lines = [f"# {config.name}", "", f"Search space: {space_name(config)}; sampler "
             f"{config.sampler.name}; objective {config.objective.kind} {config.objective.metric} on "
             f"{config.objective.split} (test is for reporting only).", "", "## Sources", ""]
    lines += [f"- base: `{sources.base}`"] if sources.base else []
    lines += [f"- `{m}`" for m in sources.models]
    lines += ["", "## Baselines vs best found", "", "| | dev | test |", "|---|---|---|"]
    for row in summary_rows(study):
        test = "" if row["test"] is None else f"{row['test']:.4f}"
        lines.append(f"| {row['name']} | {row['dev']:.4f} | {test} |")
    save_note(study, "\n".join(lines) + "\n")


def export_trial(config: StudyConfig, which: str | int, out: Path, *, overwrite: bool = False) -> Path:
    """Rebuild a trial's merged model from its parameters and save it (per-task heads: one folder per task)."""
    from evoopt.io import check_writable

    check_writable(out, overwrite=overwrite)
    study = open_study(config, create=False)
    sources = study_sources(config)
    if config.space.kind == "dfs":
        return _export_dfs(config, study, which, out, overwrite=overwrite)
    if config.space.kind == "evolver":
        merger, card = _evolver_model(config, study, which)
    else:
        trial = get_trial(study, which)
        merger = Merger(make_space(config, sources).recipe(trial.params))  # type: ignore[union-attr]
        merger.merge()
        card = None
    if not sources.per_task_heads:
        return merger.export(out, overwrite=overwrite, card=card)
    from evoopt.io import atomic_folder

    with atomic_folder(out, overwrite=overwrite) as tmp:
        params = dict(merger.model.named_parameters())
        for task, head in task_heads(sources, merger.recipe, torch.device("cpu")).items():
            for name, tensor in head.items():
                params[name].data = tensor
            labels = next(t.shape[0] for t in head.values())
            merger.model.config.num_labels = labels
            merger.export(tmp / task, card=card)
    return out


def _evolver_model(config: StudyConfig, study: optuna.Study, which: str | int) -> tuple[Merger, tuple[str, str]]:
    """The Evolver's answer (``best``: the fittest individual or X of the last population) or a trial's
    candidate, in a Worker's model on the CPU; with the history that rebuilds it, as YAML, and a model card."""
    import yaml

    worker = Worker(config.model_copy(update={"device": "cpu"}))
    history = evolver_history(study)
    if which in ("best", "result"):
        worker.write_result(history)
        what = f"generation {history.generation - 1}: " + (
            f"individual {history.best}, the fittest" if config.space.method == "none"
            else f"{config.space.method} of the population")
    else:
        assert isinstance(worker.space, EvolverSpace) and worker.population is not None
        candidate = worker.space.candidate(get_trial(study, which))
        worker.population.advance(history, max(candidate.generation - 1, 0))
        worker.population.write(worker.merger.targets, candidate.move, individual=candidate.target)
        kind = "offspring of individual" if candidate.move else "initial individual"
        what = f"trial {which}: generation {candidate.generation}, {kind} {candidate.target}"
    rebuild = {"study": config.name, "evolver": what, "seed": config.seed, "method": config.space.method,
               "experts": list(worker.sources.models), "fitness": history.fitness,
               "accepted": {g: [vars(m) for m in moves] for g, moves in enumerate(history.accepted) if moves}}
    text = yaml.safe_dump(rebuild, sort_keys=False)
    card = "\n".join(["---", "library_name: transformers", "tags: [merge, evoopt, evolver]", "---", "",
                      f"# {config.name}: Evolver", "", f"Evolved with evoopt's Evolver (Du et al. 2024), {what}.",
                      "", "```yaml", text.rstrip(), "```", ""])
    return worker.merger, (text, card)


def dfs_record(space: DfsSpace, trial: optuna.trial.FrozenTrial, path: LayerPath | None = None) -> dict[str, Any]:
    """A data-flow trial's path: the pool, the hops (model, layer) and their scales (``path``: already decoded)."""
    path = path or space.path(trial.params)
    return {"trial": trial.number, "path": space.describe(path), "length": len(path.hops),
            "pool": dict(zip(space.labels, space.pool)),
            "hops": [[space.labels[m], layer] for m, layer in path.hops], "scales": list(path.scales)}


def dfs_yaml(record: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(record, sort_keys=False)


def _export_dfs(config: StudyConfig, study: optuna.Study, which: str | int, out: Path, *,
                overwrite: bool) -> Path:
    """Save a data-flow trial's model (its layers in path order, the scales applied by remote code)."""
    from evoopt.dfs import export_path, path_parameters

    trial = get_trial(study, which)
    worker = Worker(config.model_copy(update={"device": "cpu"}), study=study)
    assert isinstance(worker.space, DfsSpace)
    path = worker.space.path(trial.params)
    text = dfs_yaml(dfs_record(worker.space, trial, path))
    info = {"study": config.name, "trial": trial.number, "models": dict(zip(worker.space.labels, worker.space.pool)),
            "pinned": study.user_attrs.get("evoopt:pool", {})}
    card = "\n".join(["---", "library_name: transformers", "tags: [merge, evoopt, data-flow-space]", "---", "",
                      f"# {config.name}: data-flow-space merge", "",
                      f"Trial {trial.number} of an evoopt data-flow study (Akiba et al. 2024): "
                      f"{len(path.hops)} layers, {path_parameters(worker.pool, path):,} parameters. Load it with "
                      "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (a small modeling "
                      "file applies the scales).", "", "```yaml", text.rstrip(), "```", ""])
    return Path(export_path(worker.pool, path, out, tokenizer_from=worker.tokenizer_folder, card=card, info=info,
                            overwrite=overwrite))


def space_name(config: StudyConfig) -> str:
    """The space in a line: ``layerwise ties``; a data-flow space has no merge method."""
    return "dfs (data-flow)" if config.space.kind == "dfs" else f"{config.space.kind} {config.space.method}"
