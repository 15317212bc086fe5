"""Study storage: Optuna storages from URLs, studies opened for reading, trials looked up.

The lowest layer of the study engine: it knows URLs, drivers and Optuna's storages, and
nothing of search spaces, models or samplers (the engine, :mod:`evoopt.study.run`, opens a study
with its sampler; :func:`load_study` opens one only to read it).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from evoopt.data import corpora
from evoopt.data.objective import combine
from evoopt.data.outcomes import Outcomes, decode, encode
from evoopt.data.settings import expert_setting, get_setting
from evoopt.errors import ConfigError, ModelSourceError, StorageError
from evoopt.study.config import KIND_CALIBRATED, same_study, shown_url

if TYPE_CHECKING:
    from evoopt.data.settings import Setting
    from evoopt.study.config import StudyConfig

logger = logging.getLogger(__name__)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
CONFIG_ATTR = "evoopt:config"
ROOT_ATTR = "evoopt:root"  # the folder the study's config was read from (its relative paths)
DATA_ATTR = "evoopt:data"  # the rules of the corpora's rows the study's trials were scored on (data_rules)
SOURCES_ATTR = "evoopt:sources"  # each source model's fingerprint when the study was made (check_source_weights)
JOINED_ATTR = "evoopt:joined"  # a study system attribute: another process has opened the study
WITHDRAWN_ATTR = "evoopt:withdrawn"  # ... and: the process that made it is taking it back


def storage_from_url(url: str, *, heartbeat_interval: int | None = None, grace_period: int | None = None,
                     create: bool = True, retry: bool = True) -> optuna.storages.BaseStorage:
    """An Optuna storage: ``journal:PATH`` (or a .log/.journal file), else an RDB URL (sqlite, PostgreSQL, ...).

    With a heartbeat interval, RDB trials of dead processes are failed after
    ``grace_period`` and (``retry``) retried with the same parameters. ``create=False``
    refuses a file storage that does not exist yet instead of making it. A server URL
    without a driver (``postgresql://``) gets the installed one (see :func:`database_url`).
    """
    journal = _journal(url)
    path = storage_file(url)
    if path is not None and not create and not path.is_file():
        raise StorageError(f"storage: no such file {path}; give the storage URL the study was run with")
    if path is not None and not journal and (problem := _sqlite_problem(path, create)) is not None:
        raise StorageError(f"storage: {path} {problem}; give the storage URL the study was run with, or a new file")
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StorageError(f"storage: cannot open {url!r}: cannot make its folder ({error}); "
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
        raise StorageError(f"storage: the database driver of {shown} is not installed ({cause}); install it, "
                           "or name an installed one in the URL (dialect+driver://...)") from None
    except OperationalError as error:
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()[0]
        raise StorageError(f"storage: cannot connect to {shown}: {reason}; check that the server is up and "
                           "reachable, the URL and the credentials") from None
    except ArgumentError as error:
        raise StorageError(f"storage: {shown} is not a storage URL SQLAlchemy knows ({error}); use sqlite:///FILE, "
                           "postgresql://USER@HOST/DB, mysql://USER@HOST/DB or journal:PATH") from None
    except RuntimeError as error:
        if "storage upgrade" in str(error):
            raise StorageError(f"storage: {shown} was made by an older Optuna (its schema is older); upgrade it with "
                               "`optuna storage upgrade --storage URL` (back it up first)") from None
        if "no longer compatible" in str(error) or "updating optuna" in str(error).lower():
            raise StorageError(f"storage: {shown} was made by a newer Optuna than this one; upgrade Optuna "
                               "(pip install -U optuna)") from None
        raise


def _sqlite_problem(path: Path, create: bool) -> str | None:
    """What makes an existing file no Optuna SQLite database, if anything, read without writing: Optuna would
    otherwise add its tables to someone else's database (or fail with SQLAlchemy's traceback on a file that is
    no database). An empty file, or one without tables, is fine only where the study is to be made."""
    if not path.is_file() or path.stat().st_size == 0:
        return None if create or not path.is_file() else "is empty: it holds no study"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.OperationalError as error:
        if "locked" in str(error) or "busy" in str(error):
            return None  # locked by a writer for a minute: Optuna's own connection waits or says so
        return f"cannot be read as a SQLite database ({error})"
    except sqlite3.DatabaseError as error:
        if "not a database" in str(error):
            with open(path, "rb") as head:
                if head.read(1) == b"{":  # (a journal's JSON lines: made through sqlite:///FILE.log before that
                    # named a SQLite file)
                    return "is an Optuna journal file, not a SQLite database: give journal:PATH"
            return f"is not a SQLite database ({error})"
        return f"is a damaged SQLite database ({error}): restore it from a copy"
    if tables and "studies" not in tables:
        return f"is a SQLite database without Optuna's tables (it has {', '.join(sorted(tables)[:5])})"
    return None if tables or create else "holds no tables: it holds no study"


def storage_file(url: str) -> Path | None:
    """The file behind a file storage (``sqlite:///FILE``, ``journal:FILE``, a .log/.journal file); else None."""
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    if _journal(url):
        return Path(url.removeprefix("journal:"))
    return None


def _journal(url: str) -> bool:
    """``journal:PATH``, or a bare path ending in .log or .journal (``sqlite:///runs.log`` is a SQLite file)."""
    return url.startswith("journal:") or "://" not in url and url.endswith((".log", ".journal"))


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
        raise StorageError(f"storage: {url!r} is not a storage URL; use sqlite:///FILE, postgresql://USER@HOST/DB, "
                           "mysql://USER@HOST/DB or journal:PATH") from None
    dialect = "postgresql" if parsed.drivername == "postgres" else parsed.drivername
    if dialect not in _DRIVERS:
        return url
    for driver, module in _DRIVERS[dialect]:
        if importlib.util.find_spec(module) is not None:
            return parsed.set(drivername=f"{dialect}+{driver}").render_as_string(hide_password=False)
    names = " or ".join(module for _, module in _DRIVERS[dialect])
    raise StorageError(f"storage: the database driver of {_shown(url)} is not installed (no {names}); "
                       f"{_DRIVER_HINTS[dialect]}")


def _shown(url: str) -> str:
    """The URL for messages, quoted, its password masked."""
    return repr(shown_url(url))


def _rdb_storage(url: str, kwargs: dict[str, Any], attempts: int = 5) -> optuna.storages.RDBStorage:
    """Workers started together on an empty database (or a worker and a command reading it) race to create
    Optuna's tables and stamp their version: the losers, refused with a duplicate table, type or version row,
    open it again once the winner has made them."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except (IntegrityError, ProgrammingError) as error:
            if attempt == attempts - 1 or not ("already exists" in str(error) or "alembic_version" in str(error)):
                raise
            logger.info("storage: another worker is creating the schema; opening again")
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def read_storage(config: StudyConfig) -> optuna.storages.BaseStorage:
    """The config's storage, opened to read a study in it: a storage file that does not exist is an error (not
    an empty file made)."""
    file = storage_file(config.storage_url)
    if file is not None and not file.is_file():
        raise ConfigError(f"name: no study {config.name!r} in {config.storage_shown} (the file does not exist); run "
                          "it first, or give the storage URL it was run with")
    return storage_from_url(config.storage_url, create=False)


def load_study(config: StudyConfig, storage: optuna.storages.BaseStorage | None = None) -> optuna.Study:
    """The study ``config`` names, opened to read it: no sampler or search space is built (``status``,
    ``best``, ``export``, ``compare``). It must have been made from ``config``: read through an edited config,
    its trials' parameters would rebuild other models than the ones they scored. ``storage``: the config's,
    opened before by :func:`read_storage`."""
    name, url = config.name, config.storage_shown
    storage = storage or read_storage(config)
    try:
        study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        raise ConfigError(f"name: no study {name!r} in {url}; run it first") from None
    check_config(study, config)
    return study


def check_config(study: optuna.Study, config: StudyConfig) -> None:
    """Refuse ``config`` for a study made from another one, naming the keys that differ."""
    stored = study.user_attrs.get(CONFIG_ATTR)
    if stored is not None and (changed := same_study(stored, config)):
        raise ConfigError(f"name: study {config.name!r} in {config.storage_shown} was made from another config; "
                          "give this one a new name, or restore the old values:\n  - " + "\n  - ".join(changed))


def data_rules() -> dict[str, Any]:
    """The versions of the rules that make evoopt's train, dev and test rows and its lm-eval tasks, and the
    revisions of the corpora that have one."""
    return {"split": corpora.SPLIT_VERSION, "eval": corpora.EVAL_VERSION, "tasks": corpora.TASK_VERSION,
            "corpora": {c.name: c.revision for c in corpora.CORPORA.values() if c.revision}}


def _settings(config: StudyConfig) -> list[Setting]:
    """The settings whose experts the study merges (``setting``, or ``expert:SETTING/...`` sources)."""
    references = [config.sources.base or "", *config.sources.models] if config.sources else []
    names = {config.setting, *map(expert_setting, references)} - {None}
    return [get_setting(str(name)) for name in sorted(map(str, names))]


def _calibrated(config: StudyConfig) -> set[str]:
    """The corpora whose training rows an X_Evolver's merge reads as calibration texts (Fisher's and RegMean's
    statistics, :func:`evoopt.study.evaluator.calibration_file`): its sources' tasks; none for other studies."""
    if not config.sources or not KIND_CALIBRATED[config.space.kind](config):
        return set()
    return set(config.sources.tasks) & set(corpora.CORPORA)


