"""Data-flow-space merging (Akiba et al. 2024): the path of layers a token takes through the pool's models,
with scales; a trial's model is a path model that shares the pool's weights (nothing is merged)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import optuna
import torch

from evoopt.errors import ConfigError, EvaluationError
from evoopt.merge.merger import DTYPES
from evoopt.models.io import card_header
from evoopt.models.paths import LayerPath, export_path, path_model, path_parameters
from evoopt.search.evolver import NOT_FINITE
from evoopt.study.config import StudyConfig, bounds_problems, changed_keys
from evoopt.study.kinds.base import Kind, Progress
from evoopt.study.space import DfsSpace
from evoopt.study.storage import POOL_ATTR, check_experts, get_trial, load_study


class DfsKind(Kind[DfsSpace]):
    names = ("dfs",)
    in_pools = False  # its answer is a path of its own length through its pool
    keys: ClassVar[Mapping[str, tuple[str, ...]]] = {"dfs": ("pool", "repeats", "scaling", "scales", "binary")}

    @classmethod
    def problems(cls, config: StudyConfig) -> list[str]:
        """A data-flow space searches paths through causal LMs; its keys belong to it alone."""
        if config.space.kind not in cls.names:
            return []
        space, problems = config.space, []
        if changed_keys(space, "search", "log", "method"):
            problems.append("space.search / space.log / space.method: a data-flow space searches the path and its "
                            "scales, not merge coefficients; remove them")
        if config.objective.kind != "lm-eval" and config.objective.metric != "perplexity":
            problems.append("objective: space.kind dfs runs causal LMs; "
                            "use objective.kind lm-eval or metric perplexity")
        low, high = space.scales
        bounds = bounds_problems("space.scales", low, high)
        problems += bounds
        if not bounds and not low <= 1.0 <= high:
            problems.append(f"space.scales: [{low}, {high}] must contain 1 (the scale of an unchanged transition)")
        for i, ref in enumerate(space.pool):
            if ref.startswith("study:") and not ref.removeprefix("study:").endswith((".yaml", ".yml")):
                problems.append(f"space.pool[{i}]: 'study:' names a study config file (study:OTHER.yaml), got {ref!r}")
        if space.binary and config.sampler.name == "EvoCmaSampler" and config.sampler.options.get("separable"):
            problems.append("space.binary / sampler.options.separable: 0/1 indicators are searched by CMA-ES with "
                            "margin, which the cmaes library has no separable form of (sep-CMA would round them "
                            "without it); set separable: false, or binary: false")
        elif space.binary and config.sampler.name == "EvoCmaSampler" and \
                config.sampler.options.get("with_margin") is False:
            problems.append("space.binary / sampler.options.with_margin: 0/1 indicators need CMA-ES with margin "
                            "(without it, CMA-ES is told the rounded bits and its step size collapses on them); "
                            "remove with_margin: false, or set binary: false")
        if len(space.pool) == 1 and space.repeats == 1:
            problems.append("space.pool / space.repeats: one model laid out once can only drop layers; "
                            "give a second model or repeats > 1")
        return problems

    def make_space(self) -> DfsSpace:
        return DfsSpace(self.config, self.sources)

    def title(self) -> str:
        return "dfs (data-flow)"

    def build(self, study: optuna.Study | None, device: torch.device,
              progress: Progress | None = None) -> torch.nn.Module:
        """The pool's models, as they are: a path shares their weights."""
        from evoopt.models.io import load_target, open_source

        dtype = DTYPES.get(self.config.dtype, torch.float32)  # (auto: float32)
        opened = [open_source(folder) for folder in pool_folders(self.space, study)]
        self.pool = [load_target(source, dtype=dtype, device=device) for source in opened]
        try:  # models of other widths, or not decoders: said before any trial
            path_model(self.pool, self.space.path(self.space.identity()))
        except (TypeError, ValueError) as error:
            raise ConfigError(f"space.pool: {error}") from None
        self.model, self.tokenizer_folder, self.device = self.pool[0], opened[0].folder, device
        return self.model

    def start(self, study: optuna.Study) -> None:
        """Pin (and export) the pool's ``study:`` models before any other worker starts: each worker pinned the
        other study's best trial as it built, and one still running could give two workers two different pools."""
        pool_folders(self.space, study)

    def candidate(self, trial: optuna.Trial) -> tuple[torch.nn.Module, float]:
        try:
            path = self.space.suggest(trial)
        except ValueError as error:  # e.g. no slot on the path: never better, so told to CMA-ES as the worst (it
            trial.set_user_attr("fail_reason", str(error))  # learns to leave the region; a crash teaches nothing)
            trial.set_user_attr(NOT_FINITE, True)
            raise EvaluationError(f"trial {trial.number}: {error}") from None
        trial.set_user_attr("path", self.space.describe(path))
        trial.set_user_attr("path_length", len(path.hops))
        begun = time.perf_counter()
        return path_model(self.pool, path), begun

    def trial_model(self, params: Mapping[str, Any]) -> torch.nn.Module:
        return path_model(self.pool, self.space.path(dict(params)))

    def path_record(self, trial: optuna.trial.FrozenTrial, path: LayerPath | None = None) -> dict[str, Any]:
        """A trial's path: the pool, the hops (model, layer) and their scales (``path``: already decoded)."""
        space = self.space
        path = path or space.path(trial.params)
        return {"trial": trial.number, "path": space.describe(path), "length": len(path.hops),
                "pool": dict(zip(space.labels, space.pool)),
                "hops": [[space.labels[m], layer] for m, layer in path.hops], "scales": list(path.scales)}

    def model_info(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
        return {"evoopt_path": self.path_record(trial)}

    def record(self, trial: optuna.trial.FrozenTrial) -> str:
        import yaml

        return yaml.safe_dump(self.path_record(trial), sort_keys=False)

    def export(self, study: optuna.Study, which: str | int, out: Path, *,
               overwrite: bool = False) -> tuple[Path, str]:
        """A trial's model: its layers in path order, the scales applied by a small modeling file."""
        import yaml

        trial = get_trial(study, which)
        self.built(study)
        path = self.space.path(trial.params)
        text = yaml.safe_dump(self.path_record(trial, path), sort_keys=False)
        info = {"study": self.config.name, "trial": trial.number,
                "models": dict(zip(self.space.labels, self.space.pool)),
                "pinned": study.user_attrs.get(POOL_ATTR, {})}
        card = "\n".join([*card_header(f"{self.config.name}: data-flow-space merge", ("data-flow-space",)),
                          f"Trial {trial.number} of an evoopt data-flow study (Akiba et al. 2024): "
                          f"{len(path.hops)} layers, {path_parameters(self.pool, path):,} parameters. Load it with "
                          "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` (a small modeling "
                          "file applies the scales).", "", "```yaml", text.rstrip(), "```", ""])
        return (Path(export_path(self.pool, path, out, tokenizer_from=self.tokenizer_folder, card=card, info=info,
                                 overwrite=overwrite)), self.trial_text(trial))


def pool_folders(space: DfsSpace, study: optuna.Study | None = None) -> list[Path]:
    """The folders of a data-flow study's pool.

    ``study:OTHER.yaml`` is that study's best trial (PS+DFS: the best parameter-space model
    as A), exported once into this study's artifacts folder. The trial is pinned in ``study``
    (user attribute ``evoopt:pool``): a better trial found there later does not change this
    study's pool under its trials.
    """
    from evoopt.models.io import resolve_path
    from evoopt.study.config import load_config
    from evoopt.study.kinds import make_kind, on_cpu

    config = space.config
    pinned: dict[str, int] = dict(study.user_attrs.get(POOL_ATTR, {})) if study is not None else {}
    folders = []
    for ref in space.pool:
        if not ref.startswith("study:"):
            folders.append(resolve_path(ref, config.root))
            continue
        other = load_config(resolve_path(ref.removeprefix("study:"), config.root))
        opened = None
        if ref not in pinned:
            opened = load_study(other)
            pinned[ref] = get_trial(opened, "best").number
        folder = config.artifact_dir / "pool" / f"{other.name}-trial-{pinned[ref]}"
        if not folder.exists():
            try:
                opened = opened or load_study(other)
                check_experts(opened, other)
                make_kind(on_cpu(other)).export(opened, pinned[ref], folder)
            except (FileExistsError, OSError):
                if not folder.exists():  # (another worker exporting the same folder at once is fine)
                    raise
        folders.append(folder)
    if study is not None and pinned and pinned != study.user_attrs.get(POOL_ATTR):
        study.set_user_attr(POOL_ATTR, pinned)
    return folders
