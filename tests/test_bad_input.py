"""Bad input, one table: each case must give a clear error and leave what is stored whole.

The stored things every case runs beside: a study with finished trials on real MiniLM experts
(its SQLite storage) and a model already exported from it. After each case, the study's trials
and the exported files are exactly what they were, and no temporary folder is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import math
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import optuna
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evoopt.errors import ConfigError
from evoopt.merge.merger import Merger
from evoopt.merge.recipe import parse_recipe
from evoopt.study.config import parse_config
from evoopt.study.run import Worker, check_sources, export_trial, open_study, run_baselines, run_study
from tests.helpers.models import save_family, tiny_llama_config
from tests.helpers.studies import small_study_config


@dataclass
class Stored:
    root: Path
    config: Any
    experts: Any
    llama: list[Path]
    exported: Path


@pytest.fixture(scope="module")
def stored(small_experts: Any, llama_family: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Stored:
    experts, _ = small_experts
    root = tmp_path_factory.mktemp("stored")
    config = parse_config(small_study_config(root, experts, name="kept", trials=2))
    run_study(config, report=False)
    exported = export_trial(config, "best", root / "exported")
    return Stored(root, config, experts, llama_family, exported)


def _snapshot(s: Stored) -> tuple[Any, ...]:
    study = open_study(s.config, create=False)
    trials = [(t.number, t.state, t.values, t.params) for t in study.get_trials()]
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(s.exported.iterdir())}
    return trials, files, sorted(p.name for p in s.root.iterdir())


def _damaged(s: Stored, tmp: Path, damage: Callable[[Path], None]) -> Path:
    folder = tmp / "damaged"
    shutil.copytree(s.llama[1], folder)
    damage(folder / "model.safetensors")
    return folder


def _merge(s: Stored, tmp: Path, expert: Path) -> None:
    recipe = parse_recipe({"method": "ties", "base": str(s.llama[0]),
                           "models": [{"model": str(m), "parameters": {"weight": 0.5, "density": 0.5}}
                                      for m in (s.llama[1], expert)]})
    Merger(recipe).export(tmp / "merged")


def _merge_with(s: Stored, tmp: Path, parameters: dict[str, Any]) -> None:
    recipe = parse_recipe({"method": "ties", "base": str(s.llama[0]),
                           "models": [{"model": str(m), "parameters": parameters} for m in s.llama[1:3]]})
    Merger(recipe).export(tmp / "merged")


def _cli(s: Stored, command: str, *options: str) -> None:
    """The stored study's config run from the command line with ``options``; a usage error is raised."""
    from click.testing import CliRunner

    from evoopt.cli import main

    file = s.root / "kept.yaml"
    file.write_text(yaml.safe_dump(small_study_config(s.root, s.experts, name="kept", trials=2)))
    try:
        result = CliRunner().invoke(main, [command, str(file), *options])
    finally:
        file.unlink()
    if result.exit_code == 2:
        raise click.UsageError(result.output)
    raise AssertionError(f"exit code {result.exit_code}: {result.output}")


def _nan(file: Path) -> None:
    state = load_file(file)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, file, metadata={"format": "pt"})


def _other(s: Stored, tmp: Path, **config: Any) -> Path:
    return save_family(tmp / "other", tiny_llama_config(**config), experts=0, seed=5)[0]


def _study(s: Stored, **changes: Any) -> Any:
    data = small_study_config(s.root, s.experts, name="kept", trials=2)
    for key, value in changes.items():
        target = data
        *path, last = key.split(".")
        for part in path:
            target = target.setdefault(part, {})
        target[last] = value
    return parse_config(data)


def _nan_score(s: Stored, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Worker, "score", lambda self, model, split, trial=None: {"vader-tweets": math.inf,
                                                                                 "vader-nyt": 0.5})
    config = _study(s, trials=3)
    run_study(config, n_trials=1, report=False)
    failed = open_study(config, create=False).get_trials(states=(optuna.trial.TrialState.FAIL,))
    raise RuntimeError(failed[-1].user_attrs["fail_reason"])


def _no_psycopg(s: Stored, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("psycopg", "psycopg2") else find_spec(name, *a))
    open_study(_study(s, storage="postgresql://nobody@127.0.0.1:1/none"))


def _text(file: Path) -> str:
    file.write_text("notes, not a database\n")
    return f"sqlite:///{file}"


def _other_db(tmp: Path) -> str:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(tmp / "theirs.db")) as db:
        db.execute("CREATE TABLE inventory (item TEXT)")
        db.commit()
    return f"sqlite:///{tmp / 'theirs.db'}"


def _damaged_db(tmp: Path) -> str:
    """An Optuna SQLite database whose first page (after its header) was overwritten."""
    file = tmp / "damaged.db"
    optuna.storages.RDBStorage(f"sqlite:///{file}").engine.dispose()
    data = bytearray(file.read_bytes())
    data[100:4096] = b"\xff" * 3996
    file.write_bytes(bytes(data))
    return f"sqlite:///{file}"


def _tables(file: Path) -> list[str]:
    import contextlib
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True)) as db:
        return [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]