def _experts_rules(rules: dict[str, Any], config: StudyConfig) -> dict[str, Any]:
    """The part of ``rules`` that makes the study's models: the split rules and the revisions of the corpora its
    experts are trained on or its merge is calibrated on (:func:`_calibrated`), and the lm-eval tasks' version for
    causal experts; none where neither comes from evoopt's corpora."""
    settings = _settings(config)
    read = {t for s in settings for t in s.tasks} | _calibrated(config)
    if not read:
        return {}
    part = _split_part(rules, read)
    return {**part, "tasks": rules.get("tasks")} if any(s.kind == "causal" for s in settings) else part


def _split_part(rules: dict[str, Any], read: set[str]) -> dict[str, Any]:
    """The split rules and the revisions of the corpora in ``read``."""
    return {"split": rules.get("split"),
            "corpora": {name: v for name, v in (rules.get("corpora") or {}).items() if name in read}}


def _rules_read(rules: dict[str, Any], config: StudyConfig) -> dict[str, Any]:
    """The part of ``rules`` a study depends on: none if nothing of it comes from evoopt's corpora; else the split
    rules and the revisions of the corpora it reads (its experts' training data, its calibration texts and its dev
    rows), the dev and test rules if it is scored on their rows (``dev``, or lm-eval on the setting's own tasks),
    and the lm-eval tasks' version if lm-eval scores them or made its experts' scores (:func:`_experts_rules`)."""
    scored_on_rows = config.objective.kind != "lm-eval" or not config.objective.tasks
    read = set(config.task_names) if scored_on_rows else set()
    if config.sources:  # (Fisher's and RegMean's calibration texts are their training rows)
        read |= set(config.sources.tasks) & set(corpora.CORPORA)
    settings = _settings(config)
    read |= {t for s in settings for t in s.tasks}  # (a superset of what :func:`_experts_rules` reads)
    if not read:
        return {}
    part = _split_part(rules, read)
    if any(s.kind == "causal" for s in settings) or (config.objective.kind == "lm-eval" and scored_on_rows):
        part["tasks"] = rules.get("tasks")
    return {**part, "eval": rules.get("eval")} if scored_on_rows else part


