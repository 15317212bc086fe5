"""Bad input, one table: each case must give a clear error and leave what is stored whole.

The stored things every case runs beside: a study with finished trials on real MiniLM experts
(its SQLite storage) and a model already exported from it. After each case, the study's trials
and the exported files are exactly what they were, and no temporary folder is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from safetensors.torch import load_file, save_file

from evoopt.config import parse_config
from evoopt.merger import Merger
from evoopt.recipe import parse_recipe
from evoopt.study import Worker, export_trial, open_study, run_study
from tests.conftest import save_family, tiny_llama_config
from tests.test_study import _config


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
    config = parse_config(_config(root, experts, name="kept", trials=2))
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


def _nan(file: Path) -> None:
    state = load_file(file)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, file, metadata={"format": "pt"})


def _other(s: Stored, tmp: Path, **config: Any) -> Path:
    return save_family(tmp / "other", tiny_llama_config(**config), experts=0, seed=5)[0]


def _study(s: Stored, **changes: Any) -> Any:
    data = _config(s.root, s.experts, name="kept", trials=2)
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
    ("empty dev set", lambda s, t, m: _study(s, **{"objective.limit": 0}), ValueError, "objective.limit"),
    ("unknown method", lambda s, t, m: _study(s, **{"space.method": "tie"}), ValueError,
     "space.method: unknown merge method 'tie'; known methods: breadcrumbs"),
    ("unknown sampler", lambda s, t, m: _study(s, **{"sampler.name": "CMA"}), ValueError,
     "sampler.name: unknown sampler 'CMA'; known: .*EvoCmaSampler"),
    ("inverted bounds", lambda s, t, m: _study(s, **{"space.search": {"weight": [1.0, 0.2]}}), ValueError,
     r"space.search.weight: bounds must be \[low, high\] with low < high"),
    ("wrong storage URL", lambda s, t, m: open_study(_study(s, storage="postgresql://nobody@127.0.0.1:1/none")),
     ValueError, "storage: cannot open .*check the URL, that the server is up"),
    ("study name reused with another config", lambda s, t, m: open_study(_study(s, seed=7)),
     ValueError, r"(?s)made from another config.*seed: stored 0, now 7"),
    ("full disk during export", _full_disk, OSError, "No space left on device"),
]


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
    assert not (tmp_path / "merged").exists()  # no half-written merge
    assert not [p for p in stored.exported.parent.iterdir() if p.name.startswith(".")]  # no temporary folder
    assert torch.get_default_dtype() == torch.float32