def _other_data_rules(s: Stored, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from evoopt.data import corpora

    monkeypatch.setattr(corpora, "EVAL_VERSION", corpora.EVAL_VERSION + 1)  # as an evoopt whose dev rows changed
    open_study(_study(s))


def _full_disk(s: Stored, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_then_full(tensors: Any, filename: Any, metadata: Any = None) -> None:
        Path(filename).write_bytes(b"\0" * 1024)  # part of the file is written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", half_then_full)  # what save_pretrained calls
    export_trial(s.config, "best", s.exported, overwrite=True)


CASES: list[tuple[str, Callable[..., Any], type[BaseException], str]] = [
    ("corrupt safetensors", lambda s, t, m: _merge(s, t, _damaged(s, t, lambda f: f.write_bytes(b"\x07" * 64))),
     ValueError, "truncated or corrupt"),
    ("truncated safetensors",
     lambda s, t, m: _merge(s, t, _damaged(s, t, lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]))),
     ValueError, "truncated or corrupt"),
    ("mismatched shapes", lambda s, t, m: _merge(s, t, _other(s, t, intermediate_size=48)),
     ValueError, r"model\.layers\.0\.mlp\.up_proj\.weight.*\[48, 32\]"),
    ("vocabulary mismatch", lambda s, t, m: _merge(s, t, _other(s, t, vocab_size=99)),
     ValueError, "vocabulary sizes differ"),
    ("NaN weights", lambda s, t, m: _merge(s, t, _damaged(s, t, _nan)),
     ValueError, r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"),
    ("NaN/inf score", _nan_score, RuntimeError, r"not finite.*inf"),
    ("non-positive dev limit", lambda s, t, m: _study(s, **{"objective.limit": 0}), ValueError, "objective.limit"),
    ("unknown method", lambda s, t, m: _study(s, **{"space.method": "tie"}), ValueError,
     "space.method: unknown merge method 'tie'; known methods: breadcrumbs"),
    ("unknown sampler", lambda s, t, m: _study(s, **{"sampler.name": "CMA"}), ValueError,
     "sampler.name: unknown sampler 'CMA'; known: .*EvoCmaSampler"),
    ("a pruner option out of its range", lambda s, t, m: _study(s, pruner={
        "name": "MedianPruner", "options": {"n_startup_trials": -1}}), ValueError,
     r"pruner.options: MedianPruner does not accept these options \(Number of startup trials cannot be negative"),
    ("inverted bounds", lambda s, t, m: _study(s, **{"space.search": {"weight": [1.0, 0.2]}}), ValueError,
     r"space.search.weight: bounds must be \[low, high\] with low < high"),
    ("unreachable storage server", lambda s, t, m: open_study(_study(s, storage="postgresql://nobody@127.0.0.1:1/none")),
     ValueError, r"storage: cannot connect to 'postgresql://nobody@127.0.0.1:1/none': .*Connection refused; "
                 "check that the server is up"),
    ("storage URL with a missing driver", lambda s, t, m: open_study(_study(s, storage="mysql://nobody@127.0.0.1/x")),
     ValueError, r"storage: the database driver of 'mysql://nobody@127.0.0.1/x' is not installed \(no MySQLdb or "
                 r"pymysql\); pip install PyMySQL"),
    ("PostgreSQL URL without its driver installed", _no_psycopg, ValueError,
     r"storage: the database driver of 'postgresql://nobody@127.0.0.1:1/none' is not installed \(no psycopg or "
     r"psycopg2\); pip install 'evoopt\[postgres\]'"),
    ("NaN coefficient in a recipe", lambda s, t, m: _merge_with(s, t, {"weight": float("nan"), "density": 0.5}),
     ValueError, r"models\[0\]\.parameters\.weight: must be a finite number, got nan"),
    ("non-finite coefficients of a study", lambda s, t, m: _study(s, **{
        "space.fixed": {"scale": float("inf")}, "space.search": {"weight": [0.0, float("nan")]},
        "sampler": {"name": "EvoCmaSampler", "options": {"x0": {"vader-tweets.weight": float("nan")}}}}),
     ValueError, r"(?s)space.search.weight: bounds must be finite.*space.fixed.scale: must be a finite number.*"
                 r"sampler.options.x0.vader-tweets.weight: must be a finite number"),
    ("negative trial count", lambda s, t, m: _cli(s, "run", "--n-trials", "-3"), click.UsageError,
     "Invalid value for '--n-trials': -3 is not in the range x>=1"),
    ("zero timeout", lambda s, t, m: _cli(s, "run", "--timeout", "0"), click.UsageError,
     "Invalid value for '--timeout': '0' is not a positive, finite number of seconds"),
    ("study name reused with another config", lambda s, t, m: open_study(_study(s, seed=7)),
     ValueError, r"(?s)made from another config.*seed: stored 0, now 7"),
    ("a study resumed by an evoopt that makes other dev rows", _other_data_rules, ValueError,
     r"name: study '.*' in .* was scored on rows of evoopt's corpora made by other rules \(\{'split': 2, 'corpora': "
     r"\{\}, 'eval': 1\}; this evoopt makes \{'split': 2, 'corpora': \{\}, 'eval': 2\}\): .* give the study a new "
     r"name \(a benchmark: a new work folder\) to search again; status and best still read it, export too unless "
     r"its experts changed"),
    ("full disk during export", _full_disk, OSError, "No space left on device"),
    ("a trial exported through an edited config", lambda s, t, m: export_trial(_study(s, seed=7), "best", t / "out"),
     ValueError, r"(?s)made from another config.*seed: stored 0, now 7"),
    ("searched density out of its range", lambda s, t, m: _study(s, **{
        "space.search": {"weight": [0.2, 1.2], "density": [0.2, 1.5]}}),
     ValueError, r"space.search.density: must be in \(0, 1\], got 1.5; narrow the bounds"),
    ("fixed density out of its range", lambda s, t, m: _study(s, **{
        "space.search": {"weight": [0.2, 1.2]}, "space.fixed": {"density": {"layers.00": 0.5, "layers.01": 0.0}}}),
     ValueError, r"space.fixed.density.layers.01: must be in \(0, 1\], got 0.0"),
    ("fixed per layer group without a default", lambda s, t, m: _study(s, **{
        "space.search": {"weight": [0.2, 1.2]}, "space.fixed": {"density": {"layers.0*": 0.5}}}),
     ValueError, r"space.fixed.density: one value per layer group needs a '\*' entry, the value of every tensor no "
                 r"other pattern names \(patterns given: 'layers.0\*'\)"),
    ("a warm-start study that is not there", lambda s, t, m: open_study(_study(s, name="warm", sampler={
        "name": "EvoCmaSampler", "options": {"warm_start_study": "kept-before"}})),
     ValueError, r"sampler.options.warm_start_study: no study 'kept-before' in this study's storage"),
    ("a misspelt sampler option", lambda s, t, m: _study(s, sampler={
        "name": "EvoCmaSampler", "options": {"popsize": 8, "sigma": 0.2}}),
     ValueError, r"sampler.options: EvoCmaSampler has no option 'sigma'; it takes .*sigma0"),
    ("an x0 recipe file that is not there", lambda s, t, m: _study(s, sampler={
        "name": "EvoCmaSampler", "options": {"x0": "start.yaml"}}),
     ValueError, r"sampler.options.x0: .*start.yaml: no such file or folder; check the path in sampler.options.x0"),
    ("a max_length beyond the models' positions", lambda s, t, m: check_sources(_study(s, name="long", **{
        "objective.max_length": 100_000})),
     ValueError, r"objective.max_length: 100000 tokens, but .* has \d+ positions \(max_position_embeddings\): set "
                 r"objective.max_length to at most \d+"),
    ("unknown corpus", lambda s, t, m: _study(s, **{"sources.tasks": ["vader-tweets", "vader-nytimes"]}),
     ValueError, r"sources.tasks\[1\]: unknown corpus 'vader-nytimes'; known: .*vader-nyt"),
    ("unknown expert", lambda s, t, m: _study(s, **{"sources.models": ["expert:minilm-sentiment-domains/nyt",
                                                                       str(s.llama[1])]}),
     ValueError, r"sources.models\[0\]: expert:minilm-sentiment-domains/nyt: setting 'minilm-sentiment-domains' "
                 r"has no 'nyt'; known: base, vader-tweets, vader-movies, vader-amazon, vader-nyt, mtl"),
    ("a file that is no database as storage", lambda s, t, m: open_study(_study(s, storage=_text(t / "notes.db"))),
     ValueError, r"storage: .*notes.db is not a SQLite database \(file is not a database\); give the storage URL"),
    ("another program's SQLite database as storage", lambda s, t, m: open_study(_study(s, storage=_other_db(t))),
     ValueError, r"storage: .*theirs.db is a SQLite database without Optuna's tables \(it has inventory\)"),
    ("a damaged SQLite database as storage", lambda s, t, m: open_study(_study(s, storage=_damaged_db(t))),
     ValueError, r"storage: .*damaged.db is a damaged SQLite database \(database disk image is malformed\): "
                 r"restore it from a copy; give the storage URL"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "action", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error_and_loses_nothing(name: str, action: Callable[..., Any], error: type,
                                                      message: str, stored: Stored, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    before = _snapshot(stored)
    with pytest.raises(error, match=message):
        action(stored, tmp_path, monkeypatch)
    after = _snapshot(stored)
    if name == "NaN/inf score":  # the failed trial is added (with its reason); nothing else changes
        assert after[0][: len(before[0])] == before[0] and after[0][-1][1] == optuna.trial.TrialState.FAIL
        assert after[1:] == before[1:]
    else:
        assert after == before
    assert not (tmp_path / "merged").exists() and not (tmp_path / "out").exists()  # no half-written output
    if (tmp_path / "notes.db").exists():  # a storage refused is left as it was
        assert (tmp_path / "notes.db").read_text() == "notes, not a database\n"
    if (tmp_path / "theirs.db").exists():
        assert _tables(tmp_path / "theirs.db") == ["inventory"]
    if (tmp_path / "damaged.db").exists():
        assert (tmp_path / "damaged.db").read_bytes()[100:4096] == b"\xff" * 3996
    assert not [p for p in stored.exported.parent.iterdir() if p.name.startswith(".")]  # no temporary folder
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.slow
def test_a_run_refused_before_it_did_anything_leaves_the_study_name_free(stored: Stored, tmp_path: Path) -> None:
    """A run that made its study and then failed (a model folder without weights; a path that does not exist is
    refused before the study is made) takes the study back: the corrected config is not refused as another config.
    Once a trial ran, the name is bound."""
    from evoopt.errors import ConfigError, ModelSourceError

    storage = f"sqlite:///{tmp_path / 'fresh.db'}"
    good = small_study_config(stored.root, stored.experts, name="fresh", trials=1, storage=storage)
    (tmp_path / "empty").mkdir()
    models = [str(tmp_path / "empty"), *good["sources"]["models"][1:]]
    bad = {**good, "sources": {**good["sources"], "models": models}}
    with pytest.raises(ModelSourceError, match="empty: no model weights found"):
        run_study(parse_config(bad), report=False)
    assert optuna.get_all_study_names(storage) == []  # the refused run took back the study it had made
    assert run_study(parse_config(good), report=False).ran == 1
    with pytest.raises(ConfigError, match=r"(?s)made from another config.*sources.models"):
        open_study(parse_config(bad))


@pytest.mark.slow
def test_a_study_made_before_its_data_rules_were_recorded_is_refused_once_it_holds_anything(
        stored: Stored, tmp_path: Path) -> None:
    """A study made by an evoopt that did not record the rules of its corpora's rows: given them while it holds
    nothing, refused once it holds a trial or a precision check (its results may name other rows). A revision of
    a corpus it does not read does not matter, nor the lm-eval tasks' version to a study lm-eval does not score;
    the split rules do."""
    from evoopt.errors import ConfigError
    from evoopt.study.fitness import PRECISION_ATTR
    from evoopt.study.storage import DATA_ATTR, data_rules

    config = parse_config(small_study_config(stored.root, stored.experts, name="older", trials=1,
                                             storage=f"sqlite:///{tmp_path / 'older.db'}"))
    study = open_study(config)
    assert study.user_attrs[DATA_ATTR] == data_rules() == {"split": 2, "eval": 1, "tasks": 3,
                                                           "corpora": {"rotten-tomatoes": 1}}
    study.set_user_attr(DATA_ATTR, None)
    assert open_study(config).user_attrs[DATA_ATTR] == data_rules()
    study.set_user_attr(DATA_ATTR, {**data_rules(), "corpora": {}})  # before Rotten Tomatoes' revision: not read
    open_study(config)
    study.set_user_attr(DATA_ATTR, {**data_rules(), "tasks": 2})
    open_study(config)
    study.set_user_attr(DATA_ATTR, {**data_rules(), "split": 1})
    with pytest.raises(ConfigError, match="made by other rules"):
        open_study(config)
    study.set_user_attr(DATA_ATTR, None)
    study._storage.set_study_system_attr(study._study_id, PRECISION_ATTR, {"precision": "float32"})
    with pytest.raises(ConfigError, match="was made before evoopt recorded the rules of its corpora's rows"):
        open_study(config)
    study.enqueue_trial({})
    with pytest.raises(ConfigError, match="was made before evoopt recorded the rules of its corpora's rows"):
        open_study(config)


@pytest.mark.slow
def test_a_resumed_study_is_refused_before_its_sources_are_resolved(stored: Stored, tmp_path: Path) -> None:
    """Resolving a study's sources (a sampler's space, the kind's model) may train or rescore experts for minutes:
    a study that its config or the data rules refuse is refused before, here with its sources gone."""
    from evoopt.errors import ConfigError
    from evoopt.study.storage import DATA_ATTR, data_rules

    data = small_study_config(stored.root, stored.experts, name="early", trials=1, sampler={"name": "EvoCmaSampler"},
                              storage=f"sqlite:///{tmp_path / 'early.db'}")
    data["space"].update(kind="layerwise", layers_per_group=2)  # (its space reads the sources' layers)
    copies = tmp_path / "sources"
    for i, model in enumerate([data["sources"]["base"], *data["sources"]["models"]]):
        shutil.copytree(model, copies / str(i))
    data["sources"].update(base=str(copies / "0"), models=[str(copies / str(i + 1))
                                                          for i in range(len(data["sources"]["models"]))])
    config = parse_config(data)
    study = open_study(config)  # (the sampler takes the space: the sources are read)
    study.set_user_attr(DATA_ATTR, {**data_rules(), "eval": 0})
    shutil.rmtree(copies)
    with pytest.raises(ConfigError, match="made by other rules"):
        run_study(config, n_trials=1)
    with pytest.raises(ConfigError, match="made by other rules"):
        open_study(config)  # (as `evoopt baselines` opens it)
    with pytest.raises(ConfigError, match="made from another config"):
        run_study(config.model_copy(update={"seed": 7}), n_trials=1)
    with pytest.raises(Exception, match="sources/0"):  # a new study gets to its sources
        run_study(config.model_copy(update={"name": "new"}), n_trials=1)


@pytest.mark.slow
def test_a_trial_is_rebuilt_only_on_the_experts_it_was_scored_with(stored: Stored) -> None:
    """Export and lm-eval rebuild a trial on the study's experts: refused when this evoopt would train them on
    other rows (another split, a revised corpus, for causal experts another lm-eval tasks' version), or calibrate
    an X_Evolver's Fisher merge on other rows; not for the dev and test rules, nor for a study over the user's own
    models without calibration."""
    from evoopt.errors import ConfigError
    from evoopt.integrations.lm_eval import ModelArgsError, _study_trial
    from evoopt.study.storage import CONFIG_ATTR, DATA_ATTR, ROOT_ATTR, check_experts, data_rules

    config = parse_config(small_study_config(stored.root, stored.experts, name="rebuilt", trials=1))
    cross = config.model_copy(update={"setting": "minilm-cross-task", "sources": None})
    causal = config.model_copy(update={"setting": "smollm2-tasks", "sources": None})
    study = optuna.create_study()
    for rules in [{**data_rules(), "eval": 0}, {**data_rules(), "tasks": 2}, {**data_rules(), "split": 1}, None]:
        study.set_user_attr(DATA_ATTR, rules)
        check_experts(study, config)  # the user's models: nothing to retrain
    study.set_user_attr(DATA_ATTR, {**data_rules(), "eval": 0, "tasks": 2})
    check_experts(study, cross)
    with pytest.raises(ConfigError, match=r"made from rows of evoopt's corpora under other rules \({'split': 2, "
                                          r"'corpora': {}, 'tasks': 2}"):
        check_experts(study, causal)
    study.set_user_attr(DATA_ATTR, None)  # made before any corpus was revised
    check_experts(study, causal)
    with pytest.raises(ConfigError, match=r"\{'split': 2, 'corpora': \{\}\}; this evoopt makes them under "
                                          r"\{'split': 2, 'corpora': \{'rotten-tomatoes': 1\}\}"):
        check_experts(study, cross)
    evolver = config.space.model_copy(update={"kind": "evolver", "method": "fisher"})
    fisher = config.model_copy(update={"space": evolver, "sources": config.sources.model_copy(update={
        "tasks": ["rotten-tomatoes"]})})  # the user's models, calibrated on Rotten Tomatoes' training rows
    with pytest.raises(ConfigError, match="calibration texts"):
        check_experts(study, fisher)
    check_experts(study, fisher.model_copy(update={"space": evolver.model_copy(update={"method": "ties"})}))
    storage = f"sqlite:///{stored.root / 'rebuilt.db'}"
    made = optuna.create_study(study_name="cross", storage=storage)
    made.set_user_attr(CONFIG_ATTR, cross.model_copy(update={"name": "cross"}).identity())
    made.set_user_attr(ROOT_ATTR, str(stored.root))
    made.set_user_attr(DATA_ATTR, {**data_rules(), "split": 1})
    with pytest.raises(ModelArgsError, match=r"^study=cross: study 'cross' in sqlite:///.*rebuilt\.db searched over "
                                             "models made from rows of evoopt's corpora under other rules"):
        _study_trial("cross", storage, "best", None)


@pytest.mark.slow
def test_the_data_rules_a_study_depends_on(stored: Stored) -> None:
    """Scored on evoopt's dev rows: the split and dev rules and the revisions of its corpora, the lm-eval tasks'
    version where lm-eval scores them or made causal experts; lm-eval's own tasks on experts of a setting: the rules
    that make those experts, not dev's; on models of the user's: none, unless its calibration texts come from
    evoopt's corpora."""
    from evoopt.study.storage import _rules_read, data_rules

    config = parse_config(small_study_config(stored.root, stored.experts, name="rules", trials=1))
    assert _rules_read(data_rules(), config) == {"split": 2, "corpora": {}, "eval": 1}
    cross = config.model_copy(update={"sources": config.sources.model_copy(update={"tasks": ["rotten-tomatoes"]})})
    assert _rules_read(data_rules(), cross)["corpora"] == {"rotten-tomatoes": 1}
    own = config.model_copy(update={"objective": config.objective.model_copy(update={"kind": "lm-eval",
                                                                                     "tasks": ["arc_easy"]}),
                                    "sources": config.sources.model_copy(update={"tasks": []})})
    assert _rules_read(data_rules(), own) == {}
    calibrated = own.model_copy(update={"sources": own.sources.model_copy(update={"tasks": ["rotten-tomatoes"]})})
    assert _rules_read(data_rules(), calibrated) == {"split": 2, "corpora": {"rotten-tomatoes": 1}}
    experts = own.model_copy(update={"sources": own.sources.model_copy(update={
        "models": ["expert:minilm-cross-task/sms-spam", "expert:minilm-cross-task/rotten-tomatoes"]})})
    assert _rules_read(data_rules(), experts) == {"split": 2, "corpora": {"rotten-tomatoes": 1}}
    causal = config.model_copy(update={"setting": "smollm2-tasks", "sources": None})
    assert _rules_read(data_rules(), causal) == {"split": 2, "corpora": {}, "tasks": 3, "eval": 1}
    lm_eval = causal.model_copy(update={"objective": causal.objective.model_copy(update={"kind": "lm-eval"})})
    assert _rules_read(data_rules(), lm_eval) == _rules_read(data_rules(), causal)


@pytest.mark.slow
def test_a_config_problem_found_by_the_first_trial_leaves_the_name_free(stored: Stored, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A config's problem the first trial finds (an lm-eval task that is not there, found as its scorer is built)
    stops the run; the study, holding only that failed trial, is taken back so the corrected config can have the
    name (it was kept, and the fixed config then refused as another config under a used name)."""
    from evoopt.errors import ConfigError
    from evoopt.study.run import run_study

    def refused(self: Any, model: Any, split: str, trial: Any = None) -> Any:
        raise ConfigError("objective.tasks[0]: no lm-eval task 'arc_easyy'")

    config = parse_config(small_study_config(stored.root, stored.experts, name="first", trials=2,
                                             storage=f"sqlite:///{tmp_path / 'first.db'}"))
    monkeypatch.setattr(Worker, "score", refused)
    with pytest.raises(ConfigError, match="arc_easyy"):
        run_study(config, baselines=False)
    with pytest.raises(KeyError):
        optuna.load_study(study_name="first", storage=config.storage_url)


@pytest.mark.slow
def test_a_study_another_process_opened_is_never_taken_back(stored: Stored, tmp_path: Path) -> None:
    """The process that made a study takes it back on a refusal only while no other has opened it: a worker
    started beside it may still be loading its models."""
    from evoopt.errors import ConfigError
    from evoopt.study.run import _open_study, _unused

    config = parse_config(small_study_config(stored.root, stored.experts, name="shared", trials=1,
                                             storage=f"sqlite:///{tmp_path / 'shared.db'}"))
    study, made = _open_study(config)
    assert made and _unused(study)
    with pytest.raises(ConfigError, match="made from another config"):  # refused: it has not joined
        _open_study(config.model_copy(update={"seed": 7}))
    assert _unused(study)
    assert _open_study(config)[1] is False  # a worker beside it
    assert not _unused(study)


@pytest.mark.slow
def test_taking_back_and_joining_always_see_each_other(stored: Stored, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The maker marks its study withdrawn and then reads whether anyone joined; a joiner marks joined and then
    reads withdrawn. Every order of the two leaves the joiner with a study that stays."""
    from evoopt.study import run
    from evoopt.study.run import JOINED_ATTR, WITHDRAWN_ATTR, _joined, _open_study, _take_back

    config = parse_config(small_study_config(stored.root, stored.experts, name="race", trials=1,
                                             storage=f"sqlite:///{tmp_path / 'race.db'}"))
    # the joiner marks and reads between the maker's mark and its read: it waits, and the maker keeps the study
    made, _ = _open_study(config)
    joiner = optuna.load_study(study_name="race", storage=config.storage_url)
    seen = []
    unused = run._unused
    monkeypatch.setattr(run, "_unused", lambda study: (seen.append(_joined(joiner, give_up=False)), unused(study))[1])
    _take_back(made)
    assert seen == [False]  # it saw the withdrawal and opens again
    system = made._storage.get_study_system_attrs(made._study_id)
    assert system[JOINED_ATTR] and not system[WITHDRAWN_ATTR]  # the maker saw it joined and kept the study
    assert _joined(joiner, give_up=False)
    monkeypatch.setattr(run, "_unused", unused)
    # the maker takes its study back after the joiner loaded it: the joiner makes it anew, with no traceback
    optuna.delete_study(study_name="race", storage=config.storage_url)
    made, _ = _open_study(config)
    load = optuna.load_study

    def load_then_taken_back(**kwargs: Any) -> optuna.Study:
        study = load(**kwargs)
        _take_back(made)
        return study

    monkeypatch.setattr(optuna, "load_study", load_then_taken_back)
    again, made_again = _open_study(config)
    assert made_again and again.study_name == "race"
    # run --workers' own processes do not join (their parent waits for them), so it can still take it back
    monkeypatch.setattr(optuna, "load_study", load)
    monkeypatch.setenv(run._LOCAL_WORKER_ENV, "1")
    assert _open_study(config)[1] is False and run._unused(again)


@pytest.mark.slow
def test_a_failing_take_back_never_hides_the_error_that_caused_it(stored: Stored, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from evoopt.study.run import _open_study, _take_back

    config = parse_config(small_study_config(stored.root, stored.experts, name="failing", trials=1,
                                             storage=f"sqlite:///{tmp_path / 'failing.db'}"))
    study, _ = _open_study(config)

    def broken(*args: Any) -> None:
        raise OSError("disk I/O error")

    monkeypatch.setattr(study._storage, "set_study_system_attr", broken)
    with pytest.warns(UserWarning, match="could not be taken back: disk I/O error"):
        _take_back(study)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["best", "status", "export", "dashboard"])
def test_read_commands_refuse_an_edited_config(stored: Stored, tmp_path: Path, command: str) -> None:
    """``best``/``export`` through an edited config would rebuild another model than the trial scored."""
    from click.testing import CliRunner

    from evoopt.cli import main

    file = tmp_path / "kept.yaml"
    edited = small_study_config(stored.root, stored.experts, name="kept", trials=2)
    edited["space"] = {**edited["space"], "method": "dare_ties"}
    file.write_text(yaml.safe_dump(edited))
    extra = {"export": ["--out", str(tmp_path / "out")], "dashboard": ["--port", "1"]}.get(command, [])
    result = CliRunner().invoke(main, [command, str(file), *extra])
    assert result.exit_code == 1, result.output
    assert "was made from another config" in result.output and 'space.method: stored "ties", now "dare_ties"' in \
        result.output
    assert "serving" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("setting", "objective", "message"), [
    ("minilm-sentiment-domains", {"kind": "lm-eval"}, "objective.kind: lm-eval scores causal language models; "
     "minilm-sentiment-domains's experts are encoder classifiers: use kind: dev"),
    ("smollm2-tasks", {"kind": "lm-eval", "metric": "mse"},
     "objective.metric: lm-eval tasks are scored by accuracy, not mse; use metric: accuracy"),
    ("smollm2-tasks", {"kind": "lm-eval", "metric": "perplexity"},
     "use metric: accuracy (or kind: dev for perplexity)"),
    ("smollm2-tasks", {"metric": "macro_f1"},
     "objective.metric: smollm2-tasks is scored by accuracy (its lm-eval tasks) or perplexity, not macro_f1"),
    ("minilm-cross-task", {"metric": "mse"}, "objective.metric: mse needs regression heads (one output); "
     "minilm-cross-task's tasks are classification: use accuracy or macro_f1"),
    ("minilm-cross-task", {"metric": "perplexity"}, "objective.metric: perplexity needs a causal LM setting"),
])
def test_a_metric_its_scorer_does_not_compute_is_refused(setting: str, objective: dict[str, Any],
                                                         message: str) -> None:
    """lm-eval scored accuracy whatever the metric, so metric: mse searched for the worst model (minimised)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"name": "m", "setting": setting, "objective": objective})
    for fine in ({"kind": "lm-eval"}, {"metric": "perplexity"}, {}):
        assert parse_config({"name": "m", "setting": "smollm2-tasks", "objective": fine})
    assert parse_config({"name": "m", "setting": "minilm-cross-task", "objective": {"metric": "macro_f1"}})


def test_a_method_the_sources_cannot_feed_is_refused_before_anything_is_scored() -> None:
    """No base for TIES, four experts for SLERP: each was found when its recipe was made, after the sources'
    baselines had been scored."""
    with pytest.raises(ConfigError) as caught:
        parse_config({"name": "m", "sources": {"models": ["a", "b"], "tasks": ["sms-spam"]},
                      "space": {"method": "ties"}, "baselines": ["sources", "linear", "dare_ties"]})
    assert str(caught.value).splitlines()[1:] == [
        "  - space.method: 'ties' needs a base (pretrained) model; give sources.base, or choose another method",
        "  - baselines: 'dare_ties' needs a base (pretrained) model; give sources.base, or leave it out of baselines"]
    with pytest.raises(ConfigError, match=re.escape("baselines: 'slerp' takes exactly 1 model besides its base, the "
                                                    "study has 4; leave it out of baselines")):
        parse_config({"name": "m", "setting": "minilm-cross-task", "baselines": ["ties", "slerp"]})


def test_missing_source_paths_are_named_by_their_study_keys_before_anything_is_made(tmp_path: Path) -> None:
    """Under the config file's name, as the config's own problems are (they were headed "study:")."""
    from evoopt.study.config import load_config

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "m", "artifacts": str(tmp_path), "baselines": ["linear"],
                                    "sources": {"base": "nobase", "models": ["a", "b"], "tasks": ["sms-spam"]}}))
    config = load_config(path)
    for call in (run_study, run_baselines):
        with pytest.raises(ConfigError) as caught:
            call(config)
        assert str(caught.value).splitlines() == [f"{path}: 3 problem(s):"] + [
            f"  - sources.{key}: {tmp_path / name}: no such file or folder; check the path in the study config"
            for key, name in (("base", "nobase"), ("models[0]", "a"), ("models[1]", "b"))]
    assert not (tmp_path / "m").exists()  # no study, no storage


def test_sources_the_objective_cannot_score_are_named_before_anything_is_made(tmp_path: Path) -> None:
    """A language model scored as a classifier, a classifier scored as a language model, mse on a two-label head:
    each failed with a traceback (a broadcast error, lm-eval's TypeError, an IndexError) after the baselines had
    run, and the study it left kept the corrected config from the name."""
    from tests.helpers.models import tiny_bert_config

    llama = save_family(tmp_path / "llama", tiny_llama_config(), experts=2, seed=0)
    bert = save_family(tmp_path / "bert", tiny_bert_config(), experts=2, seed=0,
                       model_class="BertForSequenceClassification")
    cases = [(llama, {"kind": "dev"}, "is a LlamaForCausalLM, a language model; objective.metric accuracy scores a "
                                      "classification head: use metric perplexity"),
             (llama, {"kind": "dev", "metric": "mse"}, "objective.metric mse scores a classification head"),
             (bert, {"kind": "lm-eval"}, "is a BertForSequenceClassification, a classifier; objective.kind lm-eval "
                                         "scores language models"),
             (bert, {"kind": "dev", "metric": "perplexity"}, "objective.metric perplexity scores language models"),
             (bert, {"kind": "dev", "metric": "mse"}, "has 3 outputs; objective.metric mse needs regression heads")]
    for family, objective, message in cases:
        base, *models = family
        sources = {"base": str(base), "models": [str(m) for m in models], "tasks": ["sms-spam"]}
        config = parse_config({"name": "m", "artifacts": str(tmp_path / "out"), "baselines": ["linear"],
                               "objective": objective, "sources": sources}, root=tmp_path)
        for call in (run_study, run_baselines):
            with pytest.raises(ConfigError, match=re.escape(message)) as caught:
                call(config)
            assert "\n  - sources.models[0]: " in str(caught.value) and "\n  - sources.models[1]: " in str(caught.value)
        assert not (tmp_path / "out").exists()  # no study, no storage
    fitting = parse_config({"name": "m", "artifacts": str(tmp_path / "out"), "objective": {"metric": "perplexity"},
                            "sources": {"base": str(llama[0]), "models": [str(m) for m in llama[1:]],
                                        "tasks": ["sms-spam"]}}, root=tmp_path)
    from evoopt.study.run import check_sources

    check_sources(fitting)  # (a language model scored by perplexity: nothing to say)


def test_a_study_whose_source_models_changed_is_neither_resumed_nor_exported(tmp_path: Path) -> None:
    """A source fine-tuned again in place (the same names and sizes): resuming added trials scored on other weights
    beside the old ones, and export put a trial's coefficients on weights it was never scored with. A study made
    before the fingerprints were kept is given them when next opened."""
    from evoopt.integrations.lm_eval import ModelArgsError, _study_trial
    from evoopt.study.storage import SOURCES_ATTR

    family = save_family(tmp_path / "models", tiny_llama_config(), experts=2, seed=0)
    data = {"name": "fp", "artifacts": str(tmp_path / "out"), "objective": {"metric": "perplexity"},
            "sources": {"base": str(family[0]), "models": [str(m) for m in family[1:]], "tasks": ["sms-spam"]}}
    (tmp_path / "fp.yaml").write_text(yaml.safe_dump(data))
    config = parse_config(data, root=tmp_path)
    study = open_study(config)
    kept = study.user_attrs[SOURCES_ATTR]
    assert set(kept) == {"sources.base", "sources.models[0]", "sources.models[1]"}
    open_study(config)  # the same weights: resumed
    study._storage.set_study_user_attr(study._study_id, SOURCES_ATTR, None)
    assert open_study(config).user_attrs[SOURCES_ATTR] == kept  # (an older study: given them)
    weights = family[2] / "model.safetensors"
    state = load_file(weights)
    save_file({k: v * 1.01 for k, v in state.items()}, weights, metadata={"format": "pt"})  # the same size
    for call in (lambda: open_study(config), lambda: export_trial(config, "best", tmp_path / "exported")):
        with pytest.raises(ConfigError, match=re.escape("searched over models whose weights have changed since: "
                                                        f"sources.models[1] ({family[2]}); its trials were scored "
                                                        "on the earlier weights: restore them")):
            call()
    with pytest.raises(ModelArgsError, match=r"fp.yaml: study 'fp' in .* searched over models whose weights have "
                                             r"changed since: sources.models\[1\]"):  # lm-eval's model
        _study_trial(None, None, "best", str(tmp_path / "fp.yaml"))
    assert not (tmp_path / "exported").exists()
    save_file(state, weights, metadata={"format": "pt"})  # restored
    open_study(config)


def test_lm_eval_keys_are_for_lm_eval_and_its_include_path_is_read_from_the_configs_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("objective.tasks: only for objective.kind lm-eval; set kind: "
                                                    "lm-eval, or drop it")):
        parse_config({"name": "m", "setting": "minilm-cross-task", "objective": {"tasks": ["hellaswag"]}})
    objective = {"kind": "lm-eval", "tasks": ["mine"], "include_path": "tasks"}
    with pytest.raises(ConfigError, match=re.escape(f"objective.include_path: {tmp_path / 'tasks'} is not a folder")):
        parse_config({"name": "m", "setting": "smollm2-tasks", "objective": objective}, root=tmp_path)
    (tmp_path / "tasks").mkdir()
    config = parse_config({"name": "m", "setting": "smollm2-tasks", "objective": objective,
                           "artifacts": str(tmp_path / "out"),
                           "storage": "postgresql://u:s3cret@db/evo"}, root=tmp_path)
    # run --workers' processes read a copy in the study's folder, checked against the config's folder (--root): it
    # was checked against its own folder, and every worker failed on include_path; the password stays off disk
    from evoopt.cli import _load_study_config
    from evoopt.study.run import worker_config

    copy = worker_config(config)
    assert copy.parent == tmp_path / "out" / "m" and "s3cret" not in copy.read_text()
    loaded = _load_study_config(copy, tmp_path, config.storage_url)
    assert loaded.root == tmp_path and loaded.storage_url == config.storage_url  # type: ignore[attr-defined]


def test_fidelities_of_a_perplexity_study_are_refused() -> None:
    """Perplexity is scored in one pass: a pruner given fidelities never saw a report, silently."""
    with pytest.raises(ConfigError, match="objective.fidelities: perplexity is scored in one pass"):
        parse_config({"name": "m", "setting": "smollm2-tasks", "objective": {"metric": "perplexity",
                                                                            "fidelities": [20, 50]}})


def test_a_storage_password_is_masked_in_what_is_printed(tmp_path: Path) -> None:
    config = parse_config({"name": "m", "setting": "minilm-cross-task", "storage": "postgresql://u:s3cret@db/evo"})
    assert config.storage_shown == "postgresql://u:***@db/evo" and "s3cret" in config.storage_url
    journal = parse_config({"name": "m", "setting": "minilm-cross-task", "storage": "journal:runs/evo.log"})
    assert journal.storage_shown == journal.storage_url  # (not a URL: as given)
    # nor in a missing study's message (status, best, export, compare, dashboard)
    from evoopt.study.storage import load_study

    with pytest.raises(ConfigError, match=r"no study 'm' in postgresql://u:\*\*\*@db/evo; run it first"):
        load_study(config, optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'm.db'}"))


@pytest.mark.parametrize("name", ["../x", " ", "a/../../b", "..", "/abs", "a\\..\\b", " padded"])
def test_a_study_name_that_leaves_the_artifacts_folder_is_refused(name: str) -> None:
    """The name is the study's folder under artifacts: '../../etc' put its database outside them."""
    with pytest.raises(ConfigError, match=r"name: .* names a folder under artifacts"):
        parse_config({"name": name, "setting": "minilm-cross-task"})
    assert parse_config({"name": "exp/a", "setting": "minilm-cross-task"})  # (a folder in a folder, as before)


def test_a_lower_batch_size_resumes_the_same_study() -> None:
    """A trial out of memory says to lower objective.batch_size; the resumed study was then refused as another
    config. The batch size changes a score by floating-point rounding alone: a run-time key, the others not."""
    from evoopt.study.config import same_study

    data = {"name": "m", "setting": "minilm-cross-task", "objective": {"batch_size": 64}}
    stored = parse_config(data).identity()
    assert same_study(stored, parse_config({**data, "objective": {"batch_size": 16}})) == []
    assert same_study(stored, parse_config({**data, "objective": {"batch_size": 64, "limit": 50}})) == [
        "objective.limit: stored 300, now 50"]


def test_a_sqlite_url_ending_in_log_is_a_sqlite_file(tmp_path: Path) -> None:
    """The .log / .journal suffix names a journal only for a bare path: sqlite:///runs.log was opened as a journal
    (a UnicodeDecodeError on a real SQLite file; a run would have appended journal lines to it)."""
    from optuna.storages import JournalStorage, RDBStorage

    from evoopt.study.storage import storage_file, storage_from_url

    assert isinstance(storage_from_url(f"sqlite:///{tmp_path / 'runs.log'}"), RDBStorage)
    assert isinstance(storage_from_url(str(tmp_path / "other.log")), JournalStorage)
    assert isinstance(storage_from_url(f"journal:{tmp_path / 'j.db'}"), JournalStorage)
    assert storage_file(f"sqlite:///{tmp_path / 'runs.log'}") == tmp_path / "runs.log"


def test_a_study_made_by_a_command_that_failed_on_anything_is_taken_back(tmp_path: Path) -> None:
    """Only evoopt's own errors took it back: a library's (a tokenizer that will not load) left the study, and the
    corrected config was then refused as another config under its name."""
    from evoopt.study.run import taken_back_if_refused
    from evoopt.study.storage import read_storage

    config = parse_config({"name": "gone", "storage": f"sqlite:///{tmp_path / 'g.db'}", "artifacts": str(tmp_path),
                           "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]}})
    with pytest.raises(RuntimeError, match="no tokenizer"), taken_back_if_refused(config):
        raise RuntimeError("no tokenizer")
    assert optuna.get_all_study_names(read_storage(config)) == []


def test_a_blank_storage_is_refused_not_taken_for_the_default(tmp_path: Path) -> None:
    """`evoopt worker X.yaml --storage "$DB_URL"` with the variable unset ran a private local study."""
    for blank in ("", " "):
        with pytest.raises(ConfigError, match="storage: an empty storage URL"):
            parse_config({"name": "m", "setting": "minilm-cross-task", "storage": blank})
    from click.testing import CliRunner

    from evoopt.cli import main

    config = tmp_path / "s.yaml"
    config.write_text("name: m\nsetting: minilm-cross-task\n")
    for command in ("status", "worker"):
        result = CliRunner().invoke(main, [command, str(config), "--storage", ""])
        assert result.exit_code == 2 and "--storage" in result.output and "empty storage URL" in result.output
    assert not (tmp_path / "out").exists()


def test_a_grace_period_within_one_heartbeat_is_refused() -> None:
    """Every running trial would be failed as dead by another worker, and retried."""
    with pytest.raises(ConfigError, match=re.escape("grace_period: must be longer than heartbeat_interval (60 s), "
                                                    "got 5 s; a few heartbeats, e.g. 360")):
        parse_config({"name": "m", "setting": "minilm-cross-task", "heartbeat_interval": 60, "grace_period": 5})


def test_mse_on_a_classifier_is_refused_when_scored() -> None:
    from evoopt.data.objective import ClassifierScorer
    from evoopt.errors import EvaluationError

    scorer = ClassifierScorer.__new__(ClassifierScorer)
    scorer.metric = "mse"
    with pytest.raises(EvaluationError, match="mse needs regression heads .*the model gives 2"):
        scorer._per_example(np.zeros((3, 2), np.float32), np.zeros(3))


def test_a_storage_of_an_older_optuna_schema_says_how_to_upgrade_it(tmp_path: Path) -> None:
    """It was Optuna's RuntimeError, a traceback."""
    import sqlite3

    from evoopt.errors import StorageError
    from evoopt.study.storage import storage_from_url

    url = f"sqlite:///{tmp_path / 'old.db'}"
    optuna.create_study(study_name="old", storage=url)
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'v3.0.0.d'")
    with pytest.raises(StorageError, match=r"made by an older Optuna .*`optuna storage upgrade"):
        storage_from_url(url)
    with sqlite3.connect(tmp_path / "old.db") as db:
        db.execute("UPDATE alembic_version SET version_num = 'v99.0.0.a'")
    with pytest.raises(StorageError, match=r"made by a newer Optuna than this one; upgrade Optuna"):
        storage_from_url(url)
    # a journal made through sqlite:///FILE.log (a journal until that named a SQLite file): named as one
    journal = tmp_path / "runs.log"
    optuna.create_study(study_name="j", storage=storage_from_url(str(journal)))
    with pytest.raises(StorageError, match=r"is an Optuna journal file, not a SQLite database: give journal:PATH"):
        storage_from_url(f"sqlite:///{journal}", create=False)


def test_an_artifact_replaced_by_a_failed_write_keeps_its_old_content(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`compare` replaces its plot in the artifact store: the store's own write truncated the file in place."""
    from optuna.artifacts import get_all_artifact_meta

    from evoopt.study import storage
    from evoopt.study.storage import attach

    config = parse_config({"name": "a", "storage": f"sqlite:///{tmp_path / 'a.db'}", "artifacts": str(tmp_path),
                           "sources": {"base": "X", "models": ["A", "B"], "tasks": ["sms-spam"]}})
    study = open_study(config)
    plot = tmp_path / "compare.html"
    plot.write_text("one")
    attach(config, study, plot)
    (meta,) = get_all_artifact_meta(study)
    stored = tmp_path / "a" / "artifacts" / meta.artifact_id

    def half(source: Any, target: Any) -> None:
        Path(target).write_text("tw")
        raise OSError("disk full")

    plot.write_text("two")
    monkeypatch.setattr(storage.shutil, "copyfile", half)
    with pytest.raises(OSError, match="disk full"):
        attach(config, study, plot)
    assert stored.read_text() == "one"
    monkeypatch.undo()
    attach(config, study, plot)
    assert stored.read_text() == "two" and len(get_all_artifact_meta(study)) == 1
    assert sorted(p.name for p in stored.parent.iterdir()) == [meta.artifact_id]