POOL_ATTR = "evoopt:pool"  # a data-flow study's pinned trials of its pool's other studies
START_ATTR = "start"  # the user attribute of a trial a kind enqueues at the study's start (the method search's)
PRECISION_ATTR = "evoopt:precision"  # the bfloat16 check on the sources (objective.precision: auto; study.fitness)
CONFIG_ERROR_ATTR = "evoopt:config_error"  # a trial failed by the config's own problem (a task that is not there)


def holds_results(study: optuna.Study, *, precision: bool = True) -> bool:
    """Whether anything was recorded in the study beyond what making and opening it writes (a kind's start too:
    the method search's enqueued starts, a data-flow study's pinned pool): a trial (an enqueued one too, but for a
    start; not one failed by the config's own problem, which stopped the run), baselines, their outcomes, the
    precision check (``precision``: counted; it alone is remade by the next run, from the baselines or as the
    float32 default)."""
    system = study._storage.get_study_system_attrs(study._study_id)
    trials = [t for t in study.get_trials(deepcopy=False)
              if not (t.state == TrialState.WAITING and START_ATTR in t.user_attrs
                      or t.state == TrialState.FAIL and CONFIG_ERROR_ATTR in t.user_attrs)]
    return bool(trials
                or set(study.user_attrs) - {CONFIG_ATTR, DATA_ATTR, ROOT_ATTR, SOURCES_ATTR, POOL_ATTR}
                or set(system) - {"study:metric_names", JOINED_ATTR, WITHDRAWN_ATTR,
                                  *([] if precision else [PRECISION_ATTR])})


