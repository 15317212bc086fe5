"""Search spaces: a trial's parameters decode to a plain merge recipe.

A space names its Optuna parameters readably (``vader-tweets.weight``), samples
them from the distributions' own bounds, and turns any parameter mapping (a live
trial's, or a finished trial's ``params``) into a :class:`~evoopt.recipe.Recipe`
that ``evoopt merge`` and ``evoopt export`` accept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from evoopt.config import StudyConfig
from evoopt.experts import HEAD_PATTERNS
from evoopt.recipe import Recipe, parse_recipe


@dataclass(frozen=True)
class Sources:
    """The models of a study: a base, one expert per label, and the tasks they are scored on."""

    base: str | None
    models: tuple[str, ...]
    labels: tuple[str, ...]  # readable names of the models, used in parameter names
    tasks: tuple[str, ...]
    per_task_heads: bool
    kind: str  # encoder or causal
    root: Path

    @property
    def exclude(self) -> list[str]:
        return list(HEAD_PATTERNS) if self.per_task_heads else []


def study_sources(config: StudyConfig) -> Sources:
    if config.setting is not None:
        from evoopt.experts import get_setting

        setting = get_setting(config.setting)
        return Sources(f"expert:{setting.name}/base", tuple(f"expert:{setting.name}/{t}" for t in setting.tasks),
                       setting.tasks, setting.tasks, not setting.shared_head, setting.kind, config.root)
    assert config.sources is not None
    labels = tuple(Path(m.split(":")[-1]).name or f"m{i}" for i, m in enumerate(config.sources.models))
    if len(set(labels)) < len(labels):
        labels = tuple(f"m{i}" for i in range(len(labels)))
    kind = "causal" if config.objective.kind == "lm-eval" or config.objective.metric == "perplexity" else "encoder"
    return Sources(config.sources.base, tuple(config.sources.models), labels, tuple(config.sources.tasks),
                   False, kind, config.root)


def fixed_recipe(sources: Sources, method: str, parameters: dict[str, Any] | None = None,
                 per_model: list[dict[str, Any]] | None = None, *, config: StudyConfig,
                 calibration: str | None = None) -> Recipe:
    """A recipe over the study's sources."""
    data: dict[str, Any] = {
        "method": method,
        "models": [{"model": m, "parameters": (per_model or [{}] * len(sources.models))[i]}
                   for i, m in enumerate(sources.models)],
        "parameters": dict(parameters or {}),
        "seed": config.seed, "dtype": config.dtype, "device": config.device, "exclude": sources.exclude,
    }
    if sources.base is not None:
        data["base"] = sources.base
    if calibration is not None:  # a small set: Fisher takes one backward pass per example and model
        data["calibration"] = {"texts": calibration, "max_examples": 32, "max_length": 64}
    return parse_recipe(data, root=sources.root, source=f"{method} recipe")


class GlobalSpace:
    """One value per model for each searched coefficient (what OptunaHub's evo_merge searches)."""

    def __init__(self, config: StudyConfig, sources: Sources) -> None:
        self.config = config
        self.sources = sources
        self.distributions = {
            f"{label}.{key}": optuna.distributions.FloatDistribution(low, high, log=key in config.space.log)
            for label in sources.labels for key, (low, high) in config.space.search.items()
        }

    def suggest(self, trial: optuna.Trial) -> Recipe:
        return self.recipe({name: trial.suggest_float(name, d.low, d.high, log=d.log)
                            for name, d in self.distributions.items()})

    def recipe(self, params: dict[str, Any]) -> Recipe:
        per_model = [{key: params[f"{label}.{key}"] for key in self.config.space.search}
                     for label in self.sources.labels]
        return fixed_recipe(self.sources, self.config.space.method, self.config.space.fixed, per_model,
                            config=self.config)

    def default(self) -> Recipe:
        """The centre of the space: what the evaluation model is built from before any trial."""
        mid = {name: (d.low * d.high) ** 0.5 if d.log else (d.low + d.high) / 2
               for name, d in self.distributions.items()}
        return self.recipe(mid)


def make_space(config: StudyConfig, sources: Sources) -> GlobalSpace:
    return GlobalSpace(config, sources)