def check_data(study: optuna.Study, config: StudyConfig) -> None:
    """Refuse to add trials to a study whose results came from rows of evoopt's corpora, or experts trained on them,
    that this evoopt makes otherwise (:func:`_rules_read`): its scores would not compare with new ones, and its
    per-example outcomes, baselines and estimator name examples by their place in dev, now other texts. A study
    made before the rules were recorded is refused once it holds anything (:func:`holds_results`), else given
    them."""
    stored = study.user_attrs.get(DATA_ATTR)
    now = _rules_read(data_rules(), config)
    advice = ("give the study a new name (a benchmark: a new work folder) to search again; status and best still read "
              "it, export too unless its experts changed")
    if stored is None:
        if now and holds_results(study):
            raise ConfigError(f"name: study {config.name!r} in {config.storage_shown} was made before evoopt recorded "
                              "the rules of its corpora's rows, which may have changed since (2026-12-06: dev and "
                              "test leave out near-duplicates of training texts): its results may name other rows; "
                              f"{advice}")
        study.set_user_attr(DATA_ATTR, data_rules())
    elif (then := _rules_read(stored, config)) != now:
        raise ConfigError(f"name: study {config.name!r} in {config.storage_shown} was scored on rows of evoopt's "
                          f"corpora made by other rules ({then}; this evoopt makes {now}): its results name other rows "
                          f"than new ones would; {advice}")


def source_fingerprints(config: StudyConfig) -> dict[str, str]:
    """The fingerprint (:func:`~evoopt.models.io.model_fingerprint`) of each of the study's own source models, by
    its key in the config; ``expert:`` models are known by their data rules (:func:`check_experts`)."""
    from evoopt.models.io import model_fingerprint, reference_problem, resolve_path

    if config.sources is None:
        return {}
    found = {}
    for key, reference in config.sources.references():
        if reference.startswith("expert:") or reference_problem(reference, config.root) is not None:
            continue  # (a missing one: named by check_sources)
        try:
            found[key] = model_fingerprint(resolve_path(reference, config.root))
        except (ModelSourceError, OSError):  # (a folder without weights: named when the model is opened, and the
            continue  # study this command made then taken back)
    return found


def check_source_weights(study: optuna.Study, config: StudyConfig, *, record: bool = True) -> None:
    """Refuse to add trials to, or rebuild a trial of, a study whose source models changed since it was made (a
    model fine-tuned again in place): its trials' coefficients were scored on the earlier weights. A study made
    before evoopt recorded them is given them now (``record``: by a command that adds trials, not one that reads)."""
    stored = study.user_attrs.get(SOURCES_ATTR)
    if stored is None:
        if record:
            study.set_user_attr(SOURCES_ATTR, source_fingerprints(config))
        return
    now = source_fingerprints(config)
    changed = [key for key in now if key in stored and stored[key] != now[key]]
    if changed:
        assert config.sources is not None
        references = dict(config.sources.references())
        raise ConfigError(f"name: study {config.name!r} in {config.storage_shown} searched over models whose "
                          "weights have changed since: " + ", ".join(f"{k} ({references[k]})" for k in changed)
                          + "; its trials were scored on the earlier weights: restore them, or give the study a new "
                          "name to search the new ones")


def check_stored(config: StudyConfig) -> None:
    """The checks of resuming a study (:func:`check_config`, :func:`check_data`), made before its sources are
    resolved, which may train or rescore experts for minutes: a study that will be refused is refused first.
    Nothing is made where the storage file or the study does not exist yet."""
    file = storage_file(config.storage_url)
    if file is not None and not file.is_file():
        return
    storage = storage_from_url(config.storage_url)
    try:
        study = optuna.load_study(study_name=config.name, storage=storage, sampler=optuna.samplers.RandomSampler())
        if study.user_attrs.get(CONFIG_ATTR) is not None:  # (else being made by a worker beside: checked on opening)
            check_config(study, config)
            check_data(study, config)
            check_source_weights(study, config, record=False)
    except KeyError:  # none, or taken back by its maker meanwhile (:func:`evoopt.study.run._take_back`)
        return
    finally:
        if isinstance(storage, optuna.storages.RDBStorage):  # (its connections, not left to the collector)
            storage.engine.dispose()


def check_experts(study: optuna.Study, config: StudyConfig) -> None:
    """Refuse to rebuild a trial's model (export, lm-eval) when this evoopt would train the study's experts, or
    draw its merge's calibration texts, from other rows (:func:`_experts_rules`): the trial's coefficients would be
    put on experts or statistics it was never scored with. A study made before the rules were recorded was made
    before any corpus had a revision."""
    now = _experts_rules(data_rules(), config)
    stored = study.user_attrs.get(DATA_ATTR)
    then = _experts_rules(stored, config) if stored is not None else {**now, "corpora": {}} if now else {}
    if then != now:
        raise ConfigError(f"name: study {config.name!r} in {config.storage_shown} searched over models made from rows "
                          f"of evoopt's corpora under other rules ({then}; this evoopt makes them under {now}): its "
                          "trials would be rebuilt on experts or calibration texts they were never scored with; "
                          "rebuild them with the evoopt that ran the study")


def artifact_store(config: StudyConfig) -> optuna.artifacts.FileSystemArtifactStore:
    """The study's artifact store (recipes, plots), the folder optuna-dashboard is pointed at."""
    from optuna.artifacts import FileSystemArtifactStore

    return FileSystemArtifactStore(str(_artifact_folder(config)))


def _artifact_folder(config: StudyConfig) -> Path:
    folder = config.artifact_dir / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def attach(config: StudyConfig, study: optuna.Study, file: Path) -> None:
    """``file`` as an artifact of the study, which optuna-dashboard shows: the content of an earlier one of the
    same name replaced (each `compare` and report added another copy before)."""
    from optuna.artifacts import get_all_artifact_meta, upload_artifact

    from evoopt.models.io import atomic_write

    store = artifact_store(config)
    earlier = [m for m in get_all_artifact_meta(study) if m.filename == file.name]
    if not earlier:
        upload_artifact(artifact_store=store, file_path=str(file), study_or_trial=study, storage=study._storage)
        return
    # replaced atomically (the store's own write truncates the file in place: a failed or concurrent write left
    # half a plot where the dashboard reads it)
    def copy(tmp: Path) -> None:
        shutil.copyfile(file, tmp)

    atomic_write(_artifact_folder(config) / earlier[0].artifact_id, copy)


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


ANSWER_ATTR = "evoopt:answer"  # an estimated study's answer: the confirmed trial (objective.estimate.confirm)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The study's answer: for an estimated study whose best trials were confirmed on the whole dev set, the
    best of those; else :func:`best_by_value`."""
    answer = study.user_attrs.get(ANSWER_ATTR)
    if answer is not None:
        trials = study.get_trials(deepcopy=False)
        if answer["trial"] < len(trials) and trials[answer["trial"]].state == TrialState.COMPLETE:
            return trials[answer["trial"]]
    return best_by_value(study)


def study_weights(study: optuna.Study) -> dict[str, float]:
    """The stored config's task weights (objective.weights; none: every task weighs 1)."""
    weights: dict[str, float] = study.user_attrs.get(CONFIG_ATTR, {}).get("objective", {}).get("weights", {})
    return weights


def trial_value(trial: optuna.trial.FrozenTrial, weights: dict[str, float]) -> float:
    """One number per trial: its value; for one objective per task, the (weighted) mean of its tasks' scores, as
    the baselines' rows (the plain mean of its values where it kept no scores)."""
    values = trial.values or []
    if len(values) == 1:
        return float(values[0])
    if "scores" in trial.user_attrs:
        return combine(trial.user_attrs["scores"], weights)
    return float(sum(values)) / max(1, len(values))


def best_by_value(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The trial with the best value so far (for several objectives, the best weighted mean of the front, the
    number the baselines' rows show): what the progress line shows after each trial."""
    if len(study.directions) > 1:  # one objective per task, all in one direction: the best mean on the front
        front = study.best_trials
        if not front:
            return None
        maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
        weights = study_weights(study)
        return front[best_index([trial_value(t, weights) for t in front], maximize=maximize)]
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
    if not trials:
        raise ConfigError(f"trial: study {study.study_name!r} has no trials yet, so no trial {number}")
    if not 0 <= number < len(trials):
        raise ConfigError(f"trial: study {study.study_name!r} has trials 0..{len(trials) - 1}, not {number}")
    if trials[number].state != TrialState.COMPLETE:
        raise ConfigError(f"trial: trial {number} is {trials[number].state.name}, not COMPLETE")
    return trials[number]


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


# --- per-example outcomes (evoopt.data.outcomes) ------------------------------------------------------

BASELINE_OUTCOMES_ATTR = "evoopt:outcomes:"  # + a baseline row's name: its outcomes on the search split


def record_baseline_outcomes(study: optuna.Study, name: str, outcomes: Outcomes) -> None:
    study._storage.set_study_system_attr(study._study_id, BASELINE_OUTCOMES_ATTR + name, encode(outcomes))


def baseline_outcomes(study: optuna.Study) -> dict[str, Outcomes]:
    """Each scored baseline's (and source's) per-example outcomes, by its row name."""
    stored = study._storage.get_study_system_attrs(study._study_id)
    return {key.removeprefix(BASELINE_OUTCOMES_ATTR): decode(value) for key, value in stored.items()
            if key.startswith(BASELINE_OUTCOMES_ATTR)}


CONFIRMED_OUTCOMES_ATTR = "evoopt:confirmed:"  # + a trial number: its outcomes on the whole search split


def record_confirmed_outcomes(study: optuna.Study, number: int, outcomes: Outcomes) -> None:
    """Keep the whole-dev outcomes of a trial confirmed after it finished (``objective.estimate.confirm``): a
    finished trial's own attributes cannot change, so they are the study's."""
    study._storage.set_study_system_attr(study._study_id, f"{CONFIRMED_OUTCOMES_ATTR}{number}", encode(outcomes))


def confirmed_outcomes(study: optuna.Study) -> dict[int, Outcomes]:
    """The whole-dev outcomes of each confirmed trial, by trial number."""
    stored = study._storage.get_study_system_attrs(study._study_id)
    return {int(key.removeprefix(CONFIRMED_OUTCOMES_ATTR)): decode(value) for key, value in stored.items()
            if key.startswith(CONFIRMED_OUTCOMES_ATTR)}
